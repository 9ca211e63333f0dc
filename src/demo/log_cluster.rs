//! A local three-server NATS JetStream cluster on loopback: the replicated
//! log of `herald demo --durable` (protocol.md §13), and of the durable
//! tests (`tests/util/jscluster.rs` is a thin layer over it).
//!
//! [`LogCluster::start`] runs three `nats-server` processes (Debian's
//! package), each with its own config file, server name, client, route and
//! monitoring port (free loopback ports) and store directory, all in one
//! temporary directory; the servers are routed to each other as cluster
//! `herald`. It waits until every server answers INFO and JetStream has
//! elected its meta leader with all three servers in it. Each server runs in
//! a process group of its own, so a Ctrl-C in the terminal reaches only the
//! demo, which stops them by their pids when it drops the cluster (SIGTERM,
//! then SIGKILL after two seconds) and removes their data. A port taken in
//! between choosing it and the server binding it makes a server exit: the
//! cluster is then tried again on other ports (three times).
//!
//! For failure tests it also kills ([`LogCluster::kill`]: SIGKILL, as a
//! crash) and restarts ([`LogCluster::restart`]: same ports, same data)
//! single servers, and names a stream's leader ([`LogCluster::stream_leader`],
//! from the servers' `/jsz`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::queue::{find_bin, log_tail};

/// Servers in the cluster (JetStream's R=3 needs three).
pub const SERVERS: usize = 3;

/// The server's binary, and the Debian package that installs it.
const BIN: &str = "nats-server";

/// How long a server has to answer INFO after it was started.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long JetStream has to elect its meta leader.
const LEADER_WITHIN: Duration = Duration::from_secs(20);

/// Why the cluster could not be started.
#[derive(Debug)]
pub enum LogClusterError {
    /// `nats-server` is not installed (`apt-get install nats-server`).
    NotInstalled,
    /// A directory, a config file or a process could not be made.
    Start(io::Error),
    /// A server exited, did not answer, or JetStream never became ready.
    NotReady {
        /// What was waited for.
        what: String,
        /// The end of the server's log.
        log: String,
    },
}

impl std::fmt::Display for LogClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogClusterError::NotInstalled => write!(
                f,
                "{BIN} is not installed (Debian: apt-get install {BIN}): the durable log is three {BIN} processes, a JetStream cluster"
            ),
            LogClusterError::Start(e) => write!(f, "cannot start the {BIN} cluster: {e}"),
            LogClusterError::NotReady { what, log } => {
                write!(f, "{BIN} cluster: {what}")?;
                if !log.is_empty() {
                    write!(f, "; its log ends: {log}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for LogClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LogClusterError::Start(e) => Some(e),
            _ => None,
        }
    }
}

impl From<LogClusterError> for io::Error {
    fn from(e: LogClusterError) -> io::Error {
        io::Error::other(e)
    }
}

/// One server of the cluster.
struct Member {
    name: String,
    port: u16,
    http: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running three-server JetStream cluster on loopback; stopped, and its
/// data removed, on drop.
pub struct LogCluster {
    members: Vec<Member>,
    dir: PathBuf,
    bin: PathBuf,
    /// The address every server listens on.
    ip: String,
    /// A command the servers are started under (e.g. `ip netns exec NS`).
    wrap: Vec<String>,
}

/// A loopback port free just now.
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LogCluster {
    /// Starts the three servers (data under a temporary directory named
    /// after `tag`) and waits until JetStream is ready.
    pub fn start(tag: &str) -> Result<LogCluster, LogClusterError> {
        LogCluster::start_at(tag, "127.0.0.1", &[])
    }

    /// [`LogCluster::start`] with the servers listening on `ip` and started
    /// under the command `wrap` (which must exec them, keeping the pid):
    /// e.g. a host's address in a network namespace and `ip netns exec NS`,
    /// for partition tests. Ports are chosen free on this host's loopback.
    pub fn start_at(tag: &str, ip: &str, wrap: &[&str]) -> Result<LogCluster, LogClusterError> {
        let bin = find_bin(BIN).ok_or(LogClusterError::NotInstalled)?;
        let mut last = None;
        for attempt in 0..3 {
            let dir = std::env::temp_dir().join(format!(
                "herald-log-{tag}-{}-{:x}-{attempt}",
                std::process::id(),
                crate::swarm::mono_ns()
            ));
            let wrap = wrap.iter().map(|w| w.to_string()).collect();
            let mut c = LogCluster::configure(bin.clone(), dir, ip.to_owned(), wrap)?;
            match c.start_all() {
                Ok(()) => return Ok(c),
                Err(e) => {
                    // A server that exited may have lost a port race: others.
                    let exited = c
                        .members
                        .iter_mut()
                        .any(|m| m.child.as_mut().is_some_and(|ch| !matches!(ch.try_wait(), Ok(None))));
                    last = Some(e);
                    if !exited {
                        break;
                    }
                }
            }
        }
        Err(last.expect("tried"))
    }

    /// Writes the config files (fresh ports) in `dir`.
    fn configure(
        bin: PathBuf,
        dir: PathBuf,
        ip: String,
        wrap: Vec<String>,
    ) -> Result<LogCluster, LogClusterError> {
        let routes: Vec<u16> =
            (0..SERVERS).map(|_| free_port()).collect::<io::Result<_>>().map_err(LogClusterError::Start)?;
        let route_list = routes.iter().map(|p| format!("nats://{ip}:{p}")).collect::<Vec<_>>().join(", ");
        // From here on, a failure removes what was made (on drop).
        let mut c = LogCluster { members: Vec::new(), dir, bin, ip, wrap };
        for (i, route) in routes.iter().enumerate() {
            let mdir = c.dir.join(format!("s{i}"));
            std::fs::create_dir_all(&mdir).map_err(LogClusterError::Start)?;
            let (port, http) =
                (free_port().map_err(LogClusterError::Start)?, free_port().map_err(LogClusterError::Start)?);
            let name = format!("h{i}");
            let conf = format!(
                "server_name: {name}\nlisten: {ip}:{port}\nhttp: {ip}:{http}\n\
                 jetstream {{ store_dir: {:?} }}\n\
                 cluster {{\n  name: herald\n  listen: {ip}:{route}\n  routes: [{route_list}]\n}}\n",
                mdir.join("js"),
                ip = c.ip
            );
            std::fs::write(mdir.join("nats.conf"), conf).map_err(LogClusterError::Start)?;
            c.members.push(Member { name, port, http, dir: mdir, child: None });
        }
        Ok(c)
    }

    fn start_all(&mut self) -> Result<(), LogClusterError> {
        for i in 0..SERVERS {
            self.launch(i)?;
        }
        for i in 0..SERVERS {
            self.wait_answers(i)?;
        }
        self.wait_meta_leader(LEADER_WITHIN)
    }

    /// The directory holding the servers' config files, logs and data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `host:port,host:port,host:port`: the `--durable` URL's servers.
    pub fn addrs(&self) -> String {
        (0..self.members.len()).map(|i| self.addr(i)).collect::<Vec<_>>().join(",")
    }

    /// `host:port` of server `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("{}:{}", self.ip, self.members[i].port)
    }

