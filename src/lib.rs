//! herald: low-latency delivery of personal messages from a backend to
//! tens of thousands of connected clients.
//!
//! # Layout
//! - [`protocol`]: the wire protocol, sans-IO (frames, codec, tokens, signatures).
//!   `protocol.md` is its normative specification.
//! - [`node`]: the node's event loop, connections, registry, retention, metrics.
//! - [`client`]: the reference client and the publisher library.
//! - [`decision`]: the decision server (heartbeat table, assignment, admin) and its client helpers.
//! - [`demo`]: `herald demo`, a whole cluster on loopback with simulated traffic.
//! - [`swarm`]: thousands of simulated clients on one loop (demo and probe).
//! - [`cli`]: helpers shared by the command-line tools (secrets, durations).
//! - [`logging`]: the stderr logger behind the [`log`] facade the library logs through.
//!
//! The `herald` binary (`src/bin/herald.rs`) is a thin command-line front end
//! over this library.

#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod decision;
pub mod demo;
pub mod logging;
pub mod node;
mod outbox;
pub mod protocol;
pub mod swarm;
