//! Onboarding a tenant on AWS KMS (moto's server, started by this test on a
//! free loopback port): the probe, a failed probe changing nothing, moving a
//! tenant from the local KEK to its AWS key, rotation and rewrap under it.
#![cfg(feature = "aws")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed check is a test failure"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_kms::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::http::StatusCode as HttpStatus;
use aws_smithy_types::body::SdkBody;
use common::{ACME, GLOBEX, Service, TempDir, config, local_providers, names};
use keyfold::aws::AwsKmsWrapper;
use keyfold::aws::AwsWrapperFactory;
use keyfold::config::ProviderConfig;
use keyfold::probe::WrapperFactory;
use keyfold::{KeyWrapper, WrapError};
use keyfold_moto::MotoServer;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tenant_kms_service::tenants::Providers;

const REGION: &str = "eu-west-1";
const ACCOUNT: &str = "123456789012";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/tenant-kms";

/// moto's server (keyfold-moto) with the service's helpers.
struct Moto {
    server: MotoServer,
}

impl Moto {
    fn start() -> Moto {
        Moto {
            server: MotoServer::start(&std::env::temp_dir()),
        }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    /// A new symmetric KMS key; its ARN.
    async fn create_key(&self) -> String {
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.url())
            .credentials_provider(Credentials::new(
                "AKIATENANTKMSADMIN00",
                "admin",
                None,
                None,
                "test",
            ))
            .build();
        let out = aws_sdk_kms::Client::from_conf(conf)
            .create_key()
            .description("tenant-kms-service test key")
            .send()
            .await
            .unwrap();
        out.key_metadata().unwrap().arn().unwrap().to_owned()
    }

    /// The service's AWS factory: tenant roles assumed through moto's STS
    /// with base credentials that only moto accepts.
    fn factory(&self) -> AwsWrapperFactory {
        AwsWrapperFactory::new()
            .sts_endpoint_url(self.url())
            .kms_endpoint_url(self.url())
            .allow_loopback_endpoints_for_tests(true)
            .base_credentials(Credentials::new(
                "AKIATENANTKMSBASE000",
                "base-secret",
                None,
                None,
                "test-base",
            ))
    }

    /// An onboarding body; the endpoint is the operator's (see `factory`).
    fn config(&self, key_ref: &str, external_id: &str) -> Value {
        json!({
            "provider": "aws",
            "kms_key_ref": key_ref,
            "config": {
                "region": REGION,
                "role_arn": ROLE_ARN,
                "external_id": external_id,
            },
        })
    }

    /// The service's providers: local KEKs, and AWS through moto (the
    /// operator's endpoint override).
    fn providers(&self, cfg: &tenant_kms_service::config::ServiceConfig) -> Providers {
        local_providers(cfg).with("aws", Arc::new(self.factory()))
    }
}

