//! The cluster as real processes: 2 decision servers and 3 nodes talking
//! TCP and UDP on loopback. Spread by headroom, ceiling changes, mesh
//! routing, a SIGKILLed node, a killed decision server, and an admin drain.

mod util;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, ClientError, Event, Publisher};
use herald::decision::client::{self as dc, AssignOutcome};
use herald::node::shard::owner;
use herald::protocol::AdminOp;
use util::proc::{after, secrets_dir, Proc};
use util::*;

const CLUSTER_SECRET: &[u8] = b"cluster-secret-for-tests";
const ADMIN_SECRET: &[u8] = b"admin-secret-for-tests!";

/// A cluster member: its process and the addresses its first line named.
struct Member {
    proc: Proc,
    addrs: Vec<String>,
}

impl Member {
    fn spawn(args: &[String], dir: &Path, parse: fn(&str) -> Vec<String>) -> Member {
        let proc = Proc::spawn(args, Some(dir));
        let addrs = parse(&proc.first_line);
        assert!(!addrs.is_empty(), "cannot parse: {}", proc.first_line);
        Member { proc, addrs }
    }

    fn kill9(&mut self) {
        self.proc.kill9();
    }
}

struct Cluster {
    dir: PathBuf,
    decisions: Vec<Member>,
    nodes: Vec<Member>,
    /// With TLS: every node gets its own certificate from `herald cert dev`.
    tls: bool,
    /// Flags every node gets as well.
    node_args: Vec<String>,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir = secrets_dir(&format!("cluster-{name}"), CLUSTER_SECRET, ADMIN_SECRET);
        Cluster { dir, decisions: Vec::new(), nodes: Vec::new(), tls: false, node_args: Vec::new() }
    }

    fn start_decision(&mut self) {
        let i = self.decisions.len();
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
            &format!("state-{i}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.decisions.push(Member::spawn(&args, &self.dir, |l| {
            [after(l, "requests on "), after(l, "heartbeats on ")].into_iter().flatten().collect()
        }));
    }

    /// `host:tcp/udp` for each decision server, as nodes take them.
    fn decision_arg(&self) -> String {
        self.decisions
            .iter()
            .map(|d| {
                let udp_port = d.addrs[1].rsplit(':').next().unwrap();
                format!("{}/{udp_port}", d.addrs[0])
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn decision_tcp(&self) -> Vec<String> {
        self.decisions.iter().map(|d| d.addrs[0].clone()).collect()
    }

    /// Starts node `id`. Nodes n1 and n2 run three and two event loops, so
    /// mesh presence, forwarding and admin drains are checked against
    /// multi-loop nodes too; the others run one.
    fn start_node(&mut self, id: &str, capacity: usize) {
        let threads = match id {
            "n1" => "3",
            "n2" => "2",
            _ => "1",
        };
        let mut args: Vec<String> = [
            "node",
            "--id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            "127.0.0.1:0",
            "--secret-file",
            "client",
            "--publisher-secret-file",
            "publisher",
            "--cluster-secret-file",
            "cluster",
            "--decision",
            &self.decision_arg(),
            "--capacity",
            &capacity.to_string(),
            "--heartbeat-interval",
            "300ms",
            "--drain-window",
            "1s",
            "--log-every",
            "0",
            "--metrics",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--threads",
            threads,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.node_args.iter().cloned());
        if self.tls {
            let (cert, key) = (format!("pki/{id}.pem"), format!("pki/{id}.key"));
            for a in [
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-ports",
                "client,ingest",
                "--cluster-ca",
                "pki/ca.pem",
            ] {
                args.push(a.to_owned());
            }
        }
        self.nodes.push(Member::spawn(&args, &self.dir, |l| {
            [
                after(l, "clients on "),
                after(l, "ingest on "),
                after(l, "metrics on http://").map(|m| m.trim_end_matches("/metrics").to_owned()),
                after(l, "publish API on http://").map(|m| m.trim_end_matches("/v1").to_owned()),
            ]
            .into_iter()
            .flatten()
            .collect()
        }));
    }

    fn node_client(&self, i: usize) -> String {
        self.nodes[i].addrs[0].clone()
    }
    fn node_ingest(&self, i: usize) -> String {
        self.nodes[i].addrs[1].clone()
    }
    /// The node's HTTP publish API (`host:port`; plaintext clusters only).
    fn node_http(&self, i: usize) -> String {
        self.nodes[i].addrs[3].clone()
    }

    fn admin(&self, op: AdminOp, node: &str, value: u32) {
        for d in self.decision_tcp() {
            dc::admin(&d, ADMIN_SECRET, op, node, value, &dc::Dial::plain(Duration::from_secs(2))).unwrap();
        }
    }

    /// Waits until every decision server lists `n` live nodes.
    fn wait_nodes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = self.decision_tcp().iter().all(|d| {
                dc::nodes(std::slice::from_ref(d), &dc::Dial::plain(Duration::from_secs(1)))
                    .map(|v| v.len())
                    .unwrap_or(0)
                    == n
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "decision servers never saw {n} nodes");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.decisions.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_cfg(c: &Cluster, user: &str) -> ClientConfig {
    let mut cfg = ClientConfig::with_decision(c.decision_tcp(), token_for(user));
    cfg.user = Some(user.to_owned());
    cfg.backoff_max = Duration::from_millis(500);
    cfg
}

/// Reads events until a message arrives (or the deadline), returns its payload
/// and the node id of the last Connected event seen.
fn next_message(client: &mut Client, within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(Event::Message(m))) = client.next_event_timeout(Duration::from_millis(100)) {
            return Some(m.payload);
        }
    }
    None
}

/// Publishes to `user` through `ingest` until the node confirms it reached a
/// session somewhere (mesh links and presence are eventually consistent).
fn publish_until_routed(ingest: &str, user: &str, payload: &[u8]) {
    let mut p = Publisher::connect(ingest, &pub_credential()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = p
            .publish_confirmed(user.as_bytes(), payload)
            .unwrap_or_else(|e| panic!("publish to {user} via {ingest}: {e}"));
        if r.local + r.forwarded > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{user} never became routable via {ingest}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn spread_follows_headroom_and_ceiling_changes_apply_next_assignment() {
    let mut c = Cluster::new("spread");
    c.start_decision();
    c.start_decision();
    c.admin(AdminOp::SetCeiling, "", 50);
    for (id, cap) in [("n1", 100), ("n2", 200), ("n3", 300)] {
        c.start_node(id, cap);
    }
    c.wait_nodes(3);
    let mut per_node: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    let mut refused = 0;
    for i in 0..600 {
        match Client::connect(client_cfg(&c, &format!("s{i}"))) {
            Ok(mut cl) => {
                if let Ok(Event::Connected { node_id, .. }) = cl.next_event() {
                    *per_node.entry(node_id).or_default() += 1;
                }
                clients.push(cl);
            }
            Err(ClientError::NoCapacity(_)) => refused += 1,
            Err(e) => panic!("client {i}: {e}"),
        }
    }
    // Each node fills to its ceiling. It may go one over: a heartbeat that
    // the node sends while an assigned client is still connecting does not
    // count that client yet (protocol.md §7.1); the clients here connect one
    // at a time, so at most one is in flight.
    for (id, limit) in [("n1", 50), ("n2", 100), ("n3", 150)] {
        let n = per_node.get(id).copied().unwrap_or(0);
        assert!((limit..=limit + 1).contains(&n), "{id}: {n} clients, ceiling {limit}: {per_node:?}");
    }
    assert_eq!(refused, 600 - per_node.values().sum::<usize>());
    // Raise n1's ceiling: the very next assignment may go there.
    c.admin(AdminOp::SetCeiling, "n1", 60);
    match dc::assign(&c.decision_tcp(), b"x", b"", 3, &dc::Dial::plain(Duration::from_secs(1))).unwrap() {
        AssignOutcome::Nodes(n) => assert_eq!(n[0].node_id, "n1"),
        AssignOutcome::NoCapacity { .. } => panic!("n1 has 10 slots now"),
    }
}

#[test]
fn mesh_routes_a_publish_to_the_node_holding_the_user() {
    let mut c = Cluster::new("mesh");
    c.start_decision();
    c.start_decision();
    for id in ["n1", "n2", "n3"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(3);
    // n2 runs two event loops: one user on each, so presence from loop 0 and
    // from the other loop both reach the peers.
    let users: Vec<String> = (0..2)
        .map(|id| (0..).map(|i| format!("meshy{i}")).find(|u| owner(u.as_bytes(), 2) == id).unwrap())
        .collect();
    for user in &users {
        // Connect directly to n2, publish through n1 and n3.
        let mut cl = Client::connect(ClientConfig::new(c.node_client(1), token_for(user))).unwrap();
        assert!(matches!(cl.next_event().unwrap(), Event::Connected { .. }));
        publish_until_routed(&c.node_ingest(0), user, b"via n1");
        assert_eq!(next_message(&mut cl, Duration::from_secs(5)).unwrap(), b"via n1");
        publish_until_routed(&c.node_ingest(2), user, b"via n3");
        assert_eq!(next_message(&mut cl, Duration::from_secs(5)).unwrap(), b"via n3");
        // Published to the node that holds the user: delivered once, not bounced.
        let mut p = Publisher::connect(&c.node_ingest(1), &pub_credential()).unwrap();
        let r = p.publish_confirmed(user.as_bytes(), b"local").unwrap();
        assert_eq!((r.local, r.forwarded), (1, 0));
        assert_eq!(next_message(&mut cl, Duration::from_secs(5)).unwrap(), b"local");
        assert!(next_message(&mut cl, Duration::from_millis(300)).is_none(), "no duplicates");
    }
}

#[test]
fn killed_node_is_dropped_and_its_clients_rehome_and_receive_again() {
    let mut c = Cluster::new("kill");
    c.start_decision();
    c.start_decision();
    for id in ["n1", "n2", "n3"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(3);
    let mut clients: Vec<(String, Client, String)> = Vec::new();
    for i in 0..30 {
        let user = format!("k{i}");
        let mut cl = Client::connect(client_cfg(&c, &user)).unwrap();
        let node = match cl.next_event().unwrap() {
            Event::Connected { node_id, .. } => node_id,
            other => panic!("{other:?}"),
        };
        clients.push((user, cl, node));
    }
    assert!(clients.iter().any(|(_, _, n)| n == "n1"));
    let t0 = Instant::now();
    c.nodes[0].kill9();
    // Within 3 s the decision servers stop assigning n1.
    loop {
        let live = dc::nodes(&c.decision_tcp(), &dc::Dial::plain(Duration::from_secs(1))).unwrap();
        if live.iter().all(|n| n.node_id != "n1") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "n1 still listed after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..50 {
        if let AssignOutcome::Nodes(n) =
            dc::assign(&c.decision_tcp(), b"x", b"", 3, &dc::Dial::plain(Duration::from_secs(1))).unwrap()
        {
            assert!(n.iter().all(|a| a.node_id != "n1"));
        }
    }
    // Every client (including n1's) receives messages again, published via n2.
    let mut p = Publisher::connect(&c.node_ingest(1), &pub_credential()).unwrap();
    for (user, cl, _) in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = p.publish_confirmed(user.as_bytes(), b"after").unwrap();
            if r.local + r.forwarded > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{user} never re-homed");
            // Let the client notice the lost node and reconnect elsewhere.
            let _ = cl.next_event_timeout(Duration::from_millis(100));
        }
        let got = next_message(cl, Duration::from_secs(10));
        assert_eq!(got.as_deref(), Some(&b"after"[..]), "{user}");
    }
}

#[test]
fn a_spoofed_peer_hello_does_not_keep_the_mesh_link_down() {
    use herald::protocol::Channel;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut c = Cluster::new("spoof");
    c.start_decision();
    c.start_node("n1", 1000); // n1 < n2: n1 dials n2
    c.wait_nodes(1);
    // Someone without the cluster secret keeps claiming to be n2 on n1's
    // ingest port, reopening before each attempt times out.
    let ingest: std::net::SocketAddr = c.node_ingest(0).parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spoofer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let mut r = Raw::connect(ingest, Channel::FromIngest);
                send_peer_hello(&mut r, b"n2", [0; 16]);
                held.push(r);
                if held.len() > 3 {
                    held.remove(0);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    c.start_node("n2", 1000);
    c.wait_nodes(2);
    // The real n2 still gets linked: a publish through n1 reaches its user.
    let mut cl = Client::connect(ClientConfig::new(c.node_client(1), token_for("spoofed"))).unwrap();
    assert!(matches!(cl.next_event().unwrap(), Event::Connected { .. }));
    publish_until_routed(&c.node_ingest(0), "spoofed", b"through the mesh");
    assert_eq!(next_message(&mut cl, Duration::from_secs(5)).unwrap(), b"through the mesh");
    stop.store(true, Ordering::SeqCst);
    spoofer.join().unwrap();
}

#[test]
fn killed_decision_server_the_second_one_answers() {
    let mut c = Cluster::new("dkill");
    c.start_decision();
    c.start_decision();
    c.start_node("n1", 1000);
    c.wait_nodes(1);
    c.decisions[0].kill9();
    let mut cl = Client::connect(client_cfg(&c, "dk")).unwrap();
    assert!(matches!(cl.next_event().unwrap(), Event::Connected { node_id, .. } if node_id == "n1"));
}

#[test]
fn drain_moves_every_client_to_other_nodes() {
    let mut c = Cluster::new("drain");
    c.start_decision();
    c.start_decision();
    for id in ["n1", "n2", "n3"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(3);
    // 10 clients whose first connection is to n1, and who ask the decision
    // servers when told to move.
    let mut clients = Vec::new();
    for i in 0..10 {
        let user = format!("d{i}");
        let cl = pinned_client(client_cfg(&c, &user), &c.node_client(0));
        clients.push((user, cl));
    }
    c.admin(AdminOp::Drain, "n1", 0);
    for (user, cl) in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut moved_to = None;
        while moved_to.is_none() {
            assert!(Instant::now() < deadline, "{user} never moved");
            if let Ok(Some(Event::Connected { node_id, .. })) =
                cl.next_event_timeout(Duration::from_millis(100))
            {
                moved_to = Some(node_id);
            }
        }
        assert_ne!(moved_to.as_deref(), Some("n1"));
        publish_until_routed(&c.node_ingest(0), user, b"after drain");
        assert_eq!(next_message(cl, Duration::from_secs(5)).as_deref(), Some(&b"after drain"[..]));
    }
    c.admin(AdminOp::Undrain, "n1", 0);
}

/// A client whose first connection goes to `node`, and which asks the
/// decision servers afterwards.
fn pinned_client(cfg: ClientConfig, node: &str) -> Client {
    let mut first = cfg.clone();
    first.nodes = vec![node.to_owned()];
    let decision = std::mem::take(&mut first.decision);
    let mut cl = Client::connect(first).unwrap();
    assert!(matches!(cl.next_event().unwrap(), Event::Connected { .. }));
    cl.set_decision(decision);
    cl
}

#[test]
fn mesh_links_reopen_after_a_peer_restarts_and_publishers_fail_over() {
    let mut c = Cluster::new("restart");
    c.start_decision();
    c.start_decision();
    c.start_node("n1", 1000);
    c.start_node("n2", 1000);
    c.wait_nodes(2);
    // A user on n2, published through n1 (so over the mesh).
    let mut cl = Client::connect(ClientConfig::new(c.node_client(1), token_for("rs"))).unwrap();
    assert!(matches!(cl.next_event().unwrap(), Event::Connected { .. }));
    publish_until_routed(&c.node_ingest(0), "rs", b"before");
    assert_eq!(next_message(&mut cl, Duration::from_secs(5)).as_deref(), Some(&b"before"[..]));
    // A publisher that knows both nodes, connected to n1.
    let mut p = Publisher::connect_any(&[c.node_ingest(0), c.node_ingest(1)], &pub_credential()).unwrap();
    assert_eq!(p.node_id(), "n1");
    // n1 dies; the publisher's next confirmed publish fails over to n2.
    c.nodes[0].kill9();
    let r = p.publish_confirmed(b"rs", b"after failover").unwrap();
    assert_eq!((p.node_id(), r.local), ("n2", 1));
    assert_eq!(p.failovers(), 1);
    assert_eq!(next_message(&mut cl, Duration::from_secs(5)).as_deref(), Some(&b"after failover"[..]));
    // n1 comes back (new process, new incarnation): the link reopens and
    // presence is resynced, so a publish through n1 reaches the user again.
    c.start_node("n1", 1000);
    let n1_ingest = c.nodes.last().unwrap().addrs[1].clone();
    publish_until_routed(&n1_ingest, "rs", b"after restart");
    assert_eq!(next_message(&mut cl, Duration::from_secs(5)).as_deref(), Some(&b"after restart"[..]));
}

/// TLS on both node ports: the nodes dial each other over TLS, each checks
/// the other's cluster-CA certificate names the node id it claims, and a
/// publish reaches a TLS client on another node (protocol.md §11).
#[test]
fn the_mesh_routes_over_tls_between_nodes_that_verify_each_other() {
    let mut c = Cluster::new("tls");
    let pki = c.dir.join("pki");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["cert", "dev", "--out", pki.to_str().unwrap(), "--nodes", "n3,n4", "--decision", ""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.tls = true;
    c.start_decision();
    for id in ["n3", "n4"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(2);
    let tls = herald::tls::client_config(Some(&pki.join("ca.pem"))).unwrap();
    let local = |addr: &str| format!("localhost:{}", addr.rsplit(':').next().unwrap());
    let cfg = ClientConfig {
        tls: Some(tls.clone()),
        ..ClientConfig::new(local(&c.node_client(1)), token_for("tess"))
    };
    let mut cl = Client::connect(cfg).unwrap();
    assert!(matches!(cl.next_event().unwrap(), Event::Connected { .. }));
    let mut p = Publisher::connect_tls(&[local(&c.node_ingest(0))], &pub_credential(), Some(tls)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = p.publish_confirmed(b"tess", b"via the TLS mesh").unwrap();
        if r.forwarded > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "n3 never linked to n4 over TLS");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(next_message(&mut cl, Duration::from_secs(5)).unwrap(), b"via the TLS mesh");
}

/// One HTTP/1.1 request on a fresh connection (Connection: close); the
/// status and the JSON body.
fn http_call(addr: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        pub_credential(),
        body.len()
    );
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no answer: {out:?}"));
    (head.split(' ').nth(1).unwrap().parse().unwrap(), serde_json::from_str(body).unwrap())
}

/// The HTTP publish API forwards through the mesh and answers `forwarded`
/// only once the user's node has confirmed the message (protocol.md §6.6):
/// with that node stopped (SIGSTOP: its sockets stay open and silent, as
/// after a cut), the answer comes after the forward timeout and says
/// `no_route`, not `forwarded`; once it runs again, publishes are
/// forwarded and delivered again.
#[test]
fn an_http_publish_is_forwarded_only_when_the_peer_confirms_it() {
    let mut c = Cluster::new("http-confirm");
    c.start_decision();
    for id in ["n1", "n2"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(2);
    let mut cl = Client::connect(ClientConfig::new(c.node_client(1), token_for("hana"))).unwrap();
    assert!(matches!(cl.next_event().unwrap(), Event::Connected { .. }));
    let api = c.node_http(0);
    let body = r#"{"user":"hana","data":"via http"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = http_call(&api, "POST", "/v1/publish", body);
        assert_eq!(status, 200, "{v}");
        if v["forwarded"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never forwarded: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(next_message(&mut cl, Duration::from_secs(5)).unwrap(), b"via http");
    let (_, v) = http_call(&api, "GET", "/v1/users/hana", "");
    assert_eq!((v["online"].as_bool(), v["peers"][0].as_str()), (Some(true), Some("n2")), "{v}");
    c.nodes[1].proc.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let (status, v) = http_call(&api, "POST", "/v1/publish", r#"{"user":"hana","data":"into the cut"}"#);
    let waited = t0.elapsed();
    c.nodes[1].proc.signal(libc::SIGCONT);
    assert_eq!(status, 200);
    assert_eq!((v["forwarded"].as_u64(), v["no_route"].as_u64()), (Some(0), Some(1)), "{v}");
    assert!(waited >= Duration::from_millis(1500), "answered after {waited:?}: before the forward timeout");
    // After the cut the link comes back and publishes reach the user again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = http_call(&api, "POST", "/v1/publish", r#"{"user":"hana","data":"healed"}"#);
        if v["forwarded"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never forwarded again: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Presence follows the stream, not the session (protocol.md §6.4): a
/// client that drops and resumes on the same node within the grace period
/// gets what was published for it through another node meanwhile. (Before,
/// the peer heard OFFLINE at once, answered those publishes `no_route`, and
/// the resumed client saw a contiguous stream without them.) Both of n2's
/// loops: loop 0's own users and another loop's, whose presence loop 0
/// keeps.
#[test]
fn a_client_resuming_within_grace_gets_what_a_peer_took_meanwhile() {
    use herald::protocol::frame::{Channel, Frame, Position};
    use herald::protocol::ResumeResult;
    let mut c = Cluster::new("grace");
    c.start_decision();
    for id in ["n1", "n2"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(2);
    let n2: std::net::SocketAddr = c.node_client(1).parse().unwrap();
    for loop_id in 0..2 {
        let user = (0..).map(|i| format!("grace{i}")).find(|u| owner(u.as_bytes(), 2) == loop_id).unwrap();
        let mut r = Raw::connect(n2, Channel::ToClient);
        send_hello(&mut r, &token_for(&user), None);
        let epoch = match frame(&r.expect(Duration::from_secs(5)), Channel::ToClient) {
            Frame::Welcome(w) => w.epoch,
            other => panic!("{other:?}"),
        };
        publish_until_routed(&c.node_ingest(0), &user, b"before");
        let mut last = 0;
        while let Got::Frame(b) = r.next(Duration::from_millis(300)) {
            if let Frame::Deliver(d) = frame(&b, Channel::ToClient) {
                last = d.seq;
            }
        }
        assert!(last > 0);
        drop(r);
        // The session is gone; its stream is kept for the grace period.
        std::thread::sleep(Duration::from_millis(500));
        let mut p = Publisher::connect(&c.node_ingest(0), &pub_credential()).unwrap();
        let res = p.publish_confirmed(user.as_bytes(), b"while away").unwrap();
        assert_eq!(
            (res.forwarded, res.no_route),
            (1, 0),
            "{user}: the peer still forwards to the stream in grace"
        );
        let mut r = Raw::connect(n2, Channel::ToClient);
        send_hello(&mut r, &token_for(&user), Some(Position { epoch, seq: last }));
        match frame(&r.expect(Duration::from_secs(5)), Channel::ToClient) {
            Frame::Welcome(w) => assert_eq!(w.resume, ResumeResult::Resumed),
            other => panic!("{other:?}"),
        }
        let b = r.expect(Duration::from_secs(5));
        match frame(&b, Channel::ToClient) {
            Frame::Deliver(d) => assert_eq!((d.seq, d.payload), (last + 1, &b"while away"[..])),
            other => panic!("{user}: expected the message published while away, got {other:?}"),
        }
    }
}

/// A node drained by an admin stops offering the streams it keeps in grace
/// (their clients resume elsewhere), and offers them again when undrained
/// (protocol.md §6.4).
#[test]
fn a_drained_node_withdraws_its_streams_in_grace_and_an_undrain_offers_them_again() {
    use herald::protocol::frame::{Channel, Frame};
    let mut c = Cluster::new("grace-drain");
    c.start_decision();
    for id in ["n1", "n2"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(2);
    let n2: std::net::SocketAddr = c.node_client(1).parse().unwrap();
    let users: Vec<String> = (0..2)
        .map(|l| (0..).map(|i| format!("gd{i}")).find(|u| owner(u.as_bytes(), 2) == l).unwrap())
        .collect();
    for user in &users {
        let mut r = Raw::connect(n2, Channel::ToClient);
        send_hello(&mut r, &token_for(user), None);
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        publish_until_routed(&c.node_ingest(0), user, b"hi");
        drop(r);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut p = Publisher::connect(&c.node_ingest(0), &pub_credential()).unwrap();
    let routed =
        |p: &mut Publisher, user: &str| p.publish_confirmed(user.as_bytes(), b"x").unwrap().forwarded;
    for user in &users {
        assert_eq!(routed(&mut p, user), 1, "{user}: in grace, still offered");
    }
    c.admin(AdminOp::Drain, "n2", 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while users.iter().any(|u| routed(&mut p, u) != 0) {
        assert!(Instant::now() < deadline, "the drained node still offers its streams in grace");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.admin(AdminOp::Undrain, "n2", 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while users.iter().any(|u| routed(&mut p, u) != 1) {
        assert!(Instant::now() < deadline, "the undrained node does not offer its streams in grace again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Conflation happens on the node that holds the session, for messages
/// published through another node too: FORWARD carries the key, and so does
/// the hand-off to the user's loop (protocol.md §5.7, §6.5). A client that
/// reads nothing until the end gets every fill and the last value of every
/// key, with CONFLATED for the rest.
#[test]
fn messages_forwarded_from_a_peer_are_conflated_by_their_key() {
    use herald::protocol::frame::{decode, Channel, Decoded, Frame};
    use std::io::Read;
    let mut c = Cluster::new("conflate");
    c.node_args =
        ["--slow-policy", "conflate", "--client-sndbuf", "4096"].iter().map(|s| s.to_string()).collect();
    c.start_decision();
    for id in ["n1", "n2"] {
        c.start_node(id, 1000);
    }
    c.wait_nodes(2);
    let n2: std::net::SocketAddr = c.node_client(1).parse().unwrap();
    for loop_id in 0..2 {
        let user = (0..).map(|i| format!("cq{i}")).find(|u| owner(u.as_bytes(), 2) == loop_id).unwrap();
        let mut r = Raw::connect_small(n2, Channel::ToClient, 4096);
        send_hello(&mut r, &token_for(&user), None);
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        publish_until_routed(&c.node_ingest(0), &user, b"first");
        let mut p = Publisher::connect(&c.node_ingest(0), &pub_credential()).unwrap();
        let mut latest = HashMap::new();
        let value = "v".repeat(500);
        for i in 0..2000 {
            let key = format!("k{}", i % 5);
            let payload = format!("{key}={i}:{value}");
            p.publish_keyed(user.as_bytes(), key.as_bytes(), payload.as_bytes()).unwrap();
            latest.insert(key, payload);
            if i % 100 == 99 {
                p.publish(user.as_bytes(), format!("fill{}", i / 100).as_bytes()).unwrap();
            }
        }
        assert_eq!(p.publish_confirmed(user.as_bytes(), b"end").unwrap().forwarded, 1);
        // Now read it all.
        let (mut buf, mut got, mut fills, mut conflated) = (Vec::new(), HashMap::new(), Vec::new(), 0);
        r.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut chunk = vec![0u8; 65536];
        'read: loop {
            let n = r.sock.read(&mut chunk).expect("the session stays open");
            assert!(n > 0, "{user}: cut off");
            buf.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            while let Ok(Decoded::Frame(f, k)) = decode(&buf[used..], Channel::ToClient) {
                used += k;
                match f {
                    Frame::Deliver(d) if d.payload == b"end" => break 'read,
                    Frame::Deliver(d) => {
                        let s = String::from_utf8(d.payload.to_vec()).unwrap();
                        match s.split_once('=') {
                            Some((k, _)) => {
                                got.insert(k.to_owned(), s);
                            }
                            None => fills.push(s),
                        }
                    }
                    Frame::Conflated(cf) => conflated += cf.last_seq - cf.first_seq + 1,
                    _ => {}
                }
            }
            buf.drain(..used);
        }
        assert!(conflated > 0, "{user}: forwarded keyed messages were conflated");
        assert_eq!(got, latest, "{user}: the last value of every key");
        let want: Vec<String> = (0..20).map(|i| format!("fill{i}")).collect();
        assert_eq!(fills.iter().filter(|f| f.starts_with("fill")).cloned().collect::<Vec<_>>(), want);
    }
}
