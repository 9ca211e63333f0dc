//! Many simulated clients on one mio loop: what `herald demo` and
//! `herald-probe` use to stand in for thousands of trading desks.
//!
//! Each simulated client connects (directly, or to the node a decision
//! server assigns), authenticates, and checks every DELIVER it gets: the
//! payload starts with a [`Stamp`] naming the intended send time, the user it
//! was meant for and that user's message number, so the swarm can tell a
//! message that went to the wrong user, a duplicate, or a loss, and measure
//! latency from the *intended* send time (corrected for coordinated
//! omission). With `reconnect` on, a client whose connection drops (node
//! killed, drained) gets a new node and resumes; losses the protocol
//! announced (a RESTARTED or GAP welcome) are counted apart from silent ones,
//! and each silent one is kept as a [`Swarm::silent_ranges`] entry so a
//! coordinator that knows what the nodes confirmed can tell whether it was
//! lost after a publisher was told it was routed (`herald-probe soak`).
//! A message that arrives after a later one of its user's, into such a
//! silent jump, is counted as [`Tally::late`] (reordered: its jump stays
//! counted in `silent_gaps`, and it is no duplicate): messages of one user
//! that took different publisher connections, or different nodes sharing a
//! queue consumer, are not ordered (protocol.md §5.7, §12).
//!
//! Conflation (protocol.md §5.7, §3.8): a CONFLATED frame moves a client's
//! position past the messages a later one of the same key replaced; the
//! messages it covers are counted in [`Tally::conflated`], accounted for,
//! not lost (a jump in message numbers the CONFLATED frames before it
//! explain is no gap). Some clients can read slowly ([`SlowReaders`]): a
//! small receive buffer asked for before connecting, and a byte budget a
//! second; what they get is counted apart ([`SlowStats`]), with the age of
//! each keyed message they receive (its staleness) instead of latency, and
//! every unkeyed message they never got ([`Unkeyed`] says which are).
//!
//! Rooms: this file is the swarm's loop and its tally; `slow.rs` the slow
//! readers' model and figures; `worker.rs` the worker process a
//! coordinator drives over stdin/stdout ([`run_worker`], [`forward_lines`]).

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::net::transport::Transport;
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{decode, token, Channel, Decoded, Position, ResumeResult, MIN_VERSION, VERSION};

mod slow;
mod worker;

pub use slow::{SlowReaders, SlowStats, Unkeyed};
use slow::{Throttle, SLOW_PING};
pub use worker::{forward_lines, run_worker};

/// The first 16 bytes of every payload the probe and the demo publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Intended send time, CLOCK_MONOTONIC nanoseconds.
    pub sent_ns: u64,
    /// Index of the user the message is for.
    pub user: u32,
    /// That user's message number, from 0.
    pub msg: u32,
}

impl Stamp {
    /// Bytes in a stamp.
    pub const LEN: usize = 16;

    /// Writes the stamp into the first 16 bytes of `p` (which must be that long).
    pub fn write(&self, p: &mut [u8]) {
        p[0..8].copy_from_slice(&self.sent_ns.to_be_bytes());
        p[8..12].copy_from_slice(&self.user.to_be_bytes());
        p[12..16].copy_from_slice(&self.msg.to_be_bytes());
    }

    /// Reads a stamp from the start of a payload.
    pub fn read(p: &[u8]) -> Option<Stamp> {
        let b: &[u8; 16] = p.get(..16)?.try_into().ok()?;
        Some(Stamp {
            sent_ns: u64::from_be_bytes(b[0..8].try_into().ok()?),
            user: u32::from_be_bytes(b[8..12].try_into().ok()?),
            msg: u32::from_be_bytes(b[12..16].try_into().ok()?),
        })
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The user id of simulated user `i`.
pub fn user_name(i: usize) -> String {
    format!("u{i}")
}

/// Reconnections started per [`Swarm::step`].
const MAX_RESTARTS_PER_STEP: usize = 32;

/// How the swarm finds and authenticates with nodes.
#[derive(Debug, Clone, Default)]
pub struct SwarmConfig {
    /// First user index.
    pub first: usize,
    /// Number of clients.
    pub count: usize,
    /// Node client endpoints; user `i` uses `nodes[i % len]` unless `decision` is set.
    pub nodes: Vec<String>,
    /// Decision servers to ask for a node.
    pub decision: Vec<String>,
    /// Client-token secret (empty with `plain`).
    pub secret: Vec<u8>,
    /// Target is the minimal forwarder: the token is the user id.
    pub plain: bool,
    /// Local source addresses to spread connections over.
    pub source: Vec<IpAddr>,
    /// Reconnect (and resume) when a connection drops.
    pub reconnect: bool,
    /// Speak TLS to the nodes, verifying each node's certificate for the
    /// host (or IP address) of its endpoint with this configuration.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Speak TLS to the decision servers, verifying them with this
    /// configuration.
    pub decision_tls: Option<Arc<rustls::ClientConfig>>,
    /// Clients that read slowly (none by default).
    pub slow: SlowReaders,
    /// Which of each user's messages the publisher sends without a key.
    pub unkeyed: Unkeyed,
}

/// What the swarm counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Messages received.
    pub received: u64,
    /// Messages for another user (must be 0).
    pub wrong_user: u64,
    /// Messages seen twice.
    pub dups: u64,
    /// Messages missing without the protocol saying so (must be 0).
    pub silent_gaps: u64,
    /// Messages missing across a RESTARTED/GAP welcome: lost, but announced.
    pub announced_gaps: u64,
    /// Messages that came after a later one of their user's, into a jump
    /// counted in `silent_gaps` (reordered, not lost: `silent_gaps - late`
    /// are still missing).
    pub late: u64,
    /// Connections that closed.
    pub closed: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Clients that completed the handshake at least once.
    pub welcomed: u64,
    /// Messages conflated away (the seqs CONFLATED frames covered):
    /// replaced by a later message of the same key, not lost.
    pub conflated: u64,
    /// Reconnections welcomed RESUMED: the stream went on from the
    /// client's position (with a replay of what it had missed).
    pub resumed: u64,
    /// Reconnections welcomed RESTARTED: the client's stream is gone (its
    /// node died without durable mode); what it missed is lost, announced.
    pub restarted: u64,
    /// Reconnections welcomed GAP: some of what the client missed is no
    /// longer held; lost, announced.
    pub gapped: u64,
}

impl Tally {
    /// The worker protocol's `RESULT …` line (see [`run_worker`]).
    pub fn result_line(&self) -> String {
        format!(
            "RESULT {} {} {} {} {} {} {} {} {} {} {} {} {}",
            self.received,
            self.wrong_user,
            self.dups,
            self.silent_gaps,
            self.announced_gaps,
            self.closed,
            self.reconnects,
            self.welcomed,
            self.late,
            self.conflated,
            self.resumed,
            self.restarted,
            self.gapped
        )
    }

