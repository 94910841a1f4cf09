//! The fleet bounds of docs/THREAT_MODEL.md "Many instances" on a manual
//! clock (tests/fleet.rs checks them on the real clock): a replica that only
//! decrypts stops using a version disabled elsewhere within max staleness +
//! cache TTL, and a wall clock stepped back does not freeze a view's age.

use keyfold_core::testkit::Unwatched;
use std::sync::Arc;
use std::time::Duration;

use keyfold_core::keyring::{KeyState, Keyring};
use keyfold_core::store::{KeyringStore, MemoryStore};
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{Actor, EncryptionContext, Error, LocalKek, SecretKey};

const STALENESS: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("row", "1")
}

async fn instance(
    store: Arc<dyn KeyringStore>,
    kek: &Arc<LocalKek>,
    clock: &ManualClock,
    create: bool,
) -> Keyring {
    let b = Keyring::builder("tenant-a", kek.clone(), store)
        .clock(Arc::new(clock.clone()))
        .max_staleness(STALENESS)
        .cache_ttl(TTL);
    if create {
        b.create().await
    } else {
        b.open().await
    }
    .unwrap()
}

struct Fleet {
    clock: ManualClock,
    writer: Keyring,
    reader: Keyring,
    record: Vec<u8>,
}

/// A writer that encrypted one record on v1, then rotated to v2, and a
/// reader that decrypted that record (so v1's key is in its cache).
async fn fleet(shared: Arc<MemoryStore>, reader_store: Arc<dyn KeyringStore>) -> Fleet {
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let clock = ManualClock::new(Timestamp(1_800_000_000));
    let writer = instance(shared, &kek, &clock, true).await;
    writer.rotate(&admin()).await.unwrap();
    let record = writer.encrypt(&ctx(), b"row one").await.unwrap();
    writer.rotate(&admin()).await.unwrap();
    let reader = instance(reader_store, &kek, &clock, false).await;
    assert_eq!(reader.decrypt(&ctx(), &record).await.unwrap(), b"row one");
    Fleet {
        clock,
        writer,
        reader,
        record,
    }
}

fn refused_as_disabled(r: Result<Vec<u8>, Error>) -> bool {
    matches!(
        r,
        Err(Error::KeyState {
            version: 1,
            state: KeyState::Disabled
        })
    )
}

#[tokio::test(start_paused = true)]
async fn a_read_only_replica_stops_decrypting_a_disabled_version_within_staleness_plus_ttl() {
    let shared = Arc::new(MemoryStore::new());
    let f = fleet(shared.clone(), Arc::new(Unwatched(shared))).await;
    f.writer.disable(1, &admin()).await.unwrap();

    // Within the bound the cached key may still be used...
    assert!(f.reader.decrypt(&ctx(), &f.record).await.is_ok());
    // ...but once the cached key's TTL and the view's max staleness have
    // both passed, a decrypt reloads and refuses, although this replica
    // never encrypts, rotates or refreshes by itself.
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    f.clock.advance(STALENESS + Duration::from_secs(1));
    assert!(refused_as_disabled(
        f.reader.decrypt(&ctx(), &f.record).await
    ));
    assert!(!f.reader.metadata().cached_versions.contains(&1));
}

#[tokio::test(start_paused = true)]
async fn a_cold_decrypt_judges_the_version_on_a_view_younger_than_max_staleness() {
    let shared = Arc::new(MemoryStore::new());
    let f = fleet(shared.clone(), Arc::new(Unwatched(shared))).await;
    // The key expires first; the view is not yet stale: the cold load may
    // still use the view, so the disable is not seen yet.
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    f.writer.disable(1, &admin()).await.unwrap();
    f.clock.advance(STALENESS + Duration::from_secs(1));
    // Stale view + cold key: reload first, then refuse.
    assert!(refused_as_disabled(
        f.reader.decrypt(&ctx(), &f.record).await
    ));
}

#[tokio::test(start_paused = true)]
async fn with_change_notifications_a_disable_reaches_a_reader_at_its_next_decrypt() {
    let shared = Arc::new(MemoryStore::new());
    let f = fleet(shared.clone(), shared).await;
    f.writer.disable(1, &admin()).await.unwrap();
    // No time passes: the notification alone makes the reader reload and
    // evict the cached key.
    assert!(refused_as_disabled(
        f.reader.decrypt(&ctx(), &f.record).await
    ));
    assert!(!f.reader.metadata().cached_versions.contains(&1));
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_stepped_back_does_not_freeze_the_view_age() {
    let shared = Arc::new(MemoryStore::new());
    let f = fleet(shared.clone(), Arc::new(Unwatched(shared))).await;
    // The reader's view shows v2 active. The writer rotates to v3, then the
    // reader's host steps its wall clock back an hour (NTP, VM restore).
    f.writer.rotate(&admin()).await.unwrap();
    let now = f.clock.now();
    f.clock.set(Timestamp(now.as_secs() - 3600));
    f.clock.advance(STALENESS + Duration::from_secs(1));
    // Measured on the wall clock the view would be an hour younger than
    // zero; on the monotonic clock it is past max staleness: reload.
    let record = f.reader.encrypt(&ctx(), b"x").await.unwrap();
    assert_eq!(
        keyfold_core::format::inspect(&record).unwrap().key_version,
        3
    );
}

/// Two `FileStore`s over one directory stand for two processes: the second
/// hears of the first's saves only through its directory poller.
#[tokio::test]
async fn a_file_store_tells_another_process_of_a_disable_by_polling() {
    use keyfold_core::store::{FILE_POLL_INTERVAL, FileStore};
    let mut bytes = [0u8; 8];
    keyfold_core::rng::fill(&mut bytes).unwrap();
    let dir = std::env::temp_dir().join(format!("keyfold-watch-{}", hex::encode(bytes)));
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let writer = Keyring::builder("t", kek.clone(), Arc::new(FileStore::new(&dir).unwrap()))
        .create()
        .await
        .unwrap();
    writer.rotate(&admin()).await.unwrap();
    let record = writer.encrypt(&ctx(), b"kept").await.unwrap();
    writer.rotate(&admin()).await.unwrap();
    // Max staleness and TTL far beyond the test: only a notification can
    // make the reader reload.
    let reader = Keyring::builder("t", kek, Arc::new(FileStore::new(&dir).unwrap()))
        .max_staleness(Duration::from_secs(3600))
        .cache_ttl(Duration::from_secs(3600))
        .open()
        .await
        .unwrap();
    assert_eq!(reader.decrypt(&ctx(), &record).await.unwrap(), b"kept");
    writer.disable(1, &admin()).await.unwrap();
    let deadline = std::time::Instant::now() + FILE_POLL_INTERVAL * 25;
    loop {
        match reader.decrypt(&ctx(), &record).await {
            Err(Error::KeyState {
                version: 1,
                state: KeyState::Disabled,
            }) => break,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(FILE_POLL_INTERVAL / 4).await;
            }
            other => panic!(
                "the reader never heard of the disable: {other:?} {:?}",
                reader.metadata().versions[0].state
            ),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
