//! Connectors: a node pulls messages from a queue engine its backend already
//! writes to (NATS JetStream, Redis Streams) and routes each one like a
//! confirmed publish (`herald node --source URL`, protocol.md §12).
//!
//! Each connector runs on a thread of its own (JetStream's client needs an
//! async runtime; it gets a small one there, never in the node's event
//! loop; Redis's is synchronous). It hands the loop [`Batch`]es through [`Intake::send`] and gets one
//! [`Reply`] per batch back, with each message's [`Fate`] once the node has
//! taken it at PUB_RESULT level: queued to a local session, forwarded to a
//! peer that confirmed it, known to have no route, or already delivered (a
//! redelivery). Only then is it acknowledged to the queue. A message the node
//! could not take (it is draining) is handed back for another node.
//!
//! This module is the part without sockets: the `--source` URL ([`Spec`]),
//! the mapping of a queue message to a herald message ([`map`]) and the
//! hand-off types. The connectors: [`jetstream`] and [`mod@redis`].

use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::protocol::limits::{MAX_FORWARD_ID_LEN, MAX_KEY_LEN, MAX_PAYLOAD, MAX_USER_LEN};

pub mod jetstream;
pub mod redis;

/// One message from a queue, mapped ([`map`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// The recipient.
    pub user: Box<[u8]>,
    /// The conflation key (may be empty).
    pub key: Box<[u8]>,
    /// The payload.
    pub payload: Box<[u8]>,
    /// Its identity in the queue, for de-duplication (1..=64 bytes).
    pub id: Box<[u8]>,
    /// The queue has handed it out before (a redelivery, or a claim of a
    /// pending entry): in durable mode the log is searched for it first.
    pub redelivered: bool,
}

/// Messages handed to the node together.
#[derive(Debug)]
pub struct Batch {
    /// Which `--source` (its index among the node's sources).
    pub source: usize,
    /// The connector's number for it; the [`Reply`] carries it back.
    pub seq: u64,
    /// The messages, in queue order.
    pub msgs: Vec<Msg>,
}

/// What the node did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Queued to a session of the user on this node.
    Local,
    /// Forwarded to a peer node that confirmed it took it.
    Forwarded,
    /// The user had no session anywhere the node knew of (PUB_RESULT `no_route`).
    NoRoute,
    /// Already appended here (a redelivery); not delivered again.
    Duplicate,
    /// Not taken (the node is draining, or in durable mode the log could
    /// not keep it): give it to another node.
    Refused,
    /// Durable mode: kept in the log; the user had no session anywhere the
    /// node knew of, and gets it when it next connects (protocol.md §13).
    Kept,
}

impl Fate {
    /// Whether the queue may forget it (acknowledge it).
    pub fn taken(self, no_route: NoRoute) -> bool {
        match self {
            Fate::Local | Fate::Forwarded | Fate::Duplicate | Fate::Kept => true,
            Fate::NoRoute => no_route == NoRoute::Drop,
            Fate::Refused => false,
        }
    }
}

/// The node's answer to one [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The batch's `seq`.
    pub seq: u64,
    /// Per message, in order.
    pub fates: Vec<Fate>,
}

/// A connector's way into the node: hand a batch to the loop (false once the
/// node has stopped), and read its replies.
pub struct Intake {
    /// Hands a batch to the node's event loop and wakes it.
    pub send: Box<dyn Fn(Batch) -> bool + Send>,
    /// The node's replies, one per batch, in order.
    pub replies: Receiver<Reply>,
    /// The node's id (the default Redis consumer name).
    pub node_id: String,
}

/// Which queue engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NATS JetStream: a durable pull consumer.
    JetStream,
    /// Redis Streams: a consumer group.
    Redis,
}

/// What to do with a message the node has no route for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// Acknowledge it: it is gone, as a publish with `no_route` is.
    Drop,
    /// Leave it unacknowledged: the queue delivers it again later (JetStream:
    /// a NAK with the ack wait as delay, up to `max_deliver` times; Redis: it
    /// stays pending and is claimed again after `ack_wait`).
    Retry,
}

