//! Sealing on KMS failure, unsealing, and re-wrapping every master key
//! version under another KMS key (docs/LIFECYCLE.md, "Sealing").

use super::*;

pub(super) fn seals(kind: WrapErrorKind) -> bool {
    !matches!(
        kind,
        WrapErrorKind::InvalidCiphertext | WrapErrorKind::KeyMismatch
    )
}

impl Keyring {
    pub(super) fn check_unsealed(&self) -> Result<(), Error> {
        if let Some((since, reason)) = self.operator_seal() {
            return Err(Error::SealedByOperator { since, reason });
        }
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
                self.load_cached(v, Arc::clone(&old), false)
                    .await?
                    .ok_or(Error::NoActiveVersion)?
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

    /// The manual unseal: lifts an operator's seal ([`seal`](Self::seal)),
    /// audited with `actor`, and retries the KMS as [`unseal`](Self::unseal)
    /// when it sealed the keyring too.
    ///
    /// # Errors
    /// As [`unseal`](Self::unseal).
    pub async fn unseal_as(&self, actor: &Actor) -> Result<(), Error> {
        self.traced("unseal", None, self.unseal_untraced(actor))
            .await
    }

    async fn unseal_untraced(&self, actor: &Actor) -> Result<(), Error> {
        let was_operator = {
            // The flag follows the mutex's content, set under it.
            let mut seal = self
                .operator_seal
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.operator_sealed
                .store(false, std::sync::atomic::Ordering::SeqCst);
            seal.take().is_some()
        };
        if was_operator {
            metrics::gauge!(SEALED_KEYRINGS, "cause" => "operator").decrement(1.0);
        }
        if was_operator && self.sealed().is_none() {
            self.emit(actor, AuditKind::Unsealed);
            return Ok(());
        }
        self.probe_and_unseal(actor).await
    }

    /// Seals the keyring on an operator's decision (an incident, the
    /// post-breach cycle): every encrypt and decrypt fails with
    /// [`Error::SealedByOperator`], cached keys are dropped, and only a manual
    /// [`unseal_as`](Self::unseal_as) (or [`unseal`](Self::unseal)) clears it;
    /// automatic probes never do. Per process, like KMS seals: call it on
    /// every instance (the example service does so through its database).
    /// Emits `kms.sealed.manual`.
    pub fn seal(&self, reason: impl Into<String>, actor: &Actor) {
        let reason = reason.into();
        let previous = {
            let mut seal = self
                .operator_seal
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.operator_sealed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            seal.replace((self.options.clock.now(), reason.clone()))
        };
        if previous.is_none() {
            metrics::gauge!(SEALED_KEYRINGS, "cause" => "operator").increment(1.0);
        }
        self.cache.clear();
        self.emit(actor, AuditKind::SealedManually { reason });
    }

    /// The operator's seal, if any: since when and why.
    pub fn operator_seal(&self) -> Option<(Timestamp, String)> {
        if !self
            .operator_sealed
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        self.operator_seal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
                    self.cache.insert(Arc::new(key)).await;
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
