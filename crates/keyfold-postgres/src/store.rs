//! [`PgKeyringStore`]: keyrings in one PostgreSQL table, compare-and-swap
//! on the revision, change notifications through `LISTEN`/`NOTIFY`
//! (docs/LIFECYCLE.md, "PostgreSQL (`keyfold-postgres`)", "Store").

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keyfold_core::keyring::StoredKeyring;
use keyfold_core::store::{StoreError, check_id, check_save, from_bytes, to_bytes};
use keyfold_core::{KeyringStore, Revision, StoreEvent};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::{broadcast, oneshot};

use crate::migrate::{Migration, TablePrefix};

/// The store's schema steps.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    component: "store",
    version: 1,
    sql: |p| {
        format!(
            "CREATE TABLE {keyrings} (
                keyring_id text PRIMARY KEY
                    CHECK (keyring_id ~ '^[A-Za-z0-9._-]{{1,128}}$' AND keyring_id NOT IN ('.', '..')),
                revision bigint NOT NULL CHECK (revision > 0),
                keyring bytea NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now()
            );
            COMMENT ON TABLE {keyrings} IS
                'keyfold keyrings: wrapped master key versions and their states (keyfold-postgres PgKeyringStore)';",
            keyrings = p.table("keyrings"),
        )
    },
}];

/// How many change notifications a watcher may fall behind before it gets
/// `Lagged` (and must then treat it as a resync).
const EVENT_BUFFER: usize = 1024;

/// How often a listener checks its connection by default.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// A channel of this listener's own: `<prefix>hb_<8 random hex>` (at most
/// 51 bytes, under PostgreSQL's 63-byte identifier limit).
fn heartbeat_channel(prefix: &TablePrefix) -> String {
    let mut random = [0u8; 4];
    // Only needs to differ between listeners; a fixed fallback still works
    // (other listeners' heartbeats would then also count as heard).
    let _ = keyfold_core::rng::fill(&mut random);
    prefix.name(&format!("hb_{}", hex::encode(random)))
}

/// Longest wait between two attempts to re-establish the listener.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// The least time a listener's connect and `LISTEN` get before they are
/// given up (three heartbeats when that is longer).
const MIN_CONNECT_LIMIT: Duration = Duration::from_secs(1);

/// Keyrings in the table `<prefix>keyrings` (id, revision, the serialized
/// keyring, updated_at) of the host's database.
///
/// - **Compare-and-swap**: a save is one `UPDATE … WHERE revision = $expected`
///   (or `INSERT … ON CONFLICT DO NOTHING` when creating), so of many
///   instances saving from one revision exactly one wins; the others get
///   [`StoreError::Conflict`].
/// - **Notifications**: the same statement calls `pg_notify` on the channel
///   `<prefix>keyrings` with the keyring id, so the notification is sent if
///   and only if the save commits. [`watch`](KeyringStore::watch) starts one
///   listener per store (its own connection, outside the host's pool), which
///   forwards each as [`StoreEvent::Changed`]. When that connection is lost
///   (or goes silent: see [`set_listener_heartbeat`](Self::set_listener_heartbeat)),
///   the listener reconnects (backing off up to 5 s), listens again and only
///   then sends [`StoreEvent::Resync`]: every change after the resync's
///   reload is notified. While it is down, instances keep their
///   max-staleness bound (notifications only ever shorten it).
/// - Saves never wait for the listener.
///
/// The stored bytes are [`keyfold_core::store::to_bytes`]'s (the revision is
/// both a column and inside the bytes; a load checks they agree).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use keyfold_core::KeyringStore;
/// use keyfold_postgres::{PgKeyringStore, TablePrefix, migrate};
/// let prefix = TablePrefix::new("billing_")?;
/// migrate(&pool, &prefix).await?;
/// let store = PgKeyringStore::new(pool, prefix);
/// let changes = store.watch(); // Some(receiver) inside a tokio runtime
/// assert!(store.load("tenant-42").await?.is_none());
/// # drop(changes); Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgKeyringStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    prefix: TablePrefix,
    /// The table, quoted.
    table: String,
    /// The notification channel (`<prefix>keyrings`, unquoted).
    channel: String,
    /// The listener's heartbeat period, in milliseconds.
    heartbeat_ms: std::sync::atomic::AtomicU64,
    /// The running listener task's sender, and what stops it when dropped.
    #[allow(clippy::type_complexity, reason = "one pair, named at its use")]
    events: Mutex<Option<(broadcast::Sender<StoreEvent>, oneshot::Sender<()>)>>,
}

