//! [`GcpKmsWrapper`]: `Encrypt` / `Decrypt` on a Cloud KMS CryptoKey.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use gcloud_sdk::google::cloud::kms::v1::DecryptRequest;
use gcloud_sdk::google::cloud::kms::v1::key_management_service_client::KeyManagementServiceClient;
use gcloud_sdk::google_cloud_auth::credentials::{
    Builder as AdcBuilder, Credentials, anonymous, impersonated,
};
use gcloud_sdk::proto_ext::kms::EncryptRequest;
use gcloud_sdk::tonic::metadata::MetadataValue;
use gcloud_sdk::tonic::transport::{ClientTlsConfig, Endpoint};
use gcloud_sdk::{GoogleAuthHeaders, GoogleAuthMiddleware, GoogleAuthMiddlewareLayer, SecretValue};
use keyfold_core::config::{
    ConfigError, Endpoint as EndpointUrl, GcpConfig, GcpKeyRef, ProviderConfig,
};
use keyfold_core::probe::WrapperFactory;
use keyfold_core::retry::RetryPolicy;
use keyfold_core::secret::KEY_LEN;
use keyfold_core::{
    KeyWrapper, SecretKey, WrapContext, WrapError, WrapErrorKind, WrapOperation, WrappedKey,
};
use tower_layer::Layer;

use crate::integrity;
use crate::sleep::{Sleeper, TokioSleeper};
use crate::status::to_wrap_error;
use crate::{DEFAULT_ENDPOINT, KMS_SCOPE, PROVIDER};

type KmsClient = KeyManagementServiceClient<GoogleAuthMiddleware>;

/// Cloud KMS refuses larger ciphertexts (64 KiB of plaintext plus overhead);
/// a wrapped 32-byte key is far smaller, so anything this long is not one.
const MAX_CIPHERTEXT_LEN: usize = 64 * 1024 + 1024;

/// Where the wrapper's access tokens come from.
#[derive(Clone)]
enum CredentialSource {
    /// The ambient identity (ADC: metadata server, workload identity, gcloud
    /// user credentials) impersonating the configured service account.
    Impersonated,
    /// No credentials at all: only for a local test server.
    Anonymous,
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialSource::Impersonated => "ambient identity impersonating the service account",
            CredentialSource::Anonymous => "anonymous (local test server)",
        })
    }
}

/// Builds a [`GcpKmsWrapper`] from a tenant's [`GcpConfig`], with knobs
/// that do not belong in a tenant's config: the operator's endpoint override
/// and its loopback test switch (docs/THREAT_MODEL.md, "Tenant and operator
/// settings"), retries and their clock, timeouts, and anonymous credentials
/// for a local test server.
#[derive(Debug, Clone)]
pub struct GcpKmsWrapperBuilder {
    config: GcpConfig,
    endpoint_url: Option<String>,
    allow_loopback: bool,
    allowed_service_accounts: Option<Vec<String>>,
    credentials: CredentialSource,
    retry: RetryPolicy,
    sleeper: Arc<dyn Sleeper>,
    request_timeout: Duration,
    connect_timeout: Duration,
}

impl GcpKmsWrapperBuilder {
    /// Sends Cloud KMS calls to this endpoint instead of
    /// [`DEFAULT_ENDPOINT`]: an operator setting, checked at
    /// [`build`](Self::build) by [`check_google_endpoint`] (a Google API
    /// host; loopback only with
    /// [`allow_loopback_endpoints_for_tests`](Self::allow_loopback_endpoints_for_tests)).
    #[must_use]
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// The operator's test switch: accept a loopback endpoint (a local test
    /// server). Off by default; never turn it on in production.
    #[must_use]
    pub fn allow_loopback_endpoints_for_tests(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// Pins the tenant to these service accounts: [`build`](Self::build)
    /// refuses a config impersonating any other. The service's ambient
    /// identity can impersonate every service account that granted it the
    /// Token Creator role, whoever names it (docs/THREAT_MODEL.md, "Confused
    /// deputy"): bind each tenant to the accounts verified when it signed up.
    #[must_use]
    pub fn allowed_service_accounts<S: Into<String>>(
        mut self,
        accounts: impl IntoIterator<Item = S>,
    ) -> Self {
        self.allowed_service_accounts = Some(accounts.into_iter().map(Into::into).collect());
        self
    }

    /// Retries of transient failures inside each `wrap` / `unwrap` (default
    /// [`RetryPolicy::none`]: the [`Keyring`](keyfold_core::keyring::Keyring)
    /// already retries around every KMS call, and retrying in both places
    /// multiplies the attempts). Set one when using the wrapper on its own.
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The clock the retry loop waits on (default [`TokioSleeper`]).
    #[must_use]
    pub fn sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }

