//! The Cloud KMS wrapper against the in-process fake Cloud KMS, over a real
//! gRPC connection: conformance suite, AAD binding, key versions, error
//! mapping, CRC32C integrity on both sides of the wire.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::config::GcpConfig;
use keyfold_core::testkit::{self, Capabilities};
use keyfold_core::{KeyWrapper, SecretKey, WrapContext, WrapError, WrapErrorKind, WrapOperation};
use keyfold_gcp::GcpKmsWrapper;
use support::{
    FakeKms, Fault, Method, RecordingSleeper, VersionState, kms_with_key, wrapper, wrapper_with,
};

fn ctx() -> WrapContext {
    WrapContext::new("tenant-a", 1)
}

fn key() -> SecretKey {
    SecretKey::generate().unwrap()
}

/// Every error names the provider, the key and the operation.
fn assert_names(err: &WrapError, key_ref: &str, op: WrapOperation) {
    let text = err.to_string();
    assert_eq!(err.provider, "gcp");
    assert_eq!(err.key_ref, key_ref);
    assert_eq!(err.operation, op);
    assert!(text.contains(key_ref), "{text}");
    assert!(text.contains(&op.to_string()), "{text}");
}

#[tokio::test]
async fn conformance() {
    let (kms, key_a) = kms_with_key().await;
    let key_b = kms.create_key("keyfold-tests", "europe-west1", "tenants", "tenant-b");
    testkit::run_all(
        &wrapper(&kms, &key_a),
        &wrapper(&kms, &key_b),
        Capabilities::default(),
    )
    .await;
}

#[tokio::test]
async fn wrap_sends_aad_and_checksums_and_records_the_version() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    let wrapped = w.wrap(&key(), &ctx()).await.unwrap();
    assert_eq!(wrapped.provider, "gcp");
    assert_eq!(wrapped.key_ref, key_ref);
    assert_eq!(
        wrapped.kms_key_version.as_deref(),
        Some(format!("{key_ref}/cryptoKeyVersions/1").as_str())
    );
    w.unwrap(&wrapped, &ctx()).await.unwrap();

    let seen = kms.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.name, key_ref);
        assert_eq!(request.aad, ctx().to_aad(), "AAD is the wrap context");
        assert!(
            request.data_crc32c_sent && request.aad_crc32c_sent,
            "{request:?}"
        );
        assert_eq!(
            request.routing_header.as_deref(),
            Some(format!("name={}", key_ref.replace('/', "%2F")).as_str())
        );
        assert!(!request.authorization_sent, "anonymous sends no token");
    }
    assert_eq!(seen[0].method, Method::Encrypt);
    assert_eq!(seen[1].method, Method::Decrypt);
}

#[tokio::test]
async fn aad_binds_keyring_and_version() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    let wrapped = w.wrap(&key(), &ctx()).await.unwrap();
    for other in [
        WrapContext::new("tenant-b", 1),
        WrapContext::new("tenant-a", 2),
    ] {
        let err = w.unwrap(&wrapped, &other).await.unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext, "{err}");
        assert_names(&err, &key_ref, WrapOperation::Unwrap);
        assert!(err.to_string().contains("INVALID_ARGUMENT"), "{err}");
    }
    // Not retried: a permanent error costs one call each.
    assert_eq!(kms.calls(Method::Decrypt), 2);
}

#[tokio::test]
async fn rotation_keeps_old_versions_decrypting() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    let k1 = key();
    let old = w.wrap(&k1, &ctx()).await.unwrap();
    let v2 = kms.rotate(&key_ref);
    let k2 = key();
    let new = w.wrap(&k2, &ctx()).await.unwrap();
    assert_eq!(new.kms_key_version.as_deref(), Some(v2.as_str()));
    assert_ne!(old.kms_key_version, new.kms_key_version);
    assert_eq!(w.unwrap(&old, &ctx()).await.unwrap().expose(), k1.expose());
    assert_eq!(w.unwrap(&new, &ctx()).await.unwrap().expose(), k2.expose());

    // Back to version 1 as primary: new wraps name it again.
    kms.set_primary(&key_ref, 1);
    let again = w.wrap(&key(), &ctx()).await.unwrap();
    assert_eq!(again.kms_key_version, old.kms_key_version);
}

