//! Publishers over HTTP (`herald node --http ADDR`, http-api.md): one
//! keep-alive connection's requests, read by [`super::api`], authenticated
//! with the publisher secret, routed like PUBLISH with WANT_RESULT
//! ([`super::route`]) and answered in order. A publish forwarded to a peer
//! is answered once the peer has confirmed it ([`super::confirm`]); until
//! then the connection's later requests wait in its read buffer. Runs on
//! loop 0, with the ingest port.

use std::time::{Duration, Instant};

use crate::net::{CloseReason, ConnId, Flow};
use crate::protocol::token::{self, TokenError};
use crate::protocol::Code;

use super::api::{self, ApiError, Call, Response, Routed};
use super::confirm::{Confirms, Done};
use super::conn::{ApiConn, Peer};
use super::journal::Journal;
use super::route::Route;

/// A keep-alive connection idle this long (no request in progress) is closed.
pub const IDLE: Duration = Duration::from_secs(60);

/// What answering a request needs besides the route.
pub struct Cx<'a> {
    /// Confirmed forwarding.
    pub confirms: &'a mut Confirms,
    /// The publisher secret.
    pub secret: &'a [u8],
    /// Wall clock, Unix seconds.
    pub unix: u64,
    /// Whether publishes are taken now.
    pub gate: Gate,
    /// Durable mode: what waits on the log.
    pub journal: Option<&'a mut Journal>,
}

/// Whether the node takes publishes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Yes.
    Open,
    /// It is draining: 503, come back elsewhere.
    Draining,
    /// A mesh link or another loop is behind: 503 with Retry-After.
    Busy,
}

/// Takes `data` read on `id` and answers every request it completes, in
/// order, up to one that waits for confirmation.
pub fn input(route: &mut Route<'_>, cx: &mut Cx<'_>, id: ConnId, data: &[u8], now: Instant) -> Flow {
    let Some(c) = route.conns.get_mut(id) else { return Flow::Gone };
    c.rbuf.extend_from_slice(data);
    if matches!(&c.state, Peer::Api(a) if a.held.is_some()) {
        return Flow::Continue;
    }
    let mut buf = std::mem::take(&mut c.rbuf);
    let mut at = 0;
    let flow = loop {
        let head = match api::head(&buf[at..]) {
            Ok(Some(h)) => h,
            Ok(None) => break Flow::Continue,
            // After a bad head the rest of the stream cannot be framed:
            // answer, then close.
            Err(e) => break answer(route, id, &Response { close: true, ..Response::error(&e) }, now),
        };
        let end = head.len + head.content_length;
        if buf.len() - at < end {
            break Flow::Continue;
        }
        let body = &buf[at + head.len..at + end];
        at += end;
        let Some(mut r) = handle(route, cx, id, &head, body) else {
            // Held until its forwards are confirmed ([`done`]).
            if let Some(Peer::Api(a)) = route.conns.get_mut(id).map(|c| &mut c.state) {
                a.held = a.held.map(|(batch, _)| (batch, !head.keep_alive));
            }
            break Flow::Continue;
        };
        r.close |= !head.keep_alive;
        let f = answer(route, id, &r, now);
        if f != Flow::Continue {
            break f;
        }
    };
    buf.drain(..at);
    let Some(c) = route.conns.get_mut(id) else { return Flow::Gone };
    if let Peer::Api(a) = &mut c.state {
        a.request_since = if buf.is_empty() { None } else { a.request_since.or(Some(now)) };
    }
    c.rbuf = buf;
    flow
}

/// Queues `r`; closes after it if it says so.
fn answer(route: &mut Route<'_>, id: ConnId, r: &Response, now: Instant) -> Flow {
    let Some(out) = route.conns.queue(id) else { return Flow::Gone };
    r.encode(out);
    if r.close {
        route.conns.begin_close(id, CloseReason::Served, now);
        return Flow::Stop;
    }
    Flow::Continue
}

/// The answer to one request, or None if it waits for confirmations.
fn handle(
    route: &mut Route<'_>,
    cx: &mut Cx<'_>,
    id: ConnId,
    head: &api::Head,
    body: &[u8],
) -> Option<Response> {
    if let Err(e) = authorize(route, id, head, cx.secret, cx.unix) {
        return Some(Response::error(&e));
    }
    let call = match api::call(head, body) {
        Ok(c) => c,
        Err(e) => return Some(Response::error(&e)),
    };
    let refuse = |code, message: &str| {
        Response::error(&ApiError { status: 503, code, field: None, message: message.into(), allow: None })
    };
    if !matches!(call, Call::User(_)) {
        match cx.gate {
            Gate::Open => {}
            Gate::Draining => {
                return Some(refuse("draining", "the node is draining; publish to another node"))
            }
            Gate::Busy => {
                return Some(refuse("busy", "the node is behind on forwarding; retry after the delay"))
            }
        }
    }
    let (msgs, batch) = match call {
        Call::Publish(m) => (vec![m], false),
        Call::Batch(ms) => (ms, true),
        Call::User(u) => return Some(user(route, &u)),
    };
    if let Some(j) = cx.journal.as_deref_mut() {
        // Durable mode: answered once the log has every message.
        let Some(Peer::Api(a)) = route.conns.get_mut(id).map(|c| &mut c.state) else { return None };
        a.next_request = a.next_request.wrapping_add(1);
        let rid = a.next_request;
        let ready = j.request(
            id,
            rid,
            msgs.iter().map(|m| (&m.user[..], &m.key[..], &m.payload[..], &b""[..], false)),
        );
        if let Some((_, d)) = ready.into_iter().next() {
            return Some(published(&d, batch));
        }
        if let Some(Peer::Api(a)) = route.conns.get_mut(id).map(|c| &mut c.state) {
            a.held = Some((batch, false));
        }
        return None;
    }
    let routed: Vec<(bool, Vec<ConnId>)> = msgs
        .iter()
        .map(|m| {
            let mut links = Vec::new();
            let (local, _) = route.deliver(&m.user, &m.key, &m.payload, true, Some(&mut links));
            (local, links)
        })
        .collect();
    let Some(Peer::Api(a)) = route.conns.get_mut(id).map(|c| &mut c.state) else { return None };
    a.next_request = a.next_request.wrapping_add(1);
    match cx.confirms.request(id, a.next_request, routed.into_iter()) {
        Some(d) => Some(published(&d, batch)),
        None => {
            a.held = Some((batch, false));
            None
        }
    }
}

