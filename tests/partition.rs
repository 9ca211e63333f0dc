//! Partitions between real hosts (issue #11 item 3): 2 decision servers and
//! 3 nodes, each `herald` process in its own network namespace with its own
//! address on one switch (`util::netns`), clients and publishers in the test
//! process on a sixth host. Links are cut at the switch, silently (a port
//! down or ports isolated from each other), and healed.
//!
//! Checked in every phase: no user receives another's message (payloads
//! name their user), and every message a confirming publisher was told was
//! queued (`local` or `forwarded`, protocol.md §5.5) reaches its user or is
//! covered by a gap the user's client reports. Where `ip netns add` is not
//! permitted the tests print `SKIP: <reason>` and return.

mod util;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, Event, Publisher};
use herald::decision::client::{self as dc, AssignOutcome};
use util::netns::{Net, TESTER};
use util::proc::{secrets_dir, Proc};
use util::*;

const CLUSTER_SECRET: &[u8] = b"cluster-secret-for-tests";
const ADMIN_SECRET: &[u8] = b"admin-secret-for-tests!";
/// Hosts 0 and 1 run decision servers, hosts 2, 3, 4 nodes n1, n2, n3.
const DECISIONS: [usize; 2] = [0, 1];
const NODES: [usize; 3] = [2, 3, 4];
/// A node's secret files, as flags (files in the cluster's directory).
const NODE_SECRETS: [&str; 6] =
    ["--secret-file", "client", "--publisher-secret-file", "publisher", "--cluster-secret-file", "cluster"];

/// Polls `f` every 50 ms until it returns true or `limit` passes; returns
/// how long it took, or None.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if f() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The host of the durable log's three JetStream servers, when there is one.
const LOG: usize = 5;

/// The cluster: its processes (killed before the namespaces go) and its net.
struct Cluster {
    procs: Vec<Proc>,
    /// Durable mode: the log's servers, on host [`LOG`] (stopped before the
    /// namespaces go).
    log: Option<herald::demo::LogCluster>,
    dir: PathBuf,
    net: Net,
}

impl Cluster {
    /// Builds the net and starts the five processes (the nodes with
    /// keepalive interval `node_heartbeat`); None (after printing
    /// `SKIP: …`) where namespaces are not permitted.
    fn start(tag: &str, node_heartbeat: &str) -> Option<Cluster> {
        Cluster::start_with(tag, node_heartbeat, false)
    }

    /// [`Cluster::start`], with `durable`: a sixth host runs a 3-server
    /// JetStream cluster and every node keeps its streams there
    /// (`--durable`, protocol.md §13). None (after `SKIP: …`) also where
    /// nats-server is missing.
    fn start_with(tag: &str, node_heartbeat: &str, durable: bool) -> Option<Cluster> {
        let net = match Net::new(tag, if durable { 6 } else { 5 }) {
            Ok(n) => n,
            Err(e) => {
                // Straight to the process's stderr: the test harness
                // captures eprintln!, and a skip must not pass unseen.
                let msg = format!("SKIP: partition tests need network namespaces: {e}\n");
                let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
                return None;
            }
        };
        let dir = secrets_dir(&format!("part-{tag}"), CLUSTER_SECRET, ADMIN_SECRET);
        let mut c = Cluster { procs: Vec::new(), log: None, dir, net };
        let mut node_extra = Vec::new();
        if durable {
            let wrap = c.net.exec_words(LOG);
            let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
            match herald::demo::LogCluster::start_at(tag, &c.net.addr(LOG), &wrap) {
                Ok(l) => {
                    node_extra =
                        vec![format!("--durable=jetstream://{}/HERALD?replicas=3&timeout=1s", l.addrs())];
                    c.log = Some(l);
                }
                Err(herald::demo::LogClusterError::NotInstalled) => {
                    let msg =
                        "SKIP: nats-server is not installed (apt-get install -y nats-server; .ci/run does)\n";
                    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
                    return None;
                }
                Err(e) => panic!("the log's servers did not start: {e}"),
            }
        }
        for h in DECISIONS {
            let a = format!("{}:7300", c.net.addr(h));
            c.spawn(
                h,
                &["decision", "--listen", &a, "--heartbeat", &a, "--expire-after", "2s"],
                &["--cluster-secret-file", "cluster", "--admin-secret-file", "admin"],
            );
        }
        let decision = c.decision().join(",");
        for (k, h) in NODES.into_iter().enumerate() {
            let ip = c.net.addr(h);
            let (listen, ingest, metrics) =
                (format!("{ip}:7400"), format!("{ip}:7401"), format!("{ip}:7402"));
            let id = format!("n{}", k + 1);
            c.spawn(
                h,
                &[
                    "node",
                    "--id",
                    &id,
                    "--listen",
                    &listen,
                    "--ingest",
                    &ingest,
                    "--metrics",
                    &metrics,
                    "--decision",
                    &decision,
                    "--heartbeat-interval",
                    "300ms",
                    "--heartbeat",
                    node_heartbeat,
                    "--capacity",
                    "100",
                    "--drain-window",
                    "1s",
                    "--log-every",
                    "0",
                ]
                .iter()
                .copied()
                .chain(node_extra.iter().map(String::as_str))
                .collect::<Vec<_>>(),
                &NODE_SECRETS,
            );
        }
        Some(c)
    }

