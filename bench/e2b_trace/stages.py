"""Per-command stage timestamps from `perf script` output of the tracepoints
recorded around raw Starts of `bash -l -c true` (see trace.py hold)."""
import sys, re, statistics
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S.*?)\s+(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)", line)
    if not m: continue
    comm, tid, t, ev, rest = m.groups()
    rows.append((float(t), comm, int(tid), ev, rest))
rows.sort()
cycles, cur = [], None
for t, comm, tid, ev, rest in rows:
    if ev == "syscalls:sys_enter_recvfrom" and "size: 0x00002000" in rest and comm.startswith("tokio"):
        cur = {"http": t}; cycles.append(cur); continue
    if cur is None: continue
    def once(k):
        if k not in cur: cur[k] = t
    if ev == "syscalls:sys_enter_connect" and comm.startswith("tokio"): once("connect")
    elif ev == "syscalls:sys_enter_recvfrom" and "size: 0x00004000" in rest and not comm.startswith("tokio"): once("keeper_req")
    elif ev == "syscalls:sys_enter_sendmsg" and "fd: 0x00000006" in rest: once("to_init")
    elif ev == "syscalls:sys_enter_clone": once("clone")
    elif ev == "sched:sched_process_fork": once("forked")
    elif ev == "syscalls:sys_exit_clone" and rest.strip() != "0x0": once("clone_ret")
    elif ev == "syscalls:sys_exit_clone" and rest.strip() == "0x0": once("child_runs")
    elif ev == "syscalls:sys_enter_seccomp": once("seccomp")
    elif ev == "syscalls:sys_enter_execve" and "execve" not in cur: once("execve")
    elif ev == "sched:sched_process_exec": once("exec_done")
    elif ev == "syscalls:sys_enter_exit_group" and comm in ("bash", "true"): once("cmd_exit")
    elif ev == "syscalls:sys_enter_sendto" and not comm.startswith("tokio") and "cmd_exit" in cur: once("keeper_exited")
    elif ev == "syscalls:sys_enter_fsync" and "cmd_exit" in cur: once("fsync2")
    elif ev == "syscalls:sys_exit_fsync" and "fsync2" in cur: once("fsync2_done")
    elif ev == "syscalls:sys_enter_writev" and "vlen: 0x00000004" in rest: once("head")
    elif ev == "syscalls:sys_enter_writev" and "cmd_exit" in cur: once("end")
order = ["http","connect","keeper_req","to_init","clone","clone_ret","child_runs","seccomp","execve","exec_done","cmd_exit","keeper_exited","fsync2","fsync2_done","end"]
good = [c for c in cycles if all(k in c for k in order)]
print(f"cycles {len(cycles)}, complete {len(good)}")
def q(xs, p): xs = sorted(xs); return xs[min(len(xs)-1, int(p*len(xs)))]
prev = "http"
for k in order[1:]:
    xs = [(c[k]-c[prev])*1e3 for c in good]
    print(f"{prev:>14} -> {k:<14} p10 {q(xs,.1):6.3f}  p50 {q(xs,.5):6.3f} ms")
    prev = k
xs = [(c["end"]-c["http"])*1e3 for c in good]
print(f"{'total':>31} p10 {q(xs,.1):6.3f}  p50 {q(xs,.5):6.3f} ms")
xs = [(c["head"]-c["http"])*1e3 for c in good if "head" in c]
if xs: print(f"{'http -> stream head':>31} p10 {q(xs,.1):6.3f}  p50 {q(xs,.5):6.3f} ms")
for a_, b_ in (("clone", "child_runs"), ("clone", "exec_done"), ("to_init", "exec_done"), ("http", "exec_done"), ("cmd_exit", "end")):
    xs = [(c[b_]-c[a_])*1e3 for c in good]
    print(f"{a_:>14} => {b_:<14} p10 {q(xs,.1):6.3f}  p50 {q(xs,.5):6.3f} ms")
