//! The service's database: SQLite, the embedded default (one file, one
//! instance or a few on one machine), or PostgreSQL (`--database
//! postgres://…`), which a fleet of instances shares: keyrings (with
//! change notifications), tenant configs, secrets, step-up state, the
//! hash-chained audit log and the distributed rewrap job.
//!
//! [`Db`] is the one handle the rest of the service uses; each method runs
//! the same operation on either backend ([`sqlite`], [`postgres`]).

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use keyfold::EncryptionContext;
use keyfold::keyring::StoredKeyring;
use keyfold::store::{KeyringStore, Revision, StoreError, StoreEvent};

use crate::config::Database;
pub use sqlite::{SecretTable, SqliteDb};

/// A database failure (the detail goes to the operator log, never to a
/// client).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Setting up the database failed.
    #[error("{0}")]
    Setup(String),
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteDb),
    #[cfg(feature = "postgres")]
    Postgres(postgres::PgDb),
}

/// The shared database handle (cheap to clone).
#[derive(Clone)]
pub struct Db {
    backend: Backend,
    /// Tenant configs waiting to be stored with their keyring (onboarding).
    pending: Arc<Mutex<HashMap<String, PendingConfig>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.write_str(match self.backend {
            Backend::Sqlite(_) => "Db(sqlite)",
            #[cfg(feature = "postgres")]
            Backend::Postgres(_) => "Db(postgres)",
        })
    }
}

/// Runs the same method on whichever backend this is.
macro_rules! call {
    ($self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match &$self.backend {
            Backend::Sqlite(db) => db.$method($($arg),*).map_err(DbError::from),
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.$method($($arg),*).await.map_err(DbError::from),
        }
    };
}

/// The table of current secret values (one row per name).
pub const SECRETS: &str = "secrets";
/// The table of earlier secret versions, kept for rollback.
pub const SECRET_VERSIONS: &str = "secret_versions";

/// A tenant config to store in the same transaction as the keyring save
/// that moves every master key under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConfig {
    /// The config, JSON.
    pub json: String,
}

/// A tenant admin's TOTP factor.
pub struct Factor {
    /// The shared secret.
    pub secret: Vec<u8>,
    /// The last TOTP time step accepted (-1: none yet).
    pub last_step: i64,
}

impl std::fmt::Debug for Factor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Factor")
            .field("secret", &"******")
            .field("last_step", &self.last_step)
            .finish()
    }
}

/// A step-up grant, as stored (the token itself is kept only as a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Tenant.
    pub tenant: String,
    /// Action it allows.
    pub action: String,
    /// Target it allows the action on.
    pub target: String,
    /// Expiry, Unix milliseconds.
    pub expires_at_ms: i64,
}

/// A stored secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    /// Secret name.
    pub name: String,
    /// Secret version (1, 2, ...).
    pub version: u32,
    /// The keyfold record.
    pub ciphertext: Vec<u8>,
}

/// One audit log entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRow {
    /// Sequence number (append order).
    pub seq: i64,
    /// Unix seconds.
    pub at: u64,
    /// Event name (`kms.rotate`, ...).
    pub event: String,
    /// Who.
    pub actor: String,
    /// The client's address, for events caused by a request.
    pub client_ip: Option<String>,
    /// The event's fields.
    pub detail: serde_json::Value,
}

/// The encryption context of a secret version: both tables use it, so a
/// version can move between them without being re-encrypted.
pub fn secret_context(tenant: &str, name: &str, version: u32) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", tenant)
        .with("kind", "secret")
        .with("name", name)
        .with("version", version.to_string())
}

/// A row a rewrap job could not move, retried with backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFailureRow {
    /// The job it failed in.
    pub job_id: String,
    /// The source (table).
    pub source: String,
    /// The row id.
    pub row_id: String,
    /// Why it failed last.
    pub error: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When it is retried next, Unix milliseconds.
    pub next_retry_at_ms: i64,
}

/// A stored rewrap job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    /// The job id (the rotation's lease id when there was one).
    pub job_id: String,
    /// `running`, `completed`, `incomplete` (finished with rows left, being
    /// retried) or `failed` (stopped; `error` says why).
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The checkpoint, JSON.
    pub checkpoint: String,
}

