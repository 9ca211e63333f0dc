//! `herald-probe`: latency probe and load generator.
//!
//! `herald-probe load` connects `--clients` simulated clients, spread over
//! child worker processes (at most `--per-worker` connections each, since a
//! process may open only so many files), then publishes at a fixed, paced
//! rate in 1 ms ticks. Every payload carries its *intended* send time (the
//! tick it belongs to), so latency includes any time the publisher fell
//! behind: the measurement is corrected for coordinated omission. Workers
//! check that every message reached the right user, in order, exactly once,
//! and send their latency histograms back to the coordinator, which merges
//! them and prints percentiles, loss, duplicates and gaps, and optionally the
//! CPU the node used per delivered message.
//!
//! `herald-probe soak` (module `soak`) runs the same swarm for half an hour
//! with chaos, sampling the cluster's processes into a CSV and judging RSS
//! growth, descriptor leaks, cross-user deliveries and silent losses.
//!
//! `--plain` drives `herald-forwarder` (no auth: the token is the user id).
//!
//! Conflation (protocol.md §5.7): `--keys N` gives each user's messages the
//! keys k0..k(N-1) in turn (`--fills-every M`: every M-th one unkeyed), and
//! `--slow N` makes N of the clients, spread evenly, read throttled to a
//! fraction of their stream's bandwidth behind a small receive buffer. The
//! probe then reports, for the slow clients apart, what they received, what
//! was conflated, the unkeyed messages they never got (must be 0 under
//! `--slow-policy conflate`), their disconnects, and the staleness of the
//! keyed messages they got (now − intended send time), p50 and p99; the
//! latency line is then the fast clients' alone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod plot;
mod soak;
use hdrhistogram::Histogram;

use herald::cli::read_secret;
use herald::protocol::frame::{self as f, BatchWriter, Frame};
use herald::protocol::{decode, token, Channel, Decoded, MIN_VERSION, VERSION};
use herald::swarm::{mono_ns, user_name, SlowReaders, SlowStats, Stamp, SwarmConfig, Tally, Unkeyed};

#[derive(Parser)]
#[command(about = "herald latency probe and load generator")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub(crate) struct Common {
    /// Node client endpoints (`host:port`); clients are spread over them.
    #[arg(long, value_delimiter = ',', required_unless_present = "decision")]
    node: Vec<String>,
    /// Decision servers: each client asks them for its node (a real cluster).
    #[arg(long, value_delimiter = ',')]
    decision: Vec<String>,
    /// Reconnect and resume when a connection drops (for chaos and drains).
    #[arg(long)]
    reconnect: bool,
    /// Client-token secret file (not needed with --plain).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Target is herald-forwarder: no auth, the token is the user id.
    #[arg(long)]
    plain: bool,
    /// Local source addresses to spread connections over (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',')]
    source: Vec<std::net::IpAddr>,
    /// Clients speak TLS to the nodes, verifying them against the system's
    /// roots (or --tls-ca).
    #[arg(long)]
    tls: bool,
    /// Clients speak TLS, trusting this CA file (PEM) instead of the system's roots.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Requests to the decision servers (clients' ASSIGN, the probe's node
    /// list) speak TLS, verified against the system's roots (or --decision-tls-ca).
    #[arg(long)]
    decision_tls: bool,
    /// Requests to the decision servers speak TLS, trusting this CA file.
    #[arg(long)]
    decision_tls_ca: Option<PathBuf>,
}

impl Common {
    /// The clients' TLS to nodes, and the TLS to decision servers.
    #[allow(clippy::type_complexity)]
    fn tls(&self) -> Result<(Option<Arc<rustls::ClientConfig>>, Option<Arc<rustls::ClientConfig>>), String> {
        use herald::tls::Trust;
        let nodes = Trust::config_from_flags(self.tls, self.tls_ca.clone()).map_err(|e| e.to_string())?;
        let decision = Trust::config_from_flags(self.decision_tls, self.decision_tls_ca.clone())
            .map_err(|e| e.to_string())?;
        Ok((nodes, decision))
    }
}

/// Payload size and how clients are spread over worker processes (load and soak).
#[derive(clap::Args)]
pub(crate) struct Shape {
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 100)]
    pub(crate) payload: usize,
    /// Most connections per worker process.
    #[arg(long, default_value_t = 15_000)]
    per_worker: usize,
    /// Worker processes (default: enough for --per-worker, at least 2).
    #[arg(long)]
    workers: Option<usize>,
}

