//! Which queue messages this node has already appended to a stream, so that
//! a connector's redelivery (protocol.md §6.5, FORWARD's id; §12) never
//! reaches a client twice.
//!
//! A message from a connector carries an id naming it in its queue (the
//! JetStream stream sequence, the Redis entry id). The node that appends it
//! to its user's stream remembers the id; the same id again within the
//! window is dropped. Only ids are kept, hashed with a per-process random
//! key to 64 bits: about 26 bytes an id (16 in the FIFO of arrivals, with
//! the time in tenths of a second; about 10 in the hash set), bounded by
//! count and by age. No sockets and no clock here: `now` comes in.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// Ids appended within the window.
pub struct Dedup {
    hasher: RandomState,
    seen: HashSet<u64, NoHash>,
    /// (key, tenths of a second since `base`).
    order: VecDeque<(u64, u32)>,
    base: Option<Instant>,
    /// Ids older than this are forgotten.
    pub window: Duration,
    /// At most this many ids are kept (the oldest go first).
    pub max: usize,
}

impl Dedup {
    /// Remembers ids for `window`, at most `max` of them.
    pub fn new(window: Duration, max: usize) -> Dedup {
        Dedup {
            hasher: RandomState::new(),
            seen: HashSet::with_hasher(NoHash),
            order: VecDeque::new(),
            base: None,
            window,
            max,
        }
    }

    fn key(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    /// `now` in tenths of a second since the first id.
    fn tick(&mut self, now: Instant) -> u32 {
        let base = *self.base.get_or_insert(now);
        (now.saturating_duration_since(base).as_millis() / 100).min(u32::MAX as u128) as u32
    }

    /// Whether `id` was appended within the window.
    pub fn seen(&mut self, id: &[u8], now: Instant) -> bool {
        self.expire(now);
        self.seen.contains(&self.key(id))
    }

    /// `id` was appended now.
    pub fn insert(&mut self, id: &[u8], now: Instant) {
        if self.max == 0 {
            return;
        }
        let k = self.key(id);
        let t = self.tick(now);
        if self.seen.insert(k) {
            while self.order.len() >= self.max {
                if let Some((old, _)) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
            self.order.push_back((k, t));
        }
    }

    fn expire(&mut self, now: Instant) {
        if self.order.is_empty() {
            return;
        }
        let (t_now, window) = (self.tick(now), (self.window.as_millis() / 100).min(u32::MAX as u128) as u32);
        while let Some(&(k, t)) = self.order.front() {
            if t_now.saturating_sub(t) < window {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&k);
        }
    }

    /// Ids remembered now.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

/// The keys are already random 64-bit hashes.
#[derive(Clone, Copy, Default)]
struct NoHash;

impl BuildHasher for NoHash {
    type Hasher = NoHasher;
    fn build_hasher(&self) -> NoHasher {
        NoHasher(0)
    }
}

struct NoHasher(u64);

impl std::hash::Hasher for NoHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_seen_until_the_window_or_the_count_forgets_it() {
        let t0 = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10), 3);
        assert!(!d.seen(b"a", t0));
        d.insert(b"a", t0);
        d.insert(b"a", t0);
        assert_eq!(d.len(), 1);
        assert!(d.seen(b"a", t0 + Duration::from_secs(9)));
        assert!(!d.seen(b"b", t0));
        assert!(!d.seen(b"a", t0 + Duration::from_secs(10)), "the window forgets");
        for (i, id) in [b"x", b"y", b"z", b"w"].iter().enumerate() {
            d.insert(*id, t0 + Duration::from_secs(20 + i as u64));
        }
        assert_eq!(d.len(), 3);
        assert!(!d.seen(b"x", t0 + Duration::from_secs(25)), "the oldest goes when the count is full");
        assert!(d.seen(b"w", t0 + Duration::from_secs(25)));
    }

    #[test]
    fn a_zero_max_keeps_nothing() {
        let t0 = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10), 0);
        d.insert(b"a", t0);
        assert!(!d.seen(b"a", t0));
    }
}
