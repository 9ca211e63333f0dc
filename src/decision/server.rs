//! The decision server's event loop: one mio poll over a TCP listener for
//! requests, a UDP socket for heartbeats, and a slab of request connections.
//!
//! Layout of one loop turn (the same shape as the node's):
//! 1. poll; take `now` and the wall clock once;
//! 2. heartbeats: `recv_from` until `WouldBlock` (or the per-turn budget),
//!    each datagram to [`Table::on_heartbeat`]; rejects are dropped
//!    silently and only counted (protocol.md §8);
//! 3. connections: read until `WouldBlock` (or the budget), decode every
//!    complete request on [`Channel::ToDecision`] and append its one
//!    response frame, in order, to the connection's output buffer;
//! 4. flush every connection with output, one `write` each; WRITABLE is
//!    registered only while output is left over;
//! 5. timers: idle connections (10 s), lingering closes, table sweeps, logs.
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
use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::state;
use super::table::{AdminAnswer, Table, TableConfig, DEFAULT_CEILING_PCT, DEFAULT_EXPIRE_AFTER};
use crate::outbox::Outbox;
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{decode, limits, Channel, Code, Decoded, VERSION};

const LISTENER: Token = Token(0);
const HEARTBEATS: Token = Token(1);
const WAKER: Token = Token(2);
/// Connection tokens are slab keys offset by this.
const FIRST_CONN: usize = 16;

/// Bytes read from one connection per turn before yielding to the others.
const READ_BUDGET: usize = 256 * 1024;
/// Datagrams handled per turn before yielding to the connections.
const UDP_BUDGET: usize = 1024;
/// Stop reading a connection whose pending output is over this…
pub const WBUF_HIGH: usize = 256 * 1024;
/// …and resume once it is under this.
const WBUF_LOW: usize = 64 * 1024;
/// How long a closing connection may linger to flush its last frame.
const LINGER: Duration = Duration::from_millis(500);
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7300".parse().expect("valid"),
            heartbeat: "0.0.0.0:7300".parse().expect("valid"),
            cluster_secret: Vec::new(),
            admin_secret: Vec::new(),
            state_file: None,
            expire_after: DEFAULT_EXPIRE_AFTER,
            ceiling_pct: DEFAULT_CEILING_PCT,
            idle_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            log_every: Duration::from_secs(10),
        }
    }
}

/// Why a connection was closed, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed (EOF) or reset.
    PeerClosed,
    /// The peer sent ERROR.
    PeerError,
    /// A socket error.
    Io,
    /// We sent ERROR with this code (bad frame, version, admin tag, idle).
    Error(Code),
    /// Refused at accept: [`Config::max_connections`] reached.
    Full,
}

impl CloseReason {
    /// A short stable name, for counters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::PeerError => "peer_error",
            CloseReason::Io => "io_error",
            CloseReason::Error(c) => c.name(),
            CloseReason::Full => "too_many_connections",
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
    /// NODES answers.
    pub nodes_requests: u64,
    /// ADMIN requests whose tag verified.
    pub admin_requests: u64,
    /// ADMIN requests refused with AUTH_FAILED.
    pub admin_auth_failures: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed, by [`CloseReason::name`].
    pub closes: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Heartbeats dropped, all reasons.
    pub fn heartbeats_rejected(&self) -> u64 {
        self.heartbeat_rejects.values().sum()
    }

    fn close(&mut self, r: CloseReason) {
        *self.closes.entry(r.name()).or_insert(0) += 1;
    }

