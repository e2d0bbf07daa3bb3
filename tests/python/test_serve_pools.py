"""Warm pools of templates on other backends (`nanoclaw serve --pool NAME=N`
for docker, gvisor and microvm templates), driven by the unmodified `e2b`
SDK: a create takes a sandbox made ahead (`metadata.launch == "warm"`) that
works like a cold one (commands, the request's environment variables,
files), is never handed out twice (what one tenant left in it is not seen
by the next), and a request whose network differs from the pool's gets a
cold sandbox. The create's latency, warm and cold, is printed (measured,
not asserted: see bench/ for the benchmark).

Run by crates/cli/tests/serve_backends.rs, which starts the daemon with the
pools, waits until they are full, and afterwards checks that they refill
and that a stop leaves nothing. Settings (besides conftest.py's):

    NANOCLAW_POOLED_TEMPLATES   comma-separated BACKEND=TEMPLATE pairs
                                (e.g. "docker=dk,gvisor=gv,microvm=vm")
    NANOCLAW_BACKEND_IDS        a file the sandbox ids made here are appended to
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from e2b import Sandbox

# A VM boots in seconds under software emulation (TCG), more on a loaded
# machine: a cold create of one may take that long.
REQUEST_TIMEOUT = 300


def pooled() -> list[tuple[str, str]]:
    raw = os.environ.get("NANOCLAW_POOLED_TEMPLATES", "")
    if not raw:
        pytest.skip("NANOCLAW_POOLED_TEMPLATES is not set (serve_backends.rs sets it)")
    return [tuple(p.split("=", 1)) for p in raw.split(",") if p]


def remember(sbx) -> None:
    path = os.environ.get("NANOCLAW_BACKEND_IDS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(sbx.sandbox_id + "\n")


def wait_refilled(template: str, e2b_target) -> None:
    """Until the pool of `template` holds a ready sandbox again (read from
    the daemon's /metrics, as an operator would)."""
    import urllib.request

    req = urllib.request.Request(
        e2b_target.api_url + "/metrics", headers={"X-API-Key": e2b_target.key_a}
    )
    deadline = time.monotonic() + REQUEST_TIMEOUT
    series = f'nanoclaw_pool_ready{{template="{template}"}} '
    while time.monotonic() < deadline:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(series) and float(line[len(series):]) >= 1:
                return
        time.sleep(0.2)
    pytest.fail(f"the pool of {template} did not refill:\n{text}")


def create(template: str, e2b_target, registry, **kwargs):
    t0 = time.monotonic()
    sbx = Sandbox.create(
        template=template,
        timeout=120,
        request_timeout=REQUEST_TIMEOUT,
        **kwargs,
        **e2b_target.a,
    )
    took = time.monotonic() - t0
    registry.add(sbx, e2b_target.a)
    remember(sbx)
    info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    return sbx, info.metadata, took


@pytest.mark.parametrize("index", range(3))
def test_a_pooled_template_hands_out_fresh_working_sandboxes(index, e2b_target, registry):
    pairs = pooled()
    if index >= len(pairs):
        pytest.skip(f"only {len(pairs)} pooled templates in this run")
    backend, template = pairs[index]
    wait_refilled(template, e2b_target)

    marker = f"/home/user/left-{uuid.uuid4().hex}"
    sbx, meta, warm_s = create(template, e2b_target, registry, envs={"ASKED": "yes"})
    assert meta.get("launch") == "warm", meta
    assert meta.get("backend") == backend, meta
    # The request's environment reaches its commands though the sandbox
    # was made before the request.
    r = sbx.commands.run("echo $ASKED; id -u")
    assert r.stdout.split() == ["yes", "1000"], r.stdout
    sbx.files.write(marker, b"tenant one was here")
    assert sbx.files.read(marker) == "tenant one was here"
    sbx.kill()

    # The next one is another sandbox: nothing of the first is in it.
    wait_refilled(template, e2b_target)
    sbx2, meta2, _ = create(template, e2b_target, registry)
    assert meta2.get("launch") == "warm", meta2
    assert sbx2.sandbox_id != sbx.sandbox_id
    assert not sbx2.files.exists(marker)
    r = sbx2.commands.run("echo ${ASKED:-unset}")
    assert r.stdout.strip() == "unset", r.stdout

    # The pool (size 1) is refilling: a create now, or one that asks
    # another network than the pool's, is cold, and works too.
    kwargs = {}
    if backend in ("docker", "gvisor"):
        # The pool's sandboxes have E2B's default network (the egress
        # proxy); one without any network must be made for the request.
        kwargs["allow_internet_access"] = False
    sbx3, meta3, cold_s = create(template, e2b_target, registry, **kwargs)
    if kwargs:
        assert meta3.get("launch") == "cold", meta3
    assert sbx3.commands.run("echo ok").stdout.strip() == "ok"
    print(
        f"\n{backend} template {template}: create {warm_s * 1000:.0f} ms warm, "
        f"{cold_s * 1000:.0f} ms {meta3.get('launch')}"
    )
    for s in (sbx2, sbx3):
        s.kill()
