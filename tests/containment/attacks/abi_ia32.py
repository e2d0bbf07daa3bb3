# Layer: seccomp on x86_64 must close the ia32 ABI (int 0x80) or filter it
# with ia32 numbers; a filter that only checks x86_64 numbers is bypassed.
import mmap

# f(nr, a1..a5): eax=nr, ebx,ecx,edx,esi,edi = a1..a5; int 0x80; return (long)eax
STUB = bytes.fromhex("5389f889f34989d289ca4489d14489c64489cfcd805b4863c0c3")
IA32 = dict(getpid=20, unshare=310, keyctl=288, kexec_load=283, init_module=128, mount=21,
            personality=136, socket=359, bpf=357, ptrace=26, setns=346, chroot=61)


def make_stub():
    """Executable memory below 4 GiB holding the stub (ia32 calls take 32-bit pointers)."""
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_32BIT
    addr = libc.mmap(None, 8192, 3, 0x02 | 0x20 | 0x40, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None, "mmap: " + ename(ctypes.get_errno())
    ctypes.memmove(addr, STUB, len(STUB))
    if libc.mprotect(addr, 4096, 5) != 0:  # PROT_READ|PROT_EXEC (page 2 stays RW for data)
        return None, "mprotect(PROT_EXEC): " + ename(ctypes.get_errno())
    f = ctypes.CFUNCTYPE(ctypes.c_long, *([ctypes.c_long] * 6))(addr)
    return (f, addr + 4096), None


def body():
    if os.uname().machine != "x86_64":
        skip("ia32", "not x86_64")
        return
    got, err = make_stub()
    if got is None:
        contained("ia32-stub", "cannot create executable memory (%s); no way to issue int 0x80 from here" % err)
        return
    f, data = got

    def put(off, s):
        b = s.encode() + b"\0"
        ctypes.memmove(data + off, b, len(b))
        return data + off

    def call(name, *a):
        a = list(a) + [0] * (5 - len(a))
        r = f(IA32[name], *a)
        return (r, 0) if r >= 0 else (-1, -r)

    r = in_child(lambda: call("getpid"))
    if isinstance(r, str):
        contained("ia32-getpid", r)
    elif r[0] > 0:
        exposed("ia32-getpid", "the ia32 ABI is reachable via int 0x80 (getpid=%d)" % r[0])
    else:
        contained("ia32-getpid", ename(r[1]))
    judge("ia32-unshare(NEWUSER)", in_child(lambda: call("unshare", CLONE_NEWUSER)))
    judge("ia32-keyctl", in_child(lambda: call("keyctl", 0, 0xfffffffd, 0)))
    judge("ia32-kexec_load", in_child(lambda: call("kexec_load", 0, 0, 0, 0x8000)))
    judge("ia32-init_module", in_child(lambda: call("init_module", 0, 0, put(0, ""))))
    d = tmpdir("ia32")

    def do_mount():
        private_mount_ns()
        r = call("mount", put(16, "none"), put(32, d or "/nonexistent"), put(512, "tmpfs"), 0, 0)
        if r[0] == 0:
            sc("umount2", d, 2)
        return r
    judge("ia32-mount(tmpfs)", in_child(do_mount))
    judge("ia32-chroot", in_child(lambda: call("chroot", put(32, d or "/"))))
    if d:
        os.rmdir(d)
    judge("ia32-socket(AF_PACKET)", in_child(lambda: call("socket", 17, 3, 0x0300)))
    judge("ia32-personality(ADDR_NO_RANDOMIZE)", in_child(lambda: call("personality", 0x0040000)))
    judge("ia32-ptrace(SEIZE parent)", in_child(lambda: call("ptrace", 0x4206, os.getppid(), 0, 0)))


main(body)
