//! Model-based test of the keyring lifecycle: random sequences of rotate /
//! create-pending / activate / rollback / disable / enable / destroy /
//! encrypt / decrypt / cache clears / reopen / KMS outages / unseal, run
//! against the real keyring (local KEK, in-memory store) and a simple model
//! written independently of the implementation's transition table, which
//! also tracks which versions are cached and whether the keyring is sealed.
//! After every step the keyring must agree with the model and every
//! invariant must hold.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::{Actor, RecordingSink};
use keyfold_core::keyring::{DestroyAuthorization, KeyState, Keyring, NoRecordsLeft, Transition};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::{KeyringStore, MemoryStore};
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{EncryptionContext, Error, LocalKek, SecretKey, WrapErrorKind};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Rotate,
    CreatePending,
    Activate(u8),
    Rollback(u8),
    Disable(u8),
    Enable(u8),
    Destroy(u8, bool),
    Encrypt(u8),
    Decrypt(u8),
    ClearCache,
    Reopen,
    Outage(bool),
    Unseal,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Rotate),
        1 => Just(Op::CreatePending),
        1 => any::<u8>().prop_map(Op::Activate),
        1 => any::<u8>().prop_map(Op::Rollback),
        2 => any::<u8>().prop_map(Op::Disable),
        1 => any::<u8>().prop_map(Op::Enable),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(v, f)| Op::Destroy(v, f)),
        3 => any::<u8>().prop_map(Op::Encrypt),
        3 => any::<u8>().prop_map(Op::Decrypt),
        1 => Just(Op::ClearCache),
        1 => Just(Op::Reopen),
        1 => any::<bool>().prop_map(Op::Outage),
        1 => Just(Op::Unseal),
    ]
}

/// What the model expects an operation to give.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Illegal(KeyState, Transition),
    Unknown,
    NoActive,
    Disabled,
    Destroyed,
    Sealed,
}

