//! Several event loops in one node (`--threads N`): which loop owns a user,
//! the batches that carry messages between loops, and what the ingest loop
//! knows about the users the other loops own.
//!
//! The layout (see also the node's module doc):
//! - Loop 0, the *ingest loop*, owns the listeners, publishers, mesh links,
//!   the metrics endpoint, heartbeats, and a 1/N share of the users.
//! - Loops 1..N own the other users. A user lives on exactly one loop,
//!   [`owner`]`(user)`: all of its sessions, its stream and its retained
//!   messages, so sequencing and retention need no lock.
//! - Clients connect to loop 0. When the HELLO arrives, loop 0 reads the user
//!   id the token claims (the owner verifies the token, as a single loop
//!   would) and, if another loop owns that user, hands it the socket together
//!   with the bytes read so far ([`Inbox::Adopt`]).
//! - A message for another loop's user is appended to that loop's current
//!   batch ([`push`]): one byte buffer, recycled through a return channel,
//!   so there is no allocation per message. At the end of its turn loop 0
//!   sends each non-empty batch and wakes each loop at most once: one wake
//!   per batch, never one per message.
//! - The owners report session and stream changes back ([`HomeEvent`]), so
//!   loop 0 can tell which messages are worth sending at all, answer
//!   PUB_RESULT's `local`, and keep the mesh presence of the whole node.
//! - Back-pressure: the bytes queued toward each loop are counted
//!   ([`Link::backlog`]); over the bound, loop 0 stops reading publishers,
//!   exactly as it does for a backlogged mesh link. TCP does the rest.
//!
//! Nothing here reads a socket or a clock on its own.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use super::fxhash::{FxBuild, FxHasher, UserKey};
use super::metrics::Metrics;
use crate::protocol::PresenceOp;

/// The loop that owns `user` among `n` loops.
///
/// Uses the high half of the Fx hash, so the users of one loop still spread
/// over all the buckets of that loop's maps (which index by the low bits).
pub fn owner(user: &[u8], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let mut h = FxHasher::default();
    h.write(user);
    (((h.finish() >> 32) * n as u64) >> 32) as usize
}

/// Appends one message to a batch.
pub fn push(batch: &mut Vec<u8>, user: &[u8], key: &[u8], payload: &[u8]) {
    // User ids and keys are at most 255 bytes and payloads at most 64 KiB
    // (checked by the codec before they get here).
    batch.push(user.len() as u8);
    batch.extend_from_slice(user);
    batch.push(key.len() as u8);
    batch.extend_from_slice(key);
    batch.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    batch.extend_from_slice(payload);
}

/// The messages of a batch, in order: (user, key, payload).
pub fn messages(mut batch: &[u8]) -> impl Iterator<Item = (&[u8], &[u8], &[u8])> {
    std::iter::from_fn(move || {
        let (&ulen, rest) = batch.split_first()?;
        let (user, rest) = rest.split_at(ulen as usize);
        let (&klen, rest) = rest.split_first()?;
        let (key, rest) = rest.split_at(klen as usize);
        let (len, rest) = rest.split_at(4);
        let plen = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (payload, rest) = rest.split_at(plen);
        batch = rest;
        Some((user, key, payload))
    })
}

/// What loop 0 sends to another loop.
pub enum Inbox {
    /// Take over this client connection: its HELLO (and anything after it)
    /// is in `bytes`, not yet processed.
    Adopt {
        /// The connection (plain or TLS), already deregistered from loop 0.
        sock: crate::net::Transport,
        /// Bytes read so far, starting with the HELLO frame.
        bytes: Vec<u8>,
        /// When the connection was accepted (the handshake deadline's base).
        opened: Instant,
        /// The user the token claims (not yet verified).
        user: Box<[u8]>,
    },
    /// Messages for users this loop owns ([`messages`] reads them).
    Msgs {
        /// The batch; send it back for reuse once processed.
        buf: Vec<u8>,
        /// When loop 0 started the turn that read the first of them.
        since: Instant,
    },
}

