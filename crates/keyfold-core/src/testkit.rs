//! The shared `KeyWrapper` conformance suite (feature `testkit`).
//!
//! Written once, run by every implementation (local, AWS, GCP, Azure), as
//! RustCrypto's `aead::dev` and object_store's `integration` module are:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use keyfold_core::{testkit, LocalKek, SecretKey};
//! let kek = LocalKek::from_bytes("a", SecretKey::generate().unwrap());
//! let other = LocalKek::from_bytes("b", SecretKey::generate().unwrap());
//! testkit::run_all(&kek, &other, testkit::Capabilities::default()).await;
//! # });
//! ```
//!
//! Each check panics with a message naming what broke.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test support: a failed check is a test failure"
)]

use std::sync::Arc;

mod counting;
mod store;
mod unwatched;
pub use counting::CountingWrapper;
pub use store::store_conformance;
pub use unwatched::Unwatched;

use crate::format::secret::SecretKey;
use crate::wrap::error::WrapErrorKind;
use crate::wrap::{KeyWrapper, WrapContext, WrappedKey};

/// What a provider can promise; checks that depend on it adapt.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// The KMS itself binds the [`WrapContext`] (AWS encryption context, GCP
    /// AAD). Azure Key Vault takes no AAD: keyfold's header carries the binding.
    pub binds_context: bool,
    /// Wraps the same key differently each time.
    pub randomized: bool,
    /// Concurrent wraps in [`concurrent_wraps`].
    pub concurrency: usize,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            binds_context: true,
            randomized: true,
            concurrency: 32,
        }
    }
}

fn ctx() -> WrapContext {
    WrapContext::new("testkit-tenant", 1)
}

async fn wrap_random(w: &dyn KeyWrapper, c: &WrapContext) -> (SecretKey, WrappedKey) {
    let key = SecretKey::generate().unwrap();
    let wrapped = w
        .wrap(&key, c)
        .await
        .unwrap_or_else(|e| panic!("wrap failed: {e}"));
    (key, wrapped)
}

/// Runs every check. `other_key` must wrap under a different KMS key.
pub async fn run_all(wrapper: &dyn KeyWrapper, other_key: &dyn KeyWrapper, caps: Capabilities) {
    round_trip(wrapper).await;
    metadata_names_the_key(wrapper).await;
    probe_payload(wrapper).await;
    if caps.binds_context {
        wrong_context_fails(wrapper).await;
    }
    tampered_blob_fails(wrapper).await;
    wrong_key_fails(wrapper, other_key).await;
    if caps.randomized {
        wraps_are_randomized(wrapper).await;
    }
    concurrent_wraps(wrapper, caps.concurrency).await;
}

/// Wrap then unwrap gives the same 32 bytes back.
pub async fn round_trip(w: &dyn KeyWrapper) {
    let (key, wrapped) = wrap_random(w, &ctx()).await;
    let back = w
        .unwrap(&wrapped, &ctx())
        .await
        .unwrap_or_else(|e| panic!("unwrap failed: {e}"));
    assert_eq!(back.expose(), key.expose(), "round trip changed the key");
    assert!(
        !contains(&wrapped.bytes, key.expose()),
        "wrapped bytes contain the plaintext key"
    );
}

/// The wrapped record names the provider and the wrapper's key.
pub async fn metadata_names_the_key(w: &dyn KeyWrapper) {
    let (_, wrapped) = wrap_random(w, &ctx()).await;
    assert_eq!(wrapped.provider, w.provider(), "provider name");
    assert!(!wrapped.key_ref.is_empty(), "empty key_ref");
}

/// The onboarding probe: a random 32-byte payload survives a live round trip.
pub async fn probe_payload(w: &dyn KeyWrapper) {
    let c = WrapContext::new("testkit-probe", 0);
    for _ in 0..3 {
        let (key, wrapped) = wrap_random(w, &c).await;
        let back = w.unwrap(&wrapped, &c).await.expect("probe unwrap");
        assert_eq!(back.expose(), key.expose());
    }
}

