//! The decoder's typed error, and its mapping onto the wire error codes.
//!
//! Every way a byte slice can fail to be a frame has its own variant, so a
//! test can say exactly which failure it expects and a node can send the
//! matching ERROR code (protocol.md §2.4) before closing the connection.

use std::fmt;

use super::channel::Channel;
use super::codes::Code;

/// Why a byte slice is not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix was 0: every frame has at least a type byte.
    EmptyFrame,
    /// The length prefix is over the limit of the channel. Detected from the
    /// first four bytes, before anything is buffered.
    FrameTooLarge {
        /// The declared length.
        len: u32,
        /// The channel's limit.
        max: u32,
    },
    /// The type byte is not defined in protocol version 1.
    UnknownType(u8),
    /// The type is defined, but not allowed on this channel.
    UnexpectedType {
        /// The type byte.
        ty: u8,
        /// The channel it arrived on.
        channel: Channel,
    },
    /// The type is allowed on the channel, but not in the connection's
    /// current state (e.g. PING before the handshake is done).
    NotNow(u8),
    /// The length is over the largest valid frame of this type (one whose
    /// fields are all bounded, [`crate::protocol::frame::max_frame_len`]).
    LongerThanType {
        /// The type byte.
        ty: u8,
        /// The declared length.
        len: u32,
        /// The largest valid length of that type.
        max: u32,
    },
    /// A first frame did not start with the magic number `HRLD`.
    BadMagic(u32),
    /// The body ended before `field` was complete.
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A length-prefixed field's length is outside its allowed range.
    BadLength {
        /// The field.
        field: &'static str,
        /// Its declared length.
        len: usize,
    },
    /// A field has a value that version 1 does not define.
    BadValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A decision-server request (protocol.md §7) names a version this
    /// implementation does not speak; the rest of its body is not parsed.
    UnsupportedVersion(u8),
    /// The body is longer than the fields it must hold.
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
}

impl DecodeError {
    /// The ERROR code a receiver sends before closing (protocol.md §2.4).
    pub fn code(&self) -> Code {
        match self {
            DecodeError::FrameTooLarge { .. } => Code::FrameTooLarge,
            DecodeError::UnknownType(_) => Code::UnknownFrameType,
            DecodeError::UnexpectedType { .. } | DecodeError::NotNow(_) => Code::UnexpectedFrame,
            DecodeError::BadMagic(_) => Code::BadMagic,
            DecodeError::UnsupportedVersion(_) => Code::UnsupportedVersion,
            DecodeError::EmptyFrame
            | DecodeError::LongerThanType { .. }
            | DecodeError::Truncated { .. }
            | DecodeError::BadLength { .. }
            | DecodeError::BadValue { .. }
            | DecodeError::TrailingBytes { .. } => Code::ProtocolError,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::EmptyFrame => write!(f, "frame length is 0"),
            DecodeError::FrameTooLarge { len, max } => {
                write!(f, "frame length {len} is over the limit {max}")
            }
            DecodeError::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            DecodeError::UnexpectedType { ty, channel } => {
                write!(f, "frame type 0x{ty:02x} is not allowed on {channel:?}")
            }
            DecodeError::NotNow(t) => write!(f, "frame type 0x{t:02x} is not allowed now"),
            DecodeError::LongerThanType { ty, len, max } => {
                write!(f, "frame length {len} is over {max}, the largest valid frame of type 0x{ty:02x}")
            }
            DecodeError::BadMagic(m) => write!(f, "bad magic 0x{m:08x}, expected 0x4852_4c44"),
            DecodeError::Truncated { field } => write!(f, "frame ends inside field `{field}`"),
            DecodeError::BadLength { field, len } => {
                write!(f, "field `{field}` has out-of-range length {len}")
            }
            DecodeError::BadValue { field, value } => {
                write!(f, "field `{field}` has undefined value {value}")
            }
            DecodeError::UnsupportedVersion(v) => write!(
                f,
                "request version {v}; versions {}..={} are spoken here",
                crate::protocol::MIN_VERSION,
                crate::protocol::VERSION
            ),
            DecodeError::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes after the last field")
            }
        }
    }
}

impl std::error::Error for DecodeError {}
