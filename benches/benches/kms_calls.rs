//! KMS calls made by the keyring, counted with the testkit's counting
//! wrapper: 1,000,000 encrypts and decrypts across 3 master key versions,
//! and 100 concurrent decrypts of a cold version (single-flight: 1 call).
//!
//! `cargo bench -p keyfold-benches --bench kms_calls`

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::MemoryStore;
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::{EncryptionContext, LocalKek, SecretKey};

const OPS: usize = 1_000_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` from criterion's harness convention.
        println!("kms_calls: bench");
        return;
    }
    let admin = Actor::new("bench");
    let wrapper = CountingWrapper::shared(LocalKek::from_bytes(
        "bench",
        SecretKey::generate().unwrap(),
    ));
    let ring = Arc::new(
        Keyring::builder("tenant", wrapper.clone(), Arc::new(MemoryStore::new()))
            .create()
            .await
            .unwrap(),
    );
    let ctx = EncryptionContext::new().with("row", "1");
    let mut records = Vec::new();
    for _ in 0..3 {
        ring.rotate(&admin).await.unwrap();
        records.push(ring.encrypt(&ctx, &[7u8; 1024]).await.unwrap());
    }
    ring.clear_cache();
    let (wraps, unwraps) = (wrapper.wraps(), wrapper.unwraps());
    let started = Instant::now();
    for i in 0..OPS {
        if i % 2 == 0 {
            ring.encrypt(&ctx, &[7u8; 1024]).await.unwrap();
        } else {
            ring.decrypt(&ctx, &records[(i / 2) % 3]).await.unwrap();
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{OPS} operations (half encrypt, half decrypt of 1 KiB records on v1, v2, v3) in {:.2} s: \
         {} KMS unwraps, {} KMS wraps ({:.0} ops/s on one task)",
        elapsed.as_secs_f64(),
        wrapper.unwraps() - unwraps,
        wrapper.wraps() - wraps,
        OPS as f64 / elapsed.as_secs_f64()
    );

    ring.clear_cache();
    wrapper.set_delay(Duration::from_millis(50));
    let before = wrapper.unwraps();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (ring, ctx, record) = (ring.clone(), ctx.clone(), records[0].clone());
            tokio::spawn(async move { ring.decrypt(&ctx, &record).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "100 concurrent decrypts of a cold version: {} KMS unwrap(s)",
        wrapper.unwraps() - before
    );
}
