//! Encrypt, decrypt and rewrap records, and the key path behind them: which
//! version may be used (on a view no older than max staleness), the cache,
//! single-flight unwrapping and the key check (docs/LIFECYCLE.md, "Using a
//! version").

use super::*;

/// HMAC-SHA-256(key, [`KEY_CHECK_LABEL`] || `ctx.to_aad()`): binds the key
/// to its keyring and version without revealing anything about it.
pub(super) fn key_check(key: &SecretKey, ctx: &WrapContext) -> Result<[u8; KEY_CHECK_LEN], Error> {
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
pub(super) fn check_key(
    v: &StoredVersion,
    ctx: &WrapContext,
    key: &SecretKey,
) -> Result<(), Error> {
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

/// A ciphertext sealed by [`Keyring::encrypt_for_write`], waiting to be
/// persisted: pass it to [`Keyring::ready_to_write`] just before the write.
#[derive(Debug)]
#[must_use = "check it with Keyring::ready_to_write before persisting"]
pub struct PendingWrite {
    keyring_id: String,
    bytes: Vec<u8>,
    version: u32,
    sealed_at: Duration,
}

impl PendingWrite {
    /// The master key version it is under.
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl Keyring {
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
        // Every use judges the version, and the operator's seal, on a view
        // no older than the max staleness (or newer than the last change
        // notification), cached key or not; a cached key lives at most its
        // TTL. So no instance decrypts with a version disabled or destroyed
        // elsewhere, or on a keyring sealed elsewhere, after max staleness
        // (docs/THREAT_MODEL.md, "Many instances, one store: the bounds").
        // The seal is judged after the refresh only: a view holding a seal
        // lifted elsewhere must be refreshed to see that.
        if self
            .sealed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            self.auto_unseal_if_due().await;
        }
        if self.is_stale() {
            self.refresh_if_stale().await?;
        }
        // The view may have just brought an operator's seal: no key then,
        // cached or not.
        self.check_operator_seal()?;
        let (stored, wrapper) = self.known_version(version).await?;
        let v = stored
            .get(version)
            .ok_or(Error::UnknownVersion { version })?;
        match v.state {
            s if s.can_decrypt() => self.load_cached(v, wrapper).await,
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
            let picked_at = self.options.clock.monotonic();
            let version = match self.active_version() {
                Some(v) => v,
                // Another instance may have made the first rotation: look,
                // at most once per AUTO_REFRESH_INTERVAL.
                None if self.may_auto_refresh() => {
                    self.refresh().await?;
                    self.active_version().ok_or(Error::NoActiveVersion)?
                }
                None => return Err(Error::NoActiveVersion),
            };
            let key = self.master_key(version).await?;
            // A cold unwrap can take long (KMS retries): if time passed and
            // the view aged past the max staleness meanwhile, another
            // instance may have rotated. Use the key only if a fresh view
            // still shows it active. (A cached key takes no time, so this
            // costs no extra store read, even with a zero max staleness.)
            // The view may also have moved during the unwrap (a change
            // notification reloads it): judge the version on the newest.
            if self.options.clock.monotonic() > picked_at && self.view_expired() || self.dirty() {
                self.refresh_if_stale().await?;
            }
            if self.active_version() != Some(version) {
                if round < ROUNDS {
                    continue;
                }
                // Rotations keep landing during this instance's unwraps:
                // never encrypt under a version a fresh view shows retired.
                return Err(Error::Conflict {
                    expected: None,
                    found: None,
                });
            }
            return Ok(key);
        }
    }

    /// The view holding `version` (reloaded once when the version is newer
    /// than any this instance knows), not a copy of the version: a key
    /// lookup runs once per record decrypted or row rewrapped.
    pub(super) async fn known_version(
        &self,
        version: u32,
    ) -> Result<(Arc<StoredKeyring>, Arc<dyn KeyWrapper>), Error> {
        let (stored, wrapper) = self.view();
        if stored.get(version).is_some() {
            return Ok((stored, wrapper));
        }
        if stored
            .latest_version()
            .is_none_or(|latest| version > latest)
            && self.may_auto_refresh()
        {
            self.refresh().await?;
            let (stored, wrapper) = self.view();
            if stored.get(version).is_some() {
                return Ok((stored, wrapper));
            }
        }
        Err(Error::UnknownVersion { version })
    }

    /// Reloads the store when this instance's view is older than the
    /// configured maximum staleness.
    pub(super) async fn refresh_if_stale(&self) -> Result<(), Error> {
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

    pub(super) fn is_stale(&self) -> bool {
        self.dirty() || self.view_expired()
    }

    /// The view is older than the max staleness, on the monotonic clock.
    fn view_expired(&self) -> bool {
        let loaded = *self
            .loaded_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.options.clock.monotonic().saturating_sub(loaded) >= self.options.max_staleness
    }

    /// Drains the store's change notifications; true when one since the
    /// last reload concerned this keyring (or may have: a resync, a lag).
    pub(super) fn dirty(&self) -> bool {
        use std::sync::atomic::Ordering;
        use tokio::sync::broadcast::error::TryRecvError;
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = changes.as_mut() {
            loop {
                match rx.try_recv() {
                    Ok(StoreEvent::Changed { keyring_id }) if keyring_id != self.id => {}
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {
                        self.dirty.store(true, Ordering::SeqCst);
                    }
                    Err(TryRecvError::Empty) => break,
                    // The store stopped notifying: max staleness alone.
                    Err(TryRecvError::Closed) => {
                        *changes = None;
                        break;
                    }
                }
            }
        }
        self.dirty.load(Ordering::SeqCst)
    }

    pub(super) fn may_auto_refresh(&self) -> bool {
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

    /// Unwraps `v` with the KMS (no cache); seals on an access failure.
    pub(super) async fn unwrap_version(
        &self,
        v: &StoredVersion,
        wrapper: Arc<dyn KeyWrapper>,
    ) -> Result<MasterKey, Error> {
        let wrapped = v
            .wrapped
            .as_ref()
            .ok_or(Error::KeyDestroyed { version: v.version })?;
        let ctx = WrapContext::new(self.id.clone(), v.version);
        match retry(&self.options.retry, || {
            observe::unwrap(wrapper.as_ref(), wrapped, &ctx)
        })
        .await
        {
            Ok(key) => {
                check_key(v, &ctx, &key)?;
                Ok(MasterKey::new(v.version, key))
            }
            Err(e) if seals(e.kind) => Err(self.seal_on_failure(e.kind)),
            Err(e) => Err(e.into()),
        }
    }

    /// `v`'s key from the cache, or unwrapped by the KMS (refused while
    /// sealed).
    pub(super) async fn load_cached(
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
        Ok(record::encrypt(
            &key,
            self.options.suite,
            context,
            plaintext,
        )?)
    }

    /// Encrypts a record the host will persist later: the ciphertext with
    /// its version and when it was sealed, for
    /// [`ready_to_write`](Self::ready_to_write) to check just before the
    /// write (docs/LIFECYCLE.md, "Write window").
    ///
    /// # Errors
    /// As [`encrypt`](Self::encrypt).
    pub async fn encrypt_for_write(
        &self,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<PendingWrite, Error> {
        let key = self.active_key().await?;
        let sealed_at = self.options.clock.monotonic();
        let bytes = record::encrypt(&key, self.options.suite, context, plaintext)?;
        Ok(PendingWrite {
            keyring_id: self.id.clone(),
            bytes,
            version: key.version(),
            sealed_at,
        })
    }

    /// The ciphertext to persist now, if it may be: sealed within the write
    /// window, or under a version a view no older than max staleness still
    /// shows active. Call it just before the write; what happens between
    /// this check and the write counts against the window too.
    ///
    /// # Errors
    /// [`Error::WriteWindowExpired`]: encrypt again
    /// ([`encrypt_for_write`](Self::encrypt_for_write)) and retry; or a
    /// store error from the reload.
    pub async fn ready_to_write(&self, pending: PendingWrite) -> Result<Vec<u8>, Error> {
        if pending.keyring_id != self.id {
            // Its version number means nothing in this keyring.
            return Err(Error::UnknownVersion {
                version: pending.version,
            });
        }
        let sealed_ago = self
            .options
            .clock
            .monotonic()
            .saturating_sub(pending.sealed_at);
        if sealed_ago <= self.options.write_window {
            return Ok(pending.bytes);
        }
        self.refresh_if_stale().await?;
        if self.active_version() == Some(pending.version) {
            return Ok(pending.bytes);
        }
        Err(Error::WriteWindowExpired {
            version: pending.version,
            sealed_ago,
            window: self.options.write_window,
        })
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
        Ok(record::decrypt(&key, context, record)?)
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
        let picked_at = self.options.clock.monotonic();
        let from = self.master_key(info.key_version).await?;
        let to = self.master_key(target).await?;
        // As in `active_key`: cold unwraps can outlast the max staleness.
        if self.options.clock.monotonic() > picked_at && self.is_stale() {
            self.refresh_if_stale().await?;
        }
        // In memory: loading the keys may have reloaded the view.
        self.require_active(target)?;
        Ok(Some(record::rewrap(record, &from, &to, context)?))
    }

    /// `Ok` when this instance's view shows `version` active.
    pub(super) fn require_active(&self, version: u32) -> Result<(), Error> {
        match self.version_state(version) {
            Some(KeyState::Active) => Ok(()),
            Some(KeyState::Destroyed) => Err(Error::KeyDestroyed { version }),
            Some(state) => Err(Error::KeyState { version, state }),
            None => Err(Error::UnknownVersion { version }),
        }
    }
}
