"""Sandboxes of several backends side by side in one `nanoclaw serve`, driven
by the unmodified `e2b` SDK: templates name the backend (`nanoclaw serve
--template dk=docker:IMAGE --template gv=gvisor`), and each sandbox runs
commands, reads and writes files and is killed through the same API.

Run by crates/cli/tests/serve_backends.rs, which starts the daemon and then
checks that nothing is left behind (no container, no runsc state). Settings
(besides conftest.py's):

    NANOCLAW_BACKEND_TEMPLATES   "native=base,docker=dk[,gvisor=gv]"
    NANOCLAW_BACKEND_IDS         a file the sandbox ids made here are appended to
"""

from __future__ import annotations

import os
import uuid

import pytest
from e2b import Sandbox
from e2b import CommandExitException, SandboxException

from helpers import read_until

ENV_TEMPLATES = "NANOCLAW_BACKEND_TEMPLATES"


def templates() -> dict:
    spec = os.environ.get(ENV_TEMPLATES, "")
    if not spec:
        pytest.skip(f"{ENV_TEMPLATES} is not set (serve_backends.rs sets it)")
    return dict(pair.split("=", 1) for pair in spec.split(","))


def remember(sbx) -> None:
    path = os.environ.get("NANOCLAW_BACKEND_IDS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(sbx.sandbox_id + "\n")


def make(e2b_target, registry, template: str, **kw):
    sbx = Sandbox.create(template=template, timeout=120, **e2b_target.a, **kw)
    registry.add(sbx, e2b_target.a)
    remember(sbx)
    return sbx


def kernel_of(sbx) -> str:
    """What the sandbox's kernel says about itself: gVisor's answers dmesg
    with its own boot log; Docker's containers carry /.dockerenv."""
    r = sbx.commands.run(
        "if dmesg 2>/dev/null | grep -q gVisor; then echo gvisor; "
        "elif [ -e /.dockerenv ]; then echo docker; else echo native; fi"
    )
    return r.stdout.strip()


def test_backends_side_by_side_run_commands_files_and_processes(e2b_target, registry):
    made = {b: make(e2b_target, registry, t) for b, t in templates().items()}
    token = uuid.uuid4().hex
    for backend, sbx in made.items():
        # Each reports the backend that runs it, from inside and through the API.
        assert kernel_of(sbx) == backend
        info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
        if backend != "native":
            assert info.metadata.get("backend") == backend
        # The timeout moves later (within the tenant's quota), and connect works.
        sbx.set_timeout(600)
        later = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
        assert later.end_at > info.end_at
        again = Sandbox.connect(sbx.sandbox_id, **e2b_target.a)
        assert again.commands.run("echo again").stdout == "again\n"
        r = sbx.commands.run("id -u; echo $HOME; pwd")
        assert r.exit_code == 0
        assert r.stdout.split() == ["1000", "/home/user", "/home/user"], r.stdout
        # Output on both streams, exit codes as envd reports them.
        r = sbx.commands.run("echo out; echo err >&2")
        assert (r.stdout, r.stderr) == ("out\n", "err\n")
        with pytest.raises(CommandExitException) as e:
            sbx.commands.run("exit 3")
        assert e.value.exit_code == 3
        # Files through /files and the filesystem RPCs.
        sbx.files.write("/home/user/who.txt", f"{backend} {token}")
        sbx.files.write(f"/home/user/only-{backend}", b"\x00\xffbinary")
        sbx.files.make_dir("/home/user/sub")
        sbx.files.rename("/home/user/sub", "/home/user/sub2")
        assert sbx.files.get_info("/home/user/sub2").type.value == "dir"
    for backend, sbx in made.items():
        # Isolated: each sees its own file, none of the others'.
        assert sbx.files.read("/home/user/who.txt") == f"{backend} {token}"
        assert sbx.files.read(f"/home/user/only-{backend}", format="bytes") == b"\x00\xffbinary"
        names = {e.name for e in sbx.files.list("/home/user")}
        others = {f"only-{b}" for b in made if b != backend}
        assert f"only-{backend}" in names and not names & others, names
        r = sbx.commands.run("cat /home/user/who.txt")
        assert r.stdout == f"{backend} {token}"
        sbx.files.remove("/home/user/sub2")
        assert not sbx.files.exists("/home/user/sub2")
    for backend, sbx in made.items():
        # A background process with stdin: listed, fed, connected to, killed.
        h = sbx.commands.run("cat", background=True, stdin=True)
        assert h.pid in [p.pid for p in sbx.commands.list()]
        sbx.commands.send_stdin(h.pid, "ping\n")
        # Kill only once the echo came back: a kill racing cat's read of its
        # stdin loses output cat never produced (seen on gVisor in CI).
        # wait() below goes on with the same event stream.
        assert "ping" in read_until(h, "ping"), (backend, "cat never echoed its stdin")
        sbx.commands.kill(h.pid)
        with pytest.raises(CommandExitException) as e:
            h.wait()
        assert "ping" in e.value.stdout, backend
        assert e.value.exit_code == -1, (backend, e.value)
        assert h.pid not in [p.pid for p in sbx.commands.list()]
        # A process started in the background and connected to again.
        h = sbx.commands.run("sleep 0.5; echo done", background=True)
        again = sbx.commands.connect(h.pid)
        assert again.wait().stdout == "done\n"
    for sbx in made.values():
        sbx.kill()
    ids = {s.sandbox_id for s in made.values()}
    listed = {i.sandbox_id for i in Sandbox.list(**e2b_target.a).next_items()}
    assert not ids & listed


def test_what_a_backend_cannot_do_is_refused_by_name(e2b_target, registry):
    for backend, template in templates().items():
        if backend == "native":
            continue
        # (Egress is theirs too: test_serve_backends_egress.py.)
        sbx = make(e2b_target, registry, template, allow_internet_access=False)
        with pytest.raises(SandboxException) as e:
            sbx.beta_pause()
        assert f"the {backend} backend" in str(e.value) and "pausing" in str(e.value), str(e.value)
        # Still running and usable after the refusal.
        assert sbx.commands.run("echo fine").stdout == "fine\n"
        sbx.kill()
