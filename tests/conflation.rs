//! Conflation by key over real sockets (protocol.md §5.7, §3.8): a client
//! that reads slowly behind a tiny receive window, on a node run with
//! `--slow-policy conflate`, gets every unkeyed message in order and the
//! latest value of every key, is never cut off, and is told exactly how
//! many messages were conflated away; a fast client on the same node gets
//! everything; a version-1 session is cut off as under `disconnect`; a
//! resume replays every retained message, conflated or not; and
//! `herald-probe load` accounts for every message of its slow clients.

mod util;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use herald::client::Publisher;
use herald::node::SlowPolicy;
use herald::protocol::frame::{self as f, decode, Channel, Decoded, Frame, Position};
use herald::protocol::Code;
use util::*;

/// Keys the quotes rotate over, quotes a second, fills a second.
const KEYS: usize = 20;
const QUOTES_PER_S: u64 = 500;
const FILLS_PER_S: u64 = 5;

/// What one reader saw.
#[derive(Debug, Default)]
struct Seen {
    /// DELIVERs received.
    delivered: u64,
    /// Seqs covered by CONFLATED frames.
    conflated: u64,
    /// CONFLATED frames.
    notices: u64,
    /// Unkeyed payloads, in arrival order.
    fills: Vec<String>,
    /// Key → the last value received.
    latest: BTreeMap<String, String>,
    /// Keys named by CONFLATED frames.
    keys_named: BTreeMap<String, u64>,
    /// Whether the session ended (EOF, GOODBYE or ERROR) before "end".
    cut: Option<String>,
}

/// Publishes `secs` seconds of quotes and fills to each of `users`, then one
/// unkeyed "end" message, confirmed. Returns, per user, what was published:
/// (messages, fills in order, key → last value).
fn publish(node: &TestNode, users: &[&str], secs: u64) -> (u64, Vec<String>, BTreeMap<String, String>) {
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let (mut sent, mut fills, mut latest) = (0u64, Vec::new(), BTreeMap::new());
    let start = Instant::now();
    let quotes = QUOTES_PER_S * secs;
    let every = QUOTES_PER_S / FILLS_PER_S;
    for n in 0..quotes {
        // Paced: quote n is due at n / 500 s.
        let due = start + Duration::from_micros(n * 1_000_000 / QUOTES_PER_S);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            p.flush().unwrap();
            thread::sleep(w);
        }
        let key = format!("k{:02}", n as usize % KEYS);
        let value = format!("{key}={n}");
        for u in users {
            p.publish_keyed(u.as_bytes(), key.as_bytes(), value.as_bytes()).unwrap();
        }
        latest.insert(key, value);
        sent += 1;
        if n % every == every - 1 {
            let fill = format!("fill-{}", n / every);
            for u in users {
                p.publish(u.as_bytes(), fill.as_bytes()).unwrap();
            }
            fills.push(fill);
            sent += 1;
        }
    }
    for u in users {
        p.publish_confirmed(u.as_bytes(), b"end").unwrap();
    }
    (sent + 1, fills, latest)
}