/// What happened to a user on its owner loop, reported to loop 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A handed-over session completed its handshake.
    Attached,
    /// A handed-over session failed its handshake.
    Refused,
    /// An established session ended.
    Detached,
    /// The user's stream passed its grace period and was forgotten.
    Forgotten,
}

/// One report from an owner loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeEvent {
    /// The user.
    pub user: Box<[u8]>,
    /// What happened.
    pub change: Change,
    /// Whether the owner still holds the user's stream afterwards.
    pub known: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Home {
    /// Sessions handed over and not yet reported back.
    pending: u32,
    /// Established sessions.
    sessions: u32,
    /// The owner holds the user's stream (online or within grace).
    known: bool,
}

impl Home {
    /// Whether peers should hear the user is here: it has a session, or
    /// (unless the node is draining) a stream in its grace period.
    fn present(&self, draining: bool) -> bool {
        self.sessions > 0 || (self.known && !draining)
    }
}

/// Loop 0's view of the users that other loops own.
///
/// A user is entered when loop 0 hands over a session for it and leaves once
/// its owner reports it forgotten with nothing in flight. Reports arrive in
/// the order the owner made them, after the hand-overs they answer, so the
/// view is never ahead of the owner; it may lag by one turn.
#[derive(Default)]
pub struct Homes {
    map: HashMap<UserKey, Home, FxBuild>,
}

/// Where loop 0 should send a message for another loop's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The owner has no stream for the user: nothing to send.
    Unknown,
    /// Send it; `online` says whether the user has an established session.
    Send {
        /// At least one established session (PUB_RESULT `local`).
        online: bool,
    },
}

impl Homes {
    /// A session for `user` is being handed to its owner.
    pub fn handed_over(&mut self, user: &[u8]) {
        match self.map.get_mut(user) {
            Some(h) => h.pending += 1,
            None => {
                self.map.insert(user.into(), Home { pending: 1, ..Home::default() });
            }
        }
    }

    /// Applies a report; returns the presence change the whole node sees
    /// (protocol.md §6.4): ONLINE when the user's first session arrives,
    /// OFFLINE when its stream is gone (forgotten after the grace period),
    /// or, if `draining`, when its last session leaves (its clients are
    /// moving to other nodes and will not resume here).
    pub fn apply(&mut self, ev: HomeEvent, draining: bool) -> Option<(PresenceOp, Box<[u8]>)> {
        let h = self.map.get_mut(&*ev.user)?;
        let before = h.present(draining);
        match ev.change {
            Change::Attached => {
                h.pending = h.pending.saturating_sub(1);
                h.sessions += 1;
            }
            Change::Refused => h.pending = h.pending.saturating_sub(1),
            Change::Detached => h.sessions = h.sessions.saturating_sub(1),
            Change::Forgotten => {}
        }
        h.known = ev.known;
        let after = h.present(draining);
        if h.pending == 0 && h.sessions == 0 && !h.known {
            self.map.remove(&*ev.user);
        }
        match (before, after) {
            (false, true) => Some((PresenceOp::Online, ev.user)),
            (true, false) => Some((PresenceOp::Offline, ev.user)),
            _ => None,
        }
    }

    /// Whether to send a message for `user` to its owner.
    pub fn route(&self, user: &[u8]) -> Route {
        match self.map.get(user) {
            Some(h) if h.known || h.pending > 0 || h.sessions > 0 => Route::Send { online: h.sessions > 0 },
            _ => Route::Unknown,
        }
    }

    /// Users another loop holds a stream for (a session, or within grace):
    /// the ones presence announces ONLINE (§6.4; while draining, only those
    /// with a session).
    pub fn online(&self, draining: bool) -> impl Iterator<Item = &[u8]> {
        self.map.iter().filter(move |(_, h)| h.present(draining)).map(|(u, _)| u.as_bytes())
    }

