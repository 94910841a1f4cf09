//! Regression tests for the keyring security review: what the keyring
//! refuses from its store, from its KMS and from stale evidence.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use keyfold_core::audit::Actor;
use keyfold_core::keyring::{KeyState, Keyring, StoredKeyring};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::{KeyringStore, MemoryStore, Revision, StoreError};
use keyfold_core::time::{ManualClock, Timestamp};
use keyfold_core::{Error, LocalKek, SecretKey};

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
