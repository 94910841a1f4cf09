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

mod cache;
mod state;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::audit::{Actor, AuditEvent, AuditKind, AuditSink, NoAudit};
use crate::context::EncryptionContext;
use crate::error::{Error, WrapErrorKind};
use crate::format;
use crate::policy::RotationPolicy;
use crate::record;
use crate::retry::{RetryPolicy, retry};
use crate::secret::{MasterKey, SecretKey};
use crate::store::{KeyringStore, Revision, StoreError};
use crate::suite::Suite;
use crate::time::{Clock, SystemClock, Timestamp};
use crate::wrap::{KeyWrapper, WrapContext};

use cache::KeyCache;
pub use state::{
    InvariantViolation, KEY_CHECK_LEN, KeyState, SCHEMA_VERSION, StateChange, StoredKeyring,
    StoredVersion, Transition,
};

/// The label of a version's key check value (see [`StoredVersion::key_check`]).
pub const KEY_CHECK_LABEL: &[u8] = b"keyfold/v1/key-check";

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

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Issues a rewrap lease for a freshly rotated version (the host's hook,
/// typically backed by the rewrap crate's job table).
#[async_trait]
pub trait LeaseIssuer: Send + Sync + fmt::Debug {
    /// A lease id for moving keyring `keyring_id`'s records to `version`.
    ///
    /// # Errors
    /// Any; the rotation stands and the lease id is absent.
    async fn issue(&self, keyring_id: &str, version: u32) -> Result<String, BoxError>;
}

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
    /// Set while sealed.
    pub sealed: Option<SealInfo>,
    /// Provider of the current wrapper.
    pub wrap_provider: String,
    /// KMS key of the current wrapper.
    pub wrap_key_ref: String,
    /// Versions whose unwrapped key is cached in this process now.
    pub cached_versions: Vec<u32>,
}

/// Options of a [`Keyring`]; see [`KeyringBuilder`].
#[derive(Debug, Clone)]
struct Options {
    cache_ttl: Duration,
    max_staleness: Duration,
    retry: RetryPolicy,
    suite: Suite,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditSink>,
    leases: Option<Arc<dyn LeaseIssuer>>,
}

/// Builds a [`Keyring`]: [`create`](Self::create) a new one or
/// [`open`](Self::open) a stored one.
#[derive(Debug)]
#[must_use]
pub struct KeyringBuilder {
    id: String,
    wrapper: Arc<dyn KeyWrapper>,
    store: Arc<dyn KeyringStore>,
    options: Options,
}

