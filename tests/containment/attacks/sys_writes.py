# /sys read-only, /sys/firmware masked. Opened for writing, never written.
def body():
    for p in ("/sys/kernel/uevent_helper", "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state",
              "/sys/kernel/profiling", "/sys/module/printk/parameters/time", "/sys/class/net/lo/mtu",
              "/sys/kernel/mm/ksm/run", "/sys/block/vda/queue/scheduler"):
        if not os.path.exists(p):
            continue
        fd, e = try_open(p, os.O_WRONLY | os.O_NONBLOCK)
        if fd is not None:
            os.close(fd)
            escaped("open-w:" + p, "opened for writing")
        else:
            contained("open-w:" + p, ename(e))
    made = []
    for ctl in ("memory", "pids", "cpu", "unified", ""):
        d = os.path.join("/sys/fs/cgroup", ctl)
        if not os.path.isdir(d):
            continue
        p = os.path.join(d, "nct-%d" % os.getpid())
        try:
            os.mkdir(p)
            os.rmdir(p)
            made.append(p)
        except OSError as ex:
            contained("mkdir:" + p, ename(ex.errno))
    if made:
        escaped("cgroup-mkdir", "created (and removed) cgroups: %s" % made)
    try:
        st = os.statvfs("/sys")
        (contained if st.f_flag & os.ST_RDONLY else exposed)("sys-readonly", "statvfs(/sys) flags 0x%x" % st.f_flag)
    except OSError as ex:
        contained("sys-readonly", ename(ex.errno))
    try:
        names = os.listdir("/sys/firmware")
        (exposed if names else contained)("sys-firmware", "visible: %s" % names[:5] if names else "empty")
    except OSError as ex:
        contained("sys-firmware", ename(ex.errno))


main(body)
