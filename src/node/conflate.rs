//! Conflation by key for one backed-up session (protocol.md §5.7, §3.8):
//! a later message with the same non-empty key takes the earlier one, still
//! unwritten, out of the session's queue, and the session is sent CONFLATED
//! where it was.
//!
//! The queue is the connection's own output buffer ([`Outbox`]): frames
//! back to back. A [`Conflation`] exists only while the session is backed
//! up, and holds, per key, where in that buffer its latest DELIVER starts.
//! Queuing a keyed message is then one hash lookup: the earlier frame of
//! the key is marked dead in place (its type byte becomes [`DEAD`], which
//! no frame has on the wire), and the new one goes to the end. Writes stop
//! at the first dead frame ([`Conflation::write_limit`]); when the head of
//! the queue gets there, or when dead bytes reach half of the queue, the
//! tail from the first dead frame on is rewritten once ([`compact`]): dead
//! frames out, one CONFLATED per run of consecutive seqs in their place.
//! So each byte queued is rewritten a bounded number of times, and nothing
//! dead is ever written to the socket.
//!
//! Sans-IO: it works on the buffer alone; the session module decides when
//! a session conflates and counts what it took out.

use std::collections::HashMap;

use byteorder::{BigEndian, ByteOrder};

use crate::net::outbox::Outbox;
use crate::protocol::frame::{ty, HEADER_LEN, MAX_CONFLATED_KEYS};

use super::fxhash::FxBuild;

/// The type byte of a frame taken out of the queue. 0x00 is no frame type
/// (protocol.md §2.3), so a dead frame can never pass for a real one; it is
/// never written.
pub const DEAD: u8 = 0x00;

/// No frame.
const NONE: u64 = u64::MAX;

/// Dead bytes under which a queue is not rewritten just to save memory.
const COMPACT_MIN: usize = 16 * 1024;

/// Distinct keys kept before forgetting those whose frames are written.
const PRUNE_MIN: usize = 1024;

/// Where a key's latest frame is.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Stream offset ([`Outbox::base`]) of its DELIVER, [`NONE`] if none.
    at: u64,
    /// The CONFLATED run that last listed the key (during a rewrite).
    run: u32,
}

/// One backed-up session's conflation state.
#[derive(Debug)]
pub struct Conflation {
    /// The session's stream epoch (for CONFLATED).
    epoch: u64,
    /// Key → its latest frame in the queue.
    slots: HashMap<Box<[u8]>, Slot, FxBuild>,
    /// Bytes of dead frames still in the buffer.
    dead: usize,
    /// Stream offset of the earliest dead frame, [`NONE`] if none.
    first_dead: u64,
    /// The keys of the dead frames, each as `str8`; a dead frame holds the
    /// offset of its key here.
    keys: Vec<u8>,
    /// The rewritten tail, built here and copied back (kept for reuse).
    spare: Vec<u8>,
    /// Scratch for a rewrite: (old, new) stream offsets of live frames.
    moved: Vec<(u64, u64)>,
    /// Runs started so far (distinct keys per CONFLATED).
    runs: u32,
    /// Slot count at which written keys are forgotten.
    prune_at: usize,
}

impl Conflation {
    /// A session of stream `epoch` that just backed up.
    pub fn new(epoch: u64) -> Conflation {
        Conflation {
            epoch,
            slots: HashMap::default(),
            dead: 0,
            first_dead: NONE,
            keys: Vec::new(),
            spare: Vec::new(),
            moved: Vec::new(),
            runs: 0,
            prune_at: PRUNE_MIN,
        }
    }

    /// Bytes in the queue that are dead (the queue bound does not count
    /// them).
    #[inline]
    pub fn dead(&self) -> usize {
        self.dead
    }

