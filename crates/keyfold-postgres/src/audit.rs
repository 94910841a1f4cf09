//! [`PgAuditSink`]: audit events in an append-only, hash-chained table
//! (docs/LIFECYCLE.md, "PostgreSQL (`keyfold-postgres`)", "Audit log").
//!
//! Row `n` of `<prefix>audit` holds the event's canonical content (its JSON
//! as [`AuditEvent`]'s serde form writes it), the previous row's hash, and
//! its own hash:
//!
//! ```text
//! hash(n) = SHA-256("keyfold-audit-v1" 0x00 || hash(n-1) || content(n))    hash(0) = 32 zero bytes
//! ```
//!
//! Writers serialise on the one-row chain head `<prefix>audit_head`
//! (`SELECT … FOR UPDATE`): each append reads the head, inserts the next
//! rows and moves the head in one transaction, so concurrent writers, from
//! any number of processes, never fork the chain or lose an event. A trigger
//! refuses `UPDATE`, `DELETE` and `TRUNCATE` on the table; someone who can
//! disable it (the table's owner) can still rewrite rows, and
//! [`PgAuditSink::verify`] finds the first row edited, removed or reordered.
//! A writer who rewrites every hash from some row on up to the head is only
//! caught against a head exported beforehand ([`PgAuditSink::verify_against`]):
//! export [`ChainHead`]s to somewhere the database's owner cannot write.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keyfold_core::{AuditEvent, AuditSink};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::migrate::{Migration, TablePrefix};

/// The audit table's schema steps.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    component: "audit",
    version: 1,
    sql: |p| {
        format!(
            "CREATE TABLE {audit} (
                seq bigint PRIMARY KEY CHECK (seq > 0),
                keyring_id text NOT NULL,
                event text NOT NULL,
                content bytea NOT NULL,
                prev_hash bytea NOT NULL CHECK (length(prev_hash) = 32),
                hash bytea NOT NULL CHECK (length(hash) = 32),
                written_at timestamptz NOT NULL DEFAULT now()
            );
            COMMENT ON TABLE {audit} IS
                'keyfold audit events, hash-chained (keyfold-postgres PgAuditSink); append-only';
            CREATE INDEX {keyring_idx} ON {audit} (keyring_id, seq);
            CREATE TABLE {head} (
                id boolean PRIMARY KEY DEFAULT true CHECK (id),
                seq bigint NOT NULL CHECK (seq >= 0),
                hash bytea NOT NULL CHECK (length(hash) = 32)
            );
            INSERT INTO {head} (id, seq, hash) VALUES (true, 0, '\\x{zero}');
            CREATE FUNCTION {refuse}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'the keyfold audit table is append-only';
            END
            $$;
            CREATE TRIGGER {row_trigger} BEFORE UPDATE OR DELETE ON {audit}
                FOR EACH ROW EXECUTE FUNCTION {refuse}();
            CREATE TRIGGER {truncate_trigger} BEFORE TRUNCATE ON {audit}
                FOR EACH STATEMENT EXECUTE FUNCTION {refuse}();",
            audit = p.table("audit"),
            head = p.table("audit_head"),
            keyring_idx = p.table("audit_keyring_idx"),
            refuse = p.table("audit_append_only"),
            row_trigger = p.table("audit_append_only_rows"),
            truncate_trigger = p.table("audit_append_only_truncate"),
            zero = hex::encode(GENESIS),
        )
    },
}];

/// The hash before the first row.
const GENESIS: [u8; 32] = [0; 32];

/// Domain separation of the chain's hash.
const DOMAIN: &[u8] = b"keyfold-audit-v1\0";

/// `SHA-256("keyfold-audit-v1" 0x00 || prev || content)`.
fn chain_hash(prev: &[u8; 32], content: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(content);
    h.finalize().into()
}

/// The end of the chain: the last row's number and hash. Export it now and
/// then to somewhere the database's owner cannot write, and check it later
/// with [`PgAuditSink::verify_against`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHead {
    /// The last row's number (0: no row yet).
    pub seq: u64,
    /// Its hash (32 zero bytes before the first row).
    pub hash: [u8; 32],
}

