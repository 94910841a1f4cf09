//! `AwsKmsWrapper` against moto's KMS and STS server, started by the tests
//! on a free loopback port (see `common/mod.rs`).
//!
//! moto's known gaps, deliberately not asserted here (real KMS differs):
//! - `DisableKey` and `ScheduleKeyDeletion` do not block `Encrypt`/`Decrypt`,
//!   so `KMSInvalidStateException` -> `KeyDisabled` is only unit-tested on
//!   the mapping function (`src/errors.rs`).
//! - `Decrypt` with another key's `KeyId` answers `AccessDeniedException`
//!   (real KMS: `IncorrectKeyException`, mapped to `KeyMismatch`).
//! - Key policies are enforced only for `DescribeKey` (a Deny statement), not
//!   for `Encrypt`/`Decrypt`, and STS grants every `AssumeRole`: so the probe's
//!   "denied key" is shown with a missing key (`NotFound`) and a role that
//!   cannot be assumed (STS unreachable); STS `AccessDenied` is unit-tested
//!   on the mapping (`src/errors.rs`). moto does answer `AccessDeniedException`
//!   for a blob from another key (below).
//! - Throttling and 5xx never happen: they are injected with an SDK
//!   interceptor below and unit-tested on the mapping function.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed check is a test failure"
)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::interceptors::{
    BeforeDeserializationInterceptorContextMut, BeforeTransmitInterceptorContextMut,
    BeforeTransmitInterceptorContextRef,
};
use aws_sdk_kms::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use common::{ACCOUNT, BASE_ACCESS_KEY, EXTERNAL_ID, Moto, REGION, unique};
use keyfold_aws::{AwsKmsWrapper, AwsWrapperFactory, PROVIDER};
use keyfold_core::EncryptionContext;
use keyfold_core::audit::{Actor, RecordingSink};
use keyfold_core::config::ProviderConfig;
use keyfold_core::keyring::{DestroyAuthorization, KeyState, Keyring, NoRecordsLeft};
use keyfold_core::probe::{self, ConfigSlot, ProbeStep};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::MemoryStore;
use keyfold_core::testkit::{self, Capabilities};
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{KeyWrapper, SecretKey, WrapContext, WrapErrorKind, WrapOperation};

fn ctx() -> WrapContext {
    WrapContext::new("tenant-a", 1)
}

fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let moto = Moto::shared();
    let a = moto.wrapper(&moto.create_key().await).await;
    let b = moto.wrapper(&moto.create_key().await).await;
    testkit::run_all(&a, &b, Capabilities::default()).await;
}

#[tokio::test]
async fn key_arn_alias_and_alias_arn_all_work() {
    let moto = Moto::shared();
    let arn = moto.create_key().await;
    let alias = unique("tenant");
    moto.create_alias(&alias, &arn).await;
    let alias_arn = format!("arn:aws:kms:{REGION}:{ACCOUNT}:alias/{alias}");
    let mut wrapped_by = Vec::new();
    for key_ref in [arn.clone(), format!("alias/{alias}"), alias_arn] {
        let w = moto.wrapper(&key_ref).await;
        assert_eq!(w.key_ref(), key_ref);
        let key = SecretKey::generate().unwrap();
        let wrapped = w.wrap(&key, &ctx()).await.unwrap();
        assert_eq!(wrapped.provider, PROVIDER);
        assert_eq!(wrapped.key_ref, arn, "wrapped keys record the key ARN");
        assert_eq!(
            w.unwrap(&wrapped, &ctx()).await.unwrap().expose(),
            key.expose()
        );
        wrapped_by.push((w, wrapped, key));
    }
    // Any form unwraps what any other form wrapped: same backing key.
    for (w, _, _) in &wrapped_by {
        for (_, wrapped, key) in &wrapped_by {
            assert_eq!(
                w.unwrap(wrapped, &ctx()).await.unwrap().expose(),
                key.expose()
            );
        }
    }
}

