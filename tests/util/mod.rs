//! Shared helpers for integration tests: start a node or a decision server
//! on port 0 in-process, mint tokens, and speak raw protocol frames over
//! real sockets.

#![allow(dead_code)]

pub mod herd;
pub mod js;
pub mod jscluster;
pub mod netns;
pub mod proc;
pub mod queues;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald::node::{Config, Node, NodeError, ShutdownHandle};
use herald::protocol::frame::{self as f, Frame};
use herald::protocol::{decode, token, Channel, Decoded, Position, VERSION};

pub const CLIENT_SECRET: &[u8] = b"client-secret-for-tests";
pub const PUBLISHER_SECRET: &[u8] = b"publisher-secret-for-tests";

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The wall clock in ms since the Unix epoch (heartbeat and ADMIN stamps).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

pub fn token_for(user: &str) -> String {
    token::mint(CLIENT_SECRET, user.as_bytes(), unix_now() + 3600).unwrap()
}

pub fn pub_credential() -> String {
    token::mint(PUBLISHER_SECRET, b"tests", unix_now() + 3600).unwrap()
}

/// A node running on a thread, stopped (drained) on drop.
pub struct TestNode {
    pub client: SocketAddr,
    pub ingest: SocketAddr,
    pub metrics: Option<SocketAddr>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), NodeError>>>,
}

pub fn test_config() -> Config {
    Config {
        node_id: "t1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ingest: "127.0.0.1:0".parse().unwrap(),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        client_secret: CLIENT_SECRET.to_vec(),
        publisher_secret: PUBLISHER_SECRET.to_vec(),
        drain_window: Duration::from_millis(200),
        log_every: Duration::ZERO,
        retain_total: 8 << 20,
        ..Config::default()
    }
}

impl TestNode {
    pub fn start(cfg: Config) -> TestNode {
        let node = Node::bind(cfg).expect("bind");
        let (client, ingest, metrics) = (node.client_addr(), node.ingest_addr(), node.metrics_addr());
        let handle = node.shutdown_handle();
        let thread = Some(std::thread::spawn(move || node.run()));
        TestNode { client, ingest, metrics, handle, thread }
    }

    /// Triggers the drain and waits for `run` to return.
    pub fn stop(mut self) -> Result<(), NodeError> {
        self.handle.trigger();
        self.thread.take().unwrap().join().unwrap()
    }

    /// GET /metrics, returns the value of one sample line (`name{...}`).
    pub fn metric(&self, name: &str) -> u64 {
        let body = http_get(self.metrics.unwrap(), "/metrics");
        for line in body.lines() {
            if line.starts_with(name) && line[name.len()..].starts_with('{') {
                return line.rsplit(' ').next().unwrap().parse().unwrap();
            }
        }
        panic!("metric {name} not found in\n{body}");
    }

    /// The value of labelled counter `metric` where `label` is `value`
    /// (its last label).
    pub fn labelled(&self, metric: &str, label: &str, value: &str) -> u64 {
        let body = http_get(self.metrics.unwrap(), "/metrics");
        let (head, want) = (format!("{metric}{{"), format!("{label}=\"{value}\"}}"));
        for line in body.lines() {
            if line.starts_with(&head) && line.contains(&want) {
                return line.rsplit(' ').next().unwrap().parse().unwrap();
            }
        }
        panic!("no {metric} with {label}={value} in\n{body}");
    }

    /// `herald_welcomes_total` for one resume outcome.
    pub fn welcomes(&self, resume: &str) -> u64 {
        self.labelled("herald_welcomes_total", "resume", resume)
    }

    /// `herald_closes_total` for one close reason.
    pub fn closes(&self, reason: &str) -> u64 {
        self.labelled("herald_closes_total", "reason", reason)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.trigger();
            let _ = t.join();
        }
    }
}

/// A decision server on a thread, stopped on drop.
/// A decision server on loopback (both ports picked by the OS) with these
/// secrets and no summary log; everything else as `herald decision`'s
/// defaults.
pub fn decision_config(cluster_secret: &[u8], admin_secret: &[u8]) -> herald::decision::Config {
    herald::decision::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat: "127.0.0.1:0".parse().unwrap(),
        cluster_secret: cluster_secret.to_vec(),
        admin_secret: admin_secret.to_vec(),
        log_every: Duration::ZERO,
        ..herald::decision::Config::default()
    }
}

pub struct TestDecision {
    pub tcp: SocketAddr,
    pub udp: SocketAddr,
    handle: herald::decision::ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<herald::decision::Stats>>>,
}

impl TestDecision {
    pub fn start(cfg: herald::decision::Config) -> TestDecision {
        let s = herald::decision::DecisionServer::bind(cfg).expect("bind");
        let (tcp, udp, handle) = (s.tcp_addr(), s.udp_addr(), s.shutdown_handle());
        let thread = Some(std::thread::spawn(move || s.run()));
        TestDecision { tcp, udp, handle, thread }
    }

