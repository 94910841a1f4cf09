//! The job's persisted state: what a restarted job resumes from.

use keyfold_core::time::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How records are moved to the target version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Header only: the data key is rewrapped, the payload untouched
    /// (scheduled rotation).
    #[default]
    Rewrap,
    /// Fresh data key, payload encrypted again (suspected compromise).
    Reencrypt,
}

/// Counters, per source and in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Rows read (in this shard).
    pub seen: u64,
    /// Rows moved to the target and written.
    pub rewrapped: u64,
    /// Rows already on the target or a newer version.
    pub skipped: u64,
    /// Compare-and-swap misses (a concurrent write won; the row was re-read).
    pub conflicts: u64,
    /// Rows left unchanged after retries, because of an error.
    pub failed: u64,
    /// Rows that kept conflicting and were left to the concurrent writer
    /// without being seen on the target.
    pub unresolved: u64,
}

impl Counters {
    pub(crate) fn add(&mut self, other: &Counters) {
        // Saturating: a checkpoint comes back from the host's storage.
        self.seen = self.seen.saturating_add(other.seen);
        self.rewrapped = self.rewrapped.saturating_add(other.rewrapped);
        self.skipped = self.skipped.saturating_add(other.skipped);
        self.conflicts = self.conflicts.saturating_add(other.conflicts);
        self.failed = self.failed.saturating_add(other.failed);
        self.unresolved = self.unresolved.saturating_add(other.unresolved);
    }
}

/// One of `count` disjoint shards, chosen by a hash of the row id.
///
/// Every row id belongs to exactly one shard, so `count` workers each running
/// a job for a different `index` together cover every row exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: u32,
    /// Number of shards (at least 1).
    pub count: u32,
}

impl Shard {
    /// The whole keyspace.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`, or `None` if `index >= count`.
    pub fn new(index: u32, count: u32) -> Option<Shard> {
        (index < count).then_some(Shard { index, count })
    }

    /// Whether this shard owns row `id` (SHA-256 of the id, first 8 bytes,
    /// modulo the shard count: stable across processes and versions).
    pub fn owns(&self, id: &str) -> bool {
        if self.count <= 1 {
            return true;
        }
        let digest = Sha256::digest(id.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
        u64::from_be_bytes(first) % u64::from(self.count) == u64::from(self.index)
    }
}

/// Where one source stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCheckpoint {
    /// The source's name.
    pub name: String,
    /// Cursor of the last row processed.
    pub cursor: Option<String>,
    /// The source returned its last row.
    pub exhausted: bool,
    /// Counters for this source.
    pub counters: Counters,
}

/// Everything a job needs to resume: persist it after every batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Schema version of this structure.
    pub schema: u32,
    /// The job's id (also its lease id).
    pub job_id: String,
    /// The keyring the job works on.
    pub keyring_id: String,
    /// The version every record is moved to, pinned at creation.
    pub target_version: u32,
    /// Rewrap or re-encrypt.
    pub mode: Mode,
    /// The shard this job covers.
    pub shard: Shard,
    /// When the job was created.
    pub started_at: Timestamp,
    /// When its lease expires.
    pub lease_expires_at: Timestamp,
    /// Per source, in the order the sources were given.
    pub sources: Vec<SourceCheckpoint>,
    /// Batches completed.
    pub batches: u64,
    /// Every source exhausted.
    pub completed: bool,
}

impl Checkpoint {
    /// Totals over all sources.
    pub fn totals(&self) -> Counters {
        let mut total = Counters::default();
        for s in &self.sources {
            total.add(&s.counters);
        }
        total
    }
}
