//! `herald demo` as a user runs it: it must finish green, with and without
//! a node killed halfway, over TLS (the default) and with `--plaintext`;
//! and with `--source jetstream` (or `redis`), its traffic going through a
//! queue server the demo starts (skipped, saying so, when it is not
//! installed). In every form its slow client (a quarter of its stream's
//! bandwidth, on nodes run with `--slow-policy conflate`) has quotes
//! conflated, loses no fill or balance change and is never cut off. With
//! `--durable --chaos` (a 3-server JetStream cluster the demo starts) the
//! killed node's clients resume elsewhere and nothing is lost.

use std::io::Write as _;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn demo(args: &[&str]) -> (bool, String) {
    let (ok, out, _) = demo_err(args);
    (ok, out)
}

/// Also its stderr (the log, and the error that ends a failed run).
fn demo_err(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald")).arg("demo").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `bin` is installed where the demo looks (PATH and the sbin
/// directories); if not, says the test is skipped and why.
fn installed(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(Into::into))
        .any(|d| d.join(bin).is_file());
    if !found {
        let mut e = std::io::stderr();
        let _ = writeln!(e, "SKIP: {bin} is not installed (apt-get install -y {bin})");
    }
    found
}

/// The number after `label` on the summary line that starts with it.
fn summary(out: &str, label: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} line: {out}"))
}

/// The slow client's summary line: quotes conflated (some, when `some`),
/// no fill or balance change lost, never disconnected, and what it received
/// plus what was conflated is what was published to it.
fn assert_slow_client(out: &str, some: bool) {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("slow client        "))
        .unwrap_or_else(|| panic!("no slow client line: {out}"));
    assert!(line.contains(" quotes conflated, 0 fills/balances lost, 0 disconnects"), "{line}");
    let num = |after: &str, before: &str| -> u64 {
        let r = line.split(before).next().unwrap();
        let r = r.rsplit(after).next().unwrap();
        r.trim().replace(',', "").parse().unwrap_or_else(|_| panic!("{line}"))
    };
    let conflated = num("slow client", "quotes conflated");
    let published = num(":", "published");
    let received = num("published,", "received");
    assert_eq!(received + conflated, published, "{line}");
    if some {
        assert!(conflated > 0, "a client reading a quarter of its stream is conflated: {line}");
    }
    assert!(out.lines().any(|l| l.starts_with("t=") && l.contains("slow client: ")), "{out}");
}

/// A run through a queue: green, every message the queue stored was taken
/// by the nodes from it and reached its user, and the queue server the demo
/// started is gone with its data.
fn assert_through_queue(engine: &str, out: &str) {
    assert!(out.contains(&format!("path: backend → {engine} → herald → clients")), "{out}");
    assert!(out.contains(&format!("path               backend → {engine} → herald → clients")), "{out}");
    assert!(out.contains("OK: every message reached its own user"), "{out}");
    assert!(out.contains("wrong user         0"), "{out}");
    assert!(out.contains("duplicates         0"), "{out}");
    assert!(out.contains("lost, unannounced  0"), "{out}");
    assert_slow_client(out, false);
    let published = summary(out, "published");
    let taken = summary(out, "taken from queue");
    assert!(published > 0, "{out}");
    assert_eq!(summary(out, "received"), published, "every stored message was delivered: {out}");
    assert!(taken >= published, "the nodes took every message from the queue: {out}");
    assert!(out.lines().any(|l| l.starts_with("t=") && l.contains("n1:") && l.contains("n2:")), "{out}");
    let dir = out.split("(data in ").nth(1).and_then(|r| r.split(',').next()).expect("names its data dir");
    assert!(!std::path::Path::new(dir).exists(), "the queue server's data {dir} is removed at the end");
}

#[test]
fn demo_finishes_green() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "3s"]);
    assert!(ok, "{out}");
    assert!(out.contains("OK: every message reached its own user"), "{out}");
    assert!(out.contains("wrong user         0"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("t=") && l.contains("n1:") && l.contains("n2:")), "{out}");
    assert_slow_client(&out, true);
    assert!(out.contains("nodes run --slow-policy conflate"), "{out}");
    assert!(
        out.contains("TLS 1.3 on every client, publisher, mesh and decision-server connection"),
        "TLS by default: {out}"
    );
    let dir =
        out.split("throwaway CA in ").nth(1).and_then(|r| r.split(';').next()).expect("names its CA dir");
    assert!(!std::path::Path::new(dir).exists(), "the throwaway CA {dir} is removed at the end");
}

#[test]
fn demo_plaintext_finishes_green() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "2s", "--plaintext"]);
    assert!(ok, "{out}");
    assert!(out.contains("plaintext: no TLS"), "{out}");
    assert!(!out.contains("throwaway CA"), "{out}");
    assert!(out.contains("OK: every message reached its own user"), "{out}");
    assert_slow_client(&out, false);
}

