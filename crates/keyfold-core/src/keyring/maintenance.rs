//! The maintenance task: what every service embedding keyfold would
//! otherwise write itself, on a timer (docs/LIFECYCLE.md, "Maintenance").
//!
//! The host spawns one [`Maintenance`] per process over its keyrings. Each
//! task is safe on every replica at once: every change is a compare-and-swap
//! on the keyring's revision, so one replica wins it and the others see it
//! ([`Error::Conflict`] from a losing replica is counted in
//! [`MaintenanceReport::lost_races`], never reported as a failure).
//!
//! | task | default interval | what it does |
//! |---|---|---|
//! | [`Task::Rotation`] | 1 hour | [`Keyring::rotate_if_policy_due`]: rotates when the policy stored with the keyring says so (`kms.rotate.scheduled`); waits while an operator's seal holds |
//! | [`Task::Destroy`] | 1 minute | records this replica's destroy bounds as the keyring's floors when the stored ones do not cover them ([`Keyring::record_bound_floors`]); destroys each version whose scheduled destroy ([`Keyring::schedule_destroy`]) is due, once the host's [`EvidenceSource`] hands over evidence |
//! | [`Task::Unseal`] | 1 second | probes a keyring sealed by a transient KMS failure (on the keyring's own backoff, 1 s doubling to 60 s) and unseals it when a probe passes (`kms.unsealed`); one sealed by a permanent failure (access denied, key disabled) is probed every 5 minutes ([`MaintenanceBuilder::probe_permanent_seals`]), so restoring the tenant's grant heals it; an operator's seal is never touched |
//! | [`Task::Sweep`] | 1 minute | [`Keyring::evict_expired`]: drops expired cached keys, also of keyrings nobody uses |
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keyfold_core::keyring::maintenance::{EvidenceSource, Maintenance};
//! use keyfold_core::keyring::NoRecordsLeft;
//! use keyfold_core::{Keyring, LocalKek, MemoryStore, RotationPolicy, SecretKey};
//!
//! /// The host's record of finished rewrap jobs (here: none yet).
//! #[derive(Debug)]
//! struct Jobs;
//!
//! #[async_trait::async_trait]
//! impl EvidenceSource for Jobs {
//!     async fn evidence(&self, _keyring_id: &str, _version: u32) -> Option<NoRecordsLeft> {
//!         None
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build()?.block_on(async {
//! let kek = Arc::new(LocalKek::from_bytes("dev-kek", SecretKey::generate()?));
//! let ring = Arc::new(Keyring::builder("tenant-a", kek, Arc::new(MemoryStore::new())).create().await?);
//! let admin = keyfold_core::Actor::new("admin@example.com");
//! ring.set_rotation_policy(Some(RotationPolicy::new(true, 90)?), &admin).await?;
//!
//! let maintenance = Arc::new(Maintenance::builder().evidence(Arc::new(Jobs)).build());
//! maintenance.add(ring.clone());
//! // Once per process, e.g. `tokio::spawn`:
//! let task = tokio::spawn({
//!     let m = maintenance.clone();
//!     async move { m.run().await }
//! });
//! tokio::time::sleep(Duration::from_secs(1)).await;
//! // Its first pass rotated: the keyring had no version yet.
//! assert_eq!(ring.active_version(), Some(1));
//! maintenance.handle().stop();
//! task.await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::*;

use std::collections::BTreeMap;

/// Default interval of [`Task::Rotation`]: the rotation policy is
/// evaluated hourly.
pub const DEFAULT_POLICY_INTERVAL: Duration = Duration::from_secs(3600);
/// Default interval of [`Task::Destroy`].
pub const DEFAULT_DESTROY_INTERVAL: Duration = Duration::from_secs(60);
/// Default interval of [`Task::Unseal`]: how often sealed keyrings are
/// looked at; each keyring's own backoff decides when a probe is sent.
pub const DEFAULT_UNSEAL_INTERVAL: Duration = Duration::from_secs(1);
/// Default interval of [`Task::Sweep`].
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Default of [`MaintenanceBuilder::probe_permanent_seals`].
pub const DEFAULT_PERMANENT_SEAL_PROBE: Duration = Duration::from_secs(300);
/// The actor the maintenance task's changes are audited as, by default.
pub const MAINTENANCE_ACTOR: &str = "keyfold-maintenance";

/// Where the maintenance task gets the evidence for a scheduled destroy:
/// the host's record of finished rewrap jobs (a job's
/// `CompletionReport::evidence(version)`), or its own scan.
///
/// Asked once per due destroy and pass of [`Task::Destroy`] (every minute
/// by default) until it answers: cache the answer if it is costly. Evidence
/// must have been gathered after the version was disabled (and past the
/// keyring's settling time), or the destroy is refused and reported.
#[async_trait]
pub trait EvidenceSource: Send + Sync + fmt::Debug {
    /// Evidence that no record of `keyring_id` is left on `version`, if
    /// the host has it.
    async fn evidence(&self, keyring_id: &str, version: u32) -> Option<NoRecordsLeft>;
}

/// An [`EvidenceSource`] that never has evidence: scheduled destroys wait
/// (the default, for hosts that destroy by hand).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvidence;

#[async_trait]
impl EvidenceSource for NoEvidence {
    async fn evidence(&self, _keyring_id: &str, _version: u32) -> Option<NoRecordsLeft> {
        None
    }
}

/// One of the maintenance task's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Task {
    /// Evaluate the stored rotation policy.
    Rotation,
    /// Carry out scheduled destroys whose evidence is in hand.
    Destroy,
    /// Probe and unseal keyrings sealed by a transient KMS failure.
    Unseal,
    /// Drop expired cached keys.
    Sweep,
}

impl Task {
    /// Every task, in the order a [`Maintenance::tick`] runs them.
    pub const ALL: [Task; 4] = [Task::Unseal, Task::Rotation, Task::Destroy, Task::Sweep];
}

/// A change or check that failed (a replica losing a race is not one).
#[derive(Debug)]
pub struct MaintenanceFailure {
    /// The keyring.
    pub keyring_id: String,
    /// The task.
    pub task: Task,
    /// The version concerned, if any.
    pub version: Option<u32>,
    /// What went wrong (a destroy refused carries `allowed_at`).
    pub error: Error,
}

/// What a pass did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// Keyrings rotated by their policy: (keyring id, new version).
    pub rotated: Vec<(String, u32)>,
    /// Versions destroyed on the host's evidence: (keyring id, version).
    pub destroyed: Vec<(String, u32)>,
    /// Destroys due whose evidence the host does not have yet.
    pub awaiting_evidence: Vec<(String, u32)>,
    /// Keyrings unsealed by a passing probe.
    pub unsealed: Vec<String>,
    /// Keyrings still sealed by a KMS failure after this pass (an
    /// operator's seal is not listed: it is no failure).
    pub still_sealed: Vec<String>,
    /// Cached keys dropped.
    pub evicted: usize,
    /// Changes another replica made first ([`Error::Conflict`], or a
    /// version it already destroyed): expected with several replicas.
    pub lost_races: usize,
    /// What failed.
    pub failures: Vec<MaintenanceFailure>,
}

