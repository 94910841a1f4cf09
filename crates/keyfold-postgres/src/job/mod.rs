//! The distributed rewrap job: N worker processes, on one machine or many,
//! run one rewrap job together through three tables (docs/LIFECYCLE.md,
//! "PostgreSQL"; DESIGN "Many instances, one store").
//!
//! - `<prefix>rewrap_jobs`: one row per job: its keyring, the target version
//!   pinned at creation, mode, batch size, shard lease, the time every row
//!   is read after (the evidence's `checked_at`) and, once every shard is
//!   done, `completed_at`.
//! - `<prefix>rewrap_shards`: the job's work, split at creation into id
//!   ranges of each source table ([`PgTable::split`]: quantiles of the ids).
//!   A worker claims a shard with `SELECT … FOR UPDATE SKIP LOCKED` and
//!   takes a lease on it (`lease_until`, on the database's clock); each claim
//!   bumps the shard's `epoch`, and every later write of the worker is fenced
//!   by it, so a worker whose lease lapsed and was taken over stops at its
//!   next batch. The row also carries the shard's counters, the rows it read
//!   and when it started and finished: progress and rows per second are
//!   readable with plain SQL, or with [`RewrapCoordinator::status`].
//! - `<prefix>rewrap_checkpoints`: per shard, the
//!   [`keyfold_rewrap::Checkpoint`] of the shard's
//!   [`RewrapJob`](keyfold_rewrap::RewrapJob), saved every
//!   [`checkpoint_interval`](RewrapWorker::checkpoint_interval) in the same
//!   statement that renews the lease.
//!
//! A shard is worked by a [`RewrapJob`](keyfold_rewrap::RewrapJob) over the source restricted to the
//! shard's range ([`PgTable::with_range`]: the bound is in the `WHERE`
//! clause, so a worker never fetches another shard's rows, and each row is
//! read once per pass whatever the number of workers). A worker that dies
//! loses its lease; another resumes the shard from its checkpoint, and
//! re-reads what was done since the last save. Writes are compare-and-swap,
//! so a stale worker racing the new owner loses nothing.
//!
//! [`RewrapCoordinator::completion`] answers only once every shard is done,
//! with a [`CompletionReport`] covering all of them, whose
//! [`evidence`](CompletionReport::evidence) authorizes a destroy when no row
//! failed. Before that there is no evidence, so destroy stays refused.

mod worker;

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::{Actor, AuditEvent, AuditKind, AuditSink, NoAudit};
use keyfold_core::keyring::Keyring;
use keyfold_core::time::{Clock, SystemClock, Timestamp};
use keyfold_rewrap::{
    Checkpoint, CompletionReport, Counters, JobError, Mode, Shard, SourceCheckpoint,
};
use sqlx::{PgPool, Row as _};

use crate::migrate::{MigrateError, Migration, TablePrefix, apply};
use crate::table::{IdRange, PgTable};

pub use worker::{MAX_REPORTED_FAILURES, RewrapWorker, WorkerReport};

/// The job tables' schema steps.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    component: "rewrap_job",
    version: 1,
    sql: job_tables_v1,
}];

fn job_tables_v1(p: &TablePrefix) -> String {
    let jobs = p.table("rewrap_jobs");
    let shards = p.table("rewrap_shards");
    let checkpoints = p.table("rewrap_checkpoints");
    format!(
        "CREATE TABLE {jobs} (
            id text PRIMARY KEY,
            keyring_id text NOT NULL,
            target_version integer NOT NULL,
            mode text NOT NULL,
            batch_size integer NOT NULL CHECK (batch_size > 0),
            shard_lease_ms bigint NOT NULL CHECK (shard_lease_ms > 0),
            sources text[] NOT NULL,
            rows_total bigint NOT NULL,
            started_at bigint NOT NULL,
            expires_at bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            completed_at timestamptz,
            failed text
        );
        CREATE TABLE {shards} (
            job_id text NOT NULL REFERENCES {jobs} (id) ON DELETE CASCADE,
            shard integer NOT NULL,
            source text NOT NULL,
            range_start text,
            range_end text,
            done boolean NOT NULL DEFAULT false,
            owner text,
            epoch bigint NOT NULL DEFAULT 0,
            lease_until timestamptz,
            claims integer NOT NULL DEFAULT 0,
            batches bigint NOT NULL DEFAULT 0,
            rows_read bigint NOT NULL DEFAULT 0,
            seen bigint NOT NULL DEFAULT 0,
            rewrapped bigint NOT NULL DEFAULT 0,
            skipped bigint NOT NULL DEFAULT 0,
            conflicts bigint NOT NULL DEFAULT 0,
            failed bigint NOT NULL DEFAULT 0,
            unresolved bigint NOT NULL DEFAULT 0,
            started_at timestamptz,
            updated_at timestamptz,
            finished_at timestamptz,
            PRIMARY KEY (job_id, shard)
        );
        CREATE TABLE {checkpoints} (
            job_id text NOT NULL,
            shard integer NOT NULL,
            checkpoint jsonb NOT NULL,
            saved_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job_id, shard),
            FOREIGN KEY (job_id, shard) REFERENCES {shards} (job_id, shard) ON DELETE CASCADE
        );"
    )
}

