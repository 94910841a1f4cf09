//! Randomness for data keys and nonces.
//!
//! A user-space generator seeded from the operating system, so a draw makes
//! no system call in the steady state: no `getrandom` (about 0.5-0.8 µs
//! here, more than sealing 1 KiB) and no per-call `getpid` (about 0.14 µs)
//! either; only a (re)seed and a buffer refill make one. The
//! construction is Bernstein's *fast-key-erasure* RNG ("Fast-key-erasure
//! random-number generators", 2017): ChaCha20 under a 256-bit key fills a
//! buffer; the first 32 bytes of every refill become the next key and the
//! old key is gone, and every byte handed out is wiped from the buffer, so a
//! later memory disclosure reveals no earlier output (forward secrecy).
//!
//! Safety properties (docs/THREAT_MODEL.md, "Randomness"):
//! - per thread (no lock), seeded from `getrandom` on first use;
//! - re-keyed from the OS after every [`RESEED_BYTES`] of output;
//! - fork-safe for children made by libc's `fork` (what `std`, `nix` and
//!   `fork` call): a `pthread_atfork` child handler (the `forkguard` crate)
//!   counts forks, every call compares the count (one relaxed atomic load),
//!   and such a child re-seeds from the OS before producing a byte, so
//!   parent and child never share output. A child made without fork
//!   handlers (raw `clone`, glibc's `clone()` or `_Fork`) is caught by a
//!   process-id check at the next buffer refill, so it may repeat at most
//!   the rest of one 1 KiB buffer (limits: docs/THREAT_MODEL.md); such a
//!   child calls [`reseed`] first if it encrypts before `exec`;
//! - if the OS generator fails, callers get [`RngError`], never weaker bytes.

use std::cell::RefCell;

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use zeroize::{Zeroize, Zeroizing};

/// The operating system refused to provide random bytes.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RngError;

/// Output after which the generator takes a fresh key from the OS.
pub const RESEED_BYTES: usize = 1 << 20;
const BUF_LEN: usize = 1024;
const KEY_LEN: usize = 32;

struct FastKeyErasure {
    key: Zeroizing<[u8; KEY_LEN]>,
    buf: Zeroizing<[u8; BUF_LEN]>,
    pos: usize,
    since_seed: usize,
    /// Reports a fork through libc since this generator was seeded.
    fork: forkguard::Guard,
    /// The process this generator was seeded in (checked at each refill).
    pid: u32,
}

impl FastKeyErasure {
    fn seeded() -> Result<Self, RngError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        let fork = forkguard::Guard::try_new().map_err(|_| RngError)?;
        getrandom::fill(&mut *key).map_err(|_| RngError)?;
        Ok(FastKeyErasure {
            key,
            buf: Zeroizing::new([0u8; BUF_LEN]),
            pos: BUF_LEN,
            since_seed: 0,
            fork,
            pid: std::process::id(),
        })
    }

    /// Whether this generator must be replaced before it serves `len`
    /// bytes: a fork through libc (checked on every call, one atomic load),
    /// the re-seed budget spent, or, when this call will refill the buffer,
    /// a changed process id. The last catches a child made without fork
    /// handlers after at most the rest of one buffer, for one `getpid` per
    /// refill instead of per call.
    fn is_stale(&mut self, len: usize) -> bool {
        self.fork.detected_fork()
            || self.since_seed >= RESEED_BYTES
            || (self.pos.saturating_add(len) > BUF_LEN && self.pid != std::process::id())
    }

    fn refill(&mut self) {
        // A fresh key every refill, so the fixed nonce never repeats under a key.
        let mut cipher = ChaCha20::new((&*self.key).into(), (&[0u8; 12]).into());
        self.buf.zeroize();
        cipher.apply_keystream(&mut *self.buf);
        let (next_key, _) = self.buf.split_at_mut(KEY_LEN);
        self.key.copy_from_slice(next_key);
        next_key.zeroize();
        self.pos = KEY_LEN;
    }

    fn fill(&mut self, dest: &mut [u8]) {
        let mut written = 0;
        while written < dest.len() {
            if self.pos >= BUF_LEN {
                self.refill();
            }
            let available = self.buf.get_mut(self.pos..).unwrap_or_default();
            let out = dest.get_mut(written..).unwrap_or_default();
            let n = available.len().min(out.len());
            let (src, _) = available.split_at_mut(n);
            let (dst, _) = out.split_at_mut(n);
            dst.copy_from_slice(src);
            src.zeroize();
            self.pos += n;
            written += n;
        }
        self.since_seed += dest.len();
    }
}

thread_local! {
    static GENERATOR: RefCell<Option<FastKeyErasure>> = const { RefCell::new(None) };
}

/// Fills `dest` with random bytes.
///
/// # Errors
/// [`RngError`] when the OS generator is unavailable for (re)seeding.
pub fn fill(dest: &mut [u8]) -> Result<(), RngError> {
    GENERATOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(|_| RngError)?;
        if slot.as_mut().is_none_or(|g| g.is_stale(dest.len())) {
            reseed_slot(&mut slot)?;
        }
        match slot.as_mut() {
            Some(generator) => {
                generator.fill(dest);
                Ok(())
            }
            None => Err(RngError),
        }
    })
}

