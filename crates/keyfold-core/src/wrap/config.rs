//! Provider configurations: which KMS key wraps a keyring, and how keyfold
//! authenticates to it. Pure data and validation; the provider crates turn a
//! config into a [`KeyWrapper`](crate::KeyWrapper).
//!
//! Only role-based access is accepted (AWS role ARN with external id, GCP
//! service-account impersonation, Azure managed/workload identity or a client
//! secret read from a *named* environment variable). A config carrying static,
//! long-lived credentials is refused with an error that says what to use.
//!
//! # Tenant and operator settings
//!
//! In a BYOK service the config comes from a tenant's request, and a tenant
//! must not steer the service's own credentials (docs/THREAT_MODEL.md,
//! "Tenant and operator settings"). [`TenantConfig`] is what a tenant may
//! say: the provider, the key reference and the identity to assume (AWS role
//! ARN and external id, GCP service account, Azure tenant and client id).
//! Deserialising one that carries an operator-only field
//! ([`OPERATOR_ONLY_FIELDS`]: endpoint overrides, secret and KEK sources) is
//! a [`ConfigError::OperatorOnly`] naming the field. Those settings belong to
//! the operator, on the provider crates' wrapper factories; a
//! [`ProviderConfig`] still carries them for configs the operator writes
//! (a command-line tool's file), and the cloud factories refuse them there
//! too, taking them only as factory settings.
//!
//! ```
//! use keyfold_core::config::{ConfigError, TenantConfig};
//! let err = serde_json::from_str::<TenantConfig>(r#"{
//!     "provider": "aws",
//!     "kms_key_ref": "arn:aws:kms:eu-west-1:111122223333:alias/tenant-a",
//!     "region": "eu-west-1",
//!     "role_arn": "arn:aws:iam::111122223333:role/keyfold",
//!     "external_id": "tenant-a",
//!     "endpoint_url": "https://169.254.169.254"
//! }"#).unwrap_err();
//! assert!(err.to_string().contains("`endpoint_url` is an operator setting"));
//! ```
//!
//! ```
//! use keyfold_core::config::{ConfigError, ProviderConfig};
//! let cfg: ProviderConfig = serde_json::from_str(r#"{
//!     "provider": "aws",
//!     "kms_key_ref": "arn:aws:kms:eu-west-1:111122223333:alias/tenant-a",
//!     "region": "eu-west-1",
//!     "role_arn": "arn:aws:iam::111122223333:role/keyfold",
//!     "external_id": "tenant-a"
//! }"#)?;
//! cfg.validate()?;
//! let err = serde_json::from_str::<ProviderConfig>(r#"{
//!     "provider": "aws", "kms_key_ref": "alias/k", "region": "eu-west-1",
//!     "role_arn": "arn:aws:iam::111122223333:role/keyfold",
//!     "secret_access_key": "wJalr..."
//! }"#).unwrap_err();
//! assert!(err.to_string().contains("role_arn"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// A config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The key reference does not have the provider's format.
    #[error("invalid {provider} key reference {key_ref:?}: {reason}")]
    InvalidKeyRef {
        /// Provider.
        provider: &'static str,
        /// The reference given.
        key_ref: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// Static long-lived credentials were supplied.
    #[error(
        "{provider} config field `{field}` holds a static credential, which keyfold refuses: {instead}"
    )]
    StaticCredentials {
        /// Provider.
        provider: &'static str,
        /// The offending field.
        field: String,
        /// What to use instead.
        instead: &'static str,
    },
    /// A field has an invalid value.
    #[error("{provider} config field `{field}`: {reason}")]
    InvalidField {
        /// Provider.
        provider: &'static str,
        /// Field name.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The config is not well-formed (missing or unknown field, wrong type).
    #[error("malformed provider config: {0}")]
    Malformed(String),
    /// A tenant config set a field only the operator may set (an endpoint
    /// override, a secret or KEK source): see [`OPERATOR_ONLY_FIELDS`].
    #[error(
        "{provider} config field `{field}` is an operator setting: a tenant config cannot set it \
         (the operator configures it on the wrapper factory)"
    )]
    OperatorOnly {
        /// Provider.
        provider: &'static str,
        /// The offending field.
        field: &'static str,
    },
}

