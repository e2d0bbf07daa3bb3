"""`nanoclaw serve` with a template on the Kubernetes backend (`--template
k8s=kubernetes:IMAGE`), driven by the unmodified `e2b` SDK: each sandbox is
a Pod, and commands (foreground, background, stdin, kill), files, timeouts
and kill go through the same API as for native sandboxes.

Run by crates/cli/tests/serve_kubernetes.rs, which starts the daemon(s)
against a real cluster and checks the cluster afterwards. Settings
(besides conftest.py's):

    NANOCLAW_K8S_TEMPLATE     the template's name (required)
    NANOCLAW_BACKEND_IDS      a file the sandbox ids made here are appended to
    NANOCLAW_E2B_API_URL_2    a second replica's URL (the replicas test only)
"""

from __future__ import annotations

import os
import uuid

import pytest
from e2b import Sandbox
from e2b import CommandExitException, RateLimitException, SandboxException

from helpers import read_until

ENV_TEMPLATE = "NANOCLAW_K8S_TEMPLATE"
ENV_REPLICA = "NANOCLAW_E2B_API_URL_2"


def template() -> str:
    t = os.environ.get(ENV_TEMPLATE, "")
    if not t:
        pytest.fail(f"{ENV_TEMPLATE} is not set (serve_kubernetes.rs sets it)")
    return t


def remember(sbx) -> None:
    path = os.environ.get("NANOCLAW_BACKEND_IDS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(sbx.sandbox_id + "\n")


def make(e2b_target, registry, **kw):
    sbx = Sandbox.create(template=template(), timeout=300, **e2b_target.a, **kw)
    registry.add(sbx, e2b_target.a)
    remember(sbx)
    return sbx


def test_a_pod_sandbox_runs_commands_files_and_processes(e2b_target, registry):
    sbx = make(e2b_target, registry, envs={"GREETING": "hi there"}, metadata={"who": "k8s"})
    info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    assert info.metadata.get("backend") == "kubernetes"
    assert info.metadata.get("who") == "k8s"
    # Commands run in the Pod as the sandbox's user, in its home.
    r = sbx.commands.run("id -u; echo $HOME; pwd; echo $GREETING")
    assert r.stdout.split("\n")[:4] == ["1000", "/home/user", "/home/user", "hi there"], r.stdout
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr) == ("out\n", "err\n")
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("exit 3")
    assert e.value.exit_code == 3
    r = sbx.commands.run("echo $X; pwd", envs={"X": "per-command"}, cwd="/tmp")
    assert r.stdout == "per-command\n/tmp\n"
    # The root filesystem is the image's, read-only; the home is writable.
    with pytest.raises(CommandExitException):
        sbx.commands.run("touch /nanoclaw-root-write")
    # Files through /files and the filesystem RPCs.
    token = uuid.uuid4().hex
    sbx.files.write("/home/user/who.txt", f"k8s {token}")
    sbx.files.write("/home/user/bin.dat", b"\x00\xffbinary")
    assert sbx.files.read("/home/user/who.txt") == f"k8s {token}"
    assert sbx.files.read("/home/user/bin.dat", format="bytes") == b"\x00\xffbinary"
    sbx.files.make_dir("/home/user/sub")
    sbx.files.rename("/home/user/sub", "/home/user/sub2")
    assert sbx.files.get_info("/home/user/sub2").type.value == "dir"
    names = {e.name for e in sbx.files.list("/home/user")}
    assert {"who.txt", "bin.dat", "sub2"} <= names, names
    assert sbx.commands.run("cat /home/user/who.txt").stdout == f"k8s {token}"
    sbx.files.remove("/home/user/sub2")
    assert not sbx.files.exists("/home/user/sub2")
    # A background process with stdin that stays open: fed, then closed,
    # and it ends by itself with everything it was sent.
    h = sbx.commands.run("cat; echo closed", background=True, stdin=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "ping\n")
    sbx.commands.send_stdin(h.pid, "x" * 200_000 + "\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "ping\n" + "x" * 200_000 + "\nclosed\n"
    assert r.exit_code == 0
    # A background process killed.
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "pong\n")
    assert "pong" in read_until(h, "pong"), "cat never echoed its stdin"
    sbx.commands.kill(h.pid)
    with pytest.raises(CommandExitException) as e:
        h.wait()
    assert e.value.exit_code == -1, e.value
    assert h.pid not in [p.pid for p in sbx.commands.list()]
    # Started in the background and connected to again.
    h = sbx.commands.run("sleep 0.5; echo done", background=True)
    assert sbx.commands.connect(h.pid).wait().stdout == "done\n"
    # The timeout moves later, and connect works.
    sbx.set_timeout(600)
    later = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    assert later.end_at > info.end_at
    again = Sandbox.connect(sbx.sandbox_id, **e2b_target.a)
    assert again.commands.run("echo again").stdout == "again\n"
    # Another tenant does not see it.
    with pytest.raises(Exception):
        Sandbox.connect(sbx.sandbox_id, **e2b_target.b).commands.run("true")
    assert sbx.sandbox_id not in {i.sandbox_id for i in Sandbox.list(**e2b_target.b).next_items()}
    assert sbx.sandbox_id in {i.sandbox_id for i in Sandbox.list(**e2b_target.a).next_items()}
    sbx.kill()
    listed = {i.sandbox_id for i in Sandbox.list(**e2b_target.a).next_items()}
    assert sbx.sandbox_id not in listed