impl Shape {
    /// Worker processes for `clients`, and clients per worker.
    pub(crate) fn workers(&self, clients: usize) -> (usize, usize) {
        let n = self.workers.unwrap_or_else(|| clients.div_ceil(self.per_worker).max(2)).max(1);
        (n, clients.div_ceil(n))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a paced load and report latency, loss and CPU.
    Load(Box<LoadArgs>),
    /// A long run with chaos, sampled into a CSV and judged at the end
    /// (RSS growth, descriptor leaks, cross-user deliveries, silent losses).
    Soak(Box<soak::SoakArgs>),
    /// Overlay several .hgrm files in one SVG: `plot --out x.svg herald=a.hgrm floor=b.hgrm`.
    Plot {
        /// Output SVG path.
        #[arg(long)]
        out: PathBuf,
        /// Plot title.
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        /// NAME=FILE.hgrm pairs.
        inputs: Vec<String>,
    },
    /// Internal: one worker process holding a share of the clients.
    Worker {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        readers: Readers,
        /// First user index.
        #[arg(long)]
        first: usize,
        /// Number of clients.
        #[arg(long)]
        count: usize,
        /// Warm-up end, CLOCK_MONOTONIC ns (messages stamped before are not recorded).
        #[arg(long, default_value_t = 0)]
        record_after: u64,
    },
}

fn main() {
    let a = Args::parse();
    // The library's swarm logs through `log`; the probe's own messages stay eprintln!.
    herald::logging::init(log::LevelFilter::Info);
    let code = match a.cmd {
        Cmd::Worker { common, readers, first, count, record_after } => {
            worker(common, readers, first, count, record_after)
        }
        Cmd::Load(args) => load(*args),
        Cmd::Soak(args) => soak::soak(*args),
        Cmd::Plot { out, title, inputs } => {
            let mut series = Vec::new();
            for i in inputs {
                let Some((name, path)) = i.split_once('=') else {
                    eprintln!("probe plot: inputs are NAME=FILE.hgrm, not {i}");
                    std::process::exit(2);
                };
                match std::fs::read_to_string(path) {
                    Ok(t) => series.push((name.to_owned(), plot::parse_hgrm(&t))),
                    Err(e) => {
                        eprintln!("probe plot: {path}: {e}");
                        std::process::exit(2);
                    }
                }
            }
            match std::fs::write(&out, plot::svg(&title, &series)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("probe plot: {}: {e}", out.display());
                    2
                }
            }
        }
    };
    herald::logging::flush();
    std::process::exit(code);
}

// ------------------------------------------------------------------ worker

/// The secret from `file` (empty with `--plain`); prints why and returns
/// `None` when it cannot be had.
pub(crate) fn secret_for(
    plain: bool,
    file: Option<&std::path::Path>,
    who: &str,
    flag: &str,
) -> Option<Vec<u8>> {
    if plain {
        return Some(Vec::new());
    }
    match file.map(read_secret) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("{who}: {e}");
            None
        }
        None => {
            eprintln!("{who}: {flag} is required without --plain");
            None
        }
    }
}

/// How a worker's clients read and which messages are keyed (internal
/// flags, set by `load` from `--slow…`, `--keys` and `--fills-every`).
#[derive(clap::Args, Clone)]
pub(crate) struct Readers {
    /// Slow readers: how many, the first, the stride.
    #[arg(long, default_value_t = 0, hide = true)]
    slow_count: usize,
    #[arg(long, default_value_t = 0, hide = true)]
    slow_first: usize,
    #[arg(long, default_value_t = 1, hide = true)]
    slow_stride: usize,
    /// Their read rate, bytes a second.
    #[arg(long, default_value_t = 0, hide = true)]
    slow_read_bps: u64,
    /// Their SO_RCVBUF.
    #[arg(long, default_value_t = 0, hide = true)]
    slow_read_rcvbuf: usize,
    /// Message n is unkeyed when n % every < below.
    #[arg(long, default_value_t = 1, hide = true)]
    unkeyed_every: u32,
    #[arg(long, default_value_t = 1, hide = true)]
    unkeyed_below: u32,
}

impl Default for Readers {
    fn default() -> Readers {
        Readers::new(SlowReaders::default(), Unkeyed::ALL)
    }
}

impl Readers {
    fn new(slow: SlowReaders, unkeyed: Unkeyed) -> Readers {
        Readers {
            slow_count: slow.count,
            slow_first: slow.first,
            slow_stride: slow.stride,
            slow_read_bps: slow.bps,
            slow_read_rcvbuf: slow.rcvbuf,
            unkeyed_every: unkeyed.every,
            unkeyed_below: unkeyed.below,
        }
    }

    fn slow(&self) -> SlowReaders {
        SlowReaders {
            count: self.slow_count,
            first: self.slow_first,
            stride: self.slow_stride,
            bps: self.slow_read_bps,
            rcvbuf: self.slow_read_rcvbuf,
        }
    }

    fn unkeyed(&self) -> Unkeyed {
        Unkeyed { every: self.unkeyed_every, below: self.unkeyed_below }
    }

    /// As a worker's command-line flags.
    fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.slow_count > 0 {
            for (k, x) in [
                ("--slow-count", self.slow_count as u64),
                ("--slow-first", self.slow_first as u64),
                ("--slow-stride", self.slow_stride as u64),
                ("--slow-read-bps", self.slow_read_bps),
                ("--slow-read-rcvbuf", self.slow_read_rcvbuf as u64),
            ] {
                v.extend([k.to_owned(), x.to_string()]);
            }
        }
        v.extend(["--unkeyed-every".into(), self.unkeyed_every.to_string()]);
        v.extend(["--unkeyed-below".into(), self.unkeyed_below.to_string()]);
        v
    }
}

