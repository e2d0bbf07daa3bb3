# Layers: seccomp (socket families) + capabilities (raw sockets). Sockets are
# only created, never connected (AF_VSOCK would reach the hypervisor).
FAMILIES = [
    ("AF_PACKET/RAW", 17, 3, 0x0300), ("AF_PACKET/DGRAM", 17, 2, 0x0300),
    ("AF_INET/RAW/ICMP", 2, 3, 1), ("AF_INET/RAW/RAW", 2, 3, 255), ("AF_INET6/RAW", 10, 3, 58),
    ("AF_INET/SOCK_PACKET", 2, 10, 0x0300),
    ("AF_VSOCK", 40, 1, 0), ("AF_ALG", 38, 5, 0), ("AF_BLUETOOTH", 31, 3, 1),
    ("AF_KEY", 15, 3, 2), ("AF_RDS", 21, 5, 0), ("AF_TIPC", 30, 5, 0), ("AF_CAN", 29, 3, 1),
    ("AF_XDP", 44, 3, 0), ("AF_LLC", 26, 2, 0), ("AF_X25", 9, 5, 0), ("AF_AX25", 3, 2, 0),
    ("AF_APPLETALK", 5, 2, 0), ("AF_NFC", 39, 5, 0), ("AF_KCM", 41, 2, 0), ("AF_QIPCRTR", 42, 2, 0),
    ("AF_SMC", 43, 1, 0), ("AF_MCTP", 45, 2, 0), ("AF_PPPOX", 24, 1, 0), ("AF_ATMPVC", 8, 5, 0),
]
# socket() errors that mean "the kernel looked at it" (no filter said no).
REACHED = (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EINVAL, errno.EPROTOTYPE)


def body():
    for name, fam, typ, proto in FAMILIES:
        r, e = sc("socket", fam, typ | 0o2000000, proto)
        if r >= 0:
            os.close(r)
            escaped("socket(%s)" % name, "created")
        elif e in (errno.EPERM, errno.EACCES):
            contained("socket(%s)" % name, ename(e))
        elif e in REACHED:
            exposed("socket(%s)" % name, "reached the kernel unfiltered (%s; this kernel lacks it)" % ename(e))
        else:
            exposed("socket(%s)" % name, "unexpected %s" % ename(e))
    # Allowed families must still work (a filter that kills all sockets is broken, not safe).
    for name, fam, typ in (("AF_UNIX", 1, 1), ("AF_INET", 2, 1), ("AF_INET6", 10, 1), ("AF_NETLINK", 16, 3)):
        r, e = sc("socket", fam, typ | 0o2000000, 0)
        if r >= 0:
            os.close(r)
        print("@@INFO socket(%s): %s" % (name, ename(e)))


main(body)
