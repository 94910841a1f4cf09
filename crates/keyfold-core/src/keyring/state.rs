//! The key-version lifecycle state machine and the keyring's stored form
//! (docs/LIFECYCLE.md). Pure and synchronous: no I/O, no key material.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::time::Timestamp;
use crate::wrap::WrappedKey;

/// The stored form's schema version this build reads and writes.
///
/// 2: every version that holds a wrapped key also holds its key check value
/// (`key_check`). Schema 1 keyrings (without one) are refused.
pub const SCHEMA_VERSION: u32 = 2;

/// Length of a key check value: HMAC-SHA-256 output.
pub const KEY_CHECK_LEN: usize = 32;

/// The lifecycle state of a master key version (docs/LIFECYCLE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Created and distributed; may decrypt; not yet used to encrypt.
    Pending,
    /// The one version every new encryption uses.
    Active,
    /// Decrypt only.
    Retired,
    /// Refuses to decrypt; reversible (the grace period before destruction).
    Disabled,
    /// Key material erased (cryptographic erasure). Terminal.
    Destroyed,
}

impl KeyState {
    /// True when records on a version in this state may be decrypted.
    pub fn can_decrypt(self) -> bool {
        matches!(
            self,
            KeyState::Pending | KeyState::Active | KeyState::Retired
        )
    }

    /// The state `transition` leads to from `self`, or `None` when the
    /// lifecycle does not allow it. This table is the whole state machine.
    pub fn after(self, transition: Transition) -> Option<KeyState> {
        use KeyState::*;
        use Transition as T;
        match (self, transition) {
            (Pending, T::Activate) | (Retired, T::Rollback) => Some(Active),
            (Active, T::Retire) | (Disabled, T::Enable) => Some(Retired),
            (Pending | Retired, T::Disable) => Some(Disabled),
            (Disabled, T::Destroy) => Some(Destroyed),
            _ => None,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyState::Pending => "pending",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        })
    }
}

/// A lifecycle transition of one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// `Pending` → `Active` (the previous `Active` is retired).
    Activate,
    /// `Active` → `Retired`; only ever the side effect of another version
    /// becoming active (rotate, activate, rollback).
    Retire,
    /// `Retired` → `Active` (the previous `Active` is retired).
    Rollback,
    /// `Pending` or `Retired` → `Disabled`.
    Disable,
    /// `Disabled` → `Retired`.
    Enable,
    /// `Disabled` → `Destroyed`: the wrapped key is erased.
    Destroy,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transition::Activate => "activate",
            Transition::Retire => "retire",
            Transition::Rollback => "roll back",
            Transition::Disable => "disable",
            Transition::Enable => "enable",
            Transition::Destroy => "destroy",
        })
    }
}

/// One version's state change, as reported to the audit sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The version.
    pub version: u32,
    /// Its state before.
    pub from: KeyState,
    /// Its state after.
    pub to: KeyState,
    /// What moved it.
    pub transition: Transition,
}

/// One master key version as stored: its state, timestamps and wrapped key.
/// Never the plaintext key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredVersion {
    /// The version number (1, 2, ...; never reused).
    pub version: u32,
    /// A random id distinguishing this version from any other, in any keyring.
    pub id: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// The master key wrapped under the KMS key; `None` once destroyed.
    pub wrapped: Option<WrappedKey>,
    /// Key check value, hex: HMAC-SHA-256(master key, `"keyfold/v1/key-check"`
    /// || the version's `WrapContext::to_aad()`), computed when the version
    /// was created. Every unwrapped key is checked against it, so a wrapped
    /// key copied from another version or keyring is refused even by a KMS
    /// that does not bind the wrap context. `None` once destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last became active.
    #[serde(default)]
    pub activated_at: Option<Timestamp>,
    /// When it last stopped being active.
    #[serde(default)]
    pub retired_at: Option<Timestamp>,
    /// When it was last disabled.
    #[serde(default)]
    pub disabled_at: Option<Timestamp>,
    /// When it was destroyed.
    #[serde(default)]
    pub destroyed_at: Option<Timestamp>,
    /// When an operator scheduled its destruction
    /// ([`Keyring::schedule_destroy`](crate::keyring::Keyring::schedule_destroy));
    /// cleared when it leaves `Disabled` (enabling cancels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_scheduled_at: Option<Timestamp>,
}

