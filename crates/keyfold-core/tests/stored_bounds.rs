//! The fleet's destroy bounds stored with the keyring (docs/THREAT_MODEL.md,
//! "Many instances, one store: the bounds", "One set of bounds per
//! keyring"): an instance records its max staleness `S`, write window `W`
//! and destroy grace `G` as floors when it creates or changes the keyring,
//! never lowering them, and every destroy check uses the larger of its own
//! value and the stored floor. So an instance (or the CLI) configured with
//! smaller values cannot destroy a version before the most cautious
//! instance's bounds allow. A manual clock, two instances over one store.

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::keyring::maintenance::{Maintenance, Task};
use keyfold_core::keyring::{
    BoundFloors, DestroyAuthorization, DestroyRefusal, KeyState, Keyring, KeyringBuilder,
    NoRecordsLeft,
};
use keyfold_core::store::{FileStore, KeyringStore, MemoryStore, Revision, from_bytes, to_bytes};
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{Actor, Error, LocalKek, SecretKey};

const T0: u64 = 1_800_000_000;

/// The cautious instance A's bounds.
const A_STALENESS: Duration = Duration::from_secs(5);
const A_WINDOW: Duration = Duration::from_secs(5);
const A_GRACE: Duration = Duration::from_secs(30);

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn at(secs: u64) -> Timestamp {
    Timestamp(T0 + secs)
}

fn evidence(version: u32, checked_at: Timestamp) -> DestroyAuthorization {
    DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: "tenant".into(),
        version,
        source: "scan".into(),
        checked_at,
    })
}

struct Fleet {
    store: Arc<MemoryStore>,
    kek: Arc<LocalKek>,
    clock: ManualClock,
}

impl Fleet {
    fn new() -> Self {
        Fleet {
            store: Arc::new(MemoryStore::new()),
            kek: Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap())),
            clock: ManualClock::new(Timestamp(T0)),
        }
    }

    fn builder(&self, s: Duration, w: Duration, g: Duration) -> KeyringBuilder {
        let store: Arc<dyn KeyringStore> = self.store.clone();
        Keyring::builder("tenant", self.kek.clone(), store)
            .clock(Arc::new(self.clock.clone()))
            .max_staleness(s)
            .write_window(w)
            .destroy_grace(g)
    }

    /// The cautious instance.
    fn a(&self) -> KeyringBuilder {
        self.builder(A_STALENESS, A_WINDOW, A_GRACE)
    }

    /// The careless one: no staleness, no write window, no grace.
    fn b(&self) -> KeyringBuilder {
        self.builder(Duration::ZERO, Duration::ZERO, Duration::ZERO)
    }

    /// Moves the wall and monotonic clocks forward to T0 + `secs`.
    fn advance_to(&self, secs: u64) {
        let now = self.clock.now().as_secs();
        self.clock
            .advance(Duration::from_secs((T0 + secs).saturating_sub(now)));
    }
}

/// v1 active at T0, retired at T0 + 1 when v2 becomes active (by `rotator`),
/// then disabled at T0 + 1 by `disabler`.
async fn retire_and_disable_v1(f: &Fleet, rotator: &Keyring, disabler: &Keyring) {
    rotator.rotate(&admin()).await.unwrap();
    f.advance_to(1);
    rotator.rotate(&admin()).await.unwrap();
    disabler.refresh().await.unwrap();
    disabler.disable(1, &admin()).await.unwrap();
}

/// With A's bounds v1 (retired and disabled at T0 + 1) may be destroyed on
/// evidence gathered at or after T0 + 1 + S + W + 1 = T0 + 12, once its
/// grace ends at T0 + 1 + G = T0 + 31; with B's own, on evidence from
/// T0 + 2, at once.
const A_EVIDENCE_AFTER: u64 = 12;
const A_ALLOWED_AT: u64 = 31;

