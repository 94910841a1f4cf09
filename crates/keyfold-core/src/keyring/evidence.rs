//! Destroying a version, and the evidence that authorizes it
//! (docs/LIFECYCLE.md, "Destroy").

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

pub(super) fn check_evidence(
    keyring_id: &str,
    stored: &StoredKeyring,
    version: u32,
    e: &NoRecordsLeft,
    max_staleness: Duration,
) -> Result<(), Error> {
    if e.keyring_id != keyring_id {
        return Err(Error::DestroyRefused {
            version,
            reason: format!("the evidence is about keyring {:?}", e.keyring_id),
        });
    }
    if e.version != version {
        return Err(Error::DestroyRefused {
            version,
            reason: format!("the evidence is about version {}", e.version),
        });
    }
    if let Some(retired) = stored.get(version).and_then(|v| v.retired_at) {
        if e.checked_at < retired {
            return Err(Error::DestroyRefused {
                version,
                reason: format!(
                    "the evidence ({}) predates the version's retirement ({retired})",
                    e.checked_at
                ),
            });
        }
        // An instance that had not yet seen the rotation may have encrypted
        // under the version for up to max_staleness after it. Timestamps are
        // whole seconds (floored), so round the staleness up and add one
        // second for the retirement's own fraction.
        let whole_secs = max_staleness.as_secs() + u64::from(max_staleness.subsec_nanos() > 0);
        let settled = retired.saturating_add(Duration::from_secs(whole_secs.saturating_add(1)));
        if e.checked_at < settled {
            return Err(Error::DestroyRefused {
                version,
                reason: format!(
                    "the evidence ({}) was gathered too soon after the version's retirement \
                     ({retired}): instances may encrypt under it until {settled} (max staleness \
                     {}s); gather it again after that",
                    e.checked_at,
                    max_staleness.as_secs()
                ),
            });
        }
    }
    Ok(())
}

impl Keyring {
    /// `Disabled` → `Destroyed`: the wrapped key is erased from the store and
    /// the cached key evicted; records on the version can never be decrypted
    /// again. Needs [`NoRecordsLeft`] evidence for this version, gathered
    /// after it last stopped being active, or an explicit force (which the
    /// audit event records with its reason).
    ///
    /// # Errors
    /// [`Error::DestroyRefused`] when the evidence does not fit;
    /// as [`activate`](Self::activate).
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
}
