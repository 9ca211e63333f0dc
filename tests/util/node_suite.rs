// Node behaviour over real sockets: routing, sessions, auth, bad input,
// slow consumers, resume, keepalive, admission, metrics. Included by
// tests/node.rs (one event loop) and tests/node_threads.rs (three), each of
// which defines `THREADS` and `mod util`.

use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, Event, Publisher};
use herald::node::{Config, SlowPolicy};
use herald::protocol::frame::{self as f, Frame};
use herald::protocol::{token, Channel, Code, GoodbyeAction, Position, ResumeResult, VERSION};
use util::*;

/// The suite's node configuration: the shared test defaults, with `THREADS`
/// event loops.
fn test_config() -> Config {
    Config { threads: THREADS, ..util::test_config() }
}

fn error_code(bytes: &[u8]) -> Code {
    match frame(bytes, Channel::ToClient) {
        Frame::Error(e) => e.code,
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// The connection ends with ERROR `code` and then EOF.
fn expect_error_then_eof(r: &mut Raw, code: Code) {
    let b = r.expect(Duration::from_secs(5));
    assert_eq!(error_code(&b), code);
    assert!(matches!(r.next(Duration::from_secs(5)), Got::Eof));
}

/// Writes `chunk` over and over, up to `limit` bytes, until a write stalls
/// for a second; returns how many bytes the node took.
fn flood(r: &mut Raw, chunk: &[u8], limit: usize) -> usize {
    use std::io::Write;
    r.sock.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut sent = 0;
    while sent < limit {
        match r.sock.write(chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

#[test]
fn a_peer_that_never_reads_its_answers_is_not_read_either() {
    const LIMIT: usize = 256 << 20;
    let node = TestNode::start(test_config());
    let (mut healthy, _) = raw_client(&node, "healthy", None);
    // A client that sends PINGs and never reads the PONGs.
    let mut pinger = Raw::connect_small(node.client, Channel::ToClient, 4096);
    send_hello(&mut pinger, &token_for("pinger"), None);
    assert!(matches!(frame(&pinger.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
    let mut pings = Vec::new();
    for i in 0..10_000u64 {
        Frame::Ping(i).encode(&mut pings);
    }
    let took = flood(&mut pinger, &pings, LIMIT);
    // What it took is its answers' bound (the 256 KiB queue) plus the
    // kernel's socket buffers, not everything it sent.
    assert!(took < 48 << 20, "the node read {} MiB of PINGs it could not answer", took >> 20);
    // A publisher that asks for a result for every publish and never reads.
    let mut publisher = Raw::connect_small(node.ingest, Channel::FromIngest, 4096);
    let cred = pub_credential();
    publisher.send_frame(Frame::PubHello(f::PubHello {
        min_version: 1,
        max_version: 1,
        credential: cred.as_bytes(),
        agent: b"",
    }));
    assert!(matches!(frame(&publisher.expect(Duration::from_secs(5)), Channel::FromIngest), Frame::PubWelcome(_)));
    let mut publishes = Vec::new();
    for i in 0..10_000u32 {
        Frame::Publish(f::Publish {
            flags: f::PUBLISH_WANT_RESULT,
            request_id: i,
            user: b"nobody",
            key: b"",
            payload: b"x",
        })
        .encode(&mut publishes);
    }
    let took = flood(&mut publisher, &publishes, LIMIT);
    assert!(took < 48 << 20, "the node read {} MiB of publishes whose results pile up", took >> 20);
    // Nobody else noticed.
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    p.publish(b"healthy", b"still here").unwrap();
    p.flush().unwrap();
    assert_eq!(read_delivers(&mut healthy, 1), vec![(1, b"still here".to_vec())]);
}

#[test]
fn a_frame_the_state_does_not_allow_is_refused_from_its_type_byte() {
    let mut cfg = test_config();
    cfg.cluster_secret = b"cluster-secret-for-tests".to_vec();
    let node = TestNode::start(cfg);
    let soon = Duration::from_secs(2); // the handshake deadline is 5 s
    // A PUBLISH before PUB_HELLO announcing a 1 MiB body: refused at once,
    // before the body is buffered.
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    r.send(&[0x00, 0x10, 0x00, 0x00, 0x11]);
    r.send(&[0u8; 1000]);
    assert_eq!(error_code(&r.expect(soon)), Code::UnexpectedFrame);
    // A PUB_HELLO announcing 1 MiB: no PUB_HELLO is longer than 587 bytes,
    // so it is refused from its header too.
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    r.send(&[0x00, 0x10, 0x00, 0x00, 0x10]);
    assert_eq!(error_code(&r.expect(soon)), Code::ProtocolError);
    // A PING header before HELLO on the client port, body never sent.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(&[0, 0, 0, 9, 0x02]);
    assert_eq!(error_code(&r.expect(soon)), Code::UnexpectedFrame);
    // PING is keepalive for established links: not half-way through the
    // mesh handshake, where nobody has proved the cluster secret yet.
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    send_peer_hello(&mut r, b"evil", [0; 16]);
    assert!(matches!(frame(&r.expect(soon), Channel::FromIngest), Frame::PeerWelcome(_)));
    r.send_frame(Frame::Ping(7));
    assert_eq!(error_code(&r.expect(soon)), Code::UnexpectedFrame);
}

#[test]
fn the_metrics_port_takes_a_few_connections_not_every_descriptor() {
    use std::io::Read;
    let node = TestNode::start(test_config());
    let addr = node.metrics.unwrap();
    let held: Vec<std::net::TcpStream> = (0..32).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    // The 33rd is closed at once (the node accepts in arrival order).
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert!(matches!(extra.read(&mut [0u8; 64]), Ok(0)), "the 33rd metrics connection must be closed");
    drop(held);
    // Served again once the node has seen those close (until then a new
    // connection may still be turned away, so no unwrap in here).
    let healthy = || {
        use std::io::Write;
        let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
        let mut out = String::new();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").is_ok()
            && s.read_to_string(&mut out).is_ok()
            && out.starts_with("HTTP/1.1 200")
    };
    assert!(eventually(healthy, true));
}

#[test]
fn a_message_reaches_only_its_user() {
    let node = TestNode::start(test_config());
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let mut clients: Vec<Raw> = users.iter().map(|u| raw_client(&node, u, None).0).collect();
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    for round in 0..25 {
        for u in &users {
            p.publish(u.as_bytes(), format!("{u}:{round}").as_bytes()).unwrap();
        }
    }
    p.flush().unwrap();
    for (u, c) in users.iter().zip(clients.iter_mut()) {
        let got = read_delivers(c, 25);
        for (i, (seq, payload)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert_eq!(payload, format!("{u}:{i}").as_bytes(), "{u} got someone else's message");
        }
        // And nothing more arrives.
        assert!(matches!(c.next(Duration::from_millis(100)), Got::Timeout));
    }
}

#[test]
fn every_session_of_a_user_receives_each_message() {
    let node = TestNode::start(test_config());
    let (mut desk, w1) = raw_client(&node, "trader", None);
    let (mut phone, w2) = raw_client(&node, "trader", None);
    assert_eq!(w1.epoch, w2.epoch, "sessions of one user share the stream");
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let r = p.publish_confirmed(b"trader", b"fill 1").unwrap();
    assert_eq!((r.accepted, r.local, r.no_route), (1, 1, 0));
    let r = p.publish_confirmed(b"nobody", b"x").unwrap();
    assert_eq!((r.accepted, r.local, r.no_route), (1, 0, 1));
    assert_eq!(read_delivers(&mut desk, 1), vec![(1, b"fill 1".to_vec())]);
    assert_eq!(read_delivers(&mut phone, 1), vec![(1, b"fill 1".to_vec())]);
}

#[test]
fn bad_input_closes_only_that_connection() {
    let mut cfg = test_config();
    cfg.handshake_timeout = Duration::from_millis(300);
    let node = TestNode::start(cfg);
    let (mut healthy, _) = raw_client(&node, "healthy", None);
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();

    let hello = |t: &str| {
        Frame::Hello(f::Hello {
            min_version: 1,
            max_version: 1,
            token: t.as_bytes(),
            agent: b"",
            resume: None,
        })
        .to_vec()
    };
    // Wrong secret.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(&hello(&token::mint(b"not-the-secret-at-all", b"eve", unix_now() + 60).unwrap()));
    expect_error_then_eof(&mut r, Code::AuthFailed);
    // Expired.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(&hello(&token::mint(CLIENT_SECRET, b"eve", unix_now() - 1).unwrap()));
    expect_error_then_eof(&mut r, Code::TokenExpired);
    // Not a token at all.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(&hello("garbage"));
    expect_error_then_eof(&mut r, Code::AuthFailed);
    // Oversized frame: rejected from the length alone.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(&[0x00, 0x10, 0x00, 0x00]);
    expect_error_then_eof(&mut r, Code::FrameTooLarge);
    // Garbage bytes (an HTTP request on the client port).
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    expect_error_then_eof(&mut r, Code::FrameTooLarge);
    // Unknown frame type.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send(&[0, 0, 0, 1, 0x7e]);
    expect_error_then_eof(&mut r, Code::UnknownFrameType);
    // Version negotiation (§3.1 step 3): the highest common version, 1 for
    // a version-1 client; no common version is UNSUPPORTED_VERSION.
    let t = token_for("v");
    for (min_version, max_version, chosen) in [(1, 1, Some(1)), (1, 2, Some(2)), (2, 9, Some(2)), (3, 4, None)] {
        let mut r = Raw::connect(node.client, Channel::ToClient);
        r.send_frame(Frame::Hello(f::Hello { min_version, max_version, token: t.as_bytes(), agent: b"", resume: None }));
        match chosen {
            Some(v) => match frame(&r.expect(Duration::from_secs(5)), Channel::ToClient) {
                Frame::Welcome(w) => assert_eq!(w.version, v, "{min_version}..={max_version}"),
                other => panic!("{min_version}..={max_version}: {other:?}"),
            },
            None => expect_error_then_eof(&mut r, Code::UnsupportedVersion),
        }
    }
    // A frame that is not allowed after the handshake.
    let (mut r, _) = raw_client(&node, "twice", None);
    r.send(&hello(&token_for("twice")));
    expect_error_then_eof(&mut r, Code::UnexpectedFrame);
    // Anything but HELLO first.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    r.send_frame(Frame::Ping(1));
    expect_error_then_eof(&mut r, Code::UnexpectedFrame);
    // A silent client is closed at the handshake deadline.
    let mut r = Raw::connect(node.client, Channel::ToClient);
    let t0 = Instant::now();
    expect_error_then_eof(&mut r, Code::HandshakeTimeout);
    assert!(t0.elapsed() < Duration::from_secs(3));
    // A publisher with a client token is refused.
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    let t = token_for("eve");
    r.send_frame(Frame::PubHello(f::PubHello {
        min_version: 1,
        max_version: 1,
        credential: t.as_bytes(),
        agent: b"",
    }));
    match frame(&r.expect(Duration::from_secs(5)), Channel::FromIngest) {
        Frame::Error(e) => assert_eq!(e.code, Code::AuthFailed),
        other => panic!("{other:?}"),
    }

    // Nobody else noticed.
    p.publish(b"healthy", b"still here").unwrap();
    p.flush().unwrap();
    assert_eq!(read_delivers(&mut healthy, 1), vec![(1, b"still here".to_vec())]);
    assert_eq!(eventually(|| node.closes("auth_failed"), 3), 3, "wrong secret, garbage token, publisher with a client token");
    assert_eq!(eventually(|| node.closes("token_expired"), 1), 1);
    assert_eq!(eventually(|| node.closes("protocol_error"), 5), 5, "too large, http, unknown type, 2 unexpected");
    assert_eq!(eventually(|| node.closes("unsupported_version"), 1), 1);
    assert_eq!(eventually(|| node.closes("handshake_timeout"), 1), 1);
}

#[test]
fn slow_consumer_is_disconnected_and_others_are_not_delayed() {
    let mut cfg = test_config();
    cfg.queue_bytes = 64 * 1024;
    let node = TestNode::start(cfg);
    let (stalled, _) = raw_client(&node, "stalled", None);
    // Shrink its receive buffer so the kernel cannot absorb everything.
    let _ = socket2::SockRef::from(&stalled.sock).set_recv_buffer_size(4096);
    let (mut healthy, _) = raw_client(&node, "healthy", None);
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let big = vec![7u8; 16 * 1024];
    let mut worst = Duration::ZERO;
    for i in 0..400u64 {
        p.publish(b"stalled", &big).unwrap();
        let t0 = Instant::now();
        p.publish(b"healthy", &i.to_be_bytes()).unwrap();
        p.flush().unwrap();
        let got = read_delivers(&mut healthy, 1);
        assert_eq!(got[0].0, i + 1);
        worst = worst.max(t0.elapsed());
    }
    assert_eq!(eventually(|| node.metric("herald_slow_consumer_disconnects_total"), 1), 1);
    // Generous bound: the healthy client is never held up by the stalled one.
    assert!(worst < Duration::from_millis(500), "healthy client waited {worst:?}");
    drop(stalled);
}

#[test]
fn resume_returns_exactly_the_missed_messages_in_order() {
    let node = TestNode::start(test_config());
    let (mut c, w) = raw_client(&node, "alice", None);
    assert_eq!((w.resume, w.next_seq), (ResumeResult::Fresh, 1));
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    for i in 1..=3 {
        p.publish(b"alice", format!("m{i}").as_bytes()).unwrap();
    }
    p.flush().unwrap();
    assert_eq!(read_delivers(&mut c, 3).last().unwrap().0, 3);
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    for i in 4..=9 {
        let r = p.publish_confirmed(b"alice", format!("m{i}").as_bytes()).unwrap();
        assert_eq!((r.local, r.no_route), (0, 1), "no session, but retained within grace");
    }
    let (mut c, w2) = raw_client(&node, "alice", Some(Position { epoch: w.epoch, seq: 3 }));
    assert_eq!((w2.resume, w2.epoch, w2.next_seq), (ResumeResult::Resumed, w.epoch, 4));
    let got = read_delivers(&mut c, 6);
    let want: Vec<(u64, Vec<u8>)> = (4..=9).map(|i| (i, format!("m{i}").into_bytes())).collect();
    assert_eq!(got, want);
    // Then live traffic continues the same stream.
    p.publish(b"alice", b"m10").unwrap();
    p.flush().unwrap();
    assert_eq!(read_delivers(&mut c, 1), vec![(10, b"m10".to_vec())]);
    // Operators see how sessions came in.
    assert_eq!(eventually(|| node.welcomes("resumed"), 1), 1);
    assert_eq!(eventually(|| node.welcomes("fresh"), 1), 1);
    assert_eq!(node.welcomes("gap") + node.welcomes("restarted"), 0);
    assert!(matches!(c.next(Duration::from_millis(100)), Got::Timeout));
    // An unknown epoch restarts, visibly.
    let (_c, w3) = raw_client(&node, "alice", Some(Position { epoch: w.epoch ^ 1, seq: 3 }));
    assert_eq!((w3.resume, w3.next_seq), (ResumeResult::Restarted, 11));
}

#[test]
fn gap_is_reported_when_retention_is_exceeded() {
    let mut cfg = test_config();
    cfg.retain_count = 4;
    let node = TestNode::start(cfg);
    let (c, w) = raw_client(&node, "bob", None);
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    for i in 1..=10 {
        p.publish_confirmed(b"bob", format!("m{i}").as_bytes()).unwrap();
    }
    let (mut c, w2) = raw_client(&node, "bob", Some(Position { epoch: w.epoch, seq: 0 }));
    assert_eq!((w2.resume, w2.next_seq), (ResumeResult::Gap, 7));
    let got: Vec<u64> = read_delivers(&mut c, 4).into_iter().map(|(s, _)| s).collect();
    assert_eq!(got, vec![7, 8, 9, 10]);
    // The sign for operators that retention is too small for their grace.
    assert_eq!(eventually(|| node.welcomes("gap"), 1), 1);
}

#[test]
fn client_library_delivers_in_order() {
    let node = TestNode::start(test_config());
    let mut client = Client::connect(ClientConfig::new(node.client.to_string(), token_for("carol"))).unwrap();
    assert!(matches!(client.next_event().unwrap(), Event::Connected { resume: ResumeResult::Fresh, .. }));
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    p.publish(b"carol", b"one").unwrap();
    p.flush().unwrap();
    match client.next_event().unwrap() {
        Event::Message(m) => assert_eq!((m.position.seq, &m.payload[..]), (1, &b"one"[..])),
        other => panic!("{other:?}"),
    }
    // Messages published while the application is not reading arrive in order.
    for i in 2..=5 {
        p.publish(b"carol", format!("m{i}").as_bytes()).unwrap();
    }
    p.flush().unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 4 {
        if let Event::Message(m) = client.next_event().unwrap() {
            seqs.push(m.position.seq);
        }
    }
    assert_eq!(seqs, vec![2, 3, 4, 5]);
}

#[test]
fn keepalive_pings_and_reaps_a_dead_client() {
    let mut cfg = test_config();
    cfg.heartbeat = Duration::from_millis(200);
    let node = TestNode::start(cfg);
    let (mut r, w) = raw_client(&node, "quiet", None);
    assert_eq!(w.heartbeat_ms, 200);
    // It gets a PING, does not answer, and is closed within 3 intervals (+ timer slack).
    let t0 = Instant::now();
    let b = r.expect(Duration::from_secs(2));
    assert!(matches!(frame(&b, Channel::ToClient), Frame::Ping(_)));
    let b = r.expect(Duration::from_secs(2));
    assert_eq!(error_code(&b), Code::IdleTimeout);
    assert!(t0.elapsed() < Duration::from_millis(1500), "reaped after {:?}", t0.elapsed());

    // A client that answers stays.
    let (mut alive, _) = raw_client(&node, "alive", None);
    let deadline = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < deadline {
        if let Got::Frame(b) = alive.next(Duration::from_millis(100)) {
            if let Frame::Ping(n) = frame(&b, Channel::ToClient) {
                alive.send_frame(Frame::Pong(n));
            }
        }
    }
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    p.publish(b"alive", b"x").unwrap();
    p.flush().unwrap();
    assert_eq!(read_delivers(&mut alive, 1)[0].1, b"x");
}

#[test]
fn server_full_is_refused_with_an_error() {
    let cfg = Config { capacity: 2, ..test_config() };
    let node = TestNode::start(cfg);
    let (_a, _) = raw_client(&node, "a", None);
    let (_b, _) = raw_client(&node, "b", None);
    let mut r = Raw::connect(node.client, Channel::ToClient);
    let b = r.expect(Duration::from_secs(5));
    assert_eq!(error_code(&b), Code::ServerFull);
    assert_eq!(eventually(|| node.metric("herald_rejects_server_full_total"), 1), 1);
}

#[test]
fn drop_policy_keeps_the_client_and_shows_a_gap() {
    let mut cfg = test_config();
    cfg.queue_bytes = 32 * 1024;
    cfg.slow_policy = SlowPolicy::Drop;
    let node = TestNode::start(cfg);
    let mut c = Raw::connect_small(node.client, Channel::ToClient, 4096);
    send_hello(&mut c, &token_for("dropper"), None);
    assert!(matches!(frame(&c.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let big = vec![1u8; 16 * 1024];
    for _ in 0..300 {
        p.publish(b"dropper", &big).unwrap();
    }
    p.publish_confirmed(b"dropper", b"last").unwrap();
    assert!(eventually(|| node.metric("herald_messages_dropped_total") > 0, true));
    // Reading everything shows seqs with holes, ending with the last one.
    let mut last = 0;
    let mut holes = 0;
    loop {
        let b = c.expect(Duration::from_secs(5));
        if let Frame::Deliver(d) = frame(&b, Channel::ToClient) {
            if d.seq != last + 1 {
                holes += 1;
            }
            last = d.seq;
            if d.payload == b"last" {
                break;
            }
        }
    }
    assert_eq!(last, 301);
    assert!(holes > 0);
}

/// With the Disconnect policy, the message that does not fit dooms the
/// session: nothing after it is queued, even a smaller message of the same
/// batch that would fit. What the client missed is then a clean suffix of
/// its stream, which a resume replays (the client once saw seq 1, then 3,
/// and a resume from 3 skipped 2 for good).
#[test]
fn a_slow_consumer_gets_nothing_after_the_message_that_did_not_fit() {
    let mut cfg = test_config();
    cfg.queue_bytes = 64 * 1024;
    let node = TestNode::start(cfg);
    let u = "gappy";
    let (mut c, w) = raw_client(&node, u, None);
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let (a, b) = (vec![b'a'; 60_000], vec![b'b'; 10_000]);
    p.publish_batch([(u.as_bytes(), &a[..]), (u.as_bytes(), &b[..]), (u.as_bytes(), &b"c"[..])]).unwrap();
    p.flush().unwrap();
    let mut seqs = Vec::new();
    let mut goodbye = false;
    while let Got::Frame(bytes) = c.next(Duration::from_secs(3)) {
        match frame(&bytes, Channel::ToClient) {
            Frame::Deliver(d) => seqs.push(d.seq),
            Frame::Goodbye(g) => {
                assert_eq!(g.reason, Code::SlowConsumer);
                goodbye = true;
            }
            _ => {}
        }
    }
    assert!(goodbye);
    assert_eq!(seqs, vec![1], "nothing after the message that did not fit");
    // Resuming replays the rest, in order.
    let (mut back, w2) = raw_client(&node, u, Some(Position { epoch: w.epoch, seq: 1 }));
    assert_eq!(w2.resume, ResumeResult::Resumed);
    let got = read_delivers(&mut back, 2);
    assert_eq!(got, vec![(2, b.clone()), (3, b"c".to_vec())]);
}

#[test]
fn goodbye_on_drain_for_in_process_node() {
    let node = TestNode::start(test_config());
    let (mut c, _) = raw_client(&node, "d", None);
    let stopper = std::thread::spawn(move || node.stop());
    let b = c.expect(Duration::from_secs(5));
    match frame(&b, Channel::ToClient) {
        Frame::Goodbye(g) => {
            assert_eq!(g.reason, Code::Draining);
            assert_eq!(g.action, GoodbyeAction::AskDecision);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.next(Duration::from_secs(5)), Got::Eof));
    stopper.join().unwrap().unwrap();
}

#[test]
fn client_library_resumes_without_loss_after_a_slow_consumer_disconnect() {
    let mut cfg = test_config();
    cfg.queue_bytes = 64 * 1024;
    cfg.retain_bytes = 16 << 20;
    cfg.retain_count = 100_000;
    cfg.retain_total = 64 << 20;
    let node = TestNode::start(cfg);
    let mut client = Client::connect(ClientConfig::new(node.client.to_string(), token_for("dave"))).unwrap();
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    // The application does not read while 600 × 16 KiB are published.
    let n = 600u64;
    let mut body = vec![0u8; 16 * 1024];
    for i in 1..=n {
        body[..8].copy_from_slice(&i.to_be_bytes());
        p.publish(b"dave", &body).unwrap();
    }
    p.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.metric("herald_slow_consumer_disconnects_total") == 0 {
        assert!(Instant::now() < deadline, "the node never saw a slow consumer");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Now it reads: every message arrives exactly once, in order, across the reconnect.
    let mut next = 1u64;
    let mut disconnects = 0;
    let mut resumed = false;
    while next <= n {
        assert!(Instant::now() < deadline, "stuck at {next}");
        match client.next_event_timeout(Duration::from_secs(5)).unwrap() {
            Some(Event::Message(m)) => {
                assert_eq!(m.position.seq, next);
                assert_eq!(m.payload[..8], next.to_be_bytes());
                next += 1;
            }
            Some(Event::Disconnected { .. }) => disconnects += 1,
            Some(Event::Connected { resume, lost, .. }) => {
                if resume == ResumeResult::Resumed {
                    resumed = true;
                }
                assert_eq!(lost, 0);
            }
            Some(Event::Gap { .. }) => panic!("no message may be lost"),
            Some(Event::Conflated { .. }) => panic!("unkeyed messages are never conflated"),
            None => panic!("no event for 5 s at {next}"),
        }
    }
    assert_eq!(disconnects, 1);
    assert!(resumed);
    assert_eq!(client.reconnects(), 1);
}

#[test]
fn a_heartbeat_outside_the_protocol_range_is_refused_at_bind() {
    for hb in [Duration::ZERO, Duration::from_millis(99), Duration::from_secs(3601)] {
        let cfg = Config { heartbeat: hb, ..test_config() };
        match herald::node::Node::bind(cfg) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{hb:?}"),
            Ok(_) => panic!("heartbeat {hb:?} accepted"),
        }
    }
}

#[test]
fn a_publisher_that_half_closes_still_gets_its_results() {
    let node = TestNode::start(test_config());
    let (_c, _) = raw_client(&node, "hc", None);
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    let cred = pub_credential();
    let mut out = Frame::PubHello(f::PubHello {
        min_version: VERSION,
        max_version: VERSION,
        credential: cred.as_bytes(),
        agent: b"",
    })
    .to_vec();
    for id in 1..=3u32 {
        f::encode_publish(&mut out, f::PUBLISH_WANT_RESULT, id, b"hc", b"", b"x");
    }
    r.send(&out);
    r.sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::FromIngest), Frame::PubWelcome(_)));
    for id in 1..=3u32 {
        match frame(&r.expect(Duration::from_secs(5)), Channel::FromIngest) {
            Frame::PubResult(p) => assert_eq!((p.request_id, p.local), (id, 1)),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(r.next(Duration::from_secs(5)), Got::Eof));
}

/// A fake node that answers HELLO with `welcome` and returns what the client
/// sent after it.
fn fake_node_answering(welcome: Vec<u8>) -> (String, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 2048];
        let _ = s.read(&mut hello).unwrap();
        s.write_all(&welcome).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    (addr, t)
}

#[test]
fn the_client_refuses_an_invalid_welcome_and_says_why() {
    let bad = Frame::Welcome(f::Welcome {
        version: 1,
        resume: ResumeResult::Resumed, // but the client did not ask to resume
        heartbeat_ms: 10_000,
        session_id: 1,
        epoch: 7,
        next_seq: 1,
        node_id: b"fake",
    })
    .to_vec();
    let (addr, t) = fake_node_answering(bad);
    match Client::connect(ClientConfig::new(addr, token_for("w"))) {
        Err(herald::client::ClientError::BadWelcome(m)) => assert!(m.contains("Resumed"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted an invalid WELCOME"),
    }
    let sent = t.join().unwrap();
    assert_eq!(error_code(&sent), Code::ProtocolError);
}
