//! Metrics and traces of KMS calls (docs/OBSERVABILITY.md).
//!
//! Every wrap and unwrap the keyring makes goes through here: one
//! `keyfold.kms` span with the provider, operation, keyring id, version and
//! outcome (never key material: only these fields are recorded), a
//! `keyfold_kms_calls_total` counter and a
//! `keyfold_kms_call_duration_seconds` histogram. Through the `metrics`
//! facade: without an exporter installed by the host they cost a load of
//! the global recorder.

use std::future::Future;
use std::time::Instant;

use tracing::Instrument;

use super::error::{WrapError, WrapErrorKind};
use super::{KeyWrapper, WrapContext, WrappedKey};
use crate::format::secret::SecretKey;

/// Counter: KMS calls, by `provider`, `operation` (`wrap`/`unwrap`) and
/// `outcome` (`ok` or the error kind).
pub const KMS_CALLS: &str = "keyfold_kms_calls_total";
/// Histogram: KMS call latency in seconds, by `provider` and `operation`.
pub const KMS_CALL_DURATION: &str = "keyfold_kms_call_duration_seconds";

/// The label value of an outcome.
pub fn outcome_label(kind: Option<WrapErrorKind>) -> &'static str {
    match kind {
        None => "ok",
        Some(WrapErrorKind::AccessDenied) => "access_denied",
        Some(WrapErrorKind::NotFound) => "not_found",
        Some(WrapErrorKind::KeyDisabled) => "key_disabled",
        Some(WrapErrorKind::Throttled) => "throttled",
        Some(WrapErrorKind::Unavailable) => "unavailable",
        Some(WrapErrorKind::InvalidCiphertext) => "invalid_ciphertext",
        Some(WrapErrorKind::KeyMismatch) => "key_mismatch",
        Some(WrapErrorKind::Misconfigured) => "misconfigured",
    }
}

async fn observed<T>(
    wrapper: &dyn KeyWrapper,
    operation: &'static str,
    context: &WrapContext,
    call: impl Future<Output = Result<T, WrapError>>,
) -> Result<T, WrapError> {
    let provider = wrapper.provider().to_owned();
    let span = tracing::info_span!(
        "keyfold.kms",
        provider = %provider,
        operation,
        keyring_id = %context.keyring_id,
        version = context.key_version,
        outcome = tracing::field::Empty,
    );
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    let outcome = outcome_label(result.as_ref().err().map(|e| e.kind));
    span.record("outcome", outcome);
    metrics::counter!(KMS_CALLS, "provider" => provider.clone(), "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(KMS_CALL_DURATION, "provider" => provider, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    result
}

/// `wrapper.wrap(key, context)`, observed.
pub(crate) async fn wrap(
    wrapper: &dyn KeyWrapper,
    key: &SecretKey,
    context: &WrapContext,
) -> Result<WrappedKey, WrapError> {
    observed(wrapper, "wrap", context, wrapper.wrap(key, context)).await
}

/// `wrapper.unwrap(wrapped, context)`, observed.
pub(crate) async fn unwrap(
    wrapper: &dyn KeyWrapper,
    wrapped: &WrappedKey,
    context: &WrapContext,
) -> Result<SecretKey, WrapError> {
    observed(wrapper, "unwrap", context, wrapper.unwrap(wrapped, context)).await
}
