# Layer: pid namespace. Host processes are invisible and cannot be signalled.
def body():
    pid = P["sleeper_pid"]
    judge_kill = sc("kill", pid, 0)
    r, e = judge_kill
    if r == 0:
        escaped("kill(host_pid,0)", "host sleeper pid %d can be signalled" % pid)
    elif e == errno.EPERM:
        escaped("kill(host_pid,0)", "EPERM: host pid %d exists and is visible" % pid)
    else:
        contained("kill(host_pid,0)", ename(e))
    r, e = sc("pidfd_open", pid, 0)
    if r >= 0:
        st = ""
        try:
            st = read_file("/proc/%d/cmdline" % pid).replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
        if st.split(" ")[0] == P["sleeper_tag"]:
            escaped("pidfd_open(host_pid)", "got a pidfd for the host sleeper")
        else:
            contained("pidfd_open(host_pid)", "pid %d exists here but is not the host sleeper (%r)" % (pid, st[:60]))
        os.close(r)
    else:
        contained("pidfd_open(host_pid)", ename(e))
    found = []
    for p in proc_pids():
        try:
            if read_file("/proc/%d/cmdline" % p).split(b"\0")[0] == P["sleeper_tag"].encode():
                found.append(p)
        except OSError:
            pass
    if found:
        escaped("proc-scan", "host sleeper listed in /proc as pid(s) %s" % found)
    else:
        contained("proc-scan", "%d processes visible, host sleeper not among them" % len(proc_pids()))
    # Is our pid 1 the host's init?
    try:
        st = read_file("/proc/1/stat").decode()
        start = int(st.rsplit(")", 1)[1].split()[19])
        if start == P["host_init_starttime"]:
            escaped("pid1", "pid 1 is the host's init (same start time)")
        else:
            contained("pid1", "pid 1 is not the host init")
    except OSError as ex:
        contained("pid1", ename(ex.errno))


main(body)
