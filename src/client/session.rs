//! The reference [`Client`]: its settings, the events it reports, and the
//! loop that reads a session's frames and turns them into [`Event`]s
//! (answering PINGs, following GOODBYE, reporting gaps).
//!
//! It must not pick nodes, handshake or back off: that is `reconnect`'s job.
//! It must not skip a loss silently: every gap the protocol reveals becomes
//! an event.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::backoff::Jitter;
use super::ClientError;
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{self, Channel, Code, Decoded, GoodbyeAction, Position, ResumeResult};

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
    /// Messages `first..=last` were replaced by later messages with the
    /// same keys (CONFLATED, protocol.md §3.8): not a loss. The latest
    /// message of each key follows.
    Conflated {
        /// The first seq taken out.
        first: u64,
        /// The last seq taken out.
        last: u64,
        /// The keys those messages carried, each once.
        keys: Vec<Vec<u8>>,
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
    /// Node addresses (`host:port`), tried in order: the client stays on
    /// the one that last worked, and after two failed tries there moves to
    /// the next.
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
    /// TLS: connect over TLS, verifying the node's certificate with this
    /// configuration ([`crate::tls::client_config`]); none: plaintext.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// TLS to the decision servers: ask them over TLS, verifying each
    /// one's certificate with this configuration for the host of its
    /// `host:port`; none: plaintext. Independent of `tls` (a cluster may
    /// move its nodes and its decision servers to TLS one at a time); when
    /// one CA issued both, give the same configuration to both.
    pub decision_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
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
            tls: None,
            decision_tls: None,
        }
    }

    /// Settings that ask `decision` servers which node to use.
    pub fn with_decision(decision: Vec<String>, token: impl Into<String>) -> ClientConfig {
        ClientConfig { nodes: Vec::new(), decision, ..ClientConfig::new(String::new(), token) }
    }
}

/// One live connection to a node, made by the handshake.
pub(super) struct Session {
    pub(super) sock: crate::dial::Stream,
    pub(super) addr: SocketAddr,
    pub(super) epoch: u64,
    pub(super) heartbeat: Duration,
    /// When the node last sent anything: silent for 3 heartbeats, it is
    /// dead (protocol.md §3.4), however short the caller's own timeouts.
    pub(super) heard: Instant,
}

/// The reference client. See the [module docs](crate::client).
pub struct Client {
    pub(super) cfg: ClientConfig,
    pub(super) session: Option<Session>,
    /// Position of the last message handed to the application.
    pub(super) last: Option<Position>,
    pub(super) rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    pub(super) node_index: usize,
    pub(super) redirect: Option<String>,
    pub(super) wait_until: Option<Instant>,
    pub(super) backoff: Duration,
    pub(super) jitter: Jitter,
    pub(super) queued: std::collections::VecDeque<Event>,
    pub(super) reconnects: u64,
    pub(super) connected_once: bool,
    pub(super) cached: Option<String>,
    pub(super) cached_failures: u32,
    /// The cached node that stopped answering, tried last from then on.
    pub(super) last_failed: Option<String>,
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
                    Err(ClientError::SessionLimit(reason)) => {
                        // The cap frees up only when another of the user's
                        // sessions ends: a long wait, on the same node.
                        let d = super::SESSION_LIMIT_BACKOFF;
                        self.wait_until = Some(Instant::now() + self.jitter.spread(d * 2).max(d));
                        return Ok(Some(Event::Disconnected { code: Some(Code::SessionLimit), reason }));
                    }
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
            let dead_at = s.heard + s.heartbeat * 3;
            if now >= dead_at {
                self.drop_session(Some(Code::IdleTimeout), "node silent for 3 heartbeats");
                continue;
            }
            let wait = (deadline - now).min(dead_at - now);
            s.sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let mut chunk = [0u8; 16 * 1024];
            match s.sock.read(&mut chunk) {
                Ok(0) => self.drop_session(None, "node closed the connection"),
                Ok(n) => {
                    s.heard = Instant::now();
                    self.rbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
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
            Frame::Conflated(c) => {
                let epoch = self.session.as_ref().map_or(0, |s| s.epoch);
                if c.epoch != epoch {
                    return After::Violation(Code::ProtocolError, "CONFLATED for another stream".into());
                }
                let mut first = c.first_seq;
                if let Some(last) = self.last.filter(|p| p.epoch == c.epoch) {
                    if c.last_seq <= last.seq {
                        return After::Nothing; // already past it (cannot happen with a correct node)
                    }
                    let next = last.seq.saturating_add(1);
                    if first > next {
                        self.queued.push_back(Event::Gap { expected: next, got: first });
                    }
                    first = first.max(next);
                }
                self.last = Some(Position { epoch: c.epoch, seq: c.last_seq });
                let keys = c.keys.iter().map(|k| k.0.to_vec()).collect();
                self.queued.push_back(Event::Conflated { first, last: c.last_seq, keys });
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

/// An ERROR frame's bytes.
pub(super) fn error_bytes(code: Code, msg: &str) -> Vec<u8> {
    Frame::Error(f::ErrorFrame { code, message: msg.as_bytes() }).to_vec()
}
