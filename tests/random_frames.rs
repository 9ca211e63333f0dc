//! Random bytes against a real node, over real sockets, checked against a
//! reference of protocol.md §2.4 written in this file from the text alone
//! (with the connection states of §3 and §5 and the handshake checks of
//! §3.1, §5.1 and §6.1).
//!
//! Each connection sends a byte string built from frames that are random,
//! or valid and then mutated (a byte changed, the length prefix changed, the
//! body cut or extended, the type byte changed), as a first frame and as
//! later frames (after a WELCOME or a PUB_WELCOME). The reference reads the
//! same bytes as a stream, frame by frame, and says what the node must
//! answer: the frames it sends back (WELCOME, PONG, …) and then the ERROR
//! code it closes with, or a close without ERROR (after a valid ERROR). The
//! bytes are cut where the reference has decided, so a check that §2.4 says
//! is made from the header alone gets only the header.
//!
//! Fixed seed, 2,000 connections. The cases it once found (the node
//! answered PROTOCOL_ERROR or BAD_MAGIC where the order says
//! UNEXPECTED_FRAME, and AUTH_FAILED where it says UNSUPPORTED_VERSION) are
//! the `<!-- reject-vectors -->` of protocol.md §10.6, which the last test
//! here sends to the node too.

mod util;

use std::time::Duration;

use herald::protocol::frame::{self as f, Frame};
use herald::protocol::{Channel, Code};
use util::{pub_credential, test_config, token_for, Got, Raw, TestNode};

// ------------------------------------------------------------ the reference

const PROTOCOL_ERROR: u16 = 1;
const UNSUPPORTED_VERSION: u16 = 2;
const BAD_MAGIC: u16 = 3;
const FRAME_TOO_LARGE: u16 = 4;
const UNKNOWN_FRAME_TYPE: u16 = 5;
const UNEXPECTED_FRAME: u16 = 6;
const AUTH_FAILED: u16 = 8;

const HELLO: u8 = 0x01;
const PING: u8 = 0x02;
const PONG: u8 = 0x03;
const PUB_HELLO: u8 = 0x10;
const PUBLISH: u8 = 0x11;
const PUBLISH_BATCH: u8 = 0x12;
const PEER_HELLO: u8 = 0x20;
const PEER_AUTH: u8 = 0x21;
const PRESENCE: u8 = 0x22;
const FORWARD: u8 = 0x23;
const WELCOME: u8 = 0x81;
const GOODBYE: u8 = 0x84;
const PUB_WELCOME: u8 = 0x90;
const PUB_RESULT: u8 = 0x91;
const ERROR: u8 = 0xFF;

/// §2.3: every type defined in versions 1 and 2.
const KNOWN: &[u8] = &[
    0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x20, 0x21, 0x22, 0x23, 0x30, 0x31, 0x32, 0x40, 0x81, 0x82, 0x84,
    0x90, 0x91, 0xA0, 0xB0, 0xB1, 0xB2, 0xB3, 0xB4, 0xFF,
];

/// §2.4 step 2: the largest `length` of the bounded types.
fn type_max(t: u8) -> Option<u32> {
    Some(match t {
        HELLO => 603,
        PING | PONG => 9,
        WELCOME => 96,
        GOODBYE => 137,
        ERROR => 1029,
        PUB_HELLO => 587,
        PUB_WELCOME => 71,
        PUB_RESULT => 13,
        PEER_HELLO => 96,
        0xA0 => 123,
        PEER_AUTH => 33,
        _ => return None,
    })
}

/// The conversation states of §3 and §5 a connection to the node goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// §3: a client connection before WELCOME.
    ClientHandshake,
    /// §3: after WELCOME.
    Client,
    /// §5: an ingest connection before PUB_WELCOME (or PEER_WELCOME).
    IngestHandshake,
    /// §5: after PUB_WELCOME.
    Publisher,
}

impl State {
    /// §2.2: the channel's max length and allowed types.
    fn channel(self) -> (u32, &'static [u8]) {
        match self {
            State::ClientHandshake | State::Client => (2048, &[HELLO, PING, PONG, ERROR]),
            State::IngestHandshake | State::Publisher => (
                1 << 20,
                &[
                    PUB_HELLO,
                    PUBLISH,
                    PUBLISH_BATCH,
                    PEER_HELLO,
                    PEER_AUTH,
                    PRESENCE,
                    FORWARD,
                    PING,
                    PONG,
                    ERROR,
                ],
            ),
        }
    }

