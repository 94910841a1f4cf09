//! Step-up: a second factor for the operations that can make data
//! unreadable or move it under another key.
//!
//! - Each tenant admin enrols a TOTP secret (RFC 6238: HMAC-SHA-1, 6
//!   digits, 30-second steps) when the service first starts with the tenant;
//!   the secret is shown once (see [`Enrolment`]) and never again.
//! - `POST /admin/auth/step-up` with the bearer token **and** a current code
//!   exchanges them for a step-up token bound to the tenant, one [`Action`]
//!   and its target (a version number, the key being onboarded, or the
//!   tenant). The token is used once, on any instance sharing the database,
//!   and expires after `step_up_ttl` (minutes). A code is accepted once
//!   (RFC 6238 §5.2): each TOTP time step gives one token.
//! - Failed attempts are rate-limited per tenant (`max_failures` per
//!   `failure_window`, then 429 with `Retry-After`).
//! - Issue, use and every failure are in the audit log
//!   (`auth.step_up.issued`, `auth.step_up.used`, `auth.step_up.failed`,
//!   `auth.step_up.refused`), with the token's id (a hash prefix), never the
//!   token.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use totp_rs::{Builder, Secret, Totp};

use crate::db::{Db, Grant};
use crate::tenants::CLIENT_IP;

/// The operations that need a step-up token, and what their target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// `POST /admin/tenant-kms` (first config or replacement); target: the `kms_key_ref`.
    Onboard,
    /// `POST /admin/tenant-kms/rotate`; target: the tenant id.
    Rotate,
    /// `POST .../versions/{v}/disable`; target: the version number.
    Disable,
    /// `POST .../versions/{v}/enable`; target: the version number.
    Enable,
    /// `POST .../versions/{v}/destroy`; target: the version number.
    Destroy,
    /// Rotation policy changes; target: the tenant id.
    RotationPolicy,
    /// Unsealing the tenant's keyring; target: the tenant id.
    Unseal,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 7] = [
        Action::Onboard,
        Action::Rotate,
        Action::Disable,
        Action::Enable,
        Action::Destroy,
        Action::RotationPolicy,
        Action::Unseal,
    ];

    /// The name used in requests and audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Onboard => "onboard",
            Action::Rotate => "rotate",
            Action::Disable => "disable",
            Action::Enable => "enable",
            Action::Destroy => "destroy",
            Action::RotationPolicy => "rotation_policy",
            Action::Unseal => "unseal",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether the target is the tenant itself (it may then be omitted).
    pub fn targets_tenant(self) -> bool {
        matches!(
            self,
            Action::Rotate | Action::RotationPolicy | Action::Unseal
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bearer or step-up token: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into())
    }

    /// The token, to send to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The id recorded in the audit log: the first 16 hex digits of the
    /// token's SHA-256 (the database keeps the full hash, never the token).
    pub fn id(&self) -> String {
        self.hash()[..16].to_owned()
    }

    fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(******)")
    }
}

/// A TOTP secret enrolled for a tenant admin, to show them once.
/// `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// The tenant.
    pub tenant: String,
    /// Its admin.
    pub admin: String,
    /// The secret, base32 (RFC 4648, no padding), for an authenticator app.
    pub secret_base32: String,
    /// The `otpauth://totp/...` URI (the same secret, as a QR code would carry it).
    pub otpauth_uri: String,
}

impl fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolment")
            .field("tenant", &self.tenant)
            .field("admin", &self.admin)
            .field("secret_base32", &"******")
            .field("otpauth_uri", &"******")
            .finish()
    }
}

/// Step-up settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUpConfig {
    /// How long a step-up token stays valid (default 5 minutes, at most an hour).
    pub token_ttl: Duration,
    /// The TOTP time step (RFC 6238 default 30 s). Codes of the previous and
    /// next step are accepted too (clock skew).
    pub totp_step: Duration,
    /// Failed attempts allowed per tenant within `failure_window` (default 5).
    pub max_failures: u32,
    /// The rate-limit window (default 5 minutes).
    pub failure_window: Duration,
}

impl Default for StepUpConfig {
    fn default() -> Self {
        StepUpConfig {
            token_ttl: Duration::from_secs(300),
            totp_step: Duration::from_secs(30),
            max_failures: 5,
            failure_window: Duration::from_secs(300),
        }
    }
}

/// The issuer shown in authenticator apps.
pub const ISSUER: &str = "keyfold-tenant-kms";

