//! `herald demo`: a whole cluster on loopback in one process, showing
//! herald doing its job within a minute of cloning it.
//!
//! It starts 2 decision servers and N nodes (threads in this process), a
//! publisher that simulates a forex broker's personal traffic (each user
//! gets 2–4 messages a second: quotes at the user's own spread, fills and
//! balance changes) through every node in turn, and a swarm of simulated
//! clients that ask the decision servers for a node, check that every
//! message is theirs, in order, exactly once (one that arrives after a later
//! one of its user's is counted as reordered, not lost: [`Tally::late`]),
//! and measure latency from the intended send time. It prints one status line a second and a summary,
//! and fails if any message went to the wrong user or was lost without the
//! protocol saying so. `--chaos` kills one node halfway and shows its
//! clients being re-homed.
//!
//! Conflation (protocol.md §5.7): the nodes run with `--slow-policy
//! conflate`, and the quotes carry their instrument as the key (fills and
//! balance changes carry none: they must arrive). One more client, the
//! *slow desk*, streams every quote ([`SLOW_RATE`] messages a second, one
//! in ten unkeyed) over a link a quarter as fast ([`SLOW_BPS`], behind a
//! small receive buffer), on the last node (never the one `--chaos`
//! kills). Its quotes are conflated; the demo fails if it lost an unkeyed
//! message, was disconnected, or if what it received plus what was
//! conflated is not what was published to it. The nodes' client send
//! buffer is small ([`CLIENT_SNDBUF`]), so that a slow client's backlog
//! waits in herald's queue, where conflation works, not in the kernel's.
//!
//! Every connection speaks TLS unless `--plaintext` is given: a throwaway
//! CA and a certificate per node and decision server (`herald cert dev`'s
//! set) are made in a temporary directory, which is removed at the end.
//!
//! With `--source jetstream` (or `redis`) the traffic takes the path of a
//! backend that already writes to a message queue: the publisher publishes
//! into the queue (JetStream subjects `herald.user.<user>`, or `XADD`s to a
//! Redis stream), and the nodes pull from it (`herald node --source`,
//! protocol.md §12). The demo starts the queue server itself ([`queue`]);
//! `published` then counts what the queue acknowledged storing, and the
//! latency runs from the moment the backend meant to publish into the
//! queue, so it includes the queue's hop.
//!
//! With `--durable` the nodes run in durable mode (protocol.md §13): the
//! demo starts a 3-server JetStream cluster on loopback ([`LogCluster`])
//! and every node keeps every user's stream in it (stream `HERALD`, R=3).
//! `--chaos` then loses nothing: the killed node's clients resume on
//! another node with their last position and are replayed from the log
//! (WELCOME RESUMED). The demo fails in durable mode if any message was
//! lost, announced or not, or a resume was RESTARTED or GAP
//! ([`DemoReport::durable_ok`]).

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::Publisher;
use crate::decision::{self, DecisionServer};
use crate::node::{self, Node};
use crate::protocol::frame::BatchWriter;
use crate::protocol::AdminOp;
use crate::swarm::{mono_ns, user_name, SlowReaders, Stamp, Swarm, SwarmConfig, Tally, Unkeyed};

pub mod log_cluster;
pub mod queue;

pub use log_cluster::{LogCluster, LogClusterError};
pub use queue::{Backend, Queue, QueueError, QueueState, Source};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Simulated clients.
    pub clients: usize,
    /// Total messages per second (default: 3 per client).
    pub rate: Option<u64>,
    /// Nodes to start.
    pub nodes: usize,
    /// How long to publish.
    pub duration: Duration,
    /// Kill one node halfway through.
    pub chaos: bool,
    /// Set to stop early (ctrl-c).
    pub stop: Arc<AtomicBool>,
    /// Plain TCP everywhere instead of TLS with throwaway certificates.
    pub plaintext: bool,
    /// Route the traffic through this queue engine (`--source`): the
    /// backend publishes into it, the nodes pull from it. None: the backend
    /// publishes to the nodes' ingest ports.
    pub source: Option<Source>,
    /// With `source`: the queue server already running at `HOST:PORT` to
    /// use (`--source-server`); None: the demo starts one.
    pub source_server: Option<String>,
    /// Durable mode (`--durable`, protocol.md §13): the demo starts a
    /// 3-server JetStream cluster ([`LogCluster`]) and every node keeps
    /// every user's stream in it (R=3), so the node `--chaos` kills loses
    /// nothing: its clients resume on another node, replayed from the log.
    pub durable: bool,
}

/// The demo's throwaway TLS: a dev CA and certificates in a temporary
/// directory (removed on drop), and the client configuration trusting it.
struct DemoTls {
    dir: std::path::PathBuf,
    client: Arc<rustls::ClientConfig>,
}

impl DemoTls {
    fn new(nodes: &[String], decision: &[String]) -> io::Result<DemoTls> {
        let dir = std::env::temp_dir().join(format!("herald-demo-{}-{:x}", std::process::id(), mono_ns()));
        let made = crate::cert::write_dev_set(&dir, nodes, decision, false)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|_| {
                crate::tls::client_config(Some(&dir.join(crate::cert::CA_CERT_FILE)))
                    .map_err(|e| io::Error::other(e.to_string()))
            });
        match made {
            Ok(client) => Ok(DemoTls { dir, client }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.join(crate::cert::CA_CERT_FILE)
    }

    /// What the server `name` presents; with `peers_ca`, client
    /// certificates (optional, for mesh peers) must chain to the CA.
    fn server(&self, name: &str, peers_ca: bool) -> crate::tls::ServerFiles {
        let (cert, key) = crate::cert::leaf_paths(&self.dir, name);
        crate::tls::ServerFiles {
            cert,
            key,
            client_ca: peers_ca.then(|| self.ca()),
            client_cert_optional: peers_ca,
        }
    }
}

impl Drop for DemoTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Messages published.
    pub published: u64,
    /// What the clients counted.
    pub tally: Tally,
    /// Latency percentiles, µs: p50, p90, p99, p99.9, max.
    pub latency_us: [f64; 5],
    /// Messages lost without the protocol announcing it.
    pub unannounced_loss: i64,
    /// With `--source`: how the traffic went through the queue.
    pub queue: Option<QueueReport>,
    /// The slow desk.
    pub slow: SlowReport,
    /// Whether the nodes ran in durable mode.
    pub durable: bool,
    /// With `--chaos`: the node killed and the clients it held then (as its
    /// last heartbeat told the decision servers).
    pub killed: Option<(String, u32)>,
}

