//! HMAC-SHA256 tags: signed frames (ADMIN, HEARTBEAT) and the mesh handshake
//! proofs (protocol.md §2.5, §6.2, §6.3).
//!
//! A signed frame's tag is the last 32 bytes of its body and covers every byte
//! from the type byte up to the tag. Verification is constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of every tag.
pub const TAG_LEN: usize = 32;

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    // new_from_slice accepts keys of any length for HMAC.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time check that `tag` is HMAC-SHA256(key, parts...).
pub fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// Appends the tag for the frame started at `at` (its length field), or 32
/// zero bytes without a key.
pub(crate) fn append_tag(out: &mut Vec<u8>, at: usize, key: Option<&[u8]>) {
    let tag = match key {
        Some(k) => hmac(k, &[&out[at + 4..]]),
        None => [0u8; TAG_LEN],
    };
    out.extend_from_slice(&tag);
}

/// Checks the tag of a complete signed frame (length prefix included), as
/// returned whole by the socket or cut by [`super::decode`]'s length.
pub fn verify_frame(frame: &[u8], key: &[u8]) -> bool {
    if frame.len() < 4 + 1 + TAG_LEN {
        return false;
    }
    let (signed, tag) = frame[4..].split_at(frame.len() - 4 - TAG_LEN);
    verify(key, &[signed], tag)
}

const ACCEPTOR: &[u8] = b"herald peer acceptor v1";
const INITIATOR: &[u8] = b"herald peer initiator v1";

fn peer_parts<'a>(
    label: &'a [u8],
    nonce_i: &'a [u8; 16],
    nonce_a: &'a [u8; 16],
    id_i: &'a [u8],
    id_a: &'a [u8],
    len_i: &'a [u8; 1],
    len_a: &'a [u8; 1],
) -> [&'a [u8]; 7] {
    [label, nonce_i, nonce_a, len_i, id_i, len_a, id_a]
}

/// The acceptor's proof in PEER_WELCOME (protocol.md §6.2):
/// HMAC(secret, "herald peer acceptor v1" ‖ nonce_i ‖ nonce_a ‖ str8(initiator id) ‖ str8(acceptor id)).
pub fn peer_acceptor_tag(
    secret: &[u8],
    nonce_i: &[u8; 16],
    nonce_a: &[u8; 16],
    id_i: &[u8],
    id_a: &[u8],
) -> [u8; TAG_LEN] {
    let (li, la) = ([id_i.len() as u8], [id_a.len() as u8]);
    hmac(secret, &peer_parts(ACCEPTOR, nonce_i, nonce_a, id_i, id_a, &li, &la))
}

/// The initiator's proof in PEER_AUTH (protocol.md §6.3): as the acceptor's,
/// with the label "herald peer initiator v1".
pub fn peer_initiator_tag(
    secret: &[u8],
    nonce_i: &[u8; 16],
    nonce_a: &[u8; 16],
    id_i: &[u8],
    id_a: &[u8],
) -> [u8; TAG_LEN] {
    let (li, la) = ([id_i.len() as u8], [id_a.len() as u8]);
    hmac(secret, &peer_parts(INITIATOR, nonce_i, nonce_a, id_i, id_a, &li, &la))
}

/// Constant-time comparison of two tags.
pub fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let mut d = 0u8;
    for i in 0..TAG_LEN {
        d |= a[i] ^ b[i];
    }
    d == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2.
    #[test]
    fn hmac_matches_rfc4231() {
        let t = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = t.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(verify(b"Jefe", &[b"what do ya want for nothing?"], &t));
        assert!(!verify(b"Jefx", &[b"what do ya want for nothing?"], &t));
    }

    #[test]
    fn peer_tags_differ_by_role() {
        let (ni, na) = ([1u8; 16], [2u8; 16]);
        let a = peer_acceptor_tag(b"s", &ni, &na, b"x", b"y");
        let i = peer_initiator_tag(b"s", &ni, &na, b"x", b"y");
        assert!(!tags_equal(&a, &i));
        assert!(tags_equal(&a, &peer_acceptor_tag(b"s", &ni, &na, b"x", b"y")));
    }

    #[test]
    fn verify_frame_rejects_short_input() {
        assert!(!verify_frame(&[0, 0, 0, 1, 0x40], b"k"));
    }
}
