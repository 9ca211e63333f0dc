//! One connection's state and buffers, owned by the event loop.
//!
//! Buffers are allocated lazily: an idle established client holds no read
//! buffer (frames are parsed straight out of the loop's scratch buffer, and
//! only a partial frame is copied here) and no write buffer once its output
//! has been flushed. That is what keeps an idle connection under 1 KiB.

use std::time::Instant;

use mio::net::TcpStream;

use crate::outbox::Outbox;

use super::registry::UserIdx;

/// What a connection is, and where it is in its life (protocol.md §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Client port: waiting for HELLO until the deadline.
    ClientHandshake,
    /// Client port: session established for a user.
    Client {
        /// The user.
        user: UserIdx,
    },
    /// Ingest port: waiting for PUB_HELLO (or, later, PEER_HELLO).
    IngestHandshake,
    /// Ingest port: an authenticated publisher.
    Publisher,
    /// Mesh link we dialled: PEER_HELLO sent, waiting for PEER_WELCOME.
    PeerDialing,
    /// Mesh link we accepted: PEER_WELCOME sent, waiting for PEER_AUTH.
    PeerAccepting,
    /// An authenticated mesh link.
    Peer {
        /// Whether we dialled it (decides which channel we read).
        initiator: bool,
    },
    /// Metrics port: reading an HTTP request.
    Http,
    /// An ERROR or GOODBYE was queued; write it, stop reading meaningfully,
    /// and close at EOF or the deadline.
    Closing {
        /// Close no later than this.
        deadline: Instant,
    },
}

impl State {
    /// Whether a frame of type `t` may arrive in this state (protocol.md
    /// §3.6, §5, §6): checked from the type byte, before the body is
    /// buffered (§2.4 step 2), and again for whole frames. PING and PONG are
    /// keepalive for established conversations only; ERROR is allowed
    /// everywhere.
    pub fn allows(self, t: u8) -> bool {
        use crate::protocol::frame::ty;
        match self {
            State::ClientHandshake => t == ty::HELLO || t == ty::ERROR,
            State::Client { .. } => matches!(t, ty::PING | ty::PONG | ty::ERROR),
            State::IngestHandshake => matches!(t, ty::PUB_HELLO | ty::PEER_HELLO | ty::ERROR),
            State::Publisher => {
                matches!(t, ty::PUBLISH | ty::PUBLISH_BATCH | ty::PING | ty::PONG | ty::ERROR)
            }
            State::PeerDialing => matches!(t, ty::PEER_WELCOME | ty::GOODBYE | ty::ERROR),
            State::PeerAccepting => t == ty::PEER_AUTH || t == ty::ERROR,
            State::Peer { .. } => {
                matches!(t, ty::PRESENCE | ty::FORWARD | ty::GOODBYE | ty::PING | ty::PONG | ty::ERROR)
            }
            State::Http | State::Closing { .. } => false,
        }
    }

    /// What a peer in this state should have sent, for UNEXPECTED_FRAME.
    pub fn expects(self) -> &'static str {
        match self {
            State::ClientHandshake => "the first frame must be a HELLO",
            State::IngestHandshake => "the first frame must be a PUB_HELLO or a PEER_HELLO",
            State::PeerDialing => "expected PEER_WELCOME",
            State::PeerAccepting => "expected PEER_AUTH",
            _ => "this frame type is not allowed now",
        }
    }
}

/// One connection.
pub struct Conn {
    /// The socket.
    pub sock: TcpStream,
    /// Life-cycle state.
    pub state: State,
    /// Bytes of a partial frame carried over between reads.
    pub rbuf: Vec<u8>,
    /// Pending output.
    pub out: Outbox,
    /// When anything was last read from the peer.
    pub last_rx: Instant,
    /// When the connection was accepted (handshake deadline base).
    pub opened: Instant,
    /// Whether a PING is outstanding.
    pub pinged: bool,
    /// A PING is due: append it to the next delivery.
    pub ping_due: bool,
    /// Session id (client) or 0.
    pub session: u64,
    /// Not being read: its own output is backed up (see `Loop::read`).
    pub stalled: bool,
    /// To be closed as a slow consumer: it gets no more messages, so what
    /// it missed is a clean suffix of its stream, all of it in retention.
    pub doomed: bool,
    /// Accepted on the metrics port (counted against its own small cap).
    pub http: bool,
}

impl Conn {
    /// A new connection in `state`.
    pub fn new(sock: TcpStream, state: State, now: Instant) -> Conn {
        Conn {
            sock,
            state,
            rbuf: Vec::new(),
            out: Outbox::default(),
            last_rx: now,
            opened: now,
            pinged: false,
            ping_due: false,
            session: 0,
            stalled: false,
            doomed: false,
            http: state == State::Http,
        }
    }

    /// Bytes queued but not yet written.
    pub fn pending(&self) -> usize {
        self.out.pending()
    }

    /// Whether the connection is on its way out.
    pub fn closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }
}