/// The first place the chain was tampered with, in row order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tamper {
    /// Row `seq`'s content, hash or columns no longer match what was
    /// written (or, for the last row, the chain head).
    Edited {
        /// The row.
        seq: u64,
    },
    /// Rows are missing after row `after` (0: from the start): a gap in the
    /// numbering, or rows the chain head counts that are gone.
    Removed {
        /// The last row before the missing ones.
        after: u64,
    },
    /// Row `seq` is out of place: it was written after row `predecessor`.
    Reordered {
        /// The row.
        seq: u64,
        /// The row it was chained to, elsewhere in the table.
        predecessor: u64,
    },
    /// Row `seq` is intact but was chained to a row that is not in the table:
    /// the row before it was replaced (with its hash recomputed), or rows
    /// were removed and the rest renumbered; also rows beyond the chain head
    /// (inserted without it).
    Unlinked {
        /// The row.
        seq: u64,
    },
    /// The exported head given to [`PgAuditSink::verify_against`] is no
    /// longer in the chain: rows up to it were rewritten or removed.
    AnchorMissing {
        /// The exported head's row.
        seq: u64,
    },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Edited { seq } => write!(f, "audit row {seq} was edited"),
            Tamper::Removed { after } => write!(f, "audit rows after row {after} were removed"),
            Tamper::Reordered { seq, predecessor } => write!(
                f,
                "audit row {seq} was moved (it was written after row {predecessor})"
            ),
            Tamper::Unlinked { seq } => write!(
                f,
                "audit row {seq} follows a row that is no longer in the table"
            ),
            Tamper::AnchorMissing { seq } => {
                write!(f, "the exported chain head at row {seq} is gone")
            }
        }
    }
}

/// What [`PgAuditSink::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainVerification {
    /// Every row chains to the one before, and the last to the head.
    Intact {
        /// The end of the chain (export it; see [`ChainHead`]).
        head: ChainHead,
    },
    /// The first tampering found, in row order.
    Tampered(Tamper),
}

/// An audit write or check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgAuditError {
    /// The database failed or could not be reached; the events of that
    /// call were not written (one transaction).
    #[error("audit table: {0}")]
    Database(#[from] sqlx::Error),
    /// An event could not be serialized (nothing was written).
    #[error("audit event not serializable: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Events handed to [`AuditSink::record`] could not be written (after
    /// retries); [`PgAuditSink::take_unwritten`] returns them.
    #[error("{count} audit events are not written; last error: {last_error}")]
    Unwritten {
        /// How many events wait in [`PgAuditSink::take_unwritten`].
        count: usize,
        /// The last failure.
        last_error: String,
    },
    /// The chain head row is missing or malformed (run
    /// [`migrate`](crate::migrate); or it was tampered with).
    #[error("audit chain head is invalid: {0}")]
    InvalidHead(String),
}

/// Audit events in PostgreSQL, hash-chained (see the module docs).
///
/// Two ways in:
/// - [`append`](Self::append) / [`append_all`](Self::append_all): awaited,
///   the events are committed when it returns `Ok`, and a failure is the
///   caller's error. Use it where the host writes audit events itself.
/// - [`AuditSink::record`], which the keyring calls after each committed
///   change: the trait is synchronous and cannot fail, so events are queued
///   in order to one writer task (spawned on the current tokio runtime) and
///   appended in batches, retried 3 times with backoff. Events that still
///   fail are kept (never dropped, never only logged):
///   [`flush`](Self::flush) waits for the queue and returns
///   [`PgAuditError::Unwritten`] while any are kept,
///   [`take_unwritten`](Self::take_unwritten) hands them back to re-append.
///   Call `flush` where the host must know events are durable (after an
///   operator action, before answering). Outside a tokio runtime every
///   recorded event is kept as unwritten.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, event: keyfold_core::AuditEvent) -> Result<(), Box<dyn std::error::Error>> {
/// use keyfold_postgres::{ChainVerification, PgAuditSink, TablePrefix, migrate};
/// let prefix = TablePrefix::default();
/// migrate(&pool, &prefix).await?;
/// let audit = PgAuditSink::new(pool, prefix);
/// let written = audit.append(&event).await?;
/// match audit.verify().await? {
///     ChainVerification::Intact { head } => assert!(head.seq >= written.seq),
///     ChainVerification::Tampered(t) => eprintln!("audit log tampered with: {t}"),
///     _ => {}
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgAuditSink {
    inner: Arc<Inner>,
}

