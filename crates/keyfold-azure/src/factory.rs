//! [`AzureFactory`]: builds Azure wrappers from `azure` provider configs for
//! keyfold's onboarding probe ([`keyfold_core::probe::ConfigSlot`]).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keyfold_core::config::ProviderConfig;
use keyfold_core::probe::WrapperFactory;
use keyfold_core::{KeyWrapper, WrapError, WrapErrorKind, WrapOperation};

use crate::credential::AzureIdentity;
use crate::wrapper::{AzureKeyWrapper, AzureKeyWrapperBuilder};

type Customize = Arc<dyn Fn(AzureKeyWrapperBuilder) -> AzureKeyWrapperBuilder + Send + Sync>;

/// A [`WrapperFactory`] for `azure` configs. By default it builds as
/// [`AzureKeyWrapper::from_config`]. The config is the tenant's; the
/// operator's settings live here: the [identity](Self::identity), an
/// [endpoint override](AzureKeyWrapperBuilder::endpoint_url) and the Entra
/// tenants and vaults a tenant may name, and through
/// [`with_builder`](Self::with_builder) any other builder setting (transport,
/// authority host, retry policy…) applied to every wrapper it builds
/// (docs/THREAT_MODEL.md, "Tenant and operator settings").
///
/// ```
/// use keyfold_azure::{AzureFactory, AzureIdentity};
/// let service = AzureFactory::new().identity(AzureIdentity::ClientSecret {
///     client_id: "00000000-0000-0000-0000-0000000000c1".into(),
///     env_var: "KEYFOLD_AZURE_CLIENT_SECRET".into(),
/// });
/// // Narrowed to what was verified when tenant A signed up.
/// let tenant_a = service
///     .clone()
///     .allowed_tenant_ids(["11111111-1111-1111-1111-111111111111"])
///     .allowed_vaults(["https://tenant-a.vault.azure.net"]);
/// # let _ = tenant_a;
/// ```
#[derive(Clone, Default)]
pub struct AzureFactory {
    customize: Option<Customize>,
    identity: AzureIdentity,
    endpoint_url: Option<String>,
    allow_loopback: bool,
    allowed_tenant_ids: Option<Vec<String>>,
    allowed_vaults: Option<Vec<String>>,
}

impl fmt::Debug for AzureFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureFactory")
            .field("customized", &self.customize.is_some())
            .field("identity", &self.identity)
            .field("endpoint_url", &self.endpoint_url)
            .field("allow_loopback", &self.allow_loopback)
            .field("allowed_tenant_ids", &self.allowed_tenant_ids)
            .field("allowed_vaults", &self.allowed_vaults)
            .finish()
    }
}

impl AzureFactory {
    /// A factory building with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// A factory that passes each builder through `customize` before building.
    pub fn with_builder(
        customize: impl Fn(AzureKeyWrapperBuilder) -> AzureKeyWrapperBuilder + Send + Sync + 'static,
    ) -> Self {
        AzureFactory {
            customize: Some(Arc::new(customize)),
            ..Self::default()
        }
    }

    /// See [`AzureKeyWrapperBuilder::identity`].
    #[must_use]
    pub fn identity(mut self, identity: AzureIdentity) -> Self {
        self.identity = identity;
        self
    }

    /// See [`AzureKeyWrapperBuilder::endpoint_url`].
    #[must_use]
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// See [`AzureKeyWrapperBuilder::allow_loopback_endpoints_for_tests`].
    #[must_use]
    pub fn allow_loopback_endpoints_for_tests(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// See [`AzureKeyWrapperBuilder::allowed_tenant_ids`]. A factory is cheap
    /// to clone: narrow a clone to each tenant's directories.
    #[must_use]
    pub fn allowed_tenant_ids<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.allowed_tenant_ids = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// See [`AzureKeyWrapperBuilder::allowed_vaults`].
    #[must_use]
    pub fn allowed_vaults<S: Into<String>>(mut self, vaults: impl IntoIterator<Item = S>) -> Self {
        self.allowed_vaults = Some(vaults.into_iter().map(Into::into).collect());
        self
    }

    /// The builder for `config` with this factory's settings applied.
    pub fn builder(&self, config: &keyfold_core::config::AzureConfig) -> AzureKeyWrapperBuilder {
        let mut builder = AzureKeyWrapper::builder(config)
            .identity(self.identity.clone())
            .allow_loopback_endpoints_for_tests(self.allow_loopback);
        if let Some(url) = &self.endpoint_url {
            builder = builder.endpoint_url(url.clone());
        }
        if let Some(ids) = &self.allowed_tenant_ids {
            builder = builder.allowed_tenant_ids(ids.clone());
        }
        if let Some(vaults) = &self.allowed_vaults {
            builder = builder.allowed_vaults(vaults.clone());
        }
        match &self.customize {
            Some(customize) => customize(builder),
            None => builder,
        }
    }
}

#[async_trait]
impl WrapperFactory for AzureFactory {
    async fn build(&self, config: &ProviderConfig) -> Result<Arc<dyn KeyWrapper>, WrapError> {
        let ProviderConfig::Azure(azure) = config else {
            return Err(WrapError::new(
                WrapErrorKind::Misconfigured,
                config.provider(),
                config.kms_key_ref(),
                WrapOperation::Configure,
            )
            .with_message(format!(
                "AzureFactory cannot build a {} wrapper",
                config.provider()
            )));
        };
        Ok(Arc::new(self.builder(azure).build()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfold_core::config::ProviderConfig;

    #[tokio::test]
    async fn refuses_other_providers_and_builds_azure() {
        let local: ProviderConfig = serde_json::from_value(serde_json::json!({
            "provider": "local", "kms_key_ref": "dev", "kek_env_var": "KEK"
        }))
        .unwrap();
        let err = AzureFactory::new().build(&local).await.unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::Misconfigured);
        assert!(
            err.to_string().contains("cannot build a local wrapper"),
            "{err}"
        );

        let azure: ProviderConfig = serde_json::from_value(serde_json::json!({
            "provider": "azure",
            "kms_key_ref": "https://acme-keys.vault.azure.net/keys/k",
            "vault_url": "https://acme-keys.vault.azure.net",
        }))
        .unwrap();
        let factory = AzureFactory::with_builder(|b| b.environment(|_| None));
        let wrapper = factory.build(&azure).await.unwrap();
        assert_eq!(wrapper.provider(), "azure");
        assert_eq!(
            wrapper.key_ref(),
            "https://acme-keys.vault.azure.net/keys/k"
        );
        assert!(format!("{factory:?}").contains("customized: true"));
    }
}
