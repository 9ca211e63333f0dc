//! Shared checks for the herald fuzz targets.
//!
//! Every frame target feeds its input to [`check_stream`], which treats the
//! bytes as what a socket would hand the codec: frames back to back, decoded
//! from the start of the buffer and advanced by `consumed` until the decoder
//! asks for more bytes or refuses the input. The codec must never panic, and
//! the invariants below must hold for every input; a violated invariant is a
//! panic, which libFuzzer reports as a crash with its input.
//!
//! The token target uses [`check_token`].

use std::fmt::Debug;

use herald::protocol::frame::{Entry, List, HEADER_LEN, HELLO_RESUME, MAX_CONFLATED_KEYS};
use herald::protocol::limits::*;
use herald::protocol::samples::SAMPLE_SECRET;
use herald::protocol::token::{self, Claims, TokenError};
use herald::protocol::{decode, frame::peek_header, sign, Channel, Decoded, Frame};

/// Key for the signed frames (ADMIN, HEARTBEAT) and the token secret: the one
/// the samples are signed with, so the seed corpus holds frames that verify.
pub const KEY: &[u8] = SAMPLE_SECRET;

/// A different key: nothing signed under [`KEY`] may verify under it.
pub const OTHER_KEY: &[u8] = b"herald-other-secret";

/// The `now` values every token is verified at: the epoch, the samples'
/// expiry and its neighbours, and the end of time.
pub const NOWS: [u64; 6] = [0, 1, 1_767_225_599, 1_767_225_600, 2_000_000_000, u64::MAX];

/// Decodes `data` as a stream of frames on `channel` and checks every invariant.
///
/// With `key`, each complete frame is also passed to [`sign::verify_frame`],
/// and ADMIN / HEARTBEAT frames get the signed re-encoding checks.
pub fn check_stream(data: &[u8], channel: Channel, key: Option<&[u8]>) {
    let max_total = 4 + channel.max_len() as usize;
    let mut rest = data;
    loop {
        if let Some(k) = key {
            // Any byte string, complete frame or not, must be safe to verify.
            let _ = sign::verify_frame(rest, k);
        }
        match decode(rest, channel) {
            Ok(Decoded::Frame(frame, consumed)) => {
                assert!(consumed >= HEADER_LEN, "consumed {consumed} < header");
                assert!(consumed <= rest.len(), "consumed {consumed} > remaining {}", rest.len());
                assert!(consumed <= max_total, "consumed {consumed} > 4 + max_len {max_total}");
                let raw = &rest[..consumed];
                check_frame(&frame, raw, channel, key);
                rest = &rest[consumed..];
            }
            Ok(Decoded::Incomplete(needed)) => {
                assert!(needed > rest.len(), "Incomplete({needed}) with {} bytes present", rest.len());
                assert!(needed <= max_total, "Incomplete({needed}) > 4 + max_len {max_total}");
                assert!(needed >= HEADER_LEN, "Incomplete({needed}) < header");
                break;
            }
            Err(e) => {
                // Display and the wire-code mapping must not panic either.
                let _ = e.to_string();
                break;
            }
        }
    }
}

