//! A real three-server NATS JetStream cluster on loopback for the durable
//! log's tests: three `nats-server` processes (Debian's package; `.ci/run`
//! installs it), each with its own config file, server name, client,
//! cluster and monitoring ports and store directory, routed to each other.
//! Started and waited for (every server answers INFO and knows the
//! JetStream meta leader), killed and restarted one by one by pid, stopped
//! on drop. Without nats-server, `start` prints `SKIP:` and gives None.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::queues::free_port;

/// One server of the cluster.
struct Member {
    name: String,
    port: u16,
    http: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running three-server JetStream cluster.
pub struct JsCluster {
    members: Vec<Member>,
    dir: PathBuf,
}

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl JsCluster {
    /// Starts three servers and waits (up to 20 s) until each answers and
    /// JetStream has a meta leader; None (reason printed) without nats-server.
    pub fn start(name: &str) -> Option<JsCluster> {
        if !installed("nats-server") {
            let mut e = std::io::stderr();
            let _ = writeln!(
                e,
                "SKIP: nats-server is not installed (apt-get install -y nats-server; .ci/run does)"
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!("herald-jsc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list =
            routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
        let mut members = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let mdir = dir.join(format!("s{i}"));
            std::fs::create_dir_all(&mdir).unwrap();
            let (port, http) = (free_port(), free_port());
            let name = format!("h{i}");
            let conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{ store_dir: {:?} }}\n\
                 cluster {{\n  name: herald\n  listen: 127.0.0.1:{route}\n  routes: [{route_list}]\n}}\n",
                mdir.join("js")
            );
            std::fs::write(mdir.join("nats.conf"), conf).unwrap();
            members.push(Member { name, port, http, dir: mdir, child: None });
        }
        let mut c = JsCluster { members, dir };
        for i in 0..3 {
            c.launch(i);
        }
        for i in 0..3 {
            c.wait_answers(i);
        }
        c.wait_meta_leader(Duration::from_secs(20));
        Some(c)
    }

    /// `host:port,host:port,host:port` (the `--durable` URL's hosts).
    pub fn addrs(&self) -> String {
        (0..3).map(|i| self.addr(i)).collect::<Vec<_>>().join(",")
    }

    /// `host:port` of server `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].port)
    }

    /// The pid of server `i` (panics if it is down).
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].child.as_ref().expect("running").id()
    }

    /// SIGKILLs server `i` by its pid and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Starts server `i` again (same ports, same data) and waits until it
    /// answers.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
        self.wait_answers(i);
    }

    /// The index of the server leading `stream` (asked of every live
    /// server's monitoring port), if one is known.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Some(v) = self.jsz(m.http, "/jsz?accounts=true&streams=true") else { continue };
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

    /// Waits until some server names a leader of `stream`; its index.
    pub fn wait_stream_leader(&self, stream: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.stream_leader(stream) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader for stream {stream}; see {:?}", self.dir);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn launch(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(m.dir.join("server.log")).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(m.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        m.child = Some(child);
    }

    fn wait_answers(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = self.addr(i);
        loop {
            if let Ok(s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "nats-server {addr} never answered; see {:?}", self.dir);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every live server knows the meta leader and sees a
    /// cluster of three.
    pub fn wait_meta_leader(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                self.jsz(m.http, "/jsz").is_some_and(|v| {
                    v["meta_cluster"]["leader"].as_str().is_some_and(|l| !l.is_empty())
                        && v["meta_cluster"]["cluster_size"] == 3
                })
            });
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "JetStream never elected a meta leader; see {:?}", self.dir);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `path` on a monitoring port, parsed as JSON.
    fn jsz(&self, port: u16, path: &str) -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let body = out.split_once("\r\n\r\n")?.1;
        serde_json::from_str(body).ok()
    }
}

impl Drop for JsCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
