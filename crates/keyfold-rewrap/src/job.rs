//! The rewrap job: pinned target, pull-based batches, compare-and-swap writes.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use keyfold_core::audit::{Actor, AuditEvent, AuditKind, AuditSink, NoAudit};
use keyfold_core::format::{HeaderInfo, HeaderKind};
use keyfold_core::keyring::{KeyState, Keyring, NoRecordsLeft};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::time::{Clock, SystemClock, Timestamp};
use keyfold_core::{Error as CoreError, MasterKey, StreamError, format, record, stream};

use crate::checkpoint::{Checkpoint, Counters, Mode, Shard, SourceCheckpoint};
use crate::source::{CasOutcome, CasWrite, Row, RowSource, SourceError};

/// Default rows per batch, split evenly across the sources.
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// Default lease: a job must finish within 7 days.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default pause between batches for [`RewrapJob::run_paced`].
pub const DEFAULT_PACE: Duration = Duration::from_secs(5);
const CHECKPOINT_SCHEMA: u32 = 1;
/// Re-reads of a row after compare-and-swap misses before giving up on it.
const MAX_CONFLICT_RETRIES: u32 = 3;

/// Counter: rows a rewrap job handled, by `outcome` (`rewrapped`,
/// `skipped`, `conflict`, `failed`); docs/OBSERVABILITY.md.
pub const REWRAP_ROWS: &str = "keyfold_rewrap_rows_total";
/// Counter: rewrap batches, by `outcome` (`ok`, `error`).
pub const REWRAP_BATCHES: &str = "keyfold_rewrap_batches_total";

/// The job stopped and writes nothing more.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The lease expired; create a new job.
    #[error("rewrap job {job_id}: lease expired at {expired_at:?}")]
    LeaseExpired {
        /// The job.
        job_id: String,
        /// When.
        expired_at: Timestamp,
    },
    /// The target version was disabled or destroyed.
    #[error("rewrap target version {target} is {state:?}; create a new job")]
    TargetUnusable {
        /// Target version.
        target: u32,
        /// Its state now.
        state: KeyState,
    },
    /// A rollback made an older version active: rows written now would land
    /// on a version newer than the active one.
    #[error(
        "rewrap target version {target} is no longer current: version {active:?} is active after a rollback; create a new job"
    )]
    TargetRolledBack {
        /// Target version.
        target: u32,
        /// The active version now.
        active: Option<u32>,
    },
    /// The checkpoint does not fit the sources or keyring given.
    #[error("checkpoint does not match this job: {0}")]
    CheckpointMismatch(String),
    /// No sources were given: such a job would finish at once, and its
    /// evidence would authorize destroying versions records still use.
    #[error("a rewrap job needs at least one source")]
    NoSources,
    /// The target version cannot be used (sealed keyring, unknown version...).
    #[error("rewrap target key unavailable: {0}")]
    Keyring(#[source] CoreError),
    /// A source failed persistently while listing rows.
    #[error("source {source_name}: {error}")]
    Source {
        /// The source.
        source_name: String,
        /// Its error.
        #[source]
        error: SourceError,
    },
}

/// Options chosen when a job is created.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Rows per batch across all sources (default 100).
    pub batch_size: usize,
    /// Rewrap (default) or re-encrypt.
    pub mode: Mode,
    /// Lease length (default 7 days).
    pub lease: Duration,
    /// Retry policy for KMS and store errors.
    pub retry: RetryPolicy,
    /// The shard this job covers (default: all rows).
    pub shard: Shard,
    /// How a moved row is proven readable before it is written back
    /// (default [`Verify::Decrypt`]).
    pub verify: Verify,
}

