//! The operator's seal on a fleet (docs/LIFECYCLE.md "Sealing",
//! docs/THREAT_MODEL.md "Many instances, one store: the bounds"): a seal
//! made on one instance is stored with the keyring, so every instance over
//! the store refuses to encrypt and decrypt once its view holds it (at its
//! next use with change notifications, within max staleness without), and
//! an unseal made on another instance lets the first one work again.
//!
//! Real-clock tests poll with a generous deadline: they check that the
//! bound is reached, never how fast; the manual-clock test checks the
//! bound itself.

use keyfold_core::testkit::Unwatched;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyfold_core::audit::{Actor, RecordingSink};
use keyfold_core::keyring::maintenance::{Maintenance, Task};
use keyfold_core::keyring::{Keyring, KeyringBuilder, OperatorSeal, StoredKeyring};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::{
    FileStore, KeyringStore, MemoryStore, Revision, StoreError, from_bytes, to_bytes,
};
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::time::{ManualClock, SystemClock, Timestamp};
use keyfold_core::{EncryptionContext, Error, LocalKek, SecretKey, WrapErrorKind};

const STALENESS: Duration = Duration::from_millis(300);
/// Far longer than every test: a cached key never expires by itself here,
/// so only the seal can stop it being used.
const TTL: Duration = Duration::from_secs(3600);
/// Far beyond the bound under test: a poll that has not seen the seal by
/// then has found a bug, not a slow machine.
const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("row", "1")
}

/// Which store the two instances share.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A `MemoryStore`: notifies every instance of a save at once.
    Memory,
    /// The same without notifications.
    Unwatched,
    /// A `FileStore` per instance on one directory (as two processes),
    /// without notifications: the max-staleness bound alone.
    FileUnwatched,
    /// The same, with the file store's poller (its notifications).
    File,
}

const KINDS: [Kind; 4] = [
    Kind::Memory,
    Kind::Unwatched,
    Kind::FileUnwatched,
    Kind::File,
];

struct Fleet {
    kind: Kind,
    memory: Arc<MemoryStore>,
    dir: tempfile::TempDir,
    kek: Arc<LocalKek>,
    audit: Arc<RecordingSink>,
}

impl Fleet {
    fn new(kind: Kind) -> Self {
        Fleet {
            kind,
            memory: Arc::new(MemoryStore::new()),
            dir: tempfile::TempDir::new().unwrap(),
            kek: Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap())),
            audit: Arc::new(RecordingSink::default()),
        }
    }

    fn store(&self) -> Arc<dyn KeyringStore> {
        match self.kind {
            Kind::Memory => self.memory.clone(),
            Kind::Unwatched => Arc::new(Unwatched(self.memory.clone())),
            Kind::FileUnwatched => Arc::new(Unwatched(Arc::new(
                FileStore::new(self.dir.path()).unwrap(),
            ))),
            Kind::File => Arc::new(FileStore::new(self.dir.path()).unwrap()),
        }
    }

    /// An instance: real clock, short max staleness, no KMS retries.
    fn builder(&self) -> KeyringBuilder {
        Keyring::builder("tenant", self.kek.clone(), self.store())
            .clock(Arc::new(SystemClock))
            .audit(self.audit.clone())
            .retry_policy(RetryPolicy::none())
            .max_staleness(STALENESS)
            .cache_ttl(TTL)
    }

    /// Instance A (which created the keyring, rotated and encrypted a
    /// record) and instance B (which decrypted it: its key is cached).
    async fn two(&self) -> (Arc<Keyring>, Arc<Keyring>, Vec<u8>) {
        let a = Arc::new(self.builder().create().await.unwrap());
        a.rotate(&admin()).await.unwrap();
        let record = a.encrypt(&ctx(), b"row one").await.unwrap();
        let b = Arc::new(self.builder().open().await.unwrap());
        assert_eq!(b.decrypt(&ctx(), &record).await.unwrap(), b"row one");
        (a, b, record)
    }
}

/// Polls `check` until it is true, failing after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn sealed_by_operator<T>(r: &Result<T, Error>, why: &str) -> bool {
    matches!(r, Err(Error::SealedByOperator { reason, .. }) if reason == why)
}

