//! Node behaviour over real sockets with one event loop: routing, sessions,
//! auth, bad input, slow consumers, resume, keepalive, admission, metrics
//! (the suite is in tests/util/node_suite.rs).

mod util;

const THREADS: usize = 1;

include!("util/node_suite.rs");