#[tokio::test]
async fn disabled_and_destroyed_versions_are_key_disabled() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    let k1 = key();
    let old = w.wrap(&k1, &ctx()).await.unwrap();
    kms.rotate(&key_ref);
    let new = w.wrap(&key(), &ctx()).await.unwrap();

    kms.set_version_state(&key_ref, 1, VersionState::Disabled);
    let err = w.unwrap(&old, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyDisabled, "{err}");
    assert!(err.to_string().contains("FAILED_PRECONDITION"), "{err}");
    assert_names(&err, &key_ref, WrapOperation::Unwrap);
    w.unwrap(&new, &ctx()).await.unwrap();

    // Disabling is reversible.
    kms.set_version_state(&key_ref, 1, VersionState::Enabled);
    assert_eq!(w.unwrap(&old, &ctx()).await.unwrap().expose(), k1.expose());

    // A disabled primary refuses to encrypt.
    kms.set_version_state(&key_ref, 2, VersionState::Disabled);
    let err = w.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyDisabled, "{err}");
    assert_names(&err, &key_ref, WrapOperation::Wrap);

    // Destroyed is for good.
    kms.set_version_state(&key_ref, 1, VersionState::Destroyed);
    let err = w.unwrap(&old, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyDisabled, "{err}");
    assert!(err.to_string().contains("DESTROYED"), "{err}");
}

#[tokio::test]
async fn unknown_key_is_not_found() {
    let kms = FakeKms::start().await;
    let key_ref = "projects/p/locations/global/keyRings/r/cryptoKeys/missing";
    let w = wrapper(&kms, key_ref);
    let err = w.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::NotFound, "{err}");
    assert_names(&err, key_ref, WrapOperation::Wrap);
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    assert_eq!(kms.calls(Method::Encrypt), 1, "not retried");
}

#[tokio::test]
async fn permission_denied_is_access_denied_and_not_retried() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    let wrapped = w.wrap(&key(), &ctx()).await.unwrap();
    kms.deny(&key_ref, true);
    let err = w.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::AccessDenied, "{err}");
    assert_names(&err, &key_ref, WrapOperation::Wrap);
    assert!(err.to_string().contains("PERMISSION_DENIED"), "{err}");
    let err = w.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::AccessDenied, "{err}");
    assert_names(&err, &key_ref, WrapOperation::Unwrap);
    assert_eq!(kms.calls(Method::Encrypt), 2);
    assert_eq!(kms.calls(Method::Decrypt), 1);
    kms.deny(&key_ref, false);
    w.unwrap(&wrapped, &ctx()).await.unwrap();
}

#[tokio::test]
async fn transient_unavailable_is_retried() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper_with(&kms, &key_ref, 3);
    kms.inject(Method::Encrypt, Fault::Status(tonic_code::UNAVAILABLE), 2);
    let wrapped = w.wrap(&key(), &ctx()).await.unwrap();
    assert_eq!(kms.calls(Method::Encrypt), 3);
    kms.inject(
        Method::Decrypt,
        Fault::Status(tonic_code::DEADLINE_EXCEEDED),
        1,
    );
    w.unwrap(&wrapped, &ctx()).await.unwrap();
    assert_eq!(kms.calls(Method::Decrypt), 2);

    // More failures than attempts: the last one is returned, as transient.
    kms.inject(Method::Encrypt, Fault::Status(tonic_code::UNAVAILABLE), 3);
    let err = w.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable, "{err}");
    assert!(err.is_transient());
    assert_names(&err, &key_ref, WrapOperation::Wrap);
    assert!(err.to_string().contains("UNAVAILABLE"), "{err}");
    assert_eq!(kms.pending_faults(), 0);
}

#[tokio::test]
async fn resource_exhausted_is_throttled_with_retry_after() {
    let (kms, key_ref) = kms_with_key().await;
    kms.set_retry_delay(Duration::from_millis(300));
    let once = wrapper_with(&kms, &key_ref, 1);
    kms.inject(
        Method::Encrypt,
        Fault::Status(tonic_code::RESOURCE_EXHAUSTED),
        1,
    );
    let err = once.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Throttled, "{err}");
    assert_eq!(err.retry_after, Some(Duration::from_millis(300)));
    assert_names(&err, &key_ref, WrapOperation::Wrap);

    // With retries, the wait the service asked for is honoured: the retry
    // loop asks its clock for exactly that wait (it exceeds the backoff cap),
    // on a recording clock, so nothing depends on how long the test takes.
    let sleeper = Arc::new(RecordingSleeper::default());
    let w = support::builder_with(&kms, &key_ref, 3)
        .sleeper(sleeper.clone())
        .build()
        .unwrap();
    kms.inject(
        Method::Encrypt,
        Fault::Status(tonic_code::RESOURCE_EXHAUSTED),
        1,
    );
    let before = kms.calls(Method::Encrypt);
    w.wrap(&key(), &ctx()).await.unwrap();
    assert_eq!(kms.calls(Method::Encrypt), before + 2);
    assert_eq!(*sleeper.waits.lock().unwrap(), [Duration::from_millis(300)]);
}