    fn spawn(&mut self, host: usize, args: &[&str], files: &[&str]) {
        let mut cmd = self.net.exec(host);
        cmd.arg(env!("CARGO_BIN_EXE_herald")).args(args).current_dir(&self.dir);
        for (i, a) in files.iter().enumerate() {
            // Every second word is a file name, relative to the directory.
            if i % 2 == 1 {
                cmd.arg(self.dir.join(a));
            } else {
                cmd.arg(a);
            }
        }
        let p = Proc::start(cmd);
        assert!(p.first_line.contains(" on "), "host {host} did not start: {}", p.first_line);
        self.procs.push(p);
    }

    fn decision(&self) -> Vec<String> {
        DECISIONS.iter().map(|&h| format!("{}:7300", self.net.addr(h))).collect()
    }

    /// Node `k` (0: n1) client and ingest addresses.
    fn client_addr(&self, k: usize) -> String {
        format!("{}:7400", self.net.addr(NODES[k]))
    }
    fn ingest_addr(&self, k: usize) -> String {
        format!("{}:7401", self.net.addr(NODES[k]))
    }

    /// The node ids decision server `d` lists as live (None: unreachable).
    fn listed(&self, d: usize) -> Option<Vec<String>> {
        let servers = [self.decision()[d].clone()];
        let v = dc::nodes(&servers, &dc::Dial::plain(Duration::from_millis(500))).ok()?;
        let mut ids: Vec<String> = v.into_iter().map(|n| n.node_id).collect();
        ids.sort();
        Some(ids)
    }

    /// The node ids ASSIGN ranks for `user` at decision server `d`.
    fn ranked(&self, d: usize, user: &str) -> Option<Vec<String>> {
        let servers = [self.decision()[d].clone()];
        match dc::assign(&servers, user.as_bytes(), b"", 3, &dc::Dial::plain(Duration::from_millis(500)))
            .ok()?
        {
            AssignOutcome::Nodes(n) => Some(n.into_iter().map(|a| a.node_id).collect()),
            AssignOutcome::NoCapacity { .. } => Some(Vec::new()),
        }
    }