fn worker(c: Common, readers: Readers, first: usize, count: usize, record_after: u64) -> i32 {
    let Some(secret) = secret_for(c.plain, c.secret_file.as_deref(), "worker", "--secret-file") else {
        return 2;
    };
    let (tls, decision_tls) = match c.tls() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("worker: {e}");
            return 2;
        }
    };
    let cfg = SwarmConfig {
        first,
        count,
        nodes: c.node.clone(),
        decision: c.decision.clone(),
        secret,
        plain: c.plain,
        source: c.source.clone(),
        reconnect: c.reconnect,
        tls,
        decision_tls,
        slow: readers.slow(),
        unkeyed: readers.unkeyed(),
    };
    herald::swarm::run_worker(cfg, record_after)
}

// ------------------------------------------------------------------ load

#[derive(clap::Args)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// Node ingest endpoints; messages are published round-robin over
    /// them (default with --decision: every live node's ingest endpoint).
    #[arg(long, value_delimiter = ',')]
    ingest: Vec<SocketAddr>,
    /// Publisher secret file (not needed with --plain).
    #[arg(long)]
    publisher_secret_file: Option<PathBuf>,
    /// Simulated clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Messages per second, in total.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of warm-up publishing not recorded.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[command(flatten)]
    shape: Shape,
    /// PIDs of node processes whose CPU use to report.
    #[arg(long, value_delimiter = ',')]
    node_pid: Vec<u32>,
    /// Exit non-zero if p99 (µs) is over this.
    #[arg(long)]
    slo_p99: Option<u64>,
    /// Write the percentile distribution here (HdrHistogram .hgrm, µs).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write a latency-by-percentile SVG plot here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Title for the plot.
    #[arg(long, default_value = "herald end-to-end latency")]
    title: String,
    /// Re-home test: SIGKILL this process (a node) during the run...
    #[arg(long)]
    kill_pid: Option<u32>,
    /// ...this many seconds after publishing starts.
    #[arg(long, default_value_t = 5)]
    kill_after: u64,
    /// Run this shell command once every client is connected, before publishing.
    #[arg(long)]
    exec_after_connect: Option<String>,
    /// Run this shell command after publishing, while the clients are still connected.
    #[arg(long)]
    exec_before_stop: Option<String>,
    /// Publish into NATS (HOST:PORT) on `herald.user.<user>` instead of the
    /// ingest port, for a node consuming the stream with `--source
    /// jetstream://` (core NATS publishes, which the stream stores; the
    /// latency then includes the queue hop).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "ingest")]
    via_jetstream: Option<String>,
    /// Publish into Redis (HOST:PORT), XADD to the stream `herald` with the
    /// fields `user` and `data` (and `key`), one pipeline a tick, instead of
    /// the ingest port, for a node consuming it with `--source redis://`.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["ingest", "via_jetstream"])]
    via_redis: Option<String>,
    /// Conflation keys: each user's messages carry the keys k0..k(N-1) in
    /// turn (through NATS as the header Herald-Key, through Redis as the
    /// field `key`); 0: no keys.
    #[arg(long, default_value_t = 0)]
    keys: u32,
    /// With --keys: each user's messages 0, M, 2M, … go without a key
    /// (events that must arrive, never conflated); 0: none.
    #[arg(long, default_value_t = 0)]
    fills_every: u32,
    /// This many clients, spread evenly over the users, read slowly (see
    /// --slow-fraction, --slow-bps, --slow-rcvbuf); reported apart.
    #[arg(long, default_value_t = 0)]
    slow: usize,
    /// A slow client reads this fraction of its stream's bandwidth: rate /
    /// clients messages a second of 21 + --payload bytes each.
    #[arg(long, default_value_t = 0.1)]
    slow_fraction: f64,
    /// A slow client reads this many bytes a second (instead of --slow-fraction).
    #[arg(long)]
    slow_bps: Option<u64>,
    /// The receive buffer (SO_RCVBUF) a slow client asks for before it connects.
    #[arg(long, default_value_t = 4096)]
    slow_rcvbuf: usize,
}

/// Bytes of a DELIVER with `payload` bytes of payload (protocol.md §3.3).
const DELIVER_OVERHEAD: usize = 21;

impl LoadArgs {
    /// Which messages go without a key.
    fn unkeyed(&self) -> Unkeyed {
        match (self.keys, self.fills_every) {
            (0, _) => Unkeyed::ALL,
            (_, 0) => Unkeyed::NONE,
            (_, m) => Unkeyed { every: m, below: 1 },
        }
    }

    /// A slow client's stream, bytes a second.
    fn stream_bps(&self) -> f64 {
        self.rate as f64 / self.clients.max(1) as f64 * (DELIVER_OVERHEAD + self.shape.payload) as f64
    }

    /// The slow readers.
    fn slow_readers(&self) -> SlowReaders {
        let bps =
            self.slow_bps.unwrap_or_else(|| (self.stream_bps() * self.slow_fraction).round().max(1.0) as u64);
        SlowReaders::spread(self.slow, self.clients, bps, self.slow_rcvbuf)
    }
}

/// A message's key index: message `n` of a user, `None` if unkeyed.
fn key_of(unkeyed: Unkeyed, keys: u32, n: u32) -> Option<usize> {
    if keys == 0 || unkeyed.is_unkeyed(n) {
        return None;
    }
    Some(((n as u64 - unkeyed.below_n(n)) % keys as u64) as usize)
}

