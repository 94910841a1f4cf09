//! One worker process of a distributed rewrap job (#17), for the local KEK
//! and file store: the crash test's worker, and a template for a host's own
//! (which would build its keyring with its KMS wrapper instead).
//!
//! ```text
//! keyfold-pg-worker SPEC.json
//! ```
//!
//! `SPEC.json` names the database, the keyring and the job's tables:
//!
//! ```json
//! {
//!   "database_url": "postgres://app@127.0.0.1:5432/app",
//!   "prefix": "keyfold_",
//!   "keyring_id": "acme", "keyring_dir": "/var/lib/app/keyring",
//!   "kek_id": "local-kek", "kek_file": "/var/lib/app/kek.hex",
//!   "job_id": "…", "name": "worker-1",
//!   "tables": [{
//!     "table": "accounts", "id": "id", "ciphertext": "secret",
//!     "context": [{"column": "id", "key": "row"},
//!                 {"column": "region", "key": "region", "on_null": "omit"}],
//!     "constants": {"table": "accounts"}
//!   }]
//! }
//! ```
//!
//! It works shards until every shard of the job is done, then prints one
//! line with what it did and exits 0; on an error it prints it and exits 1.
//! Kill it at any moment: its shard's lease lapses and another worker
//! resumes the shard from its checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyfold_core::LocalKek;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::FileStore;
use keyfold_postgres::{OnNull, PgTable, RewrapCoordinator, TablePrefix};
use serde::Deserialize;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    database_url: String,
    #[serde(default)]
    prefix: Option<String>,
    keyring_id: String,
    keyring_dir: PathBuf,
    kek_id: String,
    kek_file: PathBuf,
    job_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    poll_ms: Option<u64>,
    tables: Vec<TableSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSpec {
    #[serde(default)]
    schema: Option<String>,
    table: String,
    id: String,
    ciphertext: String,
    #[serde(default)]
    context: Vec<ContextSpec>,
    #[serde(default)]
    constants: BTreeMap<String, String>,
    #[serde(default)]
    source_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextSpec {
    column: String,
    key: String,
    #[serde(default)]
    on_null: NullSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum NullSpec {
    #[default]
    Refuse,
    Omit,
    Value(String),
}

async fn table(pool: &sqlx::PgPool, t: TableSpec) -> Result<PgTable> {
    let mut b = PgTable::builder(t.table)
        .id_column(t.id)
        .ciphertext_column(t.ciphertext);
    if let Some(schema) = t.schema {
        b = b.schema(schema);
    }
    if let Some(name) = t.source_name {
        b = b.source_name(name);
    }
    for c in t.context {
        let on_null = match c.on_null {
            NullSpec::Refuse => OnNull::Refuse,
            NullSpec::Omit => OnNull::Omit,
            NullSpec::Value(v) => OnNull::Value(v.into_bytes()),
        };
        b = b.context_column_with(c.column, c.key, on_null);
    }
    for (k, v) in t.constants {
        b = b.context_constant(k, v);
    }
    Ok(b.build(pool).await?)
}

async fn run(spec_path: &str) -> Result<()> {
    let spec: Spec = serde_json::from_slice(&std::fs::read(spec_path)?)?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&spec.database_url)
        .await?;
    let prefix = match &spec.prefix {
        Some(p) => TablePrefix::new(p)?,
        None => TablePrefix::default(),
    };
    let kek = LocalKek::from_file(spec.kek_id, &spec.kek_file)?;
    let keyring = Keyring::builder(
        spec.keyring_id,
        Arc::new(kek),
        Arc::new(FileStore::new(spec.keyring_dir)?),
    )
    .open()
    .await?;
    let mut tables = Vec::new();
    for t in spec.tables {
        tables.push(table(&pool, t).await?);
    }
    let coordinator = RewrapCoordinator::new(pool, prefix);
    let mut worker = coordinator.worker(&spec.job_id, Arc::new(keyring), tables);
    if let Some(name) = spec.name {
        worker = worker.name(name);
    }
    if let Some(ms) = spec.poll_ms {
        worker = worker.poll_interval(Duration::from_millis(ms));
    }
    let report = worker.run().await?;
    println!(
        "done: {} shards finished, {} lost, {} batches, {} rows read, {} rewrapped, {} skipped, {} conflicts, {} failed",
        report.shards_finished,
        report.shards_lost,
        report.batches,
        report.rows_read,
        report.counters.rewrapped,
        report.counters.skipped,
        report.counters.conflicts,
        report.counters.failed + report.counters.unresolved,
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [spec] = args.as_slice() else {
        eprintln!("usage: keyfold-pg-worker SPEC.json");
        std::process::exit(2);
    };
    if let Err(e) = run(spec).await {
        eprintln!("keyfold-pg-worker: {e}");
        std::process::exit(1);
    }
}
