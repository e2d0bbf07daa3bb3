# Masked /proc entries: kcore, keys, sysrq-trigger, timer_list, sched_debug,
# latency_stats, acpi, scsi, kallsyms addresses, kmsg.
PROC_SUPER_MAGIC = 0x9FA0


def is_real_proc(fd):
    buf = (ctypes.c_long * 16)()
    if libc.fstatfs(fd, buf) != 0:
        return False
    return buf[0] == PROC_SUPER_MAGIC


def body():
    fd, e = try_open("/proc/sysrq-trigger", os.O_WRONLY)
    if fd is not None:
        real = is_real_proc(fd)
        os.close(fd)
        (escaped if real else contained)("sysrq-trigger", "opened for writing (%s)" % ("real procfs!" if real else "masked"))
    else:
        contained("sysrq-trigger", ename(e))
    for p, severe in (("/proc/kcore", True), ("/proc/kmsg", True), ("/proc/keys", False), ("/proc/timer_list", False),
                      ("/proc/sched_debug", False), ("/proc/latency_stats", False), ("/proc/key-users", False)):
        fd, e = try_open(p, os.O_RDONLY | os.O_NONBLOCK)
        if fd is None:
            contained(p, ename(e))
            continue
        try:
            data = os.read(fd, 64)
            real = is_real_proc(fd)
            if real:
                (escaped if severe else exposed)(p, "readable, real procfs (%d bytes)" % len(data))
            else:
                contained(p, "masked (%d bytes)" % len(data))
        except OSError as ex:
            contained(p, "read: " + ename(ex.errno))
        finally:
            os.close(fd)
    for d in ("/proc/acpi", "/proc/scsi", "/proc/irq", "/proc/bus", "/proc/fs"):
        try:
            names = os.listdir(d)
        except OSError as ex:
            contained(d, ename(ex.errno))
            continue
        if not names:
            contained(d, "empty (masked)")
            continue
        wr = sc("faccessat", -100, d, 2)[1] == 0 and not (os.statvfs(d).f_flag & os.ST_RDONLY)
        if d in ("/proc/acpi", "/proc/scsi"):
            exposed(d, "visible: %s" % names[:5])
        elif wr:
            exposed(d, "writable")
        else:
            contained(d, "read-only")
    try:
        lines = read_file("/proc/kallsyms", 4096).decode().splitlines()
        nz = [ln for ln in lines if not ln.startswith("0000000000000000")]
        (exposed if nz else contained)("kallsyms", "kernel addresses %s" % ("visible" if nz else "hidden"))
    except OSError as ex:
        contained("kallsyms", ename(ex.errno))


main(body)
