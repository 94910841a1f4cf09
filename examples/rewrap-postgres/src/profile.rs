//! `profile`: where one stream's time goes, batch by batch (issue 17's
//! throughput goal; findings in BENCHMARKS.md).
//!
//! Over the bench's table, one stream, no lanes, no shards, each pass from
//! the same v1 rows:
//!
//! - `raw fetch`: the job's `SELECT` through sqlx, rows left undecoded;
//! - `no-crypto`: the bench's limit, timed per step: fetch ([`PgTable`]'s,
//!   rows decoded into [`Row`](keyfold_rewrap::Row)s with their context),
//!   the byte flip, the batched compare-and-swap `UPDATE`;
//! - `crypto by hand`: the same with what the job does to a row in place of
//!   the flip (header inspection, the old version's key from the keyring,
//!   `record::rewrap`, the verifying `record::decrypt` under the target);
//!   then again with each old version's key looked up once per batch;
//! - `RewrapJob`: `next_batch` of a [`RewrapJob`] over the same table (the
//!   whole batch, keyring re-checks included).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyfold_core::format;
use keyfold_core::keyring::Keyring;
use keyfold_core::{MasterKey, record};
use keyfold_postgres::PgTable;
use keyfold_rewrap::{CasOutcome, JobOptions, RewrapJob, RowSource};
use sqlx::PgPool;

use crate::{Result, TABLE, cas_writes, flipped, reset, rotated_table, source};

/// Time spent per step over a pass.
#[derive(Default)]
struct Spans {
    steps: Vec<(&'static str, Duration)>,
    batches: u32,
    rows: u64,
    total: Duration,
}

impl Spans {
    fn add(&mut self, step: &'static str, d: Duration) {
        match self.steps.iter_mut().find(|(s, _)| *s == step) {
            Some((_, t)) => *t += d,
            None => self.steps.push((step, d)),
        }
    }

    fn print(&self, name: &str) {
        let per_batch = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(self.batches.max(1));
        let per_row = |d: Duration| d.as_secs_f64() * 1e6 / self.rows.max(1) as f64;
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(s, d)| format!("{s} {:.2} ms ({:.2} µs/row)", per_batch(*d), per_row(*d)))
            .collect();
        println!(
            "| {name} | {:.0} | {:.2} ms | {} |",
            self.rows as f64 / self.total.as_secs_f64(),
            per_batch(self.total),
            steps.join(", ")
        );
    }
}

/// The job's `SELECT`, rows fetched and dropped undecoded.
async fn raw_fetch(pool: &PgPool, batch: usize) -> Result<Spans> {
    let mut spans = Spans::default();
    let started = Instant::now();
    let mut after: Option<i64> = None;
    loop {
        let t = Instant::now();
        let rows = sqlx::query(&format!(
            "SELECT t.\"id\"::text, t.\"secret\", t.\"id\"::text, t.\"tenant\"::text \
             FROM \"public\".\"{TABLE}\" AS t WHERE t.\"secret\" IS NOT NULL \
             AND t.\"id\" > $1::bigint ORDER BY t.\"id\" LIMIT $2"
        ))
        .bind(after.unwrap_or(i64::MIN).to_string())
        .bind(i64::try_from(batch)?)
        .fetch_all(pool)
        .await?;
        spans.add("fetch", t.elapsed());
        spans.batches += 1;
        spans.rows += rows.len() as u64;
        let last = rows.last().map(|r| sqlx::Row::try_get::<String, _>(r, 0));
        if rows.len() < batch {
            break;
        }
        after = last.transpose()?.map(|s| s.parse()).transpose()?;
    }
    spans.total = started.elapsed();
    Ok(spans)
}

