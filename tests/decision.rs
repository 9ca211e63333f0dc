//! Decision servers over real sockets (protocol.md §7, §8): in-process
//! servers on port 0, fake nodes that send signed UDP heartbeats built with
//! the codec, and requests through `herald::decision::client` and raw frames.
//! The last test runs the real `herald decision` and `herald admin` binaries.
//!
//! Heartbeats are UDP and handled asynchronously, so tests wait until a
//! heartbeat is visible (NODES lists the node). A "sentinel" heartbeat sent
//! after datagrams that must be dropped proves they were processed: one
//! socket's datagrams are handled in order.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald::decision::client::{self, AdminReply, AssignOutcome, DecisionError, Dial, StatusRow};
use herald::decision::{Config, DecisionServer};
use herald::protocol::frame::{self as f, Frame, NODE_DRAINING};
use herald::protocol::{decode, AdminOp, Channel, Code, Decoded};
use util::proc::{self, Proc};
use util::TestDecision;

const CLUSTER: &[u8] = b"cluster-secret-for-tests";
const ADMIN: &[u8] = b"admin-secret-for-tests";
const T: Duration = Duration::from_secs(2);
/// Plaintext requests, [`T`] per server.
const PLAIN: &Dial = &Dial { timeout: T, tls: None };

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat: "127.0.0.1:0".parse().unwrap(),
        cluster_secret: CLUSTER.to_vec(),
        admin_secret: ADMIN.to_vec(),
        log_every: Duration::ZERO,
        ..Config::default()
    }
}

impl TestDecision {
    fn admin(&self, op: AdminOp, node: &str, value: u32) -> Result<AdminReply, DecisionError> {
        client::admin(&self.addr(), ADMIN, op, node, value, PLAIN)
    }

    fn status(&self) -> (u8, Vec<StatusRow>) {
        match self.admin(AdminOp::Status, "", 0).unwrap() {
            AdminReply::Status { ceiling_pct, rows } => (ceiling_pct, rows),
            other => panic!("{other:?}"),
        }
    }

    fn row(&self, node: &str) -> Option<StatusRow> {
        self.status().1.into_iter().find(|r| r.node_id == node)
    }

    /// The first-ranked node of one assignment, or None on NO_CAPACITY.
    fn assign_one(&self) -> Option<String> {
        match client::assign(&[self.addr()], next_user().as_bytes(), b"", 1, PLAIN).unwrap() {
            AssignOutcome::Nodes(n) => Some(n[0].node_id.clone()),
            AssignOutcome::NoCapacity { retry_after } => {
                assert!((1000..=2000).contains(&retry_after.as_millis()), "{retry_after:?}");
                None
            }
        }
    }

