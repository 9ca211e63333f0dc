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
//! `--plain` drives `herald-forwarder` (no auth: the token is the user id).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod plot;
use hdrhistogram::Histogram;

use herald::cli::read_secret;
use herald::protocol::frame::{self as f, BatchWriter, Frame};
use herald::protocol::{decode, token, Channel, Decoded, VERSION};

#[derive(Parser)]
#[command(about = "herald latency probe and load generator")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Node client endpoints; clients are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    node: Vec<SocketAddr>,
    /// Client-token secret file (not needed with --plain).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Target is herald-forwarder: no auth, the token is the user id.
    #[arg(long)]
    plain: bool,
    /// Local source addresses to spread connections over (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',')]
    source: Vec<std::net::IpAddr>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a paced load and report latency, loss and CPU.
    Load {
        #[command(flatten)]
        common: Common,
        /// Node ingest endpoints; messages are published round-robin over them.
        #[arg(long, value_delimiter = ',', required = true)]
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
        /// Payload bytes (at least 16).
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Most connections per worker process.
        #[arg(long, default_value_t = 15_000)]
        per_worker: usize,
        /// Worker processes (default: enough for --per-worker, at least 2).
        #[arg(long)]
        workers: Option<usize>,
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
    },
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

/// CLOCK_MONOTONIC in ns: the same clock in every process on the machine.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn user_name(i: usize) -> String {
    format!("u{i}")
}

fn main() {
    let a = Args::parse();
    let code = match a.cmd {
        Cmd::Worker { common, first, count, record_after } => worker(common, first, count, record_after),
        Cmd::Load {
            common,
            ingest,
            publisher_secret_file,
            clients,
            rate,
            duration,
            warmup,
            payload,
            per_worker,
            workers,
            node_pid,
            slo_p99,
            hgrm,
            svg,
            title,
        } => load(LoadArgs {
            common,
            ingest,
            publisher_secret_file,
            clients,
            rate,
            duration,
            warmup,
            payload: payload.max(16),
            per_worker,
            workers,
            node_pid,
            slo_p99,
            hgrm,
            svg,
            title,
        }),
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
    std::process::exit(code);
}

// ------------------------------------------------------------------ worker

struct WConn {
    sock: mio::net::TcpStream,
    user: u32,
    welcomed: bool,
    next_msg: u32,
    rbuf: Vec<u8>,
}

#[derive(Default)]
struct Tally {
    received: u64,
    wrong_user: u64,
    dups: u64,
    gaps: u64,
    closed: u64,
}

fn connect_one(node: SocketAddr, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    match source {
        None => TcpStream::connect(node),
        Some(ip) => {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::for_address(node), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::new(ip, 0).into())?;
            s.connect(&node.into())?;
            Ok(s.into())
        }
    }
}

