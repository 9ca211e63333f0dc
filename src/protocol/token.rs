//! Client and publisher tokens (protocol.md §9): mint and verify.
//!
//! A token is ASCII text that any backend can mint with an HMAC library:
//!
//! ```text
//! v1.<base64url(user id), no padding>.<expiry, Unix seconds, decimal>.<hex HMAC-SHA256>
//! ```
//!
//! The tag is HMAC-SHA256 under the shared secret of every byte before the
//! last `.`, written as 64 lowercase hex digits. Verification is constant-time
//! and takes the current time as a parameter (no clock in this module).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::limits::{MAX_TOKEN_LEN, MAX_USER_LEN};
use super::sign;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the form `v1.<user>.<expiry>.<tag>`, or a part is not valid.
    Malformed,
    /// The tag does not verify under the secret.
    BadSignature,
    /// The expiry is not after `now`.
    Expired,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "token signature does not verify",
            TokenError::Expired => "token expired",
        })
    }
}

impl std::error::Error for TokenError {}

/// A verified token's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id (or publisher name), 1..=64 bytes.
    pub user: Vec<u8>,
    /// Expiry in Unix seconds.
    pub expires: u64,
}

/// Mints a token for `user` expiring at `expires` (Unix seconds).
///
/// Returns `None` if the user id is empty or longer than 64 bytes.
pub fn mint(secret: &[u8], user: &[u8], expires: u64) -> Option<String> {
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return None;
    }
    let mut s = String::with_capacity(160);
    s.push_str("v1.");
    s.push_str(&URL_SAFE_NO_PAD.encode(user));
    s.push('.');
    s.push_str(&expires.to_string());
    let tag = sign::hmac(secret, &[s.as_bytes()]);
    s.push('.');
    for b in tag {
        s.push(char::from(HEX[(b >> 4) as usize]));
        s.push(char::from(HEX[(b & 15) as usize]));
    }
    Some(s)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The user a token claims, read without checking its signature or expiry:
/// only for deciding where a connection should be handled. `None` if the
/// token is not well formed. [`verify`] must still accept it before anyone
/// trusts the claim.
pub fn claimed_user(token: &[u8]) -> Option<Vec<u8>> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut parts = token.split(|&c| c == b'.');
    let (Some(b"v1"), Some(user_b64)) = (parts.next(), parts.next()) else { return None };
    if user_b64.is_empty() || user_b64.len() > 88 {
        return None;
    }
    let user = URL_SAFE_NO_PAD.decode(user_b64).ok()?;
    (!user.is_empty() && user.len() <= MAX_USER_LEN).then_some(user)
}

/// Verifies `token` under `secret` at time `now` (Unix seconds).
///
/// The signature is checked before the expiry, so an attacker learns nothing
/// about expiry handling from forged tokens.
pub fn verify(token: &[u8], secret: &[u8], now: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let dot = token.iter().rposition(|&c| c == b'.').ok_or(TokenError::Malformed)?;
    let (signed, tag_hex) = (&token[..dot], &token[dot + 1..]);
    if tag_hex.len() != 64 {
        return Err(TokenError::Malformed);
    }
    let mut tag = [0u8; 32];
    for (i, pair) in tag_hex.chunks_exact(2).enumerate() {
        tag[i] = (unhex(pair[0]).ok_or(TokenError::Malformed)? << 4)
            | unhex(pair[1]).ok_or(TokenError::Malformed)?;
    }
    let mut parts = signed.split(|&c| c == b'.');
    let (Some(b"v1"), Some(user_b64), Some(exp), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    if exp.is_empty() || exp.len() > 20 || !exp.iter().all(u8::is_ascii_digit) {
        return Err(TokenError::Malformed);
    }
    let expires =
        std::str::from_utf8(exp).ok().and_then(|s| s.parse::<u64>().ok()).ok_or(TokenError::Malformed)?;
    if user_b64.is_empty() || user_b64.len() > 88 {
        return Err(TokenError::Malformed);
    }
    let user = URL_SAFE_NO_PAD.decode(user_b64).map_err(|_| TokenError::Malformed)?;
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return Err(TokenError::Malformed);
    }
    if !sign::verify(secret, &[signed], &tag) {
        return Err(TokenError::BadSignature);
    }
    if expires <= now {
        return Err(TokenError::Expired);
    }
    Ok(Claims { user, expires })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    #[test]
    fn claimed_user_reads_the_claim_without_trusting_it() {
        let t = mint(SECRET, b"alice", 2_000_000_000).unwrap();
        assert_eq!(claimed_user(t.as_bytes()).as_deref(), Some(&b"alice"[..]));
        let forged = t.replace(&t[t.len() - 4..], "0000");
        assert_eq!(claimed_user(forged.as_bytes()).as_deref(), Some(&b"alice"[..]));
        assert!(verify(forged.as_bytes(), SECRET, 1_900_000_000).is_err());
        assert_eq!(claimed_user(b"v2.YWxpY2U.1.00"), None);
        assert_eq!(claimed_user(b"v1.!!.1.00"), None);
        assert_eq!(claimed_user(b"v1"), None);
    }

    #[test]
    fn mint_then_verify() {
        let t = mint(SECRET, b"alice", 2_000_000_000).unwrap();
        let c = verify(t.as_bytes(), SECRET, 1_900_000_000).unwrap();
        assert_eq!(c.user, b"alice");
        assert_eq!(c.expires, 2_000_000_000);
    }

    #[test]
    fn rejects_wrong_secret_expired_and_tampered() {
        let t = mint(SECRET, b"alice", 2_000_000_000).unwrap();
        assert_eq!(verify(t.as_bytes(), b"other", 0), Err(TokenError::BadSignature));
        assert_eq!(verify(t.as_bytes(), SECRET, 2_000_000_000), Err(TokenError::Expired));
        let bob = t.replacen("YWxpY2U", "Ym9i", 1);
        assert_eq!(verify(bob.as_bytes(), SECRET, 0), Err(TokenError::BadSignature));
        let longer = t.replacen(".2000000000.", ".2000000001.", 1);
        assert_eq!(verify(longer.as_bytes(), SECRET, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"v1",
            b"v1.YWxpY2U.2000000000",
            b"v2.YWxpY2U.2000000000.0000000000000000000000000000000000000000000000000000000000000000",
            b"v1..2000000000.0000000000000000000000000000000000000000000000000000000000000000",
            b"v1.YWxpY2U.-1.0000000000000000000000000000000000000000000000000000000000000000",
            b"v1.YWxpY2U.2000000000.zz00000000000000000000000000000000000000000000000000000000000000",
            b"v1.YWxpY2U.2000000000.00",
            b"v1.YW!pY2U.2000000000.0000000000000000000000000000000000000000000000000000000000000000",
            b"v1.a.b.2000000000.0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(
                verify(bad, SECRET, 0),
                Err(TokenError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn user_limits() {
        assert!(mint(SECRET, b"", 1).is_none());
        assert!(mint(SECRET, &[b'x'; 65], 1).is_none());
        let t = mint(SECRET, &[0xffu8; 64], 5).unwrap();
        assert_eq!(verify(t.as_bytes(), SECRET, 1).unwrap().user, vec![0xffu8; 64]);
    }
}