    /// The pid of server `i`, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// SIGKILLs server `i` (a crash) by its pid and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Starts server `i` again (same ports, same data) and waits until it
    /// answers.
    pub fn restart(&mut self, i: usize) -> Result<(), LogClusterError> {
        self.kill(i);
        self.launch(i)?;
        self.wait_answers(i)
    }

    /// Stops every server: SIGTERM by pid, SIGKILL after two seconds.
    pub fn stop(&mut self) {
        for m in &self.members {
            if let Some(c) = &m.child {
                // SAFETY: kill(2) on our own child's pid, not yet reaped.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// The index of the server leading `stream` (asked of every live
    /// server's monitoring port), if one is known.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Some(v) = jsz(&self.ip, m.http, "/jsz?accounts=true&streams=true") else { continue };
            let accounts = v["account_details"].as_array().cloned().unwrap_or_default();
            for a in accounts {
                for s in a["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if s["name"] == stream {
                        if let Some(l) = s["cluster"]["leader"].as_str() {
                            if let Some(i) = self.members.iter().position(|m| m.name == l) {
                                return Some(i);
                            }
                        }
                    }
                }
            }
        }
        None
    }

    /// Waits until every live server knows the meta leader and sees a
    /// cluster of three.
    pub fn wait_meta_leader(&self, within: Duration) -> Result<(), LogClusterError> {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                jsz(&self.ip, m.http, "/jsz").is_some_and(|v| {
                    v["meta_cluster"]["leader"].as_str().is_some_and(|l| !l.is_empty())
                        && v["meta_cluster"]["cluster_size"] == SERVERS
                })
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LogClusterError::NotReady {
                    what: format!(
                        "JetStream elected no meta leader within {within:?} (see {})",
                        self.dir.display()
                    ),
                    log: log_tail(&self.members[0].dir.join("server.log")),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn launch(&mut self, i: usize) -> Result<(), LogClusterError> {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.join("server.log"))
            .map_err(LogClusterError::Start)?;
        let mut cmd = match self.wrap.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .arg("-c")
            .arg(m.dir.join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: the terminal's Ctrl-C goes to the
            // demo, which stops the server when it is done with it.
            .process_group(0)
            .spawn()
            .map_err(LogClusterError::Start)?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until server `i` greets with INFO.
    fn wait_answers(&mut self, i: usize) -> Result<(), LogClusterError> {
        let deadline = Instant::now() + ANSWER_WITHIN;
        let addr = self.addr(i);
        let m = &mut self.members[i];
        loop {
            if let Ok(s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return Ok(());
                }
            }
            let exited = m.child.as_mut().is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited || Instant::now() >= deadline {
                let what = if exited { "exited" } else { "does not answer" };
                return Err(LogClusterError::NotReady {
                    what: format!("server {} at {addr} {what}", m.name),
                    log: log_tail(&m.dir.join("server.log")),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// GET `path` on the monitoring port `port`, parsed as JSON.
fn jsz(ip: &str, port: u16, path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect((ip, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: herald\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

impl Drop for LogCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_names_its_package() {
        let e = LogClusterError::NotInstalled.to_string();
        assert!(e.contains("nats-server is not installed"), "{e}");
        assert!(e.contains("apt-get install nats-server"), "{e}");
        let e = LogClusterError::NotReady {
            what: "server h1 at 127.0.0.1:1 exited".into(),
            log: "bind: in use".into(),
        };
        assert_eq!(
            e.to_string(),
            "nats-server cluster: server h1 at 127.0.0.1:1 exited; its log ends: bind: in use"
        );
    }
}
