//! The node's timed duties, run from the event loop's timers with `now`
//! passed in: the partial sweep (keepalive, handshake deadlines, lingering
//! closes), grace expiry, heartbeats, the drains, the periodic log line and
//! the figures each loop hands to loop 0.
//!
//! The decisions are pure and tested on a fake clock in their own files
//! ([`super::keepalive`], [`super::drain`]); this file applies them to the
//! connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::{CloseReason, ConnId, Conns, Tick};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{Code, GoodbyeAction, PresenceOp};

use super::cluster::Heartbeater;
use super::config::Config;
use super::conn::Peer;
use super::drain::{AdminDrain, Drain, Flushed, Step};
use super::keepalive::{self, Action, Keepalive, Sweep, TICK};
use super::metrics::{Metrics, QueueDepth};
use super::session::Sessions;
use super::shard::{Change, Role, Shared};

/// Most keepalive PINGs sent in one timer tick (bounds the burst).
const MAX_PINGS_PER_TICK: usize = 100;
/// How often a finishing drain looks whether its last frames are out.
const FINISH_POLL: Duration = Duration::from_millis(5);
/// Durable mode: a node whose log has been down this long moves its clients
/// to a node that is up (protocol.md §13).
const LOG_MOVE_AFTER: Duration = Duration::from_secs(2);

/// The parts of a loop the duties act on, borrowed for one tick.
pub struct Parts<'a> {
    /// The configuration.
    pub cfg: &'a Config,
    /// This loop's index.
    pub loop_id: usize,
    /// What all loops share.
    pub shared: &'a Arc<Shared>,
    /// What this loop is in the node.
    pub role: &'a mut Role,
    /// Sessions and streams.
    pub sessions: &'a mut Sessions,
    /// Counters.
    pub m: &'a mut Metrics,
    /// The stop flag.
    pub stop: &'a AtomicBool,
    /// Presence changes for the mesh (a stream this loop forgot).
    pub presence_out: &'a mut Vec<(PresenceOp, Box<[u8]>)>,
}

/// Timer state of one loop.
pub struct Duties {
    sweep: Sweep,
    drain: Option<Drain>,
    admin_drain: Option<AdminDrain>,
    /// Client queue depths gathered over the current sweep pass (loops 1..N).
    pass_depths: Vec<u64>,
    started: Instant,
    next_log: Instant,
    /// Loop 0 has seen another loop fail (and started the drain).
    failure_seen: bool,
    /// Loop 0 in a cluster: heartbeats to the decision servers.
    hb: Option<Heartbeater>,
    /// Durable mode: since when the log cannot keep messages (§13).
    /// Heartbeats say DRAINING, and once that has lasted [`LOG_MOVE_AFTER`],
    /// while another node is up, its clients move there.
    log_down: Option<Instant>,
    /// The decision servers list a node other than this one that is not
    /// draining.
    others_up: bool,
}

impl Duties {
    /// The duties of a loop started at `now`.
    pub fn new(cfg: &Config, hb: Option<Heartbeater>, now: Instant) -> Duties {
        Duties {
            sweep: Sweep::new(now),
            drain: None,
            admin_drain: None,
            pass_depths: Vec::new(),
            started: now,
            next_log: now + cfg.log_every,
            failure_seen: false,
            hb,
            log_down: None,
            others_up: false,
        }
    }

    /// Durable mode: whether the log keeps messages, as of `now`.
    pub fn log_health(&mut self, ok: bool, now: Instant) {
        if ok {
            self.log_down = None;
        } else if self.log_down.is_none() {
            self.log_down = Some(now);
        }
    }

    /// Whether new sessions are refused: stopping or drained by an admin.
    pub fn draining(&self) -> bool {
        self.drain.is_some() || self.admin_drain.is_some()
    }

    /// Whether the node is stopping (its listeners close).
    pub fn stopping(&self) -> bool {
        self.drain.is_some()
    }

    /// How long the loop may sleep: until the next sweep tick, or briefly
    /// while a drain waits for its last frames.
    pub fn timeout(&self, now: Instant) -> Duration {
        if self.drain.is_some_and(|d| d.finishing()) {
            return FINISH_POLL;
        }
        self.sweep.next.saturating_duration_since(now).min(TICK)
    }

