//! The job re-checks its target before every write (issue #16, defect 1):
//! a target disabled, force-destroyed or rolled back by another instance
//! while a batch runs stops the job before it writes anything more.
//!
//! Two `Keyring` instances share one store: `ops` (an operator's instance)
//! changes the keyring from inside the table's calls, mid-batch, and the
//! job's instance learns of it from the store's change notification
//! (`MemoryStore` notifies at once), or, over a store that sends none, from
//! a `refresh()`, before the job's next write. The check itself reads the
//! job's in-memory view: no store read per row.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;
use keyfold_core::keyring::{DestroyAuthorization, KeyState, Keyring};
use keyfold_core::store::{KeyringStore, MemoryStore};
use keyfold_core::testkit::Unwatched;
use keyfold_core::{Suite, format, record};
use keyfold_rewrap::{
    CasOutcome, JobError, JobOptions, JobProgress, RewrapJob, Row, RowSource, SourceError,
};
use support::*;

/// Something another instance does, mid-batch.
type Hook = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A table whose n-th fetch or n-th compare-and-swap (1-based) first runs
/// a hook.
struct Hooked {
    table: Arc<Table>,
    fetches: AtomicU64,
    cas: AtomicU64,
    on_fetch: Option<(u64, Hook)>,
    on_cas: Option<(u64, Hook)>,
}

impl Hooked {
    fn new(table: &Arc<Table>) -> Self {
        Hooked {
            table: Arc::clone(table),
            fetches: AtomicU64::new(0),
            cas: AtomicU64::new(0),
            on_fetch: None,
            on_cas: None,
        }
    }

    fn on_fetch(mut self, n: u64, hook: Hook) -> Arc<dyn RowSource> {
        self.on_fetch = Some((n, hook));
        Arc::new(self)
    }

    fn on_cas(mut self, n: u64, hook: Hook) -> Arc<dyn RowSource> {
        self.on_cas = Some((n, hook));
        Arc::new(self)
    }
}

#[async_trait]
impl RowSource for Hooked {
    fn name(&self) -> &str {
        self.table.name()
    }

    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        let rows = self.table.fetch(after, limit).await?;
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((at, hook)) = &self.on_fetch
            && *at == n
        {
            hook().await;
        }
        Ok(rows)
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        self.table.get(id).await
    }

    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        let n = self.cas.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((at, hook)) = &self.on_cas
            && *at == n
        {
            hook().await;
        }
        self.table.compare_and_swap(id, expected, new).await
    }
}

/// The job's instance and an operator's, over one store; version 1 holds
/// the table's rows and version 2 is active (the job's target).
async fn fleet(tables: &[&Arc<Table>]) -> (Arc<Keyring>, Arc<Keyring>) {
    fleet_on(Arc::new(MemoryStore::new()), tables).await
}

async fn fleet_on(
    store: Arc<dyn KeyringStore>,
    tables: &[&Arc<Table>],
) -> (Arc<Keyring>, Arc<Keyring>) {
    let wrapper = Arc::new(Switchable::new());
    let builder = || {
        Keyring::builder("tenant", wrapper.clone(), store.clone())
            .cache_ttl(Duration::from_secs(3600))
            .max_staleness(Duration::from_secs(3600))
    };
    let ops = Arc::new(builder().create().await.unwrap());
    ops.rotate(&admin()).await.unwrap();
    for t in tables {
        t.fill(&ops, 10).await;
    }
    ops.rotate(&admin()).await.unwrap();
    let job_ring = Arc::new(builder().open().await.unwrap());
    assert_eq!(job_ring.active_version(), Some(2));
    (job_ring, ops)
}

/// The operator rotates to version 3 and disables version 2 (the job's
/// target), then force-destroys it when `destroy`. The job's instance is
/// told by the store's notification, not by this hook.
fn retire_target(job_ring: &Arc<Keyring>, ops: &Arc<Keyring>, destroy: bool) -> Hook {
    retire_target_then(job_ring, ops, destroy, false)
}

