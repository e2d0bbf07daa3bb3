"""The client: seed 000's ``NanoClaw`` over a daemon's HTTP API."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from urllib.parse import quote
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import httpx

from ._daemon import EmbeddedDaemon, default_socket, socket_answers
from ._errors import DaemonUnavailable, NanoClawError, QuotaExceeded
from ._types import ExecutionResult, ImageInfo, RunResult

if TYPE_CHECKING:
    from ._sandbox import Sandbox

#: Timeout of requests other than ``execute`` (seconds).
REQUEST_TIMEOUT_S = 60.0
#: How long ``register_image`` waits for the daemon's build (seconds; the
#: daemon kills a build after 15 minutes).
BUILD_TIMEOUT_S = 16 * 60.0
#: Approval decisions ``approve`` accepts.
DECISIONS = ("allow-once", "allow-always", "deny")


def _error(r: httpx.Response) -> NanoClawError:
    """The daemon's error answer as an exception."""
    code: object = r.status_code
    message = r.text.strip() or r.reason_phrase
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or message)
        code = body.get("code", code)
    if r.status_code == 429:
        retry: Optional[float]
        try:
            retry = float(r.headers.get("retry-after", ""))
        except ValueError:
            retry = None
        return QuotaExceeded(r.status_code, code, message, retry)
    return NanoClawError(r.status_code, code, message)


