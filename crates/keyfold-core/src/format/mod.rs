//! Layer 1, the format: record format v1 and streams, the AEAD suites and
//! their backends, the KDF, the data-key wrap cipher, secret key types, the
//! encryption context and the random generator (docs/FORMAT.md).
//!
//! Pure and synchronous: no I/O beyond the caller's `Read`/`Write`, no
//! clock, no KMS. It imports nothing from the wrapping layer
//! ([`crate::wrap`]) or the keyring ([`crate::keyring`]); its errors are its
//! own ([`error::CryptoError`] and the detailed [`FormatError`],
//! [`StreamError`]).
//!
//! The header's layout constants and key-free inspection
//! ([`inspect`], [`inspect_header`]) are re-exported here from `header`,
//! so `keyfold_core::format::inspect` reads as before.

pub mod context;
pub mod error;
mod header;
pub(crate) mod kdf;
pub(crate) mod keywrap;
pub mod record;
pub mod rng;
pub mod secret;
pub mod stream;
pub mod suite;
#[cfg(test)]
mod vectors;

pub use error::{CryptoError, FormatError, StreamError};
pub use header::*;
