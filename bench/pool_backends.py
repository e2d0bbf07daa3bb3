#!/usr/bin/env python3
"""Warm pools of every backend in `nanoclaw serve`, side by side in one run.

For each backend template (native `base`, docker, gvisor, microvm) the
daemon serves two templates of the same kind: one with a warm pool of 1
(`--pool NAME=1`), one without. Measured with the unmodified e2b SDK, per
case: `Sandbox.create(template)` + `commands.run("true")` (create to first
command's end, as a user of the SDK waits for it); the kill afterwards and
the pool's refill are not timed (a warm case waits until /metrics says the
pool is full again before it starts).

Anchors in the same run, same rounds: `docker run --rm --network none IMAGE
/bin/true` and `runsc --network=none do /bin/true` (the CLIs' wall clock).

Cases are interleaved: every round runs each case once, in a rotated order,
so load drifts hit every case alike. Reported: median, p10, p90 (ms) and
ratios of medians. Root only (Docker's socket, rootful runsc, QEMU).

Only loopback and the local Docker socket are used. The daemon, its data
folder and every sandbox are removed at the end.

    sudo $VENV/bin/python bench/pool_backends.py --nanoclaw target/release/nanoclaw \
        [--rounds 10] [--backends native,docker,gvisor,microvm] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from e2b import Sandbox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, loadavg, pct  # noqa: E402

IMAGE = "nanoclaw-e2b-docker:latest"
REQUEST_TIMEOUT = 600




class Daemon:
    def __init__(self, nc: str, templates: list[str], pools: list[str]):
        self.data = tempfile.mkdtemp(prefix="nanoclaw-pool-bench-")
        os.chmod(self.data, 0o700)
        self.key = subprocess.run(
            [nc, "tenant", "add", "bench", "--data", self.data],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        self.port = free_port()
        argv = [nc, "serve", "--data", self.data, "--listen", f"tcp:127.0.0.1:{self.port}"]
        for t in templates:
            argv += ["--template", t]
        for p in pools:
            argv += ["--pool", f"{p}=1"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("nanoclaw serve did not start")
                time.sleep(0.05)
        self.opts = {"api_key": self.key, "api_url": self.url, "sandbox_url": self.url,
                     "request_timeout": REQUEST_TIMEOUT}

    def pool_ready(self, template: str) -> int:
        req = urllib.request.Request(self.url + "/metrics", headers={"X-API-Key": self.key})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        series = f'nanoclaw_pool_ready{{template="{template}"}} '
        for line in text.splitlines():
            if line.startswith(series):
                return int(float(line[len(series):]))
        return 0

    def wait_pool(self, template: str) -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while self.pool_ready(template) < 1:
            if time.monotonic() > deadline:
                sys.exit(f"the pool of {template} did not fill")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)


def sdk_case(d: Daemon, template: str, warm: bool):
    def run() -> float:
        if warm:
            d.wait_pool(template)
        t0 = time.perf_counter()
        sbx = Sandbox.create(template=template, timeout=300, **d.opts)
        r = sbx.commands.run("true")
        dt = (time.perf_counter() - t0) * 1000.0
        launch = Sandbox.get_info(sbx.sandbox_id, **d.opts).metadata.get("launch")
        sbx.kill()
        assert r.exit_code == 0
        if launch != ("warm" if warm else "cold"):
            sys.exit(f"{template}: launch {launch}, wanted {'warm' if warm else 'cold'}")
        return dt
    return run


def cli_case(argv: list[str]):
    def run() -> float:
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        dt = (time.perf_counter() - t0) * 1000.0
        if r.returncode != 0:
            sys.exit(f"{argv}: exit {r.returncode}: {r.stderr.decode(errors='replace')}")
        return dt
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanoclaw", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--backends", default="native,docker,gvisor,microvm")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("root only: Docker's socket, rootful runsc and QEMU")
    backends = a.backends.split(",")
    templates, pools, cases = [], [], {}
    for b in backends:
        if b == "native":
            templates.append("basecold=native")
            pools.append("base")
        elif b == "docker":
            templates += [f"dk=docker:{IMAGE}", f"dkcold=docker:{IMAGE}"]
            pools.append("dk")
            cases["docker run --rm (anchor)"] = cli_case(
                ["docker", "run", "--rm", "--network", "none", IMAGE, "/bin/true"])
        elif b == "gvisor":
            templates += ["gv=gvisor", "gvcold=gvisor"]
            pools.append("gv")
            cases["runsc do (anchor)"] = cli_case(
                ["runsc", "--network=none", "do", "/bin/true"])
        elif b == "microvm":
            templates += ["vm=microvm", "vmcold=microvm"]
            pools.append("vm")
        else:
            sys.exit(f"unknown backend {b}")
        cases[f"{b} warm (pool)"] = None
        cases[f"{b} cold"] = None
    twins = {"native": ("base", "basecold"), "docker": ("dk", "dkcold"),
             "gvisor": ("gv", "gvcold"), "microvm": ("vm", "vmcold")}
    d = Daemon(a.nanoclaw, templates, pools)
    try:
        for b in backends:
            warm, cold = twins[b]
            cases[f"{b} warm (pool)"] = sdk_case(d, warm, True)
            cases[f"{b} cold"] = sdk_case(d, cold, False)
        names = list(cases)
        for n in names:  # one warm-up each
            cases[n]()
        times = {n: [] for n in names}
        loads = []
        for i in range(a.rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            for n in order:
                times[n].append(cases[n]())
            loads.append(loadavg())
            print(f"round {i + 1}/{a.rounds} load {loads[-1]}", file=sys.stderr)
    finally:
        d.close()
    med = {n: statistics.median(times[n]) for n in names}
    lines = [
        f"# Warm pools per backend: create + first command (e2b SDK), {a.rounds} rounds",
        "",
        f"Host: {os.uname().release}, {os.cpu_count()} CPUs; load after each round: "
        f"{', '.join(loads)}.",
        "",
        "| case | median ms | p10 | p90 | cold / warm |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        ratio = ""
        if n.endswith("warm (pool)"):
            b = n.split()[0]
            ratio = f"{med[f'{b} cold'] / med[n]:.1f}×"
        lines.append(f"| {n} | {med[n]:.1f} | {pct(times[n], 10):.1f} | "
                     f"{pct(times[n], 90):.1f} | {ratio} |")
    anchors = [("docker", "docker run --rm (anchor)"), ("gvisor", "runsc do (anchor)")]
    for b, anchor in anchors:
        if anchor in med:
            lines.append("")
            lines.append(f"{b}: warm create+command / `{anchor.split(' (')[0]}` = "
                         f"{med[f'{b} warm (pool)'] / med[anchor]:.2f}×, cold / anchor = "
                         f"{med[f'{b} cold'] / med[anchor]:.2f}×")
    out = "\n".join(lines) + "\n"
    print(out)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(out)


if __name__ == "__main__":
    main()
