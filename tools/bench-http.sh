#!/usr/bin/env bash
# The HTTP publish API against the binary ingest port (issue #12), in the
# same run, alternating: one node with --http, 1,000 connected clients
# (herald-probe's swarm, which reads everything), then REPS rounds of
#   wrk single   POST /v1/publish, one message per request
#   wrk batch    POST /v1/publish/batch, BATCH messages per request
#   ingest batch PUBLISH_BATCH of BATCH messages with WANT_RESULT
#   ingest single PUBLISH with WANT_RESULT
# each for DUR seconds over CONNS keep-alive connections with one request
# in flight on each (wrk -c CONNS; herald-publish-bench --conns CONNS).
# Payloads of 100 bytes to users u0..u999, in the same order from both load
# generators (ORDER, see tools/wrk/publish.lua): random (the default), a
# user drawn for each message, or turn, in turn (each of wrk's WRK_THREADS
# threads walks the users on its own over its connections, and
# herald-publish-bench --groups WRK_THREADS does the same). The order
# decides how many client sockets the node writes to per message, which is
# most of its cost; with random users that does not depend on how the
# load generator's requests line up in time. Around each
# run the script reads the node's clock ticks and, from its metrics port,
# its socket writes. Prints every run and a summary of medians. wrk comes
# from Debian (apt-get install -y wrk).
# Usage: REPS=3 DUR=10 CONNS=16 BATCH=100 ORDER=random tools/bench-http.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 2; }
cargo build --release --bins -q
R=$PWD/target/release
REPS=${REPS:-3} DUR=${DUR:-10} CONNS=${CONNS:-16} BATCH=${BATCH:-100} WRK_THREADS=${WRK_THREADS:-2} ORDER=${ORDER:-random}
dir=$(mktemp -d)
node_pid=
cleanup() { [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
echo "client-secret-for-bench-http" >"$dir/cs"
echo "publisher-secret-for-bench-http" >"$dir/ps"
$R/herald node --id bench-http --listen 127.0.0.1:17620 --ingest 127.0.0.1:17621 --http 127.0.0.1:17622 \
  --metrics 127.0.0.1:17623 --secret-file "$dir/cs" --publisher-secret-file "$dir/ps" --log-level error &
node_pid=$!
sleep 1
export CRED=$($R/herald token --secret-file "$dir/ps" --user bench --ttl 2h)
export USERS=1000 PAYLOAD=100 ORDER
cat >"$dir/measure.sh" <<EOS
#!/usr/bin/env bash
set -euo pipefail
# The node's CPU (clock ticks) and socket writes around each run: its cost
# per message, and how many client sockets it wrote to per message.
ticks() { awk '{print \$14 + \$15}' /proc/$node_pid/stat; }
writes() { curl -s http://127.0.0.1:17623/metrics | awk '/^herald_writes_total/ {print \$2}'; }
run() {
  local kind=\$1; shift
  local t=\$(ticks) w=\$(writes) out
  out=\$("\$@" | grep -E '^(WRK|INGEST)')
  echo "\$kind node_ticks=\$((\$(ticks) - t)) node_writes=\$((\$(writes) - w)) \$out"
}
for i in \$(seq $REPS); do
  echo "== round \$i"
  BATCH=1 run http-single wrk -t$WRK_THREADS -c$CONNS -d${DUR}s -s $PWD/tools/wrk/publish.lua http://127.0.0.1:17622/v1/publish
  BATCH=$BATCH run http-batch wrk -t$WRK_THREADS -c$CONNS -d${DUR}s -s $PWD/tools/wrk/publish.lua http://127.0.0.1:17622/v1/publish/batch
  run ingest-batch $R/herald-publish-bench --ingest 127.0.0.1:17621 --publisher-secret-file $dir/ps --conns $CONNS --order $ORDER --groups $WRK_THREADS --batch $BATCH --duration ${DUR}s
  run ingest-single $R/herald-publish-bench --ingest 127.0.0.1:17621 --publisher-secret-file $dir/ps --conns $CONNS --order $ORDER --groups $WRK_THREADS --batch 1 --duration ${DUR}s
done
EOS
chmod +x "$dir/measure.sh"
$R/herald-probe load --node 127.0.0.1:17620 --secret-file "$dir/cs" --publisher-secret-file "$dir/ps" \
  --ingest 127.0.0.1:17621 --clients 1000 --rate 100 --duration 1 --warmup 0 \
  --exec-after-connect "$dir/measure.sh" >"$dir/probe.out" 2>&1 || true
grep -E '^(==|http-|ingest-)' "$dir/probe.out" | tee "$dir/runs"
python3 - "$dir/runs" <<'PY'
import re, statistics, sys
rates, cost, writes = {}, {}, {}
for line in open(sys.argv[1]):
    kind = line.split()[0]
    kv = dict(re.findall(r'(\w+)=([\d.]+)', line))
    if kind.startswith('http'):
        msgs = int(kv['requests']) * int(kv['batch'])
        r = msgs / (int(kv['duration_us']) / 1e6)
    elif kind.startswith('ingest'):
        msgs = int(kv['messages'])
        r = float(kv['msgs_per_s'])
    else:
        continue
    rates.setdefault(kind, []).append(r)
    # clock ticks are 10 ms
    cost.setdefault(kind, []).append(int(kv['node_ticks']) * 10_000 / max(msgs, 1))
    writes.setdefault(kind, []).append(int(kv['node_writes']) / max(msgs, 1))
for k, v in rates.items():
    c, w = cost[k], writes[k]
    print(f"SUMMARY {k}: messages/s median {statistics.median(v):,.0f} (runs: {', '.join(f'{x:,.0f}' for x in v)}); node CPU µs/msg median {statistics.median(c):.2f} (runs: {', '.join(f'{x:.2f}' for x in c)}); node writes/msg median {statistics.median(w):.3f}")
if 'http-batch' in rates and 'ingest-batch' in rates:
    ratio = [h / i for h, i in zip(rates['http-batch'], rates['ingest-batch'])]
    print(f"SUMMARY http-batch / ingest-batch, paired: {', '.join(f'{x:.2f}' for x in ratio)}; median {statistics.median(ratio):.2f}")
PY
