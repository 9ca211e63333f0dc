//! The readiness loop every herald server runs on (node and decision
//! server): poll, accept with the EMFILE pause, budgeted reads, the
//! decode-and-dispatch step, one flush per dirty connection, and closes.
//!
//! One turn (the nats-server shape):
//! 1. poll, sleeping at most until the service's next deadline
//!    ([`Service::timeout`]); take `now`;
//! 2. for each ready socket: accept until `WouldBlock`, or read until
//!    `WouldBlock` or [`READ_BUDGET`], decode every complete frame on the
//!    channel the connection's state names and hand it to the service, which
//!    *appends* output to connections ([`Conns::queue`]);
//! 3. carry out the close requests of the step, telling the service of each
//!    close exactly once ([`Service::closed`]);
//! 4. flush every dirty connection with one write each;
//! 5. run the service's timers, which take `now` as an argument.
//!
//! The loop knows nothing about roles: a [`Service`] decides what a frame
//! means. Calls only go down: the loop calls the service, the service calls
//! [`Conns`] and the codec, and neither calls back up.

use std::io::{self, ErrorKind, Read};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::close::CloseReason;
use super::conns::{ConnId, ConnState, Conns, Framing, MAX_LISTENERS};
use super::transport::Transport;
use crate::protocol::frame::decode_in;
use crate::protocol::{Code, DecodeError, Decoded, Frame};

/// The waker's token (below [`super::FIRST_CONN`], above the listeners).
pub const WAKER: Token = Token(super::FIRST_CONN - 1);

/// Bytes read from one connection per turn before yielding to the others.
pub const READ_BUDGET: usize = 256 * 1024;

/// How long accepting pauses after running out of file descriptors.
const EMFILE_PAUSE: Duration = Duration::from_millis(100);
/// Connections a service may close to make room per accept call
/// ([`Service::make_room`]) before accepting pauses anyway.
const MAKE_ROOM_BUDGET: usize = 64;

/// What a service says after handling input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the connection's next frame.
    Continue,
    /// Stop parsing this connection's input (it is closing).
    Stop,
    /// The connection has left this loop ([`Conns::take`]); do not touch it.
    Gone,
    /// Not now: this frame and the rest of the input are kept unparsed and
    /// the connection is not read until the service asks for it again
    /// ([`Conns::read_again`]); till then its [`Service::may_read`] must
    /// say no. The kernel's buffers fill and the peer gets TCP
    /// back-pressure (a rate limit that delays rather than refuses).
    Pause,
}

/// What a service's timers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing was due.
    Idle,
    /// Timers ran (flush again).
    Ran,
    /// The loop should return.
    Exit,
}

/// A server role set that runs on the [`EventLoop`]: it gives meaning to
/// accepts, frames, wakes and time. Every method gets the connections and
/// `now`; none can reach the loop itself.
pub trait Service {
    /// The per-connection state.
    type State: ConnState;

    /// A turn begins (after poll returned).
    fn turn(&mut self, _now: Instant) {}

    /// A connection was accepted on `listener`: its initial state, or the
    /// reason to refuse it (the service may write a last frame to `io`).
    fn accept(
        &mut self,
        conns: &mut Conns<Self::State>,
        listener: usize,
        io: &mut Transport,
        now: Instant,
    ) -> Result<Self::State, CloseReason>;

    /// A connection was refused at accept (by [`Service::accept`] or the
    /// listener's cap).
    fn refused(&mut self, listener: usize, reason: CloseReason);

    /// One whole frame from `id`. `bytes` starts with the frame's own
    /// `len` bytes and runs to the end of what has been read (so a role can
    /// hand the rest of the input on with the connection).
    fn frame(
        &mut self,
        conns: &mut Conns<Self::State>,
        id: ConnId,
        frame: Frame<'_>,
        bytes: &[u8],
        len: usize,
        now: Instant,
    ) -> Flow;

    /// Raw input of a [`Framing::Raw`] connection, as read.
    fn raw(&mut self, conns: &mut Conns<Self::State>, id: ConnId, data: &[u8], now: Instant) -> Flow {
        let _ = (data, now);
        conns.abort(id, CloseReason::Sent(Code::ProtocolError));
        Flow::Stop
    }

    /// Whether `id` may be read now; a service that says no must ask for
    /// the read again ([`Conns::read_again`]) when it may.
    #[inline]
    fn may_read(&mut self, _conns: &Conns<Self::State>, _id: ConnId) -> bool {
        true
    }

