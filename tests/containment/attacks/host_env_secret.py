# The runner sets NANOCLAW_TEST_SECRET=<token> in the environment of the
# sandbox runtime. It must be nowhere inside: not our env, not any process's
# /proc/*/environ, cmdline or memory (/proc/*/mem, process_vm_readv).
SECRET = bytes.fromhex(P["secret_rev_hex"])[::-1]  # only ever rebuilt here


def scan_mem(pid):
    try:
        maps = read_file("/proc/%d/maps" % pid).decode().splitlines()
    except OSError as ex:
        return None, "maps: " + ename(ex.errno)
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    except OSError as ex:
        return None, "mem: " + ename(ex.errno)
    total = 0
    try:
        for ln in maps:
            parts = ln.split()
            if "r" not in parts[1] or (len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if hi - lo > (64 << 20):
                continue
            try:
                data = os.pread(fd, hi - lo, lo)
            except OSError:
                continue
            total += len(data)
            if SECRET in data:
                return True, "found in %s of pid %d" % (parts[0], pid)
    finally:
        os.close(fd)
    return False, "%d bytes scanned" % total


def body():
    if any(SECRET in v.encode() for v in os.environ.values()) or "NANOCLAW_TEST_SECRET" in os.environ:
        escaped("own-environ", "the host's secret env var was inherited")
    else:
        contained("own-environ", "%d vars, no host secret (%s)" % (len(os.environ), sorted(os.environ)[:12]))
    me = os.getpid()
    scanned = [0]  # memory of pid 1, the parent and a few others (bounded: no sandbox = the whole host)
    for pid in proc_pids():
        for what in ("environ", "cmdline"):
            try:
                data = read_file("/proc/%d/%s" % (pid, what), 4 << 20)
            except OSError as ex:
                if pid == 1:
                    contained("pid1-" + what, ename(ex.errno))
                continue
            if SECRET in data:
                escaped("%s[%d]" % (what, pid), "secret visible in /proc/%d/%s" % (pid, what))
            elif pid == 1:
                contained("pid1-" + what, "readable, no secret")
        if pid == me or (pid not in (1, os.getppid()) and scanned[0] >= 6):
            continue
        scanned[0] += 1
        found, detail = scan_mem(pid)
        if found:
            escaped("mem[%d]" % pid, detail)
        elif found is None:
            if pid in (1, os.getppid()):
                contained("mem[%d]" % pid, detail)
        else:
            print("@@INFO mem[%d] readable, no secret: %s" % (pid, detail))
    try:
        st = read_file("/proc/1/status").decode()
        print("@@INFO pid1 " + " ".join(ln for ln in st.splitlines() if ln.startswith(("Name", "Uid"))))
    except OSError:
        pass


main(body)
