# Layers: seccomp + capabilities. Dangerous syscalls, called by number.
# Each group is its own attack (P["group"]). Arguments are chosen so that a
# call that gets through does no harm: it fails on its arguments AFTER the
# kernel's permission check (=> ESCAPED), or it succeeds harmlessly inside a
# forked child.


class KexecSeg(ctypes.Structure):
    _fields_ = [("a", ctypes.c_ulong * 4)]


def g_mount():
    d = tmpdir("mnt")
    if d is None:
        skip("tmpdir", "no writable directory for a mount point")
        return

    def do_mount():
        private_mount_ns()
        r = sc("mount", "none", d, "tmpfs", 0, None)
        if r[0] == 0:
            sc("umount2", d, 2)  # MNT_DETACH
        return r
    judge("mount(tmpfs)", in_child(do_mount))

    def do_bind():
        private_mount_ns()
        r = sc("mount", "/", d, None, 0x1000, None)  # MS_BIND
        if r[0] == 0:
            sc("umount2", d, 2)
        return r
    judge("mount(bind /)", in_child(do_bind))
    judge("umount2(not-a-mountpoint)", child_sc("umount2", d, 0))  # EPERM, else EINVAL after may_mount()
    judge("pivot_root", child_sc("pivot_root", d, d))  # EPERM, else EINVAL after may_mount()
    judge("chroot", child_sc("chroot", d))
    judge("fsopen(tmpfs)", child_sc("fsopen", "tmpfs", 0))
    judge("fsconfig(-1)", sc("fsconfig", -1, 0, None, None, 0), past_priv=False)
    judge("fsmount(-1)", sc("fsmount", -1, 0, 0))
    judge("fspick(/)", child_sc("fspick", -100, "/", 0))
    judge("move_mount(-1)", sc("move_mount", -1, "", -1, "", 0))
    judge("open_tree(/,CLONE)", child_sc("open_tree", -100, "/", 1))  # OPEN_TREE_CLONE
    attr = (ctypes.c_uint64 * 4)(0, 0, 0, 0)
    judge("mount_setattr(noop)", sc("mount_setattr", -100, d, 0, attr, 32), past_priv=False)
    os.rmdir(d)


