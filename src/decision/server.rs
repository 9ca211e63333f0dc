//! The decision server's roles on the shared event loop (`crate::net`):
//! a TCP listener for requests, a UDP socket for heartbeats, and the
//! [`Table`] that answers them.
//!
//! With [`Config::tls`] the TCP port is TLS-only (protocol.md §11): every
//! accepted connection starts a TLS handshake in the event loop's transport
//! seam, and the roles below see only the decrypted frames. Heartbeats stay
//! plain UDP: they are HMAC-signed (§8) and carry nothing secret.
//!
//! - heartbeats: `recv_from` until `WouldBlock` (or the per-turn budget),
//!   each datagram to [`Table::on_heartbeat`]; rejects are dropped silently
//!   and only counted (protocol.md §8);
//! - requests: the event loop decodes every complete frame on
//!   [`Channel::ToDecision`]; each request gets its one response frame, in
//!   order, appended to the connection's output;
//! - timers: idle connections (10 s), lingering closes, table sweeps, logs,
//!   and connections paused by the rate limit read again.
//!
//! Strangers (protocol.md §7.4): each source ([`Sources`]: an IPv4 address
//! or an IPv6 /64) may hold [`Config::max_conns_per_source`] connections;
//! one more is answered ERROR SERVER_FULL and closed at accept. Its
//! requests are answered at [`Config::source_rate`] a second after a burst
//! of [`Config::source_burst`]: a request with no token left is not refused
//! but left unparsed, and the connection unread, until one is due (one
//! answer per request still holds; the flooder gets TCP back-pressure).
//! Open connections are capped by [`Config::max_connections`] and by the
//! descriptor limit less [`FD_RESERVE`]; at the cap, and whenever accept
//! fails with EMFILE, the connections idle the longest from the sources
//! that hold the most are closed (ERROR SERVER_FULL; a sixty-fourth of the
//! cap at a time) to make room, so a flood of idle connections from a few
//! sources cannot lock out everyone else.
//!
//! Bounds: a connection's carried input is at most one partial frame (the
//! decoder refuses a length over 1024 from its first four bytes) plus, when
//! the peer does not read its answers, one read's worth; once its pending
//! output passes [`WBUF_HIGH`] the loop stops reading that connection until
//! the output drains, so a pipelining peer gets TCP back-pressure rather
//! than an unbounded buffer. A connection paused by the rate limit keeps
//! the same: at most one read's worth of unparsed input.
//!
//! The loop owns all state; nothing is shared with other threads except the
//! shutdown flag. Admin settings, and the admin replay window, are written
//! to the state file (atomically) after every admin request whose tag
//! verifies (protocol.md §7.3). Heartbeats and admin requests from before
//! the server's start are refused as replays the restart would otherwise
//! let through (§8; §7.3 without a state file).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::UdpSocket;
use mio::{Interest, Poll, Token, Waker};

use super::sources::{SourceKey, SourceLimits, Sources};
use super::state;
use super::table::{AdminAnswer, Table, TableConfig, DEFAULT_CEILING_PCT, DEFAULT_EXPIRE_AFTER};
use crate::net::{
    self, CloseReason, ConnId, ConnState, Conns, EventLoop, Flow, Framing, Listener, Service, Tick,
};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{limits, Channel, Code};
use crate::tls;

/// The heartbeat socket's token (the listener is token 0).
const HEARTBEATS: Token = Token(1);

/// Datagrams handled per turn before yielding to the connections.
const UDP_BUDGET: usize = 1024;
/// Stop reading a connection whose pending output is over this…
pub const WBUF_HIGH: usize = 256 * 1024;
/// …and read it again once its output is down to this.
const WBUF_LOW: usize = 64 * 1024;
/// Timer granularity.
const TICK: Duration = Duration::from_millis(100);
/// How often the table forgets long-expired nodes and old admin nonces.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Descriptors kept free of request connections: the listener, the
/// heartbeat socket, poll, waker, standard streams, the state file's
/// temporary file, certificate reloads, and the one accept takes.
pub const FD_RESERVE: usize = 32;
/// Default [`Config::max_conns_per_source`].
pub const DEFAULT_MAX_CONNS_PER_SOURCE: u32 = 64;
/// Default [`Config::source_rate`], requests per second.
pub const DEFAULT_SOURCE_RATE: u32 = 1000;
/// Default [`Config::source_burst`].
pub const DEFAULT_SOURCE_BURST: u32 = 1000;

