//! The CLI's errors and exit codes (documented in the crate README and `--help`).

use keyfold_core::Error as CoreError;
use keyfold_core::store::StoreError;

/// What went wrong, as an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// 1: anything not below (I/O, store, database).
    Failure,
    /// 2: bad arguments, URL or configuration.
    Usage,
    /// 3: the input is not a keyfold ciphertext (or is cut short).
    NotCiphertext,
    /// 4: refused: no confirmation, or a file would be overwritten.
    Refused,
    /// 5: a keyring, version or job that does not exist.
    NotFound,
    /// 6: the lifecycle refuses the change (illegal transition, destroy
    /// without evidence, concurrent change, existing keyring).
    Lifecycle,
    /// 7: the KMS failed (probe, wrap, unwrap, sealed keyring).
    Kms,
    /// 8: the change was made but its audit event could not be written.
    Audit,
    /// 130: interrupted (Ctrl-C); a rewrap saved its checkpoint.
    Interrupted,
}

impl Kind {
    /// The process exit code.
    pub(crate) fn code(self) -> u8 {
        match self {
            Kind::Failure => 1,
            Kind::Usage => 2,
            Kind::NotCiphertext => 3,
            Kind::Refused => 4,
            Kind::NotFound => 5,
            Kind::Lifecycle => 6,
            Kind::Kms => 7,
            Kind::Audit => 8,
            Kind::Interrupted => 130,
        }
    }

    /// A stable name for `--json` output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Failure => "failure",
            Kind::Usage => "usage",
            Kind::NotCiphertext => "not_ciphertext",
            Kind::Refused => "refused",
            Kind::NotFound => "not_found",
            Kind::Lifecycle => "lifecycle",
            Kind::Kms => "kms",
            Kind::Audit => "audit",
            Kind::Interrupted => "interrupted",
        }
    }
}

/// A failed command: its exit code and a message for the operator (never
/// key material: messages come from keyfold's errors, which carry none).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct CliError {
    pub(crate) kind: Kind,
    pub(crate) message: String,
    /// keyfold's own stable error code (`destroy_refused`, `sealed`, ...).
    pub(crate) code: Option<&'static str>,
    /// Extra fields for the `--json` output.
    pub(crate) details: Option<serde_json::Value>,
}

impl CliError {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        CliError {
            kind,
            message: message.into(),
            code: None,
            details: None,
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }

    pub(crate) fn failure(message: impl Into<String>) -> Self {
        Self::new(Kind::Failure, message)
    }
}

/// The exit code a keyfold error deserves.
pub(crate) fn core_kind(e: &CoreError) -> Kind {
    match e {
        CoreError::Format(_) => Kind::NotCiphertext,
        CoreError::KeyringNotFound(_) | CoreError::UnknownVersion { .. } => Kind::NotFound,
        CoreError::KeyringExists(_)
        | CoreError::IllegalTransition { .. }
        | CoreError::DestroyRefused { .. }
        | CoreError::Conflict { .. }
        | CoreError::KeyState { .. }
        | CoreError::KeyDestroyed { .. }
        | CoreError::NoActiveVersion
        | CoreError::SealedByOperator { .. }
        | CoreError::WriteWindowExpired { .. }
        | CoreError::BelowMinDecryptionVersion { .. }
        | CoreError::VersionsExhausted => Kind::Lifecycle,
        CoreError::Wrap(_) | CoreError::Sealed { .. } | CoreError::KeyCheckFailed { .. } => {
            Kind::Kms
        }
        CoreError::Store(StoreError::Conflict { .. }) => Kind::Lifecycle,
        _ => Kind::Failure,
    }
}

impl From<CoreError> for CliError {
    fn from(e: CoreError) -> Self {
        let mut err = CliError::new(core_kind(&e), e.to_string());
        err.code = Some(e.code());
        err
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CoreError::Store(e).into()
    }
}
