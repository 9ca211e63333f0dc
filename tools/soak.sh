#!/usr/bin/env bash
# Soak (issue #11 item 4): the seed's load for half an hour with chaos.
#   2 decision servers, 2 nodes, CLIENTS clients (default 20,000) spread over
#   worker processes and SOURCES loopback source addresses (127.0.0.1..N),
#   RATE msg/s in total (default 80,000: 4 per client per second), published
#   with WANT_RESULT; every CHAOS_EVERY (default 180 s) one chaos event, in
#   rotation (see Windows below): node n2 SIGKILLed and restarted after NODE_DOWN s, a reconnect
#   wave (WAVE per mille of the clients drop and reconnect through the
#   decision servers, resuming), decision server d1 SIGKILLed and restarted
#   after DECISION_DOWN s (CHAOS="node wave decision" picks and orders them).
#   n1 is never restarted: it is the leak witness. RSS growth is judged only
#   within one process (n1); the restarted n2 is reported per process.
#   Every SAMPLE_EVERY (10 s) a row of $OUT/$NAME.csv: per process RSS,
#   descriptors, CPU, and per node sessions, connections and queue depths
#   from /metrics; published and delivered rates, latency p50/p99/max, gaps,
#   cross-user deliveries. At the end $OUT/$NAME.svg, the pass/fail lines
#   and SOAK PASS or SOAK FAIL (exit 1). See `herald-probe soak --help` and
#   RELIABILITY.md, "Soak (item 4)".
# Windows: WARMUP (default min(600 s, DUR/3)) is not judged: the retention
# ring fills, and from CHAOS_FROM (WARMUP/2) a first round of chaos gives the
# nodes their peak load (n2's failover puts up to CAPACITY sessions on n1),
# so the baseline (the WINDOW after it, default min(300 s, DUR/6), no chaos)
# holds the high-water mark. Chaos then runs every CHAOS_EVERY while SETTLE
# (60 s, or WINDOW/3 if less) remains before the final WINDOW; RSS and
# descriptors are compared between the baseline and the final window.
# Usage: DUR=30m tools/soak.sh        (DUR in s, or with m/s suffix; e.g.
#        DUR=3m CLIENTS=2000 RATE=8000 CHAOS_EVERY=20 tools/soak.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
secs() { case $1 in *m) echo $((${1%m} * 60)) ;; *s) echo "${1%s}" ;; *) echo "$1" ;; esac; }
DUR=$(secs "${DUR:-30m}")
CLIENTS=${CLIENTS:-20000}
RATE=${RATE:-80000}
WARMUP=$(secs "${WARMUP:-$((DUR / 3 < 600 ? DUR / 3 : 600))}")
WINDOW=$(secs "${WINDOW:-$((DUR / 6 < 300 ? DUR / 6 : 300))}")
CHAOS_FROM=$(secs "${CHAOS_FROM:-$((WARMUP / 2))}")
CHAOS_EVERY=$(secs "${CHAOS_EVERY:-180}")
SETTLE=$(secs "${SETTLE:-$((WINDOW / 3 < 60 ? WINDOW / 3 : 60))}")
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
WAVE=${WAVE:-500}
SOURCES=${SOURCES:-4}
CAPACITY=${CAPACITY:-19000}
NODE_DOWN=${NODE_DOWN:-5}
DECISION_DOWN=${DECISION_DOWN:-3}
OUT=${OUT:-$PWD/bench-out}
NAME=${NAME:-soak}
cargo build --release --bins -q
R=$PWD/target/release
mkdir -p "$OUT"
dir=$(mktemp -d)
cleanup() {
  for f in "$dir"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  [ -f "$dir/log" ] && cp "$dir/log" "$OUT/$NAME.log"
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for s in client publisher cluster admin; do echo "soak-$s-secret-0123456789" >"$dir/$s"; done
# Ports: BASE (27600) and BASE+10 for the decision servers, BASE+100 and
# BASE+110 (client; +1 ingest, +2 metrics) for the nodes.
BASE=${BASE:-27600}
D1=$BASE D2=$((BASE + 10)) N1=$((BASE + 100)) N2=$((BASE + 110))
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $D1 $D2 $N1 $((N1 + 1)) $((N1 + 2)) $N2 $((N2 + 1)) $((N2 + 2)); do
  port_free "$p" || { echo "port $p is in use (a leftover run?); stop it first" >&2; exit 1; }
done

# One start script per process, so a chaos restart runs the same command.
# Each writes its pid file; the process outlives the script.
cat >"$dir/start-d.sh" <<EOF
#!/bin/sh
# start-d.sh NAME PORT
$R/herald decision --listen 127.0.0.1:\$2 --heartbeat 127.0.0.1:\$2 --cluster-secret-file $dir/cluster \\
  --admin-secret-file $dir/admin --state-file $dir/\$1.state --log-every 0 >/dev/null 2>>$dir/log </dev/null &
echo \$! >$dir/\$1.pid
EOF
cat >"$dir/start-n.sh" <<EOF
#!/bin/sh
# start-n.sh NAME PORT: client PORT, ingest PORT+1, metrics PORT+2
$R/herald node --id \$1 --listen 127.0.0.1:\$2 --ingest 127.0.0.1:\$((\$2 + 1)) --metrics 127.0.0.1:\$((\$2 + 2)) \\
  --capacity $CAPACITY --secret-file $dir/client --publisher-secret-file $dir/publisher \\
  --cluster-secret-file $dir/cluster --decision 127.0.0.1:$D1,127.0.0.1:$D2 --log-every 0 \\
  ${NODE_ARGS:-} >/dev/null 2>>$dir/log </dev/null &
echo \$! >$dir/\$1.pid
EOF
# Chaos: SIGKILL, wait, restart; say what happened in the log.
cat >"$dir/restart.sh" <<EOF
#!/bin/sh
# restart.sh NAME START-SCRIPT PORT DOWN-SECONDS
echo "soak chaos: kill -9 \$1 (pid \$(cat $dir/\$1.pid)) at \$(date -u +%T)" >>$dir/log
kill -9 \$(cat $dir/\$1.pid)
sleep \$4
sh $dir/\$2 \$1 \$3
EOF
echo "sh $dir/restart.sh n2 start-n.sh $N2 $NODE_DOWN" >"$dir/chaos-node.sh"
echo "sh $dir/restart.sh d1 start-d.sh $D1 $DECISION_DOWN" >"$dir/chaos-decision.sh"

sh "$dir/start-d.sh" d1 $D1
sh "$dir/start-d.sh" d2 $D2
sleep 0.3
sh "$dir/start-n.sh" n1 $N1
sh "$dir/start-n.sh" n2 $N2
sleep 2
src=$(seq -s, -f '127.0.0.%g' 1 "$SOURCES")
chaos=()
for c in ${CHAOS:-node wave decision}; do
  case $c in
  node | decision) chaos+=(--chaos "$c=sh $dir/chaos-$c.sh") ;;
  wave) chaos+=(--chaos wave) ;;
  *) echo "CHAOS: node, wave or decision, not $c" >&2; exit 2 ;;
  esac
