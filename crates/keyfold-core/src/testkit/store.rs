//! The shared [`KeyringStore`] conformance checks: run them on a host's own
//! store (database table, object store...) as the shipped stores do.

use crate::keyring::{KeyState, StoredKeyring, StoredVersion};
use crate::store::{KeyringStore, Revision, StoreError};
use crate::time::Timestamp;
use crate::wrap::WrappedKey;

fn keyring(id: &str, versions: u32) -> StoredKeyring {
    let mut k = StoredKeyring::new(id, Timestamp(1_000));
    for v in 1..=versions {
        k.versions.push(StoredVersion {
            version: v,
            id: format!("id-{v}"),
            state: if v == versions {
                KeyState::Active
            } else {
                KeyState::Retired
            },
            wrapped: Some(WrappedKey {
                provider: "local".into(),
                key_ref: "testkit".into(),
                kms_key_version: None,
                bytes: vec![v as u8; 40],
            }),
            key_check: Some(format!("{:064x}", v)),
            created_at: Timestamp(1_000 + u64::from(v)),
            activated_at: Some(Timestamp(1_000 + u64::from(v))),
            retired_at: (v != versions).then_some(Timestamp(1_001 + u64::from(v))),
            disabled_at: None,
            destroyed_at: None,
        });
    }
    k.next_version = versions + 1;
    k
}

/// Runs every check on `store`, using keyring ids that start with `prefix`
/// (use a fresh prefix per run on persistent stores). Panics naming what broke.
pub async fn store_conformance(store: &dyn KeyringStore, prefix: &str) {
    let id = format!("{prefix}-a");
    assert!(
        store.load(&id).await.unwrap().is_none(),
        "load of a missing keyring must be None"
    );

    // Create: only when absent.
    let k0 = keyring(&id, 0);
    let r1 = store.save(&id, None, &k0).await.unwrap();
    let (rev, back) = store.load(&id).await.unwrap().unwrap();
    assert_eq!((rev, &back), (r1, &k0), "round trip after create");
    match store.save(&id, None, &k0).await {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("second create must conflict, got {other:?}"),
    }

    // Update: only from the current revision; revisions grow.
    let k1 = keyring(&id, 1);
    let r2 = store.save(&id, Some(r1), &k1).await.unwrap();
    assert!(r2 > r1, "revision must grow: {r1} -> {r2}");
    let k2 = keyring(&id, 2);
    match store.save(&id, Some(r1), &k2).await {
        Err(StoreError::Conflict {
            expected, found, ..
        }) => {
            assert_eq!(expected, Some(r1));
            assert_eq!(found, Some(r2));
        }
        other => panic!("stale save must conflict, got {other:?}"),
    }
    let (rev, back) = store.load(&id).await.unwrap().unwrap();
    assert_eq!((rev, &back), (r2, &k1), "a refused save changes nothing");
    match store.save(&id, Some(Revision(r2.0 + 100)), &k2).await {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("save from a future revision must conflict, got {other:?}"),
    }
    let missing = format!("{prefix}-missing");
    match store.save(&missing, Some(r1), &keyring(&missing, 1)).await {
        Err(StoreError::Conflict { found: None, .. }) => {}
        other => panic!("update of a missing keyring must conflict, got {other:?}"),
    }

    // Keyrings are independent.
    let other = format!("{prefix}-b");
    let rb = store.save(&other, None, &keyring(&other, 3)).await.unwrap();
    assert_eq!(store.load(&other).await.unwrap().unwrap().0, rb);
    assert_eq!(store.load(&id).await.unwrap().unwrap().1, k1);

    // Only one of many writers from the same revision wins.
    let r3 = store.save(&id, Some(r2), &k2).await.unwrap();
    let mut wins = 0;
    for n in 3..8 {
        if store.save(&id, Some(r3), &keyring(&id, n)).await.is_ok() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one writer from one revision wins");
}
