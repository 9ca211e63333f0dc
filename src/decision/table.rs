//! The decision server's state, sans-IO: the heartbeat table, the
//! assignment policy and the admin operations (protocol.md §7, §8).
//!
//! [`Table`] owns no socket and reads no clock: every call that depends on
//! time takes `now: Instant` (for ages and expiry) and, where the wire
//! carries wall-clock timestamps, `now_unix_ms`. Randomness (tie breaks,
//! retry jitter) comes from a small seeded [`Rng`] the table holds, so a test
//! can replay a run exactly. The event loop in [`super::server`] feeds it
//! datagrams and requests and writes out the frames it encodes.
//!
//! What it must not do: trust a heartbeat or an admin request before its
//! tag verifies, panic on any input, or grow without bound (nodes, and the
//! admin replay window, are capped).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;
use std::time::Instant;

use crate::protocol::frame::{self as f, Entry, Frame, List, NODE_DRAINED, NODE_DRAINING};
use crate::protocol::{decode, limits, sign, AdminOp, Channel, Code, DecodeError, Decoded};

use super::state::{escape, Settings};

/// A heartbeat whose `sent_at_ms` is further than this from the server's
/// clock, either way, is dropped (protocol.md §8).
pub const MAX_CLOCK_SKEW_MS: u64 = 10_000;
/// An ADMIN whose `timestamp_ms` is further than this from the server's
/// clock, either way, is refused; (timestamp, nonce) pairs are remembered
/// for as long as they would pass this check (protocol.md §7.3).
pub const ADMIN_WINDOW_MS: u64 = 30_000;
/// The global ceiling when no admin has set one, percent.
pub const DEFAULT_CEILING_PCT: u8 = 80;
/// A node with no accepted heartbeat for this long is expired: 3 intervals.
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(3);
/// NO_CAPACITY's `retry_after_ms` is drawn uniformly from
/// `RETRY_AFTER_MIN_MS..=RETRY_AFTER_MAX_MS`, so that clients turned away
/// together do not all come back together.
pub const RETRY_AFTER_MIN_MS: u32 = 1000;
/// See [`RETRY_AFTER_MIN_MS`].
pub const RETRY_AFTER_MAX_MS: u32 = 2000;
/// Most node ids the table holds (live or remembered). Only holders of the
/// cluster secret can add one, so this guards against a runaway cluster
/// rather than an attacker.
pub const MAX_NODES: usize = 4096;
/// Most admin (timestamp, nonce) pairs remembered at once.
const MAX_ADMIN_SEEN: usize = 65_536;
/// An expired node's entry (its incarnation and seq, which stop replays)
/// is kept this much longer than `expire_after` before it is forgotten.
/// Longer than any replayed heartbeat can pass the clock check.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

/// A small, fast, seeded PRNG (SplitMix64). Not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A value in `lo..=hi` (`hi >= lo`).
    pub fn between(&mut self, lo: u32, hi: u32) -> u32 {
        let span = u64::from(hi.saturating_sub(lo)) + 1;
        lo + (self.next_u64() % span) as u32
    }
}

/// What the table needs to know. `Default` gives the protocol defaults and
/// empty secrets (with an empty secret nothing verifies).
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// Verifies HEARTBEAT tags.
    pub cluster_secret: Vec<u8>,
    /// Verifies ADMIN tags.
    pub admin_secret: Vec<u8>,
    /// A node with no accepted heartbeat for this long is not assigned or listed.
    pub expire_after: Duration,
    /// The global ceiling, percent, unless an admin setting overrides it.
    pub ceiling_pct: u8,
    /// A heartbeat whose `sent_at_ms` is earlier than this (the server's
    /// start, ms since the Unix epoch) is dropped: it was captured before a
    /// restart, when the table's (incarnation, seq) was lost (protocol.md §8).
    /// 0: no such rule.
    pub heartbeats_not_before_ms: u64,
    /// An ADMIN whose `timestamp_ms` is earlier than this is refused: set to
    /// the server's start when no state file keeps the replay window across
    /// restarts (protocol.md §7.3). 0: no such rule.
    pub admin_not_before_ms: u64,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            cluster_secret: Vec::new(),
            admin_secret: Vec::new(),
            expire_after: DEFAULT_EXPIRE_AFTER,
            ceiling_pct: DEFAULT_CEILING_PCT,
            heartbeats_not_before_ms: 0,
            admin_not_before_ms: 0,
        }
    }
}

/// Why a heartbeat datagram was dropped. There is no reply on UDP, ever
/// (protocol.md §8); the server only counts these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatReject {
    /// The datagram is not a valid HEARTBEAT frame.
    Malformed(DecodeError),
    /// The datagram's size is not exactly 4 + the frame's `length`.
    SizeMismatch {
        /// Bytes in the datagram.
        datagram: usize,
        /// Bytes the frame says it has (at least).
        frame: usize,
    },
    /// The heartbeat's `version` is not 1.
    UnsupportedVersion(u8),
    /// The tag does not verify under the cluster secret.
    BadTag,
    /// `sent_at_ms` is more than [`MAX_CLOCK_SKEW_MS`] from the server's clock.
    ClockSkew {
        /// The node's timestamp.
        sent_at_ms: u64,
        /// The server's clock.
        now_unix_ms: u64,
    },
    /// Not newer than the stored heartbeat (incarnation, then seq).
    Replay {
        /// The datagram's incarnation.
        incarnation: u64,
        /// The datagram's seq.
        seq: u64,
    },
    /// A new node id, and the table already holds [`MAX_NODES`].
    TableFull,
    /// `sent_at_ms` is earlier than the server's start
    /// ([`TableConfig::heartbeats_not_before_ms`]): a replay from before a
    /// restart.
    BeforeStart {
        /// The node's timestamp.
        sent_at_ms: u64,
        /// The server's start.
        started_ms: u64,
    },
}

impl HeartbeatReject {
    /// A short stable name, for counters and logs.
    pub const fn name(&self) -> &'static str {
        match self {
            HeartbeatReject::Malformed(_) => "malformed",
            HeartbeatReject::SizeMismatch { .. } => "size_mismatch",
            HeartbeatReject::UnsupportedVersion(_) => "unsupported_version",
            HeartbeatReject::BadTag => "bad_tag",
            HeartbeatReject::ClockSkew { .. } => "clock_skew",
            HeartbeatReject::Replay { .. } => "replay",
            HeartbeatReject::TableFull => "table_full",
            HeartbeatReject::BeforeStart { .. } => "before_start",
        }
    }
}

