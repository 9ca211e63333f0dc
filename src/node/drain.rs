//! Draining, as pure state machines: how many clients to send away by when
//! (protocol.md §3.5 GOODBYE), for a node that is stopping and for one an
//! admin has drained. No sockets and no clock: `now` is passed in, so the
//! tests run the whole drain on a fake clock.
//!
//! A stopping node spreads its GOODBYEs (DRAINING, ask the decision server)
//! evenly over the drain window, so its clients do not all reconnect to the
//! other nodes in the same instant. Once no client is left (and, with
//! several loops, the other loops are done), it tells its publishers, waits
//! for the last frames to be written, and exits; two seconds past the
//! window it exits regardless.

use std::time::{Duration, Instant};

use super::keepalive::TICK;

/// How long past the window a drain waits for its last frames.
const GRACE: Duration = Duration::from_secs(2);

/// A stopping node's drain.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    started: Instant,
    window: Duration,
    total: usize,
    sent: usize,
    /// Publishers have been told; waiting for the last writes.
    finishing: bool,
}

/// Whether output is still pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// No connection has output pending.
    pub all: bool,
    /// No closing connection has output pending (the last frames are out).
    pub closing: bool,
}

/// What the drain wants now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send this many more clients away (possibly 0) and go on.
    SendAway(usize),
    /// Every client is gone: tell the publishers, then flush.
    Finish,
    /// Everything is written (or the grace is over): exit.
    Exit,
}

impl Drain {
    /// A drain of `total` clients over `window`, starting at `now`.
    pub fn new(now: Instant, window: Duration, total: usize) -> Drain {
        Drain { started: now, window, total, sent: 0, finishing: false }
    }

    /// The next step at `now`. `clients_left` are this loop's sessions,
    /// `others_done` whether the node's other loops have exited (loop 0
    /// goes last: the other loops' clients get their messages through it
    /// until they have been sent away); `flushed` says whether no
    /// connection, and whether no *closing* connection, has output pending.
    pub fn step(&mut self, now: Instant, clients_left: usize, others_done: bool, flushed: Flushed) -> Step {
        let elapsed = now.saturating_duration_since(self.started);
        if self.finishing {
            return if flushed.closing || elapsed >= self.window + GRACE { Step::Exit } else { Step::Finish };
        }
        let all_flushed = flushed.all;
        let frac = (elapsed.as_secs_f64() / self.window.as_secs_f64().max(0.001)).min(1.0);
        let due = ((self.total as f64 * frac).ceil() as usize).saturating_sub(self.sent);
        // Clients that left by themselves are not owed a GOODBYE: once none
        // is left, the drain moves on whatever the schedule still says.
        if due > 0 && clients_left > 0 {
            return Step::SendAway(due);
        }
        if clients_left == 0
            && others_done
            && (elapsed >= self.window || self.total == 0 || frac >= 1.0 || all_flushed)
        {
            self.finishing = true;
            return Step::Finish;
        }
        Step::SendAway(0)
    }

    /// Records clients sent away.
    pub fn sent(&mut self, n: usize) {
        self.sent += n;
    }

    /// Whether the last frames are being written (look again soon).
    pub fn finishing(&self) -> bool {
        self.finishing
    }
}

/// An admin drain (the node's own entry flagged draining in NODES): clients
/// are moved away over the drain window, a share per timer tick, until the
/// admin undrains the node.
#[derive(Debug, Clone, Copy)]
pub struct AdminDrain {
    total: usize,
}

impl AdminDrain {
    /// An admin drain of `total` clients.
    pub fn new(total: usize) -> AdminDrain {
        AdminDrain { total }
    }

    /// Clients to send away per timer tick, so that all are gone within `window`.
    pub fn per_tick(&self, window: Duration) -> usize {
        let ticks = (window.as_millis() / TICK.as_millis()).max(1) as usize;
        self.total.div_ceil(ticks).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(1);
    const PENDING: Flushed = Flushed { all: false, closing: false };
    const FLUSHED: Flushed = Flushed { all: true, closing: true };

    #[test]
    fn goodbyes_are_spread_over_the_window_on_a_fake_clock() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, WINDOW, 100);
        let mut left = 100;
        let mut sent_by = Vec::new();
        for tick in 0..=10u32 {
            let now = t0 + TICK * tick;
            match d.step(now, left, true, PENDING) {
                Step::SendAway(n) => {
                    d.sent(n);
                    left -= n;
                    sent_by.push((tick, 100 - left));
                }
                other => panic!("tick {tick}: {other:?}"),
            }
        }
        assert_eq!(sent_by[0], (0, 0), "nobody at the start");
        assert_eq!(sent_by[5], (5, 50), "half by half the window");
        assert_eq!(sent_by[10], (10, 100), "all by its end");
        // All gone: publishers next, then exit once everything is written.
        let end = t0 + WINDOW;
        assert_eq!(d.step(end, 0, false, FLUSHED), Step::SendAway(0), "other loops still running");
        assert_eq!(d.step(end, 0, true, PENDING), Step::Finish);
        assert!(d.finishing());
        assert_eq!(d.step(end, 0, true, PENDING), Step::Finish, "frames still pending");
        let links_busy = Flushed { all: false, closing: true };
        assert_eq!(d.step(end + TICK, 0, true, links_busy), Step::Exit, "the closing ones are out");
    }

    #[test]
    fn clients_that_leave_by_themselves_do_not_hold_the_drain_up() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, WINDOW, 100);
        // 10 are sent away at the first tick, then the other 90 disconnect.
        assert_eq!(d.step(t0 + TICK, 100, true, PENDING), Step::SendAway(10));
        d.sent(10);
        assert_eq!(d.step(t0 + TICK * 2, 0, true, FLUSHED), Step::Finish, "nobody left to tell");
    }

    #[test]
    fn an_empty_node_finishes_at_once_and_a_stuck_one_gives_up() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, WINDOW, 0);
        assert_eq!(d.step(t0, 0, true, PENDING), Step::Finish);
        assert_eq!(d.step(t0 + WINDOW, 0, true, PENDING), Step::Finish);
        assert_eq!(d.step(t0 + WINDOW + GRACE, 0, true, PENDING), Step::Exit, "exits past the grace");
    }

    #[test]
    fn an_admin_drain_moves_everyone_within_the_window() {
        assert_eq!(AdminDrain::new(1000).per_tick(Duration::from_secs(10)), 10);
        assert_eq!(AdminDrain::new(5).per_tick(Duration::from_secs(10)), 1);
        assert_eq!(AdminDrain::new(0).per_tick(Duration::ZERO), 1);
    }
}