impl Db {
    /// Opens (or creates) the database and its schema.
    ///
    /// # Errors
    /// [`DbError`]; `Setup` when PostgreSQL is asked for but this build
    /// has no `postgres` feature.
    pub async fn open(database: &Database) -> Result<Db, DbError> {
        let backend = match database {
            Database::Sqlite(path) => Backend::Sqlite(SqliteDb::open(path)?),
            #[cfg(feature = "postgres")]
            Database::Postgres(url) => Backend::Postgres(postgres::PgDb::open(url).await?),
            #[cfg(not(feature = "postgres"))]
            Database::Postgres(_) => {
                return Err(DbError::Setup(
                    "this build has no PostgreSQL support (feature `postgres`)".into(),
                ));
            }
        };
        Ok(Db {
            backend,
            pending: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The SQLite database, when that is the backend.
    pub fn sqlite(&self) -> Option<&SqliteDb> {
        match &self.backend {
            Backend::Sqlite(db) => Some(db),
            #[cfg(feature = "postgres")]
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL database, when that is the backend.
    #[cfg(feature = "postgres")]
    pub fn postgres(&self) -> Option<&postgres::PgDb> {
        match &self.backend {
            Backend::Postgres(db) => Some(db),
            Backend::Sqlite(_) => None,
        }
    }

    /// Stores `config` with the next save of keyring `tenant` (one
    /// transaction), until [`take_pending`](Self::take_pending).
    pub fn set_pending(&self, tenant: &str, config: PendingConfig) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tenant.to_owned(), config);
    }

    /// Removes the pending config of `tenant`; `Some` if no save stored it.
    pub fn take_pending(&self, tenant: &str) -> Option<PendingConfig> {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(tenant)
    }

    // ----- tenant configs ------------------------------------------------

    /// The tenant's stored provider config (JSON).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn tenant_config(&self, tenant: &str) -> Result<Option<String>, DbError> {
        call!(self.tenant_config(tenant))
    }

    /// Stores the tenant's provider config (JSON).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn set_tenant_config(
        &self,
        tenant: &str,
        config: &str,
        now: u64,
    ) -> Result<(), DbError> {
        call!(self.set_tenant_config(tenant, config, now))
    }

    // ----- secrets -------------------------------------------------------

    /// The current value of secret `name`.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn current_secret(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<SecretRow>, DbError> {
        call!(self.current_secret(tenant, name))
    }