/// The defect: a seal on A left B (another replica, the CLI) serving. Now
/// B refuses within the bound, and an unseal on B lets A work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_on_one_instance_stops_the_other_and_an_unseal_there_frees_both() {
    for kind in KINDS {
        let fleet = Fleet::new(kind);
        let (a, b, record) = fleet.two().await;
        let stored = a.seal("incident 7", &admin()).await.unwrap();
        assert_eq!(
            (stored.reason.as_str(), stored.actor.as_str()),
            ("incident 7", "admin@example.com")
        );

        eventually(&format!("{kind:?}: B refuses to decrypt"), || async {
            sealed_by_operator(&b.decrypt(&ctx(), &record).await, "incident 7")
        })
        .await;
        assert!(
            sealed_by_operator(&b.encrypt(&ctx(), b"x").await, "incident 7"),
            "{kind:?}"
        );
        assert!(
            sealed_by_operator(&a.decrypt(&ctx(), &record).await, "incident 7"),
            "{kind:?}"
        );
        assert_eq!(
            b.operator_seal().map(|(_, reason)| reason).as_deref(),
            Some("incident 7"),
            "{kind:?}"
        );

        b.unseal_as(&admin()).await.unwrap();
        assert_eq!(b.decrypt(&ctx(), &record).await.unwrap(), b"row one");
        eventually(&format!("{kind:?}: A decrypts again"), || async {
            a.decrypt(&ctx(), &record).await.is_ok()
        })
        .await;
        assert!(a.operator_seal().is_none(), "{kind:?}");
        assert!(a.encrypt(&ctx(), b"x").await.is_ok(), "{kind:?}");

        let names = fleet.audit.names();
        assert!(names.contains(&"kms.sealed.manual"), "{kind:?}: {names:?}");
        assert!(names.contains(&"kms.unsealed"), "{kind:?}: {names:?}");
    }
}

/// The bound on a manual clock, without notifications: B's cached key
/// (TTL far away) is refused as soon as B's view is older than max
/// staleness; the seal does not wait for the cache TTL.
#[tokio::test(start_paused = true)]
async fn without_notifications_a_cached_key_is_refused_once_the_view_is_older_than_max_staleness() {
    let shared = Arc::new(MemoryStore::new());
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let clock = ManualClock::new(Timestamp(1_800_000_000));
    let staleness = Duration::from_secs(30);
    let builder = |store: Arc<dyn KeyringStore>| {
        Keyring::builder("tenant", kek.clone(), store)
            .clock(Arc::new(clock.clone()))
            .max_staleness(staleness)
            .cache_ttl(TTL)
    };
    let a = builder(shared.clone()).create().await.unwrap();
    a.rotate(&admin()).await.unwrap();
    let record = a.encrypt(&ctx(), b"row one").await.unwrap();
    let b = builder(Arc::new(Unwatched(shared))).open().await.unwrap();
    assert!(b.decrypt(&ctx(), &record).await.is_ok());

    a.seal("incident 8", &admin()).await.unwrap();
    clock.advance(staleness + Duration::from_secs(1));
    assert!(sealed_by_operator(
        &b.decrypt(&ctx(), &record).await,
        "incident 8"
    ));
}

/// A keyring stored before seals were stored (no `operator_seal` field)
/// loads, unsealed; a sealed one round-trips; an unsealed one is written
/// without the field, so it reads as before.
#[tokio::test]
async fn stored_keyrings_without_the_field_load_and_with_it_round_trip() {
    let before = br#"{"revision": 3, "keyring": {"schema": 2, "keyring_id": "tenant",
        "created_at": 1796282399, "next_version": 1, "versions": [],
        "rotation_policy": {"enabled": true, "period_days": 90}}}"#;
    let (revision, old) = from_bytes("tenant", before).unwrap();
    assert_eq!(revision, Revision(3));
    assert_eq!(old.operator_seal, None);
    let written = String::from_utf8(to_bytes(revision, &old).unwrap()).unwrap();
    assert!(!written.contains("operator_seal"), "{written}");

    let mut sealed = old.clone();
    sealed.operator_seal = Some(OperatorSeal {
        since: Timestamp(1_796_282_400),
        reason: "INC-7: token leaked".into(),
        actor: "ops@example.com".into(),
    });
    let bytes = to_bytes(Revision(4), &sealed).unwrap();
    assert_eq!(
        from_bytes("tenant", &bytes).unwrap(),
        (Revision(4), sealed.clone())
    );

    // Through a FileStore and a keyring: the old file opens unsealed; a
    // seal is written into it and read back by a new instance; the unseal
    // removes the field again.
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("tenant.json"), before).unwrap();
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let open = || async {
        let store = Arc::new(FileStore::new(dir.path()).unwrap());
        Keyring::builder("tenant", kek.clone(), store)
            .open()
            .await
            .unwrap()
    };
    let ring = open().await;
    assert!(ring.operator_seal_info().is_none());
    ring.seal("INC-7: token leaked", &admin()).await.unwrap();
    let file = std::fs::read_to_string(dir.path().join("tenant.json")).unwrap();
    assert!(file.contains("INC-7: token leaked"), "{file}");
    let other = open().await;
    let seal = other.operator_seal_info().unwrap();
    assert_eq!(seal.actor, "admin@example.com");
    assert_eq!(other.metadata().operator_seal, Some(seal));
    other.unseal_as(&admin()).await.unwrap();
    let file = std::fs::read_to_string(dir.path().join("tenant.json")).unwrap();
    assert!(!file.contains("operator_seal"), "{file}");
}

