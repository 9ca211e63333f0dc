//! Real queue servers for the connector tests: `nats-server -js` and
//! `redis-server`, from Debian's packages (`.ci/run` installs them), each
//! started on a free loopback port with its data in a directory of its own,
//! waited for until it answers, and stopped by its pid (on drop too). A
//! test whose server is not installed prints why and is skipped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Nats,
    Redis,
}

/// A running queue server.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Server {
    /// Starts `kind` on a free port, or None (with the reason printed) if
    /// its binary is not installed.
    pub fn start(kind: Kind, name: &str) -> Option<Server> {
        let bin = match kind {
            Kind::Nats => "nats-server",
            Kind::Redis => "redis-server",
        };
        if !installed(bin) {
            let mut e = std::io::stderr();
            let _ = writeln!(e, "SKIP: {bin} is not installed (apt-get install -y {bin}; .ci/run does)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("herald-q-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server { kind, port: free_port(), dir, child: None };
        s.launch();
        Some(s)
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Nats => {
                let mut c = Command::new("nats-server");
                c.args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"]).arg(&self.dir);
                c
            }
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                c.args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                ])
                .arg(&self.dir);
                c
            }
        };
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start the queue server");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits (up to 10 s) until the server answers on its port.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.answers() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} on {} never answered; see {:?}",
                self.kind,
                self.port,
                self.dir
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr()) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        match self.kind {
            Kind::Nats => {
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO")
            }
            Kind::Redis => {
                if s.write_all(b"PING\r\n").is_err() {
                    return false;
                }
                let mut b = [0u8; 7];
                s.read_exact(&mut b).is_ok() && &b == b"+PONG\r\n"
            }
        }
    }

    /// The pid of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Stops it by its pid with `signal` and reaps it.
    pub fn stop(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }

    /// Stops it (SIGTERM: the server syncs its store) and starts it again on
    /// the same port with the same data.
    pub fn restart(&mut self, down: Duration) {
        self.stop(libc::SIGTERM);
        std::thread::sleep(down);
        self.launch();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
