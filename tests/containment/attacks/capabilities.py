# All five capability sets empty; no_new_privs on; seccomp filter on.
def body():
    st = read_file("/proc/self/status").decode()
    fields = dict(ln.split(":\t", 1) for ln in st.splitlines() if ":\t" in ln)
    for k in ("CapEff", "CapPrm"):
        v = int(fields.get(k, "0").strip(), 16)
        (escaped if v else contained)(k, "0x%x" % v)
    for k in ("CapInh", "CapBnd", "CapAmb"):
        v = int(fields.get(k, "0").strip(), 16)
        (exposed if v else contained)(k, "0x%x" % v)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
    data = (ctypes.c_uint32 * 6)()
    r, e = sc("capget", hdr, data)
    if r == 0:
        eff = data[0] | (data[3] << 32)
        (escaped if eff else contained)("capget-effective", "0x%x" % eff)
    else:
        contained("capget-effective", ename(e))
    r, e = sc("prctl", 39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
    if r == 1:
        contained("no_new_privs", "set")
    else:
        exposed("no_new_privs", "not set (%s)" % (ename(e) if r < 0 else r))
    sec = fields.get("Seccomp", "?").strip()
    (contained if sec == "2" else exposed)("seccomp-mode", "Seccomp: %s (2 = filter)" % sec)
    print("@@INFO uid %s gid %s groups %s" % (fields.get("Uid", "").split(), fields.get("Gid", "").split(), fields.get("Groups", "")))
    if os.geteuid() == 0:
        print("@@INFO running as uid 0 inside")


main(body)
