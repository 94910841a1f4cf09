//! [`AzureKeyWrapper`]: keyfold's [`KeyWrapper`] over Key Vault `wrapKey` /
//! `unwrapKey`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RequestContent, RetryOptions, Transport};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, KeyClientGetKeyOptions, KeyClientWrapKeyOptions, KeyOperationParameters,
    KeyOperationResult, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use keyfold_core::config::{AzureConfig, AzureKeyRef, ConfigError, Endpoint};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::{
    KeyWrapper, SecretKey, WrapContext, WrapError, WrapErrorKind, WrapOperation, WrappedKey,
};
use zeroize::{Zeroize, Zeroizing};

use crate::PROVIDER;
use crate::credential::{AzureIdentity, CredentialSource, EnvLookup, process_env};
use crate::errors::{map_sdk_error, own_error};
use crate::kid::KeyId;
use crate::sleep::{Sleeper, TokioSleeper};

/// The Key Vault key-wrapping algorithm a wrapper uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WrapAlgorithm {
    /// RSA-OAEP with SHA-256 and MGF1-SHA-256: RSA keys (`RSA`, `RSA-HSM`), in
    /// a vault or a Managed HSM. Randomized: two wraps of one key differ.
    RsaOaep256,
    /// AES key wrap (RFC 3394) with a 256-bit key: AES keys (`oct-HSM`) in a
    /// Managed HSM. Deterministic: two wraps of one key are equal.
    A256Kw,
}

impl WrapAlgorithm {
    /// The JOSE name Key Vault uses (`RSA-OAEP-256`, `A256KW`).
    pub fn as_str(self) -> &'static str {
        match self {
            WrapAlgorithm::RsaOaep256 => "RSA-OAEP-256",
            WrapAlgorithm::A256Kw => "A256KW",
        }
    }

    fn sdk(self) -> EncryptionAlgorithm {
        match self {
            WrapAlgorithm::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
            WrapAlgorithm::A256Kw => EncryptionAlgorithm::A256Kw,
        }
    }

    /// The algorithm for a key of type `kty`, if it can wrap.
    fn for_key_type(kty: &KeyType) -> Option<Self> {
        match kty {
            KeyType::Rsa | KeyType::RsaHsm => Some(WrapAlgorithm::RsaOaep256),
            KeyType::Oct | KeyType::OctHsm => Some(WrapAlgorithm::A256Kw),
            _ => None,
        }
    }
}

impl fmt::Display for WrapAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wraps keyfold master keys under an Azure Key Vault or Managed HSM key.
///
/// - **Wrap** calls `wrapKey` on the configured key (its pinned version, or
///   the latest) and records the full versioned `kid` that Key Vault returns
///   in [`WrappedKey::kms_key_version`].
/// - **Unwrap** calls `unwrapKey` on exactly that recorded version, so
///   rotating the Key Vault key (a new version) leaves every earlier wrap
///   unwrappable for as long as its version stays enabled.
/// - **Algorithm**: `RSA-OAEP-256` for RSA keys; `A256KW` for AES keys in a
///   Managed HSM. For a `*.vault.azure.net` key it is `RSA-OAEP-256` (vaults
///   hold no AES keys); for a `*.managedhsm.azure.net` key the wrapper reads
///   the key's type once with `get` (the Crypto User role grants it) unless
///   [`AzureKeyWrapperBuilder::algorithm`] pins it.
///
/// # No AAD: the binding lives in keyfold's key check value
///
/// Unlike AWS KMS (encryption context) and Cloud KMS (AAD), Key Vault's
/// `wrapKey` takes no associated data, so the KMS does not bind a wrapped
/// master key to its keyring (tenant) or master key version: the
/// [`WrapContext`] is ignored here, and a wrapped blob copied to another
/// keyring entry would unwrap at the KMS. The record header's AEAD does not
/// close this on its own (a version holding another version's key seals and
/// opens consistently); the keyring does, by checking every unwrapped key
/// against the key check value stored with its version, which binds the
/// key to its keyring and version (docs/THREAT_MODEL.md, "Provider
/// differences"). Run the conformance suite with `binds_context: false`.
///
/// # Secrets in memory
///
/// `Debug` shows the key, endpoint, credential kind and algorithm; never a
/// secret or token. keyfold zeroizes its own copies of a master key, but the
/// plaintext also passes through the SDK's JSON request body (wrap) and
/// response body (unwrap), buffers the SDK does not zeroize.
pub struct AzureKeyWrapper {
    key: AzureKeyRef,
    key_ref: String,
    endpoint: String,
    client: KeyClient,
    credential: CredentialSource,
    pinned_algorithm: Option<WrapAlgorithm>,
    algorithm: tokio::sync::OnceCell<WrapAlgorithm>,
    retry: RetryPolicy,
    sleeper: Arc<dyn Sleeper>,
}

