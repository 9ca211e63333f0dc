//! The [`Publisher`]: sends messages to users over a node's ingest endpoint
//! (protocol.md §5), one at a time, in batches, or confirmed by PUB_RESULT,
//! and fails over between nodes when a write fails.
//!
//! It must not buffer without bound: writes block under the node's TCP
//! back-pressure, and a poll reads at most 64 KiB. It has nothing to do with
//! subscribing clients (see `session`).

use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{wire, ClientError};
use crate::protocol::frame::{self as f, BatchWriter, Frame, PUBLISH_WANT_RESULT};
use crate::protocol::{self, limits, Channel, Decoded, MIN_VERSION, VERSION};

/// A publisher connection to one node (protocol.md §5).
///
/// Given several nodes ([`Publisher::connect_any`]) it fails over: when a
/// write fails it connects to the next node and writes the unsent buffer
/// again, so a buffer partly taken by the failed node may be delivered twice.
/// Bytes the kernel accepted just before a node died cannot be seen from a
/// plain write; where that matters use [`Publisher::publish_confirmed`],
/// which waits for the node's PUB_RESULT.
pub struct Publisher {
    sock: crate::dial::Stream,
    /// TLS to the ingest port, if any.
    tls: Option<Arc<rustls::ClientConfig>>,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    node_id: String,
    next_request: u32,
    last_poll: Instant,
    nodes: Vec<String>,
    current: usize,
    credential: String,
    failovers: u64,
    /// PUB_RESULTs read before anyone waited for them.
    results: std::collections::VecDeque<f::PubResult>,
}

/// Buffered output is written once it reaches this size.
const PUB_FLUSH_AT: usize = 64 * 1024;

