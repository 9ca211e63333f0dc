//! The `herald` binary as a child process: drain on SIGTERM/SIGINT exits 0
//! after sending every client a GOODBYE.

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald::protocol::frame::{self as f, Frame};
use herald::protocol::{Channel, Code, GoodbyeAction};
use util::*;

fn write_secret(dir: &std::path::Path, name: &str, s: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

fn drain_on(signal: i32) {
    let dir = std::env::temp_dir().join(format!("herald-proc-{}-{signal}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cs = write_secret(&dir, "c", CLIENT_SECRET);
    let ps = write_secret(&dir, "p", PUBLISHER_SECRET);
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["node", "--listen", "127.0.0.1:0", "--ingest", "127.0.0.1:0", "--drain-window", "1s"])
        .arg("--secret-file")
        .arg(&cs)
        .arg("--publisher-secret-file")
        .arg(&ps)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first stderr line names the bound addresses.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr =
        line.split("clients on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut r = Raw::connect(addr, Channel::ToClient);
        let t = token_for(&format!("u{i}"));
        r.send_frame(Frame::Hello(f::Hello {
            min_version: 1,
            max_version: 1,
            token: t.as_bytes(),
            agent: b"",
            resume: None,
        }));
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        clients.push(r);
    }
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
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
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "node exited with {status}");
    // Goodbyes were spread over the window, not sent all at once.
    arrivals.sort();
    let spread = arrivals[arrivals.len() - 1] - arrivals[0];
    assert!(spread >= Duration::from_millis(500), "goodbyes spread over {spread:?}");
    let rest: Vec<String> = err.lines().map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("drained")), "{rest:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_drains_and_exits_zero() {
    drain_on(libc::SIGTERM);
}

#[test]
fn sigint_drains_and_exits_zero() {
    drain_on(libc::SIGINT);
}
