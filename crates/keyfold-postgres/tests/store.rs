//! PgKeyringStore against a real PostgreSQL server (KEYFOLD_PG_URL; see
//! tests/support).

mod support;

use std::time::Duration;

use keyfold_core::keyring::StoredKeyring;
use keyfold_core::store::StoreError;
use keyfold_core::time::Timestamp;
use keyfold_core::{KeyringStore, Revision, StoreEvent};
use keyfold_postgres::{PgKeyringStore, TablePrefix, migrate};
use sqlx::PgPool;
use support::TestDb;
use tokio::sync::broadcast;

async fn store_on(db: &TestDb, prefix: &str) -> (PgPool, PgKeyringStore) {
    let pool = db.pool().await;
    let prefix = TablePrefix::new(prefix).unwrap();
    migrate(&pool, &prefix).await.unwrap();
    (pool.clone(), PgKeyringStore::new(pool, prefix))
}

fn keyring(id: &str) -> StoredKeyring {
    StoredKeyring::new(id, Timestamp(1_000))
}

/// Waits (up to 30 s) until `n` listener connections of `db` are listening
/// (idle after their `LISTEN`: it takes effect when it commits, and the
/// query shows from when it starts).
async fn listeners_ready(db: &TestDb, n: i64) {
    let mut admin = db.admin().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1
             AND application_name = 'keyfold-postgres listener' AND query LIKE 'LISTEN%'
             AND state = 'idle'",
        )
        .bind(&db.name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if listening >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event matching `want`, or a panic once `within` has passed.
async fn expect_event(
    rx: &mut broadcast::Receiver<StoreEvent>,
    within: Duration,
    want: impl Fn(&StoreEvent) -> bool,
) -> StoreEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(event)) if want(&event) => return event,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("watch channel failed: {e}"),
            Err(_) => panic!("no matching event within {within:?}"),
        }
    }
}

#[tokio::test]
async fn harness_gives_each_test_its_own_database() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name, b.name);
    let pool = a.pool().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(db, a.name);
}

#[tokio::test]
async fn passes_the_store_conformance_suite() {
    let db = TestDb::new().await;
    let (_, store) = store_on(&db, "keyfold_").await;
    keyfold_core::testkit::store_conformance(&store, "conformance").await;
    // A second prefix in the same database is a separate store.
    let (_, other) = store_on(&db, "other_").await;
    keyfold_core::testkit::store_conformance(&other, "conformance").await;
    assert_eq!(
        store.list().await.unwrap(),
        ["conformance-a", "conformance-b"]
    );
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let db = TestDb::new().await;
    let pools = [db.pool().await, db.pool().await, db.pool().await];
    let prefix = TablePrefix::default();
    let runs = futures::future::join_all(pools.iter().map(|p| migrate(p, &prefix))).await;
    for r in runs {
        r.unwrap();
    }
    migrate(&pools[0], &prefix).await.unwrap();
    let steps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keyfold_migrations WHERE component IN ('store', 'audit')",
    )
    .fetch_one(&pools[0])
    .await
    .unwrap();
    assert_eq!(
        steps, 2,
        "the store's and the audit's steps are recorded once each"
    );
    let dup: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT component, version FROM keyfold_migrations
         GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&pools[0])
    .await
    .unwrap();
    assert_eq!(dup, 0);
}

