//! A node with several event loops (`--threads`), over real sockets: what
//! only multi-loop nodes do. Users are picked by the loop that owns them
//! (`shard::owner`), so every case covers loop 0's own users and users that
//! are handed to another loop.

mod util;

use std::time::Duration;

use herald::client::Publisher;
use herald::node::shard::owner;
use herald::node::Config;
use herald::protocol::frame::Frame;
use herald::protocol::{token, Channel, Code, Position, ResumeResult};
use util::*;

const THREADS: usize = 3;

fn config() -> Config {
    Config { threads: THREADS, ..test_config() }
}

/// `n` user ids owned by loop `id`, with `prefix`.
fn users_on(id: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..).map(|i| format!("{prefix}{i}")).filter(|u| owner(u.as_bytes(), THREADS) == id).take(n).collect()
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
