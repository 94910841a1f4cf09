//! The distributed rewrap job against a real PostgreSQL server: several
//! workers read each row once; evidence only once every shard is done; a
//! dead worker's shard is resumed from its checkpoint; and four worker
//! processes killed with SIGKILL ten times over lose nothing.

mod rewrap;
mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyfold_core::audit::{Actor, AuditKind, RecordingSink};
use keyfold_core::keyring::{DestroyAuthorization, Keyring};
use keyfold_core::store::FileStore;
use keyfold_core::time::Clock;
use keyfold_core::{Error as CoreError, LocalKek};
use keyfold_postgres::{
    DistributedJobError, DistributedJobOptions, PgTable, RewrapCoordinator, TablePrefix,
};
use rewrap::*;
use sqlx::PgPool;
use support::TestDb;

fn job_options(shards: u32, batch: usize) -> DistributedJobOptions {
    let mut o = DistributedJobOptions::default();
    o.shards_per_source = shards;
    o.batch_size = batch;
    o
}

async fn coordinator(pool: &PgPool, clock: Arc<dyn Clock>) -> RewrapCoordinator {
    let c = RewrapCoordinator::new(pool.clone(), TablePrefix::default()).clock(clock);
    keyfold_postgres::migrate(pool, &TablePrefix::default())
        .await
        .unwrap();
    c
}

/// Per shard: (done, claims, rows_read, seen).
async fn shards(pool: &PgPool, job: &str) -> Vec<(bool, i32, i64, i64)> {
    sqlx::query_as(
        "SELECT done, claims, rows_read, seen FROM keyfold_rewrap_shards \
         WHERE job_id = $1 ORDER BY shard",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_read_each_row_once_and_the_evidence_destroys_the_old_version() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, clock) = keyring().await;
    let n = 4000i64;
    bigint_accounts(&pool, &ring, "alpha", &(1..=n).collect::<Vec<_>>()).await;
    let words: Vec<String> = (0..n).map(|i| format!("k{}", i * 7919 % 10007)).collect();
    text_accounts(&pool, &ring, "beta", &words).await;
    ring.rotate(&admin()).await.unwrap();
    let coord = coordinator(&pool, clock.clone()).await;
    let sources = [
        accounts_source(&pool, "alpha").await,
        accounts_source(&pool, "beta").await,
    ];
    let job = coord
        .create_job(&ring, &sources, &job_options(8, 100))
        .await
        .unwrap();
    assert!(coord.completion(&job).await.unwrap().is_none());

    let mut tasks = Vec::new();
    for w in 0..4 {
        // Each worker its own pool and tables, as separate processes have.
        let pool = db.pool_with(2).await;
        let tables = vec![
            accounts_source(&pool, "alpha").await,
            accounts_source(&pool, "beta").await,
        ];
        let worker = coord
            .worker(&job, ring.clone(), tables)
            .name(format!("w{w}"))
            .poll_interval(Duration::from_millis(20));
        tasks.push(tokio::spawn(async move { worker.run().await.unwrap() }));
    }
    let mut read_by_workers = 0;
    let mut finished = 0;
    for t in tasks {
        let report = t.await.unwrap();
        read_by_workers += report.rows_read;
        finished += report.shards_finished;
    }
    let status = coord.status(&job).await.unwrap();
    let rows = 2 * n as u64;
    assert!(status.completed, "{status:?}");
    assert_eq!(finished, status.shards);
    assert_eq!((status.shards, status.shards_done), (16, 16));
    assert_eq!(status.rows_total, rows);
    assert_eq!(status.totals.rewrapped, rows);
    assert_eq!(status.totals.failed + status.totals.unresolved, 0);
    // Rows read per row rewrapped: 1.0, counted by the workers' tables
    // and recorded in the shard table.
    assert_eq!(read_by_workers, rows);
    assert_eq!(status.rows_read, rows);
    assert_eq!(
        status.rows_read as f64 / status.totals.rewrapped as f64,
        1.0
    );
    assert!(status.rows_per_second > 0.0, "{status:?}");
    assert!(shards(&pool, &job).await.iter().all(|s| s.0 && s.1 == 1));
    assert_eq!(versions(&pool, "alpha").await, [(2, n as usize)].into());
    assert_eq!(versions(&pool, "beta").await, [(2, n as usize)].into());
    assert_decrypt(&pool, &ring, "alpha", |id| plaintext("alpha", id)).await;
    assert_decrypt(&pool, &ring, "beta", |id| plaintext("beta", id)).await;

    // The evidence covers every shard; gathered before the disable, it
    // does not authorize the destroy; a verification pass after it does.
    let first = coord.completion(&job).await.unwrap().unwrap();
    assert_eq!(first.totals.seen, rows);
    let early = first.evidence(1).unwrap();
    ring.disable(1, &admin()).await.unwrap();
    clock.advance(Duration::from_secs(2));
    assert!(matches!(
        ring.destroy(1, DestroyAuthorization::Evidence(early), &admin())
            .await,
        Err(CoreError::DestroyRefused { .. })
    ));
    let check = coord
        .create_job(&ring, &sources, &job_options(2, 500))
        .await
        .unwrap();
    let report = coord
        .worker(&check, ring.clone(), sources.to_vec())
        .run()
        .await
        .unwrap();
    assert_eq!(
        (report.counters.skipped, report.counters.rewrapped),
        (rows, 0)
    );
    let evidence = coord
        .completion(&check)
        .await
        .unwrap()
        .unwrap()
        .evidence(1)
        .unwrap();
    assert_eq!(evidence.keyring_id, "tenant");
    ring.destroy(1, DestroyAuthorization::Evidence(evidence), &admin())
        .await
        .unwrap();
}

