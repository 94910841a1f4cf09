//! The keyring: one tenant's master key versions, their lifecycle, an
//! unwrapped-key cache with single-flight loading and sealing, persistence
//! through a [`KeyringStore`] and audit events (docs/LIFECYCLE.md).
//!
//! ```
//! use std::sync::Arc;
//! use keyfold_core::audit::Actor;
//! use keyfold_core::keyring::{Keyring, KeyState};
//! use keyfold_core::store::MemoryStore;
//! use keyfold_core::{EncryptionContext, LocalKek, SecretKey};
//! # tokio::runtime::Builder::new_current_thread().enable_time().build()?.block_on(async {
//! let kek = Arc::new(LocalKek::from_bytes("dev-kek", SecretKey::generate()?));
//! let store = Arc::new(MemoryStore::new());
//! let ring = Keyring::builder("tenant-a", kek, store).create().await?;
//! let admin = Actor::new("admin@example.com");
//!
//! ring.rotate(&admin).await?; // version 1, active
//! let ctx = EncryptionContext::new().with("row", "42");
//! let old = ring.encrypt(&ctx, b"secret").await?;
//!
//! let r = ring.rotate(&admin).await?; // version 2 active, 1 retired
//! assert_eq!(r.version, 2);
//! assert_eq!(ring.version_state(1), Some(KeyState::Retired));
//! assert_eq!(ring.decrypt(&ctx, &old).await?, b"secret");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
mod builder;
mod cache;
mod crypt;
pub mod error;
mod evidence;
mod lifecycle;
pub mod maintenance;
mod metadata;
pub mod onboarding;
pub mod policy;
mod sealing;
mod state;
pub mod store;
pub mod time;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::format;
use crate::format::context::EncryptionContext;
use crate::format::record;
use crate::format::secret::{MasterKey, SecretKey};
use crate::format::suite::Suite;
use crate::keyring::audit::{Actor, AuditEvent, AuditKind, AuditSink, NoAudit};
use crate::keyring::policy::RotationPolicy;
use crate::keyring::store::{KeyringStore, Revision, StoreError, StoreEvent};
use crate::keyring::time::{Clock, SystemClock, Timestamp};
use crate::wrap::error::WrapErrorKind;
use crate::wrap::retry::{RetryPolicy, retry};
use crate::wrap::{KeyWrapper, WrapContext, observe};
pub use error::{DestroyRefusal, Error};

pub use builder::KeyringBuilder;
use builder::{Options, load_checked};
use cache::KeyCache;
pub use cache::{CACHE_EVICTIONS, CACHE_HITS, CACHE_MISSES};
pub use crypt::PendingWrite;
use crypt::{check_key, key_check};
pub use evidence::{DestroyAuthorization, NoRecordsLeft};
pub use lifecycle::LeaseIssuer;
pub use metadata::{KeyringMetadata, Rotation, SealInfo, VersionMetadata};
pub use sealing::SealRequest;
use sealing::seals;
pub use state::{
    BoundFloors, InvariantViolation, KEY_CHECK_LEN, KeyState, OperatorSeal, SCHEMA_VERSION,
    StateChange, StoredKeyring, StoredVersion, Transition,
};

/// The label of a version's key check value (see [`StoredVersion::key_check`]).
pub const KEY_CHECK_LABEL: &[u8] = b"keyfold/v1/key-check";

/// Default [`KeyringBuilder::destroy_grace`]: 24 hours in `Disabled`
/// before a destroy.
pub const DEFAULT_DESTROY_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Default [`KeyringBuilder::write_window`].
pub const DEFAULT_WRITE_WINDOW: Duration = Duration::from_secs(60);

/// First automatic unseal probe after a transient seal; the delay doubles
/// after each failed probe up to [`UNSEAL_PROBE_MAX`].
pub const UNSEAL_PROBE_FIRST: Duration = Duration::from_secs(1);

/// The longest delay between automatic unseal probes.
pub const UNSEAL_PROBE_MAX: Duration = Duration::from_secs(60);

/// Default time an unwrapped master key stays cached.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);

/// Default [`KeyringBuilder::max_staleness`]: how old this instance's view of
/// the stored keyring may be when it picks the version to encrypt with.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(30);

/// A record naming an unknown, newer version makes the keyring reload the
/// store at most this often (bogus records must not hammer the store).
pub const AUTO_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// The actor named in events the keyring emits on its own (sealing).
pub const SYSTEM_ACTOR: &str = "keyfold";