/// A store that lets another writer's change land just before the next
/// save it is armed for: that save then loses the compare-and-swap.
#[derive(Debug)]
struct Interloper {
    inner: Arc<MemoryStore>,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl KeyringStore for Interloper {
    async fn load(&self, id: &str) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        self.inner.load(id).await
    }
    async fn save(
        &self,
        id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let (revision, mut theirs) = self.inner.load(id).await?.unwrap();
            theirs.rotation_policy = Some(keyfold_core::RotationPolicy::new(true, 30).unwrap());
            self.inner.save(id, Some(revision), &theirs).await?;
        }
        self.inner.save(id, expected, keyring).await
    }
}

/// The seal racing with other changes: a seal that loses the
/// compare-and-swap is retried on a fresh view (the other change kept);
/// a rotation prepared on a view from before the seal conflicts instead
/// of writing the seal away, and once it sees the seal it is refused.
#[tokio::test]
async fn a_seal_racing_a_rotation_wins_on_a_fresh_view_and_is_never_written_away() {
    let shared = Arc::new(MemoryStore::new());
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let interloper = Arc::new(Interloper {
        inner: shared.clone(),
        armed: false.into(),
    });
    let a = Keyring::builder("tenant", kek.clone(), interloper.clone())
        .create()
        .await
        .unwrap();
    a.rotate(&admin()).await.unwrap();
    // B reads the keyring now and, without notifications and with a long
    // max staleness, does not look again before its rotation.
    let b = Keyring::builder("tenant", kek, Arc::new(Unwatched(shared.clone())))
        .max_staleness(Duration::from_secs(3600))
        .open()
        .await
        .unwrap();

    interloper
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    a.seal("incident 9", &admin()).await.unwrap();
    let (_, stored) = shared.load("tenant").await.unwrap().unwrap();
    assert_eq!(stored.operator_seal.unwrap().reason, "incident 9");
    assert!(
        stored.rotation_policy.is_some(),
        "the change that won first is kept"
    );

    assert!(matches!(
        b.rotate(&admin()).await,
        Err(Error::Conflict { .. })
    ));
    let (_, stored) = shared.load("tenant").await.unwrap().unwrap();
    assert!(stored.operator_seal.is_some(), "the seal was written away");
    assert_eq!(stored.active_version(), Some(1));
    // The conflict reloaded B's view: the seal refuses the retry.
    assert!(sealed_by_operator(&b.rotate(&admin()).await, "incident 9"));
}

/// Neither `unseal()` nor the maintenance task's probes lift a stored
/// operator seal, on any instance, even while they lift a KMS seal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_unseal_never_lift_a_stored_operator_seal() {
    let store = Arc::new(MemoryStore::new());
    let kms = CountingWrapper::shared(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let builder =
        || Keyring::builder("tenant", kms.clone(), store.clone()).retry_policy(RetryPolicy::none());
    let a = builder().create().await.unwrap();
    a.rotate(&admin()).await.unwrap();
    let record = a.encrypt(&ctx(), b"row one").await.unwrap();
    let b = Arc::new(builder().open().await.unwrap());

    // B is sealed by a permanent KMS failure too.
    kms.fail_with(Some(WrapErrorKind::AccessDenied));
    assert!(matches!(
        b.decrypt(&ctx(), &record).await,
        Err(Error::Sealed { .. })
    ));
    a.seal("incident 10", &admin()).await.unwrap();
    kms.fail_with(None);

    assert!(b.unseal().await.is_ok(), "the KMS seal lifts");
    assert!(b.sealed().is_none());
    assert!(sealed_by_operator(
        &b.decrypt(&ctx(), &record).await,
        "incident 10"
    ));
    assert!(
        b.metadata().cached_versions.is_empty(),
        "no key under a seal"
    );

    let m = Maintenance::builder()
        .probe_permanent_seals(Some(Duration::ZERO))
        .build();
    m.add(b.clone());
    for _ in 0..3 {
        m.run_task(Task::Unseal).await;
    }
    m.tick().await;
    assert!(sealed_by_operator(
        &b.decrypt(&ctx(), &record).await,
        "incident 10"
    ));
    let (_, stored) = store.load("tenant").await.unwrap().unwrap();
    assert!(stored.operator_seal.is_some());
    assert_eq!(b.operator_seal().unwrap().1, "incident 10");
}

