#!/usr/bin/env bash
# Durable mode benchmarks (issue #14), embedded and durable in the same run.
#   rehome: CLIENTS (10,000) clients on n1; n2 and n3 join; RATE msg/s
#           published through n2 and n3; n1 is SIGKILLed KILL_AFTER s in;
#           each client's time from the kill to its new session and to its
#           first message there, and the loss / gaps / announced figures.
#           Run for MODE in embedded durable (alternating, REPS times).
#   cost:   one node, CLIENTS clients, each rate of RATES, embedded and
#           durable alternating (REPS times): node CPU per message, the
#           three nats-servers' CPU per message (summed), e2e p50/p99, and
#           which threads of the node and the servers used the CPU.
# Durable runs use a 3-server JetStream cluster on loopback (nats-server,
# config files in a temp dir, store on disk), started once for the script
# when a durable run is asked for (idle in the embedded runs after that:
# about 1 % of a core), each run on a stream of its own
# (HERALD_<scenario>_<n>, R=3), deleted after the run. Everything shares the
# machine's cores: the "cpu" line of each run gives % of a core for each
# process (js0..js2: the servers; the node(s) by thread, herald-log being
# the log thread; the probe), and "others", the rest of the machine's use
# (busy = elapsed − /proc/stat idle), to tell a contended run.
# Usage: tools/bench-durable.sh [rehome] [cost]          (default: both)
# Knobs (env): CLIENTS (10000), DUR (15: seconds measured), WARMUP (2, cost),
#   REPS (1), MODES ("embedded durable"), RATE (rehome, embedded: 40000),
#   DURABLE_RATE (rehome, durable: 10000, about the most a 2-core machine
#   shared with the three servers keeps with p99 under 100 ms), RATES (cost:
#   "10000"; each is run in both modes), KILL_AFTER (5), N1CAP (19000),
#   N23CAP (0.7 × CLIENTS), DURABLE_OPTS ("replicas=3&timeout=2s"),
#   PROBE_ARGS (extra probe flags), OUT (bench-out), BIN (a directory of
#   another build's herald and herald-probe to run instead of this tree's). A small validation run:
#   CLIENTS=1000 DUR=10 RATES="2000 5000" RATE=4000 DURABLE_RATE=4000 tools/bench-durable.sh
# Output: every run's probe output, a REHOME / COST line each, and a table
# of medians, also in $OUT/durable-<UTC time>.txt.
# Ports: decision 17700/17710, nodes 17800.., nats 17900-17902 (routes
# 17910.., monitoring 17920..); all checked free first. Only the processes
# the script started are stopped, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${BIN:-}" ]; then
  R=$BIN # another build's binaries (herald, herald-probe), for an A/B run
else
  cargo build --release --bins -q
  R=$PWD/target/release
fi
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
CLIENTS=${CLIENTS:-10000}
DUR=${DUR:-15}
WARMUP=${WARMUP:-2}
REPS=${REPS:-1}
MODES=${MODES:-embedded durable}
RATE=${RATE:-40000}
DURABLE_RATE=${DURABLE_RATE:-10000}
RATES=${RATES:-10000}
KILL_AFTER=${KILL_AFTER:-5}
N1CAP=${N1CAP:-19000}
N23CAP=${N23CAP:-$((CLIENTS * 7 / 10))}
DURABLE_OPTS=${DURABLE_OPTS:-replicas=3&timeout=2s}
scenarios=${*:-rehome cost}
stamp=$(date -u +%Y%m%dT%H%M%S)

dir=$(mktemp -d)
pids=()   # herald processes of the current run
jspids=() # the nats-servers
sampler=""
cleanup() {
  for p in "${pids[@]}" "${jspids[@]}" $sampler; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
for s in client publisher cluster admin; do echo "bench-$s-secret-0123456789" >"$dir/$s"; done

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in 17700 17710 17800 17801 17802 17810 17811 17812 17820 17821 17822 \
  17900 17901 17902 17910 17911 17912 17920 17921 17922; do
  port_free "$p" || { echo "port $p is in use (a leftover run?); stop it first" >&2; exit 1; }
done
case " $MODES " in *" durable "*)
  command -v nats-server >/dev/null || { echo "durable runs need nats-server (apt-get install -y nats-server)" >&2; exit 1; } ;;
