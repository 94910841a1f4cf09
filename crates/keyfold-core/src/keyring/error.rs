//! The crate-level error. It belongs to the keyring layer, the top one: it
//! composes the format layer's [`CryptoError`] (one variant each, so a
//! caller matches `Error::Decrypt` whether it came from a record function or
//! a keyring), the wrapping layer's [`WrapError`] and the stores'
//! [`StoreError`], and adds the lifecycle's own failures.

use crate::format::context::ContextError;
use crate::format::error::{CryptoError, FormatError, StreamError};
use crate::format::rng::RngError;
use crate::wrap::error::{WrapError, WrapErrorKind};

use std::time::Duration;

use super::state::{KeyState, StateError, Transition};
use super::store::StoreError;
use super::time::Timestamp;

/// Everything that can go wrong in keyfold-core: the keyring layer's own
/// failures, composing the lower layers' errors ([`CryptoError`] variant by
/// variant, [`WrapError`], [`StoreError`]). The crate root re-exports it as
/// `keyfold_core::Error`; the format and wrapping layers never name it.
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
    /// A destroy (or a schedule for one) was refused; nothing changed.
    #[error("destroy of master key version {version} refused: {reason}{}", .allowed_at.map(|t| format!("; allowed from {t}")).unwrap_or_default())]
    DestroyRefused {
        /// The version.
        version: u32,
        /// Why.
        reason: DestroyRefusal,
        /// When a destroy will be allowed, when that depends only on time
        /// (the grace period, or evidence to gather again after it).
        allowed_at: Option<Timestamp>,
    },
    /// An operator sealed the keyring ([`Keyring::seal`](crate::Keyring::seal)):
    /// nothing is encrypted or decrypted until an operator unseals it.
    #[error("keyring sealed by an operator since {since}: {reason}")]
    SealedByOperator {
        /// Since when.
        since: Timestamp,
        /// The reason the operator gave.
        reason: String,
    },
    /// A ciphertext sealed longer ago than the keyring's write window, under
    /// a version no longer active: persisting it now could put a record on a
    /// version whose destruction is being authorized. Encrypt it again.
    #[error(
        "ciphertext under master key version {version} was sealed {}ms ago, past the write window of {}ms, and the version is no longer active: encrypt again",
        .sealed_ago.as_millis(), .window.as_millis()
    )]
    WriteWindowExpired {
        /// The version the ciphertext is under.
        version: u32,
        /// How long ago it was sealed.
        sealed_ago: Duration,
        /// The keyring's write window.
        window: Duration,
    },
    /// The version is below the keyring's minimum decryption version and may
    /// not be enabled again.
    #[error("master key version {version} is below the minimum decryption version {min}")]
    BelowMinDecryptionVersion {
        /// The version.
        version: u32,
        /// The minimum decryption version.
        min: u32,
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

/// Why a destroy was refused (in [`Error::DestroyRefused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DestroyRefusal {
    /// The evidence is about another keyring.
    #[error("the evidence is about keyring {keyring_id:?}")]
    OtherKeyring {
        /// The keyring the evidence names.
        keyring_id: String,
    },
    /// The evidence is about another version.
    #[error("the evidence is about version {version}")]
    OtherVersion {
        /// The version the evidence names.
        version: u32,
    },
    /// The evidence was gathered before every instance had stopped writing
    /// under the version: before it was disabled, or within max staleness
    /// plus write window (plus one second) of its retirement. Gather it
    /// again after `needed_after`.
    #[error(
        "the evidence ({checked_at}) was gathered too soon: records may still reach storage under the version until {needed_after}; gather it again after that"
    )]
    EvidenceTooEarly {
        /// When the evidence was gathered.
        checked_at: Timestamp,
        /// The evidence must be gathered after this.
        needed_after: Timestamp,
    },
    /// The version has not been disabled for the keyring's destroy grace
    /// period yet; enabling it cancels.
    #[error("the version was disabled at {disabled_at}; the grace period runs until {until}")]
    GracePeriod {
        /// When it was disabled.
        disabled_at: Timestamp,
        /// When the grace period ends.
        until: Timestamp,
    },
    /// The evidence is dated later than this host's clock allows (beyond
    /// one second of skew): a scan cannot have finished in the future.
    #[error("the evidence is dated {checked_at}, after now ({now})")]
    EvidenceFromTheFuture {
        /// When the evidence says it was gathered.
        checked_at: Timestamp,
        /// This host's time.
        now: Timestamp,
    },
    /// The stored version is `Disabled` but has no disable time: the
    /// destroy rules cannot be applied.
    #[error("the version is disabled but its disable time is missing from the store")]
    NoDisableTime,
    /// A forced destroy must give a reason for the audit trail.
    #[error("a forced destroy needs a reason")]
    ForcedWithoutReason,
    /// A destroy can only be scheduled for a disabled version.
    #[error("only a disabled version can be scheduled for destruction; it is {state}")]
    NotDisabled {
        /// Its state.
        state: KeyState,
    },
}