fn refused(result: Result<(), Error>) -> (DestroyRefusal, Option<Timestamp>) {
    match result {
        Err(Error::DestroyRefused {
            version: 1,
            reason,
            allowed_at,
        }) => (reason, allowed_at),
        other => panic!("expected DestroyRefused for v1, got {other:?}"),
    }
}

#[tokio::test]
async fn a_careless_instance_cannot_destroy_before_the_cautious_instances_bounds() {
    let f = Fleet::new();
    let a = f.a().create().await.unwrap();
    let b = f.b().open().await.unwrap();
    retire_and_disable_v1(&f, &a, &b).await;

    // B's own rules would allow this destroy now.
    f.advance_to(3);
    assert_eq!(
        b.destroy_allowed_at(1),
        Some(at(A_ALLOWED_AT)),
        "B announces A's time"
    );
    let (reason, allowed_at) = refused(b.destroy(1, evidence(1, at(3)), &admin()).await);
    assert_eq!(
        reason,
        DestroyRefusal::EvidenceTooEarly {
            checked_at: at(3),
            needed_after: at(A_EVIDENCE_AFTER),
        }
    );
    assert_eq!(allowed_at, Some(at(A_ALLOWED_AT)));
    assert_eq!(b.version_state(1), Some(KeyState::Disabled));

    // Evidence late enough for A's settling time, but inside A's grace.
    f.advance_to(A_EVIDENCE_AFTER + 1);
    let late_enough = evidence(1, at(A_EVIDENCE_AFTER + 1));
    let (reason, allowed_at) = refused(b.destroy(1, late_enough.clone(), &admin()).await);
    assert_eq!(
        reason,
        DestroyRefusal::GracePeriod {
            disabled_at: at(1),
            until: at(A_ALLOWED_AT),
        }
    );
    assert_eq!(allowed_at, Some(at(A_ALLOWED_AT)));

    // A schedule from B before A's time is refused as well.
    let (_, allowed_at) = refused(b.schedule_destroy(1, at(5), &admin()).await);
    assert_eq!(allowed_at, Some(at(A_ALLOWED_AT)));

    // Once A's bounds have elapsed, B's destroy goes through.
    f.advance_to(A_ALLOWED_AT);
    b.destroy(1, late_enough, &admin()).await.unwrap();
    a.refresh().await.unwrap();
    assert_eq!(a.version_state(1), Some(KeyState::Destroyed));
}

/// The careless instance created the keyring; the cautious one only
/// changes it (a rotation): that save records A's bounds, and B's destroy
/// is held to them.
#[tokio::test]
async fn a_cautious_instances_save_raises_the_bounds_of_a_keyring_it_did_not_create() {
    let f = Fleet::new();
    let b = f.b().create().await.unwrap();
    let a = f.a().open().await.unwrap();
    retire_and_disable_v1(&f, &a, &b).await;

    f.advance_to(3);
    let (_, allowed_at) = refused(b.destroy(1, evidence(1, at(3)), &admin()).await);
    assert_eq!(allowed_at, Some(at(A_ALLOWED_AT)));
    f.advance_to(A_ALLOWED_AT);
    b.destroy(1, evidence(1, at(A_EVIDENCE_AFTER)), &admin())
        .await
        .unwrap();
}

/// The maintenance path: a destroy B scheduled for its own time is carried
/// out no earlier than A's (`schedule_destroy` refuses an earlier time).
#[tokio::test]
async fn a_careless_instance_cannot_schedule_a_destroy_before_the_cautious_instances_bounds() {
    let f = Fleet::new();
    let a = f.a().create().await.unwrap();
    let b = f.b().open().await.unwrap();
    retire_and_disable_v1(&f, &a, &b).await;
    for early in [2, 12, A_ALLOWED_AT - 1] {
        let (reason, allowed_at) = refused(b.schedule_destroy(1, at(early), &admin()).await);
        assert!(
            matches!(reason, DestroyRefusal::GracePeriod { .. }),
            "{reason:?}"
        );
        assert_eq!(allowed_at, Some(at(A_ALLOWED_AT)));
    }
    b.schedule_destroy(1, at(A_ALLOWED_AT), &admin())
        .await
        .unwrap();
}

