#!/usr/bin/env python3
"""nanoclaw's Docker backend next to plain Docker, side by side in one run.

Cases (interleaved: every round runs each case once, in a rotated order, so
load drifts hit every case alike):

  run-true     nanoclaw run --backend docker --image IMG -- /bin/true
               vs  docker run --rm --network none IMG /bin/true
  run-python   the same with python3 -c pass
  exec-true    nanoclaw exec ID -- /bin/true (a `sandbox create --backend docker`)
               vs  docker exec CID /bin/true (a `docker run -d` container)

Reports the median, p10 and p90 (ms) per case and the ratio of medians
nanoclaw / docker. Wall-clock of the whole CLI process, as a user sees it.

Usage: bench/docker_backend.py --nanoclaw BIN [--image nanoclaw-bench:latest]
       [--rounds 30] [--json OUT.json] [--markdown OUT.md]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time


def timed(argv):
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = (time.perf_counter() - t0) * 1000.0
    if r.returncode != 0:
        sys.exit(f"{argv}: exit {r.returncode}: {r.stderr.decode(errors='replace')}")
    return dt


def pct(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanoclaw", required=True)
    ap.add_argument("--image", default="nanoclaw-bench:latest")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    nc, img = a.nanoclaw, a.image

    sid = subprocess.run([nc, "sandbox", "create", "--backend", "docker", "--image", img, "--lifetime", "1h"],
                         check=True, capture_output=True, text=True).stdout.strip()
    cid = subprocess.run(["docker", "run", "-d", "--network", "none", img, "python3", "-c",
                          "import time; time.sleep(3600)"], check=True, capture_output=True, text=True).stdout.strip()
    cases = {
        "run-true": ([nc, "run", "--backend", "docker", "--image", img, "--", "/bin/true"],
                     ["docker", "run", "--rm", "--network", "none", img, "/bin/true"]),
        "run-python": ([nc, "run", "--backend", "docker", "--image", img, "--", "python3", "-c", "pass"],
                       ["docker", "run", "--rm", "--network", "none", img, "python3", "-c", "pass"]),
        "exec-true": ([nc, "exec", sid, "--", "/bin/true"], ["docker", "exec", cid, "/bin/true"]),
    }
    runs = [(name, who, argv) for name, pair in cases.items() for who, argv in zip(("nanoclaw", "docker"), pair)]
    times = {(n, w): [] for n, w, _ in runs}
    try:
        for argv in (r[2] for r in runs):  # warm-up
            timed(argv)
        for i in range(a.rounds):
            k = i % len(runs)
            for name, who, argv in runs[k:] + runs[:k]:
                times[(name, who)].append(timed(argv))
    finally:
        subprocess.run([nc, "sandbox", "rm", sid], capture_output=True)
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)

    out = {"rounds": a.rounds, "image": img, "cases": {}}
    lines = [f"Docker backend vs plain Docker, {a.rounds} interleaved rounds, image {img} (ms, wall clock of the CLI)", "",
             "| case | nanoclaw median (p10–p90) | docker median (p10–p90) | ratio |", "|---|---|---|---|"]
    for name in cases:
        n, d = times[(name, "nanoclaw")], times[(name, "docker")]
        mn, md = statistics.median(n), statistics.median(d)
        out["cases"][name] = {
            "nanoclaw": {"median": mn, "p10": pct(n, 10), "p90": pct(n, 90), "samples": n},
            "docker": {"median": md, "p10": pct(d, 10), "p90": pct(d, 90), "samples": d},
            "ratio": mn / md,
        }
        lines.append(f"| {name} | {mn:.1f} ({pct(n, 10):.1f}–{pct(n, 90):.1f}) | "
                     f"{md:.1f} ({pct(d, 10):.1f}–{pct(d, 90):.1f}) | {mn / md:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