#[tokio::test]
async fn unknown_alias_and_missing_key_are_not_found() {
    let moto = Moto::shared();
    for key_ref in [
        format!("alias/{}", unique("no-such-alias")),
        format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"),
    ] {
        let w = moto.wrapper(&key_ref).await;
        let err = w
            .wrap(&SecretKey::generate().unwrap(), &ctx())
            .await
            .unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::NotFound, "{err}");
        assert_eq!(err.operation, WrapOperation::Wrap);
        let text = err.to_string();
        assert!(text.contains(&key_ref) && text.contains("wrap"), "{text}");
        assert!(text.contains("NotFoundException"), "{text}");
    }
}

#[tokio::test]
async fn encryption_context_binds_keyring_and_version() {
    let moto = Moto::shared();
    let w = moto.wrapper(&moto.create_key().await).await;
    let wrapped = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    for other in [
        WrapContext::new("tenant-b", 1),
        WrapContext::new("tenant-a", 2),
    ] {
        let err = w.unwrap(&wrapped, &other).await.unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext, "{err}");
        assert_eq!(err.operation, WrapOperation::Unwrap);
        assert!(
            err.to_string().contains("InvalidCiphertextException"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_blob_from_another_key_is_refused() {
    let moto = Moto::shared();
    let a_arn = moto.create_key().await;
    let b_arn = moto.create_key().await;
    let a = moto.wrapper(&a_arn).await;
    let b = moto.wrapper(&b_arn).await;
    let under_b = b
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();

    // Honestly labelled with B's ARN: refused before any KMS call.
    let err = a.unwrap(&under_b, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{err}");
    assert!(err.to_string().contains(&b_arn), "{err}");

    // Relabelled as A's: KMS refuses it (moto: AccessDenied; real KMS:
    // IncorrectKeyException -> KeyMismatch). Either way, permanent.
    let mut relabelled = under_b.clone();
    relabelled.key_ref = a_arn.clone();
    let err = a.unwrap(&relabelled, &ctx()).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    testkit::assert_kind(
        err.kind,
        &[WrapErrorKind::AccessDenied, WrapErrorKind::KeyMismatch],
    );

    // Another provider's record.
    let mut foreign = under_b;
    foreign.provider = "gcp".into();
    assert_eq!(
        a.unwrap(&foreign, &ctx()).await.unwrap_err().kind,
        WrapErrorKind::KeyMismatch
    );
}

/// Removes `KeyId` from `Decrypt` requests, so the emulator decrypts with
/// whatever key the blob names: this makes the wrapper's own check of the
/// response's key ARN the only defence, and shows that it holds.
#[derive(Debug)]
struct StripDecryptKeyId;

impl Intercept for StripDecryptKeyId {
    fn name(&self) -> &'static str {
        "StripDecryptKeyId"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<Metadata>().map(Metadata::name) != Some("Decrypt") {
            return Ok(());
        }
        let request = context.request_mut();
        let mut body: serde_json::Value =
            serde_json::from_slice(request.body().bytes().ok_or("streaming body")?)?;
        body.as_object_mut().ok_or("not an object")?.remove("KeyId");
        let bytes = serde_json::to_vec(&body)?;
        request
            .headers_mut()
            .insert("content-length", bytes.len().to_string());
        *request.body_mut() = SdkBody::from(bytes);
        Ok(())
    }
}

#[tokio::test]
async fn decrypt_response_naming_another_key_is_refused() {
    let moto = Moto::shared();
    let a_arn = moto.create_key().await;
    let b_arn = moto.create_key().await;
    let b = moto.wrapper(&b_arn).await;
    let under_b = b
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();

    let a = moto
        .builder(&a_arn)
        .interceptor(StripDecryptKeyId)
        .build()
        .await
        .unwrap();
    // Sanity: without KeyId, A's own blobs still unwrap.
    let key = SecretKey::generate().unwrap();
    let own = a.wrap(&key, &ctx()).await.unwrap();
    assert_eq!(a.unwrap(&own, &ctx()).await.unwrap().expose(), key.expose());

    let mut substituted = under_b;
    substituted.key_ref = a_arn.clone();
    let err = a.unwrap(&substituted, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{err}");
    let text = err.to_string();
    assert!(text.contains(&b_arn) && text.contains(&a_arn), "{text}");
    assert!(text.contains("substituted"), "{text}");
}

#[tokio::test]
async fn rotate_key_on_demand_keeps_old_wraps_working() {
    let moto = Moto::shared();
    let arn = moto.create_key().await;
    let w = moto.wrapper(&arn).await;
    let old_key = SecretKey::generate().unwrap();
    let old = w.wrap(&old_key, &ctx()).await.unwrap();

    let admin = moto.admin();
    admin
        .enable_key_rotation()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    admin
        .rotate_key_on_demand()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    let rotations = admin
        .list_key_rotations()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    assert!(
        !rotations.rotations().is_empty(),
        "moto recorded no rotation"
    );

    let new_key = SecretKey::generate().unwrap();
    let new = w
        .wrap(&new_key, &WrapContext::new("tenant-a", 2))
        .await
        .unwrap();
    assert_eq!(
        w.unwrap(&old, &ctx()).await.unwrap().expose(),
        old_key.expose()
    );
    assert_eq!(
        w.unwrap(&new, &WrapContext::new("tenant-a", 2))
            .await
            .unwrap()
            .expose(),
        new_key.expose()
    );
}

/// Replaces the first `n` responses to `operation` with a KMS
/// `ThrottlingException` (HTTP 400, as KMS sends it).
#[derive(Debug)]
struct Throttle {
    operation: &'static str,
    remaining: AtomicU32,
    seen: Arc<AtomicU32>,
}

impl Intercept for Throttle {
    fn name(&self) -> &'static str {
        "Throttle"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<Metadata>().map(Metadata::name) != Some(self.operation) {
            return Ok(());
        }
        self.seen.fetch_add(1, Ordering::SeqCst);
        let throttle = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttle {
            let mut response = HttpResponse::new(
                StatusCode::try_from(400)?,
                SdkBody::from(r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#),
            );
            response
                .headers_mut()
                .insert("content-type", "application/x-amz-json-1.1");
            response
                .headers_mut()
                .insert("x-amzn-errortype", "ThrottlingException");
            *context.response_mut() = response;
        }
        Ok(())
    }
}

#[tokio::test]
async fn throttling_is_retried_then_succeeds() {
    let moto = Moto::shared();
    let arn = moto.create_key().await;
    for operation in ["Encrypt", "Decrypt"] {
        let seen = Arc::new(AtomicU32::new(0));
        let w = moto
            .builder(&arn)
            .retry_policy(fast_retries(5))
            .interceptor(Throttle {
                operation,
                remaining: AtomicU32::new(2),
                seen: Arc::clone(&seen),
            })
            .build()
            .await
            .unwrap();
        let key = SecretKey::generate().unwrap();
        let wrapped = w.wrap(&key, &ctx()).await.unwrap();
        assert_eq!(
            w.unwrap(&wrapped, &ctx()).await.unwrap().expose(),
            key.expose()
        );
        assert_eq!(
            seen.load(Ordering::SeqCst),
            3,
            "{operation}: 2 throttled + 1 ok"
        );
    }

    // Without retries the throttling surfaces, transient, naming key and operation.
    let w = moto
        .builder(&arn)
        .retry_policy(RetryPolicy::none())
        .interceptor(Throttle {
            operation: "Encrypt",
            remaining: AtomicU32::new(1),
            seen: Arc::new(AtomicU32::new(0)),
        })
        .build()
        .await
        .unwrap();
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Throttled, "{err}");
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        text.contains(&arn) && text.contains("wrap") && text.contains("ThrottlingException"),
        "{text}"
    );
}

#[tokio::test]
async fn the_keyring_retries_a_throttled_kms() {
    let moto = Moto::shared();
    let arn = moto.create_key().await;
    let seen = Arc::new(AtomicU32::new(0));
    // The wrapper itself does not retry (its default); the keyring does.
    let wrapper = moto
        .builder(&arn)
        .interceptor(Throttle {
            operation: "Encrypt",
            remaining: AtomicU32::new(2),
            seen: Arc::clone(&seen),
        })
        .build()
        .await
        .unwrap();
    let ring = Keyring::builder(
        unique("tenant"),
        Arc::new(wrapper),
        Arc::new(MemoryStore::new()),
    )
    .retry_policy(fast_retries(5))
    .create()
    .await
    .unwrap();
    let r = ring.rotate(&Actor::new("admin")).await.unwrap();
    assert_eq!(r.version, 1);
    assert_eq!(seen.load(Ordering::SeqCst), 3, "2 throttled + 1 ok");
}

/// Records the access key id each KMS request was signed with.
#[derive(Debug, Default, Clone)]
struct RecordSigner(Arc<Mutex<Vec<String>>>);

impl Intercept for RecordSigner {
    fn name(&self) -> &'static str {
        "RecordSigner"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let auth = context
            .request()
            .headers()
            .get("authorization")
            .unwrap_or_default();
        let key_id = auth
            .split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_owned();
        self.0.lock().unwrap().push(key_id);
        Ok(())
    }
}

#[tokio::test]
async fn credentials_come_from_the_assumed_role() {
    let moto = Moto::shared();
    let arn = moto.create_key().await;
    let signer = RecordSigner::default();
    let w = moto
        .builder(&arn)
        .interceptor(signer.clone())
        .build()
        .await
        .unwrap();
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    w.unwrap(&wrapped, &ctx()).await.unwrap();
    let used = signer.0.lock().unwrap().clone();
    assert_eq!(used.len(), 2, "{used:?}");
    for key_id in &used {
        assert!(!key_id.is_empty(), "unsigned request");
        assert_ne!(
            key_id, BASE_ACCESS_KEY,
            "KMS was called with the base credentials"
        );
        assert!(
            key_id.starts_with("ASIA"),
            "not STS session credentials: {key_id}"
        );
    }
    assert!(format!("{w:?}").contains("external_id: Some(\"******\")"));
}

#[tokio::test]
async fn no_fallback_when_the_role_cannot_be_assumed() {
    let moto = Moto::shared();
    let arn = moto.create_key().await;
    // STS on a closed port: the role cannot be assumed, and KMS is never
    // called with the base credentials instead.
    let (_socket, closed) = closed_port();
    let signer = RecordSigner::default();
    let w = moto
        .builder(&arn)
        .sts_endpoint_url(closed)
        .retry_policy(fast_retries(2))
        .interceptor(signer.clone())
        .build()
        .await
        .unwrap();
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert!(signer.0.lock().unwrap().is_empty(), "KMS was called");
    let text = err.to_string();
    assert!(text.contains(&arn) && text.contains("wrap"), "{text}");
    assert!(text.contains("assum"), "{text}");
    assert!(!text.contains(common::BASE_SECRET_KEY), "{text}");
}

#[tokio::test]
async fn kms_unreachable_is_unavailable_after_retries() {
    let moto = Moto::shared();
    let (_closed, url) = closed_port();
    let config = moto.config(&format!(
        "arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000001"
    ));
    let w = AwsKmsWrapper::builder(config)
        .kms_endpoint_url(url)
        .allow_loopback_endpoints_for_tests(true)
        .sts_endpoint_url(moto.url())
        .base_credentials(aws_sdk_kms::config::Credentials::new(
            BASE_ACCESS_KEY,
            "x",
            None,
            None,
            "t",
        ))
        .retry_policy(fast_retries(3))
        .build()
        .await
        .unwrap();
    let err = w
        .wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Unavailable, "{err}");
    assert!(err.is_transient());
}

