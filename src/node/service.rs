//! The node's roles on the shared event loop: [`NodeLoop`] implements
//! [`Service`], dispatching each frame to the room that handles it
//! (sessions, publishers, mesh links, HTTP) and wiring what one room reports
//! to the others (a session that came online becomes presence for the mesh,
//! or a report to loop 0). Its timed duties are in [`super::duty`].
//!
//! Calls only go down from here: to the rooms, to [`Conns`], to the codec.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::net::{CloseReason, ConnId, Conns, Flow, Service, Tick, Transport};
use crate::protocol::frame::{self as f, Frame};
use crate::protocol::{token, Code, PresenceOp};

use super::cluster::{self, Ctl};
use super::config::Config;
use super::confirm::{Confirms, Done};
use super::conn::{listener, Peer};
use super::duty::Duties;
use super::http::{self, Request};
use super::http_publish::{self, Gate};
use super::intake::{self, Intake};
use super::journal::{Journal, Parked};
use super::link::Mesh;
use super::metrics::Metrics;
use super::publish;
use super::route::{Route, Turn};
use super::session::{Ended, Sessions};
use super::shard::{self, Change, HomeEvent, Inbox, Role, Shared};

/// Stop reading publishers while this many bytes wait for another loop.
const ROUTE_BACKLOG: usize = 4 << 20;

/// Loop 0's link to its helper threads (discovery, dials).
pub struct Control {
    /// Where helpers send.
    pub tx: crossbeam_channel::Sender<Ctl>,
    /// What they sent.
    pub rx: Receiver<Ctl>,
    /// Wakes this loop (helpers call it after sending).
    pub waker: Arc<mio::Waker>,
}

/// Durable mode: the way to the log thread and back.
pub struct LogLink {
    /// The log thread.
    pub log: crate::durable::log::Log,
    /// Its answers (it wakes this loop after each).
    pub answers: Receiver<crate::durable::Answer>,
}

/// What a caller of [`NodeLoop::split`] may need beside the route.
struct Beside<'a> {
    confirms: &'a mut Confirms,
    journal: Option<&'a mut Journal>,
    intake: &'a mut Intake,
    cfg: &'a Config,
    unix: u64,
}

/// One event loop's worth of the node.
pub struct NodeLoop {
    /// The configuration.
    pub cfg: Config,
    /// This loop's index (0: the ingest loop).
    pub id: usize,
    /// What all loops of the node share.
    pub shared: Arc<Shared>,
    /// What this loop is in the node.
    pub role: Role,
    /// Client sessions and streams.
    pub sessions: Sessions,
    /// Mesh links and presence.
    pub mesh: Mesh,
    /// PUB_RESULTs waiting for their forwards to be confirmed.
    pub confirms: Confirms,
    /// Counters.
    pub m: Metrics,
    /// This turn's delivery figures.
    pub turn: Turn,
    /// Wall clock at the start of the turn, seconds (token expiry).
    pub unix: u64,
    /// Timed duties: sweep, drains, heartbeats, stats.
    pub duties: Duties,
    /// Publishers not read while a mesh link or another loop is behind.
    pub parked: Vec<ConnId>,
    /// Set by the shutdown handle: drain and stop.
    pub stop: Arc<AtomicBool>,
    /// Set by the shutdown handle: stop at once.
    pub kill: Arc<AtomicBool>,
    /// Loop 0: helper threads.
    pub control: Option<Control>,
    /// Loops 1..N: the inbox was left at a hand-over, whose HELLO must run
    /// before the messages behind it (they may be for that very user).
    pub inbox_held: bool,
    /// Loop 0: connectors' batches, and the ids of queue messages appended
    /// here (also for FORWARDs that carry one).
    pub intake: Intake,
    /// Durable mode (loop 0, the only one): what waits on the log.
    pub journal: Option<Journal>,
    /// Durable mode: the log thread.
    pub log: Option<LogLink>,
}

impl NodeLoop {
    /// The parts one delivery touches.
    #[inline]
    fn route<'a>(&'a mut self, conns: &'a mut Conns<Peer>) -> Route<'a> {
        self.route_confirms(conns).0
    }

