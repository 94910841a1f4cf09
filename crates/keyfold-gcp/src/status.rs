//! gRPC status codes of Cloud KMS mapped onto keyfold's error kinds.
//!
//! | gRPC code | kind |
//! | --- | --- |
//! | `PERMISSION_DENIED`, `UNAUTHENTICATED` | [`AccessDenied`](WrapErrorKind::AccessDenied) |
//! | `NOT_FOUND` | [`NotFound`](WrapErrorKind::NotFound) |
//! | `FAILED_PRECONDITION` (version disabled, destroyed, or scheduled for destruction) | [`KeyDisabled`](WrapErrorKind::KeyDisabled) |
//! | `RESOURCE_EXHAUSTED` (quota) | [`Throttled`](WrapErrorKind::Throttled), with `google.rpc.RetryInfo` as `retry_after` |
//! | `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `CANCELLED`, `ABORTED`, `INTERNAL`, `UNKNOWN` | [`Unavailable`](WrapErrorKind::Unavailable) |
//! | `INVALID_ARGUMENT` naming a `*_crc32c` field (the request changed on the wire) | [`Unavailable`](WrapErrorKind::Unavailable): retried, as Google advises |
//! | `INVALID_ARGUMENT`, `OUT_OF_RANGE` (bad ciphertext or AAD) | [`InvalidCiphertext`](WrapErrorKind::InvalidCiphertext) |
//! | anything else (`UNIMPLEMENTED`, `ALREADY_EXISTS`, ...) | [`Misconfigured`](WrapErrorKind::Misconfigured) |
//!
//! A failure to obtain credentials (the impersonation token) arrives as
//! `UNKNOWN` with the credentials error as its source: a transient one is
//! [`Unavailable`](WrapErrorKind::Unavailable), any other
//! [`AccessDenied`](WrapErrorKind::AccessDenied).

use std::error::Error as StdError;
use std::time::Duration;

use gcloud_sdk::google::rpc::{RetryInfo, Status as RpcStatus};
use gcloud_sdk::prost::Message;
use gcloud_sdk::tonic::{Code, Status};
use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};

use crate::PROVIDER;

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The canonical name of a gRPC code, as Google's docs spell it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The [`WrapErrorKind`] for a gRPC status from Cloud KMS.
pub(crate) fn kind_of(status: &Status) -> WrapErrorKind {
    if let Some(transient) = credentials_failure(status) {
        return if transient {
            WrapErrorKind::Unavailable
        } else {
            WrapErrorKind::AccessDenied
        };
    }
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => WrapErrorKind::AccessDenied,
        Code::NotFound => WrapErrorKind::NotFound,
        Code::FailedPrecondition => WrapErrorKind::KeyDisabled,
        Code::ResourceExhausted => WrapErrorKind::Throttled,
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Internal
        | Code::Unknown => WrapErrorKind::Unavailable,
        Code::InvalidArgument if names_a_checksum(status.message()) => WrapErrorKind::Unavailable,
        Code::InvalidArgument | Code::OutOfRange => WrapErrorKind::InvalidCiphertext,
        Code::Ok | Code::AlreadyExists | Code::Unimplemented | Code::DataLoss => {
            WrapErrorKind::Misconfigured
        }
    }
}

/// Cloud KMS answers a request whose checksum does not match its data with
/// `INVALID_ARGUMENT` ("Verifying end-to-end data integrity", Cloud KMS docs).
/// Google does not fix the wording, so this looks for the field or the word;
/// a complaint worded otherwise stays `InvalidCiphertext`: still an error,
/// only not retried.
fn names_a_checksum(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("crc32c") || message.contains("checksum")
}

/// `Some(is_transient)` when the call failed before reaching Cloud KMS
/// because no token could be obtained.
fn credentials_failure(status: &Status) -> Option<bool> {
    let mut next: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(err) = next {
        if let Some(e) = err.downcast_ref::<gcloud_sdk::error::Error>() {
            match e.kind() {
                gcloud_sdk::error::ErrorKind::Credentials(c) => return Some(c.is_transient()),
                gcloud_sdk::error::ErrorKind::CredentialsBuild(_) => return Some(false),
                _ => {}
            }
        }
        if let Some(c) =
            err.downcast_ref::<gcloud_sdk::google_cloud_auth::errors::CredentialsError>()
        {
            return Some(c.is_transient());
        }
        next = err.source();
    }
    None
}

