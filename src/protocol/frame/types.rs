//! The frame types: one struct per frame type of protocol version 1, their
//! flag bits, the [`Frame`] enum that holds any of them, and version
//! negotiation. Decoding and encoding are in the sibling modules.

use crate::protocol::channel::ty;
use crate::protocol::codes::{AdminOp, Code, GoodbyeAction, ResumeResult};
use crate::protocol::{MIN_VERSION, VERSION};

use super::entries::{AssignEntry, BatchEntry, KeyEntry, List, NodeEntry, PresenceEntry, StatusEntry};

/// A stream position: which stream (epoch) and how far into it (seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Position {
    /// Random, non-zero id of one user's stream on one node incarnation.
    pub epoch: u64,
    /// Sequence number of a message in that stream; the first message is 1.
    pub seq: u64,
}

/// HELLO (0x01), client → node (protocol.md §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Lowest protocol version the client speaks.
    pub min_version: u8,
    /// Highest protocol version the client speaks.
    pub max_version: u8,
    /// The client token (protocol.md §9).
    pub token: &'a [u8],
    /// Free-form client name and version, for operators (may be empty).
    pub agent: &'a [u8],
    /// The position of the last message the client received, if resuming.
    pub resume: Option<Position>,
}

/// HELLO flag bit 0: the client asks to resume from `resume_epoch`/`resume_seq`.
pub const HELLO_RESUME: u8 = 0x01;

/// WELCOME (0x81), node → client (protocol.md §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome<'a> {
    /// The negotiated protocol version.
    pub version: u8,
    /// What happened to the resume request.
    pub resume: ResumeResult,
    /// The node pings a silent client after this many milliseconds.
    pub heartbeat_ms: u32,
    /// This session's id, unique on this node incarnation.
    pub session_id: u64,
    /// The user's stream epoch on this node.
    pub epoch: u64,
    /// The sequence number the next DELIVER on this session will carry.
    pub next_seq: u64,
    /// The node's id.
    pub node_id: &'a [u8],
}

/// DELIVER (0x82), node → client (protocol.md §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deliver<'a> {
    /// The stream epoch.
    pub epoch: u64,
    /// The message's sequence number in that stream.
    pub seq: u64,
    /// The application payload, opaque to herald.
    pub payload: &'a [u8],
}

/// Most keys one CONFLATED frame lists (protocol.md §3.8).
pub const MAX_CONFLATED_KEYS: usize = 255;

/// CONFLATED (0x83), node → client, protocol version 2 (protocol.md §3.8):
/// the messages `first_seq..=last_seq` were replaced by later messages with
/// the same keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflated<'a> {
    /// The stream epoch.
    pub epoch: u64,
    /// The first seq taken out.
    pub first_seq: u64,
    /// The last seq taken out (≥ `first_seq`).
    pub last_seq: u64,
    /// The keys those messages carried, each once (1..=255).
    pub keys: List<'a, KeyEntry<'a>>,
}

/// GOODBYE (0x84), node → client or publisher or peer (protocol.md §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Goodbye<'a> {
    /// Why the node is closing.
    pub reason: Code,
    /// What the receiver should do next.
    pub action: GoodbyeAction,
    /// How long to wait before acting, in milliseconds.
    pub delay_ms: u32,
    /// `host:port` of the node to go to, for [`GoodbyeAction::GoToNode`]; empty otherwise.
    pub target: &'a [u8],
}

/// ERROR (0xFF), anyone → anyone; the sender closes after it (protocol.md §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame<'a> {
    /// The error code.
    pub code: Code,
    /// Human-readable UTF-8 detail (may be empty).
    pub message: &'a [u8],
}

/// PUB_HELLO (0x10), publisher → node (protocol.md §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubHello<'a> {
    /// Lowest protocol version the publisher speaks.
    pub min_version: u8,
    /// Highest protocol version the publisher speaks.
    pub max_version: u8,
    /// A token minted with the publisher secret (protocol.md §9).
    pub credential: &'a [u8],
    /// Free-form publisher name and version (may be empty).
    pub agent: &'a [u8],
}

