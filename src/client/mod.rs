//! The reference client and publisher libraries (blocking, std::net).
//!
//! [`Client`] connects to a node, performs the handshake, hands messages to
//! the application as [`Event`]s (an iterator, or a callback with
//! [`Client::run`]), answers keepalives, and on any disconnect reconnects with
//! jittered exponential backoff and resumes from the last position it
//! delivered. Every loss the protocol can reveal is reported as an event;
//! nothing is skipped silently.
//!
//! [`Publisher`] sends messages to users, one at a time or in batches, with
//! blocking writes so that a node's TCP back-pressure slows it down instead
//! of growing a buffer.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::protocol::frame::{self as f, BatchWriter, Frame, PUBLISH_WANT_RESULT};
use crate::protocol::{self, limits, Channel, Code, Decoded, GoodbyeAction, Position, ResumeResult, VERSION};

/// Client library errors.
#[derive(Debug)]
pub enum ClientError {
    /// A socket operation failed.
    Io(io::Error),
    /// The node refused us with an ERROR that retrying cannot fix
    /// (bad or expired token, unsupported version).
    Rejected {
        /// The code.
        code: Code,
        /// The node's message.
        message: String,
    },
    /// The node sent bytes that are not valid protocol.
    Protocol(protocol::DecodeError),
    /// No node address is configured or resolvable.
    NoNode,
    /// The connection closed.
    Closed,
    /// The decision servers have no capacity; ask again after this long.
    NoCapacity(Duration),
    /// The node's WELCOME broke protocol.md §3.2 (the client sent ERROR and closed).
    BadWelcome(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Rejected { code, message } => write!(f, "rejected by node: {code}: {message}"),
            ClientError::Protocol(e) => write!(f, "protocol error from node: {e}"),
            ClientError::NoNode => write!(f, "no node address to connect to"),
            ClientError::Closed => write!(f, "connection closed"),
            ClientError::NoCapacity(d) => write!(f, "no node has capacity; retry after {d:?}"),
            ClientError::BadWelcome(m) => write!(f, "invalid WELCOME from node: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// A message delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Stream position of this message.
    pub position: Position,
    /// The payload.
    pub payload: Vec<u8>,
}

/// What the client reports to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session was established (first connect or reconnect).
    Connected {
        /// The node's id.
        node_id: String,
        /// The node address.
        addr: SocketAddr,
        /// What happened to the resume request.
        resume: ResumeResult,
        /// Messages known to be lost (GAP), if any.
        lost: u64,
    },
    /// A message.
    Message(Message),
    /// Messages were lost: `expected` was the next seq, `got` arrived.
    /// Also reported when the stream restarted (`expected` is then 0).
    Gap {
        /// The seq the client expected.
        expected: u64,
        /// The seq that arrived (or the new stream's next seq).
        got: u64,
    },
    /// The session ended; the client will reconnect.
    Disconnected {
        /// The node's reason, if it sent one.
        code: Option<Code>,
        /// Detail.
        reason: String,
    },
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Node addresses (`host:port`), tried in order.
    pub nodes: Vec<String>,
    /// The client token (protocol.md §9).
    pub token: String,
    /// Agent string sent in HELLO.
    pub agent: String,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Decision servers (`host:port`), tried in order. When set, the client
    /// asks them for a node instead of using `nodes`.
    pub decision: Vec<String>,
    /// The user id, sent to the decision servers (informational).
    pub user: Option<String>,
}

impl ClientConfig {
    /// Settings for one node address and a token, with default timings.
    pub fn new(node: impl Into<String>, token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            nodes: vec![node.into()],
            token: token.into(),
            agent: format!("herald-rs/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            decision: Vec::new(),
            user: None,
        }
    }