impl fmt::Display for HeartbeatReject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeartbeatReject::Malformed(e) => write!(f, "malformed heartbeat: {e}"),
            HeartbeatReject::SizeMismatch { datagram, frame } => {
                write!(f, "datagram of {datagram} bytes holds a frame of {frame}")
            }
            HeartbeatReject::UnsupportedVersion(v) => write!(f, "heartbeat version {v}, expected 1 or 2"),
            HeartbeatReject::BadTag => write!(f, "heartbeat tag does not verify"),
            HeartbeatReject::ClockSkew { sent_at_ms, now_unix_ms } => write!(
                f,
                "heartbeat sent at {sent_at_ms} ms, {} ms from this server's clock",
                sent_at_ms.abs_diff(*now_unix_ms)
            ),
            HeartbeatReject::Replay { incarnation, seq } => {
                write!(f, "heartbeat (incarnation {incarnation}, seq {seq}) is not newer than the last")
            }
            HeartbeatReject::TableFull => write!(f, "table already holds {MAX_NODES} nodes"),
            HeartbeatReject::BeforeStart { sent_at_ms, started_ms } => write!(
                f,
                "heartbeat sent at {sent_at_ms} ms, {} ms before this server started",
                started_ms.saturating_sub(*sent_at_ms)
            ),
        }
    }
}

impl std::error::Error for HeartbeatReject {}

/// What the table stores for one node id: its last accepted heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// The node's id.
    pub node_id: Vec<u8>,
    /// Its incarnation (start time, ms since the Unix epoch).
    pub incarnation: u64,
    /// Seq of the last accepted heartbeat.
    pub seq: u64,
    /// The node's clock when it sent that heartbeat.
    pub sent_at_ms: u64,
    /// `host:port` for clients.
    pub client_endpoint: Vec<u8>,
    /// `host:port` for publishers and mesh peers (may be empty).
    pub ingest_endpoint: Vec<u8>,
    /// Connected clients at the heartbeat.
    pub connections: u32,
    /// The node's own capacity (an admin override may replace it).
    pub capacity: u32,
    /// Heartbeat flags ([`NODE_DRAINING`]).
    pub flags: u8,
    /// Messages in per second.
    pub msgs_in_per_s: u32,
    /// Messages out per second.
    pub msgs_out_per_s: u32,
    /// CPU use, per mille of one core.
    pub cpu_permille: u16,
    /// When the heartbeat was accepted.
    pub last_heartbeat: Instant,
    /// Users whose ASSIGNMENT ranked this node first since that heartbeat
    /// (each counted once, however often it asked).
    pub assigned_since_heartbeat: u32,
    /// Those users, hashed with the table's keyed hasher. It holds no more
    /// entries than the node's headroom allowed: a node with none left is
    /// not ranked, so nothing more is added.
    pub assigned_users: HashSet<u64>,
}

/// The nodes chosen for one ASSIGN_REQUEST, best first: indices into the
/// table, valid until the table next changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranked {
    len: usize,
    idx: [usize; limits::MAX_ASSIGN_RESULTS as usize],
}

impl Ranked {
    /// The chosen nodes' table indices, best first (1..=8 of them).
    pub fn indices(&self) -> &[usize] {
        &self.idx[..self.len]
    }
}

/// The answer to one ASSIGN_REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// ASSIGNMENT with these nodes.
    Ranked(Ranked),
    /// NO_CAPACITY: no node qualifies.
    NoCapacity {
        /// Ask again after this long.
        retry_after_ms: u32,
    },
}

/// One row of ADMIN_STATUS (protocol.md §7.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: Vec<u8>,
    /// `host:port` for clients.
    pub client_endpoint: Vec<u8>,
    /// Connected clients at the last heartbeat.
    pub connections: u32,
    /// Capacity in force (admin override or the node's own).
    pub capacity: u32,
    /// Ceiling in force for this node, percent.
    pub ceiling_pct: u8,
    /// Headroom now (§7.1), clamped to `i32`.
    pub headroom: i32,
    /// Milliseconds since the last accepted heartbeat.
    pub heartbeat_age_ms: u32,
    /// Draining, by heartbeat flag or by an admin.
    pub draining: bool,
    /// Messages out per second at the last heartbeat.
    pub msgs_out_per_s: u32,
}

/// What to answer an ADMIN request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAnswer {
    /// The tag does not verify: ERROR AUTH_FAILED, then close.
    AuthFailed,
    /// ADMIN_RESULT with this status (0 = success, else a code) and message.
    Result {
        /// 0 or a code, normally 15 BAD_REQUEST.
        status: u16,
        /// For humans.
        message: String,
        /// Whether the admin settings changed (the server persists them).
        changed: bool,
    },
    /// ADMIN_STATUS ([`Table::encode_status`]).
    Status,
}

impl AdminAnswer {
    fn ok(message: String, changed: bool) -> AdminAnswer {
        AdminAnswer::Result { status: 0, message, changed }
    }
    fn bad(message: String) -> AdminAnswer {
        AdminAnswer::Result { status: Code::BadRequest.to_u16(), message, changed: false }
    }
}

/// The heartbeat table, the admin settings and the assignment policy.
pub struct Table {
    cfg: TableConfig,
    /// Every node id with an accepted heartbeat, live or recently expired.
    nodes: Vec<NodeState>,
    settings: Settings,
    /// Admin (timestamp_ms, nonce) pairs within the replay window.
    admin_seen: HashSet<(u64, u64)>,
    rng: Rng,
    /// Candidates of one assignment: (headroom, random tie break, index).
    scratch: Vec<(i64, u64, usize)>,
    /// Entry bytes while encoding a list frame.
    entries: Vec<u8>,
    /// Hashes user ids for [`NodeState::assigned_users`] (SipHash, random
    /// keys: a requester cannot aim collisions).
    users: std::collections::hash_map::RandomState,
}

