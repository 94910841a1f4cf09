//! End to end at the record level, below the keyring (tests/keyring.rs
//! goes through it): a tenant's
//! master key versions wrapped by Cloud KMS (the fake), stored as JSON,
//! unwrapped by a fresh process-like wrapper, records encrypted and decrypted
//! under them, and a Cloud KMS key rotation followed by a re-wrap of the
//! master key versions only.
#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use keyfold_core::{
    EncryptionContext, KeyWrapper, MasterKey, SecretKey, Suite, WrapContext, WrapErrorKind,
    WrappedKey, record,
};
use support::{VersionState, kms_with_key, wrapper};

#[tokio::test]
async fn master_keys_under_cloud_kms_protect_records_across_a_kms_rotation() {
    let (kms, key_ref) = kms_with_key().await;
    let tenant = "tenant-a";

    // Onboarding: two master key versions, each wrapped under the KMS key
    // bound to (tenant, version), stored as JSON by the host.
    let stored: Vec<String> = {
        let w = wrapper(&kms, &key_ref);
        let mut out = Vec::new();
        for version in 1..=2 {
            let master = SecretKey::generate().unwrap();
            let wrapped = w
                .wrap(&master, &WrapContext::new(tenant, version))
                .await
                .unwrap();
            out.push(serde_json::to_string(&wrapped).unwrap());
        }
        out
    };

    // Another instance unwraps them and encrypts records with each version.
    let w = wrapper(&kms, &key_ref);
    let mut masters = Vec::new();
    for (i, json) in stored.iter().enumerate() {
        let version = u32::try_from(i + 1).unwrap();
        let wrapped: WrappedKey = serde_json::from_str(json).unwrap();
        let secret = w
            .unwrap(&wrapped, &WrapContext::new(tenant, version))
            .await
            .unwrap();
        masters.push(MasterKey::new(version, secret));
    }
    let row = EncryptionContext::new()
        .with("tenant", tenant)
        .with("row", "42");
    let records: Vec<Vec<u8>> = masters
        .iter()
        .map(|m| record::encrypt(m, Suite::Aes256Gcm, &row, b"card 4111").unwrap())
        .collect();

    // A wrapped master key version cannot be replayed as another version or tenant.
    let v1: WrappedKey = serde_json::from_str(&stored[0]).unwrap();
    for wrong in [WrapContext::new(tenant, 2), WrapContext::new("tenant-b", 1)] {
        let err = w.unwrap(&v1, &wrong).await.unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext, "{err}");
    }

    // The KMS key rotates; the master key versions are re-wrapped under the
    // new primary; records are untouched and still decrypt.
    let new_primary = kms.rotate(&key_ref);
    let mut rewrapped = Vec::new();
    for m in &masters {
        let ctx = WrapContext::new(tenant, m.version());
        let wrapped = w.wrap(m.secret(), &ctx).await.unwrap();
        assert_eq!(
            wrapped.kms_key_version.as_deref(),
            Some(new_primary.as_str())
        );
        rewrapped.push(wrapped);
    }
    // The old KMS version can now be disabled without losing anything.
    kms.set_version_state(&key_ref, 1, VersionState::Disabled);
    let err = w
        .unwrap(&v1, &WrapContext::new(tenant, 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyDisabled, "{err}");
    for (wrapped, rec) in rewrapped.iter().zip(&records) {
        let version =
            u32::try_from(rewrapped.iter().position(|x| x == wrapped).unwrap() + 1).unwrap();
        let secret = w
            .unwrap(wrapped, &WrapContext::new(tenant, version))
            .await
            .unwrap();
        let master = MasterKey::new(version, secret);
        assert_eq!(record::decrypt(&master, &row, rec).unwrap(), b"card 4111");
    }
}
