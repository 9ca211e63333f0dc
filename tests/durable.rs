//! Durable mode (`herald node --durable jetstream://…`, protocol.md §13)
//! against a real 3-server JetStream cluster (R=3) the test starts on
//! loopback ports: a node killed mid-stream loses nothing, its clients
//! resume on the other node and get every confirmed message exactly once,
//! in order, including those published while they had no node. Skipped
//! with a printed reason where nats-server is not installed.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, Event, Publisher};
use herald::protocol::ResumeResult;
use util::herd::Herd;
use util::jscluster::JsCluster;

/// What one client thread saw.
#[derive(Default, Debug)]
struct Seen {
    /// Payloads, in arrival order.
    msgs: Vec<Vec<u8>>,
    /// Resume results of its sessions after the first.
    resumes: Vec<ResumeResult>,
    /// Gaps reported (none may be).
    gaps: u64,
    /// The nodes it was connected to.
    nodes: Vec<String>,
}

/// A client of `user` that reads until `stop`, on a thread of its own.
fn reader(cfg: ClientConfig, stop: Arc<AtomicBool>) -> (Arc<Mutex<Seen>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let t = std::thread::spawn(move || {
        let mut c = Client::connect(cfg).unwrap();
        let mut first = true;
        while !stop.load(Ordering::SeqCst) {
            match c.next_event_timeout(Duration::from_millis(50)) {
                Ok(Some(Event::Message(m))) if !m.payload.starts_with(b"probe") => {
                    s.lock().unwrap().msgs.push(m.payload)
                }
                Ok(Some(Event::Connected { node_id, resume, .. })) => {
                    let mut s = s.lock().unwrap();
                    if !first {
                        s.resumes.push(resume);
                    }
                    first = false;
                    s.nodes.push(node_id);
                }
                Ok(Some(Event::Gap { .. })) => s.lock().unwrap().gaps += 1,
                _ => {}
            }
        }
    });
    (seen, t)
}

fn durable_flag(js: &JsCluster) -> String {
    format!("--durable=jetstream://{}/HERALD?replicas=3&timeout=2s", js.addrs())
}