    /// Runs what is due at `now`.
    pub fn tick(&mut self, conns: &mut Conns<Peer>, now: Instant, mut p: Parts<'_>) -> Tick {
        if self.drain.is_some_and(|d| d.finishing()) && self.drain_step(conns, now, &mut p) {
            return Tick::Exit;
        }
        if !self.sweep.due(now) {
            return Tick::Idle;
        }
        if p.loop_id == 0 {
            self.check_loops(p.shared, p.stop, &p.cfg.node_id);
        }
        let pass_done = self.sweep_conns(conns, now, &mut p);
        if pass_done {
            // Once per full pass (about a second): forget users past grace,
            // and (loops 1..N) report to loop 0.
            let (role, presence) = (&mut *p.role, &mut *p.presence_out);
            p.sessions.reg.sweep(now, |id| match role.owner() {
                Some(o) => o.report(id, Change::Forgotten, false),
                // Loop 0's own users: the stream is gone, so peers stop
                // forwarding to it now (§6.4).
                None => presence.push((PresenceOp::Offline, id.into())),
            });
        }
        if p.role.is_owner() {
            self.publish_stats(pass_done, &mut p, conns);
        }
        self.heartbeat(now, &p);
        self.admin_drain_step(conns, now, &mut p);
        if !p.cfg.log_every.is_zero() && now >= self.next_log {
            self.next_log = now + p.cfg.log_every;
            if !p.role.is_owner() {
                let (m, q, _) = self.node_stats(p.m, conns, p.sessions, p.shared);
                log::info!("herald node {}: {}", p.cfg.node_id, m.summary(q));
            }
        }
        if self.drain_step(conns, now, &mut p) {
            return Tick::Exit;
        }
        Tick::Ran
    }

    /// One tick's slice of the slab: lingering closes, handshake deadlines
    /// and keepalive. Returns whether the tick completed a pass.
    fn sweep_conns(&mut self, conns: &mut Conns<Peer>, now: Instant, p: &mut Parts<'_>) -> bool {
        let hb = p.cfg.heartbeat;
        let hs = p.cfg.handshake_timeout;
        let owner = p.role.is_owner();
        let (a, b, pass_done) = self.sweep.slice(conns.capacity(), hb);
        let mut pings = 0;
        for key in a.chain(b) {
            let id = ConnId(key);
            let Some((c, mut dirty)) = conns.get_mut_dirty(id) else { continue };
            if owner && c.state.is_client() {
                self.pass_depths.push(c.pending() as u64);
            }
            if c.is_closing() {
                if c.linger_over(now) {
                    conns.expire(id);
                }
                continue;
            }
            if c.state.in_handshake() {
                if now.saturating_duration_since(c.opened) >= hs {
                    conns.fail(id, Code::HandshakeTimeout, Code::HandshakeTimeout.name(), now);
                }
                continue;
            }
            if let Peer::Api(a) = &c.state {
                // HTTP publishers: a request must be whole within the
                // handshake deadline of its first byte; an idle keep-alive
                // connection goes after a minute.
                if let Some(code) = super::http_publish::expired(a, c.last_rx, hs, now) {
                    conns.abort(id, CloseReason::Sent(code));
                }
                continue;
            }
            let idle = now.saturating_duration_since(c.last_rx);
            let may_ping = pings < MAX_PINGS_PER_TICK;
            let Some(ka) = c.state.keepalive() else { continue };
            match keepalive::check(*ka, idle, hb, key, may_ping) {
                Action::Wait => {}
                Action::Piggyback => *ka = Keepalive::Due,
                Action::Ping => {
                    *ka = Keepalive::Pinged;
                    pings += 1;
                    Frame::Ping(now.duration_since(self.started).as_millis() as u64).encode(&mut c.out.buf);
                    dirty.mark(c, id);
                }
                Action::Expire => conns.fail(id, Code::IdleTimeout, Code::IdleTimeout.name(), now),
            }
        }
        pass_done
    }

    /// Loop 0: if another loop has failed, its users can no longer be served
    /// here (their sockets closed with it, and a reconnect would be handed
    /// to it again), so drain the whole node: every other client gets a
    /// GOODBYE and moves to another node, `/healthz` says why, and
    /// [`super::Node::run`] returns the failure, so the process exits
    /// non-zero and a supervisor restarts it.
    pub fn check_loops(&mut self, shared: &Shared, stop: &AtomicBool, node_id: &str) {
        let failed = shared.failed.load(Ordering::SeqCst);
        if failed != 0 && !self.failure_seen {
            self.failure_seen = true;
            log::error!("herald node {node_id}: event loop {failed} failed; draining the node so its clients move elsewhere");
            stop.store(true, Ordering::SeqCst);
        }
    }

