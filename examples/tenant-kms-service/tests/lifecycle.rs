//! keyfold's lifecycle through the service, over HTTP: the rotation policy
//! (`PATCH /admin/tenant-kms/rotation`), the operator's seal and unseal
//! (the post-breach cycle), and a scheduled destroy carried out by the
//! maintenance task the service runs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed check is a test failure"
)]

mod common;

use common::{ACME, RawBody, Service, TempDir, config, local_providers, names, poll};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn patch_rotation(svc: &Service, body: Value, step_up: Option<&str>) -> (StatusCode, Value) {
    svc.call(
        Method::PATCH,
        "/admin/tenant-kms/rotation",
        Some(ACME),
        step_up,
        Some(RawBody::Json(body)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotation_policy_is_validated_and_needs_step_up() {
    let dir = TempDir::new("policy");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    for (body, field) in [
        (json!({"period_days": 0}), "period_days"),
        (json!({"period_days": 3651}), "period_days"),
        (json!({"period_days": -1}), "period_days"),
        (json!({"period_days": "90"}), "period_days"),
        (json!({}), "period_days"),
        (json!({"period_days": 90, "enabled": "yes"}), "enabled"),
        (json!({"period_days": 90, "every": 3}), "every"),
    ] {
        let (s, v) = patch_rotation(&svc, body.clone(), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let (s, v) = patch_rotation(&svc, json!({"period_days": 90}), None).await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::FORBIDDEN, json!("step_up_required")),
        "{v}"
    );
    assert_eq!(v["action"], "rotation_policy");
    for days in [1, 3650] {
        let su = svc.step_up(ACME, "rotation_policy", "acme").await;
        let (s, v) = patch_rotation(&svc, json!({"period_days": days}), Some(&su)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["rotation_policy"]["period_days"], days);
    }
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(
        meta["rotation_policy"],
        json!({"enabled": true, "period_days": 3650}),
        "{meta}"
    );
    let n = names(&svc.audit(ACME).await)
        .into_iter()
        .filter(|n| *n == "kms.rotation_policy.set")
        .count();
    assert_eq!(n, 2);
    // The policy lives with the keyring: a restart keeps it.
    svc.stop().await;
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(meta["rotation_policy"]["period_days"], 3650);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_seal_holds_until_an_unseal_with_step_up() {
    let dir = TempDir::new("seal");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    svc.put_secret(ACME, "s", "v").await;

    let (s, v) = svc.post("/admin/tenant-kms/seal", ACME, json!({})).await;
    assert_eq!(
        (s, v["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("reason")),
        "{v}"
    );
    let (s, v) = svc
        .post(
            "/admin/tenant-kms/seal",
            ACME,
            json!({"reason": "incident 42: token leak"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = svc.get("/secrets/s", ACME).await;
    assert_eq!(
        (s, v["error"].clone()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!("keyring_sealed_by_operator")
        ),
        "{v}"
    );
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(meta["sealed"], true);
    assert_eq!(meta["operator_seal"]["reason"], "incident 42: token leak");

    // The maintenance task (every 100 ms here) never lifts it; an unseal
    // needs step-up.
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/unseal",
            Some(ACME),
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::FORBIDDEN, json!("step_up_required")),
        "{v}"
    );
    assert_eq!(
        svc.get("/secrets/s", ACME).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let su = svc.step_up(ACME, "unseal", "acme").await;
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/unseal",
            Some(ACME),
            Some(&su),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(svc.get_secret(ACME, "s").await["value"], "v");
    let events = svc.audit(ACME).await;
    let sealed = events
        .iter()
        .find(|e| e["event"] == "kms.sealed.manual")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(sealed["actor"], "admin@acme.example");
    assert!(names(&events).contains(&"kms.unsealed"), "{events:?}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_destroy_is_carried_out_by_the_maintenance_task() {
    let dir = TempDir::new("schedule");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    for i in 0..5 {
        svc.put_secret(ACME, &format!("k{i}"), "v").await;
    }
    let lease = svc.rotate(ACME).await["rewrap_lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    svc.completed_job(ACME, &lease).await;

    // Only a disabled version can be scheduled.
    let su = svc.step_up(ACME, "destroy", "1").await;
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/versions/1/schedule-destroy",
            Some(ACME),
            Some(&su),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::CONFLICT, json!("destroy_refused")),
        "{v}"
    );
    let (s, _) = svc.version_op(ACME, 1, "disable").await;
    assert_eq!(s, StatusCode::OK);
    let su = svc.step_up(ACME, "destroy", "1").await;
    let (s, v) = svc
        .call(
            Method::POST,
            "/admin/tenant-kms/versions/1/schedule-destroy",
            Some(ACME),
            Some(&su),
            Some(RawBody::Text("{\"at\": \"soon\"}")),
        )
        .await;
    assert_eq!(
        (s, v["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("at")),
        "{v}"
    );
    // Without `at`: the earliest time allowed.
    let (s, v) = svc.version_op(ACME, 1, "schedule-destroy").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["destroy_scheduled_at"].as_str().unwrap().ends_with('Z'),
        "{v}"
    );

    let meta = poll("the maintenance task's destroy", || async {
        let meta = svc.get("/admin/tenant-kms", ACME).await.1;
        (meta["keys"][0]["state"] == "destroyed").then_some(meta)
    })
    .await;
    assert_eq!(meta["min_decryption_version"], 2, "{meta}");
    let events = svc.audit(ACME).await;
    assert!(
        names(&events).contains(&"kms.destroy.scheduled"),
        "{events:?}"
    );
    let destroyed = events
        .iter()
        .find(|e| e["event"] == "kms.version.state_changed" && e["detail"]["to"] == "destroyed")
        .unwrap();
    assert_eq!(destroyed["actor"], "tenant-kms-service/maintenance");
    for i in 0..5 {
        assert_eq!(svc.get_secret(ACME, &format!("k{i}")).await["value"], "v");
    }
    svc.stop().await;
}
