//! Wrapping against the fake Key Vault: the challenge flow, `kid` recording
//! and versioned unwrap across key rotation, pinned versions, algorithm
//! selection, and refusals of foreign or unrecorded versions.

mod support;

use std::sync::Arc;

use keyfold_azure::{AzureKeyWrapper, WrapAlgorithm};
use keyfold_core::config::AzureConfig;
use keyfold_core::{KeyWrapper, SecretKey, WrapContext, WrapErrorKind};
use serde_json::json;
use support::{FakeVault, Fault, SCOPE, TestCredential};

fn ctx() -> WrapContext {
    WrapContext::new("acme", 1)
}

fn config(value: serde_json::Value) -> AzureConfig {
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn records_the_full_kid_and_unwraps_old_wraps_after_rotation() {
    let vault = FakeVault::start().await;
    let v1 = vault.create_rsa_key("tenant-a");
    let w = support::wrapper(&vault, "tenant-a");

    let k1 = SecretKey::generate().unwrap();
    let wrapped1 = w.wrap(&k1, &ctx()).await.unwrap();
    assert_eq!(wrapped1.provider, "azure");
    assert_eq!(
        wrapped1.key_ref,
        "https://kftest.vault.azure.net/keys/tenant-a"
    );
    assert_eq!(
        wrapped1.kms_key_version.as_deref(),
        Some(format!("https://kftest.vault.azure.net/keys/tenant-a/{v1}").as_str())
    );
    assert_eq!(wrapped1.bytes.len(), 256, "RSA-2048 OAEP ciphertext");

    // Rotate the Key Vault key: new wraps use the new version...
    let v2 = vault.rotate("tenant-a");
    let k2 = SecretKey::generate().unwrap();
    let wrapped2 = w.wrap(&k2, &ctx()).await.unwrap();
    assert!(wrapped2.kms_key_version.as_deref().unwrap().ends_with(&v2));

    // ...and old wraps still unwrap, through the version that wrapped them.
    let back1 = w.unwrap(&wrapped1, &ctx()).await.unwrap();
    assert_eq!(back1.expose(), k1.expose());
    let back2 = w.unwrap(&wrapped2, &ctx()).await.unwrap();
    assert_eq!(back2.expose(), k2.expose());
    let unwrap_paths: Vec<String> = vault
        .seen()
        .into_iter()
        .filter(|s| s.authorized && s.path.ends_with("/unwrapkey"))
        .map(|s| s.path)
        .collect();
    assert_eq!(
        unwrap_paths,
        [
            format!("/keys/tenant-a/{v1}/unwrapkey"),
            format!("/keys/tenant-a/{v2}/unwrapkey"),
        ]
    );

    // Unwrapping a v1 blob with v2 fails: the recorded kid matters.
    let mut wrong_version = wrapped1.clone();
    wrong_version.kms_key_version = wrapped2.kms_key_version.clone();
    let err = w.unwrap(&wrong_version, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext, "{err}");

    // Disabling v1 in Key Vault: its wraps stop unwrapping, v2's do not.
    vault.set_enabled("tenant-a", &v1, false);
    let err = w.unwrap(&wrapped1, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyDisabled, "{err}");
    assert!(err.to_string().contains("unwrap"), "{err}");
    w.unwrap(&wrapped2, &ctx()).await.unwrap();
}

#[tokio::test]
async fn unversioned_key_wraps_with_the_latest_through_an_empty_segment() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let w = support::wrapper(&vault, "k");
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    let wrap = vault
        .seen()
        .into_iter()
        .find(|s| s.authorized && s.path.ends_with("/wrapkey"))
        .unwrap();
    assert_eq!(wrap.path, "/keys/k//wrapkey");
}

