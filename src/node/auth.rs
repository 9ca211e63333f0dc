//! One authentication step for every conversation a node accepts (client
//! HELLO, publisher PUB_HELLO, mesh PEER_HELLO): version negotiation, then
//! the credential, each failure a typed [`Refusal`] with its wire code
//! (protocol.md §3.2, §5.1, §6.2). No sockets, no clock: the caller passes
//! the wall-clock time in.

use crate::protocol::frame::negotiate;
use crate::protocol::token::{self, TokenError};
use crate::protocol::Code;

/// What a hello proves, and against which secret.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// A client token, verified with the client secret.
    Client {
        /// The token.
        token: &'a [u8],
        /// The client secret.
        secret: &'a [u8],
    },
    /// A publisher credential, verified with the publisher secret.
    Publisher {
        /// The credential.
        credential: &'a [u8],
        /// The publisher secret.
        secret: &'a [u8],
    },
    /// A mesh peer: proven later by the HMAC challenge; only the cluster
    /// secret must exist.
    Peer {
        /// The cluster secret.
        secret: &'a [u8],
    },
}

/// A hello that was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The protocol version chosen.
    pub version: u8,
    /// The user the token names (client tokens only).
    pub user: Option<Vec<u8>>,
}

/// Why a hello was refused: the code and message of the ERROR to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The wire code.
    pub code: Code,
    /// The ERROR's message.
    pub message: String,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into() }
    }
}

/// Checks a hello offering versions `min..=max` with `cred`, at `unix` seconds.
pub fn authenticate(min: u8, max: u8, cred: Credential<'_>, unix: u64) -> Result<Admitted, Refusal> {
    // Version first, then the credential (protocol.md §3.1 steps 3 and 4,
    // §6.1), also for a node that takes no mesh links.
    let Some(version) = negotiate(min, max) else {
        return Err(Refusal::new(Code::UnsupportedVersion, "this node speaks protocol versions 1 and 2"));
    };
    if let Credential::Peer { secret } = cred {
        if secret.is_empty() {
            return Err(Refusal::new(Code::AuthFailed, "this node has no cluster secret"));
        }
    }
    let (presented, secret, what) = match cred {
        Credential::Client { token, secret } => (token, secret, "token"),
        Credential::Publisher { credential, secret } => (credential, secret, "publisher credential"),
        Credential::Peer { .. } => return Ok(Admitted { version, user: None }),
    };
    match token::verify(presented, secret, unix) {
        Ok(claims) => {
            let user = matches!(cred, Credential::Client { .. }).then_some(claims.user);
            Ok(Admitted { version, user })
        }
        Err(TokenError::Expired) => Err(Refusal::new(Code::TokenExpired, format!("{what} expired"))),
        Err(e) => Err(Refusal::new(Code::AuthFailed, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"auth-test-secret";

    #[test]
    fn each_refusal_has_its_code() {
        let t = token::mint(SECRET, b"alice", 1_000).unwrap();
        let client = |secret| Credential::Client { token: t.as_bytes(), secret };
        let ok = authenticate(1, 1, client(SECRET), 999).unwrap();
        assert_eq!(ok, Admitted { version: 1, user: Some(b"alice".to_vec()) });
        assert_eq!(authenticate(1, 2, client(SECRET), 999).unwrap().version, 2);
        assert_eq!(authenticate(3, 4, client(SECRET), 999).unwrap_err().code, Code::UnsupportedVersion);
        assert_eq!(authenticate(1, 1, client(SECRET), 1_001).unwrap_err().code, Code::TokenExpired);
        assert_eq!(authenticate(1, 1, client(b"other"), 999).unwrap_err().code, Code::AuthFailed);
        let publisher = Credential::Publisher { credential: t.as_bytes(), secret: SECRET };
        let p = authenticate(1, 1, publisher, 1_001).unwrap_err();
        assert_eq!((p.code, p.message.as_str()), (Code::TokenExpired, "publisher credential expired"));
        assert_eq!(authenticate(1, 1, publisher, 999).unwrap().user, None);
        assert_eq!(
            authenticate(1, 1, Credential::Peer { secret: b"" }, 0).unwrap_err().code,
            Code::AuthFailed
        );
        assert_eq!(authenticate(1, 1, Credential::Peer { secret: SECRET }, 0).unwrap().version, 1);
    }
}
