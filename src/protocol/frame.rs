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

use byteorder::{BigEndian, ByteOrder};

use super::codes::{AdminOp, Code, GoodbyeAction, PresenceOp, ResumeResult};
use super::error::DecodeError;
use super::limits::*;
use super::{MAGIC, VERSION};

pub use super::channel::{ty, Channel};

/// Bytes before the body: the `u32` length and the `u8` type.
pub const HEADER_LEN: usize = 5;

const fn known_type(t: u8) -> bool {
    use ty::*;
    matches!(
        t,
        HELLO
            | PING
            | PONG
            | PUB_HELLO
            | PUBLISH
            | PUBLISH_BATCH
            | PEER_HELLO
            | PEER_AUTH
            | PRESENCE
            | FORWARD
            | ASSIGN_REQUEST
            | NODES_REQUEST
            | ADMIN
            | HEARTBEAT
            | WELCOME
            | DELIVER
            | GOODBYE
            | PUB_WELCOME
            | PUB_RESULT
            | PEER_WELCOME
            | ASSIGNMENT
            | NO_CAPACITY
            | NODES
            | ADMIN_RESULT
            | ADMIN_STATUS
            | ERROR
    )
}

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

/// One message inside a PUBLISH_BATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry<'a> {
    /// The recipient's user id.
    pub user: &'a [u8],
    /// Reserved conflation key.
    pub key: &'a [u8],
    /// The application payload.
    pub payload: &'a [u8],
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

/// One PRESENCE change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceEntry<'a> {
    /// Online or offline.
    pub op: PresenceOp,
    /// The user id.
    pub user: &'a [u8],
}

/// FORWARD (0x23), node → node (protocol.md §6.5). Never forwarded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward<'a> {
    /// Reserved, 0.
    pub flags: u8,
    /// The recipient.
    pub user: &'a [u8],
    /// Reserved conflation key.
    pub key: &'a [u8],
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
}

/// ASSIGNMENT (0xB0), decision server → requester (protocol.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment<'a> {
    /// Ranked nodes: the chosen one first, then alternates.
    pub entries: List<'a, AssignEntry<'a>>,
}

/// One node in an ASSIGNMENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignEntry<'a> {
    /// The node's id.
    pub node_id: &'a [u8],
    /// `host:port` clients connect to.
    pub endpoint: &'a [u8],
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

/// Node flag: the node is draining and takes no new clients.
pub const NODE_DRAINING: u8 = 0x01;

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
    /// [`NODE_DRAINING`].
    pub flags: u8,
}

/// ADMIN (0x32), admin → decision server, signed (protocol.md §7.3).
///
/// The HMAC tag is not a field here: it is checked over the raw frame with
/// [`super::sign::verify_frame`].
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
    /// [`NODE_DRAINING`].
    pub flags: u8,
    /// Messages received from publishers and peers per second.
    pub msgs_in_per_s: u32,
    /// Messages delivered to clients per second.
    pub msgs_out_per_s: u32,
    /// Process CPU use in per mille of one core.
    pub cpu_permille: u16,
}

