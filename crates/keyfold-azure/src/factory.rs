//! [`AzureFactory`]: builds Azure wrappers from `azure` provider configs for
//! keyfold's onboarding probe ([`keyfold_core::probe::ConfigSlot`]).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keyfold_core::config::ProviderConfig;
use keyfold_core::probe::WrapperFactory;
use keyfold_core::{KeyWrapper, WrapError, WrapErrorKind, WrapOperation};

use crate::wrapper::{AzureKeyWrapper, AzureKeyWrapperBuilder};

type Customize = Arc<dyn Fn(AzureKeyWrapperBuilder) -> AzureKeyWrapperBuilder + Send + Sync>;

/// A [`WrapperFactory`] for `azure` configs. By default it builds as
/// [`AzureKeyWrapper::from_config`]; [`with_builder`](Self::with_builder)
/// applies host settings (transport, authority host, retry policy…) to
/// every wrapper it builds.
#[derive(Clone, Default)]
pub struct AzureFactory {
    customize: Option<Customize>,
}

impl fmt::Debug for AzureFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureFactory")
            .field("customized", &self.customize.is_some())
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
        let builder = AzureKeyWrapper::builder(azure);
        let builder = match &self.customize {
            Some(customize) => customize(builder),
            None => builder,
        };
        Ok(Arc::new(builder.build()?))
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