    /// Settings that ask `decision` servers which node to use.
    pub fn with_decision(decision: Vec<String>, token: impl Into<String>) -> ClientConfig {
        ClientConfig { nodes: Vec::new(), decision, ..ClientConfig::new(String::new(), token) }
    }
}

/// How many times the cached node is retried before asking the decision servers again.
const CACHED_TRIES: u32 = 2;
/// How long a handshake (or a publisher's wait for one answer) may take in
/// all (protocol.md §3.6: give up after about 10 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-decision-server timeout.
const DECISION_TIMEOUT: Duration = Duration::from_secs(1);

/// Small PRNG for backoff jitter.
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new() -> Jitter {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
        Jitter(t ^ ((std::process::id() as u64) << 17) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A duration uniformly in [d/2, d].
    pub(crate) fn spread(&mut self, d: Duration) -> Duration {
        let ms = d.as_millis().max(1) as u64;
        Duration::from_millis(ms / 2 + self.next() % (ms / 2 + 1))
    }
}

struct Session {
    sock: TcpStream,
    addr: SocketAddr,
    epoch: u64,
    heartbeat: Duration,
}

/// The reference client. See the module docs.
pub struct Client {
    cfg: ClientConfig,
    session: Option<Session>,
    /// Position of the last message handed to the application.
    last: Option<Position>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    node_index: usize,
    redirect: Option<String>,
    wait_until: Option<Instant>,
    backoff: Duration,
    jitter: Jitter,
    queued: std::collections::VecDeque<Event>,
    reconnects: u64,
    connected_once: bool,
    cached: Option<String>,
    cached_failures: u32,
    /// The cached node that stopped answering, tried last from then on.
    last_failed: Option<String>,
}

impl Client {
    /// Creates a client and performs the first connection. Authentication
    /// failures are returned here; network failures are retried by
    /// [`Client::next_event`].
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.nodes.is_empty() && cfg.decision.is_empty() {
            return Err(ClientError::NoNode);
        }
        let mut c = Client {
            backoff: cfg.backoff_min,
            cfg,
            session: None,
            last: None,
            rbuf: Vec::with_capacity(64 * 1024),
            wbuf: Vec::with_capacity(64),
            node_index: 0,
            redirect: None,
            wait_until: None,
            jitter: Jitter::new(),
            queued: Default::default(),
            reconnects: 0,
            connected_once: false,
            cached: None,
            cached_failures: 0,
            last_failed: None,
        };
        c.establish()?;
        Ok(c)
    }

    /// The position of the last message delivered to the application.
    pub fn position(&self) -> Option<Position> {
        self.last
    }

    /// How many times the client has reconnected.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The address of the node currently connected, if any.
    pub fn node_addr(&self) -> Option<SocketAddr> {
        self.session.as_ref().map(|s| s.addr)
    }

    /// Sets the decision servers to ask from the next (re)connection on.
    pub fn set_decision(&mut self, servers: Vec<String>) {
        self.cfg.decision = servers;
    }

    /// Replaces the token (e.g. after TOKEN_EXPIRED) for the next connection.
    pub fn set_token(&mut self, token: String) {
        self.cfg.token = token;
    }

    /// Calls `f` for each event until it returns false or a fatal error occurs.
    pub fn run(&mut self, mut f: impl FnMut(Event) -> bool) -> Result<(), ClientError> {
        loop {
            if !f(self.next_event()?) {
                return Ok(());
            }
        }
    }

    /// Blocks for the next event, reconnecting as needed. Returns an error
    /// only for failures that retrying cannot fix.
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(e) = self.next_event_timeout(Duration::from_secs(3600))? {
                return Ok(e);
            }
        }
    }

    /// Like [`Client::next_event`] but returns `Ok(None)` after `timeout`.
    pub fn next_event_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Ok(Some(e));
            }
            if self.session.is_none() {
                if let Some(t) = self.wait_until {
                    let now = Instant::now();
                    if now < t {
                        if now >= deadline {
                            return Ok(None);
                        }
                        std::thread::sleep((t - now).min(deadline - now));
                        continue;
                    }
                }
                self.wait_until = None;
                match self.establish() {
                    Ok(()) => continue,
                    Err(e @ ClientError::Rejected { .. }) => return Err(e),
                    Err(ClientError::NoCapacity(d)) => {
                        let d = self.jitter.spread(d * 2).max(d);
                        self.wait_until = Some(Instant::now() + d);
                        continue;
                    }
                    Err(e) => {
                        self.schedule_retry(None, &e.to_string());
                        continue;
                    }
                }
            }
            // Parse what is buffered before reading more.
            match self.parse_one() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    if let (ClientError::Protocol(d), Some(s)) = (&e, self.session.as_mut()) {
                        let _ = s.sock.write_all(&error_bytes(d.code(), &d.to_string()));
                    }
                    self.drop_session(None, &e.to_string());
                    continue;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let s = self.session.as_mut().expect("session");
            let wait = (deadline - now).min(s.heartbeat * 3);
            s.sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let mut chunk = [0u8; 16 * 1024];
            match s.sock.read(&mut chunk) {
                Ok(0) => self.drop_session(None, "node closed the connection"),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    if wait >= s.heartbeat * 3 {
                        self.drop_session(Some(Code::IdleTimeout), "node silent for 3 heartbeats");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => self.drop_session(None, &e.to_string()),
            }
        }
    }

    /// Decodes one buffered frame. Ok(true) if something was consumed.
    fn parse_one(&mut self) -> Result<bool, ClientError> {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let r = match protocol::decode(&rbuf, Channel::ToClient) {
            Ok(Decoded::Incomplete(_)) => Ok(None),
            Err(e) => Err(ClientError::Protocol(e)),
            Ok(Decoded::Frame(frame, n)) => Ok(Some((n, self.on_frame(frame)))),
        };
        if let Ok(Some((n, _))) = &r {
            rbuf.drain(..*n);
        }
        self.rbuf = rbuf;
        let Some((_, action)) = r? else { return Ok(false) };
        match action {
            After::Nothing => {}
            After::Reply => {
                if let Some(s) = self.session.as_mut() {
                    if s.sock.write_all(&self.wbuf).is_err() {
                        self.wbuf.clear();
                        self.drop_session(None, "write failed");
                        return Ok(true);
                    }
                }
                self.wbuf.clear();
            }
            After::Violation(code, reason) => {
                // We are the one closing for a violation: say why (§2.4).
                if let Some(s) = self.session.as_mut() {
                    let _ = s.sock.write_all(&error_bytes(code, &reason));
                }
                self.drop_session(Some(code), &reason);
            }
            After::Close(code, reason, delay) => {
                self.drop_session(Some(code), &reason);
                if let Some(d) = delay {
                    self.wait_until = Some(Instant::now() + d);
                }
            }
        }
        Ok(true)
    }

    fn on_frame(&mut self, frame: Frame<'_>) -> After {
        match frame {
            Frame::Deliver(d) => {
                let epoch = self.session.as_ref().map_or(0, |s| s.epoch);
                if d.epoch != epoch {
                    return After::Violation(Code::ProtocolError, "DELIVER for another stream".into());
                }
                if let Some(last) = self.last.filter(|p| p.epoch == d.epoch) {
                    if d.seq <= last.seq {
                        return After::Nothing; // already delivered (cannot happen with a correct node)
                    }
                    if d.seq != last.seq.wrapping_add(1) {
                        self.queued
                            .push_back(Event::Gap { expected: last.seq.saturating_add(1), got: d.seq });
                    }
                }
                let position = Position { epoch: d.epoch, seq: d.seq };
                self.last = Some(position);
                self.queued.push_back(Event::Message(Message { position, payload: d.payload.to_vec() }));
                After::Nothing
            }
            Frame::Ping(n) => {
                Frame::Pong(n).encode(&mut self.wbuf);
                After::Reply
            }
            Frame::Pong(_) => After::Nothing,
            Frame::Goodbye(g) => {
                let delay = Duration::from_millis(g.delay_ms as u64);
                match g.action {
                    GoodbyeAction::GoToNode => {
                        self.redirect = Some(String::from_utf8_lossy(g.target).into_owned())
                    }
                    GoodbyeAction::AskDecision => {
                        self.node_index += 1;
                        self.cached = None;
                    }
                    GoodbyeAction::RetryAfter => {}
                }
                self.backoff = self.cfg.backoff_min;
                After::Close(g.reason, format!("goodbye: {}", g.reason), Some(delay))
            }
            Frame::Error(e) => After::Close(e.code, String::from_utf8_lossy(e.message).into_owned(), None),
            other => After::Violation(
                Code::UnexpectedFrame,
                format!("unexpected frame 0x{:02x}", other.frame_type()),
            ),
        }
    }

    fn drop_session(&mut self, code: Option<Code>, reason: &str) {
        if self.session.take().is_some() {
            self.rbuf.clear();
            self.queued.push_back(Event::Disconnected { code, reason: reason.to_owned() });
            self.schedule_retry(code, reason);
        }
    }

    fn schedule_retry(&mut self, _code: Option<Code>, _reason: &str) {
        if self.wait_until.is_none() {
            let d = self.jitter.spread(self.backoff);
            self.wait_until = Some(Instant::now() + d);
            self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
        }
    }

    /// The nodes to try for the next connection, in order: a GOODBYE's
    /// redirect; else the cached node while it keeps answering (as the
    /// seed's clients do); else a fresh answer from the decision servers;
    /// else the static node list.
    fn candidates(&mut self) -> Result<Vec<String>, ClientError> {
        if let Some(r) = self.redirect.take() {
            return Ok(vec![r]);
        }
        if let Some(c) = self.cached.clone() {
            if self.cached_failures < CACHED_TRIES || self.cfg.decision.is_empty() {
                return Ok(vec![c]);
            }
            self.last_failed = Some(c);
            self.cached = None;
        }
        if !self.cfg.decision.is_empty() {
            let user = self.cfg.user.clone().unwrap_or_default();
            return match crate::decision::client::assign(
                &self.cfg.decision,
                user.as_bytes(),
                3,
                DECISION_TIMEOUT,
            ) {
                Ok(crate::decision::client::AssignOutcome::Nodes(n)) => {
                    let mut v: Vec<String> = n.into_iter().map(|a| a.endpoint).collect();
                    if let Some(bad) = self.last_failed.as_ref() {
                        crate::decision::client::failed_last(&mut v, bad);
                    }
                    Ok(v)
                }
                Ok(crate::decision::client::AssignOutcome::NoCapacity { retry_after }) => {
                    Err(ClientError::NoCapacity(retry_after))
                }
                Err(e) => Err(ClientError::Io(io::Error::other(format!("no decision server answered: {e}")))),
            };
        }
        if self.cfg.nodes.is_empty() {
            return Err(ClientError::NoNode);
        }
        Ok(vec![self.cfg.nodes[self.node_index % self.cfg.nodes.len()].clone()])
    }

    /// Connects, sends HELLO (resuming if we have a position), reads WELCOME.
    fn establish(&mut self) -> Result<(), ClientError> {
        let mut last = ClientError::NoNode;
        for name in self.candidates()? {
            let addr = match name.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(e) => {
                    last = e.into();
                    continue;
                }
            };
            match self.handshake(addr) {
                Ok(()) => {
                    self.cached = Some(name);
                    self.cached_failures = 0;
                    return Ok(());
                }
                Err(e @ ClientError::Rejected { .. }) => return Err(e),
                Err(e) => {
                    if self.cached.as_deref() == Some(name.as_str()) {
                        self.cached_failures += 1;
                    }
                    last = e;
                }
            }
        }
        // Next time, try the next static node.
        self.node_index += 1;
        Err(last)
    }

    fn handshake(&mut self, addr: SocketAddr) -> Result<(), ClientError> {
        let mut sock = TcpStream::connect_timeout(&addr, self.cfg.connect_timeout)?;
        sock.set_nodelay(true)?;
        let mut out = Vec::with_capacity(256);
        Frame::Hello(f::Hello {
            min_version: VERSION,
            max_version: VERSION,
            token: self.cfg.token.as_bytes(),
            agent: self.cfg.agent.as_bytes(),
            resume: self.last,
        })
        .encode(&mut out);
        sock.write_all(&out)?;
        // One deadline for the whole handshake (protocol.md §3.6), however
        // slowly the node dribbles its WELCOME.
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        self.rbuf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let rbuf = std::mem::take(&mut self.rbuf);
            let decoded = protocol::decode(&rbuf, Channel::ToClient);
            match decoded {
                Ok(Decoded::Frame(Frame::Welcome(w), n)) => {
                    if let Err(m) = check_welcome(&w, self.last) {
                        let _ = sock.write_all(&error_bytes(Code::ProtocolError, &m));
                        return Err(ClientError::BadWelcome(m));
                    }
                    let node_id = String::from_utf8_lossy(w.node_id).into_owned();
                    let lost = match (w.resume, self.last) {
                        (ResumeResult::Gap, Some(p)) => w.next_seq.saturating_sub(p.seq.saturating_add(1)),
                        _ => 0,
                    };
                    if w.resume == ResumeResult::Restarted {
                        self.queued.push_back(Event::Gap { expected: 0, got: w.next_seq });
                    } else if w.resume == ResumeResult::Gap {
                        let expected = self.last.map_or(0, |p| p.seq.saturating_add(1));
                        self.queued.push_back(Event::Gap { expected, got: w.next_seq });
                    }
                    if w.resume != ResumeResult::Resumed {
                        // New stream (or a gap): positions restart from the welcome.
                        self.last = Some(Position { epoch: w.epoch, seq: w.next_seq.saturating_sub(1) });
                    }
                    self.queued.push_front(Event::Connected { node_id, addr, resume: w.resume, lost });
                    self.rbuf = rbuf[n..].to_vec();
                    if self.connected_once {
                        self.reconnects += 1;
                    }
                    self.connected_once = true;
                    // protocol.md §3.4: 0 means "use 10 s"; below 100 ms, use 100 ms.
                    let heartbeat = Duration::from_millis(match w.heartbeat_ms {
                        0 => 10_000,
                        ms => ms.max(100) as u64,
                    });
                    // A node that stops reading must not block us in a
                    // write (a PONG) for longer than it may stay silent.
                    sock.set_write_timeout(Some(heartbeat * 3))?;
                    self.session = Some(Session { sock, addr, epoch: w.epoch, heartbeat });
                    self.backoff = self.cfg.backoff_min;
                    return Ok(());
                }
                Ok(Decoded::Frame(Frame::Error(e), _)) => {
                    let message = String::from_utf8_lossy(e.message).into_owned();
                    return Err(match e.code {
                        Code::AuthFailed | Code::TokenExpired | Code::UnsupportedVersion => {
                            ClientError::Rejected { code: e.code, message }
                        }
                        _ => ClientError::Io(io::Error::other(format!("{}: {message}", e.code))),
                    });
                }
                Ok(Decoded::Frame(other, _)) => {
                    return Err(ClientError::Io(io::Error::other(format!(
                        "expected WELCOME, got frame 0x{:02x}",
                        other.frame_type()
                    ))))
                }
                Ok(Decoded::Incomplete(_)) => {}
                Err(e) => return Err(ClientError::Protocol(e)),
            }
            self.rbuf = rbuf;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Io(io::Error::new(ErrorKind::TimedOut, "no WELCOME within 10 s")));
            }
            sock.set_read_timeout(Some(left))?;
            let n = sock.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Iterator for Client {
    type Item = Result<Event, ClientError>;
    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_event())
    }
}

