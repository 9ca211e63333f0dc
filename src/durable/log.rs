//! The log thread: async-nats on a current-thread tokio runtime of its
//! own (the node's event loop has no runtime in it), holding one
//! connection to the JetStream cluster. It makes sure the stream exists,
//! appends each user's messages in order, one in flight per user, under a
//! compare-and-set on the user's last message (so concurrent appenders of
//! one user on several nodes get consecutive seqs, no holes, no repeats),
//! reads users' streams back (the latest message by subject, then
//! backwards through each message's `Herald-Prev`), and reports whether
//! appends succeed.
//!
//! # The compare-and-set, and what nats-server 2.9 does with it
//!
//! An append of seq `n` to a user whose latest message is at stream
//! sequence `s` carries `Nats-Expected-Last-Subject-Sequence: s` (0 when
//! the subject is empty) **and `Nats-Msg-Id: n.<base64url(user)>`**: the
//! id names the *slot* (user, seq), not the message. That is on purpose.
//! nats-server 2.9 (Debian's is 2.9.10) checks an expected last subject
//! sequence above 0 on a clustered stream only before proposing the
//! message, against the messages already applied, and not again when it
//! applies it (`processClusteredInboundMsg`; "if we are clustered we have
//! prechecked seq > 0" in `processJetStreamMsg`, until 2.11 added
//! `expectedPerSubjectInProcess`): two appends in flight together with the
//! same expected sequence are both stored. Measured here: five pipelined
//! publishes expecting the same sequence all succeed. Only 0 ("no message
//! yet") is checked at apply time. The duplicate check on `Nats-Msg-Id` is
//! made at apply time, in log order, on every replica; so naming the slot
//! makes the second of two racing appends of seq `n` a duplicate of the
//! first, and its appender learns (from the duplicate ack's sequence) that
//! slot `n` is taken and where, and tries `n + 1` at once. The expected
//! sequence still turns away an appender whose idea of the last message is
//! old (error 10071, "wrong last sequence": it reads the last message from
//! the stream's leader and tries again).
//!
//! The price: JetStream no longer de-duplicates by the appender's own
//! message id, which goes in `Herald-Id` instead ([`super::H_ID`]). The
//! thread makes up for it for its own node: it remembers (two minutes, at
//! most 65,536 ids) which ids it appended at which seq, and answers a
//! repeat with that seq without writing; and an append that failed without
//! an answer (its ack timed out) is remembered as uncertain, so a retry
//! first reads the slot it was tried at and answers that seq if the
//! message is there. A message repeated through another node (a connector's
//! redelivery after the first node died) within that node's window is not
//! caught, and is stored twice, under two seqs.
//!
//! # Reads
//!
//! Direct gets (`allow_direct`) may be answered by any replica, and a
//! follower can be behind its leader. So the latest message of a user is
//! always read from the stream's leader (a stale head would hide messages
//! from a resuming client), while the walk back by `Herald-Prev` uses
//! direct gets by sequence and asks the leader only when a replica says a
//! message is not there. Within an append, the first read of a user's last
//! message may be direct: a stale answer only costs a refused append.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::HeaderMap;
use crossbeam_channel::Sender;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{Answer, Entry, LogError, Request, Spec, HEALTH_SUBJECT, H_ID, H_KEY, H_PREV, H_SEQ};

/// Appends refused because another node took the slot, before giving up.
const MAX_CONFLICTS: usize = 200;
/// Users whose last message is cached (cleared when full: a miss costs a read).
const CACHE_MAX: usize = 1_000_000;
/// Message ids remembered for de-duplication.
const SEEN_MAX: usize = 65_536;
/// JetStream's duplicate window (less if `max_age` is shorter).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How often an unhealthy log is probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How often a healthy log is probed (so a node that appends nothing still
/// notices when it cannot reach the log).
const IDLE_PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a stopping thread finishes what it has.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The event loop's handle on the log thread.
pub struct Log {
    tx: tokio::sync::mpsc::UnboundedSender<Request>,
    /// The base of every user's durable epoch ([`super::epoch`]): chosen at
    /// random by the node that made the stream and kept in its description,
    /// so the same on every node and server for as long as the stream exists.
    pub created: u64,
}

impl Log {
    /// Connects, makes sure the stream exists (waiting up to `spec.timeout`
    /// × 10 for the cluster), and starts the thread. Answers go to
    /// `answers`, each followed by `wake()`.
    pub fn start(
        spec: Spec,
        node_id: &str,
        answers: Sender<Answer>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Log, String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let wait = spec.timeout * 10;
        let url = spec.url.clone();
        let node_id = node_id.to_owned();
        std::thread::Builder::new()
            .name("herald-log".into())
            .spawn(move || thread_main(spec, node_id, answers, wake, rx, ready_tx, wait))
            .map_err(|e| format!("--durable {url}: cannot start the log thread: {e}"))?;
        match ready_rx.recv_timeout(wait + Duration::from_secs(2)) {
            Ok(Ok(created)) => Ok(Log { tx, created }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("--durable {url}: the log did not start within {wait:?}")),
        }
    }

