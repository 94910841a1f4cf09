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
    pub(super) fn seal(&self, kind: WrapErrorKind) -> Error {
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
