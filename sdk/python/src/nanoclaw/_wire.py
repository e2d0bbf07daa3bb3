"""The daemon's wire formats the sandbox level speaks: E2B's control plane
(JSON), envd's Connect RPCs with the JSON codec (unary, and the enveloped
server stream of ``process.Process/Start``) and ``/files``.

Pure functions: each request is built here and each answer read here, so
the sync and asyncio classes differ only in how they send."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from ._errors import NanoClawError
from ._types import CommandResult, EntryInfo, SandboxInfo

#: Connect's envelope flag of the last message (trailers, maybe an error).
END_STREAM = 0x02
#: Largest message accepted from the stream (the daemon sends far smaller).
MAX_MESSAGE = 16 << 20
STREAM_TYPE = "application/connect+json"
UNARY_TYPE = "application/json"


def envd_headers(sandbox_id: str, token: str) -> Dict[str, str]:
    """What a data-plane request carries: the sandbox and its token."""
    return {"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": token}


def create_body(
    template: str,
    timeout: int,
    envs: Optional[Mapping[str, str]],
    metadata: Optional[Mapping[str, str]],
    allow_internet_access: Optional[bool],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"templateID": template, "timeout": int(timeout)}
    if envs:
        body["envVars"] = dict(envs)
    if metadata:
        body["metadata"] = dict(metadata)
    if allow_internet_access is not None:
        body["allow_internet_access"] = allow_internet_access
    return body


def envelope(message: Dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


def start_request(
    cmd: Union[str, Sequence[str]],
    envs: Optional[Mapping[str, str]],
    cwd: Optional[str],
) -> Dict[str, Any]:
    """``process.Process/Start``: a shell string runs as ``/bin/sh -c``, an
    argv as it is."""
    if isinstance(cmd, str):
        program, args = "/bin/sh", ["-c", cmd]
    else:
        argv = list(cmd)
        if not argv:
            raise ValueError("cmd must not be empty")
        program, args = argv[0], argv[1:]
    process: Dict[str, Any] = {"cmd": program, "args": args, "envs": dict(envs or {})}
    if cwd is not None:
        process["cwd"] = cwd
    return {"process": process, "stdin": False}


class Frames:
    """Splits a Connect stream, fed in arbitrary chunks, into messages."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> Iterator[Tuple[int, Dict[str, Any]]]:
        self.buf += chunk
        while len(self.buf) >= 5:
            flags, size = struct.unpack(">BI", self.buf[:5])
            if size > MAX_MESSAGE:
                raise NanoClawError(0, "bad_answer", f"a stream message of {size} bytes")
            if len(self.buf) < 5 + size:
                return
            payload, self.buf = self.buf[5 : 5 + size], self.buf[5 + size :]
            try:
                msg = json.loads(payload or b"{}")
            except ValueError as e:
                raise NanoClawError(0, "bad_answer", f"not JSON: {payload[:200]!r}") from e
            yield flags, msg if isinstance(msg, dict) else {}


class Outcome:
    """A command's stream read so far."""

    def __init__(self) -> None:
        self.pid: Optional[int] = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.end: Optional[Dict[str, Any]] = None
        self.error: Optional[Dict[str, Any]] = None

    def take(self, flags: int, msg: Dict[str, Any]) -> None:
        if flags & END_STREAM:
            err = msg.get("error")
            self.error = err if isinstance(err, dict) else None
            return
        event = msg.get("event") or {}
        if "start" in event:
            self.pid = (event["start"] or {}).get("pid")
        elif "data" in event:
            data = event["data"] or {}
            for key, into in (("stdout", self.stdout), ("stderr", self.stderr)):
                if data.get(key):
                    into.extend(base64.b64decode(data[key]))
        elif "end" in event:
            self.end = event["end"] or {}

    def result(self, status: int, duration_ms: int) -> CommandResult:
        """The result; a stream that ended in an error other than the
        command's deadline raises it."""
        killed_by: Optional[str] = None
        if self.error is not None:
            code = self.error.get("code", "unknown")
            if code != "deadline_exceeded":
                raise NanoClawError(status, code, str(self.error.get("message") or code))
            killed_by = "timeout"
        end = self.end or {}
        exited = bool(end.get("exited", False))
        exit_code: Optional[int] = end.get("exitCode") if exited else None
        if killed_by is None and end and not exited:
            killed_by = "signal"
        if killed_by == "timeout":
            exit_code = None
        return CommandResult(
            exit_code=exit_code,
            stdout=self.stdout.decode(errors="replace"),
            stderr=self.stderr.decode(errors="replace"),
            duration_ms=duration_ms,
            killed_by=killed_by,
            status=end.get("status") or (self.error or {}).get("message"),
            pid=self.pid,
        )


def unary_answer(r: httpx.Response) -> Dict[str, Any]:
    """A Connect unary answer, or its error as an exception."""
    from ._client import _json  # the one reader of JSON answers

    v = _json(r)
    return v if isinstance(v, dict) else {}


def entries(v: Dict[str, Any]) -> List[EntryInfo]:
    return [EntryInfo.from_json(e) for e in v.get("entries") or []]


def sandboxes(v: Any) -> List[SandboxInfo]:
    return [SandboxInfo.from_json(s) for s in (v if isinstance(v, list) else [])]
