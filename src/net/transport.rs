//! The transport seam: what a connection's bytes travel over.
//!
//! Everything above this file reads and writes plaintext through
//! [`Transport`]; only this file knows whether a socket is plain TCP or a
//! TLS session over TCP (rustls, driven sans-IO: ciphertext is read and
//! written here, plaintext handed up). It is registered with mio like the
//! socket it wraps.
//!
//! With TLS, one plaintext write becomes one TLS record (herald coalesces a
//! turn's frames into one write, so this is one record per turn, not per
//! message). At most [`TLS_BUFFER`] bytes of not yet sent ciphertext are
//! held here; the outbox keeps the rest, so the queue bound still holds.
//!
//! The server side (every accepted TLS connection: clients, publishers,
//! mesh peers) runs rustls's *unbuffered* API, where this file owns the
//! buffers: ciphertext is read into a per-thread scratch buffer and
//! decrypted there, and what a session keeps between calls (a partial
//! record, ciphertext the socket did not take, plaintext the caller had no
//! room for) is freed once it is used up, so an idle session holds only
//! rustls's own state (keys, the handshake deframer, the session's
//! state machine). The buffered `ServerConnection` kept a read buffer of at
//! least 4 KiB per session for its whole life. The client side (a node
//! dialling a mesh peer, a few connections) keeps rustls's buffered
//! `ClientConnection`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};

/// Most ciphertext (and plaintext not yet encrypted) rustls holds for one
/// connection.
pub const TLS_BUFFER: usize = 64 * 1024;

/// A connection's byte stream.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, the dialling side (rustls's buffered connection;
    /// boxed: plaintext connections do not pay for its size).
    Tls(Box<Tls>),
    /// TLS over TCP, the accepting side (rustls's unbuffered connection,
    /// buffers owned here: see the module docs).
    TlsServer(Box<ServerTls>),
}

/// A TLS session and its socket.
#[derive(Debug)]
pub struct Tls {
    sock: TcpStream,
    conn: rustls::Connection,
}

/// The server side of a TLS session and its socket, with the buffers
/// rustls's unbuffered API leaves to the caller. Each is empty (and holds
/// no memory) while the session idles. `S` is the socket: a mio
/// `TcpStream`, or an in-memory one for the fuzzing hook ([`fuzz`]).
pub struct ServerTls<S = TcpStream> {
    sock: S,
    conn: UnbufferedServerConnection,
    /// Ciphertext read but not yet processed (a partial record).
    inbuf: Vec<u8>,
    /// Ciphertext to send; the first `out_pos` bytes are sent.
    out: Vec<u8>,
    out_pos: usize,
    /// Plaintext decrypted but not yet taken by a read; the first
    /// `plain_pos` bytes are taken.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Plaintext written before the handshake completed.
    early_out: Vec<u8>,
    /// The peer's close_notify or EOF has been seen.
    peer_closed: bool,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ServerTls<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("sock", &self.sock)
            .field("handshaking", &self.conn.is_handshaking())
            .field("inbuf", &self.inbuf.len())
            .field("out", &(self.out.len() - self.out_pos))
            .field("plain", &(self.plain.len() - self.plain_pos))
            .finish()
    }
}

