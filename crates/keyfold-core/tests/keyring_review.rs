//! Regression tests for the keyring security review: what the keyring
//! refuses from its store, from its KMS and from stale evidence.

use keyfold_core::testkit::Unwatched;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use keyfold_core::audit::Actor;
use keyfold_core::keyring::{KeyState, Keyring, StoredKeyring};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::{KeyringStore, MemoryStore, Revision, StoreError};
use keyfold_core::time::{ManualClock, Timestamp};
use keyfold_core::{
    EncryptionContext, Error, KeyWrapper, LocalKek, SecretKey, WrapContext, WrapError,
    WrapErrorKind, WrapOperation, WrappedKey,
};

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("row", "1")
}

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn kek(id: &str) -> Arc<LocalKek> {
    Arc::new(LocalKek::from_bytes(id, SecretKey::generate().unwrap()))
}

/// A host store that can be told to hand back something else on load.
#[derive(Debug, Default)]
struct TamperStore {
    inner: MemoryStore,
    replace: Mutex<Option<StoredKeyring>>,
    loads: std::sync::atomic::AtomicUsize,
}

impl TamperStore {
    fn replace_with(&self, k: Option<StoredKeyring>) {
        *self.replace.lock().unwrap() = k;
    }
}

#[async_trait]
impl KeyringStore for TamperStore {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let real = self.inner.load(keyring_id).await?;
        let replace = self.replace.lock().unwrap().clone();
        Ok(match (real, replace) {
            (Some((r, _)), Some(k)) => Some((Revision(r.0 + 1), k)),
            (real, _) => real,
        })
    }
    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        self.inner.save(keyring_id, expected, keyring).await
    }
}

async fn ring_on(id: &str, store: Arc<dyn KeyringStore>, clock: &ManualClock) -> Keyring {
    Keyring::builder(id, kek("kek"), store)
        .clock(Arc::new(clock.clone()))
        .retry_policy(RetryPolicy::none())
        .open_or_create()
        .await
        .unwrap()
}

fn start() -> ManualClock {
    ManualClock::new(Timestamp(1_700_000_000))
}

#[tokio::test]
async fn open_and_refresh_refuse_a_foreign_or_invalid_keyring_from_the_store() {
    let store = Arc::new(TamperStore::default());
    let clock = start();
    let a = ring_on("tenant-a", store.clone(), &clock).await;
    a.rotate(&admin()).await.unwrap();
    a.rotate(&admin()).await.unwrap();
    let b = ring_on("tenant-b", store.clone(), &clock).await;
    b.rotate(&admin()).await.unwrap();
    let (_, b_stored) = b.snapshot();
    let (_, a_stored) = a.snapshot();

    let mut invalid = (*a_stored).clone();
    for v in &mut invalid.versions {
        v.state = KeyState::Active;
    }
    let cases = [("foreign", (*b_stored).clone()), ("invalid", invalid)];
    for (what, bad) in cases {
        store.replace_with(Some(bad));
        let opened = Keyring::builder("tenant-a", kek("kek"), store.clone())
            .open()
            .await;
        assert!(
            matches!(
                opened,
                Err(Error::Store(
                    StoreError::Corrupt { .. } | StoreError::Invariant(_)
                ))
            ),
            "{what}: open must refuse, got {opened:?}"
        );
        let opened = Keyring::builder("tenant-a", kek("kek"), store.clone())
            .open_or_create()
            .await;
        assert!(opened.is_err(), "{what}: open_or_create must refuse");
        let refreshed = a.refresh().await;
        assert!(
            matches!(
                refreshed,
                Err(Error::Store(
                    StoreError::Corrupt { .. } | StoreError::Invariant(_)
                ))
            ),
            "{what}: refresh must refuse, got {refreshed:?}"
        );
        // The instance keeps its own, valid state.
        assert_eq!(a.snapshot().1.keyring_id, "tenant-a");
        assert_eq!(a.active_version(), Some(2));
        assert_eq!(a.version_state(1), Some(KeyState::Retired));
    }
    store.replace_with(None);
    a.refresh().await.unwrap();
}

// ----- key check values (finding 1) -----------------------------------------

/// A KMS that, like Azure Key Vault, ignores the wrap context: a blob
/// unwraps whatever keyring entry it is copied into. It can also be made
/// unreachable, to seal a keyring.
#[derive(Debug)]
struct ContextBlind {
    inner: LocalKek,
    down: std::sync::atomic::AtomicBool,
}