    /// Parses a line written by [`Tally::result_line`].
    pub fn parse_result_line(line: &str) -> Option<Tally> {
        let mut p = line.split_whitespace();
        if p.next()? != "RESULT" {
            return None;
        }
        let n: Vec<u64> = p.map(|x| x.parse().ok()).collect::<Option<_>>()?;
        // Older workers wrote 8, 9 or 10 numbers.
        let (late, conflated, welcomes, n) = match n.len() {
            13 => (n[8], n[9], [n[10], n[11], n[12]], &n[..8]),
            10 => (n[8], n[9], [0; 3], &n[..8]),
            9 => (n[8], 0, [0; 3], &n[..8]),
            _ => (0, 0, [0; 3], &n[..]),
        };
        let [resumed, restarted, gapped] = welcomes;
        let [received, wrong_user, dups, silent_gaps, announced_gaps, closed, reconnects, welcomed] = n[..]
        else {
            return None;
        };
        Some(Tally {
            received,
            wrong_user,
            dups,
            silent_gaps,
            announced_gaps,
            late,
            closed,
            reconnects,
            welcomed,
            conflated,
            resumed,
            restarted,
            gapped,
        })
    }

    /// Adds another tally.
    pub fn add(&mut self, o: &Tally) {
        self.received += o.received;
        self.wrong_user += o.wrong_user;
        self.dups += o.dups;
        self.silent_gaps += o.silent_gaps;
        self.announced_gaps += o.announced_gaps;
        self.late += o.late;
        self.closed += o.closed;
        self.reconnects += o.reconnects;
        self.welcomed += o.welcomed;
        self.conflated += o.conflated;
        self.resumed += o.resumed;
        self.restarted += o.restarted;
        self.gapped += o.gapped;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started yet.
    Idle,
    Handshake,
    Live,
    Down {
        retry_at: Instant,
    },
}

struct SConn {
    sock: Option<Transport>,
    user: u32,
    phase: Phase,
    next_msg: u32,
    /// After a RESTARTED/GAP welcome the next jump in msg numbers is announced.
    announced: bool,
    ever_welcomed: bool,
    pos: Option<Position>,
    node: String,
    rbuf: Vec<u8>,
    failures: u32,
    /// Lost its connection after [`Swarm::kill_ns`]: waiting to be re-homed.
    rehoming: bool,
    /// Re-homed, waiting for the first message.
    await_msg: bool,
    /// The latest silent jumps not yet filled by late messages: [from, to).
    holes: Vec<(u32, u32)>,
    /// Messages CONFLATED frames covered since the last stamped DELIVER:
    /// the jump in message numbers they explain.
    conflated_pending: u64,
    /// Set for a slow reader.
    slow: Option<Box<Throttle>>,
}

/// Silent jumps a client remembers, for telling a late message from a
/// duplicate.
const MAX_HOLES: usize = 8;

impl SConn {
    /// Remembers the silent jump [from, to).
    fn note_hole(&mut self, from: u32, to: u32) {
        self.holes.push((from, to));
        if self.holes.len() > MAX_HOLES {
            self.holes.remove(0);
        }
    }