/// Checks one decoded frame `frame`, cut from the input as `raw`.
fn check_frame(frame: &Frame<'_>, raw: &[u8], channel: Channel, key: Option<&[u8]>) {
    let t = frame.frame_type();
    assert!(channel.allows(t), "frame type {t:#04x} decoded on {channel:?}, which does not allow it");
    assert_eq!(raw[4], t, "type byte and decoded frame type differ");
    let len = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    assert_eq!(len + 4, raw.len(), "length prefix and consumed differ");
    assert_eq!(peek_header(raw), Some((len as u32, t)));

    // The frame alone decodes to the same thing: nothing after it was looked at.
    assert_eq!(decode(raw, channel), Ok(Decoded::Frame(*frame, raw.len())));
    // Every strict prefix of a valid frame is Incomplete, never an error or a
    // frame: a reader that gets the frame in pieces must wait, not close.
    for cut in (0..raw.len().min(HEADER_LEN + 2)).chain([raw.len() - 1]) {
        match decode(&raw[..cut], channel) {
            Ok(Decoded::Incomplete(n)) => {
                assert!(n > cut && n <= raw.len(), "prefix {cut}/{}: Incomplete({n})", raw.len())
            }
            other => panic!("prefix {cut}/{} of a valid frame: {other:?}", raw.len()),
        }
    }

    check_fields(frame);

    // Re-encode and decode again: the same frame, on the same channel.
    let enc = frame.to_vec();
    match decode(&enc, channel) {
        Ok(Decoded::Frame(again, n)) => {
            assert_eq!(n, enc.len(), "re-encoded frame decodes with consumed != its length");
            assert_eq!(&again, frame, "re-encoded frame decodes to a different frame");
            assert_eq!(again.to_vec(), enc, "encoding is not idempotent");
        }
        other => panic!("re-encoded {frame:?} does not decode: {other:?}\nbytes {enc:02x?}"),
    }
    assert_eq!(enc, canonical(frame, raw), "re-encoding differs from the input beyond ignored bits");

    let signed = matches!(frame, Frame::Admin(_) | Frame::Heartbeat(_));
    if let Some(k) = key {
        let verifies = sign::verify_frame(raw, k);
        let mut s = Vec::new();
        frame.encode_signed(&mut s, k);
        if signed {
            let body = s.len() - sign::TAG_LEN;
            assert_eq!(s.len(), enc.len());
            assert_eq!(s[..body], enc[..body], "signed and unsigned encodings differ before the tag");
            assert!(sign::verify_frame(&s, k), "encode_signed output does not verify");
            assert!(!sign::verify_frame(&s, OTHER_KEY), "tag verifies under another key");
            assert_eq!(verifies, s == raw, "verify_frame disagrees with re-signing");
            assert_eq!(decode(&s, channel), Ok(Decoded::Frame(*frame, s.len())));
        } else {
            assert_eq!(s, enc, "encode_signed changed an unsigned frame");
        }
    }

    if raw.len() <= 1024 {
        // Debug walks the lists too; keep it to small frames for speed.
        let _ = format!("{frame:?}");
    }
}

/// What the encoder must produce for a frame decoded from `raw`: the same
/// bytes, except for the bits the decoder is documented to ignore.
fn canonical(frame: &Frame<'_>, raw: &[u8]) -> Vec<u8> {
    let mut v = raw.to_vec();
    // Offset of the flags byte after length, type, magic and two versions.
    const FLAGS_AT: usize = HEADER_LEN + 4 + 2;
    match frame {
        Frame::Hello(h) => {
            v[FLAGS_AT] &= HELLO_RESUME;
            if h.resume.is_none() {
                let n = v.len();
                v[n - 16..].fill(0);
            }
        }
        Frame::PubHello(_) => v[FLAGS_AT] = 0,
        Frame::Admin(_) | Frame::Heartbeat(_) => {
            let n = v.len();
            v[n - sign::TAG_LEN..].fill(0);
        }
        _ => {}
    }
    v
}

fn within(what: &str, v: &[u8], min: usize, max: usize) {
    assert!((min..=max).contains(&v.len()), "{what}: length {} outside {min}..={max}", v.len());
}