impl ContextBlind {
    fn new() -> Arc<Self> {
        Arc::new(ContextBlind {
            inner: LocalKek::from_bytes("blind", SecretKey::generate().unwrap()),
            down: std::sync::atomic::AtomicBool::new(false),
        })
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

fn fixed() -> WrapContext {
    WrapContext::new("ignored", 0)
}

#[async_trait]
impl KeyWrapper for ContextBlind {
    fn provider(&self) -> &str {
        "local"
    }
    fn key_ref(&self) -> &str {
        "blind"
    }
    async fn wrap(&self, key: &SecretKey, _: &WrapContext) -> Result<WrappedKey, WrapError> {
        self.inner.wrap(key, &fixed()).await
    }
    async fn unwrap(&self, w: &WrappedKey, _: &WrapContext) -> Result<SecretKey, WrapError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(WrapError::new(
                WrapErrorKind::Unavailable,
                "local",
                "blind",
                WrapOperation::Unwrap,
            ));
        }
        self.inner.unwrap(w, &fixed()).await
    }
}

async fn blind_ring(id: &str, kms: &Arc<ContextBlind>, store: &Arc<MemoryStore>) -> Keyring {
    Keyring::builder(id, kms.clone(), store.clone())
        .retry_policy(RetryPolicy::none())
        .open_or_create()
        .await
        .unwrap()
}

/// Rewrites the stored keyring `id` with `f` (an attacker with write access
/// to the keyring table).
async fn tamper(store: &MemoryStore, id: &str, f: impl FnOnce(&mut StoredKeyring)) {
    let (rev, mut k) = store.load(id).await.unwrap().unwrap();
    f(&mut k);
    store.save(id, Some(rev), &k).await.unwrap();
}

fn is_key_check(r: Result<impl std::fmt::Debug, Error>, version: u32) {
    match r {
        Err(Error::KeyCheckFailed { version: v }) => assert_eq!(v, version),
        other => panic!("expected KeyCheckFailed for v{version}, got {other:?}"),
    }
}

#[tokio::test]
async fn the_key_check_value_is_the_documented_hmac() {
    use hmac::{KeyInit, Mac};
    let kms = ContextBlind::new();
    let store = Arc::new(MemoryStore::new());
    let ring = blind_ring("tenant-a", &kms, &store).await;
    ring.rotate(&admin()).await.unwrap();
    let key = ring.master_key(1).await.unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.secret().expose()).unwrap();
    mac.update(b"keyfold/v1/key-check");
    mac.update(&WrapContext::new("tenant-a", 1).to_aad());
    let expected = hex::encode(mac.finalize().into_bytes());
    let stored = store.load("tenant-a").await.unwrap().unwrap().1;
    assert_eq!(stored.schema, 2);
    assert_eq!(
        stored.get(1).unwrap().key_check.as_deref(),
        Some(&*expected)
    );
}

#[tokio::test]
async fn a_wrapped_key_swapped_between_versions_is_refused_on_every_unwrap() {
    let kms = ContextBlind::new();
    let store = Arc::new(MemoryStore::new());
    let ring = blind_ring("tenant-a", &kms, &store).await;
    ring.rotate(&admin()).await.unwrap();
    let v1_record = ring.encrypt(&ctx(), b"on v1").await.unwrap();
    ring.rotate(&admin()).await.unwrap();

    // The blob alone, then the blob with v1's key check value.
    for with_kcv in [false, true] {
        tamper(&store, "tenant-a", |k| {
            let v1 = k.get(1).unwrap().clone();
            let v2 = k.versions.iter_mut().find(|v| v.version == 2).unwrap();
            v2.wrapped = v1.wrapped;
            if with_kcv {
                v2.key_check = v1.key_check;
            }
        })
        .await;
        // A fresh process: nothing cached.
        let other = blind_ring("tenant-a", &kms, &store).await;
        is_key_check(other.encrypt(&ctx(), b"new").await, 2);
        is_key_check(other.active_key().await, 2);
        is_key_check(other.master_key(2).await, 2);
        assert_eq!(other.decrypt(&ctx(), &v1_record).await.unwrap(), b"on v1");
        assert!(!other.metadata().cached_versions.contains(&2));
        assert!(other.sealed().is_none(), "a bad blob does not seal");
        // KMS re-wrap refuses it too, and changes nothing.
        let before = store.load("tenant-a").await.unwrap().unwrap();
        let again = LocalKek::from_bytes("next", SecretKey::generate().unwrap());
        is_key_check(other.rewrap_master_keys(Arc::new(again), &admin()).await, 2);
        assert_eq!(store.load("tenant-a").await.unwrap().unwrap(), before);
    }

    // The same instance after a refresh, its cache dropped.
    ring.refresh().await.unwrap();
    ring.clear_cache();
    is_key_check(ring.encrypt(&ctx(), b"new").await, 2);
}

