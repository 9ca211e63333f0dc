//! Numeric codes carried on the wire: error/close reasons, resume results and
//! goodbye actions (protocol.md §4).
//!
//! One code space serves both ERROR frames (the sender closes right after) and
//! GOODBYE reasons (an orderly close with directions). Unknown values decode to
//! `Code::Other(n)` so that an old client keeps working against a newer node.

use std::fmt;

/// A reason code carried by ERROR and GOODBYE frames (protocol.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// A frame was malformed: a field was truncated, out of range or left trailing bytes.
    ProtocolError,
    /// No protocol version is supported by both sides.
    UnsupportedVersion,
    /// The first frame did not carry the herald magic number.
    BadMagic,
    /// A frame declared a length over the limit of its direction.
    FrameTooLarge,
    /// The frame type byte is not defined by any version of the protocol this peer knows.
    UnknownFrameType,
    /// A known frame arrived where it is not allowed (wrong endpoint or wrong state).
    UnexpectedFrame,
    /// The handshake did not complete before the deadline.
    HandshakeTimeout,
    /// The token or credential was malformed or its signature did not verify.
    AuthFailed,
    /// The token's expiry is in the past.
    TokenExpired,
    /// The node is at capacity; ask the decision server for another node.
    ServerFull,
    /// The client did not read fast enough and its queue bound was hit.
    SlowConsumer,
    /// The peer stopped answering pings.
    IdleTimeout,
    /// The node is draining (shutting down or moved out by an admin).
    Draining,
    /// The decision server has no node with headroom.
    NoCapacity,
    /// A request was well-formed but not acceptable (bad admin tag, stale timestamp, unknown node).
    BadRequest,
    /// The node asks the client to move to rebalance load.
    Rebalance,
    /// An internal failure on the sender's side.
    Internal,
    /// The user already has the maximum number of sessions on this node
    /// (protocol version 2; sent to version-1 clients too, §4.1).
    SessionLimit,
    /// Durable mode (protocol.md §13): the log cannot keep messages now, so
    /// the node confirms nothing and admits no session it cannot serve.
    LogUnavailable,
    /// A code this implementation does not know.
    Other(u16),
}

impl Code {
    /// The wire value of this code.
    pub const fn to_u16(self) -> u16 {
        match self {
            Code::ProtocolError => 1,
            Code::UnsupportedVersion => 2,
            Code::BadMagic => 3,
            Code::FrameTooLarge => 4,
            Code::UnknownFrameType => 5,
            Code::UnexpectedFrame => 6,
            Code::HandshakeTimeout => 7,
            Code::AuthFailed => 8,
            Code::TokenExpired => 9,
            Code::ServerFull => 10,
            Code::SlowConsumer => 11,
            Code::IdleTimeout => 12,
            Code::Draining => 13,
            Code::NoCapacity => 14,
            Code::BadRequest => 15,
            Code::Rebalance => 16,
            Code::Internal => 17,
            Code::SessionLimit => 18,
            Code::LogUnavailable => 19,
            Code::Other(n) => n,
        }
    }

    /// Maps a wire value to a code; unknown values become [`Code::Other`].
    pub const fn from_u16(n: u16) -> Code {
        match n {
            1 => Code::ProtocolError,
            2 => Code::UnsupportedVersion,
            3 => Code::BadMagic,
            4 => Code::FrameTooLarge,
            5 => Code::UnknownFrameType,
            6 => Code::UnexpectedFrame,
            7 => Code::HandshakeTimeout,
            8 => Code::AuthFailed,
            9 => Code::TokenExpired,
            10 => Code::ServerFull,
            11 => Code::SlowConsumer,
            12 => Code::IdleTimeout,
            13 => Code::Draining,
            14 => Code::NoCapacity,
            15 => Code::BadRequest,
            16 => Code::Rebalance,
            17 => Code::Internal,
            18 => Code::SessionLimit,
            19 => Code::LogUnavailable,
            n => Code::Other(n),
        }
    }

