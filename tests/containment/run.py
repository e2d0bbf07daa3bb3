#!/usr/bin/env python3
"""nanoclaw containment suite: hostile programs run through ANY sandbox
command prefix, each judged CONTAINED / EXPOSED / ESCAPED / ERROR.

    python3 tests/containment/run.py --nanoclaw target/x86_64-unknown-linux-gnu/debug/nanoclaw
    python3 tests/containment/run.py --prefix "nanoclaw run --" \\
        --pids-prefix "nanoclaw run --pids 64 --" --pids-limit 64 \\
        --memory-prefix "nanoclaw run --memory 64m --" --memory-limit 64
    python3 tests/containment/run.py --preset bwrap
    python3 tests/containment/run.py --preset bare --expect-escape   # self-validation

See README.md next to this file for what each attack does and how it is judged.
Exit status: 0 when every attack was CONTAINED (or SKIP), 1 otherwise, 2 on a
usage or setup error. With --expect-escape: 0 unless an attack ERRORed.
"""
import argparse
import fcntl
import glob
import hashlib
import json
import os
import pty
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import tty

HERE = os.path.dirname(os.path.abspath(__file__))
ATTACK_DIR = os.path.join(HERE, "attacks")

# name, file, layer, kind (normal | pids | memory | pty), extra params
ATTACKS = [
    ("fs_host_secrets", "fs_host_secrets.py", "filesystem view: host secrets and folders invisible", "normal", {}),
    ("fs_write_root", "fs_write_root.py", "read-only root, /usr, /etc", "normal", {}),
    ("landlock", "landlock.py", "write policy (Landlock): no writable 0777 dir outside /tmp", "normal", {}),
    ("dev_access", "dev_access.py", "minimal /dev, nodev", "normal", {}),
    ("proc_host_pids", "proc_host_pids.py", "pid namespace: host processes invisible/unsignalable", "normal", {}),
    ("ptrace", "ptrace.py", "ptrace / process_vm_readv / mem of others", "normal", {}),
    ("network", "network.py", "network namespace: loopback only, host listeners unreachable", "normal", {}),
    ("syscalls_mount", "syscalls.py", "seccomp+caps: mount, pivot_root, chroot, new mount API", "normal", {"group": "mount"}),
    ("syscalls_namespaces", "syscalls.py", "seccomp+caps: unshare/clone/clone3/setns", "normal", {"group": "namespaces"}),
    ("syscalls_kernel_features", "syscalls.py", "seccomp: bpf, perf, keyctl, io_uring, userfaultfd, personality",
     "normal", {"group": "kernel_features"}),
    ("syscalls_system_admin", "syscalls.py", "seccomp+caps: kexec, modules, reboot, swap, clock, acct, syslog, iopl",
     "normal", {"group": "system_admin"}),
    ("syscalls_handles", "syscalls.py", "seccomp+caps: name_to_handle_at / open_by_handle_at", "normal",
     {"group": "handles"}),
    ("socket_families", "socket_families.py", "seccomp+caps: packet, raw, vsock, alg, bluetooth... sockets", "normal", {}),
    ("abi_x32", "abi_x32.py", "seccomp: x32 ABI closed", "normal", {}),
    ("abi_ia32", "abi_ia32.py", "seccomp: ia32 (int 0x80) ABI closed", "normal", {}),
    ("tiocsti", "tiocsti.py", "CVE-2017-5226: TIOCSTI into the caller's terminal", "pty", {}),
    ("cve_2019_5736", "cve_2019_5736.py", "CVE-2019-5736: host runtime binary writable via /proc", "normal", {}),
    ("cve_2024_21626", "cve_2024_21626.py", "CVE-2024-21626: leaked fd / cwd to the host root", "normal", {}),
    ("cve_2022_0492", "cve_2022_0492.py", "CVE-2022-0492: cgroup release_agent", "normal", {}),
    ("proc_sysctl", "proc_sysctl.py", "host core_pattern and other sysctls read-only", "normal", {}),
    ("proc_sensitive", "proc_sensitive.py", "masked /proc (kcore, keys, sysrq-trigger...)", "normal", {}),
    ("sys_writes", "sys_writes.py", "/sys read-only, cgroupfs not writable", "normal", {}),
    ("host_env_secret", "host_env_secret.py", "runtime holds no host env (environ, mem)", "normal", {}),
    ("capabilities", "capabilities.py", "capabilities empty, no_new_privs, seccomp on", "normal", {}),
    ("setuid", "setuid.py", "setuid binaries do not elevate", "normal", {}),
    ("fork_bomb", "fork_bomb.py", "pids limit contains a fork bomb", "pids", {}),
    ("memory_hog", "memory_hog.py", "memory limit kills a memory hog", "memory", {}),
    ("memfd_bomb", "memfd_bomb.py", "memory limit holds for memfd pages (or memfd refused)", "memory", {}),
    ("inotify_exhaustion", "inotify_exhaustion.py", "own inotify limit: the host's pool cannot be taken",
     "normal", {}),
]

