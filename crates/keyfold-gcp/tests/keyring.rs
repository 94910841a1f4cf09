//! End to end through keyfold-core's keyring with Cloud KMS (the in-process
//! fake, over real gRPC): onboarding probe, rotation, records, a restart
//! that unwraps from the store, Cloud KMS key rotation with a re-wrap of the
//! master key versions, sealing when Cloud KMS refuses, unsealing, and a
//! move to another CryptoKey.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

mod support;

use std::sync::Arc;

use keyfold_core::audit::{Actor, RecordingSink};
use keyfold_core::config::ProviderConfig;
use keyfold_core::keyring::{KeyState, Keyring};
use keyfold_core::probe::{ConfigSlot, ProbeStep};
use keyfold_core::store::MemoryStore;
use keyfold_core::{EncryptionContext, Error, KeyWrapper, WrapErrorKind};
use keyfold_gcp::GcpWrapperFactory;
use support::{FakeKms, Method, SERVICE_ACCOUNT, VersionState, fast_retries};

/// The operator's factory: the fake as endpoint (the loopback test switch
/// on), anonymous credentials.
fn factory(kms: &FakeKms) -> GcpWrapperFactory {
    GcpWrapperFactory::new()
        .endpoint_url(kms.endpoint())
        .allow_loopback_endpoints_for_tests(true)
        .anonymous_credentials_for_local_server()
}

/// A tenant's config for `key`.
fn config(key: &str) -> ProviderConfig {
    serde_json::from_str(&format!(
        r#"{{"provider":"gcp","kms_key_ref":"{key}","impersonate_service_account":"{SERVICE_ACCOUNT}"}}"#,
    ))
    .unwrap()
}

fn open_builder(
    id: &str,
    wrapper: Arc<dyn KeyWrapper>,
    store: Arc<MemoryStore>,
) -> keyfold_core::keyring::KeyringBuilder {
    Keyring::builder(id, wrapper, store).retry_policy(fast_retries(2))
}

#[tokio::test]
async fn keyring_lifecycle_on_cloud_kms() {
    let kms = FakeKms::start().await;
    let key_a = kms.create_key("acme", "europe-west1", "tenants", "tenant-a");
    let key_b = kms.create_key("acme", "europe-west1", "tenants", "tenant-a-moved");
    let tenant = "tenant-a";
    let admin = Actor::new("admin@acme.example");
    let audit = RecordingSink::default();

    // Onboarding: a config for a key that does not exist fails the live
    // probe and changes nothing; the right one passes.
    let slot = ConfigSlot::new();
    let missing = "projects/acme/locations/europe-west1/keyRings/tenants/cryptoKeys/nope";
    let failure = slot
        .upsert(config(missing), &factory(&kms), tenant, &audit, &admin)
        .await
        .unwrap_err();
    assert_eq!(failure.step, ProbeStep::Wrap);
    assert_eq!(failure.kind, Some(WrapErrorKind::NotFound));
    assert!(slot.current().is_none());
    let probed = slot
        .upsert(config(&key_a), &factory(&kms), tenant, &audit, &admin)
        .await
        .unwrap();
    assert_eq!(probed.wrapper.key_ref(), key_a);
    assert_eq!(audit.names(), ["kms.probe.failed", "kms.config.updated"]);

    // Keyring with two versions, records under each.
    let store = Arc::new(MemoryStore::new());
    let ring = open_builder(tenant, Arc::clone(&probed.wrapper), Arc::clone(&store))
        .create()
        .await
        .unwrap();
    ring.rotate(&admin).await.unwrap();
    let row = EncryptionContext::new()
        .with("tenant", tenant)
        .with("row", "1");
    let r1 = ring.encrypt(&row, b"first").await.unwrap();
    assert_eq!(ring.rotate(&admin).await.unwrap().version, 2);
    let r2 = ring.encrypt(&row, b"second").await.unwrap();
    assert_eq!(ring.version_state(1), Some(KeyState::Retired));
    let (_, stored) = ring.snapshot();
    for v in &stored.versions {
        let wrapped = v.wrapped.as_ref().unwrap();
        assert_eq!(wrapped.provider, "gcp");
        assert_eq!(
            wrapped.kms_key_version.as_deref(),
            Some(format!("{key_a}/cryptoKeyVersions/1").as_str())
        );
    }

    // A restart: a fresh wrapper and keyring read the store and unwrap
    // through Cloud KMS.
    let decrypts_before = kms.calls(Method::Decrypt);
    let wrapper = factory(&kms).build_wrapper(&config(&key_a)).unwrap();
    let ring = open_builder(tenant, Arc::new(wrapper), Arc::clone(&store))
        .open()
        .await
        .unwrap();
    assert_eq!(ring.decrypt(&row, &r1).await.unwrap(), b"first");
    assert_eq!(ring.decrypt(&row, &r2).await.unwrap(), b"second");
    assert_eq!(
        kms.calls(Method::Decrypt) - decrypts_before,
        2,
        "one unwrap per version"
    );
    // Cached: no further KMS call.
    ring.decrypt(&row, &r1).await.unwrap();
    assert_eq!(kms.calls(Method::Decrypt) - decrypts_before, 2);

    // Cloud KMS rotates the CryptoKey; the master key versions are re-wrapped
    // under the new primary, after which the old KMS version can be disabled.
    let kms_v2 = kms.rotate(&key_a);
    let same_key = factory(&kms).build_wrapper(&config(&key_a)).unwrap();
    assert_eq!(
        ring.rewrap_master_keys(Arc::new(same_key), &admin)
            .await
            .unwrap(),
        [1, 2]
    );
    let (_, stored) = ring.snapshot();
    for v in &stored.versions {
        assert_eq!(
            v.wrapped.as_ref().unwrap().kms_key_version.as_deref(),
            Some(kms_v2.as_str())
        );
    }
    kms.set_version_state(&key_a, 1, VersionState::Disabled);
    ring.clear_cache();
    assert_eq!(ring.decrypt(&row, &r1).await.unwrap(), b"first");

    // Cloud KMS refuses access: with nothing cached the keyring seals, with
    // a typed error; once access is back, unseal.
    kms.deny(&key_a, true);
    ring.clear_cache();
    match ring.decrypt(&row, &r2).await {
        Err(Error::Sealed { kind, .. }) => assert_eq!(kind, WrapErrorKind::AccessDenied),
        other => panic!("expected a sealed keyring, got {other:?}"),
    }
    assert!(ring.sealed().is_some());
    assert!(ring.unseal().await.is_err());
    kms.deny(&key_a, false);
    ring.unseal().await.unwrap();
    assert!(ring.sealed().is_none());
    assert_eq!(ring.decrypt(&row, &r2).await.unwrap(), b"second");

    // The tenant moves to another CryptoKey: re-wrap, then the old key can
    // go entirely.
    let moved = factory(&kms).build_wrapper(&config(&key_b)).unwrap();
    ring.rewrap_master_keys(Arc::new(moved), &admin)
        .await
        .unwrap();
    assert_eq!(ring.metadata().wrap_key_ref, key_b);
    kms.deny(&key_a, true);
    ring.clear_cache();
    assert_eq!(ring.decrypt(&row, &r1).await.unwrap(), b"first");
    assert_eq!(ring.decrypt(&row, &r2).await.unwrap(), b"second");
    let r3 = ring.encrypt(&row, b"third").await.unwrap();
    assert_eq!(ring.decrypt(&row, &r3).await.unwrap(), b"third");
}
