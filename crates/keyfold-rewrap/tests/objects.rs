//! The rewrap job on stream objects and header-only rows: objects and
//! records alike, the payload never needed for a rewrap.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyfold_core::format::{self, HeaderKind, STREAM_HEADER_LEN};
use keyfold_core::keyring::{DestroyAuthorization, Keyring};
use keyfold_core::stream::{self, StreamOptions};
use keyfold_core::{Suite, record};
use keyfold_rewrap::{JobOptions, Mode, RewrapJob, Row, RowSource, Verify};
use support::*;

const LONG: Duration = Duration::from_secs(3600);
const TABLE: &str = "objects";

fn object_plaintext(id: &str) -> Vec<u8> {
    (0..5000u32).map(|i| (i as u8) ^ id.as_bytes()[5]).collect()
}

/// Rows: 0 a whole record, 1 a stream header whose payload lives in the
/// "bucket", 2 a whole stream object, 3 a record header whose payload lives
/// in the bucket. Returns the bucket: id -> payload bytes after the header.
async fn fill(ring: &Keyring, table: &Table) -> BTreeMap<String, Vec<u8>> {
    let v = ring.active_version().unwrap();
    let key = ring.master_key(v).await.unwrap();
    let options = StreamOptions::default()
        .suite(Suite::ChaCha20Poly1305)
        .segment_size(1024);
    let mut bucket = BTreeMap::new();
    let mut rows = table.rows.lock().unwrap();
    for i in 0..4 {
        let id = format!("{i:06}");
        let ctx = ctx(TABLE, &id);
        let pt = object_plaintext(&id);
        let whole = match i {
            0 | 3 => record::encrypt(&key, Suite::default(), &ctx, &pt).unwrap(),
            _ => {
                let mut object = Vec::new();
                stream::encrypt(&key, options, &ctx, &pt[..], &mut object).unwrap();
                object
            }
        };
        let header_len = format::inspect_header(&whole).unwrap().header_len;
        let stored = match i {
            1 | 3 => {
                bucket.insert(id.clone(), whole[header_len..].to_vec());
                whole[..header_len].to_vec()
            }
            _ => whole,
        };
        rows.insert(id, stored);
    }
    bucket
}

fn sources(table: &Arc<Table>) -> Vec<Arc<dyn RowSource>> {
    vec![Arc::clone(table) as Arc<dyn RowSource>]
}

#[tokio::test(start_paused = true)]
async fn objects_and_header_only_rows_are_rewrapped_without_their_payload() {
    let (ring, clock) = keyring_on_manual_clock(Arc::new(Switchable::new()), LONG).await;
    let table = Table::new(TABLE);
    let bucket = fill(&ring, &table).await;
    let before = table.snapshot();
    ring.rotate(&admin()).await.unwrap();
    clock.advance(Duration::from_secs(1));

    let mut job = RewrapJob::builder(ring.clone(), sources(&table))
        .clock(clock.clone())
        .create()
        .unwrap();
    let report = job.next_batch().await.unwrap().unwrap();
    assert!(report.completed, "{report:?}");
    assert_eq!(report.totals.rewrapped, 4, "{:?}", report.failures);
    assert_eq!(report.totals.failed, 0);

    assert!(job.completion().unwrap().evidence(1).is_some());

    // Version 1 is destroyed (cryptographic erasure): every object still
    // decrypts under version 2. Evidence counts only when gathered after
    // the disable: a second job checks again (every row is on version 2).
    ring.disable(1, &admin()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let mut check = RewrapJob::builder(ring.clone(), sources(&table))
        .clock(clock.clone())
        .create()
        .unwrap();
    while check.next_batch().await.unwrap().is_some() {}
    let evidence = check.completion().unwrap().evidence(1).unwrap();
    ring.destroy(1, DestroyAuthorization::Evidence(evidence), &admin())
        .await
        .unwrap();
    assert!(matches!(
        ring.master_key(1).await,
        Err(keyfold_core::Error::KeyDestroyed { version: 1 })
    ));

    let v2 = ring.master_key(2).await.unwrap();
    for (id, stored) in table.snapshot() {
        let info = format::inspect_header(&stored).unwrap();
        assert_eq!(info.key_version, 2, "{id}");
        let old = &before[&id];
        // Same length; only the rewrap part of the header changed.
        assert_eq!(stored.len(), old.len(), "{id}");
        assert_eq!(stored[info.header_len..], old[info.header_len..], "{id}");
        let ctx = ctx(TABLE, &id);
        let mut whole = stored.clone();
        if let Some(payload) = bucket.get(&id) {
            assert_eq!(stored.len(), info.header_len, "{id} stays header-only");
            whole.extend_from_slice(payload);
        }
        let pt = match info.kind {
            HeaderKind::Stream => {
                let mut out = Vec::new();
                stream::decrypt(&v2, &ctx, &whole[..], &mut out).unwrap();
                out
            }
            _ => record::decrypt(&v2, &ctx, &whole).unwrap(),
        };
        assert_eq!(pt, object_plaintext(&id), "{id}");
    }

    // A second job finds everything on the target.
    ring.rotate(&admin()).await.unwrap();
    let mut again = RewrapJob::builder(ring.clone(), sources(&table))
        .create()
        .unwrap();
    let report = again.next_batch().await.unwrap().unwrap();
    assert_eq!(report.totals.rewrapped, 4);
}

#[tokio::test(start_paused = true)]
async fn a_header_only_row_that_does_not_verify_is_left_unchanged() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let table = Table::new(TABLE);
    fill(&ring, &table).await;
    // Row 1 (a stream header) gets a flipped commitment bit; row 3 (a
    // record header) is moved to another row's context.
    {
        let mut rows = table.rows.lock().unwrap();
        rows.get_mut("000001").unwrap()[10] ^= 1;
        let other = rows["000003"].clone();
        rows.insert("000002".into(), other);
    }
    let before = table.snapshot();
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&table))
        .create()
        .unwrap();
    let report = job.next_batch().await.unwrap().unwrap();
    assert_eq!(report.totals.rewrapped, 2, "{:?}", report.failures);
    assert_eq!(report.totals.failed, 2);
    let failed: Vec<&str> = report.failures.iter().map(|f| f.row_id.as_str()).collect();
    assert_eq!(failed, ["000001", "000002"]);
    let after = table.snapshot();
    assert_eq!(after["000001"], before["000001"]);
    assert_eq!(after["000002"], before["000002"]);
}