esac

# ------------------------------------------------------------ JetStream
JS_ADDRS=127.0.0.1:17900,127.0.0.1:17901,127.0.0.1:17902
jsz() { curl -s --max-time 2 "127.0.0.1:$((17920 + $1))/jsz" 2>/dev/null || true; }
js_start() {
  [ ${#jspids[@]} -eq 0 ] || return 0
  local routes="nats://127.0.0.1:17910, nats://127.0.0.1:17911, nats://127.0.0.1:17912"
  for i in 0 1 2; do
    mkdir -p "$dir/js$i"
    cat >"$dir/js$i/nats.conf" <<EOF
server_name: hb$i
listen: 127.0.0.1:$((17900 + i))
http: 127.0.0.1:$((17920 + i))
jetstream { store_dir: "$dir/js$i/store" }
cluster {
  name: herald-bench
  listen: 127.0.0.1:$((17910 + i))
  routes: [$routes]
}
EOF
    nats-server -c "$dir/js$i/nats.conf" >/dev/null 2>>"$dir/js$i/log" &
    jspids+=($!)
    disown
  done
  # Every server knows the meta leader of a cluster of three.
  local t0=$SECONDS
  while :; do
    local ok=0
    for i in 0 1 2; do
      jsz $i | python3 -c 'import json,sys
try: m = json.load(sys.stdin)["meta_cluster"]
except Exception: sys.exit(1)
sys.exit(0 if m.get("leader") and m.get("cluster_size") == 3 else 1)' && ok=$((ok + 1))
    done
    [ $ok -eq 3 ] && break
    if [ $((SECONDS - t0)) -gt 30 ]; then
      echo "JetStream never elected a meta leader; logs:" >&2
      tail -n 5 "$dir"/js*/log >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "# JetStream: 3 nats-servers ($(nats-server --version)), pids ${jspids[*]}, meta leader after $((SECONDS - t0)) s"
}
# A JetStream API request over the NATS protocol (there is no nats CLI here).
js_api() { # subject [json]
  python3 - "$1" "${2:-}" <<'PY'
import socket, sys
subj, body = sys.argv[1], sys.argv[2].encode()
s = socket.create_connection(("127.0.0.1", 17900), timeout=10)
f = s.makefile("rb")
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.herald-bench 1\r\n'
          + b"PUB %s _INBOX.herald-bench %d\r\n%s\r\n" % (subj.encode(), len(body), body))
while True:
    line = f.readline()
    if not line:
        sys.exit(1)
    if line.startswith(b"PING"):
        s.sendall(b"PONG\r\n")
    elif line.startswith(b"MSG"):
        n = int(line.split()[-1])
        print(f.read(n + 2)[:n].decode())
        break
    elif line.startswith(b"-ERR"):
        print(line.decode().strip())
        sys.exit(1)
PY
}
js_delete() { js_api "\$JS.API.STREAM.DELETE.$1" >/dev/null || echo "# could not delete stream $1" >&2; }
durable_flag() { echo "--durable=jetstream://$JS_ADDRS/$1?$DURABLE_OPTS"; }

# ------------------------------------------------------------ herald
decision() { # port
  $R/herald decision --listen 127.0.0.1:$1 --heartbeat 127.0.0.1:$1 --cluster-secret-file "$dir/cluster" \
    --admin-secret-file "$dir/admin" --log-every 0 --max-conns-per-source 0 --source-rate 0 2>>"$dir/log" &
  pids+=($!)
  disown
}
q="'"
node_cmd() { # id port capacity [durable-flag]: the command line, the flag quoted (it has & and ?)
  echo "$R/herald node --id $1 --listen 127.0.0.1:$2 --ingest 127.0.0.1:$(($2 + 1)) --metrics 127.0.0.1:$(($2 + 2))" \
    "--capacity $3 --secret-file $dir/client --publisher-secret-file $dir/publisher" \
    "--cluster-secret-file $dir/cluster --decision 127.0.0.1:17700,127.0.0.1:17710 --log-every 0${4:+ $q$4$q}"
}
wait_listen() { for _ in $(seq 150); do port_free "$1" || return 0; sleep 0.1; done; echo "# nothing listens on $1" >&2; }
metric() { curl -s --max-time 2 "127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m || $1 ~ "^"m"[{]" {s += $2} END {print s + 0}'; }
stop_all() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pids=()
  sleep 1
}

# CPU by process and thread, sampled every 0.5 s from /proc (bounded: at
# most 20 minutes): the processes named label=PID (or label=@FILE, a pid
# file that may appear later), every herald-probe process of this build
# (label probe), and the whole machine (/proc/stat's idle time), so that a run says
# which thread spent the CPU and how much other work shared the machine.
cat >"$dir/sample.py" <<'PY'
import os, sys, time
out, probe_exe = open(sys.argv[1], "w"), sys.argv[2]
named = [a.split("=", 1) for a in sys.argv[3:]]
end = time.time() + 1200
while time.time() < end:
    t = time.time()
    with open("/proc/stat") as st:
        c = [int(x) for x in st.readline().split()[1:]]
    # Idle time is kept exactly (tickless); user and system time are
    # sampled at ticks and miss short bursts, so busy = elapsed - idle.
    out.write(f"{t:.3f} machine all idle {c[3] + c[4]}\n")
    procs = []
    for label, p in named:
        if p.startswith("@"):
            try:
                p = open(p[1:]).read().strip()
            except OSError:
                continue
        procs.append((label, p))
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/exe") == probe_exe:
                    procs.append(("probe", p))
            except OSError:
                pass
    for label, p in procs:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                s = open(f"/proc/{p}/task/{tid}/stat").read()
            except OSError:
                continue
            comm = s[s.index("(") + 1 : s.rindex(")")].replace(" ", "_")
            f = s[s.rindex(")") + 2 :].split()
            out.write(f"{t:.3f} {label} {tid} {comm} {int(f[11]) + int(f[12])}\n")
    out.flush()
    time.sleep(0.5)
PY
sample() { # label=PID|label=@FILE... : starts the sampler
  python3 "$dir/sample.py" "$dir/samples" "$R/herald-probe" "$@" &
  sampler=$!
  disown
}
# The samples within [t0, t1] as one line: % of a core for each process,
# and for the node(s) each thread; "others" is the machine less all those.
cpu_line() { # t0 t1
  kill -9 "$sampler" 2>/dev/null || true
  sampler=""
  python3 - "$dir/samples" "$1" "$2" <<'PY'
import collections, os, sys
path, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
hz = os.sysconf("SC_CLK_TCK")
first, last = {}, {}
for line in open(path):
    t, label, tid, comm, ticks = line.split()
    t, ticks = float(t), int(ticks)
    if t0 <= t <= t1:
        first.setdefault((label, tid, comm), (t, ticks))
        last[(label, tid, comm)] = (t, ticks)
span = max((last[k][0] - v[0] for k, v in first.items() if k[0] == "machine"), default=0) or 1.0
proc, thread = collections.defaultdict(float), collections.defaultdict(float)
for k, (ta, a) in first.items():
    v = (last[k][1] - a) / hz / span * 100
    proc[k[0]] += v
    thread[(k[0], k[2])] += v
machine = os.cpu_count() * 100 - proc.pop("machine", 0.0)
parts = [f"{l}={v:.0f}%" for l, v in sorted(proc.items())]
parts += [f"{l}:{c}={v:.0f}%" for (l, c), v in sorted(thread.items()) if l.startswith("n") and v >= 1]
parts.append(f"others={machine - sum(proc.values()):.0f}%")
parts.append(f"machine={machine:.0f}%/{os.cpu_count() * 100}%")
print(f"cpu            over {span:.1f} s of publishing, % of a core: " + " ".join(parts))
PY
  rm -f "$dir/samples"
}
window() { # the probe's measured window from the time its clients were connected: t0 t1
  local tc; tc=$(cat "$dir/t_connected" 2>/dev/null || echo 0)
  rm -f "$dir/t_connected"
  python3 -c "print($tc + 0.6 + $1, $tc + 0.5 + $1 + $DUR)"
}

# ------------------------------------------------------------ scenarios
run_n=0
probe() { # label args... ; runs herald-probe, keeps its output in $dir/last
  local label=$1 shown="" prev=""; shift
  for a in "$@"; do case $prev in --exec-*) shown+=" '…'" ;; *) shown+=" $a" ;; esac; prev=$a; done
  echo "### $label: herald-probe load$shown"
  # shellcheck disable=SC2086 # PROBE_ARGS is flags
  $R/herald-probe load --secret-file "$dir/client" --publisher-secret-file "$dir/publisher" \
    --clients "$CLIENTS" --duration "$DUR" ${PROBE_ARGS:-} "$@" >"$dir/last" 2>"$dir/probe.err" || true
  cat "$dir/last"
  grep -a 'FAIL\|killed pid' "$dir/probe.err" | tr '\r' '\n' | grep -a 'FAIL\|killed' || true
}

