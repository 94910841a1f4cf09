//! Record format v1: layout constants, a bounds-checked reader and the parsed
//! header view (docs/FORMAT.md, "Record layout").
//!
//! ```text
//! offset  len  field                         authenticated by
//!      0    2  magic "KF"                    payload AEAD and wrap
//!      2    1  format version (1)            payload AEAD and wrap
//!      3    1  suite id                      payload AEAD and wrap
//!      4   32  key commitment                payload AEAD and wrap
//!     36    4  master key version (u32 BE)   wrap (AAD)       <- rewrap rewrites
//!     40   12  wrap nonce                    wrap (nonce)     <- rewrap rewrites
//!     52   48  wrapped data key + tag        wrap             <- rewrap rewrites
//!    100    n  payload ciphertext            payload AEAD
//!  100+n   16  payload tag
//! ```

use crate::format::error::FormatError;
use crate::format::suite::{Suite, TAG_LEN};

/// The first two bytes of every keyfold record.
pub const MAGIC: [u8; 2] = *b"KF";
/// The record format version this build writes.
pub const FORMAT_V1: u8 = 1;
/// Suite ids with this bit set are reserved for the streaming format.
pub const STREAMING_SUITE_FLAG: u8 = 0x80;

pub(crate) const COMMITMENT_LEN: usize = 32;
pub(crate) const WRAP_NONCE_LEN: usize = crate::format::keywrap::WRAP_NONCE_LEN;
pub(crate) const WRAPPED_DATA_KEY_LEN: usize = crate::format::secret::KEY_LEN + TAG_LEN;

/// End of the part a rewrap never changes (magic, format, suite, commitment).
pub(crate) const IMMUTABLE_END: usize = 2 + 1 + 1 + COMMITMENT_LEN;
/// Offset of the master key version.
pub(crate) const VERSION_AT: usize = IMMUTABLE_END;
/// Offset of the wrapped data key; everything before it is the wrap's AAD.
pub(crate) const WRAPPED_KEY_AT: usize = VERSION_AT + 4 + WRAP_NONCE_LEN;
/// Length of the v1 header.
pub const HEADER_LEN: usize = WRAPPED_KEY_AT + WRAPPED_DATA_KEY_LEN;
/// Bytes a v1 record adds to its plaintext: header plus payload tag (116).
pub const RECORD_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest plaintext a single record may hold (4 GiB); larger objects use streaming.
pub const MAX_RECORD_PLAINTEXT: u64 = 1 << 32;

// Streaming format (docs/FORMAT.md, "Streaming"): the same preamble and
// commitment, then the segment size and nonce prefix (immutable), then the
// same rewrap part as a record (version, wrap nonce, wrapped data key).

/// Length of the rewrap part (version, wrap nonce, wrapped data key) shared by
/// record and stream headers.
pub(crate) const REWRAP_PART_LEN: usize = 4 + WRAP_NONCE_LEN + WRAPPED_DATA_KEY_LEN;
/// Length of a stream's per-object nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;
/// End of a stream header's immutable part (magic .. nonce prefix).
pub(crate) const STREAM_IMMUTABLE_END: usize = IMMUTABLE_END + 4 + NONCE_PREFIX_LEN;
/// Length of a stream header (111 bytes).
pub const STREAM_HEADER_LEN: usize = STREAM_IMMUTABLE_END + REWRAP_PART_LEN;
/// Plaintext bytes per segment unless chosen otherwise (64 KiB).
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Smallest segment size a stream may declare (plaintext bytes).
pub const MIN_SEGMENT_SIZE: u32 = 64;
/// Largest segment size a stream may declare (16 MiB): bounds a reader's memory.
pub const MAX_SEGMENT_SIZE: u32 = 16 << 20;