impl fmt::Debug for PgKeyringStore {
    // The pool's connect options hold the database password: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgKeyringStore")
            .field("table", &self.inner.prefix.name("keyrings"))
            .field("channel", &self.inner.channel)
            .finish_non_exhaustive()
    }
}

impl PgKeyringStore {
    /// A store over `pool`, in the table `<prefix>keyrings` (create it
    /// with [`migrate`](crate::migrate)).
    pub fn new(pool: PgPool, prefix: TablePrefix) -> Self {
        PgKeyringStore {
            inner: Arc::new(Inner {
                table: prefix.table("keyrings"),
                channel: prefix.name("keyrings"),
                pool,
                prefix,
                events: Mutex::new(None),
                heartbeat_ms: std::sync::atomic::AtomicU64::new(
                    u64::try_from(DEFAULT_HEARTBEAT.as_millis()).unwrap_or(u64::MAX),
                ),
            }),
        }
    }

    /// Sets how often a listener started from now on checks its connection
    /// (default 10 s): it notifies its own channel through the host's pool
    /// each period, and takes its connection as lost (reconnect, then
    /// [`StoreEvent::Resync`]) after three periods with nothing received;
    /// a reconnect (connect and `LISTEN`) unanswered for three periods (at
    /// least one second) is given up and tried again.
    /// Clamped to 10 ms ..= 1 h.
    pub fn set_listener_heartbeat(&self, every: Duration) {
        let every = every.clamp(Duration::from_millis(10), Duration::from_secs(3600));
        self.inner.heartbeat_ms.store(
            u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The notification channel saves announce themselves on
    /// (`<prefix>keyrings`; the payload is the keyring id).
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The table prefix.
    pub fn prefix(&self) -> &TablePrefix {
        &self.inner.prefix
    }

    /// Every keyring id in the store, in id order (for operators and
    /// sweeps; a fleet rarely needs it).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT keyring_id FROM {} ORDER BY keyring_id",
            self.inner.table
        ))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(backend)
    }

    /// [`KeyringStore::save`] inside the host's transaction `tx`: the
    /// keyring commits (and its notification goes out) with the host's own
    /// writes or not at all, e.g. a tenant's new KMS config stored with
    /// the keyring re-wrapped under it. A conflict is reported as by
    /// `save`; the host then rolls back.
    ///
    /// ```no_run
    /// # async fn demo(store: keyfold_postgres::PgKeyringStore, pool: sqlx::PgPool,
    /// #   stored: keyfold_core::keyring::StoredKeyring, expected: Option<keyfold_core::Revision>)
    /// #   -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("UPDATE tenant_kms SET config = $1 WHERE tenant = $2")
    ///     .bind("{}")
    ///     .bind("acme")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// store.save_in(&mut tx, "acme", expected, &stored).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`KeyringStore::save`].
    pub async fn save_in(
        &self,
        tx: &mut sqlx::PgConnection,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        self.save_with(&mut *tx, keyring_id, expected, keyring)
            .await
    }

    /// [`KeyringStore::save`] through `executor`: the pool, or the host's
    /// transaction.
    async fn save_with<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        check_save(keyring_id, keyring)?;
        if expected.is_some_and(|r| i64::try_from(r.0).is_err()) {
            // No stored revision is that large.
            return Err(StoreError::Conflict {
                keyring_id: keyring_id.to_owned(),
                expected,
                found: self.current_revision(keyring_id).await?,
            });
        }
        let next = Revision(expected.map_or(1, |r| r.0.saturating_add(1)));
        let next_db = i64::try_from(next.0).map_err(|_| StoreError::Corrupt {
            keyring_id: keyring_id.to_owned(),
            reason: format!("revision {next} does not fit the table"),
        })?;
        // Validates the keyring (invariants, schema) before anything is sent.
        let bytes = to_bytes(next, keyring)?;
        let table = &self.inner.table;
        // One statement: the write and its notification commit together.
        let written: Option<i64> = match expected {
            None => {
                sqlx::query_scalar(&format!(
                    "WITH w AS (
                        INSERT INTO {table} (keyring_id, revision, keyring, updated_at)
                        VALUES ($1, $2, $3, now())
                        ON CONFLICT (keyring_id) DO NOTHING
                        RETURNING keyring_id, revision
                    )
                    SELECT revision FROM w, LATERAL (SELECT pg_notify($4, w.keyring_id)) AS n"
                ))
                .bind(keyring_id)
                .bind(next_db)
                .bind(&bytes)
                .bind(&self.inner.channel)
                .fetch_optional(executor)
                .await
            }
            Some(expected) => {
                // Checked above.
                let expected_db = i64::try_from(expected.0).unwrap_or(i64::MAX);
                sqlx::query_scalar(&format!(
                    "WITH w AS (
                        UPDATE {table} SET revision = $2, keyring = $3, updated_at = now()
                        WHERE keyring_id = $1 AND revision = $5
                        RETURNING keyring_id, revision
                    )
                    SELECT revision FROM w, LATERAL (SELECT pg_notify($4, w.keyring_id)) AS n"
                ))
                .bind(keyring_id)
                .bind(next_db)
                .bind(&bytes)
                .bind(&self.inner.channel)
                .bind(expected_db)
                .fetch_optional(executor)
                .await
            }
        }
        .map_err(backend)?;
        match written {
            Some(_) => Ok(next),
            None => Err(StoreError::Conflict {
                keyring_id: keyring_id.to_owned(),
                expected,
                found: self.current_revision(keyring_id).await?,
            }),
        }
    }

    async fn current_revision(&self, keyring_id: &str) -> Result<Option<Revision>, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT revision FROM {} WHERE keyring_id = $1",
            self.inner.table
        ))
        .bind(keyring_id)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(backend)?;
        found.map(|r| to_revision(keyring_id, r)).transpose()
    }
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn to_revision(keyring_id: &str, r: i64) -> Result<Revision, StoreError> {
    u64::try_from(r)
        .ok()
        .filter(|r| *r > 0)
        .map(Revision)
        .ok_or_else(|| StoreError::Corrupt {
            keyring_id: keyring_id.to_owned(),
            reason: format!("revision {r} in the table"),
        })
}

