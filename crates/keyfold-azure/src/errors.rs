//! Mapping Azure SDK errors onto keyfold's [`WrapErrorKind`]s.
//!
//! | Key Vault answer                              | kind                  |
//! |-----------------------------------------------|-----------------------|
//! | 401, 403                                      | `AccessDenied`        |
//! | 403 with inner error `KeyDisabled`            | `KeyDisabled`         |
//! | 404                                           | `NotFound`            |
//! | 429 (with `Retry-After` kept as `retry_after`)| `Throttled`           |
//! | 408, 5xx, connection or I/O failure           | `Unavailable`         |
//! | 400 (`BadParameter`) on unwrap: not this key's ciphertext | `InvalidCiphertext` |
//! | 400 on wrap: the key cannot do the algorithm  | `Misconfigured`       |
//! | no token from Entra ID                        | `AccessDenied` (`Unavailable` when Entra was unreachable) |
//! | anything else (other 4xx, refused challenge…) | `Misconfigured`       |
//!
//! The message names the HTTP status, the service's error code and message;
//! never a request or response body, so never key material.

use std::time::Duration;

use azure_core::error::ErrorKind as SdkKind;
use azure_core::http::RawResponse;
use azure_core::http::headers::{RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS};
use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};
use serde::Deserialize;

use crate::PROVIDER;

/// Longest service message copied into an error.
const MAX_SERVICE_MESSAGE: usize = 300;

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, alias = "innerError", rename = "innererror")]
    inner: Option<InnerError>,
}

#[derive(Debug, Default, Deserialize)]
struct InnerError {
    #[serde(default)]
    code: Option<String>,
}

/// Maps an SDK error from `operation` on `key_ref`.
pub(crate) fn map_sdk_error(
    err: azure_core::Error,
    key_ref: &str,
    operation: WrapOperation,
) -> WrapError {
    let (kind, message, retry_after) = classify(&err, operation);
    let mut out = WrapError::new(kind, PROVIDER, key_ref, operation).with_message(message);
    if let Some(wait) = retry_after {
        out = out.with_retry_after(wait);
    }
    out.with_source(err)
}

fn classify(
    err: &azure_core::Error,
    operation: WrapOperation,
) -> (WrapErrorKind, String, Option<Duration>) {
    match err.kind() {
        SdkKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let status = u16::from(*status);
            let body = raw_response
                .as_deref()
                .and_then(|raw| serde_json::from_slice::<ErrorBody>(raw.body().as_ref()).ok())
                .and_then(|b| b.error)
                .unwrap_or_default();
            let inner = body.inner.and_then(|i| i.code);
            // The SDK falls back to the bare status as the "code" when its
            // borrowed parse of the body fails (escaped quotes in the message);
            // the body's own code is better then.
            let code = body
                .code
                .or_else(|| error_code.clone().filter(|c| c.parse::<u16>().is_err()));
            let kind = match status {
                401 => WrapErrorKind::AccessDenied,
                403 if inner.as_deref() == Some("KeyDisabled") => WrapErrorKind::KeyDisabled,
                403 => WrapErrorKind::AccessDenied,
                404 => WrapErrorKind::NotFound,
                429 => WrapErrorKind::Throttled,
                400 if operation == WrapOperation::Unwrap => WrapErrorKind::InvalidCiphertext,
                400 => WrapErrorKind::Misconfigured,
                408 | 500..=599 => WrapErrorKind::Unavailable,
                _ => WrapErrorKind::Misconfigured,
            };
            let mut message = format!("Key Vault answered HTTP {status}");
            for part in [code, inner].into_iter().flatten() {
                message.push_str(&format!(" {part}"));
            }
            if let Some(text) = body.message {
                message.push_str(": ");
                message.extend(text.chars().take(MAX_SERVICE_MESSAGE));
            }
            let retry_after = raw_response.as_deref().and_then(retry_after);
            (kind, message, retry_after)
        }
        SdkKind::Connection | SdkKind::Io => (
            WrapErrorKind::Unavailable,
            format!("could not reach Key Vault: {err}"),
            None,
        ),
        SdkKind::Credential => {
            let kind = if caused_by_network(err) {
                WrapErrorKind::Unavailable
            } else {
                WrapErrorKind::AccessDenied
            };
            (
                kind,
                format!("could not get an Entra ID token: {err}"),
                None,
            )
        }
        _ => (WrapErrorKind::Misconfigured, err.to_string(), None),
    }
}

/// True when a credential error was caused by a connection or I/O failure, or
/// a 5xx from the token endpoint.
fn caused_by_network(err: &azure_core::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = current {
        if let Some(sdk) = e.downcast_ref::<azure_core::Error>() {
            match sdk.kind() {
                SdkKind::Connection | SdkKind::Io => return true,
                SdkKind::HttpResponse { status, .. } if u16::from(*status) >= 500 => return true,
                _ => {}
            }
        }
        current = e.source();
    }
    false
}

