#!/usr/bin/env python3
"""The descriptor-exhaustion attack on a decision server (issue #11 item 2),
from outside: `herald decision` under `prlimit --nofile=N:N`, FLOOD idle
connections from SOURCES loopback addresses (127.0.0.2, ...), then honest
NODES requests from 127.0.0.1, each with a 1 s timeout, during the flood and
after it is dropped. Prints what was answered and how fast (medians).

Usage: tools/decision-fd-attack.py HERALD_BINARY [NOFILE=1024] [FLOOD=1100] [SOURCES=1]
Bounded: at most FLOOD connections, 20 honest requests per phase, 1 s each.
"""
import os, socket, statistics, subprocess, sys, tempfile, time

herald = sys.argv[1]
nofile = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
flood_n = int(sys.argv[3]) if len(sys.argv) > 3 else 1100
sources = int(sys.argv[4]) if len(sys.argv) > 4 else 1
NODES_REQUEST = bytes.fromhex("00000006" "31" "48524c44" "01")

d = tempfile.mkdtemp(prefix="herald-fd-attack-")
for name in ("cluster", "admin"):
    with open(os.path.join(d, name), "w") as f:
        f.write(name + "-secret-for-the-fd-attack\n")
server = subprocess.Popen(
    ["prlimit", f"--nofile={nofile}:{nofile}", herald, "decision", "--listen", "127.0.0.1:0",
     "--heartbeat", "127.0.0.1:0", "--cluster-secret-file", os.path.join(d, "cluster"),
     "--admin-secret-file", os.path.join(d, "admin"), "--log-every", "0"],
    stderr=subprocess.PIPE, text=True)
first = server.stderr.readline()
host, port = first.split("requests on ")[1].split(",")[0].strip().rsplit(":", 1)
addr = (host, int(port))


def honest(n=20):
    """n NODES requests from 127.0.0.1, one after another: (answered, median
    ms of those answered, outcomes as a string of 1 = answered, 0 = not)."""
    ok, ms, seq = 0, [], ""
    for _ in range(n):
        before = ok
        t0 = time.monotonic()
        try:
            s = socket.create_connection(addr, timeout=1.0)
            s.settimeout(max(0.01, 1.0 - (time.monotonic() - t0)))
            s.sendall(NODES_REQUEST)
            got = b""
            while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            if len(got) >= 5 and got[4] == 0xB2:
                ok += 1
                ms.append((time.monotonic() - t0) * 1000)
            s.close()
        except OSError:
            pass
        seq += "1" if ok > before else "0"
    return ok, (statistics.median(ms) if ms else float("nan")), seq


print(f"{herald}: nofile {nofile}, {flood_n} idle connections from {sources} source(s)")
print("before the flood: %d/20 answered, median %.2f ms [%s]" % honest())
flood = []
for i in range(flood_n):
    s = socket.socket()
    s.bind((f"127.0.0.{2 + i % sources}", 0))
    s.settimeout(2)
    try:
        s.connect(addr)
    except OSError:
        pass
    flood.append(s)
time.sleep(0.5)
print("during the flood: %d/20 answered, median %.2f ms [%s]" % honest())
for s in flood:
    s.close()
t0 = time.monotonic()
first_ok = None
while time.monotonic() - t0 < 15 and first_ok is None:
    if honest(1)[0]:
        first_ok = time.monotonic() - t0
print("after the flood: first answer %s after the flood was dropped; then %d/20 answered, median %.2f ms [%s]"
      % ("%.3f s" % first_ok if first_ok is not None else "none within 15 s", *honest()))
server.terminate()
server.wait()
