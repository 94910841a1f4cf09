//! A rewrap [`RowSource`] over any SQLite table, described by a job spec:
//! the table, its id column, its ciphertext column (BLOB) and how each row's
//! encryption context is made (columns and constant values). Keyset
//! pagination in id order; compare-and-swap by `UPDATE … WHERE ciphertext = ?`.
//! Identifiers come from the operator's spec and are always quoted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use keyfold_core::EncryptionContext;
use keyfold_rewrap::{CasOutcome, Row, RowSource, SourceError};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde::Deserialize;

use crate::error::CliError;

/// Where one context entry's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ContextSource {
    /// The row's value in this column: TEXT and BLOB as their bytes,
    /// INTEGER in decimal; a NULL leaves the entry out.
    Column(String),
    /// The same bytes for every row (e.g. the table's name).
    Value(String),
}

/// One table of a job spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableSpec {
    /// The table.
    pub(crate) name: String,
    /// Its primary key (TEXT or INTEGER).
    pub(crate) id_column: String,
    /// The BLOB column holding keyfold records.
    pub(crate) ciphertext_column: String,
    /// Context key → where its value comes from, as the application
    /// encrypted the rows.
    #[serde(default)]
    pub(crate) context: BTreeMap<String, ContextSource>,
}

/// `"name"`, with embedded quotes doubled.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table as a rewrap source.
pub(crate) struct SqliteTable {
    conn: Arc<Mutex<Connection>>,
    name: String,
    table: String,
    id: String,
    ciphertext: String,
    /// Context entries; `Column` holds an index into the select list.
    context: Vec<(String, Entry)>,
    /// Columns after id and ciphertext in every SELECT.
    extra_columns: Vec<String>,
    integer_ids: bool,
}

enum Entry {
    Column(usize),
    Value(Vec<u8>),
}

fn db_err(e: rusqlite::Error) -> SourceError {
    match &e {
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            SourceError::transient(e.to_string())
        }
        _ => SourceError::permanent(e.to_string()),
    }
}

