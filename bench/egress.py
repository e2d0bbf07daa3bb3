#!/usr/bin/env python3
"""Transparent egress benchmark (issue 15): what the sandbox's redirect and
nanoclaw's proxy cost, against the same client without a sandbox.

Root only: it makes a test host in its own network namespace (veth pair
10.252.0.1/30 <-> 10.252.0.2, nothing leaves the machine) running a
sink/source server, then measures, interleaved round by round:

* throughput: one TCP connection downloading --mbytes MiB from the test
  host, (a) from the host's namespace directly, (b) from inside
  `nanoclaw run --network allowlist` with no proxy variables (transparent
  redirect -> proxy -> veth);
* connection latency: --conns sequential connect + 1-byte echo round
  trips, per connection, direct vs transparent (the transparent client
  resolves the name through the sandbox's DNS once, outside the timing);
* sandbox start: `nanoclaw run -- /bin/true` with `--network none` vs
  `--network allowlist --allow-host ...`.

Prints medians, p10/p90 and the ratios; --json for every number.

    sudo python3 bench/egress.py --nanoclaw target/x86_64-unknown-linux-gnu/release/nanoclaw
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

NS = "ncegbench"
HV, TV = "ncegbh", "ncegbt"
HOST_IP, TEST_IP = "10.252.0.1", "10.252.0.2"
PORT_BULK, PORT_ECHO = 9000, 9001

SERVER = r"""
import socket, sys, threading
def bulk(c):
    try:
        n = int(c.recv(32).decode().strip())
        buf = memoryview(bytearray(1 << 20))
        left = n
        while left > 0:
            k = min(left, len(buf)); c.sendall(buf[:k]); left -= k
    except OSError:
        pass
    c.close()
def echo(c):
    try:
        while True:
            b = c.recv(1)
            if not b: break
            c.sendall(b)
    except OSError:
        pass
    c.close()
def serve(port, f):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port)); l.listen(512)
    while True:
        c, _ = l.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=f, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(%d, bulk), daemon=True).start()
threading.Thread(target=serve, args=(%d, echo), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
""" % (PORT_BULK, PORT_ECHO)

# The client: run directly and inside the sandbox; prints JSON.
CLIENT = r"""
import json, socket, sys, time
host, mode, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
addr = socket.getaddrinfo(host, 0, socket.AF_INET)[0][4][0]
if mode == "bulk":
    s = socket.create_connection((addr, %d))
    t0 = time.perf_counter()
    s.sendall(b"%%d\n" %% (arg << 20))
    got = 0
    buf = bytearray(1 << 20)
    while True:
        n = s.recv_into(buf)
        if not n: break
        got += n
    dt = time.perf_counter() - t0
    print(json.dumps({"bytes": got, "seconds": dt}))
else:
    lat = []
    for _ in range(arg):
        t0 = time.perf_counter()
        s = socket.create_connection((addr, %d))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x"); s.recv(1)
        lat.append(time.perf_counter() - t0)
        s.close()
    print(json.dumps({"latencies": lat}))
""" % (PORT_BULK, PORT_ECHO)


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def setup():
    teardown()
    sh(f"ip netns add {NS}; ip link add {HV} type veth peer name {TV}; ip link set {TV} netns {NS};"
       f"ip addr add {HOST_IP}/30 dev {HV}; ip link set {HV} up;"
       f"ip netns exec {NS} ip link set lo up; ip netns exec {NS} ip addr add {TEST_IP}/30 dev {TV};"
       f"ip netns exec {NS} ip link set {TV} up")
    srv = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", SERVER],
                           stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    return srv


def teardown():
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HV], capture_output=True)


def flags():
    return ["--network", "allowlist", "--allow-host", f"bench.test:{PORT_BULK}",
            "--allow-host", f"bench.test:{PORT_ECHO}", "--add-host", f"bench.test:{TEST_IP}",
            "--allow-cidr", f"{TEST_IP}/32:{PORT_BULK}", "--allow-cidr", f"{TEST_IP}/32:{PORT_ECHO}"]


def client(nanoclaw, where, mode, arg, clientfile):
    host = TEST_IP if where == "direct" else "bench.test"
    argv = [sys.executable, "-c", CLIENT, host, mode, str(arg)]
    if where == "transparent":
        argv = [nanoclaw, "run", "--timeout", "120s", *flags(), "--", "sh", "-c",
                'unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy; exec "$@"', "_",
                "python3", "-c", CLIENT, host, mode, str(arg)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_time(nanoclaw, net):
    argv = [nanoclaw, "run"] + (flags() if net == "allowlist" else ["--network", "none"]) + ["--", "/bin/true"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - t0


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def summary(xs):
    return {"median": statistics.median(xs), "p10": q(xs, 0.1), "p90": q(xs, 0.9), "n": len(xs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanoclaw", default="target/x86_64-unknown-linux-gnu/release/nanoclaw")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mbytes", type=int, default=512)
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/egress.py needs root (it makes a test host in its own network namespace)")
    nanoclaw = os.path.abspath(a.nanoclaw)
    srv = setup()
    res = {"throughput_mib_s": {"direct": [], "transparent": []},
           "connect_ms": {"direct": [], "transparent": []},
           "start_ms": {"none": [], "allowlist": []}}
    try:
        for r in range(a.rounds):
            order = ["direct", "transparent"] if r % 2 == 0 else ["transparent", "direct"]
            for w in order:
                b = client(nanoclaw, w, "bulk", a.mbytes, None)
                res["throughput_mib_s"][w].append(b["bytes"] / b["seconds"] / (1 << 20))
                l = client(nanoclaw, w, "conn", a.conns // a.rounds or 1, None)
                res["connect_ms"][w].extend(x * 1000 for x in l["latencies"])
        for i in range(a.starts):
            for net in (["none", "allowlist"] if i % 2 == 0 else ["allowlist", "none"]):
                res["start_ms"][net].append(start_time(nanoclaw, net) * 1000)
                time.sleep(0.03)
    finally:
        srv.kill()
        teardown()
    out = {k: {w: summary(v) for w, v in d.items()} for k, d in res.items()}
    t, c, s = out["throughput_mib_s"], out["connect_ms"], out["start_ms"]
    out["ratios"] = {
        "throughput_transparent_over_direct": t["transparent"]["median"] / t["direct"]["median"],
        "added_connect_latency_ms": c["transparent"]["median"] - c["direct"]["median"],
        "start_allowlist_over_none": s["allowlist"]["median"] / s["none"]["median"],
    }
    out["load_avg"] = os.getloadavg()
    if a.json:
        out["raw"] = res
        print(json.dumps(out, indent=1))
        return
    print(f"load average {out['load_avg'][0]:.2f} (a busy machine inflates everything)")
    print("| measure | direct / none | transparent / allowlist | ratio or difference |")
    print("|---|---|---|---|")
    f = lambda d: f"{d['median']:.3g} (p10 {d['p10']:.3g}, p90 {d['p90']:.3g}, n={d['n']})"
    print(f"| throughput, MiB/s | {f(t['direct'])} | {f(t['transparent'])} | "
          f"{out['ratios']['throughput_transparent_over_direct']:.2f}x |")
    print(f"| new connection + 1-byte echo, ms | {f(c['direct'])} | {f(c['transparent'])} | "
          f"+{out['ratios']['added_connect_latency_ms']:.3f} ms |")
    print(f"| sandbox start (/bin/true), ms | {f(s['none'])} | {f(s['allowlist'])} | "
          f"{out['ratios']['start_allowlist_over_none']:.2f}x |")


if __name__ == "__main__":
    main()
