//! Durable mode on the event loop (protocol.md §13): what waits on the log
//! thread ([`crate::durable::log`]). Every publish is appended to the log
//! before it is delivered anywhere; each request's PUB_RESULT (HTTP
//! answer, connector reply) is written only once all of its messages are
//! appended, in request order per requester, and a request with a message
//! the log did not keep is refused as a whole ([`Done::refused`]). HELLOs
//! for users whose stream this node cannot serve from its ring wait here
//! for the log's copy of the stream.
//!
//! A pure state machine over tokens: it never touches a socket; the loop
//! sends the [`Request`]s it returns and hands it the [`Answer`]s.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::durable::Request;
use crate::net::ConnId;

use super::confirm::Done;

/// A read of a user's stream after a session opened here is repeated once
/// after this (from any replica), for what the first read may have missed:
/// a replica that was behind, an append that reached nobody and was not
/// kept ([`super::unrouted`]). Late enough to be out of a storm of resumes.
pub const RECHECK: Duration = Duration::from_secs(2);

/// Stop reading publishers (and answer HTTP and connectors busy) while
/// this many payload bytes wait on the log (§5.6: the node never buffers
/// without bound).
pub const MAX_PENDING_BYTES: usize = 64 << 20;
/// ... or this many messages.
pub const MAX_PENDING: usize = 1 << 17;

/// One message of a request: (user, key, payload, queue id or empty,
/// whether the queue redelivered it).
pub type Msg<'m> = (&'m [u8], &'m [u8], &'m [u8], &'m [u8], bool);

/// Who waits on an append.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Nobody (a PUBLISH without WANT_RESULT).
    Nobody,
    /// Message `index` of request `serial` of `requester`.
    Request { requester: ConnId, serial: u64, index: usize },
}

/// A request whose answer waits on the log.
#[derive(Debug)]
struct Req {
    serial: u64,
    request_id: u32,
    routed: Vec<(bool, bool)>,
    missing: usize,
    refused: bool,
}

/// A HELLO waiting for the log's copy of its user's stream.
#[derive(Debug)]
pub struct Parked {
    /// The connection.
    pub id: ConnId,
    /// When it opened (a reused connection id is another connection).
    pub opened: Instant,
    /// The HELLO frame, as read.
    pub bytes: Vec<u8>,
}

/// What waits on the log.
pub struct Journal {
    /// Base of the users' durable epochs (the stream's creation time).
    pub created: u64,
    /// Whether the log takes appends (false from a failed append until the
    /// log thread's probe succeeds).
    pub healthy: bool,
    next_token: u64,
    next_serial: u64,
    /// Appends in flight: who waits on each, and its payload's length.
    appends: HashMap<u64, (Origin, usize)>,
    /// The payload bytes of the appends in flight.
    pending_bytes: usize,
    reqs: HashMap<ConnId, VecDeque<Req>>,
    /// Read tokens → user.
    reads: HashMap<u64, Box<[u8]>>,
    /// Users with a read in flight (at most one each).
    reading: HashMap<Box<[u8]>, u64>,
    /// HELLOs per user waiting for its read.
    pub parked: HashMap<Box<[u8]>, Vec<Parked>>,
    rechecks: VecDeque<(Instant, Box<[u8]>)>,
    /// Requests for the log thread, sent by the loop at the end of the turn.
    pub out: Vec<Request>,
    /// Messages the log did not keep (counted; unconfirmed ones are lost
    /// with this count as their only trace, confirmed ones were refused).
    pub refused: u64,
    /// Appends the log acknowledged.
    pub appended: u64,
    /// Appends that reached no session, kept for a user coming online.
    pub unrouted: super::unrouted::Unrouted,
}

impl Journal {
    /// Waits on the log, whose users' epochs derive from `created`.
    pub fn new(created: u64) -> Journal {
        Journal {
            created,
            healthy: true,
            next_token: 1,
            next_serial: 1,
            appends: HashMap::new(),
            pending_bytes: 0,
            reqs: HashMap::new(),
            reads: HashMap::new(),
            reading: HashMap::new(),
            parked: HashMap::new(),
            rechecks: VecDeque::new(),
            out: Vec::new(),
            refused: 0,
            appended: 0,
            unrouted: super::unrouted::Unrouted::new(),
        }
    }

    /// The durable epoch of `user`'s stream.
    pub fn epoch(&self, user: &[u8]) -> u64 {
        crate::durable::epoch(self.created, user)
    }