    /// The parts a publish touches: a delivery's, and the waiting PUB_RESULTs.
    #[inline]
    fn route_confirms<'a>(&'a mut self, conns: &'a mut Conns<Peer>) -> (Route<'a>, &'a mut Confirms) {
        let (route, beside) = self.split(conns);
        (route, beside.confirms)
    }

    /// The loop split into what one delivery touches and what its callers
    /// need beside it.
    #[inline]
    fn split<'a>(&'a mut self, conns: &'a mut Conns<Peer>) -> (Route<'a>, Beside<'a>) {
        let NodeLoop { cfg, sessions, m, mesh, role, shared, turn, unix, confirms, intake, journal, .. } =
            self;
        let route = Route {
            conns,
            sessions,
            m,
            presence: &mesh.presence,
            router: role.router(),
            loops: shared.n,
            turn,
        };
        (route, Beside { confirms, journal: journal.as_mut(), intake, cfg, unix: *unix })
    }

    /// Closes (ERROR IDLE_TIMEOUT) every mesh link that left a confirmation
    /// PING unanswered for the forward timeout (protocol.md §6.6); what
    /// waited on it counts as not forwarded.
    fn declare_down(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        let mut ready = Vec::new();
        for link in self.confirms.late(now) {
            let ms = self.confirms.timeout().as_millis();
            let msg = format!("mesh peer left a PING unanswered for {ms} ms");
            if let Some(peer) = conns.get(link).and_then(|c| c.state.link()) {
                log::warn!(
                    "herald node {}: mesh link to {}: {msg}; declared down",
                    self.cfg.node_id,
                    peer.peer_id
                );
            }
            conns.fail(link, Code::IdleTimeout, &msg, now);
            self.confirms.link_gone(link, &mut ready);
        }
        self.results(conns, ready, now);
    }

    /// Whether publishes from HTTP and connectors are taken now.
    fn gate(&mut self, conns: &Conns<Peer>) -> Gate {
        if self.draining() || self.duties.stopping() {
            Gate::Draining
        } else if self.backlogged(conns) {
            Gate::Busy
        } else {
            Gate::Open
        }
    }

    /// Routes the connectors' batches that wait (as far as the gate allows).
    fn sources(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        if !self.intake.waiting() {
            return;
        }
        let gate = self.gate(conns);
        let (mut route, b) = self.split(conns);
        b.intake.run(&mut route, b.confirms, b.journal, gate, now);
    }

    /// Runs `f` with what an HTTP API request needs (http_publish).
    fn with_api<R>(
        &mut self,
        conns: &mut Conns<Peer>,
        f: impl FnOnce(&mut Route<'_>, &mut http_publish::Cx<'_>) -> R,
    ) -> R {
        let gate = self.gate(conns);
        let (mut route, b) = self.split(conns);
        let mut cx = http_publish::Cx {
            confirms: b.confirms,
            secret: &b.cfg.publisher_secret,
            unix: b.unix,
            gate,
            journal: b.journal,
        };
        f(&mut route, &mut cx)
    }

    /// Writes the results confirmation completed: PUB_RESULTs to binary
    /// publishers, HTTP answers to API connections (which then go on with
    /// the requests that waited behind them).
    fn results(&mut self, conns: &mut Conns<Peer>, ready: Vec<(ConnId, Done)>, now: Instant) {
        let (sources, ready): (Vec<_>, Vec<_>) =
            ready.into_iter().partition(|(id, _)| intake::source_of(*id).is_some());
        for (id, d) in sources {
            if let Some(s) = intake::source_of(id) {
                self.intake.done(s, &d);
            }
        }
        let (api, ingest): (Vec<_>, Vec<_>) = ready
            .into_iter()
            .partition(|(id, _)| conns.get(*id).is_some_and(|c| matches!(c.state, Peer::Api(_))));
        publish::results(conns, &ingest, now);
        for (id, d) in api {
            self.with_api(conns, |route, cx| http_publish::done(route, cx, id, &d, now));
        }
    }

    /// Loops 1..N, at exit: the last figures for loop 0.
    pub fn final_stats(&mut self, conns: &Conns<Peer>) {
        let (duties, mut p) = self.duties();
        duties.publish_stats(true, &mut p, conns);
    }

    /// The timed duties, and the parts of the loop they work on.
    fn duties(&mut self) -> (&mut super::duty::Duties, super::duty::Parts<'_>) {
        let NodeLoop { cfg, id, shared, role, sessions, m, duties, stop, mesh, .. } = self;
        let p = super::duty::Parts {
            cfg,
            loop_id: *id,
            shared,
            role,
            sessions,
            m,
            stop,
            presence_out: &mut mesh.presence_out,
        };
        (duties, p)
    }

    /// Whether new sessions are refused with DRAINING.
    fn draining(&self) -> bool {
        self.duties.draining() || self.stop.load(Ordering::SeqCst)
    }

    fn hello(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        h: &f::Hello<'_>,
        bytes: &[u8],
        len: usize,
        now: Instant,
    ) -> Flow {
        // Several loops: a client belongs on its user's loop. (Not once the
        // node is stopping: other loops may already have exited; the
        // session step below answers DRAINING here.)
        if let Role::Router(r) = &mut self.role {
            if !self.stop.load(Ordering::SeqCst) {
                if let Some(user) = token::claimed_user(h.token) {
                    let owner = shard::owner(&user, self.shared.n);
                    if owner != 0 {
                        let Some(c) = conns.take(id) else { return Flow::Gone };
                        r.homes.handed_over(&user);
                        let msg = Inbox::Adopt {
                            sock: c.io,
                            bytes: bytes.to_vec(),
                            opened: c.opened,
                            user: user.into(),
                        };
                        if let Err(Inbox::Adopt { user, .. }) = r.hand_over(owner, msg) {
                            // The owner is gone (it failed): the socket closes
                            // as the message drops here; undo the bookkeeping.
                            r.homes.apply(HomeEvent { user, change: Change::Refused, known: false }, false);
                            self.shared.client_closed();
                        }
                        return Flow::Gone;
                    }
                }
            }
        }
        let draining = self.draining();
        if !draining && self.park(conns, id, h, &bytes[..len.min(bytes.len())], now) {
            return Flow::Continue;
        }
        let Some(w) = self.sessions.hello(conns, id, h, &self.cfg, draining, self.unix, &mut self.m, now)
        else {
            return Flow::Stop;
        };
        if let Some(j) = &mut self.journal {
            // Messages appended elsewhere before the peers heard the user
            // is online here are in the log: read it again shortly.
            j.recheck(&w.user, now);
        }
        match &mut self.role {
            // Reported here, before anything later in the same read can
            // close the session again (its Detached must follow this).
            Role::Owner(o) => o.report(&w.user, Change::Attached, true),
            _ if w.first_session => {
                self.mesh.presence_out.push((PresenceOp::Online, w.user.into_boxed_slice()))
            }
            _ => {}
        }
        Flow::Continue
    }

    /// Durable mode: parks a HELLO whose user's stream this node cannot
    /// serve from its ring (unknown here, or a position beyond or before
    /// what the ring holds) until the log's copy is read (§13). True if
    /// parked; false to run it now (also for one that fails anyway, so that
    /// it fails the usual way; strangers make no reads).
    fn park(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        h: &f::Hello<'_>,
        bytes: &[u8],
        now: Instant,
    ) -> bool {
        let Some(j) = &mut self.journal else { return false };
        let cred = super::auth::Credential::Client { token: h.token, secret: &self.cfg.client_secret };
        let Ok(a) = super::auth::authenticate(h.min_version, h.max_version, cred, self.unix) else {
            return false;
        };
        let user = a.user.unwrap_or_default();
        if let Some(u) = self.sessions.reg.find(&user) {
            if !j.is_reading(&user) && self.sessions.reg.can_serve(u, h.resume) {
                return false;
            }
        }
        let Some(c) = conns.get(id) else { return false };
        let opened = c.opened;
        if !j.healthy && !j.is_reading(&user) {
            conns.fail(id, Code::LogUnavailable, "the replicated log is unavailable; try again later", now);
            return true;
        }
        let epoch = j.epoch(&user);
        let after = h.resume.filter(|p| p.epoch == epoch).map(|p| p.seq);
        // A replica's answer will do: the session's recheck follows.
        j.read(&user, after, true);
        j.park(&user, Parked { id, opened, bytes: bytes.to_vec() });
        true
    }

    /// Durable mode: what the log thread answered.
    fn log_answers(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        let Some(link) = &self.log else { return };
        let answers: Vec<crate::durable::Answer> = link.answers.try_iter().collect();
        let mut ready = Vec::new();
        for a in answers {
            use crate::durable::Answer;
            let Some(j) = self.journal.as_mut() else { return };
            match a {
                Answer::Appended { token, user, key, payload, seq } => {
                    let (mut route, b) = self.split(conns);
                    let (local, forwarded) = route.deliver_seq(&user, &key, &payload, seq);
                    if let Some(j) = b.journal {
                        ready.extend(j.appended(token, local, forwarded));
                        if !local && !forwarded {
                            // Its user may be coming online somewhere now.
                            j.unrouted.put(&user, seq, key, payload, now);
                        }
                    }
                }
                Answer::NotAppended { token, user, why } => {
                    if j.refused < 10 || j.refused.is_multiple_of(1000) {
                        log::warn!(
                            "herald node {}: a message for {} was not kept: {why} ({} so far)",
                            self.cfg.node_id,
                            String::from_utf8_lossy(&user),
                            j.refused + 1
                        );
                    }
                    ready.extend(j.not_appended(token));
                }
                Answer::Read { token, head, msgs, .. } => {
                    let Some(user) = j.read_done(token) else { continue };
                    self.loaded(conns, &user, head, msgs, now);
                }
                Answer::ReadFailed { token, why, .. } => {
                    let Some(user) = j.read_done(token) else { continue };
                    log::warn!(
                        "herald node {}: cannot read the stream of {}: {why}",
                        self.cfg.node_id,
                        String::from_utf8_lossy(&user)
                    );
                    for p in j.parked.remove(&user).unwrap_or_default() {
                        if conns.get(p.id).is_some_and(|c| c.opened == p.opened) {
                            let msg = format!("cannot read the stream from the replicated log: {why}");
                            conns.fail(p.id, Code::LogUnavailable, &msg, now);
                        }
                    }
                }
                Answer::Health(ok) => {
                    j.healthy = ok;
                    self.duties.log_health(ok, now);
                    if ok {
                        log::info!(
                            "herald node {}: the replicated log takes appends again",
                            self.cfg.node_id
                        );
                    } else {
                        log::warn!(
                            "herald node {}: the replicated log cannot keep messages; confirming nothing",
                            self.cfg.node_id
                        );
                    }
                }
            }
        }
        self.results(conns, ready, now);
    }

    /// Durable mode: `user`'s stream as the log has it (up to `head`; `msgs`
    /// the messages after what was asked for). Applied in order; then the
    /// HELLOs that waited for it run.
    fn loaded(
        &mut self,
        conns: &mut Conns<Peer>,
        user: &[u8],
        head: u64,
        msgs: Vec<crate::durable::Entry>,
        now: Instant,
    ) {
        let Some(j) = self.journal.as_mut() else { return };
        let epoch = j.epoch(user);
        let parked = j.parked.remove(user).unwrap_or_default();
        if self.sessions.reg.find(user).is_none() {
            let start = msgs.first().map_or(head, |e| e.seq - 1);
            self.sessions.reg.insert_durable(user, epoch, start, now);
        }
        let kept = j.unrouted.take(user);
        {
            let mut route = self.route(conns);
            for e in &msgs {
                route.local_at(user, &e.key, &e.payload, e.seq, true);
            }
            // Appended here meanwhile, for a user not here yet: what the read
            // has already is dropped, what is beyond it reads the gap.
            for k in &kept {
                route.local_at(user, &k.key, &k.payload, k.seq, false);
            }
        }
        if let Some(u) = self.sessions.reg.find(user) {
            let rec = self.sessions.reg.user(u);
            if rec.is_some_and(|r| r.want > r.head || r.head < head) {
                self.sessions.gaps.push(user.into());
            }
        }
        for p in parked {
            let live = conns
                .get(p.id)
                .is_some_and(|c| c.opened == p.opened && matches!(c.state, Peer::ClientHandshake { .. }));
            if !live {
                continue;
            }
            if let Ok(crate::protocol::Decoded::Frame(Frame::Hello(h), _)) =
                crate::protocol::decode(&p.bytes, crate::protocol::Channel::ToNode)
            {
                let draining = self.draining();
                let Some(w) =
                    self.sessions.hello(conns, p.id, &h, &self.cfg, draining, self.unix, &mut self.m, now)
                else {
                    continue;
                };
                if w.first_session {
                    self.mesh.presence_out.push((PresenceOp::Online, w.user.clone().into_boxed_slice()));
                }
                if let Some(j) = &mut self.journal {
                    j.recheck(&w.user, now);
                }
            }
        }
    }

    /// Durable mode: a peer says users are online there; forwards it what
    /// this node appended for them that reached nobody (§13, *Resume*).
    fn forward_unrouted(&mut self, conns: &mut Conns<Peer>, id: ConnId, p: &f::Presence<'_>) {
        if conns.get(id).is_none_or(|c| c.is_closing()) {
            return; // kept for another peer, or for the recheck
        }
        let (mut route, b) = self.split(conns);
        let Some(j) = b.journal.filter(|j| !j.unrouted.is_empty()) else { return };
        for e in p.entries.iter().filter(|e| e.op == PresenceOp::Online) {
            for k in j.unrouted.take(e.user) {
                route.forward_seq(id, e.user, &k.key, &k.payload, k.seq);
            }
        }
    }

    /// Durable mode, at the end of a turn: the reads the sessions and the
    /// rechecks want, then everything for the log thread.
    fn send_to_log(&mut self, now: Instant) {
        let Some(j) = self.journal.as_mut() else { return };
        j.unrouted.expire(now);
        // A recheck may ask any replica (one that is behind is told apart
        // when it can be, §13): it comes seconds after the read it checks.
        for user in j.due(now) {
            if let Some(u) = self.sessions.reg.find(&user).and_then(|u| self.sessions.reg.user(u)) {
                j.read(&user, Some(u.head), true);
            }
        }
        for user in self.sessions.gaps.drain(..) {
            if let Some(u) = self.sessions.reg.find(&user).and_then(|u| self.sessions.reg.user(u)) {
                j.read(&user, Some(u.head), false);
            }
        }
        if j.out.is_empty() {
            return;
        }
        let Some(link) = &self.log else { return };
        for r in j.out.drain(..) {
            if !link.log.send(r) {
                log::error!("herald node {}: the log thread has gone", self.cfg.node_id);
                break;
            }
        }
    }

    /// Whether publishers must wait: a mesh link or another loop is behind.
    fn backlogged(&mut self, conns: &Conns<Peer>) -> bool {
        self.journal.as_ref().is_some_and(Journal::backlogged)
            || self.mesh.backlogged(conns, self.cfg.peer_backlog)
            || self.role.router().is_some_and(|r| r.backlogged(ROUTE_BACKLOG))
    }

    /// Loops 1..N: runs what loop 0 sent (hand-overs and message batches).
    fn inbox(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        loop {
            let Some(msg) = self.role.owner().and_then(|o| o.inbox.try_recv().ok()) else { return };
            match msg {
                Inbox::Adopt { sock, bytes, opened, user } => {
                    #[cfg(test)]
                    if self.cfg.fail_on_adopt == self.id {
                        panic!("test: loop {} fails on adopting a client", self.id);
                    }
                    // Its idle clock starts now: loop 0 has just read its
                    // HELLO, which is parsed in this turn.
                    let state = Peer::ClientHandshake { handed: Some(user) };
                    conns.adopt(sock, state, listener::CLIENT, opened, bytes, now);
                    // The event loop parses its HELLO next (it is listed for
                    // reading); the rest of the inbox waits for that, so a
                    // message right behind the hand-over finds the session.
                    self.inbox_held = true;
                    return;
                }
                Inbox::Msgs { buf, since } => {
                    self.turn.origin = Some(self.turn.origin.map_or(since, |t| t.min(since)));
                    let mut r = self.route(conns);
                    for (user, key, payload) in shard::messages(&buf) {
                        r.local(user, key, payload);
                    }
                    if let Some(o) = self.role.owner() {
                        o.done(buf);
                    }
                }
            }
        }
    }

    /// Loop 0: reports from the other loops and messages from helper threads.
    fn control(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        self.duties.check_loops(&self.shared, &self.stop, &self.cfg.node_id);
        let draining = self.draining();
        if let Some(r) = self.role.router() {
            while let Ok(events) = r.events.try_recv() {
                for ev in events {
                    if let Some(change) = r.homes.apply(ev, draining) {
                        self.mesh.presence_out.push(change);
                    }
                }
            }
        }
        while let Some(msg) = self.control.as_ref().and_then(|c| c.rx.try_recv().ok()) {
            match msg {
                Ctl::Nodes(list) => {
                    self.duties.follow_admin(&list, &self.shared, &self.cfg.node_id);
                    if self.cfg.cluster_secret.is_empty() || self.duties.stopping() {
                        continue;
                    }
                    let Some(ctl) = self.control.as_ref() else { continue };
                    for (peer, endpoint) in self.mesh.dials_due(conns, &list, &self.cfg.node_id, now) {
                        cluster::spawn_dial(peer, endpoint, ctl.tx.clone(), ctl.waker.clone());
                    }
                }
                Ctl::Dialed(peer, Ok(stream)) => self.mesh.dialed(conns, peer, stream, &self.cfg, now),
                Ctl::Dialed(peer, Err(e)) => {
                    log::warn!("herald node {}: cannot reach peer {peer}: {e}", self.cfg.node_id)
                }
                Ctl::Source(b) => self.intake.take(b),
            }
        }
    }

    fn http(&mut self, conns: &mut Conns<Peer>, id: ConnId, data: &[u8], now: Instant) -> Flow {
        let req = match http::input(conns, id, data) {
            Ok(r) => r,
            Err(flow) => return flow,
        };
        let (status, body) = match req {
            Request::Metrics => {
                self.m.source_msgs = self.intake.msgs;
                self.m.source_dups = self.intake.dups;
                self.m.dedup_ids = self.intake.dedup.len() as u64;
                if let Some(j) = &self.journal {
                    self.m.durable_appended = j.appended;
                    self.m.durable_refused = j.refused;
                    self.m.durable_healthy = j.healthy as u64;
                }
                let (m, q, users) = self.duties.node_stats(&self.m, conns, &self.sessions, &self.shared);
                ("200 OK", m.render(&self.cfg.node_id, q, users))
            }
            Request::Health => {
                let failed = self.shared.failed.load(Ordering::SeqCst);
                if failed != 0 {
                    ("503 Service Unavailable", format!("event loop {failed} failed\n"))
                } else if self.duties.stopping() {
                    ("503 Service Unavailable", "draining\n".to_owned())
                } else {
                    ("200 OK", "ok\n".to_owned())
                }
            }
            Request::Other => ("404 Not Found", "not found\n".to_owned()),
        };
        http::respond(conns, id, status, &body, now)
    }
}

