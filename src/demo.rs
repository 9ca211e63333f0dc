//! `herald demo`: a whole cluster on loopback in one process, showing
//! herald doing its job within a minute of cloning it.
//!
//! It starts 2 decision servers and N nodes (threads in this process), a
//! publisher that simulates a forex broker's personal traffic (each user
//! gets 2–4 messages a second: quotes at the user's own spread, fills and
//! balance changes) through every node in turn, and a swarm of simulated
//! clients that ask the decision servers for a node, check that every
//! message is theirs, in order, exactly once, and measure latency from the
//! intended send time. It prints one status line a second and a summary,
//! and fails if any message went to the wrong user or was lost without the
//! protocol saying so. `--chaos` kills one node halfway and shows its
//! clients being re-homed.

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
use crate::swarm::{mono_ns, user_name, Stamp, Swarm, SwarmConfig, Tally};

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
}

impl DemoReport {
    /// True when nothing went to the wrong user and nothing was lost silently.
    pub fn ok(&self) -> bool {
        self.tally.wrong_user == 0
            && self.tally.dups == 0
            && self.tally.silent_gaps == 0
            && self.unannounced_loss == 0
    }
}

fn secret(label: &str) -> Vec<u8> {
    let mut v = format!("demo-{label}-").into_bytes();
    v.extend_from_slice(format!("{:x}", mono_ns() ^ (std::process::id() as u64) << 20).as_bytes());
    v
}

const QUOTE_PAIRS: [&str; 6] = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF", "EURGBP"];

/// Writes a broker-like personal message for user `u` after the stamp.
fn broker_payload(buf: &mut Vec<u8>, stamp: Stamp, u: usize) {
    buf.clear();
    buf.resize(Stamp::LEN, 0);
    stamp.write(buf);
    let n = stamp.msg as usize;
    let mut s = String::with_capacity(96);
    match n % 10 {
        0 => {
            let _ = write!(
                s,
                r#"{{"type":"balance","user":"{}","usd":{:.2}}}"#,
                user_name(u),
                100_000.0 + (n as f64) * 3.5
            );
        }
        1 | 2 => {
            let _ = write!(
                s,
                r#"{{"type":"fill","user":"{}","order":{},"pair":"{}","qty":100000}}"#,
                user_name(u),
                n,
                QUOTE_PAIRS[n % QUOTE_PAIRS.len()]
            );
        }
        _ => {
            // Each user has its own spread.
            let spread = 0.00005 + (u % 7) as f64 * 0.00001;
            let mid = 1.08 + ((n * 37 + u) % 100) as f64 * 0.00001;
            let _ = write!(
                s,
                r#"{{"type":"quote","user":"{}","pair":"{}","bid":{:.5},"ask":{:.5}}}"#,
                user_name(u),
                QUOTE_PAIRS[(u + n) % QUOTE_PAIRS.len()],
                mid - spread / 2.0,
                mid + spread / 2.0
            );
        }
    }
    buf.extend_from_slice(s.as_bytes());
}

struct Cluster {
    decisions: Vec<(decision::ShutdownHandle, std::thread::JoinHandle<io::Result<decision::Stats>>, String)>,
    nodes: Vec<NodeRun>,
}

struct NodeRun {
    id: String,
    client: String,
    ingest: String,
    handle: node::ShutdownHandle,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

fn start_cluster(
    n_nodes: usize,
    client_secret: &[u8],
    publisher_secret: &[u8],
    per_node: usize,
) -> io::Result<Cluster> {
    let cluster_secret = secret("cluster");
    let admin_secret = secret("admin");
    let mut decisions = Vec::new();
    let mut endpoints = Vec::new();
    for _ in 0..2 {
        let d = DecisionServer::bind(decision::Config {
            listen: "127.0.0.1:0".parse().expect("valid"),
            heartbeat: "127.0.0.1:0".parse().expect("valid"),
            cluster_secret: cluster_secret.clone(),
            admin_secret: admin_secret.clone(),
            state_file: None,
            log_every: Duration::ZERO,
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
            ..node::Config::default()
        })?;
        let (client, ingest) = (node.client_addr().to_string(), node.ingest_addr().to_string());
        let handle = node.shutdown_handle();
        let thread = Some(std::thread::spawn(move || node.run()));
        nodes.push(NodeRun { id, client, ingest, handle, thread });
    }
    Ok(Cluster { decisions, nodes })
}

impl Cluster {
    fn decision_tcp(&self) -> Vec<String> {
        self.decisions.iter().map(|d| d.2.clone()).collect()
    }