/// Builds the TOTP verifier for `secret`.
fn totp(secret: &[u8], step: Duration) -> Result<Totp, String> {
    Builder::new()
        .with_secret(Secret::new(secret.to_vec().into_boxed_slice()))
        .with_step_duration(step.as_secs().max(1))
        .build()
        .map_err(|e| format!("TOTP: {e}"))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Enrols a fresh TOTP secret for `tenant`'s admin unless one is enrolled;
/// the enrolment to show them when it is new.
///
/// # Errors
/// The RNG or the database failed.
pub async fn enrol(
    db: &Db,
    tenant: &str,
    admin: &str,
    config: &StepUpConfig,
) -> Result<Option<Enrolment>, String> {
    if db
        .factor(tenant)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(None);
    }
    let mut secret = zeroize::Zeroizing::new([0u8; 20]);
    keyfold::rng::fill(secret.as_mut()).map_err(|e| e.to_string())?;
    let now = unix_ms() / 1000;
    if !db
        .enrol_factor(
            tenant,
            admin,
            secret.as_ref(),
            u64::try_from(now).unwrap_or(0),
        )
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(None); // another instance enrolled it first
    }
    let b32 = Secret::new(secret.to_vec().into_boxed_slice()).to_base32();
    let label = percent_encode(&format!("{ISSUER}:{tenant}/{admin}"));
    let uri = format!(
        "otpauth://totp/{label}?secret={b32}&issuer={ISSUER}&algorithm=SHA1&digits=6&period={}",
        config.totp_step.as_secs().max(1)
    );
    Ok(Some(Enrolment {
        tenant: tenant.to_owned(),
        admin: admin.to_owned(),
        secret_base32: b32,
        otpauth_uri: uri,
    }))
}

/// Unix time in milliseconds.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Why a step-up exchange or use was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepUpError {
    /// Too many failed attempts: retry after this many seconds.
    RateLimited {
        /// Seconds until an attempt is allowed again.
        retry_after_secs: u64,
    },
    /// The code is wrong (or not the current one).
    WrongCode,
    /// The code was right but its time step was used already.
    CodeReused,
    /// The tenant has no enrolled factor.
    NoFactor,
    /// No step-up token was sent.
    Missing,
    /// The token is unknown (never issued, used already, or forged).
    Unknown,
    /// The token expired.
    Expired,
    /// The token is another tenant's.
    WrongTenant,
    /// The token was issued for another action.
    WrongAction {
        /// The action it allows.
        granted: String,
    },
    /// The token was issued for another target.
    WrongTarget {
        /// The target it allows.
        granted: String,
    },
    /// The database failed (detail in the operator log).
    Internal(String),
}

impl StepUpError {
    /// The reason recorded in the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            StepUpError::RateLimited { .. } => "rate_limited",
            StepUpError::WrongCode => "wrong_code",
            StepUpError::CodeReused => "code_reused",
            StepUpError::NoFactor => "no_factor",
            StepUpError::Missing => "missing",
            StepUpError::Unknown => "unknown_token",
            StepUpError::Expired => "expired",
            StepUpError::WrongTenant => "wrong_tenant",
            StepUpError::WrongAction { .. } => "wrong_action",
            StepUpError::WrongTarget { .. } => "wrong_target",
            StepUpError::Internal(_) => "internal",
        }
    }
}

fn internal(e: impl fmt::Display) -> StepUpError {
    StepUpError::Internal(e.to_string())
}

/// Who is asking, for the audit log.
#[derive(Debug, Clone)]
pub struct Requester<'a> {
    /// Tenant id.
    pub tenant: &'a str,
    /// Admin (actor).
    pub admin: &'a str,
}

fn audit(db: &Db, who: &Requester<'_>, event: &str, detail: Value) {
    let ip = CLIENT_IP.try_with(Clone::clone).ok();
    let mut detail = detail;
    if let Some(map) = detail.as_object_mut() {
        map.insert("request_id".into(), json!(crate::error::request_id()));
    }
    let at = u64::try_from(unix_ms() / 1000).unwrap_or(0);
    if let Err(e) = db.append_audit(
        who.tenant,
        at,
        event,
        who.admin,
        ip.as_deref(),
        &detail.to_string(),
    ) {
        crate::error::operator_log(format_args!("AUDIT WRITE FAILED for {event}: {e}"));
    }
}