    fn summary(&self, live: usize, open: usize) -> String {
        let mut s = format!(
            "{live} live nodes, {open} connections; {} assignments, {} no capacity, {} nodes, {} admin ({} bad tag); heartbeats {} ok, {} dropped",
            self.assignments,
            self.no_capacity,
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
    listener: TcpListener,
    udp: UdpSocket,
    handle: ShutdownHandle,
    table: Table,
    cfg: Config,
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    // Clients connect, ask and close: a reconnect storm after a node dies
    // arrives all at once and must not overflow the backlog.
    s.listen(4096)?;
    Ok(TcpListener::from_std(s.into()))
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
    /// (`InvalidData`), so that a restart never silently forgets a drain.
    pub fn bind(cfg: Config) -> io::Result<DecisionServer> {
        let settings = match &cfg.state_file {
            Some(p) => state::load(p).map_err(|e| io::Error::new(ErrorKind::InvalidData, e.to_string()))?,
            None => state::Settings::default(),
        };
        let poll = Poll::new()?;
        let mut listener = listen(cfg.listen)?;
        let mut udp = UdpSocket::bind(cfg.heartbeat)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry().register(&mut udp, HEARTBEATS, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
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
        Ok(DecisionServer { poll, listener, udp, handle, table, cfg })
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
    /// A handle that makes [`DecisionServer::run`] return.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Runs the event loop until a shutdown is triggered; returns the counters.
    pub fn run(self) -> io::Result<Stats> {
        let now = Instant::now();
        let mut l = Loop {
            poll: self.poll,
            listener: self.listener,
            udp: self.udp,
            stop: self.handle.stop,
            table: self.table,
            conns: Slab::with_capacity(256),
            stats: Stats::default(),
            dirty: Vec::new(),
            retry_read: Vec::new(),
            to_close: Vec::new(),
            udp_more: false,
            scratch: vec![0u8; 64 * 1024],
            dgram: vec![0u8; 2048],
            accept_paused_until: None,
            next_tick: now + TICK,
            next_sweep: now + SWEEP_EVERY,
            next_log: now + self.cfg.log_every,
            cfg: self.cfg,
        };
        l.run()?;
        Ok(l.stats)
    }
}

/// One request connection.
struct Conn {
    sock: TcpStream,
    /// A partial frame carried over between reads (and, while stalled, the
    /// unparsed rest of one read).
    rbuf: Vec<u8>,
    /// Pending output.
    out: Outbox,
    last_rx: Instant,
    /// Set once an ERROR is queued or the peer has gone: close no later than this.
    closing: Option<Instant>,
    /// The peer has closed its side (EOF or ERROR).
    eof: bool,
    /// Our write side is shut down (after the last frame went out).
    shut: bool,
    /// Not reading: too much output pending.
    stalled: bool,
}

impl Conn {
    fn pending(&self) -> usize {
        self.out.pending()
    }
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    udp: UdpSocket,
    stop: Arc<AtomicBool>,
    table: Table,
    conns: Slab<Conn>,
    stats: Stats,
    /// Connections with output appended this turn.
    dirty: Vec<usize>,
    /// Connections that hit the read budget or came out of a stall.
    retry_read: Vec<usize>,
    /// Connections whose peer went away; handled once borrows end.
    to_close: Vec<(usize, CloseReason)>,
    /// The heartbeat socket hit its budget and may hold more datagrams.
    udp_more: bool,
    scratch: Vec<u8>,
    dgram: Vec<u8>,
    accept_paused_until: Option<Instant>,
    next_tick: Instant,
    next_sweep: Instant,
    next_log: Instant,
    cfg: Config,
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let now = Instant::now();
            let timeout = if !self.retry_read.is_empty() || self.udp_more {
                Duration::ZERO
            } else {
                self.next_tick.saturating_duration_since(now).min(TICK)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            let unix = unix_ms();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(now, unix),
                    HEARTBEATS => self.heartbeats(now, unix),
                    WAKER => {}
                    Token(t) => {
                        let Some(key) = t.checked_sub(FIRST_CONN) else { continue };
                        if !self.conns.contains(key) {
                            continue; // sporadic events happen
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read(key, now, unix);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(key);
                        }
                    }
                }
                self.close_pending(now);
            }
            if self.udp_more {
                self.heartbeats(now, unix);
            }
            for key in std::mem::take(&mut self.retry_read) {
                if self.conns.contains(key) {
                    self.read(key, now, unix);
                    self.close_pending(now);
                }
            }
            self.flush_dirty(now);
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.timers(now, unix);
                self.flush_dirty(now);
            }
        }
    }

