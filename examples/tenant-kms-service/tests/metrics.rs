//! `/metrics` (docs/OBSERVABILITY.md), read back over HTTP after a rotation
//! and a rewrap. Its own test binary: the recorder is process-wide.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use common::{ACME, Service, TempDir, config, local_providers};

const PLAINTEXT: &str = "plaintext-that-must-never-be-a-label";

/// The value of the first sample of `name` whose labels include every one
/// of `labels` (`key="value"`), summed over the matching samples.
fn sample(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric == name && labels.iter().all(|l| rest.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_kms_calls_the_cache_and_the_rewrap_after_a_rotation() {
    let dir = TempDir::new("metrics");
    let cfg = config(&dir, 5, None);
    let svc = Service::start(cfg.clone(), local_providers(&cfg)).await;
    svc.onboard_local(ACME).await;
    for i in 0..12 {
        svc.put_secret(ACME, &format!("m{i}"), PLAINTEXT).await;
    }
    let lease = svc.rotate(ACME).await["rewrap_lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    svc.completed_job(ACME, &lease).await;
    assert_eq!(svc.get_secret(ACME, "m3").await["value"], PLAINTEXT);

    let http = reqwest::Client::new();
    let response = http.get(svc.metrics_url()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let page = response.text().await.unwrap();

    let wraps = sample(
        &page,
        "keyfold_kms_calls_total",
        &[
            r#"provider="local""#,
            r#"operation="wrap""#,
            r#"outcome="ok""#,
        ],
    );
    assert!(wraps.is_some_and(|n| n >= 2.0), "wraps {wraps:?}\n{page}");
    // Versions made here are cached when wrapped: no unwrap was needed.
    assert!(
        page.contains("keyfold_kms_call_duration_seconds"),
        "the KMS latency is missing\n{page}"
    );
    let hits = sample(&page, "keyfold_key_cache_hits_total", &[]);
    assert!(
        hits.is_some_and(|n| n >= 1.0),
        "cache hits {hits:?}\n{page}"
    );
    // All 12 rows moved to the new version (this test's tenant only has
    // them), in batches of 5.
    let rewrapped = sample(
        &page,
        "keyfold_rewrap_rows_total",
        &[r#"outcome="rewrapped""#],
    );
    assert!(
        rewrapped.is_some_and(|n| n >= 12.0),
        "rewrapped {rewrapped:?}\n{page}"
    );
    let batches = sample(&page, "keyfold_rewrap_batches_total", &[r#"outcome="ok""#]);
    assert!(
        batches.is_some_and(|n| n >= 3.0),
        "batches {batches:?}\n{page}"
    );

    // Never a tenant's data: no secret value, no admin token.
    assert!(!page.contains(PLAINTEXT), "{page}");
    assert!(!page.contains(ACME), "{page}");

    // Not on the tenants' port.
    let (status, _) = svc.get("/metrics", ACME).await;
    assert_eq!(status, 404);
    svc.stop().await;
}
