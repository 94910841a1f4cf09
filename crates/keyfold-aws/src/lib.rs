#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a security library answers bad input with a typed error, never a panic"
)]

mod errors;
mod operator;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::sts::AssumeRoleProvider;
use aws_sdk_kms::config::{
    Intercept, ProvideCredentials, Region, SharedCredentialsProvider, SharedInterceptor,
};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::EncryptionAlgorithmSpec;
use keyfold_core::config::{AwsConfig, AwsKeyRef, ProviderConfig};
use keyfold_core::probe::WrapperFactory;
use keyfold_core::retry::{RetryPolicy, retry};
use keyfold_core::{
    KeyWrapper, SecretKey, WrapContext, WrapError, WrapErrorKind, WrapOperation, WrappedKey,
};
use zeroize::Zeroizing;

pub use errors::classify_sdk_error;
pub use operator::{check_kms_endpoint, check_sts_endpoint};

/// Provider name recorded in every [`WrappedKey`] this crate makes.
pub const PROVIDER: &str = "aws";

/// Session name used for the STS `AssumeRole` call (shows in CloudTrail).
pub const DEFAULT_SESSION_NAME: &str = "keyfold-aws";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`KeyWrapper`] over one AWS KMS symmetric key.
///
/// Wraps with KMS `Encrypt` and unwraps with `Decrypt`, both with the
/// [`WrapContext`] as the KMS *encryption context*
/// (`keyfold:keyring`, `keyfold:version`), so a wrapped key moved to another
/// keyring or version fails at the KMS. `Decrypt` names the configured key
/// (`KeyId`) and the key ARN in its response is checked against the one the
/// wrapped key records and against the config: the configured key ARN; for an
/// alias ARN, its region and account; for `alias/NAME`, the config's region
/// and the assumed role's account (an alias resolves in the caller's
/// account). A blob substituted from another key is refused with
/// [`WrapErrorKind::KeyMismatch`].
///
/// Credentials come only from assuming the config's role (`role_arn`, with
/// `external_id`) through STS, on top of the default credential chain.
///
/// `Debug` shows the key, region and role, never credentials or the external id.
pub struct AwsKmsWrapper {
    config: AwsConfig,
    key: AwsKeyRef,
    /// The assumed role's account: where `alias/NAME` resolves.
    role_account: String,
    client: aws_sdk_kms::Client,
    retry: RetryPolicy,
}

/// Builds [`AwsKmsWrapper`]s from `aws` [`ProviderConfig`]s, for the core's
/// onboarding flow ([`keyfold_core::probe::ConfigSlot::upsert`] validates,
/// builds and probes a new config before accepting it).
///
/// The config is the tenant's (key, region, role, external id); the knobs
/// here are the operator's and apply to every wrapper it builds (see
/// [`AwsKmsWrapperBuilder`]): the KMS and STS endpoints, the base
/// credentials, and the AWS accounts a tenant may name. A tenant config that
/// names an endpoint is refused (docs/THREAT_MODEL.md, "Tenant and operator
/// settings").
///
/// ```
/// use keyfold_aws::AwsWrapperFactory;
/// // One factory for the service, narrowed to each tenant's verified account.
/// let service = AwsWrapperFactory::new()
///     .kms_endpoint_url("https://vpce-0a1b2c3d.kms.eu-west-1.vpce.amazonaws.com");
/// let tenant_a = service.clone().allowed_accounts(["111122223333"]);
/// # let _ = tenant_a;
/// ```
#[derive(Clone, Default)]
pub struct AwsWrapperFactory {
    sts_endpoint_url: Option<String>,
    base_credentials: Option<SharedCredentialsProvider>,
    retry: Option<RetryPolicy>,
    kms_endpoint_url: Option<String>,
    allow_loopback: bool,
    allowed_accounts: Option<Vec<String>>,
}

impl fmt::Debug for AwsWrapperFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsWrapperFactory")
            .field("sts_endpoint_url", &self.sts_endpoint_url)
            .field(
                "base_credentials",
                &self.base_credentials.as_ref().map(|_| "******"),
            )
            .field("retry", &self.retry)
            .field("kms_endpoint_url", &self.kms_endpoint_url)
            .field("allow_loopback", &self.allow_loopback)
            .field("allowed_accounts", &self.allowed_accounts)
            .finish()
    }
}

