//! Metrics and traces (docs/OBSERVABILITY.md): the names and labels a host's
//! dashboards rely on, and that no key material, plaintext or context value
//! ever reaches a span, an event or a metric label. One test: the metrics
//! recorder and the trace subscriber are process-wide.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use keyfold_core::keyring::{Keyring, SEALED_KEYRINGS};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::MemoryStore;
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::{Actor, EncryptionContext, LocalKek, SecretKey, WrapErrorKind};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Every span, field update and event, as text.
#[derive(Default)]
struct Capture {
    lines: Mutex<Vec<String>>,
    next: AtomicU64,
}

struct Line<'a>(&'a mut String);

impl Visit for Line<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl Capture {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
}

impl Subscriber for &'static Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut line = format!("span {}", attrs.metadata().name());
        attrs.record(&mut Line(&mut line));
        self.push(line);
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = "record".to_owned();
        values.record(&mut Line(&mut line));
        self.push(line);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = "event".to_owned();
        event.record(&mut Line(&mut line));
        self.push(line);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// A metric: name, labels, value.
type Sample = (String, Vec<(String, String)>, DebugValue);

fn counter(snapshot: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| match v {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn kms_calls_cache_and_seals_are_measured_and_traced_without_secrets() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let capture: &'static Capture = Box::leak(Box::default());
    tracing::subscriber::set_global_default(capture).unwrap();

    let kms = CountingWrapper::shared(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let ring = Keyring::builder("tenant-obs", kms.clone(), Arc::new(MemoryStore::new()))
        .retry_policy(RetryPolicy::none())
        .create()
        .await
        .unwrap();
    let admin = Actor::new("admin@example.com");
    ring.rotate(&admin).await.unwrap();
    let ctx = EncryptionContext::new().with("column", "ctx-value-SECRET");
    let record = ring.encrypt(&ctx, b"plaintext-SECRET-4111").await.unwrap();
    ring.clear_cache();
    assert_eq!(
        ring.decrypt(&ctx, &record).await.unwrap(),
        b"plaintext-SECRET-4111"
    );
    ring.decrypt(&ctx, &record).await.unwrap();
    let key = ring.master_key(1).await.unwrap();
    let key_hex = hex::encode(key.secret().expose());
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(key.secret().expose());
    ring.rotate(&admin).await.unwrap();
    ring.disable(1, &admin).await.unwrap();
    kms.fail_with(Some(WrapErrorKind::AccessDenied));
    ring.clear_cache();
    assert!(ring.master_key(2).await.is_err());

    let snapshot: Vec<Sample> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| {
            let key = k.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, v)
        })
        .collect();
    let calls = |op, outcome| {
        counter(
            &snapshot,
            "keyfold_kms_calls_total",
            &[
                ("provider", "local"),
                ("operation", op),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(calls("wrap", "ok"), 2, "{snapshot:#?}");
    assert!(calls("unwrap", "ok") >= 1, "{snapshot:#?}");
    assert_eq!(calls("unwrap", "access_denied"), 1, "{snapshot:#?}");
    assert!(
        snapshot
            .iter()
            .any(|(n, _, v)| n == "keyfold_kms_call_duration_seconds"
                && matches!(v, DebugValue::Histogram(h) if !h.is_empty()))
    );
    assert!(counter(&snapshot, "keyfold_key_cache_hits_total", &[]) >= 1);
    assert!(counter(&snapshot, "keyfold_key_cache_misses_total", &[]) >= 1);
    assert!(
        counter(
            &snapshot,
            "keyfold_key_cache_evictions_total",
            &[("reason", "state")]
        ) >= 1
    );
    let sealed = snapshot
        .iter()
        .find(|(n, l, _)| n == SEALED_KEYRINGS && l.iter().any(|(k, v)| k == "cause" && v == "kms"))
        .map(|(_, _, v)| v);
    assert!(
        matches!(sealed, Some(DebugValue::Gauge(g)) if g.into_inner() == 1.0),
        "{sealed:?}"
    );

    let lines = capture.lines.lock().unwrap().clone();
    let text = lines.join("\n");
    assert!(
        text.contains(
            "span keyfold.kms provider=local operation=\"unwrap\" keyring_id=tenant-obs version=1"
        ),
        "{text}"
    );
    assert!(text.contains("outcome=\"access_denied\""), "{text}");
    assert!(
        text.contains("span keyfold.keyring operation=\"disable\" keyring_id=tenant-obs version=1"),
        "{text}"
    );
    // Nothing secret anywhere: not in spans, events or metric labels.
    let labels: String = snapshot
        .iter()
        .map(|(n, l, _)| format!("{n}{l:?}"))
        .collect();
    for secret in ["plaintext-SECRET", "ctx-value-SECRET", &key_hex, &key_b64] {
        assert!(!text.contains(secret), "{secret} in traces");
        assert!(!labels.contains(secret), "{secret} in metrics");
    }
}