    /// Whether `msg` falls in a silent jump (a late message); takes it out.
    fn fill_hole(&mut self, msg: u32) -> bool {
        let Some(i) = self.holes.iter().position(|&(a, b)| a <= msg && msg < b) else { return false };
        let (a, b) = self.holes[i];
        self.holes.remove(i);
        for part in [(msg + 1, b), (a, msg)] {
            if part.0 < part.1 {
                self.holes.insert(i, part);
            }
        }
        if self.holes.len() > MAX_HOLES {
            self.holes.remove(0);
        }
        true
    }
}

/// The simulated clients. See the module docs.
pub struct Swarm {
    cfg: SwarmConfig,
    poll: mio::Poll,
    conns: Vec<SConn>,
    /// Latency from intended send time, nanoseconds.
    pub hist: Histogram<u64>,
    /// Counts.
    pub tally: Tally,
    /// Messages stamped before this (monotonic ns) are not recorded in `hist`.
    pub record_after: u64,
    scratch: Vec<u8>,
    events: mio::Events,
    expires: u64,
    /// Clients currently connected and welcomed.
    pub live: usize,
    /// When a node was killed (CLOCK_MONOTONIC ns; 0: none). Clients that
    /// lose their connection after it are timed until they are back.
    pub kill_ns: u64,
    /// Kill to WELCOME on the new node, ns, per re-homed client.
    pub rehome_welcome: Histogram<u64>,
    /// Kill to the first message on the new node, ns, per re-homed client.
    pub rehome_message: Histogram<u64>,
    decision_conn: Option<crate::dial::Stream>,
    restarts_pending: bool,
    /// Each jump in a user's message numbers that no RESTARTED/GAP welcome
    /// announced, as (user, first missing msg, first msg after the jump);
    /// the owner drains it.
    pub silent_ranges: Vec<(u32, u32, u32)>,
    /// The slow readers' clients, by index.
    slow_idx: Vec<usize>,
    /// What the slow readers counted so far (but `unkeyed_lost`, which
    /// [`Swarm::slow_stats`] works out).
    slow: SlowStats,
    /// The slow readers still read slowly ([`Swarm::unthrottle`]).
    throttled: bool,
}

/// A connected socket to `node`, from `source` if given, with a receive
/// buffer of `rcvbuf` bytes asked for before connecting (0: the default).
fn connect_one(node: SocketAddr, source: Option<IpAddr>, rcvbuf: usize) -> std::io::Result<TcpStream> {
    if source.is_none() && rcvbuf == 0 {
        return TcpStream::connect_timeout(&node, Duration::from_secs(2));
    }
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(node), Type::STREAM, None)?;
    if rcvbuf > 0 {
        s.set_recv_buffer_size(rcvbuf)?;
    }
    if let Some(ip) = source {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&node.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

impl Swarm {
    /// A swarm of `cfg.count` clients; nothing is connected yet.
    pub fn new(cfg: SwarmConfig) -> std::io::Result<Swarm> {
        let now = Instant::now();
        let conns: Vec<SConn> = (0..cfg.count)
            .map(|i| SConn {
                sock: None,
                user: (cfg.first + i) as u32,
                phase: Phase::Idle,
                next_msg: 0,
                announced: false,
                ever_welcomed: false,
                pos: None,
                node: String::new(),
                rbuf: Vec::new(),
                failures: 0,
                rehoming: false,
                await_msg: false,
                holes: Vec::new(),
                conflated_pending: 0,
                slow: cfg.slow.is_slow(cfg.first + i).then(|| Box::new(Throttle::new(now))),
            })
            .collect();
        let slow_idx: Vec<usize> = (0..conns.len()).filter(|&i| conns[i].slow.is_some()).collect();
        let mut slow = SlowStats::new();
        slow.clients = slow_idx.len() as u64;
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + 7 * 86_400;
        Ok(Swarm {
            cfg,
            poll: mio::Poll::new()?,
            conns,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            tally: Tally::default(),
            record_after: u64::MAX,
            scratch: vec![0u8; 256 * 1024],
            events: mio::Events::with_capacity(4096),
            expires,
            live: 0,
            kill_ns: 0,
            rehome_welcome: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
            rehome_message: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
            decision_conn: None,
            restarts_pending: false,
            silent_ranges: Vec::new(),
            slow_idx,
            slow,
            throttled: true,
        })
    }

    /// From now on the slow readers read at full speed, so that what they
    /// were sent arrives and can be accounted for; their staleness is no
    /// longer recorded.
    pub fn unthrottle(&mut self) {
        self.throttled = false;
        for &i in &self.slow_idx {
            if let Some(t) = self.conns[i].slow.as_mut() {
                t.readable = true;
            }
        }
    }

    /// What the slow readers counted, with the unkeyed messages each never
    /// got below its highest message number.
    pub fn slow_stats(&self) -> SlowStats {
        let mut s = self.slow.clone();
        s.unkeyed_lost = self
            .slow_idx
            .iter()
            .map(|&i| {
                let c = &self.conns[i];
                let t = c.slow.as_deref().expect("a slow reader");
                (0..c.next_msg).filter(|&n| self.cfg.unkeyed.is_unkeyed(n) && !t.has(n)).count() as u64
            })
            .sum();
        s
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether the swarm has no clients.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Users whose client is connected and welcomed at `endpoint`.
    pub fn users_on<'a>(&'a self, endpoint: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.conns
            .iter()
            .filter(move |c| c.phase == Phase::Live && c.node == endpoint)
            .map(|c| c.user as usize)
    }

    /// Clients per node endpoint, for status lines.
    pub fn per_node(&self) -> Vec<(String, usize)> {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for c in &self.conns {
            if c.phase == Phase::Live {
                *m.entry(c.node.clone()).or_default() += 1;
            }
        }
        m.into_iter().collect()
    }

    /// Where client `i` should try to connect, in order: its node while
    /// that keeps working, else the decision servers' ranked answer, else
    /// the static list.
    fn candidates(&mut self, i: usize) -> Vec<String> {
        let c = &self.conns[i];
        if !c.node.is_empty() && c.failures == 0 {
            return vec![c.node.clone()];
        }
        if !self.cfg.decision.is_empty() {
            let name = user_name(c.user as usize);
            let tok = if self.cfg.plain { String::new() } else { self.token(&name) };
            if let Some(v) = self.assign_pipelined(name.as_bytes(), tok.as_bytes()) {
                return v;
            }
            return match crate::decision::client::assign(
                &self.cfg.decision,
                name.as_bytes(),
                tok.as_bytes(),
                3,
                &crate::decision::client::Dial::new(
                    Duration::from_millis(500),
                    self.cfg.decision_tls.clone(),
                ),
            ) {
                Ok(crate::decision::client::AssignOutcome::Nodes(n)) => {
                    n.into_iter().map(|a| a.endpoint).collect()
                }
                _ => Vec::new(),
            };
        }
        let n = self.cfg.nodes.len();
        if n == 0 {
            return Vec::new();
        }
        (0..n).map(|k| self.cfg.nodes[(c.user as usize + c.failures as usize + k) % n].clone()).collect()
    }

    /// Asks for an assignment over one persistent connection to a decision
    /// server (protocol.md §7 allows several requests per connection). Real
    /// clients each connect once from their own machine; a swarm of
    /// thousands in one process would otherwise spend its time in connect
    /// and close. `None` if no decision server answers (the caller falls
    /// back to connect-per-request over every server).
    fn assign_pipelined(&mut self, user: &[u8], token: &[u8]) -> Option<Vec<String>> {
        use crate::protocol::frame::AssignRequest;
        for _ in 0..2 {
            if self.decision_conn.is_none() {
                let tls = self.cfg.decision_tls.as_ref();
                self.decision_conn = self.cfg.decision.iter().find_map(|d| {
                    let (s, _) = crate::dial::dial_stream(d, Duration::from_millis(500), tls).ok()?;
                    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                    Some(s)
                });
            }
            let s = self.decision_conn.as_mut()?;
            // Version 2 with the token (protocol.md §7.1): the swarm's
            // decision servers are this build's, which speak it.
            let version = if token.is_empty() { 1 } else { VERSION };
            let req = Frame::AssignRequest(AssignRequest { version, user, max_results: 3, token }).to_vec();
            let mut buf = Vec::with_capacity(512);
            let ok = s.write_all(&req).is_ok() && {
                let mut chunk = [0u8; 4096];
                loop {
                    match decode(&buf, Channel::FromDecision) {
                        Ok(Decoded::Frame(_, _)) => break true,
                        Ok(Decoded::Incomplete(_)) => match s.read(&mut chunk) {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => break false,
                        },
                        Err(_) => break false,
                    }
                }
            };
            if !ok {
                self.decision_conn = None;
                continue;
            }
            match decode(&buf, Channel::FromDecision) {
                Ok(Decoded::Frame(Frame::Assignment(a), _)) => {
                    return Some(
                        a.entries.iter().map(|e| String::from_utf8_lossy(e.endpoint).into_owned()).collect(),
                    );
                }
                Ok(Decoded::Frame(Frame::NoCapacity(_), _)) => return Some(Vec::new()),
                // An ERROR (e.g. the server closed the connection as idle):
                // reconnect and ask again.
                _ => self.decision_conn = None,
            }
        }
        None
    }

    /// Starts the connection of client `i` (blocking connect, then HELLO),
    /// trying each candidate node in turn.
    fn start(&mut self, i: usize, now: Instant) {
        let src = (!self.cfg.source.is_empty()).then(|| self.cfg.source[i % self.cfg.source.len()]);
        let mut connected = None;
        let mut cands = self.candidates(i);
        if self.conns[i].failures > 0 {
            crate::decision::client::failed_last(&mut cands, &self.conns[i].node);
        }
        for node in cands {
            let Some(addr) = std::net::ToSocketAddrs::to_socket_addrs(&node).ok().and_then(|mut a| a.next())
            else {
                continue;
            };
            if let Ok(s) =
                connect_one(addr, src, if self.conns[i].slow.is_some() { self.cfg.slow.rcvbuf } else { 0 })
            {
                connected = Some((node, s));
                break;
            }
        }
        let Some((node, s)) = connected else {
            self.fail(i, now);
            return;
        };
        let _ = s.set_nodelay(true);
        let name = user_name(self.conns[i].user as usize);
        let tok = if self.cfg.plain { name } else { self.token(&name) };
        let resume = if self.cfg.reconnect { self.conns[i].pos } else { None };
        let hello = Frame::Hello(f::Hello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            token: tok.as_bytes(),
            agent: b"herald-swarm",
            resume,
        })
        .to_vec();
        if s.set_nonblocking(true).is_err() {
            self.fail(i, now);
            return;
        }
        let sock = mio::net::TcpStream::from_std(s);
        let mut sock = match &self.cfg.tls {
            None => Transport::plain(sock),
            Some(cfg) => match crate::tls::server_name(&node)
                .and_then(|name| Transport::tls_client(sock, cfg.clone(), name))
            {
                Ok(t) => t,
                Err(e) => {
                    log::warn!("swarm: TLS to {node}: {e}");
                    self.fail(i, now);
                    return;
                }
            },
        };
        // A fresh socket takes a HELLO whole (over TLS, rustls keeps it
        // until the handshake is done and sends it then).
        let interest = if sock.is_tls() {
            mio::Interest::READABLE | mio::Interest::WRITABLE
        } else {
            mio::Interest::READABLE
        };
        if !matches!(sock.write(&hello), Ok(n) if n == hello.len())
            || sock.flush().is_err()
            || self.poll.registry().register(&mut sock, mio::Token(i), interest).is_err()
        {
            self.fail(i, now);
            return;
        }
        let c = &mut self.conns[i];
        c.sock = Some(sock);
        c.node = node;
        c.rbuf.clear();
        if let Some(t) = c.slow.as_mut() {
            t.readable = true;
            t.next_ping = now + SLOW_PING;
        }
        if self.cfg.plain {
            c.phase = Phase::Live;
            self.live += 1;
            if !c.ever_welcomed {
                c.ever_welcomed = true;
                self.tally.welcomed += 1;
            }
        } else {
            c.phase = Phase::Handshake;
        }
    }

    /// A client token for user `name`, minted with the swarm's secret.
    fn token(&self, name: &str) -> String {
        token::mint(&self.cfg.secret, name.as_bytes(), self.expires).unwrap_or_default()
    }

    fn fail(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
            if c.slow.is_some() && c.ever_welcomed {
                self.slow.closed += 1;
            }
        }
        if c.phase == Phase::Live {
            self.live -= 1;
            if self.kill_ns != 0 && !c.rehoming {
                c.rehoming = true;
                c.await_msg = false;
            }
        }
        c.failures = c.failures.saturating_add(1);
        let backoff = Duration::from_millis((50u64 << c.failures.min(6)).min(2000));
        // Spread retries so a node's clients do not all return at once.
        let jitter = Duration::from_millis((i as u64 * 7919) % (backoff.as_millis() as u64 + 1));
        c.phase = Phase::Down { retry_at: now + backoff / 2 + jitter / 2 };
    }

