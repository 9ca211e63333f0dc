//! Blocking helpers for talking to decision servers (protocol.md §7): ask
//! for a node, list the live nodes, send a signed admin request.
//!
//! Each call opens one connection per server it tries, sends one request,
//! reads one response and closes, which is what real clients do (§7.1:
//! connect, ask, cache the node). How to connect is a [`Dial`]: the
//! timeout every server gets for connect, TLS handshake and answer
//! together, and, for a decision server whose port speaks TLS (§11), the
//! trust its certificate is verified with, for the host name of the
//! `host:port` dialled. [`assign`] and [`nodes`] try the servers in order
//! and the first answer wins, so a dead decision server costs a requester
//! at most one timeout (usually far less: a closed port is refused at once).
//!
//! The sockets come from the client library's `wire` helpers, so a decision
//! server is dialled exactly as a node is.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::table::Rng;
use crate::protocol::frame::{self as f, Frame, NODE_DRAINED, NODE_DRAINING};
use crate::protocol::{decode, limits, AdminOp, Channel, Code, DecodeError, Decoded};

/// The version of NODES_REQUEST and ADMIN: their layout is the same in
/// versions 1 and 2, and version 1 is taken by every decision server
/// (protocol.md §1, *Versions*).
const V1: u8 = 1;

/// How to reach decision servers: the time each server gets, and TLS.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Per server, for connect, TLS handshake, request and answer together.
    pub timeout: Duration,
    /// TLS: dial every server over TLS, verifying its certificate with this
    /// configuration ([`crate::tls::client_config`]) for the host name of
    /// its `host:port`; none: plaintext.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Dial {
    /// Plaintext, `timeout` per server.
    pub fn plain(timeout: Duration) -> Dial {
        Dial { timeout, tls: None }
    }

    /// TLS with `tls` (none: plaintext), `timeout` per server.
    pub fn new(timeout: Duration, tls: Option<Arc<rustls::ClientConfig>>) -> Dial {
        Dial { timeout, tls }
    }
}

/// One node of an ASSIGNMENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedNode {
    /// The node's id (lossily decoded as UTF-8).
    pub node_id: String,
    /// `host:port` of the node's client port.
    pub endpoint: String,
}

/// The answer to an ASSIGN_REQUEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    /// Ranked nodes: connect to the first, fall back to the others.
    Nodes(Vec<AssignedNode>),
    /// No node has headroom: ask again after `retry_after`.
    NoCapacity {
        /// How long to wait before asking again.
        retry_after: Duration,
    },
}

/// One live node from NODES.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id (lossily decoded as UTF-8).
    pub node_id: String,
    /// Its start time, ms since the Unix epoch.
    pub incarnation: u64,
    /// `host:port` for clients.
    pub client_endpoint: String,
    /// `host:port` for publishers and mesh peers; empty if none.
    pub ingest_endpoint: String,
    /// Draining, by its own report or by an admin: take no new work there.
    pub draining: bool,
    /// Drained by an admin (a node follows an admin drain of itself by this;
    /// `draining` may only echo its own heartbeats).
    pub drained: bool,
}

/// The answer to an ADMIN request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminReply {
    /// ADMIN_RESULT with status 0, and its message.
    Done(String),
    /// ADMIN_STATUS.
    Status {
        /// The global ceiling, percent.
        ceiling_pct: u8,
        /// One row per node the server knows.
        rows: Vec<StatusRow>,
    },
}

/// One row of ADMIN_STATUS (protocol.md §7.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// The node's id (lossily decoded as UTF-8).
    pub node_id: String,
    /// `host:port` for clients.
    pub client_endpoint: String,
    /// Connected clients at the last heartbeat.
    pub connections: u32,
    /// Capacity in force (admin override or the node's own).
    pub capacity: u32,
    /// Ceiling in force for this node, percent.
    pub ceiling_pct: u8,
    /// Headroom now; may be negative.
    pub headroom: i32,
    /// Milliseconds since the last accepted heartbeat.
    pub heartbeat_age_ms: u32,
    /// Draining, by its own report or by an admin.
    pub draining: bool,
    /// Messages delivered per second at the last heartbeat.
    pub msgs_out_per_s: u32,
}

