#!/usr/bin/env python3
"""`run_code("1+1")` in a warm context: `nanoclaw serve`'s code contexts
(issue 14, item 3) side by side with a Jupyter kernel round trip.

Rows, interleaved round by round so machine drift hits all alike:

  sdk       the unmodified e2b-code-interpreter SDK: `sandbox.run_code("1+1")`
            (it opens a new HTTP/1.1 connection per call, by design)
  raw       the same `POST /execute` (E2b-Sandbox-Port: 49999) from a
            keep-alive stdlib http.client connection: the daemon's own cost
  jupyter   jupyter_client + ipykernel: `execute("1+1")` on a warm kernel,
            until its `execute_result` and the kernel back to idle (what
            E2B's server waits for); run in a helper venv (see below)

The daemon is started here (root: a private data folder; a tenant with a
high rate limit), on loopback only, and stopped at the end with every
sandbox.

Jupyter comes from PyPI, pinned in bench/requirements-jupyter.txt, in its own
venv so the test venv stays as CI pins it:

    python3 -m venv /tmp/venv-jupyter
    /tmp/venv-jupyter/bin/pip install -r bench/requirements-jupyter.txt
    $VENV/bin/python bench/code_bench.py --nanoclaw $NC --jupyter-python /tmp/venv-jupyter/bin/python

Without --jupyter-python the jupyter row says "not measured".
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

JUPYTER_HELPER = r"""
import json, sys, time
from jupyter_client.manager import start_new_kernel
n = int(sys.argv[1]); warm = int(sys.argv[2])
km, kc = start_new_kernel(kernel_name="python3")
def once():
    t = time.perf_counter()
    msg_id = kc.execute("1+1")
    got = idle = False
    while not (got and idle):
        m = kc.get_iopub_msg(timeout=10)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "execute_result":
            got = True
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    return time.perf_counter() - t
for _ in range(warm):
    once()
print("ready", flush=True)
for line in sys.stdin:
    k = int(line)
    print(json.dumps([once() for _ in range(k)]), flush=True)
kc.stop_channels(); km.shutdown_kernel(now=True)
"""


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanoclaw", required=True, help="the nanoclaw binary")
    ap.add_argument("--jupyter-python", help="a python with jupyter_client and ipykernel")
    ap.add_argument("--iterations", type=int, default=300, help="per row")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", help="also write the report (markdown) here")
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="nanoclaw-code-bench-")
    os.chmod(data, 0o700)
    nc = args.nanoclaw
    key = subprocess.run([nc, "tenant", "add", "bench", "--rate", "100000", "--data", data],
                         check=True, capture_output=True, text=True).stdout.strip()
    port = free_port()
    daemon = subprocess.Popen([nc, "serve", "--data", data, "--listen", f"tcp:127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jup = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key,
                          E2B_DOMAIN="nanoclaw.invalid", NO_PROXY="*", no_proxy="*")
        from e2b_code_interpreter import Sandbox

        sbx = Sandbox.create(template="base", timeout=1800)
        assert sbx.run_code("1+1").text == "2"  # the default context, warm from here on
        conn = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999",
                   "X-Access-Token": sbx._envd_access_token, "Content-Type": "application/json"}
        body = json.dumps({"code": "1+1", "context_id": None, "language": None, "env_vars": None})

        def raw_once():
            t = time.perf_counter()
            conn.request("POST", "/execute", body=body, headers=headers)
            r = conn.getresponse()
            out = r.read()
            dt = time.perf_counter() - t
            assert r.status == 200 and b'"text":"2"' in out.replace(b" ", b""), out
            return dt

        def sdk_once():
            t = time.perf_counter()
            ex = sbx.run_code("1+1")
            dt = time.perf_counter() - t
            assert ex.text == "2"
            return dt

        for _ in range(20):
            raw_once()
            sdk_once()
        if args.jupyter_python:
            jup = subprocess.Popen([args.jupyter_python, "-c", JUPYTER_HELPER, "0", "20"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert jup.stdout.readline().strip() == "ready"
        rows = {"sdk": [], "raw": [], "jupyter": []}
        per = max(1, args.iterations // args.rounds)
        for _ in range(args.rounds):
            rows["raw"] += [raw_once() for _ in range(per)]
            rows["sdk"] += [sdk_once() for _ in range(per)]
            if jup:
                jup.stdin.write(f"{per}\n")
                jup.stdin.flush()
                rows["jupyter"] += json.loads(jup.stdout.readline())
        sbx.kill()
    finally:
        if jup:
            jup.stdin.close()
            jup.wait(timeout=30)
        daemon.terminate()
        daemon.wait(timeout=30)
        subprocess.run(["rm", "-rf", data])

    names = {
        "raw": "nanoclaw `POST /execute`, keep-alive client (daemon's cost)",
        "sdk": "nanoclaw via e2b-code-interpreter `run_code` (new connection per call)",
        "jupyter": "Jupyter kernel round trip (jupyter_client + ipykernel)",
    }
    lines = [
        f"# run_code(\"1+1\") in a warm context — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"{os.uname().nodename}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; "
        f"{args.iterations} calls per row, interleaved in {args.rounds} rounds.",
        "",
        "| what | n | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("raw", "sdk", "jupyter"):
        xs = rows[k]
        if not xs:
            lines.append(f"| {names[k]} | 0 | not measured | | | |")
            continue
        lines.append(f"| {names[k]} | {len(xs)} | {pct(xs, 50):.2f} | {pct(xs, 90):.2f} | "
                     f"{pct(xs, 99):.2f} | {statistics.mean(xs) * 1000:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    sys.exit(main())
