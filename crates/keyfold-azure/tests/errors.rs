//! Error mapping and retries against injected faults: 401, 403, 404, 429
//! with `Retry-After` (on an injected clock), 5xx and refused connections.
//! Every error names the key and the operation and carries no key material.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use keyfold_core::retry::RetryPolicy;
use keyfold_core::{KeyWrapper, SecretKey, WrapContext, WrapErrorKind, WrapOperation};
use support::{FakeVault, Fault, RecordingSleeper, TestCredential};

fn ctx() -> WrapContext {
    WrapContext::new("acme", 1)
}

/// A wrapper with retries off (the default, said explicitly).
fn no_retry(vault: &FakeVault, name: &str) -> keyfold_azure::AzureKeyWrapper {
    support::builder(vault, &vault.config(name))
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap()
}

/// A wrapper retrying with [`RetryPolicy::default`], waiting on `sleeper`.
fn retrying(
    vault: &FakeVault,
    name: &str,
    sleeper: &Arc<RecordingSleeper>,
) -> keyfold_azure::AzureKeyWrapper {
    support::builder(vault, &vault.config(name))
        .retry_policy(RetryPolicy::default())
        .sleeper(sleeper.clone())
        .build()
        .unwrap()
}

/// Everything an error shows: its message, sources and `Debug`.
fn everything(err: &keyfold_core::WrapError) -> String {
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    text
}

fn assert_no_key_material(text: &str, key: &SecretKey) {
    let k = key.expose();
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k);
    let b64 = base64::engine::general_purpose::STANDARD.encode(k);
    let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
    for form in [&b64url[..20], &b64[..20], &hex[..20]] {
        assert!(!text.contains(form), "key material in error: {text}");
    }
    assert!(!text.contains(&format!("{:?}", &k[..8])), "{text}");
}

#[tokio::test]
async fn statuses_map_onto_error_kinds_naming_key_and_operation() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let w = no_retry(&vault, "k");
    let key = SecretKey::generate().unwrap();
    let good = w.wrap(&key, &ctx()).await.unwrap();

    for (faults, want) in [
        (
            vec![Fault::Status(401), Fault::Status(401)],
            WrapErrorKind::AccessDenied,
        ),
        (vec![Fault::Status(403)], WrapErrorKind::AccessDenied),
        (vec![Fault::Status(404)], WrapErrorKind::NotFound),
        (
            vec![Fault::Throttle {
                retry_after_secs: 7,
            }],
            WrapErrorKind::Throttled,
        ),
        (vec![Fault::Status(500)], WrapErrorKind::Unavailable),
        (vec![Fault::Status(503)], WrapErrorKind::Unavailable),
    ] {
        for op in [WrapOperation::Wrap, WrapOperation::Unwrap] {
            vault.inject(faults.clone());
            let err = match op {
                WrapOperation::Wrap => w.wrap(&key, &ctx()).await.unwrap_err(),
                _ => w.unwrap(&good, &ctx()).await.unwrap_err(),
            };
            assert_eq!(err.kind, want, "{faults:?} {op}: {err}");
            assert_eq!(err.operation, op);
            assert_eq!(err.provider, "azure");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "azure {op} with key https://kftest.vault.azure.net/keys/k failed"
                )),
                "{text}"
            );
            assert!(text.contains("HTTP"), "{text}");
            assert_no_key_material(&everything(&err), &key);
            if want == WrapErrorKind::Throttled {
                assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
                assert!(err.is_transient());
            }
        }
    }
}

#[tokio::test]
async fn one_401_is_a_token_refresh_not_an_error() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let credential = Arc::new(TestCredential::default());
    let w = support::builder(&vault, &vault.config("k"))
        .credential(credential.clone())
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    vault.inject([Fault::Status(401)]);
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    assert_eq!(
        credential.scopes.lock().unwrap().len(),
        2,
        "token fetched again"
    );
}

#[tokio::test]
async fn missing_key_and_version_are_not_found() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let w = no_retry(&vault, "k");
    let wrapped = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    let mut unknown_version = wrapped.clone();
    unknown_version.kms_key_version = Some(format!(
        "https://kftest.vault.azure.net/keys/k/{}",
        "0".repeat(32)
    ));
    let err = w.unwrap(&unknown_version, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("KeyNotFound"), "{err}");

    vault.delete("k");
    let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::NotFound);
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::NotFound);
}

