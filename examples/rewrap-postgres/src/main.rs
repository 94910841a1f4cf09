//! keyfold's distributed rewrap job on PostgreSQL (`keyfold-postgres`).
//!
//! ```text
//! eval "$(scripts/setup-postgres)"     # a throwaway cluster; prints KEYFOLD_PG_URL
//! cargo run --release -p keyfold-rewrap-postgres -- demo  [--rows N] [--workers W]
//! cargo run --release -p keyfold-rewrap-postgres -- bench [--rows N] [--workers 1,2,4] [--lanes L] [--batch B] [--repeat R] [--verify decrypt,header]
//! cargo run --release -p keyfold-rewrap-postgres -- profile [--rows N] [--batch B] [--passes P]
//! cargo run --release -p keyfold-rewrap-postgres -- propagation [--rounds N]
//!     [--max-staleness-ms MS] [--cache-ttl-ms MS] [--poll-us US] [--only notify|poll]
//! scripts/setup-postgres stop
//! ```
//!
//! All work in a scratch database they create on the server of
//! `KEYFOLD_PG_URL` and drop at the end.
//!
//! - `demo`: a table of encrypted rows (default 200,000) under version 1,
//!   a rotation to version 2, then one distributed job run by W workers
//!   (default 4) with a progress line read from the job's tables; then every
//!   row is checked and the completion report shown.
//! - `bench`: over N rows (default 1,000,000), for each worker count, the
//!   rewrap job's throughput beside the same batched reads and
//!   compare-and-swap `UPDATE`s carrying no crypto (the database's limit),
//!   and the rows read per row rewrapped; `--verify decrypt,header` runs
//!   the job once per verification (`keyfold_rewrap::Verify`) against the
//!   same baseline. Figures in BENCHMARKS.md.
//! - `profile`: where one stream's time goes per batch (src/profile.rs).
//! - `propagation`: how long a disable on one instance takes to reach
//!   another (src/propagation.rs), with `LISTEN`/`NOTIFY` and without
//!   (defaults: 100 rounds each, max staleness 2 s, the cache's default
//!   TTL of 5 minutes).
//!   Figures in BENCHMARKS.md.

mod cpu;
mod profile;
mod propagation;

use std::collections::VecDeque;
use std::error::Error;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::MemoryStore;
use keyfold_core::{EncryptionContext, LocalKek, SecretKey, format};
use keyfold_postgres::{
    DistributedJobOptions, IdRange, JobStatus, PgTable, RewrapCoordinator, TablePrefix,
};
use keyfold_rewrap::{CasOutcome, CasWrite, RowSource, Verify};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const TABLE: &str = "accounts";
/// Shards a worker works at once by default (`RewrapWorker::lanes`'s
/// default).
const LANES: usize = 2;

fn context(id: &str, tenant: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("table", TABLE)
        .with("row", id)
        .with("tenant", tenant)
}

fn plaintext(id: i64) -> String {
    format!("account {id}: iban DE{:020}", id.wrapping_mul(7_919))
}

/// A scratch database on the server of `KEYFOLD_PG_URL`, dropped by
/// [`Scratch::drop_now`].
struct Scratch {
    server: PgConnectOptions,
    name: String,
    options: PgConnectOptions,
}

impl Scratch {
    async fn create() -> Result<Scratch> {
        let url = std::env::var("KEYFOLD_PG_URL").map_err(|_| {
            "KEYFOLD_PG_URL is not set: start a throwaway PostgreSQL cluster with \
             `eval \"$(scripts/setup-postgres)\"` (from the repository root), or export \
             KEYFOLD_PG_URL=postgres://USER@HOST:PORT/DB naming a server where this demo may \
             create and drop a database"
        })?;
        let server: PgConnectOptions = url.parse()?;
        let server = server.disable_statement_logging();
        let name = format!("keyfold_rewrap_demo_{}", std::process::id());
        let mut admin = server.connect().await?;
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        Ok(Scratch {
            options: server.clone().database(&name),
            server,
            name,
        })
    }