rehome() { # mode
  local mode=$1 rate=$RATE flag="" stream=""
  run_n=$((run_n + 1))
  if [ "$mode" = durable ]; then
    js_start
    rate=$DURABLE_RATE
    stream=HERALD_rehome_$run_n
    flag=$(durable_flag "$stream")
  fi
  decision 17700; decision 17710; sleep 0.3
  eval "$(node_cmd n1 17800 "$N1CAP" "$flag") >/dev/null 2>>$dir/log &"
  pids+=($!); local n1=$!
  disown
  wait_listen 17800; sleep 1.5
  # n2 and n3 join once the clients sit on n1; the hook waits for the mesh.
  local hook="$(node_cmd n2 17810 "$N23CAP" "$flag") >/dev/null 2>>$dir/log & echo \$! >$dir/n2.pid;
    $(node_cmd n3 17820 "$N23CAP" "$flag") >/dev/null 2>>$dir/log & echo \$! >$dir/n3.pid; sleep 5; date +%s.%N >$dir/t_connected"
  # shellcheck disable=SC2046 # one label=pid word each
  sample n1=$n1 n2=@$dir/n2.pid n3=@$dir/n3.pid $([ "$mode" = embedded ] || echo "js0=${jspids[0]} js1=${jspids[1]} js2=${jspids[2]}")
  probe "rehome $mode ($stream): $CLIENTS clients on n1, n1 killed ${KILL_AFTER}s into $rate msg/s through n2+n3" \
    --decision 127.0.0.1:17700,127.0.0.1:17710 --rate "$rate" --warmup 0 --reconnect \
    --ingest 127.0.0.1:17811,127.0.0.1:17821 --exec-after-connect "$hook" --kill-pid "$n1" --kill-after "$KILL_AFTER" \
    --exec-before-stop "$R/herald admin --decision 127.0.0.1:17700 --admin-secret-file $dir/admin status"
  # shellcheck disable=SC2046 # t0 t1
  cpu_line $(window 0)
  for f in n2 n3; do [ ! -s "$dir/$f.pid" ] || pids+=("$(cat "$dir/$f.pid")"); done
  rm -f "$dir/n2.pid" "$dir/n3.pid"
  local extra=""
  if [ "$mode" = durable ]; then
    extra=" appended=$(($(metric 17812 herald_durable_appended_total) + $(metric 17822 herald_durable_appended_total)))"
    extra+=" refused=$(($(metric 17812 herald_durable_refused_total) + $(metric 17822 herald_durable_refused_total)))"
  fi
  # The figures issue #14 asks for, on one line.
  awk -v mode="$mode" -v rate="$rate" -v extra="$extra" '
    /^received/ {for (i = 1; i <= NF; i++) {if ($i == "loss") l = $(i+1); if ($i == "gaps" && $(i-1) == "silent") sg = $(i+1); if ($i == "gaps" && $(i-1) == "announced") ag = $(i+1); if ($i == "reconnects") rc = $(i+1)}}
    /^published/ {sent = $2}
    /re-welcomed/ {w50 = $(NF-7); w99 = $(NF-4); wn = $2}
    /first message after/ {m50 = $(NF-7); m99 = $(NF-4); mmax = $(NF-1); mn = $2}
    END {printf "REHOME mode=%s clients='"$CLIENTS"' rate=%s sent=%s loss=%s silent_gaps=%s announced_gaps=%s reconnects=%s welcomed=%s welcome_p50_ms=%s welcome_p99_ms=%s first_msg=%s first_msg_p50_ms=%s first_msg_p99_ms=%s first_msg_max_ms=%s%s\n", mode, rate, sent, l, sg, ag, rc, wn, w50, w99, mn, m50, m99, mmax, extra}
  ' "$dir/last" | tee -a "$dir/summary"
  stop_all
  [ -z "$stream" ] || js_delete "$stream"
}

