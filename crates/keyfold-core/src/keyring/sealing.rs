//! Sealing on KMS failure (per process), the operator's seal (stored with
//! the keyring, for the whole fleet), unsealing, and re-wrapping every
//! master key version under another KMS key (docs/LIFECYCLE.md, "Sealing").

use super::*;

pub(super) fn seals(kind: WrapErrorKind) -> bool {
    !matches!(
        kind,
        WrapErrorKind::InvalidCiphertext | WrapErrorKind::KeyMismatch
    )
}

/// This process's own operator seal ([`Keyring::seal`]), in force until
/// the view holds the stored seal (or an [`Keyring::unseal_as`] lifts it).
#[derive(Debug, Clone)]
pub(super) struct LocalSeal {
    pub(super) seal: OperatorSeal,
    /// The store revision holding the seal in force (this one, or an
    /// earlier one still in force), once stored: a view at that revision
    /// or later decides from then on.
    pub(super) stored_at: Option<Revision>,
}

/// How many compare-and-swap conflicts storing a seal or an unseal rides
/// out (each retried on a fresh view) before giving up with
/// [`Error::Conflict`].
const SEAL_COMMIT_ATTEMPTS: usize = 8;

/// What [`Keyring::seal`] returns: the seal is already in force in this
/// process; `.await` it to store it with the keyring, for every instance.
///
/// Awaiting resolves to the operator seal in force in the store: this one
/// (audited, `kms.sealed.manual`), or an earlier one still in force
/// (nothing changed then, nothing is audited). Not awaited, the seal holds
/// in this process only, as before seals were stored, until
/// [`unseal_as`](Keyring::unseal_as): it is audited when the request is
/// dropped, and a warning is logged.
///
/// # Errors
/// [`Error::Conflict`] after repeated conflicts (or when an
/// [`unseal_as`](Keyring::unseal_as) in this process lifted it first),
/// [`Error::Store`], [`Error::KeyringNotFound`]. Except after such an
/// unseal, the seal stays in force in this process (and is audited).
pub struct SealRequest<'a> {
    ring: &'a Keyring,
    pending: Option<(OperatorSeal, Actor)>,
}

impl fmt::Debug for SealRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealRequest")
            .field("keyring_id", &self.ring.id)
            .field("seal", &self.pending.as_ref().map(|(s, _)| s))
            .finish()
    }
}

impl<'a> std::future::IntoFuture for SealRequest<'a> {
    type Output = Result<OperatorSeal, Error>;
    type IntoFuture =
        std::pin::Pin<Box<dyn std::future::Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(mut self) -> Self::IntoFuture {
        let ring = self.ring;
        let pending = self.pending.take();
        Box::pin(async move {
            match pending {
                Some((seal, actor)) => {
                    ring.traced("seal", None, ring.store_seal(seal, actor))
                        .await
                }
                // Never: `pending` is only taken here or in `drop`.
                None => ring.operator_seal_info().ok_or(Error::NoActiveVersion),
            }
        })
    }
}

impl Drop for SealRequest<'_> {
    fn drop(&mut self) {
        if let Some((seal, actor)) = self.pending.take() {
            tracing::warn!(
                keyring_id = %self.ring.id,
                "operator seal not awaited: it holds in this process only, not in the store \
                 (await Keyring::seal to seal every instance)"
            );
            // In force here: audited as such.
            self.ring.emit(
                &actor,
                AuditKind::SealedManually {
                    reason: seal.reason,
                },
            );
        }
    }
}

impl Keyring {
    pub(super) fn check_unsealed(&self) -> Result<(), Error> {
        self.check_operator_seal()?;
        match self.sealed() {
            Some(info) => Err(Error::Sealed {
                kind: info.kind,
                since: info.since,
            }),
            None => Ok(()),
        }
    }

    /// [`Error::SealedByOperator`] while an operator's seal is in force
    /// here: in this instance's view of the store, or this process's own.
    pub(super) fn check_operator_seal(&self) -> Result<(), Error> {
        match self.operator_seal_info() {
            Some(s) => Err(Error::SealedByOperator {
                since: s.since,
                reason: s.reason,
            }),
            None => Ok(()),
        }
    }

