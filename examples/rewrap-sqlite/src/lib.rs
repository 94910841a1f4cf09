//! keyfold-rewrap on SQLite: the [`store::SqliteTable`] adapter (copy it into
//! your service), used by the `rewrap-sqlite` demo binary and its crash test.
#![forbid(unsafe_code)]

pub mod store;
