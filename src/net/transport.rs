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
//! message). rustls holds at most [`TLS_BUFFER`] bytes of not yet sent
//! ciphertext; the outbox keeps the rest, so the queue bound still holds.

use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// Most ciphertext (and plaintext not yet encrypted) rustls holds for one
/// connection.
pub const TLS_BUFFER: usize = 64 * 1024;

/// A connection's byte stream.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: plaintext connections do not pay for its size).
    Tls(Box<Tls>),
}

/// A TLS session and its socket.
#[derive(Debug)]
pub struct Tls {
    sock: TcpStream,
    conn: rustls::Connection,
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
        let mut conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        Ok(Transport::Tls(Box::new(Tls { sock, conn: conn.into() })))
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
        matches!(self, Transport::Tls(_))
    }

    /// Whether TLS output (handshake or records) waits to be written.
    #[inline]
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.conn.wants_write(),
        }
    }

    /// The peer's certificate chain, once a TLS handshake has completed.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(t) => t.conn.peer_certificates(),
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

impl Read for Transport {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = match self {
            Transport::Plain(s) => return s.read(buf),
            Transport::Tls(t) => t,
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
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.reregister(r, t, i),
            Transport::Tls(x) => x.sock.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.deregister(r),
            Transport::Tls(x) => x.sock.deregister(r),
        }
    }
}