/// PUB_WELCOME (0x90), node → publisher (protocol.md §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubWelcome<'a> {
    /// The negotiated protocol version.
    pub version: u8,
    /// The largest frame the node accepts on this connection.
    pub max_frame: u32,
    /// The node's id.
    pub node_id: &'a [u8],
}

/// Flag bit in PUBLISH / PUBLISH_BATCH: answer with a PUB_RESULT.
pub const PUBLISH_WANT_RESULT: u8 = 0x01;

/// PUBLISH (0x11), publisher → node (protocol.md §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// Bit 0: [`PUBLISH_WANT_RESULT`]. Other bits are reserved, sent as 0, ignored.
    pub flags: u8,
    /// Echoed in the PUB_RESULT; any value.
    pub request_id: u32,
    /// The recipient's user id.
    pub user: &'a [u8],
    /// Conflation key, reserved: version 1 nodes carry it but do not conflate.
    pub key: &'a [u8],
    /// The application payload.
    pub payload: &'a [u8],
}

/// PUBLISH_BATCH (0x12), publisher → node (protocol.md §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishBatch<'a> {
    /// As in [`Publish::flags`].
    pub flags: u8,
    /// Echoed in the PUB_RESULT.
    pub request_id: u32,
    /// The messages.
    pub entries: List<'a, BatchEntry<'a>>,
}

/// PUB_RESULT (0x91), node → publisher (protocol.md §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubResult {
    /// The request id of the PUBLISH or PUBLISH_BATCH.
    pub request_id: u32,
    /// Messages in the request.
    pub accepted: u16,
    /// Messages queued to at least one session on this node.
    pub local: u16,
    /// Messages forwarded to at least one other node.
    pub forwarded: u16,
    /// Messages whose user has no session anywhere in the cluster.
    pub no_route: u16,
}

/// PEER_HELLO (0x20), mesh initiator → acceptor (protocol.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHello<'a> {
    /// Lowest protocol version.
    pub min_version: u8,
    /// Highest protocol version.
    pub max_version: u8,
    /// The initiator's node id.
    pub node_id: &'a [u8],
    /// The initiator's incarnation (start time in ms since the Unix epoch).
    pub incarnation: u64,
    /// A fresh random challenge for the acceptor.
    pub nonce: [u8; 16],
}

/// PEER_WELCOME (0xA0), mesh acceptor → initiator (protocol.md §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerWelcome<'a> {
    /// The negotiated protocol version.
    pub version: u8,
    /// The acceptor's node id.
    pub node_id: &'a [u8],
    /// The acceptor's incarnation.
    pub incarnation: u64,
    /// A fresh random challenge for the initiator.
    pub nonce: [u8; 16],
    /// The acceptor's proof (protocol.md §6.2).
    pub tag: [u8; 32],
}

/// PEER_AUTH (0x21), mesh initiator → acceptor (protocol.md §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAuth {
    /// The initiator's proof.
    pub tag: [u8; 32],
}

/// PRESENCE flag: this frame starts a snapshot; forget what you knew of the sender.
pub const PRESENCE_SNAPSHOT_BEGIN: u8 = 0x01;
/// PRESENCE flag: this frame ends a snapshot.
pub const PRESENCE_SNAPSHOT_END: u8 = 0x02;

/// PRESENCE (0x22), node ↔ node (protocol.md §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence<'a> {
    /// [`PRESENCE_SNAPSHOT_BEGIN`] | [`PRESENCE_SNAPSHOT_END`]; 0 for a delta.
    pub flags: u8,
    /// The changes.
    pub entries: List<'a, PresenceEntry<'a>>,
}