/// One `--source`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The engine.
    pub kind: Kind,
    /// `host:port` of the server.
    pub server: String,
    /// The JetStream stream or the Redis stream key.
    pub stream: String,
    /// JetStream: the durable consumer's name; Redis: the consumer group.
    /// Every node with this source shares it (default `herald`).
    pub group: String,
    /// Redis: this node's consumer name in the group (default: the node id).
    pub name: Option<String>,
    /// JetStream: the subject filter, also the prefix the user is taken
    /// from (default `herald.user.>`; the user is what the `>` matches).
    pub subject: String,
    /// Messages asked for at a time (default 256).
    pub batch: usize,
    /// Messages handed to the node and not yet answered, at most (default 4,096).
    pub in_flight: usize,
    /// JetStream: the consumer's ack wait; Redis: the idle time after which
    /// another consumer claims a pending entry (default 10 s).
    pub ack_wait: Duration,
    /// JetStream: deliveries of one message at most (default 5; then it is
    /// dropped by the server).
    pub max_deliver: i64,
    /// Where malformed messages go (a JetStream subject or a Redis stream);
    /// if none, they are dropped (acknowledged) and logged.
    pub dead_letter: Option<String>,
    /// What to do with a message whose user has no route (default drop).
    pub no_route: NoRoute,
    /// The URL as given, with any password replaced by `***` (for logs).
    pub url: String,
}

/// A `--source` URL that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--source: {}", self.0)
    }
}

impl std::error::Error for SpecError {}

impl Spec {
    /// Parses `jetstream://HOST:PORT/STREAM?...` or `redis://HOST:PORT/KEY?...`
    /// (protocol.md §12 lists the parameters).
    pub fn parse(url: &str) -> Result<Spec, SpecError> {
        // What is logged and shown in errors never holds a password.
        let shown = redact(url);
        let err = |m: String| SpecError(format!("{shown}: {m}"));
        let (kind, rest) = if let Some(r) = url.strip_prefix("jetstream://") {
            (Kind::JetStream, r)
        } else if let Some(r) = url.strip_prefix("redis://") {
            (Kind::Redis, r)
        } else {
            return Err(err("must start with jetstream:// or redis://".into()));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (server, stream) = path
            .split_once('/')
            .ok_or_else(|| err("needs a stream after the address: HOST:PORT/STREAM".into()))?;
        if server.is_empty() || !server.contains(':') {
            return Err(err("the server must be HOST:PORT".into()));
        }
        if stream.is_empty() || stream.contains('/') {
            return Err(err("the stream must be one non-empty name".into()));
        }
        let mut s = Spec {
            kind,
            server: server.to_owned(),
            stream: stream.to_owned(),
            group: "herald".into(),
            name: None,
            subject: "herald.user.>".into(),
            batch: 256,
            in_flight: 4096,
            ack_wait: Duration::from_secs(10),
            max_deliver: 5,
            dead_letter: None,
            no_route: NoRoute::Drop,
            url: shown.clone(),
        };
        for kv in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) =
                kv.split_once('=').ok_or_else(|| err(format!("parameter {kv:?} is not NAME=VALUE")))?;
            let num = |v: &str| -> Result<usize, SpecError> {
                v.parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| err(format!("{k}={v}: must be a positive number")))
            };
            let only = match k {
                "subject" | "max_deliver" => Some(Kind::JetStream),
                "name" => Some(Kind::Redis),
                _ => None,
            };
            if only.is_some_and(|o| o != kind) {
                let scheme = if kind == Kind::Redis { "jetstream" } else { "redis" };
                return Err(err(format!("{k}= applies to {scheme}:// sources only")));
            }
            match k {
                "consumer" | "group" => s.group = nonempty(k, v).map_err(err)?,
                "name" => s.name = Some(nonempty(k, v).map_err(err)?),
                "subject" => s.subject = nonempty(k, v).map_err(err)?,
                "batch" => s.batch = num(v)?.min(4096),
                "in_flight" => s.in_flight = num(v)?,
                "ack_wait" => {
                    s.ack_wait = crate::cli::parse_duration(v)
                        .map_err(|e| err(format!("ack_wait={v}: {e}")))?
                        .max(Duration::from_millis(100))
                }
                "max_deliver" => s.max_deliver = num(v)? as i64,
                "dead_letter" => s.dead_letter = Some(nonempty(k, v).map_err(err)?),
                "no_route" => {
                    s.no_route = match v {
                        "drop" => NoRoute::Drop,
                        "retry" => NoRoute::Retry,
                        _ => return Err(err(format!("no_route={v}: must be drop or retry"))),
                    }
                }
                _ => return Err(err(format!("unknown parameter {k:?}"))),
            }
        }
        if s.in_flight < s.batch {
            s.in_flight = s.batch;
        }
        if kind == Kind::JetStream && !s.subject.ends_with('>') {
            return Err(err(format!("subject={}: must end with > (the user is what it matches)", s.subject)));
        }
        Ok(s)
    }

    /// JetStream: the subject prefix before the user (`herald.user.`).
    pub fn subject_prefix(&self) -> &str {
        self.subject.trim_end_matches('>')
    }
}