#[tokio::test]
async fn a_wrapped_key_copied_from_another_keyring_is_refused() {
    let kms = ContextBlind::new();
    let store = Arc::new(MemoryStore::new());
    let a = blind_ring("tenant-a", &kms, &store).await;
    let b = blind_ring("tenant-b", &kms, &store).await;
    a.rotate(&admin()).await.unwrap();
    b.rotate(&admin()).await.unwrap();
    let b_record = b.encrypt(&ctx(), b"tenant b").await.unwrap();
    let (_, a_stored) = a.snapshot();
    let a1 = a_stored.get(1).unwrap().clone();
    tamper(&store, "tenant-b", |k| {
        let v1 = k.versions.iter_mut().find(|v| v.version == 1).unwrap();
        v1.wrapped = a1.wrapped.clone();
        v1.key_check = a1.key_check.clone();
    })
    .await;
    let b2 = blind_ring("tenant-b", &kms, &store).await;
    is_key_check(b2.encrypt(&ctx(), b"new").await, 1);
    is_key_check(b2.decrypt(&ctx(), &b_record).await, 1);
}

#[tokio::test]
async fn unseal_refuses_a_swapped_key_and_stays_sealed() {
    let kms = ContextBlind::new();
    let store = Arc::new(MemoryStore::new());
    let ring = blind_ring("tenant-a", &kms, &store).await;
    ring.rotate(&admin()).await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    tamper(&store, "tenant-a", |k| {
        let v1 = k.get(1).unwrap().clone();
        let v2 = k.versions.iter_mut().find(|v| v.version == 2).unwrap();
        v2.wrapped = v1.wrapped;
    })
    .await;
    let other = blind_ring("tenant-a", &kms, &store).await;
    kms.set_down(true);
    assert!(matches!(
        other.master_key(1).await,
        Err(Error::Sealed { .. })
    ));
    kms.set_down(false);
    is_key_check(other.unseal().await, 2);
    assert!(other.sealed().is_some());
    assert!(other.metadata().cached_versions.is_empty());
}

#[test]
fn a_schema_1_keyring_without_key_check_values_is_refused_clearly() {
    let mut k = StoredKeyring::new("tenant-a", Timestamp(1));
    k.schema = 1;
    let err = k.validate().unwrap_err().to_string();
    assert!(err.contains("schema version 1"), "{err}");
    assert!(err.contains("key check"), "{err}");
}

#[test]
fn destroyed_versions_hold_no_key_check_and_live_ones_must() {
    let json = |state: &str, wrapped: bool, kcv: Option<&str>| {
        let mut v = serde_json::json!({
            "version": 1, "id": "x", "state": state, "created_at": 1,
            "destroyed_at": 2,
        });
        if state == "active" {
            v["activated_at"] = serde_json::json!(1);
        }
        if wrapped {
            v["wrapped"] = serde_json::json!({
                "provider": "local", "key_ref": "k", "kms_key_version": null,
                "bytes": "AAAA",
            });
        }
        if let Some(kcv) = kcv {
            v["key_check"] = serde_json::json!(kcv);
        }
        let k = serde_json::json!({
            "schema": 2, "keyring_id": "t", "created_at": 1, "next_version": 2,
            "versions": [v],
        });
        serde_json::from_value::<StoredKeyring>(k)
            .unwrap()
            .validate()
    };
    let good = "ab".repeat(32);
    assert!(json("active", true, Some(&good)).is_ok());
    assert!(json("active", true, None).is_err());
    assert!(json("active", true, Some("abcd")).is_err());
    assert!(json("destroyed", false, None).is_ok());
    assert!(json("destroyed", false, Some(&good)).is_err());
}

// ----- max staleness (finding 2) ---------------------------------------------

async fn clocked(store: &Arc<MemoryStore>, kek: &Arc<LocalKek>, clock: &ManualClock) -> Keyring {
    Keyring::builder("tenant-a", kek.clone(), store.clone())
        .clock(Arc::new(clock.clone()))
        .retry_policy(RetryPolicy::none())
        .open_or_create()
        .await
        .unwrap()
}

fn version_of(record: &[u8]) -> u32 {
    keyfold_core::format::inspect(record).unwrap().key_version
}

