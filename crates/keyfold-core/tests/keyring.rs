//! The keyring: lifecycle, audit sequence, stores, destroy, sealing, cache,
//! single-flight, concurrent rotators, KMS re-wrap, probe and config upsert.

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::{Actor, AuditKind, RecordingSink};
use keyfold_core::config::{LocalConfig, ProviderConfig};
use keyfold_core::keyring::{
    DestroyAuthorization, KeyState, Keyring, LeaseIssuer, NoRecordsLeft, Transition,
};
use keyfold_core::policy::RotationPolicy;
use keyfold_core::probe::{self, ConfigSlot, LocalFactory, ProbeStep};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::{FileStore, KeyringStore, MemoryStore, Revision};
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{EncryptionContext, Error, KeyWrapper, LocalKek, SecretKey, WrapErrorKind};

type Counting = CountingWrapper<LocalKek>;

fn kek(id: &str) -> LocalKek {
    LocalKek::from_bytes(id, SecretKey::generate().unwrap())
}

struct Fixture {
    ring: Keyring,
    wrapper: Arc<Counting>,
    store: Arc<MemoryStore>,
    sink: Arc<RecordingSink>,
    clock: ManualClock,
}

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn ctx(row: u32) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "acme")
        .with("row", row.to_string())
}

async fn fixture() -> Fixture {
    let wrapper = CountingWrapper::shared(kek("kek-a"));
    let store = Arc::new(MemoryStore::new());
    let sink = Arc::new(RecordingSink::default());
    let clock = ManualClock::new(Timestamp(1_700_000_000));
    let ring = Keyring::builder("acme", wrapper.clone(), store.clone())
        .audit(sink.clone())
        .clock(Arc::new(clock.clone()))
        .retry_policy(RetryPolicy::none())
        // These tests destroy right after gathering evidence; the grace
        // period and the write window have their own tests.
        .destroy_grace(Duration::ZERO)
        .write_window(Duration::ZERO)
        .create()
        .await
        .unwrap();
    Fixture {
        ring,
        wrapper,
        store,
        sink,
        clock,
    }
}

fn evidence(version: u32, clock: &ManualClock) -> DestroyAuthorization {
    DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: "acme".into(),
        version,
        source: format!("rewrap-job-{version}"),
        checked_at: clock.now(),
    })
}

fn changed(version: u32, from: KeyState, to: KeyState, transition: Transition) -> AuditKind {
    AuditKind::StateChanged {
        version,
        from,
        to,
        transition,
        forced: false,
        detail: None,
    }
}

#[tokio::test]
async fn lifecycle_emits_the_exact_audit_sequence() {
    let f = fixture().await;
    let a = admin();
    let r1 = f.ring.rotate(&a).await.unwrap();
    let r2 = f.ring.rotate(&a).await.unwrap();
    assert_eq!((r1.version, r2.version), (1, 2));
    assert_eq!(r2.previous_version, Some(1));
    assert_ne!(r1.version_id, r2.version_id);
    let v3 = f.ring.create_pending(&a).await.unwrap();
    assert_eq!(v3, 3);
    assert_eq!(f.ring.active_version(), Some(2));
    f.ring.activate(3, &a).await.unwrap();
    f.ring.rollback(2, &a).await.unwrap();
    f.ring.disable(1, &a).await.unwrap();
    f.ring.enable(1, &a).await.unwrap();
    f.ring.disable(1, &a).await.unwrap();
    f.clock.advance(Duration::from_secs(60));
    f.ring.destroy(1, evidence(1, &f.clock), &a).await.unwrap();

    let events = f.sink.events();
    assert!(
        events
            .iter()
            .all(|e| e.keyring_id == "acme" && e.actor == a)
    );
    let kinds: Vec<AuditKind> = events.into_iter().map(|e| e.kind).collect();
    use KeyState::*;
    let rotate = |new_version, version_id: &str, previous_version| AuditKind::Rotate {
        new_version,
        version_id: version_id.to_owned(),
        previous_version,
        scheduled: false,
        wrap_provider: "local".into(),
        wrap_key_ref: "kek-a".into(),
        lease_id: None,
    };
    let expected = vec![
        rotate(1, &r1.version_id, None),
        rotate(2, &r2.version_id, Some(1)),
        changed(1, Active, Retired, Transition::Retire),
        AuditKind::VersionCreated {
            version: 3,
            version_id: f.ring.snapshot().1.get(3).unwrap().id.clone(),
            wrap_key_ref: "kek-a".into(),
        },
        changed(3, Pending, Active, Transition::Activate),
        changed(2, Active, Retired, Transition::Retire),
        changed(2, Retired, Active, Transition::Rollback),
        changed(3, Active, Retired, Transition::Retire),
        changed(1, Retired, Disabled, Transition::Disable),
        changed(1, Disabled, Retired, Transition::Enable),
        changed(1, Retired, Disabled, Transition::Disable),
        AuditKind::StateChanged {
            version: 1,
            from: Disabled,
            to: Destroyed,
            transition: Transition::Destroy,
            forced: false,
            detail: Some("rewrap-job-1".into()),
        },
    ];
    assert_eq!(kinds, expected);
    assert_eq!(
        f.sink.names(),
        [
            "kms.rotate",
            "kms.rotate",
            "kms.version.state_changed",
            "kms.version.created",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.version.state_changed",
        ]
    );

    let m = f.ring.metadata();
    assert_eq!(m.latest_version, Some(3));
    assert_eq!(m.active_version, Some(2));
    assert_eq!(m.min_decryption_version, Some(2));
    assert_eq!(m.version_count, 3);
    let v1 = &m.versions[0];
    assert_eq!(v1.state, Destroyed);
    assert_eq!(v1.wrap_key_ref, None);
    assert!(v1.destroyed_at.is_some() && v1.disabled_at.is_some() && v1.retired_at.is_some());
    assert_eq!(m.wrap_provider, "local");
    assert!(m.sealed.is_none());
}