impl fmt::Debug for AzureKeyWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKeyWrapper")
            .field("key_ref", &self.key_ref)
            .field("endpoint", &self.endpoint)
            .field("credential", &self.credential)
            .field(
                "algorithm",
                &self.pinned_algorithm.or(self.algorithm.get().copied()),
            )
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Builds an [`AzureKeyWrapper`] from a tenant's [`AzureConfig`], with the
/// knobs a tenant's config must not hold: the operator's settings (the
/// identity, an endpoint override and its loopback test switch, the Entra
/// tenants and vaults a tenant may name; docs/THREAT_MODEL.md, "Tenant and
/// operator settings"), an explicit credential, the HTTP transport (proxies,
/// private CAs, tests), the Entra authority host (sovereign clouds, tests),
/// the challenge-resource check, the algorithm, the retry policy and its
/// clock.
pub struct AzureKeyWrapperBuilder {
    config: AzureConfig,
    identity: AzureIdentity,
    endpoint_url: Option<String>,
    allow_loopback: bool,
    allowed_tenant_ids: Option<Vec<String>>,
    allowed_vaults: Option<Vec<String>>,
    credential: Option<Arc<dyn TokenCredential>>,
    env: EnvLookup,
    transport: Option<Transport>,
    authority_host: Option<String>,
    verify_challenge_resource: bool,
    algorithm: Option<WrapAlgorithm>,
    retry: RetryPolicy,
    sleeper: Arc<dyn Sleeper>,
}

