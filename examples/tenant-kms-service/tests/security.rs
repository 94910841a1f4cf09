//! Authorisation over HTTP: step-up is a second factor (TOTP) exchanged
//! for a single-use token bound to tenant, action and target; attempts are
//! rate-limited and audited; tenants cannot name endpoints or secret
//! sources; tokens stay out of `Debug`; the database is owner-only;
//! onboarding stores config and keyring in one transaction.
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

async fn exchange(
    svc: &Service,
    token: &str,
    code: &str,
    action: &str,
    target: &str,
) -> (StatusCode, Value) {
    svc.post(
        "/admin/auth/step-up",
        token,
        json!({ "code": code, "action": action, "target": target }),
    )
    .await
}

async fn rotate_with(svc: &Service, token: &str, step_up: Option<&str>) -> (StatusCode, Value) {
    svc.call(
        Method::POST,
        "/admin/tenant-kms/rotate",
        Some(token),
        step_up,
        None,
    )
    .await
}

async fn op_with(svc: &Service, version: u32, op: &str, step_up: &str) -> (StatusCode, Value) {
    svc.call(
        Method::POST,
        &format!("/admin/tenant-kms/versions/{version}/{op}"),
        Some(ACME),
        Some(step_up),
        None,
    )
    .await
}

fn active(meta: &Value) -> u64 {
    meta["active_version"].as_u64().unwrap()
}

