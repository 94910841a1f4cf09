//! One error shape for every 4xx and 5xx, axum's own answers included:
//! `{"error", "message", "field" (when one is at fault), "request_id"}`,
//! the request id also in `x-request-id`; every code in the README.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed check is a test failure"
)]

mod common;

use common::{ACME, Service, TempDir, config, local_providers};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Sends a raw request; checks the error shape; returns status and body.
async fn error_of(
    svc: &Service,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> (StatusCode, Value) {
    let mut req = svc.http.request(method, format!("{}{path}", svc.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some((content_type, text)) = body {
        req = req
            .header("content-type", content_type)
            .body(text.to_owned());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status}"
    );
    let header = resp
        .headers()
        .get("x-request-id")
        .map(|h| h.to_str().unwrap().to_owned());
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|h| h.to_str().unwrap().to_owned())
            .as_deref(),
        Some("application/json"),
        "{path}"
    );
    let v: Value = resp.json().await.unwrap();
    let code = v["error"].as_str().unwrap_or_else(|| panic!("{path}: {v}"));
    assert!(
        code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "{code}"
    );
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{path}: {v}"
    );
    let id = v["request_id"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(header.as_deref(), Some(id), "{path}: header and body agree");
    let readme = include_str!("../README.md");
    assert!(
        readme.contains(&format!("`{code}`")),
        "error code {code} is not in the service README"
    );
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_documented_shape() {
    let dir = TempDir::new("errors");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;

    let (s, v) = error_of(&svc, Method::GET, "/nope", Some(ACME), None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, v) = error_of(&svc, Method::DELETE, "/secrets/x", Some(ACME), None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let (s, v) = error_of(
        &svc,
        Method::GET,
        "/admin/tenant-kms/rotate",
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let (s, v) = error_of(
        &svc,
        Method::PUT,
        "/secrets/x",
        Some(ACME),
        Some(("application/json", "{\"value\": ")),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (s, v) = error_of(&svc, Method::GET, "/secrets/x", None, None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, v) = error_of(&svc, Method::GET, "/secrets/x", Some(ACME), None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("not_onboarded"))
    );
    // A path segment axum cannot decode: its own rejection, reshaped.
    let (s, v) = error_of(&svc, Method::GET, "/secrets/%FF", Some(ACME), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Each request has its own id.
    let (_, a) = error_of(&svc, Method::GET, "/nope", None, None).await;
    let (_, b) = error_of(&svc, Method::GET, "/nope", None, None).await;
    assert_ne!(a["request_id"], b["request_id"]);
    // A body too large for axum's limit.
    let big = format!("{{\"value\": \"{}\"}}", "x".repeat(3 << 20));
    let resp = reqwest::Client::new()
        .put(format!("{}/secrets/x", svc.base))
        .bearer_auth(ACME)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "bad_body", "{v}");
    assert!(v["request_id"].as_str().is_some(), "{v}");
    svc.stop().await;
}

#[test]
fn the_readme_lists_every_error_code_the_code_uses() {
    let readme = include_str!("../README.md");
    let sources = [
        include_str!("../src/api.rs"),
        include_str!("../src/error.rs"),
    ];
    let mut missing = Vec::new();
    for src in sources {
        // Codes are string literals passed next to a status or as the
        // first argument of bad_request.
        for (i, _) in src.match_indices("\"") {
            let rest = &src[i + 1..];
            let Some(end) = rest.find('"') else { continue };
            let lit = &rest[..end];
            let is_code = !lit.is_empty()
                && lit.len() < 40
                && lit.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            let before = src[..i].trim_end();
            let near_status = before.ends_with("bad_request(")
                || before
                    .trim_end_matches(',')
                    .rsplit_once("StatusCode::")
                    .is_some_and(|(_, s)| s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
            if is_code && near_status && !readme.contains(&format!("`{lit}`")) {
                missing.push(lit.to_owned());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "codes missing from the README: {missing:?}"
    );
}
