//! A node process's event loops: binding the listeners, starting one loop
//! per `--threads` (loop 0 on the calling thread, the others on threads of
//! their own), the helper threads of a cluster member, and shutting it all
//! down again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Poll, Waker};

use crate::net::{self, EventLoop, Listener};
use crate::tls::{self, Acceptor, ServerFiles};

use super::cluster::{self, Heartbeater};
use super::config::{Config, MAX_THREADS};
use super::confirm::Confirms;
use super::conn::Limits;
use super::dedup::Dedup;
use super::duty::Duties;
use super::error::NodeError;
use super::intake::Intake;
use super::link::Mesh;
use super::metrics::Metrics;
use super::route::Turn;
use super::service::{Control, NodeLoop};
use super::session::Sessions;
use super::shard::{self, Role};

/// Open connections the HTTP publish API takes at once; more are closed at accept.
const MAX_API_CONNS: usize = 1024;
/// Open connections the metrics port takes at once; more are closed at accept.
const MAX_HTTP_CONNS: usize = 32;

/// Asks a running node to drain and stop; cloneable, usable from any thread
/// (the ctrl-c handler only calls [`ShutdownHandle::trigger`]).
#[derive(Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    kill: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Wakers of loops 1..N.
    others: Vec<Arc<Waker>>,
}

impl ShutdownHandle {
    /// Starts the drain: stop accepting, send goodbyes, flush, return.
    pub fn trigger(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        for w in &self.others {
            let _ = w.wake();
        }
    }

    /// Stops at once, as a crash would: no goodbyes, sockets just close.
    /// For demos and failure tests.
    pub fn kill(&self) {
        self.kill.store(true, Ordering::SeqCst);
        self.trigger();
    }
}

/// A bound node, ready to [`Node::run`].
pub struct Node {
    poll: Poll,
    client_l: TcpListener,
    ingest_l: TcpListener,
    metrics_l: Option<TcpListener>,
    http_l: Option<TcpListener>,
    handle: ShutdownHandle,
    /// Polls of loops 1..N.
    others: Vec<Poll>,
    /// The client port's TLS, if any (reloadable).
    tls: Option<Acceptor>,
    /// The ingest port's TLS, if any: publishers with or without a
    /// certificate, mesh peers with a cluster-CA one (reloadable).
    ingest_tls: Option<Acceptor>,
    /// The metrics port's TLS (HTTPS), if any (reloadable).
    metrics_tls: Option<Acceptor>,
    /// The HTTP publish API's TLS (HTTPS), if any (reloadable).
    http_tls: Option<Acceptor>,
    /// How this node dials its mesh peers over TLS.
    mesh_tls: Option<tls::Dialer>,
    /// How this node asks the decision servers for the node list: TLS with
    /// this configuration; none: plaintext.
    decision_tls: Option<Arc<rustls::ClientConfig>>,
    cfg: Config,
}

/// The TLS of each port, from the configuration (none: plaintext).
#[derive(Default)]
struct PortTls {
    client: Option<Acceptor>,
    ingest: Option<Acceptor>,
    metrics: Option<Acceptor>,
    http: Option<Acceptor>,
    mesh: Option<tls::Dialer>,
}

