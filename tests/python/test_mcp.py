"""nanoclaw's MCP server driven by the official MCP Python SDK, v1 (the
`mcp` package pinned in requirements.txt): `ClientSession` over stdio
(`nanoclaw mcp`, which relays to an embedded daemon) and over Streamable
HTTP (`streamable_http_client` against a running `nanoclaw serve`'s /mcp),
both in the 2025-11-25 era; the raw HTTP rules (Origin, sessions, the
2026-07-28 headers) with httpx.

    NANOCLAW_MCP_COMMAND   JSON array: the nanoclaw command (e.g.
                           ["/path/to/nanoclaw"], or with a setpriv prefix);
                           `mcp` is appended to it.
    NANOCLAW_MCP_URL       http://127.0.0.1:PORT of a running daemon
    NANOCLAW_MCP_KEY       tenant A's API key
    NANOCLAW_MCP_KEY_B     tenant B's API key
    NANOCLAW_REQUIRE_E2B=1 a missing setting FAILS instead of skipping.

Run by crates/cli/tests/mcp.rs.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

TOOLS = {
    "sandbox_create",
    "sandbox_list",
    "sandbox_kill",
    "sandbox_exec",
    "run_code",
    "read_file",
    "write_file",
    "list_files",
    "exec_start",
    "exec_poll",
    "exec_write_stdin",
    "exec_signal",
}
READ_ONLY = {"sandbox_list", "read_file", "list_files", "exec_poll"}


def setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        msg = f"set {name} (see this file's docstring)"
        if os.environ.get("NANOCLAW_REQUIRE_E2B", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    return value


def nanoclaw() -> list:
    cmd = json.loads(setting("NANOCLAW_MCP_COMMAND"))
    assert isinstance(cmd, list) and cmd, cmd
    return cmd


def url() -> str:
    u = setting("NANOCLAW_MCP_URL").rstrip("/")
    assert u.startswith("http://127.0.0.1:"), "loopback only"
    return u + "/mcp"


def text_of(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def check_listing(session: ClientSession) -> dict:
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for name, t in tools.items():
        schema = t.inputSchema
        assert schema["type"] == "object" and schema["additionalProperties"] is False, name
        assert t.outputSchema and t.outputSchema["type"] == "object", name
        a = t.annotations
        assert a.readOnlyHint is (name in READ_ONLY), name
        assert a.destructiveHint is not None and a.idempotentHint is not None, name
        assert a.openWorldHint is (name in {"sandbox_exec", "run_code", "exec_start"}), name
    assert tools["run_code"].inputSchema["required"] == ["language", "code"]
    assert tools["sandbox_kill"].inputSchema["required"] == ["sandbox_id"]
    assert tools["sandbox_kill"].annotations.destructiveHint is True
    assert tools["sandbox_create"].annotations.destructiveHint is False
    return tools


async def every_tool(session: ClientSession, default_sandbox: bool) -> str:
    """Calls every tool; returns the sandbox used."""
    await check_listing(session)
    if default_sandbox:
        target = {}
    else:
        r = await session.call_tool(
            "sandbox_create", {"timeout": 600, "metadata": {"who": "mcp-test"}}
        )
        assert not r.isError, text_of(r)
        target = {"sandbox_id": r.structuredContent["sandbox_id"]}

    r = await session.call_tool(
        "run_code", {**target, "language": "python", "code": "print('hello from', 6 * 7)"}
    )
    assert not r.isError, text_of(r)
    assert r.structuredContent["stdout"] == "hello from 42\n"
    assert r.structuredContent["exit_code"] == 0
    sandbox = r.structuredContent["sandbox_id"]
    if not default_sandbox:
        assert sandbox == target["sandbox_id"]
    target = {"sandbox_id": sandbox} if not default_sandbox else {}

    r = await session.call_tool("run_code", {**target, "language": "node", "code": "console.log(1+1)"})
    assert r.isError or r.structuredContent["stdout"] == "2\n", text_of(r)

    r = await session.call_tool(
        "write_file", {**target, "path": "notes/hello.txt", "content": "héllo\nworld\n"}
    )
    assert not r.isError, text_of(r)
    assert r.structuredContent["path"] == "/home/user/notes/hello.txt"
    r = await session.call_tool("read_file", {**target, "path": "notes/hello.txt"})
    assert not r.isError, text_of(r)
    assert text_of(r) == "héllo\nworld\n"
    assert r.structuredContent["size"] == len("héllo\nworld\n".encode())
    r = await session.call_tool("list_files", {**target, "path": "notes"})
    assert not r.isError, text_of(r)
    assert [e["name"] for e in r.structuredContent["entries"]] == ["hello.txt"]

    # State is kept between calls: one sandbox.
    r = await session.call_tool("sandbox_exec", {**target, "command": "cat notes/hello.txt | wc -l"})
    assert not r.isError, text_of(r)
    assert r.structuredContent["stdout"].strip() == "2"
    assert r.structuredContent["sandbox_id"] == sandbox
    r = await session.call_tool(
        "sandbox_exec",
        {**target, "argv": ["sh", "-c", 'echo "$X" in "$(pwd)"'], "env": {"X": "x1"}, "cwd": "/tmp"},
    )
    assert r.structuredContent["stdout"] == "x1 in /tmp\n", text_of(r)
    r = await session.call_tool("sandbox_exec", {**target, "argv": ["cat"], "stdin": "fed"})
    assert r.structuredContent["stdout"] == "fed", text_of(r)

    # Output caps: the head is kept, the rest counted.
    r = await session.call_tool(
        "sandbox_exec", {**target, "command": "head -c 5000 /dev/zero | tr '\\0' a", "max_output_bytes": 100}
    )
    assert len(r.structuredContent["stdout"]) == 100
    assert r.structuredContent["stdout_dropped_bytes"] == 4900

    # A failing command: a result with isError, not a protocol error.
    r = await session.call_tool("sandbox_exec", {**target, "command": "echo oops >&2; exit 3"})
    assert r.isError
    assert r.structuredContent["exit_code"] == 3
    assert "oops" in text_of(r)

    # A call that times out: killed, and said so.
    r = await session.call_tool("run_code", {**target, "language": "sh", "code": "sleep 30", "timeout": 1})
    assert r.isError and r.structuredContent["timed_out"] is True
    assert "timed out" in text_of(r)
    assert r.structuredContent["duration_ms"] < 10_000

    # Bad arguments: tool errors the model can read.
    for name, args, word in [
        ("run_code", {**target, "language": "cobol", "code": "x"}, "cobol"),
        ("run_code", {**target, "language": "python"}, "code"),
        ("write_file", {**target, "path": "x"}, "content"),
        ("sandbox_exec", {**target}, "give argv"),
        ("sandbox_exec", {**target, "argv": ["true"], "command": "true"}, "not both"),
        ("sandbox_exec", {**target, "command": "true", "timeout": -1}, "timeout"),
        ("sandbox_exec", {**target, "command": "true", "elevated": True}, "elevated"),
        ("exec_signal", {"exec_id": "x", "signal": "SIGSTOP"}, "SIGTERM"),
    ]:
        r = await session.call_tool(name, args)
        assert r.isError and word in text_of(r), (name, text_of(r))

    # Hostile paths resolve inside the sandbox, never on the host.
    for path in ["../../etc/shadow", "/home/user/../../etc/shadow", "/proc/1/root/etc/shadow"]:
        r = await session.call_tool("read_file", {**target, "path": path})
        assert r.isError or "root:" not in text_of(r), path
    r = await session.call_tool("write_file", {**target, "path": "../../etc/evil", "content": "x"})
    assert r.isError, text_of(r)
    assert not os.path.exists("/etc/evil")

    # An unknown tool: a JSON-RPC error.
    with pytest.raises(McpError) as e:
        await session.call_tool("no_such_tool", {})
    assert e.value.error.code == -32602

    await exec_lifecycle(session, target)

    r = await session.call_tool("sandbox_list", {})
    assert sandbox in [s["sandbox_id"] for s in r.structuredContent["sandboxes"]]
    return sandbox


async def exec_lifecycle(session: ClientSession, target: dict) -> None:
    """A long-running process: start, feed, poll, signal, end."""
    r = await session.call_tool(
        "exec_start",
        {**target, "command": 'echo ready; while read l; do echo "got $l"; done; echo bye >&2; exit 7'},
    )
    assert not r.isError, text_of(r)
    exec_id = r.structuredContent["exec_id"]
    r = await session.call_tool("exec_poll", {"exec_id": exec_id, "wait_ms": 5000})
    assert r.structuredContent["running"] is True
    assert r.structuredContent["stdout"] == "ready\n"
    r = await session.call_tool("exec_write_stdin", {"exec_id": exec_id, "data": "one\n"})
    assert not r.isError, text_of(r)
    r = await session.call_tool("exec_poll", {"exec_id": exec_id, "wait_ms": 5000})
    assert r.structuredContent["stdout"] == "got one\n", r.structuredContent
    # Nothing new since the last poll.
    r = await session.call_tool("exec_poll", {"exec_id": exec_id})
    assert r.structuredContent["stdout"] == "" and r.structuredContent["running"] is True
    r = await session.call_tool("exec_write_stdin", {"exec_id": exec_id, "data": "two\n", "close": True})
    assert r.structuredContent["closed"] is True
    out, err, end = "", "", None
    for _ in range(20):
        r = await session.call_tool("exec_poll", {"exec_id": exec_id, "wait_ms": 2000})
        out += r.structuredContent["stdout"]
        err += r.structuredContent["stderr"]
        if not r.structuredContent["running"]:
            end = r.structuredContent
            break
    assert out == "got two\n" and err == "bye\n" and end is not None
    assert end["exit_code"] == 7
    # Ended and polled: the session is closed.
    r = await session.call_tool("exec_poll", {"exec_id": exec_id})
    assert r.isError and "no exec session" in text_of(r)

    r = await session.call_tool("exec_start", {**target, "argv": ["sleep", "300"]})
    exec_id = r.structuredContent["exec_id"]
    r = await session.call_tool("exec_signal", {"exec_id": exec_id, "signal": "SIGKILL"})
    assert not r.isError, text_of(r)
    r = await session.call_tool("exec_poll", {"exec_id": exec_id, "wait_ms": 5000})
    assert r.structuredContent["running"] is False
    assert r.structuredContent["exit_code"] is None and r.structuredContent["signal"] == "killed"


# --- stdio ------------------------------------------------------------------


def test_stdio_session_uses_every_tool():
    cmd = nanoclaw()
    params = StdioServerParameters(command=cmd[0], args=cmd[1:] + ["mcp"], env=dict(os.environ))

    async def go():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.serverInfo.name == "nanoclaw"
                assert init.protocolVersion == "2025-11-25"
                assert init.capabilities.tools is not None
                await session.send_ping()
                await every_tool(session, default_sandbox=True)

    asyncio.run(go())


# --- Streamable HTTP ----------------------------------------------------------


def client(key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(headers={"X-API-Key": key}, timeout=httpx.Timeout(60, read=120))


async def with_session(key: str, fn):
    async with client(key) as http:
        async with streamable_http_client(url(), http_client=http) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.protocolVersion == "2025-11-25"
                return await fn(session, get_id())


def test_http_session_uses_every_tool_and_its_sandbox_ends_with_it():
    key = setting("NANOCLAW_MCP_KEY")

    async def go():
        async def run(session, sid):
            assert sid
            own = await every_tool(session, default_sandbox=True)
            mine = await every_tool(session, default_sandbox=False)
            assert own != mine
            return own, mine

        own, mine = await with_session(key, run)

        async def after(session, _sid):
            r = await session.call_tool("sandbox_list", {})
            ids = [s["sandbox_id"] for s in r.structuredContent["sandboxes"]]
            # The session's own sandbox ended with its session (DELETE);
            # the one it created lives on until killed.
            assert own not in ids and mine in ids
            r = await session.call_tool("sandbox_kill", {"sandbox_id": mine})
            assert not r.isError, text_of(r)
            r = await session.call_tool("sandbox_kill", {"sandbox_id": mine})
            assert r.isError and "not found" in text_of(r)

        await with_session(key, after)

    asyncio.run(go())


def test_tenants_cannot_reach_each_others_sandboxes_or_sessions():
    """Tenant B, knowing A's sandbox id, exec id and session id, tries them all."""
    key_a, key_b = setting("NANOCLAW_MCP_KEY"), setting("NANOCLAW_MCP_KEY_B")

    async def go():
        async with client(key_a) as http:
            async with streamable_http_client(url(), http_client=http) as (read, write, get_id):
                async with ClientSession(read, write) as a:
                    await a.initialize()
                    sid_a = get_id()
                    r = await a.call_tool("sandbox_create", {})
                    sbx = r.structuredContent["sandbox_id"]
                    await a.call_tool("write_file", {"sandbox_id": sbx, "path": "secret", "content": "A's"})
                    r = await a.call_tool("exec_start", {"sandbox_id": sbx, "argv": ["sleep", "60"]})
                    exec_id = r.structuredContent["exec_id"]

                    async def attack(b, _sid):
                        probes = [
                            ("sandbox_exec", {"sandbox_id": sbx, "command": "cat secret"}),
                            ("run_code", {"sandbox_id": sbx, "language": "sh", "code": "cat secret"}),
                            ("read_file", {"sandbox_id": sbx, "path": "secret"}),
                            ("write_file", {"sandbox_id": sbx, "path": "secret", "content": "B"}),
                            ("list_files", {"sandbox_id": sbx}),
                            ("exec_start", {"sandbox_id": sbx, "argv": ["true"]}),
                            ("exec_poll", {"exec_id": exec_id}),
                            ("exec_write_stdin", {"exec_id": exec_id, "data": "x"}),
                            ("exec_signal", {"exec_id": exec_id, "signal": "SIGKILL"}),
                            ("sandbox_kill", {"sandbox_id": sbx}),
                        ]
                        for name, args in probes:
                            r = await b.call_tool(name, args)
                            assert r.isError, (name, text_of(r))
                            assert "A's" not in text_of(r)
                            assert "not found" in text_of(r) or "no exec session" in text_of(r), text_of(r)
                        r = await b.call_tool("sandbox_list", {})
                        assert sbx not in [s["sandbox_id"] for s in r.structuredContent["sandboxes"]]

                    await with_session(key_b, attack)

                    # B presenting A's session id: as if it did not exist.
                    async with httpx.AsyncClient(headers={"X-API-Key": key_b}) as h:
                        r = await h.post(url(), headers=legacy_headers(sid_a),
                                         json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
                        assert r.status_code == 404, r.text
                        r = await h.delete(url(), headers={"Mcp-Session-Id": sid_a})
                        assert r.status_code == 404, r.text

                    # A's sandbox, process and session survived all that.
                    r = await a.call_tool("read_file", {"sandbox_id": sbx, "path": "secret"})
                    assert text_of(r) == "A's"
                    r = await a.call_tool("exec_poll", {"exec_id": exec_id})
                    assert r.structuredContent["running"] is True
                    await a.call_tool("exec_signal", {"exec_id": exec_id, "signal": "SIGKILL"})
                    r = await a.call_tool("sandbox_kill", {"sandbox_id": sbx})
                    assert not r.isError, text_of(r)

    asyncio.run(go())


def legacy_headers(sid=None) -> dict:
    h = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    if sid:
        h["Mcp-Session-Id"] = sid
    return h


def test_http_transport_rules():
    key = setting("NANOCLAW_MCP_KEY")
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "0"}}}
    with httpx.Client(headers={"X-API-Key": key}, timeout=60) as h:
        # DNS rebinding: a page of another origin is refused, before anything else.
        for origin in ["http://evil.example", "http://localhost.evil.example:3000", "null"]:
            r = h.post(url(), headers={**legacy_headers(), "Origin": origin}, json=init)
            assert r.status_code == 403, (origin, r.text)
            assert "mcp-session-id" not in r.headers
        r = h.get(url(), headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = httpx.post(url(), headers={**legacy_headers(), "Origin": "http://evil.example"}, json=init)
        assert r.status_code == 403, "the Origin check comes before authentication"
        # Without a key: 401.
        r = httpx.post(url(), headers=legacy_headers(), json=init)
        assert r.status_code == 401
        # A local page may.
        r = h.post(url(), headers={**legacy_headers(), "Origin": "http://localhost:5173"}, json=init)
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        assert r.json()["result"]["protocolVersion"] == "2025-11-25"
        # Notifications: 202, no body.
        r = h.post(url(), headers=legacy_headers(sid),
                   json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert r.status_code == 202 and r.content == b""
        # SSE when only that is accepted.
        r = h.post(url(), headers={**legacy_headers(sid), "Accept": "text/event-stream"},
                   json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [l[5:].strip() for l in r.text.splitlines() if l.startswith("data:")]
        assert json.loads(data[0]) == {"jsonrpc": "2.0", "id": 2, "result": {}}
        r = h.post(url(), headers={**legacy_headers(sid), "Accept": "text/html"},
                   json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert r.status_code == 406
        # No session: 400. Unknown session: 404.
        r = h.post(url(), headers=legacy_headers(), json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert r.status_code == 400 and r.json()["error"]["code"] == -32600
        r = h.post(url(), headers=legacy_headers("f" * 64),
                   json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert r.status_code == 404
        # A version the session does not speak: 400.
        r = h.post(url(), headers={**legacy_headers(sid), "MCP-Protocol-Version": "1999-01-01"},
                   json={"jsonrpc": "2.0", "id": 4, "method": "tools/list"})
        assert r.status_code == 400
        # Protocol errors.
        r = h.post(url(), headers=legacy_headers(sid), content=b'{"jsonrpc":"2.0","id":1,"method":')
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        r = h.post(url(), headers=legacy_headers(sid), json=[{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
        assert r.json()["error"]["code"] == -32600
        r = h.post(url(), headers=legacy_headers(sid), json={"jsonrpc": "2.0", "id": 5, "method": "resources/list"})
        assert r.json()["error"]["code"] == -32601
        r = h.post(url(), headers=legacy_headers(sid),
                   json={"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "sandbox_list", "arguments": [1]}})
        assert r.json()["error"]["code"] == -32602
        # GET: no server stream.
        r = h.get(url(), headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid})
        assert r.status_code == 405
        # DELETE ends it.
        r = h.delete(url(), headers={"Mcp-Session-Id": sid})
        assert r.status_code == 204
        r = h.post(url(), headers=legacy_headers(sid), json={"jsonrpc": "2.0", "id": 7, "method": "ping"})
        assert r.status_code == 404
        r = h.delete(url(), headers={"Mcp-Session-Id": sid})
        assert r.status_code == 404
        # Listed in the API's own document.
        doc = h.get(url().removesuffix("/mcp") + "/openapi.json").json()
        assert {"post", "get", "delete"} <= set(doc["paths"]["/mcp"])


def modern(method: str, params: dict | None = None, id_=1, version="2026-07-28") -> tuple:
    body = {"jsonrpc": "2.0", "id": id_, "method": method,
            "params": {**(params or {}), "_meta": {
                "io.modelcontextprotocol/protocolVersion": version,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}}
    headers = {"Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": version, "Mcp-Method": method}
    if method == "tools/call":
        headers["Mcp-Name"] = params["name"]
    return headers, body


def test_the_2026_era_with_raw_requests():
    """The stateless era's rules, checked with plain HTTP requests."""
    key = setting("NANOCLAW_MCP_KEY")
    with httpx.Client(headers={"X-API-Key": key}, timeout=60) as h:
        r = h.post(url(), headers=(m := modern("server/discover"))[0], json=m[1])
        assert r.status_code == 200, r.text
        res = r.json()["result"]
        assert res["resultType"] == "complete" and "2026-07-28" in res["supportedVersions"]
        assert res["capabilities"]["tools"] is not None and res["cacheScope"] == "private"
        assert "mcp-session-id" not in r.headers
        hdr, body = modern("tools/list")
        r = h.post(url(), headers=hdr, json=body)
        assert r.json()["result"]["resultType"] == "complete"
        assert {t["name"] for t in r.json()["result"]["tools"]} == TOOLS
        # Headers must agree with the body.
        hdr, body = modern("tools/call", {"name": "sandbox_list", "arguments": {}})
        r = h.post(url(), headers={**hdr, "Mcp-Name": "sandbox_kill"}, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020
        r = h.post(url(), headers={k: v for k, v in hdr.items() if k != "Mcp-Method"}, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020
        r = h.post(url(), headers={**hdr, "MCP-Protocol-Version": "2025-11-25"}, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020
        r = h.post(url(), headers=hdr, json=body)
        assert r.status_code == 200 and r.json()["result"]["isError"] is False
        # An unknown version: 400, with the versions spoken.
        hdr, body = modern("tools/list", version="2099-01-01")
        r = h.post(url(), headers=hdr, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32022
        assert "2026-07-28" in r.json()["error"]["data"]["supported"]
        # An unknown method: 404 with -32601.
        hdr, body = modern("resources/list")
        r = h.post(url(), headers=hdr, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == -32601
        # No sessions: a sandbox must be named.
        hdr, body = modern("tools/call", {"name": "sandbox_exec", "arguments": {"command": "true"}})
        r = h.post(url(), headers=hdr, json=body)
        assert r.json()["result"]["isError"] is True
        assert "sandbox_id is required" in r.json()["result"]["content"][0]["text"]
        # Base64 names are decoded before comparing.
        hdr, body = modern("tools/call", {"name": "sandbox_list", "arguments": {}})
        r = h.post(url(), headers={**hdr, "Mcp-Name": "=?base64?c2FuZGJveF9saXN0?="}, json=body)
        assert r.status_code == 200, r.text


def test_run_code_keeps_state_in_a_context():
    """run_code with `context`: the daemon's stateful code contexts (the
    code interpreter's), variables and the working directory kept."""
    key = setting("NANOCLAW_MCP_KEY")

    async def go():
        async def run(s, _sid):
            r = await s.call_tool("run_code", {"language": "python", "code": "x = 41", "context": "default"})
            assert not r.isError, text_of(r)
            ctx = r.structuredContent["context"]
            r = await s.call_tool("run_code", {"language": "python", "code": "x + 1", "context": ctx})
            assert not r.isError, text_of(r)
            main = [x for x in r.structuredContent["results"] if x.get("is_main_result")]
            assert main and main[0]["text"] == "42", r.structuredContent
            assert "42" in text_of(r)
            r = await s.call_tool("run_code", {"language": "python", "code": "1/0", "context": "default"})
            assert r.isError and r.structuredContent["error"]["name"] == "ZeroDivisionError"
            r = await s.call_tool("run_code", {"language": "bash", "code": "cd /tmp; Y=7", "context": "default"})
            assert not r.isError, text_of(r)
            r = await s.call_tool("run_code", {"language": "bash", "code": "echo $Y in $(pwd)", "context": "default"})
            assert r.structuredContent["stdout"] == "7 in /tmp\n", text_of(r)
            r = await s.call_tool("run_code", {"language": "python", "code": "import time; time.sleep(30)",
                                               "context": "default", "timeout": 1})
            assert r.isError and r.structuredContent["timed_out"] is True, text_of(r)
            # The context survived its interrupted cell.
            r = await s.call_tool("run_code", {"language": "python", "code": "x", "context": "default"})
            assert "41" in text_of(r), text_of(r)
            r = await s.call_tool("run_code", {"language": "node", "code": "1", "context": ctx})
            assert r.isError and "runs python" in text_of(r)
            r = await s.call_tool("run_code", {"language": "python", "code": "1", "context": "f" * 32})
            assert r.isError and "no code context" in text_of(r)

        await with_session(key, run)

    asyncio.run(go())