/// Reads a session on `sock` (its WELCOME already read, next seq `next`),
/// `chunk` bytes every `pause` while `slow` is set, then at full speed,
/// until the unkeyed "end" arrives. Checks every frame against the
/// position rules of §3.3 and §3.8 (no gap may appear).
fn read_session(
    mut sock: TcpStream,
    epoch: u64,
    mut next: u64,
    chunk: usize,
    pause: Duration,
    slow: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut buf: Vec<u8> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        assert!(Instant::now() < deadline, "reader stuck at seq {next}");
        let want = if slow.load(Ordering::Relaxed) { chunk } else { scratch.len() };
        match sock.read(&mut scratch[..want]) {
            Ok(0) => {
                seen.cut = Some("eof".into());
                return seen;
            }
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                seen.cut = Some(format!("read: {e}"));
                return seen;
            }
        }
        let mut used = 0;
        loop {
            let (fr, n) = match decode(&buf[used..], Channel::ToClient) {
                Ok(Decoded::Frame(fr, n)) => (fr, n),
                Ok(Decoded::Incomplete(_)) => break,
                Err(e) => panic!("the node sent a bad frame at seq {next}: {e}"),
            };
            used += n;
            match fr {
                Frame::Deliver(d) => {
                    assert_eq!(d.epoch, epoch);
                    assert_eq!(d.seq, next, "a gap or a repeat: DELIVER {} where {next} was due", d.seq);
                    next += 1;
                    seen.delivered += 1;
                    let p = String::from_utf8(d.payload.to_vec()).unwrap();
                    if p == "end" {
                        return seen;
                    }
                    match p.split_once('=') {
                        Some((k, _)) => {
                            seen.latest.insert(k.to_owned(), p.clone());
                        }
                        None => seen.fills.push(p),
                    }
                }
                Frame::Conflated(c) => {
                    assert_eq!(c.epoch, epoch);
                    assert_eq!(c.first_seq, next, "CONFLATED must start where the stream is");
                    assert!(c.last_seq >= c.first_seq);
                    seen.conflated += c.last_seq - c.first_seq + 1;
                    seen.notices += 1;
                    next = c.last_seq + 1;
                    for k in c.keys.iter() {
                        *seen.keys_named.entry(String::from_utf8(k.0.to_vec()).unwrap()).or_default() += 1;
                    }
                }
                Frame::Ping(nonce) => {
                    let _ = sock.write_all(&Frame::Pong(nonce).to_vec());
                }
                Frame::Goodbye(g) => {
                    seen.cut = Some(format!("goodbye {:?}", g.reason));
                    return seen;
                }
                Frame::Error(e) => {
                    seen.cut = Some(format!("error {:?}", e.code));
                    return seen;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        buf.drain(..used);
        if slow.load(Ordering::Relaxed) {
            thread::sleep(pause);
        }
    }
}

/// Connects a client for `user` (receive buffer `rcvbuf` if given) offering
/// protocol versions up to `max_version`; returns it with its WELCOME's
/// epoch and next seq.
fn connect(
    node: &TestNode,
    user: &str,
    rcvbuf: Option<usize>,
    max_version: u8,
    resume: Option<Position>,
) -> (TcpStream, u64, u64) {
    let mut r = match rcvbuf {
        Some(n) => Raw::connect_small(node.client, Channel::ToClient, n),
        None => Raw::connect(node.client, Channel::ToClient),
    };
    r.send_frame(Frame::Hello(f::Hello {
        min_version: 1,
        max_version,
        token: token_for(user).as_bytes(),
        agent: b"conflation-test",
        resume,
    }));
    // The WELCOME alone, byte-exact: what follows is the reader's.
    let mut sock = r.sock;
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = vec![0u8; 4];
    sock.read_exact(&mut w).unwrap();
    let len = u32::from_be_bytes(w[..4].try_into().unwrap()) as usize;
    w.resize(4 + len, 0);
    sock.read_exact(&mut w[4..]).unwrap();
    let (epoch, next) = match frame(&w, Channel::ToClient) {
        Frame::Welcome(w) => {
            assert_eq!(w.version, max_version);
            (w.epoch, w.next_seq)
        }
        other => panic!("expected WELCOME, got {other:?}"),
    };
    (sock, epoch, next)
}

fn conflate_config() -> herald::node::Config {
    let mut cfg = test_config();
    cfg.slow_policy = SlowPolicy::Conflate;
    // A small send buffer, so that the queue (not the kernel) holds what a
    // slow client has not read.
    cfg.client_sndbuf = 4096;
    cfg
}

#[test]
fn a_slow_client_gets_every_fill_and_the_last_value_of_every_key_and_a_fast_one_everything() {
    slow_and_fast(1);
}

/// The same with two event loops: the message reaches the user's loop in a
/// hand-off batch, which carries the key too.
#[test]
fn conflation_works_on_every_loop() {
    slow_and_fast(2);
}

fn slow_and_fast(threads: usize) {
    let mut cfg = conflate_config();
    cfg.threads = threads;
    let node = TestNode::start(cfg);
    let (slow_sock, se, sn) = connect(&node, "slow", Some(4096), 2, None);
    let (fast_sock, fe, fnx) = connect(&node, "fast", None, 2, None);
    let slow_flag = Arc::new(AtomicBool::new(true));
    let flag = slow_flag.clone();
    // ~3 KB/s: a fifth of the stream's bandwidth.
    let slow = thread::spawn(move || read_session(slow_sock, se, sn, 256, Duration::from_millis(80), flag));
    let fast = thread::spawn(move || {
        read_session(fast_sock, fe, fnx, 0, Duration::ZERO, Arc::new(AtomicBool::new(false)))
    });

    let (sent, fills, latest) = publish(&node, &["slow", "fast"], 10);
    // The slow reader catches up once the traffic stops.
    slow_flag.store(false, Ordering::Relaxed);
    let slow = slow.join().unwrap();
    let fast = fast.join().unwrap();

    // The fast client: everything, nothing conflated.
    assert_eq!(fast.cut, None);
    assert_eq!(fast.delivered, sent);
    assert_eq!(fast.conflated, 0);
    assert_eq!(fast.fills, fills);
    assert_eq!(fast.latest, latest);

    // The slow client: every fill in order, the last value of every key, no
    // disconnect, and the conflated count is what it did not get.
    assert_eq!(slow.cut, None, "the slow client was cut off");
    assert_eq!(slow.fills, fills, "every fill, in order");
    assert_eq!(slow.latest, latest, "the last value of every key");
    assert!(slow.conflated > 0, "a reader at a fifth of the bandwidth must have been conflated");
    assert_eq!(slow.conflated, sent - slow.delivered, "conflated = sent - received");
    assert!(
        slow.keys_named.keys().all(|k| latest.contains_key(k)),
        "only keys that were sent: {:?}",
        slow.keys_named
    );
    // (Other loops report their counters on a timer.)
    assert_eq!(eventually(|| node.metric("herald_messages_conflated_total"), slow.conflated), slow.conflated);
    assert_eq!(node.closes("slow_consumer"), 0);
    eprintln!(
        "{threads} loop(s): slow client: {} sent, {} delivered, {} conflated in {} CONFLATED frames",
        sent, slow.delivered, slow.conflated, slow.notices
    );
}

#[test]
fn a_version_1_session_is_cut_off_as_under_disconnect() {
    let mut cfg = conflate_config();
    cfg.queue_bytes = 16 * 1024;
    let node = TestNode::start(cfg);
    let (mut sock, _, _) = connect(&node, "old", Some(4096), 1, None);
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let value = vec![b'q'; 1000];
    for _ in 0..200 {
        p.publish_keyed(b"old", b"EURUSD", &value).unwrap();
    }
    p.publish_confirmed(b"old", b"end").unwrap();
    assert_eq!(eventually(|| node.closes("slow_consumer"), 1), 1);
    assert_eq!(node.metric("herald_messages_conflated_total"), 0);
    // What it reads has no CONFLATED, and then the node closes it (the
    // GOODBYE may not fit in what the socket takes, §3.7).
    let mut all = Vec::new();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = sock.read_to_end(&mut all);
    let mut b = &all[..];
    let mut delivers = 0;
    while let Ok(Decoded::Frame(fr, n)) = decode(b, Channel::ToClient) {
        assert!(!matches!(fr, Frame::Conflated(_)), "a version-1 session got CONFLATED");
        if let Frame::Goodbye(g) = fr {
            assert_eq!(g.reason, Code::SlowConsumer);
        }
        delivers += matches!(fr, Frame::Deliver(_)) as u32;
        b = &b[n..];
    }
    assert!(delivers < 200, "it was cut off before the end");
}

#[test]
fn a_resume_replays_every_retained_message_even_those_conflated() {
    let node = TestNode::start(conflate_config());
    let (sock, epoch, first) = connect(&node, "r", Some(4096), 2, None);
    // The client reads nothing: the queue backs up and conflates.
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let value = vec![b'v'; 200];
    let n = 600u64;
    for i in 0..n {
        let key = format!("k{}", i % 3);
        p.publish_keyed(b"r", key.as_bytes(), &value).unwrap();
        if i % 50 == 0 {
            p.flush().unwrap();
            thread::sleep(Duration::from_millis(5));
        }
    }
    p.publish_confirmed(b"r", b"end").unwrap();
    assert!(eventually(|| node.metric("herald_messages_conflated_total") > 0, true));
    drop(sock);
    // Resuming from before the first message replays all n + 1, in order,
    // none conflated (retention keeps everything; the replay is queued as
    // one burst to a session that is not backed up).
    let from = Position { epoch, seq: first - 1 };
    let (sock, e2, next) = connect(&node, "r", None, 2, Some(from));
    assert_eq!((e2, next), (epoch, first));
    let seen = read_session(sock, epoch, next, 0, Duration::ZERO, Arc::new(AtomicBool::new(false)));
    assert_eq!(seen.cut, None);
    assert_eq!(seen.delivered, n + 1, "every retained message is replayed");
    assert_eq!(seen.conflated, 0);
}

/// One PUBLISH_BATCH larger than the queue bound, to a client that reads
/// nothing yet, arrives within one turn, before the node's first write: the
/// queue is backed up from a quarter of the bound on (§5.7), so the burst is
/// conflated, not cut off.
#[test]
fn one_burst_over_the_bound_is_conflated_not_cut_off() {
    let node = TestNode::start(conflate_config());
    let (sock, epoch, next) = connect(&node, "burst", Some(4096), 2, None);
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let (mut frames, mut latest) = (Vec::new(), BTreeMap::new());
    let mut w = f::BatchWriter::start(&mut frames, 0, 0);
    let n = 1000;
    for i in 0..n {
        let key = format!("k{}", i % 5);
        let value = format!("{key}={i}:{}", "x".repeat(600));
        assert!(w.push(&mut frames, b"burst", key.as_bytes(), value.as_bytes()), "fits one frame");
        latest.insert(key, value);
    }
    w.finish(&mut frames);
    assert!(frames.len() > 2 * 262_144, "the burst is over the bound");
    p.write_raw(&frames).unwrap();
    p.publish_confirmed(b"burst", b"end").unwrap();
    let seen = read_session(sock, epoch, next, 0, Duration::ZERO, Arc::new(AtomicBool::new(false)));
    assert_eq!(seen.cut, None, "cut off");
    assert_eq!(node.closes("slow_consumer"), 0);
    assert_eq!(seen.latest, latest);
    assert!(seen.conflated > 0);
    assert_eq!(seen.delivered + seen.conflated, n + 1);
}

/// Under `conflate` a backed-up session whose unkeyed messages alone are
/// over the bound is still cut off, and what it is sent before the close is
/// valid frames only (nothing conflated away is ever written).
#[test]
fn unkeyed_messages_over_the_bound_still_cut_off_and_the_last_bytes_are_valid() {
    let mut cfg = conflate_config();
    cfg.queue_bytes = 64 * 1024;
    let node = TestNode::start(cfg);
    let (mut sock, _, _) = connect(&node, "full", Some(4096), 2, None);
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let big = vec![b'f'; 2000];
    for i in 0..200 {
        // Quotes to conflate, and fills that fill the queue.
        p.publish_keyed(b"full", b"EURUSD", format!("EURUSD={i}").as_bytes()).unwrap();
        p.publish(b"full", &big).unwrap();
    }
    p.publish_confirmed(b"full", b"end").unwrap();
    assert_eq!(eventually(|| node.closes("slow_consumer"), 1), 1);
    assert!(node.metric("herald_messages_conflated_total") > 0);
    let mut all = Vec::new();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = sock.read_to_end(&mut all);
    let mut b = &all[..];
    loop {
        match decode(b, Channel::ToClient) {
            Ok(Decoded::Frame(_, n)) => b = &b[n..],
            Ok(Decoded::Incomplete(_)) => break,
            Err(e) => panic!("invalid bytes before the close: {e}"),
        }
    }
}

/// `herald-probe load` with keyed traffic and slow readers against a node
/// under `conflate`: the slow clients are conflated, lose no unkeyed
/// message, are never cut off, and every message is accounted for
/// (received or conflated); the run passes.
#[test]
fn the_probe_accounts_for_its_slow_clients() {
    let node = TestNode::start(conflate_config());
    let dir = std::env::temp_dir().join(format!("herald-conflation-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cs, ps) = (dir.join("cs"), dir.join("ps"));
    std::fs::write(&cs, CLIENT_SECRET).unwrap();
    std::fs::write(&ps, PUBLISHER_SECRET).unwrap();
    let (client, ingest) = (node.client.to_string(), node.ingest.to_string());
    #[rustfmt::skip]
    let args = [
        "load", "--node", &client, "--ingest", &ingest,
        "--secret-file", cs.to_str().unwrap(), "--publisher-secret-file", ps.to_str().unwrap(),
        "--clients", "20", "--workers", "1", "--rate", "2000", "--duration", "3", "--warmup", "0",
        "--payload", "500", "--keys", "5", "--fills-every", "5", "--slow", "4", "--slow-rcvbuf", "1024",
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald-probe")).args(args).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.starts_with("SUMMARY ")).unwrap_or_else(|| panic!("{text}"));
    let kv: BTreeMap<&str, &str> =
        line.split_whitespace().skip(1).filter_map(|p| p.split_once('=')).collect();
    let n = |k: &str| -> f64 { kv.get(k).unwrap_or_else(|| panic!("no {k}: {line}")).parse().unwrap() };
    assert_eq!(n("slow"), 4.0, "{line}");
    assert!(n("slow_conflated") > 0.0, "a client reading a tenth of its stream is conflated: {line}");
    assert_eq!(n("slow_conflated"), n("conflated"), "only the slow clients are conflated: {line}");
    assert_eq!(n("loss"), n("conflated"), "what did not arrive was conflated: {line}");
    assert_eq!((n("slow_unkeyed_lost"), n("slow_closed")), (0.0, 0.0), "{line}");
    assert!(n("stale_p50_ms") > 0.0, "{line}");
    assert!(text.contains("slow clients   received "), "{text}");
}