/// A message for a queue: (user, key index, payload).
type Queued = (usize, Option<usize>, Vec<u8>);

/// XADD from the probe's tick loop: each tick's messages as one pipeline.
struct RedisSink {
    conn: redis::Connection,
}

impl RedisSink {
    fn connect(addr: &str) -> Result<RedisSink, String> {
        let conn = redis::Client::open(format!("redis://{addr}/"))
            .and_then(|c| c.get_connection())
            .map_err(|e| format!("redis {addr}: {e}"))?;
        Ok(RedisSink { conn })
    }

    fn publish(&mut self, names: &[String], keys: &[String], msgs: &mut Vec<Queued>) -> Result<(), String> {
        if msgs.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for (u, k, data) in msgs.drain(..) {
            let c = p.cmd("XADD").arg("herald").arg("*").arg("user").arg(&names[u]).arg("data").arg(data);
            if let Some(k) = k {
                c.arg("key").arg(&keys[k]);
            }
            c.ignore();
        }
        p.query::<()>(&mut self.conn).map_err(|e| e.to_string())
    }
}

/// Core NATS publishing from the probe's tick loop: a current-thread
/// runtime driven only inside `publish` (each tick's messages, then a
/// flush, so nothing waits in the client between ticks).
struct NatsSink {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    subjects: Vec<async_nats::Subject>,
}

impl NatsSink {
    fn connect(addr: &str, users: &[String]) -> Result<NatsSink, String> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let client = rt.block_on(async_nats::connect(addr)).map_err(|e| format!("nats {addr}: {e}"))?;
        let subjects = users.iter().map(|u| format!("herald.user.{u}").into()).collect();
        Ok(NatsSink { rt, client, subjects })
    }

    fn publish(&self, keys: &[String], msgs: &mut Vec<Queued>) -> Result<(), String> {
        let (client, subjects) = (&self.client, &self.subjects);
        self.rt.block_on(async {
            for (u, k, p) in msgs.drain(..) {
                let subject = subjects[u].clone();
                match k {
                    None => client.publish(subject, p.into()).await,
                    Some(k) => {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Herald-Key", keys[k].as_str());
                        client.publish_with_headers(subject, h, p.into()).await
                    }
                }
                .map_err(|e| e.to_string())?;
            }
            client.flush().await.map_err(|e| e.to_string())
        })
    }
}

/// Resident set size of a process, KiB.
pub(crate) fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, in seconds.
pub(crate) fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Involuntary context switches of all a process's threads so far: how often
/// the scheduler took the CPU from it while it was still running (on a
/// shared machine, mostly the probe's own threads preempting the node).
fn proc_preempted(pid: u32) -> Option<u64> {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let s = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
        let l = s.lines().find(|l| l.starts_with("nonvoluntary_ctxt_switches:"))?;
        n += l.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(n)
}

fn self_cpu(who: i32) -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct we pass.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A publisher connection to the ingest endpoint `addr`, through PUB_HELLO
/// and PUB_WELCOME unless `plain` (the minimal forwarder has no handshake).
pub(crate) fn connect_publisher(addr: &str, plain: bool, secret: &[u8]) -> Result<TcpStream, String> {
    let sa = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("ingest {addr}: not an address"))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))
        .map_err(|e| format!("connect ingest {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("ingest {addr}: {e}"))?;
    if plain {
        return Ok(s);
    }
    let cred = token::mint(secret, b"herald-probe", u32::MAX as u64)
        .ok_or("publisher secret cannot mint a credential")?;
    let h = Frame::PubHello(f::PubHello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        credential: cred.as_bytes(),
        agent: b"herald-probe",
    })
    .to_vec();
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| format!("ingest {addr}: {e}"))?;
    s.write_all(&h).map_err(|e| format!("ingest {addr}: {e}"))?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    match decode(&buf[..n], Channel::FromIngest) {
        Ok(Decoded::Frame(Frame::PubWelcome(_), _)) => {
            s.set_read_timeout(None).map_err(|e| format!("ingest {addr}: {e}"))?;
            Ok(s)
        }
        other => Err(format!("publisher handshake with {addr} failed: {other:?}")),
    }
}

