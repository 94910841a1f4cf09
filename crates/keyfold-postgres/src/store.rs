//! [`PgKeyringStore`]: keyrings in PostgreSQL (work in progress).

use crate::migrate::Migration;

/// The store's schema steps.
pub(crate) const MIGRATIONS: &[Migration] = &[];

/// Keyrings in one PostgreSQL table (being written).
#[derive(Debug)]
pub struct PgKeyringStore;
