# Layer: network namespace. Loopback only; the host's listeners unreachable.
def body():
    for fam, host, port, label in ((socket.AF_INET, "127.0.0.1", P["tcp_port"], "tcp4"),
                                   (socket.AF_INET6, "::1", P["tcp6_port"], "tcp6")):
        if not port:
            continue
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((host, port))
            s.sendall(P["marker"].encode())
            reply = s.recv(64)
            if reply.startswith(b"HOST-LISTENER"):
                escaped("connect-host-" + label, "reached the host's listener on %s:%d (%r)" % (host, port, reply))
            else:
                contained("connect-host-" + label, "connected to something else (%r)" % reply)
        except OSError as ex:
            contained("connect-host-" + label, ename(ex.errno) if ex.errno else repr(ex))
        finally:
            s.close()
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(P["marker"].encode(), ("127.0.0.1", P["udp_port"]))
        u.close()
        contained("udp-host", "sent; the runner checks whether the host received it")
    except OSError as ex:
        contained("udp-host", ename(ex.errno))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect("\0" + P["abstract_name"])
        s.sendall(P["marker"].encode())
        escaped("abstract-unix", "connected to the host's abstract socket @%s" % P["abstract_name"])
        s.close()
    except OSError as ex:
        contained("abstract-unix", ename(ex.errno))
    try:
        names = sorted(n for _, n in socket.if_nameindex())
    except OSError as ex:
        names = None
        contained("interfaces", "if_nameindex: " + ename(ex.errno))
    if names is not None:
        extra = [n for n in names if n != "lo"]
        if extra:
            escaped("interfaces", "non-loopback interfaces present: %s" % extra)
        else:
            contained("interfaces", "only %s" % names)
    try:
        routes = read_file("/proc/net/route").decode().splitlines()[1:]
        routes = [r.split()[0] for r in routes if r.strip()]
        if any(r != "lo" for r in routes):
            escaped("routes", "IPv4 routes out: %s" % routes)
        else:
            contained("routes", "no IPv4 route except loopback")
    except OSError as ex:
        contained("routes", ename(ex.errno))


main(body)