    fn publisher(&self, k: usize) -> Publisher {
        Publisher::connect(&self.ingest_addr(k), &pub_credential()).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.clear();
        self.log.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one user's client saw.
#[derive(Default)]
struct Seen {
    /// Payloads received (distinct).
    got: HashSet<String>,
    /// Messages another user's payload named: must stay empty.
    misrouted: Vec<String>,
    /// Messages the client was told it lost (GAP, Connected.lost, seq gaps).
    lost: u64,
    /// The stream restarted (RESTARTED): what was lost before is uncounted.
    restarts: u64,
    /// The node of the current session, and when each connection came.
    node: String,
    connects: Vec<(Instant, String)>,
}

/// A reference client for `user` on its own thread, first connected to
/// `node` and then told the decision servers, so that it fails over
/// through them (protocol.md §3.6).
struct User {
    name: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl User {
    fn start(name: &str, node: String, decision: Vec<String>) -> User {
        let mut cfg = ClientConfig::new(node, token_for(name));
        cfg.connect_timeout = Duration::from_secs(1);
        cfg.backoff_max = Duration::from_millis(500);
        cfg.user = Some(name.to_owned());
        let mut client = Client::connect(cfg).unwrap();
        client.set_decision(decision);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, me) = (seen.clone(), stop.clone(), format!("for:{name}:"));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok(Some(ev)) = client.next_event_timeout(Duration::from_millis(100)) else { continue };
                let mut s = s.lock().unwrap();
                match ev {
                    Event::Message(m) => {
                        let p = String::from_utf8_lossy(&m.payload).into_owned();
                        if p.starts_with(&me) {
                            s.got.insert(p);
                        } else {
                            s.misrouted.push(p);
                        }
                    }
                    Event::Gap { expected: 0, .. } => s.restarts += 1,
                    Event::Gap { expected, got } => s.lost += got.saturating_sub(expected),
                    Event::Conflated { .. } => panic!("unkeyed messages are never conflated"),
                    Event::Connected { node_id, lost, .. } => {
                        s.lost += lost;
                        s.node = node_id.clone();
                        s.connects.push((Instant::now(), node_id));
                    }
                    Event::Disconnected { .. } => {}
                }
            }
        });
        let u = User { name: name.to_owned(), seen, stop, thread: Some(thread) };
        assert!(within(Duration::from_secs(10), || !u.node().is_empty()).is_some(), "{name} never connected");
        u
    }

    fn node(&self) -> String {
        self.seen.lock().unwrap().node.clone()
    }

    fn has(&self, payload: &str) -> bool {
        self.seen.lock().unwrap().got.contains(payload)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every confirmed publish and what its PUB_RESULT said.
#[derive(Default)]
struct Ledger {
    /// (user, payload, local or forwarded)
    sent: Vec<(String, String, bool)>,
    n: u64,
}

impl Ledger {
    /// Publishes a confirmed message for `user` through `p`; returns its
    /// payload and the result.
    fn publish(&mut self, p: &mut Publisher, user: &str) -> (String, herald::protocol::frame::PubResult) {
        self.n += 1;
        let payload = format!("for:{user}:{}", self.n);
        let r = p.publish_confirmed(user.as_bytes(), payload.as_bytes()).unwrap();
        self.sent.push((user.to_owned(), payload.clone(), r.local + r.forwarded > 0));
        (payload, r)
    }

    /// After every message had time to arrive: no misroute, and every
    /// message reported as queued either arrived or is covered by a loss its
    /// client was told of (a counted gap, or a stream restart).
    fn check(&self, users: &[User]) {
        for u in users {
            let s = u.seen.lock().unwrap();
            assert!(s.misrouted.is_empty(), "{} received another user's messages: {:?}", u.name, s.misrouted);
            let silent: Vec<&String> = self
                .sent
                .iter()
                .filter(|(who, p, queued)| *who == u.name && *queued && !s.got.contains(p))
                .map(|(_, p, _)| p)
                .collect();
            assert!(
                silent.len() as u64 <= s.lost || (s.restarts > 0 && !silent.is_empty()),
                "{}: {} messages reported as queued never arrived, but its client was told of {} lost \
                 and {} restarts: {silent:?}",
                u.name,
                silent.len(),
                s.lost,
                s.restarts
            );
        }
    }
}

/// Starts a user on each node `k` (`u{k}{i}`), `per` each.
fn users(c: &Cluster, per: usize) -> Vec<User> {
    let mut v = Vec::new();
    for k in 0..NODES.len() {
        for i in 0..per {
            let u = User::start(&format!("u{}{i}", k + 1), c.client_addr(k), c.decision());
            assert_eq!(u.node(), format!("n{}", k + 1));
            v.push(u);
        }
    }
    v
}

/// Waits until a confirmed publish through node `via` to `user` is delivered.
fn reaches(c: &Cluster, ledger: &mut Ledger, via: usize, user: &User, limit: Duration) -> Option<Duration> {
    let mut p = c.publisher(via);
    let mut last = String::new();
    within(limit, || {
        if !last.is_empty() && user.has(&last) {
            return true;
        }
        let (payload, _) = ledger.publish(&mut p, &user.name);
        last = payload;
        within(Duration::from_millis(300), || user.has(&last)).is_some()
    })
}

fn all_listed(c: &Cluster) -> bool {
    (0..2).all(|d| c.listed(d).is_some_and(|v| v.len() == 3))
}

/// Reports how long until a publish through node `via` reached `user`.
fn delivered(phase: &str, what: &str, c: &Cluster, ledger: &mut Ledger, via: usize, user: &User) {
    report(phase, what, reaches(c, ledger, via, user, Duration::from_secs(20)));
}

/// Prints when each of `users` last connected, and where, counted from `t0`.
fn failovers(phase: &str, users: &[User], t0: Instant) {
    for u in users {
        let s = u.seen.lock().unwrap();
        let (at, node) = s.connects.last().unwrap();
        eprintln!("partition: {phase}: {} failed over to {node} after {} ms", u.name, (*at - t0).as_millis());
    }
}

fn report(phase: &str, what: &str, d: Option<Duration>) -> Duration {
    let d = d.unwrap_or_else(|| panic!("{phase}: {what} did not happen in time"));
    eprintln!("partition: {phase}: {what} after {} ms", d.as_millis());
    d
}

#[test]
fn partitions_between_nodes_decision_servers_and_clients() {
    let Some(c) = Cluster::start("all", "1s") else { return };
    let net = &c.net;
    report("start", "both decision servers list 3 nodes", within(Duration::from_secs(20), || all_listed(&c)));
    let us = users(&c, 2);
    let mut ledger = Ledger::default();
    // The mesh is up: a publish through n2 and n3 reaches a user on n1.
    delivered("start", "a publish via n2 reaches n1", &c, &mut ledger, 1, &us[0]);
    delivered("start", "a publish via n3 reaches n1", &c, &mut ledger, 2, &us[1]);

    // 1. n1 ↔ decision servers.
    net.isolate(&[NODES[0], DECISIONS[0], DECISIONS[1]], true);
    let gone = || (0..2).all(|d| c.listed(d).is_some_and(|v| v == ["n2", "n3"]));
    report("n1-decision cut", "no decision server lists n1", within(Duration::from_secs(15), gone));
    for i in 0..20 {
        for d in 0..2 {
            let r = c.ranked(d, &format!("new{i}")).unwrap();
            assert!(!r.contains(&"n1".to_owned()), "n1 assigned while cut off: {r:?}");
        }
    }
    // n1 still serves its clients, and the mesh still carries to it.
    let mut p2 = c.publisher(1);
    for u in &us {
        ledger.publish(&mut p2, &u.name);
    }
    net.isolate(&[NODES[0], DECISIONS[0], DECISIONS[1]], false);
    report("n1-decision heal", "both list n1 again", within(Duration::from_secs(15), || all_listed(&c)));
    let back = || (0..2).all(|d| c.ranked(d, "again").is_some_and(|r| r.contains(&"n1".to_owned())));
    report("n1-decision heal", "n1 is assigned again", within(Duration::from_secs(10), back));
    within(Duration::from_secs(5), || us.iter().all(|u| u.seen.lock().unwrap().got.len() >= 2));
    ledger.check(&us);

    // 1b. d1 ↔ n1 only: d1 stops listing and assigning n1, d2 does not.
    net.isolate(&[NODES[0], DECISIONS[0]], true);
    let split =
        || c.listed(0).is_some_and(|v| v == ["n2", "n3"]) && c.listed(1).is_some_and(|v| v.len() == 3);
    report("d1-n1 cut", "d1 no longer lists n1, d2 still does", within(Duration::from_secs(15), split));
    for i in 0..10 {
        let r = c.ranked(0, &format!("half{i}")).unwrap();
        assert!(!r.contains(&"n1".to_owned()), "d1 assigned n1 while cut from it: {r:?}");
    }
    assert!(c.listed(1).is_some_and(|v| v.len() == 3), "d2 lost a node it still hears");
    net.isolate(&[NODES[0], DECISIONS[0]], false);
    report("d1-n1 heal", "both list n1 again", within(Duration::from_secs(15), || all_listed(&c)));

    // 2. The mesh: every node cut from every other, silently (the links'
    // sockets do not notice). A confirming publisher must not be told
    // `forwarded` for a message that is then lost.
    net.isolate(&NODES, true);
    let mut p2 = c.publisher(1);
    let t0 = Instant::now();
    let (_, r) = ledger.publish(&mut p2, &us[0].name);
    eprintln!(
        "partition: mesh cut: first publish via n2 to a user on n1: {r:?} after {} ms",
        t0.elapsed().as_millis()
    );
    // Once the links are declared down, n2 knows n1's users are unreachable.
    let unreachable = || {
        let (_, r) = ledger.publish(&mut c.publisher(1), &us[0].name);
        r.forwarded == 0
    };
    report(
        "mesh cut",
        "n2 stops counting n1's user as forwarded",
        within(Duration::from_secs(15), unreachable),
    );
    net.isolate(&NODES, false);
    delivered("mesh heal", "a publish via n2 reaches n1 again", &c, &mut ledger, 1, &us[0]);
    delivered("mesh heal", "a publish via n1 reaches n3 again", &c, &mut ledger, 0, &us[5]);
    std::thread::sleep(Duration::from_millis(500));
    ledger.check(&us);

    // 3. n1 ↔ its clients: they fail over to n2 or n3 through the decision
    // servers (n1 is still listed, so their client tries it last).
    let t0 = Instant::now();
    net.isolate(&[NODES[0], TESTER], true);
    let moved = || us[..2].iter().all(|u| u.node() != "n1");
    report("n1-clients cut", "n1's clients reconnected elsewhere", within(Duration::from_secs(30), moved));
    failovers("n1-clients cut", &us[..2], t0);
    for u in &us[..2] {
        delivered("n1-clients cut", "a publish via n3 reaches a failed-over user", &c, &mut ledger, 2, u);
    }
    net.isolate(&[NODES[0], TESTER], false);
    std::thread::sleep(Duration::from_millis(500));
    ledger.check(&us);

    // 4. 30 % of the decision hosts' traffic dropped for 8 s (their switch
    // ports down in a random 30 % of 100 ms slots), heartbeats included:
    // no node is expired, and deliveries carry on. The seeded sequence's
    // longest run of down slots is 4 (about 0.4 s, a heartbeat or two),
    // well under --expire-after 2s, so the check holds on a slow machine.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let t0 = Instant::now();
    let (mut slots, mut down, mut short) = (0, 0, 0);
    let mut p3 = c.publisher(2);
    while t0.elapsed() < Duration::from_secs(8) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let cut = rng % 100 < 30;
        slots += 1;
        down += cut as u32;
        for d in DECISIONS {
            net.link(d, !cut);
        }
        if !cut {
            if let Some(v) = c.listed(slots % 2) {
                short += (v.len() != 3) as u32;
            }
        }
        let u = &us[slots % us.len()];
        ledger.publish(&mut p3, &u.name);
        std::thread::sleep(Duration::from_millis(100));
    }
    for d in DECISIONS {
        net.link(d, true);
    }
    eprintln!("partition: 30% loss: {down} of {slots} slots down; {short} samples listed fewer than 3 nodes");
    assert_eq!(short, 0, "a node was expired while only 30% of heartbeats were lost");
    assert!(all_listed(&c));

    // 5. n1 cut from everyone (its switch port down): no decision server
    // lists it, its clients fail over, its peers drop its presence; healed,
    // it rejoins the mesh, presence resyncs and it is assigned again.
    let mut us = us;
    for name in ["u1a", "u1b"] {
        us.push(User::start(name, c.client_addr(0), c.decision()));
    }
    let t0 = Instant::now();
    net.link(NODES[0], false);
    let gone = || (0..2).all(|d| c.listed(d).is_some_and(|v| v == ["n2", "n3"]));
    report("n1 cut off", "no decision server lists n1", within(Duration::from_secs(15), gone));
    let mut p2 = c.publisher(1);
    for u in &us[6..] {
        ledger.publish(&mut p2, &u.name);
    }
    let moved = || us[6..].iter().all(|u| u.node() != "n1");
    report("n1 cut off", "n1's clients reconnected elsewhere", within(Duration::from_secs(30), moved));
    failovers("n1 cut off", &us[6..], t0);
    for u in &us[6..] {
        delivered("n1 cut off", "a publish via n2 reaches a failed-over user", &c, &mut ledger, 1, u);
    }
    let t0 = Instant::now();
    net.link(NODES[0], true);
    report("n1 healed", "both list n1 again", within(Duration::from_secs(15), || all_listed(&c)));
    let back = || (0..2).all(|d| c.ranked(d, "again").is_some_and(|r| r.contains(&"n1".to_owned())));
    report("n1 healed", "n1 is assigned again", within(Duration::from_secs(10), back));
    us.push(User::start("u1c", c.client_addr(0), c.decision()));
    let last = us.len() - 1;
    let resync = reaches(&c, &mut ledger, 2, &us[last], Duration::from_secs(20)).map(|_| t0.elapsed());
    report("n1 healed", "a publish via n3 reaches a new user on n1 (from the cut's end)", resync);
    let resync = reaches(&c, &mut ledger, 0, &us[2], Duration::from_secs(20)).map(|_| t0.elapsed());
    report("n1 healed", "a publish via n1 reaches a user on n2 (from the cut's end)", resync);

    // Healed: every node reaches every user.
    for via in 0..3 {
        for u in &us {
            reaches(&c, &mut ledger, via, u, Duration::from_secs(20)).expect("healed cluster delivers");
        }
    }
    ledger.check(&us);
}