/// Starts worker processes holding `clients` clients, `per` each, and
/// forwards their stdout lines, tagged with the worker's index, to the
/// returned channel.
pub(crate) fn spawn_workers(
    common: &Common,
    readers: &Readers,
    clients: usize,
    nworkers: usize,
    per: usize,
) -> (Vec<std::process::Child>, crossbeam_channel::Receiver<(usize, String)>) {
    let exe = std::env::current_exe().expect("own path");
    let mut children = Vec::new();
    let mut first = 0;
    for _ in 0..nworkers {
        let count = per.min(clients - first);
        if count == 0 {
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.arg("worker");
        if !common.node.is_empty() {
            cmd.arg("--node").arg(common.node.join(","));
        }
        cmd.arg("--first").arg(first.to_string()).arg("--count").arg(count.to_string());
        cmd.args(readers.args());
        let flags = [
            (common.plain, "--plain"),
            (common.tls, "--tls"),
            (common.decision_tls, "--decision-tls"),
            (common.reconnect, "--reconnect"),
        ];
        for (on, flag) in flags {
            if on {
                cmd.arg(flag);
            }
        }
        if let Some(ca) = &common.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        if let Some(ca) = &common.decision_tls_ca {
            cmd.arg("--decision-tls-ca").arg(ca);
        }
        if !common.decision.is_empty() {
            cmd.arg("--decision").arg(common.decision.join(","));
        }
        if let Some(s) = &common.secret_file {
            cmd.arg("--secret-file").arg(s);
        }
        if !common.source.is_empty() {
            cmd.arg("--source")
                .arg(common.source.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","));
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let child = cmd.spawn().expect("spawn worker");
        children.push(child);
        first += count;
    }
    // Every worker's stdout lines, through one channel.
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, String)>();
    for (i, c) in children.iter_mut().enumerate() {
        herald::swarm::forward_lines(i, c.stdout.take().expect("piped"), tx.clone());
    }
    (children, rx)
}

/// Waits for READY from each of `nworkers` workers, drawing a progress bar;
/// returns the clients connected and the slowest worker's connect time, or
/// `None` (said why) if a worker exited first.
pub(crate) fn wait_ready(
    rx: &crossbeam_channel::Receiver<(usize, String)>,
    nworkers: usize,
    clients: usize,
    t_connect: Instant,
) -> Option<(usize, f64)> {
    let mut progress = vec![0usize; nworkers];
    let mut ready = vec![false; nworkers];
    let mut worker_secs = 0.0f64;
    while ready.iter().any(|r| !r) {
        let Ok((i, line)) = rx.recv() else { break };
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("PROGRESS") => progress[i] = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            Some("READY") => {
                progress[i] = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                worker_secs = worker_secs.max(parts.next().and_then(|n| n.parse().ok()).unwrap_or(0.0));
                ready[i] = true;
            }
            Some("EOF") => {
                eprintln!("\nprobe: worker {i} exited before connecting");
                return None;
            }
            _ => {}
        }
        let done: usize = progress.iter().sum();
        let width = 40;
        let filled = done * width / clients.max(1);
        eprint!(
            "\rprobe: connecting [{}{}] {done}/{} ({:.0}/s)",
            "#".repeat(filled),
            " ".repeat(width - filled.min(width)),
            clients,
            done as f64 / t_connect.elapsed().as_secs_f64().max(0.001)
        );
    }
    Some((progress.iter().sum(), worker_secs))
}