    /// Queues `frame`, a whole DELIVER of a message with non-empty `key`, and
    /// takes the earlier unwritten DELIVER of the same key out of the queue.
    /// Returns whether one was taken out.
    pub fn push(&mut self, out: &mut Outbox, key: &[u8], frame: &[u8]) -> bool {
        let base = out.base();
        let head = base + out.written() as u64;
        let at = base + out.buf.len() as u64;
        let old = match self.slots.get_mut(key) {
            Some(s) => std::mem::replace(&mut s.at, at),
            None => {
                if self.slots.len() >= self.prune_at {
                    self.prune(head);
                }
                self.slots.insert(key.into(), Slot { at, run: 0 });
                NONE
            }
        };
        out.buf.extend_from_slice(frame);
        // A frame the socket has begun to take is never touched.
        let taken = old != NONE && old >= head && self.kill(out, old, key);
        if taken && self.dead >= COMPACT_MIN && self.dead * 2 >= out.pending() - self.dead {
            compact(self, out);
        }
        taken
    }

    /// Marks the frame at stream offset `at` dead, remembering `key`.
    /// Refuses (false) anything but a whole DELIVER there: a slot that lost
    /// track of its frame must never cut into another one.
    fn kill(&mut self, out: &mut Outbox, at: u64, key: &[u8]) -> bool {
        let i = (at - out.base()) as usize;
        let Some(f) = out.buf.get_mut(i..).filter(|f| f.len() > HEADER_LEN + 16 && f[4] == ty::DELIVER)
        else {
            debug_assert!(false, "only a DELIVER is conflated");
            return false;
        };
        let len = HEADER_LEN + BigEndian::read_u32(&f[..4]) as usize - 1;
        f[4] = DEAD;
        // The epoch field (every session frame has the session's epoch)
        // holds where the key is kept; the seq stays.
        BigEndian::write_u32(&mut f[5..9], self.keys.len() as u32);
        self.keys.push(key.len() as u8);
        self.keys.extend_from_slice(key);
        self.dead += len;
        self.first_dead = self.first_dead.min(at);
        true
    }

    /// Forgets the keys whose latest frame is already written (or begun):
    /// they can take nothing out any more. Keeps the map from growing with
    /// keys while a session stays backed up for long.
    fn prune(&mut self, head: u64) {
        self.slots.retain(|_, s| s.at != NONE && s.at >= head);
        self.prune_at = (self.slots.len() * 2).max(PRUNE_MIN);
    }

    /// Where the next write must stop: at the first dead frame. If the
    /// write has got there, the tail is rewritten first and the write may
    /// take everything.
    pub fn write_limit(&mut self, out: &mut Outbox) -> Option<usize> {
        if self.dead == 0 {
            return None;
        }
        let head = out.base() + out.written() as u64;
        if self.first_dead <= head {
            compact(self, out);
            return None;
        }
        Some((self.first_dead - out.base()) as usize)
    }

    /// Takes every dead frame out of the queue (before the session's state
    /// is dropped, so that nothing dead is ever written).
    pub fn settle(&mut self, out: &mut Outbox) {
        if self.dead > 0 {
            compact(self, out);
        }
    }
}

/// A CONFLATED frame being written into the rewritten tail.
struct Run {
    /// Where it starts in the tail.
    at: usize,
    /// Its last seq so far.
    last: u64,
    /// Keys listed so far.
    count: usize,
}

