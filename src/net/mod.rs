//! The readiness loop and connection layer every herald server runs on.
//!
//! - [`event_loop`]: poll, accept (with the EMFILE pause), budgeted reads,
//!   decode-and-dispatch, flushes and closes; the [`Service`] trait a server
//!   implements to give frames meaning.
//! - [`conns`]: the slab of connections and the turn's work lists; what
//!   role code calls to queue output or ask for a close.
//! - [`outbox`]: one connection's pending output (one write per flush).
//! - [`transport`]: the seam between a connection and its socket (plain
//!   TCP today; TLS becomes a variant there).
//! - [`close`]: the typed [`CloseReason`] and its metric labels.
//!
//! Nothing here knows a role: no user, token or frame meaning. Calls only go
//! down: [`EventLoop`] → [`Service`] (the roles) → [`Conns`] → codec.

pub mod close;
pub mod conns;
pub mod event_loop;
pub mod outbox;
pub mod transport;

pub use close::{CloseCounts, CloseReason};
pub use conns::{ConnId, ConnState, Conns, Framing, FIRST_CONN};
pub use event_loop::{
    descriptor_limit, listen, listen_with, EventLoop, Flow, Listener, Service, Tick, WAKER,
};
pub use transport::Transport;
