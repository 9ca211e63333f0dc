//! Confirmed forwarding (protocol.md §5.5, §6.6): for a PUBLISH or
//! PUBLISH_BATCH with WANT_RESULT, a message counts as `forwarded` only once
//! a peer it was forwarded to has answered a PING sent on that link after
//! the FORWARD. TCP keeps a link's frames in order and the peer answers a
//! PING only after the frames before it, so the PONG proves the peer has
//! taken the message into its user's stream (delivered, or retained for a
//! resume, or counted in a gap its client sees).
//!
//! A link cut silently (no RST, the kernel keeps retransmitting) would
//! otherwise take FORWARDs into its socket buffer, have them counted as
//! `forwarded`, and lose them when its keepalive finally closes it. Here a
//! link that leaves a confirmation PING unanswered for the forward timeout
//! is declared down: closed with IDLE_TIMEOUT (its presence is forgotten),
//! and every message waiting on it counts as not forwarded (so in
//! `no_route` if it was not local either). PUB_RESULTs stay in request
//! order per publisher: one waiting holds back those behind it.
//!
//! Publishes without WANT_RESULT take none of this. No clock of its own:
//! `now` comes in; no sockets: frames are encoded into the connections' buffers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::net::{ConnId, Conns};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::Code;

use super::conn::Peer;

/// Confirmation PINGs carry this bit in their nonce; keepalive PINGs (ms
/// since the node started) never do.
pub const NONCE_BIT: u64 = 1 << 63;

/// One message of a request, as far as confirmation goes.
#[derive(Debug)]
struct Msg {
    /// Queued for a local session.
    local: bool,
    /// (link, round) it waits on; emptied as they fail.
    waits: Vec<(ConnId, u64)>,
    /// A peer confirmed it.
    confirmed: bool,
}

/// A request whose PUB_RESULT is not written yet.
#[derive(Debug)]
struct Request {
    request_id: u32,
    msgs: Vec<Msg>,
}

impl Request {
    fn done(&self) -> bool {
        self.msgs.iter().all(|m| m.confirmed || m.waits.is_empty())
    }

    fn result(&self) -> f::PubResult {
        let n = |p: &dyn Fn(&Msg) -> bool| self.msgs.iter().filter(|m| p(m)).count() as u16;
        f::PubResult {
            request_id: self.request_id,
            accepted: self.msgs.len() as u16,
            local: n(&|m| m.local),
            forwarded: n(&|m| m.confirmed),
            no_route: n(&|m| !m.local && !m.confirmed),
        }
    }
}

/// Confirmation rounds of one link.
#[derive(Debug, Default)]
struct Rounds {
    /// The round messages forwarded now wait on (its PING not sent yet).
    next: u64,
    /// A message waits on `next`: send its PING at the end of the turn.
    want: bool,
    /// PINGs sent and not answered: (round, when).
    sent: VecDeque<(u64, Instant)>,
}

/// Every waiting PUB_RESULT and every link's rounds (loop 0: the loop of
/// publishers and links).
#[derive(Debug)]
pub struct Confirms {
    queues: HashMap<ConnId, VecDeque<Request>>,
    links: HashMap<ConnId, Rounds>,
    timeout: Duration,
}

impl Confirms {
    /// Links that leave a confirmation unanswered for `timeout` are declared down.
    pub fn new(timeout: Duration) -> Confirms {
        Confirms { queues: HashMap::new(), links: HashMap::new(), timeout }
    }

    /// A request of publisher `publisher` was routed: each message's
    /// `local` and the links it was forwarded to. Writes its PUB_RESULT now
    /// if nothing waits (no forward, nothing ahead of it), else holds it.
    pub fn request(
        &mut self,
        conns: &mut Conns<Peer>,
        publisher: ConnId,
        request_id: u32,
        msgs: impl Iterator<Item = (bool, Vec<ConnId>)>,
    ) {
        let msgs: Vec<Msg> = msgs
            .map(|(local, links)| {
                let waits = links
                    .into_iter()
                    .map(|l| {
                        let r = self.links.entry(l).or_default();
                        r.want = true;
                        (l, r.next)
                    })
                    .collect();
                Msg { local, waits, confirmed: false }
            })
            .collect();
        let req = Request { request_id, msgs };
        let q = self.queues.entry(publisher).or_default();
        if q.is_empty() && req.done() {
            self.queues.remove(&publisher);
            if let Some(out) = conns.queue(publisher) {
                Frame::PubResult(req.result()).encode(out);
            }
            return;
        }
        q.push_back(req);
    }

