"""Seed 000's remaining examples, verbatim: batch execution with
execute_async and asyncio.gather, and the audit log at audit_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config
from test_sdk import FIB, FIB_OUT


def test_seed_000_batch_execute_verbatim(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    call = {"name": "run_code", "input": {"language": "python", "code": FIB}}
    turns = [{"reply": {"tool_calls": [call], "usage": {"input_tokens": 10, "output_tokens": 5}}}] * 3
    turns += ["echo_tool_result"] * 3
    f = fake(turns)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw

    agent = NanoClaw(config_path="config.yaml")
    try:
        # Seed 000, verbatim:
        import asyncio

        async def batch_execute():
            tasks = [
                agent.execute_async("任务 1"),
                agent.execute_async("任务 2"),
                agent.execute_async("任务 3"),
            ]
            results = await asyncio.gather(*tasks)
            return results

        results = asyncio.run(batch_execute())

        assert len(results) == 3
        assert all(r.stop == "answer" for r in results), [r.raw for r in results]
        assert len({r.run_id for r in results}) == 3
        ran = [r for r in results if r.code is not None]
        assert ran and all(r.exit_code == 0 and FIB_OUT in r.stdout for r in ran)
        prompts = json.dumps(f.record()["requests"], ensure_ascii=False)
        assert all(f"任务 {i}" in prompts for i in (1, 2, 3))
    finally:
        agent.close()


# Run as a script in a mount namespace of its own, where /var/log is an
# empty tmpfs: seed 000's audit_path="/var/log/nanoclaw" is taken
# verbatim without touching the machine's /var/log.
AUDIT_SCRIPT = r'''
import json, subprocess, sys
from nanoclaw import NanoClaw

# Seed 000, verbatim:
# 启用审计日志
agent = NanoClaw(
    config_path="config.yaml",
    audit_log=True,
    audit_path="/var/log/nanoclaw"
)

result = agent.execute(prompt="编写一个 Python 脚本计算斐波那契数列", language="python", timeout=30)
records = agent.audit(limit=1000)
embedded = agent.embedded
agent.close()
verify = subprocess.run(
    [sys.argv[1], "audit", "verify", "--data", "/var/log/nanoclaw", "--json"],
    capture_output=True, text=True,
)
import os
print(json.dumps({
    "embedded": embedded,
    "stdout": result.stdout,
    "audit_id": result.audit_id,
    "kinds": sorted({r["kind"] for r in records}),
    "execs": [r for r in records if r["kind"] == "tool_call"],
    "files": sorted(os.listdir("/var/log/nanoclaw")),
    "verify_rc": verify.returncode,
    "verify": verify.stdout,
}))
'''


def test_seed_000_audit_log_at_audit_path_verbatim(fake, tmp_path: Path) -> None:
    from test_sdk import fib_turns

    f = fake(fib_turns())
    write_config(tmp_path / "config.yaml", f.port)
    (tmp_path / "audit.py").write_text(AUDIT_SCRIPT)
    src = str(Path(__file__).resolve().parents[1] / "src")
    o = subprocess.run(
        [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount -t tmpfs -o mode=0755 nanoclaw-test /var/log && exec "$@"', "sh",
            sys.executable, "audit.py", os.environ["NANOCLAW_BIN"],
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=src),
    )
    assert o.returncode == 0, o.stderr
    v = json.loads(o.stdout.strip().splitlines()[-1])
    assert v["embedded"] is True
    assert FIB_OUT in v["stdout"]
    assert "nanoclaw.db" in v["files"], v["files"]
    assert {"request", "agent_run", "model_call", "tool_call"} <= set(v["kinds"]), v["kinds"]
    assert v["verify_rc"] == 0, v["verify"]
    report = json.loads(v["verify"])
    assert report["first_bad"] is None and report["count"] >= len(v["kinds"])
    assert not Path("/var/log/nanoclaw").exists(), "the machine's /var/log was touched"


def test_audit_options_are_honest(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fake([])
    config = write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw

    # The daemon always audits: asking it not to is an error, not a no-op.
    with pytest.raises(ValueError, match="cannot be told not to"):
        NanoClaw(config_path=str(config), audit_log=False)
    # audit_path needs a daemon this client starts.
    with pytest.raises(ValueError, match="give config_path"):
        NanoClaw(audit_path=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="give config_path"):
        NanoClaw(config_path=str(config), url="http://127.0.0.1:1", audit_path=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="not both"):
        NanoClaw(config_path=str(config), audit_path=str(tmp_path / "a"), data_dir=str(tmp_path / "b"))

    # With a daemon already answering on the socket, audit_path still gets
    # its own daemon (the log is where it was asked to be).
    audit_dir = tmp_path / "audit"
    with NanoClaw(config_path=str(config)) as first:
        monkeypatch.setenv("NANOCLAW_SOCKET", first.where.split(":", 1)[1])
        with NanoClaw(config_path=str(config)) as shared:
            assert not shared.embedded
        with NanoClaw(config_path=str(config), audit_path=str(audit_dir)) as second:
            assert second.embedded and second.where != first.where
            assert second.run("true").exit_code == 0
            assert second.audit_path == audit_dir
    assert (audit_dir / "nanoclaw.db").exists()
