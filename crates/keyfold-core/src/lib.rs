#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a security library answers bad input with a typed error, never a panic"
)]

// The three layers, lowest first; each module doc says what it may import
// (docs/FORMAT.md for the format, docs/LIFECYCLE.md for the keyring).
pub mod format;
pub mod keyring;
pub mod wrap;

pub mod error;
#[cfg(feature = "testkit")]
pub mod testkit;

// The modules' paths from before the layers had folders, kept so that
// `keyfold_core::record::encrypt`, `keyfold_core::store::FileStore` and the
// rest read as they did. Code inside the crate uses the layered paths.
pub use format::{context, record, rng, secret, stream, suite};
pub use keyring::{audit, policy, store, time};
pub use wrap::{config, local, retry};

/// The onboarding probe ([`wrap::probe`]) and the config slot that keeps
/// what passed it ([`keyring::onboarding`]), under their former path.
pub mod probe {
    pub use crate::keyring::onboarding::{ConfigSlot, ProbedConfig};
    pub use crate::wrap::probe::*;
}

/// The attribute keyfold's async host traits ([`KeyringStore`],
/// [`KeyWrapper`]) are declared with: put it on your `impl` too.
pub use async_trait::async_trait;
pub use format::context::EncryptionContext;
pub use format::error::{CryptoError, FormatError, StreamError};
pub use format::secret::{MasterKey, SecretKey};
pub use format::suite::Suite;
pub use keyring::audit::{Actor, AuditEvent, AuditKind, AuditSink};
pub use keyring::error::Error;
pub use keyring::maintenance::{EvidenceSource, Maintenance, MaintenanceHandle, MaintenanceReport};
pub use keyring::policy::RotationPolicy;
pub use keyring::store::{FileStore, KeyringStore, MemoryStore, Revision, StoreEvent};
pub use keyring::{
    DestroyAuthorization, KeyState, Keyring, KeyringMetadata, NoRecordsLeft, Rotation,
};
pub use wrap::error::{WrapError, WrapErrorKind, WrapOperation};
pub use wrap::local::LocalKek;
pub use wrap::{KeyWrapper, WrapContext, WrappedKey};

/// The repository README's examples, run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct RootReadme;