    /// Accepting failed for lack of file descriptors (EMFILE/ENFILE): close
    /// a connection to make room (and return true), and the loop accepts
    /// again at once; false pauses accepting for a moment instead.
    fn make_room(&mut self, _conns: &mut Conns<Self::State>, _now: Instant) -> bool {
        false
    }

    /// The connection is closing (or gone) for `reason`: called exactly
    /// once per connection, before it leaves the slab.
    fn closed(&mut self, conns: &mut Conns<Self::State>, id: ConnId, reason: CloseReason, now: Instant);

    /// A source the service registered itself (a token below the
    /// connections' that is neither a listener nor the waker) is ready.
    fn source(&mut self, _conns: &mut Conns<Self::State>, _token: Token, _now: Instant) {}

    /// The waker fired. Returns true to stop the loop at once.
    fn woken(&mut self, conns: &mut Conns<Self::State>, now: Instant) -> bool;

    /// The turn's input is handled; flushes come next.
    fn before_flush(&mut self, _conns: &mut Conns<Self::State>, _now: Instant) {}

    /// The turn's flushes are done.
    fn after_flush(&mut self, _conns: &mut Conns<Self::State>, _now: Instant) {}

    /// How long the loop may sleep in poll from `now`.
    fn timeout(&self, now: Instant) -> Duration;

    /// Runs whatever timers are due at `now`.
    fn timers(&mut self, conns: &mut Conns<Self::State>, now: Instant) -> Tick;

    /// Whether `listener` should stay open (a draining node closes its
    /// listeners, so new connections are refused at once).
    fn listening(&self, _listener: usize) -> bool {
        true
    }
}

/// A listening socket, its connection cap and its TLS, if any.
pub struct Listener {
    /// The socket.
    pub sock: TcpListener,
    /// Most connections open from it at once; more are closed at accept.
    pub cap: usize,
    /// TLS on this port: every accepted connection starts a TLS handshake.
    pub tls: Option<crate::tls::Acceptor>,
}

/// Binds a listening TCP socket with a deep backlog (a reconnect storm of
/// thousands of clients arrives at once and must not overflow it).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    listen_with(addr, None)
}

/// [`listen`], with every accepted socket's kernel send buffer fixed at
/// `sndbuf` bytes (`SO_SNDBUF`, set on the listener: accepted sockets
/// inherit it, so no syscall per accept). Linux doubles the value for its
/// own bookkeeping and turns off send-buffer autotuning for these sockets,
/// so the kernel holds at most about twice `sndbuf` of a connection's
/// unsent or unacknowledged output. None: the kernel's default (autotuned,
/// up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default).
pub fn listen_with(addr: std::net::SocketAddr, sndbuf: Option<usize>) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if let Some(n) = sndbuf {
        s.set_send_buffer_size(n)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(TcpListener::from_std(s.into()))
}

/// The process's soft limit on open file descriptors (`RLIMIT_NOFILE`;
/// `usize::MAX` if unlimited), or None if it cannot be read.
pub fn descriptor_limit() -> Option<usize> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return None;
    }
    Some(usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX))
}

/// One readiness loop: a poll, its listeners, its connections and the
/// service that gives them meaning.
pub struct EventLoop<S: Service> {
    poll: Poll,
    listeners: Vec<Option<Listener>>,
    /// The connections.
    pub conns: Conns<S::State>,
    /// The roles.
    pub service: S,
    scratch: Vec<u8>,
    accept_paused_until: Option<Instant>,
}

impl<S: Service> EventLoop<S> {
    /// A loop over `poll` (whose waker, if any, is registered as [`WAKER`])
    /// with `listeners` as tokens 0, 1, … in order.
    pub fn new(
        poll: Poll,
        listeners: Vec<Listener>,
        service: S,
        cx: <S::State as ConnState>::Cx,
    ) -> io::Result<EventLoop<S>> {
        assert!(listeners.len() <= MAX_LISTENERS);
        let mut ls = Vec::with_capacity(listeners.len());
        for (i, mut l) in listeners.into_iter().enumerate() {
            poll.registry().register(&mut l.sock, Token(i), Interest::READABLE)?;
            ls.push(Some(l));
        }
        let conns = Conns::new(poll.registry().try_clone()?, 1024, cx);
        Ok(EventLoop {
            poll,
            listeners: ls,
            conns,
            service,
            scratch: vec![0u8; 64 * 1024],
            accept_paused_until: None,
        })
    }