    /// Deadline of one Cloud KMS call (default 30 s).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Deadline for opening the connection (default 10 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sends no credentials: for a local test server only. [`build`](Self::build)
    /// refuses it unless the [endpoint](Self::endpoint_url) is a plain
    /// `http://` loopback address (which needs the loopback test switch), so
    /// it can never reach Google.
    #[must_use]
    pub fn anonymous_credentials_for_local_server(mut self) -> Self {
        self.credentials = CredentialSource::Anonymous;
        self
    }

    /// Validates the config and prepares the client. The connection is
    /// opened lazily on the first call, so building needs no network; it
    /// must run inside a Tokio runtime.
    ///
    /// # Errors
    /// A [`WrapError`] of kind [`Misconfigured`](WrapErrorKind::Misconfigured)
    /// (operation [`Configure`](WrapOperation::Configure)) when the config is
    /// refused (a tenant config naming `endpoint_url`, an operator-only
    /// setting, included), the operator's endpoint is refused, anonymous
    /// credentials are asked for a non-local endpoint, the ambient
    /// credentials cannot be set up, or there is no Tokio runtime. Refusals
    /// of a setting carry a [`ConfigError`] naming the field as source.
    pub fn build(self) -> Result<GcpKmsWrapper, WrapError> {
        let key_ref = self.config.kms_key_ref.clone();
        let misconfigured = |message: String| {
            WrapError::new(
                WrapErrorKind::Misconfigured,
                PROVIDER,
                &key_ref,
                WrapOperation::Configure,
            )
            .with_message(message)
        };
        let refused = |e: ConfigError| misconfigured(e.to_string()).with_source(e);
        self.config.validate().map_err(refused)?;
        if self.config.endpoint_url.is_some() {
            return Err(refused(ConfigError::InvalidField {
                provider: PROVIDER,
                field: "endpoint_url",
                reason: "an operator-only setting: a tenant config cannot choose where the \
                         service sends its requests (the operator sets \
                         GcpWrapperFactory::endpoint_url)"
                    .into(),
            }));
        }
        let key = GcpKeyRef::parse(&self.config.kms_key_ref).map_err(refused)?;
        if let Some(url) = &self.endpoint_url {
            check_google_endpoint(url, self.allow_loopback).map_err(refused)?;
        }
        if let Some(allowed) = &self.allowed_service_accounts {
            let account = &self.config.impersonate_service_account;
            if !allowed.iter().any(|a| a.eq_ignore_ascii_case(account)) {
                return Err(refused(ConfigError::InvalidField {
                    provider: PROVIDER,
                    field: "impersonate_service_account",
                    reason: format!("{account} is not a service account this tenant may use"),
                }));
            }
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(misconfigured(
                "GcpKmsWrapper must be built inside a Tokio runtime".into(),
            ));
        }
        let endpoint_url = self
            .endpoint_url
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());

        let credentials = match self.credentials {
            CredentialSource::Anonymous => {
                if !is_local_plaintext(&endpoint_url) {
                    return Err(misconfigured(format!(
                        "anonymous credentials are only for a local test server (http://127.0.0.1, http://[::1] or http://localhost), not {endpoint_url}"
                    )));
                }
                anonymous::Builder::new().build()
            }
            CredentialSource::Impersonated => {
                if endpoint_url.starts_with("http://") && !is_local_plaintext(&endpoint_url) {
                    return Err(misconfigured(format!(
                        "endpoint_url {endpoint_url} is plain http, which would send the access token in clear; use https"
                    )));
                }
                impersonated_credentials(&self.config).map_err(|e| {
                    misconfigured(format!(
                        "cannot set up credentials impersonating {}: {e}",
                        self.config.impersonate_service_account
                    ))
                })?
            }
        };

