//! Building a [`Keyring`]: the options, [`KeyringBuilder`] and the first
//! load from the store.

use super::*;

/// Options of a [`Keyring`]; see [`KeyringBuilder`].
#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) cache_ttl: Duration,
    pub(super) max_staleness: Duration,
    pub(super) retry: RetryPolicy,
    pub(super) suite: Suite,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) audit: Arc<dyn AuditSink>,
    pub(super) leases: Option<Arc<dyn LeaseIssuer>>,
    pub(super) destroy_grace: Duration,
    pub(super) write_window: Duration,
}

/// Builds a [`Keyring`]: [`create`](Self::create) a new one or
/// [`open`](Self::open) a stored one.
#[derive(Debug)]
#[must_use]
pub struct KeyringBuilder {
    pub(super) id: String,
    pub(super) wrapper: Arc<dyn KeyWrapper>,
    pub(super) store: Arc<dyn KeyringStore>,
    pub(super) options: Options,
}

impl KeyringBuilder {
    /// The minimum time a version stays `Disabled` before it may be
    /// destroyed (default [`DEFAULT_DESTROY_GRACE`], 24 hours, as cloud KMSs
    /// keep a pending-deletion window): enabling it within that time cancels.
    /// Tests may set zero. A forced destroy ignores it.
    pub fn destroy_grace(mut self, grace: Duration) -> Self {
        self.options.destroy_grace = grace;
        self
    }

    /// The host's declared write window (default [`DEFAULT_WRITE_WINDOW`],
    /// 60 s): the longest time between sealing a ciphertext
    /// ([`Keyring::encrypt_for_write`]) and persisting it. A ciphertext
    /// older than that under a version no longer active is refused by
    /// [`Keyring::ready_to_write`], and destroy waits this long (on top of
    /// the max staleness) after a retirement before evidence counts.
    pub fn write_window(mut self, window: Duration) -> Self {
        self.options.write_window = window;
        self
    }

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
    ///
    /// Max staleness, [`write_window`](Self::write_window) and
    /// [`destroy_grace`](Self::destroy_grace) are also recorded with the
    /// keyring as floors when this instance creates or changes it
    /// ([`StoredKeyring::bound_floors`], never lowered), and every destroy
    /// uses the larger of its own value and the floor, so the most cautious
    /// instance's values hold for the whole fleet (docs/THREAT_MODEL.md,
    /// "One set of bounds per keyring"). Views keep this instance's own value.
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
        let as_of = self.options.clock.monotonic();
        let mut stored = StoredKeyring::new(self.id.clone(), self.options.clock.now());
        stored.raise_bound_floors(BoundFloors::from_settings(
            self.options.max_staleness,
            self.options.write_window,
            self.options.destroy_grace,
        ));
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
        let as_of = self.options.clock.monotonic();
        Ok(match load_checked(self.store.as_ref(), &self.id).await? {
            Some((revision, stored)) => Ok(self.build(revision, stored, as_of)),
            None => Err(self),
        })
    }

    /// `as_of`: when the store operation that produced `stored` started, on
    /// the clock's monotonic reading.
    fn build(self, revision: Revision, stored: StoredKeyring, as_of: Duration) -> Keyring {
        let changes = self.store.watch();
        let ring = Keyring {
            cache: KeyCache::new(self.options.cache_ttl),
            id: self.id,
            wrapper: RwLock::new(self.wrapper),
            store: self.store,
            current: RwLock::new((revision, Arc::new(stored))),
            write: tokio::sync::Mutex::new(()),
            sealed: Mutex::new(None),
            last_auto_refresh: Mutex::new(None),
            loaded_at: Mutex::new(as_of),
            changes: Mutex::new(changes),
            local_seal: Mutex::new(None),
            local_sealed: std::sync::atomic::AtomicBool::new(false),
            operator_gauge: std::sync::atomic::AtomicBool::new(false),
            unseal_probe: Mutex::new(None),
            dirty: std::sync::atomic::AtomicBool::new(false),
            options: self.options,
        };
        // Opened on a keyring an operator sealed: counted as sealed here.
        ring.update_operator_gauge();
        ring
    }
}

/// Loads keyring `id` from the host's store and refuses what the keyring
/// must not run on: a keyring breaking an invariant, or another keyring
/// (a store handing back tenant B's keyring for tenant A).
pub(super) async fn load_checked(
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
                destroy_grace: DEFAULT_DESTROY_GRACE,
                write_window: DEFAULT_WRITE_WINDOW,
            },
        }
    }
}
