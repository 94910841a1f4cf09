//! `propagation`: how long a disable on one instance takes to reach another
//! (issue 17; DESIGN "Many instances, one store"; figures in BENCHMARKS.md).
//!
//! Two [`Keyring`] instances of one keyring, A and B, each over its own
//! `PgPool` and [`PgKeyringStore`] on the scratch database, as two replicas
//! would be. B decrypts a record under version 1 every `--poll-us`
//! microseconds (default 100) from a thread of its own, as a busy replica
//! would, so its key for version 1 stays cached. Each round:
//!
//! 1. B decrypts the record (it has since the previous round's enable);
//! 2. a random pause, uniform in `[0, max staleness)`, so that the disable
//!    lands anywhere in B's reload cycle;
//! 3. A disables version 1; the clock starts when A's `disable` call starts
//!    (so a figure includes A's own save);
//! 4. the figure is the time until B's first decrypt refused with
//!    `KeyState { state: Disabled }`;
//! 5. A enables version 1 again and the round waits until B decrypts.
//!
//! It runs twice: with notifications (both stores' `LISTEN`/`NOTIFY`
//! listeners up) and without (the same stores behind a wrapper whose
//! `watch` is the trait's default, `None`: max staleness alone). Every key
//! lookup judges the version on a view no older than max staleness, cached
//! key or not (docs/THREAT_MODEL.md, "Many instances, one store: the
//! bounds"), so without notifications the bound is max staleness; give the
//! cache a TTL longer than that (`--cache-ttl-ms`) to see that the TTL does
//! not stretch it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyfold_core::audit::Actor;
use keyfold_core::keyring::{Keyring, StoredKeyring};
use keyfold_core::store::StoreError;
use keyfold_core::{
    EncryptionContext, Error as CoreError, KeyState, KeyringStore, LocalKek, Revision, SecretKey,
};
use keyfold_postgres::{PgKeyringStore, TablePrefix};
use tokio::sync::mpsc;

use crate::{Result, Scratch};

/// Rounds run first and not counted (listeners starting, caches warming).
const WARMUP_ROUNDS: usize = 3;

/// The longest any one step may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What `propagation` measures.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) rounds: usize,
    pub(crate) max_staleness: Duration,
    pub(crate) cache_ttl: Duration,
    pub(crate) poll: Duration,
    /// `None`: both modes; `Some(true)`: notifications only.
    pub(crate) only: Option<bool>,
}

/// A [`PgKeyringStore`] without change notifications: `watch` is the
/// trait's default (`None`), so instances rely on max staleness alone.
#[derive(Debug)]
struct Unwatched(PgKeyringStore);

#[async_trait]
impl KeyringStore for Unwatched {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> std::result::Result<Option<(Revision, StoredKeyring)>, StoreError> {
        self.0.load(keyring_id).await
    }

    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> std::result::Result<Revision, StoreError> {
        self.0.save(keyring_id, expected, keyring).await
    }
}

/// What B's decrypts did, sent when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Decrypts,
    Refused,
    /// Anything else (a database error, a wrong plaintext): the run fails.
    Failed(String),
}

/// One instance of the keyring over its own pool and store.
async fn instance(
    scratch: &Scratch,
    keyring_id: &str,
    kek: &Arc<LocalKek>,
    notify: bool,
    options: &Options,
    create: bool,
) -> Result<Keyring> {
    let pool = scratch.pool(2).await?;
    let store = PgKeyringStore::new(pool, TablePrefix::default());
    let store: Arc<dyn KeyringStore> = if notify {
        Arc::new(store)
    } else {
        Arc::new(Unwatched(store))
    };
    let builder = Keyring::builder(keyring_id, kek.clone(), store)
        .max_staleness(options.max_staleness)
        .cache_ttl(options.cache_ttl);
    Ok(if create {
        builder.create().await?
    } else {
        builder.open().await?
    })
}

/// Waits until `n` keyfold listener connections listen on the scratch
/// database (idle after `LISTEN`, which takes effect when it commits).
async fn listeners_ready(scratch: &Scratch, n: i64) -> Result<()> {
    let pool = scratch.pool(1).await?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'keyfold-postgres listener' AND query LIKE 'LISTEN%' \
             AND state = 'idle'",
        )
        .bind(&scratch.name)
        .fetch_one(&pool)
        .await?;
        if listening >= n {
            pool.close().await;
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {listening} of {n} listeners started").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event `want` from B, with the instant B saw it.
async fn wait_for(
    events: &mut mpsc::UnboundedReceiver<(Instant, Seen)>,
    want: &Seen,
) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Err(format!("instance B never reached {want:?}").into()),
            Ok(None) => return Err("instance B's thread stopped".into()),
            Ok(Some((_, Seen::Failed(e)))) => return Err(format!("instance B: {e}").into()),
            Ok(Some((at, seen))) if seen == *want => return Ok(at),
            Ok(Some(_)) => {}
        }
    }
}

/// A uniformly random duration in `[0, max)`.
fn random_below(max: Duration) -> Result<Duration> {
    let mut bytes = [0u8; 8];
    keyfold_core::rng::fill(&mut bytes)?;
    let micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX).max(1);
    Ok(Duration::from_micros(u64::from_le_bytes(bytes) % micros))
}

