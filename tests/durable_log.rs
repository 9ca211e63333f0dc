//! The durable log thread (`herald::durable::log::Log`) against real
//! nats-server processes: a three-server JetStream cluster on loopback
//! (R=3) and, for the per-user limit and the stream checks, one server.
//! Appends and reads, two nodes appending for one user at once, duplicate
//! message ids, the per-user limit, the stream leader killed mid-appends
//! (the fail-over is measured and printed), and two of three servers
//! killed and restarted. Skipped with `SKIP:` without nats-server.

mod util;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use herald::durable::log::Log;
use herald::durable::{Answer, Entry, LogError, Request, Spec};
use util::jscluster::JsCluster;
use util::queues::{Kind, Server};

/// The tests share two cores: one cluster at a time, so that the
/// fail-over times are not a measure of CPU contention.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One node's log thread and what it answers.
struct Node {
    log: Log,
    rx: Receiver<Answer>,
    token: u64,
    /// Health answers seen, in order.
    health: Vec<(Instant, bool)>,
}

fn start(hosts: &str, stream: &str, query: &str, node: &str) -> Result<Node, String> {
    let spec = Spec::parse(&format!("jetstream://{hosts}/{stream}?{query}")).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let log = Log::start(spec, node, tx, Arc::new(|| {}))?;
    Ok(Node { log, rx, token: 0, health: Vec::new() })
}

impl Node {
    fn append(&mut self, user: &str, key: &[u8], payload: &[u8], msg_id: &[u8]) -> u64 {
        self.append_as(user, key, payload, msg_id, false)
    }

    /// [`Node::append`], as a queue's redelivery if `redelivered`.
    fn append_as(&mut self, user: &str, key: &[u8], payload: &[u8], msg_id: &[u8], redelivered: bool) -> u64 {
        self.token += 1;
        assert!(self.log.send(Request::Append {
            token: self.token,
            user: user.as_bytes().into(),
            key: key.into(),
            payload: payload.to_vec(),
            msg_id: msg_id.into(),
            redelivered,
        }));
        self.token
    }

    /// The next answer other than health (which is recorded), within `within`.
    fn next(&mut self, within: Duration) -> Option<Answer> {
        let deadline = Instant::now() + within;
        loop {
            match self.rx.recv_deadline(deadline) {
                Ok(Answer::Health(h)) => self.health.push((Instant::now(), h)),
                Ok(a) => return Some(a),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => panic!("the log thread went away"),
            }
        }
    }

    fn answer(&mut self) -> Answer {
        self.next(Duration::from_secs(15)).expect("an answer within 15 s")
    }