/// Field limits the decoder promises (protocol.md §2.2), and a full walk of
/// every list.
fn check_fields(frame: &Frame<'_>) {
    match frame {
        Frame::Hello(h) => {
            within("hello.token", h.token, 1, MAX_TOKEN_LEN);
            within("hello.agent", h.agent, 0, MAX_AGENT_LEN);
        }
        Frame::Welcome(w) => within("welcome.node_id", w.node_id, 1, MAX_NODE_ID_LEN),
        Frame::Deliver(d) => within("deliver.payload", d.payload, 0, MAX_PAYLOAD),
        Frame::Conflated(c) => {
            assert!(c.first_seq <= c.last_seq, "conflated: first_seq after last_seq");
            assert!((1..=MAX_CONFLATED_KEYS).contains(&c.keys.len()), "conflated: {} keys", c.keys.len());
            walk(&c.keys, |k| within("conflated.key", k.0, 1, MAX_KEY_LEN));
        }
        Frame::Goodbye(g) => within("goodbye.target", g.target, 0, MAX_ENDPOINT_LEN),
        Frame::Error(e) => within("error.message", e.message, 0, MAX_ERROR_MESSAGE_LEN),
        Frame::PubHello(p) => {
            within("pub_hello.credential", p.credential, 1, MAX_TOKEN_LEN);
            within("pub_hello.agent", p.agent, 0, MAX_AGENT_LEN);
        }
        Frame::PubWelcome(p) => within("pub_welcome.node_id", p.node_id, 1, MAX_NODE_ID_LEN),
        Frame::Publish(p) => {
            within("publish.user", p.user, 1, MAX_USER_LEN);
            within("publish.key", p.key, 0, MAX_KEY_LEN);
            within("publish.payload", p.payload, 0, MAX_PAYLOAD);
        }
        Frame::PublishBatch(b) => {
            assert!((1..=MAX_BATCH).contains(&b.entries.len()), "batch of {} entries", b.entries.len());
            walk(&b.entries, |e| {
                within("batch.user", e.user, 1, MAX_USER_LEN);
                within("batch.key", e.key, 0, MAX_KEY_LEN);
                within("batch.payload", e.payload, 0, MAX_PAYLOAD);
            });
        }
        Frame::PeerHello(p) => within("peer_hello.node_id", p.node_id, 1, MAX_NODE_ID_LEN),
        Frame::PeerWelcome(p) => within("peer_welcome.node_id", p.node_id, 1, MAX_NODE_ID_LEN),
        Frame::Presence(p) => walk(&p.entries, |e| within("presence.user", e.user, 1, MAX_USER_LEN)),
        Frame::Forward(f) => {
            within("forward.user", f.user, 1, MAX_USER_LEN);
            within("forward.key", f.key, 0, MAX_KEY_LEN);
            assert_eq!(f.seq != 0, f.flags & herald::protocol::frame::FORWARD_SEQ != 0);
            within("forward.payload", f.payload, 0, MAX_PAYLOAD);
        }
        Frame::AssignRequest(a) => {
            within("assign_request.user", a.user, 0, MAX_USER_LEN);
            assert!((1..=MAX_ASSIGN_RESULTS).contains(&a.max_results));
        }
        Frame::Assignment(a) => {
            assert!((1..=MAX_ASSIGN_RESULTS as usize).contains(&a.entries.len()));
            walk(&a.entries, |e| {
                within("assignment.node_id", e.node_id, 1, MAX_NODE_ID_LEN);
                within("assignment.endpoint", e.endpoint, 1, MAX_ENDPOINT_LEN);
            });
        }
        Frame::Nodes(n) => walk(&n.entries, |e| {
            within("nodes.node_id", e.node_id, 1, MAX_NODE_ID_LEN);
            within("nodes.client_endpoint", e.client_endpoint, 1, MAX_ENDPOINT_LEN);
            within("nodes.ingest_endpoint", e.ingest_endpoint, 0, MAX_ENDPOINT_LEN);
        }),
        Frame::Admin(a) => within("admin.node_id", a.node_id, 0, MAX_NODE_ID_LEN),
        Frame::AdminResult(a) => within("admin_result.message", a.message, 0, MAX_ADMIN_MESSAGE_LEN),
        Frame::AdminStatus(s) => walk(&s.entries, |e| {
            within("admin_status.node_id", e.node_id, 1, MAX_NODE_ID_LEN);
            within("admin_status.client_endpoint", e.client_endpoint, 0, MAX_ENDPOINT_LEN);
        }),
        Frame::Heartbeat(h) => {
            within("heartbeat.node_id", h.node_id, 1, MAX_NODE_ID_LEN);
            within("heartbeat.client_endpoint", h.client_endpoint, 1, MAX_ENDPOINT_LEN);
            within("heartbeat.ingest_endpoint", h.ingest_endpoint, 0, MAX_ENDPOINT_LEN);
        }
        Frame::Ping(_)
        | Frame::Pong(_)
        | Frame::PubResult(_)
        | Frame::PeerAuth(_)
        | Frame::NoCapacity(_)
        | Frame::NodesRequest(_) => {}
    }
}

/// Iterates a list to the end: it yields exactly `len()` entries, the size
/// hint counts down, and the entries re-encode to the list's bytes.
fn walk<'a, E: Entry<'a> + Debug + PartialEq>(list: &List<'a, E>, mut each: impl FnMut(&E)) {
    let mut it = list.iter();
    let mut n = 0usize;
    let mut bytes = Vec::with_capacity(list.as_bytes().len());
    assert_eq!(it.size_hint(), (list.len(), Some(list.len())));
    while let Some(e) = it.next() {
        n += 1;
        assert!(n <= list.len(), "list iterator yields more than len() = {} entries", list.len());
        assert_eq!(it.size_hint(), (list.len() - n, Some(list.len() - n)));
        each(&e);
        e.write(&mut bytes);
    }
    assert_eq!(n, list.len(), "list iterator stopped early");
    assert!(it.next().is_none(), "list iterator resumed after None");
    assert_eq!(list.is_empty(), n == 0);
    assert_eq!(bytes, list.as_bytes(), "list entries do not re-encode to the list's bytes");
    assert_eq!(List::<E>::from_encoded(n, list.as_bytes()).as_ref(), Some(list));
}

