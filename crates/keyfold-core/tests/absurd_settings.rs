//! Host settings that feed `Instant + Duration` arithmetic: an absurd value
//! (`Duration::MAX`) is answered without a panic.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::keyring::maintenance::{Maintenance, Task};
use keyfold_core::store::MemoryStore;
use keyfold_core::{EncryptionContext, LocalKek, SecretKey};

#[tokio::test]
async fn maintenance_with_an_unrepresentable_interval_runs_once_and_returns() {
    let mut builder = Maintenance::builder();
    for task in Task::ALL {
        builder = builder.interval(task, Duration::MAX);
    }
    let maintenance = builder.build();
    let wrapper = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let ring = Keyring::builder("acme", wrapper, Arc::new(MemoryStore::new()))
        .create()
        .await
        .unwrap();
    maintenance.add(Arc::new(ring));
    // Each task runs once, then has no next time: `run` returns instead of
    // panicking on `Instant + Duration::MAX`.
    maintenance.run().await;
}

#[tokio::test]
async fn a_keyring_with_absurd_durations_still_works() {
    let wrapper = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let ring = Keyring::builder("acme", wrapper, Arc::new(MemoryStore::new()))
        .cache_ttl(Duration::MAX)
        .max_staleness(Duration::MAX)
        .write_window(Duration::MAX)
        .destroy_grace(Duration::MAX)
        .create()
        .await
        .unwrap();
    ring.rotate(&Actor::new("admin")).await.unwrap();
    let ctx = EncryptionContext::new().with("row", "1");
    let record = ring.encrypt(&ctx, b"payload").await.unwrap();
    assert_eq!(ring.decrypt(&ctx, &record).await.unwrap(), b"payload");
}
