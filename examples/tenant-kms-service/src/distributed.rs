//! On PostgreSQL, a tenant's rewrap job is keyfold-postgres's distributed
//! job: whichever instance rotates creates it, and every instance runs a
//! worker on it, so its shards are shared (each claimed under a lease, each
//! row read once) and a killed instance's shards are taken over from their
//! checkpoints once its leases lapse.
//!
//! The service's `tks_rewrap_jobs` row names the tenant's current job; its
//! `checkpoint` column holds [`JobRef`]. Instances create jobs under a
//! per-tenant advisory lock, so two instances seeing the same rotation
//! join one job instead of making two.

use std::sync::Arc;

use keyfold::keyring::Keyring;
use keyfold::postgres::{DistributedJobOptions, JobStatus};
use keyfold::time::Timestamp;
use serde::{Deserialize, Serialize};

use crate::db::JobRow;
use crate::tenants::{Shared, Tenant};

/// This instance's worker on a tenant's distributed job.
#[derive(Debug)]
pub(crate) struct JobWorker {
    job_id: String,
    pub(crate) handle: tokio::task::JoinHandle<()>,
    cancel: tokio::sync::watch::Sender<bool>,
    /// Workers this one replaced that had not finished yet.
    pub(crate) previous: Vec<tokio::task::JoinHandle<()>>,
}

/// What the service keeps of a distributed job in its job row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JobRef {
    /// Always `true`: tells this row from a SQLite checkpoint.
    pub(crate) distributed: bool,
    /// The version the job moves rows to.
    pub(crate) target_version: u32,
    /// When the job was last found finished with rows left (Unix ms), for
    /// the retry's backoff.
    #[serde(default)]
    pub(crate) incomplete_since_ms: Option<i64>,
}

impl JobRef {
    /// The reference in a job row, if the row is a distributed job's.
    pub(crate) fn of(row: &JobRow) -> Option<JobRef> {
        serde_json::from_str::<JobRef>(&row.checkpoint)
            .ok()
            .filter(|r| r.distributed)
    }
}

/// The service's status word for a distributed job's state.
pub(crate) fn status_word(status: &JobStatus) -> &'static str {
    match (&status.failed, status.completed) {
        (Some(_), _) => "failed",
        (None, true) if status.totals.failed > 0 || status.totals.unresolved > 0 => "incomplete",
        (None, true) => "completed",
        (None, false) => "running",
    }
}

/// This process, as the owner of the shards it claims.
fn instance_name() -> String {
    format!("tenant-kms-service-{}", std::process::id())
}

