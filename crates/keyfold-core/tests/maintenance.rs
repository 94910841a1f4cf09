//! The maintenance task (issue #16, item 7): rotation policy, scheduled
//! destroys on the host's evidence, self-healing of transient seals, cache
//! sweeps; on several replicas at once, exactly one wins each change.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keyfold_core::audit::{Actor, AuditKind, RecordingSink};
use keyfold_core::keyring::maintenance::{
    EvidenceSource, Maintenance, MaintenanceReport, NoEvidence, Task,
};
use keyfold_core::keyring::{KeyState, Keyring, NoRecordsLeft};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::MemoryStore;
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{EncryptionContext, Error, LocalKek, RotationPolicy, SecretKey, WrapErrorKind};

const DAY: Duration = Duration::from_secs(86_400);

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

struct Fleet {
    store: Arc<MemoryStore>,
    wrapper: Arc<CountingWrapper<LocalKek>>,
    clock: Arc<ManualClock>,
    audit: Arc<RecordingSink>,
}

impl Fleet {
    fn new() -> Self {
        Fleet {
            store: Arc::new(MemoryStore::new()),
            wrapper: CountingWrapper::shared(LocalKek::from_bytes(
                "kek",
                SecretKey::generate().unwrap(),
            )),
            clock: Arc::new(ManualClock::new(Timestamp(1_000_000))),
            audit: Arc::new(RecordingSink::default()),
        }
    }

    fn builder(&self) -> keyfold_core::keyring::KeyringBuilder {
        Keyring::builder("tenant", self.wrapper.clone(), self.store.clone())
            .clock(self.clock.clone())
            .audit(self.audit.clone())
            .retry_policy(RetryPolicy::none())
            .max_staleness(Duration::from_secs(5))
            .write_window(Duration::from_secs(5))
            .destroy_grace(DAY)
    }

    /// The first instance (creates the keyring) and `n - 1` more.
    async fn instances(&self, n: usize) -> Vec<Arc<Keyring>> {
        let mut out = vec![Arc::new(self.builder().create().await.unwrap())];
        for _ in 1..n {
            out.push(Arc::new(self.builder().open().await.unwrap()));
        }
        out
    }

    fn count(&self, name: &str) -> usize {
        self.audit.names().iter().filter(|n| **n == name).count()
    }
}

/// One maintenance task per replica (as one per process).
fn tasks(rings: &[Arc<Keyring>], evidence: Arc<dyn EvidenceSource>) -> Vec<Maintenance> {
    rings
        .iter()
        .map(|r| {
            let m = Maintenance::builder().evidence(evidence.clone()).build();
            m.add(r.clone());
            m
        })
        .collect()
}

async fn tick_all(tasks: &[Maintenance]) -> Vec<MaintenanceReport> {
    let mut out = Vec::new();
    // Interleaved, as replicas would run them.
    let [a, b, c] = tasks else {
        panic!("three replicas")
    };
    let (ra, rb, rc) = tokio::join!(a.tick(), b.tick(), c.tick());
    out.extend([ra, rb, rc]);
    out
}

fn rotated(reports: &[MaintenanceReport]) -> usize {
    reports.iter().map(|r| r.rotated.len()).sum()
}

