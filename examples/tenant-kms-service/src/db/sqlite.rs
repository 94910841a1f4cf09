//! SQLite, the embedded default: the keyring store, tenant KMS configs, the
//! two secret tables (the rewrap job's sources), rewrap checkpoints and the
//! append-only audit log.
//!
//! `rusqlite` is synchronous: every call is short and made under one mutex
//! (an example's simplicity; a production service would use a pool or an
//! async driver). Never hold the lock across an `.await`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use keyfold::keyring::StoredKeyring;
use keyfold::rewrap::{CasOutcome, Row, RowSource, SourceError};
use keyfold::store::{self, Revision, StoreError};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    AuditRow, Factor, Grant, JobRow, PendingConfig, RowFailureRow, SECRET_VERSIONS, SECRETS,
    SecretRow, secret_context,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keyrings (
    id TEXT PRIMARY KEY, revision INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tenant_kms (
    tenant TEXT PRIMARY KEY, config TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    ciphertext BLOB NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS secret_versions (
    tenant TEXT NOT NULL, row_key TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, ciphertext BLOB NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, row_key));
CREATE TABLE IF NOT EXISTS rewrap_jobs (
    tenant TEXT PRIMARY KEY, job_id TEXT NOT NULL, status TEXT NOT NULL,
    error TEXT, checkpoint TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rewrap_leases (
    lease_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, version INTEGER NOT NULL,
    issued_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, at INTEGER NOT NULL,
    event TEXT NOT NULL, actor TEXT NOT NULL, client_ip TEXT, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rewrap_failures (
    tenant TEXT NOT NULL, job_id TEXT NOT NULL, source TEXT NOT NULL, row_id TEXT NOT NULL,
    error TEXT NOT NULL, attempts INTEGER NOT NULL, next_retry_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, source, row_id));
CREATE TABLE IF NOT EXISTS step_up_factors (
    tenant TEXT PRIMARY KEY, admin TEXT NOT NULL, secret BLOB NOT NULL,
    last_step INTEGER NOT NULL DEFAULT -1, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS step_up_tokens (
    token_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, issued_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS step_up_failures (tenant TEXT NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS step_up_failures_by_tenant ON step_up_failures (tenant, at_ms);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
";

/// The SQLite database, shared by the service's tasks.
#[derive(Clone)]
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteDb")
    }
}

fn row_key(name: &str, version: u32) -> String {
    // '#' sorts before every character allowed in a name.
    format!("{name}#{version:010}")
}

fn to_u32(v: i64) -> rusqlite::Result<u32> {
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, v))
}

impl SqliteDb {
    /// Opens (or creates) the database file and its schema.
    ///
    /// # Errors
    /// SQLite errors.
    /// The file is created owner-only (0600 on Unix), an existing one is made
    /// so, and so are its `-wal` and `-shm` files (SQLite gives them the
    /// database file's mode): it holds tenant configs, TOTP secrets and the
    /// wrapped master keys.
    pub fn open(path: &Path) -> rusqlite::Result<SqliteDb> {
        let io = |e: std::io::Error| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("{}: {e}", path.display())),
            )
        };
        owner_only(path, true).map_err(io)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            owner_only(Path::new(&side), false).map_err(io)?;
        }
        Ok(SqliteDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The connection, locked. Write transactions are `IMMEDIATE`: a
    /// deferred one that reads first and another instance's write in
    /// between would fail its upgrade at once ("database is locked") instead
    /// of waiting for the busy timeout.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ----- tenant configs ------------------------------------------------

    /// The tenant's stored provider config (JSON).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn tenant_config(&self, tenant: &str) -> rusqlite::Result<Option<String>> {
        self.lock()
            .query_row(
                "SELECT config FROM tenant_kms WHERE tenant = ?1",
                params![tenant],
                |r| r.get(0),
            )
            .optional()
    }

    /// Stores the tenant's provider config (JSON).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_tenant_config(&self, tenant: &str, config: &str, now: u64) -> rusqlite::Result<()> {
        self.lock().execute(
            "INSERT INTO tenant_kms (tenant, config, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant) DO UPDATE SET config = ?2, updated_at = ?3",
            params![tenant, config, now as i64],
        )?;
        Ok(())
    }

    // ----- secrets -------------------------------------------------------

    /// The current value of secret `name`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn current_secret(&self, tenant: &str, name: &str) -> rusqlite::Result<Option<SecretRow>> {
        self.lock()
            .query_row(
                "SELECT version, ciphertext FROM secrets WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
                |r| {
                    Ok(SecretRow {
                        name: name.to_owned(),
                        version: to_u32(r.get(0)?)?,
                        ciphertext: r.get(1)?,
                    })
                },
            )
            .optional()
    }

    /// The next version number of secret `name`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn next_secret_version(&self, tenant: &str, name: &str) -> rusqlite::Result<u32> {
        let max: i64 = self.lock().query_row(
            "SELECT MAX(v) FROM (
                 SELECT COALESCE(MAX(version), 0) AS v FROM secrets WHERE tenant = ?1 AND name = ?2
                 UNION ALL
                 SELECT COALESCE(MAX(version), 0) FROM secret_versions WHERE tenant = ?1 AND name = ?2)",
            params![tenant, name],
            |r| r.get(0),
        )?;
        to_u32(max + 1)
    }

    /// Makes `new` the current value of its secret, moving the current one
    /// (if it is still `previous`) to the history table, atomically.
    /// `previous` is the current row as the caller read (and possibly
    /// upgraded) it; `false` when another write got there first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn replace_secret(
        &self,
        tenant: &str,
        previous: Option<&SecretRow>,
        new: &SecretRow,
        history: Option<&SecretRow>,
        now: u64,
    ) -> rusqlite::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT version, ciphertext FROM secrets WHERE tenant = ?1 AND name = ?2",
                params![tenant, new.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let matches = match (previous, &current) {
            (None, None) => true,
            (Some(p), Some((v, ct))) => i64::from(p.version) == *v && &p.ciphertext == ct,
            _ => false,
        };
        if !matches {
            return Ok(false);
        }
        if let Some(h) = history {
            tx.execute(
                "INSERT OR REPLACE INTO secret_versions
                     (tenant, row_key, name, version, ciphertext, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    tenant,
                    row_key(&h.name, h.version),
                    h.name,
                    i64::from(h.version),
                    h.ciphertext,
                    now as i64
                ],
            )?;
        }
        tx.execute(
            "DELETE FROM secret_versions WHERE tenant = ?1 AND row_key = ?2",
            params![tenant, row_key(&new.name, new.version)],
        )?;
        tx.execute(
            "INSERT INTO secrets (tenant, name, version, ciphertext, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant, name) DO UPDATE SET version = ?3, ciphertext = ?4, created_at = ?5",
            params![
                tenant,
                new.name,
                i64::from(new.version),
                new.ciphertext,
                now as i64
            ],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// The newest earlier version of secret `name` below `below`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn previous_secret(
        &self,
        tenant: &str,
        name: &str,
        below: u32,
    ) -> rusqlite::Result<Option<SecretRow>> {
        self.lock()
            .query_row(
                "SELECT version, ciphertext FROM secret_versions
                 WHERE tenant = ?1 AND name = ?2 AND version < ?3
                 ORDER BY version DESC LIMIT 1",
                params![tenant, name, i64::from(below)],
                |r| {
                    Ok(SecretRow {
                        name: name.to_owned(),
                        version: to_u32(r.get(0)?)?,
                        ciphertext: r.get(1)?,
                    })
                },
            )
            .optional()
    }

    /// Writes `new` over the current value of `name` only if it still holds
    /// `expected` (lazy rewrap write-back).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn cas_secret(
        &self,
        tenant: &str,
        name: &str,
        expected: &[u8],
        new: &[u8],
    ) -> rusqlite::Result<bool> {
        let n = self.lock().execute(
            "UPDATE secrets SET ciphertext = ?1 WHERE tenant = ?2 AND name = ?3 AND ciphertext = ?4",
            params![new, tenant, name, expected],
        )?;
        Ok(n == 1)
    }

    /// Every ciphertext of the tenant, in both tables (for the destroy check).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn all_ciphertexts(&self, tenant: &str) -> rusqlite::Result<Vec<Vec<u8>>> {
        let conn = self.lock();
        let mut out = Vec::new();
        for table in [SECRETS, SECRET_VERSIONS] {
            let mut stmt =
                conn.prepare(&format!("SELECT ciphertext FROM {table} WHERE tenant = ?1"))?;
            for ct in stmt.query_map(params![tenant], |r| r.get::<_, Vec<u8>>(0))? {
                out.push(ct?);
            }
        }
        Ok(out)
    }

    // ----- rewrap jobs -----------------------------------------------------

    /// Records a rewrap lease.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn insert_lease(
        &self,
        lease_id: &str,
        tenant: &str,
        version: u32,
        now: u64,
    ) -> rusqlite::Result<()> {
        self.lock().execute(
            "INSERT INTO rewrap_leases (lease_id, tenant, version, issued_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (lease_id) DO NOTHING",
            params![lease_id, tenant, i64::from(version), now as i64],
        )?;
        Ok(())
    }

    /// The tenant's rewrap job row: (job id, status, error, checkpoint JSON).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn job(&self, tenant: &str) -> rusqlite::Result<Option<JobRow>> {
        self.lock()
            .query_row(
                "SELECT job_id, status, error, checkpoint FROM rewrap_jobs WHERE tenant = ?1",
                params![tenant],
                |r| {
                    Ok(JobRow {
                        job_id: r.get(0)?,
                        status: r.get(1)?,
                        error: r.get(2)?,
                        checkpoint: r.get(3)?,
                    })
                },
            )
            .optional()
    }

    /// Stores the tenant's rewrap job row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn save_job(&self, tenant: &str, job: &JobRow, now: u64) -> rusqlite::Result<()> {
        self.lock().execute(
            "INSERT INTO rewrap_jobs (tenant, job_id, status, error, checkpoint, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant) DO UPDATE SET
                 job_id = ?2, status = ?3, error = ?4, checkpoint = ?5, updated_at = ?6",
            params![
                tenant,
                job.job_id,
                job.status,
                job.error,
                job.checkpoint,
                now as i64
            ],
        )?;
        Ok(())
    }

    /// Replaces the tenant's job row if it still names `job_id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn update_job(&self, tenant: &str, job_id: &str, job: &JobRow) -> rusqlite::Result<bool> {
        let n = self.lock().execute(
            "UPDATE rewrap_jobs SET job_id = ?3, status = ?4, error = ?5, checkpoint = ?6
             WHERE tenant = ?1 AND job_id = ?2",
            params![
                tenant,
                job_id,
                job.job_id,
                job.status,
                job.error,
                job.checkpoint
            ],
        )?;
        Ok(n == 1)
    }

    // ----- rewrap row failures -----------------------------------------------

    /// Records that a row failed (again): its reason, its attempt count and
    /// when to retry it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_row_failure(&self, tenant: &str, f: &RowFailureRow) -> rusqlite::Result<()> {
        self.lock().execute(
            "INSERT INTO rewrap_failures (tenant, job_id, source, row_id, error, attempts, next_retry_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (tenant, source, row_id) DO UPDATE SET
                 job_id = ?2, error = ?5, attempts = ?6, next_retry_at_ms = ?7",
            params![
                tenant,
                f.job_id,
                f.source,
                f.row_id,
                f.error,
                i64::from(f.attempts),
                f.next_retry_at_ms
            ],
        )?;
        Ok(())
    }

    /// The tenant's failed rows (of any job), oldest retry first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn row_failures(&self, tenant: &str) -> rusqlite::Result<Vec<RowFailureRow>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT job_id, source, row_id, error, attempts, next_retry_at_ms FROM rewrap_failures
             WHERE tenant = ?1 ORDER BY next_retry_at_ms, source, row_id",
        )?;
        let rows = stmt.query_map(params![tenant], |r| {
            Ok(RowFailureRow {
                job_id: r.get(0)?,
                source: r.get(1)?,
                row_id: r.get(2)?,
                error: r.get(3)?,
                attempts: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(u32::MAX),
                next_retry_at_ms: r.get(5)?,
            })
        })?;
        rows.collect()
    }

    /// Forgets a failed row (moved, gone, or its job replaced).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn resolve_row_failure(
        &self,
        tenant: &str,
        source: &str,
        row_id: &str,
    ) -> rusqlite::Result<()> {
        self.lock().execute(
            "DELETE FROM rewrap_failures WHERE tenant = ?1 AND source = ?2 AND row_id = ?3",
            params![tenant, source, row_id],
        )?;
        Ok(())
    }

    /// Forgets every failed row of the tenant's jobs other than `job_id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_row_failures_except(&self, tenant: &str, job_id: &str) -> rusqlite::Result<()> {
        self.lock().execute(
            "DELETE FROM rewrap_failures WHERE tenant = ?1 AND job_id <> ?2",
            params![tenant, job_id],
        )?;
        Ok(())
    }

    /// Sets the status of the tenant's job row, if it is still `job_id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_job_status(&self, tenant: &str, job_id: &str, status: &str) -> rusqlite::Result<()> {
        self.lock().execute(
            "UPDATE rewrap_jobs SET status = ?3 WHERE tenant = ?1 AND job_id = ?2",
            params![tenant, job_id, status],
        )?;
        Ok(())
    }

    // ----- step-up ---------------------------------------------------------

    /// Enrols `secret` as the TOTP factor of `tenant`'s admin unless one is
    /// enrolled already; whether it was.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn enrol_factor(
        &self,
        tenant: &str,
        admin: &str,
        secret: &[u8],
        now: u64,
    ) -> rusqlite::Result<bool> {
        let n = self.lock().execute(
            "INSERT INTO step_up_factors (tenant, admin, secret, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tenant) DO NOTHING",
            params![tenant, admin, secret, now as i64],
        )?;
        Ok(n == 1)
    }

    /// The TOTP factor of `tenant`'s admin.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn factor(&self, tenant: &str) -> rusqlite::Result<Option<Factor>> {
        self.lock()
            .query_row(
                "SELECT secret, last_step FROM step_up_factors WHERE tenant = ?1",
                params![tenant],
                |r| {
                    Ok(Factor {
                        secret: r.get(0)?,
                        last_step: r.get(1)?,
                    })
                },
            )
            .optional()
    }

    /// Marks TOTP time step `step` used; `false` if it (or a later one) was
    /// used already (RFC 6238 §5.2: a code is accepted once).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn use_factor_step(&self, tenant: &str, step: u64) -> rusqlite::Result<bool> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let n = self.lock().execute(
            "UPDATE step_up_factors SET last_step = ?2 WHERE tenant = ?1 AND last_step < ?2",
            params![tenant, step],
        )?;
        Ok(n == 1)
    }

    /// Records a failed step-up attempt.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_step_up_failure(&self, tenant: &str, at_ms: i64) -> rusqlite::Result<()> {
        self.lock().execute(
            "INSERT INTO step_up_failures (tenant, at_ms) VALUES (?1, ?2)",
            params![tenant, at_ms],
        )?;
        Ok(())
    }

    /// Deletes one attempt of `tenant` recorded at `at_ms`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn release_step_up_attempt(&self, tenant: &str, at_ms: i64) -> rusqlite::Result<()> {
        self.lock().execute(
            "DELETE FROM step_up_failures WHERE rowid = (
                 SELECT rowid FROM step_up_failures WHERE tenant = ?1 AND at_ms = ?2 LIMIT 1)",
            params![tenant, at_ms],
        )?;
        Ok(())
    }

    /// The failed step-up attempts of `tenant` since `since_ms`: their
    /// number and the oldest one's time (older ones are deleted).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn step_up_failures(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> rusqlite::Result<(u32, Option<i64>)> {
        let conn = self.lock();
        conn.execute(
            "DELETE FROM step_up_failures WHERE tenant = ?1 AND at_ms <= ?2",
            params![tenant, since_ms],
        )?;
        conn.query_row(
            "SELECT COUNT(*), MIN(at_ms) FROM step_up_failures WHERE tenant = ?1",
            params![tenant],
            |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)),
        )
        .map(|(n, oldest)| (u32::try_from(n).unwrap_or(u32::MAX), oldest))
    }

    /// Stores a step-up grant under the token's hash.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn insert_grant(
        &self,
        token_hash: &str,
        grant: &Grant,
        now_ms: i64,
    ) -> rusqlite::Result<()> {
        let conn = self.lock();
        conn.execute(
            "DELETE FROM step_up_tokens WHERE expires_at_ms <= ?1",
            params![now_ms],
        )?;
        conn.execute(
            "INSERT INTO step_up_tokens (token_hash, tenant, action, target, issued_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token_hash,
                grant.tenant,
                grant.action,
                grant.target,
                now_ms,
                grant.expires_at_ms
            ],
        )?;
        Ok(())
    }

    /// Removes and returns the grant of a token hash: a token is used once,
    /// whatever the outcome, on any instance sharing the database.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn take_grant(&self, token_hash: &str) -> rusqlite::Result<Option<Grant>> {
        self.lock()
            .query_row(
                "DELETE FROM step_up_tokens WHERE token_hash = ?1
                 RETURNING tenant, action, target, expires_at_ms",
                params![token_hash],
                |r| {
                    Ok(Grant {
                        tenant: r.get(0)?,
                        action: r.get(1)?,
                        target: r.get(2)?,
                        expires_at_ms: r.get(3)?,
                    })
                },
            )
            .optional()
    }

    // ----- audit -----------------------------------------------------------

    /// Appends an audit entry.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn append_audit(
        &self,
        tenant: &str,
        at: u64,
        event: &str,
        actor: &str,
        client_ip: Option<&str>,
        detail: &str,
    ) -> rusqlite::Result<()> {
        self.lock().execute(
            "INSERT INTO audit_log (tenant, at, event, actor, client_ip, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![tenant, at as i64, event, actor, client_ip, detail],
        )?;
        Ok(())
    }

    /// The tenant's audit log, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn audit(&self, tenant: &str) -> rusqlite::Result<Vec<AuditRow>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT seq, at, event, actor, client_ip, detail FROM audit_log
             WHERE tenant = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![tenant], |r| {
            let detail: String = r.get(5)?;
            Ok(AuditRow {
                seq: r.get(0)?,
                at: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                event: r.get(2)?,
                actor: r.get(3)?,
                client_ip: r.get(4)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })?;
        rows.collect()
    }
}

