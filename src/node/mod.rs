//! The node: a single-threaded mio + slab event loop that authenticates
//! clients, takes messages from publishers and writes each one to the
//! sessions of exactly one user.
//!
//! Layout of one loop turn (the nats-server shape):
//! 1. poll; take `now` once;
//! 2. for each ready socket, read until `WouldBlock` or the per-turn budget,
//!    parse every complete frame, and *append* outgoing frames to the
//!    destination connections' buffers, marking them dirty;
//! 3. flush every dirty connection with one `write` each;
//! 4. run timers (handshake deadlines, keepalive, grace expiry, drain, logs).
//!
//! The per-client "queue" is the connection's own output buffer, owned by
//! the loop: no lock, no cross-thread hand-off and no wakeup on the delivery
//! path, and the bound is in bytes (protocol frames), which is what a slow
//! reader actually costs.
//!
//! Submodules: [`conn`] (per-connection state and buffers), [`registry`]
//! (users, sessions, streams, resume decisions), [`retention`] (bounded
//! message ring), [`mesh`] (presence of users on other nodes), [`metrics`]
//! (counters, Prometheus text).
//!
//! With `--threads N` (N > 1) the node runs N such loops, each owning the
//! users that hash to it; loop 0 also owns the listeners, publishers and mesh
//! links and routes each message to its user's loop in per-turn batches with
//! one wake per batch ([`shard`] has the details). With one loop nothing
//! crosses a thread at all.
//!
//! Cluster duties run beside the loop: a discovery thread asks the decision
//! servers for the node list every second and hands it over through a
//! channel plus one wake; the loop dials missing peers (on short-lived
//! threads, so a dead peer never blocks it), sends UDP heartbeats, and drains
//! itself when an admin marks it draining.

pub mod cli;
pub mod conn;
pub mod fxhash;
pub mod mesh;
pub mod metrics;
pub mod registry;
pub mod retention;
pub mod shard;

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::protocol::frame::{self as f, Frame, PUBLISH_WANT_RESULT};
use crate::protocol::{self, limits, sign, token, Channel, Code, Decoded, GoodbyeAction, PresenceOp};
use conn::{Conn, State};
use crossbeam_channel::{Receiver, Sender};
use metrics::{reason_index, Metrics, QueueDepth};
use registry::{Registry, RegistryConfig};
use retention::LogLimits;
use std::collections::HashMap;

const CLIENT_LISTENER: Token = Token(0);
const INGEST_LISTENER: Token = Token(1);
const METRICS_LISTENER: Token = Token(2);
const WAKER: Token = Token(3);
/// Connection tokens are slab keys offset by this.
const FIRST_CONN: usize = 16;

/// What to do with a client whose queue bound is hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Close it with SLOW_CONSUMER; its messages stay retained for resume.
    Disconnect,
    /// Keep it, drop the messages that do not fit; the client sees a seq gap.
    Drop,
}

/// Node configuration. `Default` gives the CLI defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// Client endpoint.
    pub listen: SocketAddr,
    /// Publisher and mesh endpoint.
    pub ingest: SocketAddr,
    /// `/metrics` and `/healthz` endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Address clients are told to use (defaults to the bound client address).
    pub advertise: Option<String>,
    /// Maximum client sessions.
    pub capacity: usize,
    /// Client-token secret.
    pub client_secret: Vec<u8>,
    /// Publisher-credential secret.
    pub publisher_secret: Vec<u8>,
    /// Ping a client silent for this long; close it after 3×.
    pub heartbeat: Duration,
    /// A client must complete its HELLO within this.
    pub handshake_timeout: Duration,
    /// Per-client bound on pending output, bytes.
    pub queue_bytes: usize,
    /// What to do when the bound is hit.
    pub slow_policy: SlowPolicy,
    /// How long a user without sessions keeps its stream for resume.
    pub grace: Duration,
    /// Retained messages per user.
    pub retain_count: usize,
    /// Retained bytes per user.
    pub retain_bytes: usize,
    /// Retained bytes in total (size it to DELIVER bytes per second × `grace`).
    pub retain_total: usize,
    /// Spread drain goodbyes over this window.
    pub drain_window: Duration,
    /// Log a summary line this often (zero: never).
    pub log_every: Duration,
    /// Decision servers (`host:port`; heartbeats go to the same port over
    /// UDP, or `host:tcp/udp` to name both). Empty: standalone.
    pub decision: Vec<String>,
    /// Cluster secret: signs heartbeats and authenticates mesh links.
    pub cluster_secret: Vec<u8>,
    /// Ingest address peers are told to use (default: the bound ingest address).
    pub advertise_ingest: Option<String>,
    /// How often to send heartbeats and poll the node list.
    pub heartbeat_interval: Duration,
    /// Stop reading publishers while a mesh link has this much pending output.
    pub peer_backlog: usize,
    /// Event loops (threads); users are split among them by hash.
    pub threads: usize,
    /// Tests only: the loop with this id (1..N) panics when it is handed a
    /// client; 0 never.
    #[cfg(test)]
    pub(crate) fail_on_adopt: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "node-1".into(),
            listen: "0.0.0.0:7400".parse().expect("valid"),
            ingest: "127.0.0.1:7401".parse().expect("valid"),
            metrics: None,
            advertise: None,
            capacity: default_capacity(),
            client_secret: Vec::new(),
            publisher_secret: Vec::new(),
            heartbeat: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            queue_bytes: 256 * 1024,
            slow_policy: SlowPolicy::Disconnect,
            grace: Duration::from_secs(30),
            retain_count: 1024,
            retain_bytes: 256 * 1024,
            retain_total: 128 << 20,
            drain_window: Duration::from_secs(10),
            log_every: Duration::from_secs(10),
            decision: Vec::new(),
            cluster_secret: Vec::new(),
            advertise_ingest: None,
            heartbeat_interval: Duration::from_secs(1),
            peer_backlog: 8 << 20,
            threads: 1,
            #[cfg(test)]
            fail_on_adopt: 0,
        }
    }
}

/// Capacity from the open-file limit: 95 % of it, keeping the rest for
/// listeners, publishers, peers and metrics.
pub fn default_capacity() -> usize {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    let n = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur as usize
    } else {
        1024
    };
    n.saturating_sub((n / 20).max(32)).max(1)
}

/// Asks a running node to drain and stop; cloneable, usable from any thread
/// (the ctrl-c handler only calls [`ShutdownHandle::trigger`]).
#[derive(Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    kill: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Wakers of loops 1..N.
    others: Vec<Arc<Waker>>,
}

impl ShutdownHandle {
    /// Starts the drain: stop accepting, send goodbyes, flush, return.
    pub fn trigger(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        for w in &self.others {
            let _ = w.wake();
        }
    }

    /// Stops at once, as a crash would: no goodbyes, sockets just close.
    /// For demos and failure tests.
    pub fn kill(&self) {
        self.kill.store(true, Ordering::SeqCst);
        self.trigger();
    }
}

/// A bound node, ready to [`Node::run`].
pub struct Node {
    poll: Poll,
    client_l: TcpListener,
    ingest_l: TcpListener,
    metrics_l: Option<TcpListener>,
    handle: ShutdownHandle,
    /// Polls of loops 1..N.
    others: Vec<Poll>,
    cfg: Config,
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    // A connect storm of thousands of clients must not overflow the backlog.
    s.listen(4096)?;
    Ok(TcpListener::from_std(s.into()))
}

