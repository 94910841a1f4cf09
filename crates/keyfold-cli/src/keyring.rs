//! `keyfold keyring …`: a keyring's lifecycle (docs/LIFECYCLE.md), every
//! change audited with the operator as actor.

use std::fmt::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use keyfold_core::RotationPolicy;
use keyfold_core::keyring::{DestroyAuthorization, KeyringMetadata, NoRecordsLeft, OperatorSeal};
use keyfold_core::time::Timestamp;
use keyfold_core::{
    KeyWrapper, SecretKey, WrapContext, WrapError, WrapErrorKind, WrapOperation, WrappedKey,
};
use serde_json::json;

use crate::cli::{KeyringCommand, VersionArgs};
use crate::error::{CliError, Kind};
use crate::globals::Globals;
use crate::ui::{confirm, parse_rfc3339, rfc3339};

/// The wrapper `keyring show` uses when no KMS is configured: reading
/// metadata needs none, and any KMS call fails.
#[derive(Debug)]
struct NoKms;

impl NoKms {
    fn refuse(op: WrapOperation) -> WrapError {
        WrapError::new(WrapErrorKind::Misconfigured, "none", "none", op)
            .with_message("no KMS configured (--config with a \"kms\" section)")
    }
}

#[async_trait]
impl KeyWrapper for NoKms {
    fn provider(&self) -> &str {
        "none"
    }
    fn key_ref(&self) -> &str {
        "none"
    }
    async fn wrap(&self, _: &SecretKey, _: &WrapContext) -> Result<WrappedKey, WrapError> {
        Err(Self::refuse(WrapOperation::Wrap))
    }
    async fn unwrap(&self, _: &WrappedKey, _: &WrapContext) -> Result<SecretKey, WrapError> {
        Err(Self::refuse(WrapOperation::Unwrap))
    }
}

fn when(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".to_owned(), rfc3339)
}

fn or_dash(v: Option<u32>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("v{v}"))
}

/// The text form of `keyring show`.
fn show_text(m: &KeyringMetadata) -> String {
    let mut t = format!(
        "keyring {} (revision {})\n\
         active {} · latest {} · min decryption {} · {} version(s)\n",
        m.keyring_id,
        m.revision,
        or_dash(m.active_version),
        or_dash(m.latest_version),
        or_dash(m.min_decryption_version),
        m.version_count,
    );
    if let Some(s) = &m.operator_seal {
        let _ = writeln!(
            t,
            "SEALED BY AN OPERATOR since {} by {}: {}\n  \
             nothing is encrypted or decrypted until `keyfold keyring unseal {}`",
            rfc3339(s.since),
            s.actor,
            s.reason,
            m.keyring_id
        );
    }
    if let Some(s) = &m.sealed {
        let _ = writeln!(t, "SEALED since {} ({:?})", rfc3339(s.since), s.kind);
    }
    if m.versions.is_empty() {
        t.push_str("no versions yet: `keyfold keyring rotate` creates version 1\n");
        return t;
    }
    let _ = writeln!(
        t,
        "{:>7}  {:<9}  {:<20}  {:<20}  {:<20}  {:<20}  WRAPPED BY",
        "VERSION", "STATE", "CREATED", "ACTIVATED", "RETIRED", "DISABLED"
    );
    for v in &m.versions {
        let state = match (v.destroyed_at, v.destroy_scheduled_at) {
            (Some(at), _) => format!("{} {}", v.state, rfc3339(at)),
            (None, Some(at)) => format!("{} (destroy scheduled {})", v.state, rfc3339(at)),
            (None, None) => v.state.to_string(),
        };
        let _ = writeln!(
            t,
            "{:>7}  {:<9}  {:<20}  {:<20}  {:<20}  {:<20}  {}",
            v.version,
            state,
            rfc3339(v.created_at),
            when(v.activated_at),
            when(v.retired_at),
            when(v.disabled_at),
            v.wrap_key_ref.as_deref().unwrap_or("-"),
        );
    }
    t
}