/// Verifies `data` as a token under [`KEY`] at every time in [`NOWS`].
///
/// The outcome may depend on `now` only through the expiry: a malformed or
/// forged token is refused the same way at every time, and a well-signed
/// one is valid exactly while `now < expires`. A valid token's claims, minted
/// again, verify to the same claims. Then `data` also picks a user and expiry
/// to mint and verify, so `mint` sees arbitrary users.
pub fn check_token(data: &[u8]) {
    let results: Vec<Result<Claims, TokenError>> =
        NOWS.iter().map(|&now| token::verify(data, KEY, now)).collect();
    let first = &results[0];
    let claims = results.iter().find_map(|r| r.as_ref().ok()).cloned();
    let expires_class = results.iter().all(|r| matches!(r, Ok(_) | Err(TokenError::Expired)));
    match first {
        Err(TokenError::Malformed) | Err(TokenError::BadSignature) => {
            assert!(results.iter().all(|r| r == first), "refusal depends on now: {results:?}");
        }
        _ => assert!(expires_class, "outcome depends on now beyond expiry: {results:?}"),
    }
    if data.len() > MAX_TOKEN_LEN {
        assert_eq!(*first, Err(TokenError::Malformed), "over-long token not refused as malformed");
    }
    if let Some(c) = claims {
        within("token user", &c.user, 1, MAX_USER_LEN);
        for (&now, r) in NOWS.iter().zip(&results) {
            if c.expires > now {
                assert_eq!(r.as_ref(), Ok(&c), "claims differ between times");
            } else {
                assert_eq!(*r, Err(TokenError::Expired), "expired token at now={now} not refused as expired");
            }
        }
        // Only the secret makes a token: the same bytes fail under another.
        assert_eq!(token::verify(data, OTHER_KEY, 0), Err(TokenError::BadSignature));
        let t = token::mint(KEY, &c.user, c.expires).expect("verified claims must be mintable");
        assert!(t.len() <= MAX_TOKEN_LEN, "minted token too long: {}", t.len());
        assert_eq!(token::verify(t.as_bytes(), KEY, c.expires - 1), Ok(c.clone()), "re-minted {t}");
    }

    // Mint a token from the input and check it round-trips.
    if data.len() >= 8 {
        let expires = u64::from_be_bytes(data[..8].try_into().unwrap());
        let user = &data[8..data.len().min(8 + MAX_USER_LEN + 1)];
        match token::mint(KEY, user, expires) {
            None => assert!(user.is_empty() || user.len() > MAX_USER_LEN, "mint refused a valid user"),
            Some(t) => {
                assert!(!user.is_empty() && user.len() <= MAX_USER_LEN, "mint accepted a bad user");
                assert!(t.len() <= MAX_TOKEN_LEN);
                let want = Claims { user: user.to_vec(), expires };
                if expires > 0 {
                    assert_eq!(token::verify(t.as_bytes(), KEY, expires - 1), Ok(want), "token {t}");
                }
                assert_eq!(token::verify(t.as_bytes(), KEY, expires), Err(TokenError::Expired));
                assert_eq!(token::verify(t.as_bytes(), OTHER_KEY, 0), Err(TokenError::BadSignature));
            }
        }
    }
}

/// Selects a channel with the first input byte; returns it and the rest.
pub fn select<'a>(data: &'a [u8], channels: &[Channel]) -> Option<(Channel, &'a [u8])> {
    let (&b, rest) = data.split_first()?;
    Some((channels[b as usize % channels.len()], rest))
}

/// Channels of the `decode_ingest` target, indexed by the first input byte.
pub const INGEST: [Channel; 2] = [Channel::Ingest, Channel::FromIngest];

/// Channels of the `decode_decision` target, indexed by the first input byte.
pub const DECISION: [Channel; 3] = [Channel::ToDecision, Channel::FromDecision, Channel::Heartbeat];