#[tokio::test]
async fn concurrent_writers_on_several_pools_exactly_one_wins_each_revision() {
    let db = TestDb::new().await;
    let prefix = TablePrefix::default();
    let mut stores = Vec::new();
    for _ in 0..4 {
        let pool = db.pool_with(2).await;
        migrate(&pool, &prefix).await.unwrap();
        stores.push(PgKeyringStore::new(pool, prefix.clone()));
    }
    let id = "tenant-race";
    // Creation: exactly one of the four creates it.
    let first = keyring(id);
    let created = futures::future::join_all(stores.iter().map(|s| s.save(id, None, &first))).await;
    assert_eq!(
        created.iter().filter(|r| r.is_ok()).count(),
        1,
        "{created:?}"
    );
    let mut current = Revision(1);
    for round in 0..25u64 {
        let mut candidates = Vec::new();
        for n in 0..stores.len() {
            let mut k = keyring(id);
            k.created_at = Timestamp(10_000 + round * 10 + n as u64);
            candidates.push(k);
        }
        let results = futures::future::join_all(
            stores
                .iter()
                .zip(&candidates)
                .map(|(s, k)| s.save(id, Some(current), k)),
        )
        .await;
        let mut winner = None;
        for (n, r) in results.iter().enumerate() {
            match r {
                Ok(rev) => {
                    assert!(
                        winner.is_none(),
                        "two writers won round {round}: {results:?}"
                    );
                    winner = Some((n, *rev));
                }
                Err(StoreError::Conflict {
                    expected, found, ..
                }) => {
                    assert_eq!(*expected, Some(current));
                    assert!(found.is_some_and(|f| f > current), "{r:?}");
                }
                Err(e) => panic!("a losing writer must get a conflict, got {e:?}"),
            }
        }
        let (n, rev) = winner.expect("one writer wins each round");
        assert_eq!(rev, Revision(current.0 + 1));
        for s in &stores {
            let (r, k) = s.load(id).await.unwrap().unwrap();
            assert_eq!(
                (r, &k),
                (rev, &candidates[n]),
                "every pool reads the winner"
            );
        }
        current = rev;
    }
}

#[tokio::test]
async fn a_save_on_one_pool_notifies_a_watcher_on_another_within_a_second() {
    let db = TestDb::new().await;
    let (_, writer) = store_on(&db, "keyfold_").await;
    let (_, watcher) = store_on(&db, "keyfold_").await;
    let mut rx = watcher.watch().expect("PgKeyringStore can push changes");
    // A second subscriber joins the same listener.
    let mut rx2 = watcher.watch().unwrap();
    listeners_ready(&db, 1).await;

    let r1 = writer
        .save("tenant-1", None, &keyring("tenant-1"))
        .await
        .unwrap();
    let want = |e: &StoreEvent| {
        *e == StoreEvent::Changed {
            keyring_id: "tenant-1".into(),
        }
    };
    expect_event(&mut rx, Duration::from_secs(1), want).await;
    expect_event(&mut rx2, Duration::from_secs(1), want).await;
    writer
        .save("tenant-1", Some(r1), &keyring("tenant-1"))
        .await
        .unwrap();
    expect_event(&mut rx, Duration::from_secs(1), want).await;

    // A refused save notifies nothing; a later save's notification is the
    // next event.
    assert!(matches!(
        writer
            .save("tenant-1", Some(r1), &keyring("tenant-1"))
            .await,
        Err(StoreError::Conflict { .. })
    ));
    writer
        .save("tenant-2", None, &keyring("tenant-2"))
        .await
        .unwrap();
    let next = expect_event(&mut rx, Duration::from_secs(1), |_| true).await;
    assert_eq!(
        next,
        StoreEvent::Changed {
            keyring_id: "tenant-2".into()
        }
    );

    // Another prefix uses another channel.
    let (_, foreign) = store_on(&db, "other_").await;
    foreign
        .save("tenant-3", None, &keyring("tenant-3"))
        .await
        .unwrap();
    writer
        .save("tenant-4", None, &keyring("tenant-4"))
        .await
        .unwrap();
    let next = expect_event(&mut rx, Duration::from_secs(1), |_| true).await;
    assert_eq!(
        next,
        StoreEvent::Changed {
            keyring_id: "tenant-4".into()
        }
    );
}

#[tokio::test]
async fn a_killed_listener_connection_reconnects_and_sends_resync() {
    let db = TestDb::new().await;
    let (_, writer) = store_on(&db, "keyfold_").await;
    let (_, watcher) = store_on(&db, "keyfold_").await;
    let mut rx = watcher.watch().unwrap();
    listeners_ready(&db, 1).await;

    let mut admin = db.admin().await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'keyfold-postgres listener'",
    )
    .bind(&db.name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true], "exactly the one listener connection");

    expect_event(&mut rx, Duration::from_secs(30), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    // Resync comes after listening again: the next save is notified.
    writer
        .save("tenant-1", None, &keyring("tenant-1"))
        .await
        .unwrap();
    expect_event(&mut rx, Duration::from_secs(5), |e| {
        *e == StoreEvent::Changed {
            keyring_id: "tenant-1".into(),
        }
    })
    .await;
}

