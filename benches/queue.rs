//! The per-client queue, measured both ways.
//!
//! herald's per-client queue is the connection's output buffer, owned by the
//! event loop: delivering a message is an append of its encoded frame, and
//! the loop drains it with one `write` per turn. The design card suggested a
//! lock-free bounded queue per client (crossbeam `ArrayQueue`) fed by other
//! threads. This bench measures both under the same traffic: 121-byte
//! DELIVER frames, a producer and a consumer, so the choice rests on numbers.
//! A third case measures what a multi-loop node (`--threads N`) pays to move
//! a message from loop 0 to the loop that owns its user: batches of 64.
//!
//! Run: `cargo bench --bench queue`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;

use herald::node::shard;
use herald::protocol::frame::encode_deliver;
use herald::protocol::samples::payload_100;

fn loop_owned_buffer(c: &mut Criterion) {
    let payload = payload_100();
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(64));
    g.bench_function("loop_owned_buffer/append64_then_drain", |b| {
        let mut wbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut sink = 0usize;
        b.iter(|| {
            for seq in 0..64u64 {
                encode_deliver(&mut wbuf, 7, seq, &payload);
            }
            // The loop's drain: one write of the whole buffer.
            sink = sink.wrapping_add(black_box(&wbuf).len());
            wbuf.clear();
        });
        black_box(sink);
    });
    g.finish();
}

fn crossbeam_two_threads(c: &mut Criterion) {
    let payload = payload_100();
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(64));
    // Frames are owned Vecs (a queue of frames needs an allocation per
    // message, or a fixed-size slot pool); the consumer thread pops and
    // copies into its write buffer, as a loop draining queues would.
    g.bench_function("crossbeam_arrayqueue/producer_thread_to_consumer_thread", |b| {
        b.iter_custom(|iters| {
            let q: Arc<ArrayQueue<Vec<u8>>> = Arc::new(ArrayQueue::new(1024));
            let n = iters * 64;
            let qc = q.clone();
            let consumer = std::thread::spawn(move || {
                let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
                let mut got = 0u64;
                while got < n {
                    match qc.pop() {
                        Some(f) => {
                            out.extend_from_slice(&f);
                            if out.len() > 8 * 1024 {
                                out.clear();
                            }
                            got += 1;
                        }
                        None => std::hint::spin_loop(),
                    }
                }
                black_box(out.len())
            });
            let t0 = Instant::now();
            for seq in 0..n {
                let mut f = Vec::with_capacity(121);
                encode_deliver(&mut f, 7, seq, &payload);
                let mut item = f;
                loop {
                    match q.push(item) {
                        Ok(()) => break,
                        Err(back) => {
                            item = back;
                            std::hint::spin_loop();
                        }
                    }
                }
            }
            let _ = consumer.join();
            t0.elapsed()
        });
    });
    g.finish();
}

/// What `herald node --threads N` does instead of a queue per client: loop 0
/// appends each message for another loop's user to that loop's batch (one
/// recycled buffer), sends the batch through a crossbeam channel once per
/// turn, and the owner loop, woken once per batch, encodes each DELIVER into
/// the client's buffer and gives the batch buffer back.
fn batched_hand_off(c: &mut Criterion) {
    let payload = payload_100();
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(64));
    g.bench_function("herald_threads/batch64_loop0_to_owner_loop", |b| {
        b.iter_custom(|iters| {
            let (tx, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
            let (free_tx, free_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
            let consumer = std::thread::spawn(move || {
                let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
                let mut got = 0u64;
                let mut seq = 0u64;
                // Blocking receive: the owner sleeps between batches and is
                // woken once per batch, as the node's loops are.
                while got < iters * 64 {
                    let Ok(batch) = rx.recv() else { break };
                    for (user, _key, p) in shard::messages(&batch) {
                        seq += 1;
                        encode_deliver(&mut out, user.len() as u64, seq, p);
                        if out.len() > 8 * 1024 {
                            out.clear();
                        }
                        got += 1;
                    }
                    let _ = free_tx.send(batch);
                }
                black_box(out.len())
            });
            let t0 = Instant::now();
            for _ in 0..iters {
                let mut batch = free_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(16 * 1024));
                batch.clear();
                for _ in 0..64 {
                    shard::push(&mut batch, b"u12345", b"", &payload);
                }
                tx.send(batch).unwrap();
            }
            let _ = consumer.join();
            t0.elapsed()
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = loop_owned_buffer, crossbeam_two_threads, batched_hand_off
}
criterion_main!(benches);