/// A port bound but not listening (connections are refused), and its URL;
/// no other test's server can be handed the port while the socket lives.
fn closed_port() -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", socket.local_addr().unwrap());
    (socket, url)
}

#[tokio::test]
async fn onboarding_probe_passes_and_reports_a_denied_key() {
    let moto = Moto::shared();
    let good_arn = moto.create_key().await;
    let good = moto.wrapper(&good_arn).await;
    let ok = probe::probe(&good).await.unwrap();
    assert_eq!(
        (ok.provider.as_str(), ok.key_ref.as_str()),
        ("aws", good_arn.as_str())
    );

    // A key the role cannot use (moto enforces no key policy; a missing key
    // is the closest it gets): the failure names the step, key and KMS error.
    let missing =
        format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-2222-3333-4444-555555555555");
    let failure = probe::probe(&moto.wrapper(&missing).await)
        .await
        .unwrap_err();
    assert_eq!(failure.step, ProbeStep::Wrap);
    assert_eq!(failure.kind, Some(WrapErrorKind::NotFound));
    let text = failure.to_string();
    assert!(
        text.contains(&missing) && text.contains("NotFoundException"),
        "{text}"
    );

    // A role that cannot be assumed: reported at the wrap step, naming the key.
    let (_socket, closed) = closed_port();
    let denied = moto
        .builder(&good_arn)
        .sts_endpoint_url(closed)
        .retry_policy(RetryPolicy::none())
        .build()
        .await
        .unwrap();
    let failure = probe::probe(&denied).await.unwrap_err();
    assert_eq!(failure.step, ProbeStep::Wrap);
    assert!(failure.to_string().contains(&good_arn), "{failure}");
    assert!(failure.message.contains("assum"), "{failure}");
}