#[tokio::test]
async fn the_listener_stops_when_nobody_watches() {
    let db = TestDb::new().await;
    let (_, watcher) = store_on(&db, "keyfold_").await;
    let rx = watcher.watch().unwrap();
    listeners_ready(&db, 1).await;
    drop(rx);
    let mut admin = db.admin().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'keyfold-postgres listener'",
        )
        .bind(&db.name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if n == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener connection still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Watching again starts a new listener.
    let mut rx = watcher.watch().unwrap();
    listeners_ready(&db, 1).await;
    let (_, writer) = store_on(&db, "keyfold_").await;
    writer
        .save("tenant-1", None, &keyring("tenant-1"))
        .await
        .unwrap();
    expect_event(&mut rx, Duration::from_secs(5), |e| {
        matches!(e, StoreEvent::Changed { .. })
    })
    .await;
}

#[tokio::test]
async fn tampered_rows_and_bad_ids_are_typed_errors() {
    let db = TestDb::new().await;
    let (pool, store) = store_on(&db, "keyfold_").await;
    let r1 = store
        .save("tenant-1", None, &keyring("tenant-1"))
        .await
        .unwrap();
    assert_eq!(r1, Revision(1));

    // The revision column and the stored bytes disagree.
    sqlx::query("UPDATE keyfold_keyrings SET revision = 7 WHERE keyring_id = 'tenant-1'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        store.load("tenant-1").await,
        Err(StoreError::Corrupt { .. })
    ));
    // Bytes that are not a keyring.
    sqlx::query("UPDATE keyfold_keyrings SET keyring = '\\x00ff' WHERE keyring_id = 'tenant-1'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        store.load("tenant-1").await,
        Err(StoreError::Corrupt { .. })
    ));
    // Another keyring's bytes under this id.
    store
        .save("tenant-2", None, &keyring("tenant-2"))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE keyfold_keyrings SET keyring = (SELECT keyring FROM keyfold_keyrings
         WHERE keyring_id = 'tenant-2'), revision = 1 WHERE keyring_id = 'tenant-1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        store.load("tenant-1").await,
        Err(StoreError::Corrupt { .. })
    ));

    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a b",
        "x'; DROP TABLE keyfold_keyrings; --",
    ] {
        assert!(matches!(
            store.load(bad).await,
            Err(StoreError::InvalidId(_))
        ));
        assert!(matches!(
            store.save(bad, None, &keyring(bad)).await,
            Err(StoreError::InvalidId(_))
        ));
    }
    // An expected revision beyond what the table can hold is a conflict.
    assert!(matches!(
        store
            .save("tenant-2", Some(Revision(u64::MAX)), &keyring("tenant-2"))
            .await,
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn debug_never_shows_the_database_password() {
    let db = TestDb::new().await;
    let secret = "hunter2-do-not-print";
    let pool =
        sqlx::postgres::PgPoolOptions::new().connect_lazy_with(db.options.clone().password(secret));
    let store = PgKeyringStore::new(pool, TablePrefix::default());
    let _rx = store.watch();
    let shown = format!("{store:?} {:?}", store.prefix());
    assert!(!shown.contains(secret), "{shown}");
    assert!(shown.contains("keyfold_keyrings"), "{shown}");
}

/// The promise of the issue: a disable on one instance reaches another
/// within a second, with max staleness and the key cache's TTL an hour.
#[tokio::test]
async fn a_disable_on_one_instance_reaches_another_within_a_second() {
    use std::sync::Arc;

    use keyfold_core::keyring::{KeyState, Keyring};
    use keyfold_core::{Actor, EncryptionContext, Error, LocalKek, SecretKey};

    let db = TestDb::new().await;
    let (_, writer_store) = store_on(&db, "keyfold_").await;
    let (_, reader_store) = store_on(&db, "keyfold_").await;
    let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let admin = Actor::new("admin@example.com");
    let ctx = EncryptionContext::new().with("row", "1");

    let writer = Keyring::builder("tenant-a", kek.clone(), Arc::new(writer_store))
        .create()
        .await
        .unwrap();
    writer.rotate(&admin).await.unwrap();
    let record = writer.encrypt(&ctx, b"kept").await.unwrap();
    writer.rotate(&admin).await.unwrap();
    let reader = Keyring::builder("tenant-a", kek, Arc::new(reader_store))
        .max_staleness(Duration::from_secs(3600))
        .cache_ttl(Duration::from_secs(3600))
        .open()
        .await
        .unwrap();
    assert_eq!(reader.decrypt(&ctx, &record).await.unwrap(), b"kept");
    // The writer's keyring watches too: both listeners.
    listeners_ready(&db, 2).await;

    writer.disable(1, &admin).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match reader.decrypt(&ctx, &record).await {
            Err(Error::KeyState {
                version: 1,
                state: KeyState::Disabled,
            }) => break,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("the reader still decrypts a second after the disable: {other:?}"),
        }
    }
}

/// A TCP proxy to the server whose chosen connections can be frozen:
/// bytes stop flowing both ways and nothing is closed, as on a network that
/// drops packets.
struct FreezingProxy {
    port: u16,
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
    frozen: std::sync::Arc<std::sync::Mutex<Frozen>>,
}

/// Which connections the proxy silences.
#[derive(Default)]
struct Frozen {
    /// These, from now on.
    ids: std::ops::Range<u64>,
    /// The first connection with an id at or above this one to send
    /// `LISTEN`, from that message on (one connection, then disarmed).
    at_listen_from: Option<u64>,
}

impl Frozen {
    /// Whether connection `id`, about to pass `bytes` on, goes silent.
    fn silences(&mut self, id: u64, bytes: &[u8]) -> bool {
        if self.ids.contains(&id) {
            return true;
        }
        let listen = bytes.windows(6).any(|w| w == b"LISTEN");
        if listen && self.at_listen_from.is_some_and(|from| id >= from) {
            self.at_listen_from = None;
            self.ids = id..id + 1;
            return true;
        }
        false
    }
}

impl FreezingProxy {
    async fn start(host: String, port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = FreezingProxy {
            port: listener.local_addr().unwrap().port(),
            next_id: Default::default(),
            frozen: Default::default(),
        };
        let (next_id, frozen) = (proxy.next_id.clone(), proxy.frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect((host.as_str(), port)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, id, frozen.clone()));
                tokio::spawn(Self::pipe(sr, cw, id, frozen.clone()));
            }
        });
        proxy
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        id: u64,
        frozen: std::sync::Arc<std::sync::Mutex<Frozen>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.lock().unwrap().silences(id, &buf[..n]) {
                // Dropped on the floor, and the link stays open, silent.
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// A store on `db` whose connections all go through this proxy: its
    /// pool's one connection (the next id, made now) and its listener's,
    /// which checks its connection every `heartbeat`.
    async fn watcher(&self, db: &TestDb, heartbeat: Duration) -> PgKeyringStore {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(db.options.clone().port(self.port))
            .await
            .unwrap();
        let watcher = PgKeyringStore::new(pool, TablePrefix::default());
        watcher.set_listener_heartbeat(heartbeat);
        watcher
    }

    /// The id the next connection gets.
    fn next_id(&self) -> u64 {
        self.next_id.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Freezes the connections with these ids.
    fn freeze(&self, ids: std::ops::Range<u64>) {
        self.frozen.lock().unwrap().ids = ids;
    }

    /// Freezes the next connection that sends `LISTEN`, as it sends it:
    /// connected and authenticated, then silent.
    fn freeze_next_listen(&self) {
        self.frozen.lock().unwrap().at_listen_from = Some(self.next_id());
    }
}

#[tokio::test]
async fn a_silently_dead_listener_connection_is_found_by_the_heartbeat() {
    let db = TestDb::new().await;
    let (_, writer) = store_on(&db, "keyfold_").await;
    let proxy = FreezingProxy::start(db.options.get_host().to_owned(), db.options.get_port()).await;
    let watcher = proxy.watcher(&db, Duration::from_millis(100)).await;
    assert!(watcher.load("tenant-1").await.unwrap().is_none());
    let first_listener = proxy.next_id();
    let mut rx = watcher.watch().unwrap();
    listeners_ready(&db, 1).await;
    // Only the listener's connection goes silent: no error reaches it.
    proxy.freeze(first_listener..proxy.next_id());

    expect_event(&mut rx, Duration::from_secs(30), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    // Listening again on a new connection: the next save is notified.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut revision = None;
    loop {
        revision = Some(
            writer
                .save("tenant-1", revision, &keyring("tenant-1"))
                .await
                .unwrap(),
        );
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Ok(StoreEvent::Changed { keyring_id })) if keyring_id == "tenant-1" => break,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "no notification after the listener reconnected"
            ),
        }
    }
}