/// The wait a `google.rpc.RetryInfo` detail asks for, if the status carries one.
pub(crate) fn retry_after(status: &Status) -> Option<Duration> {
    let details = status.details();
    if details.is_empty() {
        return None;
    }
    let rpc = RpcStatus::decode(details).ok()?;
    rpc.details
        .iter()
        .filter(|any| any.type_url == RETRY_INFO_TYPE)
        .find_map(|any| RetryInfo::decode(any.value.as_slice()).ok())
        .and_then(|info| info.retry_delay)
        .and_then(|d| {
            let secs = u64::try_from(d.seconds).ok()?;
            let nanos = u32::try_from(d.nanos).ok()?;
            Some(Duration::from_secs(secs).saturating_add(Duration::from_nanos(u64::from(nanos))))
        })
}

/// A [`WrapError`] for a failed Cloud KMS call on `key_ref`.
pub(crate) fn to_wrap_error(status: Status, key_ref: &str, operation: WrapOperation) -> WrapError {
    let kind = kind_of(&status);
    let mut message = format!("Cloud KMS answered {}", code_name(status.code()));
    if !status.message().is_empty() {
        message.push_str(": ");
        message.push_str(status.message());
    }
    if credentials_failure(&status).is_some() {
        message.push_str(" (no access token: impersonating the service account failed)");
    }
    let retry_after = retry_after(&status);
    let mut error = WrapError::new(kind, PROVIDER, key_ref, operation)
        .with_message(message)
        .with_source(status);
    if let Some(wait) = retry_after {
        error = error.with_retry_after(wait);
    }
    error
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use gcloud_sdk::prost_types::{Any, Duration as PbDuration};

    #[test]
    fn every_documented_code_maps_to_its_kind() {
        let cases = [
            (Code::PermissionDenied, WrapErrorKind::AccessDenied),
            (Code::Unauthenticated, WrapErrorKind::AccessDenied),
            (Code::NotFound, WrapErrorKind::NotFound),
            (Code::FailedPrecondition, WrapErrorKind::KeyDisabled),
            (Code::ResourceExhausted, WrapErrorKind::Throttled),
            (Code::Unavailable, WrapErrorKind::Unavailable),
            (Code::DeadlineExceeded, WrapErrorKind::Unavailable),
            (Code::Cancelled, WrapErrorKind::Unavailable),
            (Code::Internal, WrapErrorKind::Unavailable),
            (Code::InvalidArgument, WrapErrorKind::InvalidCiphertext),
            (Code::OutOfRange, WrapErrorKind::InvalidCiphertext),
            (Code::Unimplemented, WrapErrorKind::Misconfigured),
        ];
        for (code, kind) in cases {
            assert_eq!(kind_of(&Status::new(code, "x")), kind, "{code:?}");
        }
    }

    #[test]
    fn a_checksum_complaint_is_transient() {
        let status = Status::invalid_argument(
            "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.",
        );
        assert_eq!(kind_of(&status), WrapErrorKind::Unavailable);
    }

    #[test]
    fn retry_info_becomes_retry_after() {
        let info = RetryInfo {
            retry_delay: Some(PbDuration {
                seconds: 2,
                nanos: 500_000_000,
            }),
        };
        let rpc = RpcStatus {
            code: Code::ResourceExhausted as i32,
            message: "quota".into(),
            details: vec![Any {
                type_url: RETRY_INFO_TYPE.into(),
                value: info.encode_to_vec(),
            }],
        };
        let status =
            Status::with_details(Code::ResourceExhausted, "quota", rpc.encode_to_vec().into());
        let err = to_wrap_error(
            status,
            "projects/p/locations/l/keyRings/r/cryptoKeys/k",
            WrapOperation::Wrap,
        );
        assert_eq!(err.kind, WrapErrorKind::Throttled);
        assert_eq!(err.retry_after, Some(Duration::from_millis(2500)));
        assert!(err.to_string().contains("RESOURCE_EXHAUSTED"), "{err}");
    }

    #[test]
    fn a_credentials_failure_is_access_denied_or_transient() {
        use gcloud_sdk::google_cloud_auth::errors::CredentialsError;
        for (transient, kind) in [
            (false, WrapErrorKind::AccessDenied),
            (true, WrapErrorKind::Unavailable),
        ] {
            let cause = CredentialsError::from_msg(transient, "impersonation refused");
            let status = Status::from_error(Box::new(gcloud_sdk::error::Error::from(cause)));
            assert_eq!(status.code(), Code::Unknown);
            let err = to_wrap_error(
                status,
                "projects/p/locations/l/keyRings/r/cryptoKeys/k",
                WrapOperation::Unwrap,
            );
            assert_eq!(err.kind, kind);
            assert!(
                err.to_string()
                    .contains("impersonating the service account failed"),
                "{err}"
            );
        }
    }

    #[test]
    fn garbage_details_are_ignored() {
        let status = Status::with_details(Code::ResourceExhausted, "q", vec![0xff, 0x01].into());
        assert_eq!(retry_after(&status), None);
    }
}