/// The distributed job failed, or could not be created or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DistributedJobError {
    /// No job with this id.
    #[error("no rewrap job {0:?}")]
    UnknownJob(String),
    /// The job stopped for good (its target was disabled, destroyed or
    /// rolled back, or its lease expired): create a new job.
    #[error("rewrap job {job_id} failed: {reason}")]
    JobFailed {
        /// The job.
        job_id: String,
        /// Why, as recorded in the job's row.
        reason: String,
    },
    /// This worker's keyring is not the job's.
    #[error("the job is over keyring {job:?}, this worker was given {given:?}")]
    WrongKeyring {
        /// The job's keyring.
        job: String,
        /// The worker's.
        given: String,
    },
    /// The job has a shard of a source this worker was given no table for.
    #[error("rewrap job has shards of source {0:?}, but no table of that name was given")]
    UnknownSource(String),
    /// No source tables were given.
    #[error("a rewrap job needs at least one source table")]
    NoSources,
    /// Two source tables with the same name.
    #[error("source {0:?} given twice")]
    DuplicateSource(String),
    /// An option out of range.
    #[error("invalid option: {0}")]
    InvalidOption(&'static str),
    /// One of the worker's lanes (each a task) was cancelled from outside,
    /// by the runtime shutting down: the worker stopped before its work
    /// was done; its shards' leases lapse and another worker resumes them.
    #[error("a rewrap worker lane was cancelled (the runtime is shutting down)")]
    LaneCancelled,
    /// The shard's rewrap job failed (keyring sealed, a source failing
    /// persistently, ...). The shard's lease was released.
    #[error(transparent)]
    Job(#[from] JobError),
    /// A stored checkpoint does not parse.
    #[error("stored checkpoint of shard {shard}: {source}")]
    Checkpoint {
        /// The shard.
        shard: i32,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Creating the job tables failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Options of a new distributed job.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DistributedJobOptions {
    /// Shards per source table (default 16): more shards than workers
    /// balances the load and makes a dead worker's share small.
    pub shards_per_source: u32,
    /// Rows per batch of a shard (default 1000).
    pub batch_size: usize,
    /// Rewrap (default) or re-encrypt.
    pub mode: Mode,
    /// The whole job's lease (default 7 days, as [`keyfold_rewrap`]'s).
    pub lease: Duration,
    /// How long a worker holds a shard without finishing a batch before
    /// another may take it over (default 30 s).
    pub shard_lease: Duration,
    /// The job's id (default: random).
    pub job_id: Option<String>,
}

impl Default for DistributedJobOptions {
    fn default() -> Self {
        DistributedJobOptions {
            shards_per_source: 16,
            batch_size: 1000,
            mode: Mode::Rewrap,
            lease: keyfold_rewrap::job::DEFAULT_LEASE,
            shard_lease: Duration::from_secs(30),
            job_id: None,
        }
    }
}

/// Where a job stands, read from its tables.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobStatus {
    /// The job.
    pub job_id: String,
    /// Its keyring.
    pub keyring_id: String,
    /// Its pinned target version.
    pub target_version: u32,
    /// Shards in all.
    pub shards: u64,
    /// Shards finished.
    pub shards_done: u64,
    /// Shards a live lease holds now.
    pub shards_leased: u64,
    /// Rows with a ciphertext when the job was created (an estimate of the
    /// work: rows come and go).
    pub rows_total: u64,
    /// Counters summed over the shards (as of each shard's last batch).
    pub totals: Counters,
    /// Rows the workers fetched from the database, counted when a shard's
    /// checkpoint is saved (conflict re-reads and resumed shards' re-reads
    /// included; what a killed worker read after its last save is not).
    pub rows_read: u64,
    /// Rows seen per second since the first shard was claimed (until the
    /// job completed).
    pub rows_per_second: f64,
    /// Every shard is done.
    pub completed: bool,
    /// Why the job stopped for good, if it did.
    pub failed: Option<String>,
}

/// A job's row, as workers need it.
#[derive(Debug, Clone)]
pub(crate) struct JobRow {
    pub(crate) id: String,
    pub(crate) keyring_id: String,
    pub(crate) target_version: u32,
    pub(crate) mode: Mode,
    pub(crate) batch_size: usize,
    pub(crate) shard_lease: Duration,
    pub(crate) started_at: Timestamp,
    pub(crate) expires_at: Timestamp,
    pub(crate) failed: Option<String>,
}

/// Creates distributed jobs and reads their state; makes workers.
#[derive(Debug, Clone)]
pub struct RewrapCoordinator {
    pool: PgPool,
    prefix: TablePrefix,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditSink>,
    actor: Actor,
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Rewrap => "rewrap",
        Mode::Reencrypt => "reencrypt",
    }
}

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn timestamp(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

impl RewrapCoordinator {
    /// Over the host's pool, with this crate's tables under `prefix`.
    pub fn new(pool: PgPool, prefix: TablePrefix) -> Self {
        RewrapCoordinator {
            pool,
            prefix,
            clock: Arc::new(SystemClock),
            audit: Arc::new(NoAudit),
            actor: Actor::new("keyfold-postgres-rewrap"),
        }
    }

    /// Where `kms.rewrap.started` (when a job is created) and
    /// `kms.rewrap.completed` (by the worker that finishes its last shard,
    /// with the totals of all shards) go, and as whom.
    #[must_use]
    pub fn audit(mut self, sink: Arc<dyn AuditSink>, actor: Actor) -> Self {
        self.audit = sink;
        self.actor = actor;
        self
    }

    /// Records an audit event about keyring `keyring_id`.
    pub(crate) fn emit(&self, keyring_id: &str, kind: AuditKind) {
        self.audit.record(AuditEvent {
            keyring_id: keyring_id.to_owned(),
            actor: self.actor.clone(),
            at: self.clock.now(),
            kind,
        });
    }

    /// The clock that stamps a new job's start (the time its evidence is
    /// dated) and that its workers check the job's lease on (tests inject a
    /// manual one; give the keyring the same).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Creates or upgrades the job tables (also part of
    /// [`migrate`](crate::migrate)); safe from every instance at once.
    ///
    /// # Errors
    /// [`MigrateError`].
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        apply(&self.pool, &self.prefix, MIGRATIONS).await
    }

    pub(crate) fn table(&self, name: &str) -> String {
        self.prefix.table(name)
    }

    pub(crate) fn shared_clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates a job over `sources`, pinning the keyring's active version as
    /// its target, and splits each source into shards. Workers started
    /// with [`worker`](Self::worker) then run it.
    ///
    /// Every source that holds records of the keyring must be given: the
    /// job's evidence covers the sources it was given and nothing else
    /// (docs/LIFECYCLE.md, "Evidence").
    ///
    /// # Errors
    /// [`DistributedJobError::NoSources`], `DuplicateSource`,
    /// `InvalidOption`; [`JobError::Keyring`] when the keyring has no active
    /// version; the database's.
    pub async fn create_job(
        &self,
        keyring: &Keyring,
        sources: &[PgTable],
        options: &DistributedJobOptions,
    ) -> Result<String, DistributedJobError> {
        use keyfold_rewrap::RowSource;
        if sources.is_empty() {
            return Err(DistributedJobError::NoSources);
        }
        let names: Vec<String> = sources.iter().map(|s| s.name().to_owned()).collect();
        for (i, n) in names.iter().enumerate() {
            if names.iter().skip(i + 1).any(|m| m == n) {
                return Err(DistributedJobError::DuplicateSource(n.clone()));
            }
        }
        let batch_size = i32::try_from(options.batch_size)
            .ok()
            .filter(|&b| b > 0)
            .ok_or(DistributedJobError::InvalidOption(
                "batch_size must be 1..=2^31-1",
            ))?;
        let lease_ms = i64::try_from(options.shard_lease.as_millis())
            .ok()
            .filter(|&ms| ms > 0)
            .ok_or(DistributedJobError::InvalidOption(
                "shard_lease must be at least 1 ms",
            ))?;
        if options.shards_per_source == 0 || options.shards_per_source > 65_536 {
            return Err(DistributedJobError::InvalidOption(
                "shards_per_source must be 1..=65536",
            ));
        }
        let target = keyring
            .active_version()
            .ok_or(JobError::Keyring(keyfold_core::Error::NoActiveVersion))?;
        let job_id = match &options.job_id {
            Some(id) => id.clone(),
            None => random_id()?,
        };
        // Split before stamping the start: the evidence is dated no earlier
        // than any read the job will make.
        let mut shards: Vec<(String, IdRange)> = Vec::new();
        let mut rows_total = 0i64;
        for s in sources {
            rows_total = rows_total.saturating_add(s.count_rows().await?);
            for range in s.split(options.shards_per_source).await? {
                shards.push((s.name().to_owned(), range));
            }
        }
        let started_at = self.clock.now();
        let expires_at = started_at.saturating_add(options.lease);

        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {} (id, keyring_id, target_version, mode, batch_size, shard_lease_ms, \
             sources, rows_total, started_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            self.table("rewrap_jobs")
        ))
        .bind(&job_id)
        .bind(keyring.id())
        .bind(i64::from(target))
        .bind(mode_name(options.mode))
        .bind(batch_size)
        .bind(lease_ms)
        .bind(&names)
        .bind(rows_total)
        .bind(timestamp(started_at))
        .bind(timestamp(expires_at))
        .execute(&mut *tx)
        .await?;
        let numbers: Vec<i32> = (0..).take(shards.len()).collect();
        let (shard_sources, ranges): (Vec<String>, Vec<IdRange>) = shards.into_iter().unzip();
        let starts: Vec<Option<String>> = ranges.iter().map(|r| r.start.clone()).collect();
        let ends: Vec<Option<String>> = ranges.into_iter().map(|r| r.end).collect();
        sqlx::query(&format!(
            "INSERT INTO {} (job_id, shard, source, range_start, range_end) \
             SELECT $1, * FROM unnest($2::integer[], $3::text[], $4::text[], $5::text[])",
            self.table("rewrap_shards")
        ))
        .bind(&job_id)
        .bind(&numbers)
        .bind(&shard_sources)
        .bind(&starts)
        .bind(&ends)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.emit(
            keyring.id(),
            AuditKind::RewrapStarted {
                job_id: job_id.clone(),
                target_version: target,
            },
        );
        Ok(job_id)
    }

    /// Where job `job_id` stands: shards done and leased, counters, rows
    /// read, rows per second.
    ///
    /// # Errors
    /// [`DistributedJobError::UnknownJob`]; the database's.
    pub async fn status(&self, job_id: &str) -> Result<JobStatus, DistributedJobError> {
        let r = sqlx::query(&format!(
            "SELECT j.keyring_id, j.target_version, j.rows_total, j.failed, \
               count(s.shard), count(s.shard) FILTER (WHERE s.done), \
               count(s.shard) FILTER (WHERE NOT s.done AND s.lease_until > now()), \
               coalesce(sum(s.seen), 0)::bigint, coalesce(sum(s.rewrapped), 0)::bigint, \
               coalesce(sum(s.skipped), 0)::bigint, coalesce(sum(s.conflicts), 0)::bigint, \
               coalesce(sum(s.failed), 0)::bigint, coalesce(sum(s.unresolved), 0)::bigint, \
               coalesce(sum(s.rows_read), 0)::bigint, \
               extract(epoch FROM (coalesce(j.completed_at, now()) - min(s.started_at)))::float8 \
             FROM {} j LEFT JOIN {} s ON s.job_id = j.id \
             WHERE j.id = $1 GROUP BY j.id",
            self.table("rewrap_jobs"),
            self.table("rewrap_shards")
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DistributedJobError::UnknownJob(job_id.to_owned()))?;
        let shards = as_u64(r.try_get(4)?);
        let shards_done = as_u64(r.try_get(5)?);
        let totals = Counters {
            seen: as_u64(r.try_get(7)?),
            rewrapped: as_u64(r.try_get(8)?),
            skipped: as_u64(r.try_get(9)?),
            conflicts: as_u64(r.try_get(10)?),
            failed: as_u64(r.try_get(11)?),
            unresolved: as_u64(r.try_get(12)?),
        };
        let elapsed: Option<f64> = r.try_get(14)?;
        let rows_per_second = match elapsed {
            Some(secs) if secs > 0.0 => totals.seen as f64 / secs,
            _ => 0.0,
        };
        let target: i32 = r.try_get(1)?;
        Ok(JobStatus {
            job_id: job_id.to_owned(),
            keyring_id: r.try_get(0)?,
            target_version: u32::try_from(target).unwrap_or(0),
            shards,
            shards_done,
            shards_leased: as_u64(r.try_get(6)?),
            rows_total: as_u64(r.try_get(2)?),
            totals,
            rows_read: as_u64(r.try_get(13)?),
            rows_per_second,
            completed: shards > 0 && shards_done == shards,
            failed: r.try_get(3)?,
        })
    }

    /// The job's completion report, once **every** shard is done; `None`
    /// before. Its [`evidence`](CompletionReport::evidence) covers all
    /// shards (and only the sources the job was created with), is dated
    /// when the job was created, and exists only when no row failed.
    ///
    /// # Errors
    /// [`DistributedJobError::UnknownJob`]; `JobFailed`; the database's.
    pub async fn completion(
        &self,
        job_id: &str,
    ) -> Result<Option<CompletionReport>, DistributedJobError> {
        let status = self.status(job_id).await?;
        if let Some(reason) = status.failed {
            return Err(DistributedJobError::JobFailed {
                job_id: job_id.to_owned(),
                reason,
            });
        }
        if !status.completed {
            return Ok(None);
        }
        let job = self.job_row(job_id).await?;
        Ok(Some(CompletionReport {
            keyring_id: job.keyring_id,
            job_id: job.id,
            target_version: job.target_version,
            shard: Shard::ALL,
            totals: status.totals,
            started_at: job.started_at,
        }))
    }

    /// A worker for job `job_id`: give it the keyring (any instance over the
    /// same store) and a table for every source of the job, by name.
    pub fn worker(
        &self,
        job_id: &str,
        keyring: Arc<Keyring>,
        sources: Vec<PgTable>,
    ) -> RewrapWorker {
        RewrapWorker::new(self.clone(), job_id.to_owned(), keyring, sources)
    }

    pub(crate) async fn job_row(&self, job_id: &str) -> Result<JobRow, DistributedJobError> {
        let r = sqlx::query(&format!(
            "SELECT keyring_id, target_version, mode, batch_size, shard_lease_ms, started_at, \
             expires_at, failed FROM {} WHERE id = $1",
            self.table("rewrap_jobs")
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DistributedJobError::UnknownJob(job_id.to_owned()))?;
        let target: i32 = r.try_get(1)?;
        let mode: String = r.try_get(2)?;
        let batch: i32 = r.try_get(3)?;
        let lease_ms: i64 = r.try_get(4)?;
        let started: i64 = r.try_get(5)?;
        let expires: i64 = r.try_get(6)?;
        Ok(JobRow {
            id: job_id.to_owned(),
            keyring_id: r.try_get(0)?,
            target_version: u32::try_from(target).unwrap_or(0),
            mode: if mode == "reencrypt" {
                Mode::Reencrypt
            } else {
                Mode::Rewrap
            },
            batch_size: usize::try_from(batch).unwrap_or(1).max(1),
            shard_lease: Duration::from_millis(as_u64(lease_ms)),
            started_at: Timestamp(as_u64(started)),
            expires_at: Timestamp(as_u64(expires)),
            failed: r.try_get(7)?,
        })
    }

    /// A shard's first checkpoint: nothing read yet, target and start pinned
    /// by the job.
    pub(crate) fn fresh_checkpoint(job: &JobRow, shard: i32, source: &str) -> Checkpoint {
        Checkpoint {
            schema: 1,
            job_id: format!("{}/{shard}", job.id),
            keyring_id: job.keyring_id.clone(),
            target_version: job.target_version,
            mode: job.mode,
            shard: Shard::ALL,
            started_at: job.started_at,
            lease_expires_at: job.expires_at,
            sources: vec![SourceCheckpoint {
                name: source.to_owned(),
                cursor: None,
                exhausted: false,
                counters: Counters::default(),
            }],
            batches: 0,
            completed: false,
        }
    }

    /// Records that the job stopped for good.
    pub(crate) async fn fail_job(&self, job_id: &str, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET failed = $2 WHERE id = $1 AND failed IS NULL",
            self.table("rewrap_jobs")
        ))
        .bind(job_id)
        .bind(reason)
        .execute(&self.pool)
        .await
        .map(drop)
    }
}

fn random_id() -> Result<String, JobError> {
    let mut bytes = [0u8; 16];
    keyfold_core::rng::fill(&mut bytes).map_err(|e| JobError::Keyring(e.into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
