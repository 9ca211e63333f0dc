//! Codec tests: round trips, byte-at-a-time feeding, every split point,
//! malformed inputs with their exact errors, and random mutation.

use super::frame::*;
use super::samples::{self, SAMPLE_SECRET};
use super::*;

fn decode_all(buf: &[u8], ch: Channel) -> Result<Vec<Vec<u8>>, DecodeError> {
    // Returns each frame re-encoded, so frames can be compared by value.
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match decode(&buf[at..], ch)? {
            Decoded::Frame(f, n) => {
                let mut v = Vec::new();
                f.encode_signed(&mut v, SAMPLE_SECRET);
                out.push(v);
                at += n;
            }
            Decoded::Incomplete(_) => break,
        }
    }
    Ok(out)
}

#[test]
fn every_frame_type_has_a_sample() {
    let mut types: Vec<u8> = samples::all().iter().map(|s| s.bytes[4]).collect();
    types.sort();
    types.dedup();
    let all: Vec<u8> = (0..=255u8)
        .filter(|&t| decode(&[0, 0, 0, 1, t], Channel::ToNode) != Err(DecodeError::UnknownType(t)))
        .collect();
    assert_eq!(types, all, "every known type needs a sample (and a vector in protocol.md)");
    assert_eq!(all.len(), 27);
}

#[test]
fn round_trip_every_sample() {
    for s in samples::all() {
        match decode(&s.bytes, s.channel) {
            Ok(Decoded::Frame(f, n)) => {
                assert_eq!(n, s.bytes.len(), "{}", s.name);
                assert_eq!(f.frame_type(), s.bytes[4], "{}", s.name);
                let mut again = Vec::new();
                f.encode_signed(&mut again, SAMPLE_SECRET);
                assert_eq!(again, s.bytes, "{} re-encodes to the same bytes", s.name);
            }
            other => panic!("{}: {other:?}", s.name),
        }
    }
}

#[test]
fn each_sample_is_only_accepted_on_its_channels() {
    let channels = [
        Channel::ToNode,
        Channel::ToClient,
        Channel::Ingest,
        Channel::FromIngest,
        Channel::ToDecision,
        Channel::FromDecision,
        Channel::Heartbeat,
    ];
    for s in samples::all() {
        for ch in channels {
            let r = decode(&s.bytes, ch);
            if ch.allows(s.bytes[4]) {
                assert!(matches!(r, Ok(Decoded::Frame(..))), "{} on {ch:?}: {r:?}", s.name);
            } else {
                assert!(
                    matches!(
                        r,
                        Err(DecodeError::UnexpectedType { .. }) | Err(DecodeError::FrameTooLarge { .. })
                    ),
                    "{} on {ch:?}: {r:?}",
                    s.name
                );
            }
        }
    }
}

#[test]
fn split_at_every_boundary() {
    for s in samples::all() {
        for k in 0..s.bytes.len() {
            match decode(&s.bytes[..k], s.channel) {
                Ok(Decoded::Incomplete(need)) => {
                    assert!(need > k && need <= s.bytes.len(), "{} at {k}: need {need}", s.name)
                }
                other => panic!("{} cut at {k}: {other:?}", s.name),
            }
            // The two halves delivered as separate reads into one buffer.
            let mut buf = s.bytes[..k].to_vec();
            buf.extend_from_slice(&s.bytes[k..]);
            assert!(matches!(decode(&buf, s.channel), Ok(Decoded::Frame(_, n)) if n == s.bytes.len()));
        }
    }
}