/// Every frame of protocol version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Frame<'a> {
    Hello(Hello<'a>),
    Ping(u64),
    Pong(u64),
    Welcome(Welcome<'a>),
    Deliver(Deliver<'a>),
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

/// The outcome of [`decode`] when the input is not (yet) wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many input bytes it used.
    Frame(Frame<'a>, usize),
    /// Not enough bytes yet: the frame needs at least this many in total.
    /// Never more than `HEADER_LEN - 1 + channel.max_len()`.
    Incomplete(usize),
}

/// Decodes the first frame in `buf`, as read from `channel`.
///
/// Checks, in this order, as soon as the bytes are there: the length prefix
/// against the channel limit, the type byte (and the length against the
/// largest valid frame of that type), then (once the whole frame is present)
/// the body.
pub fn decode(buf: &[u8], channel: Channel) -> Result<Decoded<'_>, DecodeError> {
    let Some(len) = buf.get(..4).map(BigEndian::read_u32) else {
        return Ok(Decoded::Incomplete(HEADER_LEN));
    };
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    let max = channel.max_len();
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    let Some(&t) = buf.get(4) else {
        return Ok(Decoded::Incomplete(HEADER_LEN));
    };
    if !known_type(t) {
        return Err(DecodeError::UnknownType(t));
    }
    if !channel.allows(t) {
        return Err(DecodeError::UnexpectedType { ty: t, channel });
    }
    if let Some(max) = max_frame_len(t) {
        if len > max {
            return Err(DecodeError::LongerThanType { ty: t, len, max });
        }
    }
    let total = 4 + len as usize;
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(Decoded::Incomplete(total));
    };
    let frame = decode_body(t, body)?;
    Ok(Decoded::Frame(frame, total))
}

/// The largest valid `length` of a frame of type `t`, for the types whose
/// fields are all bounded (protocol.md §2.4, step 2); `None` for the types
/// that carry a payload, a list or a table, which only their channel bounds.
/// A longer frame of a bounded type cannot be valid, so a receiver refuses it
/// from its header instead of buffering a body it will reject anyway.
pub const fn max_frame_len(t: u8) -> Option<u32> {
    const MAGIC_LEN: usize = 4;
    let body = match t {
        // magic, versions, flags, token, agent, resume position
        ty::HELLO => MAGIC_LEN + 3 + (2 + MAX_TOKEN_LEN) + (1 + MAX_AGENT_LEN) + 16,
        ty::PING | ty::PONG => 8,
        // version, resume, heartbeat_ms, session_id, epoch, next_seq, node_id
        ty::WELCOME => 2 + 4 + 24 + (1 + MAX_NODE_ID_LEN),
        // reason, action, delay_ms, target
        ty::GOODBYE => 2 + 1 + 4 + (1 + MAX_ENDPOINT_LEN),
        ty::ERROR => 2 + (2 + MAX_ERROR_MESSAGE_LEN),
        // magic, versions, flags, credential, agent
        ty::PUB_HELLO => MAGIC_LEN + 3 + (2 + MAX_TOKEN_LEN) + (1 + MAX_AGENT_LEN),
        // version, max_frame, node_id
        ty::PUB_WELCOME => 1 + 4 + (1 + MAX_NODE_ID_LEN),
        ty::PUB_RESULT => 4 + 2 * 4,
        // magic, versions, node_id, incarnation, nonce
        ty::PEER_HELLO => MAGIC_LEN + 2 + (1 + MAX_NODE_ID_LEN) + 8 + 16,
        // version, node_id, incarnation, nonce, tag
        ty::PEER_WELCOME => 1 + (1 + MAX_NODE_ID_LEN) + 8 + 16 + 32,
        ty::PEER_AUTH => 32,
        _ => return None,
    };
    Some(1 + body as u32)
}

/// Peeks at a complete frame's type and length without parsing the body.
/// Returns `None` if fewer than [`HEADER_LEN`] bytes are present.
pub fn peek_header(buf: &[u8]) -> Option<(u32, u8)> {
    let len = BigEndian::read_u32(buf.get(..4)?);
    Some((len, *buf.get(4)?))
}

fn decode_body(t: u8, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut r = Reader::new(body);
    let f = match t {
        ty::HELLO => {
            r.magic()?;
            let min_version = r.u8("min_version")?;
            let max_version = r.u8("max_version")?;
            let flags = r.u8("flags")?;
            let token = r.str16("token", 1, MAX_TOKEN_LEN)?;
            let agent = r.str8("agent", 0, MAX_AGENT_LEN)?;
            let epoch = r.u64("resume_epoch")?;
            let seq = r.u64("resume_seq")?;
            let resume = (flags & HELLO_RESUME != 0).then_some(Position { epoch, seq });
            Frame::Hello(Hello { min_version, max_version, token, agent, resume })
        }
        ty::PING => Frame::Ping(r.u64("nonce")?),
        ty::PONG => Frame::Pong(r.u64("nonce")?),
        ty::WELCOME => {
            let version = r.u8("version")?;
            let rr = r.u8("resume")?;
            let resume = ResumeResult::from_u8(rr)
                .ok_or(DecodeError::BadValue { field: "resume", value: rr as u64 })?;
            Frame::Welcome(Welcome {
                version,
                resume,
                heartbeat_ms: r.u32("heartbeat_ms")?,
                session_id: r.u64("session_id")?,
                epoch: r.u64("epoch")?,
                next_seq: r.u64("next_seq")?,
                node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            })
        }
        ty::DELIVER => {
            let epoch = r.u64("epoch")?;
            let seq = r.u64("seq")?;
            let payload = r.payload()?;
            return Ok(Frame::Deliver(Deliver { epoch, seq, payload }));
        }
        ty::GOODBYE => {
            let reason = Code::from_u16(r.u16("reason")?);
            let a = r.u8("action")?;
            let action = GoodbyeAction::from_u8(a)
                .ok_or(DecodeError::BadValue { field: "action", value: a as u64 })?;
            Frame::Goodbye(Goodbye {
                reason,
                action,
                delay_ms: r.u32("delay_ms")?,
                target: r.str8("target", 0, MAX_ENDPOINT_LEN)?,
            })
        }
        ty::ERROR => Frame::Error(ErrorFrame {
            code: Code::from_u16(r.u16("code")?),
            message: r.str16("message", 0, MAX_ERROR_MESSAGE_LEN)?,
        }),
        ty::PUB_HELLO => {
            r.magic()?;
            let min_version = r.u8("min_version")?;
            let max_version = r.u8("max_version")?;
            let _flags = r.u8("flags")?;
            Frame::PubHello(PubHello {
                min_version,
                max_version,
                credential: r.str16("credential", 1, MAX_TOKEN_LEN)?,
                agent: r.str8("agent", 0, MAX_AGENT_LEN)?,
            })
        }
        ty::PUB_WELCOME => Frame::PubWelcome(PubWelcome {
            version: r.u8("version")?,
            max_frame: r.u32("max_frame")?,
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
        }),
        ty::PUBLISH => {
            let flags = r.u8("flags")?;
            let request_id = r.u32("request_id")?;
            let user = r.str8("user", 1, MAX_USER_LEN)?;
            let key = r.str8("key", 0, MAX_KEY_LEN)?;
            let payload = r.payload()?;
            return Ok(Frame::Publish(Publish { flags, request_id, user, key, payload }));
        }
        ty::PUBLISH_BATCH => Frame::PublishBatch(PublishBatch {
            flags: r.u8("flags")?,
            request_id: r.u32("request_id")?,
            entries: r.list16::<BatchEntry>(1, MAX_BATCH)?,
        }),
        ty::PUB_RESULT => Frame::PubResult(PubResult {
            request_id: r.u32("request_id")?,
            accepted: r.u16("accepted")?,
            local: r.u16("local")?,
            forwarded: r.u16("forwarded")?,
            no_route: r.u16("no_route")?,
        }),
        ty::PEER_HELLO => {
            r.magic()?;
            Frame::PeerHello(PeerHello {
                min_version: r.u8("min_version")?,
                max_version: r.u8("max_version")?,
                node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
                incarnation: r.u64("incarnation")?,
                nonce: r.array("nonce")?,
            })
        }
        ty::PEER_WELCOME => Frame::PeerWelcome(PeerWelcome {
            version: r.u8("version")?,
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            incarnation: r.u64("incarnation")?,
            nonce: r.array("nonce")?,
            tag: r.array("tag")?,
        }),
        ty::PEER_AUTH => Frame::PeerAuth(PeerAuth { tag: r.array("tag")? }),
        ty::PRESENCE => Frame::Presence(Presence {
            flags: r.u8("flags")?,
            entries: r.list32::<PresenceEntry>(0, u32::MAX as usize)?,
        }),
        ty::FORWARD => {
            let flags = r.u8("flags")?;
            let user = r.str8("user", 1, MAX_USER_LEN)?;
            let key = r.str8("key", 0, MAX_KEY_LEN)?;
            let payload = r.payload()?;
            return Ok(Frame::Forward(Forward { flags, user, key, payload }));
        }
        ty::ASSIGN_REQUEST => {
            r.magic()?;
            let version = r.u8("version")?;
            let user = r.str8("user", 0, MAX_USER_LEN)?;
            let max_results = r.u8("max_results")?;
            if !(1..=MAX_ASSIGN_RESULTS).contains(&max_results) {
                return Err(DecodeError::BadValue { field: "max_results", value: max_results as u64 });
            }
            Frame::AssignRequest(AssignRequest { version, user, max_results })
        }
        ty::ASSIGNMENT => {
            Frame::Assignment(Assignment { entries: r.list8::<AssignEntry>(1, MAX_ASSIGN_RESULTS as usize)? })
        }
        ty::NO_CAPACITY => Frame::NoCapacity(NoCapacity { retry_after_ms: r.u32("retry_after_ms")? }),
        ty::NODES_REQUEST => {
            r.magic()?;
            Frame::NodesRequest(NodesRequest { version: r.u8("version")? })
        }
        ty::NODES => Frame::Nodes(Nodes { entries: r.list16::<NodeEntry>(0, u16::MAX as usize)? }),
        ty::ADMIN => {
            r.magic()?;
            let version = r.u8("version")?;
            let timestamp_ms = r.u64("timestamp_ms")?;
            let nonce = r.u64("nonce")?;
            let o = r.u8("op")?;
            let op = AdminOp::from_u8(o).ok_or(DecodeError::BadValue { field: "op", value: o as u64 })?;
            let node_id = r.str8("node_id", 0, MAX_NODE_ID_LEN)?;
            let value = r.u32("value")?;
            let _tag: [u8; 32] = r.array("tag")?;
            Frame::Admin(Admin { version, timestamp_ms, nonce, op, node_id, value })
        }
        ty::ADMIN_RESULT => Frame::AdminResult(AdminResult {
            status: r.u16("status")?,
            message: r.str16("message", 0, MAX_ADMIN_MESSAGE_LEN)?,
        }),
        ty::ADMIN_STATUS => Frame::AdminStatus(AdminStatus {
            ceiling_pct: r.u8("ceiling_pct")?,
            entries: r.list16::<StatusEntry>(0, u16::MAX as usize)?,
        }),
        ty::HEARTBEAT => {
            r.magic()?;
            let hb = Heartbeat {
                version: r.u8("version")?,
                node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
                incarnation: r.u64("incarnation")?,
                seq: r.u64("seq")?,
                sent_at_ms: r.u64("sent_at_ms")?,
                client_endpoint: r.str8("client_endpoint", 1, MAX_ENDPOINT_LEN)?,
                ingest_endpoint: r.str8("ingest_endpoint", 0, MAX_ENDPOINT_LEN)?,
                connections: r.u32("connections")?,
                capacity: r.u32("capacity")?,
                flags: r.u8("flags")?,
                msgs_in_per_s: r.u32("msgs_in_per_s")?,
                msgs_out_per_s: r.u32("msgs_out_per_s")?,
                cpu_permille: r.u16("cpu_permille")?,
            };
            let _tag: [u8; 32] = r.array("tag")?;
            Frame::Heartbeat(hb)
        }
        // `decode` only calls us with known types.
        other => return Err(DecodeError::UnknownType(other)),
    };
    r.finish()?;
    Ok(f)
}

/// HELLO flag bit 0: the client asks to resume from `resume_epoch`/`resume_seq`.
pub const HELLO_RESUME: u8 = 0x01;

/// Reads big-endian fields from a body, never panicking. Internal to the codec.
#[doc(hidden)]
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(BigEndian::read_u16(self.take(2, field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(BigEndian::read_u32(self.take(4, field)?))
    }
    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(BigEndian::read_i32(self.take(4, field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(BigEndian::read_u64(self.take(8, field)?))
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn magic(&mut self) -> Result<(), DecodeError> {
        let m = self.u32("magic")?;
        if m != MAGIC {
            return Err(DecodeError::BadMagic(m));
        }
        Ok(())
    }
    fn checked(
        &mut self,
        len: usize,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        if len < min || len > max {
            return Err(DecodeError::BadLength { field, len });
        }
        self.take(len, field)
    }
    fn str8(&mut self, field: &'static str, min: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u8(field)? as usize;
        self.checked(n, field, min, max)
    }
    fn str16(&mut self, field: &'static str, min: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u16(field)? as usize;
        self.checked(n, field, min, max)
    }
    fn str32(&mut self, field: &'static str, min: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.checked(n, field, min, max)
    }
    /// The rest of the body as a payload, checked against [`MAX_PAYLOAD`].
    fn payload(&mut self) -> Result<&'a [u8], DecodeError> {
        let p = std::mem::take(&mut self.b);
        if p.len() > MAX_PAYLOAD {
            return Err(DecodeError::BadLength { field: "payload", len: p.len() });
        }
        Ok(p)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { extra: self.b.len() })
        }
    }
    fn list<E: Entry<'a>>(
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
    fn list8<E: Entry<'a>>(&mut self, min: usize, max: usize) -> Result<List<'a, E>, DecodeError> {
        let n = self.u8(E::FIELD)? as usize;
        self.list(n, min, max)
    }
    fn list16<E: Entry<'a>>(&mut self, min: usize, max: usize) -> Result<List<'a, E>, DecodeError> {
        let n = self.u16(E::FIELD)? as usize;
        self.list(n, min, max)
    }
    fn list32<E: Entry<'a>>(&mut self, min: usize, max: usize) -> Result<List<'a, E>, DecodeError> {
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
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(BatchEntry {
            user: r.str8("user", 1, MAX_USER_LEN)?,
            key: r.str8("key", 0, MAX_KEY_LEN)?,
            payload: r.str32("payload", 0, MAX_PAYLOAD)?,
        })
    }
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.user);
        put_str8(out, self.key);
        put_u32(out, self.payload.len() as u32);
        out.extend_from_slice(self.payload);
    }
}

