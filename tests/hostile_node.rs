//! The reference client and publisher against a node that misbehaves, over
//! real sockets: a fake node on a TCP listener sends what a broken or
//! hostile server might. The libraries must neither panic nor hang; each
//! case here once did one or the other.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, Publisher};
use herald::protocol::frame::{self as f, Frame};
use herald::protocol::ResumeResult;

fn welcome(resume: ResumeResult, epoch: u64, next_seq: u64, heartbeat_ms: u32) -> Vec<u8> {
    Frame::Welcome(f::Welcome {
        version: 1,
        resume,
        heartbeat_ms,
        session_id: 1,
        epoch,
        next_seq,
        node_id: b"evil",
    })
    .to_vec()
}

/// A fake node: runs `script` on a thread with the listener; returns its address.
fn fake_node(script: impl FnOnce(TcpListener) + Send + 'static) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || script(l));
    addr
}

/// Accepts the next connection and reads (and ignores) its first bytes,
/// the HELLO.
fn accept_hello(l: &TcpListener) -> TcpStream {
    let (mut s, _) = l.accept().unwrap();
    let mut b = [0u8; 4096];
    let _ = s.read(&mut b);
    s
}

/// Runs `f` on a thread; its result, or None if it is still running after `within`.
fn within<T: Send + 'static>(within: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(within).ok()
}

#[test]
fn a_resume_from_the_largest_seq_does_not_overflow() {
    let addr = fake_node(|l| {
        // First session: a DELIVER with seq u64::MAX, then the node leaves.
        let mut s = accept_hello(&l);
        s.write_all(&welcome(ResumeResult::Fresh, 7, 1, 10_000)).unwrap();
        let mut d = Vec::new();
        f::encode_deliver(&mut d, 7, u64::MAX, b"x");
        s.write_all(&d).unwrap();
        drop(s);
        // The client resumes from u64::MAX; the node claims RESUMED.
        let mut s = accept_hello(&l);
        let _ = s.write_all(&welcome(ResumeResult::Resumed, 7, 5, 10_000));
        std::thread::sleep(Duration::from_secs(2));
    });
    let ran = std::thread::spawn(move || {
        let mut c = Client::connect(ClientConfig::new(addr.to_string(), "t")).unwrap();
        for _ in 0..6 {
            let _ = c.next_event_timeout(Duration::from_millis(300));
        }
    })
    .join();
    assert!(ran.is_ok(), "the client panicked");
}

