//! Lazy (on-read) rewrap: move records to the active version as they are read.

use std::fmt;

use keyfold_core::keyring::Keyring;
use keyfold_core::{EncryptionContext, Error, MasterKey, format, record};

/// A decrypted record, and its ciphertext on the active version when it was
/// on an older one. `Debug` shows lengths only, never the plaintext.
pub struct LazyRead {
    /// The plaintext.
    pub plaintext: Vec<u8>,
    /// The record rewrapped (header only) to the active version and
    /// verified to open under it, for the host to write back with
    /// compare-and-swap against the ciphertext it read; `None` when the
    /// record is already current or the upgrade was skipped.
    pub upgraded: Option<Vec<u8>>,
    /// Why an upgrade was skipped (the read itself succeeded), for the
    /// host's logs and metrics.
    pub upgrade_error: Option<Error>,
}

impl fmt::Debug for LazyRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyRead")
            .field(
                "plaintext",
                &format_args!("<{} bytes>", self.plaintext.len()),
            )
            .field(
                "upgraded",
                &self
                    .upgraded
                    .as_ref()
                    .map(|u| format!("<{} bytes>", u.len())),
            )
            .field("upgrade_error", &self.upgrade_error)
            .finish()
    }
}

/// Decrypts `ciphertext`; if it is not on the active version, also rewraps
/// it (header only) to the active version and checks the result opens.
///
/// # Errors
/// As [`Keyring::decrypt`]. A failure to upgrade is not an error: the read
/// succeeds with `upgraded: None` and the reason in `upgrade_error`.
pub async fn decrypt_and_upgrade(
    keyring: &Keyring,
    context: &EncryptionContext,
    ciphertext: &[u8],
) -> Result<LazyRead, Error> {
    let plaintext = keyring.decrypt(context, ciphertext).await?;
    let version = format::inspect(ciphertext)?.key_version;
    // `active_key` reloads a view older than the keyring's max staleness:
    // an instance that missed a rotation must not upgrade onto the version
    // another instance has since retired (or disabled after an incident).
    let (upgraded, upgrade_error) = match keyring.active_key().await {
        Ok(active) if version < active.version() => {
            match upgrade(keyring, context, ciphertext, &active).await {
                Ok(new) => (new, None),
                Err(e) => (None, Some(e)),
            }
        }
        Ok(_) | Err(Error::NoActiveVersion) => (None, None),
        // No fresh view (store down, keyring sealed): worth reporting only
        // if the last view says the record needed an upgrade.
        Err(e) => match keyring.active_version() {
            Some(active) if version < active => (None, Some(e)),
            _ => (None, None),
        },
    };
    Ok(LazyRead {
        plaintext,
        upgraded,
        upgrade_error,
    })
}

async fn upgrade(
    keyring: &Keyring,
    context: &EncryptionContext,
    ciphertext: &[u8],
    active: &MasterKey,
) -> Result<Option<Vec<u8>>, Error> {
    let Some(new) = keyring
        .rewrap(context, ciphertext, active.version())
        .await?
    else {
        return Ok(None);
    };
    // Never hand back what does not open: the wrap and commitment under
    // the active version (the payload bytes are unchanged).
    record::check_header(&new, active, context)?;
    Ok(Some(new))
}