/// The header suite id of the streaming format over `suite`'s AEAD:
/// 0x81 for AES-256-GCM, 0x82 for ChaCha20-Poly1305.
///
/// ```
/// # use keyfold_core::{format::stream_suite_id, Suite};
/// assert_eq!(stream_suite_id(Suite::Aes256Gcm), 0x81);
/// assert_eq!(stream_suite_id(Suite::ChaCha20Poly1305), 0x82);
/// ```
pub const fn stream_suite_id(suite: Suite) -> u8 {
    STREAMING_SUITE_FLAG | suite.id()
}

/// Which of the two formats a header starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderKind {
    /// A single-shot record (docs/FORMAT.md, "Record layout").
    Record,
    /// A segmented stream (docs/FORMAT.md, "Streaming").
    Stream,
}

/// The header of a record or a stream, parsed from the start of a buffer
/// (the rest of the buffer is not looked at).
#[derive(Clone, Copy)]
pub(crate) struct HeaderView<'a> {
    /// Exactly the header's bytes.
    pub(crate) bytes: &'a [u8],
    pub(crate) kind: HeaderKind,
    /// The header's suite id byte (0x01, 0x02, 0x81, 0x82).
    pub(crate) suite_id: u8,
    /// The AEAD.
    pub(crate) suite: Suite,
    pub(crate) commitment: &'a [u8; COMMITMENT_LEN],
    /// Streams only (0 for records).
    pub(crate) segment_size: u32,
    /// Streams only (zeros for records).
    pub(crate) nonce_prefix: [u8; NONCE_PREFIX_LEN],
    pub(crate) version: u32,
    pub(crate) wrap_nonce: &'a [u8; WRAP_NONCE_LEN],
    pub(crate) wrapped_data_key: &'a [u8; WRAPPED_DATA_KEY_LEN],
}

impl<'a> HeaderView<'a> {
    /// Parses the header at the start of `bytes`: a record header or a stream
    /// header, told apart by the suite id's high bit. Never reads past
    /// `bytes`; bytes after the header are ignored.
    pub(crate) fn parse_prefix(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        let (_, suite_id) = read_preamble(&mut r)?;
        let kind = if suite_id & STREAMING_SUITE_FLAG == 0 {
            HeaderKind::Record
        } else {
            HeaderKind::Stream
        };
        let suite = Suite::from_id(suite_id & !STREAMING_SUITE_FLAG)
            .ok_or(FormatError::UnknownSuite(suite_id))?;
        let commitment = r.array("key commitment")?;
        let (segment_size, nonce_prefix, len) = match kind {
            HeaderKind::Record => (0, [0; NONCE_PREFIX_LEN], HEADER_LEN),
            HeaderKind::Stream => {
                // Bounds are checked by the stream reader
                // (`StreamError::SegmentSize`); a rewrap needs none.
                let size = r.u32("segment size")?;
                (size, *r.array("nonce prefix")?, STREAM_HEADER_LEN)
            }
        };
        let version = r.u32("master key version")?;
        let wrap_nonce = r.array("wrap nonce")?;
        let wrapped_data_key = r.array("wrapped data key")?;
        let bytes = bytes.get(..len).ok_or(FormatError::TooShort {
            what: "header",
            needed: len,
            got: bytes.len(),
        })?;
        Ok(HeaderView {
            bytes,
            kind,
            suite_id,
            suite,
            commitment,
            segment_size,
            nonce_prefix,
            version,
            wrap_nonce,
            wrapped_data_key,
        })
    }

    /// The header bytes the wrap authenticates as associated data.
    pub(crate) fn wrap_aad(&self) -> &'a [u8] {
        self.bytes
            .get(..self.bytes.len().saturating_sub(WRAPPED_DATA_KEY_LEN))
            .unwrap_or_default()
    }
}

