//! Counted lists inside frames: the [`Entry`] trait, [`List`] (validated at
//! decode, borrowed from the input) and its iterator, and the entry types of
//! PUBLISH_BATCH, CONFLATED, PRESENCE, ASSIGNMENT, NODES and ADMIN_STATUS with their
//! readers and writers.

use crate::protocol::codes::PresenceOp;
use crate::protocol::error::DecodeError;
use crate::protocol::limits::*;

use super::wire::{put_str8, put_u32, put_u64, Reader};

/// One message inside a PUBLISH_BATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry<'a> {
    /// The recipient's user id.
    pub user: &'a [u8],
    /// Conflation key (empty: never conflated).
    pub key: &'a [u8],
    /// The application payload.
    pub payload: &'a [u8],
}

/// One key in a CONFLATED frame (1..=64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEntry<'a>(pub &'a [u8]);

/// One PRESENCE change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceEntry<'a> {
    /// Online or offline.
    pub op: PresenceOp,
    /// The user id.
    pub user: &'a [u8],
}

/// One node in an ASSIGNMENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignEntry<'a> {
    /// The node's id.
    pub node_id: &'a [u8],
    /// `host:port` clients connect to.
    pub endpoint: &'a [u8],
}

/// Node flag: the node is draining and takes no new clients.
pub const NODE_DRAINING: u8 = 0x01;
/// Node flag in NODES: an admin drained the node (set with
/// [`NODE_DRAINING`]). A node follows an admin drain of itself by this bit
/// alone: [`NODE_DRAINING`] may only echo its own heartbeats.
pub const NODE_DRAINED: u8 = 0x02;

/// One node in NODES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeEntry<'a> {
    /// The node's id.
    pub node_id: &'a [u8],
    /// Its incarnation.
    pub incarnation: u64,
    /// `host:port` for clients.
    pub client_endpoint: &'a [u8],
    /// `host:port` for publishers and peers.
    pub ingest_endpoint: &'a [u8],
    /// [`NODE_DRAINING`], [`NODE_DRAINED`].
    pub flags: u8,
}

/// One row of ADMIN_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusEntry<'a> {
    /// The node's id.
    pub node_id: &'a [u8],
    /// `host:port` for clients.
    pub client_endpoint: &'a [u8],
    /// Connected clients at the last heartbeat.
    pub connections: u32,
    /// Capacity in force (admin override or the node's own).
    pub capacity: u32,
    /// Ceiling in force for this node, percent.
    pub ceiling_pct: u8,
    /// Headroom now: ceiling × capacity − connections − recent assignments.
    pub headroom: i32,
    /// Milliseconds since the last accepted heartbeat.
    pub heartbeat_age_ms: u32,
    /// [`NODE_DRAINING`].
    pub flags: u8,
    /// Messages delivered per second at the last heartbeat.
    pub msgs_out_per_s: u32,
}

impl<'a> Reader<'a> {
    pub(super) fn list<E: Entry<'a>>(
        &mut self,
        count: usize,
        min: usize,
        max: usize,
    ) -> Result<List<'a, E>, DecodeError> {
        if count < min || count > max {
            return Err(DecodeError::BadLength { field: E::FIELD, len: count });
        }
        let start = self.b;
        for _ in 0..count {
            E::read(self)?;
        }
        let used = start.len() - self.b.len();
        Ok(List { count, bytes: &start[..used], _e: std::marker::PhantomData })
    }
    pub(super) fn list8<E: Entry<'a>>(&mut self, min: usize, max: usize) -> Result<List<'a, E>, DecodeError> {
        let n = self.u8(E::FIELD)? as usize;
        self.list(n, min, max)
    }
    pub(super) fn list16<E: Entry<'a>>(
        &mut self,
        min: usize,
        max: usize,
    ) -> Result<List<'a, E>, DecodeError> {
        let n = self.u16(E::FIELD)? as usize;
        self.list(n, min, max)
    }
    pub(super) fn list32<E: Entry<'a>>(
        &mut self,
        min: usize,
        max: usize,
    ) -> Result<List<'a, E>, DecodeError> {
        let n = self.u32(E::FIELD)? as usize;
        self.list(n, min, max)
    }
}

/// An entry type of a counted list inside a frame.
pub trait Entry<'a>: Sized + Copy {
    /// Field name used in errors.
    const FIELD: &'static str;
    #[doc(hidden)]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError>;
    /// Appends the entry's wire form.
    fn write(&self, out: &mut Vec<u8>);
}

/// A counted list of entries, validated when the frame was decoded and
/// borrowed from the input. Iterate it with [`List::iter`].
#[derive(Clone, Copy)]
pub struct List<'a, E> {
    count: usize,
    bytes: &'a [u8],
    _e: std::marker::PhantomData<E>,
}