        let mut endpoint = Endpoint::from_shared(endpoint_url.clone())
            .map_err(|e| {
                misconfigured(format!("bad endpoint_url {endpoint_url:?}: {e}")).with_source(e)
            })?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .http2_keep_alive_interval(Duration::from_secs(60))
            .keep_alive_while_idle(true);
        if let Some(host) = https_host(&endpoint_url) {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_webpki_roots().domain_name(host))
                .map_err(|e| {
                    misconfigured(format!("TLS setup for {endpoint_url} failed: {e}"))
                        .with_source(e)
                })?;
        }
        let channel = endpoint.connect_lazy();
        let middleware = GoogleAuthMiddlewareLayer::new(GoogleAuthHeaders::from(credentials), None)
            .map_err(|e| misconfigured(format!("gRPC middleware setup failed: {e}")))?;
        let client = KeyManagementServiceClient::new(middleware.layer(channel));

        let routing = format!("name={}", percent_encode(&key_ref));
        let routing_header = MetadataValue::try_from(routing.as_str())
            .map_err(|e| misconfigured(format!("key name not usable in a header: {e}")))?;

        Ok(GcpKmsWrapper {
            key_ref,
            version_prefix: format!("{}/cryptoKeyVersions/", self.config.kms_key_ref),
            key,
            impersonate_service_account: self.config.impersonate_service_account,
            project_id: self.config.project_id,
            endpoint: endpoint_url,
            credentials: self.credentials,
            client,
            routing_header,
            retry: self.retry,
            sleeper: self.sleeper,
            request_timeout: self.request_timeout,
        })
    }
}

/// The ambient identity (ADC) impersonating the configured service account,
/// scoped to Cloud KMS, billing `project_id` when set.
fn impersonated_credentials(config: &GcpConfig) -> Result<Credentials, String> {
    let source = AdcBuilder::default().build().map_err(|e| e.to_string())?;
    let mut builder = impersonated::Builder::from_source_credentials(source)
        .with_target_principal(config.impersonate_service_account.clone())
        .with_scopes([KMS_SCOPE]);
    if let Some(project) = &config.project_id {
        builder = builder.with_quota_project_id(project.clone());
    }
    builder.build().map_err(|e| e.to_string())
}

/// Checks an operator's Cloud KMS endpoint override: `https://` to a Google
/// API host (`googleapis.com` or a name under it, private and Private Service
/// Connect endpoints included; a fully qualified name's trailing dot is
/// accepted), with no user info. A loopback host (`localhost`,
/// `127.0.0.0/8`, `::1`; a local test server or proxy) is accepted only
/// when `allow_loopback` is set, the operator's test switch. Everything else
/// is refused: each call carries a bearer token for the impersonated service
/// account, usable anywhere.
///
/// ```
/// use keyfold_gcp::check_google_endpoint;
/// check_google_endpoint("https://cloudkms.googleapis.com", false)?;
/// check_google_endpoint("https://cloudkms-myendpoint.p.googleapis.com", false)?;
/// assert!(check_google_endpoint("https://169.254.169.254", false).is_err());
/// assert!(check_google_endpoint("http://127.0.0.1:9090", false).is_err());
/// check_google_endpoint("http://127.0.0.1:9090", true)?;
/// # Ok::<(), keyfold_core::config::ConfigError>(())
/// ```
///
/// # Errors
/// [`ConfigError::InvalidField`] (field `endpoint_url`) saying what is accepted.
pub fn check_google_endpoint(url: &str, allow_loopback: bool) -> Result<(), ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidField {
        provider: PROVIDER,
        field: "endpoint_url",
        reason: reason.to_owned(),
    };
    let only_authority = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .is_some_and(|rest| match rest.find(['/', '?', '#']) {
            None => true,
            Some(i) => rest.get(i..) == Some("/"),
        });
    let Some(endpoint) = EndpointUrl::parse(url).filter(|_| only_authority) else {
        return Err(invalid(
            "must be https://HOST[:PORT] with a plain host, no user info and no path",
        ));
    };
    if endpoint.is_loopback() {
        return if allow_loopback {
            Ok(())
        } else {
            Err(invalid(
                "a loopback endpoint is accepted only when the operator allows loopback endpoints for tests",
            ))
        };
    }
    // A fully qualified name may end in one dot.
    let host = endpoint.host.strip_suffix('.').unwrap_or(endpoint.host);
    let host = host.to_ascii_lowercase();
    let google = host == "googleapis.com"
        || host
            .strip_suffix(".googleapis.com")
            .is_some_and(|sub| !sub.is_empty() && sub.split('.').all(|l| !l.is_empty()));
    if endpoint.https && google {
        Ok(())
    } else {
        Err(invalid(
            "must be https:// to a Google API host (*.googleapis.com): \
             each call carries a bearer token for the service account",
        ))
    }
}

