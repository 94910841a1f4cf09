//! Per-tenant state: the KMS config and keyring, onboarding, the audit
//! sink that writes the append-only table, and the rewrap job.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keyfold::audit::{Actor, AuditEvent, AuditKind, AuditSink};
use keyfold::config::{LocalConfig, ProviderConfig};
use keyfold::keyring::{Keyring, LeaseIssuer};
use keyfold::probe::{self, ProbeFailure, ProbeStep, WrapperFactory};
use keyfold::rewrap::{Checkpoint, JobError, JobOptions, RewrapJob, RowSource};
use keyfold::time::Timestamp;
use keyfold::{KeyWrapper, LocalKek, WrapError, WrapErrorKind, WrapOperation};

use crate::config::{KekSource, RewrapConfig, TenantConfig};
use crate::db::{Db, JobRow, SECRET_VERSIONS, SECRETS, SecretTable};

tokio::task_local! {
    /// The client address of the request being served, for audit entries.
    pub static CLIENT_IP: String;
}

/// Writes every keyfold audit event to the `audit_log` table, with the
/// client address of the request that caused it (when there is one).
#[derive(Debug, Clone)]
pub struct DbAudit {
    db: Db,
}

impl DbAudit {
    /// A sink over `db`.
    pub fn new(db: Db) -> Self {
        DbAudit { db }
    }
}

impl AuditSink for DbAudit {
    fn record(&self, event: AuditEvent) {
        let ip = CLIENT_IP.try_with(Clone::clone).ok();
        let detail = serde_json::to_string(&event.kind).unwrap_or_else(|_| "{}".into());
        if let Err(e) = self.db.append_audit(
            &event.keyring_id,
            event.at.as_secs(),
            event.name(),
            &event.actor.0,
            ip.as_deref(),
            &detail,
        ) {
            // The change is committed already; an audit write failure must be
            // loud. A production host would queue and retry.
            eprintln!(
                "AUDIT WRITE FAILED for {} {}: {e}",
                event.keyring_id,
                event.name()
            );
        }
    }
}

/// The rewrap lease of the rotation to `version` of keyring `tenant`:
/// `lease-TENANT-vN`. Version numbers are never reused, so each rotation's
/// lease is unique, and every instance can name it (a distributed job takes
/// it as its id whichever instance creates the job). Not a secret.
pub fn lease_id(tenant: &str, version: u32) -> String {
    format!("lease-{tenant}-v{version}")
}

/// Issues rewrap leases on rotation, recorded in `rewrap_leases`.
#[derive(Debug)]
struct DbLeases {
    db: Db,
}

#[async_trait]
impl LeaseIssuer for DbLeases {
    async fn issue(
        &self,
        keyring_id: &str,
        version: u32,
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let id = lease_id(keyring_id, version);
        self.db
            .insert_lease(&id, keyring_id, version, Timestamp::now().as_secs())
            .await?;
        Ok(id)
    }
}