impl MaintenanceReport {
    fn merge(&mut self, other: MaintenanceReport) {
        self.rotated.extend(other.rotated);
        self.destroyed.extend(other.destroyed);
        self.awaiting_evidence.extend(other.awaiting_evidence);
        self.unsealed.extend(other.unsealed);
        self.still_sealed.extend(other.still_sealed);
        self.evicted += other.evicted;
        self.lost_races += other.lost_races;
        self.failures.extend(other.failures);
    }

    fn fail(&mut self, ring: &Keyring, task: Task, version: Option<u32>, error: Error) {
        self.failures.push(MaintenanceFailure {
            keyring_id: ring.id().to_owned(),
            task,
            version,
            error,
        });
    }
}

/// Builds a [`Maintenance`].
#[derive(Debug)]
pub struct MaintenanceBuilder {
    intervals: BTreeMap<Task, Duration>,
    evidence: Arc<dyn EvidenceSource>,
    actor: Actor,
    permanent_probe: Option<Duration>,
}

impl MaintenanceBuilder {
    /// How often `task` runs in [`Maintenance::run`] (at least 1 ms; an
    /// interval too long for the clock to represent runs the task once).
    #[must_use]
    pub fn interval(mut self, task: Task, every: Duration) -> Self {
        self.intervals
            .insert(task, every.max(Duration::from_millis(1)));
        self
    }

    /// Where scheduled destroys get their evidence (default [`NoEvidence`]).
    #[must_use]
    pub fn evidence(mut self, source: Arc<dyn EvidenceSource>) -> Self {
        self.evidence = source;
        self
    }

    /// The actor the task's rotations and destroys are audited as (default
    /// [`MAINTENANCE_ACTOR`]).
    #[must_use]
    pub fn actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    /// How often [`Task::Unseal`] probes a keyring sealed by a permanent
    /// KMS failure (access denied, key disabled, not found, misconfigured):
    /// such a seal lasts until someone fixes the KMS side, and then until a
    /// probe passes. Default [`DEFAULT_PERMANENT_SEAL_PROBE`] (5 minutes);
    /// `None` leaves them to a manual [`Keyring::unseal`]. The first probe
    /// comes one interval after the task first sees the seal.
    #[must_use]
    pub fn probe_permanent_seals(mut self, every: Option<Duration>) -> Self {
        self.permanent_probe = every;
        self
    }

