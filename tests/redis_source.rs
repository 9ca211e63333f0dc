//! The Redis Streams connector (`--source redis://…`, protocol.md §12.2)
//! against a real `redis-server` the test starts (AOF, `appendfsync
//! always`): entries added to the stream reach their users in order;
//! malformed ones are dead-lettered and do not stall the consumer; entries
//! written before any node started, and unroutable ones with
//! `no_route=retry`, are delivered; a consuming node killed mid-stream loses
//! nothing and duplicates nothing (another node claims its pending entries);
//! a restarted Redis server loses nothing.

mod util;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::client::Client;
use redis::Value;
use util::herd::{assert_exactly_once, collect, drain, Herd};
use util::queues::{Kind, Server};

const KEY: &str = "events";

/// A connection to the test's Redis that reconnects when a command fails.
struct Redis {
    addr: String,
    conn: Option<redis::Connection>,
}

impl Redis {
    fn new(addr: String) -> Redis {
        Redis { addr, conn: None }
    }

    fn conn(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.conn.is_none() {
            let c = redis::Client::open(format!("redis://{}/", self.addr))?
                .get_connection_with_timeout(Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().unwrap())
    }

    /// Runs `cmd`, retrying (on a new connection) for up to 30 s.
    fn query(&mut self, cmd: &redis::Cmd) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.conn().and_then(|c| cmd.query::<Value>(c)) {
                Ok(v) => return v,
                Err(e) => {
                    assert!(Instant::now() < deadline, "redis at {}: {e}", self.addr);
                    self.conn = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// XADDs an entry, retrying until it is stored, once. With an explicit
    /// `id` (above every id before it), a retry after an answer that was
    /// lost finds it stored ("equal or smaller than the target stream top
    /// item") and does not add it twice.
    fn xadd(&mut self, key: &str, id: &str, fields: &[(&str, &[u8])]) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key).arg(id);
        for (f, v) in fields {
            cmd.arg(*f).arg(*v);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.conn().and_then(|c| cmd.query::<Value>(c)) {
                Ok(_) => return,
                Err(e) if id != "*" && e.to_string().contains("equal or smaller") => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot XADD to {key}: {e}");
                    self.conn = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// The entries of `key`, each as its (field, value) map.
    fn range(&mut self, key: &str) -> Vec<HashMap<String, Vec<u8>>> {
        self.range_of(key, "-")
    }

    /// The entries of `key` from `id` on (`-`: all; an id: that entry alone
    /// if `id` is a full id), each as its (field, value) map.
    fn range_of(&mut self, key: &str, id: &str) -> Vec<HashMap<String, Vec<u8>>> {
        let end = if id == "-" { "+" } else { id };
        let Value::Array(entries) = self.query(redis::cmd("XRANGE").arg(key).arg(id).arg(end)) else {
            panic!("XRANGE {key}")
        };
        entries
            .into_iter()
            .map(|e| {
                let Value::Array(mut e) = e else { panic!("an entry") };
                let Value::Array(fields) = e.pop().unwrap() else { panic!("its fields") };
                fields
                    .chunks_exact(2)
                    .map(|p| match p {
                        [Value::BulkString(f), Value::BulkString(v)] => {
                            (String::from_utf8(f.clone()).unwrap(), v.clone())
                        }
                        _ => panic!("a field"),
                    })
                    .collect()
            })
            .collect()
    }

    /// The (user, data) of the entries pending with `consumer`.
    fn pending_entries(&mut self, consumer: &str) -> Vec<(String, Vec<u8>)> {
        let cmd = redis::cmd("XPENDING")
            .arg(KEY)
            .arg("herald")
            .arg("-")
            .arg("+")
            .arg(100_000)
            .arg(consumer)
            .clone();
        let Value::Array(pending) = self.query(&cmd) else { return Vec::new() };
        let mut out = Vec::new();
        for p in pending {
            let Value::Array(p) = p else { continue };
            let Some(Value::BulkString(id)) = p.first() else { continue };
            let id = String::from_utf8(id.clone()).unwrap();
            let entry = self.range_of(KEY, &id);
            if let Some(e) = entry.first() {
                out.push((String::from_utf8_lossy(&e["user"]).into_owned(), e["data"].clone()));
            }
        }
        out
    }

    /// Entries pending in the group (for `consumer`, or all).
    fn pending(&mut self, consumer: Option<&str>) -> usize {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(KEY).arg("herald");
        match consumer {
            None => match self.query(&cmd) {
                Value::Array(v) => match v.first() {
                    Some(Value::Int(n)) => *n as usize,
                    _ => 0,
                },
                _ => 0,
            },
            Some(c) => match self.query(cmd.arg("-").arg("+").arg(100_000).arg(c)) {
                Value::Array(v) => v.len(),
                _ => 0,
            },
        }
    }
}

fn source(redis: &Server, extra: &str) -> Vec<String> {
    vec!["--source".into(), format!("redis://{}/{KEY}?ack_wait=1s{extra}", redis.addr())]
}

#[test]
fn stream_entries_reach_their_users_and_malformed_ones_are_dead_lettered() {
    let Some(server) = Server::start(Kind::Redis, "rs-basic") else { return };
    let mut herd = Herd::new("rs-basic");
    herd.start_node("r1", &source(&server, "&dead_letter=events.dead"));
    let mut alice = herd.client_on(0, "alice");
    let mut bob = herd.client_on(0, "bob");
    let mut q = Redis::new(server.addr());
    for i in 0..50 {
        q.xadd(KEY, "*", &[("user", b"alice"), ("data", format!("a{i}").as_bytes())]);
        if i == 10 {
            // Malformed: a user id over 64 bytes, and data over 64 KiB.
            q.xadd(KEY, "*", &[("user", "u".repeat(65).as_bytes()), ("data", b"bad user")]);
            q.xadd(KEY, "*", &[("user", b"alice"), ("data", &[b'p'; 70_000])]);
        }
    }
    // A key, binary data, and a field the connector ignores.
    q.xadd(KEY, "*", &[("colour", b"red"), ("user", b"bob"), ("key", b"k"), ("data", b"b0\x00\xff")]);
    let got = collect(&mut alice, 50, Duration::from_secs(15));
    let want: Vec<Vec<u8>> = (0..50).map(|i| format!("a{i}").into_bytes()).collect();
    assert_eq!(got, want, "alice gets her 50 messages once each, in order, and not the oversized one");
    assert_eq!(collect(&mut bob, 1, Duration::from_secs(5)), vec![b"b0\x00\xff".to_vec()]);
    assert!(collect(&mut alice, 1, Duration::from_millis(500)).is_empty(), "nothing more for alice");
    // Both malformed entries went to the dead-letter stream, with why,
    // their id and their own fields.
    let mut dead = q.range("events.dead");
    assert_eq!(dead.len(), 2, "two dead letters");
    dead.sort_by(|a, b| a["herald_error"].cmp(&b["herald_error"]));
    let reasons: Vec<&[u8]> = dead.iter().map(|d| &d["herald_error"][..]).collect();
    assert_eq!(reasons, [&b"payload over 65536 bytes"[..], b"user id over 64 bytes"]);
    assert_eq!((dead[0]["user"].as_slice(), dead[0]["data"].len()), (&b"alice"[..], 70_000));
    assert_eq!(dead[1]["data"], b"bad user");
    assert!(dead.iter().all(|d| d["herald_id"].contains(&b'-')), "each names its entry");
    assert_eq!(herd.nodes[0].metric("herald_source_messages_total"), 51);
    // Everything was acknowledged, the malformed ones too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.pending(None) > 0 {
        assert!(Instant::now() < deadline, "{} entries still pending", q.pending(None));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn entries_from_before_any_node_and_unroutable_ones_with_retry_are_delivered() {
    let Some(server) = Server::start(Kind::Redis, "rs-early") else { return };
    let mut q = Redis::new(server.addr());
    // The stream exists before any node, and so do its first entries.
    for i in 0..20 {
        q.xadd(KEY, "*", &[("user", b"carol"), ("data", format!("c{i}").as_bytes())]);
    }
    let mut herd = Herd::new("rs-early");
    // carol is not connected yet: what the node reads first has no route and
    // stays pending, to be claimed again after ack_wait.
    herd.start_node("e1", &source(&server, "&no_route=retry"));
    std::thread::sleep(Duration::from_millis(300));
    let mut carol = herd.client_on(0, "carol");
    let mut got = collect(&mut carol, 20, Duration::from_secs(15));
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..20).map(|i| format!("c{i}").into_bytes()).collect();
    want.sort();
    assert_eq!(got, want, "each of carol's entries once");
    assert!(collect(&mut carol, 1, Duration::from_millis(1500)).is_empty(), "no late copy");
}

/// XADDs `per_user` entries for each of `users` at about `rate` a second,
/// in the background, with explicit ids `1-N`; `sent` counts them.
fn publisher(
    addr: String,
    users: Vec<String>,
    per_user: usize,
    rate: u64,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut q = Redis::new(addr);
        let t0 = Instant::now();
        let mut n = 0u64;
        for i in 0..per_user {
            for u in &users {
                n += 1;
                let data = format!("{u}-{i}");
                q.xadd(KEY, &format!("1-{n}"), &[("user", u.as_bytes()), ("data", data.as_bytes())]);
                sent.fetch_add(1, Ordering::SeqCst);
                let due = t0 + Duration::from_micros(n * 1_000_000 / rate);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }
    })
}

/// Waits until `sent` reaches `n`.
fn until_sent(sent: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the publisher is stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_consuming_node_killed_mid_stream_loses_nothing_and_duplicates_nothing() {
    let Some(server) = Server::start(Kind::Redis, "rs-kill") else { return };
    let mut herd = Herd::new("rs-kill");
    // h: the users' home, consuming nothing; c1 and c2: two consumers (their
    // node ids) of one group.
    herd.start_node("h", &[]);
    herd.start_node("c1", &source(&server, ""));
    herd.start_node("c2", &source(&server, ""));
    herd.wait_listed(3);
    let users: Vec<String> = (0..10).map(|i| format!("ku{i}")).collect();
    let mut clients: Vec<(String, Client)> =
        users.iter().map(|u| (u.clone(), herd.client_on(0, u))).collect();
    for u in &users {
        herd.until_routed(1, u, b"probe");
        herd.until_routed(2, u, b"probe");
    }
    let per_user = 300;
    let sent = Arc::new(AtomicUsize::new(0));
    let p = publisher(server.addr(), users.clone(), per_user, 1500, sent.clone());
    // Kill c1 a third of the way in, at a moment it holds entries it has not
    // acknowledged, one of them (if it can be caught) already delivered
    // through h: it is stopped (SIGSTOP) while its pending entries are
    // looked at and the clients read, so it cannot acknowledge them
    // meanwhile, and let go on for a few ms if the moment is not right.
    until_sent(&sent, users.len() * per_user / 3);
    let taken_by_c1 = herd.nodes[1].metric("herald_source_messages_total");
    let mut q = Redis::new(server.addr());
    let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); users.len()];
    let (mut left_by_c1, mut delivered) = (0, 0);
    for attempt in 0..60 {
        herd.nodes[1].proc.signal(libc::SIGSTOP);
        let pending = q.pending_entries("c1");
        left_by_c1 = pending.len();
        if left_by_c1 > 0 {
            std::thread::sleep(Duration::from_millis(30));
            for ((_, c), got) in clients.iter_mut().zip(&mut got) {
                drain(c, got);
            }
            delivered = pending
                .iter()
                .filter(|(u, d)| users.iter().position(|x| x == u).is_some_and(|i| got[i].contains(d)))
                .count();
            if delivered > 0 || attempt >= 40 {
                break;
            }
        }
        herd.nodes[1].proc.signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(3));
    }
    herd.nodes[1].proc.kill9();
    p.join().unwrap();
    assert_exactly_once(&mut clients, got, per_user, Duration::from_secs(30));
    eprintln!(
        "c1 had taken {taken_by_c1} and left {left_by_c1} pending ({delivered} of them delivered) when killed; \
         c2 took {}; h dropped {} copies",
        herd.nodes[2].metric("herald_source_messages_total"),
        herd.nodes[0].metric("herald_source_duplicates_total")
    );
    assert!(taken_by_c1 > 0, "c1 was consuming when it was killed");
    assert!(left_by_c1 > 0, "c1 left entries pending for c2 to claim");
    assert_eq!(q.pending(Some("c1")), 0, "c2 claimed what c1 left");
}

#[test]
fn a_restarted_redis_server_loses_nothing() {
    let Some(mut server) = Server::start(Kind::Redis, "rs-restart") else { return };
    let mut herd = Herd::new("rs-restart");
    herd.start_node("r1", &source(&server, ""));
    let users: Vec<String> = (0..5).map(|i| format!("ru{i}")).collect();
    let mut clients: Vec<(String, Client)> =
        users.iter().map(|u| (u.clone(), herd.client_on(0, u))).collect();
    let per_user = 300;
    let sent = Arc::new(AtomicUsize::new(0));
    let p = publisher(server.addr(), users.clone(), per_user, 1000, sent.clone());
    until_sent(&sent, users.len() * per_user / 3);
    server.restart(Duration::from_secs(1));
    p.join().unwrap();
    assert_exactly_once(&mut clients, vec![Vec::new(); users.len()], per_user, Duration::from_secs(30));
    let mut q = Redis::new(server.addr());
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.pending(None) > 0 {
        assert!(Instant::now() < deadline, "{} entries still pending", q.pending(None));
        std::thread::sleep(Duration::from_millis(50));
    }
}
