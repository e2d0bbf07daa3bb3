# Layer: read-only root. Nothing outside /tmp (and rw mounts) is writable.
def on_host(d):
    """Is directory d the host's very own (same device and inode)?"""
    try:
        st = os.stat(d)
    except OSError:
        return False
    return [st.st_dev, st.st_ino] == P["host_dirs"].get(d)


def body():
    tag = "nct-w-%d" % os.getpid()
    for d in ("/", "/usr", "/usr/bin", "/usr/lib", "/bin", "/lib", "/etc", "/sbin", "/proc", "/sys", "/dev"):
        if not os.path.isdir(d):
            continue
        p = os.path.join(d, tag)
        fd, e = try_open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if fd is not None:
            os.close(fd)
            os.unlink(p)
            if on_host(d):
                escaped("create:" + p, "created a file in the host's %s (removed again)" % d)
            else:
                exposed("create:" + p, "created a file (removed again); %s is not the host's, but writable" % d)
        else:
            contained("create:" + p, ename(e))
        try:
            os.mkdir(p + ".d")
            os.rmdir(p + ".d")
            (escaped if on_host(d) else exposed)("mkdir:" + p + ".d", "created a directory (removed again)%s"
                                                 % (" in the host's " + d if on_host(d) else ""))
        except OSError as ex:
            contained("mkdir:" + p + ".d", ename(ex.errno))
    # Existing files: opened for writing only (never written).
    for p in ("/usr/bin/env", "/bin/sh", "/etc/passwd", "/etc/hosts", "/etc/resolv.conf", "/usr/lib/os-release"):
        if not os.path.exists(p):
            continue
        fd, e = try_open(p, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        if fd is not None:
            os.close(fd)
            escaped("open-w:" + p, "opened for writing")
        else:
            contained("open-w:" + p, ename(e))
    # Metadata changes on the root's files.
    for p in ("/usr/bin/env", "/etc/passwd"):
        if not os.path.exists(p):
            continue
        st = os.stat(p)
        try:
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times: no real change
            escaped("utime:" + p, "changed timestamps (to the same values)")
        except OSError as ex:
            contained("utime:" + p, ename(ex.errno))
    try:
        st = os.statvfs("/")
        (contained if st.f_flag & os.ST_RDONLY else exposed)("root-readonly-flag", "statvfs(/) flags 0x%x" % st.f_flag)
    except OSError as ex:
        contained("root-readonly-flag", ename(ex.errno))


main(body)
