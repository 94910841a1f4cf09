//! keyfold-rewrap on SQLite.
//!
//! ```text
//! cargo run -p keyfold-rewrap-sqlite -- demo [--rows N]   # the whole story, in a temp dir
//! rewrap-sqlite init DIR --rows N    # a database with two tables of encrypted rows, rotated to v2, a job created
//! rewrap-sqlite run DIR              # resume the job from its checkpoint and run it to the end
//! rewrap-sqlite verify DIR           # every row decrypts to its original plaintext, on the target version
//! rewrap-sqlite status DIR           # the persisted checkpoint's progress
//! ```
//!
//! `run` persists the job's checkpoint after every batch, so it can be killed
//! at any point and started again: `tests/crash.rs` does exactly that with
//! SIGKILL, many times over.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::FileStore;
use keyfold_core::{LocalKek, format};
use keyfold_rewrap::{Checkpoint, RewrapJob, RowSource};
use keyfold_rewrap_sqlite::store::{self, SqliteTable, TABLES, context};
use rusqlite::{Connection, params};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const TENANT: &str = "acme";

fn plaintext(table: &str, id: &str) -> String {
    let n: usize = id.parse().unwrap_or(0);
    format!("{table}/{id}: {}", "s".repeat(n % 300))
}

struct Env {
    conn: Arc<Mutex<Connection>>,
    keyring: Arc<Keyring>,
}

async fn open_env(dir: &Path, create: bool) -> Result<Env> {
    let kek_path = dir.join("kek.hex");
    if create {
        std::fs::create_dir_all(dir)?;
        std::fs::write(&kek_path, LocalKek::generate_hex()?.as_bytes())?;
    }
    let kek = LocalKek::from_file("rewrap-demo-kek", &kek_path)?;
    let builder = Keyring::builder(
        TENANT,
        Arc::new(kek),
        Arc::new(FileStore::new(dir.join("keyring"))?),
    );
    let keyring = if create {
        builder.create().await?
    } else {
        builder.open().await?
    };
    let conn = store::open(&dir.join("data.sqlite"))?;
    Ok(Env {
        conn: Arc::new(Mutex::new(conn)),
        keyring: Arc::new(keyring),
    })
}

fn sources(env: &Env) -> Vec<Arc<dyn RowSource>> {
    TABLES
        .iter()
        .map(|t| Arc::new(SqliteTable::new(env.conn.clone(), t)) as Arc<dyn RowSource>)
        .collect()
}

fn lock(env: &Env) -> Result<std::sync::MutexGuard<'_, Connection>> {
    env.conn
        .lock()
        .map_err(|_| "connection mutex poisoned".into())
}

fn save_checkpoint(env: &Env, checkpoint: &Checkpoint) -> Result<()> {
    lock(env)?.execute(
        "INSERT INTO rewrap_job (id, checkpoint) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET checkpoint = excluded.checkpoint",
        params![serde_json::to_string(checkpoint)?],
    )?;
    Ok(())
}

fn load_checkpoint(env: &Env) -> Result<Checkpoint> {
    let text: String =
        lock(env)?.query_row("SELECT checkpoint FROM rewrap_job WHERE id = 1", [], |r| {
            r.get(0)
        })?;
    Ok(serde_json::from_str(&text)?)
}

async fn init(dir: &Path, rows: usize) -> Result<()> {
    let env = open_env(dir, true).await?;
    let admin = Actor::new("demo-admin");
    let v1 = env.keyring.rotate(&admin).await?;
    for table in TABLES {
        let mut values = Vec::with_capacity(rows);
        for i in 0..rows {
            let id = format!("{i:08}");
            let ct = env
                .keyring
                .encrypt(
                    &context(TENANT, table, &id),
                    plaintext(table, &id).as_bytes(),
                )
                .await?;
            values.push((id, ct));
        }
        let mut conn = lock(&env)?;
        let tx = conn.transaction()?;
        for (id, ct) in values {
            tx.execute(
                &format!("INSERT INTO {table} (id, tenant, ciphertext) VALUES (?1, ?2, ?3)"),
                params![id, TENANT, ct],
            )?;
        }
        tx.commit()?;
    }
    println!(
        "{rows} rows in each of {TABLES:?}, encrypted under v{}",
        v1.version
    );
    let v2 = env.keyring.rotate(&admin).await?;
    let job = RewrapJob::builder(env.keyring.clone(), sources(&env)).create()?;
    save_checkpoint(&env, job.checkpoint())?;
    println!(
        "rotated to v{}; rewrap job {} created, target pinned to v{}",
        v2.version,
        job.checkpoint().job_id,
        job.target_version()
    );
    Ok(())
}