/// Rewrites the queue from its first dead frame on: live frames move up,
/// each run of dead frames with consecutive seqs becomes one CONFLATED
/// (protocol.md §3.8), and the keys' slots follow their frames.
fn compact(cf: &mut Conflation, out: &mut Outbox) {
    let base = out.base();
    let from = (cf.first_dead - base) as usize;
    cf.moved.clear();
    cf.moved.extend(cf.slots.values().filter(|s| s.at != NONE && s.at >= cf.first_dead).map(|s| (s.at, 0)));
    cf.moved.sort_unstable();
    let Conflation { epoch, slots, keys, spare, moved, runs, .. } = cf;
    spare.clear();
    let buf = &out.buf;
    let mut i = from;
    let mut next_moved = 0;
    let mut run: Option<Run> = None;
    while i < buf.len() {
        let len = HEADER_LEN + BigEndian::read_u32(&buf[i..i + 4]) as usize - 1;
        let f = &buf[i..i + len];
        if f[4] == DEAD {
            let seq = BigEndian::read_u64(&f[13..21]);
            let k = BigEndian::read_u32(&f[5..9]) as usize;
            let key = &keys[k + 1..k + 1 + keys[k] as usize];
            let slot = slots.get_mut(key).expect("a dead frame's key has a live frame after it");
            let fresh = match &run {
                Some(r) => {
                    r.last.wrapping_add(1) != seq || (slot.run != *runs && r.count == MAX_CONFLATED_KEYS)
                }
                None => true,
            };
            if fresh {
                if let Some(r) = run.take() {
                    finish(spare, r);
                }
                *runs = runs.wrapping_add(1);
                let at = spare.len();
                spare.extend_from_slice(&[0; HEADER_LEN]);
                spare[at + 4] = ty::CONFLATED;
                spare.extend_from_slice(&epoch.to_be_bytes());
                spare.extend_from_slice(&seq.to_be_bytes());
                spare.extend_from_slice(&[0; 9]); // last_seq and the key count, set in finish
                run = Some(Run { at, last: seq, count: 0 });
            }
            let r = run.as_mut().expect("a run is open");
            r.last = seq;
            if slot.run != *runs {
                slot.run = *runs;
                r.count += 1;
                spare.push(key.len() as u8);
                spare.extend_from_slice(key);
            }
        } else {
            if let Some(r) = run.take() {
                finish(spare, r);
            }
            let old = base + i as u64;
            if moved.get(next_moved).is_some_and(|m| m.0 == old) {
                moved[next_moved].1 = base + (from + spare.len()) as u64;
                next_moved += 1;
            }
            spare.extend_from_slice(f);
        }
        i += len;
    }
    if let Some(r) = run.take() {
        finish(spare, r);
    }
    out.buf.truncate(from);
    out.buf.extend_from_slice(spare);
    for s in slots.values_mut() {
        if s.at != NONE && s.at >= cf.first_dead {
            if let Ok(j) = moved.binary_search_by_key(&s.at, |m| m.0) {
                s.at = moved[j].1;
            }
        }
    }
    keys.clear();
    cf.dead = 0;
    cf.first_dead = NONE;
    if spare.capacity() > 4 * out.buf.capacity().max(COMPACT_MIN) {
        *spare = Vec::new();
    }
}

