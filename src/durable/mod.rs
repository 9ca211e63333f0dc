//! Durable mode (`herald node --durable jetstream://…`): every user's
//! stream is kept in one replicated NATS JetStream stream, a subject per
//! user, so that a message confirmed to its publisher survives the death of
//! every node that touched it (DURABLE.md, protocol.md §13).
//!
//! The node's event loop never waits on the log. It hands [`Request`]s to
//! the log thread ([`log`]: async-nats on a current-thread tokio runtime of
//! its own, like the connectors) and hears [`Answer`]s through a channel
//! and its waker. This module is the part without sockets: the `--durable`
//! URL ([`Spec`]), the hand-off types, the subject a user's stream lives
//! on, and the epoch every node gives a user's durable stream.

use std::time::Duration;

pub mod log;

/// Subjects of users' streams start with this; the rest is the user id in
/// unpadded base64url (ids are opaque bytes; base64url has no `.`, `*`, `>`).
pub const SUBJECT_PREFIX: &str = "herald.log.";
/// The subject the log thread appends its health probes to.
pub const HEALTH_SUBJECT: &str = "herald.health";

/// Header: the message's seq in its user's stream (decimal).
pub const H_SEQ: &str = "Herald-Seq";
/// Header: the stream sequence of the user's previous message (decimal; 0:
/// none), so a user's messages can be read backwards from the latest.
pub const H_PREV: &str = "Herald-Prev";
/// Header: the conflation key, if not empty (base64url: keys are bytes).
pub const H_KEY: &str = "Herald-Key";
/// Header: the message's identity as the appender gave it
/// ([`Request::Append`]'s `msg_id`, base64url; absent if empty). The log's
/// own `Nats-Msg-Id` names the message's slot instead (see [`log`]).
pub const H_ID: &str = "Herald-Id";

/// `--durable jetstream://HOST:PORT[,HOST:PORT…]/STREAM[?replicas=3&max_age=24h&per_user=1024&timeout=2s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The URL as given, password redacted (for logs).
    pub url: String,
    /// `nats://HOST:PORT` of each server given.
    pub servers: Vec<String>,
    /// The stream (default `HERALD`).
    pub stream: String,
    /// Its replicas (default 3; 1 for a single server).
    pub replicas: usize,
    /// How long a message is kept (default 24 h).
    pub max_age: Duration,
    /// Messages kept per user (default 1,024).
    pub per_user: i64,
    /// An append or read not answered in this time has failed (default 2 s).
    pub timeout: Duration,
}

impl Spec {
    /// Parses a `--durable` URL.
    pub fn parse(url: &str) -> Result<Spec, String> {
        let rest = url
            .strip_prefix("jetstream://")
            .ok_or_else(|| format!("--durable {url}: only jetstream://HOST:PORT[,…]/STREAM is supported"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        let (hosts, stream) = match rest.split_once('/') {
            Some((h, s)) => (h, s),
            None => (rest, ""),
        };
        let stream = if stream.is_empty() { "HERALD".to_owned() } else { stream.to_owned() };
        if !stream.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("--durable {url}: stream name {stream:?} must be letters, digits, _ or -"));
        }
        let servers: Vec<String> =
            hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("nats://{h}")).collect();
        if servers.is_empty() {
            return Err(format!("--durable {url}: no server given"));
        }
        let mut spec = Spec {
            url: crate::source::redact(url),
            servers,
            stream,
            replicas: 3,
            max_age: Duration::from_secs(24 * 3600),
            per_user: 1024,
            timeout: Duration::from_secs(2),
        };
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let bad = |why: &str| format!("--durable {url}: {k}={v}: {why}");
            match k {
                "replicas" => {
                    spec.replicas =
                        v.parse().ok().filter(|r| (1..=5).contains(r)).ok_or_else(|| bad("must be 1..=5"))?
                }
                "max_age" => spec.max_age = crate::cli::parse_duration(v).map_err(|e| bad(&e))?,
                "per_user" => {
                    spec.per_user =
                        v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| bad("must be at least 1"))?
                }
                "timeout" => spec.timeout = crate::cli::parse_duration(v).map_err(|e| bad(&e))?,
                _ => return Err(bad("unknown parameter")),
            }
        }
        Ok(spec)
    }
}

/// The subject of `user`'s stream.
pub fn subject(user: &[u8]) -> String {
    let mut s = String::with_capacity(SUBJECT_PREFIX.len() + user.len() * 4 / 3 + 4);
    s.push_str(SUBJECT_PREFIX);
    b64url(user, &mut s);
    s
}

/// Unpadded base64url of `bytes`, appended to `out`.
pub fn b64url(bytes: &[u8], out: &mut String) {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
}