#[test]
fn demo_with_chaos_rehomes_the_killed_nodes_clients() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "4s", "--chaos"]);
    assert!(ok, "{out}");
    assert!(out.contains("chaos: killing node n1"), "{out}");
    assert!(out.contains("chaos: all 200 clients live again"), "{out}");
    assert!(out.contains("lost, unannounced  0"), "{out}");
    // On the node --chaos does not kill: never cut off.
    assert_slow_client(&out, true);
}

#[test]
fn demo_durable_with_chaos_loses_nothing_and_the_killed_nodes_clients_resume() {
    if !installed("nats-server") {
        return;
    }
    let t0 = std::time::Instant::now();
    let (ok, out, err) = demo_err(&["--clients", "200", "--duration", "4s", "--durable", "--chaos"]);
    println!("demo --durable --chaos ran {:.1}s", t0.elapsed().as_secs_f64());
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("durable: every stream kept in a 3-server JetStream cluster (R=3) on loopback"),
        "{out}"
    );
    assert!(out.contains("OK: every message reached its own user, none lost"), "{out}");
    assert!(out.contains("wrong user         0"), "{out}");
    assert!(out.contains("duplicates         0"), "{out}");
    assert!(
        out.contains(
            "lost               0  (durable: streams kept in the log; n1's clients resumed elsewhere)"
        ),
        "{out}"
    );
    assert!(!out.contains("lost, announced"), "{out}");
    assert_eq!(summary(&out, "received"), summary(&out, "published"), "{out}");
    // The killed node's clients: every one back, every one RESUMED.
    let held: u64 = out
        .split("chaos: killing node n1 (holding ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no kill line: {out}"));
    assert!(held > 0, "{out}");
    assert!(out.contains("chaos: all 200 clients live again"), "{out}");
    let resumes = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("resumes            "))
        .unwrap_or_else(|| panic!("no resumes line: {out}"));
    let resumed: u64 = resumes.split(" RESUMED").next().unwrap().parse().unwrap();
    assert!(resumes.contains(" RESUMED, 0 RESTARTED, 0 GAP"), "{resumes}");
    assert!(resumed >= held, "every client of the killed node resumed: {resumes} (held {held})");
    assert_slow_client(&out, true);
    let dir = out.split("(data in ").nth(1).and_then(|r| r.split(',').next()).expect("names its data dir");
    assert!(!std::path::Path::new(dir).exists(), "the log's data {dir} is removed at the end");
}

#[test]
fn demo_through_jetstream_loses_nothing() {
    if !installed("nats-server") {
        return;
    }
    let (ok, out) = demo(&["--clients", "200", "--duration", "3s", "--source", "jetstream"]);
    assert!(ok, "{out}");
    assert_through_queue("JetStream", &out);
    assert!(out.contains("JetStream: nats-server started by the demo on 127.0.0.1:"), "{out}");
    assert!(out.contains("0 undelivered, 0 unacknowledged"), "the consumer is drained: {out}");
}

#[test]
fn demo_through_redis_loses_nothing() {
    if !installed("redis-server") {
        return;
    }
    let (ok, out, err) =
        demo_err(&["--clients", "200", "--duration", "2s", "--source", "redis", "--plaintext"]);
    assert!(ok, "{out}\n{err}");
    assert_through_queue("Redis", &out);
}

#[test]
fn demo_source_server_that_does_not_answer_fails_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("127.0.0.1:{port}");
    let (ok, out, err) = demo_err(&["--source", "jetstream", "--source-server", &server, "--duration", "1s"]);
    assert!(!ok, "{out}");
    assert!(err.contains(&format!("nats-server at {server} does not answer")), "{err}");
    assert!(!out.contains("herald demo:"), "no cluster was started: {out}");
}

/// The Redis backend's RESP against a real redis-server: the group is made
/// before the first entry, each `XADD` is counted once Redis stored it.
#[test]
fn demo_redis_backend_stores_what_it_counts() {
    if !installed("redis-server") {
        return;
    }
    use herald::demo::{Queue, Source};
    let q = Queue::open(Source::Redis, None).unwrap();
    q.prepare().unwrap();
    q.prepare().unwrap(); // the group exists: fine
    let published = Arc::new(AtomicU64::new(0));
    let mut b = q.backend(published.clone()).unwrap();
    for tick in 0..10 {
        for u in 0..7 {
            let key = if u % 2 == 0 { &b""[..] } else { b"EURUSD" };
            b.push(format!("u{u}").as_bytes(), key, format!("\0\r\n{tick} binary\x7f").as_bytes()).unwrap();
        }
        b.flush().unwrap();
    }
    b.finish().unwrap();
    assert_eq!(published.load(Ordering::SeqCst), 70);
    let st = q.state().unwrap();
    assert_eq!((st.stored, st.unacked, st.undelivered), (70, 0, 70), "{st:?}");
}
