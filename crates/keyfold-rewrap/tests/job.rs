//! The rewrap job against in-memory tables.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use keyfold_core::audit::RecordingSink;
use keyfold_core::keyring::DestroyAuthorization;
use keyfold_core::time::{ManualClock, Timestamp};
use keyfold_core::{Suite, format, record};
use keyfold_rewrap::{
    Checkpoint, JobError, JobOptions, JobProgress, Mode, RewrapJob, RowSource, Shard, Verify,
    decrypt_and_upgrade,
};
use support::*;

const LONG: Duration = Duration::from_secs(3600);

fn sources(tables: &[&Arc<Table>]) -> Vec<Arc<dyn RowSource>> {
    tables
        .iter()
        .map(|t| Arc::clone(t) as Arc<dyn RowSource>)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn batches_interleave_sources_and_every_row_lands_on_the_target() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let (a, b) = (
        Table::new("secret_environment_configs"),
        Table::new("integration_configs"),
    );
    a.fill(&ring, 130).await;
    b.fill(&ring, 70).await;
    ring.rotate(&admin()).await.unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a, &b]))
        .audit(sink.clone(), admin())
        .create()
        .unwrap();
    assert_eq!(job.target_version(), 2);

    let first = job.next_batch().await.unwrap().unwrap();
    assert_eq!(first.per_source[0].1.rewrapped, 50);
    assert_eq!(first.per_source[1].1.rewrapped, 50);
    assert_eq!(first.estimated_remaining, Some(100));
    // b has 20 left: a gets the rest of the budget in the same batch.
    let second = job.next_batch().await.unwrap().unwrap();
    assert_eq!(
        (second.per_source[0].1.seen, second.per_source[1].1.seen),
        (80, 20)
    );
    assert!(!second.completed);
    let third = job.next_batch().await.unwrap().unwrap();
    assert_eq!(
        (third.per_source[0].1.seen, third.per_source[1].1.seen),
        (0, 0)
    );
    assert!(third.completed);
    assert_eq!(third.totals.rewrapped, 200);
    assert!(job.next_batch().await.unwrap().is_none());

    assert_eq!(a.versions(), [(2, 130)].into());
    assert_eq!(b.versions(), [(2, 70)].into());
    a.assert_all_decrypt(&ring).await;
    b.assert_all_decrypt(&ring).await;
    assert_eq!(sink.names(), ["kms.rewrap.started", "kms.rewrap.completed"]);
}

#[tokio::test(start_paused = true)]
async fn a_source_that_runs_dry_gives_its_share_to_the_other() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let (a, b) = (Table::new("a"), Table::new("b"));
    a.fill(&ring, 10).await;
    b.fill(&ring, 200).await;
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a, &b]))
        .create()
        .unwrap();
    let r = job.next_batch().await.unwrap().unwrap();
    assert_eq!((r.per_source[0].1.seen, r.per_source[1].1.seen), (10, 90));
}

#[tokio::test(start_paused = true)]
async fn the_target_stays_pinned_across_a_rotation_mid_job() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 300).await;
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    job.next_batch().await.unwrap();
    ring.rotate(&admin()).await.unwrap(); // v3 active now
    while job.next_batch().await.unwrap().is_some() {}
    assert_eq!(
        a.versions(),
        [(2, 300)].into(),
        "no row split across versions"
    );
    // A new job to v3 skips nothing and moves everything.
    let mut next = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    assert_eq!(next.target_version(), 3);
    while next.next_batch().await.unwrap().is_some() {}
    assert_eq!(a.versions(), [(3, 300)].into());
}

#[tokio::test(start_paused = true)]
async fn rows_already_on_the_target_or_newer_are_skipped() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 40).await;
    ring.rotate(&admin()).await.unwrap();
    // 10 more written on v2 by the application.
    for i in 40..50 {
        let id = format!("{i:06}");
        let ct = ring
            .encrypt(&ctx("a", &id), plaintext("a", &id).as_bytes())
            .await
            .unwrap();
        a.rows.lock().unwrap().insert(id, ct);
    }
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    let r = job.next_batch().await.unwrap().unwrap();
    assert_eq!(
        (r.totals.rewrapped, r.totals.skipped, r.totals.seen),
        (40, 10, 50)
    );
}

