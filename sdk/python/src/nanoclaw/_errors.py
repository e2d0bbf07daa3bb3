"""Exceptions: every failure the daemon answers carries its own message."""

from __future__ import annotations

from typing import Optional


class NanoClawError(Exception):
    """A request the daemon refused or could not serve.

    ``status`` is the HTTP status (0 when no daemon answered), ``code`` the
    error's code as the daemon sent it (its ``code`` field, else the
    status), ``message`` the daemon's own message.
    """

    def __init__(self, status: int, code: object, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message


class QuotaExceeded(NanoClawError):
    """HTTP 429: a rate limit or quota; ``retry_after`` in seconds (or None)."""

    def __init__(
        self, status: int, code: object, message: str, retry_after: Optional[float]
    ) -> None:
        super().__init__(status, code, message)
        self.retry_after = retry_after


class DaemonUnavailable(NanoClawError):
    """No daemon answered and none could be started."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unavailable", message)


class CommandExitError(NanoClawError):
    """``Sandbox.run(..., check=True)`` of a command that did not exit 0;
    ``result`` is its :class:`~nanoclaw.CommandResult`."""

    def __init__(self, result: "object", cmd: "object") -> None:
        code = getattr(result, "exit_code", None)
        killed = getattr(result, "killed_by", None)
        how = f"was killed ({killed})" if killed else f"exited {code}"
        super().__init__(0, "exit", f"command {cmd!r} {how}")
        self.result = result
