//! A keyring on Cloud KMS, run against the in-process fake Cloud KMS that the
//! tests use (`tests/support/fake_kms.rs`), so it needs no Google account:
//!
//! ```text
//! cargo run -p keyfold-gcp --example fake_kms_keyring
//! ```
//!
//! Against the real service, drop the fake and the anonymous credentials and
//! the endpoint and the loopback switch.
#![allow(clippy::unwrap_used, reason = "example")]

#[path = "../tests/support/fake_kms.rs"]
mod fake_kms;

use std::sync::Arc;

use keyfold_core::audit::Actor;
use keyfold_core::config::ProviderConfig;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::MemoryStore;
use keyfold_core::{EncryptionContext, KeyWrapper};
use keyfold_gcp::GcpWrapperFactory;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kms = fake_kms::FakeKms::start().await;
    let key = kms.create_key("acme", "europe-west1", "tenants", "tenant-a");
    let config: ProviderConfig = serde_json::from_str(&format!(
        r#"{{"provider":"gcp","kms_key_ref":"{key}",
            "impersonate_service_account":"keyfold@acme.iam.gserviceaccount.com"}}"#
    ))?;
    // The endpoint and the loopback switch are the operator's settings.
    let wrapper = GcpWrapperFactory::new()
        .endpoint_url(kms.endpoint())
        .allow_loopback_endpoints_for_tests(true)
        .anonymous_credentials_for_local_server()
        .build_wrapper(&config)?;
    println!("wrapper: {wrapper:?}");

    let ring = Keyring::builder("tenant-a", Arc::new(wrapper), Arc::new(MemoryStore::new()))
        .create()
        .await?;
    let admin = Actor::new("admin@acme.example");
    ring.rotate(&admin).await?;
    let ctx = EncryptionContext::new().with("row", "42");
    let record = ring.encrypt(&ctx, b"card 4111").await?;
    let (_, stored) = ring.snapshot();
    for v in &stored.versions {
        let wrapped = v.wrapped.as_ref().unwrap();
        println!(
            "master key v{} wrapped by {} under {:?}",
            v.version,
            ring.wrapper().provider(),
            wrapped.kms_key_version
        );
    }
    assert_eq!(ring.decrypt(&ctx, &record).await?, b"card 4111");
    println!("record of {} bytes decrypts", record.len());
    Ok(())
}
