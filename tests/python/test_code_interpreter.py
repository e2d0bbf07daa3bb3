"""The unmodified `e2b-code-interpreter` SDK (pinned in requirements.txt)
against `nanoclaw serve`: stateful code contexts (python, javascript, bash),
rich results, errors, timeouts, crashes, restarts, and hostile input.

Run by crates/cli/tests/e2b_sdk.rs (the_code_interpreter_sdk_runs_against_nanoclaw_serve)
with the same environment as test_e2b_sdk.py (see conftest.py). matplotlib
and pandas must be importable by the host's python3 (Debian:
python3-matplotlib python3-pandas, installed by .ci/run); without them the
plot and frame tests skip, or fail under NANOCLAW_REQUIRE_E2B=1.
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from conftest import require_e2b


@pytest.fixture
def ci(e2b_target, registry, request):
    """A fresh code-interpreter sandbox of tenant A."""
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(
        template=e2b_target.template,
        timeout=300,
        metadata={"suite": "nanoclaw-ci", "run": e2b_target.run_id, "test": request.node.name[:60]},
        **e2b_target.a,
    )
    registry.add(sbx, e2b_target.a)
    yield sbx
    try:
        sbx.kill()
    except Exception:  # noqa: BLE001
        pass


def need_module(ci, module: str):
    """Skips (or, when required, fails) unless the sandbox's python has `module`."""
    ex = ci.run_code(f"import {module}")
    if ex.error is not None:
        msg = f"{module} is not importable in the sandbox ({ex.error.name}: {ex.error.value}); on Debian: apt-get install python3-{module}"
        if require_e2b():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def raw(e2b_target, sbx, method: str, path: str, token: str | None = None, **kw):
    """A request to the code-interpreter port as the SDK makes it, by hand."""
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
    if token is not False:
        headers["X-Access-Token"] = token or sbx._envd_access_token
    with httpx.Client(timeout=30, trust_env=False) as c:
        return c.request(method, e2b_target.sandbox_url + path, headers=headers, **kw)


def test_a_variable_defined_is_read_back(ci):
    first = ci.run_code("x = 41\nprint('defined')\nx + 1")
    assert first.error is None
    assert first.text == "42"
    assert first.logs.stdout == ["defined\n"]
    assert first.results[0].is_main_result
    assert ci.run_code("x").text == "41"
    assert ci.run_code("'a' + 'b'").text == "ab"  # strings shown as E2B shows them


def test_imports_and_cwd_persist(ci):
    assert ci.run_code("import json, os\nos.chdir('/tmp')").error is None
    ex = ci.run_code("json.dumps({'cwd': os.getcwd()})")
    assert ex.error is None, ex.error
    assert ex.text == '{"cwd": "/tmp"}'


def test_output_is_streamed_as_it_happens(ci):
    seen = []
    start = time.monotonic()
    ex = ci.run_code(
        "import time\nprint('early', flush=True)\ntime.sleep(1.5)\nprint('late')",
        on_stdout=lambda m: seen.append((m.line, time.monotonic() - start)),
    )
    total = time.monotonic() - start
    assert ex.error is None
    assert [s for s, _ in seen] == ["early\n", "late\n"]
    assert seen[0][1] < total - 1.0, f"'early' arrived at {seen[0][1]:.2f}s of {total:.2f}s"
    err = ci.run_code("import sys\nsys.stderr.write('oops\\n')\nNone")
    assert err.logs.stderr == ["oops\n"]


def test_matplotlib_figure_comes_back_as_png(ci):
    need_module(ci, "matplotlib")
    ex = ci.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.title('squares')\n"
        "plt.show()"
    )
    assert ex.error is None, ex.error
    pngs = [r.png for r in ex.results if r.png]
    assert len(pngs) == 1, ex.results
    data = base64.b64decode(pngs[0])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    # The figure was closed: the next cell shows none.
    assert [r for r in ci.run_code("1").results if r.png] == []
    # A figure as the cell's value is its main result, once.
    fig = ci.run_code("fig = plt.figure()\nplt.plot([3, 1])\nfig")
    assert [(r.is_main_result, bool(r.png)) for r in fig.results] == [(True, True)]


