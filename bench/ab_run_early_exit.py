"""A/B of two nanoclaw binaries' `run -- /bin/true` against bwrap, interleaved.

Usage: python3 bench/ab_run_early_exit.py [ROUNDS]  (NC_OLD, NC_NEW: the two
binaries; default /tmp/nc-old and /tmp/nc-new). Each round runs old, new,
bwrap once, with a 30 ms pause after each; prints medians, p10/p90 and the
ratios. Wall time includes Python's own fork/exec (≈0.5 ms per cell).
"""
import os
import statistics
import subprocess
import sys
import time

BWRAP = (
    "bwrap --unshare-all --new-session --cap-drop ALL --die-with-parent --clearenv "
    "--setenv PATH /usr/bin:/bin --uid 1000 --gid 1000 --ro-bind /usr /usr "
    "--symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 "
    "--ro-bind /etc/passwd /etc/passwd --proc /proc --dev /dev --size 104857600 "
    "--tmpfs /tmp --remount-ro / --chdir / /bin/true"
).split()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    cmds = {
        "old": [os.environ.get("NC_OLD", "/tmp/nc-old"), "run", "--", "/bin/true"],
        "new": [os.environ.get("NC_NEW", "/tmp/nc-new"), "run", "--", "/bin/true"],
        "bwrap": BWRAP,
    }
    res = {k: [] for k in cmds}
    for _ in range(rounds):
        for k, c in cmds.items():
            t = time.perf_counter()
            subprocess.run(c, stdin=subprocess.DEVNULL, check=True)
            res[k].append((time.perf_counter() - t) * 1000)
            time.sleep(0.03)
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in res.items():
        v = sorted(v)
        print(f"{k:<6} median {med[k]:.2f} ms p10 {v[len(v) // 10]:.2f} p90 {v[9 * len(v) // 10]:.2f}")
    print(
        f"old/bwrap {med['old'] / med['bwrap']:.3f} new/bwrap {med['new'] / med['bwrap']:.3f} "
        f"new/old {med['new'] / med['old']:.3f}"
    )


if __name__ == "__main__":
    main()
