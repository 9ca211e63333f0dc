//! Codec benchmarks: decode and encode time for every frame type, plus the
//! reference cases of the acceptance criterion (a 100-byte DELIVER must decode
//! and encode in ≤ 50 ns each).
//!
//! Run with `cargo bench --bench codec`. Every case reports criterion's usual
//! `time: [low mid high]` line, which is the time for *one* frame (for the
//! batch cases: one whole 64-entry frame; `thrpt` gives entries per second).
//!
//! - `<sample>/decode`: `decode` of the sample's bytes on its channel. Decoding
//!   never verifies HMAC tags (that is `sign::verify_frame`, a separate step),
//!   so signed frames decode at the same cost as unsigned ones.
//! - `<sample>/encode`: `Frame::encode_signed` of the decoded frame into a
//!   reused, cleared `Vec<u8>` (no allocation in the loop). For ADMIN and
//!   HEARTBEAT this includes computing the HMAC-SHA256 tag; for every other
//!   type the key is ignored and it is the same as `Frame::encode`.
//! - `deliver_100/*`, `publish_100/*`: the hot-path encoders
//!   (`encode_deliver`, `encode_publish`) with a 100-byte payload.
//! - `publish_batch_64x100/*`: a PUBLISH_BATCH of 64 entries of 100 bytes each;
//!   `decode+iterate` decodes the frame and walks every entry.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald::protocol::frame::{encode_deliver, encode_publish, BatchWriter, PUBLISH_WANT_RESULT};
use herald::protocol::samples::{self, SAMPLE_SECRET};
use herald::protocol::{decode, Channel, Decoded, Frame};

/// Reused output buffers start with this much room, so no case reallocates.
const OUT_CAPACITY: usize = 16 * 1024;

/// Decodes a buffer that must hold exactly one valid frame (setup only).
fn decode_whole(bytes: &[u8], channel: Channel) -> Frame<'_> {
    match decode(bytes, channel) {
        Ok(Decoded::Frame(f, used)) if used == bytes.len() => f,
        other => panic!("sample does not decode as one whole frame: {other:?}"),
    }
}

/// One timed decode, input and output hidden from the optimiser. The result is
/// black-boxed by reference and the closure returns `()`: handing the
/// (100+ byte) `Result` back to criterion would add its stable-Rust
/// `black_box` (a volatile, byte-by-byte copy, ~5 ns here) to every figure.
#[inline(always)]
fn decode_once(bytes: &[u8], channel: Channel) {
    let r = decode(black_box(bytes), black_box(channel));
    black_box(&r);
}

/// Adds `<name>/decode` and `<name>/encode` for one encoded frame.
fn bench_frame(c: &mut Criterion, name: &str, bytes: &[u8], channel: Channel) {
    let frame = decode_whole(bytes, channel);

    // The round trip must reproduce the sample exactly, so the encode case
    // measures the real thing (including the HMAC tag of signed frames).
    let mut out = Vec::with_capacity(OUT_CAPACITY);
    frame.encode_signed(&mut out, SAMPLE_SECRET);
    assert_eq!(out, bytes, "{name}: re-encoding differs from the sample");

    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| b.iter(|| decode_once(bytes, channel)));
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&frame).encode_signed(&mut out, black_box(SAMPLE_SECRET));
            black_box(out.as_slice());
        })
    });
    g.finish();
}

/// One pair of cases per sample in `samples::all()`, i.e. every frame type.
fn per_frame_type(c: &mut Criterion) {
    for s in samples::all() {
        bench_frame(c, s.name, &s.bytes, s.channel);
    }
}

/// The acceptance reference: a DELIVER with a 100-byte payload.
fn deliver_100(c: &mut Criterion) {
    let bytes = samples::deliver_100();
    let (epoch, seq, payload) = match decode_whole(&bytes, Channel::ToClient) {
        Frame::Deliver(d) => (d.epoch, d.seq, d.payload.to_vec()),
        other => panic!("deliver_100 is not a DELIVER: {other:?}"),
    };
    assert_eq!(payload, samples::payload_100());

    let mut out = Vec::with_capacity(OUT_CAPACITY);
    encode_deliver(&mut out, epoch, seq, &payload);
    assert_eq!(out, bytes);

    let mut g = c.benchmark_group("deliver_100");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| b.iter(|| decode_once(&bytes, Channel::ToClient)));
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode_deliver(&mut out, black_box(epoch), black_box(seq), black_box(&payload));
            black_box(out.as_slice());
        })
    });
    g.finish();
}

/// A PUBLISH with a 100-byte payload, via the hot-path `encode_publish`.
fn publish_100(c: &mut Criterion) {
    let payload = samples::payload_100();
    let (flags, request_id, user, key) = (PUBLISH_WANT_RESULT, 9u32, &b"alice"[..], &b""[..]);
    let mut bytes = Vec::new();
    encode_publish(&mut bytes, flags, request_id, user, key, &payload);
    match decode_whole(&bytes, Channel::Ingest) {
        Frame::Publish(p) => assert_eq!(p.payload, &payload[..]),
        other => panic!("publish_100 is not a PUBLISH: {other:?}"),
    }

    let mut out = Vec::with_capacity(OUT_CAPACITY);
    let mut g = c.benchmark_group("publish_100");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| b.iter(|| decode_once(&bytes, Channel::Ingest)));
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode_publish(
                &mut out,
                black_box(flags),
                black_box(request_id),
                black_box(user),
                black_box(key),
                black_box(&payload),
            );
            black_box(out.as_slice());
        })
    });
    g.finish();
}

const BATCH_ENTRIES: usize = 64;

/// A PUBLISH_BATCH of 64 × 100-byte messages: decode and walk every entry,
/// and build it with `BatchWriter`.
fn publish_batch_64x100(c: &mut Criterion) {
    let payload = samples::payload_100();
    let users: Vec<Vec<u8>> = (0..BATCH_ENTRIES).map(|i| format!("user-{i:02}").into_bytes()).collect();
    let build = |out: &mut Vec<u8>, users: &[Vec<u8>], payload: &[u8]| {
        let mut w = BatchWriter::start(out, 0, 10);
        for u in users {
            let pushed = w.push(out, u, b"", payload);
            debug_assert!(pushed);
        }
        w.finish(out);
    };
    let mut bytes = Vec::new();
    build(&mut bytes, &users, &payload);
    match decode_whole(&bytes, Channel::Ingest) {
        Frame::PublishBatch(b) => {
            assert_eq!(b.entries.len(), BATCH_ENTRIES);
            assert!(b.entries.iter().all(|e| e.payload == &payload[..]));
        }
        other => panic!("batch is not a PUBLISH_BATCH: {other:?}"),
    }

    let mut out = Vec::with_capacity(OUT_CAPACITY);
    let mut g = c.benchmark_group("publish_batch_64x100");
    g.throughput(Throughput::Elements(BATCH_ENTRIES as u64));
    g.bench_function("decode+iterate", |b| {
        b.iter(|| {
            if let Ok(Decoded::Frame(Frame::PublishBatch(batch), _)) =
                decode(black_box(&bytes), black_box(Channel::Ingest))
            {
                for e in batch.entries.iter() {
                    black_box(e);
                }
            }
        })
    });
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            build(&mut out, black_box(&users), black_box(&payload));
            black_box(out.as_slice());
        })
    });
    g.finish();
}

fn config() -> Criterion {
    // Short runs: the bench machine is a shared 2-core VM.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = deliver_100, publish_100, publish_batch_64x100, per_frame_type
}
criterion_main!(benches);
