//! Test support: the fake Cloud KMS and wrappers pointed at it.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::unwrap_used,
    reason = "test support shared by several test binaries"
)]

pub mod fake_kms;

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use keyfold_core::config::GcpConfig;
use keyfold_core::retry::RetryPolicy;
use keyfold_gcp::{GcpKmsWrapper, GcpKmsWrapperBuilder, Sleeper};

pub use fake_kms::{FakeKms, Fault, Method, VersionState};

/// The service account every test config impersonates.
pub const SERVICE_ACCOUNT: &str = "keyfold-test@keyfold-tests.iam.gserviceaccount.com";

/// A tenant's config for `key` (the endpoint that reaches `kms` is the
/// operator's: see [`builder_with`]).
pub fn config(_kms: &FakeKms, key: &str) -> GcpConfig {
    GcpConfig {
        kms_key_ref: key.to_owned(),
        impersonate_service_account: SERVICE_ACCOUNT.to_owned(),
        project_id: None,
        endpoint_url: None,
    }
}

/// Retries fast, so fault tests stay quick.
pub fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        max_retry_after: Duration::from_secs(2),
    }
}

/// The builder [`wrapper_with`] uses: the fake as the operator's endpoint
/// (the loopback test switch on), anonymous, retrying up to `attempts`
/// times, 5 s per call.
pub fn builder_with(kms: &FakeKms, key: &str, attempts: u32) -> GcpKmsWrapperBuilder {
    GcpKmsWrapper::builder(config(kms, key))
        .endpoint_url(kms.endpoint())
        .allow_loopback_endpoints_for_tests(true)
        .anonymous_credentials_for_local_server()
        .retry_policy(fast_retries(attempts))
        .request_timeout(Duration::from_secs(5))
}

/// A wrapper for `key` on `kms`, anonymous, retrying up to `attempts` times.
pub fn wrapper_with(kms: &FakeKms, key: &str, attempts: u32) -> GcpKmsWrapper {
    builder_with(kms, key, attempts).build().unwrap()
}

/// A clock that records the waits asked of it and returns at once.
#[derive(Debug, Default)]
pub struct RecordingSleeper {
    /// Every wait, in order.
    pub waits: Mutex<Vec<Duration>>,
}

impl Sleeper for RecordingSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.waits.lock().unwrap().push(duration);
        Box::pin(std::future::ready(()))
    }
}

/// A wrapper for `key` on `kms` with 3 attempts per call.
pub fn wrapper(kms: &FakeKms, key: &str) -> GcpKmsWrapper {
    wrapper_with(kms, key, 3)
}

/// A fake KMS with one key, `tenants/tenant-a`, and its name.
pub async fn kms_with_key() -> (FakeKms, String) {
    let kms = FakeKms::start().await;
    let key = kms.create_key("keyfold-tests", "europe-west1", "tenants", "tenant-a");
    (kms, key)
}
