//! Init of a long-lived sandbox: instead of running one command, it serves
//! exec requests from the runner (or keeper) on the sync socket, forking
//! each command from itself — inside every namespace, the cgroup and the
//! root of the sandbox already — and hardening it exactly like a `run`
//! payload (see [`super::payload`]). Nothing of the runner's ever enters
//! the sandbox: the command is a copy of init, which holds no capability
//! the payload could reach, is non-dumpable and has the runner's strings
//! wiped.
//!
//! Init allocates nothing here (it is a raw clone of a possibly
//! multithreaded runner, whose allocator lock another thread may have
//! held): requests are read into a fixed buffer on its stack and pointed
//! into.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::os::fd::RawFd;

use super::super::proto::{self, Header};
use super::super::sys;
use super::{payload, ChildPlan, Cmd, Program, Rlimits};

/// PATH when the request's environment names none.
const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The commands started and not yet reaped: (pid, exec id); pid 0 is free.
type Running = [(libc::pid_t, u32); proto::MAX_EXECS];

/// The stack a command's process runs on between its `clone` and its
/// `execve` (see [`Spawner`]); the payload's frames need a few KiB, and
/// only the pages touched are ever allocated.
const EXEC_STACK: usize = 256 << 10;

/// What init prepares once for all its execs instead of once per exec:
/// the stack their `clone_vfork` children run on (no copy of init's page
/// tables per command, and nothing for `execve` to tear down), and init's
/// ignored signals, which every child inherits unchanged and resets (no
/// /proc/self/status read per command).
struct Spawner {
    /// `None` when the stack could not be mapped: execs are then forked.
    stack: Option<sys::ChildStack>,
    ignored_signals: Option<u64>,
}

/// What a `clone_vfork` child needs, on init's stack (init is suspended
/// until the child execs or exits, so it stays valid).
struct ExecChild<'a> {
    plan: &'a ChildPlan,
    rlimits: Rlimits,
    cmd: &'a Cmd<'a>,
}

