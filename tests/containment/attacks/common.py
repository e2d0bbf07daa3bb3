# Shared helpers for every attack. The runner prepends this file to each
# attack and runs the result as `python3 -c CODE` through the sandbox prefix.
#
# Protocol (one line each, on stdout):
#   @@CHECK <CONTAINED|EXPOSED|ESCAPED|SKIP> <check-name> <detail>
#   @@VERDICT <CONTAINED|EXPOSED|ESCAPED|SKIP> <summary>
#   @@START <detail>          (limit attacks: proves the attack really ran)
# ESCAPED: the attack demonstrably got through (evidence in the detail).
# EXPOSED: no escape shown, but the layer that should stop it is missing
#          (e.g. the syscall reached the kernel's argument checks unfiltered).
# CONTAINED: the operation was refused.
# Anything else (crash, no verdict line) is judged ERROR by the runner.
#
# Everything an attack does must be harmless when it is run WITHOUT a
# sandbox (the runner's self-validation does exactly that, as root): files
# are only opened for writing, never written, except files the attack
# created itself; privileged syscalls get arguments that fail after the
# permission check; mounts happen in a private mount namespace when one can
# be made; state-changing calls run in a forked child.
import ctypes, errno, json, os, signal, socket, struct, sys, time, traceback

P = json.loads(PARAMS_JSON)  # noqa: F821  (set by the runner)
libc = ctypes.CDLL(None, use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long
_KEEP = []
_RESULTS = []

# x86_64 syscall numbers (called by number, never through libc wrappers).
NR = dict(
    read=0, write=1, open=2, close=3, ioctl=16, getpid=39, socket=41, connect=42,
    clone=56, fork=57, pivot_root=155, kill=62, uname=63, ptrace=101, syslog=103, getpgid=121,
    getsid=124, capget=125, personality=135, sched_getscheduler=145, adjtimex=159,
    chroot=161, acct=163, settimeofday=164, mount=165, umount2=166, swapon=167,
    swapoff=168, reboot=169, iopl=172, ioperm=173, init_module=175, delete_module=176,
    quotactl=179, lookup_dcookie=212, clock_settime=227, kexec_load=246, add_key=248,
    request_key=249, keyctl=250, unshare=272, perf_event_open=298,
    name_to_handle_at=303, open_by_handle_at=304, clock_adjtime=305, setns=308,
    process_vm_readv=310, process_vm_writev=311, finit_module=313, kexec_file_load=320,
    bpf=321, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
    io_uring_register=427, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
    fsmount=432, fspick=433, pidfd_open=434, clone3=435, mount_setattr=442,
    prctl=157, mknod=133, openat=257, faccessat=269, faccessat2=439,
)
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
BLOCK_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOSYS)


def _arg(a):
    if a is None:
        return ctypes.c_long(0)
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, (bytes, str)):
        b = ctypes.create_string_buffer(a.encode() if isinstance(a, str) else a)
        _KEEP.append(b)
        return ctypes.c_long(ctypes.addressof(b))
    _KEEP.append(a)
    return ctypes.c_long(ctypes.addressof(a))


def sc(nr, *args):
    """Raw syscall by number. Returns (ret, errno); errno is 0 on success."""
    if isinstance(nr, str):
        nr = NR[nr]
    ctypes.set_errno(0)
    r = _syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    return (r, ctypes.get_errno() if r == -1 else 0)


def ename(e):
    return errno.errorcode.get(e, str(e)) if e else "success"


def report(kind, check, detail):
    _RESULTS.append(kind)
    detail = str(detail).replace("\n", " | ")[:600]
    check = str(check).replace(" ", "_")
    print("@@CHECK %s %s %s" % (kind, check, detail), flush=True)


def escaped(check, detail):
    report("ESCAPED", check, detail)


def exposed(check, detail):
    report("EXPOSED", check, detail)


def contained(check, detail):
    report("CONTAINED", check, detail)


def skip(check, detail):
    report("SKIP", check, detail)


def judge(check, res, past_priv=True, ok=BLOCK_ERRNOS):
    """Judge a syscall result. Success: ESCAPED. A refusal errno: CONTAINED.
    Any other errno means the call reached the kernel's argument checks:
    ESCAPED if those come after the permission check (past_priv), else
    EXPOSED (the filter that should refuse it is missing)."""
    if isinstance(res, str):  # from in_child: killed by a signal (e.g. SIGSYS) or hung
        contained(check, res)
        return
    if res[0] == "exception":
        raise RuntimeError("%s: the probe itself failed: %s" % (check, res[1]))
    r, e = res
    if r is not None and r >= 0 and e == 0:
        escaped(check, "succeeded (ret %d)" % r)
    elif e in ok:
        contained(check, ename(e))
    elif past_priv:
        escaped(check, "passed the permission check, failed later with %s" % ename(e))
    else:
        exposed(check, "reached the kernel unfiltered (%s)" % ename(e))


def in_child(fn, timeout=10.0):
    """Run fn() in a forked child; returns its return value (JSON-able), or a
    string 'killed by signal N' / 'timed out'."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            out = fn()
        except BaseException as ex:  # noqa: BLE001
            out = ("exception", repr(ex))
        try:
            os.write(wfd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    deadline = time.time() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rfd)
            return "timed out"
        time.sleep(0.005)
    data = b""
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(rfd)
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    try:
        v = json.loads(data.decode())
    except ValueError:
        return "child gave no result (status %d)" % status
    return tuple(v) if isinstance(v, list) else v


def child_sc(nr, *args):
    """A raw syscall in a forked child (for calls that change process state)."""
    return in_child(lambda: sc(nr, *args))


def private_mount_ns():
    """In a child: try to get a private mount namespace so that a mount that
    succeeds (as it will without a sandbox) cannot touch the host's."""
    r, _ = sc("unshare", CLONE_NEWNS)
    if r == 0:
        sc("mount", None, "/", None, 0x4000 | 0x40000, None)  # MS_REC|MS_PRIVATE
        return True
    return False


def tmpdir(tag):
    for base in ("/tmp", "/dev/shm", "."):
        d = os.path.join(base, "nct-%s-%d-%d" % (tag, os.getpid(), int(time.time() * 1e6)))
        try:
            os.mkdir(d)
            return d
        except OSError:
            continue
    return None


def try_open(path, flags, mode=0):
    """os.open without raising: returns (fd or None, errno)."""
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode), 0
    except OSError as ex:
        return None, ex.errno


def proc_pids():
    out = []
    try:
        for n in os.listdir("/proc"):
            if n.isdigit():
                out.append(int(n))
    except OSError:
        pass
    return sorted(out)


def read_file(path, limit=1 << 20):
    with open(path, "rb") as f:
        return f.read(limit)


def finish():
    order = ["ESCAPED", "EXPOSED", "CONTAINED", "SKIP"]
    worst = next((k for k in order if k in _RESULTS), None)
    if worst is None:
        print("@@VERDICT ERROR no checks ran", flush=True)
    else:
        n = {k: _RESULTS.count(k) for k in order}
        print("@@VERDICT %s %s" % (worst, " ".join("%s=%d" % (k.lower(), v) for k, v in n.items() if v)), flush=True)


def main(body):
    try:
        body()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001
        print("@@ERROR " + traceback.format_exc().replace("\n", " | "), flush=True)
        if "ESCAPED" in _RESULTS:
            finish()
        sys.exit(3)
    finish()
