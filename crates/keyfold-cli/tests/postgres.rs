//! The keyring commands against a `postgres://` store (keyfold-postgres's
//! `PgKeyringStore`), end to end on the binary, on the PostgreSQL server
//! named by `KEYFOLD_PG_URL` (scripts/test-all starts a throwaway one:
//! `eval "$(scripts/setup-postgres)"`). Never skipped: without the variable
//! the tests fail saying what to do.
#![cfg(feature = "postgres")]

mod common;

use common::{Setup, eventually, json_of, json_run};
use sqlx::ConnectOptions;

fn server_url() -> String {
    match std::env::var("KEYFOLD_PG_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "KEYFOLD_PG_URL is not set: these tests need a PostgreSQL server. Start a throwaway \
             one with `eval \"$(scripts/setup-postgres)\"` from the repository root \
             (scripts/test-all does this)."
        ),
    }
}

/// A fresh database on the server; its URL.
async fn fresh_database() -> String {
    let server = server_url();
    let mut random = [0u8; 4];
    keyfold_core::rng::fill(&mut random).unwrap();
    let name = format!(
        "keyfold_cli_test_{}_{:08x}",
        std::process::id(),
        u32::from_le_bytes(random)
    );
    let options: sqlx::postgres::PgConnectOptions = server.parse().expect("KEYFOLD_PG_URL parses");
    let mut admin = options.connect().await.expect("connect to KEYFOLD_PG_URL");
    sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b.to_owned(), format!("?{q}")),
        None => (server.clone(), String::new()),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_end..].find('/') {
        Some(i) => base[..authority_end + i].to_owned(),
        None => base,
    };
    format!("{root}/{name}{query}")
}

#[tokio::test]
async fn keyring_lifecycle_on_a_postgres_store() {
    let s = Setup::new();
    let url = fresh_database().await;
    let pg = |args: &[&str]| s.on_store(&url, args);
    // Before `create` made the tables: an error, not a new store.
    pg(&["keyring", "show", "acme"]).assert().failure();
    pg(&["keyring", "create", "acme"]).assert().success();
    pg(&["keyring", "rotate", "acme"]).assert().success();
    pg(&["keyring", "disable", "acme", "1", "--yes"])
        .assert()
        .success();
    pg(&["keyring", "policy", "acme", "--period-days", "30"])
        .assert()
        .success();
    let json = json_run(&mut pg(&["--json", "keyring", "show", "acme"]), 0);
    assert_eq!(json["active_version"], 2);
    assert_eq!(json["versions"][0]["state"], "disabled");
    assert_eq!(
        json["revision"], 5,
        "create, first version, rotate, disable, policy"
    );
    // Unknown keyrings and illegal transitions keep their exit codes.
    pg(&["keyring", "rotate", "nobody"]).assert().code(5);
    pg(&["keyring", "disable", "acme", "2", "--yes"])
        .assert()
        .code(6);
    assert_eq!(
        s.audit_names(),
        [
            "kms.rotate",
            "kms.rotate",
            "kms.version.state_changed",
            "kms.version.state_changed",
            "kms.rotation_policy.set"
        ]
    );
}

/// The operator's seal on a `postgres://` store: stored with the keyring
/// (the fleet's shared store), so the next command (another process)
/// refuses a rotation until the unseal.
#[tokio::test]
async fn seal_and_unseal_on_a_postgres_store() {
    let s = Setup::new();
    let url = fresh_database().await;
    let pg = |args: &[&str]| s.on_store(&url, args);
    pg(&["keyring", "create", "acme"]).assert().success();
    // A service instance on the same database (LISTEN/NOTIFY), with the
    // key in its cache.
    let kek = keyfold_core::LocalKek::from_file("test-kek", s.path("kek.hex")).unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let store =
        keyfold_postgres::PgKeyringStore::new(pool, keyfold_postgres::TablePrefix::default());
    let service = keyfold_core::Keyring::builder(
        "acme",
        std::sync::Arc::new(kek),
        std::sync::Arc::new(store),
    )
    .max_staleness(std::time::Duration::from_secs(2))
    .open()
    .await
    .unwrap();
    let row = context("t", "1");
    let record = service.encrypt(&row, b"row one").await.unwrap();

    pg(&["keyring", "seal", "acme", "--reason", "INC-9", "--yes"])
        .assert()
        .success();
    eventually("the service instance refuses", || async {
        matches!(
            service.decrypt(&row, &record).await,
            Err(keyfold_core::Error::SealedByOperator { .. })
        )
    })
    .await;
    let out = pg(&["--json", "keyring", "rotate", "acme"])
        .assert()
        .code(6)
        .get_output()
        .clone();
    assert_eq!(json_of(&out)["error"]["code"], "sealed_by_operator");
    let shown = json_run(&mut pg(&["--json", "keyring", "show", "acme"]), 0);
    assert_eq!(shown["operator_seal"]["reason"], "INC-9");
    assert_eq!(shown["operator_seal"]["actor"], "ops@example.com");
    pg(&["keyring", "unseal", "acme"]).assert().success();
    eventually("the service instance decrypts again", || async {
        service.decrypt(&row, &record).await.is_ok()
    })
    .await;
    pg(&["keyring", "rotate", "acme"]).assert().success();
    let shown = json_run(&mut pg(&["--json", "keyring", "show", "acme"]), 0);
    assert_eq!(shown["operator_seal"], serde_json::Value::Null);
    assert_eq!(shown["active_version"], 2);
    assert_eq!(
        s.audit_names(),
        [
            "kms.rotate",
            "kms.sealed.manual",
            "kms.unsealed",
            "kms.rotate",
            "kms.version.state_changed"
        ]
    );
}

