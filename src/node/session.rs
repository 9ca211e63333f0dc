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

use crate::net::{CloseReason, ConnId, Conns};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{Code, GoodbyeAction};

use super::auth::{self, Credential};
use super::config::{Config, SlowPolicy};
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
        let a = self.reg.attach(&user, id.0, h.resume);
        // Session ids are unique in the node: each loop takes every N-th.
        let session = self.next_session * self.loops + self.loop_id;
        self.next_session += 1;
        let c = conns.get_mut(id)?;
        c.state = Peer::Client { user: a.user, ka: Keepalive::Quiet };
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

    /// Queues one message to every local session of `user`, retaining it
    /// for resume if the user has a stream here. Returns whether the user
    /// has a session here.
    #[inline]
    pub fn deliver(&mut self, conns: &mut Conns<Peer>, m: &mut Metrics, user: &[u8], payload: &[u8]) -> bool {
        let Some(u) = self.reg.find(user) else { return false };
        let Some((frame, sessions)) = self.reg.publish(u, payload) else { return false };
        if sessions.is_empty() {
            return false;
        }
        for &s in sessions {
            let s = ConnId(s);
            let Some((c, mut dirty)) = conns.get_mut_dirty(s) else { continue };
            if c.is_closing() {
                // A slow consumer gets no more messages once cut off: what it
                // missed is a clean suffix of its stream, all in retention.
                continue;
            }
            if c.pending() + frame.len() > self.queue_bytes {
                match self.slow_policy {
                    SlowPolicy::Disconnect => {
                        // Its queue is full; the GOODBYE may not get through,
                        // but the retained messages let it resume.
                        Frame::Goodbye(f::Goodbye {
                            reason: Code::SlowConsumer,
                            action: GoodbyeAction::RetryAfter,
                            delay_ms: 100,
                            target: b"",
                        })
                        .encode(&mut c.out.buf);
                        conns.abort(s, CloseReason::Sent(Code::SlowConsumer));
                    }
                    SlowPolicy::Drop => m.dropped += 1,
                }
                continue;
            }
            c.out.buf.extend_from_slice(frame);
            if let Peer::Client { ka: ka @ Keepalive::Due, .. } = &mut c.state {
                // A PING rides on the delivery: no extra write.
                *ka = Keepalive::Pinged;
                Frame::Ping(m.msgs_out).encode(&mut c.out.buf);
            }
            m.msgs_out += 1;
            dirty.mark(c, s);
        }
        true
    }

    /// Bookkeeping for a connection that is closing: detaches a session
    /// from its user's stream (which is kept for the grace period).
    pub fn ended(&mut self, state: &mut Peer, id: ConnId, m: &mut Metrics, now: Instant) -> Ended {
        match std::mem::replace(state, Peer::Closed) {
            Peer::Client { user, .. } => {
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