    /// Waits until NODES lists exactly `ids` (any order).
    fn wait_nodes(&self, ids: &[&str]) {
        let mut want: Vec<&str> = ids.to_vec();
        want.sort();
        wait_until(&format!("nodes {ids:?}"), || {
            let mut have: Vec<String> =
                client::nodes(&[self.addr()], PLAIN).unwrap().into_iter().map(|n| n.node_id).collect();
            have.sort();
            have == want
        });
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fake node: signed heartbeats over UDP, seq counting up.
struct FakeNode {
    id: String,
    incarnation: u64,
    seq: u64,
    endpoint: String,
    sock: UdpSocket,
}

impl FakeNode {
    fn new(id: &str) -> FakeNode {
        FakeNode {
            id: id.into(),
            incarnation: unix_ms(),
            seq: 0,
            endpoint: format!("127.0.0.1:{}", 7400 + id.len()),
            sock: UdpSocket::bind("127.0.0.1:0").unwrap(),
        }
    }

    /// The next heartbeat's bytes, signed with `secret`.
    fn next(&mut self, connections: u32, capacity: u32, flags: u8, secret: &[u8]) -> Vec<u8> {
        self.seq += 1;
        let mut v = Vec::new();
        Frame::Heartbeat(f::Heartbeat {
            version: 1,
            node_id: self.id.as_bytes(),
            incarnation: self.incarnation,
            seq: self.seq,
            sent_at_ms: unix_ms(),
            client_endpoint: self.endpoint.as_bytes(),
            ingest_endpoint: b"127.0.0.1:7401",
            connections,
            capacity,
            flags,
            msgs_in_per_s: 1,
            msgs_out_per_s: 2,
            cpu_permille: 3,
        })
        .encode_signed(&mut v, secret);
        v
    }

    fn send(&self, bytes: &[u8], to: &[&TestDecision]) {
        for d in to {
            self.sock.send_to(bytes, d.udp).unwrap();
        }
    }

    fn beat(&mut self, connections: u32, capacity: u32, to: &[&TestDecision]) {
        let b = self.next(connections, capacity, 0, CLUSTER);
        self.send(&b, to);
    }
}

/// Reads one whole frame from a raw connection; None at EOF.
fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(T)).unwrap();
    loop {
        if let Ok(Decoded::Frame(_, n)) = decode(buf, Channel::FromDecision) {
            let v = buf[..n].to_vec();
            buf.drain(..n);
            return Some(v);
        }
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn frame(bytes: &[u8]) -> Frame<'_> {
    match decode(bytes, Channel::FromDecision).unwrap() {
        Decoded::Frame(f, _) => f,
        Decoded::Incomplete(_) => panic!("incomplete"),
    }
}

/// A user id not asked for before in this process: the server counts a
/// user's repeated requests once, so each new assignment needs a new user.
fn next_user() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("user{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn assign_request(max_results: u8) -> Vec<u8> {
    let user = next_user();
    Frame::AssignRequest(f::AssignRequest { version: 1, user: user.as_bytes(), max_results, token: b"" })
        .to_vec()
}

/// §7.1: three nodes of capacity 100, 200, 300 at a 50 % ceiling and no
/// further heartbeats take exactly 50, 100 and 150 assignments, then the
/// server answers NO_CAPACITY. All 600 requests are pipelined on one
/// connection: each gets one answer, in order.
#[test]
fn spread_follows_headroom_then_no_capacity() {
    let d =
        TestDecision::start(Config { ceiling_pct: 50, expire_after: Duration::from_secs(30), ..config() });
    let mut nodes: Vec<FakeNode> = ["n100", "n200", "n300"].iter().map(|id| FakeNode::new(id)).collect();
    for (n, cap) in nodes.iter_mut().zip([100, 200, 300]) {
        n.beat(0, cap, &[&d]);
    }
    d.wait_nodes(&["n100", "n200", "n300"]);

    let mut s = TcpStream::connect(d.tcp).unwrap();
    let mut all = Vec::new();
    for _ in 0..600 {
        all.extend_from_slice(&assign_request(3));
    }
    s.write_all(&all).unwrap();
    let mut buf = Vec::new();
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..600 {
        let b = read_frame(&mut s, &mut buf).expect("an answer per request");
        match frame(&b) {
            Frame::Assignment(a) => {
                assert!(i < 300, "assignment #{i} after the ceiling was reached");
                let e: Vec<_> = a.entries.iter().collect();
                assert!(!e.is_empty() && e.len() <= 3);
                *counts.entry(String::from_utf8(e[0].node_id.to_vec()).unwrap()).or_default() += 1;
            }
            Frame::NoCapacity(n) => {
                assert!(i >= 300, "NO_CAPACITY at #{i}");
                assert!((1000..=2000).contains(&n.retry_after_ms));
            }
            other => panic!("{other:?}"),
        }
    }
    let counts: Vec<(String, u32)> = counts.into_iter().collect();
    assert_eq!(counts, [("n100".into(), 50), ("n200".into(), 100), ("n300".into(), 150)]);
    assert_eq!(d.assign_one(), None);
    for r in d.status().1 {
        assert_eq!(r.headroom, 0, "{r:?}");
    }
    // A heartbeat resets the node's count: capacity again.
    nodes[0].beat(30, 100, &[&d]);
    wait_until("headroom back", || d.row("n100").unwrap().headroom == 20);
    assert_eq!(d.assign_one().as_deref(), Some("n100"));
    let st = d.stop();
    assert_eq!((st.assignments, st.no_capacity), (301, 301));
}

/// §8: a heartbeat with a bad tag, and a replayed or older one, are dropped
/// silently and change nothing.
#[test]
fn forged_and_replayed_heartbeats_are_ignored() {
    let d = TestDecision::start(config());
    let mut a = FakeNode::new("a");
    let first = a.next(10, 100, 0, CLUSTER);
    a.send(&first, &[&d]);
    d.wait_nodes(&["a"]);
    for _ in 0..5 {
        assert_eq!(d.assign_one().as_deref(), Some("a"));
    }
    assert_eq!(d.row("a").unwrap().headroom, 80 - 10 - 5);
    // Replayed: would reset assigned_since_heartbeat (headroom 70).
    a.send(&first, &[&d]);
    // Forged: a newer seq for "a", and a new node, both with the wrong secret.
    let forged = a.next(0, 1000, 0, b"not-the-cluster-secret");
    a.send(&forged, &[&d]);
    let mut evil = FakeNode::new("evil");
    let e = evil.next(0, 1000, 0, b"not-the-cluster-secret");
    evil.send(&e, &[&d]);
    // Tampered after signing.
    let mut t = a.next(0, 1000, 0, CLUSTER);
    let at = t.len() - 40;
    t[at] ^= 0xff;
    a.send(&t, &[&d]);
    // Truncated and padded datagrams.
    let good = a.next(0, 1000, 0, CLUSTER);
    a.send(&good[..good.len() - 1], &[&d]);
    let mut padded = good.clone();
    padded.push(0);
    a.send(&padded, &[&d]);
    let mut s = FakeNode::new("sentinel");
    s.beat(0, 0, &[&d]);
    d.wait_nodes(&["a", "sentinel"]);
    let row = d.row("a").unwrap();
    assert_eq!((row.connections, row.capacity, row.headroom), (10, 100, 65), "{row:?}");
    let st = d.stop();
    assert_eq!(st.heartbeats, 2, "{st:?}");
    assert_eq!(st.heartbeat_rejects.get("replay"), Some(&1), "{st:?}");
    assert_eq!(st.heartbeat_rejects.get("bad_tag"), Some(&3), "{st:?}");
    assert_eq!(st.heartbeat_rejects.get("size_mismatch"), Some(&2), "{st:?}");
}

/// §8: a node that stops heartbeating expires after `expire_after` and is
/// neither assigned nor listed; its next heartbeat brings it back.
#[test]
fn silent_node_expires() {
    let d = TestDecision::start(Config { expire_after: Duration::from_millis(600), ..config() });
    let mut a = FakeNode::new("a");
    a.beat(0, 100, &[&d]);
    d.wait_nodes(&["a"]);
    assert_eq!(d.assign_one().as_deref(), Some("a"));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(d.assign_one(), None);
    assert!(client::nodes(&[d.addr()], PLAIN).unwrap().is_empty());
    a.beat(0, 100, &[&d]);
    d.wait_nodes(&["a"]);
    assert_eq!(d.assign_one().as_deref(), Some("a"));
}

/// §7.1: a client with two decision servers gets its answer from the second
/// when the first is dead.
#[test]
fn dead_decision_server_is_skipped() {
    let d1 = TestDecision::start(config());
    let d2 = TestDecision::start(config());
    let mut a = FakeNode::new("a");
    a.beat(0, 100, &[&d1, &d2]);
    d1.wait_nodes(&["a"]);
    d2.wait_nodes(&["a"]);
    let servers = [d1.addr(), d2.addr()];
    d1.stop();
    let t0 = Instant::now();
    match client::assign(&servers, b"u", b"", 2, &Dial::plain(Duration::from_secs(1))).unwrap() {
        AssignOutcome::Nodes(n) => {
            assert_eq!((n[0].node_id.as_str(), n[0].endpoint.as_str()), ("a", "127.0.0.1:7401"));
        }
        other => panic!("{other:?}"),
    }
    let nodes = client::nodes(&servers, &Dial::plain(Duration::from_secs(1))).unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].incarnation, nodes[0].ingest_endpoint.as_str()), (a.incarnation, "127.0.0.1:7401"));
    assert!(t0.elapsed() < Duration::from_secs(1), "a refused port costs no timeout");
    // With no server alive the caller gets the last error.
    let dead = vec![servers[0].clone()];
    assert!(matches!(client::assign(&dead, b"u", b"", 1, PLAIN), Err(DecisionError::Io(_))));
}