#[tokio::test]
async fn config_upsert_probes_through_the_factory() {
    let moto = Moto::shared();
    // The operator's settings: the emulator as KMS endpoint (loopback
    // switched on for the test) and the tenant pinned to moto's account.
    let factory = AwsWrapperFactory::new()
        .kms_endpoint_url(moto.url())
        .allow_loopback_endpoints_for_tests(true)
        .allowed_accounts([ACCOUNT])
        .sts_endpoint_url(moto.url())
        .base_credentials(aws_sdk_kms::config::Credentials::new(
            BASE_ACCESS_KEY,
            common::BASE_SECRET_KEY,
            None,
            None,
            "t",
        ))
        .retry_policy(RetryPolicy::none());
    let slot = ConfigSlot::new();
    let sink = RecordingSink::default();
    let actor = Actor::new("onboarding@example.com");
    let good = ProviderConfig::Aws(moto.config(&moto.create_key().await));
    slot.upsert(good.clone(), &factory, "tenant-a", &sink, &actor)
        .await
        .unwrap();

    let missing = ProviderConfig::Aws(moto.config(&format!("alias/{}", unique("gone"))));
    let failure = slot
        .upsert(missing, &factory, "tenant-a", &sink, &actor)
        .await
        .unwrap_err();
    assert_eq!(failure.kind, Some(WrapErrorKind::NotFound));
    assert_eq!(slot.current().unwrap().config, good, "the old config stays");
    assert_eq!(sink.names(), ["kms.config.updated", "kms.probe.failed"]);

    let local: ProviderConfig = serde_json::from_value(serde_json::json!({
        "provider": "local", "kms_key_ref": "dev", "kek_env_var": "KEK"
    }))
    .unwrap();
    let err = probe::WrapperFactory::build(&factory, &local)
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured);
}