/// A keyring on version 1 and table "a" of ten rows, two of them bad: row
/// 3's payload damaged (its last byte flipped), row 6 a copy of row 5 (its
/// context no longer matches).
async fn damaged_table() -> (Arc<keyfold_core::keyring::Keyring>, Arc<Table>) {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 10).await;
    {
        let mut rows = a.rows.lock().unwrap();
        let damaged = rows.get_mut("000003").unwrap();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let copied = rows["000005"].clone();
        rows.insert("000006".into(), copied);
    }
    (ring, a)
}

/// Every row of `after` but the two bad ones is on version 2 and decrypts
/// to what was written.
async fn assert_the_others_moved(
    ring: &keyfold_core::keyring::Keyring,
    after: &std::collections::BTreeMap<String, Vec<u8>>,
) {
    for (id, ct) in after {
        if id != "000003" && id != "000006" {
            assert_eq!(format::inspect(ct).unwrap().key_version, 2, "{id}");
            let pt = ring.decrypt(&ctx("a", id), ct).await.unwrap();
            assert_eq!(pt, plaintext("a", id).as_bytes(), "{id}");
        }
    }
}

/// The job writes back only records proven to decrypt under the target: a
/// whole record whose payload was damaged (which a bare header rewrap would
/// move, since it never reads the payload) or that was copied from another
/// row (its context no longer matches) is reported and left as it was.
#[tokio::test(start_paused = true)]
async fn a_whole_record_that_does_not_decrypt_is_reported_and_left_unchanged() {
    let (ring, a) = damaged_table().await;
    let before = a.snapshot();
    // The damage is in the payload: a header rewrap alone would succeed.
    let v1 = ring.master_key(1).await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    let v2 = ring.master_key(2).await.unwrap();
    assert!(record::rewrap(&before["000003"], &v1, &v2, &ctx("a", "000003")).is_ok());
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    let r = job.next_batch().await.unwrap().unwrap();
    assert_eq!(
        (r.totals.rewrapped, r.totals.failed),
        (8, 2),
        "{:?}",
        r.failures
    );
    let failed: Vec<&str> = r.failures.iter().map(|f| f.row_id.as_str()).collect();
    assert_eq!(failed, ["000003", "000006"]);
    let after = a.snapshot();
    for id in ["000003", "000006"] {
        assert_eq!(after[id], before[id], "{id} was written");
    }
    assert_the_others_moved(&ring, &after).await;
}

/// `Verify::Header` proves rows by their new header: a row copied from
/// another row (its context no longer matches) is still refused, every
/// readable row lands on the target and decrypts, and a row whose payload
/// was already damaged is moved as it is: unreadable before, unreadable
/// after, its payload bytes unchanged.
#[tokio::test(start_paused = true)]
async fn header_verification_refuses_a_wrong_context_and_moves_a_damaged_payload_as_it_is() {
    let (ring, a) = damaged_table().await;
    let before = a.snapshot();
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .options(JobOptions {
            verify: Verify::Header,
            ..JobOptions::default()
        })
        .create()
        .unwrap();
    let r = job.next_batch().await.unwrap().unwrap();
    assert_eq!(
        (r.totals.rewrapped, r.totals.failed),
        (9, 1),
        "{:?}",
        r.failures
    );
    assert_eq!(r.failures[0].row_id, "000006");
    let after = a.snapshot();
    assert_eq!(after["000006"], before["000006"]);
    let header_len = format::inspect_header(&before["000003"])
        .unwrap()
        .header_len;
    assert_eq!(
        after["000003"][header_len..],
        before["000003"][header_len..]
    );
    assert_eq!(format::inspect(&after["000003"]).unwrap().key_version, 2);
    assert!(
        ring.decrypt(&ctx("a", "000003"), &after["000003"])
            .await
            .is_err()
    );
    assert_the_others_moved(&ring, &after).await;
}

