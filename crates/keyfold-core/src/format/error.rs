//! The format layer's errors: a detailed parse error ([`FormatError`], as
//! rustls's `InvalidMessage`), stream rejections ([`StreamError`]) and
//! [`CryptoError`], which composes them with the deliberately opaque
//! authentication failure (as RustCrypto's `aead::Error`).

use super::context::ContextError;
use super::rng::RngError;

/// A record or header could not be parsed. Each variant is a distinct cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The input ends before a field it must hold.
    #[error("input too short: {what} needs {needed} bytes, {got} left")]
    TooShort {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        got: usize,
    },
    /// The input does not start with keyfold's magic bytes.
    #[error("not a keyfold record: bad magic bytes")]
    BadMagic,
    /// A format version this build does not know (written by a newer keyfold?).
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// A suite id this build does not know.
    #[error("unknown suite id {0:#04x}")]
    UnknownSuite(u8),
    /// A length field above its maximum.
    #[error("{what} is {len} bytes, more than the maximum {max}")]
    LengthExceeds {
        /// The field.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The maximum allowed.
        max: u64,
    },
    /// Bytes after the end of a structure that must end the input.
    #[error("{0} trailing bytes after the end of the structure")]
    TrailingData(usize),
}

/// Why a stream (a segmented object) was rejected. Data already released
/// from earlier segments was authentic, but a caller must not act on any of
/// it once the stream has failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The header declares a segment size outside the allowed bounds.
    #[error("segment size {size} is outside {min}..={max}")]
    SegmentSize {
        /// The declared segment size.
        size: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The stream ended before its final segment: it was cut (at a segment
    /// boundary or inside a segment's tag) or never finished by its writer.
    #[error("stream truncated: it ends after {segments} segments without its final segment")]
    Truncated {
        /// Segments that authenticated before the end.
        segments: u64,
    },
    /// A segment failed to authenticate: it was modified, moved, duplicated,
    /// or bytes were appended. Deliberately says no more than its index.
    #[error(
        "segment {index} failed to authenticate: the stream was modified, reordered or extended"
    )]
    Segment {
        /// Index of the segment (0-based).
        index: u64,
    },
    /// The stream needs more segments than its 32-bit counter can number.
    #[error("stream exceeds the maximum of {max} segments")]
    TooLong {
        /// The maximum number of segments.
        max: u64,
    },
    /// A byte range outside the plaintext.
    #[error("range {start}..{end} is outside the plaintext of {len} bytes")]
    Range {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
        /// Plaintext length.
        len: u64,
    },
    /// The operation needs the payload, but only a header was given.
    #[error("only a header was given; this operation needs the payload")]
    HeaderOnly,
    /// The stream was used after it finished or failed.
    #[error("the stream already finished or failed")]
    Finished,
}

/// What can go wrong in the format layer: sealing, opening and rewrapping
/// records and streams. Keyring operations return the crate-level
/// [`Error`](crate::Error), which has a variant of the same name for each of
/// these (`From<CryptoError>` maps them one to one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The record could not be parsed.
    #[error("malformed record: {0}")]
    Format(#[from] FormatError),
    /// Authentication failed: wrong key, wrong context, or tampered bytes.
    /// Deliberately says no more.
    #[error("decryption failed: wrong key or context, or the record was modified")]
    Decrypt,
    /// The AEAD refused to encrypt (input beyond its limits). Not expected
    /// within keyfold's own size limits.
    #[error("encryption failed: input beyond the AEAD's limits")]
    Encrypt,
    /// The record is on another master key version than the key supplied.
    #[error("record is on master key version {record}, but version {supplied} was supplied")]
    VersionMismatch {
        /// Version named by the record.
        record: u32,
        /// Version of the key supplied.
        supplied: u32,
    },
    /// The encryption context is too large.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A plaintext above the record size limit.
    #[error(
        "plaintext of {len} bytes is larger than the record limit of {max} bytes; use streaming"
    )]
    PlaintextTooLarge {
        /// Plaintext length.
        len: u64,
        /// Maximum.
        max: u64,
    },
    /// The OS random generator failed.
    #[error(transparent)]
    Rng(#[from] RngError),
    /// A stream (segmented object) was rejected (docs/FORMAT.md, "Streaming").
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The reader or writer under a stream failed.
    #[error("stream I/O failed: {0}")]
    Io(#[source] std::io::Error),
}

impl From<std::io::Error> for CryptoError {
    /// Recovers a [`CryptoError`] carried through an `io::Error` by the
    /// stream adapters; any other I/O error becomes [`CryptoError::Io`].
    fn from(e: std::io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<CryptoError>()) {
            return CryptoError::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<CryptoError>()) {
            Some(Ok(err)) => *err,
            Some(Err(other)) => CryptoError::Io(std::io::Error::new(kind, other)),
            // Checked above: there is an inner error.
            None => CryptoError::Io(kind.into()),
        }
    }
}

impl From<CryptoError> for std::io::Error {
    /// Carries a [`CryptoError`] through `std::io` (the `Read`/`Write`
    /// adapters): a truncation maps to `UnexpectedEof`, an authentication
    /// failure to `InvalidData`; `CryptoError::from` (or the crate-level
    /// `Error::from`) gets it back.
    fn from(e: CryptoError) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            CryptoError::Io(io) => return std::io::Error::new(io.kind(), e),
            CryptoError::Stream(StreamError::Truncated { .. }) => ErrorKind::UnexpectedEof,
            CryptoError::Stream(StreamError::Range { .. }) => ErrorKind::InvalidInput,
            CryptoError::Stream(_) | CryptoError::Decrypt | CryptoError::Format(_) => {
                ErrorKind::InvalidData
            }
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
