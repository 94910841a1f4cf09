//! Key derivation: the one-step KDF of NIST SP 800-56C Rev. 2, section 4.1,
//! with the hash function as the auxiliary function H (option 1):
//! `K = SHA-256(counter || Z || FixedInfo)`, with `counter = 1` because
//! every derived value is one 32-byte block.
//!
//! `Z` is always 32 uniformly random bytes (a master key or a data key) and
//! every derived value has its own `FixedInfo` label (docs/FORMAT.md, "Key
//! derivation"). With labels of at most 19 bytes the input fits one SHA-256
//! block, so a record's payload key and commitment cost one compression
//! each; this is why the per-record derivations do not use HKDF (an
//! HMAC-based expand costs four compressions per key, which at 1 KiB was a
//! third of a record's open time).

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::format::secret::KEY_LEN;

/// `SHA-256(00000001 || secret || info[0] || info[1] || ...)`.
pub(crate) fn derive(secret: &[u8; KEY_LEN], info: &[&[u8]]) -> Zeroizing<[u8; KEY_LEN]> {
    let mut hash = Sha256::new();
    hash.update(1u32.to_be_bytes());
    hash.update(secret);
    for part in info {
        hash.update(part);
    }
    // Finalize straight into the zeroizing buffer: no stray copy of the key.
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    hash.finalize_into((&mut *out).into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers computed independently (Python's hashlib over the
    /// same bytes), for a one-block and a two-block input.
    #[test]
    fn matches_an_independent_implementation() {
        let z = [7u8; KEY_LEN];
        assert_eq!(
            hex::encode(*derive(&z, &[b"keyfold1 payload", &[1]])),
            "407a6268790b09c288458acb8847be70ced37549a95b41f0fc0a8feeea999f62"
        );
        assert_eq!(
            hex::encode(*derive(
                &z,
                &[b"a label longer than one block can hold, ", b"to cross it"]
            )),
            "565a3a048a2249c8744f5c46052f42412ddbdced69280fa46c47b0b92fde9381"
        );
    }

    #[test]
    fn labels_and_secrets_separate_outputs() {
        let z = [7u8; KEY_LEN];
        assert_ne!(*derive(&z, &[b"a"]), *derive(&z, &[b"b"]));
        assert_ne!(*derive(&z, &[b"a"]), *derive(&[8u8; KEY_LEN], &[b"a"]));
    }
}