cost() { # mode rate
  local mode=$1 rate=$2 flag="" stream="" watch=""
  run_n=$((run_n + 1))
  if [ "$mode" = durable ]; then
    js_start
    stream=HERALD_cost_$run_n
    flag=$(durable_flag "$stream")
  fi
  $R/herald node --id bench --listen 127.0.0.1:17800 --ingest 127.0.0.1:17801 --metrics 127.0.0.1:17802 \
    --secret-file "$dir/client" --publisher-secret-file "$dir/publisher" --log-every 0 --drain-window 1s \
    ${flag:+"$flag"} 2>>"$dir/log" &
  pids+=($!); local node=$!
  disown
  wait_listen 17800
  local nodepids=$node
  [ "$mode" = embedded ] || nodepids+=",$(IFS=,; echo "${jspids[*]}")"
  # shellcheck disable=SC2046 # one label=pid word each
  sample node=$node $([ "$mode" = embedded ] || echo "js0=${jspids[0]} js1=${jspids[1]} js2=${jspids[2]}")
  probe "cost $mode ${stream:+($stream) }$CLIENTS clients $rate msg/s, 1 node" \
    --node 127.0.0.1:17800 --ingest 127.0.0.1:17801 --rate "$rate" --warmup "$WARMUP" --node-pid "$nodepids" \
    --exec-after-connect "date +%s.%N >$dir/t_connected"
  # shellcheck disable=SC2046 # t0 t1
  cpu_line $(window "$WARMUP") >>"$dir/last"
  tail -n 1 "$dir/last"
  local extra=""
  if [ "$mode" = durable ]; then
    extra=" appended=$(metric 17802 herald_durable_appended_total) refused=$(metric 17802 herald_durable_refused_total)"
  fi
  # The per-pid lines: the node first, then the three servers.
  awk -v mode="$mode" -v rate="$rate" -v node="$node" -v extra="$extra" '
    /^node pid/ && /per delivered/ {for (i = 1; i <= NF; i++) if ($i == "µs") us = $(i-1); for (i = 1; i <= NF; i++) if ($i == "cpu") c = $(i+1); sub("s$", "", c)
      if ($3 == node) {nus = us; ncpu = c} else {jus += us; jcpu += c; nj++}}
    /^SUMMARY/ {for (i = 2; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}}
    /^cpu/ {for (i = 2; i <= NF; i++) {split($i, kv, "="); sub("%.*", "", kv[2]); cp[kv[1]] = kv[2]}}
    END {printf "COST mode=%s clients=%s rate=%s sent=%s received=%s loss=%s p50=%s p99=%s p999=%s max=%s node_cpu_us_per_msg=%s node_cpu_pct=%.0f nats_cpu_us_per_msg=%s nats_cpu_pct=%.0f log_thread_pct=%s probe_pct=%s others_pct=%s machine_pct=%s%s\n",
      mode, v["clients"], rate, v["sent"], v["received"], v["loss"], v["p50"], v["p99"], v["p999"], v["max"], nus, ncpu / '"$DUR"' * 100,
      (nj ? sprintf("%.2f", jus) : "0"), jcpu / '"$DUR"' * 100, (cp["node:herald-log"] == "" ? 0 : cp["node:herald-log"]), cp["probe"], cp["others"], cp["machine"], extra}
  ' "$dir/last" | tee -a "$dir/summary"
  stop_all
  [ -z "$stream" ] || js_delete "$stream"
}

