//! Messages from connectors (`--source`, [`crate::source`]), on loop 0:
//! each batch is routed like a PUBLISH_BATCH with WANT_RESULT (local
//! sessions, and every peer where the user is online, confirmed per
//! protocol.md §6.6), de-duplicated by the queue's message id
//! ([`super::dedup`]), and answered with each message's [`Fate`] once its
//! forwards are confirmed. The connector acknowledges a message to its
//! queue only then.
//!
//! A source is a requester of [`Confirms`] like a publisher connection,
//! under a connection id no connection has ([`requester`]), so its answers
//! stay in order behind its own unconfirmed batches and nobody else's.

use std::collections::VecDeque;
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::net::ConnId;
use crate::source::{Batch, Fate, Reply};

use super::confirm::{Confirms, Done};
use super::dedup::Dedup;
use super::http_publish::Gate;
use super::journal::Journal;
use super::route::Route;

/// Sources are requesters `BASE + index`: no slab key comes near it.
const BASE: usize = usize::MAX - 4096;

/// The requester id of source `index`.
pub fn requester(index: usize) -> ConnId {
    ConnId(BASE + index)
}

/// Whether `id` is a source's requester id, and which.
pub fn source_of(id: ConnId) -> Option<usize> {
    id.0.checked_sub(BASE)
}

/// Loop 0's sources.
pub struct Intake {
    /// Each source's way back (replies), by index.
    replies: Vec<Sender<Reply>>,
    /// Batches not routed yet (the mesh was behind).
    pending: VecDeque<Batch>,
    /// Per source: batches routed and waiting for confirmation, in order:
    /// (seq, which messages were redeliveries).
    held: Vec<VecDeque<(u64, Vec<bool>)>>,
    /// Ids of queue messages appended here.
    pub dedup: Dedup,
    /// Messages taken from sources.
    pub msgs: u64,
    /// Of them, redeliveries dropped as already appended here.
    pub dups: u64,
    /// Durable mode: a message with no route is kept in the log.
    pub durable: bool,
}

impl Intake {
    /// Sources answered through `replies` (index = source).
    pub fn new(replies: Vec<Sender<Reply>>, dedup: Dedup) -> Intake {
        let held = replies.iter().map(|_| VecDeque::new()).collect();
        Intake { replies, pending: VecDeque::new(), held, dedup, msgs: 0, dups: 0, durable: false }
    }

    /// A connector sent `b`.
    pub fn take(&mut self, b: Batch) {
        self.pending.push_back(b);
    }

    /// Whether batches wait for the mesh to catch up.
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Routes the batches that wait, as far as `gate` allows: all of them
    /// if open, none while busy (they wait for the next turn), and every one
    /// refused while draining (the connector hands them back to the queue).
    pub fn run(
        &mut self,
        route: &mut Route<'_>,
        confirms: &mut Confirms,
        mut journal: Option<&mut Journal>,
        gate: Gate,
        now: Instant,
    ) {
        while let Some(b) = self.pending.pop_front() {
            match gate {
                Gate::Busy => {
                    self.pending.push_front(b);
                    return;
                }
                Gate::Draining => {
                    self.reply(b.source, Reply { seq: b.seq, fates: vec![Fate::Refused; b.msgs.len()] });
                    continue;
                }
                Gate::Open => {}
            }
            if b.source >= self.replies.len() {
                continue;
            }
            if let Some(j) = journal.as_deref_mut() {
                // Durable mode: the log keeps each message once (the queue
                // id is its de-duplication id), and a redelivery comes back
                // at its first seq, which the user's node drops.
                self.msgs += b.msgs.len() as u64;
                self.held[b.source].push_back((b.seq, vec![false; b.msgs.len()]));
                let msgs = b
                    .msgs
                    .iter()
                    .map(|m| (&m.user[..], &m.key[..], &m.payload[..], &m.id[..], m.redelivered));
                for (_, d) in j.request(requester(b.source), b.seq as u32, msgs) {
                    self.done(b.source, &d);
                }
                continue;
            }
            let mut dups = Vec::with_capacity(b.msgs.len());
            let routed: Vec<(bool, Vec<ConnId>)> = b
                .msgs
                .iter()
                .map(|m| {
                    let dup = self.dedup.seen(&m.id, now);
                    let mut links = Vec::new();
                    let (local, _) =
                        route.deliver_with(&m.user, &m.key, &m.payload, true, &m.id, dup, Some(&mut links));
                    if local {
                        self.dedup.insert(&m.id, now);
                    }
                    dups.push(dup);
                    (local || dup, links)
                })
                .collect();
            self.msgs += b.msgs.len() as u64;
            self.dups += dups.iter().filter(|&&d| d).count() as u64;
            self.held[b.source].push_back((b.seq, dups));
            if let Some(d) = confirms.request(requester(b.source), b.seq as u32, routed.into_iter()) {
                self.done(b.source, &d);
            }
        }
    }

    /// The oldest held batch of `source` is confirmed: its reply.
    pub fn done(&mut self, source: usize, d: &Done) {
        let Some((seq, dups)) = self.held.get_mut(source).and_then(|h| h.pop_front()) else { return };
        if d.refused {
            // Not kept by the log: the queue gives it to us or another node again.
            self.reply(source, Reply { seq, fates: vec![Fate::Refused; dups.len()] });
            return;
        }
        let fates = d
            .routed
            .iter()
            .zip(dups)
            .map(|(&(local, forwarded), dup)| match (dup, local, forwarded) {
                (_, _, true) => Fate::Forwarded,
                (true, _, _) => Fate::Duplicate,
                (_, true, _) => Fate::Local,
                _ if self.durable => Fate::Kept,
                _ => Fate::NoRoute,
            })
            .collect();
        self.reply(source, Reply { seq, fates });
    }

    fn reply(&self, source: usize, r: Reply) {
        if let Some(tx) = self.replies.get(source) {
            // A connector that has gone does not read replies; nothing to do.
            let _ = tx.send(r);
        }
    }
}