#[tokio::test]
async fn a_pinned_version_wraps_with_that_version_even_after_rotation() {
    let vault = FakeVault::start().await;
    let v1 = vault.create_rsa_key("k");
    vault.rotate("k");
    let mut cfg = vault.config("k");
    cfg.kms_key_ref = format!("{}/{v1}", cfg.kms_key_ref);
    let w = support::builder(&vault, &cfg).build().unwrap();
    assert_eq!(
        w.key_ref(),
        format!("https://kftest.vault.azure.net/keys/k/{v1}")
    );
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    assert!(wrapped.kms_key_version.as_deref().unwrap().ends_with(&v1));
    assert!(
        vault
            .seen()
            .iter()
            .any(|s| s.path == format!("/keys/k/{v1}/wrapkey"))
    );

    // A wrapper on the unversioned key unwraps it too (same vault and name).
    let unpinned = support::wrapper(&vault, "k");
    let back = unpinned.unwrap(&wrapped, &ctx()).await.unwrap();
    assert_eq!(back.expose(), key.expose());

    // With no recorded kid, only a pinned wrapper knows the version.
    let mut no_kid = wrapped.clone();
    no_kid.kms_key_version = None;
    assert_eq!(
        w.unwrap(&no_kid, &ctx()).await.unwrap().expose(),
        key.expose()
    );
    let err = unpinned.unwrap(&no_kid, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext);
    assert!(err.to_string().contains("refusing to guess"), "{err}");
}

#[tokio::test]
async fn challenge_flow_withholds_the_body_until_authorized() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let credential = Arc::new(TestCredential::default());
    let w = support::builder(&vault, &vault.config("k"))
        .credential(credential.clone())
        .build()
        .unwrap();
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    let seen = vault.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    // 1: no token, no body, answered 401 with the challenge.
    assert!(!seen[0].authorized && seen[0].body_len == 0 && seen[0].status == 401);
    // 2 and 3: with the token and the body.
    assert!(
        seen[1..]
            .iter()
            .all(|s| s.authorized && s.body_len > 0 && s.status == 200)
    );
    // The scope came from the challenge's resource; the token is cached.
    assert_eq!(*credential.scopes.lock().unwrap(), [SCOPE]);
}

#[tokio::test]
async fn the_challenge_resource_is_verified_under_the_vault_s_real_name() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    // No endpoint_url: the client talks to https://kftest.vault.azure.net,
    // which the test transport resolves to the fake; the challenge names
    // https://vault.azure.net, a parent domain, so the check passes.
    let cfg = config(json!({
        "kms_key_ref": vault.key_url("k"),
        "vault_url": vault.public_url(),
    }));
    let w = AzureKeyWrapper::builder(&cfg)
        .credential(Arc::new(TestCredential::default()))
        .transport(vault.transport())
        .build()
        .unwrap();
    assert_eq!(w.endpoint(), "https://kftest.vault.azure.net");
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    assert_eq!(
        w.unwrap(&wrapped, &ctx()).await.unwrap().expose(),
        key.expose()
    );

    // Reached as localhost with the check on, the challenge is refused and
    // the body is never sent.
    let strict = AzureKeyWrapper::builder(&vault.config("k"))
        .endpoint_url(vault.endpoint())
        .allow_loopback_endpoints_for_tests(true)
        .credential(Arc::new(TestCredential::default()))
        .transport(vault.transport())
        .build()
        .unwrap();
    let before = vault.seen().len();
    let err = strict
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{err}");
    assert!(err.to_string().contains("challenge resource"), "{err}");
    let after = &vault.seen()[before..];
    assert_eq!(after.len(), 1);
    assert!(!after[0].authorized && after[0].body_len == 0);
}

#[tokio::test]
async fn managed_hsm_reads_the_key_type_once() {
    let hsm = FakeVault::start_hsm().await;
    hsm.create_rsa_key("rsa");
    hsm.create_aes_key("aes");
    let rsa = support::wrapper(&hsm, "rsa");
    let aes = support::wrapper(&hsm, "aes");
    for _ in 0..2 {
        let key = SecretKey::generate().unwrap();
        let w = rsa.wrap(&key, &ctx()).await.unwrap();
        assert_eq!(w.bytes.len(), 256);
        assert_eq!(rsa.unwrap(&w, &ctx()).await.unwrap().expose(), key.expose());
        let w = aes.wrap(&key, &ctx()).await.unwrap();
        assert_eq!(w.bytes.len(), 40, "RFC 3394 wrap of 32 bytes");
        assert_eq!(aes.unwrap(&w, &ctx()).await.unwrap().expose(), key.expose());
    }
    assert_eq!(rsa.algorithm().await.unwrap(), WrapAlgorithm::RsaOaep256);
    assert_eq!(aes.algorithm().await.unwrap(), WrapAlgorithm::A256Kw);
    let gets = hsm
        .seen()
        .iter()
        .filter(|s| s.authorized && s.method == "GET")
        .count();
    assert_eq!(gets, 2, "one key-type read per wrapper");

    // A vault key never asks: RSA-OAEP-256 without a GET.
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let w = support::wrapper(&vault, "k");
    assert_eq!(w.algorithm().await.unwrap(), WrapAlgorithm::RsaOaep256);
    assert!(vault.seen().is_empty());

    // Pinning the wrong algorithm is the service's 400: a misconfiguration.
    let pinned = support::builder(&vault, &vault.config("k"))
        .algorithm(WrapAlgorithm::A256Kw)
        .build()
        .unwrap();
    let err = pinned
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{err}");
    assert!(err.to_string().contains("BadParameter"), "{err:?}");
}

