//! What a keyring tells about itself, as a KMS's "describe key" does.

use super::*;

/// The result of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The new active version.
    pub version: u32,
    /// Its random id.
    pub version_id: String,
    /// The version it replaced, now retired.
    pub previous_version: Option<u32>,
    /// The rewrap lease, when a [`LeaseIssuer`] issued one.
    pub lease_id: Option<String>,
}

/// Why and since when a keyring is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealInfo {
    /// The KMS failure that sealed it.
    pub kind: WrapErrorKind,
    /// When.
    pub since: Timestamp,
}

/// One version as a KMS's "describe key" shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMetadata {
    /// Version number.
    pub version: u32,
    /// Random id.
    pub id: String,
    /// State.
    pub state: KeyState,
    /// Created.
    pub created_at: Timestamp,
    /// Last activated.
    pub activated_at: Option<Timestamp>,
    /// Last retired.
    pub retired_at: Option<Timestamp>,
    /// Last disabled.
    pub disabled_at: Option<Timestamp>,
    /// Destroyed.
    pub destroyed_at: Option<Timestamp>,
    /// When its destruction is scheduled, if it is.
    pub destroy_scheduled_at: Option<Timestamp>,
    /// The KMS key that wraps it (`None` once destroyed).
    pub wrap_key_ref: Option<String>,
}

/// A keyring's metadata, as a KMS shows a key's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringMetadata {
    /// The keyring id.
    pub keyring_id: String,
    /// Store revision this describes.
    pub revision: Revision,
    /// The highest version created.
    pub latest_version: Option<u32>,
    /// The active version.
    pub active_version: Option<u32>,
    /// The lowest version that can still decrypt.
    pub min_decryption_version: Option<u32>,
    /// Versions ever created (destroyed ones included).
    pub version_count: usize,
    /// Every version, ascending.
    pub versions: Vec<VersionMetadata>,
    /// Set while sealed by a KMS failure (this process's).
    pub sealed: Option<SealInfo>,
    /// An operator's seal in force here (stored with the keyring, or made
    /// in this process and not stored yet): since when, why, by whom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_seal: Option<OperatorSeal>,
    /// Provider of the current wrapper.
    pub wrap_provider: String,
    /// KMS key of the current wrapper.
    pub wrap_key_ref: String,
    /// Versions whose unwrapped key is cached in this process now.
    pub cached_versions: Vec<u32>,
}

impl Keyring {
    /// The metadata, as a KMS shows it.
    pub fn metadata(&self) -> KeyringMetadata {
        let (revision, stored) = self.snapshot();
        let wrapper = self.wrapper();
        KeyringMetadata {
            keyring_id: self.id.clone(),
            revision,
            latest_version: stored.latest_version(),
            active_version: stored.active_version(),
            min_decryption_version: stored
                .versions
                .iter()
                .find(|v| v.state.can_decrypt())
                .map(|v| v.version),
            version_count: stored.versions.len(),
            versions: stored
                .versions
                .iter()
                .map(|v| VersionMetadata {
                    version: v.version,
                    id: v.id.clone(),
                    state: v.state,
                    created_at: v.created_at,
                    activated_at: v.activated_at,
                    retired_at: v.retired_at,
                    disabled_at: v.disabled_at,
                    destroyed_at: v.destroyed_at,
                    destroy_scheduled_at: v.destroy_scheduled_at,
                    wrap_key_ref: v.wrapped.as_ref().map(|w| w.key_ref.clone()),
                })
                .collect(),
            sealed: self.sealed(),
            operator_seal: self.operator_seal_info(),
            wrap_provider: wrapper.provider().to_owned(),
            wrap_key_ref: wrapper.key_ref().to_owned(),
            cached_versions: self.cache.cached_versions(),
        }
    }
}