struct Inner {
    tables: Arc<Tables>,
    prefix: TablePrefix,
    /// The writer task's queue, once started. Dropping it (with the sink)
    /// lets the writer finish what is queued and end.
    queue: Mutex<Option<mpsc::UnboundedSender<Msg>>>,
    /// Shared with the writer task.
    failed: Arc<Mutex<Failed>>,
}

/// What an append needs.
struct Tables {
    pool: PgPool,
    /// `<prefix>audit`, quoted.
    audit: String,
    /// `<prefix>audit_head`, quoted.
    head: String,
}

#[derive(Default)]
struct Failed {
    /// Events the writer gave up on, oldest first.
    unwritten: VecDeque<AuditEvent>,
    last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Msg {
    Event(AuditEvent),
    Flush(oneshot::Sender<()>),
}

/// Most events one background append writes in one transaction.
const BATCH: usize = 256;

/// Delays between the writer's attempts at one batch.
const RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];

impl fmt::Debug for PgAuditSink {
    // The pool's connect options hold the database password: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unwritten = lock(&self.inner.failed).unwritten.len();
        f.debug_struct("PgAuditSink")
            .field("table", &self.inner.prefix.name("audit"))
            .field("unwritten", &unwritten)
            .finish_non_exhaustive()
    }
}

impl PgAuditSink {
    /// An audit sink over `pool`, in the tables `<prefix>audit` and
    /// `<prefix>audit_head` (create them with [`migrate`](crate::migrate)).
    pub fn new(pool: PgPool, prefix: TablePrefix) -> Self {
        PgAuditSink {
            inner: Arc::new(Inner {
                tables: Arc::new(Tables {
                    audit: prefix.table("audit"),
                    head: prefix.table("audit_head"),
                    pool,
                }),
                prefix,
                queue: Mutex::new(None),
                failed: Arc::default(),
            }),
        }
    }

    /// Appends one event; it is committed when this returns `Ok`.
    ///
    /// # Errors
    /// [`PgAuditError`] when it was not written.
    pub async fn append(&self, event: &AuditEvent) -> Result<ChainHead, PgAuditError> {
        self.append_all(std::slice::from_ref(event)).await
    }

    /// Appends `events` in order, in one transaction (all or none), and
    /// returns the chain's new end.
    ///
    /// # Errors
    /// [`PgAuditError`] when they were not written.
    pub async fn append_all(&self, events: &[AuditEvent]) -> Result<ChainHead, PgAuditError> {
        append_all(&self.inner.tables, events).await
    }

    /// Waits until every event given to [`AuditSink::record`] so far has
    /// been written or given up on.
    ///
    /// # Errors
    /// [`PgAuditError::Unwritten`] while events the writer gave up on wait in
    /// [`take_unwritten`](Self::take_unwritten).
    pub async fn flush(&self) -> Result<(), PgAuditError> {
        let queue = lock(&self.inner.queue).clone();
        if let Some(queue) = queue {
            let (tx, rx) = oneshot::channel();
            if queue.send(Msg::Flush(tx)).is_ok() {
                // The writer answers once everything before is handled.
                let _ = rx.await;
            }
        }
        let state = lock(&self.inner.failed);
        if state.unwritten.is_empty() {
            Ok(())
        } else {
            Err(PgAuditError::Unwritten {
                count: state.unwritten.len(),
                last_error: state.last_error.clone().unwrap_or_default(),
            })
        }
    }

    /// Removes and returns the recorded events the writer gave up on,
    /// oldest first (append them again with [`append_all`](Self::append_all)).
    pub fn take_unwritten(&self) -> Vec<AuditEvent> {
        let mut state = lock(&self.inner.failed);
        state.last_error = None;
        state.unwritten.drain(..).collect()
    }

    /// The chain's current end, as the head row says.
    ///
    /// # Errors
    /// [`PgAuditError`] when the database fails or the head is invalid.
    pub async fn head(&self) -> Result<ChainHead, PgAuditError> {
        let mut conn = self.inner.tables.pool.acquire().await?;
        read_head(&mut conn, &self.inner.tables.head, false).await
    }

    /// Checks the whole chain, in row order, in one consistent snapshot.
    ///
    /// # Errors
    /// [`PgAuditError`] when the database fails or the head row is invalid;
    /// tampering is not an error but [`ChainVerification::Tampered`].
    pub async fn verify(&self) -> Result<ChainVerification, PgAuditError> {
        self.verify_inner(None).await
    }

