//! The node suite of tests/node.rs again, with three event loops per node
//! (`--threads 3`): every client is handed from loop 0 to its user's loop, so
//! each behaviour is checked across the hand-over and the batches between
//! loops. Multi-loop specifics are in tests/threads.rs.

mod util;

const THREADS: usize = 3;

include!("util/node_suite.rs");
