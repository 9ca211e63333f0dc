//! Keepalive and the timer sweep, as pure decisions: given how long a
//! connection has been silent, what to do now (protocol.md §3.4). No
//! sockets and no clock: the caller passes `now` (or the idle time), so the
//! tests drive time directly.
//!
//! A silent established connection is first sent a PING that rides on its
//! next delivery (no extra syscall); only one that got nothing for half an
//! interval more gets a PING of its own; after three intervals of silence
//! it is closed as IDLE_TIMEOUT. Pings are spread over `[hb, 1.5 hb)` by
//! connection, so clients that connected together are not all pinged (and
//! do not all answer) in the same turn.

use std::ops::Range;
use std::time::{Duration, Instant};

/// Where a connection is in the keepalive cycle. Any byte from the peer
/// resets it to `Quiet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keepalive {
    /// Heard from recently, or not yet due.
    Quiet,
    /// A PING is due: append it to the next delivery.
    Due,
    /// A PING is outstanding.
    Pinged,
}

/// What the sweep should do with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing yet.
    Wait,
    /// Mark a PING due, to ride on the next delivery.
    Piggyback,
    /// Send a PING now.
    Ping,
    /// Close it: silent for three intervals.
    Expire,
}

/// The decision for a connection keyed `key`, silent for `idle`, with
/// keepalive interval `hb`. `may_ping` is false once this tick's budget of
/// standalone PINGs is spent.
pub fn check(ka: Keepalive, idle: Duration, hb: Duration, key: usize, may_ping: bool) -> Action {
    let spread = hb.mul_f64(((key as u64).wrapping_mul(2_654_435_761) % 1024) as f64 / 2048.0);
    if idle >= hb * 3 {
        Action::Expire
    } else if idle >= hb + spread && ka != Keepalive::Pinged {
        if idle >= hb + hb / 2 + spread && may_ping {
            Action::Ping
        } else if ka != Keepalive::Due {
            Action::Piggyback
        } else {
            Action::Wait
        }
    } else {
        Action::Wait
    }
}

/// Timer granularity.
pub const TICK: Duration = Duration::from_millis(100);
/// Timer ticks per full sweep of the connections, at most.
pub const SWEEP_TICKS: usize = 10;

/// The partial sweep: each tick visits a slice of the slab, so no tick
/// stalls delivery for long. A full pass takes up to [`SWEEP_TICKS`] ticks
/// (1 s), and at most a quarter of the keepalive interval.
#[derive(Debug)]
pub struct Sweep {
    cursor: usize,
    /// When the next tick is due.
    pub next: Instant,
}

impl Sweep {
    /// A sweep whose first tick is due at `now`.
    pub fn new(now: Instant) -> Sweep {
        Sweep { cursor: 0, next: now }
    }

    /// Whether a tick is due at `now`; if so, schedules the next one.
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + TICK;
        true
    }

    /// The slots of a slab of `cap` slots this tick visits (one or two
    /// ranges, wrapping), and whether this tick completes a pass.
    pub fn slice(&mut self, cap: usize, hb: Duration) -> (Range<usize>, Range<usize>, bool) {
        let ticks = ((hb.as_millis() / (4 * TICK.as_millis())) as usize).clamp(1, SWEEP_TICKS);
        let cap = cap.max(1);
        let span = cap.div_ceil(ticks);
        let from = self.cursor % cap;
        self.cursor = (from + span) % cap;
        let end = from + span;
        (from..end.min(cap), 0..end.saturating_sub(cap), self.cursor < span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(10);

    #[test]
    fn a_silent_connection_is_piggybacked_then_pinged_then_expired() {
        let key = 0; // spread 0
        assert_eq!(check(Keepalive::Quiet, HB - Duration::from_millis(1), HB, key, true), Action::Wait);
        assert_eq!(check(Keepalive::Quiet, HB, HB, key, true), Action::Piggyback);
        assert_eq!(check(Keepalive::Due, HB, HB, key, true), Action::Wait, "already due");
        assert_eq!(check(Keepalive::Due, HB * 3 / 2, HB, key, true), Action::Ping, "nothing to ride on");
        assert_eq!(
            check(Keepalive::Due, HB * 3 / 2, HB, key, false),
            Action::Wait,
            "over this tick's budget"
        );
        assert_eq!(check(Keepalive::Pinged, HB * 2, HB, key, true), Action::Wait, "one PING outstanding");
        assert_eq!(check(Keepalive::Pinged, HB * 3, HB, key, true), Action::Expire);
    }

    #[test]
    fn pings_are_spread_over_half_an_interval_by_connection() {
        let first_due: Vec<Duration> = (0..200)
            .map(|key| {
                (0..=100u32)
                    .map(|i| HB + HB.mul_f64(f64::from(i) / 200.0))
                    .find(|&idle| check(Keepalive::Quiet, idle, HB, key, true) != Action::Wait)
                    .unwrap()
            })
            .collect();
        assert!(first_due.iter().all(|&d| d >= HB && d <= HB * 3 / 2));
        let (lo, hi) = (first_due.iter().min().unwrap(), first_due.iter().max().unwrap());
        assert!(*hi - *lo > HB / 4, "spread: {lo:?}..{hi:?}");
    }

    #[test]
    fn a_sweep_visits_every_slot_once_per_pass_on_a_fake_clock() {
        let t0 = Instant::now();
        let mut s = Sweep::new(t0);
        assert!(s.due(t0));
        assert!(!s.due(t0 + TICK / 2));
        assert!(s.due(t0 + TICK));
        let mut seen = vec![0u32; 1000];
        let mut passes = 0;
        for _ in 0..SWEEP_TICKS {
            let (a, b, done) = s.slice(1000, HB);
            for k in a.chain(b) {
                seen[k] += 1;
            }
            passes += done as u32;
        }
        assert!(seen.iter().all(|&n| n == 1), "each slot once");
        assert_eq!(passes, 1);
        // A short interval sweeps faster: a pass within a quarter of it.
        let (a, _, _) = Sweep::new(t0).slice(1000, Duration::from_millis(400));
        assert_eq!(a.len(), 1000);
    }
}