/// Fetch, then `prepare` each row (no crypto: a byte flip; or the job's
/// crypto by hand), then one batched compare-and-swap.
/// `memo`: look each old version's key up once per batch instead of once
/// per row (what a per-batch memo in the job would save).
async fn by_hand(
    table: &PgTable,
    ring: Option<&Keyring>,
    memo: bool,
    batch: usize,
) -> Result<Spans> {
    let mut spans = Spans::default();
    let target = match ring {
        Some(r) => Some(
            r.master_key(r.active_version().ok_or("no active version")?)
                .await?,
        ),
        None => None,
    };
    let started = Instant::now();
    let mut after: Option<String> = None;
    loop {
        let t = Instant::now();
        let rows = table.fetch(after.as_deref(), batch).await?;
        spans.add("fetch+decode", t.elapsed());
        let t = Instant::now();
        let mut new = Vec::with_capacity(rows.len());
        let (mut key, mut rewrap, mut verify) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut keys: HashMap<u32, Arc<MasterKey>> = HashMap::new();
        for r in &rows {
            match (ring, &target) {
                (Some(ring), Some(target)) => {
                    let t0 = Instant::now();
                    let info = format::inspect_header(&r.ciphertext)?;
                    let from = match keys.get(&info.key_version) {
                        Some(k) if memo => Arc::clone(k),
                        _ => {
                            let k = ring.master_key(info.key_version).await?;
                            if memo {
                                keys.insert(info.key_version, Arc::clone(&k));
                            }
                            k
                        }
                    };
                    let t1 = Instant::now();
                    let moved = record::rewrap(&r.ciphertext, &from, target, &r.context)?;
                    let t2 = Instant::now();
                    drop(record::decrypt(target, &r.context, &moved)?);
                    new.push(moved);
                    key += t1 - t0;
                    rewrap += t2 - t1;
                    verify += t2.elapsed();
                }
                _ => new.push(flipped(&r.ciphertext)),
            }
        }
        if ring.is_some() {
            spans.add("crypto", t.elapsed());
            spans.add("(of which inspect + master_key", key);
            spans.add("record::rewrap", rewrap);
            spans.add("verifying decrypt)", verify);
        } else {
            spans.add("flip", t.elapsed());
        }
        let t = Instant::now();
        let out = table
            .compare_and_swap_many(&cas_writes(&rows, &new))
            .await?;
        spans.add("cas", t.elapsed());
        if out.iter().any(|o| *o != CasOutcome::Swapped) {
            return Err("a compare-and-swap conflicted".into());
        }
        spans.batches += 1;
        spans.rows += rows.len() as u64;
        after = rows.last().map(|r| r.cursor.clone());
        if rows.len() < batch {
            break;
        }
    }
    spans.total = started.elapsed();
    Ok(spans)
}

/// `RewrapJob::next_batch` over the table, one stream.
async fn job(table: &PgTable, ring: &Arc<Keyring>, batch: usize) -> Result<Spans> {
    let mut spans = Spans::default();
    let options = JobOptions {
        batch_size: batch,
        ..JobOptions::default()
    };
    let source: Arc<dyn RowSource> = Arc::new(table.clone());
    let mut job = RewrapJob::builder(Arc::clone(ring), vec![source])
        .options(options)
        .create()?;
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let Some(report) = job.next_batch().await? else {
            break;
        };
        spans.add("next_batch", t.elapsed());
        spans.batches += 1;
        spans.rows += report.counters.rewrapped;
        if report.completed {
            break;
        }
    }
    spans.total = started.elapsed();
    Ok(spans)
}

pub(crate) async fn profile(rows: i64, batch: usize, passes: usize) -> Result<()> {
    let (scratch, pool, ring) = rotated_table(rows).await?;
    let stream = scratch.pool(1).await?;
    let table = source(&stream).await?;
    println!("{rows} rows, batches of {batch}, one stream; {passes} passes of each");
    println!("| pass | rows/s | per batch | per step: per batch (per row) |");
    println!("|---|---:|---:|---|");
    for _ in 0..passes {
        reset(&pool).await?;
        raw_fetch(&stream, batch)
            .await?
            .print("raw fetch (undecoded)");
        by_hand(&table, None, false, batch)
            .await?
            .print("no-crypto");
        reset(&pool).await?;
        by_hand(&table, Some(&ring), false, batch)
            .await?
            .print("crypto by hand");
        reset(&pool).await?;
        by_hand(&table, Some(&ring), true, batch)
            .await?
            .print("crypto by hand, keys looked up once per batch");
        reset(&pool).await?;
        job(&table, &ring, batch).await?.print("RewrapJob");
    }
    stream.close().await;
    pool.close().await;
    scratch.drop_now().await
}