impl<'a, E: Entry<'a>> List<'a, E> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.count
    }
    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The entries' wire bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Iterates over the entries.
    pub fn iter(&self) -> ListIter<'a, E> {
        ListIter { r: Reader::new(self.bytes), left: self.count, _e: std::marker::PhantomData }
    }
    /// Builds a list from entries encoded with [`Entry::write`] into `bytes`.
    /// Returns `None` if `bytes` does not hold exactly `count` valid entries.
    pub fn from_encoded(count: usize, bytes: &'a [u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        let l = r.list::<E>(count, 0, usize::MAX).ok()?;
        r.finish().ok()?;
        Some(l)
    }
}

impl<'a, E: Entry<'a> + PartialEq> PartialEq for List<'a, E> {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.bytes == other.bytes
    }
}
impl<'a, E: Entry<'a> + Eq> Eq for List<'a, E> {}

impl<'a, E: Entry<'a> + std::fmt::Debug> std::fmt::Debug for List<'a, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over a [`List`].
pub struct ListIter<'a, E> {
    r: Reader<'a>,
    left: usize,
    _e: std::marker::PhantomData<E>,
}

impl<'a, E: Entry<'a>> Iterator for ListIter<'a, E> {
    type Item = E;
    fn next(&mut self) -> Option<E> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The list was validated at decode, so this cannot fail; if it did,
        // ending the iteration is the safe answer.
        E::read(&mut self.r).ok()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<'a> Entry<'a> for BatchEntry<'a> {
    const FIELD: &'static str = "entries";
    #[inline]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(BatchEntry {
            user: r.str8("user", 1, MAX_USER_LEN)?,
            key: r.str8("key", 0, MAX_KEY_LEN)?,
            payload: r.str32("payload", 0, MAX_PAYLOAD)?,
        })
    }
    #[inline]
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.user);
        put_str8(out, self.key);
        put_u32(out, self.payload.len() as u32);
        out.extend_from_slice(self.payload);
    }
}

impl<'a> Entry<'a> for KeyEntry<'a> {
    const FIELD: &'static str = "keys";
    #[inline]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(KeyEntry(r.str8("key", 1, MAX_KEY_LEN)?))
    }
    #[inline]
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.0);
    }
}

impl<'a> Entry<'a> for PresenceEntry<'a> {
    const FIELD: &'static str = "entries";
    #[inline]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let o = r.u8("op")?;
        let op = match o {
            0 => PresenceOp::Offline,
            1 => PresenceOp::Online,
            v => return Err(DecodeError::BadValue { field: "op", value: v as u64 }),
        };
        Ok(PresenceEntry { op, user: r.str8("user", 1, MAX_USER_LEN)? })
    }
    #[inline]
    fn write(&self, out: &mut Vec<u8>) {
        out.push(match self.op {
            PresenceOp::Offline => 0,
            PresenceOp::Online => 1,
        });
        put_str8(out, self.user);
    }
}

impl<'a> Entry<'a> for AssignEntry<'a> {
    const FIELD: &'static str = "entries";
    #[inline]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(AssignEntry {
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            endpoint: r.str8("endpoint", 1, MAX_ENDPOINT_LEN)?,
        })
    }
    #[inline]
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.node_id);
        put_str8(out, self.endpoint);
    }
}

impl<'a> Entry<'a> for NodeEntry<'a> {
    const FIELD: &'static str = "entries";
    #[inline]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(NodeEntry {
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            incarnation: r.u64("incarnation")?,
            client_endpoint: r.str8("client_endpoint", 1, MAX_ENDPOINT_LEN)?,
            ingest_endpoint: r.str8("ingest_endpoint", 0, MAX_ENDPOINT_LEN)?,
            flags: r.u8("flags")?,
        })
    }
    #[inline]
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.node_id);
        put_u64(out, self.incarnation);
        put_str8(out, self.client_endpoint);
        put_str8(out, self.ingest_endpoint);
        out.push(self.flags);
    }
}

impl<'a> Entry<'a> for StatusEntry<'a> {
    const FIELD: &'static str = "entries";
    #[inline]
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(StatusEntry {
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            client_endpoint: r.str8("client_endpoint", 0, MAX_ENDPOINT_LEN)?,
            connections: r.u32("connections")?,
            capacity: r.u32("capacity")?,
            ceiling_pct: r.u8("ceiling_pct")?,
            headroom: r.i32("headroom")?,
            heartbeat_age_ms: r.u32("heartbeat_age_ms")?,
            flags: r.u8("flags")?,
            msgs_out_per_s: r.u32("msgs_out_per_s")?,
        })
    }
    #[inline]
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.node_id);
        put_str8(out, self.client_endpoint);
        put_u32(out, self.connections);
        put_u32(out, self.capacity);
        out.push(self.ceiling_pct);
        out.extend_from_slice(&self.headroom.to_be_bytes());
        put_u32(out, self.heartbeat_age_ms);
        out.push(self.flags);
        put_u32(out, self.msgs_out_per_s);
    }
}

/// Encodes a list of entries for building a frame by hand (tests, tools).
pub fn encode_entries<'a, E: Entry<'a>>(entries: &[E]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in entries {
        e.write(&mut v);
    }
    v
}