impl<'a> Entry<'a> for PresenceEntry<'a> {
    const FIELD: &'static str = "entries";
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let o = r.u8("op")?;
        let op = match o {
            0 => PresenceOp::Offline,
            1 => PresenceOp::Online,
            v => return Err(DecodeError::BadValue { field: "op", value: v as u64 }),
        };
        Ok(PresenceEntry { op, user: r.str8("user", 1, MAX_USER_LEN)? })
    }
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
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(AssignEntry {
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            endpoint: r.str8("endpoint", 1, MAX_ENDPOINT_LEN)?,
        })
    }
    fn write(&self, out: &mut Vec<u8>) {
        put_str8(out, self.node_id);
        put_str8(out, self.endpoint);
    }
}

impl<'a> Entry<'a> for NodeEntry<'a> {
    const FIELD: &'static str = "entries";
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(NodeEntry {
            node_id: r.str8("node_id", 1, MAX_NODE_ID_LEN)?,
            incarnation: r.u64("incarnation")?,
            client_endpoint: r.str8("client_endpoint", 1, MAX_ENDPOINT_LEN)?,
            ingest_endpoint: r.str8("ingest_endpoint", 0, MAX_ENDPOINT_LEN)?,
            flags: r.u8("flags")?,
        })
    }
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

// ---------------------------------------------------------------- encoding