impl AwsWrapperFactory {
    /// A factory using the default credential chain and regional STS.
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`AwsKmsWrapperBuilder::sts_endpoint_url`].
    #[must_use]
    pub fn sts_endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.sts_endpoint_url = Some(url.into());
        self
    }

    /// See [`AwsKmsWrapperBuilder::base_credentials`].
    #[must_use]
    pub fn base_credentials(mut self, provider: impl ProvideCredentials + 'static) -> Self {
        self.base_credentials = Some(SharedCredentialsProvider::new(provider));
        self
    }

    /// See [`AwsKmsWrapperBuilder::retry_policy`].
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// See [`AwsKmsWrapperBuilder::kms_endpoint_url`].
    #[must_use]
    pub fn kms_endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.kms_endpoint_url = Some(url.into());
        self
    }

    /// See [`AwsKmsWrapperBuilder::allow_loopback_endpoints_for_tests`].
    #[must_use]
    pub fn allow_loopback_endpoints_for_tests(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// See [`AwsKmsWrapperBuilder::allowed_accounts`]. A factory is cheap to
    /// clone: narrow a clone to each tenant's accounts before building its
    /// wrapper.
    #[must_use]
    pub fn allowed_accounts<S: Into<String>>(
        mut self,
        accounts: impl IntoIterator<Item = S>,
    ) -> Self {
        self.allowed_accounts = Some(accounts.into_iter().map(Into::into).collect());
        self
    }

    /// A builder for `config` with this factory's knobs applied.
    pub fn builder(&self, config: AwsConfig) -> AwsKmsWrapperBuilder {
        let mut b = AwsKmsWrapper::builder(config);
        b.sts_endpoint_url.clone_from(&self.sts_endpoint_url);
        b.base_credentials.clone_from(&self.base_credentials);
        b.kms_endpoint_url.clone_from(&self.kms_endpoint_url);
        b.allow_loopback = self.allow_loopback;
        b.allowed_accounts.clone_from(&self.allowed_accounts);
        if let Some(policy) = &self.retry {
            b.retry = policy.clone();
        }
        b
    }
}

#[async_trait]
impl WrapperFactory for AwsWrapperFactory {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        match config {
            ProviderConfig::Aws(aws) => Ok(Arc::new(self.builder(aws.clone()).build().await?)),
            other => Err(not_aws(other)),
        }
    }
}

fn not_aws(config: &ProviderConfig) -> WrapError {
    WrapError::new(
        WrapErrorKind::Misconfigured,
        PROVIDER,
        config.kms_key_ref(),
        WrapOperation::Configure,
    )
    .with_message(format!(
        "a {} config was given to the AWS KMS wrapper",
        config.provider()
    ))
}

/// Builds an [`AwsKmsWrapper`], with knobs that are deliberately not part of
/// the serde [`AwsConfig`]: the operator's settings (endpoints, base
/// credentials, allowed accounts) and tests' and instrumentation's.
pub struct AwsKmsWrapperBuilder {
    config: AwsConfig,
    kms_endpoint_url: Option<String>,
    allow_loopback: bool,
    allowed_accounts: Option<Vec<String>>,
    sts_endpoint_url: Option<String>,
    base_credentials: Option<SharedCredentialsProvider>,
    session_name: String,
    retry: RetryPolicy,
    interceptors: Vec<SharedInterceptor>,
    connect_timeout: Duration,
    attempt_timeout: Duration,
}

impl fmt::Debug for AwsKmsWrapperBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsWrapperBuilder")
            .field("config", &self.config)
            .field("kms_endpoint_url", &self.kms_endpoint_url)
            .field("allow_loopback", &self.allow_loopback)
            .field("allowed_accounts", &self.allowed_accounts)
            .field("sts_endpoint_url", &self.sts_endpoint_url)
            .field(
                "base_credentials",
                &self.base_credentials.as_ref().map(|_| "******"),
            )
            .field("session_name", &self.session_name)
            .field("retry", &self.retry)
            .field("interceptors", &self.interceptors.len())
            .finish()
    }
}

