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
