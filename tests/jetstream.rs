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
use util::js::{jetstream, kill_a_consumer_mid_stream, publish, publisher, rt, source};
use util::queues::{Kind, Server};

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
    let taken_by_c1 = kill_a_consumer_mid_stream(&mut herd, &nats, &users, 300, 1500);
    eprintln!(
        "c1 had taken {taken_by_c1} when killed; c2 took {}; h dropped {} redelivered copies",
        herd.nodes[2].metric("herald_source_messages_total"),
        herd.nodes[0].metric("herald_source_duplicates_total")
    );
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
