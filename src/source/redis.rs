//! The Redis Streams connector (`--source redis://HOST:PORT/KEY?...`): a
//! consumer group on the stream KEY that every node with this source shares,
//! each node one consumer in it (its node id, or `name=`), so each entry goes
//! to one node, which routes it through the mesh like a confirmed publish
//! (protocol.md §12.2).
//!
//! It runs on a thread of its own with redis-rs's synchronous connection:
//! no async runtime. One loop reads new entries (`XREADGROUP ... BLOCK`, a
//! short block so that the node's answers are acknowledged promptly between
//! reads), hands them to the node, and `XACK`s each entry once the node has
//! taken it ([`super::Fate`]), one `XACK` for all the ids answered since the
//! last. Refused entries (the node is draining) and, with `no_route=retry`,
//! unroutable ones stay pending. Every `ack_wait`/2 it runs `XAUTOCLAIM`:
//! entries pending longer than `ack_wait` with any consumer (a node that
//! died, or this one's own unanswered ones) are claimed and handed to the
//! node like new ones; the node that appended one the first time drops the
//! copy (its id is `redis:KEY:ENTRY-ID`, [`crate::node`]'s de-duplication).
//! Malformed entries go to `dead_letter` (their fields plus `herald_error`
//! and `herald_id`) and are acknowledged, or are acknowledged and logged.
//!
//! Replies are parsed here from redis-rs's raw [`Value`]s rather than its
//! typed stream replies, which want field names in UTF-8: an entry with a
//! binary field name is an entry like any other, never a reply that cannot
//! be read (and so never a stalled consumer).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, TryRecvError};
use redis::{Commands, Connection, IntoConnectionInfo, Value};

use super::{map, Batch, Intake, Malformed, Reply, Spec};

/// How long one `XREADGROUP` waits for new entries: the longest a node's
/// answer waits to be acknowledged while the stream is idle.
const BLOCK: Duration = Duration::from_millis(25);
/// Connecting, and any one command's reply, at most this long.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many ids in one `XACK`.
const ACK_CHUNK: usize = 1024;

