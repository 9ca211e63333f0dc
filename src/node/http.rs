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
    if c.rbuf.len() + data.len() > MAX_HEAD {
        conns.abort(id, CloseReason::RequestTooLarge);
        return Err(Flow::Stop);
    }
    c.rbuf.extend_from_slice(data);
    let Some(end) = c.rbuf.windows(4).position(|w| w == b"\r\n\r\n") else { return Err(Flow::Continue) };
    let head = String::from_utf8_lossy(&c.rbuf[..end]);
    let req = match head.split_whitespace().nth(1).unwrap_or("/") {
        "/metrics" => Request::Metrics,
        "/healthz" => Request::Health,
        _ => Request::Other,
    };
    Ok(req)
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
