//! The worker process around a [`Swarm`]: the line protocol a coordinator
//! (`herald-probe`, `herald demo` past one process's files) drives it
//! with over stdin and stdout, and the coordinator's side of reading it.

use std::io::Write;

use hdrhistogram::Histogram;

use super::*;

/// A worker process around a [`Swarm`], driven over stdin/stdout by a
/// coordinator (`herald-probe load`, `herald demo` past one process's files).
///
/// Prints `PROGRESS n` while connecting, `READY n secs`, then `STAT
/// received live wrong silent p50_ns p99_ns p999_ns` once a second (the
/// percentiles over that second; `silent`: messages still missing from
/// silent jumps, net of late ones), and on `STOP` (or EOF) `RESULT …`, the
/// histograms as `H`/`W`/`M value count` lines, with slow readers
/// ([`SlowReaders`]) a `SLOW …` line ([`SlowStats::slow_line`]) and their
/// staleness and unkeyed messages' age as `S`/`U value count` lines,
/// `NEXT n…` (each client's next expected message number, in user order)
/// and `END`. Reads `START ns`
/// (record latency from then on), `KILL ns` (time re-homing from then) and
/// `UNTHROTTLE` (the slow readers read at full speed: [`Swarm::unthrottle`]).
///
/// For `herald-probe soak` it also reads `SAMPLE` (answered by one line
/// `SAMPLE received live wrong silent announced dups closed reconnects
/// v:count…`, the counts so far and the latency histogram, ns, since the
/// last SAMPLE) and `WAVE per_mille round` (a reconnect wave, see
/// [`Swarm::drop_wave`]; answered `WAVE dropped`), and prints `GAP user
/// from to` for each silent jump as it is seen.
pub fn run_worker(cfg: SwarmConfig, record_after: u64) -> i32 {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let record_from = Arc::new(AtomicU64::new(if record_after == 0 { u64::MAX } else { record_after }));
    let kill_at = Arc::new(AtomicU64::new(0));
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded::<String>();
    {
        let (stop, record_from, kill_at) = (stop.clone(), record_from.clone(), kill_at.clone());
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if let Some(ns) = line.strip_prefix("START ") {
                    record_from.store(ns.trim().parse().unwrap_or(0), Ordering::SeqCst);
                } else if let Some(ns) = line.strip_prefix("KILL ") {
                    kill_at.store(ns.trim().parse().unwrap_or(0), Ordering::SeqCst);
                } else if line == "SAMPLE" || line == "UNTHROTTLE" || line.starts_with("WAVE ") {
                    let _ = cmd_tx.send(line);
                } else {
                    break;
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
    }
    let mut swarm = match Swarm::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::error!("swarm worker: {e}");
            return 1;
        }
    };
    let t0 = Instant::now();
    let welcomed = swarm.connect_all(Duration::from_secs(300), |n| {
        if n % 1000 == 0 {
            println!("PROGRESS {n}");
        }
    });
    println!("READY {welcomed} {:.3}", t0.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
    let mut prev = swarm.hist.clone();
    let mut interval = swarm.hist.clone();
    let mut next_stat = Instant::now() + Duration::from_secs(1);
    let mut sampled = swarm.hist.clone();
    while !stop.load(Ordering::SeqCst) {
        swarm.record_after = record_from.load(Ordering::Relaxed);
        swarm.kill_ns = kill_at.load(Ordering::Relaxed);
        swarm.step(Duration::from_millis(50));
        for (u, from, to) in swarm.silent_ranges.drain(..) {
            println!("GAP {u} {from} {to}");
        }
        while let Ok(cmd) = cmd_rx.try_recv() {
            worker_command(&mut swarm, &cmd, &mut sampled);
        }
        if Instant::now() >= next_stat {
            next_stat += Duration::from_secs(1);
            interval.reset();
            let _ = interval.add(&swarm.hist);
            let _ = interval.subtract(&prev);
            prev.reset();
            let _ = prev.add(&swarm.hist);
            let t = &swarm.tally;
            println!(
                "STAT {} {} {} {} {} {} {}",
                t.received,
                swarm.live,
                t.wrong_user,
                t.silent_gaps - t.late,
                interval.value_at_quantile(0.5),
                interval.value_at_quantile(0.99),
                interval.value_at_quantile(0.999)
            );
            let _ = std::io::stdout().flush();
        }
    }
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{}", swarm.tally.result_line());
    for v in swarm.hist.iter_recorded() {
        let _ = writeln!(o, "H {} {}", v.value_iterated_to(), v.count_at_value());
    }
    for v in swarm.rehome_welcome.iter_recorded() {
        let _ = writeln!(o, "W {} {}", v.value_iterated_to(), v.count_at_value());
    }
    for v in swarm.rehome_message.iter_recorded() {
        let _ = writeln!(o, "M {} {}", v.value_iterated_to(), v.count_at_value());
    }
    if !swarm.slow_idx.is_empty() {
        let slow = swarm.slow_stats();
        let _ = writeln!(o, "{}", slow.slow_line());
        for (k, h) in [("S", &slow.stale), ("U", &slow.unkeyed_age)] {
            for v in h.iter_recorded() {
                let _ = writeln!(o, "{k} {} {}", v.value_iterated_to(), v.count_at_value());
            }
        }
    }
    let next: Vec<String> = swarm.conns.iter().map(|c| c.next_msg.to_string()).collect();
    let _ = writeln!(o, "NEXT {}", next.join(" "));
    let _ = writeln!(o, "END");
    let _ = o.flush();
    0
}

/// Answers a coordinator's `SAMPLE` or `WAVE` line (see [`run_worker`]);
/// `sampled` is the histogram as of the last SAMPLE.
fn worker_command(swarm: &mut Swarm, cmd: &str, sampled: &mut Histogram<u64>) {
    let mut parts = cmd.split_whitespace();
    match parts.next() {
        Some("SAMPLE") => {
            let mut since = swarm.hist.clone();
            let _ = since.subtract(&*sampled);
            sampled.reset();
            let _ = sampled.add(&swarm.hist);
            let t = &swarm.tally;
            let mut line = format!(
                "SAMPLE {} {} {} {} {} {} {} {}",
                t.received,
                swarm.live,
                t.wrong_user,
                t.silent_gaps,
                t.announced_gaps,
                t.dups,
                t.closed,
                t.reconnects
            );
            for v in since.iter_recorded() {
                let _ = write!(line, " {}:{}", v.value_iterated_to(), v.count_at_value());
            }
            println!("{line}");
        }
        Some("UNTHROTTLE") => swarm.unthrottle(),
        Some("WAVE") => {
            let per_mille = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let round = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            println!("WAVE {}", swarm.drop_wave(per_mille, round, Instant::now()));
        }
        _ => {}
    }
    let _ = std::io::stdout().flush();
}

/// Forwards each line a worker writes to `tx` as `(worker, line)`, then
/// `(worker, "EOF")` when its output ends.
pub fn forward_lines(
    worker: usize,
    out: impl std::io::Read + Send + 'static,
    tx: crossbeam_channel::Sender<(usize, String)>,
) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((worker, line)).is_err() {
                return;
            }
        }
        let _ = tx.send((worker, "EOF".into()));
    });
}
