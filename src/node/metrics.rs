//! Node counters and the internal-latency histogram, rendered as Prometheus
//! text for `GET /metrics` and as a one-line log summary.
//!
//! Each event loop owns its values outright, so counting is a plain add: no
//! atomics, no locks on the delivery path. With several loops, loops 1..N
//! publish a copy of their counters every 100 ms (the latency histogram
//! about once a second) and loop 0 merges them for `/metrics`, the log line
//! and heartbeats.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::net::conns::IoCounts;
use crate::net::{CloseCounts, CloseReason};

/// Labels of [`Metrics::welcomes`], indexed by the resume result's wire value.
pub const RESUME_RESULTS: [&str; 4] = ["fresh", "resumed", "gap", "restarted"];

/// The slow-consumer close.
const SLOW: CloseReason = CloseReason::Sent(crate::protocol::Code::SlowConsumer);

/// Everything the node counts.
pub struct Metrics {
    /// Client sessions established now.
    pub clients: u64,
    /// Connections open now, of every kind.
    pub connections: u64,
    /// Client connections accepted.
    pub accepts: u64,
    /// Connections refused at accept because the node is full.
    pub rejects_full: u64,
    /// Accept failures for lack of file descriptors (EMFILE/ENFILE).
    pub accept_emfile: u64,
    /// Closes by reason.
    pub closes: CloseCounts,
    /// Messages received from publishers and peers.
    pub msgs_in: u64,
    /// DELIVER frames queued to client sessions.
    pub msgs_out: u64,
    /// FORWARD frames queued to peers.
    pub forwarded: u64,
    /// Messages whose user had no session or stream here.
    pub no_route: u64,
    /// Messages dropped for a full client queue (drop policy).
    pub dropped: u64,
    /// Messages taken out of a backed-up session's queue by a later one
    /// with the same key (conflate policy).
    pub conflated: u64,
    /// Messages replayed on resume.
    pub replayed: u64,
    /// Sessions welcomed, by resume outcome (index into [`RESUME_RESULTS`]).
    pub welcomes: [u64; 4],
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Write syscalls.
    pub writes: u64,
    /// Client sessions' output queued and not yet written, bytes (what
    /// `--output-budget` bounds).
    pub output_pending: u64,
    /// Messages taken from connectors (`--source`; loop 0).
    pub source_msgs: u64,
    /// Connector messages and FORWARDs dropped as already appended here.
    pub source_dups: u64,
    /// Queue-message ids remembered for de-duplication (a gauge).
    pub dedup_ids: u64,
    /// Durable mode: messages the log acknowledged.
    pub durable_appended: u64,
    /// Durable mode: messages the log did not keep (or that were refused
    /// while it could not).
    pub durable_refused: u64,
    /// Durable mode: whether the log takes appends (a gauge, 1 or 0).
    pub durable_healthy: u64,
    /// Ingest-to-socket-write latency, microseconds.
    pub latency_us: Histogram<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            clients: 0,
            connections: 0,
            accepts: 0,
            rejects_full: 0,
            accept_emfile: 0,
            closes: CloseCounts::default(),
            msgs_in: 0,
            msgs_out: 0,
            forwarded: 0,
            no_route: 0,
            dropped: 0,
            conflated: 0,
            replayed: 0,
            welcomes: [0; 4],
            bytes_in: 0,
            bytes_out: 0,
            writes: 0,
            output_pending: 0,
            source_msgs: 0,
            source_dups: 0,
            dedup_ids: 0,
            durable_appended: 0,
            durable_refused: 0,
            durable_healthy: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        }
    }
}

/// Queue-depth figures over client sessions, computed on demand.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueDepth {
    /// Largest pending output of any client, bytes.
    pub max: u64,
    /// Median pending bytes.
    pub p50: u64,
    /// 99th percentile of pending bytes.
    pub p99: u64,
}

impl QueueDepth {
    /// Computes the figures from per-client pending byte counts.
    pub fn from_depths(mut d: Vec<u64>) -> QueueDepth {
        if d.is_empty() {
            return QueueDepth::default();
        }
        d.sort_unstable();
        let at = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
        QueueDepth { max: d[d.len() - 1], p50: at(0.5), p99: at(0.99) }
    }
}

impl Metrics {
    /// Adds another loop's counters to these (gauges add too: each loop
    /// counts its own connections).
    pub fn merge(&mut self, o: &Metrics) {
        self.clients += o.clients;
        self.connections += o.connections;
        self.accepts += o.accepts;
        self.rejects_full += o.rejects_full;
        self.accept_emfile += o.accept_emfile;
        self.closes.merge(&o.closes);
        self.msgs_in += o.msgs_in;
        self.msgs_out += o.msgs_out;
        self.forwarded += o.forwarded;
        self.no_route += o.no_route;
        self.dropped += o.dropped;
        self.conflated += o.conflated;
        self.replayed += o.replayed;
        for (a, b) in self.welcomes.iter_mut().zip(o.welcomes.iter()) {
            *a += b;
        }
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.writes += o.writes;
        self.output_pending += o.output_pending;
        self.source_msgs += o.source_msgs;
        self.source_dups += o.source_dups;
        self.dedup_ids += o.dedup_ids;
        self.durable_appended += o.durable_appended;
        self.durable_refused += o.durable_refused;
        self.durable_healthy += o.durable_healthy;
        let _ = self.latency_us.add(&o.latency_us);
    }