/// Replaces this thread's generator with one freshly seeded from the OS.
///
/// Forks through libc's `fork` are detected without this, and the
/// generator re-seeds on its own (docs/THREAT_MODEL.md, "Randomness"). Call
/// it first thing in a child process made without fork handlers (a raw
/// `clone` system call, glibc's `clone()` or `_Fork`) if that child
/// encrypts before it `exec`s.
///
/// # Errors
/// [`RngError`] when the OS generator is unavailable; this thread's
/// generator is then gone, and the next draw tries to seed again.
pub fn reseed() -> Result<(), RngError> {
    GENERATOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(|_| RngError)?;
        reseed_slot(&mut slot).map(|_| ())
    })
}

fn reseed_slot(slot: &mut Option<FastKeyErasure>) -> Result<&mut FastKeyErasure, RngError> {
    // Drop (and so wipe) the old state before seeding the new one.
    *slot = None;
    Ok(slot.insert(FastKeyErasure::seeded()?))
}

/// A random `u64` (for retry jitter).
pub(crate) fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    // Jitter only; if the OS generator fails, no jitter is an acceptable fallback.
    match fill(&mut bytes) {
        Ok(()) => u64::from_be_bytes(bytes),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_differ_and_cover_refills() {
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 5000];
        fill(&mut a).unwrap();
        fill(&mut b).unwrap();
        assert_ne!(a, b);
        // Crude sanity: every byte value appears in 10 000 random bytes.
        let mut seen = [false; 256];
        for &x in a.iter().chain(&b) {
            seen[usize::from(x)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// Known answer against the construction: after one refill under key
    /// K, the next key is ChaCha20(K, nonce 0) bytes 0..32, the output is
    /// bytes 32.., and neither the old key nor handed-out bytes remain.
    #[test]
    fn output_is_fast_key_erasure_over_chacha20() {
        let mut g = FastKeyErasure::seeded().unwrap();
        g.key = Zeroizing::new([9u8; KEY_LEN]);
        let mut stream = [0u8; KEY_LEN + 100];
        ChaCha20::new((&[9u8; KEY_LEN]).into(), (&[0u8; 12]).into()).apply_keystream(&mut stream);
        let mut out = [0u8; 100];
        g.fill(&mut out);
        assert_eq!(
            out[..],
            stream[KEY_LEN..],
            "output is not the keystream after the key"
        );
        assert_eq!(
            g.key[..],
            stream[..KEY_LEN],
            "next key is not the first 32 bytes"
        );
        assert_eq!(g.pos, KEY_LEN + 100);
        assert!(
            g.buf[..g.pos].iter().all(|&b| b == 0),
            "the next key or handed-out output left in the buffer"
        );
    }

    #[test]
    fn reseeds_after_the_limit() {
        let mut big = vec![0u8; RESEED_BYTES];
        fill(&mut big).unwrap();
        fill(&mut [0u8; 1]).unwrap();
        GENERATOR.with(|cell| {
            let slot = cell.borrow();
            assert!(slot.as_ref().unwrap().since_seed < 16, "did not reseed");
        });
    }

    #[test]
    fn a_changed_process_id_is_caught_at_the_next_refill() {
        let mut g = FastKeyErasure::seeded().unwrap();
        g.fill(&mut [0u8; 100]);
        // As in a child made without fork handlers: same state, other pid.
        g.pid = g.pid.wrapping_add(1);
        let left = BUF_LEN - g.pos;
        assert!(
            !g.is_stale(left),
            "a draw served from the buffer needs no getpid"
        );
        assert!(
            g.is_stale(left + 1),
            "a draw that refills must check the pid"
        );
        // `is_stale` must agree with when `fill` actually refills: draining
        // the buffer exactly does not refill (same key), the next byte does.
        let key = *g.key;
        g.fill(&mut vec![0u8; left]);
        assert_eq!((*g.key, g.pos), (key, BUF_LEN), "fill refilled early");
        assert!(!g.is_stale(0));
        assert!(g.is_stale(1));
        g.pid = std::process::id();
        assert!(!g.is_stale(1));
    }

    #[test]
    fn fill_reseeds_when_a_refill_finds_another_process_id() {
        fill(&mut [0u8; 10]).unwrap();
        GENERATOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let g = slot.as_mut().unwrap();
            g.pid = g.pid.wrapping_add(1);
        });
        fill(&mut [0u8; BUF_LEN]).unwrap();
        GENERATOR.with(|cell| {
            let slot = cell.borrow();
            let g = slot.as_ref().unwrap();
            assert_eq!(g.since_seed, BUF_LEN, "did not re-seed");
            assert_eq!(g.pid, std::process::id());
        });
    }

    #[test]
    fn reseed_replaces_the_generator() {
        fill(&mut [0u8; 100]).unwrap();
        let before = GENERATOR.with(|cell| *cell.borrow().as_ref().unwrap().key);
        reseed().unwrap();
        GENERATOR.with(|cell| {
            let slot = cell.borrow();
            let g = slot.as_ref().unwrap();
            assert_ne!(*g.key, before);
            assert_eq!((g.since_seed, g.pos), (0, BUF_LEN));
        });
    }

    #[test]
    fn threads_have_independent_generators() {
        let other = std::thread::spawn(|| {
            let mut x = [0u8; 32];
            fill(&mut x).unwrap();
            x
        })
        .join()
        .unwrap();
        let mut mine = [0u8; 32];
        fill(&mut mine).unwrap();
        assert_ne!(mine, other);
    }
}