/// Every fuzz target, with the channels its frame inputs are read on (empty
/// for `token_verify`) and whether the first input byte selects the channel.
pub const TARGETS: [(&str, &[Channel], bool); 5] = [
    ("decode_to_node", &[Channel::ToNode], false),
    ("decode_to_client", &[Channel::ToClient], false),
    ("decode_ingest", &INGEST, true),
    ("decode_decision", &DECISION, true),
    ("token_verify", &[], false),
];

/// The two targets outside the codec: the node's HTTP request reader and
/// the server side of TLS (their seeds are written by `write_seeds` too).
pub const OTHER_TARGETS: [&str; 2] = ["http_request", "tls_server"];

/// The size of the pieces an input's stream is cut into, from its first
/// byte: 0 → one piece; 1..=127 → that many bytes; 128..=255 → 512-byte
/// steps up to 64 KiB.
pub fn piece_len(shape: u8, stream_len: usize) -> usize {
    match shape {
        0 => stream_len.max(1),
        1..=127 => usize::from(shape),
        _ => usize::from(shape - 127) * 512,
    }
}

/// The HTTP target. The first byte cuts the rest into pieces
/// ([`piece_len`]), fed one by one to `http_take` (as the node reads them
/// from the socket) until it answers other than `Partial`:
///
/// - `Partial` and `Complete` keep exactly the bytes fed so far; `Partial`
///   only while they hold no `\r\n\r\n`, `Complete` only once they do.
/// - `TooLarge` exactly when the piece would take the buffer past 8 KiB
///   (and the buffer is left as it was); the buffer never exceeds 8 KiB.
/// - `Complete(Metrics)` / `Complete(Health)` only if the head holds the
///   path; the answer is the same as for all the bytes fed in one piece
///   (how the request was cut does not matter).
pub fn check_http(data: &[u8]) {
    use herald::fuzzing::{http_take, Head, Request, MAX_HEAD_BYTES};
    let Some((&shape, stream)) = data.split_first() else { return };
    let has_end = |b: &[u8]| b.windows(4).any(|w| w == b"\r\n\r\n");
    let mut rbuf = Vec::new();
    let mut fed = 0;
    for piece in stream.chunks(piece_len(shape, stream.len())) {
        let r = http_take(&mut rbuf, piece);
        if r == Head::TooLarge {
            assert!(fed + piece.len() > MAX_HEAD_BYTES, "refused at {} + {} bytes", fed, piece.len());
            assert_eq!(rbuf, &stream[..fed], "a refused piece changed the buffer");
            return;
        }
        assert!(fed + piece.len() <= MAX_HEAD_BYTES, "took {} + {} bytes", fed, piece.len());
        fed += piece.len();
        assert_eq!(rbuf, &stream[..fed], "the buffer is not the bytes fed");
        match r {
            Head::Partial => assert!(!has_end(&rbuf), "Partial with a complete head"),
            Head::Complete(req) => {
                assert!(has_end(&rbuf), "Complete without the end of the head");
                let end = rbuf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let head = &rbuf[..end];
                let holds = |p: &[u8]| head.windows(p.len()).any(|w| w == p);
                match req {
                    Request::Metrics => assert!(holds(b"/metrics")),
                    Request::Health => assert!(holds(b"/healthz")),
                    Request::Other => {}
                }
                let mut whole = Vec::new();
                assert_eq!(http_take(&mut whole, &stream[..fed]), r, "the answer depends on the cuts");
                return;
            }
            Head::TooLarge => unreachable!(),
        }
    }
}

/// The server configuration the TLS target runs under: herald's own
/// (`tls::ServerFiles::config`: TLS 1.3, ALPN `herald/1`) for a certificate
/// issued at startup by a fresh development CA, asking for an optional
/// client certificate from that CA (as the ingest port does).
pub fn tls_config() -> std::sync::Arc<rustls::ServerConfig> {
    use std::sync::OnceLock;
    static CFG: OnceLock<std::sync::Arc<rustls::ServerConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let dir = tls_dir();
        let files = herald::tls::ServerFiles {
            cert: dir.join("localhost.pem"),
            key: dir.join("localhost.key"),
            client_ca: Some(dir.join("ca.pem")),
            client_cert_optional: true,
        };
        files.config().expect("server config")
    })
    .clone()
}

/// A fresh CA and a `localhost` certificate in a per-process temporary
/// directory (`ca.pem`, `localhost.pem`, `localhost.key`).
pub fn tls_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-fuzz-tls-{}", std::process::id()));
    if !dir.join("localhost.key").exists() {
        let ca = herald::cert::new_ca("herald fuzz CA", 3650).expect("CA");
        ca.save(&dir, true).expect("save CA");
        let leaf = ca.issue("localhost", &[], &[], 3650).expect("certificate");
        leaf.save(&dir, true).expect("save certificate");
    }
    dir
}