    /// The task, with no keyring yet ([`Maintenance::add`]).
    pub fn build(self) -> Maintenance {
        Maintenance {
            keyrings: Mutex::new(BTreeMap::new()),
            intervals: self.intervals,
            evidence: self.evidence,
            actor: self.actor,
            permanent_probe: self.permanent_probe,
            permanent_seen: Mutex::new(BTreeMap::new()),
            stop: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

/// Stops a running [`Maintenance`] (see [`Maintenance::handle`]).
#[derive(Debug, Clone)]
pub struct MaintenanceHandle {
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl MaintenanceHandle {
    /// Makes [`Maintenance::run`] return once the pass under way (if any)
    /// is done; a later `run` returns at once.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// The maintenance task over a set of keyrings (module docs).
pub struct Maintenance {
    keyrings: Mutex<BTreeMap<String, Arc<Keyring>>>,
    intervals: BTreeMap<Task, Duration>,
    evidence: Arc<dyn EvidenceSource>,
    actor: Actor,
    permanent_probe: Option<Duration>,
    /// Keyrings sealed by a permanent failure: when their last probe was
    /// (or the seal was first seen).
    permanent_seen: Mutex<BTreeMap<String, tokio::time::Instant>>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maintenance")
            .field("keyrings", &self.keyring_ids())
            .field("intervals", &self.intervals)
            .field("evidence", &self.evidence)
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

impl Maintenance {
    /// Starts building the task, with the default intervals.
    pub fn builder() -> MaintenanceBuilder {
        MaintenanceBuilder {
            intervals: BTreeMap::from([
                (Task::Rotation, DEFAULT_POLICY_INTERVAL),
                (Task::Destroy, DEFAULT_DESTROY_INTERVAL),
                (Task::Unseal, DEFAULT_UNSEAL_INTERVAL),
                (Task::Sweep, DEFAULT_SWEEP_INTERVAL),
            ]),
            evidence: Arc::new(NoEvidence),
            actor: Actor::new(MAINTENANCE_ACTOR),
            permanent_probe: Some(DEFAULT_PERMANENT_SEAL_PROBE),
        }
    }

    /// Looks after `keyring` from the next pass on (replacing a keyring of
    /// the same id).
    pub fn add(&self, keyring: Arc<Keyring>) {
        self.lock().insert(keyring.id().to_owned(), keyring);
    }

    /// Stops looking after keyring `id`.
    pub fn remove(&self, id: &str) -> Option<Arc<Keyring>> {
        self.lock().remove(id)
    }

    /// The ids of the keyrings looked after.
    pub fn keyring_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Keyring>>> {
        self.keyrings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rings(&self) -> Vec<Arc<Keyring>> {
        self.lock().values().cloned().collect()
    }

    /// The interval of `task` in [`run`](Self::run).
    pub fn interval(&self, task: Task) -> Duration {
        self.intervals
            .get(&task)
            .copied()
            .unwrap_or(DEFAULT_POLICY_INTERVAL)
    }

    /// A handle that stops [`run`](Self::run).
    pub fn handle(&self) -> MaintenanceHandle {
        MaintenanceHandle {
            stop: Arc::clone(&self.stop),
        }
    }

    /// Every task once, over every keyring (tests; an operator's "run now").
    pub async fn tick(&self) -> MaintenanceReport {
        let mut report = MaintenanceReport::default();
        for task in Task::ALL {
            report.merge(self.run_task(task).await);
        }
        report
    }

    /// One task once, over every keyring.
    pub async fn run_task(&self, task: Task) -> MaintenanceReport {
        let mut report = MaintenanceReport::default();
        for ring in self.rings() {
            match task {
                Task::Rotation => self.rotate(&ring, &mut report).await,
                Task::Destroy => self.destroy_due(&ring, &mut report).await,
                Task::Unseal => self.unseal(&ring, &mut report).await,
                Task::Sweep => report.evicted += ring.evict_expired(),
            }
        }
        report
    }

    /// Runs every task at once, then each on its interval (on tokio's
    /// clock, so a test with paused time drives it), until
    /// [`MaintenanceHandle::stop`]. Reports go nowhere: the changes are in
    /// the audit log; use [`run_with`](Self::run_with) to see failures.
    pub async fn run(&self) {
        self.run_with(|_, _| {}).await;
    }

    /// As [`run`](Self::run), handing each pass's report to `on_report`
    /// (log its failures and `still_sealed`).
    pub async fn run_with(&self, mut on_report: impl FnMut(Task, &MaintenanceReport)) {
        let mut stopped = self.stop.subscribe();
        let start = tokio::time::Instant::now();
        let mut due: BTreeMap<Task, tokio::time::Instant> =
            Task::ALL.iter().map(|t| (*t, start)).collect();
        loop {
            if *stopped.borrow_and_update() {
                return;
            }
            for task in Task::ALL {
                if due
                    .get(&task)
                    .is_some_and(|at| *at <= tokio::time::Instant::now())
                {
                    let report = self.run_task(task).await;
                    on_report(task, &report);
                    // The interval counts from the end of the pass: a slow
                    // pass never queues up passes behind it. An interval
                    // the clock cannot represent means "never again", not
                    // a panic.
                    match tokio::time::Instant::now().checked_add(self.interval(task)) {
                        Some(at) => due.insert(task, at),
                        None => due.remove(&task),
                    };
                }
            }
            let Some(next) = due.values().min().copied() else {
                return;
            };
            // Woken by a stop, or when the next task is due.
            if let Ok(Err(_closed)) = tokio::time::timeout_at(next, stopped.changed()).await {
                return;
            }
        }
    }

    async fn rotate(&self, ring: &Keyring, report: &mut MaintenanceReport) {
        match ring.rotate_if_policy_due(&self.actor).await {
            Ok(Some(rotation)) => report
                .rotated
                .push((ring.id().to_owned(), rotation.version)),
            Ok(None) => {}
            // Another replica rotated first (rotate_if_due re-checks after
            // one conflict; a second means the store is busy: next pass).
            Err(Error::Conflict { .. }) => report.lost_races += 1,
            // An operator's seal refuses rotations; no failure: the due
            // rotation happens on the first pass after the unseal.
            Err(Error::SealedByOperator { .. }) => {}
            Err(e) => report.fail(ring, Task::Rotation, None, e),
        }
    }

    async fn destroy_due(&self, ring: &Keyring, report: &mut MaintenanceReport) {
        // Another replica may have scheduled (or enabled, cancelling) since
        // this one last read the store: judge on a view no older than the
        // max staleness (no store read otherwise).
        if let Err(e) = ring.refresh_if_stale().await {
            report.fail(ring, Task::Destroy, None, e);
            return;
        }
        // This replica's max staleness, write window and grace count for
        // every destroy in the fleet once stored as floors; a replica that
        // never changes the keyring records them here (a write only while
        // the stored floors do not cover them).
        let own = ring.own_bound_floors();
        if !ring.bound_floors().is_some_and(|f| f.covers(&own)) {
            match ring.record_bound_floors().await {
                Ok(_) => {}
                Err(Error::Conflict { .. }) => report.lost_races += 1,
                Err(e) => report.fail(ring, Task::Destroy, None, e),
            }
        }
        for (version, _at) in ring.due_destroys() {
            let Some(evidence) = self.evidence.evidence(ring.id(), version).await else {
                report
                    .awaiting_evidence
                    .push((ring.id().to_owned(), version));
                continue;
            };
            let auth = DestroyAuthorization::Evidence(evidence);
            match ring.destroy(version, auth, &self.actor).await {
                Ok(()) => report.destroyed.push((ring.id().to_owned(), version)),
                // The keyring reloaded: another replica destroyed it, or
                // changed something else (then the next pass retries).
                Err(Error::Conflict { .. }) => report.lost_races += 1,
                // Another replica destroyed it before this view saw it.
                Err(Error::IllegalTransition {
                    from: KeyState::Destroyed,
                    ..
                }) => report.lost_races += 1,
                Err(e) => report.fail(ring, Task::Destroy, Some(version), e),
            }
        }
    }

    /// Probes a keyring sealed by a KMS failure: a transient one when its
    /// own backoff says so, a permanent one every
    /// [`probe_permanent_seals`](MaintenanceBuilder::probe_permanent_seals).
    /// An operator's seal is never lifted ([`Keyring::unseal`] leaves it).
    async fn unseal(&self, ring: &Keyring, report: &mut MaintenanceReport) {
        let Some(info) = ring.sealed() else {
            self.seen().remove(ring.id());
            return;
        };
        if info.kind.is_transient() {
            ring.auto_unseal_if_due().await;
        } else if let Some(every) = self.permanent_probe {
            let now = tokio::time::Instant::now();
            let due = {
                let mut seen = self.seen();
                let due = seen
                    .get(ring.id())
                    .is_some_and(|last| now.saturating_duration_since(*last) >= every);
                if due || !seen.contains_key(ring.id()) {
                    seen.insert(ring.id().to_owned(), now);
                }
                due
            };
            if due {
                // A failure keeps the seal; nothing more to report.
                let _ = ring.unseal().await;
            }
        }
        if ring.sealed().is_none() {
            self.seen().remove(ring.id());
            report.unsealed.push(ring.id().to_owned());
        } else {
            report.still_sealed.push(ring.id().to_owned());
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, tokio::time::Instant>> {
        self.permanent_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
