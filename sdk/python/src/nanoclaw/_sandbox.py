"""The sandbox level: a long-lived sandbox of the daemon, its commands and
its files, over the daemon's E2B control plane (``POST /sandboxes``,
``GET /v2/sandboxes``, ``DELETE /sandboxes/{id}``) and envd data plane
(``process.Process/Start``, ``filesystem.Filesystem/*``, ``/files``).

``Sandbox`` is synchronous, ``AsyncSandbox`` the same for asyncio."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import httpx

from . import _wire
from ._client import NanoClaw, _json, _transport_error
from ._errors import CommandExitError, NanoClawError
from ._types import CommandResult, EntryInfo, SandboxInfo

#: A sandbox's time to live when none is given (seconds; E2B's default).
DEFAULT_TTL_S = 300
#: A command's timeout when none is given (seconds).
DEFAULT_RUN_TIMEOUT_S = 60.0

Cmd = Union[str, Sequence[str]]


def _client_for(client: Optional[NanoClaw], kw: Dict[str, Any]) -> "tuple[NanoClaw, bool]":
    """The client to use and whether the sandbox owns it (made from ``kw``:
    config_path, url, api_key, socket_path, …)."""
    if client is not None:
        if kw:
            raise ValueError(f"give client= or connection options ({', '.join(kw)}), not both")
        return client, False
    return NanoClaw(**kw), True


def _stream_timeout(timeout: Optional[float]) -> httpx.Timeout:
    read = None if timeout is None else timeout + 30
    return httpx.Timeout(30, connect=10, read=read)


def _start_headers(headers: Dict[str, str], timeout: Optional[float]) -> Dict[str, str]:
    h = dict(headers)
    h["Content-Type"] = _wire.STREAM_TYPE
    h["Connect-Protocol-Version"] = "1"
    if timeout is not None:
        if timeout <= 0:
            raise ValueError("timeout must be more than 0 seconds (or None: no limit)")
        h["Connect-Timeout-Ms"] = str(max(1, int(timeout * 1000)))
    return h


def _checked(result: CommandResult, cmd: Cmd, check: bool) -> CommandResult:
    if check and result.exit_code != 0:
        raise CommandExitError(result, cmd)
    return result


def _text(data: bytes, format: str) -> Union[str, bytes]:
    if format == "bytes":
        return data
    if format == "text":
        return data.decode()
    raise ValueError("format must be 'text' or 'bytes'")


def _bytes(data: Union[str, bytes]) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


class Files:
    """A sandbox's files. Relative paths are under the sandbox user's home
    (``/home/user``); every path is the sandbox's own, resolved inside
    it: ``../../etc/passwd`` is the sandbox's ``/etc/passwd`` (read-only,
    synthetic), never the host's."""

    def __init__(self, sbx: "Sandbox") -> None:
        self._s = sbx

    def _rpc(self, method: str, body: Dict[str, Any]) -> Dict[str, Any]:
        return self._s._unary(f"/filesystem.Filesystem/{method}", body)

    def read(self, path: str, format: str = "text") -> Union[str, bytes]:
        """The file's content: ``str`` (UTF-8) or, with ``format="bytes"``,
        ``bytes``."""
        r = self._s._send("GET", "/files", params={"path": path})
        if r.status_code >= 400:
            _json(r)
        return _text(r.content, format)

    def write(self, path: str, data: Union[str, bytes]) -> EntryInfo:
        """Creates or replaces the file (parents created)."""
        r = self._s._send(
            "POST",
            "/files",
            params={"path": path},
            content=_bytes(data),
            headers={"Content-Type": "application/octet-stream"},
        )
        v = _json(r)
        first = v[0] if isinstance(v, list) and v else {"path": path, "name": path}
        return EntryInfo.from_json(first)

    def list(self, path: str = ".", depth: int = 1) -> List[EntryInfo]:
        """The directory's entries (``depth`` levels down)."""
        return _wire.entries(self._rpc("ListDir", {"path": path, "depth": depth}))

    def exists(self, path: str) -> bool:
        """Whether the path exists."""
        try:
            self._rpc("Stat", {"path": path})
        except NanoClawError as e:
            if e.code == "not_found":
                return False
            raise
        return True

    def remove(self, path: str) -> None:
        """Removes a file or a directory tree."""
        self._rpc("Remove", {"path": path})

    def make_dir(self, path: str) -> bool:
        """Creates the directory and its parents; False when it existed."""
        try:
            self._rpc("MakeDir", {"path": path})
        except NanoClawError as e:
            if e.code == "already_exists":
                return False
            raise
        return True