fn audit_with<'a>(events: &'a [Value], event: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dangerous_operation_needs_the_second_factor() {
    let dir = TempDir::new("missing-factor");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;

    // Onboarding without a step-up token: refused, nothing stored.
    let (s, v) = svc
        .post(
            "/admin/tenant-kms",
            ACME,
            json!({ "provider": "local", "kms_key_ref": "dev-kek" }),
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::FORBIDDEN, json!("step_up_required")),
        "{v}"
    );
    assert_eq!(v["action"], "onboard");
    assert_eq!(v["target"], "dev-kek");
    assert_eq!(
        svc.get("/admin/tenant-kms", ACME).await.0,
        StatusCode::CONFLICT
    );

    // The bearer token alone cannot mint a step-up token.
    let (s, v) = svc
        .post("/admin/auth/step-up", ACME, json!({ "action": "rotate" }))
        .await;
    assert_eq!(
        (s, v["error"].clone(), v["field"].clone()),
        (
            StatusCode::BAD_REQUEST,
            json!("missing_field"),
            json!("code")
        ),
        "{v}"
    );
    let (s, v) = svc.post("/admin/auth/step-up", ACME, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    svc.onboard_local(ACME).await;
    svc.rotate(ACME).await;
    // Rotate, disable, enable, destroy: each refused without a token.
    let (s, v) = rotate_with(&svc, ACME, None).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::FORBIDDEN, json!("step_up_required")),
        "{v}"
    );
    for op in ["disable", "enable", "destroy"] {
        let (s, v) = svc
            .call(
                Method::POST,
                &format!("/admin/tenant-kms/versions/1/{op}"),
                Some(ACME),
                None,
                None,
            )
            .await;
        assert_eq!(
            (s, v["error"].clone()),
            (StatusCode::FORBIDDEN, json!("step_up_required")),
            "{op}: {v}"
        );
        assert_eq!(v["action"], op);
        assert_eq!(v["target"], "1");
    }
    // Replacing the config also needs one.
    let (s, v) = svc
        .post(
            "/admin/tenant-kms",
            ACME,
            json!({ "provider": "local", "kms_key_ref": "dev-kek-2" }),
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::FORBIDDEN, json!("step_up_required")),
        "{v}"
    );
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(
        (meta["kms_key_ref"].clone(), active(&meta)),
        (json!("dev-kek"), 2)
    );
    assert_eq!(meta["keys"][0]["state"], "retired");
    let events = svc.audit(ACME).await;
    assert!(
        audit_with(&events, "auth.step_up.refused")
            .iter()
            .all(|e| e["detail"]["reason"] == "missing"),
        "{events:?}"
    );
    assert_eq!(audit_with(&events, "auth.step_up.refused").len(), 6);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_is_refused_and_audited() {
    let dir = TempDir::new("wrong-code");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    let wrong = svc.wrong_code(ACME);
    let (s, v) = exchange(&svc, ACME, &wrong, "rotate", "acme").await;
    assert_eq!(
        (s, v["error"].clone(), v["field"].clone()),
        (
            StatusCode::UNAUTHORIZED,
            json!("step_up_code_invalid"),
            json!("code")
        ),
        "{v}"
    );
    assert!(v.get("step_up_token").is_none());
    for bad in ["", "12345", "1234567", "abcdef"] {
        let (s, v) = exchange(&svc, ACME, bad, "rotate", "acme").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad:?}: {v}");
    }
    // Another tenant's code is a wrong code here.
    let globex_code = svc.code(GLOBEX).await;
    let (s, _) = exchange(&svc, ACME, &globex_code, "rotate", "acme").await;
    // (It could coincide with acme's by chance: one in a million.)
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "the sixth failure in the window"
    );
    let events = svc.audit(ACME).await;
    let failed = audit_with(&events, "auth.step_up.failed");
    assert!(failed.len() >= 6, "{events:?}");
    assert_eq!(failed[0]["detail"]["reason"], "wrong_code");
    assert_eq!(failed[0]["detail"]["action"], "rotate");
    assert_eq!(failed[0]["actor"], "admin@acme.example");
    assert_eq!(failed[0]["client_ip"], "127.0.0.1");
    assert!(
        audit_with(&events, "auth.step_up.issued").len() == 1,
        "onboarding's only"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_token_and_a_code_are_used_once() {
    let dir = TempDir::new("replay");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;

    // Sent twice: a code that stays good for both requests.
    let code = svc.lasting_code(ACME).await;
    let (s, v) = exchange(&svc, ACME, &code, "rotate", "acme").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["step_up_token"].as_str().unwrap().to_owned();
    assert_eq!(v["action"], "rotate");
    assert_eq!(v["target"], "acme");
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'), "{v}");
    assert_eq!(v["expires_in_secs"], 300);
    // The same code again: refused (RFC 6238 §5.2), counted as a failure.
    let (s, v) = exchange(&svc, ACME, &code, "rotate", "acme").await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::UNAUTHORIZED, json!("step_up_code_reused")),
        "{v}"
    );

    let (s, v) = rotate_with(&svc, ACME, Some(&token)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Replayed: refused, and nothing rotated.
    for _ in 0..2 {
        let (s, v) = rotate_with(&svc, ACME, Some(&token)).await;
        assert_eq!(
            (s, v["error"].clone(), v["reason"].clone()),
            (
                StatusCode::FORBIDDEN,
                json!("step_up_invalid"),
                json!("unknown_token")
            ),
            "{v}"
        );
    }
    assert_eq!(active(&svc.get("/admin/tenant-kms", ACME).await.1), 2);

    let events = svc.audit(ACME).await;
    let issued = audit_with(&events, "auth.step_up.issued");
    let used = audit_with(&events, "auth.step_up.used");
    let refused = audit_with(&events, "auth.step_up.refused");
    assert_eq!(issued.len(), 2, "onboarding's and this one");
    assert_eq!(used.len(), 2);
    assert_eq!(refused.len(), 2);
    let id = issued[1]["detail"]["token_id"].as_str().unwrap();
    assert_eq!(used[1]["detail"]["token_id"], id);
    assert_eq!(refused[0]["detail"]["token_id"], id);
    assert_eq!(used[1]["detail"]["action"], "rotate");
    assert!(issued[1]["detail"]["request_id"].as_str().is_some());
    // The log never holds a token.
    let log = serde_json::to_string(&events).unwrap();
    assert!(!log.contains(&token), "a step-up token in the audit log");
    assert!(!log.contains(ACME), "a bearer token in the audit log");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_token_is_bound_to_its_action_target_and_tenant() {
    let dir = TempDir::new("binding");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    svc.onboard_local(GLOBEX).await;
    svc.rotate(ACME).await;
    svc.rotate(ACME).await; // versions 1 and 2 retired, 3 active

    // Cross-action: a token to disable version 1 does not destroy it, nor
    // rotate; a refused token is gone.
    let su = svc.step_up(ACME, "disable", "1").await;
    let (s, v) = op_with(&svc, 1, "destroy", &su).await;
    assert_eq!(
        (s, v["error"].clone(), v["reason"].clone()),
        (
            StatusCode::FORBIDDEN,
            json!("step_up_invalid"),
            json!("wrong_action")
        ),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("disable"), "{v}");
    let (s, _) = op_with(&svc, 1, "disable", &su).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "burnt by the refused use");
    let su = svc.step_up(ACME, "disable", "1").await;
    let (s, v) = rotate_with(&svc, ACME, Some(&su)).await;
    assert_eq!(v["reason"], "wrong_action", "{s}: {v}");

    // Cross-target: a token to disable version 1 does not disable version 2.
    let su = svc.step_up(ACME, "disable", "1").await;
    let (s, v) = op_with(&svc, 2, "disable", &su).await;
    assert_eq!(
        (s, v["error"].clone(), v["reason"].clone()),
        (
            StatusCode::FORBIDDEN,
            json!("step_up_invalid"),
            json!("wrong_target")
        ),
        "{v}"
    );
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert!(
        meta["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["state"] != "disabled"),
        "{meta}"
    );
    // Onboarding is bound to the key being onboarded.
    let su = svc.step_up(ACME, "onboard", "dev-kek").await;
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms",
            Some(ACME),
            Some(&su),
            Some(RawBody::Json(
                json!({ "provider": "local", "kms_key_ref": "dev-kek-2" }),
            )),
        )
        .await;
    assert_eq!(
        (s, v["reason"].clone()),
        (StatusCode::FORBIDDEN, json!("wrong_target")),
        "{v}"
    );
    assert_eq!(
        svc.get("/admin/tenant-kms", ACME).await.1["kms_key_ref"],
        "dev-kek"
    );
    // The tenant-wide actions take the tenant itself as target.
    let (s, v) = exchange(&svc, ACME, &svc.code(ACME).await, "rotate", "globex").await;
    assert_eq!(
        (s, v["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("target")),
        "{v}"
    );

    // Cross-tenant: acme's token does not let globex rotate.
    let su = svc.step_up(ACME, "rotate", "acme").await;
    let (s, v) = rotate_with(&svc, GLOBEX, Some(&su)).await;
    assert_eq!(
        (s, v["reason"].clone()),
        (StatusCode::FORBIDDEN, json!("wrong_tenant")),
        "{v}"
    );
    assert_eq!(active(&svc.get("/admin/tenant-kms", GLOBEX).await.1), 1);

    // The matching use works.
    let su = svc.step_up(ACME, "disable", "1").await;
    let (s, v) = op_with(&svc, 1, "disable", &su).await;
    assert_eq!(
        (s, v["state"].clone()),
        (StatusCode::OK, json!("disabled")),
        "{v}"
    );
    let events = svc.audit(ACME).await;
    let reasons: Vec<&Value> = audit_with(&events, "auth.step_up.refused")
        .iter()
        .map(|e| &e["detail"]["reason"])
        .collect();
    for want in ["wrong_action", "unknown_token", "wrong_target"] {
        assert!(reasons.contains(&&json!(want)), "{want} in {reasons:?}");
    }
    assert!(
        audit_with(&svc.audit(GLOBEX).await, "auth.step_up.refused")
            .iter()
            .any(|e| e["detail"]["reason"] == "wrong_tenant")
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_attempts_are_rate_limited() {
    let dir = TempDir::new("rate-limit");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    for i in 0..5 {
        let (s, v) = exchange(&svc, ACME, &svc.wrong_code(ACME), "rotate", "acme").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "attempt {i}: {v}");
    }
    // Locked out, even with the right code.
    let resp = svc
        .http
        .post(format!("{}/admin/auth/step-up", svc.base))
        .bearer_auth(ACME)
        .json(&json!({ "code": svc.code(ACME).await, "action": "rotate" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&retry), "Retry-After {retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "step_up_rate_limited", "{v}");
    assert!(v["request_id"].as_str().is_some(), "{v}");
    // Per tenant: globex is not locked out.
    let su = svc.step_up(GLOBEX, "onboard", "dev-kek").await;
    assert!(!su.is_empty());
    let events = svc.audit(ACME).await;
    assert!(
        audit_with(&events, "auth.step_up.failed")
            .iter()
            .any(|e| e["detail"]["reason"] == "rate_limited"),
        "{events:?}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_step_up_token_is_refused() {
    let dir = TempDir::new("step-up-expired");
    let mut cfg = config(&dir, 10, None);
    cfg.step_up.token_ttl = std::time::Duration::ZERO;
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    let su = svc.step_up(ACME, "onboard", "dev-kek").await;
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms",
            Some(ACME),
            Some(&su),
            Some(RawBody::Json(
                json!({ "provider": "local", "kms_key_ref": "dev-kek" }),
            )),
        )
        .await;
    assert_eq!(
        (s, v["error"].clone(), v["reason"].clone()),
        (
            StatusCode::FORBIDDEN,
            json!("step_up_invalid"),
            json!("expired")
        ),
        "{v}"
    );
    assert_eq!(
        svc.get("/admin/tenant-kms", ACME).await.0,
        StatusCode::CONFLICT
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_bodies_naming_endpoints_or_secret_sources_are_refused() {
    let dir = TempDir::new("operator-only");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    let aws = json!({
        "region": "eu-west-1",
        "role_arn": "arn:aws:iam::111122223333:role/keyfold",
    });
    let with = |extra: Value| {
        let mut c = aws.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let cases = [
        (
            json!({"provider": "aws", "kms_key_ref": "alias/acme",
                   "config": with(json!({"endpoint_url": "https://169.254.169.254"}))}),
            "config.endpoint_url",
        ),
        (
            json!({"provider": "aws", "kms_key_ref": "alias/acme",
                   "config": with(json!({"endpoint_url": "http://127.0.0.1:9"}))}),
            "config.endpoint_url",
        ),
        (
            json!({"provider": "aws", "kms_key_ref": "alias/acme",
                   "config": with(json!({"sts_endpoint_url": "https://sts.evil.example"}))}),
            "config.sts_endpoint_url",
        ),
        (
            json!({"provider": "aws", "kms_key_ref": "alias/acme", "endpoint_url": "https://evil.example",
                   "config": aws.clone()}),
            "endpoint_url",
        ),
        (
            json!({"provider": "azure",
                   "kms_key_ref": "https://acme.vault.azure.net/keys/k",
                   "config": {"vault_url": "https://acme.vault.azure.net",
                              "azure_tenant_id": "00000000-0000-0000-0000-000000000000",
                              "client_id": "11111111-1111-1111-1111-111111111111",
                              "client_secret_env_var": "AWS_SECRET_ACCESS_KEY"}}),
            "config.client_secret_env_var",
        ),
        (
            json!({"provider": "azure",
                   "kms_key_ref": "https://acme.vault.azure.net/keys/k",
                   "config": {"vault_url": "https://acme.vault.azure.net",
                              "endpoint_url": "https://attacker.example"}}),
            "config.endpoint_url",
        ),
        (
            json!({"provider": "gcp",
                   "kms_key_ref": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
                   "config": {"impersonate_service_account": "sa@p.iam.gserviceaccount.com",
                              "endpoint_url": "https://cloudkms.googleapis.com"}}),
            "config.endpoint_url",
        ),
        (
            json!({"provider": "local", "kms_key_ref": "dev-kek",
                   "config": {"kek_file": "/etc/shadow"}}),
            "config.kek_file",
        ),
        (
            json!({"provider": "local", "kms_key_ref": "dev-kek",
                   "config": {"kek_env_var": "AWS_SECRET_ACCESS_KEY"}}),
            "config.kek_env_var",
        ),
    ];
    for (body, field) in cases {
        let (s, v) = svc.post("/admin/tenant-kms", ACME, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"], "operator_only_field", "{body}: {v}");
        assert_eq!(v["field"], field, "{v}");
        assert!(v["message"].as_str().unwrap().contains("operator"), "{v}");
    }
    assert_eq!(
        svc.get("/admin/tenant-kms", ACME).await.0,
        StatusCode::CONFLICT
    );
    let events = svc.audit(ACME).await;
    assert!(
        !names(&events).iter().any(|n| n.starts_with("kms.")),
        "no probe ran: {events:?}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_debug_output() {
    let dir = TempDir::new("debug");
    let cfg = config(&dir, 10, None);
    let shown = format!("{cfg:?}");
    assert!(!shown.contains(ACME) && !shown.contains(GLOBEX), "{shown}");
    let mut running = tenant_kms_service::start(cfg.clone(), local_providers(&cfg))
        .await
        .unwrap();
    assert_eq!(running.enrolments.len(), 2);
    let secrets: Vec<String> = running
        .enrolments
        .iter()
        .map(|e| e.secret_base32.clone())
        .collect();
    let shown = format!("{running:?}");
    for s in &secrets {
        assert!(
            !shown.contains(s.as_str()),
            "an enrolment secret in {shown}"
        );
    }
    assert!(!shown.contains(ACME), "{shown}");
    running.enrolments.clear();
    running.stop().await.unwrap();
    // A second start enrols nothing: the secret was shown once.
    let running = tenant_kms_service::start(cfg.clone(), local_providers(&cfg))
        .await
        .unwrap();
    assert!(running.enrolments.is_empty());
    running.stop().await.unwrap();
    let token = tenant_kms_service::stepup::Token::new("a-step-up-token-value");
    assert!(!format!("{token:?}").contains("a-step-up-token-value"));
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_and_its_wal_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("perms");
    let cfg = config(&dir, 10, None);
    // A database file left world-readable by an earlier version is fixed.
    std::fs::write(common::sqlite_path(&cfg), b"").unwrap();
    std::fs::set_permissions(
        common::sqlite_path(&cfg),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    svc.put_secret(ACME, "s", "v").await;
    let mut checked = 0;
    for suffix in ["", "-wal", "-shm"] {
        let mut path = common::sqlite_path(&cfg).into_os_string();
        path.push(suffix);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path:?}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{path:?} has mode {mode:o}");
        checked += 1;
    }
    assert_eq!(checked, 3);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_stores_the_config_and_the_keyring_in_one_transaction() {
    let dir = TempDir::new("atomic");
    let cfg = config(&dir, 10, None);
    // The config write fails inside the transaction (as a crash there would
    // cut it short).
    let db = common::sqlite_db(&cfg);
    common::check_onboarding_is_one_transaction(&cfg, |fail| {
        let sql = if fail {
            "CREATE TRIGGER fail_config BEFORE UPDATE ON tenant_kms
             BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;"
        } else {
            "DROP TRIGGER fail_config;"
        };
        db.lock().execute_batch(sql).unwrap();
        std::future::ready(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_state_is_shared_by_instances_on_one_database() {
    let dir = TempDir::new("two-instances");
    let cfg = config(&dir, 10, None);
    let a = Service::start(cfg.clone(), local_providers(&cfg)).await;
    let b = Service::start(cfg.clone(), local_providers(&cfg)).await;
    a.onboard_local(ACME).await;

    // A token issued by one instance is used on another, once.
    let su = a.step_up(ACME, "rotate", "acme").await;
    let (s, v) = rotate_with(&b, ACME, Some(&su)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = rotate_with(&a, ACME, Some(&su)).await;
    assert_eq!(
        (s, v["reason"].clone()),
        (StatusCode::FORBIDDEN, json!("unknown_token")),
        "{v}"
    );
    // A code accepted by one instance is refused by the other.
    let code = a.code(ACME).await;
    let (s, v) = exchange(&a, ACME, &code, "rotate", "acme").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = exchange(&b, ACME, &code, "rotate", "acme").await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::UNAUTHORIZED, json!("step_up_code_reused")),
        "{v}"
    );
    // Failures count across instances too.
    for _ in 0..4 {
        let (s, _) = exchange(&a, ACME, &a.wrong_code(ACME), "rotate", "acme").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, _) = exchange(&b, ACME, &b.wrong_code(ACME), "rotate", "acme").await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "1 reused + 4 wrong on a: locked on b"
    );

    // A config replaced on one instance is followed by the other.
    let globex = common::GLOBEX;
    b.onboard_local(globex).await;
    b.put_secret(globex, "g", "before").await;
    let (s, v) = a
        .onboard(
            globex,
            json!({ "provider": "local", "kms_key_ref": "dev-kek-2" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let meta = b.get("/admin/tenant-kms", globex).await.1;
    assert_eq!(meta["kms_key_ref"], "dev-kek-2", "{meta}");
    assert_eq!(b.get_secret(globex, "g").await["value"], "before");
    b.put_secret(globex, "g", "after").await;
    assert_eq!(a.get_secret(globex, "g").await["value"], "after");
    a.stop().await;
    b.stop().await;
}