    /// The next version number of secret `name`.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn next_secret_version(&self, tenant: &str, name: &str) -> Result<u32, DbError> {
        call!(self.next_secret_version(tenant, name))
    }

    /// Makes `new` the current value of its secret, moving the current one
    /// (if it is still `previous`) to the history table, atomically;
    /// `false` when another write got there first.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn replace_secret(
        &self,
        tenant: &str,
        previous: Option<&SecretRow>,
        new: &SecretRow,
        history: Option<&SecretRow>,
        now: u64,
    ) -> Result<bool, DbError> {
        call!(self.replace_secret(tenant, previous, new, history, now))
    }

    /// The newest earlier version of secret `name` below `below`.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn previous_secret(
        &self,
        tenant: &str,
        name: &str,
        below: u32,
    ) -> Result<Option<SecretRow>, DbError> {
        call!(self.previous_secret(tenant, name, below))
    }

    /// Writes `new` over the current value of `name` only if it still holds
    /// `expected` (lazy rewrap write-back).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn cas_secret(
        &self,
        tenant: &str,
        name: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool, DbError> {
        call!(self.cas_secret(tenant, name, expected, new))
    }

    /// Every ciphertext of the tenant, in both tables (for the destroy check).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn all_ciphertexts(&self, tenant: &str) -> Result<Vec<Vec<u8>>, DbError> {
        call!(self.all_ciphertexts(tenant))
    }

    // ----- rewrap jobs -----------------------------------------------------

    /// Records a rewrap lease.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn insert_lease(
        &self,
        lease_id: &str,
        tenant: &str,
        version: u32,
        now: u64,
    ) -> Result<(), DbError> {
        call!(self.insert_lease(lease_id, tenant, version, now))
    }

    /// The tenant's rewrap job row.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn job(&self, tenant: &str) -> Result<Option<JobRow>, DbError> {
        call!(self.job(tenant))
    }

    /// Stores the tenant's rewrap job row.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn save_job(&self, tenant: &str, job: &JobRow, now: u64) -> Result<(), DbError> {
        call!(self.save_job(tenant, job, now))
    }

    /// Replaces the tenant's job row only if it still names `job_id`;
    /// whether it did (another instance may have recorded a newer job).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn update_job(
        &self,
        tenant: &str,
        job_id: &str,
        job: &JobRow,
    ) -> Result<bool, DbError> {
        call!(self.update_job(tenant, job_id, job))
    }

    /// Records that a row failed (again).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn record_row_failure(&self, tenant: &str, f: &RowFailureRow) -> Result<(), DbError> {
        call!(self.record_row_failure(tenant, f))
    }

    /// The tenant's failed rows (of any job), oldest retry first.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn row_failures(&self, tenant: &str) -> Result<Vec<RowFailureRow>, DbError> {
        call!(self.row_failures(tenant))
    }

    /// Forgets a failed row.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn resolve_row_failure(
        &self,
        tenant: &str,
        source: &str,
        row_id: &str,
    ) -> Result<(), DbError> {
        call!(self.resolve_row_failure(tenant, source, row_id))
    }

    /// Forgets every failed row of the tenant's jobs other than `job_id`.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn clear_row_failures_except(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<(), DbError> {
        call!(self.clear_row_failures_except(tenant, job_id))
    }

    /// Sets the status of the tenant's job row, if it is still `job_id`.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn set_job_status(
        &self,
        tenant: &str,
        job_id: &str,
        status: &str,
    ) -> Result<(), DbError> {
        call!(self.set_job_status(tenant, job_id, status))
    }

    // ----- step-up ---------------------------------------------------------

    /// Enrols `secret` as the TOTP factor of `tenant`'s admin unless one is
    /// enrolled already; whether it was.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn enrol_factor(
        &self,
        tenant: &str,
        admin: &str,
        secret: &[u8],
        now: u64,
    ) -> Result<bool, DbError> {
        call!(self.enrol_factor(tenant, admin, secret, now))
    }

    /// The TOTP factor of `tenant`'s admin.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn factor(&self, tenant: &str) -> Result<Option<Factor>, DbError> {
        call!(self.factor(tenant))
    }

    /// Marks TOTP time step `step` used; `false` if it (or a later one) was
    /// used already (RFC 6238 §5.2: a code is accepted once), on any
    /// instance sharing the database.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn use_factor_step(&self, tenant: &str, step: u64) -> Result<bool, DbError> {
        call!(self.use_factor_step(tenant, step))
    }

    /// Records a failed step-up attempt.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn record_step_up_failure(&self, tenant: &str, at_ms: i64) -> Result<(), DbError> {
        call!(self.record_step_up_failure(tenant, at_ms))
    }

    /// Uncounts one attempt recorded at `at_ms` (it succeeded, or was
    /// refused for the limit without its code being checked).
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn release_step_up_attempt(&self, tenant: &str, at_ms: i64) -> Result<(), DbError> {
        call!(self.release_step_up_attempt(tenant, at_ms))
    }

    /// The failed step-up attempts of `tenant` since `since_ms`: their
    /// number and the oldest one's time.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn step_up_failures(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> Result<(u32, Option<i64>), DbError> {
        call!(self.step_up_failures(tenant, since_ms))
    }

    /// Stores a step-up grant under the token's hash.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn insert_grant(
        &self,
        token_hash: &str,
        grant: &Grant,
        now_ms: i64,
    ) -> Result<(), DbError> {
        call!(self.insert_grant(token_hash, grant, now_ms))
    }

    /// Removes and returns the grant of a token hash: a token is used once,
    /// whatever the outcome, on any instance sharing the database.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn take_grant(&self, token_hash: &str) -> Result<Option<Grant>, DbError> {
        call!(self.take_grant(token_hash))
    }

    // ----- audit -----------------------------------------------------------

    /// Appends an audit entry: written before this returns on SQLite;
    /// queued, in order, on PostgreSQL (written by a background task within
    /// milliseconds; [`audit`](Self::audit) waits for the queue first).
    ///
    /// # Errors
    /// [`DbError`] when SQLite failed or the PostgreSQL writer is gone.
    pub fn append_audit(
        &self,
        tenant: &str,
        at: u64,
        event: &str,
        actor: &str,
        client_ip: Option<&str>,
        detail: &str,
    ) -> Result<(), DbError> {
        match &self.backend {
            Backend::Sqlite(db) => db
                .append_audit(tenant, at, event, actor, client_ip, detail)
                .map_err(DbError::from),
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.append_audit(tenant, at, event, actor, client_ip, detail),
        }
    }

    /// Waits until the audit entries appended so far are written (at once
    /// on SQLite, which writes them before `append_audit` returns).
    ///
    /// # Errors
    /// [`DbError`] naming the failure when entries were not written.
    pub async fn flush_audit(&self) -> Result<(), DbError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.flush_audit().await,
        }
    }

    /// The tenant's audit log, oldest first.
    ///
    /// # Errors
    /// [`DbError`].
    pub async fn audit(&self, tenant: &str) -> Result<Vec<AuditRow>, DbError> {
        call!(self.audit(tenant))
    }
}

