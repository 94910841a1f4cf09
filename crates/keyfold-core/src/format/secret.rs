//! Key material: 32-byte secrets that zeroize on drop and never print.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroize;

use crate::format::keywrap::WrapCipher;
use crate::format::rng;
use crate::format::suite::Backend;

/// Length in bytes of every symmetric key keyfold handles (master keys, data keys, KEKs).
pub const KEY_LEN: usize = 32;

/// 32 bytes of secret key material.
///
/// Not `Clone`, not `Display`; `Debug` prints `SecretKey(******)`. The bytes are
/// zeroized when the value is dropped (age's `FileKey` is the model).
pub struct SecretKey(SecretBox<[u8; KEY_LEN]>);

impl SecretKey {
    /// Takes ownership of `bytes`; the caller's array is zeroized.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        // Copied straight into the heap: `Box::new(*bytes)` would make a
        // temporary copy on the stack that nothing wipes.
        let mut boxed = Box::new([0u8; KEY_LEN]);
        boxed.copy_from_slice(bytes);
        bytes.zeroize();
        SecretKey(SecretBox::new(boxed))
    }

    /// Copies key material from a slice.
    ///
    /// # Errors
    /// [`InvalidKeyLength`] when the slice is not exactly 32 bytes.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, InvalidKeyLength> {
        let mut array: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| InvalidKeyLength { len: bytes.len() })?;
        Ok(Self::from_bytes(&mut array))
    }

    /// A fresh key from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`rng::RngError`] when the OS refuses to provide randomness.
    pub fn generate() -> Result<Self, rng::RngError> {
        let mut bytes = SecretBox::new(Box::new([0u8; KEY_LEN]));
        rng::fill(secrecy::ExposeSecretMut::expose_secret_mut(&mut bytes))?;
        Ok(SecretKey(bytes))
    }

    /// The raw bytes. Keep the borrow short; never log it.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    /// A second, independent copy of the secret (deliberately explicit: no `Clone`).
    pub fn duplicate(&self) -> Self {
        let mut copy = *self.expose();
        Self::from_bytes(&mut copy)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(******)")
    }
}

/// A slice that should have been a 32-byte key was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key material must be {KEY_LEN} bytes, got {len}")]
pub struct InvalidKeyLength {
    /// The length that was supplied.
    pub len: usize,
}

/// A master key version: the 32-byte key that wraps data keys, with its version number.
///
/// It keeps the wrap cipher (AES-256-GCM-SIV under a key derived from the
/// master key, docs/FORMAT.md, "Wrap") with its key schedule computed, built
/// once so wrapping or unwrapping a data key does not redo it.
pub struct MasterKey {
    version: u32,
    key: SecretKey,
    wrap: WrapCipher,
}

/// KDF label of the wrap key (docs/FORMAT.md, "Key derivation").
const LABEL_WRAP: &[u8] = b"keyfold1 wrap";

impl MasterKey {
    /// A master key for `version` made of `key`.
    pub fn new(version: u32, key: SecretKey) -> Self {
        let wrap_key = crate::format::kdf::derive(key.expose(), &[LABEL_WRAP]);
        // aws-lc refuses only a key of the wrong length, which a 32-byte array
        // cannot be. Were it ever to refuse, the pure-Rust backend runs the
        // same AES-256-GCM-SIV (byte-identical, tested): not a weaker
        // fallback, and `MasterKey::new` stays infallible.
        let wrap = WrapCipher::new(Backend::default(), &wrap_key).unwrap_or_else(|_| {
            WrapCipher::RustCrypto(Box::new(aes_gcm_siv::aead::KeyInit::new(
                (&*wrap_key).into(),
            )))
        });
        MasterKey { version, key, wrap }
    }

    /// The master key version this key is.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key material (for wrapping it under a KMS key).
    pub fn secret(&self) -> &SecretKey {
        &self.key
    }

    pub(crate) fn wrap_cipher(&self) -> &WrapCipher {
        &self.wrap
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("version", &self.version)
            .field("key", &"******")
            .finish()
    }
}
