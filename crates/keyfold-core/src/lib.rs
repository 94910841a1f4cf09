#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a security library answers bad input with a typed error, never a panic"
)]

pub mod config;
pub mod context;
pub mod error;
pub mod format;
mod kdf;
pub mod local;
pub mod record;
pub mod retry;
pub mod rng;
pub mod secret;
pub mod suite;
#[cfg(feature = "testkit")]
pub mod testkit;
#[cfg(test)]
mod vectors;
pub mod wrap;

pub use context::EncryptionContext;
pub use error::{Error, FormatError, WrapError, WrapErrorKind, WrapOperation};
pub use local::LocalKek;
pub use secret::{MasterKey, SecretKey};
pub use suite::Suite;
pub use wrap::{KeyWrapper, WrapContext, WrappedKey};

/// The repository README's examples, run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct RootReadme;
