//! A multi-tenant secrets service that keeps each tenant's secrets under the
//! tenant's own KMS key, built on `keyfold`: the example a backend engineer
//! copies. See the repository README, "Run the example service".
//!
//! - [`config`]: the JSON config, or a development setup on the local KEK;
//! - [`db`]: SQLite, or PostgreSQL for a fleet (keyring store, secrets,
//!   rewrap jobs, audit log);
//! - [`tenants`]: onboarding with a live probe, the rewrap job per tenant;
//! - [`api`]: the HTTP API (axum), bearer tokens;
//! - [`stepup`]: the second factor (TOTP) and step-up tokens;
//! - [`error`]: the one JSON error shape, request ids, the operator log;
//! - `/metrics` on the operator's listener (`metrics_listen`).
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod db;
#[cfg(feature = "postgres")]
mod distributed;
pub mod error;
mod metrics;
pub mod stepup;
pub mod tenants;
pub mod time;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::App;
use crate::config::ServiceConfig;
use crate::db::Db;
use crate::stepup::Enrolment;
use crate::tenants::{DbAudit, Providers, Shared, Tenant};

/// The service, running.
#[derive(Debug)]
pub struct RunningService {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when `metrics_listen` asked for it.
    pub metrics_addr: Option<SocketAddr>,
    /// Second factors enrolled by this start (tenants seen for the first
    /// time): hand each to its tenant admin once; they are never shown again.
    pub enrolments: Vec<Enrolment>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    worker: JoinHandle<()>,
    db: Db,
}

impl RunningService {
    /// Stops accepting requests, finishes those in flight, stops the rewrap
    /// task and each tenant's distributed worker between batches (their
    /// checkpoints stored, their shards released) and waits for them, at
    /// most 30 s for the workers (then they are aborted and their shard
    /// leases lapse).
    ///
    /// # Errors
    /// The server's I/O error, if it failed.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Waits until the service stops (after [`stop`](Self::stop) or a
    /// server failure).
    ///
    /// # Errors
    /// The server's I/O error, if it failed.
    pub async fn wait(self) -> std::io::Result<()> {
        let served = self
            .server
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let _ = self.shutdown.send(true);
        let _ = self.worker.await;
        // Background work's audit entries (maintenance, rewrap) queued on
        // PostgreSQL are written before the service says it stopped.
        if let Err(e) = self.db.flush_audit().await {
            crate::error::operator_log(format_args!("{e}"));
        }
        served
    }

