# Kernel pools shared with the host: inotify instances are charged to the
# owner of the sandbox's user namespace on the host (host root, rootful),
# whose pool is fs.inotify.max_user_instances (128 by default). A sandbox
# must not be able to take all of it: nanoclaw gives each sandbox's user
# namespace its own limit. Bounded: stops at 200 instances and closes them.
def body():
    fds = []
    err = 0
    while len(fds) < 200:
        fd = libc.inotify_init1(0)
        if fd < 0:
            err = ctypes.get_errno()
            break
        fds.append(fd)
    n = len(fds)
    for fd in fds:
        os.close(fd)
    try:
        pool = int(open("/proc/sys/fs/inotify/max_user_instances").read())
    except (OSError, ValueError):
        pool = 128
    if n >= min(pool, 200) - 8:
        escaped("inotify-instances", "opened %d inotify instances (the host pool is %d): the host and "
                "other sandboxes are starved" % (n, pool))
    else:
        contained("inotify-instances", "refused after %d instances (%s)" % (n, os.strerror(err)))


main(body)
