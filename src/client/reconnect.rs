//! How a [`Client`] gets (back) to a node: which node to try (a GOODBYE's
//! redirect, the cached node, the decision servers, the static list), the
//! jittered backoff between attempts, and the HELLO/WELCOME handshake with
//! its resume checks (protocol.md §3).
//!
//! It must not read a running session's frames (that is `session`'s job)
//! and must not retry an error that retrying cannot fix (a rejection).

use std::io::{self, Write};
use std::time::{Duration, Instant};

use super::session::{error_bytes, Client, Event, Session};
use super::{wire, ClientError};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{self, Channel, Code, Decoded, Position, ResumeResult, MIN_VERSION, VERSION};

/// How many times the cached node is retried before asking the decision servers again.
const CACHED_TRIES: u32 = 2;

/// Per-decision-server timeout.
const DECISION_TIMEOUT: Duration = Duration::from_secs(1);

impl Client {
    /// Sets when to try connecting again (jittered backoff, doubling up to
    /// `backoff_max`), unless a time is set already (e.g. by a GOODBYE).
    pub(super) fn schedule_retry(&mut self, _code: Option<Code>, _reason: &str) {
        if self.wait_until.is_none() {
            let d = self.jitter.spread(self.backoff);
            self.wait_until = Some(Instant::now() + d);
            self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
        }
    }

    /// The nodes to try for the next connection, in order: a GOODBYE's
    /// redirect; else the cached node while it keeps answering (as the
    /// seed's clients do); else a fresh answer from the decision servers;
    /// else the static node list.
    fn candidates(&mut self) -> Result<Vec<String>, ClientError> {
        if let Some(r) = self.redirect.take() {
            return Ok(vec![r]);
        }
        if let Some(c) = self.cached.clone() {
            // Without decision servers the cached node is kept, unless the
            // static list names another one to fail over to.
            let nowhere_else = self.cfg.decision.is_empty() && self.cfg.nodes.len() < 2;
            if self.cached_failures < CACHED_TRIES || nowhere_else {
                return Ok(vec![c]);
            }
            self.last_failed = Some(c);
            self.cached = None;
        }
        if !self.cfg.decision.is_empty() {
            let user = self.cfg.user.clone().unwrap_or_default();
            return match crate::decision::client::assign(
                &self.cfg.decision,
                user.as_bytes(),
                self.cfg.token.as_bytes(),
                3,
                &crate::decision::client::Dial::new(DECISION_TIMEOUT, self.cfg.decision_tls.clone()),
            ) {
                Ok(crate::decision::client::AssignOutcome::Nodes(n)) => {
                    let mut v: Vec<String> = n.into_iter().map(|a| a.endpoint).collect();
                    if let Some(bad) = self.last_failed.as_ref() {
                        crate::decision::client::failed_last(&mut v, bad);
                    }
                    Ok(v)
                }
                Ok(crate::decision::client::AssignOutcome::NoCapacity { retry_after }) => {
                    Err(ClientError::NoCapacity(retry_after))
                }
                Err(e) => Err(ClientError::Io(io::Error::other(format!("no decision server answered: {e}")))),
            };
        }
        if self.cfg.nodes.is_empty() {
            return Err(ClientError::NoNode);
        }
        Ok(vec![self.cfg.nodes[self.node_index % self.cfg.nodes.len()].clone()])
    }

    /// Connects, sends HELLO (resuming if we have a position), reads WELCOME.
    pub(super) fn establish(&mut self) -> Result<(), ClientError> {
        let mut last = ClientError::NoNode;
        for name in self.candidates()? {
            match self.handshake(&name) {
                Ok(()) => {
                    self.cached = Some(name);
                    self.cached_failures = 0;
                    return Ok(());
                }
                // Not a failure of this node: another node must not be
                // asked to get around the cap (protocol.md §3.6).
                Err(e @ (ClientError::Rejected { .. } | ClientError::SessionLimit(_))) => return Err(e),
                Err(e) => {
                    if self.cached.as_deref() == Some(name.as_str()) {
                        self.cached_failures += 1;
                    }
                    last = e;
                }
            }
        }
        // Next time, try the next static node.
        self.node_index += 1;
        Err(last)
    }

