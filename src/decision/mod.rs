//! The decision server: tells clients which node to use, from the load the
//! nodes report in signed UDP heartbeats and the ceiling an admin sets
//! (protocol.md §7, §8).
//!
//! A decision server keeps only soft state: every node heartbeats every
//! decision server once a second, so a restarted one is complete again after
//! one interval, and running two or more removes the single point of
//! failure (clients try them in order). The only state that must survive a
//! restart, what an admin set, is kept in a small state file.
//!
//! - [`table`]: the heartbeat table, assignment policy and admin operations,
//!   sans-IO (no sockets, no clock; `now` is passed in).
//! - [`asker`]: who asks for a node: the ASSIGN_REQUEST's token, verified
//!   with the client secret, or nobody (sans-IO).
//! - [`state`]: the admin settings and their state file.
//! - [`server`]: the mio event loop around the table (TCP requests, plain
//!   or TLS-only with [`Config::tls`]; UDP heartbeats, never TLS).
//! - [`client`]: blocking helpers for clients, nodes, publishers and tools,
//!   dialling plain or TLS as a [`client::Dial`] says.
//! - [`cli`]: `herald decision` and `herald admin`.

pub mod asker;
pub mod cli;
pub mod client;
pub mod server;
pub mod state;
pub mod table;

pub use server::{Config, DecisionServer, ShutdownHandle, Stats};
