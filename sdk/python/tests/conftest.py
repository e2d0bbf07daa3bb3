"""Fixtures: the real `nanoclaw` binary (NANOCLAW_BIN) and the fake model
server (NANOCLAW_FAKELLM, `nanoclaw-fakellm`), as the Rust test
crates/cli/tests/python_sdk.rs passes them. The agents' sandboxes need
root: as another user every test is skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

# The package from the source tree, whether or not it is pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FAKE_KEY = "sk-ant-fake-sdk-0123456789abcdef"


def _binary(var: str) -> str:
    path = os.environ.get(var)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"{var} is not set to an executable (run through crates/cli/tests/python_sdk.rs)")
    return path


@pytest.fixture(scope="session")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private image store (`$NANOCLAW_DATA_DIR`, which the embedded
    daemons and their `nanoclaw image build` children inherit) holding the
    local bench image (`nanoclaw-bench:latest`: python3 and its stdlib, no
    pip; built by .ci/build-bench-image.sh) under the name
    `python:3.11-slim`, so that seed 000's `FROM python:3.11-slim` resolves
    with no network. Never the machine's own store."""
    data = tmp_path_factory.mktemp("image-data")
    if os.geteuid() != 0:
        return data  # every test skips
    tar = data / "bench.tar"
    saved = subprocess.run(
        ["docker", "save", "-o", str(tar), "nanoclaw-bench:latest"], capture_output=True
    ) if shutil.which("docker") else None
    if saved is None or saved.returncode != 0:
        why = "docker with the image nanoclaw-bench:latest (.ci/build-bench-image.sh)"
        if os.environ.get("NANOCLAW_REQUIRE_DOCKER") == "1":
            pytest.fail(f"NANOCLAW_REQUIRE_DOCKER=1 but there is no {why}")
        return data  # the image tests skip (see `base_image`)
    env = dict(os.environ, NANOCLAW_DATA_DIR=str(data))
    subprocess.run(
        [_binary("NANOCLAW_BIN"), "image", "import", str(tar), "--tag", "python:3.11-slim"],
        env=env, check=True, capture_output=True,
    )
    tar.unlink()
    return data


@pytest.fixture
def base_image(image_store: Path) -> str:
    """`python:3.11-slim` in the test store, or a skip saying why not."""
    if not (image_store / "images").is_dir():
        pytest.skip("SKIP: no docker image nanoclaw-bench:latest to import as the FROM image")
    return "python:3.11-slim"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, image_store: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the agents' sandboxes need root (CI runs these as root)")
    monkeypatch.setenv("NANOCLAW_DATA_DIR", str(image_store))
    monkeypatch.setenv("NANOCLAW_BIN", _binary("NANOCLAW_BIN"))
    # Never a daemon that happens to run on this machine: the tests start
    # their own (embedded) one.
    monkeypatch.setenv("NANOCLAW_SOCKET", str(tmp_path / "no-daemon.sock"))
    monkeypatch.setenv("NANOCLAW_SDK_TEST_KEY", FAKE_KEY)
    monkeypatch.delenv("NANOCLAW_API_KEY", raising=False)


class Fake:
    """A running `nanoclaw-fakellm` with a script."""

    def __init__(self, proc: "subprocess.Popen[bytes]", port: int, record: Path) -> None:
        self.proc = proc
        self.port = port
        self.record_path = record

    def record(self) -> Dict[str, Any]:
        try:
            return dict(json.loads(self.record_path.read_text()))
        except (OSError, ValueError):
            return {"requests": [], "violations": [], "served": 0, "remaining": None}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[List[Any]], Fake]]:
    """Starts a fake Anthropic model server serving `turns` (the script
    format of crates/fakellm/src/script.rs); checks at the end that it saw
    no violation (the key only in its header, every tool call answered)."""
    started: List[Fake] = []

    def start(turns: List[Any]) -> Fake:
        n = len(started)
        script = tmp_path / f"script{n}.json"
        script.write_text(json.dumps(turns))
        record = tmp_path / f"record{n}.json"
        proc = subprocess.Popen(
            [
                _binary("NANOCLAW_FAKELLM"),
                "--script", str(script),
                "--kind", "anthropic",
                "--api-key", FAKE_KEY,
                "--record", str(record),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        f = Fake(proc, int(line.rsplit(":", 1)[1]), record)
        started.append(f)
        return f

    yield start
    for f in started:
        f.proc.terminate()
        f.proc.wait()
    for f in started:
        assert f.record()["violations"] == []


def write_config(path: Path, port: int, extra: str = "") -> Path:
    """An agent config whose model is the fake on `port`."""
    path.write_text(
        "llm:\n"
        "  provider: anthropic\n"
        "  api_key: ${NANOCLAW_SDK_TEST_KEY}\n"
        "  model: test-model\n"
        f"  base_url: http://127.0.0.1:{port}\n" + extra
    )
    return path