/// Bytes of the per-thread scratch a server session reads ciphertext into:
/// room for what a session may carry over (a handshake message split over
/// records, up to 64 KiB as rustls allows) plus one socket read.
const SCRATCH: usize = 96 * 1024;
/// Most ciphertext one socket read takes.
const READ_CHUNK: usize = 32 * 1024;
/// Most carried-over ciphertext (see [`SCRATCH`]).
const MAX_CARRY: usize = SCRATCH - READ_CHUNK;
/// A TLS 1.3 record's overhead: header, content type, AEAD tag.
const RECORD_OVERHEAD: usize = 5 + 1 + 16;
/// Largest plaintext fragment of one record.
const MAX_FRAGMENT: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Where a server session's records are encrypted before they are
    /// written (its capacity is kept: no allocation per write).
    static OUT_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Transport {
    /// Wraps an accepted or dialled TCP socket; sets `TCP_NODELAY` (herald
    /// coalesces its own writes, so Nagle would only add latency).
    pub fn plain(sock: TcpStream) -> Transport {
        let _ = sock.set_nodelay(true);
        Transport::Plain(sock)
    }

    /// The server side of a TLS session over an accepted socket.
    pub fn tls_server(sock: TcpStream, cfg: Arc<rustls::ServerConfig>) -> io::Result<Transport> {
        let _ = sock.set_nodelay(true);
        Ok(Transport::TlsServer(Box::new(ServerTls::new(sock, cfg)?)))
    }

    /// The client side of a TLS session over a dialled socket, verifying
    /// the server as `name`.
    pub fn tls_client(
        sock: TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        name: rustls_pki_types::ServerName<'static>,
    ) -> io::Result<Transport> {
        let _ = sock.set_nodelay(true);
        let mut conn = rustls::ClientConnection::new(cfg, name).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        Ok(Transport::Tls(Box::new(Tls { sock, conn: conn.into() })))
    }

    /// Whether this is a TLS session.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_) | Transport::TlsServer(_))
    }

    /// Whether TLS output (handshake or records) waits to be written.
    #[inline]
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.conn.wants_write(),
            Transport::TlsServer(t) => t.out_pos < t.out.len(),
        }
    }

    /// The peer's certificate chain, once a TLS handshake has completed.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(t) => t.conn.peer_certificates(),
            Transport::TlsServer(t) => t.conn.peer_certificates(),
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Transport::Plain(s) => s.peer_addr(),
            Transport::Tls(t) => t.sock.peer_addr(),
            Transport::TlsServer(t) => t.sock.peer_addr(),
        }
    }

    /// Shuts down one or both directions of the underlying socket (after a
    /// TLS close_notify, best effort).
    pub fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.shutdown(how),
            Transport::Tls(t) => {
                t.conn.send_close_notify();
                let _ = t.send();
                t.sock.shutdown(how)
            }
            Transport::TlsServer(t) => {
                t.close_notify();
                let _ = t.send();
                t.sock.shutdown(how)
            }
        }
    }
}

