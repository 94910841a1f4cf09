//! [`PgTable`]: the rewrap job's [`RowSource`] over any table of the host's.
//!
//! The host names the table, its id column, its ciphertext column and the
//! columns its encryption context is made of; [`PgTableBuilder::build`]
//! checks them against the catalog once, and every statement after that is
//! built from those checked, quoted identifiers only. Row ids, cursors and
//! ciphertexts are always bound parameters.
//!
//! - **Order**: keyset pagination on the id column in the column's own order
//!   (`ORDER BY id`, `id > $cursor`), so bigint ids go 9, 10, 11 and text ids
//!   follow the column's collation. The id is carried as its text form
//!   (`id::text`) and cast back to the column type in SQL.
//! - **Writes**: [`RowSource::compare_and_swap_many`] is one statement,
//!   `UPDATE … FROM unnest($1, $2, $3) … WHERE t.ciphertext = expected
//!   RETURNING id`: a batch of the job costs two round trips, the fetch and
//!   this write.
//! - **Context**: see [`PgTableBuilder::context_column`] (docs/LIFECYCLE.md,
//!   "PostgreSQL").

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use keyfold_core::EncryptionContext;
use keyfold_rewrap::{CasOutcome, CasWrite, Row, RowSource, SourceError};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};

use crate::migrate::quote_ident;

/// What a context column's NULL means (see
/// [`PgTableBuilder::context_column_with`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnNull {
    /// A NULL is an error: the fetch fails with a permanent
    /// [`SourceError`] naming the table, row and column, and the job stops
    /// there until the data is fixed. The default: a context column the
    /// host never leaves NULL.
    #[default]
    Refuse,
    /// The key is left out of the row's context.
    Omit,
    /// The key is in the context with this value (e.g. an empty one).
    Value(Vec<u8>),
}

/// A table configuration the catalog refused, or a database error while
/// checking it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// A schema, table or column name that is not 1..=63 characters of
    /// `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("invalid {what} name {name:?}: use 1..=63 characters, a letter or _ then [A-Za-z0-9_]")]
    InvalidIdentifier {
        /// `schema`, `table` or `column`.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// The id or ciphertext column was not named.
    #[error("PgTable {0} column not set")]
    MissingColumn(&'static str),
    /// No such table (names are case-sensitive, as in the catalog).
    #[error("table {0} not found")]
    TableNotFound(String),
    /// No such column in the table.
    #[error("table {table} has no column {column:?}")]
    ColumnNotFound {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The id column's type is not one of text, varchar, bigint, integer,
    /// smallint or uuid.
    #[error(
        "id column {column:?} has type {type_name}; supported: text, varchar, bigint, integer, smallint, uuid"
    )]
    UnsupportedIdType {
        /// The column.
        column: String,
        /// Its type.
        type_name: String,
    },
    /// The id column may be NULL or has no single-column unique index:
    /// keyset pagination would skip rows.
    #[error(
        "id column {column:?} must be NOT NULL and have a unique index of its own (a primary key)"
    )]
    IdNotUnique {
        /// The column.
        column: String,
    },
    /// The ciphertext column is not `bytea`.
    #[error("ciphertext column {column:?} has type {type_name}, not bytea")]
    CiphertextNotBytea {
        /// The column.
        column: String,
        /// Its type.
        type_name: String,
    },
    /// Two context entries with the same key.
    #[error("context key {0:?} given twice")]
    DuplicateContextKey(String),
    /// The database failed while checking the configuration.
    #[error("checking the table: {0}")]
    Database(#[from] sqlx::Error),
}

/// One half-open range of ids, `[start, end)` in the id column's order;
/// `None` is unbounded. Bounds are ids in their text form.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdRange {
    /// First id of the range (inclusive), or from the start.
    pub start: Option<String>,
    /// First id after the range (exclusive), or to the end.
    pub end: Option<String>,
}

impl IdRange {
    /// Every id.
    pub const ALL: IdRange = IdRange {
        start: None,
        end: None,
    };
}

/// How one context entry is made.
#[derive(Debug, Clone)]
enum ContextEntry {
    /// From a column (index into the select list's context part).
    Column {
        column: String,
        key: String,
        on_null: OnNull,
    },
    /// The same value for every row.
    Constant { key: String, value: Vec<u8> },
}