/// The load averages of /proc/loadavg (1, 5, 15 minutes).
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Nearest-rank percentile of sorted figures.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The figures of one mode.
struct Figures {
    /// Disable start to B's first refusal, one per round.
    reach: Vec<Duration>,
    /// From A's `disable` call returning to B's first refusal (zero when
    /// B refused first), one per round.
    after_return: Vec<Duration>,
    /// How long A's `disable` call took, one per round.
    disable_call: Vec<Duration>,
    load_before: String,
    load_after: String,
}

/// One mode: A and B, `rounds` disables, each timed until B refuses.
async fn measure(scratch: &Scratch, notify: bool, options: &Options) -> Result<Figures> {
    let keyring_id = if notify {
        "propagation-notify"
    } else {
        "propagation-poll"
    };
    let kek = Arc::new(LocalKek::from_bytes(
        "propagation-kek",
        SecretKey::generate()?,
    ));
    let admin = Actor::new("propagation-admin");
    let a = instance(scratch, keyring_id, &kek, notify, options, true).await?;
    let v1 = a.rotate(&admin).await?.version;
    let context = EncryptionContext::new().with("row", "1");
    let plaintext = b"a record under the version the other instance disables".to_vec();
    let record = a.encrypt(&context, &plaintext).await?;
    a.rotate(&admin).await?;
    let b = Arc::new(instance(scratch, keyring_id, &kek, notify, options, false).await?);
    if notify {
        listeners_ready(scratch, 2).await?;
    }

    // B: decrypts every `poll` on a thread of its own (the runtime's
    // workers drive its database I/O and listener), reporting each change.
    let (tx, mut events) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (b, stop, runtime, poll) = (
            Arc::clone(&b),
            Arc::clone(&stop),
            tokio::runtime::Handle::current(),
            options.poll,
        );
        std::thread::spawn(move || {
            let mut last: Option<Seen> = None;
            while !stop.load(Ordering::Relaxed) {
                let seen = match runtime.block_on(b.decrypt(&context, &record)) {
                    Ok(pt) if pt == plaintext => Seen::Decrypts,
                    Ok(_) => Seen::Failed("decrypted to another plaintext".to_owned()),
                    Err(CoreError::KeyState {
                        version,
                        state: KeyState::Disabled,
                    }) if version == v1 => Seen::Refused,
                    Err(e) => Seen::Failed(e.to_string()),
                };
                let now = Instant::now();
                if last.as_ref() != Some(&seen) {
                    if tx.send((now, seen.clone())).is_err() {
                        return;
                    }
                    last = Some(seen);
                }
                std::thread::sleep(poll);
            }
        })
    };

    let load_before = load_average();
    let mut reach = Vec::with_capacity(options.rounds);
    let mut disable_call = Vec::with_capacity(options.rounds);
    let mut after_return = Vec::with_capacity(options.rounds);
    let result: Result<()> = async {
        wait_for(&mut events, &Seen::Decrypts).await?;
        for round in 0..WARMUP_ROUNDS + options.rounds {
            tokio::time::sleep(random_below(options.max_staleness)?).await;
            let started = Instant::now();
            a.disable(v1, &admin).await?;
            let returned = Instant::now();
            let refused = wait_for(&mut events, &Seen::Refused).await?;
            if round >= WARMUP_ROUNDS {
                reach.push(refused.saturating_duration_since(started));
                after_return.push(refused.saturating_duration_since(returned));
                disable_call.push(returned - started);
            }
            a.enable(v1, &admin).await?;
            wait_for(&mut events, &Seen::Decrypts).await?;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || poller.join())
        .await?
        .map_err(|_| "instance B's thread panicked")?;
    result?;
    reach.sort();
    after_return.sort();
    disable_call.sort();
    Ok(Figures {
        reach,
        after_return,
        disable_call,
        load_before,
        load_after: load_average(),
    })
}

/// Runs the measurement (both modes unless `only` says which) and prints
/// a table for BENCHMARKS.md.
pub(crate) async fn propagation(options: Options) -> Result<()> {
    let scratch = Scratch::create().await?;
    let pool = scratch.pool(1).await?;
    keyfold_postgres::migrate(&pool, &TablePrefix::default()).await?;
    pool.close().await;
    println!(
        "{} rounds per mode (after {WARMUP_ROUNDS} uncounted), max staleness {}, cache TTL {}, \
         instance B decrypts every {} µs; CPUs: {}",
        options.rounds,
        ms(options.max_staleness),
        ms(options.cache_ttl),
        options.poll.as_micros(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let modes: Vec<bool> = match options.only {
        None => vec![true, false],
        Some(notify) => vec![notify],
    };
    let mut rows = Vec::new();
    for notify in modes {
        let f = measure(&scratch, notify, &options).await?;
        rows.push((notify, f));
    }
    println!(
        "| store notifications | p50 | p95 | max | min | bound (max staleness) | after A's call returned: p50 / p95 | A's disable call, p50 | load average (before → after) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (notify, f) in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} → {} |",
            if *notify {
                "LISTEN/NOTIFY"
            } else {
                "none (max staleness alone)"
            },
            ms(percentile(&f.reach, 50)),
            ms(percentile(&f.reach, 95)),
            ms(f.reach.last().copied().unwrap_or_default()),
            ms(f.reach.first().copied().unwrap_or_default()),
            ms(options.max_staleness),
            ms(percentile(&f.after_return, 50)),
            ms(percentile(&f.after_return, 95)),
            ms(percentile(&f.disable_call, 50)),
            f.load_before,
            f.load_after
        );
    }
    scratch.drop_now().await
}
