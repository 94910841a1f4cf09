//! CRC32C integrity fields, as Cloud KMS documents them
//! ("Verifying end-to-end data integrity", Cloud KMS docs).
//!
//! Cloud KMS carries CRC32C (Castagnoli) checksums as `google.protobuf.Int64Value`
//! holding a value in `0..=u32::MAX`. The client sends one for every input it
//! hands the service and checks the `verified_*` flags and the returned
//! checksums; a mismatch means the bytes changed on the wire, and the response
//! is discarded.

/// The CRC32C of `data`, in Cloud KMS's `Int64Value` encoding.
pub(crate) fn crc32c(data: &[u8]) -> i64 {
    i64::from(crc32c::crc32c(data))
}

/// True when `checksum` is present and is the CRC32C of `data`.
pub(crate) fn matches(data: &[u8], checksum: Option<i64>) -> bool {
    checksum == Some(crc32c(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn castagnoli_check_value() {
        // The standard check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn matches_requires_presence_and_equality() {
        assert!(matches(b"abc", Some(crc32c(b"abc"))));
        assert!(!matches(b"abc", Some(crc32c(b"abd"))));
        assert!(!matches(b"abc", None));
    }
}