/// Builds a [`PgTable`]; see [`PgTable::builder`].
#[derive(Debug, Clone)]
pub struct PgTableBuilder {
    schema: String,
    table: String,
    id: Option<String>,
    ciphertext: Option<String>,
    context: Vec<ContextEntry>,
    name: Option<String>,
    scope: Option<(String, String)>,
}

/// A checked context column: quoted, bytea or not.
#[derive(Debug)]
struct ContextColumn {
    column: String,
    key: String,
    bytea: bool,
    on_null: OnNull,
}

/// Everything checked at build time; the SQL pieces are quoted identifiers.
#[derive(Debug)]
struct Spec {
    name: String,
    /// `"schema"."table"`.
    qualified: String,
    /// `"id"`.
    id: String,
    /// The id column's type, for casts of bound text ids.
    id_cast: &'static str,
    /// `"ciphertext"`.
    ciphertext: String,
    columns: Vec<ContextColumn>,
    constants: Vec<(String, Vec<u8>)>,
    /// `("tenant", "text", value)`: only rows whose column holds the value.
    scope: Option<(String, String, String)>,
    /// `t."id"::text, t."ct", <context columns>`.
    select: String,
}

/// A [`RowSource`] over a table of the host's, optionally limited to one
/// [`IdRange`] (the distributed job's shards).
///
/// Cheap to clone; clones share the pool and the [`rows_read`](Self::rows_read)
/// counter (a [`with_range`](Self::with_range) view has its own).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use keyfold_postgres::{OnNull, PgTable};
/// // CREATE TABLE accounts (id bigint PRIMARY KEY, tenant text NOT NULL,
/// //                        region text, secret bytea NOT NULL);
/// // encrypted with the context {"tenant": tenant, "row": id, "table": "accounts"}
/// // and "region" when it is not NULL.
/// let accounts = PgTable::builder("accounts")
///     .id_column("id")
///     .ciphertext_column("secret")
///     .context_column("tenant", "tenant")
///     .context_column("id", "row")
///     .context_column_with("region", "region", OnNull::Omit)
///     .context_constant("table", "accounts")
///     .build(&pool)
///     .await?;
/// # let _ = accounts; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgTable {
    pool: PgPool,
    spec: Arc<Spec>,
    range: IdRange,
    rows_read: Arc<AtomicU64>,
}

impl fmt::Debug for PgTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTable")
            .field("name", &self.spec.name)
            .field("table", &self.spec.qualified)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// Checks a schema, table or column name: 1..=63 characters of
/// `[A-Za-z_][A-Za-z0-9_]*`. Quoted afterwards, so it names exactly that
/// (case-sensitive) object.
fn check_ident(what: &'static str, name: &str) -> Result<String, TableError> {
    let mut bytes = name.bytes();
    let ok = name.len() <= 63
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(TableError::InvalidIdentifier {
            what,
            name: name.to_owned(),
        })
    }
}

