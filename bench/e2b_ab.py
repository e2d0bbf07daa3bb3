#!/usr/bin/env python3
"""Two (or more) nanoclaw binaries side by side, interleaved: before/after.

    $VENV/bin/python bench/e2b_ab.py --n 300 --n-warm 60 --json out.json \
        before=/path/to/old/nanoclaw after=/path/to/new/nanoclaw

Each binary gets its own daemon (`--pool base=N`, a private mount namespace,
as bench/e2b_bench.py starts them), and every measured call alternates
between them, the order rotating each round, so machine drift (other builds)
hits all alike. Rows: a raw Start of /bin/true and of `bash -l -c true` over
the unix socket from a raw-socket client (one pre-built request, read to the
last chunk: the floor of a client), the same through http.client, the e2b
SDK's `commands.run("true")` (TCP), and a warm create then the first command
(`echo hi`) through the SDK (TCP) and raw (unix socket). Prints medians and
p10-p90; --json keeps every sample (name|row -> seconds).
"""
import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2b_bench as B  # noqa: E402


def start_req(sid, token, cmd, args):
    body = B.envelope({"process": {"cmd": cmd, "args": list(args)}, "stdin": False})
    h = [
        "POST /process.Process/Start HTTP/1.1",
        "Host: localhost",
        "Content-Type: application/connect+json",
        "Connect-Protocol-Version: 1",
        "Connect-Timeout-Ms: 60000",
        f"E2b-Sandbox-Id: {sid}",
        "E2b-Sandbox-Port: 49983",
        f"X-Access-Token: {token}",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


class Raw:
    """One keep-alive unix connection, pre-built bytes, read to the last chunk."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)

    def call(self, req):
        self.s.sendall(req)
        buf = b""
        t_head = None
        while not buf.endswith(b"\r\n0\r\n\r\n"):
            d = self.s.recv(65536)
            if not d:
                raise RuntimeError("closed")
            if t_head is None:
                t_head = time.perf_counter()
            buf += d
        if b'"end"' not in buf:
            raise RuntimeError(f"no end: {buf[:300]!r}")
        return t_head, buf


def stats(xs):
    s = sorted(xs)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return med, B.percentile(s, 10), B.percentile(s, 90), s[0], s[-1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--n-warm", type=int, default=20)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--rows", default="raw,rawbash,http,sdk,warmsdk,warmraw")
    p.add_argument("--json", help="write every sample here")
    p.add_argument("bins", nargs="+", help="NAME=BINARY")
    a = p.parse_args()
    rows = a.rows.split(",")
    from e2b import Sandbox

    work = tempfile.mkdtemp(prefix="probe-b.")
    ds = {}
    try:
        for spec in a.bins:
            name, exe = spec.split("=", 1)
            d = B.Daemon(exe, work, True, ["--pool", f"base={a.pool}"], name=name)
            d.add_tenant("a")
            d.start()
            ds[name] = d
        time.sleep(3)
        res = {}
        live = {}
        for name, d in ds.items():
            rc = B.RawClient(d.keys["a"], unix=d.sock)
            sid, tok = rc.create()
            d.track("a", sid)
            sbx = Sandbox.connect(sid, **d.sdk_opts("a"))
            live[name] = (rc, sid, tok, sbx, Raw(d.sock))
        reqs = {n: (start_req(v[1], v[2], "/bin/true", []),
                    start_req(v[1], v[2], "/bin/bash", ["-l", "-c", "true"])) for n, v in live.items()}
        names = list(ds)
        # warm-up
        for _ in range(5):
            for n in names:
                rc, sid, tok, sbx, raw = live[n]
                raw.call(reqs[n][0])
                sbx.commands.run("true")
        for i in range(a.n):
            order = names[i % len(names):] + names[: i % len(names)]
            for n in order:
                rc, sid, tok, sbx, raw = live[n]
                if "raw" in rows:
                    t0 = time.perf_counter()
                    th, _ = raw.call(reqs[n][0])
                    t1 = time.perf_counter()
                    res.setdefault((n, "raw /bin/true (unix, raw socket)"), []).append(t1 - t0)
                    res.setdefault((n, "  first byte"), []).append(th - t0)
                    time.sleep(0.01)
                if "rawbash" in rows:
                    t0 = time.perf_counter()
                    raw.call(reqs[n][1])
                    res.setdefault((n, "raw bash -l -c true (unix, raw socket)"), []).append(time.perf_counter() - t0)
                    time.sleep(0.01)
                if "http" in rows:
                    t0 = time.perf_counter()
                    rc.start(sid, tok, "/bin/true")
                    res.setdefault((n, "http.client /bin/true (unix)"), []).append(time.perf_counter() - t0)
                    time.sleep(0.01)
                if "sdk" in rows:
                    t0 = time.perf_counter()
                    sbx.commands.run("true")
                    res.setdefault((n, "SDK commands.run(true) (tcp)"), []).append(time.perf_counter() - t0)
                    time.sleep(0.01)
        for i in range(a.n_warm):
            order = names[i % len(names):] + names[: i % len(names)]
            for n in order:
                d = ds[n]
                if "warmsdk" in rows:
                    t0 = time.perf_counter()
                    sbx = Sandbox.create("base", timeout=600, **d.sdk_opts("a"))
                    t1 = time.perf_counter()
                    out = sbx.commands.run("echo hi").stdout
                    t2 = time.perf_counter()
                    assert out == "hi\n", out
                    assert sbx.get_info().metadata.get("launch") == "warm"
                    res.setdefault((n, "SDK warm create -> echo hi (tcp)"), []).append(t2 - t0)
                    res.setdefault((n, "  create"), []).append(t1 - t0)
                    sbx.kill()
                    time.sleep(0.3)
                if "warmraw" in rows:
                    rc = live[n][0]
                    t0 = time.perf_counter()
                    sid, tok = rc.create()
                    t1 = time.perf_counter()
                    code, out = rc.start(sid, tok, "/bin/bash", ["-l", "-c", "echo hi"])
                    t2 = time.perf_counter()
                    assert out == b"hi\n"
                    res.setdefault((n, "raw warm create -> echo hi (unix)"), []).append(t2 - t0)
                    res.setdefault((n, "  create (raw)"), []).append(t1 - t0)
                    rc.kill(sid)
                    time.sleep(0.3)
        print(f"n={a.n} (warm n={a.n_warm}); load {open('/proc/loadavg').read().strip()}")
        keys = []
        for (n, r) in res:
            if r not in keys:
                keys.append(r)
        print("| row | " + " | ".join(f"{n} p50 (p10-p90)" for n in names) + " |")
        print("|---|" + "---:|" * len(names))
        for r in keys:
            cells = []
            for n in names:
                xs = res.get((n, r))
                if not xs:
                    cells.append("")
                    continue
                med, p10, p90, lo, hi = stats(xs)
                cells.append(f"{med*1e3:.2f} ({p10*1e3:.2f}-{p90*1e3:.2f})")
            print(f"| {r} | " + " | ".join(cells) + " |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({f"{n}|{r}": v for (n, r), v in res.items()}, f)
    finally:
        for d in ds.values():
            try:
                d.kill_all_sandboxes()
            except Exception as e:  # noqa: BLE001
                print("cleanup", e)
            d.stop()


if __name__ == "__main__":
    main()
