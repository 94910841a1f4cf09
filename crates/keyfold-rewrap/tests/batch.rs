//! The job writes each batch with one `compare_and_swap_many` per source.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keyfold_rewrap::{CasOutcome, CasWrite, RewrapJob, Row, RowSource, SourceError};
use support::{Switchable, Table, admin, keyring};

/// A table whose per-row compare-and-swap is refused: only the batch call works.
struct BatchOnly {
    table: Arc<Table>,
    batch_calls: AtomicU64,
    largest: AtomicU64,
}

#[async_trait]
impl RowSource for BatchOnly {
    fn name(&self) -> &str {
        self.table.name()
    }
    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        self.table.fetch(after, limit).await
    }
    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        self.table.get(id).await
    }
    async fn compare_and_swap(
        &self,
        _id: &str,
        _expected: &[u8],
        _new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        Err(SourceError::permanent("per-row write called"))
    }
    async fn compare_and_swap_many(
        &self,
        writes: &[CasWrite<'_>],
    ) -> Result<Vec<CasOutcome>, SourceError> {
        self.batch_calls.fetch_add(1, Ordering::SeqCst);
        self.largest
            .fetch_max(writes.len() as u64, Ordering::SeqCst);
        let mut out = Vec::new();
        for w in writes {
            out.push(self.table.compare_and_swap(w.id, w.expected, w.new).await?);
        }
        Ok(out)
    }
}

#[tokio::test(start_paused = true)]
async fn each_batch_is_written_with_one_batch_call() {
    let ring = keyring(Arc::new(Switchable::new()), Duration::from_secs(3600)).await;
    let table = Table::new("a");
    table.fill(&ring, 250).await;
    ring.rotate(&admin()).await.unwrap();
    let source = Arc::new(BatchOnly {
        table: table.clone(),
        batch_calls: AtomicU64::new(0),
        largest: AtomicU64::new(0),
    });
    let mut job = RewrapJob::builder(ring.clone(), vec![source.clone() as Arc<dyn RowSource>])
        .create()
        .unwrap();
    let mut batches = 0;
    while let Some(report) = job.next_batch().await.unwrap() {
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        batches += 1;
    }
    let totals = job.checkpoint().totals();
    assert_eq!((totals.rewrapped, totals.failed), (250, 0));
    assert_eq!(table.versions(), [(2, 250)].into());
    // 100 + 100 + 50 rows: three writes; the last, empty fetch writes nothing.
    assert_eq!(batches, 3);
    assert_eq!(source.batch_calls.load(Ordering::SeqCst), 3);
    assert_eq!(source.largest.load(Ordering::SeqCst), 100);
    table.assert_all_decrypt(&ring).await;
}