impl Shared {
    /// The tenant's distributed job for the keyring's active version:
    /// the stored one when it targets that version (and, unless `fresh`,
    /// is not finished), else a new one (id: `lease` when given). Under a
    /// per-tenant advisory lock, so concurrent instances agree on one job.
    pub(crate) async fn distributed_job(
        &self,
        tenant: &str,
        keyring: &Arc<Keyring>,
        lease: Option<String>,
        fresh: bool,
    ) -> Option<String> {
        let pg = self.db.postgres()?;
        let log = |what: &str, e: &dyn std::fmt::Display| {
            crate::error::operator_log(format_args!("tenant {tenant}: {what}: {e}"));
        };
        // A transaction-scoped lock: released by the commit below, or by
        // the rollback if this future is dropped (a client gone mid-rotate),
        // never left held on a pooled connection. Waiting is bounded.
        let mut lock = match pg.pool().begin().await {
            Ok(tx) => tx,
            Err(e) => {
                log("cannot create a rewrap job", &e);
                return None;
            }
        };
        let key = format!("tenant-kms-service/rewrap-job/{tenant}");
        let locked = async {
            sqlx::query("SET LOCAL lock_timeout = '30s'")
                .execute(&mut *lock)
                .await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(&key)
                .execute(&mut *lock)
                .await
        }
        .await;
        if let Err(e) = locked {
            log("cannot create a rewrap job", &e);
            return None;
        }
        let created = async {
            // Judge on the store's latest revision: another instance may
            // have rotated since this one's view.
            if let Err(e) = keyring.refresh().await {
                log("cannot create a rewrap job", &e);
                return None;
            }
            let active = keyring.active_version()?;
            let stored = match self.db.job(tenant).await {
                Ok(stored) => stored,
                Err(e) => {
                    log("cannot read the rewrap job", &e);
                    return None;
                }
            };
            if let Some(row) = &stored
                && let Some(r) = JobRef::of(row)
                && r.target_version == active
                && (row.status == "running" || (!fresh && row.status != "failed"))
            {
                return Some(row.job_id.clone());
            }
            let sources = match pg.secret_tables(tenant).await {
                Ok(s) => s,
                Err(e) => {
                    log("cannot create a rewrap job", &e);
                    return None;
                }
            };
            let mut options = DistributedJobOptions::default();
            options.batch_size = self.rewrap.batch_size;
            options.shards_per_source = self.rewrap.shards_per_source;
            options.shard_lease = self.rewrap.shard_lease;
            // The rotation's lease names the job, whichever instance gets
            // here first: the rotating one (which passes it) or another that
            // saw the rotation (lease ids are `lease-TENANT-vN`, see
            // `tenants::lease_id`). A new pass for the same version (a retry,
            // a rollback to it) needs an id no job has yet: a random one.
            let wanted = lease.unwrap_or_else(|| crate::tenants::lease_id(tenant, active));
            options.job_id = match pg.coordinator().status(&wanted).await {
                Err(keyfold::postgres::DistributedJobError::UnknownJob(_)) => Some(wanted),
                _ => None,
            };
            let job_id = match pg
                .coordinator()
                .create_job(keyring, &sources, &options)
                .await
            {
                Ok(id) => id,
                Err(e) => {
                    log("cannot create a rewrap job", &e);
                    return None;
                }
            };
            // The new pass goes over every row again: the older passes'
            // failed rows are its business now.
            if let Err(e) = self.db.clear_row_failures_except(tenant, &job_id).await {
                log("cannot clear the old job's failed rows", &e);
            }
            let row = JobRow {
                job_id: job_id.clone(),
                status: "running".to_owned(),
                error: None,
                checkpoint: serde_json::to_string(&JobRef {
                    distributed: true,
                    target_version: active,
                    incomplete_since_ms: None,
                })
                .unwrap_or_default(),
            };
            if let Err(e) = self
                .db
                .save_job(tenant, &row, Timestamp::now().as_secs())
                .await
            {
                log("cannot record the rewrap job", &e);
            }
            Some(job_id)
        }
        .await;
        if let Err(e) = lock.commit().await {
            log("releasing the rewrap job lock", &e);
        }
        created
    }