class Sandbox:
    """A sandbox of the daemon that lives until :meth:`kill` (or its time to
    live): commands run in it one after another and share its files.

    ``with Sandbox.create() as sbx:`` kills it on exit. The daemon is found
    as :class:`NanoClaw` finds it: pass ``client=`` (a :class:`NanoClaw`)
    or its options (``config_path=``, ``url=``, ``api_key=``, …).
    """

    def __init__(self, client: NanoClaw, owned: bool, info: Dict[str, Any]) -> None:
        self._nc = client
        self._owned = owned
        self.sandbox_id: str = str(info.get("sandboxID") or "")
        self.template: str = str(info.get("alias") or info.get("templateID") or "")
        self._token = str(info.get("envdAccessToken") or "")
        self._headers = _wire.envd_headers(self.sandbox_id, self._token)
        self.files = Files(self)
        self._closed = False

    # -- lifecycle --------------------------------------------------------

    @classmethod
    def create(
        cls,
        template: str = "base",
        timeout: int = DEFAULT_TTL_S,
        envs: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        allow_internet_access: Optional[bool] = None,
        *,
        client: Optional[NanoClaw] = None,
        **connect: Any,
    ) -> "Sandbox":
        """A new sandbox from ``template`` (``base``: the host's root; or
        an image registered with :meth:`NanoClaw.register_image`), alive
        ``timeout`` seconds, with ``envs`` for every command and
        ``metadata`` for :meth:`list`."""
        nc, owned = _client_for(client, connect)
        body = _wire.create_body(template, timeout, envs, metadata, allow_internet_access)
        try:
            info = nc._request("POST", "/sandboxes", json=body)
        except BaseException:
            if owned:
                nc.close()
            raise
        return cls(nc, owned, info)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        timeout: Optional[int] = None,
        *,
        client: Optional[NanoClaw] = None,
        **connect: Any,
    ) -> "Sandbox":
        """An existing sandbox of the caller's tenant (resumed if paused;
        ``timeout`` extends its time to live, never shortens it)."""
        nc, owned = _client_for(client, connect)
        body = {} if timeout is None else {"timeout": int(timeout)}
        try:
            info = nc._request("POST", f"/sandboxes/{sandbox_id}/connect", json=body)
        except BaseException:
            if owned:
                nc.close()
            raise
        return cls(nc, owned, info)

    @staticmethod
    def list(*, client: Optional[NanoClaw] = None, **connect: Any) -> List[SandboxInfo]:
        """The caller's tenant's sandboxes, running and paused."""
        nc, owned = _client_for(client, connect)
        try:
            return _wire.sandboxes(nc._request("GET", "/v2/sandboxes"))
        finally:
            if owned:
                nc.close()

    def info(self) -> SandboxInfo:
        """The sandbox as the daemon describes it now."""
        return SandboxInfo.from_json(self._nc._request("GET", f"/sandboxes/{self.sandbox_id}"))

    def set_timeout(self, timeout: int) -> None:
        """Its time to live, from now (shorter or longer)."""
        try:
            r = self._nc._client.post(
                f"/sandboxes/{self.sandbox_id}/timeout", json={"timeout": int(timeout)}
            )
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e
        if r.status_code >= 400:
            _json(r)

    def kill(self) -> None:
        """Ends the sandbox and everything in it (an unknown or already
        killed sandbox is a :class:`NanoClawError` 404)."""
        try:
            r = self._nc._client.delete(f"/sandboxes/{self.sandbox_id}")
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e
        if r.status_code >= 400:
            _json(r)
        self.close()

    def close(self) -> None:
        """Lets go of the connection (the sandbox lives on); stops a daemon
        this sandbox started."""
        if not self._closed and self._owned:
            self._nc.close()
        self._closed = True

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill()
        except NanoClawError:
            self.close()

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, template={self.template!r})"

    # -- commands ---------------------------------------------------------

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = dict(self._headers)
        headers.update(kw.pop("headers", None) or {})
        try:
            return self._nc._client.request(method, path, headers=headers, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e

    def _unary(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        r = self._send(
            "POST", path, json=body,
            headers={"Content-Type": _wire.UNARY_TYPE, "Connect-Protocol-Version": "1"},
        )
        return _wire.unary_answer(r)

    def run(
        self,
        cmd: Cmd,
        timeout: Optional[float] = DEFAULT_RUN_TIMEOUT_S,
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        check: bool = False,
    ) -> CommandResult:
        """Runs ``cmd`` (a shell string, run by ``/bin/sh -c``, or an argv)
        to its end and returns how it ended. A non-zero exit is a result,
        not an exception, unless ``check=True`` (then
        :class:`CommandExitError`). After ``timeout`` seconds the daemon
        kills it (``killed_by == "timeout"``); None: no limit."""
        body = _wire.envelope(_wire.start_request(cmd, envs, cwd))
        headers = _start_headers(self._headers, timeout)
        out = _wire.Outcome()
        frames = _wire.Frames()
        t0 = time.monotonic()
        try:
            with self._nc._client.stream(
                "POST", "/process.Process/Start", content=body, headers=headers,
                timeout=_stream_timeout(timeout),
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    _json(r)
                for chunk in r.iter_bytes():
                    for flags, msg in frames.feed(chunk):
                        out.take(flags, msg)
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e
        ms = int((time.monotonic() - t0) * 1000)
        return _checked(out.result(r.status_code, ms), cmd, check)


class AsyncFiles:
    """:class:`Files` for asyncio."""

    def __init__(self, sbx: "AsyncSandbox") -> None:
        self._s = sbx

    async def _rpc(self, method: str, body: Dict[str, Any]) -> Dict[str, Any]:
        return await self._s._unary(f"/filesystem.Filesystem/{method}", body)

    async def read(self, path: str, format: str = "text") -> Union[str, bytes]:
        r = await self._s._send("GET", "/files", params={"path": path})
        if r.status_code >= 400:
            _json(r)
        return _text(r.content, format)

    async def write(self, path: str, data: Union[str, bytes]) -> EntryInfo:
        r = await self._s._send(
            "POST", "/files", params={"path": path}, content=_bytes(data),
            headers={"Content-Type": "application/octet-stream"},
        )
        v = _json(r)
        first = v[0] if isinstance(v, list) and v else {"path": path, "name": path}
        return EntryInfo.from_json(first)

    async def list(self, path: str = ".", depth: int = 1) -> List[EntryInfo]:
        return _wire.entries(await self._rpc("ListDir", {"path": path, "depth": depth}))

    async def exists(self, path: str) -> bool:
        try:
            await self._rpc("Stat", {"path": path})
        except NanoClawError as e:
            if e.code == "not_found":
                return False
            raise
        return True

    async def remove(self, path: str) -> None:
        await self._rpc("Remove", {"path": path})

    async def make_dir(self, path: str) -> bool:
        try:
            await self._rpc("MakeDir", {"path": path})
        except NanoClawError as e:
            if e.code == "already_exists":
                return False
            raise
        return True


class AsyncSandbox:
    """:class:`Sandbox` for asyncio: ``sbx = await AsyncSandbox.create()``,
    ``await sbx.run(...)``, ``await sbx.files.read(...)``, ``async with``."""

    def __init__(self, client: NanoClaw, owned: bool, info: Dict[str, Any]) -> None:
        self._nc = client
        self._owned = owned
        self._http = httpx.AsyncClient(**client._client_args(sync=False))
        self.sandbox_id: str = str(info.get("sandboxID") or "")
        self.template: str = str(info.get("alias") or info.get("templateID") or "")
        self._headers = _wire.envd_headers(self.sandbox_id, str(info.get("envdAccessToken") or ""))
        self.files = AsyncFiles(self)
        self._closed = False

    @classmethod
    async def create(
        cls,
        template: str = "base",
        timeout: int = DEFAULT_TTL_S,
        envs: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        allow_internet_access: Optional[bool] = None,
        *,
        client: Optional[NanoClaw] = None,
        **connect: Any,
    ) -> "AsyncSandbox":
        """:meth:`Sandbox.create` for asyncio."""
        nc, owned = _client_for(client, connect)
        body = _wire.create_body(template, timeout, envs, metadata, allow_internet_access)
        try:
            info = await nc._request_async("POST", "/sandboxes", json=body)
        except BaseException:
            if owned:
                nc.close()
            raise
        return cls(nc, owned, info)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        timeout: Optional[int] = None,
        *,
        client: Optional[NanoClaw] = None,
        **connect: Any,
    ) -> "AsyncSandbox":
        """:meth:`Sandbox.connect` for asyncio."""
        nc, owned = _client_for(client, connect)
        body = {} if timeout is None else {"timeout": int(timeout)}
        try:
            info = await nc._request_async("POST", f"/sandboxes/{sandbox_id}/connect", json=body)
        except BaseException:
            if owned:
                nc.close()
            raise
        return cls(nc, owned, info)

    @staticmethod
    async def list(*, client: Optional[NanoClaw] = None, **connect: Any) -> List[SandboxInfo]:
        """:meth:`Sandbox.list` for asyncio."""
        nc, owned = _client_for(client, connect)
        try:
            return _wire.sandboxes(await nc._request_async("GET", "/v2/sandboxes"))
        finally:
            if owned:
                nc.close()

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = dict(self._headers)
        headers.update(kw.pop("headers", None) or {})
        try:
            return await self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e

    async def _unary(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        r = await self._send(
            "POST", path, json=body,
            headers={"Content-Type": _wire.UNARY_TYPE, "Connect-Protocol-Version": "1"},
        )
        return _wire.unary_answer(r)

    async def run(
        self,
        cmd: Cmd,
        timeout: Optional[float] = DEFAULT_RUN_TIMEOUT_S,
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        check: bool = False,
    ) -> CommandResult:
        """:meth:`Sandbox.run` for asyncio (several run at once under
        ``asyncio.gather``)."""
        body = _wire.envelope(_wire.start_request(cmd, envs, cwd))
        headers = _start_headers(self._headers, timeout)
        out = _wire.Outcome()
        frames = _wire.Frames()
        t0 = time.monotonic()
        try:
            async with self._http.stream(
                "POST", "/process.Process/Start", content=body, headers=headers,
                timeout=_stream_timeout(timeout),
            ) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _json(r)
                async for chunk in r.aiter_bytes():
                    for flags, msg in frames.feed(chunk):
                        out.take(flags, msg)
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e
        ms = int((time.monotonic() - t0) * 1000)
        return _checked(out.result(r.status_code, ms), cmd, check)

    async def kill(self) -> None:
        """:meth:`Sandbox.kill` for asyncio."""
        try:
            r = await self._http.delete(
                f"/sandboxes/{self.sandbox_id}", headers=self._nc._headers
            )
        except httpx.TransportError as e:
            raise _transport_error(e, self._nc.where) from e
        if r.status_code >= 400:
            _json(r)
        await self.close()

    async def close(self) -> None:
        """Lets go of the connection (the sandbox lives on)."""
        if not self._closed:
            await self._http.aclose()
            if self._owned:
                self._nc.close()
        self._closed = True

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.kill()
        except NanoClawError:
            await self.close()

    def __repr__(self) -> str:
        return f"AsyncSandbox(sandbox_id={self.sandbox_id!r}, template={self.template!r})"