/// The fields of each provider's config that only the operator may set:
/// where requests go and where secrets and KEKs are read from. A
/// [`TenantConfig`] refuses them with [`ConfigError::OperatorOnly`].
pub const OPERATOR_ONLY_FIELDS: &[(&str, &[&str])] = &[
    ("local", &["kek_env_var", "kek_file"]),
    ("aws", &["endpoint_url"]),
    ("gcp", &["endpoint_url"]),
    ("azure", &["endpoint_url", "client_secret_env_var"]),
];

/// A KMS configuration, tagged by `provider`: everything a wrapper needs,
/// operator-only settings included. Take a tenant's config as a
/// [`TenantConfig`], which refuses those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
#[serde(try_from = "serde_json::Value")]
#[non_exhaustive]
pub enum ProviderConfig {
    /// A local KEK (development, tests, self-hosting).
    Local(LocalConfig),
    /// AWS KMS.
    Aws(AwsConfig),
    /// Google Cloud KMS.
    Gcp(GcpConfig),
    /// Azure Key Vault or Managed HSM.
    Azure(AzureConfig),
}

/// Local KEK: read from an environment variable or a file (hex or base64).
/// A tenant names only the KEK's id; its source is the operator's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The KEK's id, recorded in every key it wraps.
    pub kms_key_ref: String,
    /// Environment variable holding the KEK. Operator-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek_env_var: Option<String>,
    /// File holding the KEK. Operator-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek_file: Option<String>,
}

/// AWS KMS, reached by assuming a role. `Debug` hides the external id.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Key ARN, alias ARN or `alias/NAME`.
    pub kms_key_ref: String,
    /// AWS region of the key.
    pub region: String,
    /// Role assumed through STS on top of the default credential chain.
    pub role_arn: String,
    /// External id the role's trust policy demands. Required (validation
    /// refuses a config without one): it stops a confused deputy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Endpoint override (VPC endpoint, or a local emulator in tests).
    /// Operator-only: `keyfold-aws` takes it as a factory setting and
    /// refuses it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

impl fmt::Debug for AwsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsConfig")
            .field("kms_key_ref", &self.kms_key_ref)
            .field("region", &self.region)
            .field("role_arn", &self.role_arn)
            .field("external_id", &self.external_id.as_ref().map(|_| "******"))
            .field("endpoint_url", &self.endpoint_url)
            .finish()
    }
}

/// Google Cloud KMS, reached by impersonating a service account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpConfig {
    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
    pub kms_key_ref: String,
    /// Service account the ambient identity impersonates.
    pub impersonate_service_account: String,
    /// Project to bill, if not the key's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// Endpoint override: a Google API host (`https://*.googleapis.com`, a
    /// private endpoint) or a loopback address (a local server in tests).
    /// Operator-only: `keyfold-gcp` takes it as a factory setting and
    /// refuses it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

/// Azure Key Vault / Managed HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// `https://VAULT.vault.azure.net/keys/NAME[/VERSION]` (or `managedhsm.azure.net`).
    pub kms_key_ref: String,
    /// Vault URL; must match the key reference's vault unless `endpoint_url` is set.
    pub vault_url: String,
    /// Entra tenant id (client-secret credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_tenant_id: Option<String>,
    /// Application (client) id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Name of the environment variable holding the client secret.
    /// Operator-only: `keyfold-azure` takes the secret source as the
    /// factory's identity and refuses it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env_var: Option<String>,
    /// Endpoint override (a local server in tests). Operator-only:
    /// `keyfold-azure` takes it as a factory setting and refuses it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

