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
use crate::source::{CasOutcome, Row, RowSource, SourceError};

/// Default rows per batch, split evenly across the sources.
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// Default lease: a job must finish within 7 days.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default pause between batches for [`RewrapJob::run_paced`].
pub const DEFAULT_PACE: Duration = Duration::from_secs(5);
const CHECKPOINT_SCHEMA: u32 = 1;
/// Re-reads of a row after compare-and-swap misses before giving up on it.
const MAX_CONFLICT_RETRIES: u32 = 3;

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
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            mode: Mode::Rewrap,
            lease: DEFAULT_LEASE,
            retry: RetryPolicy::default(),
            shard: Shard::ALL,
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

enum RowOutcome {
    Rewrapped,
    Skipped,
    Unresolved,
    Failed(String),
    /// Stop the batch: the row is untouched and not counted.
    Abort(CoreError),
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

    /// The job as a stream of batch reports, ending when it is finished or
    /// after the first error.
    pub fn into_stream(self) -> impl Stream<Item = Result<BatchReport, JobError>> {
        futures::stream::unfold(Some(self), |job| async move {
            let mut job = job?;
            match job.next_batch().await {
                Ok(Some(report)) => Some((Ok(report), Some(job))),
                Ok(None) => None,
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
        let target = self.checkpoint.target_version;
        self.keyring.refresh().await.map_err(JobError::Keyring)?;
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
        // The keyring retries transient KMS errors itself (and seals when
        // they persist); nothing to add here.
        self.keyring
            .master_key(target)
            .await
            .map_err(JobError::Keyring)
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

    /// Fetches up to `quota` rows from source `i` and processes them.
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
        let mut counters = Counters::default();
        let mut last_cursor = None;
        let mut aborted = None;
        for row in rows {
            if !self.checkpoint.shard.owns(&row.id) {
                last_cursor = Some(row.cursor.clone());
                continue;
            }
            let cursor = row.cursor.clone();
            match self
                .process_row(&*source, row.clone(), target_key, &mut counters)
                .await
            {
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
            Some(error) => Err(JobError::Keyring(error)),
            None => Ok(fetched),
        }
    }

    async fn process_row(
        &self,
        source: &dyn RowSource,
        mut row: Row,
        target_key: &Arc<MasterKey>,
        counters: &mut Counters,
    ) -> RowOutcome {
        let target = self.checkpoint.target_version;
        for _ in 0..=MAX_CONFLICT_RETRIES {
            // A record, a stream object, or only the header of either.
            let info = match format::inspect_header(&row.ciphertext) {
                Ok(info) => info,
                Err(e) => {
                    return RowOutcome::Failed(format!("not a keyfold record or stream: {e}"));
                }
            };
            if info.key_version >= target {
                return RowOutcome::Skipped;
            }
            let new = match self.move_record(&row, info, target_key).await {
                Ok(new) => new,
                // The KMS is out of reach: every row would fail the same
                // way. Stop without moving the cursor past this row.
                Err(e @ CoreError::Sealed { .. }) => return RowOutcome::Abort(e),
                Err(e) => return RowOutcome::Failed(e.to_string()),
            };
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

    /// Moves one row to the target and verifies the result before it is
    /// written: a whole record or stream must decrypt; a header-only row
    /// (its payload stored elsewhere) must open under the target with its
    /// commitment intact.
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
        let new = match (info.kind, self.checkpoint.mode) {
            (HeaderKind::Record, Mode::Rewrap) if !header_only => {
                record::rewrap(&row.ciphertext, &from, target_key, ctx)?
            }
            (HeaderKind::Record, Mode::Reencrypt) => {
                record::reencrypt(&row.ciphertext, &from, target_key, ctx)?
            }
            (HeaderKind::Stream, Mode::Reencrypt) => {
                let mut out = Vec::with_capacity(row.ciphertext.len());
                stream::reencrypt(&from, target_key, ctx, &row.ciphertext[..], &mut out)?;
                out
            }
            // Header-only rewrap: the header alone, or a whole stream.
            _ => {
                let mut new = row.ciphertext.clone();
                record::rewrap_header_in_place(&mut new, &from, target_key, ctx)?;
                new
            }
        };
        // Never write what we cannot read back.
        if header_only {
            record::check_header(&new, target_key, ctx)?;
        } else {
            match info.kind {
                HeaderKind::Stream => {
                    stream::decrypt(target_key, ctx, &new[..], std::io::sink())?;
                }
                _ => drop(zeroize::Zeroizing::new(record::decrypt(
                    target_key, ctx, &new,
                )?)),
            }
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