/// The TLS target. Byte 0 cuts the rest into the pieces each readiness
/// event finds on the socket ([`piece_len`]); byte 1 is the socket's write
/// budget per event (0: unlimited, else 16-byte steps), so that sends
/// stop short. `herald::fuzzing::server_session` drives herald's
/// `ServerTls` over them (and panics if its buffers' invariants break);
/// then:
///
/// - everything sent is whole TLS records (type 20..=23, version 3.1 or
///   3.3, at most 2^14 + 256 bytes of fragment), none cut off;
/// - a session rustls refused for anything but an alert of the peer's
///   ends with an alert sent (plaintext, type 21; or, once the ServerHello
///   is out, encrypted under the handshake keys: type 23), unless rustls's
///   buffered `ServerConnection` fed the same bytes sends none either
///   (rustls refuses some input silently: a handshake message over its
///   size limit, a record interleaved with a fragmented handshake message);
/// - no plaintext comes out of a handshake the input cannot complete
///   (it never knows the server's random).
pub fn check_tls(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (shape, budget, stream) = (data[0], data[1], &data[2..]);
    let turns: Vec<&[u8]> = stream.chunks(piece_len(shape, stream.len())).collect();
    let budget = if budget == 0 { None } else { Some(usize::from(budget) * 16) };
    let out = herald::fuzzing::server_session(tls_config(), &turns, budget);
    let sent = &out.sent;
    let mut i = 0;
    let mut last = None;
    let mut hello_sent = false;
    while i < sent.len() {
        assert!(i + 5 <= sent.len(), "a record header cut off at {i} of {}", sent.len());
        let (typ, ver, len) =
            (sent[i], [sent[i + 1], sent[i + 2]], u16::from_be_bytes([sent[i + 3], sent[i + 4]]));
        assert!((20..=23).contains(&typ), "record type {typ} at {i}");
        assert!(ver == [3, 3] || ver == [3, 1], "record version {ver:?} at {i}");
        assert!(usize::from(len) <= 16384 + 256, "record of {len} bytes at {i}");
        assert!(i + 5 + usize::from(len) <= sent.len(), "a record cut off at {i} of {}", sent.len());
        hello_sent |= typ == 22;
        last = Some(typ);
        i += 5 + usize::from(len);
    }
    assert_eq!(out.plaintext, 0, "plaintext without a handshake");
    if let Some(e) = &out.error {
        if let Some(re) = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
            // Not every refusal has an alert (e.g. a handshake message
            // over rustls's size limit): where herald sent none, rustls's
            // buffered ServerConnection given the same bytes sends none
            // either (a mismatch would be herald's alert code at fault).
            let alert = last == Some(21) || (hello_sent && last == Some(23));
            if !matches!(re, rustls::Error::AlertReceived(_)) && !alert {
                let (err, sent) = buffered_server(stream);
                assert!(err.is_some(), "refused ({re}); rustls's buffered connection did not refuse");
                assert!(!ends_with_alert(&sent), "refused ({re}) without the alert rustls sends");
            }
        }
    }
}

/// rustls's buffered `ServerConnection` under [`tls_config`] fed `stream`
/// at once: its error, if any, and what it sent.
pub fn buffered_server(stream: &[u8]) -> (Option<rustls::Error>, Vec<u8>) {
    let mut c = rustls::ServerConnection::new(tls_config()).expect("session");
    let mut rd = stream;
    let mut err = None;
    while !rd.is_empty() && err.is_none() {
        match c.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => err = c.process_new_packets().err(),
        }
    }
    let mut sent = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut sent).expect("write to a Vec");
    }
    (err, sent)
}

/// Whether the last whole record in `sent` is an alert (type 21, or 23
/// after a handshake record: encrypted).
fn ends_with_alert(sent: &[u8]) -> bool {
    let (mut i, mut last, mut hello) = (0, None, false);
    while i + 5 <= sent.len() {
        hello |= sent[i] == 22;
        last = Some(sent[i]);
        i += 5 + usize::from(u16::from_be_bytes([sent[i + 3], sent[i + 4]]));
    }
    last == Some(21) || (hello && last == Some(23))
}