    /// Connects every client, calling `progress(welcomed)` now and then.
    /// Returns how many completed the handshake within `timeout`.
    pub fn connect_all(&mut self, timeout: Duration, mut progress: impl FnMut(usize)) -> usize {
        let deadline = Instant::now() + timeout;
        for i in 0..self.conns.len() {
            if self.conns[i].phase == Phase::Idle {
                self.start(i, Instant::now());
            }
            if i % 256 == 255 {
                self.step(Duration::ZERO);
                progress(self.tally.welcomed as usize);
            }
        }
        while (self.tally.welcomed as usize) < self.conns.len() && Instant::now() < deadline {
            self.step(Duration::from_millis(20));
            progress(self.tally.welcomed as usize);
        }
        self.tally.welcomed as usize
    }

    /// A reconnect wave: closes the connection of every `per_mille`-th live
    /// client in a thousand (chosen by user number and `round`, so
    /// successive waves pick different clients). Each reconnects within
    /// about a second, asking the decision servers afresh (it may move
    /// node) and resuming from the last message it saw. Returns how many
    /// were dropped.
    pub fn drop_wave(&mut self, per_mille: u32, round: u32, now: Instant) -> usize {
        let mut dropped = 0;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            let pick = (c.user.wrapping_mul(2_654_435_761).wrapping_add(round.wrapping_mul(40_503))) % 1000;
            if c.phase != Phase::Live || pick >= per_mille {
                continue;
            }
            self.fail(i, now);
            let c = &mut self.conns[i];
            c.failures = 0;
            if !self.cfg.decision.is_empty() {
                c.node.clear();
            }
            c.phase = Phase::Down { retry_at: now + Duration::from_millis((i as u64 * 7919) % 1000) };
            dropped += 1;
        }
        dropped
    }

