# The attacker of tests/vfork_window.rs, started by one exec of a
# long-lived sandbox and left running while the host starts many more.
# Until a command's process calls execve it shares init's address space
# (clone(CLONE_VM|CLONE_VFORK), see native/sys.rs clone_vfork), so this
# tries, in a loop, every way a process has to reach into another one,
# against init (pid 1) and against each new process as soon as its pid
# exists: /proc/PID/mem (read-write and read-only), /proc/PID/environ,
# process_vm_readv/writev, ptrace(SEIZE) and ptrace(ATTACH),
# pidfd_getfd, and re-opening or reading the links of /proc/PID/fd/N.
#
# A permitted attempt never changes anything: the process_vm_* calls name
# address 0x1000 (below mmap_min_addr, never mapped), so they fail with
# EFAULT once the kernel has allowed them; /proc/PID/mem is only opened
# and read at that address (EIO once allowed); a traced process is let go
# at once.
#
# argv: STOP REPORT READY PROGRESS. Runs until the file STOP exists
# (writing to PROGRESS every 20 ms how many processes it caught before
# their execve so far), then writes
# its counts to REPORT (per attempt kind: tries, successes, refusals by
# errno; the pids it saw, and how many of them before their execve; any
# success per kind and target: `init`, `window` (a process still bearing
# init's name, before its execve) or `exec` (after it)). Before that, a
# control: the same attempts against a child of its own (same uid, same
# Landlock domain), written to READY, which tells the host the race may
# start.

import ctypes
import errno
import os
import platform
import signal
import sys
import time

STOP, REPORT, READY, PROGRESS = sys.argv[1:5]
NR = {
    "x86_64": dict(ptrace=101, readv=310, writev=311, pidfd_open=434, pidfd_getfd=438),
    "aarch64": dict(ptrace=117, readv=270, writev=271, pidfd_open=434, pidfd_getfd=438),
}[platform.machine()]
PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 16, 17, 0x4206, 0x4207
WALL = 0x40000000
UNMAPPED = 0x1000
FDS = range(0, 8)

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


BUF = ctypes.create_string_buffer(64)
LOCAL = IoVec(ctypes.cast(BUF, ctypes.c_void_p), 64)
REMOTE = IoVec(UNMAPPED, 64)

# An attempt is one of: OK (the kernel let it through), GONE (no such
# process, or it had no memory any more: not counted), or the errno it was
# refused with.
OK, GONE = "ok", "gone"
GONE_ERRNOS = {errno.ENOENT, errno.ESRCH}


def sys_call(name, *args):
    r = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
    return r, (ctypes.get_errno() if r < 0 else 0)


def verdict(r, err, ok_errnos=()):
    if r >= 0 or err in ok_errnos:
        return OK
    return GONE if err in GONE_ERRNOS else err


def refused(e):
    return GONE if e.errno in GONE_ERRNOS else e.errno


def mem(pid, flags):
    try:
        fd = os.open(f"/proc/{pid}/mem", flags)
    except OSError as e:
        return refused(e)
    try:
        # A process without memory (a zombie) gives an open file that
        # reads nothing; a live one gives EIO at an unmapped address.
        return GONE if os.pread(fd, 8, UNMAPPED) == b"" else OK
    except OSError as e:
        return OK if e.errno == errno.EIO else e.errno
    finally:
        os.close(fd)


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return OK if f.read(64) else GONE
    except OSError as e:
        return refused(e)


def vm(pid, name):
    r, err = sys_call(name, pid, ctypes.addressof(LOCAL), 1, ctypes.addressof(REMOTE), 1, 0)
    return verdict(r, err, (errno.EFAULT,))


def let_go(pid):
    # Stop it (SEIZE) or wait for the SIGSTOP of ATTACH, then detach; never
    # block (whatever happens, the host's commands must go on and this
    # process must report).
    sys_call("ptrace", PTRACE_INTERRUPT, pid, 0, 0)
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, WALL | os.WNOHANG)[0] == pid:
                break
        except OSError:
            return
        time.sleep(0.001)
    sys_call("ptrace", PTRACE_DETACH, pid, 0, 0)


def ptrace(pid, request):
    r, err = sys_call("ptrace", request, pid, 0, 0)
    v = verdict(r, err)
    if v == OK:
        let_go(pid)
    return v


def getfd(pid):
    pidfd, err = sys_call("pidfd_open", pid, 0)
    if pidfd < 0:
        return verdict(pidfd, err)
    try:
        worst = GONE
        for n in FDS:
            # EBADF: allowed, but no such descriptor.
            r, err = sys_call("pidfd_getfd", pidfd, n, 0)
            v = verdict(r, err, (errno.EBADF,))
            if r >= 0:
                os.close(r)
            if v == OK:
                return OK
            if v != GONE:
                worst = v
        return worst
    finally:
        os.close(pidfd)


def fd_open(pid):
    worst = GONE
    for n in FDS:
        try:
            os.close(os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_NONBLOCK))
            return OK
        except OSError as e:
            # ENXIO: the link was followed to a socket, which cannot be
            # opened this way (allowed all the same).
            if e.errno == errno.ENXIO:
                return OK
            if e.errno not in GONE_ERRNOS:
                worst = e.errno
    return worst