/// FORWARD flag: a de-duplication id follows the key (protocol version 2).
pub const FORWARD_ID: u8 = 0x01;
/// FORWARD flag: the message's seq in the user's stream follows the key
/// (and the id, if any): sent only between nodes in durable mode (§13).
pub const FORWARD_SEQ: u8 = 0x02;

/// FORWARD (0x23), node → node (protocol.md §6.5). Never forwarded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward<'a> {
    /// [`FORWARD_ID`] if `id` is present (version 2 links only), and
    /// [`FORWARD_SEQ`] if `seq` is; else 0.
    pub flags: u8,
    /// The recipient.
    pub user: &'a [u8],
    /// Reserved conflation key.
    pub key: &'a [u8],
    /// The message's de-duplication id (a queue message's identity, from a
    /// connector), 1..=64 bytes when `flags` has [`FORWARD_ID`]; else empty.
    pub id: &'a [u8],
    /// With [`FORWARD_SEQ`]: the message's seq in the user's durable
    /// stream (1 or more); else 0.
    pub seq: u64,
    /// The application payload.
    pub payload: &'a [u8],
}

/// ASSIGN_REQUEST (0x30), anyone → decision server (protocol.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignRequest<'a> {
    /// Protocol version of the request.
    pub version: u8,
    /// The user id, informational (may be empty).
    pub user: &'a [u8],
    /// How many ranked nodes the requester wants, 1..=8.
    pub max_results: u8,
    /// Version 2: the client's token (protocol.md §7.1, §9), proving who
    /// asks; empty for none. Version 1 has no such field: it is not
    /// encoded, and decodes as empty.
    pub token: &'a [u8],
}

/// ASSIGNMENT (0xB0), decision server → requester (protocol.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment<'a> {
    /// Ranked nodes: the chosen one first, then alternates.
    pub entries: List<'a, AssignEntry<'a>>,
}

/// NO_CAPACITY (0xB1), decision server → requester (protocol.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoCapacity {
    /// Ask again after this many milliseconds.
    pub retry_after_ms: u32,
}

/// NODES_REQUEST (0x31), anyone → decision server (protocol.md §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodesRequest {
    /// Protocol version of the request.
    pub version: u8,
}

/// NODES (0xB2), decision server → requester (protocol.md §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nodes<'a> {
    /// Every live (not expired) node.
    pub entries: List<'a, NodeEntry<'a>>,
}

/// ADMIN (0x32), admin → decision server, signed (protocol.md §7.3).
///
/// The HMAC tag is not a field here: it is checked over the raw frame with
/// [`sign::verify_frame`](crate::protocol::sign::verify_frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admin<'a> {
    /// Protocol version of the request.
    pub version: u8,
    /// Sender's clock, ms since the Unix epoch; rejected if over 30 s off.
    pub timestamp_ms: u64,
    /// Random; a repeated (timestamp, nonce) is rejected as a replay.
    pub nonce: u64,
    /// The operation.
    pub op: AdminOp,
    /// The node it applies to; empty for "all nodes / global".
    pub node_id: &'a [u8],
    /// The operand: percent for SetCeiling, connections for SetCapacity, else 0.
    pub value: u32,
}

/// ADMIN_RESULT (0xB3), decision server → admin (protocol.md §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminResult<'a> {
    /// 0 for success, else a [`Code`] value.
    pub status: u16,
    /// Human-readable detail.
    pub message: &'a [u8],
}

/// ADMIN_STATUS (0xB4), decision server → admin (protocol.md §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminStatus<'a> {
    /// The global ceiling in percent.
    pub ceiling_pct: u8,
    /// One row per known node.
    pub entries: List<'a, StatusEntry<'a>>,
}

