//! `keyfold probe`: the onboarding probe (docs/LIFECYCLE.md, "Onboarding"),
//! step by step: validate the config, build the wrapper, then a live wrap +
//! unwrap of a random 32-byte key. Changes nothing; a failure is audited as
//! `kms.probe.failed`.

use std::fmt::Write as _;

use keyfold_core::AuditSink;
use keyfold_core::audit::{AuditEvent, AuditKind};
use keyfold_core::probe::{self, PROBE_KEYRING_ID, ProbeFailure, ProbeStep};
use keyfold_core::time::Timestamp;
use serde_json::json;

use crate::config;
use crate::error::{CliError, Kind};
use crate::globals::Globals;

const STEPS: [ProbeStep; 6] = [
    ProbeStep::Validate,
    ProbeStep::Build,
    ProbeStep::Generate,
    ProbeStep::Wrap,
    ProbeStep::Unwrap,
    ProbeStep::Compare,
];

/// Runs the probe and prints each step.
pub(crate) async fn run(keyring: Option<String>, g: &Globals) -> Result<(), CliError> {
    if !g.config.has_kms() {
        // No config at all: say where it goes (the usage error of `kms()`).
        g.config.kms()?;
    }
    let audit = g.audit()?;
    let actor = g.actor()?;
    let (provider, key_ref) = g.config.kms_names();
    let fail = |step, kind, message: String| ProbeFailure {
        step,
        kind,
        provider: provider.clone(),
        key_ref: key_ref.clone(),
        message,
    };
    let result = async {
        let kms = g
            .config
            .kms()
            .map_err(|e| fail(ProbeStep::Validate, None, e.message))?;
        let wrapper = config::build_wrapper(&kms)
            .await
            .map_err(|e| fail(ProbeStep::Build, Some(e.kind), e.to_string()))?;
        probe::probe(wrapper.as_ref()).await
    }
    .await;
    let failed_at = result
        .as_ref()
        .err()
        .and_then(|f| STEPS.iter().position(|s| *s == f.step));
    let mut text = format!("probing {provider} key {key_ref}\n");
    let mut steps = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        let status = match failed_at {
            Some(f) if f == i => "failed",
            Some(f) if i > f => "skipped",
            _ => "ok",
        };
        let _ = writeln!(text, "  {:<9} {status}", step.to_string());
        steps.push(json!({"step": step, "status": status}));
    }
    match result {
        Ok(ok) => {
            let ms = ok.elapsed.as_secs_f64() * 1000.0;
            let _ = writeln!(text, "ok: wrap + unwrap round trip in {ms:.1} ms");
            g.output.emit(
                &text,
                &json!({"ok": true, "provider": provider, "key_ref": key_ref,
                        "steps": steps, "elapsed_ms": ms}),
            );
            Ok(())
        }
        Err(f) => {
            audit.record(AuditEvent {
                keyring_id: keyring.unwrap_or_else(|| PROBE_KEYRING_ID.to_owned()),
                actor,
                at: Timestamp::now(),
                kind: AuditKind::ProbeFailed {
                    provider: f.provider.clone(),
                    key_ref: f.key_ref.clone(),
                    step: f.step,
                    error_kind: f.kind,
                    message: f.message.clone(),
                },
            });
            if !g.output.json {
                g.output.emit(&text, &serde_json::Value::Null);
            }
            audit.check()?;
            let kind = if f.step == ProbeStep::Validate {
                Kind::Usage
            } else {
                Kind::Kms
            };
            let mut e = CliError::new(kind, f.to_string());
            e.details = Some(
                json!({"ok": false, "provider": provider, "key_ref": key_ref,
                                    "steps": steps, "failed_step": f.step}),
            );
            Err(e)
        }
    }
}