/// Why a session with the server ended.
#[derive(Debug)]
pub enum Error {
    /// The connection or a command failed.
    Redis(redis::RedisError),
    /// The server answered something this connector does not understand.
    Reply(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Redis(e) => write!(f, "{e}"),
            Error::Reply(what) => write!(f, "unexpected reply: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Error {
        Error::Redis(e)
    }
}

/// Runs the connector until `stop` (then acknowledges what the node still
/// answers, for at most 5 s, and returns).
pub fn run(spec: Spec, intake: Intake, stop: Arc<AtomicBool>) {
    let name = spec.name.clone().unwrap_or_else(|| intake.node_id.clone());
    let mut c = Connector {
        claim_every: (spec.ack_wait / 2).max(Duration::from_millis(50)),
        spec,
        intake,
        name,
        held: VecDeque::new(),
        mine: HashSet::new(),
        in_flight: 0,
        seq: 0,
        acks: Vec::new(),
        bad: 0,
        cursor: "0-0".into(),
        claim_at: Instant::now(),
        connected: false,
        gone: false,
    };
    let mut backoff = Duration::from_millis(100);
    let mut last: Option<String> = None;
    let mut conn = None;
    while !stop.load(Ordering::SeqCst) && !c.gone {
        match c.session(&stop) {
            Ok(kept) => {
                conn = Some(kept);
                break;
            }
            Err(e) => {
                if std::mem::take(&mut c.connected) {
                    // It was up: a new outage, logged afresh, retried soon.
                    backoff = Duration::from_millis(100);
                    last = None;
                }
                let text = e.to_string();
                if last.as_deref() != Some(text.as_str()) {
                    log::warn!(
                        "herald source {}: {text}; reconnecting in {backoff:?} (then doubling, up to 2s)",
                        c.spec.url
                    );
                    last = Some(text);
                }
                c.wait(backoff, &stop);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    c.finish(conn);
}

struct Connector {
    spec: Spec,
    intake: Intake,
    /// This node's consumer name in the group.
    name: String,
    /// Batches handed to the node, in order: (seq, their entry ids).
    held: VecDeque<(u64, Vec<String>)>,
    /// The ids in `held` (a claimed or re-read entry the node has not
    /// answered yet is not handed to it again).
    mine: HashSet<String>,
    in_flight: usize,
    seq: u64,
    /// Entry ids the node has taken, not yet acknowledged to the server.
    acks: Vec<String>,
    /// Malformed entries so far (the log is thinned after the first few).
    bad: u64,
    /// Where the current `XAUTOCLAIM` scan of the pending entries is.
    cursor: String,
    /// When the next scan starts.
    claim_at: Instant,
    claim_every: Duration,
    /// A session got as far as consuming since the last error.
    connected: bool,
    /// The node has gone (its reply channel is closed).
    gone: bool,
}

impl Connector {
    /// Connects, with the timeouts and no Nagle delay.
    fn connect(&self) -> Result<Connection, Error> {
        let info = format!("redis://{}/", self.spec.server)
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let conn = redis::Client::open(info)?.get_connection_with_timeout(IO_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(conn)
    }

    /// One connection's worth: connect, make sure the group exists, take up
    /// this consumer's own pending entries, then read, claim and acknowledge
    /// until stopped (Ok, with the connection for [`Connector::finish`]) or
    /// until anything fails (Err).
    fn session(&mut self, stop: &AtomicBool) -> Result<Connection, Error> {
        let mut conn = self.connect()?;
        // At 0, not `$`: entries written before the first node started are
        // delivered too.
        match conn.xgroup_create_mkstream::<_, _, _, ()>(&self.spec.stream, &self.spec.group, "0") {
            Ok(()) => log::info!(
                "herald source {}: created consumer group {} on {}",
                self.spec.url,
                self.spec.group,
                self.spec.stream
            ),
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e.into()),
        }
        self.flush(&mut conn)?;
        self.own_pending(&mut conn)?;
        log::info!(
            "herald source {}: consuming {} in group {} as {}",
            self.spec.url,
            self.spec.stream,
            self.spec.group,
            self.name
        );
        self.connected = true;
        loop {
            if stop.load(Ordering::SeqCst) || self.gone {
                return Ok(conn);
            }
            self.answers();
            self.flush(&mut conn)?;
            if self.room() == 0 {
                // The node has all it may hold: wait for its answers.
                self.answer_within(Duration::from_millis(50));
                continue;
            }
            if Instant::now() >= self.claim_at {
                self.claim(&mut conn)?;
                continue;
            }
            let v: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.spec.group)
                .arg(&self.name)
                .arg("COUNT")
                .arg(self.room().min(self.spec.batch))
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.spec.stream)
                .arg(">")
                .query(&mut conn)?;
            let entries = read_reply(v)?;
            self.hand(&mut conn, entries, false)?;
        }
    }

    /// Messages the node may still be handed.
    fn room(&self) -> usize {
        self.spec.in_flight.saturating_sub(self.in_flight)
    }

    /// Entries this consumer was delivered before (by a connection that
    /// failed, or by this node before a restart under the same name) and
    /// has not acknowledged: handed again now, not after `ack_wait`.
    fn own_pending(&mut self, conn: &mut Connection) -> Result<(), Error> {
        let mut after = "0".to_owned();
        while self.room() > 0 {
            let v: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.spec.group)
                .arg(&self.name)
                .arg("COUNT")
                .arg(self.room().min(self.spec.batch))
                .arg("STREAMS")
                .arg(&self.spec.stream)
                .arg(&after)
                .query(conn)?;
            let entries = read_reply(v)?;
            let Some(last) = entries.last() else { return Ok(()) };
            after = last.id.clone();
            self.hand(conn, entries, true)?;
        }
        Ok(())
    }

    /// One step of the `XAUTOCLAIM` scan: entries idle over `ack_wait` with
    /// any consumer of the group become this one's and go to the node.
    fn claim(&mut self, conn: &mut Connection) -> Result<(), Error> {
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.spec.stream)
            .arg(&self.spec.group)
            .arg(&self.name)
            .arg(self.spec.ack_wait.as_millis() as u64)
            .arg(&self.cursor)
            .arg("COUNT")
            .arg(self.room().min(self.spec.batch))
            .query(conn)?;
        let (next, entries) = claim_reply(v)?;
        if !entries.is_empty() {
            log::debug!("herald source {}: claimed {} pending entries", self.spec.url, entries.len());
        }
        self.cursor = next;
        if self.cursor == "0-0" {
            // The scan is done; the next one in a while.
            self.claim_at = Instant::now() + self.claim_every;
        }
        self.hand(conn, entries, true)
    }

