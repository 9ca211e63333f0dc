//! Slow readers in a swarm: which of a user's messages are unkeyed (must
//! arrive), which clients read slowly and how (a small receive buffer and
//! a byte budget a second), and what they saw (received, conflated, the
//! staleness of keyed messages, unkeyed ones never received).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Which of each user's messages the publisher sends without a key (an
/// event that must arrive, never conflated): message `n` when `n % every <
/// below`. The default, [`Unkeyed::ALL`]: every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unkeyed {
    /// The period (at least 1).
    pub every: u32,
    /// How many of each period's first messages are unkeyed.
    pub below: u32,
}

impl Default for Unkeyed {
    fn default() -> Unkeyed {
        Unkeyed::ALL
    }
}

impl Unkeyed {
    /// Every message is unkeyed.
    pub const ALL: Unkeyed = Unkeyed { every: 1, below: 1 };
    /// Every message has a key.
    pub const NONE: Unkeyed = Unkeyed { every: 1, below: 0 };

    /// Whether message `n` is sent without a key.
    pub fn is_unkeyed(&self, n: u32) -> bool {
        n % self.every.max(1) < self.below
    }

    /// Unkeyed messages among `0..n`.
    pub fn below_n(&self, n: u32) -> u64 {
        let e = self.every.max(1);
        (n / e) as u64 * self.below.min(e) as u64 + (n % e).min(self.below) as u64
    }
}

/// Clients that read slowly: users `first`, `first + stride`, … (`count` of
/// them). Each asks for a receive buffer of `rcvbuf` bytes before it
/// connects and reads at most `bps` bytes a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlowReaders {
    /// How many (0: none).
    pub count: usize,
    /// The first slow user.
    pub first: usize,
    /// Users between two slow ones, counting one of them (at least 1).
    pub stride: usize,
    /// Bytes a second each reads.
    pub bps: u64,
    /// SO_RCVBUF asked for before connecting (0: the system's default).
    pub rcvbuf: usize,
}

impl SlowReaders {
    /// `count` slow readers spread evenly over users `0..clients`.
    pub fn spread(count: usize, clients: usize, bps: u64, rcvbuf: usize) -> SlowReaders {
        let count = count.min(clients);
        SlowReaders { count, first: 0, stride: (clients / count.max(1)).max(1), bps, rcvbuf }
    }

    /// Whether user `u` reads slowly.
    pub fn is_slow(&self, u: usize) -> bool {
        let stride = self.stride.max(1);
        self.count > 0
            && u >= self.first
            && (u - self.first).is_multiple_of(stride)
            && (u - self.first) / stride < self.count
    }
}

/// How often a slow reader sends a PING of its own: it reads the node's
/// late, and any byte from it tells the node it is there (protocol.md §3.4).
pub(super) const SLOW_PING: Duration = Duration::from_secs(5);

/// A slow reader's budget and what it got.
pub(super) struct Throttle {
    /// Bytes it may read now.
    pub(super) tokens: f64,
    /// When `tokens` was last topped up.
    pub(super) at: Instant,
    /// The socket may hold more than was read.
    pub(super) readable: bool,
    /// When to send the next PING.
    pub(super) next_ping: Instant,
    /// Bit `n`: message `n` arrived.
    pub(super) got: Vec<u64>,
}

impl Throttle {
    pub(super) fn new(now: Instant) -> Throttle {
        Throttle { tokens: 0.0, at: now, readable: false, next_ping: now + SLOW_PING, got: Vec::new() }
    }

    /// Tops the budget up for the time since the last call: at most a tenth
    /// of a second's bytes (and 256) can pile up.
    pub(super) fn refill(&mut self, now: Instant, bps: u64) {
        let cap = (bps as f64 / 10.0).max(256.0);
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * bps as f64).min(cap);
        self.at = now;
    }

    pub(super) fn mark(&mut self, n: u32) {
        let (w, b) = (n as usize / 64, n % 64);
        if self.got.len() <= w {
            self.got.resize(w + 1, 0);
        }
        self.got[w] |= 1 << b;
    }

    pub(super) fn has(&self, n: u32) -> bool {
        self.got.get(n as usize / 64).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }
}

/// What the slow readers ([`SlowReaders`]) counted, all together.
#[derive(Debug, Clone)]
pub struct SlowStats {
    /// Slow clients.
    pub clients: u64,
    /// Messages they received.
    pub received: u64,
    /// Messages conflated away on their sessions (CONFLATED frames).
    pub conflated: u64,
    /// Unkeyed messages below each one's highest message number that it never got (must be 0).
    pub unkeyed_lost: u64,
    /// Their connections that closed, and reconnections.
    pub closed: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Staleness: at each keyed message received, now − its intended send
    /// time, ns (from [`super::Swarm::record_after`] on).
    pub stale: Histogram<u64>,
    /// The same for the unkeyed messages they received.
    pub unkeyed_age: Histogram<u64>,
}

impl SlowStats {
    /// Nothing counted yet.
    pub fn new() -> SlowStats {
        SlowStats {
            clients: 0,
            received: 0,
            conflated: 0,
            unkeyed_lost: 0,
            closed: 0,
            reconnects: 0,
            stale: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
            unkeyed_age: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
        }
    }

    /// The worker protocol's `SLOW …` line (see [`super::run_worker`]).
    pub fn slow_line(&self) -> String {
        format!(
            "SLOW {} {} {} {} {} {}",
            self.clients, self.received, self.conflated, self.unkeyed_lost, self.closed, self.reconnects
        )
    }

    /// Adds the counts of a `SLOW …` line; false if it is not one.
    pub fn add_slow_line(&mut self, line: &str) -> bool {
        let mut p = line.split_whitespace();
        if p.next() != Some("SLOW") {
            return false;
        }
        let n: Vec<u64> = p.filter_map(|x| x.parse().ok()).collect();
        let [clients, received, conflated, unkeyed_lost, closed, reconnects] = n[..] else { return false };
        self.clients += clients;
        self.received += received;
        self.conflated += conflated;
        self.unkeyed_lost += unkeyed_lost;
        self.closed += closed;
        self.reconnects += reconnects;
        true
    }
}

impl Default for SlowStats {
    fn default() -> SlowStats {
        SlowStats::new()
    }
}