#[async_trait]
impl KeyringStore for PgKeyringStore {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        check_id(keyring_id)?;
        let row: Option<(i64, Vec<u8>)> = sqlx::query_as(&format!(
            "SELECT revision, keyring FROM {} WHERE keyring_id = $1",
            self.inner.table
        ))
        .bind(keyring_id)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(backend)?;
        let Some((column, bytes)) = row else {
            return Ok(None);
        };
        let column = to_revision(keyring_id, column)?;
        let (revision, keyring) = from_bytes(keyring_id, &bytes)?;
        if revision != column {
            return Err(StoreError::Corrupt {
                keyring_id: keyring_id.to_owned(),
                reason: format!("row revision {column} but the stored keyring says {revision}"),
            });
        }
        Ok(Some((revision, keyring)))
    }

    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        self.save_with(&self.inner.pool, keyring_id, expected, keyring)
            .await
    }

    /// Starts (or joins) this store's listener. `None` outside a tokio
    /// runtime: instances then rely on the max-staleness bound alone.
    fn watch(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        let mut events = self
            .inner
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((tx, _)) = events.as_ref().filter(|(tx, _)| tx.receiver_count() > 0) {
            return Some(tx.subscribe());
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = broadcast::channel(EVENT_BUFFER);
        // Dropping `stop_tx` (with the store, or when a new listener
        // replaces this one) ends the task.
        let (stop_tx, stop_rx) = oneshot::channel();
        let heartbeat = Duration::from_millis(
            self.inner
                .heartbeat_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        runtime.spawn(listen(
            Listen {
                host: self.inner.pool.clone(),
                channel: self.inner.channel.clone(),
                heartbeat_channel: heartbeat_channel(&self.inner.prefix),
                heartbeat,
                tx: tx.clone(),
            },
            stop_rx,
        ));
        *events = Some((tx, stop_tx));
        Some(rx)
    }
}

/// A pool of one connection, outside the host's pool, for one listener
/// connection (it holds it for as long as it listens). Each reconnect makes
/// a new one: a dead connection's cleanup (`UNLISTEN`) may hang on a dead
/// network and must not hold the next connection's slot.
fn listener_pool(pool: &PgPool) -> PgPool {
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .application_name(LISTENER_APPLICATION_NAME);
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options)
}