    /// Maps `entries` and hands the good ones to the node as one batch.
    /// `redelivered`: they were handed out before (this consumer's own
    /// pending entries, or claimed ones).
    fn hand(&mut self, conn: &mut Connection, entries: Vec<Entry>, redelivered: bool) -> Result<(), Error> {
        let mut ids = Vec::with_capacity(entries.len());
        let mut msgs = Vec::with_capacity(entries.len());
        let mut failed = Ok(());
        for e in entries {
            if failed.is_err() {
                // Not handed: stays pending, claimed again after `ack_wait`.
                break;
            }
            let Some(fields) = &e.fields else {
                // Deleted from the stream while pending: nothing to deliver.
                self.acks.push(e.id);
                continue;
            };
            if self.mine.contains(&e.id) {
                continue;
            }
            let id = format!("redis:{}:{}", self.spec.stream, e.id);
            let data = field(fields, b"data").unwrap_or(b"");
            match map(field(fields, b"user"), field(fields, b"key"), data, id.as_bytes()) {
                Ok(mut m) => {
                    m.redelivered = redelivered;
                    msgs.push(m);
                    self.mine.insert(e.id.clone());
                    ids.push(e.id);
                }
                Err(why) => failed = self.malformed(conn, &e, why),
            }
        }
        if msgs.is_empty() {
            return failed;
        }
        self.seq += 1;
        self.in_flight += msgs.len();
        if (self.intake.send)(Batch { source: 0, seq: self.seq, msgs }) {
            self.held.push_back((self.seq, ids));
        } else {
            // The node has stopped: these stay pending (claimed elsewhere).
            self.in_flight -= ids.len();
            for id in &ids {
                self.mine.remove(id);
            }
            self.gone = true;
        }
        failed
    }

    /// A malformed entry: to the dead-letter stream (then acknowledged), or
    /// acknowledged; logged either way (thinned).
    fn malformed(&mut self, conn: &mut Connection, e: &Entry, why: Malformed) -> Result<(), Error> {
        self.bad += 1;
        if self.bad <= 10 || self.bad.is_multiple_of(1000) {
            log::warn!(
                "herald source {}: message {} on {} dropped: {why} ({} malformed so far){}",
                self.spec.url,
                e.id,
                self.spec.stream,
                self.bad,
                self.spec.dead_letter.as_ref().map(|d| format!("; sent to {d}")).unwrap_or_default()
            );
        }
        if let Some(dl) = &self.spec.dead_letter {
            let why = why.to_string();
            let mut items: Vec<(&[u8], &[u8])> = e.pairs().collect();
            items.push((b"herald_error", why.as_bytes()));
            items.push((b"herald_id", e.id.as_bytes()));
            if let Err(err) = conn.xadd::<_, _, _, _, Option<String>>(dl, "*", &items) {
                if err.is_io_error() || err.is_unrecoverable_error() {
                    return Err(err.into());
                }
                // The server refused it (the key is not a stream, say): the
                // entry stays pending and is tried again after `ack_wait`.
                log::warn!("herald source {}: cannot dead-letter {} to {dl}: {err}", self.spec.url, e.id);
                return Ok(());
            }
        }
        self.acks.push(e.id.clone());
        Ok(())
    }