fn https_host(url: &str) -> Option<String> {
    EndpointUrl::parse(url)
        .filter(|e| e.https)
        // The certificate names the host without a fully qualified name's dot.
        .map(|e| e.host.strip_suffix('.').unwrap_or(e.host).to_owned())
}

fn is_local_plaintext(url: &str) -> bool {
    EndpointUrl::parse(url).is_some_and(|e| !e.https && e.is_loopback())
}

/// Percent-encodes a resource name for `x-goog-request-params`, as Google's
/// client libraries do (`/` becomes `%2F`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Wraps keyfold master keys with Google Cloud KMS `Encrypt` and unwraps them
/// with `Decrypt`, on one symmetric CryptoKey.
///
/// - Each call binds the [`WrapContext`] (keyring id and master key version)
///   as `additional_authenticated_data`, so a wrapped key moved to another
///   keyring or version fails at the KMS.
/// - Each call sends CRC32C checksums of its inputs and checks the service's
///   `verified_*` flags and the checksums it returns; a mismatch is an error
///   (transient: the response is discarded and the call retried a limited
///   number of times, as Google advises), never a silent success.
/// - The CryptoKeyVersion that Cloud KMS reports for a wrap is recorded in
///   [`WrappedKey::kms_key_version`].
///
/// `Debug` shows the key, endpoint and service account, never a token.
pub struct GcpKmsWrapper {
    key_ref: String,
    version_prefix: String,
    key: GcpKeyRef,
    impersonate_service_account: String,
    project_id: Option<String>,
    endpoint: String,
    credentials: CredentialSource,
    client: KmsClient,
    routing_header: MetadataValue<gcloud_sdk::tonic::metadata::Ascii>,
    retry: RetryPolicy,
    sleeper: Arc<dyn Sleeper>,
    request_timeout: Duration,
}