#[tokio::test]
async fn illegal_transitions_are_typed_and_change_nothing() {
    let f = fixture().await;
    let a = admin();
    // Nothing exists yet.
    assert!(matches!(
        f.ring.disable(1, &a).await,
        Err(Error::UnknownVersion { version: 1 })
    ));
    f.ring.rotate(&a).await.unwrap(); // v1 active
    f.ring.rotate(&a).await.unwrap(); // v2 active, v1 retired
    let pending = f.ring.create_pending(&a).await.unwrap(); // v3 pending
    let before = f.ring.snapshot();
    let events = f.sink.events().len();

    use KeyState::*;
    let cases: Vec<(u32, Transition, KeyState)> = vec![
        (2, Transition::Disable, Active),
        (2, Transition::Destroy, Active),
        (2, Transition::Activate, Active),
        (2, Transition::Rollback, Active),
        (2, Transition::Enable, Active),
        (1, Transition::Activate, Retired),
        (1, Transition::Destroy, Retired),
        (1, Transition::Enable, Retired),
        (pending, Transition::Rollback, Pending),
        (pending, Transition::Enable, Pending),
        (pending, Transition::Destroy, Pending),
    ];
    for (version, transition, from) in cases {
        let r = match transition {
            Transition::Activate => f.ring.activate(version, &a).await,
            Transition::Rollback => f.ring.rollback(version, &a).await,
            Transition::Disable => f.ring.disable(version, &a).await,
            Transition::Enable => f.ring.enable(version, &a).await,
            Transition::Destroy => {
                f.ring
                    .destroy(
                        version,
                        DestroyAuthorization::Forced { reason: "x".into() },
                        &a,
                    )
                    .await
            }
            Transition::Retire => unreachable!(),
        };
        match r {
            Err(Error::IllegalTransition {
                version: v,
                from: s,
                transition: t,
            }) => assert_eq!((v, s, t), (version, from, transition)),
            other => panic!("{transition} of v{version}: {other:?}"),
        }
    }
    // Destroyed is terminal.
    f.ring.disable(1, &a).await.unwrap();
    f.ring
        .destroy(
            1,
            DestroyAuthorization::Forced {
                reason: "test".into(),
            },
            &a,
        )
        .await
        .unwrap();
    let after_destroy = f.ring.snapshot();
    for t in [
        Transition::Enable,
        Transition::Rollback,
        Transition::Destroy,
    ] {
        let r = match t {
            Transition::Enable => f.ring.enable(1, &a).await,
            Transition::Rollback => f.ring.rollback(1, &a).await,
            _ => {
                f.ring
                    .destroy(1, DestroyAuthorization::Forced { reason: "x".into() }, &a)
                    .await
            }
        };
        assert!(matches!(
            r,
            Err(Error::IllegalTransition {
                from: Destroyed,
                ..
            })
        ));
    }
    assert_eq!(f.ring.snapshot().0, after_destroy.0);
    assert!(before.0 < after_destroy.0);
    assert_eq!(f.sink.events().len(), events + 2);
    // The error message names the state and the transition.
    let msg = f.ring.disable(2, &a).await.unwrap_err().to_string();
    assert!(msg.contains("disable") && msg.contains("active"), "{msg}");
}

#[tokio::test]
async fn every_earlier_record_decrypts_after_many_rotations_until_disabled_or_destroyed() {
    let f = fixture().await;
    let a = admin();
    let mut records = Vec::new();
    for i in 0..40u32 {
        let r = f.ring.rotate(&a).await.unwrap();
        assert_eq!(r.version, i + 1);
        let ct = f
            .ring
            .encrypt(&ctx(i), format!("row {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            keyfold_core::format::inspect(&ct).unwrap().key_version,
            i + 1
        );
        records.push(ct);
    }
    f.ring.clear_cache();
    for (i, ct) in records.iter().enumerate() {
        let pt = f.ring.decrypt(&ctx(i as u32), ct).await.unwrap();
        assert_eq!(pt, format!("row {i}").as_bytes());
    }
    // Wrong context still fails, opaquely.
    assert!(matches!(
        f.ring.decrypt(&ctx(99), &records[0]).await,
        Err(Error::Decrypt)
    ));
    f.ring.disable(3, &a).await.unwrap();
    assert!(matches!(
        f.ring.decrypt(&ctx(2), &records[2]).await,
        Err(Error::KeyState {
            version: 3,
            state: KeyState::Disabled
        })
    ));
    f.ring.enable(3, &a).await.unwrap();
    assert!(f.ring.decrypt(&ctx(2), &records[2]).await.is_ok());
    f.ring.disable(3, &a).await.unwrap();
    // Max staleness (30 s) plus the second timestamps cannot resolve.
    f.clock.advance(Duration::from_secs(31));
    f.ring.destroy(3, evidence(3, &f.clock), &a).await.unwrap();
    let err = f.ring.decrypt(&ctx(2), &records[2]).await.unwrap_err();
    assert!(matches!(err, Error::KeyDestroyed { version: 3 }), "{err}");
    assert!(err.to_string().contains("version 3"));
    // Everything else still decrypts.
    for (i, ct) in records.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert!(f.ring.decrypt(&ctx(i as u32), ct).await.is_ok());
    }
}

