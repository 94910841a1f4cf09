#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a security library answers bad input with a typed error, never a panic"
)]

mod credential;
mod errors;
mod factory;
mod kid;
mod sleep;
mod wrapper;

pub use credential::{AzureIdentity, CredentialSource};
pub use factory::AzureFactory;
pub use kid::KeyId;
pub use sleep::{Sleeper, TokioSleeper};
pub use wrapper::{AzureKeyWrapper, AzureKeyWrapperBuilder, WrapAlgorithm, check_vault_endpoint};

/// Provider name recorded in every [`WrappedKey`](keyfold_core::WrappedKey) this crate makes.
pub const PROVIDER: &str = "azure";

/// The Entra ID scope of Key Vault and Managed HSM data-plane tokens in the
/// public cloud. The client learns the scope from the vault's 401 challenge;
/// this is what a real vault names.
pub const KEY_VAULT_SCOPE: &str = "https://vault.azure.net/.default";

/// Re-exports of the Azure SDK types that appear in this crate's API, so a
/// host does not have to pin `azure_core` itself.
pub mod sdk {
    pub use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
    pub use azure_core::http::{HttpClient, Transport};
    pub use azure_core::time::{Duration as AzureDuration, OffsetDateTime};
}