    /// The node answered a batch: its taken entries are to be acknowledged.
    fn answered(&mut self, r: Reply) {
        let Some(at) = self.held.iter().position(|(s, _)| *s == r.seq) else { return };
        let Some((_, ids)) = self.held.remove(at) else { return };
        self.in_flight = self.in_flight.saturating_sub(ids.len());
        for (id, fate) in ids.into_iter().zip(r.fates) {
            self.mine.remove(&id);
            if fate.taken(self.spec.no_route) {
                self.acks.push(id);
            }
            // Otherwise it stays pending: claimed again after `ack_wait`.
        }
    }

    /// Takes every answer that is ready.
    fn answers(&mut self) {
        loop {
            match self.intake.replies.try_recv() {
                Ok(r) => self.answered(r),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.gone = true;
                    return;
                }
            }
        }
    }

    /// Waits up to `d` for an answer, then takes every one that is ready.
    fn answer_within(&mut self, d: Duration) {
        match self.intake.replies.recv_timeout(d) {
            Ok(r) => {
                self.answered(r);
                self.answers();
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.gone = true,
        }
    }

    /// Acknowledges what the node has taken (kept for the next connection if
    /// this one fails: ids are all `XACK` needs).
    fn flush(&mut self, conn: &mut Connection) -> Result<(), Error> {
        while !self.acks.is_empty() {
            let n = self.acks.len().min(ACK_CHUNK);
            let _: usize =
                conn.xack::<_, _, _, usize>(&self.spec.stream, &self.spec.group, &self.acks[..n])?;
            self.acks.drain(..n);
        }
        Ok(())
    }

    /// Sleeps `d` (the backoff), still taking the node's answers.
    fn wait(&mut self, d: Duration, stop: &AtomicBool) {
        let until = Instant::now() + d;
        while !stop.load(Ordering::SeqCst) && !self.gone {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.answer_within(left.min(Duration::from_millis(100)));
        }
    }

    /// Stopping: takes what the node still answers, for up to 5 s, and
    /// acknowledges it (on `conn`, or a new connection).
    fn finish(&mut self, conn: Option<Connection>) {
        let until = Instant::now() + Duration::from_secs(5);
        while !self.held.is_empty() && !self.gone {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.answer_within(left);
        }
        self.answers();
        if self.acks.is_empty() {
            return;
        }
        let r = match conn {
            Some(mut c) => self.flush(&mut c),
            None => self.connect().and_then(|mut c| self.flush(&mut c)),
        };
        if let Err(e) = r {
            log::warn!(
                "herald source {}: {} entries left unacknowledged at stop ({e}); they will be claimed again",
                self.spec.url,
                self.acks.len()
            );
        }
    }
}

/// One stream entry as read: its id and its fields (`[name, value, ...]`),
/// or none if it was deleted while pending.
#[derive(Debug)]
struct Entry {
    id: String,
    fields: Option<Vec<Value>>,
}

impl Entry {
    /// Its fields as (name, value) pairs; ones that are not strings are left out.
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .as_deref()
            .unwrap_or(&[])
            .chunks_exact(2)
            .filter_map(|p| Some((bytes(&p[0])?, bytes(&p[1])?)))
    }
}