/// The entry point of a `clone_vfork` child: the payload, which execs the
/// command or exits.
extern "C" fn exec_child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ExecChild` start_exec passed to clone_vfork,
    // alive on init's suspended stack for as long as this child runs.
    let c = unsafe { &*(arg as *const ExecChild) };
    payload(c.plan, c.rlimits, c.cmd)
}

/// Serves exec and kill requests until the runner goes away (end of file
/// on the socket: the sandbox ends with it) or breaks the protocol.
pub(crate) fn init_serve(plan: &ChildPlan, rlimits: Rlimits) -> ! {
    let sock = plan.sync_r;
    let sfd = super::init_signalfd();
    let mut running: Running = [(0, 0); proto::MAX_EXECS];
    let mut buf = [0u8; proto::MAX_REQUEST];
    let spawner = Spawner {
        stack: sys::ChildStack::new(EXEC_STACK).ok(),
        ignored_signals: super::ignored_signals(),
    };
    loop {
        let (signals, request) = super::wait_signal_or(sfd, sock);
        if signals {
            reap(sfd, sock, &mut running);
        }
        if request {
            serve_one(plan, rlimits, &spawner, sock, &mut buf, &mut running);
        }
    }
}

/// Reads one request and acts on it; ends init when the runner is gone or
/// the request is malformed.
fn serve_one(
    plan: &ChildPlan,
    rlimits: Rlimits,
    spawner: &Spawner,
    sock: RawFd,
    buf: &mut [u8; proto::MAX_REQUEST],
    running: &mut Running,
) {
    let mut hdr = [0u8; proto::HEADER];
    let mut fds = [-1; sys::MAX_FDS];
    let (n, nfds) = match sys::recv_with_fds(sock, &mut hdr, &mut fds) {
        Ok(x) => x,
        Err(_) => sys::exit_now(125),
    };
    if n < proto::HEADER {
        // The runner is gone: nobody will reap, limit or time this
        // sandbox any more, so it ends now.
        sys::exit_now(0);
    }
    let h = Header::decode(&hdr);
    let len = h.len as usize;
    if len > buf.len() || sys::read_full(sock, &mut buf[..len]).ok() != Some(len) {
        sys::exit_now(125);
    }
    let fds = &fds[..nfds];
    match h.kind {
        proto::EXEC => {
            let child = (plan, rlimits, spawner);
            let errno = start_exec(child, sock, h.id, &buf[..len], fds, running);
            if errno != 0 {
                reply(sock, proto::REFUSED, h.id, errno);
            }
        }
        proto::KILL if len == 4 => {
            let sig = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if let Some(&(pid, _)) = running.iter().find(|(p, id)| *p != 0 && *id == h.id) {
                // The command's process group (it made itself a session
                // leader), then the command itself should it have left it.
                let _ = sys::kill(-pid, sig);
                let _ = sys::kill(pid, sig);
            }
        }
        proto::KILL_ALL if len == 4 => {
            let sig = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            // From the pid namespace's init, -1 is every process of the
            // namespace except init itself (and none outside it).
            if (1..=64).contains(&sig) {
                let _ = sys::kill(-1, sig);
            }
        }
        _ => sys::exit_now(125),
    }
    for fd in fds {
        sys::close(*fd);
    }
}

/// Forks the command of an exec request; returns 0, or the errno to refuse
/// it with.
fn start_exec(
    (plan, rlimits, spawner): (&ChildPlan, Rlimits, &Spawner),
    sock: RawFd,
    id: u32,
    body: &[u8],
    fds: &[RawFd],
    running: &mut Running,
) -> i32 {
    if fds.len() < 3 {
        return libc::EBADF;
    }
    let Some(slot) = running.iter().position(|(p, _)| *p == 0) else {
        return libc::EAGAIN;
    };
    let mut argv: [*const c_char; proto::MAX_ARGS + 1] = [std::ptr::null(); proto::MAX_ARGS + 1];
    let mut envp: [*const c_char; proto::MAX_ARGS + 1] = [std::ptr::null(); proto::MAX_ARGS + 1];
    let Some(req) = parse_exec(body, &mut argv, &mut envp) else {
        return libc::EINVAL;
    };
    let cmd = Cmd {
        err_w: fds[0],
        stdin: fds.get(3).copied(),
        stdout: fds[1],
        stderr: fds[2],
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        program: Program::Search {
            name: req.name,
            path: req.path,
        },
        workdir: req.workdir,
        uid: req.uid,
        gid: req.gid,
        ignored_signals: spawner.ignored_signals,
    };
    let started = match &spawner.stack {
        Some(stack) => {
            let child = ExecChild {
                plan,
                rlimits,
                cmd: &cmd,
            };
            // SAFETY: exec_child runs the payload, which execs or exits
            // and allocates nothing (init's rule); `child` outlives the
            // call, which returns only once the child has left init's
            // memory; init is single-threaded, so the stack is free.
            unsafe {
                sys::clone_vfork(stack, exec_child, &child as *const ExecChild as *mut c_void)
            }
        }
        None => sys::clone_fork(0),
    };
    match started {
        Ok(0) => payload(plan, rlimits, &cmd),
        Ok(pid) => {
            running[slot] = (pid, id);
            reply(sock, proto::STARTED, id, pid);
            0
        }
        Err(e) => e.raw_os_error().unwrap_or(libc::EAGAIN),
    }
}

/// An exec request, pointing into the request buffer.
struct ExecReq<'a> {
    uid: u32,
    gid: u32,
    name: &'a [u8],
    path: &'a [u8],
    workdir: &'a CStr,
}

/// Parses `uid gid argc envc` (u32 little-endian) and then argc + envc + 1
/// NUL-terminated strings (argv, the environment, the working directory),
/// filling `argv` and `envp` (NULL-terminated).
fn parse_exec<'a>(
    body: &'a [u8],
    argv: &mut [*const c_char; proto::MAX_ARGS + 1],
    envp: &mut [*const c_char; proto::MAX_ARGS + 1],
) -> Option<ExecReq<'a>> {
    let word = |i: usize| -> Option<u32> {
        let b = body.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (uid, gid) = (word(0)?, word(1)?);
    let (argc, envc) = (word(2)? as usize, word(3)? as usize);
    if argc == 0 || argc > proto::MAX_ARGS || envc > proto::MAX_ARGS {
        return None;
    }
    let mut rest = body.get(16..)?;
    let mut next = || -> Option<&'a CStr> {
        let s = CStr::from_bytes_until_nul(rest).ok()?;
        rest = &rest[s.to_bytes().len() + 1..];
        Some(s)
    };
    let mut name: &[u8] = &[];
    for (i, slot) in argv.iter_mut().take(argc).enumerate() {
        let s = next()?;
        if i == 0 {
            name = s.to_bytes();
        }
        *slot = s.as_ptr();
    }
    argv[argc] = std::ptr::null();
    let mut path: &[u8] = DEFAULT_PATH;
    for slot in envp.iter_mut().take(envc) {
        let s = next()?;
        if let Some(p) = s.to_bytes().strip_prefix(b"PATH=") {
            path = p;
        }
        *slot = s.as_ptr();
    }
    envp[envc] = std::ptr::null();
    let workdir = next()?;
    Some(ExecReq {
        uid,
        gid,
        name,
        path,
        workdir,
    })
}

/// Reaps every child that has ended; reports the ones that were execs.
fn reap(sfd: RawFd, sock: RawFd, running: &mut Running) {
    // SAFETY: reading one signalfd_siginfo into a properly sized buffer.
    unsafe {
        let mut si: libc::signalfd_siginfo = std::mem::zeroed();
        libc::read(
            sfd,
            (&mut si as *mut libc::signalfd_siginfo).cast(),
            std::mem::size_of::<libc::signalfd_siginfo>(),
        );
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if let Some(slot) = running.iter_mut().find(|(p, _)| *p == pid) {
            let id = slot.1;
            *slot = (0, 0);
            reply(sock, proto::EXITED, id, status);
        }
    }
}

/// Sends one reply (a header and a 4-byte value) to the runner.
fn reply(sock: RawFd, kind: u32, id: u32, value: i32) {
    if sys::write_all(sock, &proto::frame(kind, id, value)).is_err() {
        sys::exit_now(0);
    }
}