    /// Runs turns until the service stops the loop.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let mut timeout = self.service.timeout(now);
            if !self.conns.retry.is_empty() {
                timeout = Duration::ZERO;
            }
            if let Some(t) = self.accept_paused_until {
                timeout = timeout.min(t.saturating_duration_since(now));
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            self.conns.now = now;
            self.service.turn(now);
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {
                        if self.service.woken(&mut self.conns, now) {
                            return Ok(());
                        }
                    }
                    Token(t) if t < self.listeners.len() => self.accept(t, now),
                    t => match ConnId::from_token(t) {
                        None => self.service.source(&mut self.conns, t, now),
                        Some(id) => {
                            if !self.conns.contains(id) {
                                continue; // sporadic events happen
                            }
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                self.read(id, now);
                            }
                            if ev.is_writable() {
                                self.conns.mark_dirty(id);
                            }
                        }
                    },
                }
                self.close_pending(now);
            }
            for id in std::mem::take(&mut self.conns.retry) {
                if self.conns.contains(id) {
                    self.read(id, now);
                    self.close_pending(now);
                }
            }
            self.service.before_flush(&mut self.conns, now);
            self.flush_dirty(now);
            self.service.after_flush(&mut self.conns, now);

            let now = Instant::now();
            self.conns.now = now;
            let resumed = self.accept_paused_until.is_some_and(|t| now >= t);
            if resumed {
                self.accept_paused_until = None;
                for l in 0..self.listeners.len() {
                    self.accept(l, now);
                }
            }
            match self.service.timers(&mut self.conns, now) {
                Tick::Idle if !resumed => {}
                Tick::Exit => return Ok(()),
                Tick::Idle | Tick::Ran => {
                    self.close_pending(now);
                    for (i, slot) in self.listeners.iter_mut().enumerate() {
                        if slot.is_some() && !self.service.listening(i) {
                            if let Some(mut l) = slot.take() {
                                let _ = self.poll.registry().deregister(&mut l.sock);
                            }
                        }
                    }
                    // Accepts the timers resumed may have queued output or
                    // hand-overs: out in this turn, not the next.
                    self.service.before_flush(&mut self.conns, now);
                    self.flush_dirty(now);
                    self.service.after_flush(&mut self.conns, now);
                }
            }
        }
    }

    /// Flushes every dirty connection, then what closing them made dirty.
    pub fn flush_dirty(&mut self, now: Instant) {
        while !self.conns.dirty.is_empty() {
            for id in std::mem::take(&mut self.conns.dirty) {
                self.conns.flush(id);
            }
            self.close_pending(now);
        }
    }

    /// Carries out the close requests, telling the service of each close once.
    fn close_pending(&mut self, now: Instant) {
        while !self.conns.closes.is_empty() {
            for (id, _, mode) in std::mem::take(&mut self.conns.closes) {
                if let Some(reason) = self.conns.notice(id) {
                    self.service.closed(&mut self.conns, id, reason, now);
                }
                self.conns.finish_close(id, mode);
            }
        }
    }

    fn accept(&mut self, l: usize, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now < t) {
            return;
        }
        let mut room = MAKE_ROOM_BUDGET;
        loop {
            let Some(listener) = self.listeners.get(l).and_then(Option::as_ref) else { return };
            match listener.sock.accept() {
                Ok((sock, _)) => self.admit(l, sock, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: stop accepting for a moment, keep
                    // serving. The pause's end is a poll deadline; no busy loop.
                    self.conns.io.accept_emfile += 1;
                    if room > 0 && self.service.make_room(&mut self.conns, now) {
                        // The closes free their descriptors now.
                        room -= 1;
                        self.close_pending(now);
                        continue;
                    }
                    self.accept_paused_until = Some(now + EMFILE_PAUSE);
                    return;
                }
                Err(_) => return, // ECONNABORTED and friends: the peer gave up.
            }
        }
    }

    fn admit(&mut self, l: usize, sock: TcpStream, now: Instant) {
        let Some(listener) = self.listeners[l].as_ref() else { return };
        if self.conns.open_on(l) >= listener.cap {
            // Dropping the socket closes it: a flood on one port cannot use
            // up the descriptors another port's connections need.
            self.service.refused(l, CloseReason::TooMany);
            return;
        }
        let mut io = match &listener.tls {
            None => Transport::plain(sock),
            Some(a) => match Transport::tls_server(sock, a.config()) {
                Ok(t) => t,
                Err(_) => {
                    self.service.refused(l, CloseReason::Tls);
                    return;
                }
            },
        };
        match self.service.accept(&mut self.conns, l, &mut io, now) {
            Ok(state) => {
                let id = self.conns.insert(io, state, l, now);
                // Data may already be waiting (a HELLO often arrives with the
                // handshake's last ACK).
                self.read(id, now);
                self.close_pending(now);
            }
            Err(reason) => self.service.refused(l, reason),
        }
    }

    /// Reads `id` until `WouldBlock` or the budget, dispatching its frames.
    fn read(&mut self, id: ConnId, now: Instant) {
        if self.conns.hold_reading(id) || !self.service.may_read(&self.conns, id) {
            return;
        }
        // Input left by a hand-over or a stall goes first.
        if self.conns.get(id).is_some_and(|c| !c.rbuf.is_empty() && !c.is_closing())
            && !self.input(id, &[], now)
        {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        loop {
            if self.conns.eof(id) {
                break;
            }
            let Some(c) = self.conns.get_mut(id) else { break };
            match c.io.read(&mut scratch) {
                Ok(0) => {
                    self.conns.peer_gone(id, CloseReason::PeerClosed);
                    break;
                }
                Ok(n) => {
                    let Some(c) = self.conns.received(id, n, now) else { break };
                    // While closing, input is read (to see the EOF) and discarded.
                    if !c.is_closing() && !self.input(id, &scratch[..n], now) {
                        break;
                    }
                    if n >= budget {
                        self.conns.retry.push(id);
                        break;
                    }
                    budget -= n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    self.conns.peer_gone(id, CloseReason::PeerClosed);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::InvalidData => {
                    // TLS refused the peer's bytes (its alert is already sent).
                    self.conns.close(id, CloseReason::Tls, super::conns::Mode::Drop);
                    break;
                }
                Err(_) => {
                    self.conns.close(id, CloseReason::Io, super::conns::Mode::Drop);
                    break;
                }
            }
        }
        self.scratch = scratch;
        // A TLS handshake step may have left records to send.
        if self.conns.get(id).is_some_and(|c| c.io.wants_write()) {
            self.conns.mark_dirty(id);
        }
    }

    /// Feeds input to a connection: the carried bytes plus `data`, cut into
    /// frames and dispatched; a trailing partial frame (or what a stall left)
    /// is kept. Returns false if reading should stop.
    fn input(&mut self, id: ConnId, data: &[u8], now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(id) else { return false };
        let channel = match c.state.framing() {
            Framing::Raw => return self.service.raw(&mut self.conns, id, data, now) == Flow::Continue,
            Framing::Frames(ch) => ch,
        };
        // Parse straight from the read if nothing is carried over; copy only
        // what is left unparsed.
        let mut carried = std::mem::take(&mut c.rbuf);
        let from_carried = !carried.is_empty();
        let buf: &[u8] = if from_carried {
            carried.extend_from_slice(data);
            &carried
        } else {
            data
        };
        let mut at = 0;
        let mut ok = true;
        while at < buf.len() {
            if self.conns.stall_if_full(id) {
                // Its answers are not being read: keep the rest for later.
                ok = false;
                break;
            }
            let Some(c) = self.conns.get(id) else { return false };
            // §2.4 step 2: the state's check rides on the type byte, ahead of
            // the type's length bound and the body, before anything is
            // buffered.
            let state = &c.state;
            match decode_in(&buf[at..], channel, |t| state.allows(t)) {
                Ok(Decoded::Frame(frame, n)) => {
                    match self.service.frame(&mut self.conns, id, frame, &buf[at..], n, now) {
                        Flow::Continue => at += n,
                        Flow::Pause => {
                            ok = false;
                            break;
                        }
                        Flow::Stop | Flow::Gone => return false,
                    }
                }
                Ok(Decoded::Incomplete(_)) => break,
                Err(DecodeError::NotNow(t)) => {
                    let msg = format!("frame type 0x{t:02x}: {}", c.state.expects());
                    self.conns.fail(id, Code::UnexpectedFrame, &msg, now);
                    return false;
                }
                Err(e) => {
                    self.conns.fail(id, e.code(), &e.to_string(), now);
                    return false;
                }
            }
        }
        let Some(c) = self.conns.get_mut(id) else { return false };
        if c.is_closing() {
            return false;
        }
        let len = buf.len();
        // Keep the rest in the same buffer (no allocation per read);
        // publishers and links also keep its capacity, clients give it back
        // so an idle connection holds no buffer.
        if from_carried {
            carried.drain(..at);
        } else {
            carried.clear();
            carried.extend_from_slice(&data[at..]);
        }
        if at < len || c.state.keeps_rbuf() {
            c.rbuf = carried;
        }
        ok
    }
}
