# Landlock / write policy: writes are allowed only under /tmp and rw
# workspace/mounts (P["allow_write"]). Any other directory that DAC and the
# mount flags would let us write (e.g. a 1777 /dev/shm, /var/tmp) must refuse.
# Only world-writable directories are tried (so an unsandboxed run stays tame).
def body():
    allow = tuple(a.rstrip("/") + "/" for a in P["allow_write"])
    candidates = []
    for top in os.listdir("/"):
        if top in ("proc", "sys"):
            continue
        root = "/" + top
        for dirpath, dirnames, _ in os.walk(root):
            if dirpath.count("/") > 3:
                dirnames[:] = []
                continue
            try:
                st = os.stat(dirpath)
            except OSError:
                continue
            if (dirpath + "/").startswith(allow):
                continue
            if st.st_mode & 0o002:
                candidates.append(dirpath)
            if len(candidates) > 200:
                break
    wrote = []
    for d in candidates:
        p = os.path.join(d, "nct-ll-%d" % os.getpid())
        fd, e = try_open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if fd is not None:
            os.close(fd)
            os.unlink(p)
            wrote.append(d)
        else:
            contained("write:" + d, ename(e))
    host = [d for d in wrote if P["host_dirs"].get(d) == [os.stat(d).st_dev, os.stat(d).st_ino]]
    if host:
        escaped("write-host-dir", "created files (removed again) in the HOST's %s" % host[:8])
    if wrote:
        exposed("write-outside-policy", "created files (removed again) in: %s (policy allows only %s)"
                % (wrote[:8], list(allow)))
    elif not candidates:
        contained("write-outside-policy", "no world-writable or own directory outside %s" % list(allow))
    # /tmp itself must work (a policy that blocks everything is broken).
    try:
        p = "/tmp/nct-ll-ok-%d" % os.getpid()
        with open(p, "w") as f:
            f.write("x")
        os.unlink(p)
        print("@@INFO /tmp writable")
    except OSError as ex:
        print("@@INFO /tmp not writable: %s" % ename(ex.errno))
    try:
        print("@@INFO landlock ABI %d" % sc(444, None, 0, 1)[0])  # landlock_create_ruleset(VERSION)
    except Exception:  # noqa: BLE001
        pass


main(body)
