#!/usr/bin/env bash
# Connectors against direct ingest (issue #12, "Connectors"), in the same
# run, alternating: one node with --source jetstream and --source redis,
# CLIENTS clients (herald-probe's swarm, 10,000 by default), then for each
# RATE in RATES, REPS rounds of each of MODES (default all three):
#   jetstream  the probe publishes into NATS (core publishes on
#              herald.user.<user>, stored by the stream); the node's
#              JetStream connector pulls them and delivers
#   redis      the probe XADDs to the stream `herald` (fields user, data; one
#              pipeline per 1 ms tick); the node's Redis connector reads them
#   ingest     the probe publishes PUBLISH_BATCH to the node's ingest port
# each for DUR seconds (+2 s warm-up) of 100-byte stamped payloads; the
# probe reports loss, duplicates and end-to-end latency from the intended
# send time, and the CPU of the node and of nats-server. A rate is
# sustained if loss, duplicates and misroutes are 0.
# Needs nats-server and redis-server (apt-get install -y nats-server redis-server).
# Usage: RATES="20000 40000 60000 80000" REPS=1 DUR=10 CLIENTS=10000 MODES="jetstream redis ingest" tools/bench-source.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nats-server >/dev/null || { echo "nats-server is missing: apt-get install -y nats-server"; exit 2; }
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install -y redis-server"; exit 2; }
cargo build --release --bins -q
R=$PWD/target/release
RATES=${RATES:-20000 40000 60000 80000} REPS=${REPS:-1} DUR=${DUR:-10} CLIENTS=${CLIENTS:-10000}
MODES=${MODES:-jetstream redis ingest}
SOURCE_ARGS=${SOURCE_ARGS:-batch=1024&in_flight=16384}
BASE=${BASE:-17700}
NATS=$BASE REDIS=$((BASE + 5)) NODE=$((BASE + 10))
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
echo "client-secret-for-bench-source" >"$dir/cs"
echo "publisher-secret-for-bench-source" >"$dir/ps"
# Every run starts on fresh servers and a fresh node: a run that overloads a
# queue leaves a backlog that would otherwise flow into the next run.
start_all() {
  rm -rf "$dir/js" "$dir/dump.rdb"
  nats-server -js -a 127.0.0.1 -p $NATS -sd "$dir/js" >"$dir/nats.log" 2>&1 &
  nats_pid=$!
  disown
  redis-server --bind 127.0.0.1 --port $REDIS --save "" --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
  redis_pid=$!
  disown
  pids=($nats_pid $redis_pid)
  for port in $NATS $REDIS; do
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  done
  $R/herald node --id bench-source --listen 127.0.0.1:$NODE --ingest 127.0.0.1:$((NODE + 1)) \
    --secret-file "$dir/cs" --publisher-secret-file "$dir/ps" --log-level warn --log-every 0 \
    --source "jetstream://127.0.0.1:$NATS/HERALD?$SOURCE_ARGS" --source "redis://127.0.0.1:$REDIS/herald?$SOURCE_ARGS" \
    2>>"$dir/node.log" &
  node_pid=$!
  disown
  pids+=($node_pid)
  sleep 1
}
stop_all() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  pids=()
}
echo "### bench-source: $CLIENTS clients, rates $RATES, $REPS round(s) of ${DUR}s, source ?$SOURCE_ARGS, nats-server $(nats-server --version | head -1), load average $(cut -d' ' -f1-3 /proc/loadavg)"
# Per-thread CPU of the node (its event loop against the connector's threads).
threads() { for t in /proc/$node_pid/task/*; do echo "$(cat "$t/comm")/${t##*/} $(awk '{print $14 + $15}' "$t/stat")"; done | sort; }
for rate in $RATES; do
  for i in $(seq "$REPS"); do
    for mode in $MODES; do
      start_all
      case $mode in
      jetstream) via=(--via-jetstream 127.0.0.1:$NATS) qpid=$nats_pid ;;
      redis) via=(--via-redis 127.0.0.1:$REDIS) qpid=$redis_pid ;;
      *) via=(--ingest 127.0.0.1:$((NODE + 1))) qpid=$nats_pid ;;
      esac
      threads >"$dir/t0"
      out=$($R/herald-probe load --node 127.0.0.1:$NODE --secret-file "$dir/cs" --publisher-secret-file "$dir/ps" \
        --clients "$CLIENTS" --rate "$rate" --duration "$DUR" --warmup 2 --node-pid "$node_pid,$qpid" "${via[@]}" 2>"$dir/probe.err" || true)
      threads >"$dir/t1"
      summary=$(echo "$out" | grep '^SUMMARY' || echo "SUMMARY failed: $(tail -2 "$dir/probe.err" | tr '\n' ' ')")
      cpu=$(echo "$out" | grep -E '^node pid [0-9]+ +cpu' | sed -E "s/^node pid ([0-9]+) +cpu ([0-9.]+)s over [0-9]+s = ([0-9.]+)% of a core.*/\1:\3%/; s/^$node_pid:/node=/; s/^$qpid:/queue=/" | tr '\n' ' ')
      # Clock ticks (100 a second) over the whole probe run (connect included).
      per_thread=$(join "$dir/t0" "$dir/t1" 2>/dev/null | awk '$3 > $2 {sub("/.*", "", $1); printf "%s+%d ", $1, $3-$2}' || true)
      echo "$mode rate=$rate round=$i $summary cpu(recorded ${DUR}s, % of a core): $cpu node thread ticks: $per_thread"
      stop_all
    done
  done
done | tee "$dir/runs"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -c 'failed' "$dir/node.log" >/dev/null 2>&1 && grep -i 'warn\|error' "$dir/node.log" | tail -5 || true
