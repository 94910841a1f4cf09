//! Choosing the Entra ID credential a wrapper authenticates with.
//!
//! Only role-based identities (docs: DESIGN "configs name role-based access
//! only"): managed identity or workload identity by default, or a client
//! secret read at build time from the environment variable the config names.
//! The secret's value is never stored in the config, never printed by `Debug`,
//! and never part of an error message.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::ClientOptions;
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use keyfold_core::config::AzureConfig;
use zeroize::Zeroizing;

/// Environment variable AKS's workload identity webhook sets to the projected
/// service-account token file; its presence selects workload identity.
pub(crate) const FEDERATED_TOKEN_FILE_VAR: &str = "AZURE_FEDERATED_TOKEN_FILE";
const TENANT_ID_VAR: &str = "AZURE_TENANT_ID";
const CLIENT_ID_VAR: &str = "AZURE_CLIENT_ID";

/// Where a wrapper's Entra ID token comes from. Shown by the wrapper's
/// `Debug`; holds names and ids only, never a secret.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialSource {
    /// The host's managed identity: system-assigned, or the user-assigned
    /// identity with the config's `client_id`. The default.
    ManagedIdentity {
        /// Client id of a user-assigned identity.
        client_id: Option<String>,
    },
    /// Entra workload identity federation (AKS): chosen when
    /// `AZURE_FEDERATED_TOKEN_FILE` is set and the config names no secret.
    WorkloadIdentity {
        /// Tenant (config `azure_tenant_id`, else `AZURE_TENANT_ID`).
        tenant_id: String,
        /// Client id (config `client_id`, else `AZURE_CLIENT_ID`).
        client_id: String,
        /// The projected service-account token file.
        token_file: PathBuf,
    },
    /// A client secret read from the environment variable `env_var`.
    ClientSecret {
        /// Tenant.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// Name of the variable holding the secret.
        env_var: String,
    },
    /// A credential the host handed to the builder.
    Custom,
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::ManagedIdentity { client_id } => f
                .debug_struct("ManagedIdentity")
                .field("client_id", client_id)
                .finish(),
            CredentialSource::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => f
                .debug_struct("WorkloadIdentity")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("token_file", token_file)
                .finish(),
            CredentialSource::ClientSecret {
                tenant_id,
                client_id,
                env_var,
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("env_var", env_var)
                .field("secret", &"******")
                .finish(),
            CredentialSource::Custom => f.write_str("Custom"),
        }
    }
}

/// Reads an environment variable; `None` when unset.
pub(crate) type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub(crate) fn process_env() -> EnvLookup {
    Arc::new(|name| std::env::var(name).ok())
}

impl CredentialSource {
    /// The default choice for `config`: a client secret when the config names
    /// its variable, else workload identity when the federated token file is
    /// advertised, else managed identity.
    pub(crate) fn select(config: &AzureConfig, env: &EnvLookup) -> Result<Self, String> {
        if let Some(var) = &config.client_secret_env_var {
            let (Some(tenant_id), Some(client_id)) = (&config.azure_tenant_id, &config.client_id)
            else {
                return Err("a client secret needs `azure_tenant_id` and `client_id`".into());
            };
            return Ok(CredentialSource::ClientSecret {
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                env_var: var.clone(),
            });
        }
        if let Some(file) = env(FEDERATED_TOKEN_FILE_VAR).filter(|f| !f.is_empty()) {
            let tenant_id = config
                .azure_tenant_id
                .clone()
                .or_else(|| env(TENANT_ID_VAR))
                .ok_or_else(|| {
                    format!("workload identity needs `azure_tenant_id` or {TENANT_ID_VAR}")
                })?;
            let client_id = config
                .client_id
                .clone()
                .or_else(|| env(CLIENT_ID_VAR))
                .ok_or_else(|| format!("workload identity needs `client_id` or {CLIENT_ID_VAR}"))?;
            return Ok(CredentialSource::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file: PathBuf::from(file),
            });
        }
        Ok(CredentialSource::ManagedIdentity {
            client_id: config.client_id.clone(),
        })
    }

    /// Builds the SDK credential. Makes no network call.
    pub(crate) fn build(
        &self,
        env: &EnvLookup,
        client_options: ClientOptions,
    ) -> Result<Arc<dyn TokenCredential>, String> {
        match self {
            CredentialSource::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options,
                };
                ManagedIdentityCredential::new(Some(options))
                    .map(|c| c as Arc<dyn TokenCredential>)
                    .map_err(|e| format!("managed identity: {e}"))
            }
            CredentialSource::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => {
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions { client_options },
                    client_id: Some(client_id.clone()),
                    tenant_id: Some(tenant_id.clone()),
                    token_file_path: Some(token_file.clone()),
                };
                WorkloadIdentityCredential::new(Some(options))
                    .map(|c| c as Arc<dyn TokenCredential>)
                    .map_err(|e| format!("workload identity: {e}"))
            }
            CredentialSource::ClientSecret {
                tenant_id,
                client_id,
                env_var,
            } => {
                let value = Zeroizing::new(
                    env(env_var)
                        .ok_or_else(|| format!("environment variable {env_var} is not set"))?,
                );
                if value.trim().is_empty() {
                    return Err(format!("environment variable {env_var} is empty"));
                }
                let secret = Secret::new(value.trim().to_owned());
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    secret,
                    Some(ClientSecretCredentialOptions { client_options }),
                )
                .map(|c| c as Arc<dyn TokenCredential>)
                // The SDK's validation messages name the field, not its value.
                .map_err(|e| format!("client secret credential: {e}"))
            }
            CredentialSource::Custom => Err("a custom credential must be supplied".into()),
        }
    }
}