fn no_failures(reports: &[MaintenanceReport]) {
    for r in reports {
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
}

#[tokio::test(start_paused = true)]
async fn every_replica_evaluates_the_policy_and_one_rotation_wins() {
    let fleet = Fleet::new();
    let rings = fleet.instances(3).await;
    rings[0].rotate(&admin()).await.unwrap();
    rings[0]
        .set_rotation_policy(Some(RotationPolicy::new(true, 1).unwrap()), &admin())
        .await
        .unwrap();
    let tasks = tasks(&rings, Arc::new(NoEvidence));

    // Not due yet: nothing happens anywhere.
    let reports = tick_all(&tasks).await;
    no_failures(&reports);
    assert_eq!(rotated(&reports), 0);

    fleet.clock.advance(DAY + Duration::from_secs(1));
    let reports = tick_all(&tasks).await;
    no_failures(&reports);
    assert_eq!(rotated(&reports), 1, "{reports:?}");
    assert_eq!(fleet.count("kms.rotate.scheduled"), 1);
    for r in &rings {
        r.refresh().await.unwrap();
        assert_eq!(r.active_version(), Some(2));
    }

    // And not again until the next period.
    let reports = tick_all(&tasks).await;
    assert_eq!(rotated(&reports), 0);
    assert_eq!(fleet.count("kms.rotate.scheduled"), 1);
}

/// The host's evidence, handed over when the test says so.
#[derive(Debug, Default)]
struct Evidence {
    ready: Mutex<Option<NoRecordsLeft>>,
    asked: Mutex<Vec<(String, u32)>>,
}

#[async_trait]
impl EvidenceSource for Evidence {
    async fn evidence(&self, keyring_id: &str, version: u32) -> Option<NoRecordsLeft> {
        self.asked
            .lock()
            .unwrap()
            .push((keyring_id.to_owned(), version));
        self.ready
            .lock()
            .unwrap()
            .clone()
            .filter(|e| e.keyring_id == keyring_id && e.version == version)
    }
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_destroy_runs_once_when_due_and_its_evidence_is_in_hand() {
    let fleet = Fleet::new();
    let rings = fleet.instances(3).await;
    let ops = &rings[0];
    ops.rotate(&admin()).await.unwrap();
    ops.rotate(&admin()).await.unwrap();
    fleet.clock.advance(Duration::from_secs(20));
    ops.disable(1, &admin()).await.unwrap();
    let allowed = ops.destroy_allowed_at(1).unwrap();
    ops.schedule_destroy(1, allowed, &admin()).await.unwrap();
    let evidence = Arc::new(Evidence::default());
    let tasks = tasks(&rings, evidence.clone());

    // Not due: the evidence is not even asked for.
    let reports = tick_all(&tasks).await;
    no_failures(&reports);
    assert!(evidence.asked.lock().unwrap().is_empty());

    // Due, but no evidence yet: it waits.
    fleet.clock.set(allowed);
    fleet.clock.advance(Duration::from_secs(10));
    let reports = tick_all(&tasks).await;
    no_failures(&reports);
    assert!(
        reports
            .iter()
            .all(|r| r.awaiting_evidence == [("tenant".to_owned(), 1)]),
        "{reports:?}"
    );
    assert_eq!(ops.version_state(1), Some(KeyState::Disabled));

    // Evidence gathered now (after the disable and the settling time).
    *evidence.ready.lock().unwrap() = Some(NoRecordsLeft {
        keyring_id: "tenant".into(),
        version: 1,
        source: "rewrap job 7".into(),
        checked_at: fleet.clock.now(),
    });
    let reports = tick_all(&tasks).await;
    no_failures(&reports);
    let destroyed: usize = reports.iter().map(|r| r.destroyed.len()).sum();
    assert_eq!(destroyed, 1, "{reports:?}");
    let destroys = fleet
        .audit
        .events()
        .into_iter()
        .filter(|e| {
            matches!(
                &e.kind,
                AuditKind::StateChanged {
                    to: KeyState::Destroyed,
                    forced: false,
                    detail: Some(source),
                    ..
                } if source == "rewrap job 7"
            )
        })
        .count();
    assert_eq!(destroys, 1);
    for r in &rings {
        r.refresh().await.unwrap();
        assert_eq!(r.version_state(1), Some(KeyState::Destroyed));
    }
    // Nothing left to do.
    let reports = tick_all(&tasks).await;
    assert!(
        reports
            .iter()
            .all(|r| r.destroyed.is_empty() && r.awaiting_evidence.is_empty())
    );
}

#[tokio::test(start_paused = true)]
async fn evidence_gathered_too_early_is_reported_with_when_destroy_is_allowed() {
    let fleet = Fleet::new();
    let rings = fleet.instances(1).await;
    let ring = &rings[0];
    ring.rotate(&admin()).await.unwrap();
    let early = fleet.clock.now();
    ring.rotate(&admin()).await.unwrap();
    ring.disable(1, &admin()).await.unwrap();
    let allowed = ring.destroy_allowed_at(1).unwrap();
    ring.schedule_destroy(1, allowed, &admin()).await.unwrap();
    fleet.clock.set(allowed);
    let evidence = Arc::new(Evidence::default());
    *evidence.ready.lock().unwrap() = Some(NoRecordsLeft {
        keyring_id: "tenant".into(),
        version: 1,
        source: "a scan from before the rotation".into(),
        checked_at: early,
    });
    let m = Maintenance::builder().evidence(evidence).build();
    m.add(ring.clone());
    let report = m.run_task(Task::Destroy).await;
    let [failure] = &report.failures[..] else {
        panic!("{report:?}");
    };
    assert_eq!((failure.task, failure.version), (Task::Destroy, Some(1)));
    assert!(
        matches!(
            failure.error,
            Error::DestroyRefused {
                version: 1,
                allowed_at: Some(_),
                ..
            }
        ),
        "{:?}",
        failure.error
    );
    assert_eq!(ring.version_state(1), Some(KeyState::Disabled));
}

#[tokio::test(start_paused = true)]
async fn enabling_the_version_cancels_its_scheduled_destroy() {
    let fleet = Fleet::new();
    let rings = fleet.instances(3).await;
    let ops = &rings[0];
    ops.rotate(&admin()).await.unwrap();
    ops.rotate(&admin()).await.unwrap();
    fleet.clock.advance(Duration::from_secs(20));
    ops.disable(1, &admin()).await.unwrap();
    let allowed = ops.destroy_allowed_at(1).unwrap();
    ops.schedule_destroy(1, allowed, &admin()).await.unwrap();
    // An operator cancels on another replica.
    rings[2].refresh().await.unwrap();
    rings[2].enable(1, &admin()).await.unwrap();
    fleet.clock.set(allowed);
    fleet.clock.advance(Duration::from_secs(10));
    let evidence = Arc::new(Evidence::default());
    *evidence.ready.lock().unwrap() = Some(NoRecordsLeft {
        keyring_id: "tenant".into(),
        version: 1,
        source: "rewrap job 8".into(),
        checked_at: fleet.clock.now(),
    });
    let reports = tick_all(&tasks(&rings, evidence.clone())).await;
    no_failures(&reports);
    assert!(reports.iter().all(|r| r.destroyed.is_empty()));
    assert!(evidence.asked.lock().unwrap().is_empty());
    assert_eq!(ops.version_state(1), Some(KeyState::Retired));
}

#[tokio::test(start_paused = true)]
async fn a_transient_seal_is_lifted_but_an_operators_seal_is_not() {
    let fleet = Fleet::new();
    let rings = fleet.instances(1).await;
    let ring = &rings[0];
    ring.rotate(&admin()).await.unwrap();
    let ctx = EncryptionContext::new().with("row", "1");
    let ct = ring.encrypt(&ctx, b"value").await.unwrap();
    ring.clear_cache();
    fleet.wrapper.fail_with(Some(WrapErrorKind::Unavailable));
    assert!(matches!(
        ring.decrypt(&ctx, &ct).await,
        Err(Error::Sealed { .. })
    ));
    let m = Maintenance::builder().build();
    m.add(ring.clone());

    // Still failing: the probe keeps the seal.
    fleet.clock.advance(Duration::from_secs(1));
    let report = m.run_task(Task::Unseal).await;
    assert_eq!(report.still_sealed, ["tenant"]);
    assert!(ring.sealed().is_some());

    // The KMS is back: the next probe (its backoff doubled to 2 s) lifts
    // the seal without the host calling unseal.
    fleet.wrapper.fail_with(None);
    fleet.clock.advance(Duration::from_secs(2));
    let report = m.run_task(Task::Unseal).await;
    assert_eq!(report.unsealed, ["tenant"], "{report:?}");
    assert!(ring.sealed().is_none());
    assert_eq!(fleet.count("kms.unsealed"), 1);
    assert_eq!(ring.decrypt(&ctx, &ct).await.unwrap(), b"value");

    // An operator's seal holds.
    ring.seal("incident 42", &admin());
    fleet.clock.advance(Duration::from_secs(120));
    let report = m.tick().await;
    assert!(report.unsealed.is_empty() && report.still_sealed.is_empty());
    assert!(matches!(
        ring.decrypt(&ctx, &ct).await,
        Err(Error::SealedByOperator { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_sweep_drops_expired_keys_of_an_idle_keyring() {
    let fleet = Fleet::new();
    let ring = Arc::new(
        fleet
            .builder()
            .cache_ttl(Duration::from_secs(10))
            .create()
            .await
            .unwrap(),
    );
    ring.rotate(&admin()).await.unwrap();
    assert_eq!(ring.metadata().cached_versions, [1]);
    let m = Maintenance::builder().build();
    m.add(ring.clone());
    assert_eq!(m.run_task(Task::Sweep).await.evicted, 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(m.run_task(Task::Sweep).await.evicted, 1);
    assert!(ring.metadata().cached_versions.is_empty());
}

/// `run` runs every task at once and then on its interval, on tokio's
/// clock, until its handle stops it.
#[tokio::test(start_paused = true)]
async fn run_follows_the_intervals_until_stopped() {
    let fleet = Fleet::new();
    let rings = fleet.instances(1).await;
    let m = Arc::new(
        Maintenance::builder()
            .interval(Task::Rotation, Duration::from_secs(3600))
            .interval(Task::Sweep, Duration::from_secs(600))
            .build(),
    );
    m.add(rings[0].clone());
    let passes = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let (m, passes) = (m.clone(), passes.clone());
        async move {
            m.run_with(|task, report| {
                assert!(report.failures.is_empty(), "{report:?}");
                passes.lock().unwrap().push(task);
            })
            .await;
        }
    });
    // Off the passes' own instants, so nothing ties with the stop.
    tokio::time::sleep(Duration::from_secs(2 * 3600 + 1800 + 30)).await;
    m.handle().stop();
    task.await.unwrap();
    let passes = passes.lock().unwrap().clone();
    let count = |t| passes.iter().filter(|p| **p == t).count();
    assert_eq!(count(Task::Rotation), 3, "at 0 h, 1 h, 2 h");
    assert_eq!(count(Task::Sweep), 16, "every 10 minutes for 2.5 h");
    assert_eq!(count(Task::Destroy), 151, "every minute");
    assert_eq!(
        rings[0].active_version(),
        None,
        "no policy stored: no rotation"
    );

    // A stopped task's `run` returns at once.
    m.run().await;
}

/// A seal by a permanent failure (the tenant revoked the grant) is probed
/// every few minutes, so restoring the grant heals it without a restart;
/// with the probe turned off it waits for a manual unseal.
#[tokio::test(start_paused = true)]
async fn a_permanent_seal_is_probed_slowly_and_heals_once_access_is_back() {
    for probe in [true, false] {
        let fleet = Fleet::new();
        let rings = fleet.instances(1).await;
        let ring = &rings[0];
        ring.rotate(&admin()).await.unwrap();
        let ctx = EncryptionContext::new().with("row", "1");
        let ct = ring.encrypt(&ctx, b"value").await.unwrap();
        ring.clear_cache();
        fleet.wrapper.fail_with(Some(WrapErrorKind::AccessDenied));
        assert!(matches!(
            ring.decrypt(&ctx, &ct).await,
            Err(Error::Sealed {
                kind: WrapErrorKind::AccessDenied,
                ..
            })
        ));
        let m = Maintenance::builder()
            .probe_permanent_seals(probe.then_some(Duration::from_secs(300)))
            .build();
        m.add(ring.clone());
        let unwraps = fleet.wrapper.unwraps();
        assert_eq!(m.run_task(Task::Unseal).await.still_sealed, ["tenant"]);
        // Access restored; no probe before the interval.
        fleet.wrapper.fail_with(None);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(m.run_task(Task::Unseal).await.still_sealed, ["tenant"]);
        assert_eq!(fleet.wrapper.unwraps(), unwraps, "no probe yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        let report = m.run_task(Task::Unseal).await;
        if probe {
            assert_eq!(report.unsealed, ["tenant"], "{report:?}");
            assert_eq!(ring.decrypt(&ctx, &ct).await.unwrap(), b"value");
        } else {
            assert_eq!(report.still_sealed, ["tenant"], "{report:?}");
            assert!(ring.sealed().is_some());
        }
    }
}