/// The rule of protocol.md §6.6 for a silent mesh cut: a confirming
/// publisher is not told `forwarded` for a message that is then lost. The
/// nodes' keepalive (2 s) cannot notice the cut before the forward timeout
/// (2 s) does; the cut lasts 8 s, past the old code's keepalive close (6 s
/// of silence), which lost the FORWARD it had counted as `forwarded`.
#[test]
fn a_publish_forwarded_into_a_silent_mesh_cut_is_not_reported_as_forwarded() {
    let Some(c) = Cluster::start("fwd", "2s") else { return };
    within(Duration::from_secs(20), || all_listed(&c)).expect("3 nodes listed");
    let us = users(&c, 1);
    let mut ledger = Ledger::default();
    reaches(&c, &mut ledger, 1, &us[0], Duration::from_secs(20)).expect("mesh up");
    c.net.isolate(&NODES, true);
    let t0 = Instant::now();
    let mut p2 = c.publisher(1);
    let (payload, r) = ledger.publish(&mut p2, &us[0].name);
    eprintln!("partition: silent mesh cut: {r:?} after {} ms", t0.elapsed().as_millis());
    // The partition lasts 8 s (a fixed length for the scenario, not a check).
    std::thread::sleep(Duration::from_secs(8).saturating_sub(t0.elapsed()));
    c.net.isolate(&NODES, false);
    reaches(&c, &mut ledger, 1, &us[0], Duration::from_secs(20)).expect("mesh healed");
    assert!(
        r.forwarded == 0 || us[0].has(&payload),
        "PUB_RESULT said forwarded ({r:?}) but {payload} never arrived"
    );
    ledger.check(&us);
}

