//! PgAuditSink against a real PostgreSQL server (KEYFOLD_PG_URL; see
//! tests/support).

mod support;

use std::collections::HashSet;

use keyfold_core::time::Timestamp;
use keyfold_core::{Actor, AuditEvent, AuditKind, AuditSink};
use keyfold_postgres::{
    ChainHead, ChainVerification, PgAuditError, PgAuditSink, TablePrefix, Tamper, migrate,
};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use support::TestDb;

fn event(n: usize) -> AuditEvent {
    AuditEvent {
        keyring_id: format!("tenant-{}", n % 3),
        actor: Actor::new(format!("actor-{n:04}")),
        at: Timestamp(1_700_000_000 + n as u64),
        kind: if n.is_multiple_of(2) {
            AuditKind::Unsealed
        } else {
            AuditKind::RewrapStarted {
                job_id: format!("job-{n}"),
                target_version: 2,
            }
        },
    }
}

async fn sink_on(db: &TestDb) -> (PgPool, PgAuditSink) {
    let pool = db.pool().await;
    migrate(&pool, &TablePrefix::default()).await.unwrap();
    (pool.clone(), PgAuditSink::new(pool, TablePrefix::default()))
}

/// A sink with rows 1..=n and the trigger off (as a table owner could).
async fn tamperable(n: usize) -> (PgPool, PgAuditSink) {
    let db = TestDb::new().await;
    let (pool, sink) = sink_on(&db).await;
    let events: Vec<_> = (1..=n).map(event).collect();
    sink.append_all(&events).await.unwrap();
    assert!(matches!(
        sink.verify().await.unwrap(),
        ChainVerification::Intact { head: ChainHead { seq, .. } } if seq == n as u64
    ));
    sqlx::query("ALTER TABLE keyfold_audit DISABLE TRIGGER USER")
        .execute(&pool)
        .await
        .unwrap();
    (pool, sink)
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

async fn tamper(sink: &PgAuditSink) -> Tamper {
    match sink.verify().await.unwrap() {
        ChainVerification::Tampered(t) => t,
        other => panic!("tampering not detected: {other:?}"),
    }
}

/// The actors of every row, in row order.
async fn actors(pool: &PgPool) -> Vec<String> {
    let contents: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT content FROM keyfold_audit ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap();
    contents
        .iter()
        .map(|c| serde_json::from_slice::<AuditEvent>(c).unwrap().actor.0)
        .collect()
}

#[tokio::test]
async fn appended_events_chain_and_verify() {
    let db = TestDb::new().await;
    let (pool, sink) = sink_on(&db).await;
    assert_eq!(
        sink.verify().await.unwrap(),
        ChainVerification::Intact {
            head: ChainHead {
                seq: 0,
                hash: [0; 32]
            }
        }
    );
    let first = sink.append(&event(1)).await.unwrap();
    assert_eq!(first.seq, 1);
    let head = sink.append_all(&[event(2), event(3)]).await.unwrap();
    assert_eq!(head.seq, 3);
    assert_eq!(sink.head().await.unwrap(), head);
    assert_eq!(
        sink.verify().await.unwrap(),
        ChainVerification::Intact { head }
    );
    assert_eq!(
        sink.verify_against(&first).await.unwrap(),
        ChainVerification::Intact { head }
    );

    // The stored hash is the documented one, over the stored content.
    let (content, prev, hash): (Vec<u8>, Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT content, prev_hash, hash FROM keyfold_audit WHERE seq = 2")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(prev, first.hash);
    let mut h = Sha256::new();
    h.update(b"keyfold-audit-v1\0");
    h.update(&prev);
    h.update(&content);
    assert_eq!(hash, h.finalize().to_vec());
    assert_eq!(
        serde_json::from_slice::<AuditEvent>(&content).unwrap(),
        event(2)
    );
    let (keyring_id, name): (String, String) =
        sqlx::query_as("SELECT keyring_id, event FROM keyfold_audit WHERE seq = 3")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (keyring_id.as_str(), name.as_str()),
        ("tenant-0", "kms.rewrap.started")
    );
}

#[tokio::test]
async fn the_table_refuses_updates_deletes_and_truncate() {
    let db = TestDb::new().await;
    let (pool, sink) = sink_on(&db).await;
    sink.append(&event(1)).await.unwrap();
    for sql in [
        "UPDATE keyfold_audit SET keyring_id = 'x'",
        "DELETE FROM keyfold_audit",
        "TRUNCATE keyfold_audit",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert!(matches!(
        sink.verify().await.unwrap(),
        ChainVerification::Intact { .. }
    ));
}

#[tokio::test]
async fn an_edited_row_is_found() {
    let (pool, sink) = tamperable(6).await;
    exec(
        &pool,
        "UPDATE keyfold_audit SET content = convert_to(replace(convert_from(content, 'UTF8'),
         'actor-0004', 'mallory'), 'UTF8') WHERE seq = 4",
    )
    .await;
    assert_eq!(tamper(&sink).await, Tamper::Edited { seq: 4 });

    // Only a queryable column changed: also an edit.
    let (pool, sink) = tamperable(6).await;
    exec(
        &pool,
        "UPDATE keyfold_audit SET keyring_id = 'tenant-9' WHERE seq = 2",
    )
    .await;
    assert_eq!(tamper(&sink).await, Tamper::Edited { seq: 2 });

    // The last row, with its own hash recomputed: the head disagrees.
    let (pool, sink) = tamperable(6).await;
    exec(
        &pool,
        "UPDATE keyfold_audit SET content = convert_to(replace(convert_from(content, 'UTF8'),
         'actor-0006', 'mallory'), 'UTF8') WHERE seq = 6",
    )
    .await;
    exec(
        &pool,
        "UPDATE keyfold_audit SET hash = sha256('keyfold-audit-v1'::bytea || '\\x00'::bytea
         || prev_hash || content) WHERE seq = 6",
    )
    .await;
    assert_eq!(tamper(&sink).await, Tamper::Edited { seq: 6 });

    // A middle row with its own hash recomputed: the next row no longer
    // chains to it.
    let (pool, sink) = tamperable(6).await;
    exec(
        &pool,
        "UPDATE keyfold_audit SET content = convert_to(replace(convert_from(content, 'UTF8'),
         'actor-0003', 'mallory'), 'UTF8') WHERE seq = 3",
    )
    .await;
    exec(
        &pool,
        "UPDATE keyfold_audit SET hash = sha256('keyfold-audit-v1'::bytea || '\\x00'::bytea
         || prev_hash || content) WHERE seq = 3",
    )
    .await;
    assert_eq!(tamper(&sink).await, Tamper::Unlinked { seq: 4 });
}