enum After {
    Nothing,
    Reply,
    /// The node closed (GOODBYE or ERROR): leave, after the delay if any.
    Close(Code, String, Option<Duration>),
    /// The node broke the protocol: send ERROR, then leave.
    Violation(Code, String),
}

// ---------------------------------------------------------------- publisher

/// A publisher connection to one node (protocol.md §5).
///
/// Given several nodes ([`Publisher::connect_any`]) it fails over: when a
/// write fails it connects to the next node and writes the unsent buffer
/// again, so a buffer partly taken by the failed node may be delivered twice.
/// Bytes the kernel accepted just before a node died cannot be seen from a
/// plain write; where that matters use [`Publisher::publish_confirmed`],
/// which waits for the node's PUB_RESULT.
pub struct Publisher {
    sock: TcpStream,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    node_id: String,
    next_request: u32,
    last_poll: Instant,
    nodes: Vec<String>,
    current: usize,
    credential: String,
    failovers: u64,
    /// PUB_RESULTs read before anyone waited for them.
    results: std::collections::VecDeque<f::PubResult>,
}

/// Buffered output is written once it reaches this size.
const PUB_FLUSH_AT: usize = 64 * 1024;

impl Publisher {
    /// Connects to a node's ingest endpoint and authenticates with a
    /// credential minted with the publisher secret.
    pub fn connect(addr: &str, credential: &str) -> Result<Publisher, ClientError> {
        Publisher::connect_any(&[addr.to_owned()], credential)
    }