    async fn pool(&self, max: u32) -> Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(max)
            .connect_with(self.options.clone())
            .await?)
    }

    async fn drop_now(self) -> Result<()> {
        let mut admin = self.server.connect().await?;
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

async fn keyring() -> Result<Arc<Keyring>> {
    let ring = Keyring::builder(
        "demo-tenant",
        Arc::new(LocalKek::from_bytes("demo-kek", SecretKey::generate()?)),
        Arc::new(MemoryStore::new()),
    )
    .create()
    .await?;
    ring.rotate(&Actor::new("demo-admin")).await?;
    Ok(Arc::new(ring))
}

/// A scratch database with `rows` rows filled under one version, a copy of
/// the table as filled (`<table>_v1`, to put it back between passes), and
/// the keyring rotated since: every row is due for a rewrap.
async fn rotated_table(rows: i64) -> Result<(Scratch, PgPool, Arc<Keyring>)> {
    let scratch = Scratch::create().await?;
    let pool = scratch.pool(4).await?;
    keyfold_postgres::migrate(&pool, &TablePrefix::default()).await?;
    let ring = keyring().await?;
    fill(&pool, &ring, rows).await?;
    sqlx::raw_sql(&format!("CREATE TABLE {TABLE}_v1 AS SELECT * FROM {TABLE}"))
        .execute(&pool)
        .await?;
    ring.rotate(&Actor::new("demo-admin")).await?;
    Ok((scratch, pool, ring))
}

/// `accounts (id bigint PRIMARY KEY, tenant text, secret bytea)` with `rows`
/// rows encrypted under the keyring's active version.
async fn fill(pool: &PgPool, ring: &Keyring, rows: i64) -> Result<()> {
    sqlx::raw_sql(&format!(
        "CREATE TABLE {TABLE} (id bigint PRIMARY KEY, tenant text NOT NULL, secret bytea NOT NULL)"
    ))
    .execute(pool)
    .await?;
    let started = Instant::now();
    let mut id = 1;
    while id <= rows {
        let end = (id + 20_000).min(rows + 1);
        let ids: Vec<i64> = (id..end).collect();
        let mut tenants = Vec::with_capacity(ids.len());
        let mut secrets = Vec::with_capacity(ids.len());
        for &i in &ids {
            let tenant = format!("tenant-{}", i % 50);
            secrets.push(
                ring.encrypt(&context(&i.to_string(), &tenant), plaintext(i).as_bytes())
                    .await?,
            );
            tenants.push(tenant);
        }
        sqlx::query(&format!(
            "INSERT INTO {TABLE} (id, tenant, secret) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[])"
        ))
        .bind(&ids)
        .bind(&tenants)
        .bind(&secrets)
        .execute(pool)
        .await?;
        id = end;
    }
    sqlx::raw_sql(&format!("ANALYZE {TABLE}"))
        .execute(pool)
        .await?;
    println!(
        "{rows} rows encrypted under v1 and inserted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn source(pool: &PgPool) -> Result<PgTable> {
    Ok(PgTable::builder(TABLE)
        .id_column("id")
        .ciphertext_column("secret")
        .context_column("id", "row")
        .context_column("tenant", "tenant")
        .context_constant("table", TABLE)
        .build(pool)
        .await?)
}

fn progress_line(s: &JobStatus) -> String {
    let pct = if s.rows_total == 0 {
        100.0
    } else {
        100.0 * s.totals.seen as f64 / s.rows_total as f64
    };
    let ratio = if s.totals.rewrapped == 0 {
        0.0
    } else {
        s.rows_read as f64 / (s.totals.rewrapped + s.totals.skipped) as f64
    };
    format!(
        "{pct:5.1}% | {}/{} rows | shards {}/{} done, {} leased | {:.0} rows/s | rows read per row moved {ratio:.2}",
        s.totals.seen, s.rows_total, s.shards_done, s.shards, s.shards_leased, s.rows_per_second
    )
}

/// How a distributed job is run: by how many workers, each working how
/// many shards at once, in batches of how many rows, verifying how.
#[derive(Debug, Clone, Copy)]
struct Shape {
    workers: usize,
    lanes: usize,
    batch: usize,
    verify: Verify,
}

/// Runs a distributed job with `workers` workers (each its own pool, as
/// separate processes would have); prints a progress line when asked.
async fn rewrap(
    scratch: &Scratch,
    pool: &PgPool,
    ring: &Arc<Keyring>,
    shape: Shape,
    progress: bool,
) -> Result<(Duration, JobStatus)> {
    let Shape {
        workers,
        lanes,
        batch,
        verify,
    } = shape;
    let coordinator = RewrapCoordinator::new(pool.clone(), TablePrefix::default());
    let mut options = DistributedJobOptions::default();
    options.shards_per_source = 16;
    options.batch_size = batch;
    let job = coordinator
        .create_job(ring, &[source(pool).await?], &options)
        .await?;
    let mut tasks = Vec::new();
    let started = Instant::now();
    for w in 0..workers {
        // One connection per lane, as a worker process would size its pool.
        let wpool = scratch.pool(u32::try_from(lanes)?).await?;
        let worker = coordinator
            .worker(&job, ring.clone(), vec![source(&wpool).await?])
            .name(format!("worker-{w}"))
            .lanes(lanes)
            .verify(verify)
            .poll_interval(Duration::from_millis(50));
        tasks.push(tokio::spawn(async move { worker.run().await }));
    }
    let watcher = progress.then(|| {
        let (coordinator, job) = (coordinator.clone(), job.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Ok(s) = coordinator.status(&job).await {
                    print!("\r{}", progress_line(&s));
                    let _ = std::io::stdout().flush();
                }
            }
        })
    });
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    if let Some(w) = watcher {
        w.abort();
    }
    let status = coordinator.status(&job).await?;
    if progress {
        println!("\r{}", progress_line(&status));
    }
    Ok((elapsed, status))
}

