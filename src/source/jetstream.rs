//! The NATS JetStream connector (`--source jetstream://HOST:PORT/STREAM?...`):
//! a durable pull consumer that every node with this source shares, so each
//! stream message goes to one node, which routes it through the mesh like a
//! confirmed publish (protocol.md §12.1).
//!
//! NATS's own client (`async-nats`) runs here on a current-thread tokio
//! runtime: this thread is the only one with an async runtime in the node.
//! A message is acknowledged once the node has answered it ([`super::Fate`]):
//! taken messages are ACKed, refused ones (the node is draining) NAKed for
//! another node at once, no-route ones ACKed or NAKed after `ack_wait`
//! (`no_route=`), malformed ones published to `dead_letter` and ACKed, or
//! TERMed, and logged. A message this node had taken but not acknowledged
//! when it died is redelivered by the server after `ack_wait` to another
//! node; the node that appended it the first time drops the copy (its id is
//! `js:STREAM:SEQ`, [`crate::node`]'s de-duplication).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use futures_util::StreamExt;

use super::{map, Batch, Fate, Intake, Malformed, Reply, Spec};

/// Runs the connector until `stop` (then answers what is in flight, for at
/// most a few seconds, and returns).
pub fn run(spec: Spec, intake: Intake, stop: Arc<AtomicBool>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("herald source {}: cannot start its runtime: {e}", spec.url);
            return;
        }
    };
    // The node answers on a crossbeam channel (it must never block on an
    // async one); a plain thread carries the answers over.
    let (tx, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let from_node = intake.replies.clone();
    let _ = std::thread::Builder::new().name("herald-js-acks".into()).spawn(move || {
        while let Ok(r) = from_node.recv() {
            if tx.send(r).is_err() {
                return;
            }
        }
    });
    rt.block_on(async {
        let mut c = Connector { spec, intake, held: VecDeque::new(), in_flight: 0, seq: 0, bad: 0 };
        let mut backoff = Duration::from_millis(100);
        while !stop.load(Ordering::SeqCst) {
            let began = std::time::Instant::now();
            match c.session(&mut replies, &stop).await {
                Ok(()) => break,
                Err(e) => {
                    if began.elapsed() > Duration::from_secs(10) {
                        // It had been working: the first retry comes soon.
                        backoff = Duration::from_millis(100);
                    }
                    log::warn!("herald source {}: {e}; again in {backoff:?}", c.spec.url);
                    c.wait(&mut replies, backoff, &stop).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        c.finish(&mut replies).await;
    });
}

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Connector {
    spec: Spec,
    intake: Intake,
    /// Batches handed to the node, in order: (seq, their messages).
    held: VecDeque<(u64, Vec<jetstream::Message>)>,
    in_flight: usize,
    seq: u64,
    /// Malformed messages so far (the log is thinned after the first few).
    bad: u64,
}

impl Connector {
    /// One connection's worth: connect, bind the consumer, pull until
    /// stopped (Ok) or the connection fails (Err).
    async fn session(
        &mut self,
        replies: &mut tokio::sync::mpsc::UnboundedReceiver<Reply>,
        stop: &AtomicBool,
    ) -> Result<(), Error> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("herald node {}", self.intake.node_id))
            .connection_timeout(Duration::from_secs(2))
            .connect(self.spec.server.as_str())
            .await?;
        let js = jetstream::new(client.clone());
        let stream = match js.get_stream(&self.spec.stream).await {
            Ok(s) => s,
            Err(_) => {
                log::info!(
                    "herald source {}: creating stream {} for subjects {}",
                    self.spec.url,
                    self.spec.stream,
                    self.spec.subject
                );
                js.get_or_create_stream(jetstream::stream::Config {
                    name: self.spec.stream.clone(),
                    subjects: vec![self.spec.subject.clone()],
                    // A queue: a message is removed once acknowledged.
                    retention: jetstream::stream::RetentionPolicy::WorkQueue,
                    ..Default::default()
                })
                .await?
            }
        };
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.spec.group,
                pull::Config {
                    durable_name: Some(self.spec.group.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.spec.ack_wait,
                    max_deliver: self.spec.max_deliver,
                    filter_subject: self.spec.subject.clone(),
                    max_ack_pending: 65_536,
                    ..Default::default()
                },
            )
            .await?;
        let mut msgs = consumer
            .stream()
            .max_messages_per_batch(self.spec.batch)
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        log::info!("herald source {}: consuming as {}", self.spec.url, self.spec.group);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            tokio::select! {
                r = replies.recv() => match r {
                    Some(r) => self.answered(r).await,
                    None => return Ok(()),
                },
                m = msgs.next(), if self.in_flight < self.spec.in_flight => match m {
                    Some(Ok(m)) => {
                        let mut got = vec![m];
                        // Whatever else is ready, up to a batch.
                        while got.len() < self.spec.batch {
                            match tokio::time::timeout(Duration::ZERO, msgs.next()).await {
                                Ok(Some(Ok(m))) => got.push(m),
                                Ok(Some(Err(e))) => {
                                    self.hand(&client, got).await;
                                    return Err(e.into());
                                }
                                _ => break,
                            }
                        }
                        self.hand(&client, got).await;
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("the message stream ended".into()),
                },
                _ = tick.tick() => {}
            }
        }
    }

    /// Maps `got` and hands the good ones to the node as one batch.
    async fn hand(&mut self, client: &async_nats::Client, got: Vec<jetstream::Message>) {
        let prefix = self.spec.subject_prefix().to_owned();
        let mut keep = Vec::with_capacity(got.len());
        let mut batch = Vec::with_capacity(got.len());
        for m in got {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let id = format!("js:{}:{seq}", self.spec.stream);
            let header =
                |name: &str| m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().as_bytes());
            let user = header("Herald-User")
                .or_else(|| m.subject.as_str().strip_prefix(prefix.as_str()).map(str::as_bytes));
            let redelivered = m.info().is_ok_and(|i| i.delivered > 1);
            match map(user, header("Herald-Key"), &m.payload, id.as_bytes()) {
                Ok(mut msg) => {
                    msg.redelivered = redelivered;
                    batch.push(msg);
                    keep.push(m);
                }
                Err(why) => self.malformed(client, m, why).await,
            }
        }
        if batch.is_empty() {
            return;
        }
        self.seq += 1;
        self.in_flight += batch.len();
        let b = Batch { source: 0, seq: self.seq, msgs: batch };
        self.held.push_back((self.seq, keep));
        if !(self.intake.send)(b) {
            // The node has stopped: these stay unacknowledged (redelivered).
            if let Some((_, msgs)) = self.held.pop_back() {
                self.in_flight = self.in_flight.saturating_sub(msgs.len());
            }
        }
    }

    /// A malformed message: to the dead-letter subject (then ACK), or TERM.
    async fn malformed(&mut self, client: &async_nats::Client, m: jetstream::Message, why: Malformed) {
        self.bad += 1;
        if self.bad <= 10 || self.bad.is_multiple_of(1000) {
            log::warn!(
                "herald source {}: message on {} dropped: {why} ({} malformed so far){}",
                self.spec.url,
                m.subject,
                self.bad,
                self.spec.dead_letter.as_ref().map(|d| format!("; sent to {d}")).unwrap_or_default()
            );
        }
        let kind = match &self.spec.dead_letter {
            Some(dl) => {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Herald-Error", why.to_string().as_str());
                h.insert("Herald-Subject", m.subject.as_str());
                match client.publish_with_headers(dl.clone(), h, m.payload.clone()).await {
                    Ok(()) => AckKind::Ack,
                    // Not dead-lettered: leave it to be delivered again.
                    Err(_) => AckKind::Nak(Some(self.spec.ack_wait)),
                }
            }
            None => AckKind::Term,
        };
        let _ = m.ack_with(kind).await;
    }

    /// The node answered a batch: acknowledge each message as its fate says.
    async fn answered(&mut self, r: Reply) {
        let Some(at) = self.held.iter().position(|(s, _)| *s == r.seq) else { return };
        let Some((_, msgs)) = self.held.remove(at) else { return };
        self.in_flight = self.in_flight.saturating_sub(msgs.len());
        for (m, fate) in msgs.iter().zip(r.fates) {
            let kind = match fate {
                f if f.taken(self.spec.no_route) => AckKind::Ack,
                Fate::NoRoute => AckKind::Nak(Some(self.spec.ack_wait)),
                _ => AckKind::Nak(None),
            };
            let _ = m.ack_with(kind).await;
        }
    }

    /// Sleeps `d`, still acknowledging what the node answers.
    async fn wait(
        &mut self,
        replies: &mut tokio::sync::mpsc::UnboundedReceiver<Reply>,
        d: Duration,
        stop: &AtomicBool,
    ) {
        let until = tokio::time::Instant::now() + d;
        while !stop.load(Ordering::SeqCst) {
            tokio::select! {
                r = replies.recv() => match r { Some(r) => self.answered(r).await, None => return },
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }

    /// Stopping: acknowledges what the node still answers, for up to 5 s.
    async fn finish(&mut self, replies: &mut tokio::sync::mpsc::UnboundedReceiver<Reply>) {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.held.is_empty() {
            tokio::select! {
                r = replies.recv() => match r { Some(r) => self.answered(r).await, None => return },
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}
