//! Checks `protocol.md` against the codec, so that the specification and the
//! code cannot drift apart (protocol.md §10).
//!
//! - Every `<!-- vector: NAME -->` hex block must be byte-identical to the
//!   sample of that name in `protocol::samples`, and every sample must have
//!   exactly one vector. Each vector must decode on its channel and re-encode
//!   to the same bytes; signed vectors must verify under the sample secret.
//! - The `<!-- hmac-input: … -->` blocks must produce the mesh tags in the
//!   `peer-welcome` and `peer-auth` vectors.
//! - The `<!-- token-vector -->` block must match `token::mint` and verify.
//! - The tables marked `<!-- table: … -->` (frame types, channels, limits,
//!   codes, small enums, flags) must match the codec's constants.
//!
//! Failures name the vector or table row, and for a drifted vector print the
//! hex the code produces, so the spec can be updated from the message.

use std::collections::{BTreeMap, BTreeSet};

use herald::protocol::codes::{AdminOp, Code, GoodbyeAction, PresenceOp, ResumeResult};
use herald::protocol::frame::{self, ty, Channel, PresenceEntry};
use herald::protocol::samples::{self, SAMPLE_SECRET};
use herald::protocol::{decode, limits, sign, token, DecodeError, Decoded};

// ------------------------------------------------------------ reading the spec

/// protocol.md, split into lines.
fn spec_lines() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/protocol.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines().map(str::to_owned).collect()
}

/// Every HTML-comment marker `<!-- TEXT -->` on a line of its own: (TEXT, line index).
fn markers(lines: &[String]) -> Vec<(String, usize)> {
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let l = l.trim();
            let inner = l.strip_prefix("<!--")?.strip_suffix("-->")?;
            Some((inner.trim().to_owned(), i))
        })
        .collect()
}

/// The markers whose text starts with `prefix`, with the rest of the text trimmed.
fn markers_with(lines: &[String], prefix: &str) -> Vec<(String, usize)> {
    markers(lines)
        .into_iter()
        .filter_map(|(m, i)| m.strip_prefix(prefix).map(|rest| (rest.trim().to_owned(), i)))
        .collect()
}

/// The single marker with exactly this text.
fn marker(lines: &[String], text: &str) -> usize {
    let found: Vec<usize> = markers(lines).into_iter().filter(|(m, _)| m == text).map(|(_, i)| i).collect();
    assert_eq!(found.len(), 1, "protocol.md must have exactly one `<!-- {text} -->` marker");
    found[0]
}

/// The body of the fenced block (```lang) that must follow the marker on line `at`.
fn fenced_after(lines: &[String], at: usize, lang: &str, what: &str) -> String {
    let mut i = at + 1;
    while i < lines.len() && lines[i].trim().is_empty() {
        i += 1;
    }
    let open = format!("```{lang}");
    assert!(
        i < lines.len() && lines[i].trim() == open,
        "{what} (protocol.md line {}): the marker must be followed by a ```{lang} block",
        at + 1
    );
    let mut body = Vec::new();
    for l in &lines[i + 1..] {
        if l.trim() == "```" {
            return body.join("\n");
        }
        body.push(l.as_str());
    }
    panic!("{what} (protocol.md line {}): the ```{lang} block is not closed", at + 1);
}

/// The rows of the Markdown table that must follow the marker `<!-- table: NAME -->`,
/// header and separator skipped, each cell trimmed and stripped of backticks.
fn table(lines: &[String], name: &str) -> Vec<Vec<String>> {
    let at = marker(lines, &format!("table: {name}"));
    let rows: Vec<&String> = lines[at + 1..].iter().take_while(|l| l.trim_start().starts_with('|')).collect();
    assert!(rows.len() >= 3, "table `{name}`: expected a header, a separator and at least one row");
    rows[2..]
        .iter()
        .map(|l| {
            let l = l.trim().trim_start_matches('|').trim_end_matches('|');
            l.split('|').map(|c| c.trim().replace('`', "")).collect()
        })
        .collect()
}

