//! Why a connection closed: one typed reason for every connection of every
//! herald server (node and decision server), counted under a stable label.
//!
//! The event loop hands each connection's reason to its service exactly
//! once ([`crate::net::Service::closed`]); `/metrics` and the logs count it
//! by [`CloseReason::label`]. Codes a peer is sent (ERROR or GOODBYE) are
//! grouped as the node's `herald_closes_total` has always grouped them: every
//! framing or state violation is `protocol_error`.

use crate::protocol::Code;

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side (EOF) or reset the connection.
    PeerClosed,
    /// The peer sent ERROR.
    PeerError,
    /// The peer sent GOODBYE (a mesh link or a node leaving).
    PeerGoodbye,
    /// A socket error other than a reset.
    Io,
    /// We closed it after sending ERROR or GOODBYE with this code.
    Sent(Code),
    /// Refused at accept: the listener already holds its most connections.
    TooMany,
    /// A mesh link replaced by a newer authenticated link to the same peer.
    Replaced,
    /// An HTTP request head over its size limit.
    RequestTooLarge,
    /// An HTTP exchange is over: the response was written.
    Served,
    /// The TLS session failed (a bad handshake, a certificate refused, or
    /// bytes that are not TLS on a TLS port).
    Tls,
    /// A client cut off as a slow consumer (GOODBYE SLOW_CONSUMER) because
    /// the node's pending output as a whole was over its budget and this
    /// session's queue was among the largest.
    OutputBudget,
}

/// Every label [`CloseReason::label`] can return, in the order `/metrics`
/// lists them (the first twelve are the node's original set).
pub const LABELS: [&str; 20] = [
    "peer_closed",
    "io_error",
    "protocol_error",
    "auth_failed",
    "token_expired",
    "unsupported_version",
    "handshake_timeout",
    "idle_timeout",
    "slow_consumer",
    "server_full",
    "draining",
    "other",
    "peer_error",
    "peer_goodbye",
    "too_many_connections",
    "replaced",
    "request_too_large",
    "tls_error",
    "session_limit",
    "output_budget",
];

/// Index of `served` (not a failure; not listed in [`LABELS`]' metric
/// family, see [`CloseReason::index`]).
const SERVED: usize = LABELS.len();

impl CloseReason {
    /// The index of this reason's label in [`LABELS`]; [`CloseReason::Served`]
    /// is `LABELS.len()` (counted apart: a finished HTTP exchange is not a
    /// close anyone alerts on).
    pub const fn index(self) -> usize {
        match self {
            CloseReason::PeerClosed => 0,
            CloseReason::Io => 1,
            CloseReason::Sent(c) => match c {
                Code::ProtocolError
                | Code::BadMagic
                | Code::FrameTooLarge
                | Code::UnknownFrameType
                | Code::UnexpectedFrame
                | Code::BadRequest => 2,
                Code::AuthFailed => 3,
                Code::TokenExpired => 4,
                Code::UnsupportedVersion => 5,
                Code::HandshakeTimeout => 6,
                Code::IdleTimeout => 7,
                Code::SlowConsumer => 8,
                Code::ServerFull => 9,
                Code::Draining => 10,
                Code::SessionLimit => 18,
                _ => 11,
            },
            CloseReason::PeerError => 12,
            CloseReason::PeerGoodbye => 13,
            CloseReason::TooMany => 14,
            CloseReason::Replaced => 15,
            CloseReason::RequestTooLarge => 16,
            CloseReason::Tls => 17,
            CloseReason::OutputBudget => 19,
            CloseReason::Served => SERVED,
        }
    }

    /// A short stable name, for counters and logs.
    pub const fn label(self) -> &'static str {
        match self.index() {
            SERVED => "served",
            i => LABELS[i],
        }
    }
}

/// Closes counted by reason: one slot per [`LABELS`] entry plus `served`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseCounts(pub [u64; LABELS.len() + 1]);

impl CloseCounts {
    /// Counts one close.
    pub fn add(&mut self, r: CloseReason) {
        self.0[r.index()] += 1;
    }

    /// Closes with this reason's label.
    pub fn get(&self, r: CloseReason) -> u64 {
        self.0[r.index()]
    }

    /// Adds another set of counts to these.
    pub fn merge(&mut self, o: &CloseCounts) {
        for (a, b) in self.0.iter_mut().zip(o.0.iter()) {
            *a += b;
        }
    }

    /// (label, count) for every failure label, `served` excluded.
    pub fn labelled(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LABELS.iter().copied().zip(self.0.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label() {
        assert_eq!(CloseReason::Sent(Code::AuthFailed).label(), "auth_failed");
        assert_eq!(CloseReason::Sent(Code::UnexpectedFrame).label(), "protocol_error");
        assert_eq!(CloseReason::PeerClosed.label(), "peer_closed");
        assert_eq!(CloseReason::TooMany.label(), "too_many_connections");
        assert_eq!(CloseReason::Served.label(), "served");
        let all = [
            CloseReason::PeerClosed,
            CloseReason::PeerError,
            CloseReason::PeerGoodbye,
            CloseReason::Io,
            CloseReason::TooMany,
            CloseReason::Replaced,
            CloseReason::RequestTooLarge,
            CloseReason::Tls,
            CloseReason::OutputBudget,
            CloseReason::Served,
        ];
        let mut seen: Vec<&str> = all.iter().map(|r| r.label()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), all.len(), "distinct labels");
        let mut c = CloseCounts::default();
        c.add(CloseReason::Served);
        c.add(CloseReason::Sent(Code::SlowConsumer));
        assert_eq!(c.get(CloseReason::Sent(Code::SlowConsumer)), 1);
        assert_eq!(c.labelled().map(|(_, n)| n).sum::<u64>(), 1, "served is not a failure label");
    }
}