    fn handshake(&mut self, endpoint: &str) -> Result<(), ClientError> {
        let (mut sock, addr) =
            crate::dial::dial_stream(endpoint, self.cfg.connect_timeout, self.cfg.tls.as_ref())?;
        let mut out = Vec::with_capacity(256);
        Frame::Hello(f::Hello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            token: self.cfg.token.as_bytes(),
            agent: self.cfg.agent.as_bytes(),
            resume: self.last,
        })
        .encode(&mut out);
        sock.write_all(&out)?;
        // One deadline for the whole handshake (protocol.md §3.6), however
        // slowly the node dribbles its WELCOME.
        let deadline = wire::handshake_deadline();
        self.rbuf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let rbuf = std::mem::take(&mut self.rbuf);
            let decoded = protocol::decode(&rbuf, Channel::ToClient);
            match decoded {
                Ok(Decoded::Frame(Frame::Welcome(w), n)) => {
                    if !protocol::speaks(w.version) {
                        // §3.2: a version outside the range the HELLO offered.
                        let m = format!("WELCOME chose version {}, not offered", w.version);
                        let _ = sock.write_all(&error_bytes(Code::UnsupportedVersion, &m));
                        return Err(ClientError::BadWelcome(m));
                    }
                    if let Err(m) = check_welcome(&w, self.last) {
                        let _ = sock.write_all(&error_bytes(Code::ProtocolError, &m));
                        return Err(ClientError::BadWelcome(m));
                    }
                    let node_id = String::from_utf8_lossy(w.node_id).into_owned();
                    let lost = match (w.resume, self.last) {
                        (ResumeResult::Gap, Some(p)) => w.next_seq.saturating_sub(p.seq.saturating_add(1)),
                        _ => 0,
                    };
                    if w.resume == ResumeResult::Restarted {
                        self.queued.push_back(Event::Gap { expected: 0, got: w.next_seq });
                    } else if w.resume == ResumeResult::Gap {
                        let expected = self.last.map_or(0, |p| p.seq.saturating_add(1));
                        self.queued.push_back(Event::Gap { expected, got: w.next_seq });
                    }
                    if w.resume != ResumeResult::Resumed {
                        // New stream (or a gap): positions restart from the welcome.
                        self.last = Some(Position { epoch: w.epoch, seq: w.next_seq.saturating_sub(1) });
                    }
                    self.queued.push_front(Event::Connected { node_id, addr, resume: w.resume, lost });
                    self.rbuf = rbuf[n..].to_vec();
                    if self.connected_once {
                        self.reconnects += 1;
                    }
                    self.connected_once = true;
                    // protocol.md §3.4: 0 means "use 10 s"; below 100 ms, use 100 ms.
                    let heartbeat = Duration::from_millis(match w.heartbeat_ms {
                        0 => 10_000,
                        ms => ms.max(100) as u64,
                    });
                    // A node that stops reading must not block us in a
                    // write (a PONG) for longer than it may stay silent.
                    sock.set_write_timeout(Some(heartbeat * 3))?;
                    self.session =
                        Some(Session { sock, addr, epoch: w.epoch, heartbeat, heard: Instant::now() });
                    self.backoff = self.cfg.backoff_min;
                    return Ok(());
                }
                Ok(Decoded::Frame(Frame::Error(e), _)) => {
                    let message = String::from_utf8_lossy(e.message).into_owned();
                    return Err(match e.code {
                        Code::AuthFailed | Code::TokenExpired | Code::UnsupportedVersion => {
                            ClientError::Rejected { code: e.code, message }
                        }
                        Code::SessionLimit => {
                            // Come back to this node, not the next one.
                            self.cached = Some(endpoint.to_owned());
                            ClientError::SessionLimit(message)
                        }
                        _ => ClientError::Io(io::Error::other(format!("{}: {message}", e.code))),
                    });
                }
                Ok(Decoded::Frame(other, _)) => {
                    return Err(ClientError::Io(io::Error::other(format!(
                        "expected WELCOME, got frame 0x{:02x}",
                        other.frame_type()
                    ))))
                }
                Ok(Decoded::Incomplete(_)) => {}
                Err(e) => return Err(ClientError::Protocol(e)),
            }
            self.rbuf = rbuf;
            wire::read_before(&mut sock, &mut self.rbuf, &mut chunk, deadline, "WELCOME")?;
        }
    }
}

/// The checks a client makes on WELCOME (protocol.md §3.2), given the
/// position it asked to resume from.
fn check_welcome(w: &f::Welcome<'_>, asked: Option<Position>) -> Result<(), String> {
    if w.epoch == 0 || w.next_seq == 0 {
        return Err("epoch and next_seq must not be 0".into());
    }
    match (asked, w.resume) {
        (None, ResumeResult::Fresh) | (Some(_), ResumeResult::Restarted) => Ok(()),
        (None, r) => Err(format!("{r:?} without a resume request")),
        (Some(_), ResumeResult::Fresh) => Err("FRESH answer to a resume request".into()),
        // (checked: a hostile node may have sent seq u64::MAX before)
        (Some(p), ResumeResult::Resumed)
            if w.epoch == p.epoch && p.seq.checked_add(1) == Some(w.next_seq) =>
        {
            Ok(())
        }
        (Some(p), ResumeResult::Gap)
            if w.epoch == p.epoch && p.seq.checked_add(1).is_some_and(|n| w.next_seq > n) =>
        {
            Ok(())
        }
        (Some(p), r) => Err(format!(
            "{r:?} with epoch {:x}/next_seq {} for a resume from {:x}/{}",
            w.epoch, w.next_seq, p.epoch, p.seq
        )),
    }
}
