//! Who asks for a node: the credential of an ASSIGN_REQUEST (protocol.md
//! §7.1, *Who asks*). A version-2 request may carry the client's own token;
//! a decision server that holds the client secret verifies it and counts the
//! pending assignment against the token's user, so a stranger can neither
//! use up the nodes' headroom by asking under made-up user ids nor (with
//! `require_token`) be answered at all. Pure: the caller passes the clock.

use crate::protocol::frame::AssignRequest;
use crate::protocol::token::{self, TokenError};
use crate::protocol::Code;

/// How a decision server treats the credential of ASSIGN_REQUESTs.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The client secret; empty: tokens cannot be verified, so requests
    /// count by the user they name, as in version 1.
    pub client_secret: Vec<u8>,
    /// With a client secret: refuse requests without a token (version 1, or
    /// version 2 with an empty token) with AUTH_FAILED, instead of
    /// answering them uncounted.
    pub require_token: bool,
}

/// Whom an answered request is counted against (protocol.md §7.1,
/// `assigned_since_heartbeat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asker<'a> {
    /// The user a verified token names.
    Verified(Vec<u8>),
    /// The user the request names, unverified (a server without the client
    /// secret).
    Claimed(&'a [u8]),
    /// Nobody: a request without a token to a server that verifies tokens.
    /// It is answered, but does not count towards any node's headroom.
    Anonymous,
}

impl Asker<'_> {
    /// The user id whose assignment is counted, if any.
    pub fn counted(&self) -> Option<&[u8]> {
        match self {
            Asker::Verified(u) => Some(u),
            Asker::Claimed(u) => Some(u),
            Asker::Anonymous => None,
        }
    }
}

/// Why a request was refused: the ERROR to send before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The wire code: AUTH_FAILED or TOKEN_EXPIRED.
    pub code: Code,
    /// The ERROR's message.
    pub message: &'static str,
}

/// Checks the credential of `req` under `policy` at `unix` seconds.
pub fn check<'a>(req: &AssignRequest<'a>, policy: &Policy, unix: u64) -> Result<Asker<'a>, Refused> {
    if policy.client_secret.is_empty() {
        return Ok(Asker::Claimed(req.user));
    }
    if req.token.is_empty() {
        if policy.require_token {
            return Err(Refused {
                code: Code::AuthFailed,
                message: "this decision server requires a client token (ASSIGN_REQUEST version 2)",
            });
        }
        return Ok(Asker::Anonymous);
    }
    match token::verify(req.token, &policy.client_secret, unix) {
        Ok(claims) if req.user.is_empty() || req.user == claims.user.as_slice() => {
            Ok(Asker::Verified(claims.user))
        }
        Ok(_) => Err(Refused { code: Code::AuthFailed, message: "the user is not the token's user" }),
        Err(TokenError::Expired) => Err(Refused { code: Code::TokenExpired, message: "token expired" }),
        Err(_) => Err(Refused { code: Code::AuthFailed, message: "the token does not verify" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"client-secret-of-sixteen+";
    const NOW: u64 = 1_800_000_000;

    fn req<'a>(user: &'a [u8], token: &'a [u8]) -> AssignRequest<'a> {
        AssignRequest { version: if token.is_empty() { 1 } else { 2 }, user, max_results: 1, token }
    }

    fn verifying(require_token: bool) -> Policy {
        Policy { client_secret: SECRET.to_vec(), require_token }
    }

    #[test]
    fn without_the_client_secret_the_named_user_counts() {
        let p = Policy::default();
        assert_eq!(check(&req(b"u", b""), &p, NOW), Ok(Asker::Claimed(b"u")));
        assert_eq!(check(&req(b"u", b"not.a.token"), &p, NOW), Ok(Asker::Claimed(b"u")));
    }

    #[test]
    fn a_valid_token_counts_its_own_user() {
        let t = token::mint(SECRET, b"alice", NOW + 60).unwrap();
        for user in [&b""[..], b"alice"] {
            let a = check(&req(user, t.as_bytes()), &verifying(false), NOW).unwrap();
            assert_eq!(a.counted(), Some(&b"alice"[..]));
        }
    }

    #[test]
    fn bad_expired_and_mismatched_tokens_are_refused() {
        let p = verifying(false);
        let good = token::mint(SECRET, b"alice", NOW + 60).unwrap();
        let other = token::mint(b"another-secret-of-16+", b"alice", NOW + 60).unwrap();
        let old = token::mint(SECRET, b"alice", NOW - 1).unwrap();
        let code = |user: &[u8], t: &str| check(&req(user, t.as_bytes()), &p, NOW).unwrap_err().code;
        assert_eq!(code(b"", &other), Code::AuthFailed);
        assert_eq!(code(b"", "v1.garbage"), Code::AuthFailed);
        assert_eq!(code(b"", &old), Code::TokenExpired);
        assert_eq!(code(b"mallory", &good), Code::AuthFailed);
    }

    #[test]
    fn without_a_token_anonymous_or_refused() {
        assert_eq!(check(&req(b"u", b""), &verifying(false), NOW), Ok(Asker::Anonymous));
        assert_eq!(Asker::Anonymous.counted(), None);
        assert_eq!(check(&req(b"u", b""), &verifying(true), NOW).unwrap_err().code, Code::AuthFailed);
    }
}