    /// §3 and §5: what the node accepts in this state.
    fn accepts(self) -> &'static [u8] {
        match self {
            State::ClientHandshake => &[HELLO, ERROR],
            State::Client => &[PING, PONG, ERROR],
            State::IngestHandshake => &[PUB_HELLO, PEER_HELLO, ERROR],
            State::Publisher => &[PUBLISH, PUBLISH_BATCH, PING, PONG, ERROR],
        }
    }
}

/// How a connection ends, per the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The node sends ERROR with this code and closes.
    Error(u16),
    /// The node closes without a frame (it got a valid ERROR).
    Close,
}

/// The reference's verdict on a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    /// The frame types the node sends first (WELCOME, PONG, …).
    answers: Vec<u8>,
    /// How it ends.
    end: End,
    /// How many bytes of the stream were needed to decide.
    used: usize,
}

/// What the reference made of the stream so far.
enum Step {
    Done(Verdict),
    /// The frame at the end of the stream needs this many bytes in total.
    More(usize),
}

/// A §1 body reader: a field that runs past the end is PROTOCOL_ERROR.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], u16> {
        if self.0.len() < n {
            return Err(PROTOCOL_ERROR);
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn uint(&mut self, n: usize) -> Result<u64, u16> {
        Ok(self.take(n)?.iter().fold(0u64, |a, &b| a << 8 | b as u64))
    }
    /// `strN` with its allowed range of lengths.
    fn str(&mut self, prefix: usize, min: usize, max: usize) -> Result<&'a [u8], u16> {
        let n = self.uint(prefix)? as usize;
        let s = self.take(n)?;
        if n < min || n > max {
            return Err(PROTOCOL_ERROR);
        }
        Ok(s)
    }
    fn magic(&mut self) -> Result<(), u16> {
        if self.take(4)? != b"HRLD" {
            return Err(BAD_MAGIC);
        }
        Ok(())
    }
    fn end(&self) -> Result<(), u16> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(PROTOCOL_ERROR)
        }
    }
}

/// The reference's knowledge of the node: the one client token and the one
/// publisher credential it would accept (§9: any other signed part would
/// need an HMAC we did not compute; the tag's hex may be in either case).
struct Keys {
    token: String,
    credential: String,
}

fn token_ok(presented: &[u8], minted: &str) -> bool {
    let (Some(p), Some(m)) = (presented.iter().rposition(|&b| b == b'.'), minted.rfind('.')) else {
        return false;
    };
    presented[..p] == minted.as_bytes()[..m]
        && presented[p + 1..].eq_ignore_ascii_case(&minted.as_bytes()[m + 1..])
}

/// §3.1 / §5.1 / §6.1 step 3: version negotiation.
fn version_ok(min: u64, max: u64) -> bool {
    let v = max.min(2);
    v >= 1 && v >= min
}