def g_namespaces():
    for name, flags in (("NEWUSER", CLONE_NEWUSER), ("NEWNS", CLONE_NEWNS), ("NEWNET", CLONE_NEWNET),
                        ("NEWPID", CLONE_NEWPID), ("NEWCGROUP", CLONE_NEWCGROUP),
                        ("NEWUSER|NEWNS", CLONE_NEWUSER | CLONE_NEWNS)):
        judge("unshare(%s)" % name, child_sc("unshare", flags))

    def do_clone():
        r, e = sc("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        return (r, e)
    judge("clone(NEWUSER)", in_child(do_clone))

    def do_clone3():
        args = (ctypes.c_uint64 * 11)(CLONE_NEWUSER, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, 0)
        r, e = sc("clone3", args, 88)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        return (r, e)
    judge("clone3(NEWUSER)", in_child(do_clone3))

    def do_setns():
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        return sc("setns", fd, CLONE_NEWNET)
    judge("setns(own netns)", in_child(do_setns))


def g_kernel_features():
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = 2, 4, 4, 1  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    judge("bpf(MAP_CREATE)", child_sc("bpf", 0, attr, 128))
    pe = (ctypes.c_uint8 * 128)()
    struct.pack_into("IIQ", pe, 0, 1, 128, 0)  # PERF_TYPE_SOFTWARE, size, PERF_COUNT_SW_CPU_CLOCK
    struct.pack_into("Q", pe, 40, (1 << 0) | (1 << 5) | (1 << 6))  # disabled, exclude_kernel, exclude_hv
    judge("perf_event_open(sw clock, self)", child_sc("perf_event_open", pe, 0, -1, -1, 0))
    judge("keyctl(GET_KEYRING_ID session)", child_sc("keyctl", 0, -3, 0))
    judge("add_key(user, process keyring)", child_sc("add_key", "user", "nct", "x", 1, -2))
    judge("request_key(user)", child_sc("request_key", "user", "nct-nonexistent", None, 0))
    params = (ctypes.c_uint8 * 120)()
    judge("io_uring_setup(1)", child_sc("io_uring_setup", 1, params))
    judge("io_uring_enter(-1)", sc("io_uring_enter", -1, 0, 0, 0, None, 0), past_priv=False)
    judge("io_uring_register(-1)", sc("io_uring_register", -1, 0, None, 0), past_priv=False)
    judge("userfaultfd(USER_MODE_ONLY)", child_sc("userfaultfd", 0o2000000 | 1))
    judge("userfaultfd(0)", child_sc("userfaultfd", 0o2000000))

    def do_personality():
        r = sc("personality", 0x0040000)  # ADDR_NO_RANDOMIZE
        if r[1]:
            return r
        # A filter might fake success: look at what is really in effect.
        return (0, 0) if sc("personality", 0xffffffff)[0] & 0x0040000 else (-1, errno.EPERM)
    judge("personality(ADDR_NO_RANDOMIZE)", in_child(do_personality))


def g_system_admin():
    judge("kexec_load(bogus flags)", sc("kexec_load", 0, 0, None, 0x8000))
    judge("kexec_file_load(bogus flags)", sc("kexec_file_load", -1, -1, 0, None, 0x8000))
    judge("init_module(NULL)", sc("init_module", None, 0, ""))
    judge("finit_module(-1)", sc("finit_module", -1, "", 0))
    judge("delete_module(nonexistent)", sc("delete_module", "nct_nonexistent_module", 0o4000))
    judge("reboot(bad magic)", sc("reboot", 0, 0, 0, None))
    judge("swapon(nonexistent)", sc("swapon", "/nct-nonexistent-swap", 0))
    judge("swapoff(nonexistent)", sc("swapoff", "/nct-nonexistent-swap"))
    judge("settimeofday(NULL,NULL)", sc("settimeofday", None, None))
    ts = (ctypes.c_long * 2)(0, -1)
    judge("clock_settime(invalid ts)", sc("clock_settime", 0, ts), past_priv=False)
    tx = (ctypes.c_uint8 * 512)()
    struct.pack_into("I", tx, 0, 0x4000)  # ADJ_TICK with tick 0: EPERM, else EINVAL after the check
    judge("adjtimex(ADJ_TICK 0)", sc("adjtimex", tx))
    judge("clock_adjtime(ADJ_TICK 0)", sc("clock_adjtime", 0, tx))
    judge("acct(nonexistent)", sc("acct", "/nct-nonexistent-acct"))
    judge("syslog(SIZE_BUFFER)", sc("syslog", 10, None, 0))
    judge("iopl(3)", child_sc("iopl", 3))
    judge("ioperm(0x80)", child_sc("ioperm", 0x80, 1, 1))
    judge("quotactl(Q_SYNC)", sc("quotactl", (0x800001 << 8) | 0, None, 0, None), past_priv=False)
    judge("lookup_dcookie", sc("lookup_dcookie", 0, None, 0), past_priv=False)


def g_handles():
    fh = (ctypes.c_uint8 * 136)()
    struct.pack_into("I", fh, 0, 128)
    mnt = ctypes.c_int(0)
    r = sc("name_to_handle_at", -100, "/", fh, mnt, 0)
    judge("name_to_handle_at(/)", r, past_priv=False)
    if r[0] != 0:
        struct.pack_into("Ii", fh, 0, 8, 1)  # a made-up handle
    judge("open_by_handle_at", sc("open_by_handle_at", -100, fh, 0))


def body():
    {"mount": g_mount, "namespaces": g_namespaces, "kernel_features": g_kernel_features,
     "system_admin": g_system_admin, "handles": g_handles}[P["group"]]()


main(body)