/// Unwrapping with another keyring id or another version fails.
pub async fn wrong_context_fails(w: &dyn KeyWrapper) {
    let (_, wrapped) = wrap_random(w, &ctx()).await;
    for other in [
        WrapContext::new("testkit-other-tenant", 1),
        WrapContext::new("testkit-tenant", 2),
    ] {
        match w.unwrap(&wrapped, &other).await {
            Ok(_) => panic!("unwrap under a different context {other:?} succeeded"),
            Err(e) => assert!(
                !e.is_transient(),
                "wrong context must be a permanent error, got {e}"
            ),
        }
    }
}

/// Any changed byte of the wrapped blob is refused (sampled positions).
pub async fn tampered_blob_fails(w: &dyn KeyWrapper) {
    let (_, wrapped) = wrap_random(w, &ctx()).await;
    let len = wrapped.bytes.len();
    assert!(len > 0, "empty wrapped key");
    let positions = [0, len / 4, len / 2, len * 3 / 4, len - 1];
    for pos in positions {
        let mut bad = wrapped.clone();
        bad.bytes[pos] ^= 0x01;
        if w.unwrap(&bad, &ctx()).await.is_ok() {
            panic!("unwrap of a blob with byte {pos} flipped succeeded");
        }
    }
    let mut short = wrapped.clone();
    short.bytes.truncate(len - 1);
    assert!(
        w.unwrap(&short, &ctx()).await.is_err(),
        "truncated blob accepted"
    );
    let mut long = wrapped;
    long.bytes.push(0);
    assert!(
        w.unwrap(&long, &ctx()).await.is_err(),
        "extended blob accepted"
    );
}

/// A key wrapped by `w` does not unwrap under `other` (another KMS key),
/// even when the caller relabels the wrapped record with the other key's name.
pub async fn wrong_key_fails(w: &dyn KeyWrapper, other: &dyn KeyWrapper) {
    assert_ne!(
        w.key_ref(),
        other.key_ref(),
        "other_key must be another key"
    );
    let (_, wrapped) = wrap_random(w, &ctx()).await;
    let err = other
        .unwrap(&wrapped, &ctx())
        .await
        .err()
        .unwrap_or_else(|| panic!("another key unwrapped it"));
    assert!(
        !err.is_transient(),
        "wrong key must be permanent, got {err}"
    );
    let mut relabelled = wrapped;
    relabelled.key_ref = other.key_ref().to_owned();
    assert!(
        other.unwrap(&relabelled, &ctx()).await.is_err(),
        "relabelled blob unwrapped under another key"
    );
}

/// Two wraps of one key differ.
pub async fn wraps_are_randomized(w: &dyn KeyWrapper) {
    let key = SecretKey::generate().unwrap();
    let a = w.wrap(&key, &ctx()).await.unwrap();
    let b = w.wrap(&key, &ctx()).await.unwrap();
    assert_ne!(a.bytes, b.bytes, "wrapping is deterministic");
}

/// `n` wraps and unwraps at once all succeed and stay separate.
pub async fn concurrent_wraps(w: &dyn KeyWrapper, n: usize) {
    let w: Arc<&dyn KeyWrapper> = Arc::new(w);
    let tasks = (0..n).map(|i| {
        let w = Arc::clone(&w);
        async move {
            let c = WrapContext::new(format!("testkit-concurrent-{i}"), i as u32);
            let (key, wrapped) = wrap_random(*w, &c).await;
            let back = w.unwrap(&wrapped, &c).await.expect("concurrent unwrap");
            assert_eq!(back.expose(), key.expose(), "concurrent round trip {i}");
        }
    });
    join_all(tasks).await;
}

async fn join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    // Polls all futures in one task so they are in flight together, without
    // requiring `'static` (no spawn) or an extra dependency.
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        pending.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts `kind` is one of `expected`, with a readable message.
pub fn assert_kind(actual: WrapErrorKind, expected: &[WrapErrorKind]) {
    assert!(
        expected.contains(&actual),
        "error kind {actual:?}, expected one of {expected:?}"
    );
}