    /// One poll: reads what arrived, restarts clients whose retry time came.
    pub fn step(&mut self, timeout: Duration) {
        let mut events = std::mem::replace(&mut self.events, mio::Events::with_capacity(1));
        // Clients are waiting to reconnect: do not sleep in poll. Slow
        // readers with more to read read again within 10 ms.
        let timeout = if self.restarts_pending {
            Duration::ZERO
        } else if self.slow_idx.is_empty() {
            timeout
        } else {
            timeout.min(Duration::from_millis(10))
        };
        if self.poll.poll(&mut events, Some(timeout)).is_err() {
            self.events = events;
            return;
        }
        let now = Instant::now();
        for ev in events.iter() {
            self.read(ev.token().0, now);
        }
        self.events = events;
        self.slow_turn(now);
        if self.cfg.reconnect || self.tally.welcomed < self.conns.len() as u64 {
            // A bounded number of (blocking) restarts per step, so replies
            // to earlier ones are read, and timed, promptly.
            let mut restarted = 0;
            self.restarts_pending = false;
            for i in 0..self.conns.len() {
                if restarted >= MAX_RESTARTS_PER_STEP {
                    self.restarts_pending = true;
                    break;
                }
                if let Phase::Down { retry_at } = self.conns[i].phase {
                    if now >= retry_at && (self.cfg.reconnect || !self.conns[i].ever_welcomed) {
                        self.start(i, now);
                        restarted += 1;
                    }
                }
            }
        }
    }

