//! The cost of observability on the hot path (docs/OBSERVABILITY.md):
//! encrypt + decrypt of a 1 KiB record through the keyring (cached key), with
//! no metrics recorder, then with one installed (metrics-util's
//! `DebuggingRecorder`, a registry like an exporter's), side by side with the
//! raw record functions (the limit).
//!
//! `cargo bench -p keyfold-benches --bench observed`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::MemoryStore;
use keyfold_core::{EncryptionContext, LocalKek, SecretKey, Suite, record};

fn observed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ring = rt.block_on(async {
        let kek = Arc::new(LocalKek::from_bytes(
            "bench",
            SecretKey::generate().unwrap(),
        ));
        let ring = Keyring::builder("tenant", kek, Arc::new(MemoryStore::new()))
            .create()
            .await
            .unwrap();
        ring.rotate(&Actor::new("bench")).await.unwrap();
        ring
    });
    let ctx = EncryptionContext::new().with("row", "1");
    let plaintext = [7u8; 1024];
    let key = rt.block_on(ring.active_key()).unwrap();

    let mut group = c.benchmark_group("observed_1KiB_seal_open");
    group.bench_function("raw_record", |b| {
        b.iter(|| {
            let ct = record::encrypt(&key, Suite::Aes256Gcm, &ctx, black_box(&plaintext)).unwrap();
            record::decrypt(&key, &ctx, black_box(&ct)).unwrap()
        })
    });
    let round_trip = || {
        rt.block_on(async {
            let ct = ring.encrypt(&ctx, black_box(&plaintext)).await.unwrap();
            ring.decrypt(&ctx, black_box(&ct)).await.unwrap()
        })
    };
    group.bench_function("keyring_no_recorder", |b| b.iter(round_trip));
    metrics::set_global_recorder(metrics_util::debugging::DebuggingRecorder::new()).unwrap();
    group.bench_function("keyring_with_recorder", |b| b.iter(round_trip));
    group.finish();
}

criterion_group!(benches, observed);
criterion_main!(benches);