def test_pandas_frame_comes_back_as_html(ci):
    need_module(ci, "pandas")
    ex = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    assert ex.error is None, ex.error
    main = ex.results[0]
    assert main.is_main_result
    assert "<table" in main.html and "<td>x</td>" in main.html
    assert "a" in main.text and "b" in main.text


def test_division_by_zero_is_an_error_with_traceback(ci):
    ex = ci.run_code("def f():\n    return 1 / 0\nf()")
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert ex.error.value == "division by zero"
    assert "Traceback" in ex.error.traceback and "return 1 / 0" in ex.error.traceback
    assert "nanoclaw" not in ex.error.traceback  # the driver's own frames are hidden
    # The context lives on.
    assert ci.run_code("2 * 21").text == "42"
    syntax = ci.run_code("def (")
    assert syntax.error.name == "SyntaxError"


def test_env_vars_are_per_execution(ci):
    ex = ci.run_code("import os\nos.environ.get('NC_ONE')", envs={"NC_ONE": "1"})
    assert ex.text == "1"
    assert ci.run_code("os.environ.get('NC_ONE', 'unset')").text == "unset"
    js = ci.run_code("process.env.NC_TWO", language="js", envs={"NC_TWO": "2"})
    assert js.text == "2"
    sh = ci.run_code("echo $NC_THREE", language="bash", envs={"NC_THREE": "3"})
    assert sh.logs.stdout == ["3\n"]


def test_javascript_state_persists(ci):
    assert ci.run_code("var n = 20; const m = 1; function dbl(v) { return v * 2 }", language="javascript").error is None
    ex = ci.run_code("console.log('js says', n); dbl(n) + m", language="js")
    assert ex.error is None, ex.error
    assert ex.text == "41"
    assert ex.logs.stdout == ["js says 20\n"]
    err = ci.run_code("null.x", language="js")
    assert err.error.name == "TypeError"


def test_bash_state_persists(ci):
    assert ci.run_code("GREETING=hello\ncd /tmp\nf() { echo \"f:$1\"; }", language="bash").error is None
    ex = ci.run_code("echo $GREETING; pwd; f x", language="bash")
    assert ex.error is None, ex.error
    assert "".join(ex.logs.stdout) == "hello\n/tmp\nf:x\n"
    bad = ci.run_code("ls /nonexistent-dir", language="bash")
    assert bad.error is not None and bad.error.value == "exit status 2"
    assert "No such file" in "".join(bad.logs.stderr)