/// The wait a throttled or unavailable response asks for: `retry-after-ms`,
/// `x-ms-retry-after-ms` (milliseconds), or `Retry-After` (seconds or an HTTP date).
pub(crate) fn retry_after(raw: &RawResponse) -> Option<Duration> {
    let headers = raw.headers();
    for name in [&RETRY_AFTER_MS, &X_MS_RETRY_AFTER_MS] {
        if let Some(ms) = headers
            .get_optional_str(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
    }
    let value = headers.get_optional_str(&RETRY_AFTER)?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = azure_core::time::parse_rfc7231(value).ok()?;
    let wait = at - azure_core::time::OffsetDateTime::now_utc();
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

/// An error raised by this crate itself (not by the SDK).
pub(crate) fn own_error(
    kind: WrapErrorKind,
    key_ref: &str,
    operation: WrapOperation,
    message: impl Into<String>,
) -> WrapError {
    WrapError::new(kind, PROVIDER, key_ref, operation).with_message(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::StatusCode;
    use azure_core::http::headers::{HeaderName, HeaderValue, Headers};

    fn http_error(status: u16, headers: &[(&'static str, &str)], body: &str) -> azure_core::Error {
        let mut h = Headers::new();
        for (k, v) in headers {
            h.insert(HeaderName::from_static(k), HeaderValue::from(v.to_string()));
        }
        let raw = RawResponse::from_bytes(StatusCode::from(status), h, body.as_bytes().to_vec());
        azure_core::Error::with_message(
            SdkKind::HttpResponse {
                status: StatusCode::from(status),
                error_code: None,
                raw_response: Some(Box::new(raw)),
            },
            "failed",
        )
    }

    fn kind_of(status: u16, body: &str) -> WrapErrorKind {
        map_sdk_error(
            http_error(status, &[], body),
            "https://v.vault.azure.net/keys/k",
            WrapOperation::Unwrap,
        )
        .kind
    }

    #[test]
    fn statuses_map_onto_kinds() {
        use WrapErrorKind as K;
        let disabled = r#"{"error":{"code":"Forbidden","message":"Operation unwrapKey is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#;
        for (status, body, want) in [
            (401, "", K::AccessDenied),
            (
                403,
                r#"{"error":{"code":"Forbidden","message":"no"}}"#,
                K::AccessDenied,
            ),
            (403, disabled, K::KeyDisabled),
            (404, r#"{"error":{"code":"KeyNotFound"}}"#, K::NotFound),
            (429, "", K::Throttled),
            (
                400,
                r#"{"error":{"code":"BadParameter"}}"#,
                K::InvalidCiphertext,
            ),
            (408, "", K::Unavailable),
            (500, "not json", K::Unavailable),
            (503, "", K::Unavailable),
            (409, "", K::Misconfigured),
        ] {
            assert_eq!(kind_of(status, body), want, "{status} {body}");
        }
        let bad_alg = map_sdk_error(
            http_error(400, &[], r#"{"error":{"code":"BadParameter"}}"#),
            "k",
            WrapOperation::Wrap,
        );
        assert_eq!(bad_alg.kind, K::Misconfigured);
    }

    #[test]
    fn message_names_key_operation_status_and_code() {
        let err = map_sdk_error(
            http_error(
                403,
                &[],
                r#"{"error":{"code":"Forbidden","message":"Operation unwrapKey is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#,
            ),
            "https://v.vault.azure.net/keys/k",
            WrapOperation::Unwrap,
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "azure unwrap with key https://v.vault.azure.net/keys/k failed: key disabled"
            ),
            "{text}"
        );
        assert!(text.contains("HTTP 403 Forbidden KeyDisabled"), "{text}");
        assert!(text.contains("disabled key"), "{text}");
    }

    #[test]
    fn the_body_code_beats_the_sdk_s_status_fallback() {
        let body = r#"{"error":{"code":"BadParameter","message":"Algorithm \"A256KW\" is not supported"}}"#;
        let raw = RawResponse::from_bytes(
            StatusCode::from(400),
            Headers::new(),
            body.as_bytes().to_vec(),
        );
        let err = azure_core::Error::with_message(
            SdkKind::HttpResponse {
                status: StatusCode::from(400),
                error_code: Some("400".into()),
                raw_response: Some(Box::new(raw)),
            },
            "400",
        );
        let text = map_sdk_error(err, "k", WrapOperation::Unwrap).to_string();
        assert!(
            text.ends_with("HTTP 400 BadParameter: Algorithm \"A256KW\" is not supported"),
            "{text}"
        );
    }

    #[test]
    fn retry_after_headers() {
        let e = |h: &[(&'static str, &str)]| {
            map_sdk_error(http_error(429, h, ""), "k", WrapOperation::Wrap).retry_after
        };
        assert_eq!(e(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            e(&[("retry-after-ms", "1500")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            e(&[("x-ms-retry-after-ms", "20"), ("retry-after", "9")]),
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            e(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(e(&[("retry-after", "soon")]), None);
        assert_eq!(e(&[]), None);
    }

    #[test]
    fn connection_and_credential_errors() {
        let conn = azure_core::Error::with_message(SdkKind::Connection, "refused");
        assert_eq!(
            map_sdk_error(conn, "k", WrapOperation::Wrap).kind,
            WrapErrorKind::Unavailable
        );
        let cred = azure_core::Error::with_message(SdkKind::Credential, "bad secret");
        assert_eq!(
            map_sdk_error(cred, "k", WrapOperation::Wrap).kind,
            WrapErrorKind::AccessDenied
        );
        let cred = azure_core::Error::with_error(
            SdkKind::Credential,
            azure_core::Error::with_message(SdkKind::Io, "reset"),
            "token request failed",
        );
        assert_eq!(
            map_sdk_error(cred, "k", WrapOperation::Wrap).kind,
            WrapErrorKind::Unavailable
        );
        let other = azure_core::Error::with_message(SdkKind::Other, "challenge resource mismatch");
        assert_eq!(
            map_sdk_error(other, "k", WrapOperation::Configure).kind,
            WrapErrorKind::Misconfigured
        );
    }
}
