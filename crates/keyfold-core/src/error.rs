//! Errors, layered as rustls and object_store do: a detailed format error, a
//! provider error with a kind and a source, and an opaque decryption failure.

use std::fmt;
use std::time::Duration;

use crate::context::ContextError;
use crate::keyring::{KeyState, Transition};
use crate::rng::RngError;
use crate::store::StoreError;
use crate::time::Timestamp;

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

/// What kind of failure a [`KeyWrapper`](crate::KeyWrapper) reported. Every
/// provider maps its own errors onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WrapErrorKind {
    /// The caller's identity may not use the key.
    AccessDenied,
    /// The key (or key version) does not exist.
    NotFound,
    /// The key exists but is disabled or pending deletion.
    KeyDisabled,
    /// Rate limited; transient. `retry_after` may say how long to wait.
    Throttled,
    /// Network failure, timeout or server error; transient.
    Unavailable,
    /// The wrapped bytes are corrupt, tampered, or bound to another context.
    InvalidCiphertext,
    /// The wrapped key names a different key than this wrapper's.
    KeyMismatch,
    /// The wrapper's configuration is wrong (bad key reference, refused credentials...).
    Misconfigured,
}

impl WrapErrorKind {
    /// True for kinds worth retrying: [`Throttled`](Self::Throttled) and [`Unavailable`](Self::Unavailable).
    pub fn is_transient(self) -> bool {
        matches!(self, WrapErrorKind::Throttled | WrapErrorKind::Unavailable)
    }
}

impl fmt::Display for WrapErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WrapErrorKind::AccessDenied => "access denied",
            WrapErrorKind::NotFound => "key not found",
            WrapErrorKind::KeyDisabled => "key disabled",
            WrapErrorKind::Throttled => "throttled",
            WrapErrorKind::Unavailable => "KMS unavailable",
            WrapErrorKind::InvalidCiphertext => "invalid wrapped key",
            WrapErrorKind::KeyMismatch => "wrapped under another key",
            WrapErrorKind::Misconfigured => "misconfigured",
        })
    }
}

/// Which KMS operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WrapOperation {
    /// Wrapping (encrypting) a master key.
    Wrap,
    /// Unwrapping (decrypting) a master key.
    Unwrap,
    /// Building or validating the wrapper.
    Configure,
}

impl fmt::Display for WrapOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WrapOperation::Wrap => "wrap",
            WrapOperation::Unwrap => "unwrap",
            WrapOperation::Configure => "configure",
        })
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A [`KeyWrapper`](crate::KeyWrapper) failed. Says which provider, key and
/// operation; never contains key material.
#[derive(Debug, thiserror::Error)]
#[error("{provider} {operation} with key {key_ref} failed: {kind}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct WrapError {
    /// The failure kind.
    pub kind: WrapErrorKind,
    /// Provider name (`local`, `aws`, `gcp`, `azure`).
    pub provider: String,
    /// The key reference the wrapper was using.
    pub key_ref: String,
    /// The failing operation.
    pub operation: WrapOperation,
    /// A short human-readable detail.
    pub message: Option<String>,
    /// How long the provider asked us to wait (throttling).
    pub retry_after: Option<Duration>,
    /// The provider SDK's error.
    #[source]
    pub source: Option<Source>,
}

impl WrapError {
    /// A new error of `kind`.
    pub fn new(
        kind: WrapErrorKind,
        provider: impl Into<String>,
        key_ref: impl Into<String>,
        operation: WrapOperation,
    ) -> Self {
        WrapError {
            kind,
            provider: provider.into(),
            key_ref: key_ref.into(),
            operation,
            message: None,
            retry_after: None,
            source: None,
        }
    }