impl GcpKmsWrapper {
    /// A builder starting from `config`.
    pub fn builder(config: GcpConfig) -> GcpKmsWrapperBuilder {
        GcpKmsWrapperBuilder {
            config,
            endpoint_url: None,
            allow_loopback: false,
            allowed_service_accounts: None,
            credentials: CredentialSource::Impersonated,
            retry: RetryPolicy::none(),
            sleeper: Arc::new(TokioSleeper),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// A wrapper for `config` with default settings.
    ///
    /// # Errors
    /// As [`GcpKmsWrapperBuilder::build`].
    pub fn from_config(config: &GcpConfig) -> Result<Self, WrapError> {
        Self::builder(config.clone()).build()
    }

    /// A wrapper for a provider config that must be a `gcp` one.
    ///
    /// # Errors
    /// [`Misconfigured`](WrapErrorKind::Misconfigured) for another provider's
    /// config; otherwise as [`GcpKmsWrapperBuilder::build`].
    pub fn from_provider_config(config: &ProviderConfig) -> Result<Self, WrapError> {
        match config {
            ProviderConfig::Gcp(gcp) => Self::from_config(gcp),
            other => Err(WrapError::new(
                WrapErrorKind::Misconfigured,
                PROVIDER,
                other.kms_key_ref(),
                WrapOperation::Configure,
            )
            .with_message(format!(
                "the config is for provider {:?}; a Cloud KMS wrapper needs a gcp config",
                other.provider()
            ))),
        }
    }

    /// The parsed CryptoKey name.
    pub fn crypto_key(&self) -> &GcpKeyRef {
        &self.key
    }

    /// The service account whose identity calls Cloud KMS.
    pub fn impersonate_service_account(&self) -> &str {
        &self.impersonate_service_account
    }

    /// The gRPC endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn error(
        &self,
        kind: WrapErrorKind,
        op: WrapOperation,
        message: impl Into<String>,
    ) -> WrapError {
        WrapError::new(kind, PROVIDER, &self.key_ref, op).with_message(message)
    }

    fn integrity_error(&self, op: WrapOperation, what: &str) -> WrapError {
        self.error(
            WrapErrorKind::Unavailable,
            op,
            format!("CRC32C integrity check failed: {what}; the response was discarded"),
        )
    }

    fn request<T>(&self, message: T) -> gcloud_sdk::tonic::Request<T> {
        let mut request = gcloud_sdk::tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("x-goog-request-params", self.routing_header.clone());
        request
    }

    async fn encrypt_once(&self, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey, WrapError> {
        let op = WrapOperation::Wrap;
        let request = EncryptRequest {
            name: self.key_ref.clone(),
            plaintext: SecretValue::new(key.expose().to_vec()),
            additional_authenticated_data: aad.to_vec(),
            plaintext_crc32c: Some(integrity::crc32c(key.expose())),
            additional_authenticated_data_crc32c: Some(integrity::crc32c(aad)),
        };
        let mut client = self.client.clone();
        let response = self
            .deadline(op, client.encrypt(self.request(request)))
            .await?
            .map_err(|s| to_wrap_error(s, &self.key_ref, op))?
            .into_inner();
        if !response.verified_plaintext_crc32c {
            return Err(self.integrity_error(op, "Cloud KMS did not verify plaintext_crc32c"));
        }
        if !response.verified_additional_authenticated_data_crc32c {
            return Err(self.integrity_error(
                op,
                "Cloud KMS did not verify additional_authenticated_data_crc32c",
            ));
        }
        if !integrity::matches(&response.ciphertext, response.ciphertext_crc32c) {
            return Err(self.integrity_error(
                op,
                "the returned ciphertext does not match ciphertext_crc32c",
            ));
        }
        if !self.is_own_version(&response.name) {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                format!(
                    "Cloud KMS reports encrypting with {:?}, which is not a version of this key",
                    response.name
                ),
            ));
        }
        if response.ciphertext.is_empty() || response.ciphertext.len() > MAX_CIPHERTEXT_LEN {
            return Err(self.error(
                WrapErrorKind::InvalidCiphertext,
                op,
                format!(
                    "Cloud KMS returned a {}-byte ciphertext",
                    response.ciphertext.len()
                ),
            ));
        }
        Ok(WrappedKey {
            provider: PROVIDER.to_owned(),
            key_ref: self.key_ref.clone(),
            kms_key_version: Some(response.name),
            bytes: response.ciphertext,
        })
    }