    pub fn addr(&self) -> String {
        self.tcp.to_string()
    }

    pub fn stop(mut self) -> herald::decision::Stats {
        self.handle.trigger();
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for TestDecision {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.trigger();
            let _ = t.join();
        }
    }
}

/// Polls `f` for up to 3 s until it returns `want`; returns its last value.
/// For figures that loops 1..N of a multi-loop node report about once a
/// second.
pub fn eventually<T: PartialEq>(f: impl Fn() -> T, want: T) -> T {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let v = f();
        if v == want || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A raw protocol connection that reads whole frames.
pub struct Raw {
    pub sock: TcpStream,
    buf: Vec<u8>,
    channel: Channel,
}

/// What a raw read produced.
#[derive(Debug)]
pub enum Got {
    Frame(Vec<u8>),
    Eof,
    Timeout,
}

impl Raw {
    pub fn connect(addr: SocketAddr, channel: Channel) -> Raw {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_nodelay(true).unwrap();
        Raw { sock, buf: Vec::new(), channel }
    }

    /// Connects with a receive buffer of `rcvbuf` bytes, set before the
    /// handshake so the window is small from the start (shrinking it later
    /// leaves the sender to zero-window probes, seconds apart).
    pub fn connect_small(addr: SocketAddr, channel: Channel, rcvbuf: usize) -> Raw {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(rcvbuf).unwrap();
        s.connect(&addr.into()).unwrap();
        let sock: TcpStream = s.into();
        sock.set_nodelay(true).unwrap();
        Raw { sock, buf: Vec::new(), channel }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    pub fn send_frame(&mut self, frame: Frame<'_>) {
        let v = frame.to_vec();
        self.send(&v);
    }

    /// Reads the next frame's bytes within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            match decode(&self.buf, self.channel) {
                Ok(Decoded::Frame(_, n)) => {
                    let v = self.buf[..n].to_vec();
                    self.buf.drain(..n);
                    return Got::Frame(v);
                }
                Ok(Decoded::Incomplete(_)) => {}
                Err(e) => panic!("node sent an invalid frame: {e}"),
            }
            let now = Instant::now();
            if now >= deadline {
                return Got::Timeout;
            }
            self.sock.set_read_timeout(Some(deadline - now)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Got::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Got::Timeout
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Got::Eof,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Reads the next frame, panicking on EOF or timeout.
    pub fn expect(&mut self, timeout: Duration) -> Vec<u8> {
        match self.next(timeout) {
            Got::Frame(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// Decodes bytes known to hold one frame on `ch`.
pub fn frame(bytes: &[u8], ch: Channel) -> Frame<'_> {
    match decode(bytes, ch).unwrap() {
        Decoded::Frame(f, _) => f,
        Decoded::Incomplete(_) => panic!("incomplete"),
    }
}

/// Sends a HELLO with `token` (version 1 only).
pub fn send_hello(r: &mut Raw, token: &str, resume: Option<Position>) {
    r.send_frame(Frame::Hello(f::Hello {
        min_version: VERSION,
        max_version: VERSION,
        token: token.as_bytes(),
        agent: b"test",
        resume,
    }));
}

/// Sends a raw PEER_HELLO claiming to be node `node_id` (no secret needed).
pub fn send_peer_hello(r: &mut Raw, node_id: &[u8], nonce: [u8; 16]) {
    r.send_frame(Frame::PeerHello(f::PeerHello {
        min_version: VERSION,
        max_version: VERSION,
        node_id,
        incarnation: 1,
        nonce,
    }));
}

/// Connects a raw client for `user`, sends HELLO, returns it with the WELCOME's
/// (epoch, next_seq, resume result).
pub fn raw_client(node: &TestNode, user: &str, resume: Option<Position>) -> (Raw, f::Welcome<'static>) {
    let mut r = Raw::connect(node.client, Channel::ToClient);
    send_hello(&mut r, &token_for(user), resume);
    let w = r.expect(Duration::from_secs(5));
    let w: &'static [u8] = Box::leak(w.into_boxed_slice());
    match frame(w, Channel::ToClient) {
        Frame::Welcome(w) => (r, w),
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// Reads DELIVERs until `n` have arrived; returns (seq, payload) pairs.
pub fn read_delivers(r: &mut Raw, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut v = Vec::new();
    while v.len() < n {
        let b = r.expect(Duration::from_secs(5));
        match frame(&b, Channel::ToClient) {
            Frame::Deliver(d) => v.push((d.seq, d.payload.to_vec())),
            Frame::Ping(_) => {}
            other => panic!("expected DELIVER, got {other:?}"),
        }
    }
    v
}
