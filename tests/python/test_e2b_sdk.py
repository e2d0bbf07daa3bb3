"""E2B SDK compatibility: the unmodified PyPI `e2b` SDK against `nanoclaw serve`.

Settings (see conftest.py): NANOCLAW_E2B_API_URL, NANOCLAW_E2B_API_KEY,
NANOCLAW_E2B_API_KEY_B [, NANOCLAW_E2B_SANDBOX_URL, NANOCLAW_E2B_TEMPLATE].
Without them the whole module is skipped, unless NANOCLAW_REQUIRE_E2B=1.

Run:
    VENV=$(.ci/python-venv.sh | tail -1)
    NANOCLAW_E2B_API_URL=http://127.0.0.1:PORT NANOCLAW_E2B_API_KEY=... \
    NANOCLAW_E2B_API_KEY_B=... $VENV/bin/pytest tests/python -v

The expected wire behaviour is documented in docs/e2b-wire.md.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
import uuid

import pytest

from conftest import missing_settings, require_e2b, skip_message

# Without a daemon to test, every test of this module is skipped with the
# reason below (collected, so pytest exits 0 rather than 5 "no tests").
# NANOCLAW_REQUIRE_E2B=1 turns the missing settings into failures instead
# (the e2b_target fixture fails every test).
pytestmark = pytest.mark.skipif(
    bool(missing_settings()) and not require_e2b(),
    reason=skip_message(missing_settings()),
)

if require_e2b():
    import e2b  # noqa: F401  (a missing SDK is a failure when the suite is required)
else:
    pytest.importorskip("e2b", reason="the e2b SDK is not installed: run .ci/python-venv.sh")

from e2b import (  # noqa: E402
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b.exceptions import SandboxNotRunningException  # noqa: E402

try:  # the filesystem module's own subclass of NotFoundException
    from e2b.exceptions import FileNotFoundException  # noqa: E402
except ImportError:  # pragma: no cover - older SDKs
    FileNotFoundException = NotFoundException

# What "this sandbox does not exist (for you)" may look like on the data
# plane: E2B's proxy answers 502 "… was not found" (SandboxNotRunningException);
# a Connect not_found gives NotFoundException. Both are accepted.
GONE = (NotFoundException, SandboxNotRunningException)


def require_sdk(obj, name: str):
    """Skip the test when the pinned SDK lacks a call."""
    if not hasattr(obj, name):
        pytest.skip(f"the pinned e2b SDK has no {type(obj).__name__ if not isinstance(obj, type) else obj.__name__}.{name}")
    return getattr(obj, name)


def pause_fn(sbx):
    for name in ("pause", "beta_pause"):
        if hasattr(sbx, name):
            return getattr(sbx, name)
    pytest.skip("the pinned e2b SDK has neither Sandbox.pause nor Sandbox.beta_pause")


def wait_until(pred, timeout=10.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def list_all(query, opts, limit=None):
    paginator = Sandbox.list(query=query, limit=limit, **opts)
    out = []
    pages = 0
    while paginator.has_next and pages < 50:
        out.extend(paginator.next_items())
        pages += 1
    return out


# ---------------------------------------------------------------------------
# lifecycle


def test_create_with_metadata_and_envs(make_sandbox, e2b_target):
    sbx = make_sandbox(
        timeout=120,
        metadata={"purpose": "create test", "odd": "a b&c=d/é"},
        envs={"NANOCLAW_E2B_A": "hello world", "NANOCLAW_E2B_B": "x=y"},
    )
    assert sbx.sandbox_id
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata.get("purpose") == "create test"
    assert info.metadata.get("odd") == "a b&c=d/é"
    assert info.metadata.get("run") == e2b_target.run_id
    assert info.state == SandboxState.RUNNING
    assert info.end_at > info.started_at
    r = sbx.commands.run('printf "%s|%s" "$NANOCLAW_E2B_A" "$NANOCLAW_E2B_B"')
    assert r.stdout == "hello world|x=y"


def test_per_command_envs_override_sandbox_envs(sandbox):
    r = sandbox.commands.run('echo "$NANOCLAW_SANDBOX_ENV"')
    assert r.stdout == "from-create\n"
    r = sandbox.commands.run('echo "$NANOCLAW_SANDBOX_ENV $ONLY_HERE"',
                             envs={"NANOCLAW_SANDBOX_ENV": "overridden", "ONLY_HERE": "1"})
    assert r.stdout == "overridden 1\n"


def test_connect_from_second_client_sees_same_sandbox(sandbox, e2b_target):
    sandbox.files.write("/tmp/connect-check.txt", "shared state")
    other = Sandbox.connect(sandbox.sandbox_id, **e2b_target.a)
    assert other.sandbox_id == sandbox.sandbox_id
    assert other.files.read("/tmp/connect-check.txt") == "shared state"
    assert other.commands.run("cat /tmp/connect-check.txt").stdout == "shared state"


def test_is_running(sandbox):
    assert sandbox.is_running() is True


def test_invalid_api_key_is_rejected(e2b_target):
    with pytest.raises(AuthenticationException):
        Sandbox.create(template=e2b_target.template, timeout=30,
                       **e2b_target.opts("e2b_" + "0" * 40))


def test_list_with_metadata_filter_and_paging(make_sandbox, e2b_target):
    tag = uuid.uuid4().hex[:8]
    s1 = make_sandbox(metadata={"listtag": tag, "which": "one"})
    s2 = make_sandbox(metadata={"listtag": tag, "which": "two & more"})
    s3 = make_sandbox(metadata={"listtag": tag + "-other"})

    both = list_all(SandboxQuery(metadata={"run": e2b_target.run_id, "listtag": tag}), e2b_target.a)
    ids = [s.sandbox_id for s in both]
    assert sorted(ids) == sorted([s1.sandbox_id, s2.sandbox_id])
    assert s3.sandbox_id not in ids
    for s in both:
        assert s.metadata["listtag"] == tag
        assert s.state == SandboxState.RUNNING

    only_two = list_all(SandboxQuery(metadata={"listtag": tag, "which": "two & more"}), e2b_target.a)
    assert [s.sandbox_id for s in only_two] == [s2.sandbox_id]

    # Paging: one per page, every sandbox exactly once.
    paged = list_all(SandboxQuery(metadata={"listtag": tag}), e2b_target.a, limit=1)
    assert sorted(s.sandbox_id for s in paged) == sorted([s1.sandbox_id, s2.sandbox_id])

    running = list_all(SandboxQuery(metadata={"listtag": tag}, state=[SandboxState.RUNNING]), e2b_target.a)
    assert len(running) == 2


def test_set_timeout_extends(make_sandbox):
    sbx = make_sandbox(timeout=60)
    before = sbx.get_info().end_at
    sbx.set_timeout(900)
    after = sbx.get_info().end_at
    assert (after - before).total_seconds() > 600, (before, after)
    # and shortening works too (E2B semantics: the deadline is set, not maxed)
    sbx.set_timeout(120)
    shorter = sbx.get_info().end_at
    assert shorter < after


def test_sandbox_expires_at_its_timeout(make_sandbox):
    sbx = make_sandbox(timeout=3)
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    # E2B kills a sandbox whose timeout ran out (default lifecycle: kill).
    gone = wait_until(lambda: _is_gone(sbx), timeout=20, interval=0.5)
    assert gone, "sandbox still reachable 20 s after its 3 s timeout"


def _is_gone(sbx) -> bool:
    try:
        sbx.get_info()
        return False
    except NotFoundException:
        return True


def test_kill_then_everything_is_not_found(make_sandbox, e2b_target):
    sbx = make_sandbox()
    sbx.files.write("/tmp/before-kill.txt", "x")
    assert sbx.kill() is True
    assert sbx.kill() is False  # already gone: 404 -> False
    with pytest.raises(NotFoundException):
        sbx.get_info()
    with pytest.raises(NotFoundException):
        sbx.set_timeout(60)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id, **e2b_target.a)
    with pytest.raises(GONE):
        sbx.commands.run("echo should-not-run")
    with pytest.raises(GONE):
        sbx.files.read("/tmp/before-kill.txt")
    with pytest.raises(GONE):
        sbx.files.list("/tmp")
    listed = list_all(SandboxQuery(metadata={"run": e2b_target.run_id}), e2b_target.a)
    assert sbx.sandbox_id not in [s.sandbox_id for s in listed]
    try:
        assert sbx.is_running() is False
    except GONE:
        pass


def test_pause_resume_keeps_files(make_sandbox, e2b_target):
    sbx = make_sandbox()
    pause = pause_fn(sbx)
    sbx.files.write("/home/user/keep.txt", "survives pause")
    sbx.commands.run("mkdir -p /tmp/pz && echo from-shell > /tmp/pz/shell.txt")
    assert pause() is True
    info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    assert info.state == SandboxState.PAUSED
    paused = list_all(SandboxQuery(metadata={"run": e2b_target.run_id}, state=[SandboxState.PAUSED]), e2b_target.a)
    assert sbx.sandbox_id in [s.sandbox_id for s in paused]
    running = list_all(SandboxQuery(metadata={"run": e2b_target.run_id}, state=[SandboxState.RUNNING]), e2b_target.a)
    assert sbx.sandbox_id not in [s.sandbox_id for s in running]
    assert pause() is False  # already paused: 409 -> False

    resumed = Sandbox.connect(sbx.sandbox_id, **e2b_target.a)  # connect resumes a paused sandbox
    assert resumed.get_info().state == SandboxState.RUNNING
    assert resumed.files.read("/home/user/keep.txt") == "survives pause"
    assert resumed.commands.run("cat /tmp/pz/shell.txt").stdout == "from-shell\n"
    # the original object keeps working after the resume
    assert sbx.files.read("/home/user/keep.txt") == "survives pause"


def test_get_metrics_returns_numbers(sandbox):
    get_metrics = require_sdk(sandbox, "get_metrics")
    sandbox.commands.run("true")
    metrics = wait_until(lambda: get_metrics(), timeout=15, interval=1.0)
    assert metrics, "get_metrics() stayed empty for 15 s"
    m = metrics[-1]
    for field in ("cpu_count", "cpu_used_pct", "mem_used", "mem_total", "disk_used", "disk_total"):
        assert isinstance(getattr(m, field), (int, float)), field
    assert m.cpu_count >= 1
    assert m.mem_total > 0
    assert 0 <= m.cpu_used_pct
    assert 0 <= m.mem_used <= m.mem_total


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_egress_denial_is_counted_and_audited(sandbox, e2b_target):
    """A connection the egress policy refuses (a private address, through
    the sandbox's proxy) shows in /metrics and as an egress_denial audit
    record of this sandbox, with its destination and reason."""
    import httpx

    headers = {"X-API-Key": e2b_target.key_a}
    before = _metric(httpx.get(e2b_target.api_url + "/metrics", headers=headers).text,
                     "nanoclaw_egress_denials_total")
    # 10.255.255.1 is private: the proxy refuses it before connecting
    # (nothing leaves the machine). curl honours the sandbox's proxy
    # variables; -f turns the proxy's 403 into a failure.
    with pytest.raises(CommandExitException):
        sandbox.commands.run("curl -fsS -m 5 http://10.255.255.1:81/ -o /dev/null")
    after = _metric(httpx.get(e2b_target.api_url + "/metrics", headers=headers).text,
                    "nanoclaw_egress_denials_total")
    assert after >= before + 1, (before, after)
    recs = httpx.get(
        e2b_target.api_url + "/v1/audit",
        params={"sandbox": sandbox.sandbox_id, "kind": "egress_denial"},
        headers=headers,
    ).json()
    assert recs, "no egress_denial record for the sandbox"
    assert any("10.255.255.1:81" in (r.get("detail") or "") for r in recs), recs
    # Recorded once, not again with the next command's end.
    sandbox.commands.run("true")
    again = httpx.get(
        e2b_target.api_url + "/v1/audit",
        params={"sandbox": sandbox.sandbox_id, "kind": "egress_denial"},
        headers=headers,
    ).json()
    assert len(again) == len(recs), again


_NET_PROBE = r"""
c() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }
echo "a:$(c http://a.test/)"
echo "b:$(c http://b.test/)"
python3 - <<'PY'
import socket, struct
m = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x09localhost\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(m, ("127.0.0.1", 53))
print("dns-localhost:%d" % (s.recv(512)[3] & 15))
PY
"""


def _probe(sbx) -> dict:
    out = sbx.commands.run(_NET_PROBE, timeout=60).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def test_update_network_applies_live_and_is_audited(make_sandbox, e2b_target):
    """Sandbox.update_network (PUT /sandboxes/{id}/network) replaces the
    rules of the running sandbox: its proxy and its DNS follow at once, the
    sandbox (and what runs in it) stays. The proxy's answers tell allowed
    from refused without any traffic leaving the machine: a refused name
    gets 403 from the proxy, an allowed one that does not resolve 502; the
    sandbox's DNS answers NXDOMAIN (3) for a name it does not allow, and
    NOERROR (0, with no address: loopback is never handed out) for an
    allowed one."""
    import httpx
    from e2b import ALL_TRAFFIC

    update_network = require_sdk(Sandbox, "update_network")
    sbx = make_sandbox(network={"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC]})
    sbx.commands.run("echo kept > /tmp/marker; sleep 600 >/dev/null 2>&1 &", timeout=10)
    pid = sbx.commands.run("pgrep -x sleep", timeout=10).stdout.strip()
    before = _probe(sbx)
    assert (before["a"], before["b"], before["dns-localhost"]) == ("502", "403", "3"), before

    sbx.update_network({"allow_out": ["b.test", "localhost"]})
    after = _probe(sbx)
    assert (after["a"], after["b"], after["dns-localhost"]) == ("403", "502", "0"), after

    update_network(sbx.sandbox_id, {"allow_internet_access": False}, **e2b_target.a)
    off = _probe(sbx)
    assert (off["a"], off["b"], off["dns-localhost"]) == ("403", "403", "3"), off

    # The same sandbox, files and processes included.
    assert sbx.commands.run("cat /tmp/marker", timeout=10).stdout == "kept\n"
    assert sbx.commands.run("pgrep -x sleep", timeout=10).stdout.strip() == pid
    info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    assert info.sandbox_id == sbx.sandbox_id

    recs = httpx.get(
        e2b_target.api_url + "/v1/audit",
        params={"sandbox": sbx.sandbox_id, "kind": "network_update"},
        headers={"X-API-Key": e2b_target.key_a},
    ).json()
    assert len(recs) == 2, recs
    assert any("b.test" in (r.get("detail") or "") for r in recs), recs


def test_update_network_refusals_are_json_4xx(make_sandbox, e2b_target):
    """Bad input gets one clear 4xx with a JSON body; another tenant's
    sandbox does not exist; a sandbox made without internet access has no
    proxy to update (409, saying why); nothing changes."""
    import httpx

    sbx = make_sandbox(network={"allow_out": ["a.test"], "deny_out": ["0.0.0.0/0"]})
    offline = make_sandbox(allow_internet_access=False)
    url = e2b_target.api_url + "/sandboxes/{}/network"
    key_a = {"X-API-Key": e2b_target.key_a}
    cases = [
        (sbx.sandbox_id, key_a, {"allowOut": ["10.0.0.1"]}, 400, "only public addresses"),
        (sbx.sandbox_id, key_a, {"allowOut": ["127.0.0.1:80"]}, 400, "only public addresses"),
        (sbx.sandbox_id, key_a, {"allowOut": ["bad host!"]}, 400, "bad host!"),
        (sbx.sandbox_id, key_a, {"egressProxy": {"address": "1.2.3.4:1080"}}, 400, "egressProxy"),
        (sbx.sandbox_id, key_a, {"denyOut": ["1.2.3.4"]}, 400, "denyOut"),
        (sbx.sandbox_id, {"X-API-Key": e2b_target.key_b}, {"allowOut": ["b.test"]}, 404, "not found"),
        ("nosuchsandbox", key_a, {"allowOut": ["b.test"]}, 404, "not found"),
        (offline.sandbox_id, key_a, {"allowOut": ["b.test"]}, 409, "created with no network"),
    ]
    for sid, headers, body, status, needle in cases:
        r = httpx.put(url.format(sid), json=body, headers=headers)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()
        assert err["code"] == status and needle in err["message"], (body, err)
    r = httpx.put(url.format(sbx.sandbox_id), content=b"{nope", headers=key_a)
    assert r.status_code == 400 and "invalid JSON" in r.json()["message"], r.text
    # Nothing was applied: a.test is still the one allowed name.
    still = _probe(sbx)
    assert (still["a"], still["b"]) == ("502", "403"), still


def test_twenty_concurrent_sandboxes(e2b_target, registry):
    def one(i):
        sbx = Sandbox.create(template=e2b_target.template, timeout=120,
                             metadata={"suite": "nanoclaw-e2b", "run": e2b_target.run_id, "test": f"concurrent-{i}"},
                             envs={"N": str(i)}, **e2b_target.a)
        registry.add(sbx, e2b_target.a)
        try:
            r = sbx.commands.run('echo "sandbox $N"')
            return sbx.sandbox_id, r.stdout
        finally:
            sbx.kill()

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert len({sid for sid, _ in results}) == 20
    assert [out for _, out in results] == [f"sandbox {i}\n" for i in range(20)]


# ---------------------------------------------------------------------------
# commands


def test_run_foreground_stdout_stderr_exit_code(shared_sandbox):
    r = shared_sandbox.commands.run("echo out; echo err >&2; printf 'no newline'")
    assert r.exit_code == 0
    assert r.stdout == "out\nno newline"
    assert r.stderr == "err\n"
    assert r.error in (None, "")


def test_nonzero_exit_raises_command_exit_exception(shared_sandbox):
    with pytest.raises(CommandExitException) as ei:
        shared_sandbox.commands.run("echo partial; echo 'it broke' >&2; exit 7")
    e = ei.value
    assert e.exit_code == 7
    assert e.stdout == "partial\n"
    assert e.stderr == "it broke\n"
    assert isinstance(e, SandboxException)


def test_run_with_cwd(shared_sandbox):
    shared_sandbox.files.make_dir("/tmp/cwd-test")
    r = shared_sandbox.commands.run("pwd", cwd="/tmp/cwd-test")
    assert r.stdout == "/tmp/cwd-test\n"


def test_default_cwd_is_home(shared_sandbox):
    assert shared_sandbox.commands.run("pwd").stdout == "/home/user\n"


def test_run_as_root_and_as_user(shared_sandbox):
    if os.environ.get("NANOCLAW_E2B_ROOTLESS", "") == "1":
        # A rootless daemon's sandboxes have a single user: asking for root
        # is refused with a clear error, never silently run as someone else.
        with pytest.raises(Exception, match="rootful"):
            shared_sandbox.commands.run("id -u", user="root")
    else:
        assert shared_sandbox.commands.run("id -u", user="root").stdout.strip() == "0"
    uid = shared_sandbox.commands.run("id -u", user="user").stdout.strip()
    assert uid.isdigit() and uid != "0"


def test_utf8_output_split_across_chunks(shared_sandbox):
    # 2000 multi-byte characters, written in odd-sized pieces
    r = shared_sandbox.commands.run("for i in $(seq 1 200); do printf 'héllo wörld'; done; echo")
    assert r.stdout == "héllo wörld" * 200 + "\n"


def test_large_output(shared_sandbox):
    r = shared_sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' 'a'; echo")
    assert len(r.stdout) == 3_000_001
    assert set(r.stdout[:-1]) == {"a"}


def test_background_wait(shared_sandbox):
    h = shared_sandbox.commands.run("sleep 1; echo done", background=True)
    assert isinstance(h.pid, int) and h.pid > 0
    r = h.wait()
    assert r.exit_code == 0
    assert r.stdout == "done\n"


def test_background_kill(shared_sandbox):
    h = shared_sandbox.commands.run("sleep 120", background=True, timeout=0)
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code != 0
    assert wait_until(lambda: h.pid not in [p.pid for p in shared_sandbox.commands.list()], timeout=10)


def test_on_stdout_callbacks_stream_in_order(shared_sandbox):
    chunks, times, errs = [], [], []

    def on_out(s):
        chunks.append(s)
        times.append(time.monotonic())

    r = shared_sandbox.commands.run(
        "for i in 1 2 3 4 5; do echo line$i; echo err$i >&2; sleep 0.3; done",
        on_stdout=on_out, on_stderr=errs.append)
    assert "".join(chunks) == "".join(f"line{i}\n" for i in range(1, 6))
    assert "".join(errs) == "".join(f"err{i}\n" for i in range(1, 6))
    assert r.stdout == "".join(chunks)
    # streamed, not delivered in one piece at the end
    assert len(chunks) >= 3, chunks
    assert times[-1] - times[0] >= 0.6, "stdout callbacks all arrived at once: output is not streamed"


def test_command_timeout_raises_timeout_exception(shared_sandbox):
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        shared_sandbox.commands.run("sleep 60; echo never", timeout=2)
    assert time.monotonic() - t0 < 20
    # envd semantics: the deadline kills the process too
    assert wait_until(
        lambda: not any("sleep 60; echo never" in " ".join(p.args) for p in shared_sandbox.commands.list()),
        timeout=10), "the timed-out process is still running"


def test_send_stdin_to_background_process(shared_sandbox):
    h = shared_sandbox.commands.run("head -n 2", background=True, stdin=True)
    shared_sandbox.commands.send_stdin(h.pid, "first line\n")
    h.send_stdin(b"second line\n")
    r = h.wait()
    assert r.stdout == "first line\nsecond line\n"


def test_close_stdin_ends_cat(shared_sandbox):
    require_sdk(shared_sandbox.commands, "close_stdin")
    h = shared_sandbox.commands.run("cat", background=True, stdin=True)
    shared_sandbox.commands.send_stdin(h.pid, "hello\x00binary\n")
    shared_sandbox.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "hello\x00binary\n"


def test_commands_list_shows_running_background_process(shared_sandbox):
    h = shared_sandbox.commands.run("sleep 45", background=True, envs={"LISTED": "yes"})
    try:
        procs = shared_sandbox.commands.list()
        mine = [p for p in procs if p.pid == h.pid]
        assert mine, f"pid {h.pid} not in {procs}"
        assert "sleep 45" in " ".join([mine[0].cmd] + list(mine[0].args))
    finally:
        h.kill()


def test_commands_connect_to_running_process(shared_sandbox):
    h = shared_sandbox.commands.run("sleep 1.5; echo after-connect", background=True)
    h.disconnect()
    h2 = shared_sandbox.commands.connect(h.pid)
    assert h2.pid == h.pid
    r = h2.wait()
    assert "after-connect" in r.stdout


def test_kill_unknown_pid_returns_false(shared_sandbox):
    assert shared_sandbox.commands.kill(987654) is False


def test_connect_unknown_pid_raises_not_found(shared_sandbox):
    with pytest.raises(NotFoundException):
        shared_sandbox.commands.connect(987654)


# ---------------------------------------------------------------------------
# files


def test_files_text_round_trip(shared_sandbox):
    text = "héllo\nwörld\n" * 3
    info = shared_sandbox.files.write("/home/user/text.txt", text)
    assert info.path == "/home/user/text.txt"
    assert info.name == "text.txt"
    assert shared_sandbox.files.read("/home/user/text.txt") == text
    assert bytes(shared_sandbox.files.read("/home/user/text.txt", format="bytes")) == text.encode()
    # visible to commands too
    assert shared_sandbox.commands.run("cat /home/user/text.txt").stdout == text


def test_files_binary_round_trip_with_nuls(shared_sandbox):
    data = bytes(range(256)) * 64 + b"\x00\x00\xff\x00"
    shared_sandbox.files.write("/tmp/blob.bin", data)
    assert bytes(shared_sandbox.files.read("/tmp/blob.bin", format="bytes")) == data
    stream = shared_sandbox.files.read("/tmp/blob.bin", format="stream")
    assert b"".join(stream) == data
    assert shared_sandbox.commands.run("wc -c < /tmp/blob.bin").stdout.strip() == str(len(data))
    assert shared_sandbox.files.get_info("/tmp/blob.bin").size == len(data)


def test_files_write_octet_stream(shared_sandbox):
    data = b"\x00octet\xff" * 1000
    shared_sandbox.files.write("/tmp/octet.bin", data, use_octet_stream=True)
    assert bytes(shared_sandbox.files.read("/tmp/octet.bin", format="bytes")) == data


def test_files_write_overwrites_and_creates_parents(shared_sandbox):
    shared_sandbox.files.write("/tmp/deep/er/file.txt", "first version, longer")
    shared_sandbox.files.write("/tmp/deep/er/file.txt", "second")
    assert shared_sandbox.files.read("/tmp/deep/er/file.txt") == "second"


def test_relative_paths_resolve_to_home(shared_sandbox):
    info = shared_sandbox.files.write("relative.txt", "rel")
    assert info.path == "/home/user/relative.txt"
    assert shared_sandbox.files.read("/home/user/relative.txt") == "rel"


def test_write_files_many(shared_sandbox):
    write_files = require_sdk(shared_sandbox.files, "write_files")
    infos = write_files([
        {"path": "/tmp/multi/a.txt", "data": "A"},
        {"path": "/tmp/multi/sub/b.bin", "data": b"\x00B\x00"},
        {"path": "/tmp/multi/c.txt", "data": "C" * 10000},
    ])
    assert [i.path for i in infos] == ["/tmp/multi/a.txt", "/tmp/multi/sub/b.bin", "/tmp/multi/c.txt"]
    assert shared_sandbox.files.read("/tmp/multi/a.txt") == "A"
    assert bytes(shared_sandbox.files.read("/tmp/multi/sub/b.bin", format="bytes")) == b"\x00B\x00"
    assert shared_sandbox.files.read("/tmp/multi/c.txt") == "C" * 10000


def test_files_list_with_depth(shared_sandbox):
    from e2b import FileType

    base = "/tmp/listing"
    shared_sandbox.files.write(f"{base}/top.txt", "1")
    shared_sandbox.files.write(f"{base}/d1/mid.txt", "22")
    shared_sandbox.files.write(f"{base}/d1/d2/deep.txt", "333")
    one = {e.path: e for e in shared_sandbox.files.list(base)}
    assert set(one) == {f"{base}/top.txt", f"{base}/d1"}
    assert one[f"{base}/top.txt"].type == FileType.FILE
    assert one[f"{base}/top.txt"].name == "top.txt"
    assert one[f"{base}/top.txt"].size == 1
    assert one[f"{base}/d1"].type == FileType.DIR
    two = {e.path for e in shared_sandbox.files.list(base, depth=2)}
    assert two == {f"{base}/top.txt", f"{base}/d1", f"{base}/d1/mid.txt", f"{base}/d1/d2"}


def test_files_exists_and_get_info(shared_sandbox):
    from e2b import FileType

    shared_sandbox.files.write("/tmp/info/file.txt", "12345")
    assert shared_sandbox.files.exists("/tmp/info/file.txt") is True
    assert shared_sandbox.files.exists("/tmp/info/nope.txt") is False
    fi = shared_sandbox.files.get_info("/tmp/info/file.txt")
    assert fi.type == FileType.FILE
    assert fi.size == 5
    assert fi.name == "file.txt"
    assert fi.path == "/tmp/info/file.txt"
    di = shared_sandbox.files.get_info("/tmp/info")
    assert di.type == FileType.DIR
    with pytest.raises(NotFoundException):
        shared_sandbox.files.get_info("/tmp/info/nope.txt")


def test_files_read_missing_raises_not_found(shared_sandbox):
    with pytest.raises(FileNotFoundException):
        shared_sandbox.files.read("/tmp/definitely-missing.txt")


def test_files_rename(shared_sandbox):
    shared_sandbox.files.write("/tmp/ren/old.txt", "moving")
    info = shared_sandbox.files.rename("/tmp/ren/old.txt", "/tmp/ren/new.txt")
    assert info.path == "/tmp/ren/new.txt"
    assert shared_sandbox.files.exists("/tmp/ren/old.txt") is False
    assert shared_sandbox.files.read("/tmp/ren/new.txt") == "moving"


def test_files_remove(shared_sandbox):
    shared_sandbox.files.write("/tmp/rm/file.txt", "x")
    shared_sandbox.files.write("/tmp/rm/dir/inner.txt", "y")
    shared_sandbox.files.remove("/tmp/rm/file.txt")
    assert shared_sandbox.files.exists("/tmp/rm/file.txt") is False
    shared_sandbox.files.remove("/tmp/rm/dir")  # recursive
    assert shared_sandbox.files.exists("/tmp/rm/dir") is False


def test_files_make_dir(shared_sandbox):
    from e2b import FileType

    assert shared_sandbox.files.make_dir("/tmp/mk/a/b") is True  # parents created
    assert shared_sandbox.files.make_dir("/tmp/mk/a/b") is False  # already exists
    assert shared_sandbox.files.get_info("/tmp/mk/a/b").type == FileType.DIR


def test_watch_dir_sees_a_write(shared_sandbox):
    from e2b import FilesystemEventType

    shared_sandbox.files.make_dir("/tmp/watched")
    handle = shared_sandbox.files.watch_dir("/tmp/watched")
    try:
        shared_sandbox.files.write("/tmp/watched/new.txt", "event")
        events = []

        def seen():
            events.extend(handle.get_new_events())
            return [e for e in events if e.name == "new.txt"]

        mine = wait_until(seen, timeout=10, interval=0.3)
        assert mine, f"no event for new.txt, got {events}"
        assert {e.type for e in mine} & {FilesystemEventType.CREATE, FilesystemEventType.WRITE}
    finally:
        handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()  # the SDK refuses after stop()


# ---------------------------------------------------------------------------
# containment: the files API and commands only ever see the sandbox


HOST_PATH_PROBES = [
    "../../etc/shadow",
    "../../../../../../../../etc/shadow",
    "/etc/shadow",
    "/home/user/../../etc/shadow",
    "/proc/1/root/etc/shadow",
    "/proc/self/root/etc/shadow",
]


def _host_shadow():
    try:
        with open("/etc/shadow") as f:
            return f.read()
    except OSError:
        return None


def _assert_not_host(content, host_text, where):
    if content is None or host_text is None:
        return
    text = content if isinstance(content, str) else bytes(content).decode("utf-8", "replace")
    assert text != host_text, f"{where}: returned the host's file"
    for line in host_text.splitlines():
        # a real password hash of the host must never show up
        parts = line.split(":")
        if len(parts) > 1 and len(parts[1]) > 20:
            assert parts[1] not in text, f"{where}: leaked a host password hash"


@pytest.mark.parametrize("path", HOST_PATH_PROBES)
def test_files_read_cannot_reach_host_etc_shadow(shared_sandbox, path):
    host = _host_shadow()
    try:
        content = shared_sandbox.files.read(path)
    except SandboxException:
        return  # refused: fine
    _assert_not_host(content, host, f"files.read({path!r})")


def test_files_api_cannot_read_host_sentinel(shared_sandbox, host_sentinel):
    path, secret = host_sentinel
    for probe in (path, "../.." + path, "../../../../.." + path, "/proc/1/root" + path):
        try:
            content = shared_sandbox.files.read(probe)
        except SandboxException:
            continue
        assert secret not in content, f"files.read({probe!r}) returned the host's file"


def test_files_api_does_not_follow_symlinks_to_the_host(shared_sandbox, host_sentinel):
    path, secret = host_sentinel
    shared_sandbox.commands.run(
        f"ln -sfn {path} /home/user/link-to-host; ln -sfn /etc /home/user/etc-link; "
        f"ln -sfn / /home/user/root-link")
    for probe in ("/home/user/link-to-host", "/home/user/root-link" + path):
        try:
            content = shared_sandbox.files.read(probe)
        except SandboxException:
            continue
        assert secret not in content, f"files.read({probe!r}) followed a symlink out of the sandbox"
    try:
        content = shared_sandbox.files.read("/home/user/etc-link/shadow")
    except SandboxException:
        content = None
    _assert_not_host(content, _host_shadow(), "files.read via a symlink to /etc")
    # writing through a symlink must not create or change host files
    target = path + "-written"
    shared_sandbox.commands.run(f"ln -sfn {target} /home/user/write-link")
    try:
        shared_sandbox.files.write("/home/user/write-link", "escaped")
    except SandboxException:
        pass
    assert not os.path.exists(target), "files.write through a symlink created a file on the host"
    with open(path) as f:
        assert f.read() == secret + "\n"


def test_files_write_cannot_escape(shared_sandbox, host_sentinel):
    path, secret = host_sentinel
    escape = f"/tmp/nanoclaw-escape-{uuid.uuid4().hex[:10]}"
    for probe in ("../../../../.." + escape, escape, "/proc/1/root" + escape):
        try:
            shared_sandbox.files.write(probe, "escaped")
        except SandboxException:
            pass
    assert not os.path.exists(escape), "a files.write landed on the host"
    try:
        shared_sandbox.files.write(path, "overwritten")
    except SandboxException:
        pass
    with open(path) as f:
        assert f.read() == secret + "\n", "files.write overwrote a host file"


def test_commands_see_a_synthetic_etc(shared_sandbox, host_sentinel):
    path, secret = host_sentinel
    host = _host_shadow()
    r = shared_sandbox.commands.run("cat /etc/shadow 2>/dev/null; true")
    _assert_not_host(r.stdout, host, "cat /etc/shadow")
    r = shared_sandbox.commands.run(f"cat {path} /proc/1/root{path} 2>/dev/null; true")
    assert secret not in r.stdout, "a command read a host file"


# ---------------------------------------------------------------------------
# tenant isolation


def test_tenant_b_cannot_see_or_touch_tenant_a(make_sandbox, e2b_target):
    a = make_sandbox(tenant="a", metadata={"owner": "tenant-a"})
    a.files.write("/tmp/a-secret.txt", "tenant a data")

    with pytest.raises(NotFoundException):
        Sandbox.get_info(a.sandbox_id, **e2b_target.b)
    with pytest.raises(NotFoundException):
        Sandbox.connect(a.sandbox_id, **e2b_target.b)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(a.sandbox_id, 5, **e2b_target.b)
    if hasattr(Sandbox, "pause"):
        with pytest.raises(NotFoundException):
            Sandbox.pause(a.sandbox_id, **e2b_target.b)
    assert Sandbox.kill(a.sandbox_id, **e2b_target.b) is False
    listed_b = list_all(SandboxQuery(metadata={"run": e2b_target.run_id}), e2b_target.b)
    assert a.sandbox_id not in [s.sandbox_id for s in listed_b]
    listed_b_all = list_all(None, e2b_target.b)
    assert a.sandbox_id not in [s.sandbox_id for s in listed_b_all]

    # A is untouched
    assert a.get_info().state == SandboxState.RUNNING
    assert a.commands.run("cat /tmp/a-secret.txt").stdout == "tenant a data"


def _forged(sandbox_id, envd_access_token, opts, template_sbx):
    """An SDK Sandbox object aimed at `sandbox_id` with someone else's token
    (the deprecated public constructor of the pinned SDK)."""
    from e2b.connection_config import ConnectionConfig

    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ConnectionConfig.envd_port)}
    if envd_access_token is not None:
        headers["X-Access-Token"] = envd_access_token
    cfg = ConnectionConfig(extra_sandbox_headers=headers, **opts)
    return Sandbox(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=template_sbx._envd_version,
        envd_access_token=envd_access_token,
        connection_config=cfg,
    )


DENIED = (NotFoundException, SandboxNotRunningException, AuthenticationException)


@pytest.mark.parametrize("token", ["tenant-b-token", "no-token", "garbage-token"])
def test_tenant_b_cannot_use_tenant_a_data_plane(make_sandbox, e2b_target, token):
    a = make_sandbox(tenant="a")
    b = make_sandbox(tenant="b")
    a.files.write("/tmp/a-only.txt", "secret of a")
    tok = {"tenant-b-token": b._envd_access_token, "no-token": None, "garbage-token": "x" * 32}[token]
    forged = _forged(a.sandbox_id, tok, e2b_target.b, a)

    marker = f"/tmp/pwned-{uuid.uuid4().hex[:8]}"
    with pytest.raises(DENIED):
        forged.commands.run(f"touch {marker}; cat /tmp/a-only.txt")
    with pytest.raises(DENIED):
        forged.files.read("/tmp/a-only.txt")
    with pytest.raises(DENIED):
        forged.files.write(marker + "-file", "from b")
    with pytest.raises(DENIED):
        forged.files.list("/tmp")
    with pytest.raises(DENIED):
        forged.commands.list()

    assert a.files.exists(marker) is False
    assert a.files.exists(marker + "-file") is False
    # and B's own sandbox did not get A's files either
    assert b.files.exists("/tmp/a-only.txt") is False


# ---------------------------------------------------------------------------
# e2b-code-interpreter


def test_code_interpreter_run_code(e2b_target, registry):
    # Its default template (code-interpreter-v1); the full suite is
    # test_code_interpreter.py.
    ci = pytest.importorskip("e2b_code_interpreter")
    sbx = ci.Sandbox.create(timeout=120, **e2b_target.a)
    registry.add(sbx, e2b_target.a)
    try:
        out = []
        ex = sbx.run_code("print('hi from code')\nx = 20\nx + 22", on_stdout=lambda m: out.append(m.line))
        assert ex.error is None, ex.error
        assert "".join(ex.logs.stdout) == "hi from code\n"
        assert "".join(out) == "hi from code\n"
        assert ex.text == "42"
        err = sbx.run_code("1/0")
        assert err.error is not None
        assert err.error.name == "ZeroDivisionError"
    finally:
        sbx.kill()