    /// Hands `r` to the log thread (never blocks). False if the thread has gone.
    pub fn send(&self, r: Request) -> bool {
        self.tx.send(r).is_ok()
    }
}

fn thread_main(
    spec: Spec,
    node_id: String,
    answers: Sender<Answer>,
    wake: Arc<dyn Fn() + Send + Sync>,
    rx: UnboundedReceiver<Request>,
    ready: std::sync::mpsc::Sender<Result<u64, String>>,
    wait: Duration,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("--durable {}: cannot start its runtime: {e}", spec.url)));
            return;
        }
    };
    rt.block_on(async move {
        let deadline = Instant::now() + wait;
        let ping = (spec.timeout * 2).max(Duration::from_secs(1));
        let client = async_nats::ConnectOptions::new()
            .name(format!("herald node {node_id} log"))
            .connection_timeout(spec.timeout)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(1000)))
            .ping_interval(ping)
            .connect(spec.servers.clone())
            .await;
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(format!("--durable {}: {e}", spec.url)));
                return;
            }
        };
        let js = jetstream::ContextBuilder::new().timeout(spec.timeout).build(client);
        let (stream, created) = loop {
            match ensure_stream(&js, &spec).await {
                Ok(s) => break s,
                Err(Ensure::Refused(e)) => {
                    let _ = ready.send(Err(format!("--durable {}: {e}", spec.url)));
                    return;
                }
                Err(Ensure::Retry(e)) => {
                    if Instant::now() >= deadline {
                        let _ = ready.send(Err(format!(
                            "--durable {}: the log cluster was not reachable within {wait:?}: {e}",
                            spec.url
                        )));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let direct = stream.cached_info().config.allow_direct;
        if !direct {
            log::warn!(
                "herald durable {}: stream {} has no direct gets; every read goes to its leader",
                spec.url,
                spec.stream
            );
        }
        if ready.send(Ok(created)).is_err() {
            return;
        }
        log::info!("herald durable {}: stream {} ready", spec.url, spec.stream);
        let window = DUPLICATE_WINDOW.min(spec.max_age);
        let ctx = Arc::new(Ctx {
            js,
            stream,
            direct,
            timeout: spec.timeout,
            per_user: spec.per_user.clamp(1, i64::from(u32::MAX)) as usize,
            node_id,
        });
        let st = State {
            ctx,
            answers,
            wake,
            users: HashMap::new(),
            cache: HashMap::new(),
            seen: Seen::new(window, SEEN_MAX),
            reading: HashMap::new(),
            healthy: true,
        };
        st.run(rx).await;
    });
}

enum Ensure {
    /// Cannot work with what is there.
    Refused(String),
    /// Not reachable (yet).
    Retry(String),
}

/// The stream's configuration as herald makes it.
fn stream_config(spec: &Spec) -> stream::Config {
    stream::Config {
        name: spec.stream.clone(),
        subjects: vec![format!("{}>", super::SUBJECT_PREFIX), HEALTH_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: spec.replicas,
        max_age: spec.max_age,
        max_messages_per_subject: spec.per_user,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        duplicate_window: DUPLICATE_WINDOW.min(spec.max_age),
        // The base of every user's epoch, chosen by the node that makes the
        // stream: the config is the same on every server, while each
        // replica reports its own creation time.
        description: Some(format!("{EPOCH_TAG}{:016x}", fresh_base())),
        ..Default::default()
    }
}

/// A stream's description starts with this, then the epoch base in hex.
const EPOCH_TAG: &str = "herald durable log; epoch base ";

/// A new epoch base: the clock and the process, never 0.
fn fresh_base() -> u64 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    (t ^ (std::process::id() as u64) << 40).max(1)
}

/// The epoch base a stream's description names, if it names one.
fn epoch_base(description: Option<&str>) -> Option<u64> {
    let hex = description?.strip_prefix(EPOCH_TAG)?;
    u64::from_str_radix(hex.trim(), 16).ok().filter(|&b| b != 0)
}

/// Finds or creates the stream; it and its creation time (ns since the
/// Unix epoch).
async fn ensure_stream(js: &jetstream::Context, spec: &Spec) -> Result<(stream::Stream, u64), Ensure> {
    let want = stream_config(spec);
    let stream = match js.get_stream(&spec.stream).await {
        Ok(s) => s,
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                log::info!("herald durable {}: creating stream {}", spec.url, spec.stream);
                match js.create_stream(want.clone()).await {
                    Ok(s) => s,
                    Err(e) => {
                        let why = format!("creating stream {}: {e}", spec.stream);
                        return Err(match e.kind() {
                            // Another node made it meanwhile: look again.
                            jetstream::context::CreateStreamErrorKind::JetStream(j)
                                if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
                            {
                                Ensure::Retry(why)
                            }
                            // Overlapping subjects, replicas on a single server, …
                            jetstream::context::CreateStreamErrorKind::JetStream(j)
                                if j.code() < 500
                                    || j.error_code()
                                        == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED =>
                            {
                                Ensure::Refused(why)
                            }
                            _ => Ensure::Retry(why),
                        });
                    }
                }
            }
            _ => return Err(Ensure::Retry(format!("stream {}: {e}", spec.stream))),
        },
    };
    let info = stream.cached_info();
    let mut have = info.config.subjects.clone();
    let mut wanted = want.subjects.clone();
    have.sort();
    wanted.sort();
    if have != wanted {
        return Err(Ensure::Refused(format!(
            "stream {} exists with subjects {:?}, not {:?}",
            spec.stream, info.config.subjects, want.subjects
        )));
    }
    let c = &info.config;
    if c.num_replicas != want.num_replicas
        || c.max_age != want.max_age
        || c.max_messages_per_subject != want.max_messages_per_subject
    {
        log::warn!(
            "herald durable {}: stream {} has replicas={} max_age={:?} per_user={}; using it as it is",
            spec.url,
            spec.stream,
            c.num_replicas,
            c.max_age,
            c.max_messages_per_subject
        );
    }
    let Some(created) = epoch_base(c.description.as_deref()) else {
        return Err(Ensure::Refused(format!(
            "stream {} was not made by herald (its description names no epoch base); delete it or name another stream",
            spec.stream
        )));
    };
    Ok((stream, created))
}

