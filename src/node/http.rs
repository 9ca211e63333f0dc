//! The node's HTTP endpoints on the metrics port: `GET /metrics`
//! (Prometheus text) and `GET /healthz` (200, or 503 and why). One request
//! per connection, answered and closed; a request head over 8 KiB is
//! refused unanswered.
//!
//! This file reads the request and writes the response; what the body says
//! is the caller's (it knows the figures and the node's health).

use std::io::Write as _;
use std::time::Instant;

use crate::net::{CloseReason, ConnId, Conns, Flow};

use super::conn::Peer;

/// Longest request head taken.
const MAX_HEAD: usize = 8192;

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `/metrics`.
    Metrics,
    /// `/healthz`.
    Health,
    /// Anything else.
    Other,
}

/// Takes bytes of a request on `id`. Returns the request once its head is
/// complete; `Err` with the flow to return if it is not (yet).
pub fn input(conns: &mut Conns<Peer>, id: ConnId, data: &[u8]) -> Result<Request, Flow> {
    let Some(c) = conns.get_mut(id) else { return Err(Flow::Gone) };
    match take(&mut c.rbuf, data) {
        Head::Complete(req) => Ok(req),
        Head::Partial => Err(Flow::Continue),
        Head::TooLarge => {
            conns.abort(id, CloseReason::RequestTooLarge);
            Err(Flow::Stop)
        }
    }
}

/// What a connection's bytes so far say (see [`take`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The head is complete: what it asks for.
    Complete(Request),
    /// No end of head yet: wait for more bytes.
    Partial,
    /// The head would exceed 8 KiB: refuse the connection unanswered.
    TooLarge,
}

/// Most bytes of a request head [`take`] keeps.
#[doc(hidden)]
pub const MAX_HEAD_BYTES: usize = MAX_HEAD;

/// The request reader without the connection around it (sans-IO; also the
/// fuzzing entry point): appends `data` to `rbuf`, the bytes read so far on
/// the connection, unless that would exceed the head limit, and looks for
/// the end of the head.
#[doc(hidden)]
pub fn take(rbuf: &mut Vec<u8>, data: &[u8]) -> Head {
    if rbuf.len() + data.len() > MAX_HEAD {
        return Head::TooLarge;
    }
    rbuf.extend_from_slice(data);
    let Some(end) = rbuf.windows(4).position(|w| w == b"\r\n\r\n") else { return Head::Partial };
    let head = String::from_utf8_lossy(&rbuf[..end]);
    let req = match head.split_whitespace().nth(1).unwrap_or("/") {
        "/metrics" => Request::Metrics,
        "/healthz" => Request::Health,
        _ => Request::Other,
    };
    Head::Complete(req)
}

/// Writes the response and closes once it is out.
pub fn respond(conns: &mut Conns<Peer>, id: ConnId, status: &str, body: &str, now: Instant) -> Flow {
    if let Some(out) = conns.queue(id) {
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    conns.begin_close(id, CloseReason::Served, now);
    Flow::Stop
}
