//! A wrapper that counts KMS calls and can be told to fail or to be slow,
//! for keyring tests (single-flight, sealing, failed wraps).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::format::secret::SecretKey;
use crate::wrap::error::{WrapError, WrapErrorKind, WrapOperation};
use crate::wrap::{KeyWrapper, WrapContext, WrappedKey};

/// Wraps another [`KeyWrapper`], counting calls; can inject failures and delay.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use keyfold_core::testkit::CountingWrapper;
/// use keyfold_core::{KeyWrapper, LocalKek, SecretKey, WrapContext, WrapErrorKind};
/// let w = CountingWrapper::new(LocalKek::from_bytes("k", SecretKey::generate().unwrap()));
/// let ctx = WrapContext::new("t", 1);
/// let wrapped = w.wrap(&SecretKey::generate().unwrap(), &ctx).await.unwrap();
/// w.fail_with(Some(WrapErrorKind::Unavailable));
/// assert!(w.unwrap(&wrapped, &ctx).await.is_err());
/// assert_eq!((w.wraps(), w.unwraps()), (1, 1));
/// # });
/// ```
#[derive(Debug)]
pub struct CountingWrapper<W> {
    inner: W,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    /// 0: no failure; otherwise 1 + index into `KINDS`.
    fail: AtomicU8,
    fail_wrap_only: AtomicBool,
    delay_ms: AtomicU64,
}

const KINDS: [WrapErrorKind; 8] = [
    WrapErrorKind::AccessDenied,
    WrapErrorKind::NotFound,
    WrapErrorKind::KeyDisabled,
    WrapErrorKind::Throttled,
    WrapErrorKind::Unavailable,
    WrapErrorKind::InvalidCiphertext,
    WrapErrorKind::KeyMismatch,
    WrapErrorKind::Misconfigured,
];

impl<W: KeyWrapper> CountingWrapper<W> {
    /// Counts calls to `inner`.
    pub fn new(inner: W) -> Self {
        CountingWrapper {
            inner,
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            fail: AtomicU8::new(0),
            fail_wrap_only: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        }
    }

    /// `new` in an `Arc`.
    pub fn shared(inner: W) -> Arc<Self> {
        Arc::new(Self::new(inner))
    }

    /// Calls to `wrap` so far (failed ones included).
    pub fn wraps(&self) -> u64 {
        self.wraps.load(Ordering::SeqCst)
    }

    /// Calls to `unwrap` so far (failed ones included).
    pub fn unwraps(&self) -> u64 {
        self.unwraps.load(Ordering::SeqCst)
    }

    /// Makes every call fail with `kind` (`None`: stop failing).
    pub fn fail_with(&self, kind: Option<WrapErrorKind>) {
        let code = kind
            .and_then(|k| KINDS.iter().position(|x| *x == k))
            .map_or(0, |i| i as u8 + 1);
        self.fail.store(code, Ordering::SeqCst);
        self.fail_wrap_only.store(false, Ordering::SeqCst);
    }

    /// Makes only `wrap` fail with `kind`.
    pub fn fail_wraps_with(&self, kind: WrapErrorKind) {
        self.fail_with(Some(kind));
        self.fail_wrap_only.store(true, Ordering::SeqCst);
    }

    /// Sleeps this long (tokio time) in every call before answering.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis().try_into().unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    async fn before(&self, op: WrapOperation) -> Result<(), WrapError> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let code = self.fail.load(Ordering::SeqCst);
        let wrap_only = self.fail_wrap_only.load(Ordering::SeqCst);
        match KINDS.get(usize::from(code).wrapping_sub(1)) {
            Some(kind) if !(wrap_only && op == WrapOperation::Unwrap) => {
                Err(
                    WrapError::new(*kind, self.inner.provider(), self.inner.key_ref(), op)
                        .with_message("injected by CountingWrapper"),
                )
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl<W: KeyWrapper> KeyWrapper for CountingWrapper<W> {
    fn provider(&self) -> &str {
        self.inner.provider()
    }

    fn key_ref(&self) -> &str {
        self.inner.key_ref()
    }

    async fn wrap(&self, key: &SecretKey, context: &WrapContext) -> Result<WrappedKey, WrapError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        self.before(WrapOperation::Wrap).await?;
        self.inner.wrap(key, context).await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SecretKey, WrapError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.before(WrapOperation::Unwrap).await?;
        self.inner.unwrap(wrapped, context).await
    }
}