impl Table {
    /// An empty table with the admin `settings` loaded from the state file.
    pub fn new(cfg: TableConfig, settings: Settings, seed: u64) -> Table {
        Table {
            cfg,
            nodes: Vec::new(),
            settings,
            admin_seen: HashSet::new(),
            rng: Rng::new(seed),
            scratch: Vec::new(),
            entries: Vec::new(),
            users: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The admin settings in force (what the state file holds).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The admin (timestamp_ms, nonce) pairs remembered (within the replay
    /// window, or not yet swept), sorted: what the state file keeps so that
    /// a restarted server still refuses their replay.
    pub fn admin_seen(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.admin_seen.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Remembers admin pairs read back from the state file (at most
    /// 65,536; pairs outside the window go at the next sweep).
    pub fn remember_admin(&mut self, pairs: impl IntoIterator<Item = (u64, u64)>) {
        for p in pairs {
            if self.admin_seen.len() >= MAX_ADMIN_SEEN {
                break;
            }
            self.admin_seen.insert(p);
        }
    }

    /// The global ceiling in force, percent.
    pub fn ceiling_pct(&self) -> u8 {
        self.settings.ceiling.unwrap_or(self.cfg.ceiling_pct)
    }

    /// The node at a table index (as found in [`Ranked::indices`]).
    pub fn node(&self, i: usize) -> Option<&NodeState> {
        self.nodes.get(i)
    }

    /// The stored state of one node id, live or expired.
    pub fn find(&self, id: &[u8]) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.node_id == id)
    }

    /// Whether the node has had an accepted heartbeat within `expire_after`.
    pub fn is_live(&self, n: &NodeState, now: Instant) -> bool {
        now.saturating_duration_since(n.last_heartbeat) < self.cfg.expire_after
    }

    /// Draining by its own heartbeat flag or by an admin.
    pub fn is_draining(&self, n: &NodeState) -> bool {
        n.flags & NODE_DRAINING != 0 || self.is_drained(n)
    }

    /// Drained by an admin.
    pub fn is_drained(&self, n: &NodeState) -> bool {
        self.settings.drained.contains(&n.node_id)
    }

    /// The flags of `n` in NODES.
    fn entry_flags(&self, n: &NodeState) -> u8 {
        let mut flags = if self.is_draining(n) { NODE_DRAINING } else { 0 };
        if self.is_drained(n) {
            flags |= NODE_DRAINED;
        }
        flags
    }

    /// The ceiling in force for one node, percent.
    pub fn ceiling_for(&self, id: &[u8]) -> u8 {
        self.settings.node_ceiling.get(id).copied().unwrap_or_else(|| self.ceiling_pct())
    }

    /// The capacity in force: the admin override or the node's own.
    pub fn capacity_for(&self, n: &NodeState) -> u32 {
        self.settings.capacity.get(&n.node_id).copied().unwrap_or(n.capacity)
    }

    /// floor(ceiling × capacity / 100) − connections − assigned_since_heartbeat
    /// (protocol.md §7.1).
    pub fn headroom(&self, n: &NodeState) -> i64 {
        let allowed = u64::from(self.ceiling_for(&n.node_id)) * u64::from(self.capacity_for(n)) / 100;
        allowed as i64 - i64::from(n.connections) - i64::from(n.assigned_since_heartbeat)
    }

    /// Live nodes (what NODES lists), in table order.
    pub fn live_nodes(&self, now: Instant) -> impl Iterator<Item = &NodeState> {
        self.nodes.iter().filter(move |n| self.is_live(n, now))
    }

    // ------------------------------------------------------------ heartbeats

    /// Checks and applies one heartbeat datagram (protocol.md §8): one whole
    /// frame, version 1, a tag that verifies under the cluster secret, a
    /// clock within [`MAX_CLOCK_SKEW_MS`] and not before the server's start
    /// ([`TableConfig::heartbeats_not_before_ms`]), and newer than the stored
    /// (incarnation, seq). An accepted heartbeat replaces everything stored
    /// for the node and resets its `assigned_since_heartbeat`.
    pub fn on_heartbeat(
        &mut self,
        datagram: &[u8],
        now: Instant,
        now_unix_ms: u64,
    ) -> Result<(), HeartbeatReject> {
        let hb = match decode(datagram, Channel::Heartbeat) {
            Ok(Decoded::Frame(Frame::Heartbeat(h), n)) if n == datagram.len() => h,
            Ok(Decoded::Frame(_, n)) | Ok(Decoded::Incomplete(n)) => {
                return Err(HeartbeatReject::SizeMismatch { datagram: datagram.len(), frame: n })
            }
            Err(e) => return Err(HeartbeatReject::Malformed(e)),
        };
        if !crate::protocol::speaks(hb.version) {
            return Err(HeartbeatReject::UnsupportedVersion(hb.version));
        }
        if self.cfg.cluster_secret.is_empty() || !sign::verify_frame(datagram, &self.cfg.cluster_secret) {
            return Err(HeartbeatReject::BadTag);
        }
        if hb.sent_at_ms.abs_diff(now_unix_ms) > MAX_CLOCK_SKEW_MS {
            return Err(HeartbeatReject::ClockSkew { sent_at_ms: hb.sent_at_ms, now_unix_ms });
        }
        let started_ms = self.cfg.heartbeats_not_before_ms;
        if hb.sent_at_ms < started_ms {
            return Err(HeartbeatReject::BeforeStart { sent_at_ms: hb.sent_at_ms, started_ms });
        }
        let fresh = NodeState {
            node_id: hb.node_id.to_vec(),
            incarnation: hb.incarnation,
            seq: hb.seq,
            sent_at_ms: hb.sent_at_ms,
            client_endpoint: hb.client_endpoint.to_vec(),
            ingest_endpoint: hb.ingest_endpoint.to_vec(),
            connections: hb.connections,
            capacity: hb.capacity,
            flags: hb.flags,
            msgs_in_per_s: hb.msgs_in_per_s,
            msgs_out_per_s: hb.msgs_out_per_s,
            cpu_permille: hb.cpu_permille,
            last_heartbeat: now,
            assigned_since_heartbeat: 0,
            assigned_users: HashSet::new(),
        };
        match self.nodes.iter_mut().find(|n| n.node_id == hb.node_id) {
            Some(n) => {
                let newer =
                    hb.incarnation > n.incarnation || (hb.incarnation == n.incarnation && hb.seq > n.seq);
                if !newer {
                    return Err(HeartbeatReject::Replay { incarnation: hb.incarnation, seq: hb.seq });
                }
                *n = fresh;
            }
            None => {
                if self.nodes.len() >= MAX_NODES {
                    self.forget_expired(now);
                    if self.nodes.len() >= MAX_NODES {
                        return Err(HeartbeatReject::TableFull);
                    }
                }
                self.nodes.push(fresh);
            }
        }
        Ok(())
    }

    /// Drops nodes expired for longer than [`FORGET_AFTER`] and admin
    /// (timestamp, nonce) pairs outside the window. Call now and then.
    pub fn sweep(&mut self, now: Instant, now_unix_ms: u64) {
        self.forget_expired(now);
        self.admin_seen.retain(|&(ts, _)| ts.saturating_add(ADMIN_WINDOW_MS) >= now_unix_ms);
    }

    fn forget_expired(&mut self, now: Instant) {
        let keep = self.cfg.expire_after + FORGET_AFTER;
        self.nodes.retain(|n| now.saturating_duration_since(n.last_heartbeat) < keep);
    }

    // ------------------------------------------------------------ assignment

    /// Chooses nodes for one ASSIGN_REQUEST (protocol.md §7.1): live, not
    /// draining, headroom > 0, ranked by headroom (most first, ties at
    /// random), at most `max_results`. The first-ranked node's
    /// `assigned_since_heartbeat` goes up by one unless `user` was already
    /// counted there since its heartbeat (repeats use up no headroom).
    /// NO_CAPACITY, with a jittered retry, if nothing qualifies.
    pub fn assign(&mut self, user: Option<&[u8]>, max_results: u8, now: Instant) -> Assignment {
        use std::hash::BuildHasher;
        let user = user.map(|u| self.users.hash_one(u));
        let mut c = std::mem::take(&mut self.scratch);
        c.clear();
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.is_live(n, now) || self.is_draining(n) {
                continue;
            }
            let h = self.headroom(n);
            if h > 0 {
                c.push((h, self.rng.next_u64(), i));
            }
        }
        let answer = if c.is_empty() {
            Assignment::NoCapacity {
                retry_after_ms: self.rng.between(RETRY_AFTER_MIN_MS, RETRY_AFTER_MAX_MS),
            }
        } else {
            let k = usize::from(max_results.clamp(1, limits::MAX_ASSIGN_RESULTS)).min(c.len());
            // Most headroom first; equal headroom in random order.
            let order = |a: &(i64, u64, usize), b: &(i64, u64, usize)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
            if c.len() > k {
                c.select_nth_unstable_by(k - 1, order);
            }
            c[..k].sort_unstable_by(order);
            let mut r = Ranked { len: k, idx: [0; limits::MAX_ASSIGN_RESULTS as usize] };
            for (slot, &(_, _, i)) in r.idx.iter_mut().zip(&c[..k]) {
                *slot = i;
            }
            let first = &mut self.nodes[r.idx[0]];
            if user.is_some_and(|u| first.assigned_users.insert(u)) {
                first.assigned_since_heartbeat = first.assigned_since_heartbeat.saturating_add(1);
            }
            Assignment::Ranked(r)
        };
        self.scratch = c;
        answer
    }

    /// Appends the response frame for an assignment: ASSIGNMENT or NO_CAPACITY.
    pub fn encode_assignment(&mut self, a: &Assignment, out: &mut Vec<u8>) {
        match a {
            Assignment::NoCapacity { retry_after_ms } => {
                Frame::NoCapacity(f::NoCapacity { retry_after_ms: *retry_after_ms }).encode(out)
            }
            Assignment::Ranked(r) => {
                let mut e = std::mem::take(&mut self.entries);
                e.clear();
                let mut count = 0;
                for n in r.indices().iter().filter_map(|&i| self.nodes.get(i)) {
                    f::AssignEntry { node_id: &n.node_id, endpoint: &n.client_endpoint }.write(&mut e);
                    count += 1;
                }
                match List::from_encoded(count, &e) {
                    Some(entries) if count > 0 => Frame::Assignment(f::Assignment { entries }).encode(out),
                    // Unreachable: indices come from `assign` and entries
                    // from verified heartbeats. Answer something valid.
                    _ => Frame::NoCapacity(f::NoCapacity { retry_after_ms: RETRY_AFTER_MAX_MS }).encode(out),
                }
                self.entries = e;
            }
        }
    }

    // ------------------------------------------------------------ NODES

    /// Appends NODES (protocol.md §7.2): every live node, draining ones
    /// (by heartbeat or by admin) flagged [`NODE_DRAINING`], and those an
    /// admin drained [`NODE_DRAINED`] too: nodes learn of an admin drain
    /// from that flag (the other may echo their own heartbeats). Entries that would take the frame past
    /// the 1 MiB limit are left out.
    pub fn encode_nodes(&mut self, now: Instant, out: &mut Vec<u8>) {
        let mut e = std::mem::take(&mut self.entries);
        e.clear();
        let mut count = 0usize;
        for n in self.live_nodes(now) {
            let at = e.len();
            f::NodeEntry {
                node_id: &n.node_id,
                incarnation: n.incarnation,
                client_endpoint: &n.client_endpoint,
                ingest_endpoint: &n.ingest_endpoint,
                flags: self.entry_flags(n),
            }
            .write(&mut e);
            if count == usize::from(u16::MAX) || e.len() + 3 > limits::MAX_FROM_DECISION as usize {
                e.truncate(at);
                break;
            }
            count += 1;
        }
        let entries = List::from_encoded(count, &e).unwrap_or_else(empty_list);
        Frame::Nodes(f::Nodes { entries }).encode(out);
        self.entries = e;
    }

    // ------------------------------------------------------------ admin

    /// One row per node the table holds (live, or expired and not yet
    /// forgotten: its heartbeat age tells), in table order.
    pub fn status(&self, now: Instant) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|n| NodeStatus {
                node_id: n.node_id.clone(),
                client_endpoint: n.client_endpoint.clone(),
                connections: n.connections,
                capacity: self.capacity_for(n),
                ceiling_pct: self.ceiling_for(&n.node_id),
                headroom: self.headroom(n).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
                heartbeat_age_ms: now
                    .saturating_duration_since(n.last_heartbeat)
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u32,
                draining: self.is_draining(n),
                msgs_out_per_s: n.msgs_out_per_s,
            })
            .collect()
    }