    async fn decrypt_once(&self, ciphertext: &[u8], aad: &[u8]) -> Result<SecretKey, WrapError> {
        let op = WrapOperation::Unwrap;
        let request = DecryptRequest {
            name: self.key_ref.clone(),
            ciphertext: ciphertext.to_vec(),
            additional_authenticated_data: aad.to_vec(),
            ciphertext_crc32c: Some(integrity::crc32c(ciphertext)),
            additional_authenticated_data_crc32c: Some(integrity::crc32c(aad)),
        };
        let mut client = self.client.clone();
        let response = self
            .deadline(op, client.decrypt(self.request(request)))
            .await?
            .map_err(|s| to_wrap_error(s, &self.key_ref, op))?
            .into_inner();
        let plaintext = response.plaintext.as_sensitive_bytes();
        if !integrity::matches(plaintext, response.plaintext_crc32c) {
            return Err(
                self.integrity_error(op, "the returned plaintext does not match plaintext_crc32c")
            );
        }
        SecretKey::try_from_slice(plaintext).map_err(|e| {
            self.error(
                WrapErrorKind::InvalidCiphertext,
                op,
                format!(
                    "Cloud KMS decrypted {} bytes, not a {KEY_LEN}-byte key",
                    e.len
                ),
            )
        })
    }

    /// Runs `call` under the retry policy, waiting on the injected clock.
    async fn with_retry<T, F, Fut>(&self, call: F) -> Result<T, WrapError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, WrapError>>,
    {
        keyfold_core::retry::retry_with(&self.retry, &*self.sleeper, call).await
    }

    /// Runs one call under the request deadline, which also covers getting
    /// the access token (the channel's own timeout starts after that).
    async fn deadline<T>(
        &self,
        op: WrapOperation,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, WrapError> {
        tokio::time::timeout(self.request_timeout, call)
            .await
            .map_err(|_| {
                self.error(
                    WrapErrorKind::Unavailable,
                    op,
                    format!(
                        "no answer from Cloud KMS within {:?} (token or call)",
                        self.request_timeout
                    ),
                )
            })
    }

    fn is_own_version(&self, name: &str) -> bool {
        name.strip_prefix(&self.version_prefix)
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
    }
}

impl fmt::Debug for GcpKmsWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpKmsWrapper")
            .field("key_ref", &self.key_ref)
            .field(
                "impersonate_service_account",
                &self.impersonate_service_account,
            )
            .field("project_id", &self.project_id)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .field("retry", &self.retry)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyWrapper for GcpKmsWrapper {
    fn provider(&self) -> &str {
        PROVIDER
    }

    fn key_ref(&self) -> &str {
        &self.key_ref
    }

    async fn wrap(&self, key: &SecretKey, context: &WrapContext) -> Result<WrappedKey, WrapError> {
        let aad = context.to_aad();
        self.with_retry(|| self.encrypt_once(key, &aad)).await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SecretKey, WrapError> {
        let op = WrapOperation::Unwrap;
        if wrapped.provider != PROVIDER || wrapped.key_ref != self.key_ref {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                format!(
                    "wrapped by {} key {:?}, this wrapper uses {:?}",
                    wrapped.provider, wrapped.key_ref, self.key_ref
                ),
            ));
        }
        if let Some(version) = wrapped
            .kms_key_version
            .as_deref()
            .filter(|v| !self.is_own_version(v))
        {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                format!("recorded key version {version:?} is not a version of this key"),
            ));
        }
        if wrapped.bytes.is_empty() || wrapped.bytes.len() > MAX_CIPHERTEXT_LEN {
            return Err(self.error(
                WrapErrorKind::InvalidCiphertext,
                op,
                format!(
                    "a {}-byte ciphertext cannot be a wrapped key",
                    wrapped.bytes.len()
                ),
            ));
        }
        let aad = context.to_aad();
        self.with_retry(|| self.decrypt_once(&wrapped.bytes, &aad))
            .await
    }
}

/// Builds [`GcpKmsWrapper`]s from `gcp` provider configs, for
/// [`ConfigSlot::upsert`](keyfold_core::probe::ConfigSlot::upsert) and hosts
/// that compose one factory per provider. The config is the tenant's (key,
/// service account, billing project); the knobs are the operator's, those of
/// [`GcpKmsWrapperBuilder`], applied to every wrapper it builds.
#[derive(Debug, Clone)]
pub struct GcpWrapperFactory {
    template: GcpKmsWrapperBuilder,
}