/// One tenant's master key versions (docs/LIFECYCLE.md).
///
/// Share it with `Arc`; every method takes `&self`. Encrypting and
/// decrypting make no KMS call while the version's key is cached; concurrent
/// misses on one version make one KMS call. Changes are serialized within
/// the process and committed to the store with a revision check, so changes
/// from several processes cannot overwrite each other: the loser gets
/// [`Error::Conflict`] and the keyring reloads the winner's state.
pub struct Keyring {
    id: String,
    wrapper: RwLock<Arc<dyn KeyWrapper>>,
    store: Arc<dyn KeyringStore>,
    current: RwLock<(Revision, Arc<StoredKeyring>)>,
    write: tokio::sync::Mutex<()>,
    cache: KeyCache,
    sealed: Mutex<Option<SealInfo>>,
    last_auto_refresh: Mutex<Option<tokio::time::Instant>>,
    /// When the store read (or write) that produced `current` started, on
    /// the clock's monotonic reading ([`Clock::monotonic`]): a stepped wall
    /// clock never freezes the view's age.
    loaded_at: Mutex<Duration>,
    /// The store's change notifications ([`KeyringStore::watch`]); `None`
    /// when the store pushes none or the channel closed: the max-staleness
    /// bound alone then applies.
    changes: Mutex<Option<tokio::sync::broadcast::Receiver<StoreEvent>>>,
    /// A notification said the stored keyring changed since the view was
    /// read: the next use reloads, whatever the view's age.
    dirty: std::sync::atomic::AtomicBool,
    /// This process's own operator seal ([`Keyring::seal`]) until the view
    /// holds the stored one: in force from the call on, kept when storing
    /// it failed (or it was never awaited), until [`Keyring::unseal_as`].
    local_seal: Mutex<Option<sealing::LocalSeal>>,
    /// `local_seal.is_some()`, read on every key lookup.
    local_sealed: std::sync::atomic::AtomicBool,
    /// Whether the `operator` gauge of [`SEALED_KEYRINGS`] counts this
    /// keyring now.
    operator_gauge: std::sync::atomic::AtomicBool,
    /// While sealed by a transient KMS failure: when (monotonic) the next
    /// automatic probe is due, and the delay after that one.
    unseal_probe: Mutex<Option<(Duration, Duration)>>,
    options: Options,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (revision, stored) = self.snapshot();
        f.debug_struct("Keyring")
            .field("id", &self.id)
            .field("revision", &revision)
            .field("active_version", &stored.active_version())
            .field("versions", &stored.versions.len())
            .field("sealed", &self.sealed())
            .field("operator_sealed", &self.operator_seal_info().is_some())
            .field("cached_versions", &self.cache.cached_versions())
            .finish_non_exhaustive()
    }
}

/// Gauge: keyrings sealed in this process, by `cause` (`kms`, `operator`).
/// A keyring handle counts while it exists: dropping a sealed one (a host
/// that opens a keyring per request) takes it off again.
pub const SEALED_KEYRINGS: &str = "keyfold_sealed_keyrings";

impl Drop for Keyring {
    fn drop(&mut self) {
        if self
            .operator_gauge
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            metrics::gauge!(SEALED_KEYRINGS, "cause" => "operator").decrement(1.0);
        }
        if self.sealed().is_some() {
            metrics::gauge!(SEALED_KEYRINGS, "cause" => "kms").decrement(1.0);
        }
    }
}

impl Keyring {
    /// Runs a keyring operation in a `keyfold.keyring` span with the
    /// operation, keyring id, version and outcome as fields (never keys,
    /// context values or plaintext).
    pub(super) async fn traced<T>(
        &self,
        operation: &'static str,
        version: Option<u32>,
        op: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "keyfold.keyring",
            operation,
            keyring_id = %self.id,
            version,
            outcome = tracing::field::Empty,
        );
        let result = op.instrument(span.clone()).await;
        span.record("outcome", result.as_ref().err().map_or("ok", Error::code));
        result
    }

    /// How old a view of the store may be when a version is chosen
    /// ([`KeyringBuilder::max_staleness`]): this instance's own setting.
    /// Destroy checks use the larger of it and the stored floor
    /// ([`bound_floors`](Self::bound_floors)); so do
    /// [`write_window`](Self::write_window) and
    /// [`destroy_grace`](Self::destroy_grace).
    pub fn max_staleness(&self) -> Duration {
        self.options.max_staleness
    }

    /// The host's declared write window ([`KeyringBuilder::write_window`]).
    pub fn write_window(&self) -> Duration {
        self.options.write_window
    }

    /// The minimum time in `Disabled` before a destroy
    /// ([`KeyringBuilder::destroy_grace`]).
    pub fn destroy_grace(&self) -> Duration {
        self.options.destroy_grace
    }

    /// This instance's own settings as floors
    /// ([`StoredKeyring::bound_floors`]).
    pub(super) fn own_bound_floors(&self) -> BoundFloors {
        BoundFloors::from_settings(
            self.options.max_staleness,
            self.options.write_window,
            self.options.destroy_grace,
        )
    }

    /// The fleet's destroy bounds stored with the keyring, as this
    /// instance's view holds them: the largest settings of any instance
    /// that created or changed it. Destroy checks use the larger of these
    /// and this instance's own ([`max_staleness`](Self::max_staleness),
    /// [`write_window`](Self::write_window), [`destroy_grace`](Self::destroy_grace));
    /// `None` on a keyring stored before floors were stored and not changed
    /// since (docs/THREAT_MODEL.md, "One set of bounds per keyring").
    pub fn bound_floors(&self) -> Option<BoundFloors> {
        self.snapshot().1.bound_floors
    }

    /// The keyring's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The wrapper currently protecting the master keys.
    pub fn wrapper(&self) -> Arc<dyn KeyWrapper> {
        Arc::clone(&self.wrapper.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The current stored form and its revision (no key material).
    pub fn snapshot(&self) -> (Revision, Arc<StoredKeyring>) {
        let cur = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (cur.0, Arc::clone(&cur.1))
    }

    /// The stored state with the wrapper its wrapped keys are under, read
    /// together (a KMS re-wrap changes both at once).
    fn view(&self) -> (Arc<StoredKeyring>, Arc<dyn KeyWrapper>) {
        let cur = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (Arc::clone(&cur.1), self.wrapper())
    }

    /// The active version, if the keyring has been activated.
    pub fn active_version(&self) -> Option<u32> {
        self.snapshot().1.active_version()
    }

    /// The state of `version`, as this instance last saw it.
    pub fn version_state(&self, version: u32) -> Option<KeyState> {
        self.snapshot().1.get(version).map(|v| v.state)
    }

    /// Set while the keyring is sealed.
    pub fn sealed(&self) -> Option<SealInfo> {
        *self.sealed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ----- keys -------------------------------------------------------------

    // ----- records ----------------------------------------------------------

    // ----- changes ----------------------------------------------------------
}
