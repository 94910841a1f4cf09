//! The operator's config file, the store URL, the KMS wrapper and the actor.
//!
//! ```json
//! {
//!   "store": "file:///var/lib/keyfold/keyrings",
//!   "kms": {"provider": "local", "kms_key_ref": "ops-kek", "kek_file": "kek.hex"},
//!   "audit_log": "/var/log/keyfold/audit.jsonl"
//! }
//! ```
//!
//! A file holding only a provider config (`{"provider": ...}`) is read as
//! `{"kms": ...}`. A relative `kek_file` is relative to the config file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyfold_core::config::ProviderConfig;
use keyfold_core::probe::{LocalFactory, WrapperFactory};
use keyfold_core::store::{FileStore, KeyringStore};
use keyfold_core::{KeyWrapper, WrapError, WrapErrorKind, WrapOperation};
use serde::Deserialize;

use crate::error::{CliError, Kind};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    store: Option<String>,
    #[serde(default)]
    kms: Option<serde_json::Value>,
    #[serde(default)]
    audit_log: Option<String>,
    #[serde(default)]
    keyring: KeyringSettings,
    #[serde(default)]
    table_prefix: Option<String>,
}

/// Keyring settings that must match the services' own (docs/LIFECYCLE.md):
/// the CLI judges staleness, write windows and grace periods as they do.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyringSettings {
    /// `KeyringBuilder::max_staleness`, seconds (default 30).
    pub(crate) max_staleness_secs: Option<u64>,
    /// `KeyringBuilder::write_window`, seconds.
    pub(crate) write_window_secs: Option<u64>,
    /// `KeyringBuilder::destroy_grace`, seconds (default 24 h).
    pub(crate) destroy_grace_secs: Option<u64>,
}

/// The config file, parsed and checked.
#[derive(Debug, Default)]
pub(crate) struct Config {
    pub(crate) store: Option<String>,
    /// The `kms` section, parsed (and so validated) when used.
    kms: Option<serde_json::Value>,
    /// The config file's directory (relative `kek_file`s are relative to it).
    dir: Option<PathBuf>,
    pub(crate) audit_log: Option<String>,
    pub(crate) keyring: KeyringSettings,
    /// keyfold-postgres's table prefix (default `keyfold_`).
    pub(crate) table_prefix: Option<String>,
}

impl Config {
    /// Reads `path`; no path gives an empty config.
    pub(crate) fn load(path: Option<&Path>) -> Result<Config, CliError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let bad = |m: String| CliError::usage(format!("config file {}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let raw: RawConfig = if value.get("provider").is_some() {
            RawConfig {
                kms: Some(value),
                ..RawConfig::default()
            }
        } else {
            serde_json::from_value(value).map_err(|e| bad(e.to_string()))?
        };
        Ok(Config {
            store: raw.store,
            kms: raw.kms,
            dir: path.parent().map(Path::to_path_buf),
            audit_log: raw.audit_log,
            keyring: raw.keyring,
            table_prefix: raw.table_prefix,
        })
    }

    /// True when the config has a `kms` section.
    pub(crate) fn has_kms(&self) -> bool {
        self.kms.is_some()
    }

    /// The `kms` section's provider and key names as written (for messages
    /// about a config that does not parse).
    pub(crate) fn kms_names(&self) -> (String, String) {
        let field = |name: &str| {
            self.kms
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned()
        };
        (field("provider"), field("kms_key_ref"))
    }

    /// The KMS config, parsed and validated; a usage error when there is
    /// none or it is refused.
    pub(crate) fn kms(&self) -> Result<ProviderConfig, CliError> {
        let value = self.kms.clone().ok_or_else(|| {
            CliError::usage(
                "no KMS configured: pass --config FILE with a \"kms\" section \
                 (e.g. {\"provider\": \"local\", \"kms_key_ref\": \"ops-kek\", \"kek_file\": \"kek.hex\"})",
            )
        })?;
        let mut kms = ProviderConfig::try_from(value)
            .map_err(|e| CliError::usage(format!("KMS config refused: {e}")))?;
        if let ProviderConfig::Local(local) = &mut kms
            && let Some(file) = &local.kek_file
            && Path::new(file).is_relative()
            && let Some(dir) = &self.dir
        {
            local.kek_file = Some(dir.join(file).display().to_string());
        }
        Ok(kms)
    }
}

