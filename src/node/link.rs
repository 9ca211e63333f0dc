//! Mesh links between nodes (protocol.md §6): the PEER_HELLO /
//! PEER_WELCOME / PEER_AUTH handshake with its HMAC proofs both ways, the
//! presence snapshot and deltas, dialling the peers this node should link
//! to, and a link's end.
//!
//! Each link's handshake material and phase live in its connection's state
//! ([`super::conn::Link`]); [`Mesh`] keeps only what spans links: which
//! connections are links, where each user is online, and this turn's local
//! presence changes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::net::{CloseReason, ConnId, Conns, Flow, Transport};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{self, sign, Code, PresenceOp};

use super::auth::{self, Credential};
use super::cluster::random_nonce;
use super::config::Config;
use super::conn::{listener, Link, LinkPhase, Peer};
use super::mesh::{self, Presence};
use crate::tls;

/// What spans the node's mesh links.
#[derive(Default)]
pub struct Mesh {
    /// Users online on other nodes.
    pub presence: Presence,
    /// Connections that are mesh links (in their handshake or up).
    links: Vec<ConnId>,
    /// Local presence changes to send to every peer at the end of the turn.
    pub presence_out: Vec<(PresenceOp, Box<[u8]>)>,
    /// When each peer was last dialled.
    last_dial: HashMap<String, Instant>,
    /// This node's incarnation (its start time, ms).
    pub incarnation: u64,
    /// This node's id (for log lines).
    node_id: String,
    /// With TLS on the ingest port: how to dial peers (trusting the cluster
    /// CA, presenting this node's certificate).
    dial_tls: Option<tls::Dialer>,
}

impl Mesh {
    /// The mesh of node `node_id`, started at `incarnation`.
    pub fn new(node_id: &str, incarnation: u64, dial_tls: Option<tls::Dialer>) -> Mesh {
        Mesh { incarnation, node_id: node_id.to_owned(), dial_tls, ..Mesh::default() }
    }

    /// Whether a link to `peer` exists that stops another dial to it.
    fn covered(&self, conns: &Conns<Peer>, peer: &str) -> bool {
        self.links.iter().any(|&k| conns.get(k).and_then(|c| c.state.link()).is_some_and(|l| l.covers(peer)))
    }

    /// Acceptor: a PEER_HELLO on the ingest port. Answers PEER_WELCOME with
    /// our proof and waits for the initiator's.
    pub fn peer_hello(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        h: &f::PeerHello<'_>,
        cfg: &Config,
        now: Instant,
    ) -> Flow {
        let cred = Credential::Peer { secret: &cfg.cluster_secret };
        let version = match auth::authenticate(h.min_version, h.max_version, cred, 0) {
            Ok(a) => a.version,
            Err(r) => {
                conns.fail(id, r.code, &r.message, now);
                return Flow::Stop;
            }
        };
        // On a TLS ingest port a peer must also hold a cluster-CA certificate
        // (the handshake checked the chain) that names the node it claims.
        if let Some(c) = conns.get(id).filter(|c| c.io.is_tls()) {
            let claimed = String::from_utf8_lossy(h.node_id);
            let named =
                c.io.peer_certificates()
                    .and_then(|certs| certs.first())
                    .is_some_and(|leaf| tls::names(leaf, &claimed));
            if !named {
                let msg = format!("a mesh peer must present a cluster certificate naming {claimed}");
                conns.fail(id, Code::AuthFailed, &msg, now);
                return Flow::Stop;
            }
        }
        let nonce_a = random_nonce();
        let me = cfg.node_id.as_bytes();
        let tag = sign::peer_acceptor_tag(&cfg.cluster_secret, &h.nonce, &nonce_a, h.node_id, me);
        let peer_id = String::from_utf8_lossy(h.node_id).into_owned();
        let Some(c) = conns.get_mut(id) else { return Flow::Gone };
        let mut link = Link::new(peer_id, h.nonce, nonce_a, false);
        link.version = version;
        c.state = Peer::Link(Box::new(link));
        self.links.push(id);
        let Some(out) = conns.queue(id) else { return Flow::Gone };
        Frame::PeerWelcome(f::PeerWelcome {
            version,
            node_id: me,
            incarnation: self.incarnation,
            nonce: nonce_a,
            tag,
        })
        .encode(out);
        Flow::Continue
    }