    /// Users another loop holds a stream for without a session (in grace).
    pub fn in_grace(&self) -> impl Iterator<Item = &[u8]> {
        self.map.iter().filter(|(_, h)| h.sessions == 0 && h.known).map(|(u, _)| u.as_bytes())
    }

    /// Whether no user is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What each loop publishes for loop 0 to merge into `/metrics`, the log
/// line and heartbeats (counters every 100 ms, the histogram and queue depths
/// about once a second; never on the delivery path).
#[derive(Default)]
pub struct Stats {
    /// The loop's counters.
    pub m: Metrics,
    /// Pending output bytes of each of its client sessions.
    pub depths: Vec<u64>,
    /// Users it knows.
    pub users: usize,
}

/// State every loop of a node shares.
pub struct Shared {
    /// Loops in the node.
    pub n: usize,
    /// Client connections open (handshaking or established) on all loops:
    /// the admission check against `--capacity`.
    pub clients: AtomicUsize,
    /// An admin has drained this node (loop 0 learns it; all loops act).
    pub admin_draining: AtomicBool,
    /// Loops 1..N still running.
    pub running: AtomicUsize,
    /// The id of a loop 1..N that ended by panic or error (0: none). Its
    /// users can no longer be served, so loop 0 drains the node and the
    /// process exits non-zero.
    pub failed: AtomicUsize,
    /// Stats of loops 1..N (index `id - 1`).
    pub stats: Vec<Mutex<Stats>>,
}

impl Shared {
    /// Shared state for `n` loops.
    pub fn new(n: usize) -> Shared {
        Shared {
            n,
            clients: AtomicUsize::new(0),
            admin_draining: AtomicBool::new(false),
            running: AtomicUsize::new(n.saturating_sub(1)),
            failed: AtomicUsize::new(0),
            stats: (1..n).map(|_| Mutex::new(Stats::default())).collect(),
        }
    }