impl PgTableBuilder {
    /// The table's schema (default `public`).
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The id column: NOT NULL with a unique index of its own (a primary
    /// key), of type text, varchar, bigint, integer, smallint or uuid.
    #[must_use]
    pub fn id_column(mut self, column: impl Into<String>) -> Self {
        self.id = Some(column.into());
        self
    }

    /// The `bytea` column holding each row's keyfold record (or stream, or
    /// header). Rows where it is NULL hold no record and are not rows of the
    /// job.
    #[must_use]
    pub fn ciphertext_column(mut self, column: impl Into<String>) -> Self {
        self.ciphertext = Some(column.into());
        self
    }

    /// Context entry `key` is the value of `column`, and a NULL is refused
    /// ([`OnNull::Refuse`]).
    ///
    /// The value is the column's bytes for a `bytea` column and its text
    /// form (`column::text`, UTF-8) for any other type: bigint 42 is `"42"`,
    /// a uuid its lowercase hyphenated form, a boolean `"true"`. The host
    /// must build the context the same way when it encrypts, or the row does
    /// not decrypt (the job then counts it failed and writes nothing).
    #[must_use]
    pub fn context_column(self, column: impl Into<String>, key: impl Into<String>) -> Self {
        self.context_column_with(column, key, OnNull::Refuse)
    }

    /// As [`context_column`](Self::context_column), with what a NULL means.
    #[must_use]
    pub fn context_column_with(
        mut self,
        column: impl Into<String>,
        key: impl Into<String>,
        on_null: OnNull,
    ) -> Self {
        self.context.push(ContextEntry::Column {
            column: column.into(),
            key: key.into(),
            on_null,
        });
        self
    }

    /// Context entry `key` is `value` for every row (e.g. the table's name).
    #[must_use]
    pub fn context_constant(mut self, key: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.context.push(ContextEntry::Constant {
            key: key.into(),
            value: value.as_ref().to_vec(),
        });
        self
    }

    /// Only the rows whose `column` equals `value`: one tenant's rows of a
    /// table that holds every tenant's (`WHERE t.tenant = $n` in every
    /// statement, the value always a bound parameter, cast to the column's
    /// type). Index the table on `(column, id)` so a scoped page is an index
    /// range. The id column stays unique on its own.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// use keyfold_postgres::PgTable;
    /// // CREATE TABLE secrets (id bigint PRIMARY KEY, tenant text NOT NULL,
    /// //                       ciphertext bytea NOT NULL);
    /// let acme = PgTable::builder("secrets")
    ///     .id_column("id")
    ///     .ciphertext_column("ciphertext")
    ///     .context_column("tenant", "tenant")
    ///     .scope("tenant", "acme")
    ///     .build(&pool)
    ///     .await?;
    /// # let _ = acme; Ok(()) }
    /// ```
    #[must_use]
    pub fn scope(mut self, column: impl Into<String>, value: impl Into<String>) -> Self {
        self.scope = Some((column.into(), value.into()));
        self
    }

    /// The source's name in checkpoints and reports (default
    /// `schema.table`).
    #[must_use]
    pub fn source_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Checks the configuration against the catalog and makes the table.
    ///
    /// # Errors
    /// [`TableError`]: a bad or unknown name, an id column of another type
    /// or without a unique index, a ciphertext column that is not bytea, a
    /// context key given twice, or the database failing.
    pub async fn build(self, pool: &PgPool) -> Result<PgTable, TableError> {
        let schema = check_ident("schema", &self.schema)?;
        let table = check_ident("table", &self.table)?;
        let id = check_ident("column", &self.id.ok_or(TableError::MissingColumn("id"))?)?;
        let ciphertext = check_ident(
            "column",
            &self
                .ciphertext
                .ok_or(TableError::MissingColumn("ciphertext"))?,
        )?;
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let display = format!("{schema}.{table}");

        let mut keys = HashSet::new();
        for entry in &self.context {
            let key = match entry {
                ContextEntry::Column { column, key, .. } => {
                    check_ident("column", column)?;
                    key
                }
                ContextEntry::Constant { key, .. } => key,
            };
            if !keys.insert(key.clone()) {
                return Err(TableError::DuplicateContextKey(key.clone()));
            }
        }

        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&qualified)
            .fetch_one(pool)
            .await?;
        if !exists {
            return Err(TableError::TableNotFound(display));
        }
        let rows = sqlx::query(
            "SELECT a.attname::text, a.attnum, t.typname::text, a.attnotnull \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(&qualified)
        .fetch_all(pool)
        .await?;
        let mut catalog: BTreeMap<String, (i16, String, bool)> = BTreeMap::new();
        for r in rows {
            catalog.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
        }
        let column = |name: &str| {
            catalog
                .get(name)
                .cloned()
                .ok_or_else(|| TableError::ColumnNotFound {
                    table: display.clone(),
                    column: name.to_owned(),
                })
        };

        let (id_num, id_type, id_not_null) = column(&id)?;
        let id_cast = match id_type.as_str() {
            "text" => "text",
            "varchar" => "varchar",
            "int8" => "bigint",
            "int4" => "integer",
            "int2" => "smallint",
            "uuid" => "uuid",
            _ => {
                return Err(TableError::UnsupportedIdType {
                    column: id,
                    type_name: id_type,
                });
            }
        };
        let unique: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
             WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1 \
             AND i.indkey[0] = $2 AND i.indpred IS NULL AND i.indexprs IS NULL)",
        )
        .bind(&qualified)
        .bind(id_num)
        .fetch_one(pool)
        .await?;
        if !unique || !id_not_null {
            return Err(TableError::IdNotUnique { column: id });
        }
        let (_, ct_type, _) = column(&ciphertext)?;
        if ct_type != "bytea" {
            return Err(TableError::CiphertextNotBytea {
                column: ciphertext,
                type_name: ct_type,
            });
        }

