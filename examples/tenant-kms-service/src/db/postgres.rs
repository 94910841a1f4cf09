//! PostgreSQL (`--database postgres://…`): what a fleet of service
//! instances shares.
//!
//! - keyrings in keyfold-postgres's [`PgKeyringStore`] (compare-and-swap,
//!   `LISTEN`/`NOTIFY`, so a disable on one instance reaches the others in
//!   milliseconds);
//! - the service's own tables under the prefix `tks_` (tenant configs,
//!   secrets, step-up state, rewrap job rows), created by the first
//!   instance to start (under an advisory lock, so three starting at once
//!   do not race);
//! - the audit log in `tks_audit_log`, append-only (a trigger refuses
//!   `UPDATE`, `DELETE` and `TRUNCATE`) and hash-chained like
//!   keyfold-postgres's `PgAuditSink` (`hash(n) = SHA-256("tenant-kms-audit-v1"
//!   0x00 || hash(n-1) || content(n))`, writers serialised on the one-row
//!   head `tks_audit_head`); [`PgDb::verify_audit`] finds the first row
//!   edited, removed or reordered;
//! - the rewrap job: keyfold-postgres's distributed job, its shards shared
//!   by every instance ([`PgDb::secret_tables`], [`PgDb::coordinator`]).
//!
//! Secrets tables have a bigint identity id (the job's keyset order) and
//! are scoped per tenant with [`PgTable::scope`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keyfold::keyring::StoredKeyring;
use keyfold::postgres::{PgKeyringStore, PgTable, RewrapCoordinator, TableError, TablePrefix};
use keyfold::store::{Revision, StoreError};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row as _};
use tokio::sync::{mpsc, oneshot};

use super::{
    AuditRow, DbError, Factor, Grant, JobRow, PendingConfig, RowFailureRow, SECRET_VERSIONS,
    SECRETS, SecretRow,
};

/// The service's tables, created once (every statement idempotent).
const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS tks_tenant_kms (
    tenant text PRIMARY KEY, config text NOT NULL, updated_at bigint NOT NULL);
CREATE TABLE IF NOT EXISTS tks_secrets (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL, name text NOT NULL, version integer NOT NULL,
    ciphertext bytea NOT NULL, created_at bigint NOT NULL,
    UNIQUE (tenant, name));
CREATE INDEX IF NOT EXISTS tks_secrets_by_tenant ON tks_secrets (tenant, id);
CREATE TABLE IF NOT EXISTS tks_secret_versions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL, name text NOT NULL, version integer NOT NULL,
    ciphertext bytea NOT NULL, created_at bigint NOT NULL,
    UNIQUE (tenant, name, version));
CREATE INDEX IF NOT EXISTS tks_secret_versions_by_tenant ON tks_secret_versions (tenant, id);
CREATE TABLE IF NOT EXISTS tks_rewrap_jobs (
    tenant text PRIMARY KEY, job_id text NOT NULL, status text NOT NULL,
    error text, checkpoint text NOT NULL, updated_at bigint NOT NULL);
CREATE TABLE IF NOT EXISTS tks_rewrap_leases (
    lease_id text PRIMARY KEY, tenant text NOT NULL, version integer NOT NULL,
    issued_at bigint NOT NULL);
CREATE TABLE IF NOT EXISTS tks_rewrap_failures (
    tenant text NOT NULL, job_id text NOT NULL, source text NOT NULL, row_id text NOT NULL,
    error text NOT NULL, attempts integer NOT NULL, next_retry_at_ms bigint NOT NULL,
    PRIMARY KEY (tenant, source, row_id));
CREATE TABLE IF NOT EXISTS tks_step_up_factors (
    tenant text PRIMARY KEY, admin text NOT NULL, secret bytea NOT NULL,
    last_step bigint NOT NULL DEFAULT -1, created_at bigint NOT NULL);
CREATE TABLE IF NOT EXISTS tks_step_up_tokens (
    token_hash text PRIMARY KEY, tenant text NOT NULL, action text NOT NULL,
    target text NOT NULL, issued_at_ms bigint NOT NULL, expires_at_ms bigint NOT NULL);
