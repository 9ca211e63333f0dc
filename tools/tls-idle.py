#!/usr/bin/env python3
"""Idle memory of TLS client connections on a node (scenario D with TLS).

Opens N TLS sessions with Python's ssl module, each sends HELLO and waits
for its WELCOME, then reads the node's RSS before and after. Bounded: N
connections, one pass, then it closes them and exits.

usage: tools/tls-idle.py NODE_PID HOST:PORT CA.pem CLIENT_SECRET_FILE N
"""
import socket, ssl, sys, time, os
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
import herald_client as h

def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

pid, ep, ca, secret_file, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
host, port = ep.rsplit(":", 1)
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["herald/1"])
secret = h.read_secret(secret_file)
before = rss_kib(pid)
t0 = time.time()
socks = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
    tok = h.mint_ttl(secret, f"idle{i}")
    s.sendall(h.encode(h.HELLO, {"min_version": 1, "max_version": 1, "flags": 0, "token": tok,
                                 "agent": "tls-idle", "resume_epoch": 0, "resume_seq": 0}))
    socks.append(s)
for s in socks:
    s.settimeout(10)
    assert len(s.recv(4096)) > 0, "no WELCOME"
took = time.time() - t0
time.sleep(1.0)
after = rss_kib(pid)
print(f"tls idle: {n} sessions welcomed in {took:.2f}s ({n/took:.0f}/s from one Python client); "
      f"node rss {before} KiB before, {after} KiB after: {(after-before)*1024/n:.0f} bytes per connection")
for s in socks:
    s.close()
