//! A node with several event loops (`--threads`), over real sockets: what
//! only multi-loop nodes do. Users are picked by the loop that owns them
//! (`shard::owner`), so every case covers loop 0's own users and users that
//! are handed to another loop.

mod util;

use std::time::Duration;

use herald::client::Publisher;
use herald::node::shard::owner;
use herald::node::Config;
use herald::protocol::frame::{self as f, Frame};
use herald::protocol::{sign, token, Channel, Code, Position, PresenceOp, ResumeResult, VERSION};
use util::*;

const THREADS: usize = 3;

fn config() -> Config {
    Config { threads: THREADS, ..test_config() }
}

/// `n` user ids owned by loop `id`, with `prefix`.
fn users_on(id: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..).map(|i| format!("{prefix}{i}")).filter(|u| owner(u.as_bytes(), THREADS) == id).take(n).collect()
}

const CLUSTER: &[u8] = b"cluster-secret-for-thread-tests";

/// Acts as a mesh initiator "a0" (< "t1") and returns the link after the snapshot.
fn fake_peer(node: &TestNode) -> Raw {
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    let nonce_i = [0x11u8; 16];
    send_peer_hello(&mut r, b"a0", nonce_i);
    let w = r.expect(Duration::from_secs(5));
    let nonce_a = match frame(&w, Channel::FromIngest) {
        Frame::PeerWelcome(w) => w.nonce,
        other => panic!("{other:?}"),
    };
    let tag = sign::peer_initiator_tag(CLUSTER, &nonce_i, &nonce_a, b"a0", b"t1");
    r.send_frame(Frame::PeerAuth(f::PeerAuth { tag }));
    // Snapshot.
    let s = r.expect(Duration::from_secs(5));
    assert!(matches!(frame(&s, Channel::FromIngest), Frame::Presence(_)));
    r
}

/// Presence entries (op, user) arriving on the link within `t`.
fn presence_within(r: &mut Raw, t: Duration) -> Vec<(PresenceOp, String)> {
    let mut v = Vec::new();
    let deadline = std::time::Instant::now() + t;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match r.next(left) {
            Got::Frame(b) => {
                if let Frame::Presence(p) = frame(&b, Channel::FromIngest) {
                    for e in p.entries.iter() {
                        v.push((e.op, String::from_utf8_lossy(e.user).into_owned()));
                    }
                }
            }
            _ => break,
        }
    }
    v
}

fn hello_bytes(user: &str) -> Vec<u8> {
    Frame::Hello(f::Hello {
        min_version: VERSION,
        max_version: VERSION,
        token: token_for(user).as_bytes(),
        agent: b"",
        resume: None,
    })
    .to_vec()
}

#[test]
fn every_loop_serves_its_users_and_only_them() {
    let node = TestNode::start(config());
    let users: Vec<String> = (0..THREADS).flat_map(|id| users_on(id, "spread-", 4)).collect();
    let mut clients: Vec<Raw> = users.iter().map(|u| raw_client(&node, u, None).0).collect();
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    // One confirmed publish each: the result knows the user is online here,
    // whichever loop holds it.
    for u in &users {
        let r = p.publish_confirmed(u.as_bytes(), format!("{u}:0").as_bytes()).unwrap();
        assert_eq!(
            (r.accepted, r.local, r.no_route),
            (1, 1, 0),
            "{u} on loop {}",
            owner(u.as_bytes(), THREADS)
        );
    }
    // Then a batch that interleaves users of every loop, in rounds.
    for round in 1..20 {
        let payloads: Vec<(String, String)> =
            users.iter().map(|u| (u.clone(), format!("{u}:{round}"))).collect();
        p.publish_batch(payloads.iter().map(|(u, m)| (u.as_bytes(), m.as_bytes()))).unwrap();
    }
    p.flush().unwrap();
    for (u, c) in users.iter().zip(clients.iter_mut()) {
        let got = read_delivers(c, 20);
        for (i, (seq, payload)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{u}: in order, no gaps");
            assert_eq!(payload, format!("{u}:{i}").as_bytes(), "{u} got someone else's message");
        }
        assert!(matches!(c.next(Duration::from_millis(50)), Got::Timeout), "{u}: nothing more");
    }
    // The node's figures add up every loop.
    assert_eq!(eventually(|| node.metric("herald_clients"), users.len() as u64), users.len() as u64);
    let out = users.len() as u64 * 20;
    assert_eq!(eventually(|| node.metric("herald_messages_out_total"), out), out);
    assert_eq!(node.metric("herald_messages_in_total"), out);
}

