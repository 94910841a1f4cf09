//! Retrying transient KMS failures: exponential backoff with full jitter
//! ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015), honouring
//! a provider's retry-after, never retrying a non-transient error.

use std::future::Future;
use std::time::Duration;

use crate::wrap::error::WrapError;

/// How [`retry`] retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff cap for the first retry; doubles each retry.
    pub base_delay: Duration,
    /// Largest backoff between two attempts.
    pub max_delay: Duration,
    /// A provider asking to wait longer than this is not retried.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The wait before retry number `retry` (0-based) after `error`, or `None`
    /// when the error must not be retried.
    pub fn delay_for(&self, retry: u32, error: &WrapError) -> Option<Duration> {
        if !error.is_transient() {
            return None;
        }
        self.backoff(retry, error.retry_after)
    }

    /// The wait before retry number `retry` (0-based) of a transient failure
    /// of any kind (a KMS, a host's store), honouring the `retry_after` the
    /// other side asked for; `None` once attempts run out or the requested
    /// wait exceeds [`max_retry_after`](Self::max_retry_after).
    pub fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if retry.saturating_add(1) >= self.max_attempts {
            return None;
        }
        let cap = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let jittered = jitter(cap);
        match retry_after {
            Some(wait) if wait > self.max_retry_after => None,
            Some(wait) => Some(wait.max(jittered)),
            None => Some(jittered),
        }
    }
}

/// A uniformly random duration in `[0, cap]` (full jitter).
fn jitter(cap: Duration) -> Duration {
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    match nanos.checked_add(1) {
        Some(range) => Duration::from_nanos(crate::format::rng::u64() % range),
        None => cap,
    }
}

/// Runs `op` until it succeeds, fails with a non-transient error, or the
/// policy's attempts run out; returns the last error.
///
/// ```
/// use keyfold_core::retry::{retry, RetryPolicy};
/// use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let mut calls = 0;
/// let result = retry(&RetryPolicy::default(), || {
///     calls += 1;
///     let n = calls;
///     async move {
///         if n < 3 {
///             Err(WrapError::new(WrapErrorKind::Throttled, "aws", "alias/k", WrapOperation::Wrap))
///         } else {
///             Ok(n)
///         }
///     }
/// })
/// .await;
/// assert_eq!(result.unwrap(), 3);
/// # });
/// ```
///
/// # Errors
/// The last [`WrapError`] when no attempt succeeded.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, op: F) -> Result<T, WrapError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, WrapError>>,
{
    retry_with(policy, &TokioSleeper, op).await
}

/// Waits between retries. The default, [`TokioSleeper`], sleeps on the tokio
/// timer; a test can record the requested waits and return at once, so
/// honouring a provider's retry-after is checked without sleeping.
pub trait Sleeper: Send + Sync + std::fmt::Debug {
    /// A future that completes after `duration`.
    fn sleep(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// Sleeps with `tokio::time::sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// [`retry`] with the waits on an injected [`Sleeper`].
///
/// # Errors
/// The last [`WrapError`] when no attempt succeeded.
pub async fn retry_with<T, F, Fut>(
    policy: &RetryPolicy,
    sleeper: &dyn Sleeper,
    mut op: F,
) -> Result<T, WrapError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, WrapError>>,
{
    let mut retries = 0;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) => match policy.delay_for(retries, &error) {
                Some(delay) => {
                    sleeper.sleep(delay).await;
                    retries += 1;
                }
                None => return Err(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wrap::error::{WrapErrorKind, WrapOperation};

    fn err(kind: WrapErrorKind) -> WrapError {
        WrapError::new(kind, "test", "k", WrapOperation::Unwrap)
    }

    #[test]
    fn never_retries_non_transient() {
        let policy = RetryPolicy::default();
        for kind in [
            WrapErrorKind::AccessDenied,
            WrapErrorKind::NotFound,
            WrapErrorKind::KeyDisabled,
            WrapErrorKind::InvalidCiphertext,
            WrapErrorKind::KeyMismatch,
            WrapErrorKind::Misconfigured,
        ] {
            assert_eq!(policy.delay_for(0, &err(kind)), None, "{kind}");
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let policy = RetryPolicy {
            max_attempts: 100,
            ..RetryPolicy::default()
        };
        for retry in 0..40 {
            let d = policy
                .delay_for(retry, &err(WrapErrorKind::Unavailable))
                .unwrap();
            assert!(d <= policy.max_delay);
            assert!(d <= policy.base_delay * 2u32.saturating_pow(retry));
        }
        assert_eq!(policy.delay_for(99, &err(WrapErrorKind::Unavailable)), None);
    }

    #[test]
    fn honours_retry_after() {
        let policy = RetryPolicy::default();
        let e = err(WrapErrorKind::Throttled).with_retry_after(Duration::from_secs(3));
        assert!(policy.delay_for(0, &e).unwrap() >= Duration::from_secs(3));
        let e = err(WrapErrorKind::Throttled).with_retry_after(Duration::from_secs(3600));
        assert_eq!(policy.delay_for(0, &e), None);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_permanent_error_and_after_max_attempts() {
        let mut calls = 0;
        let r: Result<(), _> = retry(&RetryPolicy::default(), || {
            calls += 1;
            async { Err(err(WrapErrorKind::AccessDenied)) }
        })
        .await;
        assert_eq!(r.unwrap_err().kind, WrapErrorKind::AccessDenied);
        assert_eq!(calls, 1);

        let mut calls = 0;
        let r: Result<(), _> = retry(&RetryPolicy::default(), || {
            calls += 1;
            async { Err(err(WrapErrorKind::Unavailable)) }
        })
        .await;
        assert_eq!(r.unwrap_err().kind, WrapErrorKind::Unavailable);
        assert_eq!(calls, 5);
    }
}
