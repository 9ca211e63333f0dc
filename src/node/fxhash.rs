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
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
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
