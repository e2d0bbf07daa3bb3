# Layer: filesystem view. Host secrets and host folders must be invisible.
import hashlib


def body():
    # 1. Marker files the runner planted on the host (/tmp, /var/tmp, /dev/shm, /root, /run, /home ...).
    for m in P["host_markers"]:
        try:
            data = read_file(m["path"])
            if hashlib.sha256(data.strip()).hexdigest() == m["sha256"]:
                escaped("marker:" + m["path"], "read the host's secret marker file")
            else:
                contained("marker:" + m["path"], "a file exists there but it is not the host's")
        except OSError as ex:
            contained("marker:" + m["path"], ename(ex.errno))
    # 2. Classic secrets.
    for path in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh/ssh_host_ed25519_key",
                 "/etc/ssh/ssh_host_rsa_key", "/root/.ssh/id_rsa", "/root/.bash_history",
                 "/var/log/auth.log", "/run/docker.sock"):
        try:
            data = read_file(path, 4096)
            escaped("read:" + path, "read %d bytes" % len(data))
        except OSError as ex:
            if ex.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(path):
                exposed("read:" + path, "exists (visible) but %s" % ename(ex.errno))
            else:
                contained("read:" + path, ename(ex.errno))
    # 3. Host-only /etc entries: the sandbox's /etc must be synthetic.
    try:
        seen = set(os.listdir("/etc"))
        leaked = sorted(seen & set(P["host_etc_sensitive"]))
        if leaked:
            exposed("etc-synthetic", "host-only /etc entries visible: %s" % leaked[:10])
        else:
            contained("etc-synthetic", "%d entries, none host-only" % len(seen))
    except OSError as ex:
        contained("etc-synthetic", ename(ex.errno))
    # 4. Host top-level folders (/root, /home, /var, /run, /work, /opt, ...):
    #    their host contents must not be visible.
    for top, sample in sorted(P["host_toplevel"].items()):
        path = "/" + top
        try:
            names = set(os.listdir(path))
        except OSError as ex:
            contained("dir:" + path, ename(ex.errno))
            continue
        common = sorted(names & set(sample))
        if common:
            escaped("dir:" + path, "host folder visible, e.g. %s" % common[:5])
        else:
            contained("dir:" + path, "exists with %d entries, none from the host" % len(names))


main(body)
