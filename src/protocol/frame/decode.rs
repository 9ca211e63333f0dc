//! Decoding: [`decode`] checks a frame's header against its channel before
//! anything is buffered, then parses the body of each frame type;
//! [`decode_in`] adds the connection state's check on the type byte;
//! [`max_frame_len`] and [`peek_header`] are the header-only checks.

use byteorder::{BigEndian, ByteOrder};

use crate::protocol::channel::{ty, Channel};
use crate::protocol::codes::{AdminOp, Code, GoodbyeAction, ResumeResult};
use crate::protocol::error::DecodeError;
use crate::protocol::limits::*;

use super::entries::{AssignEntry, BatchEntry, KeyEntry, NodeEntry, PresenceEntry, StatusEntry};
use super::types::*;
use super::wire::{Reader, HEADER_LEN};

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
            | CONFLATED
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
/// (0, then the channel limit), the type byte (defined, allowed on the
/// channel, then the length against the largest valid frame of that type),
/// then (once the whole frame is present) the body. Every type the channel
/// allows is taken as allowed now; a connection with states uses
/// [`decode_in`].
pub fn decode(buf: &[u8], channel: Channel) -> Result<Decoded<'_>, DecodeError> {
    decode_in(buf, channel, |_| true)
}

/// [`decode`] for a connection whose state allows only the types for which
/// `allowed` says yes (protocol.md §2.4 step 2: the channel and the state are
/// checked together, from the type byte, before the length against the
/// type's largest frame and before the body). A type the channel allows but
/// the state does not is [`DecodeError::NotNow`].
pub fn decode_in(
    buf: &[u8],
    channel: Channel,
    allowed: impl Fn(u8) -> bool,
) -> Result<Decoded<'_>, DecodeError> {
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
    if !allowed(t) {
        return Err(DecodeError::NotNow(t));
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
        // epoch, first_seq, last_seq, keys
        ty::CONFLATED => 24 + 1 + MAX_CONFLATED_KEYS * (1 + MAX_KEY_LEN),
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
        ty::CONFLATED => {
            let epoch = r.u64("epoch")?;
            let first_seq = r.u64("first_seq")?;
            let last_seq = r.u64("last_seq")?;
            if last_seq < first_seq {
                return Err(DecodeError::BadValue { field: "last_seq", value: last_seq });
            }
            let keys = r.list8::<KeyEntry>(1, MAX_CONFLATED_KEYS)?;
            Frame::Conflated(Conflated { epoch, first_seq, last_seq, keys })
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
            if flags & !(FORWARD_ID | FORWARD_SEQ) != 0 {
                return Err(DecodeError::BadValue { field: "flags", value: flags as u64 });
            }
            let user = r.str8("user", 1, MAX_USER_LEN)?;
            let key = r.str8("key", 0, MAX_KEY_LEN)?;
            let id = if flags & FORWARD_ID != 0 { r.str8("id", 1, MAX_FORWARD_ID_LEN)? } else { b"" };
            let seq = if flags & FORWARD_SEQ != 0 {
                match r.u64("seq")? {
                    0 => return Err(DecodeError::BadValue { field: "seq", value: 0 }),
                    s => s,
                }
            } else {
                0
            };
            let payload = r.payload()?;
            return Ok(Frame::Forward(Forward { flags, user, key, id, seq, payload }));
        }
        ty::ASSIGN_REQUEST => {
            r.magic()?;
            let version = r.version()?;
            let user = r.str8("user", 0, MAX_USER_LEN)?;
            let max_results = r.u8("max_results")?;
            if !(1..=MAX_ASSIGN_RESULTS).contains(&max_results) {
                return Err(DecodeError::BadValue { field: "max_results", value: max_results as u64 });
            }
            let token = if version >= 2 { r.str16("token", 0, MAX_TOKEN_LEN)? } else { &[] };
            Frame::AssignRequest(AssignRequest { version, user, max_results, token })
        }
        ty::ASSIGNMENT => {
            Frame::Assignment(Assignment { entries: r.list8::<AssignEntry>(1, MAX_ASSIGN_RESULTS as usize)? })
        }
        ty::NO_CAPACITY => Frame::NoCapacity(NoCapacity { retry_after_ms: r.u32("retry_after_ms")? }),
        ty::NODES_REQUEST => {
            r.magic()?;
            Frame::NodesRequest(NodesRequest { version: r.version()? })
        }
        ty::NODES => Frame::Nodes(Nodes { entries: r.list16::<NodeEntry>(0, u16::MAX as usize)? }),
        ty::ADMIN => {
            r.magic()?;
            let version = r.version()?;
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
