//! Publishers on the ingest port: PUB_HELLO, then PUBLISH and
//! PUBLISH_BATCH, each routed ([`super::route`]) and, when asked for,
//! answered with a PUB_RESULT (protocol.md §5), held until its forwards
//! are confirmed ([`super::confirm`]).

use std::time::Instant;

use crate::net::{ConnId, Conns, Flow};
use crate::protocol::frame::{self as f, Frame, PUBLISH_WANT_RESULT};
use crate::protocol::{limits, Code};

use super::auth::{self, Credential};
use super::config::Config;
use super::confirm::{Confirms, Done};
use super::conn::Peer;
use super::journal::Journal;
use super::keepalive::Keepalive;
use super::route::Route;

/// Runs a PUB_HELLO: on success the connection becomes a publisher and its
/// PUB_WELCOME is queued.
pub fn hello(
    conns: &mut Conns<Peer>,
    id: ConnId,
    h: &f::PubHello<'_>,
    cfg: &Config,
    unix: u64,
    now: Instant,
) -> Flow {
    let cred = Credential::Publisher { credential: h.credential, secret: &cfg.publisher_secret };
    let admitted = match auth::authenticate(h.min_version, h.max_version, cred, unix) {
        Ok(a) => a,
        Err(r) => {
            conns.fail(id, r.code, &r.message, now);
            return Flow::Stop;
        }
    };
    let Some(c) = conns.get_mut(id) else { return Flow::Gone };
    c.state = Peer::Publisher { ka: Keepalive::Quiet };
    let Some(out) = conns.queue(id) else { return Flow::Gone };
    Frame::PubWelcome(f::PubWelcome {
        version: admitted.version,
        max_frame: limits::MAX_INGEST,
        node_id: cfg.node_id.as_bytes(),
    })
    .encode(out);
    Flow::Continue
}

/// One PUBLISH from publisher `id`. With WANT_RESULT its PUB_RESULT goes
/// through `confirms`: a forward counts once the peer confirms it. In
/// durable mode (`journal`) it goes to the log first, and is delivered and
/// answered once the log has it.
#[inline]
pub fn publish(
    route: &mut Route<'_>,
    confirms: &mut Confirms,
    journal: Option<&mut Journal>,
    id: ConnId,
    p: &f::Publish<'_>,
) {
    if let Some(j) = journal {
        if p.flags & PUBLISH_WANT_RESULT == 0 {
            j.publish(p.user, p.key, p.payload);
        } else {
            let ready =
                j.request(id, p.request_id, std::iter::once((p.user, p.key, p.payload, &b""[..], false)));
            results(route.conns, &ready, route.turn.start);
        }
        return;
    }
    if p.flags & PUBLISH_WANT_RESULT == 0 {
        route.deliver(p.user, p.key, p.payload, true, None);
        return;
    }
    let mut links = Vec::new();
    let (local, _) = route.deliver(p.user, p.key, p.payload, true, Some(&mut links));
    if let Some(r) = confirms.request(id, p.request_id, std::iter::once((local, links))) {
        results(route.conns, &[(id, r)], route.turn.start);
    }
}

/// One PUBLISH_BATCH from publisher `id` (its one PUB_RESULT as for PUBLISH).
pub fn batch(
    route: &mut Route<'_>,
    confirms: &mut Confirms,
    journal: Option<&mut Journal>,
    id: ConnId,
    b: &f::PublishBatch<'_>,
) {
    if let Some(j) = journal {
        if b.flags & PUBLISH_WANT_RESULT == 0 {
            for e in b.entries.iter() {
                j.publish(e.user, e.key, e.payload);
            }
        } else {
            let msgs: Vec<_> =
                b.entries.iter().map(|e| (e.user, e.key, e.payload, &b""[..], false)).collect();
            let ready = j.request(id, b.request_id, msgs.into_iter());
            results(route.conns, &ready, route.turn.start);
        }
        return;
    }
    if b.flags & PUBLISH_WANT_RESULT == 0 {
        for e in b.entries.iter() {
            route.deliver(e.user, e.key, e.payload, true, None);
        }
        return;
    }
    let mut msgs = Vec::with_capacity(b.entries.len());
    for e in b.entries.iter() {
        let mut links = Vec::new();
        let (local, _) = route.deliver(e.user, e.key, e.payload, true, Some(&mut links));
        msgs.push((local, links));
    }
    if let Some(r) = confirms.request(id, b.request_id, msgs.into_iter()) {
        results(route.conns, &[(id, r)], route.turn.start);
    }
}

/// Writes PUB_RESULTs, each to its publisher (if still open). A request
/// the log refused (durable mode) closes its publisher with ERROR
/// LOG_UNAVAILABLE instead: nothing of it was confirmed.
pub fn results(conns: &mut Conns<Peer>, ready: &[(ConnId, Done)], now: Instant) {
    for (id, r) in ready {
        if r.refused {
            let msg = format!(
                "request {}: the replicated log cannot keep messages now; nothing of it was confirmed",
                r.request_id
            );
            conns.fail(*id, Code::LogUnavailable, &msg, now);
            continue;
        }
        if let Some(out) = conns.queue(*id) {
            Frame::PubResult(r.pub_result()).encode(out);
        }
    }
}
