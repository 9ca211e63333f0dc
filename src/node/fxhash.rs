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
        self.hash
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
        let mut a = FxHasher::default();
        a.write(b"ab");
        let mut b = FxHasher::default();
        b.write(b"ab\0");
        // Same padded word, but a HashMap also hashes the length prefix.
        assert_eq!(a.finish(), b.finish());
    }
}
