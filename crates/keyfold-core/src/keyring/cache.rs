//! The unwrapped master key cache: per-version slots with a TTL and
//! single-flight loading (docs/LIFECYCLE.md, "Cache").

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::error::Error;
use crate::format::secret::MasterKey;
use crate::wrap::error::{WrapError, WrapErrorKind, WrapOperation};

// A cached `MasterKey` holds its key and its wrap cipher; on the pure-Rust
// backend that is an AES-256 key schedule (GCM-SIV's key-generating key,
// `aes-gcm-siv`), which must be wiped when the last `Arc` drops. `aes`
// zeroizes on drop only with its `zeroize` feature, which keyfold-core's
// Cargo.toml turns on directly: this fails to compile if that is lost. (The
// aws-lc backend's context is cleansed by aws-lc when it is freed.)
const _: fn() = || {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<aes::Aes256>();
};

/// What a failed load left for the tasks that waited on it.
#[derive(Debug, Clone)]
pub(crate) struct SharedFailure {
    kind: WrapErrorKind,
    provider: String,
    key_ref: String,
    message: String,
    sealing: bool,
    /// The load failed its key check (for this version).
    key_check_failed: Option<u32>,
}

impl SharedFailure {
    pub(crate) fn from_error(e: &Error, sealing: bool) -> Self {
        match e {
            Error::Wrap(w) => SharedFailure {
                kind: w.kind,
                provider: w.provider.clone(),
                key_ref: w.key_ref.clone(),
                message: w.to_string(),
                sealing,
                key_check_failed: None,
            },
            Error::Sealed { kind, .. } => SharedFailure {
                kind: *kind,
                provider: String::new(),
                key_ref: String::new(),
                message: e.to_string(),
                sealing: true,
                key_check_failed: None,
            },
            other => SharedFailure {
                kind: WrapErrorKind::Unavailable,
                provider: String::new(),
                key_ref: String::new(),
                message: other.to_string(),
                sealing,
                key_check_failed: match other {
                    Error::KeyCheckFailed { version } => Some(*version),
                    _ => None,
                },
            },
        }
    }

    pub(crate) fn to_error(&self, since: crate::keyring::time::Timestamp) -> Error {
        if let Some(version) = self.key_check_failed {
            Error::KeyCheckFailed { version }
        } else if self.sealing {
            Error::Sealed {
                kind: self.kind,
                since,
            }
        } else {
            Error::Wrap(
                WrapError::new(
                    self.kind,
                    self.provider.clone(),
                    self.key_ref.clone(),
                    WrapOperation::Unwrap,
                )
                .with_message(self.message.clone()),
            )
        }
    }
}

#[derive(Default)]
struct SlotState {
    key: Option<(Arc<MasterKey>, Instant)>,
    failure: Option<SharedFailure>,
}

#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// Load attempts so far; a waiter that sees it move while it waited
    /// shares that attempt's outcome instead of calling the KMS again.
    attempts: AtomicU64,
}

pub(crate) struct KeyCache {
    ttl: Duration,
    slots: Mutex<HashMap<u32, Arc<Slot>>>,
    /// Origin of `next_sweep_ns`.
    epoch: Instant,
    /// When the next lookup sweeps out every expired key, in nanoseconds
    /// since `epoch`: without it, a version no longer read would keep its
    /// key in memory past the TTL until something looked it up again.
    next_sweep_ns: AtomicU64,
}

/// Counter: key lookups answered from the cache.
pub const CACHE_HITS: &str = "keyfold_key_cache_hits_total";
/// Counter: key lookups that had to unwrap (or wait for an unwrap).
pub const CACHE_MISSES: &str = "keyfold_key_cache_misses_total";
/// Counter: cached keys dropped, by `reason` (`expired`, `state`: the
/// version was disabled or destroyed).
pub const CACHE_EVICTIONS: &str = "keyfold_key_cache_evictions_total";

