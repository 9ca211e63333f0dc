//! A small cluster of real `herald` processes for tests that kill one: a
//! decision server and nodes on loopback, each node with extra flags (a
//! `--source`, say). Everything stops on drop.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, Event, Publisher};
use herald::decision::client as dc;

use super::proc::{after, secrets_dir, Proc};

pub const CLUSTER_SECRET: &[u8] = b"herd-cluster-secret-for-tests";
pub const ADMIN_SECRET: &[u8] = b"herd-admin-secret-for-tests!";

/// One node process and what its first line said.
pub struct HerdNode {
    pub id: String,
    pub proc: Proc,
    pub client: String,
    pub ingest: String,
    pub metrics: String,
}

impl HerdNode {
    /// A sample line's value from its /metrics (`name{...} v`); 0 if absent.
    pub fn metric(&self, name: &str) -> u64 {
        let body = super::http_get(self.metrics.parse().unwrap(), "/metrics");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }
}

pub struct Herd {
    pub dir: PathBuf,
    decision: Option<Proc>,
    /// `host:tcp/udp` of the decision server, as nodes take it.
    pub decision_arg: String,
    /// Its TCP address, as clients take it.
    pub decision_tcp: String,
    pub nodes: Vec<HerdNode>,
}

impl Herd {
    /// A decision server, no nodes yet.
    pub fn new(name: &str) -> Herd {
        let dir = secrets_dir(&format!("herd-{name}"), CLUSTER_SECRET, ADMIN_SECRET);
        let args: Vec<String> = [
            "decision",
            "--listen",
            "127.0.0.1:0",
            "--heartbeat",
            "127.0.0.1:0",
            "--cluster-secret-file",
            "cluster",
            "--admin-secret-file",
            "admin",
            "--state-file",
            "state",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let d = Proc::spawn(&args, Some(&dir));
        let tcp = after(&d.first_line, "requests on ").expect("decision address");
        let udp = after(&d.first_line, "heartbeats on ").expect("heartbeat address");
        let decision_arg = format!("{tcp}/{}", udp.rsplit(':').next().unwrap());
        Herd { dir, decision: Some(d), decision_arg, decision_tcp: tcp, nodes: Vec::new() }
    }

    /// Starts node `id` with `extra` flags; returns its index.
    pub fn start_node(&mut self, id: &str, extra: &[String]) -> usize {
        let mut args: Vec<String> = [
            "node",
            "--id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--secret-file",
            "client",
            "--publisher-secret-file",
            "publisher",
            "--cluster-secret-file",
            "cluster",
            "--decision",
            &self.decision_arg,
            "--heartbeat-interval",
            "300ms",
            "--drain-window",
            "500ms",
            "--log-every",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn(&args, Some(&self.dir));
        let l = proc.first_line.clone();
        let client = after(&l, "clients on ").unwrap_or_else(|| panic!("node {id}: {l}"));
        let ingest = after(&l, "ingest on ").unwrap();
        let metrics = after(&l, "metrics on http://").unwrap().trim_end_matches("/metrics").to_owned();
        self.nodes.push(HerdNode { id: id.to_owned(), proc, client, ingest, metrics });
        self.nodes.len() - 1
    }

    /// Waits until the decision server lists `n` live nodes.
    pub fn wait_listed(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let listed =
                dc::nodes(std::slice::from_ref(&self.decision_tcp), &dc::Dial::plain(Duration::from_secs(1)))
                    .map(|v| v.len())
                    .unwrap_or(0);
            if listed == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the decision server never listed {n} nodes (listed {listed})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Publishes `payload` to `user` through node `i`'s ingest port until
    /// that node confirms it reached a session (here or at a peer: the
    /// mesh and its presence are up).
    pub fn until_routed(&self, i: usize, user: &str, payload: &[u8]) {
        let mut p = Publisher::connect(&self.nodes[i].ingest, &super::pub_credential()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = p.publish_confirmed(user.as_bytes(), payload).unwrap();
            if r.local + r.forwarded > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{user} never became routable via {}", self.nodes[i].id);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client of `user` connected directly to node `i`.
    pub fn client_on(&self, i: usize, user: &str) -> Client {
        let mut cfg = ClientConfig::new(self.nodes[i].client.clone(), super::token_for(user));
        cfg.user = Some(user.to_owned());
        let mut c = Client::connect(cfg).unwrap();
        assert!(matches!(c.next_event().unwrap(), Event::Connected { .. }));
        c
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        self.nodes.clear();
        self.decision.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads `client`'s messages until it has `want` that do not start with
/// `probe`, or `within` passes.
pub fn collect(client: &mut Client, want: usize, within: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        if let Ok(Some(Event::Message(m))) = client.next_event_timeout(Duration::from_millis(100)) {
            if !m.payload.starts_with(b"probe") {
                got.push(m.payload);
            }
        }
    }
    got
}

/// Takes what `client` has received by now.
pub fn drain(client: &mut Client, into: &mut Vec<Vec<u8>>) {
    while let Ok(Some(e)) = client.next_event_timeout(Duration::from_millis(1)) {
        if let Event::Message(m) = e {
            if !m.payload.starts_with(b"probe") {
                into.push(m.payload);
            }
        }
    }
}

/// Every user got each of its `per_user` messages exactly once (`already`:
/// what each had been seen to get before).
pub fn assert_exactly_once(
    clients: &mut [(String, Client)],
    already: Vec<Vec<Vec<u8>>>,
    per_user: usize,
    within: Duration,
) {
    for ((u, c), mut got) in clients.iter_mut().zip(already) {
        let more = collect(c, per_user.saturating_sub(got.len()), within);
        got.extend(more);
        let mut count: HashMap<Vec<u8>, usize> = HashMap::new();
        for p in &got {
            *count.entry(p.clone()).or_default() += 1;
        }
        let dups: Vec<_> = count
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(p, n)| (String::from_utf8_lossy(p).into_owned(), *n))
            .collect();
        assert!(dups.is_empty(), "{u}: delivered twice: {dups:?}");
        let missing: Vec<usize> =
            (0..per_user).filter(|i| !count.contains_key(format!("{u}-{i}").as_bytes())).collect();
        assert!(missing.is_empty(), "{u}: {} of {per_user} missing: {missing:?}", missing.len());
        // And nothing more arrives afterwards (a late redelivery).
        let late = collect(c, 1, Duration::from_millis(300));
        assert!(late.is_empty(), "{u}: a late copy: {late:?}");
    }
}