/// A keyring as persisted through a [`KeyringStore`](crate::keyring::store::KeyringStore).
///
/// Serde, with a schema version; holds wrapped keys only. [`validate`](Self::validate)
/// checks every lifecycle invariant; stores and the keyring call it on load and save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKeyring {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The keyring's id (one per tenant); bound into every wrap.
    pub keyring_id: String,
    /// When the keyring was created.
    pub created_at: Timestamp,
    /// The number the next version gets: above every version ever created.
    pub next_version: u32,
    /// Every version ever created, destroyed ones included, ascending.
    pub versions: Vec<StoredVersion>,
    /// The rotation policy the maintenance task evaluates, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_policy: Option<crate::keyring::policy::RotationPolicy>,
    /// Versions below it were disabled in one call and may not be enabled
    /// again ([`Keyring::set_min_decryption_version`](crate::keyring::Keyring::set_min_decryption_version)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_decryption_version: Option<u32>,
    /// An operator's seal ([`Keyring::seal`](crate::keyring::Keyring::seal)),
    /// in force on every instance whose view holds it, until an
    /// [`unseal_as`](crate::keyring::Keyring::unseal_as) clears it
    /// (docs/LIFECYCLE.md, "Sealing"). Absent from keyrings stored before
    /// seals were stored, which load unsealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_seal: Option<OperatorSeal>,
    /// The fleet's destroy bounds: the largest max staleness, write window
    /// and destroy grace of any instance that created or changed the
    /// keyring. Every destroy check uses the larger of its own setting and
    /// this floor (docs/THREAT_MODEL.md, "One set of bounds per keyring").
    /// Absent from keyrings stored before floors were stored; the next
    /// change records them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_floors: Option<BoundFloors>,
}

/// The destroy bounds stored with a keyring ([`StoredKeyring::bound_floors`]),
/// in whole seconds rounded up: raised by every instance whose own settings
/// are larger, never lowered by one whose settings are smaller.
///
/// ```
/// use std::time::Duration;
/// use keyfold_core::keyring::BoundFloors;
///
/// let a = BoundFloors::from_settings(
///     Duration::from_secs(5),
///     Duration::from_millis(4_500),
///     Duration::from_secs(30),
/// );
/// assert_eq!(a.write_window_secs, 5);
/// let b = BoundFloors::from_settings(Duration::ZERO, Duration::from_secs(60), Duration::ZERO);
/// let both = a.max(b);
/// assert_eq!(
///     (both.max_staleness_secs, both.write_window_secs, both.destroy_grace_secs),
///     (5, 60, 30)
/// );
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundFloors {
    /// The largest max staleness `S`, seconds.
    pub max_staleness_secs: u64,
    /// The largest write window `W`, seconds.
    pub write_window_secs: u64,
    /// The largest destroy grace `G`, seconds.
    pub destroy_grace_secs: u64,
}

/// Rounds up to whole seconds: stored timestamps are whole seconds
/// (floored), so a bound must not lose its fraction. Saturates.
pub(crate) fn whole_secs(d: std::time::Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

impl BoundFloors {
    /// An instance's settings as floors, each rounded up to whole seconds.
    pub fn from_settings(
        max_staleness: std::time::Duration,
        write_window: std::time::Duration,
        destroy_grace: std::time::Duration,
    ) -> Self {
        BoundFloors {
            max_staleness_secs: whole_secs(max_staleness),
            write_window_secs: whole_secs(write_window),
            destroy_grace_secs: whole_secs(destroy_grace),
        }
    }

    /// Each bound the larger of the two.
    #[must_use]
    pub fn max(self, other: BoundFloors) -> BoundFloors {
        BoundFloors {
            max_staleness_secs: self.max_staleness_secs.max(other.max_staleness_secs),
            write_window_secs: self.write_window_secs.max(other.write_window_secs),
            destroy_grace_secs: self.destroy_grace_secs.max(other.destroy_grace_secs),
        }
    }

    /// True when every bound is at least `other`'s: recording `other`
    /// would change nothing.
    pub fn covers(&self, other: &BoundFloors) -> bool {
        self.max(*other) == *self
    }

    /// The max staleness floor.
    pub fn max_staleness(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.max_staleness_secs)
    }

    /// The write window floor.
    pub fn write_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.write_window_secs)
    }

    /// The destroy grace floor.
    pub fn destroy_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.destroy_grace_secs)
    }
}