/// Decodes unpadded base64url; `None` if it is not.
pub fn un_b64url(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let b = s.as_bytes();
    if b.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() * 3 / 4);
    for c in b.chunks(4) {
        let mut n = 0u32;
        for (i, &x) in c.iter().enumerate() {
            n |= (val(x)? as u32) << (18 - 6 * i);
        }
        for i in 0..c.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// The epoch of `user`'s durable stream: the same on every node for as long
/// as the log's stream exists (`created`: the epoch base kept in the
/// stream's description, [`log::Log::created`]), never 0.
pub fn epoch(created: u64, user: &[u8]) -> u64 {
    // FNV-1a over (created, user), then a splitmix64 finish.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in created.to_be_bytes().iter().chain(user) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    h.max(1)
}

/// What the event loop asks of the log thread.
#[derive(Debug)]
pub enum Request {
    /// Append one message to `user`'s stream, at the next seq.
    Append {
        /// The caller's number for it, carried back in the answer.
        token: u64,
        /// The recipient.
        user: Box<[u8]>,
        /// Its conflation key (may be empty).
        key: Box<[u8]>,
        /// The message.
        payload: Vec<u8>,
        /// Its identity (`Herald-Id`, and this thread's memory of what it
        /// appended): a connector message's queue id; empty for a publish.
        msg_id: Box<[u8]>,
        /// A queue's redelivery: the user's recent messages are searched
        /// for `msg_id` first (another node may have appended it and died
        /// before acknowledging it to the queue).
        redelivered: bool,
    },
    /// Read `user`'s stream: its head and, with `after`, every retained
    /// message whose seq is greater, in order.
    Read {
        /// The caller's number for it.
        token: u64,
        /// The user.
        user: Box<[u8]>,
        /// Messages after this seq are wanted (`None`: only the head).
        after: Option<u64>,
        /// Any replica's answer will do (a read at a session's start, which
        /// is repeated shortly): it may be a little behind the leader, but
        /// never before `after`.
        quick: bool,
    },
}

/// One message read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its seq in the user's stream.
    pub seq: u64,
    /// Its conflation key.
    pub key: Box<[u8]>,
    /// The message.
    pub payload: Vec<u8>,
}

/// Why the log did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The log could not keep it: no quorum, unreachable, or not answered
    /// within the timeout. Nothing was confirmed.
    Unavailable(String),
    /// The log answered with something herald cannot use (a bug or a
    /// stream not made by herald).
    Invalid(String),
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Unavailable(s) => write!(f, "log unavailable: {s}"),
            LogError::Invalid(s) => write!(f, "log answered badly: {s}"),
        }
    }
}

/// What the log thread answers.
#[derive(Debug)]
pub enum Answer {
    /// The message is on a quorum of the stream's replicas, at `seq`
    /// (a retry the log had stored already gets its first seq).
    Appended {
        /// The request's token.
        token: u64,
        /// The user.
        user: Box<[u8]>,
        /// The key.
        key: Box<[u8]>,
        /// The message, handed back.
        payload: Vec<u8>,
        /// Its seq in the user's stream.
        seq: u64,
    },
    /// The message was not kept (and must not be delivered or confirmed).
    NotAppended {
        /// The request's token.
        token: u64,
        /// The user.
        user: Box<[u8]>,
        /// Why.
        why: LogError,
    },
    /// A [`Request::Read`]'s result.
    Read {
        /// The request's token.
        token: u64,
        /// The user.
        user: Box<[u8]>,
        /// The seq of the user's latest message (0: it has none).
        head: u64,
        /// With `after`: the messages after it, in order, ending at `head`.
        /// If the log no longer holds `after + 1` (its limits dropped it),
        /// they start at the oldest it holds: `msgs[0].seq > after + 1`.
        msgs: Vec<Entry>,
    },
    /// A read failed.
    ReadFailed {
        /// The request's token.
        token: u64,
        /// The user.
        user: Box<[u8]>,
        /// Why.
        why: LogError,
    },
    /// The log became unable (false) or able again (true) to append.
    Health(bool),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_servers_stream_and_options() {
        let s = Spec::parse(
            "jetstream://127.0.0.1:4222,127.0.0.1:4223/LOG?replicas=3&max_age=1h&per_user=64&timeout=500ms",
        )
        .unwrap();
        assert_eq!(s.servers, ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]);
        assert_eq!(s.stream, "LOG");
        assert_eq!(s.replicas, 3);
        assert_eq!(s.max_age, Duration::from_secs(3600));
        assert_eq!(s.per_user, 64);
        assert_eq!(s.timeout, Duration::from_millis(500));
        let d = Spec::parse("jetstream://h:1").unwrap();
        assert_eq!((d.stream.as_str(), d.replicas, d.per_user), ("HERALD", 3, 1024));
        assert!(Spec::parse("nats://h:1/S").is_err());
        assert!(Spec::parse("jetstream:///S").is_err());
        assert!(Spec::parse("jetstream://h:1/S?replicas=0").is_err());
        assert!(Spec::parse("jetstream://h:1/S?bogus=1").is_err());
        assert!(Spec::parse("jetstream://h:1/a.b").is_err());
    }

    #[test]
    fn subjects_are_base64url_and_round_trip() {
        assert_eq!(subject(b"alice"), "herald.log.YWxpY2U");
        for len in 0..70usize {
            let user: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            let s = subject(&user);
            let tail = s.strip_prefix(SUBJECT_PREFIX).unwrap();
            assert!(!tail.contains(['.', '*', '>', '=']), "{tail}");
            assert_eq!(un_b64url(tail).unwrap(), user);
        }
        assert!(un_b64url("a").is_none());
        assert!(un_b64url("a.bc").is_none());
    }

    #[test]
    fn epochs_agree_across_nodes_and_differ_across_streams_and_users() {
        assert_eq!(epoch(7, b"u1"), epoch(7, b"u1"));
        assert_ne!(epoch(7, b"u1"), epoch(8, b"u1"));
        assert_ne!(epoch(7, b"u1"), epoch(7, b"u2"));
        assert_ne!(epoch(0, b""), 0);
    }
}
