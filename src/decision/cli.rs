//! `herald decision` and `herald admin`: argument structs and the two entry
//! points the binary calls. Kept in the library so that the binary stays a
//! thin dispatcher and the formatting is tested.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use log::{error, info, warn};

use crate::cli::{parse_duration, read_secret};
use crate::logging;
use crate::protocol::AdminOp;

use super::client::{self, AdminReply, StatusRow};
use super::server::{Config, DecisionServer};

/// `herald decision`: run a decision server.
#[derive(clap::Args, Debug, Clone)]
pub struct DecisionArgs {
    /// TCP address for requests (clients, publishers, nodes, admin tools).
    #[arg(long, default_value = "0.0.0.0:7300")]
    pub listen: SocketAddr,
    /// UDP address for node heartbeats.
    #[arg(long, default_value = "0.0.0.0:7300")]
    pub heartbeat: SocketAddr,
    /// File holding the cluster secret (verifies heartbeats).
    #[arg(long)]
    pub cluster_secret_file: PathBuf,
    /// File holding the admin secret (verifies `herald admin`).
    #[arg(long)]
    pub admin_secret_file: PathBuf,
    /// File holding the client secret (the nodes' --client-secret-file):
    /// with it, the client token in a version-2 ASSIGN_REQUEST is verified
    /// (AUTH_FAILED / TOKEN_EXPIRED otherwise) and the assignment counts
    /// against the token's user; a request without a token is answered but
    /// uses up no node's headroom (protocol.md §7.1, "Who asks").
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,
    /// With --client-secret-file: refuse ASSIGN_REQUESTs that carry no
    /// token (all of version 1) with AUTH_FAILED instead of answering them.
    #[arg(long, requires = "client_secret_file")]
    pub require_token: bool,
    /// Keep admin settings (ceilings, capacities, drains) here across
    /// restarts; a global ceiling set by an admin overrides --ceiling.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Global load ceiling, percent of each node's capacity.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub ceiling: u8,
    /// A node silent for this long is no longer assigned or listed.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub expire_after: Duration,
    /// Log a one-line summary this often (0 disables).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub log_every: Duration,
    /// The server's TLS certificate chain (PEM, leaf first). With
    /// --tls-key, the request port (--listen) speaks TLS 1.3 only
    /// (protocol.md §11); without, it is plaintext and the server warns so.
    /// Heartbeats stay UDP (HMAC-signed). SIGHUP reloads both files.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Least severe messages logged: error, warn, info, debug or trace. At
    /// info the first line names the bound addresses (tools read it); warn
    /// and error leave it out, trace puts mio's lines before it.
    #[arg(long, default_value = "info", value_parser = logging::parse_level)]
    pub log_level: log::LevelFilter,
}

/// `herald admin`: change or show the settings of every decision server given.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// Decision servers (host:port, comma-separated); the command is sent to each.
    #[arg(long, required = true, value_delimiter = ',')]
    pub decision: Vec<String>,
    /// File holding the admin secret.
    #[arg(long)]
    pub admin_secret_file: PathBuf,
    /// Per-server timeout for connect, TLS handshake and answer.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Connect over TLS (to servers run with --tls-cert), trusting the
    /// system's CA certificates.
    #[arg(long)]
    pub tls: bool,
    /// Connect over TLS, trusting the CA certificates in this PEM file
    /// (e.g. the one `herald cert` made).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub cmd: AdminCmd,
}

/// The admin operations (protocol.md §7.3).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AdminCmd {
    /// Show every node each server knows: load, capacity, ceiling, headroom.
    Status,
    /// Set the load ceiling in percent, globally or for one node
    /// (0 with --node removes that node's override).
    SetCeiling {
        /// Percent, 1..=100.
        percent: u32,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Override a node's capacity, connections at 100 % (0 removes the override).
    SetCapacity {
        /// The node id.
        node: String,
        /// Connections at 100 % load.
        capacity: u32,
    },
    /// Stop assigning clients to a node and flag it draining.
    Drain {
        /// The node id.
        node: String,
    },
    /// Undo a drain.
    Undrain {
        /// The node id.
        node: String,
    },
}