#[test]
fn byte_at_a_time_stream_per_channel() {
    let all = samples::all();
    for ch in [Channel::ToNode, Channel::ToClient, Channel::Ingest, Channel::FromIngest] {
        let stream: Vec<&samples::Sample> = all.iter().filter(|s| ch.allows(s.bytes[4])).collect();
        let wire: Vec<u8> = stream.iter().flat_map(|s| s.bytes.clone()).collect();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for &b in &wire {
            buf.push(b);
            while let Ok(Decoded::Frame(f, n)) = decode(&buf, ch) {
                let mut v = Vec::new();
                f.encode_signed(&mut v, SAMPLE_SECRET);
                got.push(v);
                buf.drain(..n);
            }
        }
        assert!(buf.is_empty());
        let want: Vec<Vec<u8>> = stream.iter().map(|s| s.bytes.clone()).collect();
        assert_eq!(got, want, "{ch:?}");
        assert_eq!(decode_all(&wire, ch).unwrap(), want);
    }
}

fn hx(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A frame from its type and body in hex; the length prefix is computed.
fn fr(s: &str) -> Vec<u8> {
    let body = hx(s);
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

#[test]
fn malformed_inputs_give_the_expected_error() {
    use DecodeError::*;
    let mut big_publish = Vec::new();
    encode_publish(&mut big_publish, 0, 1, b"alice", b"", &vec![0u8; limits::MAX_PAYLOAD + 1]);
    let mut long_user = Vec::new();
    encode_publish(&mut long_user, 0, 1, &[b'u'; 65], b"", b"x");
    let cases: Vec<(&str, Vec<u8>, Channel, DecodeError)> = vec![
        ("zero length", hx("00000000"), Channel::ToNode, EmptyFrame),
        ("over the client limit", hx("00000801"), Channel::ToNode, FrameTooLarge { len: 2049, max: 2048 }),
        ("4 GiB declared", hx("ffffffff"), Channel::Ingest, FrameTooLarge { len: u32::MAX, max: 1 << 20 }),
        (
            "http on the port",
            b"GET / HTTP/1.1\r\n".to_vec(),
            Channel::ToNode,
            FrameTooLarge { len: 0x47455420, max: 2048 },
        ),
        ("unknown type", fr("7e"), Channel::ToNode, UnknownType(0x7e)),
        (
            "deliver sent to a node",
            fr("82"),
            Channel::ToNode,
            UnexpectedType { ty: 0x82, channel: Channel::ToNode },
        ),
        (
            "publish on the client port",
            fr("11"),
            Channel::ToNode,
            UnexpectedType { ty: 0x11, channel: Channel::ToNode },
        ),
        ("bad magic", fr("01 48524c45 01 01 00 0001 41 00"), Channel::ToNode, BadMagic(0x48524c45)),
        ("ping body short", fr("02 00000000"), Channel::ToNode, Truncated { field: "nonce" }),
        // Longer than any PING can be: refused from the header.
        (
            "ping body long",
            fr("02 0000000000000000 00"),
            Channel::ToNode,
            LongerThanType { ty: 2, len: 10, max: 9 },
        ),
        // Within the largest ERROR, but more than its fields hold.
        ("error body long", fr("ff 0001 0000 00"), Channel::ToNode, TrailingBytes { extra: 1 }),
        (
            "empty token",
            fr("01 48524c44 01 01 00 0000 00 0000000000000000 0000000000000000"),
            Channel::ToNode,
            BadLength { field: "token", len: 0 },
        ),
        (
            "hello cut in resume",
            fr("01 48524c44 01 01 00 0001 41 00 00000000"),
            Channel::ToNode,
            Truncated { field: "resume_epoch" },
        ),
        (
            "welcome resume 9",
            fr("81 01 09 00002710 0000000000000007 1122334455667788 000000000000002a 01 41"),
            Channel::ToClient,
            BadValue { field: "resume", value: 9 },
        ),
        (
            "goodbye action 7",
            fr("84 000d 07 00000000 00"),
            Channel::ToClient,
            BadValue { field: "action", value: 7 },
        ),
        ("user id of 65 bytes", long_user, Channel::Ingest, BadLength { field: "user", len: 65 }),
        (
            "payload over 64 KiB",
            big_publish,
            Channel::Ingest,
            BadLength { field: "payload", len: limits::MAX_PAYLOAD + 1 },
        ),
        (
            "empty user id",
            fr("11 00 00000001 00 00 41"),
            Channel::Ingest,
            BadLength { field: "user", len: 0 },
        ),
        ("batch of 0", fr("12 00 00000001 0000"), Channel::Ingest, BadLength { field: "entries", len: 0 }),
        (
            "batch count over the entries",
            fr("12 00 00000001 0002 01 41 00 00000000"),
            Channel::Ingest,
            Truncated { field: "user" },
        ),
        (
            "batch payload length lies",
            fr("12 00 00000001 0001 01 41 00 00000009"),
            Channel::Ingest,
            Truncated { field: "payload" },
        ),
        ("presence op 5", fr("22 00 00000001 05 01 41"), Channel::Ingest, BadValue { field: "op", value: 5 }),
        (
            "assign asks for 0",
            fr("30 48524c44 01 00 00"),
            Channel::ToDecision,
            BadValue { field: "max_results", value: 0 },
        ),
        (
            "assign asks for 9",
            fr("30 48524c44 01 00 09"),
            Channel::ToDecision,
            BadValue { field: "max_results", value: 9 },
        ),
        (
            "admin op 0",
            fr("32 48524c44 01 0000000000000000 0000000000000000 00 00 00000000"),
            Channel::ToDecision,
            BadValue { field: "op", value: 0 },
        ),
        (
            "heartbeat without tag",
            {
                let mut v = samples::all().into_iter().find(|s| s.name == "heartbeat").unwrap().bytes;
                v.truncate(v.len() - 32);
                let n = (v.len() - 4) as u32;
                v[..4].copy_from_slice(&n.to_be_bytes());
                v
            },
            Channel::Heartbeat,
            Truncated { field: "tag" },
        ),
        (
            "heartbeat on tcp",
            fr("40"),
            Channel::ToDecision,
            UnexpectedType { ty: 0x40, channel: Channel::ToDecision },
        ),
    ];
    for (name, bytes, ch, want) in cases {
        assert_eq!(decode(&bytes, ch), Err(want), "{name}");
        // Every error maps onto a wire code, and the mapping is stable.
        assert_ne!(want.code().to_u16(), 0, "{name}");
    }
}

#[test]
fn oversized_length_is_rejected_from_the_first_four_bytes() {
    for ch in [Channel::ToNode, Channel::ToClient, Channel::Ingest, Channel::ToDecision, Channel::Heartbeat] {
        let over = ch.max_len() + 1;
        let head = over.to_be_bytes();
        let r = decode(&head, ch);
        assert_eq!(r, Err(DecodeError::FrameTooLarge { len: over, max: ch.max_len() }));
        // At the limit the decoder asks for exactly that many bytes, no more:
        // the channel's limit, or for a bounded type its own (smaller) one.
        for s in samples::all().into_iter().filter(|s| s.channel == ch) {
            let t = s.bytes[4];
            let limit = max_frame_len(t).unwrap_or(ch.max_len());
            let mut at = limit.to_be_bytes().to_vec();
            at.push(t);
            assert_eq!(decode(&at, ch), Ok(Decoded::Incomplete(4 + limit as usize)), "{}", s.name);
        }
    }
}

#[test]
fn signed_frames_verify_only_with_the_key() {
    for name in ["admin", "heartbeat"] {
        let s = samples::all().into_iter().find(|s| s.name == name).unwrap();
        assert!(sign::verify_frame(&s.bytes, SAMPLE_SECRET), "{name}");
        assert!(!sign::verify_frame(&s.bytes, b"wrong"), "{name}");
        for i in 4..s.bytes.len() {
            let mut m = s.bytes.clone();
            m[i] ^= 1;
            assert!(!sign::verify_frame(&m, SAMPLE_SECRET), "{name} flip at {i}");
        }
    }
}

#[test]
fn deliver_fast_path_matches_generic_encoder() {
    let p = samples::payload_100();
    let mut a = Vec::new();
    encode_deliver(&mut a, 1, 2, &p);
    let b = Frame::Deliver(Deliver { epoch: 1, seq: 2, payload: &p }).to_vec();
    assert_eq!(a, b);
    assert_eq!(a.len(), deliver_len(100));
    let mut c = Vec::new();
    encode_publish(&mut c, 1, 9, b"alice", b"", b"hi");
    assert_eq!(c, samples::all().into_iter().find(|s| s.name == "publish").unwrap().bytes);
    let mut d = Vec::new();
    encode_forward(&mut d, b"alice", b"", b"", b"hi");
    assert_eq!(d, samples::all().into_iter().find(|s| s.name == "forward").unwrap().bytes);
}

#[test]
fn batch_writer_builds_the_sample_and_respects_limits() {
    let mut v = Vec::new();
    let mut w = BatchWriter::start(&mut v, 0, 10);
    assert!(w.push(&mut v, b"alice", b"", b"hi"));
    assert!(w.push(&mut v, b"bob", b"EURUSD", b"yo"));
    w.finish(&mut v);
    assert_eq!(v, samples::all().into_iter().find(|s| s.name == "publish-batch").unwrap().bytes);

    let mut v = Vec::new();
    let mut w = BatchWriter::start(&mut v, 0, 1);
    let mut n = 0;
    while w.push(&mut v, b"u", b"", &[0u8; 10]) {
        n += 1;
    }
    assert_eq!(n, limits::MAX_BATCH);
    w.finish(&mut v);
    assert!(
        matches!(decode(&v, Channel::Ingest), Ok(Decoded::Frame(Frame::PublishBatch(b), _)) if b.entries.len() == limits::MAX_BATCH)
    );

    let mut v = Vec::new();
    let mut w = BatchWriter::start(&mut v, 0, 1);
    let big = vec![0u8; limits::MAX_PAYLOAD];
    let mut n = 0;
    while w.push(&mut v, b"u", b"", &big) {
        n += 1;
    }
    assert_eq!(n, 15, "1 MiB holds 15 full payloads");
    w.finish(&mut v);
    assert!(v.len() - 4 <= limits::MAX_INGEST as usize);
    assert!(matches!(decode(&v, Channel::Ingest), Ok(Decoded::Frame(..))));
}

#[test]
fn version_negotiation() {
    assert_eq!(negotiate(1, 1), Some(1));
    assert_eq!(negotiate(1, 2), Some(2));
    assert_eq!(negotiate(1, 9), Some(2));
    assert_eq!(negotiate(2, 2), Some(2));
    assert_eq!(negotiate(0, 1), Some(1));
    assert_eq!(negotiate(3, 4), None);
    assert_eq!(negotiate(2, 1), None);
    assert_eq!(negotiate(0, 0), None);
}

/// Small deterministic PRNG so the test needs no extra crate.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_mutations_never_panic_and_decoded_frames_are_stable() {
    let all = samples::all();
    let channels = [
        Channel::ToNode,
        Channel::ToClient,
        Channel::Ingest,
        Channel::FromIngest,
        Channel::ToDecision,
        Channel::FromDecision,
        Channel::Heartbeat,
    ];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200_000 {
        let s = &all[(rng.next() % all.len() as u64) as usize];
        let mut b = s.bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() % b.len() as u64) as usize;
            match rng.next() % 3 {
                0 => b[i] ^= 1 << (rng.next() % 8),
                1 => b[i] = rng.next() as u8,
                _ => b.truncate(i.max(1)),
            }
        }
        let ch = channels[(rng.next() % channels.len() as u64) as usize];
        if let Ok(Decoded::Frame(f, n)) = decode(&b, ch) {
            assert!(n <= b.len());
            let again = f.to_vec();
            match decode(&again, ch) {
                Ok(Decoded::Frame(g, m)) => {
                    assert_eq!(m, again.len());
                    assert_eq!(f, g);
                }
                other => panic!("re-encoding {f:?} gave {other:?}"),
            }
        }
    }
}

