//! A failed audit write is counted in `keyfold_audit_write_failures_total`
//! (docs/OBSERVABILITY.md). Its own test binary: the metrics recorder is
//! process-wide, and the sink writes from its own task.

mod support;

use keyfold_core::audit::AUDIT_WRITE_FAILURES;
use keyfold_core::time::Timestamp;
use keyfold_core::{Actor, AuditEvent, AuditKind, AuditSink};
use keyfold_postgres::{PgAuditSink, TablePrefix, migrate};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::TestDb;

fn event(n: u64) -> AuditEvent {
    AuditEvent {
        keyring_id: "tenant".to_owned(),
        actor: Actor::new("admin"),
        at: Timestamp(1_700_000_000 + n),
        kind: AuditKind::Unsealed,
    }
}

#[tokio::test]
async fn failed_audit_writes_are_counted_and_written_ones_are_not() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let failures = || -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| {
                key.key().name() == AUDIT_WRITE_FAILURES
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "sink" && l.value() == "postgres")
            })
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => n,
                other => panic!("{AUDIT_WRITE_FAILURES} is a counter: {other:?}"),
            })
            .sum()
    };

    let db = TestDb::new().await;
    let pool = db.pool().await;
    // Tables exist: written, nothing counted.
    migrate(&pool, &TablePrefix::default()).await.unwrap();
    let good = PgAuditSink::new(pool.clone(), TablePrefix::default());
    good.record(event(1));
    good.flush().await.unwrap();
    assert_eq!(failures(), 0);

    // No tables under this prefix: both events fail, and both are counted.
    let bad = PgAuditSink::new(pool, TablePrefix::new("missing_").unwrap());
    bad.record(event(2));
    bad.record(event(3));
    assert!(bad.flush().await.is_err());
    assert_eq!(failures(), 2);
}
