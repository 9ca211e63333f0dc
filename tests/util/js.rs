//! Helpers for tests of the JetStream connector (`--source
//! jetstream://…`, protocol.md §12.1): a runtime, a stream like the one the
//! nodes consume, acknowledged publishes, and a paced background publisher.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