#[tokio::test]
async fn a_deleted_row_is_found() {
    let (pool, sink) = tamperable(6).await;
    exec(&pool, "DELETE FROM keyfold_audit WHERE seq = 3").await;
    assert_eq!(tamper(&sink).await, Tamper::Removed { after: 2 });

    // The last rows: the head still counts them.
    let (pool, sink) = tamperable(6).await;
    exec(&pool, "DELETE FROM keyfold_audit WHERE seq >= 5").await;
    assert_eq!(tamper(&sink).await, Tamper::Removed { after: 4 });

    // The first row.
    let (pool, sink) = tamperable(6).await;
    exec(&pool, "DELETE FROM keyfold_audit WHERE seq = 1").await;
    assert_eq!(tamper(&sink).await, Tamper::Removed { after: 0 });

    // Deleted and the rest renumbered to close the gap.
    let (pool, sink) = tamperable(6).await;
    exec(&pool, "DELETE FROM keyfold_audit WHERE seq = 3").await;
    for seq in 4..=6 {
        exec(
            &pool,
            &format!(
                "UPDATE keyfold_audit SET seq = {} WHERE seq = {seq}",
                seq - 1
            ),
        )
        .await;
    }
    exec(&pool, "UPDATE keyfold_audit_head SET seq = 5").await;
    assert_eq!(tamper(&sink).await, Tamper::Unlinked { seq: 3 });
}

#[tokio::test]
async fn a_reordered_row_is_found() {
    let (pool, sink) = tamperable(6).await;
    // Swap rows 3 and 4.
    exec(&pool, "UPDATE keyfold_audit SET seq = 1000 WHERE seq = 3").await;
    exec(&pool, "UPDATE keyfold_audit SET seq = 3 WHERE seq = 4").await;
    exec(&pool, "UPDATE keyfold_audit SET seq = 4 WHERE seq = 1000").await;
    assert_eq!(
        tamper(&sink).await,
        Tamper::Reordered {
            seq: 3,
            predecessor: 4
        }
    );
}

#[tokio::test]
async fn a_rewritten_tail_is_caught_only_against_an_exported_head() {
    let (pool, sink) = tamperable(6).await;
    let anchor = {
        let (hash,): (Vec<u8>,) = sqlx::query_as("SELECT hash FROM keyfold_audit WHERE seq = 4")
            .fetch_one(&pool)
            .await
            .unwrap();
        ChainHead {
            seq: 4,
            hash: hash.try_into().unwrap(),
        }
    };
    // Edit row 3 and recompute every hash from it to the head.
    exec(
        &pool,
        "UPDATE keyfold_audit SET content = convert_to(replace(convert_from(content, 'UTF8'),
         'actor-0003', 'mallory'), 'UTF8') WHERE seq = 3",
    )
    .await;
    for seq in 3..=6 {
        if seq > 3 {
            exec(
                &pool,
                &format!(
                    "UPDATE keyfold_audit SET prev_hash =
                     (SELECT hash FROM keyfold_audit WHERE seq = {}) WHERE seq = {seq}",
                    seq - 1
                ),
            )
            .await;
        }
        exec(
            &pool,
            &format!(
                "UPDATE keyfold_audit SET hash = sha256('keyfold-audit-v1'::bytea
                 || '\\x00'::bytea || prev_hash || content) WHERE seq = {seq}"
            ),
        )
        .await;
    }
    exec(
        &pool,
        "UPDATE keyfold_audit_head SET hash = (SELECT hash FROM keyfold_audit WHERE seq = 6)",
    )
    .await;
    assert!(
        matches!(
            sink.verify().await.unwrap(),
            ChainVerification::Intact { .. }
        ),
        "a consistent rewrite passes a plain verify"
    );
    assert_eq!(
        sink.verify_against(&anchor).await.unwrap(),
        ChainVerification::Tampered(Tamper::AnchorMissing { seq: 4 })
    );
}

