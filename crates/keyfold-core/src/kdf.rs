//! Key derivation: HKDF-Expand with HMAC-SHA-256 (RFC 5869, section 2.3).
//!
//! Master keys and data keys are 32 uniformly random bytes, so they are used
//! directly as HKDF's pseudorandom key and the extract step is skipped, as
//! RFC 5869 section 3.3 allows. Every derived key is for one purpose, named by
//! a distinct `info` label (docs/FORMAT.md, "Key derivation").

use hmac::digest::FixedOutput;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::KEY_LEN;

type HmacSha256 = Hmac<Sha256>;

/// A keyed HMAC-SHA-256 state; cloning it avoids re-keying per derivation.
#[derive(Clone)]
pub(crate) struct Prf(HmacSha256);

impl Prf {
    pub(crate) fn new(prk: &[u8; KEY_LEN]) -> Self {
        // HMAC accepts keys of any length: this cannot fail for 32 bytes.
        match HmacSha256::new_from_slice(prk) {
            Ok(mac) => Prf(mac),
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    /// HKDF-Expand(PRK, info, 32): one block, T(1) = HMAC(PRK, info || 0x01).
    pub(crate) fn expand(&self, info: &[&[u8]]) -> Zeroizing<[u8; KEY_LEN]> {
        let mut mac = self.0.clone();
        for part in info {
            mac.update(part);
        }
        mac.update(&[1u8]);
        // Finalize straight into the zeroizing buffer: no stray copy of the key.
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        FixedOutput::finalize_into(mac, (&mut *key).into());
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our one-block expand equals the `hkdf` crate's HKDF-Expand.
    #[test]
    fn matches_hkdf_crate() {
        let prk = [7u8; 32];
        let ours = Prf::new(&prk).expand(&[b"keyfold", b"/label"]);
        let hk = hkdf::Hkdf::<Sha256>::from_prk(&prk).unwrap();
        let mut theirs = [0u8; 32];
        hk.expand(b"keyfold/label", &mut theirs).unwrap();
        assert_eq!(*ours, theirs);
    }
}
