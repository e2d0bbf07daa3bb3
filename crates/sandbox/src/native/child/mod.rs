//! Code that runs inside the sandbox: the setup process that becomes pid 1
//! (init) and the payload it forks and execs.
//!
//! Everything here runs after `clone` and only walks data the runner
//! prepared ([`ChildPlan`]). Failures are reported to the runner as a fixed
//! size [`Report`] on a close-on-exec pipe, never formatted here.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

use super::plan::Op;
use super::sys;

/// Where a failure happened, as reported to the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    /// Waiting for the runner's go-ahead.
    Sync = 1,
    /// setresuid/setresgid to the namespace's root.
    BecomeRoot,
    /// unshare(CLONE_NEWCGROUP).
    CgroupNs,
    /// sethostname.
    Hostname,
    /// Making the mount tree private.
    MountPrivate,
    /// pivot_root into the new root.
    PivotRoot,
    /// Detaching the old root.
    DetachOldRoot,
    /// Remounting the root read-only.
    RootReadOnly,
    /// Forking the payload.
    ForkPayload,
    /// Redirecting stdin/stdout/stderr.
    Stdio,
    /// setsid.
    Setsid,
    /// Resource rlimits.
    Rlimits,
    /// PR_SET_NO_NEW_PRIVS.
    NoNewPrivs,
    /// Landlock.
    Landlock,
    /// Dropping capabilities and switching user.
    DropPrivileges,
    /// chdir to the working directory.
    Workdir,
    /// Installing the seccomp filter.
    Seccomp,
    /// execve (the errno says why: ENOENT → 127, EACCES → 126).
    Exec,
    /// A filesystem operation; `index` says which.
    FsOp,
    /// Bringing up the loopback interface.
    Loopback,
    /// unshare of the mount, ipc, uts and network namespaces.
    Unshare,
    /// Writing the user namespace's own limits (`/proc/sys/user/max_*`).
    NsLimits,
    /// Moving into the sandbox's cgroup (v1 `tasks`).
    CgroupJoin,
    /// Transparent egress: the redirect rules and the listeners behind
    /// them in the sandbox's network namespace.
    Egress,
}

impl Step {
    pub(crate) fn from_u32(v: u32) -> Option<Step> {
        use Step::*;
        const ALL: [Step; 24] = [
            Sync,
            BecomeRoot,
            CgroupNs,
            Hostname,
            MountPrivate,
            PivotRoot,
            DetachOldRoot,
            RootReadOnly,
            ForkPayload,
            Stdio,
            Setsid,
            Rlimits,
            NoNewPrivs,
            Landlock,
            DropPrivileges,
            Workdir,
            Seccomp,
            Exec,
            FsOp,
            Loopback,
            Unshare,
            NsLimits,
            CgroupJoin,
            Egress,
        ];
        ALL.into_iter().find(|s| *s as u32 == v)
    }

    /// A short name for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::Sync => "waiting for the runner",
            Step::BecomeRoot => "switching to the namespace's root user",
            Step::CgroupNs => "unshare(CLONE_NEWCGROUP)",
            Step::Hostname => "sethostname",
            Step::MountPrivate => "making mounts private",
            Step::PivotRoot => "pivot_root",
            Step::DetachOldRoot => "detaching the old root",
            Step::RootReadOnly => "remounting / read-only",
            Step::ForkPayload => "forking the command",
            Step::Stdio => "setting up stdio",
            Step::Setsid => "setsid",
            Step::Rlimits => "setrlimit",
            Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            Step::Landlock => "installing Landlock rules",
            Step::DropPrivileges => "dropping capabilities and switching user",
            Step::Workdir => "changing to the working directory",
            Step::Seccomp => "installing the seccomp filter",
            Step::Exec => "execve",
            Step::FsOp => "building the filesystem",
            Step::Loopback => "bringing up the loopback interface",
            Step::Unshare => "creating the mount, ipc, uts and network namespaces",
            Step::NsLimits => "setting the user namespace's limits (/proc/sys/user)",
            Step::CgroupJoin => "joining the sandbox's cgroup",
            Step::Egress => "setting up transparent egress (nftables redirect and DNS in the sandbox's network namespace)",
        }
    }
}

/// Limits enforced with rlimits because no cgroup controller can: sent by
/// the runner with the second go-ahead, once it knows which controllers
/// the sandbox's cgroup got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rlimits {
    /// Memory limit to enforce with RLIMIT_DATA.
    pub data: Option<u64>,
    /// Task limit to enforce with RLIMIT_NPROC.
    pub nproc: Option<u64>,
}

impl Rlimits {
    /// Wire size: a tag byte (`b'1'` with bit 6 / bit 7 for data / nproc
    /// present) and two native-endian u64.
    pub(crate) const LEN: usize = 17;

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = b'1'
            | if self.data.is_some() { 0x40 } else { 0 }
            | if self.nproc.is_some() { 0x80 } else { 0 };
        b[1..9].copy_from_slice(&self.data.unwrap_or(0).to_ne_bytes());
        b[9..17].copy_from_slice(&self.nproc.unwrap_or(0).to_ne_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; Self::LEN]) -> Option<Rlimits> {
        if b[0] & 0x3f != b'1' {
            return None;
        }
        let word = |r: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(r);
            u64::from_ne_bytes(a)
        };
        Some(Rlimits {
            data: (b[0] & 0x40 != 0).then(|| word(&b[1..9])),
            nproc: (b[0] & 0x80 != 0).then(|| word(&b[9..17])),
        })
    }
}

/// A failure report: 12 bytes on the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Report {
    pub step: u32,
    pub index: u32,
    pub errno: i32,
}

impl Report {
    pub(crate) const SIZE: usize = 12;

    pub(crate) fn encode(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.step.to_ne_bytes());
        b[4..8].copy_from_slice(&self.index.to_ne_bytes());
        b[8..12].copy_from_slice(&self.errno.to_ne_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Report> {
        if b.len() < Self::SIZE {
            return None;
        }
        let u = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[r]);
            a
        };
        Some(Report {
            step: u32::from_ne_bytes(u(0..4)),
            index: u32::from_ne_bytes(u(4..8)),
            errno: i32::from_ne_bytes(u(8..12)),
        })
    }
}

/// How stdin is provided to the payload.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StdinFd {
    /// Open `/dev/null` inside the sandbox.
    Null,
    /// Use this pipe read end (bytes from the spec, or the caller's stdin
    /// forwarded by the runner: the caller's own fd 0 never enters).
    Pipe(RawFd),
}

