//! [`Unwatched`]: a store without change notifications, for fleet tests.

use async_trait::async_trait;

use crate::keyring::StoredKeyring;
use crate::keyring::store::{KeyringStore, Revision, StoreError};

/// Forwards every load and save to `S` but pushes no change notifications
/// ([`KeyringStore::watch`] is `None`): instances over it rely on the
/// max-staleness bound alone, as over a store that cannot notify, or one
/// whose notification connection is down.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use keyfold_core::{KeyringStore, MemoryStore};
/// use keyfold_core::testkit::Unwatched;
/// let shared = Arc::new(MemoryStore::new());
/// let quiet = Unwatched(shared.clone());
/// assert!(quiet.watch().is_none());
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Unwatched<S>(pub S);

#[async_trait]
impl<S: KeyringStore> KeyringStore for Unwatched<S> {
    async fn load(&self, id: &str) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        self.0.load(id).await
    }

    async fn save(
        &self,
        id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        self.0.save(id, expected, keyring).await
    }
}