done
echo "### soak: $CLIENTS clients, 2 nodes, 2 decision servers, $RATE msg/s, ${DUR}s" \
  "(warm-up ${WARMUP}s with chaos from ${CHAOS_FROM}s, windows ${WINDOW}s, chaos every ${CHAOS_EVERY}s, settle ${SETTLE}s), load average $(cut -d' ' -f1-3 /proc/loadavg)"
# Bounded: the probe stops itself after DUR; the timeout is a backstop (its
# workers exit when its pipes close).
set +e
# shellcheck disable=SC2086 # PROBE_ARGS is flags
timeout --signal=KILL $((DUR + 900)) \
  "$R/herald-probe" soak --decision 127.0.0.1:$D1,127.0.0.1:$D2 --secret-file "$dir/client" \
  --publisher-secret-file "$dir/publisher" --ingest 127.0.0.1:$((N1 + 1)),127.0.0.1:$((N2 + 1)) \
  --source "$src" --clients "$CLIENTS" --rate "$RATE" --duration "$DUR" --warmup "$WARMUP" --window "$WINDOW" --chaos-from "$CHAOS_FROM" \
  --chaos-every "$CHAOS_EVERY" --settle "$SETTLE" --sample-every "$SAMPLE_EVERY" --wave-per-mille "$WAVE" \
  "${chaos[@]}" \
  --watch "n1=$dir/n1.pid@127.0.0.1:$((N1 + 2))" --watch "n2=$dir/n2.pid@127.0.0.1:$((N2 + 2))" \
  --watch "d1=$dir/d1.pid" --watch "d2=$dir/d2.pid" \
  --csv "$OUT/$NAME.csv" --svg "$OUT/$NAME.svg" ${PROBE_ARGS:-} 2>"$dir/probe.err" | tee "$OUT/$NAME.txt"
rc=${PIPESTATUS[0]}
set -e
grep -E '^soak: (ingest|publishing|chaos|FAIL)|^probe: ' "$dir/probe.err" | tr -d '\r' >>"$OUT/$NAME.txt" || true
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$NAME.txt"
exit "$rc"