    /// The node list from a decision server: follow an admin drain of this
    /// node (every loop acts on the shared flag at its next tick).
    pub fn follow_admin(&mut self, list: &[crate::decision::client::NodeInfo], shared: &Shared, me: &str) {
        self.others_up = list.iter().any(|n| n.node_id != me && !n.draining);
        let Some(mine) = list.iter().find(|n| n.node_id == me) else { return };
        // By the admin's flag only: DRAINING may be this node's own
        // heartbeats coming back (a log it cannot reach), and taking that for
        // an admin drain would move every client even where the other nodes
        // cannot take them, and keep moving them after the log is back.
        let was = shared.admin_draining.swap(mine.drained, Ordering::Relaxed);
        if mine.drained && !was && self.drain.is_none() {
            let clients = shared.clients.load(Ordering::Relaxed);
            log::info!("herald node {me}: drained by an admin; moving {clients} clients away");
        } else if !mine.drained && was {
            log::info!("herald node {me}: undrained by an admin; accepting clients again");
        }
    }

    /// Moves clients away while an admin drain is on, spread over the window.
    fn admin_drain_step(&mut self, conns: &mut Conns<Peer>, now: Instant, p: &mut Parts<'_>) {
        // Durable mode: a node that cannot reach the log moves its clients
        // to one that can (never when no other node is up: they would have
        // nowhere to go).
        // Only once the log has been down a while: an overloaded log that
        // misses an ack now and then (for every node alike) must not send
        // clients around the cluster, each move a resume that reads it.
        let log_gone = self.log_down.is_some_and(|t| now.saturating_duration_since(t) >= LOG_MOVE_AFTER);
        let flagged = p.shared.admin_draining.load(Ordering::Relaxed) || (log_gone && self.others_up);
        if flagged && self.admin_drain.is_none() && self.drain.is_none() {
            self.admin_drain = Some(AdminDrain::new(p.m.clients as usize));
            withdraw_grace(p, PresenceOp::Offline);
        } else if !flagged && self.admin_drain.take().is_some() && self.drain.is_none() {
            // Undrained: the streams still in grace are offered again.
            withdraw_grace(p, PresenceOp::Online);
        }
        let Some(ad) = self.admin_drain else { return };
        if self.drain.is_some() {
            return;
        }
        send_away(conns, ad.per_tick(p.cfg.drain_window), Peer::is_client, now);
    }

    /// Starts the drain once the stop flag is up, and runs its next step.
    /// Returns true when the loop should exit.
    fn drain_step(&mut self, conns: &mut Conns<Peer>, now: Instant, p: &mut Parts<'_>) -> bool {
        if self.drain.is_none() && p.stop.load(Ordering::SeqCst) {
            let total = p.m.clients as usize;
            log::info!(
                "herald node {}: draining {total} clients over {:?}",
                p.cfg.node_id,
                p.cfg.drain_window
            );
            self.drain = Some(Drain::new(now, p.cfg.drain_window, total));
            withdraw_grace(p, PresenceOp::Offline);
        }
        let Some(d) = self.drain.as_mut() else { return false };
        let others_done = p.loop_id != 0 || p.shared.running.load(Ordering::SeqCst) == 0;
        let mut flushed = Flushed { all: true, closing: true };
        for (_, c) in conns.iter() {
            if c.pending() > 0 {
                flushed.all = false;
                flushed.closing &= !c.is_closing();
            }
        }
        match d.step(now, p.m.clients as usize, others_done, flushed) {
            Step::SendAway(0) => {}
            Step::SendAway(n) => {
                let sent = send_away(conns, n, Peer::is_client, now);
                d.sent(sent);
            }
            Step::Finish => {
                // Tell publishers too, then wait for the last frames.
                let ingest = |s: &Peer| matches!(s, Peer::Publisher { .. } | Peer::IngestHandshake);
                send_away(conns, usize::MAX, ingest, now);
            }
            Step::Exit => {
                if !p.role.is_owner() {
                    let (m, _, _) = self.node_stats(p.m, conns, p.sessions, p.shared);
                    log::info!(
                        "herald node {}: drained; {}",
                        p.cfg.node_id,
                        m.summary(QueueDepth::default())
                    );
                }
                return true;
            }
        }
        false
    }

