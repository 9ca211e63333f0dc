//! The connections of one event loop: a slab of [`Conn`]s, each with its
//! transport, pending output and read carry-over, plus the turn's lists of
//! work (connections to flush, to read again, to close).
//!
//! This is the layer role code talks to: it queues output
//! ([`Conns::queue`]), asks for a close ([`Conns::fail`],
//! [`Conns::begin_close`], [`Conns::abort`]) and inserts or hands off
//! connections. It never calls up into a role: closes are *requested* here
//! and carried out by the event loop, which tells the connection's service
//! exactly once ([`crate::net::Service::closed`]).
//!
//! A connection on its way out stays in the slab while its last frame is
//! written ("lingering"): it is read only to notice the peer's EOF, gets no
//! new output from roles (they check [`Conn::is_closing`]), and is removed
//! once flushed and closed by the peer, or at its linger deadline.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};
use slab::Slab;

use super::close::CloseReason;
use super::outbox::{Flushed, Outbox};
use super::transport::Transport;
use crate::protocol::frame::{ErrorFrame, Frame};
use crate::protocol::{Channel, Code};

/// Connection tokens are slab keys offset by this; tokens below it are for
/// listeners ([`super::EventLoop`] numbers them from 0), the waker and a
/// service's own sources.
pub const FIRST_CONN: usize = 16;

/// How long a closing connection may linger to flush its last frame.
pub const LINGER: Duration = Duration::from_millis(500);

/// Most listeners an event loop serves.
pub const MAX_LISTENERS: usize = 8;

/// A connection's handle in its loop: a slab key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

impl ConnId {
    /// The mio token this connection is registered under.
    #[inline]
    pub fn token(self) -> Token {
        Token(self.0 + FIRST_CONN)
    }

    /// The connection a token stands for, if it is a connection's.
    #[inline]
    pub fn from_token(t: Token) -> Option<ConnId> {
        t.0.checked_sub(FIRST_CONN).map(ConnId)
    }
}

/// How a connection's input is cut into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// herald frames on this channel, decoded by the event loop.
    Frames(Channel),
    /// Raw bytes, handed to the service as read (an HTTP request).
    Raw,
}

/// What the event loop needs to know about a role's per-connection state.
pub trait ConnState {
    /// Settings the state's answers depend on (kept once in [`Conns`]).
    type Cx;

    /// How this connection's input is cut.
    fn framing(&self) -> Framing;

    /// Whether a frame of type `t` may arrive now (protocol.md §2.4 step 2:
    /// checked from the type byte, before the body is buffered, and again
    /// for each whole frame).
    fn allows(&self, _t: u8) -> bool {
        true
    }

    /// What the peer should have sent, for UNEXPECTED_FRAME.
    fn expects(&self) -> &'static str {
        "this frame type is not allowed now"
    }

    /// Pending output over which the connection is not read (nor its
    /// carried input parsed) until it drains to half of this: a peer that
    /// sends but does not read its answers gets TCP back-pressure instead of
    /// an unbounded buffer here.
    fn read_stop(&self, _cx: &Self::Cx) -> usize {
        usize::MAX
    }

    /// Pending output under which a stalled connection is read again.
    fn read_resume(&self, cx: &Self::Cx) -> usize {
        self.read_stop(cx) / 2
    }

    /// Whether the read buffer's capacity is kept between reads (busy
    /// publishers and links) rather than freed when no partial frame is
    /// left (idle clients hold no buffer).
    fn keeps_rbuf(&self) -> bool {
        false
    }

    /// Bytes arrived from the peer (keepalive bookkeeping).
    #[inline]
    fn received(&mut self) {}

    /// Called before each write of `out`: an index into `out.buf` that this
    /// write must stop at (the state holds back what follows, and may
    /// rework it now), or `None` to write everything. When a write stops
    /// there, it is called again and a second write made.
    #[inline]
    fn write_limit(&mut self, _out: &mut Outbox) -> Option<usize> {
        None
    }

    /// Whether this connection's pending output counts toward
    /// [`IoCounts::pending`] (the node's output budget: client sessions).
    #[inline]
    fn budgeted(&self) -> bool {
        false
    }
}