/// What every task shares.
struct Ctx {
    js: jetstream::Context,
    stream: stream::Stream,
    direct: bool,
    timeout: Duration,
    per_user: usize,
    node_id: String,
}

/// A user's latest message: its seq and its stream sequence ((0, 0): none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Last {
    seq: u64,
    sseq: u64,
}

/// An append that went out: its seq (slot) and expected last stream sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    slot: u64,
    expected: u64,
}

/// The herald headers of a stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    seq: u64,
    prev: u64,
    key: Box<[u8]>,
    /// `Herald-Id` as stored (base64url of the message id).
    id: Option<String>,
}

/// Reads a stored message's herald headers.
fn parse_headers(h: &HeaderMap) -> Result<Stored, String> {
    let num = |name: &str| -> Result<u64, String> {
        let v = h.get(name).ok_or_else(|| format!("no {name} header"))?;
        v.as_str().trim().parse().map_err(|_| format!("{name}: {:?} is not a number", v.as_str()))
    };
    let seq = num(H_SEQ)?;
    if seq == 0 {
        return Err(format!("{H_SEQ} is 0"));
    }
    let prev = num(H_PREV)?;
    let key = match h.get(H_KEY) {
        None => Box::default(),
        Some(v) => super::un_b64url(v.as_str())
            .ok_or_else(|| format!("{H_KEY}: {:?} is not base64url", v.as_str()))?
            .into_boxed_slice(),
    };
    let id = h.get(H_ID).map(|v| v.as_str().to_owned());
    Ok(Stored { seq, prev, key, id })
}

/// The `Nats-Msg-Id` of slot `seq` of the user whose subject is `subject`.
fn slot_id(seq: u64, subject: &str) -> String {
    let user = subject.strip_prefix(super::SUBJECT_PREFIX).unwrap_or(subject);
    format!("{seq}.{user}")
}

fn b64(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 4 / 3 + 4);
    super::b64url(bytes, &mut s);
    s
}

/// The headers of an append.
fn append_headers(seq: u64, last: Last, subject: &str, key: &[u8], id: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(H_SEQ, seq.to_string());
    h.insert(H_PREV, last.sseq.to_string());
    if !key.is_empty() {
        h.insert(H_KEY, b64(key));
    }
    if let Some(id) = id {
        h.insert(H_ID, id);
    }
    h.insert("Nats-Msg-Id", slot_id(seq, subject));
    h.insert("Nats-Expected-Last-Subject-Sequence", last.sseq.to_string());
    h
}

/// How a publish failed.
#[derive(Debug, PartialEq, Eq)]
enum PubFail {
    /// Wrong last sequence: another node appended meanwhile.
    Conflict,
    Unavailable(String),
    Invalid(String),
}

fn classify_publish(e: &jetstream::context::PublishError) -> PubFail {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => PubFail::Conflict,
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => PubFail::Unavailable(e.to_string()),
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::WrongLastMessageId => {
            PubFail::Invalid(e.to_string())
        }
        _ => match jetstream_error(e) {
            Some(j) if j.code() < 500 => PubFail::Invalid(e.to_string()),
            _ => PubFail::Unavailable(e.to_string()),
        },
    }
}

/// The JetStream API error behind `e`, if that is what it is.
fn jetstream_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a jetstream::Error> {
    let mut cur = std::error::Error::source(e);
    while let Some(s) = cur {
        if let Some(j) = s.downcast_ref::<jetstream::Error>() {
            return Some(j);
        }
        cur = s.source();
    }
    None
}

