//! [`PgAuditSink`]: a hash-chained audit table (work in progress).

use crate::migrate::Migration;

/// The audit table's schema steps.
pub(crate) const MIGRATIONS: &[Migration] = &[];
