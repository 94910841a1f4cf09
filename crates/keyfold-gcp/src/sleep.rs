//! The clock the retry loop waits on: injectable, so a test can check that a
//! `RESOURCE_EXHAUSTED`'s `RetryInfo` delay is honoured without sleeping.

pub use keyfold_core::retry::{Sleeper, TokioSleeper};