impl Ctx {
    /// Publishes and waits for the ack, for at most the timeout.
    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
    ) -> Result<jetstream::publish::PublishAck, PubFail> {
        let send = async {
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| classify_publish(&e))?;
            ack.await.map_err(|e| classify_publish(&e))
        };
        match tokio::time::timeout(self.timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(PubFail::Unavailable(format!("no ack within {:?}", self.timeout))),
        }
    }

    /// The last message on `subject`; from the leader unless `direct`.
    async fn last(&self, subject: &str, direct: bool) -> Result<Option<StreamMessage>, LogError> {
        if direct && self.direct {
            direct_result(self.stream.direct_get_last_for_subject(subject).await)
        } else {
            leader_result(self.stream.get_last_raw_message_by_subject(subject).await)
        }
    }

    /// The message at stream sequence `sseq` (direct; a "not found" is
    /// asked again of the leader, since a replica may be behind).
    async fn by_seq(&self, sseq: u64) -> Result<Option<StreamMessage>, LogError> {
        if self.direct {
            if let Some(m) = direct_result(self.stream.direct_get(sseq).await)? {
                return Ok(Some(m));
            }
        }
        leader_result(self.stream.get_raw_message(sseq).await)
    }

    /// The first message on `subject` after stream sequence `after` (leader).
    async fn next_after(&self, subject: &str, after: u64) -> Result<Option<StreamMessage>, LogError> {
        let r = self.stream.raw_message_builder().next_by_subject(subject).sequence(after + 1).send().await;
        leader_result(r)
    }

    /// The user's latest message as (seq, stream seq).
    async fn last_of(&self, subject: &str, direct: bool) -> Result<Last, LogError> {
        match self.last(subject, direct).await? {
            None => Ok(Last::default()),
            Some(m) => {
                let s = parse_headers(&m.headers)
                    .map_err(|e| LogError::Invalid(format!("{subject} at {}: {e}", m.sequence)))?;
                Ok(Last { seq: s.seq, sseq: m.sequence })
            }
        }
    }
}

fn direct_result(
    r: Result<StreamMessage, stream::DirectGetError>,
) -> Result<Option<StreamMessage>, LogError> {
    use stream::DirectGetErrorKind as K;
    match r {
        Ok(m) => Ok(Some(m)),
        Err(e) => match e.kind() {
            K::NotFound => Ok(None),
            K::InvalidSubject => Err(LogError::Invalid(format!("direct get: {e}"))),
            _ => Err(LogError::Unavailable(format!("direct get: {e}"))),
        },
    }
}

fn leader_result(
    r: Result<StreamMessage, stream::RawMessageError>,
) -> Result<Option<StreamMessage>, LogError> {
    use stream::LastRawMessageErrorKind as K;
    match r {
        Ok(m) => Ok(Some(m)),
        Err(e) => match e.kind() {
            K::NoMessageFound => Ok(None),
            K::InvalidSubject => Err(LogError::Invalid(format!("get: {e}"))),
            K::JetStream(j) if j.code() < 500 && j.error_code() != jetstream::ErrorCode::STREAM_NOT_FOUND => {
                Err(LogError::Invalid(format!("get: {e}")))
            }
            _ => Err(LogError::Unavailable(format!("get: {e}"))),
        },
    }
}

/// One append waiting for its turn.
struct Pending {
    token: u64,
    key: Box<[u8]>,
    payload: Vec<u8>,
    msg_id: Box<[u8]>,
    redelivered: bool,
}

/// How far back a redelivered message is looked for among its user's
/// messages (a queue redelivers within its ack wait, seconds; a user gets a
/// few messages a second).
const LOOKBACK: usize = 256;

/// Looks for the message with `Herald-Id` `id` among the last [`LOOKBACK`]
/// of `subject`'s messages (read backwards from the leader's latest);
/// its seq if found.
async fn find_id(ctx: &Ctx, subject: &str, id: &str) -> Result<Option<u64>, LogError> {
    let mut m = ctx.last(subject, false).await?;
    for _ in 0..LOOKBACK {
        let Some(msg) = m else { return Ok(None) };
        let s = parse_headers(&msg.headers)
            .map_err(|e| LogError::Invalid(format!("{subject} at {}: {e}", msg.sequence)))?;
        if s.id.as_deref() == Some(id) {
            return Ok(Some(s.seq));
        }
        if s.prev == 0 {
            return Ok(None);
        }
        m = ctx.by_seq(s.prev).await?;
    }
    Ok(None)
}

/// How an append ended.
enum Outcome {
    /// Stored at `seq`; `last`: the user's latest message now, if known.
    Appended { seq: u64, last: Option<Last> },
    /// Not stored (or not known to be: `sent` is the attempt that may have been).
    Failed { why: LogError, sent: Option<Sent> },
}

/// A finished append.
struct Done {
    user: Box<[u8]>,
    p: Pending,
    outcome: Outcome,
}

/// Appends `p` for `user`: `cached` is the user's last message if known;
/// `uncertain`, an earlier attempt of the same message whose fate is unknown.
async fn append(
    ctx: Arc<Ctx>,
    user: Box<[u8]>,
    p: Pending,
    cached: Option<Last>,
    uncertain: Option<Sent>,
) -> Done {
    let outcome = append_one(&ctx, &user, &p, cached, uncertain).await;
    Done { user, p, outcome }
}