#[tokio::test]
async fn no_evidence_until_every_shard_is_done() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, clock) = keyring().await;
    bigint_accounts(&pool, &ring, "alpha", &(1..=1000).collect::<Vec<_>>()).await;
    ring.rotate(&admin()).await.unwrap();
    let audit = Arc::new(RecordingSink::default());
    let coord = coordinator(&pool, clock)
        .await
        .audit(audit.clone(), Actor::new("rewrap-operator"));
    let table = accounts_source(&pool, "alpha").await;
    let job = coord
        .create_job(&ring, std::slice::from_ref(&table), &job_options(4, 64))
        .await
        .unwrap();
    let first = coord
        .worker(&job, ring.clone(), vec![table.clone()])
        .max_shards(3)
        .run()
        .await
        .unwrap();
    assert_eq!(first.shards_finished, 3);
    let status = coord.status(&job).await.unwrap();
    assert_eq!((status.shards, status.shards_done), (4, 3));
    assert!(!status.completed);
    assert!(coord.completion(&job).await.unwrap().is_none());
    // Three shards' rows only: the fourth's were never fetched.
    assert!(
        first.rows_read < 1000 && first.rows_read >= 700,
        "{first:?}"
    );
    assert_eq!(
        versions(&pool, "alpha").await.get(&1),
        Some(&(1000 - first.rows_read as usize))
    );

    let second = coord
        .worker(&job, ring.clone(), vec![table])
        .run()
        .await
        .unwrap();
    assert_eq!(second.shards_finished, 1);
    assert_eq!(first.rows_read + second.rows_read, 1000);
    let done = coord.completion(&job).await.unwrap().unwrap();
    assert_eq!(done.totals.rewrapped, 1000);
    assert!(done.evidence(1).is_some());
    assert!(done.evidence(2).is_none(), "not older than the target");
    // One started and one completed event for the job, with all shards' totals.
    let events = audit.events();
    assert_eq!(
        audit.names(),
        ["kms.rewrap.started", "kms.rewrap.completed"]
    );
    assert!(
        events
            .iter()
            .all(|e| e.keyring_id == "tenant" && e.actor.0 == "rewrap-operator")
    );
    assert!(matches!(
        &events[1].kind,
        AuditKind::RewrapCompleted { job_id, target_version: 2, rewrapped: 1000, skipped: 0, failed: 0 }
            if *job_id == job
    ));
}

/// The application name of the worker the takeover test kills.
const DOOMED: &str = "keyfold-test doomed worker";