impl AdminCmd {
    /// The wire operation, node id and value.
    pub fn request(&self) -> (AdminOp, &str, u32) {
        match self {
            AdminCmd::Status => (AdminOp::Status, "", 0),
            AdminCmd::SetCeiling { percent, node } => {
                (AdminOp::SetCeiling, node.as_deref().unwrap_or(""), *percent)
            }
            AdminCmd::SetCapacity { node, capacity } => (AdminOp::SetCapacity, node, *capacity),
            AdminCmd::Drain { node } => (AdminOp::Drain, node, 0),
            AdminCmd::Undrain { node } => (AdminOp::Undrain, node, 0),
        }
    }
}

/// Runs a decision server until SIGINT/SIGTERM; exit 0 on a clean stop,
/// 2 on bad arguments or secrets, 1 on a bind or runtime failure. Logs
/// through [`logging`] at `--log-level`; every line is written on return.
pub fn run_decision(a: DecisionArgs) -> ExitCode {
    logging::init(a.log_level);
    let code = decision_main(a);
    logging::flush();
    code
}

fn decision_main(a: DecisionArgs) -> ExitCode {
    let secrets = read_secret(&a.cluster_secret_file).and_then(|c| {
        let client = match &a.client_secret_file {
            Some(f) => read_secret(f)?,
            None => Vec::new(),
        };
        Ok((c, read_secret(&a.admin_secret_file)?, client))
    });
    let (cluster_secret, admin_secret, client_secret) = match secrets {
        Ok(s) => s,
        Err(e) => {
            error!("herald decision: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = Config {
        listen: a.listen,
        heartbeat: a.heartbeat,
        cluster_secret,
        admin_secret,
        assign: crate::decision::asker::Policy { client_secret, require_token: a.require_token },
        state_file: a.state_file.clone(),
        expire_after: a.expire_after,
        ceiling_pct: a.ceiling,
        log_every: a.log_every,
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
                client_cert_optional: false,
            }),
            _ => None,
        },
        ..Config::default()
    };
    let server = match DecisionServer::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            error!("herald decision: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let h = server.shutdown_handle();
    if let Err(e) = crate::cli::handle_signals("herald decision".into(), server.tls(), move || h.trigger()) {
        error!("herald decision: cannot install signal handler: {e}");
        return ExitCode::from(1);
    }
    info!(
        "herald decision: requests on {}, heartbeats on {}{}",
        server.tcp_addr(),
        server.udp_addr(),
        if server.is_tls() { ", requests over TLS" } else { "" }
    );
    if !server.is_tls() {
        warn!(
            "herald decision: the request port {} is plaintext (unencrypted); give --tls-cert/--tls-key for TLS",
            server.tcp_addr()
        );
    }
    if server.ceiling_pct() != a.ceiling {
        if let Some(p) = &a.state_file {
            info!(
                "herald decision: global ceiling {} % from {} (overrides --ceiling {})",
                server.ceiling_pct(),
                p.display(),
                a.ceiling
            );
        }
    }
    // The first line names the bound addresses (tools parse it): have it
    // out before the server starts writing its own.
    logging::flush();
    match server.run() {
        Ok(stats) => {
            info!(
                "herald decision: stopped; {} assignments, {} no capacity",
                stats.assignments, stats.no_capacity
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("herald decision: {e}");
            ExitCode::from(1)
        }
    }
}

/// Sends the command to every server listed and prints each outcome
/// (status tables on stdout, failures on stderr). Exit 0 only if every
/// server accepted it.
pub fn run_admin(a: AdminArgs) -> ExitCode {
    let secret = match read_secret(&a.admin_secret_file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald admin: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match crate::tls::Trust::config_from_flags(a.tls, a.tls_ca.clone()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("herald admin: {e}");
            return ExitCode::from(2);
        }
    };
    let dial = client::Dial::new(a.timeout, tls);
    let (op, node, value) = a.cmd.request();
    let mut failed = false;
    for server in &a.decision {
        match client::admin(server, &secret, op, node, value, &dial) {
            Ok(AdminReply::Done(msg)) => println!("{server}: ok: {msg}"),
            Ok(AdminReply::Status { ceiling_pct, rows }) => {
                print!("{}", status_table(server, ceiling_pct, &rows))
            }
            Err(e) => {
                failed = true;
                eprintln!("{server}: error: {e}");
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The `herald admin status` table for one server.
pub fn status_table(server: &str, ceiling_pct: u8, rows: &[StatusRow]) -> String {
    let mut out = format!("{server}: global ceiling {ceiling_pct} %, {} nodes\n", rows.len());
    let header = [
        "node",
        "endpoint",
        "connections",
        "capacity",
        "ceiling",
        "headroom",
        "heartbeat",
        "draining",
        "msgs/s",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.node_id.clone(),
                r.client_endpoint.clone(),
                r.connections.to_string(),
                r.capacity.to_string(),
                format!("{} %", r.ceiling_pct),
                r.headroom.to_string(),
                format!("{} ms ago", r.heartbeat_age_ms),
                if r.draining { "yes" } else { "no" }.to_string(),
                r.msgs_out_per_s.to_string(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, row: &[&str]| {
        for (i, (c, w)) in row.iter().zip(width).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            let sep = if i + 1 == row.len() { "" } else { "  " };
            if i < 2 || i == 7 {
                let _ = write!(out, "{c:<w$}{sep}");
            } else {
                let _ = write!(out, "{c:>w$}{sep}");
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(&mut out, &header);
    for row in &cells {
        line(&mut out, &row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_lines_up() {
        let rows = [
            StatusRow {
                node_id: "node-1".into(),
                client_endpoint: "10.0.0.1:7400".into(),
                connections: 150,
                capacity: 2000,
                ceiling_pct: 40,
                headroom: 650,
                heartbeat_age_ms: 300,
                draining: false,
                msgs_out_per_s: 450,
            },
            StatusRow {
                node_id: "n2".into(),
                client_endpoint: "10.0.0.2:7400".into(),
                connections: 0,
                capacity: 10,
                ceiling_pct: 80,
                headroom: -3,
                heartbeat_age_ms: 1200,
                draining: true,
                msgs_out_per_s: 0,
            },
        ];
        let t = status_table("a:7300", 40, &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a:7300: global ceiling 40 %, 2 nodes");
        assert!(lines[1].starts_with("node    endpoint       connections  capacity"), "{t}");
        assert!(
            lines[2].starts_with("node-1  10.0.0.1:7400          150      2000     40 %       650"),
            "{t}"
        );
        assert!(lines[3].contains("1200 ms ago  yes"), "{t}");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn commands_map_to_wire_operations() {
        assert_eq!(AdminCmd::Status.request(), (AdminOp::Status, "", 0));
        let c = AdminCmd::SetCeiling { percent: 40, node: None };
        assert_eq!(c.request(), (AdminOp::SetCeiling, "", 40));
        let c = AdminCmd::SetCeiling { percent: 50, node: Some("n".into()) };
        assert_eq!(c.request(), (AdminOp::SetCeiling, "n", 50));
        let c = AdminCmd::SetCapacity { node: "n".into(), capacity: 7 };
        assert_eq!(c.request(), (AdminOp::SetCapacity, "n", 7));
        assert_eq!(AdminCmd::Drain { node: "n".into() }.request(), (AdminOp::Drain, "n", 0));
        assert_eq!(AdminCmd::Undrain { node: "n".into() }.request(), (AdminOp::Undrain, "n", 0));
    }
}
