#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a security library answers bad input with a typed error, never a panic"
)]

pub mod audit;
pub mod config;
pub mod context;
pub mod error;
pub mod format;
mod kdf;
pub mod keyring;
mod keywrap;
pub mod local;
pub mod policy;
pub mod probe;
pub mod record;
pub mod retry;
pub mod rng;
pub mod secret;
pub mod store;
pub mod stream;
pub mod suite;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
#[cfg(test)]
mod vectors;
pub mod wrap;

pub use audit::{Actor, AuditEvent, AuditKind, AuditSink};
pub use context::EncryptionContext;
pub use error::{Error, FormatError, StreamError, WrapError, WrapErrorKind, WrapOperation};
pub use keyring::{
    DestroyAuthorization, KeyState, Keyring, KeyringMetadata, NoRecordsLeft, Rotation,
};
pub use local::LocalKek;
pub use policy::RotationPolicy;
pub use secret::{MasterKey, SecretKey};
pub use store::{FileStore, KeyringStore, MemoryStore, Revision, StoreEvent};
pub use suite::Suite;
pub use wrap::{KeyWrapper, WrapContext, WrappedKey};

/// The repository README's examples, run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct RootReadme;
