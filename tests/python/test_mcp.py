"""`nanoclaw mcp` driven by the official MCP Python SDK (the `mcp` package,
pinned in requirements.txt): stdio_client starts the server, ClientSession
speaks the protocol.

    NANOCLAW_MCP_COMMAND   JSON array: the nanoclaw command (e.g.
                           ["/path/to/nanoclaw"], or with a setpriv prefix
                           to run it as another user); `mcp` and
                           `sandbox ls --json` are appended to it. Required.
    NANOCLAW_REQUIRE_E2B=1 a missing setting FAILS instead of skipping.

Run by crates/cli/tests/mcp.rs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError

ENV_COMMAND = "NANOCLAW_MCP_COMMAND"


def nanoclaw() -> list:
    raw = os.environ.get(ENV_COMMAND)
    if not raw:
        msg = f"set {ENV_COMMAND} to a JSON array naming the nanoclaw binary"
        if os.environ.get("NANOCLAW_REQUIRE_E2B", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    cmd = json.loads(raw)
    assert isinstance(cmd, list) and cmd, cmd
    return cmd


def sandbox_ids(cmd: list) -> set:
    out = subprocess.run(
        cmd + ["sandbox", "ls", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return {s["id"] for s in json.loads(out.stdout)}


def server(cmd: list) -> StdioServerParameters:
    return StdioServerParameters(
        command=cmd[0], args=cmd[1:] + ["mcp"], env=dict(os.environ)
    )


def text_of(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def session_run(cmd: list) -> str:
    """One session through every tool; returns its sandbox's id."""
    async with stdio_client(server(cmd)) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.serverInfo.name == "nanoclaw"
            assert init.capabilities.tools is not None
            assert init.protocolVersion == "2025-11-25"

            await session.send_ping()

            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == {
                "run_code",
                "exec",
                "read_file",
                "write_file",
                "list_files",
            }
            assert tools["read_file"].annotations.readOnlyHint is True
            assert tools["run_code"].inputSchema["required"] == ["language", "code"]

            r = await session.call_tool(
                "run_code", {"language": "python", "code": "print('hello from', 6 * 7)"}
            )
            assert not r.isError, text_of(r)
            assert "hello from 42" in text_of(r)
            assert r.structuredContent["exit_code"] == 0
            assert r.structuredContent["stdout"] == "hello from 42\n"
            sandbox = r.structuredContent["sandbox_id"]
            assert sandbox in sandbox_ids(cmd)

            r = await session.call_tool(
                "write_file", {"path": "notes/hello.txt", "content": "héllo\nworld\n"}
            )
            assert not r.isError, text_of(r)
            r = await session.call_tool("read_file", {"path": "notes/hello.txt"})
            assert not r.isError, text_of(r)
            assert text_of(r) == "héllo\nworld\n"
            r = await session.call_tool("list_files", {"path": "notes"})
            assert not r.isError, text_of(r)
            assert [e["name"] for e in r.structuredContent["entries"]] == ["hello.txt"]

            # The state is kept: one sandbox for the session.
            r = await session.call_tool("exec", {"command": "cat notes/hello.txt | wc -l"})
            assert not r.isError, text_of(r)
            assert r.structuredContent["stdout"].strip() == "2"
            assert r.structuredContent["sandbox_id"] == sandbox

            # A failing command is a result with isError, not a protocol error.
            r = await session.call_tool("exec", {"command": "echo oops >&2; exit 3"})
            assert r.isError
            assert r.structuredContent["exit_code"] == 3
            assert "oops" in text_of(r)

            # Bad arguments: a tool error the model can read.
            r = await session.call_tool("run_code", {"language": "cobol", "code": "x"})
            assert r.isError and "cobol" in text_of(r)
            r = await session.call_tool("write_file", {"path": "x"})
            assert r.isError and "content" in text_of(r)

            # The sandbox's files are not the host's.
            r = await session.call_tool("read_file", {"path": "/etc/shadow"})
            assert r.isError or "root:" not in text_of(r)

            # An unknown tool: a JSON-RPC error.
            with pytest.raises(McpError) as e:
                await session.call_tool("no_such_tool", {})
            assert e.value.error.code == -32602

            # A timeout kills the command.
            r = await session.call_tool(
                "run_code", {"language": "sh", "code": "sleep 30", "timeout_s": 1}
            )
            assert r.isError and r.structuredContent["killed_by"] == "timeout"
            return sandbox


def test_a_session_uses_every_tool_and_leaves_no_sandbox():
    cmd = nanoclaw()
    sandbox = asyncio.run(session_run(cmd))
    # The server removed its sandbox when the session closed.
    assert sandbox not in sandbox_ids(cmd)