/// §7.3: a ceiling set by an admin applies from the next assignment,
/// globally and per node.
#[test]
fn ceiling_change_applies_to_the_next_assignment() {
    let d = TestDecision::start(config());
    let mut a = FakeNode::new("a");
    a.beat(0, 100, &[&d]);
    d.wait_nodes(&["a"]);
    assert_eq!(d.status().0, 80);
    assert_eq!(d.row("a").unwrap().headroom, 80);
    let r = d.admin(AdminOp::SetCeiling, "", 10).unwrap();
    assert_eq!(r, AdminReply::Done("global ceiling set to 10 %".into()));
    for _ in 0..10 {
        assert_eq!(d.assign_one().as_deref(), Some("a"));
    }
    assert_eq!(d.assign_one(), None);
    d.admin(AdminOp::SetCeiling, "a", 12).unwrap();
    assert_eq!(d.assign_one().as_deref(), Some("a"));
    assert_eq!(d.assign_one().as_deref(), Some("a"));
    assert_eq!(d.assign_one(), None);
    let row = d.row("a").unwrap();
    assert_eq!((row.ceiling_pct, row.headroom), (12, 0));
    // Out of range and unknown nodes are refused, the connection stays usable.
    for (node, value) in [("", 0), ("", 101), ("nobody", 50)] {
        match d.admin(AdminOp::SetCeiling, node, value) {
            Err(DecisionError::Rejected { code: Code::BadRequest, .. }) => {}
            other => panic!("{node:?} {value}: {other:?}"),
        }
    }
    assert_eq!(d.status().0, 10);
}