fn load(mut a: LoadArgs) -> i32 {
    a.shape.payload = a.shape.payload.max(16);
    let (nworkers, per) = a.shape.workers(a.clients);
    let warm_ns = a.warmup * 1_000_000_000;
    let t_connect = Instant::now();
    let rss0: Vec<Option<u64>> = a.node_pid.iter().map(|&p| proc_rss_kib(p)).collect();
    // Workers connect, say READY, and wait; publishing starts after every
    // worker is READY, and the recording threshold is sent to them on stdin.
    let (unkeyed, slow_readers) = (a.unkeyed(), a.slow_readers());
    let readers = Readers::new(slow_readers, unkeyed);
    let (mut children, rx) = spawn_workers(&a.common, &readers, a.clients, nworkers, per);
    let nworkers = children.len();
    let Some((connected, worker_secs)) = wait_ready(&rx, nworkers, a.clients, t_connect) else {
        return 1;
    };
    eprintln!();
    println!(
        "connect        {connected}/{} clients through handshake in {:.2}s = {:.0} connections/s ({} workers)",
        a.clients,
        worker_secs,
        connected as f64 / worker_secs.max(0.001),
        nworkers
    );
    if connected < a.clients {
        eprintln!("probe: FAIL: only {connected} of {} clients completed the handshake", a.clients);
        return 1;
    }

    if let Some(cmd) = &a.exec_after_connect {
        match Command::new("sh").arg("-c").arg(cmd).status() {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("probe: --exec-after-connect failed: {other:?}");
                return 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for (i, pid) in a.node_pid.iter().enumerate() {
        if let (Some(r0), Some(r1)) = (rss0[i], proc_rss_kib(*pid)) {
            println!(
                "node pid {pid}   rss {r0} KiB before clients, {r1} KiB after: {:.0} bytes per connection",
                (r1 as f64 - r0 as f64) * 1024.0 / a.clients.max(1) as f64
            );
        }
    }
    // Publisher connections.
    let Some(pub_secret) =
        secret_for(a.common.plain, a.publisher_secret_file.as_deref(), "probe", "--publisher-secret-file")
    else {
        return 2;
    };
    let names: Vec<String> = (0..a.clients).map(user_name).collect();
    let nats = match a.via_jetstream.as_deref().map(|addr| NatsSink::connect(addr, &names)).transpose() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("probe: {e}");
            return 1;
        }
    };
    let mut redis = match a.via_redis.as_deref().map(RedisSink::connect).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("probe: {e}");
            return 1;
        }
    };
    let mut queued: Vec<Queued> = Vec::new();
    let key_names: Vec<String> = (0..a.keys).map(|k| format!("k{k}")).collect();
    let mut ingest: Vec<String> = a.ingest.iter().map(|a| a.to_string()).collect();
    if ingest.is_empty() && nats.is_none() && redis.is_none() {
        match herald::decision::client::nodes(
            &a.common.decision,
            &herald::decision::client::Dial::new(
                Duration::from_secs(2),
                match a.common.tls() {
                    Ok((_, d)) => d,
                    Err(e) => {
                        eprintln!("probe: {e}");
                        return 2;
                    }
                },
            ),
        ) {
            Ok(list) => {
                ingest = list.into_iter().filter(|n| !n.draining).map(|n| n.ingest_endpoint).collect()
            }
            Err(e) => {
                eprintln!("probe: no --ingest and no node list from the decision servers: {e}");
                return 2;
            }
        }
    }
    let mut pubs: Vec<TcpStream> = Vec::new();
    for addr in &ingest {
        match connect_publisher(addr, a.common.plain, &pub_secret) {
            Ok(s) => pubs.push(s),
            Err(e) => {
                eprintln!("probe: {e}");
                return 1;
            }
        }
    }
    // Drain anything the nodes send publishers (PINGs) so they never block.
    for p in &pubs {
        let mut r = p.try_clone().unwrap();
        let mut w = p.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut acc = Vec::new();
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                acc.extend_from_slice(&buf[..n]);
                while let Ok(Decoded::Frame(fr, used)) = decode(&acc, Channel::FromIngest) {
                    if let Frame::Ping(x) = fr {
                        let _ = w.write_all(&Frame::Pong(x).to_vec());
                    }
                    acc.drain(..used);
                }
            }
        });
    }

    let start_ns = mono_ns() + 5_000_000;
    let record_after = start_ns + warm_ns;
    for c in children.iter_mut() {
        if let Some(s) = c.stdin.as_mut() {
            let _ = writeln!(s, "START {record_after}");
            let _ = s.flush();
        }
    }
    let total_ns = (a.warmup + a.duration) * 1_000_000_000;
    let mut next_msg = vec![0u32; a.clients];
    let mut sent: u64 = 0;
    let mut sent_recorded: u64 = 0;
    let mut owed = 0.0f64;
    let per_tick = a.rate as f64 / 1000.0;
    let mut tick: u64 = 0;
    let mut user_rr = 0usize;
    let mut bufs: Vec<Vec<u8>> = vec![Vec::with_capacity(256 * 1024); pubs.len()];
    let mut payload = vec![0u8; a.shape.payload];
    let mut late_ticks = 0u64;
    type Sample = (Vec<Option<f64>>, f64, Vec<Option<u64>>);
    let mut cpu_rec0: Option<Sample> = None;
    let mut killed = false;
    loop {
        let intended = start_ns + tick * 1_000_000;
        if intended >= start_ns + total_ns {
            break;
        }
        if let Some(pid) =
            a.kill_pid.filter(|_| !killed && intended >= start_ns + a.kill_after * 1_000_000_000)
        {
            // SAFETY: kill(2); the pid was given to us to kill.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let now = mono_ns();
            for c in children.iter_mut() {
                if let Some(s) = c.stdin.as_mut() {
                    let _ = writeln!(s, "KILL {now}");
                    let _ = s.flush();
                }
            }
            killed = true;
            eprintln!("\nprobe: killed pid {pid}");
        }
        if cpu_rec0.is_none() && intended >= record_after {
            cpu_rec0 = Some((
                a.node_pid.iter().map(|&p| proc_cpu(p)).collect(),
                self_cpu(libc::RUSAGE_SELF),
                a.node_pid.iter().map(|&p| proc_preempted(p)).collect::<Vec<_>>(),
            ));
        }
        let now = mono_ns();
        if now < intended {
            std::thread::sleep(Duration::from_nanos(intended - now));
        } else if now > intended + 1_000_000 {
            late_ticks += 1;
        }
        owed += per_tick;
        let k = owed.floor() as u64;
        owed -= k as f64;

        let mut writers: Vec<Option<BatchWriter>> = (0..pubs.len()).map(|_| None).collect();
        for j in 0..k {
            let u = user_rr;
            user_rr = (user_rr + 1) % a.clients;
            Stamp { sent_ns: intended, user: u as u32, msg: next_msg[u] }.write(&mut payload);
            let key = key_of(unkeyed, a.keys, next_msg[u]);
            next_msg[u] += 1;
            if nats.is_some() || redis.is_some() {
                queued.push((u, key, payload.clone()));
                continue;
            }
            let key = key.map_or(&b""[..], |k| key_names[k].as_bytes());
            let p = (sent + j) as usize % pubs.len();
            let name = &names[u];
            let b = &mut bufs[p];
            let w = writers[p].get_or_insert_with(|| BatchWriter::start(b, 0, 0));
            if !w.push(b, name.as_bytes(), key, &payload) {
                let full = writers[p].take().unwrap();
                full.finish(b);
                let mut w2 = BatchWriter::start(b, 0, 0);
                w2.push(b, name.as_bytes(), key, &payload);
                writers[p] = Some(w2);
            }
        }
        if let Some(n) = &nats {
            if let Err(e) = n.publish(&key_names, &mut queued) {
                eprintln!("probe: publish to NATS failed: {e}");
                return 1;
            }
        }
        if let Some(r) = redis.as_mut() {
            if let Err(e) = r.publish(&names, &key_names, &mut queued) {
                eprintln!("probe: XADD to Redis failed: {e}");
                return 1;
            }
        }
        for (p, w) in writers.into_iter().enumerate() {
            if let Some(w) = w {
                w.finish(&mut bufs[p]);
            }
            if !bufs[p].is_empty() {
                if let Err(e) = pubs[p].write_all(&bufs[p]) {
                    eprintln!("probe: publish failed: {e}");
                    return 1;
                }
                bufs[p].clear();
            }
        }
        sent += k;
        if intended >= record_after {
            sent_recorded += k;
        }
        tick += 1;
        if tick.is_multiple_of(1000) {
            eprint!("\rprobe: t={}s sent={sent}", tick / 1000);
        }
    }
    let cpu1: Vec<Option<f64>> = a.node_pid.iter().map(|&p| proc_cpu(p)).collect();
    let preempted1: Vec<Option<u64>> = a.node_pid.iter().map(|&p| proc_preempted(p)).collect();
    let self1 = self_cpu(libc::RUSAGE_SELF);
    eprintln!();
    // Let the last messages arrive (the slow clients, read at full speed
    // now, get what they were sent), then stop the workers.
    if a.slow > 0 {
        for c in children.iter_mut() {
            if let Some(s) = c.stdin.as_mut() {
                let _ = writeln!(s, "UNTHROTTLE");
                let _ = s.flush();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(if a.slow > 0 { 3000 } else { 1500 }));
    if let Some(cmd) = &a.exec_before_stop {
        let _ = Command::new("sh").arg("-c").arg(cmd).status();
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut t = Tally::default();
    let mut rehome_w = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).unwrap();
    let mut rehome_m = rehome_w.clone();
    let mut slow = SlowStats::new();
    for c in children.iter_mut() {
        let _ = c.stdin.take().map(|mut s| s.write_all(b"STOP\n"));
    }
    let mut ended = 0;
    while ended < nworkers {
        let Ok((_, line)) = rx.recv() else { break };
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.first().copied() {
            Some("RESULT") => {
                if let Some(r) = Tally::parse_result_line(&line) {
                    t.add(&r);
                }
            }
            Some("SLOW") => {
                slow.add_slow_line(&line);
            }
            Some(k @ ("H" | "W" | "M" | "S" | "U")) if parts.len() == 3 => {
                let v: u64 = parts[1].parse().unwrap_or(1);
                let c: u64 = parts[2].parse().unwrap_or(0);
                let h = match k {
                    "H" => &mut hist,
                    "W" => &mut rehome_w,
                    "S" => &mut slow.stale,
                    "U" => &mut slow.unkeyed_age,
                    _ => &mut rehome_m,
                };
                let _ = h.record_n(v.max(1), c);
            }
            Some("EOF") => ended += 1,
            _ => {}
        }
    }
    let welcomed = t.welcomed;
    let mut children_cpu = 0.0;
    for c in children.iter_mut() {
        let _ = c.wait();
    }
    children_cpu += self_cpu(libc::RUSAGE_CHILDREN);
    let loss = sent as i64 - t.received as i64;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!("clients        {} (welcomed {welcomed}) on {} node(s)", a.clients, a.common.node.len());
    println!(
        "published      {sent} msgs at {} msg/s for {}s (+{}s warm-up), payload {} B, late ticks {late_ticks}",
        a.rate, a.duration, a.warmup, a.shape.payload
    );
    println!(
        "received       {}  loss {loss}  wrong-user {}  duplicates {}  silent gaps {}  announced gaps {}  closed {}  reconnects {}  conflated {}",
        t.received, t.wrong_user, t.dups, t.silent_gaps, t.announced_gaps, t.closed, t.reconnects, t.conflated
    );
    if a.keys > 0 {
        let share = match a.fills_every {
            0 => "none unkeyed".to_owned(),
            m => format!("every {m}th message of a user unkeyed"),
        };
        println!("keys           {} per user, in turn ({share})", a.keys);
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    if slow.clients > 0 {
        println!(
            "slow clients   {} of {} reading {} B/s ({:.0}% of their stream's {:.0} B/s), SO_RCVBUF {} B asked",
            slow.clients,
            a.clients,
            slow_readers.bps,
            slow_readers.bps as f64 / a.stream_bps().max(1.0) * 100.0,
            a.stream_bps(),
            slow_readers.rcvbuf
        );
        println!(
            "slow clients   received {}  conflated {}  unkeyed lost {}  disconnects {}  reconnects {}",
            slow.received, slow.conflated, slow.unkeyed_lost, slow.closed, slow.reconnects
        );
        println!(
            "staleness (ms) p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (n={}, keyed messages at the slow clients: arrival − intended send time)",
            ms(&slow.stale, 0.5),
            ms(&slow.stale, 0.9),
            ms(&slow.stale, 0.99),
            slow.stale.max() as f64 / 1e6,
            slow.stale.len()
        );
        if !slow.unkeyed_age.is_empty() {
            println!(
                "unkeyed age (ms) p50 {:.1}  p99 {:.1}  max {:.1}  (n={}, unkeyed messages at the slow clients)",
                ms(&slow.unkeyed_age, 0.5),
                ms(&slow.unkeyed_age, 0.99),
                slow.unkeyed_age.max() as f64 / 1e6,
                slow.unkeyed_age.len()
            );
        }
    }
    println!(
        "latency (µs)   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}  max {:.1}  (n={}, from intended send time{})",
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        us(0.9999),
        hist.max() as f64 / 1000.0,
        hist.len(),
        if slow.clients > 0 { "; the fast clients" } else { "" }
    );
    if let Some((c0, s0, p0)) = &cpu_rec0 {
        for (i, pid) in a.node_pid.iter().enumerate() {
            if let (Some(x0), Some(x1)) = (c0[i], cpu1[i]) {
                let cpu = x1 - x0;
                let per = cpu / sent_recorded.max(1) as f64 * 1e6;
                let preempted = match (p0[i], preempted1[i]) {
                    (Some(p0), Some(p1)) => format!(", preempted {}/s", (p1 - p0) / a.duration.max(1)),
                    _ => String::new(),
                };
                println!(
                    "node pid {pid}   cpu {cpu:.2}s over {}s = {:.1}% of a core, {per:.2} µs per delivered message{preempted}",
                    a.duration,
                    cpu / a.duration as f64 * 100.0
                );
            }
        }
        println!(
            "probe          publisher cpu {:.2}s, workers cpu {:.2}s (whole run incl. connect)",
            self1 - s0,
            children_cpu
        );
    }
    if killed {
        println!(
            "rehome         {} clients re-welcomed after the kill: p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
            rehome_w.len(),
            ms(&rehome_w, 0.5),
            ms(&rehome_w, 0.99),
            rehome_w.max() as f64 / 1e6
        );
        println!(
            "rehome         {} clients got their first message after the kill: p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
            rehome_m.len(),
            ms(&rehome_m, 0.5),
            ms(&rehome_m, 0.99),
            rehome_m.max() as f64 / 1e6
        );
    }
    if let Some(p) = &a.hgrm {
        if let Err(e) = std::fs::write(p, plot::hgrm(&hist)) {
            eprintln!("probe: {}: {e}", p.display());
        }
    }
    if let Some(p) = &a.svg {
        let name = format!("{} clients, {} msg/s", a.clients, a.rate);
        if let Err(e) = std::fs::write(p, plot::svg(&a.title, &[(name, plot::series(&hist))])) {
            eprintln!("probe: {}: {e}", p.display());
        }
    }
    let node_cpu_us = cpu_rec0.as_ref().and_then(|(c0, _, _)| {
        let tot: f64 = a.node_pid.iter().enumerate().filter_map(|(i, _)| Some(cpu1[i]? - c0[i]?)).sum();
        (!a.node_pid.is_empty()).then(|| tot / sent_recorded.max(1) as f64 * 1e6)
    });
    let node_preempted = cpu_rec0.as_ref().map_or(f64::NAN, |(_, _, p0)| {
        let tot: u64 = (0..a.node_pid.len()).filter_map(|i| Some(preempted1[i]? - p0[i]?)).sum();
        tot as f64 / a.duration.max(1) as f64
    });
    let slow_kv = if slow.clients > 0 {
        format!(
            " slow={} slow_received={} slow_conflated={} slow_unkeyed_lost={} slow_closed={} stale_p50_ms={:.1} stale_p99_ms={:.1} stale_max_ms={:.1}",
            slow.clients,
            slow.received,
            slow.conflated,
            slow.unkeyed_lost,
            slow.closed,
            ms(&slow.stale, 0.5),
            ms(&slow.stale, 0.99),
            slow.stale.max() as f64 / 1e6
        )
    } else {
        String::new()
    };
    println!(
        "SUMMARY clients={} rate={} sent={sent} received={} loss={loss} wrong={} p50={:.1} p90={:.1} p99={:.1} p999={:.1} p9999={:.1} max={:.1} node_cpu_us_per_msg={:.3} node_preempted_per_s={:.0} conflated={}{slow_kv}",
        a.clients,
        a.rate,
        t.received,
        t.wrong_user,
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        us(0.9999),
        hist.max() as f64 / 1000.0,
        node_cpu_us.unwrap_or(f64::NAN),
        node_preempted,
        t.conflated
    );
    let mut code = 0;
    // A message conflated away is accounted for, not lost.
    let unexplained = loss - t.announced_gaps as i64 - t.conflated as i64;
    if unexplained != 0 || t.wrong_user != 0 || t.dups != 0 || t.silent_gaps != 0 {
        eprintln!("probe: FAIL: unannounced loss, duplicates, silent gaps or misrouted messages");
        code = 1;
    }
    if slow.unkeyed_lost > t.announced_gaps {
        eprintln!("probe: FAIL: slow clients lost {} unkeyed messages without notice", slow.unkeyed_lost);
        code = 1;
    }
    if let Some(slo) = a.slo_p99 {
        if us(0.99) > slo as f64 {
            eprintln!("probe: FAIL: p99 {:.1} µs over the SLO {slo} µs", us(0.99));
            code = 1;
        }
    }
    code
}