/// Fields that would carry static credentials, per provider, and what to use instead.
const STATIC_CREDENTIAL_FIELDS: &[(&str, &[&str], &str)] = &[
    (
        "aws",
        &[
            "access_key_id",
            "secret_access_key",
            "session_token",
            "aws_access_key_id",
            "aws_secret_access_key",
            "aws_session_token",
        ],
        "use `role_arn` (with `external_id`) so credentials come from assuming a role",
    ),
    (
        "gcp",
        &[
            "credentials",
            "credentials_json",
            "service_account_key",
            "service_account_json",
            "private_key",
            "private_key_id",
        ],
        "use `impersonate_service_account` with the ambient identity (workload identity, metadata server, ADC)",
    ),
    (
        "azure",
        &["client_secret", "secret", "password", "client_certificate"],
        "use managed or workload identity, or name an environment variable in `client_secret_env_var`",
    ),
];

impl TryFrom<serde_json::Value> for ProviderConfig {
    type Error = ConfigError;

    fn try_from(value: serde_json::Value) -> Result<Self, ConfigError> {
        let config = parse_unvalidated(value, false)?;
        config.validate()?;
        Ok(config)
    }
}

/// Parses a config without validating its values; `tenant`: refuse
/// operator-only fields first.
fn parse_unvalidated(
    value: serde_json::Value,
    tenant: bool,
) -> Result<ProviderConfig, ConfigError> {
    let object = value
        .as_object()
        .ok_or_else(|| ConfigError::Malformed("expected an object".into()))?;
    let provider = object
        .get("provider")
        .and_then(|p| p.as_str())
        .ok_or_else(|| ConfigError::Malformed("missing `provider`".into()))?;
    for (name, fields, instead) in STATIC_CREDENTIAL_FIELDS {
        if *name != provider {
            continue;
        }
        if let Some(field) = object.keys().find(|k| fields.contains(&k.as_str())) {
            return Err(ConfigError::StaticCredentials {
                provider: name,
                field: field.clone(),
                instead,
            });
        }
    }
    let mut rest = object.clone();
    rest.remove("provider");
    let rest = serde_json::Value::Object(rest);
    let malformed = |e: serde_json::Error| ConfigError::Malformed(format!("{provider}: {e}"));
    if tenant
        && let Some(field) = operator_only(provider)
            .iter()
            .find(|f| object.contains_key(**f))
    {
        return Err(ConfigError::OperatorOnly {
            provider: provider_name(provider),
            field,
        });
    }
    let config = match provider {
        "local" => ProviderConfig::Local(serde_json::from_value(rest).map_err(malformed)?),
        "aws" => ProviderConfig::Aws(serde_json::from_value(rest).map_err(malformed)?),
        "gcp" => ProviderConfig::Gcp(serde_json::from_value(rest).map_err(malformed)?),
        "azure" => ProviderConfig::Azure(serde_json::from_value(rest).map_err(malformed)?),
        other => {
            return Err(ConfigError::Malformed(format!(
                "unknown provider {other:?} (expected local, aws, gcp or azure)"
            )));
        }
    };
    Ok(config)
}

/// The operator-only fields of `provider` (none for an unknown one).
fn operator_only(provider: &str) -> &'static [&'static str] {
    OPERATOR_ONLY_FIELDS
        .iter()
        .find(|(name, _)| *name == provider)
        .map_or(&[], |(_, fields)| fields)
}

fn provider_name(provider: &str) -> &'static str {
    ["local", "aws", "gcp", "azure"]
        .into_iter()
        .find(|p| *p == provider)
        .unwrap_or("unknown")
}