#[tokio::test(start_paused = true)]
async fn a_concurrent_write_is_never_lost() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 50).await;
    ring.rotate(&admin()).await.unwrap();
    let v1 = ring.master_key(1).await.unwrap();
    let v2 = ring.master_key(2).await.unwrap();
    {
        let mut hooks = a.interfere.lock().unwrap();
        // The app rewrites row #3 with a new value on the *old* version
        // (a stale instance), and row #7 on the new one.
        let k1 = v1.clone();
        hooks.push((
            3,
            Box::new(move |id| {
                record::encrypt(&k1, Suite::default(), &ctx("a", id), b"app update 1").unwrap()
            }),
        ));
        let k2 = v2.clone();
        hooks.push((
            8,
            Box::new(move |id| {
                record::encrypt(&k2, Suite::default(), &ctx("a", id), b"app update 2").unwrap()
            }),
        ));
    }
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    let r = job.next_batch().await.unwrap().unwrap();
    assert_eq!(r.totals.conflicts, 2);
    assert_eq!(
        (r.totals.rewrapped, r.totals.skipped, r.totals.unresolved),
        (49, 1, 0)
    );
    assert_eq!(a.versions(), [(2, 50)].into());
    let updated: Vec<Vec<u8>> = {
        let rows = a.snapshot();
        let mut out = Vec::new();
        for (id, ct) in rows {
            let pt = ring.decrypt(&ctx("a", &id), &ct).await.unwrap();
            if pt.starts_with(b"app update") {
                out.push(pt);
            }
        }
        out
    };
    assert_eq!(
        updated,
        vec![b"app update 1".to_vec(), b"app update 2".to_vec()]
    );
}

#[tokio::test(start_paused = true)]
async fn rerunning_a_batch_from_an_older_checkpoint_is_harmless() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 150).await;
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    let before: Checkpoint =
        serde_json::from_str(&serde_json::to_string(job.checkpoint()).unwrap()).unwrap();
    job.next_batch().await.unwrap();
    let after_first = a.snapshot();
    // Crash before the checkpoint was persisted: resume from `before`.
    let mut again = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .resume(before)
        .unwrap();
    let r = again.next_batch().await.unwrap().unwrap();
    assert_eq!((r.counters.rewrapped, r.counters.skipped), (0, 100));
    assert_eq!(a.snapshot(), after_first, "nothing rewritten twice");
    while again.next_batch().await.unwrap().is_some() {}
    assert_eq!(a.versions(), [(2, 150)].into());
    a.assert_all_decrypt(&ring).await;
}

#[tokio::test(start_paused = true)]
async fn resume_refuses_a_checkpoint_of_other_sources() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let (a, b) = (Table::new("a"), Table::new("b"));
    let job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    let cp = job.checkpoint().clone();
    assert!(matches!(
        RewrapJob::builder(ring.clone(), sources(&[&b])).resume(cp),
        Err(JobError::CheckpointMismatch(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_stops_the_job() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 150).await;
    ring.rotate(&admin()).await.unwrap();
    let clock = ManualClock::new(Timestamp(1_000_000));
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .clock(Arc::new(clock.clone()))
        .create()
        .unwrap();
    job.next_batch().await.unwrap();
    clock.advance(Duration::from_secs(7 * 24 * 3600));
    let snapshot = a.snapshot();
    assert!(matches!(
        job.next_batch().await,
        Err(JobError::LeaseExpired { .. })
    ));
    assert_eq!(a.snapshot(), snapshot);
}

#[tokio::test(start_paused = true)]
async fn shards_cover_every_row_exactly_once() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 300).await;
    ring.rotate(&admin()).await.unwrap();
    let mut seen = 0;
    let mut rewrapped = 0;
    for index in 0..3 {
        let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
            .options(JobOptions {
                shard: Shard::new(index, 3).unwrap(),
                ..JobOptions::default()
            })
            .create()
            .unwrap();
        while job.next_batch().await.unwrap().is_some() {}
        let totals = job.completion().unwrap().totals;
        assert!(totals.seen > 50, "shard {index} saw {}", totals.seen);
        assert_eq!(totals.skipped, 0, "shards overlap");
        seen += totals.seen;
        rewrapped += totals.rewrapped;
        // A shard's report is no evidence for the whole keyspace.
        assert!(job.completion().unwrap().evidence(1).is_none());
    }
    assert_eq!((seen, rewrapped), (300, 300));
    assert_eq!(a.versions(), [(2, 300)].into());
}