/// The same reads and batched compare-and-swap `UPDATE`s as the job (same
/// ranges, same statements, `streams` at once), with no crypto: each
/// ciphertext is written back with its last byte flipped.
async fn baseline(
    scratch: &Scratch,
    pool: &PgPool,
    streams: usize,
    batch: usize,
) -> Result<Duration> {
    let ranges: VecDeque<IdRange> = source(pool).await?.split(16).await?.into();
    let queue = Arc::new(Mutex::new(ranges));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let table = source(&scratch.pool(1).await?).await?;
        let queue = Arc::clone(&queue);
        tasks.push(tokio::spawn(async move {
            let mut moved = 0u64;
            loop {
                let next = queue.lock().map_err(|_| "queue poisoned")?.pop_front();
                let Some(range) = next else {
                    return Ok::<u64, Box<dyn Error + Send + Sync>>(moved);
                };
                let view = table.with_range(range);
                let mut after: Option<String> = None;
                loop {
                    let rows = view.fetch(after.as_deref(), batch).await?;
                    let new: Vec<Vec<u8>> = rows.iter().map(|r| flipped(&r.ciphertext)).collect();
                    let out = view.compare_and_swap_many(&cas_writes(&rows, &new)).await?;
                    moved += out.iter().filter(|o| **o == CasOutcome::Swapped).count() as u64;
                    after = rows.last().map(|r| r.cursor.clone());
                    if rows.len() < batch {
                        break;
                    }
                }
            }
        }));
    }
    let mut moved = 0;
    for t in tasks {
        moved += t.await?.map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed();
    let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {TABLE}"))
        .fetch_one(pool)
        .await?;
    if moved != rows as u64 {
        return Err(format!("baseline wrote {moved} of {rows} rows").into());
    }
    Ok(elapsed)
}

/// Puts every row back on its v1 ciphertext; then a checkpoint, so that
/// the next timed run does not pay for flushing the reset's writes.
async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(&format!(
        "TRUNCATE {TABLE}; INSERT INTO {TABLE} SELECT * FROM {TABLE}_v1; \
         TRUNCATE keyfold_rewrap_jobs CASCADE"
    ))
    .execute(pool)
    .await?;
    sqlx::raw_sql(&format!("VACUUM ANALYZE {TABLE}"))
        .execute(pool)
        .await?;
    sqlx::raw_sql("CHECKPOINT").execute(pool).await?;
    Ok(())
}

async fn verify(pool: &PgPool, ring: &Keyring, target: u32) -> Result<u64> {
    let rows: Vec<(i64, String, Vec<u8>)> =
        sqlx::query_as(&format!("SELECT id, tenant, secret FROM {TABLE}"))
            .fetch_all(pool)
            .await?;
    for (id, tenant, ct) in &rows {
        let version = format::inspect(ct)?.key_version;
        if version != target {
            return Err(format!("row {id} is on v{version}, not v{target}").into());
        }
        let pt = ring.decrypt(&context(&id.to_string(), tenant), ct).await?;
        if pt != plaintext(*id).as_bytes() {
            return Err(format!("row {id} decrypts to the wrong plaintext").into());
        }
    }
    Ok(rows.len() as u64)
}

