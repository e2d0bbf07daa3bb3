#!/usr/bin/env python3
"""`nanoclaw serve` driven by the real e2b SDK, side by side with Docker.

Measures (issue 12, performance), interleaving nanoclaw and Docker runs in the
same process so machine drift hits both alike:

  a  create -> first command's output (cold; and from a warm pool when the
     daemon has one): e2b `Sandbox.create()` + `commands.run("echo hi")` vs
     Docker `containers.create` + `start` + `exec_run`
  b  a command's round trip in a live sandbox: `commands.run("true")` vs
     Docker `exec_run("true")`
  c  N sandboxes created at once (threads), 3 commands each: errors, latency
     percentiles, wall time; Docker the same
  d  one-shot `POST /v1/run` runs/s with C concurrent clients vs `docker run
     --rm` through the API (reported "not available" if the route is absent)
  e  the daemon's own memory (VmRSS/VmHWM) with 0, 100 and N idle sandboxes,
     and memory per sandbox (MemAvailable delta, PSS of keepers + sandboxes);
     Docker's the same

Transport: the e2b SDK speaks HTTP over TCP only (pyqwest/httpx cannot dial a
unix socket), so the SDK rows use TCP loopback. The daemon also listens on a
unix socket, and a small raw HTTP/1.1 client (stdlib http.client, keep-alive,
the same requests the SDK makes: POST /v2/sandboxes, Connect `Start`, DELETE)
measures over it and over TCP: that separates the SDK's own cost and the
transport's from the daemon's.

Docker is driven through the Docker Engine API with the `docker` Python SDK
(pinned in tests/python/requirements.txt), containers with `--network none`
like nanoclaw's default empty network namespace. The bench image has no
`sleep`, so a live container runs `sh -c 'read _'` with stdin kept open.

Only loopback and the local Docker socket are used. Everything this creates
(sandboxes, containers, the daemon, temp dirs) is removed at the end, on
errors and on SIGINT/SIGTERM/SIGHUP. Containers carry the label
`nanoclaw-e2b-bench=<pid>`; a later run removes those of dead runs.

Isolation: `nanoclaw serve` keeps its keepers' state in a machine-wide folder
(/run/nanoclaw/serve/sandboxes as root) and re-adopts whatever it finds there
at start-up, so two daemons on one machine (another test run, say) would
adopt each other's sandboxes. As root this benchmark therefore runs its daemon
in a private mount namespace with a fresh tmpfs on /run/nanoclaw
(`--shared-state` turns that off).

    bench/e2b_bench.sh --quick --out          # writes bench/results/<date>-e2b.md (+ .json)
    $VENV/bin/python bench/e2b_bench.py --full --idle 1000 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures as cf
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_DEFAULT = "nanoclaw-bench:latest"
LABEL = "nanoclaw-e2b-bench"
TEMPLATE = "base"
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Every loopback-only guard the pytest suite uses, for the SDK's env lookups.
os.environ["E2B_DOMAIN"] = "nanoclaw.invalid"
os.environ.pop("E2B_DEBUG", None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"
for _v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_v, None)


class Interrupted(Exception):
    """A signal asked us to stop; cleanup follows in `finally`."""


STOP = threading.Event()


def log(msg: str) -> None:
    print(f"[e2b-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics


def percentile(sorted_xs, p):
    """Nearest-rank percentile (as crates/bench/src/stats.rs)."""
    n = len(sorted_xs)
    rank = int(-(-(p / 100.0) * n // 1))  # ceil
    return sorted_xs[min(max(rank, 1), n) - 1]


def summarize(xs):
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return {
        "n": n,
        "median": med,
        "p10": percentile(s, 10),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "min": s[0],
        "max": s[-1],
        "mean": sum(s) / n,
    }


def ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f} ms"
    if v >= 10:
        return f"{v:.1f} ms"
    return f"{v:.2f} ms"


def secs(v):
    return f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def mib(b):
    return "—" if b is None else f"{b / 1048576:.1f} MiB"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return "—"
    return f"{a / b:.2f}×"


# ---------------------------------------------------------------- machine


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def loadavg():
    return read("/proc/loadavg").split()[:3]


def meminfo():
    out = {}
    for line in read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0]) * 1024
    return out


def kernel_mem():
    """Slab + KernelStack + PageTables (bytes): the kernel's share of a
    sandbox (namespaces, cgroups, page tables), less moved by other
    processes' page cache than MemAvailable."""
    m = meminfo()
    return m.get("Slab", 0) + m.get("KernelStack", 0) + m.get("PageTables", 0)