async fn run(dir: &Path, rotate_after: Option<u64>) -> Result<()> {
    let env = open_env(dir, false).await?;
    let checkpoint = load_checkpoint(&env)?;
    let mut job = RewrapJob::builder(env.keyring.clone(), sources(&env)).resume(checkpoint)?;
    if job.checkpoint().batches > 0 {
        println!(
            "resuming job {} after batch {}",
            job.checkpoint().job_id,
            job.checkpoint().batches
        );
    }
    let started = std::time::Instant::now();
    let rewrapped_before = job.checkpoint().totals().rewrapped;
    while let Some(report) = job.next_batch().await? {
        save_checkpoint(&env, job.checkpoint())?;
        let parts: Vec<String> = report
            .per_source
            .iter()
            .map(|(name, c)| format!("{name} +{}", c.rewrapped))
            .collect();
        let t = report.totals;
        println!(
            "batch {:>3}: {} | total {} rewrapped, {} skipped, {} conflicts, {} failed | {} left",
            report.batch,
            parts.join(", "),
            t.rewrapped,
            t.skipped,
            t.conflicts,
            t.failed,
            report
                .estimated_remaining
                .map_or("?".to_owned(), |n| n.to_string())
        );
        if Some(report.batch) == rotate_after {
            let r = env.keyring.rotate(&Actor::new("demo-admin")).await?;
            println!(
                "           rotated again mid-job: v{} is active; the job keeps writing v{}",
                r.version,
                job.target_version()
            );
        }
    }
    if let Some(done) = job.completion() {
        println!(
            "job {} complete: {} rewrapped, {} skipped, clean: {}",
            done.job_id,
            done.totals.rewrapped,
            done.totals.skipped,
            done.is_clean()
        );
    }
    // End to end: read, rewrap, verify, compare-and-set write, checkpoint.
    let elapsed = started.elapsed().as_secs_f64();
    let rows = job
        .checkpoint()
        .totals()
        .rewrapped
        .saturating_sub(rewrapped_before);
    if rows > 0 && elapsed > 0.0 {
        println!(
            "throughput: {rows} rows rewrapped in {elapsed:.2} s = {:.0} rows/s (this run)",
            rows as f64 / elapsed
        );
    }
    Ok(())
}

async fn verify(dir: &Path) -> Result<()> {
    let env = open_env(dir, false).await?;
    let target = load_checkpoint(&env)?.target_version;
    let mut count = 0usize;
    for table in TABLES {
        let rows: Vec<(String, Vec<u8>)> = {
            let conn = lock(&env)?;
            let mut stmt =
                conn.prepare(&format!("SELECT id, ciphertext FROM {table} ORDER BY id"))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        for (id, ct) in rows {
            let version = format::inspect(&ct)?.key_version;
            if version != target {
                return Err(format!("{table}/{id} is on v{version}, not v{target}").into());
            }
            let pt = env
                .keyring
                .decrypt(&context(TENANT, table, &id), &ct)
                .await?;
            if pt != plaintext(table, &id).as_bytes() {
                return Err(format!("{table}/{id} decrypts to the wrong plaintext").into());
            }
            count += 1;
        }
    }
    println!("verified: all {count} rows decrypt to their original plaintext on v{target}");
    Ok(())
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows = arg_value(&args, "--rows")
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(1000);
    let dir = |i: usize| -> Result<PathBuf> {
        args.get(i)
            .map(PathBuf::from)
            .ok_or_else(|| "missing DIR".into())
    };
    match args.first().map(String::as_str) {
        Some("init") => init(&dir(1)?, rows).await,
        Some("run") => run(&dir(1)?, None).await,
        Some("verify") => verify(&dir(1)?).await,
        Some("status") => {
            let env = open_env(&dir(1)?, false).await?;
            let cp = load_checkpoint(&env)?;
            println!(
                "batches {} rewrapped {} completed {}",
                cp.batches,
                cp.totals().rewrapped,
                cp.completed
            );
            Ok(())
        }
        Some("demo") | None => {
            let dir =
                std::env::temp_dir().join(format!("keyfold-rewrap-demo-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            init(&dir, rows).await?;
            run(&dir, Some(3)).await?;
            verify(&dir).await?;
            std::fs::remove_dir_all(&dir)?;
            Ok(())
        }
        Some(other) => {
            Err(format!("unknown command {other:?}: use demo, init, run, verify or status").into())
        }
    }
}