#[test]
fn a_welcome_trickled_byte_by_byte_times_out() {
    let addr = fake_node(|l| {
        let mut s = accept_hello(&l);
        // A real WELCOME, one byte a second: it would take 25 s.
        let w = welcome(ResumeResult::Fresh, 7, 1, 10_000);
        assert!(w.len() > 20);
        for b in w {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let t0 = Instant::now();
    let r = within(Duration::from_secs(20), move || {
        Client::connect(ClientConfig::new(addr.to_string(), "t")).is_ok()
    });
    assert_eq!(r, Some(false), "connect must give up (after about 10 s), not wait for every byte");
    assert!(t0.elapsed() >= Duration::from_secs(9), "{:?}", t0.elapsed());
}

#[test]
fn a_node_that_floods_pings_and_never_reads_does_not_block_the_client() {
    let addr = fake_node(|l| {
        let mut s = accept_hello(&l);
        s.write_all(&welcome(ResumeResult::Fresh, 7, 1, 1000)).unwrap();
        let mut pings = Vec::new();
        for i in 0..10_000u64 {
            Frame::Ping(i).encode(&mut pings);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if s.write_all(&pings).is_err() {
                return;
            }
        }
    });
    // The PONGs back up; a write blocked past 3 heartbeats (3 s) drops the
    // session, and the client's calls return on time again.
    let r = within(Duration::from_secs(15), move || {
        let mut c = Client::connect(ClientConfig::new(addr.to_string(), "t")).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let _ = c.next_event_timeout(Duration::from_secs(1));
        }
    });
    assert!(r.is_some(), "the client was stuck writing PONGs");
}

#[test]
fn a_publisher_gives_up_on_a_node_that_only_pings() {
    let addr = fake_node(|l| {
        let mut s = accept_hello(&l);
        // Never a PUB_WELCOME, only a PING a second.
        for i in 0..30u64 {
            if s.write_all(&Frame::Ping(i).to_vec()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let r =
        within(Duration::from_secs(20), move || Publisher::connect(&addr.to_string(), "credential").is_ok());
    assert_eq!(r, Some(false), "the publisher must give up (after about 10 s)");
}

/// §3.2 / §5.2: a WELCOME or PUB_WELCOME that picks a version the hello did
/// not offer (the reference libraries offer 1..=2) is refused: the client
/// answers ERROR UNSUPPORTED_VERSION, the publisher fails to connect.
#[test]
fn a_welcome_with_a_version_not_offered_is_refused() {
    let (tx, rx) = mpsc::channel();
    let addr = fake_node(move |l| {
        let mut s = accept_hello(&l);
        let w = Frame::Welcome(f::Welcome {
            version: 3,
            resume: ResumeResult::Fresh,
            heartbeat_ms: 10_000,
            session_id: 1,
            epoch: 7,
            next_seq: 1,
            node_id: b"evil",
        });
        s.write_all(&w.to_vec()).unwrap();
        let mut b = vec![0u8; 256];
        let n = s.read(&mut b).unwrap_or(0);
        let _ = tx.send(b[..n].to_vec());
    });
    let r = within(Duration::from_secs(10), move || {
        let mut cfg = ClientConfig::new(addr.to_string(), "t");
        cfg.backoff_max = Duration::from_millis(50);
        Client::connect(cfg).map(|_| ())
    });
    assert!(matches!(r, Some(Err(_)) | None), "the client accepted version 3: {r:?}");
    let answer = rx.recv_timeout(Duration::from_secs(10)).expect("the client answered");
    match herald::protocol::decode(&answer, herald::protocol::Channel::ToNode) {
        Ok(herald::protocol::Decoded::Frame(Frame::Error(e), _)) => {
            assert_eq!(e.code, herald::protocol::Code::UnsupportedVersion)
        }
        other => panic!("{other:?}"),
    }

    let addr = fake_node(|l| {
        let mut s = accept_hello(&l);
        let w = Frame::PubWelcome(f::PubWelcome { version: 3, max_frame: 1 << 20, node_id: b"evil" });
        s.write_all(&w.to_vec()).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let r =
        within(Duration::from_secs(10), move || Publisher::connect(&addr.to_string(), "credential").is_ok());
    assert_eq!(r, Some(false), "the publisher accepted version 3");
}

/// Issue #11 item 3: a node that goes silent (its link cut without a RST)
/// is declared dead after 3 heartbeats even by a caller that polls with
/// short timeouts, so its clients fail over. Before, only one read that
/// itself waited 3 heartbeats could notice, and such a caller never did.
#[test]
fn a_silent_node_is_declared_dead_by_a_client_polling_with_short_timeouts() {
    let addr = fake_node(|l| {
        let mut s = accept_hello(&l);
        s.write_all(&welcome(ResumeResult::Fresh, 7, 1, 200)).unwrap();
        // Silent from now on, with the connection open.
        std::thread::sleep(Duration::from_secs(10));
        drop(s);
    });
    let dead = within(Duration::from_secs(8), move || {
        let mut c = Client::connect(ClientConfig::new(addr.to_string(), "t")).unwrap();
        let t0 = Instant::now();
        loop {
            match c.next_event_timeout(Duration::from_millis(50)) {
                Ok(Some(herald::client::Event::Disconnected { code, .. })) => return (code, t0.elapsed()),
                Ok(_) => assert!(t0.elapsed() < Duration::from_secs(5), "still connected"),
                Err(e) => panic!("{e}"),
            }
        }
    });
    let (code, after) = dead.expect("the client never noticed the silent node");
    assert_eq!(code, Some(herald::protocol::Code::IdleTimeout));
    assert!(after >= Duration::from_millis(550), "declared dead after {after:?}, before 3 heartbeats");
}
