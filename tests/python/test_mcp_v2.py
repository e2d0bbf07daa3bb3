"""nanoclaw's MCP server driven by the official MCP Python SDK v2 (`mcp`
2.3.0 and its `Client`, pinned in requirements-mcp-v2.txt and installed by
.ci/python-venv.sh into VENV/mcp-v2, which this suite is run with on
PYTHONPATH: the v1 SDK stays the venv's own `mcp`).

`Client(mode="auto")` probes `server/discover` and speaks the stateless
2026-07-28 era; `mode="legacy"` the 2025-11-25 handshake. Both over
Streamable HTTP (the daemon's /mcp) and over stdio (`nanoclaw mcp`).

Same settings as test_mcp.py (NANOCLAW_MCP_COMMAND, NANOCLAW_MCP_URL,
NANOCLAW_MCP_KEY, NANOCLAW_MCP_KEY_B, NANOCLAW_REQUIRE_E2B). Run by
crates/cli/tests/mcp.rs.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

mcp = pytest.importorskip("mcp")
if not mcp.__dict__.get("Client"):
    if os.environ.get("NANOCLAW_REQUIRE_E2B", "") not in ("", "0"):
        raise RuntimeError("test_mcp_v2.py needs the v2 SDK on PYTHONPATH (VENV/mcp-v2)")
    pytest.skip("the v2 mcp SDK is not on PYTHONPATH", allow_module_level=True)

import httpx2  # noqa: E402
from mcp import Client, MCPError, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

TOOLS = {
    "sandbox_create", "sandbox_list", "sandbox_kill", "sandbox_exec", "run_code",
    "read_file", "write_file", "list_files", "exec_start", "exec_poll",
    "exec_write_stdin", "exec_signal",
}


def setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        msg = f"set {name} (see test_mcp.py's docstring)"
        if os.environ.get("NANOCLAW_REQUIRE_E2B", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    return value


def url() -> str:
    u = setting("NANOCLAW_MCP_URL").rstrip("/")
    assert u.startswith("http://127.0.0.1:"), "loopback only"
    return u + "/mcp"


def http(key: str):
    client = httpx2.AsyncClient(headers={"X-API-Key": key}, timeout=httpx2.Timeout(60, read=120))
    return streamable_http_client(url(), http_client=client)


def stdio() -> StdioServerParameters:
    cmd = json.loads(setting("NANOCLAW_MCP_COMMAND"))
    return StdioServerParameters(command=cmd[0], args=cmd[1:] + ["mcp"], env=dict(os.environ))


def text_of(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def modern_session(c: Client) -> None:
    """The stateless era: every call names its sandbox."""
    assert c.protocol_version == "2026-07-28"
    assert c.server_capabilities.tools is not None
    tools = {t.name: t for t in (await c.list_tools()).tools}
    assert set(tools) == TOOLS
    assert tools["read_file"].annotations.read_only_hint is True
    assert tools["sandbox_kill"].annotations.destructive_hint is True
    # No session, so no session sandbox.
    r = await c.call_tool("sandbox_exec", {"command": "true"})
    assert r.is_error and "sandbox_id is required" in text_of(r)

    r = await c.call_tool("sandbox_create", {"timeout": 300})
    assert not r.is_error, text_of(r)
    sbx = r.structured_content["sandbox_id"]
    try:
        r = await c.call_tool("run_code", {"sandbox_id": sbx, "language": "python", "code": "print(sum(range(10)))"})
        assert r.structured_content["stdout"] == "45\n", text_of(r)
        r = await c.call_tool("write_file", {"sandbox_id": sbx, "path": "a.txt", "content": "v2"})
        assert not r.is_error, text_of(r)
        r = await c.call_tool("read_file", {"sandbox_id": sbx, "path": "a.txt"})
        assert text_of(r) == "v2"
        r = await c.call_tool("list_files", {"sandbox_id": sbx})
        assert "a.txt" in [e["name"] for e in r.structured_content["entries"]]
        r = await c.call_tool("sandbox_exec", {"sandbox_id": sbx, "argv": ["sh", "-c", "exit 4"]})
        assert r.is_error and r.structured_content["exit_code"] == 4
        r = await c.call_tool("sandbox_exec", {"sandbox_id": sbx, "command": "sleep 20", "timeout": 1})
        assert r.is_error and r.structured_content["timed_out"] is True
        r = await c.call_tool("run_code", {"sandbox_id": sbx, "language": "cobol", "code": ""})
        assert r.is_error and "cobol" in text_of(r)
        r = await c.call_tool("read_file", {"sandbox_id": sbx, "path": "../../etc/shadow"})
        assert r.is_error or "root:" not in text_of(r)
        # An exec session spans requests by its id, not by a session.
        r = await c.call_tool("exec_start", {"sandbox_id": sbx, "command": "read l; echo got $l"})
        ex = r.structured_content["exec_id"]
        await c.call_tool("exec_write_stdin", {"exec_id": ex, "data": "x\n"})
        out = ""
        for _ in range(20):
            r = await c.call_tool("exec_poll", {"exec_id": ex, "wait_ms": 2000})
            out += r.structured_content["stdout"]
            if not r.structured_content["running"]:
                break
        assert out == "got x\n" and r.structured_content["exit_code"] == 0
        r = await c.call_tool("sandbox_list", {})
        assert sbx in [s["sandbox_id"] for s in r.structured_content["sandboxes"]]
        with pytest.raises(MCPError) as e:
            await c.call_tool("no_such_tool", {})
        assert e.value.error.code == -32602
    finally:
        r = await c.call_tool("sandbox_kill", {"sandbox_id": sbx})
        assert not r.is_error, text_of(r)


def test_v2_client_speaks_2026_over_http():
    key = setting("NANOCLAW_MCP_KEY")

    async def go():
        async with Client(http(key), mode="auto") as c:
            await modern_session(c)

    asyncio.run(go())


def test_v2_client_speaks_2026_over_stdio():
    async def go():
        async with Client(stdio(), mode="auto") as c:
            await modern_session(c)

    asyncio.run(go())


def test_v2_client_legacy_mode_gets_a_session_sandbox():
    key = setting("NANOCLAW_MCP_KEY")

    async def go():
        async with Client(http(key), mode="legacy") as c:
            assert c.protocol_version == "2025-11-25"
            r = await c.call_tool("sandbox_exec", {"command": "echo $HOME"})
            assert r.structured_content["stdout"] == "/home/user\n", text_of(r)

    asyncio.run(go())


def test_v2_tenant_b_cannot_use_tenant_a_sandbox():
    key_a, key_b = setting("NANOCLAW_MCP_KEY"), setting("NANOCLAW_MCP_KEY_B")

    async def go():
        async with Client(http(key_a), mode="auto") as a, Client(http(key_b), mode="auto") as b:
            r = await a.call_tool("sandbox_create", {})
            sbx = r.structured_content["sandbox_id"]
            try:
                for name, args in [
                    ("sandbox_exec", {"sandbox_id": sbx, "argv": ["id"]}),
                    ("read_file", {"sandbox_id": sbx, "path": "/etc/hostname"}),
                    ("sandbox_kill", {"sandbox_id": sbx}),
                ]:
                    r = await b.call_tool(name, args)
                    assert r.is_error and "not found" in text_of(r), (name, text_of(r))
            finally:
                await a.call_tool("sandbox_kill", {"sandbox_id": sbx})

    asyncio.run(go())