impl AwsKmsWrapperBuilder {
    /// Sends KMS requests to this endpoint instead of the regional one: an
    /// operator setting, checked at [`build`](Self::build) by
    /// [`check_kms_endpoint`] (an AWS KMS host of the key's region, FIPS,
    /// dual-stack or VPC endpoint; loopback only with
    /// [`allow_loopback_endpoints_for_tests`](Self::allow_loopback_endpoints_for_tests)).
    #[must_use]
    pub fn kms_endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.kms_endpoint_url = Some(url.into());
        self
    }

    /// The operator's test switch: accept a loopback KMS endpoint (a local
    /// emulator such as moto). Off by default; never turn it on in production.
    #[must_use]
    pub fn allow_loopback_endpoints_for_tests(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// Pins the tenant to these AWS accounts (12-digit ids):
    /// [`build`](Self::build) refuses a role ARN or key ARN in any other
    /// account. An external id protects only roles whose trust policy demands
    /// it; the pin stops a tenant from naming another customer's role or key
    /// at all (docs/THREAT_MODEL.md, "Confused deputy"). Verify the account
    /// out of band when the tenant signs up.
    #[must_use]
    pub fn allowed_accounts<S: Into<String>>(
        mut self,
        accounts: impl IntoIterator<Item = S>,
    ) -> Self {
        self.allowed_accounts = Some(accounts.into_iter().map(Into::into).collect());
        self
    }

    /// Sends STS `AssumeRole` to this endpoint instead of the regional STS
    /// endpoint (an STS VPC endpoint; a local emulator in tests). An
    /// operator setting, checked at build by [`check_sts_endpoint`]
    /// (loopback only with the test switch).
    /// [`kms_endpoint_url`](Self::kms_endpoint_url) applies to KMS only.
    #[must_use]
    pub fn sts_endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.sts_endpoint_url = Some(url.into());
        self
    }

    /// The credentials that call `AssumeRole`, instead of the default
    /// credential chain (environment, web identity, ECS, IMDS). The wrapper
    /// still assumes the config's role: these credentials never call KMS.
    #[must_use]
    pub fn base_credentials(mut self, provider: impl ProvideCredentials + 'static) -> Self {
        self.base_credentials = Some(SharedCredentialsProvider::new(provider));
        self
    }

    /// The STS role session name (default [`DEFAULT_SESSION_NAME`]).
    #[must_use]
    pub fn session_name(mut self, name: impl Into<String>) -> Self {
        self.session_name = name.into();
        self
    }

    /// Retries of throttling and unavailability inside each `wrap` /
    /// `unwrap` (default [`RetryPolicy::none`]: the
    /// [`Keyring`](keyfold_core::keyring::Keyring) already retries around
    /// every KMS call with `keyfold_core::retry`, and retrying in both places
    /// multiplies the attempts). Set one when using the wrapper on its own.
    /// The SDK's own retries are always off.
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Adds an SDK interceptor to the KMS client (metrics, tracing, fault
    /// injection in tests).
    #[must_use]
    pub fn interceptor(mut self, interceptor: impl Intercept + 'static) -> Self {
        self.interceptors.push(SharedInterceptor::new(interceptor));
        self
    }

    /// TCP connect timeout for KMS (default 3 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Timeout of one KMS request attempt (default 10 s).
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Validates the config and builds the wrapper. Makes no network call:
    /// the role is assumed on first use (and again before its credentials expire).
    ///
    /// # Errors
    /// [`WrapErrorKind::Misconfigured`] (operation
    /// [`WrapOperation::Configure`]) with a [`ConfigError`](keyfold_core::config::ConfigError)
    /// source when the config does not validate, names an endpoint (an
    /// operator setting: field `endpoint_url`), names a role or key outside
    /// the [allowed accounts](Self::allowed_accounts), or the operator's
    /// [KMS endpoint](Self::kms_endpoint_url) is refused.
    pub async fn build(self) -> Result<AwsKmsWrapper, WrapError> {
        let config = self.config;
        let misconfigured = |e: keyfold_core::config::ConfigError| {
            WrapError::new(
                WrapErrorKind::Misconfigured,
                PROVIDER,
                &config.kms_key_ref,
                WrapOperation::Configure,
            )
            .with_message(e.to_string())
            .with_source(e)
        };
        config.validate().map_err(misconfigured)?;
        let key = AwsKeyRef::parse(&config.kms_key_ref).map_err(misconfigured)?;
        if config.endpoint_url.is_some() {
            return Err(misconfigured(
                keyfold_core::config::ConfigError::InvalidField {
                    provider: PROVIDER,
                    field: "endpoint_url",
                    reason: "an operator-only setting: a tenant config cannot choose where the \
                         service sends its requests (the operator sets \
                         AwsWrapperFactory::kms_endpoint_url)"
                        .into(),
                },
            ));
        }
        if let Some(url) = &self.kms_endpoint_url {
            check_kms_endpoint(url, &config.region, self.allow_loopback).map_err(misconfigured)?;
        }
        if let Some(url) = &self.sts_endpoint_url {
            check_sts_endpoint(url, &config.region, self.allow_loopback).map_err(misconfigured)?;
        }
        if let Some(allowed) = &self.allowed_accounts {
            operator::check_accounts(&config, allowed).map_err(misconfigured)?;
        }
        let role_account = operator::role_account(&config.role_arn)
            .unwrap_or_default()
            .to_owned();
        let region = Region::new(config.region.clone());

        let timeouts = aws_sdk_kms::config::timeout::TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .operation_attempt_timeout(self.attempt_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region.clone())
            .timeout_config(timeouts.clone())
            .retry_config(aws_sdk_kms::config::retry::RetryConfig::standard());
        if let Some(base) = self.base_credentials {
            loader = loader.credentials_provider(base);
        }
        if let Some(sts) = &self.sts_endpoint_url {
            loader = loader.endpoint_url(sts);
        }
        let base_conf = loader.load().await;
        let mut assume = AssumeRoleProvider::builder(config.role_arn.clone())
            .session_name(self.session_name)
            .region(region.clone());
        if let Some(id) = &config.external_id {
            assume = assume.external_id(id.clone());
        }
        let assumed = assume.configure(&base_conf).build().await;

        let mut kms = aws_sdk_kms::config::Builder::from(&base_conf)
            .region(region)
            .credentials_provider(assumed)
            .timeout_config(timeouts)
            .retry_config(aws_sdk_kms::config::retry::RetryConfig::disabled());
        // The STS endpoint override must not leak to KMS.
        kms.set_endpoint_url(self.kms_endpoint_url.clone());
        for interceptor in self.interceptors {
            kms.push_interceptor(interceptor);
        }
        let client = aws_sdk_kms::Client::from_conf(kms.build());
        Ok(AwsKmsWrapper {
            config,
            key,
            role_account,
            client,
            retry: self.retry,
        })
    }
}