async fn append_one(
    ctx: &Ctx,
    user: &[u8],
    p: &Pending,
    cached: Option<Last>,
    uncertain: Option<Sent>,
) -> Outcome {
    if user.is_empty() {
        return Outcome::Failed { why: LogError::Invalid("empty user id".into()), sent: None };
    }
    let subject = super::subject(user);
    let id = (!p.msg_id.is_empty()).then(|| b64(&p.msg_id));
    // Slots this message may already hold.
    let mut tried: Vec<u64> = Vec::new();
    let mut sent = uncertain;
    if let (true, Some(id)) = (p.redelivered, id.as_deref()) {
        // A queue's redelivery: another node may have appended it and died
        // before acknowledging it to the queue. Then it is there already.
        match find_id(ctx, &subject, id).await {
            Ok(Some(seq)) => return Outcome::Appended { seq, last: None },
            Ok(None) => {}
            Err(why) => return Outcome::Failed { why, sent },
        }
    }
    if let Some(u) = uncertain {
        // The attempt could only have been stored as the first message after
        // the one it expected.
        match ctx.next_after(&subject, u.expected).await {
            Ok(Some(m)) => {
                if let Ok(s) = parse_headers(&m.headers) {
                    if id.is_some() && s.id == id {
                        return Outcome::Appended { seq: s.seq, last: None };
                    }
                }
                // Another message holds that slot: the attempt was not stored.
                sent = None;
            }
            // Not there (yet): it may still be, at that slot.
            Ok(None) => tried.push(u.slot),
            Err(why) => return Outcome::Failed { why, sent },
        }
    }
    let mut last = match cached {
        Some(l) => l,
        None => match ctx.last_of(&subject, true).await {
            Ok(l) => l,
            Err(why) => return Outcome::Failed { why, sent },
        },
    };
    for round in 0..MAX_CONFLICTS {
        if round >= 3 {
            // Losing again and again to another appender of this user: wait
            // a random 0–2 ms, so the two stop racing in lock step.
            let jitter = (fresh_base() ^ round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 53;
            tokio::time::sleep(Duration::from_micros(jitter)).await;
        }
        let seq = last.seq + 1;
        let headers = append_headers(seq, last, &subject, &p.key, id.as_deref());
        let attempt = Sent { slot: seq, expected: last.sseq };
        match ctx.publish(subject.clone(), headers, p.payload.clone()).await {
            Ok(ack) if !ack.duplicate => {
                return Outcome::Appended { seq, last: Some(Last { seq, sseq: ack.sequence }) };
            }
            Ok(ack) => {
                // Slot `seq` is taken, by the message at `ack.sequence`: another
                // node's, unless this message was tried at that slot before.
                if tried.contains(&seq) {
                    match ctx.by_seq(ack.sequence).await {
                        Ok(Some(m)) => match parse_headers(&m.headers) {
                            Ok(s) if id.is_some() && s.id == id => {
                                return Outcome::Appended { seq: s.seq, last: None };
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let why = LogError::Invalid(format!("{subject} at {}: {e}", ack.sequence));
                                return Outcome::Failed { why, sent };
                            }
                        },
                        Ok(None) => {}
                        Err(why) => return Outcome::Failed { why, sent },
                    }
                }
                sent = None;
                last = Last { seq, sseq: ack.sequence };
            }
            Err(PubFail::Conflict) => {
                sent = None;
                last = match ctx.last_of(&subject, false).await {
                    Ok(l) => l,
                    Err(why) => return Outcome::Failed { why, sent },
                };
            }
            Err(PubFail::Unavailable(w)) => {
                return Outcome::Failed { why: LogError::Unavailable(w), sent: Some(attempt) };
            }
            Err(PubFail::Invalid(w)) => {
                return Outcome::Failed { why: LogError::Invalid(w), sent: Some(attempt) };
            }
        }
    }
    Outcome::Failed {
        why: LogError::Invalid(format!(
            "{MAX_CONFLICTS} appends in a row refused: other nodes keep appending"
        )),
        sent,
    }
}

/// Reads `user`'s head and, with `after`, the messages after it.
async fn read(
    ctx: &Ctx,
    user: &[u8],
    after: Option<u64>,
    quick: bool,
) -> Result<(u64, Vec<Entry>), LogError> {
    if user.is_empty() {
        return Err(LogError::Invalid("empty user id".into()));
    }
    let subject = super::subject(user);
    // A quick read asks any replica (direct get: the servers share the
    // load of a burst of resumes), unless what it says cannot be the whole
    // story: nothing, or a head before the position asked about (a replica
    // that is behind). Then, and for every other read, the leader.
    let mut m = if quick { ctx.last(&subject, true).await? } else { None };
    let short = |m: &Option<StreamMessage>| match m {
        None => true,
        Some(m) => parse_headers(&m.headers).map_or(true, |s| after.is_some_and(|a| s.seq < a)),
    };
    if !quick || short(&m) {
        m = ctx.last(&subject, false).await?;
    }
    let Some(m) = m else { return Ok((0, Vec::new())) };
    let bad = |sseq: u64, e: String| LogError::Invalid(format!("{subject} at {sseq}: {e}"));
    let top = parse_headers(&m.headers).map_err(|e| bad(m.sequence, e))?;
    let head = top.seq;
    let a = match after {
        Some(a) if a < head => a,
        _ => return Ok((head, Vec::new())),
    };
    let mut prev = top.prev;
    let mut msgs = vec![Entry { seq: top.seq, key: top.key, payload: m.payload.to_vec() }];
    while msgs.len() < ctx.per_user {
        let seq = msgs[msgs.len() - 1].seq;
        if seq <= a + 1 || prev == 0 {
            break;
        }
        // Gone (the stream's limits dropped it): the read starts after it.
        let Some(m) = ctx.by_seq(prev).await? else { break };
        if m.subject.as_str() != subject {
            return Err(bad(m.sequence, format!("{H_PREV} of seq {seq} names a message of {}", m.subject)));
        }
        let s = parse_headers(&m.headers).map_err(|e| bad(m.sequence, e))?;
        if s.seq + 1 != seq {
            return Err(bad(m.sequence, format!("seq {} comes before seq {seq}", s.seq)));
        }
        prev = s.prev;
        msgs.push(Entry { seq: s.seq, key: s.key, payload: m.payload.to_vec() });
    }
    msgs.reverse();
    Ok((head, msgs))
}

/// What this node remembers of a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Appended at this seq.
    Appended(u64),
    /// Tried, unanswered.
    Uncertain(Sent),
}

