//! Table names and migrations.
//!
//! Every table of this crate is named `<prefix><name>`, where the prefix is a
//! [`TablePrefix`] the host chooses once (default `keyfold_`): validated when
//! it is made, and always written into SQL as a quoted identifier. Nothing a
//! tenant sends ever becomes part of an identifier: keyring ids, job ids and
//! the like are bound parameters.
//!
//! [`migrate`] brings every table up to date. Each part of the crate owns its
//! steps (a [`Migration`] list next to its code); applied steps are recorded
//! in `<prefix>migrations`, and the whole run holds a transaction-scoped
//! advisory lock, so many instances may call it at start-up at once.

use std::fmt;

use sqlx::PgPool;

/// The prefix of every table name this crate uses (see the module docs).
///
/// 1 to 40 characters: a lowercase ASCII letter, then lowercase letters,
/// digits or `_` (so that, quoted, it names the same table as unquoted).
///
/// ```
/// use keyfold_postgres::TablePrefix;
/// assert_eq!(TablePrefix::default().as_str(), "keyfold_");
/// assert!(TablePrefix::new("tenant_keys_").is_ok());
/// assert!(TablePrefix::new("x\"; DROP TABLE users; --").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TablePrefix(String);

/// The longest prefix accepted: with the longest table name of this crate it
/// stays under PostgreSQL's 63-byte identifier limit.
const MAX_PREFIX: usize = 40;

/// A [`TablePrefix`] that is not 1..=40 characters of `[a-z][a-z0-9_]*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table prefix {0:?}: use 1..=40 characters, a lowercase letter then [a-z0-9_]")]
pub struct InvalidPrefix(pub String);

impl TablePrefix {
    /// The prefix `keyfold_`.
    pub const DEFAULT: &'static str = "keyfold_";

    /// Checks and wraps `prefix`.
    ///
    /// # Errors
    /// [`InvalidPrefix`] unless it is 1..=40 characters, a lowercase ASCII
    /// letter followed by lowercase letters, digits or `_`.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let mut bytes = prefix.bytes();
        let ok = prefix.len() <= MAX_PREFIX
            && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(TablePrefix(prefix.to_owned()))
        } else {
            Err(InvalidPrefix(prefix.to_owned()))
        }
    }

    /// The prefix itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The unquoted name of this crate's table `name` (`<prefix><name>`),
    /// e.g. to name a notification channel or to show to an operator.
    ///
    /// `name` is one of this crate's own constant table names.
    pub fn name(&self, name: &str) -> String {
        debug_assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "table names are crate constants"
        );
        format!("{}{name}", self.0)
    }

    /// The quoted identifier of this crate's table `name`, ready to splice
    /// into SQL: `"<prefix><name>"`.
    pub fn table(&self, name: &str) -> String {
        quote_ident(&self.name(name))
    }
}

impl Default for TablePrefix {
    fn default() -> Self {
        TablePrefix(Self::DEFAULT.to_owned())
    }
}

impl fmt::Debug for TablePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TablePrefix({:?})", self.0)
    }
}

impl fmt::Display for TablePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TablePrefix {
    type Err = InvalidPrefix;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// `"ident"`, with any `"` doubled (SQL's identifier quoting).
pub(crate) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A migration failed; nothing of that run was applied (one transaction).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The database refused a step or could not be reached.
    #[error("migration {component} v{version} failed: {source}")]
    Step {
        /// The part of the crate whose step failed (`store`, `audit`, ...).
        component: &'static str,
        /// The step.
        version: i32,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// Before or after the steps (connection, lock, ledger, commit).
    #[error("migrations: {0}")]
    Database(#[from] sqlx::Error),
}

/// One schema step of one part of the crate. Steps of a component run in
/// `version` order, each once per prefix.
#[derive(Clone, Copy)]
pub(crate) struct Migration {
    /// The owning part (`store`, `audit`, `job`, ...).
    pub(crate) component: &'static str,
    /// 1, 2, ... within the component; never renumbered once released.
    pub(crate) version: i32,
    /// The SQL of the step, given the prefix (may hold several statements).
    pub(crate) sql: fn(&TablePrefix) -> String,
}

/// Every component's steps, in the order they are applied.
fn all_steps() -> Vec<Migration> {
    let mut steps = Vec::new();
    steps.extend_from_slice(crate::store::MIGRATIONS);
    steps.extend_from_slice(crate::audit::MIGRATIONS);
    steps.extend_from_slice(crate::job::MIGRATIONS);
    steps
}

/// Creates or upgrades every table of this crate under `prefix`.
///
/// Safe to call from every instance at start-up: runs in one transaction
/// under an advisory lock; steps already applied are skipped.
///
/// # Errors
/// [`MigrateError`] when the database refuses a step (nothing of this run is
/// kept) or cannot be reached.
pub async fn migrate(pool: &PgPool, prefix: &TablePrefix) -> Result<(), MigrateError> {
    apply(pool, prefix, &all_steps()).await
}

/// Applies `steps` that are not yet recorded for `prefix`.
pub(crate) async fn apply(
    pool: &PgPool,
    prefix: &TablePrefix,
    steps: &[Migration],
) -> Result<(), MigrateError> {
    let mut tx = pool.begin().await?;
    // One migrator per prefix at a time (also serialises the ledger's CREATE).
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(prefix.name("migrations"))
        .execute(&mut *tx)
        .await?;
    let ledger = prefix.table("migrations");
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {ledger} (
            component text NOT NULL,
            version integer NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (component, version)
        )"
    ))
    .execute(&mut *tx)
    .await?;
    for step in steps {
        let done: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT version FROM {ledger} WHERE component = $1 AND version = $2"
        ))
        .bind(step.component)
        .bind(step.version)
        .fetch_optional(&mut *tx)
        .await?;
        if done.is_some() {
            continue;
        }
        let fail = |source| MigrateError::Step {
            component: step.component,
            version: step.version,
            source,
        };
        sqlx::raw_sql(&(step.sql)(prefix))
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        sqlx::query(&format!(
            "INSERT INTO {ledger} (component, version) VALUES ($1, $2)"
        ))
        .bind(step.component)
        .bind(step.version)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        for ok in ["a", "keyfold_", "t1_", &"a".repeat(40)] {
            assert_eq!(TablePrefix::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "1a",
            "_a",
            "A",
            "aB",
            "a-b",
            "a b",
            "a\"b",
            "a;",
            "é",
            &"a".repeat(41),
        ] {
            assert_eq!(TablePrefix::new(bad), Err(InvalidPrefix(bad.to_owned())));
        }
        let p = TablePrefix::new("t_").unwrap();
        assert_eq!(p.name("keyrings"), "t_keyrings");
        assert_eq!(p.table("keyrings"), "\"t_keyrings\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