/// What the slow desk (a client reading a quarter of its stream) saw.
#[derive(Debug, Clone, Default)]
pub struct SlowReport {
    /// Its user.
    pub user: String,
    /// Its node.
    pub node: String,
    /// Messages published to it.
    pub published: u64,
    /// Messages it received.
    pub received: u64,
    /// Quotes conflated away on its session.
    pub conflated: u64,
    /// Unkeyed messages (fills, balance changes) it never received.
    pub unkeyed_lost: u64,
    /// Its connections that closed.
    pub disconnects: u64,
    /// Staleness of the quotes it received (arrival − intended send time),
    /// ms: p50, p99, max.
    pub stale_ms: [f64; 3],
}

impl SlowReport {
    /// Nothing lost but conflated quotes, never cut off, and every message
    /// accounted for.
    pub fn ok(&self) -> bool {
        self.unkeyed_lost == 0 && self.disconnects == 0 && self.received + self.conflated == self.published
    }
}

/// What the queue saw (`herald demo --source`).
#[derive(Debug, Clone)]
pub struct QueueReport {
    /// The engine.
    pub source: Source,
    /// The stream (JetStream) or stream key (Redis).
    pub stream: String,
    /// The stream and its consumer at the end (None: the queue did not say).
    pub state: Option<QueueState>,
    /// Per consuming node: the messages it took from the queue
    /// (`herald_source_messages_total`; None: its metrics did not answer).
    pub taken: Vec<(String, Option<u64>)>,
}

impl QueueReport {
    /// The messages the nodes took from the queue, all together.
    pub fn taken_total(&self) -> u64 {
        self.taken.iter().filter_map(|t| t.1).sum()
    }
}

impl DemoReport {
    /// Messages missing from silent jumps at the end: those that arrived
    /// late (after a later message of their user's) are not.
    pub fn silent_loss(&self) -> u64 {
        self.tally.silent_gaps.saturating_sub(self.tally.late)
    }

    /// Messages lost, announced or not (durable mode's count, which must be 0).
    pub fn lost(&self) -> u64 {
        self.unannounced_loss.max(0) as u64 + self.tally.announced_gaps
    }

    /// In durable mode: nothing lost, announced or not, and no resume
    /// RESTARTED or GAP (true without durable mode).
    pub fn durable_ok(&self) -> bool {
        !self.durable || (self.lost() == 0 && self.tally.restarted == 0 && self.tally.gapped == 0)
    }

    /// True when nothing went to the wrong user and nothing was lost
    /// silently (in durable mode: nothing lost at all, [`Self::durable_ok`]).
    pub fn ok(&self) -> bool {
        self.tally.wrong_user == 0
            && self.tally.dups == 0
            && self.silent_loss() == 0
            && self.unannounced_loss == 0
            && self.slow.ok()
            && self.durable_ok()
    }
}

fn secret(label: &str) -> Vec<u8> {
    let mut v = format!("demo-{label}-").into_bytes();
    v.extend_from_slice(format!("{:x}", mono_ns() ^ (std::process::id() as u64) << 20).as_bytes());
    v
}

const QUOTE_PAIRS: [&str; 6] = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF", "EURGBP"];

/// Messages a second to the slow desk.
pub const SLOW_RATE: u64 = 250;

/// What the slow desk reads, bytes a second: a quarter of its stream (its
/// messages are about 125 bytes on the wire).
pub const SLOW_BPS: u64 = SLOW_RATE * 125 / 4;

/// The slow desk's receive buffer (SO_RCVBUF, set before it connects).
const SLOW_RCVBUF: usize = 2048;

/// The nodes' client send buffer (`--client-sndbuf`).
pub const CLIENT_SNDBUF: usize = 4096;

/// The slow desk's unkeyed messages: one in ten (a balance change or a fill).
const SLOW_UNKEYED: Unkeyed = Unkeyed { every: 10, below: 1 };

/// What a broker message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Balance,
    Fill,
    Quote,
}

/// Message `n` of an ordinary user: 1 in 10 a balance change, 2 fills, 7 quotes.
fn broker_kind(n: u32) -> Kind {
    match n % 10 {
        0 => Kind::Balance,
        1 | 2 => Kind::Fill,
        _ => Kind::Quote,
    }
}

/// Message `n` of the slow desk: 1 in 10 a balance change or a fill, by
/// turns ([`SLOW_UNKEYED`]), the rest quotes.
fn slow_kind(n: u32) -> Kind {
    match (n % 10, n / 10 % 2) {
        (0, 0) => Kind::Balance,
        (0, _) => Kind::Fill,
        _ => Kind::Quote,
    }
}

/// Writes a broker-like personal message of `kind` for user `u` after the
/// stamp; returns its conflation key: a quote's instrument, none for the
/// rest.
fn broker_payload(buf: &mut Vec<u8>, stamp: Stamp, u: usize, kind: Kind) -> &'static str {
    buf.clear();
    buf.resize(Stamp::LEN, 0);
    stamp.write(buf);
    let n = stamp.msg as usize;
    let mut s = String::with_capacity(96);
    let mut key = "";
    match kind {
        Kind::Balance => {
            let _ = write!(
                s,
                r#"{{"type":"balance","user":"{}","usd":{:.2}}}"#,
                user_name(u),
                100_000.0 + (n as f64) * 3.5
            );
        }
        Kind::Fill => {
            let _ = write!(
                s,
                r#"{{"type":"fill","user":"{}","order":{},"pair":"{}","qty":100000}}"#,
                user_name(u),
                n,
                QUOTE_PAIRS[n % QUOTE_PAIRS.len()]
            );
        }
        Kind::Quote => {
            // Each user has its own spread.
            let spread = 0.00005 + (u % 7) as f64 * 0.00001;
            let mid = 1.08 + ((n * 37 + u) % 100) as f64 * 0.00001;
            key = QUOTE_PAIRS[(u + n) % QUOTE_PAIRS.len()];
            let _ = write!(
                s,
                r#"{{"type":"quote","user":"{}","pair":"{key}","bid":{:.5},"ask":{:.5}}}"#,
                user_name(u),
                mid - spread / 2.0,
                mid + spread / 2.0
            );
        }
    }
    buf.extend_from_slice(s.as_bytes());
    key
}

