//! A real three-server NATS JetStream cluster on loopback for the durable
//! log's tests: the library's [`LogCluster`] (`herald demo --durable`'s
//! log: three `nats-server` processes, Debian's package, which `.ci/run`
//! installs), with the tests' habits on top: a cluster that cannot start
//! panics, a restart that fails panics, and without nats-server `start`
//! prints `SKIP:` and gives None.

#![allow(dead_code)]

use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use herald::demo::{LogCluster, LogClusterError};

/// A running three-server JetStream cluster (stopped on drop).
pub struct JsCluster(LogCluster);

impl Deref for JsCluster {
    type Target = LogCluster;
    fn deref(&self) -> &LogCluster {
        &self.0
    }
}

impl DerefMut for JsCluster {
    fn deref_mut(&mut self) -> &mut LogCluster {
        &mut self.0
    }
}

impl JsCluster {
    /// Starts three servers and waits until each answers and JetStream has
    /// a meta leader; None (reason printed) without nats-server.
    pub fn start(name: &str) -> Option<JsCluster> {
        match LogCluster::start(name) {
            Ok(c) => Some(JsCluster(c)),
            Err(LogClusterError::NotInstalled) => {
                let mut e = std::io::stderr();
                let _ = writeln!(
                    e,
                    "SKIP: nats-server is not installed (apt-get install -y nats-server; .ci/run does)"
                );
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The pid of server `i` (panics if it is down).
    pub fn pid(&self, i: usize) -> u32 {
        self.0.pid(i).expect("running")
    }

    /// Starts server `i` again (same ports, same data) and waits until it
    /// answers.
    pub fn restart(&mut self, i: usize) {
        if let Err(e) = self.0.restart(i) {
            panic!("restarting server {i}: {e}");
        }
    }

    /// Waits until some server names a leader of `stream`; its index.
    pub fn wait_stream_leader(&self, stream: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.stream_leader(stream) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader for stream {stream}; see {:?}", self.dir());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
