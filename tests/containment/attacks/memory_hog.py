# memory limit: touching far more memory than the limit must end in an OOM
# kill of the sandbox (or an allocation failure). Bounded: P["mem_target_mib"].
def body():
    target = P["mem_target_mib"]
    print("@@START allocating up to %d MiB (limit asked for: %s)" % (target, P.get("memory_limit")), flush=True)
    chunks = []
    try:
        for i in range(target // 16):
            b = bytearray(16 << 20)
            for off in range(0, len(b), 4096):
                b[off] = 1
            chunks.append(b)
            print("@@PROGRESS %d" % ((i + 1) * 16), flush=True)
    except MemoryError:
        contained("memory-hog", "MemoryError after %d MiB" % (len(chunks) * 16))
        return
    escaped("memory-hog", "touched all %d MiB: no memory limit" % (len(chunks) * 16))


main(body)