#[test]
fn sessions_of_one_user_share_its_loop_and_stream() {
    let node = TestNode::start(config());
    for id in 0..THREADS {
        let u = &users_on(id, "multi-", 1)[0];
        let (mut desk, w1) = raw_client(&node, u, None);
        let (mut phone, w2) = raw_client(&node, u, None);
        assert_eq!(w1.epoch, w2.epoch, "one stream per user");
        assert_ne!(w1.session_id, w2.session_id);
        let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
        p.publish_confirmed(u.as_bytes(), b"fill").unwrap();
        assert_eq!(read_delivers(&mut desk, 1), vec![(1, b"fill".to_vec())]);
        assert_eq!(read_delivers(&mut phone, 1), vec![(1, b"fill".to_vec())]);
    }
}

#[test]
fn resume_on_another_loop_replays_what_was_missed() {
    let node = TestNode::start(config());
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    for id in 0..THREADS {
        let u = &users_on(id, "resume-", 1)[0];
        let (mut c, w) = raw_client(&node, u, None);
        p.publish_confirmed(u.as_bytes(), b"1").unwrap();
        assert_eq!(read_delivers(&mut c, 1), vec![(1, b"1".to_vec())]);
        drop(c);
        // Offline now (once its loop has read the EOF and told loop 0): the
        // messages are retained for the grace period but count as no_route.
        let mut offline = || p.publish_confirmed(u.as_bytes(), b"probe").map(|r| r.local).unwrap();
        let mut tries = 0;
        while offline() != 0 {
            tries += 1;
            assert!(tries < 100, "{u} never went offline");
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = p.publish_confirmed(u.as_bytes(), b"missed").unwrap();
        assert_eq!((r.local, r.no_route), (0, 1));
        let (mut back, w2) = raw_client(&node, u, Some(Position { epoch: w.epoch, seq: 1 }));
        assert_eq!(w2.resume, ResumeResult::Resumed);
        let got = read_delivers(&mut back, 1 + tries + 1);
        assert_eq!(got.last().unwrap(), &(2 + tries as u64 + 1, b"missed".to_vec()), "{u}");
        assert_eq!(got[0].0, 2, "{u}: replay starts right after the position");
    }
}

#[test]
fn a_forged_token_for_another_loops_user_is_refused_and_leaves_no_route() {
    let node = TestNode::start(config());
    let victim = &users_on(2, "victim-", 1)[0];
    let forged = token::mint(b"not the node's secret", victim.as_bytes(), unix_now() + 60).unwrap();
    let mut r = Raw::connect(node.client, Channel::ToClient);
    send_hello(&mut r, &forged, None);
    match frame(&r.expect(Duration::from_secs(5)), Channel::ToClient) {
        Frame::Error(e) => assert_eq!(e.code, Code::AuthFailed),
        other => panic!("{other:?}"),
    }
    assert!(matches!(r.next(Duration::from_secs(5)), Got::Eof));
    // Nothing routes to the victim: the refusal reached loop 0.
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let mut tries = 0;
    loop {
        let res = p.publish_confirmed(victim.as_bytes(), b"x").unwrap();
        if (res.local, res.no_route) == (0, 1) {
            break;
        }
        tries += 1;
        assert!(tries < 100);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(eventually(|| node.closes("auth_failed"), 1), 1);
    assert_eq!(eventually(|| node.metric("herald_users"), 0), 0, "no stream was created");
}

#[test]
fn capacity_counts_clients_on_every_loop() {
    let node = TestNode::start(Config { capacity: THREADS, ..config() });
    let mut held: Vec<Raw> =
        (0..THREADS).map(|id| raw_client(&node, &users_on(id, "cap-", 1)[0], None).0).collect();
    let mut r = Raw::connect(node.client, Channel::ToClient);
    match frame(&r.expect(Duration::from_secs(5)), Channel::ToClient) {
        Frame::Error(e) => assert_eq!(e.code, Code::ServerFull),
        other => panic!("{other:?}"),
    }
    // A client leaving another loop makes room.
    held.pop();
    let u = &users_on(1, "cap-late-", 1)[0];
    let mut tries = 0;
    loop {
        let mut c = Raw::connect(node.client, Channel::ToClient);
        send_hello(&mut c, &token_for(u), None);
        match frame(&c.expect(Duration::from_secs(5)), Channel::ToClient) {
            Frame::Welcome(_) => break,
            Frame::Error(e) if e.code == Code::ServerFull && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn drain_says_goodbye_on_every_loop_and_returns() {
    let node = TestNode::start(config());
    let mut clients: Vec<Raw> =
        (0..THREADS).flat_map(|id| users_on(id, "bye-", 2)).map(|u| raw_client(&node, &u, None).0).collect();
    let stopping = std::thread::spawn(move || node.stop());
    for c in clients.iter_mut() {
        match frame(&c.expect(Duration::from_secs(5)), Channel::ToClient) {
            Frame::Goodbye(g) => assert_eq!(g.reason, Code::Draining),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.next(Duration::from_secs(5)), Got::Eof));
    }
    stopping.join().unwrap().unwrap();
}

/// A second session of an online user whose HELLO is followed, in the same
/// write, by a frame the node refuses: the session is welcomed and closed in
/// one read. The user's first session is still live, so peers must not hear
/// OFFLINE and PUB_RESULT must count it (loop 0 once lost count of it when
/// the owner reported Detached before Attached).
#[test]
fn a_session_closed_in_the_read_that_opened_it_leaves_the_user_online() {
    for id in [0usize, 1] {
        let node =
            TestNode::start(Config { threads: THREADS, cluster_secret: CLUSTER.to_vec(), ..test_config() });
        let mut peer = fake_peer(&node);
        let u = &users_on(id, "drift-", 1)[0];
        let (mut s1, _) = raw_client(&node, u, None);
        let p1 = presence_within(&mut peer, Duration::from_millis(500));
        assert_eq!(p1, vec![(PresenceOp::Online, u.clone())], "loop {id}");

        // Second session: HELLO + a second HELLO in one write -> WELCOME, then ERROR.
        let mut s2 = Raw::connect(node.client, Channel::ToClient);
        let mut bytes = hello_bytes(u);
        bytes.extend_from_slice(&hello_bytes(u));
        s2.send(&bytes);
        assert!(matches!(frame(&s2.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        match frame(&s2.expect(Duration::from_secs(5)), Channel::ToClient) {
            Frame::Error(e) => assert_eq!(e.code, Code::UnexpectedFrame),
            other => panic!("{other:?}"),
        }

        let p2 = presence_within(&mut peer, Duration::from_millis(500));
        let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
        let r = p.publish_confirmed(u.as_bytes(), b"still here?").unwrap();
        // s1 is alive and still receives the message.
        let got = read_delivers(&mut s1, 1);
        assert_eq!(got[0].1, b"still here?");
        assert!(
            !p2.iter().any(|(op, _)| *op == PresenceOp::Offline),
            "loop {id}: peers told {u} is OFFLINE while its first session is live: {p2:?}"
        );
        assert_eq!((r.local, r.no_route), (1, 0), "loop {id}: online user reported as no_route");
    }
}

/// A client's idle clock starts at its HELLO on every loop: a slow handshake
/// (within the deadline) with a short keepalive must not end in IDLE_TIMEOUT
/// right after the WELCOME (a handed-over client once inherited its accept
/// time as its last read).
#[test]
fn a_slow_handshake_does_not_count_as_idle_on_any_loop() {
    for id in [0usize, 1] {
        let node = TestNode::start(Config {
            threads: THREADS,
            heartbeat: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            ..test_config()
        });
        let u = &users_on(id, "idle-", 1)[0];
        let mut r = Raw::connect(node.client, Channel::ToClient);
        // First bytes early (a partial HELLO), the rest 3.2 s later.
        let hello = hello_bytes(u);
        r.send(&hello[..4]);
        std::thread::sleep(Duration::from_millis(3200));
        r.send(&hello[4..]);
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        let next = match r.next(Duration::from_millis(900)) {
            Got::Frame(b) => format!("{:?}", frame(&b, Channel::ToClient)),
            other => format!("{other:?}"),
        };
        assert!(!next.contains("IdleTimeout"), "loop {id}: closed as idle right after its WELCOME: {next}");
    }
}

/// During a drain a loop with no clients exits at once. A client whose HELLO
/// arrives then, for a user that loop owns, still gets ERROR DRAINING (from
/// loop 0), as on a single-loop node, not a silent close.
#[test]
fn a_hello_during_the_drain_is_answered_draining_whoever_owns_the_user() {
    let node =
        TestNode::start(Config { threads: THREADS, drain_window: Duration::from_secs(3), ..test_config() });
    let keep: Vec<Raw> = users_on(0, "keep-", 4).iter().map(|u| raw_client(&node, u, None).0).collect();
    let u = &users_on(1, "late-", 1)[0];
    let mut r = Raw::connect(node.client, Channel::ToClient);
    std::thread::sleep(Duration::from_millis(100));
    let stopping = std::thread::spawn(move || node.stop());
    std::thread::sleep(Duration::from_millis(500));
    let hello = hello_bytes(u);
    r.send(&hello);
    let got = match r.next(Duration::from_secs(3)) {
        Got::Frame(b) => format!("{:?}", frame(&b, Channel::ToClient)),
        other => format!("{other:?}"),
    };
    drop(keep);
    let _ = stopping.join();
    assert!(got.contains("Draining"), "expected ERROR DRAINING, got {got}");
}

/// protocol.md §6.4: the first PRESENCE on a link must begin a snapshot. A
/// peer that starts with a delta is refused; one that sends its snapshot
/// first may then send deltas.
#[test]
fn a_peer_whose_first_presence_is_a_delta_is_refused() {
    let node =
        TestNode::start(Config { threads: THREADS, cluster_secret: CLUSTER.to_vec(), ..test_config() });
    let mut delta = Vec::new();
    herald::node::mesh::encode_delta(&mut delta, &[(PresenceOp::Online, b"x".to_vec().into_boxed_slice())]);
    let mut rude = fake_peer(&node);
    rude.send(&delta);
    match frame(&rude.expect(Duration::from_secs(5)), Channel::FromIngest) {
        Frame::Error(e) => assert_eq!(e.code, Code::UnexpectedFrame),
        other => panic!("{other:?}"),
    }
    let mut polite = fake_peer(&node);
    let mut snapshot = Vec::new();
    herald::node::mesh::encode_snapshot(&mut snapshot, std::iter::empty());
    polite.send(&snapshot);
    polite.send(&delta);
    assert!(
        matches!(polite.next(Duration::from_millis(300)), Got::Timeout),
        "a snapshot, then deltas, is fine"
    );
}

/// Regression (review of the shared event loop): a message published right
/// behind a HELLO that loop 0 hands to another loop must find the session;
/// the owner used to take the batch behind the hand-over before running the
/// HELLO, so the message was neither delivered nor retained.
#[test]
fn a_publish_right_behind_a_handed_over_hello_reaches_the_new_session() {
    let node = TestNode::start(config());
    let mut p = Raw::connect(node.ingest, Channel::FromIngest);
    let cred = pub_credential();
    p.send_frame(Frame::PubHello(f::PubHello {
        min_version: VERSION,
        max_version: VERSION,
        credential: cred.as_bytes(),
        agent: b"",
    }));
    let _ = p.expect(Duration::from_secs(5));
    let users = users_on(1, "behind", 40);
    let mut got = 0;
    for u in &users {
        let mut c = Raw::connect(node.client, Channel::ToClient);
        let publish = Frame::Publish(f::Publish {
            flags: 0,
            request_id: 0,
            user: u.as_bytes(),
            key: b"",
            payload: b"x",
        });
        send_hello(&mut c, &token_for(u), None);
        p.send_frame(publish);
        assert!(matches!(frame(&c.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        if let Got::Frame(b) = c.next(Duration::from_millis(300)) {
            got += matches!(frame(&b, Channel::ToClient), Frame::Deliver(_)) as usize;
        }
    }
    // The HELLO and the PUBLISH travel on two connections, so loop 0 may
    // now and then read the PUBLISH first (then it has no route, correctly);
    // without the fix almost none arrive.
    assert!(got >= users.len() - 4, "{got} of {} delivered", users.len());
}