/// A tiny cursor over a byte slice, in the style of rustls' `codec::Reader`:
/// every read is bounds-checked and names what it was reading.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(FormatError::TooShort {
            what,
            needed: n,
            got: self.rest.len(),
        })?;
        self.rest = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<&'a [u8; N], FormatError> {
        let bytes = self.take(N, what)?;
        // `take` returned exactly N bytes.
        bytes.try_into().map_err(|_| FormatError::TooShort {
            what,
            needed: N,
            got: bytes.len(),
        })
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(*self.array::<4>(what)?))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Succeeds only if nothing is left (rustls' `Reader::all`).
    pub(crate) fn finish(self) -> Result<(), FormatError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(FormatError::TrailingData(n)),
        }
    }
}

/// A parsed v1 record: borrowed views of each field of the exact input bytes.
#[derive(Clone, Copy)]
pub(crate) struct RecordView<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) suite: Suite,
    pub(crate) commitment: &'a [u8; COMMITMENT_LEN],
    pub(crate) version: u32,
    pub(crate) wrap_nonce: &'a [u8; WRAP_NONCE_LEN],
    pub(crate) wrapped_data_key: &'a [u8; WRAPPED_DATA_KEY_LEN],
    pub(crate) payload: &'a [u8],
    pub(crate) tag: &'a [u8; TAG_LEN],
}

/// Reads magic, format version and suite: the part shared by every format
/// version and by streaming headers.
pub(crate) fn read_preamble(r: &mut Reader<'_>) -> Result<(u8, u8), FormatError> {
    if r.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let format = r.u8("format version")?;
    if format != FORMAT_V1 {
        return Err(FormatError::UnknownVersion(format));
    }
    let suite = r.u8("suite id")?;
    Ok((format, suite))
}

impl<'a> RecordView<'a> {
    /// Parses a whole record. Checks, in order: magic, format version, suite,
    /// then lengths. Never reads past `bytes`.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        let (_, suite_id) = read_preamble(&mut r)?;
        let suite = Suite::from_id(suite_id).ok_or(FormatError::UnknownSuite(suite_id))?;
        let commitment = r.array("key commitment")?;
        let version = r.u32("master key version")?;
        let wrap_nonce = r.array("wrap nonce")?;
        let wrapped_data_key = r.array("wrapped data key")?;
        let body_len = r.remaining();
        let Some(payload_len) = body_len.checked_sub(TAG_LEN) else {
            return Err(FormatError::TooShort {
                what: "payload tag",
                needed: TAG_LEN,
                got: body_len,
            });
        };
        if payload_len as u64 > MAX_RECORD_PLAINTEXT {
            return Err(FormatError::LengthExceeds {
                what: "payload",
                len: payload_len as u64,
                max: MAX_RECORD_PLAINTEXT,
            });
        }
        let payload = r.take(payload_len, "payload")?;
        let tag = r.array("payload tag")?;
        r.finish()?;
        Ok(RecordView {
            bytes,
            suite,
            commitment,
            version,
            wrap_nonce,
            wrapped_data_key,
            payload,
            tag,
        })
    }

    /// The record's header, as the format-independent view.
    pub(crate) fn header(&self) -> HeaderView<'a> {
        HeaderView {
            bytes: self.bytes.get(..HEADER_LEN).unwrap_or_default(),
            kind: HeaderKind::Record,
            suite_id: self.suite.id(),
            suite: self.suite,
            commitment: self.commitment,
            segment_size: 0,
            nonce_prefix: [0; NONCE_PREFIX_LEN],
            version: self.version,
            wrap_nonce: self.wrap_nonce,
            wrapped_data_key: self.wrapped_data_key,
        }
    }

    /// The header bytes the payload AEAD authenticates.
    pub(crate) fn immutable_header(&self) -> &'a [u8] {
        self.bytes.get(..IMMUTABLE_END).unwrap_or_default()
    }
}

/// What a record's header says, readable without any key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordInfo {
    /// Format version.
    pub format: u8,
    /// AEAD suite.
    pub suite: Suite,
    /// Master key version that wrapped the data key.
    pub key_version: u32,
    /// Payload (plaintext) length in bytes.
    pub plaintext_len: usize,
}

