//! `herald-decision-bench`: assignments per second from one decision server.
//!
//! By default it starts a decision server in-process on a thread pinned to
//! one core (`--server-cpu`, default 0) and runs the load from threads pinned
//! to another (`--client-cpu`, default 1); it then also reports the server
//! thread's own CPU time, so "assignments per server CPU-second" is known
//! even on a shared machine. With `--server ADDR` it loads an external
//! server instead (start it with `taskset -c 0 herald decision …`), and
//! reports the rate only.
//!
//! `--nodes` fake nodes heartbeat (signed, UDP) every 500 ms with a huge
//! capacity, so every request is answered with an ASSIGNMENT. Two modes:
//!
//! - `pipelined`: `--conns` persistent connections, each keeping `--depth`
//!   ASSIGN_REQUESTs in flight (latency = send to answer, queueing included);
//! - `per-conn`: `--threads` threads that each connect, ask, read the answer
//!   and close, as real clients do (latency = connect to answer).
//!
//! Latencies are printed as hdrhistogram percentiles.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;

use herald::cli::{parse_duration, read_secret};
use herald::decision::{Config, DecisionServer};
use herald::protocol::frame::{self as f, Frame};
use herald::protocol::{decode, Channel, Decoded};

#[derive(Parser)]
#[command(name = "herald-decision-bench", about = "Assignments per second from one decision server")]
struct Args {
    /// Load an external server at this TCP address instead of an in-process one.
    #[arg(long)]
    server: Option<String>,
    /// The external server's heartbeat (UDP) address (default: same as --server).
    #[arg(long)]
    heartbeat: Option<SocketAddr>,
    /// Cluster secret of the external server.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Fake nodes.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Length of each measured run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before each run.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    warmup: Duration,
    /// pipelined, per-conn or both.
    #[arg(long, default_value = "both")]
    mode: String,
    /// Pipelined: persistent connections (one thread each).
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Pipelined: requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Per-conn: client threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Pin the in-process server thread to this CPU (-1: don't pin).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    server_cpu: i32,
    /// Pin the load threads to this CPU (-1: don't pin).
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    client_cpu: i32,
    /// Send version-2 requests with a client token, and give the
    /// in-process server the client secret, so that it verifies each one
    /// (protocol.md §7.1, "Who asks").
    #[arg(long)]
    verify: bool,
}

/// The client secret of `--verify`.
const CLIENT_SECRET: &[u8] = b"decision-bench-client-secret";

fn pin(cpu: i32) {
    if cpu < 0 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it;
    // sched_setaffinity(0, …) applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// utime + stime of one thread of this process, in seconds.
fn thread_cpu(tid: i32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let v: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = v.get(11)?.parse::<u64>().ok()? + v.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Heartbeats for `n` fake nodes every 500 ms until `stop`.
fn fake_nodes(
    n: usize,
    to: SocketAddr,
    secret: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let inc = unix_ms();
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            for i in 0..n {
                let id = format!("bench-node-{i}");
                let ep = format!("10.0.0.{}:7400", i + 1);
                let mut v = Vec::new();
                Frame::Heartbeat(f::Heartbeat {
                    version: 1,
                    node_id: id.as_bytes(),
                    incarnation: inc,
                    seq,
                    sent_at_ms: unix_ms(),
                    client_endpoint: ep.as_bytes(),
                    ingest_endpoint: b"",
                    connections: 0,
                    capacity: 1_000_000_000,
                    flags: 0,
                    msgs_in_per_s: 0,
                    msgs_out_per_s: 0,
                    cpu_permille: 0,
                })
                .encode_signed(&mut v, &secret);
                let _ = sock.send_to(&v, to);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

/// One ASSIGN_REQUEST: version 1 without a token, or (`verify`) version 2
/// with a token for its user that verifies under [`CLIENT_SECRET`].
fn request(verify: bool) -> Vec<u8> {
    let token = if verify {
        herald::protocol::token::mint(CLIENT_SECRET, b"bench-user", unix_ms() / 1000 + 3600).expect("token")
    } else {
        String::new()
    };
    let version = if verify { 2 } else { 1 };
    Frame::AssignRequest(f::AssignRequest {
        version,
        user: b"bench-user",
        max_results: 3,
        token: token.as_bytes(),
    })
    .to_vec()
}

/// Counts whole frames at the front of `buf`, checking each is an
/// ASSIGNMENT; returns (frames, bytes used).
fn answers(buf: &[u8]) -> (usize, usize) {
    let (mut n, mut at) = (0, 0);
    while let Ok(Decoded::Frame(fr, len)) = decode(&buf[at..], Channel::FromDecision) {
        assert!(matches!(fr, Frame::Assignment(_)), "expected ASSIGNMENT, got {fr:?}");
        n += 1;
        at += len;
    }
    (n, at)
}

struct Run {
    done: Arc<AtomicU64>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

fn pipelined_worker(addr: String, depth: usize, cpu: i32, r: &Run, verify: bool) -> Histogram<u64> {
    pin(cpu);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let req = request(verify);
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(depth);
    let mut out = Vec::with_capacity(req.len() * depth);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut want = depth;
    while !r.stop.load(Ordering::Relaxed) {
        out.clear();
        let now = Instant::now();
        for _ in 0..want {
            out.extend_from_slice(&req);
            sent.push_back(now);
        }
        s.write_all(&out).expect("write");
        want = 0;
        while want == 0 {
            let n = s.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed");
            buf.extend_from_slice(&chunk[..n]);
            let (k, used) = answers(&buf);
            buf.drain(..used);
            let now = Instant::now();
            let measuring = r.measuring.load(Ordering::Relaxed);
            for _ in 0..k {
                let t = sent.pop_front().expect("an answer per request");
                if measuring {
                    let _ = h.record(now.duration_since(t).as_micros().max(1) as u64);
                }
            }
            if measuring {
                r.done.fetch_add(k as u64, Ordering::Relaxed);
            }
            want = k;
        }
    }
    h
}

fn per_conn_worker(addr: SocketAddr, cpu: i32, r: &Run, verify: bool) -> Histogram<u64> {
    pin(cpu);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let req = request(verify);
    let mut buf = [0u8; 4096];
    while !r.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let mut s = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("connect: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        s.write_all(&req).expect("write");
        let mut have = 0;
        loop {
            let n = s.read(&mut buf[have..]).expect("read");
            assert!(n > 0, "server closed without answering");
            have += n;
            if answers(&buf[..have]).0 == 1 {
                break;
            }
        }
        drop(s);
        if r.measuring.load(Ordering::Relaxed) {
            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
            r.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    h
}

fn report(name: &str, n: u64, secs: f64, h: &Histogram<u64>, server_cpu: Option<f64>) {
    let rate = n as f64 / secs;
    println!("{name}: {n} assignments in {secs:.2} s = {rate:.0}/s");
    if let Some(cpu) = server_cpu {
        println!(
            "{name}: server thread CPU {cpu:.2} s ({:.0} % of one core) = {:.0} assignments per server CPU-second",
            100.0 * cpu / secs,
            n as f64 / cpu.max(1e-9)
        );
    }
    println!(
        "{name}: latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

fn main() {
    let a = Args::parse();
    let stop_nodes = Arc::new(AtomicBool::new(false));
    let server_tid = Arc::new(AtomicI32::new(0));
    let mut in_process = None;
    let (tcp, udp, secret) = match &a.server {
        Some(s) => {
            let Some(f) = &a.cluster_secret_file else {
                eprintln!("--server needs --cluster-secret-file");
                std::process::exit(2);
            };
            let secret = read_secret(f).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(2)
            });
            let tcp: SocketAddr = s.parse().expect("--server must be ip:port");
            (tcp, a.heartbeat.unwrap_or(tcp), secret)
        }
        None => {
            let secret = b"decision-bench-cluster-secret".to_vec();
            let server = DecisionServer::bind(Config {
                listen: "127.0.0.1:0".parse().expect("addr"),
                heartbeat: "127.0.0.1:0".parse().expect("addr"),
                cluster_secret: secret.clone(),
                admin_secret: b"decision-bench-admin-secret".to_vec(),
                assign: herald::decision::asker::Policy {
                    client_secret: if a.verify { CLIENT_SECRET.to_vec() } else { Vec::new() },
                    require_token: a.verify,
                },
                log_every: Duration::ZERO,
                ..Config::default()
            })
            .expect("bind");
            let (tcp, udp, handle) = (server.tcp_addr(), server.udp_addr(), server.shutdown_handle());
            let (cpu, tid) = (a.server_cpu, server_tid.clone());
            let t = std::thread::spawn(move || {
                pin(cpu);
                tid.store(gettid(), Ordering::SeqCst);
                server.run()
            });
            in_process = Some((handle, t));
            (tcp, udp, secret)
        }
    };
    let nodes = fake_nodes(a.nodes, udp, secret, stop_nodes.clone());
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "decision server {tcp} ({}), {} fake nodes, {}, runs of {:?} after {:?} warm-up",
        if in_process.is_some() {
            let cpu = |c: i32| if c < 0 { "any CPU".to_string() } else { format!("CPU {c}") };
            format!("in-process, server thread on {}, load on {}", cpu(a.server_cpu), cpu(a.client_cpu))
        } else {
            "external".to_string()
        },
        a.nodes,
        if a.verify { "version-2 requests with a verified token" } else { "version-1 requests, no token" },
        a.duration,
        a.warmup
    );
    let tid = server_tid.load(Ordering::SeqCst);
    let modes: Vec<&str> = match a.mode.as_str() {
        "both" => vec!["pipelined", "per-conn"],
        m => vec![m],
    };
    for mode in modes {
        let r = Run {
            done: Arc::new(AtomicU64::new(0)),
            measuring: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let hists = std::thread::scope(|sc| {
            let workers: Vec<_> = match mode {
                "pipelined" => (0..a.conns)
                    .map(|_| {
                        let addr = tcp.to_string();
                        let r = &r;
                        let (depth, cpu, verify) = (a.depth, a.client_cpu, a.verify);
                        sc.spawn(move || pipelined_worker(addr, depth, cpu, r, verify))
                    })
                    .collect(),
                "per-conn" => (0..a.threads)
                    .map(|_| {
                        let r = &r;
                        let (cpu, verify) = (a.client_cpu, a.verify);
                        sc.spawn(move || per_conn_worker(tcp, cpu, r, verify))
                    })
                    .collect(),
                other => {
                    eprintln!("unknown mode {other}: use pipelined, per-conn or both");
                    std::process::exit(2);
                }
            };
            std::thread::sleep(a.warmup);
            let cpu0 = (tid != 0).then(|| thread_cpu(tid)).flatten();
            let t0 = Instant::now();
            r.measuring.store(true, Ordering::SeqCst);
            std::thread::sleep(a.duration);
            r.measuring.store(false, Ordering::SeqCst);
            let secs = t0.elapsed().as_secs_f64();
            let n = r.done.load(Ordering::SeqCst);
            let cpu1 = (tid != 0).then(|| thread_cpu(tid)).flatten();
            r.stop.store(true, Ordering::SeqCst);
            let hs: Vec<Histogram<u64>> = workers.into_iter().map(|w| w.join().expect("worker")).collect();
            (n, secs, cpu0.zip(cpu1).map(|(a, b)| b - a), hs)
        });
        let (n, secs, cpu, hs) = hists;
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        for h in &hs {
            let _ = all.add(h);
        }
        let name = match mode {
            "pipelined" => format!("pipelined ({} conns x depth {})", a.conns, a.depth),
            _ => format!("per-conn ({} threads, connect/ask/close)", a.threads),
        };
        report(&name, n, secs, &all, cpu);
    }
    stop_nodes.store(true, Ordering::SeqCst);
    let _ = nodes.join();
    if let Some((handle, t)) = in_process {
        handle.trigger();
        if let Ok(Ok(st)) = t.join() {
            println!(
                "server stats: {} assignments, {} no capacity, {} heartbeats ({} dropped), closes {:?}",
                st.assignments,
                st.no_capacity,
                st.heartbeats,
                st.heartbeats_rejected(),
                st.closes
            );
        }
    }
}