/// Hex with `#` comments and whitespace removed.
fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("`{c}` is not a hex digit"));
    }
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_num(s: &str, what: &str) -> u64 {
    let t = s.replace(['_', ','], "");
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.unwrap_or_else(|_| panic!("{what}: `{s}` is not a number"))
}

/// Every `vector:` block: name → bytes. Panics on duplicates or bad hex.
fn vectors(lines: &[String]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (name, at) in markers_with(lines, "vector:") {
        let what = format!("vector `{name}`");
        let body = fenced_after(lines, at, "hex", &what);
        let bytes = parse_hex(&body).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(out.insert(name.clone(), bytes).is_none(), "vector `{name}` appears more than once");
    }
    out
}

// ------------------------------------------------------------------- vectors

#[test]
fn every_sample_has_exactly_one_vector_and_no_vector_is_unknown() {
    let lines = spec_lines();
    let in_spec: BTreeSet<String> = vectors(&lines).into_keys().collect();
    let in_code: BTreeSet<String> = samples::all().iter().map(|s| s.name.to_owned()).collect();
    assert_eq!(in_code.len(), samples::all().len(), "sample names must be unique");
    let missing: Vec<_> = in_code.difference(&in_spec).collect();
    let unknown: Vec<_> = in_spec.difference(&in_code).collect();
    assert!(missing.is_empty(), "samples without a vector in protocol.md §10: {missing:?}");
    assert!(unknown.is_empty(), "vectors in protocol.md naming no sample: {unknown:?}");
}

#[test]
fn vectors_equal_the_samples_and_round_trip_on_their_channel() {
    let lines = spec_lines();
    let vecs = vectors(&lines);
    for s in samples::all() {
        let Some(v) = vecs.get(s.name) else { continue };
        assert!(
            *v == s.bytes,
            "vector `{}` differs from the codec.\n spec: {}\n code: {}",
            s.name,
            hex(v),
            hex(&s.bytes)
        );
        match decode(v, s.channel) {
            Ok(Decoded::Frame(f, n)) => {
                assert_eq!(n, v.len(), "vector `{}`: decoded length", s.name);
                assert_eq!(f.frame_type(), v[4], "vector `{}`: frame type", s.name);
                let mut again = Vec::new();
                f.encode_signed(&mut again, SAMPLE_SECRET);
                assert!(
                    again == *v,
                    "vector `{}` does not re-encode to itself.\n spec:      {}\n re-encode: {}",
                    s.name,
                    hex(v),
                    hex(&again)
                );
            }
            other => panic!("vector `{}` does not decode on {:?}: {other:?}", s.name, s.channel),
        }
    }
}