    /// The slow readers' turn: each reads what its budget allows if its
    /// socket may hold more, and sends its PING when due.
    fn slow_turn(&mut self, now: Instant) {
        for k in 0..self.slow_idx.len() {
            let i = self.slow_idx[k];
            let c = &mut self.conns[i];
            let Some(t) = c.slow.as_mut() else { continue };
            if c.phase == Phase::Live && now >= t.next_ping {
                t.next_ping = now + SLOW_PING;
                if let Some(s) = c.sock.as_mut() {
                    let _ = s.write(&Frame::Ping(0).to_vec());
                    let _ = s.flush();
                }
            }
            if c.sock.is_some() && t.readable {
                self.read(i, now);
            }
        }
    }

    fn read(&mut self, i: usize, now: Instant) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let bps = self.cfg.slow.bps;
        while let Some(c) = self.conns.get_mut(i).filter(|c| c.sock.is_some()) {
            // A slow reader reads once, what its budget allows.
            let limit = match c.slow.as_mut().filter(|_| self.throttled) {
                Some(t) => {
                    t.refill(now, bps);
                    t.readable = true;
                    (t.tokens as usize).min(scratch.len())
                }
                None => scratch.len(),
            };
            if limit == 0 {
                break;
            }
            let sock = c.sock.as_mut().expect("checked");
            match sock.read(&mut scratch[..limit]) {
                Ok(0) => {
                    self.tally.closed += 1;
                    self.fail(i, now);
                    break;
                }
                Ok(n) => {
                    let t = mono_ns();
                    let mut buf = std::mem::take(&mut self.conns[i].rbuf);
                    buf.extend_from_slice(&scratch[..n]);
                    let used = self.frames(i, &buf, t, now);
                    if self.conns[i].sock.is_none() {
                        break;
                    }
                    buf.drain(..used);
                    self.conns[i].rbuf = buf;
                    if let Some(t) = self.conns[i].slow.as_mut().filter(|_| self.throttled) {
                        t.tokens -= n as f64;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(t) = self.conns[i].slow.as_mut() {
                        t.readable = false;
                    }
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.tally.closed += 1;
                    self.fail(i, now);
                    break;
                }
            }
        }
        // TLS: what reading asked to send (the handshake's last flight, the
        // HELLO rustls kept until then, PONGs), as far as the socket takes it;
        // the rest goes on the next WRITABLE.
        if let Some(sock) = self.conns.get_mut(i).and_then(|c| c.sock.as_mut()) {
            if sock.wants_write() && sock.flush().is_err() {
                self.tally.closed += 1;
                self.fail(i, now);
            }
        }
        self.scratch = scratch;
    }

