//! `herald node`: the argument struct and the entry point the binary calls.
//! Kept in the library, as `herald decision`'s is, so that the binary stays
//! a thin dispatcher and the defaults are tested.
//!
//! Every default is taken from [`Config::default()`], so the flags and the
//! library cannot disagree; the test below checks that arguments with only
//! the required flags give exactly `Config::default()`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use log::{error, info, LevelFilter};

use crate::cli::{read_secret, CliDuration};
use crate::logging;

use super::{Config, Node, SlowPolicy, MAX_THREADS};

/// `herald node`: run a node.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// This node's id, unique in the cluster.
    #[arg(long, default_value_t = Config::default().node_id)]
    pub id: String,
    /// Client endpoint.
    #[arg(long, default_value_t = Config::default().listen)]
    pub listen: SocketAddr,
    /// Publisher and mesh endpoint.
    #[arg(long, default_value_t = Config::default().ingest)]
    pub ingest: SocketAddr,
    /// Address clients are told to use (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Maximum client sessions (default: 95% of the open-file limit).
    #[arg(long)]
    pub capacity: Option<usize>,
    /// File holding the client-token secret.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// File holding the publisher secret.
    #[arg(long)]
    pub publisher_secret_file: PathBuf,
    /// Serve GET /metrics (Prometheus) and /healthz here.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Serve the HTTP publish API here (http-api.md): POST /v1/publish,
    /// /v1/publish/batch, /v1/publish/{user}, GET /v1/users/{id}, with the
    /// publisher credential as a bearer token. Plaintext (with a warning)
    /// unless `http` is in --tls-ports.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Pull messages from a queue engine and route each like a confirmed
    /// publish (protocol.md §12); repeatable. `jetstream://HOST:PORT/STREAM`
    /// (a durable pull consumer shared by every node with this source) with
    /// `?consumer=herald&subject=herald.user.>&batch=256&in_flight=4096&
    /// ack_wait=10s&max_deliver=5&dead_letter=SUBJECT&no_route=drop|retry`;
    /// `redis://HOST:PORT/KEY` (a consumer group on the stream KEY, this
    /// node one consumer in it; entry fields user, key, data) with
    /// `?group=herald&name=NODE-ID&batch=256&in_flight=4096&ack_wait=10s&
    /// dead_letter=STREAM&no_route=drop|retry`.
    #[arg(long = "source", value_name = "URL", value_parser = crate::source::Spec::parse)]
    pub sources: Vec<crate::source::Spec>,
    /// Durable mode (protocol.md §13): keep every user's stream in a
    /// replicated NATS JetStream log, and confirm a publish only once the
    /// log has it. `jetstream://HOST:PORT[,HOST:PORT…]/STREAM` with
    /// `?replicas=3&max_age=24h&per_user=1024&timeout=2s`. Every node of the
    /// cluster must give the same one. Needs --threads 1.
    #[arg(long, value_name = "URL", value_parser = crate::durable::Spec::parse)]
    pub durable: Option<crate::durable::Spec>,
    /// Queue-message ids appended here are remembered this long, so a
    /// connector's redelivery is not delivered twice (protocol.md §12).
    #[arg(long, default_value_t = CliDuration(Config::default().dedup_window))]
    pub dedup_window: CliDuration,
    /// At most this many such ids are remembered (about 26 bytes each; the oldest
    /// are forgotten first).
    #[arg(long, default_value_t = Config::default().dedup_max)]
    pub dedup_max: usize,
    /// Keepalive interval: ping a silent client after this, close it after 3x.
    #[arg(long, default_value_t = CliDuration(Config::default().heartbeat))]
    pub heartbeat: CliDuration,
    /// A publish with WANT_RESULT forwarded to a peer counts as forwarded
    /// once the peer answers a PING sent behind it; a mesh link that leaves
    /// it unanswered this long is declared down (protocol.md §6.6).
    #[arg(long, default_value_t = CliDuration(Config::default().forward_timeout))]
    pub forward_timeout: CliDuration,
    /// Per-client bound on pending output, bytes.
    #[arg(long, default_value_t = Config::default().queue_bytes)]
    pub queue_bytes: usize,
    /// Kernel send buffer of each client connection, bytes (SO_SNDBUF;
    /// Linux accounts twice this). With --queue-bytes it bounds what one
    /// session can hold: the queue plus about twice this in the kernel.
    /// 0: the kernel's default, autotuned up to 4 MiB per socket.
    #[arg(long, default_value_t = Config::default().client_sndbuf)]
    pub client_sndbuf: usize,
    /// What to do with a client whose queue is full: disconnect, drop, or
    /// conflate (a backed-up session keeps only the latest message of each
    /// non-empty key, protocol.md §5.7; cut off only if the rest is over).
    #[arg(long, default_value = policy_name(Config::default().slow_policy), value_parser = parse_policy)]
    pub slow_policy: SlowPolicy,
    /// Node-wide bound on client sessions' pending output (queued, not yet
    /// written to their sockets), bytes, split evenly among the event loops
    /// (default: 1/8 of MemTotal, at least 64 MiB). When a DELIVER would
    /// go over it, the sessions with the largest queues are cut as slow
    /// consumers until the rest is under 90 % of it.
    #[arg(long)]
    pub output_budget: Option<usize>,
    /// Established sessions one user may have on this node; a HELLO over
    /// it is refused with ERROR SESSION_LIMIT (the new session, never an
    /// old one). 0: no cap.
    #[arg(long, default_value_t = Config::default().max_sessions_per_user)]
    pub max_sessions_per_user: usize,
    /// How long a disconnected user's stream is kept for resume.
    #[arg(long, default_value_t = CliDuration(Config::default().grace))]
    pub grace: CliDuration,
    /// Retained messages per user.
    #[arg(long, default_value_t = Config::default().retain_count)]
    pub retain_count: usize,
    /// Retained bytes per user.
    #[arg(long, default_value_t = Config::default().retain_bytes)]
    pub retain_bytes: usize,
    /// Retained bytes in total. Size it to the node's DELIVER bytes per
    /// second times --grace, or resumes within the grace find messages gone
    /// (counted as herald_welcomes_total{resume="gap"}): 128 MiB holds about
    /// 8 s of 20,000 users at 4 messages a second of ~200 bytes.
    #[arg(long, default_value_t = Config::default().retain_total)]
    pub retain_total: usize,
    /// Spread drain goodbyes over this window.
    #[arg(long, default_value_t = CliDuration(Config::default().drain_window))]
    pub drain_window: CliDuration,
    /// Log a one-line summary this often (0 disables).
    #[arg(long, default_value_t = CliDuration(Config::default().log_every))]
    pub log_every: CliDuration,
    /// Decision servers, host:port (heartbeats go to the same port over UDP;
    /// host:tcp/udp names both). Without it the node runs standalone.
    #[arg(long, value_delimiter = ',')]
    pub decision: Vec<String>,
    /// File holding the cluster secret (heartbeats and mesh links).
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
    /// Ingest address other nodes are told to use (default: the --ingest address).
    #[arg(long)]
    pub advertise_ingest: Option<String>,
    /// How often to heartbeat and refresh the node list.
    #[arg(long, default_value_t = CliDuration(Config::default().heartbeat_interval))]
    pub heartbeat_interval: CliDuration,
    /// Event loops (threads). Users are split among them by hash; loop 0
    /// also serves publishers, mesh links and metrics.
    #[arg(long, default_value_t = Config::default().threads)]
    pub threads: usize,
    /// The node's TLS certificate chain (PEM, leaf first). With --tls-key,
    /// the client port speaks TLS 1.3 (protocol.md §11); without, every
    /// port is plaintext and the node warns so. SIGHUP reloads both files.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate that chains to this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Which ports speak TLS with --tls-cert: any of `client`, `ingest`,
    /// `metrics` and `http` (comma-separated). A TLS ingest port takes
    /// publishers with or without a certificate and requires --cluster-ca
    /// for mesh peers; every node of a cluster must agree. A TLS metrics or
    /// http port is HTTPS (ALPN http/1.1, no client certificate).
    #[arg(long, value_delimiter = ',', default_value = "client", requires = "tls_cert")]
    pub tls_ports: Vec<String>,
    /// The CA every mesh peer's certificate must chain to; a peer's node id
    /// must be a DNS name of its certificate (both ways), on top of the
    /// cluster secret's HMAC challenge.
    #[arg(long, requires = "tls_cert")]
    pub cluster_ca: Option<PathBuf>,
    /// Ask the decision servers for the node list over TLS (their TCP port
    /// runs `herald decision --tls-cert`), trusting the system's CA
    /// certificates. Heartbeats stay UDP (HMAC-signed).
    #[arg(long)]
    pub decision_tls: bool,
    /// As --decision-tls, trusting only the CA certificates in this PEM file.
    #[arg(long)]
    pub decision_tls_ca: Option<PathBuf>,
    /// Least severe messages logged: error, warn, info, debug or trace. At
    /// info the first line names the bound addresses (tools read it); warn
    /// and error leave it out, trace puts mio's lines before it.
    #[arg(long, default_value = "info", value_parser = logging::parse_level)]
    pub log_level: LevelFilter,
}

