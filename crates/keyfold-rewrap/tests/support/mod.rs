//! An in-memory table and a switchable wrapper for the rewrap tests.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "test support shared by test binaries"
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keyfold_core::audit::Actor;
use keyfold_core::keyring::Keyring;
use keyfold_core::store::MemoryStore;
use keyfold_core::time::{Clock, ManualClock, SystemClock, Timestamp};
use keyfold_core::{
    EncryptionContext, KeyWrapper, LocalKek, SecretKey, WrapContext, WrapError, WrapErrorKind,
    WrapOperation, WrappedKey, format,
};
use keyfold_rewrap::{CasOutcome, Row, RowSource, SourceError};

pub fn admin() -> Actor {
    Actor::new("test-admin")
}

/// A wrapper over a local KEK that can fail every n-th unwrap, or always.
#[derive(Debug)]
pub struct Switchable {
    inner: LocalKek,
    pub broken: AtomicBool,
    pub fail_every: AtomicU64,
    calls: AtomicU64,
}

impl Switchable {
    pub fn new() -> Self {
        Switchable {
            inner: LocalKek::from_bytes("kek", SecretKey::generate().unwrap()),
            broken: AtomicBool::new(false),
            fail_every: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl KeyWrapper for Switchable {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn key_ref(&self) -> &str {
        self.inner.key_ref()
    }
    async fn wrap(&self, key: &SecretKey, ctx: &WrapContext) -> Result<WrappedKey, WrapError> {
        self.inner.wrap(key, ctx).await
    }
    async fn unwrap(&self, w: &WrappedKey, ctx: &WrapContext) -> Result<SecretKey, WrapError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.fail_every.load(Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) || (every > 0 && n.is_multiple_of(every)) {
            return Err(WrapError::new(
                WrapErrorKind::Unavailable,
                "local",
                "kek",
                WrapOperation::Unwrap,
            ));
        }
        self.inner.unwrap(w, ctx).await
    }
}

pub async fn keyring(wrapper: Arc<Switchable>, ttl: Duration) -> Arc<Keyring> {
    keyring_on(wrapper, ttl, Arc::new(SystemClock)).await
}

/// As [`keyring`], on a manual clock: for tests that destroy on a job's
/// evidence, which must start at least a second after the retirement
/// (whole-second timestamps), so the test advances the clock instead of
/// sleeping. Give the job the same clock.
pub async fn keyring_on_manual_clock(
    wrapper: Arc<Switchable>,
    ttl: Duration,
) -> (Arc<Keyring>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    (keyring_on(wrapper, ttl, clock.clone()).await, clock)
}

async fn keyring_on(
    wrapper: Arc<Switchable>,
    ttl: Duration,
    clock: Arc<dyn Clock>,
) -> Arc<Keyring> {
    let ring = Keyring::builder("tenant", wrapper, Arc::new(MemoryStore::new()))
        .cache_ttl(ttl)
        // One instance per test: no other instance's stale view to wait
        // out before a job's evidence may destroy.
        .max_staleness(Duration::ZERO)
        // Nor a grace period or write window: the tests destroy as soon as
        // a job's evidence is in.
        .destroy_grace(Duration::ZERO)
        .write_window(Duration::ZERO)
        .clock(clock)
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    Arc::new(ring)
}

pub fn ctx(table: &str, id: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("table", table)
        .with("row", id)
}

/// Makes the ciphertext a concurrent writer puts in a row.
pub type Interference = Box<dyn Fn(&str) -> Vec<u8> + Send>;

/// A table: id -> ciphertext, ids zero-padded so their order is the cursor order.
pub struct Table {
    pub name: String,
    pub rows: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Before the n-th compare-and-swap (1-based), a "concurrent writer"
    /// replaces that row with this ciphertext maker's output.
    pub interfere: Mutex<Vec<(u64, Interference)>>,
    pub cas_calls: AtomicU64,
    pub fail_next_fetches: AtomicU64,
}

impl Table {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Table {
            name: name.to_owned(),
            rows: Mutex::new(BTreeMap::new()),
            interfere: Mutex::new(Vec::new()),
            cas_calls: AtomicU64::new(0),
            fail_next_fetches: AtomicU64::new(0),
        })
    }

    pub async fn fill(&self, ring: &Keyring, n: usize) {
        for i in 0..n {
            let id = format!("{i:06}");
            let ct = ring
                .encrypt(&ctx(&self.name, &id), plaintext(&self.name, &id).as_bytes())
                .await
                .unwrap();
            self.rows.lock().unwrap().insert(id, ct);
        }
    }

    pub fn versions(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for ct in self.rows.lock().unwrap().values() {
            *out.entry(format::inspect(ct).unwrap().key_version)
                .or_default() += 1;
        }
        out
    }

    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.rows.lock().unwrap().clone()
    }

    pub async fn assert_all_decrypt(&self, ring: &Keyring) {
        for (id, ct) in self.snapshot() {
            let pt = ring.decrypt(&ctx(&self.name, &id), &ct).await.unwrap();
            assert!(
                String::from_utf8(pt)
                    .unwrap()
                    .starts_with(&plaintext(&self.name, &id)),
                "{}/{id}",
                self.name
            );
        }
    }
}

pub fn plaintext(table: &str, id: &str) -> String {
    format!("secret of {table}/{id}")
}

#[async_trait]
impl RowSource for Table {
    fn name(&self) -> &str {
        &self.name
    }

    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        if self
            .fail_next_fetches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SourceError::transient("connection reset"));
        }
        let rows = self.rows.lock().unwrap();
        let range = match after {
            Some(a) => {
                rows.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => rows.range::<str, _>(..),
        };
        Ok(range
            .take(limit)
            .map(|(id, ct)| Row {
                id: id.clone(),
                cursor: id.clone(),
                context: ctx(&self.name, id),
                ciphertext: ct.clone(),
            })
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        Ok(self.rows.lock().unwrap().get(id).map(|ct| Row {
            id: id.to_owned(),
            cursor: id.to_owned(),
            context: ctx(&self.name, id),
            ciphertext: ct.clone(),
        }))
    }

    async fn compare_and_swap(
        &self,
        id: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        let n = self.cas_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut interfere = self.interfere.lock().unwrap();
        if let Some(pos) = interfere.iter().position(|(k, _)| *k == n) {
            let (_, make) = interfere.remove(pos);
            self.rows.lock().unwrap().insert(id.to_owned(), make(id));
        }
        let mut rows = self.rows.lock().unwrap();
        match rows.get_mut(id) {
            Some(current) if current == expected => {
                *current = new.to_vec();
                Ok(CasOutcome::Swapped)
            }
            _ => Ok(CasOutcome::Conflict),
        }
    }

    async fn count_after(&self, after: Option<&str>) -> Option<u64> {
        let rows = self.rows.lock().unwrap();
        Some(
            rows.keys()
                .filter(|k| after.is_none_or(|a| k.as_str() > a))
                .count() as u64,
        )
    }
}