/// HEARTBEAT (0x40), node → decision server over UDP, signed (protocol.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat<'a> {
    /// Protocol version.
    pub version: u8,
    /// The node's id.
    pub node_id: &'a [u8],
    /// The node's start time, ms since the Unix epoch.
    pub incarnation: u64,
    /// Increases by one per heartbeat within an incarnation.
    pub seq: u64,
    /// The node's clock when sending, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// `host:port` to give to clients.
    pub client_endpoint: &'a [u8],
    /// `host:port` for publishers and mesh peers.
    pub ingest_endpoint: &'a [u8],
    /// Connected clients.
    pub connections: u32,
    /// Connections at 100 % load.
    pub capacity: u32,
    /// [`NODE_DRAINING`](super::NODE_DRAINING).
    pub flags: u8,
    /// Messages received from publishers and peers per second.
    pub msgs_in_per_s: u32,
    /// Messages delivered to clients per second.
    pub msgs_out_per_s: u32,
    /// Process CPU use in per mille of one core.
    pub cpu_permille: u16,
}

/// Every frame of protocol versions 1 and 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Frame<'a> {
    Hello(Hello<'a>),
    Ping(u64),
    Pong(u64),
    Welcome(Welcome<'a>),
    Deliver(Deliver<'a>),
    Conflated(Conflated<'a>),
    Goodbye(Goodbye<'a>),
    Error(ErrorFrame<'a>),
    PubHello(PubHello<'a>),
    PubWelcome(PubWelcome<'a>),
    Publish(Publish<'a>),
    PublishBatch(PublishBatch<'a>),
    PubResult(PubResult),
    PeerHello(PeerHello<'a>),
    PeerWelcome(PeerWelcome<'a>),
    PeerAuth(PeerAuth),
    Presence(Presence<'a>),
    Forward(Forward<'a>),
    AssignRequest(AssignRequest<'a>),
    Assignment(Assignment<'a>),
    NoCapacity(NoCapacity),
    NodesRequest(NodesRequest),
    Nodes(Nodes<'a>),
    Admin(Admin<'a>),
    AdminResult(AdminResult<'a>),
    AdminStatus(AdminStatus<'a>),
    Heartbeat(Heartbeat<'a>),
}

impl<'a> Frame<'a> {
    /// The frame's type byte.
    #[inline]
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello(_) => ty::HELLO,
            Frame::Ping(_) => ty::PING,
            Frame::Pong(_) => ty::PONG,
            Frame::Welcome(_) => ty::WELCOME,
            Frame::Deliver(_) => ty::DELIVER,
            Frame::Conflated(_) => ty::CONFLATED,
            Frame::Goodbye(_) => ty::GOODBYE,
            Frame::Error(_) => ty::ERROR,
            Frame::PubHello(_) => ty::PUB_HELLO,
            Frame::PubWelcome(_) => ty::PUB_WELCOME,
            Frame::Publish(_) => ty::PUBLISH,
            Frame::PublishBatch(_) => ty::PUBLISH_BATCH,
            Frame::PubResult(_) => ty::PUB_RESULT,
            Frame::PeerHello(_) => ty::PEER_HELLO,
            Frame::PeerWelcome(_) => ty::PEER_WELCOME,
            Frame::PeerAuth(_) => ty::PEER_AUTH,
            Frame::Presence(_) => ty::PRESENCE,
            Frame::Forward(_) => ty::FORWARD,
            Frame::AssignRequest(_) => ty::ASSIGN_REQUEST,
            Frame::Assignment(_) => ty::ASSIGNMENT,
            Frame::NoCapacity(_) => ty::NO_CAPACITY,
            Frame::NodesRequest(_) => ty::NODES_REQUEST,
            Frame::Nodes(_) => ty::NODES,
            Frame::Admin(_) => ty::ADMIN,
            Frame::AdminResult(_) => ty::ADMIN_RESULT,
            Frame::AdminStatus(_) => ty::ADMIN_STATUS,
            Frame::Heartbeat(_) => ty::HEARTBEAT,
        }
    }
}

/// The version both sides speak, given the peer's range: the highest common one.
pub fn negotiate(min_version: u8, max_version: u8) -> Option<u8> {
    let v = max_version.min(VERSION);
    (v >= min_version && v >= MIN_VERSION).then_some(v)
}
