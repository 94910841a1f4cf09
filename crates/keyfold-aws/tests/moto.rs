//! `AwsKmsWrapper` against moto's KMS and STS server, started by the tests
//! on a free loopback port (see `common/mod.rs`).
//!
//! moto's known gaps, deliberately not asserted here (real KMS differs):
//! - `DisableKey` and `ScheduleKeyDeletion` do not block `Encrypt`/`Decrypt`,
//!   so `KMSInvalidStateException` -> `KeyDisabled` is only unit-tested on
//!   the mapping function (`src/errors.rs`).
//! - `Decrypt` with another key's `KeyId` answers `AccessDeniedException`
//!   (real KMS: `IncorrectKeyException`, mapped to `KeyMismatch`).
//! - Key policies are not enforced, so a denied key is shown with a missing
//!   key (`NotFound`) and a refused role (STS unreachable).
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
use keyfold_aws::{AwsKmsWrapper, PROVIDER};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::testkit::{self, Capabilities};
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
    let closed = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = moto.config(&format!(
        "arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000001"
    ));
    config.endpoint_url = Some(format!("http://127.0.0.1:{port}"));
    let w = AwsKmsWrapper::builder(config)
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

#[tokio::test]
async fn onboarding_probe_passes_and_reports_a_denied_key() {
    let moto = Moto::shared();
    let good = moto.wrapper(&moto.create_key().await).await;
    good.probe().await.unwrap();

    let missing =
        format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-2222-3333-4444-555555555555");
    let err = moto.wrapper(&missing).await.probe().await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::NotFound, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&missing) && text.contains("aws wrap"),
        "{text}"
    );

    // A role that cannot be assumed: reported, naming the key.
    let closed = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let denied = moto
        .builder(good.key_ref())
        .sts_endpoint_url(closed)
        .retry_policy(RetryPolicy::none())
        .build()
        .await
        .unwrap();
    let err = denied.probe().await.unwrap_err();
    assert!(err.to_string().contains(good.key_ref()), "{err}");
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