/// The `--slow-policy` word for a policy.
fn policy_name(p: SlowPolicy) -> &'static str {
    match p {
        SlowPolicy::Disconnect => "disconnect",
        SlowPolicy::Drop => "drop",
        SlowPolicy::Conflate => "conflate",
    }
}

fn parse_policy(s: &str) -> Result<SlowPolicy, String> {
    match s {
        "disconnect" => Ok(SlowPolicy::Disconnect),
        "drop" => Ok(SlowPolicy::Drop),
        "conflate" => Ok(SlowPolicy::Conflate),
        _ => Err("must be disconnect, drop or conflate".to_owned()),
    }
}

impl NodeArgs {
    /// The node's configuration: the secrets read from their files, the
    /// flags given, and [`Config::default()`] for everything else. The
    /// error is the message to print.
    pub fn config(&self) -> Result<Config, String> {
        let client_secret = read_secret(&self.secret_file).map_err(|e| e.to_string())?;
        let publisher_secret = read_secret(&self.publisher_secret_file).map_err(|e| e.to_string())?;
        let cluster_secret = match &self.cluster_secret_file {
            Some(f) => read_secret(f).map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        self.config_with(client_secret, publisher_secret, cluster_secret)
    }

    /// [`NodeArgs::config`] with the secrets already read.
    fn config_with(
        &self,
        client_secret: Vec<u8>,
        publisher_secret: Vec<u8>,
        cluster_secret: Vec<u8>,
    ) -> Result<Config, String> {
        if !self.decision.is_empty() && cluster_secret.is_empty() {
            return Err("--decision needs --cluster-secret-file".to_owned());
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(format!("--threads must be 1..={MAX_THREADS}, not {}", self.threads));
        }
        if self.durable.is_some() && self.threads != 1 {
            return Err("--durable runs one event loop per node for now: leave out --threads".to_owned());
        }
        if self.output_budget == Some(0) {
            return Err("--output-budget must be more than 0".to_owned());
        }
        let defaults = Config::default();
        Ok(Config {
            node_id: self.id.clone(),
            listen: self.listen,
            ingest: self.ingest,
            metrics: self.metrics,
            http: self.http,
            sources: self.sources.clone(),
            durable: self.durable.clone(),
            dedup_window: self.dedup_window.0,
            dedup_max: self.dedup_max,
            advertise: self.advertise.clone(),
            capacity: self.capacity.unwrap_or(defaults.capacity),
            client_secret,
            publisher_secret,
            heartbeat: self.heartbeat.0,
            forward_timeout: self.forward_timeout.0,
            queue_bytes: self.queue_bytes,
            client_sndbuf: self.client_sndbuf,
            slow_policy: self.slow_policy,
            max_sessions_per_user: self.max_sessions_per_user,
            output_budget: self.output_budget.unwrap_or(defaults.output_budget),
            grace: self.grace.0,
            retain_count: self.retain_count,
            retain_bytes: self.retain_bytes,
            retain_total: self.retain_total,
            drain_window: self.drain_window.0,
            log_every: self.log_every.0,
            decision: self.decision.clone(),
            cluster_secret,
            advertise_ingest: self.advertise_ingest.clone(),
            heartbeat_interval: self.heartbeat_interval.0,
            threads: self.threads,
            tls_ports: {
                let mut p = super::TlsPorts { client: false, ingest: false, metrics: false, http: false };
                for port in &self.tls_ports {
                    match port.as_str() {
                        "client" => p.client = true,
                        "ingest" => p.ingest = true,
                        "metrics" => p.metrics = true,
                        "http" => p.http = true,
                        other => {
                            return Err(format!(
                                "--tls-ports: {other}: must be client, ingest, metrics or http"
                            ))
                        }
                    }
                }
                p
            },
            cluster_ca: self.cluster_ca.clone(),
            decision_tls: crate::tls::Trust::from_flags(self.decision_tls, self.decision_tls_ca.clone()),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::ServerFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.client_ca.clone(),
                    client_cert_optional: false,
                }),
                _ => None,
            },
            ..defaults
        })
    }
}