/// `url` with the password of a `user:password@` part replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split_once(':').map_or(cred, |(u, _)| u);
            let masked = if cred.contains(':') { format!("{user}:***") } else { "***".to_owned() };
            format!("{scheme}://{masked}@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

fn nonempty(k: &str, v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err(format!("{k}= must not be empty"))
    } else {
        Ok(v.to_owned())
    }
}

/// Why a queue message cannot become a herald message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// No user (no header or field, or an empty one).
    NoUser,
    /// The user id is longer than 64 bytes.
    UserTooLong,
    /// The key is longer than 64 bytes.
    KeyTooLong,
    /// The payload is over 65,536 bytes.
    PayloadTooLarge,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::NoUser => "no user",
            Malformed::UserTooLong => "user id over 64 bytes",
            Malformed::KeyTooLong => "key over 64 bytes",
            Malformed::PayloadTooLarge => "payload over 65536 bytes",
        })
    }
}

/// Checks a queue message's parts against protocol.md's limits (§2.2) and
/// makes it a [`Msg`]. `id` longer than 64 bytes is cut (it is hashed for
/// de-duplication anyway; the connectors' ids are short).
pub fn map(user: Option<&[u8]>, key: Option<&[u8]>, payload: &[u8], id: &[u8]) -> Result<Msg, Malformed> {
    let user = user.filter(|u| !u.is_empty()).ok_or(Malformed::NoUser)?;
    if user.len() > MAX_USER_LEN {
        return Err(Malformed::UserTooLong);
    }
    let key = key.unwrap_or(b"");
    if key.len() > MAX_KEY_LEN {
        return Err(Malformed::KeyTooLong);
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(Malformed::PayloadTooLarge);
    }
    let id = &id[..id.len().min(MAX_FORWARD_ID_LEN)];
    Ok(Msg { user: user.into(), key: key.into(), payload: payload.into(), id: id.into(), redelivered: false })
}