#[tokio::test]
async fn concurrent_appends_from_several_pools_lose_nothing() {
    let db = TestDb::new().await;
    let mut sinks = Vec::new();
    for _ in 0..4 {
        let pool = db.pool_with(3).await;
        migrate(&pool, &TablePrefix::default()).await.unwrap();
        sinks.push(PgAuditSink::new(pool, TablePrefix::default()));
    }
    let per_task = 15;
    let mut tasks = Vec::new();
    for (p, sink) in sinks.iter().enumerate() {
        for t in 0..3 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let n = (p * 3 + t) * 100 + i;
                    if i % 3 == 0 {
                        sink.append_all(&[event(n), event(n + 50)]).await.unwrap();
                    } else if i % 3 == 1 {
                        sink.record(event(n));
                    } else {
                        sink.append(&event(n)).await.unwrap();
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    for sink in &sinks {
        sink.flush().await.unwrap();
    }
    let pool = db.pool().await;
    let written = actors(&pool).await;
    let mut expected = HashSet::new();
    for task in 0..12 {
        for i in 0..per_task {
            let n = task * 100 + i;
            expected.insert(event(n).actor.0);
            if i % 3 == 0 {
                expected.insert(event(n + 50).actor.0);
            }
        }
    }
    assert_eq!(written.len(), expected.len(), "every event once");
    assert_eq!(written.iter().cloned().collect::<HashSet<_>>(), expected);
    match sinks[0].verify().await.unwrap() {
        ChainVerification::Intact { head } => assert_eq!(head.seq, expected.len() as u64),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn recorded_events_are_written_in_order() {
    let db = TestDb::new().await;
    let (pool, sink) = sink_on(&db).await;
    for n in 0..40 {
        sink.record(event(n));
    }
    sink.flush().await.unwrap();
    let expected: Vec<String> = (0..40).map(|n| event(n).actor.0).collect();
    assert_eq!(actors(&pool).await, expected);
    assert!(sink.take_unwritten().is_empty());
}

#[tokio::test]
async fn a_failed_background_write_is_reported_and_kept() {
    let db = TestDb::new().await;
    // No tables under this prefix: every write fails.
    let pool = db.pool().await;
    let sink = PgAuditSink::new(pool.clone(), TablePrefix::new("missing_").unwrap());
    sink.record(event(1));
    sink.record(event(2));
    match sink.flush().await {
        Err(PgAuditError::Unwritten {
            count: 2,
            last_error,
        }) => {
            assert!(last_error.contains("missing_audit_head"), "{last_error}");
        }
        other => panic!("a failed write must be an error: {other:?}"),
    }
    // Still an error until the host takes them.
    assert!(sink.flush().await.is_err());
    assert!(matches!(
        sink.append(&event(3)).await,
        Err(PgAuditError::Database(_))
    ));
    let kept = sink.take_unwritten();
    assert_eq!(kept, [event(1), event(2)]);
    sink.flush().await.unwrap();

    // Once the tables exist, the host re-appends them.
    migrate(&pool, &TablePrefix::new("missing_").unwrap())
        .await
        .unwrap();
    assert_eq!(sink.append_all(&kept).await.unwrap().seq, 2);
}

#[tokio::test]
async fn debug_never_shows_the_database_password() {
    let db = TestDb::new().await;
    let secret = "hunter2-do-not-print";
    let pool =
        sqlx::postgres::PgPoolOptions::new().connect_lazy_with(db.options.clone().password(secret));
    let sink = PgAuditSink::new(pool, TablePrefix::default());
    let shown = format!("{sink:?}");
    assert!(!shown.contains(secret), "{shown}");
    assert!(shown.contains("keyfold_audit"), "{shown}");
}

#[tokio::test]
async fn events_recorded_just_before_the_sink_is_dropped_are_still_written() {
    let db = TestDb::new().await;
    let (pool, sink) = sink_on(&db).await;
    for n in 0..20 {
        sink.record(event(n));
    }
    drop(sink);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let written = actors(&pool).await;
        if written.len() == 20 {
            let expected: Vec<String> = (0..20).map(|n| event(n).actor.0).collect();
            assert_eq!(written, expected);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 20 events written",
            written.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let sink = PgAuditSink::new(pool, TablePrefix::default());
    assert!(matches!(
        sink.verify().await.unwrap(),
        ChainVerification::Intact {
            head: ChainHead { seq: 20, .. }
        }
    ));
}
