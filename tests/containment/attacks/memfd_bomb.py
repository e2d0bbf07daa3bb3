# memory limit, through memory no rlimit counts: pages written into a
# memfd (never mapped). A memory cgroup kills the sandbox; without one
# (rootless, not delegated) memfd_create must be refused rather than a limit
# claimed that does not hold. Bounded: P["mem_target_mib"].
def body():
    target = P["mem_target_mib"]
    try:
        fd = os.memfd_create("bomb")
    except OSError as e:
        print("@@START memfd_create refused: %s" % e, flush=True)
        contained("memfd-bomb", "memfd_create refused (%s)" % os.strerror(e.errno))
        return
    print("@@START writing up to %d MiB into a memfd (limit asked for: %s)" % (target, P.get("memory_limit")),
          flush=True)
    chunk = b"x" * (16 << 20)
    try:
        for i in range(target // 16):
            os.write(fd, chunk)
            print("@@PROGRESS %d" % ((i + 1) * 16), flush=True)
    except OSError as e:
        contained("memfd-bomb", "write refused after some MiB: %s" % os.strerror(e.errno))
        return
    escaped("memfd-bomb", "held %d MiB in a memfd: no memory limit" % target)


main(body)
