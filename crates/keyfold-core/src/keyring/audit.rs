//! Audit events: every keyring state change, rotation, probe failure and KMS
//! re-wrap is reported to an [`AuditSink`] the host implements, with the
//! actor the host supplies (docs/LIFECYCLE.md, "Audit events").
//!
//! Events carry version numbers, states, provider names and key references;
//! never key material.

use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::state::{KeyState, StateChange, Transition};
use super::time::Timestamp;
use crate::wrap::error::WrapErrorKind;
use crate::wrap::probe::ProbeStep;

/// Who asked for an operation: a user, a service or a scheduler, as the host names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Actor(pub String);

impl Actor {
    /// An actor named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Actor(name.into())
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Actor {
    fn from(s: &str) -> Self {
        Actor(s.to_owned())
    }
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// The keyring (tenant) concerned.
    pub keyring_id: String,
    /// Who asked.
    pub actor: Actor,
    /// When.
    pub at: Timestamp,
    /// What happened.
    pub kind: AuditKind,
}

impl AuditEvent {
    /// The event's dotted name, e.g. `kms.rotate`.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
}

/// What happened. [`name`](Self::name) gives the stable event name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditKind {
    /// `kms.rotate` / `kms.rotate.scheduled`: a new version was created and made active.
    Rotate {
        /// The new active version.
        new_version: u32,
        /// The new version's id.
        version_id: String,
        /// The version it replaced (now retired).
        previous_version: Option<u32>,
        /// True when the rotation policy triggered it.
        scheduled: bool,
        /// The wrapping provider (`local`, `aws`, ...).
        wrap_provider: String,
        /// The KMS key that wrapped the new version.
        wrap_key_ref: String,
        /// The rewrap lease issued for it, if any.
        lease_id: Option<String>,
    },
    /// `kms.version.created`: a `Pending` version was created.
    VersionCreated {
        /// The new version.
        version: u32,
        /// Its id.
        version_id: String,
        /// The KMS key that wrapped it.
        wrap_key_ref: String,
    },
    /// `kms.version.state_changed`.
    StateChanged {
        /// The version.
        version: u32,
        /// State before.
        from: KeyState,
        /// State after.
        to: KeyState,
        /// The transition.
        transition: Transition,
        /// For a destroy: true when forced without evidence.
        forced: bool,
        /// For a destroy: the evidence's source, or the reason given for forcing.
        detail: Option<String>,
    },
    /// `kms.rekey`: every live version was re-wrapped under another KMS key.
    KmsRewrap {
        /// The previous provider and key.
        from_provider: String,
        /// The previous key reference.
        from_key_ref: String,
        /// The new provider.
        to_provider: String,
        /// The new key reference.
        to_key_ref: String,
        /// The versions re-wrapped.
        versions: Vec<u32>,
    },
    /// `kms.sealed`: the KMS refused or could not be reached.
    Sealed {
        /// The failure kind.
        kind: WrapErrorKind,
    },
    /// `kms.unsealed`: the KMS answered again.
    Unsealed,
    /// `kms.probe.failed`: an onboarding probe failed; nothing changed.
    ProbeFailed {
        /// Provider of the config probed.
        provider: String,
        /// Its key reference.
        key_ref: String,
        /// The step that failed.
        step: ProbeStep,
        /// The wrapper's error kind, when it was a KMS error.
        error_kind: Option<WrapErrorKind>,
        /// Why.
        message: String,
    },
    /// `kms.config.updated`: a provider config passed its probe and replaced the previous one.
    ConfigUpdated {
        /// New provider.
        provider: String,
        /// New key reference.
        key_ref: String,
        /// The previous key reference, if there was a config.
        previous_key_ref: Option<String>,
    },
    /// `kms.rewrap.started` (emitted by the rewrap job).
    RewrapStarted {
        /// The job.
        job_id: String,
        /// Its pinned target version.
        target_version: u32,
    },
    /// An operator sealed the keyring (`kms.sealed.manual`).
    SealedManually {
        /// The operator's reason.
        reason: String,
    },
    /// A destroy was scheduled (`kms.destroy.scheduled`).
    DestroyScheduled {
        /// The version.
        version: u32,
        /// When it will be destroyed (once evidence is in hand).
        at: Timestamp,
    },
    /// Every version below `min_decryption_version` was disabled
    /// (`kms.min_decryption_version.set`).
    MinDecryptionVersionSet {
        /// The new minimum.
        min_decryption_version: u32,
        /// The versions this call disabled.
        disabled: Vec<u32>,
    },
    /// The stored rotation policy changed (`kms.rotation_policy.set`).
    RotationPolicySet {
        /// The new policy (`None`: removed).
        policy: Option<super::policy::RotationPolicy>,
    },
    /// `kms.rewrap.completed` (emitted by the rewrap job).
    RewrapCompleted {
        /// The job.
        job_id: String,
        /// Its target version.
        target_version: u32,
        /// Records rewrapped.
        rewrapped: u64,
        /// Records already on the target (or newer).
        skipped: u64,
        /// Records that failed.
        failed: u64,
    },
}

