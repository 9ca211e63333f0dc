//! The demo's message queue (`herald demo --source jetstream|redis`): the
//! backend publishes the simulated traffic into a queue engine and the
//! demo's nodes pull it from there (`herald node --source`, protocol.md
//! §12), as a deployment whose backend already writes to a queue would.
//!
//! The demo starts the queue server itself (`nats-server -js` or
//! `redis-server`, from Debian's packages) on a free loopback port, with its
//! data in a temporary directory, in a process group of its own (so a
//! Ctrl-C in the terminal reaches only the demo, which then stops it by its
//! pid), and waits until it answers; or it uses one already running
//! (`--source-server HOST:PORT`), in a stream of its own that it deletes at
//! the end. A server that is not installed is [`QueueError::NotInstalled`],
//! which names the package.
//!
//! The backend's side: [`JetStreamBackend`] publishes with async-nats on a
//! current-thread tokio runtime on a thread of its own and counts a message
//! published once JetStream acknowledged storing it; [`RedisBackend`] speaks
//! the few RESP commands it needs (`XADD` and the set-up) over a plain TCP
//! connection and counts a message once `XADD` answered with its entry id.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::source::Spec;

/// The queue engine `herald demo --source` routes the traffic through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// NATS JetStream (`nats-server -js`): a stream the nodes pull from
    /// through one durable consumer.
    #[value(name = "jetstream")]
    JetStream,
    /// Redis Streams (`redis-server`): a stream key the nodes read through
    /// one consumer group.
    Redis,
}

impl Source {
    /// The server's binary.
    pub fn server_bin(self) -> &'static str {
        match self {
            Source::JetStream => "nats-server",
            Source::Redis => "redis-server",
        }
    }

    /// The Debian package that installs it.
    pub fn package(self) -> &'static str {
        match self {
            Source::JetStream => "nats-server",
            Source::Redis => "redis-server",
        }
    }

    /// The engine's name, as the demo reports the path.
    pub fn engine(self) -> &'static str {
        match self {
            Source::JetStream => "JetStream",
            Source::Redis => "Redis",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Source::JetStream => "jetstream",
            Source::Redis => "redis",
        }
    }
}