impl Service for NodeLoop {
    type State = Peer;

    fn turn(&mut self, now: Instant) {
        self.turn = Turn::new(now);
        self.unix = cluster::unix_ms() / 1000;
    }

    fn accept(
        &mut self,
        _conns: &mut Conns<Peer>,
        l: usize,
        io: &mut Transport,
        _now: Instant,
    ) -> Result<Peer, CloseReason> {
        match l {
            listener::CLIENT => {
                self.m.accepts += 1;
                if self.shared.clients.load(Ordering::Relaxed) >= self.cfg.capacity {
                    self.m.rejects_full += 1;
                    let mut out = Vec::with_capacity(64);
                    let msg = "node is full; ask the decision server again";
                    Frame::Error(f::ErrorFrame { code: Code::ServerFull, message: msg.as_bytes() })
                        .encode(&mut out);
                    let _ = std::io::Write::write(io, &out);
                    return Err(CloseReason::Sent(Code::ServerFull));
                }
                self.shared.client_opened();
                Ok(Peer::ClientHandshake { handed: None })
            }
            listener::INGEST => Ok(Peer::IngestHandshake),
            l if self.cfg.http.is_some() && l == listener::api(self.cfg.metrics.is_some()) => {
                Ok(Peer::Api(Box::default()))
            }
            _ => Ok(Peer::Http),
        }
    }