#[tokio::test]
async fn throttling_waits_the_stated_retry_after_on_the_injected_clock() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let sleeper = Arc::new(RecordingSleeper::default());
    let w = retrying(&vault, "k", &sleeper);
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();

    vault.inject([
        Fault::Throttle {
            retry_after_secs: 7,
        },
        Fault::Throttle {
            retry_after_secs: 3,
        },
    ]);
    let back = w.unwrap(&wrapped, &ctx()).await.unwrap();
    assert_eq!(back.expose(), key.expose());
    // The stated delays exactly (they exceed the jittered backoff caps), asked
    // of the injected clock: the retry loop waits on nothing else, so the
    // test neither sleeps nor measures time.
    assert_eq!(
        *sleeper.waits.lock().unwrap(),
        [Duration::from_secs(7), Duration::from_secs(3)]
    );
    let statuses: Vec<u16> = vault
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/unwrapkey"))
        .map(|s| s.status)
        .collect();
    assert_eq!(statuses, [429, 429, 200]);
}

/// The keyring retries around every KMS call, so by default the wrapper does
/// not: one call, one request, however transient the failure.
#[tokio::test]
async fn by_default_the_wrapper_does_not_retry() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let sleeper = Arc::new(RecordingSleeper::default());
    let w = support::builder(&vault, &vault.config("k"))
        .sleeper(sleeper.clone())
        .build()
        .unwrap();
    assert!(format!("{w:?}").contains("max_attempts: 1"), "{w:?}");
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();

    vault.inject([
        Fault::Status(503),
        Fault::Throttle {
            retry_after_secs: 1,
        },
    ]);
    let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable);
    assert!(err.is_transient());
    let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Throttled);
    assert_eq!(err.retry_after, Some(Duration::from_secs(1)));
    assert!(sleeper.waits.lock().unwrap().is_empty());
    let statuses: Vec<u16> = vault
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/unwrapkey"))
        .map(|s| s.status)
        .collect();
    assert_eq!(statuses, [503, 429]);
}

#[tokio::test]
async fn a_retry_after_beyond_the_policy_is_not_waited_for() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let sleeper = Arc::new(RecordingSleeper::default());
    let w = retrying(&vault, "k", &sleeper);
    vault.inject([Fault::Throttle {
        retry_after_secs: 3600,
    }]);
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Throttled);
    assert_eq!(err.retry_after, Some(Duration::from_secs(3600)));
    assert!(sleeper.waits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn server_errors_are_retried_with_capped_backoff_then_given_up() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let sleeper = Arc::new(RecordingSleeper::default());
    let w = retrying(&vault, "k", &sleeper);
    let policy = RetryPolicy::default();

    vault.inject([Fault::Status(503), Fault::Status(500)]);
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    {
        let waits = sleeper.waits.lock().unwrap();
        assert_eq!(waits.len(), 2);
        assert!(waits[0] <= policy.base_delay && waits[1] <= policy.base_delay * 2);
    }

    vault.inject(vec![Fault::Status(503); 10]);
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable);
    assert_eq!(
        sleeper.waits.lock().unwrap().len(),
        2 + (policy.max_attempts as usize - 1)
    );

    assert_eq!(vault.clear_faults(), 10 - policy.max_attempts as usize);

    // Permanent errors are never retried.
    sleeper.waits.lock().unwrap().clear();
    vault.inject([Fault::Status(403), Fault::Status(503)]);
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::AccessDenied);
    assert!(sleeper.waits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_refused_connection_is_unavailable() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    // A port bound but not listening, kept for the whole test: refused,
    // and no other test's server can be handed it meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let cfg = vault.config("k");
    let w = support::builder(&vault, &cfg)
        .endpoint_url(format!("https://127.0.0.1:{port}"))
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    let key = SecretKey::generate().unwrap();
    let err = w.wrap(&key, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains("could not reach Key Vault"),
        "{err}"
    );
    assert_no_key_material(&everything(&err), &key);
}

#[tokio::test]
async fn tampered_blobs_are_invalid_ciphertext_without_key_material() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let w = no_retry(&vault, "k");
    let key = SecretKey::generate().unwrap();
    let mut wrapped = w.wrap(&key, &ctx()).await.unwrap();
    wrapped.bytes[10] ^= 0x80;
    let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext);
    assert!(err.to_string().contains("BadParameter"), "{err}");
    assert_no_key_material(&everything(&err), &key);

    wrapped.bytes.clear();
    let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext);
}