/// Why a decision-server request failed.
#[derive(Debug)]
pub enum DecisionError {
    /// Resolving, connecting, writing or reading failed (a timeout is
    /// `ErrorKind::TimedOut`).
    Io(io::Error),
    /// The server sent bytes that are not a valid response.
    Protocol(DecodeError),
    /// The server answered ERROR, or ADMIN_RESULT with a non-zero status.
    Rejected {
        /// The code (AUTH_FAILED for a wrong admin secret, BAD_REQUEST …).
        code: Code,
        /// The server's message.
        message: String,
    },
    /// A valid frame, but not an answer to the request sent.
    Unexpected(u8),
    /// The server closed the connection without answering.
    Closed,
    /// A plaintext request went to a port that speaks TLS (the answer began
    /// with a TLS alert record, `15 03`): dial it with TLS.
    TlsPort,
    /// The list of servers is empty.
    NoServer,
    /// An argument cannot be sent (a user or node id too long).
    InvalidArgument(String),
}

impl fmt::Display for DecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecisionError::Io(e) => write!(f, "{e}"),
            DecisionError::Protocol(e) => write!(f, "invalid response: {e}"),
            DecisionError::Rejected { code, message } => write!(f, "refused with {code}: {message}"),
            DecisionError::Unexpected(t) => write!(f, "unexpected response frame type 0x{t:02x}"),
            DecisionError::Closed => write!(f, "the server closed the connection without answering"),
            DecisionError::TlsPort => {
                write!(f, "the server's port speaks TLS and this request was plaintext: dial it with TLS")
            }
            DecisionError::NoServer => write!(f, "no decision server given"),
            DecisionError::InvalidArgument(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for DecisionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecisionError::Io(e) => Some(e),
            DecisionError::Protocol(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for DecisionError {
    fn from(e: io::Error) -> Self {
        DecisionError::Io(e)
    }
}

/// Moves `failed`, a node that has just failed the caller, behind the other
/// candidates (keeping their order): a dead node stays in the decision
/// servers' answers until its heartbeats expire, so a client re-homing from
/// it should try the others first.
pub fn failed_last(candidates: &mut [String], failed: &str) {
    candidates.sort_by_key(|c| c == failed);
}

/// Asks for a node (ASSIGN_REQUEST, protocol.md §7.1). Tries `servers`
/// (`host:port`) in order, each dialled as `dial` says; the
/// first answer wins (NO_CAPACITY is an answer). `max_results` is clamped
/// to 1..=8. If no server answers, the last server's error is returned.
///
/// With a `token` (the client's own, §9) the request is version 2 and
/// proves who asks; a server that speaks only version 1 answers
/// UNSUPPORTED_VERSION, and is then asked again in version 1, without the
/// token. An empty `token` sends version 1, which every server takes.
pub fn assign(
    servers: &[String],
    user: &[u8],
    token: &[u8],
    max_results: u8,
    dial: &Dial,
) -> Result<AssignOutcome, DecisionError> {
    if user.len() > limits::MAX_USER_LEN {
        return Err(DecisionError::InvalidArgument(format!(
            "user id of {} bytes; at most {} allowed",
            user.len(),
            limits::MAX_USER_LEN
        )));
    }
    if token.len() > limits::MAX_TOKEN_LEN {
        return Err(DecisionError::InvalidArgument(format!(
            "token of {} bytes; at most {} allowed",
            token.len(),
            limits::MAX_TOKEN_LEN
        )));
    }
    let request = |version| {
        Frame::AssignRequest(f::AssignRequest {
            version,
            user,
            max_results: max_results.clamp(1, limits::MAX_ASSIGN_RESULTS),
            token: if version >= 2 { token } else { &[] },
        })
        .to_vec()
    };
    let v2 = request(if token.is_empty() { 1 } else { 2 });
    let v1 = request(1);
    let mut last = DecisionError::NoServer;
    for s in servers {
        let mut answer = exchange(s, &v2, dial).and_then(|resp| interpret(&resp, assignment));
        if matches!(answer, Err(DecisionError::Rejected { code: Code::UnsupportedVersion, .. })) && v2 != v1 {
            answer = exchange(s, &v1, dial).and_then(|resp| interpret(&resp, assignment));
        }
        match answer {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// An ASSIGNMENT or NO_CAPACITY, as an [`AssignOutcome`].
fn assignment(frame: Frame<'_>) -> Result<AssignOutcome, DecisionError> {
    match frame {
        Frame::Assignment(a) => Ok(AssignOutcome::Nodes(
            a.entries
                .iter()
                .map(|e| AssignedNode { node_id: lossy(e.node_id), endpoint: lossy(e.endpoint) })
                .collect(),
        )),
        Frame::NoCapacity(n) => {
            Ok(AssignOutcome::NoCapacity { retry_after: Duration::from_millis(u64::from(n.retry_after_ms)) })
        }
        other => Err(unexpected(other)),
    }
}

/// Live nodes (NODES_REQUEST, protocol.md §7.2) from the first of `servers`
/// that answers, draining ones included and flagged.
pub fn nodes(servers: &[String], dial: &Dial) -> Result<Vec<NodeInfo>, DecisionError> {
    let req = Frame::NodesRequest(f::NodesRequest { version: V1 }).to_vec();
    first_answer(servers, &req, dial, |frame| match frame {
        Frame::Nodes(n) => Ok(n
            .entries
            .iter()
            .map(|e| NodeInfo {
                node_id: lossy(e.node_id),
                incarnation: e.incarnation,
                client_endpoint: lossy(e.client_endpoint),
                ingest_endpoint: lossy(e.ingest_endpoint),
                draining: e.flags & NODE_DRAINING != 0,
                drained: e.flags & NODE_DRAINED != 0,
            })
            .collect()),
        other => Err(unexpected(other)),
    })
}

/// Sends one ADMIN request (protocol.md §7.3), signed with `admin_secret`,
/// to one server, dialled as `dial` says, with a fresh timestamp and random nonce. `node_id` empty
/// means global / not applicable. A wrong secret comes back as
/// `Rejected { code: AuthFailed }`; a refused operation (unknown node,
/// value out of range) as `Rejected { code: BadRequest }`.
pub fn admin(
    server: &str,
    admin_secret: &[u8],
    op: AdminOp,
    node_id: &str,
    value: u32,
    dial: &Dial,
) -> Result<AdminReply, DecisionError> {
    if node_id.len() > limits::MAX_NODE_ID_LEN {
        return Err(DecisionError::InvalidArgument(format!(
            "node id of {} bytes; at most {} allowed",
            node_id.len(),
            limits::MAX_NODE_ID_LEN
        )));
    }
    let timestamp_ms =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut req = Vec::with_capacity(128);
    Frame::Admin(f::Admin {
        version: V1,
        timestamp_ms,
        nonce: random_u64(),
        op,
        node_id: node_id.as_bytes(),
        value,
    })
    .encode_signed(&mut req, admin_secret);
    let resp = exchange(server, &req, dial)?;
    interpret(&resp, |frame| match frame {
        Frame::AdminResult(r) if r.status == 0 => Ok(AdminReply::Done(lossy(r.message))),
        Frame::AdminResult(r) => {
            Err(DecisionError::Rejected { code: Code::from_u16(r.status), message: lossy(r.message) })
        }
        Frame::AdminStatus(s) => Ok(AdminReply::Status {
            ceiling_pct: s.ceiling_pct,
            rows: s
                .entries
                .iter()
                .map(|e| StatusRow {
                    node_id: lossy(e.node_id),
                    client_endpoint: lossy(e.client_endpoint),
                    connections: e.connections,
                    capacity: e.capacity,
                    ceiling_pct: e.ceiling_pct,
                    headroom: e.headroom,
                    heartbeat_age_ms: e.heartbeat_age_ms,
                    draining: e.flags & NODE_DRAINING != 0,
                    msgs_out_per_s: e.msgs_out_per_s,
                })
                .collect(),
        }),
        other => Err(unexpected(other)),
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unexpected(frame: Frame<'_>) -> DecisionError {
    DecisionError::Unexpected(frame.frame_type())
}

/// Tries each server in order; the first that answers with something
/// `parse` accepts wins.
fn first_answer<T>(
    servers: &[String],
    req: &[u8],
    dial: &Dial,
    parse: impl Fn(Frame<'_>) -> Result<T, DecisionError>,
) -> Result<T, DecisionError> {
    let mut last = DecisionError::NoServer;
    for s in servers {
        match exchange(s, req, dial).and_then(|resp| interpret(&resp, &parse)) {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Decodes one response frame; ERROR becomes [`DecisionError::Rejected`].
fn interpret<T>(
    resp: &[u8],
    parse: impl Fn(Frame<'_>) -> Result<T, DecisionError>,
) -> Result<T, DecisionError> {
    match decode(resp, Channel::FromDecision) {
        Ok(Decoded::Frame(Frame::Error(e), _)) => {
            Err(DecisionError::Rejected { code: e.code, message: lossy(e.message) })
        }
        Ok(Decoded::Frame(frame, _)) => parse(frame),
        Ok(Decoded::Incomplete(_)) => Err(DecisionError::Closed),
        Err(e) => Err(DecisionError::Protocol(e)),
    }
}

/// Connects to `server` as `dial` says, sends `req`, returns the bytes of
/// one whole response frame, all within `dial.timeout`.
fn exchange(server: &str, req: &[u8], dial: &Dial) -> Result<Vec<u8>, DecisionError> {
    let deadline = Instant::now() + dial.timeout;
    let timed_out = || DecisionError::Io(io::Error::new(ErrorKind::TimedOut, format!("{server}: timed out")));
    let (mut s, _) = crate::dial::dial_stream(server, dial.timeout, dial.tls.as_ref())
        .map_err(|e| map_timeout(e, &timed_out))?;
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    s.set_write_timeout(Some(left))?;
    s.write_all(req).map_err(|e| map_timeout(e, &timed_out))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 8192];
    loop {
        if dial.tls.is_none() && buf.starts_with(&[0x15, 0x03]) {
            // protocol.md §11: no frame starts so; it is a TLS alert record.
            return Err(DecisionError::TlsPort);
        }
        match decode(&buf, Channel::FromDecision) {
            Ok(Decoded::Frame(_, n)) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Ok(Decoded::Incomplete(_)) => {}
            Err(e) => return Err(DecisionError::Protocol(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(DecisionError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(map_timeout(e, &timed_out)),
        }
    }
}

fn map_timeout(e: io::Error, timed_out: &dyn Fn() -> DecisionError) -> DecisionError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => timed_out(),
        _ => DecisionError::Io(e),
    }
}

/// A fresh random nonce: the OS's randomness, or, failing that, a PRNG
/// seeded from the clock, the process id and a counter (a nonce must only
/// be unique, not secret).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok() {
        return u64::from_ne_bytes(b);
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    Rng::new(
        t ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(17),
    )
    .next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decision server of protocol version 1, as its code behaved: one
    /// connection per request here; a version-2 request gets ERROR
    /// UNSUPPORTED_VERSION and a close, a version-1 one an ASSIGNMENT. (No
    /// version-1 build can run in this repository, so the test plays it.)
    fn version_1_server() -> (String, std::thread::JoinHandle<Vec<u8>>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let mut versions = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = l.accept().unwrap();
                let mut b = [0u8; 1024];
                let n = s.read(&mut b).unwrap();
                let version = b[9]; // length 4, type 1, magic 4
                versions.push(version);
                let answer = if version == 1 {
                    let e =
                        f::encode_entries(&[f::AssignEntry { node_id: b"n1", endpoint: b"127.0.0.1:7400" }]);
                    let entries = f::List::from_encoded(1, &e).unwrap();
                    Frame::Assignment(f::Assignment { entries }).to_vec()
                } else {
                    let message = b"request version 2; this decision server speaks protocol version 1";
                    Frame::Error(f::ErrorFrame { code: Code::UnsupportedVersion, message }).to_vec()
                };
                assert!(n >= 10);
                s.write_all(&answer).unwrap();
                if version == 1 {
                    break;
                }
            }
            versions
        });
        (addr, h)
    }

    #[test]
    fn a_version_1_server_is_asked_again_in_version_1() {
        let (addr, h) = version_1_server();
        let t = Dial::plain(Duration::from_secs(2));
        let got = assign(&[addr], b"alice", b"v1.YWxpY2U.1767225600.00", 2, &t).unwrap();
        assert!(matches!(&got, AssignOutcome::Nodes(n) if n[0].node_id == "n1"), "{got:?}");
        assert_eq!(h.join().unwrap(), [2, 1], "version 2 with the token first, then version 1");
    }

    #[test]
    fn the_failed_node_goes_last_and_the_rest_keep_their_order() {
        let mut v: Vec<String> = ["a", "dead", "b", "c"].iter().map(|s| s.to_string()).collect();
        failed_last(&mut v, "dead");
        assert_eq!(v, ["a", "b", "c", "dead"]);
        failed_last(&mut v, "elsewhere");
        assert_eq!(v, ["a", "b", "c", "dead"]);
    }

    #[test]
    fn no_servers_and_bad_arguments() {
        let t = &Dial::plain(Duration::from_millis(100));
        assert!(matches!(assign(&[], b"u", b"", 1, t), Err(DecisionError::NoServer)));
        assert!(matches!(nodes(&[], t), Err(DecisionError::NoServer)));
        let long = [b'x'; 65];
        assert!(matches!(
            assign(&["127.0.0.1:1".into()], &long, b"", 1, t),
            Err(DecisionError::InvalidArgument(_))
        ));
        let long = "n".repeat(65);
        assert!(matches!(
            admin("127.0.0.1:1", b"s", AdminOp::Drain, &long, 0, t),
            Err(DecisionError::InvalidArgument(_))
        ));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn error_frames_become_rejections() {
        let e = Frame::Error(f::ErrorFrame { code: Code::AuthFailed, message: b"no" }).to_vec();
        let r = interpret(&e, |_| Ok(()));
        assert!(matches!(r, Err(DecisionError::Rejected { code: Code::AuthFailed, .. })), "{r:?}");
        assert!(matches!(interpret(&e[..3], |_| Ok(())), Err(DecisionError::Closed)));
    }
}