/// As [`retire_target`]; then `refresh()`es the job's instance when
/// `refresh` (for a store that sends no notifications).
fn retire_target_then(
    job_ring: &Arc<Keyring>,
    ops: &Arc<Keyring>,
    destroy: bool,
    refresh: bool,
) -> Hook {
    let (job_ring, ops) = (Arc::clone(job_ring), Arc::clone(ops));
    Box::new(move || {
        let (job_ring, ops) = (Arc::clone(&job_ring), Arc::clone(&ops));
        Box::pin(async move {
            ops.rotate(&admin()).await.unwrap();
            ops.disable(2, &admin()).await.unwrap();
            if destroy {
                let reason = "incident: version 2 compromised".to_owned();
                ops.destroy(2, DestroyAuthorization::Forced { reason }, &admin())
                    .await
                    .unwrap();
            }
            if refresh {
                job_ring.refresh().await.unwrap();
            }
        })
    })
}

fn versions_of(t: &Table) -> Vec<u32> {
    t.snapshot()
        .values()
        .map(|ct| format::inspect(ct).unwrap().key_version)
        .collect()
}

/// Every row of `t` still opens through `ring` (nothing was lost).
async fn all_readable(t: &Table, ring: &Keyring) {
    for (id, ct) in t.snapshot() {
        let got = ring.decrypt(&ctx(&t.name, &id), &ct).await;
        assert!(got.is_ok(), "{}/{id} lost: {got:?}", t.name);
    }
}

#[tokio::test(start_paused = true)]
async fn a_target_disabled_after_the_fetch_is_never_written() {
    let a = Table::new("a");
    let (job_ring, ops) = fleet(&[&a]).await;
    let before = a.snapshot();
    let source = Hooked::new(&a).on_fetch(1, retire_target(&job_ring, &ops, false));
    let mut job = RewrapJob::builder(job_ring.clone(), vec![source])
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(
            err,
            JobError::TargetUnusable {
                target: 2,
                state: KeyState::Disabled
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        a.snapshot(),
        before,
        "no row moved onto the disabled target"
    );
    // The job stays stopped: the next call writes nothing either.
    assert!(job.next_batch().await.is_err());
    assert_eq!(a.snapshot(), before);
}

/// The data-loss case: rows moved onto a version force-destroyed mid-batch
/// would be undecryptable for good, though they were readable on version 1.
#[tokio::test(start_paused = true)]
async fn a_target_force_destroyed_mid_batch_loses_no_row() {
    let a = Table::new("a");
    let (job_ring, ops) = fleet(&[&a]).await;
    let source = Hooked::new(&a).on_fetch(1, retire_target(&job_ring, &ops, true));
    let mut job = RewrapJob::builder(job_ring.clone(), vec![source])
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(
            err,
            JobError::TargetUnusable {
                target: 2,
                state: KeyState::Destroyed
            }
        ),
        "{err:?}"
    );
    assert_eq!(versions_of(&a), vec![1; 10]);
    all_readable(&a, &ops).await;
}

/// The check runs before each write, not once per batch: a destroy during
/// source `a`'s write stops the job before source `b`'s write.
#[tokio::test(start_paused = true)]
async fn a_destroy_during_one_sources_write_stops_the_next_write() {
    let a = Table::new("a");
    let b = Table::new("b");
    let (job_ring, ops) = fleet(&[&a, &b]).await;
    let b_before = b.snapshot();
    let sa = Hooked::new(&a).on_cas(1, retire_target(&job_ring, &ops, true));
    let sb: Arc<dyn RowSource> = b.clone();
    let mut job = RewrapJob::builder(job_ring.clone(), vec![sa, sb])
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(err, JobError::TargetUnusable { target: 2, .. }),
        "{err:?}"
    );
    assert_eq!(b.snapshot(), b_before, "b was written after the destroy");
    all_readable(&b, &ops).await;
}