def _json(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise _error(r)
    try:
        return r.json()
    except ValueError as e:
        raise NanoClawError(r.status_code, "bad_answer", f"not JSON: {r.text[:200]!r}") from e


def _transport_error(e: Exception, where: str) -> NanoClawError:
    return DaemonUnavailable(f"cannot reach the nanoclaw daemon at {where}: {e}")


class NanoClaw:
    """A client of a nanoclaw daemon (seed 000's API).

    Which daemon: ``url`` (``http://127.0.0.1:PORT``, with ``api_key`` or
    ``$NANOCLAW_API_KEY``), else the daemon's unix socket
    (:func:`nanoclaw.default_socket`; no key needed there: its callers act
    as the daemon's ``local`` tenant). When no daemon answers there and
    ``config_path`` is given, an embedded ``nanoclaw serve --config
    config_path`` is started for the life of this object (data folder:
    ``data_dir``, else ``audit_path``, else a temporary one) and stopped
    by :meth:`close`, ``with`` or garbage collection.

    Auditing (seed 000's ``audit_log=True, audit_path=…``): the daemon
    records every request, sandbox, command, model call, tool call and
    approval in its hash-chained SQLite audit log; it cannot be turned
    off, so ``audit_log=False`` is refused (``ValueError``) rather than
    silently ignored. ``audit_path`` is a folder where the log must be
    kept: only a daemon this object starts can promise that, so it needs
    ``config_path`` and always starts an embedded daemon whose data folder
    it is (the log is ``audit_path/nanoclaw.db``, kept after
    :meth:`close`; ``nanoclaw audit verify --data audit_path`` checks its
    chain). :meth:`audit` reads the records back.
    """

    def __init__(
        self,
        config_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        audit_log: bool = True,
        audit_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        data_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        socket_path: Optional[Union[str, "os.PathLike[str]"]] = None,
    ) -> None:
        if not audit_log:
            raise ValueError(
                "audit_log=False: nanoclaw's daemon records every request and run in its "
                "audit log and cannot be told not to; leave audit_log=True"
            )
        if audit_path is not None:
            if config_path is None or url is not None:
                raise ValueError(
                    "audit_path= names where the audit log is kept, which only a daemon this "
                    "client starts can promise: give config_path= (and no url=)"
                )
            if data_dir is not None and os.path.abspath(data_dir) != os.path.abspath(audit_path):
                raise ValueError(
                    "give data_dir= or audit_path=, not both: the embedded daemon keeps its "
                    "audit log in its data folder"
                )
        self.audit_path: Optional[Path] = (
            Path(audit_path).absolute() if audit_path is not None else None
        )
        self._embedded: Optional[EmbeddedDaemon] = None
        self._headers: Dict[str, str] = {}
        key = api_key or os.environ.get("NANOCLAW_API_KEY")
        if key:
            self._headers["X-API-Key"] = key
        self._url: Optional[str] = None
        self._socket: Optional[Path] = None
        if url is not None:
            self._url = url.rstrip("/")
        else:
            sock = Path(socket_path) if socket_path is not None else default_socket()
            if audit_path is None and socket_answers(sock):
                self._socket = sock
            elif config_path is not None:
                data = data_dir if data_dir is not None else audit_path
                self._embedded = EmbeddedDaemon(
                    os.fspath(config_path), os.fspath(data) if data is not None else None
                )
                self._socket = self._embedded.socket
                # Stopped even if close() is never called.
                self._finalizer = weakref.finalize(self, self._embedded.stop)
            else:
                raise DaemonUnavailable(
                    f"no nanoclaw daemon answers on {sock} (start one with `nanoclaw serve`, "
                    "give url=, or give config_path= to start an embedded one)"
                )
        self._client = httpx.Client(**self._client_args(sync=True))

    # -- plumbing ---------------------------------------------------------

    @property
    def where(self) -> str:
        """The daemon's URL or ``unix:SOCKET``."""
        return self._url if self._url is not None else f"unix:{self._socket}"

    @property
    def embedded(self) -> bool:
        """Whether this object started (and owns) its daemon."""
        return self._embedded is not None

    @property
    def daemon_pid(self) -> Optional[int]:
        """The embedded daemon's pid (None when it is not ours or stopped)."""
        e = self._embedded
        return e.proc.pid if e is not None and e.proc is not None else None

    def _client_args(self, sync: bool) -> Dict[str, Any]:
        args: Dict[str, Any] = {
            "headers": self._headers,
            "timeout": REQUEST_TIMEOUT_S,
        }
        if self._url is not None:
            args["base_url"] = self._url
        else:
            uds = str(self._socket)
            args["base_url"] = "http://nanoclaw"
            args["transport"] = (
                httpx.HTTPTransport(uds=uds) if sync else httpx.AsyncHTTPTransport(uds=uds)
            )
        return args

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._client.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self.where) from e
        return _json(r)

    async def _request_async(self, method: str, path: str, **kw: Any) -> Any:
        try:
            async with httpx.AsyncClient(**self._client_args(sync=False)) as c:
                r = await c.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self.where) from e
        return _json(r)

    def close(self) -> None:
        """Closes the connection; stops an embedded daemon (no process, no
        socket left behind)."""
        self._client.close()
        if self._embedded is not None:
            self._finalizer()

    def __enter__(self) -> "NanoClaw":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "NanoClaw":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- agents -----------------------------------------------------------

    @staticmethod
    def _execute_body(
        prompt: str, language: str, timeout: float, agent: Optional[str], image: Optional[str]
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {"prompt": prompt, "language": language, "timeout": timeout}
        if agent is not None:
            body["agent"] = agent
        if image is not None:
            body["image"] = image
        return body

    def execute(
        self,
        prompt: str,
        language: str = "python",
        timeout: float = 30,
        agent: Optional[str] = None,
        image: Optional[str] = None,
    ) -> ExecutionResult:
        """Runs the agent on ``prompt``: it writes code in ``language``, runs
        it in its sandbox (each piece at most ``timeout`` seconds) and
        answers. ``image``: an image registered with
        :meth:`register_image` (for ``language``) whose root the agent's
        sandbox uses. Raises :class:`NanoClawError` with the daemon's
        message (404 unknown agent or image, 502 the model API failed, 429
        too many runs)."""
        body = self._execute_body(prompt, language, timeout, agent, image)
        # The daemon bounds the run's wall time; the client waits for it.
        v = self._request("POST", "/v1/execute", json=body, timeout=httpx.Timeout(None, connect=10))
        return ExecutionResult.from_json(v)

    async def execute_async(
        self,
        prompt: str,
        language: str = "python",
        timeout: float = 30,
        agent: Optional[str] = None,
        image: Optional[str] = None,
    ) -> ExecutionResult:
        """:meth:`execute` for asyncio: ``asyncio.gather`` of several runs
        them in parallel (up to the daemon's 4 runs per tenant)."""
        body = self._execute_body(prompt, language, timeout, agent, image)
        v = await self._request_async(
            "POST", "/v1/execute", json=body, timeout=httpx.Timeout(None, connect=10)
        )
        return ExecutionResult.from_json(v)

    def approvals(self, all: bool = False) -> List[Dict[str, Any]]:
        """Pending approval requests of the caller's tenant (``all``: the
        answered and expired ones too), newest first."""
        params = {"all": "true"} if all else None
        return list(self._request("GET", "/v1/approvals", params=params))

    def approve(self, id: str, decision: str = "allow-once") -> Dict[str, Any]:
        """Answers an approval request: ``allow-once``, ``allow-always`` or
        ``deny``."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
        return dict(self._request("POST", f"/v1/approvals/{id}", json={"decision": decision}))

    # -- sandboxes and audit ----------------------------------------------

    @staticmethod
    def _run_body(
        cmd: Optional[Union[str, Sequence[str]]],
        timeout: float,
        code: Optional[str],
        language: Optional[str],
        env: Optional[Mapping[str, str]],
        stdin: Optional[str],
        template: Optional[str],
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {"timeout_ms": int(timeout * 1000)}
        if cmd is not None and code is not None:
            raise ValueError("give cmd or code, not both")
        if isinstance(cmd, str):
            body["command"] = ["sh", "-c", cmd]
        elif cmd is not None:
            body["command"] = list(cmd)
        elif code is not None:
            body["lang"] = language or "python"
            body["code"] = code
        else:
            raise ValueError("give cmd (a shell string or an argv list) or code")
        if env:
            body["env"] = dict(env)
        if stdin is not None:
            body["stdin"] = stdin
        if template is not None:
            body["template"] = template
        return body

    def run(
        self,
        cmd: Optional[Union[str, Sequence[str]]] = None,
        timeout: float = 30,
        *,
        code: Optional[str] = None,
        language: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: Optional[str] = None,
        template: Optional[str] = None,
    ) -> RunResult:
        """Runs one command (a shell string or an argv list), or ``code`` in
        ``language``, in a fresh sandbox that ends with it."""
        body = self._run_body(cmd, timeout, code, language, env, stdin, template)
        v = self._request(
            "POST", "/v1/run", json=body, timeout=httpx.Timeout(timeout + 60, connect=10)
        )
        return RunResult.from_json(v)

    async def run_async(
        self,
        cmd: Optional[Union[str, Sequence[str]]] = None,
        timeout: float = 30,
        *,
        code: Optional[str] = None,
        language: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: Optional[str] = None,
        template: Optional[str] = None,
    ) -> RunResult:
        """:meth:`run` for asyncio."""
        body = self._run_body(cmd, timeout, code, language, env, stdin, template)
        v = await self._request_async(
            "POST", "/v1/run", json=body, timeout=httpx.Timeout(timeout + 60, connect=10)
        )
        return RunResult.from_json(v)

    def audit(
        self,
        since: Optional[str] = None,
        kind: Optional[str] = None,
        limit: int = 100,
        sandbox: Optional[str] = None,
        after: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
        """The caller's tenant's audit records, oldest first: ``since`` (RFC
        3339 or an age like ``1h``), ``kind`` (``request``, ``agent_run``,
        ``tool_call``, ``model_call``, ``exec``, …), ``limit`` (1–1000),
        ``after`` (a seq, to page on)."""
        params: Dict[str, Any] = {"limit": limit}
        if since is not None:
            params["since"] = since
        if kind is not None:
            params["kind"] = kind
        if sandbox is not None:
            params["sandbox"] = sandbox
        if after is not None:
            params["after"] = after
        return list(self._request("GET", "/v1/audit", params=params))

    def images(self) -> List[ImageInfo]:
        """The templates this client's tenant can use: ``base`` (the
        host's root, every language) and the images it registered, each
        with its languages."""
        return [ImageInfo.from_json(v) for v in self._request("GET", "/v1/images")]

    def register_image(
        self,
        name: str,
        dockerfile: str,
        languages: Sequence[str],
        allow_hosts: Optional[Sequence[str]] = None,
    ) -> ImageInfo:
        """Builds ``dockerfile`` into an image (the daemon runs ``nanoclaw
        image build``: every RUN step in a sandbox, with no network unless
        ``allow_hosts`` names ``HOST[:PORT]``s it may reach through
        nanoclaw's egress proxy, e.g. ``["pypi.org",
        "files.pythonhosted.org"]`` for ``pip install``; the build context
        is empty, so no COPY/ADD of local files) and makes
        it a template named ``name`` for this client's tenant, for
        ``languages`` (of python, node, bash, sh).

        Then ``run(code=..., language=L, template=name)`` and
        ``Sandbox.create(template=name)`` run in its root; a snippet in a
        language it was not registered for is refused. The FROM image must
        be in the daemon's image store (``nanoclaw image pull``/``import``)
        or reachable from it. Raises :class:`NanoClawError`: 400 a bad
        name/Dockerfile/language, 422 the build failed (the build's own
        error line), 429 a build of this tenant is running."""
        if isinstance(languages, str):
            languages = [languages]
        body: Dict[str, Any] = {
            "name": name,
            "dockerfile": dockerfile,
            "languages": list(languages),
        }
        if allow_hosts:
            body["allow_hosts"] = list(allow_hosts)
        v = self._request(
            "POST", "/v1/images", json=body, timeout=httpx.Timeout(BUILD_TIMEOUT_S, connect=10)
        )
        return ImageInfo.from_json(v)

    def remove_image(self, name: str) -> Dict[str, Any]:
        """Removes this client's tenant's image ``name`` (``DELETE
        /v1/images/NAME``, as ``docker rmi``): it is no longer a template,
        and its layers that no other image uses leave the image store (its
        bytes stop counting against the tenant's bound). Raises
        :class:`NanoClawError`: 404 no such image of this tenant, 409 a
        sandbox or run of the tenant still uses it (kill it first), 400
        ``base`` or a template of the daemon's own configuration."""
        return dict(self._request("DELETE", f"/v1/images/{quote(name, safe='')}"))

    def sandbox(self, template: str = "base", **kw: Any) -> "Sandbox":
        """``Sandbox.create(template, ..., client=self)``."""
        from ._sandbox import Sandbox

        return Sandbox.create(template, client=self, **kw)

    def health(self) -> bool:
        """Whether the daemon answers ``/healthz``."""
        try:
            return self._client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False
