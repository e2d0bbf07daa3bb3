"""Finding a daemon, and starting an embedded one for the life of a client."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import httpx

from ._errors import DaemonUnavailable

#: How long an embedded daemon may take to answer ``/healthz``.
START_TIMEOUT_S = 30.0
#: How long it may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0


def default_socket() -> Path:
    """The socket ``nanoclaw serve`` listens on by default (``$NANOCLAW_SOCKET``
    overrides it): ``/run/nanoclaw/nanoclaw.sock`` as root, else
    ``$XDG_RUNTIME_DIR/nanoclaw/nanoclaw.sock`` (``/tmp/nanoclaw-UID/…``
    without ``XDG_RUNTIME_DIR``)."""
    env = os.environ.get("NANOCLAW_SOCKET")
    if env:
        return Path(env)
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/nanoclaw/nanoclaw.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "nanoclaw" / "nanoclaw.sock"
    return Path(f"/tmp/nanoclaw-{uid}/nanoclaw.sock")


def socket_answers(path: Path, timeout: float = 2.0) -> bool:
    """Whether a daemon answers ``GET /healthz`` on the unix socket ``path``."""
    if not path.exists():
        return False
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(path)),
            base_url="http://nanoclaw",
            timeout=timeout,
        ) as c:
            return c.get("/healthz").status_code == 200
    except (httpx.HTTPError, OSError):
        return False


def find_binary() -> str:
    """``$NANOCLAW_BIN``, else ``nanoclaw`` on PATH."""
    env = os.environ.get("NANOCLAW_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise DaemonUnavailable(f"NANOCLAW_BIN={env} is not an executable file")
        return env
    found = shutil.which("nanoclaw")
    if not found:
        raise DaemonUnavailable(
            "no nanoclaw daemon answers and the nanoclaw binary is not on PATH "
            "(install it, or set NANOCLAW_BIN) to start one"
        )
    return found


def _session_hashes(data: Path) -> List[str]:
    """The HASH of the daemon's agent sessions (``serve-TENANT-HASH``) for
    the data folder, as the daemon may spell its path."""
    out = []
    for p in {str(data.absolute()), os.path.realpath(data)}:
        out.append(hashlib.sha256(os.fsencode(p)).hexdigest()[:8])
    return out


class EmbeddedDaemon:
    """``nanoclaw serve --config C --data D --listen unix:S`` as a child
    process, in a private (0700) temporary directory that also holds the
    socket (and the data folder when none is given). :meth:`stop` ends it,
    ends the agent sandboxes it made and removes what it created."""

    def __init__(self, config_path: str, data_dir: Optional[str]) -> None:
        self.binary = find_binary()
        config = Path(config_path)
        if not config.is_file():
            raise DaemonUnavailable(f"config file {config_path} does not exist")
        self.config = config.resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix="nanoclaw-sdk-"))
        os.chmod(self.tmp, 0o700)
        self.socket = self.tmp / "nanoclaw.sock"
        if data_dir is None:
            self.data = self.tmp / "data"
            self.data.mkdir(mode=0o700)
        else:
            self.data = Path(data_dir).absolute()
            self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log = self.tmp / "serve.log"
        self.proc: Optional[subprocess.Popen] = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "serve",
                    "--config",
                    str(self.config),
                    "--data",
                    str(self.data),
                    "--listen",
                    f"unix:{self.socket}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own process group: a ^C in the terminal reaches the
                # Python program, which then stops the daemon in order.
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not socket_answers(self.socket, timeout=1.0):
            code = self.proc.poll()
            if code is not None:
                raise DaemonUnavailable(
                    f"nanoclaw serve exited ({code}) at start: {self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"nanoclaw serve did not answer within {START_TIMEOUT_S:.0f} s: "
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return "(no output)"
        return text[-2000:] or "(no output)"

    def stop(self) -> None:
        """Stops the daemon (SIGTERM, then SIGKILL), ends the agent
        sandboxes its runs made, removes the temporary directory."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except ProcessLookupError:
                pass
        if proc is not None:
            self._remove_agent_sandboxes()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _remove_agent_sandboxes(self) -> None:
        """The agents' scoped sandboxes of this daemon (session
        ``serve-TENANT-HASH``, HASH naming its data folder) outlive it by
        design; an embedded daemon's runs leave none behind."""
        try:
            out = subprocess.run(
                [self.binary, "sandbox", "ls", "--json"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
            sandboxes = json.loads(out.stdout or b"[]")
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        hashes = _session_hashes(self.data)
        for s in sandboxes if isinstance(sandboxes, list) else []:
            scope = s.get("scope") if isinstance(s, dict) else None
            session = (scope or {}).get("session") or ""
            if session.startswith("serve-") and any(
                session.endswith("-" + h) for h in hashes
            ):
                try:
                    subprocess.run(
                        [self.binary, "sandbox", "rm", str(s.get("id"))],
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        timeout=30,
                    )
                except (OSError, subprocess.SubprocessError):
                    pass