impl fmt::Debug for AzureKeyWrapperBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKeyWrapperBuilder")
            .field("config", &self.config)
            .field("identity", &self.identity)
            .field("endpoint_url", &self.endpoint_url)
            .field("allow_loopback", &self.allow_loopback)
            .field("allowed_tenant_ids", &self.allowed_tenant_ids)
            .field("allowed_vaults", &self.allowed_vaults)
            .field("custom_credential", &self.credential.is_some())
            .field("authority_host", &self.authority_host)
            .field("verify_challenge_resource", &self.verify_challenge_resource)
            .field("algorithm", &self.algorithm)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl AzureKeyWrapperBuilder {
    /// The operator's Entra identity (default [`AzureIdentity::Ambient`]).
    #[must_use]
    pub fn identity(mut self, identity: AzureIdentity) -> Self {
        self.identity = identity;
        self
    }

    /// Sends requests to this endpoint instead of the config's vault URL: an
    /// operator setting, checked at [`build`](Self::build) by
    /// [`check_vault_endpoint`] (the key's own vault host; loopback only with
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

    /// Pins the tenant to these Entra tenant (directory) ids:
    /// [`build`](Self::build) refuses a config, or a workload identity, that
    /// authenticates in any other. Key Vault has no external id: a
    /// multi-tenant app's service principal can reach every customer's vault
    /// that granted it, whoever names it (docs/THREAT_MODEL.md, "Confused
    /// deputy"). Verify the directory out of band when the tenant signs up.
    #[must_use]
    pub fn allowed_tenant_ids<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.allowed_tenant_ids = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// Pins the tenant to these vaults (`https://NAME.vault.azure.net` or
    /// `https://NAME.managedhsm.azure.net`): [`build`](Self::build) refuses a
    /// key in any other. With a managed identity, which every tenant shares,
    /// this is what stops a tenant from naming another customer's key.
    #[must_use]
    pub fn allowed_vaults<S: Into<String>>(mut self, vaults: impl IntoIterator<Item = S>) -> Self {
        self.allowed_vaults = Some(vaults.into_iter().map(Into::into).collect());
        self
    }

    /// Authenticate with `credential` instead of the one the operator's
    /// [identity](Self::identity) selects.
    #[must_use]
    pub fn credential(mut self, credential: Arc<dyn TokenCredential>) -> Self {
        self.credential = Some(credential);
        self
    }

    /// Send every request (Key Vault and Entra ID) through `transport`, e.g. a
    /// `reqwest::Client` with a proxy or a private root CA. Default: the SDK's
    /// `reqwest` client with the system's roots.
    #[must_use]
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The Entra ID authority for the selected credential, e.g.
    /// `https://login.microsoftonline.us`. Default: the public cloud (or
    /// `AZURE_AUTHORITY_HOST`).
    #[must_use]
    pub fn authority_host(mut self, url: impl Into<String>) -> Self {
        self.authority_host = Some(url.into());
        self
    }

    /// Whether the resource named in the vault's 401 challenge must be a
    /// parent domain of the vault's host (default `true`). Turn it off only
    /// for a vault reached under another name, such as a local test server on
    /// `localhost`.
    #[must_use]
    pub fn verify_challenge_resource(mut self, verify: bool) -> Self {
        self.verify_challenge_resource = verify;
        self
    }

    /// Pin the wrapping algorithm instead of choosing it from the key's type.
    #[must_use]
    pub fn algorithm(mut self, algorithm: WrapAlgorithm) -> Self {
        self.algorithm = Some(algorithm);
        self
    }

    /// Retries of throttled (429) and unavailable (5xx, connection) calls
    /// inside each `wrap` / `unwrap` (default [`RetryPolicy::none`]: the
    /// [`Keyring`](keyfold_core::keyring::Keyring) already retries around
    /// every KMS call, and retrying in both places multiplies the attempts).
    /// Set one when using the wrapper on its own. The SDK's own retries are
    /// always off.
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

    /// Where environment variables (the operator's client secret variable,
    /// workload identity's) are read from. Default: the process environment.
    #[must_use]
    pub fn environment(
        mut self,
        lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.env = Arc::new(lookup);
        self
    }

    /// Validates the config and builds the wrapper. Makes no network call:
    /// the first wrap or unwrap meets the vault's challenge and gets a token.
    ///
    /// # Errors
    /// [`WrapErrorKind::Misconfigured`] (operation `configure`) when the config
    /// is invalid, names an operator-only setting (`endpoint_url`,
    /// `client_secret_env_var`), a `client_id` other than the operator's
    /// identity's, or an Entra tenant or vault outside the operator's pins,
    /// when the operator's endpoint is refused or not HTTPS, the client
    /// secret's variable is unset or empty, or the credential cannot be built.
    /// Refusals of a setting carry a [`ConfigError`] naming the field as source.
    pub fn build(self) -> Result<AzureKeyWrapper, WrapError> {
        let refused = |message: String| {
            own_error(
                WrapErrorKind::Misconfigured,
                &self.config.kms_key_ref,
                WrapOperation::Configure,
                message,
            )
        };
        let refused_config = |e: ConfigError| refused(e.to_string()).with_source(e);
        self.config.validate().map_err(refused_config)?;
        for (field, set) in [
            ("endpoint_url", self.config.endpoint_url.is_some()),
            (
                "client_secret_env_var",
                self.config.client_secret_env_var.is_some(),
            ),
        ] {
            if set {
                return Err(refused_config(ConfigError::InvalidField {
                    provider: PROVIDER,
                    field,
                    reason: "an operator-only setting: a tenant config cannot choose where the \
                             service sends its requests or which of its secrets it uses (the \
                             operator sets it on the AzureFactory)"
                        .into(),
                }));
            }
        }
        let key = AzureKeyRef::parse(&self.config.kms_key_ref).map_err(refused_config)?;
        if let Some(allowed) = &self.allowed_vaults {
            let ok = allowed
                .iter()
                .any(|v| v.trim_end_matches('/').eq_ignore_ascii_case(&key.vault_url));
            if !ok {
                return Err(refused_config(ConfigError::InvalidField {
                    provider: PROVIDER,
                    field: "kms_key_ref",
                    reason: format!("the vault {} is not one this tenant may use", key.vault_url),
                }));
            }
        }
        if let Some(url) = &self.endpoint_url {
            check_vault_endpoint(url, &key, self.allow_loopback).map_err(refused_config)?;
        }
        let endpoint = self
            .endpoint_url
            .as_deref()
            .unwrap_or(&self.config.vault_url)
            .trim_end_matches('/')
            .to_owned();
        if !endpoint.starts_with("https://") {
            return Err(refused(format!(
                "endpoint {endpoint} is not https: Key Vault tokens are only sent over TLS"
            )));
        }
        if let Some(host) = &self.authority_host
            && !host.starts_with("https://")
        {
            return Err(refused(format!("authority host {host} is not https")));
        }
        // The SDK's retries are off (its default retries a refused connection
        // for over a minute); keyfold's policy is the only retry loop.
        let client_options = ClientOptions {
            retry: RetryOptions::none(),
            transport: self.transport.clone(),
            ..ClientOptions::default()
        };
        let source = match &self.credential {
            Some(_) => CredentialSource::Custom,
            None => CredentialSource::select(&self.config, &self.identity, &self.env)
                .map_err(refused_config)?,
        };
        if let Some(allowed) = &self.allowed_tenant_ids {
            let named = [self.config.azure_tenant_id.as_deref(), source.tenant_id()];
            if let Some(tenant) = named
                .into_iter()
                .flatten()
                .find(|t| !allowed.iter().any(|a| a.eq_ignore_ascii_case(t)))
            {
                return Err(refused_config(ConfigError::InvalidField {
                    provider: PROVIDER,
                    field: "azure_tenant_id",
                    reason: format!("the Entra tenant {tenant} is not one this tenant may use"),
                }));
            }
        }
        let credential = match self.credential.clone() {
            Some(credential) => credential,
            None => {
                let mut options = client_options.clone();
                if let Some(host) = &self.authority_host {
                    let mut custom = CustomConfiguration::default();
                    custom.authority_host.clone_from(host);
                    options.cloud = Some(Arc::new(CloudConfiguration::from(custom)));
                }
                source.build(&self.env, options).map_err(&refused)?
            }
        };
        let options = KeyClientOptions {
            client_options,
            verify_challenge_resource: Some(self.verify_challenge_resource),
            ..KeyClientOptions::default()
        };
        let client = KeyClient::new(&endpoint, credential, Some(options)).map_err(|e| {
            refused(format!("cannot build the Key Vault client: {e}")).with_source(e)
        })?;
        let pinned_algorithm = self.algorithm.or_else(|| {
            let host = key.vault_url.to_ascii_lowercase();
            host.ends_with(".vault.azure.net")
                .then_some(WrapAlgorithm::RsaOaep256)
        });
        Ok(AzureKeyWrapper {
            key_ref: key.to_string(),
            key,
            endpoint,
            client,
            credential: source,
            pinned_algorithm,
            algorithm: tokio::sync::OnceCell::new(),
            retry: self.retry,
            sleeper: self.sleeper,
        })
    }
}