    fn refused(&mut self, _l: usize, reason: CloseReason) {
        self.m.close(reason);
    }

    #[inline]
    fn frame(
        &mut self,
        conns: &mut Conns<Peer>,
        id: ConnId,
        frame: Frame<'_>,
        bytes: &[u8],
        len: usize,
        now: Instant,
    ) -> Flow {
        // The event loop has checked the type against the state (§2.4), so
        // the frame alone says which room it is for.
        match frame {
            Frame::Publish(p) => {
                let (mut route, b) = self.split(conns);
                publish::publish(&mut route, b.confirms, b.journal, id, &p);
                Flow::Continue
            }
            Frame::PublishBatch(pb) => {
                let (mut route, b) = self.split(conns);
                publish::batch(&mut route, b.confirms, b.journal, id, &pb);
                Flow::Continue
            }
            Frame::Forward(fw) if fw.flags & f::FORWARD_SEQ != 0 && self.journal.is_some() => {
                // Durable mode: appended by the log at fw.seq (§13).
                self.m.msgs_in += 1;
                if !self.route(conns).local_at(fw.user, fw.key, fw.payload, fw.seq, false) {
                    // The user has just left: it may come online elsewhere.
                    if let Some(j) = &mut self.journal {
                        j.unrouted.put(fw.user, fw.seq, fw.key.into(), fw.payload.to_vec(), now);
                    }
                }
                Flow::Continue
            }
            Frame::Forward(fw) if fw.id.is_empty() => {
                self.route(conns).deliver(fw.user, fw.key, fw.payload, false, None);
                Flow::Continue
            }
            Frame::Forward(fw) => {
                // A connector's message (§6.5): appended here at most once.
                let dup = self.intake.dedup.seen(fw.id, now);
                if dup {
                    self.intake.dups += 1;
                }
                let (local, _) =
                    self.route(conns).deliver_with(fw.user, fw.key, fw.payload, false, b"", dup, None);
                if local {
                    self.intake.dedup.insert(fw.id, now);
                }
                Flow::Continue
            }
            Frame::Ping(n) => {
                if let Some(out) = conns.queue(id) {
                    Frame::Pong(n).encode(out);
                }
                Flow::Continue
            }
            Frame::Pong(n) => {
                let mut ready = Vec::new();
                self.confirms.pong(id, n, &mut ready);
                self.results(conns, ready, now);
                Flow::Continue
            }
            Frame::Error(_) => {
                conns.peer_gone(id, CloseReason::PeerError);
                Flow::Stop
            }
            Frame::Goodbye(_) => {
                conns.peer_gone(id, CloseReason::PeerGoodbye);
                Flow::Stop
            }
            Frame::Hello(h) => self.hello(conns, id, &h, bytes, len, now),
            Frame::PubHello(h) => publish::hello(conns, id, &h, &self.cfg, self.unix, now),
            Frame::PeerHello(h) => self.mesh.peer_hello(conns, id, &h, &self.cfg, now),
            Frame::PeerWelcome(w) => {
                let draining = self.draining();
                let homes = self.role.router().map(|r| r.homes.online(draining)).into_iter().flatten();
                self.mesh.peer_welcome(
                    conns,
                    id,
                    &w,
                    &self.cfg,
                    self.sessions.reg.online(draining).chain(homes),
                    now,
                )
            }
            Frame::PeerAuth(a) => {
                let draining = self.draining();
                let homes = self.role.router().map(|r| r.homes.online(draining)).into_iter().flatten();
                self.mesh.peer_auth(
                    conns,
                    id,
                    &a,
                    &self.cfg,
                    self.sessions.reg.online(draining).chain(homes),
                    now,
                )
            }
            Frame::Presence(p) => {
                let flow = self.mesh.presence_frame(conns, id, &p, now);
                if matches!(flow, Flow::Continue) {
                    self.forward_unrouted(conns, id, &p);
                }
                flow
            }
            other => {
                let msg = format!("frame type 0x{:02x} is not allowed now", other.frame_type());
                conns.fail(id, Code::UnexpectedFrame, &msg, now);
                Flow::Stop
            }
        }
    }

