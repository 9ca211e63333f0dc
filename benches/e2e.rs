//! End-to-end loopback latency through one node: publisher → node →
//! 500 clients, paced at 20,000 msg/s in 1 ms ticks for 5 s, latency from
//! the intended send time into an hdrhistogram; prints percentiles.
//!
//! Run: `cargo bench --bench e2e` (`E2E_CLIENTS`, `E2E_RATE`, `E2E_SECS` override).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::client::Publisher;
use herald::node::{Config, Node};
use herald::protocol::frame::BatchWriter;
use herald::protocol::token;
use herald::swarm::{mono_ns, user_name, Stamp, Swarm, SwarmConfig};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run short then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let clients = env("E2E_CLIENTS", 500) as usize;
    let rate = env("E2E_RATE", 20_000);
    let secs = if quick { 1 } else { env("E2E_SECS", 5) };
    let cs = b"e2e-bench-client-secret".to_vec();
    let ps = b"e2e-bench-publisher-secret".to_vec();
    let node = Node::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ingest: "127.0.0.1:0".parse().unwrap(),
        client_secret: cs.clone(),
        publisher_secret: ps.clone(),
        log_every: Duration::ZERO,
        drain_window: Duration::from_millis(100),
        ..Config::default()
    })
    .expect("bind");
    let (client_addr, ingest) = (node.client_addr().to_string(), node.ingest_addr().to_string());
    let stop_node = node.shutdown_handle();
    let node_thread = std::thread::spawn(move || node.run());

    let mut swarm = Swarm::new(SwarmConfig {
        count: clients,
        nodes: vec![client_addr],
        secret: cs,
        ..SwarmConfig::default()
    })
    .expect("swarm");
    assert_eq!(swarm.connect_all(Duration::from_secs(30), |_| {}), clients);
    let start = mono_ns() + 50_000_000;
    swarm.record_after = start + 500_000_000; // half a second of warm-up
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let recv = std::thread::spawn(move || {
        while !d2.load(Ordering::SeqCst) {
            swarm.step(Duration::from_millis(5));
        }
        swarm
    });

    let cred = token::mint(&ps, b"e2e", u32::MAX as u64).unwrap();
    let mut p = Publisher::connect(&ingest, &cred).expect("publisher");
    let mut next = vec![0u32; clients];
    let names: Vec<String> = (0..clients).map(user_name).collect();
    let mut payload = vec![0u8; 100];
    let mut buf = Vec::with_capacity(256 * 1024);
    let (mut owed, mut u, mut sent) = (0.0f64, 0usize, 0u64);
    for tick in 0..secs * 1000 {
        let intended = start + tick * 1_000_000;
        let now = mono_ns();
        if now < intended {
            std::thread::sleep(Duration::from_nanos(intended - now));
        }
        owed += rate as f64 / 1000.0;
        let k = owed as u64;
        owed -= k as f64;
        let mut w = BatchWriter::start(&mut buf, 0, 0);
        for _ in 0..k {
            Stamp { sent_ns: intended, user: u as u32, msg: next[u] }.write(&mut payload);
            next[u] += 1;
            if !w.push(&mut buf, names[u].as_bytes(), b"", &payload) {
                w.finish(&mut buf);
                w = BatchWriter::start(&mut buf, 0, 0);
                w.push(&mut buf, names[u].as_bytes(), b"", &payload);
            }
            u = (u + 1) % clients;
        }
        w.finish(&mut buf);
        p.write_raw(&buf).expect("publish");
        buf.clear();
        sent += k;
    }
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    let swarm = recv.join().unwrap();
    stop_node.trigger();
    let _ = node_thread.join();
    let h = &swarm.hist;
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "e2e/{clients}_clients/{rate}_msg_s: sent {sent} received {} wrong-user {} | latency µs p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} (n={})",
        swarm.tally.received,
        swarm.tally.wrong_user,
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    );
    assert_eq!(swarm.tally.received, sent, "messages lost");
    assert_eq!(swarm.tally.wrong_user, 0);
}
