//! Who is connected: users, their sessions and their message streams.
//!
//! Each user known to the node has one stream (a random epoch and a
//! sequence counter) shared by all of its sessions, plus its retained
//! messages. A user with no session is kept for the grace period so that a
//! reconnect can resume, then forgotten. This module decides resume results
//! (protocol.md §3.2); it has no sockets and takes `now` from the caller.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use slab::Slab;

use super::fxhash::UserKey;
use super::retention::{LogLimits, Ring, UserLog};
use crate::protocol::frame::{deliver_len, encode_deliver};
use crate::protocol::{Position, ResumeResult};

/// Index of a user in the registry.
pub type UserIdx = usize;

/// One user known to this node.
pub struct User {
    /// The user id.
    pub id: Box<[u8]>,
    /// This node's stream epoch for the user.
    pub epoch: u64,
    /// Seq of the last message assigned (0: none yet).
    pub head: u64,
    log: UserLog,
    /// Connection keys of the user's sessions.
    pub sessions: Vec<usize>,
    idle_since: Option<Instant>,
    /// Durable mode: the highest seq heard of beyond `head + 1` (messages
    /// between are to be read from the log).
    pub want: u64,
}

/// What [`Registry::attach`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attach {
    /// The user's index.
    pub user: UserIdx,
    /// The resume outcome for the WELCOME.
    pub result: ResumeResult,
    /// The stream epoch.
    pub epoch: u64,
    /// The seq the session's next DELIVER carries.
    pub next_seq: u64,
    /// Replay retained messages from this seq, if any are owed.
    pub replay_from: Option<u64>,
    /// Whether this is the user's only session (the user just came online).
    pub first_session: bool,
}

/// Bounds and timing of the registry.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Per-user retention bounds.
    pub log: LogLimits,
    /// Total retention, bytes.
    pub ring_bytes: usize,
    /// How long a user without sessions is remembered.
    pub grace: Duration,
}

/// Users, sessions, streams and retention.
pub struct Registry {
    by_id: HashMap<UserKey, UserIdx, super::fxhash::FxBuild>,
    users: Slab<User>,
    ring: Ring,
    cfg: RegistryConfig,
    frame: Vec<u8>,
    rng: u64,
}

impl Registry {
    /// An empty registry; `seed` makes epochs unpredictable across restarts.
    pub fn new(cfg: RegistryConfig, seed: u64) -> Registry {
        Registry {
            by_id: HashMap::default(),
            users: Slab::new(),
            ring: Ring::new(cfg.ring_bytes),
            cfg,
            frame: Vec::with_capacity(deliver_len(crate::protocol::limits::MAX_PAYLOAD)),
            rng: seed | 1,
        }
    }

    fn next_epoch(&mut self) -> u64 {
        // splitmix64: epochs only need to differ, never be 0.
        loop {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z != 0 {
                return z;
            }
        }
    }

    /// Adds session `conn` for `user`, deciding the resume outcome.
    pub fn attach(&mut self, user: &[u8], conn: usize, resume: Option<Position>) -> Attach {
        let idx = match self.by_id.get(user) {
            Some(&i) => i,
            None => {
                let epoch = self.next_epoch();
                let i = self.users.insert(User {
                    id: user.into(),
                    epoch,
                    head: 0,
                    log: UserLog::default(),
                    sessions: Vec::with_capacity(1),
                    idle_since: None,
                    want: 0,
                });
                self.by_id.insert(user.into(), i);
                i
            }
        };
        let u = &mut self.users[idx];
        u.sessions.push(conn);
        u.idle_since = None;
        let live = u.head + 1;
        let (result, next_seq, replay_from) = match resume {
            None => (ResumeResult::Fresh, live, None),
            Some(p) if p.epoch != u.epoch || p.seq > u.head => (ResumeResult::Restarted, live, None),
            Some(p) if p.seq == u.head => (ResumeResult::Resumed, live, None),
            Some(p) => match u.log.first_live(&self.ring) {
                Some(first) if first <= p.seq + 1 => (ResumeResult::Resumed, p.seq + 1, Some(p.seq + 1)),
                Some(first) => (ResumeResult::Gap, first, Some(first)),
                None => (ResumeResult::Gap, live, None),
            },
        };
        let first_session = u.sessions.len() == 1;
        Attach { user: idx, result, epoch: u.epoch, next_seq, replay_from, first_session }
    }

    /// Durable mode: a user whose stream the log holds up to `head` (its
    /// epoch the same on every node), with no session yet.
    pub fn insert_durable(&mut self, user: &[u8], epoch: u64, head: u64, now: Instant) -> UserIdx {
        if let Some(&i) = self.by_id.get(user) {
            return i;
        }
        let i = self.users.insert(User {
            id: user.into(),
            epoch,
            head,
            log: UserLog::default(),
            sessions: Vec::new(),
            idle_since: Some(now),
            want: 0,
        });
        self.by_id.insert(user.into(), i);
        i
    }

