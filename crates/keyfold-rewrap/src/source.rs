//! What the host implements: one [`RowSource`] per table.

use async_trait::async_trait;
use keyfold_core::EncryptionContext;

/// An error from the host's store. Transient errors are retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// What failed.
    pub message: String,
    /// Worth retrying (connection lost, lock timeout...).
    pub transient: bool,
}

impl SourceError {
    /// A transient error (retried).
    pub fn transient(message: impl Into<String>) -> Self {
        SourceError {
            message: message.into(),
            transient: true,
        }
    }

    /// A permanent error (not retried).
    pub fn permanent(message: impl Into<String>) -> Self {
        SourceError {
            message: message.into(),
            transient: false,
        }
    }
}

/// One stored record as the job sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The row's id (primary key), used for compare-and-swap and sharding.
    pub id: String,
    /// An opaque position: [`RowSource::fetch`] returns rows after it, in order.
    pub cursor: String,
    /// The encryption context the record is bound to.
    pub context: EncryptionContext,
    /// The keyfold record, a whole stream object, or **only the header**
    /// of either (a header-only row: the payload lives elsewhere, e.g. in
    /// object storage). A header-only row is rewrapped without its payload
    /// and verified by opening the new wrap and its commitment; it cannot
    /// be re-encrypted.
    pub ciphertext: Vec<u8>,
}

impl Row {
    /// True when [`ciphertext`](Self::ciphertext) is exactly a record's or a
    /// stream's header, with no payload.
    ///
    /// ```
    /// use keyfold_core::{record, EncryptionContext, MasterKey, SecretKey, Suite};
    /// use keyfold_rewrap::Row;
    /// let key = MasterKey::new(1, SecretKey::generate()?);
    /// let ct = record::encrypt(&key, Suite::default(), &EncryptionContext::new(), b"x")?;
    /// let row = |ciphertext: Vec<u8>| Row {
    ///     id: "1".into(), cursor: "1".into(), context: EncryptionContext::new(), ciphertext,
    /// };
    /// assert!(!row(ct.clone()).is_header_only());
    /// assert!(row(ct[..keyfold_core::format::HEADER_LEN].to_vec()).is_header_only());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_header_only(&self) -> bool {
        keyfold_core::format::inspect_header(&self.ciphertext)
            .is_ok_and(|info| info.header_len == self.ciphertext.len())
    }
}

/// Outcome of a compare-and-swap write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// The row held the expected ciphertext and now holds the new one.
    Swapped,
    /// The row changed (or vanished) since it was read; nothing was written.
    Conflict,
}

/// One write of a batch compare-and-swap
/// ([`RowSource::compare_and_swap_many`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CasWrite<'a> {
    /// The row's id.
    pub id: &'a str,
    /// The ciphertext the row must still hold.
    pub expected: &'a [u8],
    /// The ciphertext to write.
    pub new: &'a [u8],
}

impl std::fmt::Debug for CasWrite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ciphertexts are not secret, but they are long: lengths only.
        f.debug_struct("CasWrite")
            .field("id", &self.id)
            .field("expected_len", &self.expected.len())
            .field("new_len", &self.new.len())
            .finish()
    }
}

/// A table of encrypted records. Implemented by the host over its storage.
#[async_trait]
pub trait RowSource: Send + Sync {
    /// A stable name, used in checkpoints and reports (e.g. the table name).
    fn name(&self) -> &str;

    /// Up to `limit` rows after `after` (from the start when `None`), in
    /// cursor order. Fewer than `limit` rows means the source is exhausted.
    ///
    /// # Errors
    /// [`SourceError`]; transient ones are retried.
    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError>;

    /// The row `id` as it is now, or `None` if it no longer exists (used to
    /// retry after a conflict).
    ///
    /// # Errors
    /// [`SourceError`].
    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError>;

    /// Writes `new` to row `id` only if it still holds `expected`.
    ///
    /// # Errors
    /// [`SourceError`]; transient ones are retried.
    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError>;

    /// Writes a whole batch: each `new` goes to its row only if the row still
    /// holds its `expected`. Returns one outcome per write, in order. The ids
    /// of one call are distinct.
    ///
    /// The default calls [`compare_and_swap`](Self::compare_and_swap) once per
    /// write. A store that can do it in one statement (PostgreSQL's
    /// `UPDATE … FROM unnest(…) … RETURNING id`) should override it: the job
    /// calls this once per batch and source, so a batch then costs two round
    /// trips (the fetch and this write) instead of one per row. Each write
    /// still succeeds or conflicts on its own; the call need not be atomic.
    ///
    /// # Errors
    /// [`SourceError`]; transient ones are retried (the whole batch again:
    /// writes that went through then conflict, and are re-read).
    async fn compare_and_swap_many(
        &self,
        writes: &[CasWrite<'_>],
    ) -> Result<Vec<CasOutcome>, SourceError> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(self.compare_and_swap(w.id, w.expected, w.new).await?);
        }
        Ok(out)
    }

    /// How many rows remain after `after`, if the host can count them cheaply
    /// (for the progress estimate).
    async fn count_after(&self, _after: Option<&str>) -> Option<u64> {
        None
    }
}