    fn wait_registered(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let all = self.decisions.iter().all(|d| {
                decision::client::nodes(std::slice::from_ref(&d.2), Duration::from_secs(1))
                    .map(|v| v.len() == self.nodes.len())
                    .unwrap_or(false)
            });
            if all {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
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

/// Runs the demo, printing status lines to stdout; returns the report.
pub fn run(cfg: DemoConfig) -> io::Result<DemoReport> {
    let client_secret = secret("client");
    let publisher_secret = secret("publisher");
    let n_nodes = cfg.nodes.max(if cfg.chaos { 2 } else { 1 });
    let per_node = cfg.clients.div_ceil(n_nodes);
    let cluster = start_cluster(n_nodes, &client_secret, &publisher_secret, cfg.clients)?;
    println!(
        "herald demo: {} decision servers and {n_nodes} nodes on loopback; {} clients; {}",
        cluster.decisions.len(),
        cfg.clients,
        if cfg.chaos { "chaos: one node will be killed halfway" } else { "no chaos" }
    );
    let _ = per_node;
    if !cluster.wait_registered() {
        cluster.stop();
        return Err(io::Error::other("nodes never registered with the decision servers"));
    }

    let mut swarm = Swarm::new(SwarmConfig {
        first: 0,
        count: cfg.clients,
        decision: cluster.decision_tcp(),
        secret: client_secret.clone(),
        reconnect: true,
        ..SwarmConfig::default()
    })?;
    let t0 = Instant::now();
    let welcomed = swarm.connect_all(Duration::from_secs(60), |_| {});
    println!(
        "connected {welcomed}/{} clients in {:.2}s through the decision servers",
        cfg.clients,
        t0.elapsed().as_secs_f64()
    );

    // Presence travels between nodes asynchronously; wait until every
    // publishing node routes to a user on every other node. (A short payload
    // carries no stamp, so the swarm ignores it.)
    let cred =
        crate::protocol::token::mint(&publisher_secret, b"demo-broker", u32::MAX as u64).expect("name");
    let t_mesh = Instant::now();
    for x in &cluster.nodes {
        let mut p = Publisher::connect(&x.ingest, &cred).map_err(|e| io::Error::other(e.to_string()))?;
        for y in cluster.nodes.iter().filter(|y| y.id != x.id) {
            let Some(u) = swarm.users_on(&y.client).next() else { continue };
            loop {
                let r = p
                    .publish_confirmed(user_name(u).as_bytes(), b"mesh?")
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if r.forwarded > 0 {
                    break;
                }
                if t_mesh.elapsed() > Duration::from_secs(10) {
                    return Err(io::Error::other("the node mesh never formed"));
                }
                swarm.step(Duration::from_millis(20));
            }
        }
    }
    println!("mesh formed: every node routes to every other ({:.2}s)", t_mesh.elapsed().as_secs_f64());

    // The publisher thread: 2–4 messages a second per user, paced in 1 ms ticks.
    let victim = cfg.chaos.then(|| cluster.nodes[0].id.clone());
    let ingest: Vec<String> =
        cluster.nodes.iter().filter(|n| Some(&n.id) != victim.as_ref()).map(|n| n.ingest.clone()).collect();
    let published = Arc::new(AtomicU64::new(0));
    let pub_done = Arc::new(AtomicBool::new(false));
    let start_ns = mono_ns() + 20_000_000;
    swarm.record_after = start_ns;
    let publisher = {
        let (published, pub_done, stop, cred) =
            (published.clone(), pub_done.clone(), cfg.stop.clone(), cred.clone());
        let (clients, duration, rate) = (cfg.clients, cfg.duration, cfg.rate);
        std::thread::spawn(move || -> io::Result<()> {
            let r = publish_loop(&ingest, &cred, clients, duration, rate, start_ns, &published, &stop);
            pub_done.store(true, Ordering::SeqCst);
            r
        })
    };

    let mut last_print = Instant::now();
    let mut last_received = 0u64;
    let mut interval = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let mut prev = interval.clone();
    let mut seen = 0u64;
    let mut killed_at: Option<Instant> = None;
    let mut rehomed_reported = false;
    let mut tail_until: Option<Instant> = None;
    loop {
        swarm.step(Duration::from_millis(5));
        let now = Instant::now();
        if let (Some(v), None) = (&victim, killed_at) {
            if now.saturating_duration_since(t0) >= cfg.duration / 2 + Duration::from_millis(500) {
                if let Some(n) = cluster.nodes.iter().find(|n| &n.id == v) {
                    let held = swarm.per_node().iter().find(|(e, _)| *e == n.client).map_or(0, |x| x.1);
                    println!("chaos: killing node {v} (holding {held} clients)");
                    n.handle.kill();
                    killed_at = Some(now);
                }
            }
        }
        if let Some(k) = killed_at {
            if !rehomed_reported
                && swarm.live == cfg.clients
                && now.saturating_duration_since(k) > Duration::from_millis(200)
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
            // Latency over the last second: the difference of cumulative histograms.
            interval.reset();
            let _ = interval.add(&swarm.hist);
            let _ = interval.subtract(&prev);
            prev.reset();
            let _ = prev.add(&swarm.hist);
            let secs = now.saturating_duration_since(last_print).as_secs_f64();
            let rate = (swarm.tally.received - last_received) as f64 / secs;
            last_received = swarm.tally.received;
            let per: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| {
                    let c = swarm.per_node().iter().find(|(e, _)| *e == n.client).map_or(0, |x| x.1);
                    format!("{}:{c}", n.id)
                })
                .collect();
            let q = |p: f64| interval.value_at_quantile(p) as f64 / 1000.0;
            println!(
                "t={:>3.0}s  clients {}  {:>7.0} msg/s  latency p50 {:>6.0}µs p99 {:>6.0}µs p99.9 {:>6.0}µs  wrong-user {}  silent-loss {}  reconnects {}",
                now.saturating_duration_since(t0).as_secs_f64(),
                per.join(" "),
                rate,
                q(0.5),
                q(0.99),
                q(0.999),
                swarm.tally.wrong_user,
                swarm.tally.silent_gaps,
                swarm.tally.reconnects
            );
            seen += 1;
            last_print = now;
        }
        if pub_done.load(Ordering::SeqCst) && tail_until.is_none() {
            tail_until = Some(now + Duration::from_millis(1500));
        }
        if tail_until.is_some_and(|t| now >= t) {
            break;
        }
    }
    let _ = seen;
    let pub_result = publisher.join().map_err(|_| io::Error::other("publisher panicked"))?;
    cluster.stop();
    pub_result?;
    let published = published.load(Ordering::SeqCst);
    let h = &swarm.hist;
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    let t = swarm.tally;
    Ok(DemoReport {
        published,
        tally: t,
        latency_us: [q(0.5), q(0.9), q(0.99), q(0.999), h.max() as f64 / 1000.0],
        unannounced_loss: published as i64 - t.received as i64 - t.announced_gaps as i64,
    })
}

#[allow(clippy::too_many_arguments)]
fn publish_loop(
    ingest: &[String],
    cred: &str,
    clients: usize,
    duration: Duration,
    rate: Option<u64>,
    start_ns: u64,
    published: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut pubs: Vec<Publisher> = ingest
        .iter()
        .map(|i| Publisher::connect(i, cred).map_err(|e| io::Error::other(e.to_string())))
        .collect::<io::Result<_>>()?;
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
    let mut payload = Vec::with_capacity(160);
    let mut bufs: Vec<Vec<u8>> = vec![Vec::with_capacity(64 * 1024); pubs.len()];
    let ticks = duration.as_millis() as u64;
    let mut rr = 0usize;
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
        let mut writers: Vec<Option<BatchWriter>> = (0..pubs.len()).map(|_| None).collect();
        for &u in &due {
            let u = u as usize;
            broker_payload(&mut payload, Stamp { sent_ns: intended, user: u as u32, msg: next_msg[u] }, u);
            next_msg[u] += 1;
            rr = (rr + 1) % pubs.len();
            let b = &mut bufs[rr];
            let w = writers[rr].get_or_insert_with(|| BatchWriter::start(b, 0, 0));
            if !w.push(b, names[u].as_bytes(), b"", &payload) {
                if let Some(full) = writers[rr].take() {
                    full.finish(b);
                }
                let mut w2 = BatchWriter::start(b, 0, 0);
                w2.push(b, names[u].as_bytes(), b"", &payload);
                writers[rr] = Some(w2);
            }
            wheel[(slot + period_ms[u] as usize) % horizon].push(u as u32);
        }
        for (i, w) in writers.into_iter().enumerate() {
            if let Some(w) = w {
                w.finish(&mut bufs[i]);
                pubs[i].write_raw(&bufs[i]).map_err(|e| io::Error::other(e.to_string()))?;
                bufs[i].clear();
            }
        }
        published.fetch_add(due.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}
