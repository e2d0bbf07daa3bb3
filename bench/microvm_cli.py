#!/usr/bin/env python3
"""`nanoclaw run --backend microvm` and `nanoclaw exec` into a micro-VM,
side by side with `docker run` / `docker exec` and the native backend.

Issue 16's performance section asks, per backend, for a cold run of
`/bin/true` and `python3 -c pass` and an exec into a live sandbox, next to
`docker run` and `docker exec`. This measures the micro-VM backend from
the CLI (the daemon's path, warm pools included, is bench/pool_backends.py):

  cold    `nanoclaw run --backend microvm -- CMD` (a VM boots, the command
          runs in the guest's native sandbox, the VM powers off), against
          `docker run --rm --network none IMAGE CMD` and `nanoclaw run --
          CMD` (native), each run's wall clock as its caller sees it
  exec    `nanoclaw exec VM -- CMD` into a VM made once with `nanoclaw
          sandbox create --backend microvm`, against `docker exec C CMD`
          into a container started once, and `nanoclaw exec` into a native
          sandbox

Every round runs each case once, in a rotated order, so load drifts hit
every case alike. Reported: median, p10, p90 (ms) and ratios of medians.
Root only (QEMU's virtiofsd, Docker's socket). Nothing but local processes
and the local Docker socket is used; the sandboxes, VM and container are
removed at the end, on errors too.

The accelerator is what `nanoclaw doctor` reports: on the machines this
project runs on, /dev/kvm boots only PVM guests, so the VM runs under
software emulation (TCG) and the numbers say what TCG costs, not KVM.

    sudo python3 bench/microvm_cli.py --nanoclaw target/x86_64-unknown-linux-gnu/release/nanoclaw \
        [--rounds 8] [--image nanoclaw-bench:latest] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import loadavg, summary  # noqa: E402

WORKLOADS = {"/bin/true": ["/bin/true"], "python3 -c pass": ["python3", "-c", "pass"]}


def timed(argv: list[str]) -> float:
    """Runs argv to its end; its wall clock in ms (a failure stops the run)."""
    t = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    ms = (time.perf_counter() - t) * 1000
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.decode()[-500:]}")
    return ms


def out(argv: list[str]) -> str:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr[-500:]}")
    return r.stdout.strip()


class Live:
    """The long-lived sandboxes and container the exec cases run in."""

    def __init__(self, nc: str, image: str):
        self.nc, tag = nc, f"bench-{os.getpid()}"
        self.vm = self.native = self.container = None
        self.vm = out([nc, "sandbox", "create", "--backend", "microvm", "--name", f"{tag}-vm",
                       "--lifetime", "1h"])
        self.native = out([nc, "sandbox", "create", "--name", f"{tag}-native", "--lifetime", "1h"])
        # The bench image has no `sleep`: a shell reading its open stdin.
        self.container = out(["docker", "run", "-d", "-i", "--network", "none",
                              "--label", f"nanoclaw-bench={os.getpid()}", image, "sh"])

    def close(self) -> None:
        for sb in (self.vm, self.native):
            if sb:
                subprocess.run([self.nc, "sandbox", "rm", sb], capture_output=True)
        if self.container:
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True)


def cases(nc: str, image: str, live: Live) -> dict[str, list[str]]:
    c = {}
    for w, cmd in WORKLOADS.items():
        c[f"cold {w} · microvm"] = [nc, "run", "--backend", "microvm", "--", *cmd]
        c[f"cold {w} · native"] = [nc, "run", "--", *cmd]
        c[f"cold {w} · docker run"] = ["docker", "run", "--rm", "--network", "none", image, *cmd]
        c[f"exec {w} · microvm"] = [nc, "exec", live.vm, "--", *cmd]
        c[f"exec {w} · native"] = [nc, "exec", live.native, "--", *cmd]
        c[f"exec {w} · docker exec"] = ["docker", "exec", live.container, *cmd]
    return c


def table(results: dict[str, list[float]]) -> list[str]:
    lines = ["| case | median | p10–p90 | / docker |", "|---|---:|---:|---:|"]
    for name, xs in results.items():
        med, p10, p90 = summary(xs)
        kind, rest = name.split(" ", 1)
        w = rest.split(" · ")[0]
        anchor = results.get(f"{kind} {w} · " + ("docker run" if kind == "cold" else "docker exec"))
        ratio = f"{med / summary(anchor)[0]:.2f}×" if anchor and anchor is not xs else "—"
        lines.append(f"| {name} | {med:.1f} ms | {p10:.1f}–{p90:.1f} ms | {ratio} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanoclaw", required=True)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--image", default=os.environ.get("NANOCLAW_BENCH_IMAGE", "nanoclaw-bench:latest"))
    ap.add_argument("--markdown", help="also write the report here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("microvm_cli.py: run as root (virtiofsd, Docker's socket)")
    accel = next((l for l in out([a.nanoclaw, "doctor"]).splitlines() if "microvm" in l.lower()),
                 "microvm: (not in doctor's report)")
    load0, t0 = loadavg(), time.time()
    live = Live(a.nanoclaw, a.image)
    try:
        cs = cases(a.nanoclaw, a.image, live)
        for argv in cs.values():  # one unmeasured run of each
            timed(argv)
        results: dict[str, list[float]] = {name: [] for name in cs}
        names = list(cs)
        for r in range(a.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                results[name].append(timed(cs[name]))
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    finally:
        live.close()
    report = [
        "### `nanoclaw run --backend microvm` and `exec` into a micro-VM, next to Docker",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))} · {os.uname().release} · "
        f"{os.cpu_count()} cpus · {a.rounds} interleaved rounds · load {load0} → {loadavg()} · "
        f"{time.time() - t0:.0f} s",
        "",
        f"`nanoclaw doctor`: {accel.strip()}",
        "",
        *table(results),
        "",
        "cold = a fresh sandbox per command (a VM boots and powers off; `docker run --rm`); "
        "exec = a command in a sandbox made once (`nanoclaw exec`; `docker exec`). "
        "Wall clock of the CLI as its caller sees it.",
        "",
        "Command: `bench/microvm_cli.py " + " ".join(sys.argv[1:]) + "`",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if a.markdown:
        with open(a.markdown, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