def fd_readlink(pid):
    worst = GONE
    for n in FDS:
        try:
            os.readlink(f"/proc/{pid}/fd/{n}")
            return OK
        except OSError as e:
            if e.errno not in GONE_ERRNOS:
                worst = e.errno
    return worst


ATTEMPTS = [
    ("mem_rw", lambda p: mem(p, os.O_RDWR)),
    ("mem_ro", lambda p: mem(p, os.O_RDONLY)),
    ("environ", environ),
    ("vm_readv", lambda p: vm(p, "readv")),
    ("vm_writev", lambda p: vm(p, "writev")),
    ("ptrace_seize", lambda p: ptrace(p, PTRACE_SEIZE)),
    ("ptrace_attach", lambda p: ptrace(p, PTRACE_ATTACH)),
    ("pidfd_getfd", getfd),
    ("fd_open", fd_open),
    ("fd_readlink", fd_readlink),
]


# What the default seccomp filter refuses before the kernel looks at the pid.
SECCOMP_KINDS = {"vm_readv", "vm_writev", "ptrace_seize", "ptrace_attach", "pidfd_getfd"}


def name(v):
    return v if isinstance(v, str) else errno.errorcode.get(v, str(v))


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read()
    except OSError:
        return None


def control():
    """The same attempts against a child of our own: what 'allowed' looks
    like here (it proves the attempts work where the kernel permits)."""
    child = os.fork()
    if child == 0:
        while True:
            signal.pause()
    time.sleep(0.05)
    out = " ".join(f"{k}={name(f(child))}" for k, f in ATTEMPTS)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return out


def all_pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def main():
    me = os.getpid()
    init_comm = comm(1)
    tmp = READY + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"control {control()}\n")
    os.rename(tmp, READY)

    tries = {k: 0 for k, _ in ATTEMPTS}
    oks = {k: 0 for k, _ in ATTEMPTS}
    refusals = {k: {} for k, _ in ATTEMPTS}
    successes = {}  # (kind, target) -> [count, the first one's pid and name]
    seen, window_pids = set(), set()
    window_tries = rounds = 0
    try:
        last_pid = open("/proc/sys/kernel/ns_last_pid")
    except OSError:
        last_pid = None
    next_stop_check = 0.0
    while True:
        rounds += 1
        now = time.monotonic()
        if now >= next_stop_check:
            if os.path.exists(STOP):
                break
            next_stop_check = now + 0.02
            # How many processes were caught before their execve so far:
            # the host races on until there are enough.
            with open(PROGRESS + ".tmp", "w") as f:
                f.write(f"{len(window_pids)}\n")
            os.rename(PROGRESS + ".tmp", PROGRESS)
        # The newest pid and the next two (the host starts one command at a
        # time): caught between clone and execve if we are quick enough.
        # Every 32nd round (or without ns_last_pid) every pid there is.
        newest = None
        if last_pid is not None and rounds % 32:
            try:
                last_pid.seek(0)
                newest = int(last_pid.read())
            except (OSError, ValueError):
                newest = None
        pids = [newest, newest + 1, newest + 2] if newest else all_pids()
        for pid in [1] + [p for p in pids if p not in (1, me)]:
            results = [(k, f(pid)) for k, f in ATTEMPTS]
            # Read after the attempts: a process that still has init's name
            # then was attacked before its execve, on init's address space.
            # (A seccomp refusal does not say whether the pid exists, so
            # only pids that still exist, or that some attempt found, count.)
            name_now = comm(pid)
            present = [(k, v) for k, v in results if v != GONE]
            if name_now is None and all(k in SECCOMP_KINDS for k, _ in present):
                continue
            in_window = pid != 1 and name_now == init_comm
            if pid != 1:
                seen.add(pid)
                if in_window:
                    window_pids.add(pid)
                    window_tries += len(present)
            target = "init" if pid == 1 else ("window" if in_window else "exec")
            for k, v in present:
                tries[k] += 1
                if v != OK:
                    refusals[k][v] = refusals[k].get(v, 0) + 1
                else:
                    oks[k] += 1
                    key = (k, target)
                    if key not in successes:
                        successes[key] = [0, f"pid={pid} comm={(name_now or '?').strip()}"]
                    successes[key][0] += 1

    lines = [
        f"attempt {k} tries={tries[k]} ok={oks[k]} refused="
        + (",".join(f"{name(e)}:{n}" for e, n in sorted(refusals[k].items())) or "-")
        for k, _ in ATTEMPTS
    ]
    lines.append(
        f"pids observed={len(seen)} in_window={len(window_pids)} "
        f"window_tries={window_tries} rounds={rounds} init_comm={init_comm.strip()!r}"
    )
    lines += [
        f"success {k} target={t} count={n} first: {first}"
        for (k, t), (n, first) in sorted(successes.items())
    ]
    tmp = REPORT + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.rename(tmp, REPORT)


main()
