#!/usr/bin/env bash
# Node benchmarks (issue: the node), herald against the minimal forwarder in
# the same run, alternating, 3 repetitions each; prints every run and a
# table of medians. Usage: tools/bench-node.sh [A B C D]   (default: all)
# TARGETS (default "forwarder herald") picks what runs: "heraldN" is a node
# with --threads N, e.g. TARGETS="forwarder herald herald2". RATES overrides
# C's rate ladder. Target "base" runs $BASE/herald (another build's release
# directory, e.g. of the previous commit) with one loop, for before/after runs.
# HERALD_ARGS adds flags to every herald node, and a target "heraldx" is a
# one-loop herald with HERALD_X_ARGS as well, for A/B runs of a setting, e.g.
# TARGETS="herald heraldx" HERALD_X_ARGS="--retain-total 1048576"; its probe
# runs get PROBE_X_ARGS as well (e.g. PROBE_X_ARGS="--keys 20" for keyed
# traffic against unkeyed). "heraldy" is a second such target, with
# HERALD_Y_ARGS and PROBE_Y_ARGS.
# Target "tls" is a one-loop herald whose client port speaks TLS 1.3 (dev
# certificates from `herald cert dev`), its clients verifying it with the
# dev CA; the probe's publishers stay on the plaintext ingest port.
# PROBE_ARGS adds flags to every probe run, e.g. PROBE_ARGS="--source
# 127.0.0.2,127.0.0.3" to spread clients over source addresses (runs close
# with the node, leaving its sockets in TIME_WAIT: back-to-back runs from
# one address can run short of ports).
# NODE_WRAP / PROBE_WRAP prefix the node's / probe's command (they must exec
# it, keeping the pid), e.g. NODE_WRAP="chrt -f 50" or NODE_WRAP="taskset -c 1"
# PROBE_WRAP="taskset -c 0", to tell the node's own tail from scheduling.
#   A: 10,000 clients, 80,000 msg/s (ARATE overrides), 100 B payload, 1 ms ticks
#   B: 10,000 clients, 20,000 msg/s
#   C: 1,000 clients, rising rate until p99 > 10 ms or loss
#   D: 19,000 idle authenticated connections: node RSS per connection
#   E: 1,000 clients, 20,000 msg/s (ERATE overrides): for slow readers, e.g.
#      PROBE_ARGS="--keys 20 --fills-every 20 --slow 100" (issue #13)
# PORT (default 17500) is the node's client port; ingest and metrics are the
# next two. Only the processes the script started are stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
R=target/release
dir=$(mktemp -d)
PID=""
trap 'rm -rf "$dir"; [ -z "$PID" ] || kill -TERM "$PID" 2>/dev/null || true' EXIT
echo client-secret-for-benchmarks >"$dir/cs"
echo publisher-secret-for-benchmarks >"$dir/ps"
REPS=${REPS:-3}
DUR=${DUR:-20}
scenarios=${*:-A B C D}
PORT=${PORT:-17500}
CP=127.0.0.1:$PORT IP=127.0.0.1:$((PORT + 1)) MP=127.0.0.1:$((PORT + 2))

TARGETS=${TARGETS:-forwarder herald}
NODE_WRAP=${NODE_WRAP:-}
PROBE_WRAP=${PROBE_WRAP:-}
RATES=${RATES:-100000 200000 400000 600000 800000 1000000 1200000 1500000}

start() { # forwarder|herald|heraldN|base|tls
  if [ "$1" = tls ]; then
    [ -f "$dir/certs/ca.pem" ] || $R/herald cert dev --out "$dir/certs" --nodes bench --decision '' >/dev/null
    # shellcheck disable=SC2086 # word splitting of the extra flags is wanted
    $NODE_WRAP $R/herald node --id bench --listen $CP --ingest $IP --secret-file "$dir/cs" \
      --publisher-secret-file "$dir/ps" --log-every 0 --drain-window 1s --metrics $MP \
      --tls-cert "$dir/certs/bench.pem" --tls-key "$dir/certs/bench.key" ${HERALD_ARGS:-} 2>>"$dir/node.log" &
  elif [ "$1" = base ]; then
    $NODE_WRAP "$BASE/herald" node --id bench --listen $CP --ingest $IP --secret-file "$dir/cs" \
      --publisher-secret-file "$dir/ps" --log-every 0 --drain-window 1s 2>>"$dir/node.log" &
  elif [ "${1#herald}" != "$1" ]; then
    local threads=${1#herald} extra=""
    if [ "$threads" = x ]; then threads=1; extra=${HERALD_X_ARGS:-}; fi
    if [ "$threads" = y ]; then threads=1; extra=${HERALD_Y_ARGS:-}; fi
    # shellcheck disable=SC2086 # word splitting of the extra flags is wanted
    $NODE_WRAP $R/herald node --id bench --listen $CP --ingest $IP --secret-file "$dir/cs" \
      --publisher-secret-file "$dir/ps" --log-every 0 --drain-window 1s --threads "${threads:-1}" \
      --metrics $MP ${HERALD_ARGS:-} $extra 2>>"$dir/node.log" &
  else
    $NODE_WRAP $R/herald-forwarder --listen $CP --ingest $IP 2>>"$dir/node.log" &
  fi
  PID=$!
  sleep 0.5
}
stop() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; sleep 0.5; }
probe() { # target args...
  local t=$1; shift
  local plain=""; [ "$t" = forwarder ] && plain="--plain"
  [ "$t" = tls ] && plain="--tls-ca $dir/certs/ca.pem"
  local own=""
  [ "$t" = heraldx ] && own=${PROBE_X_ARGS:-}
  [ "$t" = heraldy ] && own=${PROBE_Y_ARGS:-}
  # shellcheck disable=SC2086 # $plain, $PROBE_ARGS and $own are flags and values
  $PROBE_WRAP $R/herald-probe load --node $CP --ingest $IP --secret-file "$dir/cs" \
    --publisher-secret-file "$dir/ps" --node-pid "$PID" $plain ${PROBE_ARGS:-} $own "$@" 2>/dev/null || true
}
internal() { # herald's own ingest-to-write p99 and p99.9 (µs), from /metrics
  exec 3<>"/dev/tcp/127.0.0.1/$((PORT + 2))" || return 0
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  awk -F'[ }]' '/^herald_internal_latency_us\{.*quantile="0.99"/ {a=$NF} /^herald_internal_latency_us\{.*quantile="0.999"/ {b=$NF}
    END {if (a != "") printf " internal_p99=%s internal_p999=%s", a, b}' <&3
  exec 3<&-
}
run() { # scenario target args...
  local s=$1 t=$2; shift 2
  start "$t"
  echo "### $s $t: herald-probe load $*"
  probe "$t" "$@" | tee -a "$dir/out" >"$dir/last"
  grep -v '^SUMMARY' "$dir/last" || true
  local extra=""
  if [ "${t#herald}" != "$t" ] || [ "$t" = tls ]; then extra=$(internal); fi
  grep '^SUMMARY' "$dir/last" | sed "s/^SUMMARY /SUMMARY scenario=$s target=$t /; s/\$/$extra/" | tee -a "$dir/summary"
  stop
}

