//! Helpers for the PgTable and distributed-job tests: a keyring, tables of
//! encrypted rows, and checks over them.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "test support shared by test binaries"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::MemoryStore;
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{EncryptionContext, LocalKek, SecretKey, format};
use sqlx::PgPool;

pub fn admin() -> Actor {
    Actor::new("test-admin")
}

/// A keyring on a manual clock (give the job the same clock), version 1
/// active; every bound a test may need to wait out is zero.
pub async fn keyring() -> (Arc<Keyring>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let ring = Keyring::builder(
        "tenant",
        Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap())),
        Arc::new(MemoryStore::new()),
    )
    .max_staleness(Duration::ZERO)
    .write_window(Duration::ZERO)
    .destroy_grace(Duration::ZERO)
    .clock(clock.clone() as Arc<dyn Clock>)
    .create()
    .await
    .unwrap();
    ring.rotate(&admin()).await.unwrap();
    (Arc::new(ring), clock)
}

/// The context of a row of `accounts`-like tables.
pub fn account_context(
    table: &str,
    id: &str,
    tenant: &str,
    region: Option<&str>,
) -> EncryptionContext {
    let mut ctx = EncryptionContext::new()
        .with("table", table)
        .with("row", id)
        .with("tenant", tenant);
    if let Some(r) = region {
        ctx.insert("region", r);
    }
    ctx
}

pub fn tenant_of(i: i64) -> String {
    format!("t{}", i.rem_euclid(4))
}

pub fn region_of(i: i64) -> Option<String> {
    (i % 3 != 0).then(|| format!("eu-{}", i % 5))
}

pub fn plaintext(table: &str, id: &str) -> String {
    format!("secret of {table}/{id}")
}

/// `CREATE TABLE name (id bigint PRIMARY KEY, tenant text NOT NULL,
/// region text, secret bytea NOT NULL)` with rows `ids`, encrypted under
/// the keyring's active version.
pub async fn bigint_accounts(pool: &PgPool, ring: &Keyring, name: &str, ids: &[i64]) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, tenant text NOT NULL, region text, \
         secret bytea NOT NULL)"
    ))
    .execute(pool)
    .await
    .unwrap();
    for chunk in ids.chunks(10_000) {
        let mut tenants = Vec::new();
        let mut regions = Vec::new();
        let mut secrets = Vec::new();
        for &i in chunk {
            let id = i.to_string();
            let (t, r) = (tenant_of(i), region_of(i));
            let ctx = account_context(name, &id, &t, r.as_deref());
            secrets.push(
                ring.encrypt(&ctx, plaintext(name, &id).as_bytes())
                    .await
                    .unwrap(),
            );
            tenants.push(t);
            regions.push(r);
        }
        sqlx::query(&format!(
            "INSERT INTO {name} (id, tenant, region, secret) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[])"
        ))
        .bind(chunk)
        .bind(&tenants)
        .bind(&regions)
        .bind(&secrets)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// `CREATE TABLE name (id text COLLATE "C" PRIMARY KEY, tenant text NOT
/// NULL, region text, secret bytea NOT NULL)`, region NULL throughout.
pub async fn text_accounts(pool: &PgPool, ring: &Keyring, name: &str, ids: &[String]) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE {name} (id text COLLATE \"C\" PRIMARY KEY, tenant text NOT NULL, \
         region text, secret bytea NOT NULL)"
    ))
    .execute(pool)
    .await
    .unwrap();
    for chunk in ids.chunks(10_000) {
        let mut secrets = Vec::new();
        for id in chunk {
            let ctx = account_context(name, id, "t-text", None);
            secrets.push(
                ring.encrypt(&ctx, plaintext(name, id).as_bytes())
                    .await
                    .unwrap(),
            );
        }
        sqlx::query(&format!(
            "INSERT INTO {name} (id, tenant, secret) \
             SELECT id, 't-text', s FROM unnest($1::text[], $2::bytea[]) AS u(id, s)"
        ))
        .bind(chunk)
        .bind(&secrets)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// The `PgTable` for the tables above.
pub async fn accounts_source(pool: &PgPool, name: &str) -> keyfold_postgres::PgTable {
    keyfold_postgres::PgTable::builder(name)
        .id_column("id")
        .ciphertext_column("secret")
        .context_column("id", "row")
        .context_column("tenant", "tenant")
        .context_column_with("region", "region", keyfold_postgres::OnNull::Omit)
        .context_constant("table", name)
        .build(pool)
        .await
        .unwrap()
}

/// Every row: id (text), tenant, region, ciphertext.
pub async fn rows(pool: &PgPool, name: &str) -> Vec<(String, String, Option<String>, Vec<u8>)> {
    sqlx::query_as(&format!(
        "SELECT id::text, tenant, region, secret FROM {name} ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// How many rows are on each version.
pub async fn versions(pool: &PgPool, name: &str) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    for (_, _, _, ct) in rows(pool, name).await {
        *out.entry(format::inspect(&ct).unwrap().key_version)
            .or_default() += 1;
    }
    out
}

/// Every row decrypts under its context to `expected(id)`.
pub async fn assert_decrypt(
    pool: &PgPool,
    ring: &Keyring,
    name: &str,
    expected: impl Fn(&str) -> String,
) {
    for (id, tenant, region, ct) in rows(pool, name).await {
        let ctx = account_context(name, &id, &tenant, region.as_deref());
        let pt = ring.decrypt(&ctx, &ct).await.unwrap();
        assert_eq!(String::from_utf8(pt).unwrap(), expected(&id), "{name}/{id}");
    }
}
