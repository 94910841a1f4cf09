//! What every command may need: the config, the store, the KMS wrapper, the
//! audit sink and the actor, built lazily from the global options.

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::Actor;
use keyfold_core::store::KeyringStore;
use keyfold_core::{KeyWrapper, Keyring};

use crate::audit::JsonLinesSink;
use crate::cli::Cli;
use crate::config::{self, Config, StoreUrl};
use crate::error::{CliError, Kind};
use crate::ui::Output;

/// The global options, resolved.
#[derive(Debug)]
pub(crate) struct Globals {
    pub(crate) output: Output,
    pub(crate) config: Config,
    store: Option<String>,
    audit_log: Option<String>,
    actor: Option<String>,
    pub(crate) yes: bool,
}

impl Globals {
    pub(crate) fn new(cli: &Cli) -> Result<Globals, CliError> {
        Ok(Globals {
            output: Output { json: cli.json },
            config: Config::load(cli.config.as_deref())?,
            store: cli.store.clone(),
            audit_log: cli.audit_log.clone(),
            actor: cli.actor.clone(),
            yes: cli.yes,
        })
    }

    /// The store: `--store`, else the config's `store`.
    pub(crate) async fn store(&self, create: bool) -> Result<Arc<dyn KeyringStore>, CliError> {
        let url = self
            .store
            .as_deref()
            .or(self.config.store.as_deref())
            .ok_or_else(|| {
                CliError::usage(
                    "no keyring store: pass --store file://DIR or set \"store\" in the config",
                )
            })?;
        StoreUrl::parse(url)?
            .open(create, self.config.table_prefix.as_deref())
            .await
    }

    /// The audit sink: `--audit-log`, else the config's, else stderr.
    pub(crate) fn audit(&self) -> Result<Arc<JsonLinesSink>, CliError> {
        JsonLinesSink::open(
            self.audit_log
                .as_deref()
                .or(self.config.audit_log.as_deref()),
        )
        .map(Arc::new)
    }

    /// The operator.
    pub(crate) fn actor(&self) -> Result<Actor, CliError> {
        config::actor(self.actor.as_deref()).map(Actor::new)
    }

    /// The KMS wrapper from the config.
    pub(crate) async fn wrapper(&self) -> Result<Arc<dyn KeyWrapper>, CliError> {
        let kms = self.config.kms()?;
        config::build_wrapper(&kms)
            .await
            .map_err(|e| CliError::new(Kind::Kms, e.to_string()))
    }

    /// Opens keyring `id` (or creates it) over the store, the configured
    /// wrapper and the audit sink.
    pub(crate) async fn keyring(
        &self,
        id: &str,
        wrapper: Arc<dyn KeyWrapper>,
        audit: Arc<JsonLinesSink>,
        create: bool,
    ) -> Result<Keyring, CliError> {
        let mut builder = Keyring::builder(id, wrapper, self.store(create).await?).audit(audit);
        let settings = self.config.keyring;
        if let Some(s) = settings.max_staleness_secs {
            builder = builder.max_staleness(Duration::from_secs(s));
        }
        if let Some(s) = settings.write_window_secs {
            builder = builder.write_window(Duration::from_secs(s));
        }
        if let Some(s) = settings.destroy_grace_secs {
            builder = builder.destroy_grace(Duration::from_secs(s));
        }
        Ok(if create {
            builder.create().await?
        } else {
            builder.open().await?
        })
    }
}
