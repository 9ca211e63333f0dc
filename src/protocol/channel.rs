//! Frame type bytes, and the channels (conversations) they may appear on.
//!
//! This is the part of the wire vocabulary that both the codec ([`super::frame`])
//! and its error type ([`super::error`]) need, so it lives below both of them:
//! neither depends on the other through it (protocol.md §2.2, §2.3).

use super::limits::*;

/// Frame type bytes (protocol.md §2.3).
pub mod ty {
    /// Client → node: first frame, version negotiation, token, resume position.
    pub const HELLO: u8 = 0x01;
    /// Either way: keepalive request.
    pub const PING: u8 = 0x02;
    /// Either way: keepalive answer, echoes the nonce.
    pub const PONG: u8 = 0x03;
    /// Publisher → node: first frame with the publisher credential.
    pub const PUB_HELLO: u8 = 0x10;
    /// Publisher → node: one message for one user.
    pub const PUBLISH: u8 = 0x11;
    /// Publisher → node: many messages in one frame.
    pub const PUBLISH_BATCH: u8 = 0x12;
    /// Node → node: mesh link opening (initiator).
    pub const PEER_HELLO: u8 = 0x20;
    /// Node → node: initiator's answer to the acceptor's challenge.
    pub const PEER_AUTH: u8 = 0x21;
    /// Node ↔ node: presence snapshot chunk or delta.
    pub const PRESENCE: u8 = 0x22;
    /// Node ↔ node: a publish forwarded to the node where the user is.
    pub const FORWARD: u8 = 0x23;
    /// Anyone → decision server: which node should I use?
    pub const ASSIGN_REQUEST: u8 = 0x30;
    /// Anyone → decision server: the live node list.
    pub const NODES_REQUEST: u8 = 0x31;
    /// Admin → decision server: signed admin request.
    pub const ADMIN: u8 = 0x32;
    /// Node → decision server (UDP): signed load report.
    pub const HEARTBEAT: u8 = 0x40;
    /// Node → client: handshake accepted.
    pub const WELCOME: u8 = 0x81;
    /// Node → client: one personal message with its stream position.
    pub const DELIVER: u8 = 0x82;
    /// Node → client (version 2): messages a later one with the same key replaced.
    pub const CONFLATED: u8 = 0x83;
    /// Node → client/publisher/peer: orderly close with directions.
    pub const GOODBYE: u8 = 0x84;
    /// Node → publisher: handshake accepted.
    pub const PUB_WELCOME: u8 = 0x90;
    /// Node → publisher: result of a publish that asked for one.
    pub const PUB_RESULT: u8 = 0x91;
    /// Node → node: mesh challenge and acceptor proof.
    pub const PEER_WELCOME: u8 = 0xA0;
    /// Decision → requester: ranked node list.
    pub const ASSIGNMENT: u8 = 0xB0;
    /// Decision → requester: every node is full.
    pub const NO_CAPACITY: u8 = 0xB1;
    /// Decision → requester: live nodes.
    pub const NODES: u8 = 0xB2;
    /// Decision → admin: result of a change.
    pub const ADMIN_RESULT: u8 = 0xB3;
    /// Decision → admin: per-node status table.
    pub const ADMIN_STATUS: u8 = 0xB4;
    /// Anyone → anyone: fatal error; the sender closes after it.
    pub const ERROR: u8 = 0xFF;
}

/// Which conversation a byte stream belongs to. It fixes the maximum frame
/// length and which frame types may appear (protocol.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// What a node reads from a client connection.
    ToNode,
    /// What a client reads from a node.
    ToClient,
    /// What a node reads on its ingest port (publishers and mesh peers).
    Ingest,
    /// What a publisher or mesh initiator reads back from a node's ingest port.
    FromIngest,
    /// What a decision server reads on its TCP port.
    ToDecision,
    /// What a requester reads back from a decision server.
    FromDecision,
    /// One UDP datagram a decision server receives.
    Heartbeat,
}

impl Channel {
    /// Maximum value of the length prefix on this channel.
    #[inline]
    pub const fn max_len(self) -> u32 {
        match self {
            Channel::ToNode => MAX_TO_NODE,
            Channel::ToClient => MAX_TO_CLIENT,
            Channel::Ingest | Channel::FromIngest => MAX_INGEST,
            Channel::ToDecision => MAX_TO_DECISION,
            Channel::FromDecision => MAX_FROM_DECISION,
            Channel::Heartbeat => MAX_HEARTBEAT,
        }
    }

    /// Whether frames of type `t` may appear on this channel.
    #[inline]
    pub const fn allows(self, t: u8) -> bool {
        use ty::*;
        match self {
            Channel::ToNode => matches!(t, HELLO | PING | PONG | ERROR),
            Channel::ToClient => matches!(t, WELCOME | DELIVER | CONFLATED | GOODBYE | PING | PONG | ERROR),
            Channel::Ingest => matches!(
                t,
                PUB_HELLO
                    | PUBLISH
                    | PUBLISH_BATCH
                    | PEER_HELLO
                    | PEER_AUTH
                    | PRESENCE
                    | FORWARD
                    | PING
                    | PONG
                    | ERROR
            ),
            Channel::FromIngest => matches!(
                t,
                PUB_WELCOME | PUB_RESULT | PEER_WELCOME | PRESENCE | FORWARD | GOODBYE | PING | PONG | ERROR
            ),
            Channel::ToDecision => matches!(t, ASSIGN_REQUEST | NODES_REQUEST | ADMIN | ERROR),
            Channel::FromDecision => {
                matches!(t, ASSIGNMENT | NO_CAPACITY | NODES | ADMIN_RESULT | ADMIN_STATUS | ERROR)
            }
            Channel::Heartbeat => matches!(t, HEARTBEAT),
        }
    }
}