/// Runs a node until SIGINT/SIGTERM (then drains it); exit 0 on a clean
/// stop, 2 on bad arguments or secrets, 1 on a bind or runtime failure.
/// Logs through [`logging`] at `--log-level`; every line is written on
/// return.
pub fn run_node(a: NodeArgs) -> ExitCode {
    logging::init(a.log_level);
    let code = node_main(&a);
    logging::flush();
    code
}

fn node_main(a: &NodeArgs) -> ExitCode {
    let cfg = match a.config() {
        Ok(c) => c,
        Err(e) => {
            error!("herald node: {e}");
            return ExitCode::from(2);
        }
    };
    let node = match Node::bind(cfg.clone()) {
        Ok(n) => n,
        Err(e) => {
            error!("herald node: cannot bind: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = node.shutdown_handle();
    let who = format!("herald node {}", cfg.node_id);
    if let Err(e) = crate::cli::handle_signals(who, node.tls(), move || stop.trigger()) {
        error!("herald node: cannot install signal handler: {e}");
        return ExitCode::from(1);
    }
    let sndbuf = match cfg.client_sndbuf {
        0 => ", client send buffers autotuned by the kernel".to_owned(),
        _ => format!(", client send buffer {} B in the kernel", node.client_sndbuf()),
    };
    info!(
        "herald node {}: clients on {}, ingest on {}, capacity {}{sndbuf}{}{}",
        cfg.node_id,
        node.client_addr(),
        node.ingest_addr(),
        cfg.capacity,
        node.metrics_addr()
            .map(|a| {
                let scheme = if cfg.tls.is_some() && cfg.tls_ports.metrics { "https" } else { "http" };
                format!(", metrics on {scheme}://{a}/metrics")
            })
            .unwrap_or_default(),
        node.http_addr()
            .map(|a| {
                let scheme = if cfg.tls.is_some() && cfg.tls_ports.http { "https" } else { "http" };
                format!(", publish API on {scheme}://{a}/v1")
            })
            .unwrap_or_default()
    );
    // The first line names the bound addresses (tests and tools parse it):
    // have it out before the node starts writing its own.
    logging::flush();
    match node.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("herald node: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args as _, FromArgMatches as _};

    fn parse(args: &[&str]) -> Result<NodeArgs, clap::Error> {
        let cmd = NodeArgs::augment_args(clap::Command::new("node"));
        let m = cmd.try_get_matches_from(std::iter::once("node").chain(args.iter().copied()))?;
        NodeArgs::from_arg_matches(&m)
    }

    const REQUIRED: [&str; 4] = ["--secret-file", "c", "--publisher-secret-file", "p"];

    #[test]
    fn only_required_flags_give_config_default() {
        let cfg = parse(&REQUIRED).unwrap().config_with(Vec::new(), Vec::new(), Vec::new()).unwrap();
        let d = Config::default();
        // Field by field, for a readable failure...
        assert_eq!(cfg.node_id, d.node_id);
        assert_eq!(cfg.listen, d.listen);
        assert_eq!(cfg.ingest, d.ingest);
        assert_eq!(cfg.metrics, d.metrics);
        assert_eq!(cfg.advertise, d.advertise);
        assert_eq!(cfg.capacity, d.capacity);
        assert_eq!(cfg.heartbeat, d.heartbeat);
        assert_eq!(cfg.queue_bytes, d.queue_bytes);
        assert_eq!(cfg.client_sndbuf, d.client_sndbuf);
        assert_eq!(cfg.slow_policy, d.slow_policy);
        assert_eq!(cfg.max_sessions_per_user, d.max_sessions_per_user);
        assert_eq!(cfg.output_budget, d.output_budget);
        assert_eq!(cfg.grace, d.grace);
        assert_eq!(cfg.retain_count, d.retain_count);
        assert_eq!(cfg.retain_bytes, d.retain_bytes);
        assert_eq!(cfg.retain_total, d.retain_total);
        assert_eq!(cfg.drain_window, d.drain_window);
        assert_eq!(cfg.log_every, d.log_every);
        assert_eq!(cfg.decision, d.decision);
        assert_eq!(cfg.advertise_ingest, d.advertise_ingest);
        assert_eq!(cfg.heartbeat_interval, d.heartbeat_interval);
        assert_eq!(cfg.threads, d.threads);
        // ...and whole, so a field added later is covered too (the secrets
        // are empty in both: Config::default() has none, none were read).
        assert_eq!(format!("{cfg:?}"), format!("{d:?}"));
    }

    #[test]
    fn decision_tls_flags_choose_the_trust() {
        use crate::tls::Trust;
        let cfg = |extra: &[&str]| {
            let mut args = REQUIRED.to_vec();
            args.extend(extra);
            parse(&args).unwrap().config_with(Vec::new(), Vec::new(), Vec::new()).unwrap().decision_tls
        };
        assert_eq!(cfg(&[]), None);
        assert_eq!(cfg(&["--decision-tls"]), Some(Trust::System));
        assert_eq!(cfg(&["--decision-tls-ca", "ca.pem"]), Some(Trust::Ca("ca.pem".into())));
        assert_eq!(cfg(&["--decision-tls", "--decision-tls-ca", "ca.pem"]), Some(Trust::Ca("ca.pem".into())));
    }

    #[test]
    fn flags_override_defaults() {
        let mut args = REQUIRED.to_vec();
        args.extend([
            "--id",
            "n7",
            "--heartbeat",
            "250ms",
            "--slow-policy",
            "drop",
            "--capacity",
            "12",
            "--threads",
            "3",
            "--decision",
            "a:1,b:2",
            "--max-sessions-per-user",
            "0",
            "--output-budget",
            "1048576",
        ]);
        let a = parse(&args).unwrap();
        let cfg = a.config_with(vec![1; 16], vec![2; 16], vec![3; 16]).unwrap();
        assert_eq!(cfg.node_id, "n7");
        assert_eq!(cfg.heartbeat, std::time::Duration::from_millis(250));
        assert_eq!(cfg.slow_policy, SlowPolicy::Drop);
        assert_eq!(cfg.capacity, 12);
        assert_eq!(cfg.threads, 3);
        assert_eq!(cfg.decision, ["a:1", "b:2"]);
        assert_eq!((cfg.max_sessions_per_user, cfg.output_budget), (0, 1 << 20));
        assert_eq!(cfg.cluster_secret, [3; 16]);
        let e = a.config_with(vec![1; 16], vec![2; 16], Vec::new()).unwrap_err();
        assert_eq!(e, "--decision needs --cluster-secret-file");
    }

    #[test]
    fn bad_values_are_refused() {
        let with = |extra: &[&str]| parse(&[&REQUIRED[..], extra].concat());
        assert!(with(&["--slow-policy", "block"]).is_err());
        assert!(with(&["--grace", "5y"]).is_err());
        assert!(with(&["--log-level", "loud"]).is_err());
        let a = with(&["--threads", "0"]).unwrap();
        let e = a.config_with(Vec::new(), Vec::new(), Vec::new()).unwrap_err();
        assert_eq!(e, format!("--threads must be 1..={MAX_THREADS}, not 0"));
        let a = with(&["--output-budget", "0"]).unwrap();
        let e = a.config_with(Vec::new(), Vec::new(), Vec::new()).unwrap_err();
        assert_eq!(e, "--output-budget must be more than 0");
        assert!(with(&["--max-sessions-per-user", "-1"]).is_err());
        assert!(parse(&["--secret-file", "c"]).is_err(), "--publisher-secret-file is required");
    }

    #[test]
    fn help_shows_the_defaults() {
        let help = NodeArgs::augment_args(clap::Command::new("node")).render_long_help().to_string();
        let d = Config::default();
        let shown = |v: &dyn std::fmt::Display| format!("[default: {v}]");
        for want in [
            shown(&d.node_id),
            shown(&d.listen),
            shown(&d.ingest),
            shown(&CliDuration(d.heartbeat)),
            shown(&d.queue_bytes),
            shown(&d.client_sndbuf),
            shown(&policy_name(d.slow_policy)),
            shown(&d.max_sessions_per_user),
            shown(&CliDuration(d.grace)),
            shown(&d.retain_total),
            shown(&CliDuration(d.drain_window)),
            shown(&CliDuration(d.heartbeat_interval)),
            shown(&"info"),
        ] {
            assert!(help.contains(&want), "{want} missing from:\n{help}");
        }
    }
}
