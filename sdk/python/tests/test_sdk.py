"""The SDK against a real `nanoclaw serve` (embedded, started by the SDK
itself) whose agent's model is the scripted fake; the agent's code runs in
real sandboxes."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import write_config

FIB = "a, b = 0, 1\nfor _ in range(10):\n    print(a)\n    a, b = b, a + b\n"
FIB_OUT = "0\n1\n1\n2\n3\n5\n8\n13\n21\n34\n"


def fib_turns(answer: str = "The first ten Fibonacci numbers are printed above."):
    return [
        {
            "reply": {
                "tool_calls": [{"name": "run_code", "input": {"language": "python", "code": FIB}}],
                "usage": {"input_tokens": 120, "output_tokens": 30},
            }
        },
        {"reply": {"text": answer, "usage": {"input_tokens": 200, "output_tokens": 12}}},
    ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive either (but the SDK reaps its child).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def agent_sandboxes(data: Path):
    """The agent sandboxes of the daemon on the data folder `data`."""
    from nanoclaw._daemon import _session_hashes

    hashes = _session_hashes(data)
    out = subprocess.run(
        [os.environ["NANOCLAW_BIN"], "sandbox", "ls", "--json"],
        capture_output=True,
        check=True,
    )
    found = []
    for s in json.loads(out.stdout or b"[]"):
        session = (s.get("scope") or {}).get("session") or ""
        if session.startswith("serve-") and any(session.endswith("-" + h) for h in hashes):
            found.append(s)
    return found


def test_seed_000_example_verbatim(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fake(fib_turns())
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw

    # Seed 000, verbatim:
    agent = NanoClaw(config_path="config.yaml")
    result = agent.execute(prompt="编写一个 Python 脚本计算斐波那契数列", language="python", timeout=30)

    try:
        assert agent.embedded
        assert result.stop == "answer", result.raw
        assert FIB_OUT in result.stdout, result.raw
        assert result.exit_code == 0
        assert result.code == FIB
        assert result.language == "python"
        assert result.success
        assert "Fibonacci" in (result.answer or "")
        assert result.usage.input_tokens == 320
        assert result.usage.output_tokens == 42
        assert isinstance(result.audit_id, int)
        assert result.tool_calls and result.tool_calls[0]["decision"] == "allowed"
        # The model saw the prompt verbatim.
        reqs = f.record()["requests"]
        assert len(reqs) == 2
        assert "编写一个 Python 脚本计算斐波那契数列" in json.dumps(reqs[0], ensure_ascii=False)
        # The run is in the audit log, under the seq the result names.
        runs = agent.audit(kind="agent_run")
        assert any(r["seq"] == result.audit_id for r in runs), runs
        kinds = {r["kind"] for r in agent.audit(limit=1000)}
        assert {"model_call", "tool_call", "agent_run", "request"} <= kinds, kinds
    finally:
        agent.close()


def test_execute_async_gather_runs_in_parallel(fake, tmp_path: Path) -> None:
    # Three runs share one script, served in the order requests arrive:
    # three run_code calls, then three answers. Whatever the interleaving,
    # every run ends on an answer and three pieces of code run in all.
    call = {"name": "run_code", "input": {"language": "python", "code": FIB}}
    turns = [{"reply": {"tool_calls": [call], "usage": {"input_tokens": 10, "output_tokens": 5}}}] * 3
    turns += ["echo_tool_result"] * 3
    f = fake(turns)
    config = write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw

    async def main(agent: NanoClaw):
        return await asyncio.gather(
            *(
                agent.execute_async(prompt=f"task {i}: Fibonacci", language="python", timeout=30)
                for i in range(3)
            )
        )

    with NanoClaw(config_path=str(config)) as agent:
        results = asyncio.run(main(agent))
    assert len(results) == 3
    assert all(r.stop == "answer" for r in results), [r.raw for r in results]
    assert len({r.run_id for r in results}) == 3
    assert sum(len(r.tool_calls) for r in results) == 3
    for r in results:
        if r.code is not None:
            assert r.exit_code == 0 and FIB_OUT in r.stdout, r.raw
    assert f.record()["remaining"] == 0


def test_embedded_daemon_is_gone_after_close(fake, tmp_path: Path) -> None:
    f = fake(fib_turns())
    config = write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw

    agent = NanoClaw(config_path=str(config))
    pid = agent.daemon_pid
    sock = Path(agent.where.split(":", 1)[1])
    assert pid is not None and alive(pid)
    assert sock.exists()
    r = agent.execute(prompt="fib", timeout=30)
    assert r.exit_code == 0
    data = agent._embedded.data  # type: ignore[union-attr]
    assert agent_sandboxes(data), "the run made an agent sandbox"
    agent.close()
    assert not alive(pid), "the embedded daemon still runs"
    assert not sock.exists(), "its socket is left behind"
    assert not sock.parent.exists(), "its temporary directory is left behind"
    assert not data.exists()
    assert agent_sandboxes(data) == [], "its agent sandbox is left behind"
    agent.close()  # twice is fine

    # Garbage collection stops it too.
    agent = NanoClaw(config_path=str(config))
    pid = agent.daemon_pid
    assert pid is not None and alive(pid)
    del agent
    gc.collect()
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_daemon_errors_are_exceptions_with_its_message(fake, tmp_path: Path) -> None:
    f = fake([{"status": {"code": 400, "message": "model test-model does not exist"}}])
    config = write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw, NanoClawError, DaemonUnavailable

    with NanoClaw(config_path=str(config)) as agent:
        with pytest.raises(NanoClawError) as e:
            agent.execute(prompt="x", agent="nobody")
        assert e.value.status == 404
        assert "nobody" in e.value.message
        # The model API refusing: 502 with the model's message.
        with pytest.raises(NanoClawError) as e:
            agent.execute(prompt="x")
        assert e.value.status == 502
        assert "model test-model does not exist" in e.value.message
        # A bad body: 400 naming the field.
        with pytest.raises(NanoClawError) as e:
            agent.execute(prompt="x", timeout=100000)
        assert e.value.status == 400
        assert "timeout" in e.value.message
        with pytest.raises(NanoClawError) as e:
            agent.approve("apr_0000000000000000", "deny")
        assert e.value.status == 404
        with pytest.raises(ValueError):
            agent.approve("apr_0000000000000000", "yes")

    # No daemon and no config: says so.
    with pytest.raises(DaemonUnavailable) as e:
        NanoClaw()
    assert "no nanoclaw daemon" in e.value.message
    # A config that does not exist.
    with pytest.raises(DaemonUnavailable):
        NanoClaw(config_path=str(tmp_path / "missing.yaml"))


def test_run_audit_approvals_and_an_existing_daemon(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fake([])
    config = write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw

    audit_dir = tmp_path / "audit"
    with NanoClaw(config_path=str(config), audit_log=True, audit_path=str(audit_dir)) as agent:
        r = agent.run("echo hi; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "err\n"), r.raw
        r = agent.run(code="import os; print(os.getuid())", language="python", timeout=10)
        assert r.exit_code == 0 and r.stdout == "1000\n", r.raw
        r = asyncio.run(agent.run_async(["sh", "-c", "echo async"]))
        assert r.stdout == "async\n"
        assert agent.approvals() == []
        assert agent.approvals(all=True) == []
        runs = [x for x in agent.audit(kind="request", limit=1000) if x.get("path") == "/v1/run"]
        assert len(runs) == 3, runs
        assert agent.audit(kind="request", limit=1) and len(agent.audit(kind="request", limit=1)) == 1

        # A second client finds the running daemon on its socket (no key
        # needed there) and does not own it.
        monkeypatch.setenv("NANOCLAW_SOCKET", agent.where.split(":", 1)[1])
        with NanoClaw(config_path=str(config)) as other:
            assert not other.embedded
            assert other.run("true").exit_code == 0
        assert agent.health()
        assert isinstance(agent.images(), list)
    # The audit log stays where audit_path said.
    assert (audit_dir / "nanoclaw.db").exists()


def test_url_api_key_and_quota_exceeded(tmp_path: Path) -> None:
    """A daemon on TCP (started here, no config): the client with a URL and
    a tenant's key; a wrong key is a 401, a run without --config a 409, the
    tenant's rate limit a QuotaExceeded with Retry-After."""
    import socket

    from nanoclaw import NanoClaw, NanoClawError, QuotaExceeded

    nc = os.environ["NANOCLAW_BIN"]
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    key = subprocess.run(
        [nc, "tenant", "add", "acme", "--data", str(data), "--rate", "1"],
        capture_output=True, check=True, text=True,
    ).stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen(
        [nc, "serve", "--data", str(data), "--listen", f"tcp:127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nanoclaw serve did not listen"
                time.sleep(0.05)
        time.sleep(2.1)  # a full bucket
        with NanoClaw(url=f"http://127.0.0.1:{port}", api_key=key) as agent:
            assert not agent.embedded
            assert agent.run(["echo", "tcp"]).stdout == "tcp\n"
            with pytest.raises(NanoClawError) as e:
                agent.execute(prompt="x")
            assert e.value.status == 409, e.value
            with pytest.raises(QuotaExceeded) as q:
                for _ in range(10):
                    agent.audit(limit=1)
            assert q.value.status == 429
            assert q.value.retry_after is not None and q.value.retry_after >= 1
            assert "rate limit" in q.value.message and "acme" in q.value.message
        with NanoClaw(url=f"http://127.0.0.1:{port}", api_key="e2b_" + "0" * 40) as bad:
            with pytest.raises(NanoClawError) as e:
                bad.audit()
            assert e.value.status == 401
            assert "Invalid API key" in e.value.message
    finally:
        daemon.terminate()
        daemon.wait()
