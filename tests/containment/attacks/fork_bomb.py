# pids limit: a fork bomb must hit the limit (EAGAIN, or the sandbox is
# killed). Bounded so that an unsandboxed run stays harmless: at most
# P["pids_target"] sleeping children, all killed at the end.
def body():
    target = P["pids_target"]
    print("@@START fork bomb up to %d processes (limit asked for: %s)" % (target, P.get("pids_limit")), flush=True)
    kids, err = [], None
    for i in range(target):
        try:
            pid = os.fork()
        except OSError as ex:
            err = ex
            break
        if pid == 0:
            libc.prctl(1, 9)  # PR_SET_PDEATHSIG SIGKILL
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
        if i % 50 == 0:
            print("@@PROGRESS %d" % len(kids), flush=True)
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
    for k in kids:
        try:
            os.waitpid(k, 0)
        except OSError:
            pass
    if err is None:
        escaped("fork-bomb", "created all %d processes: no pids limit" % len(kids))
    else:
        contained("fork-bomb", "stopped after %d processes: %s" % (len(kids), ename(err.errno)))


main(body)