    fn raw(&mut self, conns: &mut Conns<Peer>, id: ConnId, data: &[u8], now: Instant) -> Flow {
        if !conns.get(id).is_some_and(|c| matches!(c.state, Peer::Api(_))) {
            return self.http(conns, id, data, now);
        }
        self.with_api(conns, |route, cx| http_publish::input(route, cx, id, data, now))
    }

    #[inline]
    fn may_read(&mut self, conns: &Conns<Peer>, id: ConnId) -> bool {
        let publisher = conns.get(id).is_some_and(|c| matches!(c.state, Peer::Publisher { .. }));
        if publisher && self.backlogged(conns) {
            // Back-pressure: leave its bytes in the kernel until the mesh drains.
            if !self.parked.contains(&id) {
                self.parked.push(id);
            }
            return false;
        }
        true
    }

    fn closed(&mut self, conns: &mut Conns<Peer>, id: ConnId, reason: CloseReason, now: Instant) {
        self.m.close(reason);
        let Some(c) = conns.get_mut(id) else { return };
        match self.sessions.ended(&mut c.state, &mut c.out, id, &mut self.m, now) {
            Ended::Session { user, last } => {
                self.shared.client_closed();
                let draining = self.draining();
                match &mut self.role {
                    Role::Owner(o) => o.report(&user, Change::Detached, true),
                    // Presence follows the stream (§6.4): OFFLINE once the
                    // grace period forgets it (the sweep), or now if the
                    // node is draining (its clients resume elsewhere).
                    _ if last && draining => self.mesh.presence_out.push((PresenceOp::Offline, user)),
                    _ => {}
                }
            }
            Ended::Handshake(handed) => {
                self.shared.client_closed();
                // A handed-over client whose HELLO failed: loop 0 is owed a report.
                if let (Some(user), Role::Owner(o)) = (handed, &mut self.role) {
                    let known = self.sessions.reg.find(&user).is_some();
                    o.report(&user, Change::Refused, known);
                }
            }
            Ended::NotASession => {
                let link = c.state.link().is_some();
                if let Some(link) = c.state.link() {
                    self.mesh.closed(id, link);
                }
                self.parked.retain(|&k| k != id);
                if link {
                    let mut ready = Vec::new();
                    self.confirms.link_gone(id, &mut ready);
                    self.results(conns, ready, now);
                } else {
                    self.confirms.publisher_gone(id);
                    if let Some(j) = &mut self.journal {
                        j.requester_gone(id);
                    }
                }
            }
        }
    }