#[tokio::test]
async fn unreachable_endpoint_is_unavailable() {
    // A port bound but not listening, kept for the whole test: refused,
    // and no other test's server can be handed it meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let free = socket.local_addr().unwrap();
    let key_ref = "projects/p/locations/l/keyRings/r/cryptoKeys/k";
    let config = GcpConfig {
        kms_key_ref: key_ref.to_owned(),
        impersonate_service_account: support::SERVICE_ACCOUNT.to_owned(),
        project_id: None,
        endpoint_url: None,
    };
    let w = GcpKmsWrapper::builder(config)
        .endpoint_url(format!("http://{free}"))
        .allow_loopback_endpoints_for_tests(true)
        .anonymous_credentials_for_local_server()
        .retry_policy(support::fast_retries(2))
        .build()
        .unwrap();
    let err = w.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable, "{err}");
    assert!(err.is_transient());
    assert_names(&err, key_ref, WrapOperation::Wrap);
}

/// The fake never answers a stalled call, so these calls return only because
/// the request deadline cut them: nothing is measured against the wall clock.
#[tokio::test]
async fn a_stuck_call_times_out_as_unavailable() {
    let (kms, key_ref) = kms_with_key().await;
    let sleeper = Arc::new(RecordingSleeper::default());
    let build = |attempts| {
        support::builder_with(&kms, &key_ref, attempts)
            // Only the stalled attempts wait it out; the retry must fit in
            // it too, on a machine however loaded.
            .request_timeout(Duration::from_secs(2))
            .sleeper(sleeper.clone())
            .build()
            .unwrap()
    };
    kms.inject(Method::Encrypt, Fault::Stall, 1);
    let err = build(1).wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable, "{err}");
    assert!(err.is_transient());
    assert_names(&err, &key_ref, WrapOperation::Wrap);

    // Cut at the deadline, the stuck attempt is retried, and the retry succeeds.
    kms.inject(Method::Encrypt, Fault::Stall, 1);
    let before = kms.calls(Method::Encrypt);
    build(2).wrap(&key(), &ctx()).await.unwrap();
    assert_eq!(kms.calls(Method::Encrypt), before + 2);
    assert_eq!(sleeper.waits.lock().unwrap().len(), 1);
    assert_eq!(kms.pending_faults(), 0);
}

/// Each corruption, injected on every attempt, fails the call; injected
/// once, the retry succeeds. Never a silent success with wrong bytes.
#[tokio::test]
async fn crc32c_corruption_on_either_side_is_detected() {
    let (kms, key_ref) = kms_with_key().await;
    let once = wrapper_with(&kms, &key_ref, 1);
    let retrying = wrapper_with(&kms, &key_ref, 3);
    let good = {
        let k = key();
        let wrapped = once.wrap(&k, &ctx()).await.unwrap();
        (k, wrapped)
    };

    let cases = [
        (
            Method::Encrypt,
            Fault::CorruptRequestData,
            "plaintext_crc32c",
        ),
        (
            Method::Encrypt,
            Fault::CorruptResponseData,
            "ciphertext_crc32c",
        ),
        (
            Method::Encrypt,
            Fault::CorruptResponseChecksum,
            "ciphertext_crc32c",
        ),
        (
            Method::Encrypt,
            Fault::UnverifiedPlaintext,
            "plaintext_crc32c",
        ),
        (
            Method::Encrypt,
            Fault::UnverifiedAad,
            "additional_authenticated_data_crc32c",
        ),
        (
            Method::Decrypt,
            Fault::CorruptRequestData,
            "ciphertext_crc32c",
        ),
        (
            Method::Decrypt,
            Fault::CorruptResponseData,
            "plaintext_crc32c",
        ),
        (
            Method::Decrypt,
            Fault::CorruptResponseChecksum,
            "plaintext_crc32c",
        ),
    ];
    for (method, fault, field) in cases {
        let label = format!("{method:?} {fault:?}");
        kms.inject(method, fault.clone(), 1);
        let err = match method {
            Method::Encrypt => once.wrap(&key(), &ctx()).await.err(),
            Method::Decrypt => once.unwrap(&good.1, &ctx()).await.err(),
        }
        .unwrap_or_else(|| panic!("{label}: corruption went unnoticed"));
        assert_eq!(err.kind, WrapErrorKind::Unavailable, "{label}: {err}");
        let text = err.to_string();
        assert!(text.contains(field), "{label}: {text}");
        let op = match method {
            Method::Encrypt => WrapOperation::Wrap,
            Method::Decrypt => WrapOperation::Unwrap,
        };
        assert_names(&err, &key_ref, op);

        // One corrupted exchange, then a clean one: the retry recovers.
        let before = kms.calls(method);
        kms.inject(method, fault, 1);
        match method {
            Method::Encrypt => {
                let k = key();
                let wrapped = retrying.wrap(&k, &ctx()).await.unwrap();
                let back = retrying.unwrap(&wrapped, &ctx()).await.unwrap();
                assert_eq!(back.expose(), k.expose(), "{label}");
            }
            Method::Decrypt => {
                let back = retrying.unwrap(&good.1, &ctx()).await.unwrap();
                assert_eq!(back.expose(), good.0.expose(), "{label}");
            }
        }
        assert_eq!(kms.calls(method) - before, 2, "{label}: one retry");
        assert_eq!(kms.pending_faults(), 0);
    }
}