#[tokio::test]
async fn a_stale_instance_stops_encrypting_under_a_retired_or_disabled_version() {
    let store = Arc::new(MemoryStore::new());
    let kek = kek("kek");
    let clock = start();
    let a = clocked(&store, &kek, &clock).await;
    a.rotate(&admin()).await.unwrap();
    let b = clocked(&store, &kek, &clock).await;
    assert_eq!(version_of(&b.encrypt(&ctx(), b"x").await.unwrap()), 1);

    // A rotates and disables v1; B has v1's key cached and has not refreshed.
    a.rotate(&admin()).await.unwrap();
    a.disable(1, &admin()).await.unwrap();
    clock.advance(std::time::Duration::from_secs(29));
    // Within the bound B may still be behind...
    assert_eq!(b.active_version(), Some(1));
    // ...but not beyond it.
    clock.advance(std::time::Duration::from_secs(1));
    let record = b.encrypt(&ctx(), b"y").await.unwrap();
    assert_eq!(version_of(&record), 2);
    assert_eq!(b.version_state(1), Some(KeyState::Disabled));
    assert_eq!(b.active_key().await.unwrap().version(), 2);
}

/// A KEK whose first unwrap is slow: while it runs, the clock moves past
/// the max staleness and another instance rotates.
#[derive(Debug)]
struct SlowFirstUnwrap {
    inner: Arc<LocalKek>,
    on_first_unwrap: tokio::sync::Mutex<Option<(ManualClock, Keyring)>>,
}

#[async_trait]
impl KeyWrapper for SlowFirstUnwrap {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn key_ref(&self) -> &str {
        self.inner.key_ref()
    }
    async fn wrap(&self, key: &SecretKey, ctx: &WrapContext) -> Result<WrappedKey, WrapError> {
        self.inner.wrap(key, ctx).await
    }
    async fn unwrap(&self, w: &WrappedKey, ctx: &WrapContext) -> Result<SecretKey, WrapError> {
        if let Some((clock, other)) = self.on_first_unwrap.lock().await.take() {
            clock.advance(std::time::Duration::from_secs(31));
            other.rotate(&admin()).await.unwrap();
        }
        self.inner.unwrap(w, ctx).await
    }
}

