//! Frame types and the codec: `decode` from a byte slice, `encode` into a `Vec<u8>`.
//!
//! Layout of every frame (protocol.md §2): `length: u32` (bytes after this
//! field), `type: u8`, then the body. All integers are big-endian.
//!
//! Decoding is split the way mini-redis splits it: the first four bytes are
//! checked against the channel's limit *before* the caller buffers anything
//! (so a hostile length never allocates), then the type is checked, and only a
//! complete frame is parsed. "Incomplete" is a normal outcome, not an error.
//! Decoded frames borrow their variable-length fields from the input.
//!
//! This module must never panic on any input and never touches sockets or clocks.
//!
//! Everything is used through this module's paths (`frame::Frame`,
//! `frame::decode`, …); the files behind it are, from the bottom up:
//!
//! - `wire.rs`: the big-endian field reader and writers, and the frame header;
//! - `entries.rs`: counted lists ([`List`], [`Entry`]) and their entry types;
//! - `types.rs`: one struct per frame type, the flag bits, and [`Frame`];
//! - `decode.rs`: [`decode`] and the header checks;
//! - `encode.rs`: [`Frame::encode`] and the hot-path encoders.
//!
//! Each file imports only from the ones above it in this list; this file
//! holds no items of its own, only the re-exports.

mod decode;
mod encode;
mod entries;
mod types;
mod wire;

pub use super::channel::{ty, Channel};
pub use decode::{decode, decode_in, max_frame_len, peek_header, Decoded};
pub use encode::{
    deliver_len, encode_deliver, encode_forward, encode_forward_seq, encode_publish, BatchWriter,
};
pub use entries::{
    encode_entries, AssignEntry, BatchEntry, Entry, KeyEntry, List, ListIter, NodeEntry, PresenceEntry,
    StatusEntry, NODE_DRAINED, NODE_DRAINING,
};
pub use types::{
    negotiate, Admin, AdminResult, AdminStatus, AssignRequest, Assignment, Conflated, Deliver, ErrorFrame,
    Forward, Frame, Goodbye, Heartbeat, Hello, NoCapacity, Nodes, NodesRequest, PeerAuth, PeerHello,
    PeerWelcome, Position, Presence, PubHello, PubResult, PubWelcome, Publish, PublishBatch, Welcome,
    FORWARD_ID, FORWARD_SEQ, HELLO_RESUME, MAX_CONFLATED_KEYS, PRESENCE_SNAPSHOT_BEGIN,
    PRESENCE_SNAPSHOT_END, PUBLISH_WANT_RESULT,
};
pub use wire::{Reader, HEADER_LEN};
