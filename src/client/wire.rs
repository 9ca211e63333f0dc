//! Timing shared by the [`Client`](super::Client) and the
//! [`Publisher`](super::Publisher) over a [`crate::dial`] stream: the one
//! deadline a handshake (or a publisher's wait for one answer) gets, and
//! reading more bytes before that deadline.
//!
//! It must not decode frames, keep state, or retry: callers decide what a
//! timeout or a closed connection means for them.

use std::io::{self, ErrorKind, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::ClientError;

/// How long a handshake (or a publisher's wait for one answer) may take in
/// all (protocol.md §3.6: give up after about 10 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The deadline for a handshake (or one answer) starting now: one deadline
/// for the whole wait, however slowly the node dribbles its bytes and however
/// many PINGs come first.
pub(super) fn handshake_deadline() -> Instant {
    Instant::now() + HANDSHAKE_TIMEOUT
}

/// A blocking reader whose reads can be given a timeout.
pub(super) trait TimedRead: Read {
    /// See [`TcpStream::set_read_timeout`].
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl TimedRead for crate::dial::Stream {
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// One read of at most `chunk.len()` bytes, appended to `buf`, waiting no
/// later than `deadline`. Past the deadline it fails with `TimedOut` ("no
/// `what` within 10 s"); a closed connection is [`ClientError::Closed`].
pub(super) fn read_before(
    sock: &mut impl TimedRead,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        let msg = format!("no {what} within {} s", HANDSHAKE_TIMEOUT.as_secs());
        return Err(ClientError::Io(io::Error::new(ErrorKind::TimedOut, msg)));
    }
    sock.read_timeout(Some(left))?;
    let n = sock.read(chunk)?;
    if n == 0 {
        return Err(ClientError::Closed);
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}
