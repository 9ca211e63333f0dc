//! Where a message goes: to this loop's sessions of the user, to the loop
//! that owns the user (`--threads`), and, for a publish, to every peer node
//! where the user is online (one hop; a FORWARD is never forwarded again).
//!
//! This is the step every message takes, from a publisher, a mesh link or
//! another loop. It borrows the parts it needs for one call ([`Route`]), so
//! the roles that call it share one path and none of them owns it.

use std::time::Instant;

use crate::net::{ConnId, Conns};
use crate::protocol::frame as f;

use super::conn::Peer;
use super::mesh::Presence;
use super::metrics::Metrics;
use super::session::Sessions;
use super::shard::{self, Router};

/// This turn's delivery figures (for the ingest-to-write latency histogram).
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    /// When the turn began.
    pub start: Instant,
    /// Messages queued to local sessions this turn.
    pub msgs: u64,
    /// Loops 1..N: when loop 0 read the oldest message of this turn.
    pub origin: Option<Instant>,
}

impl Turn {
    /// A turn beginning at `now`.
    pub fn new(now: Instant) -> Turn {
        Turn { start: now, msgs: 0, origin: None }
    }
}

/// The parts one delivery touches.
pub struct Route<'a> {
    /// The loop's connections.
    pub conns: &'a mut Conns<Peer>,
    /// The loop's sessions.
    pub sessions: &'a mut Sessions,
    /// Counters.
    pub m: &'a mut Metrics,
    /// Users online on other nodes.
    pub presence: &'a Presence,
    /// Loop 0 of several: the way to the other loops.
    pub router: Option<&'a mut Router>,
    /// Loops in the node.
    pub loops: usize,
    /// This turn.
    pub turn: &'a mut Turn,
}

impl Route<'_> {
    /// Delivers one message to the user's sessions on this node (here or on
    /// the loop that owns the user) and, for a publish (`forward`), to every
    /// peer where the user is online, adding each such link to `links` if
    /// given (for a confirmed publish, [`super::confirm`]). Returns (queued
    /// for a local session, forwarded to a peer), PUB_RESULT's `local` and
    /// `forwarded` for an unconfirmed publish.
    #[inline]
    pub fn deliver(
        &mut self,
        user: &[u8],
        key: &[u8],
        payload: &[u8],
        forward: bool,
        links: Option<&mut Vec<ConnId>>,
    ) -> (bool, bool) {
        self.deliver_with(user, key, payload, forward, b"", false, links)
    }

    /// [`Route::deliver`] for a message with a de-duplication id (from a
    /// connector, [`super::intake`]): the id travels in each FORWARD (to
    /// peers of protocol version 2), and `skip_local` leaves out this
    /// node's sessions (they already have it: a redelivery).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn deliver_with(
        &mut self,
        user: &[u8],
        key: &[u8],
        payload: &[u8],
        forward: bool,
        id: &[u8],
        skip_local: bool,
        mut links: Option<&mut Vec<ConnId>>,
    ) -> (bool, bool) {
        self.m.msgs_in += 1;
        let mut forwarded = false;
        if forward {
            for &peer in self.presence.peers_of(user) {
                let peer = ConnId(peer);
                let Some((c, mut dirty)) = self.conns.get_mut_dirty(peer) else { continue };
                if c.is_closing() {
                    continue;
                }
                let id = match c.state.link() {
                    Some(l) if l.version >= 2 => id,
                    _ => b"",
                };
                f::encode_forward(&mut c.out.buf, user, key, id, payload);
                self.m.forwarded += 1;
                forwarded = true;
                dirty.mark(c, peer);
                if let Some(l) = links.as_deref_mut() {
                    l.push(peer);
                }
            }
        }
        let local = match self.router.as_deref_mut() {
            _ if skip_local => false,
            Some(r) => match shard::owner(user, self.loops) {
                0 => self.local(user, key, payload),
                o => match r.homes.route(user) {
                    shard::Route::Unknown => false,
                    shard::Route::Send { online } => {
                        r.queue(o, user, key, payload, self.turn.start);
                        online
                    }
                },
            },
            None => self.local(user, key, payload),
        };
        if !local && !forwarded && !skip_local {
            self.m.no_route += 1;
        }
        (local, forwarded)
    }

    /// Durable mode: delivers a message the log has appended at `seq` to
    /// the user's sessions here and, with a FORWARD carrying the seq, to
    /// every peer where the user is online (protocol.md §13). Returns
    /// (local, forwarded): a forward counts at once, since the log, not the
    /// peer, keeps the message.
    pub fn deliver_seq(&mut self, user: &[u8], key: &[u8], payload: &[u8], seq: u64) -> (bool, bool) {
        self.m.msgs_in += 1;
        let mut forwarded = false;
        for &peer in self.presence.peers_of(user) {
            forwarded |= self.forward_seq(ConnId(peer), user, key, payload, seq);
        }
        let local = self.local_at(user, key, payload, seq, false);
        if !local && !forwarded {
            self.m.no_route += 1;
        }
        (local, forwarded)
    }

    /// Durable mode: one FORWARD with SEQ to `peer`; false if its link is
    /// gone or closing.
    #[inline]
    pub fn forward_seq(&mut self, peer: ConnId, user: &[u8], key: &[u8], payload: &[u8], seq: u64) -> bool {
        let Some((c, mut dirty)) = self.conns.get_mut_dirty(peer) else { return false };
        if c.is_closing() {
            return false;
        }
        f::encode_forward_seq(&mut c.out.buf, user, key, seq, payload);
        self.m.forwarded += 1;
        dirty.mark(c, peer);
        true
    }

    /// Durable mode: delivers to this loop's sessions of `user` at `seq`
    /// ([`Sessions::deliver_at`]); true if it has any.
    #[inline]
    pub fn local_at(&mut self, user: &[u8], key: &[u8], payload: &[u8], seq: u64, skip: bool) -> bool {
        let found = self.sessions.deliver_at(self.conns, self.m, user, key, payload, seq, skip);
        if found {
            self.turn.msgs += 1;
        }
        found
    }

    /// Delivers to this loop's sessions of `user`; true if it has any.
    #[inline]
    pub fn local(&mut self, user: &[u8], key: &[u8], payload: &[u8]) -> bool {
        let found = self.sessions.deliver(self.conns, self.m, user, key, payload);
        if found {
            self.turn.msgs += 1;
        }
        found
    }
}