/// The `application_name` of the listener's connection (visible in
/// `pg_stat_activity`).
pub(crate) const LISTENER_APPLICATION_NAME: &str = "keyfold-postgres listener";

/// A listening connection, and the pool it came from.
async fn connect(host: &PgPool, channels: &[&str]) -> Result<(PgPool, PgListener), sqlx::Error> {
    let pool = listener_pool(host);
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen_all(channels.iter().copied()).await?;
    Ok((pool, listener))
}

/// What the listener task needs.
struct Listen {
    /// The host's pool (heartbeats are sent through it).
    host: PgPool,
    channel: String,
    /// This listener's own heartbeat channel.
    heartbeat_channel: String,
    heartbeat: Duration,
    tx: broadcast::Sender<StoreEvent>,
}

/// The listener task: forwards notifications until nobody watches or the
/// store is dropped (`stop` resolves); after a lost connection, reconnects,
/// listens again, then sends [`StoreEvent::Resync`].
///
/// A connection that dies silently (a network that drops packets: no
/// error, no notification) is found by the heartbeat: every `heartbeat` the
/// task notifies its own channel through the host's pool; when nothing at
/// all has arrived for three heartbeats, the connection is taken as lost.
/// Connecting and `LISTEN` get as long (at least one second), then are
/// tried again.
///
/// `PgListener::try_recv` is cancel-safe (sqlx reads whole messages), so the
/// heartbeat tick may interrupt it.
async fn listen(l: Listen, mut stop: oneshot::Receiver<()>) {
    let mut delay = Duration::from_millis(50);
    let mut resync = false;
    let channels = [l.channel.as_str(), l.heartbeat_channel.as_str()];
    'connect: loop {
        // Bounded: a connection that goes silent before its LISTEN is
        // answered would otherwise hold the task here forever, where no
        // heartbeat looks (it runs once listening).
        let limit = (l.heartbeat * 3).max(MIN_CONNECT_LIMIT);
        let connected = tokio::select! {
            c = tokio::time::timeout(limit, connect(&l.host, &channels)) => c,
            () = l.tx.closed() => break,
            _ = &mut stop => break,
        };
        let connected = match connected {
            Ok(connected) => connected.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        };
        let (pool, mut listener) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                tracing::warn!(%error, channel = l.channel, "keyring store listener cannot connect; retrying");
                resync = true;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = l.tx.closed() => break,
                    _ = &mut stop => break,
                }
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                continue;
            }
        };
        delay = Duration::from_millis(50);
        if resync {
            // Listening again: whatever changed while down is reloaded now,
            // whatever changes from here on is notified.
            let _ = l.tx.send(StoreEvent::Resync);
        }
        let mut tick = tokio::time::interval(l.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        let mut ping: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let next = tokio::select! {
                next = listener.try_recv() => next,
                _ = tick.tick() => {
                    if heard.elapsed() >= l.heartbeat * 3 {
                        tracing::warn!(channel = l.channel, "keyring store listener heard nothing for three heartbeats; reconnecting");
                        break;
                    }
                    if ping.as_ref().is_none_or(|p| p.is_finished()) {
                        let (host, hb, limit) = (l.host.clone(), l.heartbeat_channel.clone(), l.heartbeat);
                        ping = Some(tokio::spawn(async move {
                            let notify = sqlx::query("SELECT pg_notify($1, '')").bind(hb).execute(&host);
                            let _ = tokio::time::timeout(limit, notify).await;
                        }));
                    }
                    continue;
                }
                () = l.tx.closed() => break 'connect,
                _ = &mut stop => break 'connect,
            };
            heard = tokio::time::Instant::now();
            match next {
                Ok(Some(n)) if n.channel() == l.heartbeat_channel => {}
                Ok(Some(n)) => {
                    let _ = l.tx.send(StoreEvent::Changed {
                        keyring_id: n.payload().to_owned(),
                    });
                }
                // Lost (None) or broken (Err): drop it, start anew.
                Ok(None) | Err(_) => {
                    tracing::warn!(
                        channel = l.channel,
                        "keyring store listener lost its connection; reconnecting"
                    );
                    break;
                }
            }
        }
        resync = true;
        // Not awaited: a dead connection's cleanup may never finish.
        drop(listener);
        drop(pool);
    }
}