#[test]
fn an_unreachable_postgres_store_fails_without_printing_its_password() {
    let s = Setup::new();
    let out = s
        .with_config()
        .args([
            "--store",
            "postgres://app:hunter2@127.0.0.1:1/x",
            "keyring",
            "show",
            "acme",
        ])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

fn context(table: &str, id: &str) -> keyfold_core::EncryptionContext {
    keyfold_core::EncryptionContext::new()
        .with("tenant", "acme")
        .with("table", table)
        .with("row", id)
}

#[tokio::test]
async fn rewrap_run_and_status_on_postgres_tables() {
    let s = Setup::new();
    let url = fresh_database().await;
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    let ring = s.open("acme").await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE secrets (id text PRIMARY KEY, tenant text NOT NULL, ciphertext bytea NOT NULL);
         CREATE TABLE tokens (id bigint PRIMARY KEY, tenant text NOT NULL, body bytea);",
    )
    .execute(&pool)
    .await
    .unwrap();
    for i in 0..40i64 {
        let id = format!("s{i:03}");
        let ct = ring
            .encrypt(&context("secrets", &id), id.as_bytes())
            .await
            .unwrap();
        sqlx::query("INSERT INTO secrets VALUES ($1, 'acme', $2)")
            .bind(&id)
            .bind(ct)
            .execute(&pool)
            .await
            .unwrap();
        let n = i * 13 + 1;
        let ct = ring
            .encrypt(&context("tokens", &n.to_string()), n.to_string().as_bytes())
            .await
            .unwrap();
        sqlx::query("INSERT INTO tokens VALUES ($1, 'acme', $2)")
            .bind(n)
            .bind(ct)
            .execute(&pool)
            .await
            .unwrap();
    }
    let table = |name: &str, ct: &str| {
        serde_json::json!({"name": name, "id_column": "id", "ciphertext_column": ct,
            "context": {"tenant": {"column": "tenant"}, "table": {"value": name}, "row": {"column": "id"}}})
    };
    let spec = serde_json::json!({"database": url, "keyring": "acme", "batch_size": 7,
        "tables": [table("secrets", "ciphertext"), table("tokens", "body")]});
    std::fs::write(s.path("pgjob.json"), spec.to_string()).unwrap();
    s.with_config()
        .args(["rewrap", "status", "--job", "pgjob.json"])
        .assert()
        .code(5);
    s.with_config()
        .args(["keyring", "rotate", "acme"])
        .assert()
        .success();

    let out = s
        .with_config()
        .args(["--json", "rewrap", "run", "--job", "pgjob.json"])
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(summary["completed"], true, "{text}");
    assert_eq!(summary["totals"]["rewrapped"], 80, "{text}");
    assert!(
        !text.contains("postgres://postgres@"),
        "no URL in the output: {text}"
    );

    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT id, ciphertext FROM secrets UNION ALL SELECT id::text, body FROM tokens",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 80);
    let ring = s.open("acme").await;
    for (id, ct) in rows {
        assert_eq!(keyfold_core::format::inspect(&ct).unwrap().key_version, 2);
        let table = if id.starts_with('s') {
            "secrets"
        } else {
            "tokens"
        };
        assert_eq!(
            ring.decrypt(&context(table, &id), &ct).await.unwrap(),
            id.as_bytes()
        );
    }

    let json = json_run(
        s.with_config()
            .args(["--json", "rewrap", "status", "--job", "pgjob.json"]),
        0,
    );
    assert_eq!(
        (json["completed"].as_bool(), json["target_version"].as_u64()),
        (Some(true), Some(2))
    );
    let evidence = json_run(
        s.with_config().args([
            "rewrap",
            "status",
            "--job",
            "pgjob.json",
            "--evidence-for",
            "1",
        ]),
        0,
    );
    assert_eq!(
        (
            evidence["keyring_id"].as_str(),
            evidence["version"].as_u64()
        ),
        (Some("acme"), Some(1))
    );
    s.with_config()
        .args([
            "rewrap",
            "status",
            "--job",
            "pgjob.json",
            "--evidence-for",
            "2",
        ])
        .assert()
        .code(6);
    let names = s.audit_names();
    assert!(
        names.contains(&"kms.rewrap.started".to_owned())
            && names.contains(&"kms.rewrap.completed".to_owned()),
        "{names:?}"
    );
}