    /// Counts a client connection opened.
    pub fn client_opened(&self) {
        self.clients.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client connection closed.
    pub fn client_closed(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Loop 0's channel to one other loop.
pub struct Link {
    /// Where batches and hand-overs go.
    pub tx: Sender<Inbox>,
    /// Wakes the loop.
    pub waker: Arc<Waker>,
    /// Bytes sent and not yet processed by the loop.
    pub in_flight: Arc<AtomicUsize>,
    /// This turn's messages for the loop.
    pub batch: Vec<u8>,
    /// When the turn that started `batch` began.
    pub since: Option<Instant>,
    /// Something was sent this turn: wake the loop at the end of it.
    pub wake: bool,
}

impl Link {
    /// Bytes queued toward the loop: sent but unprocessed, plus this turn's.
    pub fn backlog(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed) + self.batch.len()
    }
}

/// Loop 0's side: one [`Link`] per other loop, the users they own, the
/// owners' reports and the batch buffers they give back.
pub struct Router {
    /// Links to loops 1..N (index `id - 1`).
    pub links: Vec<Link>,
    /// Users owned by other loops.
    pub homes: Homes,
    /// Reports from the owners.
    pub events: Receiver<Vec<HomeEvent>>,
    /// Processed batches coming back for reuse.
    pub free: Receiver<Vec<u8>>,
}

impl Router {
    /// Appends a message for loop `id`'s user to this turn's batch.
    pub fn queue(&mut self, id: usize, user: &[u8], key: &[u8], payload: &[u8], turn: Instant) {
        let free = &self.free;
        let l = &mut self.links[id - 1];
        if l.batch.capacity() == 0 {
            l.batch = free.try_recv().unwrap_or_default();
            l.batch.clear();
        }
        if l.since.is_none() {
            l.since = Some(turn);
        }
        push(&mut l.batch, user, key, payload);
    }

    /// Hands a client connection to loop `id`; gives the message back if
    /// that loop is gone.
    pub fn hand_over(&mut self, id: usize, msg: Inbox) -> Result<(), Inbox> {
        let l = &mut self.links[id - 1];
        l.tx.send(msg).map_err(|e| e.into_inner())?;
        l.wake = true;
        Ok(())
    }

    /// End of turn: sends every non-empty batch and wakes each loop that got
    /// anything, once.
    pub fn flush(&mut self) {
        for l in &mut self.links {
            if !l.batch.is_empty() {
                let buf = std::mem::take(&mut l.batch);
                let len = buf.len();
                let since = l.since.take().unwrap_or_else(Instant::now);
                l.in_flight.fetch_add(len, Ordering::Relaxed);
                if l.tx.send(Inbox::Msgs { buf, since }).is_ok() {
                    l.wake = true;
                } else {
                    l.in_flight.fetch_sub(len, Ordering::Relaxed);
                }
            }
            if std::mem::take(&mut l.wake) {
                let _ = l.waker.wake();
            }
        }
    }

    /// Whether any loop has more than `limit` bytes queued toward it.
    pub fn backlogged(&self, limit: usize) -> bool {
        self.links.iter().any(|l| l.backlog() > limit)
    }
}

/// What one event loop is in its node.
pub enum Role {
    /// The only loop: owns every user, the listeners and the mesh.
    Single,
    /// Loop 0 of several: owns the listeners, publishers, mesh links and a
    /// share of the users, and routes the rest to their owners.
    Router(Router),
    /// Loops 1..N: own their share of the users; everything reaches them
    /// through loop 0.
    Owner(Owner),
}

impl Role {
    /// Loop 0 of several: the way to the other loops.
    #[inline]
    pub fn router(&mut self) -> Option<&mut Router> {
        match self {
            Role::Router(r) => Some(r),
            _ => None,
        }
    }

    /// Loops 1..N: the inbox and the way back.
    pub fn owner(&mut self) -> Option<&mut Owner> {
        match self {
            Role::Owner(o) => Some(o),
            _ => None,
        }
    }

    /// Whether this loop is one of loops 1..N.
    pub fn is_owner(&self) -> bool {
        matches!(self, Role::Owner(_))
    }
}

/// The side of loops 1..N: their inbox and the way back to loop 0.
pub struct Owner {
    /// Batches and hand-overs from loop 0.
    pub inbox: Receiver<Inbox>,
    /// Bytes loop 0 sent that this loop has not processed yet.
    pub in_flight: Arc<AtomicUsize>,
    /// Gives processed batches back.
    pub free: Sender<Vec<u8>>,
    /// Reports to loop 0.
    pub events_tx: Sender<Vec<HomeEvent>>,
    /// Wakes loop 0.
    pub router_waker: Arc<Waker>,
    /// This turn's reports.
    pub events: Vec<HomeEvent>,
}

impl Owner {
    /// Records a report for loop 0.
    pub fn report(&mut self, user: &[u8], change: Change, known: bool) {
        self.events.push(HomeEvent { user: user.into(), change, known });
    }

    /// End of turn: sends this turn's reports with one wake.
    pub fn flush(&mut self) {
        if self.events.is_empty() {
            return;
        }
        if self.events_tx.send(std::mem::take(&mut self.events)).is_ok() {
            let _ = self.router_waker.wake();
        }
    }

    /// A batch is processed: count it off and give the buffer back.
    pub fn done(&self, buf: Vec<u8>) {
        self.in_flight.fetch_sub(buf.len(), Ordering::Relaxed);
        let _ = self.free.send(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_users_evenly_and_stably() {
        for n in [2usize, 3, 4, 8] {
            let mut count = vec![0usize; n];
            for i in 0..20_000 {
                let u = format!("u{i}");
                let o = owner(u.as_bytes(), n);
                assert_eq!(o, owner(u.as_bytes(), n), "stable");
                count[o] += 1;
            }
            let even = 20_000 / n;
            for c in &count {
                assert!(c.abs_diff(even) < even / 10, "n={n}: {count:?}");
            }
        }
        assert_eq!(owner(b"anyone", 1), 0);
    }

    #[test]
    fn batches_round_trip_in_order() {
        let mut b = Vec::new();
        push(&mut b, b"alice", b"", b"one");
        push(&mut b, b"bob", b"EURUSD", b"");
        push(&mut b, &[b'x'; 255], &[b'k'; 64], &[7u8; 70_000][..65_536]);
        let got: Vec<(Vec<u8>, Vec<u8>, usize)> =
            messages(&b).map(|(u, k, p)| (u.to_vec(), k.to_vec(), p.len())).collect();
        assert_eq!(
            got,
            vec![
                (b"alice".to_vec(), vec![], 3),
                (b"bob".to_vec(), b"EURUSD".to_vec(), 0),
                (vec![b'x'; 255], vec![b'k'; 64], 65_536)
            ]
        );
    }

    fn ev(user: &[u8], change: Change, known: bool) -> HomeEvent {
        HomeEvent { user: user.into(), change, known }
    }

    #[test]
    fn homes_follow_the_owners_reports() {
        let mut h = Homes::default();
        assert_eq!(h.route(b"a"), Route::Unknown);
        h.handed_over(b"a");
        assert_eq!(h.route(b"a"), Route::Send { online: false }, "a session is on its way");
        assert_eq!(
            h.apply(ev(b"a", Change::Attached, true), false),
            Some((PresenceOp::Online, b"a"[..].into()))
        );
        assert_eq!(h.route(b"a"), Route::Send { online: true });
        h.handed_over(b"a");
        assert_eq!(h.apply(ev(b"a", Change::Attached, true), false), None, "second session");
        assert_eq!(h.apply(ev(b"a", Change::Detached, true), false), None);
        // The last session left, but the stream is kept for the grace
        // period: peers keep forwarding to it (§6.4).
        assert_eq!(h.apply(ev(b"a", Change::Detached, true), false), None);
        assert_eq!(h.route(b"a"), Route::Send { online: false }, "retained within grace");
        assert_eq!(h.online(false).count(), 1, "in the snapshot while in grace");
        assert_eq!(h.online(true).count(), 0, "but not from a draining node");
        assert_eq!(
            h.apply(ev(b"a", Change::Forgotten, false), false),
            Some((PresenceOp::Offline, b"a"[..].into()))
        );
        assert_eq!(h.route(b"a"), Route::Unknown);
        assert!(h.is_empty());
    }

    #[test]
    fn a_draining_node_says_offline_when_the_last_session_leaves() {
        let mut h = Homes::default();
        h.handed_over(b"a");
        h.apply(ev(b"a", Change::Attached, true), true);
        assert_eq!(
            h.apply(ev(b"a", Change::Detached, true), true),
            Some((PresenceOp::Offline, b"a"[..].into()))
        );
        assert_eq!(h.apply(ev(b"a", Change::Forgotten, false), true), None, "said once");
    }

    #[test]
    fn a_refused_stranger_leaves_nothing_behind_but_a_known_user_stays() {
        let mut h = Homes::default();
        h.handed_over(b"mallory");
        h.apply(ev(b"mallory", Change::Refused, false), false);
        assert!(h.is_empty());
        h.handed_over(b"a");
        h.apply(ev(b"a", Change::Attached, true), false);
        h.apply(ev(b"a", Change::Detached, true), false);
        h.handed_over(b"a");
        h.apply(ev(b"a", Change::Refused, true), false);
        assert_eq!(h.route(b"a"), Route::Send { online: false });
    }

    #[test]
    fn forgotten_while_a_session_is_in_flight_keeps_the_user() {
        let mut h = Homes::default();
        h.handed_over(b"a");
        h.apply(ev(b"a", Change::Attached, true), false);
        h.apply(ev(b"a", Change::Detached, true), false);
        h.handed_over(b"a"); // crosses the owner's sweep
        h.apply(ev(b"a", Change::Forgotten, false), false);
        assert_eq!(h.route(b"a"), Route::Send { online: false });
        h.apply(ev(b"a", Change::Attached, true), false);
        assert_eq!(h.route(b"a"), Route::Send { online: true });
        assert_eq!(h.online(false).count(), 1);
    }
}