#[tokio::test(start_paused = true)]
async fn a_flaky_kms_is_retried_and_a_broken_one_leaves_rows_unchanged() {
    // Flaky: every 5th unwrap fails; no cache, so every row unwraps.
    let wrapper = Arc::new(Switchable::new());
    let ring = keyring(wrapper.clone(), Duration::ZERO).await;
    let a = Table::new("a");
    a.fill(&ring, 60).await;
    ring.rotate(&admin()).await.unwrap();
    a.fail_next_fetches.store(2, Ordering::SeqCst);
    wrapper.fail_every.store(5, Ordering::SeqCst);
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    while job.next_batch().await.unwrap().is_some() {}
    let totals = job.completion().unwrap().totals;
    assert_eq!((totals.rewrapped, totals.failed), (60, 0));
    wrapper.fail_every.store(0, Ordering::SeqCst);

    // The KMS is out of reach for the old version: the keyring seals, the
    // job stops without writing or skipping past anything, and goes on from
    // the same row once the KMS is back.
    let wrapper = Arc::new(Switchable::new());
    let ring = keyring(wrapper.clone(), LONG).await;
    let b = Table::new("b");
    b.fill(&ring, 20).await;
    ring.rotate(&admin()).await.unwrap();
    ring.clear_cache();
    ring.master_key(2).await.unwrap(); // the target is cached, v1 is not
    wrapper.broken.store(true, Ordering::SeqCst);
    let before = b.snapshot();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&b]))
        .create()
        .unwrap();
    let err = job.next_batch().await.unwrap_err();
    assert!(
        matches!(err, JobError::Keyring(keyfold_core::Error::Sealed { .. })),
        "{err}"
    );
    assert_eq!(b.snapshot(), before, "nothing written");
    assert_eq!(
        job.checkpoint().totals().seen,
        0,
        "cursor moved past unprocessed rows"
    );
    assert_eq!(job.checkpoint().sources[0].cursor, None);
    wrapper.broken.store(false, Ordering::SeqCst);
    ring.unseal().await.unwrap();
    while job.next_batch().await.unwrap().is_some() {}
    let done = job.completion().unwrap();
    assert_eq!((done.totals.rewrapped, done.totals.failed), (20, 0));
    assert_eq!(b.versions(), [(2, 20)].into());
}

