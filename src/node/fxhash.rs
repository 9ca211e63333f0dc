//! A small, fast hasher for the node's user-id maps (the rustc "Fx" hash).
//!
//! Every publish looks a user id up at least once, so SipHash's cost shows
//! in the per-message budget. User ids reaching these maps are either signed
//! (client tokens) or come from authenticated publishers, so the flooding
//! resistance SipHash buys is not needed here.

use std::hash::{BuildHasherDefault, Hasher};

/// The Fx hasher: multiply-rotate over 8-byte words.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            self.add(tail(rest));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits a function of the low input bits
        // only (for "u1234" that is the constant 'u'); hashbrown picks
        // buckets from the low bits, so bring the well-mixed high bits down.
        self.hash.rotate_left(26)
    }
}

/// `BuildHasher` for `HashMap<_, _, FxBuild>`.
pub type FxBuild = BuildHasherDefault<FxHasher>;

/// The 1..=7 bytes `rest` as a zero-padded little-endian word, read with at
/// most three loads (overlapping where the length is odd) instead of a
/// `memcpy` call: every publish hashes a user id.
#[inline]
fn tail(rest: &[u8]) -> u64 {
    let n = rest.len();
    debug_assert!((1..8).contains(&n));
    if n >= 4 {
        let lo = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
        let hi = u32::from_le_bytes([rest[n - 4], rest[n - 3], rest[n - 2], rest[n - 1]]) as u64;
        lo | hi << ((n - 4) * 8)
    } else {
        rest[0] as u64 | (rest[n / 2] as u64) << (n / 2 * 8) | (rest[n - 1] as u64) << ((n - 1) * 8)
    }
}

/// Longest user id [`UserKey`] keeps inline.
const INLINE: usize = 30;

/// A user id as a hash-map key. Ids of up to 30 bytes (nearly all of them)
/// live inside the map's own bucket, so a lookup compares keys without
/// chasing a pointer to a separate allocation: on the delivery path every
/// publish looks its user up, and with thousands of users that pointer is a
/// cache miss. Longer ids are boxed. Hashes and compares exactly like
/// `[u8]`, so maps keyed by it are queried with `&[u8]`.
#[derive(Clone)]
pub enum UserKey {
    /// Length and bytes.
    Inline(u8, [u8; INLINE]),
    /// A longer id.
    Heap(Box<[u8]>),
}

impl UserKey {
    /// The id's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            UserKey::Inline(n, b) => &b[..*n as usize],
            UserKey::Heap(b) => b,
        }
    }
}

impl From<&[u8]> for UserKey {
    fn from(id: &[u8]) -> UserKey {
        if id.len() <= INLINE {
            let mut b = [0u8; INLINE];
            b[..id.len()].copy_from_slice(id);
            UserKey::Inline(id.len() as u8, b)
        } else {
            UserKey::Heap(id.into())
        }
    }
}

impl std::borrow::Borrow<[u8]> for UserKey {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::hash::Hash for UserKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl PartialEq for UserKey {
    #[inline]
    fn eq(&self, other: &UserKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for UserKey {}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn distinguishes_keys_of_every_length() {
        let mut m: HashMap<Vec<u8>, usize, FxBuild> = HashMap::default();
        for i in 0..10_000usize {
            m.insert(format!("user-{i}").into_bytes(), i);
        }
        for i in 0..10_000usize {
            assert_eq!(m[format!("user-{i}").as_bytes()], i);
        }
    }

    #[test]
    fn tail_reads_the_padded_little_endian_word() {
        let bytes = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77];
        for n in 1..8 {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(tail(&bytes[..n]), u64::from_le_bytes(b), "{n} bytes");
        }
    }

    #[test]
    fn user_keys_inline_or_boxed_look_up_by_slice() {
        let mut m: HashMap<UserKey, usize, FxBuild> = HashMap::default();
        let ids: Vec<Vec<u8>> = (0..64).map(|n| (0..n).map(|i| b'a' + (i % 26) as u8).collect()).collect();
        for (i, id) in ids.iter().enumerate() {
            m.insert(UserKey::from(id.as_slice()), i);
        }
        assert!(matches!(UserKey::from(&ids[30][..]), UserKey::Inline(30, _)));
        assert!(matches!(UserKey::from(&ids[31][..]), UserKey::Heap(_)));
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(m.get(id.as_slice()), Some(&i), "id of {} bytes", id.len());
            assert_eq!(m.get_key_value(id.as_slice()).unwrap().0.as_bytes(), id.as_slice());
        }
        assert_eq!(m.get(&b"zz"[..]), None);
    }

    #[test]
    fn low_bits_spread_for_ids_with_a_common_prefix() {
        // Bucket choice uses the low bits: ids like "u1234" must not collide there.
        let mut low = std::collections::HashSet::new();
        for i in 0..4096 {
            let mut h = FxHasher::default();
            h.write(format!("u{i}").as_bytes());
            low.insert(h.finish() & 0xfff);
        }
        assert!(low.len() > 2000, "only {} distinct low-12-bit values of 4096", low.len());
    }
}