/// A tenant's KMS configuration: a [`ProviderConfig`] that sets no
/// operator-only field ([`OPERATOR_ONLY_FIELDS`]). Deserialising one that
/// does is a [`ConfigError::OperatorOnly`] naming the field, whatever its
/// value; static credentials and unknown fields are refused as for a
/// [`ProviderConfig`]. A `local` tenant config names only the KEK's id
/// (`kms_key_ref`): its source is the operator's.
///
/// Hand it to a provider crate's wrapper factory, which adds the operator's
/// settings (docs/THREAT_MODEL.md, "Tenant and operator settings").
///
/// ```
/// use keyfold_core::config::{ConfigError, TenantConfig};
/// let tenant: TenantConfig = serde_json::from_str(r#"{
///     "provider": "gcp",
///     "kms_key_ref": "projects/acme/locations/europe-west1/keyRings/r/cryptoKeys/k",
///     "impersonate_service_account": "keyfold@acme.iam.gserviceaccount.com"
/// }"#)?;
/// assert_eq!(tenant.provider(), "gcp");
/// let err = serde_json::from_str::<TenantConfig>(
///     r#"{"provider": "local", "kms_key_ref": "dev", "kek_file": "/etc/shadow"}"#,
/// )
/// .unwrap_err();
/// assert!(err.to_string().contains("`kek_file` is an operator setting"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "ProviderConfig")]
pub struct TenantConfig(ProviderConfig);

impl TenantConfig {
    /// The config, for a wrapper factory.
    pub fn as_provider_config(&self) -> &ProviderConfig {
        &self.0
    }

    /// The config, for a wrapper factory or a config slot.
    pub fn into_provider_config(self) -> ProviderConfig {
        self.0
    }

    /// Checks every field a tenant may set.
    fn validate(config: &ProviderConfig) -> Result<(), ConfigError> {
        config.check_tenant()?;
        match config {
            // The source is the operator's; only the id is the tenant's.
            ProviderConfig::Local(c) if c.kms_key_ref.is_empty() => Err(field(
                "local",
                "kms_key_ref",
                "the KEK id must not be empty",
            )),
            ProviderConfig::Local(_) => Ok(()),
            other => other.validate(),
        }
    }
}

impl std::ops::Deref for TenantConfig {
    type Target = ProviderConfig;

    fn deref(&self) -> &ProviderConfig {
        &self.0
    }
}

impl AsRef<ProviderConfig> for TenantConfig {
    fn as_ref(&self) -> &ProviderConfig {
        &self.0
    }
}

impl From<TenantConfig> for ProviderConfig {
    fn from(tenant: TenantConfig) -> Self {
        tenant.0
    }
}

impl TryFrom<ProviderConfig> for TenantConfig {
    type Error = ConfigError;

    /// # Errors
    /// [`ConfigError::OperatorOnly`] for an operator-only field that is set,
    /// else as [`ProviderConfig::validate`] (a `local` config needs no source).
    fn try_from(config: ProviderConfig) -> Result<Self, ConfigError> {
        TenantConfig::validate(&config)?;
        Ok(TenantConfig(config))
    }
}

impl TryFrom<serde_json::Value> for TenantConfig {
    type Error = ConfigError;

    fn try_from(value: serde_json::Value) -> Result<Self, ConfigError> {
        let config = parse_unvalidated(value, true)?;
        TenantConfig::validate(&config)?;
        Ok(TenantConfig(config))
    }
}

