#!/usr/bin/env bash
# Connectors against direct ingest (issue #12, "Connectors"), in the same
# run, alternating: one node with --source, CLIENTS clients (herald-probe's
# swarm, 10,000 by default), then for each RATE in RATES, REPS rounds of
#   jetstream  the probe publishes into NATS (core publishes on
#              herald.user.<user>, stored by the stream); the node's
#              JetStream connector pulls them and delivers
#   ingest     the probe publishes PUBLISH_BATCH to the node's ingest port
# each for DUR seconds (+2 s warm-up) of 100-byte stamped payloads; the
# probe reports loss, duplicates and end-to-end latency from the intended
# send time, and the CPU of the node and of nats-server. A rate is
# sustained if loss, duplicates and misroutes are 0.
# Needs nats-server (apt-get install -y nats-server).
# Usage: RATES="20000 40000 60000 80000" REPS=1 DUR=10 CLIENTS=10000 tools/bench-source.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nats-server >/dev/null || { echo "nats-server is missing: apt-get install -y nats-server"; exit 2; }
cargo build --release --bins -q
R=$PWD/target/release
RATES=${RATES:-20000 40000 60000 80000} REPS=${REPS:-1} DUR=${DUR:-10} CLIENTS=${CLIENTS:-10000}
SOURCE_ARGS=${SOURCE_ARGS:-batch=1024&in_flight=16384}
BASE=${BASE:-17700}
NATS=$BASE NODE=$((BASE + 10))
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
nats-server -js -a 127.0.0.1 -p $NATS -sd "$dir/js" >"$dir/nats.log" 2>&1 &
nats_pid=$!
pids+=($nats_pid)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$NATS) 2>/dev/null && break; sleep 0.1; done
echo "client-secret-for-bench-source" >"$dir/cs"
echo "publisher-secret-for-bench-source" >"$dir/ps"
$R/herald node --id bench-source --listen 127.0.0.1:$NODE --ingest 127.0.0.1:$((NODE + 1)) \
  --secret-file "$dir/cs" --publisher-secret-file "$dir/ps" --log-level warn --log-every 0 \
  --source "jetstream://127.0.0.1:$NATS/HERALD?$SOURCE_ARGS" 2>"$dir/node.log" &
node_pid=$!
pids+=($node_pid)
sleep 1
echo "### bench-source: $CLIENTS clients, rates $RATES, $REPS round(s) of ${DUR}s, source ?$SOURCE_ARGS, nats-server $(nats-server --version | head -1), load average $(cut -d' ' -f1-3 /proc/loadavg)"
# Per-thread CPU of the node (its event loop against the connector's threads).
threads() { for t in /proc/$node_pid/task/*; do echo "$(cat "$t/comm")/${t##*/} $(awk '{print $14 + $15}' "$t/stat")"; done | sort; }
for rate in $RATES; do
  for i in $(seq "$REPS"); do
    for mode in jetstream ingest; do
      if [ $mode = jetstream ]; then via=(--via-jetstream 127.0.0.1:$NATS); else via=(--ingest 127.0.0.1:$((NODE + 1))); fi
      threads >"$dir/t0"
      out=$($R/herald-probe load --node 127.0.0.1:$NODE --secret-file "$dir/cs" --publisher-secret-file "$dir/ps" \
        --clients "$CLIENTS" --rate "$rate" --duration "$DUR" --warmup 2 --node-pid "$node_pid,$nats_pid" "${via[@]}" 2>"$dir/probe.err" || true)
      threads >"$dir/t1"
      summary=$(echo "$out" | grep '^SUMMARY' || echo "SUMMARY failed: $(tail -2 "$dir/probe.err" | tr '\n' ' ')")
      cpu=$(echo "$out" | grep -E '^node pid [0-9]+ +cpu' | sed -E "s/^node pid ([0-9]+) +cpu ([0-9.]+)s over [0-9]+s = ([0-9.]+)% of a core.*/\1:\3%/; s/^$node_pid:/node=/; s/^$nats_pid:/nats=/" | tr '\n' ' ')
      # Clock ticks (100 a second) over the whole probe run (connect included).
      per_thread=$(join "$dir/t0" "$dir/t1" 2>/dev/null | awk '$3 > $2 {sub("/.*", "", $1); printf "%s+%d ", $1, $3-$2}' || true)
      echo "$mode rate=$rate round=$i $summary cpu(recorded ${DUR}s, % of a core): $cpu node thread ticks: $per_thread"
    done
  done
done | tee "$dir/runs"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -c 'failed' "$dir/node.log" >/dev/null 2>&1 && grep -i 'warn\|error' "$dir/node.log" | tail -5 || true
