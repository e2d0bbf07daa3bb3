"""Small helpers shared by the benchmark scripts in bench/."""

from __future__ import annotations

import socket
import statistics


def pct(xs, p):
    """The p-th percentile of xs (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def summary(xs) -> tuple[float, float, float]:
    """Median, p10 and p90 of xs."""
    return statistics.median(xs), pct(xs, 10), pct(xs, 90)
