//! The service end to end on the local KEK, over HTTP: onboarding, secrets,
//! rotation with step-up, the background rewrap, lazy rewrap, disable and
//! destroy, the audit log, restart mid-rewrap, tenant isolation, bad input.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed check is a test failure"
)]

mod common;

use common::{ACME, GLOBEX, RawBody, Service, TempDir, config, local_providers, names};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn state_of(meta: &Value, version: u64) -> String {
    meta["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == version)
        .unwrap_or_else(|| panic!("no version {version} in {meta}"))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_kek_end_to_end() {
    let dir = TempDir::new("e2e");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;

    let on = svc.onboard_local(ACME).await;
    assert_eq!(on["ok"], true);
    assert!(
        on["note"].as_str().is_some_and(|n| n.contains("first")),
        "{on}"
    );
    assert_eq!(on["provider"], "local");
    assert_eq!(on["kms_key_ref"], "dev-kek");
    assert_eq!(on["new_key_version"], 1);
    assert!(
        on["new_key_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{on}"
    );
    assert_eq!(on["rewrap_status"], "enqueued");

    // 30 secrets, 10 of them written twice (their first version goes to history).
    for i in 0..30 {
        svc.put_secret(ACME, &format!("s{i:02}"), &format!("value-{i}-a"))
            .await;
    }
    for i in 0..10 {
        let v = svc
            .put_secret(ACME, &format!("s{i:02}"), &format!("value-{i}-b"))
            .await;
        assert_eq!(v["version"], 2);
        assert_eq!(v["key_version"], 1);
    }
    // Secret versions and rollback.
    svc.put_secret(ACME, "db-password", "first").await;
    svc.put_secret(ACME, "db-password", "second").await;
    assert_eq!(svc.get_secret(ACME, "db-password").await["value"], "second");
    let (s, v) = svc
        .post("/secrets/db-password/rollback", ACME, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["rolled_back_from"], 2);
    let back = svc.get_secret(ACME, "db-password").await;
    assert_eq!(
        (back["value"].clone(), back["version"].clone()),
        (json!("first"), json!(1))
    );
    let rows = 30 + 10 + 2; // current + history

    // Rotation needs a step-up token.
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/rotate",
            Some(ACME),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "step_up_required");
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/rotate",
            Some(ACME),
            Some("forged"),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::FORBIDDEN, json!("step_up_invalid"))
    );
    assert_eq!(
        svc.get("/admin/tenant-kms", ACME).await.1["active_version"],
        1
    );

    let rot = svc.rotate(ACME).await;
    assert_eq!(rot["version"], 2);
    assert_eq!(rot["previous_version"], 1);
    let lease = rot["rewrap_lease_id"].as_str().expect("a lease").to_owned();

    // The background job moves every row, in batches of 10 across both tables.
    let done = svc.completed_job(ACME, &lease).await;
    assert_eq!(done["target_version"], 2);
    assert_eq!(done["totals"]["seen"], rows);
    assert_eq!(done["totals"]["failed"], 0);
    assert_eq!(done["estimated_remaining"], 0);
    assert!(done["batches"].as_u64().unwrap() >= 5, "{done}");
    // RFC 3339 times, which order as strings.
    assert!(
        done["lease_expires_at"].as_str().unwrap() > done["started_at"].as_str().unwrap(),
        "{done}"
    );
    let sources: Vec<&str> = done["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["secrets", "secret_versions"]);

    for i in 0..30 {
        let v = svc.get_secret(ACME, &format!("s{i:02}")).await;
        let want = if i < 10 { "b" } else { "a" };
        assert_eq!(v["value"], format!("value-{i}-{want}"));
        assert_eq!(v["key_version"], 2, "{v}");
    }
    // The history rows moved too: rolling back reads them.
    let (s, _) = svc.post("/secrets/s00/rollback", ACME, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(svc.get_secret(ACME, "s00").await["value"], "value-0-a");

    let (s, meta) = svc.get("/admin/tenant-kms", ACME).await;
    assert_eq!(s, StatusCode::OK, "{meta}");
    assert_eq!(meta["latest_version"], 2);
    assert_eq!(meta["active_version"], 2);
    assert_eq!(meta["min_decryption_version"], 1);
    assert_eq!(meta["sealed"], false);
    assert_eq!(state_of(&meta, 1), "retired");
    assert_eq!(state_of(&meta, 2), "active");
    assert!(
        meta["keys"][0]["created_at"]
            .as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
        "{meta}"
    );

    // Destroy only from disabled; then the old version is gone.
    let (s, v) = svc.version_op(ACME, 1, "destroy").await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::CONFLICT, json!("illegal_transition")),
        "{v}"
    );
    let (s, v) = svc.version_op(ACME, 2, "disable").await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "the active version cannot be disabled: {v}"
    );
    let (s, v) = svc.version_op(ACME, 1, "disable").await;
    assert_eq!(
        (s, v["state"].clone()),
        (StatusCode::OK, json!("disabled")),
        "{v}"
    );
    let (s, v) = svc.version_op(ACME, 1, "enable").await;
    assert_eq!(
        (s, v["state"].clone()),
        (StatusCode::OK, json!("retired")),
        "{v}"
    );
    svc.version_op(ACME, 1, "disable").await;
    let (s, v) = svc.destroy(ACME, 1).await;
    assert_eq!(
        (s, v["state"].clone()),
        (StatusCode::OK, json!("destroyed")),
        "{v}"
    );
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(state_of(&meta, 1), "destroyed");
    assert_eq!(meta["min_decryption_version"], 2);
    // A destroyed version: every operation on it is refused, naming it.
    for op in ["enable", "disable", "destroy"] {
        let (s, v) = svc.version_op(ACME, 1, op).await;
        assert_eq!(s, StatusCode::CONFLICT, "{op}: {v}");
        assert_eq!(v["error"], "key_version_destroyed", "{op}: {v}");
        assert!(v["message"].as_str().unwrap().contains("version 1"), "{v}");
    }
    for i in 0..30 {
        assert_eq!(
            svc.get_secret(ACME, &format!("s{i:02}")).await["key_version"],
            2
        );
    }

    // The audit log.
    let events = svc.audit(ACME).await;
    let n = names(&events);
    for want in [
        "kms.config.updated",
        "kms.rotate",
        "kms.rewrap.started",
        "kms.rewrap.completed",
        "kms.version.state_changed",
    ] {
        assert!(n.contains(&want), "{want} missing from {n:?}");
    }
    let rotation = events
        .iter()
        .find(|e| e["event"] == "kms.rotate" && e["detail"]["new_version"] == 2)
        .unwrap();
    assert_eq!(rotation["actor"], "admin@acme.example");
    assert_eq!(rotation["client_ip"], "127.0.0.1");
    assert_eq!(rotation["detail"]["wrap_provider"], "local");
    assert_eq!(rotation["detail"]["wrap_key_ref"], "dev-kek");
    assert_eq!(rotation["detail"]["lease_id"], lease.as_str());
    let destroyed = events
        .iter()
        .find(|e| e["event"] == "kms.version.state_changed" && e["detail"]["to"] == "destroyed")
        .unwrap();
    assert_eq!(destroyed["detail"]["forced"], false);
    assert_eq!(destroyed["client_ip"], "127.0.0.1");
    let completed = events
        .iter()
        .find(|e| e["event"] == "kms.rewrap.completed" && e["detail"]["job_id"] == lease.as_str())
        .unwrap();
    assert_eq!(completed["detail"]["failed"], 0);
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["seq"].as_i64() < w[1]["seq"].as_i64())
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_rewrap_resumes_from_the_checkpoint() {
    let dir = TempDir::new("restart");
    // First run: the worker stops after 3 batches of 10 (onboarding's job
    // takes one, the rotation's job two).
    let cfg = config(&dir, 10, Some(3));
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    svc.wait_rewrap(ACME, |v| v["status"] == "completed").await;
    for i in 0..40 {
        svc.put_secret(ACME, &format!("k{i:02}"), &format!("v{i}"))
            .await;
    }
    for i in 0..20 {
        svc.put_secret(ACME, &format!("k{i:02}"), &format!("w{i}"))
            .await;
    }
    let rows = 60;
    let lease = svc.rotate(ACME).await["rewrap_lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mid = svc
        .wait_rewrap(ACME, |v| v["job_id"] == lease.as_str() && v["batches"] == 2)
        .await;
    assert_eq!(mid["status"], "running");
    assert_eq!(mid["completed"], false);
    assert_eq!(mid["totals"]["seen"], 20);
    assert_eq!(mid["estimated_remaining"], rows - 20);

    // Records remain on version 1: destroy is refused, whatever the state.
    let (s, _) = svc.version_op(ACME, 1, "disable").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = svc.version_op(ACME, 1, "destroy").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "records_remain");
    assert_eq!(v["records"], rows - 20);
    let (s, _) = svc.version_op(ACME, 1, "enable").await;
    assert_eq!(s, StatusCode::OK);
    svc.stop().await;

    // Second run on the same database: the job resumes where it stopped.
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    let done = svc.wait_rewrap(ACME, |v| v["status"] == "completed").await;
    assert_eq!(
        done["job_id"],
        lease.as_str(),
        "the same job, not a new one"
    );
    assert_eq!(
        done["totals"]["seen"], rows,
        "every row seen exactly once: {done}"
    );
    assert_eq!(done["totals"]["rewrapped"], rows);
    assert_eq!(done["totals"]["failed"], 0);
    assert!(done["batches"].as_u64().unwrap() >= 6, "{done}");
    for i in 0..40 {
        let v = svc.get_secret(ACME, &format!("k{i:02}")).await;
        let want = if i < 20 {
            format!("w{i}")
        } else {
            format!("v{i}")
        };
        assert_eq!(v["value"], want);
        assert_eq!(v["key_version"], 2);
    }
    svc.version_op(ACME, 1, "disable").await;
    let (s, v) = svc.destroy(ACME, 1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let n = names(&svc.audit(ACME).await)
        .into_iter()
        .filter(|n| *n == "kms.rewrap.started")
        .count();
    assert_eq!(
        n, 2,
        "onboarding's job and the rotation's; the restart resumed, not restarted"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_rewrap_on_read() {
    let dir = TempDir::new("lazy");
    // No background batches at all: only reads move records. keyfold's
    // default staleness: the final destroy waits out its settle time.
    let mut cfg = config(&dir, 10, Some(0));
    cfg.max_staleness = keyfold::keyring::DEFAULT_MAX_STALENESS;
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    svc.put_secret(ACME, "api-key", "abc").await;
    svc.put_secret(ACME, "other", "xyz").await;
    svc.rotate(ACME).await;
    let v = svc.get_secret(ACME, "api-key").await;
    assert_eq!(
        (v["value"].clone(), v["key_version"].clone()),
        (json!("abc"), json!(2))
    );
    // Written back: the next destroy check counts only `other` on version 1.
    svc.version_op(ACME, 1, "disable").await;
    let (s, v) = svc.version_op(ACME, 1, "destroy").await;
    assert_eq!(
        (s, v["records"].clone()),
        (StatusCode::CONFLICT, json!(1)),
        "{v}"
    );
    // A disabled version cannot be read.
    let (s, v) = svc.get("/secrets/other", ACME).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::CONFLICT, json!("key_version_unavailable")),
        "{v}"
    );
    svc.version_op(ACME, 1, "enable").await;
    assert_eq!(svc.get_secret(ACME, "other").await["key_version"], 2);
    svc.version_op(ACME, 1, "disable").await;
    let (s, v) = svc.destroy(ACME, 1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_touch_another_tenants_keys() {
    let dir = TempDir::new("isolation");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    svc.put_secret(ACME, "acme-only", "top secret").await;

    // No token, a wrong token.
    let (s, v) = svc
        .call(Method::GET, "/secrets/acme-only", None, None, None)
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::UNAUTHORIZED, json!("unauthorized"))
    );
    let (s, _) = svc
        .get("/secrets/acme-only", "not-a-token-0123456789")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Globex's token sees only globex's (empty) namespace.
    let (s, v) = svc.get("/secrets/acme-only", GLOBEX).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::CONFLICT, json!("not_onboarded")),
        "{v}"
    );
    let (s, _) = svc.get("/admin/tenant-kms", GLOBEX).await;
    assert_eq!(s, StatusCode::CONFLICT);
    svc.onboard_local(GLOBEX).await;
    let (s, v) = svc.get("/secrets/acme-only", GLOBEX).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("secret_not_found"))
    );

    // Naming acme with globex's token is refused outright.
    for (method, path) in [
        (Method::GET, "/admin/tenant-kms?tenant=acme"),
        (Method::POST, "/admin/tenant-kms/rotate?tenant=acme"),
        (
            Method::POST,
            "/admin/tenant-kms/versions/1/disable?tenant=acme",
        ),
        (Method::GET, "/secrets/acme-only?tenant=acme"),
        (Method::GET, "/admin/audit?tenant=acme"),
    ] {
        let (s, v) = svc
            .call(method, path, Some(GLOBEX), Some("unused"), None)
            .await;
        assert_eq!(
            (s, v["error"].clone()),
            (StatusCode::FORBIDDEN, json!("forbidden")),
            "{path}: {v}"
        );
    }
    // Acme's step-up token does not let globex rotate (nor acme's keys).
    let acme_su = svc.step_up(ACME, "rotate", "acme").await;
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/rotate",
            Some(GLOBEX),
            Some(&acme_su),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].clone(), v["reason"].clone()),
        (
            StatusCode::FORBIDDEN,
            json!("step_up_invalid"),
            json!("wrong_tenant")
        )
    );
    // Globex rotating rotates globex's keyring only.
    svc.rotate(GLOBEX).await;
    let acme = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(acme["active_version"], 1);
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(
        svc.get("/admin/tenant-kms", GLOBEX).await.1["active_version"],
        2
    );
    assert_eq!(
        svc.get_secret(ACME, "acme-only").await["value"],
        "top secret"
    );

    // Each audit log shows only its own tenant's events.
    let acme_log = svc.audit(ACME).await;
    assert!(
        acme_log
            .iter()
            .all(|e| e["actor"] != "admin@globex.example"),
        "{acme_log:?}"
    );
    assert!(
        !names(&acme_log).contains(&"kms.rotate")
            || acme_log
                .iter()
                .all(|e| e["event"] != "kms.rotate" || e["detail"]["new_version"] == 1)
    );
    let globex_log = svc.audit(GLOBEX).await;
    assert!(
        globex_log
            .iter()
            .any(|e| e["event"] == "kms.rotate" && e["detail"]["new_version"] == 2)
    );
    assert!(
        globex_log
            .iter()
            .all(|e| e["actor"] != "admin@acme.example")
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_naming_the_problem_and_stores_nothing() {
    let dir = TempDir::new("bad-input");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;

    // Bodies refused before any step-up or KMS call.
    let onboard = |body: RawBody| {
        let svc = &svc;
        async move {
            svc.call(
                Method::POST,
                "/admin/tenant-kms",
                Some(ACME),
                None,
                Some(body),
            )
            .await
        }
    };
    let aws = |extra: Value| {
        let mut c = json!({
            "region": "eu-west-1",
            "role_arn": "arn:aws:iam::111122223333:role/keyfold",
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let cases: Vec<(RawBody, &str, &str, Option<&str>)> = vec![
        (
            RawBody::Text("{\"provider\": \"local\","),
            "malformed_json",
            "EOF",
            None,
        ),
        (RawBody::Text("[1, 2]"), "malformed_json", "object", None),
        (
            RawBody::Json(json!({"provider": "oracle", "kms_key_ref": "k"})),
            "unknown_provider",
            "oracle",
            Some("provider"),
        ),
        (
            RawBody::Json(json!({"kms_key_ref": "k"})),
            "missing_field",
            "provider",
            Some("provider"),
        ),
        (
            // The flat shape of earlier versions: settings go in `config`.
            RawBody::Json(json!({
                "provider": "aws", "kms_key_ref": "alias/acme", "region": "eu-west-1",
            })),
            "unknown_field",
            "config",
            Some("region"),
        ),
        (
            RawBody::Json(json!({
                "provider": "aws", "kms_key_ref": "alias/acme",
                "config": aws(json!({"secret_access_key": "wJalrXUtnFEMI/K7MDENG"})),
            })),
            "static_credentials",
            "secret_access_key",
            Some("config.secret_access_key"),
        ),
        (
            RawBody::Json(json!({
                "provider": "gcp",
                "kms_key_ref": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
                "config": {
                    "impersonate_service_account": "sa@p.iam.gserviceaccount.com",
                    "credentials_json": "{...}"
                }
            })),
            "static_credentials",
            "credentials_json",
            Some("config.credentials_json"),
        ),
        (
            RawBody::Json(json!({
                "provider": "aws", "kms_key_ref": "not-a-key", "config": aws(json!({})),
            })),
            "invalid_key_ref",
            "not-a-key",
            Some("kms_key_ref"),
        ),
        (
            RawBody::Json(json!({"provider": "local", "kms_key_ref": "no-such-kek"})),
            "invalid_key_ref",
            "no-such-kek",
            Some("kms_key_ref"),
        ),
        (
            RawBody::Json(json!({
                "provider": "local", "kms_key_ref": "dev-kek", "config": {"kek_file": "/etc/passwd"}
            })),
            "operator_only_field",
            "kek_file",
            Some("config.kek_file"),
        ),
        (
            RawBody::Json(json!({
                "provider": "local", "kms_key_ref": "dev-kek", "config": {"label": "x"}
            })),
            "invalid_config",
            "label",
            Some("config.label"),
        ),
        (
            RawBody::Json(json!({
                "provider": "gcp",
                "kms_key_ref": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
                "config": {"impersonate_service_account": "sa@p.iam.gserviceaccount.com"}
            })),
            "unsupported_provider",
            "gcp",
            Some("provider"),
        ),
    ];
    for (body, code, mentions, field) in cases {
        let (s, v) = onboard(body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{code}: {v}");
        assert_eq!(v["error"], code, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(mentions),
            "{code}: {v}"
        );
        assert_eq!(v.get("field").and_then(Value::as_str), field, "{v}");
        assert!(v["request_id"].as_str().is_some(), "{v}");
        // Nothing stored.
        let (s, m) = svc.get("/admin/tenant-kms", ACME).await;
        assert_eq!(
            (s, m["error"].clone()),
            (StatusCode::CONFLICT, json!("not_onboarded"))
        );
    }
    // A KEK whose file is missing: the probe fails at `build`; the client
    // learns the step, not the service's file paths.
    let (s, v) = svc
        .onboard(
            ACME,
            json!({"provider": "local", "kms_key_ref": "broken-kek"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"], "kms_probe_failed");
    assert_eq!(v["step"], "build");
    assert_eq!(v["previous_config_in_force"], false);
    assert!(v["message"].as_str().unwrap().contains("`build`"), "{v}");
    assert!(!v.to_string().contains("missing-kek.hex"), "{v}");
    let events = svc.audit(ACME).await;
    let kms: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"].as_str().unwrap().starts_with("kms."))
        .collect();
    assert_eq!(kms.len(), 1, "{events:?}");
    assert_eq!(kms[0]["event"], "kms.probe.failed");
    assert_eq!(kms[0]["detail"]["step"], "build");
    assert_eq!(kms[0]["client_ip"], "127.0.0.1");
    assert!(
        !kms[0].to_string().contains("missing-kek.hex"),
        "{events:?}"
    );

    // Once onboarded, a bad config changes nothing either.
    svc.onboard_local(ACME).await;
    svc.put_secret(ACME, "s", "v").await;
    let (s, v) = svc
        .onboard(
            ACME,
            json!({"provider": "local", "kms_key_ref": "broken-kek"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["previous_config_in_force"], true);
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(
        (meta["kms_key_ref"].clone(), meta["active_version"].clone()),
        (json!("dev-kek"), json!(1))
    );
    assert_eq!(svc.get_secret(ACME, "s").await["value"], "v");

    // Other bad input.
    let (s, v) = svc
        .call(
            Method::PUT,
            "/secrets/s",
            Some(ACME),
            None,
            Some(RawBody::Text("{\"value\": ")),
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("malformed_json"))
    );
    let (s, v) = svc
        .call(
            Method::PUT,
            "/secrets/s",
            Some(ACME),
            None,
            Some(RawBody::Json(json!({"value": 1}))),
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("malformed_json"))
    );
    let (s, v) = svc.get("/secrets/bad%20name", ACME).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_name"))
    );
    let (s, v) = svc.version_op(ACME, 7, "disable").await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("unknown_key_version")),
        "{v}"
    );
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/versions/one/disable",
            Some(ACME),
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_version"))
    );
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/versions/1/explode",
            Some(ACME),
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    let (s, v) = svc.post("/secrets/nope/rollback", ACME, json!({})).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("secret_not_found"))
    );
    let (s, v) = svc.post("/secrets/s/rollback", ACME, json!({})).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::CONFLICT, json!("no_previous_version"))
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rows_make_the_job_incomplete_with_reasons_and_are_retried() {
    let dir = TempDir::new("incomplete");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    for i in 0..5 {
        svc.put_secret(ACME, &format!("a{i}"), "v").await;
    }
    // A row whose record is bound to another name: it cannot be moved.
    let db = common::sqlite_db(&cfg);
    db.lock()
        .execute_batch(
            "INSERT INTO secrets (tenant, name, version, ciphertext, created_at)
             SELECT tenant, 'bad', version, ciphertext, created_at FROM secrets
             WHERE tenant = 'acme' AND name = 'a0';",
        )
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
    assert_eq!(failures[0]["row_id"], "bad");
    assert!(
        failures[0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    assert!(
        failures[0]["next_retry_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert!(v["reasons"][0].as_str().unwrap().contains("bad"), "{v}");
    assert!(v["next"].as_str().is_some(), "{v}");
    // Retried, with growing delays.
    let v = svc
        .wait_rewrap(ACME, |v| v["failures"][0]["attempts"].as_u64() >= Some(3))
        .await;
    assert_eq!(v["status"], "incomplete", "{v}");
    // The bad row goes away: the next retry finds nothing left to move.
    db.lock()
        .execute_batch("DELETE FROM secrets WHERE tenant = 'acme' AND name = 'bad';")
        .unwrap();
    let v = svc.wait_rewrap(ACME, |v| v["status"] == "completed").await;
    assert_eq!(v["job_id"], lease.as_str());
    assert_eq!(v["failures"], json!([]), "{v}");
    for i in 0..5 {
        assert_eq!(
            svc.get_secret(ACME, &format!("a{i}")).await["key_version"],
            2
        );
    }
    svc.stop().await;
}
