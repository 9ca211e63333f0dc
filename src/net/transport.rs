//! The transport seam: what a connection's bytes travel over.
//!
//! Everything above this file reads and writes plaintext through
//! [`Transport`]; only this file knows whether a socket is plain TCP or (once
//! TLS lands) a TLS session over TCP, which becomes a second variant here and
//! nowhere else. It is registered with mio like the socket it wraps.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// A connection's byte stream.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
}

impl Transport {
    /// Wraps an accepted or dialled TCP socket; sets `TCP_NODELAY` (herald
    /// coalesces its own writes, so Nagle would only add latency).
    pub fn plain(sock: TcpStream) -> Transport {
        let _ = sock.set_nodelay(true);
        Transport::Plain(sock)
    }

    /// Shuts down one or both directions of the underlying socket.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.shutdown(how),
        }
    }

    /// The socket, to hand it to another event loop.
    pub fn into_tcp(self) -> TcpStream {
        match self {
            Transport::Plain(s) => s,
        }
    }
}

impl Read for Transport {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Transport {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.deregister(r),
        }
    }
}