fn classify<T>(r: &Result<T, Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(Error::IllegalTransition {
            from, transition, ..
        }) => Outcome::Illegal(*from, *transition),
        Err(Error::UnknownVersion { .. }) => Outcome::Unknown,
        Err(Error::NoActiveVersion) => Outcome::NoActive,
        Err(Error::KeyState {
            state: KeyState::Disabled,
            ..
        }) => Outcome::Disabled,
        Err(Error::KeyDestroyed { .. }) => Outcome::Destroyed,
        Err(Error::Sealed { .. }) => Outcome::Sealed,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[derive(Default)]
struct Model {
    states: BTreeMap<u32, KeyState>,
    next: u32,
    /// (version, row, plaintext, ciphertext)
    records: Vec<(u32, u32, Vec<u8>, Vec<u8>)>,
    /// Versions whose unwrapped key this instance holds.
    cached: BTreeSet<u32>,
    /// The KMS is failing.
    outage: bool,
    /// The keyring is sealed.
    sealed: bool,
    /// `kms.sealed` events expected so far.
    seals: usize,
}

impl Model {
    fn active(&self) -> Option<u32> {
        self.states
            .iter()
            .find(|(_, s)| **s == KeyState::Active)
            .map(|(v, _)| *v)
    }

    /// A KMS call is needed (a wrap, or an unwrap of an uncached version):
    /// `Ok` when it is made and succeeds, else the keyring is (or becomes) sealed.
    fn kms_call(&mut self) -> Outcome {
        if self.sealed {
            return Outcome::Sealed;
        }
        if self.outage {
            self.sealed = true;
            self.seals += 1;
            return Outcome::Sealed;
        }
        Outcome::Ok
    }

    /// Using version `v`'s key for encrypt or decrypt.
    fn use_key(&mut self, v: u32) -> Outcome {
        if self.cached.contains(&v) {
            return Outcome::Ok;
        }
        let o = self.kms_call();
        if o == Outcome::Ok {
            self.cached.insert(v);
        }
        o
    }

    fn pick(&self, i: u8) -> u32 {
        // 1..=next: sometimes a version that does not exist yet.
        1 + u32::from(i) % self.next
    }

    /// The model's own transition table (docs/LIFECYCLE.md).
    fn expect(&self, v: u32, t: Transition) -> Outcome {
        use KeyState::*;
        let Some(&s) = self.states.get(&v) else {
            return Outcome::Unknown;
        };
        let allowed = match t {
            Transition::Activate => s == Pending,
            Transition::Rollback => s == Retired,
            Transition::Disable => s == Pending || s == Retired,
            Transition::Enable => s == Disabled,
            Transition::Destroy => s == Disabled,
            Transition::Retire => false,
        };
        if allowed {
            Outcome::Ok
        } else {
            Outcome::Illegal(s, t)
        }
    }

    fn apply(&mut self, v: u32, t: Transition) {
        use KeyState::*;
        let to = match t {
            Transition::Activate | Transition::Rollback => {
                if let Some(a) = self.active() {
                    self.states.insert(a, Retired);
                }
                Active
            }
            Transition::Disable => Disabled,
            Transition::Enable => Retired,
            Transition::Destroy => Destroyed,
            Transition::Retire => Retired,
        };
        self.states.insert(v, to);
    }
}

fn ctx(row: u32) -> EncryptionContext {
    EncryptionContext::new().with("row", row.to_string())
}

struct World {
    ring: Keyring,
    kek: Arc<CountingWrapper<LocalKek>>,
    store: Arc<MemoryStore>,
    sink: Arc<RecordingSink>,
    clock: ManualClock,
}

impl World {
    async fn open(&self) -> Keyring {
        Keyring::builder("tenant", self.kek.clone(), self.store.clone())
            .audit(self.sink.clone())
            .clock(Arc::new(self.clock.clone()))
            .retry_policy(RetryPolicy::none())
            .destroy_grace(std::time::Duration::ZERO)
            .write_window(std::time::Duration::ZERO)
            .open()
            .await
            .unwrap()
    }
}

async fn run(ops: Vec<Op>) {
    let kek = CountingWrapper::shared(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let store = Arc::new(MemoryStore::new());
    let sink = Arc::new(RecordingSink::default());
    let clock = ManualClock::new(Timestamp(1_000_000));
    let ring = Keyring::builder("tenant", kek.clone(), store.clone())
        .audit(sink.clone())
        .clock(Arc::new(clock.clone()))
        .retry_policy(RetryPolicy::none())
        .destroy_grace(std::time::Duration::ZERO)
        .write_window(std::time::Duration::ZERO)
        .create()
        .await
        .unwrap();
    let mut w = World {
        ring,
        kek,
        store,
        sink,
        clock,
    };
    let mut m = Model {
        next: 1,
        ..Model::default()
    };
    let actor = Actor::new("model");
    let mut ever_active = false;

    for (step, op) in ops.into_iter().enumerate() {
        w.clock.advance(Duration::from_secs(1));
        let events_before = w.sink.events().len();
        let mut mutated = false;
        match op {
            Op::Rotate => {
                let r = w.ring.rotate(&actor).await;
                let expected = m.kms_call();
                assert_eq!(classify(&r), expected, "step {step}: rotate");
                if expected == Outcome::Ok {
                    let r = r.unwrap();
                    assert_eq!(r.version, m.next, "step {step}: version numbers only grow");
                    if let Some(a) = m.active() {
                        m.states.insert(a, KeyState::Retired);
                    }
                    m.states.insert(m.next, KeyState::Active);
                    m.cached.insert(m.next);
                    m.next += 1;
                    mutated = true;
                }
            }
            Op::CreatePending => {
                let r = w.ring.create_pending(&actor).await;
                let expected = m.kms_call();
                assert_eq!(classify(&r), expected, "step {step}: create_pending");
                if expected == Outcome::Ok {
                    let v = r.unwrap();
                    assert_eq!(v, m.next);
                    m.states.insert(v, KeyState::Pending);
                    m.cached.insert(v);
                    m.next += 1;
                    mutated = true;
                }
            }
            Op::Activate(i) | Op::Rollback(i) | Op::Disable(i) | Op::Enable(i) => {
                let v = m.pick(i);
                let (t, r) = match op {
                    Op::Activate(_) => (Transition::Activate, w.ring.activate(v, &actor).await),
                    Op::Rollback(_) => (Transition::Rollback, w.ring.rollback(v, &actor).await),
                    Op::Disable(_) => (Transition::Disable, w.ring.disable(v, &actor).await),
                    _ => (Transition::Enable, w.ring.enable(v, &actor).await),
                };
                let expected = m.expect(v, t);
                assert_eq!(classify(&r), expected, "step {step}: {t} v{v}");
                if expected == Outcome::Ok {
                    m.apply(v, t);
                    if t == Transition::Disable {
                        m.cached.remove(&v);
                    }
                    mutated = true;
                }
            }
            Op::Destroy(i, forced) => {
                let v = m.pick(i);
                let auth = if forced {
                    DestroyAuthorization::Forced {
                        reason: "model".into(),
                    }
                } else {
                    // Evidence is gathered once every instance has seen the
                    // retirement (the keyring's max staleness).
                    w.clock
                        .advance(keyfold_core::keyring::DEFAULT_MAX_STALENESS);
                    DestroyAuthorization::Evidence(NoRecordsLeft {
                        keyring_id: "tenant".into(),
                        version: v,
                        source: "model".into(),
                        checked_at: w.clock.now(),
                    })
                };
                let r = w.ring.destroy(v, auth, &actor).await;
                let expected = m.expect(v, Transition::Destroy);
                assert_eq!(classify(&r), expected, "step {step}: destroy v{v}");
                if expected == Outcome::Ok {
                    m.apply(v, Transition::Destroy);
                    m.cached.remove(&v);
                    mutated = true;
                }
            }
            Op::Encrypt(b) => {
                let row = step as u32;
                let pt = vec![b; usize::from(b % 7)];
                let r = w.ring.encrypt(&ctx(row), &pt).await;
                match m.active() {
                    Some(a) if m.use_key(a) == Outcome::Sealed => {
                        assert_eq!(classify(&r), Outcome::Sealed, "step {step}: encrypt");
                    }
                    Some(a) => {
                        let ct = r.unwrap();
                        let info = keyfold_core::format::inspect(&ct).unwrap();
                        assert_eq!(info.key_version, a, "encrypt uses the active version");
                        m.records.push((a, row, pt, ct));
                    }
                    None => assert_eq!(classify(&r), Outcome::NoActive),
                }
            }
            Op::Decrypt(i) => {
                if !m.records.is_empty() {
                    let (v, row, pt, ct) = m.records[usize::from(i) % m.records.len()].clone();
                    let r = w.ring.decrypt(&ctx(row), &ct).await;
                    let state = m.states[&v];
                    match state {
                        KeyState::Disabled => assert_eq!(classify(&r), Outcome::Disabled),
                        KeyState::Destroyed => assert_eq!(classify(&r), Outcome::Destroyed),
                        _ if m.use_key(v) == Outcome::Sealed => {
                            assert_eq!(classify(&r), Outcome::Sealed, "step {step}: decrypt v{v}");
                        }
                        _ => assert_eq!(r.unwrap(), pt, "step {step}: record on v{v}"),
                    }
                }
            }
            Op::ClearCache => {
                w.ring.clear_cache();
                m.cached.clear();
            }
            Op::Reopen => {
                w.ring = w.open().await;
                m.cached.clear();
                m.sealed = false;
            }
            Op::Outage(on) => {
                // A lasting failure (access revoked): transient ones
                // (unavailable, throttled) unseal by themselves, which
                // tests/fleet.rs and tests/sealing.rs cover.
                w.kek.fail_with(on.then_some(WrapErrorKind::AccessDenied));
                m.outage = on;
            }
            Op::Unseal => {
                let r = w.ring.unseal().await;
                // Unseal retries even when sealed: one live unwrap of the
                // active (else newest decryptable) version, or a probe; a
                // disabled version is never loaded into the cache.
                let candidate = m.active().or_else(|| {
                    m.states
                        .iter()
                        .rev()
                        .find(|(_, s)| {
                            matches!(
                                **s,
                                KeyState::Pending | KeyState::Active | KeyState::Retired
                            )
                        })
                        .map(|(v, _)| *v)
                });
                if m.outage {
                    if !m.sealed {
                        m.sealed = true;
                        m.seals += 1;
                    }
                    assert_eq!(classify(&r), Outcome::Sealed, "step {step}: unseal");
                } else {
                    assert_eq!(classify(&r), Outcome::Ok, "step {step}: unseal");
                    m.sealed = false;
                    m.cached.extend(candidate);
                }
            }
        }

        // ---- invariants after every step ----
        let all = w.sink.events();
        let new = all.get(events_before..).unwrap_or_default();
        let by_actor = new.iter().filter(|e| e.actor == actor).count();
        assert_eq!(by_actor > 0, mutated, "step {step}: events iff a change");
        let seals = all.iter().filter(|e| e.name() == "kms.sealed").count();
        assert_eq!(seals, m.seals, "step {step}: one kms.sealed per sealing");
        assert_eq!(
            w.ring.sealed().is_some(),
            m.sealed,
            "step {step}: sealed state"
        );
        assert_eq!(w.ring.metadata().sealed.is_some(), m.sealed);
        let cached: BTreeSet<u32> = w.ring.metadata().cached_versions.into_iter().collect();
        assert_eq!(cached, m.cached, "step {step}: cached versions");
        let (rev, snap) = w.ring.snapshot();
        snap.validate().unwrap();
        let (stored_rev, stored) = w.store.load("tenant").await.unwrap().unwrap();
        assert_eq!(
            (stored_rev, &stored),
            (rev, &*snap),
            "step {step}: store agrees"
        );
        let states: BTreeMap<u32, KeyState> =
            snap.versions.iter().map(|v| (v.version, v.state)).collect();
        assert_eq!(states, m.states, "step {step}: states agree with the model");
        assert_eq!(snap.next_version, m.next);
        let actives = states.values().filter(|s| **s == KeyState::Active).count();
        ever_active |= actives > 0;
        assert!(actives <= 1);
        if ever_active {
            assert_eq!(actives, 1, "step {step}: exactly one active once activated");
        }
        for v in &snap.versions {
            assert_eq!(
                v.wrapped.is_none(),
                v.state == KeyState::Destroyed,
                "step {step}: destroyed holds no key material, others do"
            );
        }
        let meta = w.ring.metadata();
        assert_eq!(meta.active_version, m.active());
        assert_eq!(meta.version_count, m.states.len());
        assert_eq!(
            meta.min_decryption_version,
            m.states
                .iter()
                .find(|(_, s)| matches!(
                    s,
                    KeyState::Pending | KeyState::Active | KeyState::Retired
                ))
                .map(|(v, _)| *v)
        );
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn keyring_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(run(ops));
    }
}

/// The implementation's transition table equals the lifecycle's, exhaustively.
#[test]
fn transition_table_is_exactly_the_lifecycle() {
    use KeyState::*;
    let states = [Pending, Active, Retired, Disabled, Destroyed];
    let transitions = [
        Transition::Activate,
        Transition::Retire,
        Transition::Rollback,
        Transition::Disable,
        Transition::Enable,
        Transition::Destroy,
    ];
    let allowed = [
        (Pending, Transition::Activate, Active),
        (Active, Transition::Retire, Retired),
        (Retired, Transition::Rollback, Active),
        (Pending, Transition::Disable, Disabled),
        (Retired, Transition::Disable, Disabled),
        (Disabled, Transition::Enable, Retired),
        (Disabled, Transition::Destroy, Destroyed),
    ];
    for s in states {
        for t in transitions {
            let expected = allowed
                .iter()
                .find(|(from, tr, _)| *from == s && *tr == t)
                .map(|(_, _, to)| *to);
            assert_eq!(s.after(t), expected, "{s} --{t}-->");
        }
    }
}

#[tokio::test]
async fn store_load_of_an_unknown_keyring_is_none() {
    assert!(MemoryStore::new().load("x").await.unwrap().is_none());
}
