//! Blocking connections to herald's servers (nodes and decision servers),
//! for the client library, the publisher, decision-server requests and the
//! swarm: each address of the endpoint's host in turn, then plain TCP, or
//! TLS verifying the server's certificate for the host name dialled (or its
//! IP address), all within one deadline.
//!
//! It must not decode frames, keep state, or retry: callers decide what a
//! timeout or a closed connection means for them.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connects to `endpoint` (`host:port`): each address its host resolves
/// to in turn (`localhost` may name `::1` before `127.0.0.1`), until one
/// accepts, all before `deadline`; with Nagle off. Returns the stream and
/// the address it reached.
pub(crate) fn connect(endpoint: &str, deadline: Instant) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last = None;
    for addr in endpoint.to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, format!("{endpoint}: connect timed out")));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(sock) => {
                sock.set_nodelay(true)?;
                return Ok((sock, addr));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(ErrorKind::NotFound, format!("{endpoint}: no address"))))
}

/// A connection to a node or a decision server: plain TCP or TLS over it.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (the handshake is complete once [`dial_stream`] returns it).
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }

    /// See [`TcpStream::set_read_timeout`].
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)
    }

    /// See [`TcpStream::set_nonblocking`].
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nonblocking(on)
    }

    /// See [`TcpStream::set_write_timeout`].
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(t)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => match t.read(buf) {
                // A node that closes without close_notify is gone all the same.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => {
                let n = t.write(buf)?;
                // rustls's stream reports a failed send only at the next
                // call; push the records out now so a broken connection
                // fails this write (and a publisher resends this buffer).
                while t.conn.wants_write() {
                    t.conn.write_tls(&mut t.sock)?;
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// Connects to `endpoint` (`host:port`, see [`connect`]) within `timeout`.
/// With `tls`, completes a TLS handshake that verifies the server's
/// certificate for the endpoint's host name (or IP address), within the
/// same timeout; a certificate that does not verify is an error naming why.
/// Returns the stream and the address it reached.
pub(crate) fn dial_stream(
    endpoint: &str,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<(Stream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let (sock, addr) = connect(endpoint, deadline)?;
    let Some(cfg) = tls else { return Ok((Stream::Plain(sock), addr)) };
    let name = crate::tls::server_name(endpoint)?;
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
    let mut t = rustls::StreamOwned::new(conn, sock);
    while t.conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("TLS to {endpoint}: handshake timed out"),
            ));
        }
        t.sock.set_read_timeout(Some(left))?;
        t.sock.set_write_timeout(Some(left))?;
        t.conn.complete_io(&mut t.sock).map_err(|e| match e.kind() {
            ErrorKind::InvalidData => {
                io::Error::new(ErrorKind::InvalidData, format!("TLS to {endpoint}: {e}"))
            }
            _ => e,
        })?;
    }
    // The handshake's deadline only: the caller sets its own timeouts.
    t.sock.set_read_timeout(None)?;
    t.sock.set_write_timeout(None)?;
    Ok((Stream::Tls(Box::new(t)), addr))
}