/// One connection.
pub struct Conn<S> {
    /// The byte stream.
    pub io: Transport,
    /// Pending output.
    pub out: Outbox,
    /// Input carried over between reads: a partial frame, or what a stall
    /// left unparsed.
    pub rbuf: Vec<u8>,
    /// When the connection was accepted or dialled (handshake deadline base).
    pub opened: Instant,
    /// When anything was last read from the peer.
    pub last_rx: Instant,
    /// The role's state.
    pub state: S,
    /// Closing: remove no later than this.
    closing: Option<Instant>,
    /// Why it is closing (valid once `closing` is set).
    reason: CloseReason,
    /// Its service has been told of the close.
    noticed: bool,
    /// The listener it came from (cap accounting).
    listener: u8,
    /// Not read: its own output is backed up.
    stalled: bool,
    /// The peer has closed its side.
    eof: bool,
    /// Our write side is shut down (after the last frame went out).
    shut: bool,
    /// What [`IoCounts::pending`] holds for this connection.
    counted: usize,
}

impl<S> Conn<S> {
    /// Bytes queued but not yet written.
    #[inline]
    pub fn pending(&self) -> usize {
        self.out.pending()
    }

    /// Whether the connection is on its way out.
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    /// Whether a closing connection's linger deadline has passed.
    pub fn linger_over(&self, now: Instant) -> bool {
        self.closing.is_some_and(|d| now >= d)
    }
}

/// What to do once a close request is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Keep it until its output is flushed and the peer closes, or the
    /// linger deadline passes.
    Linger,
    /// Write what is pending once, then remove it.
    Abort,
    /// The peer has gone (EOF, ERROR, GOODBYE): flush what is owed, then remove.
    PeerGone,
    /// Remove it now.
    Drop,
}

/// Bytes and syscalls counted by the connections layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCounts {
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Write syscalls.
    pub writes: u64,
    /// Accepts failed for lack of file descriptors (EMFILE/ENFILE).
    pub accept_emfile: u64,
    /// Output pending on the connections whose state is
    /// [`ConnState::budgeted`], closing ones excepted, bytes: a running
    /// total, charged as output is queued ([`Dirty::charge`]) and set right
    /// at each flush and close (a close stops it counting at once: its
    /// output is written once more at most, then freed).
    pub pending: usize,
}

/// The connections of one loop and this turn's work lists.
pub struct Conns<S: ConnState> {
    slab: Slab<Conn<S>>,
    /// What the states' answers depend on.
    pub cx: S::Cx,
    registry: Registry,
    pub(super) dirty: Vec<ConnId>,
    pub(super) retry: Vec<ConnId>,
    pub(super) closes: Vec<(ConnId, CloseReason, Mode)>,
    open: [usize; MAX_LISTENERS],
    /// The time the event loop passed in for this step (linger deadlines
    /// of closes requested without a `now` of their own).
    pub(super) now: Instant,
    /// I/O counters.
    pub io: IoCounts,
}

impl<S: ConnState> Conns<S> {
    /// An empty table registering its sockets with `registry`.
    pub fn new(registry: Registry, capacity: usize, cx: S::Cx) -> Conns<S> {
        Conns {
            slab: Slab::with_capacity(capacity),
            cx,
            registry,
            dirty: Vec::new(),
            retry: Vec::new(),
            closes: Vec::new(),
            open: [0; MAX_LISTENERS],
            now: Instant::now(),
            io: IoCounts::default(),
        }
    }

