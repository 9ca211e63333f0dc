//! Client sessions: the HELLO (authenticate, attach to the user's stream,
//! WELCOME, replay what a resume is owed), delivery to a user's sessions
//! with the queue bound and slow-consumer policy, and a session's end
//! (protocol.md §3).
//!
//! The registry decides streams and resume results; this module turns its
//! answers into frames on connections. It reports what the rest of the node
//! must hear (a user came online or went offline) as return values and
//! never reaches the mesh or the other loops itself.

use std::time::{Duration, Instant};

use byteorder::{BigEndian, ByteOrder};

use crate::net::outbox::Outbox;
use crate::net::{CloseReason, ConnId, Conns};
use crate::protocol::frame::{self as f, Frame, HEADER_LEN};
use crate::protocol::{Code, GoodbyeAction};

use super::auth::{self, Credential};
use super::config::{Config, SlowPolicy};
use super::conflate::Conflation;
use super::conn::Peer;
use super::keepalive::Keepalive;
use super::metrics::Metrics;
use super::registry::{Registry, RegistryConfig};
use super::retention::LogLimits;

/// This loop's sessions and streams.
pub struct Sessions {
    /// Users, sessions, streams and retention.
    pub reg: Registry,
    next_session: u64,
    loop_id: u64,
    loops: u64,
    heartbeat: Duration,
    queue_bytes: usize,
    slow_policy: SlowPolicy,
    max_sessions_per_user: usize,
    /// This loop's share of `--output-budget`.
    output_budget: usize,
    /// Scratch for [`cut_largest`] (kept: the scan runs only when over
    /// budget, but then may run again soon).
    victims: Vec<(usize, ConnId)>,
    /// Durable mode: users with messages to read from the log (a seq was
    /// heard of beyond their head + 1); the loop asks the log.
    pub gaps: Vec<Box<[u8]>>,
}

/// A HELLO that established a session.
#[derive(Debug)]
pub struct Welcomed {
    /// The user.
    pub user: Vec<u8>,
    /// It is the user's only session on this loop (the user came online).
    pub first_session: bool,
}

/// What ending a connection meant for the sessions.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Not a client session (nothing to report).
    NotASession,
    /// A client connection that never completed its handshake (on an owner
    /// loop: the user loop 0 handed it over for).
    Handshake(Option<Box<[u8]>>),
    /// An established session ended; `last` if it was the user's last one
    /// here (the user went offline).
    Session {
        /// The user.
        user: Box<[u8]>,
        /// It was the user's last session on this loop.
        last: bool,
    },
}