/// Builds wrappers for tenant configs: `local` from the service's own KEKs,
/// other providers from the factories the service was started with.
pub struct Providers {
    local_keks: HashMap<String, KekSource>,
    cloud: HashMap<&'static str, Arc<dyn WrapperFactory>>,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Providers")
            .field("local_keks", &self.local_keks.keys().collect::<Vec<_>>())
            .field("cloud", &self.cloud.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Providers {
    /// Local KEKs only.
    pub fn local(local_keks: impl IntoIterator<Item = (String, KekSource)>) -> Self {
        Providers {
            local_keks: local_keks.into_iter().collect(),
            cloud: HashMap::new(),
        }
    }

    /// Also serve `provider` (`aws`, `gcp`, `azure`) configs with `factory`
    /// (with the operator's settings: endpoints, base credentials).
    #[must_use]
    pub fn with(mut self, provider: &'static str, factory: Arc<dyn WrapperFactory>) -> Self {
        self.cloud.insert(provider, factory);
        self
    }

    /// Whether configs of `provider` can be served.
    pub fn supports(&self, provider: &str) -> bool {
        provider == "local" || self.cloud.contains_key(provider)
    }

    /// Whether `id` is one of the service's local KEKs.
    pub fn has_local_kek(&self, id: &str) -> bool {
        self.local_keks.contains_key(id)
    }

    /// The full local config for KEK `id` (the request names only the id).
    pub fn local_config(&self, id: &str) -> Option<LocalConfig> {
        self.local_keks.get(id).map(|src| LocalConfig {
            kms_key_ref: id.to_owned(),
            kek_env_var: match src {
                KekSource::Env(v) => Some(v.clone()),
                KekSource::File(_) => None,
            },
            kek_file: match src {
                KekSource::File(p) => Some(p.display().to_string()),
                KekSource::Env(_) => None,
            },
        })
    }
}

#[async_trait]
impl WrapperFactory for Providers {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        let misconfigured = |m: String| {
            WrapError::new(
                WrapErrorKind::Misconfigured,
                config.provider(),
                config.kms_key_ref(),
                WrapOperation::Configure,
            )
            .with_message(m)
        };
        match config {
            ProviderConfig::Local(c) => {
                let kek = match self.local_keks.get(&c.kms_key_ref) {
                    Some(KekSource::File(p)) => LocalKek::from_file(c.kms_key_ref.clone(), p),
                    Some(KekSource::Env(v)) => LocalKek::from_env(c.kms_key_ref.clone(), v),
                    None => {
                        return Err(misconfigured(format!(
                            "no local KEK {:?} on this service",
                            c.kms_key_ref
                        )));
                    }
                }
                .map_err(|e| misconfigured(e.to_string()))?;
                Ok(Arc::new(kek))
            }
            other => match self.cloud.get(other.provider()) {
                Some(f) => f.build(other).await,
                None => Err(misconfigured(format!(
                    "this service was built without {} support",
                    other.provider()
                ))),
            },
        }
    }
}

/// Evidence for the maintenance task's scheduled destroys: a scan of the
/// tenant's two secret tables, taken when asked (so after the disable).
#[derive(Debug, Clone)]
pub struct DbEvidence {
    db: Db,
}

impl DbEvidence {
    /// Evidence from `db`.
    pub fn new(db: Db) -> Self {
        DbEvidence { db }
    }
}

#[async_trait]
impl keyfold::EvidenceSource for DbEvidence {
    async fn evidence(
        &self,
        keyring_id: &str,
        version: u32,
    ) -> Option<keyfold::keyring::NoRecordsLeft> {
        let checked_at = Timestamp::now();
        let all = match self.db.all_ciphertexts(keyring_id).await {
            Ok(all) => all,
            Err(e) => {
                crate::error::operator_log(format_args!(
                    "tenant {keyring_id}: destroy evidence scan failed: {e}"
                ));
                return None;
            }
        };
        let remaining = all
            .iter()
            .filter(|ct| keyfold::format::inspect(ct).is_ok_and(|i| i.key_version == version))
            .count();
        (remaining == 0).then(|| keyfold::keyring::NoRecordsLeft {
            keyring_id: keyring_id.to_owned(),
            version,
            source: format!("scan of {SECRETS} and {SECRET_VERSIONS}"),
            checked_at,
        })
    }
}

/// What a client and the audit log learn of a failed probe: the step and
/// the kind, never the provider's text.
fn probe_summary(f: &ProbeFailure) -> String {
    let kind = f.kind.map_or_else(|| "error".to_owned(), |k| k.to_string());
    format!(
        "the live KMS probe of {} key {:?} failed at step `{}` ({kind}); the previous configuration stays in force",
        f.provider, f.key_ref, f.step
    )
}

/// A tenant whose KMS config was accepted.
#[derive(Debug, Clone)]
pub struct Onboarded {
    /// The config (for `local`, with the service's KEK source filled in).
    pub config: ProviderConfig,
    /// The tenant's keyring.
    pub keyring: Arc<Keyring>,
}

/// One tenant.
#[derive(Debug)]
pub struct Tenant {
    /// Its configuration.
    pub config: TenantConfig,
    /// Set once onboarded. Onboarding and rotation take it for writing.
    pub kms: tokio::sync::RwLock<Option<Onboarded>>,
    /// The running rewrap job, if any (SQLite).
    pub job: tokio::sync::Mutex<Option<RewrapJob>>,
    /// This instance's worker on the tenant's distributed job (PostgreSQL).
    #[cfg(feature = "postgres")]
    pub(crate) worker: tokio::sync::Mutex<Option<crate::distributed::JobWorker>>,
}

/// What onboarding produced.
#[derive(Debug)]
pub struct OnboardResult {
    /// The keyring, now under the new config's wrapper.
    pub keyring: Arc<Keyring>,
    /// The new active version.
    pub version: u32,
    /// Its id.
    pub version_id: String,
    /// The rotation's rewrap lease.
    pub lease_id: Option<String>,
}

/// Why onboarding failed; nothing was changed.
#[derive(Debug)]
pub enum OnboardError {
    /// The probe (or building the wrapper) failed.
    Probe(ProbeFailure),
    /// Moving the keyring to the new wrapper failed.
    Keyring(keyfold::Error),
    /// The database failed.
    Db(String),
}

/// Shared by every tenant.
#[derive(Debug)]
pub struct Shared {
    /// The database.
    pub db: Db,
    /// The audit sink.
    pub audit: Arc<DbAudit>,
    /// Wrapper factories.
    pub providers: Providers,
    /// Rewrap settings.
    pub rewrap: RewrapConfig,
    /// The keyrings' maximum staleness.
    pub max_staleness: std::time::Duration,
    /// The keyrings' destroy grace period.
    pub destroy_grace: std::time::Duration,
    /// The keyrings' write window.
    pub write_window: std::time::Duration,
    /// The maintenance task (rotation policy, scheduled destroys, unseal
    /// probes, cache sweeps) over every onboarded tenant's keyring.
    pub maintenance: Arc<keyfold::Maintenance>,
    /// Becomes `true` when the service stops (background work ends between
    /// batches).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    fn keyring_builder(
        &self,
        tenant: &str,
        wrapper: Arc<dyn KeyWrapper>,
    ) -> keyfold::keyring::KeyringBuilder {
        Keyring::builder(tenant, wrapper, Arc::new(self.db.clone()))
            .max_staleness(self.max_staleness)
            .destroy_grace(self.destroy_grace)
            .write_window(self.write_window)
            .audit(self.audit.clone())
            .lease_issuer(Arc::new(DbLeases {
                db: self.db.clone(),
            }))
    }

