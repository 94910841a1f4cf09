#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a security library answers bad input with a typed error, never a panic"
)]

mod integrity;
mod sleep;
mod status;
mod wrapper;

pub use sleep::{Sleeper, TokioSleeper};
pub use wrapper::{GcpKmsWrapper, GcpKmsWrapperBuilder, GcpWrapperFactory, check_google_endpoint};

/// Provider name recorded in every [`WrappedKey`](keyfold_core::WrappedKey) this crate makes.
pub const PROVIDER: &str = "gcp";

/// Cloud KMS's public gRPC endpoint, used when the operator sets no endpoint override.
pub const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";

/// The OAuth scope requested for the impersonated service account's tokens.
pub const KMS_SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";