    /// Durable mode: the log no longer holds the messages up to `head`
    /// (its limits dropped them): the stream goes on after it.
    pub fn skip_to(&mut self, user: UserIdx, head: u64) {
        if let Some(u) = self.users.get_mut(user) {
            if head > u.head {
                u.head = head;
                u.log.clear();
            }
        }
    }

    /// Durable mode: a message at `seq` was heard of beyond `head + 1`.
    pub fn want(&mut self, user: UserIdx, seq: u64) {
        if let Some(u) = self.users.get_mut(user) {
            u.want = u.want.max(seq);
        }
    }

    /// Whether a session resuming from `resume` can be served from what is
    /// here (the log need not be read): no position, another epoch (it is
    /// RESTARTED), the head itself, or a position the ring still holds.
    pub fn can_serve(&mut self, user: UserIdx, resume: Option<Position>) -> bool {
        let Some(u) = self.users.get_mut(user) else { return false };
        match resume {
            None => true,
            Some(p) if p.epoch != u.epoch => true,
            Some(p) if p.seq > u.head => false,
            Some(p) if p.seq == u.head => true,
            Some(p) => u.log.first_live(&self.ring).is_some_and(|first| first <= p.seq + 1),
        }
    }

    /// Appends retained DELIVER frames from `from` to `out`; returns how many.
    pub fn replay(&self, user: UserIdx, from: u64, out: &mut Vec<u8>) -> usize {
        self.users.get(user).map_or(0, |u| u.log.replay(&self.ring, from, out))
    }

    /// Removes session `conn` of `user`; the user is kept for the grace
    /// period. Returns the user id if that was its last session (the user
    /// just went offline).
    pub fn detach(&mut self, user: UserIdx, conn: usize, now: Instant) -> Option<&[u8]> {
        let u = self.users.get_mut(user)?;
        let before = u.sessions.len();
        u.sessions.retain(|&c| c != conn);
        if u.sessions.is_empty() && before > 0 {
            u.idle_since = Some(now);
            return Some(&u.id);
        }
        None
    }

    /// Looks a user up by id.
    pub fn find(&self, user: &[u8]) -> Option<UserIdx> {
        self.by_id.get(user).copied()
    }

    /// Assigns the next seq of `user`'s stream to `payload`, retains it, and
    /// returns the encoded DELIVER frame (valid until the next call) along
    /// with the user's sessions.
    pub fn publish(&mut self, user: UserIdx, payload: &[u8]) -> Option<(&[u8], &[usize])> {
        let u = self.users.get_mut(user)?;
        u.head += 1;
        self.frame.clear();
        encode_deliver(&mut self.frame, u.epoch, u.head, payload);
        match self.ring.push(&self.frame) {
            Some(pos) => {
                u.log.append(u.head, pos, self.frame.len(), self.cfg.log);
                // Entries whose bytes the ring has overwritten are gone
                // anyway: drop them now, so a user's index holds about what
                // the ring holds for it, not --retain-count entries (16 KiB
                // per user) kept until its next resume. Each entry is
                // dropped once: O(1) per message, amortized.
                u.log.first_live(&self.ring);
            }
            None => u.log.clear(),
        }
        Some((&self.frame, &u.sessions))
    }

    /// A user's record.
    pub fn user(&self, user: UserIdx) -> Option<&User> {
        self.users.get(user)
    }

    /// Forgets users that have had no session for the grace period, telling
    /// `forgotten` each id; returns how many were forgotten.
    pub fn sweep(&mut self, now: Instant, mut forgotten: impl FnMut(&[u8])) -> usize {
        let grace = self.cfg.grace;
        let expired: Vec<UserIdx> = self
            .users
            .iter()
            .filter(|(_, u)| u.idle_since.is_some_and(|t| now.saturating_duration_since(t) >= grace))
            .map(|(i, _)| i)
            .collect();
        for &i in &expired {
            let u = self.users.remove(i);
            self.by_id.remove(&*u.id);
            forgotten(&u.id);
        }
        expired.len()
    }

    /// Users known (online or within grace).
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Users with a stream here but no session (within grace).
    pub fn idle(&self) -> impl Iterator<Item = &[u8]> {
        self.users.iter().filter(|(_, u)| u.sessions.is_empty()).map(|(_, u)| &u.id[..])
    }

