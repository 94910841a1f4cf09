//! Lazy (on-read) rewrap: move records to the active version as they are read.

use keyfold_core::keyring::Keyring;
use keyfold_core::{EncryptionContext, Error, format};

/// A decrypted record, and its ciphertext on the active version when it was
/// on an older one.
#[derive(Debug)]
pub struct LazyRead {
    /// The plaintext.
    pub plaintext: Vec<u8>,
    /// The record rewrapped to the active version, for the host to write
    /// back with compare-and-swap against the ciphertext it read; `None`
    /// when the record is already current.
    pub upgraded: Option<Vec<u8>>,
}

/// Decrypts `ciphertext`; if it is not on the active version, also rewraps
/// it (header only) to the active version.
///
/// # Errors
/// As [`Keyring::decrypt`]. A failure to rewrap is not an error: the read
/// succeeds with `upgraded: None`.
pub async fn decrypt_and_upgrade(
    keyring: &Keyring,
    context: &EncryptionContext,
    ciphertext: &[u8],
) -> Result<LazyRead, Error> {
    let plaintext = keyring.decrypt(context, ciphertext).await?;
    let version = format::inspect(ciphertext)?.key_version;
    let upgraded = match keyring.active_version() {
        Some(active) if version < active => keyring
            .rewrap(context, ciphertext, active)
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    Ok(LazyRead {
        plaintext,
        upgraded,
    })
}
