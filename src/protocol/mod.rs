//! The herald wire protocol, sans-IO: frames, the codec, tokens and signatures.
//!
//! Everything that speaks herald (node, decision server, clients, publishers,
//! tools, fuzz targets) goes through this module. It encodes into `Vec<u8>`
//! and decodes from `&[u8]`; it has no sockets, no mio and no clock (callers
//! pass `now` in). `protocol.md` at the repository root is the normative
//! specification; section numbers in doc comments refer to it.
//!
//! - [`frame`]: frame types, [`decode`] and encoding; [`Channel`] and the
//!   type bytes ([`frame::ty`]) that say which frames a stream may carry.
//! - [`codes`]: error/close codes and small enums carried on the wire.
//! - [`error`]: the decoder's typed error.
//! - [`token`]: client and publisher tokens (mint and verify).
//! - [`sign`]: HMAC-SHA256 tags for heartbeats, admin requests and the mesh handshake.

mod channel;
pub mod codes;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod samples;
pub mod sign;
pub mod token;

#[cfg(test)]
mod tests;

pub use channel::Channel;
pub use codes::{AdminOp, Code, GoodbyeAction, PresenceOp, ResumeResult};
pub use error::DecodeError;
pub use frame::{decode, Decoded, Frame, Position};

/// The magic number that opens every first frame: ASCII `HRLD`.
pub const MAGIC: u32 = 0x4852_4C44;

/// The highest protocol version this implementation speaks (protocol.md §1,
/// *Versions*).
pub const VERSION: u8 = 2;

/// The lowest protocol version this implementation speaks: version 1 peers
/// keep working.
pub const MIN_VERSION: u8 = 1;

/// Whether this implementation speaks `version`.
pub fn speaks(version: u8) -> bool {
    (MIN_VERSION..=VERSION).contains(&version)
}

/// Size limits (protocol.md §2.2). Lengths are checked against these before
/// anything is buffered or allocated.
pub mod limits {
    /// Longest user id, in bytes. User ids are 1..=64 arbitrary bytes.
    pub const MAX_USER_LEN: usize = 64;
    /// Longest conflation key.
    pub const MAX_KEY_LEN: usize = 64;
    /// Longest de-duplication id in a FORWARD (protocol.md §6.5).
    pub const MAX_FORWARD_ID_LEN: usize = 64;
    /// Longest node id.
    pub const MAX_NODE_ID_LEN: usize = 64;
    /// Longest `host:port` endpoint string.
    pub const MAX_ENDPOINT_LEN: usize = 128;
    /// Longest token or publisher credential.
    pub const MAX_TOKEN_LEN: usize = 512;
    /// Longest agent string.
    pub const MAX_AGENT_LEN: usize = 64;
    /// Largest message payload.
    pub const MAX_PAYLOAD: usize = 65_536;
    /// Longest ERROR message.
    pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;
    /// Longest ADMIN_RESULT message.
    pub const MAX_ADMIN_MESSAGE_LEN: usize = 4096;
    /// Most entries in one PUBLISH_BATCH.
    pub const MAX_BATCH: usize = 1024;
    /// Most nodes in one ASSIGNMENT.
    pub const MAX_ASSIGN_RESULTS: u8 = 8;
    /// Largest length prefix a node accepts from a client.
    pub const MAX_TO_NODE: u32 = 2048;
    /// Largest length prefix a client accepts from a node: a DELIVER with a
    /// full payload (1 type byte + 16 position bytes + 65,536).
    pub const MAX_TO_CLIENT: u32 = 1 + 16 + MAX_PAYLOAD as u32;
    /// Largest length prefix on the ingest port, both ways (1 MiB).
    pub const MAX_INGEST: u32 = 1 << 20;
    /// Largest length prefix a decision server accepts.
    pub const MAX_TO_DECISION: u32 = 1024;
    /// Largest length prefix a decision server sends (1 MiB).
    pub const MAX_FROM_DECISION: u32 = 1 << 20;
    /// Largest heartbeat frame (one UDP datagram).
    pub const MAX_HEARTBEAT: u32 = 1024;
}