/// One remembered message id.
struct Remembered {
    at: Instant,
    user: Box<[u8]>,
    fate: Fate,
}

/// Message ids of recent appends, for at most `window` and `cap` entries.
struct Seen {
    map: HashMap<Box<[u8]>, Remembered>,
    order: VecDeque<(Instant, Box<[u8]>)>,
    window: Duration,
    cap: usize,
}

impl Seen {
    fn new(window: Duration, cap: usize) -> Seen {
        Seen { map: HashMap::new(), order: VecDeque::new(), window, cap }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window && self.order.len() <= self.cap {
                break;
            }
            if let Some((at, id)) = self.order.pop_front() {
                if self.map.get(&id).is_some_and(|e| e.at == at) {
                    self.map.remove(&id);
                }
            }
        }
    }

    /// What is known of `id` for `user`.
    fn get(&mut self, id: &[u8], user: &[u8], now: Instant) -> Option<Fate> {
        self.expire(now);
        self.map.get(id).filter(|e| *e.user == *user).map(|e| e.fate)
    }

    fn put(&mut self, id: &[u8], user: &[u8], fate: Fate, now: Instant) {
        if id.is_empty() {
            return;
        }
        self.map.insert(id.into(), Remembered { at: now, user: user.into(), fate });
        self.order.push_back((now, id.into()));
        self.expire(now);
    }

    fn forget(&mut self, id: &[u8]) {
        self.map.remove(id);
    }
}

type Task<T> = Pin<Box<dyn Future<Output = T>>>;

/// The thread's state, owned by its one loop.
struct State {
    ctx: Arc<Ctx>,
    answers: Sender<Answer>,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// Users with an append in flight: its token and those waiting behind it.
    users: HashMap<Box<[u8]>, (u64, VecDeque<Pending>)>,
    cache: HashMap<Box<[u8]>, Last>,
    seen: Seen,
    /// Reads in flight (token → user), to answer them if the thread stops.
    reading: HashMap<u64, Box<[u8]>>,
    healthy: bool,
}

impl State {
    fn answer(&self, a: Answer) {
        let _ = self.answers.send(a);
        // One wake per batch, not per answer: if the channel held answers
        // already, their wake is pending, and the loop takes everything the
        // channel holds when it comes.
        if self.answers.len() == 1 {
            (self.wake)();
        }
    }

    fn health(&mut self, ok: bool) {
        if self.healthy != ok {
            self.healthy = ok;
            if ok {
                log::info!("herald durable: appends succeed again");
            } else {
                log::warn!("herald durable: the log cannot append");
            }
            self.answer(Answer::Health(ok));
        }
    }