# Modes alternate: embedded durable, then durable embedded, and so on.
modes_for() { # rep
  if [ $(($1 % 2)) -eq 1 ]; then echo $MODES; else echo $MODES | tr ' ' '\n' | tac | tr '\n' ' '; fi
}
exec > >(tee "$OUT/durable-$stamp.txt") 2>&1
echo "# tools/bench-durable.sh $scenarios, $(date -u '+%F %T') UTC, $(git log -1 --format=%h), CLIENTS=$CLIENTS DUR=$DUR REPS=$REPS MODES='$MODES' RATE=$RATE DURABLE_RATE=$DURABLE_RATE RATES='$RATES'${BIN:+ BIN=$BIN} load $(cut -d' ' -f1-3 /proc/loadavg)"
for s in $scenarios; do
  case $s in
    rehome) for i in $(seq "$REPS"); do for m in $(modes_for "$i"); do rehome "$m"; done; done ;;
    cost) for rate in $RATES; do for i in $(seq "$REPS"); do for m in $(modes_for "$i"); do cost "$m" "$rate"; done; done; done ;;
    *) echo "unknown scenario $s (rehome, cost)" >&2; exit 2 ;;
  esac
done
if [ -s "$dir/summary" ]; then
  echo
  echo "## summary"
  cat "$dir/summary"
  echo
  echo "## medians, as markdown rows"
  python3 - "$dir/summary" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    w = line.split()
    kv = dict(p.split("=", 1) for p in w[1:] if "=" in p)
    rows[(w[0], kv["mode"], int(kv["rate"]))].append(kv)