struct Cluster {
    admin_secret: Vec<u8>,
    /// How the demo asks its decision servers (over TLS unless --plaintext).
    dial: decision::client::Dial,
    decisions: Vec<(decision::ShutdownHandle, std::thread::JoinHandle<io::Result<decision::Stats>>, String)>,
    nodes: Vec<NodeRun>,
}

struct NodeRun {
    id: String,
    /// Its client endpoint.
    client: String,
    ingest: String,
    /// Its `/metrics` (with `--source` only).
    metrics: Option<String>,
    /// Whether it pulls from the queue (`--source`).
    consumes: bool,
    handle: node::ShutdownHandle,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

/// Where the nodes' traffic comes from and where it is kept.
struct Backing<'a> {
    /// `--source`: the queue the nodes pull from.
    source: Option<&'a crate::source::Spec>,
    /// `--durable`: the log every node keeps the users' streams in.
    durable: Option<&'a crate::durable::Spec>,
}

fn start_cluster(
    n_nodes: usize,
    client_secret: &[u8],
    publisher_secret: &[u8],
    per_node: usize,
    tls: Option<&DemoTls>,
    backing: Backing<'_>,
    chaos: bool,
) -> io::Result<Cluster> {
    let Backing { source, durable } = backing;
    let cluster_secret = secret("cluster");
    let admin_secret = secret("admin");
    let mut decisions = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..2 {
        let d = DecisionServer::bind(decision::Config {
            listen: "127.0.0.1:0".parse().expect("valid"),
            heartbeat: "127.0.0.1:0".parse().expect("valid"),
            cluster_secret: cluster_secret.clone(),
            admin_secret: admin_secret.clone(),
            // Every demo client proves itself with its token (protocol.md
            // §7.1, "Who asks"); a request without one is refused.
            assign: decision::asker::Policy { client_secret: client_secret.to_vec(), require_token: true },
            state_file: None,
            log_every: Duration::ZERO,
            // Every simulated client comes from 127.0.0.1: no per-source limits.
            max_conns_per_source: 0,
            source_rate: 0,
            tls: tls.map(|t| t.server(&format!("d{}", i + 1), false)),
            ..decision::Config::default()
        })?;
        let tcp = d.tcp_addr().to_string();
        endpoints.push(format!("{}/{}", tcp, d.udp_addr().port()));
        let h = d.shutdown_handle();
        decisions.push((h, std::thread::spawn(move || d.run()), tcp));
    }
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        let id = format!("n{}", i + 1);
        // With --source every node pulls from the queue, but the one
        // --chaos kills (as without, where the publisher does not publish
        // to it): what a killed consumer had taken comes back after the
        // ack wait, behind newer messages (protocol.md §12, "Order").
        let sources: Vec<crate::source::Spec> =
            source.filter(|_| !(chaos && i == 0)).into_iter().cloned().collect();
        let consumes = !sources.is_empty();
        let node = Node::bind(node::Config {
            node_id: id.clone(),
            listen: "127.0.0.1:0".parse().expect("valid"),
            ingest: "127.0.0.1:0".parse().expect("valid"),
            capacity: per_node * 2 + 100,
            client_secret: client_secret.to_vec(),
            publisher_secret: publisher_secret.to_vec(),
            decision: endpoints.clone(),
            cluster_secret: cluster_secret.clone(),
            log_every: Duration::ZERO,
            drain_window: Duration::from_secs(1),
            tls: tls.map(|t| t.server(&id, true)),
            tls_ports: node::TlsPorts { client: true, ingest: true, metrics: source.is_some(), http: false },
            cluster_ca: tls.map(DemoTls::ca),
            decision_tls: tls.map(|t| crate::tls::Trust::Ca(t.ca())),
            // The demo reads what each node took from the queue there.
            metrics: source.map(|_| "127.0.0.1:0".parse().expect("valid")),
            sources,
            // Quotes are keyed: a backed-up client gets the latest of each
            // (protocol.md §5.7); a small kernel buffer leaves its backlog
            // in herald's queue, where that works.
            slow_policy: node::SlowPolicy::Conflate,
            client_sndbuf: CLIENT_SNDBUF,
            durable: durable.cloned(),
            ..node::Config::default()
        })?;
        let client = node.client_addr().to_string();
        let ingest = node.ingest_addr().to_string();
        let metrics = node.metrics_addr().map(|a| a.to_string());
        let handle = node.shutdown_handle();
        let thread = Some(std::thread::spawn(move || node.run().map_err(io::Error::from)));
        nodes.push(NodeRun { id, client, ingest, metrics, consumes, handle, thread });
    }
    let dial = decision::client::Dial::new(Duration::from_secs(1), tls.map(|t| t.client.clone()));
    Ok(Cluster { admin_secret, dial, decisions, nodes })
}

impl Cluster {
    fn decision_tcp(&self) -> Vec<String> {
        self.decisions.iter().map(|d| d.2.clone()).collect()
    }

    /// Waits until every node is registered with every decision server;
    /// a node that stopped (it refused its settings) is an error saying why.
    fn wait_registered(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for n in &mut self.nodes {
                if n.thread.as_ref().is_some_and(|t| t.is_finished()) {
                    let r = n.thread.take().map(|t| t.join());
                    let why = match r {
                        Some(Ok(Err(e))) => e.to_string(),
                        Some(Err(_)) => "it panicked".to_owned(),
                        _ => "it stopped".to_owned(),
                    };
                    return Err(io::Error::other(format!("node {} stopped: {why}", n.id)));
                }
            }
            let all = self.decisions.iter().all(|d| {
                decision::client::nodes(std::slice::from_ref(&d.2), &self.dial)
                    .map(|v| v.len() == self.nodes.len())
                    .unwrap_or(false)
            });
            if all {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::other("nodes never registered with the decision servers"))
    }