impl KeyringBuilder {
    /// How long an unwrapped master key stays cached (default 5 minutes).
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.options.cache_ttl = ttl;
        self
    }

    /// How old this instance's view of the stored keyring may be when it
    /// encrypts (default [`DEFAULT_MAX_STALENESS`], 30 s, read from the
    /// keyring's [`Clock`]): [`Keyring::encrypt`] and [`Keyring::active_key`]
    /// reload the store first when the view is older, so an instance that
    /// missed another's rotation or disable stops encrypting under the old
    /// version within this bound. [`Keyring::destroy`] accordingly refuses
    /// evidence gathered less than this long after the version's retirement.
    /// Use the same value on every instance of a keyring.
    pub fn max_staleness(mut self, max: Duration) -> Self {
        self.options.max_staleness = max;
        self
    }

    /// How KMS calls are retried (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = policy;
        self
    }

    /// The suite new records are encrypted with (default [`Suite::default`]).
    pub fn suite(mut self, suite: Suite) -> Self {
        self.options.suite = suite;
        self
    }

    /// The clock for metadata timestamps and the rotation policy.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.options.clock = clock;
        self
    }

    /// Where audit events go (default: nowhere).
    pub fn audit(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.options.audit = sink;
        self
    }

    /// The hook that issues a rewrap lease on each rotation.
    pub fn lease_issuer(mut self, issuer: Arc<dyn LeaseIssuer>) -> Self {
        self.options.leases = Some(issuer);
        self
    }

    /// Creates an empty keyring in the store. [`Keyring::rotate`] then
    /// creates and activates version 1.
    ///
    /// # Errors
    /// [`Error::KeyringExists`] when the store already holds the id;
    /// [`Error::Store`] on store failure.
    pub async fn create(self) -> Result<Keyring, Error> {
        let as_of = self.options.clock.now();
        let stored = StoredKeyring::new(self.id.clone(), as_of);
        stored
            .validate()
            .map_err(|e| Error::Store(StoreError::Invariant(e)))?;
        let revision = match self.store.save(&self.id, None, &stored).await {
            Ok(r) => r,
            Err(StoreError::Conflict { .. }) => return Err(Error::KeyringExists(self.id)),
            Err(e) => return Err(e.into()),
        };
        Ok(self.build(revision, stored, as_of))
    }

    /// Opens the stored keyring.
    ///
    /// # Errors
    /// [`Error::KeyringNotFound`], or [`Error::Store`] when the stored form
    /// is invalid or unreadable.
    pub async fn open(self) -> Result<Keyring, Error> {
        self.load_existing()
            .await?
            .map_err(|builder| Error::KeyringNotFound(builder.id))
    }

    /// Opens the stored keyring, or creates it when there is none.
    ///
    /// # Errors
    /// As [`open`](Self::open) and [`create`](Self::create).
    pub async fn open_or_create(self) -> Result<Keyring, Error> {
        match self.load_existing().await? {
            Ok(ring) => Ok(ring),
            Err(builder) => builder.create().await,
        }
    }

    /// The stored keyring, or the builder back when the store has none.
    async fn load_existing(self) -> Result<Result<Keyring, Self>, Error> {
        let as_of = self.options.clock.now();
        Ok(match load_checked(self.store.as_ref(), &self.id).await? {
            Some((revision, stored)) => Ok(self.build(revision, stored, as_of)),
            None => Err(self),
        })
    }

    /// `as_of`: when the store operation that produced `stored` started.
    fn build(self, revision: Revision, stored: StoredKeyring, as_of: Timestamp) -> Keyring {
        Keyring {
            cache: KeyCache::new(self.options.cache_ttl),
            id: self.id,
            wrapper: RwLock::new(self.wrapper),
            store: self.store,
            current: RwLock::new((revision, Arc::new(stored))),
            write: tokio::sync::Mutex::new(()),
            sealed: Mutex::new(None),
            last_auto_refresh: Mutex::new(None),
            loaded_at: Mutex::new(as_of),
            options: self.options,
        }
    }
}

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
    /// When `current` was last read from (or written to) the store, by the
    /// keyring's clock.
    loaded_at: Mutex<Timestamp>,
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
            .field("cached_versions", &self.cache.cached_versions())
            .finish_non_exhaustive()
    }
}

/// Loads keyring `id` from the host's store and refuses what the keyring
/// must not run on: a keyring breaking an invariant, or another keyring
/// (a store handing back tenant B's keyring for tenant A).
async fn load_checked(
    store: &dyn KeyringStore,
    id: &str,
) -> Result<Option<(Revision, StoredKeyring)>, Error> {
    let Some((revision, stored)) = store.load(id).await? else {
        return Ok(None);
    };
    if stored.keyring_id != id {
        return Err(Error::Store(StoreError::Corrupt {
            keyring_id: id.to_owned(),
            reason: format!("the store returned keyring {:?}", stored.keyring_id),
        }));
    }
    stored
        .validate()
        .map_err(|e| Error::Store(StoreError::Invariant(e)))?;
    Ok(Some((revision, stored)))
}