impl ProviderConfig {
    /// Provider name.
    pub fn provider(&self) -> &'static str {
        match self {
            ProviderConfig::Local(_) => "local",
            ProviderConfig::Aws(_) => "aws",
            ProviderConfig::Gcp(_) => "gcp",
            ProviderConfig::Azure(_) => "azure",
        }
    }

    /// The KMS key reference.
    pub fn kms_key_ref(&self) -> &str {
        match self {
            ProviderConfig::Local(c) => &c.kms_key_ref,
            ProviderConfig::Aws(c) => &c.kms_key_ref,
            ProviderConfig::Gcp(c) => &c.kms_key_ref,
            ProviderConfig::Azure(c) => &c.kms_key_ref,
        }
    }

    /// The operator-only fields ([`OPERATOR_ONLY_FIELDS`]) this config sets.
    pub fn operator_fields(&self) -> Vec<&'static str> {
        let set = |name: &'static str, value: bool| value.then_some(name);
        match self {
            ProviderConfig::Local(c) => [
                set("kek_env_var", c.kek_env_var.is_some()),
                set("kek_file", c.kek_file.is_some()),
            ]
            .into_iter()
            .flatten()
            .collect(),
            ProviderConfig::Aws(c) => set("endpoint_url", c.endpoint_url.is_some())
                .into_iter()
                .collect(),
            ProviderConfig::Gcp(c) => set("endpoint_url", c.endpoint_url.is_some())
                .into_iter()
                .collect(),
            ProviderConfig::Azure(c) => [
                set("endpoint_url", c.endpoint_url.is_some()),
                set("client_secret_env_var", c.client_secret_env_var.is_some()),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }

    /// Checks that the config sets no operator-only field, as a tenant's
    /// must not.
    ///
    /// # Errors
    /// [`ConfigError::OperatorOnly`] naming the first such field.
    pub fn check_tenant(&self) -> Result<(), ConfigError> {
        match self.operator_fields().first() {
            Some(field) => Err(ConfigError::OperatorOnly {
                provider: self.provider(),
                field,
            }),
            None => Ok(()),
        }
    }

    /// Checks every field (deserialization already does this).
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ProviderConfig::Local(c) => c.validate(),
            ProviderConfig::Aws(c) => c.validate(),
            ProviderConfig::Gcp(c) => c.validate(),
            ProviderConfig::Azure(c) => c.validate(),
        }
    }
}

fn field(provider: &'static str, field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidField {
        provider,
        field,
        reason: reason.into(),
    }
}

/// An endpoint URL's parts, as keyfold accepts them: `http` or `https`, a
/// plain host (a DNS name, an IPv4 address or a bracketed IPv6 address), an
/// optional port, and nothing else in the authority: no user info, no
/// percent-encoding. A stricter grammar than RFC 3986 on purpose: the host
/// this check sees must be the host an HTTP client connects to
/// (`http://127.0.0.1:80@kms.example` names `kms.example`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'a> {
    /// `https://` (else `http://`).
    pub https: bool,
    /// The host, without brackets for IPv6.
    pub host: &'a str,
    /// The port, when given.
    pub port: Option<u16>,
}

impl<'a> Endpoint<'a> {
    /// Parses `url`; `None` if it is not of the accepted shape.
    pub fn parse(url: &'a str) -> Option<Self> {
        let (https, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return None,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']')?;
                host.parse::<std::net::Ipv6Addr>().ok()?;
                (host, after)
            }
            None => match authority.find(':') {
                Some(colon) => authority.split_at(colon),
                None => (authority, ""),
            },
        };
        let port = match port {
            "" => None,
            p => {
                let digits = p.strip_prefix(':')?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Some(digits.parse::<u16>().ok()?)
            }
        };
        let plain_name = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !plain_name && !authority.starts_with('[') {
            return None;
        }
        Some(Endpoint { https, host, port })
    }

    /// `localhost` or a loopback address.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// An endpoint override is `https://`, or `http://` only to a loopback host
/// (a local emulator): KMS requests and responses carry master keys. Its
/// authority must be a plain host and port ([`Endpoint`]).
pub fn check_endpoint_url(provider: &'static str, url: &str) -> Result<(), ConfigError> {
    let Some(endpoint) = Endpoint::parse(url) else {
        return Err(field(
            provider,
            "endpoint_url",
            "must be an https:// URL whose authority is a plain host[:port] (no user info)",
        ));
    };
    if endpoint.https || endpoint.is_loopback() {
        Ok(())
    } else {
        Err(field(
            provider,
            "endpoint_url",
            "plain http:// is allowed only to a loopback host (a local emulator); use https://",
        ))
    }
}

