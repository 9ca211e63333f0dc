//! herald: low-latency delivery of personal messages from a backend to
//! tens of thousands of connected clients.
//!
//! # Layout
//! Calls only go down this map: a server's event loop calls its roles, the
//! roles call the connection layer, and everything calls the codec.
//!
//! - [`node`]: the node's roles, one room each: client sessions
//!   (`node/session.rs`), publishers (`publish.rs`), mesh links (`link.rs`),
//!   HTTP (`http.rs`), the authentication step (`auth.rs`), routing
//!   (`route.rs`), timed duties (`duty.rs`), and what they stand on
//!   (registry, retention ring, presence, several loops, metrics, CLI).
//! - [`decision`]: the decision server (heartbeat table, assignment, admin)
//!   on the same event loop, and its client helpers.
//! - `net` (crate-private): the one readiness loop both servers run on
//!   (`net/event_loop.rs`: poll, accept, budgeted reads, decode-and-dispatch,
//!   flushes, closes), the connection layer (`net/conns.rs`, `net/outbox.rs`),
//!   the transport seam (`net/transport.rs`: plain TCP or TLS) and the
//!   typed close reasons (`net/close.rs`).
//! - [`protocol`]: the wire protocol, sans-IO (frames, codec, tokens, signatures).
//!   `protocol.md` is its normative specification.
//! - [`client`]: the reference client and the publisher library.
//! - [`source`]: connectors that pull messages from queue engines (NATS
//!   JetStream, Redis Streams) into a node, each on its own thread.
//! - `dial` (crate-private): blocking connections to nodes and decision
//!   servers, plain TCP or TLS, for the client, the publisher, decision
//!   requests and the swarm.
//! - [`decision`]: the decision server (heartbeat table, assignment, admin) and its client helpers.
//! - [`demo`]: `herald demo`, a whole cluster on loopback with simulated traffic,
//!   to the nodes' ingest ports or through a message queue (`demo/queue.rs`).
//! - [`swarm`]: thousands of simulated clients on one loop (demo and probe).
//! - [`cert`]: `herald cert`, a development CA and the TLS certificates it
//!   issues to nodes and decision servers (rcgen).
//! - [`cli`]: helpers shared by the command-line tools (secrets, durations).
//! - [`logging`]: the stderr logger behind the [`log`] facade the library logs through.
//!
//! The `herald` binary (`src/bin/herald.rs`) is a thin command-line front end
//! over this library.

#![deny(missing_docs)]

pub mod cert;
pub mod cli;
pub mod client;
pub mod decision;
pub mod demo;
pub(crate) mod dial;
pub mod durable;
pub mod logging;
pub(crate) mod net;
pub mod node;
pub mod protocol;
pub mod source;
pub mod swarm;
pub mod tls;

/// Entry points for the fuzz targets (`fuzz/`): the sans-IO pieces of
/// crate-private code. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::net::transport::fuzz::{server_session, Outcome};
    pub use crate::node::http::{take as http_take, Head, Request, MAX_HEAD_BYTES};
}
