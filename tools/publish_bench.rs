//! `herald-publish-bench`: the binary ingest port's publish rate, shaped as
//! an HTTP load generator loads the HTTP publish API (tools/bench-http.sh):
//! `--conns` connections, each with one request in flight at a time: a
//! PUBLISH_BATCH of `--batch` messages (or one PUBLISH) with WANT_RESULT,
//! then its PUB_RESULT, then the next. Users `u0..u{users-1}` in the order
//! the wrk script sends them (`--order`, its `ORDER`):
//! - `random`: a user drawn at random for each message, from a generator of
//!   each connection's own;
//! - `turn`: in turn. The connections are split into `--groups` (wrk's
//!   threads, `wrk -t`), and each group's requests take the next users of
//!   one sequence that group shares, as each wrk thread's script does.
//!
//! The order decides how many client sockets one turn of the node writes
//! to per message, which is most of its cost: with random users that does
//! not depend on how the load generator's requests line up in time; in
//! turn it does. Prints one `INGEST` line: requests, messages and the rate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use herald::cli::{parse_duration, read_secret};
use herald::decision::table::Rng;
use herald::protocol::frame::{self as f, Frame, PUBLISH_WANT_RESULT};
use herald::protocol::{decode, token, Channel, Decoded, MIN_VERSION, VERSION};

#[derive(Parser)]
#[command(name = "herald-publish-bench", about = "Publish rate through the binary ingest port")]
struct Args {
    /// The node's ingest endpoint.
    #[arg(long)]
    ingest: String,
    /// Publisher secret file.
    #[arg(long)]
    publisher_secret_file: std::path::PathBuf,
    /// Connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Messages per request (1: PUBLISH; more: PUBLISH_BATCH).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Users u0..u{users-1}, in turn.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Which user each message goes to.
    #[arg(long, value_enum, default_value_t = Order::Random)]
    order: Order,
    /// With `--order turn`: groups of connections, each walking the users
    /// through one shared sequence (as many as wrk's threads, `wrk -t`).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
}

/// Which user each message goes to (the wrk script's `ORDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Order {
    /// A user drawn at random for each message.
    Random,
    /// The users in turn, one sequence per group of connections.
    Turn,
}

/// Where one connection's users come from.
enum Users<'a> {
    /// Its own generator.
    Random(Rng),
    /// Its group's sequence: each request takes the next `batch` users.
    Turn(&'a AtomicUsize),
}

/// One connection's loop.
fn worker(a: &Args, cred: &str, mut users: Users<'_>, stop: &AtomicBool, done: &AtomicU64) {
    let mut s = TcpStream::connect(&a.ingest).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let hello = Frame::PubHello(f::PubHello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        credential: cred.as_bytes(),
        agent: b"herald-publish-bench",
    });
    s.write_all(&hello.to_vec()).expect("PUB_HELLO");
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next = |buf: &mut Vec<u8>, s: &mut TcpStream| loop {
        if let Ok(Decoded::Frame(fr, n)) = decode(buf, Channel::FromIngest) {
            let ty = fr.frame_type();
            buf.drain(..n);
            return ty;
        }
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "the node closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(next(&mut buf, &mut s), f::ty::PUB_WELCOME, "PUB_WELCOME");
    let payload = vec![b'x'; a.payload];
    let mut id = 0u32;
    let mut req = Vec::with_capacity(a.batch * (a.payload + 16) + 64);
    let names: Vec<String> = (0..a.users).map(|i| format!("u{i}")).collect();
    while !stop.load(Ordering::Relaxed) {
        req.clear();
        id = id.wrapping_add(1);
        let mut turn = match &users {
            Users::Turn(seq) => seq.fetch_add(a.batch, Ordering::Relaxed) % a.users,
            Users::Random(_) => 0,
        };
        let mut pick = || match &mut users {
            Users::Random(rng) => (rng.next_u64() % a.users as u64) as usize,
            Users::Turn(_) => {
                let u = turn;
                turn = (turn + 1) % a.users;
                u
            }
        };
        if a.batch == 1 {
            f::encode_publish(&mut req, PUBLISH_WANT_RESULT, id, names[pick()].as_bytes(), b"", &payload);
        } else {
            let mut w = f::BatchWriter::start(&mut req, PUBLISH_WANT_RESULT, id);
            for _ in 0..a.batch {
                assert!(w.push(&mut req, names[pick()].as_bytes(), b"", &payload), "batch over 1 MiB");
            }
            w.finish(&mut req);
        }
        s.write_all(&req).expect("write");
        while next(&mut buf, &mut s) != f::ty::PUB_RESULT {}
        done.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    let a = Args::parse();
    let secret = read_secret(&a.publisher_secret_file).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let cred = token::mint(&secret, b"publish-bench", unix + 3600).expect("credential");
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    assert!(a.users > 0 && a.groups > 0, "--users and --groups must be at least 1");
    let sequences: Vec<AtomicUsize> = (0..a.groups).map(|_| AtomicUsize::new(0)).collect();
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for c in 0..a.conns {
            let users = match a.order {
                Order::Random => Users::Random(Rng::new(1 + c as u64)),
                // wrk gives each of its threads an equal share of the connections.
                Order::Turn => Users::Turn(&sequences[c % a.groups]),
            };
            let (a, cred, stop, done) = (&a, &cred, &stop, &done);
            sc.spawn(move || worker(a, cred, users, stop, done));
        }
        std::thread::sleep(a.duration);
        stop.store(true, Ordering::SeqCst);
    });
    let secs = t0.elapsed().as_secs_f64();
    let reqs = done.load(Ordering::SeqCst);
    let msgs = reqs * a.batch as u64;
    println!(
        "INGEST requests={reqs} messages={msgs} seconds={secs:.2} conns={} batch={} msgs_per_s={:.0}",
        a.conns,
        a.batch,
        msgs as f64 / secs
    );
}