    /// A short stable name, used in logs and as a metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            Code::ProtocolError => "protocol_error",
            Code::UnsupportedVersion => "unsupported_version",
            Code::BadMagic => "bad_magic",
            Code::FrameTooLarge => "frame_too_large",
            Code::UnknownFrameType => "unknown_frame_type",
            Code::UnexpectedFrame => "unexpected_frame",
            Code::HandshakeTimeout => "handshake_timeout",
            Code::AuthFailed => "auth_failed",
            Code::TokenExpired => "token_expired",
            Code::ServerFull => "server_full",
            Code::SlowConsumer => "slow_consumer",
            Code::IdleTimeout => "idle_timeout",
            Code::Draining => "draining",
            Code::NoCapacity => "no_capacity",
            Code::BadRequest => "bad_request",
            Code::Rebalance => "rebalance",
            Code::Internal => "internal",
            Code::SessionLimit => "session_limit",
            Code::LogUnavailable => "log_unavailable",
            Code::Other(_) => "other",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Other(n) => write!(f, "code {n}"),
            c => write!(f, "{} ({})", c.name(), c.to_u16()),
        }
    }
}

/// What a WELCOME says about the client's resume request (protocol.md §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResumeResult {
    /// The client did not ask to resume.
    Fresh,
    /// Every message after the client's position follows, in order, then live traffic.
    Resumed,
    /// Same stream, but some messages after the client's position are no longer
    /// retained: `next_seq - last_seq - 1` messages were lost.
    Gap,
    /// The stream the client named is unknown here (other node, node restart, or
    /// grace period over); the client cannot know what it missed.
    Restarted,
}

impl ResumeResult {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            ResumeResult::Fresh => 0,
            ResumeResult::Resumed => 1,
            ResumeResult::Gap => 2,
            ResumeResult::Restarted => 3,
        }
    }
    /// Parses a wire value; `None` for values not defined in version 1.
    pub const fn from_u8(n: u8) -> Option<ResumeResult> {
        match n {
            0 => Some(ResumeResult::Fresh),
            1 => Some(ResumeResult::Resumed),
            2 => Some(ResumeResult::Gap),
            3 => Some(ResumeResult::Restarted),
            _ => None,
        }
    }
}

/// Where a GOODBYE tells the client to go next (protocol.md §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoodbyeAction {
    /// Ask the decision servers for a node again, after `delay_ms`.
    AskDecision,
    /// Connect to the node named in `target`, after `delay_ms`.
    GoToNode,
    /// Reconnect to this same node after `delay_ms`.
    RetryAfter,
}

impl GoodbyeAction {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            GoodbyeAction::AskDecision => 0,
            GoodbyeAction::GoToNode => 1,
            GoodbyeAction::RetryAfter => 2,
        }
    }
    /// Parses a wire value; `None` for values not defined in version 1.
    pub const fn from_u8(n: u8) -> Option<GoodbyeAction> {
        match n {
            0 => Some(GoodbyeAction::AskDecision),
            1 => Some(GoodbyeAction::GoToNode),
            2 => Some(GoodbyeAction::RetryAfter),
            _ => None,
        }
    }
}

/// Admin operations (protocol.md §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminOp {
    /// Return an ADMIN_STATUS table.
    Status,
    /// Set the load ceiling in percent, globally (empty node) or for one node.
    SetCeiling,
    /// Override a node's capacity (connections at 100 % load).
    SetCapacity,
    /// Stop assigning a node and ask it to move its clients away.
    Drain,
    /// Undo a drain.
    Undrain,
}

impl AdminOp {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            AdminOp::Status => 1,
            AdminOp::SetCeiling => 2,
            AdminOp::SetCapacity => 3,
            AdminOp::Drain => 4,
            AdminOp::Undrain => 5,
        }
    }
    /// Parses a wire value; `None` for values not defined in version 1.
    pub const fn from_u8(n: u8) -> Option<AdminOp> {
        match n {
            1 => Some(AdminOp::Status),
            2 => Some(AdminOp::SetCeiling),
            3 => Some(AdminOp::SetCapacity),
            4 => Some(AdminOp::Drain),
            5 => Some(AdminOp::Undrain),
            _ => None,
        }
    }
}

/// Presence operation in a PRESENCE entry (protocol.md §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceOp {
    /// The user has no session on the sender any more.
    Offline,
    /// The user has at least one session on the sender.
    Online,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for n in 0..=40u16 {
            assert_eq!(Code::from_u16(n).to_u16(), n);
        }
        assert_eq!(Code::from_u16(9999), Code::Other(9999));
    }

    #[test]
    fn small_enums_round_trip() {
        for n in 0..=255u8 {
            if let Some(r) = ResumeResult::from_u8(n) {
                assert_eq!(r.to_u8(), n);
            }
            if let Some(a) = GoodbyeAction::from_u8(n) {
                assert_eq!(a.to_u8(), n);
            }
            if let Some(o) = AdminOp::from_u8(n) {
                assert_eq!(o.to_u8(), n);
            }
        }
    }
}
