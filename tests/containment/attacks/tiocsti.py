# CVE-2017-5226: TIOCSTI pushes bytes into the input queue of the terminal the
# sandbox inherited; whoever reads it next (the user's shell) runs them. The
# runner runs this attack under a pty it owns and checks the queue afterwards.
TIOCSTI, TIOCLINUX = 0x5412, 0x541C


def body():
    tried = 0
    fds = [(str(fd), fd) for fd in (0, 1, 2)]
    fd, e = try_open("/dev/tty", os.O_RDWR | os.O_NONBLOCK)
    if fd is not None:
        fds.append(("/dev/tty", fd))
    else:
        contained("open(/dev/tty)", ename(e) + " (no controlling terminal)")
    for label, fd in fds:
        isatty = os.isatty(fd)
        ch = ctypes.c_char(b"#")
        r, e = sc("ioctl", fd, TIOCSTI, ctypes.addressof(ch))
        tried += 1
        if r == 0:
            escaped("TIOCSTI(%s)" % label, "injected a byte into the terminal's input queue")
        elif e in BLOCK_ERRNOS or e == errno.EIO:
            contained("TIOCSTI(%s)" % label, ename(e))
        elif e == errno.ENOTTY:
            contained("TIOCSTI(%s)" % label, "ENOTTY (fd is %s)" % ("a tty?!" if isatty else "not a terminal"))
        else:
            exposed("TIOCSTI(%s)" % label, "reached the tty layer unfiltered (%s)" % ename(e))
    try:
        sid, pgrp = os.getsid(0), os.getpgrp()
        print("@@INFO session %d pgrp %d pid %d" % (sid, pgrp, os.getpid()))
    except OSError:
        pass


main(body)
