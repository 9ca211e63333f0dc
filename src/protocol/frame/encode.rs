//! Encoding: [`Frame::encode`] for every frame type, and the hot-path
//! encoders that skip building a [`Frame`] ([`encode_deliver`],
//! [`encode_publish`], [`encode_forward`], [`BatchWriter`]).

use byteorder::{BigEndian, ByteOrder};

use crate::protocol::channel::ty;
use crate::protocol::limits::*;
use crate::protocol::{sign, MAGIC};

use super::entries::{BatchEntry, Entry, List};
use super::types::{Frame, HELLO_RESUME};
use super::wire::{begin, end, put_str16, put_str8, put_u16, put_u32, put_u64, HEADER_LEN};

/// The encoded size of a DELIVER frame with a payload of `payload_len` bytes.
pub const fn deliver_len(payload_len: usize) -> usize {
    HEADER_LEN + 16 + payload_len
}

/// Appends a DELIVER frame: the hot path, one reserve and four copies.
#[inline]
pub fn encode_deliver(out: &mut Vec<u8>, epoch: u64, seq: u64, payload: &[u8]) {
    out.reserve(deliver_len(payload.len()));
    let mut h = [0u8; HEADER_LEN + 16];
    BigEndian::write_u32(&mut h[0..4], (1 + 16 + payload.len()) as u32);
    h[4] = ty::DELIVER;
    BigEndian::write_u64(&mut h[5..13], epoch);
    BigEndian::write_u64(&mut h[13..21], seq);
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
}

/// Appends a PUBLISH frame without building a [`Publish`](super::Publish).
#[inline]
pub fn encode_publish(
    out: &mut Vec<u8>,
    flags: u8,
    request_id: u32,
    user: &[u8],
    key: &[u8],
    payload: &[u8],
) {
    out.reserve(HEADER_LEN + 7 + user.len() + key.len() + payload.len());
    let at = begin(out, ty::PUBLISH);
    out.push(flags);
    put_u32(out, request_id);
    put_str8(out, user);
    put_str8(out, key);
    out.extend_from_slice(payload);
    end(out, at);
}

/// Appends a FORWARD frame.
#[inline]
///
/// A non-empty `id` sets [`super::FORWARD_ID`] and follows the key (send it
/// only on a link of protocol version 2, protocol.md §6.5).
pub fn encode_forward(out: &mut Vec<u8>, user: &[u8], key: &[u8], id: &[u8], payload: &[u8]) {
    out.reserve(HEADER_LEN + 4 + user.len() + key.len() + id.len() + payload.len());
    let at = begin(out, ty::FORWARD);
    out.push(if id.is_empty() { 0 } else { super::types::FORWARD_ID });
    put_str8(out, user);
    put_str8(out, key);
    if !id.is_empty() {
        put_str8(out, id);
    }
    out.extend_from_slice(payload);
    end(out, at);
}

/// Appends a FORWARD frame with flag SEQ: `seq` is the message's seq in
/// the user's durable stream (protocol.md §6.5, §13).
#[inline]
pub fn encode_forward_seq(out: &mut Vec<u8>, user: &[u8], key: &[u8], seq: u64, payload: &[u8]) {
    out.reserve(HEADER_LEN + 12 + user.len() + key.len() + payload.len());
    let at = begin(out, ty::FORWARD);
    out.push(super::types::FORWARD_SEQ);
    put_str8(out, user);
    put_str8(out, key);
    put_u64(out, seq);
    out.extend_from_slice(payload);
    end(out, at);
}

/// Builds a PUBLISH_BATCH in place: `start`, `push` entries, `finish`.
pub struct BatchWriter {
    at: usize,
    count_at: usize,
    count: u16,
}

