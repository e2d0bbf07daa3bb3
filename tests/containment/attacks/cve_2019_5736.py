# CVE-2019-5736 class: no path inside the sandbox (/proc/*/exe, /proc/*/fd/*,
# /proc/*/map_files/*) may open the host's runtime binary (or any host file)
# for writing. Files are opened for writing, never written. ETXTBSY counts as
# an escape: permission was granted, the runc exploit just waits for the
# process to exit. The runner also hashes the runtime binary before/after.
import hashlib
import stat as _stat

SELF = os.getpid()
SANDBOX_WRITABLE = ("/tmp/", "/dev/shm/", "/workspace/", "/dev/pts/", "pipe:", "socket:", "anon_inode:")


def writable_target(check, path, really_open=False):
    """Can `path` be opened for writing? For exe links we really open (a running
    binary answers ETXTBSY, so nothing can be written); for other processes' fds
    and mapped files we ask the kernel with faccessat(W_OK), which checks the same
    permissions and read-only mounts without taking a write reference."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not _stat.S_ISREG(st.st_mode):
        return
    try:
        link = os.readlink(path)
    except OSError:
        link = "?"
    if really_open:
        fd, e = try_open(path, os.O_WRONLY | os.O_NONBLOCK)
        if fd is not None:
            os.close(fd)
    else:
        fd, e = None, sc("faccessat", -100, path, 2)[1]
        if e == 0:
            fd = -1
    if fd is not None:
        if link.startswith(SANDBOX_WRITABLE) or link.startswith("/memfd:"):
            contained(check, "writable, but it is the sandbox's own file %s" % link)
        else:
            escaped(check, "%s (-> %s) can be opened for writing" % (path, link))
    elif e == errno.ETXTBSY:
        # Busy now; would it be writable once the process exits? (EROFS and
        # permissions are checked after ETXTBSY by open, so ask access().)
        a = sc("faccessat", -100, path, 2)[1]
        if a == 0:
            escaped(check, "ETXTBSY for %s (-> %s): writable as soon as the process exits" % (path, link))
        else:
            contained(check, "%s -> %s: ETXTBSY now, %s otherwise" % (path, link, ename(a)))
    else:
        contained(check, "%s -> %s: %s" % (path, link, ename(e)))


def body():
    sizes = {h["size"]: h["sha256"] for h in P["protect_hashes"]}
    n = 0
    for pid in proc_pids():
        base = "/proc/%d" % pid
        exe = base + "/exe"
        if os.path.lexists(exe):
            n += 1
            writable_target("exe[%d]" % pid, exe, really_open=True)
            try:
                st = os.stat(exe)
                if st.st_size in sizes:
                    with open(exe, "rb") as f:
                        if hashlib.sha256(f.read()).hexdigest() == sizes[st.st_size]:
                            exposed("exe[%d]-is-runtime" % pid,
                                    "%s is the host's runtime binary (readable from inside)" % exe)
            except OSError:
                pass
        if pid == SELF:
            continue
        for sub in ("fd", "map_files"):
            try:
                names = os.listdir(base + "/" + sub)
            except OSError as ex:
                if sub == "map_files" and pid in (1, os.getppid()):
                    contained("%s[%d]" % (sub, pid), "listing: " + ename(ex.errno))
                continue
            for name in names:
                writable_target("%s[%d]/%s" % (sub, pid, name), "%s/%s/%s" % (base, sub, name))
                n += 1
    # Our own mapped files (python, libc) through map_files: needs CAP_SYS_ADMIN.
    try:
        for name in os.listdir("/proc/self/map_files")[:40]:
            writable_target("map_files[self]/" + name, "/proc/self/map_files/" + name)
    except OSError as ex:
        contained("map_files[self]", ename(ex.errno))
    if n == 0:
        contained("proc", "no /proc/*/exe or fd visible")


main(body)
