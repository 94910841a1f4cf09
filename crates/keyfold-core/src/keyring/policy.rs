//! Rotation policy: an enabled flag and a period in whole days
//! (docs/LIFECYCLE.md, "Rotation policy").

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::time::Timestamp;

/// Shortest allowed rotation period, in days.
pub const MIN_PERIOD_DAYS: u32 = 1;
/// Longest allowed rotation period, in days (ten years).
pub const MAX_PERIOD_DAYS: u32 = 3650;
const DAY_SECS: u64 = 86_400;

/// A rotation period outside `1..=3650` days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rotation period must be {MIN_PERIOD_DAYS}..={MAX_PERIOD_DAYS} whole days, got {0}")]
pub struct PolicyError(pub u32);

/// When a keyring rotates on schedule.
///
/// ```
/// use keyfold_core::policy::RotationPolicy;
/// use keyfold_core::time::Timestamp;
/// let p = RotationPolicy::new(true, 90)?;
/// let last = Timestamp(0);
/// assert!(!p.is_due(Some(last), Timestamp(89 * 86_400)));
/// assert!(p.is_due(Some(last), Timestamp(90 * 86_400)));
/// assert!(RotationPolicy::new(true, 0).is_err());
/// assert!(RotationPolicy::new(true, 3651).is_err());
/// # Ok::<(), keyfold_core::policy::PolicyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicy", into = "RawPolicy")]
pub struct RotationPolicy {
    enabled: bool,
    period_days: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    enabled: bool,
    period_days: u32,
}

impl TryFrom<RawPolicy> for RotationPolicy {
    type Error = PolicyError;
    fn try_from(raw: RawPolicy) -> Result<Self, PolicyError> {
        RotationPolicy::new(raw.enabled, raw.period_days)
    }
}

impl From<RotationPolicy> for RawPolicy {
    fn from(p: RotationPolicy) -> Self {
        RawPolicy {
            enabled: p.enabled,
            period_days: p.period_days,
        }
    }
}

impl RotationPolicy {
    /// A policy rotating every `period_days` days when `enabled`.
    ///
    /// # Errors
    /// [`PolicyError`] when `period_days` is outside `1..=3650`.
    pub fn new(enabled: bool, period_days: u32) -> Result<Self, PolicyError> {
        if !(MIN_PERIOD_DAYS..=MAX_PERIOD_DAYS).contains(&period_days) {
            return Err(PolicyError(period_days));
        }
        Ok(RotationPolicy {
            enabled,
            period_days,
        })
    }

    /// Whether scheduled rotation is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The period in days.
    pub fn period_days(&self) -> u32 {
        self.period_days
    }

    /// The period as a duration.
    pub fn period(&self) -> Duration {
        Duration::from_secs(u64::from(self.period_days) * DAY_SECS)
    }

    /// When the next rotation is due after one at `last_rotation`.
    pub fn next_due(&self, last_rotation: Timestamp) -> Timestamp {
        last_rotation.saturating_add(self.period())
    }

    /// Is a rotation due at `now`, the active version having been activated
    /// at `last_rotation` (`None`: no version yet, so a rotation is due)?
    /// Never due when disabled.
    pub fn is_due(&self, last_rotation: Option<Timestamp>, now: Timestamp) -> bool {
        self.enabled && last_rotation.is_none_or(|last| now >= self.next_due(last))
    }
}