def test_contexts_are_created_listed_restarted_removed(ci):
    ctx = ci.create_code_context(language="python", cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    assert ci.run_code("import os\nv = 7\nos.getcwd()", context=ctx).text == "/tmp"
    # Separate from the default context.
    assert ci.run_code("v", context=ctx).text == "7"
    assert ci.run_code("'v' in dir()").text == "False"
    js = ci.create_code_context(language="js")
    ids = {c.id for c in ci.list_code_contexts()}
    assert {ctx.id, js.id} <= ids
    ci.restart_code_context(ctx)
    after = ci.run_code("'v' in dir()", context=ctx)
    assert after.text == "False"  # a fresh interpreter
    assert ci.run_code("import os\nos.getcwd()", context=ctx).text == "/tmp"  # same cwd
    ci.remove_code_context(ctx.id)
    assert ctx.id not in {c.id for c in ci.list_code_contexts()}
    from e2b.exceptions import NotFoundException

    with pytest.raises(NotFoundException):
        ci.run_code("1", context=ctx)


def test_a_timed_out_cell_is_interrupted_and_the_context_lives_on(ci):
    from e2b import TimeoutException

    ci.run_code("kept = 'yes'")
    with pytest.raises(TimeoutException):
        ci.run_code("while True:\n    pass", timeout=2)
    # KeyboardInterrupt stopped the loop; the state is still there.
    ex = ci.run_code("kept")
    assert ex.error is None and ex.text == "yes"


def test_a_cell_that_ignores_the_interrupt_gets_its_context_killed(ci):
    from e2b import TimeoutException

    ctx = ci.create_code_context()
    ci.run_code("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)", context=ctx)
    with pytest.raises(TimeoutException):
        ci.run_code("time.sleep(120)", context=ctx, timeout=2)
    time.sleep(5)  # the interrupt's grace (3 s) runs out; the context is killed
    dead = ci.run_code("1", context=ctx)
    assert dead.error is not None and dead.error.name == "ContextDied"
    assert "did not stop" in dead.error.value
    ci.restart_code_context(ctx)
    assert ci.run_code("1 + 1", context=ctx).text == "2"


def test_a_crashed_context_says_so_and_restarts(ci):
    ctx = ci.create_code_context()
    crash = ci.run_code("import os\nos._exit(3)", context=ctx)
    assert crash.error is not None and crash.error.name == "ContextDied"
    assert "exit status 3" in crash.error.value
    again = ci.run_code("1", context=ctx)
    assert again.error is not None and "restart" in again.error.value
    ci.restart_code_context(ctx)
    assert ci.run_code("40 + 2", context=ctx).text == "42"
    # Node and bash too.
    js = ci.create_code_context(language="javascript")
    assert ci.run_code("process.exit(1)", context=js).error.name == "ContextDied"
    sh = ci.create_code_context(language="bash")
    assert ci.run_code("exit 4", context=sh).error.name == "ContextDied"
    ci.restart_code_context(sh)
    assert ci.run_code("echo back", context=sh).logs.stdout == ["back\n"]


def test_hostile_input_is_refused_with_json_errors(ci, e2b_target):
    from e2b.exceptions import NotFoundException, SandboxException
    from e2b_code_interpreter import Context

    with pytest.raises(NotFoundException):
        ci.run_code("1", context=Context("no-such-context", "python", "/"))
    with pytest.raises(NotFoundException):
        ci.restart_code_context("no-such-context")
    with pytest.raises(NotFoundException):
        ci.remove_code_context("no-such-context")
    with pytest.raises(SandboxException, match="400"):
        ci.run_code("1", language="cobol")
    with pytest.raises(SandboxException, match="400"):
        ci.create_code_context(language="cobol")
    with pytest.raises(SandboxException, match="413"):
        ci.run_code("x = 1\n" * 200_000)
    with pytest.raises(SandboxException, match="400"):
        ci.run_code("1", envs={"1BAD": "x"})
    r = raw(e2b_target, ci, "POST", "/execute", json={"code": "1", "context_id": "a", "language": "python"})
    assert r.status_code == 400 and r.json()["code"] == 400
    r = raw(e2b_target, ci, "POST", "/execute", content=b"{not json")
    assert r.status_code == 400 and "message" in r.json()
    r = raw(e2b_target, ci, "POST", "/execute", json={"language": "python"})
    assert r.status_code == 400  # no code
    # Without a token, or with a wrong one: as if the sandbox did not exist.
    for token in (False, "0" * 64):
        r = raw(e2b_target, ci, "POST", "/execute", token=token, json={"code": "open('/tmp/pwned','w')"})
        assert r.status_code == 404, r.text
        assert "was not found" in r.json()["message"]
    assert ci.run_code("import os\nos.path.exists('/tmp/pwned')").text == "False"
    # Too many contexts.
    for _ in range(20):
        try:
            ci.create_code_context(language="bash")
        except SandboxException as e:
            assert "429" in str(e)
            break
    else:
        pytest.fail("no limit on the number of contexts")


def test_tenant_b_cannot_reach_tenant_a_contexts(ci, e2b_target, make_sandbox):
    from e2b_code_interpreter import Sandbox

    secret = ci.run_code("secret = 'tenant-a-only'\n'ok'")
    assert secret.text == "ok"
    mine = make_sandbox(tenant="b")
    # B's own valid token, A's sandbox id.
    for method, path, body in [
        ("POST", "/execute", {"code": "secret"}),
        ("GET", "/contexts", None),
        ("POST", "/contexts", {"language": "python"}),
    ]:
        r = raw(e2b_target, ci, method, path, token=mine._envd_access_token, json=body)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["code"] == 404
    # And through the SDK: B cannot connect to A's sandbox at all.
    from e2b.exceptions import SandboxException

    with pytest.raises(SandboxException):
        Sandbox.connect(ci.sandbox_id, **e2b_target.b)
    # A's state is untouched.
    assert ci.run_code("secret").text == "tenant-a-only"


def test_contexts_die_with_their_sandbox(ci, e2b_target):
    ci.run_code("1")
    ci.run_code("1", language="js")
    ci.kill()
    r = raw(e2b_target, ci, "GET", "/contexts")
    assert r.status_code == 404