    /// Appends and waits: Ok(seq) or Err(why).
    fn append_wait(
        &mut self,
        user: &str,
        key: &[u8],
        payload: &[u8],
        msg_id: &[u8],
    ) -> Result<u64, LogError> {
        let t = self.append(user, key, payload, msg_id);
        match self.answer() {
            Answer::Appended { token, seq, payload: p, .. } => {
                assert_eq!((token, p.as_slice()), (t, payload));
                Ok(seq)
            }
            Answer::NotAppended { token, why, .. } => {
                assert_eq!(token, t);
                Err(why)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn read(&mut self, user: &str, after: Option<u64>) -> Result<(u64, Vec<Entry>), LogError> {
        self.token += 1;
        let t = self.token;
        assert!(self.log.send(Request::Read { token: t, user: user.as_bytes().into(), after, quick: false }));
        match self.answer() {
            Answer::Read { token, head, msgs, user: u } => {
                assert_eq!((token, &*u), (t, user.as_bytes()));
                Ok((head, msgs))
            }
            Answer::ReadFailed { token, why, .. } => {
                assert_eq!(token, t);
                Err(why)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Waits for a Health(`want`) (recorded or new); when it came.
    fn health(&mut self, want: bool, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(&(at, _)) = self.health.iter().find(|h| h.1 == want) {
                return Some(at);
            }
            match self.rx.recv_deadline(deadline) {
                Ok(Answer::Health(h)) => self.health.push((Instant::now(), h)),
                Ok(a) => panic!("unexpected {a:?} while waiting for health {want}"),
                Err(_) => return None,
            }
        }
    }
}

fn payload(user: &str, i: usize) -> Vec<u8> {
    format!("{user} message {i}").into_bytes()
}

#[test]
fn appends_reads_concurrent_nodes_and_duplicates() {
    let _g = serial();
    let Some(c) = JsCluster::start("basic") else { return };
    let t0 = Instant::now();
    let mut a = start(&c.addrs(), "BASIC", "replicas=3&timeout=2s", "a").unwrap();
    println!("stream ready in {:?} (created {})", t0.elapsed(), a.log.created);
    assert!(a.log.created > 0);

    // Several users, their appends interleaved: seqs 1, 2, 3… per user, in order.
    let users = ["u1", "u2", "u3"];
    let mut sent = HashMap::new();
    for i in 0..10 {
        for u in users {
            let key: &[u8] = if i % 3 == 0 { b"k" } else { b"" };
            let t = a.append(u, key, &payload(u, i), format!("{u}-{i}").as_bytes());
            sent.insert(t, (u, i));
        }
    }
    let mut got: HashMap<&str, Vec<u64>> = HashMap::new();
    let t1 = Instant::now();
    for _ in 0..30 {
        match a.answer() {
            Answer::Appended { token, user, payload: p, seq, key } => {
                let (u, i) = sent[&token];
                assert_eq!((&*user, p), (u.as_bytes(), payload(u, i)));
                assert_eq!(&*key, if i % 3 == 0 { &b"k"[..] } else { b"" });
                assert_eq!(seq, i as u64 + 1, "{u}'s message {i}");
                got.entry(u).or_default().push(seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    println!("30 appends to 3 users answered in {:?}", t1.elapsed());
    for u in users {
        assert_eq!(got[u], (1..=10).collect::<Vec<_>>());
        assert_eq!(a.read(u, None).unwrap(), (10, vec![]));
        assert_eq!(a.read(u, Some(10)).unwrap(), (10, vec![]));
        assert_eq!(a.read(u, Some(12)).unwrap(), (10, vec![]));
        let (head, msgs) = a.read(u, Some(3)).unwrap();
        assert_eq!(head, 10);
        let want: Vec<Entry> = (3..10)
            .map(|i| Entry {
                seq: i as u64 + 1,
                key: if i % 3 == 0 { b"k".to_vec().into() } else { Box::default() },
                payload: payload(u, i),
            })
            .collect();
        assert_eq!(msgs, want);
        assert_eq!(a.read(u, Some(0)).unwrap().1.len(), 10);
    }
    assert_eq!(a.read("nobody", None).unwrap(), (0, vec![]));
    assert_eq!(a.read("nobody", Some(0)).unwrap(), (0, vec![]));

    // Two nodes appending for the same user at once: every seq once.
    let mut b = start(&c.addrs(), "BASIC", "replicas=3&timeout=2s", "b").unwrap();
    assert_eq!(a.log.created, b.log.created, "both nodes see the same stream");
    let n = 200;
    let t2 = Instant::now();
    let (mut ta, mut tb) = (HashMap::new(), HashMap::new());
    for i in 0..n {
        ta.insert(a.append("shared", b"", format!("a{i}").as_bytes(), format!("a-{i}").as_bytes()), i);
        tb.insert(b.append("shared", b"", format!("b{i}").as_bytes(), format!("b-{i}").as_bytes()), i);
    }
    let collect = |node: &mut Node, tokens: &HashMap<u64, usize>| {
        let mut seqs = Vec::new();
        for _ in 0..tokens.len() {
            match node.answer() {
                Answer::Appended { token, seq, payload, .. } => seqs.push((tokens[&token], seq, payload)),
                other => panic!("unexpected {other:?}"),
            }
        }
        seqs
    };
    let (ga, gb) = std::thread::scope(|s| {
        let ja = s.spawn(|| collect(&mut a, &ta));
        let jb = s.spawn(|| collect(&mut b, &tb));
        (ja.join().unwrap(), jb.join().unwrap())
    });
    let took = t2.elapsed();
    // Each node's own appends keep their order.
    for g in [&ga, &gb] {
        assert!(g.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1), "order kept");
    }
    let mut all: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (_, seq, p) in ga.iter().chain(&gb) {
        assert!(all.insert(*seq, p.clone()).is_none(), "seq {seq} answered twice");
    }
    assert_eq!(all.keys().copied().collect::<Vec<_>>(), (1..=2 * n as u64).collect::<Vec<_>>());
    println!(
        "CONCURRENT_APPENDS {} from two nodes to one user in {took:?} ({:.0}/s)",
        2 * n,
        (2 * n) as f64 / took.as_secs_f64()
    );
    let t3 = Instant::now();
    let (head, msgs) = a.read("shared", Some(0)).unwrap();
    println!("read of {} messages back in {:?}", msgs.len(), t3.elapsed());
    assert_eq!(head, 2 * n as u64);
    let read: BTreeMap<u64, Vec<u8>> = msgs.into_iter().map(|e| (e.seq, e.payload)).collect();
    assert_eq!(read, all);
    assert_eq!(b.read("shared", Some(390)).unwrap().1.len(), 10);

    // A message id appended twice is stored once, at its first seq.
    assert_eq!(a.append_wait("dup", b"", b"once", b"m-1"), Ok(1));
    assert_eq!(a.append_wait("dup", b"", b"once", b"m-1"), Ok(1));
    assert_eq!(a.append_wait("dup", b"", b"two", b"m-2"), Ok(2));
    assert_eq!(a.append_wait("dup", b"", b"once", b"m-1"), Ok(1));
    let (head, msgs) = a.read("dup", Some(0)).unwrap();
    assert_eq!(head, 2);
    assert_eq!(msgs.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(), [&b"once"[..], b"two"]);
    // A queue's redelivery through another node (the first appended it and
    // died before acknowledging it) is found in the log: its first seq.
    let t = b.append_as("dup", b"", b"once", b"m-1", true);
    match b.answer() {
        Answer::Appended { token, seq, .. } => assert_eq!((token, seq), (t, 1), "found at its first seq"),
        other => panic!("unexpected {other:?}"),
    }
    let t = b.append_as("dup", b"", b"new", b"m-3", true);
    match b.answer() {
        Answer::Appended { token, seq, .. } => assert_eq!((token, seq), (t, 3), "not there: appended"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(a.read("dup", Some(0)).unwrap().0, 3);
    // Without an id nothing is de-duplicated.
    assert_eq!(a.append_wait("dup", b"", b"anon", b""), Ok(4));
    assert_eq!(a.append_wait("dup", b"", b"anon", b""), Ok(5));

    // Dropping the handle: what was sent is still answered, then the thread ends.
    let tokens: Vec<u64> = (0..50).map(|i| b.append("late", b"", &payload("late", i), b"")).collect();
    let Node { log, rx, .. } = b;
    let t4 = Instant::now();
    drop(log);
    let mut answered = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Answer::Appended { token, seq, .. }) => answered.push((token, seq)),
            Ok(Answer::Health(_)) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("the log thread did not end"),
        }
    }
    println!("stopped in {:?}, {} appends answered", t4.elapsed(), answered.len());
    assert_eq!(answered.iter().map(|a| a.0).collect::<Vec<_>>(), tokens);
    assert_eq!(answered.iter().map(|a| a.1).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
    println!("whole test {:?}", t0.elapsed());
}

#[test]
fn per_user_limit_signals_a_gap_and_streams_are_checked() {
    let _g = serial();
    // A missing cluster fails the start within 10 × timeout.
    let t = Instant::now();
    let dead = format!("127.0.0.1:{}", util::queues::free_port());
    let e = start(&dead, "X", "replicas=1&timeout=200ms", "n").err().expect("no log there");
    println!("unreachable log refused in {:?}: {e}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.contains("not reachable"), "{e}");

    let Some(s) = Server::start(Kind::Nats, "durable-limit") else { return };
    // A single server: replicas=3 cannot be made.
    let e = start(&s.addr(), "LIMIT", "replicas=3&timeout=1s", "n").err().expect("refused");
    assert!(e.contains("replicas"), "{e}");
    let mut n = start(&s.addr(), "LIMIT", "replicas=1&per_user=5&timeout=1s", "n").unwrap();
    for i in 0..8 {
        assert_eq!(n.append_wait("lim", b"", &payload("lim", i), b""), Ok(i as u64 + 1));
    }
    let (head, msgs) = n.read("lim", Some(1)).unwrap();
    assert_eq!(head, 8);
    assert_eq!(msgs.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6, 7, 8], "gap: 2 and 3 are gone");
    assert_eq!(msgs[0].payload, payload("lim", 3));
    let (_, msgs) = n.read("lim", Some(5)).unwrap();
    assert_eq!(msgs.iter().map(|e| e.seq).collect::<Vec<_>>(), [6, 7, 8]);
    // The same stream through another node: same creation time.
    let m = start(&s.addr(), "LIMIT", "replicas=1&per_user=5&timeout=1s", "m").unwrap();
    assert_eq!(m.log.created, n.log.created);
    drop(m);
    // The subjects belong to LIMIT: a second stream cannot have them.
    let e = start(&s.addr(), "OTHER", "replicas=1&timeout=1s", "n").err().expect("overlap refused");
    assert!(e.contains("overlap"), "{e}");
    // A stream of that name made by someone else, with other subjects.
    drop(n);
    make_stream(&s.addr(), "FOREIGN", "foreign.>");
    let e = start(&s.addr(), "FOREIGN", "replicas=1&timeout=1s", "n").err().expect("refused");
    assert!(e.contains("subjects"), "{e}");
}

/// Creates a stream with `subject` through a plain client.
fn make_stream(addr: &str, name: &str, subject: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = async_nats::connect(addr).await.unwrap();
        let js = async_nats::jetstream::new(c);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    });
}

/// Keeps one append in flight per user until `stop()` says so; every
/// answer, with when its request was sent.
struct Pump {
    /// (user, i) → (sent at, answer: Ok(seq) or Err(why))
    results: BTreeMap<(usize, usize), (Instant, Result<u64, LogError>)>,
}

/// `stop` sees the answers so far, the latest one's (sending time, taken?)
/// and the time.
fn pump(
    node: &mut Node,
    users: usize,
    mut stop: impl FnMut(&Pump, (Instant, bool), Instant) -> bool,
) -> Pump {
    let mut p = Pump { results: BTreeMap::new() };
    let mut inflight: HashMap<u64, (usize, usize, Instant)> = HashMap::new();
    let mut next = vec![0usize; users];
    let name = |u: usize| format!("user{u}");
    for (u, n) in next.iter_mut().enumerate() {
        let t = node.append(&name(u), b"", &payload(&name(u), 0), format!("{u}-0").as_bytes());
        inflight.insert(t, (u, 0, Instant::now()));
        *n = 1;
    }
    let mut stopping = false;
    while !inflight.is_empty() {
        let a = node.answer();
        let (token, r) = match a {
            Answer::Appended { token, seq, .. } => (token, Ok(seq)),
            Answer::NotAppended { token, why, .. } => (token, Err(why)),
            other => panic!("unexpected {other:?}"),
        };
        let (u, i, at) = inflight.remove(&token).expect("a token of ours");
        let ok = r.is_ok();
        if !ok {
            // A refusal comes at once when there is no leader: do not spin.
            std::thread::sleep(Duration::from_millis(5));
        }
        p.results.insert((u, i), (at, r));
        if !stopping && stop(&p, (at, ok), Instant::now()) {
            stopping = true;
        }
        if !stopping {
            let i = next[u];
            next[u] += 1;
            let t = node.append(&name(u), b"", &payload(&name(u), i), format!("{u}-{i}").as_bytes());
            inflight.insert(t, (u, i, Instant::now()));
        }
    }
    p
}

/// Every Appended message is in the log at its seq, each seq once.
fn check_kept(node: &mut Node, p: &Pump, users: usize) -> usize {
    let mut kept = 0;
    for u in 0..users {
        let user = format!("user{u}");
        let (head, msgs) = node.read(&user, Some(0)).unwrap();
        let at: HashMap<u64, &[u8]> = msgs.iter().map(|e| (e.seq, e.payload.as_slice())).collect();
        assert!(msgs.windows(2).all(|w| w[0].seq + 1 == w[1].seq), "{user}: consecutive seqs");
        assert_eq!(msgs.first().map(|e| e.seq), Some(1), "{user}: from seq 1");
        assert_eq!(msgs.last().map(|e| e.seq), Some(head));
        let mut seqs = Vec::new();
        for (&(uu, i), (_, r)) in p.results.range((u, 0)..(u + 1, 0)) {
            assert_eq!(uu, u);
            if let Ok(seq) = r {
                assert_eq!(at.get(seq).copied(), Some(payload(&user, i).as_slice()), "{user}'s {i} at {seq}");
                seqs.push(*seq);
                kept += 1;
            }
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{user}: seqs in request order");
    }
    kept
}

#[test]
fn stream_leader_killed_mid_appends() {
    let _g = serial();
    let Some(mut c) = JsCluster::start("failover") else { return };
    let mut node = start(&c.addrs(), "FAIL", "replicas=3&timeout=2s&per_user=100000", "a").unwrap();
    let leader = c.wait_stream_leader("FAIL", Duration::from_secs(10));
    println!("stream leader: server {leader} (pid {})", c.pid(leader));
    let users = 20;
    let began = Instant::now();
    let mut killed: Option<Instant> = None;
    let mut back: Option<Instant> = None;
    let p = pump(&mut node, users, |_, (sent, ok), now| {
        if killed.is_none() && now.duration_since(began) > Duration::from_secs(1) {
            c.kill(leader);
            killed = Some(Instant::now());
        }
        if let (Some(k), None) = (killed, back) {
            // The first append sent after the kill that the log took.
            if sent > k && ok {
                back = Some(now);
            }
        }
        match back {
            Some(b) => now.duration_since(b) > Duration::from_secs(1),
            None => now.duration_since(began) > Duration::from_secs(20),
        }
    });
    let killed = killed.expect("killed");
    let back = back.expect("appends resumed after the kill");
    let failover = back.duration_since(killed);
    let ok = p.results.values().filter(|r| r.1.is_ok()).count();
    let refused: Vec<&LogError> = p.results.values().filter_map(|r| r.1.as_ref().err()).collect();
    println!("LEADER_FAILOVER_MS={} ({} appends taken, {} refused)", failover.as_millis(), ok, refused.len());
    for why in &refused {
        assert!(matches!(why, LogError::Unavailable(_)), "{why}");
    }
    if let Some(why) = refused.first() {
        println!("  e.g. {why}");
    }
    assert!(failover <= Duration::from_secs(10), "fail-over took {failover:?}");
    let new_leader = c.wait_stream_leader("FAIL", Duration::from_secs(5));
    assert_ne!(new_leader, leader);
    // Nothing confirmed was lost.
    let kept = check_kept(&mut node, &p, users);
    assert_eq!(kept, ok);
    println!("all {kept} appended messages read back after the fail-over");
}

#[test]
fn quorum_lost_and_regained() {
    let _g = serial();
    let Some(mut c) = JsCluster::start("quorum") else { return };
    let mut node = start(&c.addrs(), "QUORUM", "replicas=3&timeout=1s", "a").unwrap();
    let users = 5;
    let p = pump(&mut node, users, |p, _, _| p.results.len() >= 100);
    assert!(p.results.values().all(|r| r.1.is_ok()));
    let leader = c.wait_stream_leader("QUORUM", Duration::from_secs(5));
    // Kill the leader and one other: no quorum anywhere.
    let other = (leader + 1) % 3;
    c.kill(leader);
    c.kill(other);
    let down = Instant::now();
    let mut refused_in = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        match node.append_wait("user0", b"", b"during the outage", format!("out-{i}").as_bytes()) {
            Err(LogError::Unavailable(why)) => {
                refused_in.push(t.elapsed());
                if i == 0 {
                    println!("refused: {why}");
                }
            }
            other => panic!("appended without quorum: {other:?}"),
        }
    }
    println!("QUORUM_LOST_REFUSED_IN_MS={:?}", refused_in.iter().map(|d| d.as_millis()).collect::<Vec<_>>());
    for d in &refused_in {
        assert!(*d <= Duration::from_millis(2500), "refused after {d:?} (timeout 1 s)");
    }
    let unhealthy = node.health(false, Duration::from_secs(3)).expect("Health(false)");
    println!("health false {:?} after the kill", unhealthy.duration_since(down));
    // Reads of what was kept may fail now, but say why.
    if let Err(why) = node.read("user0", None) {
        println!("read during the outage: {why}");
    }
    c.restart(leader);
    c.restart(other);
    let restarted = Instant::now();
    let healthy = node.health(true, Duration::from_secs(30)).expect("Health(true) after the restart");
    println!("HEALTH_BACK_MS={} after the restart", healthy.duration_since(restarted).as_millis());
    assert_eq!(node.health.iter().filter(|h| h.1).count(), 1, "transitions only");
    let mut tries = 0;
    let seq = loop {
        tries += 1;
        match node.append_wait("user0", b"", b"after", b"after-1") {
            Ok(seq) => break seq,
            Err(why) => {
                println!("  {:?} after the restart: {why}", restarted.elapsed());
                assert!(tries < 30, "appends never came back: {why}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    println!("APPENDS_BACK_MS={} after the restart", restarted.elapsed().as_millis());
    let (head, _) = node.read("user0", None).unwrap();
    assert_eq!(head, seq);
    let kept = check_kept(&mut node, &p, 1);
    println!("{kept} messages from before the outage read back; user0 at seq {seq}");
    check_kept(&mut node, &p, users);
}