VERDICTS = ("CONTAINED", "SKIP", "EXPOSED", "ESCAPED", "ERROR")

BWRAP = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
         "--ro-bind-try", "/etc/alternatives", "/etc/alternatives", "--unshare-all", "--die-with-parent",
         "--new-session", "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
         "--setenv", "HOME", "/tmp", "--chdir", "/tmp", "--cap-drop", "ALL"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Listener:
    """A host-side TCP/UDP/abstract-unix listener that records what reaches it."""

    def __init__(self, family, kind, addr):
        self.hits = []
        self.sock = socket.socket(family, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.stream = kind == socket.SOCK_STREAM
        if self.stream:
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1] if family in (socket.AF_INET, socket.AF_INET6) else 0
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            try:
                if self.stream:
                    conn, _ = self.sock.accept()
                    conn.settimeout(2)
                    try:
                        conn.sendall(b"HOST-LISTENER\n")
                        data = conn.recv(256)
                    except OSError:
                        data = b"<connected>"
                    conn.close()
                else:
                    data, _ = self.sock.recvfrom(256)
                self.hits.append(data or b"<connected>")
            except socket.timeout:
                continue
            except OSError:
                if self.stop:
                    return
                time.sleep(0.05)

    def close(self):
        self.stop = True
        self.sock.close()