    /// End of the turn: one confirmation PING on each link with messages
    /// waiting on its current round.
    pub fn send_pings(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        for (&link, r) in self.links.iter_mut().filter(|(_, r)| r.want) {
            r.want = false;
            if let Some(out) = conns.queue(link) {
                Frame::Ping(NONCE_BIT | r.next).encode(out);
            }
            r.sent.push_back((r.next, now));
            r.next += 1;
        }
    }

    /// A PONG on `link`: if it answers a confirmation PING, every message
    /// waiting on that round or an earlier one is confirmed.
    pub fn pong(&mut self, conns: &mut Conns<Peer>, link: ConnId, nonce: u64) {
        if nonce & NONCE_BIT == 0 {
            return;
        }
        let round = nonce & !NONCE_BIT;
        let Some(r) = self.links.get_mut(&link) else { return };
        while r.sent.front().is_some_and(|&(n, _)| n <= round) {
            r.sent.pop_front();
        }
        for m in self.queues.values_mut().flatten().flat_map(|q| q.msgs.iter_mut()) {
            if m.waits.iter().any(|&(l, n)| l == link && n <= round) {
                m.confirmed = true;
            }
        }
        self.flush(conns);
    }

    /// Link `link` is closing: what waits on it will not be confirmed by it.
    pub fn link_gone(&mut self, conns: &mut Conns<Peer>, link: ConnId) {
        if self.links.remove(&link).is_none() {
            return;
        }
        for m in self.queues.values_mut().flatten().flat_map(|q| q.msgs.iter_mut()) {
            m.waits.retain(|&(l, _)| l != link);
        }
        self.flush(conns);
    }

    /// Publisher `publisher` is closing: its results are not owed any more.
    pub fn publisher_gone(&mut self, publisher: ConnId) {
        self.queues.remove(&publisher);
    }

    /// Declares down (ERROR IDLE_TIMEOUT) every link whose oldest unanswered
    /// confirmation PING is older than the timeout; the close then runs
    /// [`Confirms::link_gone`].
    pub fn expire(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        let late: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, r)| {
                r.sent.front().is_some_and(|&(_, t)| now.saturating_duration_since(t) >= self.timeout)
            })
            .map(|(&l, _)| l)
            .collect();
        for link in late {
            let msg = format!("mesh peer left a PING unanswered for {} ms", self.timeout.as_millis());
            if let Some(peer) = conns.get(link).and_then(|c| c.state.link()) {
                log::warn!("herald node: mesh link to {}: {msg}; declared down", peer.peer_id);
            }
            conns.fail(link, Code::IdleTimeout, &msg, now);
            self.link_gone(conns, link);
        }
    }

    /// Writes every PUB_RESULT now complete at the head of its publisher's queue.
    fn flush(&mut self, conns: &mut Conns<Peer>) {
        self.queues.retain(|&publisher, q| {
            while q.front().is_some_and(Request::done) {
                let req = q.pop_front().unwrap_or_else(|| unreachable!());
                if let Some(out) = conns.queue(publisher) {
                    Frame::PubResult(req.result()).encode(out);
                }
            }
            !q.is_empty()
        });
        // A link with nothing waiting and nothing outstanding needs no entry.
        let waiting: std::collections::HashSet<ConnId> = self
            .queues
            .values()
            .flatten()
            .flat_map(|q| q.msgs.iter())
            .flat_map(|m| m.waits.iter().map(|w| w.0))
            .collect();
        self.links.retain(|l, r| r.want || !r.sent.is_empty() || waiting.contains(l));
    }
}