impl Sessions {
    /// The sessions of loop `loop_id` of `loops`, with `seed` for epochs.
    pub fn new(cfg: &Config, loop_id: usize, loops: usize, seed: u64) -> Sessions {
        let reg = Registry::new(
            RegistryConfig {
                log: LogLimits { max_count: cfg.retain_count, max_bytes: cfg.retain_bytes },
                // The total retention bound is shared out among the loops.
                ring_bytes: cfg.retain_total / loops,
                grace: cfg.grace,
            },
            seed ^ (loop_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        Sessions {
            reg,
            next_session: 1,
            loop_id: loop_id as u64,
            loops: loops as u64,
            heartbeat: cfg.heartbeat,
            queue_bytes: cfg.queue_bytes,
            slow_policy: cfg.slow_policy,
            max_sessions_per_user: cfg.max_sessions_per_user,
            // Shared out among the loops, as the retention ring is.
            output_budget: cfg.output_budget / loops,
            victims: Vec::new(),
            gaps: Vec::new(),
        }
    }

    /// Runs a HELLO on connection `id`: on success the connection becomes a
    /// session and its WELCOME (and any replay) is queued. `draining`
    /// refuses it with DRAINING; `unix` is the wall clock in seconds.
    #[allow(clippy::too_many_arguments)]
    pub fn hello(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        h: &f::Hello<'_>,
        cfg: &Config,
        draining: bool,
        unix: u64,
        m: &mut Metrics,
        now: Instant,
    ) -> Option<Welcomed> {
        let cred = Credential::Client { token: h.token, secret: &cfg.client_secret };
        let admitted = match auth::authenticate(h.min_version, h.max_version, cred, unix) {
            Ok(a) => a,
            Err(r) => {
                conns.fail(id, r.code, &r.message, now);
                return None;
            }
        };
        if draining {
            conns.fail(id, Code::Draining, "node is draining", now);
            return None;
        }
        let user = admitted.user.unwrap_or_default();
        if self.at_session_limit(&user) {
            // The new session is refused, never an old one (§3.1 step 5).
            // All of a user's sessions are on this loop (its owner), and a
            // loop runs one HELLO at a time, so the count is the node's.
            conns.fail(
                id,
                Code::SessionLimit,
                "the user already has the maximum number of sessions on this node",
                now,
            );
            return None;
        }
        let a = self.reg.attach(&user, id.0, h.resume);
        // Session ids are unique in the node: each loop takes every N-th.
        let session = self.next_session * self.loops + self.loop_id;
        self.next_session += 1;
        let c = conns.get_mut(id)?;
        c.state = Peer::Client { user: a.user, ka: Keepalive::Quiet, v2: admitted.version >= 2, cf: None };
        let out = conns.queue(id)?;
        Frame::Welcome(f::Welcome {
            version: admitted.version,
            resume: a.result,
            heartbeat_ms: self.heartbeat.as_millis() as u32,
            session_id: session,
            epoch: a.epoch,
            next_seq: a.next_seq,
            node_id: cfg.node_id.as_bytes(),
        })
        .encode(out);
        if let Some(from) = a.replay_from {
            let n = self.reg.replay(a.user, from, out);
            m.replayed += n as u64;
        }
        m.clients += 1;
        m.welcome(a.result);
        Some(Welcomed { user, first_session: a.first_session })
    }

    /// Whether `user` already has `--max-sessions-per-user` sessions here.
    fn at_session_limit(&self, user: &[u8]) -> bool {
        let cap = self.max_sessions_per_user;
        cap != 0
            && self.reg.find(user).and_then(|u| self.reg.user(u)).is_some_and(|u| u.sessions.len() >= cap)
    }

    /// Queues one message to every local session of `user`, retaining it
    /// for resume if the user has a stream here, and conflating it by `key`
    /// in the sessions that are backed up under `--slow-policy conflate`.
    /// Returns whether the user has a session here.
    #[inline]
    pub fn deliver(
        &mut self,
        conns: &mut Conns<Peer>,
        m: &mut Metrics,
        user: &[u8],
        key: &[u8],
        payload: &[u8],
    ) -> bool {
        let Some(u) = self.reg.find(user) else { return false };
        let Some((frame, sessions)) = self.reg.publish(u, payload) else { return false };
        if sessions.is_empty() {
            return false;
        }
        let need = frame.len() * sessions.len();
        if conns.io.pending + need > self.output_budget {
            cut_largest(conns, self.output_budget, need, &mut self.victims);
        }
        for &s in sessions {
            let s = ConnId(s);
            let Some((c, mut dirty)) = conns.get_mut_dirty(s) else { continue };
            if c.is_closing() {
                // A slow consumer gets no more messages once cut off: what it
                // missed is a clean suffix of its stream, all in retention.
                continue;
            }
            // Bytes conflated away still in the queue (the bound does not
            // count them), and whether the frame is queued already.
            let (mut dead, mut queued) = (0, false);
            if self.slow_policy == SlowPolicy::Conflate {
                if let Peer::Client { v2: true, cf, .. } = &mut c.state {
                    // Backed up (§5.7): the socket left output over, or one
                    // turn's burst alone has filled a quarter of the bound.
                    let backed_up = c.out.backed_up() || c.out.pending() >= self.queue_bytes / 4;
                    if !backed_up && cf.as_ref().is_none_or(|cf| cf.dead() == 0) {
                        // Keeping up: nothing it indexed is queued any more.
                        *cf = None;
                    } else if !key.is_empty() {
                        let epoch = BigEndian::read_u64(&frame[HEADER_LEN..HEADER_LEN + 8]);
                        let cf = cf.get_or_insert_with(|| Box::new(Conflation::new(epoch)));
                        c.out.reserve(frame.len());
                        m.conflated += cf.push(&mut c.out, key, frame) as u64;
                        (dead, queued) = (cf.dead(), true);
                    } else if let Some(cf) = cf {
                        dead = cf.dead();
                    }
                }
            }
            let fits = c.pending() - dead + if queued { 0 } else { frame.len() } <= self.queue_bytes;
            if !fits {
                match self.slow_policy {
                    SlowPolicy::Disconnect | SlowPolicy::Conflate => {
                        cut_off(conns, s, CloseReason::Sent(Code::SlowConsumer))
                    }
                    SlowPolicy::Drop => m.dropped += 1,
                }
                continue;
            }
            if !queued {
                c.out.reserve(frame.len());
                c.out.buf.extend_from_slice(frame);
            }
            dirty.charge(c, frame.len());
            if let Peer::Client { ka: ka @ Keepalive::Due, .. } = &mut c.state {
                // A PING rides on the delivery: no extra write (nor charge:
                // the flush counts it).
                *ka = Keepalive::Pinged;
                Frame::Ping(m.msgs_out).encode(&mut c.out.buf);
            }
            m.msgs_out += 1;
            dirty.mark(c, s);
        }
        true
    }

    /// Durable mode: [`Sessions::deliver`] at `seq`, the message's place in
    /// the user's stream as the log assigned it (protocol.md §13). A seq at
    /// or below the head is there already (nothing is queued); one beyond
    /// head + 1 is not queued either, and the user is listed in
    /// [`Sessions::gaps`] so the loop reads the messages between from the
    /// log (with `skip`, read from the log: the ones between are gone from
    /// it, and the stream goes on at `seq`). Returns whether the user has a
    /// session here.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver_at(
        &mut self,
        conns: &mut Conns<Peer>,
        m: &mut Metrics,
        user: &[u8],
        key: &[u8],
        payload: &[u8],
        seq: u64,
        skip: bool,
    ) -> bool {
        let Some(u) = self.reg.find(user) else { return false };
        let Some(rec) = self.reg.user(u) else { return false };
        let (head, online) = (rec.head, !rec.sessions.is_empty());
        if seq <= head {
            return online;
        }
        if seq > head + 1 {
            if !skip {
                let first = rec.want <= head + 1;
                self.reg.want(u, seq);
                if first {
                    self.gaps.push(user.into());
                }
                return online;
            }
            self.reg.skip_to(u, seq - 1);
        }
        self.deliver(conns, m, user, key, payload)
    }

    /// Bookkeeping for a connection that is closing: detaches a session
    /// from its user's stream (which is kept for the grace period).
    /// What conflation held back is settled first: nothing dead is written.
    pub fn ended(
        &mut self,
        state: &mut Peer,
        out: &mut Outbox,
        id: ConnId,
        m: &mut Metrics,
        now: Instant,
    ) -> Ended {
        match std::mem::replace(state, Peer::Closed) {
            Peer::Client { user, cf, .. } => {
                if let Some(mut cf) = cf {
                    cf.settle(out);
                }
                let last = self.reg.detach(user, id.0, now).is_some();
                m.clients -= 1;
                match self.reg.user(user) {
                    Some(u) => Ended::Session { user: u.id.clone(), last },
                    None => Ended::NotASession,
                }
            }
            Peer::ClientHandshake { handed } => Ended::Handshake(handed),
            other => {
                *state = other;
                Ended::NotASession
            }
        }
    }

    /// Users known (online or within grace).
    pub fn users(&self) -> usize {
        self.reg.users()
    }
}

/// Cuts a session off as a slow consumer: GOODBYE SLOW_CONSUMER,
/// RETRY_AFTER 100 ms, then one last write and the close. The GOODBYE may
/// not get through (its queue is full), but the retained messages let it
/// resume.
fn cut_off(conns: &mut Conns<Peer>, s: ConnId, reason: CloseReason) {
    if let Some(out) = conns.get_mut(s).map(|c| &mut c.out.buf) {
        Frame::Goodbye(f::Goodbye {
            reason: Code::SlowConsumer,
            action: GoodbyeAction::RetryAfter,
            delay_ms: 100,
            target: b"",
        })
        .encode(out);
    }
    conns.abort(s, reason);
}

/// Queuing `need` more bytes would take this loop's pending output over
/// `budget`: cuts the sessions with the largest queues (counted as
/// [`CloseReason::OutputBudget`]) until the rest plus `need` is under 90 %
/// of it, so that one scan of the connections pays for many deliveries. A
/// session with nothing queued is never cut. Only runs when over budget.
#[cold]
fn cut_largest(conns: &mut Conns<Peer>, budget: usize, need: usize, victims: &mut Vec<(usize, ConnId)>) {
    let target = budget / 10 * 9;
    victims.clear();
    victims.extend(
        conns
            .iter()
            .filter(|(_, c)| c.state.is_client() && !c.is_closing() && c.pending() > 0)
            .map(|(id, c)| (c.pending(), id)),
    );
    victims.sort_unstable_by(|a, b| b.cmp(a));
    for &(_, id) in victims.iter() {
        if conns.io.pending + need <= target {
            break;
        }
        // The close stops its output counting at once.
        cut_off(conns, id, CloseReason::OutputBudget);
    }
}
