//! What confirmed forwarding (protocol.md §6.6) costs a confirming
//! publisher: the PUB_RESULT latency of one-at-a-time confirmed publishes
//! to a user on another node, on loopback (1 decision server, 2 nodes as
//! processes). A measurement run by hand, not in `cargo test`:
//!
//! ```sh
//! HERALD_BIN=path/to/herald cargo test --test confirm_cost -- --ignored --nocapture
//! ```
//!
//! (`HERALD_BIN` unset: this checkout's binary), so two builds can be
//! compared in one sitting. It prints percentiles and asserts only that
//! every result counted the forward.

mod util;
use herald::client::{Client, ClientConfig, Publisher};
use std::process::Command;
use std::time::{Duration, Instant};
use util::proc::{after, secrets_dir, Proc};
use util::*;

#[test]
#[ignore]
fn confirmed_publish_latency_to_a_user_on_another_node() {
    let bin = std::env::var("HERALD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_herald").to_owned());
    let dir = secrets_dir("confirm-cost", b"cluster-secret-for-tests", b"admin-secret-for-tests!");
    let decision = "decision --listen 127.0.0.1:0 --heartbeat 127.0.0.1:0 --cluster-secret-file cluster";
    let mut d = Command::new(&bin);
    d.args(decision.split(' ')).args(["--admin-secret-file", "admin"]).current_dir(&dir);
    let d = Proc::start(d);
    let tcp = after(&d.first_line, "requests on ").unwrap();
    let udp = after(&d.first_line, "heartbeats on ").unwrap();
    let darg = format!("{tcp}/{}", udp.rsplit(':').next().unwrap());
    // (process, client address, ingest address) of n1 and n2.
    let mut nodes = Vec::new();
    for id in ["n1", "n2"] {
        let mut n = Command::new(&bin);
        let flags = "--listen 127.0.0.1:0 --ingest 127.0.0.1:0 --heartbeat-interval 300ms --log-every 0";
        let files = "--secret-file client --publisher-secret-file publisher --cluster-secret-file cluster";
        n.args(["node", "--id", id, "--decision", &darg]).args(flags.split(' ')).args(files.split(' '));
        n.current_dir(&dir);
        let p = Proc::start(n);
        let addr = |m: &str| after(&p.first_line, m).unwrap();
        let (c, i) = (addr("clients on "), addr("ingest on "));
        nodes.push((p, c, i));
    }
    let mut client = Client::connect(ClientConfig::new(nodes[1].1.clone(), token_for("far"))).unwrap();
    let mut p = Publisher::connect(&nodes[0].2, &pub_credential()).unwrap();
    let t0 = Instant::now();
    loop {
        let r = p.publish_confirmed(b"far", b"x").unwrap();
        if r.forwarded == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The user keeps reading on its own thread.
    std::thread::spawn(move || while client.next_event_timeout(Duration::from_millis(100)).is_ok() {});
    let mut lat = Vec::new();
    for _ in 0..3000 {
        let t = Instant::now();
        let r = p.publish_confirmed(b"far", b"payload").unwrap();
        assert_eq!(r.forwarded, 1);
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort();
    let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
    eprintln!(
        "confirm_cost {bin}: n={} p50={}us p90={}us p99={}us max={}us",
        lat.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        lat[lat.len() - 1]
    );
}
