//! The rewrap job's metrics (docs/OBSERVABILITY.md): rows by outcome and
//! batches. Its own test binary: the metrics recorder is process-wide.

mod support;

use std::sync::Arc;
use std::time::Duration;

use keyfold_rewrap::job::{REWRAP_BATCHES, REWRAP_ROWS};
use keyfold_rewrap::{JobOptions, RewrapJob, RowSource};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::*;

#[tokio::test]
async fn rows_and_batches_are_counted_by_outcome() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();

    let ring = keyring(Arc::new(Switchable::new()), Duration::from_secs(300)).await;
    let a = Table::new("a");
    a.fill(&ring, 25).await;
    ring.rotate(&admin()).await.unwrap();
    // The application rewrites 5 of them meanwhile: on the target already.
    a.fill(&ring, 5).await;
    let sources: Vec<Arc<dyn RowSource>> = vec![a.clone()];
    let mut job = RewrapJob::builder(ring.clone(), sources)
        .options(JobOptions {
            batch_size: 10,
            ..JobOptions::default()
        })
        .create()
        .unwrap();
    while job.next_batch().await.unwrap().is_some() {}

    // One snapshot: taking one drains the recorder's counters.
    let snapshot = snapshotter.snapshot().into_vec();
    let counted = |name: &str, outcome: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == outcome)
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counted(REWRAP_ROWS, "rewrapped"), 20);
    assert_eq!(counted(REWRAP_ROWS, "skipped"), 5);
    assert_eq!(counted(REWRAP_ROWS, "failed"), 0);
    assert_eq!(counted(REWRAP_BATCHES, "ok"), 3);
}
