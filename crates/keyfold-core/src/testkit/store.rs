//! The shared [`KeyringStore`] conformance checks: run them on a host's own
//! store (database table, object store...) as the shipped stores do.

use crate::keyring::store::{KeyringStore, Revision, StoreError};
use crate::keyring::time::Timestamp;
use crate::keyring::{KeyState, StoredKeyring, StoredVersion};
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
            destroy_scheduled_at: None,
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

    // Only one of many concurrent writers from the same revision wins.
    let r3 = store.save(&id, Some(r2), &k2).await.unwrap();
    let candidates: Vec<StoredKeyring> = (3..8).map(|n| keyring(&id, n)).collect();
    let [c3, c4, c5, c6, c7] = &candidates[..] else {
        unreachable!()
    };
    let results = tokio::join!(
        store.save(&id, Some(r3), c3),
        store.save(&id, Some(r3), c4),
        store.save(&id, Some(r3), c5),
        store.save(&id, Some(r3), c6),
        store.save(&id, Some(r3), c7),
    );
    let results = [results.0, results.1, results.2, results.3, results.4];
    let mut winner = None;
    for (n, r) in results.iter().enumerate() {
        match r {
            Ok(rev) => {
                assert!(winner.is_none(), "two concurrent writers won: {results:?}");
                winner = Some((*rev, n));
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("a losing concurrent save must conflict, got {e:?}"),
        }
    }
    let (r4, n) = winner.expect("exactly one writer from one revision wins");
    let (rev, back) = store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (rev, &back),
        (r4, &candidates[n]),
        "the winner's keyring is stored"
    );

    // What the keyring would refuse to load is never stored: another
    // keyring under this id, or a keyring breaking an invariant.
    match store.save(&id, Some(r4), &keyring(&other, 4)).await {
        Err(StoreError::Conflict { .. }) => {
            panic!("a foreign keyring must be refused, not conflict")
        }
        Err(_) => {}
        Ok(_) => panic!("a store must refuse to save keyring {other} under id {id}"),
    }
    let mut invalid = keyring(&id, 4);
    for v in &mut invalid.versions {
        v.state = KeyState::Active;
    }
    assert!(
        store.save(&id, Some(r4), &invalid).await.is_err(),
        "a store must refuse a keyring that breaks an invariant"
    );
    let mut schema_1 = keyring(&id, 4);
    schema_1.schema = 1;
    assert!(
        store.save(&id, Some(r4), &schema_1).await.is_err(),
        "a store must refuse a keyring of an unsupported schema"
    );
    let (rev, back) = store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (rev, &back),
        (r4, &candidates[n]),
        "refused saves change nothing"
    );
    for k in [&id, &other] {
        let (_, back) = store.load(k).await.unwrap().unwrap();
        assert_eq!(&back.keyring_id, k, "load returns the keyring asked for");
        back.validate().unwrap();
    }
}
