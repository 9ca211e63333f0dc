//! The node's configuration: every setting, with the defaults `herald
//! node` uses (the CLI takes its defaults from [`Config::default`]).

use std::net::SocketAddr;
use std::time::Duration;

/// Which of a node's ports speak TLS (protocol.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPorts {
    /// The client port.
    pub client: bool,
    /// The ingest port (publishers and mesh links).
    pub ingest: bool,
    /// The metrics port.
    pub metrics: bool,
    /// The HTTP publish API's port.
    pub http: bool,
}

impl Default for TlsPorts {
    /// The client port only.
    fn default() -> Self {
        TlsPorts { client: true, ingest: false, metrics: false, http: false }
    }
}

/// Most event loops a node runs.
pub const MAX_THREADS: usize = 64;

/// What to do with a client whose queue bound is hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Close it with SLOW_CONSUMER; its messages stay retained for resume.
    Disconnect,
    /// Keep it, drop the messages that do not fit; the client sees a seq gap.
    Drop,
    /// While its output is backed up, a later message with the same
    /// non-empty key replaces the earlier one still queued (protocol.md
    /// §5.7); close it as under `Disconnect` only if what is left does not
    /// fit. Version-1 sessions: as `Disconnect`.
    Conflate,
}

/// Node configuration. `Default` gives the CLI defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// Client endpoint.
    pub listen: SocketAddr,
    /// Publisher and mesh endpoint.
    pub ingest: SocketAddr,
    /// `/metrics` and `/healthz` endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// The HTTP publish API's endpoint (http-api.md), if any.
    pub http: Option<SocketAddr>,
    /// Queues to pull messages from (`--source`, protocol.md §11).
    pub sources: Vec<crate::source::Spec>,
    /// Durable mode: the replicated log (`--durable`, protocol.md §13).
    pub durable: Option<crate::durable::Spec>,
    /// Ids of queue messages appended here are remembered this long...
    pub dedup_window: Duration,
    /// ...and at most this many of them (about 26 bytes each).
    pub dedup_max: usize,
    /// Address clients are told to use (defaults to the bound client address).
    pub advertise: Option<String>,
    /// Maximum client sessions.
    pub capacity: usize,
    /// Client-token secret.
    pub client_secret: Vec<u8>,
    /// Publisher-credential secret.
    pub publisher_secret: Vec<u8>,
    /// Ping a client silent for this long; close it after 3×.
    pub heartbeat: Duration,
    /// A confirmed publish's forward waits this long for the peer's answer
    /// to a PING behind it; a link that leaves it unanswered is declared
    /// down (protocol.md §6.6).
    pub forward_timeout: Duration,
    /// A client must complete its HELLO within this.
    pub handshake_timeout: Duration,
    /// Per-client bound on pending output, bytes.
    pub queue_bytes: usize,
    /// The kernel send buffer of every client connection, bytes
    /// (`SO_SNDBUF`; Linux accounts twice this); 0: the kernel's default,
    /// autotuned up to 4 MiB per socket.
    pub client_sndbuf: usize,
    /// What to do when the bound is hit.
    pub slow_policy: SlowPolicy,
    /// Node-wide bound on client sessions' pending output, bytes (split
    /// evenly among the event loops); over it, the largest queues are cut
    /// as slow consumers.
    pub output_budget: usize,
    /// Established sessions one user may have on the node; a HELLO over it
    /// is refused with SESSION_LIMIT. 0: no cap.
    pub max_sessions_per_user: usize,
    /// How long a user without sessions keeps its stream for resume.
    pub grace: Duration,
    /// Retained messages per user.
    pub retain_count: usize,
    /// Retained bytes per user.
    pub retain_bytes: usize,
    /// Retained bytes in total (size it to DELIVER bytes per second × `grace`).
    pub retain_total: usize,
    /// Spread drain goodbyes over this window.
    pub drain_window: Duration,
    /// Log a summary line this often (zero: never).
    pub log_every: Duration,
    /// Decision servers (`host:port`; heartbeats go to the same port over
    /// UDP, or `host:tcp/udp` to name both). Empty: standalone.
    pub decision: Vec<String>,
    /// Cluster secret: signs heartbeats and authenticates mesh links.
    pub cluster_secret: Vec<u8>,
    /// Ingest address peers are told to use (default: the bound ingest address).
    pub advertise_ingest: Option<String>,
    /// How often to send heartbeats and poll the node list.
    pub heartbeat_interval: Duration,
    /// Stop reading publishers while a mesh link has this much pending output.
    pub peer_backlog: usize,
    /// Event loops (threads); users are split among them by hash.
    pub threads: usize,
    /// The node's TLS certificate and key (and, for mutual TLS, the CA
    /// client certificates must chain to); none: every port is plaintext.
    pub tls: Option<crate::tls::ServerFiles>,
    /// Which ports speak TLS when [`Config::tls`] is given.
    pub tls_ports: TlsPorts,
    /// The CA mesh peers' certificates must chain to (needed with TLS on
    /// the ingest port when the node is in a cluster).
    pub cluster_ca: Option<std::path::PathBuf>,
    /// Ask the decision servers for the node list (TCP) over TLS, trusting
    /// these CAs; none: plaintext. Heartbeats are UDP either way.
    pub decision_tls: Option<crate::tls::Trust>,
    /// Tests only: the loop with this id (1..N) panics when it is handed a
    /// client; 0 never.
    #[cfg(test)]
    pub(crate) fail_on_adopt: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "node-1".into(),
            listen: "0.0.0.0:7400".parse().expect("valid"),
            ingest: "127.0.0.1:7401".parse().expect("valid"),
            metrics: None,
            http: None,
            sources: Vec::new(),
            durable: None,
            dedup_window: Duration::from_secs(120),
            dedup_max: 1 << 20,
            advertise: None,
            capacity: default_capacity(),
            client_secret: Vec::new(),
            publisher_secret: Vec::new(),
            heartbeat: Duration::from_secs(10),
            forward_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            queue_bytes: 256 * 1024,
            client_sndbuf: 64 * 1024,
            slow_policy: SlowPolicy::Disconnect,
            output_budget: default_output_budget(),
            max_sessions_per_user: 8,
            grace: Duration::from_secs(30),
            retain_count: 1024,
            retain_bytes: 256 * 1024,
            retain_total: 128 << 20,
            drain_window: Duration::from_secs(10),
            log_every: Duration::from_secs(10),
            decision: Vec::new(),
            cluster_secret: Vec::new(),
            advertise_ingest: None,
            heartbeat_interval: Duration::from_secs(1),
            peer_backlog: 8 << 20,
            threads: 1,
            tls: None,
            tls_ports: TlsPorts::default(),
            cluster_ca: None,
            decision_tls: None,
            #[cfg(test)]
            fail_on_adopt: 0,
        }
    }
}

/// Capacity from the open-file limit: 95 % of it, keeping the rest for
/// listeners, publishers, peers and metrics.
pub fn default_capacity() -> usize {
    let n = crate::net::descriptor_limit().unwrap_or(1024);
    n.saturating_sub((n / 20).max(32)).max(1)
}

/// The output budget from the host's memory: 1/8 of `MemTotal` in
/// `/proc/meminfo`, and at least 64 MiB (also when it cannot be read).
pub fn default_output_budget() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| mem_total(&s)).unwrap_or(0);
    (total / 8).max(MIN_OUTPUT_BUDGET)
}

/// The smallest default output budget, bytes (64 MiB).
pub const MIN_OUTPUT_BUDGET: usize = 64 << 20;

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_budget_is_an_eighth_of_memory_and_at_least_64_mib() {
        assert_eq!(mem_total("MemTotal:       16384000 kB\nMemFree: 1 kB\n"), Some(16_384_000 * 1024));
        assert_eq!(mem_total("nothing here"), None);
        assert!(default_output_budget() >= MIN_OUTPUT_BUDGET);
    }
}