/// Exchanges a TOTP `code` for a step-up token allowing `action` on
/// `target`.
///
/// # Errors
/// [`StepUpError`]; every failure is audited, wrong and reused codes count
/// towards the rate limit.
pub async fn issue(
    db: &Db,
    config: &StepUpConfig,
    who: &Requester<'_>,
    code: &str,
    action: Action,
    target: &str,
) -> Result<(Token, i64), StepUpError> {
    let now = unix_ms();
    let window = i64::try_from(config.failure_window.as_millis()).unwrap_or(i64::MAX);
    let fail = |e: StepUpError| {
        audit(
            db,
            who,
            "auth.step_up.failed",
            json!({ "reason": e.reason(), "action": action.as_str(), "target": target }),
        );
        e
    };
    // The attempt is counted before its code is checked (and uncounted if
    // it succeeds or is refused for the limit), so concurrent guesses, on
    // one instance or many, see each other and never exceed the limit.
    db.record_step_up_failure(who.tenant, now)
        .await
        .map_err(internal)?;
    let (attempts, oldest) = db
        .step_up_failures(who.tenant, now.saturating_sub(window))
        .await
        .map_err(internal)?;
    let uncount = || async {
        if let Err(e) = db.release_step_up_attempt(who.tenant, now).await {
            crate::error::operator_log(format_args!("cannot uncount a step-up attempt: {e}"));
        }
    };
    if attempts > config.max_failures {
        uncount().await;
        let until = oldest.unwrap_or(now).saturating_add(window);
        let secs = u64::try_from((until - now + 999) / 1000)
            .unwrap_or(1)
            .max(1);
        return Err(fail(StepUpError::RateLimited {
            retry_after_secs: secs,
        }));
    }
    let factor = db
        .factor(who.tenant)
        .await
        .map_err(internal)?
        .ok_or_else(|| fail(StepUpError::NoFactor))?;
    let totp = totp(&factor.secret, config.totp_step).map_err(StepUpError::Internal)?;
    let secs = u64::try_from(now / 1000).unwrap_or(0);
    let well_formed = code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit());
    let refused = match well_formed.then(|| totp.check(code, secs)).flatten() {
        None => Some(StepUpError::WrongCode),
        Some(step)
            if !db
                .use_factor_step(who.tenant, step)
                .await
                .map_err(internal)? =>
        {
            Some(StepUpError::CodeReused)
        }
        Some(_) => None,
    };
    if let Some(e) = refused {
        // Wrong and reused codes stay counted towards the rate limit.
        return Err(fail(e));
    }
    uncount().await;
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    keyfold::rng::fill(raw.as_mut()).map_err(internal)?;
    let token = Token::new(hex::encode(raw.as_ref()));
    let ttl = i64::try_from(config.token_ttl.as_millis()).unwrap_or(i64::MAX);
    let grant = Grant {
        tenant: who.tenant.to_owned(),
        action: action.as_str().to_owned(),
        target: target.to_owned(),
        expires_at_ms: now.saturating_add(ttl),
    };
    db.insert_grant(&token.hash(), &grant, now)
        .await
        .map_err(internal)?;
    audit(
        db,
        who,
        "auth.step_up.issued",
        json!({
            "action": action.as_str(),
            "target": target,
            "token_id": token.id(),
            "expires_at": crate::time::rfc3339_ms(grant.expires_at_ms),
        }),
    );
    Ok((token, grant.expires_at_ms))
}

/// Uses (consumes) the step-up token `presented` for `action` on `target`.
/// The token is gone afterwards whatever the outcome.
///
/// # Errors
/// [`StepUpError`], audited.
pub async fn consume(
    db: &Db,
    who: &Requester<'_>,
    presented: Option<&str>,
    action: Action,
    target: &str,
) -> Result<(), StepUpError> {
    let refuse = |e: StepUpError, token_id: Option<String>| {
        audit(
            db,
            who,
            "auth.step_up.refused",
            json!({
                "reason": e.reason(),
                "action": action.as_str(),
                "target": target,
                "token_id": token_id,
            }),
        );
        e
    };
    let Some(presented) = presented else {
        return Err(refuse(StepUpError::Missing, None));
    };
    let token = Token::new(presented);
    let id = Some(token.id());
    let Some(grant) = db.take_grant(&token.hash()).await.map_err(internal)? else {
        return Err(refuse(StepUpError::Unknown, id));
    };
    if grant.tenant != who.tenant {
        return Err(refuse(StepUpError::WrongTenant, id));
    }
    if grant.expires_at_ms <= unix_ms() {
        return Err(refuse(StepUpError::Expired, id));
    }
    if grant.action != action.as_str() {
        return Err(refuse(
            StepUpError::WrongAction {
                granted: grant.action,
            },
            id,
        ));
    }
    if grant.target != target {
        return Err(refuse(
            StepUpError::WrongTarget {
                granted: grant.target,
            },
            id,
        ));
    }
    audit(
        db,
        who,
        "auth.step_up.used",
        json!({ "action": action.as_str(), "target": target, "token_id": token.id() }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn tokens_and_enrolments_never_show_their_secret_in_debug() {
        let t = Token::new("0123456789abcdef-the-token");
        assert!(!format!("{t:?}").contains("the-token"));
        let e = Enrolment {
            tenant: "acme".into(),
            admin: "a@acme.example".into(),
            secret_base32: "JBSWY3DPEHPK3PXP".into(),
            otpauth_uri: "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP".into(),
        };
        let shown = format!("{e:?}");
        assert!(!shown.contains("JBSWY3DPEHPK3PXP"), "{shown}");
        assert!(shown.contains("acme"), "{shown}");
    }

    #[test]
    fn rfc_6238_appendix_b_sha1_vectors() {
        // RFC 6238 Appendix B, SHA-1 seed "12345678901234567890", 8 digits
        // there; the last 6 digits are the 6-digit code.
        let t = totp(b"12345678901234567890", Duration::from_secs(30)).unwrap();
        for (time, code) in [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(t.generate(time).to_string(), code, "T = {time}");
        }
    }

    #[test]
    fn actions_round_trip() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("explode"), None);
    }
}