    /// Reopens an onboarded tenant's keyring at startup.
    ///
    /// # Errors
    /// When the stored config cannot be built into a wrapper or the keyring is missing.
    pub async fn reopen(&self, tenant: &str) -> Result<Option<Onboarded>, String> {
        let Some(json) = self
            .db
            .tenant_config(tenant)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let config: ProviderConfig = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        let wrapper = self
            .providers
            .build(&config)
            .await
            .map_err(|e| e.to_string())?;
        let keyring = self
            .keyring_builder(tenant, wrapper)
            .open()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(Onboarded {
            config,
            keyring: Arc::new(keyring),
        }))
    }

    /// Probes `config`; on success moves the tenant's keyring (creating it
    /// on first onboarding) to the new wrapper, stores the config and
    /// rotates so new records use a version under the new KMS key. On a
    /// probe failure nothing changes (a `kms.probe.failed` entry is written).
    ///
    /// # Errors
    /// [`OnboardError`].
    pub async fn onboard(
        &self,
        tenant: &Tenant,
        config: ProviderConfig,
        actor: &Actor,
    ) -> Result<OnboardResult, OnboardError> {
        let mut slot = tenant.kms.write().await;
        let id = tenant.config.id.as_str();
        let emit = |kind| {
            self.audit.record(AuditEvent {
                keyring_id: id.to_owned(),
                actor: actor.clone(),
                at: Timestamp::now(),
                kind,
            });
        };
        let fail = |step, kind, message: String| ProbeFailure {
            step,
            kind,
            provider: config.provider().to_owned(),
            key_ref: config.kms_key_ref().to_owned(),
            message,
        };
        let probed = match self.providers.build(&config).await {
            Ok(wrapper) if wrapper.provider() != config.provider() => Err(fail(
                ProbeStep::Build,
                Some(WrapErrorKind::Misconfigured),
                format!(
                    "the factory built a {} wrapper for a {} config",
                    wrapper.provider(),
                    config.provider()
                ),
            )),
            Ok(wrapper) => probe::probe(wrapper.as_ref()).await.map(|_| wrapper),
            Err(e) => Err(fail(ProbeStep::Build, Some(e.kind), e.to_string())),
        };
        let wrapper = match probed {
            Ok(w) => w,
            Err(f) => {
                // The full text (SDK output, remote bodies) goes to the
                // operator log only; the audit entry and the client get the
                // step and the kind.
                crate::error::operator_log(format_args!(
                    "tenant {id}: KMS probe of {} {} failed at {}: {}",
                    f.provider, f.key_ref, f.step, f.message
                ));
                let f = ProbeFailure {
                    message: probe_summary(&f),
                    ..f
                };
                emit(AuditKind::ProbeFailed {
                    provider: f.provider.clone(),
                    key_ref: f.key_ref.clone(),
                    step: f.step,
                    error_kind: f.kind,
                    message: f.message.clone(),
                });
                return Err(OnboardError::Probe(f));
            }
        };
        let previous_key_ref = slot.as_ref().map(|o| o.config.kms_key_ref().to_owned());
        // The config is stored in the same transaction as the keyring save
        // that moves the master keys under it (or creates the keyring): a
        // crash cannot leave a config whose key does not hold the keyring,
        // nor a keyring under a key no stored config names.
        let json = serde_json::to_string(&config).map_err(|e| OnboardError::Db(e.to_string()))?;
        self.db
            .set_pending(id, crate::db::PendingConfig { json: json.clone() });
        let moved = match slot.as_ref() {
            // A conflict: another instance changed the keyring since this
            // one's view (which the keyring has reloaded): once more.
            Some(o) => match o
                .keyring
                .rewrap_master_keys(Arc::clone(&wrapper), actor)
                .await
            {
                Err(keyfold::Error::Conflict { .. }) => {
                    o.keyring
                        .rewrap_master_keys(Arc::clone(&wrapper), actor)
                        .await
                }
                other => other,
            }
            .map(|_| Arc::clone(&o.keyring)),
            None => self
                .keyring_builder(id, Arc::clone(&wrapper))
                .open_or_create()
                .await
                .map(Arc::new),
        };
        let still_pending = self.db.take_pending(id);
        let keyring = moved.map_err(OnboardError::Keyring)?;
        if still_pending.is_some() {
            // No save happened (the keyring existed with no master key to
            // move): nothing else changed, store the config alone.
            self.db
                .set_tenant_config(id, &json, Timestamp::now().as_secs())
                .await
                .map_err(|e| OnboardError::Db(e.to_string()))?;
        }
        emit(AuditKind::ConfigUpdated {
            provider: config.provider().to_owned(),
            key_ref: config.kms_key_ref().to_owned(),
            previous_key_ref,
        });
        *slot = Some(Onboarded {
            config,
            keyring: Arc::clone(&keyring),
        });
        self.maintenance.add(Arc::clone(&keyring));
        // The job slot is held across the rotation, so the background task
        // cannot start a job of its own for the new version meanwhile.
        let mut job = tenant.job.lock().await;
        let rotation = match keyring.rotate(actor).await {
            Err(keyfold::Error::Conflict { .. }) => keyring.rotate(actor).await,
            other => other,
        }
        .map_err(OnboardError::Keyring)?;
        drop(slot);
        self.new_job(id, &mut job, &keyring, rotation.lease_id.clone())
            .await;
        Ok(OnboardResult {
            keyring,
            version: rotation.version,
            version_id: rotation.version_id,
            lease_id: rotation.lease_id,
        })
    }

    /// Follows the tenant's stored config when another instance onboarded
    /// the tenant or replaced its config: reopens the keyring under the
    /// stored config (and resumes its stored rewrap job). One indexed read
    /// per request; nothing happens when the config is the one in use.
    pub async fn sync_config(&self, tenant: &Tenant) {
        let id = tenant.config.id.as_str();
        let stored = match self.db.tenant_config(id).await {
            Ok(Some(json)) => json,
            Ok(None) => return,
            Err(e) => {
                crate::error::operator_log(format_args!("tenant {id}: {e}"));
                return;
            }
        };
        let current = |slot: &Option<Onboarded>| {
            slot.as_ref()
                .and_then(|o| serde_json::to_string(&o.config).ok())
                .is_some_and(|json| json == stored)
        };
        if current(&*tenant.kms.read().await) {
            return;
        }
        let mut slot = tenant.kms.write().await;
        if current(&slot) {
            return;
        }
        match self.reopen(id).await {
            Ok(Some(onboarded)) => {
                *tenant.job.lock().await = None;
                self.resume_job(tenant, &onboarded.keyring).await;
                self.maintenance.add(Arc::clone(&onboarded.keyring));
                *slot = Some(onboarded);
            }
            Ok(None) => {}
            Err(e) => crate::error::operator_log(format_args!(
                "tenant {id}: cannot follow the stored config: {e}"
            )),
        }
    }

    /// The keyring of an onboarded tenant.
    pub async fn keyring_of(&self, tenant: &Tenant) -> Option<Arc<Keyring>> {
        tenant
            .kms
            .read()
            .await
            .as_ref()
            .map(|o| Arc::clone(&o.keyring))
    }

    /// The SQLite job's sources (on PostgreSQL the distributed job has
    /// its own, see `distributed`).
    fn sources(&self, tenant: &str) -> Vec<Arc<dyn RowSource>> {
        let Some(db) = self.db.sqlite() else {
            return Vec::new();
        };
        vec![
            Arc::new(SecretTable::new(db.clone(), tenant, SECRETS)),
            Arc::new(SecretTable::new(db.clone(), tenant, SECRET_VERSIONS)),
        ]
    }

    fn job_builder(
        &self,
        tenant: &str,
        keyring: &Arc<Keyring>,
    ) -> keyfold::rewrap::job::RewrapJobBuilder {
        RewrapJob::builder(Arc::clone(keyring), self.sources(tenant))
            .options(JobOptions {
                batch_size: self.rewrap.batch_size,
                ..JobOptions::default()
            })
            .audit(self.audit.clone(), Actor::new("tenant-kms-service/rewrap"))
    }

    /// Replaces the job in `slot` (the tenant's, locked) with a new one
    /// targeting the active version (id: the rotation's lease id when there
    /// is one). Hold the slot across the rotation that calls for it.
    ///
    /// On PostgreSQL: creates the distributed job every instance works on
    /// (`slot` stays empty).
    pub async fn new_job(
        &self,
        tenant: &str,
        slot: &mut Option<RewrapJob>,
        keyring: &Arc<Keyring>,
        lease: Option<String>,
    ) {
        #[cfg(feature = "postgres")]
        if self.db.postgres().is_some() {
            self.distributed_job(tenant, keyring, lease, true).await;
            return;
        }
        let mut builder = self.job_builder(tenant, keyring);
        if let Some(lease) = lease {
            builder = builder.job_id(lease);
        }
        match builder.create() {
            Ok(job) => {
                // The new job goes over every row again: the old job's
                // failed rows are its business now.
                if let Err(e) = self
                    .db
                    .clear_row_failures_except(tenant, &job.checkpoint().job_id)
                    .await
                {
                    crate::error::operator_log(format_args!("tenant {tenant}: {e}"));
                }
                self.persist(tenant, &job, None).await;
                *slot = Some(job);
            }
            Err(e) => eprintln!("tenant {tenant}: cannot create a rewrap job: {e}"),
        }
    }

    /// Resumes the tenant's stored job at startup, if it is unfinished.
    pub async fn resume_job(&self, tenant: &Tenant, keyring: &Arc<Keyring>) {
        if self.db.sqlite().is_none() {
            // The distributed job lives in its tables: `drive` joins it.
            return;
        }
        let id = tenant.config.id.as_str();
        let Ok(Some(row)) = self.db.job(id).await else {
            return;
        };
        if row.status != "running" {
            return;
        }
        let resumed = serde_json::from_str::<Checkpoint>(&row.checkpoint)
            .map_err(|e| e.to_string())
            .and_then(|cp| {
                self.job_builder(id, keyring)
                    .resume(cp)
                    .map_err(|e| e.to_string())
            });
        match resumed {
            Ok(job) => *tenant.job.lock().await = Some(job),
            Err(e) => eprintln!("tenant {id}: cannot resume rewrap job {}: {e}", row.job_id),
        }
    }

    async fn persist_running(&self, tenant: &str, job: &RewrapJob, error: String) {
        let row = JobRow {
            job_id: job.checkpoint().job_id.clone(),
            status: "running".to_owned(),
            error: Some(error),
            checkpoint: serde_json::to_string(job.checkpoint()).unwrap_or_default(),
        };
        if let Err(e) = self
            .db
            .save_job(tenant, &row, Timestamp::now().as_secs())
            .await
        {
            eprintln!("tenant {tenant}: cannot persist the rewrap checkpoint: {e}");
        }
    }

    async fn persist(&self, tenant: &str, job: &RewrapJob, error: Option<String>) {
        let cp = job.checkpoint();
        let rows_left = cp.completed
            && self
                .db
                .row_failures(tenant)
                .await
                .is_ok_and(|f| f.iter().any(|f| f.job_id == cp.job_id));
        let status = match (&error, cp.completed) {
            (Some(_), _) => "failed",
            (None, true) if rows_left => "incomplete",
            (None, true) => "completed",
            (None, false) => "running",
        };
        let row = JobRow {
            job_id: cp.job_id.clone(),
            status: status.to_owned(),
            error,
            checkpoint: serde_json::to_string(cp).unwrap_or_default(),
        };
        if let Err(e) = self
            .db
            .save_job(tenant, &row, Timestamp::now().as_secs())
            .await
        {
            eprintln!("tenant {tenant}: cannot persist the rewrap checkpoint: {e}");
        }
    }

    async fn record_failure(
        &self,
        tenant: &str,
        job_id: &str,
        source: &str,
        row_id: &str,
        error: &str,
        previous_attempts: u32,
    ) {
        let attempts = previous_attempts.saturating_add(1);
        let base = i64::try_from(self.rewrap.retry_base.as_millis()).unwrap_or(i64::MAX);
        let delay = base
            .saturating_mul(1_i64 << (attempts - 1).min(20))
            .min(3_600_000);
        let row = crate::db::RowFailureRow {
            job_id: job_id.to_owned(),
            source: source.to_owned(),
            row_id: row_id.to_owned(),
            error: error.to_owned(),
            attempts,
            next_retry_at_ms: crate::stepup::unix_ms().saturating_add(delay),
        };
        if let Err(e) = self.db.record_row_failure(tenant, &row).await {
            crate::error::operator_log(format_args!(
                "tenant {tenant}: cannot record a failed rewrap row: {e}"
            ));
        }
    }

    /// Retries the rows of the tenant's finished job that failed and are
    /// due (backoff doubling from `retry_base`), moving each to the job's
    /// target; the job's status becomes `completed` once none is left.
    /// Returns whether any row was tried.
    async fn retry_failures(&self, tenant: &str, keyring: &Arc<Keyring>) -> bool {
        let Ok(Some(job)) = self.db.job(tenant).await else {
            return false;
        };
        if job.status != "incomplete" {
            return false;
        }
        let Ok(cp) = serde_json::from_str::<Checkpoint>(&job.checkpoint) else {
            return false;
        };
        let now = crate::stepup::unix_ms();
        let failures = self.db.row_failures(tenant).await.unwrap_or_default();
        let mut tried = false;
        for f in failures.iter().filter(|f| f.job_id == job.job_id) {
            if f.next_retry_at_ms > now {
                continue;
            }
            tried = true;
            let table = if f.source == SECRETS {
                SECRETS
            } else {
                SECRET_VERSIONS
            };
            let Some(db) = self.db.sqlite() else {
                return false;
            };
            let source = SecretTable::new(db.clone(), tenant, table);
            let outcome = match source.get(&f.row_id).await {
                Err(e) => Err(e.to_string()),
                Ok(None) => Ok(()), // gone: nothing left to move
                Ok(Some(row)) => match keyring
                    .rewrap(&row.context, &row.ciphertext, cp.target_version)
                    .await
                {
                    Ok(None) => Ok(()), // on the target (or later) already
                    Ok(Some(new)) => match source
                        .compare_and_swap(&f.row_id, &row.ciphertext, &new)
                        .await
                    {
                        Ok(keyfold::rewrap::CasOutcome::Swapped) => Ok(()),
                        Ok(_) => Err("the row changed meanwhile".to_owned()),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                },
            };
            match outcome {
                Ok(()) => {
                    if let Err(e) = self
                        .db
                        .resolve_row_failure(tenant, &f.source, &f.row_id)
                        .await
                    {
                        crate::error::operator_log(format_args!("tenant {tenant}: {e}"));
                    }
                }
                Err(e) => {
                    crate::error::operator_log(format_args!(
                        "tenant {tenant}: retry {} of {} row {} failed: {e}",
                        f.attempts, f.source, f.row_id
                    ));
                    self.record_failure(tenant, &f.job_id, &f.source, &f.row_id, &e, f.attempts)
                        .await;
                }
            }
        }
        let left = self
            .db
            .row_failures(tenant)
            .await
            .is_ok_and(|all| all.iter().any(|f| f.job_id == job.job_id));
        if !left
            && let Err(e) = self
                .db
                .set_job_status(tenant, &job.job_id, "completed")
                .await
        {
            crate::error::operator_log(format_args!("tenant {tenant}: {e}"));
        }
        tried
    }

    /// Runs one batch of the tenant's job, if it has one to run. Creates a
    /// new job when the active version is not the job's target (a rotation
    /// whose job could not be created, or a rollback). Returns whether a
    /// batch ran.
    pub async fn drive(&self, tenant: &Tenant) -> bool {
        self.sync_config(tenant).await;
        let Some(keyring) = tenant
            .kms
            .read()
            .await
            .as_ref()
            .map(|o| Arc::clone(&o.keyring))
        else {
            return false;
        };
        #[cfg(feature = "postgres")]
        if self.db.postgres().is_some() {
            return self.drive_distributed(tenant, &keyring).await;
        }
        let id = tenant.config.id.as_str();
        let mut slot = tenant.job.lock().await;
        let active = keyring.active_version();
        let needs_new = match slot.as_ref() {
            Some(job) => Some(job.target_version()) != active,
            // No job in memory: a new one unless the stored one finished
            // (or is resumable) for the active version. A failed one (its
            // lease expired...) is replaced.
            None => {
                active.is_some()
                    && self.db.job(id).await.ok().flatten().is_none_or(|r| {
                        r.status == "failed"
                            || serde_json::from_str::<Checkpoint>(&r.checkpoint)
                                .map_or(true, |cp| Some(cp.target_version) != active)
                    })
            }
        };
        if needs_new {
            self.new_job(id, &mut slot, &keyring, None).await;
        }
        let Some(job) = slot.as_mut() else {
            drop(slot);
            return self.retry_failures(id, &keyring).await;
        };
        match job.next_batch().await {
            Ok(Some(report)) => {
                let job_id = job.checkpoint().job_id.clone();
                for f in &report.failures {
                    crate::error::operator_log(format_args!(
                        "tenant {id}: rewrap job {job_id}: {} row {} failed: {}",
                        f.source, f.row_id, f.error
                    ));
                    self.record_failure(id, &job_id, &f.source, &f.row_id, &f.error, 0)
                        .await;
                }
                self.persist(id, job, None).await;
                if report.completed {
                    *slot = None;
                }
                true
            }
            Ok(None) => {
                *slot = None;
                false
            }
            Err(e) => {
                eprintln!("tenant {id}: rewrap job stopped: {e}");
                let terminal = matches!(
                    e,
                    JobError::TargetUnusable { .. }
                        | JobError::TargetRolledBack { .. }
                        | JobError::LeaseExpired { .. }
                        | JobError::CheckpointMismatch(_)
                );
                if terminal {
                    self.persist(id, job, Some(e.to_string())).await;
                    *slot = None;
                } else {
                    // Sealed keyring, a store failure: the checkpoint is
                    // intact; retry on the next tick.
                    self.persist_running(id, job, e.to_string()).await;
                }
                true
            }
        }
    }
}
