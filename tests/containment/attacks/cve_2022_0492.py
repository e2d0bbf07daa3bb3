# CVE-2022-0492: a writable cgroup v1 release_agent runs a program as host
# root. Look for any writable release_agent / notify_on_release / cgroup
# control file, and try to mount cgroup v1 ourselves. Opened, never written.
def scan(root, found, limit=4000):
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for fn in filenames:
            n += 1
            if n > limit:
                return
            if fn in ("release_agent", "notify_on_release", "cgroup.procs", "tasks", "memory.limit_in_bytes",
                      "memory.max", "pids.max", "cgroup.subtree_control"):
                p = os.path.join(dirpath, fn)
                r = sc("faccessat", -100, p, 2)
                if r[1] == 0:
                    found.append(p)


def body():
    found = []
    if os.path.isdir("/sys/fs/cgroup"):
        scan("/sys/fs/cgroup", found)
    ra = [p for p in found if p.endswith("release_agent")]
    if ra:
        escaped("release_agent-writable", "writable: %s" % ra[:3])
    else:
        contained("release_agent-writable", "no writable release_agent under /sys/fs/cgroup")
    other = [p for p in found if not p.endswith("release_agent")]
    if other:
        escaped("cgroup-files-writable", "writable cgroup control files (limits can be raised / tasks moved): %s" % other[:4])
    else:
        contained("cgroup-files-writable", "none writable")

    def mount_v1():
        d = tmpdir("cg")
        if d is None:
            return ("nodir",)
        if not private_mount_ns():
            # the original exploit: unshare -UrmC, then mount cgroup v1
            sc("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP)
        res = None
        for opts in ("rdma", "memory", "none,name=nct"):
            r = sc("mount", "cgroup", d, "cgroup", 0, opts)
            if r[0] == 0:
                ra = os.path.join(d, "release_agent")
                w = os.path.exists(ra) and sc("faccessat", -100, ra, 2)[1] == 0
                sc("umount2", d, 2)
                res = (0, 0, opts, bool(w))
                break
            res = (r[0], r[1], opts, False)
        os.rmdir(d)
        return res
    r = in_child(mount_v1)
    if isinstance(r, str):
        contained("mount-cgroup-v1", r)
    elif r[0] == "nodir":
        skip("mount-cgroup-v1", "no writable dir")
    elif r[0] == 0:
        (escaped if r[3] else exposed)("mount-cgroup-v1", "mounted cgroup v1 (%s); release_agent writable: %s"
                                       % (r[2], r[3]))
    else:
        contained("mount-cgroup-v1", ename(r[1]))


main(body)