impl AuditKind {
    /// The stable event name.
    pub fn name(&self) -> &'static str {
        match self {
            AuditKind::Rotate {
                scheduled: false, ..
            } => "kms.rotate",
            AuditKind::Rotate {
                scheduled: true, ..
            } => "kms.rotate.scheduled",
            AuditKind::VersionCreated { .. } => "kms.version.created",
            AuditKind::StateChanged { .. } => "kms.version.state_changed",
            AuditKind::KmsRewrap { .. } => "kms.rekey",
            AuditKind::Sealed { .. } => "kms.sealed",
            AuditKind::Unsealed => "kms.unsealed",
            AuditKind::ProbeFailed { .. } => "kms.probe.failed",
            AuditKind::ConfigUpdated { .. } => "kms.config.updated",
            AuditKind::RewrapStarted { .. } => "kms.rewrap.started",
            AuditKind::RewrapCompleted { .. } => "kms.rewrap.completed",
            AuditKind::SealedManually { .. } => "kms.sealed.manual",
            AuditKind::DestroyScheduled { .. } => "kms.destroy.scheduled",
            AuditKind::MinDecryptionVersionSet { .. } => "kms.min_decryption_version.set",
            AuditKind::RotationPolicySet { .. } => "kms.rotation_policy.set",
        }
    }

    pub(crate) fn state_changed(change: &StateChange) -> Self {
        AuditKind::StateChanged {
            version: change.version,
            from: change.from,
            to: change.to,
            transition: change.transition,
            forced: false,
            detail: None,
        }
    }
}

/// Receives audit events. The host implements it (a log, a table, a queue).
///
/// The counter an [`AuditSink`] increments for every event it failed to
/// write (label `sink`: `postgres`, or the host's own name), so a dashboard
/// sees what [`AuditSink::record`] cannot return (docs/OBSERVABILITY.md).
pub const AUDIT_WRITE_FAILURES: &str = "keyfold_audit_write_failures_total";

/// Called after the change is committed to the store, from the task that made
/// it; keep it quick and non-blocking (hand the event to a channel if writing
/// it is slow). It cannot veto a change.
pub trait AuditSink: Send + Sync + fmt::Debug {
    /// Records one event.
    fn record(&self, event: AuditEvent);
}

/// Discards every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _event: AuditEvent) {}
}

/// Keeps every event in memory, for tests and examples.
///
/// ```
/// use keyfold_core::audit::{AuditSink, RecordingSink};
/// let sink = RecordingSink::default();
/// assert!(sink.names().is_empty());
/// ```
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: Mutex<Vec<AuditEvent>>,
}

impl RecordingSink {
    /// Every event so far, in order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every event's name so far, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.events().iter().map(AuditEvent::name).collect()
    }

    /// Removes and returns every event so far.
    pub fn take(&self) -> Vec<AuditEvent> {
        std::mem::take(
            &mut *self
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl AuditSink for RecordingSink {
    fn record(&self, event: AuditEvent) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }
}

impl<T: AuditSink + ?Sized> AuditSink for std::sync::Arc<T> {
    fn record(&self, event: AuditEvent) {
        (**self).record(event);
    }
}
