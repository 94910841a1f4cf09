//! The caller's encryption context and its canonical encoding.
//!
//! The context names where a record belongs (tenant, table, row id, column).
//! It is never stored in the record; it is authenticated as associated data, so
//! a record copied to another row or tenant fails to decrypt. The encoding is
//! length-prefixed and sorted by key, so it is unambiguous:
//! `{"a": "bc"}` and `{"ab": "c"}` encode differently (docs/FORMAT.md, "Context").

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Most entries a context may have.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// Longest key or value, in bytes.
pub const MAX_CONTEXT_FIELD_LEN: usize = 4096;

/// Key/value pairs bound to a record as associated data.
///
/// ```
/// use keyfold_core::EncryptionContext;
/// let ctx = EncryptionContext::new()
///     .with("tenant", "acme")
///     .with("table", "secrets")
///     .with("row", 42u64.to_be_bytes());
/// assert_eq!(ctx.len(), 3);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionContext(BTreeMap<String, Vec<u8>>);

/// A context that is too large to encode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// More than [`MAX_CONTEXT_ENTRIES`] entries.
    #[error("encryption context has {0} entries, more than the maximum {MAX_CONTEXT_ENTRIES}")]
    TooManyEntries(usize),
    /// A key or value longer than [`MAX_CONTEXT_FIELD_LEN`].
    #[error("encryption context field is {0} bytes, more than the maximum {MAX_CONTEXT_FIELD_LEN}")]
    FieldTooLong(usize),
}

impl EncryptionContext {
    /// An empty context. Prefer binding at least the tenant and row.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces `key`.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds or replaces `key`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl AsRef<[u8]>) {
        self.0.insert(key.into(), value.as_ref().to_vec());
    }

    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in canonical (sorted) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The canonical encoding: `u16 count`, then per entry in key order
    /// `u16 key_len || key || u16 value_len || value` (big-endian).
    ///
    /// # Errors
    /// [`ContextError`] when the context exceeds the limits.
    pub fn encode(&self) -> Result<Vec<u8>, ContextError> {
        if self.0.len() > MAX_CONTEXT_ENTRIES {
            return Err(ContextError::TooManyEntries(self.0.len()));
        }
        let mut out = Vec::with_capacity(
            2 + self
                .0
                .iter()
                .map(|(k, v)| 4 + k.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for (key, value) in &self.0 {
            for field in [key.as_bytes(), value.as_slice()] {
                let len = u16::try_from(field.len())
                    .ok()
                    .filter(|&l| usize::from(l) <= MAX_CONTEXT_FIELD_LEN)
                    .ok_or(ContextError::FieldTooLong(field.len()))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(field);
            }
        }
        Ok(out)
    }
}

impl fmt::Debug for EncryptionContext {
    // Context values are not secret, but may be personal data: print keys and lengths only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, format!("<{} bytes>", v.len()))),
            )
            .finish()
    }
}

impl<K: Into<String>, V: AsRef<[u8]>> FromIterator<(K, V)> for EncryptionContext {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut ctx = Self::new();
        for (k, v) in iter {
            ctx.insert(k, v);
        }
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_unambiguous() {
        let a = EncryptionContext::new().with("ab", "c").encode().unwrap();
        let b = EncryptionContext::new().with("a", "bc").encode().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn encoding_is_order_independent() {
        let a = EncryptionContext::new().with("x", "1").with("y", "2");
        let b = EncryptionContext::new().with("y", "2").with("x", "1");
        assert_eq!(a.encode().unwrap(), b.encode().unwrap());
        assert_eq!(
            a.encode().unwrap(),
            [0, 2, 0, 1, b'x', 0, 1, b'1', 0, 1, b'y', 0, 1, b'2']
        );
    }

    #[test]
    fn limits_are_enforced() {
        let long = EncryptionContext::new().with("k", vec![0u8; MAX_CONTEXT_FIELD_LEN + 1]);
        assert_eq!(
            long.encode(),
            Err(ContextError::FieldTooLong(MAX_CONTEXT_FIELD_LEN + 1))
        );
        let many: EncryptionContext = (0..=MAX_CONTEXT_ENTRIES)
            .map(|i| (i.to_string(), "v"))
            .collect();
        assert_eq!(
            many.encode(),
            Err(ContextError::TooManyEntries(MAX_CONTEXT_ENTRIES + 1))
        );
    }
}