        let mut columns = Vec::new();
        let mut constants = Vec::new();
        for entry in self.context {
            match entry {
                ContextEntry::Column {
                    column: name,
                    key,
                    on_null,
                } => {
                    let (_, type_name, _) = column(&name)?;
                    columns.push(ContextColumn {
                        column: name,
                        key,
                        bytea: type_name == "bytea",
                        on_null,
                    });
                }
                ContextEntry::Constant { key, value } => constants.push((key, value)),
            }
        }
        let scope = match self.scope {
            Some((name, value)) => {
                let checked = check_ident("column", &name)?;
                let (_, type_name, _) = column(&checked)?;
                Some((quote_ident(&checked), quote_ident(&type_name), value))
            }
            None => None,
        };
        let mut select = format!(
            "t.{}::text, t.{}",
            quote_ident(&id),
            quote_ident(&ciphertext)
        );
        for c in &columns {
            let cast = if c.bytea { "" } else { "::text" };
            select.push_str(&format!(", t.{}{cast}", quote_ident(&c.column)));
        }
        Ok(PgTable {
            pool: pool.clone(),
            spec: Arc::new(Spec {
                name: self.name.unwrap_or(display),
                qualified,
                id: quote_ident(&id),
                id_cast,
                ciphertext: quote_ident(&ciphertext),
                columns,
                constants,
                scope,
                select,
            }),
            range: IdRange::ALL,
            rows_read: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// A database error as the job sees it: connection trouble, serialization
/// failures, deadlocks, lock timeouts and server shutdowns are transient.
pub(crate) fn source_error(what: &str, e: &sqlx::Error) -> SourceError {
    let transient = match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("40")
                || c.starts_with("53")
                || matches!(&*c, "55P03" | "57P01" | "57P02" | "57P03" | "57014")
        }),
        _ => false,
    };
    let message = format!("{what}: {e}");
    if transient {
        SourceError::transient(message)
    } else {
        SourceError::permanent(message)
    }
}

impl PgTable {
    /// Starts configuring a table (in schema `public` unless
    /// [`schema`](PgTableBuilder::schema) says otherwise).
    pub fn builder(table: impl Into<String>) -> PgTableBuilder {
        PgTableBuilder {
            schema: "public".to_owned(),
            table: table.into(),
            id: None,
            ciphertext: None,
            context: Vec::new(),
            name: None,
            scope: None,
        }
    }

    /// The same table limited to the ids of `range`: its fetches never
    /// return a row outside it (the bound is in the `WHERE` clause). It
    /// counts its own [`rows_read`](Self::rows_read), from zero.
    #[must_use]
    pub fn with_range(&self, range: IdRange) -> PgTable {
        PgTable {
            pool: self.pool.clone(),
            spec: Arc::clone(&self.spec),
            range,
            rows_read: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The range this table is limited to.
    pub fn range(&self) -> &IdRange {
        &self.range
    }

    /// The pool it uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Rows returned by the database through [`fetch`](RowSource::fetch)
    /// and [`get`](RowSource::get) of this table and its clones, since it
    /// was built: what "rows read per row rewrapped" counts.
    pub fn rows_read(&self) -> u64 {
        self.rows_read.load(Ordering::Relaxed)
    }

    /// Rows in the range that hold a ciphertext (one `count(*)`).
    ///
    /// # Errors
    /// The database's.
    pub async fn count_rows(&self) -> Result<i64, sqlx::Error> {
        let s = &self.spec;
        let mut sql = format!(
            "SELECT count(*) FROM {} AS t WHERE t.{} IS NOT NULL",
            s.qualified, s.ciphertext
        );
        let mut binds: Vec<&str> = Vec::new();
        self.push_range(&mut sql, &mut binds);
        let mut query = sqlx::query_scalar(&sql);
        for b in binds {
            query = query.bind(b);
        }
        query.fetch_one(&self.pool).await
    }

    /// Appends ` AND t.scope = $n` for the [scope](PgTableBuilder::scope),
    /// if there is one.
    fn push_scope<'a>(&'a self, sql: &mut String, binds: &mut Vec<&'a str>) {
        if let Some((column, type_name, value)) = &self.spec.scope {
            binds.push(value);
            sql.push_str(&format!(" AND t.{column} = ${}::{type_name}", binds.len()));
        }
    }

    /// Appends the scope, then ` AND t.id >= $n` / ` AND t.id < $n` for the
    /// range's bounds.
    fn push_range<'a>(&'a self, sql: &mut String, binds: &mut Vec<&'a str>) {
        self.push_scope(sql, binds);
        let s = &self.spec;
        for (op, bound) in [(">=", &self.range.start), ("<", &self.range.end)] {
            if let Some(b) = bound {
                binds.push(b);
                sql.push_str(&format!(
                    " AND t.{} {op} ${}::{}",
                    s.id,
                    binds.len(),
                    s.id_cast
                ));
            }
        }
    }