fn check_endpoint(provider: &'static str, url: Option<&str>) -> Result<(), ConfigError> {
    url.map_or(Ok(()), |u| check_endpoint_url(provider, u))
}

impl LocalConfig {
    /// # Errors
    /// When neither or both KEK sources are set, or the id is empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kms_key_ref.is_empty() {
            return Err(field(
                "local",
                "kms_key_ref",
                "the KEK id must not be empty",
            ));
        }
        match (&self.kek_env_var, &self.kek_file) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(field(
                "local",
                "kek_env_var",
                "set exactly one of `kek_env_var` and `kek_file`",
            )),
        }
    }
}

impl AwsConfig {
    /// # Errors
    /// A bad key reference, region, role ARN or endpoint.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = AwsKeyRef::parse(&self.kms_key_ref)?;
        if !is_aws_region(&self.region) {
            return Err(field(
                "aws",
                "region",
                format!("{:?} is not an AWS region name", self.region),
            ));
        }
        if let Some(key_region) = key.region().filter(|r| *r != self.region) {
            return Err(field(
                "aws",
                "region",
                format!(
                    "the key is in {key_region}, the config says {}",
                    self.region
                ),
            ));
        }
        let role = self.role_arn.split(':').collect::<Vec<_>>();
        let valid_role = matches!(role.as_slice(), ["arn", partition, "iam", "", account, resource]
            if partition.starts_with("aws") && is_aws_account(account) && resource.starts_with("role/") && resource.len() > 5);
        if !valid_role {
            return Err(field(
                "aws",
                "role_arn",
                "expected arn:aws:iam::ACCOUNT:role/NAME",
            ));
        }
        // The external id is what stops a confused deputy: another tenant's
        // config naming this role cannot assume it without the id.
        match self.external_id.as_deref() {
            None => {
                return Err(field(
                    "aws",
                    "external_id",
                    "required: the role's trust policy must demand an external id (confused-deputy protection)",
                ));
            }
            Some(e) if e.len() < 2 || e.len() > 1224 => {
                return Err(field("aws", "external_id", "must be 2..=1224 characters"));
            }
            Some(_) => {}
        }
        check_endpoint("aws", self.endpoint_url.as_deref())
    }
}

impl GcpConfig {
    /// # Errors
    /// A bad key reference, service account or endpoint.
    pub fn validate(&self) -> Result<(), ConfigError> {
        GcpKeyRef::parse(&self.kms_key_ref)?;
        let sa = &self.impersonate_service_account;
        let valid_sa = sa.split_once('@').is_some_and(|(name, domain)| {
            !name.is_empty() && domain.ends_with(".gserviceaccount.com")
        });
        if !valid_sa {
            return Err(field(
                "gcp",
                "impersonate_service_account",
                "expected a service account email, NAME@PROJECT.iam.gserviceaccount.com",
            ));
        }
        check_endpoint("gcp", self.endpoint_url.as_deref())?;
        // Every Cloud KMS call carries a bearer token for the impersonated
        // service account, usable anywhere: over TLS it may go only to a
        // Google API host (private endpoints included) or a loopback proxy,
        // never to a host a tenant's config names.
        let google_or_local = |e: &Endpoint<'_>| {
            // A fully qualified name may end in a dot.
            let host = e
                .host
                .strip_suffix('.')
                .unwrap_or(e.host)
                .to_ascii_lowercase();
            e.is_loopback() || host == "googleapis.com" || host.ends_with(".googleapis.com")
        };
        match self.endpoint_url.as_deref().and_then(Endpoint::parse) {
            Some(e) if !google_or_local(&e) => Err(field(
                "gcp",
                "endpoint_url",
                "must be a Google API host (*.googleapis.com) or a loopback address: \
                 each request carries a bearer token for the service account",
            )),
            _ => Ok(()),
        }
    }
}