    /// Users whose stream is held here (a session, or within grace): the
    /// ones presence announces ONLINE (protocol.md §6.4). While draining,
    /// only those with a session.
    pub fn online(&self, draining: bool) -> impl Iterator<Item = &[u8]> {
        self.users.iter().filter(move |(_, u)| !draining || !u.sessions.is_empty()).map(|(_, u)| &u.id[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, Channel, Decoded, Frame};

    fn reg() -> Registry {
        Registry::new(
            RegistryConfig {
                log: LogLimits { max_count: 3, max_bytes: 1 << 20 },
                ring_bytes: 1 << 16,
                grace: Duration::from_secs(30),
            },
            42,
        )
    }

    fn seqs(mut b: &[u8]) -> Vec<u64> {
        let mut v = Vec::new();
        while let Ok(Decoded::Frame(Frame::Deliver(d), n)) = decode(b, Channel::ToClient) {
            v.push(d.seq);
            b = &b[n..];
        }
        v
    }

    #[test]
    fn a_users_index_forgets_what_the_ring_overwrote() {
        // The soak's slow RSS growth: alice's index kept every entry up to
        // retain-count although other users' traffic had overwritten them
        // in the ring.
        let mut r = Registry::new(
            RegistryConfig {
                log: LogLimits { max_count: 1024, max_bytes: 1 << 20 },
                ring_bytes: 1 << 14,
                grace: Duration::from_secs(30),
            },
            42,
        );
        let a = r.attach(b"alice", 1, None);
        let b = r.attach(b"bob", 2, None);
        for _ in 0..100 {
            r.publish(a.user, &[1u8; 100]);
        }
        // 16 KiB of bob's frames overwrite all of alice's.
        for _ in 0..200 {
            r.publish(b.user, &[2u8; 100]);
        }
        r.publish(a.user, &[1u8; 100]);
        assert_eq!(r.users[a.user].log.len(), 1, "only the newest is still in the ring");
        assert!(r.users[b.user].log.len() <= (1 << 14) / 121 + 1);
    }

    #[test]
    fn fresh_then_resume_exactly_the_missed_messages() {
        let mut r = reg();
        let a = r.attach(b"alice", 1, None);
        assert_eq!((a.result, a.next_seq, a.replay_from), (ResumeResult::Fresh, 1, None));
        for _ in 0..2 {
            r.publish(a.user, b"x");
        }
        let t0 = Instant::now();
        r.detach(a.user, 1, t0);
        r.publish(a.user, b"y");
        let b = r.attach(b"alice", 2, Some(Position { epoch: a.epoch, seq: 1 }));
        assert_eq!((b.result, b.next_seq, b.replay_from), (ResumeResult::Resumed, 2, Some(2)));
        let mut out = Vec::new();
        assert_eq!(r.replay(b.user, 2, &mut out), 2);
        assert_eq!(seqs(&out), vec![2, 3]);
    }

    #[test]
    fn gap_when_retention_is_exceeded_and_restart_when_epoch_unknown() {
        let mut r = reg();
        let a = r.attach(b"alice", 1, None);
        for _ in 0..6 {
            r.publish(a.user, b"x");
        }
        let g = r.attach(b"alice", 2, Some(Position { epoch: a.epoch, seq: 1 }));
        assert_eq!((g.result, g.next_seq), (ResumeResult::Gap, 4));
        let x = r.attach(b"alice", 3, Some(Position { epoch: a.epoch ^ 1, seq: 1 }));
        assert_eq!((x.result, x.next_seq, x.replay_from), (ResumeResult::Restarted, 7, None));
        let f = r.attach(b"alice", 4, Some(Position { epoch: a.epoch, seq: 99 }));
        assert_eq!(f.result, ResumeResult::Restarted, "a position beyond the head is unknown");
        let up = r.attach(b"alice", 5, Some(Position { epoch: a.epoch, seq: 6 }));
        assert_eq!((up.result, up.next_seq, up.replay_from), (ResumeResult::Resumed, 7, None));
    }

    #[test]
    fn sessions_share_a_stream_and_users_expire_after_grace() {
        let mut r = reg();
        let a = r.attach(b"alice", 1, None);
        let b = r.attach(b"alice", 2, None);
        assert_eq!(a.user, b.user);
        let (_, sessions) = r.publish(a.user, b"x").unwrap();
        assert_eq!(sessions, &[1, 2]);
        let other = r.attach(b"bob", 3, None);
        assert_ne!(other.epoch, a.epoch);
        let t0 = Instant::now();
        r.detach(a.user, 1, t0);
        r.detach(a.user, 2, t0);
        assert_eq!(r.sweep(t0 + Duration::from_secs(29), |_| {}), 0);
        assert_eq!(r.sweep(t0 + Duration::from_secs(30), |id| assert_eq!(id, b"alice")), 1);
        assert!(r.find(b"alice").is_none());
        assert!(r.find(b"bob").is_some());
        assert_eq!(r.online(false).count(), 1);
    }
}
