//! The jitter of the client's reconnect backoff: a small PRNG, so that
//! clients that lost the same node do not all come back in the same instant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Small PRNG for backoff jitter.
pub(super) struct Jitter(u64);

impl Jitter {
    pub(super) fn new() -> Jitter {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
        Jitter(t ^ ((std::process::id() as u64) << 17) | 1)
    }
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A duration uniformly in [d/2, d].
    pub(super) fn spread(&mut self, d: Duration) -> Duration {
        let ms = d.as_millis().max(1) as u64;
        Duration::from_millis(ms / 2 + self.next() % (ms / 2 + 1))
    }
}