/// An operator's seal as the CLI prints it in `--json` (time in RFC 3339).
fn seal_json(s: &OperatorSeal) -> serde_json::Value {
    json!({"since": rfc3339(s.since), "reason": s.reason, "actor": s.actor})
}

/// The configured KMS wrapper, or [`NoKms`] when the config has none (for
/// commands that need no KMS call).
async fn wrapper_if_configured(g: &Globals) -> Result<Arc<dyn KeyWrapper>, CliError> {
    if g.config.has_kms() {
        g.wrapper().await
    } else {
        Ok(Arc::new(NoKms))
    }
}

/// Which KMS wrapper a change needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kms {
    /// The configured one; a missing `kms` section is a usage error.
    Required,
    /// The configured one if any (the change makes no KMS call).
    IfConfigured,
}

async fn change(
    g: &Globals,
    id: &str,
    create: bool,
    confirmation: Option<String>,
    act: impl AsyncFnOnce(
        &keyfold_core::Keyring,
        &keyfold_core::audit::Actor,
    ) -> Result<(String, serde_json::Value), CliError>,
) -> Result<(), CliError> {
    change_with(g, id, create, Kms::Required, confirmation, act).await
}

async fn change_with(
    g: &Globals,
    id: &str,
    create: bool,
    kms: Kms,
    confirmation: Option<String>,
    act: impl AsyncFnOnce(
        &keyfold_core::Keyring,
        &keyfold_core::audit::Actor,
    ) -> Result<(String, serde_json::Value), CliError>,
) -> Result<(), CliError> {
    // Everything that can fail without a change fails first: the actor, the
    // audit log, the KMS config, the store.
    let actor = g.actor()?;
    let audit = g.audit()?;
    let wrapper = match kms {
        Kms::Required => g.wrapper().await?,
        Kms::IfConfigured => wrapper_if_configured(g).await?,
    };
    let ring = g.keyring(id, wrapper, Arc::clone(&audit), create).await?;
    if let Some(what) = confirmation {
        confirm(g.yes, &what, id)?;
    }
    let (text, json) = act(&ring, &actor).await?;
    g.output.emit(&text, &json);
    audit.check()
}

fn version_change(verb: &'static str) -> impl Fn(&VersionArgs) -> (String, serde_json::Value) {
    move |a: &VersionArgs| {
        (
            format!("keyring {}: version {} {verb}\n", a.keyring, a.version),
            json!({"keyring": a.keyring, "version": a.version, "result": verb}),
        )
    }
}