impl Default for GcpWrapperFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl GcpWrapperFactory {
    /// A factory with default settings (impersonation, no retries inside the wrapper).
    pub fn new() -> Self {
        GcpWrapperFactory {
            template: GcpKmsWrapper::builder(GcpConfig {
                kms_key_ref: String::new(),
                impersonate_service_account: String::new(),
                project_id: None,
                endpoint_url: None,
            }),
        }
    }

    /// As [`GcpKmsWrapperBuilder::retry_policy`].
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.template = self.template.retry_policy(policy);
        self
    }

    /// As [`GcpKmsWrapperBuilder::sleeper`].
    #[must_use]
    pub fn sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.template = self.template.sleeper(sleeper);
        self
    }

    /// As [`GcpKmsWrapperBuilder::endpoint_url`]: the operator's endpoint
    /// for every wrapper this factory builds.
    #[must_use]
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.template = self.template.endpoint_url(url);
        self
    }

    /// As [`GcpKmsWrapperBuilder::allow_loopback_endpoints_for_tests`].
    #[must_use]
    pub fn allow_loopback_endpoints_for_tests(mut self, allow: bool) -> Self {
        self.template = self.template.allow_loopback_endpoints_for_tests(allow);
        self
    }

    /// As [`GcpKmsWrapperBuilder::allowed_service_accounts`]. A factory is
    /// cheap to clone: narrow a clone to each tenant's accounts.
    #[must_use]
    pub fn allowed_service_accounts<S: Into<String>>(
        mut self,
        accounts: impl IntoIterator<Item = S>,
    ) -> Self {
        self.template = self.template.allowed_service_accounts(accounts);
        self
    }

    /// As [`GcpKmsWrapperBuilder::request_timeout`].
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.template = self.template.request_timeout(timeout);
        self
    }

    /// As [`GcpKmsWrapperBuilder::anonymous_credentials_for_local_server`].
    #[must_use]
    pub fn anonymous_credentials_for_local_server(mut self) -> Self {
        self.template = self.template.anonymous_credentials_for_local_server();
        self
    }

    /// The wrapper for `config`.
    ///
    /// # Errors
    /// As [`GcpKmsWrapper::from_provider_config`].
    pub fn build_wrapper(&self, config: &ProviderConfig) -> Result<GcpKmsWrapper, WrapError> {
        let ProviderConfig::Gcp(gcp) = config else {
            return GcpKmsWrapper::from_provider_config(config);
        };
        GcpKmsWrapperBuilder {
            config: gcp.clone(),
            ..self.template.clone()
        }
        .build()
    }
}

#[async_trait]
impl WrapperFactory for GcpWrapperFactory {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        Ok(Arc::new(self.build_wrapper(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_plaintext_endpoints() {
        assert!(is_local_plaintext("http://127.0.0.1:8080"));
        assert!(is_local_plaintext("http://localhost:1"));
        assert!(is_local_plaintext("http://[::1]:9"));
        assert!(is_local_plaintext("http://127.0.0.1"));
        assert!(!is_local_plaintext("http://127.0.0.1.evil.example:80"));
        assert!(!is_local_plaintext("https://127.0.0.1:8080"));
        assert!(!is_local_plaintext("http://cloudkms.googleapis.com"));
        assert!(!is_local_plaintext("http://localhost.example"));
        assert!(!is_local_plaintext("http://127.0.0.1:80@kms.evil.example"));
        assert!(!is_local_plaintext("http://localhost@kms.evil.example"));
    }

    #[test]
    fn https_hosts() {
        assert_eq!(
            https_host("https://cloudkms.googleapis.com").as_deref(),
            Some("cloudkms.googleapis.com")
        );
        assert_eq!(
            https_host("https://kms.p.googleapis.com:443/x").as_deref(),
            Some("kms.p.googleapis.com")
        );
        assert_eq!(https_host("https://[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(https_host("http://x"), None);
    }

    #[test]
    fn routing_header_is_percent_encoded() {
        assert_eq!(
            percent_encode("projects/p/locations/l/keyRings/r/cryptoKeys/k"),
            "projects%2Fp%2Flocations%2Fl%2FkeyRings%2Fr%2FcryptoKeys%2Fk"
        );
    }
}
