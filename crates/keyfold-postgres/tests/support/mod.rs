//! Test support for keyfold-postgres: a fresh database per test on the
//! server named by `KEYFOLD_PG_URL` (start one with
//! `eval "$(scripts/setup-postgres)"`; scripts/test-all does). Tests never
//! skip: without the variable they panic saying what to do.
//!
//! Each [`TestDb`] is its own database (`keyfold_test_<pid>_<n>_<random>`),
//! so tests are isolated, `LISTEN`/`NOTIFY` channels included, and run in
//! parallel. Databases are left behind; the throwaway cluster is deleted by
//! `scripts/setup-postgres stop`.
#![allow(dead_code, reason = "each test binary uses part of this module")]

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// The server's URL, from `KEYFOLD_PG_URL`; panics when it is unset.
pub(crate) fn server_url() -> String {
    match std::env::var("KEYFOLD_PG_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "KEYFOLD_PG_URL is not set: the keyfold-postgres tests need a PostgreSQL server. \
             Start a throwaway one with `eval \"$(scripts/setup-postgres)\"` (from the repository \
             root; scripts/test-all does this) or export KEYFOLD_PG_URL=postgres://USER@HOST:PORT/DB \
             naming a server where the tests may create databases."
        ),
    }
}

/// Options for the server's own database (the one in `KEYFOLD_PG_URL`).
pub(crate) fn server_options() -> PgConnectOptions {
    let url = server_url();
    PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("KEYFOLD_PG_URL is not a valid PostgreSQL URL: {e}"))
        .disable_statement_logging()
}

/// A fresh, empty database for one test.
#[derive(Clone)]
pub(crate) struct TestDb {
    /// Its name.
    pub(crate) name: String,
    /// Options connecting to it.
    pub(crate) options: PgConnectOptions,
}

impl TestDb {
    /// Creates a database no other test uses.
    pub(crate) async fn new() -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).expect("getrandom");
        let name = format!(
            "keyfold_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            u32::from_le_bytes(random)
        );
        let server = server_options();
        let mut admin = server.connect().await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to the PostgreSQL server of KEYFOLD_PG_URL ({e}); is it running? \
                 (eval \"$(scripts/setup-postgres)\")"
            )
        });
        // The name is ours (no quoting issue): letters, digits, underscores.
        sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = sqlx::Connection::close(admin).await;
        TestDb {
            options: server.database(&name),
            name,
        }
    }

    /// A new pool on this database (up to `max` connections).
    pub(crate) async fn pool_with(&self, max: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max)
            .connect_with(self.options.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }

    /// A new pool on this database (up to 5 connections).
    pub(crate) async fn pool(&self) -> PgPool {
        self.pool_with(5).await
    }

    /// A connection to the server's own database, e.g. to terminate a
    /// backend of this test's database.
    pub(crate) async fn admin(&self) -> sqlx::PgConnection {
        server_options().connect().await.expect("admin connection")
    }
}
