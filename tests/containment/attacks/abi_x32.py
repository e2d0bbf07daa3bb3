# Layer: seccomp on x86_64 must close the x32 ABI (nr | 0x40000000), or a
# filter keyed on x86_64 numbers can be bypassed.
X32 = 0x40000000


def body():
    if os.uname().machine != "x86_64":
        skip("x32", "not x86_64")
        return
    res = child_sc(X32 | 39)  # getpid (in a child: a filter may kill with SIGSYS)
    if isinstance(res, str):
        contained("x32-getpid", res)
        r, e = -1, None
    else:
        r, e = res
    if e is None:
        pass
    elif e == errno.ENOSYS:
        contained("x32-getpid", "ENOSYS: x32 ABI closed (by the filter or because the kernel lacks CONFIG_X86_X32_ABI)")
    elif r > 0:
        exposed("x32-getpid", "the x32 ABI is reachable (getpid works)")
    else:
        contained("x32-getpid", ename(e))
    # Blocked x86_64 calls via the x32 numbers (same numbers for these).
    judge("x32-unshare(NEWUSER)", child_sc(X32 | NR["unshare"], CLONE_NEWUSER))
    judge("x32-keyctl", child_sc(X32 | NR["keyctl"], 0, -3, 0))
    judge("x32-kexec_load", child_sc(X32 | NR["kexec_load"], 0, 0, None, 0x8000))
    judge("x32-socket(AF_PACKET)", child_sc(X32 | NR["socket"], 17, 3, 0x0300))


main(body)
