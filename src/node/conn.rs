//! What each of the node's connections is: its role and where it is in its
//! life (protocol.md §3.6, §5, §6), as one explicit state per connection.
//!
//! The event loop keeps the generic part of a connection (socket, buffers,
//! closing); this is the node's part. Transitions happen in the role that
//! owns them (the session, publisher and link modules); this file only
//! answers what the loop asks of a state: the channel its frames are read
//! on, which frame types it allows, when to stop reading it.
//!
//! Buffers are allocated lazily: an idle established client holds no read
//! buffer (frames are parsed straight out of the loop's scratch buffer, and
//! only a partial frame is copied) and no write buffer once its output has
//! been flushed. That is what keeps an idle connection under 1 KiB; a mesh
//! link's larger state is boxed so it costs clients nothing.

use std::time::Instant;

use crate::net::outbox::Outbox;
use crate::net::{ConnState, Framing};
use crate::protocol::frame::ty;
use crate::protocol::Channel;

use super::conflate::Conflation;
use super::keepalive::Keepalive;
use super::registry::UserIdx;

/// The node's listeners, by event-loop listener index.
pub mod listener {
    /// The client port.
    pub const CLIENT: usize = 0;
    /// The ingest port (publishers and mesh links).
    pub const INGEST: usize = 1;
    /// The metrics port.
    pub const METRICS: usize = 2;

    /// The HTTP publish API's port: after the metrics port, if there is one.
    pub fn api(metrics: bool) -> usize {
        METRICS + usize::from(metrics)
    }
}

/// One connection's role and state.
#[derive(Debug)]
pub enum Peer {
    /// Client port: waiting for HELLO until the handshake deadline.
    ClientHandshake {
        /// Loops 1..N: the user loop 0 handed this connection over for
        /// (reported back to loop 0 if the handshake fails).
        handed: Option<Box<[u8]>>,
    },
    /// Client port: a session established for a user.
    Client {
        /// The user.
        user: UserIdx,
        /// Keepalive.
        ka: Keepalive,
        /// The session speaks protocol version 2 (it may be sent CONFLATED).
        v2: bool,
        /// While conflating (backed up, `--slow-policy conflate`): where
        /// each key's latest message is in the queue.
        cf: Option<Box<Conflation>>,
    },
    /// Ingest port: waiting for PUB_HELLO or PEER_HELLO.
    IngestHandshake,
    /// Ingest port: an authenticated publisher.
    Publisher {
        /// Keepalive.
        ka: Keepalive,
    },
    /// A mesh link, in its handshake or up.
    Link(Box<Link>),
    /// Metrics port: reading an HTTP request.
    Http,
    /// HTTP publish API: a keep-alive connection of requests.
    Api(Box<ApiConn>),
    /// Closing, and its role has done its bookkeeping.
    Closed,
}

/// One HTTP API connection's state.
#[derive(Debug, Default)]
pub struct ApiConn {
    /// When the first byte of the request in progress arrived: a request
    /// must be whole within the handshake deadline of that (slowloris).
    pub request_since: Option<Instant>,
    /// The bearer token last verified on this connection, and its expiry
    /// (Unix seconds): the same token is not verified again per request.
    pub verified: Option<(Box<[u8]>, u64)>,
    /// A publish waiting for its forwards to be confirmed: whether it is a
    /// batch, and whether the connection closes after its answer.
    pub held: Option<(bool, bool)>,
    /// Request ids for `Confirms`, per connection.
    pub next_request: u32,
}

/// A mesh link's identity, handshake material and phase.
#[derive(Debug)]
pub struct Link {
    /// The peer's node id (claimed until the handshake completes).
    pub peer_id: String,
    /// The initiator's nonce.
    pub nonce_i: [u8; 16],
    /// The acceptor's nonce.
    pub nonce_a: [u8; 16],
    /// We dialled it. A link accepted but not yet authenticated proves
    /// nothing about who is at the other end, so only links we dialled or
    /// that have authenticated stop us dialling that peer.
    pub ours: bool,
    /// Where the handshake is.
    pub phase: LinkPhase,
    /// Keepalive (once up).
    pub ka: Keepalive,
    /// The protocol version the handshake chose (1 until it has): FORWARD
    /// carries a de-duplication id only at 2 (protocol.md §6.5).
    pub version: u8,
}

/// A mesh link's handshake phase (protocol.md §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPhase {
    /// We dialled: PEER_HELLO sent, waiting for PEER_WELCOME.
    Dialing,
    /// We accepted: PEER_WELCOME sent, waiting for PEER_AUTH.
    Accepting,
    /// Authenticated.
    Up {
        /// A PRESENCE has arrived (the first must begin a snapshot).
        snapshot_seen: bool,
    },
}

impl Link {
    /// A link in its handshake; `ours` if we dialled it.
    pub fn new(peer_id: String, nonce_i: [u8; 16], nonce_a: [u8; 16], ours: bool) -> Link {
        let phase = if ours { LinkPhase::Dialing } else { LinkPhase::Accepting };
        Link { peer_id, nonce_i, nonce_a, ours, phase, ka: Keepalive::Quiet, version: 1 }
    }

    /// Whether the handshake is complete.
    pub fn is_up(&self) -> bool {
        matches!(self.phase, LinkPhase::Up { .. })
    }

