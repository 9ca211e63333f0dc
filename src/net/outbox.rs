//! Pending output of one non-blocking connection, as the node's and the
//! decision server's event loops keep it: frames are appended to a buffer
//! during a turn, and each flush makes one `write` of whatever is pending;
//! WRITABLE interest is registered only while output is left over, and a
//! buffer that grew large is released once it empties, so idle connections
//! hold no output memory.
//!
//! A connection's state may hold back the tail of its output (a node
//! conflating a slow session takes frames out of the middle of the queue,
//! protocol.md §5.7): a flush then writes only up to the limit it is given,
//! and says when it got there, so the caller can rework the tail and write
//! again in the same turn.

use std::io::{self, ErrorKind, Write};

use mio::event::Source;
use mio::{Interest, Registry, Token};

/// Where an outbox writes: a socket, or a TLS session that may hold output
/// of its own (handshake messages, records the socket did not take).
pub trait Sink: Write + Source {
    /// Whether the sink itself holds output not yet on the wire.
    #[inline]
    fn backlog(&self) -> bool {
        false
    }
}

impl Sink for mio::net::TcpStream {}

/// An emptied buffer larger than this is freed rather than kept for reuse.
const KEEP: usize = 16 * 1024;

/// Output queued for one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Queued output; the first `pos` bytes are already written.
    pub buf: Vec<u8>,
    pos: usize,
    /// Bytes taken off the front of `buf` since the box was made: the
    /// stream offset of `buf[0]`.
    base: u64,
    want_write: bool,
    dirty: bool,
}

/// What one [`Outbox::flush`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Bytes written, if a write was made (`Some(0)`: the socket was full).
    pub wrote: Option<usize>,
    /// Everything queued is written.
    pub empty: bool,
    /// The write stopped at the limit it was given: everything before it is
    /// written, and output after it is left.
    pub held: bool,
}

impl Outbox {
    /// Marks the box as having output for this turn's flush; true if it was
    /// not marked yet (the caller then adds the connection to its dirty
    /// list, so each connection is flushed once per turn).
    #[inline]
    pub fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    /// Whether the box is marked for this turn's flush.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes of `buf` already written (they are dropped from the front now
    /// and then).
    #[inline]
    pub fn written(&self) -> usize {
        self.pos
    }

    /// The stream offset of `buf[0]`: the bytes ever queued before it. So
    /// `base() + i` names byte `i` of `buf` for as long as it is queued.
    #[inline]
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Whether a write has left output over that is not all written since:
    /// the connection waits to hear that its socket drained.
    #[inline]
    pub fn backed_up(&self) -> bool {
        self.want_write
    }

    /// Makes room for `n` more bytes, growing the buffer by a quarter (or
    /// `n`) rather than doubling it: a long queue's memory then stays
    /// within about 1.25 times its bytes, which is what the node's output
    /// budget counts. Amortised like doubling (the growth is geometric).
    #[inline]
    pub fn reserve(&mut self, n: usize) {
        if self.buf.capacity() - self.buf.len() < n {
            self.buf.reserve_exact(n.max(self.buf.len() / 4));
        }
    }

    /// Makes one write of the pending bytes, or of those before `limit` (an
    /// index into `buf`) if given. If that empties the box, the buffer is
    /// reset (and freed if `release` or if it grew past 16 KiB) and WRITABLE
    /// interest is dropped; otherwise the written part is compacted away
    /// once it is half the buffer and WRITABLE interest is asked for, so the
    /// loop hears when the socket drains. An error means the connection is
    /// broken.
    pub fn flush<S: Sink>(
        &mut self,
        sock: &mut S,
        registry: &Registry,
        token: Token,
        release: bool,
        limit: Option<usize>,
    ) -> io::Result<Flushed> {
        self.dirty = false;
        let mut wrote = None;
        let end = limit.map_or(self.buf.len(), |l| l.clamp(self.pos, self.buf.len()));
        if end > self.pos {
            match sock.write(&self.buf[self.pos..end]) {
                Ok(n) => {
                    self.pos += n;
                    wrote = Some(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                    wrote = Some(0)
                }
                Err(e) => return Err(e),
            }
        } else if sock.backlog() {
            sock.flush()?;
        }
        let held = self.pos == end && end < self.buf.len();
        let empty = self.pending() == 0 && !sock.backlog();
        if empty {
            self.base += self.buf.len() as u64;
            self.pos = 0;
            if release || self.buf.capacity() > KEEP {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
            if self.want_write {
                self.want_write = false;
                let _ = registry.reregister(sock, token, Interest::READABLE);
            }
        } else {
            if self.pos > self.buf.len() / 2 {
                self.buf.drain(..self.pos);
                self.base += self.pos as u64;
                self.pos = 0;
            }
            if !self.want_write {
                self.want_write = true;
                let _ = registry.reregister(sock, token, Interest::READABLE | Interest::WRITABLE);
            }
        }
        Ok(Flushed { wrote, empty, held })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::net::TcpStream;
    use mio::{Events, Poll};
    use std::io::Read;
    use std::time::Duration;

    /// A connected pair: the mio side registered for READABLE, the other a
    /// blocking std stream.
    fn pair(poll: &Poll) -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let mut s = TcpStream::from_std(s);
        poll.registry().register(&mut s, Token(1), Interest::READABLE).unwrap();
        (s, peer)
    }

    #[test]
    fn a_small_flush_writes_everything_and_keeps_the_buffer() {
        let poll = Poll::new().unwrap();
        let (mut s, mut peer) = pair(&poll);
        let mut out = Outbox::default();
        out.buf.extend_from_slice(b"hello");
        assert!(out.mark_dirty(), "first mark: add to the dirty list");
        assert!(!out.mark_dirty(), "already listed");
        let f = out.flush(&mut s, poll.registry(), Token(1), false, None).unwrap();
        assert!(!out.is_dirty(), "a flush takes it off");
        assert_eq!(f, Flushed { wrote: Some(5), empty: true, held: false });
        assert!(out.buf.capacity() > 0, "a small buffer is kept for reuse");
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Nothing pending: no write at all; release frees the buffer.
        let f = out.flush(&mut s, poll.registry(), Token(1), true, None).unwrap();
        assert_eq!(f, Flushed { wrote: None, empty: true, held: false });
        assert_eq!(out.buf.capacity(), 0);
    }

    #[test]
    fn a_full_socket_leaves_output_pending_and_asks_for_writable() {
        let mut poll = Poll::new().unwrap();
        let (mut s, mut peer) = pair(&poll);
        let mut out = Outbox::default();
        out.buf.resize(64 << 20, 7); // far more than the socket buffers hold
        let f = out.flush(&mut s, poll.registry(), Token(1), false, None).unwrap();
        assert!(!f.empty && f.wrote.unwrap() > 0, "{f:?}");
        let left = out.pending();
        assert!(left > 0 && left < 64 << 20);
        // The peer reads what was written; WRITABLE was registered, so the
        // loop hears that the socket has room again.
        let mut sink = vec![0u8; f.wrote.unwrap()];
        peer.read_exact(&mut sink).unwrap();
        let mut events = Events::with_capacity(8);
        poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert!(events.iter().any(|e| e.token() == Token(1) && e.is_writable()), "WRITABLE after draining");
        let f = out.flush(&mut s, poll.registry(), Token(1), false, None).unwrap();
        assert!(f.wrote.unwrap() > 0 && out.pending() < left);
    }
}