impl AzureConfig {
    /// # Errors
    /// A bad key reference, vault URL, credential fields or endpoint.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = AzureKeyRef::parse(&self.kms_key_ref)?;
        let vault = self.vault_url.trim_end_matches('/');
        if self.endpoint_url.is_none() && vault != key.vault_url {
            return Err(field(
                "azure",
                "vault_url",
                format!("{vault} is not the key's vault {}", key.vault_url),
            ));
        }
        if let Some(var) = &self.client_secret_env_var {
            let looks_like_name = !var.is_empty()
                && var.len() <= 128
                && var
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !looks_like_name {
                return Err(ConfigError::StaticCredentials {
                    provider: "azure",
                    field: "client_secret_env_var".into(),
                    instead: "give the NAME of an environment variable (A-Z, 0-9, _), never the secret itself",
                });
            }
            if self.azure_tenant_id.is_none() || self.client_id.is_none() {
                return Err(field(
                    "azure",
                    "client_secret_env_var",
                    "a client secret needs `azure_tenant_id` and `client_id`",
                ));
            }
        }
        check_endpoint("azure", self.endpoint_url.as_deref())
    }
}

fn is_aws_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_aws_account(a: &str) -> bool {
    a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit())
}

/// A parsed AWS KMS key reference.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AwsKeyRef {
    /// `arn:aws:kms:REGION:ACCOUNT:key/ID`
    KeyArn {
        /// Region.
        region: String,
        /// Account.
        account: String,
        /// Key id.
        key_id: String,
    },
    /// `arn:aws:kms:REGION:ACCOUNT:alias/NAME`
    AliasArn {
        /// Region.
        region: String,
        /// Account.
        account: String,
        /// Alias name without `alias/`.
        alias: String,
    },
    /// `alias/NAME` in the config's region and the role's account.
    Alias(String),
}

impl AwsKeyRef {
    /// Parses a key ARN, alias ARN or `alias/NAME`.
    ///
    /// # Errors
    /// [`ConfigError::InvalidKeyRef`] saying what was expected.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidKeyRef {
            provider: "aws",
            key_ref: s.to_owned(),
            reason: reason.to_owned(),
        };
        let alias_ok = |a: &str| {
            !a.is_empty()
                && a.len() <= 250
                && !a.starts_with("aws/")
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
        };
        if let Some(alias) = s.strip_prefix("alias/") {
            return if alias_ok(alias) {
                Ok(AwsKeyRef::Alias(alias.to_owned()))
            } else {
                Err(invalid(
                    "alias names are 1..=250 of A-Z a-z 0-9 / _ -, and not aws/...",
                ))
            };
        }
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let ["arn", partition, "kms", region, account, resource] = parts.as_slice() else {
            return Err(invalid(
                "expected arn:aws:kms:REGION:ACCOUNT:key/ID, arn:aws:kms:REGION:ACCOUNT:alias/NAME or alias/NAME",
            ));
        };
        if !partition.starts_with("aws") || !is_aws_region(region) || !is_aws_account(account) {
            return Err(invalid(
                "bad partition, region or 12-digit account id in the ARN",
            ));
        }
        if let Some(key_id) = resource.strip_prefix("key/") {
            let ok = !key_id.is_empty()
                && key_id.len() <= 64
                && key_id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'-' || b.is_ascii_lowercase());
            if !ok {
                return Err(invalid("bad key id after key/"));
            }
            return Ok(AwsKeyRef::KeyArn {
                region: (*region).to_owned(),
                account: (*account).to_owned(),
                key_id: key_id.to_owned(),
            });
        }
        if let Some(alias) = resource.strip_prefix("alias/") {
            if !alias_ok(alias) {
                return Err(invalid("bad alias name"));
            }
            return Ok(AwsKeyRef::AliasArn {
                region: (*region).to_owned(),
                account: (*account).to_owned(),
                alias: alias.to_owned(),
            });
        }
        Err(invalid("the ARN's resource must be key/ID or alias/NAME"))
    }

    /// The region named by an ARN.
    pub fn region(&self) -> Option<&str> {
        match self {
            AwsKeyRef::KeyArn { region, .. } | AwsKeyRef::AliasArn { region, .. } => Some(region),
            AwsKeyRef::Alias(_) => None,
        }
    }
}