/// How long an expired key may outlive its TTL while the keyring is used.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl,
            slots: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            next_sweep_ns: AtomicU64::new(0),
        }
    }

    /// Drops every expired key if a sweep is due: at most one sweep per
    /// `min(TTL, 60 s)`, so the lookup path pays one atomic load.
    fn sweep_if_due(&self, now: Instant) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let at = nanos(now.saturating_duration_since(self.epoch));
        let due = self.next_sweep_ns.load(Ordering::Relaxed);
        if at < due {
            return;
        }
        let next = at.saturating_add(nanos(self.ttl.min(MAX_SWEEP_INTERVAL)));
        if self
            .next_sweep_ns
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.evict_expired_at(now);
        }
    }

    /// When a key cached now expires. An absurd TTL (beyond what `Instant`
    /// can represent) means a century, not a panic.
    fn expiry(&self) -> Instant {
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
        let now = Instant::now();
        now.checked_add(self.ttl)
            .or_else(|| now.checked_add(CENTURY))
            .unwrap_or(now)
    }

    fn slot(&self, version: u32) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(slots.entry(version).or_default())
    }

    /// The cached key for `version`, or the loader's result. Concurrent
    /// callers for one version share one load. `on_miss` is asked, once the
    /// slot is held, whether a miss may call the loader; `Err` is returned as
    /// is.
    pub(crate) async fn get_or_load<F, Fut>(
        &self,
        version: u32,
        on_miss: impl FnOnce() -> Result<(), Error>,
        load: F,
        is_sealing: impl FnOnce(&Error) -> bool,
        since: impl FnOnce() -> crate::keyring::time::Timestamp,
    ) -> Result<Arc<MasterKey>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MasterKey, Error>>,
    {
        let slot = self.slot(version);
        let seen = slot.attempts.load(Ordering::SeqCst);
        let mut state = slot.state.lock().await;
        let now = Instant::now();
        self.sweep_if_due(now);
        if let Some((key, expires)) = &state.key {
            if now < *expires {
                metrics::counter!(CACHE_HITS).increment(1);
                return Ok(Arc::clone(key));
            }
            state.key = None;
            metrics::counter!(CACHE_EVICTIONS, "reason" => "expired").increment(1);
        }
        metrics::counter!(CACHE_MISSES).increment(1);
        if slot.attempts.load(Ordering::SeqCst) != seen
            && let Some(failure) = &state.failure
        {
            return Err(failure.to_error(since()));
        }
        on_miss()?;
        slot.attempts.fetch_add(1, Ordering::SeqCst);
        match load().await {
            Ok(key) => {
                let key = Arc::new(key);
                state.key = Some((Arc::clone(&key), self.expiry()));
                state.failure = None;
                Ok(key)
            }
            Err(e) => {
                let sealing = is_sealing(&e);
                state.failure = Some(SharedFailure::from_error(&e, sealing));
                Err(e)
            }
        }
    }

    /// Puts a key just created or unwrapped into the cache.
    pub(crate) async fn insert(&self, key: Arc<MasterKey>) {
        let slot = self.slot(key.version());
        let mut state = slot.state.lock().await;
        state.key = Some((key, self.expiry()));
        state.failure = None;
    }

    /// Drops `version`'s key (it is zeroized once no caller holds it).
    pub(crate) fn evict(&self, version: u32) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.remove(&version).is_some() {
            metrics::counter!(CACHE_EVICTIONS, "reason" => "state").increment(1);
        }
    }

    /// Drops every key whose TTL has passed; returns how many.
    pub(crate) fn evict_expired(&self) -> usize {
        self.evict_expired_at(Instant::now())
    }

    fn evict_expired_at(&self, now: Instant) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let before = slots.len();
        slots.retain(|_, slot| {
            // Held by a lookup that took it from the map and has not locked
            // it yet: keep, or that lookup would fill a slot no longer here.
            if Arc::strong_count(slot) > 1 {
                return true;
            }
            match slot.state.try_lock() {
                Ok(state) => state.key.as_ref().is_some_and(|(_, exp)| now < *exp),
                // Being loaded right now: keep.
                Err(_) => true,
            }
        });
        let evicted = before.saturating_sub(slots.len());
        metrics::counter!(CACHE_EVICTIONS, "reason" => "expired").increment(evicted as u64);
        evicted
    }

    /// Drops every key.
    pub(crate) fn clear(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Versions with a key cached and not expired.
    pub(crate) fn cached_versions(&self) -> Vec<u32> {
        let now = Instant::now();
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<u32> = slots
            .iter()
            .filter(|(_, slot)| {
                slot.state
                    .try_lock()
                    .ok()
                    .is_some_and(|s| s.key.as_ref().is_some_and(|(_, exp)| now < *exp))
            })
            .map(|(v, _)| *v)
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::secret::SecretKey;

    fn key(version: u32) -> Arc<MasterKey> {
        Arc::new(MasterKey::new(
            version,
            SecretKey::from_bytes(&mut [7u8; 32]),
        ))
    }

    /// A version nobody looks up again still loses its key soon after its
    /// TTL, as long as the cache is used at all.
    #[tokio::test(start_paused = true)]
    async fn lookups_sweep_out_other_versions_expired_keys() {
        let cache = KeyCache::new(Duration::from_secs(10));
        let old = key(1);
        let dropped = Arc::downgrade(&old);
        cache.insert(old).await;
        let load2 = || async { Ok(MasterKey::new(2, SecretKey::from_bytes(&mut [8u8; 32]))) };
        let get2 = || {
            cache.get_or_load(
                2,
                || Ok(()),
                load2,
                |_| false,
                crate::keyring::time::Timestamp::now,
            )
        };
        get2().await.unwrap();
        assert!(dropped.upgrade().is_some(), "v1 is still within its TTL");

        tokio::time::advance(Duration::from_secs(11)).await;
        get2().await.unwrap();
        assert!(
            dropped.upgrade().is_none(),
            "v1's expired key is still held"
        );
        assert!(!cache.slots.lock().unwrap().contains_key(&1));
    }
}