impl AzureKeyWrapper {
    /// A wrapper for `config` with the default operator settings: the
    /// [`AzureIdentity::Ambient`] identity (workload identity when
    /// `AZURE_FEDERATED_TOKEN_FILE` is set, else the system-assigned managed
    /// identity) and the config's vault URL as endpoint.
    ///
    /// # Errors
    /// As [`AzureKeyWrapperBuilder::build`].
    pub fn from_config(config: &AzureConfig) -> Result<Self, WrapError> {
        Self::builder(config).build()
    }

    /// A builder starting from `config`.
    pub fn builder(config: &AzureConfig) -> AzureKeyWrapperBuilder {
        AzureKeyWrapperBuilder {
            config: config.clone(),
            identity: AzureIdentity::default(),
            endpoint_url: None,
            allow_loopback: false,
            allowed_tenant_ids: None,
            allowed_vaults: None,
            credential: None,
            env: process_env(),
            transport: None,
            authority_host: None,
            verify_challenge_resource: true,
            algorithm: None,
            retry: RetryPolicy::none(),
            sleeper: Arc::new(TokioSleeper),
        }
    }

    /// The configured key.
    pub fn key(&self) -> &AzureKeyRef {
        &self.key
    }

    /// Where requests go: the operator's endpoint override, else the config's `vault_url`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// How the wrapper authenticates.
    pub fn credential_source(&self) -> &CredentialSource {
        &self.credential
    }

    /// The wrapping algorithm, asking the Managed HSM for the key's type the
    /// first time when it was not pinned.
    ///
    /// # Errors
    /// A [`WrapError`] from `get`, or [`WrapErrorKind::Misconfigured`] when the
    /// key cannot wrap (an EC key).
    pub async fn algorithm(&self) -> Result<WrapAlgorithm, WrapError> {
        self.algorithm_for(WrapOperation::Configure).await
    }