#[tokio::test(start_paused = true)]
async fn a_row_that_cannot_be_moved_is_reported_and_left_as_it_was() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let b = Table::new("b");
    b.fill(&ring, 10).await;
    // Row 3 is bound to another context than the one the table reports.
    let stray = ring
        .encrypt(&ctx("elsewhere", "x"), b"stray")
        .await
        .unwrap();
    b.rows
        .lock()
        .unwrap()
        .insert("000003".into(), stray.clone());
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&b]))
        .create()
        .unwrap();
    let r = job.next_batch().await.unwrap().unwrap();
    assert_eq!((r.totals.rewrapped, r.totals.failed), (9, 1));
    assert_eq!(r.failures[0].row_id, "000003");
    assert!(
        r.failures[0].error.contains("decryption failed"),
        "{}",
        r.failures[0].error
    );
    assert_eq!(b.snapshot()["000003"], stray, "the failed row was changed");
    let done = job.completion().unwrap();
    assert!(!done.is_clean());
    assert!(done.evidence(1).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_disabled_target_or_a_rollback_stops_the_job() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 250).await;
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    job.next_batch().await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    ring.disable(2, &admin()).await.unwrap();
    let snapshot = a.snapshot();
    assert!(matches!(
        job.next_batch().await,
        Err(JobError::TargetUnusable { target: 2, .. })
    ));
    assert_eq!(a.snapshot(), snapshot);

    ring.enable(2, &admin()).await.unwrap();
    let mut job3 = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    assert_eq!(job3.target_version(), 3);
    ring.rollback(2, &admin()).await.unwrap();
    assert!(matches!(
        job3.next_batch().await,
        Err(JobError::TargetRolledBack {
            target: 3,
            active: Some(2)
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn reencrypt_mode_draws_fresh_data_keys() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 20).await;
    let before = a.snapshot();
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .options(JobOptions {
            mode: Mode::Reencrypt,
            ..JobOptions::default()
        })
        .create()
        .unwrap();
    while job.next_batch().await.unwrap().is_some() {}
    for (id, ct) in a.snapshot() {
        let old = &before[&id];
        assert_ne!(old[4..36], ct[4..36], "commitment unchanged: same data key");
        assert_eq!(format::inspect(&ct).unwrap().key_version, 2);
    }
    a.assert_all_decrypt(&ring).await;
}

#[tokio::test(start_paused = true)]
async fn the_completion_report_lets_the_keyring_destroy_the_old_version() {
    let (ring, clock) = keyring_on_manual_clock(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 30).await;
    ring.rotate(&admin()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .clock(clock.clone())
        .create()
        .unwrap();
    let items: Vec<_> = job.into_stream().map(Result::unwrap).collect().await;
    // One batch, then the completion report: the stream keeps the evidence.
    let [JobProgress::Batch(report), JobProgress::Completed(done)] = &items[..] else {
        panic!("{items:?}");
    };
    assert!(report.completed);
    assert_eq!(done.totals, report.totals);
    assert!(done.evidence(1).is_some());

    // Evidence counts only when gathered after the disable: disable, then
    // check again with a new job (every row is on version 2 already) and
    // take the evidence from the end of its stream.
    ring.disable(1, &admin()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .clock(clock.clone())
        .create()
        .unwrap();
    let Some(Ok(JobProgress::Completed(done))) = job.into_stream().collect::<Vec<_>>().await.pop()
    else {
        panic!("the stream ends with the completion report");
    };
    let evidence = done.evidence(1).unwrap();
    ring.destroy(1, DestroyAuthorization::Evidence(evidence), &admin())
        .await
        .unwrap();
    a.assert_all_decrypt(&ring).await;
}

#[tokio::test(start_paused = true)]
async fn run_paced_runs_until_done_or_cancelled() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let a = Table::new("a");
    a.fill(&ring, 350).await;
    ring.rotate(&admin()).await.unwrap();

    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .create()
        .unwrap();
    let mut batches = 0;
    let started = tokio::time::Instant::now();
    let done = job
        .run_paced(Duration::from_secs(5), std::future::pending(), |_, _| {
            batches += 1
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((batches, done.totals.rewrapped), (4, 350));
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(15),
        "three pauses of 5 s"
    );

    // Cancelled after the first batch: stops between batches.
    let b = Table::new("b");
    b.fill(&ring, 350).await;
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&b]))
        .create()
        .unwrap();
    let cancel = tokio::time::sleep(Duration::from_secs(1));
    let out = job
        .run_paced(Duration::from_secs(5), cancel, |_, _| {})
        .await
        .unwrap();
    assert!(out.is_none());
    assert_eq!(job.checkpoint().batches, 1);
    assert_eq!(job.checkpoint().totals().rewrapped, 100);
}

#[tokio::test(start_paused = true)]
async fn lazy_reads_hand_back_an_upgraded_record() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let c = ctx("a", "1");
    let old = ring.encrypt(&c, b"value").await.unwrap();
    let fresh = decrypt_and_upgrade(&ring, &c, &old).await.unwrap();
    assert_eq!(
        (fresh.plaintext.as_slice(), fresh.upgraded.is_none()),
        (&b"value"[..], true)
    );
    ring.rotate(&admin()).await.unwrap();
    let read = decrypt_and_upgrade(&ring, &c, &old).await.unwrap();
    assert_eq!(read.plaintext, b"value");
    let upgraded = read.upgraded.clone().unwrap();
    assert_eq!(format::inspect(&upgraded).unwrap().key_version, 2);
    assert_eq!(
        old[keyfold_core::format::HEADER_LEN..],
        upgraded[keyfold_core::format::HEADER_LEN..],
        "header-only"
    );
    assert_eq!(ring.decrypt(&c, &upgraded).await.unwrap(), b"value");
    assert!(read.upgrade_error.is_none());
    let shown = format!("{read:?}");
    assert!(
        shown.contains("<5 bytes>") && !shown.contains("value"),
        "{shown}"
    );
}

