# Minimal /dev: no disks, no /dev/mem, kmsg, kvm, vsock...; mknod refused or
# useless (nodev). Devices are opened read-only and never read or written.
import stat as _stat

ALLOWED = {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "console", "pts", "shm", "fd", "stdin",
           "stdout", "stderr", "core", "mqueue"}


def body():
    try:
        names = sorted(os.listdir("/dev"))
    except OSError as ex:
        contained("dev-list", ename(ex.errno))
        names = []
    extra = [n for n in names if n not in ALLOWED]
    (exposed if extra else contained)("dev-minimal", "extra entries: %s" % extra[:12] if extra else "%s" % names)
    for n in names:
        p = "/dev/" + n
        try:
            st = os.stat(p)
        except OSError:
            continue
        if _stat.S_ISBLK(st.st_mode):
            fd, e = try_open(p, os.O_RDONLY | os.O_NONBLOCK)
            if fd is not None:
                os.close(fd)
                escaped("open:" + p, "opened a block device")
            else:
                contained("open:" + p, ename(e))
    for p in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/kvm", "/dev/vsock", "/dev/fuse",
              "/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/mapper/control", "/dev/loop-control", "/dev/cpu/0/msr"):
        fd, e = try_open(p, os.O_RDONLY | os.O_NONBLOCK)
        if fd is not None:
            os.close(fd)
            escaped("open:" + p, "opened")
        elif e != errno.ENOENT:
            contained("open:" + p, ename(e))
    d = tmpdir("dev")
    if d:
        p = os.path.join(d, "mem")
        r, e = sc("mknod", p, _stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers: harmless
        if r == 0:
            fd, e2 = try_open(p, os.O_RDONLY)
            if fd is not None:
                os.close(fd)
                escaped("mknod", "created and opened a char device node (nodev missing)")
            else:
                contained("mknod", "created, but opening it: %s" % ename(e2))
            os.unlink(p)
        else:
            contained("mknod", ename(e))
        os.rmdir(d)


main(body)
