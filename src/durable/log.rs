//! The log thread: async-nats on a current-thread tokio runtime of its
//! own (the node's event loop has no runtime in it), holding one
//! connection to the JetStream cluster. It makes sure the stream exists,
//! appends each user's messages in order under JetStream's compare-and-set
//! on the subject's last sequence (so concurrent appenders of one user on
//! several nodes get consecutive seqs, no holes, no repeats), reads users'
//! streams back (the latest message by subject, then backwards through
//! each message's `Herald-Prev`), and reports whether appends succeed.

use std::sync::Arc;

use crossbeam_channel::Sender;

use super::{Answer, Request, Spec};

/// The event loop's handle on the log thread.
pub struct Log {
    tx: tokio::sync::mpsc::UnboundedSender<Request>,
    /// The stream's creation time (ns since the Unix epoch): the base of
    /// every user's durable epoch ([`super::epoch`]).
    pub created: u64,
}

impl Log {
    /// Connects, makes sure the stream exists (waiting up to `spec.timeout`
    /// × 10 for the cluster), and starts the thread. Answers go to
    /// `answers`, each followed by `wake()`.
    pub fn start(
        spec: Spec,
        node_id: &str,
        answers: Sender<Answer>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Log, String> {
        let _ = (spec, node_id, answers, wake);
        Err("durable mode is not built yet".into())
    }

    /// Hands `r` to the log thread (never blocks). False if the thread has gone.
    pub fn send(&self, r: Request) -> bool {
        self.tx.send(r).is_ok()
    }
}