    fn append(&mut self, origin: Origin, m: Msg<'_>) {
        let (user, key, payload, id, redelivered) = m;
        let token = self.next_token;
        self.next_token += 1;
        self.appends.insert(token, (origin, payload.len()));
        self.pending_bytes += payload.len();
        self.out.push(Request::Append {
            token,
            user: user.into(),
            key: key.into(),
            payload: payload.to_vec(),
            // A publish has no identity of its own (§13); a queue message
            // has its queue's.
            msg_id: id.into(),
            redelivered,
        });
    }

    /// A message nobody waits on. Dropped (and counted) while the log is down.
    pub fn publish(&mut self, user: &[u8], key: &[u8], payload: &[u8]) {
        if !self.healthy {
            self.refused += 1;
            return;
        }
        self.append(Origin::Nobody, (user, key, payload, b"", false));
    }

    /// A request of `requester` with these messages (user, key, payload,
    /// queue id or empty), answered through [`Journal::appended`] and
    /// [`Journal::not_appended`] in request order. While the log is down it
    /// is refused at once (if nothing is ahead of it, its Done now).
    pub fn request<'m>(
        &mut self,
        requester: ConnId,
        request_id: u32,
        msgs: impl ExactSizeIterator<Item = Msg<'m>>,
    ) -> Vec<(ConnId, Done)> {
        let serial = self.next_serial;
        self.next_serial += 1;
        let n = msgs.len();
        let mut req = Req { serial, request_id, routed: vec![(false, false); n], missing: n, refused: false };
        if !self.healthy {
            self.refused += n as u64;
            req.missing = 0;
            req.refused = true;
        } else {
            for (index, m) in msgs.enumerate() {
                self.append(Origin::Request { requester, serial, index }, m);
            }
        }
        self.reqs.entry(requester).or_default().push_back(req);
        self.ready(requester)
    }

    /// Append `token` was kept and delivered: (queued locally, forwarded).
    pub fn appended(&mut self, token: u64, local: bool, forwarded: bool) -> Vec<(ConnId, Done)> {
        self.appended += 1;
        self.settle(token, |r, i| r.routed[i] = (local, forwarded))
    }

    /// Append `token` was not kept.
    pub fn not_appended(&mut self, token: u64) -> Vec<(ConnId, Done)> {
        self.refused += 1;
        self.settle(token, |r, _| r.refused = true)
    }

    fn settle(&mut self, token: u64, f: impl FnOnce(&mut Req, usize)) -> Vec<(ConnId, Done)> {
        let Some((origin, len)) = self.appends.remove(&token) else { return Vec::new() };
        self.pending_bytes -= len;
        let Origin::Request { requester, serial, index } = origin else { return Vec::new() };
        let Some(r) = self.reqs.get_mut(&requester).and_then(|q| q.iter_mut().find(|r| r.serial == serial))
        else {
            return Vec::new();
        };
        f(r, index);
        r.missing -= 1;
        self.ready(requester)
    }

    /// The answers of `requester` that can go now (the complete ones at
    /// the front of its queue).
    fn ready(&mut self, requester: ConnId) -> Vec<(ConnId, Done)> {
        let mut done = Vec::new();
        let Some(q) = self.reqs.get_mut(&requester) else { return done };
        while q.front().is_some_and(|r| r.missing == 0) {
            let Some(r) = q.pop_front() else { break };
            done.push((requester, Done { refused: r.refused, request_id: r.request_id, routed: r.routed }));
        }
        if q.is_empty() {
            self.reqs.remove(&requester);
        }
        done
    }

    /// `requester` has gone: its answers are not written (its appends
    /// still deliver).
    pub fn requester_gone(&mut self, requester: ConnId) {
        self.reqs.remove(&requester);
    }

    /// Whether so much waits on the log that publishers must wait.
    pub fn backlogged(&self) -> bool {
        self.appends.len() >= MAX_PENDING || self.pending_bytes >= MAX_PENDING_BYTES
    }

    /// Asks the log for `user`'s stream after `after` (`None`: the head
    /// only), unless a read of it is in flight. True if one was sent.
    pub fn read(&mut self, user: &[u8], after: Option<u64>, quick: bool) -> bool {
        if self.reading.contains_key(user) {
            return false;
        }
        let token = self.next_token;
        self.next_token += 1;
        self.reads.insert(token, user.into());
        self.reading.insert(user.into(), token);
        self.out.push(Request::Read { token, user: user.into(), after, quick });
        true
    }

    /// Whether a read of `user` is in flight.
    pub fn is_reading(&self, user: &[u8]) -> bool {
        self.reading.contains_key(user)
    }

    /// Read `token` is answered: the user it was for.
    pub fn read_done(&mut self, token: u64) -> Option<Box<[u8]>> {
        let user = self.reads.remove(&token)?;
        self.reading.remove(&user);
        Some(user)
    }

    /// Parks a HELLO of `user` until its read is answered.
    pub fn park(&mut self, user: &[u8], p: Parked) {
        self.parked.entry(user.into()).or_default().push(p);
    }

    /// Reads `user` again at `now` + [`RECHECK`].
    pub fn recheck(&mut self, user: &[u8], now: Instant) {
        self.rechecks.push_back((now + RECHECK, user.into()));
    }

    /// The users whose recheck is due at `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Box<[u8]>> {
        let mut due = Vec::new();
        while self.rechecks.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, u)) = self.rechecks.pop_front() {
                due.push(u);
            }
        }
        due
    }

    /// When the next recheck is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.rechecks.front().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> Journal {
        Journal::new(1)
    }

    fn tokens(j: &mut Journal) -> Vec<u64> {
        j.out
            .drain(..)
            .filter_map(|r| match r {
                Request::Append { token, .. } => Some(token),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn answers_wait_for_every_append_and_keep_request_order() {
        let mut j = journal();
        let p = ConnId(3);
        let m: [Msg<'_>; 2] = [(b"u1", b"", b"a", b"", false), (b"u2", b"", b"b", b"", false)];
        assert!(j.request(p, 10, m.into_iter()).is_empty());
        assert!(j.request(p, 11, m[..1].iter().copied()).is_empty());
        let t = tokens(&mut j);
        assert_eq!(t.len(), 3);
        // The second request's only append comes back first: it waits.
        assert!(j.appended(t[2], true, false).is_empty());
        assert!(j.appended(t[0], true, false).is_empty());
        let done = j.appended(t[1], false, true);
        assert_eq!(done.len(), 2);
        assert_eq!(
            done[0].1,
            Done { refused: false, request_id: 10, routed: vec![(true, false), (false, true)] }
        );
        assert_eq!(done[1].1.request_id, 11);
    }

    #[test]
    fn a_message_not_kept_refuses_its_request_and_a_down_log_refuses_at_once() {
        let mut j = journal();
        let p = ConnId(1);
        let m: [Msg<'_>; 2] = [(b"u1", b"", b"a", b"", false), (b"u1", b"", b"b", b"", false)];
        j.request(p, 1, m.into_iter());
        let t = tokens(&mut j);
        assert!(j.appended(t[0], true, false).is_empty());
        let done = j.not_appended(t[1]);
        assert!(done[0].1.refused);
        j.healthy = false;
        let done = j.request(p, 2, m.into_iter());
        assert!(done[0].1.refused && j.out.is_empty());
        j.publish(b"u1", b"", b"x");
        assert!(j.out.is_empty());
        assert_eq!(j.refused, 4);
    }

    #[test]
    fn what_waits_on_the_log_is_bounded_in_bytes() {
        let mut j = journal();
        let big = vec![0u8; 1 << 16];
        let n = MAX_PENDING_BYTES / big.len();
        for _ in 0..n - 1 {
            j.publish(b"u1", b"", &big);
        }
        assert!(!j.backlogged());
        j.publish(b"u1", b"", &big);
        assert!(j.backlogged(), "{n} payloads of 64 KiB wait: publishers must wait");
        let t = tokens(&mut j);
        assert!(j.appended(t[0], true, false).is_empty());
        assert!(!j.backlogged(), "one answered: room again");
    }

    #[test]
    fn a_gone_requester_gets_nothing_and_one_read_per_user_is_in_flight() {
        let mut j = journal();
        let m: [Msg<'_>; 1] = [(b"u1", b"", b"a", b"q:1", true)];
        j.request(ConnId(1), 1, m.into_iter());
        let out = std::mem::take(&mut j.out);
        let Request::Append { token, msg_id, .. } = &out[0] else { panic!() };
        assert_eq!(&**msg_id, b"q:1", "a queue id is the log's de-duplication id");
        j.requester_gone(ConnId(1));
        assert!(j.appended(*token, true, false).is_empty());
        assert!(j.read(b"u1", None, true));
        assert!(!j.read(b"u1", Some(3), false));
        let Request::Read { token, .. } = j.out[0] else { panic!() };
        assert_eq!(j.read_done(token).as_deref(), Some(&b"u1"[..]));
        assert!(j.read(b"u1", Some(3), false));
    }
}