/// Durable mode (protocol.md §13): n1 cut from the log's servers (and from
/// nothing else). It stops confirming, tells the decision servers it is
/// draining, and moves its clients to n2 and n3, which resume them from the
/// log (no restart, no loss); healed, it confirms and is assigned again.
#[test]
fn durable_a_node_cut_from_the_log_stops_confirming_and_moves_its_clients() {
    use herald::client::ClientError;
    use herald::protocol::Code;
    let Some(c) = Cluster::start_with("dlog", "1s", true) else { return };
    let net = &c.net;
    report("start", "both decision servers list 3 nodes", within(Duration::from_secs(20), || all_listed(&c)));
    let us = users(&c, 2);
    let mut ledger = Ledger::default();
    delivered("start", "a publish via n2 reaches n1", &c, &mut ledger, 1, &us[0]);
    delivered("start", "a publish via n1 reaches n2", &c, &mut ledger, 0, &us[2]);

    net.isolate(&[NODES[0], LOG], true);
    let t0 = Instant::now();
    // n1 notices by itself (its probe of the log) and refuses: a confirmed
    // publish through it is never confirmed.
    let mut p1 = c.publisher(0);
    let refused = within(Duration::from_secs(10), || {
        match p1.publish_confirmed(us[2].name.as_bytes(), format!("for:{}:refused", us[2].name).as_bytes()) {
            Err(ClientError::Rejected { code: Code::LogUnavailable, .. }) => true,
            Ok(r) => panic!("n1 confirmed a publish it cannot keep: {r:?}"),
            Err(_) => {
                p1 = c.publisher(0);
                false
            }
        }
    });
    report("n1-log cut", "n1 refuses confirmed publishes (LOG_UNAVAILABLE)", refused);
    // Its clients move to n2 and n3 and resume there from the log.
    let moved = || us[..2].iter().all(|u| !u.node().is_empty() && u.node() != "n1");
    report("n1-log cut", "n1's clients are on other nodes", within(Duration::from_secs(20), moved));
    failovers("n1-log cut", &us[..2], t0);
    for i in 0..10 {
        for d in 0..2 {
            let r = c.ranked(d, &format!("cut{i}")).unwrap();
            assert!(!r.contains(&"n1".to_owned()), "n1 assigned while cut from the log: {r:?}");
        }
    }
    let mut p2 = c.publisher(1);
    for u in &us {
        ledger.publish(&mut p2, &u.name);
    }
    for u in &us[..2] {
        delivered(
            "n1-log cut",
            &format!("a publish via n2 reaches {} on {}", u.name, u.node()),
            &c,
            &mut ledger,
            1,
            u,
        );
    }

    net.isolate(&[NODES[0], LOG], false);
    let back = || (0..2).all(|d| c.ranked(d, "again").is_some_and(|r| r.contains(&"n1".to_owned())));
    report("n1-log heal", "n1 is assigned again", within(Duration::from_secs(20), back));
    let mut p1 = c.publisher(0);
    let confirms = within(Duration::from_secs(10), || {
        p1.publish_confirmed(us[2].name.as_bytes(), format!("for:{}:again", us[2].name).as_bytes()).is_ok()
    });
    report("n1-log heal", "n1 confirms again", confirms);
    within(Duration::from_secs(5), || {
        ledger
            .sent
            .iter()
            .filter(|(_, _, q)| *q)
            .all(|(who, p, _)| us.iter().any(|u| u.name == *who && u.has(p)))
    });
    // Nothing confirmed was lost, and no stream restarted: the moved
    // clients resumed from the log.
    for u in &us {
        let s = u.seen.lock().unwrap();
        assert_eq!((s.restarts, s.lost), (0, 0), "{}: restarts {} lost {}", u.name, s.restarts, s.lost);
        assert!(s.misrouted.is_empty());
        let missing: Vec<&String> = ledger
            .sent
            .iter()
            .filter(|(who, p, q)| *who == u.name && *q && !s.got.contains(p))
            .map(|(_, p, _)| p)
            .collect();
        assert!(missing.is_empty(), "{}: confirmed and never arrived: {missing:?}", u.name);
    }
}