/// The `kms.*` events (the step-up events left out).
fn kms_events(events: &[Value]) -> Vec<&str> {
    names(events)
        .into_iter()
        .filter(|n| n.starts_with("kms."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_on_aws_kms_in_moto() {
    let moto = Moto::start();
    let dir = TempDir::new("moto");
    let cfg = config(&dir, 10, None);
    let svc = Service::start(cfg.clone(), moto.providers(&cfg)).await;

    // A key that does not exist: the probe fails with AWS's answer, nothing stored.
    let missing =
        format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000");
    let (s, v) = svc
        .onboard(GLOBEX, moto.config(&missing, "tenant-globex"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"], "kms_probe_failed");
    assert_eq!(v["step"], "wrap");
    assert_eq!(v["kind"], "not_found", "{v}");
    assert_eq!(v["provider"], "aws");
    // AWS's own text (request ids, SDK output) is for the operator log only.
    assert!(
        !v["message"].as_str().unwrap().contains("NotFoundException"),
        "{v}"
    );
    let (s, _) = svc.get("/admin/tenant-kms", GLOBEX).await;
    assert_eq!(s, StatusCode::CONFLICT, "nothing stored");
    assert_eq!(kms_events(&svc.audit(GLOBEX).await), ["kms.probe.failed"]);

    // Globex onboards straight onto its AWS key, under the external id the
    // service assigned it: naming another tenant's is refused before any
    // AWS call (it would let Globex have the service assume Acme's role).
    let globex_key = moto.create_key().await;
    let (s, v) = svc
        .post(
            "/admin/tenant-kms",
            GLOBEX,
            moto.config(&globex_key, "tenant-acme"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "external_id_mismatch");
    assert_eq!(v["field"], "config.external_id");
    assert!(
        v["message"].as_str().unwrap().contains("tenant-globex"),
        "{v}"
    );
    let (s, _) = svc.get("/admin/tenant-kms", GLOBEX).await;
    assert_eq!(s, StatusCode::CONFLICT, "nothing stored");
    let (s, v) = svc
        .onboard(GLOBEX, moto.config(&globex_key, "tenant-globex"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["provider"], "aws");
    assert_eq!(v["kms_key_ref"], globex_key.as_str());
    assert_eq!(v["new_key_version"], 1);
    assert_eq!(v["rewrap_status"], "enqueued");
    svc.put_secret(GLOBEX, "token", "g-1").await;
    assert_eq!(svc.get_secret(GLOBEX, "token").await["value"], "g-1");

    // Acme starts on the local KEK, then moves to its AWS key: the keyring is
    // re-wrapped under it, a new version is made there, and the secrets move.
    svc.onboard_local(ACME).await;
    for i in 0..15 {
        svc.put_secret(ACME, &format!("a{i}"), &format!("local-{i}"))
            .await;
    }
    let acme_key = moto.create_key().await;
    // Without `external_id`, the service fills in the one it assigned.
    let mut acme_config = moto.config(&acme_key, "unused");
    acme_config["config"]
        .as_object_mut()
        .unwrap()
        .remove("external_id");
    let (s, v) = svc.onboard(ACME, acme_config).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["new_key_version"], 2);
    assert!(v["note"].as_str().unwrap().contains("rewrap"), "{v}");
    let lease = v["rewrap_lease_id"].as_str().unwrap().to_owned();
    let done = svc.completed_job(ACME, &lease).await;
    assert_eq!(done["totals"]["seen"], 15);
    assert_eq!(done["totals"]["failed"], 0);
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(meta["provider"], "aws");
    assert_eq!(meta["kms_key_ref"], acme_key.as_str());
    for k in meta["keys"].as_array().unwrap() {
        assert_eq!(
            k["wrap_key_ref"],
            acme_key.as_str(),
            "every version under the AWS key: {meta}"
        );
    }
    for i in 0..15 {
        let v = svc.get_secret(ACME, &format!("a{i}")).await;
        assert_eq!(
            (v["value"].clone(), v["key_version"].clone()),
            (json!(format!("local-{i}")), json!(2))
        );
    }

    // Rotation under AWS, and the audit entry names the wrap method.
    let rot = svc.rotate(ACME).await;
    assert_eq!(rot["version"], 3);
    let events = svc.audit(ACME).await;
    let rotate = events
        .iter()
        .find(|e| e["event"] == "kms.rotate" && e["detail"]["new_version"] == 3)
        .unwrap();
    assert_eq!(rotate["detail"]["wrap_provider"], "aws");
    assert_eq!(rotate["detail"]["wrap_key_ref"], acme_key.as_str());
    assert_eq!(rotate["detail"]["lease_id"], rot["rewrap_lease_id"]);
    assert!(
        names(&events).contains(&"kms.rekey"),
        "{:?}",
        names(&events)
    );
    let updated: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "kms.config.updated")
        .collect();
    assert_eq!(
        updated.last().unwrap()["detail"]["previous_key_ref"],
        "dev-kek"
    );
    svc.wait_rewrap(ACME, |v| {
        v["target_version"] == 3 && v["status"] == "completed"
    })
    .await;
    assert_eq!(svc.get_secret(ACME, "a0").await["key_version"], 3);

    // Restart: the keyrings reopen on their AWS wrappers.
    svc.stop().await;
    let svc = Service::start(cfg.clone(), moto.providers(&cfg)).await;
    assert_eq!(svc.get_secret(GLOBEX, "token").await["value"], "g-1");
    assert_eq!(svc.get_secret(ACME, "a14").await["value"], "local-14");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kms_seals_the_keyring_and_cached_versions_keep_working() {
    let moto = Moto::start();
    let dir = TempDir::new("moto-sealed");
    let cfg = config(&dir, 10, None);
    let fast = keyfold::retry::RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(1),
    };
    let providers = local_providers(&cfg).with("aws", Arc::new(moto.factory().retry_policy(fast)));
    let svc = Service::start(cfg, providers).await;
    let key = moto.create_key().await;
    let (s, v) = svc.onboard(ACME, moto.config(&key, "tenant-acme")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    svc.put_secret(ACME, "s", "before").await;

    drop(moto); // the KMS goes away
    let su = svc.step_up(ACME, "rotate", "acme").await;
    let (s, v) = svc
        .call(
            reqwest::Method::POST,
            "/admin/tenant-kms/rotate",
            Some(ACME),
            Some(&su),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "keyring_sealed");
    let meta = svc.get("/admin/tenant-kms", ACME).await.1;
    assert_eq!(meta["sealed"], true, "{meta}");
    assert_eq!(meta["sealed_info"]["kind"], "unavailable", "{meta}");
    assert_eq!(meta["active_version"], 1, "the rotation did not happen");
    // The cached version still encrypts and decrypts.
    svc.put_secret(ACME, "s", "after").await;
    assert_eq!(svc.get_secret(ACME, "s").await["value"], "after");
    assert!(names(&svc.audit(ACME).await).contains(&"kms.sealed"));
    svc.stop().await;
}

/// Answers every KMS `Encrypt` with the error `inject` holds (when it holds
/// one), as KMS sends it: moto never throttles nor denies a role's access.
#[derive(Debug)]
struct InjectError {
    inject: Arc<std::sync::Mutex<Option<&'static str>>>,
}

impl Intercept for InjectError {
    fn name(&self) -> &'static str {
        "InjectError"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<Metadata>().map(Metadata::name) != Some("Encrypt") {
            return Ok(());
        }
        let Some(error) = *self.inject.lock().unwrap() else {
            return Ok(());
        };
        let mut response = HttpResponse::new(
            HttpStatus::try_from(400)?,
            SdkBody::from(format!(
                r#"{{"__type":"{error}","message":"injected by the test"}}"#
            )),
        );
        response
            .headers_mut()
            .insert("content-type", "application/x-amz-json-1.1");
        response.headers_mut().insert("x-amzn-errortype", error);
        *context.response_mut() = response;
        Ok(())
    }
}

/// The AWS factory with [`InjectError`] on every wrapper, no retries.
#[derive(Debug)]
struct InjectingFactory {
    moto_url: String,
    inject: Arc<std::sync::Mutex<Option<&'static str>>>,
}

#[async_trait::async_trait]
impl WrapperFactory for InjectingFactory {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        let ProviderConfig::Aws(aws) = config else {
            panic!("an AWS config expected");
        };
        let wrapper = AwsKmsWrapper::builder(aws.clone())
            .sts_endpoint_url(self.moto_url.clone())
            .kms_endpoint_url(self.moto_url.clone())
            .allow_loopback_endpoints_for_tests(true)
            .base_credentials(Credentials::new(
                "AKIATENANTKMSBASE000",
                "base-secret",
                None,
                None,
                "test-base",
            ))
            .retry_policy(keyfold::retry::RetryPolicy::none())
            .interceptor(InjectError {
                inject: Arc::clone(&self.inject),
            })
            .build()
            .await?;
        Ok(Arc::new(wrapper))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_access_denied_is_403_and_throttling_is_429_with_retry_after() {
    let moto = Moto::start();
    let dir = TempDir::new("moto-denied");
    let cfg = config(&dir, 10, None);
    let inject = Arc::new(std::sync::Mutex::new(Some("AccessDeniedException")));
    let providers = local_providers(&cfg).with(
        "aws",
        Arc::new(InjectingFactory {
            moto_url: moto.url(),
            inject: Arc::clone(&inject),
        }),
    );
    let svc = Service::start(cfg, providers).await;
    let key = moto.create_key().await;

    let (s, v) = svc.onboard(ACME, moto.config(&key, "tenant-acme")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "kms_access_denied", "{v}");
    assert_eq!(v["step"], "wrap", "{v}");
    assert!(!v.to_string().contains("injected by the test"), "{v}");

    *inject.lock().unwrap() = Some("ThrottlingException");
    let su = svc.step_up(ACME, "onboard", &key).await;
    let resp = svc
        .http
        .post(format!("{}/admin/tenant-kms", svc.base))
        .bearer_auth(ACME)
        .header("x-step-up-token", su)
        .json(&moto.config(&key, "tenant-acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "kms_throttled", "{v}");
    assert_eq!(v["kind"], "throttled", "{v}");
    let (s, _) = svc.get("/admin/tenant-kms", ACME).await;
    assert_eq!(s, StatusCode::CONFLICT, "nothing stored");

    *inject.lock().unwrap() = None;
    let (s, v) = svc.onboard(ACME, moto.config(&key, "tenant-acme")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        kms_events(&svc.audit(ACME).await)[..3],
        ["kms.probe.failed", "kms.probe.failed", "kms.config.updated"]
    );
    svc.stop().await;
}