impl BatchWriter {
    /// Starts a batch frame at the end of `out`.
    pub fn start(out: &mut Vec<u8>, flags: u8, request_id: u32) -> BatchWriter {
        let at = begin(out, ty::PUBLISH_BATCH);
        out.push(flags);
        put_u32(out, request_id);
        let count_at = out.len();
        put_u16(out, 0);
        BatchWriter { at, count_at, count: 0 }
    }
    /// Appends one entry. Returns false (and appends nothing) when the batch
    /// already has [`MAX_BATCH`] entries or the entry would take the frame over
    /// [`MAX_INGEST`].
    pub fn push(&mut self, out: &mut Vec<u8>, user: &[u8], key: &[u8], payload: &[u8]) -> bool {
        let add = 1 + user.len() + 1 + key.len() + 4 + payload.len();
        if self.count as usize >= MAX_BATCH || out.len() - self.at - 4 + add > MAX_INGEST as usize {
            return false;
        }
        BatchEntry { user, key, payload }.write(out);
        self.count += 1;
        true
    }
    /// Entries so far.
    pub fn count(&self) -> u16 {
        self.count
    }
    /// Completes the frame.
    pub fn finish(self, out: &mut [u8]) {
        BigEndian::write_u16(&mut out[self.count_at..self.count_at + 2], self.count);
        end(out, self.at);
    }
}

fn put_list<'a, E: Entry<'a>>(out: &mut Vec<u8>, l: &List<'a, E>) {
    out.extend_from_slice(l.as_bytes());
}