/// Starts the connector for `spec` on a thread of its own; it stops when
/// `stop` is set (the node drains), after the node has answered what it was
/// handed.
pub fn spawn(
    spec: Spec,
    intake: Intake,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    match spec.kind {
        Kind::JetStream => std::thread::Builder::new()
            .name("herald-js".into())
            .spawn(move || jetstream::run(spec, intake, stop)),
        Kind::Redis => std::thread::Builder::new()
            .name("herald-redis".into())
            .spawn(move || self::redis::run(spec, intake, stop)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_parameters() {
        let s = Spec::parse("jetstream://127.0.0.1:4222/HERALD").unwrap();
        assert_eq!(
            (s.kind, s.server.as_str(), s.stream.as_str()),
            (Kind::JetStream, "127.0.0.1:4222", "HERALD")
        );
        assert_eq!(
            (s.group.as_str(), s.batch, s.in_flight, s.no_route),
            ("herald", 256, 4096, NoRoute::Drop)
        );
        assert_eq!(s.subject_prefix(), "herald.user.");
        let r = Spec::parse(
            "redis://localhost:6379/events?group=g&name=n1&batch=10&in_flight=5&ack_wait=2s&dead_letter=dead&no_route=retry",
        )
        .unwrap();
        assert_eq!(r.kind, Kind::Redis);
        assert_eq!((r.group.as_str(), r.name.as_deref(), r.batch, r.in_flight), ("g", Some("n1"), 10, 10));
        assert_eq!(
            (r.ack_wait, r.dead_letter.as_deref(), r.no_route),
            (Duration::from_secs(2), Some("dead"), NoRoute::Retry)
        );
    }

    #[test]
    fn a_password_in_the_url_is_never_shown() {
        let s = Spec::parse("redis://app:s3cret@127.0.0.1:6379/herald?group=g").unwrap();
        assert_eq!(s.server, "app:s3cret@127.0.0.1:6379", "the connection still gets it");
        assert_eq!(s.url, "redis://app:***@127.0.0.1:6379/herald?group=g");
        let e = Spec::parse("redis://app:s3cret@127.0.0.1:6379/herald?bogus=1").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert_eq!(redact("jetstream://tok@h:4222/S"), "jetstream://***@h:4222/S");
        assert_eq!(redact("jetstream://h:4222/S"), "jetstream://h:4222/S");
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, why) in [
            ("nats://x:1/S", "must start with"),
            ("jetstream://x:1", "needs a stream"),
            ("jetstream://x/S", "HOST:PORT"),
            ("jetstream://x:1/S?batch=0", "positive"),
            ("jetstream://x:1/S?colour=red", "unknown parameter"),
            ("jetstream://x:1/S?subject=a.b", "must end with >"),
            ("redis://x:1/S?no_route=keep", "drop or retry"),
            ("redis://x:1/S?subject=a.>", "jetstream:// sources only"),
            ("redis://x:1/S?max_deliver=3", "jetstream:// sources only"),
            ("jetstream://x:1/S?name=n1", "redis:// sources only"),
        ] {
            let e = Spec::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn mapping_checks_the_limits() {
        assert_eq!(map(None, None, b"x", b"1"), Err(Malformed::NoUser));
        assert_eq!(map(Some(b""), None, b"x", b"1"), Err(Malformed::NoUser));
        assert_eq!(map(Some(&[b'u'; 65]), None, b"x", b"1"), Err(Malformed::UserTooLong));
        assert_eq!(map(Some(b"u"), Some(&[b'k'; 65]), b"x", b"1"), Err(Malformed::KeyTooLong));
        assert_eq!(map(Some(b"u"), None, &vec![0; MAX_PAYLOAD + 1], b"1"), Err(Malformed::PayloadTooLarge));
        let m = map(Some(b"alice"), Some(b"k"), b"hi", &[b'i'; 80]).unwrap();
        assert_eq!((&*m.user, &*m.key, &*m.payload, m.id.len()), (&b"alice"[..], &b"k"[..], &b"hi"[..], 64));
    }

    #[test]
    fn only_taken_messages_are_acknowledged() {
        assert!(Fate::Local.taken(NoRoute::Retry));
        assert!(Fate::Duplicate.taken(NoRoute::Drop));
        assert!(Fate::NoRoute.taken(NoRoute::Drop));
        assert!(!Fate::NoRoute.taken(NoRoute::Retry));
        assert!(!Fate::Refused.taken(NoRoute::Drop));
        assert!(Fate::Kept.taken(NoRoute::Retry));
    }
}
