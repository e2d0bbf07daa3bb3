"""Where a command's time goes: a daemon (`--pool base=2`), one sandbox, raw Starts of
/bin/true and `bash -l -c true` over the unix socket; `hold` mode then waits for $TRACE_GO and
runs HOLDN (default 20) more `bash -l -c true` while perfrun.sh records (stages.py reads it)."""
import os, sys, time, subprocess, tempfile, signal
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GO = os.environ.get("TRACE_GO", "/tmp/e2b-trace-go")
import e2b_bench as B, e2b_ab as AB
exe = sys.argv[1]; mode = sys.argv[2] if len(sys.argv) > 2 else "time"
work = tempfile.mkdtemp(prefix="lat.")
d = B.Daemon(exe, work, True, ["--pool", "base=2"], name="x")
d.add_tenant("a"); d.start(); time.sleep(2)
try:
    rc = B.RawClient(d.keys["a"], unix=d.sock)
    sid, tok = rc.create(); d.track("a", sid)
    raw = AB.Raw(d.sock)
    rq_true = AB.start_req(sid, tok, "/bin/true", [])
    rq_bash = AB.start_req(sid, tok, "/bin/bash", ["-l", "-c", "true"])
    for _ in range(10): raw.call(rq_true); raw.call(rq_bash)
    out = subprocess.run(["ps", "-eo", "pid,ppid,comm,args"], capture_output=True, text=True).stdout
    print("daemon", d.proc.pid)
    print("\n".join(l for l in out.splitlines() if "nanoclaw" in l or "keeper" in l)[:3000])
    if mode == "strace":
        pids = sys.argv[3:] if len(sys.argv) > 3 else []
        input("attach strace now, then press enter")
    N = 100
    for rq, name in ((rq_true, "true"), (rq_bash, "bash")):
        xs = []
        for _ in range(N):
            t0 = time.perf_counter(); raw.call(rq); xs.append(time.perf_counter() - t0); time.sleep(0.01)
        xs.sort(); print(name, "p50 %.2f p10 %.2f min %.2f ms" % (xs[N//2]*1e3, xs[N//10]*1e3, xs[0]*1e3))
    if mode == "hold":
        print("holding; touch /work/lat/go to continue", flush=True)
        while not os.path.exists(GO): time.sleep(0.2)
        os.unlink(GO)
        for _ in range(int(os.environ.get("HOLDN","20"))):
            raw.call(rq_bash); time.sleep(0.005)
        print("done", flush=True)
finally:
    d.kill_all_sandboxes(); d.stop()