/// Decision server configuration. `Default` gives the CLI defaults (and
/// empty secrets, with which nothing verifies).
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP address for requests (ASSIGN_REQUEST, NODES_REQUEST, ADMIN).
    pub listen: SocketAddr,
    /// UDP address for heartbeats.
    pub heartbeat: SocketAddr,
    /// Verifies heartbeat tags.
    pub cluster_secret: Vec<u8>,
    /// Verifies admin tags.
    pub admin_secret: Vec<u8>,
    /// How ASSIGN_REQUEST credentials are treated: the client secret that
    /// verifies tokens (empty: none), and whether a token is required.
    pub assign: super::asker::Policy,
    /// Where admin settings are kept across restarts (none: in memory only).
    pub state_file: Option<PathBuf>,
    /// A node with no accepted heartbeat for this long is not assigned.
    pub expire_after: Duration,
    /// The global ceiling, percent, until an admin sets another.
    pub ceiling_pct: u8,
    /// Close a connection on which nothing arrived for this long.
    pub idle_timeout: Duration,
    /// Most open request connections (also at most the descriptor limit
    /// less [`FD_RESERVE`]); at the cap, the connections idle the longest
    /// from the sources holding the most are closed to make room.
    pub max_connections: usize,
    /// Most connections open at once from one source (an IPv4 address or
    /// an IPv6 /64); more are answered ERROR SERVER_FULL at accept. 0: no limit.
    pub max_conns_per_source: u32,
    /// Requests answered per second per source, sustained; faster ones wait
    /// (the connection is not read until a token is due). 0: no limit.
    pub source_rate: u32,
    /// Requests a quiet source may have answered at once (bucket size).
    pub source_burst: u32,
    /// Log a summary line this often (zero: never).
    pub log_every: Duration,
    /// TLS on the TCP port (its certificate and key; `client_ca` asks
    /// requesters for a certificate); none: plaintext.
    pub tls: Option<crate::tls::ServerFiles>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7300".parse().expect("valid"),
            heartbeat: "0.0.0.0:7300".parse().expect("valid"),
            cluster_secret: Vec::new(),
            admin_secret: Vec::new(),
            assign: super::asker::Policy::default(),
            state_file: None,
            expire_after: DEFAULT_EXPIRE_AFTER,
            ceiling_pct: DEFAULT_CEILING_PCT,
            idle_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            max_conns_per_source: DEFAULT_MAX_CONNS_PER_SOURCE,
            source_rate: DEFAULT_SOURCE_RATE,
            source_burst: DEFAULT_SOURCE_BURST,
            log_every: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// Counters, returned by [`DecisionServer::run`] and logged every
/// [`Config::log_every`].
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Heartbeats dropped, by [`super::table::HeartbeatReject::name`].
    pub heartbeat_rejects: BTreeMap<&'static str, u64>,
    /// ASSIGNMENT answers.
    pub assignments: u64,
    /// NO_CAPACITY answers.
    pub no_capacity: u64,
    /// ASSIGN_REQUESTs refused for their credential (AUTH_FAILED,
    /// TOKEN_EXPIRED).
    pub assign_refused: u64,
    /// NODES answers.
    pub nodes_requests: u64,
    /// ADMIN requests whose tag verified.
    pub admin_requests: u64,
    /// ADMIN requests refused with AUTH_FAILED.
    pub admin_auth_failures: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused at accept: their source held its most.
    pub source_refused: u64,
    /// Connections closed to make room at the connection or descriptor cap.
    pub evicted: u64,
    /// Requests that waited for their source's rate limit (counted once
    /// per wait).
    pub rate_delayed: u64,
    /// Connections closed, by close-reason label (README, "Close reasons").
    pub closes: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Heartbeats dropped, all reasons.
    pub fn heartbeats_rejected(&self) -> u64 {
        self.heartbeat_rejects.values().sum()
    }

    fn close(&mut self, r: CloseReason) {
        *self.closes.entry(r.label()).or_insert(0) += 1;
    }

    fn summary(&self, live: usize, open: usize) -> String {
        let mut s = format!(
            "{live} live nodes, {open} connections; {} assignments, {} no capacity, {} refused, {} nodes, {} admin ({} bad tag); heartbeats {} ok, {} dropped; {} over source cap, {} evicted, {} rate-delayed",
            self.assignments,
            self.no_capacity,
            self.assign_refused,
            self.nodes_requests,
            self.admin_requests,
            self.admin_auth_failures,
            self.heartbeats,
            self.heartbeats_rejected(),
            self.source_refused,
            self.evicted,
            self.rate_delayed
        );
        if !self.heartbeat_rejects.is_empty() {
            let _ = write!(s, " {:?}", self.heartbeat_rejects);
        }
        s
    }
}

