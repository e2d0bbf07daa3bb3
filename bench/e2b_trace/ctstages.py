"""Stages of a warm create then its first command (`bash -l -c 'echo hi'`), from perf script output (ctrace.py)."""
import sys, re
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S.*?)\s+(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)", line)
    if m:
        comm, tid, t, ev, rest = m.groups(); rows.append((float(t), comm, int(tid), ev, rest))
rows.sort()
out, s, last_http, last_connect, phase = [], None, None, None, None
for t, comm, tid, ev, rest in rows:
    tok = comm.startswith("tokio")
    if ev == "syscalls:sys_enter_recvfrom" and "size: 0x00002000" in rest and tok:
        last_http = t; continue
    if ev == "syscalls:sys_enter_connect" and tok: last_connect = t; continue
    if ev == "syscalls:sys_enter_sendto" and tok:
        ln = int(rest.split("len: ")[1].split(",")[0], 16)
        if ln == 0x24:
            s = {"http": last_http, "connect": last_connect}; out.append(s); phase = "create"; continue
        if ln >= 0x60 and s is not None and phase == "create" and "answer" in s:
            s["start_http"] = last_http; phase = "start"; continue
    if s is None: continue
    def once(k):
        if k not in s: s[k] = t
    if phase == "create":
        if ev == "syscalls:sys_enter_recvfrom" and "size: 0x00004000" in rest and not tok: once("keeper_req")
        elif ev == "syscalls:sys_enter_sendto" and not tok and "keeper_req" in s: once("keeper_reply")
        elif ev == "syscalls:sys_enter_fsync" and "keeper_reply" in s: once("fsync")
        elif ev == "syscalls:sys_exit_fsync" and "fsync" in s: once("fsync_done")
        elif ev == "syscalls:sys_enter_writev" and "fsync_done" in s: once("answer")
    elif phase == "start":
        if ev == "sched:sched_process_exec": once("exec")
        elif ev == "syscalls:sys_enter_exit_group" and comm == "bash": once("exit")
        elif ev == "syscalls:sys_enter_writev" and "exit" in s: once("end"); phase = None
order = ["http", "connect", "keeper_req", "keeper_reply", "fsync", "fsync_done", "answer", "start_http", "exec", "exit", "end"]
good = [s for s in out if all(s.get(k) for k in order)]
print(f"warm creates {len(out)}, complete {len(good)}")
def q(xs, p): xs = sorted(xs); return xs[min(len(xs) - 1, int(p * len(xs)))]
prev = order[0]
for k in order[1:]:
    xs = [(s[k] - s[prev]) * 1e3 for s in good]
    print(f"{prev:>12} -> {k:<12} p10 {q(xs, .1):6.3f}  p50 {q(xs, .5):6.3f} ms"); prev = k
for a_, b_ in (("http", "answer"), ("connect", "keeper_reply"), ("start_http", "end"), ("http", "end")):
    xs = [(s[b_] - s[a_]) * 1e3 for s in good]
    print(f"{a_:>12} => {b_:<12} p10 {q(xs, .1):6.3f}  p50 {q(xs, .5):6.3f} ms")
