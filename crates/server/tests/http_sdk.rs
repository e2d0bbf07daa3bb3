//! The unmodified `e2b` Python SDK against the HTTP layer (over the
//! in-test Backend double), with the venv `.ci/python-venv.sh` makes
//! (`NANOCLAW_VENV`, else `$CARGO_TARGET_DIR/venv` or `target/venv`).
//! Without it the test says SKIPPED, and fails under
//! `NANOCLAW_REQUIRE_E2B=1` (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const SCRIPT: &str = r#"
import asyncio, io, time
from e2b import Sandbox, AsyncSandbox, SandboxQuery
from e2b.exceptions import TimeoutException, SandboxException, NotFoundException
from e2b.sandbox.commands.command_handle import CommandExitException

sbx = Sandbox.create(timeout=120, metadata={"k": "v w&x"}, envs={"FOO": "bar"})
r = sbx.commands.run("echo hi; echo err >&2; echo $FOO")
assert r.stdout == "hi\nbar\n" and r.stderr == "err\n", r
try:
    sbx.commands.run("exit 3")
    raise AssertionError("exit 3 did not raise")
except CommandExitException as e:
    assert e.exit_code == 3
h = sbx.commands.run("cat", background=True, stdin=True)
assert any(p.pid == h.pid for p in sbx.commands.list())
sbx.commands.send_stdin(h.pid, "hello\n")
sbx.commands.close_stdin(h.pid)
assert h.wait().stdout == "hello\n"
try:
    sbx.commands.run("sleep 10", timeout=1)
    raise AssertionError("timeout did not raise")
except TimeoutException:
    pass
bg = sbx.commands.run("sleep 30", background=True)
assert sbx.commands.kill(bg.pid)
assert not sbx.commands.kill(999999)

w = sbx.files.write("/tmp/a.txt", "hello")
assert w.path == "/tmp/a.txt", w
assert sbx.files.read("/tmp/a.txt") == "hello"
sbx.files.write_files([{"path": "/tmp/m1.txt", "data": "one"}, {"path": "/tmp/d/m2.txt", "data": b"\x00\x01\xff"}])
assert sbx.files.read("/tmp/d/m2.txt", format="bytes") == bytearray(b"\x00\x01\xff")
sbx.files.write("/tmp/o.txt", io.BytesIO(b"octet"))
assert sbx.files.read("/tmp/o.txt") == "octet"
sbx.files.write("/tmp/g.txt", "gzipped", gzip=True)
assert sbx.files.read("/tmp/g.txt") == "gzipped"
sbx.files.write("/tmp/meta.txt", "m", metadata={"owner": "tests"})
assert sbx.files.exists("/tmp/a.txt") and not sbx.files.exists("/tmp/nope")
names = {e.name for e in sbx.files.list("/tmp")}
assert {"a.txt", "m1.txt", "d"} <= names, names
assert sbx.files.make_dir("/tmp/newdir") and not sbx.files.make_dir("/tmp/newdir")
assert sbx.files.rename("/tmp/a.txt", "/tmp/b.txt").path == "/tmp/b.txt"
sbx.files.remove("/tmp/b.txt")
assert not sbx.files.exists("/tmp/b.txt")
watch = sbx.files.watch_dir("/tmp/newdir")
sbx.files.write("/tmp/newdir/w.txt", "x")
events = []
for _ in range(100):
    events += watch.get_new_events()
    if events:
        break
    time.sleep(0.05)
watch.stop()
assert any(e.name == "w.txt" for e in events), events

async def async_part():
    a = await AsyncSandbox.connect(sbx.sandbox_id)
    seen = []
    handle = await a.files.watch_dir("/tmp/newdir", on_event=lambda e: seen.append(e.name), timeout=5)
    await a.files.write("/tmp/newdir/async.txt", "y")
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    await handle.stop()
    assert "async.txt" in seen, seen
    out = []
    r = await a.commands.run("echo streamed", on_stdout=out.append)
    assert r.stdout == "streamed\n" and out, out
asyncio.run(async_part())

info = sbx.get_info()
assert info.metadata == {"k": "v w&x"} and info.state == "running", info
page = Sandbox.list(query=SandboxQuery(metadata={"k": "v w&x"})).next_items()
assert [s.sandbox_id for s in page] == [sbx.sandbox_id], page
sbx.set_timeout(300)
assert sbx.get_metrics()
assert sbx.pause()
assert not sbx.is_running()
sbx.connect()
assert sbx.is_running()
assert sbx.commands.run("echo back").stdout == "back\n"

try:
    Sandbox.connect(sbx.sandbox_id, api_key=KEY_B)
    raise AssertionError("tenant B connected to A's sandbox")
except NotFoundException:
    pass
assert not Sandbox.kill(sbx.sandbox_id, api_key=KEY_B)
assert sbx.kill()
assert not sbx.is_running()
try:
    sbx.commands.run("echo dead")
    raise AssertionError("a killed sandbox ran a command")
except SandboxException:
    pass
print("SDK OK")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_e2b_sdk_works_end_to_end() {
    let Some(python) = venv_python() else {
        return;
    };
    let s = start().await;
    let url = format!("http://{}", s.addr.unwrap());
    let script = format!("KEY_B = {KEY_B:?}\n{SCRIPT}");
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", KEY_A)
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("SDK OK"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    s.stop().await;
}

/// The venv's python, or `None` after saying SKIPPED (a failure when
/// `NANOCLAW_REQUIRE_E2B=1`).
fn venv_python() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = std::env::var_os("NANOCLAW_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("venv")
        });
    let py = venv.join("bin/python");
    if py.exists() {
        return Some(py);
    }
    assert!(
        std::env::var("NANOCLAW_REQUIRE_E2B").map_or(true, |v| v != "1"),
        "NANOCLAW_REQUIRE_E2B=1 but there is no venv at {} (run .ci/python-venv.sh)",
        venv.display()
    );
    eprintln!(
        "SKIPPED the_e2b_sdk_works_end_to_end: no venv with the e2b SDK at {} (run .ci/python-venv.sh)",
        venv.display()
    );
    None
}