impl<'a> Frame<'a> {
    /// Appends the frame's wire form to `out`.
    ///
    /// ADMIN and HEARTBEAT are signed: this writes an all-zero tag. Use
    /// [`Frame::encode_signed`] for those.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_inner(out, None)
    }

    /// Like [`Frame::encode`], and for ADMIN and HEARTBEAT computes the
    /// HMAC-SHA256 tag under `key` (protocol.md §2.5).
    pub fn encode_signed(&self, out: &mut Vec<u8>, key: &[u8]) {
        self.encode_inner(out, Some(key))
    }

    fn encode_inner(&self, out: &mut Vec<u8>, key: Option<&[u8]>) {
        if let Frame::Deliver(d) = self {
            return encode_deliver(out, d.epoch, d.seq, d.payload);
        }
        let at = begin(out, self.frame_type());
        match self {
            Frame::Hello(h) => {
                put_u32(out, MAGIC);
                out.push(h.min_version);
                out.push(h.max_version);
                out.push(if h.resume.is_some() { HELLO_RESUME } else { 0 });
                put_str16(out, h.token);
                put_str8(out, h.agent);
                let p = h.resume.unwrap_or_default();
                put_u64(out, p.epoch);
                put_u64(out, p.seq);
            }
            Frame::Ping(n) | Frame::Pong(n) => put_u64(out, *n),
            Frame::Welcome(w) => {
                out.push(w.version);
                out.push(w.resume.to_u8());
                put_u32(out, w.heartbeat_ms);
                put_u64(out, w.session_id);
                put_u64(out, w.epoch);
                put_u64(out, w.next_seq);
                put_str8(out, w.node_id);
            }
            Frame::Deliver(_) => {}
            Frame::Conflated(c) => {
                put_u64(out, c.epoch);
                put_u64(out, c.first_seq);
                put_u64(out, c.last_seq);
                out.push(c.keys.len() as u8);
                out.extend_from_slice(c.keys.as_bytes());
            }
            Frame::Goodbye(g) => {
                put_u16(out, g.reason.to_u16());
                out.push(g.action.to_u8());
                put_u32(out, g.delay_ms);
                put_str8(out, g.target);
            }
            Frame::Error(e) => {
                put_u16(out, e.code.to_u16());
                put_str16(out, &e.message[..e.message.len().min(MAX_ERROR_MESSAGE_LEN)]);
            }
            Frame::PubHello(p) => {
                put_u32(out, MAGIC);
                out.push(p.min_version);
                out.push(p.max_version);
                out.push(0);
                put_str16(out, p.credential);
                put_str8(out, p.agent);
            }
            Frame::PubWelcome(p) => {
                out.push(p.version);
                put_u32(out, p.max_frame);
                put_str8(out, p.node_id);
            }
            Frame::Publish(p) => {
                out.push(p.flags);
                put_u32(out, p.request_id);
                put_str8(out, p.user);
                put_str8(out, p.key);
                out.extend_from_slice(p.payload);
            }
            Frame::PublishBatch(b) => {
                out.push(b.flags);
                put_u32(out, b.request_id);
                put_u16(out, b.entries.len() as u16);
                put_list(out, &b.entries);
            }
            Frame::PubResult(r) => {
                put_u32(out, r.request_id);
                put_u16(out, r.accepted);
                put_u16(out, r.local);
                put_u16(out, r.forwarded);
                put_u16(out, r.no_route);
            }
            Frame::PeerHello(p) => {
                put_u32(out, MAGIC);
                out.push(p.min_version);
                out.push(p.max_version);
                put_str8(out, p.node_id);
                put_u64(out, p.incarnation);
                out.extend_from_slice(&p.nonce);
            }
            Frame::PeerWelcome(p) => {
                out.push(p.version);
                put_str8(out, p.node_id);
                put_u64(out, p.incarnation);
                out.extend_from_slice(&p.nonce);
                out.extend_from_slice(&p.tag);
            }
            Frame::PeerAuth(p) => out.extend_from_slice(&p.tag),
            Frame::Presence(p) => {
                out.push(p.flags);
                put_u32(out, p.entries.len() as u32);
                put_list(out, &p.entries);
            }
            Frame::Forward(f) => {
                out.push(f.flags);
                put_str8(out, f.user);
                put_str8(out, f.key);
                if f.flags & super::types::FORWARD_ID != 0 {
                    put_str8(out, f.id);
                }
                if f.flags & super::types::FORWARD_SEQ != 0 {
                    put_u64(out, f.seq);
                }
                out.extend_from_slice(f.payload);
            }
            Frame::AssignRequest(a) => {
                put_u32(out, MAGIC);
                out.push(a.version);
                put_str8(out, a.user);
                out.push(a.max_results);
                if a.version >= 2 {
                    put_str16(out, a.token);
                }
            }
            Frame::Assignment(a) => {
                out.push(a.entries.len() as u8);
                put_list(out, &a.entries);
            }
            Frame::NoCapacity(n) => put_u32(out, n.retry_after_ms),
            Frame::NodesRequest(n) => {
                put_u32(out, MAGIC);
                out.push(n.version);
            }
            Frame::Nodes(n) => {
                put_u16(out, n.entries.len() as u16);
                put_list(out, &n.entries);
            }
            Frame::Admin(a) => {
                put_u32(out, MAGIC);
                out.push(a.version);
                put_u64(out, a.timestamp_ms);
                put_u64(out, a.nonce);
                out.push(a.op.to_u8());
                put_str8(out, a.node_id);
                put_u32(out, a.value);
                sign::append_tag(out, at, key);
            }
            Frame::AdminResult(a) => {
                put_u16(out, a.status);
                put_str16(out, a.message);
            }
            Frame::AdminStatus(s) => {
                out.push(s.ceiling_pct);
                put_u16(out, s.entries.len() as u16);
                put_list(out, &s.entries);
            }
            Frame::Heartbeat(h) => {
                put_u32(out, MAGIC);
                out.push(h.version);
                put_str8(out, h.node_id);
                put_u64(out, h.incarnation);
                put_u64(out, h.seq);
                put_u64(out, h.sent_at_ms);
                put_str8(out, h.client_endpoint);
                put_str8(out, h.ingest_endpoint);
                put_u32(out, h.connections);
                put_u32(out, h.capacity);
                out.push(h.flags);
                put_u32(out, h.msgs_in_per_s);
                put_u32(out, h.msgs_out_per_s);
                put_u16(out, h.cpu_permille);
                sign::append_tag(out, at, key);
            }
        }
        end(out, at);
    }

    /// Convenience: the frame's wire form in a new `Vec`.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}