/// A parsed Cloud KMS CryptoKey name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpKeyRef {
    /// Project.
    pub project: String,
    /// Location.
    pub location: String,
    /// Key ring.
    pub key_ring: String,
    /// CryptoKey.
    pub crypto_key: String,
}

impl GcpKeyRef {
    /// Parses `projects/P/locations/L/keyRings/R/cryptoKeys/K`. A
    /// `/cryptoKeyVersions/N` suffix is refused: Cloud KMS encrypts with the
    /// key's primary version.
    ///
    /// # Errors
    /// [`ConfigError::InvalidKeyRef`].
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidKeyRef {
            provider: "gcp",
            key_ref: s.to_owned(),
            reason: reason.to_owned(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() == 10 && parts.get(8) == Some(&"cryptoKeyVersions") {
            return Err(invalid(
                "name the CryptoKey, not a CryptoKeyVersion: Encrypt always uses the key's primary version; drop the /cryptoKeyVersions/N suffix",
            ));
        }
        let [
            "projects",
            p,
            "locations",
            l,
            "keyRings",
            r,
            "cryptoKeys",
            k,
        ] = parts.as_slice()
        else {
            return Err(invalid(
                "expected projects/P/locations/L/keyRings/R/cryptoKeys/K",
            ));
        };
        let seg_ok = |x: &str| {
            !x.is_empty()
                && x.len() <= 63
                && x.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if ![p, l, r, k].iter().all(|x| seg_ok(x)) {
            return Err(invalid("each segment is 1..=63 of A-Z a-z 0-9 - _ ."));
        }
        Ok(GcpKeyRef {
            project: (*p).to_owned(),
            location: (*l).to_owned(),
            key_ring: (*r).to_owned(),
            crypto_key: (*k).to_owned(),
        })
    }
}

/// A parsed Azure Key Vault key identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureKeyRef {
    /// `https://VAULT.vault.azure.net` (no trailing slash).
    pub vault_url: String,
    /// Key name.
    pub name: String,
    /// Key version, if pinned.
    pub version: Option<String>,
}

impl AzureKeyRef {
    /// Parses `https://VAULT.vault.azure.net/keys/NAME[/VERSION]` (also
    /// `.managedhsm.azure.net`).
    ///
    /// # Errors
    /// [`ConfigError::InvalidKeyRef`].
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidKeyRef {
            provider: "azure",
            key_ref: s.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| invalid("must start with https://"))?;
        let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let (host, name, version) = match parts.as_slice() {
            [host, "keys", name] => (*host, *name, None),
            [host, "keys", name, version] => (*host, *name, Some(*version)),
            _ => {
                return Err(invalid(
                    "expected https://VAULT.vault.azure.net/keys/NAME[/VERSION]",
                ));
            }
        };
        let vault = host
            .strip_suffix(".vault.azure.net")
            .or_else(|| host.strip_suffix(".managedhsm.azure.net"))
            .ok_or_else(|| {
                invalid("host must be VAULT.vault.azure.net or HSM.managedhsm.azure.net")
            })?;
        let vault_ok = (3..=24).contains(&vault.len())
            && vault
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let name_ok = (1..=127).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let version_ok =
            version.is_none_or(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()));
        if !(vault_ok && name_ok && version_ok) {
            return Err(invalid(
                "bad vault name, key name (A-Z a-z 0-9 -) or version (32 hex digits)",
            ));
        }
        Ok(AzureKeyRef {
            vault_url: format!("https://{host}"),
            name: name.to_owned(),
            version: version.map(str::to_owned),
        })
    }
}

impl fmt::Display for AzureKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/keys/{}", self.vault_url, self.name)?;
        if let Some(v) = &self.version {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}
