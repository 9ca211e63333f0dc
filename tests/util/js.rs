//! Helpers for tests of the JetStream connector (`--source
//! jetstream://…`, protocol.md §12.1): a runtime, a stream like the one the
//! nodes consume, acknowledged publishes, and a paced background publisher.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::client::Client;

use super::herd::{assert_exactly_once, Herd};
use super::queues::Server;

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Publishes to JetStream with a publish acknowledgement, retrying (with the
/// same `Nats-Msg-Id`, so the stream keeps one copy) until it is stored.
pub async fn publish(
    js: &async_nats::jetstream::Context,
    subject: String,
    headers: &[(&str, String)],
    payload: Vec<u8>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, v.as_str());
        }
        let r = match js.publish_with_headers(subject.clone(), h, payload.clone().into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot publish to {subject}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn jetstream(addr: &str) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::new().retry_on_initial_connect().connect(addr).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // The stream the nodes consume, as they create it (protocol.md §12.1:
    // work-queue retention) if a node has not made it yet.
    if js.get_stream("HERALD").await.is_err() {
        let made = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: "HERALD".into(),
                subjects: vec!["herald.user.>".into()],
                retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await;
        // A node may have made it in between.
        assert!(made.is_ok() || js.get_stream("HERALD").await.is_ok(), "cannot make the stream: {made:?}");
    }
    js
}

pub fn source(nats: &Server, extra: &str) -> Vec<String> {
    vec!["--source".into(), format!("jetstream://{}/HERALD?ack_wait=1s{extra}", nats.addr())]
}

/// Publishes `per_user` messages to each of `users` through JetStream at
/// about `rate` a second, in the background; `sent` counts them.
pub fn publisher(
    addr: String,
    users: Vec<String>,
    per_user: usize,
    rate: u64,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        rt().block_on(async {
            let js = jetstream(&addr).await;
            let t0 = Instant::now();
            let mut n = 0u64;
            for i in 0..per_user {
                for u in &users {
                    let id = format!("{u}-{i}");
                    publish(&js, format!("herald.user.{u}"), &[("Nats-Msg-Id", id.clone())], id.into_bytes())
                        .await;
                    n += 1;
                    sent.fetch_add(1, Ordering::SeqCst);
                    let due = t0 + Duration::from_micros(n * 1_000_000 / rate);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(d).await;
                    }
                }
            }
        })
    })
}

/// The consuming-node kill both modes are tested with: `users`' clients on
/// node 0 (h, their home), nodes 1 (c1) and 2 (c2) sharing the consumer;
/// `per_user` messages each are published to the queue at `rate` a second,
/// c1 is SIGKILLed a third of the way in once it has taken some, and every
/// client must get each of its messages exactly once. Returns what c1 had
/// taken when it was killed.
pub fn kill_a_consumer_mid_stream(
    herd: &mut Herd,
    nats: &Server,
    users: &[String],
    per_user: usize,
    rate: u64,
) -> u64 {
    let mut clients: Vec<(String, Client)> =
        users.iter().map(|u| (u.clone(), herd.client_on(0, u))).collect();
    for u in users {
        herd.until_routed(1, u, b"probe");
        herd.until_routed(2, u, b"probe");
    }
    let sent = Arc::new(AtomicUsize::new(0));
    let p = publisher(nats.addr(), users.to_vec(), per_user, rate, sent.clone());
    // Kill c1 a third of the way in, once it has taken messages (on a
    // loaded machine c2 may have taken the first ones alone).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::SeqCst) < users.len() * per_user / 3
        || herd.nodes[1].metric("herald_source_messages_total") == 0
    {
        assert!(Instant::now() < deadline, "the publisher is stuck, or c1 never consumed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let taken_by_c1 = herd.nodes[1].metric("herald_source_messages_total");
    herd.nodes[1].proc.kill9();
    p.join().unwrap();
    assert_exactly_once(&mut clients, vec![Vec::new(); users.len()], per_user, Duration::from_secs(30));
    assert!(taken_by_c1 > 0, "c1 was consuming when it was killed");
    taken_by_c1
}