for s in $scenarios; do
  case $s in
    A) for i in $(seq "$REPS"); do for t in $TARGETS; do run A $t --clients 10000 --rate "${ARATE:-80000}" --duration "$DUR" --warmup 2; done; done ;;
    B) for i in $(seq "$REPS"); do for t in $TARGETS; do run B $t --clients 10000 --rate 20000 --duration "$DUR" --warmup 2; done; done ;;
    E) for i in $(seq "$REPS"); do for t in $TARGETS; do run E $t --clients 1000 --rate "${ERATE:-20000}" --duration "$DUR" --warmup 2; done; done ;;
    C) for rate in $RATES; do
         for t in $TARGETS; do run "C@$rate" $t --clients 1000 --rate $rate --duration 5 --warmup 1; done
       done ;;
    D) for t in $TARGETS; do
         start "$t"
         echo "### D $t: 19000 idle connections"
         probe "$t" --clients 19000 --rate 0 --duration 2 --warmup 0 | grep -E 'rss|clients'
         stop
       done ;;
  esac
done

[ -s "$dir/summary" ] || exit 0 # D alone prints no latency table
echo
echo "## medians, as the markdown rows of BENCHMARKS.md"
echo "| scenario | target | p50 µs | p99 µs | p99.9 µs | max µs | node CPU µs/msg | node preempted /s | herald internal p99 / p99.9 µs | loss | runs |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
python3 - "$dir/summary" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if not line.startswith('SUMMARY'):
        continue
    kv = dict(p.split('=', 1) for p in line.split()[1:])
    rows[(kv['scenario'], kv['target'])].append(kv)
for (s, t), rs in rows.items():
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    loss = sum(int(r['loss']) for r in rs)
    opt = lambda k, f: f(med(k)) if all(k in r for r in rs) else '—'
    pre = opt('node_preempted_per_s', lambda v: f"{v:.0f}")
    inner = opt('internal_p999', lambda v: f"{med('internal_p99'):.0f} / {v:.0f}")
    print(f"| {s} | {t} | {med('p50'):.0f} | {med('p99'):.0f} | {med('p999'):.0f} | {med('max'):.0f} | {med('node_cpu_us_per_msg'):.2f} | {pre} | {inner} | {loss} | {len(rs)} |")
# Two targets alternating in a scenario: node CPU per message, paired by run.
by_s = collections.defaultdict(list)
for (s, t) in rows:
    by_s[s].append(t)
for s, ts in by_s.items():
    if len(ts) != 2:
        continue
    a, b = rows[(s, ts[0])], rows[(s, ts[1])]
    cpu = lambda r: float(r['node_cpu_us_per_msg'])
    pairs = [(cpu(x), cpu(y)) for x, y in zip(a, b)]
    ratios = [y / x for x, y in pairs if x > 0]
    if ratios:
        runs = ', '.join(f"{x:.2f} / {y:.2f} = {y / x:.2f}" for x, y in pairs if x > 0)
        print(f"{s}: node CPU µs/msg by run, {ts[0]} / {ts[1]} = ratio {ts[1]}/{ts[0]}: {runs}; median ratio {statistics.median(ratios):.2f}")
# Slow readers (herald-probe --slow): what they got, per run.
slow = [(s, t, r) for (s, t), rs in rows.items() for r in rs if 'slow' in r]
if slow:
    print()
    print("| scenario | target | conflated | slow: received | unkeyed lost | disconnects | staleness p50 ms | p99 ms | max ms | fast p99 µs | node CPU µs/msg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, t, r in slow:
        print(f"| {s} | {t} | {r['conflated']} | {r['slow_received']} | {r['slow_unkeyed_lost']} | {r['slow_closed']} | {r['stale_p50_ms']} | {r['stale_p99_ms']} | {r['stale_max_ms']} | {float(r['p99']):.0f} | {r['node_cpu_us_per_msg']} |")
PY