#[tokio::test]
async fn a_foreign_version_name_is_refused() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    kms.inject(Method::Encrypt, Fault::ForeignVersionName, 1);
    let err = w.wrap(&key(), &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{err}");
    assert_names(&err, &key_ref, WrapOperation::Wrap);
}

#[tokio::test]
async fn another_keys_wrapped_key_is_refused_before_calling_kms() {
    let (kms, key_a) = kms_with_key().await;
    let key_b = kms.create_key("keyfold-tests", "europe-west1", "tenants", "tenant-b");
    let a = wrapper(&kms, &key_a);
    let b = wrapper(&kms, &key_b);
    let wrapped = a.wrap(&key(), &ctx()).await.unwrap();
    let err = b.unwrap(&wrapped, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{err}");
    assert_names(&err, &key_b, WrapOperation::Unwrap);

    // Relabelled but still carrying A's version name: refused locally too.
    let mut relabelled = wrapped.clone();
    relabelled.key_ref = key_b.clone();
    let err = b.unwrap(&relabelled, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{err}");
    assert_eq!(kms.calls(Method::Decrypt), 0);

    // Relabelled with no version name: B's key cannot open it at the KMS.
    relabelled.kms_key_version = None;
    let err = b.unwrap(&relabelled, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext, "{err}");

    // An empty blob never reaches the KMS.
    let mut empty = wrapped;
    empty.bytes.clear();
    let err = a.unwrap(&empty, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext, "{err}");
    assert_eq!(kms.calls(Method::Decrypt), 1);
}

#[tokio::test]
async fn debug_and_errors_show_no_secrets() {
    let (kms, key_ref) = kms_with_key().await;
    let w = wrapper(&kms, &key_ref);
    let shown = format!("{w:?}");
    assert!(shown.contains(&key_ref), "{shown}");
    assert!(shown.contains(support::SERVICE_ACCOUNT), "{shown}");
    assert!(!shown.to_lowercase().contains("token"), "{shown}");

    let k = SecretKey::try_from_slice(&[0xab; 32]).unwrap();
    let wrapped = w.wrap(&k, &ctx()).await.unwrap();
    let shown = format!("{wrapped:?}");
    assert!(!shown.contains("171") && !shown.contains("ab"), "{shown}");

    let wrong_context = w
        .unwrap(&wrapped, &WrapContext::new("x", 9))
        .await
        .unwrap_err();
    kms.inject(Method::Decrypt, Fault::CorruptResponseData, 1);
    let corrupted = wrapper_with(&kms, &key_ref, 1)
        .unwrap(&wrapped, &ctx())
        .await
        .unwrap_err();
    let failures = [wrong_context, corrupted];
    for err in failures {
        let text = format!("{err} {err:?}");
        assert!(
            !text.contains("171, 171") && !text.contains("abab"),
            "{text}"
        );
        assert!(!text.contains("0xab") && !text.contains("AB, AB"), "{text}");
    }
}

/// tonic's codes, under the names Google's docs use.
mod tonic_code {
    use gcloud_sdk::tonic::Code;
    pub(crate) const UNAVAILABLE: Code = Code::Unavailable;
    pub(crate) const DEADLINE_EXCEEDED: Code = Code::DeadlineExceeded;
    pub(crate) const RESOURCE_EXHAUSTED: Code = Code::ResourceExhausted;
}