class Host:
    """Fixtures on the host that the attacks try to reach."""

    def __init__(self, args):
        self.args = args
        self.rand = secrets.token_hex(6)
        self.uid = os.geteuid()
        self.token = "nct-secret-" + secrets.token_hex(16)
        self.env_secret = "nct-env-" + secrets.token_hex(16)
        self.cleanup = []
        self.markers = []
        # marker dir in host /tmp (also the cwd we hand to the sandbox)
        self.marker_dir = "/tmp/nct-%s" % self.rand
        os.mkdir(self.marker_dir, 0o755)
        os.chmod(self.marker_dir, 0o755)
        self.cleanup.append(lambda: shutil.rmtree(self.marker_dir, ignore_errors=True))
        self._marker(os.path.join(self.marker_dir, "secret"))
        for base in ["/var/tmp", "/dev/shm"] + (["/root", "/run", "/home", "/var/lib", "/opt"] if self.uid == 0 else []):
            if os.path.isdir(base):
                self._marker(os.path.join(base, "nct-%s-secret" % self.rand))
        st = os.stat(self.marker_dir)
        self.marker_dir_info = {"path": self.marker_dir, "dev": st.st_dev, "ino": st.st_ino,
                                "rel_from_root": self.marker_dir.lstrip("/")}
        # a host process to find, signal and trace
        self.sleeper_tag = "nct-sleeper-%s" % self.rand
        self.start_sleeper()
        # listeners
        self.tcp = Listener(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
        try:
            self.tcp6 = Listener(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0))
        except OSError:
            self.tcp6 = None
        self.udp = Listener(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
        self.abstract_name = "nct-abstract-%s" % self.rand
        self.unix = Listener(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + self.abstract_name)
        # files whose content must not change
        self.protect = {}
        for p in args.protect:
            if p and os.path.isfile(p):
                self.protect[os.path.realpath(p)] = sha256_file(p)
        self.core_pattern = self.read_core_pattern()
        with open("/proc/1/stat") as f:
            self.init_starttime = int(f.read().rsplit(")", 1)[1].split()[19])
        self.toplevel = {}
        skip = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "tmp", "proc", "dev", "sys",
                "workspace", "lost+found"}
        for name in sorted(os.listdir("/")):
            p = "/" + name
            if name in skip or os.path.islink(p) or not os.path.isdir(p):
                continue
            try:
                sample = sorted(os.listdir(p))[:40]
            except OSError:
                continue
            if sample:
                self.toplevel[name] = sample
        sensitive = ["shadow", "gshadow", "shadow-", "gshadow-", "sudoers", "sudoers.d", "ssh", "crontab", "cron.d",
                     "docker", "systemd", "apt", "security", "pam.d", "subuid", "subgid", "machine-id", "fstab",
                     "environment", "ssl/private", "credstore"]
        self.etc_sensitive = [n for n in sensitive if os.path.lexists("/etc/" + n)]
        self.host_dirs = {}
        for d in ("/", "/usr", "/usr/bin", "/usr/lib", "/bin", "/lib", "/etc", "/sbin", "/proc", "/sys", "/dev",
                  "/dev/shm", "/var/tmp", "/run/lock", "/tmp", "/dev/mqueue"):
            try:
                st = os.stat(d)
                self.host_dirs[d] = [st.st_dev, st.st_ino]
            except OSError:
                pass

    def _marker(self, path):
        try:
            with open(path, "w") as f:
                f.write(self.token + "\n")
            os.chmod(path, 0o644)
        except OSError:
            return
        self.markers.append(path)
        self.cleanup.append(lambda: os.path.exists(path) and os.unlink(path))

    def start_sleeper(self):
        self.sleeper = subprocess.Popen([self.sleeper_tag, "3600"], executable=shutil.which("sleep") or "/bin/sleep",
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def read_core_pattern():
        try:
            with open("/proc/sys/kernel/core_pattern") as f:
                return f.read()
        except OSError:
            return None

    def params(self):
        return {
            "host_markers": [{"path": p, "sha256": hashlib.sha256(self.token.encode()).hexdigest()}
                             for p in self.markers],
            "host_marker_dir": self.marker_dir_info,
            "host_toplevel": self.toplevel,
            "host_etc_sensitive": self.etc_sensitive,
            "sleeper_pid": self.sleeper.pid,
            "sleeper_tag": self.sleeper_tag,
            "host_init_starttime": self.init_starttime,
            "tcp_port": self.tcp.port,
            "tcp6_port": self.tcp6.port if self.tcp6 else 0,
            "udp_port": self.udp.port,
            "abstract_name": self.abstract_name,
            "secret_rev_hex": self.env_secret.encode()[::-1].hex(),
            "protect_hashes": [{"size": os.path.getsize(p), "sha256": h} for p, h in self.protect.items()],
            "allow_write": self.args.allow_write,
            "host_dirs": self.host_dirs,
            "pids_limit": self.args.pids_limit,
            "pids_target": self.args.pids_target,
            "memory_limit": self.args.memory_limit,
            "mem_target_mib": self.args.memory_target,
        }

    def evidence(self, marker):
        """Runner-side checks after an attack: what reached or changed the host."""
        out = []
        mb = marker.encode()
        for name, lst in (("tcp 127.0.0.1", self.tcp), ("tcp ::1", self.tcp6), ("udp 127.0.0.1", self.udp),
                          ("abstract unix socket", self.unix)):
            if lst and any(mb in h or h == b"<connected>" for h in lst.hits):
                out.append("the host's %s listener was reached" % name)
            if lst:
                lst.hits.clear()
        if self.sleeper.poll() is not None:
            out.append("the host sleeper was killed (status %s)" % self.sleeper.returncode)
            self.start_sleeper()
        for p, h in self.protect.items():
            try:
                if sha256_file(p) != h:
                    out.append("protected host file %s was MODIFIED" % p)
                    self.protect[p] = sha256_file(p)
            except OSError as ex:
                out.append("protected host file %s is gone (%s)" % (p, ex))
        cp = self.read_core_pattern()
        if cp != self.core_pattern:
            out.append("host core_pattern CHANGED to %r" % cp)
            try:
                with open("/proc/sys/kernel/core_pattern", "w") as f:
                    f.write(self.core_pattern)
            except OSError:
                pass
        for p in self.markers:
            try:
                with open(p) as f:
                    if f.read().strip() != self.token:
                        out.append("host marker %s was modified" % p)
            except OSError:
                out.append("host marker %s was removed" % p)
        for d in ("/", "/usr", "/etc", "/var/tmp", "/dev/shm"):
            for p in glob.glob(os.path.join(d, "nct-*")):
                if p.startswith("/tmp/nct-%s" % self.rand) or self.rand in p:
                    continue
                if os.path.getmtime(p) > time.time() - 600 and marker_owner_is_us(p):
                    out.append("file left on the host: %s" % p)
        # Two scans 50 ms apart: a process caught mid-execve shows an empty
        # command line for a moment and would be missed by one scan.
        left = processes_with(mb)
        time.sleep(0.05)
        left = sorted(set(left) | set(processes_with(mb)))
        if left:
            out.append("%d process(es) outlived the sandbox: %s" % (len(left), left[:5]))
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        return out

    def close(self):
        for lst in (self.tcp, self.tcp6, self.udp, self.unix):
            if lst:
                lst.close()
        try:
            self.sleeper.kill()
            self.sleeper.wait()
        except OSError:
            pass
        for fn in reversed(self.cleanup):
            try:
                fn()
            except OSError:
                pass


def marker_owner_is_us(path):
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except OSError:
        return False


def processes_with(needle):
    me = os.getpid()
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d[6:])
        if pid == me:
            continue
        try:
            with open(d + "/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def build_code(file, params, marker):
    with open(os.path.join(ATTACK_DIR, "common.py")) as f:
        common = f.read()
    with open(os.path.join(ATTACK_DIR, file)) as f:
        attack = f.read()
    params = dict(params, marker=marker)
    return "# nct-marker %s\nPARAMS_JSON = %r\n%s\n%s\n" % (marker, json.dumps(params), common, attack)


def run_plain(argv, env, cwd, timeout):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err, False, None
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        return p.returncode, out, err, True, None


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        p.kill()
    except OSError:
        pass


def run_pty(argv, env, cwd, timeout):
    """Run with a pty as controlling terminal and stdio; afterwards read what is
    left in the terminal's input queue (bytes injected with TIOCSTI)."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # non-canonical, no echo: injected bytes are readable at once
    attrs = termios.tcgetattr(slave)
    attrs[6][termios.VMIN] = 0
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(slave, termios.TCSANOW, attrs)

    def pre():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, preexec_fn=pre,
                         close_fds=True)
    out = b""
    deadline = time.time() + timeout
    timed_out = False
    while True:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            out += chunk
        if p.poll() is not None and not r:
            break
        if time.time() > deadline:
            kill_group(p)
            timed_out = True
            p.wait()
            break
    p.wait()
    injected = b""
    try:
        fl = fcntl.fcntl(slave, fcntl.F_GETFL)
        fcntl.fcntl(slave, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        injected = os.read(slave, 4096)
    except OSError:
        pass
    os.close(slave)
    os.close(master)
    return p.returncode, out.replace(b"\r\n", b"\n"), b"", timed_out, injected


def judge(kind, rc, out, timed_out, evidence, injected):
    checks, verdict, started, infos = [], None, False, []
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("@@CHECK "):
            parts = line.split(" ", 3)
            checks.append({"verdict": parts[1], "check": parts[2], "detail": parts[3] if len(parts) > 3 else ""})
        elif line.startswith("@@VERDICT "):
            verdict = line.split(" ", 2)[1]
        elif line.startswith("@@START"):
            started = True
        elif line.startswith(("@@INFO ", "@@ERROR ", "@@PROGRESS ")):
            infos.append(line[2:])
    for e in evidence:
        checks.append({"verdict": "ESCAPED", "check": "host-evidence", "detail": e})
    if injected:
        checks.append({"verdict": "ESCAPED", "check": "tty-input-queue",
                       "detail": "the host terminal's input queue holds injected bytes %r" % injected[:40]})
    if any(c["verdict"] == "ESCAPED" for c in checks):
        return "ESCAPED", checks, infos
    if timed_out:
        return "ERROR", checks, infos + ["timed out (killed by the runner)"]
    if verdict in VERDICTS:
        return verdict, checks, infos
    if kind in ("pids", "memory") and started:
        how = ("killed by signal %d" % -rc) if rc < 0 else ("exit status %d" % rc)
        prog = [i for i in infos if i.startswith("PROGRESS")]
        checks.append({"verdict": "CONTAINED", "check": "sandbox-ended-it",
                       "detail": "%s, last %s" % (how, prog[-1] if prog else "progress: none")})
        return "CONTAINED", checks, infos
    return "ERROR", checks, infos


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", help="sandbox command prefix (shell words); the attack is appended: PREFIX python3 -c CODE")
    ap.add_argument("--pids-prefix", help="prefix that also sets a pids limit (default: --prefix)")
    ap.add_argument("--memory-prefix", help="prefix that also sets a memory limit (default: --prefix)")
    ap.add_argument("--pids-limit", type=int, default=None, help="the pids limit the pids prefix sets")
    ap.add_argument("--memory-limit", type=int, default=None, help="the memory limit (MiB) the memory prefix sets")
    ap.add_argument("--pids-target", type=int, default=None, help="fork-bomb size (default 4*limit+64, or 600)")
    ap.add_argument("--memory-target", type=int, default=None, help="MiB the hog touches (default 4*limit, or 1024)")
    ap.add_argument("--nanoclaw", metavar="BIN", help="shorthand: prefixes for `BIN run`, limits 64 pids / 64m")
    ap.add_argument("--preset", choices=["bare", "bwrap"], help="bare: no sandbox (self-validation); bwrap: bubblewrap")
    ap.add_argument("--python", default="python3", help="interpreter name or path as seen inside the sandbox")
    ap.add_argument("--protect", action="append", default=[], help="host file that must stay unchanged (repeatable); "
                    "the prefix's first word is always protected")
    ap.add_argument("--allow-write", action="append", default=None, help="directory the policy lets the sandbox write "
                    "(repeatable; default /tmp)")
    ap.add_argument("--only", help="comma-separated attack names (prefix match)")
    ap.add_argument("--skip", help="comma-separated attack names to leave out")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per attack before the runner kills it")
    ap.add_argument("--json-report", metavar="FILE", help="write the full results as JSON")
    ap.add_argument("--expect-escape", action="store_true",
                    help="self-validation with an unsandboxed prefix: report what could NOT escape; fail only on ERROR")
    ap.add_argument("--allow-exposed", action="store_true", help="do not fail on EXPOSED (layer missing, no escape)")
    ap.add_argument("--strict", action="store_true", help="fail on SKIP too")
    ap.add_argument("--list", action="store_true", help="list the attacks and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every check")
    a = ap.parse_args(argv)
    if a.list:
        return a
    if a.nanoclaw:
        b = a.nanoclaw
        a.prefix = a.prefix or shlex.join([b, "run", "--"])
        a.pids_prefix = a.pids_prefix or shlex.join([b, "run", "--pids", "64", "--"])
        a.memory_prefix = a.memory_prefix or shlex.join([b, "run", "--memory", "64m", "--"])
        a.pids_limit = a.pids_limit or 64
        a.memory_limit = a.memory_limit or 64
        a.protect.append(b)
    elif a.preset == "bare":
        a.prefix = a.prefix or "env"
    elif a.preset == "bwrap":
        extra = ["--unshare-user", "--uid", "1000", "--gid", "1000"] if os.geteuid() == 0 else []
        a.prefix = a.prefix or shlex.join(BWRAP + extra + ["--"])
        a.pids_prefix = a.pids_prefix or shlex.join(["prlimit", "--nproc=64"] + BWRAP + extra + ["--"])
        a.memory_prefix = a.memory_prefix or shlex.join(["prlimit", "--as=%d" % (256 << 20)] + BWRAP + extra + ["--"])
        a.pids_limit = a.pids_limit or 64
        a.memory_limit = a.memory_limit or 256
    if not a.prefix:
        ap.error("give --prefix, --nanoclaw or --preset")
    a.pids_prefix = a.pids_prefix or a.prefix
    a.memory_prefix = a.memory_prefix or a.prefix
    a.pids_target = a.pids_target or (4 * a.pids_limit + 64 if a.pids_limit else 600)
    a.memory_target = a.memory_target or (max(256, 4 * a.memory_limit) if a.memory_limit else 1024)
    a.allow_write = a.allow_write or ["/tmp"]
    first = shlex.split(a.prefix)[0]
    resolved = shutil.which(first)
    if resolved:
        a.protect.append(resolved)
    return a


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    attacks = ATTACKS
    if a.list:
        for name, _, layer, kind, _ in attacks:
            print("%-26s %-7s %s" % (name, kind, layer))
        return 0
    if a.only:
        want = [w.strip() for w in a.only.split(",") if w.strip()]
        attacks = [t for t in attacks if any(t[0].startswith(w) for w in want)]
    if a.skip:
        drop = [w.strip() for w in a.skip.split(",") if w.strip()]
        attacks = [t for t in attacks if not any(t[0].startswith(w) for w in drop)]
    host = Host(a)
    env = dict(os.environ, NANOCLAW_TEST_SECRET=host.env_secret)
    results = []
    t_all = time.time()
    try:
        base_params = host.params()
        for name, file, layer, kind, extra in attacks:
            prefix = {"pids": a.pids_prefix, "memory": a.memory_prefix}.get(kind, a.prefix)
            marker = "nct-%s-%s" % (host.rand, name)
            code = build_code(file, dict(base_params, **extra), marker)
            argv = shlex.split(prefix) + [a.python, "-c", code]
            t0 = time.time()
            if kind == "pty":
                rc, out, err, timed_out, injected = run_pty(argv, env, host.marker_dir, a.timeout)
            else:
                rc, out, err, timed_out, injected = run_plain(argv, env, host.marker_dir, a.timeout)
            dt = time.time() - t0
            evidence = host.evidence(marker)
            verdict, checks, infos = judge(kind, rc, out, timed_out, evidence, injected)
            res = {"name": name, "layer": layer, "verdict": verdict, "exit_code": rc, "seconds": round(dt, 2),
                   "checks": checks, "info": infos, "stderr_tail": err.decode(errors="replace")[-1500:],
                   "stdout_tail": "" if checks else out.decode(errors="replace")[-1500:]}
            results.append(res)
            worst = [c for c in checks if c["verdict"] in ("ESCAPED", "EXPOSED")]
            summary = "; ".join("%s: %s" % (c["check"], c["detail"]) for c in worst[:3])
            if verdict == "ERROR":
                summary = (" | ".join(infos[-2:]) + " " + res["stderr_tail"][-300:] + res["stdout_tail"][-300:]).strip()
            log("%-9s %-26s %5.1fs  %s" % (verdict, name, dt, summary[:300]))
            if a.verbose:
                for c in checks:
                    log("           %-9s %s: %s" % (c["verdict"], c["check"], c["detail"][:200]))
    finally:
        host.close()
    counts = {v: sum(1 for r in results if r["verdict"] == v) for v in VERDICTS}
    log("-- %s in %.1fs (prefix: %s; uid %d)" % (", ".join("%d %s" % (n, v) for v, n in counts.items() if n),
                                                 time.time() - t_all, a.prefix[:80], os.geteuid()))
    if a.expect_escape:
        stayed = [r["name"] for r in results if r["verdict"] in ("CONTAINED", "SKIP")]
        log("-- self-validation: %d/%d attacks escaped or exposed; could not escape: %s"
            % (len(results) - len(stayed) - counts["ERROR"], len(results), ", ".join(stayed) or "none"))
    if a.json_report:
        with open(a.json_report, "w") as f:
            json.dump({"prefix": a.prefix, "pids_prefix": a.pids_prefix, "memory_prefix": a.memory_prefix,
                       "uid": os.geteuid(), "kernel": os.uname().release, "counts": counts, "results": results},
                      f, indent=2)
    if a.expect_escape:
        return 1 if counts["ERROR"] else 0
    bad = {"ESCAPED", "ERROR"} | (set() if a.allow_exposed else {"EXPOSED"}) | ({"SKIP"} if a.strict else set())
    return 1 if any(r["verdict"] in bad for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