#[test]
fn signed_vectors_verify_under_the_sample_secret() {
    let lines = spec_lines();
    let mut seen = BTreeSet::new();
    for (name, v) in vectors(&lines) {
        if v.len() > 4 && (v[4] == ty::ADMIN || v[4] == ty::HEARTBEAT) {
            assert!(sign::verify_frame(&v, SAMPLE_SECRET), "vector `{name}`: tag does not verify");
            assert!(!sign::verify_frame(&v, b"not-the-secret"), "vector `{name}`: verifies under any key");
            // §2.5: the tag is HMAC over the type byte up to the tag.
            let tag = sign::hmac(SAMPLE_SECRET, &[&v[4..v.len() - 32]]);
            assert_eq!(tag[..], v[v.len() - 32..], "vector `{name}`: tag is not over bytes 4..len-32");
            seen.insert(v[4]);
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from([ty::ADMIN, ty::HEARTBEAT]),
        "expected signed ADMIN and HEARTBEAT vectors"
    );
}

#[test]
fn heartbeat_vector_is_one_whole_datagram() {
    let lines = spec_lines();
    let v = &vectors(&lines)["heartbeat"];
    let len = u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as usize;
    assert_eq!(v.len(), 4 + len, "vector `heartbeat`: datagram size must be 4 + length (§8)");
    assert!(len as u32 <= limits::MAX_HEARTBEAT);
}

#[test]
fn mesh_tag_inputs_produce_the_vector_tags() {
    let lines = spec_lines();
    let vecs = vectors(&lines);
    let inputs: BTreeMap<String, Vec<u8>> = markers_with(&lines, "hmac-input:")
        .into_iter()
        .map(|(name, at)| {
            let what = format!("hmac-input `{name}`");
            let body = fenced_after(&lines, at, "hex", &what);
            (name, parse_hex(&body).unwrap_or_else(|e| panic!("{what}: {e}")))
        })
        .collect();
    let tag_of = |vector: &str| -> Vec<u8> {
        let v = &vecs[vector];
        v[v.len() - 32..].to_vec()
    };
    for (input, vector, label) in [
        ("peer-acceptor", "peer-welcome", &b"herald peer acceptor v1"[..]),
        ("peer-initiator", "peer-auth", &b"herald peer initiator v1"[..]),
    ] {
        let data =
            inputs.get(input).unwrap_or_else(|| panic!("missing `<!-- hmac-input: {input} -->` block"));
        assert!(data.starts_with(label), "hmac-input `{input}` must start with the label {label:?}");
        let tag = sign::hmac(SAMPLE_SECRET, &[data]);
        assert_eq!(tag.to_vec(), tag_of(vector), "hmac-input `{input}` does not give the tag of `{vector}`");
    }
    // And both agree with the codec's own tag functions (§6.2, §6.3).
    let (ni, na) = ([0x11u8; 16], [0x22u8; 16]);
    assert_eq!(
        sign::peer_acceptor_tag(SAMPLE_SECRET, &ni, &na, b"n1", b"n2").to_vec(),
        tag_of("peer-welcome")
    );
    assert_eq!(sign::peer_initiator_tag(SAMPLE_SECRET, &ni, &na, b"n1", b"n2").to_vec(), tag_of("peer-auth"));
}

#[test]
fn token_vector_matches_mint_and_verifies() {
    let lines = spec_lines();
    let at = marker(&lines, "token-vector");
    let body = fenced_after(&lines, at, "text", "token-vector");
    let fields: BTreeMap<&str, &str> = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, v) =
                l.split_once(':').unwrap_or_else(|| panic!("token-vector: `{l}` is not `key: value`"));
            (k.trim(), v.trim())
        })
        .collect();
    let get = |k: &str| *fields.get(k).unwrap_or_else(|| panic!("token-vector: missing `{k}`"));
    let (secret, user, tok, signed) = (get("secret"), get("user"), get("token"), get("signed"));
    let expiry: u64 = get("expiry").parse().expect("token-vector: expiry is a number");
    assert_eq!(secret.as_bytes(), SAMPLE_SECRET, "token-vector: secret should be the sample secret");

    let minted = token::mint(secret.as_bytes(), user.as_bytes(), expiry).expect("valid user");
    assert_eq!(tok, minted, "token-vector: token differs from token::mint");
    let (signed_part, tag) = tok.rsplit_once('.').expect("token has a tag");
    assert_eq!(signed_part, signed, "token-vector: `signed` is not the token before its last '.'");
    assert_eq!(tag, hex(&sign::hmac(secret.as_bytes(), &[signed.as_bytes()])), "token-vector: tag");

    let claims =
        token::verify(tok.as_bytes(), secret.as_bytes(), expiry - 1).expect("verifies before expiry");
    assert_eq!(claims.user, user.as_bytes());
    assert_eq!(claims.expires, expiry);
    assert_eq!(token::verify(tok.as_bytes(), secret.as_bytes(), expiry), Err(token::TokenError::Expired));
    assert_eq!(token::verify(tok.as_bytes(), b"other-secret-16b", 0), Err(token::TokenError::BadSignature));
}

// -------------------------------------------------------------------- tables