    /// Adds a connection from `listener` and registers it for reading. If
    /// registering fails it is closed at once as [`CloseReason::Io`] (its
    /// service hears of it like any other close).
    pub fn insert(&mut self, io: Transport, state: S, listener: usize, now: Instant) -> ConnId {
        let entry = self.slab.vacant_entry();
        let id = ConnId(entry.key());
        let conn = entry.insert(Conn {
            io,
            out: Outbox::default(),
            rbuf: Vec::new(),
            opened: now,
            last_rx: now,
            state,
            closing: None,
            reason: CloseReason::PeerClosed,
            noticed: false,
            listener: listener as u8,
            stalled: false,
            eof: false,
            shut: false,
            counted: 0,
        });
        self.open[listener] += 1;
        if self.registry.register(&mut conn.io, id.token(), Interest::READABLE).is_err() {
            self.close(id, CloseReason::Io, Mode::Drop);
        }
        id
    }

    /// Takes over a connection another loop has read from: `input` (bytes
    /// not processed yet) is parsed in this turn as if just read.
    pub fn adopt(
        &mut self,
        io: Transport,
        state: S,
        listener: usize,
        opened: Instant,
        input: Vec<u8>,
        now: Instant,
    ) -> ConnId {
        let id = self.insert(io, state, listener, now);
        let c = &mut self.slab[id.0];
        c.opened = opened;
        c.rbuf = input;
        self.retry.push(id);
        id
    }

    /// Removes a connection without closing it, to hand it to another loop.
    pub fn take(&mut self, id: ConnId) -> Option<Conn<S>> {
        let mut c = self.slab.try_remove(id.0)?;
        self.io.pending -= std::mem::take(&mut c.counted);
        let _ = self.registry.deregister(&mut c.io);
        self.open[c.listener as usize] -= 1;
        self.retry.retain(|&k| k != id);
        if c.out.is_dirty() {
            self.dirty.retain(|&k| k != id);
        }
        Some(c)
    }

    /// The connection, if open.
    #[inline]
    pub fn get(&self, id: ConnId) -> Option<&Conn<S>> {
        self.slab.get(id.0)
    }

    /// The connection, if open.
    #[inline]
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn<S>> {
        self.slab.get_mut(id.0)
    }

    /// Whether `id` is open.
    #[inline]
    pub fn contains(&self, id: ConnId) -> bool {
        self.slab.contains(id.0)
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Open connections from `listener`.
    pub fn open_on(&self, listener: usize) -> usize {
        self.open[listener]
    }

    /// Slots in the slab (for sweeps that visit a slice of it per tick).
    pub fn capacity(&self) -> usize {
        self.slab.capacity()
    }

    /// Every open connection.
    pub fn iter(&self) -> impl Iterator<Item = (ConnId, &Conn<S>)> {
        self.slab.iter().map(|(k, c)| (ConnId(k), c))
    }

    /// The connection and the turn's flush list, for a hot path that
    /// appends to many connections ([`Dirty::mark`] lists each once).
    #[inline]
    pub fn get_mut_dirty(&mut self, id: ConnId) -> Option<(&mut Conn<S>, Dirty<'_>)> {
        let c = self.slab.get_mut(id.0)?;
        Some((c, Dirty { list: &mut self.dirty, pending: &mut self.io.pending }))
    }

    /// Lists a connection for this turn's flush (once).
    #[inline]
    pub fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.slab.get_mut(id.0) {
            if c.out.mark_dirty() {
                self.dirty.push(id);
            }
        }
    }

    /// The connection's output buffer, listed for this turn's flush.
    #[inline]
    pub fn queue(&mut self, id: ConnId) -> Option<&mut Vec<u8>> {
        let c = self.slab.get_mut(id.0)?;
        if c.out.mark_dirty() {
            self.dirty.push(id);
        }
        Some(&mut c.out.buf)
    }

    /// Reads the connection again later in this turn (after a stall, a
    /// park, or to parse input handed over with it).
    pub fn read_again(&mut self, id: ConnId) {
        self.retry.push(id);
    }