    /// Handles complete frames in `buf`; returns the bytes used.
    fn frames(&mut self, i: usize, buf: &[u8], t: u64, now: Instant) -> usize {
        let mut at = 0;
        while let Ok(Decoded::Frame(fr, used)) = decode(&buf[at..], Channel::ToClient) {
            at += used;
            let c = &mut self.conns[i];
            match fr {
                Frame::Deliver(d) => {
                    // A seq jump within the stream announces what it skips
                    // (the drop policy, §3.3).
                    let seq_jump = matches!(c.pos, Some(p) if p.epoch == d.epoch && d.seq > p.seq + 1);
                    c.pos = Some(Position { epoch: d.epoch, seq: d.seq });
                    if c.await_msg {
                        c.await_msg = false;
                        let _ = self.rehome_message.record(t.saturating_sub(self.kill_ns).max(1));
                    }
                    let Some(st) = Stamp::read(d.payload) else { continue };
                    self.tally.received += 1;
                    if st.user != c.user {
                        self.tally.wrong_user += 1;
                    }
                    if st.msg < c.next_msg {
                        if c.fill_hole(st.msg) {
                            self.tally.late += 1;
                        } else {
                            self.tally.dups += 1;
                        }
                    } else {
                        // What the CONFLATED frames since the last message
                        // covered is no gap.
                        let jump = (st.msg - c.next_msg) as u64;
                        let missing = jump - jump.min(std::mem::take(&mut c.conflated_pending));
                        if c.announced || seq_jump {
                            self.tally.announced_gaps += missing;
                        } else if missing > 0 {
                            self.tally.silent_gaps += missing;
                            self.silent_ranges.push((c.user, c.next_msg, st.msg));
                            c.note_hole(c.next_msg, st.msg);
                        }
                        c.announced = false;
                        c.next_msg = st.msg + 1;
                    }
                    match c.slow.as_mut() {
                        None => {
                            if st.sent_ns >= self.record_after {
                                let _ = self.hist.record(t.saturating_sub(st.sent_ns).max(1));
                            }
                        }
                        Some(th) => {
                            th.mark(st.msg);
                            self.slow.received += 1;
                            if st.sent_ns >= self.record_after && self.throttled {
                                let h = if self.cfg.unkeyed.is_unkeyed(st.msg) {
                                    &mut self.slow.unkeyed_age
                                } else {
                                    &mut self.slow.stale
                                };
                                let _ = h.record(t.saturating_sub(st.sent_ns).max(1));
                            }
                        }
                    }
                }
                Frame::Conflated(cf) => {
                    // The position rules of protocol.md §3.8.
                    let Some(p) = c.pos.filter(|p| p.epoch == cf.epoch) else {
                        log::warn!("swarm: {} got CONFLATED for another stream", user_name(c.user as usize));
                        self.tally.closed += 1;
                        self.fail(i, now);
                        return at;
                    };
                    if cf.last_seq <= p.seq {
                        continue;
                    }
                    if cf.first_seq > p.seq + 1 {
                        // A gap first, announced as a seq jump is.
                        c.announced = true;
                    }
                    let n = cf.last_seq - cf.first_seq.max(p.seq + 1) + 1;
                    c.pos = Some(Position { epoch: cf.epoch, seq: cf.last_seq });
                    c.conflated_pending += n;
                    self.tally.conflated += n;
                    if c.slow.is_some() {
                        self.slow.conflated += n;
                    }
                }
                Frame::Welcome(w) if c.phase == Phase::Handshake => {
                    c.phase = Phase::Live;
                    self.live += 1;
                    if c.ever_welcomed {
                        self.tally.reconnects += 1;
                        match w.resume {
                            ResumeResult::Resumed => self.tally.resumed += 1,
                            ResumeResult::Restarted => self.tally.restarted += 1,
                            ResumeResult::Gap => self.tally.gapped += 1,
                            _ => {}
                        }
                        if c.slow.is_some() {
                            self.slow.reconnects += 1;
                        }
                    } else {
                        self.tally.welcomed += 1;
                        c.ever_welcomed = true;
                    }
                    c.failures = 0;
                    if c.rehoming {
                        c.rehoming = false;
                        c.await_msg = true;
                        let _ = self.rehome_welcome.record(t.saturating_sub(self.kill_ns).max(1));
                    }
                    if matches!(w.resume, ResumeResult::Restarted | ResumeResult::Gap) {
                        c.announced = true;
                        c.conflated_pending = 0;
                    }
                    if w.resume != ResumeResult::Resumed {
                        c.pos = Some(Position { epoch: w.epoch, seq: w.next_seq.saturating_sub(1) });
                    }
                }
                Frame::Ping(p) => {
                    let pong = Frame::Pong(p).to_vec();
                    if let Some(s) = c.sock.as_mut() {
                        let _ = s.write(&pong);
                    }
                }
                Frame::Goodbye(g) => {
                    // Move: ask again (decision) or retry, after the delay.
                    let delay = Duration::from_millis(g.delay_ms as u64);
                    c.node.clear();
                    self.tally.closed += 1;
                    self.fail(i, now);
                    self.conns[i].failures = 0;
                    self.conns[i].phase = Phase::Down { retry_at: now + delay };
                    return at;
                }
                Frame::Error(_) => {
                    self.tally.closed += 1;
                    self.fail(i, now);
                    return at;
                }
                _ => {}
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let s = Stamp { sent_ns: 123_456_789, user: 42, msg: 7 };
        let mut p = [0u8; 20];
        s.write(&mut p);
        assert_eq!(Stamp::read(&p), Some(s));
        assert_eq!(Stamp::read(&p[..15]), None);
    }

    #[test]
    fn a_late_message_fills_its_silent_jump_and_is_no_duplicate() {
        let mut sw = Swarm::new(SwarmConfig { count: 1, ..SwarmConfig::default() }).unwrap();
        let c = &mut sw.conns[0];
        c.note_hole(3, 7);
        assert!(c.fill_hole(5));
        assert_eq!(c.holes, [(3, 5), (6, 7)]);
        assert!(!c.fill_hole(5), "a second copy is a duplicate");
        assert!(c.fill_hole(6) && c.fill_hole(3) && c.fill_hole(4));
        assert!(c.holes.is_empty());
        for k in 0..MAX_HOLES as u32 + 2 {
            c.note_hole(10 * k, 10 * k + 1);
        }
        assert_eq!(c.holes.len(), MAX_HOLES);
        assert!(!c.fill_hole(0), "the oldest jumps are forgotten");
    }

    /// A DELIVER of message `msg` of user 0 at `seq`.
    fn deliver(out: &mut Vec<u8>, seq: u64, msg: u32) {
        let mut p = [0u8; 20];
        Stamp { sent_ns: 1, user: 0, msg }.write(&mut p);
        f::encode_deliver(out, 7, seq, &p);
    }

    /// A CONFLATED for `first..=last`, naming key "k".
    fn conflated(out: &mut Vec<u8>, first: u64, last: u64) {
        let body: Vec<u8> =
            [&7u64.to_be_bytes()[..], &first.to_be_bytes(), &last.to_be_bytes(), &[1, 1, b'k']].concat();
        out.extend_from_slice(&(1 + body.len() as u32).to_be_bytes());
        out.push(f::ty::CONFLATED);
        out.extend_from_slice(&body);
    }

    #[test]
    fn conflated_messages_are_accounted_for_not_lost() {
        let cfg = SwarmConfig {
            count: 1,
            slow: SlowReaders { count: 1, first: 0, stride: 1, bps: 1000, rcvbuf: 0 },
            // Messages 0, 4, 8, … are unkeyed.
            unkeyed: Unkeyed { every: 4, below: 1 },
            ..SwarmConfig::default()
        };
        let mut sw = Swarm::new(cfg).unwrap();
        sw.record_after = 0;
        sw.conns[0].phase = Phase::Live;
        sw.conns[0].pos = Some(Position { epoch: 7, seq: 0 });
        let mut b = Vec::new();
        deliver(&mut b, 1, 0);
        conflated(&mut b, 2, 3); // messages 1 and 2
        deliver(&mut b, 4, 3);
        deliver(&mut b, 5, 4);
        conflated(&mut b, 6, 6); // message 5
        conflated(&mut b, 6, 6); // a repeat: discarded
        deliver(&mut b, 7, 6);
        let now = Instant::now();
        assert_eq!(sw.frames(0, &b, 10, now), b.len());
        let t = sw.tally;
        assert_eq!((t.received, t.conflated, t.silent_gaps, t.announced_gaps, t.dups), (4, 3, 0, 0, 0));
        assert_eq!(sw.conns[0].pos, Some(Position { epoch: 7, seq: 7 }));
        // A jump the CONFLATED frames do not explain is still a gap; an
        // unkeyed message in it is an unkeyed loss.
        let mut b = Vec::new();
        conflated(&mut b, 8, 8); // message 7
        deliver(&mut b, 10, 9); // seq 9 (message 8, unkeyed) missing
        sw.frames(0, &b, 10, now);
        let t = sw.tally;
        assert_eq!((t.conflated, t.silent_gaps, t.announced_gaps), (4, 0, 1), "a seq jump is announced");
        let slow = sw.slow_stats();
        assert_eq!((slow.clients, slow.received, slow.conflated, slow.unkeyed_lost), (1, 5, 4, 1));
        assert_eq!(slow.stale.len() + slow.unkeyed_age.len(), 5);
        assert_eq!(slow.unkeyed_age.len(), 2, "messages 0 and 4");
        assert!(sw.hist.is_empty(), "a slow reader's ages are not latency");
        let mut back = SlowStats::new();
        assert!(back.add_slow_line(&slow.slow_line()));
        assert_eq!((back.received, back.conflated, back.unkeyed_lost), (5, 4, 1));
    }

    #[test]
    fn unkeyed_rules_and_slow_spreads() {
        let u = Unkeyed { every: 10, below: 3 };
        assert_eq!((0..25).filter(|&n| u.is_unkeyed(n)).count() as u64, u.below_n(25));
        assert_eq!(u.below_n(25), 9);
        assert_eq!(Unkeyed::ALL.below_n(5), 5);
        assert_eq!(Unkeyed::NONE.below_n(5), 0);
        let s = SlowReaders::spread(100, 1000, 1, 0);
        assert_eq!((0..1000).filter(|&u| s.is_slow(u)).count(), 100);
        assert!(s.is_slow(0) && s.is_slow(990) && !s.is_slow(5) && !s.is_slow(1000));
        assert!(!SlowReaders::default().is_slow(0));
    }

    #[test]
    fn result_lines_round_trip() {
        let t = Tally {
            received: 1,
            wrong_user: 2,
            dups: 3,
            silent_gaps: 4,
            announced_gaps: 5,
            late: 9,
            closed: 6,
            reconnects: 7,
            welcomed: 8,
            conflated: 10,
            resumed: 11,
            restarted: 12,
            gapped: 13,
        };
        assert_eq!(Tally::parse_result_line(&t.result_line()), Some(t));
        let old = Tally::parse_result_line("RESULT 1 2 3 4 5 6 7 8").unwrap();
        let none = Tally { resumed: 0, restarted: 0, gapped: 0, ..t };
        assert_eq!(old, Tally { late: 0, conflated: 0, ..none });
        let nine = Tally::parse_result_line("RESULT 1 2 3 4 5 6 7 8 9").unwrap();
        assert_eq!(nine, Tally { conflated: 0, ..none });
        let ten = Tally::parse_result_line("RESULT 1 2 3 4 5 6 7 8 9 10").unwrap();
        assert_eq!(ten, none);
        assert_eq!(Tally::parse_result_line("RESULT 1 2 3"), None);
        assert_eq!(Tally::parse_result_line("H 1 2"), None);
    }
}
