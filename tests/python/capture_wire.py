#!/usr/bin/env python3
"""Drive the pinned e2b SDK against fake_e2b.py and record the wire traffic.

    $VENV/bin/python tests/python/capture_wire.py /tmp/wire.jsonl

Everything stays on 127.0.0.1: E2B_API_URL and E2B_SANDBOX_URL both point at
the fake, so the SDK never resolves an e2b.app / e2b.dev host. Each SDK call is
preceded by a {"marker": ...} line in the log, so the log reads per call.
This is how docs/e2b-wire.md was produced.
"""

import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_A = "e2b_" + "a" * 40
KEY_B = "e2b_" + "b" * 40


def main():
    log_path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/e2b-wire.jsonl"
    if os.path.exists(log_path):
        os.remove(log_path)
    srv = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "fake_e2b.py"), "--port", "0", "--log", log_path,
         "--key", f"{KEY_A}=tenant-a", "--key", f"{KEY_B}=tenant-b"],
        stdout=subprocess.PIPE, text=True)
    url = srv.stdout.readline().split()[-1]
    os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": KEY_A,
                       "E2B_DOMAIN": "nanoclaw.invalid"})
    for k in ("E2B_DEBUG", "E2B_HTTP_VERSION", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        os.environ.pop(k, None)
    os.environ["NO_PROXY"] = "*"

    def mark(name):
        with open(log_path, "a") as f:
            f.write(json.dumps({"marker": name}) + "\n")

    from e2b import Sandbox, SandboxQuery, SandboxState
    from e2b import exceptions as ex
    import e2b_code_interpreter

    def attempt(name, fn):
        mark(name)
        try:
            r = fn()
            print(f"{name}: ok {r!r}"[:300])
            return r
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__module__}.{type(e).__name__}: {e}"[:300])
            with open(log_path, "a") as f:
                f.write(json.dumps({"marker_exception": name, "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "str": str(e)[:300]}) + "\n")
            return e

    try:
        sbx = attempt("Sandbox.create", lambda: Sandbox.create(template="base", timeout=120,
                                                                metadata={"owner": "capture", "k": "v w&x"},
                                                                envs={"FOO": "bar"}))
        attempt("Sandbox.connect", lambda: Sandbox.connect(sbx.sandbox_id, timeout=200))
        attempt("sandbox.get_info", sbx.get_info)
        attempt("Sandbox.list(metadata,state,limit)", lambda: Sandbox.list(
            query=SandboxQuery(metadata={"owner": "capture", "k": "v w&x"}, state=[SandboxState.RUNNING]), limit=2).next_items())
        attempt("sandbox.set_timeout", lambda: sbx.set_timeout(600))
        attempt("sandbox.get_metrics", sbx.get_metrics)
        attempt("sandbox.is_running", sbx.is_running)
        attempt("commands.run foreground", lambda: sbx.commands.run("echo hi; echo err >&2; echo $FOO"))
        attempt("commands.run cwd/user/envs", lambda: sbx.commands.run("pwd; echo $X", cwd="/tmp", user="root", envs={"X": "1"}))
        attempt("commands.run exit 3", lambda: sbx.commands.run("echo out; echo bad >&2; exit 3"))
        chunks = []
        attempt("commands.run on_stdout", lambda: sbx.commands.run("for i in 1 2 3; do echo $i; sleep 0.2; done",
                                                                    on_stdout=chunks.append, on_stderr=chunks.append))
        print("chunks", chunks)
        attempt("commands.run timeout", lambda: sbx.commands.run("sleep 5", timeout=1))
        h = attempt("commands.run background", lambda: sbx.commands.run("sleep 30", background=True))
        attempt("commands.list", sbx.commands.list)
        attempt("commands.connect", lambda: sbx.commands.connect(h.pid).pid)
        attempt("handle.kill", h.kill)
        attempt("handle.wait after kill", h.wait)
        cat = attempt("commands.run background stdin", lambda: sbx.commands.run("cat", background=True, stdin=True))
        attempt("commands.send_stdin", lambda: sbx.commands.send_stdin(cat.pid, "hello\n"))
        attempt("commands.close_stdin", lambda: sbx.commands.close_stdin(cat.pid))
        attempt("cat.wait", cat.wait)
        attempt("commands.kill unknown pid", lambda: sbx.commands.kill(999999))
        attempt("files.write text", lambda: sbx.files.write("/home/user/a.txt", "hello"))
        attempt("files.write bytes", lambda: sbx.files.write("bin.dat", b"\x00\x01\xff\x00"))
        attempt("files.write_files", lambda: sbx.files.write_files([{"path": "/tmp/m1.txt", "data": "one"},
                                                                     {"path": "/tmp/d/m2.txt", "data": b"two"}]))
        attempt("files.write octet-stream", lambda: sbx.files.write("/tmp/o.txt", "octet", use_octet_stream=True))
        attempt("files.read text", lambda: sbx.files.read("/home/user/a.txt"))
        attempt("files.read bytes", lambda: sbx.files.read("bin.dat", format="bytes"))
        attempt("files.read stream", lambda: b"".join(sbx.files.read("/home/user/a.txt", format="stream")))
        attempt("files.read missing", lambda: sbx.files.read("/nope"))
        attempt("files.list depth=2", lambda: sbx.files.list("/tmp", depth=2))
        attempt("files.exists yes", lambda: sbx.files.exists("/tmp/m1.txt"))
        attempt("files.exists no", lambda: sbx.files.exists("/tmp/none"))
        attempt("files.get_info", lambda: sbx.files.get_info("/tmp/m1.txt"))
        attempt("files.rename", lambda: sbx.files.rename("/tmp/m1.txt", "/tmp/m3.txt"))
        attempt("files.remove", lambda: sbx.files.remove("/tmp/m3.txt"))
        attempt("files.make_dir new", lambda: sbx.files.make_dir("/tmp/newdir"))
        attempt("files.make_dir exists", lambda: sbx.files.make_dir("/tmp/newdir"))
        w = attempt("files.watch_dir", lambda: sbx.files.watch_dir("/tmp/newdir"))
        sbx.files.write("/tmp/newdir/w.txt", "x")
        attempt("watch.get_new_events", w.get_new_events)
        attempt("watch.stop", w.stop)
        attempt("files.read traversal", lambda: sbx.files.read("../../etc/hostname"))
        attempt("download_url", lambda: sbx.download_url("/home/user/a.txt"))
        attempt("Sandbox.get_info other tenant", lambda: Sandbox.get_info(sbx.sandbox_id, api_key=KEY_B))
        attempt("Sandbox.kill other tenant", lambda: Sandbox.kill(sbx.sandbox_id, api_key=KEY_B))
        attempt("Sandbox.create bad key", lambda: Sandbox.create(api_key="e2b_" + "c" * 40))
        attempt("sandbox.pause", sbx.pause)
        attempt("sandbox.pause again", sbx.pause)
        attempt("Sandbox.connect (resume)", lambda: Sandbox.connect(sbx.sandbox_id))
        attempt("sandbox.beta_pause", sbx.beta_pause)
        attempt("sandbox.connect() instance (resume)", lambda: sbx.connect())
        ci = attempt("code_interpreter.Sandbox.create", lambda: e2b_code_interpreter.Sandbox.create(timeout=60))
        attempt("run_code", lambda: ci.run_code("print('hi')\n1+1"))
        attempt("run_code error", lambda: ci.run_code("1/0"))
        attempt("ci.kill", ci.kill)
        import asyncio
        from e2b import AsyncSandbox

        async def async_watch():
            a = await AsyncSandbox.create(timeout=60)
            seen = []
            h = await a.files.watch_dir("/tmp", on_event=seen.append, timeout=5)
            await a.files.write("/tmp/async.txt", "x")
            for _ in range(30):
                if seen:
                    break
                await asyncio.sleep(0.1)
            await h.stop()
            r = await a.commands.run("echo async")
            await a.kill()
            return seen, r
        attempt("AsyncSandbox watch_dir (WatchDir stream)", lambda: asyncio.run(async_watch()))
        attempt("sandbox.kill", sbx.kill)
        attempt("sandbox.kill again", sbx.kill)
        attempt("get_info after kill", sbx.get_info)
        attempt("set_timeout after kill", lambda: sbx.set_timeout(10))
        attempt("commands.run after kill", lambda: sbx.commands.run("true"))
        attempt("files.read after kill", lambda: sbx.files.read("/home/user/a.txt"))
        attempt("files.list after kill", lambda: sbx.files.list("/"))
    finally:
        srv.terminate()
        srv.wait()


if __name__ == "__main__":
    main()
