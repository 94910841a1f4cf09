#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod job;
pub mod lazy;
pub mod source;

pub use checkpoint::{Checkpoint, Counters, Mode, Shard, SourceCheckpoint};
pub use job::{
    BatchReport, CompletionReport, JobError, JobOptions, JobProgress, RewrapJob, RowFailure, Verify,
};
pub use lazy::{LazyRead, decrypt_and_upgrade};
pub use source::{CasOutcome, CasWrite, Row, RowSource, SourceError};