    /// Connects to the first node of `nodes` that accepts, and fails over
    /// between them afterwards.
    pub fn connect_any(nodes: &[String], credential: &str) -> Result<Publisher, ClientError> {
        let mut last = ClientError::NoNode;
        for (i, n) in nodes.iter().enumerate() {
            match Publisher::open(n, credential) {
                Ok(mut p) => {
                    p.nodes = nodes.to_vec();
                    p.current = i;
                    return Ok(p);
                }
                Err(e @ ClientError::Rejected { .. }) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// How many times this publisher has failed over to another node.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Moves to the next node that accepts, keeping the unsent buffer.
    fn failover(&mut self) -> Result<(), ClientError> {
        let n = self.nodes.len();
        let mut last = ClientError::NoNode;
        for step in 1..=n.max(1) {
            let i = (self.current + step) % n.max(1);
            let Some(addr) = self.nodes.get(i) else { break };
            match Publisher::open(addr, &self.credential) {
                Ok(p) => {
                    self.sock = p.sock;
                    self.rbuf = p.rbuf;
                    self.node_id = p.node_id;
                    self.current = i;
                    self.failovers += 1;
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn open(addr: &str, credential: &str) -> Result<Publisher, ClientError> {
        let a = addr.to_socket_addrs()?.next().ok_or(ClientError::NoNode)?;
        let mut sock = TcpStream::connect_timeout(&a, Duration::from_secs(2))?;
        sock.set_nodelay(true)?;
        let hello = Frame::PubHello(f::PubHello {
            min_version: VERSION,
            max_version: VERSION,
            credential: credential.as_bytes(),
            agent: b"herald-rs-publisher",
        })
        .to_vec();
        sock.write_all(&hello)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut p = Publisher {
            sock,
            wbuf: Vec::with_capacity(PUB_FLUSH_AT + 1024),
            rbuf: Vec::new(),
            node_id: String::new(),
            next_request: 1,
            last_poll: Instant::now(),
            nodes: vec![addr.to_owned()],
            current: 0,
            credential: credential.to_owned(),
            failovers: 0,
            results: Default::default(),
        };
        p.node_id = p.read_frame(|f| match f {
            Frame::PubWelcome(w) => Ok(Some(String::from_utf8_lossy(w.node_id).into_owned())),
            _ => Ok(None),
        })?;
        Ok(p)
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Queues one message; written when the buffer fills or on [`Publisher::flush`].
    pub fn publish(&mut self, user: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        check_user(user, payload)?;
        f::encode_publish(&mut self.wbuf, 0, 0, user, b"", payload);
        if self.wbuf.len() >= PUB_FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Queues many messages as PUBLISH_BATCH frames.
    pub fn publish_batch<'a>(
        &mut self,
        msgs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), ClientError> {
        let mut w = BatchWriter::start(&mut self.wbuf, 0, 0);
        for (user, payload) in msgs {
            check_user(user, payload)?;
            if !w.push(&mut self.wbuf, user, b"", payload) {
                w.finish(&mut self.wbuf);
                if self.wbuf.len() >= PUB_FLUSH_AT {
                    self.flush()?;
                }
                w = BatchWriter::start(&mut self.wbuf, 0, 0);
                w.push(&mut self.wbuf, user, b"", payload);
            }
        }
        if w.count() == 0 {
            // Drop the empty frame header.
            let empty = f::HEADER_LEN + 1 + 4 + 2;
            let n = self.wbuf.len() - empty;
            self.wbuf.truncate(n);
        } else {
            w.finish(&mut self.wbuf);
        }
        if self.wbuf.len() >= PUB_FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Publishes one message and waits for the node's PUB_RESULT.
    pub fn publish_confirmed(&mut self, user: &[u8], payload: &[u8]) -> Result<f::PubResult, ClientError> {
        check_user(user, payload)?;
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        let mut frame = Vec::with_capacity(64 + payload.len());
        f::encode_publish(&mut frame, PUBLISH_WANT_RESULT, id, user, b"", payload);
        // If the node dies before answering, fail over and send it again:
        // a confirmed publish is delivered at least once.
        let mut tries = self.nodes.len().max(1);
        loop {
            self.wbuf.extend_from_slice(&frame);
            let r = self.flush().and_then(|()| self.await_result(id));
            match r {
                Ok(r) => return Ok(r),
                Err(e @ ClientError::Rejected { .. }) | Err(e @ ClientError::Protocol(_)) => return Err(e),
                Err(e) => {
                    tries -= 1;
                    if tries == 0 || self.nodes.len() < 2 {
                        return Err(e);
                    }
                    self.wbuf.clear();
                    self.failover()?;
                }
            }
        }
    }

    fn await_result(&mut self, id: u32) -> Result<f::PubResult, ClientError> {
        loop {
            if let Some(i) = self.results.iter().position(|r| r.request_id == id) {
                return Ok(self.results.remove(i).expect("index from position"));
            }
            let r = self.read_frame(|f| match f {
                Frame::PubResult(r) => Ok(Some(r)),
                _ => Ok(None),
            })?;
            self.results.push_back(r);
        }
    }

    /// Queues frames that are already encoded (PUBLISH / PUBLISH_BATCH, e.g.
    /// built with [`BatchWriter`]) and writes everything buffered.
    pub fn write_raw(&mut self, frames: &[u8]) -> Result<(), ClientError> {
        self.wbuf.extend_from_slice(frames);
        self.flush()
    }

    /// Writes everything buffered. Blocks while the node applies back-pressure.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            if self.sock.write_all(&self.wbuf).is_err() {
                self.failover()?;
                self.sock.write_all(&self.wbuf)?;
            }
            self.wbuf.clear();
        }
        if self.last_poll.elapsed() >= Duration::from_secs(1) {
            self.poll_incoming()?;
        }
        Ok(())
    }

    /// Answers keepalives and notices GOODBYE/ERROR without blocking.
    fn poll_incoming(&mut self) -> Result<(), ClientError> {
        self.last_poll = Instant::now();
        self.sock.set_nonblocking(true)?;
        let mut chunk = [0u8; 4096];
        let r = loop {
            // Take at most 64 KiB a call (plus one frame in progress): a node
            // streaming at us cannot grow this buffer without bound.
            if self.rbuf.len() >= 64 * 1024 {
                break Ok(());
            }
            match self.sock.read(&mut chunk) {
                Ok(0) => break Err(ClientError::Closed),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.sock.set_nonblocking(false)?;
        r?;
        while let Decoded::Frame(frame, n) =
            protocol::decode(&self.rbuf, Channel::FromIngest).map_err(ClientError::Protocol)?
        {
            if let Frame::PubResult(r) = frame {
                // A result that arrived early: keep it for publish_confirmed.
                if self.results.len() >= 1024 {
                    self.results.pop_front();
                }
                self.results.push_back(r);
            }
            let reply = Self::on_control(frame)?;
            self.rbuf.drain(..n);
            if let Some(r) = reply {
                self.sock.write_all(&r)?;
            }
        }
        Ok(())
    }

    fn on_control(frame: Frame<'_>) -> Result<Option<Vec<u8>>, ClientError> {
        match frame {
            Frame::Ping(n) => Ok(Some(Frame::Pong(n).to_vec())),
            Frame::Error(e) => Err(ClientError::Rejected {
                code: e.code,
                message: String::from_utf8_lossy(e.message).into_owned(),
            }),
            Frame::Goodbye(g) => {
                Err(ClientError::Rejected { code: g.reason, message: "node said goodbye".into() })
            }
            _ => Ok(None),
        }
    }

    /// Reads frames until `pick` returns a value, answering PINGs.
    fn read_frame<T>(
        &mut self,
        mut pick: impl FnMut(Frame<'_>) -> Result<Option<T>, ClientError>,
    ) -> Result<T, ClientError> {
        let mut chunk = [0u8; 4096];
        // One deadline for the answer, however many PINGs come first.
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            while let Decoded::Frame(frame, n) =
                protocol::decode(&self.rbuf, Channel::FromIngest).map_err(ClientError::Protocol)?
            {
                let picked = match frame {
                    Frame::Ping(_) | Frame::Error(_) | Frame::Goodbye(_) => {
                        if let Some(r) = Self::on_control(frame)? {
                            self.sock.write_all(&r)?;
                        }
                        None
                    }
                    other => pick(other)?,
                };
                self.rbuf.drain(..n);
                if let Some(t) = picked {
                    return Ok(t);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Io(io::Error::new(
                    ErrorKind::TimedOut,
                    "no answer from the node within 10 s",
                )));
            }
            self.sock.set_read_timeout(Some(left))?;
            let n = self.sock.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The checks a client makes on WELCOME (protocol.md §3.2), given the
/// position it asked to resume from.
fn check_welcome(w: &f::Welcome<'_>, asked: Option<Position>) -> Result<(), String> {
    if w.epoch == 0 || w.next_seq == 0 {
        return Err("epoch and next_seq must not be 0".into());
    }
    match (asked, w.resume) {
        (None, ResumeResult::Fresh) | (Some(_), ResumeResult::Restarted) => Ok(()),
        (None, r) => Err(format!("{r:?} without a resume request")),
        (Some(_), ResumeResult::Fresh) => Err("FRESH answer to a resume request".into()),
        // (checked: a hostile node may have sent seq u64::MAX before)
        (Some(p), ResumeResult::Resumed)
            if w.epoch == p.epoch && p.seq.checked_add(1) == Some(w.next_seq) =>
        {
            Ok(())
        }
        (Some(p), ResumeResult::Gap)
            if w.epoch == p.epoch && p.seq.checked_add(1).is_some_and(|n| w.next_seq > n) =>
        {
            Ok(())
        }
        (Some(p), r) => Err(format!(
            "{r:?} with epoch {:x}/next_seq {} for a resume from {:x}/{}",
            w.epoch, w.next_seq, p.epoch, p.seq
        )),
    }
}

/// An ERROR frame's bytes.
fn error_bytes(code: Code, msg: &str) -> Vec<u8> {
    Frame::Error(f::ErrorFrame { code, message: msg.as_bytes() }).to_vec()
}

fn check_user(user: &[u8], payload: &[u8]) -> Result<(), ClientError> {
    if user.is_empty() || user.len() > limits::MAX_USER_LEN || payload.len() > limits::MAX_PAYLOAD {
        return Err(ClientError::Io(io::Error::new(
            ErrorKind::InvalidInput,
            "user id must be 1..=64 bytes and payload at most 65,536 bytes",
        )));
    }
    Ok(())
}