    /// Makes these counters a copy of `o`'s, leaving the histogram alone
    /// (cheap: a handful of integers).
    pub fn copy_counters(&mut self, o: &Metrics) {
        self.clients = o.clients;
        self.connections = o.connections;
        self.accepts = o.accepts;
        self.rejects_full = o.rejects_full;
        self.accept_emfile = o.accept_emfile;
        self.closes = o.closes;
        self.msgs_in = o.msgs_in;
        self.msgs_out = o.msgs_out;
        self.forwarded = o.forwarded;
        self.no_route = o.no_route;
        self.dropped = o.dropped;
        self.conflated = o.conflated;
        self.replayed = o.replayed;
        self.welcomes = o.welcomes;
        self.bytes_in = o.bytes_in;
        self.bytes_out = o.bytes_out;
        self.writes = o.writes;
        self.output_pending = o.output_pending;
        self.source_msgs = o.source_msgs;
        self.source_dups = o.source_dups;
        self.dedup_ids = o.dedup_ids;
        self.durable_appended = o.durable_appended;
        self.durable_refused = o.durable_refused;
        self.durable_healthy = o.durable_healthy;
    }

    /// Makes these figures a copy of `o`, reusing this histogram's memory.
    pub fn copy_from(&mut self, o: &Metrics) {
        self.copy_counters(o);
        self.latency_us.reset();
        let _ = self.latency_us.add(&o.latency_us);
    }

    /// Counts a welcomed session by its resume outcome.
    pub fn welcome(&mut self, r: crate::protocol::ResumeResult) {
        self.welcomes[r.to_u8() as usize] += 1;
    }

    /// Counts a close.
    pub fn close(&mut self, reason: CloseReason) {
        self.closes.add(reason);
    }

    /// Takes the connection count and I/O counters the event loop keeps.
    pub fn take_io(&mut self, connections: usize, io: &IoCounts) {
        self.connections = connections as u64;
        self.bytes_in = io.bytes_in;
        self.bytes_out = io.bytes_out;
        self.writes = io.writes;
        self.accept_emfile = io.accept_emfile;
        self.output_pending = io.pending as u64;
    }

    /// Records `n` messages that spent `us` microseconds from ingest to write.
    pub fn record_latency(&mut self, us: u64, n: u64) {
        let _ = self.latency_us.record_n(us.max(1), n);
    }