#[tokio::test(start_paused = true)]
async fn reencrypt_mode_streams_whole_objects_and_refuses_header_only_rows() {
    let ring = keyring(Arc::new(Switchable::new()), LONG).await;
    let table = Table::new(TABLE);
    fill(&ring, &table).await;
    let before = table.snapshot();
    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), sources(&table))
        .options(JobOptions {
            mode: Mode::Reencrypt,
            ..JobOptions::default()
        })
        .create()
        .unwrap();
    let report = job.next_batch().await.unwrap().unwrap();
    assert_eq!(report.totals.rewrapped, 2);
    assert_eq!(report.totals.failed, 2);
    for f in &report.failures {
        assert!(f.error.contains("only a header"), "{f:?}");
    }
    let after = table.snapshot();
    // Header-only rows unchanged; the whole stream re-encrypted: a new
    // data key, so a new commitment, and it decrypts under version 2.
    assert_eq!(after["000001"], before["000001"]);
    assert_eq!(after["000003"], before["000003"]);
    let object = &after["000002"];
    assert_ne!(object[4..36], before["000002"][4..36]);
    let header = stream::StreamHeader::parse(object).unwrap();
    assert_eq!(header.key_version(), 2);
    let v2 = ring.master_key(2).await.unwrap();
    let mut out = Vec::new();
    stream::decrypt(&v2, &ctx(TABLE, "000002"), &object[..], &mut out).unwrap();
    assert_eq!(out, object_plaintext("000002"));
    assert_eq!(object.len(), before["000002"].len());
    assert!(object.len() > STREAM_HEADER_LEN);
}

#[test]
fn header_only_rows_are_recognised() {
    let row = |ciphertext: Vec<u8>| Row {
        id: "1".into(),
        cursor: "1".into(),
        context: ctx(TABLE, "1"),
        ciphertext,
    };
    assert!(!row(vec![]).is_header_only());
    assert!(!row(vec![0; STREAM_HEADER_LEN]).is_header_only());
}

/// With `Verify::Header` a whole stream is moved by its header alone, like
/// a header-only row: a stream whose last segment was damaged (unreadable
/// before the job) is moved as it is, its segments untouched, while under
/// the default it is reported and left unchanged. Every other row lands on
/// the target and decrypts.
#[tokio::test(start_paused = true)]
async fn header_verification_moves_whole_streams_by_their_header() {
    for verify in [Verify::Header, Verify::Decrypt] {
        let ring = keyring(Arc::new(Switchable::new()), LONG).await;
        let table = Table::new(TABLE);
        let bucket = fill(&ring, &table).await;
        {
            let mut rows = table.rows.lock().unwrap();
            let object = rows.get_mut("000002").unwrap();
            let last = object.len() - 1;
            object[last] ^= 1;
        }
        let before = table.snapshot();
        ring.rotate(&admin()).await.unwrap();
        let mut job = RewrapJob::builder(ring.clone(), sources(&table))
            .options(JobOptions {
                verify,
                ..JobOptions::default()
            })
            .create()
            .unwrap();
        let report = job.next_batch().await.unwrap().unwrap();
        let after = table.snapshot();
        let damaged_header_len = format::inspect_header(&before["000002"])
            .unwrap()
            .header_len;
        if verify == Verify::Header {
            assert_eq!(report.totals.rewrapped, 4, "{:?}", report.failures);
            assert_eq!(
                after["000002"][damaged_header_len..],
                before["000002"][damaged_header_len..]
            );
            let header = stream::StreamHeader::parse(&after["000002"]).unwrap();
            assert_eq!(header.key_version(), 2);
        } else {
            assert_eq!(
                (report.totals.rewrapped, report.totals.failed),
                (3, 1),
                "{:?}",
                report.failures
            );
            assert_eq!(report.failures[0].row_id, "000002");
            assert_eq!(after["000002"], before["000002"]);
        }
        let v2 = ring.master_key(2).await.unwrap();
        for id in ["000000", "000001", "000003"] {
            let ctx = ctx(TABLE, id);
            let mut whole = after[id].clone();
            if let Some(payload) = bucket.get(id) {
                whole.extend_from_slice(payload);
            }
            let pt = match format::inspect_header(&whole).unwrap().kind {
                HeaderKind::Stream => {
                    let mut out = Vec::new();
                    stream::decrypt(&v2, &ctx, &whole[..], &mut out).unwrap();
                    out
                }
                _ => record::decrypt(&v2, &ctx, &whole).unwrap(),
            };
            assert_eq!(pt, object_plaintext(id), "{verify:?} {id}");
        }
    }
}
