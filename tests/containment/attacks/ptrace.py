# Layers: seccomp + pid namespace + dumpable. No tracing or memory access of
# processes outside the sandbox, nor of the sandbox's own init/supervisor.
PTRACE_SEIZE, PTRACE_ATTACH = 0x4206, 16


def is_host_init(pid):
    try:
        st = read_file("/proc/%d/stat" % pid).decode()
        return int(st.rsplit(")", 1)[1].split()[19]) == P["host_init_starttime"]
    except (OSError, ValueError, IndexError):
        return False


def body():
    targets = [("host_sleeper", P["sleeper_pid"]), ("parent", os.getppid())]
    if not is_host_init(1):
        targets.append(("pid1", 1))
    else:
        escaped("pid1", "pid 1 is the host's init; not touching it")
    for label, pid in targets:
        if pid == os.getpid() or pid <= 0:
            continue
        # PTRACE_SEIZE does not stop the tracee; the child exits at once, which detaches.
        judge("ptrace_seize(%s=%d)" % (label, pid), child_sc("ptrace", PTRACE_SEIZE, pid, 0, 0),
              ok=BLOCK_ERRNOS + (errno.ESRCH,))
        buf = ctypes.create_string_buffer(8)
        local = (ctypes.c_ulong * 2)(ctypes.addressof(buf), 8)
        remote = (ctypes.c_ulong * 2)(0x1000, 8)  # unmapped: EFAULT once access is granted
        r = sc("process_vm_readv", pid, local, 1, remote, 1, 0)
        if r[1] == errno.ESRCH:
            contained("process_vm_readv(%s=%d)" % (label, pid), "ESRCH")
        else:
            judge("process_vm_readv(%s=%d)" % (label, pid), r)
        try:
            fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
            os.close(fd)
            escaped("open(/proc/%d/mem)" % pid, "opened %s's memory" % label)
        except OSError as ex:
            contained("open(/proc/%d/mem)" % pid, ename(ex.errno))


main(body)