/// Everything the child needs, prepared by the runner.
pub(crate) struct ChildPlan {
    pub rootful: bool,
    /// Namespaces the child creates itself, first thing (`unshare` flags):
    /// mount, ipc, uts and (unless `--network kernel`) network. Made here
    /// rather than by the clone, the kernel's work for them (copying the
    /// host's mount table, ≈0.3 ms of network namespace set-up) overlaps
    /// the runner's writing of the id maps and cgroup membership. Our new
    /// user namespace already gives us the capabilities for that.
    pub unshare: libc::c_int,
    pub hostname: CString,
    pub ops: Vec<Op>,
    pub sync_r: RawFd,
    /// A long-lived sandbox (`create`): init runs no command of its own
    /// and serves exec requests on the sync socket instead.
    pub idle: bool,
    /// After reporting the payload's status, init stays (idle) until its
    /// lifeline closes instead of exiting at once, having killed and reaped
    /// everything else of the sandbox; meanwhile it moves itself out of the
    /// sandbox's cgroup when the runner asks, so that the kernel's tear-down
    /// of the sandbox's namespaces (init's exit) can happen after the
    /// runner has returned (`RunOptions::exit_after_wait`).
    pub linger: bool,
    pub err_w: RawFd,
    pub status_w: RawFd,
    pub stdout_w: RawFd,
    pub stderr_w: RawFd,
    pub stdin: StdinFd,
    /// The only descriptors the child keeps (sorted); every other one is
    /// closed first thing.
    pub keep_fds: Vec<RawFd>,
    pub uid: u32,
    pub gid: u32,
    pub keep_caps: Vec<super::caps::Cap>,
    pub landlock: Option<super::landlock::Prepared>,
    pub seccomp: Option<super::seccomp::Filter>,
    /// The filter to install instead when memory is limited only per
    /// process (no memory cgroup): the default profile plus a refusal of
    /// `memfd_create`, whose pages no rlimit counts.
    pub seccomp_no_cgroup_memory: Option<super::seccomp::Filter>,
    /// SysV shared memory allowed in the sandbox's ipc namespace, in bytes
    /// (`kernel.shmmax` and `kernel.shmall`): bounded like `/dev/shm`.
    pub shm_bytes: u64,
    pub workdir: CString,
    /// Candidate paths for argv[0], in PATH order.
    pub exec_candidates: Vec<CString>,
    /// Owns the strings `argv_ptrs` points into.
    pub _argv: Vec<CString>,
    /// Owns the strings `envp_ptrs` points into.
    pub _envp: Vec<CString>,
    /// The runner's argv and environment areas, to be wiped in init.
    pub host_strings: Vec<(usize, usize)>,
    /// The directory that becomes `/`.
    pub root_dir: CString,
    /// Reach every target without following symlinks (see `run_op`).
    pub check_symlinks: bool,
    /// Remount `/` read-only after `pivot_root`.
    pub root_readonly: bool,
    /// NULL-terminated pointer arrays into `argv` and `envp`, built by the
    /// runner so the payload does not allocate (the runner may have threads).
    pub argv_ptrs: Vec<*const libc::c_char>,
    /// See `argv_ptrs`.
    pub envp_ptrs: Vec<*const libc::c_char>,
    /// The child's end of a socketpair: the sandbox's proxy listener (on its
    /// own 127.0.0.1) is created here and handed to the runner.
    pub net_sock: Option<RawFd>,
    /// Transparent egress: the prebuilt rules to install in the sandbox's
    /// network namespace before the listeners are made and sent.
    pub redirect: Option<nanoclaw_net::kernel::RedirectRules>,
}

/// The port the egress proxy listens on inside the sandbox.
pub(crate) const PROXY_PORT: u16 = 3128;

/// The port every other TCP connection is redirected to (on 127.0.0.1 and
/// ::1) in transparent mode. The sandbox cannot bind it (it is taken) and
/// a connection made to it directly has no original destination and is
/// refused.
pub(crate) const TRANSPARENT_PORT: u16 = 3129;

/// The sandbox's DNS port (UDP and TCP, 127.0.0.1 and ::1).
pub(crate) const DNS_PORT: u16 = 53;

fn fail(err_w: RawFd, step: Step, index: u32, errno: i32) -> ! {
    let r = Report {
        step: step as u32,
        index,
        errno,
    };
    let _ = sys::write_all(err_w, &r.encode());
    sys::exit_now(125)
}

/// [`fail`] with an I/O error's errno.
fn fail_io(err_w: RawFd, step: Step, index: u32, e: &std::io::Error) -> ! {
    fail(err_w, step, index, e.raw_os_error().unwrap_or(0))
}

macro_rules! tryc {
    ($plan:expr, $step:expr, $e:expr) => {
        if let Err(e) = $e {
            fail($plan.err_w, $step, 0, e.raw_os_error().unwrap_or(0))
        }
    };
}

