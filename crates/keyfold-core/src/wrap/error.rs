//! The wrapping layer's error: a provider failure with a kind every provider
//! maps its own errors onto, and a source (as object_store's
//! `Generic { store, source }`). Never carries key material.

use std::fmt;
use std::time::Duration;

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