    /// Sends ERROR with `code` and closes once it is written (counted as
    /// [`CloseReason::Sent`]). Nothing happens if it is already closing.
    pub fn fail(&mut self, id: ConnId, code: Code, msg: &str, now: Instant) {
        let Some(c) = self.slab.get_mut(id.0) else { return };
        if c.closing.is_some() {
            return;
        }
        Frame::Error(ErrorFrame { code, message: msg.as_bytes() }).encode(&mut c.out.buf);
        self.begin_close(id, CloseReason::Sent(code), now);
    }

    /// Closes once what is queued (e.g. a GOODBYE) is written: stop
    /// parsing its input, flush, half-close, and remove at the peer's EOF
    /// or the linger deadline.
    pub fn begin_close(&mut self, id: ConnId, reason: CloseReason, now: Instant) {
        if let Some(c) = self.slab.get_mut(id.0) {
            if c.closing.is_none() {
                c.closing = Some(now + LINGER);
                c.reason = reason;
                c.rbuf = Vec::new();
                c.stalled = false;
                self.io.pending -= std::mem::take(&mut c.counted);
                self.closes.push((id, reason, Mode::Linger));
            }
            self.mark_dirty(id);
        }
    }

    /// Writes what is queued once, then drops the connection (a slow
    /// consumer: its queue is full, so waiting for it to drain is pointless).
    pub fn abort(&mut self, id: ConnId, reason: CloseReason) {
        self.close(id, reason, Mode::Abort);
    }

    /// Removes a closing connection whose linger deadline has passed.
    pub fn expire(&mut self, id: ConnId) {
        self.close(id, CloseReason::PeerClosed, Mode::Drop);
    }

    /// The peer has gone or said it is going (EOF, reset, ERROR, GOODBYE):
    /// what it is owed is still written, then the connection is removed.
    pub fn peer_gone(&mut self, id: ConnId, reason: CloseReason) {
        self.close(id, reason, Mode::PeerGone);
    }

    pub(super) fn close(&mut self, id: ConnId, reason: CloseReason, mode: Mode) {
        let Some(c) = self.slab.get_mut(id.0) else { return };
        if c.closing.is_none() {
            // A deadline far enough for the flush; Linger sets its own.
            c.closing = Some(self.now + LINGER);
            c.reason = reason;
            c.rbuf = Vec::new();
            c.stalled = false;
            self.io.pending -= std::mem::take(&mut c.counted);
        }
        self.closes.push((id, reason, mode));
    }

    /// The close request's connection, its reason, and whether its service
    /// still has to be told (marks it told).
    pub(super) fn notice(&mut self, id: ConnId) -> Option<CloseReason> {
        let c = self.slab.get_mut(id.0)?;
        if std::mem::replace(&mut c.noticed, true) {
            None
        } else {
            Some(c.reason)
        }
    }

    /// Carries out a close request once its service knows.
    pub(super) fn finish_close(&mut self, id: ConnId, mode: Mode) {
        let Some(c) = self.slab.get_mut(id.0) else { return };
        match mode {
            Mode::Linger => {}
            Mode::Abort => {
                self.flush(id);
                self.remove(id);
            }
            Mode::PeerGone if c.pending() > 0 && !c.eof => {
                // Flush first (a publisher may only have half-closed); the
                // flush removes it once everything is out.
                c.eof = true;
                self.mark_dirty(id);
            }
            Mode::PeerGone | Mode::Drop => self.remove(id),
        }
    }

    /// Drops the connection now.
    fn remove(&mut self, id: ConnId) {
        // No explicit deregister: closing the socket removes it from epoll,
        // one syscall fewer per connection. An event already fetched for
        // this token causes at most one spurious read of the key's next
        // occupant, which returns WouldBlock.
        if let Some(c) = self.slab.try_remove(id.0) {
            self.open[c.listener as usize] -= 1;
            self.io.pending -= c.counted;
        }
    }

