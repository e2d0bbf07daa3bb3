# Host-global sysctls must not be writable: core_pattern (a pipe there runs a
# program as host root on the next crash), modprobe, uevent helpers... Opened
# for writing, never written; the runner also checks core_pattern is unchanged.
def body():
    for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe", "/proc/sys/kernel/hotplug",
              "/proc/sys/vm/drop_caches", "/proc/sys/kernel/sysrq", "/proc/sys/fs/binfmt_misc/register",
              "/proc/sys/kernel/panic", "/proc/sys/net/ipv4/ip_forward"):
        fd, e = try_open(p, os.O_WRONLY | os.O_NONBLOCK)
        if fd is not None:
            os.close(fd)
            escaped("open-w:" + p, "opened for writing")
        else:
            contained("open-w:" + p, ename(e))
    try:
        st = os.statvfs("/proc/sys")
        (contained if st.f_flag & os.ST_RDONLY else exposed)("proc-sys-readonly", "statvfs flags 0x%x" % st.f_flag)
    except OSError as ex:
        contained("proc-sys-readonly", ename(ex.errno))


main(body)