CREATE TABLE IF NOT EXISTS tks_step_up_failures (tenant text NOT NULL, at_ms bigint NOT NULL);
CREATE INDEX IF NOT EXISTS tks_step_up_failures_by_tenant ON tks_step_up_failures (tenant, at_ms);
CREATE TABLE IF NOT EXISTS tks_audit_log (
    seq bigint PRIMARY KEY CHECK (seq > 0), tenant text NOT NULL, at bigint NOT NULL,
    event text NOT NULL, actor text NOT NULL, client_ip text, detail text NOT NULL,
    prev_hash bytea NOT NULL, hash bytea NOT NULL);
CREATE INDEX IF NOT EXISTS tks_audit_log_by_tenant ON tks_audit_log (tenant, seq);
CREATE TABLE IF NOT EXISTS tks_audit_head (
    id boolean PRIMARY KEY DEFAULT true CHECK (id), seq bigint NOT NULL, hash bytea NOT NULL);
INSERT INTO tks_audit_head (id, seq, hash) VALUES (true, 0, decode(repeat('00', 32), 'hex'))
    ON CONFLICT (id) DO NOTHING;
CREATE OR REPLACE FUNCTION tks_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'tks_audit_log is append-only';
END
$$;
DROP TRIGGER IF EXISTS tks_audit_no_change ON tks_audit_log;
CREATE TRIGGER tks_audit_no_change BEFORE UPDATE OR DELETE ON tks_audit_log
    FOR EACH ROW EXECUTE FUNCTION tks_audit_append_only();
DROP TRIGGER IF EXISTS tks_audit_no_truncate ON tks_audit_log;
CREATE TRIGGER tks_audit_no_truncate BEFORE TRUNCATE ON tks_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION tks_audit_append_only();
";

/// The advisory lock the schema set-up runs under (any constant the
/// service alone uses).
const SCHEMA_LOCK: i64 = 0x746b_735f_7363_6831;

/// Domain separation of the audit chain's hash.
const AUDIT_DOMAIN: &[u8] = b"tenant-kms-audit-v1\0";

/// Most audit entries one background append writes in one transaction.
const AUDIT_BATCH: usize = 256;

/// One audit entry waiting to be written.
#[derive(Debug, Clone)]
struct Entry {
    tenant: String,
    at: u64,
    event: String,
    actor: String,
    client_ip: Option<String>,
    detail: String,
}

impl Entry {
    /// The hashed content of row `seq`: canonical JSON of every column.
    fn content(&self, seq: i64) -> Vec<u8> {
        serde_json::json!([
            seq,
            self.tenant,
            self.at,
            self.event,
            self.actor,
            self.client_ip,
            self.detail
        ])
        .to_string()
        .into_bytes()
    }
}

enum AuditMsg {
    Entry(Entry),
    Flush(oneshot::Sender<()>),
}

/// `SHA-256("tenant-kms-audit-v1" 0x00 || prev || content)`.
fn chain_hash(prev: &[u8], content: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(AUDIT_DOMAIN);
    h.update(prev);
    h.update(content);
    h.finalize().to_vec()
}

/// Where the audit chain was first found broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditTamper {
    /// Row `seq` no longer hashes to what was written (or chains to
    /// another row).
    Edited {
        /// The row.
        seq: i64,
    },
    /// Rows are missing after row `after` (a gap, or fewer rows than the
    /// head counts).
    Removed {
        /// The last row before the gap.
        after: i64,
    },
}