/// Waits (up to 30 s) until no connection named `application` is left on
/// `db`: a statement its client sent before dying may still commit, and a
/// server process ends only after what was sent before the close.
async fn connections_gone(db: &TestDb, application: &str) {
    let mut admin = db.admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
        )
        .bind(&db.name)
        .bind(application)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if running == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "a connection never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_shard_is_taken_over_and_resumed_from_its_checkpoint() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, clock) = keyring().await;
    let n = 6000;
    bigint_accounts(&pool, &ring, "alpha", &(1..=n).collect::<Vec<_>>()).await;
    ring.rotate(&admin()).await.unwrap();
    let coord = coordinator(&pool, clock).await;
    let table = accounts_source(&pool, "alpha").await;
    let mut options = job_options(1, 50);
    // Long enough that a slow batch never lets the lease lapse under the
    // first worker; each worker runs one lane, so the one shard is claimed
    // exactly twice: by the first worker, then by the heir.
    options.shard_lease = Duration::from_secs(2);
    let job = coord
        .create_job(&ring, std::slice::from_ref(&table), &options)
        .await
        .unwrap();
    // Its own application name: the test waits below until its
    // connections are gone from the server.
    let doomed_pool = sqlx::postgres::PgPoolOptions::new()
        .connect_with(db.options.clone().application_name(DOOMED))
        .await
        .unwrap();
    let doomed = {
        let worker = coord
            .worker(
                &job,
                ring.clone(),
                vec![accounts_source(&doomed_pool, "alpha").await],
            )
            .lanes(1)
            // Checkpoints well before the shard is done (the default, 500
            // ms, can be the whole shard's time).
            .checkpoint_interval(Duration::from_millis(20));
        tokio::spawn(async move { worker.run().await })
    };
    // Dies (without releasing its lease) once it checkpointed a batch.
    let deadline = Instant::now() + Duration::from_secs(120);
    while coord.status(&job).await.unwrap().totals.seen == 0 {
        assert!(
            Instant::now() < deadline,
            "the first worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());
    // Its lanes (tasks of their own) died with it: no row moves any more
    // (once its connections are gone from the server, with whatever they
    // had sent).
    drop(doomed_pool);
    connections_gone(&db, DOOMED).await;
    let moved = versions(&pool, "alpha").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        versions(&pool, "alpha").await,
        moved,
        "an aborted worker's lanes kept working"
    );
    let saved = coord.status(&job).await.unwrap().totals.seen;
    assert!(
        saved < n as u64,
        "the first worker finished before it was killed"
    );

    let heir = coord
        .worker(&job, ring.clone(), vec![table])
        .lanes(1)
        .poll_interval(Duration::from_millis(20))
        .run()
        .await
        .unwrap();
    assert_eq!(heir.shards_finished, 1);
    // It resumed from the checkpoint: it read only what was left (a batch
    // the first worker had not checkpointed is read again).
    assert!(heir.rows_read < n as u64, "{heir:?}");
    let status = coord.status(&job).await.unwrap();
    assert!(status.completed);
    assert_eq!(status.totals.seen, n as u64);
    assert_eq!(status.totals.rewrapped + status.totals.skipped, n as u64);
    assert_eq!(shards(&pool, &job).await[0].1, 2, "claimed twice");
    assert_eq!(versions(&pool, "alpha").await, [(2, n as usize)].into());
    assert!(
        coord
            .completion(&job)
            .await
            .unwrap()
            .unwrap()
            .evidence(1)
            .is_some()
    );
}

#[tokio::test]
async fn bad_job_options_and_unknown_jobs_are_typed_errors() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, clock) = keyring().await;
    bigint_accounts(&pool, &ring, "alpha", &[1, 2, 3]).await;
    let coord = coordinator(&pool, clock).await;
    let table = accounts_source(&pool, "alpha").await;
    assert!(matches!(
        coord.create_job(&ring, &[], &job_options(2, 10)).await,
        Err(DistributedJobError::NoSources)
    ));
    assert!(matches!(
        coord
            .create_job(&ring, &[table.clone(), table.clone()], &job_options(2, 10))
            .await,
        Err(DistributedJobError::DuplicateSource(_))
    ));
    assert!(matches!(
        coord
            .create_job(&ring, std::slice::from_ref(&table), &job_options(0, 10))
            .await,
        Err(DistributedJobError::InvalidOption(_))
    ));
    assert!(matches!(
        coord
            .create_job(&ring, std::slice::from_ref(&table), &job_options(2, 0))
            .await,
        Err(DistributedJobError::InvalidOption(_))
    ));
    assert!(matches!(
        coord.status("nope").await,
        Err(DistributedJobError::UnknownJob(_))
    ));
    // A worker without a table for one of the job's sources.
    let job = coord
        .create_job(&ring, std::slice::from_ref(&table), &job_options(1, 10))
        .await
        .unwrap();
    let other = PgTable::builder("alpha")
        .id_column("id")
        .ciphertext_column("secret")
        .source_name("elsewhere")
        .build(&pool)
        .await
        .unwrap();
    assert!(matches!(
        coord.worker(&job, ring.clone(), vec![other]).run().await,
        Err(DistributedJobError::UnknownSource(s)) if s == "public.alpha"
    ));
    // The shard was released: a proper worker takes it at once.
    coord
        .worker(&job, ring.clone(), vec![table])
        .run()
        .await
        .unwrap();
    assert!(coord.status(&job).await.unwrap().completed);
}

