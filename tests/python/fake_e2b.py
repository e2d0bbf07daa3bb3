#!/usr/bin/env python3
"""A small, loopback-only fake of the E2B control plane + envd data plane.

Used for two things:

1. Capturing the exact wire format of the pinned `e2b` / `e2b-code-interpreter`
   SDKs (every request and response is appended to a JSONL log), which is what
   docs/e2b-wire.md was written from.
2. Checking the Python test suite itself (tests/python/test_e2b_sdk.py) against
   a server that speaks the protocol, before the real `nanoclaw serve` exists.

It is NOT a sandbox: commands run as plain host subprocesses (with a per-sandbox
directory as $HOME/cwd), so the containment tests are expected to fail against
it. The files API maps sandbox paths under a per-sandbox root directory.

    python3 tests/python/fake_e2b.py --port 0 --log /tmp/wire.jsonl \
        --key e2b_aaaa...=tenant-a --key e2b_bbbb...=tenant-b

prints `listening http://127.0.0.1:PORT` and serves until killed. It binds
127.0.0.1 only.

One port serves everything, like the real `nanoclaw serve` is meant to: a
request carrying an `E2b-Sandbox-Id` header is data plane (envd when
`E2b-Sandbox-Port` is 49983 or absent, the code-interpreter Jupyter API when
it is 49999); anything else is the control-plane REST API.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import posixpath
import secrets
import shutil
import signal
import stat as statmod
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENVD_PORT = "49983"
JUPYTER_PORT = "49999"
ENVD_VERSION = "0.6.4"  # >= every feature gate in e2b 2.63.0 (max gate: 0.6.4)
HOME = "/home/user"

LOG_LOCK = threading.Lock()
LOG_FILE = None  # type: ignore


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def log(record: dict) -> None:
    if LOG_FILE is None:
        return
    with LOG_LOCK:
        LOG_FILE.write(json.dumps(record, default=str) + "\n")
        LOG_FILE.flush()


# --------------------------------------------------------------------------
# Connect envelopes


def envelope(obj: dict, end: bool = False) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">BI", 0x02 if end else 0x00, len(data)) + data


def parse_envelopes(body: bytes) -> list:
    out = []
    i = 0
    while i + 5 <= len(body):
        flags, n = struct.unpack(">BI", body[i : i + 5])
        payload = body[i + 5 : i + 5 + n]
        try:
            msg = json.loads(payload)
        except ValueError:
            msg = payload.decode("utf-8", "replace")
        out.append({"flags": flags, "len": n, "msg": msg})
        i += 5 + n
    return out


class ConnectError(Exception):
    """A Connect error: code is the Connect string code (e.g. "not_found")."""

    HTTP = {
        "canceled": 499,
        "unknown": 500,
        "invalid_argument": 400,
        "deadline_exceeded": 504,
        "not_found": 404,
        "already_exists": 409,
        "permission_denied": 403,
        "resource_exhausted": 429,
        "failed_precondition": 400,
        "aborted": 409,
        "out_of_range": 400,
        "unimplemented": 501,
        "internal": 500,
        "unavailable": 503,
        "data_loss": 500,
        "unauthenticated": 401,
    }

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class HttpError(Exception):
    def __init__(self, status: int, message: str, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


# --------------------------------------------------------------------------
# State


class Proc:
    def __init__(self, sb: "Sandbox", pid: int, config: dict, tag, stdin: bool, user: str = "user"):
        self.sb = sb
        self.user = user
        self.pid = pid
        self.config = config
        self.tag = tag
        self.events: list = []  # ProcessEvent JSON objects
        self.cond = threading.Condition()
        self.done = False
        self.popen: subprocess.Popen | None = None
        self.want_stdin = stdin
        self.timer: threading.Timer | None = None
        self.timed_out = False

    def push(self, ev: dict) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def start(self, timeout_ms: int | None) -> None:
        cfg = self.config
        argv = [cfg.get("cmd", "/bin/bash")] + list(cfg.get("args", []))
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": self.sb.host_path(HOME),
            "USER": "user",
            "LANG": "C.UTF-8",
        }
        env.update(self.sb.envs)
        env.update(cfg.get("envs") or {})
        home = "/root" if self.user == "root" else HOME
        sandbox_cwd = cfg.get("cwd") or home
        cwd = self.sb.host_path(sandbox_cwd)
        if not os.path.isdir(cwd):
            raise ConnectError("invalid_argument", f"cwd '{cfg.get('cwd')}' does not exist")
        if BWRAP:
            env["HOME"] = home
            argv = bwrap_argv(self.sb.root, self.user, sandbox_cwd) + argv
            cwd = self.sb.root
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if self.want_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.push({"start": {"pid": self.pid}})
        if timeout_ms:
            self.timer = threading.Timer(timeout_ms / 1000.0, self._timeout)
            self.timer.daemon = True
            self.timer.start()
        readers = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, "stderr"), daemon=True),
        ]
        for t in readers:
            t.start()

        def waiter():
            for t in readers:
                t.join()
            rc = self.popen.wait()
            if self.timer:
                self.timer.cancel()
            if rc < 0:
                end = {"exitCode": -1, "exited": False, "status": f"signal: {signal.Signals(-rc).name.lower()[3:]}"}
            else:
                end = {"exitCode": rc, "exited": True, "status": f"exit status {rc}"}
            self.push({"end": end})
            with self.cond:
                self.done = True
                self.cond.notify_all()
            with self.sb.lock:
                self.sb.procs.pop(self.pid, None)

        threading.Thread(target=waiter, daemon=True).start()

    def _timeout(self):
        self.timed_out = True
        self.kill()

    def _pump(self, f, name):
        while True:
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                break
            self.push({"data": {name: base64.b64encode(chunk).decode()}})

    def kill(self, sig=signal.SIGKILL):
        if self.popen and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass


class Sandbox:
    def __init__(self, tenant: str, template: str, timeout: int, metadata: dict, envs: dict):
        self.id = "i" + secrets.token_hex(10)
        self.client_id = "nanoclaw"
        self.tenant = tenant
        self.template = template
        self.metadata = dict(metadata or {})
        self.envs = dict(envs or {})
        self.token = secrets.token_hex(16)
        self.state = "running"
        self.started_at = now_utc()
        self.end_at = self.started_at + timedelta(seconds=timeout)
        self.root = tempfile.mkdtemp(prefix=f"fake-e2b-{self.id}-")
        self.lock = threading.Lock()
        self.procs: dict = {}
        self.next_pid = 1000
        self.watchers: dict = {}
        for d in (HOME, "/etc", "/tmp", "/root"):
            os.makedirs(self.host_path(d), exist_ok=True)
        with open(self.host_path("/etc/hostname"), "w") as f:
            f.write(self.id + "\n")
        with open(self.host_path("/etc/passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n")

    def host_path(self, p: str, follow_last: bool = True) -> str:
        """Map a sandbox path (absolute, or relative to /home/user) to the host,
        resolving '..' and symlinks as if self.root were '/' (like openat2's
        RESOLVE_IN_ROOT; not race-free, good enough for a fake)."""
        if not p.startswith("/"):
            p = posixpath.join(HOME, p)
        todo = [c for c in p.split("/") if c]
        done: list = []
        hops = 0
        while todo:
            c = todo.pop(0)
            if c == ".":
                continue
            if c == "..":
                if done:
                    done.pop()
                continue
            cand = os.path.join(self.root, *done, c)
            if os.path.islink(cand) and (todo or follow_last):
                hops += 1
                if hops > 40:
                    raise ConnectError("invalid_argument", "too many levels of symbolic links")
                target = os.readlink(cand)
                if target.startswith("/"):
                    done = []
                todo = [x for x in target.split("/") if x] + todo
                continue
            done.append(c)
        return os.path.join(self.root, *done)

    def sandbox_path(self, host: str) -> str:
        rel = os.path.relpath(host, self.root)
        return "/" if rel == "." else "/" + rel

    def listed(self) -> dict:
        return {
            "templateID": self.template,
            "alias": self.template,
            "sandboxID": self.id,
            "clientID": self.client_id,
            "startedAt": iso(self.started_at),
            "endAt": iso(self.end_at),
            "cpuCount": 2,
            "memoryMB": 512,
            "diskSizeMB": 1024,
            "metadata": self.metadata,
            "state": self.state,
            "envdVersion": ENVD_VERSION,
        }

    def created(self) -> dict:
        return {
            "templateID": self.template,
            "alias": self.template,
            "sandboxID": self.id,
            "clientID": self.client_id,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self.token,
            "trafficAccessToken": None,
            "domain": None,
        }

    def destroy(self) -> None:
        self.state = "killed"
        for p in list(self.procs.values()):
            p.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class State:
    def __init__(self, keys: dict):
        self.keys = keys  # api key -> tenant; empty = any key is its own tenant
        self.lock = threading.Lock()
        self.sandboxes: dict = {}

    def tenant_for(self, key: str | None) -> str | None:
        if not key:
            return None
        if not self.keys:
            return key
        return self.keys.get(key)

    def get(self, tenant: str, sid: str) -> Sandbox | None:
        with self.lock:
            sb = self.sandboxes.get(sid)
        if sb is None or sb.tenant != tenant or sb.state == "killed":
            return None
        if sb.state == "running" and now_utc() > sb.end_at:
            sb.destroy()
            return None
        return sb


STATE: State = None  # type: ignore

BWRAP = shutil.which("bwrap") if not os.environ.get("FAKE_E2B_NO_BWRAP") else None


def bwrap_argv(root: str, user: str, cwd: str) -> list:
    """Run a command with the sandbox root's /home, /tmp, /etc, /root bound
    over the host's, the host's /usr read-only, and its own pid namespace
    (so /proc/1/root is the sandbox too). Only a fake: no seccomp, no
    network isolation, no limits."""
    uid = "0" if user == "root" else "1000"
    a = ["bwrap", "--unshare-user", "--uid", uid, "--gid", uid, "--unshare-pid", "--unshare-ipc",
         "--die-with-parent", "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev"]
    for d in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(d):
            a += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            a += ["--ro-bind", d, d]
    for d in ("/home", "/tmp", "/etc", "/root"):
        a += ["--bind", os.path.join(root, d.lstrip("/")), d]
    return a + ["--chdir", cwd]


# --------------------------------------------------------------------------
# filesystem helpers


def file_type(st) -> str:
    if statmod.S_ISDIR(st.st_mode):
        return "FILE_TYPE_DIRECTORY"
    if statmod.S_ISREG(st.st_mode):
        return "FILE_TYPE_FILE"
    return "FILE_TYPE_UNSPECIFIED"


def entry_info(sb: Sandbox, host: str) -> dict:
    lst = os.lstat(host)
    is_link = statmod.S_ISLNK(lst.st_mode)
    st = os.stat(host) if is_link and os.path.exists(host) else lst
    e = {
        "name": os.path.basename(host) or "/",
        "type": file_type(st),
        "path": sb.sandbox_path(host),
        "size": str(st.st_size),
        "mode": statmod.S_IMODE(st.st_mode) | (0o20000000000 if statmod.S_ISDIR(st.st_mode) else 0),
        "permissions": statmod.filemode(st.st_mode),
        "owner": "user",
        "group": "user",
        "modifiedTime": iso(datetime.fromtimestamp(st.st_mtime, timezone.utc)),
    }
    if is_link:
        e["symlinkTarget"] = os.readlink(host)
    return e


def snapshot(root: str, recursive: bool) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size)
        if not recursive:
            break
    return out


def diff_events(old: dict, new: dict) -> list:
    ev = []
    for k in new:
        if k not in old:
            ev.append({"name": k, "type": "EVENT_TYPE_CREATE"})
            ev.append({"name": k, "type": "EVENT_TYPE_WRITE"})
        elif new[k] != old[k]:
            ev.append({"name": k, "type": "EVENT_TYPE_WRITE"})
    for k in old:
        if k not in new:
            ev.append({"name": k, "type": "EVENT_TYPE_REMOVE"})
    return ev


# --------------------------------------------------------------------------
# HTTP handler


def trim(b: bytes, n: int = 600):
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(b[:n]).decode(), "len": len(b)}
    return s if len(s) <= n else s[:n] + f"...(+{len(s) - n} chars)"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-e2b/0.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # ---- plumbing ------------------------------------------------------

    def read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            out = bytearray()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _rec(self, body: bytes) -> dict:
        u = urllib.parse.urlsplit(self.path)
        ct = self.headers.get("Content-Type", "")
        if ct.startswith("application/connect+"):
            shown = {"envelopes": parse_envelopes(body)}
        elif ct.startswith("application/json") and body:
            try:
                shown = json.loads(body)
            except ValueError:
                shown = trim(body)
        else:
            shown = trim(body) if body else None
        return {
            "ts": time.time(),
            "http": self.request_version,
            "method": self.command,
            "path": u.path,
            "query": urllib.parse.parse_qs(u.query, keep_blank_values=True),
            "raw_query": u.query,
            "headers": dict(self.headers.items()),
            "body": shown,
        }

    def send_plain(self, rec: dict, status: int, body: bytes, ctype: str, extra_headers: dict | None = None):
        self.send_response(status)
        hdrs = {"Content-Type": ctype, "Content-Length": str(len(body))}
        hdrs.update(extra_headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        rec["status"] = status
        rec["resp_headers"] = hdrs
        if ctype.startswith("application/json") and body:
            rec["resp_body"] = json.loads(body)
        else:
            rec["resp_body"] = trim(body) if body else None
        log(rec)

    def send_json(self, rec, status, obj, extra_headers=None):
        body = b"" if obj is None else json.dumps(obj).encode()
        self.send_plain(rec, status, body, "application/json", extra_headers)

    def start_stream(self, rec):
        self.send_response(200)
        self.send_header("Content-Type", "application/connect+json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        rec["status"] = 200
        rec["resp_headers"] = {"Content-Type": "application/connect+json", "Transfer-Encoding": "chunked"}
        rec["resp_frames"] = []

    def stream_frame(self, rec, obj, end=False) -> bool:
        data = envelope(obj, end)
        rec["resp_frames"].append({"flags": 2 if end else 0, "msg": obj})
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            if end:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            rec["client_gone"] = True
            return False

    # ---- dispatch ------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def dispatch(self):
        body = self.read_body()
        rec = self._rec(body)
        try:
            if self.headers.get("E2b-Sandbox-Id"):
                port = self.headers.get("E2b-Sandbox-Port", ENVD_PORT)
                if port == JUPYTER_PORT:
                    self.jupyter(rec, body)
                else:
                    self.envd(rec, body)
            else:
                self.control(rec, body)
        except HttpError as e:
            self.send_json(rec, e.status, {"code": e.status, "message": e.message, **e.extra})
        except ConnectError as e:
            self.send_json(rec, ConnectError.HTTP[e.code], {"code": e.code, "message": e.message})

    # ---- control plane -------------------------------------------------

    def control(self, rec, body):
        tenant = STATE.tenant_for(self.headers.get("X-API-KEY"))
        if tenant is None:
            raise HttpError(401, "Invalid API key")
        u = urllib.parse.urlsplit(self.path)
        parts = [p for p in u.path.split("/") if p]
        q = urllib.parse.parse_qs(u.query)
        req = json.loads(body) if body else {}
        m = self.command

        if m == "POST" and parts in (["sandboxes"], ["v2", "sandboxes"]):
            sb = Sandbox(tenant, req.get("templateID", "base"), int(req.get("timeout", 15)),
                         req.get("metadata") or {}, req.get("envVars") or {})
            with STATE.lock:
                STATE.sandboxes[sb.id] = sb
            return self.send_json(rec, 201, sb.created())

        if m == "GET" and parts in (["sandboxes"], ["v2", "sandboxes"]):
            with STATE.lock:
                sbs = [s for s in STATE.sandboxes.values() if s.tenant == tenant and s.state != "killed"]
            states = (q.get("state", ["running,paused"])[0]).split(",")
            sbs = [s for s in sbs if s.state in states]
            if "metadata" in q:
                want = {urllib.parse.unquote(k): urllib.parse.unquote(v)
                        for k, v in urllib.parse.parse_qsl(q["metadata"][0])}
                sbs = [s for s in sbs if all(s.metadata.get(k) == v for k, v in want.items())]
            sbs.sort(key=lambda s: (s.started_at, s.id))
            start = int(q.get("nextToken", ["0"])[0] or 0)
            limit = int(q.get("limit", ["100"])[0])
            page = sbs[start : start + limit]
            hdrs = {}
            if start + limit < len(sbs):
                hdrs["X-Next-Token"] = str(start + limit)
            return self.send_json(rec, 200, [s.listed() for s in page], hdrs)

        # /sandboxes/{id}/... and /v2/sandboxes/{id}/...
        if parts and parts[0] == "v2":
            parts = parts[1:]
        if len(parts) < 2 or parts[0] != "sandboxes":
            raise HttpError(404, f"no route {m} {u.path}")
        sid, rest = parts[1], parts[2:]
        sb = STATE.get(tenant, sid)
        if sb is None:
            raise HttpError(404, f"sandbox \"{sid}\" doesn't exist or you don't have access to it")

        if m == "GET" and rest == []:
            d = sb.listed()
            d.update({"envdAccessToken": sb.token, "domain": None})
            return self.send_json(rec, 200, d)
        if m == "DELETE" and rest == []:
            sb.destroy()
            return self.send_json(rec, 204, None)
        if m == "POST" and rest == ["timeout"]:
            sb.end_at = now_utc() + timedelta(seconds=int(req["timeout"]))
            return self.send_json(rec, 204, None)
        if m == "POST" and rest == ["pause"]:
            if sb.state == "paused":
                raise HttpError(409, f"sandbox {sid} is already paused")
            sb.state = "paused"
            return self.send_json(rec, 204, None)
        if m == "POST" and rest in (["connect"], ["resume"]):
            t = int(req.get("timeout", 300))
            if sb.state == "paused":
                sb.state = "running"
                sb.end_at = now_utc() + timedelta(seconds=t)
                status = 201
            else:
                sb.end_at = max(sb.end_at, now_utc() + timedelta(seconds=t))
                status = 200
            return self.send_json(rec, status, sb.created())
        if m == "GET" and rest == ["metrics"]:
            t = now_utc()
            return self.send_json(rec, 200, [{
                "timestamp": iso(t), "timestampUnix": int(t.timestamp()), "cpuCount": 2,
                "cpuUsedPct": 1.5, "memUsed": 50 << 20, "memTotal": 512 << 20, "memCache": 1 << 20,
                "diskUsed": 10 << 20, "diskTotal": 1 << 30,
            }])
        raise HttpError(404, f"no route {m} {u.path}")

    # ---- data plane: envd -----------------------------------------------

    def request_user(self) -> str:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            return base64.b64decode(auth[6:]).decode().split(":", 1)[0] or "user"
        return "user"

    def sandbox_for_data(self) -> Sandbox:
        sid = self.headers.get("E2b-Sandbox-Id")
        with STATE.lock:
            sb = STATE.sandboxes.get(sid)
        if sb is None or sb.state == "killed":
            # What E2B's edge proxy answers for an unknown/killed sandbox (502,
            # message containing "was not found" -> SandboxNotRunningException).
            raise HttpError(502, f"The sandbox {sid} was not found", {"sandboxId": sid})
        if self.headers.get("X-Access-Token") != sb.token:
            raise HttpError(401, "invalid access token")
        if sb.state == "paused":
            raise HttpError(502, f"The sandbox {sid} was not found (paused)")
        return sb

    def envd(self, rec, body):
        sb = self.sandbox_for_data()
        u = urllib.parse.urlsplit(self.path)
        path = u.path
        if path == "/health":
            return self.send_plain(rec, 204, b"", "text/plain")
        if path == "/files":
            return self.files(rec, sb, body)
        if path.startswith("/process.Process/"):
            return self.process_rpc(rec, sb, path.rsplit("/", 1)[1], body)
        if path.startswith("/filesystem.Filesystem/"):
            return self.fs_rpc(rec, sb, path.rsplit("/", 1)[1], body)
        raise HttpError(404, f"no route {path}")

    def files(self, rec, sb, body):
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if self.command == "GET":
            p = q.get("path", [""])[0]
            hp = sb.host_path(p)
            if os.path.isdir(hp):
                raise HttpError(400, f"path '{p}' is a directory")
            if not os.path.exists(hp):
                raise HttpError(404, f"path '{p}' does not exist")
            with open(hp, "rb") as f:
                data = f.read()
            return self.send_plain(rec, 200, data, "application/octet-stream")
        # POST
        ct = self.headers.get("Content-Type", "")
        written = []
        if ct.startswith("multipart/form-data"):
            parts = parse_multipart(ct, body)
            rec["multipart"] = [{"name": n, "filename": fn, "headers": h, "size": len(d)} for n, fn, h, d in parts]
            for _name, filename, _h, data in parts:
                p = q["path"][0] if "path" in q and len(parts) == 1 else filename
                written.append(self._write(sb, p, data))
        else:
            if self.headers.get("Content-Encoding") == "gzip":
                import gzip
                body = gzip.decompress(body)
            written.append(self._write(sb, q["path"][0], body))
        return self.send_json(rec, 200, written)

    def _write(self, sb, p, data):
        hp = sb.host_path(p)
        os.makedirs(os.path.dirname(hp), exist_ok=True)
        with open(hp, "wb") as f:
            f.write(data)
        return {"name": os.path.basename(hp), "type": "file", "path": sb.sandbox_path(hp)}

    def _req_msg(self, body):
        ct = self.headers.get("Content-Type", "")
        if ct.startswith("application/connect+json"):
            env = parse_envelopes(body)
            return env[0]["msg"] if env else {}
        return json.loads(body) if body else {}

    def process_rpc(self, rec, sb, method, body):
        msg = self._req_msg(body)
        if method == "Start":
            with sb.lock:
                sb.next_pid += 1
                pid = sb.next_pid
                proc = Proc(sb, pid, msg.get("process", {}), msg.get("tag"), bool(msg.get("stdin")),
                            self.request_user())
                sb.procs[pid] = proc
            t = self.headers.get("Connect-Timeout-Ms")
            try:
                proc.start(int(t) if t else None)
            except ConnectError:
                with sb.lock:
                    sb.procs.pop(pid, None)
                raise
            return self.stream_process(rec, proc, 0)
        if method == "Connect":
            pid = int(msg["process"]["pid"])
            proc = sb.procs.get(pid)
            if proc is None:
                raise ConnectError("not_found", f"process with pid {pid} not found")
            with proc.cond:
                idx = len(proc.events)
            self.start_stream(rec)
            self.stream_frame(rec, {"event": {"start": {"pid": pid}}})
            return self.stream_process(rec, proc, idx, started=True)
        if method == "List":
            procs = []
            for p in list(sb.procs.values()):
                info = {"config": p.config, "pid": p.pid}
                if p.tag:
                    info["tag"] = p.tag
                procs.append(info)
            return self.send_json(rec, 200, {"processes": procs})
        if method == "SendInput":
            proc = self._proc(sb, msg)
            data = base64.b64decode(msg.get("input", {}).get("stdin", ""))
            if proc.popen is None or proc.popen.stdin is None:
                raise ConnectError("failed_precondition", "stdin is not enabled for this process")
            proc.popen.stdin.write(data)
            proc.popen.stdin.flush()
            return self.send_json(rec, 200, {})
        if method == "CloseStdin":
            proc = self._proc(sb, msg)
            if proc.popen and proc.popen.stdin:
                proc.popen.stdin.close()
            return self.send_json(rec, 200, {})
        if method == "SendSignal":
            proc = self._proc(sb, msg)
            sig = {"SIGNAL_SIGKILL": signal.SIGKILL, "SIGNAL_SIGTERM": signal.SIGTERM}.get(msg.get("signal"), signal.SIGKILL)
            proc.kill(sig)
            return self.send_json(rec, 200, {})
        raise ConnectError("unimplemented", f"process.Process/{method} is not implemented")

    def _proc(self, sb, msg) -> Proc:
        pid = int(msg.get("process", {}).get("pid", -1))
        proc = sb.procs.get(pid)
        if proc is None:
            raise ConnectError("not_found", f"process with pid {pid} not found")
        return proc

    def stream_process(self, rec, proc: Proc, idx: int, started: bool = False):
        if not started:
            self.start_stream(rec)
        interval = int(self.headers.get("Keepalive-Ping-Interval") or 0)
        last_send = time.monotonic()
        while True:
            with proc.cond:
                while idx >= len(proc.events) and not proc.done:
                    proc.cond.wait(timeout=0.5)
                    if interval and time.monotonic() - last_send >= interval:
                        break
                batch = proc.events[idx:]
                idx = len(proc.events)
                done = proc.done and not batch
            if not batch and not done:
                if not self.stream_frame(rec, {"event": {"keepalive": {}}}):
                    break
                last_send = time.monotonic()
                continue
            for ev in batch:
                if "end" in ev and proc.timed_out and not started:
                    # Connect-Timeout-Ms ran out: the process was killed; tell the
                    # Start caller with deadline_exceeded (-> TimeoutException),
                    # not with an end event (-> CommandExitException).
                    self.stream_frame(rec, {"error": {"code": "deadline_exceeded",
                                                      "message": "command timed out"}}, end=True)
                    self.close_connection = False
                    return log(rec)
                if not self.stream_frame(rec, {"event": ev}):
                    log(rec)
                    return
                last_send = time.monotonic()
            if any("end" in ev for ev in batch) or done:
                break
        self.stream_frame(rec, {}, end=True)
        self.close_connection = False
        log(rec)

    def fs_rpc(self, rec, sb, method, body):
        msg = self._req_msg(body)
        if method == "Stat":
            hp = sb.host_path(msg.get("path", ""), follow_last=False)
            if not os.path.lexists(hp):
                raise ConnectError("not_found", f"no such file or directory: {msg.get('path')}")
            return self.send_json(rec, 200, {"entry": entry_info(sb, hp)})
        if method == "ListDir":
            hp = sb.host_path(msg.get("path", ""))
            depth = int(msg.get("depth") or 1)
            if not os.path.isdir(hp):
                raise ConnectError("not_found" if not os.path.exists(hp) else "invalid_argument",
                                   f"path {msg.get('path')} is not a directory")
            entries = []
            base_depth = hp.rstrip("/").count("/")
            for dirpath, dirnames, filenames in os.walk(hp):
                dirnames.sort()
                for n in sorted(dirnames + filenames):
                    entries.append(entry_info(sb, os.path.join(dirpath, n)))
                if dirpath.rstrip("/").count("/") - base_depth + 1 >= depth:
                    dirnames[:] = []
            return self.send_json(rec, 200, {"entries": entries})
        if method == "MakeDir":
            hp = sb.host_path(msg["path"])
            if os.path.exists(hp):
                raise ConnectError("already_exists", f"path {msg['path']} already exists")
            os.makedirs(hp)
            return self.send_json(rec, 200, {"entry": entry_info(sb, hp)})
        if method == "Move":
            src = sb.host_path(msg["source"], follow_last=False)
            dst = sb.host_path(msg["destination"], follow_last=False)
            if not os.path.lexists(src):
                raise ConnectError("not_found", f"source {msg['source']} not found")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            return self.send_json(rec, 200, {"entry": entry_info(sb, dst)})
        if method == "Remove":
            hp = sb.host_path(msg["path"], follow_last=False)
            if not os.path.lexists(hp):
                raise ConnectError("not_found", f"path {msg['path']} not found")
            shutil.rmtree(hp) if os.path.isdir(hp) and not os.path.islink(hp) else os.remove(hp)
            return self.send_json(rec, 200, {})
        if method == "CreateWatcher":
            hp = sb.host_path(msg["path"])
            if not os.path.isdir(hp):
                raise ConnectError("not_found", f"directory {msg['path']} not found")
            wid = secrets.token_hex(8)
            sb.watchers[wid] = {"root": hp, "recursive": bool(msg.get("recursive")),
                                "snap": snapshot(hp, bool(msg.get("recursive")))}
            return self.send_json(rec, 200, {"watcherId": wid})
        if method == "GetWatcherEvents":
            w = sb.watchers.get(msg.get("watcherId"))
            if w is None:
                raise ConnectError("not_found", f"watcher {msg.get('watcherId')} not found")
            new = snapshot(w["root"], w["recursive"])
            ev = diff_events(w["snap"], new)
            w["snap"] = new
            return self.send_json(rec, 200, {"events": ev})
        if method == "RemoveWatcher":
            sb.watchers.pop(msg.get("watcherId"), None)
            return self.send_json(rec, 200, {})
        if method == "WatchDir":
            hp = sb.host_path(msg["path"])
            if not os.path.isdir(hp):
                raise ConnectError("not_found", f"directory {msg['path']} not found")
            rec_ = bool(msg.get("recursive"))
            snap = snapshot(hp, rec_)
            self.start_stream(rec)
            if not self.stream_frame(rec, {"start": {}}):
                return log(rec)
            deadline = time.monotonic() + int(self.headers.get("Connect-Timeout-Ms") or 60000) / 1000
            while time.monotonic() < deadline:
                time.sleep(0.2)
                new = snapshot(hp, rec_)
                for e in diff_events(snap, new):
                    if not self.stream_frame(rec, {"filesystem": e}):
                        return log(rec)
                snap = new
            self.stream_frame(rec, {}, end=True)
            return log(rec)
        raise ConnectError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")

    # ---- data plane: code interpreter (port 49999) ----------------------

    def jupyter(self, rec, body):
        sb = self.sandbox_for_data()
        path = urllib.parse.urlsplit(self.path).path
        if path == "/contexts" and self.command == "POST":
            req = json.loads(body or b"{}")
            return self.send_json(rec, 200, {"id": secrets.token_hex(8), "language": req.get("language") or "python",
                                             "cwd": req.get("cwd") or HOME})
        if path == "/contexts" and self.command == "GET":
            return self.send_json(rec, 200, [{"id": "default-python", "language": "python", "cwd": HOME}])
        if path != "/execute":
            raise HttpError(404, f"no route {path}")
        req = json.loads(body)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": sb.host_path(HOME)}
        env.update(sb.envs)
        env.update(req.get("env_vars") or {})
        p = subprocess.run([sys.executable, "-c", JUPYTER_SHIM, req["code"]], cwd=sb.host_path(HOME), env=env,
                           capture_output=True, timeout=300)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines = []
        ts = time.time_ns()
        result_line = None
        for line in p.stdout.decode("utf-8", "replace").splitlines(keepends=True):
            if line.startswith("\x00NCRESULT:"):
                result_line = json.loads(line[len("\x00NCRESULT:"):])
                continue
            lines.append({"type": "stdout", "text": line, "timestamp": ts})
        err = p.stderr.decode("utf-8", "replace")
        if p.returncode != 0:
            last = err.strip().splitlines()[-1] if err.strip() else "Error"
            name, _, value = last.partition(": ")
            lines.append({"type": "error", "name": name, "value": value, "traceback": err})
        elif err:
            lines.append({"type": "stderr", "text": err, "timestamp": ts})
        if result_line is not None:
            lines.append({"type": "result", "text": result_line, "is_main_result": True})
        lines.append({"type": "number_of_executions", "execution_count": 1})
        rec["status"] = 200
        rec["resp_lines"] = lines
        for obj in lines:
            data = (json.dumps(obj) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        log(rec)


JUPYTER_SHIM = r"""
import ast, sys
src = sys.argv[1]
tree = ast.parse(src)
last = None
if tree.body and isinstance(tree.body[-1], ast.Expr):
    last = ast.Expression(tree.body.pop().value)
