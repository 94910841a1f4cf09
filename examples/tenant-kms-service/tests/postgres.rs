//! The service on PostgreSQL (`Database::Postgres`), in process: secrets,
//! history and rollback, the distributed rewrap job, onboarding in one
//! transaction, and step-up tokens used once across two instances. The
//! server is `KEYFOLD_PG_URL`'s (scripts/test-all starts one).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use common::{ACME, RawBody, Service, TempDir, local_providers, postgres_config};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tenant_kms_service::config::Database;

fn url(cfg: &tenant_kms_service::config::ServiceConfig) -> String {
    match &cfg.database {
        Database::Postgres(url) => url.clone(),
        other => panic!("not PostgreSQL: {other:?}"),
    }
}

/// A service on a fresh PostgreSQL database (rewrap batches of `batch`
/// rows), tenant ACME onboarded on the local KEK. Keep the directory for
/// the service's life.
async fn onboarded(
    name: &str,
    batch: usize,
) -> (TempDir, tenant_kms_service::config::ServiceConfig, Service) {
    let dir = TempDir::new(name);
    let cfg = postgres_config(&dir, batch, None).await;
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    (dir, cfg, svc)
}

/// ACME secrets `{prefix}000`, `{prefix}001`, ... holding `"v"`.
async fn put_many(svc: &Service, prefix: &str, n: usize) {
    for i in 0..n {
        svc.put_secret(ACME, &format!("{prefix}{i:03}"), "v").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_history_rollback_and_the_rewrap_job_on_postgres() {
    let (_dir, cfg, svc) = onboarded("pg-secrets", 7).await;
    for i in 0..30 {
        svc.put_secret(ACME, &format!("s{i:02}"), &format!("value-{i}-a"))
            .await;
    }
    for i in 0..10 {
        let v = svc
            .put_secret(ACME, &format!("s{i:02}"), &format!("value-{i}-b"))
            .await;
        assert_eq!(v["version"], 2, "{v}");
    }
    let (s, v) = svc.post("/secrets/s05/rollback", ACME, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(svc.get_secret(ACME, "s05").await["value"], "value-5-a");
    // A write after a rollback takes the next version number.
    svc.put_secret(ACME, "s05", "value-5-c").await;
    assert_eq!(svc.get_secret(ACME, "s05").await["version"], 3);

    let rotated = svc.rotate(ACME).await;
    let lease = rotated["rewrap_lease_id"].as_str().unwrap().to_owned();
    let target = rotated["version"].clone();
    let done = svc.completed_job(ACME, &lease).await;
    assert_eq!(
        done["distributed"]["shards_done"],
        done["distributed"]["shards"]
    );
    assert_eq!(done["totals"]["failed"], 0, "{done}");
    for i in 0..30 {
        let v = svc.get_secret(ACME, &format!("s{i:02}")).await;
        assert_eq!(v["key_version"], target, "{v}");
    }
    // The history rows moved too: rolling back reads them.
    let (s, _) = svc.post("/secrets/s00/rollback", ACME, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(svc.get_secret(ACME, "s00").await["value"], "value-0-a");
    let pool = sqlx::PgPool::connect(&url(&cfg)).await.unwrap();
    let versions: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT ciphertext FROM tks_secrets UNION ALL SELECT ciphertext FROM tks_secret_versions",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(versions.len() >= 40);
    for ct in versions {
        assert_eq!(
            json!(keyfold::format::inspect(&ct).unwrap().key_version),
            target
        );
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_stores_the_config_and_the_keyring_in_one_transaction_on_postgres() {
    let dir = TempDir::new("pg-atomic");
    let cfg = postgres_config(&dir, 10, None).await;
    let pool = sqlx::PgPool::connect(&url(&cfg)).await.unwrap();
    // The config write fails inside the keyring's transaction.
    common::check_onboarding_is_one_transaction(&cfg, |fail| {
        let pool = pool.clone();
        async move {
            let sql = if fail {
                "CREATE FUNCTION fail_config() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'disk on fire'; END $$;
                 CREATE TRIGGER fail_config BEFORE INSERT OR UPDATE ON tks_tenant_kms
                     FOR EACH ROW EXECUTE FUNCTION fail_config();"
            } else {
                "DROP TRIGGER fail_config ON tks_tenant_kms"
            };
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_token_is_used_once_across_instances_on_postgres() {
    let dir = TempDir::new("pg-stepup");
    let cfg = postgres_config(&dir, 10, Some(0)).await;
    let a = Service::start(cfg.clone(), local_providers(&cfg)).await;
    let b = Service::start(cfg.clone(), local_providers(&cfg)).await;
    a.onboard_local(ACME).await;
    // Issued by one instance, used on the other, replayed on the first.
    let token = a.step_up(ACME, "rotate", "acme").await;
    let (s, v) = rotate(&b, &token).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Answered only once its audit entries are in the table (read directly,
    // not through GET /admin/audit, which waits for the writer itself).
    let pool = sqlx::PgPool::connect(&url(&cfg)).await.unwrap();
    let written: Vec<String> =
        sqlx::query_scalar("SELECT event FROM tks_audit_log WHERE tenant = 'acme' ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    for event in ["auth.step_up.issued", "auth.step_up.used", "kms.rotate"] {
        assert!(written.iter().any(|e| e == event), "{event}: {written:?}");
    }
    let (s, v) = rotate(&a, &token).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("step_up_invalid")),
        "{v}"
    );
    // A code is accepted once on the whole fleet too.
    let code = a.code(ACME).await;
    let body = || {
        Some(RawBody::Json(
            json!({ "code": code, "action": "rotate", "target": "acme" }),
        ))
    };
    let (s, v) = a
        .call(
            Method::POST,
            "/admin/auth/step-up",
            Some(ACME),
            None,
            body(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = b
        .call(
            Method::POST,
            "/admin/auth/step-up",
            Some(ACME),
            None,
            body(),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("step_up_code_reused")),
        "{v}"
    );
    // Both instances' audit entries are in the one chain.
    let events = b.audit(ACME).await;
    let issued = events
        .iter()
        .filter(|e| e["event"] == "auth.step_up.issued")
        .count();
    assert!(issued >= 3, "{events:?}");
    a.stop().await;
    b.stop().await;
}

/// `POST /admin/tenant-kms/rotate` on `svc` with step-up token `token`.
async fn rotate(svc: &Service, token: &str) -> (StatusCode, serde_json::Value) {
    svc.call(
        Method::POST,
        "/admin/tenant-kms/rotate",
        Some(ACME),
        Some(token),
        None,
    )
    .await
}

/// A rotation while the previous rotation's job runs: the new job (named by
/// the new rotation's lease) is worked at once and completes, every row
/// ends on the newest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_during_a_running_job_moves_every_row_to_the_newest_version() {
    let (_dir, _, svc) = onboarded("pg-rerotate", 3).await;
    put_many(&svc, "r", 150).await;
    let first = svc.rotate(ACME).await;
    let second = svc.rotate(ACME).await;
    let lease = second["rewrap_lease_id"].as_str().unwrap().to_owned();
    assert_ne!(first["rewrap_lease_id"], second["rewrap_lease_id"]);
    let done = svc.completed_job(ACME, &lease).await;
    assert_eq!(done["target_version"], second["version"], "{done}");
    for i in (0..150).step_by(10) {
        let v = svc.get_secret(ACME, &format!("r{i:03}")).await;
        assert_eq!(v["key_version"], second["version"], "{v}");
    }
    svc.stop().await;
}

/// Concurrent guesses cannot slip past the limit: each attempt is counted
/// before its code is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_step_up_guesses_get_no_more_tries_than_the_limit() {
    let (_dir, cfg, svc) = onboarded("rate-race", 10).await;
    let max = cfg.step_up.max_failures as usize;
    let wrong = svc.wrong_code(ACME);
    let attempts = (0..40).map(|_| {
        svc.post(
            "/admin/auth/step-up",
            ACME,
            json!({ "code": wrong, "action": "rotate", "target": "acme" }),
        )
    });
    let answers = futures::future::join_all(attempts).await;
    let checked = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::UNAUTHORIZED)
        .count();
    let limited = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        checked <= max,
        "{checked} codes were checked, the limit is {max}"
    );
    assert_eq!(checked + limited, answers.len(), "{answers:?}");
    svc.stop().await;
}

/// A row the distributed job cannot move is named in the status, with why;
/// once it is gone, the next pass completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rows_are_named_and_a_later_pass_completes_on_postgres() {
    let (_dir, cfg, svc) = onboarded("pg-incomplete", 10).await;
    put_many(&svc, "a", 5).await;
    // A row whose record is bound to another name: it cannot be moved.
    let pool = sqlx::PgPool::connect(&url(&cfg)).await.unwrap();
    let bad: i64 = sqlx::query_scalar(
        "INSERT INTO tks_secrets (tenant, name, version, ciphertext, created_at)
         SELECT tenant, 'bad', version, ciphertext, created_at FROM tks_secrets
         WHERE tenant = 'acme' AND name = 'a000' RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let lease = svc.rotate(ACME).await["rewrap_lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = svc.settled_job(ACME, &lease).await;
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["totals"]["failed"], 1, "{v}");
    let failures = v["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{v}");
    assert_eq!(failures[0]["source"], "secrets");
    assert_eq!(failures[0]["row_id"], bad.to_string());
    assert!(
        failures[0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    assert!(
        v["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains(&format!("row {bad}"))),
        "{v}"
    );
    // The bad row goes away: a later pass finds nothing left to move.
    sqlx::query("DELETE FROM tks_secrets WHERE id = $1")
        .bind(bad)
        .execute(&pool)
        .await
        .unwrap();
    let v = svc.wait_rewrap(ACME, |v| v["status"] == "completed").await;
    assert_eq!(v["failures"], json!([]), "{v}");
    for i in 0..5 {
        let got = svc.get_secret(ACME, &format!("a{i:03}")).await;
        assert_eq!(got["value"], "v");
    }
    svc.stop().await;
}

/// `stop()` returns only once this instance's distributed rewrap worker has
/// stopped: the shard released (its checkpoint saved when a batch was done
/// since the last save), so another instance takes it over at once instead
/// of after the shard lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_the_distributed_worker_to_release_its_shard() {
    let (_dir, cfg, svc) = onboarded("pg-stop", 1).await;
    put_many(&svc, "s", 300).await;
    let lease = svc.rotate(ACME).await["rewrap_lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pool = sqlx::PgPool::connect(&url(&cfg)).await.unwrap();
    let leased = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM keyfold_rewrap_shards \
             WHERE job_id = $1 AND owner IS NOT NULL AND NOT done",
        )
        .bind(&lease)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while leased().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no shard was ever leased"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    svc.stop().await;
    assert_eq!(leased().await, 0, "a shard is still held after stop()");
}