/// HMAC-SHA-256(key, [`KEY_CHECK_LABEL`] || `ctx.to_aad()`): binds the key
/// to its keyring and version without revealing anything about it.
fn key_check(key: &SecretKey, ctx: &WrapContext) -> Result<[u8; KEY_CHECK_LEN], Error> {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(key.expose()).map_err(|_| Error::KeyCheckFailed {
            version: ctx.key_version,
        })?;
    mac.update(KEY_CHECK_LABEL);
    mac.update(&ctx.to_aad());
    let mut out = [0u8; KEY_CHECK_LEN];
    out.copy_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

/// Checks, in constant time, that `key` is the key `v` was created with, as
/// that version of this keyring (`ctx`).
fn check_key(v: &StoredVersion, ctx: &WrapContext, key: &SecretKey) -> Result<(), Error> {
    use subtle::ConstantTimeEq;
    let expected = v
        .key_check
        .as_deref()
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_default();
    let actual = key_check(key, ctx)?;
    if bool::from(actual.as_slice().ct_eq(expected.as_slice())) {
        Ok(())
    } else {
        Err(Error::KeyCheckFailed { version: v.version })
    }
}

fn seals(kind: WrapErrorKind) -> bool {
    !matches!(
        kind,
        WrapErrorKind::InvalidCiphertext | WrapErrorKind::KeyMismatch
    )
}

fn random_id() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    crate::rng::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

impl Keyring {
    /// Starts building keyring `id`, wrapped by `wrapper`, kept in `store`.
    pub fn builder(
        id: impl Into<String>,
        wrapper: Arc<dyn KeyWrapper>,
        store: Arc<dyn KeyringStore>,
    ) -> KeyringBuilder {
        KeyringBuilder {
            id: id.into(),
            wrapper,
            store,
            options: Options {
                cache_ttl: DEFAULT_CACHE_TTL,
                max_staleness: DEFAULT_MAX_STALENESS,
                retry: RetryPolicy::default(),
                suite: Suite::default(),
                clock: Arc::new(SystemClock),
                audit: Arc::new(NoAudit),
                leases: None,
            },
        }
    }

    /// The keyring id.
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
                    wrap_key_ref: v.wrapped.as_ref().map(|w| w.key_ref.clone()),
                })
                .collect(),
            sealed: self.sealed(),
            wrap_provider: wrapper.provider().to_owned(),
            wrap_key_ref: wrapper.key_ref().to_owned(),
            cached_versions: self.cache.cached_versions(),
        }
    }

    // ----- keys -------------------------------------------------------------

    /// The unwrapped master key of `version`, from the cache or the KMS.
    ///
    /// Allowed for versions that may decrypt (`Pending`, `Active`,
    /// `Retired`). A version newer than any this instance knows makes it
    /// reload the store (another instance may have rotated), at most once per
    /// [`AUTO_REFRESH_INTERVAL`].
    ///
    /// # Errors
    /// [`Error::UnknownVersion`], [`Error::KeyState`] (disabled),
    /// [`Error::KeyDestroyed`], [`Error::Sealed`], [`Error::Wrap`].
    pub async fn master_key(&self, version: u32) -> Result<Arc<MasterKey>, Error> {
        let (v, wrapper) = self.known_version(version).await?;
        match v.state {
            s if s.can_decrypt() => self.load_cached(&v, wrapper).await,
            KeyState::Destroyed => Err(Error::KeyDestroyed { version }),
            state => Err(Error::KeyState { version, state }),
        }
    }

    /// The active version's unwrapped key: the one to encrypt with.
    ///
    /// # Errors
    /// [`Error::NoActiveVersion`], and as [`master_key`](Self::master_key).
    pub async fn active_key(&self) -> Result<Arc<MasterKey>, Error> {
        // Rounds after which the key is used as it is: each extra round
        // needs another instance to rotate during this one's cold unwrap.
        const ROUNDS: u32 = 3;
        let mut round = 0;
        loop {
            round += 1;
            self.refresh_if_stale().await?;
            let picked_at = self.options.clock.now();
            let version = self.active_version().ok_or(Error::NoActiveVersion)?;
            let key = self.master_key(version).await?;
            // A cold unwrap can take long (KMS retries): if time passed and
            // the view aged past the max staleness meanwhile, another
            // instance may have rotated. Use the key only if a fresh view
            // still shows it active. (A cached key takes no time, so this
            // costs no extra store read, even with a zero max staleness.)
            if round < ROUNDS && self.options.clock.now() > picked_at && self.is_stale() {
                self.refresh_if_stale().await?;
                if self.active_version() != Some(version) {
                    continue;
                }
            }
            return Ok(key);
        }
    }

    async fn known_version(
        &self,
        version: u32,
    ) -> Result<(StoredVersion, Arc<dyn KeyWrapper>), Error> {
        let (stored, wrapper) = self.view();
        if let Some(v) = stored.get(version) {
            return Ok((v.clone(), wrapper));
        }
        if stored
            .latest_version()
            .is_none_or(|latest| version > latest)
            && self.may_auto_refresh()
        {
            self.refresh().await?;
            let (stored, wrapper) = self.view();
            if let Some(v) = stored.get(version) {
                return Ok((v.clone(), wrapper));
            }
        }
        Err(Error::UnknownVersion { version })
    }

    /// Reloads the store when this instance's view is older than the
    /// configured maximum staleness.
    async fn refresh_if_stale(&self) -> Result<(), Error> {
        if !self.is_stale() {
            return Ok(());
        }
        let _guard = self.write.lock().await;
        // Concurrent callers queue here: only the first reloads.
        if self.is_stale() {
            self.reload().await?;
        }
        Ok(())
    }

    fn is_stale(&self) -> bool {
        let loaded = *self
            .loaded_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.options.clock.now().since(loaded) >= self.options.max_staleness
    }

    fn may_auto_refresh(&self) -> bool {
        let now = tokio::time::Instant::now();
        let mut last = self
            .last_auto_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(t) if now.duration_since(t) < AUTO_REFRESH_INTERVAL => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    fn check_unsealed(&self) -> Result<(), Error> {
        match self.sealed() {
            Some(info) => Err(Error::Sealed {
                kind: info.kind,
                since: info.since,
            }),
            None => Ok(()),
        }
    }

    /// Seals the keyring (emitting `kms.sealed` the first time) and returns
    /// the error to report.
    fn seal(&self, kind: WrapErrorKind) -> Error {
        let since = self.options.clock.now();
        {
            let mut sealed = self.sealed.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(info) = *sealed {
                return Error::Sealed {
                    kind: info.kind,
                    since: info.since,
                };
            }
            *sealed = Some(SealInfo { kind, since });
        }
        self.emit(&Actor::new(SYSTEM_ACTOR), AuditKind::Sealed { kind });
        Error::Sealed { kind, since }
    }

    /// Unwraps `v` with the KMS (no cache); seals on an access failure.
    async fn unwrap_version(
        &self,
        v: &StoredVersion,
        wrapper: Arc<dyn KeyWrapper>,
    ) -> Result<MasterKey, Error> {
        let wrapped = v
            .wrapped
            .as_ref()
            .ok_or(Error::KeyDestroyed { version: v.version })?;
        let ctx = WrapContext::new(self.id.clone(), v.version);
        match retry(&self.options.retry, || wrapper.unwrap(wrapped, &ctx)).await {
            Ok(key) => {
                check_key(v, &ctx, &key)?;
                Ok(MasterKey::new(v.version, key))
            }
            Err(e) if seals(e.kind) => Err(self.seal(e.kind)),
            Err(e) => Err(e.into()),
        }
    }

    async fn load_cached(
        &self,
        v: &StoredVersion,
        wrapper: Arc<dyn KeyWrapper>,
    ) -> Result<Arc<MasterKey>, Error> {
        self.cache
            .get_or_load(
                v.version,
                || self.check_unsealed(),
                || self.unwrap_version(v, wrapper),
                |e| matches!(e, Error::Sealed { .. }),
                || {
                    self.sealed()
                        .map_or_else(|| self.options.clock.now(), |s| s.since)
                },
            )
            .await
    }

    /// Drops cached keys whose TTL has passed (they are zeroized once no
    /// caller holds them); returns how many. Lookups also skip expired keys,
    /// and sweep out every version's expired keys at most once per
    /// `min(cache TTL, 60 s)`; call this on a timer to bound an idle
    /// keyring's key lifetime too.
    pub fn evict_expired(&self) -> usize {
        self.cache.evict_expired()
    }

    /// Drops every cached key.
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    // ----- records ----------------------------------------------------------

    /// Encrypts a record under the active version with the keyring's suite.
    ///
    /// # Errors
    /// [`Error::NoActiveVersion`], [`Error::Sealed`], and as [`record::encrypt`].
    pub async fn encrypt(
        &self,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let key = self.active_key().await?;
        record::encrypt(&key, self.options.suite, context, plaintext)
    }

    /// Decrypts a record with the version its header names.
    ///
    /// # Errors
    /// [`Error::KeyState`] for a disabled version, [`Error::KeyDestroyed`],
    /// [`Error::UnknownVersion`], [`Error::Sealed`], and as [`record::decrypt`].
    pub async fn decrypt(
        &self,
        context: &EncryptionContext,
        record: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let info = format::inspect(record)?;
        let key = self.master_key(info.key_version).await?;
        record::decrypt(&key, context, record)
    }

    /// Moves a record to `target` (which must be the active version) by
    /// rewriting its header only. `None` when the record is already on
    /// `target` or a newer version.
    ///
    /// # Errors
    /// [`Error::KeyState`] when `target` is not active; as [`decrypt`](Self::decrypt),
    /// except that a header whose commitment does not match its data key is
    /// rewrapped as it is (it still fails to decrypt; see [`record::rewrap`]).
    pub async fn rewrap(
        &self,
        context: &EncryptionContext,
        record: &[u8],
        target: u32,
    ) -> Result<Option<Vec<u8>>, Error> {
        let info = format::inspect(record)?;
        // Judge `target` on a view no older than the max staleness: another
        // instance may have rotated past it, or disabled it.
        self.refresh_if_stale().await?;
        self.require_active(target)?;
        if info.key_version >= target {
            return Ok(None);
        }
        let picked_at = self.options.clock.now();
        let from = self.master_key(info.key_version).await?;
        let to = self.master_key(target).await?;
        // As in `active_key`: cold unwraps can outlast the max staleness.
        if self.options.clock.now() > picked_at && self.is_stale() {
            self.refresh_if_stale().await?;
            self.require_active(target)?;
        }
        record::rewrap(record, &from, &to, context).map(Some)
    }

    /// `Ok` when this instance's view shows `version` active.
    fn require_active(&self, version: u32) -> Result<(), Error> {
        match self.version_state(version) {
            Some(KeyState::Active) => Ok(()),
            Some(KeyState::Destroyed) => Err(Error::KeyDestroyed { version }),
            Some(state) => Err(Error::KeyState { version, state }),
            None => Err(Error::UnknownVersion { version }),
        }
    }

    // ----- changes ----------------------------------------------------------

    fn emit(&self, actor: &Actor, kind: AuditKind) {
        self.options.audit.record(AuditEvent {
            keyring_id: self.id.clone(),
            actor: actor.clone(),
            at: self.options.clock.now(),
            kind,
        });
    }

    /// Installs a newer state, and with it the wrapper its keys are under
    /// when that changed; readers of [`view`](Self::view) see both or neither.
    ///
    /// `as_of` is when the store read or write that produced `stored`
    /// *started*: a change another instance made while it ran may be
    /// missing, so the view is only as fresh as that start.
    fn install(
        &self,
        revision: Revision,
        stored: StoredKeyring,
        wrapper: Option<Arc<dyn KeyWrapper>>,
        as_of: Timestamp,
    ) {
        let mut cur = self.current.write().unwrap_or_else(PoisonError::into_inner);
        // An older revision than ours means ours is the newer state, seen
        // by an operation whose own start set `loaded_at`.
        if revision >= cur.0 {
            // Just read from or written to the store: fresh as of `as_of`.
            *self
                .loaded_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = as_of;
            *cur = (revision, Arc::new(stored));
            if let Some(w) = wrapper {
                *self.wrapper.write().unwrap_or_else(PoisonError::into_inner) = w;
            }
        }
    }

    /// Commits `next` over `expected`. On a conflict, reloads the store's
    /// state and returns [`Error::Conflict`].
    async fn commit(
        &self,
        expected: Revision,
        next: StoredKeyring,
        new_wrapper: Option<Arc<dyn KeyWrapper>>,
    ) -> Result<Revision, Error> {
        next.validate()
            .map_err(|e| Error::Store(StoreError::Invariant(e)))?;
        let as_of = self.options.clock.now();
        match self.store.save(&self.id, Some(expected), &next).await {
            Ok(revision) => {
                self.install(revision, next, new_wrapper, as_of);
                Ok(revision)
            }
            Err(StoreError::Conflict {
                expected, found, ..
            }) => {
                let _ = self.reload().await;
                Err(Error::Conflict {
                    expected: expected.map(|r| r.0),
                    found: found.map(|r| r.0),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn reload(&self) -> Result<Revision, Error> {
        let as_of = self.options.clock.now();
        let (revision, stored) = load_checked(self.store.as_ref(), &self.id)
            .await?
            .ok_or_else(|| Error::KeyringNotFound(self.id.clone()))?;
        for v in &stored.versions {
            if !v.state.can_decrypt() {
                self.cache.evict(v.version);
            }
        }
        self.install(revision, stored, None, as_of);
        Ok(revision)
    }

    /// Reloads the keyring from the store (to see other instances' changes).
    /// Versions the store shows disabled or destroyed are evicted from the cache.
    ///
    /// # Errors
    /// [`Error::Store`], [`Error::KeyringNotFound`].
    pub async fn refresh(&self) -> Result<Revision, Error> {
        let _guard = self.write.lock().await;
        self.reload().await
    }

    /// Creates a new master key version, wraps it under the KMS key and makes
    /// it active; the previous active version becomes retired. Emits
    /// `kms.rotate` and `kms.version.state_changed` for the retired version.
    ///
    /// A failed wrap or a conflict leaves the keyring as it was. The lease
    /// hook runs after the commit; when it fails the rotation stands and
    /// [`Rotation::lease_id`] is `None`.
    ///
    /// # Errors
    /// [`Error::Sealed`], [`Error::Wrap`], [`Error::Conflict`], [`Error::Store`].
    pub async fn rotate(&self, actor: &Actor) -> Result<Rotation, Error> {
        let _guard = self.write.lock().await;
        self.rotate_locked(actor, false).await
    }

    /// Rotates when `policy` says a rotation is due now, emitting
    /// `kms.rotate.scheduled`; `None` when it is not due. When another
    /// instance rotated first (a conflict), reloads and re-checks.
    ///
    /// # Errors
    /// As [`rotate`](Self::rotate).
    pub async fn rotate_if_due(
        &self,
        policy: &RotationPolicy,
        actor: &Actor,
    ) -> Result<Option<Rotation>, Error> {
        let _guard = self.write.lock().await;
        for _ in 0..2 {
            if !policy.is_due(self.last_rotation(), self.options.clock.now()) {
                return Ok(None);
            }
            match self.rotate_locked(actor, true).await {
                Err(Error::Conflict { .. }) => continue,
                other => return other.map(Some),
            }
        }
        if policy.is_due(self.last_rotation(), self.options.clock.now()) {
            self.rotate_locked(actor, true).await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// When the active version was activated.
    pub fn last_rotation(&self) -> Option<Timestamp> {
        let (_, stored) = self.snapshot();
        let active = stored.active_version()?;
        stored.get(active).and_then(|v| v.activated_at)
    }

    async fn new_wrapped_version(
        &self,
        stored: &StoredKeyring,
    ) -> Result<(u32, String, SecretKey, crate::wrap::WrappedKey, String), Error> {
        self.check_unsealed()?;
        let version = stored.peek_next_version()?;
        let key = SecretKey::generate()?;
        let wrapper = self.wrapper();
        let ctx = WrapContext::new(self.id.clone(), version);
        let wrapped = match retry(&self.options.retry, || wrapper.wrap(&key, &ctx)).await {
            Ok(w) => w,
            Err(e) if seals(e.kind) => return Err(self.seal(e.kind)),
            Err(e) => return Err(e.into()),
        };
        let kcv = hex::encode(key_check(&key, &ctx)?);
        Ok((version, random_id()?, key, wrapped, kcv))
    }

    async fn rotate_locked(&self, actor: &Actor, scheduled: bool) -> Result<Rotation, Error> {
        let (revision, stored) = self.snapshot();
        let (version, version_id, key, wrapped, kcv) = self.new_wrapped_version(&stored).await?;
        let wrap_provider = wrapped.provider.clone();
        let wrap_key_ref = wrapped.key_ref.clone();
        let now = self.options.clock.now();
        let mut next = (*stored).clone();
        next.add_pending(version, version_id.clone(), wrapped, kcv, now)?;
        let changes = next.apply(version, Transition::Activate, now)?;
        self.commit(revision, next, None).await?;
        self.cache
            .insert(Arc::new(MasterKey::new(version, key)))
            .await;
        let lease_id = match &self.options.leases {
            Some(issuer) => issuer.issue(&self.id, version).await.ok(),
            None => None,
        };
        let previous_version = changes.get(1).map(|c| c.version);
        self.emit(
            actor,
            AuditKind::Rotate {
                new_version: version,
                version_id: version_id.clone(),
                previous_version,
                scheduled,
                wrap_provider,
                wrap_key_ref,
                lease_id: lease_id.clone(),
            },
        );
        for change in changes.iter().skip(1) {
            self.emit(actor, AuditKind::state_changed(change));
        }
        Ok(Rotation {
            version,
            version_id,
            previous_version,
            lease_id,
        })
    }

    /// Creates a new version in state `Pending`: it may decrypt (distribute
    /// it to every instance first) but is not used to encrypt until
    /// [`activate`](Self::activate)d. Emits `kms.version.created`.
    ///
    /// # Errors
    /// As [`rotate`](Self::rotate).
    pub async fn create_pending(&self, actor: &Actor) -> Result<u32, Error> {
        let _guard = self.write.lock().await;
        let (revision, stored) = self.snapshot();
        let (version, version_id, key, wrapped, kcv) = self.new_wrapped_version(&stored).await?;
        let wrap_key_ref = wrapped.key_ref.clone();
        let mut next = (*stored).clone();
        next.add_pending(
            version,
            version_id.clone(),
            wrapped,
            kcv,
            self.options.clock.now(),
        )?;
        self.commit(revision, next, None).await?;
        self.cache
            .insert(Arc::new(MasterKey::new(version, key)))
            .await;
        self.emit(
            actor,
            AuditKind::VersionCreated {
                version,
                version_id,
                wrap_key_ref,
            },
        );
        Ok(version)
    }

    async fn transition(
        &self,
        version: u32,
        transition: Transition,
        actor: &Actor,
        destroy: Option<&DestroyAuthorization>,
    ) -> Result<Vec<StateChange>, Error> {
        let _guard = self.write.lock().await;
        let (revision, stored) = self.snapshot();
        let mut next = (*stored).clone();
        let now = self.options.clock.now();
        let changes = next.apply(version, transition, now)?;
        let (forced, detail) = match destroy {
            Some(DestroyAuthorization::Evidence(e)) => {
                check_evidence(&self.id, &stored, version, e, self.options.max_staleness)?;
                (false, Some(e.source.clone()))
            }
            Some(DestroyAuthorization::Forced { reason }) => (true, Some(reason.clone())),
            None => (false, None),
        };
        self.commit(revision, next, None).await?;
        if matches!(transition, Transition::Disable | Transition::Destroy) {
            self.cache.evict(version);
        }
        for (i, change) in changes.iter().enumerate() {
            let mut kind = AuditKind::state_changed(change);
            if i == 0
                && let AuditKind::StateChanged {
                    forced: f,
                    detail: d,
                    ..
                } = &mut kind
            {
                *f = forced;
                d.clone_from(&detail);
            }
            self.emit(actor, kind);
        }
        Ok(changes)
    }

    /// `Pending` → `Active`; the previous active version is retired.
    ///
    /// # Errors
    /// [`Error::IllegalTransition`] (nothing changes), [`Error::UnknownVersion`],
    /// [`Error::Conflict`], [`Error::Store`].
    pub async fn activate(&self, version: u32, actor: &Actor) -> Result<(), Error> {
        self.transition(version, Transition::Activate, actor, None)
            .await
            .map(drop)
    }

    /// `Retired` → `Active` again; the current active version is retired.
    ///
    /// # Errors
    /// As [`activate`](Self::activate).
    pub async fn rollback(&self, version: u32, actor: &Actor) -> Result<(), Error> {
        self.transition(version, Transition::Rollback, actor, None)
            .await
            .map(drop)
    }

    /// `Retired` (or `Pending`) → `Disabled`: its records stop decrypting;
    /// reversible with [`enable`](Self::enable). Evicts its cached key.
    ///
    /// # Errors
    /// As [`activate`](Self::activate).
    pub async fn disable(&self, version: u32, actor: &Actor) -> Result<(), Error> {
        self.transition(version, Transition::Disable, actor, None)
            .await
            .map(drop)
    }

    /// `Disabled` → `Retired`.
    ///
    /// # Errors
    /// As [`activate`](Self::activate).
    pub async fn enable(&self, version: u32, actor: &Actor) -> Result<(), Error> {
        self.transition(version, Transition::Enable, actor, None)
            .await
            .map(drop)
    }

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

    /// Re-wraps every live version under `new_wrapper` (the provider rotated
    /// its key, or the tenant moves to another KMS) in one commit: each key
    /// is unwrapped with the current wrapper, wrapped with the new one and
    /// checked by unwrapping it again. On any failure nothing changes.
    /// Emits `kms.rekey`; afterwards the keyring uses `new_wrapper`.
    ///
    /// # Errors
    /// [`Error::Sealed`], [`Error::Wrap`] (from either wrapper),
    /// [`Error::Conflict`], [`Error::Store`].
    pub async fn rewrap_master_keys(
        &self,
        new_wrapper: Arc<dyn KeyWrapper>,
        actor: &Actor,
    ) -> Result<Vec<u32>, Error> {
        let _guard = self.write.lock().await;
        self.check_unsealed()?;
        let (revision, stored) = self.snapshot();
        let (_, old) = self.view();
        let mut next = (*stored).clone();
        let mut done = Vec::new();
        for v in next.versions.iter_mut() {
            if v.wrapped.is_none() {
                continue;
            }
            // Disabled versions too: their keys stay recoverable. But a
            // version that may not decrypt is unwrapped without entering the
            // cache ("disable evicts").
            let key = if v.state.can_decrypt() {
                self.load_cached(v, Arc::clone(&old)).await?
            } else {
                self.check_unsealed()?;
                Arc::new(self.unwrap_version(v, Arc::clone(&old)).await?)
            };
            let ctx = WrapContext::new(self.id.clone(), v.version);
            let wrapped =
                retry(&self.options.retry, || new_wrapper.wrap(key.secret(), &ctx)).await?;
            let back = retry(&self.options.retry, || new_wrapper.unwrap(&wrapped, &ctx)).await?;
            if back.expose() != key.secret().expose() {
                return Err(Error::Decrypt);
            }
            v.wrapped = Some(wrapped);
            done.push(v.version);
        }
        self.commit(revision, next, Some(Arc::clone(&new_wrapper)))
            .await?;
        self.emit(
            actor,
            AuditKind::KmsRewrap {
                from_provider: old.provider().to_owned(),
                from_key_ref: old.key_ref().to_owned(),
                to_provider: new_wrapper.provider().to_owned(),
                to_key_ref: new_wrapper.key_ref().to_owned(),
                versions: done.clone(),
            },
        );
        Ok(done)
    }

    /// Retries the KMS after the keyring was sealed: unwraps the active
    /// version (or the newest one that may decrypt; with none, wraps and unwraps a probe
    /// key). On success the keyring is unsealed (`kms.unsealed`) and the key
    /// cached; on failure it stays sealed.
    ///
    /// # Errors
    /// [`Error::Sealed`] or [`Error::Wrap`] when the KMS still fails.
    pub async fn unseal(&self) -> Result<(), Error> {
        let (stored, wrapper) = self.view();
        // Only a version that may decrypt: its key is cached on success, and
        // a disabled version's key must never enter the cache.
        let candidate = stored
            .active_version()
            .and_then(|a| stored.get(a))
            .or_else(|| {
                stored
                    .versions
                    .iter()
                    .rev()
                    .find(|v| v.state.can_decrypt() && v.wrapped.is_some())
            });
        let result = match candidate {
            Some(v) => {
                let ctx = WrapContext::new(self.id.clone(), v.version);
                match &v.wrapped {
                    Some(w) => wrapper
                        .unwrap(w, &ctx)
                        .await
                        .map(|k| Some(MasterKey::new(v.version, k))),
                    None => Ok(None),
                }
            }
            None => crate::probe::probe(wrapper.as_ref())
                .await
                .map(|_| None)
                .map_err(|p| {
                    crate::error::WrapError::new(
                        p.kind.unwrap_or(WrapErrorKind::Unavailable),
                        wrapper.provider(),
                        wrapper.key_ref(),
                        crate::error::WrapOperation::Unwrap,
                    )
                    .with_message(p.message)
                }),
        };
        match result {
            Ok(key) => {
                if let (Some(key), Some(v)) = (key, candidate) {
                    // The KMS answered; the stored key must still be this
                    // version's before anything is unsealed or cached.
                    check_key(
                        v,
                        &WrapContext::new(self.id.clone(), v.version),
                        key.secret(),
                    )?;
                    self.cache.insert(Arc::new(key)).await;
                }
                let was = self
                    .sealed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if was.is_some() {
                    self.emit(&Actor::new(SYSTEM_ACTOR), AuditKind::Unsealed);
                }
                Ok(())
            }
            Err(e) if seals(e.kind) => {
                let _ = self.seal(e.kind);
                Err(self.check_unsealed().err().unwrap_or(Error::Wrap(e)))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn check_evidence(
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