/// A reconnect whose connection goes silent while it asks to `LISTEN` is
/// given up and tried again: the listener never waits forever on it.
#[tokio::test]
async fn a_reconnect_that_goes_silent_while_listening_is_retried() {
    let db = TestDb::new().await;
    let proxy = FreezingProxy::start(db.options.get_host().to_owned(), db.options.get_port()).await;
    let watcher = proxy.watcher(&db, Duration::from_millis(300)).await;
    let first_listener = proxy.next_id();
    let mut rx = watcher.watch().unwrap();
    listeners_ready(&db, 1).await;
    // The listening connection goes silent (with any reconnect a slow
    // machine already began), and so does the next one, just as it sends
    // its LISTEN. A resync from before is not the one this test waits for.
    proxy.freeze_next_listen();
    let base = proxy.next_id();
    proxy.freeze(first_listener..base);
    while rx.try_recv().is_ok() {}

    expect_event(&mut rx, Duration::from_secs(30), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    assert!(
        proxy.next_id() >= base + 2,
        "the listener came back on its second reconnect, not before"
    );
}

/// `save_in` commits the keyring with the host's own writes, or not at all.
#[tokio::test]
async fn save_in_a_host_transaction_commits_or_rolls_back_with_it() {
    let db = TestDb::new().await;
    let (pool, store) = store_on(&db, "keyfold_").await;
    sqlx::raw_sql("CREATE TABLE host_config (tenant text PRIMARY KEY, config text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let mut watch = store.watch().expect("a watch inside a runtime");
    listeners_ready(&db, 1).await;

    // Rolled back: neither the host's row nor the keyring, and no event.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO host_config VALUES ('acme', 'first')")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        store
            .save_in(&mut tx, "acme", None, &keyring("acme"))
            .await
            .unwrap(),
        Revision(1)
    );
    tx.rollback().await.unwrap();
    assert!(store.load("acme").await.unwrap().is_none());
    let configs: i64 = sqlx::query_scalar("SELECT count(*) FROM host_config")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(configs, 0);

    // Committed: both, and the event.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO host_config VALUES ('acme', 'second')")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .save_in(&mut tx, "acme", None, &keyring("acme"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    expect_event(
        &mut watch,
        Duration::from_secs(5),
        |e| matches!(e, StoreEvent::Changed { keyring_id } if keyring_id == "acme"),
    )
    .await;
    assert_eq!(store.load("acme").await.unwrap().unwrap().0, Revision(1));

    // A conflict inside the transaction is the same typed error as `save`'s.
    let mut tx = pool.begin().await.unwrap();
    assert!(matches!(
        store.save_in(&mut tx, "acme", None, &keyring("acme")).await,
        Err(StoreError::Conflict {
            found: Some(Revision(1)),
            ..
        })
    ));
}
