//! The clock the retry loop waits on: injectable, so a test can check that a
//! 429's `Retry-After` is honoured without sleeping.

pub use keyfold_core::retry::{Sleeper, TokioSleeper};
