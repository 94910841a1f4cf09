//! A keyfold-rewrap `RowSource` over one SQLite table: copy and adapt it.
//!
//! The table has `id TEXT PRIMARY KEY, tenant TEXT, ciphertext BLOB`. The
//! encryption context of a row is (tenant, table, row id), as the
//! application used when it wrote the row. `rusqlite` is synchronous: calls
//! are short and made under a mutex; a host on an async driver (sqlx) would
//! await instead.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use keyfold_core::EncryptionContext;
use keyfold_rewrap::{CasOutcome, Row, RowSource, SourceError};
use rusqlite::{Connection, OptionalExtension, params};

/// The tables the demo encrypts.
pub const TABLES: [&str; 2] = ["secret_environment_configs", "integration_configs"];

/// The context a row of `table` is bound to.
pub fn context(tenant: &str, table: &str, id: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", tenant)
        .with("table", table)
        .with("row", id)
}

/// Opens (or creates) the database and its tables.
///
/// # Errors
/// SQLite errors.
pub fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // In WAL mode, NORMAL syncs at checkpoints, not at every commit: a crash
    // of the process loses nothing committed; a power loss may lose the last
    // commits, which for a rewrap means rows still on the old version (still
    // readable) and a checkpoint no further than its rows (it is written in
    // the same database, after them).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    for table in TABLES {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 id TEXT PRIMARY KEY, tenant TEXT NOT NULL, ciphertext BLOB NOT NULL)"
        ))?;
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS rewrap_job (
             id INTEGER PRIMARY KEY CHECK (id = 1), checkpoint TEXT NOT NULL)",
    )?;
    Ok(conn)
}

fn db_err(e: rusqlite::Error) -> SourceError {
    match e {
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            SourceError::transient(e.to_string())
        }
        e => SourceError::permanent(e.to_string()),
    }
}

/// One table as a rewrap source.
pub struct SqliteTable {
    conn: Arc<Mutex<Connection>>,
    table: &'static str,
}

impl SqliteTable {
    /// `table` (one of [`TABLES`]) over a shared connection.
    pub fn new(conn: Arc<Mutex<Connection>>, table: &'static str) -> Self {
        SqliteTable { conn, table }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, SourceError> {
        self.conn
            .lock()
            .map_err(|_| SourceError::permanent("connection mutex poisoned"))
    }

    fn row(&self, id: String, tenant: String, ciphertext: Vec<u8>) -> Row {
        Row {
            context: context(&tenant, self.table, &id),
            cursor: id.clone(),
            id,
            ciphertext,
        }
    }
}

#[async_trait]
impl RowSource for SqliteTable {
    fn name(&self) -> &str {
        self.table
    }

    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, tenant, ciphertext FROM {} WHERE id > ?1 ORDER BY id LIMIT ?2",
                self.table
            ))
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![after.unwrap_or(""), limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(db_err)?;
        rows.map(|r| {
            r.map(|(id, tenant, ct)| self.row(id, tenant, ct))
                .map_err(db_err)
        })
        .collect()
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        let conn = self.lock()?;
        conn.query_row(
            &format!(
                "SELECT tenant, ciphertext FROM {} WHERE id = ?1",
                self.table
            ),
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db_err)
        .map(|found| found.map(|(tenant, ct)| self.row(id.to_owned(), tenant, ct)))
    }

    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        let conn = self.lock()?;
        let changed = conn
            .prepare(&format!(
                "UPDATE {} SET ciphertext = ?1 WHERE id = ?2 AND ciphertext = ?3",
                self.table
            ))
            .and_then(|mut stmt| stmt.execute(params![new, id, expected]))
            .map_err(db_err)?;
        Ok(if changed == 1 {
            CasOutcome::Swapped
        } else {
            CasOutcome::Conflict
        })
    }

    async fn count_after(&self, after: Option<&str>) -> Option<u64> {
        let conn = self.lock().ok()?;
        conn.query_row(
            &format!("SELECT COUNT(*) FROM {} WHERE id > ?1", self.table),
            params![after.unwrap_or("")],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .and_then(|n| u64::try_from(n).ok())
    }
}