impl Db {
    /// Whether saving `keyring` creates it or changes the KMS key of a
    /// version it already had.
    async fn rewraps(&self, keyring_id: &str, keyring: &StoredKeyring) -> Result<bool, StoreError> {
        let Some((_, stored)) = self.load(keyring_id).await? else {
            return Ok(true);
        };
        let wrapping = |k: &keyfold::keyring::StoredVersion| {
            k.wrapped
                .as_ref()
                .map(|w| (w.provider.clone(), w.key_ref.clone()))
        };
        Ok(keyring.versions.iter().any(|new| {
            stored
                .versions
                .iter()
                .find(|old| old.version == new.version)
                .is_some_and(|old| wrapping(old) != wrapping(new))
        }))
    }
}

#[async_trait]
impl KeyringStore for Db {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        match &self.backend {
            Backend::Sqlite(db) => db.load_keyring(keyring_id),
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.store().load(keyring_id).await,
        }
    }

    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        keyfold::store::check_save(keyring_id, keyring)?;
        // A pending tenant config is stored with the next save of its
        // keyring (onboarding's re-wrap under the new key, or the first
        // keyring), in the same transaction. Onboarding holds the tenant's
        // slot for writing meanwhile, so no other change of this keyring in
        // this process comes between.
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(keyring_id)
            .cloned();
        // Only onboarding's own save carries the config: the one creating
        // the keyring or moving its master keys under another KMS key. A
        // save by another task meanwhile (the maintenance task's scheduled
        // rotation, say) keeps the old wrapping, and committing the new
        // config with it would pair a config with a keyring it cannot open.
        let pending = match pending {
            Some(p) if self.rewraps(keyring_id, keyring).await? => Some(p),
            _ => None,
        };
        let saved = match &self.backend {
            Backend::Sqlite(db) => db.save_keyring(keyring_id, expected, keyring, pending.as_ref()),
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => {
                db.save_keyring(keyring_id, expected, keyring, pending.as_ref())
                    .await
            }
        }?;
        if pending.is_some() {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(keyring_id);
        }
        Ok(saved)
    }

    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        match &self.backend {
            // One SQLite file, usually one instance: the staleness bound.
            Backend::Sqlite(_) => None,
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.store().watch(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[tokio::test]
    async fn the_sqlite_keyring_store_passes_the_store_conformance_suite() {
        let dir = std::env::temp_dir().join(format!("tenant-kms-db-conf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&Database::Sqlite(dir.join("db.sqlite3")))
            .await
            .unwrap();
        keyfold::testkit::store_conformance(&db, "tenant").await;
        drop(db);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A pending config rides only on onboarding's save (creating the
    /// keyring or moving its keys to another KMS key), never on another
    /// task's save in between, such as a scheduled rotation.
    #[tokio::test]
    async fn a_pending_config_rides_only_on_the_save_that_moves_the_keys() {
        use keyfold::audit::Actor;
        use keyfold::{Keyring, LocalKek, SecretKey};
        let dir =
            std::env::temp_dir().join(format!("tenant-kms-db-pending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&Database::Sqlite(dir.join("db.sqlite3")))
            .await
            .unwrap();
        let store = Arc::new(db.clone());
        let old = Arc::new(LocalKek::from_bytes(
            "old-kek",
            SecretKey::generate().unwrap(),
        ));
        let new = Arc::new(LocalKek::from_bytes(
            "new-kek",
            SecretKey::generate().unwrap(),
        ));
        let actor = Actor::new("test");
        let pending = |json: &str| PendingConfig { json: json.into() };

        // Creation carries it.
        db.set_pending("t", pending("first"));
        let ring = Keyring::builder("t", old, store).create().await.unwrap();
        assert_eq!(
            db.tenant_config("t").await.unwrap().as_deref(),
            Some("first")
        );
        assert!(db.take_pending("t").is_none());

        // A rotation under the old key, while a new config waits: not it.
        db.set_pending("t", pending("second"));
        ring.rotate(&actor).await.unwrap();
        assert_eq!(
            db.tenant_config("t").await.unwrap().as_deref(),
            Some("first")
        );

        // The re-wrap under the new key: it.
        ring.rewrap_master_keys(new, &actor).await.unwrap();
        assert_eq!(
            db.tenant_config("t").await.unwrap().as_deref(),
            Some("second")
        );
        assert!(db.take_pending("t").is_none());
        drop(ring);
        let _ = std::fs::remove_dir_all(dir);
    }
}