    /// Prometheus text exposition format.
    pub fn render(&self, node_id: &str, q: QueueDepth, users: usize) -> String {
        let mut s = String::with_capacity(4096);
        let mut g = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP herald_{name} {help}\n# TYPE herald_{name} {kind}\nherald_{name}{{node=\"{node_id}\"}} {v}");
        };
        g("clients", "gauge", "Client sessions established.", self.clients);
        g("connections", "gauge", "Open connections of every kind.", self.connections);
        g("users", "gauge", "Users known (online or within the resume grace period).", users as u64);
        g("accepts_total", "counter", "Client connections accepted.", self.accepts);
        g(
            "rejects_server_full_total",
            "counter",
            "Connections refused because the node is full.",
            self.rejects_full,
        );
        g(
            "accept_emfile_total",
            "counter",
            "Accepts failed for lack of file descriptors.",
            self.accept_emfile,
        );
        g("messages_in_total", "counter", "Messages received from publishers and peers.", self.msgs_in);
        g("messages_out_total", "counter", "DELIVER frames queued to client sessions.", self.msgs_out);
        g("messages_forwarded_total", "counter", "Messages forwarded to peer nodes.", self.forwarded);
        g(
            "messages_no_route_total",
            "counter",
            "Messages for users with no session anywhere.",
            self.no_route,
        );
        g("messages_dropped_total", "counter", "Messages dropped for a full client queue.", self.dropped);
        g(
            "messages_conflated_total",
            "counter",
            "Messages a later one with the same key took out of a backed-up session's queue.",
            self.conflated,
        );
        g("source_messages_total", "counter", "Messages taken from connectors (--source).", self.source_msgs);
        g(
            "source_duplicates_total",
            "counter",
            "Queue messages dropped as already delivered here (redeliveries).",
            self.source_dups,
        );
        g("dedup_ids", "gauge", "Queue-message ids remembered for de-duplication.", self.dedup_ids);
        g(
            "durable_appended_total",
            "counter",
            "Durable mode: messages the replicated log acknowledged.",
            self.durable_appended,
        );
        g(
            "durable_refused_total",
            "counter",
            "Durable mode: messages not kept because the log could not take them (none was confirmed).",
            self.durable_refused,
        );
        g(
            "durable_log_healthy",
            "gauge",
            "Durable mode: 1 while the replicated log takes appends, else 0.",
            self.durable_healthy,
        );
        g("messages_replayed_total", "counter", "Messages replayed on resume.", self.replayed);
        g("bytes_in_total", "counter", "Bytes read from sockets.", self.bytes_in);
        g("bytes_out_total", "counter", "Bytes written to sockets.", self.bytes_out);
        g("writes_total", "counter", "Write syscalls.", self.writes);
        g(
            "slow_consumer_disconnects_total",
            "counter",
            "Clients closed for a full queue.",
            self.closes.get(SLOW),
        );
        g(
            "output_pending_bytes",
            "gauge",
            "Client output queued and not yet written, node-wide (bounded by --output-budget).",
            self.output_pending,
        );
        g("queue_depth_max_bytes", "gauge", "Largest pending output of one client.", q.max);
        g("queue_depth_p50_bytes", "gauge", "Median pending output per client.", q.p50);
        g("queue_depth_p99_bytes", "gauge", "99th percentile pending output per client.", q.p99);
        let _ = writeln!(
            s,
            "# HELP herald_closes_total Connections closed, by reason.\n# TYPE herald_closes_total counter"
        );
        for (r, n) in self.closes.labelled() {
            let _ = writeln!(s, "herald_closes_total{{node=\"{node_id}\",reason=\"{r}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP herald_welcomes_total Sessions welcomed, by resume outcome (gap: a resume within the \
             grace period found messages no longer retained; raise --retain-total).\n\
             # TYPE herald_welcomes_total counter"
        );
        for (i, r) in RESUME_RESULTS.iter().enumerate() {
            let _ = writeln!(
                s,
                "herald_welcomes_total{{node=\"{node_id}\",resume=\"{r}\"}} {}",
                self.welcomes[i]
            );
        }
        let h = &self.latency_us;
        let _ = writeln!(
            s,
            "# HELP herald_internal_latency_us Ingest to socket write, microseconds.\n# TYPE herald_internal_latency_us summary"
        );
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            let _ = writeln!(
                s,
                "herald_internal_latency_us{{node=\"{node_id}\",quantile=\"{q}\"}} {}",
                h.value_at_quantile(q)
            );
        }
        let _ = writeln!(s, "herald_internal_latency_us_count{{node=\"{node_id}\"}} {}", h.len());
        s
    }

    /// One line for the periodic log.
    pub fn summary(&self, q: QueueDepth) -> String {
        let h = &self.latency_us;
        format!(
            "clients={} in={} out={} no_route={} dropped={} slow={} q_max={}B lat_us p50={} p99={} p999={} max={}",
            self.clients,
            self.msgs_in,
            self.msgs_out,
            self.no_route,
            self.dropped,
            self.closes.get(SLOW),
            q.max,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Code;

    const IDLE: CloseReason = CloseReason::Sent(Code::IdleTimeout);

    #[test]
    fn renders_counters_and_quantiles() {
        let mut m = Metrics { msgs_in: 5, ..Default::default() };
        m.close(SLOW);
        m.record_latency(40, 10);
        let q = QueueDepth::from_depths(vec![0, 10, 300]);
        assert_eq!(q.max, 300);
        let t = m.render("n1", q, 3);
        assert!(t.contains("herald_messages_in_total{node=\"n1\"} 5"));
        assert!(t.contains("herald_slow_consumer_disconnects_total{node=\"n1\"} 1"));
        assert!(t.contains("herald_closes_total{node=\"n1\",reason=\"slow_consumer\"} 1"));
        assert!(t.contains("herald_internal_latency_us_count{node=\"n1\"} 10"));
        assert!(t.contains("herald_queue_depth_max_bytes{node=\"n1\"} 300"));
    }

    #[test]
    fn merge_and_copy_add_up_loops() {
        let mut a = Metrics { msgs_out: 2, clients: 1, ..Default::default() };
        a.record_latency(10, 3);
        let mut b = Metrics { msgs_out: 5, clients: 2, ..Default::default() };
        b.record_latency(1000, 1);
        b.close(IDLE);
        let mut snap = Metrics { msgs_out: 99, ..Default::default() };
        snap.copy_from(&b);
        assert_eq!((snap.msgs_out, snap.clients, snap.closes.get(IDLE), snap.latency_us.len()), (5, 2, 1, 1));
        a.merge(&snap);
        assert_eq!((a.msgs_out, a.clients, a.closes.get(IDLE), a.latency_us.len()), (7, 3, 1, 4));
        assert!(a.latency_us.max() >= 1000);
    }
}