/// Every frame type of version 1, by its name in protocol.md.
const TYPES: &[(&str, u8)] = &[
    ("HELLO", ty::HELLO),
    ("PING", ty::PING),
    ("PONG", ty::PONG),
    ("PUB_HELLO", ty::PUB_HELLO),
    ("PUBLISH", ty::PUBLISH),
    ("PUBLISH_BATCH", ty::PUBLISH_BATCH),
    ("PEER_HELLO", ty::PEER_HELLO),
    ("PEER_AUTH", ty::PEER_AUTH),
    ("PRESENCE", ty::PRESENCE),
    ("FORWARD", ty::FORWARD),
    ("ASSIGN_REQUEST", ty::ASSIGN_REQUEST),
    ("NODES_REQUEST", ty::NODES_REQUEST),
    ("ADMIN", ty::ADMIN),
    ("HEARTBEAT", ty::HEARTBEAT),
    ("WELCOME", ty::WELCOME),
    ("DELIVER", ty::DELIVER),
    ("CONFLATED", ty::CONFLATED),
    ("GOODBYE", ty::GOODBYE),
    ("PUB_WELCOME", ty::PUB_WELCOME),
    ("PUB_RESULT", ty::PUB_RESULT),
    ("PEER_WELCOME", ty::PEER_WELCOME),
    ("ASSIGNMENT", ty::ASSIGNMENT),
    ("NO_CAPACITY", ty::NO_CAPACITY),
    ("NODES", ty::NODES),
    ("ADMIN_RESULT", ty::ADMIN_RESULT),
    ("ADMIN_STATUS", ty::ADMIN_STATUS),
    ("ERROR", ty::ERROR),
];

const CHANNELS: &[(&str, Channel)] = &[
    ("ToNode", Channel::ToNode),
    ("ToClient", Channel::ToClient),
    ("Ingest", Channel::Ingest),
    ("FromIngest", Channel::FromIngest),
    ("ToDecision", Channel::ToDecision),
    ("FromDecision", Channel::FromDecision),
    ("Heartbeat", Channel::Heartbeat),
];

fn type_byte(name: &str, what: &str) -> u8 {
    TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap_or_else(|| panic!("{what}: no frame `{name}`"))
}

fn channel(name: &str, what: &str) -> Channel {
    CHANNELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
        .unwrap_or_else(|| panic!("{what}: no channel `{name}`"))
}

fn list(cell: &str) -> BTreeSet<String> {
    cell.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

/// `AskDecision` → `ASK_DECISION`.
fn screaming(debug: &str) -> String {
    let mut s = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
    }
    s
}

#[test]
fn frame_type_table_matches_the_codec() {
    let lines = spec_lines();
    let known: BTreeSet<u8> = (0..=255u8)
        .filter(|&t| decode(&[0, 0, 0, 1, t], Channel::ToNode) != Err(DecodeError::UnknownType(t)))
        .collect();
    let in_code: BTreeSet<u8> = TYPES.iter().map(|(_, t)| *t).collect();
    assert_eq!(in_code, known, "the test's TYPES list is out of date with the codec");

    let mut in_spec = BTreeSet::new();
    for row in table(&lines, "frame-types") {
        let what = format!("frame-types row {row:?}");
        let t = parse_num(&row[0], &what) as u8;
        assert_eq!(type_byte(&row[1], &what), t, "{what}: wrong type byte for {}", row[1]);
        assert!(in_spec.insert(t), "{what}: type listed twice");
        let listed: BTreeSet<String> = list(&row[3]);
        let allowed: BTreeSet<String> =
            CHANNELS.iter().filter(|(_, c)| c.allows(t)).map(|(n, _)| (*n).to_owned()).collect();
        assert_eq!(listed, allowed, "{what}: channels");
    }
    assert_eq!(in_spec, known, "protocol.md §2.3 must list exactly the codec's frame types");
}

#[test]
fn channel_table_matches_the_codec() {
    let lines = spec_lines();
    let rows = table(&lines, "channels");
    assert_eq!(rows.len(), CHANNELS.len(), "protocol.md §2.2 must list every channel once");
    for row in rows {
        let what = format!("channels row `{}`", row[0]);
        let ch = channel(&row[0], &what);
        assert_eq!(parse_num(&row[2], &what), u64::from(ch.max_len()), "{what}: max length");
        let listed: BTreeSet<u8> = list(&row[3]).iter().map(|n| type_byte(n, &what)).collect();
        for t in 0..=255u8 {
            assert_eq!(listed.contains(&t), ch.allows(t), "{what}: type 0x{t:02x}");
        }
    }
}