/// The sandbox's first process: builds the root, forks the payload and
/// becomes its init. Never returns.
pub(crate) fn setup_and_init(plan: &ChildPlan) -> ! {
    // Keep only our own descriptors: a runner with several sandboxes must
    // not leak one sandbox's pipes (or its lifeline) into another.
    close_all_but(&plan.keep_fds);
    // Nor the runner's stdin, stdout and stderr: a pipeline reading the
    // runner's output must see its end when the runner ends, whatever init
    // is doing; the payload gets its own pipes.
    stdio_to_dev_null(plan);
    // No PR_SET_PDEATHSIG: it fires when the runner *thread* that cloned us
    // exits, and is cleared by the credential change below. Init watches
    // the sync pipe instead, whose write end only the runner holds (the
    // lifeline): when the runner dies, init and the whole sandbox die.
    // Block every signal: init handles them synchronously with sigwaitinfo,
    // and the payload resets the mask before exec.
    block_all_signals();

    // A new network namespace takes ~0.45 ms to make (every pernet
    // subsystem initialises), the longest single step of a start: a helper
    // process makes it, brings up its loopback (and the proxy's listener)
    // while we build the root, and we join it before mounting sysfs.
    let net_by_helper = plan.unshare & libc::CLONE_NEWNET != 0;
    let mut net_helper = net_by_helper.then(|| NetHelper::start(plan));
    // SAFETY: unshare with namespace flags has no memory-safety requirements.
    if unsafe { libc::unshare(plan.unshare & !libc::CLONE_NEWNET) } != 0 {
        fail(plan.err_w, Step::Unshare, 0, sys::errno());
    }

    // Wait for the runner to write our uid/gid maps.
    let mut b = [0u8; 1];
    match sys::read(plan.sync_r, &mut b) {
        Ok(1) => {}
        Ok(_) => sys::exit_now(125),
        Err(e) => fail(plan.err_w, Step::Sync, 0, e.raw_os_error().unwrap_or(0)),
    }

    if plan.rootful {
        // Raw syscalls: glibc's wrappers would wait for the runner's other
        // threads, which do not exist here (see sys::setgroups_raw).
        let r = sys::setgroups_raw(&[])
            .and_then(|()| sys::setresgid_raw(0))
            .and_then(|()| sys::setresuid_raw(0));
        if let Err(e) = r {
            fail(
                plan.err_w,
                Step::BecomeRoot,
                0,
                e.raw_os_error().unwrap_or(0),
            );
        }
    }

    set_ns_limits(plan);
    set_shm_limits(plan);

    let name = plan.hostname.as_bytes();
    // SAFETY: `name` points to `name.len()` valid bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        fail(plan.err_w, Step::Hostname, 0, sys::errno());
    }

    if !net_by_helper {
        // `--network kernel`: the clone made the namespace (the runner
        // wires a veth into it).
        network_setup(plan);
    }
    build_root(plan, &mut net_helper);
    if let Some(h) = net_helper {
        h.join(plan);
    }

    // The runner makes the sandbox's cgroup and moves us into it while we
    // build the root (a cgroup v1 migration waits for an RCU grace period);
    // wait for that go-ahead, which carries the rlimits standing in for
    // missing controllers, then make that cgroup our cgroup namespace's root.
    let mut msg = [0u8; Rlimits::LEN];
    let mut tasks = [-1; sys::MAX_FDS];
    let ntasks = match sys::recv_with_fds(plan.sync_r, &mut msg, &mut tasks) {
        Ok((n, k)) if n == msg.len() => k,
        Ok(_) => sys::exit_now(125),
        Err(e) => fail(plan.err_w, Step::Sync, 1, e.raw_os_error().unwrap_or(0)),
    };
    let Some(rlimits) = Rlimits::decode(&msg) else {
        sys::exit_now(125)
    };
    // Move ourselves (one thread) into each cgroup v1 hierarchy through the
    // `tasks` files the runner opened: a self-move skips the kernel's
    // global lock that a move by another process waits for.
    for (i, fd) in tasks[..ntasks].iter().enumerate() {
        let r = sys::write_all(*fd, b"0");
        sys::close(*fd);
        if let Err(e) = r {
            fail_io(plan.err_w, Step::CgroupJoin, i as u32, &e);
        }
    }
    // SAFETY: unshare with a namespace flag has no memory-safety requirements.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        fail(plan.err_w, Step::CgroupNs, 0, sys::errno());
    }

    // Init must not be inspectable by the payload (/proc/1/mem, environ,
    // exe): the kernel then requires CAP_SYS_PTRACE for those.
    let _ = sys::prctl(libc::PR_SET_DUMPABLE, 0);
    scrub_host_strings(&plan.host_strings);

    if plan.idle {
        // One Landlock domain for the whole sandbox, entered by init: every
        // exec is forked into it, so what one exec leaves running can be
        // signalled by the next (Landlock scopes signals to a domain).
        if let Some(prepared) = &plan.landlock {
            if let Err(f) = prepared.apply() {
                fail_landlock(plan.err_w, &f);
            }
        }
        // Setup is done: closing the report pipe tells the runner so.
        for fd in [plan.err_w, plan.stdout_w, plan.stderr_w, plan.status_w] {
            sys::close(fd);
        }
        if let StdinFd::Pipe(fd) = plan.stdin {
            sys::close(fd);
        }
        serve::init_serve(plan, rlimits);
    }
    let pid = match sys::clone_fork(0) {
        Ok(p) => p,
        Err(e) => fail(
            plan.err_w,
            Step::ForkPayload,
            0,
            e.raw_os_error().unwrap_or(0),
        ),
    };
    if pid == 0 {
        run_payload(plan, rlimits);
    }
    // Init keeps only the status pipe.
    for fd in [plan.err_w, plan.stdout_w, plan.stderr_w] {
        sys::close(fd);
    }
    if let StdinFd::Pipe(fd) = plan.stdin {
        sys::close(fd);
    }
    init_loop(pid, plan.status_w, plan.sync_r, plan.linger)
}

/// Per-user-namespace limits written for every sandbox: the kernel charges
/// inotify instances and watches (and fanotify groups and marks) at every
/// level up to the host, there to the namespace's owner (rootful: the
/// sandbox's own slot uid, see [`super::idslot`]; rootless: the caller,
/// whose sandboxes share one pool, `fs.inotify.max_user_instances` = 128 by
/// default), so without a limit of its own one sandbox takes that whole
/// pool. Nested user namespaces are
/// refused here too (seccomp refuses them as well).
pub(crate) const NS_LIMITS: [(&CStr, &[u8]); 5] = [
    (c"/proc/sys/user/max_inotify_instances", b"32"),
    (c"/proc/sys/user/max_inotify_watches", b"16384"),
    (c"/proc/sys/user/max_fanotify_groups", b"8"),
    (c"/proc/sys/user/max_fanotify_marks", b"8192"),
    (c"/proc/sys/user/max_user_namespaces", b"0"),
];

/// Writes [`NS_LIMITS`] for the sandbox's user namespace. Runs in init
/// before anything of the sandbox's runs, while the host's /proc is still
/// mounted; `/proc/sys/user` shows the writer's own user namespace, where
/// init holds CAP_SYS_RESOURCE. The payload cannot raise them, even with
/// `--cap-add SYS_RESOURCE`: inside, `/proc/sys` is mounted read-only and
/// mounting is refused. A kernel without a file (fanotify before 5.13) is
/// skipped.
fn set_ns_limits(plan: &ChildPlan) {
    for (i, (path, value)) in NS_LIMITS.iter().enumerate() {
        let fd = match sys::open(path, libc::O_WRONLY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => fail_io(plan.err_w, Step::NsLimits, i as u32, &e),
        };
        let r = sys::write_all(fd, value);
        sys::close(fd);
        if let Err(e) = r {
            fail_io(plan.err_w, Step::NsLimits, i as u32, &e);
        }
    }
}

/// Bounds SysV shared memory in the sandbox's new ipc namespace (its
/// defaults are effectively unlimited), like `/dev/shm`. Only the ipc
/// namespace's root may write these, so rootful only (rootless, shm pages
/// are counted by the memory cgroup, or `shmget` is refused by seccomp
/// when there is none).
fn set_shm_limits(plan: &ChildPlan) {
    if !plan.rootful {
        return;
    }
    let mut bytes = [0u8; 20];
    let mut pages = [0u8; 20];
    let files: [(&CStr, &[u8]); 2] = [
        (
            c"/proc/sys/kernel/shmmax",
            fmt_u64(plan.shm_bytes, &mut bytes),
        ),
        (
            c"/proc/sys/kernel/shmall",
            fmt_u64(plan.shm_bytes.div_ceil(4096), &mut pages),
        ),
    ];
    for (i, (path, value)) in files.iter().enumerate() {
        let r = sys::open(path, libc::O_WRONLY).and_then(|fd| {
            let r = sys::write_all(fd, value);
            sys::close(fd);
            r
        });
        if let Err(e) = r {
            fail_io(plan.err_w, Step::NsLimits, (NS_LIMITS.len() + i) as u32, &e);
        }
    }
}