fn floors(s: u64, w: u64, g: u64) -> BoundFloors {
    BoundFloors {
        max_staleness_secs: s,
        write_window_secs: w,
        destroy_grace_secs: g,
    }
}

async fn stored_floors(store: &MemoryStore) -> Option<BoundFloors> {
    store.load("tenant").await.unwrap().unwrap().1.bound_floors
}

/// Creating records the creator's bounds; a change by an instance with
/// smaller values leaves them; an instance larger in one bound raises that
/// one only. Fractions of a second round up.
#[tokio::test]
async fn a_stored_floor_is_never_lowered_by_an_instance_with_smaller_values() {
    let f = Fleet::new();
    let a = f.a().create().await.unwrap();
    assert_eq!(stored_floors(&f.store).await, Some(floors(5, 5, 30)));
    assert_eq!(a.bound_floors(), Some(floors(5, 5, 30)));

    let b = f.b().open().await.unwrap();
    b.rotate(&admin()).await.unwrap();
    b.set_rotation_policy(None, &admin()).await.unwrap();
    assert!(!b.record_bound_floors().await.unwrap(), "nothing to raise");
    assert_eq!(stored_floors(&f.store).await, Some(floors(5, 5, 30)));

    // A larger write window (7.5 s, rounded up to 8), smaller staleness and
    // grace: only the window rises.
    let c = f
        .builder(
            Duration::from_secs(1),
            Duration::from_millis(7_500),
            Duration::from_secs(2),
        )
        .open()
        .await
        .unwrap();
    c.rotate(&admin()).await.unwrap();
    assert_eq!(stored_floors(&f.store).await, Some(floors(5, 8, 30)));
    // The instances' own settings are untouched.
    assert_eq!(b.write_window(), Duration::ZERO);
    assert_eq!(c.max_staleness(), Duration::from_secs(1));
}

/// The floors protect the destroy decision only: an instance's views stay
/// as fresh as its own max staleness asks, not the fleet's floor (B, with
/// no staleness, sees A's rotation at its next encrypt without any time
/// passing).
#[tokio::test]
async fn an_instances_own_staleness_stays_its_own() {
    let f = Fleet::new();
    let a = f.a().create().await.unwrap();
    a.rotate(&admin()).await.unwrap();
    let b = f.b().open().await.unwrap();
    assert_eq!(b.active_version(), Some(1));
    a.rotate(&admin()).await.unwrap();
    let ctx = keyfold_core::EncryptionContext::new().with("row", "1");
    b.encrypt(&ctx, b"x").await.unwrap();
    assert_eq!(b.active_version(), Some(2));
    assert_eq!(b.max_staleness(), Duration::ZERO);
    assert_eq!(a.max_staleness(), A_STALENESS);
}

/// A replica that never changes the keyring records its bounds with
/// `record_bound_floors` (once: a second call finds them covered).
#[tokio::test]
async fn a_replica_that_only_reads_records_its_floors_on_request() {
    let f = Fleet::new();
    let b = f.b().create().await.unwrap();
    assert_eq!(stored_floors(&f.store).await, Some(floors(0, 0, 0)));
    let a = f.a().open().await.unwrap();
    assert!(a.record_bound_floors().await.unwrap());
    assert!(!a.record_bound_floors().await.unwrap());
    assert_eq!(stored_floors(&f.store).await, Some(floors(5, 5, 30)));
    b.refresh().await.unwrap();
    assert_eq!(b.bound_floors(), Some(floors(5, 5, 30)));
}