    /// Per node that pulls from the queue: `herald_source_messages_total`
    /// from its `/metrics` (over TLS unless --plaintext).
    fn taken_from_queue(&self, tls: Option<&Arc<rustls::ClientConfig>>) -> Vec<(String, Option<u64>)> {
        // HTTPS: the metrics port speaks ALPN http/1.1, not herald/1.
        let https = tls.map(|t| {
            let mut c = (**t).clone();
            c.alpn_protocols = vec![crate::tls::ALPN_HTTP.to_vec()];
            Arc::new(c)
        });
        let tls = https.as_ref();
        self.nodes
            .iter()
            .filter(|n| n.consumes)
            .map(|n| {
                (
                    n.id.clone(),
                    n.metrics.as_deref().and_then(|m| metric(m, tls, "herald_source_messages_total")),
                )
            })
            .collect()
    }

    fn stop(mut self) {
        for n in &mut self.nodes {
            n.handle.trigger();
        }
        for n in &mut self.nodes {
            if let Some(t) = n.thread.take() {
                let _ = t.join();
            }
        }
        for d in &self.decisions {
            d.0.trigger();
        }
        for d in self.decisions.drain(..) {
            let _ = d.1.join();
        }
    }
}

/// One counter from a node's `/metrics`.
fn metric(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>, name: &str) -> Option<u64> {
    let (mut s, _) = crate::dial::dial_stream(addr, Duration::from_secs(2), tls).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    let _ = io::Read::read_to_string(&mut s, &mut body);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Clients past this many run in child processes: each client costs this
/// process two of its 20,000 files (its socket and the node's).
pub const IN_PROCESS_CLIENTS: usize = 6000;

/// The simulated clients: in this process, or spread over child processes
/// (`herald swarm-worker`) when there are too many for one.
enum Clients {
    Local {
        swarm: Box<Swarm>,
        prev: Histogram<u64>,
    },
    Children {
        children: Vec<std::process::Child>,
        rx: crossbeam_channel::Receiver<(usize, String)>,
        /// Per child: received, live, wrong, silent, p50, p99, p999 (ns).
        stats: Vec<[u64; 7]>,
        tally: Tally,
        hist: Histogram<u64>,
    },
}

impl Clients {
    fn start(
        cfg: &DemoConfig,
        decision: Vec<String>,
        secret: &[u8],
        record_after: u64,
        tls: Option<(Arc<rustls::ClientConfig>, std::path::PathBuf)>,
    ) -> io::Result<Clients> {
        if cfg.clients <= IN_PROCESS_CLIENTS {
            let mut swarm = Swarm::new(SwarmConfig {
                first: 0,
                count: cfg.clients,
                decision,
                secret: secret.to_vec(),
                reconnect: true,
                tls: tls.as_ref().map(|t| t.0.clone()),
                decision_tls: tls.map(|t| t.0),
                ..SwarmConfig::default()
            })?;
            let got = swarm.connect_all(Duration::from_secs(60), |_| {});
            if got < cfg.clients {
                return Err(io::Error::other(format!("only {got} of {} clients connected", cfg.clients)));
            }
            swarm.record_after = record_after;
            let prev = swarm.hist.clone();
            return Ok(Clients::Local { swarm: Box::new(swarm), prev });
        }
        let exe = std::env::current_exe()?;
        let n = cfg.clients.div_ceil(IN_PROCESS_CLIENTS);
        let per = cfg.clients.div_ceil(n);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut children = Vec::new();
        for i in 0..n {
            let first = i * per;
            let count = per.min(cfg.clients - first);
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["swarm-worker", "--first", &first.to_string(), "--count", &count.to_string()]).args([
                "--decision",
                &decision.join(","),
                "--record-after",
                &record_after.to_string(),
            ]);
            if let Some((_, ca)) = &tls {
                cmd.arg("--tls-ca").arg(ca);
            }
            let mut child = cmd
                .env("HERALD_SWARM_SECRET_HEX", &hex)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            crate::swarm::forward_lines(i, child.stdout.take().expect("piped"), tx.clone());
            children.push(child);
        }
        let mut ready = 0;
        while ready < n {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok((_, l)) if l.starts_with("READY") => ready += 1,
                Ok((i, l)) if l == "EOF" => {
                    return Err(io::Error::other(format!("client worker {i} exited")))
                }
                Ok(_) => {}
                Err(_) => return Err(io::Error::other("client workers did not connect in time")),
            }
        }
        println!("clients spread over {n} child processes ({per} each)");
        let hist = Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
        Ok(Clients::Children { stats: vec![[0; 7]; n], children, rx, tally: Tally::default(), hist })
    }

    /// Lets the clients work for up to `timeout`.
    fn step(&mut self, timeout: Duration) {
        match self {
            Clients::Local { swarm, .. } => swarm.step(timeout),
            Clients::Children { rx, stats, .. } => {
                if let Ok((i, l)) = rx.recv_timeout(timeout) {
                    let mut p = l.split_whitespace();
                    if p.next() == Some("STAT") {
                        let v: Vec<u64> = p.filter_map(|x| x.parse().ok()).collect();
                        if v.len() == 7 {
                            stats[i].copy_from_slice(&v);
                        }
                    }
                }
            }
        }
    }

    /// (received, live, wrong-user, silent gaps not filled by late messages).
    fn counts(&self) -> (u64, usize, u64, u64) {
        match self {
            Clients::Local { swarm, .. } => {
                let t = &swarm.tally;
                (t.received, swarm.live, t.wrong_user, t.silent_gaps.saturating_sub(t.late))
            }
            Clients::Children { stats, .. } => stats
                .iter()
                .fold((0, 0, 0, 0), |a, s| (a.0 + s[0], a.1 + s[1] as usize, a.2 + s[2], a.3 + s[3])),
        }
    }

    /// Latency p50/p99/p99.9 in µs since the last call (children: the worst child's).
    fn interval_us(&mut self) -> [f64; 3] {
        match self {
            Clients::Local { swarm, prev } => {
                let mut i = swarm.hist.clone();
                let _ = i.subtract(&*prev);
                prev.reset();
                let _ = prev.add(&swarm.hist);
                [0.5, 0.99, 0.999].map(|q| i.value_at_quantile(q) as f64 / 1000.0)
            }
            Clients::Children { stats, .. } => {
                let worst = |k: usize| stats.iter().map(|s| s[k]).max().unwrap_or(0) as f64 / 1000.0;
                [worst(4), worst(5), worst(6)]
            }
        }
    }

    /// Stops the clients and returns what they counted.
    fn finish(self) -> (Tally, Histogram<u64>) {
        match self {
            Clients::Local { swarm, .. } => (swarm.tally, swarm.hist),
            Clients::Children { mut children, rx, mut tally, mut hist, .. } => {
                for c in children.iter_mut() {
                    if let Some(mut s) = c.stdin.take() {
                        let _ = io::Write::write_all(&mut s, b"STOP\n");
                    }
                }
                let mut ended = 0;
                while ended < children.len() {
                    let Ok((_, l)) = rx.recv_timeout(Duration::from_secs(30)) else { break };
                    let p: Vec<&str> = l.split_whitespace().collect();
                    match p.first().copied() {
                        Some("RESULT") => {
                            if let Some(t) = Tally::parse_result_line(&l) {
                                tally.add(&t);
                            }
                        }
                        Some("H") if p.len() == 3 => {
                            let _ = hist.record_n(p[1].parse().unwrap_or(1), p[2].parse().unwrap_or(0));
                        }
                        Some("EOF") => ended += 1,
                        _ => {}
                    }
                }
                for mut c in children {
                    let _ = c.wait();
                }
                (tally, hist)
            }
        }
    }
}