    /// Initiator: the acceptor's PEER_WELCOME. Checks its proof, sends ours.
    pub fn peer_welcome<'u>(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        w: &f::PeerWelcome<'_>,
        cfg: &Config,
        online: impl Iterator<Item = &'u [u8]>,
        now: Instant,
    ) -> Flow {
        if !protocol::speaks(w.version) {
            conns.fail(
                id,
                Code::UnsupportedVersion,
                "PEER_WELCOME chose a version this node did not offer",
                now,
            );
            return Flow::Stop;
        }
        let me = cfg.node_id.as_bytes();
        let Some(link) = conns.get_mut(id).and_then(|c| c.state.link_mut()) else { return Flow::Gone };
        let expected = sign::peer_acceptor_tag(
            &cfg.cluster_secret,
            &link.nonce_i,
            &w.nonce,
            me,
            link.peer_id.as_bytes(),
        );
        if w.node_id != link.peer_id.as_bytes() || !sign::tags_equal(&expected, &w.tag) {
            conns.fail(id, Code::AuthFailed, "peer proof does not verify", now);
            return Flow::Stop;
        }
        link.nonce_a = w.nonce;
        link.version = w.version;
        let tag = sign::peer_initiator_tag(&cfg.cluster_secret, &link.nonce_i, &w.nonce, me, w.node_id);
        if let Some(out) = conns.queue(id) {
            Frame::PeerAuth(f::PeerAuth { tag }).encode(out);
        }
        self.link_up(conns, id, online);
        Flow::Continue
    }

    /// Acceptor: the initiator's PEER_AUTH. Checks its proof; the link is up.
    pub fn peer_auth<'u>(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        a: &f::PeerAuth,
        cfg: &Config,
        online: impl Iterator<Item = &'u [u8]>,
        now: Instant,
    ) -> Flow {
        let Some(link) = conns.get(id).and_then(|c| c.state.link()) else { return Flow::Gone };
        let expected = sign::peer_initiator_tag(
            &cfg.cluster_secret,
            &link.nonce_i,
            &link.nonce_a,
            link.peer_id.as_bytes(),
            cfg.node_id.as_bytes(),
        );
        if !sign::tags_equal(&expected, &a.tag) {
            conns.fail(id, Code::AuthFailed, "peer proof does not verify", now);
            return Flow::Stop;
        }
        self.link_up(conns, id, online);
        Flow::Continue
    }

    /// A link is authenticated: replace any older link to the same peer and
    /// send our presence snapshot.
    fn link_up<'u>(&mut self, conns: &mut Conns<Peer>, id: ConnId, online: impl Iterator<Item = &'u [u8]>) {
        let Some(link) = conns.get_mut(id).and_then(|c| c.state.link_mut()) else { return };
        link.phase = LinkPhase::Up { snapshot_seen: false };
        let peer = link.peer_id.clone();
        let older: Vec<ConnId> = self
            .links
            .iter()
            .copied()
            .filter(|&k| {
                k != id && conns.get(k).and_then(|c| c.state.link()).is_some_and(|l| l.peer_id == peer)
            })
            .collect();
        for k in older {
            conns.abort(k, CloseReason::Replaced);
        }
        if let Some(out) = conns.queue(id) {
            mesh::encode_snapshot(out, online);
        }
        log::info!("herald node {}: mesh link to {peer} up", self.node_id);
    }

    /// A PRESENCE from link `id` (§6.4: the first must begin a snapshot).
    pub fn presence_frame(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        p: &f::Presence<'_>,
        now: Instant,
    ) -> Flow {
        let Some(link) = conns.get_mut(id).and_then(|c| c.state.link_mut()) else { return Flow::Gone };
        let first = match &mut link.phase {
            LinkPhase::Up { snapshot_seen } => !std::mem::replace(snapshot_seen, true),
            _ => false,
        };
        if first && p.flags & f::PRESENCE_SNAPSHOT_BEGIN == 0 {
            conns.fail(id, Code::UnexpectedFrame, "the first PRESENCE on a link must begin a snapshot", now);
            return Flow::Stop;
        }
        self.presence.apply(id.0, p.flags, &p.entries);
        Flow::Continue
    }

    /// Sends this turn's local presence changes to every linked peer, in one frame.
    pub fn send_presence(&mut self, conns: &mut Conns<Peer>) {
        if self.presence_out.is_empty() {
            return;
        }
        let mut frame = Vec::new();
        mesh::encode_delta(&mut frame, &self.presence_out);
        self.presence_out.clear();
        for &k in &self.links {
            let up = conns.get(k).is_some_and(|c| !c.is_closing() && c.state.link().is_some_and(Link::is_up));
            if up {
                if let Some(out) = conns.queue(k) {
                    out.extend_from_slice(&frame);
                }
            }
        }
    }

    /// Whether a link has more than `limit` bytes of output pending.
    #[inline]
    pub fn backlogged(&self, conns: &Conns<Peer>, limit: usize) -> bool {
        self.links.iter().any(|&k| conns.get(k).is_some_and(|c| c.pending() > limit))
    }

    /// A link is closing: forget the presence it reported.
    pub fn closed(&mut self, id: ConnId, link: &Link) {
        self.links.retain(|&k| k != id);
        self.presence.clear_peer(id.0);
        if link.is_up() {
            log::info!("herald node {}: mesh link to {} closed", self.node_id, link.peer_id);
        }
    }

    /// The peers of a node list this node should dial now: the smaller id
    /// dials (protocol.md §6.6), at most once a second per peer, and not
    /// while a link to it stands.
    pub fn dials_due(
        &mut self,
        conns: &Conns<Peer>,
        list: &[crate::decision::client::NodeInfo],
        me: &str,
        now: Instant,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for n in list {
            if n.node_id.as_bytes() <= me.as_bytes() || self.covered(conns, &n.node_id) {
                continue;
            }
            if self
                .last_dial
                .get(&n.node_id)
                .is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(1))
            {
                continue;
            }
            self.last_dial.insert(n.node_id.clone(), now);
            out.push((n.node_id.clone(), n.ingest_endpoint.clone()));
        }
        out
    }

    /// A dial to `peer` connected: start the handshake with PEER_HELLO.
    pub fn dialed(
        &mut self,
        conns: &mut Conns<Peer>,
        peer: String,
        stream: std::net::TcpStream,
        cfg: &Config,
        now: Instant,
    ) {
        if self.covered(conns, &peer) || stream.set_nonblocking(true).is_err() {
            return;
        }
        let nonce_i = random_nonce();
        let sock = TcpStream::from_std(stream);
        let io = match &self.dial_tls {
            None => Transport::plain(sock),
            // The peer's certificate must name its node id.
            Some(t) => match rustls_pki_types::ServerName::try_from(peer.clone())
                .map_err(std::io::Error::other)
                .and_then(|name| Transport::tls_client(sock, t.config(), name))
            {
                Ok(io) => io,
                Err(e) => {
                    log::warn!("herald node {}: cannot dial {peer} over TLS: {e}", self.node_id);
                    return;
                }
            },
        };
        let link = Link::new(peer, nonce_i, [0; 16], true);
        let id = conns.insert(io, Peer::Link(Box::new(link)), listener::INGEST, now);
        self.links.push(id);
        if let Some(out) = conns.queue(id) {
            Frame::PeerHello(f::PeerHello {
                min_version: protocol::MIN_VERSION,
                max_version: protocol::VERSION,
                node_id: cfg.node_id.as_bytes(),
                incarnation: self.incarnation,
                nonce: nonce_i,
            })
            .encode(out);
        }
    }
}
