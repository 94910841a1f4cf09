//! AEAD suites and the backend seam that runs them.

use std::fmt;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use crate::secret::KEY_LEN;

/// Length of every AEAD tag keyfold writes.
pub const TAG_LEN: usize = 16;

/// The AEAD suite a record is sealed with. Both are key-committing
/// (docs/FORMAT.md, "Commitment").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Suite {
    /// AES-256-GCM with an HKDF-SHA-256 key commitment. The default: fastest on
    /// CPUs with AES instructions.
    #[serde(rename = "aes-256-gcm")]
    #[default]
    Aes256Gcm,
    /// ChaCha20-Poly1305 with an HKDF-SHA-256 key commitment, for CPUs without
    /// AES instructions (constant-time in software).
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Suite {
    /// Every suite this build understands.
    pub const ALL: [Suite; 2] = [Suite::Aes256Gcm, Suite::ChaCha20Poly1305];

    /// The suite's id byte in the header.
    pub const fn id(self) -> u8 {
        match self {
            Suite::Aes256Gcm => 0x01,
            Suite::ChaCha20Poly1305 => 0x02,
        }
    }

    /// The suite with header id `id`, if this build knows it.
    pub const fn from_id(id: u8) -> Option<Suite> {
        match id {
            0x01 => Some(Suite::Aes256Gcm),
            0x02 => Some(Suite::ChaCha20Poly1305),
            _ => None,
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Suite::Aes256Gcm => "AES-256-GCM+commit",
            Suite::ChaCha20Poly1305 => "ChaCha20-Poly1305+commit",
        })
    }
}

/// The AEAD failed: wrong key, tampered bytes or wrong associated data.
/// Deliberately opaque (no oracle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AeadFailure;

/// Seals `buf` in place under a single-use `key` with the all-zero nonce and
/// returns the tag. Callers guarantee the key is never used for a second
/// message (docs/FORMAT.md, "Nonces").
pub(crate) fn seal_single_use(
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    let nonce = Default::default();
    let tag = match suite {
        Suite::Aes256Gcm => Aes256Gcm::new(key.into())
            .encrypt_inout_detached(&nonce, aad, buf.into())
            .map_err(|_| AeadFailure)?,
        Suite::ChaCha20Poly1305 => ChaCha20Poly1305::new(key.into())
            .encrypt_inout_detached(&nonce, aad, buf.into())
            .map_err(|_| AeadFailure)?,
    };
    Ok(tag.into())
}

/// Opens what [`seal_single_use`] sealed. On failure `buf` holds garbage the
/// caller must discard.
pub(crate) fn open_single_use(
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadFailure> {
    let nonce = Default::default();
    match suite {
        Suite::Aes256Gcm => Aes256Gcm::new(key.into())
            .decrypt_inout_detached(&nonce, aad, buf.into(), tag.into())
            .map_err(|_| AeadFailure),
        Suite::ChaCha20Poly1305 => ChaCha20Poly1305::new(key.into())
            .decrypt_inout_detached(&nonce, aad, buf.into(), tag.into())
            .map_err(|_| AeadFailure),
    }
}