/// A row that lost a race is re-read and written again one by one: that
/// write is checked too.
#[tokio::test(start_paused = true)]
async fn the_retry_after_a_conflict_rechecks_the_target() {
    let a = Table::new("a");
    let (job_ring, ops) = fleet(&[&a]).await;
    // A stale writer stores row 0 again on version 1 while the job writes
    // it, and the operator retires and disables version 2: the job's
    // compare-and-swap of row 0 misses, and its retry must not write.
    let (id, c) = ("000000", ctx("a", "000000"));
    let v1 = ops.master_key(1).await.unwrap();
    let stale = record::encrypt(&v1, Suite::default(), &c, b"rewritten").unwrap();
    let hook: Hook = {
        let (a, stale) = (a.clone(), stale.clone());
        let retire = retire_target(&job_ring, &ops, false);
        Box::new(move || {
            a.rows.lock().unwrap().insert(id.into(), stale.clone());
            retire()
        })
    };
    let source = Hooked::new(&a).on_cas(1, hook);
    let mut job = RewrapJob::builder(job_ring.clone(), vec![source])
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(err, JobError::TargetUnusable { target: 2, .. }),
        "{err:?}"
    );
    assert_eq!(
        a.snapshot()[id],
        stale,
        "the retry wrote onto the disabled target"
    );
    assert_eq!(ops.decrypt(&c, &stale).await.unwrap(), b"rewritten");
}

#[tokio::test(start_paused = true)]
async fn a_rollback_mid_batch_stops_further_writes() {
    let a = Table::new("a");
    let (job_ring, ops) = fleet(&[&a]).await;
    let before = a.snapshot();
    let hook: Hook = {
        let (job_ring, ops) = (job_ring.clone(), ops.clone());
        Box::new(move || {
            let (job_ring, ops) = (job_ring.clone(), ops.clone());
            Box::pin(async move {
                ops.rollback(1, &admin()).await.unwrap();
                drop(job_ring);
            })
        })
    };
    let source = Hooked::new(&a).on_fetch(1, hook);
    let mut job = RewrapJob::builder(job_ring.clone(), vec![source])
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(
            err,
            JobError::TargetRolledBack {
                target: 2,
                active: Some(1)
            }
        ),
        "{err:?}"
    );
    assert_eq!(a.snapshot(), before);
}

/// Over a store that sends no notifications the job's instance learns of
/// the change only when it reloads (here a `refresh()`); the check before
/// the write still reads nothing but memory.
#[tokio::test(start_paused = true)]
async fn over_a_silent_store_the_check_sees_a_refreshed_view() {
    let a = Table::new("a");
    let (job_ring, ops) = fleet_on(Arc::new(Unwatched(MemoryStore::new())), &[&a]).await;
    let before = a.snapshot();
    let source = Hooked::new(&a).on_fetch(1, retire_target_then(&job_ring, &ops, true, true));
    let mut job = RewrapJob::builder(job_ring.clone(), vec![source])
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(
            err,
            JobError::TargetUnusable {
                target: 2,
                state: KeyState::Destroyed
            }
        ),
        "{err:?}"
    );
    assert_eq!(a.snapshot(), before);
}

/// `into_stream` ends with the completion report; a job that was already
/// finished when the stream began yields only that.
#[tokio::test(start_paused = true)]
async fn the_stream_ends_with_the_completion_report() {
    let a = Table::new("a");
    let (job_ring, _ops) = fleet(&[&a]).await;
    let source: Arc<dyn RowSource> = a.clone();
    let mut job = RewrapJob::builder(job_ring.clone(), vec![source.clone()])
        .options(JobOptions {
            batch_size: 4,
            ..JobOptions::default()
        })
        .create()
        .unwrap();
    let target = job.target_version();
    let checkpoint = job.checkpoint().clone();
    drop(job.next_batch().await.unwrap());
    let items: Vec<_> = job.into_stream().map(Result::unwrap).collect().await;
    let Some((JobProgress::Completed(done), batches)) = items.split_last() else {
        panic!("{items:?}");
    };
    // 10 rows in batches of 4: one before the stream, two in it (the last
    // one finds the source dry).
    assert_eq!(batches.len(), 2, "{items:?}");
    assert!(batches.iter().all(|b| matches!(b, JobProgress::Batch(_))));
    assert_eq!(done.target_version, target);
    assert_eq!(done.totals.rewrapped, 10);
    assert!(done.evidence(1).is_some());
    assert_eq!(versions_of(&a), vec![2; 10]);

    // A finished checkpoint, resumed: the stream is just the report.
    let mut finished = checkpoint;
    finished.completed = true;
    let resumed = RewrapJob::builder(job_ring, vec![source])
        .resume(finished)
        .unwrap();
    let items: Vec<_> = resumed.into_stream().map(Result::unwrap).collect().await;
    assert!(
        matches!(&items[..], [JobProgress::Completed(_)]),
        "{items:?}"
    );
}