async fn demo(rows: i64, workers: usize) -> Result<()> {
    let scratch = Scratch::create().await?;
    let pool = scratch.pool(4).await?;
    keyfold_postgres::migrate(&pool, &TablePrefix::default()).await?;
    let ring = keyring().await?;
    fill(&pool, &ring, rows).await?;
    let v2 = ring.rotate(&Actor::new("demo-admin")).await?;
    println!(
        "rotated to v{}; a distributed job moves every row to it with {workers} workers:",
        v2.version
    );
    let (elapsed, status) = rewrap(
        &scratch,
        &pool,
        &ring,
        Shape {
            workers,
            lanes: LANES,
            batch: 1000,
            verify: Verify::default(),
        },
        true,
    )
    .await?;
    println!(
        "done in {:.1} s: {} rewrapped, {} skipped, {} failed; {} rows read for {} rows",
        elapsed.as_secs_f64(),
        status.totals.rewrapped,
        status.totals.skipped,
        status.totals.failed + status.totals.unresolved,
        status.rows_read,
        status.totals.seen
    );
    let checked = verify(&pool, &ring, v2.version).await?;
    println!(
        "verified: all {checked} rows decrypt to their plaintext on v{}",
        v2.version
    );
    let coordinator = RewrapCoordinator::new(pool.clone(), TablePrefix::default());
    if let Some(report) = coordinator.completion(&status.job_id).await? {
        println!(
            "completion report covers all {} shards; evidence for destroying v1: {}",
            status.shards,
            if report.evidence(1).is_some() {
                "yes (it authorizes a destroy if gathered after v1 was disabled: docs/LIFECYCLE.md)"
            } else {
                "no"
            }
        );
    }
    pool.close().await;
    scratch.drop_now().await
}

async fn bench(
    rows: i64,
    workers: &[usize],
    lanes: usize,
    batch: usize,
    repeat: usize,
    verify: &[Verify],
) -> Result<()> {
    let (scratch, pool, ring) = rotated_table(rows).await?;
    println!(
        "{rows} rows, batches of {batch}, 16 shards, {lanes} lanes per worker; CPUs: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| workers (streams) | verify | rewrap rows/s | same reads + batched UPDATEs, no crypto, rows/s | ratio | rows read per row rewrapped | CPU µs per row, job: client + server | CPU µs per row, no crypto: client + server | load average (1 min) before the baseline |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // Each worker count `repeat` times in a row, the baseline and the job
    // (once per verification asked for) alternating: B J B J.
    for &w in workers {
        for _ in 0..repeat {
            let load = propagation::load_average();
            reset(&pool).await?;
            // As many streams as the job has: each worker works `lanes`
            // shards at once (RewrapWorker::lanes).
            let cpu = cpu::CpuTimes::now();
            let limit = baseline(&scratch, &pool, w * lanes, batch).await?;
            let limit_cpu = per_row(cpu, rows);
            for &v in verify {
                reset(&pool).await?;
                let cpu = cpu::CpuTimes::now();
                let shape = Shape {
                    workers: w,
                    lanes,
                    batch,
                    verify: v,
                };
                let (elapsed, status) = rewrap(&scratch, &pool, &ring, shape, false).await?;
                let job_cpu = per_row(cpu, rows);
                if status.totals.rewrapped != rows as u64 {
                    return Err(format!("rewrapped {} of {rows}", status.totals.rewrapped).into());
                }
                let job_rate = rows as f64 / elapsed.as_secs_f64();
                let limit_rate = rows as f64 / limit.as_secs_f64();
                println!(
                    "| {w} ({}) | {} | {job_rate:.0} | {limit_rate:.0} | {:.2} | {:.2} | {job_cpu} | {limit_cpu} | {} |",
                    w * lanes,
                    verify_name(v),
                    job_rate / limit_rate,
                    status.rows_read as f64 / status.totals.rewrapped as f64,
                    load.split_whitespace().next().unwrap_or("?")
                );
            }
        }
    }
    pool.close().await;
    scratch.drop_now().await
}

/// `ciphertext` with its last byte flipped: what the no-crypto baseline
/// writes back in place of a rewrapped row.
fn flipped(ciphertext: &[u8]) -> Vec<u8> {
    let mut ct = ciphertext.to_vec();
    if let Some(b) = ct.last_mut() {
        *b ^= 1;
    }
    ct
}

/// One compare-and-swap per row: from the bytes read to `new`'s, in order.
fn cas_writes<'a>(rows: &'a [keyfold_rewrap::Row], new: &'a [Vec<u8>]) -> Vec<CasWrite<'a>> {
    rows.iter()
        .zip(new)
        .map(|(r, n)| CasWrite {
            id: &r.id,
            expected: &r.ciphertext,
            new: n,
        })
        .collect()
}

/// CPU time per row since `start`, client + server, in µs ("?" without
/// `/proc`).
fn per_row(start: Option<cpu::CpuTimes>, rows: i64) -> String {
    match (start, cpu::CpuTimes::now()) {
        (Some(start), Some(end)) => {
            let used = end.since(start);
            let us = |d: Duration| d.as_secs_f64() * 1e6 / rows as f64;
            format!("{:.1} + {:.1}", us(used.client), us(used.server))
        }
        _ => "?".to_owned(),
    }
}

fn verify_name(v: Verify) -> &'static str {
    match v {
        Verify::Header => "header",
        _ => "decrypt",
    }
}