def proc_status(pid):
    st = {}
    for line in read(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        st[k] = v.strip()
    return st


def kb_field(st, key):
    v = st.get(key)
    return int(v.split()[0]) * 1024 if v else None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pss(pid):
    for line in read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_model():
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def proc_table():
    """pid -> (comm, ppid, utime+stime ticks, cutime+cstime ticks, start time)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        s = read(f"/proc/{d}/stat")
        if not s:
            continue
        try:
            comm = s[s.index("(") + 1 : s.rindex(")")]
            f = s[s.rindex(")") + 2 :].split()
            out[int(d)] = (comm, int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14]), int(f[19]))
        except (ValueError, IndexError):
            continue
    return out


def exe_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def cpu_stat():
    """Per-cpu (busy, total) ticks from /proc/stat."""
    out = {}
    for line in read("/proc/stat").splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            f = line.split()
            v = [int(x) for x in f[1:]]
            idle = v[3] + v[4]
            out[f[0]] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


DOCKER_COMMS = ("dockerd", "containerd", "containerd-shim", "containerd-shi", "runc", "docker-init", "docker-proxy")


class CpuWindow:
    """CPU use of each core over a section, and who used it.

    Processes are put in groups: "nanoclaw" (every process running the
    benchmark's nanoclaw binary: daemon, keepers, and their descendants: the
    sandboxes), "docker" (dockerd, containerd, shims, runc and their
    descendants: the containers), "client" (this Python process and its
    other children), kernel threads, and "other" processes (e.g. a build on
    a shared machine). A group's time includes the children it reaped.
    What /proc/stat counts as busy beyond that is "unattributed": processes
    that started and ended inside the window and were reaped by init, such
    as killed sandboxes' keepers (they double-fork) and short-lived foreign
    processes.
    """

    def __init__(self, nanoclaw_exe):
        self.exe = os.path.realpath(nanoclaw_exe)
        self.t0 = time.monotonic()
        self.load0 = loadavg()
        self.cpu0 = cpu_stat()
        self.p0 = proc_table()

    def _groups(self, table):
        children = collections.defaultdict(list)
        for pid, (_, ppid, *_) in table.items():
            children[ppid].append(pid)
        group = {}

        def mark(roots, name):
            stack = list(roots)
            while stack:
                p = stack.pop()
                if p in group:
                    continue
                group[p] = name
                stack.extend(children.get(p, ()))

        for pid, (_, ppid, *_) in table.items():
            if pid == 2 or ppid == 2:
                group[pid] = "kernel"
        mark([p for p, (c, *_) in table.items() if c.startswith("nanoclaw") and exe_of(p) == self.exe], "nanoclaw")
        mark([p for p, (c, *_) in table.items() if c in DOCKER_COMMS or c.startswith("containerd-shim")], "docker")
        mark([os.getpid()], "client")
        return group

    def close(self):
        dt = max(time.monotonic() - self.t0, 1e-6)
        cpu1 = cpu_stat()
        p1 = proc_table()
        group = self._groups(p1)
        cores, busy_ticks = {}, 0
        for c, (b1, t1) in sorted(cpu1.items()):
            b0, t0 = self.cpu0.get(c, (b1, t1))
            cores[c] = 100.0 * (b1 - b0) / max(t1 - t0, 1)
            busy_ticks += b1 - b0
        busy = busy_ticks / HZ / dt  # cores busy, from /proc/stat
        use = collections.Counter()
        by_comm = collections.Counter()
        for pid, (comm, _, ticks, cticks, start) in p1.items():
            before = self.p0.get(pid)
            if before is None or before[4] != start:  # (kworkers rename themselves: not comm)
                before = (comm, 0, 0, 0, start)  # born during the window
            own = (ticks - before[2]) / HZ / dt
            reaped = (cticks - before[3]) / HZ / dt
            g = group.get(pid, "other")
            if g == "kernel":
                use[g] += own
            elif g == "other":
                use[g] += own  # (a foreign parent's reaped children are not ours to name)
                if own > 0:
                    by_comm[comm] += own
            else:
                use[g] += own + reaped
        named = sum(use.values())
        return {
            "seconds": dt,
            "load_start": self.load0,
            "load_end": loadavg(),
            "core_busy_pct": cores,
            "cores_busy": busy,
            "cores": {k: use[k] for k in ("client", "nanoclaw", "docker", "kernel", "other")},
            "cores_unattributed": max(0.0, busy - named),
            "others_top": [(c, round(v, 2)) for c, v in by_comm.most_common(4) if v >= 0.02],
        }


def cpu_line(w):
    cores = ", ".join(f"{c} {v:.0f}%" for c, v in w["core_busy_pct"].items())
    others = ", ".join(f"{c} {v:.2f}" for c, v in w["others_top"]) or "none"
    g = w["cores"]
    busy = g["other"] >= 0.25
    flag = " **A core was busy with other work: times are inflated.**" if busy else ""
    return (
        f"CPU over {w['seconds']:.0f} s: busy {cores} ({w['cores_busy']:.2f} cores). In cores: benchmark client "
        f"{g['client']:.2f}, nanoclaw {g['nanoclaw']:.2f}, docker {g['docker']:.2f}, kernel threads "
        f"{g['kernel']:.2f}, other processes {g['other']:.2f} ({others}), unattributed "
        f"{w['cores_unattributed']:.2f}. Load {' '.join(w['load_start'])} → {' '.join(w['load_end'])}.{flag}"
    )


# ---------------------------------------------------------------- raw HTTP client


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=120):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def envelope(obj, flags=0):
    b = json.dumps(obj).encode()
    return struct.pack(">BI", flags, len(b)) + b


def parse_envelopes(body):
    out, i = [], 0
    while i + 5 <= len(body):
        flags, n = struct.unpack(">BI", body[i : i + 5])
        out.append((flags, json.loads(body[i + 5 : i + 5 + n] or b"{}")))
        i += 5 + n
    return out


class RawClient:
    """The SDK's requests, by hand, over one keep-alive connection (not thread-safe)."""

    def __init__(self, api_key, unix=None, tcp=None):
        self.api_key = api_key
        self.unix, self.tcp = unix, tcp
        self.conn = None

    def _connect(self):
        if self.unix:
            return UnixHTTPConnection(self.unix)
        host, port = self.tcp
        return http.client.HTTPConnection(host, port, timeout=120)

    def request(self, method, path, body=None, headers=None):
        h = {"Host": "localhost"}
        h.update(headers or {})
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def create(self, timeout_s=600):
        body = json.dumps({"templateID": TEMPLATE, "timeout": timeout_s, "metadata": {}, "envVars": {}})
        st, data = self.request(
            "POST", "/v2/sandboxes", body, {"X-API-Key": self.api_key, "Content-Type": "application/json"}
        )
        if st != 201:
            raise RuntimeError(f"POST /v2/sandboxes: HTTP {st}: {data[:200]!r}")
        j = json.loads(data)
        return j["sandboxID"], j.get("envdAccessToken")

    def start(self, sid, token, cmd, args=()):
        """Connect `Start` (server stream); returns (exit code, stdout bytes)."""
        h = {
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
            "Connect-Timeout-Ms": "60000",
            "E2b-Sandbox-Id": sid,
            "E2b-Sandbox-Port": "49983",
        }
        if token:
            h["X-Access-Token"] = token
        req = envelope({"process": {"cmd": cmd, "args": list(args)}, "stdin": False})
        st, data = self.request("POST", "/process.Process/Start", req, h)
        if st != 200:
            raise RuntimeError(f"Start: HTTP {st}: {data[:200]!r}")
        out, code, ended = b"", None, False
        for flags, msg in parse_envelopes(data):
            if flags & 2:
                if msg.get("error"):
                    raise RuntimeError(f"Start: {msg['error']}")
                continue
            ev = msg.get("event", {})
            if "data" in ev and "stdout" in ev["data"]:
                out += base64.b64decode(ev["data"]["stdout"])
            if "end" in ev:
                code, ended = ev["end"].get("exitCode", 0), True
        if not ended:
            raise RuntimeError("Start: no end event")
        return code, out

    def kill(self, sid):
        st, data = self.request("DELETE", f"/sandboxes/{sid}", None, {"X-API-Key": self.api_key})
        if st not in (204, 404):
            raise RuntimeError(f"DELETE /sandboxes/{sid}: HTTP {st}: {data[:200]!r}")

    def list_ids(self):
        ids, token = [], None
        while True:
            path = "/v2/sandboxes?limit=100" + (f"&nextToken={token}" if token else "")
            if self.conn is None:
                self.conn = self._connect()
            self.conn.request("GET", path, headers={"Host": "localhost", "X-API-Key": self.api_key})
            r = self.conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET /v2/sandboxes: HTTP {r.status}: {data[:200]!r}")
            ids += [x["sandboxID"] for x in json.loads(data)]
            token = r.getheader("x-next-token")
            if not token:
                return ids


# ---------------------------------------------------------------- the daemon


class Daemon:
    def __init__(self, exe, workdir, isolate, extra_args=(), name="main"):
        self.exe = exe
        self.dir = os.path.join(workdir, f"serve-{name}")
        os.makedirs(self.dir)
        self.data = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "nanoclaw.sock")
        self.isolate = isolate
        self.extra = list(extra_args)
        self.keys = {}
        self.proc = None
        self.port = None
        self.mntns = None
        self.ids = set()  # sandboxes made through this daemon (tenant key, id)
        self.lock = threading.Lock()
        self.log_path = os.path.join(self.dir, "serve.log")

    def add_tenant(self, name):
        r = subprocess.run(
            [self.exe, "tenant", "add", name, "--data", self.data, "--max-sandboxes", "100000",
             "--max-memory", "100000g", "--max-cpus", "1000000", "--max-lifetime", "1d", "--rate", "1000000"],
            capture_output=True, text=True, timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"nanoclaw tenant add {name}: exit {r.returncode}: {r.stderr.strip()}")
        key = r.stdout.strip().splitlines()[-1]
        self.keys[name] = key
        return key

    def start(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [self.exe, "serve", "--data", self.data, "--listen", f"tcp:127.0.0.1:{self.port}",
                "--listen", f"unix:{self.sock}", *self.extra]
        if self.isolate:
            # A private mount namespace with its own /run/nanoclaw: this daemon
            # sees (and re-adopts) no other daemon's keepers, and no other
            # daemon sees ours. `exec` keeps the daemon's pid = Popen's pid.
            script = ('set -e; mkdir -p /run/nanoclaw; mount -t tmpfs -o mode=0755,size=64m '
                      'nanoclaw-bench /run/nanoclaw; exec "$@"')
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        key = next(iter(self.keys.values()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nanoclaw serve exited {self.proc.returncode}: {self.tail()}")
            try:
                c = RawClient(key, tcp=("127.0.0.1", self.port))
                st, _ = c.request("GET", "/v2/sandboxes?limit=1", None, {"X-API-Key": key})
                c.close()
                if st == 200 and os.path.exists(self.sock):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"nanoclaw serve did not answer within 30 s: {self.tail()}")
        try:
            self.mntns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        except OSError:
            self.mntns = None
        return self

    def tail(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def sdk_opts(self, tenant):
        url = f"http://127.0.0.1:{self.port}"
        return {"api_key": self.keys[tenant], "api_url": url, "sandbox_url": url}

    def track(self, tenant, sid):
        with self.lock:
            self.ids.add((tenant, sid))

    def untrack(self, tenant, sid):
        with self.lock:
            self.ids.discard((tenant, sid))

    def memory(self):
        st = proc_status(self.pid)
        return {
            "vmrss": kb_field(st, "VmRSS"),
            "vmhwm": kb_field(st, "VmHWM"),
            "daemon_pss": pss(self.pid),
            "threads": int(st.get("Threads", "0") or 0),
            "fds": fd_count(self.pid),
        }

    def keeper_pss(self):
        """PSS of every process of this benchmark's nanoclaw binary except the
        daemon (keepers), plus their descendants (sandbox inits): count, bytes."""
        table = proc_table()
        children = collections.defaultdict(list)
        for pid, (_, ppid, *_) in table.items():
            children[ppid].append(pid)
        exe = os.path.realpath(self.exe)
        roots = [p for p, (c, *_) in table.items() if p != self.pid and c.startswith("nanoclaw")
                 and exe_of(p) == exe and self._same_ns(p)]
        seen, stack = set(), list(roots)
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            stack.extend(children.get(p, ()))
        return len(roots), len(seen), sum(pss(p) for p in seen)

    def sandbox_pids(self, sid):
        """The keeper's and the sandbox init's pids, from the keeper's state
        file (seen through the daemon's /proc/PID/root: its mount namespace)."""
        for d in self.state_dirs():
            if os.path.basename(d) != sid:
                continue
            try:
                with open(os.path.join(d, "state.json")) as f:
                    st = json.load(f)
                return [p for p in (st.get("keeper_pid"), st.get("init_pid")) if p]
            except (OSError, ValueError):
                continue
        return None

    def state_dirs(self):
        """The keepers' state directories of this daemon (its data folder's
        root, `/run/nanoclaw/serve/<hash>/<id>`, seen through its
        /proc/PID/root: its mount namespace)."""
        base = f"/proc/{self.pid}/root/run/nanoclaw/serve"
        out = []
        try:
            roots = [os.path.join(base, h) for h in os.listdir(base)]
        except OSError:
            return out
        for r in roots:
            try:
                out += [os.path.join(r, x) for x in os.listdir(r) if os.path.isdir(os.path.join(r, x))]
            except OSError:
                continue
        return out

    def keepers_left(self):
        return self.keeper_pss()[0]

    def wait_no_keepers(self, timeout=30.0):
        t0 = time.perf_counter()
        while self.keepers_left() and time.perf_counter() - t0 < timeout:
            time.sleep(0.02)
        return time.perf_counter() - t0

    def _same_ns(self, pid):
        if not self.mntns:
            return True
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt") == self.mntns
        except OSError:
            return False

    def kill_all_sandboxes(self):
        """Kills what we made and anything else our tenants own (best effort)."""
        todo = set()
        with self.lock:
            todo |= self.ids
        for tenant, key in self.keys.items():
            try:
                c = RawClient(key, unix=self.sock)
                todo |= {(tenant, i) for i in c.list_ids()}
                c.close()
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: listing {tenant}'s sandboxes failed: {e}")
        if not todo:
            return 0
        local = threading.local()

        def kill(item):
            tenant, sid = item
            if not hasattr(local, "c"):
                local.c = {}
            c = local.c.get(tenant) or local.c.setdefault(tenant, RawClient(self.keys[tenant], unix=self.sock))
            try:
                c.kill(sid)
                self.untrack(tenant, sid)
            except Exception as e:  # noqa: BLE001
                return f"{sid}: {e}"
            return None

        with cf.ThreadPoolExecutor(8) as ex:
            errs = [e for e in ex.map(kill, sorted(todo)) if e]
        for e in errs[:5]:
            log(f"cleanup: {e}")
        return len(todo)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log("nanoclaw serve did not stop within 15 s of SIGTERM; SIGKILL")
                self.proc.kill()
                self.proc.wait(10)
        # Keepers of ours still alive (the daemon died with sandboxes up):
        # they run our binary in our daemon's mount namespace.
        exe = os.path.realpath(self.exe)

        def leftovers():
            return [p for p in proc_table() if p != os.getpid() and exe_of(p) == exe and self._same_ns(p)
                    and alive(p)]

        t0 = time.monotonic()
        left = leftovers()
        while left and time.monotonic() - t0 < 5:  # killed sandboxes end on their own, shortly
            time.sleep(0.1)
            left = leftovers()
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if left:
            log(f"cleanup: SIGKILLed {len(left)} leftover keeper(s) of this benchmark's daemon")
        self.logf.close()


# ---------------------------------------------------------------- docker


def alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    st = read(f"/proc/{pid}/stat")
    if not st:
        return False
    return st[st.rindex(")") + 2 :].split()[0] != "Z"


def wait_gone(pids, timeout=5.0):
    t0 = time.perf_counter()
    while any(alive(p) for p in pids):
        if time.perf_counter() - t0 > timeout:
            return False
        time.sleep(0.0002)
    return True


class DockerSide:
    def __init__(self, image):
        import docker  # noqa: PLC0415 - optional until here

        self.docker = docker
        self.client = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto",
                                          timeout=300, max_pool_size=256)
        self.image = image
        self.label = {LABEL: str(os.getpid())}
        self.client.images.get(image)  # fails early if missing

    def remove_stale(self):
        n = 0
        for c in self.client.containers.list(all=True, filters={"label": LABEL}):
            pid = c.labels.get(LABEL, "")
            if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                c.remove(force=True)
                n += 1
        if n:
            log(f"removed {n} container(s) left by an earlier, dead run")

    def create_live(self):
        c = self.client.containers.create(self.image, ["sh", "-c", "read _"], stdin_open=True,
                                          network_mode="none", labels=self.label)
        c.start()
        return c

    def remove_all(self):
        cs = self.client.containers.list(all=True, filters={"label": f"{LABEL}={os.getpid()}"})
        if not cs:
            return 0

        def rm(c):
            try:
                c.remove(force=True)
            except self.docker.errors.NotFound:
                pass
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: removing container {c.short_id}: {e}")

        with cf.ThreadPoolExecutor(8) as ex:
            list(ex.map(rm, cs))
        return len(cs)

    def daemon_rss(self):
        table = proc_table()
        out = {}
        for pid, (comm, *_) in table.items():
            if comm in ("dockerd", "containerd"):
                out[comm] = kb_field(proc_status(pid), "VmRSS")
        return out

    def container_pss(self):
        table = proc_table()
        children = collections.defaultdict(list)
        for pid, (_, ppid, *_) in table.items():
            children[ppid].append(pid)
        roots = [p for p, (c, *_) in table.items() if c.startswith("containerd-shim")]
        seen, stack = set(), list(roots)
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            stack.extend(children.get(p, ()))
        return len(roots), len(seen), sum(pss(p) for p in seen)


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.a = args
        self.results = {"sections": {}}
        self.notes = []
        self.workdir = None
        self.daemon = None
        self.warm = None
        self.docker = None

    # --- helpers -------------------------------------------------------

    def sdk(self):
        from e2b import Sandbox  # noqa: PLC0415

        return Sandbox

    def nc_create_sdk(self, daemon, tenant="a", timeout=600, **kw):
        sbx = self.sdk().create(TEMPLATE, timeout=timeout, **kw, **daemon.sdk_opts(tenant))
        daemon.track(tenant, sbx.sandbox_id)
        return sbx

    def nc_kill_sdk(self, daemon, sbx, tenant="a"):
        sbx.kill()
        daemon.untrack(tenant, sbx.sandbox_id)

    @staticmethod
    def gone_after(pids, t_from):
        """Waits until the killed sandbox's keeper and init have exited:
        DELETE answers once the keeper has agreed to stop, and the rest of
        the teardown runs after it. Returns {"gone": seconds since t_from}."""
        if not pids:
            return {}
        ok = wait_gone(pids)
        return {"gone": time.perf_counter() - t_from} if ok else {}

    def settle(self):
        time.sleep(self.a.settle_ms / 1000)

    def check_stop(self):
        if STOP.is_set():
            raise Interrupted()

    # --- set-up ----------------------------------------------------------

    def setup(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.results["rlimit_nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.workdir = tempfile.mkdtemp(prefix="nanoclaw-e2b-bench.")
        isolate = os.geteuid() == 0 and not self.a.shared_state and shutil.which("unshare")
        self.isolated = bool(isolate)
        self.daemon = Daemon(self.a.nanoclaw, self.workdir, isolate)
        self.daemon.add_tenant("a")
        self.daemon.add_tenant("b")
        self.daemon.start()
        log(f"nanoclaw serve pid {self.daemon.pid} on tcp 127.0.0.1:{self.daemon.port} and unix {self.daemon.sock}")
        help_text = subprocess.run([self.a.nanoclaw, "serve", "--help"], capture_output=True, text=True).stdout
        self.pool_flag = "--pool" in help_text
        if self.pool_flag and not self.a.no_warm:
            try:
                self.warm = Daemon(self.a.nanoclaw, self.workdir, isolate,
                                   ["--pool", f"{TEMPLATE}={self.a.pool_size}"], name="warm")
                self.warm.add_tenant("a")
                self.warm.start()
                log(f"warm-pool daemon pid {self.warm.pid} (--pool {TEMPLATE}={self.a.pool_size})")
                time.sleep(2)  # let it fill the pool
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"Warm pool: `nanoclaw serve --pool {TEMPLATE}={self.a.pool_size}` did not start ({e}); warm rows skipped.")
                if self.warm is not None:
                    self.warm.stop()
                self.warm = None
        elif not self.pool_flag:
            self.notes.append("Warm pool: `nanoclaw serve --help` has no `--pool` option in this build, so the warm-pool variant of (a) was skipped; every nanoclaw create here is cold.")
        if not self.a.no_docker:
            self.docker = DockerSide(self.a.image)
            self.docker.remove_stale()
            self.results["versions"]["docker_engine"] = self.docker.client.version().get("Version")
            self.results["versions"]["docker_api"] = self.docker.client.api.api_version

    def cleanup(self):
        if self.daemon is not None:
            for d in (self.daemon, self.warm):
                if d is None or d.proc is None:
                    continue
                try:
                    n = d.kill_all_sandboxes()
                    if n:
                        log(f"cleanup: killed {n} sandbox(es)")
                except Exception as e:  # noqa: BLE001
                    log(f"cleanup: killing sandboxes failed: {e}")
                try:
                    d.stop()
                except Exception as e:  # noqa: BLE001
                    log(f"cleanup: stopping the daemon failed: {e}")
        if self.docker is not None:
            try:
                for _ in range(2):  # a worker may still have been creating one
                    n = self.docker.remove_all()
                    if n:
                        log(f"cleanup: removed {n} container(s)")
                    time.sleep(0.5)
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: removing containers failed: {e}")
        if self.workdir and not self.a.keep_temp:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- (a) create -> first output ---------------------------------------

    def section_a(self):
        a = self.a
        runners = []
        d = self.daemon

        def nc_sdk_with(**kw):
            def nc_sdk():
                t0 = time.perf_counter()
                sbx = self.nc_create_sdk(d, **kw)
                t1 = time.perf_counter()
                r = sbx.commands.run("echo hi")
                t2 = time.perf_counter()
                assert r.stdout == "hi\n", r.stdout
                pids = d.sandbox_pids(sbx.sandbox_id)
                self.nc_kill_sdk(d, sbx)
                t3 = time.perf_counter()
                gone = self.gone_after(pids, t2)
                return t2 - t0, {"create": t1 - t0, "first": t2 - t1, "teardown": t3 - t2, **gone}
            return nc_sdk

        def nc_raw(client):
            def run():
                t0 = time.perf_counter()
                sid, tok = client.create()
                d.track("b", sid)
                t1 = time.perf_counter()
                code, out = client.start(sid, tok, "/bin/bash", ["-l", "-c", "echo hi"])
                t2 = time.perf_counter()
                assert code == 0 and out == b"hi\n", (code, out)
                pids = d.sandbox_pids(sid)
                client.kill(sid)
                d.untrack("b", sid)
                t3 = time.perf_counter()
                gone = self.gone_after(pids, t2)
                return t2 - t0, {"create": t1 - t0, "first": t2 - t1, "teardown": t3 - t2, **gone}
            return run

        runners.append(("nanoclaw · e2b SDK · TCP", nc_sdk_with()))
        # E2B's default is internet access on: nanoclaw then gives the sandbox
        # its egress proxy. Docker runs with --network none: this row is the
        # like-for-like one.
        runners.append(("nanoclaw · e2b SDK · TCP · `allow_internet_access=False`",
                        nc_sdk_with(allow_internet_access=False)))
        if self.warm is not None:
            w = self.warm

            def nc_warm():
                t0 = time.perf_counter()
                sbx = self.nc_create_sdk(w)
                t1 = time.perf_counter()
                r = sbx.commands.run("echo hi")
                t2 = time.perf_counter()
                assert r.stdout == "hi\n", r.stdout
                self.nc_kill_sdk(w, sbx)
                t3 = time.perf_counter()
                time.sleep(a.pool_refill_ms / 1000)  # the pool refills outside the next runner's time
                return t2 - t0, {"create": t1 - t0, "first": t2 - t1, "teardown": t3 - t2}

            runners.append(("nanoclaw warm pool · e2b SDK · TCP", nc_warm))
        raw_unix = RawClient(d.keys["b"], unix=d.sock)
        raw_tcp = RawClient(d.keys["b"], tcp=("127.0.0.1", d.port))
        runners.append(("nanoclaw · raw HTTP · unix socket", nc_raw(raw_unix)))
        runners.append(("nanoclaw · raw HTTP · TCP", nc_raw(raw_tcp)))
        if self.docker:
            dk = self.docker

            def docker_run():
                t0 = time.perf_counter()
                c = dk.client.containers.create(dk.image, ["sh", "-c", "read _"], stdin_open=True,
                                                network_mode="none", labels=dk.label)
                c.start()
                t1 = time.perf_counter()
                r = c.exec_run(["sh", "-c", "echo hi"])
                t2 = time.perf_counter()
                assert r.exit_code == 0 and r.output == b"hi\n", r
                c.remove(force=True)
                t3 = time.perf_counter()
                # remove(force=True) returns once the container is gone
                return t2 - t0, {"create": t1 - t0, "first": t2 - t1, "teardown": t3 - t2, "gone": t3 - t2}

            runners.append(("docker · docker SDK · unix socket", docker_run))
        return self.interleave("a", runners, a.iter_a, a.warmup)

    # --- (b) exec round trip ---------------------------------------------------

    def section_b(self):
        a, d = self.a, self.daemon
        sbx = self.nc_create_sdk(d)
        raw_unix = RawClient(d.keys["a"], unix=d.sock)
        raw_tcp = RawClient(d.keys["a"], tcp=("127.0.0.1", d.port))
        tok = sbx._envd_access_token if hasattr(sbx, "_envd_access_token") else None
        if tok is None:
            tok = getattr(sbx, "envd_access_token", None)
        if tok is None:  # fall back to the header the SDK keeps
            tok = sbx.connection_config.extra_sandbox_headers.get("X-Access-Token")
        sid = sbx.sandbox_id

        def sdk_true():
            t0 = time.perf_counter()
            r = sbx.commands.run("true")
            dt = time.perf_counter() - t0
            assert r.exit_code == 0
            return dt, {}

        def raw(client, cmd, args):
            def run():
                t0 = time.perf_counter()
                code, _ = client.start(sid, tok, cmd, args)
                dt = time.perf_counter() - t0
                assert code == 0
                return dt, {}
            return run

        runners = [
            ("nanoclaw · e2b SDK `commands.run(\"true\")` · TCP", sdk_true),
            ("nanoclaw · raw Start `bash -l -c true` · unix socket", raw(raw_unix, "/bin/bash", ["-l", "-c", "true"])),
            ("nanoclaw · raw Start `bash -l -c true` · TCP", raw(raw_tcp, "/bin/bash", ["-l", "-c", "true"])),
            ("nanoclaw · raw Start `/bin/true` (no bash) · unix socket", raw(raw_unix, "/bin/true", [])),
        ]
        if self.docker:
            c = self.docker.create_live()

            def dk_true():
                t0 = time.perf_counter()
                r = c.exec_run("true")
                dt = time.perf_counter() - t0
                assert r.exit_code == 0
                return dt, {}

            runners.append(("docker · `exec_run(\"true\")` · unix socket", dk_true))

        def host_bash():
            t0 = time.perf_counter()
            subprocess.run(["/bin/bash", "--noprofile", "--norc", "-c", "true"], check=True,
                           stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
            return time.perf_counter() - t0, {}

        # The sandbox has no /etc/profile and an empty home, so its `bash -l`
        # reads nothing: `--noprofile --norc` is the same work on the host.
        runners.append(("host · `bash --noprofile --norc -c true` (no sandbox; reference)", host_bash))
        try:
            return self.interleave("b", runners, a.iter_b, a.warmup)
        finally:
            self.nc_kill_sdk(d, sbx)
            if self.docker:
                c.remove(force=True)

    # --- interleaving ------------------------------------------------------------

    def interleave(self, name, runners, iters, warmup):
        samples = {n: [] for n, _ in runners}
        parts = {n: collections.defaultdict(list) for n, _ in runners}
        errors = collections.Counter()
        for i in range(warmup):
            for n, f in runners:
                self.check_stop()
                f()
                self.settle()
        win = CpuWindow(self.a.nanoclaw)
        k = len(runners)
        for i in range(iters):
            order = runners[i % k :] + runners[: i % k]
            for n, f in order:
                self.check_stop()
                try:
                    dt, p = f()
                except Interrupted:
                    raise
                except Exception as e:  # noqa: BLE001
                    errors[n] += 1
                    log(f"({name}) {n}: {type(e).__name__}: {e}")
                    if errors[n] > 5:
                        raise
                    continue
                samples[n].append(dt * 1000)
                for pk, pv in p.items():
                    parts[n][pk].append(pv * 1000)
                self.settle()
            if (i + 1) % 10 == 0:
                log(f"({name}) {i + 1}/{iters}")
        cpu = win.close()
        res = {
            "runners": [n for n, _ in runners],
            "summary": {n: summarize(v) for n, v in samples.items()},
            "parts": {n: {pk: summarize(pv) for pk, pv in p.items()} for n, p in parts.items()},
            "errors": dict(errors),
            "samples_ms": samples,
            "cpu": cpu,
            "iterations": iters,
            "warmup": warmup,
        }
        self.results["sections"][name] = res
        return res

    # --- (c) N concurrent ----------------------------------------------------------

    def section_c(self):
        a, d = self.a, self.daemon
        n = a.concurrency
        out = {"n": n, "rounds": []}
        order = ["nanoclaw", "docker"] if self.docker else ["nanoclaw"]
        for r in range(a.rounds_c):
            seq = order if r % 2 == 0 else order[::-1]
            for who in seq:
                self.check_stop()
                log(f"(c) round {r + 1}: {who}, {n} at once")
                res = self.burst_nanoclaw(d, n) if who == "nanoclaw" else self.burst_docker(n)
                res["who"] = who
                res["round"] = r + 1
                out["rounds"].append(res)
                time.sleep(max(self.a.settle_ms / 1000, 2.0))
        self.results["sections"]["c"] = out
        return out

    def _burst(self, n, session, teardown, after_teardown=None):
        barrier = threading.Barrier(n + 1)
        results = [None] * n

        def worker(i):
            barrier.wait()
            rec = {"create": None, "cmds": [], "total": None, "error": None, "handle": None}
            t0 = time.perf_counter()
            try:
                session(i, rec)
                rec["total"] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rec["end"] = time.perf_counter()
            results[i] = rec

        win = CpuWindow(self.a.nanoclaw)
        mem0 = self.daemon.memory()
        with cf.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(worker, i) for i in range(n)]
            barrier.wait()
            t0 = time.perf_counter()
            for f in futs:
                f.result()
        wall = max(r["end"] for r in results) - t0
        # closed before the teardown: killed keepers are reaped by init, so
        # their CPU time could not be attributed afterwards
        cpu = win.close()
        mem1 = self.daemon.memory()
        handles = [r["handle"] for r in results if r["handle"] is not None]
        t1 = time.perf_counter()
        with cf.ThreadPoolExecutor(min(n, 32)) as ex:
            td_errors = [e for e in ex.map(teardown, handles) if e]
        td_wall = time.perf_counter() - t1
        gone_wall = td_wall
        if after_teardown is not None:
            after_teardown()
            gone_wall = time.perf_counter() - t1
        errs = [r["error"] for r in results if r["error"]]
        return {
            "wall_s": wall,
            "teardown_wall_s": td_wall,
            "gone_wall_s": gone_wall,
            "errors": len(errs),
            "error_examples": sorted(set(errs))[:5],
            "teardown_errors": len(td_errors),
            "create": summarize([r["create"] * 1000 for r in results if r["create"] is not None]),
            "command": summarize([c * 1000 for r in results for c in r["cmds"]]),
            "session": summarize([r["total"] * 1000 for r in results if r["total"] is not None]),
            "daemon_vmhwm_before": mem0["vmhwm"],
            "daemon_vmhwm_after": mem1["vmhwm"],
            "cpu": cpu,
        }

    def burst_nanoclaw(self, d, n):
        Sandbox = self.sdk()
        opts = d.sdk_opts("a")

        def session(i, rec):
            t = time.perf_counter()
            sbx = Sandbox.create(TEMPLATE, timeout=600, **opts)
            d.track("a", sbx.sandbox_id)
            rec["handle"] = sbx
            rec["create"] = time.perf_counter() - t
            for k in range(3):
                t = time.perf_counter()
                r = sbx.commands.run(f"echo {i}-{k}")
                rec["cmds"].append(time.perf_counter() - t)
                if r.stdout != f"{i}-{k}\n":
                    raise RuntimeError(f"wrong output {r.stdout!r}")

        def teardown(sbx):
            try:
                sbx.kill()
                d.untrack("a", sbx.sandbox_id)
            except Exception as e:  # noqa: BLE001
                return str(e)
            return None

        return self._burst(n, session, teardown, d.wait_no_keepers)

    def burst_docker(self, n):
        dk = self.docker

        def session(i, rec):
            t = time.perf_counter()
            c = dk.client.containers.create(dk.image, ["sh", "-c", "read _"], stdin_open=True,
                                            network_mode="none", labels=dk.label)
            rec["handle"] = c
            c.start()
            rec["create"] = time.perf_counter() - t
            for k in range(3):
                t = time.perf_counter()
                r = c.exec_run(["sh", "-c", f"echo {i}-{k}"])
                rec["cmds"].append(time.perf_counter() - t)
                if r.exit_code != 0 or r.output != f"{i}-{k}\n".encode():
                    raise RuntimeError(f"wrong output {r!r}")

        def teardown(c):
            try:
                c.remove(force=True)
            except Exception as e:  # noqa: BLE001
                return str(e)
            return None

        return self._burst(n, session, teardown)

    # --- (d) one-shot runs ----------------------------------------------------------

    def section_d(self):
        a, d = self.a, self.daemon
        key = d.keys["a"]
        probe = RawClient(key, tcp=("127.0.0.1", d.port))
        body = json.dumps({"command": ["true"]})
        hdr = {"X-API-Key": key, "Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            st, data = probe.request("POST", "/v1/run", body, hdr)
        finally:
            probe.close()
        out = {"probe_status": st, "probe_body": data[:300].decode(errors="replace")}
        if st in (404, 405, 501) or st >= 500:
            out["available"] = False
            self.results["sections"]["d"] = out
            log(f"(d) POST /v1/run answered HTTP {st}: not available")
            return out
        out["available"] = True
        local = threading.local()

        def nc_one():
            if not hasattr(local, "c"):
                local.c = RawClient(key, tcp=("127.0.0.1", d.port))
            st, data = local.c.request("POST", "/v1/run", body, hdr)
            if st != 200:
                raise RuntimeError(f"HTTP {st}: {data[:200]!r}")
            j = json.loads(data)
            code = j.get("exit_code", j.get("exitCode", j.get("code", 0)))
            if code not in (0, None):
                raise RuntimeError(f"exit {code}: {data[:200]!r}")

        def dk_one():
            self.docker.client.containers.run(self.docker.image, ["true"], remove=True, network_mode="none",
                                              labels=self.docker.label)

        runners = [("nanoclaw · `POST /v1/run` · TCP", nc_one)]
        if self.docker:
            runners.append(("docker · `containers.run(remove=True)` (= docker run --rm)", dk_one))
        per = {n: {"rates": [], "lat": [], "errors": 0, "examples": []} for n, _ in runners}
        win = CpuWindow(a.nanoclaw)
        for w in range(a.windows_d):
            seq = runners if w % 2 == 0 else runners[::-1]
            for n, f in seq:
                self.check_stop()
                done, lat, errs = self.window(f, a.run_clients, a.window_s)
                per[n]["rates"].append(done / a.window_s)
                per[n]["lat"] += lat
                per[n]["errors"] += len(errs)
                per[n]["examples"] = (per[n]["examples"] + errs)[:3]
                time.sleep(1.0)
        out["clients"] = a.run_clients
        out["window_s"] = a.window_s
        out["runners"] = [n for n, _ in runners]
        out["per"] = {n: {"rates": v["rates"], "rate": summarize(v["rates"]), "latency": summarize(v["lat"]),
                          "errors": v["errors"], "examples": v["examples"]} for n, v in per.items()}
        out["cpu"] = win.close()
        self.results["sections"]["d"] = out
        return out

    def window(self, f, clients, seconds):
        end = time.perf_counter() + seconds
        lat, errs, lock = [], [], threading.Lock()

        def loop():
            while time.perf_counter() < end and not STOP.is_set():
                t = time.perf_counter()
                try:
                    f()
                except Exception as e:  # noqa: BLE001
                    with lock:
                        errs.append(str(e)[:200])
                    continue
                with lock:
                    lat.append((time.perf_counter() - t) * 1000)

        with cf.ThreadPoolExecutor(clients) as ex:
            list(ex.map(lambda _: loop(), range(clients)))
        # runs that finished inside the window (the last ones may end after it)
        return len(lat), lat, errs

    # --- (e) idle memory -----------------------------------------------------------

    def section_e(self):
        a, d = self.a, self.daemon
        counts = sorted({0, min(100, a.idle), a.idle})
        out = {"counts": counts, "nanoclaw": [], "docker": []}
        sbxs = []
        Sandbox = self.sdk()
        opts = d.sdk_opts("a")
        win = CpuWindow(a.nanoclaw)

        def mk(_):
            if STOP.is_set():
                return None
            sbx = Sandbox.create(TEMPLATE, timeout=3600, **opts)
            d.track("a", sbx.sandbox_id)
            return sbx

        base_avail = base_kmem = None
        for cnt in counts:
            self.check_stop()
            need = cnt - len(sbxs)
            if need > 0:
                log(f"(e) nanoclaw: {cnt} idle sandboxes")
                t = time.perf_counter()
                with cf.ThreadPoolExecutor(a.idle_parallel) as ex:
                    sbxs += [s for s in ex.map(mk, range(need)) if s is not None]
                log(f"(e)   made {need} in {time.perf_counter() - t:.1f} s")
            time.sleep(2)
            m = d.memory()
            keepers, procs, kpss = d.keeper_pss()
            avail, kmem = self.mem_available(), kernel_mem()
            if base_avail is None:
                base_avail, base_kmem = avail, kmem
            # does one more create get slower with many sandboxes up?
            lat = self.create_probe(d, a.probe_creates)
            out["nanoclaw"].append({"count": cnt, **m, "keepers": keepers, "procs": procs, "pss": kpss,
                                    "mem_available": avail, "mem_used_delta": base_avail - avail,
                                    "kmem_delta": kmem - base_kmem, "create_probe": summarize(lat)})
        # and after killing them all: does the daemon give memory back?
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda s: (s.kill(), d.untrack("a", s.sandbox_id)), sbxs))
        out["nanoclaw_kill_all_s"] = time.perf_counter() - t
        d.wait_no_keepers()
        out["nanoclaw_gone_all_s"] = time.perf_counter() - t
        time.sleep(2)
        out["nanoclaw_after_kill"] = d.memory()
        # Nothing left: no keeper, no state directory, no cgroup of any
        # sandbox this section made.
        ids = {s.sandbox_id for s in sbxs}
        cg = [os.path.join(root, ctl, "nanoclaw", i) for root in ("/sys/fs/cgroup",)
              for ctl in (os.listdir(root) if os.path.isdir(root) else []) for i in ids]
        cg += [os.path.join("/sys/fs/cgroup/nanoclaw", i) for i in ids]
        out["nanoclaw_left"] = {
            "keepers": d.keepers_left(),
            "state_dirs": len([x for x in d.state_dirs() if os.path.basename(x) in ids]),
            "cgroups": len([x for x in cg if os.path.isdir(x)]),
        }
        out["nanoclaw_cpu"] = win.close()

        if self.docker and a.docker_idle > 0:
            dk = self.docker
            dcounts = sorted({0, min(100, a.docker_idle), a.docker_idle})
            out["docker_counts"] = dcounts
            cs = []
            win = CpuWindow(a.nanoclaw)

            def dmk(_):
                if STOP.is_set():
                    return None
                return dk.create_live()

            base_avail = base_kmem = None
            for cnt in dcounts:
                self.check_stop()
                need = cnt - len(cs)
                if need > 0:
                    log(f"(e) docker: {cnt} idle containers")
                    t = time.perf_counter()
                    with cf.ThreadPoolExecutor(a.idle_parallel) as ex:
                        cs += [c for c in ex.map(dmk, range(need)) if c is not None]
                    log(f"(e)   made {need} in {time.perf_counter() - t:.1f} s")
                time.sleep(2)
                shims, procs, cpss = dk.container_pss()
                avail, kmem = self.mem_available(), kernel_mem()
                if base_avail is None:
                    base_avail, base_kmem = avail, kmem
                rss = dk.daemon_rss()
                lat = []
                for _ in range(a.probe_creates):
                    self.check_stop()
                    t = time.perf_counter()
                    c = dk.create_live()
                    lat.append((time.perf_counter() - t) * 1000)
                    c.remove(force=True)
                    self.settle()
                out["docker"].append({"count": cnt, **{f"rss_{k}": v for k, v in rss.items()},
                                      "shims": shims, "procs": procs, "pss": cpss, "mem_available": avail,
                                      "mem_used_delta": base_avail - avail, "kmem_delta": kmem - base_kmem,
                                      "create_probe": summarize(lat)})
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda c: c.remove(force=True), cs))
            out["docker_remove_all_s"] = time.perf_counter() - t
            out["docker_cpu"] = win.close()
        self.results["sections"]["e"] = out
        return out

    def create_probe(self, d, n):
        """n sequential creates (raw HTTP, unix socket), each killed and gone
        before the next: ms each."""
        c = RawClient(d.keys["b"], unix=d.sock)
        lat = []
        try:
            for _ in range(n):
                self.check_stop()
                t = time.perf_counter()
                sid, _ = c.create()
                lat.append((time.perf_counter() - t) * 1000)
                d.track("b", sid)
                pids = d.sandbox_pids(sid)
                c.kill(sid)
                d.untrack("b", sid)
                if pids:
                    wait_gone(pids)
                self.settle()
        finally:
            c.close()
        return lat

    @staticmethod
    def mem_available():
        vals = []
        for _ in range(3):
            vals.append(meminfo()["MemAvailable"])
            time.sleep(0.2)
        return sorted(vals)[1]

    # --- run -----------------------------------------------------------------------

    def run(self):
        a = self.a
        mi = meminfo()
        self.results["machine"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(),
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "mem_total": mi.get("MemTotal"),
            "load_start": loadavg(),
            "euid": os.geteuid(),
        }
        self.results["versions"] = self.versions()
        self.results["mode"] = "full" if a.full else "quick"
        self.results["argv"] = sys.argv[1:]
        self.results["notes"] = self.notes  # (filled in by setup)
        self.results["params"] = {k: getattr(a, k) for k in ("settle_ms", "idle_parallel", "probe_creates")}
        t_all = time.perf_counter()
        self.setup()
        self.results["isolated"] = self.isolated
        for sec in a.sections:
            log(f"section {sec}")
            getattr(self, f"section_{sec}")()
        self.results["machine"]["load_end"] = loadavg()
        self.results["total_s"] = time.perf_counter() - t_all

    def versions(self):
        import importlib.metadata as md  # noqa: PLC0415

        v = {}
        try:
            v["nanoclaw"] = subprocess.run([self.a.nanoclaw, "--version"], capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            v["nanoclaw"] = "?"
        try:
            v["git"] = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                                      text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            v["git"] = "?"
        for p in ("e2b", "docker"):
            try:
                v[p + "_py"] = md.version(p)
            except md.PackageNotFoundError:
                v[p + "_py"] = None
        v["python"] = platform.python_version()
        return v


# ---------------------------------------------------------------- report


def table_rows(res, anchor_prefix="docker"):
    """Rows of an interleaved section, with docker / this (medians, mins)."""
    summ = res["summary"]
    anchor = next((n for n in res["runners"] if n.startswith(anchor_prefix)), None)
    A = summ.get(anchor) if anchor else None
    lines = ["| runner | n | median | p10–p90 | min–max | docker / this (median) | (min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n in res["runners"]:
        s = summ[n]
        if not s:
            lines.append(f"| {n} | 0 | — | — | — | — | — |")
            continue
        rm = "—" if (A is None or n == anchor) else ratio(A["median"], s["median"])
        rn = "—" if (A is None or n == anchor) else ratio(A["min"], s["min"])
        lines.append(f"| {n} | {s['n']} | {ms(s['median'])} | {ms(s['p10'])}–{ms(s['p90'])} | "
                     f"{ms(s['min'])}–{ms(s['max'])} | {rm} | {rn} |")
    return lines


def markdown(r):
    """The report, from the results alone (so `--render` can redo it from the JSON)."""
    m = r["machine"]
    v = r["versions"]
    a = argparse.Namespace(**r["params"])
    L = []
    L.append("### `nanoclaw serve` vs Docker, driven by their SDKs (e2b SDK / Docker Engine API)")
    L.append("")
    L.append(f"{m['date']} · Linux {m['kernel']} · {m['nproc']} × {m['cpu']} · {mib(m['mem_total'])} RAM · "
             f"{r['mode']} mode · {'root' if m['euid'] == 0 else 'rootless'}. Load average (1/5/15 min) "
             f"{' '.join(m['load_start'])} at the start, {' '.join(m.get('load_end', ['?']))} at the end; "
             f"whole run {r.get('total_s', 0):.0f} s.")
    L.append(f"Versions: {v['nanoclaw']} (git {v['git']}), e2b {v['e2b_py']} (Python {v['python']}), "
             f"docker SDK {v['docker_py']}, " + (f"Docker Engine {v['docker_engine']} (API {v['docker_api']})"
                                                 if v.get("docker_engine") else "no docker") + ".")
    L.append("")
    L.append("Transports: the e2b SDK rows go over **TCP loopback** (the SDK cannot dial a unix socket); "
             "the *raw HTTP* rows are a stdlib HTTP/1.1 keep-alive client sending the SDK's own requests "
             "(`POST /v2/sandboxes`, Connect `Start` with `/bin/bash -l -c CMD` as the SDK sends it, "
             "`DELETE /sandboxes/ID`) over the daemon's **unix socket** and over TCP. Docker rows use the "
             "Docker Engine API over `/var/run/docker.sock` with the `docker` SDK; containers run with "
             "`--network none`, and a live container is `sh -c 'read _'` with stdin open (the image has no `sleep`). "
             "`exec_run` is 3 API calls (create, start, inspect). nanoclaw tenants were given quotas far "
             "above the test (sandboxes, memory, CPUs, 10⁶ requests/s), so no request was throttled.")
    L.append("")
    L.append("Each section ends with the CPU use of the machine's cores over it and who used it (from /proc: "
             "this benchmark's client, nanoclaw's daemon, keepers and sandboxes, docker's daemons, shims and "
             "containers, kernel threads, other processes). *Unattributed* is busy time of processes that "
             "started and ended inside the section and were reaped by init: other builds' short-lived "
             "compilers, and killed sandboxes' keepers, which double-fork. A section where other processes "
             "used a quarter of a core or more is flagged: its medians are inflated and `min` is the better "
             "estimate of the uncontended cost.")
    if r.get("isolated"):
        L.append("")
        L.append("The daemon ran in a private mount namespace with its own tmpfs on `/run/nanoclaw`, so it "
                 "saw no other daemon's keepers (see the notes).")
    for n in r.get("notes", []):
        L.append("")
        L.append(n)

    secs_ = r["sections"]
    if "a" in secs_:
        s = secs_["a"]
        L += ["", f"#### (a) Create → first command's output (cold)", "",
              f"{s['iterations']} measured iterations, interleaved round-robin with the order rotating each "
              f"iteration, {a.settle_ms} ms pause after each run, after {s['warmup']} warm-up round(s). "
              "Time = create + `echo hi` until its output is back; teardown is not included. "
              "`Sandbox.create()` with E2B's defaults asks for internet access, so nanoclaw starts the "
              "sandbox's egress proxy (network `open`); the Docker container has `--network none`; the "
              "`allow_internet_access=False` row (nanoclaw network `none`) is the like-for-like one. "
              "The raw HTTP rows send E2B's default body (internet access on).", ""]
        L += table_rows(s)
        L += ["", "Where the time goes (medians). Teardown is not in the time above: *kill returns* = `kill()` / "
              "`DELETE` / `remove(force=True)` answered; *gone* = until the sandbox's keeper and init processes "
              "had exited (nanoclaw answers DELETE once the keeper has agreed to stop, the rest runs after; "
              "Docker's remove returns when the container is gone). The benchmark waits for *gone* before the "
              "next run.", "",
              "| runner | create | first command | kill returns | gone |", "|---|---:|---:|---:|---:|"]
        for n in s["runners"]:
            p = s["parts"][n]
            L.append(f"| {n} | {ms((p.get('create') or {}).get('median'))} | {ms((p.get('first') or {}).get('median'))} | "
                     f"{ms((p.get('teardown') or {}).get('median'))} | {ms((p.get('gone') or {}).get('median'))} |")
        if s["errors"]:
            L.append(f"\nErrors: {s['errors']}")
        L += ["", cpu_line(s["cpu"])]
    if "b" in secs_:
        s = secs_["b"]
        L += ["", "#### (b) A command's round trip in a live sandbox", "",
              f"{s['iterations']} measured iterations per runner, interleaved, {a.settle_ms} ms pause after each. "
              "The e2b SDK runs every command as `/bin/bash -l -c CMD` (a login shell: /etc/profile and friends); "
              "Docker's `exec_run(\"true\")` runs `/bin/true` directly. The sandbox has no /etc/profile and an empty "
              "home, so that login shell reads nothing; the `/bin/true` raw row shows what bash costs in the sandbox, "
              "and the host row bash's own start on the host (spawned by this Python process).", ""]
        L += table_rows(s)
        if s["errors"]:
            L.append(f"\nErrors: {s['errors']}")
        L += ["", cpu_line(s["cpu"])]
    if "c" in secs_:
        s = secs_["c"]
        L += ["", f"#### (c) {s['n']} sandboxes at once, 3 commands each", "",
              f"{s['n']} threads released together by a barrier; each creates a sandbox (e2b `Sandbox.create` / "
              "Docker `create`+`start`) and runs `echo I-K` three times, checking the output. Wall = barrier → "
              "last thread done. Teardown (kill / remove, 32 threads) afterwards, timed apart. Rounds alternate "
              "which side goes first.", "",
              "| round | runner | errors | wall | create p50 · p99 | command p50 · p99 | per sandbox p50 · p99 (max) | teardown: calls return · all gone | daemon VmHWM |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in s["rounds"]:
            c, cm, se = x["create"] or {}, x["command"] or {}, x["session"] or {}
            hwm = mib(x["daemon_vmhwm_after"]) if x["who"] == "nanoclaw" else "—"
            L.append(f"| {x['round']} | {x['who']} | {x['errors']} | {secs(x['wall_s'])} | "
                     f"{ms(c.get('median'))} · {ms(c.get('p99'))} | {ms(cm.get('median'))} · {ms(cm.get('p99'))} | "
                     f"{ms(se.get('median'))} · {ms(se.get('p99'))} ({ms(se.get('max'))}) | {secs(x['teardown_wall_s'])} · {secs(x['gone_wall_s'])} | {hwm} |")
        by = collections.defaultdict(list)
        for x in s["rounds"]:
            by[x["who"]].append(x["wall_s"])
        if "docker" in by and "nanoclaw" in by:
            dw = sorted(by["docker"])[len(by["docker"]) // 2]
            nw = sorted(by["nanoclaw"])[len(by["nanoclaw"]) // 2]
            L.append(f"\nWall time, docker / nanoclaw: {ratio(dw, nw)}.")
        for x in s["rounds"]:
            if x["error_examples"]:
                L.append(f"\nErrors ({x['who']}, round {x['round']}): " + "; ".join(f"`{e}`" for e in x["error_examples"]))
        for x in s["rounds"]:
            L += ["", f"Round {x['round']} {x['who']} (until the last thread was done, before the teardown): " + cpu_line(x["cpu"])]
    if "d" in secs_:
        s = secs_["d"]
        L += ["", "#### (d) One-shot runs: `POST /v1/run` vs `docker run --rm`", ""]
        if not s.get("available"):
            L.append(f"**Not available**: `POST /v1/run` with `{{\"command\":[\"true\"]}}` and the API key answered "
                     f"HTTP {s['probe_status']} (`{s['probe_body'].strip()[:160]}`). Docker's side was not run.")
        else:
            L += [f"{s['clients']} concurrent clients, {len(next(iter(s['per'].values()))['rates'])} windows of "
                  f"{s['window_s']} s per side, alternating.", "",
                  "| runner | runs/s median (min–max of windows) | latency median | p10–p90 | p99 | errors |",
                  "|---|---:|---:|---:|---:|---:|"]
            for n in s["runners"]:
                p = s["per"][n]
                rt, la = p["rate"] or {}, p["latency"] or {}
                L.append(f"| {n} | {rt.get('median', 0):.1f} ({rt.get('min', 0):.1f}–{rt.get('max', 0):.1f}) | "
                         f"{ms(la.get('median'))} | {ms(la.get('p10'))}–{ms(la.get('p90'))} | {ms(la.get('p99'))} | {p['errors']} |")
            names = s["runners"]
            if len(names) == 2:
                L.append(f"\nruns/s, nanoclaw / docker: {ratio(s['per'][names[0]]['rate']['median'], s['per'][names[1]]['rate']['median'])}.")
            L += ["", cpu_line(s["cpu"])]
    if "e" in secs_:
        s = secs_["e"]
        L += ["", "#### (e) Memory with idle sandboxes", "",
              "Sandboxes made with the e2b SDK (" + str(a.idle_parallel) + " threads) and left idle; measured 2 s "
              "after the last one. Daemon = `nanoclaw serve`'s own /proc/PID/status (PSS: smaps_rollup). Keepers + sandboxes = summed "
              "PSS (smaps_rollup) of every keeper and its descendants. Kernel = Slab + KernelStack + PageTables "
              "(/proc/meminfo) since the 0 row: namespaces, cgroups, page tables. MemAvailable delta = since the "
              "0 row, system-wide: other work on the machine (builds) moves it by tens of MiB, so read it per "
              "sandbox only at the largest count.", "",
              "*One more create* = " + str(a.probe_creates) + " sequential creates (raw HTTP, unix socket) with that "
              "many sandboxes up, each killed before the next: median (min).", "",
              "| idle | daemon VmRSS | VmHWM | daemon PSS | threads | fds | keepers · processes | keepers + sandboxes PSS (per sandbox) | kernel (per sandbox) | MemAvailable delta (per sandbox) | one more create |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in s["nanoclaw"]:
            c = x["count"]
            per_pss = mib(x["pss"] / c) if c else "—"
            per_av = mib(x["mem_used_delta"] / c) if c else "—"
            L.append(f"| {c} | {mib(x['vmrss'])} | {mib(x['vmhwm'])} | {mib(x.get('daemon_pss'))} | {x['threads']} | {x['fds']} | "
                     f"{x['keepers']} · {x['procs']} | {mib(x['pss'])} ({per_pss}) | {mib(x['kmem_delta'])} "
                     f"({mib(x['kmem_delta'] / c) if c else '—'}) | {mib(x['mem_used_delta'])} ({per_av}) | "
                     f"{ms((x.get('create_probe') or {}).get('median'))} ({ms((x.get('create_probe') or {}).get('min'))}) |")
        ak = s.get("nanoclaw_after_kill")
        if ak:
            L.append(f"\nAfter killing all {s['counts'][-1]} (calls returned in {s['nanoclaw_kill_all_s']:.1f} s with 8 threads, "
                     f"every keeper gone after {s.get('nanoclaw_gone_all_s', 0):.1f} s): daemon VmRSS "
                     f"{mib(ak['vmrss'])} (PSS {mib(ak.get('daemon_pss'))}), threads {ak['threads']}, fds {ak['fds']}.")
            left = s.get("nanoclaw_left")
            if left:
                L.append(f"Left behind: {left['keepers']} keepers, {left['state_dirs']} state directories, "
                         f"{left['cgroups']} cgroups (of the sandboxes made here).")
        if s.get("docker"):
            L += ["", "Docker, same procedure (containers `sh -c 'read _'`, `--network none`):", "",
                  "| idle | dockerd VmRSS | containerd VmRSS | shims · processes | shims + containers PSS (per container) | kernel (per container) | MemAvailable delta (per container) | one more create + start |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for x in s["docker"]:
                c = x["count"]
                per_pss = mib(x["pss"] / c) if c else "—"
                per_av = mib(x["mem_used_delta"] / c) if c else "—"
                L.append(f"| {c} | {mib(x.get('rss_dockerd'))} | {mib(x.get('rss_containerd'))} | {x['shims']} · {x['procs']} | "
                         f"{mib(x['pss'])} ({per_pss}) | {mib(x['kmem_delta'])} ({mib(x['kmem_delta'] / c) if c else '—'}) | "
                         f"{mib(x['mem_used_delta'])} ({per_av}) | {ms((x.get('create_probe') or {}).get('median'))} "
                         f"({ms((x.get('create_probe') or {}).get('min'))}) |")
            L.append(f"\nRemoving all {s['docker_counts'][-1]}: {s['docker_remove_all_s']:.1f} s (8 threads).")
            nl = [x for x in s["nanoclaw"] if x["count"]]
            dl = [x for x in s["docker"] if x["count"]]
            if nl and dl:
                n_, d_ = nl[-1], dl[-1]
                busy = any(w and w["cores"]["other"] >= 0.25 for w in (s.get("nanoclaw_cpu"), s.get("docker_cpu")))
                avail = ("MemAvailable delta not compared: other processes were busy during the section, and "
                         "their memory moves it" if busy or n_["mem_used_delta"] <= 0 or d_["mem_used_delta"] <= 0 else
                         f"MemAvailable delta {ratio(d_['mem_used_delta'] / d_['count'], n_['mem_used_delta'] / n_['count'])}")
                L.append(f"Per sandbox at the largest count, docker / nanoclaw: PSS {ratio(d_['pss'] / d_['count'], n_['pss'] / n_['count'])}, "
                         f"kernel {ratio(d_['kmem_delta'] / d_['count'], n_['kmem_delta'] / n_['count'])}; {avail}"
                         + ("" if n_["count"] == d_["count"] else f" ({d_['count']} containers vs {n_['count']} sandboxes)") + ".")
        L += ["", "nanoclaw: " + cpu_line(s["nanoclaw_cpu"])]
        if s.get("docker_cpu"):
            L += ["", "docker: " + cpu_line(s["docker_cpu"])]
    L.append("")
    L.append("Command: `" + " ".join(["bench/e2b_bench.py", *r.get("argv", [])]) + "`")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="quick mode (the default): fewer iterations, --idle 200")
    g.add_argument("--full", action="store_true", help="full mode: more iterations, --idle 1000")
    p.add_argument("--nanoclaw", help="the nanoclaw binary (default: $NANOCLAW, else the release build)")
    p.add_argument("--image", default=os.environ.get("NANOCLAW_BENCH_IMAGE", IMAGE_DEFAULT))
    p.add_argument("--sections", default="abcde", help="which of a b c d e to run (default all)")
    p.add_argument("--iter-a", type=int, help="iterations of (a) (quick 20, full 50)")
    p.add_argument("--iter-b", type=int, help="iterations of (b) (quick 100, full 300)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds before (a) and (b)")
    p.add_argument("--settle-ms", type=int, default=30, help="pause after every measured run")
    p.add_argument("--concurrency", type=int, default=100, help="sandboxes at once in (c)")
    p.add_argument("--rounds-c", type=int, help="rounds of (c) per side (quick 1, full 2)")
    p.add_argument("--run-clients", type=int, default=4, help="concurrent clients in (d)")
    p.add_argument("--window-s", type=float, help="seconds per window in (d) (quick 5, full 10)")
    p.add_argument("--windows-d", type=int, help="windows per side in (d) (quick 2, full 3)")
    p.add_argument("--idle", type=int, help="largest idle-sandbox count in (e) (quick 200, full 1000)")
    p.add_argument("--docker-idle", type=int,
                   help="largest idle-container count in (e); 0 = skip docker there (default: as --idle, at most 200)")
    p.add_argument("--idle-parallel", type=int, default=8, help="threads making idle sandboxes in (e)")
    p.add_argument("--probe-creates", type=int, default=10,
                   help="sequential creates timed at each idle count in (e)")
    p.add_argument("--pool-size", type=int, default=4, help="warm pool size, when the daemon has --pool")
    p.add_argument("--pool-refill-ms", type=int, default=300, help="pause after a warm-pool create (refill)")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-pool variant")
    p.add_argument("--no-docker", action="store_true", help="nanoclaw only")
    p.add_argument("--shared-state", action="store_true",
                   help="run the daemon in the host's mount namespace (sees other daemons' keepers)")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (daemon log, data)")
    p.add_argument("--out", nargs="?", const="", default=None,
                   help="write the report to this .md (and .json beside it); without a value "
                        "bench/results/<date>-e2b.md")
    a = p.parse_args(argv)
    full = a.full
    a.quick = not full
    dflt = lambda v, q, f: v if v is not None else (f if full else q)  # noqa: E731
    a.iter_a = dflt(a.iter_a, 20, 50)
    a.iter_b = dflt(a.iter_b, 100, 300)
    a.rounds_c = dflt(a.rounds_c, 1, 2)
    a.window_s = dflt(a.window_s, 5.0, 10.0)
    a.windows_d = dflt(a.windows_d, 2, 3)
    a.idle = dflt(a.idle, 200, 1000)
    if a.docker_idle is None:
        a.docker_idle = min(a.idle, 200)
    a.sections = [s for s in a.sections if s in "abcde"]
    if not a.nanoclaw:
        tgt = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
        a.nanoclaw = os.environ.get("NANOCLAW") or os.path.join(tgt, "x86_64-unknown-linux-gnu", "release", "nanoclaw")
    a.nanoclaw = os.path.abspath(a.nanoclaw)
    if not os.access(a.nanoclaw, os.X_OK):
        p.error(f"no nanoclaw binary at {a.nanoclaw} (build it: cargo build --release -p nanoclaw, or pass --nanoclaw)")
    if a.no_docker:
        a.docker_idle = 0
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:
        # bench/e2b_bench.py --render RESULTS.json: print the report again
        with open(argv[1]) as f:
            sys.stdout.write(markdown(json.load(f)))
        return 0
    a = parse_args(argv)

    def on_signal(signum, _frame):
        STOP.set()
        raise Interrupted(f"signal {signum}")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    b = Bench(a)
    rc = 0
    try:
        b.run()
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        rc = 130
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        if b.daemon is not None:
            log("nanoclaw serve log (tail):\n" + b.daemon.tail())
        rc = 1
    finally:
        STOP.set()
        # a second signal during clean-up must not cut it short
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        b.cleanup()
    if rc == 0 or b.results.get("sections"):
        md = markdown(b.results)
        print(md)
        if a.out is not None:
            path = a.out or os.path.join(REPO, "bench", "results",
                                         datetime.date.today().isoformat() + "-e2b.md")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(md)
            js = os.path.splitext(path)[0] + ".json"
            with open(js, "w") as f:
                json.dump(b.results, f, indent=1, default=str)
            log(f"report in {path} and {js}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