    async fn algorithm_for(&self, op: WrapOperation) -> Result<WrapAlgorithm, WrapError> {
        if let Some(alg) = self.pinned_algorithm {
            return Ok(alg);
        }
        self.algorithm
            .get_or_try_init(|| async {
                let key = self
                    .with_retry(|| async {
                        let options = KeyClientGetKeyOptions {
                            key_version: self.key.version.clone(),
                            ..Default::default()
                        };
                        self.client
                            .get_key(&self.key.name, Some(options))
                            .await
                            .and_then(|r| r.into_model())
                            .map_err(|e| map_sdk_error(e, &self.key_ref, op))
                    })
                    .await?;
                let kty = key.key.and_then(|k| k.kty);
                kty.as_ref()
                    .and_then(WrapAlgorithm::for_key_type)
                    .ok_or_else(|| {
                        self.error(
                            WrapErrorKind::Misconfigured,
                            op,
                            format!(
                                "key type {kty:?} cannot wrap keys; use an RSA key or a Managed HSM AES (oct-HSM) key"
                            ),
                        )
                    })
            })
            .await
            .copied()
    }

    fn error(
        &self,
        kind: WrapErrorKind,
        op: WrapOperation,
        message: impl Into<String>,
    ) -> WrapError {
        own_error(kind, &self.key_ref, op, message)
    }

    /// Runs `call` under the retry policy, waiting on the injected clock.
    async fn with_retry<T, F, Fut>(&self, call: F) -> Result<T, WrapError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, WrapError>>,
    {
        keyfold_core::retry::retry_with(&self.retry, &*self.sleeper, call).await
    }

    fn request(
        &self,
        algorithm: WrapAlgorithm,
        value: &[u8],
        op: WrapOperation,
    ) -> Result<RequestContent<KeyOperationParameters>, WrapError> {
        let mut params = KeyOperationParameters {
            algorithm: Some(algorithm.sdk()),
            value: Some(value.to_vec()),
            ..Default::default()
        };
        let body = serde_json::to_vec(&params);
        if let Some(v) = params.value.as_mut() {
            v.zeroize();
        }
        let body = body.map_err(|e| {
            self.error(
                WrapErrorKind::Misconfigured,
                op,
                "cannot encode the request",
            )
            .with_source(e)
        })?;
        Ok(RequestContent::from(body))
    }

    /// The versioned key a wrapped key must be unwrapped with.
    fn unwrap_target(&self, wrapped: &WrappedKey) -> Result<KeyId, WrapError> {
        let op = WrapOperation::Unwrap;
        let mismatch = |what: String| self.error(WrapErrorKind::KeyMismatch, op, what);
        if wrapped.provider != PROVIDER {
            return Err(mismatch(format!(
                "wrapped by provider {:?}, this is {PROVIDER}",
                wrapped.provider
            )));
        }
        let theirs = AzureKeyRef::parse(&wrapped.key_ref).ok();
        let same_key = theirs.as_ref().is_some_and(|k| {
            k.vault_url.eq_ignore_ascii_case(&self.key.vault_url)
                && k.name.eq_ignore_ascii_case(&self.key.name)
        });
        if !same_key {
            return Err(mismatch(format!(
                "wrapped under key {:?}, this wrapper's key is {}",
                wrapped.key_ref, self.key_ref
            )));
        }
        let kid = match (&wrapped.kms_key_version, &self.key.version) {
            (Some(kid), _) => KeyId::parse(kid)
                .map_err(|e| self.error(WrapErrorKind::InvalidCiphertext, op, e))?,
            (None, Some(version)) => KeyId {
                vault_url: self.key.vault_url.to_ascii_lowercase(),
                name: self.key.name.clone(),
                version: version.clone(),
            },
            (None, None) => {
                return Err(self.error(
                    WrapErrorKind::InvalidCiphertext,
                    op,
                    "the wrapped key records no Key Vault key version (kid); refusing to guess the latest",
                ));
            }
        };
        if !kid.is_key(&self.key.vault_url, &self.key.name) {
            return Err(mismatch(format!(
                "the recorded kid {kid} is not a version of {}",
                self.key_ref
            )));
        }
        Ok(kid)
    }
}

