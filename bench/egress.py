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
* HTTPS request latency (new connection + TLS handshake + one GET, per
  request): (a) from the host's namespace, no sandbox; (b) from inside a
  sandbox to a host it may reach without a credential rule (TLS passed
  through untouched); (c) from the same sandbox to a host with a
  credential rule (`network.rules`: TLS intercepted with the sandbox's CA,
  the header added, verified TLS to the test host); (b) and (c)
  alternate request by request in one sandbox;
* sandbox start: `nanoclaw run -- /bin/true` with `--network none` vs
  `--network allowlist --allow-host ...` vs allowlist with a credential
  rule (its CA made at start).

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
PORT_BULK, PORT_ECHO, PORT_TLS = 9000, 9001, 9443
SECRET = "bench-secret-not-a-real-one"

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
import http.server, ssl
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer " + sys.argv[2]
        out = b"auth-ok\n" if ok else b"auth-missing\n"
        self.send_response(200); self.send_header("Content-Length", str(len(out)))
        self.end_headers(); self.wfile.write(out)
tls = http.server.ThreadingHTTPServer(("0.0.0.0", %d), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1] + "/srv.pem", sys.argv[1] + "/srv.key")
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
threading.Thread(target=serve, args=(%d, bulk), daemon=True).start()
threading.Thread(target=serve, args=(%d, echo), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
""" % (PORT_TLS, PORT_BULK, PORT_ECHO)

# The HTTPS client: targets [label, name, trust] alternate request by
# request; trust "test" is the test CA (given as argv[3]), "sandbox" the
# default bundle (inside a sandbox: the one with the sandbox's CA).
CLIENT_TLS = r"""
import http.client, json, ssl, sys, time
targets, n, ca = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctxs = {"test": ssl.create_default_context(cadata=ca), "sandbox": ssl.create_default_context()}
lat = {t[0]: [] for t in targets}
said = {}
for i in range(n):
    for label, name, trust in (targets if i %% 2 == 0 else targets[::-1]):
        t0 = time.perf_counter()
        c = http.client.HTTPSConnection(name, %d, context=ctxs[trust], timeout=30)
        c.request("GET", "/"); r = c.getresponse(); body = r.read().decode().strip()
        lat[label].append(time.perf_counter() - t0)
        c.close()
        said[label] = "%%d %%s" %% (r.status, body)
print(json.dumps({"latencies": lat, "answers": said}))
""" % PORT_TLS

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
    d = certs()
    srv = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", SERVER, d, SECRET],
                           stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    return srv


WORK = tempfile.mkdtemp(prefix="nanoclaw-egress-bench-")


def certs():
    """A test CA and a certificate for bench.test, plain.test and the test
    host's address; the config with the credential rule for bench.test."""
    os.chmod(WORK, 0o755)
    sh(f"cd {WORK} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key"
       f" -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null"
       f" && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout srv.key -out srv.csr"
       f" -subj /CN=bench.test 2>/dev/null"
       f" && printf 'subjectAltName=DNS:bench.test,DNS:plain.test,IP:{TEST_IP}\\n' > ext"
       f" && openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem"
       f" -days 2 -extfile ext 2>/dev/null && chmod 644 ca.pem")
    with open(os.path.join(WORK, "rules.yaml"), "w") as f:
        f.write("agents:\n  list:\n    - id: bench\n      sandbox:\n        mode: all\n"
                "        workspaceAccess: none\n"
                f"network:\n  upstream_ca: {WORK}/ca.pem\n  rules:\n    bench.test:\n"
                "      - transform:\n          headers:\n"
                "            Authorization: \"Bearer ${BENCH_SECRET}\"\n")
    return WORK


def tls_flags():
    f = ["--network", "allowlist", "--allow-cidr", f"{TEST_IP}/32:{PORT_TLS}"]
    for name in ("bench.test", "plain.test"):
        f += ["--allow-host", f"{name}:{PORT_TLS}", "--add-host", f"{name}:{TEST_IP}"]
    return f


def rules_args():
    return ["--config", os.path.join(WORK, "rules.yaml"), "--agent", "bench", "--fresh"]


def tls_client(nanoclaw, where, n):
    """HTTPS latencies: `direct` (no sandbox, to the address) or `sandbox`
    (plain.test passed through and bench.test intercepted, alternating)."""
    ca = open(os.path.join(WORK, "ca.pem")).read()
    if where == "direct":
        targets = [["direct", TEST_IP, "test"]]
        argv = [sys.executable, "-c", CLIENT_TLS, json.dumps(targets), str(n), ca]
    else:
        targets = [["passthrough", "plain.test", "test"], ["intercepted", "bench.test", "sandbox"]]
        argv = [nanoclaw, "run", "--timeout", "300s", *rules_args(), *tls_flags(), "--", "sh", "-c",
                'unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy; exec "$@"', "_",
                "python3", "-c", CLIENT_TLS, json.dumps(targets), str(n), ca]
    env = dict(os.environ, BENCH_SECRET=SECRET)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


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
    if net == "allowlist":
        extra = flags()
    elif net == "allowlist_rules":
        extra = rules_args() + tls_flags()
    else:
        extra = ["--network", "none"]
    argv = [nanoclaw, "run"] + extra + ["--", "/bin/true"]
    env = dict(os.environ, BENCH_SECRET=SECRET)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env)
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
    ap.add_argument("--requests", type=int, default=40, help="HTTPS requests per target per round")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/egress.py needs root (it makes a test host in its own network namespace)")
    nanoclaw = os.path.abspath(a.nanoclaw)
    srv = setup()
    res = {"throughput_mib_s": {"direct": [], "transparent": []},
           "connect_ms": {"direct": [], "transparent": []},
           "https_request_ms": {"direct": [], "passthrough": [], "intercepted": []},
           "start_ms": {"none": [], "allowlist": [], "allowlist_rules": []}}
    answers = {}
    try:
        for r in range(a.rounds):
            order = ["direct", "transparent"] if r % 2 == 0 else ["transparent", "direct"]
            for w in order:
                b = client(nanoclaw, w, "bulk", a.mbytes, None)
                res["throughput_mib_s"][w].append(b["bytes"] / b["seconds"] / (1 << 20))
                l = client(nanoclaw, w, "conn", a.conns // a.rounds or 1, None)
                res["connect_ms"][w].extend(x * 1000 for x in l["latencies"])
            for w in (["direct", "sandbox"] if r % 2 == 0 else ["sandbox", "direct"]):
                got = tls_client(nanoclaw, w, a.requests)
                answers.update(got["answers"])
                for label, xs in got["latencies"].items():
                    # The first request of a process pays its imports and
                    # (in a sandbox) the first leaf certificate: dropped.
                    res["https_request_ms"][label].extend(x * 1000 for x in xs[1:])
        nets = ["none", "allowlist", "allowlist_rules"]
        for i in range(a.starts):
            for net in (nets if i % 2 == 0 else nets[::-1]):
                res["start_ms"][net].append(start_time(nanoclaw, net) * 1000)
    finally:
        srv.kill()
        teardown()
        shutil.rmtree(WORK, ignore_errors=True)
    # The rule did its work (and only where it applies).
    assert answers.get("intercepted") == "200 auth-ok", answers
    assert answers.get("passthrough") == "200 auth-missing", answers
    out = {k: {w: summary(v) for w, v in d.items()} for k, d in res.items()}
    t, c, s = out["throughput_mib_s"], out["connect_ms"], out["start_ms"]
    h = out["https_request_ms"]
    out["ratios"] = {
        "throughput_transparent_over_direct": t["transparent"]["median"] / t["direct"]["median"],
        "added_connect_latency_ms": c["transparent"]["median"] - c["direct"]["median"],
        "https_passthrough_minus_direct_ms": h["passthrough"]["median"] - h["direct"]["median"],
        "https_intercepted_minus_direct_ms": h["intercepted"]["median"] - h["direct"]["median"],
        "https_intercepted_minus_passthrough_ms": h["intercepted"]["median"] - h["passthrough"]["median"],
        "start_allowlist_over_none": s["allowlist"]["median"] / s["none"]["median"],
        "start_allowlist_rules_over_none": s["allowlist_rules"]["median"] / s["none"]["median"],
    }
    out["answers"] = answers
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
    rt = out["ratios"]
    print(f"| sandbox start with a credential rule, ms | {f(s['none'])} | {f(s['allowlist_rules'])} | "
          f"{rt['start_allowlist_rules_over_none']:.2f}x |")
    print()
    print("| HTTPS request (connect + TLS + GET), ms | median (p10, p90, n) | minus no sandbox |")
    print("|---|---|---|")
    print(f"| no sandbox | {f(h['direct'])} | |")
    print(f"| sandbox, allowed, passed through | {f(h['passthrough'])} | "
          f"+{rt['https_passthrough_minus_direct_ms']:.2f} ms |")
    print(f"| sandbox, credential rule, intercepted | {f(h['intercepted'])} | "
          f"+{rt['https_intercepted_minus_direct_ms']:.2f} ms |")


if __name__ == "__main__":
    main()
