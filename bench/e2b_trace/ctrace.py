"""Where a warm create and its first command spend their time: N rounds of raw create,
`bash -l -c 'echo hi'`, kill (0.3 s pause), run while perfrun.sh records (ctstages.py reads it)."""
import os, sys, time, tempfile
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GO = os.environ.get("TRACE_GO", "/tmp/e2b-trace-go")
import e2b_bench as B
exe = sys.argv[1]; N = int(sys.argv[2])
work = tempfile.mkdtemp(prefix="lat.")
d = B.Daemon(exe, work, True, ["--pool", "base=3"], name="x")
d.add_tenant("a"); d.start(); time.sleep(3)
try:
    rc = B.RawClient(d.keys["a"], unix=d.sock)
    sid, tok = rc.create(); rc.start(sid, tok, "/bin/true"); rc.kill(sid); time.sleep(0.5)
    print("holding", flush=True)
    while not os.path.exists(GO): time.sleep(0.2)
    os.unlink(GO)
    xs = []
    for i in range(N):
        t0 = time.perf_counter(); sid, tok = rc.create(); t1 = time.perf_counter()
        code, out = rc.start(sid, tok, "/bin/bash", ["-l", "-c", "echo hi"]); t2 = time.perf_counter()
        xs.append((t1 - t0, t2 - t1, t2 - t0))
        rc.kill(sid); time.sleep(0.3)
    for j, name in enumerate(("create", "first cmd", "total")):
        v = sorted(x[j] for x in xs); print(name, "p50 %.2f p10 %.2f min %.2f" % (v[len(v)//2]*1e3, v[len(v)//10]*1e3, v[0]*1e3))
    print("done", flush=True)
finally:
    d.kill_all_sandboxes(); d.stop()
