//! One fixed example of every frame type, shared by the unit tests, the
//! protocol.md test-vector check, the benchmarks and the fuzz corpus.
//!
//! The values here are the ones printed as hex test vectors in protocol.md;
//! change one and `tests/protocol_vectors.rs` fails until the spec follows.

use super::codes::{AdminOp, Code, GoodbyeAction, PresenceOp, ResumeResult};
use super::frame::*;

/// Secret used for the signed sample frames and the token vector.
pub const SAMPLE_SECRET: &[u8] = b"herald-test-secret";

/// A sample: its name in protocol.md, the channel it travels on, and its bytes.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The vector's name in protocol.md (`vector: NAME`).
    pub name: &'static str,
    /// The channel on which it is decoded.
    pub channel: Channel,
    /// The encoded frame.
    pub bytes: Vec<u8>,
}

/// The 100-byte payload used by the DELIVER benchmark sample.
pub fn payload_100() -> Vec<u8> {
    (0..100u8).map(|i| b'a' + i % 26).collect()
}

/// Every sample, in protocol.md order.
pub fn all() -> Vec<Sample> {
    let mut v = Vec::new();
    let mut add = |name, channel, f: Frame<'_>| {
        let mut bytes = Vec::new();
        f.encode_signed(&mut bytes, SAMPLE_SECRET);
        v.push(Sample { name, channel, bytes });
    };
    let token = b"v1.YWxpY2U.1767225600.00";
    add(
        "hello",
        Channel::ToNode,
        Frame::Hello(Hello { min_version: 1, max_version: 1, token, agent: b"rs/0.1", resume: None }),
    );
    add(
        "hello-v2",
        Channel::ToNode,
        Frame::Hello(Hello { min_version: 1, max_version: 2, token, agent: b"rs/0.1", resume: None }),
    );
    // The §9 worked example: a token that verifies under the sample secret.
    let signed = super::token::mint(SAMPLE_SECRET, b"alice", 1_767_225_600).expect("valid user");
    add(
        "hello-signed",
        Channel::ToNode,
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            token: signed.as_bytes(),
            agent: b"rs/0.1",
            resume: None,
        }),
    );
    add(
        "hello-resume",
        Channel::ToNode,
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            token,
            agent: b"",
            resume: Some(Position { epoch: 0x1122_3344_5566_7788, seq: 41 }),
        }),
    );
    add(
        "welcome",
        Channel::ToClient,
        Frame::Welcome(Welcome {
            version: 1,
            resume: ResumeResult::Resumed,
            heartbeat_ms: 10_000,
            session_id: 7,
            epoch: 0x1122_3344_5566_7788,
            next_seq: 42,
            node_id: b"n1",
        }),
    );
    add(
        "deliver",
        Channel::ToClient,
        Frame::Deliver(Deliver { epoch: 0x1122_3344_5566_7788, seq: 42, payload: b"hi" }),
    );
    let keys = encode_entries(&[KeyEntry(b"EURUSD")]);
    add(
        "conflated",
        Channel::ToClient,
        Frame::Conflated(Conflated {
            epoch: 0x1122_3344_5566_7788,
            first_seq: 40,
            last_seq: 41,
            keys: List::from_encoded(1, &keys).expect("one key"),
        }),
    );
    add("ping", Channel::ToClient, Frame::Ping(0x0102_0304_0506_0708));
    add("pong", Channel::ToNode, Frame::Pong(0x0102_0304_0506_0708));
    add(
        "goodbye",
        Channel::ToClient,
        Frame::Goodbye(Goodbye {
            reason: Code::Draining,
            action: GoodbyeAction::AskDecision,
            delay_ms: 1500,
            target: b"",
        }),
    );
    add(
        "goodbye-node",
        Channel::ToClient,
        Frame::Goodbye(Goodbye {
            reason: Code::Rebalance,
            action: GoodbyeAction::GoToNode,
            delay_ms: 0,
            target: b"10.0.0.2:7400",
        }),
    );
    add(
        "error",
        Channel::ToClient,
        Frame::Error(ErrorFrame { code: Code::AuthFailed, message: b"bad token" }),
    );
    add(
        "pub-hello",
        Channel::Ingest,
        Frame::PubHello(PubHello { min_version: 1, max_version: 1, credential: token, agent: b"" }),
    );
    add(
        "pub-welcome",
        Channel::FromIngest,
        Frame::PubWelcome(PubWelcome { version: 1, max_frame: 1 << 20, node_id: b"n1" }),
    );
    add(
        "publish",
        Channel::Ingest,
        Frame::Publish(Publish {
            flags: PUBLISH_WANT_RESULT,
            request_id: 9,
            user: b"alice",
            key: b"",
            payload: b"hi",
        }),
    );
    let batch = encode_entries(&[
        BatchEntry { user: b"alice", key: b"", payload: b"hi" },
        BatchEntry { user: b"bob", key: b"EURUSD", payload: b"yo" },
    ]);
    add(
        "publish-batch",
        Channel::Ingest,
        Frame::PublishBatch(PublishBatch {
            flags: 0,
            request_id: 10,
            entries: List::from_encoded(2, &batch).expect("valid"),
        }),
    );
    add(
        "pub-result",
        Channel::FromIngest,
        Frame::PubResult(PubResult { request_id: 9, accepted: 1, local: 1, forwarded: 0, no_route: 0 }),
    );
    add(
        "peer-hello",
        Channel::Ingest,
        Frame::PeerHello(PeerHello {
            min_version: 1,
            max_version: 1,
            node_id: b"n1",
            incarnation: 1_767_225_600_000,
            nonce: [0x11; 16],
        }),
    );
    let tag_a = super::sign::peer_acceptor_tag(SAMPLE_SECRET, &[0x11; 16], &[0x22; 16], b"n1", b"n2");
    add(
        "peer-welcome",
        Channel::FromIngest,
        Frame::PeerWelcome(PeerWelcome {
            version: 1,
            node_id: b"n2",
            incarnation: 1_767_225_600_001,
            nonce: [0x22; 16],
            tag: tag_a,
        }),
    );
    let tag_i = super::sign::peer_initiator_tag(SAMPLE_SECRET, &[0x11; 16], &[0x22; 16], b"n1", b"n2");
    add("peer-auth", Channel::Ingest, Frame::PeerAuth(PeerAuth { tag: tag_i }));
    let pres = encode_entries(&[
        PresenceEntry { op: PresenceOp::Online, user: b"alice" },
        PresenceEntry { op: PresenceOp::Offline, user: b"bob" },
    ]);
    add(
        "presence",
        Channel::Ingest,
        Frame::Presence(Presence { flags: 0, entries: List::from_encoded(2, &pres).expect("valid") }),
    );
    add(
        "forward",
        Channel::Ingest,
        Frame::Forward(Forward { flags: 0, user: b"alice", key: b"", id: b"", seq: 0, payload: b"hi" }),
    );
    add(
        "forward-id",
        Channel::Ingest,
        Frame::Forward(Forward {
            flags: FORWARD_ID,
            user: b"alice",
            key: b"",
            id: b"js:HERALD:42",
            seq: 0,
            payload: b"hi",
        }),
    );
    add(
        "forward-seq",
        Channel::Ingest,
        Frame::Forward(Forward {
            flags: FORWARD_SEQ,
            user: b"alice",
            key: b"",
            id: b"",
            seq: 7,
            payload: b"hi",
        }),
    );
    add(
        "assign-request",
        Channel::ToDecision,
        Frame::AssignRequest(AssignRequest { version: 1, user: b"alice", max_results: 3, token: b"" }),
    );
    add(
        "assign-request-v2",
        Channel::ToDecision,
        Frame::AssignRequest(AssignRequest {
            version: 2,
            user: b"alice",
            max_results: 3,
            token: signed.as_bytes(),
        }),
    );
    let asg = encode_entries(&[
        AssignEntry { node_id: b"n1", endpoint: b"127.0.0.1:7400" },
        AssignEntry { node_id: b"n2", endpoint: b"127.0.0.1:7410" },
    ]);
    add(
        "assignment",
        Channel::FromDecision,
        Frame::Assignment(Assignment { entries: List::from_encoded(2, &asg).expect("valid") }),
    );
    add("no-capacity", Channel::FromDecision, Frame::NoCapacity(NoCapacity { retry_after_ms: 2000 }));
    add("nodes-request", Channel::ToDecision, Frame::NodesRequest(NodesRequest { version: 1 }));
    let nodes = encode_entries(&[NodeEntry {
        node_id: b"n1",
        incarnation: 1_767_225_600_000,
        client_endpoint: b"127.0.0.1:7400",
        ingest_endpoint: b"127.0.0.1:7401",
        flags: 0,
    }]);
    add(
        "nodes",
        Channel::FromDecision,
        Frame::Nodes(Nodes { entries: List::from_encoded(1, &nodes).expect("valid") }),
    );
    add(
        "admin",
        Channel::ToDecision,
        Frame::Admin(Admin {
            version: 1,
            timestamp_ms: 1_767_225_600_000,
            nonce: 5,
            op: AdminOp::SetCeiling,
            node_id: b"",
            value: 40,
        }),
    );
    add("admin-result", Channel::FromDecision, Frame::AdminResult(AdminResult { status: 0, message: b"ok" }));
    let status = encode_entries(&[StatusEntry {
        node_id: b"n1",
        client_endpoint: b"127.0.0.1:7400",
        connections: 150,
        capacity: 2000,
        ceiling_pct: 40,
        headroom: 650,
        heartbeat_age_ms: 300,
        flags: 0,
        msgs_out_per_s: 450,
    }]);
    add(
        "admin-status",
        Channel::FromDecision,
        Frame::AdminStatus(AdminStatus {
            ceiling_pct: 40,
            entries: List::from_encoded(1, &status).expect("valid"),
        }),
    );
    add(
        "heartbeat",
        Channel::Heartbeat,
        Frame::Heartbeat(Heartbeat {
            version: 1,
            node_id: b"n1",
            incarnation: 1_767_225_600_000,
            seq: 3,
            sent_at_ms: 1_767_225_603_000,
            client_endpoint: b"127.0.0.1:7400",
            ingest_endpoint: b"127.0.0.1:7401",
            connections: 150,
            capacity: 2000,
            flags: 0,
            msgs_in_per_s: 450,
            msgs_out_per_s: 450,
            cpu_permille: 120,
        }),
    );
    v
}

/// A DELIVER with a 100-byte payload, the benchmark's reference frame.
pub fn deliver_100() -> Vec<u8> {
    let mut v = Vec::new();
    encode_deliver(&mut v, 0x1122_3344_5566_7788, 42, &payload_100());
    v
}