    /// Up to `n` ranges that together hold every id, each with about the
    /// same number of rows (quantiles of the ids now; ids added later fall
    /// into one of them too). Fewer when the table has few distinct ids;
    /// one, unbounded, when it is empty.
    ///
    /// # Errors
    /// The database's.
    pub async fn split(&self, n: u32) -> Result<Vec<IdRange>, sqlx::Error> {
        let n = n.max(1);
        let fractions: Vec<f64> = (1..n).map(|i| f64::from(i) / f64::from(n)).collect();
        let bounds: Option<Vec<Option<String>>> = if fractions.is_empty() {
            None
        } else {
            let mut sql = format!(
                "SELECT (percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY t.{id}))::text[] \
                 FROM {table} AS t WHERE true",
                id = self.spec.id,
                table = self.spec.qualified
            );
            // $1 is the fractions: the scope's value is $2.
            let mut binds: Vec<&str> = vec![""];
            self.push_scope(&mut sql, &mut binds);
            let mut query = sqlx::query_scalar(&sql).bind(&fractions);
            for b in binds.into_iter().skip(1) {
                query = query.bind(b);
            }
            query.fetch_one(&self.pool).await?
        };
        let mut cuts: Vec<String> = Vec::new();
        for b in bounds.unwrap_or_default().into_iter().flatten() {
            // Quantiles come sorted; equal ones (few distinct ids) merge.
            if cuts.last() != Some(&b) {
                cuts.push(b);
            }
        }
        // The first quantile cannot be the smallest id's lower bound: the
        // first range starts unbounded anyway.
        let mut ranges = Vec::with_capacity(cuts.len() + 1);
        let mut start = None;
        for cut in cuts {
            ranges.push(IdRange {
                start: start.take(),
                end: Some(cut.clone()),
            });
            start = Some(cut);
        }
        ranges.push(IdRange { start, end: None });
        Ok(ranges)
    }

    /// Builds a row from `t.id::text, t.ct, <context columns>`.
    fn row(&self, r: &PgRow) -> Result<Row, SourceError> {
        let decode = |e: sqlx::Error| source_error(&self.spec.name, &e);
        let id: String = r.try_get(0).map_err(decode)?;
        let ciphertext: Vec<u8> = r.try_get(1).map_err(decode)?;
        let mut context = EncryptionContext::new();
        for (key, value) in &self.spec.constants {
            context.insert(key.clone(), value);
        }
        for (k, c) in self.spec.columns.iter().enumerate() {
            // Borrowed from the row: the context copies it once.
            let value: Option<&[u8]> = if c.bytea {
                r.try_get(k + 2).map_err(decode)?
            } else {
                r.try_get::<Option<&str>, _>(k + 2)
                    .map_err(decode)?
                    .map(str::as_bytes)
            };
            match (value, &c.on_null) {
                (Some(v), _) => context.insert(c.key.clone(), v),
                (None, OnNull::Omit) => {}
                (None, OnNull::Value(v)) => context.insert(c.key.clone(), v),
                (None, OnNull::Refuse) => {
                    return Err(SourceError::permanent(format!(
                        "{}: row {id}: context column {:?} is NULL (refused by the table's configuration)",
                        self.spec.name, c.column
                    )));
                }
            }
        }
        Ok(Row {
            cursor: id.clone(),
            id,
            context,
            ciphertext,
        })
    }
}