    async fn run(mut self, mut rx: UnboundedReceiver<Request>) {
        let mut appends: FuturesUnordered<Task<Done>> = FuturesUnordered::new();
        let mut reads: FuturesUnordered<Task<Answer>> = FuturesUnordered::new();
        let mut probe: Option<Task<bool>> = None;
        let mut next_probe = tokio::time::Instant::now() + IDLE_PROBE_EVERY;
        let mut open = true;
        let mut stop_at = tokio::time::Instant::now();
        loop {
            if !open && appends.is_empty() && reads.is_empty() {
                break;
            }
            let probe_due = probe.is_none() && open;
            tokio::select! {
                r = rx.recv(), if open => match r {
                    Some(Request::Append { token, user, key, payload, msg_id, redelivered }) => {
                        let p = Pending { token, key, payload, msg_id, redelivered };
                        match self.users.get_mut(&user) {
                            Some((_, q)) => q.push_back(p),
                            None => self.begin(user, p, &mut appends),
                        }
                    }
                    Some(Request::Read { token, user, after, quick }) => {
                        self.reading.insert(token, user.clone());
                        let ctx = self.ctx.clone();
                        reads.push(Box::pin(async move {
                            match read(&ctx, &user, after, quick).await {
                                Ok((head, msgs)) => Answer::Read { token, user, head, msgs },
                                Err(why) => Answer::ReadFailed { token, user, why },
                            }
                        }));
                    }
                    None => {
                        open = false;
                        stop_at = tokio::time::Instant::now() + STOP_GRACE;
                    }
                },
                Some(d) = appends.next(), if !appends.is_empty() => self.finish(d, &mut appends),
                Some(a) = reads.next(), if !reads.is_empty() => {
                    if let Answer::Read { token, .. } | Answer::ReadFailed { token, .. } = &a {
                        self.reading.remove(token);
                    }
                    self.answer(a);
                }
                ok = poll_opt(&mut probe) => {
                    probe = None;
                    // Also while all is well, now and then: a node that
                    // publishes nothing still notices it cannot reach the
                    // log (a partition), and its clients move (§13).
                    self.health(ok);
                    let every = if self.healthy { IDLE_PROBE_EVERY } else { PROBE_EVERY };
                    next_probe = tokio::time::Instant::now() + every;
                }
                _ = tokio::time::sleep_until(next_probe), if probe_due => {
                    let ctx = self.ctx.clone();
                    probe = Some(Box::pin(async move {
                        let body = format!("herald node {} probe", ctx.node_id).into_bytes();
                        ctx.publish(HEALTH_SUBJECT.to_owned(), HeaderMap::new(), body).await.is_ok()
                    }));
                }
                _ = tokio::time::sleep_until(stop_at), if !open => break,
            }
        }
        // Whatever is left was not done in time.
        let why = || LogError::Unavailable("the log thread stopped".into());
        for (user, (token, q)) in std::mem::take(&mut self.users) {
            self.answer(Answer::NotAppended { token, user: user.clone(), why: why() });
            for p in q {
                self.answer(Answer::NotAppended { token: p.token, user: user.clone(), why: why() });
            }
        }
        for (token, user) in std::mem::take(&mut self.reading) {
            self.answer(Answer::ReadFailed { token, user, why: why() });
        }
    }

    /// Starts `p`, the user's next append (answering from memory those
    /// already appended, and going on to the next).
    fn begin(&mut self, user: Box<[u8]>, p: Pending, appends: &mut FuturesUnordered<Task<Done>>) {
        let mut queue = match self.users.remove(&user) {
            Some((_, q)) => q,
            None => VecDeque::new(),
        };
        let mut next = Some(p);
        while let Some(p) = next.take() {
            let fate =
                if p.msg_id.is_empty() { None } else { self.seen.get(&p.msg_id, &user, Instant::now()) };
            match fate {
                Some(Fate::Appended(seq)) => {
                    let Pending { token, key, payload, .. } = p;
                    self.answer(Answer::Appended { token, user: user.clone(), key, payload, seq });
                    next = queue.pop_front();
                }
                other => {
                    let uncertain = match other {
                        Some(Fate::Uncertain(s)) => Some(s),
                        _ => None,
                    };
                    let cached = self.cache.get(&user).copied();
                    self.users.insert(user.clone(), (p.token, queue));
                    appends.push(Box::pin(append(self.ctx.clone(), user, p, cached, uncertain)));
                    return;
                }
            }
        }
    }

    fn finish(&mut self, d: Done, appends: &mut FuturesUnordered<Task<Done>>) {
        let Done { user, p, outcome } = d;
        let now = Instant::now();
        let mut queue = match self.users.remove(&user) {
            Some((_, q)) => q,
            None => VecDeque::new(),
        };
        match outcome {
            Outcome::Appended { seq, last } => {
                match last {
                    Some(l) => {
                        if self.cache.len() >= CACHE_MAX {
                            self.cache.clear();
                        }
                        self.cache.insert(user.clone(), l);
                    }
                    None => {
                        self.cache.remove(&user);
                    }
                }
                self.seen.put(&p.msg_id, &user, Fate::Appended(seq), now);
                let Pending { token, key, payload, .. } = p;
                self.answer(Answer::Appended { token, user: user.clone(), key, payload, seq });
                self.health(true);
            }
            Outcome::Failed { why, sent } => {
                self.cache.remove(&user);
                match sent {
                    Some(s) => self.seen.put(&p.msg_id, &user, Fate::Uncertain(s), now),
                    None => self.seen.forget(&p.msg_id),
                }
                let unavailable = matches!(why, LogError::Unavailable(_));
                let behind = format!("an earlier message to the user was not appended: {why}");
                self.answer(Answer::NotAppended { token: p.token, user: user.clone(), why });
                if unavailable {
                    // Nothing behind it is tried: its order would not hold.
                    for q in queue.drain(..) {
                        let why = LogError::Unavailable(behind.clone());
                        self.answer(Answer::NotAppended { token: q.token, user: user.clone(), why });
                    }
                    self.health(false);
                }
            }
        }
        if let Some(next) = queue.pop_front() {
            self.users.insert(user.clone(), (next.token, queue));
            self.begin(user, next, appends);
        }
    }
}

