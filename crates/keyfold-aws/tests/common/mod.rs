//! Test support: moto's server (AWS KMS + STS) started on a free loopback
//! port by the test process itself, and helpers to make keys in it.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support shared by several test binaries"
)]

use std::path::Path;
use std::sync::OnceLock;

use aws_sdk_kms::config::{Credentials, Region};
use keyfold_aws::{AwsKmsWrapper, AwsKmsWrapperBuilder};
use keyfold_core::config::AwsConfig;
use keyfold_moto::MotoServer;

/// moto's default account.
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "eu-west-1";
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/keyfold-test";
pub const EXTERNAL_ID: &str = "keyfold-test-external-id";
/// Base credentials for `AssumeRole` against the emulator (never reach KMS).
pub const BASE_ACCESS_KEY: &str = "AKIAKEYFOLDBASE00000";
pub const BASE_SECRET_KEY: &str = "keyfold-base-secret-for-the-emulator";

/// moto's server for this test binary, with helpers to make keys in it.
pub struct Moto {
    server: MotoServer,
}

impl Moto {
    /// Starts a new moto server and waits until it answers `GET /moto-api/`.
    pub fn start() -> Moto {
        Moto {
            server: MotoServer::start(Path::new(env!("CARGO_TARGET_TMPDIR"))),
        }
    }

    /// One server shared by all tests of this test binary; each test makes
    /// its own keys, so they do not interfere.
    pub fn shared() -> &'static Moto {
        static MOTO: OnceLock<Moto> = OnceLock::new();
        MOTO.get_or_init(Moto::start)
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Clears all of moto's state.
    pub fn reset(&self) {
        self.server.reset();
    }

    /// A KMS client with static test credentials, for administering the
    /// emulator (creating keys, aliases, rotating).
    pub fn admin(&self) -> aws_sdk_kms::Client {
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.url())
            .credentials_provider(Credentials::new(
                "AKIAKEYFOLDADMIN0000",
                "admin-secret",
                None,
                None,
                "keyfold-test",
            ))
            .build();
        aws_sdk_kms::Client::from_conf(conf)
    }

    /// A new symmetric key; returns its ARN.
    pub async fn create_key(&self) -> String {
        let out = self
            .admin()
            .create_key()
            .description("keyfold test key")
            .send()
            .await
            .unwrap();
        out.key_metadata().unwrap().arn().unwrap().to_owned()
    }

    /// Points `alias/NAME` at `key_arn`.
    pub async fn create_alias(&self, name: &str, key_arn: &str) {
        self.admin()
            .create_alias()
            .alias_name(format!("alias/{name}"))
            .target_key_id(key_arn)
            .send()
            .await
            .unwrap();
    }

    /// The tenant's config of a wrapper over `key_ref` in this emulator (the
    /// endpoint is the operator's: see [`Moto::builder`]).
    pub fn config(&self, key_ref: &str) -> AwsConfig {
        AwsConfig {
            kms_key_ref: key_ref.to_owned(),
            region: REGION.to_owned(),
            role_arn: ROLE_ARN.to_owned(),
            external_id: Some(EXTERNAL_ID.to_owned()),
            endpoint_url: None,
        }
    }

    /// A builder over `key_ref` whose role is assumed through this
    /// emulator's STS with the base test credentials, and whose KMS endpoint
    /// is the emulator (the operator's loopback switch on).
    pub fn builder(&self, key_ref: &str) -> AwsKmsWrapperBuilder {
        AwsKmsWrapper::builder(self.config(key_ref))
            .kms_endpoint_url(self.url())
            .allow_loopback_endpoints_for_tests(true)
            .sts_endpoint_url(self.url())
            .base_credentials(Credentials::new(
                BASE_ACCESS_KEY,
                BASE_SECRET_KEY,
                None,
                None,
                "keyfold-test-base",
            ))
    }

    pub async fn wrapper(&self, key_ref: &str) -> AwsKmsWrapper {
        self.builder(key_ref).build().await.unwrap()
    }
}

/// A unique name for aliases and keyrings in a shared emulator.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