fn published(d: &Done, batch: bool) -> Response {
    if d.refused {
        let message = "the replicated log cannot keep messages now; nothing of this request was confirmed";
        let e = ApiError {
            status: 503,
            code: "log_unavailable",
            field: None,
            message: message.into(),
            allow: None,
        };
        return Response::error(&e);
    }
    let rs: Vec<Routed> = d.routed.iter().map(|&(local, forwarded)| Routed { local, forwarded }).collect();
    Response::published(&rs, batch)
}

/// A held publish of `id` is confirmed (or its links are gone): answers it,
/// then the requests that waited behind it.
pub fn done(route: &mut Route<'_>, cx: &mut Cx<'_>, id: ConnId, d: &Done, now: Instant) -> Flow {
    let Some(Peer::Api(a)) = route.conns.get_mut(id).map(|c| &mut c.state) else { return Flow::Gone };
    let Some((batch, close)) = a.held.take() else { return Flow::Continue };
    let r = Response { close, ..published(d, batch) };
    match answer(route, id, &r, now) {
        Flow::Continue => input(route, cx, id, &[], now),
        f => f,
    }
}

/// The bearer token must be a publisher credential (the ingest port's, §9).
fn authorize(
    route: &mut Route<'_>,
    id: ConnId,
    head: &api::Head,
    secret: &[u8],
    unix: u64,
) -> Result<(), ApiError> {
    let unauthorized = |code, message: &str| ApiError {
        status: 401,
        code,
        field: None,
        message: message.into(),
        allow: None,
    };
    let Some(bearer) = head.bearer.as_deref() else {
        return Err(unauthorized("unauthorized", "send Authorization: Bearer <publisher credential>"));
    };
    let Some(Peer::Api(a)) = route.conns.get_mut(id).map(|c| &mut c.state) else {
        return Err(unauthorized("unauthorized", "connection closed"));
    };
    if a.verified.as_ref().is_some_and(|(t, exp)| **t == *bearer && unix < *exp) {
        return Ok(());
    }
    match token::verify(bearer, secret, unix) {
        Ok(claims) => {
            a.verified = Some((bearer.into(), claims.expires));
            Ok(())
        }
        Err(TokenError::Expired) => {
            Err(unauthorized("token_expired", "the publisher credential has expired"))
        }
        Err(_) => Err(unauthorized("unauthorized", "the publisher credential does not verify")),
    }
}

/// `GET /v1/users/{id}`: this node's view of the user.
fn user(route: &mut Route<'_>, u: &[u8]) -> Response {
    let mut nodes: Vec<String> = route
        .presence
        .peers_of(u)
        .iter()
        .filter_map(|&p| route.conns.get(ConnId(p)).and_then(|c| c.state.link()).map(|l| l.peer_id.clone()))
        .collect();
    nodes.sort();
    let here = route.sessions.reg.find(u).and_then(|i| route.sessions.reg.user(i));
    let mut v = serde_json::json!({
        "user": String::from_utf8_lossy(u),
        "online_here": false,
        "sessions_here": 0,
        "stream": null,
        "peers": nodes,
    });
    if let Some(st) = here {
        v["online_here"] = (!st.sessions.is_empty()).into();
        v["sessions_here"] = st.sessions.len().into();
        v["stream"] = serde_json::json!({ "epoch": st.epoch.to_string(), "head": st.head });
    } else if let Some(r) = route.router.as_deref() {
        // With --threads the user may be owned by another loop: online or
        // not is known here, its stream position only there.
        if let super::shard::Route::Send { online: true } = r.homes.route(u) {
            v["online_here"] = true.into();
            v["sessions_here"] = serde_json::Value::Null;
        }
    }
    let online = v["online_here"] == true || !v["peers"].as_array().is_some_and(Vec::is_empty);
    v["online"] = online.into();
    Response { status: 200, body: v.to_string(), retry_after: None, close: false, allow: None }
}

/// The sweep's verdict on an API connection at `now`: a request in
/// progress for longer than `deadline`, or idle for [`IDLE`], is closed.
pub fn expired(a: &ApiConn, last_rx: Instant, deadline: Duration, now: Instant) -> Option<Code> {
    match a.request_since {
        Some(t) if now.saturating_duration_since(t) >= deadline => Some(Code::HandshakeTimeout),
        None if now.saturating_duration_since(last_rx) >= IDLE => Some(Code::IdleTimeout),
        _ => None,
    }
}
