"""Fixtures for the E2B-SDK compatibility suite (test_e2b_sdk.py).

The suite drives the unmodified `e2b` SDK (pinned in requirements.txt) against
a running `nanoclaw serve`. Where that daemon is comes from the environment:

    NANOCLAW_E2B_API_URL      http://127.0.0.1:PORT  (control plane; required)
    NANOCLAW_E2B_API_KEY      tenant A's API key     (required)
    NANOCLAW_E2B_API_KEY_B    tenant B's API key     (required; isolation tests)
    NANOCLAW_E2B_SANDBOX_URL  data-plane base URL    (optional; default: the API URL)
    NANOCLAW_E2B_TEMPLATE     template to create     (optional; default: "base")
    NANOCLAW_REQUIRE_E2B=1    missing settings FAIL the tests instead of skipping them

Every URL must be a loopback address (127.0.0.0/8, ::1, localhost): the suite
refuses to send traffic anywhere else. The SDK is also pinned to these URLs
through E2B_API_URL / E2B_SANDBOX_URL and an unresolvable E2B_DOMAIN, so no
code path of the SDK can fall back to e2b.app / e2b.dev.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import urllib.parse
import uuid

import pytest

ENV_URL = "NANOCLAW_E2B_API_URL"
ENV_KEY = "NANOCLAW_E2B_API_KEY"
ENV_KEY_B = "NANOCLAW_E2B_API_KEY_B"
ENV_SANDBOX_URL = "NANOCLAW_E2B_SANDBOX_URL"
ENV_TEMPLATE = "NANOCLAW_E2B_TEMPLATE"
ENV_REQUIRE = "NANOCLAW_REQUIRE_E2B"

REQUIRED = (ENV_URL, ENV_KEY, ENV_KEY_B)


def missing_settings() -> list:
    return [name for name in REQUIRED if not os.environ.get(name)]


def require_e2b() -> bool:
    return os.environ.get(ENV_REQUIRE, "") not in ("", "0", "false", "no")


def skip_message(missing) -> str:
    return (
        "E2B SDK compatibility tests need a running `nanoclaw serve`: set "
        + ", ".join(missing)
        + " (e.g. NANOCLAW_E2B_API_URL=http://127.0.0.1:PORT plus two tenants' API keys). "
        "Set NANOCLAW_REQUIRE_E2B=1 to make this a failure instead of a skip."
    )


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class E2BTarget:
    """Where the daemon is, and the per-tenant keyword arguments for the SDK."""

    def __init__(self):
        self.api_url = os.environ[ENV_URL].rstrip("/")
        self.sandbox_url = (os.environ.get(ENV_SANDBOX_URL) or self.api_url).rstrip("/")
        self.key_a = os.environ[ENV_KEY]
        self.key_b = os.environ[ENV_KEY_B]
        self.template = os.environ.get(ENV_TEMPLATE) or "base"
        # One id per test session, put in every sandbox's metadata, so list
        # filters only ever see this run's sandboxes.
        self.run_id = uuid.uuid4().hex[:12]

    def opts(self, key: str) -> dict:
        return {"api_key": key, "api_url": self.api_url, "sandbox_url": self.sandbox_url}

    @property
    def a(self) -> dict:
        return self.opts(self.key_a)

    @property
    def b(self) -> dict:
        return self.opts(self.key_b)


@pytest.fixture(scope="session")
def e2b_target() -> E2BTarget:
    missing = missing_settings()
    if missing:
        msg = skip_message(missing)
        if require_e2b():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    target = E2BTarget()
    for url in (target.api_url, target.sandbox_url):
        if not _is_loopback(url):
            pytest.fail(f"refusing to test against {url}: only loopback addresses are allowed", pytrace=False)
    # Belt and braces: anything in the SDK that reads the environment instead
    # of our explicit kwargs still lands on the daemon, never on e2b.app.
    os.environ["E2B_API_URL"] = target.api_url
    os.environ["E2B_SANDBOX_URL"] = target.sandbox_url
    os.environ["E2B_API_KEY"] = target.key_a
    os.environ["E2B_DOMAIN"] = "nanoclaw.invalid"
    os.environ.pop("E2B_DEBUG", None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"
    return target


class SandboxRegistry:
    """Every sandbox a test created, so the session can kill leftovers."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: list = []

    def add(self, sbx, opts: dict):
        with self._lock:
            self._items.append((sbx.sandbox_id, opts))
        return sbx

    def kill_all(self):
        from e2b import Sandbox

        with self._lock:
            items, self._items = self._items, []
        for sandbox_id, opts in items:
            try:
                Sandbox.kill(sandbox_id, **opts)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass


@pytest.fixture(scope="session")
def registry(e2b_target):
    reg = SandboxRegistry()
    yield reg
    reg.kill_all()


@pytest.fixture
def make_sandbox(e2b_target, registry, request):
    """Factory: make_sandbox(tenant="a"|"b", **create_kwargs) -> Sandbox.

    Metadata always carries this run's id and the test's name. Sandboxes are
    killed when the test ends (and again, best effort, at session end).
    """
    from e2b import Sandbox

    created = []

    def make(tenant: str = "a", **kwargs):
        opts = e2b_target.a if tenant == "a" else e2b_target.b
        metadata = {"suite": "nanoclaw-e2b", "run": e2b_target.run_id, "test": request.node.name[:60]}
        metadata.update(kwargs.pop("metadata", None) or {})
        kwargs.setdefault("template", e2b_target.template)
        kwargs.setdefault("timeout", 300)
        sbx = Sandbox.create(metadata=metadata, **kwargs, **opts)
        created.append((sbx, opts))
        return registry.add(sbx, opts)

    yield make
    for sbx, opts in created:
        try:
            Sandbox.kill(sbx.sandbox_id, **opts)
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def sandbox(make_sandbox):
    """A fresh sandbox of tenant A with one sandbox-wide env var."""
    return make_sandbox(envs={"NANOCLAW_SANDBOX_ENV": "from-create"})


@pytest.fixture(scope="module")
def shared_sandbox(e2b_target, registry):
    """One tenant-A sandbox shared by the read-mostly tests of a module."""
    from e2b import Sandbox

    sbx = Sandbox.create(
        template=e2b_target.template,
        timeout=900,
        metadata={"suite": "nanoclaw-e2b", "run": e2b_target.run_id, "test": "shared"},
        envs={"NANOCLAW_SANDBOX_ENV": "from-create"},
        **e2b_target.a,
    )
    registry.add(sbx, e2b_target.a)
    yield sbx
    try:
        sbx.kill()
    except Exception:  # noqa: BLE001
        pass


@pytest.fixture
def host_sentinel(tmp_path_factory):
    """A file on the HOST holding a random secret: no sandbox may ever read it."""
    secret = "nanoclaw-host-secret-" + uuid.uuid4().hex
    path = f"/tmp/nanoclaw-e2b-sentinel-{uuid.uuid4().hex[:12]}"
    with open(path, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o644)
    yield path, secret
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def pytest_terminal_summary(terminalreporter):
    """Say once, at the end, why the suite was skipped."""
    missing = missing_settings()
    if missing and not require_e2b():
        terminalreporter.write_line("nanoclaw E2B suite: " + skip_message(missing), yellow=True)
