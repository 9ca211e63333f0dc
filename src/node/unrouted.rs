//! Durable mode: messages this node appended to the log (or had forwarded
//! to it) that reached no session, kept a few seconds in case their user's
//! session opens somewhere meanwhile (protocol.md §13, *Resume*).
//!
//! A user that resumes on node Y is read from the log and then announced
//! online to the mesh. An append that another node X finishes in between
//! (after Y's read, before X hears the user is at Y) reaches nobody: X
//! keeps it here, and forwards it to Y when Y's PRESENCE says the user is
//! online there; Y keeps what it appended itself for a user whose read is
//! still out, and delivers it once the read is in. The receiver drops what
//! it has already (a seq at or below its head) and reads a gap from the
//! log, so a message kept here is never delivered twice.
//!
//! A pure structure: no sockets, time passed in. Bounded by age ([`KEEP`])
//! and by payload bytes ([`MAX_BYTES`]); the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a message that reached nobody is kept.
pub const KEEP: Duration = Duration::from_secs(5);
/// At most this many payload and key bytes are kept.
pub const MAX_BYTES: usize = 16 << 20;
/// Bytes counted for each message besides its payload and key.
const OVERHEAD: usize = 64;

/// One message kept.
#[derive(Debug, PartialEq, Eq)]
pub struct Kept {
    /// Its seq in the user's stream, as the log assigned it.
    pub seq: u64,
    /// Its conflation key (empty: none).
    pub key: Box<[u8]>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Which entry of [`Unrouted::order`] it is.
    id: u64,
}

/// Messages that reached no session, by user.
#[derive(Default)]
pub struct Unrouted {
    by_user: HashMap<Box<[u8]>, VecDeque<Kept>>,
    /// Every message kept, oldest first: (when, user, id); entries of
    /// messages taken since are skipped when they come up.
    order: VecDeque<(Instant, Box<[u8]>, u64)>,
    bytes: usize,
    next_id: u64,
    /// Messages dropped unclaimed (by age or for room).
    pub expired: u64,
}

impl Unrouted {
    /// An empty store.
    pub fn new() -> Unrouted {
        Unrouted::default()
    }

    /// Keeps a message of `user` at `seq` that reached nobody.
    pub fn put(&mut self, user: &[u8], seq: u64, key: Box<[u8]>, payload: Vec<u8>, now: Instant) {
        self.expire(now);
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += cost(&key, &payload);
        let user: Box<[u8]> = user.into();
        self.order.push_back((now, user.clone(), id));
        self.by_user.entry(user).or_default().push_back(Kept { seq, key, payload, id });
        while self.bytes > MAX_BYTES && self.drop_oldest() {}
    }

    /// Takes everything kept for `user`, oldest first.
    pub fn take(&mut self, user: &[u8]) -> VecDeque<Kept> {
        if self.by_user.is_empty() {
            return VecDeque::new();
        }
        let kept = self.by_user.remove(user).unwrap_or_default();
        for k in &kept {
            self.bytes -= cost(&k.key, &k.payload);
        }
        if self.by_user.is_empty() {
            self.order.clear();
        }
        kept
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }

    /// Messages kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_user.values().map(VecDeque::len).sum()
    }

    /// Drops what has been kept longer than [`KEEP`].
    pub fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(at, ..)| now.saturating_duration_since(*at) >= KEEP) {
            self.drop_oldest();
        }
    }

    /// Drops the oldest entry of [`Unrouted::order`] (and its message, if
    /// not taken since); false if there is none.
    fn drop_oldest(&mut self) -> bool {
        let Some((_, user, id)) = self.order.pop_front() else { return false };
        if let Some(q) = self.by_user.get_mut(&user) {
            if q.front().is_some_and(|k| k.id == id) {
                if let Some(k) = q.pop_front() {
                    self.bytes -= cost(&k.key, &k.payload);
                    self.expired += 1;
                }
                if q.is_empty() {
                    self.by_user.remove(&user);
                }
            }
        }
        true
    }
}

fn cost(key: &[u8], payload: &[u8]) -> usize {
    key.len() + payload.len() + OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(u: &mut Unrouted, user: &str, seq: u64, now: Instant) {
        u.put(user.as_bytes(), seq, Box::default(), vec![seq as u8; 10], now);
    }

    fn seqs(q: VecDeque<Kept>) -> Vec<u64> {
        q.into_iter().map(|k| k.seq).collect()
    }

    #[test]
    fn kept_by_user_in_order_and_taken_once() {
        let now = Instant::now();
        let mut u = Unrouted::new();
        put(&mut u, "a", 1, now);
        put(&mut u, "b", 7, now);
        put(&mut u, "a", 2, now);
        assert_eq!(u.len(), 3);
        assert_eq!(seqs(u.take(b"a")), [1, 2]);
        assert!(u.take(b"a").is_empty());
        assert_eq!(seqs(u.take(b"b")), [7]);
        assert!(u.is_empty());
        assert_eq!(u.bytes, 0);
    }

    #[test]
    fn expires_by_age_and_a_taken_message_does_not_expire_a_newer_one() {
        let t0 = Instant::now();
        let mut u = Unrouted::new();
        put(&mut u, "a", 1, t0);
        put(&mut u, "b", 1, t0);
        assert_eq!(seqs(u.take(b"a")), [1]);
        // a's next message comes later; the stale order entry of the first
        // must not take it.
        put(&mut u, "a", 2, t0 + Duration::from_secs(3));
        u.expire(t0 + KEEP);
        assert_eq!(u.expired, 1, "b's message, kept for KEEP");
        assert_eq!(seqs(u.take(b"b")), Vec::<u64>::new());
        assert_eq!(seqs(u.take(b"a")), [2]);
        put(&mut u, "c", 1, t0 + Duration::from_secs(4));
        u.expire(t0 + Duration::from_secs(4) + KEEP);
        assert!(u.is_empty());
        assert_eq!(u.bytes, 0);
    }

    #[test]
    fn bounded_in_bytes_oldest_first() {
        let now = Instant::now();
        let mut u = Unrouted::new();
        let big = MAX_BYTES / 4;
        for seq in 1..=6 {
            u.put(b"a", seq, Box::default(), vec![0; big], now);
        }
        assert!(u.bytes <= MAX_BYTES);
        assert_eq!(u.expired, 3);
        assert_eq!(seqs(u.take(b"a")), [4, 5, 6]);
    }
}
