//! Publishers on the ingest port: PUB_HELLO, then PUBLISH and
//! PUBLISH_BATCH, each routed ([`super::route`]) and, when asked for,
//! answered with a PUB_RESULT (protocol.md §5).

use std::time::Instant;

use crate::net::{ConnId, Conns, Flow};
use crate::protocol::frame::{self as f, Frame, PUBLISH_WANT_RESULT};
use crate::protocol::limits;

use super::auth::{self, Credential};
use super::config::Config;
use super::conn::Peer;
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

/// One PUBLISH from publisher `id`.
#[inline]
pub fn publish(route: &mut Route<'_>, id: ConnId, p: &f::Publish<'_>) {
    let (local, fwd) = route.deliver(p.user, p.payload, true);
    if p.flags & PUBLISH_WANT_RESULT != 0 {
        let r = f::PubResult {
            request_id: p.request_id,
            accepted: 1,
            local: local as u16,
            forwarded: fwd as u16,
            no_route: !(local || fwd) as u16,
        };
        if let Some(out) = route.conns.queue(id) {
            Frame::PubResult(r).encode(out);
        }
    }
}

/// One PUBLISH_BATCH from publisher `id`.
pub fn batch(route: &mut Route<'_>, id: ConnId, b: &f::PublishBatch<'_>) {
    let (mut local, mut fwd, mut none) = (0u16, 0u16, 0u16);
    for e in b.entries.iter() {
        let (l, f) = route.deliver(e.user, e.payload, true);
        local += l as u16;
        fwd += f as u16;
        none += !(l || f) as u16;
    }
    if b.flags & PUBLISH_WANT_RESULT != 0 {
        let r = f::PubResult {
            request_id: b.request_id,
            accepted: b.entries.len() as u16,
            local,
            forwarded: fwd,
            no_route: none,
        };
        if let Some(out) = route.conns.queue(id) {
            Frame::PubResult(r).encode(out);
        }
    }
}
