"""The sandbox level against the real daemon (embedded, started by the
SDK): Sandbox / AsyncSandbox over the daemon's E2B control plane and envd
data plane."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import write_config


@pytest.fixture
def agent(fake, tmp_path: Path):
    f = fake([])
    from nanoclaw import NanoClaw

    nc = NanoClaw(config_path=str(write_config(tmp_path / "config.yaml", f.port)))
    yield nc
    nc.close()


def test_create_run_files_kill(agent) -> None:
    from nanoclaw import CommandExitError, NanoClawError, Sandbox

    sbx = Sandbox.create(envs={"GREETING": "hi"}, metadata={"job": "t1"}, timeout=120, client=agent)
    try:
        assert sbx.template == "base" and sbx.sandbox_id
        # A non-zero exit is a result, not an exception.
        r = sbx.run("echo $GREETING; echo oops >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr, r.killed_by) == (3, "hi\n", "oops\n", None)
        assert r.status == "exit status 3" and not r.ok and r.duration_ms >= 0
        with pytest.raises(CommandExitError) as e:
            sbx.run("exit 4", check=True)
        assert e.value.result.exit_code == 4
        r = sbx.run(["python3", "-c", "import os; print(os.getuid(), os.getcwd())"], envs={"X": "1"})
        assert r.stdout == "1000 /home/user\n" and r.ok
        r = sbx.run("pwd", cwd="/tmp")
        assert r.stdout == "/tmp\n"
        # The daemon kills what outlives its timeout.
        r = sbx.run("sleep 30", timeout=0.5)
        assert r.killed_by == "timeout" and r.exit_code is None

        # Files: a round trip, and state shared between commands.
        entry = sbx.files.write("work/data.txt", "1,2,3\n")
        assert entry.path == "/home/user/work/data.txt"
        assert sbx.files.read("work/data.txt") == "1,2,3\n"
        assert sbx.run("cat work/data.txt").stdout == "1,2,3\n"
        sbx.files.write("work/blob.bin", bytes(range(256)))
        assert sbx.files.read("/home/user/work/blob.bin", format="bytes") == bytes(range(256))
        assert sorted(e.name for e in sbx.files.list("work")) == ["blob.bin", "data.txt"]
        assert {e.type for e in sbx.files.list("work")} == {"file"}
        assert sbx.files.exists("work/data.txt") and not sbx.files.exists("work/nope")
        assert sbx.files.make_dir("work/sub/deeper") is True
        assert sbx.files.make_dir("work/sub/deeper") is False
        assert [e.type for e in sbx.files.list("work/sub")] == ["dir"]
        sbx.files.remove("work")
        assert not sbx.files.exists("work")
        with pytest.raises(NanoClawError) as e:
            sbx.files.read("work/data.txt")
        assert e.value.status == 404

        # The sandbox is listed with its metadata, and can be reached again.
        listed = {s.sandbox_id: s for s in Sandbox.list(client=agent)}
        assert listed[sbx.sandbox_id].metadata["job"] == "t1"
        again = Sandbox.connect(sbx.sandbox_id, client=agent)
        assert again.run("echo $GREETING").stdout == "hi\n"
    finally:
        sbx.kill()
    assert sbx.sandbox_id not in {s.sandbox_id for s in Sandbox.list(client=agent)}
    # Killed: its id is unknown now, and says so.
    with pytest.raises(NanoClawError) as e:
        sbx.kill()
    assert e.value.status == 404 and sbx.sandbox_id in e.value.message
    with pytest.raises(NanoClawError):
        sbx.run("true")
    kills = [r for r in agent.audit(kind="kill", limit=1000) if r.get("sandbox") == sbx.sandbox_id]
    assert len(kills) == 1


def test_context_manager_kills_and_errors_carry_the_daemons_message(agent) -> None:
    from nanoclaw import NanoClawError, Sandbox

    with Sandbox.create(client=agent) as sbx:
        assert sbx.run("true").ok
        sid = sbx.sandbox_id
    assert sid not in {s.sandbox_id for s in Sandbox.list(client=agent)}

    with pytest.raises(NanoClawError) as e:
        Sandbox.connect("0123456789ab", client=agent)
    assert e.value.status == 404 and "not found" in e.value.message
    with pytest.raises(NanoClawError) as e:
        Sandbox.create(template="no-such-template", client=agent)
    assert e.value.status == 404
    assert e.value.message == "template 'no-such-template' not found"
    with pytest.raises(ValueError):
        Sandbox.create(client=agent, url="http://127.0.0.1:1")


def test_hostile_paths_stay_inside_the_sandbox(agent) -> None:
    """`../../etc/passwd` is the sandbox's own /etc/passwd (relative paths
    start in /home/user, as envd's do): the same path and the same answers
    as `nanoclaw run` and the E2B API give. It cannot be written (the
    root is read-only: 403, the sandbox's message), and what is read is
    the sandbox's synthetic file, never the host's."""
    from nanoclaw import NanoClawError, Sandbox

    host_passwd = Path("/etc/passwd").read_text()
    with Sandbox.create(client=agent) as sbx:
        with pytest.raises(NanoClawError) as e:
            sbx.files.write("../../etc/passwd", "evil::0:0::/:/bin/sh\n")
        assert e.value.status == 403, e.value
        assert "Read-only file system" in e.value.message
        seen = sbx.files.read("../../etc/passwd")
        assert seen == sbx.run("cat /etc/passwd").stdout
        assert seen != host_passwd and "nanotest" not in seen and "evil" not in seen
        with pytest.raises(NanoClawError) as e:
            sbx.files.read("../../etc/shadow")
        assert e.value.status == 404
        with pytest.raises(NanoClawError) as e:
            sbx.files.remove("/usr/bin/env")
        assert e.value.status in (400, 403), e.value
        assert Path("/usr/bin/env").exists()
        assert Path("/etc/passwd").read_text() == host_passwd


def test_async_sandbox(agent) -> None:
    from nanoclaw import AsyncSandbox, NanoClawError

    async def main() -> None:
        async with await AsyncSandbox.create(metadata={"mode": "async"}, client=agent) as sbx:
            results = await asyncio.gather(*(sbx.run(f"echo {i}; exit {i}") for i in range(4)))
            assert [(r.stdout, r.exit_code) for r in results] == [(f"{i}\n", i) for i in range(4)]
            await sbx.files.write("a.txt", b"\x00async\xff")
            assert await sbx.files.read("a.txt", format="bytes") == b"\x00async\xff"
            assert await sbx.files.exists("a.txt")
            assert [e.name for e in await sbx.files.list(".") if e.name == "a.txt"] == ["a.txt"]
            assert await sbx.files.make_dir("d") and not await sbx.files.make_dir("d")
            await sbx.files.remove("a.txt")
            assert not await sbx.files.exists("a.txt")
            listed = await AsyncSandbox.list(client=agent)
            assert any(s.sandbox_id == sbx.sandbox_id and s.metadata["mode"] == "async" for s in listed)
            r = await sbx.run("sleep 30", timeout=0.3)
            assert r.killed_by == "timeout"
            sid = sbx.sandbox_id
        assert sid not in {s.sandbox_id for s in await AsyncSandbox.list(client=agent)}
        with pytest.raises(NanoClawError) as e:
            await AsyncSandbox.connect(sid, client=agent)
        assert e.value.status == 404

    asyncio.run(main())