#[tokio::test]
async fn foreign_keys_and_kids_are_key_mismatches() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("a");
    vault.create_rsa_key("b");
    let a = support::wrapper(&vault, "a");
    let b = support::wrapper(&vault, "b");
    let wrapped = a
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();

    let err = b.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch);
    assert!(err.to_string().contains("keys/a"), "{err}");

    // Relabelled as b's, but the kid still names a.
    let mut relabelled = wrapped.clone();
    relabelled.key_ref = b.key_ref().to_owned();
    let err = b.unwrap(&relabelled, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch);
    assert!(err.to_string().contains("kid"), "{err}");

    let mut other_provider = wrapped.clone();
    other_provider.provider = "aws".into();
    assert_eq!(
        a.unwrap(&other_provider, &ctx()).await.unwrap_err().kind,
        WrapErrorKind::KeyMismatch
    );

    let mut bad_kid = wrapped;
    bad_kid.kms_key_version = Some("https://kftest.vault.azure.net/keys/a".into());
    assert_eq!(
        a.unwrap(&bad_kid, &ctx()).await.unwrap_err().kind,
        WrapErrorKind::InvalidCiphertext
    );
    // None of these refusals reached the vault.
    assert!(!vault.seen().iter().any(|s| s.path.ends_with("/unwrapkey")));
}

#[tokio::test]
async fn an_endpoint_reaching_another_vault_is_refused() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    // The config names vault "elsewhere", but the operator's loopback
    // endpoint reaches kftest, whose kid says so.
    let cfg = config(json!({
        "kms_key_ref": "https://elsewhere.vault.azure.net/keys/k",
        "vault_url": "https://elsewhere.vault.azure.net",
    }));
    let w = support::builder(&vault, &cfg).build().unwrap();
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured);
    assert!(err.to_string().contains("another vault"), "{err}");
}

#[tokio::test]
async fn an_unwrap_answer_naming_another_key_version_is_refused() {
    let vault = FakeVault::start().await;
    let v1 = vault.create_rsa_key("k");
    let v2 = vault.rotate("k");
    vault.create_rsa_key("other");
    let w = support::wrapper(&vault, "k");
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    assert!(wrapped.kms_key_version.as_deref().unwrap().ends_with(&v2));
    // The vault answers unwrapKey, but for another version, another key, or
    // another vault than the one asked: the plaintext is refused.
    for kid in [
        format!("https://kftest.vault.azure.net/keys/k/{v1}"),
        format!("https://kftest.vault.azure.net/keys/other/{v2}"),
        format!("https://elsewhere.vault.azure.net/keys/k/{v2}"),
    ] {
        vault.inject([Fault::ReportKid(kid.clone())]);
        let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{kid}: {err}");
        assert!(err.to_string().contains(&kid), "{err}");
        assert_eq!(vault.clear_faults(), 0, "the fault was served");
    }
    // The same kid in another case is the same key version.
    vault.inject([Fault::ReportKid(format!(
        "https://KFTEST.vault.azure.net/keys/K/{}",
        v2.to_ascii_uppercase()
    ))]);
    assert_eq!(
        w.unwrap(&wrapped, &ctx()).await.unwrap().expose(),
        key.expose()
    );
}