#[test]
fn a_home_node_killed_mid_stream_loses_nothing_and_its_clients_resume_elsewhere() {
    let Some(js) = JsCluster::start("dur-kill") else { return };
    let mut herd = Herd::new("dur-kill");
    let flag = durable_flag(&js);
    herd.start_node("n1", &[flag.clone(), "--grace".into(), "30s".into()]);
    herd.start_node("n2", &[flag]);
    herd.wait_listed(2);
    let users: Vec<String> = (0..12).map(|i| format!("du{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for u in &users {
        // n1 first; n2 once n1 has failed it (a static list, so that every
        // client starts on n1).
        let mut cfg = ClientConfig::new(herd.nodes[0].client.clone(), util::token_for(u));
        cfg.nodes.push(herd.nodes[1].client.clone());
        cfg.user = Some(u.clone());
        readers.push(reader(cfg, stop.clone()));
    }
    // Every user is on n1 and reachable from n2 (presence is up).
    for u in &users {
        herd.until_routed(1, u, b"probe");
    }
    // Confirmed publishes through n2; n1, the users' home, dies a third of
    // the way in.
    let per_user = 120;
    let mut p = Publisher::connect(&herd.nodes[1].ingest, &util::pub_credential()).unwrap();
    let mut killed_at = None;
    let mut confirmed = 0;
    for i in 0..per_user {
        if i == per_user / 3 {
            herd.nodes[0].proc.kill9();
            killed_at = Some(Instant::now());
        }
        for u in &users {
            let r = p.publish_confirmed(u.as_bytes(), format!("{u}:{i}").as_bytes()).unwrap();
            assert_eq!(r.accepted, 1);
            confirmed += 1;
        }
    }
    let killed_at = killed_at.unwrap();
    // Every client gets every message, once, in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    while readers.iter().any(|(s, _)| s.lock().unwrap().msgs.len() < per_user) {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut resumed = 0;
    for (u, (seen, t)) in users.iter().zip(readers) {
        t.join().unwrap();
        let s = seen.lock().unwrap();
        let want: Vec<Vec<u8>> = (0..per_user).map(|i| format!("{u}:{i}").into_bytes()).collect();
        assert_eq!(s.gaps, 0, "{u}: a gap was reported: {s:?}");
        let lost: Vec<_> =
            want.iter().filter(|w| !s.msgs.contains(w)).map(|w| String::from_utf8_lossy(w)).collect();
        assert!(lost.is_empty(), "{u}: {} confirmed messages lost: {lost:?}", lost.len());
        assert_eq!(s.msgs, want, "{u}: duplicated or out of order");
        assert!(
            s.nodes.first().is_some_and(|n| n == "n1") && s.nodes.last().is_some_and(|n| n == "n2"),
            "{u}: {:?}",
            s.nodes
        );
        assert_eq!(s.resumes.last(), Some(&ResumeResult::Resumed), "{u}: {:?}", s.resumes);
        resumed += 1;
    }
    eprintln!(
        "{confirmed} confirmed messages to {} users; n1 killed {:?} after the first; {resumed} clients resumed on n2, 0 lost, 0 duplicated",
        users.len(),
        killed_at.elapsed()
    );
}

#[test]
fn without_a_quorum_nothing_is_confirmed_and_service_comes_back_with_it() {
    use herald::client::ClientError;
    use herald::protocol::Code;
    let Some(mut js) = JsCluster::start("dur-quorum") else { return };
    let mut herd = Herd::new("dur-quorum");
    let http = format!("127.0.0.1:{}", util::queues::free_port());
    herd.start_node(
        "q1",
        &[
            format!("--durable=jetstream://{}/HERALD?replicas=3&timeout=1s", js.addrs()),
            "--http".into(),
            http.clone(),
        ],
    );
    herd.wait_listed(1);
    let http_url = format!("http://{http}");
    let stop = Arc::new(AtomicBool::new(false));
    let mut cfg = ClientConfig::new(herd.nodes[0].client.clone(), util::token_for("qa"));
    cfg.user = Some("qa".into());
    let (seen, t) = reader(cfg, stop.clone());
    herd.until_routed(0, "qa", b"probe");
    let mut p = Publisher::connect(&herd.nodes[0].ingest, &util::pub_credential()).unwrap();
    let mut confirmed = Vec::new();
    for i in 0..20 {
        let m = format!("before:{i}");
        p.publish_confirmed(b"qa", m.as_bytes()).unwrap();
        confirmed.push(m);
    }
    // The HTTP API answers once the log has it, too.
    let mut hp = herald::client::HttpPublisher::connect(&http_url, &util::pub_credential(), None).unwrap();
    let r = hp.publish("qa", b"before:http").unwrap();
    assert_eq!((r.accepted, r.local), (1, 1));
    confirmed.push("before:http".into());
    // Two of three servers die: the log has no quorum.
    js.kill(0);
    js.kill(1);
    let t0 = Instant::now();
    let refused = p.publish_confirmed(b"qa", b"during:0");
    let took = t0.elapsed();
    assert!(
        matches!(refused, Err(ClientError::Rejected { code: Code::LogUnavailable, .. })),
        "a publish the log cannot keep is refused, not confirmed: {refused:?}"
    );
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    // Further publishes are refused at once while the log is down.
    let mut p2 = Publisher::connect(&herd.nodes[0].ingest, &util::pub_credential()).unwrap();
    let t1 = Instant::now();
    let again = p2.publish_confirmed(b"qa", b"during:1");
    assert!(matches!(again, Err(ClientError::Rejected { code: Code::LogUnavailable, .. })), "{again:?}");
    eprintln!("no quorum: first refusal after {took:?}, the next after {:?}", t1.elapsed());
    let mut hp = herald::client::HttpPublisher::connect(&http_url, &util::pub_credential(), None).unwrap();
    match hp.publish("qa", b"during:http") {
        Err(ClientError::Http { status: 503, message }) => {
            assert!(message.contains("log_unavailable"), "{message}")
        }
        other => panic!("the HTTP API confirmed what the log cannot keep: {other:?}"),
    }
    assert!(herd.nodes[0].metric("herald_durable_refused_total") >= 3);
    assert_eq!(herd.nodes[0].metric("herald_durable_log_healthy"), 0);
    // Quorum returns: publishes are confirmed again.
    js.restart(0);
    js.restart(1);
    let back = Instant::now();
    let deadline = back + Duration::from_secs(30);
    loop {
        let mut p3 = Publisher::connect(&herd.nodes[0].ingest, &util::pub_credential()).unwrap();
        if p3.publish_confirmed(b"qa", b"after:0").is_ok() {
            confirmed.push("after:0".into());
            for i in 1..20 {
                let m = format!("after:{i}");
                p3.publish_confirmed(b"qa", m.as_bytes()).unwrap();
                confirmed.push(m);
            }
            break;
        }
        assert!(Instant::now() < deadline, "confirmed publishes never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("quorum back: confirming again {:?} after the restart", back.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().msgs.len() < confirmed.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    let s = seen.lock().unwrap();
    let got: Vec<String> = s.msgs.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    let missing: Vec<&String> = confirmed.iter().filter(|m| !got.contains(m)).collect();
    assert!(missing.is_empty(), "confirmed and then lost: {missing:?}");
    let kept: Vec<&String> = got.iter().filter(|m| !m.starts_with("during")).collect();
    assert_eq!(kept, confirmed.iter().collect::<Vec<_>>(), "each confirmed message once, in order");
}

#[test]
fn a_consuming_node_killed_mid_stream_loses_nothing_and_the_log_keeps_each_queue_message_once() {
    use util::js::{kill_a_consumer_mid_stream, source};
    use util::queues::{Kind, Server};
    let Some(js) = JsCluster::start("dur-src") else { return };
    let Some(nats) = Server::start(Kind::Nats, "dur-src-q") else { return };
    let mut herd = Herd::new("dur-src");
    let flag = durable_flag(&js);
    // h: the users' home, consuming nothing; c1 and c2 share the consumer.
    herd.start_node("h", std::slice::from_ref(&flag));
    let with_source = |extra: &str| {
        let mut a = source(&nats, extra);
        a.push(flag.clone());
        a
    };
    herd.start_node("c1", &with_source(""));
    herd.start_node("c2", &with_source(""));
    herd.wait_listed(3);
    let users: Vec<String> = (0..8).map(|i| format!("dk{i}")).collect();
    let taken_by_c1 = kill_a_consumer_mid_stream(&mut herd, &nats, &users, 200, 1200);
    eprintln!(
        "c1 had taken {taken_by_c1} when killed; c2 took {}; the home node h appended {} messages to the log itself",
        herd.nodes[2].metric("herald_source_messages_total"),
        herd.nodes[0].metric("herald_durable_appended_total"),
    );
}

#[test]
fn the_logs_stream_leader_killed_mid_stream_loses_nothing_and_confirmations_resume_within_an_election() {
    use herald::client::ClientError;
    let Some(mut js) = JsCluster::start("dur-leader") else { return };
    let mut herd = Herd::new("dur-leader");
    herd.start_node("l1", &[durable_flag(&js)]);
    herd.wait_listed(1);
    let users: Vec<String> = (0..4).map(|i| format!("lu{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for u in &users {
        let mut cfg = ClientConfig::new(herd.nodes[0].client.clone(), util::token_for(u));
        cfg.user = Some(u.clone());
        readers.push(reader(cfg, stop.clone()));
    }
    for u in &users {
        herd.until_routed(0, u, b"probe");
    }
    // Confirmed publishes, each payload new; a refused one is not retried
    // (it may or may not have been kept) and is noted.
    let ingest = herd.nodes[0].ingest.clone();
    let cred = util::pub_credential();
    let names = users.clone();
    let run = move |stop_at: Instant| {
        let users = names;
        let mut confirmed: Vec<(String, Instant)> = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let mut p = Publisher::connect(&ingest, &cred).ok();
        let mut i = 0;
        while Instant::now() < stop_at {
            let u = &users[i % users.len()];
            let m = format!("{u}:{i}");
            i += 1;
            let Some(pp) = p.as_mut() else {
                std::thread::sleep(Duration::from_millis(50));
                p = Publisher::connect(&ingest, &cred).ok();
                refused.push(m);
                continue;
            };
            match pp.publish_confirmed(u.as_bytes(), m.as_bytes()) {
                Ok(_) => confirmed.push((m, Instant::now())),
                Err(ClientError::Rejected { .. }) | Err(_) => {
                    refused.push(m);
                    std::thread::sleep(Duration::from_millis(50));
                    p = Publisher::connect(&ingest, &cred).ok();
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (confirmed, refused)
    };
    let t0 = Instant::now();
    let publisher = std::thread::spawn(move || run(t0 + Duration::from_secs(16)));
    std::thread::sleep(Duration::from_secs(2));
    let leader = js.wait_stream_leader("HERALD", Duration::from_secs(10));
    let killed = Instant::now();
    js.kill(leader);
    let (confirmed, refused) = publisher.join().unwrap();
    // Confirmations stop at the kill (or soon after) and resume within one election.
    let before = confirmed.iter().filter(|(_, t)| *t < killed).count();
    let resumed =
        confirmed.iter().find(|(_, t)| *t > killed + Duration::from_millis(50)).map(|(_, t)| *t - killed);
    let longest_pause = confirmed.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or_default();
    eprintln!(
        "stream leader (server {leader}) killed: {before} confirmed before, {} after, {} refused; confirmations back {resumed:?} after the kill (longest pause between confirmations {longest_pause:?})",
        confirmed.len() - before,
        refused.len()
    );
    assert!(before > 0);
    let back = resumed.expect("confirmations never resumed");
    assert!(longest_pause <= Duration::from_secs(10), "confirmations paused {longest_pause:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let want: Vec<&String> = confirmed.iter().map(|(m, _)| m).collect();
    while readers.iter().map(|(s, _)| s.lock().unwrap().msgs.len()).sum::<usize>() < want.len()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for (u, (seen, t)) in users.iter().zip(readers) {
        t.join().unwrap();
        let s = seen.lock().unwrap();
        let got: Vec<String> = s.msgs.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
        let mine: Vec<&String> = want.iter().copied().filter(|m| m.starts_with(&format!("{u}:"))).collect();
        let lost: Vec<&&String> = mine.iter().filter(|m| !got.contains(m)).collect();
        assert!(lost.is_empty(), "{u}: confirmed and lost: {lost:?}");
        let kept: Vec<&String> = got.iter().filter(|m| mine.contains(m)).collect();
        assert_eq!(kept, mine, "{u}: each confirmed message once, in order");
        let mut sorted = got.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), got.len(), "{u}: a message arrived twice");
        assert_eq!(s.gaps, 0, "{u}: {s:?}");
    }
    eprintln!("LEADER_FAILOVER_CONFIRMS_MS={}", back.as_millis());
}