fn check_result(
    wrapper: &AzureKeyWrapper,
    op: WrapOperation,
    result: KeyOperationResult,
) -> Result<(KeyId, Zeroizing<Vec<u8>>), WrapError> {
    // Taken first, so an unwrapped key is zeroized on every error path below.
    let value = Zeroizing::new(result.result.unwrap_or_default());
    let kid = result.kid.ok_or_else(|| {
        wrapper.error(
            WrapErrorKind::Unavailable,
            op,
            "Key Vault's answer has no kid",
        )
    })?;
    let kid = KeyId::parse(&kid).map_err(|e| wrapper.error(WrapErrorKind::Misconfigured, op, e))?;
    if value.is_empty() {
        return Err(wrapper.error(
            WrapErrorKind::Unavailable,
            op,
            "Key Vault's answer has no value",
        ));
    }
    Ok((kid, value))
}

/// Checks an operator's endpoint override for `key`: `https://` to the
/// key's own vault host (`NAME.vault.azure.net` or `NAME.managedhsm.azure.net`,
/// as the key reference names it), with no user info, no port other than
/// 443 and no path. A loopback host (`localhost`, `127.0.0.0/8`, `::1`; a
/// local test server) is accepted only when `allow_loopback` is set, the
/// operator's test switch. Every other host (another vault, private or
/// link-local addresses, a trailing dot, non-ASCII names) is refused: each
/// request carries a Key Vault bearer token, and a re-wrap sends master keys.
///
/// ```
/// use keyfold_azure::check_vault_endpoint;
/// use keyfold_core::config::AzureKeyRef;
/// let key = AzureKeyRef::parse("https://acme.vault.azure.net/keys/tenant-a")?;
/// check_vault_endpoint("https://acme.vault.azure.net", &key, false)?;
/// assert!(check_vault_endpoint("https://other.vault.azure.net", &key, false).is_err());
/// assert!(check_vault_endpoint("https://localhost:8443", &key, false).is_err());
/// check_vault_endpoint("https://localhost:8443", &key, true)?;
/// # Ok::<(), keyfold_core::config::ConfigError>(())
/// ```
///
/// # Errors
/// [`ConfigError::InvalidField`] (field `endpoint_url`) saying what is accepted.
pub fn check_vault_endpoint(
    url: &str,
    key: &AzureKeyRef,
    allow_loopback: bool,
) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidField {
        provider: PROVIDER,
        field: "endpoint_url",
        reason,
    };
    let only_authority = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .is_some_and(|rest| match rest.find(['/', '?', '#']) {
            None => true,
            Some(i) => rest.get(i..) == Some("/"),
        });
    let Some(endpoint) = Endpoint::parse(url).filter(|_| only_authority) else {
        return Err(invalid(
            "must be https://HOST[:PORT] with a plain host, no user info and no path".into(),
        ));
    };
    if endpoint.is_loopback() {
        return if allow_loopback {
            Ok(())
        } else {
            Err(invalid(
                "a loopback endpoint is accepted only when the operator allows loopback endpoints for tests"
                    .into(),
            ))
        };
    }
    let vault_host = key.vault_url.trim_start_matches("https://");
    let same_vault = endpoint.https
        && endpoint.port.is_none_or(|p| p == 443)
        && endpoint.host.eq_ignore_ascii_case(vault_host);
    if same_vault {
        Ok(())
    } else {
        Err(invalid(format!(
            "must be https://{vault_host}, the key's own vault"
        )))
    }
}

#[async_trait]
impl KeyWrapper for AzureKeyWrapper {
    fn provider(&self) -> &str {
        PROVIDER
    }

    fn key_ref(&self) -> &str {
        &self.key_ref
    }

    /// Wraps with `wrapKey`. `context` is not sent: Key Vault takes no AAD
    /// (see the type's documentation).
    async fn wrap(&self, key: &SecretKey, _context: &WrapContext) -> Result<WrappedKey, WrapError> {
        let op = WrapOperation::Wrap;
        let algorithm = self.algorithm_for(op).await?;
        let result = self
            .with_retry(|| async {
                let body = self.request(algorithm, key.expose(), op)?;
                let options = KeyClientWrapKeyOptions {
                    key_version: self.key.version.clone(),
                    ..Default::default()
                };
                self.client
                    .wrap_key(&self.key.name, body, Some(options))
                    .await
                    .and_then(|r| r.into_model())
                    .map_err(|e| map_sdk_error(e, &self.key_ref, op))
            })
            .await?;
        let (kid, wrapped) = check_result(self, op, result)?;
        let bytes = wrapped.to_vec();
        if !kid.is_key(&self.key.vault_url, &self.key.name) {
            return Err(self.error(
                WrapErrorKind::Misconfigured,
                op,
                format!(
                    "Key Vault wrapped with {kid}, not a version of {} (does the endpoint reach another vault?)",
                    self.key_ref
                ),
            ));
        }
        if let Some(pinned) = &self.key.version
            && !kid.version.eq_ignore_ascii_case(pinned)
        {
            return Err(self.error(
                WrapErrorKind::Misconfigured,
                op,
                format!("Key Vault wrapped with {kid}, not the pinned version {pinned}"),
            ));
        }
        Ok(WrappedKey {
            provider: PROVIDER.to_owned(),
            key_ref: self.key_ref.clone(),
            kms_key_version: Some(kid.to_string()),
            bytes,
        })
    }