/// A replica that never changes the keyring but runs the maintenance task
/// has its floors recorded by the task's destroy pass (a write only while
/// the stored floors do not cover its settings).
#[tokio::test]
async fn the_maintenance_task_records_a_replicas_floors() {
    let f = Fleet::new();
    let _b = f.b().create().await.unwrap();
    let a = Arc::new(f.a().open().await.unwrap());
    let m = Maintenance::builder().build();
    m.add(a.clone());
    let report = m.run_task(Task::Destroy).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(stored_floors(&f.store).await, Some(floors(5, 5, 30)));
    let (revision, _) = f.store.load("tenant").await.unwrap().unwrap();
    m.run_task(Task::Destroy).await;
    let (again, _) = f.store.load("tenant").await.unwrap().unwrap();
    assert_eq!(again, revision, "covered floors: no second write");
}

/// A keyring stored before floors were stored (no `bound_floors` field)
/// loads; the next save records the floors, and they round-trip.
#[tokio::test]
async fn a_keyring_stored_without_floors_loads_and_gets_them_on_the_next_save() {
    let before = br#"{"revision": 3, "keyring": {"schema": 2, "keyring_id": "tenant",
        "created_at": 1796282399, "next_version": 1, "versions": []}}"#;
    let (revision, old) = from_bytes("tenant", before).unwrap();
    assert_eq!(revision, Revision(3));
    assert_eq!(old.bound_floors, None);
    let written = String::from_utf8(to_bytes(revision, &old).unwrap()).unwrap();
    assert!(!written.contains("bound_floors"), "{written}");

    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("tenant.json"), before).unwrap();
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let open = || async {
        let store = Arc::new(FileStore::new(dir.path()).unwrap());
        Keyring::builder("tenant", kek.clone(), store)
            .max_staleness(A_STALENESS)
            .write_window(A_WINDOW)
            .destroy_grace(A_GRACE)
            .open()
            .await
            .unwrap()
    };
    let ring = open().await;
    assert_eq!(ring.bound_floors(), None);
    ring.rotate(&admin()).await.unwrap();
    let file = std::fs::read_to_string(dir.path().join("tenant.json")).unwrap();
    assert!(file.contains("bound_floors"), "{file}");
    assert_eq!(open().await.bound_floors(), Some(floors(5, 5, 30)));

    let mut with = old.clone();
    with.bound_floors = Some(floors(1, 2, 3));
    let bytes = to_bytes(Revision(4), &with).unwrap();
    assert_eq!(from_bytes("tenant", &bytes).unwrap(), (Revision(4), with));
}

/// u64::MAX seconds (and `Duration::MAX`, with its fraction) as settings:
/// stored, loaded and applied without a panic or an overflow; a destroy is
/// then refused until the end of time.
#[tokio::test]
async fn absurd_bounds_do_not_panic() {
    let f = Fleet::new();
    let huge = Duration::from_secs(u64::MAX);
    let a = f.builder(huge, Duration::MAX, huge).create().await.unwrap();
    assert_eq!(
        stored_floors(&f.store).await,
        Some(floors(u64::MAX, u64::MAX, u64::MAX))
    );
    let b = f.b().open().await.unwrap();
    retire_and_disable_v1(&f, &a, &b).await;
    let end = Timestamp(u64::MAX);
    assert_eq!(b.destroy_allowed_at(1), Some(end));
    let (reason, allowed_at) = refused(b.destroy(1, evidence(1, at(2)), &admin()).await);
    assert!(
        matches!(reason, DestroyRefusal::EvidenceTooEarly { needed_after, .. } if needed_after == end),
        "{reason:?}"
    );
    assert_eq!(allowed_at, Some(end));
    let (_, allowed_at) = refused(b.schedule_destroy(1, at(2), &admin()).await);
    assert_eq!(allowed_at, Some(end));
    // Through the stored form and back.
    let (revision, stored) = f.store.load("tenant").await.unwrap().unwrap();
    let bytes = to_bytes(revision, &stored).unwrap();
    assert_eq!(from_bytes("tenant", &bytes).unwrap(), (revision, stored));
    // A forced destroy (an incident) still works.
    b.destroy(
        1,
        DestroyAuthorization::Forced {
            reason: "incident".into(),
        },
        &admin(),
    )
    .await
    .unwrap();
}