fn parse_verify(list: &str) -> Result<Vec<Verify>> {
    list.split(',')
        .map(|v| match v.trim() {
            "decrypt" => Ok(Verify::Decrypt),
            "header" => Ok(Verify::Header),
            other => Err(format!("--verify: {other:?} is not decrypt or header").into()),
        })
        .collect()
}

fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Result<Option<T>>
where
    T::Err: Error + 'static,
{
    match args.iter().position(|a| a == flag) {
        Some(i) => {
            let v = args.get(i + 1).ok_or(format!("{flag} needs a value"))?;
            Ok(Some(
                v.parse().map_err(|e: T::Err| format!("{flag} {v}: {e}"))?,
            ))
        }
        None => Ok(None),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") | None => {
            let rows = arg(&args, "--rows")?.unwrap_or(200_000);
            let workers = arg(&args, "--workers")?.unwrap_or(4);
            demo(rows, workers).await
        }
        Some("bench") => {
            let rows = arg(&args, "--rows")?.unwrap_or(1_000_000);
            let batch = arg(&args, "--batch")?.unwrap_or(1000);
            let workers: Vec<usize> = match arg::<String>(&args, "--workers")? {
                Some(list) => list
                    .split(',')
                    .map(|w| w.trim().parse())
                    .collect::<std::result::Result<_, _>>()?,
                None => vec![1, 2, 4],
            };
            let lanes = arg(&args, "--lanes")?.unwrap_or(LANES);
            let repeat = arg(&args, "--repeat")?.unwrap_or(1);
            let verify = match arg::<String>(&args, "--verify")? {
                Some(list) => parse_verify(&list)?,
                None => vec![Verify::default()],
            };
            bench(rows, &workers, lanes, batch, repeat, &verify).await
        }
        Some("profile") => {
            profile::profile(
                arg(&args, "--rows")?.unwrap_or(200_000),
                arg(&args, "--batch")?.unwrap_or(1000),
                arg(&args, "--passes")?.unwrap_or(2),
            )
            .await
        }
        Some("propagation") => {
            let only = match arg::<String>(&args, "--only")?.as_deref() {
                None => None,
                Some("notify") => Some(true),
                Some("poll") => Some(false),
                Some(other) => {
                    return Err(format!("--only {other:?}: use notify or poll").into());
                }
            };
            propagation::propagation(propagation::Options {
                rounds: arg(&args, "--rounds")?.unwrap_or(100),
                max_staleness: Duration::from_millis(
                    arg(&args, "--max-staleness-ms")?.unwrap_or(2000),
                ),
                cache_ttl: Duration::from_millis(arg(&args, "--cache-ttl-ms")?.unwrap_or(300_000)),
                poll: Duration::from_micros(arg(&args, "--poll-us")?.unwrap_or(100)),
                only,
            })
            .await
        }
        Some(other) => Err(format!(
            "unknown command {other:?}: use demo, bench, profile or propagation"
        )
        .into()),
    }
}
