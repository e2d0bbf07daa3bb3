"""A micro-VM template in `nanoclaw serve` (`--template vm=microvm`), driven by
the unmodified `e2b` SDK: the sandbox is a QEMU microvm with nanoclaw's native
sandbox inside (its own kernel), and it creates, runs commands, writes and
reads files, feeds a running command's stdin and is killed through the same
API as every other template.

Run by crates/cli/tests/serve_backends.rs, which starts the daemon and then
checks that nothing of the VM is left (no holder, QEMU, virtiofsd or state
directory). Settings (besides conftest.py's):

    NANOCLAW_MICROVM_TEMPLATE   the template's name (e.g. "vm")
    NANOCLAW_MICROVM_KERNEL     the guest kernel's release (`uname -r` inside)
    NANOCLAW_BACKEND_IDS        a file the sandbox ids made here are appended to
"""

from __future__ import annotations

import os
import uuid

import pytest
from e2b import CommandExitException, Sandbox, SandboxException

from helpers import read_until

# A VM boots in seconds under software emulation (TCG), more on a loaded
# machine: every request of this sandbox may take that long.
REQUEST_TIMEOUT = 300


def template() -> str:
    name = os.environ.get("NANOCLAW_MICROVM_TEMPLATE", "")
    if not name:
        pytest.skip("NANOCLAW_MICROVM_TEMPLATE is not set (serve_backends.rs sets it)")
    return name


def remember(sbx) -> None:
    path = os.environ.get("NANOCLAW_BACKEND_IDS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(sbx.sandbox_id + "\n")


def test_a_microvm_template_runs_commands_and_files(e2b_target, registry):
    sbx = Sandbox.create(
        template=template(),
        timeout=300,
        allow_internet_access=False,
        request_timeout=REQUEST_TIMEOUT,
        **e2b_target.a,
    )
    registry.add(sbx, e2b_target.a)
    remember(sbx)
    info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    assert info.metadata.get("backend") == "microvm", info.metadata

    # Its own kernel (the pinned guest's, not the host's); E2B's user and home.
    r = sbx.commands.run("uname -r; id -u; echo $HOME; pwd")
    kernel, uid, home, cwd = r.stdout.split()
    assert kernel == os.environ["NANOCLAW_MICROVM_KERNEL"], r.stdout
    assert kernel != os.uname().release
    assert (uid, home, cwd) == ("1000", "/home/user", "/home/user"), r.stdout
    # nanoclaw's native sandbox inside the VM: seccomp and no_new_privs.
    r = sbx.commands.run("grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status")
    assert "Seccomp:\t2" in r.stdout and "NoNewPrivs:\t1" in r.stdout, r.stdout

    # Both streams and exit codes as envd reports them.
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("exit 3")
    assert e.value.exit_code == 3

    # Files in and out, text and bytes, through /files and the filesystem RPCs.
    token = uuid.uuid4().hex
    sbx.files.write("/home/user/note.txt", token)
    sbx.files.write("/home/user/blob", b"\x00\xffbinary")
    assert sbx.files.read("/home/user/note.txt") == token
    assert sbx.files.read("/home/user/blob", format="bytes") == b"\x00\xffbinary"
    assert sbx.commands.run("cat /home/user/note.txt").stdout == token
    names = {e.name for e in sbx.files.list("/home/user")}
    assert {"note.txt", "blob"} <= names, names
    # The host's /usr is shared read-only into the guest.
    r = sbx.commands.run("touch /usr/x 2>&1; echo $?")
    assert r.stdout.strip().endswith("1"), r.stdout

    # Stdin written to a command while it runs (SendInput, CloseStdin): the
    # guest starts it at once and feeds it what comes, in order; the echo
    # of the first line comes back before the second is sent.
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "ping\n")
    assert "ping" in read_until(h, "ping"), "cat never echoed its stdin"
    sbx.commands.send_stdin(h.pid, "pong\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.exit_code == 0 and r.stdout == "ping\npong\n", r
    # A closed stdin takes nothing more (refused, not dropped in silence),
    # while the command still runs.
    h = sbx.commands.run("cat; echo eof; sleep 30", background=True, stdin=True)
    sbx.commands.close_stdin(h.pid)
    assert "eof" in read_until(h, "eof")
    with pytest.raises(SandboxException):
        sbx.commands.send_stdin(h.pid, "late\n")
    sbx.commands.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()
    # Killed while it waits for more.
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "x\n")
    assert "x" in read_until(h, "x")
    sbx.commands.kill(h.pid)
    with pytest.raises(CommandExitException) as e:
        h.wait()
    assert e.value.exit_code == -1, e.value

    sbx.kill()
    listed = {i.sandbox_id for i in Sandbox.list(**e2b_target.a).next_items()}
    assert sbx.sandbox_id not in listed
