//! The onboarding probe and provider-config upsert (docs/LIFECYCLE.md,
//! "Onboarding").
//!
//! Before a KMS config is accepted, [`probe`] makes a live wrap + unwrap
//! round trip of a random 32-byte payload; [`probe_config`] validates a
//! config, builds its wrapper and probes it. Keeping the accepted config and
//! auditing the attempt is the keyring layer's job
//! (`keyfold_core::probe::ConfigSlot`, in `keyring::onboarding`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::format::secret::SecretKey;
use crate::wrap::config::{ConfigError, ProviderConfig, TenantConfig};
use crate::wrap::error::{WrapError, WrapErrorKind, WrapOperation};
use crate::wrap::local::LocalKek;
use crate::wrap::{KeyWrapper, WrapContext};

/// The keyring id bound into probe wraps; never a real keyring's.
pub const PROBE_KEYRING_ID: &str = "keyfold-probe";

/// The step of onboarding that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeStep {
    /// Validating the config.
    Validate,
    /// Building a wrapper from the config.
    Build,
    /// Generating the random payload.
    Generate,
    /// Wrapping the payload.
    Wrap,
    /// Unwrapping it.
    Unwrap,
    /// Comparing: the unwrapped bytes differ from the payload.
    Compare,
}

impl fmt::Display for ProbeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeStep::Validate => "validate",
            ProbeStep::Build => "build",
            ProbeStep::Generate => "generate",
            ProbeStep::Wrap => "wrap",
            ProbeStep::Unwrap => "unwrap",
            ProbeStep::Compare => "compare",
        })
    }
}

/// A probe failed: which step, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KMS probe of {provider} key {key_ref} failed at {step}: {message}")]
pub struct ProbeFailure {
    /// The step.
    pub step: ProbeStep,
    /// The wrapper's error kind, for KMS failures.
    pub kind: Option<WrapErrorKind>,
    /// Provider probed.
    pub provider: String,
    /// Key probed.
    pub key_ref: String,
    /// Why.
    pub message: String,
}

impl ProbeFailure {
    fn wrap(step: ProbeStep, w: &dyn KeyWrapper, e: &WrapError) -> Self {
        ProbeFailure {
            step,
            kind: Some(e.kind),
            provider: w.provider().to_owned(),
            key_ref: w.key_ref().to_owned(),
            message: e.to_string(),
        }
    }
}

/// A successful probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSuccess {
    /// Provider probed.
    pub provider: String,
    /// Key probed.
    pub key_ref: String,
    /// How long the round trip took.
    pub elapsed: std::time::Duration,
}

/// A live wrap + unwrap round trip of a random 32-byte payload.
///
/// ```
/// use keyfold_core::{probe, LocalKek, SecretKey};
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let kek = LocalKek::from_bytes("dev", SecretKey::generate()?);
/// let ok = probe::probe(&kek).await?;
/// assert_eq!(ok.provider, "local");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`ProbeFailure`] naming the failed step.
pub async fn probe(wrapper: &dyn KeyWrapper) -> Result<ProbeSuccess, ProbeFailure> {
    let start = std::time::Instant::now();
    let ctx = WrapContext::new(PROBE_KEYRING_ID, 0);
    let payload = SecretKey::generate().map_err(|e| ProbeFailure {
        step: ProbeStep::Generate,
        kind: None,
        provider: wrapper.provider().to_owned(),
        key_ref: wrapper.key_ref().to_owned(),
        message: e.to_string(),
    })?;
    let wrapped = wrapper
        .wrap(&payload, &ctx)
        .await
        .map_err(|e| ProbeFailure::wrap(ProbeStep::Wrap, wrapper, &e))?;
    let back = wrapper
        .unwrap(&wrapped, &ctx)
        .await
        .map_err(|e| ProbeFailure::wrap(ProbeStep::Unwrap, wrapper, &e))?;
    if back.expose() != payload.expose() {
        return Err(ProbeFailure {
            step: ProbeStep::Compare,
            kind: Some(WrapErrorKind::InvalidCiphertext),
            provider: wrapper.provider().to_owned(),
            key_ref: wrapper.key_ref().to_owned(),
            message: "the unwrapped payload differs from the one wrapped".into(),
        });
    }
    Ok(ProbeSuccess {
        provider: wrapper.provider().to_owned(),
        key_ref: wrapper.key_ref().to_owned(),
        elapsed: start.elapsed(),
    })
}

/// Builds a [`KeyWrapper`] from a [`ProviderConfig`]. Provider crates
/// implement it; the host composes them. [`LocalFactory`] handles `local`.
#[async_trait]
pub trait WrapperFactory: Send + Sync + fmt::Debug {
    /// A wrapper for `config`.
    ///
    /// # Errors
    /// [`WrapError`] (kind [`Misconfigured`](WrapErrorKind::Misconfigured)
    /// for configs it cannot serve).
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError>;
}

/// Builds [`LocalKek`] wrappers from `local` configs that name their KEK's
/// source (environment variable or file): configs the operator writes, such
/// as a command-line tool's. A tenant's config must never reach it (the
/// source fields are operator-only, docs/THREAT_MODEL.md "Tenant and
/// operator settings"): use [`LocalKeks`] for those.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalFactory;