/// Steps 3 and 4 for one whole frame of an accepted type: the answer the
/// node sends and the state after it, or the code it closes with, or `None`
/// for a valid ERROR (a close without answer).
fn body(t: u8, b: &[u8], state: State, keys: &Keys) -> Result<Option<(Option<u8>, State)>, u16> {
    let mut r = Body(b);
    match t {
        HELLO => {
            r.magic()?;
            let (min, max, _flags) = (r.uint(1)?, r.uint(1)?, r.uint(1)?);
            let token = r.str(2, 1, 512)?;
            r.str(1, 0, 64)?;
            r.uint(8)?;
            r.uint(8)?;
            r.end()?;
            if !version_ok(min, max) {
                return Err(UNSUPPORTED_VERSION);
            }
            if !token_ok(token, &keys.token) {
                return Err(AUTH_FAILED);
            }
            Ok(Some((Some(WELCOME), State::Client)))
        }
        PING | PONG => {
            r.uint(8)?;
            r.end()?;
            Ok(Some(((t == PING).then_some(PONG), state)))
        }
        ERROR => {
            r.uint(2)?;
            r.str(2, 0, 1024)?;
            r.end()?;
            Ok(None)
        }
        PUB_HELLO => {
            r.magic()?;
            let (min, max, _flags) = (r.uint(1)?, r.uint(1)?, r.uint(1)?);
            let cred = r.str(2, 1, 512)?;
            r.str(1, 0, 64)?;
            r.end()?;
            if !version_ok(min, max) {
                return Err(UNSUPPORTED_VERSION);
            }
            if !token_ok(cred, &keys.credential) {
                return Err(AUTH_FAILED);
            }
            Ok(Some((Some(PUB_WELCOME), State::Publisher)))
        }
        PEER_HELLO => {
            r.magic()?;
            let (min, max) = (r.uint(1)?, r.uint(1)?);
            r.str(1, 1, 64)?;
            r.uint(8)?;
            r.take(16)?;
            r.end()?;
            if !version_ok(min, max) {
                return Err(UNSUPPORTED_VERSION);
            }
            // §6.1: a node without a cluster secret (the test node) takes no
            // mesh links.
            Err(AUTH_FAILED)
        }
        PUBLISH => {
            let flags = r.uint(1)?;
            r.uint(4)?;
            r.str(1, 1, 64)?;
            r.str(1, 0, 64)?;
            if r.0.len() > 65_536 {
                return Err(PROTOCOL_ERROR);
            }
            Ok(Some(((flags & 1 != 0).then_some(PUB_RESULT), state)))
        }
        PUBLISH_BATCH => {
            let flags = r.uint(1)?;
            r.uint(4)?;
            let count = r.uint(2)?;
            if !(1..=1024).contains(&count) {
                return Err(PROTOCOL_ERROR);
            }
            for _ in 0..count {
                r.str(1, 1, 64)?;
                r.str(1, 0, 64)?;
                r.str(4, 0, 65_536)?;
            }
            r.end()?;
            Ok(Some(((flags & 1 != 0).then_some(PUB_RESULT), state)))
        }
        _ => unreachable!("only accepted types get here"),
    }
}

