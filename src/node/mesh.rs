//! What this node knows about the other nodes: which users are online where
//! (presence, protocol.md §6.4), so a publish can be forwarded in one hop to
//! exactly the nodes that need it, plus the frames that carry presence.
//!
//! Peers are identified by the connection key of their mesh link. No sockets
//! and no clock here.

use std::collections::{HashMap, HashSet};

use super::fxhash::UserKey;
use crate::protocol::frame::{encode_entries, Frame, List, Presence as PresenceFrame, PresenceEntry};
use crate::protocol::PresenceOp;

/// A PRESENCE frame is cut at about this many bytes of entries.
const CHUNK: usize = 60 * 1024;

/// Users online at each peer, and the reverse index used on every publish.
#[derive(Default)]
pub struct Presence {
    by_user: HashMap<UserKey, Vec<usize>, super::fxhash::FxBuild>,
    by_peer: HashMap<usize, HashSet<UserKey, super::fxhash::FxBuild>>,
}

impl Presence {
    /// The peers where `user` has a session.
    pub fn peers_of(&self, user: &[u8]) -> &[usize] {
        if self.by_user.is_empty() {
            return &[];
        }
        self.by_user.get(user).map_or(&[], |v| v.as_slice())
    }

    /// Applies one PRESENCE frame received from `peer`.
    pub fn apply(&mut self, peer: usize, flags: u8, entries: &List<'_, PresenceEntry<'_>>) {
        if flags & crate::protocol::frame::PRESENCE_SNAPSHOT_BEGIN != 0 {
            self.clear_peer(peer);
        }
        for e in entries.iter() {
            match e.op {
                PresenceOp::Online => self.online(peer, e.user),
                PresenceOp::Offline => self.offline(peer, e.user),
            }
        }
    }

    fn online(&mut self, peer: usize, user: &[u8]) {
        if self.by_peer.entry(peer).or_default().insert(user.into()) {
            self.by_user.entry(user.into()).or_default().push(peer);
        }
    }

    fn offline(&mut self, peer: usize, user: &[u8]) {
        if self.by_peer.get_mut(&peer).is_some_and(|s| s.remove(user)) {
            if let Some(v) = self.by_user.get_mut(user) {
                v.retain(|&p| p != peer);
                if v.is_empty() {
                    self.by_user.remove(user);
                }
            }
        }
    }

    /// Forgets everything learned from `peer` (its link closed).
    pub fn clear_peer(&mut self, peer: usize) {
        if let Some(users) = self.by_peer.remove(&peer) {
            for u in users {
                if let Some(v) = self.by_user.get_mut(u.as_bytes()) {
                    v.retain(|&p| p != peer);
                    if v.is_empty() {
                        self.by_user.remove(u.as_bytes());
                    }
                }
            }
        }
    }

    /// Users known online at `peer`.
    pub fn count(&self, peer: usize) -> usize {
        self.by_peer.get(&peer).map_or(0, |s| s.len())
    }
}

/// Appends PRESENCE frames for `changes` (a delta) to `out`.
pub fn encode_delta(out: &mut Vec<u8>, changes: &[(PresenceOp, Box<[u8]>)]) {
    for chunk in chunks(changes.iter().map(|(op, u)| (*op, &u[..]))) {
        encode_chunk(out, 0, &chunk);
    }
}

/// Appends a full snapshot of `online` users to `out`: BEGIN on the first
/// frame, END on the last (one frame with both when small or empty).
pub fn encode_snapshot<'a>(out: &mut Vec<u8>, online: impl Iterator<Item = &'a [u8]>) {
    use crate::protocol::frame::{PRESENCE_SNAPSHOT_BEGIN as B, PRESENCE_SNAPSHOT_END as E};
    let all: Vec<Vec<(PresenceOp, &[u8])>> = chunks(online.map(|u| (PresenceOp::Online, u)));
    if all.is_empty() {
        encode_chunk(out, B | E, &[]);
        return;
    }
    let n = all.len();
    for (i, c) in all.iter().enumerate() {
        let flags = if i == 0 { B } else { 0 } | if i + 1 == n { E } else { 0 };
        encode_chunk(out, flags, c);
    }
}

fn chunks<'a>(it: impl Iterator<Item = (PresenceOp, &'a [u8])>) -> Vec<Vec<(PresenceOp, &'a [u8])>> {
    let mut all = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for (op, u) in it {
        bytes += 2 + u.len();
        cur.push((op, u));
        if bytes >= CHUNK {
            all.push(std::mem::take(&mut cur));
            bytes = 0;
        }
    }
    if !cur.is_empty() {
        all.push(cur);
    }
    all
}

fn encode_chunk(out: &mut Vec<u8>, flags: u8, entries: &[(PresenceOp, &[u8])]) {
    let es: Vec<PresenceEntry<'_>> = entries.iter().map(|&(op, user)| PresenceEntry { op, user }).collect();
    let bytes = encode_entries(&es);
    if let Some(list) = List::from_encoded(es.len(), &bytes) {
        Frame::Presence(PresenceFrame { flags, entries: list }).encode(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, Channel, Decoded};

    fn feed(p: &mut Presence, peer: usize, mut bytes: &[u8]) {
        while let Ok(Decoded::Frame(Frame::Presence(f), n)) = decode(bytes, Channel::Ingest) {
            p.apply(peer, f.flags, &f.entries);
            bytes = &bytes[n..];
        }
        assert!(bytes.is_empty());
    }

    #[test]
    fn snapshot_then_deltas_then_link_loss() {
        let mut p = Presence::default();
        let mut out = Vec::new();
        encode_snapshot(&mut out, [&b"alice"[..], b"bob"].into_iter());
        feed(&mut p, 7, &out);
        assert_eq!(p.peers_of(b"alice"), &[7]);
        out.clear();
        encode_delta(
            &mut out,
            &[(PresenceOp::Offline, b"alice"[..].into()), (PresenceOp::Online, b"carol"[..].into())],
        );
        feed(&mut p, 7, &out);
        assert!(p.peers_of(b"alice").is_empty());
        assert_eq!(p.peers_of(b"carol"), &[7]);
        out.clear();
        encode_snapshot(&mut out, [&b"carol"[..]].into_iter());
        feed(&mut p, 9, &out);
        assert_eq!(p.peers_of(b"carol"), &[7, 9]);
        // A new snapshot from 7 replaces what 7 said before.
        out.clear();
        encode_snapshot(&mut out, std::iter::empty());
        feed(&mut p, 7, &out);
        assert_eq!(p.peers_of(b"carol"), &[9]);
        assert!(p.peers_of(b"bob").is_empty());
        p.clear_peer(9);
        assert!(p.peers_of(b"carol").is_empty());
        assert_eq!(p.count(9), 0);
    }

    #[test]
    fn large_snapshots_are_chunked_with_begin_and_end() {
        let users: Vec<Vec<u8>> = (0..20_000).map(|i| format!("user-{i:08}").into_bytes()).collect();
        let mut out = Vec::new();
        encode_snapshot(&mut out, users.iter().map(|u| &u[..]));
        let mut frames = Vec::new();
        let mut b = &out[..];
        while let Ok(Decoded::Frame(Frame::Presence(f), n)) = decode(b, Channel::Ingest) {
            frames.push(f.flags);
            b = &b[n..];
        }
        assert!(frames.len() > 1);
        assert_eq!(frames[0] & 1, 1);
        assert_eq!(frames[frames.len() - 1] & 2, 2);
        let mut p = Presence::default();
        feed(&mut p, 1, &out);
        assert_eq!(p.count(1), 20_000);
    }
}