#[test]
fn max_lengths_table_matches_the_codec() {
    let lines = spec_lines();
    let mut listed = BTreeSet::new();
    for row in table(&lines, "max-lengths") {
        let what = format!("max-lengths row `{}`", row[0]);
        let t = type_byte(&row[0], &what);
        assert_eq!(
            herald::protocol::frame::max_frame_len(t),
            Some(parse_num(&row[1], &what) as u32),
            "{what}"
        );
        assert!(listed.insert(t), "{what}: listed twice");
    }
    let bounded: BTreeSet<u8> =
        (0..=255u8).filter(|&t| herald::protocol::frame::max_frame_len(t).is_some()).collect();
    assert_eq!(listed, bounded, "protocol.md §2.4 must list exactly the codec's bounded types");
}

#[test]
fn limits_table_matches_the_codec() {
    let lines = spec_lines();
    let expected: &[(&str, u64)] = &[
        ("MAX_USER_LEN", limits::MAX_USER_LEN as u64),
        ("MAX_KEY_LEN", limits::MAX_KEY_LEN as u64),
        ("MAX_NODE_ID_LEN", limits::MAX_NODE_ID_LEN as u64),
        ("MAX_ENDPOINT_LEN", limits::MAX_ENDPOINT_LEN as u64),
        ("MAX_TOKEN_LEN", limits::MAX_TOKEN_LEN as u64),
        ("MAX_AGENT_LEN", limits::MAX_AGENT_LEN as u64),
        ("MAX_PAYLOAD", limits::MAX_PAYLOAD as u64),
        ("MAX_ERROR_MESSAGE_LEN", limits::MAX_ERROR_MESSAGE_LEN as u64),
        ("MAX_ADMIN_MESSAGE_LEN", limits::MAX_ADMIN_MESSAGE_LEN as u64),
        ("MAX_BATCH", limits::MAX_BATCH as u64),
        ("MAX_ASSIGN_RESULTS", u64::from(limits::MAX_ASSIGN_RESULTS)),
    ];
    let rows = table(&lines, "limits");
    let got: BTreeMap<String, u64> =
        rows.iter().map(|r| (r[0].clone(), parse_num(&r[1], &format!("limits row `{}`", r[0])))).collect();
    assert_eq!(got.len(), rows.len(), "limits listed twice");
    let want: BTreeMap<String, u64> = expected.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect();
    assert_eq!(got, want, "protocol.md §2.2 field limits");
}

#[test]
fn code_table_matches_the_codec() {
    let lines = spec_lines();
    let known: BTreeSet<u16> =
        (0..=u16::MAX).filter(|&n| !matches!(Code::from_u16(n), Code::Other(_))).collect();
    let mut listed = BTreeSet::new();
    for row in table(&lines, "codes") {
        let what = format!("codes row {row:?}");
        let n = parse_num(&row[0], &what) as u16;
        assert_eq!(Code::from_u16(n).name().to_ascii_uppercase(), row[1], "{what}: name");
        assert!(listed.insert(n), "{what}: listed twice");
    }
    assert_eq!(listed, known, "protocol.md §4.1 must list exactly the codec's codes");
}

/// Checks a `value | NAME | …` table against a `from_u8` and the variant names.
fn check_enum_table<T: std::fmt::Debug>(name: &str, from_u8: impl Fn(u8) -> Option<T>) {
    let lines = spec_lines();
    let mut listed = BTreeSet::new();
    for row in table(&lines, name) {
        let what = format!("{name} row {row:?}");
        let n = parse_num(&row[0], &what) as u8;
        let v = from_u8(n).unwrap_or_else(|| panic!("{what}: value {n} is not defined in the codec"));
        assert_eq!(screaming(&format!("{v:?}")), row[1], "{what}: name");
        assert!(listed.insert(n), "{what}: listed twice");
    }
    let known: BTreeSet<u8> = (0..=255u8).filter(|&n| from_u8(n).is_some()).collect();
    assert_eq!(listed, known, "table `{name}` must list exactly the codec's values");
}

#[test]
fn small_enum_tables_match_the_codec() {
    check_enum_table("resume-results", ResumeResult::from_u8);
    check_enum_table("goodbye-actions", GoodbyeAction::from_u8);
    check_enum_table("admin-ops", AdminOp::from_u8);
    check_enum_table("presence-ops", |n| {
        // PresenceOp has no from_u8; its wire value is the entry's first byte.
        [PresenceOp::Offline, PresenceOp::Online]
            .into_iter()
            .find(|&op| frame::encode_entries(&[PresenceEntry { op, user: b"u" }])[0] == n)
    });
}