    /// As [`verify`](Self::verify), and also checks that `anchor` (a head
    /// exported earlier) is still in the chain, which catches a rewrite of
    /// every hash from some row up to the head.
    ///
    /// # Errors
    /// As [`verify`](Self::verify).
    pub async fn verify_against(
        &self,
        anchor: &ChainHead,
    ) -> Result<ChainVerification, PgAuditError> {
        self.verify_inner(Some(anchor)).await
    }

    async fn verify_inner(
        &self,
        anchor: Option<&ChainHead>,
    ) -> Result<ChainVerification, PgAuditError> {
        let inner = &self.inner.tables;
        let mut tx = inner.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let head = read_head(&mut tx, &inner.head, false).await?;
        let mut expected_seq = 1u64;
        let mut running = GENESIS;
        // The first row whose link is broken: (seq, the hash it chains to).
        let mut broken_link = None;
        let mut anchor_seen = anchor.is_none_or(|a| a.seq == 0 && a.hash == GENESIS);
        {
            let query = format!(
                "SELECT seq, keyring_id, event, content, prev_hash, hash FROM {} ORDER BY seq",
                inner.audit
            );
            let mut rows = sqlx::query_as::<_, RowTuple>(&query).fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                let row = Row::from(row);
                let seq = u64::try_from(row.seq).unwrap_or(0);
                if seq != expected_seq {
                    // Numbers only grow (primary key, ordered): a gap.
                    return Ok(ChainVerification::Tampered(Tamper::Removed {
                        after: expected_seq - 1,
                    }));
                }
                let (Ok(prev), Ok(hash)) = (
                    <[u8; 32]>::try_from(row.prev_hash.as_slice()),
                    <[u8; 32]>::try_from(row.hash.as_slice()),
                ) else {
                    return Ok(ChainVerification::Tampered(Tamper::Edited { seq }));
                };
                if chain_hash(&prev, &row.content) != hash || !columns_match(&row) {
                    return Ok(ChainVerification::Tampered(Tamper::Edited { seq }));
                }
                if prev != running {
                    broken_link = Some((seq, prev));
                    break;
                }
                if let Some(a) = anchor.filter(|a| a.seq == seq) {
                    if a.hash != hash {
                        return Ok(ChainVerification::Tampered(Tamper::AnchorMissing {
                            seq: a.seq,
                        }));
                    }
                    anchor_seen = true;
                }
                running = hash;
                expected_seq += 1;
            }
        }
        if let Some((seq, prev)) = broken_link {
            // Written after a row elsewhere in the table (moved), or after
            // one that is gone (replaced, or removed and renumbered).
            let predecessor: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT seq FROM {} WHERE hash = $1 ORDER BY seq LIMIT 1",
                inner.audit
            ))
            .bind(prev.as_slice())
            .fetch_optional(&mut *tx)
            .await?;
            let tamper = match predecessor.and_then(|p| u64::try_from(p).ok()) {
                Some(predecessor) => Tamper::Reordered { seq, predecessor },
                None => Tamper::Unlinked { seq },
            };
            return Ok(ChainVerification::Tampered(tamper));
        }
        let last = expected_seq - 1;
        tx.commit().await?;
        if head.seq > last {
            return Ok(ChainVerification::Tampered(Tamper::Removed { after: last }));
        }
        if head.seq < last {
            return Ok(ChainVerification::Tampered(Tamper::Unlinked {
                seq: head.seq + 1,
            }));
        }
        if head.hash != running {
            return Ok(ChainVerification::Tampered(Tamper::Edited { seq: last }));
        }
        if let Some(a) = anchor.filter(|_| !anchor_seen) {
            return Ok(ChainVerification::Tampered(Tamper::AnchorMissing {
                seq: a.seq,
            }));
        }
        Ok(ChainVerification::Intact { head })
    }

    /// Queues `event` for the writer task, starting it if needed.
    fn enqueue(&self, event: AuditEvent) {
        let mut queue = lock(&self.inner.queue);
        let event = match queue.as_ref() {
            Some(queue) => match queue.send(Msg::Event(event)) {
                Ok(()) => return,
                Err(mpsc::error::SendError(Msg::Event(event))) => event,
                Err(_) => return,
            },
            None => event,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let mut failed = lock(&self.inner.failed);
            failed.unwritten.push_back(event);
            failed.last_error = Some("recorded outside a tokio runtime".to_owned());
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive.
        let _ = tx.send(Msg::Event(event));
        *queue = Some(tx);
        runtime.spawn(write_queue(
            self.inner.tables.clone(),
            self.inner.failed.clone(),
            rx,
        ));
    }
}