/// Runs one `keyring` subcommand.
pub(crate) async fn run(cmd: KeyringCommand, g: &Globals) -> Result<(), CliError> {
    match cmd {
        KeyringCommand::Show { keyring } => {
            let wrapper = wrapper_if_configured(g).await?;
            let store = g.store(false).await?;
            let ring = keyfold_core::Keyring::builder(keyring.as_str(), wrapper, store)
                .open()
                .await?;
            let m = ring.metadata();
            let mut json =
                serde_json::to_value(&m).map_err(|e| CliError::failure(e.to_string()))?;
            let mut text = show_text(&m);
            let policy = ring.rotation_policy();
            if let Some(p) = policy {
                let _ = writeln!(
                    text,
                    "rotation policy: every {} day(s), {}",
                    p.period_days(),
                    if p.enabled() { "enabled" } else { "disabled" }
                );
            }
            if let Some(o) = json.as_object_mut() {
                o.insert(
                    "operator_seal".into(),
                    m.operator_seal
                        .as_ref()
                        .map_or(serde_json::Value::Null, seal_json),
                );
                o.insert(
                    "rotation_policy".into(),
                    policy.map_or(
                        serde_json::Value::Null,
                        |p| json!({"enabled": p.enabled(), "period_days": p.period_days()}),
                    ),
                );
            }
            g.output.emit(&text, &json);
            Ok(())
        }
        KeyringCommand::Create { keyring } => {
            change(g, &keyring, true, None, async |ring, actor| {
                let r = ring.rotate(actor).await.map_err(|e| {
                    let mut err = CliError::from(e);
                    err.message = format!(
                        "keyring {} was created, but its first version was not: {}; \
                         retry with `keyfold keyring rotate {}`",
                        ring.id(),
                        err.message,
                        ring.id()
                    );
                    err
                })?;
                Ok((
                    format!(
                        "keyring {} created; version {} is active (wrapped by {} {})\n",
                        ring.id(),
                        r.version,
                        ring.wrapper().provider(),
                        ring.wrapper().key_ref()
                    ),
                    json!({"keyring": ring.id(), "created": true, "active_version": r.version}),
                ))
            })
            .await
        }
        KeyringCommand::Rotate { keyring } => {
            change(g, &keyring, false, None, async |ring, actor| {
                let r = ring.rotate(actor).await?;
                Ok((
                    format!(
                        "keyring {}: version {} is active{}\n",
                        ring.id(),
                        r.version,
                        r.previous_version
                            .map(|p| format!("; version {p} retired (still decrypts)"))
                            .unwrap_or_default()
                    ),
                    json!({"keyring": ring.id(), "active_version": r.version,
                           "previous_version": r.previous_version, "lease_id": r.lease_id}),
                ))
            })
            .await
        }
        KeyringCommand::Rollback(a) => {
            let done = version_change("active again (rolled back)")(&a);
            change(g, &a.keyring, false, None, async |ring, actor| {
                ring.rollback(a.version, actor).await?;
                Ok(done)
            })
            .await
        }
        KeyringCommand::Enable(a) => {
            let done = version_change("enabled (retired: decrypts again)")(&a);
            change(g, &a.keyring, false, None, async |ring, actor| {
                ring.enable(a.version, actor).await?;
                Ok(done)
            })
            .await
        }
        KeyringCommand::Disable(a) => {
            let done = version_change("disabled (its records no longer decrypt)")(&a);
            let what = format!(
                "Disable version {} of keyring {}: its records stop decrypting until enabled",
                a.version, a.keyring
            );
            change(g, &a.keyring, false, Some(what), async |ring, actor| {
                ring.disable(a.version, actor).await?;
                Ok(done)
            })
            .await
        }
        KeyringCommand::Destroy {
            target: a,
            evidence,
            force,
            reason,
        } => {
            let authorization = match (evidence, force, reason) {
                (Some(path), false, None) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        CliError::usage(format!("evidence file {}: {e}", path.display()))
                    })?;
                    let e: NoRecordsLeft = serde_json::from_str(&text).map_err(|e| {
                        CliError::usage(format!(
                            "evidence file {}: not evidence from `keyfold rewrap status \
                             --evidence-for`: {e}",
                            path.display()
                        ))
                    })?;
                    DestroyAuthorization::Evidence(e)
                }
                (None, true, Some(reason)) if !reason.trim().is_empty() => {
                    DestroyAuthorization::Forced { reason }
                }
                _ => {
                    return Err(CliError::usage(
                        "destroy needs --evidence FILE, or --force with a non-empty --reason",
                    ));
                }
            };
            let forced = matches!(authorization, DestroyAuthorization::Forced { .. });
            let what = format!(
                "Destroy version {} of keyring {}{}: its key is erased and records still on it \
                 can never be decrypted again",
                a.version,
                a.keyring,
                if forced { " WITHOUT evidence" } else { "" }
            );
            let (text, mut json) = version_change("destroyed")(&a);
            if let Some(o) = json.as_object_mut() {
                o.insert("forced".into(), forced.into());
            }
            change(g, &a.keyring, false, Some(what), async |ring, actor| {
                ring.destroy(a.version, authorization, actor).await?;
                Ok((text, json))
            })
            .await
        }
        KeyringCommand::Seal { keyring, reason } => {
            let reason = reason
                .filter(|r| !r.trim().is_empty())
                .ok_or_else(|| {
                    CliError::usage(
                        "seal needs --reason TEXT (not blank): it is audited and shown by every refusal",
                    )
                })?;
            let what = format!(
                "Seal keyring {keyring}: every instance stops encrypting and decrypting its \
                 records until `keyfold keyring unseal {keyring}`"
            );
            change_with(
                g,
                &keyring,
                false,
                Kms::IfConfigured,
                Some(what),
                async |ring, actor| {
                    // A seal already in force stays as it is (its time
                    // and reason); so does one stored meanwhile by another
                    // operator, which the library hands back.
                    let (seal, already) = match ring.operator_seal_info() {
                        Some(existing) => (existing, true),
                        None => {
                            let seal = ring.seal(reason.as_str(), actor).await?;
                            let theirs = seal.reason != reason || seal.actor != actor.0;
                            (seal, theirs)
                        }
                    };
                    let text = if already {
                        format!(
                            "keyring {} was already sealed since {} by {}: {}; that seal stays\n",
                            ring.id(),
                            rfc3339(seal.since),
                            seal.actor,
                            seal.reason
                        )
                    } else {
                        format!(
                            "keyring {} sealed at {} by {}: {}\n\
                             every instance refuses to encrypt and decrypt once it sees the seal \
                             (at its next use with store notifications, within its max staleness \
                             without) until `keyfold keyring unseal {}`\n",
                            ring.id(),
                            rfc3339(seal.since),
                            seal.actor,
                            seal.reason,
                            ring.id()
                        )
                    };
                    Ok((
                        text,
                        json!({"keyring": ring.id(), "sealed": true, "already_sealed": already,
                               "operator_seal": seal_json(&seal)}),
                    ))
                },
            )
            .await
        }
        KeyringCommand::Unseal { keyring } => {
            change_with(
                g,
                &keyring,
                false,
                Kms::IfConfigured,
                None,
                async |ring, actor| {
                    let lifted = ring.operator_seal_info();
                    ring.unseal_as(actor).await?;
                    let text = match &lifted {
                        Some(s) => format!(
                            "keyring {}: the operator's seal (since {} by {}: {}) is lifted; \
                             every instance works again once it sees the change\n",
                            ring.id(),
                            rfc3339(s.since),
                            s.actor,
                            s.reason
                        ),
                        None => format!(
                            "keyring {}: the KMS answered ({} {}); the keyring is usable\n",
                            ring.id(),
                            ring.wrapper().provider(),
                            ring.wrapper().key_ref()
                        ),
                    };
                    Ok((
                        text,
                        json!({"keyring": ring.id(), "sealed": false,
                               "lifted": lifted.as_ref().map(seal_json)}),
                    ))
                },
            )
            .await
        }
        KeyringCommand::ScheduleDestroy { target: a, at } => {
            let at = at
                .map(|t| {
                    parse_rfc3339(&t).ok_or_else(|| {
                        CliError::usage(format!(
                            "--at {t:?}: use RFC 3339 in UTC, e.g. 2027-01-15T09:00:00Z"
                        ))
                    })
                })
                .transpose()?;
            let what = format!(
                "Schedule the destruction of version {} of keyring {} (enabling it cancels)",
                a.version, a.keyring
            );
            change(g, &a.keyring, false, Some(what), async |ring, actor| {
                let at = match at {
                    Some(at) => at,
                    None => ring.destroy_allowed_at(a.version).ok_or_else(|| {
                        CliError::new(
                            Kind::Lifecycle,
                            format!(
                                "version {} is not disabled: disable it first (`keyfold keyring disable`)",
                                a.version
                            ),
                        )
                    })?,
                };
                ring.schedule_destroy(a.version, at, actor).await?;
                Ok((
                    format!(
                        "keyring {}: version {} is scheduled for destruction at {at}; \
                         `keyfold keyring enable {} {}` cancels\n",
                        a.keyring, a.version, a.keyring, a.version
                    ),
                    json!({"keyring": a.keyring, "version": a.version, "destroy_scheduled_at": at,
                           "destroy_scheduled_at_rfc3339": at.to_string()}),
                ))
            })
            .await
        }
        KeyringCommand::MinDecryptionVersion(a) => {
            let what = format!(
                "Disable every version of keyring {} below {}: their records stop decrypting",
                a.keyring, a.version
            );
            change(g, &a.keyring, false, Some(what), async |ring, actor| {
                let disabled = ring.set_min_decryption_version(a.version, actor).await?;
                Ok((
                    format!(
                        "keyring {}: minimum decryption version {}; disabled now: {}\n",
                        a.keyring,
                        a.version,
                        if disabled.is_empty() {
                            "none".to_owned()
                        } else {
                            disabled.iter().map(|v| format!("v{v}")).collect::<Vec<_>>().join(", ")
                        }
                    ),
                    json!({"keyring": a.keyring, "min_decryption_version": a.version, "disabled": disabled}),
                ))
            })
            .await
        }
        KeyringCommand::Policy {
            keyring,
            period_days,
            off,
            on,
            remove,
        } => {
            let describe = |p: Option<RotationPolicy>, last: Option<Timestamp>| match p {
                None => ("no rotation policy".to_owned(), json!(null)),
                Some(p) => (
                    format!(
                        "rotate every {} day(s), {}{}",
                        p.period_days(),
                        if p.enabled() { "enabled" } else { "disabled" },
                        match (p.enabled(), last) {
                            (true, Some(last)) => format!("; next due {}", p.next_due(last)),
                            (true, None) => "; due now (never rotated)".to_owned(),
                            _ => String::new(),
                        }
                    ),
                    json!({"enabled": p.enabled(), "period_days": p.period_days(),
                           "next_due": (p.enabled()).then(|| last.map(|l| p.next_due(l).to_string())).flatten()}),
                ),
            };
            if period_days.is_none() && !off && !on && !remove {
                // Show only: no KMS call, no change.
                let wrapper: Arc<dyn KeyWrapper> = if g.config.has_kms() {
                    g.wrapper().await?
                } else {
                    Arc::new(NoKms)
                };
                let ring = keyfold_core::Keyring::builder(
                    keyring.as_str(),
                    wrapper,
                    g.store(false).await?,
                )
                .open()
                .await?;
                let (text, json) = describe(ring.rotation_policy(), ring.last_rotation());
                g.output.emit(
                    &format!("keyring {keyring}: {text}\n"),
                    &json!({"keyring": keyring, "rotation_policy": json}),
                );
                return Ok(());
            }
            change(g, &keyring, false, None, async |ring, actor| {
                let current = ring.rotation_policy();
                let policy = if remove {
                    None
                } else {
                    let days = period_days
                        .or(current.map(|p| p.period_days()))
                        .ok_or_else(|| {
                            CliError::usage("no policy stored yet: give --period-days N")
                        })?;
                    let enabled = if off {
                        false
                    } else {
                        on || period_days.is_some() || current.is_some_and(|p| p.enabled())
                    };
                    Some(
                        RotationPolicy::new(enabled, days)
                            .map_err(|e| CliError::usage(e.to_string()))?,
                    )
                };
                ring.set_rotation_policy(policy, actor).await?;
                let (text, json) = describe(policy, ring.last_rotation());
                Ok((
                    format!("keyring {}: {text}\n", ring.id()),
                    json!({"keyring": ring.id(), "rotation_policy": json}),
                ))
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_kms_refuses_every_call() {
        let key = SecretKey::generate().ok();
        let ctx = WrapContext::new("k", 1);
        if let Some(key) = key {
            let e = NoKms.wrap(&key, &ctx).await.err();
            assert_eq!(e.map(|e| e.kind), Some(WrapErrorKind::Misconfigured));
        }
    }
}
