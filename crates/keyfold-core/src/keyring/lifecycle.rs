//! Lifecycle transitions (rotate, activate, rollback, disable, enable) and
//! how each change reaches the store: a compare-and-swap on the revision,
//! then the audit event (docs/LIFECYCLE.md, "States").

use super::*;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

pub(super) fn random_id() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    crate::format::rng::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

impl Keyring {
    pub(super) fn emit(&self, actor: &Actor, kind: AuditKind) {
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
    /// *started* (monotonic): a change another instance made while it ran may be
    /// missing, so the view is only as fresh as that start.
    pub(super) fn install(
        &self,
        revision: Revision,
        stored: StoredKeyring,
        wrapper: Option<Arc<dyn KeyWrapper>>,
        as_of: Duration,
    ) {
        let newly_sealed = {
            let mut cur = self.current.write().unwrap_or_else(PoisonError::into_inner);
            // An older revision than ours means ours is the newer state, seen
            // by an operation whose own start set `loaded_at`.
            if revision < cur.0 {
                return;
            }
            let newly_sealed = cur.1.operator_seal.is_none() && stored.operator_seal.is_some();
            // Just read from or written to the store: fresh as of `as_of`.
            *self
                .loaded_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = as_of;
            *cur = (revision, Arc::new(stored));
            if let Some(w) = wrapper {
                *self.wrapper.write().unwrap_or_else(PoisonError::into_inner) = w;
            }
            newly_sealed
        };
        // An operator sealed the keyring (here or elsewhere): no key stays
        // in memory while it holds.
        if newly_sealed {
            self.cache.clear();
        }
        self.forget_stored_local_seal(revision);
        self.update_operator_gauge();
    }

    /// Commits `next` over `expected`. On a conflict, reloads the store's
    /// state and returns [`Error::Conflict`].
    pub(super) async fn commit(
        &self,
        expected: Revision,
        mut next: StoredKeyring,
        new_wrapper: Option<Arc<dyn KeyWrapper>>,
    ) -> Result<Revision, Error> {
        // Every change records this instance's bounds where the stored
        // floors are lower (or absent); it never lowers them. Compared and
        // swapped with the change itself.
        next.raise_bound_floors(self.own_bound_floors());
        next.validate()
            .map_err(|e| Error::Store(StoreError::Invariant(e)))?;
        let as_of = self.options.clock.monotonic();
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

    pub(super) async fn reload(&self) -> Result<Revision, Error> {
        let as_of = self.options.clock.monotonic();
        // Cleared before the read: a notification arriving while it runs
        // may describe a change the read missed, and marks it again.
        self.dirty.store(false, std::sync::atomic::Ordering::SeqCst);
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

    /// Records this instance's max staleness, write window and destroy
    /// grace as the keyring's stored floors where they are larger than the
    /// stored ones (or none are stored): `Ok(true)` when it wrote, `Ok(false)`
    /// when the floors already cover them. Every change (rotate, disable,
    /// seal, ...) does this on the way; an instance that never changes the
    /// keyring (a replica that only encrypts and decrypts) calls this once
    /// at start-up so its settings count for every destroy in the fleet
    /// (docs/THREAT_MODEL.md, "One set of bounds per keyring"). Never
    /// lowers a stored value. A compare-and-swap commit, retried on a fresh
    /// view when another change lands first.
    ///
    /// # Errors
    /// [`Error::Conflict`] when three attempts lost the race;
    /// [`Error::Store`], [`Error::KeyringNotFound`].
    pub async fn record_bound_floors(&self) -> Result<bool, Error> {
        let _guard = self.write.lock().await;
        let own = self.own_bound_floors();
        let mut last = None;
        for _ in 0..3 {
            let (revision, stored) = self.snapshot();
            if stored.bound_floors.is_some_and(|f| f.covers(&own)) {
                return Ok(false);
            }
            // `commit` raises the floors.
            match self.commit(revision, (*stored).clone(), None).await {
                Ok(_) => return Ok(true),
                // `commit` reloaded: judge again on the winner's state.
                Err(e @ Error::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::Conflict {
            expected: None,
            found: None,
        }))
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
        self.traced("rotate", None, async {
            // On a view no older than max staleness: a stale replica's
            // rotation would only conflict.
            self.refresh_if_stale().await?;
            let _guard = self.write.lock().await;
            self.rotate_locked(actor, false).await
        })
        .await
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

    pub(super) async fn new_wrapped_version(
        &self,
        stored: &StoredKeyring,
    ) -> Result<(u32, String, SecretKey, crate::wrap::WrappedKey, String), Error> {
        self.check_unsealed()?;
        let version = stored.peek_next_version()?;
        let key = SecretKey::generate()?;
        let wrapper = self.wrapper();
        let ctx = WrapContext::new(self.id.clone(), version);
        let wrapped = match retry(&self.options.retry, || {
            observe::wrap(wrapper.as_ref(), &key, &ctx)
        })
        .await
        {
            Ok(w) => w,
            Err(e) if seals(e.kind) => return Err(self.seal_on_failure(e.kind)),
            Err(e) => return Err(e.into()),
        };
        let kcv = hex::encode(key_check(&key, &ctx)?);
        Ok((version, random_id()?, key, wrapped, kcv))
    }

    pub(super) async fn rotate_locked(
        &self,
        actor: &Actor,
        scheduled: bool,
    ) -> Result<Rotation, Error> {
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

    pub(super) async fn transition(
        &self,
        version: u32,
        transition: Transition,
        actor: &Actor,
        destroy: Option<&DestroyAuthorization>,
    ) -> Result<Vec<StateChange>, Error> {
        let operation = match transition {
            Transition::Activate => "activate",
            Transition::Retire => "retire",
            Transition::Rollback => "rollback",
            Transition::Disable => "disable",
            Transition::Enable => "enable",
            Transition::Destroy => "destroy",
        };
        self.traced(operation, Some(version), async {
            // Judge the change on a view no older than max staleness (or a
            // notification): a stale replica would refuse a version it has
            // not seen yet. Before the write lock, which a reload takes.
            self.refresh_if_stale().await?;
            self.transition_untraced(version, transition, actor, destroy)
                .await
        })
        .await
    }

    async fn transition_untraced(
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
        if transition == Transition::Enable
            && let Some(min) = stored.min_decryption_version.filter(|min| version < *min)
        {
            return Err(Error::BelowMinDecryptionVersion { version, min });
        }
        if let (Some(authorization), Some(v)) = (destroy, stored.get(version)) {
            self.destroy_rules(&stored)
                .check(&self.id, v, authorization, now)?;
        }
        let changes = next.apply(version, transition, now)?;
        let (forced, detail) = match destroy {
            Some(DestroyAuthorization::Evidence(e)) => (false, Some(e.source.clone())),
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

    /// Disables every version below `min` in one change (Vault transit's
    /// `min_decryption_version`), audited once
    /// (`kms.min_decryption_version.set`); versions below it may not be
    /// enabled again. Pending and retired versions below `min` become
    /// `Disabled`; disabled and destroyed ones stay as they are.
    ///
    /// # Errors
    /// [`Error::KeyState`] when the active version is below `min` (rotate
    /// first); [`Error::Conflict`], [`Error::Store`]. Nothing changes then.
    pub async fn set_min_decryption_version(
        &self,
        min: u32,
        actor: &Actor,
    ) -> Result<Vec<u32>, Error> {
        let _guard = self.write.lock().await;
        let (revision, stored) = self.snapshot();
        // Beyond the next version it would disable versions not yet created,
        // for good (`Disabled` is meant to be reversible).
        if min > stored.next_version {
            return Err(Error::UnknownVersion { version: min });
        }
        if let Some(active) = stored.active_version().filter(|a| *a < min) {
            return Err(Error::KeyState {
                version: active,
                state: KeyState::Active,
            });
        }
        let now = self.options.clock.now();
        let mut next = (*stored).clone();
        let mut disabled = Vec::new();
        for v in stored.versions.iter().filter(|v| v.version < min) {
            if matches!(v.state, KeyState::Pending | KeyState::Retired) {
                next.apply(v.version, Transition::Disable, now)?;
                disabled.push(v.version);
            }
        }
        let min = min.max(stored.min_decryption_version.unwrap_or(0));
        next.min_decryption_version = Some(min);
        self.commit(revision, next, None).await?;
        for v in &disabled {
            self.cache.evict(*v);
        }
        self.emit(
            actor,
            AuditKind::MinDecryptionVersionSet {
                min_decryption_version: min,
                disabled: disabled.clone(),
            },
        );
        Ok(disabled)
    }

    /// Stores `policy` with the keyring (`None` removes it); the maintenance
    /// task evaluates it on every instance. Emits `kms.rotation_policy.set`.
    ///
    /// # Errors
    /// [`Error::Conflict`], [`Error::Store`].
    pub async fn set_rotation_policy(
        &self,
        policy: Option<RotationPolicy>,
        actor: &Actor,
    ) -> Result<(), Error> {
        let _guard = self.write.lock().await;
        let (revision, stored) = self.snapshot();
        let mut next = (*stored).clone();
        next.rotation_policy = policy;
        self.commit(revision, next, None).await?;
        self.emit(actor, AuditKind::RotationPolicySet { policy });
        Ok(())
    }

    /// The rotation policy stored with the keyring.
    pub fn rotation_policy(&self) -> Option<RotationPolicy> {
        self.snapshot().1.rotation_policy
    }

    /// Rotates when the stored policy says a rotation is due (emitting
    /// `kms.rotate.scheduled`); `None` without a policy or when not due.
    /// Safe on every replica at once: one wins the store's
    /// compare-and-swap, the others see its rotation and do nothing.
    ///
    /// # Errors
    /// As [`rotate_if_due`](Self::rotate_if_due).
    pub async fn rotate_if_policy_due(&self, actor: &Actor) -> Result<Option<Rotation>, Error> {
        self.refresh_if_stale().await?;
        match self.rotation_policy() {
            Some(policy) => self.rotate_if_due(&policy, actor).await,
            None => Ok(None),
        }
    }
}
