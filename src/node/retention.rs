//! Bounded retention of recent messages, so a client that reconnects can
//! resume exactly where it left off (protocol.md §3.2).
//!
//! All retained messages live in one byte ring of fixed size (the total
//! bound); each user keeps a small index of where its messages are (bounded by
//! count and bytes). Appending a message copies its encoded DELIVER frame into
//! the ring: no allocation per message. Old messages are overwritten when the
//! ring wraps; an index entry whose bytes were overwritten is treated as gone,
//! and the client sees a GAP rather than wrong bytes.
//!
//! No sockets, no clock.

use std::collections::VecDeque;

/// One fixed-size byte ring shared by every user's log.
pub struct Ring {
    buf: Box<[u8]>,
    /// Total bytes ever written; the next write starts at `written % cap`.
    written: u64,
}

impl Ring {
    /// A ring holding `cap` bytes. The memory is zeroed lazily by the OS, so
    /// an idle node does not pay for it in RSS.
    pub fn new(cap: usize) -> Ring {
        Ring { buf: vec![0u8; cap.max(1)].into_boxed_slice(), written: 0 }
    }

    /// Appends `bytes`; returns its absolute position, or `None` if it can
    /// never fit.
    pub fn push(&mut self, bytes: &[u8]) -> Option<u64> {
        let cap = self.buf.len();
        if bytes.len() > cap {
            return None;
        }
        let pos = self.written;
        let start = (pos % cap as u64) as usize;
        let first = bytes.len().min(cap - start);
        self.buf[start..start + first].copy_from_slice(&bytes[..first]);
        self.buf[..bytes.len() - first].copy_from_slice(&bytes[first..]);
        self.written += bytes.len() as u64;
        Some(pos)
    }

    /// Whether the bytes at `pos` are still intact.
    pub fn is_live(&self, pos: u64) -> bool {
        pos >= self.written.saturating_sub(self.buf.len() as u64)
    }

    /// Appends the `len` bytes at `pos` to `out`; false if overwritten.
    pub fn copy_out(&self, pos: u64, len: usize, out: &mut Vec<u8>) -> bool {
        if !self.is_live(pos) || pos + len as u64 > self.written {
            return false;
        }
        let cap = self.buf.len();
        let start = (pos % cap as u64) as usize;
        let first = len.min(cap - start);
        out.extend_from_slice(&self.buf[start..start + first]);
        out.extend_from_slice(&self.buf[..len - first]);
        true
    }
}

/// Per-user bounds.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Most messages kept per user.
    pub max_count: usize,
    /// Most bytes (encoded frames) kept per user.
    pub max_bytes: usize,
}

/// One user's retained messages: the index into the ring for seqs
/// `first_seq .. first_seq + entries.len()`.
#[derive(Default)]
pub struct UserLog {
    first_seq: u64,
    entries: VecDeque<(u64, u32)>,
    bytes: usize,
}

impl UserLog {
    /// Records that message `seq` (which must follow the previous one) was
    /// stored at `pos` with `len` bytes, then trims to the limits.
    pub fn append(&mut self, seq: u64, pos: u64, len: usize, lim: LogLimits) {
        if self.entries.is_empty() || self.first_seq + self.entries.len() as u64 != seq {
            self.entries.clear();
            self.bytes = 0;
            self.first_seq = seq;
        }
        self.entries.push_back((pos, len as u32));
        self.bytes += len;
        while self.entries.len() > lim.max_count || (self.bytes > lim.max_bytes && self.entries.len() > 1) {
            self.pop_front();
        }
    }

    /// Forgets a message whose bytes could not be stored: later resumes see a gap.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) {
        if let Some((_, l)) = self.entries.pop_front() {
            self.bytes -= l as usize;
            self.first_seq += 1;
        }
    }

    /// Drops entries the ring has overwritten; returns the first seq still
    /// retained, or `None` if nothing is.
    pub fn first_live(&mut self, ring: &Ring) -> Option<u64> {
        while let Some(&(pos, _)) = self.entries.front() {
            if ring.is_live(pos) {
                return Some(self.first_seq);
            }
            self.pop_front();
        }
        None
    }

    /// Appends the frames for seqs `from..` to `out`, stopping at the first
    /// one the ring has lost. Returns how many were appended.
    pub fn replay(&self, ring: &Ring, from: u64, out: &mut Vec<u8>) -> usize {
        if from < self.first_seq {
            return 0;
        }
        let skip = (from - self.first_seq) as usize;
        let mut n = 0;
        for &(pos, len) in self.entries.iter().skip(skip) {
            if !ring.copy_out(pos, len as usize, out) {
                break;
            }
            n += 1;
        }
        n
    }

    /// Messages indexed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is retained.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes indexed.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: LogLimits = LogLimits { max_count: 4, max_bytes: 1000 };

    #[test]
    fn ring_wraps_and_detects_overwrites() {
        let mut r = Ring::new(10);
        let a = r.push(b"abcdef").unwrap();
        let b = r.push(b"ghij").unwrap();
        let mut out = Vec::new();
        assert!(r.copy_out(a, 6, &mut out));
        assert_eq!(out, b"abcdef");
        let c = r.push(b"klm").unwrap(); // wraps, overwrites "abc"
        assert!(!r.is_live(a));
        assert!(r.is_live(b));
        out.clear();
        assert!(r.copy_out(c, 3, &mut out));
        assert_eq!(out, b"klm");
        out.clear();
        assert!(!r.copy_out(a, 6, &mut out));
        assert!(r.push(&[0u8; 11]).is_none());
    }

    #[test]
    fn log_replays_in_order_and_respects_count() {
        let mut ring = Ring::new(1 << 16);
        let mut log = UserLog::default();
        for seq in 1..=6u64 {
            let msg = format!("m{seq}");
            let pos = ring.push(msg.as_bytes()).unwrap();
            log.append(seq, pos, msg.len(), LIM);
        }
        assert_eq!(log.len(), 4);
        assert_eq!(log.first_live(&ring), Some(3));
        let mut out = Vec::new();
        assert_eq!(log.replay(&ring, 4, &mut out), 3);
        assert_eq!(out, b"m4m5m6");
        out.clear();
        assert_eq!(log.replay(&ring, 2, &mut out), 0, "seq 2 is gone");
    }

    #[test]
    fn log_respects_bytes_and_ring_loss() {
        let mut ring = Ring::new(64);
        let mut log = UserLog::default();
        let lim = LogLimits { max_count: 100, max_bytes: 30 };
        for seq in 1..=5u64 {
            let pos = ring.push(&[seq as u8; 10]).unwrap();
            log.append(seq, pos, 10, lim);
        }
        assert_eq!(log.bytes(), 30);
        assert_eq!(log.first_live(&ring), Some(3));
        // Other users fill the ring: this log's entries are overwritten.
        for _ in 0..7 {
            ring.push(&[0xee; 10]).unwrap();
        }
        assert_eq!(log.first_live(&ring), None);
        assert!(log.is_empty());
    }
}
