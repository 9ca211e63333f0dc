#!/usr/bin/env bash
# Cluster benchmarks (issue: the cluster; issue: seeing it work).
#   seed:   20,000 clients on 2 nodes via 2 decision servers, 80,000 msg/s
#           published to any node, 60 s; p50/p99/p99.9/max, loss, misroutes,
#           node and probe CPU, and the probe's count checked against the
#           nodes' /metrics. Writes bench-out/seed.hgrm and bench-out/seed.svg.
#   rehome: 10,000 clients on n1; n2 and n3 join (capacity 7,000 each, 80 %
#           ceiling); n1 is SIGKILLed while 40,000 msg/s flow; each client's
#           time from the kill to its new session and to its first message;
#           then every node's connections against its ceiling.
# Usage: tools/bench-cluster.sh [seed] [rehome]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
R=$PWD/target/release
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
for s in client publisher cluster admin; do echo "bench-$s-secret-0123456789" >"$dir/$s"; done
SEED_DUR=${SEED_DUR:-60}

decision() { # port
  $R/herald decision --listen 127.0.0.1:$1 --heartbeat 127.0.0.1:$1 --cluster-secret-file "$dir/cluster" \
    --admin-secret-file "$dir/admin" --log-every 0 --max-conns-per-source 0 --source-rate 0 ${DECISION_ARGS:-} 2>>"$dir/log" &
  pids+=($!)
}
node() { # id port capacity
  $R/herald node --id "$1" --listen 127.0.0.1:$2 --ingest 127.0.0.1:$(($2 + 1)) --metrics 127.0.0.1:$(($2 + 2)) \
    --capacity "$3" --secret-file "$dir/client" --publisher-secret-file "$dir/publisher" \
    --cluster-secret-file "$dir/cluster" --decision 127.0.0.1:17300,127.0.0.1:17310 --log-every 0 2>>"$dir/log" &
  pids+=($!)
  eval "PID_$1=$!"
}
metric() { curl -s "127.0.0.1:$1/metrics" | awk -v m="$2" '$1 ~ "^"m"[{]" {print $2}'; }
stop_all() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; pids=(); sleep 1; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in 17300 17310 17400 17410 17420; do
  port_free "$p" || { echo "port $p is in use (a leftover run?); stop it first" >&2; exit 1; }
done

for s in ${*:-seed rehome}; do
  case $s in
  seed)
    echo "### seed: 20000 clients, 2 nodes, 80000 msg/s, ${SEED_DUR}s"
    decision 17300; decision 17310; sleep 0.3
    node n1 17400 19000; node n2 17410 19000; sleep 2
    $R/herald-probe load --decision 127.0.0.1:17300,127.0.0.1:17310 --secret-file "$dir/client" \
      --publisher-secret-file "$dir/publisher" --clients 20000 --rate 80000 --duration "$SEED_DUR" --warmup 5 \
      --node-pid "$PID_n1,$PID_n2" --hgrm "$OUT/seed.hgrm" --svg "$OUT/seed.svg" \
      --title "seed scenario: 20,000 clients, 2 nodes, 80,000 msg/s" 2>/dev/null | tee "$OUT/seed.txt" || true
    out1=$(metric 17402 herald_messages_out_total); out2=$(metric 17412 herald_messages_out_total)
    fw1=$(metric 17402 herald_messages_forwarded_total); fw2=$(metric 17412 herald_messages_forwarded_total)
    echo "independent check: nodes' /metrics messages_out_total n1=$out1 n2=$out2 sum=$((out1 + out2)); forwarded n1=$fw1 n2=$fw2" | tee -a "$OUT/seed.txt"
    stop_all
    ;;
  rehome)
    echo "### rehome: 10000 clients on n1, n1 killed under 40000 msg/s"
    decision 17300; decision 17310; sleep 0.3
    node n1 17400 19000; sleep 2
    # n2 and n3 join once the clients sit on n1; the hook waits for the mesh.
    hook="$R/herald node --id n2 --listen 127.0.0.1:17410 --ingest 127.0.0.1:17411 --metrics 127.0.0.1:17412 --capacity 7000 --secret-file $dir/client --publisher-secret-file $dir/publisher --cluster-secret-file $dir/cluster --decision 127.0.0.1:17300,127.0.0.1:17310 --log-every 0 >/dev/null 2>>$dir/log & echo \$! >$dir/n2.pid;
          $R/herald node --id n3 --listen 127.0.0.1:17420 --ingest 127.0.0.1:17421 --metrics 127.0.0.1:17422 --capacity 7000 --secret-file $dir/client --publisher-secret-file $dir/publisher --cluster-secret-file $dir/cluster --decision 127.0.0.1:17300,127.0.0.1:17310 --log-every 0 >/dev/null 2>>$dir/log & echo \$! >$dir/n3.pid;
          sleep 4"
    $R/herald-probe load --decision 127.0.0.1:17300,127.0.0.1:17310 --secret-file "$dir/client" \
      --publisher-secret-file "$dir/publisher" --clients 10000 --rate 40000 --duration 15 --warmup 0 --reconnect \
      --ingest 127.0.0.1:17411,127.0.0.1:17421 --exec-after-connect "$hook" --kill-pid "$PID_n1" --kill-after 5 \
      --exec-before-stop "$R/herald admin --decision 127.0.0.1:17300 --admin-secret-file $dir/admin status" \
      2>/dev/null | tee "$OUT/rehome.txt" || true
    pids+=("$(cat "$dir/n2.pid")" "$(cat "$dir/n3.pid")")
    stop_all
    ;;
  esac
done