/// §2.4 over a stream, from the first byte, in `state`.
fn reference(stream: &[u8], mut state: State, keys: &Keys) -> Step {
    let mut at = 0;
    let mut answers = Vec::new();
    let done = |answers: Vec<u8>, end, used| Step::Done(Verdict { answers, end, used });
    loop {
        let buf = &stream[at..];
        if buf.len() < 4 {
            return Step::More(at + 4);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let (channel_max, channel_types) = state.channel();
        // Step 1, from the four length bytes alone.
        if len == 0 {
            return done(answers, End::Error(PROTOCOL_ERROR), at + 4);
        }
        if len > channel_max {
            return done(answers, End::Error(FRAME_TOO_LARGE), at + 4);
        }
        // Step 2, from the type byte.
        let Some(&t) = buf.get(4) else { return Step::More(at + 5) };
        if !KNOWN.contains(&t) {
            return done(answers, End::Error(UNKNOWN_FRAME_TYPE), at + 5);
        }
        if !channel_types.contains(&t) || !state.accepts().contains(&t) {
            return done(answers, End::Error(UNEXPECTED_FRAME), at + 5);
        }
        if type_max(t).is_some_and(|m| len > m) {
            return done(answers, End::Error(PROTOCOL_ERROR), at + 5);
        }
        // Steps 3 and 4, once the whole frame is there.
        let total = 4 + len as usize;
        if buf.len() < total {
            return Step::More(at + total);
        }
        at += total;
        match body(t, &buf[5..total], state, keys) {
            Err(code) => return done(answers, End::Error(code), at),
            Ok(None) => return done(answers, End::Close, at),
            Ok(Some((answer, next))) => {
                answers.extend(answer);
                state = next;
            }
        }
    }
}

// ------------------------------------------------------------ the generator

/// splitmix64: small, fixed, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A valid frame of a type that matters in `state`'s conversation.
fn valid_frame(rng: &mut Rng, state: State, keys: &Keys) -> Vec<u8> {
    let version = rng.pick(&[(1, 1), (1, 1), (1, 1), (0, 1), (1, 2), (2, 3), (0, 0)]);
    let ping = Frame::Ping(rng.next());
    let pong = Frame::Pong(rng.next());
    let error = Frame::Error(f::ErrorFrame { code: Code::ProtocolError, message: b"bye" });
    let user = b"alice";
    let n = rng.below(40);
    let payload = rng.bytes(n);
    let token = keys.token.as_bytes();
    let cred = keys.credential.as_bytes();
    let frame = match (state, rng.below(4)) {
        (State::ClientHandshake, 0..=1) | (State::Client, 0) => Frame::Hello(f::Hello {
            min_version: version.0,
            max_version: version.1,
            token,
            agent: b"rand",
            resume: (rng.below(2) == 0).then_some(f::Position { epoch: 7, seq: 3 }),
        }),
        (State::IngestHandshake, 0..=1) | (State::Publisher, 0) => Frame::PubHello(f::PubHello {
            min_version: version.0,
            max_version: version.1,
            credential: cred,
            agent: b"",
        }),
        (State::IngestHandshake, 2) => Frame::PeerHello(f::PeerHello {
            min_version: version.0,
            max_version: version.1,
            node_id: b"n0",
            incarnation: 1,
            nonce: [7; 16],
        }),
        (State::Publisher, 1) | (State::IngestHandshake, 3) => Frame::Publish(f::Publish {
            flags: rng.below(2) as u8,
            request_id: 1,
            user,
            key: b"",
            payload: &payload,
        }),
        (_, 2) => ping,
        (_, 3) if rng.below(3) == 0 => error,
        _ => pong,
    };
    frame.to_vec()
}

const LENGTHS: &[u32] = &[0, 1, 2, 5, 8, 9, 10, 33, 96, 587, 588, 603, 604, 1029, 1030, 2048, 2049, 1 << 20];

/// One frame's worth of bytes: random, or valid then mutated.
fn one_frame(rng: &mut Rng, state: State, keys: &Keys) -> Vec<u8> {
    if rng.below(4) == 0 {
        // Random: an interesting or random length, a type, random body bytes.
        let len = match rng.below(3) {
            0 => rng.pick(LENGTHS),
            1 => rng.below(64) as u32,
            _ => rng.next() as u32,
        };
        let t = if rng.below(2) == 0 { rng.pick(KNOWN) } else { rng.next() as u8 };
        let mut v = len.to_be_bytes().to_vec();
        v.push(t);
        let n = (len as usize).saturating_sub(1).min(rng.pick(&[0, 8, 64, 2100]));
        v.extend(rng.bytes(n));
        return v;
    }
    let mut v = valid_frame(rng, state, keys);
    match rng.below(8) {
        0 | 1 => {} // as is
        2 => {
            let i = rng.below(v.len());
            v[i] = rng.next() as u8;
        }
        3 => {
            let i = 5 + rng.below(v.len() - 5).min(12);
            if i < v.len() {
                v[i] = rng.next() as u8;
            }
        }
        4 => {
            // New length prefix, same bytes.
            let len = if rng.below(2) == 0 {
                rng.pick(LENGTHS)
            } else {
                (v.len() as u32 - 4 + rng.below(7) as u32).saturating_sub(3)
            };
            v[..4].copy_from_slice(&len.to_be_bytes());
        }
        5 => {
            // Cut the body, fix the length.
            let cut = 1 + rng.below(v.len() - 5);
            v.truncate(v.len() - cut);
            let len = (v.len() - 4) as u32;
            v[..4].copy_from_slice(&len.to_be_bytes());
        }
        6 => {
            // Extend the body, fix the length.
            let n = 1 + rng.below(4);
            v.extend(rng.bytes(n));
            let len = (v.len() - 4) as u32;
            v[..4].copy_from_slice(&len.to_be_bytes());
        }
        _ => v[4] = rng.pick(KNOWN),
    }
    v
}

/// A connection's bytes and the reference's verdict on them. The stream is
/// cut where the reference decided; a frame whose body would be over 64 KiB
/// is replaced by a zero length (PROTOCOL_ERROR), and a stream the
/// reference has not finished with after a few frames ends the same way.
fn case(rng: &mut Rng, start: State, keys: &Keys) -> (Vec<u8>, Verdict) {
    let mut stream = Vec::new();
    let mut frames = 0;
    loop {
        let need = match reference(&stream, start, keys) {
            Step::Done(v) => {
                stream.truncate(v.used);
                return (stream, v);
            }
            Step::More(need) => need,
        };
        let (frame_start, state) = walk(&stream, start, keys);
        if frames >= 6 || need - frame_start > 64 * 1024 {
            stream.truncate(frame_start);
            stream.extend([0, 0, 0, 0]);
        } else if frame_start < stream.len() {
            // A frame has begun: give it the bytes it needs.
            let n = need - stream.len();
            stream.extend(rng.bytes(n));
        } else {
            stream.extend(one_frame(rng, state, keys));
            frames += 1;
        }
    }
}

/// Where the frame the reference is waiting on starts, and the state then.
fn walk(stream: &[u8], start: State, keys: &Keys) -> (usize, State) {
    let (mut at, mut state) = (0, start);
    loop {
        let buf = &stream[at..];
        if buf.len() < 5 {
            return (at, state);
        }
        let total = 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < total {
            return (at, state);
        }
        // Only whole frames the reference accepted are behind us.
        if let Ok(Some((_, next))) = body(buf[4], &buf[5..total], state, keys) {
            state = next;
        }
        at += total;
    }
}

// ------------------------------------------------------------ the node side

/// What the node did: the frame types it sent, and how it ended.
fn observe(node: &TestNode, start: State, bytes: &[u8]) -> Verdict {
    let (addr, channel) = match start {
        State::ClientHandshake | State::Client => (node.client, Channel::ToClient),
        _ => (node.ingest, Channel::FromIngest),
    };
    let mut r = Raw::connect(addr, channel);
    // A write may fail once the node has answered and closed; what it
    // answered is still to be read (§2.4, Closing after ERROR).
    let _ = std::io::Write::write_all(&mut r.sock, bytes);
    let mut answers = Vec::new();
    loop {
        match r.next(Duration::from_secs(5)) {
            Got::Frame(v) if v[4] == ERROR => {
                let code = u16::from_be_bytes([v[5], v[6]]);
                assert!(matches!(r.next(Duration::from_secs(5)), Got::Eof), "nothing may follow an ERROR");
                return Verdict { answers, end: End::Error(code), used: bytes.len() };
            }
            Got::Frame(v) => answers.push(v[4]),
            Got::Eof => return Verdict { answers, end: End::Close, used: bytes.len() },
            Got::Timeout => panic!("the node neither answered nor closed: {}", hex(bytes)),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn keys() -> Keys {
    Keys { token: token_for("alice"), credential: pub_credential() }
}

#[test]
fn random_bytes_get_the_codes_of_section_2_4() {
    let node = TestNode::start(test_config());
    let keys = keys();
    let mut rng = Rng(0x6865_7261_6c64_2e34); // "herald.4"
    let mut wrong = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..2000 {
        let start = if i % 5 < 3 { State::ClientHandshake } else { State::IngestHandshake };
        let (bytes, want) = case(&mut rng, start, &keys);
        let got = observe(&node, start, &bytes);
        *seen.entry(format!("{start:?} {:?}", want.end)).or_default() += 1;
        if got.answers != want.answers || got.end != want.end {
            wrong.push(format!(
                "{start:?} {}\n  reference: {:?} then {:?}\n  node:      {:?} then {:?}",
                hex(&bytes),
                want.answers,
                want.end,
                got.answers,
                got.end
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 2000 connections disagree with §2.4:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The generator reaches every step of §2.4 on both ports.
    for (start, code) in [
        ("ClientHandshake", PROTOCOL_ERROR),
        ("ClientHandshake", FRAME_TOO_LARGE),
        ("ClientHandshake", UNKNOWN_FRAME_TYPE),
        ("ClientHandshake", UNEXPECTED_FRAME),
        ("ClientHandshake", BAD_MAGIC),
        ("ClientHandshake", UNSUPPORTED_VERSION),
        ("ClientHandshake", AUTH_FAILED),
        ("IngestHandshake", PROTOCOL_ERROR),
        ("IngestHandshake", UNEXPECTED_FRAME),
        ("IngestHandshake", BAD_MAGIC),
        ("IngestHandshake", UNSUPPORTED_VERSION),
        ("IngestHandshake", AUTH_FAILED),
    ] {
        let k = format!("{start} Error({code})");
        assert!(seen.get(&k).copied().unwrap_or(0) > 0, "no case ended in {k}: {seen:?}");
    }
}

/// The §10.6 vectors, as the node answers them.
#[test]
fn reject_vectors_get_their_codes_from_the_node() {
    let node = TestNode::start(test_config());
    let keys = keys();
    let md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol.md")).unwrap();
    let vectors = reject_vectors(&md);
    assert!(vectors.len() >= 5, "protocol.md §10.6 should list the reject vectors");
    for (state, frame, code) in vectors {
        // The prefix that brings the connection into the state.
        let mut bytes = match state {
            State::ClientHandshake | State::IngestHandshake => Vec::new(),
            State::Client => hello(&keys.token),
            State::Publisher => pub_hello(&keys.credential),
        };
        let start = match state {
            State::ClientHandshake | State::Client => State::ClientHandshake,
            _ => State::IngestHandshake,
        };
        bytes.extend(&frame);
        let Step::Done(want) = reference(&bytes, start, &keys) else { panic!("undecided: {}", hex(&frame)) };
        assert_eq!(want.end, End::Error(code), "the reference disagrees with vector {}", hex(&frame));
        let got = observe(&node, start, &bytes);
        assert_eq!((got.answers, got.end), (want.answers, want.end), "vector {:?} {}", state, hex(&frame));
    }
}

fn hello(token: &str) -> Vec<u8> {
    Frame::Hello(f::Hello {
        min_version: 1,
        max_version: 1,
        token: token.as_bytes(),
        agent: b"",
        resume: None,
    })
    .to_vec()
}

fn pub_hello(cred: &str) -> Vec<u8> {
    Frame::PubHello(f::PubHello { min_version: 1, max_version: 1, credential: cred.as_bytes(), agent: b"" })
        .to_vec()
}

/// `state  hex  CODE` lines of the `<!-- reject-vectors -->` block.
fn reject_vectors(md: &str) -> Vec<(State, Vec<u8>, u16)> {
    let at = md.find("<!-- reject-vectors -->").expect("a <!-- reject-vectors --> block");
    let block = &md[at..];
    let open = block.find("```text\n").expect("a ```text block") + 8;
    let close = open + block[open..].find("```").expect("closed");
    block[open..close]
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let state = match cols[0] {
                "client-handshake" => State::ClientHandshake,
                "client-established" => State::Client,
                "ingest-handshake" => State::IngestHandshake,
                "publisher-established" => State::Publisher,
                other => panic!("unknown state {other}"),
            };
            let code = match *cols.last().unwrap() {
                "PROTOCOL_ERROR" => PROTOCOL_ERROR,
                "UNSUPPORTED_VERSION" => UNSUPPORTED_VERSION,
                "BAD_MAGIC" => BAD_MAGIC,
                "FRAME_TOO_LARGE" => FRAME_TOO_LARGE,
                "UNKNOWN_FRAME_TYPE" => UNKNOWN_FRAME_TYPE,
                "UNEXPECTED_FRAME" => UNEXPECTED_FRAME,
                "AUTH_FAILED" => AUTH_FAILED,
                other => panic!("unknown code {other}"),
            };
            let digits: String = cols[1..cols.len() - 1].concat();
            let bytes = (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
                .collect();
            (state, bytes, code)
        })
        .collect()
}

/// §5.2: a PUBLISH pipelined behind PUB_HELLO, in the same write, is
/// processed once the PUB_HELLO is accepted (PUB_WELCOME, then its
/// PUB_RESULT); behind a refused PUB_HELLO it is discarded.
#[test]
fn publish_pipelined_behind_pub_hello() {
    let node = TestNode::start(test_config());
    let publish =
        Frame::Publish(f::Publish { flags: 1, request_id: 5, user: b"bob", key: b"", payload: b"x" });
    let mut bytes = pub_hello(&pub_credential());
    bytes.extend(publish.to_vec());
    let mut r = Raw::connect(node.ingest, Channel::FromIngest);
    r.send(&bytes);
    assert_eq!(r.expect(Duration::from_secs(5))[4], PUB_WELCOME);
    assert_eq!(r.expect(Duration::from_secs(5))[4], PUB_RESULT);
    let mut bytes = pub_hello("v1.YWxpY2U.1767225600.00");
    bytes.extend(publish.to_vec());
    let got = observe(&node, State::IngestHandshake, &bytes);
    assert_eq!((got.answers, got.end), (vec![], End::Error(AUTH_FAILED)));
}