    /// The operator's seal in force here, if any: the one this instance's
    /// view of the store holds, or a seal made in this process and not
    /// stored yet ([`SealRequest`]).
    pub fn operator_seal_info(&self) -> Option<OperatorSeal> {
        let local_sealed = self.local_sealed.load(std::sync::atomic::Ordering::SeqCst);
        let (revision, stored) = {
            // The common case on every key lookup: unsealed, nothing cloned.
            let cur = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if !local_sealed && cur.1.operator_seal.is_none() {
                return None;
            }
            (cur.0, Arc::clone(&cur.1))
        };
        if local_sealed {
            let local = self
                .local_seal
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = local.as_ref()
                && l.stored_at.is_none_or(|at| revision < at)
            {
                return Some(l.seal.clone());
            }
        }
        stored.operator_seal.clone()
    }

    /// Forgets this process's own seal once a view at `revision` holds
    /// what was stored for it.
    pub(super) fn forget_stored_local_seal(&self, revision: Revision) {
        if !self.local_sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut local = self
            .local_seal
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if local
            .as_ref()
            .is_some_and(|l| l.stored_at.is_some_and(|at| at <= revision))
        {
            *local = None;
            self.local_sealed
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Keeps the `operator` gauge of [`SEALED_KEYRINGS`] in step with the
    /// seal in force here.
    pub(super) fn update_operator_gauge(&self) {
        let sealed = self.operator_seal_info().is_some();
        if self
            .operator_gauge
            .swap(sealed, std::sync::atomic::Ordering::SeqCst)
            != sealed
        {
            if sealed {
                metrics::gauge!(SEALED_KEYRINGS, "cause" => "operator").increment(1.0);
            } else {
                metrics::gauge!(SEALED_KEYRINGS, "cause" => "operator").decrement(1.0);
            }
        }
    }

    /// Seals the keyring (emitting `kms.sealed` the first time) and returns
    /// the error to report.
    pub(super) fn seal_on_failure(&self, kind: WrapErrorKind) -> Error {
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
        metrics::gauge!(SEALED_KEYRINGS, "cause" => "kms").increment(1.0);
        if kind.is_transient() {
            let first = self
                .options
                .clock
                .monotonic()
                .saturating_add(UNSEAL_PROBE_FIRST);
            *self
                .unseal_probe
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some((first, UNSEAL_PROBE_FIRST));
        }
        self.emit(&Actor::new(SYSTEM_ACTOR), AuditKind::Sealed { kind });
        Error::Sealed { kind, since }
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
            let wrapped = retry(&self.options.retry, || {
                observe::wrap(new_wrapper.as_ref(), key.secret(), &ctx)
            })
            .await?;
            let back = retry(&self.options.retry, || {
                observe::unwrap(new_wrapper.as_ref(), &wrapped, &ctx)
            })
            .await?;
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
    /// cached; on failure it stays sealed. It never lifts an operator's seal
    /// ([`seal`](Self::seal)): that takes [`unseal_as`](Self::unseal_as),
    /// naming who lifts it.
    ///
    /// # Errors
    /// [`Error::Sealed`] or [`Error::Wrap`] when the KMS still fails.
    pub async fn unseal(&self) -> Result<(), Error> {
        self.traced(
            "unseal",
            None,
            self.probe_and_unseal(&Actor::new(SYSTEM_ACTOR)),
        )
        .await
    }

    /// The manual unseal: lifts an operator's seal ([`seal`](Self::seal))
    /// for the whole fleet, audited (`kms.unsealed`) with `actor`: a
    /// compare-and-swap commit clearing the stored seal, on a view read from
    /// the store first (this instance may not have seen the seal yet), and
    /// this process's own seal; then retries the KMS as
    /// [`unseal`](Self::unseal) when it sealed the keyring too. Every other
    /// instance works again once its view no longer holds the seal (at its
    /// next use with store notifications, within max staleness without).
    ///
    /// # Errors
    /// [`Error::Conflict`] after repeated conflicts, [`Error::Store`] (the
    /// stored seal then holds); as [`unseal`](Self::unseal).
    pub async fn unseal_as(&self, actor: &Actor) -> Result<(), Error> {
        self.traced("unseal", None, self.unseal_untraced(actor))
            .await
    }

    async fn unseal_untraced(&self, actor: &Actor) -> Result<(), Error> {
        let lifted = {
            let _guard = self.write.lock().await;
            let mut lifted = {
                let mut local = self
                    .local_seal
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                self.local_sealed
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                local.take().is_some()
            };
            let mut attempts = 0;
            loop {
                attempts += 1;
                self.reload().await?;
                let (revision, stored) = self.snapshot();
                if stored.operator_seal.is_none() {
                    break;
                }
                let mut next = (*stored).clone();
                next.operator_seal = None;
                match self.commit(revision, next, None).await {
                    Ok(_) => {
                        lifted = true;
                        break;
                    }
                    // Another change landed first: again on a fresh view.
                    Err(Error::Conflict { .. }) if attempts < SEAL_COMMIT_ATTEMPTS => {}
                    Err(e) => {
                        self.update_operator_gauge();
                        return Err(e);
                    }
                }
            }
            lifted
        };
        self.update_operator_gauge();
        if lifted {
            self.emit(actor, AuditKind::Unsealed);
            if self.sealed().is_none() {
                return Ok(());
            }
        }
        self.probe_and_unseal(actor).await
    }

    /// Seals the keyring on an operator's decision (an incident, the
    /// post-breach cycle) for the whole fleet: every encrypt and decrypt
    /// fails with [`Error::SealedByOperator`], cached keys are dropped, and
    /// rotations and KMS re-wraps are refused, until a manual
    /// [`unseal_as`](Self::unseal_as); neither [`unseal`](Self::unseal)
    /// nor the maintenance task's probes ever clear it.
    ///
    /// It holds in this process from the call on. Awaiting the returned
    /// [`SealRequest`] stores it with the keyring (a compare-and-swap
    /// commit, retried on a fresh view when another change lands first),
    /// then emits `kms.sealed.manual` with `actor` and `reason`: every
    /// other instance refuses once its view holds it, at its next use with
    /// store notifications, within max staleness without
    /// (docs/LIFECYCLE.md, "Sealing"). A keyring already sealed keeps its
    /// first seal (its time and reason).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use keyfold_core::{Actor, Error, EncryptionContext, Keyring, LocalKek, MemoryStore, SecretKey};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build()?.block_on(async {
    /// # let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate()?));
    /// let store = Arc::new(MemoryStore::new());
    /// let a = Keyring::builder("tenant-a", kek.clone(), store.clone()).create().await?;
    /// let b = Keyring::builder("tenant-a", kek, store).open().await?;
    /// let ops = Actor::new("ops@example.com");
    /// a.rotate(&ops).await?;
    /// let ctx = EncryptionContext::new();
    ///
    /// a.seal("INC-7: token leaked", &ops).await?;
    /// assert!(matches!(b.encrypt(&ctx, b"x").await, Err(Error::SealedByOperator { .. })));
    /// b.unseal_as(&ops).await?;
    /// assert!(a.encrypt(&ctx, b"x").await.is_ok());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn seal(&self, reason: impl Into<String>, actor: &Actor) -> SealRequest<'_> {
        let seal = OperatorSeal {
            since: self.options.clock.now(),
            reason: reason.into(),
            actor: actor.0.clone(),
        };
        {
            let mut local = self
                .local_seal
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *local = Some(LocalSeal {
                seal: seal.clone(),
                stored_at: None,
            });
            self.local_sealed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.cache.clear();
        self.update_operator_gauge();
        SealRequest {
            ring: self,
            pending: Some((seal, actor.clone())),
        }
    }

    /// Stores `seal` (made by [`seal`](Self::seal) in this process) with
    /// the keyring; see [`SealRequest`]. Audited (`kms.sealed.manual`)
    /// once stored, or when storing it failed while it holds here.
    async fn store_seal(&self, seal: OperatorSeal, actor: Actor) -> Result<OperatorSeal, Error> {
        let result = self.store_seal_untraced(&seal).await;
        let audited = match &result {
            Ok(stored) => *stored == seal,
            Err(_) => self
                .local_seal
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|l| l.seal == seal),
        };
        if audited {
            self.emit(
                &actor,
                AuditKind::SealedManually {
                    reason: seal.reason.clone(),
                },
            );
        }
        result
    }

    async fn store_seal_untraced(&self, seal: &OperatorSeal) -> Result<OperatorSeal, Error> {
        let _guard = self.write.lock().await;
        let ours = |l: &Option<LocalSeal>| l.as_ref().is_some_and(|l| l.seal == *seal);
        let mark_stored = |at: Revision| {
            let mut local = self
                .local_seal
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = local.as_mut().filter(|l| l.seal == *seal) {
                l.stored_at = Some(at);
            }
        };
        for attempt in 1..=SEAL_COMMIT_ATTEMPTS {
            // An unseal_as (or a later seal) in this process came first: it
            // decides, not this seal.
            if !ours(
                &self
                    .local_seal
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ) {
                return Err(Error::Conflict {
                    expected: None,
                    found: None,
                });
            }
            let revision = self.reload().await?;
            let (_, stored) = self.snapshot();
            if let Some(existing) = stored.operator_seal.clone() {
                // Sealed already (another instance, an earlier call): that
                // seal stays, with its time and reason.
                mark_stored(revision);
                self.forget_stored_local_seal(revision);
                self.update_operator_gauge();
                return Ok(existing);
            }
            let mut next = (*stored).clone();
            next.operator_seal = Some(seal.clone());
            match self.commit(revision, next, None).await {
                Ok(at) => {
                    mark_stored(at);
                    self.forget_stored_local_seal(at);
                    self.update_operator_gauge();
                    return Ok(seal.clone());
                }
                // A rotation (or any change) landed first: again on a
                // fresh view.
                Err(Error::Conflict { .. }) if attempt < SEAL_COMMIT_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict {
            expected: None,
            found: None,
        })
    }

    /// The operator's seal in force here, if any: since when and why
    /// ([`operator_seal_info`](Self::operator_seal_info) also says who).
    pub fn operator_seal(&self) -> Option<(Timestamp, String)> {
        self.operator_seal_info().map(|s| (s.since, s.reason))
    }

    /// While sealed by a transient KMS failure (unavailable, throttled):
    /// probes the KMS when the next probe is due (1 s after the seal, then
    /// doubling to 60 s) and unseals when it passes (`kms.unsealed`, by
    /// the system actor). Called on key lookups and by the maintenance task,
    /// so a KMS blip heals without the host's help.
    pub(super) async fn auto_unseal_if_due(&self) {
        let Some(info) = self.sealed() else {
            return;
        };
        if !info.kind.is_transient() || self.operator_seal().is_some() {
            return;
        }
        let now = self.options.clock.monotonic();
        {
            let mut probe = self
                .unseal_probe
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match *probe {
                Some((due, delay)) if now >= due => {
                    let next = delay.saturating_mul(2).min(UNSEAL_PROBE_MAX);
                    *probe = Some((now.saturating_add(next), next));
                }
                Some(_) => return,
                // A seal that raced a successful probe lost its schedule:
                // probe now rather than never.
                None => *probe = Some((now.saturating_add(UNSEAL_PROBE_FIRST), UNSEAL_PROBE_FIRST)),
            }
        }
        // A failed probe keeps the seal (and its backoff); nothing to report.
        let _ = self.probe_and_unseal(&Actor::new(SYSTEM_ACTOR)).await;
    }

    async fn probe_and_unseal(&self, actor: &Actor) -> Result<(), Error> {
        // The probe caches the key it unwraps: judge the version on a view
        // no older than max staleness, as any cold load does.
        self.refresh_if_stale().await?;
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
                    Some(w) => observe::unwrap(wrapper.as_ref(), w, &ctx)
                        .await
                        .map(|k| Some(MasterKey::new(v.version, k))),
                    None => Ok(None),
                }
            }
            None => crate::wrap::probe::probe(wrapper.as_ref())
                .await
                .map(|_| None)
                .map_err(|p| {
                    crate::wrap::error::WrapError::new(
                        p.kind.unwrap_or(WrapErrorKind::Unavailable),
                        wrapper.provider(),
                        wrapper.key_ref(),
                        crate::wrap::error::WrapOperation::Unwrap,
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
                    // No key enters the cache under an operator's seal.
                    if self.operator_seal_info().is_none() {
                        self.cache.insert(Arc::new(key)).await;
                    }
                }
                let was = self
                    .sealed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                *self
                    .unseal_probe
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                if was.is_some() {
                    metrics::gauge!(SEALED_KEYRINGS, "cause" => "kms").decrement(1.0);
                    self.emit(actor, AuditKind::Unsealed);
                }
                Ok(())
            }
            Err(e) if seals(e.kind) => {
                let _ = self.seal_on_failure(e.kind);
                Err(self.check_unsealed().err().unwrap_or(Error::Wrap(e)))
            }
            Err(e) => Err(e.into()),
        }
    }
}