    /// Whether this link stands for `peer` (stops another dial to it).
    pub fn covers(&self, peer: &str) -> bool {
        self.peer_id == peer && (self.is_up() || self.ours)
    }
}

/// What the node's states depend on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client's queue bound, bytes.
    pub queue_bytes: usize,
}

impl Peer {
    /// Whether this connection is still in its handshake (the handshake
    /// deadline applies).
    pub fn in_handshake(&self) -> bool {
        match self {
            Peer::ClientHandshake { .. } | Peer::IngestHandshake | Peer::Http => true,
            Peer::Link(l) => !l.is_up(),
            Peer::Client { .. } | Peer::Publisher { .. } | Peer::Api(_) | Peer::Closed => false,
        }
    }

    /// The keepalive of an established conversation.
    pub fn keepalive(&mut self) -> Option<&mut Keepalive> {
        match self {
            Peer::Client { ka, .. } | Peer::Publisher { ka } => Some(ka),
            Peer::Link(l) if l.is_up() => Some(&mut l.ka),
            _ => None,
        }
    }

    /// The link, if this is one.
    pub fn link(&self) -> Option<&Link> {
        match self {
            Peer::Link(l) => Some(l),
            _ => None,
        }
    }

    /// The link, if this is one.
    pub fn link_mut(&mut self) -> Option<&mut Link> {
        match self {
            Peer::Link(l) => Some(l),
            _ => None,
        }
    }

    /// Whether this is an established client session.
    #[inline]
    pub fn is_client(&self) -> bool {
        matches!(self, Peer::Client { .. })
    }
}

impl ConnState for Peer {
    type Cx = Limits;

    fn framing(&self) -> Framing {
        Framing::Frames(match self {
            Peer::ClientHandshake { .. } | Peer::Client { .. } => Channel::ToNode,
            Peer::IngestHandshake | Peer::Publisher { .. } => Channel::Ingest,
            // The dialling side reads what an ingest port sends back.
            Peer::Link(l) if l.ours => Channel::FromIngest,
            Peer::Link(_) => Channel::Ingest,
            Peer::Http | Peer::Api(_) | Peer::Closed => return Framing::Raw,
        })
    }

    /// PING and PONG are keepalive for established conversations only; ERROR
    /// is allowed everywhere.
    fn allows(&self, t: u8) -> bool {
        match self {
            Peer::ClientHandshake { .. } => t == ty::HELLO || t == ty::ERROR,
            Peer::Client { .. } => matches!(t, ty::PING | ty::PONG | ty::ERROR),
            Peer::IngestHandshake => matches!(t, ty::PUB_HELLO | ty::PEER_HELLO | ty::ERROR),
            Peer::Publisher { .. } => {
                matches!(t, ty::PUBLISH | ty::PUBLISH_BATCH | ty::PING | ty::PONG | ty::ERROR)
            }
            Peer::Link(l) => match l.phase {
                LinkPhase::Dialing => matches!(t, ty::PEER_WELCOME | ty::GOODBYE | ty::ERROR),
                LinkPhase::Accepting => t == ty::PEER_AUTH || t == ty::ERROR,
                LinkPhase::Up { .. } => {
                    matches!(t, ty::PRESENCE | ty::FORWARD | ty::GOODBYE | ty::PING | ty::PONG | ty::ERROR)
                }
            },
            Peer::Http | Peer::Api(_) | Peer::Closed => false,
        }
    }

    fn expects(&self) -> &'static str {
        match self {
            Peer::ClientHandshake { .. } => "the first frame must be a HELLO",
            Peer::IngestHandshake => "the first frame must be a PUB_HELLO or a PEER_HELLO",
            Peer::Link(l) if l.phase == LinkPhase::Dialing => "expected PEER_WELCOME",
            Peer::Link(l) if l.phase == LinkPhase::Accepting => "expected PEER_AUTH",
            _ => "this frame type is not allowed now",
        }
    }

    /// Clients: the delivery queue bound (their deliveries never exceed it;
    /// only answers to their PINGs could). Publishers and connections still
    /// in a handshake: 1 MiB of answers. Mesh links are always read: two
    /// nodes that each stopped reading the other would deadlock, and their
    /// output is bounded by the publisher back-pressure instead.
    fn read_stop(&self, cx: &Limits) -> usize {
        match self {
            Peer::Client { .. } => cx.queue_bytes,
            Peer::Http | Peer::Closed => usize::MAX,
            Peer::Link(l) if l.is_up() => usize::MAX,
            _ => 1 << 20,
        }
    }

    fn keeps_rbuf(&self) -> bool {
        matches!(self, Peer::Publisher { .. }) || matches!(self, Peer::Link(l) if l.is_up())
    }

    /// Only client sessions count toward the output budget: they are the
    /// ones it may cut (publishers and links have bounds of their own).
    #[inline]
    fn budgeted(&self) -> bool {
        matches!(self, Peer::Client { .. })
    }

    /// A conflating session holds back what follows its first message taken
    /// out (protocol.md §5.7).
    #[inline]
    fn write_limit(&mut self, out: &mut Outbox) -> Option<usize> {
        match self {
            Peer::Client { cf: Some(cf), .. } => cf.write_limit(out),
            _ => None,
        }
    }

    #[inline]
    fn received(&mut self) {
        if let Some(ka) = self.keepalive() {
            *ka = Keepalive::Quiet;
        }
    }
}
