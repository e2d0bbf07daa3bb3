# CVE-2024-21626 class: a leaked directory fd or cwd pointing at the host
# (runc leaked /sys/fs/cgroup as fd 7 and let workdir=/proc/self/fd/7) lets
# code walk '..' to the host root. We look for the runner's host marker dir.
import stat as _stat

MD = P["host_marker_dir"]


def host_marker_reached(path):
    """True if path, or one of its ancestors reached with '..', shows the host marker."""
    for depth in range(0, 24):
        p = path + "/.." * depth if depth else path
        for rel in (MD["rel_from_root"], os.path.basename(MD["path"])):
            try:
                st = os.stat(p + "/" + rel)
                if (st.st_dev, st.st_ino) == (MD["dev"], MD["ino"]):
                    return p + "/" + rel
            except OSError:
                pass
        try:
            st = os.stat(p)
            if (st.st_dev, st.st_ino) == (MD["dev"], MD["ino"]):
                return p
        except OSError:
            pass
    return None


def body():
    # Leaked fds in our own process: anything above stdio was left open by the runtime.
    leaked = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            link = os.readlink("/proc/self/fd/%d" % fd)
            os.fstat(fd)
        except OSError:
            continue  # the fd used to list the directory itself
        leaked.append("%d->%s" % (fd, link))
    if leaked:
        exposed("leaked-fds", "fds above 2 open at start: %s" % leaked[:8])
    else:
        contained("leaked-fds", "only stdio open")
    candidates = [".", "/proc/self/cwd", "/proc/self/root", "/"]
    for pid in proc_pids():
        candidates += ["/proc/%d/cwd" % pid, "/proc/%d/root" % pid]
        try:
            for name in os.listdir("/proc/%d/fd" % pid):
                p = "/proc/%d/fd/%s" % (pid, name)
                try:
                    if _stat.S_ISDIR(os.stat(p).st_mode):
                        candidates.append(p)
                except OSError:
                    pass
        except OSError:
            pass
    hits = []
    for c in candidates:
        h = host_marker_reached(c)
        if h:
            hits.append("%s => %s" % (c, h))
    if hits:
        escaped("walk-to-host", "reached the host marker dir: %s" % hits[:4])
    else:
        contained("walk-to-host", "%d candidate paths (cwd, root, dir fds of every visible pid) walked" % len(candidates))
    try:
        cwd = os.getcwd()
        print("@@INFO cwd %s" % cwd)
    except OSError as ex:
        exposed("getcwd", "cwd is outside the root (%s)" % ename(ex.errno))


main(body)
