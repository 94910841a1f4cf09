//! End to end: a tenant's keyring under a (fake) Key Vault key. Onboarding
//! probes the config; records encrypt and decrypt; the keyring rotates; the
//! Key Vault key rotates and old master key versions still unwrap through
//! their recorded `kid`; a KMS re-wrap moves them to the new Key Vault
//! version, after which the old one can be disabled; an unreachable vault
//! seals the keyring and unsealing recovers; records are rewrapped to the
//! newest master key version and the old versions destroyed.

mod support;

use std::sync::Arc;

use keyfold_azure::AzureFactory;
use keyfold_core::audit::{Actor, RecordingSink};
use keyfold_core::config::ProviderConfig;
use keyfold_core::keyring::{DestroyAuthorization, Keyring, NoRecordsLeft};
use keyfold_core::probe::{ConfigSlot, ProbeStep, WrapperFactory};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::MemoryStore;
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{EncryptionContext, Error, KeyWrapper, WrapErrorKind};
use support::{FakeVault, Fault, RecordingSleeper, TestCredential};

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn row(n: u32) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "acme")
        .with("row", n.to_string())
}

fn factory(vault: &FakeVault) -> AzureFactory {
    let transport = vault.transport();
    let endpoint = vault.endpoint();
    AzureFactory::with_builder(move |b| {
        b.credential(Arc::new(TestCredential::default()))
            .endpoint_url(endpoint.clone())
            .allow_loopback_endpoints_for_tests(true)
            .transport(transport.clone())
            .verify_challenge_resource(false)
            .retry_policy(RetryPolicy::none())
            .sleeper(Arc::new(RecordingSleeper::default()))
    })
}