#[tokio::test]
async fn destroy_checks_its_evidence_and_records_a_forced_destroy() {
    let f = fixture().await;
    let a = admin();
    f.ring.rotate(&a).await.unwrap();
    f.clock.advance(Duration::from_secs(10));
    let early = f.clock.now();
    f.clock.advance(Duration::from_secs(10));
    f.ring.rotate(&a).await.unwrap(); // v1 retired now
    f.ring.disable(1, &a).await.unwrap();
    let rev = f.ring.snapshot().0;
    let n = f.sink.events().len();
    let wrong_version = DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: "acme".into(),
        version: 2,
        source: "job".into(),
        checked_at: f.clock.now(),
    });
    assert!(matches!(
        f.ring.destroy(1, wrong_version, &a).await,
        Err(Error::DestroyRefused { version: 1, .. })
    ));
    let other_tenant = DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: "other-tenant".into(),
        version: 1,
        source: "job".into(),
        checked_at: f.clock.now(),
    });
    match f.ring.destroy(1, other_tenant, &a).await {
        Err(Error::DestroyRefused {
            version: 1, reason, ..
        }) => {
            assert!(reason.to_string().contains("other-tenant"), "{reason}");
        }
        other => panic!("evidence from another keyring must be refused: {other:?}"),
    }
    let stale = DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: "acme".into(),
        version: 1,
        source: "job".into(),
        checked_at: early,
    });
    assert!(matches!(
        f.ring.destroy(1, stale, &a).await,
        Err(Error::DestroyRefused { version: 1, .. })
    ));
    assert_eq!(f.ring.snapshot().0, rev);
    assert_eq!(f.sink.events().len(), n);
    f.ring
        .destroy(
            1,
            DestroyAuthorization::Forced {
                reason: "incident 42".into(),
            },
            &a,
        )
        .await
        .unwrap();
    let last = f.sink.events().pop().unwrap();
    assert_eq!(
        last.kind,
        AuditKind::StateChanged {
            version: 1,
            from: KeyState::Disabled,
            to: KeyState::Destroyed,
            transition: Transition::Destroy,
            forced: true,
            detail: Some("incident 42".into()),
        }
    );
    let stored = f.store.load("acme").await.unwrap().unwrap().1;
    assert!(stored.get(1).unwrap().wrapped.is_none());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_key(bytes: &[u8], key: &[u8; 32]) {
    use base64::Engine;
    assert!(!contains(bytes, key), "raw key bytes stored");
    let hex = hex::encode(key);
    assert!(!contains(bytes, hex.as_bytes()), "hex key stored");
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        // Any 30-byte window of the key, base64'd, would show a 40-char run.
        let b64 = engine.encode(&key[..30]);
        assert!(!contains(bytes, b64.as_bytes()), "base64 key stored");
    }
}

#[tokio::test]
async fn stored_form_holds_no_key_material() {
    let dir = tempdir();
    let file_store = Arc::new(FileStore::new(&dir).unwrap());
    let mem = Arc::new(MemoryStore::new());
    for store in [
        file_store.clone() as Arc<dyn KeyringStore>,
        mem.clone() as Arc<dyn KeyringStore>,
    ] {
        let ring = Keyring::builder("tenant-1", Arc::new(kek("k")), store)
            .create()
            .await
            .unwrap();
        for _ in 0..5 {
            ring.rotate(&admin()).await.unwrap();
        }
        ring.disable(2, &admin()).await.unwrap();
        let raw = match mem.raw("tenant-1") {
            Some(raw) if file_store.path_of("tenant-1").exists() => raw,
            Some(raw) => raw,
            None => std::fs::read(file_store.path_of("tenant-1")).unwrap(),
        };
        let text = String::from_utf8(raw.clone()).unwrap();
        assert!(text.contains("\"schema\": 2"), "{text}");
        for v in [1, 3, 4, 5] {
            let key = ring.master_key(v).await.unwrap();
            assert_no_key(&raw, key.secret().expose());
        }
    }
    // The file store left no temporary file behind (the lock file persists).
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["tenant-1.json", "tenant-1.json.lock"]);
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    let mut bytes = [0u8; 8];
    keyfold_core::rng::fill(&mut bytes).unwrap();
    let dir = std::env::temp_dir().join(format!("keyfold-test-{}", hex::encode(bytes)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Keyring "t" with version 1 active, in a `FileStore` at `dir`.
async fn file_keyring(dir: &std::path::Path, kek: &Arc<LocalKek>) -> (Arc<FileStore>, Keyring) {
    let store = Arc::new(FileStore::new(dir).unwrap());
    let ring = Keyring::builder("t", kek.clone(), store.clone())
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    (store, ring)
}

/// A lost keyring file is not a new keyring: `open_or_create` must not
/// start an empty one over records only the lost one can open.
#[tokio::test]
async fn a_deleted_keyring_file_is_refused_not_recreated() {
    let dir = tempdir();
    let kek = Arc::new(kek("k"));
    let (store, _ring) = file_keyring(&dir, &kek).await;
    std::fs::remove_file(store.path_of("t")).unwrap();
    let err = Keyring::builder("t", kek.clone(), store.clone())
        .open_or_create()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lock file exists"), "{err}");
    // A keyring never stored here is still simply absent, even when a
    // first save failed after making its (empty) lock file.
    assert!(store.load("other").await.unwrap().is_none());
    std::fs::write(store.lock_path_of("crashed"), b"").unwrap();
    assert!(store.load("crashed").await.unwrap().is_none());
    Keyring::builder("crashed", kek.clone(), store.clone())
        .open_or_create()
        .await
        .unwrap();
}

/// The store's files hold wrapped keys: owner-only on Unix.
#[cfg(unix)]
#[tokio::test]
async fn file_store_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir().join("fresh");
    let (store, _ring) = file_keyring(&dir, &Arc::new(kek("k"))).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&store.path_of("t")), 0o600);
    assert_eq!(mode(&store.lock_path_of("t")), 0o600);
}