    /// Appends ADMIN_STATUS: the global ceiling and [`Table::status`].
    pub fn encode_status(&mut self, now: Instant, out: &mut Vec<u8>) {
        let rows = self.status(now);
        let mut e = std::mem::take(&mut self.entries);
        e.clear();
        let mut count = 0usize;
        for r in &rows {
            let at = e.len();
            f::StatusEntry {
                node_id: &r.node_id,
                client_endpoint: &r.client_endpoint,
                connections: r.connections,
                capacity: r.capacity,
                ceiling_pct: r.ceiling_pct,
                headroom: r.headroom,
                heartbeat_age_ms: r.heartbeat_age_ms,
                flags: if r.draining { NODE_DRAINING } else { 0 },
                msgs_out_per_s: r.msgs_out_per_s,
            }
            .write(&mut e);
            if count == usize::from(u16::MAX) || e.len() + 4 > limits::MAX_FROM_DECISION as usize {
                e.truncate(at);
                break;
            }
            count += 1;
        }
        let entries = List::from_encoded(count, &e).unwrap_or_else(empty_list);
        Frame::AdminStatus(f::AdminStatus { ceiling_pct: self.ceiling_pct(), entries }).encode(out);
        self.entries = e;
    }

    /// Handles one ADMIN request (protocol.md §7.3), given its decoded form
    /// and its whole frame bytes (for the tag). The caller has checked the
    /// version. Order: tag (→ [`AdminAnswer::AuthFailed`]), timestamp window,
    /// signed before the server's start (only without a state file,
    /// [`TableConfig::admin_not_before_ms`]), replayed (timestamp, nonce),
    /// then the operation itself.
    ///
    /// SET_CAPACITY with value 0, and SET_CEILING for a node with value 0,
    /// remove that node's override. A node id is known if the table holds a
    /// heartbeat for it (live or recently expired) or a setting names it.
    pub fn admin(&mut self, frame: &[u8], a: &f::Admin<'_>, now_unix_ms: u64) -> AdminAnswer {
        if self.cfg.admin_secret.is_empty() || !sign::verify_frame(frame, &self.cfg.admin_secret) {
            return AdminAnswer::AuthFailed;
        }
        let skew = a.timestamp_ms.abs_diff(now_unix_ms);
        if skew > ADMIN_WINDOW_MS {
            return AdminAnswer::bad(format!(
                "timestamp is {skew} ms away from this server's clock (at most {ADMIN_WINDOW_MS} allowed)"
            ));
        }
        if a.timestamp_ms < self.cfg.admin_not_before_ms {
            return AdminAnswer::bad(
                "signed before this server started (it keeps no state file, so it cannot tell a replay)"
                    .into(),
            );
        }
        self.admin_seen.retain(|&(ts, _)| ts.saturating_add(ADMIN_WINDOW_MS) >= now_unix_ms);
        if self.admin_seen.contains(&(a.timestamp_ms, a.nonce)) {
            return AdminAnswer::bad("replayed request: this timestamp and nonce were seen before".into());
        }
        if self.admin_seen.len() >= MAX_ADMIN_SEEN {
            return AdminAnswer::bad("too many admin requests in the last 30 s".into());
        }
        self.admin_seen.insert((a.timestamp_ms, a.nonce));
        self.admin_op(a.op, a.node_id, a.value)
    }