// ---------------------------------------------------------------------------
// Crash safety with real processes.

const WORKER: &str = env!("CARGO_BIN_EXE_keyfold-pg-worker");

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn spawn_worker(spec: &std::path::Path, log: &std::path::Path) -> Child {
    Command::new(WORKER)
        .arg(spec)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .expect("spawn keyfold-pg-worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_worker_processes_killed_ten_times_lose_nothing() {
    let seed = std::env::var("KEYFOLD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("seed {seed} (set KEYFOLD_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let db = TestDb::new().await;
    let pool = db.pool_with(4).await;
    let dir = std::env::temp_dir().join(format!("keyfold-pg-crash-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kek_file = dir.join("kek.hex");
    std::fs::write(&kek_file, LocalKek::generate_hex().unwrap().as_bytes()).unwrap();
    let ring = Arc::new(
        Keyring::builder(
            "tenant",
            Arc::new(LocalKek::from_file("kek", &kek_file).unwrap()),
            Arc::new(FileStore::new(dir.join("keyring")).unwrap()),
        )
        .create()
        .await
        .unwrap(),
    );
    let admin = Actor::new("test-admin");
    ring.rotate(&admin).await.unwrap();

    // 200,000 rows in two tables: bigint ids and text ids.
    let n = 100_000i64;
    bigint_accounts(&pool, &ring, "alpha", &(1..=n).collect::<Vec<_>>()).await;
    let words: Vec<String> = (0..n)
        .map(|i| format!("id-{:x}", i * 2_654_435_761 % 1_000_003))
        .collect();
    text_accounts(&pool, &ring, "beta", &words).await;
    ring.rotate(&admin).await.unwrap();

    let coord = RewrapCoordinator::new(pool.clone(), TablePrefix::default());
    keyfold_postgres::migrate(&pool, &TablePrefix::default())
        .await
        .unwrap();
    let sources = [
        accounts_source(&pool, "alpha").await,
        accounts_source(&pool, "beta").await,
    ];
    let mut options = job_options(8, 500);
    options.shard_lease = Duration::from_secs(1);
    let job = coord.create_job(&ring, &sources, &options).await.unwrap();

    let table_spec = |name: &str| {
        serde_json::json!({
            "table": name, "id": "id", "ciphertext": "secret",
            "context": [
                {"column": "id", "key": "row"},
                {"column": "tenant", "key": "tenant"},
                {"column": "region", "key": "region", "on_null": "omit"}
            ],
            "constants": {"table": name}
        })
    };
    let db_url = {
        let base = support::server_url();
        let base = base.split('?').next().unwrap();
        let (head, _) = base.rsplit_once('/').unwrap();
        format!("{head}/{}", db.name)
    };
    let spec = dir.join("worker.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&serde_json::json!({
            "database_url": db_url,
            "keyring_id": "tenant",
            "keyring_dir": dir.join("keyring"),
            "kek_id": "kek",
            "kek_file": kek_file,
            "job_id": job,
            "poll_ms": 50,
            "tables": [table_spec("alpha"), table_spec("beta")],
        }))
        .unwrap(),
    )
    .unwrap();
    let log = dir.join("workers.log");

    // The application keeps writing while the workers run and die.
    let app = {
        let (pool, ring) = (pool.clone(), ring.clone());
        tokio::spawn(async move {
            let mut last: HashMap<(bool, String), String> = HashMap::new();
            let mut x = seed | 1;
            for k in 0..1500u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let alpha = x.is_multiple_of(2);
                let i = (x >> 1) % n as u64;
                let text = format!("app update {k}");
                if alpha {
                    let i = i as i64 + 1;
                    let id = i.to_string();
                    let ctx = account_context("alpha", &id, &tenant_of(i), region_of(i).as_deref());
                    let ct = ring.encrypt(&ctx, text.as_bytes()).await.unwrap();
                    sqlx::query("UPDATE alpha SET secret = $2 WHERE id = $1")
                        .bind(i)
                        .bind(ct)
                        .execute(&pool)
                        .await
                        .unwrap();
                    last.insert((true, id), text);
                } else {
                    let id = format!("id-{:x}", i as i64 * 2_654_435_761 % 1_000_003);
                    let ctx = account_context("beta", &id, "t-text", None);
                    let ct = ring.encrypt(&ctx, text.as_bytes()).await.unwrap();
                    sqlx::query("UPDATE beta SET secret = $2 WHERE id = $1")
                        .bind(&id)
                        .bind(ct)
                        .execute(&pool)
                        .await
                        .unwrap();
                    last.insert((false, id), text);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            last
        })
    };

    let mut workers: Vec<Child> = (0..4).map(|_| spawn_worker(&spec, &log)).collect();
    let mut kills = 0;
    let mut none_before_done = 0;
    while kills < 10 {
        // Short enough that ten kills land before even a fast machine
        // finishes 200,000 rows (a worker takes ~100 ms to start).
        tokio::time::sleep(Duration::from_millis(20 + rng.below(230))).await;
        let victim = rng.below(4) as usize;
        if let Some(status) = workers[victim].try_wait().unwrap() {
            // It finished: the job is done before ten kills.
            assert!(
                status.success(),
                "a worker failed: {}",
                std::fs::read_to_string(&log).unwrap()
            );
            break;
        }
        workers[victim].kill().unwrap(); // SIGKILL
        workers[victim].wait().unwrap();
        kills += 1;
        // Evidence only when every shard is done (completion read first:
        // shards only ever become done).
        let completion = coord.completion(&job).await.unwrap();
        let status = coord.status(&job).await.unwrap();
        match completion {
            Some(_) => assert!(status.completed, "{status:?}"),
            None => none_before_done += 1,
        }
        workers[victim] = spawn_worker(&spec, &log);
    }
    assert!(
        none_before_done > 0,
        "no completion check ran while shards were left"
    );
    assert_eq!(
        kills, 10,
        "the job finished after {kills} kills: make it bigger"
    );
    let deadline = Instant::now() + Duration::from_secs(900);
    for w in &mut workers {
        loop {
            if let Some(status) = w.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "a worker failed: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "workers still running after 15 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let last = app.await.unwrap();

    // No shard left behind; every row on v2, decrypting to what was last
    // written; the evidence exists now, and covers all shards.
    let status = coord.status(&job).await.unwrap();
    println!("{kills} kills; {status:?}");
    assert!(status.completed && status.failed.is_none(), "{status:?}");
    assert_eq!(status.shards_done, status.shards);
    let per_shard = shards(&pool, &job).await;
    assert_eq!(per_shard.len() as u64, status.shards);
    assert!(per_shard.iter().all(|s| s.0));
    let checkpoints: Vec<(String,)> =
        sqlx::query_as("SELECT checkpoint::text FROM keyfold_rewrap_checkpoints WHERE job_id = $1")
            .bind(&job)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(checkpoints.len() as u64, status.shards);
    for (cp,) in &checkpoints {
        let cp: keyfold_rewrap::Checkpoint = serde_json::from_str(cp).unwrap();
        assert!(cp.completed && cp.sources.iter().all(|s| s.exhausted));
    }
    assert!(status.totals.seen >= 2 * n as u64);
    assert_eq!(status.totals.failed + status.totals.unresolved, 0);
    assert_eq!(versions(&pool, "alpha").await, [(2, n as usize)].into());
    assert_eq!(versions(&pool, "beta").await, [(2, n as usize)].into());
    assert_decrypt(&pool, &ring, "alpha", |id| {
        last.get(&(true, id.to_owned()))
            .cloned()
            .unwrap_or_else(|| plaintext("alpha", id))
    })
    .await;
    assert_decrypt(&pool, &ring, "beta", |id| {
        last.get(&(false, id.to_owned()))
            .cloned()
            .unwrap_or_else(|| plaintext("beta", id))
    })
    .await;
    let done = coord.completion(&job).await.unwrap().unwrap();
    assert!(done.evidence(1).is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}
