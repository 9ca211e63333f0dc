//! The node: authenticates clients, takes messages from publishers and
//! other nodes, and writes each one to the sessions of exactly one user.
//!
//! It runs on the shared readiness loop (`crate::net`); this module is its
//! roles, each in its own room. Calls only go down the list:
//!
//! - [`cli`]: `herald node`: arguments to [`Config`], then run.
//! - `server`: [`Node`]: binds the listeners and runs one event loop per
//!   `--threads` (plus the cluster helper threads), and stops them.
//! - `service`: the node's `net::Service`: dispatches each frame
//!   to its room and wires what one room reports to the others.
//! - `duty`: the timed duties (sweep, drains, heartbeats, stats).
//! - The rooms:
//!   - `session`: client sessions: HELLO, WELCOME, resume, delivery
//!     with the queue bound and slow-consumer policy, with `conflate`,
//!     a backed-up session's latest message per key;
//!   - `publish`: publishers: PUB_HELLO, PUBLISH, PUBLISH_BATCH;
//!   - `link`: mesh links: the PEER_* handshake, presence, dialling;
//!   - [`confirm`]: a confirmed publish's forwards, confirmed by PING/PONG
//!     on the link before its PUB_RESULT counts them;
//!   - `http`: `/metrics` and `/healthz`;
//!   - `http_publish`: publishers over HTTP (`--http`), with `api`, the
//!     API's requests and answers, sans-IO;
//!   - `intake`: connectors' batches (`--source`), routed like confirmed
//!     publishes and answered per message, with `dedup`, the ids of queue
//!     messages already appended here;
//!   - `route`: where a message goes (local sessions, another loop, peers);
//!   - `auth`: one authentication step for every hello.
//! - Their parts: `conn` (each connection's state), `keepalive` and
//!   `drain` (pure timing decisions), `registry` (users, streams and
//!   resume), `retention` (the message ring), [`mesh`] (presence of users
//!   on other nodes), [`shard`] (several loops), `cluster` (discovery,
//!   dials, heartbeats), `metrics`, `config`, `error`.
//!
//! The per-client "queue" is the connection's own output buffer, owned by
//! the loop: no lock, no cross-thread hand-off and no wakeup on the delivery
//! path, and the bound is in bytes (protocol frames), which is what a slow
//! reader actually costs.
//!
//! With `--threads N` (N > 1) the node runs N loops, each owning the users
//! that hash to it; loop 0 also owns the listeners, publishers and mesh
//! links and routes each message to its user's loop in per-turn batches with
//! one wake per batch ([`shard`] has the details). With one loop nothing
//! crosses a thread at all.

#[doc(hidden)]
pub mod api;
pub(crate) mod auth;
pub mod cli;
pub(crate) mod cluster;
pub(crate) mod config;
pub mod confirm;
pub(crate) mod conflate;
pub(crate) mod conn;
pub(crate) mod dedup;
pub(crate) mod drain;
pub(crate) mod duty;
pub(crate) mod error;
pub(crate) mod fxhash;
pub(crate) mod http;
pub(crate) mod http_publish;
pub(crate) mod intake;
pub(crate) mod journal;
pub(crate) mod keepalive;
pub(crate) mod link;
#[doc(hidden)]
pub mod mesh;
pub(crate) mod metrics;
pub(crate) mod publish;
pub(crate) mod registry;
pub(crate) mod retention;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod session;
#[doc(hidden)]
pub mod shard;
pub(crate) mod unrouted;

pub use cluster::decision_endpoints;
pub use config::{default_capacity, Config, SlowPolicy, TlsPorts, MAX_THREADS};
pub use error::NodeError;
pub use server::{Node, ShutdownHandle};
