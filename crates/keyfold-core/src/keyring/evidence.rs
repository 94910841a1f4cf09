//! Destroying a version, and the evidence that authorizes it
//! (docs/LIFECYCLE.md, "Destroy").

use super::state::whole_secs;
use super::*;

/// The host's evidence that no record is left on a version, presented to
/// [`Keyring::destroy`]. The rewrap crate's report produces it once a job
/// has moved every record off the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoRecordsLeft {
    /// The keyring the check was made on: evidence about one tenant's
    /// records never authorizes destroying another tenant's version.
    pub keyring_id: String,
    /// The version that has no records left.
    pub version: u32,
    /// Where the evidence comes from (a rewrap job id, a scan id).
    pub source: String,
    /// When the check was made; it must be after the version last stopped
    /// being active, or records written since could be missed.
    pub checked_at: Timestamp,
}

/// What authorizes a destroy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestroyAuthorization {
    /// Evidence that no record is left on the version.
    Evidence(NoRecordsLeft),
    /// Destroy without evidence; records still on the version become
    /// undecryptable. The audit event says it was forced, and why.
    Forced {
        /// Why, for the audit trail.
        reason: String,
    },
}

/// What a destroy of `version` needs, given the keyring's settings: when
/// the grace period ends, and after when evidence must be gathered. Each
/// bound is the larger of this instance's setting and the floor stored with
/// the keyring ([`Keyring::destroy_rules`]).
pub(super) struct DestroyRules {
    pub(super) max_staleness: Duration,
    pub(super) write_window: Duration,
    pub(super) grace: Duration,
}

/// How far ahead of this host's clock evidence may be dated: the clock skew
/// docs/THREAT_MODEL.md assumes between hosts.
const MAX_EVIDENCE_SKEW: Duration = Duration::from_secs(1);

impl DestroyRules {
    /// The evidence must be gathered at or after this: a second after the
    /// version was disabled, and once every instance's view shows it retired (max
    /// staleness) and every ciphertext sealed under it before that has been
    /// persisted (write window), plus one second for the retirement's own
    /// fraction of a second.
    pub(super) fn evidence_after(&self, v: &StoredVersion) -> Option<Timestamp> {
        // Whole seconds: evidence from the disable's own second may
        // predate it.
        let disabled = v.disabled_at?.saturating_add(Duration::from_secs(1));
        let settled = v.retired_at.map(|retired| {
            let secs = whole_secs(self.max_staleness)
                .saturating_add(whole_secs(self.write_window))
                .saturating_add(1);
            retired.saturating_add(Duration::from_secs(secs))
        });
        Some(settled.map_or(disabled, |s| s.max(disabled)))
    }

    /// When the grace period in `Disabled` ends.
    pub(super) fn grace_until(&self, v: &StoredVersion) -> Option<Timestamp> {
        v.disabled_at
            .map(|d| d.saturating_add(Duration::from_secs(whole_secs(self.grace))))
    }

    /// Refuses a destroy of `v` at `now` with `authorization`.
    pub(super) fn check(
        &self,
        keyring_id: &str,
        v: &StoredVersion,
        authorization: &DestroyAuthorization,
        now: Timestamp,
    ) -> Result<(), Error> {
        let refuse = |reason, allowed_at| Error::DestroyRefused {
            version: v.version,
            reason,
            allowed_at,
        };
        let e = match authorization {
            DestroyAuthorization::Forced { reason } if reason.trim().is_empty() => {
                return Err(refuse(DestroyRefusal::ForcedWithoutReason, None));
            }
            // An incident: no grace, no evidence; audited as forced.
            DestroyAuthorization::Forced { .. } => return Ok(()),
            DestroyAuthorization::Evidence(e) => e,
        };
        if e.keyring_id != keyring_id {
            return Err(refuse(
                DestroyRefusal::OtherKeyring {
                    keyring_id: e.keyring_id.clone(),
                },
                None,
            ));
        }
        if e.version != v.version {
            return Err(refuse(
                DestroyRefusal::OtherVersion { version: e.version },
                None,
            ));
        }
        if v.state != KeyState::Disabled {
            // The state machine refuses the transition itself.
            return Ok(());
        }
        // A disabled version without its disable time (a hand-edited or
        // foreign store) cannot be timed: refuse rather than skip the rules.
        let (Some(grace_until), Some(needed_after)) = (self.grace_until(v), self.evidence_after(v))
        else {
            return Err(refuse(DestroyRefusal::NoDisableTime, None));
        };
        if e.checked_at > now.saturating_add(MAX_EVIDENCE_SKEW) {
            return Err(refuse(
                DestroyRefusal::EvidenceFromTheFuture {
                    checked_at: e.checked_at,
                    now,
                },
                None,
            ));
        }
        if e.checked_at < needed_after {
            return Err(refuse(
                DestroyRefusal::EvidenceTooEarly {
                    checked_at: e.checked_at,
                    needed_after,
                },
                Some(needed_after.max(grace_until)),
            ));
        }
        if now < grace_until {
            return Err(refuse(
                DestroyRefusal::GracePeriod {
                    disabled_at: v.disabled_at.unwrap_or(now),
                    until: grace_until,
                },
                Some(grace_until),
            ));
        }
        Ok(())
    }
}