/// An operator's seal as stored with the keyring: since when, why and by
/// whom (the post-breach cycle: seal, investigate, unseal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSeal {
    /// When it was sealed (wall clock of the sealing host).
    pub since: Timestamp,
    /// The reason the operator gave.
    pub reason: String,
    /// Who sealed it, as the host named the actor.
    pub actor: String,
}

/// A stored keyring breaks a lifecycle invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("keyring invariant violated: {0}")]
pub struct InvariantViolation(pub String);

impl StoredKeyring {
    /// An empty keyring: no versions yet; the first rotation creates version 1.
    pub fn new(keyring_id: impl Into<String>, now: Timestamp) -> Self {
        StoredKeyring {
            schema: SCHEMA_VERSION,
            keyring_id: keyring_id.into(),
            created_at: now,
            next_version: 1,
            versions: Vec::new(),
            rotation_policy: None,
            min_decryption_version: None,
            operator_seal: None,
            bound_floors: None,
        }
    }

    /// The version record for `version`.
    pub fn get(&self, version: u32) -> Option<&StoredVersion> {
        self.versions
            .binary_search_by_key(&version, |v| v.version)
            .ok()
            .and_then(|i| self.versions.get(i))
    }

    fn get_mut(&mut self, version: u32) -> Option<&mut StoredVersion> {
        match self.versions.binary_search_by_key(&version, |v| v.version) {
            Ok(i) => self.versions.get_mut(i),
            Err(_) => None,
        }
    }

    /// The active version's number.
    pub fn active_version(&self) -> Option<u32> {
        self.versions
            .iter()
            .find(|v| v.state == KeyState::Active)
            .map(|v| v.version)
    }

    /// The stored floors raised to at least `own`: what an instance with
    /// settings `own` records when it saves (never lowering a stored value).
    pub fn raise_bound_floors(&mut self, own: BoundFloors) {
        self.bound_floors = Some(self.bound_floors.map_or(own, |stored| stored.max(own)));
    }

    /// The highest version number created so far.
    pub fn latest_version(&self) -> Option<u32> {
        self.versions.last().map(|v| v.version)
    }

    /// Checks every invariant of docs/LIFECYCLE.md, "Invariants".
    ///
    /// # Errors
    /// [`InvariantViolation`] naming the first broken one.
    pub fn validate(&self) -> Result<(), InvariantViolation> {
        let fail = |m: String| Err(InvariantViolation(m));
        if self.schema == 1 {
            return fail(
                "schema version 1 predates key check values (schema 2): this build cannot \
                 verify its master keys; re-create the keyring with this version of keyfold"
                    .into(),
            );
        }
        if self.schema != SCHEMA_VERSION {
            return fail(format!("unsupported schema version {}", self.schema));
        }
        if self.keyring_id.is_empty() {
            return fail("empty keyring id".into());
        }
        if self.next_version == 0 {
            return fail("next_version is 0".into());
        }
        let mut previous = 0u32;
        let mut active = 0usize;
        let mut ever_activated = false;
        for v in &self.versions {
            if v.version <= previous {
                return fail(format!("version {} out of order or repeated", v.version));
            }
            previous = v.version;
            if v.version >= self.next_version {
                return fail(format!(
                    "version {} not below next_version {}",
                    v.version, self.next_version
                ));
            }
            match (v.state, &v.wrapped) {
                (KeyState::Destroyed, Some(_)) => {
                    return fail(format!(
                        "destroyed version {} holds key material",
                        v.version
                    ));
                }
                (KeyState::Destroyed, None) if v.destroyed_at.is_none() => {
                    return fail(format!("destroyed version {} has no timestamp", v.version));
                }
                (KeyState::Destroyed, None) => {}
                (state, None) => {
                    return fail(format!("{state} version {} has no wrapped key", v.version));
                }
                (_, Some(w)) if w.bytes.is_empty() => {
                    return fail(format!("version {} has an empty wrapped key", v.version));
                }
                (_, Some(_)) => {}
            }
            match (v.state, &v.key_check) {
                (KeyState::Destroyed, Some(_)) => {
                    return fail(format!(
                        "destroyed version {} holds a key check value",
                        v.version
                    ));
                }
                (KeyState::Destroyed, None) => {}
                (state, None) => {
                    return fail(format!(
                        "{state} version {} has no key check value",
                        v.version
                    ));
                }
                (_, Some(kcv)) => {
                    let well_formed = kcv.len() == 2 * KEY_CHECK_LEN
                        && kcv.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                    if !well_formed {
                        return fail(format!(
                            "version {} has a malformed key check value",
                            v.version
                        ));
                    }
                }
            }
            if v.state == KeyState::Active {
                active += 1;
                if v.activated_at.is_none() {
                    return fail(format!(
                        "active version {} has no activation time",
                        v.version
                    ));
                }
            }
            ever_activated |= v.activated_at.is_some();
        }
        if active > 1 {
            return fail(format!("{active} active versions"));
        }
        if ever_activated && active == 0 {
            return fail("the keyring was activated but has no active version".into());
        }
        Ok(())
    }