/// Decimal digits of `v` in `buf`, without allocating.
fn fmt_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// Brings up loopback in the current network namespace and, with a proxy,
/// hands the runner a listening socket on the sandbox's own 127.0.0.1.
fn network_setup(plan: &ChildPlan) {
    if let Err(e) = loopback_up() {
        fail(plan.err_w, Step::Loopback, 0, e.raw_os_error().unwrap_or(0));
    }
    if let Some(sock) = plan.net_sock {
        // The proxy's listening socket lives in the sandbox's network
        // namespace; the runner serves it from the host side.
        let r = sys::listen_loopback(PROXY_PORT).and_then(|l| {
            let r = sys::send_fd(sock, l);
            sys::close(l);
            r
        });
        if let Err(e) = r {
            sys::close(sock);
            fail(plan.err_w, Step::Loopback, 1, e.raw_os_error().unwrap_or(0));
        }
        if let Some(rules) = &plan.redirect {
            if let Err(e) = rules.install() {
                sys::close(sock);
                fail(plan.err_w, Step::Egress, 0, e.raw_os_error().unwrap_or(0));
            }
            if let Err((i, e)) = send_transparent_listeners(sock) {
                sys::close(sock);
                fail(plan.err_w, Step::Egress, i, e.raw_os_error().unwrap_or(0));
            }
        }
        sys::close(sock);
    }
}

/// Makes the transparent listener and the DNS sockets (IPv4 and IPv6
/// loopback each) and sends them to the runner in one message, in the
/// order [`TRANSPARENT_SOCKETS`] lists. Does not allocate.
fn send_transparent_listeners(sock: RawFd) -> Result<(), (u32, std::io::Error)> {
    let mut fds = [-1; TRANSPARENT_SOCKETS.len()];
    let mut result = Ok(());
    for (i, &(v6, stream, port)) in TRANSPARENT_SOCKETS.iter().enumerate() {
        match sys::bind_loopback(v6, stream, port) {
            Ok(fd) => fds[i] = fd,
            Err(e) => {
                result = Err((1 + i as u32, e));
                break;
            }
        }
    }
    if result.is_ok() {
        result = sys::send_with_fds(sock, b"t", &fds).map_err(|e| (10, e));
    }
    for fd in fds {
        if fd >= 0 {
            sys::close(fd);
        }
    }
    result
}

/// The transparent-mode sockets: (IPv6, stream, port), in the order the
/// runner receives them.
pub(crate) const TRANSPARENT_SOCKETS: [(bool, bool, u16); 6] = [
    (false, true, TRANSPARENT_PORT),
    (true, true, TRANSPARENT_PORT),
    (false, false, DNS_PORT),
    (true, false, DNS_PORT),
    (false, true, DNS_PORT),
    (true, true, DNS_PORT),
];

/// A helper process sharing our descriptor table (CLONE_FILES) that makes
/// the sandbox's network namespace (owned by the sandbox's user namespace,
/// where it holds every capability, as we do), sets it up, and leaves a
/// descriptor of it in `slot`, reserved before the fork.
struct NetHelper {
    pid: libc::pid_t,
    slot: RawFd,
}

impl NetHelper {
    fn start(plan: &ChildPlan) -> NetHelper {
        let slot = match sys::open(c"/dev/null", libc::O_RDONLY | libc::O_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => fail(plan.err_w, Step::Unshare, 1, e.raw_os_error().unwrap_or(0)),
        };
        let pid = match sys::clone_fork(libc::CLONE_FILES as libc::c_ulong) {
            Ok(p) => p,
            Err(e) => fail(plan.err_w, Step::Unshare, 2, e.raw_os_error().unwrap_or(0)),
        };
        if pid == 0 {
            // SAFETY: unshare with a namespace flag has no memory-safety requirements.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                fail(plan.err_w, Step::Unshare, 3, sys::errno());
            }
            network_setup(plan);
            let ns = match sys::open(
                c"/proc/thread-self/ns/net",
                libc::O_RDONLY | libc::O_CLOEXEC,
            ) {
                Ok(fd) => fd,
                Err(e) => fail(plan.err_w, Step::Unshare, 4, e.raw_os_error().unwrap_or(0)),
            };
            // SAFETY: dup3 of two descriptors of this (shared) table.
            if unsafe { libc::dup3(ns, slot, libc::O_CLOEXEC) } < 0 {
                fail(plan.err_w, Step::Unshare, 5, sys::errno());
            }
            sys::close(ns);
            sys::exit_now(0);
        }
        NetHelper { pid, slot }
    }

    /// Waits for the helper and joins the namespace it made. A helper that
    /// failed has already written its report; we just end.
    fn join(self, plan: &ChildPlan) {
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            if r < 0 && sys::errno() != libc::EINTR {
                fail(plan.err_w, Step::Unshare, 6, sys::errno());
            }
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            sys::exit_now(125);
        }
        // SAFETY: setns on a namespace descriptor we hold.
        if unsafe { libc::setns(self.slot, libc::CLONE_NEWNET) } != 0 {
            fail(plan.err_w, Step::Unshare, 7, sys::errno());
        }
        sys::close(self.slot);
    }
}

/// Closes every descriptor from 3 up except those in `keep` (sorted).
fn close_all_but(keep: &[RawFd]) {
    let mut next: libc::c_uint = 3;
    for &fd in keep {
        let Ok(fd) = libc::c_uint::try_from(fd) else {
            continue;
        };
        if fd < next {
            continue;
        }
        if fd > next {
            sys::close_range(next, fd - 1);
        }
        next = fd + 1;
    }
    sys::close_range(next, libc::c_uint::MAX);
}

/// Points fds 0-2 (the runner's, inherited through the clone) at
/// `/dev/null`, except any that is one of the sandbox's own descriptors.
fn stdio_to_dev_null(plan: &ChildPlan) {
    let null = match sys::open(c"/dev/null", libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => fail_io(plan.err_w, Step::Stdio, 1, &e),
    };
    for fd in 0..3 {
        if fd != null && !plan.keep_fds.contains(&fd) {
            if let Err(e) = sys::dup2(null, fd) {
                fail_io(plan.err_w, Step::Stdio, 2, &e);
            }
        }
    }
    if null > 2 {
        sys::close(null);
    }
}

/// Sets `lo` up in the sandbox's new network namespace (it starts down).
pub(crate) fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a datagram socket used only for interface ioctls; `ifr` is a
    // zeroed ifreq with a NUL-terminated name, valid for both ioctls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn block_all_signals() {
    // SAFETY: `set` is a valid sigset_t initialised by sigfillset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Overwrites init's copies of the runner's command line and environment