g = {"__name__": "__main__"}
exec(compile(tree, "<cell>", "exec"), g)
if last is not None:
    v = eval(compile(last, "<cell>", "eval"), g)
    if v is not None:
        sys.stdout.flush()
        print("\x00NCRESULT:" + __import__("json").dumps(repr(v)))
"""


def parse_multipart(content_type: str, body: bytes) -> list:
    """Return [(field name, filename, part headers, data)]."""
    boundary = None
    for piece in content_type.split(";")[1:]:
        k, _, v = piece.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip('"')
    if not boundary:
        raise HttpError(400, "multipart without boundary")
    delim = b"--" + boundary.encode()
    out = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, _, data = chunk.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            k, _, v = line.partition(":")
            headers[k.strip()] = v.strip()
        cd = headers.get("Content-Disposition", "")
        name = filename = None
        for piece in cd.split(";")[1:]:
            k, _, v = piece.strip().partition("=")
            v = v.strip('"')
            if k == "name":
                name = v
            elif k == "filename":
                filename = v
            elif k == "filename*":
                filename = urllib.parse.unquote(v.split("''", 1)[-1])
        out.append((name, filename, headers, data))
    return out


def main():
    global STATE, LOG_FILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", help="append every request/response as JSON lines here")
    ap.add_argument("--key", action="append", default=[], help="API key=tenant (repeatable); none = any key")
    args = ap.parse_args()
    keys = dict(k.split("=", 1) for k in args.key)
    STATE = State(keys)
    if args.log:
        LOG_FILE = open(args.log, "a")
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the cleanup below
    print(f"listening http://127.0.0.1:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    finally:
        with STATE.lock:
            for sb in STATE.sandboxes.values():
                sb.destroy()


if __name__ == "__main__":
    main()