#[async_trait]
impl RowSource for PgTable {
    fn name(&self) -> &str {
        &self.spec.name
    }

    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        let s = &self.spec;
        let mut sql = format!(
            "SELECT {} FROM {} AS t WHERE t.{} IS NOT NULL",
            s.select, s.qualified, s.ciphertext
        );
        let mut binds: Vec<&str> = Vec::new();
        if let Some(after) = after {
            binds.push(after);
            sql.push_str(&format!(" AND t.{} > $1::{}", s.id, s.id_cast));
        }
        self.push_range(&mut sql, &mut binds);
        sql.push_str(&format!(" ORDER BY t.{} LIMIT ${}", s.id, binds.len() + 1));
        let mut query = sqlx::query(&sql);
        for b in binds {
            query = query.bind(b);
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = query
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| source_error(&s.name, &e))?;
        self.rows_read
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        rows.iter().map(|r| self.row(r)).collect()
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        let s = &self.spec;
        let mut sql = format!(
            "SELECT {} FROM {} AS t WHERE t.{} = $1::{} AND t.{} IS NOT NULL",
            s.select, s.qualified, s.id, s.id_cast, s.ciphertext
        );
        let mut binds = vec![id];
        self.push_scope(&mut sql, &mut binds);
        let mut query = sqlx::query(&sql);
        for b in binds {
            query = query.bind(b);
        }
        let row = query
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| source_error(&s.name, &e))?;
        match row {
            Some(r) => {
                self.rows_read.fetch_add(1, Ordering::Relaxed);
                self.row(&r).map(Some)
            }
            None => Ok(None),
        }
    }

    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        let s = &self.spec;
        let mut sql = format!(
            "UPDATE {} AS t SET {ct} = $3 WHERE t.{} = $1::{} AND t.{ct} = $2",
            s.qualified,
            s.id,
            s.id_cast,
            ct = s.ciphertext
        );
        // $1..$3 are bound below: the scope's value is $4.
        let mut binds: Vec<&str> = vec!["", "", ""];
        self.push_scope(&mut sql, &mut binds);
        let mut query = sqlx::query(&sql).bind(id).bind(expected).bind(new);
        for b in binds.into_iter().skip(3) {
            query = query.bind(b);
        }
        let done = query
            .execute(&self.pool)
            .await
            .map_err(|e| source_error(&s.name, &e))?;
        Ok(if done.rows_affected() == 1 {
            CasOutcome::Swapped
        } else {
            CasOutcome::Conflict
        })
    }

    /// One statement for the whole batch:
    /// `UPDATE t SET ct = w.new FROM unnest($1, $2, $3) WITH ORDINALITY AS
    /// w(id, expected, new, n) WHERE t.id = w.id AND t.ct = w.expected
    /// RETURNING w.n` (the positions of the writes that swapped).
    async fn compare_and_swap_many(
        &self,
        writes: &[CasWrite<'_>],
    ) -> Result<Vec<CasOutcome>, SourceError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = writes.iter().map(|w| w.id).collect();
        if ids.iter().collect::<HashSet<_>>().len() != ids.len() {
            // One UPDATE touches a row once: write repeated ids one by one.
            let mut out = Vec::with_capacity(writes.len());
            for w in writes {
                out.push(self.compare_and_swap(w.id, w.expected, w.new).await?);
            }
            return Ok(out);
        }
        let expected: Vec<&[u8]> = writes.iter().map(|w| w.expected).collect();
        let new: Vec<&[u8]> = writes.iter().map(|w| w.new).collect();
        let s = &self.spec;
        let mut sql = format!(
            "UPDATE {} AS t SET {ct} = w.new \
             FROM unnest($1::text[], $2::bytea[], $3::bytea[]) WITH ORDINALITY \
               AS w(id, expected, new, n) \
             WHERE t.{} = w.id::{} AND t.{ct} = w.expected",
            s.qualified,
            s.id,
            s.id_cast,
            ct = s.ciphertext
        );
        // $1..$3 are the arrays: the scope's value is $4.
        let mut binds: Vec<&str> = vec!["", "", ""];
        self.push_scope(&mut sql, &mut binds);
        sql.push_str(" RETURNING w.n");
        let mut query = sqlx::query_scalar(&sql)
            .bind(&ids)
            .bind(&expected)
            .bind(&new);
        for b in binds.into_iter().skip(3) {
            query = query.bind(b);
        }
        let swapped: Vec<i64> = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| source_error(&s.name, &e))?;
        let mut out = vec![CasOutcome::Conflict; writes.len()];
        for n in swapped {
            // 1-based positions in the arrays sent.
            let slot = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| {
                    SourceError::permanent(format!(
                        "{}: the batched write answered position {n} for {} writes",
                        s.name,
                        writes.len()
                    ))
                })?;
            *slot = CasOutcome::Swapped;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["a", "A", "_x", "accounts_2024", &"a".repeat(63)] {
            assert_eq!(check_ident("table", ok).unwrap(), ok);
        }
        for bad in [
            "",
            "1a",
            "a-b",
            "a b",
            "a\"b",
            "a;drop table x",
            "a.b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(
                    check_ident("table", bad),
                    Err(TableError::InvalidIdentifier { what: "table", .. })
                ),
                "{bad:?}"
            );
        }
    }
}