/// A seal that was not awaited holds in its own process only (as before
/// seals were stored); the unseal there lifts it.
#[tokio::test]
async fn a_seal_not_awaited_holds_in_its_process_until_unsealed() {
    let store = Arc::new(MemoryStore::new());
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let a = Keyring::builder("tenant", kek.clone(), store.clone())
        .create()
        .await
        .unwrap();
    a.rotate(&admin()).await.unwrap();
    let b = Keyring::builder("tenant", kek, store.clone())
        .open()
        .await
        .unwrap();
    let _ = a.seal("local only", &admin());
    assert!(sealed_by_operator(
        &a.encrypt(&ctx(), b"x").await,
        "local only"
    ));
    assert!(b.encrypt(&ctx(), b"x").await.is_ok());
    assert!(
        store
            .load("tenant")
            .await
            .unwrap()
            .unwrap()
            .1
            .operator_seal
            .is_none()
    );
    a.unseal_as(&admin()).await.unwrap();
    assert!(a.encrypt(&ctx(), b"x").await.is_ok());
}

/// The `operator` gauge of `keyfold_sealed_keyrings` counts each keyring
/// handle that sees the seal, and no longer once it is dropped or unsealed
/// (a host that opens a keyring per request must not make it drift).
#[test]
fn the_sealed_gauge_follows_the_stored_seal_and_dropped_handles() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The debugging recorder hands out what changed since its last
    // snapshot: add it up.
    let total = std::cell::Cell::new(0.0);
    let gauge = || {
        let delta = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(k, _, _, _)| {
                k.key().name() == keyfold_core::keyring::SEALED_KEYRINGS
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "cause" && l.value() == "operator")
            })
            .map_or(0.0, |(_, _, _, v)| match v {
                DebugValue::Gauge(g) => g.into_inner(),
                _ => f64::NAN,
            });
        total.set(total.get() + delta);
        total.get()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
            let open = || Keyring::builder("tenant", kek.clone(), store.clone()).open();
            let a = Keyring::builder("tenant", kek.clone(), store.clone())
                .create()
                .await
                .unwrap();
            a.seal("incident 11", &admin()).await.unwrap();
            assert_eq!(gauge(), 1.0);
            for _ in 0..3 {
                let b = open().await.unwrap();
                assert!(b.operator_seal_info().is_some());
            }
            assert_eq!(gauge(), 1.0, "dropped handles no longer count");
            let b = open().await.unwrap();
            assert_eq!(gauge(), 2.0);
            b.unseal_as(&admin()).await.unwrap();
            assert_eq!(gauge(), 1.0);
            a.refresh().await.unwrap();
            assert_eq!(gauge(), 0.0);
        });
    });
}

/// The maintenance task on a sealed keyring whose rotation policy is due:
/// no rotation and no failure while sealed; the first pass after the
/// unseal rotates.
#[tokio::test(start_paused = true)]
async fn a_due_rotation_waits_for_the_unseal_without_a_failure() {
    let store = Arc::new(MemoryStore::new());
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let ring = Arc::new(
        Keyring::builder("tenant", kek, store)
            .create()
            .await
            .unwrap(),
    );
    ring.set_rotation_policy(
        Some(keyfold_core::RotationPolicy::new(true, 90).unwrap()),
        &admin(),
    )
    .await
    .unwrap();
    ring.seal("incident 12", &admin()).await.unwrap();
    let m = Maintenance::builder().build();
    m.add(ring.clone());
    let report = m.run_task(Task::Rotation).await;
    assert!(
        report.rotated.is_empty() && report.failures.is_empty(),
        "{report:?}"
    );
    assert_eq!(ring.active_version(), None);
    ring.unseal_as(&admin()).await.unwrap();
    let report = m.run_task(Task::Rotation).await;
    assert_eq!(report.rotated, [("tenant".to_owned(), 1)], "{report:?}");
}
