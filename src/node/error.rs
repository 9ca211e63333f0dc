//! The node's typed errors: what [`super::Node::bind`] and
//! [`super::Node::run`] can fail with.

use std::fmt;
use std::io;

/// Why a node could not start or stopped with a failure.
#[derive(Debug)]
pub enum NodeError {
    /// A setting is out of range (the message says which and why).
    Config(String),
    /// A listener could not be bound.
    Bind {
        /// Which endpoint (client, ingest, metrics).
        what: &'static str,
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS's error.
        source: io::Error,
    },
    /// The TLS certificate, key or CA could not be loaded.
    Tls(crate::tls::TlsError),
    /// The OS refused a poll, waker or thread.
    Setup(io::Error),
    /// Durable mode: the log could not be reached or set up.
    Durable(String),
    /// An event loop failed with an I/O error.
    LoopFailed {
        /// The loop's index.
        loop_id: usize,
        /// The error.
        source: io::Error,
    },
    /// An event loop panicked (a bug); its users could not be served.
    LoopPanicked {
        /// The loop's index.
        loop_id: usize,
    },
}

impl NodeError {
    /// The kind of I/O error this corresponds to (`InvalidInput` for a bad
    /// setting).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            NodeError::Config(_) | NodeError::Tls(_) => io::ErrorKind::InvalidInput,
            NodeError::Durable(_) => io::ErrorKind::NotConnected,
            NodeError::Bind { source, .. }
            | NodeError::LoopFailed { source, .. }
            | NodeError::Setup(source) => source.kind(),
            NodeError::LoopPanicked { .. } => io::ErrorKind::Other,
        }
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::Config(m) => write!(f, "{m}"),
            NodeError::Durable(m) => write!(f, "durable mode: {m}"),
            NodeError::Tls(e) => write!(f, "{e}"),
            NodeError::Bind { what, addr, source } => {
                write!(f, "cannot bind the {what} address {addr}: {source}")
            }
            NodeError::Setup(e) => write!(f, "cannot set up the event loop: {e}"),
            NodeError::LoopFailed { loop_id, source } => write!(f, "event loop {loop_id}: {source}"),
            NodeError::LoopPanicked { loop_id } => write!(f, "event loop {loop_id} panicked"),
        }
    }
}

impl std::error::Error for NodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NodeError::Bind { source, .. } | NodeError::LoopFailed { source, .. } => Some(source),
            NodeError::Setup(e) => Some(e),
            NodeError::Tls(e) => Some(e),
            _ => None,
        }
    }
}

impl From<NodeError> for io::Error {
    fn from(e: NodeError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}