/// A job over no sources would complete at once and its evidence would
/// authorize destroying a version records still use: refused.
#[tokio::test(start_paused = true)]
async fn a_job_without_sources_is_refused() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let err = RewrapJob::builder(ring, Vec::new()).create().unwrap_err();
    assert!(matches!(err, JobError::NoSources), "{err:?}");
}

/// Two instances over one store: B rotates, and once A's view is older
/// than the max staleness, A's lazy reads upgrade onto B's new version,
/// never onto the one B retired.
#[tokio::test(start_paused = true)]
async fn a_stale_instance_upgrades_onto_the_current_active_version() {
    let store = Arc::new(keyfold_core::MemoryStore::new());
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let wrapper = Arc::new(Switchable::new());
    let builder = || {
        keyfold_core::Keyring::builder("tenant", wrapper.clone(), store.clone())
            .clock(clock.clone())
            .max_staleness(Duration::from_secs(60))
    };
    let b = builder().create().await.unwrap();
    b.rotate(&admin()).await.unwrap();
    let c = ctx("a", "1");
    let v1 = b.encrypt(&c, b"value").await.unwrap();
    b.rotate(&admin()).await.unwrap();
    let a = builder().open().await.unwrap();
    assert_eq!(a.active_version(), Some(2));

    b.rotate(&admin()).await.unwrap();
    clock.advance(Duration::from_secs(61));
    let read = decrypt_and_upgrade(&a, &c, &v1).await.unwrap();
    let upgraded = read.upgraded.expect("upgraded");
    assert_eq!(format::inspect(&upgraded).unwrap().key_version, 3);
    assert_eq!(a.active_version(), Some(3), "the read refreshed the view");
    // A direct rewrap to the version B retired is refused on a fresh view.
    clock.advance(Duration::from_secs(61));
    b.rotate(&admin()).await.unwrap();
    clock.advance(Duration::from_secs(61));
    let err = a.rewrap(&c, &v1, 3).await.unwrap_err();
    assert!(
        matches!(err, keyfold_core::Error::KeyState { version: 3, .. }),
        "{err:?}"
    );
}

#[derive(Debug)]
struct Leases;

#[async_trait::async_trait]
impl keyfold_core::keyring::LeaseIssuer for Leases {
    async fn issue(
        &self,
        keyring_id: &str,
        version: u32,
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        Ok(format!("lease-{keyring_id}-v{version}"))
    }
}

#[tokio::test(start_paused = true)]
async fn the_lease_id_from_rotate_names_the_job() {
    let store = Arc::new(keyfold_core::store::MemoryStore::new());
    let ring = keyfold_core::keyring::Keyring::builder("t", Arc::new(Switchable::new()), store)
        .lease_issuer(Arc::new(Leases))
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    let ring = Arc::new(ring);
    let a = Table::new("a");
    a.fill(&ring, 5).await;
    let rotation = ring.rotate(&admin()).await.unwrap();
    let lease = rotation.lease_id.unwrap();
    assert_eq!(lease, "lease-t-v2");
    let mut job = RewrapJob::builder(ring.clone(), sources(&[&a]))
        .job_id(lease.clone())
        .create()
        .unwrap();
    while job.next_batch().await.unwrap().is_some() {}
    let done = job.completion().unwrap();
    assert_eq!(done.job_id, lease);
    assert_eq!(
        done.evidence(1).unwrap().source,
        format!("rewrap job {lease}")
    );
}