    fn woken(&mut self, conns: &mut Conns<Peer>, now: Instant) -> bool {
        if self.kill.load(Ordering::Relaxed) {
            return true;
        }
        if self.role.is_owner() {
            self.inbox(conns, now);
        } else {
            self.control(conns, now);
            self.log_answers(conns, now);
        }
        false
    }

    fn before_flush(&mut self, conns: &mut Conns<Peer>, now: Instant) {
        if std::mem::take(&mut self.inbox_held) {
            // The hand-overs' HELLOs have run: take the rest of the inbox.
            self.inbox(conns, now);
        }
        self.sources(conns, now);
        self.send_to_log(now);
        self.mesh.send_presence(conns);
        for (link, nonce) in self.confirms.pings(now) {
            if let Some(out) = conns.queue(link) {
                Frame::Ping(nonce).encode(out);
            }
        }
        if let Some(r) = self.role.router() {
            r.flush();
        }
    }

    fn after_flush(&mut self, conns: &mut Conns<Peer>, _now: Instant) {
        if let Some(o) = self.role.owner() {
            o.flush();
        }
        if !self.parked.is_empty() && !self.backlogged(conns) {
            for id in self.parked.drain(..) {
                conns.read_again(id);
            }
        }
        if self.turn.msgs > 0 {
            let us = self.turn.origin.unwrap_or(self.turn.start).elapsed().as_micros() as u64;
            self.m.record_latency(us, self.turn.msgs);
            self.turn.msgs = 0;
        }
    }

    fn timeout(&self, now: Instant) -> Duration {
        if self.inbox_held {
            return Duration::ZERO;
        }
        if self.intake.waiting() {
            // Connector batches wait for the mesh to catch up.
            return Duration::from_millis(1);
        }
        if !self.parked.is_empty() && matches!(self.role, Role::Router(_)) {
            // Publishers wait for another loop to catch up; it does not
            // wake us when it does, so look again soon.
            return Duration::from_millis(1);
        }
        let d = self.duties.timeout(now);
        // Durable mode: a session's recheck of the log may be due sooner.
        self.journal
            .as_ref()
            .and_then(Journal::next_due)
            .map_or(d, |t| d.min(t.saturating_duration_since(now)))
    }

    fn timers(&mut self, conns: &mut Conns<Peer>, now: Instant) -> Tick {
        if self.kill.load(Ordering::Relaxed) {
            return Tick::Exit;
        }
        self.declare_down(conns, now);
        let (duties, p) = self.duties();
        duties.tick(conns, now, p)
    }

    fn listening(&self, l: usize) -> bool {
        l == listener::METRICS || !self.duties.stopping()
    }
}