/// Why the demo's queue could not be set up or used.
#[derive(Debug)]
pub enum QueueError {
    /// The queue server is not installed (and no `--source-server` given).
    NotInstalled {
        /// Which engine.
        source: Source,
    },
    /// The queue server could not be started.
    Start {
        /// Which engine.
        source: Source,
        /// The OS's error.
        error: io::Error,
    },
    /// The queue server did not answer in time (or exited).
    NoAnswer {
        /// Which engine.
        source: Source,
        /// Where it was asked.
        addr: String,
        /// The end of its log, if it was started here.
        log: String,
    },
    /// `--source-server` is not `HOST:PORT`.
    BadServer(String),
    /// The queue refused or failed a request (creating the stream,
    /// publishing, an acknowledgement that did not come).
    Request {
        /// Which engine.
        source: Source,
        /// What was asked, and the answer.
        what: String,
    },
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::NotInstalled { source } => write!(
                f,
                "--source {}: {} is not installed (Debian: apt-get install {}); \
                 or give --source-server HOST:PORT of one already running",
                source.flag(),
                source.server_bin(),
                source.package()
            ),
            QueueError::Start { source, error } => {
                write!(f, "--source {}: cannot start {}: {error}", source.flag(), source.server_bin())
            }
            QueueError::NoAnswer { source, addr, log } => {
                write!(f, "--source {}: {} at {addr} does not answer", source.flag(), source.server_bin())?;
                if !log.is_empty() {
                    write!(f, "; its log ends: {log}")?;
                }
                Ok(())
            }
            QueueError::BadServer(s) => write!(f, "--source-server {s:?}: must be HOST:PORT"),
            QueueError::Request { source, what } => write!(f, "{}: {what}", source.engine()),
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Start { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<QueueError> for io::Error {
    fn from(e: QueueError) -> io::Error {
        io::Error::other(e)
    }
}

/// The consumer group / durable consumer the demo's nodes share (the
/// connectors' default).
const GROUP: &str = "herald";

/// Finds `bin` on `PATH` or in the sbin directories (Debian installs
/// `nats-server` in `/usr/sbin`, which a user's `PATH` may lack).
pub(crate) fn find_bin(bin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A queue server this demo started: stopped by its pid, and its data
/// directory removed, on drop.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Server {
    fn start(source: Source) -> Result<(Server, String), QueueError> {
        let bin = find_bin(source.server_bin()).ok_or(QueueError::NotInstalled { source })?;
        let dir = std::env::temp_dir().join(format!(
            "herald-demo-{}-{}-{:x}",
            source.flag(),
            std::process::id(),
            crate::swarm::mono_ns()
        ));
        std::fs::create_dir_all(&dir).map_err(|error| QueueError::Start { source, error })?;
        // A port freed just before the server binds it may be taken in
        // between: a server that exits at once is tried on another.
        let mut last = None;
        for _ in 0..3 {
            let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(a) => a.port(),
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(QueueError::Start { source, error });
                }
            };
            let addr = format!("127.0.0.1:{port}");
            let mut cmd = Command::new(&bin);
            match source {
                Source::JetStream => {
                    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]).arg(&dir);
                }
                Source::Redis => {
                    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
                        .args(["--appendonly", "no", "--dir"])
                        .arg(&dir);
                }
            }
            let log = std::fs::File::create(dir.join("server.log"));
            let log = match log.and_then(|l| Ok((l.try_clone()?, l))) {
                Ok(l) => l,
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(QueueError::Start { source, error });
                }
            };
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.0)
                .stderr(log.1)
                // Its own process group: the terminal's Ctrl-C goes to the
                // demo, which stops the server when it is done with it.
                .process_group(0)
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(QueueError::Start { source, error });
                }
            };
            let mut s = Server { child, dir: dir.clone() };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if answers(source, &addr) {
                    return Ok((s, addr));
                }
                if !matches!(s.child.try_wait(), Ok(None)) || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let log = log_tail(&dir.join("server.log"));
            s.stop();
            last = Some(QueueError::NoAnswer { source, addr, log });
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last.expect("tried"))
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last line or two of a server's log, for an error message.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(2)..].join(" / ")
}

/// Whether the server at `addr` answers: NATS greets with `INFO`, Redis
/// answers `PING` with `+PONG`.
fn answers(source: Source, addr: &str) -> bool {
    let Ok(a) = addr.parse::<std::net::SocketAddr>().or_else(|_| {
        std::net::ToSocketAddrs::to_socket_addrs(addr).ok().and_then(|mut i| i.next()).ok_or(())
    }) else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(1)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    match source {
        Source::JetStream => {
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO")
        }
        Source::Redis => {
            let mut b = [0u8; 7];
            s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"+PONG\r\n"
        }
    }
}

/// How the queue looked at the end of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Messages (entries) the stream holds.
    pub stored: u64,
    /// Not yet handed to any node (JetStream: the consumer's pending;
    /// Redis: the group's lag).
    pub undelivered: u64,
    /// Handed to a node and not acknowledged.
    pub unacked: u64,
    /// JetStream: messages delivered again after their ack wait; Redis: the
    /// group's consumers.
    pub other: u64,
}

/// The demo's queue: its server, the stream it uses, how nodes name it.
pub struct Queue {
    /// The engine.
    pub source: Source,
    /// `host:port` of the server.
    pub addr: String,
    /// The JetStream stream or the Redis stream key.
    pub stream: String,
    /// JetStream: the subject filter (`herald.user.>`).
    pub subject: String,
    /// The server, if this demo started it (None: `--source-server`).
    server: Option<Server>,
}