/// The PostgreSQL database.
#[derive(Clone)]
pub struct PgDb {
    pool: PgPool,
    store: PgKeyringStore,
    coordinator: RewrapCoordinator,
    audit: mpsc::UnboundedSender<AuditMsg>,
    /// Why the audit writer last failed, once it gave up on entries.
    audit_failed: Arc<Mutex<Option<String>>>,
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn secret(name: &str, (version, ciphertext): (i32, Vec<u8>)) -> SecretRow {
    SecretRow {
        name: name.to_owned(),
        version: u32::try_from(version).unwrap_or(0),
        ciphertext,
    }
}

impl PgDb {
    /// Connects, creates keyfold-postgres's tables and the service's, and
    /// starts the audit writer.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn open(url: &str) -> Result<PgDb, DbError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        let prefix = TablePrefix::default();
        keyfold::postgres::migrate(&pool, &prefix)
            .await
            .map_err(|e| DbError::Setup(format!("keyfold-postgres tables: {e}")))?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await?;

        let (audit, rx) = mpsc::unbounded_channel();
        let audit_failed = Arc::new(Mutex::new(None));
        tokio::spawn(write_audit(pool.clone(), rx, Arc::clone(&audit_failed)));
        Ok(PgDb {
            store: PgKeyringStore::new(pool.clone(), prefix.clone()),
            coordinator: RewrapCoordinator::new(pool.clone(), prefix),
            pool,
            audit,
            audit_failed,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The keyring store.
    pub fn store(&self) -> &PgKeyringStore {
        &self.store
    }

    /// The distributed rewrap job's coordinator.
    pub fn coordinator(&self) -> &RewrapCoordinator {
        &self.coordinator
    }

    /// The tenant's two secret tables as rewrap sources, named like the
    /// SQLite ones ([`SECRETS`], [`SECRET_VERSIONS`]), scoped to the tenant,
    /// with the context [`secret_context`](super::secret_context) builds.
    ///
    /// # Errors
    /// [`TableError`] (the tables are the service's own: only when the
    /// database fails).
    pub async fn secret_tables(&self, tenant: &str) -> Result<Vec<PgTable>, TableError> {
        let mut out = Vec::new();
        for (table, name) in [
            ("tks_secrets", SECRETS),
            ("tks_secret_versions", SECRET_VERSIONS),
        ] {
            out.push(
                PgTable::builder(table)
                    .id_column("id")
                    .ciphertext_column("ciphertext")
                    .context_column("tenant", "tenant")
                    .context_constant("kind", "secret")
                    .context_column("name", "name")
                    .context_column("version", "version")
                    .scope("tenant", tenant)
                    .source_name(name)
                    .build(&self.pool)
                    .await?,
            );
        }
        Ok(out)
    }

    pub(super) async fn save_keyring(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
        pending: Option<&PendingConfig>,
    ) -> Result<Revision, StoreError> {
        use keyfold::store::KeyringStore as _;
        let Some(pending) = pending else {
            return self.store.save(keyring_id, expected, keyring).await;
        };
        let backend = |e: sqlx::Error| StoreError::Backend(Box::new(e));
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let saved = self
            .store
            .save_in(&mut tx, keyring_id, expected, keyring)
            .await?;
        sqlx::query(
            "INSERT INTO tks_tenant_kms (tenant, config, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (tenant) DO UPDATE SET config = $2, updated_at = $3",
        )
        .bind(keyring_id)
        .bind(&pending.json)
        .bind(i64_of(keyfold::time::Timestamp::now().as_secs()))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(saved)
    }

    // ----- tenant configs ------------------------------------------------

    pub(super) async fn tenant_config(&self, tenant: &str) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar("SELECT config FROM tks_tenant_kms WHERE tenant = $1")
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await
    }

    pub(super) async fn set_tenant_config(
        &self,
        tenant: &str,
        config: &str,
        now: u64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO tks_tenant_kms (tenant, config, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (tenant) DO UPDATE SET config = $2, updated_at = $3",
        )
        .bind(tenant)
        .bind(config)
        .bind(i64_of(now))
        .execute(&self.pool)
        .await
        .map(drop)
    }

    // ----- secrets -------------------------------------------------------

    pub(super) async fn current_secret(
        &self,
        tenant: &str,
        name: &str,
    ) -> sqlx::Result<Option<SecretRow>> {
        let row: Option<(i32, Vec<u8>)> = sqlx::query_as(
            "SELECT version, ciphertext FROM tks_secrets WHERE tenant = $1 AND name = $2",
        )
        .bind(tenant)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| secret(name, r)))
    }