/// How the job proves each moved row readable under the target before it
/// writes it back. Either way no row that decrypted before the job is
/// written in a form that does not (docs/LIFECYCLE.md, "How the job
/// verifies a row").
///
/// ```
/// use keyfold_rewrap::{JobOptions, Verify};
/// // Rows that are one big record each: prove them by their headers, so a
/// // row costs the same whatever its size.
/// let options = JobOptions { verify: Verify::Header, ..JobOptions::default() };
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Verify {
    /// Decrypt every whole record or stream under the target (plaintext
    /// zeroized and dropped): a row whose payload was already damaged is
    /// reported as failed and left as it was, so the job doubles as a
    /// scrub. Costs one payload decryption per row, so it grows with the
    /// row's size. Header-only rows are checked by their header.
    #[default]
    Decrypt,
    /// Check only the new header under the target: its wrap opens and the
    /// data key it gives matches the header's commitment. A rewrap copies
    /// the payload and its tag byte for byte, under the same data key and
    /// the same associated data, so the row decrypts after the job exactly
    /// when it did before; a row whose payload was already damaged is moved
    /// (still unreadable) instead of reported. A row costs the same whatever
    /// its size. Re-encryption (which writes a new payload) always decrypts.
    Header,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            mode: Mode::Rewrap,
            lease: DEFAULT_LEASE,
            retry: RetryPolicy::default(),
            shard: Shard::ALL,
            verify: Verify::default(),
        }
    }
}

/// A row the job could not move; it was left unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFailure {
    /// The source.
    pub source: String,
    /// The row id.
    pub row_id: String,
    /// Why (never key material).
    pub error: String,
}

/// What one batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// Batch number (1-based).
    pub batch: u64,
    /// This batch's counters, per source in the job's source order.
    pub per_source: Vec<(String, Counters)>,
    /// This batch's counters, summed.
    pub counters: Counters,
    /// Counters since the job started.
    pub totals: Counters,
    /// Rows that failed in this batch.
    pub failures: Vec<RowFailure>,
    /// Rows left, where every source can count them.
    pub estimated_remaining: Option<u64>,
    /// The job is finished.
    pub completed: bool,
}

/// An item of [`RewrapJob::into_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobProgress {
    /// A batch ran.
    Batch(BatchReport),
    /// The job is finished: the last item of the stream.
    Completed(CompletionReport),
}

/// The outcome of a finished job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionReport {
    /// The keyring the job moved records of.
    pub keyring_id: String,
    /// The job.
    pub job_id: String,
    /// Its target version.
    pub target_version: u32,
    /// The shard it covered.
    pub shard: Shard,
    /// Totals.
    pub totals: Counters,
    /// When the job started: every row was read after this.
    pub started_at: Timestamp,
}

impl CompletionReport {
    /// True when every row of the shard was seen on the target version (or a
    /// newer one) and none failed.
    pub fn is_clean(&self) -> bool {
        self.totals.failed == 0 && self.totals.unresolved == 0
    }

    /// Evidence for [`Keyring::destroy`] that no record is left on `version`,
    /// if the job was clean, covered all rows, and `version` is older than
    /// its target.
    pub fn evidence(&self, version: u32) -> Option<NoRecordsLeft> {
        (self.is_clean() && self.shard == Shard::ALL && version < self.target_version).then(|| {
            NoRecordsLeft {
                keyring_id: self.keyring_id.clone(),
                version,
                source: format!("rewrap job {}", self.job_id),
                checked_at: self.started_at,
            }
        })
    }
}

/// A rewrap job over one keyring and the host's sources.
pub struct RewrapJob {
    keyring: Arc<Keyring>,
    sources: Vec<Arc<dyn RowSource>>,
    options: JobOptions,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditSink>,
    actor: Actor,
    checkpoint: Checkpoint,
}