impl Queue {
    /// Starts the queue server (or checks the one at `external` answers).
    pub fn open(source: Source, external: Option<&str>) -> Result<Queue, QueueError> {
        let Some(ext) = external else {
            let (server, addr) = Server::start(source)?;
            let (stream, subject) = match source {
                Source::JetStream => ("HERALD", "herald.user.>"),
                Source::Redis => ("herald", ""),
            };
            return Ok(Queue {
                source,
                addr,
                stream: stream.into(),
                subject: subject.into(),
                server: Some(server),
            });
        };
        let addr = ["nats://", "redis://", "jetstream://"]
            .iter()
            .find_map(|p| ext.strip_prefix(p))
            .unwrap_or(ext)
            .trim_end_matches('/');
        let port_ok = addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(QueueError::BadServer(ext.to_owned()));
        }
        if !answers(source, addr) {
            return Err(QueueError::NoAnswer { source, addr: addr.to_owned(), log: String::new() });
        }
        // Someone else's server: a stream (and subjects) of this run's own,
        // deleted at the end.
        let tag = format!("{:x}", crate::swarm::mono_ns() ^ (u64::from(std::process::id()) << 32));
        let (stream, subject) = match source {
            Source::JetStream => {
                (format!("HERALD_DEMO_{}", tag.to_uppercase()), format!("herald.demo.{tag}.user.>"))
            }
            Source::Redis => (format!("herald-demo-{tag}"), String::new()),
        };
        Ok(Queue { source, addr: addr.to_owned(), stream, subject, server: None })
    }

    /// Whether this demo started the server.
    pub fn started_here(&self) -> bool {
        self.server.is_some()
    }

    /// What the path looks like, for the demo's first lines.
    pub fn describe(&self) -> String {
        let server = match &self.server {
            Some(s) => format!(
                "{} started by the demo on {} (data in {}, removed at the end)",
                self.source.server_bin(),
                self.addr,
                s.dir.display()
            ),
            None => format!("{} at {} (--source-server)", self.source.server_bin(), self.addr),
        };
        match self.source {
            Source::JetStream => format!(
                "{server}; the backend publishes to {}<user> (stream {}), the nodes pull through the durable consumer {GROUP}",
                self.subject.trim_end_matches('>'),
                self.stream
            ),
            Source::Redis => format!(
                "{server}; the backend XADDs to stream key {} (fields user, data, and key for a quote), the nodes read through the consumer group {GROUP}",
                self.stream
            ),
        }
    }

    /// The `--source` the demo's nodes get.
    pub fn node_source(&self) -> Spec {
        let url = match self.source {
            Source::JetStream if self.subject != "herald.user.>" => {
                format!("jetstream://{}/{}?subject={}", self.addr, self.stream, self.subject)
            }
            Source::JetStream => format!("jetstream://{}/{}", self.addr, self.stream),
            Source::Redis => format!("redis://{}/{}", self.addr, self.stream),
        };
        Spec::parse(&url).expect("the demo's --source parses")
    }

    fn request_error(&self, what: impl std::fmt::Display) -> QueueError {
        QueueError::Request { source: self.source, what: what.to_string() }
    }

    /// Makes the stream (JetStream) or the stream key and its consumer group
    /// (Redis, from its first entry on), before the nodes and the backend
    /// start, so that nothing the backend publishes is missed.
    pub fn prepare(&self) -> Result<(), QueueError> {
        match self.source {
            Source::JetStream => {
                let (stream, subject) = (self.stream.clone(), self.subject.clone());
                js_block(self, move |js| async move {
                    // JetStream may come up a moment after the port answers.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let r = js
                            .get_or_create_stream(async_nats::jetstream::stream::Config {
                                name: stream.clone(),
                                subjects: vec![subject.clone()],
                                ..Default::default()
                            })
                            .await;
                        match r {
                            Ok(_) => return Ok(()),
                            Err(e) if Instant::now() > deadline => {
                                return Err(format!("cannot create the stream {stream}: {e}"))
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                })
            }
            Source::Redis => {
                let mut c = RedisConn::connect(&self.addr).map_err(|e| self.request_error(e))?;
                match c.call(&[
                    b"XGROUP",
                    b"CREATE",
                    self.stream.as_bytes(),
                    GROUP.as_bytes(),
                    b"0",
                    b"MKSTREAM",
                ]) {
                    Ok(Resp::Simple(s)) if s == "OK" => Ok(()),
                    Ok(Resp::Error(e)) if e.starts_with("BUSYGROUP") => Ok(()),
                    Ok(r) => Err(self.request_error(format!("XGROUP CREATE {}: {r:?}", self.stream))),
                    Err(e) => Err(self.request_error(e)),
                }
            }
        }
    }

    /// Waits up to `within` until `n` nodes are consuming (JetStream: pull
    /// requests waiting on the consumer; Redis: consumers in the group).
    /// False if they were not by then.
    pub fn wait_consumers(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        match self.source {
            Source::JetStream => {
                let stream = self.stream.clone();
                js_block(self, move |js| async move {
                    loop {
                        if let Ok(s) = js.get_stream(&stream).await {
                            if s.consumer_info(GROUP).await.is_ok_and(|i| i.num_waiting >= n) {
                                return Ok(true);
                            }
                        }
                        if Instant::now() > deadline {
                            return Ok(false);
                        }
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                })
                .unwrap_or(false)
            }
            Source::Redis => loop {
                if self.state().is_ok_and(|s| s.other as usize >= n) {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(25));
            },
        }
    }

    /// How the stream and its consumer stand.
    pub fn state(&self) -> Result<QueueState, QueueError> {
        match self.source {
            Source::JetStream => {
                let stream = self.stream.clone();
                js_block(self, move |js| async move {
                    let s = js.get_stream(&stream).await.map_err(|e| format!("stream {stream}: {e}"))?;
                    let stored =
                        s.get_info().await.map_err(|e| format!("stream {stream}: {e}"))?.state.messages;
                    let c = s.consumer_info(GROUP).await.map_err(|e| format!("consumer {GROUP}: {e}"))?;
                    Ok(QueueState {
                        stored,
                        undelivered: c.num_pending,
                        unacked: c.num_ack_pending as u64,
                        other: c.num_redelivered as u64,
                    })
                })
            }
            Source::Redis => {
                let mut c = RedisConn::connect(&self.addr).map_err(|e| self.request_error(e))?;
                let stored = match c.call(&[b"XLEN", self.stream.as_bytes()]) {
                    Ok(Resp::Int(n)) => n.max(0) as u64,
                    r => return Err(self.request_error(format!("XLEN {}: {r:?}", self.stream))),
                };
                let groups = match c.call(&[b"XINFO", b"GROUPS", self.stream.as_bytes()]) {
                    Ok(Resp::Array(Some(g))) => g,
                    r => return Err(self.request_error(format!("XINFO GROUPS {}: {r:?}", self.stream))),
                };
                let mut st = QueueState { stored, ..QueueState::default() };
                // XINFO GROUPS: per group, a flat list of field names and values.
                for g in groups {
                    let Resp::Array(Some(kv)) = g else { continue };
                    let field = |name: &str| {
                        kv.chunks(2)
                            .find(|p| matches!(&p[0], Resp::Bulk(Some(k)) if k == name.as_bytes()))
                            .and_then(|p| p.get(1))
                    };
                    if matches!(field("name"), Some(Resp::Bulk(Some(n))) if n == GROUP.as_bytes()) {
                        let num = |name: &str| field(name).map_or(0, Resp::as_u64);
                        st.other = num("consumers");
                        st.unacked = num("pending");
                        st.undelivered = num("lag");
                    }
                }
                Ok(st)
            }
        }
    }

    /// A server someone else runs: deletes this run's stream (and with it
    /// the consumer). A server started here goes with its data.
    pub fn remove_stream(&self) {
        if self.started_here() {
            return;
        }
        match self.source {
            Source::JetStream => {
                let stream = self.stream.clone();
                let _ = js_block(self, move |js| async move {
                    js.delete_stream(&stream).await.map(|_| ()).map_err(|e| e.to_string())
                });
            }
            Source::Redis => {
                if let Ok(mut c) = RedisConn::connect(&self.addr) {
                    let _ = c.call(&[b"DEL", self.stream.as_bytes()]);
                }
            }
        }
    }

    /// The backend's connection: publishes into the stream and counts in
    /// `published` what the queue has stored.
    pub fn backend(&self, published: Arc<AtomicU64>) -> Result<Box<dyn Backend>, QueueError> {
        match self.source {
            Source::JetStream => Ok(Box::new(JetStreamBackend::start(self, published)?)),
            Source::Redis => Ok(Box::new(RedisBackend::connect(self, published)?)),
        }
    }
}

/// Connects to the queue's NATS server on a current-thread runtime made for
/// the call, and runs `f` with its JetStream context.
fn js_block<T, F, Fut>(q: &Queue, f: F) -> Result<T, QueueError>
where
    F: FnOnce(async_nats::jetstream::Context) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let err = |what: String| QueueError::Request { source: Source::JetStream, what };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start a runtime: {e}")))?;
    let addr = q.addr.clone();
    rt.block_on(async move {
        let client = async_nats::ConnectOptions::new()
            .name("herald demo")
            .connection_timeout(Duration::from_secs(2))
            .connect(addr.as_str())
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        f(async_nats::jetstream::new(client)).await
    })
    .map_err(err)
}

/// Where the demo's backend sends its messages: the nodes' ingest ports, or
/// a queue ([`Queue::backend`]).
pub trait Backend: Send {
    /// Adds a message for `user` with conflation key `key` (empty: none) to
    /// the current tick's.
    fn push(&mut self, user: &[u8], key: &[u8], payload: &[u8]) -> io::Result<()>;
    /// Sends the current tick's messages.
    fn flush(&mut self) -> io::Result<()>;
    /// After the last tick: waits until everything sent is confirmed.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// One tick's messages for JetStream: (subject, key, payload).
type Tick = Vec<(String, Option<String>, Vec<u8>)>;

/// The backend publishing to JetStream: the demo's publisher thread hands
/// each tick's messages to a thread of its own running async-nats on a
/// current-thread runtime, which publishes them and awaits JetStream's
/// acknowledgements in order, counting each stored message.
pub struct JetStreamBackend {
    prefix: String,
    tick: Tick,
    tx: Option<tokio::sync::mpsc::Sender<Tick>>,
    thread: Option<std::thread::JoinHandle<Result<(), QueueError>>>,
}

impl JetStreamBackend {
    fn start(q: &Queue, published: Arc<AtomicU64>) -> Result<JetStreamBackend, QueueError> {
        let err = |what: String| QueueError::Request { source: Source::JetStream, what };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start a runtime: {e}")))?;
        // Ticks queued for the runtime thread, at most (then the publisher waits).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Tick>(1024);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let addr = q.addr.clone();
        let thread = std::thread::Builder::new()
            .name("herald-demo-jetstream".into())
            .spawn(move || {
                rt.block_on(async move {
                    let client = async_nats::ConnectOptions::new()
                        .name("herald demo backend")
                        .connection_timeout(Duration::from_secs(2))
                        .connect(addr.as_str())
                        .await
                        .map_err(|e| err(format!("cannot connect to {addr}: {e}")));
                    let client = match client {
                        Ok(c) => {
                            let _ = ready_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let js = async_nats::jetstream::new(client);
                    // Acknowledgements are awaited in publish order by a task
                    // of their own, so publishing never waits for one.
                    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel::<
                        async_nats::jetstream::context::PublishAckFuture,
                    >(16_384);
                    let acker = tokio::spawn(async move {
                        while let Some(f) = ack_rx.recv().await {
                            f.await.map_err(|e| format!("a publish was not acknowledged: {e}"))?;
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok::<(), String>(())
                    });
                    'ticks: while let Some(tick) = rx.recv().await {
                        for (subject, key, payload) in tick {
                            let sent = match key {
                                // The key travels as the header the node reads (protocol.md §12).
                                Some(k) => {
                                    let mut h = async_nats::HeaderMap::new();
                                    h.insert("Herald-Key", k.as_str());
                                    js.publish_with_headers(subject, h, payload.into()).await
                                }
                                None => js.publish(subject, payload.into()).await,
                            };
                            let f = sent.map_err(|e| err(format!("cannot publish: {e}")))?;
                            if ack_tx.send(f).await.is_err() {
                                break 'ticks;
                            }
                        }
                    }
                    drop(ack_tx);
                    match acker.await {
                        Ok(r) => r.map_err(err),
                        Err(e) => Err(err(format!("the acknowledgement task failed: {e}"))),
                    }
                })
            })
            .map_err(|e| err(format!("cannot start its thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(err("its thread ended".into())),
        }
        Ok(JetStreamBackend {
            prefix: q.subject.trim_end_matches('>').to_owned(),
            tick: Vec::new(),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn join(&mut self) -> io::Result<()> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(io::Error::from),
            Some(Err(_)) => Err(io::Error::other("the JetStream publisher panicked")),
            None => Ok(()),
        }
    }
}

impl Backend for JetStreamBackend {
    fn push(&mut self, user: &[u8], key: &[u8], payload: &[u8]) -> io::Result<()> {
        let user = String::from_utf8_lossy(user);
        let key = (!key.is_empty()).then(|| String::from_utf8_lossy(key).into_owned());
        self.tick.push((format!("{}{user}", self.prefix), key, payload.to_vec()));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.tick.is_empty() {
            return Ok(());
        }
        let tick = std::mem::take(&mut self.tick);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.blocking_send(tick).is_ok());
        if sent {
            return Ok(());
        }
        // The publishing thread ended: its error says why.
        self.join()?;
        Err(io::Error::other("the JetStream publisher stopped"))
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.join()
    }
}

impl Drop for JetStreamBackend {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// A RESP reply.
#[derive(Debug)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// An integer reply, or a bulk string holding one; else 0.
    fn as_u64(&self) -> u64 {
        match self {
            Resp::Int(n) => (*n).max(0) as u64,
            Resp::Bulk(Some(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
            _ => 0,
        }
    }
}

/// Appends a RESP command (an array of bulk strings) to `buf`.
fn resp_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

fn read_resp(r: &mut impl BufRead) -> io::Result<Resp> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("redis: {m}"));
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "redis closed the connection"));
    }
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(bad("a reply line without CRLF"));
    }
    let text = std::str::from_utf8(&line[1..line.len() - 2]).map_err(|_| bad("a reply line not UTF-8"))?;
    let num = || text.parse::<i64>().map_err(|_| bad("a length that is not a number"));
    Ok(match line[0] {
        b'+' => Resp::Simple(text.to_owned()),
        b'-' => Resp::Error(text.to_owned()),
        b':' => Resp::Int(num()?),
        b'$' => match usize::try_from(num()?) {
            Err(_) => Resp::Bulk(None),
            Ok(n) => {
                let mut v = vec![0; n + 2];
                r.read_exact(&mut v)?;
                v.truncate(n);
                Resp::Bulk(Some(v))
            }
        },
        b'*' => match usize::try_from(num()?) {
            Err(_) => Resp::Array(None),
            Ok(n) => Resp::Array(Some((0..n).map(|_| read_resp(r)).collect::<io::Result<_>>()?)),
        },
        _ => return Err(bad("an unknown reply type")),
    })
}

/// A blocking connection to Redis.
struct RedisConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl RedisConn {
    fn connect(addr: &str) -> io::Result<RedisConn> {
        let (w, _) = crate::dial::connect(addr, Instant::now() + Duration::from_secs(2))?;
        w.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(RedisConn { r: BufReader::new(w.try_clone()?), w })
    }

    fn call(&mut self, args: &[&[u8]]) -> io::Result<Resp> {
        let mut buf = Vec::new();
        resp_command(&mut buf, args);
        self.w.write_all(&buf)?;
        read_resp(&mut self.r)
    }
}

/// The backend publishing to Redis: each tick's `XADD KEY * user U [key K] data D`
/// commands go out in one write, and their replies (each entry's id) are
/// read before the next tick.
pub struct RedisBackend {
    conn: RedisConn,
    key: String,
    buf: Vec<u8>,
    pending: u64,
    published: Arc<AtomicU64>,
}

impl RedisBackend {
    fn connect(q: &Queue, published: Arc<AtomicU64>) -> Result<RedisBackend, QueueError> {
        let conn = RedisConn::connect(&q.addr).map_err(|e| QueueError::Request {
            source: Source::Redis,
            what: format!("cannot connect: {e}"),
        })?;
        Ok(RedisBackend {
            conn,
            key: q.stream.clone(),
            buf: Vec::with_capacity(64 * 1024),
            pending: 0,
            published,
        })
    }
}

impl Backend for RedisBackend {
    fn push(&mut self, user: &[u8], key: &[u8], payload: &[u8]) -> io::Result<()> {
        let stream = self.key.as_bytes();
        if key.is_empty() {
            resp_command(&mut self.buf, &[b"XADD", stream, b"*", b"user", user, b"data", payload]);
        } else {
            resp_command(
                &mut self.buf,
                &[b"XADD", stream, b"*", b"user", user, b"key", key, b"data", payload],
            );
        }
        self.pending += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        self.conn.w.write_all(&self.buf)?;
        self.buf.clear();
        for _ in 0..std::mem::take(&mut self.pending) {
            match read_resp(&mut self.conn.r)? {
                Resp::Bulk(Some(_)) => {
                    self.published.fetch_add(1, Ordering::Relaxed);
                }
                r => return Err(io::Error::other(format!("Redis: XADD {} answered {r:?}", self.key))),
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_commands_and_replies() {
        let mut b = Vec::new();
        resp_command(&mut b, &[b"XADD", b"herald", b"*", b"user", b"u1", b"data", b"\x00\r\n"]);
        assert_eq!(
            b,
            b"*7\r\n$4\r\nXADD\r\n$6\r\nherald\r\n$1\r\n*\r\n$4\r\nuser\r\n$2\r\nu1\r\n$4\r\ndata\r\n$3\r\n\x00\r\n\r\n"
        );
        let mut r: &[u8] =
            b"$15\r\n1700000000000-0\r\n-BUSYGROUP exists\r\n:7\r\n*2\r\n$4\r\nname\r\n$-1\r\n+OK\r\n";
        assert!(matches!(read_resp(&mut r).unwrap(), Resp::Bulk(Some(v)) if v == b"1700000000000-0"));
        assert!(matches!(read_resp(&mut r).unwrap(), Resp::Error(e) if e.starts_with("BUSYGROUP")));
        assert!(matches!(read_resp(&mut r).unwrap(), Resp::Int(7)));
        assert!(
            matches!(read_resp(&mut r).unwrap(), Resp::Array(Some(v)) if v.len() == 2 && matches!(v[1], Resp::Bulk(None)))
        );
        assert!(matches!(read_resp(&mut r).unwrap(), Resp::Simple(s) if s == "OK"));
        assert_eq!(read_resp(&mut r).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn node_sources_and_server_addresses() {
        let q = Queue {
            source: Source::JetStream,
            addr: "127.0.0.1:4222".into(),
            stream: "HERALD".into(),
            subject: "herald.user.>".into(),
            server: None,
        };
        assert_eq!(q.node_source().url, "jetstream://127.0.0.1:4222/HERALD");
        let q = Queue { stream: "HERALD_DEMO_AB".into(), subject: "herald.demo.ab.user.>".into(), ..q };
        let s = q.node_source();
        assert_eq!((s.stream.as_str(), s.subject_prefix()), ("HERALD_DEMO_AB", "herald.demo.ab.user."));
        let q = Queue { source: Source::Redis, stream: "herald".into(), subject: String::new(), ..q };
        assert_eq!(q.node_source().url, "redis://127.0.0.1:4222/herald");
        assert!(matches!(Queue::open(Source::Redis, Some("nowhere")), Err(QueueError::BadServer(_))));
        let e = QueueError::NotInstalled { source: Source::JetStream }.to_string();
        assert!(e.contains("apt-get install nats-server"), "{e}");
    }
}