impl Node {
    /// Binds the listeners. Port 0 picks a free port (see the `*_addr` methods).
    pub fn bind(cfg: Config) -> io::Result<Node> {
        // protocol.md §3.4: WELCOME.heartbeat_ms is 100..=3,600,000.
        if cfg.heartbeat < Duration::from_millis(100) || cfg.heartbeat > Duration::from_secs(3600) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("heartbeat {:?} is outside 100ms..=1h", cfg.heartbeat),
            ));
        }
        if cfg.threads == 0 || cfg.threads > MAX_THREADS {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("threads must be 1..={MAX_THREADS}, not {}", cfg.threads),
            ));
        }
        let poll = Poll::new()?;
        let mut client_l = listen(cfg.listen)?;
        let mut ingest_l = listen(cfg.ingest)?;
        let mut metrics_l = cfg.metrics.map(listen).transpose()?;
        poll.registry().register(&mut client_l, CLIENT_LISTENER, Interest::READABLE)?;
        poll.registry().register(&mut ingest_l, INGEST_LISTENER, Interest::READABLE)?;
        if let Some(l) = metrics_l.as_mut() {
            poll.registry().register(l, METRICS_LISTENER, Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut others = Vec::new();
        let mut other_wakers = Vec::new();
        for _ in 1..cfg.threads {
            let p = Poll::new()?;
            other_wakers.push(Arc::new(Waker::new(p.registry(), WAKER)?));
            others.push(p);
        }
        let handle = ShutdownHandle {
            stop: Arc::new(AtomicBool::new(false)),
            kill: Arc::new(AtomicBool::new(false)),
            waker,
            others: other_wakers,
        };
        Ok(Node { poll, client_l, ingest_l, metrics_l, handle, others, cfg })
    }

    /// The bound client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_l.local_addr().expect("bound")
    }
    /// The bound ingest address.
    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest_l.local_addr().expect("bound")
    }
    /// The bound metrics address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_l.as_ref().map(|l| l.local_addr().expect("bound"))
    }
    /// A handle that makes [`Node::run`] drain and return.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Runs the event loop(s) until a shutdown is triggered and the drain is
    /// done. Loop 0 runs on the calling thread; loops 1..N on threads of
    /// their own, joined before this returns.
    pub fn run(self) -> io::Result<()> {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            ^ (std::process::id() as u64) << 32;
        let n = self.cfg.threads;
        let incarnation = unix_ms();
        let shared = Arc::new(shard::Shared::new(n));
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        if !self.cfg.decision.is_empty() {
            spawn_discovery(
                self.cfg.decision.clone(),
                self.cfg.heartbeat_interval,
                self.handle.stop.clone(),
                self.handle.waker.clone(),
                ctl_tx.clone(),
            );
        }
        let advertise = self
            .cfg
            .advertise
            .clone()
            .unwrap_or_else(|| self.client_l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        let advertise_ingest = self
            .cfg
            .advertise_ingest
            .clone()
            .unwrap_or_else(|| self.ingest_l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        let hb = Heartbeater::new(&self.cfg.decision, advertise, advertise_ingest, incarnation);

        // Loops 1..N: their inboxes, and the way back to loop 0.
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (free_tx, free_rx) = crossbeam_channel::unbounded();
        let mut links = Vec::new();
        let mut threads = Vec::new();
        for (i, poll) in self.others.into_iter().enumerate() {
            let id = i + 1;
            let (tx, inbox) = crossbeam_channel::unbounded();
            let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let waker = self.handle.others[i].clone();
            links.push(shard::Link {
                tx,
                waker: waker.clone(),
                in_flight: in_flight.clone(),
                batch: Vec::new(),
                since: None,
                wake: false,
            });
            let mut l = Loop::new(
                poll,
                waker,
                &self.handle,
                self.cfg.clone(),
                (id, shared.clone()),
                seed,
                crossbeam_channel::unbounded(),
                Heartbeater::new(&[], String::new(), String::new(), incarnation),
                incarnation,
            );
            l.owner = Some(shard::Owner {
                inbox,
                in_flight,
                free: free_tx.clone(),
                events_tx: events_tx.clone(),
                router_waker: self.handle.waker.clone(),
                events: Vec::new(),
            });
            // Tells loop 0 this loop is gone, however it ends (even by panic).
            let gone = LoopGone { id, shared: shared.clone(), waker: self.handle.waker.clone() };
            let spawned = std::thread::Builder::new().name(format!("herald-loop-{id}")).spawn(move || {
                let r = l.run();
                if r.is_err() {
                    gone.shared.failed.store(id, Ordering::SeqCst);
                }
                drop(gone);
                r
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.handle.kill();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        let mut l = Loop::new(
            self.poll,
            self.handle.waker.clone(),
            &self.handle,
            self.cfg,
            (0, shared),
            seed,
            (ctl_tx, ctl_rx),
            hb,
            incarnation,
        );
        l.client_l = Some(self.client_l);
        l.ingest_l = Some(self.ingest_l);
        l.metrics_l = self.metrics_l;
        if n > 1 {
            l.router = Some(shard::Router {
                links,
                homes: shard::Homes::default(),
                events: events_rx,
                free: free_rx,
            });
        }
        let r = l.run();
        if r.is_err() {
            self.handle.kill();
        }
        drop(l);
        let mut first_err = r.err();
        for (i, t) in threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(io::Error::new(e.kind(), format!("event loop {}: {e}", i + 1)));
                }
                Err(_) => {
                    first_err.get_or_insert(io::Error::other(format!("event loop {} panicked", i + 1)));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Dropped when a loop 1..N ends, also by panic: counts it off, marks the
/// node failed if the loop panicked, and wakes loop 0.
struct LoopGone {
    id: usize,
    shared: Arc<shard::Shared>,
    waker: Arc<Waker>,
}

impl Drop for LoopGone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.failed.store(self.id, Ordering::SeqCst);
        }
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

struct Drain {
    started: Instant,
    total: usize,
    sent: usize,
}

struct Loop {
    poll: Poll,
    /// Listeners; closed (`None`) once a drain starts, so new connections
    /// are refused at once instead of waiting in the kernel's backlog.
    client_l: Option<TcpListener>,
    ingest_l: Option<TcpListener>,
    metrics_l: Option<TcpListener>,
    stop: Arc<AtomicBool>,
    kill: Arc<AtomicBool>,
    conns: Slab<Conn>,
    reg: Registry,
    m: Metrics,
    /// Connections with output appended this turn.
    dirty: Vec<usize>,
    /// Connections that hit the read budget and still have input.
    retry_read: Vec<usize>,
    /// Connections to close once the current borrow ends.
    to_close: Vec<(usize, Code)>,
    scratch: Vec<u8>,
    next_session: u64,
    /// Where the next timer tick's partial sweep starts.
    sweep_cursor: usize,
    /// Messages ingested this turn (for the latency histogram).
    turn_msgs: u64,
    accept_paused_until: Option<Instant>,
    drain: Option<Drain>,
    next_sweep: Instant,
    next_log: Instant,
    cfg: Config,
    started: Instant,
    waker: Arc<Waker>,
    /// Control messages from the discovery and dial threads.
    ctl_tx: Sender<Ctl>,
    ctl_rx: Receiver<Ctl>,
    /// Users online on other nodes.
    presence: mesh::Presence,
    /// Mesh links by connection key.
    links: HashMap<usize, Link>,
    /// Local presence changes to send to peers at the end of the turn.
    presence_out: Vec<(PresenceOp, Box<[u8]>)>,
    /// Publishers not read while a mesh link is backlogged.
    parked: Vec<usize>,
    /// When each peer was last dialled.
    last_dial: HashMap<String, Instant>,
    /// Set while an admin drain is moving clients away: (start, clients then).
    admin_drain: Option<(Instant, usize)>,
    hb: Heartbeater,
    incarnation: u64,
    /// This loop's index (0: the ingest loop).
    id: usize,
    /// What all loops of the node share.
    shared: Arc<shard::Shared>,
    /// Loop 0 of several: routes messages to the other loops.
    router: Option<shard::Router>,
    /// Loops 1..N: the inbox from loop 0 and the reports back.
    owner: Option<shard::Owner>,
    /// Loops 1..N: when loop 0 read the oldest message of this turn.
    turn_origin: Option<Instant>,
    /// Client queue depths gathered over the current sweep pass.
    pass_depths: Vec<u64>,
    /// When the current turn began.
    turn_start: Instant,
    /// Loop 0 has seen another loop fail (and started the drain).
    failure_seen: bool,
    /// Set by hello() when a session handed to this loop was established.
    adopt_attached: bool,
    /// Open connections on the metrics port.
    http_conns: usize,
}

/// A mesh link's identity and handshake material.
struct Link {
    peer_id: String,
    nonce_i: [u8; 16],
    nonce_a: [u8; 16],
    established: bool,
    /// We dialled it. A link accepted but not yet authenticated proves
    /// nothing about who is at the other end, so only links we dialled or
    /// that have authenticated stop us dialling that peer.
    ours: bool,
    /// A PRESENCE has arrived on it (the first must begin a snapshot).
    snapshot_seen: bool,
}

impl Link {
    /// A link in its handshake; `ours` if we dialled it.
    fn new(peer_id: String, nonce_i: [u8; 16], nonce_a: [u8; 16], ours: bool) -> Link {
        Link { peer_id, nonce_i, nonce_a, established: false, ours, snapshot_seen: false }
    }

    /// Whether this link stands for `peer` (stops another dial to it).
    fn covers(&self, peer: &str) -> bool {
        self.peer_id == peer && (self.established || self.ours)
    }
}

/// Messages from helper threads to the loop (each followed by one wake).
enum Ctl {
    /// The live node list from a decision server.
    Nodes(Vec<crate::decision::client::NodeInfo>),
    /// A dial to a peer finished.
    Dialed(String, io::Result<std::net::TcpStream>),
}

/// Bytes read from one connection per turn before yielding to the others.
const READ_BUDGET: usize = 256 * 1024;
/// How long a closing connection may linger to flush its last frame.
const LINGER: Duration = Duration::from_millis(500);
/// Timer granularity.
const TICK: Duration = Duration::from_millis(100);
/// Open connections the metrics port takes at once; more are closed at accept.
const MAX_HTTP_CONNS: usize = 32;
/// Timer ticks per full sweep of the connections.
const SWEEP_TICKS: usize = 10;
/// Most keepalive PINGs sent in one timer tick (bounds the burst).
const MAX_PINGS_PER_TICK: usize = 100;
/// Stop reading publishers while this many bytes wait for another loop.
const ROUTE_BACKLOG: usize = 4 << 20;
/// Most event loops a node runs.
pub const MAX_THREADS: usize = 64;

impl Loop {
    /// A loop with no listeners, router or owner side yet.
    #[allow(clippy::too_many_arguments)]
    fn new(
        poll: Poll,
        waker: Arc<Waker>,
        handle: &ShutdownHandle,
        cfg: Config,
        (id, shared): (usize, Arc<shard::Shared>),
        seed: u64,
        (ctl_tx, ctl_rx): (Sender<Ctl>, Receiver<Ctl>),
        hb: Heartbeater,
        incarnation: u64,
    ) -> Loop {
        let n = shared.n;
        let reg = Registry::new(
            RegistryConfig {
                log: LogLimits { max_count: cfg.retain_count, max_bytes: cfg.retain_bytes },
                // The total retention bound is shared out among the loops.
                ring_bytes: cfg.retain_total / n,
                grace: cfg.grace,
            },
            seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let now = Instant::now();
        Loop {
            poll,
            client_l: None,
            ingest_l: None,
            metrics_l: None,
            stop: handle.stop.clone(),
            kill: handle.kill.clone(),
            conns: Slab::with_capacity(1024),
            reg,
            m: Metrics::default(),
            dirty: Vec::new(),
            retry_read: Vec::new(),
            to_close: Vec::new(),
            scratch: vec![0u8; 64 * 1024],
            next_session: 1,
            sweep_cursor: 0,
            turn_msgs: 0,
            accept_paused_until: None,
            drain: None,
            next_sweep: now,
            next_log: now + cfg.log_every,
            cfg,
            started: now,
            waker,
            ctl_tx,
            ctl_rx,
            presence: mesh::Presence::default(),
            links: HashMap::new(),
            presence_out: Vec::new(),
            parked: Vec::new(),
            last_dial: HashMap::new(),
            admin_drain: None,
            hb,
            incarnation,
            id,
            shared,
            router: None,
            owner: None,
            turn_origin: None,
            pass_depths: Vec::new(),
            turn_start: now,
            failure_seen: false,
            adopt_attached: false,
            http_conns: 0,
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let r = self.run_inner();
        // Loops 1..N: last figures for loop 0.
        self.publish_stats(true);
        r
    }

    fn run_inner(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = if !self.retry_read.is_empty() {
                Duration::ZERO
            } else if !self.parked.is_empty() && self.router.is_some() {
                // Publishers wait for another loop to catch up; it does not
                // wake us when it does, so look again soon.
                Duration::from_millis(1)
            } else {
                self.next_sweep.saturating_duration_since(now).min(TICK)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.kill.load(Ordering::Relaxed) {
                return Ok(());
            }
            let turn_start = Instant::now();
            self.turn_start = turn_start;
            self.turn_msgs = 0;
            self.turn_origin = None;
            for ev in events.iter() {
                match ev.token() {
                    CLIENT_LISTENER => self.accept(CLIENT_LISTENER, turn_start),
                    INGEST_LISTENER => self.accept(INGEST_LISTENER, turn_start),
                    METRICS_LISTENER => self.accept(METRICS_LISTENER, turn_start),
                    WAKER => self.control(turn_start),
                    Token(t) => {
                        let key = t - FIRST_CONN;
                        if !self.conns.contains(key) {
                            continue; // sporadic events happen
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read(key, turn_start);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(key);
                        }
                    }
                }
                self.close_pending(turn_start);
            }
            for key in std::mem::take(&mut self.retry_read) {
                if self.conns.contains(key) {
                    self.read(key, turn_start);
                    self.close_pending(turn_start);
                }
            }
            self.send_presence();
            if let Some(r) = self.router.as_mut() {
                r.flush();
            }
            self.flush_dirty(turn_start);
            if let Some(o) = self.owner.as_mut() {
                o.flush();
            }
            if !self.parked.is_empty() && !self.backlogged() {
                self.retry_read.append(&mut self.parked);
            }
            if self.turn_msgs > 0 {
                let us = self.turn_origin.unwrap_or(turn_start).elapsed().as_micros() as u64;
                self.m.record_latency(us, self.turn_msgs);
            }
            let now = Instant::now();
            if now >= self.next_sweep {
                self.next_sweep = now + TICK;
                if self.timers(now) {
                    return Ok(());
                }
                // Accepts resumed by the timers may have handed clients over.
                if let Some(r) = self.router.as_mut() {
                    r.flush();
                }
                self.flush_dirty(now);
                if let Some(o) = self.owner.as_mut() {
                    o.flush();
                }
            }
        }
    }

    // ------------------------------------------------------------ accept

    fn accept(&mut self, which: Token, now: Instant) {
        // A draining node takes no clients or publishers, but still answers
        // /healthz (503, and why) and /metrics until it exits.
        if self.drain.is_some() && which != METRICS_LISTENER {
            return;
        }
        if let Some(until) = self.accept_paused_until {
            if now < until {
                return;
            }
            self.accept_paused_until = None;
        }
        loop {
            let r = match which {
                CLIENT_LISTENER => match self.client_l.as_ref() {
                    Some(l) => l.accept(),
                    None => return,
                },
                INGEST_LISTENER => match self.ingest_l.as_ref() {
                    Some(l) => l.accept(),
                    None => return,
                },
                _ => match self.metrics_l.as_ref() {
                    Some(l) => l.accept(),
                    None => return,
                },
            };
            match r {
                Ok((sock, _)) => self.admit(which, sock, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: stop accepting for a moment, keep
                    // serving. The timer re-tries; no busy loop.
                    self.m.accept_emfile += 1;
                    self.accept_paused_until = Some(now + Duration::from_millis(100));
                    return;
                }
                Err(_) => return, // ECONNABORTED and friends: the peer gave up.
            }
        }
    }

    fn admit(&mut self, which: Token, mut sock: TcpStream, now: Instant) {
        let _ = sock.set_nodelay(true);
        let state = match which {
            CLIENT_LISTENER => {
                self.m.accepts += 1;
                if self.shared.clients.load(Ordering::Relaxed) >= self.cfg.capacity {
                    self.m.rejects_full += 1;
                    self.m.close(reason_index(Code::ServerFull));
                    let mut out = Vec::with_capacity(64);
                    error_frame(&mut out, Code::ServerFull, "node is full; ask the decision server again");
                    let _ = sock.write(&out);
                    return;
                }
                State::ClientHandshake
            }
            INGEST_LISTENER => State::IngestHandshake,
            _ => {
                // The metrics port is for a scraper or two: a flood of
                // connections must not use up the descriptors clients need.
                if self.http_conns >= MAX_HTTP_CONNS {
                    return;
                }
                self.http_conns += 1;
                State::Http
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.poll.registry().register(&mut sock, Token(key + FIRST_CONN), Interest::READABLE).is_err() {
            return;
        }
        entry.insert(Conn::new(sock, state, now));
        self.m.connections += 1;
        if state == State::ClientHandshake {
            self.shared.client_opened();
        }
        // Data may already be waiting (the HELLO often arrives with the SYN's ACK).
        self.read(key, now);
        self.close_pending(now);
    }

    // ------------------------------------------------------------ read

    fn read(&mut self, key: usize, now: Instant) {
        if let Some(c) = self.conns.get_mut(key) {
            if c.pending() > read_stop(c.state, &self.cfg) {
                // Back-pressure on a peer that sends (PINGs, publishes asking
                // for results) but does not read the answers: leave its bytes
                // in the kernel until its output drains (flush re-reads it),
                // so its answers cannot pile up here without bound. A client
                // stalled this long is reaped as idle.
                c.stalled = true;
                return;
            }
        }
        if self.conns.get(key).is_some_and(|c| c.state == State::Publisher) && self.backlogged() {
            // Back-pressure: leave its bytes in the kernel until the mesh drains.
            if !self.parked.contains(&key) {
                self.parked.push(key);
            }
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(c) = self.conns.get_mut(key) {
            let r = c.sock.read(&mut scratch);
            match r {
                Ok(0) => {
                    self.to_close.push((key, Code::Other(0)));
                    break;
                }
                Ok(n) => {
                    self.m.bytes_in += n as u64;
                    c.last_rx = now;
                    c.pinged = false;
                    c.ping_due = false;
                    // While lingering, input is read and discarded.
                    if !c.closing() && !self.input(key, &scratch[..n], now) {
                        break;
                    }
                    if n >= budget {
                        self.retry_read.push(key);
                        break;
                    }
                    budget -= n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.to_close.push((key, Code::Other(1)));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Feeds freshly read bytes to a connection. Returns false if the
    /// connection is closing and reading should stop.
    fn input(&mut self, key: usize, data: &[u8], now: Instant) -> bool {
        let channel = match self.conns[key].state {
            State::ClientHandshake | State::Client { .. } => Channel::ToNode,
            State::IngestHandshake | State::Publisher | State::PeerAccepting => Channel::Ingest,
            State::Peer { initiator: false } => Channel::Ingest,
            State::PeerDialing | State::Peer { initiator: true } => Channel::FromIngest,
            State::Http => return self.http_input(key, data, now),
            State::Closing { .. } => return false,
        };
        // Parse straight from the read if nothing is carried over; copy only
        // a trailing partial frame.
        let mut carried = std::mem::take(&mut self.conns[key].rbuf);
        let from_carried = !carried.is_empty();
        let buf: &[u8] = if !from_carried {
            data
        } else {
            carried.extend_from_slice(data);
            &carried
        };
        // (Not once the node is stopping: other loops may already have
        // exited; hello() below answers DRAINING here.)
        if self.router.is_some()
            && self.conns[key].state == State::ClientHandshake
            && !self.stop.load(Ordering::SeqCst)
        {
            // Several loops: a client belongs on its user's loop.
            if let Ok(Decoded::Frame(Frame::Hello(h), _)) = protocol::decode(buf, channel) {
                if let Some(user) = token::claimed_user(h.token) {
                    let owner = shard::owner(&user, self.shared.n);
                    if owner != 0 {
                        self.hand_over(key, owner, user, buf.to_vec());
                        return false;
                    }
                }
            }
        }
        let mut at = 0;
        let mut ok = true;
        while at < buf.len() {
            match protocol::decode(&buf[at..], channel) {
                Ok(Decoded::Frame(frame, n)) => {
                    at += n;
                    if !self.frame(key, frame, now) {
                        ok = false;
                        break;
                    }
                }
                Ok(Decoded::Incomplete(_)) => {
                    // §2.4 step 2: refuse a type the state does not allow
                    // from its type byte, before buffering its body.
                    let state = self.conns[key].state;
                    if let Some((_, t)) = f::peek_header(&buf[at..]) {
                        if !state.allows(t) {
                            let msg = format!("frame type 0x{t:02x}: {}", state.expects());
                            self.fail(key, Code::UnexpectedFrame, &msg, now);
                            ok = false;
                        }
                    }
                    break;
                }
                Err(e) => {
                    self.fail(key, e.code(), &e.to_string(), now);
                    ok = false;
                    break;
                }
            }
        }
        let len = buf.len();
        if ok {
            // Keep the partial frame in the same buffer (no allocation per
            // read); publishers and peers also keep its capacity, clients
            // give it back so an idle connection holds no buffer.
            if from_carried {
                carried.drain(..at);
            } else {
                carried.clear();
                carried.extend_from_slice(&data[at..]);
            }
            if let Some(c) = self.conns.get_mut(key) {
                if at < len || matches!(c.state, State::Publisher | State::Peer { .. }) {
                    c.rbuf = carried;
                }
            }
        }
        ok
    }

    /// Handles one frame. Returns false if the connection is now closing.
    fn frame(&mut self, key: usize, frame: Frame<'_>, now: Instant) -> bool {
        let state = self.conns[key].state;
        if !state.allows(frame.frame_type()) {
            let msg = format!("frame type 0x{:02x}: {}", frame.frame_type(), state.expects());
            self.fail(key, Code::UnexpectedFrame, &msg, now);
            return false;
        }
        match (state, frame) {
            (_, Frame::Ping(n)) => {
                let c = &mut self.conns[key];
                Frame::Pong(n).encode(&mut c.out.buf);
                self.mark_dirty(key);
                true
            }
            (_, Frame::Pong(_)) => true,
            (_, Frame::Error(_)) => {
                self.to_close.push((key, Code::Other(0)));
                false
            }
            (State::ClientHandshake, Frame::Hello(h)) => self.hello(key, h, now),
            (State::IngestHandshake, Frame::PubHello(h)) => self.pub_hello(key, h, now),
            (State::IngestHandshake, Frame::PeerHello(h)) => self.peer_hello(key, h, now),
            (State::PeerDialing, Frame::PeerWelcome(w)) => self.peer_welcome(key, w, now),
            (State::PeerAccepting, Frame::PeerAuth(a)) => self.peer_auth(key, a, now),
            (State::Peer { .. }, Frame::Presence(p)) => {
                // §6.4: a link's first PRESENCE must begin a snapshot.
                let first =
                    self.links.get_mut(&key).is_some_and(|l| !std::mem::replace(&mut l.snapshot_seen, true));
                if first && p.flags & f::PRESENCE_SNAPSHOT_BEGIN == 0 {
                    self.fail(
                        key,
                        Code::UnexpectedFrame,
                        "the first PRESENCE on a link must begin a snapshot",
                        now,
                    );
                    return false;
                }
                self.presence.apply(key, p.flags, &p.entries);
                true
            }
            (State::Peer { .. }, Frame::Forward(fw)) => {
                self.deliver(fw.user, fw.payload, false);
                true
            }
            (State::Peer { .. } | State::PeerDialing, Frame::Goodbye(_)) => {
                self.to_close.push((key, Code::Other(0)));
                false
            }
            (State::Publisher, Frame::Publish(p)) => {
                let (local, fwd) = self.deliver(p.user, p.payload, true);
                if p.flags & PUBLISH_WANT_RESULT != 0 {
                    let r = f::PubResult {
                        request_id: p.request_id,
                        accepted: 1,
                        local: local as u16,
                        forwarded: fwd as u16,
                        no_route: !(local || fwd) as u16,
                    };
                    Frame::PubResult(r).encode(&mut self.conns[key].out.buf);
                    self.mark_dirty(key);
                }
                true
            }
            (State::Publisher, Frame::PublishBatch(b)) => {
                let (mut local, mut fwd, mut none) = (0u16, 0u16, 0u16);
                for e in b.entries.iter() {
                    let (l, f) = self.deliver(e.user, e.payload, true);
                    local += l as u16;
                    fwd += f as u16;
                    none += !(l || f) as u16;
                }
                if b.flags & PUBLISH_WANT_RESULT != 0 {
                    let r = f::PubResult {
                        request_id: b.request_id,
                        accepted: b.entries.len() as u16,
                        local,
                        forwarded: fwd,
                        no_route: none,
                    };
                    Frame::PubResult(r).encode(&mut self.conns[key].out.buf);
                    self.mark_dirty(key);
                }
                true
            }
            (_, other) => {
                let msg = format!("frame type 0x{:02x} is not allowed now", other.frame_type());
                self.fail(key, Code::UnexpectedFrame, &msg, now);
                false
            }
        }
    }

    fn hello(&mut self, key: usize, h: f::Hello<'_>, now: Instant) -> bool {
        let Some(version) = f::negotiate(h.min_version, h.max_version) else {
            self.fail(key, Code::UnsupportedVersion, "this node speaks protocol version 1", now);
            return false;
        };
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = match token::verify(h.token, &self.cfg.client_secret, unix) {
            Ok(c) => c,
            Err(token::TokenError::Expired) => {
                self.fail(key, Code::TokenExpired, "token expired", now);
                return false;
            }
            Err(e) => {
                self.fail(key, Code::AuthFailed, &e.to_string(), now);
                return false;
            }
        };
        if self.drain.is_some() || self.admin_drain.is_some() || self.stop.load(Ordering::SeqCst) {
            self.fail(key, Code::Draining, "node is draining", now);
            return false;
        }
        let a = self.reg.attach(&claims.user, key, h.resume);
        match self.owner.as_mut() {
            // Reported here, before anything later in the same read can
            // close the session again (its Detached must follow this).
            Some(o) => {
                o.report(&claims.user, shard::Change::Attached, true);
                self.adopt_attached = true;
            }
            None if a.first_session => {
                self.presence_out.push((PresenceOp::Online, claims.user.into_boxed_slice()));
            }
            None => {}
        }
        // Session ids are unique in the node: each loop takes every N-th.
        let session = self.next_session * self.shared.n as u64 + self.id as u64;
        self.next_session += 1;
        let c = &mut self.conns[key];
        c.state = State::Client { user: a.user };
        c.session = session;
        Frame::Welcome(f::Welcome {
            version,
            resume: a.result,
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u32,
            session_id: session,
            epoch: a.epoch,
            next_seq: a.next_seq,
            node_id: self.cfg.node_id.as_bytes(),
        })
        .encode(&mut c.out.buf);
        if let Some(from) = a.replay_from {
            let n = self.reg.replay(a.user, from, &mut c.out.buf);
            self.m.replayed += n as u64;
        }
        self.m.clients += 1;
        self.m.welcome(a.result);
        self.mark_dirty(key);
        true
    }

    fn pub_hello(&mut self, key: usize, h: f::PubHello<'_>, now: Instant) -> bool {
        let Some(version) = f::negotiate(h.min_version, h.max_version) else {
            self.fail(key, Code::UnsupportedVersion, "this node speaks protocol version 1", now);
            return false;
        };
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        match token::verify(h.credential, &self.cfg.publisher_secret, unix) {
            Ok(_) => {}
            Err(token::TokenError::Expired) => {
                self.fail(key, Code::TokenExpired, "publisher credential expired", now);
                return false;
            }
            Err(e) => {
                self.fail(key, Code::AuthFailed, &e.to_string(), now);
                return false;
            }
        }
        let c = &mut self.conns[key];
        c.state = State::Publisher;
        Frame::PubWelcome(f::PubWelcome {
            version,
            max_frame: limits::MAX_INGEST,
            node_id: self.cfg.node_id.as_bytes(),
        })
        .encode(&mut c.out.buf);
        self.mark_dirty(key);
        true
    }

    /// Loop 0 of several: passes a client whose HELLO names a user another
    /// loop owns to that loop, with the bytes read so far (HELLO first).
    fn hand_over(&mut self, key: usize, owner: usize, user: Vec<u8>, bytes: Vec<u8>) {
        let Some(router) = self.router.as_mut() else { return };
        let mut c = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut c.sock);
        self.m.connections -= 1;
        self.retry_read.retain(|&k| k != key);
        if c.out.is_dirty() {
            self.dirty.retain(|&k| k != key);
        }
        router.homes.handed_over(&user);
        let msg = shard::Inbox::Adopt { sock: c.sock, bytes, opened: c.opened, user: user.into() };
        if let Err(shard::Inbox::Adopt { user, .. }) = router.hand_over(owner, msg) {
            // The owner is gone (it failed): the socket closes as the
            // message drops here; undo the bookkeeping.
            router.homes.apply(shard::HomeEvent { user, change: shard::Change::Refused, known: false });
            self.shared.client_closed();
        }
    }

    /// Loops 1..N: takes a client over from loop 0 and runs its HELLO.
    fn adopt(&mut self, mut sock: TcpStream, bytes: Vec<u8>, opened: Instant, user: Box<[u8]>, now: Instant) {
        #[cfg(test)]
        if self.cfg.fail_on_adopt == self.id {
            panic!("test: loop {} fails on adopting a client", self.id);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let registered =
            self.poll.registry().register(&mut sock, Token(key + FIRST_CONN), Interest::READABLE).is_ok();
        self.adopt_attached = false;
        if registered {
            let mut c = Conn::new(sock, State::ClientHandshake, opened);
            // Its idle clock starts now: loop 0 has just read its HELLO.
            c.last_rx = now;
            entry.insert(c);
            self.m.connections += 1;
            self.input(key, &bytes, now);
        } else {
            self.shared.client_closed();
        }
        // hello() reported Attached if the session was established (even if
        // something later in the same bytes closed it again); else Refused.
        if !self.adopt_attached {
            let known = self.reg.find(&user).is_some();
            if let Some(o) = self.owner.as_mut() {
                o.report(&user, shard::Change::Refused, known);
            }
        }
        if registered && self.conns.contains(key) {
            // Anything the client sent after its HELLO.
            self.read(key, now);
        }
        self.close_pending(now);
    }

    /// Loops 1..N: runs what loop 0 sent (hand-overs and message batches).
    fn inbox(&mut self, now: Instant) {
        while let Some(msg) = self.owner.as_ref().and_then(|o| o.inbox.try_recv().ok()) {
            match msg {
                shard::Inbox::Adopt { sock, bytes, opened, user } => {
                    self.adopt(sock, bytes, opened, user, now)
                }
                shard::Inbox::Msgs { buf, since } => {
                    self.turn_origin = Some(self.turn_origin.map_or(since, |t| t.min(since)));
                    for (user, payload) in shard::messages(&buf) {
                        self.deliver_local(user, payload);
                    }
                    if let Some(o) = self.owner.as_ref() {
                        o.done(buf);
                    }
                    self.close_pending(now);
                }
            }
        }
    }

    /// Delivers one message to every local session of `user` (retaining it
    /// for resume if the user has a stream here) and, for a publish (not a
    /// FORWARD), forwards it to every peer where the user is online.
    /// Returns (queued to a local session, forwarded to a peer).
    fn deliver(&mut self, user: &[u8], payload: &[u8], forward: bool) -> (bool, bool) {
        self.m.msgs_in += 1;
        let mut forwarded = false;
        if forward {
            for &peer in self.presence.peers_of(user) {
                let Some(c) = self.conns.get_mut(peer) else { continue };
                f::encode_forward(&mut c.out.buf, user, b"", payload);
                self.m.forwarded += 1;
                forwarded = true;
                if c.out.mark_dirty() {
                    self.dirty.push(peer);
                }
            }
        }
        let local = match self.router.as_mut() {
            Some(r) => match shard::owner(user, self.shared.n) {
                0 => self.deliver_local(user, payload),
                o => match r.homes.route(user) {
                    shard::Route::Unknown => false,
                    shard::Route::Send { online } => {
                        r.queue(o, user, payload, self.turn_start);
                        online
                    }
                },
            },
            None => self.deliver_local(user, payload),
        };
        if !local && !forwarded {
            self.m.no_route += 1;
        }
        (local, forwarded)
    }

    /// Queues a message to the local sessions of `user`; see [`Loop::deliver`].
    fn deliver_local(&mut self, user: &[u8], payload: &[u8]) -> bool {
        let Some(u) = self.reg.find(user) else { return false };
        let Some((frame, sessions)) = self.reg.publish(u, payload) else { return false };
        if sessions.is_empty() {
            return false;
        }
        self.turn_msgs += 1;
        for &s in sessions {
            let Some(c) = self.conns.get_mut(s) else { continue };
            if c.doomed {
                continue;
            }
            if c.pending() + frame.len() > self.cfg.queue_bytes {
                match self.cfg.slow_policy {
                    SlowPolicy::Disconnect => {
                        if !c.closing() {
                            c.doomed = true;
                            self.to_close.push((s, Code::SlowConsumer));
                        }
                    }
                    SlowPolicy::Drop => self.m.dropped += 1,
                }
                continue;
            }
            c.out.buf.extend_from_slice(frame);
            if c.ping_due {
                c.ping_due = false;
                c.pinged = true;
                Frame::Ping(self.m.msgs_out).encode(&mut c.out.buf);
            }
            self.m.msgs_out += 1;
            if c.out.mark_dirty() {
                self.dirty.push(s);
            }
        }
        true
    }

    fn http_input(&mut self, key: usize, data: &[u8], now: Instant) -> bool {
        let c = &mut self.conns[key];
        if c.rbuf.len() + data.len() > 8192 {
            self.to_close.push((key, Code::Other(0)));
            return false;
        }
        c.rbuf.extend_from_slice(data);
        let Some(end) = c.rbuf.windows(4).position(|w| w == b"\r\n\r\n") else { return true };
        let head = String::from_utf8_lossy(&c.rbuf[..end]).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (status, body) = match path.as_str() {
            "/metrics" => {
                let (m, q, users) = self.node_stats();
                ("200 OK", m.render(&self.cfg.node_id, q, users))
            }
            "/healthz" => {
                let failed = self.shared.failed.load(Ordering::SeqCst);
                if failed != 0 {
                    ("503 Service Unavailable", format!("event loop {failed} failed\n"))
                } else if self.drain.is_some() {
                    ("503 Service Unavailable", "draining\n".to_owned())
                } else {
                    ("200 OK", "ok\n".to_owned())
                }
            }
            _ => ("404 Not Found", "not found\n".to_owned()),
        };
        let c = &mut self.conns[key];
        let _ = write!(
            c.out.buf,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        c.rbuf = Vec::new();
        c.state = State::Closing { deadline: now + LINGER };
        self.mark_dirty(key);
        false
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

    /// One write per dirty connection per turn.
    fn flush(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let closing = matches!(c.state, State::Closing { .. });
        match c.out.flush(&mut c.sock, self.poll.registry(), Token(key + FIRST_CONN), closing) {
            Err(_) => self.to_close.push((key, Code::Other(1))),
            Ok(f) => {
                if let Some(n) = f.wrote {
                    self.m.writes += 1;
                    self.m.bytes_out += n as u64;
                }
                if f.empty && closing {
                    // Everything is out: half-close so the peer reads our last
                    // frame and then EOF; the linger timer or its EOF reaps us.
                    let _ = c.sock.shutdown(std::net::Shutdown::Write);
                }
                if c.stalled && c.pending() <= read_stop(c.state, &self.cfg) / 2 {
                    c.stalled = false;
                    self.retry_read.push(key);
                }
            }
        }
    }

    // ------------------------------------------------------------ close

    /// Sends ERROR with `code` and closes after it is flushed.
    fn fail(&mut self, key: usize, code: Code, msg: &str, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.closing() {
            return;
        }
        error_frame(&mut c.out.buf, code, msg);
        self.begin_close(key, code, now);
    }

    /// Sends GOODBYE and closes after it is flushed.
    fn goodbye(&mut self, key: usize, reason: Code, action: GoodbyeAction, delay_ms: u32, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.closing() {
            return;
        }
        Frame::Goodbye(f::Goodbye { reason, action, delay_ms, target: b"" }).encode(&mut c.out.buf);
        self.begin_close(key, reason, now);
    }

    fn begin_close(&mut self, key: usize, code: Code, now: Instant) {
        self.client_gone(key, self.conns[key].state, now);
        let c = &mut self.conns[key];
        if self.links.remove(&key).is_some() {
            self.presence.clear_peer(key);
        }
        c.state = State::Closing { deadline: now + LINGER };
        c.rbuf = Vec::new();
        self.m.close(reason_index(code));
        self.mark_dirty(key);
    }

    fn close_pending(&mut self, now: Instant) {
        while let Some((key, code)) = self.to_close.pop() {
            let Some(c) = self.conns.get(key) else { continue };
            match code {
                Code::SlowConsumer => {
                    // Its queue is full; the GOODBYE may not get through, but
                    // the retained messages let it resume.
                    self.goodbye(key, Code::SlowConsumer, GoodbyeAction::RetryAfter, 100, now);
                    self.flush(key);
                    self.remove(key, None);
                }
                Code::Other(n) => {
                    let was_closing = c.closing();
                    if !was_closing && c.pending() > 0 {
                        // The peer closed its side (e.g. a publisher that
                        // half-closes after its last PUBLISH): still give it
                        // what it is owed, such as PUB_RESULTs.
                        self.flush(key);
                    }
                    self.remove(key, (!was_closing).then_some(if n == 0 { 0 } else { 1 }));
                }
                other => {
                    self.fail(key, other, other.name(), now);
                }
            }
        }
    }

    /// Bookkeeping for a client connection that is closing or gone.
    fn client_gone(&mut self, key: usize, state: State, now: Instant) {
        match state {
            State::Client { user } => {
                let last = self.reg.detach(user, key, now).is_some();
                if let Some(o) = self.owner.as_mut() {
                    if let Some(u) = self.reg.user(user) {
                        o.report(&u.id, shard::Change::Detached, true);
                    }
                } else if last {
                    if let Some(u) = self.reg.user(user) {
                        self.presence_out.push((PresenceOp::Offline, u.id.clone()));
                    }
                }
                self.m.clients -= 1;
                self.shared.client_closed();
            }
            State::ClientHandshake => self.shared.client_closed(),
            _ => {}
        }
    }

    /// Drops the connection now. `count` is the close-reason index to count
    /// (None if already counted).
    fn remove(&mut self, key: usize, count: Option<usize>) {
        if !self.conns.contains(key) {
            return;
        }
        let mut c = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut c.sock);
        if c.http {
            self.http_conns -= 1;
        }
        self.client_gone(key, c.state, Instant::now());
        if let Some(l) = self.links.remove(&key) {
            self.presence.clear_peer(key);
            if l.established {
                eprintln!("herald node {}: mesh link to {} closed", self.cfg.node_id, l.peer_id);
            }
        }
        self.parked.retain(|&k| k != key);
        if let Some(i) = count {
            self.m.close(i);
        }
        self.m.connections -= 1;
    }

    // ------------------------------------------------------------ timers

    /// Returns true when the node should exit.
    fn timers(&mut self, now: Instant) -> bool {
        if self.id == 0 {
            self.check_loops();
        }
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept(CLIENT_LISTENER, now);
            self.accept(INGEST_LISTENER, now);
            self.accept(METRICS_LISTENER, now);
        }
        let hb = self.cfg.heartbeat;
        let hs = self.cfg.handshake_timeout;
        let mut expired = Vec::new();
        let mut ping = Vec::new();
        let mut piggyback = Vec::new();
        // Each tick looks at a slice of the slab, so no tick stalls delivery
        // for long: a full sweep takes up to SWEEP_TICKS ticks (1 s), and at
        // most a quarter of the keepalive interval.
        let ticks = ((hb.as_millis() / (4 * TICK.as_millis())) as usize).clamp(1, SWEEP_TICKS);
        let cap = self.conns.capacity().max(1);
        let span = cap.div_ceil(ticks);
        let from = self.sweep_cursor % cap;
        self.sweep_cursor = (from + span) % cap;
        for key in (from..(from + span).min(cap)).chain(0..(from + span).saturating_sub(cap)) {
            let Some(c) = self.conns.get(key) else { continue };
            if self.owner.is_some() && matches!(c.state, State::Client { .. }) {
                self.pass_depths.push(c.pending() as u64);
            }
            match c.state {
                State::Closing { deadline } if now >= deadline => expired.push((key, None)),
                State::Closing { .. } => {}
                State::ClientHandshake
                | State::IngestHandshake
                | State::Http
                | State::PeerDialing
                | State::PeerAccepting => {
                    if now.saturating_duration_since(c.opened) >= hs {
                        expired.push((key, Some(Code::HandshakeTimeout)));
                    }
                }
                State::Client { .. } | State::Publisher | State::Peer { .. } => {
                    let idle = now.saturating_duration_since(c.last_rx);
                    // Pings are spread over [hb, 1.5 hb) by connection, so
                    // clients that connected together are not all pinged
                    // (and all answer) in the same turn.
                    let spread =
                        hb.mul_f64(((key as u64).wrapping_mul(2_654_435_761) % 1024) as f64 / 2048.0);
                    if idle >= hb * 3 {
                        expired.push((key, Some(Code::IdleTimeout)));
                    } else if idle >= hb + spread && !c.pinged {
                        // First let the PING ride on the next delivery (no
                        // extra syscall); only a client that got nothing for
                        // half an interval more gets a PING of its own.
                        if idle >= hb + hb / 2 + spread && ping.len() < MAX_PINGS_PER_TICK {
                            ping.push(key);
                        } else if !c.ping_due {
                            piggyback.push(key);
                        }
                    }
                }
            }
        }
        for (key, code) in expired {
            match code {
                None => self.remove(key, None),
                Some(code) => self.fail(key, code, code.name(), now),
            }
        }
        for key in piggyback {
            self.conns[key].ping_due = true;
        }
        for key in ping {
            let c = &mut self.conns[key];
            c.pinged = true;
            c.ping_due = false;
            Frame::Ping(now.duration_since(self.started).as_millis() as u64).encode(&mut c.out.buf);
            self.mark_dirty(key);
        }
        if self.sweep_cursor < span {
            // Once per full pass (about a second): forget users past grace,
            // and (loops 1..N) report to loop 0.
            let owner = &mut self.owner;
            self.reg.sweep(now, |id| {
                if let Some(o) = owner.as_mut() {
                    o.report(id, shard::Change::Forgotten, false);
                }
            });
            if self.owner.is_some() {
                self.publish_stats(true);
            }
        } else if self.owner.is_some() {
            self.publish_stats(false);
        }
        self.heartbeat(now);
        self.admin_drain_step(now);
        if !self.cfg.log_every.is_zero() && now >= self.next_log {
            self.next_log = now + self.cfg.log_every;
            if self.owner.is_none() {
                let (m, q, _) = self.node_stats();
                eprintln!("herald node {}: {}", self.cfg.node_id, m.summary(q));
            }
        }
        self.drain_step(now)
    }

    fn drain_step(&mut self, now: Instant) -> bool {
        if self.drain.is_none() && self.stop.load(Ordering::SeqCst) {
            for mut l in [self.client_l.take(), self.ingest_l.take()].into_iter().flatten() {
                let _ = self.poll.registry().deregister(&mut l);
            }
            let total = self.m.clients as usize;
            eprintln!(
                "herald node {}: draining {total} clients over {:?}",
                self.cfg.node_id, self.cfg.drain_window
            );
            self.drain = Some(Drain { started: now, total, sent: 0 });
        }
        let Some(d) = self.drain.as_ref() else { return false };
        let window = self.cfg.drain_window.as_secs_f64().max(0.001);
        let frac = (now.saturating_duration_since(d.started).as_secs_f64() / window).min(1.0);
        let due = ((d.total as f64 * frac).ceil() as usize).saturating_sub(d.sent);
        let (started, total) = (d.started, d.total);
        if due > 0 {
            let keys: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.state, State::Client { .. }))
                .map(|(k, _)| k)
                .take(due)
                .collect();
            for &k in &keys {
                self.goodbye(k, Code::Draining, GoodbyeAction::AskDecision, 0, now);
            }
            if let Some(d) = self.drain.as_mut() {
                d.sent += keys.len();
            }
        }
        let clients_left = self.m.clients;
        let window_over = now.saturating_duration_since(started) >= self.cfg.drain_window;
        // Loop 0 goes last: the other loops' clients still get messages
        // through it until they have been sent away.
        let others_done = self.id != 0 || self.shared.running.load(Ordering::SeqCst) == 0;
        if clients_left == 0
            && others_done
            && (window_over || total == 0 || frac >= 1.0 || self.all_flushed())
        {
            // Tell publishers too, flush, and leave.
            let pubs: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.state, State::Publisher | State::IngestHandshake))
                .map(|(k, _)| k)
                .collect();
            for k in pubs {
                self.goodbye(k, Code::Draining, GoodbyeAction::AskDecision, 0, now);
            }
            self.flush_dirty(now);
            if self.conns.iter().all(|(_, c)| c.pending() == 0 || !c.closing())
                || now.saturating_duration_since(started) >= self.cfg.drain_window + Duration::from_secs(2)
            {
                if self.owner.is_none() {
                    let (m, _, _) = self.node_stats();
                    eprintln!(
                        "herald node {}: drained; {}",
                        self.cfg.node_id,
                        m.summary(QueueDepth::default())
                    );
                }
                return true;
            }
        }
        false
    }

    fn all_flushed(&self) -> bool {
        self.conns.iter().all(|(_, c)| c.pending() == 0)
    }

    // ------------------------------------------------------------ cluster

    fn control(&mut self, now: Instant) {
        if self.owner.is_some() {
            self.inbox(now);
            return;
        }
        self.check_loops();
        if let Some(r) = self.router.as_mut() {
            while let Ok(events) = r.events.try_recv() {
                for ev in events {
                    if let Some(change) = r.homes.apply(ev) {
                        self.presence_out.push(change);
                    }
                }
            }
        }
        while let Ok(msg) = self.ctl_rx.try_recv() {
            match msg {
                Ctl::Nodes(list) => self.on_nodes(list, now),
                Ctl::Dialed(peer, Ok(stream)) => self.dialed(peer, stream, now),
                Ctl::Dialed(peer, Err(e)) => {
                    eprintln!("herald node {}: cannot reach peer {peer}: {e}", self.cfg.node_id)
                }
            }
        }
    }

    /// Loop 0: if another loop has failed, its users can no longer be served
    /// here (their sockets closed with it, and a reconnect would be handed
    /// to it again), so drain the whole node: every other client gets a
    /// GOODBYE and moves to another node, `/healthz` says why, and
    /// [`Node::run`] returns the failure, so the process exits non-zero and
    /// a supervisor restarts it.
    fn check_loops(&mut self) {
        let failed = self.shared.failed.load(Ordering::SeqCst);
        if failed != 0 && !self.failure_seen {
            self.failure_seen = true;
            eprintln!(
                "herald node {}: event loop {failed} failed; draining the node so its clients move elsewhere",
                self.cfg.node_id
            );
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    /// The node list from a decision server: follow an admin drain, and dial
    /// every peer we should link to (the smaller id dials, protocol.md §6.6).
    fn on_nodes(&mut self, list: Vec<crate::decision::client::NodeInfo>, now: Instant) {
        let me = self.cfg.node_id.clone();
        if let Some(mine) = list.iter().find(|n| n.node_id == me) {
            let was = self.shared.admin_draining.swap(mine.draining, Ordering::Relaxed);
            if mine.draining && !was && self.drain.is_none() {
                let clients = self.shared.clients.load(Ordering::Relaxed);
                eprintln!("herald node {me}: drained by an admin; moving {clients} clients away");
            } else if !mine.draining && was {
                eprintln!("herald node {me}: undrained by an admin; accepting clients again");
            }
            self.admin_drain_step(now);
        }
        if self.cfg.cluster_secret.is_empty() || self.drain.is_some() {
            return;
        }
        for n in list {
            if n.node_id.as_bytes() <= me.as_bytes() || self.links.values().any(|l| l.covers(&n.node_id)) {
                continue;
            }
            if self
                .last_dial
                .get(&n.node_id)
                .is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(1))
            {
                continue;
            }
            self.last_dial.insert(n.node_id.clone(), now);
            let (tx, waker) = (self.ctl_tx.clone(), self.waker.clone());
            std::thread::spawn(move || {
                let r = std::net::ToSocketAddrs::to_socket_addrs(&n.ingest_endpoint)
                    .and_then(|mut a| a.next().ok_or_else(|| io::Error::other("no address")))
                    .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)));
                let _ = tx.send(Ctl::Dialed(n.node_id, r));
                let _ = waker.wake();
            });
        }
    }

    fn dialed(&mut self, peer: String, stream: std::net::TcpStream, now: Instant) {
        if self.links.values().any(|l| l.covers(&peer)) || stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut sock = TcpStream::from_std(stream);
        let _ = sock.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.poll.registry().register(&mut sock, Token(key + FIRST_CONN), Interest::READABLE).is_err() {
            return;
        }
        let mut c = Conn::new(sock, State::PeerDialing, now);
        let nonce_i = random_nonce();
        Frame::PeerHello(f::PeerHello {
            min_version: protocol::VERSION,
            max_version: protocol::VERSION,
            node_id: self.cfg.node_id.as_bytes(),
            incarnation: self.incarnation,
            nonce: nonce_i,
        })
        .encode(&mut c.out.buf);
        entry.insert(c);
        self.m.connections += 1;
        self.links.insert(key, Link::new(peer, nonce_i, [0; 16], true));
        self.mark_dirty(key);
    }

    fn peer_hello(&mut self, key: usize, h: f::PeerHello<'_>, now: Instant) -> bool {
        if self.cfg.cluster_secret.is_empty() {
            self.fail(key, Code::AuthFailed, "this node has no cluster secret", now);
            return false;
        }
        let Some(version) = f::negotiate(h.min_version, h.max_version) else {
            self.fail(key, Code::UnsupportedVersion, "this node speaks protocol version 1", now);
            return false;
        };
        let nonce_a = random_nonce();
        let me = self.cfg.node_id.as_bytes();
        let tag = sign::peer_acceptor_tag(&self.cfg.cluster_secret, &h.nonce, &nonce_a, h.node_id, me);
        let c = &mut self.conns[key];
        Frame::PeerWelcome(f::PeerWelcome {
            version,
            node_id: me,
            incarnation: self.incarnation,
            nonce: nonce_a,
            tag,
        })
        .encode(&mut c.out.buf);
        c.state = State::PeerAccepting;
        let peer_id = String::from_utf8_lossy(h.node_id).into_owned();
        self.links.insert(key, Link::new(peer_id, h.nonce, nonce_a, false));
        self.mark_dirty(key);
        true
    }

    fn peer_welcome(&mut self, key: usize, w: f::PeerWelcome<'_>, now: Instant) -> bool {
        if w.version != protocol::VERSION {
            self.fail(
                key,
                Code::UnsupportedVersion,
                "PEER_WELCOME chose a version this node did not offer",
                now,
            );
            return false;
        }
        let Some(link) = self.links.get_mut(&key) else { return false };
        let me = self.cfg.node_id.as_bytes();
        let expected = sign::peer_acceptor_tag(
            &self.cfg.cluster_secret,
            &link.nonce_i,
            &w.nonce,
            me,
            link.peer_id.as_bytes(),
        );
        if w.node_id != link.peer_id.as_bytes() || !sign::tags_equal(&expected, &w.tag) {
            self.fail(key, Code::AuthFailed, "peer proof does not verify", now);
            return false;
        }
        link.nonce_a = w.nonce;
        let tag = sign::peer_initiator_tag(&self.cfg.cluster_secret, &link.nonce_i, &w.nonce, me, w.node_id);
        let c = &mut self.conns[key];
        Frame::PeerAuth(f::PeerAuth { tag }).encode(&mut c.out.buf);
        c.state = State::Peer { initiator: true };
        self.link_up(key, now);
        true
    }

    fn peer_auth(&mut self, key: usize, a: f::PeerAuth, now: Instant) -> bool {
        let Some(link) = self.links.get(&key) else { return false };
        let expected = sign::peer_initiator_tag(
            &self.cfg.cluster_secret,
            &link.nonce_i,
            &link.nonce_a,
            link.peer_id.as_bytes(),
            self.cfg.node_id.as_bytes(),
        );
        if !sign::tags_equal(&expected, &a.tag) {
            self.fail(key, Code::AuthFailed, "peer proof does not verify", now);
            return false;
        }
        self.conns[key].state = State::Peer { initiator: false };
        self.link_up(key, now);
        true
    }

    /// A link is authenticated: replace any older link to the same peer and
    /// send our presence snapshot.
    fn link_up(&mut self, key: usize, _now: Instant) {
        let peer = match self.links.get_mut(&key) {
            Some(l) => {
                l.established = true;
                l.peer_id.clone()
            }
            None => return,
        };
        let older: Vec<usize> =
            self.links.iter().filter(|(&k, l)| k != key && l.peer_id == peer).map(|(&k, _)| k).collect();
        for k in older {
            self.remove(k, Some(0));
        }
        let c = &mut self.conns[key];
        match self.router.as_ref() {
            Some(r) => mesh::encode_snapshot(&mut c.out.buf, self.reg.online().chain(r.homes.online())),
            None => mesh::encode_snapshot(&mut c.out.buf, self.reg.online()),
        }
        eprintln!("herald node {}: mesh link to {peer} up", self.cfg.node_id);
        self.mark_dirty(key);
    }

    /// Sends this turn's local presence changes to every linked peer, in one frame.
    fn send_presence(&mut self) {
        if self.presence_out.is_empty() {
            return;
        }
        let mut frame = Vec::new();
        mesh::encode_delta(&mut frame, &self.presence_out);
        self.presence_out.clear();
        let up: Vec<usize> = self.links.iter().filter(|(_, l)| l.established).map(|(&k, _)| k).collect();
        for k in up {
            if let Some(c) = self.conns.get_mut(k) {
                c.out.buf.extend_from_slice(&frame);
                self.mark_dirty(k);
            }
        }
    }

    /// Whether publishers must wait: a mesh link or another loop is behind.
    fn backlogged(&self) -> bool {
        self.links.keys().any(|k| self.conns.get(*k).is_some_and(|c| c.pending() > self.cfg.peer_backlog))
            || self.router.as_ref().is_some_and(|r| r.backlogged(ROUTE_BACKLOG))
    }

    fn heartbeat(&mut self, now: Instant) {
        let flags = if self.drain.is_some() { f::NODE_DRAINING } else { 0 };
        let (m, shared) = (&self.m, &self.shared);
        self.hb.maybe_send(
            now,
            &self.cfg,
            || {
                // Connections come from the node-wide admission count, which
                // every loop updates as it happens: the other loops' reported
                // counters can be 100 ms old, and a heartbeat that
                // under-reports lets the decision server overfill the node.
                let c = shared.clients.load(Ordering::Relaxed) as u64;
                let (mut i, mut o) = (m.msgs_in, m.msgs_out);
                for slot in &shared.stats {
                    if let Ok(st) = slot.lock() {
                        i += st.m.msgs_in;
                        o += st.m.msgs_out;
                    }
                }
                (c, i, o)
            },
            flags,
        );
    }

    /// Loops 1..N: hands this loop's figures to loop 0: the counters every
    /// timer tick (100 ms), and with `full` (once per sweep pass, about a
    /// second) the latency histogram and queue depths too.
    fn publish_stats(&mut self, full: bool) {
        let Some(slot) = self.shared.stats.get(self.id.wrapping_sub(1)) else { return };
        if let Ok(mut st) = slot.lock() {
            st.users = self.reg.users();
            if full {
                st.m.copy_from(&self.m);
                std::mem::swap(&mut st.depths, &mut self.pass_depths);
            } else {
                st.m.copy_counters(&self.m);
            }
        }
        if full {
            self.pass_depths.clear();
        }
    }

    /// Loop 0: the whole node's counters, queue depths and users (its own
    /// figures now, the other loops' as of their last report).
    fn node_stats(&self) -> (Metrics, QueueDepth, usize) {
        let mut m = Metrics::default();
        m.copy_from(&self.m);
        let mut depths: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Client { .. }))
            .map(|(_, c)| c.pending() as u64)
            .collect();
        let mut users = self.reg.users();
        for slot in &self.shared.stats {
            if let Ok(st) = slot.lock() {
                m.merge(&st.m);
                depths.extend_from_slice(&st.depths);
                users += st.users;
            }
        }
        (m, QueueDepth::from_depths(depths), users)
    }

    /// Moves clients away while an admin drain is on, spread over the window.
    fn admin_drain_step(&mut self, now: Instant) {
        // Loop 0 learns of an admin drain; every loop follows the shared flag.
        let flagged = self.shared.admin_draining.load(Ordering::Relaxed);
        if flagged && self.admin_drain.is_none() && self.drain.is_none() {
            self.admin_drain = Some((now, self.m.clients as usize));
        } else if !flagged {
            self.admin_drain = None;
        }
        let Some((_, total)) = self.admin_drain else { return };
        if self.drain.is_some() {
            return;
        }
        let ticks = (self.cfg.drain_window.as_millis() / TICK.as_millis()).max(1) as usize;
        let per_tick = total.div_ceil(ticks).max(1);
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Client { .. }))
            .map(|(k, _)| k)
            .take(per_tick)
            .collect();
        for k in keys {
            self.goodbye(k, Code::Draining, GoodbyeAction::AskDecision, 0, now);
        }
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// 16 bytes from the OS's CSPRNG (mesh challenges must be unpredictable).
fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into our buffer.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != 16 {
        // Fall back to time and address entropy; still unique per call.
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        n.copy_from_slice(&t.to_le_bytes());
    }
    n
}

/// Splits a `--decision` entry into its TCP and UDP addresses:
/// `host:port` (both) or `host:tcp/udp`.
pub fn decision_endpoints(s: &str) -> (String, String) {
    match s.rsplit_once(':') {
        Some((host, ports)) => match ports.split_once('/') {
            Some((t, u)) => (format!("{host}:{t}"), format!("{host}:{u}")),
            None => (s.to_owned(), s.to_owned()),
        },
        None => (s.to_owned(), s.to_owned()),
    }
}

/// Asks the decision servers for the node list every `interval` and hands it
/// to the loop; exits when the node stops.
fn spawn_discovery(
    servers: Vec<String>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    tx: Sender<Ctl>,
) {
    let tcp: Vec<String> = servers.iter().map(|s| decision_endpoints(s).0).collect();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            if let Ok(list) = crate::decision::client::nodes(&tcp, Duration::from_millis(500)) {
                if tx.send(Ctl::Nodes(list)).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
            std::thread::sleep(interval);
        }
    });
}

/// Sends signed UDP heartbeats (protocol.md §8) to every decision server.
struct Heartbeater {
    sock: Option<std::net::UdpSocket>,
    targets: Vec<SocketAddr>,
    client_endpoint: String,
    ingest_endpoint: String,
    incarnation: u64,
    seq: u64,
    next: Option<Instant>,
    last: Option<(Instant, u64, u64, f64)>,
    buf: Vec<u8>,
}

impl Heartbeater {
    fn new(
        decision: &[String],
        client_endpoint: String,
        ingest_endpoint: String,
        incarnation: u64,
    ) -> Heartbeater {
        let targets: Vec<SocketAddr> = decision
            .iter()
            .filter_map(|d| std::net::ToSocketAddrs::to_socket_addrs(&decision_endpoints(d).1).ok()?.next())
            .collect();
        let sock = (!targets.is_empty())
            .then(|| {
                std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.set_nonblocking(true).map(|_| s)).ok()
            })
            .flatten();
        Heartbeater {
            sock,
            targets,
            client_endpoint,
            ingest_endpoint,
            incarnation,
            seq: 0,
            next: None,
            last: None,
            buf: Vec::with_capacity(512),
        }
    }

    /// Sends a heartbeat if one is due; `counts` gives (clients, messages
    /// in, messages out) and is only asked then.
    fn maybe_send(
        &mut self,
        now: Instant,
        cfg: &Config,
        counts: impl FnOnce() -> (u64, u64, u64),
        flags: u8,
    ) {
        let Some(sock) = self.sock.as_ref() else { return };
        if self.next.is_some_and(|t| now < t) {
            return;
        }
        let (clients, msgs_in, msgs_out) = counts();
        self.next = Some(now + cfg.heartbeat_interval);
        let cpu = process_cpu_seconds();
        let (in_rate, out_rate, permille) = match self.last {
            Some((t, i, o, c)) => {
                let dt = now.saturating_duration_since(t).as_secs_f64().max(0.001);
                (
                    (msgs_in.saturating_sub(i) as f64 / dt) as u32,
                    (msgs_out.saturating_sub(o) as f64 / dt) as u32,
                    ((cpu - c) / dt * 1000.0).clamp(0.0, 65535.0) as u16,
                )
            }
            None => (0, 0, 0),
        };
        self.last = Some((now, msgs_in, msgs_out, cpu));
        self.seq += 1;
        self.buf.clear();
        Frame::Heartbeat(f::Heartbeat {
            version: protocol::VERSION,
            node_id: cfg.node_id.as_bytes(),
            incarnation: self.incarnation,
            seq: self.seq,
            sent_at_ms: unix_ms(),
            client_endpoint: self.client_endpoint.as_bytes(),
            ingest_endpoint: self.ingest_endpoint.as_bytes(),
            connections: clients as u32,
            capacity: cfg.capacity as u32,
            flags,
            msgs_in_per_s: in_rate,
            msgs_out_per_s: out_rate,
            cpu_permille: permille,
        })
        .encode_signed(&mut self.buf, &cfg.cluster_secret);
        for t in &self.targets {
            let _ = sock.send_to(&self.buf, t);
        }
    }
}

/// This process's user + system CPU time, seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// How much of a connection's own output may be pending before the loop
/// stops reading it (`Loop::read`). Clients: the delivery queue bound (their
/// deliveries never exceed it; only answers to their PINGs could). Publishers
/// and connections still in a handshake: 1 MiB of answers. Mesh links are
/// always read: two nodes that each stopped reading the other would deadlock,
/// and their output is bounded by the publisher back-pressure instead.
fn read_stop(state: State, cfg: &Config) -> usize {
    match state {
        State::Client { .. } => cfg.queue_bytes,
        State::Peer { .. } | State::Http | State::Closing { .. } => usize::MAX,
        _ => 1 << 20,
    }
}

/// Appends an ERROR frame.
fn error_frame(out: &mut Vec<u8>, code: Code, msg: &str) {
    Frame::Error(f::ErrorFrame { code, message: msg.as_bytes() }).encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, Channel, Decoded};
    use std::io::Read;
    use std::net::TcpStream as StdStream;

    const SECRET: &[u8] = b"unit-test-client-secret";

    /// Connects a raw client for `user` and sends its HELLO.
    fn hello(addr: SocketAddr, user: &str) -> StdStream {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let token = crate::protocol::token::mint(SECRET, user.as_bytes(), unix_ms() / 1000 + 600).unwrap();
        let hello = Frame::Hello(f::Hello {
            min_version: 1,
            max_version: 1,
            token: token.as_bytes(),
            agent: b"",
            resume: None,
        });
        s.write_all(&hello.to_vec()).unwrap();
        s
    }

    /// Reads frames until one matches `want` (true) or the stream ends or
    /// times out (false).
    fn read_until(s: &mut StdStream, want: impl Fn(&Frame<'_>) -> bool) -> bool {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Ok(Decoded::Frame(fr, used)) = decode(&buf, Channel::ToClient) {
                if want(&fr) {
                    return true;
                }
                buf.drain(..used);
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn healthz(addr: SocketAddr) -> String {
        let mut s = StdStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn user_on(loop_id: usize, n: usize, skip: usize) -> String {
        (0..).map(|i| format!("u{i}")).filter(|u| shard::owner(u.as_bytes(), n) == loop_id).nth(skip).unwrap()
    }

    #[test]
    fn a_failed_loop_drains_the_node_and_run_returns_the_failure() {
        let node = Node::bind(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ingest: "127.0.0.1:0".parse().unwrap(),
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            client_secret: SECRET.to_vec(),
            publisher_secret: b"unit-test-publisher-secret".to_vec(),
            drain_window: Duration::from_secs(2),
            log_every: Duration::ZERO,
            threads: 3,
            fail_on_adopt: 2,
            ..Config::default()
        })
        .unwrap();
        let (client, metrics) = (node.client_addr(), node.metrics_addr().unwrap());
        let run = std::thread::spawn(move || node.run());
        let welcomed = |f: &Frame<'_>| matches!(f, Frame::Welcome(_));
        // Loop 0 holds several clients, so its drain spreads over the window
        // and the node stays up long enough to be asked about its health.
        let mut zeros: Vec<StdStream> = (0..8).map(|i| hello(client, &user_on(0, 3, i))).collect();
        for s in &mut zeros {
            assert!(read_until(s, welcomed));
        }
        let mut one = hello(client, &user_on(1, 3, 0));
        assert!(read_until(&mut one, welcomed));
        assert!(healthz(metrics).starts_with("HTTP/1.1 200"));

        // Loop 2 panics when handed this client: the client's socket closes.
        let mut two = hello(client, &user_on(2, 3, 0));
        assert!(!read_until(&mut two, welcomed), "the failed loop's client must not be welcomed");

        // The rest of the node drains: loop 1's client is sent away ...
        let goodbye = |f: &Frame<'_>| matches!(f, Frame::Goodbye(g) if g.reason == Code::Draining && g.action == GoodbyeAction::AskDecision);
        assert!(read_until(&mut one, goodbye), "loop 1's client gets a GOODBYE");
        // ... health says why, and the node stops taking clients.
        let h = healthz(metrics);
        assert!(h.starts_with("HTTP/1.1 503") && h.contains("event loop 2 failed"), "{h}");
        for s in &mut zeros {
            assert!(read_until(s, goodbye), "loop 0's clients get a GOODBYE");
        }
        let err = run.join().unwrap().expect_err("run reports the failed loop");
        assert!(err.to_string().contains("event loop 2 panicked"), "{err}");
    }
}
