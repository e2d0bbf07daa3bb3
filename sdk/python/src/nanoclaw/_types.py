"""Results as dataclasses (the daemon's JSON is kept in ``raw``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Usage:
    """Model tokens of a run."""

    input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def from_json(cls, v: Any) -> "Usage":
        v = v if isinstance(v, dict) else {}
        return cls(
            input_tokens=int(v.get("input_tokens") or 0),
            output_tokens=int(v.get("output_tokens") or 0),
        )


@dataclass
class ExecutionResult:
    """The report of one ``execute``: the agent's answer and the last code
    it ran (``code``, ``language``, ``stdout``, ``stderr``, ``exit_code``;
    None when it ran none). ``audit_id`` is the seq of the run's
    ``agent_run`` record in the audit log."""

    answer: Optional[str]
    code: Optional[str]
    language: Optional[str]
    stdout: str
    stderr: str
    exit_code: Optional[int]
    files: List[Any]
    usage: Usage
    cost: Optional[float]
    audit_id: Optional[int]
    run_id: Optional[str]
    stop: Optional[str]
    tool_calls: List[Dict[str, Any]]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def success(self) -> bool:
        """The agent answered, and the last code it ran (if any) exited 0."""
        return self.stop == "answer" and self.exit_code in (None, 0)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "ExecutionResult":
        cost = v.get("cost")
        if isinstance(cost, dict):  # {"usd": …} or similar: keep the number
            cost = next((c for c in cost.values() if isinstance(c, (int, float))), None)
        return cls(
            answer=v.get("answer"),
            code=v.get("code"),
            language=v.get("language"),
            stdout=v.get("stdout") or "",
            stderr=v.get("stderr") or "",
            exit_code=v.get("exit_code"),
            files=list(v.get("files") or []),
            usage=Usage.from_json(v.get("usage")),
            cost=cost,
            audit_id=v.get("audit_seq"),
            run_id=v.get("run_id"),
            stop=v.get("stop"),
            tool_calls=list(v.get("tool_calls") or []),
            raw=v,
        )


@dataclass
class RunResult:
    """One command run in a fresh sandbox (``POST /v1/run``)."""

    exit_code: Optional[int]
    stdout: str
    stderr: str
    duration_ms: Optional[int]
    signal: Optional[Any]
    killed_by: Optional[Any]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "RunResult":
        return cls(
            exit_code=v.get("exit_code"),
            stdout=v.get("stdout") or "",
            stderr=v.get("stderr") or "",
            duration_ms=v.get("duration_ms"),
            signal=v.get("signal"),
            killed_by=v.get("killed_by"),
            raw=v,
        )


@dataclass
class CommandResult:
    """How a command in a sandbox ended (:meth:`Sandbox.run`).

    ``exit_code`` is its exit status (None when a signal or the timeout
    ended it); ``killed_by`` is ``"timeout"`` (the run's ``timeout``
    passed: the daemon killed it), ``"signal"`` (another signal), or None.
    ``status`` is the daemon's wording (``exit status 3``, ``signal:
    killed``). ``duration_ms`` is the wall time the client waited for it.
    A non-zero exit is a result, not an exception (see ``check=``)."""

    exit_code: Optional[int]
    stdout: str
    stderr: str
    duration_ms: int
    killed_by: Optional[str] = None
    status: Optional[str] = None
    pid: Optional[int] = None

    @property
    def ok(self) -> bool:
        """Exited 0."""
        return self.exit_code == 0


@dataclass
class EntryInfo:
    """A file or directory in a sandbox."""

    name: str
    path: str
    type: str
    size: int
    permissions: Optional[str] = None
    owner: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "EntryInfo":
        kind = str(v.get("type") or "")
        kind = {"FILE_TYPE_FILE": "file", "FILE_TYPE_DIRECTORY": "dir",
                "FILE_TYPE_SYMLINK": "symlink"}.get(kind, kind.lower() or "unknown")
        try:
            size = int(v.get("size") or 0)
        except (TypeError, ValueError):
            size = 0
        return cls(
            name=str(v.get("name") or ""),
            path=str(v.get("path") or ""),
            type=kind,
            size=size,
            permissions=v.get("permissions"),
            owner=v.get("owner"),
            raw=v,
        )


@dataclass
class SandboxInfo:
    """A sandbox as the daemon lists it."""

    sandbox_id: str
    template: str
    state: str
    metadata: Dict[str, str]
    started_at: Optional[str]
    end_at: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "SandboxInfo":
        return cls(
            sandbox_id=str(v.get("sandboxID") or ""),
            template=str(v.get("alias") or v.get("templateID") or ""),
            state=str(v.get("state") or "running"),
            metadata=dict(v.get("metadata") or {}),
            started_at=v.get("startedAt"),
            end_at=v.get("endAt"),
            raw=v,
        )


@dataclass
class ImageInfo:
    """A template the tenant can use: ``base`` (the host's root) or an
    image it registered (:meth:`NanoClaw.register_image`)."""

    name: str
    languages: List[str]
    reference: Optional[str] = None
    id: Optional[str] = None
    builtin: bool = False
    build_ms: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "ImageInfo":
        return cls(
            name=str(v.get("name") or ""),
            languages=list(v.get("languages") or []),
            reference=v.get("reference"),
            id=v.get("id"),
            builtin=bool(v.get("builtin", False)),
            build_ms=v.get("build_ms"),
            raw=v,
        )
