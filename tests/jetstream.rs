//! The JetStream connector (`--source jetstream://…`, protocol.md §12.1)
//! against a real `nats-server -js` the test starts: messages published to
//! the stream reach their users; malformed ones are dead-lettered and do not
//! stall the consumer; a consuming node killed mid-stream loses nothing and
//! duplicates nothing; a restarted NATS server loses nothing.

mod util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::client::Client;
use util::herd::{assert_exactly_once, collect, Herd};
use util::queues::{Kind, Server};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Publishes to JetStream with a publish acknowledgement, retrying (with the
/// same `Nats-Msg-Id`, so the stream keeps one copy) until it is stored.
async fn publish(
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

async fn jetstream(addr: &str) -> async_nats::jetstream::Context {
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

fn source(nats: &Server, extra: &str) -> Vec<String> {
    vec!["--source".into(), format!("jetstream://{}/HERALD?ack_wait=1s{extra}", nats.addr())]
}

#[test]
fn stream_messages_reach_their_users_and_malformed_ones_are_dead_lettered() {
    let Some(nats) = Server::start(Kind::Nats, "js-basic") else { return };
    let mut herd = Herd::new("js-basic");
    herd.start_node("j1", &source(&nats, "&dead_letter=herald.dead"));
    let mut alice = herd.client_on(0, "alice");
    let mut bob = herd.client_on(0, "bob");
    let rt = rt();
    let dead = rt.block_on(async {
        let js = jetstream(&nats.addr()).await;
        let client = async_nats::connect(nats.addr()).await.unwrap();
        let dead = client.subscribe("herald.dead").await.unwrap();
        client.flush().await.unwrap();
        for i in 0..50 {
            publish(&js, "herald.user.alice".into(), &[], format!("a{i}").into_bytes()).await;
            if i == 10 {
                // Malformed: a user id over 64 bytes, and a payload over 64 KiB.
                let long = "u".repeat(65);
                publish(&js, "herald.user.x".into(), &[("Herald-User", long)], b"bad user".to_vec()).await;
                publish(&js, "herald.user.alice".into(), &[], vec![b'p'; 70_000]).await;
            }
        }
        // The user from a header rather than the subject, with a key.
        publish(
            &js,
            "herald.user.someone".into(),
            &[("Herald-User", "bob".into()), ("Herald-Key", "k".into())],
            b"b0".to_vec(),
        )
        .await;
        (client, dead)
    });
    let got = collect(&mut alice, 50, Duration::from_secs(15));
    let want: Vec<Vec<u8>> = (0..50).map(|i| format!("a{i}").into_bytes()).collect();
    assert_eq!(got, want, "alice gets her 50 messages once each, in order, and not the oversized one");
    assert_eq!(collect(&mut bob, 1, Duration::from_secs(5)), vec![b"b0".to_vec()]);
    assert!(collect(&mut alice, 1, Duration::from_millis(500)).is_empty(), "nothing more for alice");
    // Both malformed messages went to the dead-letter subject, with why.
    let (_client, mut dead) = dead;
    let reasons = rt.block_on(async {
        use futures_util::StreamExt;
        let mut r = Vec::new();
        for _ in 0..2 {
            let m = tokio::time::timeout(Duration::from_secs(5), dead.next())
                .await
                .expect("dead letter")
                .unwrap();
            r.push(m.headers.unwrap().get("Herald-Error").unwrap().as_str().to_owned());
        }
        r.sort();
        r
    });
    assert_eq!(reasons, ["payload over 65536 bytes", "user id over 64 bytes"]);
    assert_eq!(herd.nodes[0].metric("herald_source_messages_total"), 51);
}

/// Publishes `per_user` messages to each of `users` through JetStream at
/// about `rate` a second, in the background; `sent` counts them.
fn publisher(
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

#[test]
fn a_consuming_node_killed_mid_stream_loses_nothing_and_duplicates_nothing() {
    let Some(nats) = Server::start(Kind::Nats, "js-kill") else { return };
    let mut herd = Herd::new("js-kill");
    // h: the users' home, consuming nothing; c1 and c2 share the consumer.
    herd.start_node("h", &[]);
    herd.start_node("c1", &source(&nats, ""));
    herd.start_node("c2", &source(&nats, ""));
    herd.wait_listed(3);
    let users: Vec<String> = (0..10).map(|i| format!("ku{i}")).collect();
    let mut clients: Vec<(String, Client)> =
        users.iter().map(|u| (u.clone(), herd.client_on(0, u))).collect();
    for u in &users {
        herd.until_routed(1, u, b"probe");
        herd.until_routed(2, u, b"probe");
    }
    let per_user = 300;
    let sent = Arc::new(AtomicUsize::new(0));
    let p = publisher(nats.addr(), users.clone(), per_user, 1500, sent.clone());
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
    eprintln!(
        "c1 had taken {taken_by_c1} when killed; c2 took {}; h dropped {} redelivered copies",
        herd.nodes[2].metric("herald_source_messages_total"),
        herd.nodes[0].metric("herald_source_duplicates_total")
    );
    assert!(taken_by_c1 > 0, "c1 was consuming when it was killed");
}

#[test]
fn a_restarted_nats_server_loses_nothing() {
    let Some(mut nats) = Server::start(Kind::Nats, "js-restart") else { return };
    let mut herd = Herd::new("js-restart");
    herd.start_node("r1", &source(&nats, ""));
    let users: Vec<String> = (0..5).map(|i| format!("ru{i}")).collect();
    let mut clients: Vec<(String, Client)> =
        users.iter().map(|u| (u.clone(), herd.client_on(0, u))).collect();
    let per_user = 300;
    let sent = Arc::new(AtomicUsize::new(0));
    let p = publisher(nats.addr(), users.clone(), per_user, 1000, sent.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::SeqCst) < users.len() * per_user / 3 {
        assert!(Instant::now() < deadline, "the publisher is stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
    nats.restart(Duration::from_secs(1));
    p.join().unwrap();
    assert_exactly_once(&mut clients, vec![Vec::new(); users.len()], per_user, Duration::from_secs(30));
}
