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
//! - timers: idle connections (10 s), lingering closes, table sweeps, logs.
//!
//! Bounds: a connection's carried input is at most one partial frame (the
//! decoder refuses a length over 1024 from its first four bytes) plus, when
//! the peer does not read its answers, one read's worth; once its pending
//! output passes [`WBUF_HIGH`] the loop stops reading that connection until
//! the output drains, so a pipelining peer gets TCP back-pressure rather
//! than an unbounded buffer.
//!
//! The loop owns all state; nothing is shared with other threads except the
//! shutdown flag. Admin settings are written to the state file (atomically)
//! on every change.

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
    /// Most open request connections; more are closed on accept.
    pub max_connections: usize,
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
            "{live} live nodes, {open} connections; {} assignments, {} no capacity, {} refused, {} nodes, {} admin ({} bad tag); heartbeats {} ok, {} dropped",
            self.assignments,
            self.no_capacity,
            self.assign_refused,
            self.nodes_requests,
            self.admin_requests,
            self.admin_auth_failures,
            self.heartbeats,
            self.heartbeats_rejected()
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
        let settings = match &cfg.state_file {
            Some(p) => state::load(p).map_err(|e| io::Error::new(ErrorKind::InvalidData, e.to_string()))?,
            None => state::Settings::default(),
        };
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
        let table = Table::new(
            TableConfig {
                cluster_secret: cfg.cluster_secret.clone(),
                admin_secret: cfg.admin_secret.clone(),
                expire_after: cfg.expire_after,
                ceiling_pct: cfg.ceiling_pct,
            },
            settings,
            seed,
        );
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
        let listener = Listener { sock: self.listener, cap: self.cfg.max_connections, tls: self.tls };
        let roles = Decision {
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
/// byte at a time is idle all the same).
pub(crate) struct Requester {
    last_request: Instant,
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
                    let Some(out) = conns.queue(id) else { return Flow::Gone };
                    self.table.encode_status(now, out);
                }
                AdminAnswer::Result { mut status, mut message, changed } => {
                    self.stats.admin_requests += 1;
                    if changed {
                        log::info!("herald decision: admin: {message}");
                        if let Some(path) = &self.cfg.state_file {
                            if let Err(e) = state::save(path, self.table.settings()) {
                                log::error!(
                                    "herald decision: cannot write state file {}: {e}",
                                    path.display()
                                );
                                status = Code::Internal.to_u16();
                                message = format!(
                                    "{message}, but the state file could not be written ({e}): \
                                     the change is lost on restart"
                                );
                            }
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
        _conns: &mut Conns<Requester>,
        _listener: usize,
        _io: &mut net::Transport,
        now: Instant,
    ) -> Result<Requester, CloseReason> {
        self.stats.accepted += 1;
        Ok(Requester { last_request: now })
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
        if let Some(c) = conns.get_mut(id) {
            c.state.last_request = now;
        }
        self.request(conns, id, frame, &bytes[..len], now)
    }

    fn closed(&mut self, _conns: &mut Conns<Requester>, _id: ConnId, reason: CloseReason, _now: Instant) {
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
