//! Randomness for keys, salts and jitter.
//!
//! Every byte comes from the operating system's CSPRNG (`getrandom`). The seam
//! is kept in one place so a faster user-space generator can replace it
//! without touching the format code (docs/THREAT_MODEL.md, "Randomness").

/// The operating system refused to provide random bytes.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RngError;

/// Fills `dest` with random bytes.
///
/// # Errors
/// [`RngError`] when the OS generator is unavailable.
pub fn fill(dest: &mut [u8]) -> Result<(), RngError> {
    getrandom::fill(dest).map_err(|_| RngError)
}

/// A random `u64` (for retry jitter).
pub(crate) fn u64() -> u64 {
    // Jitter only; if the OS generator fails, no jitter is an acceptable fallback.
    getrandom::u64().unwrap_or(0)
}
