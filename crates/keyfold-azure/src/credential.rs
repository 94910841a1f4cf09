//! Choosing the Entra ID credential a wrapper authenticates with.
//!
//! Only role-based identities (docs: DESIGN "configs name role-based access
//! only"): managed identity or workload identity by default, or a client
//! secret read at build time from the environment variable the *operator*
//! names ([`AzureIdentity`]). A tenant's config names only the Entra tenant
//! (directory) and, optionally, the client id of the identity the operator
//! chose: it can neither pick another identity of the host nor name an
//! environment variable (docs/THREAT_MODEL.md, "Tenant and operator
//! settings"). The secret's value is never stored in a config, never printed
//! by `Debug`, and never part of an error message.

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
use keyfold_core::config::{AzureConfig, ConfigError};
use zeroize::Zeroizing;

use crate::PROVIDER;

/// Environment variable AKS's workload identity webhook sets to the projected
/// service-account token file; its presence selects workload identity.
pub(crate) const FEDERATED_TOKEN_FILE_VAR: &str = "AZURE_FEDERATED_TOKEN_FILE";
const TENANT_ID_VAR: &str = "AZURE_TENANT_ID";
const CLIENT_ID_VAR: &str = "AZURE_CLIENT_ID";

/// The operator's choice of the Entra ID identity a wrapper authenticates
/// with: set on [`AzureKeyWrapperBuilder::identity`](crate::AzureKeyWrapperBuilder::identity)
/// or [`AzureFactory::identity`](crate::AzureFactory::identity), never taken
/// from a tenant's config.
///
/// A tenant config's `client_id` selects nothing: when given, it must be the
/// client id of the identity chosen here, or the build is refused (a tenant
/// cannot switch the service to another identity attached to the host).
/// Its `azure_tenant_id` names the Entra tenant (directory) a client secret
/// or workload identity authenticates in; pin it per tenant with
/// [`AzureKeyWrapperBuilder::allowed_tenant_ids`](crate::AzureKeyWrapperBuilder::allowed_tenant_ids).
///
/// `Debug` shows names and ids, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AzureIdentity {
    /// Entra workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (its
    /// client id from `AZURE_CLIENT_ID`; the Entra tenant from the config's
    /// `azure_tenant_id`, else `AZURE_TENANT_ID`), else the host's
    /// system-assigned managed identity. The default.
    #[default]
    Ambient,
    /// The host's managed identity: system-assigned (`None`) or the
    /// user-assigned identity with this client id.
    ManagedIdentity {
        /// Client id of a user-assigned identity.
        client_id: Option<String>,
    },
    /// An app registration's client secret, read at build time from the
    /// environment variable `env_var` (A-Z, 0-9, `_`); the tenant's config
    /// must name the Entra tenant (`azure_tenant_id`).
    ClientSecret {
        /// The application (client) id the secret belongs to.
        client_id: String,
        /// Name of the environment variable holding the secret.
        env_var: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidField {
        provider: PROVIDER,
        field,
        reason: reason.into(),
    }
}

/// A tenant config's `client_id` must be the operator's identity's, if given.
fn check_client_id(config: &AzureConfig, operator: Option<&str>) -> Result<(), ConfigError> {
    match (config.client_id.as_deref(), operator) {
        (None, _) => Ok(()),
        (Some(theirs), Some(ours)) if theirs.eq_ignore_ascii_case(ours) => Ok(()),
        (Some(_), Some(_)) => Err(invalid(
            "client_id",
            "is not the client id of the identity the operator configured; \
             a tenant config cannot choose another identity of the service",
        )),
        (Some(_), None) => Err(invalid(
            "client_id",
            "the operator configured an identity without a client id (system-assigned \
             managed identity); a tenant config cannot choose another identity of the service",
        )),
    }
}

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
    /// The credential for a tenant's `config` under the operator's `identity`.
    pub(crate) fn select(
        config: &AzureConfig,
        identity: &AzureIdentity,
        env: &EnvLookup,
    ) -> Result<Self, ConfigError> {
        match identity {
            AzureIdentity::ClientSecret { client_id, env_var } => {
                if !is_env_var_name(env_var) {
                    return Err(invalid(
                        "client_secret_env_var",
                        "the operator's variable name must be 1..=128 of A-Z, 0-9, _",
                    ));
                }
                check_client_id(config, Some(client_id))?;
                let tenant_id = config.azure_tenant_id.clone().ok_or_else(|| {
                    invalid(
                        "azure_tenant_id",
                        "a client secret needs the Entra tenant to authenticate in",
                    )
                })?;
                Ok(CredentialSource::ClientSecret {
                    tenant_id,
                    client_id: client_id.clone(),
                    env_var: env_var.clone(),
                })
            }
            AzureIdentity::ManagedIdentity { client_id } => {
                check_client_id(config, client_id.as_deref())?;
                Ok(CredentialSource::ManagedIdentity {
                    client_id: client_id.clone(),
                })
            }
            AzureIdentity::Ambient => {
                let Some(file) = env(FEDERATED_TOKEN_FILE_VAR).filter(|f| !f.is_empty()) else {
                    check_client_id(config, None)?;
                    return Ok(CredentialSource::ManagedIdentity { client_id: None });
                };
                let tenant_id = config
                    .azure_tenant_id
                    .clone()
                    .or_else(|| env(TENANT_ID_VAR))
                    .ok_or_else(|| {
                        invalid(
                            "azure_tenant_id",
                            format!("workload identity needs `azure_tenant_id` or {TENANT_ID_VAR}"),
                        )
                    })?;
                let client_id = env(CLIENT_ID_VAR).ok_or_else(|| {
                    invalid(
                        "client_id",
                        format!(
                            "workload identity needs {CLIENT_ID_VAR} in the service's environment"
                        ),
                    )
                })?;
                check_client_id(config, Some(&client_id))?;
                Ok(CredentialSource::WorkloadIdentity {
                    tenant_id,
                    client_id,
                    token_file: PathBuf::from(file),
                })
            }
        }
    }

    /// The Entra tenant this credential authenticates in, when it names one.
    pub(crate) fn tenant_id(&self) -> Option<&str> {
        match self {
            CredentialSource::WorkloadIdentity { tenant_id, .. }
            | CredentialSource::ClientSecret { tenant_id, .. } => Some(tenant_id),
            _ => None,
        }
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
                // One message for unset and empty: an error never tells
                // whether a variable exists.
                let unusable = || format!("the client secret variable {env_var} is unset or empty");
                let value = Zeroizing::new(env(env_var).ok_or_else(unusable)?);
                if value.trim().is_empty() {
                    return Err(unusable());
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

/// An environment variable name as keyfold accepts it: 1..=128 of A-Z, 0-9, `_`.
pub(crate) fn is_env_var_name(var: &str) -> bool {
    !var.is_empty()
        && var.len() <= 128
        && var
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}