impl Error {
    /// A short stable name for the failure, for metrics labels and trace
    /// fields (`sealed`, `conflict`, `destroy_refused`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Format(_) => "format",
            Error::Decrypt => "decrypt",
            Error::Encrypt => "encrypt",
            Error::VersionMismatch { .. } => "version_mismatch",
            Error::Context(_) => "context",
            Error::PlaintextTooLarge { .. } => "plaintext_too_large",
            Error::Wrap(_) => "kms",
            Error::Rng(_) => "rng",
            Error::KeyState { .. } => "key_state",
            Error::KeyDestroyed { .. } => "key_destroyed",
            Error::KeyCheckFailed { .. } => "key_check_failed",
            Error::UnknownVersion { .. } => "unknown_version",
            Error::NoActiveVersion => "no_active_version",
            Error::Sealed { .. } => "sealed",
            Error::SealedByOperator { .. } => "sealed_by_operator",
            Error::IllegalTransition { .. } => "illegal_transition",
            Error::Conflict { .. } => "conflict",
            Error::DestroyRefused { .. } => "destroy_refused",
            Error::WriteWindowExpired { .. } => "write_window_expired",
            Error::BelowMinDecryptionVersion { .. } => "below_min_decryption_version",
            Error::VersionsExhausted => "versions_exhausted",
            Error::KeyringExists(_) => "keyring_exists",
            Error::KeyringNotFound(_) => "keyring_not_found",
            Error::Store(_) => "store",
            Error::Stream(_) => "stream",
            Error::Io(_) => "io",
        }
    }
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Self {
        match e {
            StateError::VersionsExhausted => Error::VersionsExhausted,
            StateError::UnknownVersion { version } => Error::UnknownVersion { version },
            StateError::IllegalTransition {
                version,
                from,
                transition,
            } => Error::IllegalTransition {
                version,
                from,
                transition,
            },
        }
    }
}

impl From<CryptoError> for Error {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::Format(e) => Error::Format(e),
            CryptoError::Decrypt => Error::Decrypt,
            CryptoError::Encrypt => Error::Encrypt,
            CryptoError::VersionMismatch { record, supplied } => {
                Error::VersionMismatch { record, supplied }
            }
            CryptoError::Context(e) => Error::Context(e),
            CryptoError::PlaintextTooLarge { len, max } => Error::PlaintextTooLarge { len, max },
            CryptoError::Rng(e) => Error::Rng(e),
            CryptoError::Stream(e) => Error::Stream(e),
            CryptoError::Io(e) => Error::Io(e),
        }
    }
}

impl From<std::io::Error> for Error {
    /// Recovers a keyfold error carried through an `io::Error` by the
    /// stream adapters; any other I/O error becomes [`Error::Io`].
    fn from(e: std::io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let kind = e.kind();
            return match e.into_inner().map(|inner| inner.downcast::<Error>()) {
                Some(Ok(err)) => *err,
                Some(Err(other)) => Error::Io(std::io::Error::new(kind, other)),
                None => Error::Io(kind.into()),
            };
        }
        CryptoError::from(e).into()
    }
}

impl From<Error> for std::io::Error {
    /// Carries a keyfold [`Error`] through `std::io`: a truncation maps to
    /// `UnexpectedEof`, an authentication failure to `InvalidData`;
    /// `Error::from` gets it back.
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