impl AuditSink for PgAuditSink {
    /// Queues the event for the background writer (see the type's docs):
    /// never blocks, never drops it; check with [`PgAuditSink::flush`].
    fn record(&self, event: AuditEvent) {
        self.enqueue(event);
    }
}

/// The writer task: appends queued events in order, in batches; once the
/// sink is dropped it writes what is still queued, then ends.
async fn write_queue(
    tables: Arc<Tables>,
    failed: Arc<Mutex<Failed>>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e) => batch.push(e),
                Msg::Flush(done) => {
                    flushes.push(done);
                    // Answer after what came before it is written.
                    break;
                }
            }
            if batch.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            let mut result = append_all(&tables, &batch).await;
            for delay in RETRIES {
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(delay).await;
                result = append_all(&tables, &batch).await;
            }
            if let Err(e) = result {
                tracing::error!(error = %e, events = batch.len(), "audit events not written; kept for PgAuditSink::take_unwritten");
                metrics::counter!(keyfold_core::audit::AUDIT_WRITE_FAILURES, "sink" => "postgres")
                    .increment(batch.len() as u64);
                let mut state = lock(&failed);
                state.unwritten.extend(batch.drain(..));
                state.last_error = Some(e.to_string());
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// seq, keyring_id, event, content, prev_hash, hash.
type RowTuple = (i64, String, String, Vec<u8>, Vec<u8>, Vec<u8>);

struct Row {
    seq: i64,
    keyring_id: String,
    event: String,
    content: Vec<u8>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

impl From<RowTuple> for Row {
    fn from((seq, keyring_id, event, content, prev_hash, hash): RowTuple) -> Self {
        Row {
            seq,
            keyring_id,
            event,
            content,
            prev_hash,
            hash,
        }
    }
}

/// The queryable columns agree with the hashed content.
fn columns_match(row: &Row) -> bool {
    serde_json::from_slice::<AuditEvent>(&row.content)
        .is_ok_and(|e| e.keyring_id == row.keyring_id && e.name() == row.event)
}

async fn read_head(
    conn: &mut sqlx::PgConnection,
    head_table: &str,
    for_update: bool,
) -> Result<ChainHead, PgAuditError> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let row: Option<(i64, Vec<u8>)> = sqlx::query_as(&format!(
        "SELECT seq, hash FROM {head_table} WHERE id{lock}"
    ))
    .fetch_optional(&mut *conn)
    .await?;
    let (seq, hash) =
        row.ok_or_else(|| PgAuditError::InvalidHead("no head row (run migrate)".into()))?;
    Ok(ChainHead {
        seq: u64::try_from(seq)
            .map_err(|_| PgAuditError::InvalidHead(format!("negative seq {seq}")))?,
        hash: <[u8; 32]>::try_from(hash.as_slice())
            .map_err(|_| PgAuditError::InvalidHead("hash is not 32 bytes".into()))?,
    })
}

async fn append_all(inner: &Tables, events: &[AuditEvent]) -> Result<ChainHead, PgAuditError> {
    let contents = events
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()?;
    let mut tx = inner.pool.begin().await?;
    // Every writer waits here for the one before it to commit.
    let mut head = read_head(&mut tx, &inner.head, true).await?;
    if events.is_empty() {
        return Ok(head);
    }
    let insert = format!(
        "INSERT INTO {} (seq, keyring_id, event, content, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6)",
        inner.audit
    );
    for (event, content) in events.iter().zip(&contents) {
        let seq = head.seq + 1;
        let hash = chain_hash(&head.hash, content);
        sqlx::query(&insert)
            .bind(i64::try_from(seq).map_err(|_| PgAuditError::InvalidHead("seq overflow".into()))?)
            .bind(&event.keyring_id)
            .bind(event.name())
            .bind(content)
            .bind(head.hash.as_slice())
            .bind(hash.as_slice())
            .execute(&mut *tx)
            .await?;
        head = ChainHead { seq, hash };
    }
    sqlx::query(&format!(
        "UPDATE {} SET seq = $1, hash = $2 WHERE id",
        inner.head
    ))
    .bind(i64::try_from(head.seq).unwrap_or(i64::MAX))
    .bind(head.hash.as_slice())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(head)
}