/// Runs the demo, printing status lines to stdout; returns the report.
pub fn run(cfg: DemoConfig) -> io::Result<DemoReport> {
    // The queue first: a queue server that is not installed fails at once.
    let queue = match cfg.source {
        Some(source) => {
            let q = Queue::open(source, cfg.source_server.as_deref())?;
            q.prepare()?;
            Some(q)
        }
        None => None,
    };
    // Then the log: without nats-server, --durable fails at once too.
    let log = if cfg.durable {
        Some(LogCluster::start("demo").map_err(|e| io::Error::other(format!("--durable: {e}")))?)
    } else {
        None
    };
    // The servers share this machine's cores with the demo's nodes and
    // clients: a generous append timeout, so that a busy moment is not
    // taken for a log that cannot keep messages.
    let durable = match &log {
        Some(l) => Some(
            crate::durable::Spec::parse(&format!("jetstream://{}/HERALD?replicas=3&timeout=5s", l.addrs()))
                .map_err(io::Error::other)?,
        ),
        None => None,
    };
    let client_secret = secret("client");
    let publisher_secret = secret("publisher");
    let n_nodes = cfg.nodes.max(if cfg.chaos { 2 } else { 1 });
    let tls = if cfg.plaintext {
        None
    } else {
        let ids: Vec<String> = (1..=n_nodes).map(|i| format!("n{i}")).collect();
        Some(DemoTls::new(&ids, &["d1".to_owned(), "d2".to_owned()])?)
    };
    let spec = queue.as_ref().map(Queue::node_source);
    let mut cluster = start_cluster(
        n_nodes,
        &client_secret,
        &publisher_secret,
        cfg.clients,
        tls.as_ref(),
        Backing { source: spec.as_ref(), durable: durable.as_ref() },
        cfg.chaos,
    )?;
    println!(
        "herald demo: {} decision servers and {n_nodes} nodes on loopback; {} clients; {}",
        cluster.decisions.len(),
        cfg.clients,
        if cfg.chaos { "chaos: one node will be killed halfway" } else { "no chaos" }
    );
    match &tls {
        Some(t) => println!(
            "TLS 1.3 on every client, publisher, mesh and decision-server connection (throwaway CA in {}; --plaintext for none)",
            t.dir.display()
        ),
        None => println!("plaintext: no TLS (--plaintext)"),
    }
    if let Some(l) = &log {
        println!(
            "durable: every stream kept in a 3-server JetStream cluster (R=3) on loopback: nats-server ×3 started by the demo on {} (data in {}, removed at the end); stream HERALD, a subject per user",
            l.addrs(),
            l.dir().display()
        );
    }
    let consumers: Vec<&str> = cluster.nodes.iter().filter(|n| n.consumes).map(|n| n.id.as_str()).collect();
    if let Some(q) = &queue {
        let engine = q.source.engine();
        println!("path: backend → {engine} → herald → clients");
        let skipped = if cfg.chaos {
            format!("; {} (the node --chaos kills) does not consume", cluster.nodes[0].id)
        } else {
            String::new()
        };
        println!("{engine}: {}: {}{skipped}", q.describe(), consumers.join(", "));
    }
    let consumers = consumers.len();
    let client_tls = tls.as_ref().map(|t| t.client.clone());
    if let Err(e) = cluster.wait_registered() {
        cluster.stop();
        return Err(e);
    }
    let t0 = Instant::now();
    // Latency is recorded from the first publishing tick on.
    let start_estimate = mono_ns() + 3_600_000_000_000;
    let mut clients = match Clients::start(
        &cfg,
        cluster.decision_tcp(),
        &client_secret,
        start_estimate,
        tls.as_ref().map(|t| (t.client.clone(), t.ca())),
    ) {
        Ok(c) => c,
        Err(e) => {
            cluster.stop();
            return Err(e);
        }
    };
    println!(
        "connected {} clients in {:.2}s through the decision servers",
        cfg.clients,
        t0.elapsed().as_secs_f64()
    );
    // The slow desk: on the last node (never the one --chaos kills).
    let slow_node = cluster.nodes.last().expect("a node");
    let (slow_user, slow_node_id) = (user_name(cfg.clients), slow_node.id.clone());
    let mut slow = match Swarm::new(SwarmConfig {
        first: cfg.clients,
        count: 1,
        nodes: vec![slow_node.client.clone()],
        secret: client_secret.clone(),
        reconnect: true,
        tls: client_tls.clone(),
        slow: SlowReaders { count: 1, first: cfg.clients, stride: 1, bps: SLOW_BPS, rcvbuf: SLOW_RCVBUF },
        unkeyed: SLOW_UNKEYED,
        ..SwarmConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => {
            cluster.stop();
            return Err(e);
        }
    };
    if slow.connect_all(Duration::from_secs(10), |_| {}) < 1 {
        cluster.stop();
        return Err(io::Error::other("the slow client did not connect"));
    }
    println!(
        "slow client {slow_user} on {slow_node_id}: {SLOW_RATE} msgs/s (quotes keyed by pair, 1 in 10 a fill or balance) read at {SLOW_BPS} B/s, about a quarter of it; nodes run --slow-policy conflate"
    );

    // Presence travels between nodes asynchronously: wait until every node
    // forwards to a user held by another node. (A payload shorter than a
    // stamp is ignored by the clients.)
    let cred =
        crate::protocol::token::mint(&publisher_secret, b"demo-broker", u32::MAX as u64).expect("name");
    let t_mesh = Instant::now();
    if cluster.nodes.len() > 1 {
        for x in &cluster.nodes {
            let mut p = Publisher::connect_tls(std::slice::from_ref(&x.ingest), &cred, client_tls.clone())
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut u = 0;
            loop {
                let r = p
                    .publish_confirmed(user_name(u % cfg.clients).as_bytes(), b"mesh?")
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if r.forwarded > 0 {
                    break;
                }
                if t_mesh.elapsed() > Duration::from_secs(15) {
                    cluster.stop();
                    return Err(io::Error::other("the node mesh never formed"));
                }
                u += 1;
                clients.step(Duration::from_millis(2));
            }
        }
        println!("mesh formed: every node forwards to the others ({:.2}s)", t_mesh.elapsed().as_secs_f64());
    }
    if let Some(q) = &queue {
        // What is published before a node pulls waits in the stream; this
        // only keeps the first messages' latency honest.
        let t_q = Instant::now();
        if q.wait_consumers(consumers, Duration::from_secs(10)) {
            println!(
                "{}: {consumers} node{} consuming ({:.2}s)",
                q.source.engine(),
                if consumers == 1 { "" } else { "s" },
                t_q.elapsed().as_secs_f64()
            );
        } else {
            println!(
                "{}: not every node is consuming yet; the stream keeps what is published until they do",
                q.source.engine()
            );
        }
    }

    // The publisher thread: 2–4 messages a second per user, paced in 1 ms ticks.
    let victim = cfg.chaos.then(|| cluster.nodes[0].id.clone());
    let ingest: Vec<String> =
        cluster.nodes.iter().filter(|n| Some(&n.id) != victim.as_ref()).map(|n| n.ingest.clone()).collect();
    let published = Arc::new(AtomicU64::new(0));
    let pub_done = Arc::new(AtomicBool::new(false));
    let start_ns = mono_ns() + 20_000_000;
    slow.record_after = start_ns;
    let slow_sent = Arc::new(AtomicU64::new(0));
    match &mut clients {
        Clients::Local { swarm, .. } => swarm.record_after = start_ns,
        Clients::Children { children, .. } => {
            for c in children.iter_mut() {
                if let Some(s) = c.stdin.as_mut() {
                    let _ = io::Write::write_all(s, format!("START {start_ns}\n").as_bytes());
                }
            }
        }
    }
    // Into the queue, or to the nodes' ingest ports.
    let backend = match queue.as_ref().map(|q| q.backend(published.clone())).transpose() {
        Ok(b) => b,
        Err(e) => {
            cluster.stop();
            return Err(e.into());
        }
    };
    let publisher = {
        let (published, pub_done, stop, cred, tls) =
            (published.clone(), pub_done.clone(), cfg.stop.clone(), cred.clone(), client_tls.clone());
        let slow_sent = slow_sent.clone();
        let (n, duration, rate) = (cfg.clients, cfg.duration, cfg.rate);
        std::thread::spawn(move || -> io::Result<()> {
            let r = (|| {
                let mut b = match backend {
                    Some(b) => b,
                    None => Box::new(IngestBackend::connect(&ingest, &cred, tls, published)?),
                };
                let r = publish_loop(&mut *b, n, duration, rate, start_ns, &stop, &slow_sent);
                let finished = b.finish();
                r.and(finished)
            })();
            pub_done.store(true, Ordering::SeqCst);
            r
        })
    };

    let admin = cluster.admin_secret.clone();
    let decision0 = cluster.decision_tcp()[0].clone();
    let dial = cluster.dial.clone();
    let per_node = || -> Vec<(String, u32)> {
        match decision::client::admin(&decision0, &admin, AdminOp::Status, "", 0, &dial) {
            Ok(decision::client::AdminReply::Status { rows, .. }) => rows
                .into_iter()
                .filter(|r| r.heartbeat_age_ms < 3000)
                .map(|r| (r.node_id, r.connections))
                .collect(),
            _ => Vec::new(),
        }
    };
    let t_pub = Instant::now();
    let mut last_print = Instant::now();
    let mut last_received = 0u64;
    let mut killed_at: Option<Instant> = None;
    let mut killed: Option<(String, u32)> = None;
    let mut rehomed_reported = false;
    let mut tail_until: Option<Instant> = None;
    let (mut seen, mut progress_at, mut done_at) = (0u64, Instant::now(), None);
    loop {
        clients.step(Duration::from_millis(5));
        slow.step(Duration::ZERO);
        let now = Instant::now();
        let (received, live, wrong, silent) = clients.counts();
        let slow_got = slow.tally.received + slow.tally.conflated;
        let received = received + slow_got;
        if received != seen {
            (seen, progress_at) = (received, now);
        }
        if let (Some(v), None) = (&victim, killed_at) {
            if now.saturating_duration_since(t_pub) >= cfg.duration / 2 {
                if let Some(n) = cluster.nodes.iter().find(|n| &n.id == v) {
                    let held = per_node().into_iter().find(|(id, _)| id == v).map_or(0, |x| x.1);
                    println!("chaos: killing node {v} (holding {held} clients)");
                    n.handle.kill();
                    killed_at = Some(now);
                    killed = Some((v.clone(), held));
                }
            }
        }
        if let Some(k) = killed_at {
            if !rehomed_reported
                && live == cfg.clients
                && now.saturating_duration_since(k) > Duration::from_millis(300)
            {
                println!(
                    "chaos: all {} clients live again {:.2}s after the kill",
                    cfg.clients,
                    now.saturating_duration_since(k).as_secs_f64()
                );
                rehomed_reported = true;
            }
        }
        if now.saturating_duration_since(last_print) >= Duration::from_secs(1) {
            let secs = now.saturating_duration_since(last_print).as_secs_f64();
            let rate = (received - slow_got).saturating_sub(last_received) as f64 / secs;
            last_received = received - slow_got;
            let [p50, p99, p999] = clients.interval_us();
            let nodes: Vec<String> = per_node().into_iter().map(|(id, c)| format!("{id}:{c}")).collect();
            println!(
                "t={:>3.0}s  clients {} (live {live})  {:>7.0} msg/s  latency p50 {:>6.0}µs p99 {:>6.0}µs p99.9 {:>6.0}µs  wrong-user {wrong}  silent-loss {silent}  slow client: {} conflated",
                now.saturating_duration_since(t_pub).as_secs_f64(),
                nodes.join(" "),
                rate,
                p50,
                p99,
                p999,
                slow.tally.conflated,
            );
            last_print = now;
        }
        if pub_done.load(Ordering::SeqCst) && tail_until.is_none() {
            tail_until = Some(now + Duration::from_millis(1500));
            done_at = Some(now);
            // The slow client now reads at full speed: what it was sent
            // arrives and can be accounted for.
            slow.unthrottle();
        }
        if tail_until.is_some_and(|t| now >= t) {
            // Through a queue (or the log) a backlog may still be on its
            // way: wait while it keeps coming (for up to 15 s).
            let short = received < published.load(Ordering::SeqCst);
            let coming = now.saturating_duration_since(progress_at) < Duration::from_secs(2);
            let within = done_at.is_some_and(|d| now.saturating_duration_since(d) < Duration::from_secs(15));
            if (queue.is_some() || log.is_some()) && short && coming && within {
                tail_until = Some(now + Duration::from_millis(100));
                continue;
            }
            break;
        }
    }
    let pub_result = publisher.join().map_err(|_| io::Error::other("publisher panicked"))?;
    let (t, h) = clients.finish();
    let queue_report = queue.as_ref().map(|q| QueueReport {
        source: q.source,
        stream: q.stream.clone(),
        state: q.state().ok(),
        taken: cluster.taken_from_queue(client_tls.as_ref()),
    });
    cluster.stop();
    if let Some(q) = queue {
        q.remove_stream();
        // Its server (if the demo started it) is stopped here.
        drop(q);
    }
    // The log's servers, once no node uses them.
    drop(log);
    pub_result?;
    // The slow desk's messages are reported apart.
    let slow_sent = slow_sent.load(Ordering::SeqCst);
    let published = published.load(Ordering::SeqCst).saturating_sub(slow_sent);
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    let st = slow.slow_stats();
    let ms = |p: f64| st.stale.value_at_quantile(p) as f64 / 1e6;
    let slow = SlowReport {
        user: slow_user,
        node: slow_node_id,
        published: slow_sent,
        received: st.received,
        conflated: st.conflated,
        unkeyed_lost: st.unkeyed_lost,
        disconnects: st.closed,
        stale_ms: [ms(0.5), ms(0.99), st.stale.max() as f64 / 1e6],
    };
    Ok(DemoReport {
        published,
        tally: t,
        latency_us: [q(0.5), q(0.9), q(0.99), q(0.999), h.max() as f64 / 1000.0],
        unannounced_loss: published as i64 - t.received as i64 - t.announced_gaps as i64,
        queue: queue_report,
        slow,
        durable: cfg.durable,
        killed,
    })
}

/// The backend publishing to the nodes' ingest ports (without `--source`):
/// one publisher connection per node, messages spread over them in turn,
/// each tick's as one PUBLISH_BATCH per connection.
struct IngestBackend {
    pubs: Vec<Publisher>,
    bufs: Vec<Vec<u8>>,
    writers: Vec<Option<BatchWriter>>,
    rr: usize,
    pushed: u64,
    published: Arc<AtomicU64>,
}

impl IngestBackend {
    fn connect(
        ingest: &[String],
        cred: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        published: Arc<AtomicU64>,
    ) -> io::Result<IngestBackend> {
        let pubs: Vec<Publisher> = ingest
            .iter()
            .map(|i| {
                Publisher::connect_tls(std::slice::from_ref(i), cred, tls.clone())
                    .map_err(|e| io::Error::other(e.to_string()))
            })
            .collect::<io::Result<_>>()?;
        let bufs = vec![Vec::with_capacity(64 * 1024); pubs.len()];
        let writers = (0..pubs.len()).map(|_| None).collect();
        Ok(IngestBackend { pubs, bufs, writers, rr: 0, pushed: 0, published })
    }
}

impl Backend for IngestBackend {
    fn push(&mut self, user: &[u8], key: &[u8], payload: &[u8]) -> io::Result<()> {
        self.rr = (self.rr + 1) % self.pubs.len();
        let rr = self.rr;
        let b = &mut self.bufs[rr];
        let w = self.writers[rr].get_or_insert_with(|| BatchWriter::start(b, 0, 0));
        if !w.push(b, user, key, payload) {
            if let Some(full) = self.writers[rr].take() {
                full.finish(b);
            }
            let mut w2 = BatchWriter::start(b, 0, 0);
            w2.push(b, user, key, payload);
            self.writers[rr] = Some(w2);
        }
        self.pushed += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        for (i, w) in self.writers.iter_mut().enumerate() {
            if let Some(w) = w.take() {
                w.finish(&mut self.bufs[i]);
                self.pubs[i].write_raw(&self.bufs[i]).map_err(|e| io::Error::other(e.to_string()))?;
                self.bufs[i].clear();
            }
        }
        self.published.fetch_add(std::mem::take(&mut self.pushed), Ordering::Relaxed);
        Ok(())
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        Ok(())
    }
}

/// The backend's traffic: each user's messages, paced in 1 ms ticks, to
/// `backend`; and the slow desk's (user `clients`, [`SLOW_RATE`] a second),
/// counted in `slow_sent`.
fn publish_loop(
    backend: &mut dyn Backend,
    clients: usize,
    duration: Duration,
    rate: Option<u64>,
    start_ns: u64,
    stop: &AtomicBool,
    slow_sent: &AtomicU64,
) -> io::Result<()> {
    // Per-user period: 2, 3 or 4 messages a second (or scaled to --rate).
    let base: Vec<f64> = (0..clients).map(|u| 2.0 + (u % 3) as f64).collect();
    let natural: f64 = base.iter().sum();
    let scale = rate.map_or(1.0, |r| r as f64 / natural.max(1.0));
    let period_ms: Vec<u64> = base.iter().map(|r| ((1000.0 / (r * scale)).round() as u64).max(1)).collect();
    // A timing wheel of 1 ms slots: each user sits in the slot of its next send.
    let horizon = period_ms.iter().copied().max().unwrap_or(1) as usize + 1;
    let mut wheel: Vec<Vec<u32>> = vec![Vec::new(); horizon];
    for u in 0..clients {
        wheel[(u * 7) % period_ms[u] as usize].push(u as u32);
    }
    let mut next_msg = vec![0u32; clients];
    let names: Vec<String> = (0..clients).map(user_name).collect();
    let slow_name = user_name(clients);
    let (mut slow_owed, mut slow_msg) = (0u64, 0u32);
    let mut payload = Vec::with_capacity(160);
    let ticks = duration.as_millis() as u64;
    for tick in 0..ticks {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let intended = start_ns + tick * 1_000_000;
        let now = mono_ns();
        if now < intended {
            std::thread::sleep(Duration::from_nanos(intended - now));
        }
        let slot = (tick as usize) % horizon;
        let due = std::mem::take(&mut wheel[slot]);
        for &u in &due {
            let u = u as usize;
            let stamp = Stamp { sent_ns: intended, user: u as u32, msg: next_msg[u] };
            let key = broker_payload(&mut payload, stamp, u, broker_kind(next_msg[u]));
            next_msg[u] += 1;
            backend.push(names[u].as_bytes(), key.as_bytes(), &payload)?;
            wheel[(slot + period_ms[u] as usize) % horizon].push(u as u32);
        }
        // The slow desk's messages due by the end of this tick.
        slow_owed += SLOW_RATE;
        while slow_owed >= 1000 {
            slow_owed -= 1000;
            let stamp = Stamp { sent_ns: intended, user: clients as u32, msg: slow_msg };
            let key = broker_payload(&mut payload, stamp, clients, slow_kind(slow_msg));
            slow_msg += 1;
            backend.push(slow_name.as_bytes(), key.as_bytes(), &payload)?;
            slow_sent.fetch_add(1, Ordering::Relaxed);
        }
        backend.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_keyed_by_pair_and_the_rest_unkeyed() {
        let mut buf = Vec::new();
        for n in 0..40u32 {
            let stamp = Stamp { sent_ns: 1, user: 3, msg: n };
            let key = broker_payload(&mut buf, stamp, 3, broker_kind(n));
            let text = String::from_utf8_lossy(&buf[Stamp::LEN..]).into_owned();
            assert_eq!(key.is_empty(), !text.contains(r#""type":"quote""#), "{text}");
            if !key.is_empty() {
                assert!(text.contains(&format!(r#""pair":"{key}""#)), "{text}");
            }
            // The slow client's rule for what must arrive is the publisher's.
            let key = broker_payload(&mut buf, stamp, 3, slow_kind(n));
            assert_eq!(key.is_empty(), SLOW_UNKEYED.is_unkeyed(n), "message {n}");
        }
    }

    #[test]
    fn durable_mode_fails_the_demo_on_any_loss_or_a_restarted_resume() {
        let ok = DemoReport {
            published: 10,
            tally: Tally { received: 10, resumed: 3, reconnects: 3, ..Tally::default() },
            latency_us: [0.0; 5],
            unannounced_loss: 0,
            queue: None,
            slow: SlowReport::default(),
            durable: true,
            killed: Some(("n1".into(), 3)),
        };
        assert!(ok.ok());
        let announced = Tally { received: 8, announced_gaps: 2, ..ok.tally };
        let r = DemoReport { tally: announced, ..ok.clone() };
        assert_eq!(r.lost(), 2);
        assert!(!r.ok(), "durable: an announced loss fails");
        assert!(
            DemoReport { durable: false, ..r }.ok(),
            "without durable mode it is announced, not a failure"
        );
        let restarted = Tally { resumed: 2, restarted: 1, ..ok.tally };
        assert!(!DemoReport { tally: restarted, ..ok.clone() }.ok(), "a RESTARTED resume fails");
        let gap = Tally { resumed: 2, gapped: 1, ..ok.tally };
        assert!(!DemoReport { tally: gap, ..ok.clone() }.ok(), "a GAP resume fails");
        assert!(!DemoReport { unannounced_loss: 1, ..ok }.ok());
    }

    #[test]
    fn the_slow_client_fails_the_demo_on_a_lost_fill_or_a_disconnect() {
        let ok = SlowReport { published: 10, received: 4, conflated: 6, ..SlowReport::default() };
        assert!(ok.ok());
        assert!(!SlowReport { unkeyed_lost: 1, ..ok.clone() }.ok());
        assert!(!SlowReport { disconnects: 1, ..ok.clone() }.ok());
        assert!(!SlowReport { received: 3, ..ok }.ok(), "every message is received or conflated");
    }
}
