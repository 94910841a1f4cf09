//! A worker of a distributed rewrap job: claims shards, works them with a
//! [`RewrapJob`] over the shard's range, checkpoints after every batch.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyfold_core::audit::AuditKind;
use keyfold_core::keyring::Keyring;
use keyfold_core::retry::RetryPolicy;
use keyfold_rewrap::{
    Checkpoint, Counters, JobError, JobOptions, RewrapJob, RowFailure, RowSource, Shard, Verify,
};
use sqlx::Row as _;

use super::{DistributedJobError, JobRow, RewrapCoordinator};
use crate::table::{IdRange, PgTable};

/// What one worker did, until its [`run`](RewrapWorker::run) returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Shards this worker finished.
    pub shards_finished: u64,
    /// Shards it lost to another worker after its lease lapsed.
    pub shards_lost: u64,
    /// Batches it ran.
    pub batches: u64,
    /// Rows it fetched from the database (counted when its checkpoint saves
    /// them).
    pub rows_read: u64,
    /// Its counters, summed over its batches.
    pub counters: Counters,
    /// The rows that failed in its batches, with why (the first
    /// [`MAX_REPORTED_FAILURES`]; the counters count them all), for the
    /// host to name and retry.
    pub failures: Vec<RowFailure>,
}

/// The most failed rows a [`WorkerReport`] lists.
pub const MAX_REPORTED_FAILURES: usize = 1000;

/// A shard this worker holds.
#[derive(Debug)]
struct Claimed {
    shard: i32,
    source: String,
    range: IdRange,
    epoch: i64,
    checkpoint: Option<String>,
}

/// What a worker's lanes share.
struct LaneState {
    report: Mutex<WorkerReport>,
    /// A lane failed: the others stop after their batch.
    stop: AtomicBool,
    /// Shards claimed (or about to be), for `max_shards`.
    claimed: AtomicU64,
}

