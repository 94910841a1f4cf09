//! Mapping AWS SDK errors onto keyfold's [`WrapErrorKind`]s.

use std::time::Duration;

use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};

use crate::PROVIDER;

/// The kind for a KMS error code (the `__type` of a JSON error), or `None`
/// when the code alone does not decide it.
fn kind_for_code(code: &str) -> Option<(WrapErrorKind, &'static str)> {
    use WrapErrorKind::*;
    Some(match code {
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "MissingAuthenticationTokenException" => (
            AccessDenied,
            "check the assumed role's IAM policy and the key policy (kms:Encrypt, kms:Decrypt), and the role's trust policy",
        ),
        "NotFoundException" => (NotFound, "no such key or alias in this account and region"),
        "KMSInvalidStateException" | "DisabledException" => {
            (KeyDisabled, "the key is disabled or pending deletion")
        }
        "ThrottlingException"
        | "LimitExceededException"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => (Throttled, "KMS request rate exceeded"),
        "InvalidCiphertextException" => (
            InvalidCiphertext,
            "tampered, truncated, or bound to another keyring or version (encryption context)",
        ),
        "IncorrectKeyException" => (KeyMismatch, "the ciphertext was made under another KMS key"),
        "KeyUnavailableException"
        | "DependencyTimeoutException"
        | "KMSInternalException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => (Unavailable, "KMS is temporarily unavailable"),
        "InvalidKeyUsageException"
        | "InvalidArnException"
        | "InvalidGrantTokenException"
        | "UnsupportedOperationException"
        | "ValidationException" => (
            Misconfigured,
            "the key cannot be used this way (it must be a symmetric ENCRYPT_DECRYPT key)",
        ),
        _ => return None,
    })
}