impl Keyring {
    /// The destroy rules on the view `stored`: for each bound the larger
    /// of this instance's own setting and the fleet's floor stored with the
    /// keyring, so the most cautious instance's settings hold whichever
    /// instance destroys (docs/THREAT_MODEL.md, "One set of bounds per
    /// keyring").
    pub(super) fn destroy_rules(&self, stored: &StoredKeyring) -> DestroyRules {
        let floors = stored.bound_floors.unwrap_or_default();
        DestroyRules {
            max_staleness: self.options.max_staleness.max(floors.max_staleness()),
            write_window: self.options.write_window.max(floors.write_window()),
            grace: self.options.destroy_grace.max(floors.destroy_grace()),
        }
    }

    /// `Disabled` → `Destroyed`: the wrapped key is erased from the store and
    /// the cached key evicted; records on the version can never be decrypted
    /// again (docs/LIFECYCLE.md, "Destroy"). Needs, unless forced:
    /// - the version `Disabled` for at least the destroy grace period
    ///   ([`KeyringBuilder::destroy_grace`], 24 h by default);
    /// - [`NoRecordsLeft`] evidence for this version gathered after it was
    ///   disabled and after max staleness + write window (+1 s) past its
    ///   retirement ([`destroy_allowed_at`](Self::destroy_allowed_at)).
    ///
    /// Each of the three bounds is the larger of this instance's setting
    /// and the fleet's floor stored with the keyring
    /// ([`bound_floors`](Self::bound_floors)).
    ///
    /// A forced destroy (an incident) needs a non-empty reason and is
    /// audited as forced.
    ///
    /// # Errors
    /// [`Error::DestroyRefused`] with the [`DestroyRefusal`] and, when only
    /// time is missing, `allowed_at`; as [`activate`](Self::activate).
    pub async fn destroy(
        &self,
        version: u32,
        authorization: DestroyAuthorization,
        actor: &Actor,
    ) -> Result<(), Error> {
        self.transition(version, Transition::Destroy, actor, Some(&authorization))
            .await
            .map(drop)
    }

    /// The earliest time a destroy of `version` can be authorized by
    /// evidence: the end of its grace period, and the time after which
    /// evidence must be gathered, whichever is later. `None` unless the
    /// version is `Disabled`.
    pub fn destroy_allowed_at(&self, version: u32) -> Option<Timestamp> {
        let (_, stored) = self.snapshot();
        let v = stored.get(version)?;
        if v.state != KeyState::Disabled {
            return None;
        }
        let rules = self.destroy_rules(&stored);
        Some(rules.grace_until(v)?.max(rules.evidence_after(v)?))
    }

    /// Records that `version` (which must be `Disabled`) is to be destroyed
    /// at `at` (no earlier than [`destroy_allowed_at`](Self::destroy_allowed_at)).
    /// The maintenance task destroys it then, once the host's evidence is in
    /// hand; enabling the version cancels. Emits `kms.destroy.scheduled`.
    ///
    /// # Errors
    /// [`Error::DestroyRefused`] ([`DestroyRefusal::NotDisabled`], or
    /// [`DestroyRefusal::GracePeriod`] with `allowed_at` when `at` is too
    /// early); [`Error::UnknownVersion`], [`Error::Conflict`], [`Error::Store`].
    pub async fn schedule_destroy(
        &self,
        version: u32,
        at: Timestamp,
        actor: &Actor,
    ) -> Result<(), Error> {
        let _guard = self.write.lock().await;
        let (revision, stored) = self.snapshot();
        let v = stored
            .get(version)
            .ok_or(Error::UnknownVersion { version })?;
        if v.state != KeyState::Disabled {
            return Err(Error::DestroyRefused {
                version,
                reason: DestroyRefusal::NotDisabled { state: v.state },
                allowed_at: None,
            });
        }
        let rules = self.destroy_rules(&stored);
        if let (Some(disabled_at), Some(until), Some(after)) =
            (v.disabled_at, rules.grace_until(v), rules.evidence_after(v))
        {
            let allowed = until.max(after);
            if at < allowed {
                return Err(Error::DestroyRefused {
                    version,
                    reason: DestroyRefusal::GracePeriod { disabled_at, until },
                    allowed_at: Some(allowed),
                });
            }
        }
        let mut next = (*stored).clone();
        if let Some(v) = next.versions.iter_mut().find(|v| v.version == version) {
            v.destroy_scheduled_at = Some(at);
        }
        self.commit(revision, next, None).await?;
        self.emit(actor, AuditKind::DestroyScheduled { version, at });
        Ok(())
    }

    /// Destroys scheduled and due at `now` or earlier: (version, when).
    pub fn due_destroys(&self) -> Vec<(u32, Timestamp)> {
        let now = self.options.clock.now();
        let (_, stored) = self.snapshot();
        stored
            .versions
            .iter()
            .filter(|v| v.state == KeyState::Disabled)
            .filter_map(|v| v.destroy_scheduled_at.map(|at| (v.version, at)))
            .filter(|(_, at)| *at <= now)
            .collect()
    }
}
