//! The clock the retry loop waits on: injectable, so a test can check that a
//! `RESOURCE_EXHAUSTED`'s `RetryInfo` delay is honoured without sleeping.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Waits between retries. The default, [`TokioSleeper`], sleeps on the tokio
/// timer; a test can record the requested waits and return at once.
pub trait Sleeper: Send + Sync + fmt::Debug {
    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// Sleeps with `tokio::time::sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(tokio::time::sleep(duration))
    }
}