/// Another instance over `store` whose first unwrap runs `other`'s rotation
/// and moves the clock past the max staleness.
async fn slow_instance(
    store: &Arc<MemoryStore>,
    kek: &Arc<LocalKek>,
    clock: &ManualClock,
    other: Keyring,
) -> Keyring {
    let slow = Arc::new(SlowFirstUnwrap {
        inner: kek.clone(),
        on_first_unwrap: tokio::sync::Mutex::new(Some((clock.clone(), other))),
    });
    Keyring::builder("tenant-a", slow, store.clone())
        .clock(Arc::new(clock.clone()))
        .retry_policy(RetryPolicy::none())
        .open()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_slow_unwrap_does_not_let_a_retired_version_encrypt() {
    let store = Arc::new(MemoryStore::new());
    let kek = kek("kek");
    let clock = start();
    let a = clocked(&store, &kek, &clock).await;
    a.rotate(&admin()).await.unwrap();
    // B's view is fresh when it picks v1, but v1's cold unwrap outlasts the
    // max staleness and A rotates meanwhile: B must encrypt under v2.
    let b = slow_instance(&store, &kek, &clock, a).await;
    assert_eq!(b.active_version(), Some(1));
    let record = b.encrypt(&ctx(), b"x").await.unwrap();
    assert_eq!(version_of(&record), 2);
}

#[tokio::test]
async fn a_slow_unwrap_does_not_let_a_rewrap_land_on_a_retired_version() {
    let store = Arc::new(MemoryStore::new());
    let kek = kek("kek");
    let clock = start();
    let a = clocked(&store, &kek, &clock).await;
    a.rotate(&admin()).await.unwrap();
    let old = a.encrypt(&ctx(), b"x").await.unwrap();
    a.rotate(&admin()).await.unwrap();
    let b = slow_instance(&store, &kek, &clock, a).await;
    // v2 is active when B starts; while B unwraps v1, A rotates to v3.
    let err = b.rewrap(&ctx(), &old, 2).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyState {
                version: 2,
                state: KeyState::Retired
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn max_staleness_is_a_builder_option() {
    let store = Arc::new(MemoryStore::new());
    let kek = kek("kek");
    let clock = start();
    let a = clocked(&store, &kek, &clock).await;
    a.rotate(&admin()).await.unwrap();
    // B hears of no change but through its max staleness: a store that
    // cannot push changes.
    let b = Keyring::builder("tenant-a", kek.clone(), Arc::new(Unwatched(store.clone())))
        .clock(Arc::new(clock.clone()))
        .max_staleness(std::time::Duration::from_secs(5))
        .open()
        .await
        .unwrap();
    b.encrypt(&ctx(), b"x").await.unwrap();
    a.rotate(&admin()).await.unwrap();
    clock.advance(std::time::Duration::from_secs(4));
    assert_eq!(version_of(&b.encrypt(&ctx(), b"x").await.unwrap()), 1);
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(b.active_key().await.unwrap().version(), 2);
    assert_eq!(version_of(&b.encrypt(&ctx(), b"x").await.unwrap()), 2);
}

#[tokio::test]
async fn evidence_gathered_within_max_staleness_of_the_retirement_is_refused() {
    use keyfold_core::keyring::{DestroyAuthorization, NoRecordsLeft};
    let store = Arc::new(MemoryStore::new());
    let clock = start();
    let ring = clocked(&store, &kek("kek"), &clock).await;
    ring.rotate(&admin()).await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    let retired = ring.metadata().versions[0].retired_at.unwrap();
    ring.disable(1, &admin()).await.unwrap();
    let evidence = |secs: u64| {
        DestroyAuthorization::Evidence(NoRecordsLeft {
            keyring_id: "tenant-a".into(),
            version: 1,
            source: "job".into(),
            checked_at: Timestamp(retired.0 + secs),
        })
    };
    // Past the default 24 h grace period.
    clock.advance(std::time::Duration::from_secs(25 * 3600));
    // Max staleness 30 s + write window 60 s, plus one second for
    // whole-second timestamps.
    match ring.destroy(1, evidence(90), &admin()).await {
        Err(Error::DestroyRefused {
            version: 1,
            reason,
            allowed_at,
        }) => {
            assert!(reason.to_string().contains("too soon"), "{reason}");
            assert_eq!(
                allowed_at,
                Some(Timestamp(retired.0 + 91)).max(ring.destroy_allowed_at(1))
            );
        }
        other => panic!("evidence 90 s after retirement must be refused: {other:?}"),
    }
    assert_eq!(ring.version_state(1), Some(KeyState::Disabled));
    ring.destroy(1, evidence(91), &admin()).await.unwrap();
    assert_eq!(ring.version_state(1), Some(KeyState::Destroyed));
}

// ----- disable evicts, also for rewrap_master_keys and unseal (finding 6) ----

#[tokio::test]
async fn kms_rewrap_and_unseal_never_cache_a_disabled_version() {
    let kms = ContextBlind::new();
    let store = Arc::new(MemoryStore::new());
    let ring = blind_ring("tenant-a", &kms, &store).await;
    ring.rotate(&admin()).await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    ring.disable(1, &admin()).await.unwrap();
    ring.clear_cache();
    let next = Arc::new(LocalKek::from_bytes("next", SecretKey::generate().unwrap()));
    assert_eq!(
        ring.rewrap_master_keys(next, &admin()).await.unwrap(),
        [1, 2]
    );
    assert_eq!(ring.metadata().cached_versions, [2]);

    // Only a disabled version left: unseal probes instead of caching it.
    let store = Arc::new(MemoryStore::new());
    let ring = blind_ring("tenant-b", &kms, &store).await;
    let v = ring.create_pending(&admin()).await.unwrap();
    ring.disable(v, &admin()).await.unwrap();
    kms.set_down(true);
    assert!(ring.unseal().await.is_err());
    assert!(ring.sealed().is_some());
    kms.set_down(false);
    ring.unseal().await.unwrap();
    assert!(ring.sealed().is_none());
    assert!(ring.metadata().cached_versions.is_empty());
}

#[tokio::test]
async fn concurrent_encrypts_on_a_stale_view_reload_the_store_once() {
    let store = Arc::new(TamperStore::default());
    let clock = start();
    let ring = ring_on("tenant-a", store.clone(), &clock).await;
    ring.rotate(&admin()).await.unwrap();
    clock.advance(std::time::Duration::from_secs(31));
    let before = store.loads.load(std::sync::atomic::Ordering::SeqCst);
    let c = ctx();
    let all = (0..50).map(|_| ring.encrypt(&c, b"x"));
    for r in futures_join_all(all).await {
        r.unwrap();
    }
    let after = store.loads.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - before, 1);
}

async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out = Vec::new();
    // Poll them all together: a hand-rolled join_all (no futures dependency).
    let mut pending: Vec<_> = set.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, res) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *res = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    for r in results {
        out.extend(r);
    }
    out
}