    /// One write of the connection's pending output; see [`Outbox::flush`].
    pub(super) fn flush(&mut self, id: ConnId) {
        let Some(c) = self.slab.get_mut(id.0) else { return };
        let closing = c.closing.is_some();
        let limit = c.state.write_limit(&mut c.out);
        let mut r = c.out.flush(&mut c.io, &self.registry, id.token(), closing, limit);
        if let Ok(f @ Flushed { held: true, .. }) = r {
            // The socket took everything up to the limit: let the state
            // rework what it held back, and write on.
            let limit = c.state.write_limit(&mut c.out);
            r = c.out.flush(&mut c.io, &self.registry, id.token(), closing, limit).map(|g| Flushed {
                wrote: match (f.wrote, g.wrote) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                },
                ..g
            });
        }
        match r {
            Err(_) => self.close(id, CloseReason::Io, Mode::Drop),
            Ok(f) => {
                if let Some(n) = f.wrote {
                    self.io.writes += 1;
                    self.io.bytes_out += n as u64;
                }
                if !closing && c.state.budgeted() {
                    // Set right: the writes, and output queued without a
                    // charge (a WELCOME, a replay, a PONG).
                    let now = c.out.pending();
                    self.io.pending = self.io.pending - c.counted + now;
                    c.counted = now;
                }
                if f.empty && closing {
                    if c.eof {
                        self.close(id, CloseReason::PeerClosed, Mode::Drop);
                        return;
                    }
                    if !c.shut {
                        // Everything is out: half-close so the peer reads
                        // our last frame and then EOF; its EOF or the linger
                        // timer reaps us. (A full close with unread input
                        // would send RST and could destroy the frame.)
                        c.shut = true;
                        let _ = c.io.shutdown(Shutdown::Write);
                    }
                }
                if c.stalled && c.pending() <= c.state.read_resume(&self.cx) {
                    c.stalled = false;
                    self.retry.push(id);
                }
            }
        }
    }

    /// Whether reading `id` must wait: output backed up (marks it stalled),
    /// or the peer already closed.
    pub(super) fn hold_reading(&mut self, id: ConnId) -> bool {
        let Some(c) = self.slab.get_mut(id.0) else { return true };
        if c.eof || c.stalled {
            return true;
        }
        if c.closing.is_none() && c.pending() > c.state.read_stop(&self.cx) {
            c.stalled = true;
            return true;
        }
        false
    }

    /// Stops parsing a connection whose output is over its read stop.
    pub(super) fn stall_if_full(&mut self, id: ConnId) -> bool {
        match self.slab.get_mut(id.0) {
            Some(c) if c.pending() > c.state.read_stop(&self.cx) => {
                c.stalled = true;
                true
            }
            _ => false,
        }
    }

    /// Records bytes read from the peer.
    #[inline]
    pub(super) fn received(&mut self, id: ConnId, n: usize, now: Instant) -> Option<&mut Conn<S>> {
        self.io.bytes_in += n as u64;
        let c = self.slab.get_mut(id.0)?;
        c.last_rx = now;
        c.state.received();
        Some(c)
    }

    /// Whether the peer has closed its side.
    pub(super) fn eof(&self, id: ConnId) -> bool {
        self.slab.get(id.0).is_none_or(|c| c.eof)
    }
}

/// The turn's flush list and the pending-output total, borrowed beside
/// one connection.
pub struct Dirty<'a> {
    list: &'a mut Vec<ConnId>,
    pending: &'a mut usize,
}

impl Dirty<'_> {
    /// Lists `c` (whose id is `id`) for this turn's flush, once.
    #[inline]
    pub fn mark<S>(&mut self, c: &mut Conn<S>, id: ConnId) {
        if c.out.mark_dirty() {
            self.list.push(id);
        }
    }

    /// Counts `n` bytes just queued to `c` (a budgeted, open connection)
    /// in [`IoCounts::pending`].
    #[inline]
    pub fn charge<S>(&mut self, c: &mut Conn<S>, n: usize) {
        c.counted += n;
        *self.pending += n;
    }
}
