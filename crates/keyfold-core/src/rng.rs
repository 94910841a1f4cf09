//! Randomness for data keys and nonces.
//!
//! A user-space generator seeded from the operating system, so encrypting a
//! record makes no system call: no `getrandom` (about 0.5-0.8 µs here, more
//! than sealing 1 KiB) and no `getpid` (about 0.14 µs) either. The
//! construction is Bernstein's *fast-key-erasure* RNG ("Fast-key-erasure
//! random-number generators", 2017): ChaCha20 under a 256-bit key fills a
//! buffer; the first 32 bytes of every refill become the next key and the
//! old key is gone, and every byte handed out is wiped from the buffer, so a
//! later memory disclosure reveals no earlier output (forward secrecy).
//!
//! Safety properties (docs/THREAT_MODEL.md, "Randomness"):
//! - per thread (no lock), seeded from `getrandom` on first use;
//! - re-keyed from the OS after every [`RESEED_BYTES`] of output;
//! - fork-safe: a `pthread_atfork` child handler (the `forkguard` crate)
//!   counts forks, every call compares the count, one relaxed atomic load,
//!   and a child process re-seeds from the OS before producing a byte, so
//!   parent and child never share output (OpenSSL 1.1.1's DRBG and `rand`
//!   0.8's `ThreadRng` detect forks the same way);
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
    /// Reports a fork since this generator was seeded.
    fork: forkguard::Guard,
}

impl FastKeyErasure {
    fn seeded() -> Result<Self, RngError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        // The guard first, so a fork between the two is still seen.
        let fork = forkguard::Guard::try_new().map_err(|_| RngError)?;
        getrandom::fill(&mut *key).map_err(|_| RngError)?;
        Ok(FastKeyErasure {
            key,
            buf: Zeroizing::new([0u8; BUF_LEN]),
            pos: BUF_LEN,
            since_seed: 0,
            fork,
        })
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
        let stale = slot
            .as_mut()
            .is_none_or(|g| g.fork.detected_fork() || g.since_seed >= RESEED_BYTES);
        if stale {
            // Drop (and so wipe) the old state before seeding the new one.
            *slot = None;
            *slot = Some(FastKeyErasure::seeded()?);
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

    #[test]
    fn handed_out_bytes_are_wiped_and_the_key_moves_on() {
        let mut g = FastKeyErasure::seeded().unwrap();
        let first_key = *g.key;
        let mut out = [0u8; 100];
        g.fill(&mut out);
        assert_ne!(*g.key, first_key, "key not erased after refill");
        assert!(
            g.buf[..g.pos].iter().all(|&b| b == 0),
            "output left in buffer"
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