def med(rs, k, f="{:.0f}"):
    try:
        return f.format(statistics.median(float(r[k]) for r in rs))
    except (KeyError, ValueError):
        return "—"
if any(k[0] == "REHOME" for k in rows):
    print("| mode | rate msg/s | kill → WELCOME p50 / p99 ms | kill → first message p50 / p99 / max ms | lost (announced) | silent gaps | log refused | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, mode, rate), rs in sorted(rows.items(), key=lambda x: (x[0][2], x[0][1] != "embedded")):
        if kind == "REHOME":
            lost = ", ".join(f"{r['loss']} ({r['announced_gaps']})" for r in rs)
            print(f"| {mode} | {rate} | {med(rs, 'welcome_p50_ms')} / {med(rs, 'welcome_p99_ms')} | {med(rs, 'first_msg_p50_ms')} / {med(rs, 'first_msg_p99_ms')} / {med(rs, 'first_msg_max_ms')} | {lost} | {sum(int(r['silent_gaps']) for r in rs)} | {med(rs, 'refused')} | {len(rs)} |")
if any(k[0] == "COST" for k in rows):
    print("| mode | rate msg/s | p50 µs | p99 µs | node CPU µs/msg | log thread % of a core | nats-servers CPU µs/msg (sum of 3) | node + servers µs/msg | others % of a core | loss | log refused | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, mode, rate), rs in sorted(rows.items(), key=lambda x: (x[0][2], x[0][1] != "embedded")):
        if kind == "COST":
            both = statistics.median(float(r["node_cpu_us_per_msg"]) + float(r["nats_cpu_us_per_msg"]) for r in rs)
            loss = ", ".join(r["loss"] for r in rs)
            print(f"| {mode} | {rate} | {med(rs, 'p50')} | {med(rs, 'p99')} | {med(rs, 'node_cpu_us_per_msg', '{:.1f}')} | {med(rs, 'log_thread_pct')} | {med(rs, 'nats_cpu_us_per_msg', '{:.1f}')} | {both:.1f} | {med(rs, 'others_pct')} | {loss} | {med(rs, 'refused')} | {len(rs)} |")
PY
fi
echo "# written to $OUT/durable-$stamp.txt"