#[inline]
fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
#[inline]
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
#[inline]
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Writes a u8-length-prefixed field. Callers keep fields within limits;
/// an over-long field is cut at 255 bytes rather than corrupting the frame.
#[inline]
fn put_str8(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}
#[inline]
fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(65535)];
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s);
}

/// Starts a frame of type `t` in `out`; returns the offset of its length field.
pub(crate) fn begin(out: &mut Vec<u8>, t: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, t]);
    at
}

/// Fills in the length field of the frame started at `at`.
pub(crate) fn end(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    BigEndian::write_u32(&mut out[at..at + 4], len);
}

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

/// Appends a PUBLISH frame without building a [`Publish`].
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
pub fn encode_forward(out: &mut Vec<u8>, user: &[u8], key: &[u8], payload: &[u8]) {
    out.reserve(HEADER_LEN + 3 + user.len() + key.len() + payload.len());
    let at = begin(out, ty::FORWARD);
    out.push(0);
    put_str8(out, user);
    put_str8(out, key);
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
    out.extend_from_slice(l.bytes);
}

impl<'a> Frame<'a> {
    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello(_) => ty::HELLO,
            Frame::Ping(_) => ty::PING,
            Frame::Pong(_) => ty::PONG,
            Frame::Welcome(_) => ty::WELCOME,
            Frame::Deliver(_) => ty::DELIVER,
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
                out.extend_from_slice(f.payload);
            }
            Frame::AssignRequest(a) => {
                put_u32(out, MAGIC);
                out.push(a.version);
                put_str8(out, a.user);
                out.push(a.max_results);
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
                super::sign::append_tag(out, at, key);
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
                super::sign::append_tag(out, at, key);
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

/// Encodes a list of entries for building a frame by hand (tests, tools).
pub fn encode_entries<'a, E: Entry<'a>>(entries: &[E]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in entries {
        e.write(&mut v);
    }
    v
}

/// The version both sides speak, given the peer's range: the highest common one.
pub fn negotiate(min_version: u8, max_version: u8) -> Option<u8> {
    (min_version <= VERSION && VERSION <= max_version).then_some(VERSION)
}