/// Reads a record's header without decrypting it (for skip decisions in a
/// rewrap job).
///
/// ```
/// # use keyfold_core::{format::inspect, record, EncryptionContext, MasterKey, SecretKey, Suite};
/// let key = MasterKey::new(7, SecretKey::generate()?);
/// let ct = record::encrypt(&key, Suite::default(), &EncryptionContext::new(), b"hi")?;
/// assert_eq!(inspect(&ct)?.key_version, 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`FormatError`] when the bytes are not a well-formed v1 record.
pub fn inspect(record: &[u8]) -> Result<RecordInfo, FormatError> {
    let view = RecordView::parse(record)?;
    Ok(RecordInfo {
        format: FORMAT_V1,
        suite: view.suite,
        key_version: view.version,
        plaintext_len: view.payload.len(),
    })
}

/// What the header of a record or a stream says, readable without any key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeaderInfo {
    /// Record or stream.
    pub kind: HeaderKind,
    /// The AEAD suite.
    pub suite: Suite,
    /// Master key version that wrapped the data key.
    pub key_version: u32,
    /// Length of the header in bytes (100 for a record, 111 for a stream).
    pub header_len: usize,
    /// Plaintext bytes per segment (streams only).
    pub segment_size: Option<u32>,
}

/// Reads the header at the start of `bytes`, a record's or a stream's,
/// without any key. Only the header needs to be present: this is what a
/// rewrap job uses for objects whose payload it never reads.
///
/// ```
/// # use keyfold_core::{format::{inspect_header, HeaderKind}, record, EncryptionContext, MasterKey, SecretKey, Suite};
/// let key = MasterKey::new(3, SecretKey::generate()?);
/// let ct = record::encrypt(&key, Suite::default(), &EncryptionContext::new(), b"hi")?;
/// let info = inspect_header(&ct[..keyfold_core::format::HEADER_LEN])?;
/// assert_eq!((info.kind, info.key_version), (HeaderKind::Record, 3));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`FormatError`] when the bytes do not start with a well-formed header.
pub fn inspect_header(bytes: &[u8]) -> Result<HeaderInfo, FormatError> {
    let view = HeaderView::parse_prefix(bytes)?;
    Ok(HeaderInfo {
        kind: view.kind,
        suite: view.suite,
        key_version: view.version,
        header_len: view.bytes.len(),
        segment_size: (view.kind == HeaderKind::Stream).then_some(view.segment_size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_constants() {
        assert_eq!(IMMUTABLE_END, 36);
        assert_eq!(WRAPPED_KEY_AT, 52);
        assert_eq!(HEADER_LEN, 100);
        assert_eq!(RECORD_OVERHEAD, 116);
        assert_eq!(REWRAP_PART_LEN, 64);
        assert_eq!(STREAM_IMMUTABLE_END, 47);
        assert_eq!(STREAM_HEADER_LEN, 111);
    }

    #[test]
    fn each_bad_input_has_its_own_error() {
        let mut good = vec![0u8; RECORD_OVERHEAD];
        good[..4].copy_from_slice(&[b'K', b'F', 1, 1]);
        assert!(RecordView::parse(&good).is_ok());

        assert!(matches!(
            RecordView::parse(&good[..1]),
            Err(FormatError::TooShort { what: "magic", .. })
        ));
        assert!(matches!(
            RecordView::parse(&good[..RECORD_OVERHEAD - 1]),
            Err(FormatError::TooShort {
                what: "payload tag",
                ..
            })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(RecordView::parse(&bad).err(), Some(FormatError::BadMagic));
        let mut bad = good.clone();
        bad[2] = 9;
        assert_eq!(
            RecordView::parse(&bad).err(),
            Some(FormatError::UnknownVersion(9))
        );
        let mut bad = good.clone();
        bad[3] = 0x7f;
        assert_eq!(
            RecordView::parse(&bad).err(),
            Some(FormatError::UnknownSuite(0x7f))
        );
    }
}