/// The value of field `name` (the first, if it repeats).
fn field<'a>(fields: &'a [Value], name: &[u8]) -> Option<&'a [u8]> {
    fields.chunks_exact(2).find(|p| bytes(&p[0]) == Some(name)).and_then(|p| bytes(&p[1]))
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// An `XREADGROUP` reply: nil (nothing new), or per stream `[key, entries]`
/// (RESP2) or a map of them (RESP3). One stream is read, so all entries are
/// its.
fn read_reply(v: Value) -> Result<Vec<Entry>, Error> {
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(s) => s
            .into_iter()
            .map(|kv| match kv {
                Value::Array(mut kv) if kv.len() == 2 => Ok(kv.pop().unwrap_or_default()),
                _ => Err(Error::Reply("XREADGROUP: a stream that is not [key, entries]")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Value::Map(m) => m.into_iter().map(|(_, e)| e).collect(),
        _ => return Err(Error::Reply("XREADGROUP: neither nil nor streams")),
    };
    let mut out = Vec::new();
    for s in streams {
        out.extend(entries(s)?);
    }
    Ok(out)
}

/// An `XAUTOCLAIM` reply: `[next cursor, entries]`, and since Redis 7 the
/// ids of pending entries that no longer exist (the server has already
/// removed them from the pending list; nothing to do).
fn claim_reply(v: Value) -> Result<(String, Vec<Entry>), Error> {
    let Value::Array(parts) = v else { return Err(Error::Reply("XAUTOCLAIM: not an array")) };
    let mut parts = parts.into_iter();
    let next = text(parts.next()).ok_or(Error::Reply("XAUTOCLAIM: no cursor"))?;
    let claimed = entries(parts.next().unwrap_or(Value::Array(Vec::new())))?;
    Ok((next, claimed))
}

/// A reply element that is UTF-8 text (a cursor, an entry id).
fn text(v: Option<Value>) -> Option<String> {
    v.as_ref().and_then(bytes).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_owned)
}

/// A list of entries, each `[id, [field, value, ...]]`; a nil in place of
/// the fields (or of the whole entry, Redis 6.2's XAUTOCLAIM) is an entry
/// deleted while pending.
fn entries(v: Value) -> Result<Vec<Entry>, Error> {
    let list = match v {
        Value::Array(l) => l,
        Value::Nil => return Ok(Vec::new()),
        _ => return Err(Error::Reply("entries that are not a list")),
    };
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let Value::Array(e) = e else {
            if e == Value::Nil {
                continue;
            }
            return Err(Error::Reply("an entry that is not [id, fields]"));
        };
        let mut e = e.into_iter();
        let id = text(e.next()).ok_or(Error::Reply("an entry without an id"))?;
        let fields = match e.next() {
            Some(Value::Array(f)) => Some(f),
            Some(Value::Map(m)) => Some(m.into_iter().flat_map(|(k, v)| [k, v]).collect()),
            _ => None,
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn read_replies_parse_with_binary_fields_and_deleted_entries() {
        assert!(read_reply(Value::Nil).unwrap().is_empty());
        let v = Value::Array(vec![Value::Array(vec![
            bulk(b"events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![
                        bulk(b"user"),
                        bulk(b"alice"),
                        bulk(b"\xff\xfe"),
                        bulk(b"x"),
                        bulk(b"data"),
                        bulk(b"\x00hi"),
                    ]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let e = read_reply(v).unwrap();
        assert_eq!(e.len(), 2);
        let f = e[0].fields.as_deref().unwrap();
        assert_eq!(
            (field(f, b"user"), field(f, b"data"), field(f, b"key")),
            (Some(&b"alice"[..]), Some(&b"\x00hi"[..]), None)
        );
        assert_eq!(e[0].pairs().count(), 3);
        assert_eq!((e[1].id.as_str(), e[1].fields.is_none()), ("2-0", true));
        assert!(read_reply(Value::Int(3)).is_err());
    }

    #[test]
    fn autoclaim_replies_parse_with_and_without_the_deleted_ids() {
        let entry = Value::Array(vec![bulk(b"5-1"), Value::Array(vec![bulk(b"user"), bulk(b"bob")])]);
        for v in [
            Value::Array(vec![
                bulk(b"0-0"),
                Value::Array(vec![entry.clone()]),
                Value::Array(vec![bulk(b"4-0")]),
            ]),
            Value::Array(vec![bulk(b"0-0"), Value::Array(vec![entry.clone(), Value::Nil])]),
        ] {
            let (next, e) = claim_reply(v).unwrap();
            assert_eq!((next.as_str(), e.len(), e[0].id.as_str()), ("0-0", 1, "5-1"));
        }
        assert!(claim_reply(Value::Nil).is_err());
    }
}