fn bind(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, NodeError> {
    net::listen(addr).map_err(|source| NodeError::Bind { what, addr, source })
}

impl Node {
    /// Binds the listeners. Port 0 picks a free port (see the `*_addr` methods).
    pub fn bind(cfg: Config) -> Result<Node, NodeError> {
        // protocol.md §3.4: WELCOME.heartbeat_ms is 100..=3,600,000.
        if cfg.heartbeat < Duration::from_millis(100) || cfg.heartbeat > Duration::from_secs(3600) {
            return Err(NodeError::Config(format!("heartbeat {:?} is outside 100ms..=1h", cfg.heartbeat)));
        }
        if cfg.threads == 0 || cfg.threads > MAX_THREADS {
            return Err(NodeError::Config(format!("threads must be 1..={MAX_THREADS}, not {}", cfg.threads)));
        }
        let PortTls { client: tls, ingest: ingest_tls, metrics: metrics_tls, http: http_tls, mesh: mesh_tls } =
            Node::load_tls(&cfg)?;
        let decision_tls =
            cfg.decision_tls.as_ref().map(tls::Trust::config).transpose().map_err(NodeError::Tls)?;
        let poll = Poll::new().map_err(NodeError::Setup)?;
        let client_l = net::listen_with(cfg.listen, (cfg.client_sndbuf > 0).then_some(cfg.client_sndbuf))
            .map_err(|source| NodeError::Bind { what: "client", addr: cfg.listen, source })?;
        let ingest_l = bind("ingest", cfg.ingest)?;
        let metrics_l = cfg.metrics.map(|a| bind("metrics", a)).transpose()?;
        let http_l = cfg.http.map(|a| bind("http", a)).transpose()?;
        let waker = Arc::new(Waker::new(poll.registry(), net::WAKER).map_err(NodeError::Setup)?);
        let mut others = Vec::new();
        let mut other_wakers = Vec::new();
        for _ in 1..cfg.threads {
            let p = Poll::new().map_err(NodeError::Setup)?;
            other_wakers.push(Arc::new(Waker::new(p.registry(), net::WAKER).map_err(NodeError::Setup)?));
            others.push(p);
        }
        let handle = ShutdownHandle {
            stop: Arc::new(AtomicBool::new(false)),
            kill: Arc::new(AtomicBool::new(false)),
            waker,
            others: other_wakers,
        };
        Ok(Node {
            poll,
            client_l,
            ingest_l,
            metrics_l,
            http_l,
            handle,
            others,
            tls,
            ingest_tls,
            metrics_tls,
            http_tls,
            mesh_tls,
            decision_tls,
            cfg,
        })
    }

    /// The TLS of the client port, of the ingest port, and of mesh dials.
    #[allow(clippy::type_complexity)]
    fn load_tls(cfg: &Config) -> Result<PortTls, NodeError> {
        let Some(files) = &cfg.tls else { return Ok(PortTls::default()) };
        let ports = cfg.tls_ports;
        let client =
            if ports.client { Some(Acceptor::load(files.clone()).map_err(NodeError::Tls)?) } else { None };
        // HTTPS for a scraper or an HTTP publisher: no client certificate,
        // ALPN http/1.1.
        let https = |on: bool, addr: Option<std::net::SocketAddr>, flag: &str| match (on, addr) {
            (true, None) => Err(NodeError::Config(format!("--tls-ports {flag} needs --{flag} ADDR"))),
            (true, Some(_)) => {
                let f = ServerFiles { client_ca: None, client_cert_optional: false, ..files.clone() };
                Acceptor::load_for(f, tls::ALPN_HTTP).map(Some).map_err(NodeError::Tls)
            }
            (false, _) => Ok(None),
        };
        let metrics = https(ports.metrics, cfg.metrics, "metrics")?;
        let http = https(ports.http, cfg.http, "http")?;
        if !ports.ingest {
            return Ok(PortTls { client, metrics, http, ..PortTls::default() });
        }
        if !cfg.decision.is_empty() && cfg.cluster_ca.is_none() {
            return Err(NodeError::Config(
                "TLS on the ingest port of a cluster member needs --cluster-ca (mesh peers are verified against it)"
                    .into(),
            ));
        }
        let ingest = ServerFiles {
            cert: files.cert.clone(),
            key: files.key.clone(),
            client_ca: cfg.cluster_ca.clone(),
            client_cert_optional: true,
        };
        let ingest = Acceptor::load(ingest).map_err(NodeError::Tls)?;
        let mesh = match &cfg.cluster_ca {
            Some(ca) => Some(tls::Dialer::load(&files.cert, &files.key, ca).map_err(NodeError::Tls)?),
            None => None,
        };
        Ok(PortTls { client, ingest: Some(ingest), metrics, http, mesh })
    }

    /// The bound client address.
    pub fn client_addr(&self) -> std::net::SocketAddr {
        self.client_l.local_addr().expect("bound")
    }
    /// The kernel send buffer a client connection gets, as the kernel
    /// accounts it (twice `--client-sndbuf`; autotuned when that is 0).
    pub fn client_sndbuf(&self) -> usize {
        socket2::SockRef::from(&self.client_l).send_buffer_size().unwrap_or(0)
    }
    /// The bound ingest address.
    pub fn ingest_addr(&self) -> std::net::SocketAddr {
        self.ingest_l.local_addr().expect("bound")
    }
    /// The bound HTTP publish API address, if any.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_l.as_ref().map(|l| l.local_addr().expect("bound"))
    }
    /// The bound metrics address, if any.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_l.as_ref().map(|l| l.local_addr().expect("bound"))
    }
    /// The node's TLS, to reload its certificate (e.g. on SIGHUP):
    /// [`Acceptor::reload`] keeps the old one if the new files are bad.
    pub fn tls(&self) -> tls::Reload {
        tls::Reload {
            acceptors: self
                .tls
                .iter()
                .chain(&self.ingest_tls)
                .chain(&self.metrics_tls)
                .chain(&self.http_tls)
                .cloned()
                .collect(),
            dialer: self.mesh_tls.clone(),
        }
    }

    /// A handle that makes [`Node::run`] drain and return.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// One loop's roles.
    #[allow(clippy::too_many_arguments)]
    fn roles(
        &self,
        id: usize,
        shared: &Arc<Common>,
        role: Role,
        hb: Option<Heartbeater>,
        control: Option<Control>,
        replies: Vec<crossbeam_channel::Sender<crate::source::Reply>>,
        log: Option<super::service::LogLink>,
    ) -> NodeLoop {
        let now = Instant::now();
        NodeLoop {
            cfg: self.cfg.clone(),
            id,
            shared: shared.shared.clone(),
            role,
            sessions: Sessions::new(&self.cfg, id, self.cfg.threads, shared.seed),
            mesh: Mesh::new(&self.cfg.node_id, shared.incarnation, self.mesh_tls.clone()),
            confirms: Confirms::new(self.cfg.forward_timeout),
            m: Metrics::default(),
            turn: Turn::new(now),
            unix: 0,
            duties: Duties::new(&self.cfg, hb, now),
            parked: Vec::new(),
            stop: self.handle.stop.clone(),
            kill: self.handle.kill.clone(),
            control,
            inbox_held: false,
            intake: {
                let mut i = Intake::new(
                    replies,
                    Dedup::new(self.cfg.dedup_window, if id == 0 { self.cfg.dedup_max } else { 0 }),
                );
                i.durable = log.is_some();
                i
            },
            journal: log.as_ref().map(|l| super::journal::Journal::new(l.log.created)),
            log,
        }
    }

    /// Runs the event loop(s) until a shutdown is triggered and the drain is
    /// done. Loop 0 runs on the calling thread; loops 1..N on threads of
    /// their own, joined before this returns.
    pub fn run(mut self) -> Result<(), NodeError> {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            ^ (std::process::id() as u64) << 32;
        let n = self.cfg.threads;
        let common = Arc::new(Common {
            shared: Arc::new(shard::Shared::new(n)),
            seed,
            incarnation: cluster::unix_ms(),
        });
        let limits = Limits { queue_bytes: self.cfg.queue_bytes };
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        if !self.cfg.decision.is_empty() {
            cluster::spawn_discovery(
                self.cfg.decision.clone(),
                self.cfg.heartbeat_interval,
                self.decision_tls.clone(),
                self.handle.stop.clone(),
                self.handle.waker.clone(),
                ctl_tx.clone(),
            );
        }
        let advertise = self.cfg.advertise.clone().unwrap_or_else(|| self.client_addr().to_string());
        let advertise_ingest =
            self.cfg.advertise_ingest.clone().unwrap_or_else(|| self.ingest_addr().to_string());
        let hb = Heartbeater::new(&self.cfg.decision, advertise, advertise_ingest, common.incarnation);

        // Loops 1..N: their inboxes, and the way back to loop 0.
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (free_tx, free_rx) = crossbeam_channel::unbounded();
        let mut links = Vec::new();
        let mut threads = Vec::new();
        for (i, poll) in std::mem::take(&mut self.others).into_iter().enumerate() {
            let id = i + 1;
            let (tx, inbox) = crossbeam_channel::unbounded();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let waker = self.handle.others[i].clone();
            links.push(shard::Link {
                tx,
                waker,
                in_flight: in_flight.clone(),
                batch: Vec::new(),
                since: None,
                wake: false,
            });
            let owner = shard::Owner {
                inbox,
                in_flight,
                free: free_tx.clone(),
                events_tx: events_tx.clone(),
                router_waker: self.handle.waker.clone(),
                events: Vec::new(),
            };
            let roles = self.roles(id, &common, Role::Owner(owner), None, None, Vec::new(), None);
            // Tells loop 0 this loop is gone, however it ends (even by panic).
            let gone = LoopGone { id, shared: common.shared.clone(), waker: self.handle.waker.clone() };
            let spawned = std::thread::Builder::new().name(format!("herald-loop-{id}")).spawn(move || {
                let r = EventLoop::new(poll, Vec::new(), roles, limits).and_then(|mut l| {
                    let r = l.run();
                    // Last figures for loop 0.
                    l.service.final_stats(&l.conns);
                    r
                });
                if r.is_err() {
                    gone.shared.failed.store(id, Ordering::SeqCst);
                }
                drop(gone);
                r
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.handle.kill();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(NodeError::Setup(e));
                }
            }
        }
        let role = if n > 1 {
            Role::Router(shard::Router {
                links,
                homes: shard::Homes::default(),
                events: events_rx,
                free: free_rx,
            })
        } else {
            Role::Single
        };
        // Connectors: each on its own thread, handing batches to loop 0.
        let mut replies = Vec::new();
        for (index, spec) in self.cfg.sources.iter().enumerate() {
            let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
            replies.push(reply_tx);
            let (tx, waker) = (ctl_tx.clone(), self.handle.waker.clone());
            let intake = crate::source::Intake {
                send: Box::new(move |mut b: crate::source::Batch| {
                    b.source = index;
                    let ok = tx.send(cluster::Ctl::Source(b)).is_ok();
                    let _ = waker.wake();
                    ok
                }),
                replies: reply_rx,
                node_id: self.cfg.node_id.clone(),
            };
            crate::source::spawn(spec.clone(), intake, self.handle.stop.clone()).map_err(NodeError::Setup)?;
        }
        // Durable mode: the log thread, answering loop 0 through its waker.
        let log = match &self.cfg.durable {
            Some(spec) => {
                let (tx, answers) = crossbeam_channel::unbounded();
                let waker = self.handle.waker.clone();
                let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                    let _ = waker.wake();
                });
                let name = format!("{}.{}", self.cfg.node_id, common.incarnation);
                log::info!("herald node {}: durable mode, log {}", self.cfg.node_id, spec.url);
                let log = crate::durable::log::Log::start(spec.clone(), &name, tx, wake)
                    .map_err(NodeError::Durable)?;
                Some(super::service::LogLink { log, answers })
            }
            None => None,
        };
        let control = Control { tx: ctl_tx, rx: ctl_rx, waker: self.handle.waker.clone() };
        let roles = self.roles(0, &common, role, Some(hb), Some(control), replies, log);
        let id = &self.cfg.node_id;
        for (what, tls, addr) in [
            ("client", &self.tls, Some(self.client_addr())),
            ("ingest", &self.ingest_tls, Some(self.ingest_addr())),
            ("metrics", &self.metrics_tls, self.metrics_addr()),
            ("http", &self.http_tls, self.http_addr()),
        ] {
            if let (Some(a), None) = (addr, tls) {
                let how = if self.tls.is_none() {
                    "give --tls-cert/--tls-key for TLS"
                } else {
                    "it is not in --tls-ports"
                };
                log::warn!("herald node {id}: the {what} port {a} is plaintext (unencrypted); {how}");
            }
        }
        let mut listeners = vec![
            Listener { sock: self.client_l, cap: usize::MAX, tls: self.tls.clone() },
            Listener { sock: self.ingest_l, cap: usize::MAX, tls: self.ingest_tls.clone() },
        ];
        if let Some(m) = self.metrics_l {
            // The metrics port is for a scraper or two: a flood of
            // connections must not use up the descriptors clients need.
            listeners.push(Listener { sock: m, cap: MAX_HTTP_CONNS, tls: self.metrics_tls.clone() });
        }
        if let Some(h) = self.http_l {
            // Publishers' keep-alive connections: a handful per backend.
            listeners.push(Listener { sock: h, cap: MAX_API_CONNS, tls: self.http_tls.clone() });
        }
        let r = EventLoop::new(self.poll, listeners, roles, limits).and_then(|mut l| l.run());
        if r.is_err() {
            self.handle.kill();
        }
        let mut first_err = r.err().map(|source| NodeError::LoopFailed { loop_id: 0, source });
        for (i, t) in threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    first_err.get_or_insert(NodeError::LoopFailed { loop_id: i + 1, source });
                }
                Err(_) => {
                    first_err.get_or_insert(NodeError::LoopPanicked { loop_id: i + 1 });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// What every loop's roles start from.
struct Common {
    shared: Arc<shard::Shared>,
    seed: u64,
    incarnation: u64,
}

/// Dropped when a loop 1..N ends, also by panic: counts it off, marks the
/// node failed if the loop panicked, and wakes loop 0.
struct LoopGone {
    id: usize,
    shared: Arc<shard::Shared>,
    waker: Arc<Waker>,
}

impl Drop for LoopGone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.failed.store(self.id, Ordering::SeqCst);
        }
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::cluster::unix_ms;
    use crate::protocol::frame::{self as f, Frame};
    use crate::protocol::{decode, Channel, Code, Decoded, GoodbyeAction};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream as StdStream};

    const SECRET: &[u8] = b"unit-test-client-secret";

    /// Connects a raw client for `user` and sends its HELLO.
    fn hello(addr: SocketAddr, user: &str) -> StdStream {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let token = crate::protocol::token::mint(SECRET, user.as_bytes(), unix_ms() / 1000 + 600).unwrap();
        let hello = Frame::Hello(f::Hello {
            min_version: 1,
            max_version: 1,
            token: token.as_bytes(),
            agent: b"",
            resume: None,
        });
        s.write_all(&hello.to_vec()).unwrap();
        s
    }

    /// Reads frames until one matches `want` (true) or the stream ends or
    /// times out (false).
    fn read_until(s: &mut StdStream, want: impl Fn(&Frame<'_>) -> bool) -> bool {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Ok(Decoded::Frame(fr, used)) = decode(&buf, Channel::ToClient) {
                if want(&fr) {
                    return true;
                }
                buf.drain(..used);
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn healthz(addr: SocketAddr) -> String {
        let mut s = StdStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn user_on(loop_id: usize, n: usize, skip: usize) -> String {
        (0..).map(|i| format!("u{i}")).filter(|u| shard::owner(u.as_bytes(), n) == loop_id).nth(skip).unwrap()
    }

    #[test]
    fn a_failed_loop_drains_the_node_and_run_returns_the_failure() {
        let node = Node::bind(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ingest: "127.0.0.1:0".parse().unwrap(),
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            client_secret: SECRET.to_vec(),
            publisher_secret: b"unit-test-publisher-secret".to_vec(),
            drain_window: Duration::from_secs(2),
            log_every: Duration::ZERO,
            threads: 3,
            fail_on_adopt: 2,
            ..Config::default()
        })
        .unwrap();
        let (client, metrics) = (node.client_addr(), node.metrics_addr().unwrap());
        let run = std::thread::spawn(move || node.run());
        let welcomed = |f: &Frame<'_>| matches!(f, Frame::Welcome(_));
        // Loop 0 holds several clients, so its drain spreads over the window
        // and the node stays up long enough to be asked about its health.
        let mut zeros: Vec<StdStream> = (0..8).map(|i| hello(client, &user_on(0, 3, i))).collect();
        for s in &mut zeros {
            assert!(read_until(s, welcomed));
        }
        let mut one = hello(client, &user_on(1, 3, 0));
        assert!(read_until(&mut one, welcomed));
        assert!(healthz(metrics).starts_with("HTTP/1.1 200"));

        // Loop 2 panics when handed this client: the client's socket closes.
        let mut two = hello(client, &user_on(2, 3, 0));
        assert!(!read_until(&mut two, welcomed), "the failed loop's client must not be welcomed");

        // The rest of the node drains: loop 1's client is sent away ...
        let goodbye = |f: &Frame<'_>| matches!(f, Frame::Goodbye(g) if g.reason == Code::Draining && g.action == GoodbyeAction::AskDecision);
        assert!(read_until(&mut one, goodbye), "loop 1's client gets a GOODBYE");
        // ... health says why, and the node stops taking clients.
        let h = healthz(metrics);
        assert!(h.starts_with("HTTP/1.1 503") && h.contains("event loop 2 failed"), "{h}");
        for s in &mut zeros {
            assert!(read_until(s, goodbye), "loop 0's clients get a GOODBYE");
        }
        let err = run.join().unwrap().expect_err("run reports the failed loop");
        assert!(err.to_string().contains("event loop 2 panicked"), "{err}");
    }
}