    /// A handle that stops the service from elsewhere (a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Opens the database, reopens every onboarded tenant's keyring (resuming
/// its rewrap job from the stored checkpoint), binds the listener and
/// starts the server and the background rewrap task.
///
/// # Errors
/// Database, keyring or bind failures.
pub async fn start(
    config: ServiceConfig,
    providers: Providers,
) -> Result<RunningService, Box<dyn std::error::Error + Send + Sync>> {
    config.validate()?;
    let db = Db::open(&config.database)
        .await
        .map_err(|e| format!("cannot open {}: {e}", config.database.redacted()))?;
    let mut enrolments = Vec::new();
    for t in &config.tenants {
        if let Some(e) = stepup::enrol(&db, &t.id, &t.admin, &config.step_up)
            .await
            .map_err(|e| format!("tenant {}: cannot enrol a second factor: {e}", t.id))?
        {
            enrolments.push(e);
        }
    }

    let mut maintenance = keyfold::Maintenance::builder()
        .evidence(Arc::new(tenants::DbEvidence::new(db.clone())))
        .actor(keyfold::audit::Actor::new("tenant-kms-service/maintenance"));
    if let Some(every) = config.maintenance_interval {
        for task in keyfold::keyring::maintenance::Task::ALL {
            maintenance = maintenance.interval(task, every);
        }
    }
    let maintenance = Arc::new(maintenance.build());
    let (shutdown, stop_server) = watch::channel(false);
    let shared = Arc::new(Shared {
        audit: Arc::new(DbAudit::new(db.clone())),
        db,
        providers,
        rewrap: config.rewrap.clone(),
        max_staleness: config.max_staleness,
        destroy_grace: config.destroy_grace,
        write_window: config.write_window,
        maintenance: Arc::clone(&maintenance),
        shutdown: shutdown.subscribe(),
    });
    let mut tenants = Vec::new();
    for t in &config.tenants {
        let tenant = Arc::new(Tenant {
            config: t.clone(),
            kms: tokio::sync::RwLock::new(None),
            job: tokio::sync::Mutex::new(None),
            #[cfg(feature = "postgres")]
            worker: tokio::sync::Mutex::new(None),
        });
        if let Some(onboarded) = shared
            .reopen(&t.id)
            .await
            .map_err(|e| format!("tenant {}: {e}", t.id))?
        {
            shared.resume_job(&tenant, &onboarded.keyring).await;
            maintenance.add(Arc::clone(&onboarded.keyring));
            *tenant.kms.write().await = Some(onboarded);
        }
        tenants.push(tenant);
    }
    let tenants = Arc::new(tenants);
    let app = App {
        shared: Arc::clone(&shared),
        tenants: Arc::clone(&tenants),
        step_up: config.step_up.clone(),
    };
    let metrics = match config.metrics_listen {
        Some(at) => Some(metrics::serve(at, shutdown.subscribe()).await?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(|(addr, _)| *addr);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let mut stop_server = stop_server;
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            api::router(app).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stop_server.wait_for(|stop| *stop).await;
        })
        .await
    });
    let db = shared.db.clone();
    let rewrap = tokio::spawn(rewrap_worker(shared, tenants, shutdown.subscribe()));
    // keyfold's maintenance task (rotation policy, scheduled destroys,
    // unseal probes, cache sweeps), stopped with the service.
    let maintenance_task = tokio::spawn({
        let m = Arc::clone(&maintenance);
        async move { m.run().await }
    });
    let mut stop_maintenance = shutdown.subscribe();
    let handle = maintenance.handle();
    tokio::spawn(async move {
        let _ = stop_maintenance.wait_for(|stop| *stop).await;
        handle.stop();
    });
    let worker = tokio::spawn(async move {
        let _ = rewrap.await;
        let _ = maintenance_task.await;
        if let Some((_, server)) = metrics {
            let _ = server.await;
        }
    });
    Ok(RunningService {
        addr,
        metrics_addr,
        enrolments,
        shutdown,
        server,
        worker,
        db,
    })
}

/// Every `interval`, one batch of each tenant's rewrap job (batches of
/// `batch_size` rows interleaved across the two secret tables), the
/// checkpoint stored after each.
async fn rewrap_worker(
    shared: Arc<Shared>,
    tenants: Arc<Vec<Arc<Tenant>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batches = 0u64;
    loop {
        for tenant in tenants.iter() {
            if *stop.borrow() || shared.rewrap.max_batches.is_some_and(|max| batches >= max) {
                break;
            }
            if shared.drive(tenant).await {
                batches += 1;
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            () = tokio::time::sleep(shared.rewrap.interval) => {}
        }
    }
    // Each tenant's distributed worker (PostgreSQL) sees the same stop: it
    // finishes its batch, saves its shard's checkpoint, releases the shard
    // and records its outcome. The service has not stopped until they
    // have, or until STOP_GRACE has passed: a worker stuck on an unhealthy
    // KMS or database is then aborted, and its shard's lease lapses for
    // another instance to resume (nothing it wrote is lost: every write is
    // a compare-and-swap).
    let mut handles = Vec::new();
    for tenant in tenants.iter() {
        if let Some(worker) = tenant.worker.lock().await.take() {
            handles.extend(worker.previous);
            handles.push(worker.handle);
        }
    }
    let all = async {
        for handle in &mut handles {
            let _ = handle.await;
        }
    };
    if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
        crate::error::operator_log(format_args!(
            "rewrap workers still busy after {STOP_GRACE:?}: aborted; their shards resume once their leases lapse"
        ));
        for handle in &handles {
            handle.abort();
        }
    }
}

/// How long stopping waits for the rewrap workers to save and release.
const STOP_GRACE: Duration = Duration::from_secs(30);