/// Every bounded type's largest frame (each field at its limit) is exactly
/// `max_frame_len` long and decodes; one byte more is refused from the header.
#[test]
fn max_frame_len_is_the_largest_valid_frame_of_each_bounded_type() {
    use crate::protocol::limits::*;
    let token = vec![b't'; MAX_TOKEN_LEN];
    let agent = vec![b'a'; MAX_AGENT_LEN];
    let id = vec![b'n'; MAX_NODE_ID_LEN];
    let target = vec![b'e'; MAX_ENDPOINT_LEN];
    let message = vec![b'm'; MAX_ERROR_MESSAGE_LEN];
    let key = [b'k'; MAX_KEY_LEN];
    let keys = encode_entries(&vec![KeyEntry(&key); MAX_CONFLATED_KEYS]);
    let largest = [
        (
            Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
                token: &token,
                agent: &agent,
                resume: Some(Position { epoch: 1, seq: 2 }),
            }),
            Channel::ToNode,
        ),
        (Frame::Ping(1), Channel::ToNode),
        (Frame::Pong(1), Channel::ToNode),
        (
            Frame::Welcome(Welcome {
                version: 1,
                resume: ResumeResult::Fresh,
                heartbeat_ms: 1000,
                session_id: 1,
                epoch: 1,
                next_seq: 1,
                node_id: &id,
            }),
            Channel::ToClient,
        ),
        (
            Frame::Conflated(Conflated {
                epoch: 1,
                first_seq: 1,
                last_seq: 2,
                keys: List::from_encoded(MAX_CONFLATED_KEYS, &keys).unwrap(),
            }),
            Channel::ToClient,
        ),
        (
            Frame::Goodbye(Goodbye {
                reason: Code::Draining,
                action: GoodbyeAction::GoToNode,
                delay_ms: 0,
                target: &target,
            }),
            Channel::ToClient,
        ),
        (Frame::Error(ErrorFrame { code: Code::Internal, message: &message }), Channel::ToClient),
        (
            Frame::PubHello(PubHello { min_version: 1, max_version: 1, credential: &token, agent: &agent }),
            Channel::Ingest,
        ),
        (Frame::PubWelcome(PubWelcome { version: 1, max_frame: 1, node_id: &id }), Channel::FromIngest),
        (
            Frame::PubResult(PubResult { request_id: 1, accepted: 1, local: 1, forwarded: 0, no_route: 0 }),
            Channel::FromIngest,
        ),
        (
            Frame::PeerHello(PeerHello {
                min_version: 1,
                max_version: 1,
                node_id: &id,
                incarnation: 1,
                nonce: [1; 16],
            }),
            Channel::Ingest,
        ),
        (
            Frame::PeerWelcome(PeerWelcome {
                version: 1,
                node_id: &id,
                incarnation: 1,
                nonce: [1; 16],
                tag: [2; 32],
            }),
            Channel::FromIngest,
        ),
        (Frame::PeerAuth(PeerAuth { tag: [2; 32] }), Channel::Ingest),
    ];
    let mut bounded = 0;
    for (frame, channel) in largest {
        let t = frame.frame_type();
        let bytes = frame.to_vec();
        let len = (bytes.len() - 4) as u32;
        assert_eq!(max_frame_len(t), Some(len), "type 0x{t:02x}");
        assert!(matches!(decode(&bytes, channel), Ok(Decoded::Frame(..))), "type 0x{t:02x} decodes");
        let mut over = (len + 1).to_be_bytes().to_vec();
        over.push(t);
        assert!(
            matches!(decode(&over, channel), Err(DecodeError::LongerThanType { .. })),
            "type 0x{t:02x}: one byte longer is refused from the header"
        );
        bounded += 1;
    }
    let all = (0..=255u8).filter(|&t| max_frame_len(t).is_some()).count();
    assert_eq!(bounded, all, "every bounded type is checked here");
}