    /// Unwraps with `unwrapKey` on the version recorded at wrap time.
    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        _context: &WrapContext,
    ) -> Result<SecretKey, WrapError> {
        let op = WrapOperation::Unwrap;
        let kid = self.unwrap_target(wrapped)?;
        if wrapped.bytes.is_empty() {
            return Err(self.error(WrapErrorKind::InvalidCiphertext, op, "empty wrapped key"));
        }
        let algorithm = self.algorithm_for(op).await?;
        let result = self
            .with_retry(|| async {
                let body = self.request(algorithm, &wrapped.bytes, op)?;
                self.client
                    .unwrap_key(&kid.name, &kid.version, body, None)
                    .await
                    .and_then(|r| r.into_model())
                    .map_err(|e| map_sdk_error(e, &self.key_ref, op))
            })
            .await?;
        let (answered, value) = check_result(self, op, result)?;
        // Key Vault names the key version it used: it must be the one asked,
        // or the answer is not this wrapped key's (a proxy or a confused
        // vault); the plaintext is dropped (zeroized) unseen.
        let same = answered.vault_url.eq_ignore_ascii_case(&kid.vault_url)
            && answered.name.eq_ignore_ascii_case(&kid.name)
            && answered.version.eq_ignore_ascii_case(&kid.version);
        if !same {
            return Err(self.error(
                WrapErrorKind::KeyMismatch,
                op,
                format!("Key Vault unwrapped with {answered}, but {kid} was asked"),
            ));
        }
        SecretKey::try_from_slice(&value).map_err(|e| {
            self.error(
                WrapErrorKind::InvalidCiphertext,
                op,
                format!("Key Vault unwrapped {} bytes, a master key is 32", e.len),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_follow_the_key_type() {
        use WrapAlgorithm::{A256Kw, RsaOaep256};
        for (kty, want) in [
            (KeyType::Rsa, Some(RsaOaep256)),
            (KeyType::RsaHsm, Some(RsaOaep256)),
            (KeyType::OctHsm, Some(A256Kw)),
            (KeyType::Oct, Some(A256Kw)),
            (KeyType::Ec, None),
            (KeyType::EcHsm, None),
        ] {
            assert_eq!(WrapAlgorithm::for_key_type(&kty), want, "{kty:?}");
        }
        assert_eq!(RsaOaep256.to_string(), "RSA-OAEP-256");
        assert_eq!(A256Kw.as_str(), "A256KW");
        assert_eq!(RsaOaep256.sdk(), EncryptionAlgorithm::RsaOaep256);
    }

    #[test]
    fn vault_keys_pin_rsa_oaep_256_and_hsm_keys_ask() {
        let cfg = |host: &str| AzureConfig {
            kms_key_ref: format!("https://{host}/keys/k"),
            vault_url: format!("https://{host}"),
            azure_tenant_id: None,
            client_id: None,
            client_secret_env_var: None,
            endpoint_url: None,
        };
        let vault = AzureKeyWrapper::builder(&cfg("acme.vault.azure.net"))
            .environment(|_| None)
            .build()
            .unwrap();
        assert_eq!(vault.pinned_algorithm, Some(WrapAlgorithm::RsaOaep256));
        let hsm = AzureKeyWrapper::builder(&cfg("acme.managedhsm.azure.net"))
            .environment(|_| None)
            .build()
            .unwrap();
        assert_eq!(hsm.pinned_algorithm, None);
        let pinned = AzureKeyWrapper::builder(&cfg("acme.managedhsm.azure.net"))
            .environment(|_| None)
            .algorithm(WrapAlgorithm::A256Kw)
            .build()
            .unwrap();
        assert_eq!(pinned.pinned_algorithm, Some(WrapAlgorithm::A256Kw));
        assert!(format!("{pinned:?}").contains("A256Kw"));
    }
}
