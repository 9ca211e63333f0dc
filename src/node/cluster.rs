//! The node's cluster duties beside its event loop: the discovery thread
//! (the node list from the decision servers, every heartbeat interval), the
//! short-lived dial threads for mesh links (so a dead peer never blocks the
//! loop), and the signed UDP heartbeats (protocol.md §8).
//!
//! Helper threads talk to the loop only through a channel plus one wake
//! ([`Ctl`]); the heartbeater is called from the loop's timers with `now`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use mio::Waker;

use super::config::Config;
use crate::protocol;
use crate::protocol::frame::{self as f, Frame};

/// Messages from helper threads to the loop (each followed by one wake).
pub(crate) enum Ctl {
    /// The live node list from a decision server.
    Nodes(Vec<crate::decision::client::NodeInfo>),
    /// A dial to a peer finished.
    Dialed(String, io::Result<std::net::TcpStream>),
    /// A connector's batch (`--source`).
    Source(crate::source::Batch),
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// 16 bytes from the OS's CSPRNG (mesh challenges must be unpredictable).
pub(crate) fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into our buffer.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != 16 {
        // Fall back to time and address entropy; still unique per call.
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        n.copy_from_slice(&t.to_le_bytes());
    }
    n
}

/// Splits a `--decision` entry into its TCP and UDP addresses:
/// `host:port` (both) or `host:tcp/udp`.
pub fn decision_endpoints(s: &str) -> (String, String) {
    match s.rsplit_once(':') {
        Some((host, ports)) => match ports.split_once('/') {
            Some((t, u)) => (format!("{host}:{t}"), format!("{host}:{u}")),
            None => (s.to_owned(), s.to_owned()),
        },
        None => (s.to_owned(), s.to_owned()),
    }
}

/// Asks the decision servers for the node list every `interval` (over TLS
/// with `tls`, see `--decision-tls`) and hands it to the loop; exits when
/// the node stops. A failure is logged when it differs from the last one
/// (a decision server that is down is not logged every second).
pub(crate) fn spawn_discovery(
    servers: Vec<String>,
    interval: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    tx: Sender<Ctl>,
) {
    let tcp: Vec<String> = servers.iter().map(|s| decision_endpoints(s).0).collect();
    let dial = crate::decision::client::Dial::new(Duration::from_millis(500), tls);
    std::thread::spawn(move || {
        let mut last_error = String::new();
        while !stop.load(Ordering::SeqCst) {
            match crate::decision::client::nodes(&tcp, &dial) {
                Ok(list) => {
                    last_error.clear();
                    if tx.send(Ctl::Nodes(list)).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        log::warn!("herald node: no node list from the decision servers: {e}");
                        last_error = e;
                    }
                }
            }
            std::thread::sleep(interval);
        }
    });
}

/// Sends signed UDP heartbeats (protocol.md §8) to every decision server.
pub(crate) struct Heartbeater {
    sock: Option<std::net::UdpSocket>,
    targets: Vec<SocketAddr>,
    client_endpoint: String,
    ingest_endpoint: String,
    incarnation: u64,
    seq: u64,
    next: Option<Instant>,
    last: Option<(Instant, u64, u64, f64)>,
    buf: Vec<u8>,
}

impl Heartbeater {
    pub(crate) fn new(
        decision: &[String],
        client_endpoint: String,
        ingest_endpoint: String,
        incarnation: u64,
    ) -> Heartbeater {
        let targets: Vec<SocketAddr> = decision
            .iter()
            .filter_map(|d| std::net::ToSocketAddrs::to_socket_addrs(&decision_endpoints(d).1).ok()?.next())
            .collect();
        let sock = (!targets.is_empty())
            .then(|| {
                std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.set_nonblocking(true).map(|_| s)).ok()
            })
            .flatten();
        Heartbeater {
            sock,
            targets,
            client_endpoint,
            ingest_endpoint,
            incarnation,
            seq: 0,
            next: None,
            last: None,
            buf: Vec::with_capacity(512),
        }
    }

    /// Sends a heartbeat if one is due; `counts` gives (clients, messages
    /// in, messages out) and is only asked then.
    pub(crate) fn maybe_send(
        &mut self,
        now: Instant,
        cfg: &Config,
        counts: impl FnOnce() -> (u64, u64, u64),
        flags: u8,
    ) {
        let Some(sock) = self.sock.as_ref() else { return };
        if self.next.is_some_and(|t| now < t) {
            return;
        }
        let (clients, msgs_in, msgs_out) = counts();
        self.next = Some(now + cfg.heartbeat_interval);
        let cpu = process_cpu_seconds();
        let (in_rate, out_rate, permille) = match self.last {
            Some((t, i, o, c)) => {
                let dt = now.saturating_duration_since(t).as_secs_f64().max(0.001);
                (
                    (msgs_in.saturating_sub(i) as f64 / dt) as u32,
                    (msgs_out.saturating_sub(o) as f64 / dt) as u32,
                    ((cpu - c) / dt * 1000.0).clamp(0.0, 65535.0) as u16,
                )
            }
            None => (0, 0, 0),
        };
        self.last = Some((now, msgs_in, msgs_out, cpu));
        self.seq += 1;
        self.buf.clear();
        Frame::Heartbeat(f::Heartbeat {
            // The layout is the same in versions 1 and 2; version 1 is
            // taken by every decision server (protocol.md §1, *Versions*).
            version: protocol::MIN_VERSION,
            node_id: cfg.node_id.as_bytes(),
            incarnation: self.incarnation,
            seq: self.seq,
            sent_at_ms: unix_ms(),
            client_endpoint: self.client_endpoint.as_bytes(),
            ingest_endpoint: self.ingest_endpoint.as_bytes(),
            connections: clients as u32,
            capacity: cfg.capacity as u32,
            flags,
            msgs_in_per_s: in_rate,
            msgs_out_per_s: out_rate,
            cpu_permille: permille,
        })
        .encode_signed(&mut self.buf, &cfg.cluster_secret);
        for t in &self.targets {
            let _ = sock.send_to(&self.buf, t);
        }
    }
}

/// This process's user + system CPU time, seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Dials `peer` at `endpoint` on a thread of its own and reports the result
/// through `tx` plus one wake.
pub(crate) fn spawn_dial(peer: String, endpoint: String, tx: Sender<Ctl>, waker: Arc<Waker>) {
    std::thread::spawn(move || {
        let r = std::net::ToSocketAddrs::to_socket_addrs(&endpoint)
            .and_then(|mut a| a.next().ok_or_else(|| io::Error::other("no address")))
            .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)));
        let _ = tx.send(Ctl::Dialed(peer, r));
        let _ = waker.wake();
    });
}