/// A store named by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// `file://DIR`.
    File(PathBuf),
    /// `postgres://…` (keyfold-postgres's `PgKeyringStore`).
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl StoreUrl {
    /// Parses `file://DIR` (`file:///abs/dir` or `file://rel/dir`) or
    /// `postgres://…`.
    pub(crate) fn parse(url: &str) -> Result<StoreUrl, CliError> {
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(CliError::usage(format!(
                    "store URL {url:?} names no directory: use file:///path/to/dir"
                )));
            }
            return Ok(StoreUrl::File(PathBuf::from(path)));
        }
        let scheme = url.split_once("://").map(|(s, _)| s);
        #[cfg(feature = "postgres")]
        if matches!(scheme, Some("postgres" | "postgresql")) {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        Err(CliError::usage(match scheme {
            Some("postgres" | "postgresql") => format!(
                "store URL {:?}: this keyfold was built without the `postgres` feature",
                redact_url(url)
            ),
            Some(s) => {
                format!("store URL scheme {s:?} is not supported: use file://DIR or postgres://…")
            }
            None => format!(
                "store {:?} is not a URL: use file://DIR or postgres://…",
                redact_url(url)
            ),
        }))
    }

    /// Opens the store. `create`: make the directory (or the tables) if
    /// missing; otherwise a missing store directory is a not-found error,
    /// not a new store.
    pub(crate) async fn open(
        &self,
        create: bool,
        table_prefix: Option<&str>,
    ) -> Result<Arc<dyn KeyringStore>, CliError> {
        match self {
            StoreUrl::File(dir) => {
                let _ = table_prefix;
                if !create && !dir.is_dir() {
                    return Err(CliError::new(
                        Kind::NotFound,
                        format!("store directory {} does not exist", dir.display()),
                    ));
                }
                Ok(Arc::new(FileStore::new(dir.clone())?))
            }
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(url) => {
                let pool = pg::connect(url).await?;
                let prefix = pg::prefix(table_prefix)?;
                if create {
                    keyfold_postgres::migrate(&pool, &prefix)
                        .await
                        .map_err(|e| {
                            CliError::failure(format!("creating the store's tables: {e}"))
                        })?;
                }
                Ok(Arc::new(keyfold_postgres::PgKeyringStore::new(
                    pool, prefix,
                )))
            }
        }
    }
}

/// PostgreSQL connections.
#[cfg(feature = "postgres")]
pub(crate) mod pg {
    use keyfold_postgres::TablePrefix;

    use super::redact_url;
    use crate::error::CliError;

    /// A small pool on `url` (the password never appears in errors). One
    /// connection is made first, so an unreachable server fails at once
    /// rather than after the pool's retries.
    pub(crate) async fn connect(url: &str) -> Result<sqlx::PgPool, CliError> {
        use sqlx::{ConnectOptions, Connection};
        let failed = |e: &dyn std::fmt::Display| {
            CliError::failure(format!(
                "cannot connect to {}: {}",
                redact_url(url),
                redact_url(&e.to_string())
            ))
        };
        let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            CliError::usage(format!(
                "store URL {}: {}",
                redact_url(url),
                redact_url(&e.to_string())
            ))
        })?;
        let options = options.disable_statement_logging();
        let first = options.connect().await.map_err(|e| failed(&e))?;
        let _ = first.close().await;
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(15))
            .connect_lazy_with(options))
    }

    /// The configured table prefix, checked.
    pub(crate) fn prefix(prefix: Option<&str>) -> Result<TablePrefix, CliError> {
        match prefix {
            None => Ok(TablePrefix::default()),
            Some(p) => TablePrefix::new(p).map_err(|e| CliError::usage(e.to_string())),
        }
    }
}

/// `url` with any password replaced, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:******@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

/// Builds the wrapper for `config` with the provider crates this binary was
/// built with.
///
/// # Errors
/// [`WrapError`] (`Misconfigured` for a provider left out of this build).
pub(crate) async fn build_wrapper(
    config: &ProviderConfig,
) -> Result<Arc<dyn KeyWrapper>, WrapError> {
    match config.provider() {
        "local" => LocalFactory.build(config).await,
        #[cfg(feature = "aws")]
        "aws" => keyfold_aws::AwsWrapperFactory::new().build(config).await,
        #[cfg(feature = "gcp")]
        "gcp" => keyfold_gcp::GcpWrapperFactory::new().build(config).await,
        #[cfg(feature = "azure")]
        "azure" => keyfold_azure::AzureFactory::new().build(config).await,
        other => Err(WrapError::new(
            WrapErrorKind::Misconfigured,
            config.provider(),
            config.kms_key_ref(),
            WrapOperation::Configure,
        )
        .with_message(format!(
            "this keyfold was built without the `{other}` provider: rebuild with \
             `cargo install keyfold-cli --features {other}`"
        ))),
    }
}

/// The operator named in audit events.
pub(crate) fn actor(flag: Option<&str>) -> Result<String, CliError> {
    let from_env = |var: &str| std::env::var(var).ok().filter(|v| !v.trim().is_empty());
    flag.map(str::to_owned)
        .or_else(|| from_env("KEYFOLD_ACTOR"))
        .or_else(|| from_env("USER"))
        .or_else(|| from_env("LOGNAME"))
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            CliError::usage("name the operator for the audit log: --actor NAME or KEYFOLD_ACTOR")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            StoreUrl::parse("file:///var/lib/k").ok(),
            Some(StoreUrl::File("/var/lib/k".into()))
        );
        assert_eq!(
            StoreUrl::parse("file://rel/dir").ok(),
            Some(StoreUrl::File("rel/dir".into()))
        );
        #[cfg(feature = "postgres")]
        assert_eq!(
            StoreUrl::parse("postgres://u:pw@h/db").ok(),
            Some(StoreUrl::Postgres("postgres://u:pw@h/db".into()))
        );
        for bad in ["file://", "/var/lib/k", "s3://bucket", "mysql://u:pw@h/db"] {
            let e = StoreUrl::parse(bad).err();
            assert_eq!(e.as_ref().map(|e| e.kind), Some(Kind::Usage), "{bad}");
            assert!(!e.is_some_and(|e| e.message.contains("pw@")), "{bad}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:******@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
