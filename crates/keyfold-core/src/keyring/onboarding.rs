//! Onboarding's keyring side: the slot holding a tenant's accepted provider
//! config, replaced only by one that probes, with every attempt audited
//! (docs/LIFECYCLE.md, "Onboarding"). The probe itself is the wrapping
//! layer's ([`crate::wrap::probe`]).

use std::sync::{Arc, PoisonError, RwLock};

use super::audit::{Actor, AuditEvent, AuditKind, AuditSink};
use super::time::Timestamp;
use crate::wrap::KeyWrapper;
use crate::wrap::config::ProviderConfig;
use crate::wrap::probe::{ProbeFailure, WrapperFactory, probe_config};

/// A config together with the wrapper built from it and probed.
#[derive(Debug, Clone)]
pub struct ProbedConfig {
    /// The config.
    pub config: ProviderConfig,
    /// Its wrapper.
    pub wrapper: Arc<dyn KeyWrapper>,
}

/// A tenant's current provider config, replaced only by one that probes.
#[derive(Debug, Default)]
pub struct ConfigSlot {
    current: RwLock<Option<ProbedConfig>>,
}

impl ConfigSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current config and wrapper.
    pub fn current(&self) -> Option<ProbedConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Validates `config`, builds its wrapper with `factory` and probes it;
    /// only then replaces the current config (`kms.config.updated`). On
    /// failure emits `kms.probe.failed` and leaves the slot unchanged.
    ///
    /// Switching an existing keyring to the new wrapper is a separate step:
    /// [`Keyring::rewrap_master_keys`](crate::keyring::Keyring::rewrap_master_keys).
    ///
    /// # Errors
    /// [`ProbeFailure`] naming the step that failed.
    pub async fn upsert(
        &self,
        config: ProviderConfig,
        factory: &dyn WrapperFactory,
        keyring_id: &str,
        audit: &dyn AuditSink,
        actor: &Actor,
    ) -> Result<ProbedConfig, ProbeFailure> {
        let result = probe_config(&config, factory).await;
        let event = |kind| AuditEvent {
            keyring_id: keyring_id.to_owned(),
            actor: actor.clone(),
            at: Timestamp::now(),
            kind,
        };
        match result {
            Ok(wrapper) => {
                let probed = ProbedConfig { config, wrapper };
                let previous = self
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .replace(probed.clone());
                audit.record(event(AuditKind::ConfigUpdated {
                    provider: probed.config.provider().to_owned(),
                    key_ref: probed.config.kms_key_ref().to_owned(),
                    previous_key_ref: previous.map(|p| p.config.kms_key_ref().to_owned()),
                }));
                Ok(probed)
            }
            Err(f) => {
                audit.record(event(AuditKind::ProbeFailed {
                    provider: f.provider.clone(),
                    key_ref: f.key_ref.clone(),
                    step: f.step,
                    error_kind: f.kind,
                    message: f.message.clone(),
                }));
                Err(f)
            }
        }
    }
}