/// TCP connect timeout for each node tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Publisher {
    /// Connects to a node's ingest endpoint and authenticates with a
    /// credential minted with the publisher secret.
    pub fn connect(addr: &str, credential: &str) -> Result<Publisher, ClientError> {
        Publisher::connect_any(&[addr.to_owned()], credential)
    }

    /// Connects to the first node of `nodes` that accepts, and fails over
    /// between them afterwards.
    pub fn connect_any(nodes: &[String], credential: &str) -> Result<Publisher, ClientError> {
        Publisher::connect_tls(nodes, credential, None)
    }

    /// [`Publisher::connect_any`] over TLS when `tls` is given: each node's
    /// certificate is verified for the host of its endpoint (protocol.md §11).
    pub fn connect_tls(
        nodes: &[String],
        credential: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Publisher, ClientError> {
        let mut last = ClientError::NoNode;
        for (i, n) in nodes.iter().enumerate() {
            match Publisher::open(n, credential, tls.clone()) {
                Ok(mut p) => {
                    p.nodes = nodes.to_vec();
                    p.current = i;
                    return Ok(p);
                }
                Err(e @ ClientError::Rejected { .. }) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// How many times this publisher has failed over to another node.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Moves to the next node that accepts, keeping the unsent buffer.
    fn failover(&mut self) -> Result<(), ClientError> {
        let n = self.nodes.len();
        let mut last = ClientError::NoNode;
        for step in 1..=n.max(1) {
            let i = (self.current + step) % n.max(1);
            let Some(addr) = self.nodes.get(i) else { break };
            match Publisher::open(addr, &self.credential, self.tls.clone()) {
                Ok(p) => {
                    self.sock = p.sock;
                    self.rbuf = p.rbuf;
                    self.node_id = p.node_id;
                    self.current = i;
                    self.failovers += 1;
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn open(
        addr: &str,
        credential: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Publisher, ClientError> {
        let (mut sock, _) = crate::dial::dial_stream(addr, CONNECT_TIMEOUT, tls.as_ref())?;
        let hello = Frame::PubHello(f::PubHello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            credential: credential.as_bytes(),
            agent: b"herald-rs-publisher",
        })
        .to_vec();
        sock.write_all(&hello)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut p = Publisher {
            sock,
            tls,
            wbuf: Vec::with_capacity(PUB_FLUSH_AT + 1024),
            rbuf: Vec::new(),
            node_id: String::new(),
            next_request: 1,
            last_poll: Instant::now(),
            nodes: vec![addr.to_owned()],
            current: 0,
            credential: credential.to_owned(),
            failovers: 0,
            results: Default::default(),
        };
        p.node_id = p.read_frame(|f| match f {
            // §5.2: the version must be one the PUB_HELLO offered.
            Frame::PubWelcome(w) if !protocol::speaks(w.version) => {
                Err(ClientError::BadWelcome(format!("PUB_WELCOME chose version {}, not offered", w.version)))
            }
            Frame::PubWelcome(w) => Ok(Some(String::from_utf8_lossy(w.node_id).into_owned())),
            _ => Ok(None),
        })?;
        Ok(p)
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Queues one message; written when the buffer fills or on [`Publisher::flush`].
    pub fn publish(&mut self, user: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        self.publish_keyed(user, b"", payload)
    }

    /// Queues one message with conflation key `key` (protocol.md §5.7): on a
    /// node run with `--slow-policy conflate`, a later message with the same
    /// key may replace it in a slow session's queue. An empty key: never.
    pub fn publish_keyed(&mut self, user: &[u8], key: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        check_user(user, payload)?;
        check_key(key)?;
        f::encode_publish(&mut self.wbuf, 0, 0, user, key, payload);
        if self.wbuf.len() >= PUB_FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Queues many messages as PUBLISH_BATCH frames.
    pub fn publish_batch<'a>(
        &mut self,
        msgs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), ClientError> {
        let mut w = BatchWriter::start(&mut self.wbuf, 0, 0);
        for (user, payload) in msgs {
            check_user(user, payload)?;
            if !w.push(&mut self.wbuf, user, b"", payload) {
                w.finish(&mut self.wbuf);
                if self.wbuf.len() >= PUB_FLUSH_AT {
                    self.flush()?;
                }
                w = BatchWriter::start(&mut self.wbuf, 0, 0);
                w.push(&mut self.wbuf, user, b"", payload);
            }
        }
        if w.count() == 0 {
            // Drop the empty frame header.
            let empty = f::HEADER_LEN + 1 + 4 + 2;
            let n = self.wbuf.len() - empty;
            self.wbuf.truncate(n);
        } else {
            w.finish(&mut self.wbuf);
        }
        if self.wbuf.len() >= PUB_FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Publishes one message and waits for the node's PUB_RESULT.
    pub fn publish_confirmed(&mut self, user: &[u8], payload: &[u8]) -> Result<f::PubResult, ClientError> {
        self.publish_confirmed_keyed(user, b"", payload)
    }

    /// [`Publisher::publish_confirmed`] with a conflation key (see
    /// [`Publisher::publish_keyed`]).
    pub fn publish_confirmed_keyed(
        &mut self,
        user: &[u8],
        key: &[u8],
        payload: &[u8],
    ) -> Result<f::PubResult, ClientError> {
        check_user(user, payload)?;
        check_key(key)?;
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        let mut frame = Vec::with_capacity(64 + payload.len());
        f::encode_publish(&mut frame, PUBLISH_WANT_RESULT, id, user, key, payload);
        // If the node dies before answering, fail over and send it again:
        // a confirmed publish is delivered at least once.
        let mut tries = self.nodes.len().max(1);
        loop {
            self.wbuf.extend_from_slice(&frame);
            let r = self.flush().and_then(|()| self.await_result(id));
            match r {
                Ok(r) => return Ok(r),
                Err(e @ ClientError::Rejected { .. }) | Err(e @ ClientError::Protocol(_)) => return Err(e),
                Err(e) => {
                    tries -= 1;
                    if tries == 0 || self.nodes.len() < 2 {
                        return Err(e);
                    }
                    self.wbuf.clear();
                    self.failover()?;
                }
            }
        }
    }

    fn await_result(&mut self, id: u32) -> Result<f::PubResult, ClientError> {
        loop {
            if let Some(i) = self.results.iter().position(|r| r.request_id == id) {
                return Ok(self.results.remove(i).expect("index from position"));
            }
            let r = self.read_frame(|f| match f {
                Frame::PubResult(r) => Ok(Some(r)),
                _ => Ok(None),
            })?;
            self.results.push_back(r);
        }
    }

    /// Queues frames that are already encoded (PUBLISH / PUBLISH_BATCH, e.g.
    /// built with [`BatchWriter`]) and writes everything buffered.
    pub fn write_raw(&mut self, frames: &[u8]) -> Result<(), ClientError> {
        self.wbuf.extend_from_slice(frames);
        self.flush()
    }

    /// Writes everything buffered. Blocks while the node applies back-pressure.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            if self.sock.write_all(&self.wbuf).is_err() {
                self.failover()?;
                self.sock.write_all(&self.wbuf)?;
            }
            self.wbuf.clear();
        }
        if self.last_poll.elapsed() >= Duration::from_secs(1) {
            self.poll_incoming()?;
        }
        Ok(())
    }

    /// Answers keepalives and notices GOODBYE/ERROR without blocking.
    fn poll_incoming(&mut self) -> Result<(), ClientError> {
        self.last_poll = Instant::now();
        self.sock.set_nonblocking(true)?;
        let mut chunk = [0u8; 4096];
        let r = loop {
            // Take at most 64 KiB a call (plus one frame in progress): a node
            // streaming at us cannot grow this buffer without bound.
            if self.rbuf.len() >= 64 * 1024 {
                break Ok(());
            }
            match self.sock.read(&mut chunk) {
                Ok(0) => break Err(ClientError::Closed),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.sock.set_nonblocking(false)?;
        r?;
        while let Decoded::Frame(frame, n) =
            protocol::decode(&self.rbuf, Channel::FromIngest).map_err(ClientError::Protocol)?
        {
            if let Frame::PubResult(r) = frame {
                // A result that arrived early: keep it for publish_confirmed.
                if self.results.len() >= 1024 {
                    self.results.pop_front();
                }
                self.results.push_back(r);
            }
            let reply = Self::on_control(frame)?;
            self.rbuf.drain(..n);
            if let Some(r) = reply {
                self.sock.write_all(&r)?;
            }
        }
        Ok(())
    }

    fn on_control(frame: Frame<'_>) -> Result<Option<Vec<u8>>, ClientError> {
        match frame {
            Frame::Ping(n) => Ok(Some(Frame::Pong(n).to_vec())),
            Frame::Error(e) => Err(ClientError::Rejected {
                code: e.code,
                message: String::from_utf8_lossy(e.message).into_owned(),
            }),
            Frame::Goodbye(g) => {
                Err(ClientError::Rejected { code: g.reason, message: "node said goodbye".into() })
            }
            _ => Ok(None),
        }
    }

    /// Reads frames until `pick` returns a value, answering PINGs.
    fn read_frame<T>(
        &mut self,
        mut pick: impl FnMut(Frame<'_>) -> Result<Option<T>, ClientError>,
    ) -> Result<T, ClientError> {
        let mut chunk = [0u8; 4096];
        // One deadline for the answer, however many PINGs come first.
        let deadline = wire::handshake_deadline();
        loop {
            while let Decoded::Frame(frame, n) =
                protocol::decode(&self.rbuf, Channel::FromIngest).map_err(ClientError::Protocol)?
            {
                let picked = match frame {
                    Frame::Ping(_) | Frame::Error(_) | Frame::Goodbye(_) => {
                        if let Some(r) = Self::on_control(frame)? {
                            self.sock.write_all(&r)?;
                        }
                        None
                    }
                    other => pick(other)?,
                };
                self.rbuf.drain(..n);
                if let Some(t) = picked {
                    return Ok(t);
                }
            }
            wire::read_before(&mut self.sock, &mut self.rbuf, &mut chunk, deadline, "answer from the node")?;
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), ClientError> {
    if key.len() > limits::MAX_KEY_LEN {
        return Err(ClientError::Io(io::Error::new(ErrorKind::InvalidInput, "key must be at most 64 bytes")));
    }
    Ok(())
}

fn check_user(user: &[u8], payload: &[u8]) -> Result<(), ClientError> {
    if user.is_empty() || user.len() > limits::MAX_USER_LEN || payload.len() > limits::MAX_PAYLOAD {
        return Err(ClientError::Io(io::Error::new(
            ErrorKind::InvalidInput,
            "user id must be 1..=64 bytes and payload at most 65,536 bytes",
        )));
    }
    Ok(())
}