/// The Key Vault version named by each stored master key version's kid.
fn kv_versions(ring: &Keyring) -> Vec<String> {
    ring.snapshot()
        .1
        .versions
        .iter()
        .filter_map(|v| {
            let kid = v.wrapped.as_ref()?.kms_key_version.clone().unwrap();
            Some(kid.rsplit('/').next().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_lifecycle_across_key_vault_rotation() {
    let vault = FakeVault::start().await;
    let kv1 = vault.create_rsa_key("tenant-acme");
    let config = ProviderConfig::Azure(vault.config("tenant-acme"));
    let factory = factory(&vault);
    let sink = RecordingSink::default();

    // Onboarding: a config for a key that does not exist fails the probe and
    // changes nothing; the right one is probed and accepted.
    let slot = ConfigSlot::new();
    let missing = ProviderConfig::Azure(vault.config("no-such-key"));
    let failure = slot
        .upsert(missing, &factory, "acme", &sink, &admin())
        .await
        .unwrap_err();
    assert_eq!(failure.step, ProbeStep::Wrap);
    assert_eq!(failure.kind, Some(WrapErrorKind::NotFound));
    assert!(slot.current().is_none());
    // A denied key is reported as such, at the wrap step.
    vault.inject([Fault::Status(403)]);
    let denied = slot
        .upsert(config.clone(), &factory, "acme", &sink, &admin())
        .await
        .unwrap_err();
    assert_eq!(denied.step, ProbeStep::Wrap);
    assert_eq!(denied.kind, Some(WrapErrorKind::AccessDenied));
    assert!(denied.to_string().contains("access denied"), "{denied}");
    assert!(
        denied.to_string().contains("HTTP 403 Forbidden"),
        "{denied}"
    );
    assert!(slot.current().is_none());
    let probed = slot
        .upsert(config.clone(), &factory, "acme", &sink, &admin())
        .await
        .unwrap();
    assert_eq!(
        sink.names(),
        ["kms.probe.failed", "kms.probe.failed", "kms.config.updated"]
    );

    // A keyring wrapped by the Key Vault key.
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(Timestamp(1_700_000_000));
    let ring = Keyring::builder("acme", probed.wrapper.clone(), store.clone())
        .retry_policy(RetryPolicy::none())
        .clock(Arc::new(clock.clone()))
        .destroy_grace(std::time::Duration::ZERO)
        .write_window(std::time::Duration::ZERO)
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    let r1 = ring.encrypt(&row(1), b"first record").await.unwrap();
    assert_eq!(kv_versions(&ring), [kv1.as_str()]);

    // Keyring rotation: master key version 2, under the same Key Vault version.
    ring.rotate(&admin()).await.unwrap();
    let r2 = ring.encrypt(&row(2), b"second record").await.unwrap();

    // Key Vault rotation: the next master key version is wrapped by kv2...
    let kv2 = vault.rotate("tenant-acme");
    ring.rotate(&admin()).await.unwrap();
    let r3 = ring.encrypt(&row(3), b"third record").await.unwrap();
    assert_eq!(kv_versions(&ring), [kv1.clone(), kv1.clone(), kv2.clone()]);

    // ...and with a cold cache every record decrypts: versions 1 and 2
    // unwrap through kv1, version 3 through kv2.
    ring.clear_cache();
    assert_eq!(ring.decrypt(&row(1), &r1).await.unwrap(), b"first record");
    assert_eq!(ring.decrypt(&row(2), &r2).await.unwrap(), b"second record");
    assert_eq!(ring.decrypt(&row(3), &r3).await.unwrap(), b"third record");
    // A record moved to another row does not decrypt: keyfold's header binds
    // what Key Vault's wrap cannot.
    assert!(ring.decrypt(&row(2), &r1).await.is_err());

    // Re-wrap every master key version under the current Key Vault version,
    // then disable kv1: everything still decrypts from a cold cache.
    let rewrapper = WrapperFactory::build(&factory, &config).await.unwrap();
    let done = ring.rewrap_master_keys(rewrapper, &admin()).await.unwrap();
    assert_eq!(done, [1, 2, 3]);
    assert_eq!(kv_versions(&ring), [kv2.clone(), kv2.clone(), kv2.clone()]);
    vault.set_enabled("tenant-acme", &kv1, false);
    ring.clear_cache();
    for (n, r, want) in [
        (1, &r1, &b"first record"[..]),
        (2, &r2, b"second record"),
        (3, &r3, b"third record"),
    ] {
        assert_eq!(ring.decrypt(&row(n), r).await.unwrap(), want);
    }

    // The vault goes away: cold versions seal the keyring, the cached active
    // one keeps working; unsealing after recovery reopens everything.
    ring.clear_cache();
    let r4 = ring.encrypt(&row(4), b"fourth").await.unwrap(); // v3 cached
    vault.inject(vec![Fault::Status(503); 3]);
    let err = ring.decrypt(&row(1), &r1).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Sealed {
                kind: WrapErrorKind::Unavailable,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(ring.decrypt(&row(4), &r4).await.unwrap(), b"fourth");
    vault.clear_faults();
    ring.unseal().await.unwrap();
    assert_eq!(ring.decrypt(&row(1), &r1).await.unwrap(), b"first record");

    // Records move to the newest master key version (header-only rewrap);
    // versions 1 and 2 are then disabled and destroyed with the evidence.
    let r1 = ring.rewrap(&row(1), &r1, 3).await.unwrap().unwrap();
    let old_r2 = r2.clone();
    let r2 = ring.rewrap(&row(2), &r2, 3).await.unwrap().unwrap();
    assert!(ring.rewrap(&row(3), &r3, 3).await.unwrap().is_none());
    ring.disable(1, &admin()).await.unwrap();
    ring.disable(2, &admin()).await.unwrap();
    clock.advance(std::time::Duration::from_secs(60));
    for version in [1, 2] {
        let evidence = NoRecordsLeft {
            keyring_id: "acme".into(),
            version,
            source: "azure-e2e-scan".into(),
            checked_at: clock.now(),
        };
        ring.destroy(version, DestroyAuthorization::Evidence(evidence), &admin())
            .await
            .unwrap();
    }
    ring.clear_cache();
    assert!(matches!(
        ring.decrypt(&row(2), &old_r2).await,
        Err(Error::KeyDestroyed { version: 2 })
    ));
    assert_eq!(ring.decrypt(&row(1), &r1).await.unwrap(), b"first record");
    assert_eq!(ring.decrypt(&row(2), &r2).await.unwrap(), b"second record");
    assert_eq!(ring.decrypt(&row(3), &r3).await.unwrap(), b"third record");
    assert_eq!(kv_versions(&ring), [kv2.as_str()]);

    // The store holds the kids, never a plaintext key.
    let stored = serde_json::to_string(&*ring.snapshot().1).unwrap();
    assert!(stored.contains(&format!(
        "https://kftest.vault.azure.net/keys/tenant-acme/{kv2}"
    )));
    assert_eq!(probed.wrapper.provider(), "azure");
}