    fn admin_op(&mut self, op: AdminOp, node: &[u8], value: u32) -> AdminAnswer {
        let name = escape(node);
        if op == AdminOp::Status {
            return AdminAnswer::Status;
        }
        if node.is_empty() && op != AdminOp::SetCeiling {
            return AdminAnswer::bad(format!("{op:?} needs a node id"));
        }
        if !node.is_empty() && self.find(node).is_none() && !self.settings.names(node) {
            return AdminAnswer::bad(format!("unknown node {name}"));
        }
        let st = &mut self.settings;
        match op {
            AdminOp::Status => AdminAnswer::Status,
            AdminOp::SetCeiling if node.is_empty() => match u8::try_from(value) {
                Ok(p @ 1..=100) => {
                    let changed = st.ceiling != Some(p);
                    st.ceiling = Some(p);
                    AdminAnswer::ok(format!("global ceiling set to {p} %"), changed)
                }
                _ => AdminAnswer::bad(format!("ceiling {value} is outside 1..=100")),
            },
            AdminOp::SetCeiling => match u8::try_from(value) {
                Ok(0) => {
                    let changed = st.node_ceiling.remove(node).is_some();
                    AdminAnswer::ok(format!("ceiling override of {name} removed"), changed)
                }
                Ok(p @ 1..=100) => {
                    let changed = st.node_ceiling.insert(node.to_vec(), p) != Some(p);
                    AdminAnswer::ok(format!("ceiling of {name} set to {p} %"), changed)
                }
                _ => AdminAnswer::bad(format!("ceiling {value} is outside 1..=100")),
            },
            AdminOp::SetCapacity if value == 0 => {
                let changed = st.capacity.remove(node).is_some();
                AdminAnswer::ok(format!("capacity override of {name} removed"), changed)
            }
            AdminOp::SetCapacity => {
                let changed = st.capacity.insert(node.to_vec(), value) != Some(value);
                AdminAnswer::ok(format!("capacity of {name} set to {value}"), changed)
            }
            AdminOp::Drain => {
                let changed = st.drained.insert(node.to_vec());
                let msg = if changed { "drained" } else { "was already drained" };
                AdminAnswer::ok(format!("node {name} {msg}"), changed)
            }
            AdminOp::Undrain => {
                let changed = st.drained.remove(node);
                let msg = if changed { "undrained" } else { "was not drained" };
                AdminAnswer::ok(format!("node {name} {msg}"), changed)
            }
        }
    }
}

