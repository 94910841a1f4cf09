//! Layer 2, key wrapping: the [`KeyWrapper`] trait every KMS provider
//! implements, its error kinds ([`error::WrapError`]), the local KEK
//! ([`local::LocalKek`]), the retry helper, provider configs and the
//! onboarding probe (docs/LIFECYCLE.md, "Onboarding").
//!
//! It builds on the format layer ([`crate::format`]: secret key types, the
//! random generator) and knows nothing of the keyring ([`crate::keyring`]):
//! no lifecycle states, no stores, no audit events.
//!
//! The `KeyWrapper` trait is the one seam between keyfold and a KMS. Shaped
//! like age's `Recipient`/`Identity`: a provider wraps and unwraps a 32-byte
//! master key and emits a small typed record, [`WrappedKey`].

pub mod config;
pub mod error;
pub mod local;
pub mod observe;
pub mod probe;
pub mod retry;

pub use error::{WrapError, WrapErrorKind, WrapOperation};

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::format::secret::SecretKey;

/// What a wrap is bound to: the keyring (tenant) and the master key version.
/// Providers that take a context pass it to the KMS (AWS encryption context,
/// GCP additional authenticated data), so a wrapped key moved to another
/// tenant or version fails at the KMS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WrapContext {
    /// The keyring's id (one per tenant).
    pub keyring_id: String,
    /// The master key version being wrapped.
    pub key_version: u32,
}

impl WrapContext {
    /// A context for `key_version` of keyring `keyring_id`.
    pub fn new(keyring_id: impl Into<String>, key_version: u32) -> Self {
        WrapContext {
            keyring_id: keyring_id.into(),
            key_version,
        }
    }

    /// The context as string pairs (for AWS KMS's encryption context).
    pub fn pairs(&self) -> [(&'static str, String); 2] {
        [
            ("keyfold:keyring", self.keyring_id.clone()),
            ("keyfold:version", self.key_version.to_string()),
        ]
    }

    /// The context as canonical bytes (for providers that take AAD):
    /// `"keyfold/v1/wrap-context" || u32 len || keyring_id || u32 version`.
    pub fn to_aad(&self) -> Vec<u8> {
        let label = b"keyfold/v1/wrap-context";
        let id = self.keyring_id.as_bytes();
        let mut out = Vec::with_capacity(label.len() + 8 + id.len());
        out.extend_from_slice(label);
        out.extend_from_slice(&(id.len() as u32).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out
    }
}

/// A master key wrapped by a KMS: what a keyring stores per version.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Provider name: `local`, `aws`, `gcp`, `azure`.
    pub provider: String,
    /// The KMS key that wrapped it (ARN, resource name, key URL, KEK id).
    pub key_ref: String,
    /// The provider's key version that wrapped it, where the provider reports
    /// one (GCP CryptoKeyVersion name, Azure key `kid`).
    pub kms_key_version: Option<String>,
    /// The wrapped bytes, opaque to keyfold.
    #[serde(with = "crate::wrap::base64_bytes")]
    pub bytes: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("provider", &self.provider)
            .field("key_ref", &self.key_ref)
            .field("kms_key_version", &self.kms_key_version)
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .finish()
    }
}

/// Wraps and unwraps 32-byte master keys under a KMS key.
///
/// Only this is async: record encryption is synchronous CPU work. Implement
/// it for a new KMS and run the conformance suite (`testkit` feature) on it.
///
/// ```
/// use keyfold_core::{KeyWrapper, LocalKek, SecretKey, WrapContext};
/// # tokio_test_block_on(async {
/// let kek = LocalKek::from_bytes("dev-kek", SecretKey::generate()?);
/// let ctx = WrapContext::new("tenant-a", 1);
/// let master = SecretKey::generate()?;
/// let wrapped = kek.wrap(&master, &ctx).await?;
/// let back = kek.unwrap(&wrapped, &ctx).await?;
/// assert_eq!(back.expose(), master.expose());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[async_trait]
pub trait KeyWrapper: Send + Sync + fmt::Debug {
    /// Provider name recorded in [`WrappedKey::provider`].
    fn provider(&self) -> &str;

    /// The KMS key this wrapper uses.
    fn key_ref(&self) -> &str;

    /// Wraps `key` under the KMS key, bound to `context`.
    ///
    /// # Errors
    /// [`WrapError`] with a kind the caller can act on.
    async fn wrap(&self, key: &SecretKey, context: &WrapContext) -> Result<WrappedKey, WrapError>;

    /// Unwraps what [`wrap`](Self::wrap) produced with the same `context`.
    ///
    /// # Errors
    /// [`WrapError`]; [`KeyMismatch`](crate::WrapErrorKind::KeyMismatch) when
    /// `wrapped` names another key than this wrapper's.
    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SecretKey, WrapError>;
}

macro_rules! forward_key_wrapper {
    ($ty:ty) => {
        #[deny(clippy::missing_trait_methods)]
        #[async_trait]
        impl<T: KeyWrapper + ?Sized> KeyWrapper for $ty {
            fn provider(&self) -> &str {
                (**self).provider()
            }
            fn key_ref(&self) -> &str {
                (**self).key_ref()
            }
            async fn wrap(
                &self,
                key: &SecretKey,
                context: &WrapContext,
            ) -> Result<WrappedKey, WrapError> {
                (**self).wrap(key, context).await
            }
            async fn unwrap(
                &self,
                wrapped: &WrappedKey,
                context: &WrapContext,
            ) -> Result<SecretKey, WrapError> {
                (**self).unwrap(wrapped, context).await
            }
        }
    };
}

forward_key_wrapper!(Arc<T>);
forward_key_wrapper!(Box<T>);

pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