/// Waits for `f` if there is one (else forever).
async fn poll_opt<T>(f: &mut Option<Task<T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_base_is_read_back_from_the_description() {
        let d = stream_config(&Spec::parse("jetstream://h:1/S").unwrap()).description;
        let b = epoch_base(d.as_deref()).unwrap();
        assert_ne!(b, 0);
        assert_eq!(epoch_base(Some(&format!("{EPOCH_TAG}00000000000000ff"))), Some(255));
        assert_eq!(epoch_base(Some("some other stream")), None);
        assert_eq!(epoch_base(None), None);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn append_headers_parse_back() {
        let subject = super::super::subject(b"alice");
        let h = append_headers(7, Last { seq: 6, sseq: 41 }, &subject, b"k\x00y", Some("aWQ"));
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "7.YWxpY2U");
        assert_eq!(h.get("Nats-Expected-Last-Subject-Sequence").unwrap().as_str(), "41");
        let s = parse_headers(&h).unwrap();
        assert_eq!(s, Stored { seq: 7, prev: 41, key: b"k\x00y".to_vec().into(), id: Some("aWQ".into()) });
        let first = append_headers(1, Last::default(), &subject, b"", None);
        assert_eq!(first.get("Nats-Expected-Last-Subject-Sequence").unwrap().as_str(), "0");
        assert!(first.get(H_KEY).is_none() && first.get(H_ID).is_none());
        assert_eq!(parse_headers(&first).unwrap(), Stored { seq: 1, prev: 0, key: Box::default(), id: None });
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(parse_headers(&headers(&[])).is_err());
        assert!(parse_headers(&headers(&[(H_SEQ, "1")])).is_err());
        assert!(parse_headers(&headers(&[(H_SEQ, "0"), (H_PREV, "0")])).is_err());
        assert!(parse_headers(&headers(&[(H_SEQ, "x"), (H_PREV, "0")])).is_err());
        assert!(parse_headers(&headers(&[(H_SEQ, "2"), (H_PREV, "-1")])).is_err());
        assert!(parse_headers(&headers(&[(H_SEQ, "2"), (H_PREV, "1"), (H_KEY, "a")])).is_err());
        assert!(parse_headers(&headers(&[(H_SEQ, "2"), (H_PREV, "1"), (H_KEY, "YQ")])).is_ok());
    }

    #[test]
    fn seen_expires_by_age_and_count() {
        let t0 = Instant::now();
        let mut s = Seen::new(Duration::from_secs(10), 3);
        s.put(b"a", b"u", Fate::Appended(1), t0);
        assert_eq!(s.get(b"a", b"u", t0), Some(Fate::Appended(1)));
        assert_eq!(s.get(b"a", b"other", t0), None);
        assert_eq!(s.get(b"a", b"u", t0 + Duration::from_secs(11)), None);
        for (i, id) in [b"1", b"2", b"3", b"4"].iter().enumerate() {
            s.put(*id, b"u", Fate::Appended(i as u64), t0 + Duration::from_secs(20));
        }
        let now = t0 + Duration::from_secs(20);
        assert_eq!(s.get(b"1", b"u", now), None);
        assert_eq!(s.get(b"4", b"u", now), Some(Fate::Appended(3)));
        // Putting an id again keeps the newer fate when the older entry expires.
        let sent = Sent { slot: 5, expected: 9 };
        s.put(b"4", b"u", Fate::Uncertain(sent), now + Duration::from_secs(5));
        assert_eq!(s.get(b"4", b"u", now + Duration::from_secs(12)), Some(Fate::Uncertain(sent)));
        s.put(b"", b"u", Fate::Appended(1), now);
        assert_eq!(s.get(b"", b"u", now), None);
    }

    #[test]
    fn the_stream_is_configured_as_designed() {
        let spec = Spec::parse("jetstream://h:1/LOG?replicas=3&max_age=1m&per_user=64").unwrap();
        let c = stream_config(&spec);
        assert_eq!(c.subjects, ["herald.log.>", HEALTH_SUBJECT]);
        assert_eq!((c.num_replicas, c.max_messages_per_subject), (3, 64));
        assert!(c.allow_direct);
        // The duplicate window cannot be longer than max_age.
        assert_eq!(c.duplicate_window, Duration::from_secs(60));
        let d = stream_config(&Spec::parse("jetstream://h:1").unwrap());
        assert_eq!(d.duplicate_window, DUPLICATE_WINDOW);
    }
}
