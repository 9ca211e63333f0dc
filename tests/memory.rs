//! Memory that no client can run away with (issue: reliability), over real
//! sockets: what the kernel holds for a client that never reads is bounded
//! by `--client-sndbuf`, read back from the kernel with `ss`.

mod util;

use std::process::Command;
use std::time::{Duration, Instant};

use herald::client::Publisher;
use herald::protocol::frame::Frame;
use herald::protocol::Channel;
use util::*;

/// (sk_sndbuf, wmem_queued) of the node's side of every established
/// connection on `port`, from `ss -tmn` (`skmem:(…,tbN,…,wN,…)`); none when
/// `ss` cannot be run.
fn node_side_skmem(port: u16) -> Option<Vec<(u64, u64)>> {
    let out = Command::new("ss")
        .args(["-tmnH", "state", "established", "sport", "=", &format!(":{port}")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |sk: &str, name: &str| -> u64 {
        sk.split(',')
            .find_map(|f| f.strip_prefix(name).filter(|v| v.bytes().all(|b| b.is_ascii_digit())))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(
        text.split("skmem:(")
            .skip(1)
            .map(|rest| {
                let sk = rest.split(')').next().unwrap_or("");
                (field(sk, "tb"), field(sk, "w"))
            })
            .collect(),
    )
}

#[test]
fn a_non_readers_kernel_send_buffer_is_bounded_by_client_sndbuf() {
    const SNDBUF: usize = 16 * 1024;
    const USERS: usize = 10;
    if node_side_skmem(1).is_none() {
        eprintln!("SKIP a_non_readers_kernel_send_buffer_is_bounded_by_client_sndbuf: `ss` (iproute2) cannot be run here");
        return;
    }
    // A queue far over what is sent, so nothing is cut as a slow consumer:
    // what does not fit the kernel waits in herald's own queue.
    let node = TestNode::start(herald::node::Config {
        client_sndbuf: SNDBUF,
        queue_bytes: 4 << 20,
        ..test_config()
    });
    // Clients that never read, with a small receive window from the start.
    let mut clients = Vec::new();
    for u in 0..USERS {
        let mut r = Raw::connect_small(node.client, Channel::ToClient, 4096);
        send_hello(&mut r, &token_for(&format!("nr{u}")), None);
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        clients.push(r);
    }
    // 512 KiB for each: 32 times the buffer asked for.
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let msg = vec![7u8; 4096];
    for _ in 0..128 {
        for u in 0..USERS {
            p.publish(format!("nr{u}").as_bytes(), &msg).unwrap();
        }
    }
    p.flush().unwrap();
    // Wait until the node's side of every connection has filled up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sk = loop {
        let sk = node_side_skmem(node.client.port()).unwrap_or_default();
        if sk.len() == USERS && sk.iter().all(|&(tb, w)| w >= tb / 2) || Instant::now() > deadline {
            break sk;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sk.len(), USERS, "one node-side socket per client: {sk:?}");
    for &(tb, w) in &sk {
        // Linux doubles SO_SNDBUF and keeps it (no autotuning).
        assert_eq!(tb, 2 * SNDBUF as u64, "the kernel send buffer is what --client-sndbuf asked: {sk:?}");
        assert!(w >= tb / 2, "the test filled the buffer: {sk:?}");
        // One write may overshoot the buffer by at most one segment's worth.
        assert!(w <= tb + 64 * 1024, "the kernel holds at most the bound: {sk:?}");
    }
    assert_eq!(node.closes("slow_consumer"), 0, "nobody was cut: the rest waits in herald's queue");
    drop(clients);
}