impl std::fmt::Debug for RewrapJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewrapJob")
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RewrapJob`].
pub struct RewrapJobBuilder {
    keyring: Arc<Keyring>,
    sources: Vec<Arc<dyn RowSource>>,
    options: JobOptions,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditSink>,
    actor: Actor,
    job_id: Option<String>,
}

impl RewrapJobBuilder {
    /// Job options.
    #[must_use]
    pub fn options(mut self, options: JobOptions) -> Self {
        self.options = options;
        self
    }

    /// The clock for the lease (tests inject a manual one).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Where `kms.rewrap.started` / `kms.rewrap.completed` go.
    #[must_use]
    pub fn audit(mut self, sink: Arc<dyn AuditSink>, actor: Actor) -> Self {
        self.audit = sink;
        self.actor = actor;
        self
    }

    /// Use this job id (e.g. the lease id the keyring's rotate returned).
    #[must_use]
    pub fn job_id(mut self, id: impl Into<String>) -> Self {
        self.job_id = Some(id.into());
        self
    }

    /// Creates the job, pinning the keyring's active version as its target.
    ///
    /// # Errors
    /// [`JobError::NoSources`] for an empty source list;
    /// [`JobError::Keyring`] when the keyring has no active version.
    pub fn create(self) -> Result<RewrapJob, JobError> {
        if self.sources.is_empty() {
            return Err(JobError::NoSources);
        }
        let target = self
            .keyring
            .active_version()
            .ok_or(JobError::Keyring(CoreError::NoActiveVersion))?;
        let now = self.clock.now();
        let job_id = match self.job_id {
            Some(id) => id,
            None => random_id().map_err(JobError::Keyring)?,
        };
        let checkpoint = Checkpoint {
            schema: CHECKPOINT_SCHEMA,
            job_id: job_id.clone(),
            keyring_id: self.keyring.id().to_owned(),
            target_version: target,
            mode: self.options.mode,
            shard: self.options.shard,
            started_at: now,
            lease_expires_at: now.saturating_add(self.options.lease),
            sources: self
                .sources
                .iter()
                .map(|s| SourceCheckpoint {
                    name: s.name().to_owned(),
                    cursor: None,
                    exhausted: false,
                    counters: Counters::default(),
                })
                .collect(),
            batches: 0,
            completed: false,
        };
        self.audit.record(AuditEvent {
            keyring_id: checkpoint.keyring_id.clone(),
            actor: self.actor.clone(),
            at: now,
            kind: AuditKind::RewrapStarted {
                job_id,
                target_version: target,
            },
        });
        Ok(RewrapJob {
            keyring: self.keyring,
            sources: self.sources,
            options: self.options,
            clock: self.clock,
            audit: self.audit,
            actor: self.actor,
            checkpoint,
        })
    }

    /// Rebuilds a job from its persisted checkpoint. The sources must be
    /// the same, in the same order.
    ///
    /// # Errors
    /// [`JobError::NoSources`]; [`JobError::CheckpointMismatch`].
    pub fn resume(self, checkpoint: Checkpoint) -> Result<RewrapJob, JobError> {
        if self.sources.is_empty() {
            return Err(JobError::NoSources);
        }
        let names: Vec<&str> = self.sources.iter().map(|s| s.name()).collect();
        let saved: Vec<&str> = checkpoint.sources.iter().map(|s| s.name.as_str()).collect();
        if names != saved {
            return Err(JobError::CheckpointMismatch(format!(
                "sources {names:?}, checkpoint has {saved:?}"
            )));
        }
        if checkpoint.keyring_id != self.keyring.id() {
            return Err(JobError::CheckpointMismatch(format!(
                "keyring {}, checkpoint is for {}",
                self.keyring.id(),
                checkpoint.keyring_id
            )));
        }
        if checkpoint.schema != CHECKPOINT_SCHEMA {
            return Err(JobError::CheckpointMismatch(format!(
                "unknown checkpoint schema {}",
                checkpoint.schema
            )));
        }
        let mut options = self.options;
        options.mode = checkpoint.mode;
        options.shard = checkpoint.shard;
        Ok(RewrapJob {
            keyring: self.keyring,
            sources: self.sources,
            options,
            clock: self.clock,
            audit: self.audit,
            actor: self.actor,
            checkpoint,
        })
    }
}

fn random_id() -> Result<String, CoreError> {
    let mut bytes = [0u8; 16];
    keyfold_core::rng::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A row's first pass, before the batch write.
enum Prepared {
    /// Outside the job's shard (read, not counted).
    NotOwned,
    Skip,
    Write(Vec<u8>),
    Failed(String),
    Abort(CoreError),
}

enum RowOutcome {
    Rewrapped,
    Skipped,
    Unresolved,
    Failed(String),
    /// Stop the batch: the row is untouched and not counted.
    Abort(CoreError),
    /// Stop the job before this row's write: the target can no longer
    /// take records. The row is untouched and not counted.
    Stop(JobError),
}

impl RewrapJob {
    /// Starts building a job over `keyring` and the host's `sources`.
    pub fn builder(keyring: Arc<Keyring>, sources: Vec<Arc<dyn RowSource>>) -> RewrapJobBuilder {
        RewrapJobBuilder {
            keyring,
            sources,
            options: JobOptions::default(),
            clock: Arc::new(SystemClock),
            audit: Arc::new(NoAudit),
            actor: Actor::new("keyfold-rewrap"),
            job_id: None,
        }
    }

    /// The current checkpoint: persist it after every batch.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The pinned target version.
    pub fn target_version(&self) -> u32 {
        self.checkpoint.target_version
    }

    /// The completion report, once the job is finished.
    pub fn completion(&self) -> Option<CompletionReport> {
        self.checkpoint.completed.then(|| CompletionReport {
            keyring_id: self.checkpoint.keyring_id.clone(),
            job_id: self.checkpoint.job_id.clone(),
            target_version: self.checkpoint.target_version,
            shard: self.checkpoint.shard,
            totals: self.checkpoint.totals(),
            started_at: self.checkpoint.started_at,
        })
    }

    /// Runs one batch. `Ok(None)` once the job is finished.
    ///
    /// Before the batch it checks the lease and the target's state; rows
    /// are then fetched evenly across the sources, moved to the target,
    /// verified, and written by compare-and-swap.
    ///
    /// # Errors
    /// [`JobError`]; the job then writes nothing more.
    pub async fn next_batch(&mut self) -> Result<Option<BatchReport>, JobError> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "keyfold.rewrap.batch",
            job_id = %self.checkpoint.job_id,
            keyring_id = %self.checkpoint.keyring_id,
            target_version = self.checkpoint.target_version,
            rows = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let result = self.next_batch_untraced().instrument(span.clone()).await;
        let outcome = match &result {
            Ok(Some(report)) => {
                let c = &report.counters;
                span.record("rows", c.seen);
                for (label, n) in [
                    ("rewrapped", c.rewrapped),
                    ("skipped", c.skipped),
                    ("conflict", c.conflicts),
                    ("failed", c.failed),
                ] {
                    metrics::counter!(REWRAP_ROWS, "outcome" => label).increment(n);
                }
                "ok"
            }
            Ok(None) => "done",
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        if outcome != "done" {
            metrics::counter!(REWRAP_BATCHES, "outcome" => outcome).increment(1);
        }
        result
    }

    async fn next_batch_untraced(&mut self) -> Result<Option<BatchReport>, JobError> {
        if self.checkpoint.completed {
            return Ok(None);
        }
        self.check_lease()?;
        let target_key = self.check_target().await?;

        let mut per_source = vec![Counters::default(); self.sources.len()];
        let mut failures = Vec::new();
        let mut budget = self.options.batch_size.max(1);
        // Fair share first; what a dry source leaves goes to the others.
        while budget > 0 {
            let open: Vec<usize> = (0..self.sources.len())
                .filter(|&i| self.checkpoint.sources.get(i).is_some_and(|s| !s.exhausted))
                .collect();
            if open.is_empty() {
                break;
            }
            let share = budget / open.len();
            let extra = budget % open.len();
            let mut used = 0;
            for (n, &i) in open.iter().enumerate() {
                let quota = share + usize::from(n < extra);
                if quota == 0 {
                    continue;
                }
                let fetched = self
                    .process_source(i, quota, &target_key, &mut per_source, &mut failures)
                    .await?;
                used += fetched;
            }
            if used == 0 {
                break;
            }
            budget = budget.saturating_sub(used);
        }

        let mut counters = Counters::default();
        for c in &per_source {
            counters.add(c);
        }
        self.checkpoint.batches += 1;
        self.checkpoint.completed = self.checkpoint.sources.iter().all(|s| s.exhausted);
        if self.checkpoint.completed {
            self.emit_completed();
        }
        Ok(Some(BatchReport {
            batch: self.checkpoint.batches,
            per_source: self
                .checkpoint
                .sources
                .iter()
                .zip(per_source)
                .map(|(s, c)| (s.name.clone(), c))
                .collect(),
            counters,
            totals: self.checkpoint.totals(),
            failures,
            estimated_remaining: self.estimate_remaining().await,
            completed: self.checkpoint.completed,
        }))
    }

    /// Runs batches until done, pausing `pace` between them, or until
    /// `cancel` completes (the job then stops between batches, its
    /// checkpoint intact). `on_batch` sees every report (persist the
    /// checkpoint there).
    ///
    /// # Errors
    /// As [`next_batch`](Self::next_batch).
    pub async fn run_paced<F>(
        &mut self,
        pace: Duration,
        cancel: impl std::future::Future<Output = ()>,
        mut on_batch: F,
    ) -> Result<Option<CompletionReport>, JobError>
    where
        F: FnMut(&BatchReport, &Checkpoint),
    {
        tokio::pin!(cancel);
        loop {
            match self.next_batch().await? {
                Some(report) => {
                    on_batch(&report, &self.checkpoint);
                    if report.completed {
                        return Ok(self.completion());
                    }
                }
                None => return Ok(self.completion()),
            }
            tokio::select! {
                () = &mut cancel => return Ok(None),
                () = tokio::time::sleep(pace) => {}
            }
        }
    }

    /// The job as a stream: a [`JobProgress::Batch`] per batch (persist
    /// its checkpoint), then, once the job is finished, one
    /// [`JobProgress::Completed`] with the completion report (the evidence
    /// for destroying the old versions), and the stream ends. After an
    /// error it ends too.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use futures::StreamExt;
    /// # use keyfold_rewrap::{JobProgress, RewrapJob, RowSource};
    /// # async fn run(keyring: Arc<keyfold_core::Keyring>, sources: Vec<Arc<dyn RowSource>>)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// let job = RewrapJob::builder(keyring, sources).create()?;
    /// let mut progress = std::pin::pin!(job.into_stream());
    /// while let Some(item) = progress.next().await {
    ///     match item? {
    ///         JobProgress::Batch(report) => println!("batch {}: {:?}", report.batch, report.counters),
    ///         JobProgress::Completed(done) => {
    ///             let evidence = done.evidence(1); // Some(..) when version 1 may go
    ///             println!("done: {:?}", evidence.is_some());
    ///         }
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn into_stream(self) -> impl Stream<Item = Result<JobProgress, JobError>> {
        futures::stream::unfold(Some(self), |job| async move {
            let mut job = job?;
            match job.next_batch().await {
                Ok(Some(report)) => Some((Ok(JobProgress::Batch(report)), Some(job))),
                // Finished (by the last batch, or before this stream began).
                Ok(None) => job
                    .completion()
                    .map(|done| (Ok(JobProgress::Completed(done)), None)),
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    fn check_lease(&self) -> Result<(), JobError> {
        if self.clock.now() >= self.checkpoint.lease_expires_at {
            return Err(JobError::LeaseExpired {
                job_id: self.checkpoint.job_id.clone(),
                expired_at: self.checkpoint.lease_expires_at,
            });
        }
        Ok(())
    }

    /// Reloads the keyring (another instance may have changed it) and
    /// refuses to go on if the target can no longer take records.
    async fn check_target(&self) -> Result<Arc<MasterKey>, JobError> {
        self.keyring.refresh().await.map_err(JobError::Keyring)?;
        self.target_usable()?;
        // The keyring retries transient KMS errors itself (and seals when
        // they persist); nothing to add here.
        self.keyring
            .master_key(self.checkpoint.target_version)
            .await
            .map_err(|e| self.target_error(e))
    }

    /// Before each write (docs/LIFECYCLE.md, "Pinned target"): the target
    /// may have been disabled, destroyed or rolled back by another instance
    /// since the batch began, and the key the job holds would still rewrap
    /// and verify. Judged on this instance's view, in memory: the key
    /// lookup reloads the view only when a store change notification
    /// arrived (or the view is older than max staleness and the target's
    /// key left the cache), never once per row.
    async fn recheck_target(&self) -> Result<(), JobError> {
        self.keyring
            .master_key(self.checkpoint.target_version)
            .await
            .map_err(|e| self.target_error(e))?;
        self.target_usable()
    }

    /// A keyring error about the target as the job reports it.
    fn target_error(&self, e: CoreError) -> JobError {
        let target = self.checkpoint.target_version;
        match e {
            CoreError::KeyState { version, state } if version == target => {
                JobError::TargetUnusable { target, state }
            }
            CoreError::KeyDestroyed { version } if version == target => JobError::TargetUnusable {
                target,
                state: KeyState::Destroyed,
            },
            e => JobError::Keyring(e),
        }
    }

    /// The target on this instance's current view (no I/O): usable, and
    /// not newer than the active version.
    fn target_usable(&self) -> Result<(), JobError> {
        let target = self.checkpoint.target_version;
        match self.keyring.version_state(target) {
            Some(state @ (KeyState::Disabled | KeyState::Destroyed)) => {
                return Err(JobError::TargetUnusable { target, state });
            }
            None => {
                return Err(JobError::Keyring(CoreError::UnknownVersion {
                    version: target,
                }));
            }
            Some(_) => {}
        }
        let active = self.keyring.active_version();
        if active.is_none_or(|a| a < target) {
            return Err(JobError::TargetRolledBack { target, active });
        }
        Ok(())
    }

    /// Retries a transient store error with the job's backoff and jitter.
    async fn source_retry<T, F, Fut>(&self, mut op: F) -> Result<T, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SourceError>>,
    {
        let mut retries = 0;
        loop {
            match op().await {
                Err(e) if e.transient => match self.options.retry.backoff(retries, None) {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        retries += 1;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    /// Fetches up to `quota` rows from source `i` and processes them: every
    /// row is moved in memory first, then all of them are written with one
    /// [`RowSource::compare_and_swap_many`] (a source that implements it as
    /// one statement makes a batch cost two round trips). Rows that lost a
    /// race are re-read and retried one by one.
    /// Returns how many rows the source returned.
    async fn process_source(
        &mut self,
        i: usize,
        quota: usize,
        target_key: &Arc<MasterKey>,
        per_source: &mut [Counters],
        failures: &mut Vec<RowFailure>,
    ) -> Result<usize, JobError> {
        let Some(source) = self.sources.get(i).cloned() else {
            return Ok(0);
        };
        let cursor = self
            .checkpoint
            .sources
            .get(i)
            .and_then(|s| s.cursor.clone());
        let rows = self
            .source_retry(|| source.fetch(cursor.as_deref(), quota))
            .await
            .map_err(|error| JobError::Source {
                source_name: source.name().to_owned(),
                error,
            })?;
        let fetched = rows.len();
        let mut aborted = None;
        // Each row owned by the shard with its first outcome, in cursor
        // order; rows to write hold the new ciphertext until the batch write.
        let mut outcomes: Vec<(Row, Prepared)> = Vec::with_capacity(rows.len());
        // Cursor of the last row before any row this shard owns is done.
        let mut skipped_cursor = None;
        let mut prepared_rows = 0usize;
        for row in rows {
            if !self.checkpoint.shard.owns(&row.id) {
                if outcomes.is_empty() {
                    skipped_cursor = Some(row.cursor.clone());
                } else {
                    // Not ours: passes as skipped-over, without counting.
                    outcomes.push((row, Prepared::NotOwned));
                }
                continue;
            }
            prepared_rows += 1;
            if prepared_rows.is_multiple_of(YIELD_EVERY_ROWS) {
                YieldNow::default().await;
            }
            match self.prepare_row(&row, target_key).await {
                Prepared::Abort(error) => {
                    aborted = Some(JobError::Keyring(error));
                    break;
                }
                prepared => outcomes.push((row, prepared)),
            }
        }

        if outcomes
            .iter()
            .any(|(_, p)| matches!(p, Prepared::Write(_)))
        {
            // Nothing of this source's batch is recorded: a new job sees
            // these rows again.
            self.recheck_target().await?;
        }
        let writes: Vec<CasWrite<'_>> = outcomes
            .iter()
            .filter_map(|(row, p)| match p {
                Prepared::Write(new) => Some(CasWrite {
                    id: &row.id,
                    expected: &row.ciphertext,
                    new,
                }),
                _ => None,
            })
            .collect();
        let written = if writes.is_empty() {
            Ok(Vec::new())
        } else {
            self.source_retry(|| source.compare_and_swap_many(&writes))
                .await
                .and_then(|out| {
                    if out.len() == writes.len() {
                        Ok(out)
                    } else {
                        Err(SourceError::permanent(format!(
                            "compare_and_swap_many answered {} outcomes for {} writes",
                            out.len(),
                            writes.len()
                        )))
                    }
                })
        };
        drop(writes);
        let mut written = written.map(Vec::into_iter);

        let mut counters = Counters::default();
        let mut last_cursor = skipped_cursor;
        for (row, prepared) in outcomes {
            let cursor = row.cursor.clone();
            let outcome = match prepared {
                Prepared::NotOwned => {
                    last_cursor = Some(cursor);
                    continue;
                }
                Prepared::Skip => RowOutcome::Skipped,
                Prepared::Failed(error) => RowOutcome::Failed(error),
                Prepared::Abort(error) => RowOutcome::Abort(error),
                Prepared::Write(_) => match &mut written {
                    Ok(out) => match out.next() {
                        Some(CasOutcome::Swapped) => RowOutcome::Rewrapped,
                        Some(CasOutcome::Conflict) | None => {
                            counters.conflicts += 1;
                            match self.source_retry(|| source.get(&row.id)).await {
                                Ok(Some(current)) => {
                                    self.process_row(
                                        &*source,
                                        current,
                                        target_key,
                                        &mut counters,
                                        MAX_CONFLICT_RETRIES,
                                    )
                                    .await
                                }
                                // Deleted meanwhile: nothing left on an old version.
                                Ok(None) => RowOutcome::Skipped,
                                Err(e) => {
                                    RowOutcome::Failed(format!("re-read after conflict: {e}"))
                                }
                            }
                        }
                    },
                    Err(e) => RowOutcome::Failed(format!("write: {e}")),
                },
            };
            match outcome {
                RowOutcome::Rewrapped => counters.rewrapped += 1,
                RowOutcome::Skipped => counters.skipped += 1,
                RowOutcome::Unresolved => counters.unresolved += 1,
                RowOutcome::Failed(error) => {
                    counters.failed += 1;
                    failures.push(RowFailure {
                        source: source.name().to_owned(),
                        row_id: row.id,
                        error,
                    });
                }
                RowOutcome::Abort(error) => {
                    // Rows after this one that were already written are
                    // seen again (on the target) by the next batch.
                    aborted = Some(JobError::Keyring(error));
                    break;
                }
                RowOutcome::Stop(error) => {
                    aborted = Some(error);
                    break;
                }
            }
            counters.seen += 1;
            last_cursor = Some(cursor);
        }
        if let Some(slot) = per_source.get_mut(i) {
            slot.add(&counters);
        }
        if let Some(cp) = self.checkpoint.sources.get_mut(i) {
            cp.counters.add(&counters);
            if last_cursor.is_some() {
                cp.cursor = last_cursor;
            }
            if fetched < quota && aborted.is_none() {
                cp.exhausted = true;
            }
        }
        match aborted {
            // Rows before this one are recorded; it and the rest are
            // fetched again by the next batch.
            Some(error) => Err(error),
            None => Ok(fetched),
        }
    }

    /// What to do with one row: skip it, or write the returned ciphertext.
    async fn prepare_row(&self, row: &Row, target_key: &Arc<MasterKey>) -> Prepared {
        // A record, a stream object, or only the header of either.
        let info = match format::inspect_header(&row.ciphertext) {
            Ok(info) => info,
            Err(e) => {
                return Prepared::Failed(format!("not a keyfold record or stream: {e}"));
            }
        };
        if info.key_version >= self.checkpoint.target_version {
            return Prepared::Skip;
        }
        match self.move_record(row, info, target_key).await {
            Ok(new) => Prepared::Write(new),
            // The KMS is out of reach: every row would fail the same
            // way. Stop without moving the cursor past this row.
            Err(e @ CoreError::Sealed { .. }) => Prepared::Abort(e),
            Err(e) => Prepared::Failed(e.to_string()),
        }
    }

    /// Moves one row that lost a race, one compare-and-swap at a time, with
    /// up to `attempts` tries.
    async fn process_row(
        &self,
        source: &dyn RowSource,
        mut row: Row,
        target_key: &Arc<MasterKey>,
        counters: &mut Counters,
        attempts: u32,
    ) -> RowOutcome {
        for _ in 0..attempts {
            let new = match self.prepare_row(&row, target_key).await {
                Prepared::Write(new) => new,
                Prepared::Skip | Prepared::NotOwned => return RowOutcome::Skipped,
                Prepared::Failed(e) => return RowOutcome::Failed(e),
                Prepared::Abort(e) => return RowOutcome::Abort(e),
            };
            if let Err(e) = self.recheck_target().await {
                return RowOutcome::Stop(e);
            }
            match self
                .source_retry(|| source.compare_and_swap(&row.id, &row.ciphertext, &new))
                .await
            {
                Ok(CasOutcome::Swapped) => return RowOutcome::Rewrapped,
                Ok(CasOutcome::Conflict) => {
                    counters.conflicts += 1;
                    match self.source_retry(|| source.get(&row.id)).await {
                        Ok(Some(current)) => row = current,
                        // Deleted meanwhile: nothing left on an old version.
                        Ok(None) => return RowOutcome::Skipped,
                        Err(e) => {
                            return RowOutcome::Failed(format!("re-read after conflict: {e}"));
                        }
                    }
                }
                Err(e) => return RowOutcome::Failed(format!("write: {e}")),
            }
        }
        RowOutcome::Unresolved
    }

    /// Moves one row to the target and proves the result readable before
    /// it is written ([`Verify`]): a header-only row (its payload stored
    /// elsewhere) always by its header; a whole record or stream by
    /// decrypting it under the target, or by its header with
    /// [`Verify::Header`].
    async fn move_record(
        &self,
        row: &Row,
        info: HeaderInfo,
        target_key: &Arc<MasterKey>,
    ) -> Result<Vec<u8>, CoreError> {
        let header_only = row.is_header_only();
        if header_only && self.checkpoint.mode == Mode::Reencrypt {
            // Re-encryption needs the payload; checked before any KMS call.
            return Err(StreamError::HeaderOnly.into());
        }
        let from = self.keyring.master_key(info.key_version).await?;
        let ctx = &row.context;
        let decrypt_back = !header_only
            && (self.options.verify == Verify::Decrypt || self.checkpoint.mode == Mode::Reencrypt);
        let new = match (info.kind, self.checkpoint.mode) {
            // The common case: rewrap and decrypt back in one pass.
            (HeaderKind::Record, Mode::Rewrap) if decrypt_back => {
                return Ok(record::rewrap_verified(
                    &row.ciphertext,
                    &from,
                    target_key,
                    ctx,
                )?);
            }
            (HeaderKind::Record, Mode::Reencrypt) => {
                record::reencrypt(&row.ciphertext, &from, target_key, ctx)?
            }
            (HeaderKind::Stream, Mode::Reencrypt) => {
                let mut out = Vec::with_capacity(row.ciphertext.len());
                stream::reencrypt(&from, target_key, ctx, &row.ciphertext[..], &mut out)?;
                out
            }
            // Header rewrap: a header alone, a whole stream, or a whole
            // record verified by its header.
            _ => {
                let mut new = row.ciphertext.clone();
                record::rewrap_header_in_place(&mut new, &from, target_key, ctx)?;
                new
            }
        };
        // Never write what we cannot read back.
        if !decrypt_back {
            record::check_header(&new, target_key, ctx)?;
        } else if info.kind == HeaderKind::Stream {
            stream::decrypt(target_key, ctx, &new[..], std::io::sink())?;
        } else {
            drop(zeroize::Zeroizing::new(record::decrypt(
                target_key, ctx, &new,
            )?));
        }
        Ok(new)
    }

    async fn estimate_remaining(&self) -> Option<u64> {
        let mut total = 0u64;
        for (source, cp) in self.sources.iter().zip(&self.checkpoint.sources) {
            if cp.exhausted {
                continue;
            }
            total = total.saturating_add(source.count_after(cp.cursor.as_deref()).await?);
        }
        Some(total)
    }

    fn emit_completed(&self) {
        let totals = self.checkpoint.totals();
        self.audit.record(AuditEvent {
            keyring_id: self.checkpoint.keyring_id.clone(),
            actor: self.actor.clone(),
            at: self.clock.now(),
            kind: AuditKind::RewrapCompleted {
                job_id: self.checkpoint.job_id.clone(),
                target_version: self.checkpoint.target_version,
                rewrapped: totals.rewrapped,
                skipped: totals.skipped,
                failed: totals.failed + totals.unresolved,
            },
        });
    }
}

/// Rows moved between two yields to the executor. A cached key makes
/// `prepare_row` complete without ever returning `Pending`, so a batch of
/// 1,000 rows would otherwise hold its thread for its whole crypto (about
/// 2 ms): other tasks on that thread wait, and so do the other futures a
/// `join` polls with it (the PostgreSQL worker's lanes: one lane's reply
/// sits unread, its next statement unsent, while another lane computes).
/// 32 small records are some 50 µs of crypto.
const YIELD_EVERY_ROWS: usize = 32;

/// Returns `Pending` once, having woken itself: the executor polls other
/// tasks, and a `join` its other futures, before this one goes on. Needs
/// no particular runtime (tokio's `yield_now` needs its `rt` feature).
#[derive(Default)]
struct YieldNow {
    yielded: bool,
}

impl std::future::Future for YieldNow {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.yielded {
            return std::task::Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}