    // ------------------------------------------------------------ heartbeats

    fn heartbeats(&mut self, now: Instant, unix: u64) {
        self.udp_more = false;
        for _ in 0..UDP_BUDGET {
            match self.udp.recv_from(&mut self.dgram) {
                Ok((n, _from)) => match self.table.on_heartbeat(&self.dgram[..n], now, unix) {
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

    // ------------------------------------------------------------ accept

    fn accept(&mut self, now: Instant, unix: u64) {
        if let Some(until) = self.accept_paused_until {
            if now < until {
                return;
            }
            self.accept_paused_until = None;
        }
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => self.admit(sock, now, unix),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: stop accepting for a moment, keep
                    // serving. The timer re-tries; no busy loop.
                    self.accept_paused_until = Some(now + Duration::from_millis(100));
                    return;
                }
                Err(_) => return, // ECONNABORTED and friends: the peer gave up.
            }
        }
    }

    fn admit(&mut self, mut sock: TcpStream, now: Instant, unix: u64) {
        self.stats.accepted += 1;
        if self.conns.len() >= self.cfg.max_connections {
            self.stats.close(CloseReason::Full);
            return; // dropping the socket closes it
        }
        let _ = sock.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.poll.registry().register(&mut sock, Token(key + FIRST_CONN), Interest::READABLE).is_err() {
            return;
        }
        entry.insert(Conn {
            sock,
            rbuf: Vec::new(),
            out: Outbox::default(),
            last_rx: now,
            closing: None,
            eof: false,
            shut: false,
            stalled: false,
        });
        // The request often arrives right behind the handshake.
        self.read(key, now, unix);
        self.close_pending(now);
    }

    // ------------------------------------------------------------ read

    fn read(&mut self, key: usize, now: Instant, unix: u64) {
        // Input left unparsed by a stall goes first.
        if self.conns.get(key).is_some_and(|c| !c.rbuf.is_empty() && !c.stalled && c.closing.is_none()) {
            self.input(key, &[], now, unix);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(c) = self.conns.get_mut(key) {
            if c.stalled || c.eof {
                break;
            }
            match c.sock.read(&mut scratch) {
                Ok(0) => {
                    self.to_close.push((key, CloseReason::PeerClosed));
                    break;
                }
                Ok(n) => {
                    c.last_rx = now;
                    // While closing, input is read and discarded.
                    if c.closing.is_none() {
                        self.input(key, &scratch[..n], now, unix);
                    }
                    if n >= budget {
                        self.retry_read.push(key);
                        break;
                    }
                    budget -= n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    self.to_close.push((key, CloseReason::PeerClosed));
                    break;
                }
                Err(_) => {
                    self.to_close.push((key, CloseReason::Io));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Parses every complete request in the carried input plus `data` and
    /// queues the responses. Parses straight from `data` when nothing is
    /// carried over; copies only what is left unparsed.
    fn input(&mut self, key: usize, data: &[u8], now: Instant, unix: u64) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let mut carried = std::mem::take(&mut c.rbuf);
        let buf: &[u8] = if carried.is_empty() {
            data
        } else {
            carried.extend_from_slice(data);
            &carried
        };
        let mut at = 0;
        while at < buf.len() {
            let Some(c) = self.conns.get_mut(key) else { return };
            if c.closing.is_some() || c.eof {
                return;
            }
            if c.pending() >= WBUF_HIGH {
                c.stalled = true;
                break;
            }
            match decode(&buf[at..], Channel::ToDecision) {
                Ok(Decoded::Frame(frame, n)) => {
                    self.request(key, frame, &buf[at..at + n], now, unix);
                    at += n;
                }
                Ok(Decoded::Incomplete(_)) => break,
                Err(e) => {
                    self.fail(key, e.code(), &e.to_string(), now);
                    return;
                }
            }
        }
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.closing.is_none() && at < buf.len() {
            let rest = buf[at..].to_vec();
            c.rbuf = rest;
        }
    }

    /// Answers one request with exactly one frame (protocol.md §7).
    fn request(&mut self, key: usize, frame: Frame<'_>, raw: &[u8], now: Instant, unix: u64) {
        let version = match &frame {
            Frame::AssignRequest(a) => a.version,
            Frame::NodesRequest(n) => n.version,
            Frame::Admin(a) => a.version,
            Frame::Error(_) => {
                // Never answer an ERROR; close (after what is already queued).
                self.to_close.push((key, CloseReason::PeerError));
                if let Some(c) = self.conns.get_mut(key) {
                    c.eof = true;
                }
                return;
            }
            other => {
                // The decoder allows nothing else on this channel.
                let msg = format!("frame type 0x{:02x} is not a request", other.frame_type());
                self.fail(key, Code::UnexpectedFrame, &msg, now);
                return;
            }
        };
        if version != VERSION {
            let msg = format!("request version {version}; this decision server speaks protocol version 1");
            self.fail(key, Code::UnsupportedVersion, &msg, now);
            return;
        }
        let Some(c) = self.conns.get_mut(key) else { return };
        match frame {
            Frame::AssignRequest(a) => {
                let answer = self.table.assign(a.max_results, now);
                match answer {
                    super::table::Assignment::Ranked(_) => self.stats.assignments += 1,
                    super::table::Assignment::NoCapacity { .. } => self.stats.no_capacity += 1,
                }
                self.table.encode_assignment(&answer, &mut c.out.buf);
            }
            Frame::NodesRequest(_) => {
                self.stats.nodes_requests += 1;
                self.table.encode_nodes(now, &mut c.out.buf);
            }
            Frame::Admin(a) => match self.table.admin(raw, &a, unix) {
                AdminAnswer::AuthFailed => {
                    self.stats.admin_auth_failures += 1;
                    self.fail(key, Code::AuthFailed, "the admin tag does not verify", now);
                    return;
                }
                AdminAnswer::Status => {
                    self.stats.admin_requests += 1;
                    self.table.encode_status(now, &mut c.out.buf);
                }
                AdminAnswer::Result { mut status, mut message, changed } => {
                    self.stats.admin_requests += 1;
                    if changed {
                        eprintln!("herald decision: admin: {message}");
                        if let Some(path) = &self.cfg.state_file {
                            if let Err(e) = state::save(path, self.table.settings()) {
                                eprintln!("herald decision: cannot write state file {}: {e}", path.display());
                                status = Code::Internal.to_u16();
                                message = format!(
                                    "{message}, but the state file could not be written ({e}): \
                                     the change is lost on restart"
                                );
                            }
                        }
                    }
                    let message = cut(&message, limits::MAX_ADMIN_MESSAGE_LEN);
                    Frame::AdminResult(f::AdminResult { status, message: message.as_bytes() })
                        .encode(&mut c.out.buf);
                }
            },
            _ => return,
        }
        self.mark_dirty(key);
    }

    // ------------------------------------------------------------ write

    fn mark_dirty(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if c.out.mark_dirty() {
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self, now: Instant) {
        // Closing connections may add to the dirty list; loop until stable.
        while !self.dirty.is_empty() {
            for key in std::mem::take(&mut self.dirty) {
                self.flush(key);
            }
            self.close_pending(now);
        }
    }

    /// One write per connection per call.
    fn flush(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let release = c.closing.is_some();
        match c.out.flush(&mut c.sock, self.poll.registry(), Token(key + FIRST_CONN), release) {
            Err(_) => {
                self.to_close.push((key, CloseReason::Io));
                return;
            }
            Ok(f) if f.empty && c.closing.is_some() => {
                if c.eof {
                    self.to_close.push((key, CloseReason::PeerClosed));
                } else if !c.shut {
                    // Everything is out: half-close so the peer reads our
                    // last frame and then EOF; its EOF or the linger timer
                    // reaps us. (A full close with unread input would send
                    // RST and could destroy the frame in flight.)
                    c.shut = true;
                    let _ = c.sock.shutdown(std::net::Shutdown::Write);
                }
            }
            Ok(_) => {}
        }
        if c.stalled && c.pending() < WBUF_LOW {
            c.stalled = false;
            self.retry_read.push(key);
        }
    }

    // ------------------------------------------------------------ close

    /// Queues ERROR with `code` and closes once it is flushed.
    fn fail(&mut self, key: usize, code: Code, msg: &str, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.closing.is_some() {
            return;
        }
        Frame::Error(f::ErrorFrame { code, message: msg.as_bytes() }).encode(&mut c.out.buf);
        c.closing = Some(now + LINGER);
        c.rbuf = Vec::new();
        c.stalled = false;
        self.stats.close(CloseReason::Error(code));
        self.mark_dirty(key);
    }

    fn close_pending(&mut self, now: Instant) {
        while let Some((key, reason)) = self.to_close.pop() {
            let Some(c) = self.conns.get_mut(key) else { continue };
            match reason {
                CloseReason::PeerClosed | CloseReason::PeerError if c.pending() > 0 => {
                    // Answers (or our ERROR) are still queued: the peer may
                    // only have shut its write side. Flush, then close.
                    c.eof = true;
                    if c.closing.is_none() {
                        c.closing = Some(now + LINGER);
                        c.stalled = false;
                        self.stats.close(reason);
                    }
                    self.mark_dirty(key);
                }
                _ => {
                    let counted = c.closing.is_some();
                    self.remove(key, (!counted).then_some(reason));
                }
            }
        }
    }

    /// Drops the connection now, counting `reason` (None if already counted).
    fn remove(&mut self, key: usize, reason: Option<CloseReason>) {
        if !self.conns.contains(key) {
            return;
        }
        // No explicit deregister: closing the socket removes it from epoll,
        // and one syscall fewer is ~10 % of what a connect-ask-close client
        // costs the server. An event already fetched for this token in the
        // current batch at worst causes one spurious read of the key's next
        // occupant, which returns WouldBlock.
        drop(self.conns.remove(key));
        if let Some(r) = reason {
            self.stats.close(r);
        }
    }

    // ------------------------------------------------------------ timers

    fn timers(&mut self, now: Instant, unix: u64) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept(now, unix);
        }
        let idle = self.cfg.idle_timeout;
        let mut expired = Vec::new();
        for (key, c) in self.conns.iter() {
            match c.closing {
                Some(deadline) if now >= deadline => expired.push((key, false)),
                Some(_) => {}
                None if now.saturating_duration_since(c.last_rx) >= idle => expired.push((key, true)),
                None => {}
            }
        }
        for (key, idle) in expired {
            if idle {
                // protocol.md §7: the server may send IDLE_TIMEOUT first.
                self.fail(key, Code::IdleTimeout, "no request for a while; reconnect for the next one", now);
            } else {
                self.remove(key, None);
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            self.table.sweep(now, unix);
        }
        if !self.cfg.log_every.is_zero() && now >= self.next_log {
            self.next_log = now + self.cfg.log_every;
            eprintln!(
                "herald decision: {}",
                self.stats.summary(self.table.live_nodes(now).count(), self.conns.len())
            );
        }
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
    fn close_reasons_have_names() {
        assert_eq!(CloseReason::Error(Code::AuthFailed).name(), "auth_failed");
        assert_eq!(CloseReason::PeerClosed.name(), "peer_closed");
        let mut s = Stats::default();
        s.close(CloseReason::Full);
        s.close(CloseReason::Full);
        assert_eq!(s.closes.get("too_many_connections"), Some(&2));
        assert!(s.summary(0, 0).contains("0 live nodes"));
    }
}