#[tokio::test]
async fn a_reopened_keyring_decrypts_old_records_and_refuses_corrupt_stores() {
    let dir = tempdir();
    let kek = Arc::new(kek("k"));
    let (store, ring) = file_keyring(&dir, &kek).await;
    let ct = ring.encrypt(&ctx(1), b"kept").await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    assert!(matches!(
        Keyring::builder("t", kek.clone(), store.clone())
            .create()
            .await,
        Err(Error::KeyringExists(_))
    ));
    drop(ring);
    let again = Keyring::builder("t", kek.clone(), store.clone())
        .open()
        .await
        .unwrap();
    assert_eq!(again.active_version(), Some(2));
    assert_eq!(again.decrypt(&ctx(1), &ct).await.unwrap(), b"kept");
    assert!(matches!(
        Keyring::builder("nope", kek.clone(), store.clone())
            .open()
            .await,
        Err(Error::KeyringNotFound(_))
    ));
    // Two active versions on disk: refused on load.
    let path = store.path_of("t");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"retired\"", "\"active\"")).unwrap();
    assert!(matches!(
        Keyring::builder("t", kek.clone(), store.clone())
            .open()
            .await,
        Err(Error::Store(_))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

async fn two_rotators(store: Arc<dyn KeyringStore>) {
    let wrapper = CountingWrapper::shared(kek("k"));
    let a = Keyring::builder("shared", wrapper.clone(), store.clone())
        .retry_policy(RetryPolicy::none())
        .create()
        .await
        .unwrap();
    a.rotate(&admin()).await.unwrap();
    let b = Keyring::builder("shared", wrapper.clone(), store.clone())
        .open()
        .await
        .unwrap();
    // Both are inside their wrap call at once, from the same revision.
    wrapper.set_delay(Duration::from_millis(50));
    let (actor_a, actor_b) = (Actor::new("a"), Actor::new("b"));
    let (ra, rb) = tokio::join!(a.rotate(&actor_a), b.rotate(&actor_b));
    wrapper.set_delay(Duration::ZERO);
    let (winner, loser, err) = match (ra, rb) {
        (Ok(w), Err(e)) => (w, &b, e),
        (Err(e), Ok(w)) => (w, &a, e),
        other => panic!("expected one winner: {other:?}"),
    };
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let (_, stored) = store.load("shared").await.unwrap().unwrap();
    stored.validate().unwrap();
    assert_eq!(stored.versions.len(), 2);
    assert_eq!(stored.active_version(), Some(2));
    assert_eq!(stored.get(2).unwrap().id, winner.version_id);
    // The loser reloaded the winner's state and can go on.
    assert_eq!(loser.active_version(), Some(2));
    assert_eq!(loser.snapshot().1.get(2).unwrap().id, winner.version_id);
    let next = loser.rotate(&admin()).await.unwrap();
    assert_eq!(next.version, 3);
    let ct = a.encrypt(&ctx(5), b"x").await.unwrap();
    assert_eq!(b.decrypt(&ctx(5), &ct).await.unwrap(), b"x");
}

#[tokio::test]
async fn two_rotators_on_one_memory_store_one_wins() {
    two_rotators(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn two_rotators_on_one_file_store_one_wins() {
    let dir = tempdir();
    two_rotators(Arc::new(FileStore::new(&dir).unwrap())).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn another_instance_sees_a_new_version_on_first_use() {
    let f = fixture().await;
    f.ring.rotate(&admin()).await.unwrap();
    let other = Keyring::builder("acme", f.wrapper.clone(), f.store.clone())
        .open()
        .await
        .unwrap();
    f.ring.rotate(&admin()).await.unwrap();
    let ct = f.ring.encrypt(&ctx(1), b"new").await.unwrap();
    assert_eq!(other.active_version(), Some(1));
    assert_eq!(other.decrypt(&ctx(1), &ct).await.unwrap(), b"new");
    assert_eq!(other.active_version(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_one_unwrap_for_100_concurrent_cold_decrypts() {
    let f = fixture().await;
    f.ring.rotate(&admin()).await.unwrap();
    let ct = f.ring.encrypt(&ctx(7), b"hot row").await.unwrap();
    f.ring.clear_cache();
    f.wrapper.set_delay(Duration::from_millis(30));
    let before = f.wrapper.unwraps();
    let ring = Arc::new(f.ring);
    let ct = Arc::new(ct);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let ring = ring.clone();
            let ct = ct.clone();
            tokio::spawn(async move { ring.decrypt(&ctx(7), &ct).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), b"hot row");
    }
    assert_eq!(f.wrapper.unwraps() - before, 1);
}

#[tokio::test(start_paused = true)]
async fn cache_expires_after_its_ttl() {
    let wrapper = CountingWrapper::shared(kek("k"));
    let ring = Keyring::builder("t", wrapper.clone(), Arc::new(MemoryStore::new()))
        .cache_ttl(Duration::from_secs(60))
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    let ct = ring.encrypt(&ctx(1), b"x").await.unwrap();
    ring.decrypt(&ctx(1), &ct).await.unwrap();
    assert_eq!(wrapper.unwraps(), 0, "the rotated key is cached");
    tokio::time::advance(Duration::from_secs(59)).await;
    ring.decrypt(&ctx(1), &ct).await.unwrap();
    assert_eq!(wrapper.unwraps(), 0);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(ring.evict_expired(), 1);
    assert!(ring.metadata().cached_versions.is_empty());
    ring.decrypt(&ctx(1), &ct).await.unwrap();
    assert_eq!(wrapper.unwraps(), 1);
    assert_eq!(ring.metadata().cached_versions, [1]);
}

#[tokio::test(start_paused = true)]
async fn sealed_keyring_keeps_cached_versions_until_ttl_and_unseal_retries() {
    let wrapper = CountingWrapper::shared(kek("k"));
    let sink = Arc::new(RecordingSink::default());
    let ring = Keyring::builder("t", wrapper.clone(), Arc::new(MemoryStore::new()))
        .cache_ttl(Duration::from_secs(300))
        .retry_policy(RetryPolicy::none())
        .audit(sink.clone())
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    let old = ring.encrypt(&ctx(1), b"old").await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    ring.clear_cache();
    let hot = ring.encrypt(&ctx(2), b"hot").await.unwrap(); // v2 cached again
    let unwraps = wrapper.unwraps();
    sink.take();

    wrapper.fail_with(Some(WrapErrorKind::Unavailable));
    let err = ring.decrypt(&ctx(1), &old).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Sealed {
                kind: WrapErrorKind::Unavailable,
                ..
            }
        ),
        "{err}"
    );
    assert!(ring.metadata().sealed.is_some());
    assert_eq!(wrapper.unwraps(), unwraps + 1);
    // Sealed: no more KMS calls for cold versions; cached ones work.
    assert!(matches!(
        ring.decrypt(&ctx(1), &old).await,
        Err(Error::Sealed { .. })
    ));
    assert_eq!(wrapper.unwraps(), unwraps + 1);
    assert_eq!(ring.decrypt(&ctx(2), &hot).await.unwrap(), b"hot");
    assert!(ring.encrypt(&ctx(3), b"new").await.is_ok());
    assert!(matches!(
        ring.rotate(&admin()).await,
        Err(Error::Sealed { .. })
    ));
    assert_eq!(ring.snapshot().1.versions.len(), 2);
    // Unseal while the KMS still fails: still sealed.
    assert!(matches!(ring.unseal().await, Err(Error::Sealed { .. })));
    // The cached key expires: the active version stops working too.
    tokio::time::advance(Duration::from_secs(301)).await;
    assert!(matches!(
        ring.decrypt(&ctx(2), &hot).await,
        Err(Error::Sealed { .. })
    ));
    wrapper.fail_with(None);
    ring.unseal().await.unwrap();
    assert!(ring.metadata().sealed.is_none());
    assert_eq!(ring.decrypt(&ctx(1), &old).await.unwrap(), b"old");
    assert_eq!(ring.decrypt(&ctx(2), &hot).await.unwrap(), b"hot");
    assert_eq!(sink.names(), ["kms.sealed", "kms.unsealed"]);
}

#[tokio::test]
async fn a_failed_wrap_leaves_the_keyring_as_it_was() {
    let f = fixture().await;
    f.ring.rotate(&admin()).await.unwrap();
    let before = f.ring.snapshot();
    let events = f.sink.events().len();
    f.wrapper.fail_wraps_with(WrapErrorKind::KeyMismatch);
    assert!(matches!(f.ring.rotate(&admin()).await, Err(Error::Wrap(_))));
    assert!(matches!(
        f.ring.create_pending(&admin()).await,
        Err(Error::Wrap(_))
    ));
    assert_eq!(f.ring.snapshot().0, before.0);
    assert_eq!(*f.ring.snapshot().1, *before.1);
    assert_eq!(f.store.load("acme").await.unwrap().unwrap().0, before.0);
    assert_eq!(f.sink.events().len(), events);
    assert!(f.ring.sealed().is_none());
    // Access denied seals the keyring and still changes nothing.
    f.wrapper.fail_wraps_with(WrapErrorKind::AccessDenied);
    assert!(matches!(
        f.ring.rotate(&admin()).await,
        Err(Error::Sealed { .. })
    ));
    assert_eq!(*f.ring.snapshot().1, *before.1);
    f.wrapper.fail_with(None);
    f.ring.unseal().await.unwrap();
    assert_eq!(f.ring.rotate(&admin()).await.unwrap().version, 2);
}

#[derive(Debug)]
struct Leases {
    fail: bool,
}

#[async_trait::async_trait]
impl LeaseIssuer for Leases {
    async fn issue(
        &self,
        keyring_id: &str,
        version: u32,
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        if self.fail {
            Err("lease table unavailable".into())
        } else {
            Ok(format!("lease-{keyring_id}-{version}"))
        }
    }
}

#[tokio::test]
async fn rotation_returns_a_lease_id_and_stands_when_the_hook_fails() {
    for fail in [false, true] {
        let sink = Arc::new(RecordingSink::default());
        let ring = Keyring::builder("t", Arc::new(kek("k")), Arc::new(MemoryStore::new()))
            .lease_issuer(Arc::new(Leases { fail }))
            .audit(sink.clone())
            .create()
            .await
            .unwrap();
        let r = ring.rotate(&admin()).await.unwrap();
        let expected = (!fail).then(|| "lease-t-1".to_owned());
        assert_eq!(r.lease_id, expected);
        assert_eq!(ring.active_version(), Some(1));
        match &sink.events()[0].kind {
            AuditKind::Rotate { lease_id, .. } => assert_eq!(*lease_id, expected),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn rotate_if_due_follows_the_policy_and_emits_the_scheduled_event() {
    let f = fixture().await;
    let policy = RotationPolicy::new(true, 90).unwrap();
    let sched = Actor::new("scheduler");
    // No version yet: due.
    let r = f
        .ring
        .rotate_if_due(&policy, &sched)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.version, 1);
    assert!(
        f.ring
            .rotate_if_due(&policy, &sched)
            .await
            .unwrap()
            .is_none()
    );
    f.clock.advance(Duration::from_secs(89 * 86_400));
    assert!(
        f.ring
            .rotate_if_due(&policy, &sched)
            .await
            .unwrap()
            .is_none()
    );
    f.clock.advance(Duration::from_secs(86_400));
    assert_eq!(
        f.ring
            .rotate_if_due(&policy, &sched)
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    let off = RotationPolicy::new(false, 1).unwrap();
    f.clock.advance(Duration::from_secs(1000 * 86_400));
    assert!(f.ring.rotate_if_due(&off, &sched).await.unwrap().is_none());
    assert_eq!(
        f.sink.names(),
        [
            "kms.rotate.scheduled",
            "kms.rotate.scheduled",
            "kms.version.state_changed"
        ]
    );
    assert!(RotationPolicy::new(true, 0).is_err());
    assert!(RotationPolicy::new(true, 3651).is_err());
    assert!(serde_json::from_str::<RotationPolicy>(r#"{"enabled":true,"period_days":0}"#).is_err());
    let p: RotationPolicy = serde_json::from_str(r#"{"enabled":true,"period_days":3650}"#).unwrap();
    assert_eq!(p.period_days(), 3650);
}

#[tokio::test]
async fn kms_rewrap_moves_every_live_version_or_nothing() {
    let f = fixture().await;
    let a = admin();
    let mut cts = Vec::new();
    for i in 0..4 {
        f.ring.rotate(&a).await.unwrap();
        cts.push(f.ring.encrypt(&ctx(i), b"r").await.unwrap());
    }
    f.ring.disable(1, &a).await.unwrap();
    f.ring.disable(2, &a).await.unwrap();
    // Max staleness (30 s) plus the second timestamps cannot resolve.
    f.clock.advance(Duration::from_secs(31));
    f.ring.destroy(2, evidence(2, &f.clock), &a).await.unwrap();
    // A new wrapper that cannot wrap: nothing changes.
    let broken = CountingWrapper::shared(kek("kek-b"));
    broken.fail_wraps_with(WrapErrorKind::KeyMismatch);
    let before = f.ring.snapshot();
    assert!(f.ring.rewrap_master_keys(broken, &a).await.is_err());
    assert_eq!(*f.ring.snapshot().1, *before.1);
    assert_eq!(f.ring.wrapper().key_ref(), "kek-a");

    f.sink.take();
    let new = CountingWrapper::shared(kek("kek-b"));
    let moved = f.ring.rewrap_master_keys(new.clone(), &a).await.unwrap();
    assert_eq!(moved, [1, 3, 4]);
    assert_eq!(f.ring.wrapper().key_ref(), "kek-b");
    let (_, stored) = f.store.load("acme").await.unwrap().unwrap();
    for v in &stored.versions {
        if let Some(w) = &v.wrapped {
            assert_eq!(w.key_ref, "kek-b");
        }
    }
    assert_eq!(
        f.sink.events()[0].kind,
        AuditKind::KmsRewrap {
            from_provider: "local".into(),
            from_key_ref: "kek-a".into(),
            to_provider: "local".into(),
            to_key_ref: "kek-b".into(),
            versions: vec![1, 3, 4],
        }
    );
    // A fresh instance with only the new KEK reads everything still live.
    let fresh = Keyring::builder("acme", new.clone(), f.store.clone())
        .open()
        .await
        .unwrap();
    let unwraps = new.unwraps();
    for (i, ct) in cts.iter().enumerate().skip(2) {
        assert_eq!(fresh.decrypt(&ctx(i as u32), ct).await.unwrap(), b"r");
    }
    assert_eq!(new.unwraps() - unwraps, 2);
    fresh.enable(1, &a).await.unwrap();
    assert_eq!(fresh.decrypt(&ctx(0), &cts[0]).await.unwrap(), b"r");
}

#[tokio::test]
async fn rewrap_of_a_record_moves_it_to_the_active_version() {
    let f = fixture().await;
    f.ring.rotate(&admin()).await.unwrap();
    let ct = f.ring.encrypt(&ctx(1), b"payload").await.unwrap();
    f.ring.rotate(&admin()).await.unwrap();
    assert!(matches!(
        f.ring.rewrap(&ctx(1), &ct, 1).await,
        Err(Error::KeyState {
            version: 1,
            state: KeyState::Retired
        })
    ));
    let moved = f.ring.rewrap(&ctx(1), &ct, 2).await.unwrap().unwrap();
    assert_eq!(
        keyfold_core::format::inspect(&moved).unwrap().key_version,
        2
    );
    assert_eq!(f.ring.decrypt(&ctx(1), &moved).await.unwrap(), b"payload");
    assert_eq!(f.ring.rewrap(&ctx(1), &moved, 2).await.unwrap(), None);
}

#[tokio::test]
async fn debug_output_never_shows_key_material() {
    let f = fixture().await;
    f.ring.rotate(&admin()).await.unwrap();
    let key = f.ring.active_key().await.unwrap();
    let secret_hex = hex::encode(key.secret().expose());
    let texts = [
        format!("{:?}", f.ring),
        format!("{key:?}"),
        format!("{:?}", f.ring.metadata()),
        format!("{:?}", f.ring.snapshot()),
        format!("{:?}", f.sink.events()),
    ];
    for t in &texts {
        assert!(!t.contains(&secret_hex), "{t}");
        assert!(!t.contains(&format!("{:?}", key.secret().expose())), "{t}");
    }
    assert!(texts[1].contains("******"));
    let stored = format!("{:?}", f.ring.snapshot().1);
    let wrapped = &f.ring.snapshot().1.versions[0]
        .wrapped
        .clone()
        .unwrap()
        .bytes;
    assert!(!stored.contains(&format!("{wrapped:?}")));
}

#[tokio::test]
async fn probe_reports_the_failing_step() {
    let ok = probe::probe(&kek("k")).await.unwrap();
    assert_eq!((ok.provider.as_str(), ok.key_ref.as_str()), ("local", "k"));
    let w = CountingWrapper::new(kek("k"));
    w.fail_with(Some(WrapErrorKind::AccessDenied));
    let f = probe::probe(&w).await.unwrap_err();
    assert_eq!(
        (f.step, f.kind),
        (ProbeStep::Wrap, Some(WrapErrorKind::AccessDenied))
    );
    // Unwrap-only failure: the wrap of the probe succeeds.
    #[derive(Debug)]
    struct UnwrapFails(LocalKek);
    #[async_trait::async_trait]
    impl KeyWrapper for UnwrapFails {
        fn provider(&self) -> &str {
            "local"
        }
        fn key_ref(&self) -> &str {
            "k"
        }
        async fn wrap(
            &self,
            key: &SecretKey,
            c: &keyfold_core::WrapContext,
        ) -> Result<keyfold_core::WrappedKey, keyfold_core::WrapError> {
            self.0.wrap(key, c).await
        }
        async fn unwrap(
            &self,
            _: &keyfold_core::WrappedKey,
            _: &keyfold_core::WrapContext,
        ) -> Result<SecretKey, keyfold_core::WrapError> {
            Err(keyfold_core::WrapError::new(
                WrapErrorKind::KeyDisabled,
                "local",
                "k",
                keyfold_core::WrapOperation::Unwrap,
            ))
        }
    }
    let f = probe::probe(&UnwrapFails(kek("k"))).await.unwrap_err();
    assert_eq!(
        (f.step, f.kind),
        (ProbeStep::Unwrap, Some(WrapErrorKind::KeyDisabled))
    );
}

#[tokio::test]
async fn upsert_replaces_the_config_only_after_its_probe_succeeds() {
    let dir = tempdir();
    let kek_file = dir.join("kek.hex");
    std::fs::write(&kek_file, hex::encode([7u8; 32])).unwrap();
    let good = ProviderConfig::Local(LocalConfig {
        kms_key_ref: "kek-file".into(),
        kek_env_var: None,
        kek_file: Some(kek_file.display().to_string()),
    });
    let missing = ProviderConfig::Local(LocalConfig {
        kms_key_ref: "kek-missing".into(),
        kek_env_var: None,
        kek_file: Some(dir.join("nope").display().to_string()),
    });
    let slot = ConfigSlot::new();
    let sink = RecordingSink::default();
    let a = admin();
    let p = slot
        .upsert(good.clone(), &LocalFactory, "acme", &sink, &a)
        .await
        .unwrap();
    assert_eq!(p.wrapper.key_ref(), "kek-file");
    let f = slot
        .upsert(missing, &LocalFactory, "acme", &sink, &a)
        .await
        .unwrap_err();
    assert_eq!(f.step, ProbeStep::Build);
    assert_eq!(slot.current().unwrap().config, good);
    let kinds: Vec<AuditKind> = sink.events().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds[0],
        AuditKind::ConfigUpdated {
            provider: "local".into(),
            key_ref: "kek-file".into(),
            previous_key_ref: None
        }
    );
    assert!(matches!(
        &kinds[1],
        AuditKind::ProbeFailed { step: ProbeStep::Build, key_ref, .. } if key_ref == "kek-missing"
    ));
    assert_eq!(sink.names(), ["kms.config.updated", "kms.probe.failed"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn bogus_versions_reload_the_store_at_most_once_a_second() {
    #[derive(Debug)]
    struct CountingStore(MemoryStore, std::sync::atomic::AtomicU64);
    #[async_trait::async_trait]
    impl KeyringStore for CountingStore {
        async fn load(
            &self,
            id: &str,
        ) -> Result<
            Option<(keyfold_core::Revision, keyfold_core::keyring::StoredKeyring)>,
            keyfold_core::store::StoreError,
        > {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.load(id).await
        }
        async fn save(
            &self,
            id: &str,
            expected: Option<keyfold_core::Revision>,
            k: &keyfold_core::keyring::StoredKeyring,
        ) -> Result<keyfold_core::Revision, keyfold_core::store::StoreError> {
            self.0.save(id, expected, k).await
        }
    }
    let store = Arc::new(CountingStore(MemoryStore::new(), Default::default()));
    let ring = Keyring::builder("t", Arc::new(kek("k")), store.clone())
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    let ct = ring.encrypt(&ctx(1), b"x").await.unwrap();
    let mut bogus = ct.clone();
    bogus[36..40].copy_from_slice(&999u32.to_be_bytes());
    let loads = || store.1.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..50 {
        assert!(matches!(
            ring.decrypt(&ctx(1), &bogus).await,
            Err(Error::UnknownVersion { version: 999 })
        ));
    }
    assert_eq!(loads(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    let _ = ring.decrypt(&ctx(1), &bogus).await;
    assert_eq!(loads(), 2);
}

/// The rewrap crate spawns keyring futures onto multi-threaded runtimes.
#[test]
fn keyring_and_its_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let ring = Keyring::builder("t", Arc::new(kek("k")), Arc::new(MemoryStore::new()));
    send(ring.create());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ring = rt
        .block_on(Keyring::builder("t", Arc::new(kek("k")), Arc::new(MemoryStore::new())).create())
        .unwrap();
    send_sync(&ring);
    let a = admin();
    let c = ctx(1);
    send(ring.rotate(&a));
    send(ring.master_key(1));
    send(ring.encrypt(&c, b""));
    send(ring.decrypt(&c, b""));
    send(ring.rewrap(&c, b"", 1));
    send(ring.destroy(
        1,
        DestroyAuthorization::Forced {
            reason: String::new(),
        },
        &a,
    ));
    send(ring.refresh());
    send(ring.unseal());
}

#[tokio::test]
async fn shipped_stores_pass_the_store_conformance_suite() {
    keyfold_core::testkit::store_conformance(&MemoryStore::new(), "mem").await;
    let dir = tempdir();
    keyfold_core::testkit::store_conformance(&FileStore::new(&dir).unwrap(), "file").await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_shares_a_failed_unwrap_instead_of_retrying_it_100_times() {
    let f = fixture().await;
    f.ring.rotate(&admin()).await.unwrap();
    let ct = f.ring.encrypt(&ctx(7), b"x").await.unwrap();
    f.ring.clear_cache();
    f.wrapper.set_delay(Duration::from_millis(30));
    f.wrapper.fail_with(Some(WrapErrorKind::Unavailable));
    let before = f.wrapper.unwraps();
    let ring = Arc::new(f.ring);
    let ct = Arc::new(ct);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let ring = ring.clone();
            let ct = ct.clone();
            tokio::spawn(async move { ring.decrypt(&ctx(7), &ct).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Sealed { .. }), "{err}");
        assert!(err.to_string().contains("unseal"), "{err}");
    }
    assert_eq!(f.wrapper.unwraps() - before, 1);
    assert_eq!(f.sink.names().last(), Some(&"kms.sealed"));
    assert_eq!(
        f.sink
            .names()
            .iter()
            .filter(|n| **n == "kms.sealed")
            .count(),
        1
    );
}

#[tokio::test]
async fn file_store_waits_while_another_writer_holds_the_lock() {
    let dir = tempdir();
    let store = FileStore::new(&dir).unwrap();
    let k = keyfold_core::keyring::StoredKeyring::new("t", Timestamp(1));
    let r1 = store.save("t", None, &k).await.unwrap();
    let lock_path = store.lock_path_of("t");
    // The lock file persists; its existence (even "stale") blocks nobody.
    assert!(lock_path.exists());
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&lock_path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let r2 = store.save("t", Some(r1), &k).await.unwrap();
    assert!(r2 > r1);

    // Another writer (another process, say) holds the OS lock: a save waits
    // for it, however old the lock file looks, and never removes it.
    let held = std::fs::File::options()
        .write(true)
        .open(&lock_path)
        .unwrap();
    held.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dir2 = dir.clone();
    let k2 = k.clone();
    let writer = std::thread::spawn(move || {
        let other = FileStore::new(&dir2).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tx.send(rt.block_on(other.save("t", Some(r2), &k2)))
            .unwrap();
    });
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_millis(300)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        ),
        "a save went ahead while another writer held the lock"
    );
    assert!(lock_path.exists());
    held.unlock().unwrap();
    let r3 = rx.recv().unwrap().unwrap();
    writer.join().unwrap();
    assert!(r3 > r2);
    assert_eq!(store.load("t").await.unwrap().unwrap().0, r3);
    assert!(matches!(
        store.save("../evil", None, &k).await,
        Err(keyfold_core::store::StoreError::InvalidId(_))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn file_store_racing_writers_exactly_one_wins_each_round() {
    let dir = tempdir();
    let k = keyfold_core::keyring::StoredKeyring::new("race", Timestamp(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let first = FileStore::new(&dir).unwrap();
    let mut rev = rt.block_on(first.save("race", None, &k)).unwrap();
    let lock_path = first.lock_path_of("race");
    let writers = 2;
    for round in 0..100 {
        // A lock file that looks abandoned: the old store took it over.
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&lock_path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(writers));
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                let (dir, k, barrier) = (dir.clone(), k.clone(), barrier.clone());
                std::thread::spawn(move || {
                    // A separate store per writer, as separate processes have.
                    let store = FileStore::new(&dir).unwrap();
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    barrier.wait();
                    rt.block_on(store.save("race", Some(rev), &k))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins: Vec<Revision> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(wins.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, keyfold_core::store::StoreError::Conflict { .. }),
                    "round {round}: {e}"
                );
            }
        }
        rev = wins[0];
        assert_eq!(rt.block_on(first.load("race")).unwrap().unwrap().0, rev);
    }
    assert_eq!(rev, Revision(101));
    std::fs::remove_dir_all(dir).unwrap();
}