impl Tls {
    /// Writes ciphertext until the socket is full or nothing is left;
    /// returns whether the socket was full (then WRITABLE will be reported
    /// when it drains: mio is edge-triggered, so only a write that hit
    /// `WouldBlock` may leave output waiting for that event).
    fn send(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

impl<S: Read + Write> ServerTls<S> {
    /// A session over `sock`, before the handshake.
    fn new(sock: S, cfg: Arc<rustls::ServerConfig>) -> io::Result<ServerTls<S>> {
        let conn = UnbufferedServerConnection::new(cfg).map_err(io::Error::other)?;
        Ok(ServerTls {
            sock,
            conn,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            plain: Vec::new(),
            plain_pos: 0,
            early_out: Vec::new(),
            peer_closed: false,
        })
    }

    /// Queues a close_notify once the session is up (rustls's unbuffered
    /// API has none to give during the handshake); the caller sends it.
    fn close_notify(&mut self) {
        if !self.conn.is_handshaking() {
            let _ = self.with_write_traffic(None, |w, out| match w.queue_close_notify(out) {
                Err(EncryptError::InsufficientSize(e)) => Err(e.required_size),
                Ok(n) => Ok(n),
                Err(_) => Ok(0),
            });
        }
    }

    /// Writes ciphertext until the socket is full or nothing is left;
    /// returns whether the socket was full (see [`Tls::send`]). An emptied
    /// buffer is freed (it holds only what the socket did not take).
    fn send(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if self.out_pos > self.out.len() / 2 {
                        self.out.drain(..self.out_pos);
                        self.out_pos = 0;
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out_pos = 0;
        self.out = Vec::new();
        Ok(false)
    }

    /// Ciphertext not yet sent.
    fn out_pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Appends what `f` writes into a slice at the end of `out`; `f`
    /// returns the bytes written, or the size it needs.
    fn emit(out: &mut Vec<u8>, mut f: impl FnMut(&mut [u8]) -> Result<usize, usize>, guess: usize) {
        let start = out.len();
        out.resize(start + guess, 0);
        loop {
            match f(&mut out[start..]) {
                Ok(n) => {
                    out.truncate(start + n);
                    return;
                }
                Err(need) if need > out.len() - start => out.resize(start + need, 0),
                Err(_) => {
                    out.truncate(start);
                    return;
                }
            }
        }
    }

    /// Appends the handshake message or alert rustls has to send to `out`.
    fn encode(out: &mut Vec<u8>, e: &mut EncodeTlsData<'_, rustls::server::ServerConnectionData>) {
        Self::emit(
            out,
            |o| match e.encode(o) {
                Ok(n) => Ok(n),
                Err(EncodeError::InsufficientSize(s)) => Err(s.required_size),
                Err(_) => Ok(0),
            },
            0,
        );
    }

    /// Keeps plaintext a read had no room for.
    fn keep_plain(plain: &mut Vec<u8>, pos: &mut usize, data: &[u8]) {
        if *pos == plain.len() {
            plain.clear();
            *pos = 0;
        }
        plain.extend_from_slice(data);
    }

    /// Hands out kept plaintext; frees the buffer once it is all taken.
    fn take_plain(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.plain.len() - self.plain_pos);
        buf[..n].copy_from_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        n
    }

    /// Drives the session over `incoming` (ciphertext): decrypted
    /// plaintext goes into `buf` (what does not fit is kept), handshake
    /// output and alerts into `out`. Returns the bytes of `incoming` used
    /// up (the rest is a partial record, to be carried over) and the
    /// plaintext bytes put into `buf`; an error once rustls refused the
    /// peer's bytes (its alert is queued in `out`).
    fn process(&mut self, incoming: &mut [u8], buf: &mut [u8]) -> Result<(usize, usize), rustls::Error> {
        let mut used = 0;
        let mut got = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut incoming[used..]);
            match state {
                Err(e) => {
                    used += discard;
                    self.queue_alerts(&mut incoming[used..]);
                    return Err(e);
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec?;
                        discard += rec.discard;
                        let n = rec.payload.len().min(buf.len() - got);
                        buf[got..got + n].copy_from_slice(&rec.payload[..n]);
                        got += n;
                        if n < rec.payload.len() {
                            Self::keep_plain(&mut self.plain, &mut self.plain_pos, &rec.payload[n..]);
                        }
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => Self::encode(&mut self.out, &mut e),
                // The bytes are in `out`, which is sent in order.
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::BlockedHandshake) => {
                    used += discard;
                    return Ok((used, got));
                }
                Ok(ConnectionState::WriteTraffic(w)) => {
                    used += discard;
                    // The handshake has completed: what was written during
                    // it goes out now (the caller sees `wants_write` and
                    // flushes).
                    if !self.early_out.is_empty() {
                        let early = std::mem::take(&mut self.early_out);
                        Self::encrypt(&mut self.out, w, &early);
                    }
                    return Ok((used, got));
                }
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    used += discard;
                    return Ok((used, got));
                }
                // Early data is not enabled (max_early_data_size is 0).
                Ok(_) => return Err(rustls::Error::General("unexpected TLS state".into())),
            }
            used += discard;
        }
    }

    /// Moves what rustls queued after an error (its alert) into `out`.
    /// `incoming` is the input as the failed call left it (rustls may
    /// still refer to its front). Only called while rustls has output
    /// queued, which it hands out before looking at the input again (that
    /// would fail a second time).
    fn queue_alerts(&mut self, incoming: &mut [u8]) {
        while self.conn.wants_write() {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(incoming);
            match state {
                Ok(ConnectionState::ReadTraffic(mut r)) => while r.next_record().is_some() {},
                Ok(ConnectionState::EncodeTlsData(mut e)) => Self::encode(&mut self.out, &mut e),
                _ => return,
            }
        }
    }

    /// Encrypts `data` into records at the end of `out`.
    fn encrypt(
        out: &mut Vec<u8>,
        mut w: WriteTraffic<'_, rustls::server::ServerConnectionData>,
        data: &[u8],
    ) {
        let guess = data.len() + data.len().div_ceil(MAX_FRAGMENT).max(1) * RECORD_OVERHEAD;
        Self::emit(
            out,
            |o| match w.encrypt(data, o) {
                Ok(n) => Ok(n),
                Err(EncryptError::InsufficientSize(s)) => Err(s.required_size),
                Err(_) => Ok(0),
            },
            guess,
        );
    }

    /// Brings the session to the state where it may encrypt (encoding
    /// whatever rustls queued first) and runs `f` there with the end of
    /// `out`; `f` returns the bytes it wrote or the size it needs.
    fn with_write_traffic(
        &mut self,
        mut dest: Option<&mut Vec<u8>>,
        mut f: impl FnMut(
            &mut WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, usize>,
    ) -> io::Result<()> {
        // rustls is given the carried input (a partial record it may have
        // looked at), never an empty buffer in its place.
        let mut inbuf = std::mem::take(&mut self.inbuf);
        let mut done = None;
        while done.is_none() {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut inbuf);
            match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    let out = match dest {
                        Some(ref mut d) => &mut **d,
                        None => &mut self.out,
                    };
                    Self::emit(out, |o| f(&mut w, o), 0);
                    done = Some(Ok(()));
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => Self::encode(&mut self.out, &mut e),
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    // Not reached (reads take every record), but keep the bytes.
                    while let Some(Ok(rec)) = r.next_record() {
                        Self::keep_plain(&mut self.plain, &mut self.plain_pos, rec.payload);
                    }
                }
                Ok(ConnectionState::PeerClosed) => self.peer_closed = true,
                Ok(ConnectionState::BlockedHandshake) => done = Some(Err(ErrorKind::WouldBlock.into())),
                Ok(_) => done = Some(Err(ErrorKind::BrokenPipe.into())),
                Err(e) => done = Some(Err(io::Error::new(ErrorKind::InvalidData, e))),
            }
            inbuf.drain(..discard);
        }
        if !inbuf.is_empty() {
            self.inbuf = inbuf;
        }
        done.unwrap_or(Ok(()))
    }

    /// Reads and decrypts: see [`Read`] for [`Transport`].
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.plain_pos < self.plain.len() {
            return Ok(self.take_plain(buf));
        }
        if self.peer_closed {
            return Ok(0);
        }
        SCRATCH_BUF.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SCRATCH {
                s.resize(SCRATCH, 0);
            }
            let mut carry = self.inbuf.len();
            s[..carry].copy_from_slice(&self.inbuf);
            loop {
                let end = (carry + READ_CHUNK).min(SCRATCH);
                let n = match self.sock.read(&mut s[carry..end]) {
                    Ok(0) => {
                        // EOF, with or without close_notify: the peer is gone.
                        self.peer_closed = true;
                        self.inbuf = Vec::new();
                        return Ok(0);
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let filled = carry + n;
                let (used, got) = match self.process(&mut s[..filled], buf) {
                    Ok(r) => r,
                    Err(e) => {
                        // rustls has queued an alert saying why: send it.
                        self.inbuf = Vec::new();
                        let _ = self.send();
                        return Err(io::Error::new(ErrorKind::InvalidData, e));
                    }
                };
                carry = filled - used;
                if carry == 0 {
                    self.inbuf = Vec::new();
                } else {
                    if carry > MAX_CARRY {
                        self.inbuf = Vec::new();
                        return Err(io::Error::new(ErrorKind::InvalidData, "TLS message too large"));
                    }
                    self.inbuf.clear();
                    self.inbuf.extend_from_slice(&s[used..filled]);
                    s.copy_within(used..filled, 0);
                }
                if got > 0 {
                    return Ok(got);
                }
                if self.peer_closed {
                    return Ok(0);
                }
            }
        })
    }

    /// Encrypts and sends: see [`Write`] for [`Transport`].
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.conn.is_handshaking() {
            // Kept until the handshake completes, as rustls's buffered
            // connection does; its completion marks the connection for a
            // flush (the read that completes it leaves output to send).
            let n = buf.len().min(TLS_BUFFER.saturating_sub(self.early_out.len()));
            if n == 0 && !buf.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.early_out.extend_from_slice(&buf[..n]);
            return Ok(n);
        }
        if !self.early_out.is_empty() {
            let early = std::mem::take(&mut self.early_out);
            self.encrypt_all(None, &early)?;
        }
        // As for the buffered side: encrypt what the limit takes, send it,
        // and go on until everything is taken or the socket is full. The
        // records are encrypted into a per-thread scratch buffer and
        // written from there; only what the socket does not take is kept.
        let mut taken = 0;
        while !self.send()? && taken < buf.len() {
            // `send` returned false: nothing is pending, the whole limit is free.
            let n = (buf.len() - taken).min(TLS_BUFFER);
            OUT_SCRATCH.with(|s| -> io::Result<()> {
                let mut s = s.borrow_mut();
                s.clear();
                self.encrypt_all(Some(&mut s), &buf[taken..taken + n])?;
                let mut sent = 0;
                if self.out_pending() == 0 {
                    while sent < s.len() {
                        match self.sock.write(&s[sent..]) {
                            Ok(0) => return Err(ErrorKind::WriteZero.into()),
                            Ok(k) => sent += k,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                self.out.extend_from_slice(&s[sent..]);
                Ok(())
            })?;
            taken += n;
        }
        if taken == 0 && !buf.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Encrypts all of `data` into records at the end of `dest` (none:
    /// `out`). Records rustls queued first go to `out`.
    fn encrypt_all(&mut self, dest: Option<&mut Vec<u8>>, data: &[u8]) -> io::Result<()> {
        let guess = data.len() + data.len().div_ceil(MAX_FRAGMENT).max(1) * RECORD_OVERHEAD;
        let mut first = true;
        self.with_write_traffic(dest, |w, o| {
            if first && o.len() < guess {
                first = false;
                return Err(guess);
            }
            match w.encrypt(data, o) {
                Ok(n) => Ok(n),
                Err(EncryptError::InsufficientSize(s)) => Err(s.required_size),
                Err(_) => Ok(0),
            }
        })
    }
}

impl Read for Transport {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = match self {
            Transport::Plain(s) => return s.read(buf),
            Transport::Tls(t) => t,
            Transport::TlsServer(t) => return t.read(buf),
        };
        loop {
            match t.conn.reader().read(buf) {
                Ok(n) => return Ok(n), // 0: the peer's close_notify
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // EOF without close_notify: the peer is gone all the same.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match t.conn.read_tls(&mut t.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    if let Err(e) = t.conn.process_new_packets() {
                        // rustls has queued an alert saying why: send it.
                        let _ = t.send();
                        return Err(io::Error::new(ErrorKind::InvalidData, e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Transport {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = match self {
            Transport::Plain(s) => return s.write(buf),
            Transport::Tls(t) => t,
            Transport::TlsServer(t) => return t.write(buf),
        };
        // Encrypts what rustls's buffer limit takes, sends it, and goes on
        // until everything is taken or the socket is full. Stopping short
        // with room left in the socket would strand the rest: no WRITABLE
        // edge comes for a socket that never refused a write. (During the
        // handshake rustls keeps the plaintext; the handshake's completion
        // marks the connection for a flush.)
        let mut taken = 0;
        while !t.send()? && taken < buf.len() {
            let n = t.conn.writer().write(&buf[taken..])?;
            if n == 0 {
                break;
            }
            taken += n;
        }
        if taken == 0 && !buf.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Writes TLS output rustls holds (handshake messages, alerts, records).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(t) => t.send().map(|_| ()),
            Transport::TlsServer(t) => t.send().map(|_| ()),
        }
    }
}

impl super::outbox::Sink for Transport {
    #[inline]
    fn backlog(&self) -> bool {
        self.wants_write()
    }
}

impl Source for Transport {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.register(r, t, i),
            Transport::Tls(x) => x.sock.register(r, t, i),
            Transport::TlsServer(x) => x.sock.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.reregister(r, t, i),
            Transport::Tls(x) => x.sock.reregister(r, t, i),
            Transport::TlsServer(x) => x.sock.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.deregister(r),
            Transport::Tls(x) => x.sock.deregister(r),
            Transport::TlsServer(x) => x.sock.deregister(r),
        }
    }
}

/// The fuzzing hook: herald's server side of TLS ([`ServerTls`]: its
/// carry-over of partial records, its output buffering, its alerts) over an
/// in-memory socket, driven as the event loop drives an accepted TLS
/// connection. Not part of the API.
#[doc(hidden)]
pub mod fuzz {
    use std::io::{self, ErrorKind, Read, Write};
    use std::sync::Arc;

    use super::{ServerTls, MAX_CARRY};

    /// A socket over given reads: each turn's bytes are handed out (as much
    /// as a read asks for), then reads block until the next turn; writes
    /// take up to a budget per turn, then block. After the last turn, EOF.
    #[derive(Debug)]
    struct MemSock {
        turn: Option<Vec<u8>>,
        pos: usize,
        eof: bool,
        budget: Option<usize>,
        left: usize,
        sent: Vec<u8>,
    }

    impl Read for MemSock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match &self.turn {
                Some(t) if self.pos < t.len() => {
                    let n = buf.len().min(t.len() - self.pos);
                    buf[..n].copy_from_slice(&t[self.pos..self.pos + n]);
                    self.pos += n;
                    Ok(n)
                }
                _ if self.eof => Ok(0),
                _ => Err(ErrorKind::WouldBlock.into()),
            }
        }
    }

    impl Write for MemSock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = match self.budget {
                None => buf.len(),
                Some(_) => buf.len().min(self.left),
            };
            if n == 0 && !buf.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.left -= n.min(self.left);
            self.sent.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What a session did with its input.
    #[derive(Debug)]
    pub struct Outcome {
        /// Plaintext bytes read.
        pub plaintext: usize,
        /// The read error that ended the session, if one did.
        pub error: Option<io::Error>,
        /// Every byte written to the socket.
        pub sent: Vec<u8>,
    }

    /// Runs one server session under `cfg`: each of `turns` is what one
    /// readiness event's reads find on the socket; after each turn the
    /// session is read until it blocks (plaintext read is written back, as
    /// a reply) and flushed; after the last, EOF. `write_budget`: most
    /// bytes the socket takes per turn (none: all). A read error ends the
    /// session, as the event loop closes the connection. Panics if an
    /// invariant of the session's buffers breaks.
    pub fn server_session(
        cfg: Arc<rustls::ServerConfig>,
        turns: &[&[u8]],
        write_budget: Option<usize>,
    ) -> Outcome {
        let sock = MemSock {
            turn: None,
            pos: 0,
            eof: false,
            budget: write_budget,
            left: write_budget.unwrap_or(0),
            sent: Vec::new(),
        };
        let mut t = ServerTls::new(sock, cfg).expect("session");
        // Written before the handshake completes (kept in early_out).
        assert_eq!(t.write(b"herald").ok(), Some(6));
        let mut buf = [0u8; 4096];
        let mut plaintext = 0;
        let mut error = None;
        'turns: for i in 0..=turns.len() {
            t.sock.left = write_budget.unwrap_or(0);
            match turns.get(i) {
                Some(b) => {
                    t.sock.turn = Some(b.to_vec());
                    t.sock.pos = 0;
                }
                None => {
                    t.sock.turn = None;
                    t.sock.eof = true;
                }
            }
            loop {
                let r = t.read(&mut buf);
                check(&t);
                match r {
                    Ok(0) => {
                        assert!(t.peer_closed || t.sock.eof, "read 0 before the peer closed");
                        break 'turns;
                    }
                    Ok(n) => {
                        assert!(n <= buf.len());
                        plaintext += n;
                        match t.write(&buf[..n]) {
                            Ok(k) => assert!(k <= n),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(_) => break 'turns,
                        }
                        check(&t);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        error = Some(e);
                        break 'turns;
                    }
                }
            }
            if t.send().is_err() {
                break;
            }
            check(&t);
        }
        t.close_notify();
        t.sock.budget = None;
        let _ = t.send();
        assert_eq!(t.out_pending(), 0, "output left after an unlimited flush");
        Outcome { plaintext, error, sent: std::mem::take(&mut t.sock.sent) }
    }

    fn check(t: &ServerTls<MemSock>) {
        assert!(t.inbuf.len() <= MAX_CARRY, "carried {} bytes", t.inbuf.len());
        assert!(t.out_pos <= t.out.len());
        assert!(t.plain_pos <= t.plain.len());
        assert!(t.plain.is_empty() || t.plain_pos < t.plain.len(), "taken plaintext kept");
    }
}