impl AwsKmsWrapper {
    /// A builder for `config`.
    pub fn builder(config: AwsConfig) -> AwsKmsWrapperBuilder {
        AwsKmsWrapperBuilder {
            config,
            kms_endpoint_url: None,
            allow_loopback: false,
            allowed_accounts: None,
            sts_endpoint_url: None,
            base_credentials: None,
            session_name: DEFAULT_SESSION_NAME.to_owned(),
            retry: RetryPolicy::none(),
            interceptors: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
            attempt_timeout: ATTEMPT_TIMEOUT,
        }
    }

    /// A wrapper for `config` with the default credential chain under the
    /// config's role.
    ///
    /// # Errors
    /// [`WrapErrorKind::Misconfigured`] when the config does not validate.
    pub async fn new(config: AwsConfig) -> Result<Self, WrapError> {
        Self::builder(config).build().await
    }

    /// A wrapper from a tagged [`ProviderConfig`], which must be `aws`.
    ///
    /// # Errors
    /// [`WrapErrorKind::Misconfigured`] for another provider or an invalid config.
    pub async fn from_provider_config(config: ProviderConfig) -> Result<Self, WrapError> {
        match config {
            ProviderConfig::Aws(aws) => Self::new(aws).await,
            other => Err(not_aws(&other)),
        }
    }

    /// The config this wrapper was built from.
    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    fn error(&self, kind: WrapErrorKind, op: WrapOperation, message: &str) -> WrapError {
        WrapError::new(kind, PROVIDER, &self.config.kms_key_ref, op).with_message(message)
    }

    /// Checks that `arn` (a key ARN reported by KMS or recorded in a wrapped
    /// key) can be the configured key.
    fn check_key_arn(&self, arn: &str, op: WrapOperation, what: &str) -> Result<(), WrapError> {
        let mismatch = |why: String| {
            self.error(
                WrapErrorKind::KeyMismatch,
                op,
                &format!("{what} {arn:?}: {why}"),
            )
        };
        let Ok(AwsKeyRef::KeyArn {
            region, account, ..
        }) = AwsKeyRef::parse(arn)
        else {
            return Err(mismatch("not a KMS key ARN".into()));
        };
        match &self.key {
            AwsKeyRef::KeyArn { .. } if arn != self.config.kms_key_ref => {
                Err(mismatch("not the configured key".into()))
            }
            AwsKeyRef::AliasArn {
                region: r,
                account: a,
                ..
            } if (r, a) != (&region, &account) => Err(mismatch(format!(
                "not in the configured alias's region {r} and account {a}"
            ))),
            // `alias/NAME` resolves in the caller's account: the assumed role's.
            AwsKeyRef::Alias(_)
                if (&region, &account) != (&self.config.region, &self.role_account) =>
            {
                Err(mismatch(format!(
                    "not in the configured region {} and the role's account {}",
                    self.config.region, self.role_account
                )))
            }
            _ => Ok(()),
        }
    }

