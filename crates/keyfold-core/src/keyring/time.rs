//! Wall-clock time for keyring metadata and rotation policy.
//!
//! A [`Timestamp`] is whole seconds since the Unix epoch: small, serde-able
//! (a plain integer in JSON) and enough for schedules measured in days. The
//! keyring reads it from a [`Clock`] the host may replace ([`ManualClock`] in
//! tests). Cache expiry does not use this clock: it uses
//! [`tokio::time::Instant`], which tests can pause and advance.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current system time (the epoch if the system clock is before it).
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Seconds since the Unix epoch.
    pub fn as_secs(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_secs()))
    }

    /// The time from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_secs(self.0.saturating_sub(earlier.0))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }
}

impl Timestamp {
    /// This instant as a [`SystemTime`], or `None` where the platform's
    /// `SystemTime` cannot represent it (a timestamp read from a store file
    /// can be any `u64`; `UNIX_EPOCH + Duration` would panic on it).
    pub fn to_system_time(self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_secs(self.0))
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC, e.g. `2026-12-03T07:20:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0 / 86_400;
        let secs = self.0 % 86_400;
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day):
/// Howard Hinnant's `civil_from_days`
/// (<https://howardhinnant.github.io/date_algorithms.html#civil_from_days>),
/// for non-negative day counts.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Where the keyring reads the time for its metadata and the rotation policy.
pub trait Clock: Send + Sync + fmt::Debug {
    /// A monotonic reading: time since an arbitrary origin fixed for the
    /// process, never going back when the wall clock is stepped (NTP step,
    /// VM restore). The keyring measures the age of its view of the store
    /// with it; wall-clock [`now`](Clock::now) is only for what is stored.
    /// The default reads [`std::time::Instant`].
    fn monotonic(&self) -> Duration {
        process_monotonic()
    }

    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// Time since the first call in this process, on [`std::time::Instant`].
pub fn process_monotonic() -> Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to (tests, simulations). Clones share the time.
///
/// ```
/// use keyfold_core::time::{Clock, ManualClock, Timestamp};
/// use std::time::Duration;
/// let clock = ManualClock::new(Timestamp(1_000));
/// clock.advance(Duration::from_secs(86_400));
/// assert_eq!(clock.now(), Timestamp(87_400));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    wall: Arc<AtomicU64>,
    /// Nanoseconds of monotonic time; moves only with `advance`.
    mono: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            wall: Arc::new(AtomicU64::new(start.0)),
            mono: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Moves the clock forward by `d`: the wall clock (whole seconds) and
    /// the monotonic reading both.
    pub fn advance(&self, d: Duration) {
        let add = |by: u64| move |t: u64| Some(t.saturating_add(by));
        let _ = self
            .wall
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, add(d.as_secs()));
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .mono
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, add(nanos));
    }

    /// Steps the wall clock to `t`, forwards or back, as NTP or a VM
    /// restore does; the monotonic reading does not move.
    pub fn set(&self, t: Timestamp) {
        self.wall.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.wall.load(Ordering::SeqCst))
    }

    fn monotonic(&self) -> Duration {
        Duration::from_nanos(self.mono.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_stored_timestamp_converts_without_panicking() {
        let now = SystemTime::now();
        let t = Timestamp::from(now);
        let back = t.to_system_time().unwrap();
        assert!(now.duration_since(back).unwrap() < Duration::from_secs(1));
        assert_eq!(Timestamp(u64::MAX).to_system_time(), None);
    }

    #[test]
    fn timestamps_display_as_rfc_3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(Timestamp(1_796_282_399).to_string(), "2026-12-03T07:19:59Z");
        // Far future stored values still format (no panic, no overflow).
        assert!(Timestamp(u64::MAX).to_string().ends_with('Z'));
    }

    #[test]
    fn stepping_the_manual_wall_clock_back_leaves_monotonic_time() {
        let c = ManualClock::new(Timestamp(1_000));
        c.advance(Duration::from_millis(1500));
        c.set(Timestamp(10));
        assert_eq!(c.now(), Timestamp(10));
        assert_eq!(c.monotonic(), Duration::from_millis(1500));
    }
}