/// §7.2, §7.3: an admin drain flags the node DRAINING in NODES (that is how
/// the node itself learns of it) and stops assignments to it; undrain
/// reverses both.
#[test]
fn drain_and_undrain_via_admin() {
    let d = TestDecision::start(config());
    let mut big = FakeNode::new("big");
    let mut small = FakeNode::new("small");
    big.beat(0, 1000, &[&d]);
    small.beat(0, 100, &[&d]);
    d.wait_nodes(&["big", "small"]);
    let draining = |d: &TestDecision, id: &str| {
        client::nodes(&[d.addr()], PLAIN).unwrap().into_iter().find(|n| n.node_id == id).unwrap().draining
    };
    assert!(!draining(&d, "big"));
    assert_eq!(d.assign_one().as_deref(), Some("big"));
    d.admin(AdminOp::Drain, "big", 0).unwrap();
    assert!(draining(&d, "big"));
    assert!(!draining(&d, "small"));
    assert!(d.row("big").unwrap().draining);
    for _ in 0..20 {
        assert_eq!(d.assign_one().as_deref(), Some("small"));
    }
    d.admin(AdminOp::Undrain, "big", 0).unwrap();
    assert!(!draining(&d, "big"));
    assert_eq!(d.assign_one().as_deref(), Some("big"));
    // A node's own DRAINING flag is honoured too.
    let b = big.next(0, 1000, NODE_DRAINING, CLUSTER);
    big.send(&b, &[&d]);
    wait_until("self-reported drain", || draining(&d, "big"));
    assert_eq!(d.assign_one().as_deref(), Some("small"));
}

