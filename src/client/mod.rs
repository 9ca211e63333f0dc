//! The reference client and publisher libraries (blocking, std::net).
//!
//! [`Client`] connects to a node, performs the handshake, hands messages to
//! the application as [`Event`]s (an iterator, or a callback with
//! [`Client::run`]), answers keepalives, and on any disconnect reconnects with
//! jittered exponential backoff and resumes from the last position it
//! delivered. Every loss the protocol can reveal is reported as an event;
//! nothing is skipped silently.
//!
//! [`Publisher`] sends messages to users, one at a time or in batches, with
//! blocking writes so that a node's TCP back-pressure slows it down instead
//! of growing a buffer.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::protocol::{self, Code};

// The parts: `session` (the Client, its settings and events, and the loop
// that turns frames into events), `reconnect` (choosing a node, backoff, the
// HELLO/WELCOME handshake and resume checks), `publisher` (the Publisher and
// its failover), `http` (the HttpPublisher, for the HTTP publish API), `backoff` (reconnect jitter), and `wire` (the handshake
// deadline and timed reads both share, over a `crate::dial` stream, plain
// or TLS). This file holds
// only the error type they share and the public paths; it must not grow
// logic of its own.
mod backoff;
mod http;
mod publisher;
mod reconnect;
mod session;
pub(crate) mod wire;

pub use http::HttpPublisher;
pub use publisher::Publisher;
pub use session::{Client, ClientConfig, Event, Message};

/// Client library errors.
#[derive(Debug)]
pub enum ClientError {
    /// A socket operation failed.
    Io(io::Error),
    /// The node refused us with an ERROR that retrying cannot fix
    /// (bad or expired token, unsupported version).
    Rejected {
        /// The code.
        code: Code,
        /// The node's message.
        message: String,
    },
    /// The node sent bytes that are not valid protocol.
    Protocol(protocol::DecodeError),
    /// No node address is configured or resolvable.
    NoNode,
    /// The connection closed.
    Closed,
    /// The decision servers have no capacity; ask again after this long.
    NoCapacity(Duration),
    /// The node's WELCOME broke protocol.md §3.2 (the client sent ERROR and closed).
    BadWelcome(String),
    /// The node refused the session with SESSION_LIMIT: the user already has
    /// the most sessions the node allows (protocol.md §3.1 step 5). Another
    /// node must not be asked to get around it; a running [`Client`]
    /// reports it as [`Event::Disconnected`] with that code and tries the
    /// same node again only after [`SESSION_LIMIT_BACKOFF`] to twice that.
    SessionLimit(String),
    /// The HTTP publish API answered with an error or an answer that is not
    /// its JSON ([`HttpPublisher`]): the status (0 if none) and what it said.
    Http {
        /// The HTTP status.
        status: u16,
        /// The body, or what was wrong with the answer.
        message: String,
    },
}

/// The least a client waits after SESSION_LIMIT before trying again (the
/// cap frees up only when one of the user's other sessions ends).
pub const SESSION_LIMIT_BACKOFF: Duration = Duration::from_secs(30);

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Rejected { code, message } => write!(f, "rejected by node: {code}: {message}"),
            ClientError::Protocol(e) => write!(f, "protocol error from node: {e}"),
            ClientError::NoNode => write!(f, "no node address to connect to"),
            ClientError::Closed => write!(f, "connection closed"),
            ClientError::NoCapacity(d) => write!(f, "no node has capacity; retry after {d:?}"),
            ClientError::BadWelcome(m) => write!(f, "invalid WELCOME from node: {m}"),
            ClientError::SessionLimit(m) => write!(f, "refused by node: session_limit (18): {m}"),
            ClientError::Http { status, message } => write!(f, "HTTP {status}: {message}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}