/// (what `/proc/1/cmdline` and `/proc/1/environ` show, and what
/// `/proc/1/mem` would reveal) so nothing of the host survives in init.
/// The ranges were read from `/proc/self/stat` by the runner before
/// `clone`; the child has the same address space layout.
fn scrub_host_strings(ranges: &[(usize, usize)]) {
    for &(start, end) in ranges {
        if start == 0 || end <= start {
            continue;
        }
        // SAFETY: [start, end) is the kernel-recorded argv or environment
        // area of this very process image (inherited through fork/clone),
        // mapped writable on the initial stack; nothing else uses it now
        // (the process is single-threaded and std never re-reads it).
        unsafe { std::ptr::write_bytes(start as *mut u8, 0, end - start) };
    }
    // Leave a harmless name for `ps` inside the sandbox.
    if let Some(&(start, end)) = ranges.first() {
        let name = b"nanoclaw-init";
        if start != 0 && end > start + name.len() {
            // SAFETY: as above; `name.len()` bytes fit in the zeroed range.
            unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), start as *mut u8, name.len()) };
        }
    }
}

/// The argv and environment ranges of the current process, from
/// `/proc/self/stat` (fields 48-51).
pub(crate) fn host_string_ranges() -> Vec<(usize, usize)> {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Vec::new();
    };
    let get = |n: usize| sys::stat_field(&stat, n).unwrap_or(0) as usize;
    vec![(get(48), get(49)), (get(50), get(51))]
}

/// Builds the sandbox's root; joins the network namespace `net_helper`
/// makes (if any) before mounting sysfs.
fn build_root(plan: &ChildPlan, net_helper: &mut Option<NetHelper>) {
    tryc!(
        plan,
        Step::MountPrivate,
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
    );
    for (i, op) in plan.ops.iter().enumerate() {
        // sysfs may only be mounted from inside the sandbox's own network
        // namespace (it shows that namespace's devices).
        if matches!(op, Op::Fs { fstype, .. } if *fstype == c"sysfs") {
            if let Some(h) = net_helper.take() {
                h.join(plan);
            }
        }
        if let Err(e) = run_op(op, plan.check_symlinks) {
            fail(
                plan.err_w,
                Step::FsOp,
                i as u32,
                e.raw_os_error().unwrap_or(0),
            );
        }
    }
    // SAFETY: chdir with a NUL-terminated path.
    if unsafe { libc::chdir(plan.root_dir.as_ptr()) } != 0 {
        fail(plan.err_w, Step::PivotRoot, 0, sys::errno());
    }
    // pivot_root(".", "."): the old root ends up stacked under the new one
    // and is detached right away; no directory for it is needed.
    tryc!(plan, Step::PivotRoot, sys::pivot_root(c".", c"."));
    tryc!(
        plan,
        Step::DetachOldRoot,
        sys::umount2(c".", libc::MNT_DETACH)
    );
    // SAFETY: chdir with a NUL-terminated path.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        fail(plan.err_w, Step::DetachOldRoot, 0, sys::errno());
    }
    let attrs = if plan.root_readonly {
        sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV
    } else {
        sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV
    };
    tryc!(
        plan,
        Step::RootReadOnly,
        sys::mount_setattr(libc::AT_FDCWD, c"/", 0, attrs, None)
    );
}

