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
//! Publishes without WANT_RESULT take none of this. A pure state machine:
//! no clock of its own (`now` comes in), no sockets (it says which PINGs to
//! send, which PUB_RESULTs are ready and which links to declare down; the
//! caller writes them), so the tests below drive time directly.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::net::ConnId;
use crate::protocol::frame as f;

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

    fn result(&self) -> Done {
        Done {
            refused: false,
            request_id: self.request_id,
            routed: self.msgs.iter().map(|m| (m.local, m.confirmed)).collect(),
        }
    }
}

/// A request whose confirmations are all in: for each message, in order,
/// (queued locally, forwarded and confirmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// Durable mode: the log could not keep some of its messages, so none
    /// of them counts as confirmed (ERROR LOG_UNAVAILABLE, HTTP 503).
    pub refused: bool,
    /// The request's id (PUB_RESULT's `request_id`).
    pub request_id: u32,
    /// Per message: (local, forwarded).
    pub routed: Vec<(bool, bool)>,
}

impl Done {
    /// Its PUB_RESULT (protocol.md §5.5).
    pub fn pub_result(&self) -> f::PubResult {
        let n = |p: &dyn Fn(&(bool, bool)) -> bool| self.routed.iter().filter(|m| p(m)).count() as u16;
        f::PubResult {
            request_id: self.request_id,
            accepted: self.routed.len() as u16,
            local: n(&|m| m.0),
            forwarded: n(&|m| m.1),
            no_route: n(&|m| !m.0 && !m.1),
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
    /// `local` and the links it was forwarded to. Its PUB_RESULT, if it can
    /// be written now (nothing to confirm, nothing ahead of it); else it is
    /// held.
    pub fn request(
        &mut self,
        publisher: ConnId,
        request_id: u32,
        msgs: impl Iterator<Item = (bool, Vec<ConnId>)>,
    ) -> Option<Done> {
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
        match self.queues.get_mut(&publisher) {
            None if req.done() => Some(req.result()),
            None => {
                self.queues.insert(publisher, VecDeque::from([req]));
                None
            }
            Some(q) => {
                q.push_back(req);
                None
            }
        }
    }

    /// End of the turn: the confirmation PINGs to send, (link, nonce): one
    /// on each link with messages waiting on its current round.
    pub fn pings(&mut self, now: Instant) -> Vec<(ConnId, u64)> {
        let mut out = Vec::new();
        for (&link, r) in self.links.iter_mut().filter(|(_, r)| r.want) {
            r.want = false;
            out.push((link, NONCE_BIT | r.next));
            r.sent.push_back((r.next, now));
            r.next += 1;
        }
        out
    }

    /// A PONG on `link`: if it answers a confirmation PING, every message
    /// waiting on that round or an earlier one is confirmed.
    /// Adds the PUB_RESULTs it completes to `ready`, (publisher, result).
    pub fn pong(&mut self, link: ConnId, nonce: u64, ready: &mut Vec<(ConnId, Done)>) {
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
        self.flush(ready);
    }

    /// Link `link` is closing: what waits on it will not be confirmed by it.
    /// Adds the PUB_RESULTs that completes to `ready`.
    pub fn link_gone(&mut self, link: ConnId, ready: &mut Vec<(ConnId, Done)>) {
        if self.links.remove(&link).is_none() {
            return;
        }
        for m in self.queues.values_mut().flatten().flat_map(|q| q.msgs.iter_mut()) {
            m.waits.retain(|&(l, _)| l != link);
        }
        self.flush(ready);
    }

    /// Publisher `publisher` is closing: its results are not owed any more.
    pub fn publisher_gone(&mut self, publisher: ConnId) {
        self.queues.remove(&publisher);
    }

    /// The links to declare down at `now`: their oldest unanswered
    /// confirmation PING is older than the timeout. The caller closes each
    /// (ERROR IDLE_TIMEOUT), and the close runs [`Confirms::link_gone`].
    pub fn late(&self, now: Instant) -> Vec<ConnId> {
        let late = |r: &Rounds| {
            r.sent.front().is_some_and(|&(_, t)| now.saturating_duration_since(t) >= self.timeout)
        };
        self.links.iter().filter(|(_, r)| late(r)).map(|(&l, _)| l).collect()
    }

    /// The forward timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Moves every PUB_RESULT now complete at the head of its publisher's
    /// queue to `ready`.
    fn flush(&mut self, ready: &mut Vec<(ConnId, Done)>) {
        self.queues.retain(|&publisher, q| {
            while let Some(req) = q.pop_front() {
                if !req.done() {
                    q.push_front(req);
                    break;
                }
                ready.push((publisher, req.result()));
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

#[cfg(test)]
mod tests {
    use super::*;

    const P: ConnId = ConnId(1);
    const L1: ConnId = ConnId(10);
    const L2: ConnId = ConnId(11);
    const T: Duration = Duration::from_secs(2);

    fn res(id: u32, accepted: u16, local: u16, forwarded: u16, no_route: u16) -> f::PubResult {
        f::PubResult { request_id: id, accepted, local, forwarded, no_route }
    }

    /// The PUB_RESULTs of `ready`.
    fn prs(ready: &[(ConnId, Done)]) -> Vec<(ConnId, f::PubResult)> {
        ready.iter().map(|(c, d)| (*c, d.pub_result())).collect()
    }

    #[test]
    fn nothing_forwarded_is_answered_at_once_and_sends_no_ping() {
        let mut c = Confirms::new(T);
        assert_eq!(
            c.request(P, 1, [(true, vec![])].into_iter()).map(|d| d.pub_result()),
            Some(res(1, 1, 1, 0, 0))
        );
        assert_eq!(
            c.request(P, 2, [(false, vec![])].into_iter()).map(|d| d.pub_result()),
            Some(res(2, 1, 0, 0, 1))
        );
        assert!(c.pings(Instant::now()).is_empty());
    }

    #[test]
    fn a_forward_counts_once_the_pong_to_the_ping_behind_it_arrives() {
        let (mut c, t0, mut ready) = (Confirms::new(T), Instant::now(), Vec::new());
        assert_eq!(c.request(P, 1, [(false, vec![L1])].into_iter()), None);
        let pings = c.pings(t0);
        assert_eq!(pings, vec![(L1, NONCE_BIT)]);
        // A keepalive PONG (no top bit) and a PONG on another link confirm nothing.
        c.pong(L1, 12345, &mut ready);
        c.pong(L2, NONCE_BIT, &mut ready);
        assert!(ready.is_empty());
        c.pong(L1, pings[0].1, &mut ready);
        assert_eq!(prs(&ready), vec![(P, res(1, 1, 0, 1, 0))]);
        assert!(c.late(t0 + T * 10).is_empty(), "nothing outstanding");
    }

    #[test]
    fn a_link_that_does_not_answer_is_late_and_its_messages_are_not_forwarded() {
        let (mut c, t0, mut ready) = (Confirms::new(T), Instant::now(), Vec::new());
        c.request(P, 1, [(true, vec![L1]), (false, vec![L1])].into_iter());
        c.pings(t0);
        assert!(c.late(t0 + T - Duration::from_millis(1)).is_empty());
        assert_eq!(c.late(t0 + T), vec![L1]);
        c.link_gone(L1, &mut ready);
        // One local (queued here), one neither: no_route.
        assert_eq!(prs(&ready), vec![(P, res(1, 2, 1, 0, 1))]);
    }

    #[test]
    fn results_stay_in_request_order_behind_a_held_one() {
        let (mut c, t0, mut ready) = (Confirms::new(T), Instant::now(), Vec::new());
        assert_eq!(c.request(P, 1, [(false, vec![L1])].into_iter()), None);
        assert_eq!(c.request(P, 2, [(true, vec![])].into_iter()), None, "held behind request 1");
        let n = c.pings(t0)[0].1;
        c.pong(L1, n, &mut ready);
        assert_eq!(prs(&ready), vec![(P, res(1, 1, 0, 1, 0)), (P, res(2, 1, 1, 0, 0))]);
    }

    #[test]
    fn a_message_forwarded_to_two_peers_counts_if_either_confirms() {
        let (mut c, t0, mut ready) = (Confirms::new(T), Instant::now(), Vec::new());
        c.request(P, 1, [(false, vec![L1, L2])].into_iter());
        let pings = c.pings(t0);
        assert_eq!(pings.len(), 2);
        c.link_gone(L1, &mut ready);
        assert!(ready.is_empty(), "L2 may still confirm");
        let n2 = pings.iter().find(|p| p.0 == L2).unwrap().1;
        c.pong(L2, n2, &mut ready);
        assert_eq!(prs(&ready), vec![(P, res(1, 1, 0, 1, 0))]);
    }

    #[test]
    fn a_ping_sent_before_a_forward_does_not_confirm_it() {
        let (mut c, t0, mut ready) = (Confirms::new(T), Instant::now(), Vec::new());
        c.request(P, 1, [(false, vec![L1])].into_iter());
        let first = c.pings(t0)[0].1;
        c.request(P, 2, [(false, vec![L1])].into_iter());
        let second = c.pings(t0)[0].1;
        c.pong(L1, first, &mut ready);
        assert_eq!(prs(&ready), vec![(P, res(1, 1, 0, 1, 0))], "request 2 waits for the second round");
        ready.clear();
        c.pong(L1, second, &mut ready);
        assert_eq!(prs(&ready), vec![(P, res(2, 1, 0, 1, 0))]);
    }

    #[test]
    fn a_closed_publisher_is_owed_nothing() {
        let (mut c, t0, mut ready) = (Confirms::new(T), Instant::now(), Vec::new());
        c.request(P, 1, [(false, vec![L1])].into_iter());
        let n = c.pings(t0)[0].1;
        c.publisher_gone(P);
        c.pong(L1, n, &mut ready);
        assert!(ready.is_empty());
    }
}
