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