/// Runs one filesystem step. With `check` (an image root, or mounts nested
/// in other mounts, where paths pass through content the sandboxed code or
/// an image controls), targets are reached without following symlinks;
/// otherwise every path lies in nanoclaw's own fresh tmpfs and the plain
/// calls are used.
fn run_op(op: &Op, check: bool) -> std::io::Result<()> {
    if !check {
        match op {
            Op::Mkdir { path, mode } => {
                // SAFETY: `path` is NUL-terminated.
                let r = unsafe { libc::mkdir(path.as_ptr(), *mode) };
                if r != 0 && sys::errno() != libc::EEXIST {
                    return Err(std::io::Error::last_os_error());
                }
                return Ok(());
            }
            Op::Fs {
                fstype,
                target,
                flags,
                data,
                optional,
            } => {
                let data: Option<&CStr> = if data.is_empty() { None } else { Some(data) };
                return match sys::mount(Some(fstype), target, Some(fstype), *flags, data) {
                    Err(_) if *optional => Ok(()),
                    r => r,
                };
            }
            Op::Bind {
                source,
                target,
                attrs,
                if_exists,
            } => {
                match sys::mount(
                    Some(source),
                    target,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                ) {
                    Err(e) if *if_exists && e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                    r => r?,
                }
                return sys::mount_setattr(
                    libc::AT_FDCWD,
                    target,
                    libc::AT_RECURSIVE as u32,
                    *attrs,
                    None,
                );
            }
            _ => {}
        }
    }
    match op {
        Op::Mkdir { path, mode } => mkdir_no_symlinks(path, *mode),
        Op::Symlink { target, link } => sys::symlink(target, link),
        Op::File { path, data, mode } if data.is_empty() => mount_point_file(path, *mode),
        Op::File { path, data, mode } => sys::write_file(path, data, *mode),
        Op::FileFromFd { path, fd, mode } => sys::copy_fd_to_file(*fd, path, *mode),
        Op::Fs {
            fstype,
            target,
            flags,
            data,
            optional,
        } => {
            let data: Option<&CStr> = if data.is_empty() { None } else { Some(data) };
            // The target is reached without symlinks (an image's /proc or
            // /tmp may be one) and mounted on through /proc/self/fd.
            let t = match sys::open_no_symlinks(target, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(t) => t,
                Err(_) if *optional => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut buf = [0u8; 32];
            let r = sys::mount(
                Some(fstype),
                sys::proc_fd_path(t, &mut buf),
                Some(fstype),
                *flags,
                data,
            );
            sys::close(t);
            match r {
                Err(_) if *optional => Ok(()),
                r => r,
            }
        }
        Op::Bind {
            source,
            target,
            attrs,
            if_exists,
        } => {
            let t = match sys::open_no_symlinks(target, libc::O_PATH) {
                Err(e) if *if_exists && e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                r => r?,
            };
            let mut buf = [0u8; 32];
            let r = sys::mount(
                Some(source),
                sys::proc_fd_path(t, &mut buf),
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            );
            sys::close(t);
            match r {
                Err(e) if *if_exists && e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                r => r?,
            }
            set_attrs(target, *attrs)
        }
        Op::Attach { fd, target } => {
            let t = sys::open_no_symlinks(target, libc::O_PATH)?;
            let r = sys::move_mount_fd(*fd, t);
            sys::close(t);
            r
        }
        Op::Reopen { path, fd, dev, ino } => {
            let new = sys::open(path, libc::O_PATH)?;
            // SAFETY: an all-zero stat is valid for fstat to overwrite.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `new` is an open descriptor and `st` a valid out pointer.
            let r = unsafe { libc::fstat(new, &mut st) };
            if r != 0 || st.st_dev != *dev || st.st_ino != *ino {
                sys::close(new);
                return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
            }
            let r = sys::dup2(new, *fd);
            sys::close(new);
            r
        }
        Op::Attrs { target, attrs } => set_attrs(target, *attrs),
        Op::Detach { path } => sys::umount2(path, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW),
    }
}

/// Sets mount attributes recursively on the mount at `target`, reached
/// without following symlinks.
fn set_attrs(target: &CStr, attrs: u64) -> std::io::Result<()> {
    let t = sys::open_no_symlinks(target, libc::O_PATH)?;
    let r = sys::mount_setattr(
        t,
        c"",
        (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as u32,
        attrs,
        None,
    );
    sys::close(t);
    r
}

/// `mkdir` whose parent is reached without symlinks; an existing entry must
/// be a real directory. Mount points may lie inside a writable workspace
/// whose contents the sandboxed code controls (it may have planted
/// symlinks pointing at host paths in an earlier run).
fn mkdir_no_symlinks(path: &CStr, mode: libc::mode_t) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let (parent, name) = sys::split_parent(path, &mut buf)?;
    let p = sys::open_no_symlinks(parent, libc::O_PATH | libc::O_DIRECTORY)?;
    // SAFETY: `p` is an open directory fd and `name` NUL-terminated.
    let mut r = unsafe { libc::mkdirat(p, name.as_ptr(), mode) };
    if r != 0 && sys::errno() == libc::EEXIST {
        // SAFETY: an all-zero stat is valid for fstatat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, NUL-terminated name, valid out pointer.
        r = unsafe { libc::fstatat(p, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r == 0 && st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            sys::close(p);
            return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
        }
    }
    let e = std::io::Error::last_os_error();
    sys::close(p);
    if r != 0 {
        return Err(e);
    }
    Ok(())
}

/// An (empty) file to bind a file onto: created if missing, never
/// truncated or written, never reached through a symlink, and it must be a
/// regular file (opening a planted FIFO must not block setup).
fn mount_point_file(path: &CStr, mode: libc::mode_t) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let (parent, name) = sys::split_parent(path, &mut buf)?;
    let p = sys::open_no_symlinks(parent, libc::O_PATH | libc::O_DIRECTORY)?;
    // SAFETY: valid dir fd, NUL-terminated name; the flags never block.
    let fd = unsafe {
        libc::openat(
            p,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    let e = std::io::Error::last_os_error();
    sys::close(p);
    if fd < 0 {
        return Err(e);
    }
    // SAFETY: an all-zero stat is valid for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` a valid out pointer.
    let r = unsafe { libc::fstat(fd, &mut st) };
    sys::close(fd);
    if r != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

mod serve;

/// What one payload runs: the command of a `run`, or one exec into a
/// long-lived sandbox. Everything is prepared before the fork (the exec's
/// strings live in init's request buffer), so the payload allocates nothing.
pub(crate) struct Cmd<'a> {
    /// Where a failure before `execve` is reported.
    pub err_w: RawFd,
    /// stdin (`None`: `/dev/null`), stdout and stderr.
    pub stdin: Option<RawFd>,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// NULL-terminated argv and envp.
    pub argv: *const *const libc::c_char,
    pub envp: *const *const libc::c_char,
    /// Where argv[0] is looked for.
    pub program: Program<'a>,
    pub workdir: &'a CStr,
    pub uid: u32,
    pub gid: u32,
    /// The signals ignored on entry (`SigIgn`), when the caller read them
    /// once already (init serving execs); `None`: the payload reads them.
    pub ignored_signals: Option<u64>,
}

/// How the payload finds its program.
pub(crate) enum Program<'a> {
    /// Paths prepared by the runner (a `run`).
    Candidates(&'a [CString]),
    /// `name` (argv[0]) searched in the colon-separated `path` the way
    /// execvp does, without allocating (an exec).
    Search { name: &'a [u8], path: &'a [u8] },
}

/// The first payload of a `run`, as the plan describes it.
fn run_payload(plan: &ChildPlan, rlimits: Rlimits) -> ! {
    sys::close(plan.status_w);
    let cmd = Cmd {
        err_w: plan.err_w,
        stdin: match plan.stdin {
            StdinFd::Null => None,
            StdinFd::Pipe(fd) => Some(fd),
        },
        stdout: plan.stdout_w,
        stderr: plan.stderr_w,
        argv: plan.argv_ptrs.as_ptr(),
        envp: plan.envp_ptrs.as_ptr(),
        program: Program::Candidates(&plan.exec_candidates),
        workdir: &plan.workdir,
        uid: plan.uid,
        gid: plan.gid,
        ignored_signals: None,
    };
    payload(plan, rlimits, &cmd)
}

/// The payload: hardens itself step by step and execs the command.
fn payload(plan: &ChildPlan, rlimits: Rlimits, cmd: &Cmd) -> ! {
    let err_w = cmd.err_w;
    // stdio first, so nothing else can end up on fds 0-2.
    let stdin_fd = match cmd.stdin {
        None => match sys::open(c"/dev/null", libc::O_RDONLY) {
            Ok(fd) => fd,
            Err(e) => fail_io(err_w, Step::Stdio, 0, &e),
        },
        Some(fd) => fd,
    };
    for (from, to) in [(stdin_fd, 0), (cmd.stdout, 1), (cmd.stderr, 2)] {
        if let Err(e) = sys::dup2(from, to) {
            fail_io(err_w, Step::Stdio, 0, &e);
        }
    }
    // A new session: no controlling terminal to inject keystrokes into.
    // SAFETY: setsid has no arguments.
    if unsafe { libc::setsid() } < 0 {
        fail(err_w, Step::Setsid, 0, sys::errno());
    }
    set_rlimits(err_w, rlimits);
    if let Err(e) = sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1) {
        fail_io(err_w, Step::NoNewPrivs, 0, &e);
    }
    match (&plan.landlock, plan.idle) {
        (Some(prepared), false) => {
            if let Err(f) = prepared.apply() {
                fail_landlock(err_w, &f);
            }
        }
        // A long-lived sandbox's init has entered the sandbox's domain
        // already; each exec gets a nested one of its own, so that it
        // cannot ptrace or read through /proc what other execs run.
        (Some(_), true) => {
            if let Err(e) = super::landlock::enter_sub_domain() {
                fail(err_w, Step::Landlock, 0x00ff_ffff, e);
            }
        }
        (None, _) => {}
    }
    if super::caps::drop_privileges(cmd.uid, cmd.gid, &plan.keep_caps).is_err() {
        fail(err_w, Step::DropPrivileges, 0, sys::errno());
    }
    // SAFETY: chdir with a NUL-terminated path.
    if unsafe { libc::chdir(cmd.workdir.as_ptr()) } != 0 {
        fail(err_w, Step::Workdir, 0, sys::errno());
    }
    // Every descriptor above stdio is closed at exec (CVE-2024-21626).
    sys::cloexec_from(3);
    reset_signals(cmd.ignored_signals);

    // Seccomp last: everything above needs syscalls the filter denies.
    let filter = match (&plan.seccomp_no_cgroup_memory, rlimits.data) {
        (Some(f), Some(_)) => Some(f),
        _ => plan.seccomp.as_ref(),
    };
    if let Some(filter) = filter {
        if filter.install().is_err() {
            fail(err_w, Step::Seccomp, 0, sys::errno());
        }
    }
    let errno = match &cmd.program {
        Program::Candidates(paths) => exec_candidates(paths, cmd),
        Program::Search { name, path } => exec_search(name, path, cmd),
    };
    fail(err_w, Step::Exec, 0, errno)
}

/// Reports a Landlock failure: the step in the high byte of the index,
/// the rule (or 0xffffff) below it.
fn fail_landlock(err_w: RawFd, f: &super::landlock::ApplyFailure) -> ! {
    let rule = f.rule.unwrap_or(0x00ff_ffff) & 0x00ff_ffff;
    fail(
        err_w,
        Step::Landlock,
        (u32::from(f.step as u8) << 24) | rule,
        f.errno,
    )
}

/// Tries each path in turn (execvp's rules for which errors go on to the
/// next); returns the errno to report.
fn exec_candidates(paths: &[CString], cmd: &Cmd) -> i32 {
    let mut errs = ExecErrors::new();
    for path in paths {
        if !errs.try_exec(path, cmd) {
            break;
        }
    }
    errs.result()
}

/// execvp without allocating: `name` as is when it has a slash, else in
/// each directory of `path`.
fn exec_search(name: &[u8], path: &[u8], cmd: &Cmd) -> i32 {
    let mut buf = [0u8; 4096];
    let mut errs = ExecErrors::new();
    if name.is_empty() {
        return libc::ENOENT;
    }
    if name.contains(&b'/') {
        if name.len() >= buf.len() {
            return libc::ENAMETOOLONG;
        }
        buf[..name.len()].copy_from_slice(name);
        if let Ok(p) = CStr::from_bytes_until_nul(&buf) {
            errs.try_exec(p, cmd);
        }
        return errs.result();
    }
    for dir in path.split(|b| *b == b':').filter(|d| !d.is_empty()) {
        let dir = dir.strip_suffix(b"/").unwrap_or(dir);
        let len = dir.len() + 1 + name.len();
        if len >= buf.len() {
            continue;
        }
        buf[..dir.len()].copy_from_slice(dir);
        buf[dir.len()] = b'/';
        buf[dir.len() + 1..len].copy_from_slice(name);
        buf[len] = 0;
        let Ok(p) = CStr::from_bytes_until_nul(&buf) else {
            continue;
        };
        if !errs.try_exec(p, cmd) {
            break;
        }
    }
    errs.result()
}

/// The errno bookkeeping of execvp: ENOENT/ENOTDIR try the next path,
/// EACCES is remembered, anything else stops.
struct ExecErrors {
    saw_eacces: bool,
    last: i32,
}

impl ExecErrors {
    fn new() -> ExecErrors {
        ExecErrors {
            saw_eacces: false,
            last: libc::ENOENT,
        }
    }

    /// execve(path); returns whether to try the next path.
    fn try_exec(&mut self, path: &CStr, cmd: &Cmd) -> bool {
        // SAFETY: `path` is NUL-terminated; argv and envp are NULL-terminated
        // arrays of NUL-terminated strings that outlive the call.
        unsafe { libc::execve(path.as_ptr(), cmd.argv, cmd.envp) };
        match sys::errno() {
            libc::ENOENT | libc::ENOTDIR => true,
            libc::EACCES => {
                self.saw_eacces = true;
                true
            }
            e => {
                self.last = e;
                false
            }
        }
    }

    fn result(&self) -> i32 {
        if self.saw_eacces && self.last == libc::ENOENT {
            libc::EACCES
        } else {
            self.last
        }
    }
}

fn set_rlimits(err_w: RawFd, rlimits: Rlimits) {
    let set = |res: libc::__rlimit_resource_t, v: u64| {
        let r = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: `r` is a valid rlimit struct.
        unsafe { libc::setrlimit(res, &r) }
    };
    // No core dumps: they would leak the sandbox's memory to the host.
    if set(libc::RLIMIT_CORE, 0) != 0 {
        fail(err_w, Step::Rlimits, 0, sys::errno());
    }
    if let Some(v) = rlimits.data {
        if set(libc::RLIMIT_DATA, v) != 0 {
            fail(err_w, Step::Rlimits, 1, sys::errno());
        }
    }
    if let Some(v) = rlimits.nproc {
        if set(libc::RLIMIT_NPROC, v) != 0 {
            fail(err_w, Step::Rlimits, 2, sys::errno());
        }
    }
}

/// Puts the signal state back to the defaults for the command: execve
/// resets caught signals by itself, so only ignored ones (`SigIgn` in
/// /proc/self/status: typically SIGPIPE, which the Rust runtime ignores, or
/// whatever the runner's caller ignored) need a call each; if that cannot
/// be read, every signal is reset. The mask is cleared. Does not allocate.
/// `known`: the mask read earlier by a process whose dispositions this
/// one inherited unchanged (init, for its execs: one procfs read per
/// sandbox instead of one per command).
fn reset_signals(known: Option<u64>) {
    let ignored = known.or_else(ignored_signals).unwrap_or(u64::MAX);
    // The kernel's struct sigaction on x86_64 and aarch64: handler, flags,
    // restorer, mask (the C library's differs).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: resetting dispositions to SIG_DFL and clearing the mask are
    // always valid; `dfl` outlives the calls. The raw syscall, because the
    // C library refuses signals 32 and 33 (its own), which a caller may
    // still have left ignored; SIGKILL and SIGSTOP just return EINVAL.
    unsafe {
        for sig in 1..=64 {
            if ignored & (1u64 << (sig - 1)) != 0 {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// The `SigIgn` mask of this process, read without allocating.
pub(crate) fn ignored_signals() -> Option<u64> {
    let fd = sys::open(c"/proc/self/status", libc::O_RDONLY).ok()?;
    let mut buf = [0u8; 4096];
    let n = sys::read_full(fd, &mut buf);
    sys::close(fd);
    sig_ign_mask(&buf[..n.ok()?])
}

/// Parses the `SigIgn:` line of a /proc/PID/status text.
fn sig_ign_mask(status: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\nSigIgn:\t";
    let at = status.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let mut mask: u64 = 0;
    let mut digits = 0;
    for &c in &status[at..] {
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'\n' => break,
            _ => return None,
        };
        mask = mask.checked_mul(16)? | u64::from(v);
        digits += 1;
    }
    (digits == 16).then_some(mask)
}

/// pid 1: reaps every child, forwards signals from outside the sandbox to
/// the payload, and exits (taking the whole pid namespace with it) when the
/// payload exits, after reporting its wait status — or at once when the
/// runner goes away (its end of the lifeline pipe closes).
/// A signalfd for every signal (init keeps them all blocked); init ends
/// when it cannot have one.
pub(crate) fn init_signalfd() -> RawFd {
    // SAFETY: `set` is initialised by sigfillset; signalfd returns a new fd.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if sfd < 0 {
        sys::exit_now(125);
    }
    sfd
}

/// Waits until the signalfd `sfd` or `other` is readable (or hung up);
/// returns which: (signals pending, `other` ready).
pub(crate) fn wait_signal_or(sfd: RawFd, other: RawFd) -> (bool, bool) {
    let mut fds = [sfd, other].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `fds` is a valid array of two pollfd structs.
    if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

fn init_loop(payload: libc::pid_t, status_w: RawFd, lifeline: RawFd, linger: bool) -> ! {
    let sfd = init_signalfd();
    // SAFETY: `si` is a valid, initialised C struct that read fills in;
    // waitpid writes into `status`.
    unsafe {
        loop {
            let (signals, gone) = wait_signal_or(sfd, lifeline);
            if gone {
                // The runner is gone (or broke protocol): nobody will reap,
                // limit or time this sandbox any more, so it ends now.
                sys::exit_now(125);
            }
            if !signals {
                continue;
            }
            let mut si: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                sfd,
                (&mut si as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            if n <= 0 {
                continue;
            }
            let sig = si.ssi_signo as libc::c_int;
            if sig == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if pid <= 0 {
                        break;
                    }
                    if pid == payload {
                        // Where init cannot end the rest itself, it exits
                        // as usual (the runner then reaps it).
                        let linger = linger && end_everything_else();
                        let _ = sys::write_all(status_w, &status_report(status));
                        if linger {
                            linger_until_gone(lifeline);
                        }
                        sys::exit_now(0);
                    }
                }
            } else if si.ssi_pid == 0 {
                // Sent from outside the sandbox's pid namespace (the runner):
                // pass it on. Signals from inside are dropped.
                let _ = sys::kill(payload, sig);
            }
        }
    }
}

/// Init's report when the payload has ended: its wait status, then the cpu
/// time (user + system, in microseconds) of init and of every child it has
/// reaped ([`STATUS_REPORT_LEN`] bytes, native endian) — what reaping init
/// would tell — so that a runner that does not reap init still learns it.
fn status_report(status: libc::c_int) -> [u8; STATUS_REPORT_LEN] {
    let mut cpu = 0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: an all-zero rusage is valid for getrusage to overwrite.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        unsafe { libc::getrusage(who, &mut ru) };
        cpu += sys::cpu_micros(&ru);
    }
    let mut b = [0u8; STATUS_REPORT_LEN];
    b[..4].copy_from_slice(&status.to_ne_bytes());
    b[4..].copy_from_slice(&cpu.to_ne_bytes());
    b
}

/// The length of init's status report ([`status_report`]).
pub(crate) const STATUS_REPORT_LEN: usize = 12;

/// Kills every other process of the sandbox and reaps them all, so that
/// init is the last one left (as its own exit would, through the kernel);
/// false, doing nothing, when init is not pid 1 of its namespace. Init
/// holds all capabilities of the sandbox's user namespace, which owns every
/// process in its pid namespace: `kill(-1)` reaches each of them, and every
/// orphan is init's child by the time its parent is gone.
fn end_everything_else() -> bool {
    // SAFETY: getpid (the raw syscall: libc may cache a pid across a raw
    // clone), kill and waitpid with a valid out pointer; as pid 1 of the
    // namespace (checked: `kill(-1)` from anywhere else would reach
    // processes outside the sandbox), `kill(-1)` signals every process in
    // it except init.
    unsafe {
        if libc::syscall(libc::SYS_getpid) != 1 {
            return false;
        }
        libc::kill(-1, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(-1, &mut status, libc::__WALL) > 0 || sys::errno() == libc::EINTR {}
    }
    true
}

/// Init's last duty when it stays after its report: until the lifeline
/// closes (the runner is done, or gone), move itself out of the sandbox's
/// cgroup when the runner sends the parents' `tasks` files
/// (`Cgroup::leave_handles`; the data byte says how many), answering `1`
/// when all of them came and every move succeeded, and `0` otherwise.
/// Signals stay blocked and pending: nothing is left to forward them to.
fn linger_until_gone(lifeline: RawFd) {
    loop {
        let mut count = [0u8; 1];
        let mut fds = [-1; sys::MAX_FDS];
        let Ok((1, n)) = sys::recv_with_fds(lifeline, &mut count, &mut fds) else {
            return;
        };
        let mut moved = usize::from(count[0]) == n;
        for fd in &fds[..n] {
            moved &= sys::write_all(*fd, b"0").is_ok();
            sys::close(*fd);
        }
        if sys::write_all(lifeline, if moved { b"1" } else { b"0" }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let st = "42 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 11 12\n";
        assert_eq!(sys::stat_field(st, 4), Some(1));
        assert_eq!(sys::stat_field(st, 14), Some(11));
        assert_eq!(sys::stat_field(st, 3), None); // "S" is not a number
        assert_eq!(sys::stat_field(st, 40), None);
        assert_eq!(sys::stat_field("no parenthesis 1 2", 3), None);
        let me = std::fs::read_to_string("/proc/self/stat").expect("stat");
        assert_eq!(
            sys::stat_field(&me, 4),
            Some(std::os::unix::process::parent_id() as u64)
        );
    }

    #[test]
    fn sig_ign_is_parsed_from_proc_status() {
        let st = b"Name:\tx\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\nSigCgt:\t0000000180000000\n";
        assert_eq!(sig_ign_mask(st), Some(1 << (libc::SIGPIPE - 1)));
        assert_eq!(sig_ign_mask(b"SigIgn:\t0000000000001000\n"), None);
        assert_eq!(sig_ign_mask(b"\nSigIgn:\tzz\n"), None);
        // This test process (a Rust program) ignores SIGPIPE.
        let me = ignored_signals().expect("own SigIgn");
        assert_ne!(me & (1 << (libc::SIGPIPE - 1)), 0);
    }

    #[test]
    fn fmt_u64_writes_decimal_digits() {
        let mut b = [0u8; 20];
        assert_eq!(fmt_u64(0, &mut b), b"0");
        assert_eq!(fmt_u64(104857600, &mut b), b"104857600");
        assert_eq!(fmt_u64(u64::MAX, &mut b), b"18446744073709551615");
    }

    #[test]
    fn rlimits_round_trip_and_garbage_is_refused() {
        for r in [
            Rlimits::default(),
            Rlimits {
                data: Some(512 << 20),
                nproc: None,
            },
            Rlimits {
                data: None,
                nproc: Some(256),
            },
            Rlimits {
                data: Some(u64::MAX),
                nproc: Some(0),
            },
        ] {
            assert_eq!(Rlimits::decode(&r.encode()), Some(r));
        }
        let mut bad = Rlimits::default().encode();
        bad[0] = b'x';
        assert_eq!(Rlimits::decode(&bad), None);
    }
}