#[test]
fn flags_table_matches_the_codec() {
    let lines = spec_lines();
    let expected: &[(&str, &str, u8)] = &[
        ("HELLO", "RESUME", frame::HELLO_RESUME),
        ("PUBLISH", "WANT_RESULT", frame::PUBLISH_WANT_RESULT),
        ("PUBLISH_BATCH", "WANT_RESULT", frame::PUBLISH_WANT_RESULT),
        ("PRESENCE", "SNAPSHOT_BEGIN", frame::PRESENCE_SNAPSHOT_BEGIN),
        ("PRESENCE", "SNAPSHOT_END", frame::PRESENCE_SNAPSHOT_END),
        ("NODES entry", "DRAINING", frame::NODE_DRAINING),
        ("NODES entry", "DRAINED", frame::NODE_DRAINED),
        ("ADMIN_STATUS entry", "DRAINING", frame::NODE_DRAINING),
        ("HEARTBEAT", "DRAINING", frame::NODE_DRAINING),
    ];
    let want: BTreeSet<(String, String, u8)> =
        expected.iter().map(|(f, n, v)| ((*f).to_owned(), (*n).to_owned(), *v)).collect();
    let got: BTreeSet<(String, String, u8)> = table(&lines, "flags")
        .into_iter()
        .map(|r| {
            let v = parse_num(&r[1], &format!("flags row {r:?}")) as u8;
            (r[0].clone(), r[2].clone(), v)
        })
        .collect();
    assert_eq!(got, want, "protocol.md §1 flags table");
}

// ---------------------------------------------------------------- rejections

/// The `<!-- reject-vectors -->` of §10.6 against the codec: each string,
/// decoded on its state's channel with the types the state allows (§3, §5),
/// fails with its code; the two that pass the decoder are a PEER_HELLO,
/// refused by version negotiation (UNSUPPORTED_VERSION) or, on a node
/// without a cluster secret, AUTH_FAILED (§6.1).
#[test]
fn reject_vectors_fail_with_their_codes() {
    let lines = spec_lines();
    let at = marker(&lines, "reject-vectors");
    let body = fenced_after(&lines, at, "text", "reject-vectors");
    let mut n = 0;
    for l in body.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let (channel, allowed): (Channel, &[u8]) = match cols[0] {
            "client-handshake" => (Channel::ToNode, &[ty::HELLO, ty::ERROR]),
            "client-established" => (Channel::ToNode, &[ty::PING, ty::PONG, ty::ERROR]),
            "ingest-handshake" => (Channel::Ingest, &[ty::PUB_HELLO, ty::PEER_HELLO, ty::ERROR]),
            "publisher-established" => {
                (Channel::Ingest, &[ty::PUBLISH, ty::PUBLISH_BATCH, ty::PING, ty::PONG, ty::ERROR])
            }
            other => panic!("reject-vectors: unknown state `{other}`"),
        };
        let code = *cols.last().unwrap();
        let bytes = parse_hex(&cols[1..cols.len() - 1].concat()).unwrap_or_else(|e| panic!("`{l}`: {e}"));
        match frame::decode_in(&bytes, channel, |t| allowed.contains(&t)) {
            Err(e) => assert_eq!(screaming(&format!("{:?}", e.code())), code, "`{l}`: {e}"),
            Ok(Decoded::Frame(frame::Frame::PeerHello(h), used)) => {
                assert_eq!(used, bytes.len(), "`{l}`: the string is one frame");
                let want = if frame::negotiate(h.min_version, h.max_version).is_none() {
                    "UNSUPPORTED_VERSION"
                } else {
                    "AUTH_FAILED"
                };
                assert_eq!(code, want, "`{l}`");
            }
            other => panic!("`{l}`: expected {code}, the codec says {other:?}"),
        }
        n += 1;
    }
    assert!(n >= 10, "reject-vectors: expected the §10.6 list, found {n} lines");
}
