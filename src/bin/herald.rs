//! `herald`: the command-line front end. Parses arguments and calls into the
//! library; no logic lives here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

use log::{error, LevelFilter};

use herald::cert::{CertError, DEFAULT_CA_DAYS, DEFAULT_CA_NAME, DEFAULT_LEAF_DAYS};
use herald::cli::{parse_duration, read_secret};
use herald::client::{Client, ClientConfig, Event, Publisher};
use herald::logging;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `n` with a comma between thousands: 2,431.
fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn run_demo(cfg: herald::demo::DemoConfig) -> ExitCode {
    if cfg.clients > 18_000 {
        error!(
            "herald demo: at most 18,000 clients: the demo's nodes share one process and its 20,000 files; \
             for more, run herald node processes and herald-probe"
        );
        return ExitCode::from(2);
    }
    let s2 = cfg.stop.clone();
    let _ = ctrlc::set_handler(move || s2.store(true, std::sync::atomic::Ordering::SeqCst));
    match herald::demo::run(cfg) {
        Ok(r) => {
            let t = r.tally;
            println!();
            println!("summary");
            if let Some(q) = &r.queue {
                println!("  path               backend → {} → herald → clients", q.source.engine());
            }
            match &r.queue {
                Some(q) => {
                    println!("  published          {}  (stored by {})", r.published, q.source.engine())
                }
                None => println!("  published          {}", r.published),
            }
            println!("  received           {}", t.received);
            println!("  wrong user         {}", t.wrong_user);
            println!("  duplicates         {}", t.dups);
            if r.durable {
                let lost = r.lost();
                if lost == 0 {
                    let why = match &r.killed {
                        Some((id, _)) => {
                            format!("durable: streams kept in the log; {id}'s clients resumed elsewhere")
                        }
                        None => "durable: streams kept in the log".to_owned(),
                    };
                    println!("  lost               0  ({why})");
                } else {
                    println!(
                        "  lost               {lost}  ({} unannounced, {} announced by RESTARTED/GAP: durable mode must lose none)",
                        r.unannounced_loss.max(0),
                        t.announced_gaps
                    );
                }
            } else {
                println!("  lost, unannounced  {}", r.unannounced_loss);
                println!(
                    "  lost, announced    {}  (stream restarted on another node: the client was told)",
                    t.announced_gaps
                );
            }
            if r.queue.is_some() || t.late > 0 {
                let why = if r.queue.is_some() {
                    "nodes sharing a queue consumer, protocol.md §12"
                } else {
                    "different publisher connections, protocol.md §5.7"
                };
                println!(
                    "  reordered          {}  (came after a later message of the same user: {why})",
                    t.late
                );
            }
            println!("  reconnects         {}", t.reconnects);
            if t.reconnects > 0 || r.killed.is_some() {
                let held = match &r.killed {
                    Some((id, n)) => format!("; {id} held {n} clients when it was killed"),
                    None => String::new(),
                };
                let what = if r.durable {
                    "RESUMED: on another node, replayed from the log"
                } else {
                    "RESTARTED: the stream was only in the dead node's memory"
                };
                println!(
                    "  resumes            {} RESUMED, {} RESTARTED, {} GAP  ({what}{held})",
                    t.resumed, t.restarted, t.gapped
                );
            }
            println!(
                "  latency (µs)       p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
                r.latency_us[0], r.latency_us[1], r.latency_us[2], r.latency_us[3], r.latency_us[4]
            );
            if let Some(q) = &r.queue {
                let taken: Vec<String> = q
                    .taken
                    .iter()
                    .map(|(id, n)| format!("{id} {}", n.map_or("?".to_owned(), |n| n.to_string())))
                    .collect();
                println!(
                    "  taken from queue   {}  ({}; herald_source_messages_total)",
                    q.taken_total(),
                    taken.join(", ")
                );
                match q.state {
                    Some(s) if q.source == herald::demo::Source::JetStream => println!(
                        "  queue at the end   stream {}: {} stored; consumer herald: {} undelivered, {} unacknowledged, {} redelivered",
                        q.stream, s.stored, s.undelivered, s.unacked, s.other
                    ),
                    Some(s) => println!(
                        "  queue at the end   stream {}: {} entries; group herald: {} consumers, {} undelivered, {} pending",
                        q.stream, s.stored, s.other, s.undelivered, s.unacked
                    ),
                    None => println!("  queue at the end   stream {}: the queue did not say", q.stream),
                }
            }
            let sl = &r.slow;
            println!(
                "  slow client        {} quotes conflated, {} fills/balances lost, {} disconnects  ({} on {}: {} published, {} received; quote staleness p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms)",
                thousands(sl.conflated),
                sl.unkeyed_lost,
                sl.disconnects,
                sl.user,
                sl.node,
                sl.published,
                sl.received,
                sl.stale_ms[0],
                sl.stale_ms[1],
                sl.stale_ms[2]
            );
            if r.ok() {
                if r.durable {
                    println!("OK: every message reached its own user, none lost");
                } else {
                    println!("OK: every message reached its own user, none lost silently");
                }
                ExitCode::SUCCESS
            } else if !sl.ok() {
                println!(
                    "FAIL: the slow client lost an unkeyed message, was disconnected, or was not sent what it got"
                );
                ExitCode::from(1)
            } else if !r.durable_ok() {
                println!(
                    "FAIL: durable mode lost {} messages ({} clients RESTARTED, {} GAP): the log should have kept them",
                    r.lost(),
                    t.restarted,
                    t.gapped
                );
                ExitCode::from(1)
            } else {
                println!("FAIL: messages went to the wrong user or were lost without notice");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            error!("herald demo: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Parser)]
#[command(name = "herald", version, about = "Low-latency personal push messaging")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mint a client (or publisher) token: v1.<user>.<expiry>.<hmac>.
    Token {
        /// File holding the shared secret (trailing whitespace is ignored).
        #[arg(long)]
        secret_file: PathBuf,
        /// The user id (or publisher name) the token is for.
        #[arg(long)]
        user: String,
        /// How long the token is valid: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: std::time::Duration,
    },
    /// Make a development CA and TLS certificates for nodes and decision servers.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Run a node: accept clients, take messages from publishers, deliver.
    Node(Box<herald::node::cli::NodeArgs>),
    /// Connect as a client and print every message that arrives.
    Subscribe {
        /// Node client endpoint, host:port (several allowed, tried in order).
        #[arg(long, required = true, value_delimiter = ',')]
        node: Vec<String>,
        /// The user id (informational; the token decides).
        #[arg(long)]
        user: Option<String>,
        /// The client token (see `herald token`).
        #[arg(long)]
        token: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Connect over TLS, trusting the system's CA certificates.
        #[arg(long)]
        tls: bool,
        /// Connect over TLS, trusting the CA certificates in this PEM file
        /// (e.g. the one `herald cert` made).
        #[arg(long)]
        tls_ca: Option<std::path::PathBuf>,
    },
    /// Publish a message to a user through a node's ingest endpoint.
    Publish {
        /// Node ingest endpoint, host:port.
        #[arg(long, required_unless_present = "http", conflicts_with = "http")]
        node: Option<String>,
        /// Publish through the node's HTTP publish API instead
        /// (http://host:port or https://host:port, `herald node --http`);
        /// prints the node's counts as --confirm does.
        #[arg(long)]
        http: Option<String>,
        /// Recipient user id.
        #[arg(long)]
        user: String,
        /// The message text.
        #[arg(long)]
        message: String,
        /// Conflation key (protocol.md §5.7): on a node run with
        /// `--slow-policy conflate`, a later message with the same key
        /// replaces this one in a slow session's queue.
        #[arg(long, default_value = "")]
        key: String,
        /// Publisher credential (a token minted with the publisher secret).
        #[arg(long, conflicts_with = "publisher_secret_file")]
        credential: Option<String>,
        /// Mint the credential from this publisher secret file instead.
        #[arg(long)]
        publisher_secret_file: Option<PathBuf>,
        /// Ask the node for a result and print it.
        #[arg(long)]
        confirm: bool,
        /// Connect over TLS, trusting the system's CA certificates.
        #[arg(long)]
        tls: bool,
        /// Connect over TLS, trusting the CA certificates in this PEM file.
        #[arg(long)]
        tls_ca: Option<std::path::PathBuf>,
    },
    /// Run a decision server: tell clients which node to use.
    Decision(herald::decision::cli::DecisionArgs),
    /// Show or change the settings of decision servers (ceiling, capacity, drain).
    Admin(herald::decision::cli::AdminArgs),
    /// Run a whole cluster on loopback with simulated broker traffic.
    Demo {
        /// Simulated clients.
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        /// Messages per second in total (default: each user gets 2-4 a second).
        #[arg(long)]
        rate: Option<u64>,
        /// Nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// How long to publish.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Kill one node halfway and show its clients re-homed.
        #[arg(long)]
        chaos: bool,
        /// Plain TCP everywhere. Without it every connection speaks TLS 1.3,
        /// with a throwaway CA and certificates in a temporary directory.
        #[arg(long)]
        plaintext: bool,
        /// Route the traffic through a message queue: the backend publishes
        /// into it and the nodes pull from it (`herald node --source`). The
        /// demo starts the queue server (nats-server -js or redis-server) on
        /// a free loopback port unless --source-server is given.
        #[arg(long, value_enum)]
        source: Option<herald::demo::Source>,
        /// With --source: use the queue server already running at HOST:PORT
        /// (in a stream of the run's own, deleted at the end) instead of
        /// starting one.
        #[arg(long, requires = "source", value_name = "HOST:PORT")]
        source_server: Option<String>,
        /// Durable mode (protocol.md §13): the demo starts a 3-server
        /// JetStream cluster (nats-server) on loopback and the nodes keep
        /// every user's stream in it (R=3); with --chaos the killed node's
        /// clients resume elsewhere, replayed from the log, and nothing is
        /// lost (the demo fails if anything is).
        #[arg(long)]
        durable: bool,
        /// Least severe messages logged: error, warn, info, debug or trace.
        #[arg(long, default_value = "info", value_parser = logging::parse_level)]
        log_level: LevelFilter,
    },
    /// Print the herald and protocol versions.
    Version,
    /// Internal: a process of simulated clients for `herald demo`.
    #[command(hide = true)]
    SwarmWorker {
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, value_delimiter = ',')]
        decision: Vec<String>,
        #[arg(long, default_value_t = 0)]
        record_after: u64,
        /// Speak TLS to the nodes and decision servers, trusting this CA file.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a CA: DIR/ca.pem (certificate) and DIR/ca.key (private key, mode 0600).
    Ca {
        /// Directory to write into (created if need be).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The CA's name (subject common name).
        #[arg(long, default_value = DEFAULT_CA_NAME)]
        name: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by a CA: OUT/NAME.pem (leaf, then CA) and OUT/NAME.key (0600).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write into (created if need be).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The node id or server name: subject common name and first DNS name.
        #[arg(long)]
        name: String,
        /// Another DNS name the certificate is valid for (repeatable).
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address the certificate is valid for (repeatable).
        #[arg(long, value_name = "ADDR")]
        ip: Vec<IpAddr>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// A CA and a certificate per node and decision server, for localhost (DNS NAME and
    /// localhost, IP 127.0.0.1).
    Dev {
        /// Directory to write into (created if need be).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Node ids.
        #[arg(long, default_value = "n1,n2", value_delimiter = ',')]
        nodes: Vec<String>,
        /// Decision server names ('' for none).
        #[arg(long, default_value = "d1,d2", value_delimiter = ',')]
        decision: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn run_cert(cmd: CertCmd) -> ExitCode {
    let print = |written: Vec<PathBuf>| {
        for p in written {
            println!("wrote {}", p.display());
        }
    };
    let r = match cmd {
        CertCmd::Ca { out, name, days, force } => {
            herald::cert::new_ca(&name, days).and_then(|ca| ca.save(&out, force)).map(print)
        }
        CertCmd::Issue { ca, out, name, dns, ip, days, force } => herald::cert::Ca::load(&ca)
            .and_then(|ca| ca.issue(&name, &dns, &ip, days))
            .and_then(|leaf| leaf.save(&out, force))
            .map(print),
        CertCmd::Dev { out, nodes, decision, force } => {
            herald::cert::write_dev_set(&out, &nodes, &decision, force).map(|written| {
                print(written);
                println!("{}", herald::cert::dev_hint(&out, &nodes));
            })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (CertError::FileExists(_) | CertError::BadName(..))) => {
            eprintln!("herald cert: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("herald cert: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let code = run(Cli::parse().cmd);
    // Lines still queued for stderr would be lost when the process exits.
    logging::flush();
    code
}

fn run(cmd: Cmd) -> ExitCode {
    match cmd {
        Cmd::Token { secret_file, user, ttl } => {
            let secret = match read_secret(&secret_file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("herald token: {e}");
                    return ExitCode::from(2);
                }
            };
            let now = unix_now();
            match herald::protocol::token::mint(&secret, user.as_bytes(), now + ttl.as_secs()) {
                Some(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("herald token: the user id must be 1 to 64 bytes");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Cert { cmd } => run_cert(cmd),
        Cmd::Node(a) => herald::node::cli::run_node(*a),
        Cmd::Subscribe { node, user: _, token, count, tls, tls_ca } => {
            let tls = match herald::tls::Trust::config_from_flags(tls, tls_ca) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("herald subscribe: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut client = match Client::connect(ClientConfig {
                nodes: node.clone(),
                tls,
                ..ClientConfig::new(node[0].clone(), token)
            }) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("herald subscribe: {e}");
                    return ExitCode::from(1);
                }
            };
            let mut seen = 0u64;
            let r = client.run(|ev| {
                match ev {
                    Event::Message(m) => {
                        seen += 1;
                        println!(
                            "{}:{} {}",
                            m.position.epoch,
                            m.position.seq,
                            String::from_utf8_lossy(&m.payload)
                        );
                    }
                    other => eprintln!("{other:?}"),
                }
                count.is_none_or(|c| seen < c)
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald subscribe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Publish {
            node,
            http,
            user,
            message,
            key,
            credential,
            publisher_secret_file,
            confirm,
            tls,
            tls_ca,
        } => {
            let tls = match herald::tls::Trust::config_from_flags(tls, tls_ca) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("herald publish: {e}");
                    return ExitCode::from(2);
                }
            };
            let cred = match (credential, publisher_secret_file) {
                (Some(c), _) => c,
                (None, Some(f)) => match read_secret(&f) {
                    Ok(s) => herald::protocol::token::mint(&s, b"herald-cli", unix_now() + 300)
                        .expect("valid name"),
                    Err(e) => {
                        eprintln!("herald publish: {e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => {
                    eprintln!("herald publish: give --credential or --publisher-secret-file");
                    return ExitCode::from(2);
                }
            };
            if let Some(url) = http {
                let r = herald::client::HttpPublisher::connect(&url, &cred, tls)
                    .and_then(|mut p| p.publish_keyed(&user, &key, message.as_bytes()));
                return match r {
                    Ok(r) => {
                        println!(
                            "accepted={} local={} forwarded={} no_route={}",
                            r.accepted, r.local, r.forwarded, r.no_route
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("herald publish: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            let node = node.unwrap_or_default();
            let r = Publisher::connect_tls(std::slice::from_ref(&node), &cred, tls).and_then(|mut p| {
                if confirm {
                    let r = p.publish_confirmed_keyed(user.as_bytes(), key.as_bytes(), message.as_bytes())?;
                    println!(
                        "accepted={} local={} forwarded={} no_route={}",
                        r.accepted, r.local, r.forwarded, r.no_route
                    );
                } else {
                    p.publish_keyed(user.as_bytes(), key.as_bytes(), message.as_bytes())?;
                    p.flush()?;
                }
                Ok(())
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald publish: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Decision(a) => herald::decision::cli::run_decision(a),
        Cmd::Admin(a) => herald::decision::cli::run_admin(a),
        Cmd::Demo {
            clients,
            rate,
            nodes,
            duration,
            chaos,
            plaintext,
            source,
            source_server,
            durable,
            log_level,
        } => {
            logging::init(log_level);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            run_demo(herald::demo::DemoConfig {
                clients,
                rate,
                nodes,
                duration,
                chaos,
                stop,
                plaintext,
                source,
                source_server,
                durable,
            })
        }
        Cmd::SwarmWorker { first, count, decision, record_after, tls_ca } => {
            logging::init(LevelFilter::Info);
            let hex = std::env::var("HERALD_SWARM_SECRET_HEX").unwrap_or_default();
            let secret: Vec<u8> = (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            let tls = match herald::tls::Trust::config_from_flags(false, tls_ca) {
                Ok(t) => t,
                Err(e) => {
                    error!("swarm worker: {e}");
                    return ExitCode::from(2);
                }
            };
            let cfg = herald::swarm::SwarmConfig {
                first,
                count,
                decision,
                secret,
                reconnect: true,
                decision_tls: tls.clone(),
                tls,
                ..Default::default()
            };
            ExitCode::from(herald::swarm::run_worker(cfg, record_after).clamp(0, 255) as u8)
        }
        Cmd::Version => {
            println!("herald {} (protocol version {})", env!("CARGO_PKG_VERSION"), herald::protocol::VERSION);
            ExitCode::SUCCESS
        }
    }
}