fn empty_list<'a, E: Entry<'a>>() -> List<'a, E> {
    // An empty byte string is always a valid list of zero entries.
    List::from_encoded(0, &[]).unwrap_or_else(|| unreachable!("empty list"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &[u8] = b"cluster-secret-for-tests";
    const ADMIN: &[u8] = b"admin-secret-for-tests";
    const T0: u64 = 1_767_225_600_000;

    fn table(ceiling: u8) -> Table {
        Table::new(
            TableConfig {
                cluster_secret: CLUSTER.to_vec(),
                admin_secret: ADMIN.to_vec(),
                ceiling_pct: ceiling,
                ..TableConfig::default()
            },
            Settings::default(),
            7,
        )
    }

    #[derive(Clone, Copy)]
    struct Hb<'a> {
        id: &'a str,
        inc: u64,
        seq: u64,
        sent: u64,
        conns: u32,
        cap: u32,
        flags: u8,
    }

    fn hb(id: &str, seq: u64, conns: u32, cap: u32) -> Hb<'_> {
        Hb { id, inc: T0, seq, sent: T0, conns, cap, flags: 0 }
    }

    fn bytes_with(h: Hb<'_>, secret: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let ep = format!("10.0.0.1:{}", 7400 + h.id.len());
        Frame::Heartbeat(f::Heartbeat {
            version: 1,
            node_id: h.id.as_bytes(),
            incarnation: h.inc,
            seq: h.seq,
            sent_at_ms: h.sent,
            client_endpoint: ep.as_bytes(),
            ingest_endpoint: b"10.0.0.1:7401",
            connections: h.conns,
            capacity: h.cap,
            flags: h.flags,
            msgs_in_per_s: 5,
            msgs_out_per_s: 6,
            cpu_permille: 7,
        })
        .encode_signed(&mut v, secret);
        v
    }

    fn bytes(h: Hb<'_>) -> Vec<u8> {
        bytes_with(h, CLUSTER)
    }

    #[test]
    fn a_user_asking_again_uses_up_no_more_headroom() {
        let now = Instant::now();
        let mut t = table(80);
        t.on_heartbeat(&bytes(hb("a", 1, 0, 100)), now, T0).unwrap();
        for _ in 0..1000 {
            assert!(matches!(t.assign(Some(b"flooder"), 1, now), Assignment::Ranked(_)));
        }
        let a = t.find(b"a").unwrap();
        assert_eq!((a.assigned_since_heartbeat, a.assigned_users.len()), (1, 1));
        assert_eq!(t.headroom(a), 80 - 1);
        // Another user counts; a heartbeat forgets both.
        t.assign(Some(b"honest"), 1, now);
        assert_eq!(t.find(b"a").unwrap().assigned_since_heartbeat, 2);
        t.on_heartbeat(&bytes(hb("a", 2, 0, 100)), now, T0).unwrap();
        let a = t.find(b"a").unwrap();
        assert_eq!((a.assigned_since_heartbeat, a.assigned_users.len()), (0, 0));
    }

    /// Assigns a new user each call (a repeat would use up no headroom).
    fn first(t: &mut Table, now: Instant) -> Option<String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let user = format!("u{}", NEXT.fetch_add(1, Ordering::Relaxed));
        match t.assign(Some(user.as_bytes()), 1, now) {
            Assignment::Ranked(r) => Some(String::from_utf8(t.node(r.indices()[0])?.node_id.clone()).ok()?),
            Assignment::NoCapacity { retry_after_ms } => {
                assert!((RETRY_AFTER_MIN_MS..=RETRY_AFTER_MAX_MS).contains(&retry_after_ms));
                None
            }
        }
    }

    fn admin_frame(secret: &[u8], ts: u64, nonce: u64, op: AdminOp, node: &str, value: u32) -> Vec<u8> {
        let mut v = Vec::new();
        Frame::Admin(f::Admin { version: 1, timestamp_ms: ts, nonce, op, node_id: node.as_bytes(), value })
            .encode_signed(&mut v, secret);
        v
    }

    fn admin(t: &mut Table, ts: u64, nonce: u64, op: AdminOp, node: &str, value: u32) -> AdminAnswer {
        admin_with(t, ADMIN, ts, nonce, op, node, value)
    }

    fn admin_with(
        t: &mut Table,
        secret: &[u8],
        ts: u64,
        nonce: u64,
        op: AdminOp,
        node: &str,
        value: u32,
    ) -> AdminAnswer {
        let v = admin_frame(secret, ts, nonce, op, node, value);
        let Ok(Decoded::Frame(Frame::Admin(a), _)) = decode(&v, Channel::ToDecision) else { panic!() };
        t.admin(&v, &a, T0)
    }

    fn status_of(a: &AdminAnswer) -> u16 {
        match a {
            AdminAnswer::Result { status, .. } => *status,
            other => panic!("{other:?}"),
        }
    }

    /// §7.1: with no further heartbeats, assignments fill the nodes in
    /// proportion to their headroom, exactly to the ceiling, then NO_CAPACITY.
    #[test]
    fn spread_follows_headroom_then_no_capacity() {
        let mut t = table(50);
        let now = Instant::now();
        for (id, cap) in [("a", 100), ("b", 200), ("c", 300)] {
            t.on_heartbeat(&bytes(hb(id, 1, 0, cap)), now, T0).unwrap();
        }
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..300 {
            let n = first(&mut t, now).unwrap_or_else(|| panic!("no capacity after {i}"));
            *counts.entry(n).or_insert(0) += 1;
            // Water filling: at any moment the headrooms differ by at most
            // what the capacities' difference allows, so the spread is
            // proportional all along, not only at the end.
            if i == 149 {
                let h: Vec<i64> =
                    ["a", "b", "c"].iter().map(|id| t.headroom(t.find(id.as_bytes()).unwrap())).collect();
                assert!(h[0] >= 49 && h[2] <= 51, "{h:?}");
            }
        }
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [("a".into(), 50), ("b".into(), 100), ("c".into(), 150)]
        );
        assert_eq!(first(&mut t, now), None);
        // A heartbeat resets the node's assigned_since_heartbeat: capacity again.
        t.on_heartbeat(&bytes(hb("a", 2, 10, 100)), now, T0).unwrap();
        assert_eq!(t.headroom(t.find(b"a").unwrap()), 40);
        assert_eq!(first(&mut t, now).as_deref(), Some("a"));
    }

    #[test]
    fn ranking_and_max_results() {
        let mut t = table(100);
        let now = Instant::now();
        for (id, cap) in [("a", 10), ("b", 30), ("c", 20), ("d", 0)] {
            t.on_heartbeat(&bytes(hb(id, 1, 0, cap)), now, T0).unwrap();
        }
        let Assignment::Ranked(r) = t.assign(Some(b"u"), 8, now) else { panic!() };
        let ids: Vec<&[u8]> = r.indices().iter().map(|&i| &t.node(i).unwrap().node_id[..]).collect();
        assert_eq!(ids, [&b"b"[..], b"c", b"a"], "headroom order, capacity 0 left out");
        let Assignment::Ranked(r) = t.assign(Some(b"u"), 2, now) else { panic!() };
        assert_eq!(r.indices().len(), 2);
        let mut out = Vec::new();
        t.encode_assignment(&Assignment::Ranked(r), &mut out);
        let Ok(Decoded::Frame(Frame::Assignment(a), n)) = decode(&out, Channel::FromDecision) else {
            panic!()
        };
        assert_eq!(n, out.len());
        let e: Vec<_> = a.entries.iter().collect();
        assert_eq!((e[0].node_id, e[0].endpoint), (&b"b"[..], &b"10.0.0.1:7401"[..]));
        out.clear();
        t.encode_assignment(&Assignment::NoCapacity { retry_after_ms: 1500 }, &mut out);
        assert_eq!(out, [0, 0, 0, 5, 0xB1, 0, 0, 0x05, 0xdc]);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let now = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let mut t = Table::new(
                TableConfig { cluster_secret: CLUSTER.to_vec(), ..TableConfig::default() },
                Settings::default(),
                seed,
            );
            for id in ["a", "b", "c"] {
                t.on_heartbeat(&bytes(hb(id, 1, 0, 100)), now, T0).unwrap();
            }
            seen.insert(first(&mut t, now).unwrap());
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn ceiling_and_capacity() {
        let mut t = table(80);
        let now = Instant::now();
        t.on_heartbeat(&bytes(hb("a", 1, 150, 2000)), now, T0).unwrap();
        let a = || t.find(b"a").unwrap();
        assert_eq!(t.headroom(a()), 1600 - 150);
        assert_eq!(status_of(&admin(&mut t, T0, 1, AdminOp::SetCeiling, "", 40)), 0);
        assert_eq!(t.headroom(t.find(b"a").unwrap()), 800 - 150);
        assert_eq!(status_of(&admin(&mut t, T0, 2, AdminOp::SetCeiling, "a", 10)), 0);
        assert_eq!(t.headroom(t.find(b"a").unwrap()), 200 - 150);
        assert_eq!(status_of(&admin(&mut t, T0, 3, AdminOp::SetCapacity, "a", 1000)), 0);
        assert_eq!(t.headroom(t.find(b"a").unwrap()), 100 - 150);
        assert_eq!(first(&mut t, now), None, "negative headroom is never assigned");
        let rows = t.status(now);
        assert_eq!((rows[0].capacity, rows[0].ceiling_pct, rows[0].headroom), (1000, 10, -50));
        // Value 0 removes the per-node overrides.
        assert_eq!(status_of(&admin(&mut t, T0, 4, AdminOp::SetCapacity, "a", 0)), 0);
        assert_eq!(status_of(&admin(&mut t, T0, 5, AdminOp::SetCeiling, "a", 0)), 0);
        assert_eq!(t.headroom(t.find(b"a").unwrap()), 800 - 150);
        assert_eq!(t.ceiling_pct(), 40);
    }

    #[test]
    fn expired_nodes_are_not_assigned_or_listed() {
        let mut t = table(80);
        let now = Instant::now();
        t.on_heartbeat(&bytes(hb("a", 1, 0, 100)), now, T0).unwrap();
        let live = now + Duration::from_millis(2999);
        let dead = now + DEFAULT_EXPIRE_AFTER;
        assert_eq!(first(&mut t, live).as_deref(), Some("a"));
        assert_eq!(t.live_nodes(live).count(), 1);
        assert_eq!(first(&mut t, dead), None);
        assert_eq!(t.live_nodes(dead).count(), 0);
        let mut out = Vec::new();
        t.encode_nodes(dead, &mut out);
        assert_eq!(out, [0, 0, 0, 3, 0xB2, 0, 0]);
        // Still remembered (a replay cannot bring it back) until forgotten.
        assert_eq!(
            t.on_heartbeat(&bytes(hb("a", 1, 0, 100)), dead, T0),
            Err(HeartbeatReject::Replay { incarnation: T0, seq: 1 })
        );
        t.sweep(dead + FORGET_AFTER, T0);
        assert!(t.find(b"a").is_none());
        // A newer heartbeat revives it.
        t.on_heartbeat(&bytes(hb("a", 2, 0, 100)), dead, T0).unwrap();
        assert_eq!(first(&mut t, dead).as_deref(), Some("a"));
    }

    #[test]
    fn replays_and_old_incarnations_are_dropped() {
        let mut t = table(80);
        let now = Instant::now();
        let h5 = bytes(hb("a", 5, 10, 100));
        t.on_heartbeat(&h5, now, T0).unwrap();
        first(&mut t, now).unwrap();
        assert_eq!(t.find(b"a").unwrap().assigned_since_heartbeat, 1);
        // The very same datagram again, and an older seq: dropped, state kept.
        assert!(matches!(t.on_heartbeat(&h5, now, T0), Err(HeartbeatReject::Replay { seq: 5, .. })));
        assert!(matches!(
            t.on_heartbeat(&bytes(hb("a", 4, 99, 100)), now, T0),
            Err(HeartbeatReject::Replay { .. })
        ));
        let a = t.find(b"a").unwrap();
        assert_eq!((a.seq, a.connections, a.assigned_since_heartbeat), (5, 10, 1));
        // A new incarnation starts again at seq 1; the old one is then stale.
        t.on_heartbeat(&bytes(Hb { inc: T0 + 1, ..hb("a", 1, 0, 100) }), now, T0).unwrap();
        assert!(t.on_heartbeat(&bytes(hb("a", 6, 0, 100)), now, T0).is_err());
        t.on_heartbeat(&bytes(Hb { inc: T0 + 1, ..hb("a", 2, 0, 100) }), now, T0).unwrap();
    }

    #[test]
    fn forged_skewed_and_malformed_heartbeats_are_dropped() {
        let mut t = table(80);
        let now = Instant::now();
        let good = bytes(hb("a", 1, 0, 100));
        assert_eq!(
            t.on_heartbeat(&bytes_with(hb("a", 1, 0, 100), b"wrong-secret-xxxxxxx"), now, T0),
            Err(HeartbeatReject::BadTag)
        );
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert_eq!(t.on_heartbeat(&flipped, now, T0), Err(HeartbeatReject::BadTag));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(t.on_heartbeat(&long, now, T0), Err(HeartbeatReject::SizeMismatch { .. })));
        assert!(matches!(
            t.on_heartbeat(&good[..good.len() - 1], now, T0),
            Err(HeartbeatReject::SizeMismatch { .. })
        ));
        assert!(matches!(t.on_heartbeat(&[0, 0, 0, 0], now, T0), Err(HeartbeatReject::Malformed(_))));
        assert!(matches!(t.on_heartbeat(b"GET / HTTP/1.1\r\n", now, T0), Err(HeartbeatReject::Malformed(_))));
        let v3 = {
            let mut v = Vec::new();
            let Ok(Decoded::Frame(Frame::Heartbeat(h), _)) = decode(&good, Channel::Heartbeat) else {
                panic!()
            };
            Frame::Heartbeat(f::Heartbeat { version: 3, ..h }).encode_signed(&mut v, CLUSTER);
            v
        };
        assert_eq!(t.on_heartbeat(&v3, now, T0), Err(HeartbeatReject::UnsupportedVersion(3)));
        for sent in [T0 - 10_001, T0 + 10_001] {
            let r = t.on_heartbeat(&bytes(Hb { sent, ..hb("a", 1, 0, 100) }), now, T0);
            assert!(matches!(r, Err(HeartbeatReject::ClockSkew { .. })), "{r:?}");
        }
        assert!(t.find(b"a").is_none());
        for sent in [T0 - 10_000, T0 + 10_000] {
            t.on_heartbeat(&bytes(Hb { sent, ..hb(if sent < T0 { "x" } else { "y" }, 1, 0, 100) }), now, T0)
                .unwrap();
        }
        // Nothing verifies under an empty secret.
        let mut open = Table::new(TableConfig::default(), Settings::default(), 1);
        assert_eq!(
            open.on_heartbeat(&bytes_with(hb("a", 1, 0, 1), b""), now, T0),
            Err(HeartbeatReject::BadTag)
        );
        // Arbitrary garbage never panics.
        let mut rng = Rng::new(3);
        for len in 0..300 {
            let mut d: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if len >= 5 {
                d[..4].copy_from_slice(&(len as u32 - 4).to_be_bytes());
                d[4] = 0x40;
            }
            assert!(t.on_heartbeat(&d, now, T0).is_err());
        }
    }

    #[test]
    fn draining_by_heartbeat_or_admin() {
        let mut t = table(100);
        let now = Instant::now();
        t.on_heartbeat(&bytes(Hb { flags: NODE_DRAINING, ..hb("a", 1, 0, 100) }), now, T0).unwrap();
        t.on_heartbeat(&bytes(hb("b", 1, 0, 10)), now, T0).unwrap();
        let flags = |t: &mut Table| {
            let mut out = Vec::new();
            t.encode_nodes(now, &mut out);
            let Ok(Decoded::Frame(Frame::Nodes(n), _)) = decode(&out, Channel::FromDecision) else {
                panic!()
            };
            n.entries
                .iter()
                .map(|e| (String::from_utf8(e.node_id.to_vec()).unwrap(), e.flags))
                .collect::<Vec<_>>()
        };
        assert_eq!(flags(&mut t), [("a".into(), NODE_DRAINING), ("b".into(), 0)]);
        assert_eq!(first(&mut t, now).as_deref(), Some("b"), "the draining node has more headroom");
        assert_eq!(status_of(&admin(&mut t, T0, 1, AdminOp::Drain, "b", 0)), 0);
        // An admin's drain says so apart: a node follows that bit, not its
        // own heartbeat's flag coming back.
        assert_eq!(flags(&mut t), [("a".into(), NODE_DRAINING), ("b".into(), NODE_DRAINING | NODE_DRAINED)]);
        assert!(t.status(now).iter().all(|r| r.draining));
        assert_eq!(first(&mut t, now), None);
        assert_eq!(status_of(&admin(&mut t, T0, 2, AdminOp::Undrain, "b", 0)), 0);
        assert_eq!(flags(&mut t)[1].1, 0);
        assert_eq!(first(&mut t, now).as_deref(), Some("b"));
        // The node's own flag is not undone by an admin.
        assert_eq!(status_of(&admin(&mut t, T0, 3, AdminOp::Undrain, "a", 0)), 0);
        assert_eq!(flags(&mut t)[0].1, NODE_DRAINING);
    }

    #[test]
    fn admin_checks_tag_window_replay_and_operands() {
        let mut t = table(80);
        let now = Instant::now();
        t.on_heartbeat(&bytes(hb("a", 1, 0, 100)), now, T0).unwrap();
        assert_eq!(
            admin_with(&mut t, b"not-the-admin-secret", T0, 1, AdminOp::Status, "", 0),
            AdminAnswer::AuthFailed
        );
        assert_eq!(admin(&mut t, T0, 1, AdminOp::Status, "", 0), AdminAnswer::Status);
        assert_eq!(status_of(&admin(&mut t, T0, 1, AdminOp::Status, "", 0)), 15, "replayed pair");
        assert_eq!(admin(&mut t, T0, 2, AdminOp::Status, "", 0), AdminAnswer::Status, "new nonce");
        assert_eq!(admin(&mut t, T0 + 1, 1, AdminOp::Status, "", 0), AdminAnswer::Status, "new timestamp");
        assert_eq!(status_of(&admin(&mut t, T0 - 30_001, 9, AdminOp::Status, "", 0)), 15);
        assert_eq!(status_of(&admin(&mut t, T0 + 30_001, 9, AdminOp::Status, "", 0)), 15);
        assert_eq!(admin(&mut t, T0 + 30_000, 9, AdminOp::Status, "", 0), AdminAnswer::Status);
        for (op, node, value) in [
            (AdminOp::SetCeiling, "", 0),
            (AdminOp::SetCeiling, "", 101),
            (AdminOp::SetCeiling, "a", 101),
            (AdminOp::SetCeiling, "zz", 50),
            (AdminOp::SetCapacity, "", 10),
            (AdminOp::SetCapacity, "zz", 10),
            (AdminOp::Drain, "", 0),
            (AdminOp::Drain, "zz", 0),
            (AdminOp::Undrain, "", 0),
        ] {
            let r = admin(
                &mut t,
                T0,
                100 + value as u64 + node.len() as u64 * 1000 + op.to_u8() as u64 * 7,
                op,
                node,
                value,
            );
            assert_eq!(status_of(&r), 15, "{op:?} {node:?} {value}: {r:?}");
        }
        assert_eq!(t.settings(), &Settings::default(), "nothing changed");
        let r = admin(&mut t, T0, 50, AdminOp::Drain, "a", 0);
        assert_eq!(r, AdminAnswer::Result { status: 0, message: "node a drained".into(), changed: true });
        let r = admin(&mut t, T0, 51, AdminOp::Drain, "a", 0);
        assert!(matches!(r, AdminAnswer::Result { status: 0, changed: false, .. }));
        // The replay window forgets pairs that could no longer pass.
        t.sweep(now, T0 + 30_001);
        assert_eq!(t.admin_seen.len(), 2, "only the pairs at T0 + 1 ms and T0 + 30 s are left");
        let mut out = Vec::new();
        t.encode_status(now, &mut out);
        let Ok(Decoded::Frame(Frame::AdminStatus(s), _)) = decode(&out, Channel::FromDecision) else {
            panic!()
        };
        assert_eq!(s.ceiling_pct, 80);
        let row = s.entries.iter().next().unwrap();
        assert_eq!(
            (row.node_id, row.capacity, row.headroom, row.flags, row.msgs_out_per_s),
            (&b"a"[..], 100, 80, 1, 6)
        );
    }

    /// Settings survive a restart: a table built from the rendered and
    /// re-parsed settings behaves the same, including for nodes it has not
    /// seen yet.
    #[test]
    fn settings_round_trip_through_the_state_file_format() {
        let mut t = table(80);
        let now = Instant::now();
        t.on_heartbeat(&bytes(hb("a", 1, 0, 1000)), now, T0).unwrap();
        t.on_heartbeat(&bytes(hb("b", 1, 0, 1000)), now, T0).unwrap();
        for (n, (op, node, value)) in [
            (AdminOp::SetCeiling, "", 40),
            (AdminOp::SetCeiling, "a", 50),
            (AdminOp::SetCapacity, "a", 2000),
            (AdminOp::Drain, "b", 0),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(matches!(
                admin(&mut t, T0, n as u64, op, node, value),
                AdminAnswer::Result { status: 0, changed: true, .. }
            ));
        }
        let text = t.settings().render();
        let mut t2 = Table::new(
            TableConfig { cluster_secret: CLUSTER.to_vec(), ..TableConfig::default() },
            Settings::parse(&text).unwrap(),
            9,
        );
        assert_eq!(t2.settings(), t.settings());
        assert_eq!(t2.ceiling_pct(), 40);
        t2.on_heartbeat(&bytes(hb("a", 1, 0, 1000)), now, T0).unwrap();
        t2.on_heartbeat(&bytes(hb("b", 1, 0, 1000)), now, T0).unwrap();
        assert_eq!(t2.status(now), t.status(now));
        assert_eq!(t2.headroom(t2.find(b"a").unwrap()), 1000);
        assert_eq!(first(&mut t2, now).as_deref(), Some("a"), "b is drained");
    }

    #[test]
    fn heartbeats_sent_before_the_start_are_dropped() {
        let mut t = Table::new(
            TableConfig {
                cluster_secret: CLUSTER.to_vec(),
                heartbeats_not_before_ms: T0,
                ..TableConfig::default()
            },
            Settings::default(),
            7,
        );
        let now = Instant::now();
        let old = bytes(Hb { sent: T0 - 1, ..hb("a", 7, 0, 100) });
        assert_eq!(
            t.on_heartbeat(&old, now, T0 + 100),
            Err(HeartbeatReject::BeforeStart { sent_at_ms: T0 - 1, started_ms: T0 })
        );
        assert!(t.find(b"a").is_none());
        t.on_heartbeat(&bytes(hb("a", 8, 0, 100)), now, T0 + 100).unwrap();
    }

    #[test]
    fn admin_pairs_are_kept_and_without_a_state_file_old_requests_are_refused() {
        let mut t = table(80);
        t.on_heartbeat(&bytes(hb("a", 1, 0, 100)), Instant::now(), T0).unwrap();
        assert_eq!(status_of(&admin(&mut t, T0, 5, AdminOp::Drain, "a", 0)), 0);
        assert_eq!(t.admin_seen(), [(T0, 5)]);
        // A restarted table that reads the pairs back refuses the replay.
        let mut t2 = table(80);
        t2.on_heartbeat(&bytes(hb("a", 1, 0, 100)), Instant::now(), T0).unwrap();
        t2.remember_admin(t.admin_seen());
        assert_eq!(status_of(&admin(&mut t2, T0, 5, AdminOp::Drain, "a", 0)), 15);
        // Without them, a server started at T0 refuses what was signed before.
        let mut t3 = Table::new(
            TableConfig { admin_secret: ADMIN.to_vec(), admin_not_before_ms: T0, ..TableConfig::default() },
            Settings::default(),
            7,
        );
        assert_eq!(status_of(&admin(&mut t3, T0 - 1, 6, AdminOp::SetCeiling, "", 50)), 15);
        assert_eq!(status_of(&admin(&mut t3, T0, 7, AdminOp::SetCeiling, "", 50)), 0);
    }
}