/// A keyring whose KEK is a moto KMS key: records encrypted, the keyring
/// rotated and its records rewrapped, the KMS key rotated and the master keys
/// re-wrapped (also onto another KMS key), old versions destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_end_to_end_on_a_kms_key() {
    let moto = Moto::shared();
    let a_arn = moto.create_key().await;
    let store = Arc::new(MemoryStore::new());
    let sink = Arc::new(RecordingSink::default());
    let clock = ManualClock::new(Timestamp(1_700_000_000));
    let id = unique("tenant");
    let admin = Actor::new("admin@example.com");
    let ring = Keyring::builder(&id, Arc::new(moto.wrapper(&a_arn).await), store.clone())
        .audit(sink.clone())
        .clock(Arc::new(clock.clone()))
        .retry_policy(fast_retries(3))
        .destroy_grace(std::time::Duration::ZERO)
        .create()
        .await
        .unwrap();
    ring.rotate(&admin).await.unwrap();
    let rows: Vec<(EncryptionContext, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                EncryptionContext::new()
                    .with("tenant", &id)
                    .with("row", i.to_string()),
                format!("record {i}").into_bytes(),
            )
        })
        .collect();
    let mut stored = Vec::new();
    for (ctx, plain) in &rows {
        stored.push(ring.encrypt(ctx, plain).await.unwrap());
    }

    // Keyring rotation, then every record moved to v2 by a header rewrap.
    let r = ring.rotate(&admin).await.unwrap();
    assert_eq!((r.version, r.previous_version), (2, Some(1)));
    for ((ctx, plain), ct) in rows.iter().zip(stored.iter_mut()) {
        *ct = ring.rewrap(ctx, ct, 2).await.unwrap().expect("moved to v2");
        assert_eq!(&ring.decrypt(ctx, ct).await.unwrap(), plain);
    }

    // Provider-side rotation, then the master keys re-wrapped under the
    // newest backing key material.
    let kms = moto.admin();
    kms.rotate_key_on_demand()
        .key_id(&a_arn)
        .send()
        .await
        .unwrap();
    let moved = ring
        .rewrap_master_keys(Arc::new(moto.wrapper(&a_arn).await), &admin)
        .await
        .unwrap();
    assert_eq!(moved, [1, 2]);

    // Moving the keyring to another KMS key.
    let b_arn = moto.create_key().await;
    let moved = ring
        .rewrap_master_keys(Arc::new(moto.wrapper(&b_arn).await), &admin)
        .await
        .unwrap();
    assert_eq!(moved, [1, 2]);
    let (_, snapshot) = ring.snapshot();
    for v in &snapshot.versions {
        assert_eq!(v.wrapped.as_ref().unwrap().key_ref, b_arn, "v{}", v.version);
    }

    // v1 has no records left: disable and destroy it.
    clock.advance(Duration::from_secs(60));
    ring.disable(1, &admin).await.unwrap();
    clock.advance(Duration::from_secs(60));
    let evidence = DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: id.clone(),
        version: 1,
        source: "rewrap-job-1".into(),
        checked_at: clock.now(),
    });
    ring.destroy(1, evidence, &admin).await.unwrap();
    assert_eq!(ring.version_state(1), Some(KeyState::Destroyed));

    // A fresh process: the stored keyring opened with a wrapper over key B
    // unwraps v2 from KMS and decrypts every record.
    let reopened = Keyring::builder(&id, Arc::new(moto.wrapper(&b_arn).await), store.clone())
        .open()
        .await
        .unwrap();
    for ((ctx, plain), ct) in rows.iter().zip(&stored) {
        assert_eq!(&reopened.decrypt(ctx, ct).await.unwrap(), plain);
    }
    // ...and key A can no longer unwrap the stored master keys.
    let stale = Keyring::builder(&id, Arc::new(moto.wrapper(&a_arn).await), store)
        .retry_policy(RetryPolicy::none())
        .open()
        .await
        .unwrap();
    let (ctx, _) = &rows[0];
    assert!(stale.decrypt(ctx, &stored[0]).await.is_err());

    let names = sink.names();
    for expected in ["kms.rotate", "kms.rekey", "kms.version.state_changed"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn errors_and_debug_hold_no_secrets() {
    let moto = Moto::shared();
    let w = moto.wrapper(&moto.create_key().await).await;
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    let err = w
        .unwrap(&wrapped, &WrapContext::new("tenant-z", 9))
        .await
        .unwrap_err();
    let hex_key: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
    let shown = format!(
        "{w:?} {err} {err:?} {wrapped:?} {:?}",
        moto.builder("alias/x")
    );
    for secret in [hex_key.as_str(), common::BASE_SECRET_KEY, EXTERNAL_ID] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("******"), "{shown}");
}