    pub(super) async fn next_secret_version(&self, tenant: &str, name: &str) -> sqlx::Result<u32> {
        let max: i32 = sqlx::query_scalar(
            "SELECT GREATEST(
                 (SELECT COALESCE(MAX(version), 0) FROM tks_secrets WHERE tenant = $1 AND name = $2),
                 (SELECT COALESCE(MAX(version), 0) FROM tks_secret_versions
                  WHERE tenant = $1 AND name = $2))",
        )
        .bind(tenant)
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(max).unwrap_or(0).saturating_add(1))
    }

    pub(super) async fn replace_secret(
        &self,
        tenant: &str,
        previous: Option<&SecretRow>,
        new: &SecretRow,
        history: Option<&SecretRow>,
        now: u64,
    ) -> sqlx::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let current: Option<(i32, Vec<u8>)> = sqlx::query_as(
            "SELECT version, ciphertext FROM tks_secrets WHERE tenant = $1 AND name = $2
             FOR UPDATE",
        )
        .bind(tenant)
        .bind(&new.name)
        .fetch_optional(&mut *tx)
        .await?;
        let matches = match (previous, &current) {
            (None, None) => true,
            (Some(p), Some((v, ct))) => {
                i64::from(p.version) == i64::from(*v) && &p.ciphertext == ct
            }
            _ => false,
        };
        if !matches {
            return Ok(false);
        }
        if let Some(h) = history {
            sqlx::query(
                "INSERT INTO tks_secret_versions (tenant, name, version, ciphertext, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (tenant, name, version)
                 DO UPDATE SET ciphertext = $4, created_at = $5",
            )
            .bind(tenant)
            .bind(&h.name)
            .bind(i64::from(h.version))
            .bind(&h.ciphertext)
            .bind(i64_of(now))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "DELETE FROM tks_secret_versions WHERE tenant = $1 AND name = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(&new.name)
        .bind(i64::from(new.version))
        .execute(&mut *tx)
        .await?;
        // No current row: another writer may insert one meanwhile (a row
        // lock cannot cover a row that does not exist); DO NOTHING makes
        // that a lost race, not an overwrite.
        let written = sqlx::query(
            "INSERT INTO tks_secrets (tenant, name, version, ciphertext, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, name) DO UPDATE SET version = $3, ciphertext = $4, created_at = $5
             WHERE $6",
        )
        .bind(tenant)
        .bind(&new.name)
        .bind(i64::from(new.version))
        .bind(&new.ciphertext)
        .bind(i64_of(now))
        .bind(current.is_some())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if written != 1 {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn previous_secret(
        &self,
        tenant: &str,
        name: &str,
        below: u32,
    ) -> sqlx::Result<Option<SecretRow>> {
        let row: Option<(i32, Vec<u8>)> = sqlx::query_as(
            "SELECT version, ciphertext FROM tks_secret_versions
             WHERE tenant = $1 AND name = $2 AND version < $3
             ORDER BY version DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(name)
        .bind(i64::from(below))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| secret(name, r)))
    }

    pub(super) async fn cas_secret(
        &self,
        tenant: &str,
        name: &str,
        expected: &[u8],
        new: &[u8],
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE tks_secrets SET ciphertext = $1
             WHERE tenant = $2 AND name = $3 AND ciphertext = $4",
        )
        .bind(new)
        .bind(tenant)
        .bind(name)
        .bind(expected)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn all_ciphertexts(&self, tenant: &str) -> sqlx::Result<Vec<Vec<u8>>> {
        sqlx::query_scalar(
            "SELECT ciphertext FROM tks_secrets WHERE tenant = $1
             UNION ALL SELECT ciphertext FROM tks_secret_versions WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
    }

    // ----- rewrap jobs -----------------------------------------------------

    pub(super) async fn insert_lease(
        &self,
        lease_id: &str,
        tenant: &str,
        version: u32,
        now: u64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO tks_rewrap_leases (lease_id, tenant, version, issued_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (lease_id) DO NOTHING",
        )
        .bind(lease_id)
        .bind(tenant)
        .bind(i64::from(version))
        .bind(i64_of(now))
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn job(&self, tenant: &str) -> sqlx::Result<Option<JobRow>> {
        let row: Option<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT job_id, status, error, checkpoint FROM tks_rewrap_jobs WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(job_id, status, error, checkpoint)| JobRow {
            job_id,
            status,
            error,
            checkpoint,
        }))
    }

    pub(super) async fn save_job(&self, tenant: &str, job: &JobRow, now: u64) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO tks_rewrap_jobs (tenant, job_id, status, error, checkpoint, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant) DO UPDATE SET
                 job_id = $2, status = $3, error = $4, checkpoint = $5, updated_at = $6",
        )
        .bind(tenant)
        .bind(&job.job_id)
        .bind(&job.status)
        .bind(&job.error)
        .bind(&job.checkpoint)
        .bind(i64_of(now))
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn update_job(
        &self,
        tenant: &str,
        job_id: &str,
        job: &JobRow,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE tks_rewrap_jobs SET job_id = $3, status = $4, error = $5, checkpoint = $6
             WHERE tenant = $1 AND job_id = $2",
        )
        .bind(tenant)
        .bind(job_id)
        .bind(&job.job_id)
        .bind(&job.status)
        .bind(&job.error)
        .bind(&job.checkpoint)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn record_row_failure(
        &self,
        tenant: &str,
        f: &RowFailureRow,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO tks_rewrap_failures
                 (tenant, job_id, source, row_id, error, attempts, next_retry_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant, source, row_id) DO UPDATE SET
                 job_id = $2, error = $5, attempts = $6, next_retry_at_ms = $7",
        )
        .bind(tenant)
        .bind(&f.job_id)
        .bind(&f.source)
        .bind(&f.row_id)
        .bind(&f.error)
        .bind(i64::from(f.attempts))
        .bind(f.next_retry_at_ms)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn row_failures(&self, tenant: &str) -> sqlx::Result<Vec<RowFailureRow>> {
        let rows: Vec<(String, String, String, String, i32, i64)> = sqlx::query_as(
            "SELECT job_id, source, row_id, error, attempts, next_retry_at_ms
             FROM tks_rewrap_failures WHERE tenant = $1
             ORDER BY next_retry_at_ms, source, row_id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(job_id, source, row_id, error, attempts, next_retry_at_ms)| RowFailureRow {
                    job_id,
                    source,
                    row_id,
                    error,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    next_retry_at_ms,
                },
            )
            .collect())
    }

    pub(super) async fn resolve_row_failure(
        &self,
        tenant: &str,
        source: &str,
        row_id: &str,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "DELETE FROM tks_rewrap_failures WHERE tenant = $1 AND source = $2 AND row_id = $3",
        )
        .bind(tenant)
        .bind(source)
        .bind(row_id)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn clear_row_failures_except(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM tks_rewrap_failures WHERE tenant = $1 AND job_id <> $2")
            .bind(tenant)
            .bind(job_id)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    pub(super) async fn set_job_status(
        &self,
        tenant: &str,
        job_id: &str,
        status: &str,
    ) -> sqlx::Result<()> {
        sqlx::query("UPDATE tks_rewrap_jobs SET status = $3 WHERE tenant = $1 AND job_id = $2")
            .bind(tenant)
            .bind(job_id)
            .bind(status)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    // ----- step-up ---------------------------------------------------------

    pub(super) async fn enrol_factor(
        &self,
        tenant: &str,
        admin: &str,
        secret: &[u8],
        now: u64,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "INSERT INTO tks_step_up_factors (tenant, admin, secret, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant) DO NOTHING",
        )
        .bind(tenant)
        .bind(admin)
        .bind(secret)
        .bind(i64_of(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn factor(&self, tenant: &str) -> sqlx::Result<Option<Factor>> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT secret, last_step FROM tks_step_up_factors WHERE tenant = $1")
                .bind(tenant)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(secret, last_step)| Factor { secret, last_step }))
    }

    pub(super) async fn use_factor_step(&self, tenant: &str, step: u64) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE tks_step_up_factors SET last_step = $2 WHERE tenant = $1 AND last_step < $2",
        )
        .bind(tenant)
        .bind(i64_of(step))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn record_step_up_failure(
        &self,
        tenant: &str,
        at_ms: i64,
    ) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO tks_step_up_failures (tenant, at_ms) VALUES ($1, $2)")
            .bind(tenant)
            .bind(at_ms)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    pub(super) async fn release_step_up_attempt(
        &self,
        tenant: &str,
        at_ms: i64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "DELETE FROM tks_step_up_failures WHERE ctid = (
                 SELECT ctid FROM tks_step_up_failures WHERE tenant = $1 AND at_ms = $2 LIMIT 1)",
        )
        .bind(tenant)
        .bind(at_ms)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn step_up_failures(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> sqlx::Result<(u32, Option<i64>)> {
        sqlx::query("DELETE FROM tks_step_up_failures WHERE tenant = $1 AND at_ms <= $2")
            .bind(tenant)
            .bind(since_ms)
            .execute(&self.pool)
            .await?;
        let (n, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(at_ms) FROM tks_step_up_failures WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok((u32::try_from(n).unwrap_or(u32::MAX), oldest))
    }

    pub(super) async fn insert_grant(
        &self,
        token_hash: &str,
        grant: &Grant,
        now_ms: i64,
    ) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM tks_step_up_tokens WHERE expires_at_ms <= $1")
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO tks_step_up_tokens
                 (token_hash, tenant, action, target, issued_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(token_hash)
        .bind(&grant.tenant)
        .bind(&grant.action)
        .bind(&grant.target)
        .bind(now_ms)
        .bind(grant.expires_at_ms)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub(super) async fn take_grant(&self, token_hash: &str) -> sqlx::Result<Option<Grant>> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "DELETE FROM tks_step_up_tokens WHERE token_hash = $1
             RETURNING tenant, action, target, expires_at_ms",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(tenant, action, target, expires_at_ms)| Grant {
            tenant,
            action,
            target,
            expires_at_ms,
        }))
    }

    // ----- audit -----------------------------------------------------------

    pub(super) fn append_audit(
        &self,
        tenant: &str,
        at: u64,
        event: &str,
        actor: &str,
        client_ip: Option<&str>,
        detail: &str,
    ) -> Result<(), DbError> {
        let entry = Entry {
            tenant: tenant.to_owned(),
            at,
            event: event.to_owned(),
            actor: actor.to_owned(),
            client_ip: client_ip.map(str::to_owned),
            detail: detail.to_owned(),
        };
        self.audit
            .send(AuditMsg::Entry(entry))
            .map_err(|_| DbError::Setup("the audit writer has stopped".into()))
    }

    /// Waits until every entry queued before is written (or given up on).
    ///
    /// # Errors
    /// `Setup` naming the last write failure, when entries were lost.
    pub async fn flush_audit(&self) -> Result<(), DbError> {
        let (done, wait) = oneshot::channel();
        if self.audit.send(AuditMsg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
        match self
            .audit_failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            Some(e) => Err(DbError::Setup(format!(
                "audit entries were not written: {e}"
            ))),
            None => Ok(()),
        }
    }

    pub(super) async fn audit(&self, tenant: &str) -> Result<Vec<AuditRow>, DbError> {
        self.flush_audit().await?;
        let rows = sqlx::query(
            "SELECT seq, at, event, actor, client_ip, detail FROM tks_audit_log
             WHERE tenant = $1 ORDER BY seq",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get(5)?;
                Ok(AuditRow {
                    seq: r.try_get(0)?,
                    at: u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
                    event: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    client_ip: r.try_get(4)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect::<sqlx::Result<_>>()
            .map_err(DbError::from)
    }

    /// Walks the whole audit chain: `None` when it is intact, else the
    /// first row edited, removed or reordered.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn verify_audit(&self) -> Result<Option<AuditTamper>, DbError> {
        self.flush_audit().await?;
        // One snapshot for the rows and the head: appends by other
        // instances meanwhile are neither half seen nor taken for removals.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT seq, tenant, at, event, actor, client_ip, detail, prev_hash, hash
             FROM tks_audit_log ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut prev = vec![0u8; 32];
        let mut last = 0i64;
        for r in &rows {
            let seq: i64 = r.try_get(0)?;
            if seq != last + 1 {
                return Ok(Some(AuditTamper::Removed { after: last }));
            }
            let entry = Entry {
                tenant: r.try_get(1)?,
                at: u64::try_from(r.try_get::<i64, _>(2)?).unwrap_or(0),
                event: r.try_get(3)?,
                actor: r.try_get(4)?,
                client_ip: r.try_get(5)?,
                detail: r.try_get(6)?,
            };
            let prev_hash: Vec<u8> = r.try_get(7)?;
            let hash: Vec<u8> = r.try_get(8)?;
            if prev_hash != prev || chain_hash(&prev, &entry.content(seq)) != hash {
                return Ok(Some(AuditTamper::Edited { seq }));
            }
            prev = hash;
            last = seq;
        }
        let (head_seq, head_hash): (i64, Vec<u8>) =
            sqlx::query_as("SELECT seq, hash FROM tks_audit_head")
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        if head_seq != last {
            return Ok(Some(AuditTamper::Removed { after: last }));
        }
        if head_hash != prev {
            return Ok(Some(AuditTamper::Edited { seq: last }));
        }
        Ok(None)
    }
}

/// Appends `entries` after the chain head, in one transaction.
async fn append_entries(pool: &PgPool, entries: &[Entry]) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    let (mut seq, mut prev): (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, hash FROM tks_audit_head WHERE id FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    for e in entries {
        seq += 1;
        let hash = chain_hash(&prev, &e.content(seq));
        sqlx::query(
            "INSERT INTO tks_audit_log
                 (seq, tenant, at, event, actor, client_ip, detail, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(seq)
        .bind(&e.tenant)
        .bind(i64_of(e.at))
        .bind(&e.event)
        .bind(&e.actor)
        .bind(&e.client_ip)
        .bind(&e.detail)
        .bind(&prev)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
        prev = hash;
    }
    sqlx::query("UPDATE tks_audit_head SET seq = $1, hash = $2 WHERE id")
        .bind(seq)
        .bind(&prev)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The audit writer: appends queued entries in order, in batches, retrying
/// a failed batch three times; entries it gives up on are counted in
/// `keyfold_audit_write_failures_total` and named in the operator log, and
/// [`PgDb::flush_audit`] reports the failure from then on.
async fn write_audit(
    pool: PgPool,
    mut rx: mpsc::UnboundedReceiver<AuditMsg>,
    failed: Arc<Mutex<Option<String>>>,
) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                AuditMsg::Entry(e) => batch.push(e),
                AuditMsg::Flush(done) => {
                    flushes.push(done);
                    break;
                }
            }
            if batch.len() >= AUDIT_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            let mut result = append_entries(&pool, &batch).await;
            for delay in [100, 400, 1600] {
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(delay)).await;
                result = append_entries(&pool, &batch).await;
            }
            if result.is_ok() {
                // Written: what failed before was reported (log, metric,
                // flush errors) and is not held against later entries.
                *failed.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            if let Err(e) = result {
                for entry in &batch {
                    crate::error::operator_log(format_args!(
                        "AUDIT WRITE FAILED for {} {}: {e}",
                        entry.tenant, entry.event
                    ));
                }
                metrics::counter!(
                    keyfold::audit::AUDIT_WRITE_FAILURES,
                    "sink" => "tenant-kms-service"
                )
                .increment(batch.len() as u64);
                *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}
