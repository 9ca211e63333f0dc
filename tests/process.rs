//! The `herald` binary as a child process: drain on SIGTERM/SIGINT exits 0
//! after sending every client a GOODBYE.

mod util;

use std::process::Command;
use std::time::{Duration, Instant};

use herald::protocol::frame::Frame;
use herald::protocol::{Channel, Code, GoodbyeAction};
use util::proc::Proc;
use util::*;

fn write_secret(dir: &std::path::Path, name: &str, s: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

fn drain_on(signal: i32, threads: usize) {
    let dir = std::env::temp_dir().join(format!("herald-proc-{}-{signal}-{threads}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cs = write_secret(&dir, "c", CLIENT_SECRET);
    let ps = write_secret(&dir, "p", PUBLISHER_SECRET);
    let mut node = Proc::spawn(
        [
            "node",
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            "127.0.0.1:0",
            "--drain-window",
            "1s",
            "--threads",
            &threads.to_string(),
            "--metrics",
            "127.0.0.1:0",
            "--secret-file",
            cs.to_str().unwrap(),
            "--publisher-secret-file",
            ps.to_str().unwrap(),
        ],
        None,
    );
    // The first stderr line names the bound addresses.
    let addr: std::net::SocketAddr = node.after("clients on ").unwrap().parse().unwrap();
    let metrics: std::net::SocketAddr =
        node.after("metrics on http://").unwrap().trim_end_matches("/metrics").parse().unwrap();
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut r = Raw::connect(addr, Channel::ToClient);
        send_hello(&mut r, &token_for(&format!("u{i}")), None);
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        clients.push(r);
    }
    let t0 = Instant::now();
    node.signal(signal);
    let mut arrivals = Vec::new();
    for c in clients.iter_mut() {
        match frame(&c.expect(Duration::from_secs(5)), Channel::ToClient) {
            Frame::Goodbye(g) => {
                assert_eq!((g.reason, g.action), (Code::Draining, GoodbyeAction::AskDecision));
            }
            other => panic!("{other:?}"),
        }
        arrivals.push(t0.elapsed());
        assert!(matches!(c.next(Duration::from_secs(5)), Got::Eof));
        if arrivals.len() == 1 {
            // Draining: new connections are refused at once, not left in the backlog.
            let e = std::net::TcpStream::connect(addr).expect_err("a draining node must not accept");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
            // ... but it still answers its health check, with why.
            let h = http_get(metrics, "/healthz");
            assert!(h.starts_with("HTTP/1.1 503") && h.ends_with("draining\n"), "{h}");
        }
    }
    let (status, rest) = node.wait();
    assert!(status.success(), "node exited with {status}");
    // Goodbyes were spread over the window, not sent all at once.
    arrivals.sort();
    let spread = arrivals[arrivals.len() - 1] - arrivals[0];
    assert!(spread >= Duration::from_millis(500), "goodbyes spread over {spread:?}");
    assert!(rest.iter().any(|l| l.contains("drained")), "{rest:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_drains_and_exits_zero() {
    drain_on(libc::SIGTERM, 1);
}

#[test]
fn sigint_drains_and_exits_zero() {
    drain_on(libc::SIGINT, 1);
}

#[test]
fn sigterm_drains_every_loop_of_a_multi_loop_node_and_exits_zero() {
    drain_on(libc::SIGTERM, 3);
}

/// utime + stime of a process in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

#[test]
fn out_of_file_descriptors_pauses_accept_without_spinning() {
    let dir = std::env::temp_dir().join(format!("herald-emfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cs = write_secret(&dir, "c", CLIENT_SECRET);
    let ps = write_secret(&dir, "p", PUBLISHER_SECRET);
    // A node limited to 64 descriptors but told it may hold 1000 clients.
    let script = format!(
        "ulimit -n 64 && exec {} node --listen 127.0.0.1:0 --ingest 127.0.0.1:0 --metrics 127.0.0.1:0 \
         --capacity 1000 --secret-file {} --publisher-secret-file {} --drain-window 200ms --log-every 0",
        env!("CARGO_BIN_EXE_herald"),
        cs.display(),
        ps.display()
    );
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(&script);
    let mut node = Proc::start(sh);
    let field = |m: &str| -> std::net::SocketAddr { node.after(m).unwrap().parse().unwrap() };
    let (client, ingest) = (field("clients on "), field("ingest on "));
    let metrics: std::net::SocketAddr =
        node.after("metrics on http://").unwrap().trim_end_matches("/metrics").parse().unwrap();
    // One healthy client, and a publisher, before descriptors run out.
    let mut healthy = Raw::connect(client, Channel::ToClient);
    send_hello(&mut healthy, &token_for("healthy"), None);
    assert!(matches!(frame(&healthy.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
    let mut p = herald::client::Publisher::connect(&ingest.to_string(), &pub_credential()).unwrap();
    let metric = |name: &str| -> u64 {
        let body = http_get(metrics, "/metrics");
        body.lines().find(|l| l.starts_with(name)).unwrap().rsplit(' ').next().unwrap().parse().unwrap()
    };
    // Now flood it with connections: far more than 64 descriptors.
    let flood: Vec<std::net::TcpStream> =
        (0..120).filter_map(|_| std::net::TcpStream::connect(client).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_seconds(node.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_seconds(node.child.id()) - cpu0;
    assert!(cpu < 0.3, "the node burned {cpu:.2}s of CPU in 1s while out of descriptors");
    drop(flood);
    // It kept serving the established client throughout.
    p.publish(b"healthy", b"still served").unwrap();
    p.flush().unwrap();
    match frame(&healthy.expect(Duration::from_secs(5)), Channel::ToClient) {
        Frame::Deliver(d) => assert_eq!(d.payload, b"still served"),
        other => panic!("{other:?}"),
    }
    // The /metrics connection itself may have to wait for a descriptor; retry.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut emfile = 0;
    while emfile == 0 && std::time::Instant::now() < deadline {
        emfile = metric("herald_accept_emfile_total");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(emfile > 0, "the node never ran out of descriptors: the test proved nothing");
    // Once descriptors are free again, new clients get in.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut r = Raw::connect(client, Channel::ToClient);
        send_hello(&mut r, &token_for("later"), None);
        if let Got::Frame(b) = r.next(Duration::from_secs(2)) {
            if matches!(frame(&b, Channel::ToClient), Frame::Welcome(_)) {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "accepting never resumed");
    }
    node.signal(libc::SIGTERM);
    assert!(node.wait().0.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
