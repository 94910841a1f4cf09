#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub use keyfold_core::*;

/// AWS KMS: [`keyfold_aws`]'s `AwsKmsWrapper` and `AwsWrapperFactory`.
#[cfg(feature = "aws")]
pub use keyfold_aws as aws;

/// Google Cloud KMS: [`keyfold_gcp`]'s `GcpKmsWrapper` and `GcpWrapperFactory`.
#[cfg(feature = "gcp")]
pub use keyfold_gcp as gcp;

/// Azure Key Vault: [`keyfold_azure`]'s wrapper and `AzureFactory`.
#[cfg(feature = "azure")]
pub use keyfold_azure as azure;

/// The rewrap job and lazy rewrap: [`keyfold_rewrap`].
#[cfg(feature = "rewrap")]
pub use keyfold_rewrap as rewrap;

/// PostgreSQL: [`keyfold_postgres`]'s `PgKeyringStore`, `PgAuditSink` and the
/// distributed rewrap job.
#[cfg(feature = "postgres")]
pub use keyfold_postgres as postgres;