    fn heartbeat(&mut self, now: Instant, p: &Parts<'_>) {
        let Some(hb) = self.hb.as_mut() else { return };
        let flags = if self.drain.is_some() || self.log_down.is_some() { f::NODE_DRAINING } else { 0 };
        let (m, shared) = (&*p.m, p.shared);
        hb.maybe_send(
            now,
            p.cfg,
            || {
                // Connections come from the node-wide admission count, which
                // every loop updates as it happens: the other loops' reported
                // counters can be 100 ms old, and a heartbeat that
                // under-reports lets the decision server overfill the node.
                let c = shared.clients.load(Ordering::Relaxed) as u64;
                let (mut i, mut o) = (m.msgs_in, m.msgs_out);
                for slot in &shared.stats {
                    if let Ok(st) = slot.lock() {
                        i += st.m.msgs_in;
                        o += st.m.msgs_out;
                    }
                }
                (c, i, o)
            },
            flags,
        );
    }

    /// Loops 1..N: hands this loop's figures to loop 0: the counters every
    /// timer tick (100 ms), and with `full` (once per sweep pass, about a
    /// second) the latency histogram and queue depths too.
    pub fn publish_stats(&mut self, full: bool, p: &mut Parts<'_>, conns: &Conns<Peer>) {
        let Some(slot) = p.shared.stats.get(p.loop_id.wrapping_sub(1)) else { return };
        p.m.take_io(conns.len(), &conns.io);
        if let Ok(mut st) = slot.lock() {
            st.users = p.sessions.users();
            if full {
                st.m.copy_from(p.m);
                std::mem::swap(&mut st.depths, &mut self.pass_depths);
            } else {
                st.m.copy_counters(p.m);
            }
        }
        if full {
            self.pass_depths.clear();
        }
    }

    /// Loop 0: the whole node's counters, queue depths and users (its own
    /// figures now, the other loops' as of their last report).
    pub fn node_stats(
        &self,
        own: &Metrics,
        conns: &Conns<Peer>,
        sessions: &Sessions,
        shared: &Shared,
    ) -> (Metrics, QueueDepth, usize) {
        let mut m = Metrics::default();
        m.copy_from(own);
        m.take_io(conns.len(), &conns.io);
        let mut depths: Vec<u64> =
            conns.iter().filter(|(_, c)| c.state.is_client()).map(|(_, c)| c.pending() as u64).collect();
        let mut users = sessions.users();
        for slot in &shared.stats {
            if let Ok(st) = slot.lock() {
                m.merge(&st.m);
                depths.extend_from_slice(&st.depths);
                users += st.users;
            }
        }
        (m, QueueDepth::from_depths(depths), users)
    }
}

/// Sends up to `n` connections whose state passes `which` a GOODBYE
/// (DRAINING, ask the decision server) and closes them once it is out.
/// Returns how many.
fn send_away(conns: &mut Conns<Peer>, n: usize, which: impl Fn(&Peer) -> bool, now: Instant) -> usize {
    let ids: Vec<ConnId> =
        conns.iter().filter(|(_, c)| !c.is_closing() && which(&c.state)).map(|(k, _)| k).take(n).collect();
    for &id in &ids {
        if let Some(out) = conns.queue(id) {
            Frame::Goodbye(f::Goodbye {
                reason: Code::Draining,
                action: GoodbyeAction::AskDecision,
                delay_ms: 0,
                target: b"",
            })
            .encode(out);
        }
        conns.begin_close(id, CloseReason::Sent(Code::Draining), now);
    }
    ids.len()
}

/// A node that starts to drain stops offering the streams it keeps for the
/// grace period (`op` OFFLINE; loop 0, for the whole node): their clients
/// will resume on other nodes, so peers should stop forwarding here
/// (protocol.md §6.4). An admin's undrain offers them again (ONLINE).
fn withdraw_grace(p: &mut Parts<'_>, op: PresenceOp) {
    if p.loop_id != 0 {
        return;
    }
    let idle = p.sessions.reg.idle().map(|u| (op, u.into()));
    p.presence_out.extend(idle);
    if let Some(r) = p.role.router() {
        p.presence_out.extend(r.homes.in_grace().map(|u| (op, u.into())));
    }
}