    /// Reserves the next version number.
    pub(crate) fn peek_next_version(&self) -> Result<u32, StateError> {
        if self.next_version == u32::MAX {
            return Err(StateError::VersionsExhausted);
        }
        Ok(self.next_version)
    }

    /// Adds a new `Pending` version.
    pub(crate) fn add_pending(
        &mut self,
        version: u32,
        id: String,
        wrapped: WrappedKey,
        key_check: String,
        now: Timestamp,
    ) -> Result<(), StateError> {
        if version != self.next_version || version == u32::MAX {
            return Err(StateError::VersionsExhausted);
        }
        self.versions.push(StoredVersion {
            version,
            id,
            state: KeyState::Pending,
            wrapped: Some(wrapped),
            key_check: Some(key_check),
            created_at: now,
            activated_at: None,
            retired_at: None,
            disabled_at: None,
            destroyed_at: None,
            destroy_scheduled_at: None,
        });
        self.next_version = version.saturating_add(1);
        Ok(())
    }

    /// Applies `transition` to `version`; for `Activate` and `Rollback` also
    /// retires the previous active version. Returns the changes, the
    /// requested version's first. On error nothing has changed.
    ///
    /// # Errors
    /// [`StateError::UnknownVersion`] or [`StateError::IllegalTransition`].
    pub(crate) fn apply(
        &mut self,
        version: u32,
        transition: Transition,
        now: Timestamp,
    ) -> Result<Vec<StateChange>, StateError> {
        let from = self
            .get(version)
            .ok_or(StateError::UnknownVersion { version })?
            .state;
        let to = from
            .after(transition)
            .ok_or(StateError::IllegalTransition {
                version,
                from,
                transition,
            })?;
        if transition == Transition::Retire {
            // Only as a side effect: retiring the sole active version by
            // itself would leave the keyring without one.
            return Err(StateError::IllegalTransition {
                version,
                from,
                transition,
            });
        }
        let previous_active = match to {
            KeyState::Active => self.active_version(),
            _ => None,
        };
        let mut changes = vec![StateChange {
            version,
            from,
            to,
            transition,
        }];
        if let Some(v) = self.get_mut(version) {
            v.state = to;
            // Leaving `Disabled` (enable) cancels a scheduled destroy.
            v.destroy_scheduled_at = None;
            match to {
                KeyState::Active => v.activated_at = Some(now),
                KeyState::Disabled => v.disabled_at = Some(now),
                KeyState::Destroyed => {
                    v.wrapped = None;
                    v.key_check = None;
                    v.destroyed_at = Some(now);
                }
                KeyState::Retired | KeyState::Pending => {}
            }
        }
        if let Some(prev) = previous_active
            && let Some(p) = self.get_mut(prev)
        {
            p.state = KeyState::Retired;
            p.retired_at = Some(now);
            changes.push(StateChange {
                version: prev,
                from: KeyState::Active,
                to: KeyState::Retired,
                transition: Transition::Retire,
            });
        }
        Ok(changes)
    }
}

/// Why the state machine refused a change to a [`StoredKeyring`]; the
/// crate-level [`Error`](crate::Error) has a variant of the same name for
/// each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateError {
    /// All 2^32 - 1 version numbers have been used.
    VersionsExhausted,
    /// No such version.
    UnknownVersion {
        /// The version.
        version: u32,
    },
    /// The transition is not allowed from the version's state.
    IllegalTransition {
        /// The version.
        version: u32,
        /// Its state.
        from: KeyState,
        /// The transition refused.
        transition: Transition,
    },
}