/// §7.3: an ADMIN with a tag that does not verify gets ERROR AUTH_FAILED and
/// the connection is closed; nothing changes.
#[test]
fn admin_with_wrong_secret_is_refused_and_closed() {
    let d = TestDecision::start(config());
    match client::admin(&d.addr(), b"not-the-admin-secret", AdminOp::SetCeiling, "", 5, PLAIN) {
        Err(DecisionError::Rejected { code: Code::AuthFailed, .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut s = TcpStream::connect(d.tcp).unwrap();
    let mut req = Vec::new();
    Frame::Admin(f::Admin {
        version: 1,
        timestamp_ms: unix_ms(),
        nonce: 1,
        op: AdminOp::SetCeiling,
        node_id: b"",
        value: 5,
    })
    .encode_signed(&mut req, b"not-the-admin-secret");
    // A valid request behind it must not be answered.
    req.extend_from_slice(&assign_request(1));
    s.write_all(&req).unwrap();
    let mut buf = Vec::new();
    match frame(&read_frame(&mut s, &mut buf).unwrap()) {
        Frame::Error(e) => assert_eq!(e.code, Code::AuthFailed),
        other => panic!("{other:?}"),
    }
    assert!(read_frame(&mut s, &mut buf).is_none(), "closed after the ERROR");
    assert_eq!(d.status().0, 80);
    // The same signed frame twice: the second is a replay (status 15).
    let mut ok = Vec::new();
    let ts = unix_ms();
    for _ in 0..2 {
        Frame::Admin(f::Admin {
            version: 1,
            timestamp_ms: ts,
            nonce: 9,
            op: AdminOp::Status,
            node_id: b"",
            value: 0,
        })
        .encode_signed(&mut ok, ADMIN);
    }
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.write_all(&ok).unwrap();
    assert!(matches!(frame(&read_frame(&mut s, &mut buf).unwrap()), Frame::AdminStatus(_)));
    match frame(&read_frame(&mut s, &mut buf).unwrap()) {
        Frame::AdminResult(r) => assert_eq!(r.status, 15),
        other => panic!("{other:?}"),
    }
    let st = d.stop();
    assert_eq!(st.admin_auth_failures, 2);
}

/// The ASSIGN flood, one user (§7.1): a thousand pipelined requests for
/// the same user count once against the node's headroom, so an honest
/// client asking next still gets the node (before, they used it all up and
/// the honest client was told NO_CAPACITY).
#[test]
fn one_user_flooding_assign_requests_uses_up_one_slot() {
    let d = TestDecision::start(config());
    let mut a = FakeNode::new("a");
    a.beat(0, 10, &[&d]); // headroom 8 at the 80 % ceiling
    d.wait_nodes(&["a"]);
    let one =
        Frame::AssignRequest(f::AssignRequest { version: 1, user: b"flooder", max_results: 1, token: b"" })
            .to_vec();
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.write_all(&one.repeat(1000)).unwrap();
    let mut buf = Vec::new();
    for i in 0..1000 {
        let b = read_frame(&mut s, &mut buf).expect("an answer per request");
        assert!(matches!(frame(&b), Frame::Assignment(_)), "request {i}: {:?}", frame(&b));
    }
    assert_eq!(d.row("a").unwrap().headroom, 8 - 1, "the flooder is counted once");
    assert_eq!(d.assign_one().as_deref(), Some("a"), "an honest client still gets the node");
}

const CLIENT: &[u8] = b"client-secret-for-tests";

/// A decision server that verifies ASSIGN_REQUEST tokens (§7.1, "Who asks").
fn verifying(require_token: bool) -> Config {
    let assign = herald::decision::asker::Policy { client_secret: CLIENT.to_vec(), require_token };
    Config { assign, ..config() }
}

fn token(user: &str, ttl_s: i64) -> String {
    let exp = (unix_ms() / 1000) as i64 + ttl_s;
    herald::protocol::token::mint(CLIENT, user.as_bytes(), exp as u64).unwrap()
}

/// Four connections pipelining `n` anonymous (version-1) ASSIGN_REQUESTs
/// each, every one under a made-up user: the ASSIGN flood of the
/// reliability issue. Returns how many ASSIGNMENTs they got.
fn anonymous_flood(d: &TestDecision, n: usize) -> usize {
    let mut conns: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(d.tcp).unwrap()).collect();
    for s in &mut conns {
        let reqs: Vec<u8> = (0..n).flat_map(|_| assign_request(1)).collect();
        s.write_all(&reqs).unwrap();
    }
    let mut assigned = 0;
    for s in &mut conns {
        let mut buf = Vec::new();
        for _ in 0..n {
            let b = read_frame(s, &mut buf).expect("an answer per request");
            assigned += usize::from(matches!(frame(&b), Frame::Assignment(_)));
        }
    }
    assigned
}

/// The ASSIGN flood under made-up user ids (§7.1): against a server without
/// the client secret it uses up the node's headroom, and an honest client
/// is told NO_CAPACITY (today's behaviour, and still the behaviour without
/// `--client-secret-file`); against a verifying server the flood is
/// answered but counted against nobody, so a client with its token still
/// gets the node, and is counted.
#[test]
fn anonymous_floods_cannot_fill_a_verifying_server() {
    let honest = token("honest", 600);
    let ask = |d: &TestDecision, user: &str| {
        client::assign(&[d.addr()], user.as_bytes(), honest.as_bytes(), 1, PLAIN)
    };
    for (cfg, verifies) in [(config(), false), (verifying(false), true)] {
        let d = TestDecision::start(cfg);
        let mut a = FakeNode::new("a");
        a.beat(0, 10, &[&d]); // headroom 8 at the 80 % ceiling
        d.wait_nodes(&["a"]);
        let assigned = anonymous_flood(&d, 50);
        assert_eq!(assigned, if verifies { 200 } else { 8 }, "verifies: {verifies}");
        let got = ask(&d, "honest").unwrap();
        if verifies {
            assert!(matches!(got, AssignOutcome::Nodes(_)), "{got:?}");
            assert_eq!(d.row("a").unwrap().headroom, 8 - 1, "only the token's user is counted");
            // Asking again under the same token counts nothing more.
            ask(&d, "").unwrap();
            assert_eq!(d.row("a").unwrap().headroom, 8 - 1);
        } else {
            assert!(matches!(got, AssignOutcome::NoCapacity { .. }), "{got:?}");
        }
    }
}

/// §7.1: a bad, expired or someone else's token is refused with its code
/// and the connection closed; with `--require-token` a request without a
/// token is refused too, and one with a token is answered.
#[test]
fn tokens_that_do_not_prove_the_user_are_refused() {
    let d = TestDecision::start(verifying(false));
    let mut a = FakeNode::new("a");
    a.beat(0, 100, &[&d]);
    d.wait_nodes(&["a"]);
    let refused = |d: &TestDecision, user: &str, tok: &str| match client::assign(
        &[d.addr()],
        user.as_bytes(),
        tok.as_bytes(),
        1,
        PLAIN,
    ) {
        Err(DecisionError::Rejected { code, .. }) => code,
        other => panic!("{user}/{tok}: {other:?}"),
    };
    let other_secret =
        herald::protocol::token::mint(b"another-secret-of-16+", b"eve", unix_ms() / 1000 + 60).unwrap();
    assert_eq!(refused(&d, "eve", &other_secret), Code::AuthFailed);
    assert_eq!(refused(&d, "eve", "v1.ZXZl.99999999999.00"), Code::AuthFailed);
    assert_eq!(refused(&d, "eve", &token("eve", -5)), Code::TokenExpired);
    assert_eq!(refused(&d, "mallory", &token("eve", 60)), Code::AuthFailed, "a user that is not the token's");
    assert!(
        matches!(client::assign(&[d.addr()], b"eve", b"", 1, PLAIN), Ok(AssignOutcome::Nodes(_))),
        "anonymous: answered"
    );
    assert_eq!(d.stop().assign_refused, 4);

    let d = TestDecision::start(verifying(true));
    let mut a = FakeNode::new("a");
    a.beat(0, 100, &[&d]);
    d.wait_nodes(&["a"]);
    assert_eq!(refused(&d, "eve", ""), Code::AuthFailed, "no token, --require-token");
    let ok = client::assign(&[d.addr()], b"", token("eve", 60).as_bytes(), 1, PLAIN).unwrap();
    assert!(matches!(ok, AssignOutcome::Nodes(_)), "{ok:?}");
}

/// The trickle attack (§7): a connection that sends part of a request and
/// then one byte at a time, never finishing it, is closed by the idle rule
/// like a silent one: only whole requests count as activity.
#[test]
fn a_trickled_partial_request_is_closed_as_idle() {
    let idle = Duration::from_millis(400);
    let d = TestDecision::start(Config { idle_timeout: idle, ..config() });
    let long_user = vec![b'u'; 200];
    let req =
        Frame::AssignRequest(f::AssignRequest { version: 1, user: &long_user, max_results: 1, token: b"" })
            .to_vec();
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.set_nodelay(true).unwrap();
    // One whole request first: answered, and the idle clock starts again.
    s.write_all(&Frame::NodesRequest(f::NodesRequest { version: 1 }).to_vec()).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(frame(&read_frame(&mut s, &mut buf).unwrap()), Frame::Nodes(_)));
    let t0 = Instant::now();
    s.write_all(&req[..8]).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut w = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // A byte every 100 ms for up to 3 s (7.5 idle periods): far more
        // than the rule allows, far less than the request needs.
        for b in &req[8..38] {
            if done_rx.try_recv().is_ok() || w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    match read_frame(&mut s, &mut buf).map(|v| match frame(&v) {
        Frame::Error(e) => Some(e.code),
        _ => None,
    }) {
        Some(Some(Code::IdleTimeout)) | None => {}
        other => panic!("expected IDLE_TIMEOUT or a close, got {other:?}"),
    }
    let took = t0.elapsed();
    let _ = done_tx.send(());
    trickle.join().unwrap();
    assert!(took < idle * 3, "closed {took:?} after the partial request began, the idle rule is {idle:?}");
}

/// §2.4, §7: framing errors and wrong versions get ERROR with the right
/// code, then the connection closes; requests split at every byte are
/// answered; an idle connection is closed with IDLE_TIMEOUT.
#[test]
fn bad_requests_errors_and_idle_close() {
    let d = TestDecision::start(Config { idle_timeout: Duration::from_millis(300), ..config() });
    let mut a = FakeNode::new("a");
    a.beat(0, 100, &[&d]);
    d.wait_nodes(&["a"]);
    // A version this server does not speak: UNSUPPORTED_VERSION, whatever
    // follows the version byte (another version may lay the body out
    // differently).
    let v3 = Frame::AssignRequest(f::AssignRequest { version: 3, user: b"", max_results: 0, token: b"\xff" })
        .to_vec();
    let nodes_v2 = Frame::NodesRequest(f::NodesRequest { version: 0 }).to_vec();
    let hello = Frame::Ping(7).to_vec();
    let mut bad_magic = assign_request(1);
    bad_magic[5] = b'X';
    let mut zero_results = assign_request(1);
    let last = zero_results.len() - 1;
    zero_results[last] = 0;
    let cases: [(&[u8], Code); 7] = [
        (&v3, Code::UnsupportedVersion),
        (&nodes_v2, Code::UnsupportedVersion),
        (b"GET / HTTP/1.1\r\n\r\n", Code::FrameTooLarge),
        (&[0, 0, 0, 0], Code::ProtocolError),
        (&[0, 0, 0, 1, 0x77], Code::UnknownFrameType),
        (&hello, Code::UnexpectedFrame),
        (&bad_magic, Code::BadMagic),
    ];
    for (bytes, code) in cases.iter().chain([(&zero_results[..], Code::ProtocolError)].iter()) {
        let mut s = TcpStream::connect(d.tcp).unwrap();
        // One good request first: answered before the failure.
        s.write_all(&assign_request(1)).unwrap();
        s.write_all(bytes).unwrap();
        let mut buf = Vec::new();
        assert!(matches!(frame(&read_frame(&mut s, &mut buf).unwrap()), Frame::Assignment(_)));
        match frame(&read_frame(&mut s, &mut buf).unwrap()) {
            Frame::Error(e) => assert_eq!(e.code, *code, "{bytes:?}"),
            other => panic!("{other:?}"),
        }
        assert!(read_frame(&mut s, &mut buf).is_none());
    }
    // Byte by byte.
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.set_nodelay(true).unwrap();
    let req = [assign_request(1), Frame::NodesRequest(f::NodesRequest { version: 1 }).to_vec()].concat();
    for b in &req {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut buf = Vec::new();
    assert!(matches!(frame(&read_frame(&mut s, &mut buf).unwrap()), Frame::Assignment(_)));
    assert!(matches!(frame(&read_frame(&mut s, &mut buf).unwrap()), Frame::Nodes(n) if n.entries.len() == 1));
    // Now idle: IDLE_TIMEOUT, then EOF.
    match frame(&read_frame(&mut s, &mut buf).unwrap()) {
        Frame::Error(e) => assert_eq!(e.code, Code::IdleTimeout),
        other => panic!("{other:?}"),
    }
    assert!(read_frame(&mut s, &mut buf).is_none());
    // A request followed by a half-close still gets its answer.
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.write_all(&assign_request(1)).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(frame(&read_frame(&mut s, &mut buf).unwrap()), Frame::Assignment(_)));
    assert!(read_frame(&mut s, &mut buf).is_none());
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-decision-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Admin settings survive a restart through the state file, including for
/// nodes the new server has not heard from yet.
#[test]
fn state_file_survives_restart() {
    let dir = temp_dir("state");
    let state = dir.join("decision.state");
    let cfg = Config { state_file: Some(state.clone()), ..config() };
    let d = TestDecision::start(cfg.clone());
    let mut a = FakeNode::new("a");
    let mut b = FakeNode::new("b");
    a.beat(0, 100, &[&d]);
    b.beat(0, 100, &[&d]);
    d.wait_nodes(&["a", "b"]);
    d.admin(AdminOp::SetCeiling, "", 40).unwrap();
    d.admin(AdminOp::SetCeiling, "a", 50).unwrap();
    d.admin(AdminOp::SetCapacity, "a", 2000).unwrap();
    d.admin(AdminOp::Drain, "b", 0).unwrap();
    d.stop();
    let text = std::fs::read_to_string(&state).unwrap();
    for line in ["ceiling 40", "ceiling a 50", "capacity a 2000", "drain b"] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }

    let d = TestDecision::start(cfg);
    assert_eq!(d.status(), (40, vec![]), "the global ceiling is back before any heartbeat");
    // Settings name nodes this server has not heard from yet: they are
    // known, so admin ops on them work; other ids are refused (§7.3).
    assert_eq!(
        d.admin(AdminOp::Drain, "b", 0).unwrap(),
        AdminReply::Done("node b was already drained".into())
    );
    assert!(matches!(
        d.admin(AdminOp::Drain, "c", 0),
        Err(DecisionError::Rejected { code: Code::BadRequest, .. })
    ));
    a.beat(0, 100, &[&d]);
    b.beat(0, 100, &[&d]);
    d.wait_nodes(&["a", "b"]);
    let ra = d.row("a").unwrap();
    assert_eq!((ra.capacity, ra.ceiling_pct, ra.headroom, ra.draining), (2000, 50, 1000, false));
    let rb = d.row("b").unwrap();
    assert_eq!((rb.capacity, rb.ceiling_pct, rb.headroom, rb.draining), (100, 40, 40, true));
    assert_eq!(d.assign_one().as_deref(), Some("a"));
    drop(d);
    // A corrupt state file stops the server from starting.
    std::fs::write(&state, "ceiling lots\n").unwrap();
    let e = DecisionServer::bind(Config { state_file: Some(state), ..config() }).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidData);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn write_file(dir: &Path, name: &str, s: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

/// The real binaries: `herald decision` prints its addresses, takes a
/// heartbeat, `herald admin status` shows the node, SIGTERM exits 0.
#[test]
fn binaries_decision_and_admin_status() {
    let dir = temp_dir("bin");
    let cs = write_file(&dir, "cluster", b"cluster-secret-for-tests\n");
    let admin_secret = write_file(&dir, "admin", b"admin-secret-for-tests\n");
    let mut args = proc::decision_args(&cs, &admin_secret);
    args.extend(["--ceiling".into(), "50".into()]);
    let mut server = Proc::spawn(args, None);
    // "herald decision: requests on ADDR, heartbeats on ADDR"
    let tcp = server.after("requests on ").unwrap();
    let udp: SocketAddr = server.after("heartbeats on ").unwrap().parse().unwrap();
    let mut node = FakeNode::new("bin-node");
    let hb = node.next(7, 1000, 0, CLUSTER);
    node.sock.send_to(&hb, udp).unwrap();
    let admin = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["admin", "--decision", &tcp, "--admin-secret-file"])
            .arg(&admin_secret)
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut out = String::new();
    wait_until("the node row", || {
        out = admin(&["status"]).1;
        out.contains("bin-node")
    });
    let row = out.lines().find(|l| l.starts_with("bin-node")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..7], ["bin-node", "127.0.0.1:7408", "7", "1000", "50", "%", "493"], "{out}");
    assert!(out.starts_with(&format!("{tcp}: global ceiling 50 %, 1 nodes")), "{out}");
    let (ok, out) = admin(&["drain", "bin-node"]);
    assert!(ok && out.contains("ok: node bin-node drained"), "{out}");
    let (ok, _) = admin(&["drain", "nobody"]);
    assert!(!ok, "an unknown node is refused");
    server.signal(libc::SIGTERM);
    let (status, log) = server.wait();
    assert!(status.success(), "decision server exited with {status}");
    // protocol.md §11: without --tls-cert the request port is plaintext, and says so.
    assert!(log.iter().any(|l| l.contains("is plaintext (unencrypted)")), "{log:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