fn worker(c: Common, first: usize, count: usize, record_after: u64) -> i32 {
    let secret = if c.plain {
        Vec::new()
    } else {
        match c.secret_file.as_deref().map(read_secret) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                eprintln!("worker: {e}");
                return 2;
            }
            None => {
                eprintln!("worker: --secret-file is required without --plain");
                return 2;
            }
        }
    };
    // stdin: "START <record_after_ns>" then "STOP" (or EOF).
    let stop = Arc::new(AtomicBool::new(false));
    let record_from = Arc::new(AtomicU64::new(if record_after == 0 { u64::MAX } else { record_after }));
    {
        let (stop, record_from) = (stop.clone(), record_from.clone());
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if let Some(ns) = line.strip_prefix("START ") {
                    record_from.store(ns.trim().parse().unwrap_or(0), Ordering::SeqCst);
                } else {
                    break;
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
    }
    let mut poll = mio::Poll::new().expect("poll");
    let mut conns: Vec<WConn> = Vec::with_capacity(count);
    let exp =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()) + 86_400;
    let mut hello = Vec::with_capacity(256);
    for i in 0..count {
        let u = first + i;
        let node = c.node[u % c.node.len()];
        let src = (!c.source.is_empty()).then(|| c.source[u % c.source.len()]);
        let name = user_name(u);
        let tok = if c.plain {
            name.clone()
        } else {
            token::mint(&secret, name.as_bytes(), exp).expect("valid user")
        };
        hello.clear();
        Frame::Hello(f::Hello {
            min_version: VERSION,
            max_version: VERSION,
            token: tok.as_bytes(),
            agent: b"herald-probe",
            resume: None,
        })
        .encode(&mut hello);
        let s = loop {
            match connect_one(node, src) {
                Ok(s) => break s,
                Err(e) => {
                    eprintln!("worker: connect {node}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let _ = s.set_nodelay(true);
        (&s).write_all(&hello).expect("hello");
        s.set_nonblocking(true).expect("nonblocking");
        let mut sock = mio::net::TcpStream::from_std(s);
        poll.registry().register(&mut sock, mio::Token(i), mio::Interest::READABLE).expect("register");
        conns.push(WConn { sock, user: u as u32, welcomed: c.plain, next_msg: 0, rbuf: Vec::new() });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("hist");
    let mut t = Tally::default();
    let mut events = mio::Events::with_capacity(4096);
    let mut scratch = vec![0u8; 256 * 1024];
    let mut welcomed = if c.plain { count } else { 0 };
    let mut announced = false;
    let mut out = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if !announced && welcomed == count {
            println!("READY {count}");
            let _ = std::io::stdout().flush();
            announced = true;
        }
        if poll.poll(&mut events, Some(Duration::from_millis(50))).is_err() {
            continue;
        }
        let record_after = record_from.load(Ordering::Relaxed);
        for ev in events.iter() {
            let i = ev.token().0;
            loop {
                let wc = &mut conns[i];
                match wc.sock.read(&mut scratch) {
                    Ok(0) => {
                        t.closed += 1;
                        let _ = poll.registry().deregister(&mut wc.sock);
                        break;
                    }
                    Ok(n) => {
                        let now = mono_ns();
                        let mut buf = std::mem::take(&mut wc.rbuf);
                        let data: &[u8] = if buf.is_empty() {
                            &scratch[..n]
                        } else {
                            buf.extend_from_slice(&scratch[..n]);
                            &buf
                        };
                        let mut at = 0;
                        while let Ok(Decoded::Frame(fr, used)) = decode(&data[at..], Channel::ToClient) {
                            at += used;
                            match fr {
                                Frame::Deliver(d) if d.payload.len() >= 16 => {
                                    let sent = u64::from_be_bytes(d.payload[0..8].try_into().unwrap());
                                    let user = u32::from_be_bytes(d.payload[8..12].try_into().unwrap());
                                    let msg = u32::from_be_bytes(d.payload[12..16].try_into().unwrap());
                                    t.received += 1;
                                    if user != wc.user {
                                        t.wrong_user += 1;
                                    }
                                    if msg < wc.next_msg {
                                        t.dups += 1;
                                    } else {
                                        if msg > wc.next_msg {
                                            t.gaps += (msg - wc.next_msg) as u64;
                                        }
                                        wc.next_msg = msg + 1;
                                    }
                                    if sent >= record_after {
                                        let _ = hist.record(now.saturating_sub(sent).max(1));
                                    }
                                }
                                Frame::Welcome(_) if !wc.welcomed => {
                                    wc.welcomed = true;
                                    welcomed += 1;
                                }
                                Frame::Ping(p) => {
                                    out.clear();
                                    Frame::Pong(p).encode(&mut out);
                                    let _ = wc.sock.write(&out);
                                }
                                Frame::Error(e) => {
                                    eprintln!("worker: node error {}", e.code);
                                }
                                _ => {}
                            }
                        }
                        let rest = data[at..].to_vec();
                        wc.rbuf = rest;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        t.closed += 1;
                        let _ = poll.registry().deregister(&mut wc.sock);
                        break;
                    }
                }
            }
        }
    }
    let mut o = std::io::stdout().lock();
    let _ =
        writeln!(o, "RESULT {} {} {} {} {} {}", t.received, t.wrong_user, t.dups, t.gaps, t.closed, welcomed);
    for v in hist.iter_recorded() {
        let _ = writeln!(o, "H {} {}", v.value_iterated_to(), v.count_at_value());
    }
    let _ = writeln!(o, "END");
    let _ = o.flush();
    0
}

// ------------------------------------------------------------------ load

struct LoadArgs {
    common: Common,
    ingest: Vec<SocketAddr>,
    publisher_secret_file: Option<PathBuf>,
    clients: usize,
    rate: u64,
    duration: u64,
    warmup: u64,
    payload: usize,
    per_worker: usize,
    workers: Option<usize>,
    node_pid: Vec<u32>,
    slo_p99: Option<u64>,
    hgrm: Option<PathBuf>,
    svg: Option<PathBuf>,
    title: String,
}

/// Resident set size of a process, KiB.
fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

fn self_cpu(who: i32) -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct we pass.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn load(a: LoadArgs) -> i32 {
    let exe = std::env::current_exe().expect("own path");
    let nworkers = a.workers.unwrap_or_else(|| a.clients.div_ceil(a.per_worker).max(2)).max(1);
    let per = a.clients.div_ceil(nworkers);
    let warm_ns = a.warmup * 1_000_000_000;
    let t_connect = Instant::now();
    let rss0: Vec<Option<u64>> = a.node_pid.iter().map(|&p| proc_rss_kib(p)).collect();
    // Publishing starts after every worker is READY; the recording threshold
    // is fixed now and passed down, so it must be in the future of READY.
    let mut children = Vec::new();
    let mut first = 0;
    // Start time is decided after READY; workers get it through record_after
    // computed relative to the moment they are spawned plus a generous bound.
    let pending_record_after = u64::MAX;
    let _ = pending_record_after;
    for w in 0..nworkers {
        let count = per.min(a.clients - first);
        if count == 0 {
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg("--node")
            .arg(a.common.node.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","))
            .arg("--first")
            .arg(first.to_string())
            .arg("--count")
            .arg(count.to_string());
        if a.common.plain {
            cmd.arg("--plain");
        }
        if let Some(s) = &a.common.secret_file {
            cmd.arg("--secret-file").arg(s);
        }
        if !a.common.source.is_empty() {
            cmd.arg("--source")
                .arg(a.common.source.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","));
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let child = cmd.spawn().expect("spawn worker");
        children.push(child);
        first += count;
        let _ = w;
    }
    // Wait for READY from each worker, showing progress.
    let mut readers: Vec<BufReader<std::process::ChildStdout>> =
        children.iter_mut().map(|c| BufReader::new(c.stdout.take().unwrap())).collect();
    let nreaders = readers.len();
    for (i, r) in readers.iter_mut().enumerate() {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || !line.starts_with("READY") {
            eprintln!("probe: worker {i} failed to connect");
            return 1;
        }
        eprint!("\rprobe: connected {}/{nreaders} workers", i + 1);
    }
    eprintln!(
        "\rprobe: {} clients connected in {:.2}s over {} workers",
        a.clients,
        t_connect.elapsed().as_secs_f64(),
        readers.len()
    );

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
    let pub_secret = if a.common.plain {
        Vec::new()
    } else {
        match a.publisher_secret_file.as_deref().map(read_secret) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                eprintln!("probe: {e}");
                return 2;
            }
            None => {
                eprintln!("probe: --publisher-secret-file is required without --plain");
                return 2;
            }
        }
    };
    let mut pubs: Vec<TcpStream> = Vec::new();
    for addr in &a.ingest {
        let mut s = TcpStream::connect(addr).expect("connect ingest");
        s.set_nodelay(true).unwrap();
        if !a.common.plain {
            let cred = token::mint(&pub_secret, b"herald-probe", u32::MAX as u64).unwrap();
            let h = Frame::PubHello(f::PubHello {
                min_version: VERSION,
                max_version: VERSION,
                credential: cred.as_bytes(),
                agent: b"herald-probe",
            })
            .to_vec();
            s.write_all(&h).unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap_or(0);
            match decode(&buf[..n], Channel::FromIngest) {
                Ok(Decoded::Frame(Frame::PubWelcome(_), _)) => {}
                other => {
                    eprintln!("probe: publisher handshake failed: {other:?}");
                    return 1;
                }
            }
        }
        pubs.push(s);
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
    let names: Vec<String> = (0..a.clients).map(user_name).collect();
    let mut next_msg = vec![0u32; a.clients];
    let mut sent: u64 = 0;
    let mut sent_recorded: u64 = 0;
    let mut owed = 0.0f64;
    let per_tick = a.rate as f64 / 1000.0;
    let mut tick: u64 = 0;
    let mut user_rr = 0usize;
    let mut bufs: Vec<Vec<u8>> = vec![Vec::with_capacity(256 * 1024); pubs.len()];
    let mut payload = vec![0u8; a.payload];
    let mut late_ticks = 0u64;
    let mut cpu_rec0: Option<(Vec<Option<f64>>, f64)> = None;
    loop {
        let intended = start_ns + tick * 1_000_000;
        if intended >= start_ns + total_ns {
            break;
        }
        if cpu_rec0.is_none() && intended >= record_after {
            cpu_rec0 = Some((a.node_pid.iter().map(|&p| proc_cpu(p)).collect(), self_cpu(libc::RUSAGE_SELF)));
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
        payload[0..8].copy_from_slice(&intended.to_be_bytes());
        let mut writers: Vec<Option<BatchWriter>> = (0..pubs.len()).map(|_| None).collect();
        for j in 0..k {
            let u = user_rr;
            user_rr = (user_rr + 1) % a.clients;
            let p = (sent + j) as usize % pubs.len();
            payload[8..12].copy_from_slice(&(u as u32).to_be_bytes());
            payload[12..16].copy_from_slice(&next_msg[u].to_be_bytes());
            next_msg[u] += 1;
            let name = &names[u];
            let b = &mut bufs[p];
            let w = writers[p].get_or_insert_with(|| BatchWriter::start(b, 0, 0));
            if !w.push(b, name.as_bytes(), b"", &payload) {
                let full = writers[p].take().unwrap();
                full.finish(b);
                let mut w2 = BatchWriter::start(b, 0, 0);
                w2.push(b, name.as_bytes(), b"", &payload);
                writers[p] = Some(w2);
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
        if tick % 1000 == 0 {
            eprint!("\rprobe: t={}s sent={sent}", tick / 1000);
        }
    }
    let cpu1: Vec<Option<f64>> = a.node_pid.iter().map(|&p| proc_cpu(p)).collect();
    let self1 = self_cpu(libc::RUSAGE_SELF);
    eprintln!();
    // Let the last messages arrive, then stop the workers.
    std::thread::sleep(Duration::from_millis(1500));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut t = Tally::default();
    let mut welcomed = 0u64;
    for c in children.iter_mut() {
        let _ = c.stdin.take().map(|mut s| s.write_all(b"STOP\n"));
    }
    for r in readers.iter_mut() {
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.first().copied() {
                Some("RESULT") => {
                    let n: Vec<u64> = parts[1..].iter().map(|x| x.parse().unwrap_or(0)).collect();
                    t.received += n[0];
                    t.wrong_user += n[1];
                    t.dups += n[2];
                    t.gaps += n[3];
                    t.closed += n[4];
                    welcomed += n[5];
                }
                Some("H") => {
                    let v: u64 = parts[1].parse().unwrap_or(1);
                    let c: u64 = parts[2].parse().unwrap_or(0);
                    let _ = hist.record_n(v.max(1), c);
                }
                Some("END") => break,
                _ => {}
            }
            line.clear();
        }
    }
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
        a.rate, a.duration, a.warmup, a.payload
    );
    println!(
        "received       {}  loss {loss}  wrong-user {}  duplicates {}  gaps {}  closed {}",
        t.received, t.wrong_user, t.dups, t.gaps, t.closed
    );
    println!(
        "latency (µs)   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}  max {:.1}  (n={}, from intended send time)",
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        us(0.9999),
        hist.max() as f64 / 1000.0,
        hist.len()
    );
    if let Some((c0, s0)) = &cpu_rec0 {
        for (i, pid) in a.node_pid.iter().enumerate() {
            if let (Some(x0), Some(x1)) = (c0[i], cpu1[i]) {
                let cpu = x1 - x0;
                let per = cpu / sent_recorded.max(1) as f64 * 1e6;
                println!(
                    "node pid {pid}   cpu {cpu:.2}s over {}s = {:.1}% of a core, {per:.2} µs per delivered message",
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
    let node_cpu_us = cpu_rec0.as_ref().and_then(|(c0, _)| {
        let tot: f64 = a.node_pid.iter().enumerate().filter_map(|(i, _)| Some(cpu1[i]? - c0[i]?)).sum();
        (!a.node_pid.is_empty()).then(|| tot / sent_recorded.max(1) as f64 * 1e6)
    });
    println!(
        "SUMMARY clients={} rate={} sent={sent} received={} loss={loss} wrong={} p50={:.1} p90={:.1} p99={:.1} p999={:.1} p9999={:.1} max={:.1} node_cpu_us_per_msg={:.3}",
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
        node_cpu_us.unwrap_or(f64::NAN)
    );
    let mut code = 0;
    if loss != 0 || t.wrong_user != 0 || t.dups != 0 || t.gaps != 0 {
        eprintln!("probe: FAIL: loss, duplicates, gaps or misrouted messages");
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