    /// Adds a detail message.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Adds the provider's error as the source.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Adds the provider's requested wait.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// True when retrying may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

/// Everything that can go wrong in keyfold-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    /// The KMS wrapper failed.
    #[error(transparent)]
    Wrap(#[from] WrapError),
    /// The OS random generator failed.
    #[error(transparent)]
    Rng(#[from] RngError),
    /// The master key version's state does not allow this use (e.g. a
    /// disabled version cannot decrypt, a retired one cannot be a rewrap target).
    #[error("master key version {version} is {state}: not allowed for this operation")]
    KeyState {
        /// The version.
        version: u32,
        /// Its state.
        state: KeyState,
    },
    /// The master key version was destroyed: its records can never be decrypted.
    #[error("master key version {version} was destroyed")]
    KeyDestroyed {
        /// The version.
        version: u32,
    },
    /// The key unwrapped for a master key version does not match the key
    /// check value stored when the version was created: the stored wrapped
    /// key belongs to another version or keyring (a tampered store, with a
    /// KMS that does not bind the wrap context). The key is not used.
    #[error(
        "master key version {version} failed its key check: the wrapped key stored for it is not this keyring's version {version}"
    )]
    KeyCheckFailed {
        /// The version.
        version: u32,
    },
    /// The keyring has no such version.
    #[error("the keyring has no master key version {version}")]
    UnknownVersion {
        /// The version asked for.
        version: u32,
    },
    /// The keyring has no active version yet: rotate first.
    #[error("the keyring has no active master key version; rotate to create one")]
    NoActiveVersion,
    /// The KMS refused or could not be reached: the keyring is sealed.
    /// Versions still cached keep working until their TTL; `unseal` retries.
    #[error(
        "keyring sealed since {since}: the KMS failed ({kind}); cached versions still work, unseal to retry"
    )]
    Sealed {
        /// The KMS failure that sealed it.
        kind: WrapErrorKind,
        /// Since when.
        since: Timestamp,
    },
    /// A lifecycle transition the state machine does not allow; nothing changed.
    #[error("cannot {transition} master key version {version}: it is {from}")]
    IllegalTransition {
        /// The version.
        version: u32,
        /// Its state.
        from: KeyState,
        /// The transition refused.
        transition: Transition,
    },
    /// Another writer changed the keyring first; this change was not made.
    /// The keyring has reloaded the stored state: retry if still wanted.
    #[error(
        "the keyring changed in the store (expected revision {expected:?}, found {found:?}); nothing was changed"
    )]
    Conflict {
        /// The revision this change was based on.
        expected: Option<u64>,
        /// The revision the store held.
        found: Option<u64>,
    },
    /// A destroy was refused: the evidence does not show the version empty.
    #[error("destroy of master key version {version} refused: {reason}")]
    DestroyRefused {
        /// The version.
        version: u32,
        /// Why.
        reason: String,
    },
    /// All 2^32 - 1 version numbers have been used.
    #[error("master key version numbers exhausted")]
    VersionsExhausted,
    /// Creating a keyring whose id the store already holds.
    #[error("keyring {0} already exists")]
    KeyringExists(String),
    /// Opening a keyring the store does not hold.
    #[error("keyring {0} not found")]
    KeyringNotFound(String),
    /// The keyring store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stream (segmented object) was rejected (docs/FORMAT.md, "Streaming").
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The reader or writer under a stream failed.
    #[error("stream I/O failed: {0}")]
    Io(#[source] std::io::Error),
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

impl From<std::io::Error> for Error {
    /// Recovers a keyfold [`Error`] carried through an `io::Error` by the
    /// stream adapters; any other I/O error becomes [`Error::Io`].
    fn from(e: std::io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return Error::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(err)) => *err,
            Some(Err(other)) => Error::Io(std::io::Error::new(kind, other)),
            // Checked above: there is an inner error.
            None => Error::Io(kind.into()),
        }
    }
}

impl From<Error> for std::io::Error {
    /// Carries a keyfold [`Error`] through `std::io` (the `Read`/`Write`
    /// adapters): a truncation maps to `UnexpectedEof`, an authentication
    /// failure to `InvalidData`; `Error::from` gets it back.
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            Error::Io(io) => return std::io::Error::new(io.kind(), e),
            Error::Stream(StreamError::Truncated { .. }) => ErrorKind::UnexpectedEof,
            Error::Stream(StreamError::Range { .. }) => ErrorKind::InvalidInput,
            Error::Stream(_) | Error::Decrypt | Error::Format(_) => ErrorKind::InvalidData,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