/// When a KMS call failed before sending because no credentials could be
/// had (assuming the role failed), the kind and what to say.
fn credentials_failure(
    failure: &(dyn std::error::Error + 'static),
) -> Option<(WrapErrorKind, &'static str)> {
    use aws_credential_types::provider::error::CredentialsError;
    use aws_sdk_sts::operation::assume_role::AssumeRoleError;

    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(failure);
    let mut credentials = None;
    while let Some(e) = next {
        if let Some(sts) = e.downcast_ref::<SdkError<AssumeRoleError, HttpResponse>>() {
            return Some(match sts {
                SdkError::ServiceError(s) => {
                    let status = s.raw().status().as_u16();
                    match s.err().code().unwrap_or("") {
                        "AccessDenied"
                        | "AccessDeniedException"
                        | "InvalidClientTokenId"
                        | "SignatureDoesNotMatch"
                        | "ExpiredToken"
                        | "ExpiredTokenException" => (
                            WrapErrorKind::AccessDenied,
                            "STS refused to let the base credentials assume the role (check the role's trust policy and external id)",
                        ),
                        "Throttling" | "ThrottlingException" => {
                            (WrapErrorKind::Throttled, "STS AssumeRole was throttled")
                        }
                        _ if status >= 500 => (
                            WrapErrorKind::Unavailable,
                            "STS AssumeRole failed (server error)",
                        ),
                        _ => (WrapErrorKind::Misconfigured, "STS AssumeRole was refused"),
                    }
                }
                _ => (
                    WrapErrorKind::Unavailable,
                    "STS unreachable while assuming the role",
                ),
            });
        }
        if credentials.is_none() {
            credentials = e.downcast_ref::<CredentialsError>().map(|c| match c {
                CredentialsError::ProviderTimedOut(_) => (
                    WrapErrorKind::Unavailable,
                    "timed out loading credentials to assume the role",
                ),
                CredentialsError::CredentialsNotLoaded(_) => (
                    WrapErrorKind::Misconfigured,
                    "no base credentials to assume the role with (default credential chain is empty)",
                ),
                CredentialsError::InvalidConfiguration(_) => (
                    WrapErrorKind::Misconfigured,
                    "invalid credential configuration for assuming the role",
                ),
                _ => (
                    WrapErrorKind::Unavailable,
                    "could not load credentials to assume the role",
                ),
            });
        }
        next = e.source();
    }
    credentials
}

/// Maps an AWS SDK error from a KMS call onto a [`WrapError`] naming the
/// provider, `key_ref` and `op`.
///
/// | SDK error | kind |
/// | --- | --- |
/// | `AccessDeniedException` (and bad/expired credentials) | [`AccessDenied`](WrapErrorKind::AccessDenied) |
/// | `NotFoundException` | [`NotFound`](WrapErrorKind::NotFound) |
/// | `KMSInvalidStateException`, `DisabledException` | [`KeyDisabled`](WrapErrorKind::KeyDisabled) |
/// | `ThrottlingException`, HTTP 429 | [`Throttled`](WrapErrorKind::Throttled) (honours `Retry-After`) |
/// | `InvalidCiphertextException` | [`InvalidCiphertext`](WrapErrorKind::InvalidCiphertext) |
/// | `IncorrectKeyException` | [`KeyMismatch`](WrapErrorKind::KeyMismatch) |
/// | `KMSInternalException`, `KeyUnavailableException`, other 5xx, network errors, timeouts | [`Unavailable`](WrapErrorKind::Unavailable) |
/// | `InvalidKeyUsageException`, a request that cannot be built, other 4xx | [`Misconfigured`](WrapErrorKind::Misconfigured) |
///
/// The message carries the KMS error code and message; the source is the
/// modeled service error or the connector error, never the raw HTTP
/// response (a `Decrypt` response body holds key material).
pub fn classify_sdk_error<E>(
    err: SdkError<E, HttpResponse>,
    key_ref: &str,
    op: WrapOperation,
) -> WrapError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let base = |kind| WrapError::new(kind, PROVIDER, key_ref, op);
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let retry_after = service
                .raw()
                .headers()
                .get("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let e = service.into_err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            let kms_message = e.message().unwrap_or("").to_owned();
            let (kind, hint) = kind_for_code(&code).unwrap_or(match status {
                429 => (WrapErrorKind::Throttled, "KMS request rate exceeded"),
                500..=599 => (WrapErrorKind::Unavailable, "KMS server error"),
                401 | 403 => (WrapErrorKind::AccessDenied, "request refused"),
                _ => (WrapErrorKind::Misconfigured, "unexpected KMS error"),
            });
            let mut message = format!("{code} (HTTP {status})");
            if !kms_message.is_empty() {
                message.push_str(": ");
                message.push_str(&kms_message);
            }
            message.push_str("; ");
            message.push_str(hint);
            let mut error = base(kind).with_message(message).with_source(e);
            if let Some(wait) = retry_after {
                error = error.with_retry_after(wait);
            }
            error
        }
        other => {
            let detail = DisplayErrorContext(&other).to_string();
            let (kind, message) = match &other {
                SdkError::TimeoutError(_) => (
                    WrapErrorKind::Unavailable,
                    "KMS request timed out".to_owned(),
                ),
                SdkError::DispatchFailure(failure) => {
                    let (kind, what) =
                        credentials_failure(&other).unwrap_or(if failure.is_user() {
                            (
                                WrapErrorKind::Misconfigured,
                                "KMS request could not be sent (endpoint or request)",
                            )
                        } else {
                            (WrapErrorKind::Unavailable, "KMS unreachable")
                        });
                    (kind, format!("{what}: {detail}"))
                }
                // No detail: the raw response may hold plaintext key material.
                SdkError::ResponseError(_) => (
                    WrapErrorKind::Unavailable,
                    "unreadable response from KMS".to_owned(),
                ),
                SdkError::ConstructionFailure(_) => (
                    WrapErrorKind::Misconfigured,
                    format!("KMS request could not be built: {detail}"),
                ),
                _ => (
                    WrapErrorKind::Unavailable,
                    format!("KMS call failed: {detail}"),
                ),
            };
            base(kind).with_message(message)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use aws_sdk_kms::error::ErrorMetadata;
    use aws_sdk_kms::operation::decrypt::DecryptError;
    use aws_sdk_kms::operation::encrypt::EncryptError;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    const KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    fn response(status: u16, retry_after: Option<&str>) -> HttpResponse {
        let mut r = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        if let Some(v) = retry_after {
            r.headers_mut().insert("retry-after", v.to_owned());
        }
        r
    }

    fn service(code: &str, status: u16) -> WrapError {
        let e = DecryptError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("kms said so")
                .build(),
        );
        classify_sdk_error(
            SdkError::service_error(e, response(status, None)),
            KEY,
            WrapOperation::Unwrap,
        )
    }

    #[test]
    fn service_codes_map_to_kinds() {
        use WrapErrorKind::*;
        for (code, status, kind) in [
            ("AccessDeniedException", 400, AccessDenied),
            ("NotFoundException", 400, NotFound),
            ("KMSInvalidStateException", 400, KeyDisabled),
            ("DisabledException", 400, KeyDisabled),
            ("ThrottlingException", 400, Throttled),
            ("InvalidCiphertextException", 400, InvalidCiphertext),
            ("IncorrectKeyException", 400, KeyMismatch),
            ("KMSInternalException", 500, Unavailable),
            ("KeyUnavailableException", 500, Unavailable),
            ("DependencyTimeoutException", 503, Unavailable),
            ("InvalidKeyUsageException", 400, Misconfigured),
            ("SomethingNew", 503, Unavailable),
            ("SomethingNew", 500, Unavailable),
            ("SomethingNew", 429, Throttled),
            ("SomethingNew", 400, Misconfigured),
        ] {
            let e = service(code, status);
            assert_eq!(e.kind, kind, "{code} {status}: {e}");
            let text = e.to_string();
            assert!(text.contains(KEY), "{text}");
            assert!(text.contains("unwrap"), "{text}");
            assert!(text.contains(code), "{text}");
            assert!(text.contains("kms said so"), "{text}");
        }
    }

    #[test]
    fn throttling_is_transient_and_keeps_retry_after() {
        let e = EncryptError::generic(ErrorMetadata::builder().code("ThrottlingException").build());
        let err = classify_sdk_error(
            SdkError::service_error(e, response(400, Some("2"))),
            KEY,
            WrapOperation::Wrap,
        );
        assert_eq!(err.kind, WrapErrorKind::Throttled);
        assert!(err.is_transient());
        assert_eq!(err.retry_after, Some(Duration::from_secs(2)));
        assert!(err.to_string().contains("aws wrap with key"), "{err}");
    }

    #[test]
    fn network_and_timeouts_are_unavailable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = classify_sdk_error::<DecryptError>(
            SdkError::dispatch_failure(ConnectorError::io(Box::new(io))),
            KEY,
            WrapOperation::Unwrap,
        );
        assert_eq!(err.kind, WrapErrorKind::Unavailable);
        assert!(err.is_transient());
        let err = classify_sdk_error::<DecryptError>(
            SdkError::timeout_error("slow"),
            KEY,
            WrapOperation::Unwrap,
        );
        assert_eq!(err.kind, WrapErrorKind::Unavailable);
    }

    fn credentials_failure_error(
        source: aws_credential_types::provider::error::CredentialsError,
    ) -> WrapError {
        classify_sdk_error::<DecryptError>(
            SdkError::dispatch_failure(ConnectorError::other(Box::new(source), None)),
            KEY,
            WrapOperation::Unwrap,
        )
    }

    #[test]
    fn role_assumption_failures_are_classified() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_sdk_sts::operation::assume_role::AssumeRoleError;

        let sts = |code: &str, status: u16| {
            let e = AssumeRoleError::generic(
                ErrorMetadata::builder()
                    .code(code)
                    .message("not authorized to perform sts:AssumeRole")
                    .build(),
            );
            CredentialsError::provider_error(
                SdkError::<AssumeRoleError, HttpResponse>::service_error(e, response(status, None)),
            )
        };
        let err = credentials_failure_error(sts("AccessDenied", 403));
        assert_eq!(err.kind, WrapErrorKind::AccessDenied, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("trust policy") && text.contains(KEY),
            "{text}"
        );
        assert_eq!(
            credentials_failure_error(sts("Throttling", 400)).kind,
            WrapErrorKind::Throttled
        );
        assert_eq!(
            credentials_failure_error(sts("InternalFailure", 500)).kind,
            WrapErrorKind::Unavailable
        );
        let err = credentials_failure_error(CredentialsError::not_loaded("no env, no profile"));
        assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{err}");
        assert!(err.to_string().contains("no base credentials"), "{err}");
    }

    #[test]
    fn response_errors_carry_no_body() {
        let body = SdkBody::from(r#"{"Plaintext":"c2VjcmV0LWtleS1tYXRlcmlhbA=="}"#);
        let raw = HttpResponse::new(StatusCode::try_from(200).unwrap(), body);
        let err = classify_sdk_error::<DecryptError>(
            SdkError::response_error("bad json", raw),
            KEY,
            WrapOperation::Unwrap,
        );
        assert_eq!(err.kind, WrapErrorKind::Unavailable);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
    }
}