    /// One tick of the tenant's distributed job in this instance: starts
    /// this instance's worker on the job when it has none running (the
    /// worker claims shards until every shard is done, then records the
    /// job's outcome), creates the job when the active version has none,
    /// and retries a job that finished with rows left after the backoff.
    /// Returns whether it started a worker.
    pub(crate) async fn drive_distributed(&self, tenant: &Tenant, keyring: &Arc<Keyring>) -> bool {
        let Some(pg) = self.db.postgres() else {
            return false;
        };
        let id = tenant.config.id.as_str();
        let mut worker = tenant.worker.lock().await;
        let Some(active) = keyring.active_version() else {
            return false;
        };
        let stored = self.db.job(id).await.ok().flatten();
        let reference = stored.as_ref().and_then(JobRef::of);
        let job_id = match (&stored, &reference) {
            (Some(row), Some(r)) if r.target_version == active && row.status == "running" => {
                row.job_id.clone()
            }
            (Some(row), Some(r)) if r.target_version == active && row.status == "completed" => {
                return false;
            }
            (Some(row), Some(r)) if r.target_version == active && row.status == "incomplete" => {
                let base = i64::try_from(self.rewrap.retry_base.as_millis()).unwrap_or(i64::MAX);
                let since = r.incomplete_since_ms.unwrap_or(0);
                if crate::stepup::unix_ms() < since.saturating_add(base) {
                    return false;
                }
                // A new pass over the tenant's rows: those moved already
                // are skipped, the failed ones tried again.
                match self.distributed_job(id, keyring, None, true).await {
                    Some(job) => job,
                    None => return false,
                }
            }
            _ => match self.distributed_job(id, keyring, None, false).await {
                Some(job) => job,
                None => return false,
            },
        };
        if let Some(running) = worker.as_ref().filter(|w| !w.handle.is_finished()) {
            if running.job_id == job_id {
                return false;
            }
            // A newer job (another rotation): the old worker stops after
            // its batch, releasing its shards with their checkpoints, and
            // this instance moves on to the new job at once.
            let _ = running.cancel.send(true);
        }
        let sources = match pg.secret_tables(id).await {
            Ok(s) => s,
            Err(e) => {
                crate::error::operator_log(format_args!("tenant {id}: rewrap sources: {e}"));
                return false;
            }
        };
        let run = pg
            .coordinator()
            .clone()
            .audit(
                self.audit.clone(),
                keyfold::audit::Actor::new("tenant-kms-service/rewrap"),
            )
            .worker(&job_id, Arc::clone(keyring), sources)
            .name(instance_name())
            .poll_interval(self.rewrap.interval);
        let db = self.db.clone();
        let coordinator = pg.coordinator().clone();
        let tenant_id = id.to_owned();
        let mut stop = self.shutdown.clone();
        let (cancel, mut cancelled) = tokio::sync::watch::channel(false);
        let worker_job = job_id.clone();
        let handle = tokio::spawn(async move {
            let stopped = async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = cancelled.wait_for(|c| *c) => {}
                }
            };
            match run.run_until(stopped).await {
                Ok(report) => record_failures(&db, &tenant_id, &job_id, &report.failures).await,
                Err(e) => crate::error::operator_log(format_args!(
                    "tenant {tenant_id}: rewrap worker on job {job_id}: {e}"
                )),
            }
            record_outcome(&db, &coordinator, &tenant_id, &job_id).await;
        });
        // A worker replaced by this one (cancelled above) may still be
        // saving its checkpoint: kept, so that stopping the service waits
        // for it too.
        let mut previous = Vec::new();
        if let Some(old) = worker.take() {
            previous = old.previous;
            previous.push(old.handle);
            previous.retain(|h| !h.is_finished());
        }
        *worker = Some(JobWorker {
            job_id: worker_job,
            handle,
            cancel,
            previous,
        });
        true
    }
}

/// Records the rows this instance's worker could not move, with why, as
/// the SQLite job does (`GET /admin/tenant-kms/rewrap` lists them; a later
/// pass retries them). The detail goes to the operator log too.
async fn record_failures(
    db: &crate::db::Db,
    tenant: &str,
    job_id: &str,
    failures: &[keyfold::rewrap::RowFailure],
) {
    for f in failures {
        crate::error::operator_log(format_args!(
            "tenant {tenant}: rewrap job {job_id}: {} row {} failed: {}",
            f.source, f.row_id, f.error
        ));
        let row = crate::db::RowFailureRow {
            job_id: job_id.to_owned(),
            source: f.source.clone(),
            row_id: f.row_id.clone(),
            error: f.error.clone(),
            attempts: 1,
            next_retry_at_ms: crate::stepup::unix_ms(),
        };
        if let Err(e) = db.record_row_failure(tenant, &row).await {
            crate::error::operator_log(format_args!("tenant {tenant}: {e}"));
        }
    }
}

/// Writes a distributed job's state into the tenant's job row (if the row
/// still names that job): `completed`, `incomplete` (rows failed: retried
/// after the backoff) or `failed`; nothing while it runs.
async fn record_outcome(
    db: &crate::db::Db,
    coordinator: &keyfold::postgres::RewrapCoordinator,
    tenant: &str,
    job_id: &str,
) {
    let Ok(status) = coordinator.status(job_id).await else {
        return;
    };
    let word = status_word(&status);
    if word == "running" {
        return;
    }
    let Ok(Some(mut row)) = db.job(tenant).await else {
        return;
    };
    if row.job_id != job_id || row.status == word {
        return;
    }
    row.status = word.to_owned();
    row.error = status.failed.clone();
    if word == "incomplete"
        && let Some(mut r) = JobRef::of(&row)
    {
        r.incomplete_since_ms = Some(crate::stepup::unix_ms());
        row.checkpoint = serde_json::to_string(&r).unwrap_or_default();
    }
    // Only if the row still names this job: another instance may have
    // recorded a newer one meanwhile.
    if let Err(e) = db.update_job(tenant, job_id, &row).await {
        crate::error::operator_log(format_args!(
            "tenant {tenant}: cannot record job {job_id}: {e}"
        ));
    }
}