/// Closes a CONFLATED: its length, last seq and key count.
fn finish(spare: &mut [u8], r: Run) {
    let len = spare.len() - r.at - HEADER_LEN + 1;
    BigEndian::write_u32(&mut spare[r.at..r.at + 4], len as u32);
    let body = r.at + HEADER_LEN;
    BigEndian::write_u64(&mut spare[body + 16..body + 24], r.last);
    spare[body + 24] = r.count as u8;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{decode, encode_deliver, Channel, Decoded, Frame};
    use std::collections::BTreeMap;

    fn deliver(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_deliver(&mut v, 7, seq, payload);
        v
    }

    /// What a client would read from the queue's unwritten part.
    fn read(out: &Outbox) -> Vec<String> {
        let mut b = &out.buf[out.written()..];
        let mut v = Vec::new();
        while !b.is_empty() {
            match decode(b, Channel::ToClient) {
                Ok(Decoded::Frame(f, n)) => {
                    v.push(match f {
                        Frame::Deliver(d) => format!("D{}:{}", d.seq, String::from_utf8_lossy(d.payload)),
                        Frame::Conflated(c) => {
                            assert_eq!(c.epoch, 7);
                            let keys: Vec<String> =
                                c.keys.iter().map(|k| String::from_utf8_lossy(k.0).into_owned()).collect();
                            format!("C{}-{}:{}", c.first_seq, c.last_seq, keys.join(","))
                        }
                        other => format!("{other:?}"),
                    });
                    b = &b[n..];
                }
                other => panic!("the queue holds a bad frame: {other:?}"),
            }
        }
        v
    }

    #[test]
    fn a_later_key_takes_the_earlier_one_out_and_goes_to_the_end() {
        let mut out = Outbox::default();
        let mut cf = Conflation::new(7);
        let first = deliver(1, b"fill0");
        out.buf.extend_from_slice(&first); // queued before the session backed up
        assert!(!cf.push(&mut out, b"EURUSD", &deliver(2, b"q1")));
        out.buf.extend_from_slice(&deliver(3, b"fill")); // unkeyed: queued as is
        assert!(!cf.push(&mut out, b"GBPUSD", &deliver(4, b"g1")));
        assert!(cf.push(&mut out, b"EURUSD", &deliver(5, b"q2")));
        assert!(cf.push(&mut out, b"GBPUSD", &deliver(6, b"g2")));
        assert!(cf.dead() > 0);
        // Nothing is written past the first dead frame; once the head is
        // there, the tail is rewritten and everything may go.
        assert_eq!(cf.write_limit(&mut out), Some(first.len()));
        cf.settle(&mut out);
        assert_eq!(cf.dead(), 0);
        assert_eq!(cf.write_limit(&mut out), None);
        assert_eq!(read(&out), ["D1:fill0", "C2-2:EURUSD", "D3:fill", "C4-4:GBPUSD", "D5:q2", "D6:g2"]);
        // The slots followed their frames: the next quote takes q2 out.
        assert!(cf.push(&mut out, b"EURUSD", &deliver(7, b"q3")));
        cf.settle(&mut out);
        assert_eq!(
            read(&out),
            ["D1:fill0", "C2-2:EURUSD", "D3:fill", "C4-4:GBPUSD", "C5-5:EURUSD", "D6:g2", "D7:q3"]
        );
    }

    #[test]
    fn consecutive_dead_frames_make_one_conflated_with_each_key_once() {
        let mut out = Outbox::default();
        let mut cf = Conflation::new(7);
        for (seq, key) in [(1, "a"), (2, "b"), (3, "a"), (4, "c")] {
            cf.push(&mut out, key.as_bytes(), &deliver(seq, key.as_bytes()));
        }
        for (seq, key) in [(5, "a"), (6, "b"), (7, "c")] {
            cf.push(&mut out, key.as_bytes(), &deliver(seq, key.as_bytes()));
        }
        cf.settle(&mut out);
        assert_eq!(read(&out), ["C1-4:a,b,c", "D5:a", "D6:b", "D7:c"]);
    }

    #[test]
    fn many_keys_split_into_several_conflated_frames() {
        let mut out = Outbox::default();
        let mut cf = Conflation::new(7);
        let n = MAX_CONFLATED_KEYS as u64 + 10;
        for s in 0..n {
            cf.push(&mut out, format!("k{s}").as_bytes(), &deliver(s + 1, b"x"));
        }
        for s in 0..n {
            cf.push(&mut out, format!("k{s}").as_bytes(), &deliver(n + s + 1, b"y"));
        }
        cf.settle(&mut out);
        let got = read(&out);
        assert_eq!(
            got[0],
            format!(
                "C1-{}:{}",
                MAX_CONFLATED_KEYS,
                (0..255).map(|s| format!("k{s}")).collect::<Vec<_>>().join(",")
            )
        );
        assert!(got[1].starts_with(&format!("C{}-{}:", MAX_CONFLATED_KEYS + 1, n)), "{}", got[1]);
        assert_eq!(got.len(), 2 + n as usize);
    }

    /// A socket that takes at most `room` bytes per write and keeps them.
    struct Sock {
        got: Vec<u8>,
        room: usize,
    }
    impl std::io::Write for Sock {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.room);
            self.got.extend_from_slice(&b[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl mio::event::Source for Sock {
        fn register(&mut self, _: &mio::Registry, _: mio::Token, _: mio::Interest) -> std::io::Result<()> {
            Ok(())
        }
        fn reregister(&mut self, _: &mio::Registry, _: mio::Token, _: mio::Interest) -> std::io::Result<()> {
            Ok(())
        }
        fn deregister(&mut self, _: &mio::Registry) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl crate::net::outbox::Sink for Sock {}

    /// One flush as the connection layer makes it: a write up to the limit,
    /// and a second one if the first got there.
    fn flush(cf: &mut Conflation, out: &mut Outbox, sock: &mut Sock, reg: &mio::Registry) {
        let limit = cf.write_limit(out);
        let f = out.flush(sock, reg, mio::Token(1), false, limit).unwrap();
        if f.held {
            let limit = cf.write_limit(out);
            out.flush(sock, reg, mio::Token(1), false, limit).unwrap();
        }
    }

    /// Random traffic (keyed and unkeyed), random socket room, random
    /// frame sizes: what the client reads is always valid frames, seqs only
    /// increase and every one is accounted for once (delivered, or inside
    /// a CONFLATED naming its key), every unkeyed message arrives, and so
    /// does the last message of every key.
    #[test]
    fn random_traffic_reads_back_exactly() {
        let poll = mio::Poll::new().unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut taken = 0;
        for round in 0..200 {
            let mut out = Outbox::default();
            let mut cf = Conflation::new(7);
            let mut sock = Sock { got: Vec::new(), room: 0 };
            let mut keys_of = vec![None]; // seq → key (index 0 unused)
            let mut last_of = BTreeMap::new();
            let ops = 50 + next() % 400;
            for _ in 0..ops {
                match next() % 10 {
                    0..=5 => {
                        let seq = keys_of.len() as u64;
                        let key = format!("k{}", next() % (1 + round % 7));
                        let payload = vec![b'p'; (next() % if round % 2 == 0 { 90 } else { 400 }) as usize];
                        let f = deliver(seq, &payload);
                        taken += cf.push(&mut out, key.as_bytes(), &f) as u64;
                        last_of.insert(key.clone(), seq);
                        keys_of.push(Some(key));
                    }
                    6 => {
                        let seq = keys_of.len() as u64;
                        out.buf.extend_from_slice(&deliver(seq, b"fill"));
                        keys_of.push(None);
                    }
                    _ => {
                        // Every third round the socket takes nothing until the end:
                        // only the memory bound rewrites the queue.
                        sock.room = if round % 3 == 0 { 0 } else { (next() % 300) as usize };
                        flush(&mut cf, &mut out, &mut sock, poll.registry());
                    }
                }
            }
            sock.room = usize::MAX;
            flush(&mut cf, &mut out, &mut sock, poll.registry());
            assert_eq!(out.pending(), 0, "round {round}: everything written");
            // Read it back as a client would.
            let (mut b, mut want, mut delivered) = (&sock.got[..], 1u64, Vec::new());
            while !b.is_empty() {
                let (fr, n) = match decode(b, Channel::ToClient) {
                    Ok(Decoded::Frame(fr, n)) => (fr, n),
                    other => panic!("round {round}: bad bytes on the wire: {other:?}"),
                };
                match fr {
                    Frame::Deliver(d) => {
                        assert_eq!(d.seq, want, "round {round}");
                        delivered.push(d.seq);
                        want += 1;
                    }
                    Frame::Conflated(c) => {
                        assert_eq!(c.first_seq, want, "round {round}");
                        let named: Vec<&[u8]> = c.keys.iter().map(|k| k.0).collect();
                        for s in c.first_seq..=c.last_seq {
                            let k =
                                keys_of[s as usize].as_deref().expect("only keyed messages are conflated");
                            assert!(named.contains(&k.as_bytes()), "round {round}: seq {s}'s key is named");
                            assert!(last_of[k] > s, "round {round}: the last of a key is never conflated");
                        }
                        want = c.last_seq + 1;
                    }
                    other => panic!("{other:?}"),
                }
                b = &b[n..];
            }
            assert_eq!(want, keys_of.len() as u64, "round {round}: every seq accounted for");
            for (s, k) in keys_of.iter().enumerate().skip(1) {
                if k.is_none() {
                    assert!(delivered.contains(&(s as u64)), "round {round}: unkeyed {s} delivered");
                }
            }
            for &s in last_of.values() {
                assert!(delivered.contains(&s), "round {round}: the last of each key is delivered");
            }
        }
        assert!(taken > 1000, "the traffic conflates: {taken}");
    }
}