/// Asks a running server to stop; cloneable, usable from any thread (the
/// ctrl-c handler only calls [`ShutdownHandle::trigger`]).
#[derive(Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Makes [`DecisionServer::run`] return at its next loop turn.
    pub fn trigger(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// A bound decision server, ready to [`DecisionServer::run`].
pub struct DecisionServer {
    poll: Poll,
    listener: mio::net::TcpListener,
    udp: UdpSocket,
    handle: ShutdownHandle,
    table: Table,
    tls: Option<tls::Acceptor>,
    cfg: Config,
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends ERROR SERVER_FULL (protocol.md §7.4: over a source's cap, or
/// closed to make room).
fn server_full(out: &mut Vec<u8>, msg: &str) {
    Frame::Error(f::ErrorFrame { code: Code::ServerFull, message: msg.as_bytes() }).encode(out);
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl DecisionServer {
    /// Loads the state file (if any) and binds both sockets. Port 0 picks a
    /// free port (see [`DecisionServer::tcp_addr`], [`DecisionServer::udp_addr`]).
    /// A state file that exists but cannot be read or parsed is an error
    /// (`InvalidData`), so that a restart never silently forgets a drain; so
    /// are TLS files that do not load (`InvalidInput`, wrapping the
    /// [`tls::TlsError`]).
    pub fn bind(cfg: Config) -> io::Result<DecisionServer> {
        let saved = match &cfg.state_file {
            Some(p) => state::load(p).map_err(|e| io::Error::new(ErrorKind::InvalidData, e.to_string()))?,
            None => state::State::default(),
        };
        let started_ms = unix_ms();
        let tls = match &cfg.tls {
            Some(files) => Some(
                tls::Acceptor::load(files.clone()).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let poll = Poll::new()?;
        // Clients connect, ask and close: a reconnect storm after a node dies
        // arrives all at once and must not overflow the backlog.
        let listener = net::listen(cfg.listen)?;
        let mut udp = UdpSocket::bind(cfg.heartbeat)?;
        poll.registry().register(&mut udp, HEARTBEATS, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), net::WAKER)?);
        let handle = ShutdownHandle { stop: Arc::new(AtomicBool::new(false)), waker };
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        let mut table = Table::new(
            TableConfig {
                cluster_secret: cfg.cluster_secret.clone(),
                admin_secret: cfg.admin_secret.clone(),
                expire_after: cfg.expire_after,
                ceiling_pct: cfg.ceiling_pct,
                // §8: what was sent before this start may be a replay the
                // lost (incarnation, seq) can no longer tell.
                heartbeats_not_before_ms: started_ms,
                // §7.3: with a state file the replay window survives the
                // restart; without, what was signed before it is refused.
                admin_not_before_ms: if cfg.state_file.is_some() { 0 } else { started_ms },
            },
            saved.settings,
            seed,
        );
        table.remember_admin(saved.admin_seen);
        Ok(DecisionServer { poll, listener, udp, handle, table, tls, cfg })
    }

    /// The bound TCP (request) address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }
    /// The bound UDP (heartbeat) address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp.local_addr().expect("bound")
    }
    /// The global ceiling in force (the state file's, else the configured one).
    pub fn ceiling_pct(&self) -> u8 {
        self.table.ceiling_pct()
    }
    /// Whether the TCP port speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
    /// The TCP port's TLS, to reload its certificate (e.g. on SIGHUP):
    /// [`tls::Acceptor::reload`] keeps the old one if the new files are bad.
    pub fn tls(&self) -> tls::Reload {
        tls::Reload { acceptors: self.tls.iter().cloned().collect(), dialer: None }
    }
    /// A handle that makes [`DecisionServer::run`] return.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Runs the event loop until a shutdown is triggered; returns the counters.
    pub fn run(self) -> io::Result<Stats> {
        let now = Instant::now();
        let cap = self
            .cfg
            .max_connections
            .min(net::descriptor_limit().unwrap_or(usize::MAX).saturating_sub(FD_RESERVE))
            .max(1);
        if cap < self.cfg.max_connections {
            log::info!(
                "herald decision: at most {cap} request connections (the descriptor limit less {FD_RESERVE})"
            );
        }
        // The cap is kept by `Decision::accept`, which makes room rather
        // than refusing; the listener's own cap is only a backstop.
        let listener = Listener { sock: self.listener, cap: cap + 1, tls: self.tls };
        let sources = Sources::new(SourceLimits {
            max_conns: self.cfg.max_conns_per_source,
            rate: self.cfg.source_rate,
            burst: self.cfg.source_burst,
        });
        let roles = Decision {
            sources,
            paused: Vec::new(),
            cap,
            victims: Vec::new(),
            udp: self.udp,
            stop: self.handle.stop,
            table: self.table,
            stats: Stats::default(),
            udp_more: false,
            dgram: vec![0u8; 2048],
            unix: unix_ms(),
            next_tick: now + TICK,
            next_sweep: now + SWEEP_EVERY,
            next_log: now + self.cfg.log_every,
            cfg: self.cfg,
        };
        let mut l = EventLoop::new(self.poll, vec![listener], roles, ())?;
        if l.service.stop.load(Ordering::SeqCst) {
            return Ok(l.service.stats);
        }
        l.run()?;
        Ok(l.service.stats)
    }
}

/// A request connection: when its last whole request arrived (the idle
/// rule counts requests, not bytes: a peer trickling a partial frame a
/// byte at a time is idle all the same), where it comes from, and whether
/// it waits for its source's rate limit.
pub(crate) struct Requester {
    last_request: Instant,
    source: SourceKey,
    /// Not read until the next tick: its source had no request token.
    paused: bool,
}

impl ConnState for Requester {
    type Cx = ();

    fn framing(&self) -> Framing {
        Framing::Frames(Channel::ToDecision)
    }

    fn read_stop(&self, _cx: &()) -> usize {
        WBUF_HIGH
    }

    fn read_resume(&self, _cx: &()) -> usize {
        WBUF_LOW
    }
}

/// The decision server's roles: heartbeats in, requests answered.
struct Decision {
    /// Connections and request tokens per source.
    sources: Sources,
    /// Connections waiting for a request token, oldest first.
    paused: Vec<ConnId>,
    /// Most open request connections.
    cap: usize,
    /// Scratch for [`Decision::evict`]: (how bad a victim, connection).
    victims: Vec<((u32, std::cmp::Reverse<Instant>), ConnId)>,
    udp: UdpSocket,
    stop: Arc<AtomicBool>,
    table: Table,
    stats: Stats,
    /// The heartbeat socket hit its budget and may hold more datagrams.
    udp_more: bool,
    dgram: Vec<u8>,
    /// Wall clock at the start of the turn, ms.
    unix: u64,
    next_tick: Instant,
    next_sweep: Instant,
    next_log: Instant,
    cfg: Config,
}

impl Decision {
    /// Writes the admin settings and replay window to the state file, if
    /// there is one; a failure is logged and returned.
    fn persist(&self) -> io::Result<()> {
        let Some(path) = &self.cfg.state_file else { return Ok(()) };
        let r = state::save(path, self.table.settings(), &self.table.admin_seen());
        if let Err(e) = &r {
            log::error!("herald decision: cannot write state file {}: {e}", path.display());
        }
        r
    }

    /// Makes room at the connection cap: closes a batch of
    /// [`Decision::evict_batch`] connections, those already closing first
    /// (oldest first), then the ones idle the longest from the sources
    /// holding the most. An idle one is told ERROR SERVER_FULL; either way
    /// its descriptor is freed when the closes are carried out (this turn).
    /// One scan of the connections pays for the whole batch. False if there
    /// was no connection to close.
    fn evict(&mut self, conns: &mut Conns<Requester>) -> bool {
        let n = self.evict_batch();
        let mut v = std::mem::take(&mut self.victims);
        v.clear();
        v.extend(conns.iter().map(|(id, c)| {
            let held = if c.is_closing() { u32::MAX } else { self.sources.conns(c.state.source) };
            ((held, std::cmp::Reverse(c.state.last_request)), id)
        }));
        if v.len() > n {
            v.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
            v.truncate(n);
        }
        let any = !v.is_empty();
        for &(_, id) in &v {
            self.stats.evicted += 1;
            if conns.get(id).is_some_and(|c| c.is_closing()) {
                conns.expire(id);
                continue;
            }
            if let Some(out) = conns.queue(id) {
                server_full(out, "this decision server is at its connection limit; connect again to ask");
            }
            conns.abort(id, CloseReason::Sent(Code::ServerFull));
        }
        self.victims = v;
        any
    }

    /// Connections [`Decision::evict`] closes at once: a sixty-fourth of
    /// the cap, at least one.
    fn evict_batch(&self) -> usize {
        (self.cap / 64).max(1)
    }

    fn heartbeats(&mut self, now: Instant) {
        self.udp_more = false;
        for _ in 0..UDP_BUDGET {
            match self.udp.recv_from(&mut self.dgram) {
                Ok((n, _from)) => match self.table.on_heartbeat(&self.dgram[..n], now, self.unix) {
                    Ok(()) => self.stats.heartbeats += 1,
                    Err(r) => *self.stats.heartbeat_rejects.entry(r.name()).or_insert(0) += 1,
                },
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock: drained. Anything else (an ICMP error reported
                // on the socket): new datagrams raise a new event.
                Err(_) => return,
            }
        }
        self.udp_more = true;
    }

    /// Answers one request with exactly one frame (protocol.md §7).
    fn request(
        &mut self,
        conns: &mut Conns<Requester>,
        id: ConnId,
        frame: Frame<'_>,
        raw: &[u8],
        now: Instant,
    ) -> Flow {
        // The decoder has checked the version (protocol.md §7).
        match &frame {
            Frame::AssignRequest(_) | Frame::NodesRequest(_) | Frame::Admin(_) => {}
            Frame::Error(_) => {
                // Never answer an ERROR; close (after what is already queued).
                conns.peer_gone(id, CloseReason::PeerError);
                return Flow::Stop;
            }
            other => {
                // The decoder allows nothing else on this channel.
                let msg = format!("frame type 0x{:02x} is not a request", other.frame_type());
                conns.fail(id, Code::UnexpectedFrame, &msg, now);
                return Flow::Stop;
            }
        }
        match frame {
            Frame::AssignRequest(a) => {
                let asker = match super::asker::check(&a, &self.cfg.assign, self.unix / 1000) {
                    Ok(asker) => asker,
                    Err(r) => {
                        self.stats.assign_refused += 1;
                        conns.fail(id, r.code, r.message, now);
                        return Flow::Stop;
                    }
                };
                let answer = self.table.assign(asker.counted(), a.max_results, now);
                match answer {
                    super::table::Assignment::Ranked(_) => self.stats.assignments += 1,
                    super::table::Assignment::NoCapacity { .. } => self.stats.no_capacity += 1,
                }
                let Some(out) = conns.queue(id) else { return Flow::Gone };
                self.table.encode_assignment(&answer, out);
            }
            Frame::NodesRequest(_) => {
                self.stats.nodes_requests += 1;
                let Some(out) = conns.queue(id) else { return Flow::Gone };
                self.table.encode_nodes(now, out);
            }
            Frame::Admin(a) => match self.table.admin(raw, &a, self.unix) {
                AdminAnswer::AuthFailed => {
                    self.stats.admin_auth_failures += 1;
                    conns.fail(id, Code::AuthFailed, "the admin tag does not verify", now);
                    return Flow::Stop;
                }
                AdminAnswer::Status => {
                    self.stats.admin_requests += 1;
                    // Its (timestamp, nonce) must outlive a restart too.
                    let _ = self.persist();
                    let Some(out) = conns.queue(id) else { return Flow::Gone };
                    self.table.encode_status(now, out);
                }
                AdminAnswer::Result { mut status, mut message, changed } => {
                    self.stats.admin_requests += 1;
                    if changed {
                        log::info!("herald decision: admin: {message}");
                    }
                    // Written after every verified request, changed or not:
                    // the file also keeps the replay window (§7.3).
                    if let Err(e) = self.persist() {
                        if changed {
                            status = Code::Internal.to_u16();
                            message = format!(
                                "{message}, but the state file could not be written ({e}): \
                                 the change is lost on restart"
                            );
                        }
                    }
                    let message = cut(&message, limits::MAX_ADMIN_MESSAGE_LEN);
                    let Some(out) = conns.queue(id) else { return Flow::Gone };
                    Frame::AdminResult(f::AdminResult { status, message: message.as_bytes() }).encode(out);
                }
            },
            _ => {}
        }
        Flow::Continue
    }
}

impl Service for Decision {
    type State = Requester;

    fn turn(&mut self, _now: Instant) {
        self.unix = unix_ms();
    }

    fn accept(
        &mut self,
        conns: &mut Conns<Requester>,
        _listener: usize,
        io: &mut net::Transport,
        now: Instant,
    ) -> Result<Requester, CloseReason> {
        // A refusal is counted by `refused`, as the listener's own are.
        let Ok(peer) = io.peer_addr() else { return Err(CloseReason::Io) };
        let source = SourceKey::of(peer.ip());
        if self.sources.open(source, now).is_err() {
            self.stats.source_refused += 1;
            if !io.is_tls() {
                let mut out = Vec::with_capacity(96);
                server_full(&mut out, "too many connections from your address; try another decision server");
                let _ = std::io::Write::write(io, &out);
            }
            return Err(CloseReason::Sent(Code::ServerFull));
        }
        if conns.len() >= self.cap {
            self.evict(conns);
        }
        self.stats.accepted += 1;
        Ok(Requester { last_request: now, source, paused: false })
    }

    fn may_read(&mut self, conns: &Conns<Requester>, id: ConnId) -> bool {
        conns.get(id).is_some_and(|c| !c.state.paused)
    }

    fn make_room(&mut self, conns: &mut Conns<Requester>, _now: Instant) -> bool {
        self.evict(conns)
    }

    fn refused(&mut self, _listener: usize, reason: CloseReason) {
        self.stats.accepted += 1;
        self.stats.close(reason);
    }

    fn frame(
        &mut self,
        conns: &mut Conns<Requester>,
        id: ConnId,
        frame: Frame<'_>,
        bytes: &[u8],
        len: usize,
        now: Instant,
    ) -> Flow {
        let Some(c) = conns.get_mut(id) else { return Flow::Gone };
        c.state.last_request = now;
        if self.sources.take(c.state.source, now).is_err() {
            // §7.4: no token: this request waits, unparsed, and the
            // connection is not read until the next tick.
            c.state.paused = true;
            self.paused.push(id);
            self.stats.rate_delayed += 1;
            return Flow::Pause;
        }
        self.request(conns, id, frame, &bytes[..len], now)
    }

    fn closed(&mut self, conns: &mut Conns<Requester>, id: ConnId, reason: CloseReason, _now: Instant) {
        if let Some(c) = conns.get(id) {
            self.sources.close(c.state.source);
        }
        self.stats.close(reason);
    }

    fn source(&mut self, _conns: &mut Conns<Requester>, token: Token, now: Instant) {
        if token == HEARTBEATS {
            self.heartbeats(now);
        }
    }

    fn woken(&mut self, _conns: &mut Conns<Requester>, _now: Instant) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn before_flush(&mut self, _conns: &mut Conns<Requester>, now: Instant) {
        if self.udp_more {
            self.heartbeats(now);
        }
    }

    fn timeout(&self, now: Instant) -> Duration {
        if self.udp_more {
            Duration::ZERO
        } else {
            self.next_tick.saturating_duration_since(now).min(TICK)
        }
    }

    fn timers(&mut self, conns: &mut Conns<Requester>, now: Instant) -> Tick {
        if self.stop.load(Ordering::SeqCst) {
            return Tick::Exit;
        }
        if now < self.next_tick {
            return Tick::Idle;
        }
        self.next_tick = now + TICK;
        // Connections paused by the rate limit try their request again (a
        // source still without a token pauses again, at the back).
        for id in std::mem::take(&mut self.paused) {
            if let Some(c) = conns.get_mut(id) {
                if c.state.paused {
                    c.state.paused = false;
                    conns.read_again(id);
                }
            }
        }
        let idle = self.cfg.idle_timeout;
        let mut expired = Vec::new();
        for (id, c) in conns.iter() {
            if c.is_closing() {
                if c.linger_over(now) {
                    expired.push((id, false));
                }
            } else if now.saturating_duration_since(c.state.last_request) >= idle {
                expired.push((id, true));
            }
        }
        for (id, idle) in expired {
            if idle {
                // protocol.md §7: the server may send IDLE_TIMEOUT first.
                conns.fail(id, Code::IdleTimeout, "no request for a while; reconnect for the next one", now);
            } else {
                conns.expire(id);
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            self.table.sweep(now, self.unix);
            self.sources.sweep(now);
        }
        if !self.cfg.log_every.is_zero() && now >= self.next_log {
            self.next_log = now + self.cfg.log_every;
            log::info!(
                "herald decision: {}",
                self.stats.summary(self.table.live_nodes(now).count(), conns.len())
            );
        }
        Tick::Ran
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_at_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn closes_are_counted_by_label() {
        let mut s = Stats::default();
        s.close(CloseReason::TooMany);
        s.close(CloseReason::TooMany);
        assert_eq!(s.closes.get("too_many_connections"), Some(&2));
        assert!(s.summary(0, 0).contains("0 live nodes"));
    }
}
