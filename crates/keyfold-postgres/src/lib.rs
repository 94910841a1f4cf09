//! PostgreSQL for a keyfold fleet: the database the services already run
//! becomes the keyrings' store, the audit log and the place a rewrap job's
//! work is shared (docs/LIFECYCLE.md, "PostgreSQL (`keyfold-postgres`)").
//!
//! - [`PgKeyringStore`]: keyrings in one table with compare-and-swap on the
//!   revision, and change notifications through `LISTEN`/`NOTIFY`
//!   ([`KeyringStore::watch`](keyfold_core::KeyringStore::watch)), so a
//!   disable or destroy on one instance reaches the others in milliseconds;
//!   a lost listener connection sends
//!   [`StoreEvent::Resync`](keyfold_core::StoreEvent::Resync) once it is back,
//!   and until then every instance keeps its max-staleness bound.
//! - [`PgAuditSink`]: an append-only, hash-chained audit table whose
//!   [`verify`](PgAuditSink::verify) finds the first row edited, removed or
//!   reordered.
//! - [`PgTable`]: the rewrap job's [`RowSource`](keyfold_rewrap::RowSource)
//!   over any table (id, ciphertext and context columns checked against
//!   the catalog), whose batch compare-and-swap is one statement.
//! - [`RewrapCoordinator`] and [`RewrapWorker`]: one rewrap job run by many
//!   worker processes through job, shard and checkpoint tables; shards are
//!   id ranges claimed with `FOR UPDATE SKIP LOCKED` under leases, each row
//!   is read once, and the completion evidence exists only once every shard
//!   is done (docs/LIFECYCLE.md, "Distributed, on PostgreSQL").
//!
//! Every type takes the host's [`sqlx::PgPool`] and a [`TablePrefix`]
//! (default `keyfold_`); [`migrate`] creates or upgrades the tables. Queries
//! are checked at run time (no database at build time); connections use TLS
//! through rustls as the pool's options ask (`sslmode`; use `verify-full` in
//! production).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keyfold_postgres::{PgAuditSink, PgKeyringStore, TablePrefix, migrate};
//! let pool = sqlx::PgPool::connect("postgres://app@db.internal/app?sslmode=verify-full").await?;
//! let prefix = TablePrefix::default();
//! migrate(&pool, &prefix).await?;
//! let store = PgKeyringStore::new(pool.clone(), prefix.clone());
//! let audit = PgAuditSink::new(pool, prefix);
//! # let _ = (store, audit); Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod audit;
mod job;
mod migrate;
mod store;
mod table;

pub use audit::{ChainHead, ChainVerification, PgAuditError, PgAuditSink, Tamper};
pub use job::{
    DistributedJobError, DistributedJobOptions, JobStatus, MAX_REPORTED_FAILURES,
    RewrapCoordinator, RewrapWorker, WorkerReport,
};
/// What [`RewrapWorker::verify`] takes, re-exported so a worker can be set
/// up without naming `keyfold-rewrap`.
pub use keyfold_rewrap::Verify;
pub use migrate::{InvalidPrefix, MigrateError, TablePrefix, migrate};
pub use store::PgKeyringStore;
pub use table::{IdRange, OnNull, PgTable, PgTableBuilder, TableError};