#[async_trait]
impl WrapperFactory for LocalFactory {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        let misconfigured = |m: String| {
            WrapError::new(
                WrapErrorKind::Misconfigured,
                config.provider(),
                config.kms_key_ref(),
                WrapOperation::Configure,
            )
            .with_message(m)
        };
        let ProviderConfig::Local(c) = config else {
            return Err(misconfigured(format!(
                "LocalFactory cannot build a {} wrapper",
                config.provider()
            )));
        };
        let kek = match (&c.kek_env_var, &c.kek_file) {
            (Some(var), None) => LocalKek::from_env(c.kms_key_ref.clone(), var),
            (None, Some(path)) => LocalKek::from_file(c.kms_key_ref.clone(), path),
            _ => {
                return Err(misconfigured(
                    "set exactly one of kek_env_var, kek_file".into(),
                ));
            }
        }
        .map_err(|e| misconfigured(e.to_string()))?;
        Ok(Arc::new(kek))
    }
}

/// Where an operator's local KEK is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KekSource {
    Env(String),
    File(PathBuf),
}

/// The operator's local KEKs, by id: builds [`LocalKek`] wrappers from
/// tenant `local` configs, which name only the KEK's id (`kms_key_ref`).
/// A config naming a source (`kek_env_var`, `kek_file`: operator-only) is
/// refused with [`ConfigError::OperatorOnly`] as the error's source, and an
/// id the operator did not register is refused without reading anything.
///
/// ```
/// use keyfold_core::config::TenantConfig;
/// use keyfold_core::probe::{LocalKeks, WrapperFactory};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let keks = LocalKeks::new().env("dev-kek", "KEYFOLD_DEV_KEK");
/// let tenant: TenantConfig =
///     serde_json::from_str(r#"{"provider": "local", "kms_key_ref": "other-kek"}"#)?;
/// let err = keks.build(&tenant).await.unwrap_err();
/// assert!(err.to_string().contains("no local KEK"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct LocalKeks {
    keks: BTreeMap<String, KekSource>,
}

impl LocalKeks {
    /// No KEKs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// KEK `id` is read from environment variable `var` (hex or base64).
    #[must_use]
    pub fn env(mut self, id: impl Into<String>, var: impl Into<String>) -> Self {
        self.keks.insert(id.into(), KekSource::Env(var.into()));
        self
    }

    /// KEK `id` is read from file `path` (hex or base64).
    #[must_use]
    pub fn file(mut self, id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.keks.insert(id.into(), KekSource::File(path.into()));
        self
    }

    /// The registered KEK ids.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keks.keys().map(String::as_str)
    }
}

#[async_trait]
impl WrapperFactory for LocalKeks {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        let misconfigured = |m: String| {
            WrapError::new(
                WrapErrorKind::Misconfigured,
                config.provider(),
                config.kms_key_ref(),
                WrapOperation::Configure,
            )
            .with_message(m)
        };
        let ProviderConfig::Local(c) = config else {
            return Err(misconfigured(format!(
                "LocalKeks cannot build a {} wrapper",
                config.provider()
            )));
        };
        if let Err(e) = config.check_tenant() {
            return Err(misconfigured(e.to_string()).with_source(e));
        }
        let kek = match self.keks.get(&c.kms_key_ref) {
            Some(KekSource::Env(var)) => LocalKek::from_env(c.kms_key_ref.clone(), var),
            Some(KekSource::File(path)) => LocalKek::from_file(c.kms_key_ref.clone(), path),
            None => {
                return Err(misconfigured(format!(
                    "no local KEK {:?} is configured",
                    c.kms_key_ref
                )));
            }
        }
        .map_err(|e| misconfigured(e.to_string()))?;
        Ok(Arc::new(kek))
    }
}

/// The validation a config gets before it is built: a config setting no
/// operator-only field is checked as a tenant's ([`TenantConfig`]: a `local`
/// one needs no KEK source, the factory has it), any other in full.
fn validate(config: &ProviderConfig) -> Result<(), ConfigError> {
    if config.operator_fields().is_empty() {
        TenantConfig::try_from(config.clone()).map(|_| ())
    } else {
        config.validate()
    }
}

/// Validates `config`, builds its wrapper with `factory` and probes it: the
/// checks onboarding runs before a config is accepted. Changes nothing.
///
/// # Errors
/// [`ProbeFailure`] naming the step that failed.
pub async fn probe_config(
    config: &ProviderConfig,
    factory: &dyn WrapperFactory,
) -> Result<Arc<dyn KeyWrapper>, ProbeFailure> {
    let fail = |step, kind, message: String| ProbeFailure {
        step,
        kind,
        provider: config.provider().to_owned(),
        key_ref: config.kms_key_ref().to_owned(),
        message,
    };
    validate(config).map_err(|e| fail(ProbeStep::Validate, None, e.to_string()))?;
    let wrapper = factory
        .build(config)
        .await
        .map_err(|e| fail(ProbeStep::Build, Some(e.kind), e.to_string()))?;
    if wrapper.provider() != config.provider() {
        return Err(fail(
            ProbeStep::Build,
            Some(WrapErrorKind::Misconfigured),
            format!(
                "the factory built a {} wrapper for a {} config",
                wrapper.provider(),
                config.provider()
            ),
        ));
    }
    probe(wrapper.as_ref()).await?;
    Ok(wrapper)
}