    fn encryption_context(context: &WrapContext) -> std::collections::HashMap<String, String> {
        context
            .pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    async fn encrypt_once(
        &self,
        key: &SecretKey,
        context: &WrapContext,
    ) -> Result<WrappedKey, WrapError> {
        let op = WrapOperation::Wrap;
        let out = self
            .client
            .encrypt()
            .key_id(&self.config.kms_key_ref)
            .plaintext(Blob::new(key.expose().to_vec()))
            .set_encryption_context(Some(Self::encryption_context(context)))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| classify_sdk_error(e, &self.config.kms_key_ref, op))?;
        let arn = out
            .key_id()
            .ok_or_else(|| self.error(WrapErrorKind::Unavailable, op, "KMS named no key"))?
            .to_owned();
        self.check_key_arn(&arn, op, "KMS encrypted under")?;
        let bytes = out
            .ciphertext_blob
            .ok_or_else(|| {
                self.error(WrapErrorKind::Unavailable, op, "KMS returned no ciphertext")
            })?
            .into_inner();
        Ok(WrappedKey {
            provider: PROVIDER.to_owned(),
            key_ref: arn,
            kms_key_version: None,
            bytes,
        })
    }

    async fn decrypt_once(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SecretKey, WrapError> {
        let op = WrapOperation::Unwrap;
        let out = self
            .client
            .decrypt()
            .key_id(&self.config.kms_key_ref)
            .ciphertext_blob(Blob::new(wrapped.bytes.clone()))
            .set_encryption_context(Some(Self::encryption_context(context)))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| classify_sdk_error(e, &self.config.kms_key_ref, op))?;
        // Take the plaintext first so it is zeroized whatever happens next.
        let plaintext = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        let arn = out.key_id.unwrap_or_default();
        self.check_response_key(&arn, &wrapped.key_ref)?;
        SecretKey::try_from_slice(&plaintext).map_err(|e| {
            self.error(
                WrapErrorKind::InvalidCiphertext,
                op,
                &format!("KMS returned {} plaintext bytes, expected 32", e.len),
            )
        })
    }

    /// The ARN check on a `Decrypt` response: KMS must report the key the
    /// wrapped key was made with, and that key must be the configured one.
    fn check_response_key(&self, response_arn: &str, recorded_arn: &str) -> Result<(), WrapError> {
        let op = WrapOperation::Unwrap;
        if response_arn.is_empty() {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                "KMS Decrypt response names no key; refusing the plaintext",
            ));
        }
        if response_arn != recorded_arn {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                &format!(
                    "KMS decrypted under {response_arn:?}, but the wrapped key records {recorded_arn:?}; refusing a substituted blob"
                ),
            ));
        }
        self.check_key_arn(response_arn, op, "KMS decrypted under")
    }
}

/// `AwsConfig` for `Debug` with the external id hidden.
impl fmt::Debug for AwsKmsWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsWrapper")
            .field("config", &self.config)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyWrapper for AwsKmsWrapper {
    fn provider(&self) -> &str {
        PROVIDER
    }

    /// The configured key reference (key ARN, alias ARN or `alias/NAME`).
    /// Wrapped keys record the key ARN KMS reports.
    fn key_ref(&self) -> &str {
        &self.config.kms_key_ref
    }

    async fn wrap(&self, key: &SecretKey, context: &WrapContext) -> Result<WrappedKey, WrapError> {
        retry(&self.retry, || self.encrypt_once(key, context)).await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SecretKey, WrapError> {
        let op = WrapOperation::Unwrap;
        if wrapped.provider != PROVIDER {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                &format!(
                    "wrapped by provider {:?} key {:?}, not AWS KMS",
                    wrapped.provider, wrapped.key_ref
                ),
            ));
        }
        self.check_key_arn(&wrapped.key_ref, op, "the wrapped key records")?;
        retry(&self.retry, || self.decrypt_once(wrapped, context)).await
    }
}