def test_what_the_backend_cannot_do_is_refused_by_name(e2b_target, registry):
    # Egress is nanoclaw's proxy, which does not run next to a Pod.
    with pytest.raises(SandboxException) as e:
        make(e2b_target, registry, allow_internet_access=True)
    assert "the kubernetes backend" in str(e.value), str(e.value)
    sbx = make(e2b_target, registry, allow_internet_access=False)
    with pytest.raises(SandboxException) as e:
        sbx.beta_pause()
    assert "the kubernetes backend" in str(e.value) and "pausing" in str(e.value), str(e.value)
    assert sbx.commands.run("echo fine").stdout == "fine\n"
    sbx.kill()


def test_two_replicas_serve_the_same_sandboxes(e2b_target, registry):
    """Made through replica A, used, listed and killed through replica B."""
    url_b = os.environ.get(ENV_REPLICA, "")
    if not url_b:
        pytest.skip(f"{ENV_REPLICA} is not set (only the replicas test sets it)")
    via_b = {**e2b_target.a, "api_url": url_b, "sandbox_url": url_b}
    sbx = make(e2b_target, registry, metadata={"via": "a"})
    sid = sbx.sandbox_id
    # B finds it in the cluster: commands, files, info, the timeout.
    b = Sandbox.connect(sid, **via_b)
    assert b.commands.run("echo from b").stdout == "from b\n"
    b.files.write("/home/user/b.txt", "written by b")
    assert sbx.files.read("/home/user/b.txt") == "written by b"
    assert sbx.commands.run("echo from a").stdout == "from a\n"
    info_b = Sandbox.get_info(sid, **via_b)
    assert info_b.metadata.get("via") == "a" and info_b.metadata.get("backend") == "kubernetes"
    b.set_timeout(900)
    info_a = Sandbox.get_info(sid, **e2b_target.a)
    assert info_a.end_at == Sandbox.get_info(sid, **via_b).end_at, "the end is the cluster's"
    assert info_a.end_at > info_b.end_at
    # Both list it, once each.
    for opts in (e2b_target.a, via_b):
        ids = [i.sandbox_id for i in Sandbox.list(**opts).next_items()]
        assert ids.count(sid) == 1, ids
    # Another tenant gets 404 from either replica.
    for url in (e2b_target.api_url, url_b):
        opts = {**e2b_target.b, "api_url": url, "sandbox_url": url}
        with pytest.raises(Exception):
            Sandbox.connect(sid, **opts).commands.run("true")
    # Killed through B: gone for A too.
    b.kill()
    for opts in (e2b_target.a, via_b):
        assert sid not in {i.sandbox_id for i in Sandbox.list(**opts).next_items()}
    with pytest.raises(Exception):
        sbx.commands.run("true")


def test_the_namespace_quota_bounds_a_tenant_across_replicas(e2b_target, registry):
    """Tenant B may have one sandbox. Replica A counts the one it made and
    refuses a second itself; replica B counts none of its own, so the
    cluster's ResourceQuota in B's namespace refuses it — the same 429."""
    url_b = os.environ.get(ENV_REPLICA, "")
    if not url_b:
        pytest.skip(f"{ENV_REPLICA} is not set (only the replicas test sets it)")
    first = Sandbox.create(template=template(), timeout=300, **e2b_target.b)
    registry.add(first, e2b_target.b)
    remember(first)
    refusals = []
    for url in (e2b_target.api_url, url_b):
        opts = {**e2b_target.b, "api_url": url, "sandbox_url": url}
        with pytest.raises(RateLimitException) as e:
            registry.add(Sandbox.create(template=template(), timeout=300, **opts), opts)
        refusals.append(str(e.value))
    assert "quota exceeded: concurrent sandboxes" in refusals[0], refusals
    assert "quota exceeded: concurrent sandboxes" in refusals[1], refusals
    assert "exceeded quota" in refusals[1] and "pods" in refusals[1], refusals
    first.kill()