impl LaneState {
    fn update(&self, f: impl FnOnce(&mut WorkerReport)) {
        f(&mut self
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    fn stopped(&self, cancel: &Cancel) -> bool {
        self.stop.load(Ordering::SeqCst) || cancel.is_cancelled()
    }
}

/// The caller's cancellation, as the lanes (each its own task) see it.
#[derive(Clone)]
struct Cancel(tokio::sync::watch::Receiver<bool>);

impl Cancel {
    fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once cancelled (or once `run_until` is gone).
    async fn cancelled(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// How working a shard ended.
enum Flow {
    Finished,
    Lost,
    Cancelled,
}

/// One worker of a distributed job; made by
/// [`RewrapCoordinator::worker`]. Run as many as you like, in as many
/// processes: they share the work through the job's tables.
///
/// ```no_run
/// # async fn demo(
/// #     pool: sqlx::PgPool,
/// #     keyring: std::sync::Arc<keyfold_core::keyring::Keyring>,
/// #     accounts: keyfold_postgres::PgTable,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use keyfold_postgres::{DistributedJobOptions, RewrapCoordinator, TablePrefix};
/// let coordinator = RewrapCoordinator::new(pool, TablePrefix::default());
/// coordinator.migrate().await?;
/// let job = coordinator
///     .create_job(&keyring, &[accounts.clone()], &DistributedJobOptions::default())
///     .await?;
/// // In every worker process:
/// let report = coordinator.worker(&job, keyring.clone(), vec![accounts]).run().await?;
/// // Anywhere, once every shard is done:
/// if let Some(done) = coordinator.completion(&job).await? {
///     let _evidence = done.evidence(1); // Some only if no row failed
/// }
/// # let _ = report; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RewrapWorker {
    coordinator: RewrapCoordinator,
    job_id: String,
    keyring: Arc<Keyring>,
    sources: Vec<PgTable>,
    name: String,
    poll: Duration,
    retry: RetryPolicy,
    max_shards: Option<u64>,
    lanes: usize,
    checkpoint_interval: Duration,
    verify: Verify,
}

impl std::fmt::Debug for RewrapWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewrapWorker")
            .field("job_id", &self.job_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn add(total: &mut Counters, c: &Counters) {
    total.seen = total.seen.saturating_add(c.seen);
    total.rewrapped = total.rewrapped.saturating_add(c.rewrapped);
    total.skipped = total.skipped.saturating_add(c.skipped);
    total.conflicts = total.conflicts.saturating_add(c.conflicts);
    total.failed = total.failed.saturating_add(c.failed);
    total.unresolved = total.unresolved.saturating_add(c.unresolved);
}

impl RewrapWorker {
    pub(super) fn new(
        coordinator: RewrapCoordinator,
        job_id: String,
        keyring: Arc<Keyring>,
        sources: Vec<PgTable>,
    ) -> Self {
        RewrapWorker {
            coordinator,
            job_id,
            keyring,
            sources,
            name: format!("pid-{}", std::process::id()),
            poll: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            max_shards: None,
            lanes: 2,
            checkpoint_interval: Duration::from_millis(500),
            verify: Verify::default(),
        }
    }

    /// The name written as a shard's `owner` (default `pid-<pid>`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How often a worker with nothing to claim looks again while other
    /// workers hold the last shards (default 500 ms): if one of them dies,
    /// its shard is taken over once its lease lapses.
    #[must_use]
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Retry policy for the KMS and the database within a batch.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How this worker proves each moved row readable before writing it
    /// back (default [`Verify::Decrypt`]; see [`Verify`]).
    #[must_use]
    pub fn verify(mut self, verify: Verify) -> Self {
        self.verify = verify;
        self
    }

    /// Shards this worker works at once (default 2, at least 1): while one
    /// lane waits on the database, another moves rows, so one worker keeps
    /// both its own CPU and the database busy.
    #[must_use]
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// How often a shard's checkpoint is saved (default 500 ms, and at
    /// least three times per shard lease, since the save renews it; always
    /// when the shard is done or the worker is cancelled). A worker killed
    /// between saves costs the next owner a re-read of what it did since.
    #[must_use]
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// Return after finishing this many shards (default: no limit), e.g. to
    /// recycle a process.
    #[must_use]
    pub fn max_shards(mut self, n: u64) -> Self {
        self.max_shards = Some(n);
        self
    }

    /// Works shards until every shard of the job is done.
    ///
    /// # Errors
    /// As [`run_until`](Self::run_until).
    pub async fn run(&self) -> Result<WorkerReport, DistributedJobError> {
        self.run_until(std::future::pending()).await
    }

    /// Works shards until every shard of the job is done, or until `cancel`
    /// completes: then, between two batches, the worker releases its shards
    /// (their checkpoints saved) and returns.
    ///
    /// # Errors
    /// [`DistributedJobError::JobFailed`] when the job stopped for good
    /// (this worker recorded why when it was the one to find out);
    /// [`DistributedJobError::Job`] when a shard's batch failed otherwise
    /// (KMS unreachable, a source failing persistently: the shard is
    /// released for another try); `UnknownSource`; the database's. The
    /// worker's other lanes then stop after their current batch.
    pub async fn run_until(
        &self,
        cancel: impl Future<Output = ()>,
    ) -> Result<WorkerReport, DistributedJobError> {
        let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(LaneState {
            report: Mutex::new(WorkerReport::default()),
            stop: AtomicBool::new(false),
            claimed: AtomicU64::new(0),
        });
        // Each lane is its own task: a lane's crypto runs on one thread
        // while another lane's statements are sent and their replies read
        // on another. (Lanes polled by one task took turns: one lane's
        // batch of crypto held up the others' replies; BENCHMARKS.md.)
        // The set aborts its tasks when dropped: dropping this future stops
        // each lane at its next `.await` (a statement already sent may
        // still commit; every write is a compare-and-swap, so nothing is
        // lost, and the shard's lease lapses for another worker).
        let mut lanes = tokio::task::JoinSet::new();
        let this = Arc::new(self.clone());
        for _ in 0..self.lanes {
            let (this, state, cancel) = (
                Arc::clone(&this),
                Arc::clone(&state),
                Cancel(cancel_rx.clone()),
            );
            lanes.spawn(async move { this.lane(&cancel, &state).await });
        }
        let mut cancel = std::pin::pin!(cancel);
        let mut cancelled = false;
        let mut first_error = None;
        loop {
            tokio::select! {
                () = &mut cancel, if !cancelled => {
                    cancelled = true;
                    let _ = cancel_tx.send(true);
                }
                joined = lanes.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        first_error.get_or_insert(e);
                    }
                    // A panic goes on up; a lane cancelled from outside
                    // (the runtime shutting down) did not finish its work.
                    Some(Err(e)) => match e.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        Err(_) => {
                            first_error.get_or_insert(DistributedJobError::LaneCancelled);
                        }
                    },
                },
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let report = state
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(report)
    }

    /// One lane: claims and works shards one after the other.
    async fn lane(&self, cancel: &Cancel, state: &LaneState) -> Result<(), DistributedJobError> {
        let result = self.lane_inner(cancel, state).await;
        if result.is_err() {
            state.stop.store(true, Ordering::SeqCst);
        }
        result
    }

    async fn lane_inner(
        &self,
        cancel: &Cancel,
        state: &LaneState,
    ) -> Result<(), DistributedJobError> {
        loop {
            if state.stopped(cancel) {
                return Ok(());
            }
            let job = self.coordinator.job_row(&self.job_id).await?;
            if let Some(reason) = job.failed.clone() {
                return Err(DistributedJobError::JobFailed {
                    job_id: job.id,
                    reason,
                });
            }
            if job.keyring_id != self.keyring.id() {
                return Err(DistributedJobError::WrongKeyring {
                    job: job.keyring_id,
                    given: self.keyring.id().to_owned(),
                });
            }
            // Reserve a shard before claiming, so lanes never exceed it.
            let reserved = state.claimed.fetch_add(1, Ordering::SeqCst);
            if self.max_shards.is_some_and(|n| reserved >= n) {
                return Ok(());
            }
            match self.claim(&job).await? {
                Some(claimed) => match self.work(&job, claimed, state, cancel).await? {
                    Flow::Finished => state.update(|r| r.shards_finished += 1),
                    Flow::Lost => state.update(|r| r.shards_lost += 1),
                    Flow::Cancelled => return Ok(()),
                },
                None => {
                    state.claimed.fetch_sub(1, Ordering::SeqCst);
                    if self.remaining().await? == 0 {
                        return Ok(());
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(self.poll) => {}
                    }
                }
            }
        }
    }

    /// Claims a shard that is neither done nor under a live lease.
    async fn claim(&self, job: &JobRow) -> Result<Option<Claimed>, DistributedJobError> {
        let shards = self.coordinator.table("rewrap_shards");
        let checkpoints = self.coordinator.table("rewrap_checkpoints");
        let lease_ms = i64::try_from(job.shard_lease.as_millis()).unwrap_or(i64::MAX);
        let row = sqlx::query(&format!(
            "WITH c AS ( \
               SELECT s.shard FROM {shards} s \
               WHERE s.job_id = $1 AND NOT s.done \
                 AND (s.lease_until IS NULL OR s.lease_until < now()) \
               ORDER BY s.shard LIMIT 1 FOR UPDATE SKIP LOCKED \
             ) \
             UPDATE {shards} s SET owner = $2, epoch = s.epoch + 1, \
               lease_until = now() + make_interval(secs => $3::float8 / 1000.0), \
               claims = s.claims + 1, started_at = coalesce(s.started_at, now()), \
               updated_at = now() \
             FROM c WHERE s.job_id = $1 AND s.shard = c.shard \
             RETURNING s.shard, s.source, s.range_start, s.range_end, s.epoch, \
               (SELECT k.checkpoint::text FROM {checkpoints} k \
                WHERE k.job_id = s.job_id AND k.shard = s.shard)"
        ))
        .bind(&job.id)
        .bind(&self.name)
        .bind(lease_ms)
        .fetch_optional(self.coordinator.pool())
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        Ok(Some(Claimed {
            shard: r.try_get(0)?,
            source: r.try_get(1)?,
            range: IdRange {
                start: r.try_get(2)?,
                end: r.try_get(3)?,
            },
            epoch: r.try_get(4)?,
            checkpoint: r.try_get(5)?,
        }))
    }

    /// Shards not done yet.
    async fn remaining(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE job_id = $1 AND NOT done",
            self.coordinator.table("rewrap_shards")
        ))
        .bind(&self.job_id)
        .fetch_one(self.coordinator.pool())
        .await
    }

    async fn work(
        &self,
        job: &JobRow,
        claimed: Claimed,
        state: &LaneState,
        cancel: &Cancel,
    ) -> Result<Flow, DistributedJobError> {
        let Some(base) = self.sources.iter().find(|t| t.name() == claimed.source) else {
            self.release(&claimed).await?;
            return Err(DistributedJobError::UnknownSource(claimed.source));
        };
        let table = base.with_range(claimed.range.clone());
        let checkpoint: Checkpoint = match &claimed.checkpoint {
            Some(text) => match serde_json::from_str(text) {
                Ok(cp) => cp,
                Err(source) => {
                    self.release(&claimed).await?;
                    return Err(DistributedJobError::Checkpoint {
                        shard: claimed.shard,
                        source,
                    });
                }
            },
            None => RewrapCoordinator::fresh_checkpoint(job, claimed.shard, &claimed.source),
        };
        let options = JobOptions {
            batch_size: job.batch_size,
            mode: job.mode,
            retry: self.retry.clone(),
            // The range is in the table's WHERE clause, not a filter.
            shard: Shard::ALL,
            verify: self.verify,
            ..JobOptions::default()
        };
        let source: Arc<dyn RowSource> = Arc::new(table.clone());
        let mut shard_job = match RewrapJob::builder(Arc::clone(&self.keyring), vec![source])
            .options(options)
            .clock(self.coordinator.shared_clock())
            .resume(checkpoint)
        {
            Ok(j) => j,
            Err(e) => {
                self.release(&claimed).await?;
                return Err(e.into());
            }
        };
        // Save at least every third of the lease (it renews it), at most
        // every `checkpoint_interval`, and always when the shard is done.
        let save_every = self.checkpoint_interval.min(job.shard_lease / 3);
        let mut last_save = std::time::Instant::now();
        let mut read_saved = 0u64;
        let mut unsaved_batches = 0u64;
        loop {
            if state.stopped(cancel) {
                if unsaved_batches > 0 {
                    let delta = table.rows_read().saturating_sub(read_saved);
                    let progress = (delta, unsaved_batches);
                    if !self
                        .save(job, &claimed, shard_job.checkpoint(), progress, false)
                        .await?
                    {
                        return Ok(Flow::Lost);
                    }
                }
                self.release(&claimed).await?;
                return Ok(Flow::Cancelled);
            }
            let (batch, completed) = match shard_job.next_batch().await {
                Ok(Some(b)) => {
                    let completed = b.completed;
                    (Some(b), completed)
                }
                // A checkpoint saved complete but not marked done: mark it.
                Ok(None) => (None, true),
                Err(e) => {
                    if matches!(
                        e,
                        JobError::TargetUnusable { .. }
                            | JobError::TargetRolledBack { .. }
                            | JobError::LeaseExpired { .. }
                    ) {
                        self.coordinator.fail_job(&job.id, &e.to_string()).await?;
                    }
                    self.release(&claimed).await?;
                    return Err(e.into());
                }
            };
            let read = table.rows_read();
            state.update(|report| {
                if let Some(b) = &batch {
                    report.batches += 1;
                    add(&mut report.counters, &b.counters);
                    let room = MAX_REPORTED_FAILURES.saturating_sub(report.failures.len());
                    report
                        .failures
                        .extend(b.failures.iter().take(room).cloned());
                }
            });
            if batch.is_some() {
                unsaved_batches += 1;
            }
            if !completed && last_save.elapsed() < save_every {
                continue;
            }
            let delta = read.saturating_sub(read_saved);
            if !self
                .save(
                    job,
                    &claimed,
                    shard_job.checkpoint(),
                    (delta, unsaved_batches),
                    completed,
                )
                .await?
            {
                return Ok(Flow::Lost);
            }
            // Rows read count once saved: what a killed worker read after
            // its last save is read again by the next owner, and counted there.
            state.update(|report| report.rows_read = report.rows_read.saturating_add(delta));
            read_saved = read;
            unsaved_batches = 0;
            last_save = std::time::Instant::now();
            if completed {
                return Ok(Flow::Finished);
            }
        }
    }

    /// Saves the shard's checkpoint and counters and renews its lease, in
    /// one statement fenced by the claim's epoch; when the shard is
    /// complete, also marks it done and, if it was the last, the job
    /// completed (under the job row's lock, so two last shards finishing at
    /// once cannot both miss it). `false` when the lease was lost.
    async fn save(
        &self,
        job: &JobRow,
        claimed: &Claimed,
        checkpoint: &Checkpoint,
        (rows_read, batches): (u64, u64),
        done: bool,
    ) -> Result<bool, DistributedJobError> {
        let shards = self.coordinator.table("rewrap_shards");
        let checkpoints = self.coordinator.table("rewrap_checkpoints");
        let jobs = self.coordinator.table("rewrap_jobs");
        let lease_ms = i64::try_from(job.shard_lease.as_millis()).unwrap_or(i64::MAX);
        let text = serde_json::to_string(checkpoint).map_err(|source| {
            DistributedJobError::Checkpoint {
                shard: claimed.shard,
                source,
            }
        })?;
        let totals = checkpoint.totals();
        let sql = format!(
            "WITH s AS ( \
               UPDATE {shards} SET \
                 lease_until = CASE WHEN $5 THEN NULL \
                   ELSE now() + make_interval(secs => $4::float8 / 1000.0) END, \
                 done = $5, finished_at = CASE WHEN $5 THEN now() END, \
                 batches = batches + $14, rows_read = rows_read + $6, \
                 seen = $7, rewrapped = $8, skipped = $9, conflicts = $10, failed = $11, \
                 unresolved = $12, updated_at = now() \
               WHERE job_id = $1 AND shard = $2 AND epoch = $3 AND NOT done \
               RETURNING job_id, shard \
             ) \
             INSERT INTO {checkpoints} (job_id, shard, checkpoint, saved_at) \
             SELECT job_id, shard, $13::jsonb, now() FROM s \
             ON CONFLICT (job_id, shard) DO UPDATE \
               SET checkpoint = excluded.checkpoint, saved_at = excluded.saved_at \
             RETURNING 1"
        );
        let query = sqlx::query_scalar::<_, i32>(&sql)
            .bind(&job.id)
            .bind(claimed.shard)
            .bind(claimed.epoch)
            .bind(lease_ms)
            .bind(done)
            .bind(count(rows_read))
            .bind(count(totals.seen))
            .bind(count(totals.rewrapped))
            .bind(count(totals.skipped))
            .bind(count(totals.conflicts))
            .bind(count(totals.failed))
            .bind(count(totals.unresolved))
            .bind(&text)
            .bind(count(batches));
        if !done {
            return Ok(query
                .fetch_optional(self.coordinator.pool())
                .await?
                .is_some());
        }
        let mut tx = self.coordinator.pool().begin().await?;
        sqlx::query(&format!("SELECT 1 FROM {jobs} WHERE id = $1 FOR UPDATE"))
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        if query.fetch_optional(&mut *tx).await?.is_none() {
            return Ok(false);
        }
        let completed_job = sqlx::query(&format!(
            "UPDATE {jobs} SET completed_at = now() WHERE id = $1 AND completed_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM {shards} WHERE job_id = $1 AND NOT done)"
        ))
        .bind(&job.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        if completed_job {
            // This worker finished the last shard: one event for the job.
            let totals = self.coordinator.status(&job.id).await?.totals;
            self.coordinator.emit(
                &job.keyring_id,
                AuditKind::RewrapCompleted {
                    job_id: job.id.clone(),
                    target_version: job.target_version,
                    rewrapped: totals.rewrapped,
                    skipped: totals.skipped,
                    failed: totals.failed.saturating_add(totals.unresolved),
                },
            );
        }
        Ok(true)
    }

    /// Gives the shard back at once (checkpoint kept), if still ours.
    async fn release(&self, claimed: &Claimed) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET owner = NULL, lease_until = NULL, updated_at = now() \
             WHERE job_id = $1 AND shard = $2 AND epoch = $3 AND NOT done",
            self.coordinator.table("rewrap_shards")
        ))
        .bind(&self.job_id)
        .bind(claimed.shard)
        .bind(claimed.epoch)
        .execute(self.coordinator.pool())
        .await
        .map(drop)
    }
}