impl SqliteTable {
    /// Checks `spec` against the database (table and columns exist) and
    /// builds the source.
    pub(crate) fn new(conn: Arc<Mutex<Connection>>, spec: &TableSpec) -> Result<Self, CliError> {
        let columns: Vec<(String, String)> = {
            let c = conn
                .lock()
                .map_err(|_| CliError::failure("database connection poisoned"))?;
            let mut stmt = c
                .prepare("SELECT name, type FROM pragma_table_info(?1)")
                .map_err(|e| CliError::failure(e.to_string()))?;
            stmt.query_map([&spec.name], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(Iterator::collect)
                .map_err(|e| CliError::failure(e.to_string()))?
        };
        if columns.is_empty() {
            return Err(CliError::usage(format!(
                "job spec: the database has no table {:?}",
                spec.name
            )));
        }
        let has = |c: &str| columns.iter().any(|(n, _)| n == c);
        let mut wanted = vec![&spec.id_column, &spec.ciphertext_column];
        let mut extra_columns = Vec::new();
        let mut context = Vec::new();
        for (key, source) in &spec.context {
            match source {
                ContextSource::Column(c) => {
                    wanted.push(c);
                    let at = match extra_columns.iter().position(|e| e == c) {
                        Some(i) => i,
                        None => {
                            extra_columns.push(c.clone());
                            extra_columns.len() - 1
                        }
                    };
                    context.push((key.clone(), Entry::Column(2 + at)));
                }
                ContextSource::Value(v) => {
                    context.push((key.clone(), Entry::Value(v.as_bytes().to_vec())));
                }
            }
        }
        if let Some(missing) = wanted.iter().find(|c| !has(c)) {
            return Err(CliError::usage(format!(
                "job spec: table {:?} has no column {missing:?}",
                spec.name
            )));
        }
        let integer_ids = columns
            .iter()
            .find(|(n, _)| *n == spec.id_column)
            .is_some_and(|(_, t)| t.to_ascii_uppercase().contains("INT"));
        Ok(SqliteTable {
            conn,
            name: spec.name.clone(),
            table: quote(&spec.name),
            id: quote(&spec.id_column),
            ciphertext: quote(&spec.ciphertext_column),
            context,
            extra_columns,
            integer_ids,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, SourceError> {
        self.conn
            .lock()
            .map_err(|_| SourceError::permanent("database connection poisoned"))
    }

    fn columns(&self) -> String {
        let mut list = vec![self.id.clone(), self.ciphertext.clone()];
        list.extend(self.extra_columns.iter().map(|c| quote(c)));
        list.join(", ")
    }

    /// An id as the column stores it.
    fn id_value(&self, id: &str) -> Value {
        match (self.integer_ids, id.parse::<i64>()) {
            (true, Ok(n)) => Value::Integer(n),
            _ => Value::Text(id.to_owned()),
        }
    }

    fn row(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Row, SourceError>> {
        let id = match r.get_ref(0)? {
            ValueRef::Integer(n) => n.to_string(),
            ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            other => {
                return Ok(Err(SourceError::permanent(format!(
                    "{}: an id of type {:?} is not supported (TEXT or INTEGER)",
                    self.name,
                    other.data_type()
                ))));
            }
        };
        let ciphertext = match r.get_ref(1)? {
            ValueRef::Blob(b) => b.to_vec(),
            other => {
                return Ok(Err(SourceError::permanent(format!(
                    "{} row {id}: the ciphertext is {:?}, not a BLOB",
                    self.name,
                    other.data_type()
                ))));
            }
        };
        let mut context = EncryptionContext::new();
        for (key, entry) in &self.context {
            match entry {
                Entry::Value(v) => context.insert(key.clone(), v),
                Entry::Column(i) => match r.get_ref(*i)? {
                    ValueRef::Null => {}
                    ValueRef::Integer(n) => context.insert(key.clone(), n.to_string()),
                    ValueRef::Text(t) | ValueRef::Blob(t) => context.insert(key.clone(), t),
                    ValueRef::Real(_) => {
                        return Ok(Err(SourceError::permanent(format!(
                            "{} row {id}: context column for {key:?} is REAL (TEXT, BLOB or INTEGER)",
                            self.name
                        ))));
                    }
                },
            }
        }
        Ok(Ok(Row {
            cursor: id.clone(),
            id,
            context,
            ciphertext,
        }))
    }
}

#[async_trait]
impl RowSource for SqliteTable {
    fn name(&self) -> &str {
        &self.name
    }

    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        let conn = self.lock()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (sql, args) = match after {
            Some(cursor) => (
                format!(
                    "SELECT {} FROM {} WHERE {} > ?1 ORDER BY {} LIMIT ?2",
                    self.columns(),
                    self.table,
                    self.id,
                    self.id
                ),
                vec![self.id_value(cursor), Value::Integer(limit)],
            ),
            None => (
                format!(
                    "SELECT {} FROM {} ORDER BY {} LIMIT ?1",
                    self.columns(),
                    self.table,
                    self.id
                ),
                vec![Value::Integer(limit)],
            ),
        };
        let mut stmt = conn.prepare(&sql).map_err(db_err)?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| self.row(r))
            .map_err(db_err)?;
        rows.map(|r| r.map_err(db_err).and_then(|r| r)).collect()
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        let conn = self.lock()?;
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?1",
            self.columns(),
            self.table,
            self.id
        );
        conn.query_row(&sql, [self.id_value(id)], |r| self.row(r))
            .optional()
            .map_err(db_err)?
            .transpose()
    }

    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        let conn = self.lock()?;
        let sql = format!(
            "UPDATE {} SET {} = ?1 WHERE {} = ?2 AND {} = ?3",
            self.table, self.ciphertext, self.id, self.ciphertext
        );
        let changed = conn
            .execute(&sql, rusqlite::params![new, self.id_value(id), expected])
            .map_err(db_err)?;
        Ok(if changed == 1 {
            CasOutcome::Swapped
        } else {
            CasOutcome::Conflict
        })
    }

    async fn count_after(&self, after: Option<&str>) -> Option<u64> {
        let conn = self.lock().ok()?;
        let n: i64 = match after {
            Some(cursor) => conn.query_row(
                &format!("SELECT COUNT(*) FROM {} WHERE {} > ?1", self.table, self.id),
                [self.id_value(cursor)],
                |r| r.get(0),
            ),
            None => conn.query_row(&format!("SELECT COUNT(*) FROM {}", self.table), [], |r| {
                r.get(0)
            }),
        }
        .ok()?;
        u64::try_from(n).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("t"), "\"t\"");
        assert_eq!(
            quote("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
    }
}