/// Makes `path` owner-only (0600 on Unix), creating it first when `create`.
fn owner_only(path: &Path, create: bool) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if create {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        match std::fs::metadata(path) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            }
            Ok(_) => Ok(()),
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, create);
        Ok(())
    }
}

// ----- the keyring store -------------------------------------------------

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl SqliteDb {
    /// [`KeyringStore::load`](keyfold::store::KeyringStore::load).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn load_keyring(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        let body: Option<Vec<u8>> = self
            .lock()
            .query_row(
                "SELECT body FROM keyrings WHERE id = ?1",
                params![keyring_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        body.map(|b| store::from_bytes(keyring_id, &b)).transpose()
    }

    /// [`KeyringStore::save`](keyfold::store::KeyringStore::save), storing
    /// `pending` (a tenant config) in the same transaction when given.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn save_keyring(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
        pending: Option<&PendingConfig>,
    ) -> Result<Revision, StoreError> {
        let next = Revision(expected.map_or(1, |r| r.0 + 1));
        let body = store::to_bytes(next, keyring)?;
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let written = match expected {
            None => tx.execute(
                "INSERT INTO keyrings (id, revision, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO NOTHING",
                params![keyring_id, next.0 as i64, body],
            ),
            Some(r) => tx.execute(
                "UPDATE keyrings SET revision = ?2, body = ?3 WHERE id = ?1 AND revision = ?4",
                params![keyring_id, next.0 as i64, body, r.0 as i64],
            ),
        }
        .map_err(backend)?;
        if written == 1 {
            if let Some(p) = pending {
                tx.execute(
                    "INSERT INTO tenant_kms (tenant, config, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (tenant) DO UPDATE SET config = ?2, updated_at = ?3",
                    params![
                        keyring_id,
                        p.json,
                        keyfold::time::Timestamp::now().as_secs() as i64
                    ],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            return Ok(next);
        }
        let found: Option<i64> = tx
            .query_row(
                "SELECT revision FROM keyrings WHERE id = ?1",
                params![keyring_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        drop(tx);
        Err(StoreError::Conflict {
            keyring_id: keyring_id.to_owned(),
            expected,
            found: found.and_then(|f| u64::try_from(f).ok()).map(Revision),
        })
    }
}

// ----- the rewrap job's sources ------------------------------------------

fn source_err(e: rusqlite::Error) -> SourceError {
    match e {
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            SourceError::transient(e.to_string())
        }
        e => SourceError::permanent(e.to_string()),
    }
}

/// One of the tenant's two secret tables as a rewrap source.
#[derive(Debug, Clone)]
pub struct SecretTable {
    db: SqliteDb,
    tenant: String,
    table: &'static str,
}

impl SecretTable {
    /// The tenant's rows of `table` ([`SECRETS`] or [`SECRET_VERSIONS`]).
    pub fn new(db: SqliteDb, tenant: &str, table: &'static str) -> Self {
        SecretTable {
            db,
            tenant: tenant.to_owned(),
            table,
        }
    }

    /// The key column: the name in `secrets`, `name#version` in `secret_versions`.
    fn key(&self) -> &'static str {
        if self.table == SECRETS {
            "name"
        } else {
            "row_key"
        }
    }

    fn row(&self, key: String, name: &str, version: i64, ciphertext: Vec<u8>) -> Row {
        let version = u32::try_from(version).unwrap_or(0);
        Row {
            context: secret_context(&self.tenant, name, version),
            cursor: key.clone(),
            id: key,
            ciphertext,
        }
    }
}

#[async_trait]
impl RowSource for SecretTable {
    fn name(&self) -> &str {
        self.table
    }

    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        let conn = self.db.lock();
        let key = self.key();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {key}, name, version, ciphertext FROM {} WHERE tenant = ?1 AND {key} > ?2
                 ORDER BY {key} LIMIT ?3",
                self.table
            ))
            .map_err(source_err)?;
        let rows = stmt
            .query_map(
                params![
                    self.tenant,
                    after.unwrap_or(""),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| Ok((r.get(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(source_err)?;
        rows.map(|r| {
            r.map(|(k, name, v, ct)| self.row(k, &name, v, ct))
                .map_err(source_err)
        })
        .collect()
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        let conn = self.db.lock();
        conn.query_row(
            &format!(
                "SELECT name, version, ciphertext FROM {} WHERE tenant = ?1 AND {} = ?2",
                self.table,
                self.key()
            ),
            params![self.tenant, id],
            |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(source_err)
        .map(|found| found.map(|(name, v, ct)| self.row(id.to_owned(), &name, v, ct)))
    }

    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        let changed = self
            .db
            .lock()
            .execute(
                &format!(
                    "UPDATE {} SET ciphertext = ?1 WHERE tenant = ?2 AND {} = ?3 AND ciphertext = ?4",
                    self.table,
                    self.key()
                ),
                params![new, self.tenant, id, expected],
            )
            .map_err(source_err)?;
        Ok(if changed == 1 {
            CasOutcome::Swapped
        } else {
            CasOutcome::Conflict
        })
    }

    async fn count_after(&self, after: Option<&str>) -> Option<u64> {
        let conn = self.db.lock();
        conn.query_row(
            &format!(
                "SELECT COUNT(*) FROM {} WHERE tenant = ?1 AND {} > ?2",
                self.table,
                self.key()
            ),
            params![self.tenant, after.unwrap_or("")],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .and_then(|n| u64::try_from(n).ok())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn temp_db(name: &str) -> (SqliteDb, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tenant-kms-db-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (SqliteDb::open(&dir.join("db.sqlite3")).unwrap(), dir)
    }

    use std::path::PathBuf;

    #[test]
    fn the_audit_log_is_append_only() {
        let (db, dir) = temp_db("audit");
        db.append_audit("acme", 1, "kms.rotate", "admin", Some("127.0.0.1"), "{}")
            .unwrap();
        let conn = db.lock();
        for sql in [
            "UPDATE audit_log SET actor = 'someone else'",
            "DELETE FROM audit_log",
        ] {
            let err = conn.execute(sql, []).unwrap_err();
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        drop(conn);
        assert_eq!(db.audit("acme").unwrap().len(), 1);
        assert_eq!(db.audit("acme").unwrap()[0].actor, "admin");
        let _ = std::fs::remove_dir_all(dir);
    }
}
