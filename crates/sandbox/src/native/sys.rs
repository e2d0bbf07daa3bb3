//! Thin, typed wrappers around the raw system calls the engine needs.
//!
//! Every wrapper returns `io::Result` with the OS error; callers attach the
//! step name. None of them allocates, so they are safe to call in the
//! sandbox's child after `clone`.

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::ptr;

/// Converts a `-1`-on-error return value into an `io::Result`.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `clone(flags | SIGCHLD)` with fork semantics (the child continues on a
/// copy of the caller's stack). Returns 0 in the child, the child's pid in
/// the parent.
///
/// The caller must be single-threaded, or the child must not allocate.
pub fn clone_fork(flags: libc::c_ulong) -> io::Result<libc::pid_t> {
    // SAFETY: a raw clone without CLONE_VM and with a null stack behaves like
    // fork(2): the child gets a copy-on-write copy of the address space and
    // resumes here with a return value of 0. No pointer arguments are passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    check(ret).map(|p| p as libc::pid_t)
}

/// A stack for [`clone_vfork`] children: an anonymous mapping with a
/// guard page below it, made once and reused by every child (a vfork
/// child runs alone on it: its parent is suspended until it execs).
pub struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

/// The guard page at the bottom of a [`ChildStack`].
const GUARD: usize = 4096;

impl ChildStack {
    /// Maps `len` bytes (reserved lazily: only touched pages are
    /// allocated) plus the guard page.
    pub fn new(len: usize) -> io::Result<Self> {
        let total = len + GUARD;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. The result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the first page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping exactly the mapping made above.
            unsafe { libc::munmap(base, total) };
            return Err(e);
        }
        Ok(ChildStack { base, len: total })
    }

    /// The initial stack pointer: the mapping's top, 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        ((self.base as usize + self.len) & !15) as *mut libc::c_void
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made; no child runs
        // on it any more (clone_vfork returns only once its child exec'd
        // or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` running `entry(arg)` on
/// `stack`: posix_spawn's way of starting a process. The child shares the
/// caller's memory (no page tables are copied, and its `execve` has no
/// copy to tear down) but not its file table, signal handlers, working
/// directory, credentials, limits or seccomp filters; the caller is
/// suspended until the child has called `execve` successfully or exited.
/// Returns the child's pid.
///
/// Containment: until its `execve`, the child's address space *is* its
/// caller's (a sandbox's init), so reaching into the child before it
/// execs (`ptrace`, `/proc/PID/mem`, `process_vm_readv`/`writev`, or
/// `pidfd_getfd` of the descriptors it copied from init) would reach into
/// init. tests/vfork_window.rs races a hostile exec against many others
/// to try exactly that; with layers removed one at a time, what refuses
/// it is:
/// - capabilities: until its privilege drop the child has init's
///   credentials, every capability of the sandbox's user namespace, and
///   the kernel lets no process without them (every payload) ptrace one
///   that has them;
/// - dumpability, which belongs to the address space: init is
///   non-dumpable (`PR_SET_DUMPABLE` 0; it is even without that call, its
///   setup's credential change did it already), and the child's privilege drop, a credential change,
///   sets the shared address space's dumpability to `fs.suid_dumpable`
///   again. With 0 (the default) or 2, access needs `CAP_SYS_PTRACE`,
///   which no payload holds. With `fs.suid_dumpable` = 1 every exec makes
///   init's memory dumpable, and between the child's drop and its
///   `execve` only Landlock stands (inferred from the kernel's
///   `commit_creds`, not tested: it is a host-wide setting). Nothing may
///   make the child dumpable before its `execve`: with that and without
///   the Landlock sub-domain, the test reads init's memory through
///   /proc/PID/mem and (with no seccomp filter) takes its descriptors
///   with `pidfd_getfd`;
/// - each exec enters a Landlock sub-domain of its own before the drop,
///   from which no other exec may ptrace, open /proc/PID/mem or follow
///   /proc/PID/fd links (this alone held the window when the child was
///   made dumpable); the filesystem rules also refuse /proc/PID/mem for
///   writing to every exec;
/// - the default seccomp filter denies `ptrace`, `process_vm_readv`,
///   `process_vm_writev` and `pidfd_getfd` (not /proc/PID/mem, an `open`).
///
/// Keep all of these if this is changed.
///
/// # Safety
///
/// `entry` must end in `execve` or `_exit` without returning, and must
/// not allocate or write memory the caller relies on afterwards (it
/// writes the caller's `errno`); `arg` must be valid for it. Only one
/// child may use `stack` at a time, which the suspension guarantees for a
/// single-threaded caller.
pub unsafe fn clone_vfork(
    stack: &ChildStack,
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> io::Result<libc::pid_t> {
    // SAFETY: the stack is a live mapping owned by `stack`; the caller
    // upholds the contract above for `entry` and `arg`.
    let pid = unsafe {
        libc::clone(
            entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        )
    };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// `setgroups(2)` as a raw system call, acting on the calling thread only.
///
/// glibc's wrapper (like its set*id wrappers) broadcasts the change to
/// every thread it believes the process has (`__nptl_setxid`) and waits for
/// each: in a child made by a raw `clone` from a multithreaded process, it
/// waits forever for threads that exist only in the parent. The sandbox's
/// child is single-threaded, so the per-thread syscall is what it needs.
pub fn setgroups_raw(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `groups` is a valid array of `groups.len()` gids (a null
    // pointer is never dereferenced for an empty slice).
    let ret = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    check(ret).map(drop)
}

/// `setresuid(2)` as a raw system call (see [`setgroups_raw`]).
pub fn setresuid_raw(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: integer-only system call.
    let ret = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    check(ret).map(drop)
}

/// `setresgid(2)` as a raw system call (see [`setgroups_raw`]).
pub fn setresgid_raw(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: integer-only system call.
    let ret = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    check(ret).map(drop)
}

/// Sets the calling thread's effective uid and gid (gid first, so that it
/// is done while the thread is still privileged; real and saved ids are
/// kept), as raw system calls acting on this thread only (see
/// [`setgroups_raw`]). With root's real and saved uid, setting the
/// effective uid back to 0 restores the effective capabilities.
pub fn set_effective_ids_raw(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    let keep = libc::uid_t::MAX; // -1: leave unchanged
                                 // Going back to root: the uid first, to regain CAP_SETGID.
    let uid_first = uid == 0;
    let set_uid = || {
        // SAFETY: integer-only system call.
        check(unsafe { libc::syscall(libc::SYS_setresuid, keep, uid, keep) }).map(drop)
    };
    let set_gid = || {
        // SAFETY: integer-only system call.
        check(unsafe { libc::syscall(libc::SYS_setresgid, keep, gid, keep) }).map(drop)
    };
    if uid_first {
        set_uid()?;
        set_gid()
    } else {
        set_gid()?;
        set_uid()
    }
}

/// `prctl(option)` for a `PR_GET_*` option that returns its value.
pub fn prctl_get(option: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: the PR_GET_* options used here take no pointer arguments.
    let ret = unsafe { libc::prctl(option, 0 as libc::c_ulong, 0 as libc::c_ulong, 0, 0) };
    check(ret.into()).map(|v| v as libc::c_int)
}

/// The calling thread's parent-death signal (`PR_GET_PDEATHSIG`).
pub fn get_pdeathsig() -> io::Result<libc::c_int> {
    let mut sig: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which
    // points to `sig`.
    let ret = unsafe {
        libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut sig as *mut libc::c_int,
            0,
            0,
            0,
        )
    };
    check(ret.into()).map(|_| sig)
}

/// Blocks every signal in the calling thread and returns the previous mask.
///
/// Around a `clone` from a multithreaded runner: the child must not run a
/// handler of the parent's (on a copy of the parent's memory) before it
/// installs its own mask.
pub fn block_all_signals() -> libc::sigset_t {
    // SAFETY: both sets are valid sigset_t values; sigfillset initialises
    // `all`, and pthread_sigmask only reads it and writes `old`.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
}

/// Restores a signal mask saved by [`block_all_signals`].
pub fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: `old` is a valid sigset_t returned by pthread_sigmask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// `mount(2)`. `None` arguments are passed as NULL.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let p = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: all pointers are either NULL or point to NUL-terminated strings
    // that outlive the call.
    let ret = unsafe {
        libc::mount(
            p(source),
            target.as_ptr(),
            p(fstype),
            flags,
            p(data).cast::<libc::c_void>(),
        )
    };
    check(ret.into()).map(drop)
}

/// The `mount_attr` argument of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `MOUNT_ATTR_RDONLY`.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// `MOUNT_ATTR_NOEXEC`.
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
/// `MOUNT_ATTR_IDMAP`.
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `mount_setattr(dirfd, path, flags, {attr_set, userns_fd})`: sets mount
/// attributes, recursively when `flags` has `AT_RECURSIVE`.
pub fn mount_setattr(
    dirfd: RawFd,
    path: &CStr,
    flags: libc::c_uint,
    attr_set: u64,
    userns_fd: Option<RawFd>,
) -> io::Result<()> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns_fd.map_or(0, |fd| fd as u64),
    };
    // SAFETY: `path` is NUL-terminated and `attr` is a valid, correctly sized
    // `struct mount_attr` that lives across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

/// `open_tree(dirfd, path, flags)`: with `OPEN_TREE_CLONE` a detached copy
/// of the mount at `path`.
pub fn open_tree(dirfd: RawFd, path: &CStr, flags: libc::c_uint) -> io::Result<RawFd> {
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_open_tree, dirfd, path.as_ptr(), flags) };
    check(ret).map(|fd| fd as RawFd)
}

/// `move_mount(from_fd, "", to_fd, "", F_EMPTY_PATH | T_EMPTY_PATH)`:
/// attaches a detached mount onto the directory `to_fd` refers to.
pub fn move_mount_fd(from_fd: RawFd, to_fd: RawFd) -> io::Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    // SAFETY: both paths are empty NUL-terminated strings; the fds are ints.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from_fd,
            c"".as_ptr(),
            to_fd,
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    check(ret).map(drop)
}

/// `pivot_root(new_root, put_old)`.
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret).map(drop)
}

/// `umount2(target, flags)`.
pub fn umount2(target: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `target` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::umount2(target.as_ptr(), flags) };
    check(ret.into()).map(drop)
}

/// `symlink(target, linkpath)`.
pub fn symlink(target: &CStr, linkpath: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe { libc::symlink(target.as_ptr(), linkpath.as_ptr()) };
    check(ret.into()).map(drop)
}

/// Creates (or truncates) `path` with `mode` and writes all of `data`; no
/// component of `path` may be a symlink.
pub fn write_file(path: &CStr, data: &[u8], mode: libc::mode_t) -> io::Result<()> {
    let fd = openat2_no_symlinks(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, mode)?;
    let r = write_all(fd, data);
    close(fd);
    r
}

/// Writes the whole content of `src` (read with `pread` from offset 0, so
/// a shared file offset does not matter) to a new file at `path`. Does not
/// allocate (it runs in the child between `clone` and `execve`).
pub fn copy_fd_to_file(src: RawFd, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    let fd = openat2_no_symlinks(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, mode)?;
    let mut buf = [0u8; 8192];
    let mut off: libc::off_t = 0;
    let r = loop {
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::pread(src, buf.as_mut_ptr().cast(), buf.len(), off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if n == 0 {
            break Ok(());
        }
        if let Err(e) = write_all(fd, &buf[..n as usize]) {
            break Err(e);
        }
        off += n as libc::off_t;
    };
    close(fd);
    r
}

/// Writes all of `data` to `fd`, retrying on EINTR and short writes.
pub fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is a valid slice for reads of `data.len()` bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Reads into `buf`, retrying on EINTR. Returns 0 at end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads until `buf` is full or the end of the file; returns how much was
/// read. Does not allocate (safe between fork and exec).
pub fn read_full(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match read(fd, &mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Waits until `fd` is readable (or hung up) or `deadline` passes:
/// `Ok(true)` when readable, `Ok(false)` at the deadline.
pub fn wait_readable(fd: RawFd, deadline: std::time::Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: `p` is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n < 0 && errno() != libc::EINTR {
            return Err(io::Error::last_os_error());
        }
    }
}

/// Closes `fd`, ignoring errors (there is nothing useful to do about them).
pub fn close(fd: RawFd) {
    // SAFETY: closing an fd this module's caller owns; a bad fd only yields EBADF.
    unsafe { libc::close(fd) };
}

/// `pipe2(O_CLOEXEC)`: returns (read end, write end).
pub fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    check(ret.into())?;
    Ok((fds[0], fds[1]))
}

/// `dup2(old, new)`; the result does not have `FD_CLOEXEC`.
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on integer fds has no memory-safety requirements.
    let ret = unsafe { libc::dup2(old, new) };
    check(ret.into()).map(drop)
}

/// `open(path, flags)`.
pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<RawFd> {
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    check(ret.into()).map(|fd| fd as RawFd)
}

/// A pidfd for `pid` (close-on-exec; readable once it has exited).
/// `ENOSYS` before Linux 5.3.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<RawFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    check(fd).map(|fd| fd as RawFd)
}

/// `pidfd_send_signal(pidfd, sig)`: signals the process the pidfd names,
/// or fails with `ESRCH` once it has exited (never another process).
pub fn pidfd_send_signal(pidfd: RawFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no siginfo (null) and no flags; the kernel checks the fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check(r).map(drop)
}

/// Sets or clears `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL on an integer fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(flags.into())?;
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    check(ret.into()).map(drop)
}

/// `prctl(option, arg2, 0, 0, 0)`.
pub fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the prctl options used by the engine take integer arguments only.
    let ret = unsafe { libc::prctl(option, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) };
    check(ret.into()).map(drop)
}

/// `kill(pid, sig)`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety requirements.
    let ret = unsafe { libc::kill(pid, sig) };
    check(ret.into()).map(drop)
}

/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`: marks every fd from
/// `first` on close-on-exec; falls back to closing them one by one.
pub fn cloexec_from(first: libc::c_uint) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only manipulates the fd table.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return;
    }
    for fd in first..4096 {
        // SAFETY: F_SETFD on a possibly-unused fd only fails with EBADF.
        unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The cpu time (user + system) in `ru`, in microseconds.
pub fn cpu_micros(ru: &libc::rusage) -> u64 {
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    micros(ru.ru_utime) + micros(ru.ru_stime)
}

/// `_exit(code)`: leaves without running destructors or atexit handlers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`.
pub fn socketpair() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    check(ret.into())?;
    Ok((fds[0], fds[1]))
}

/// Space for one `SCM_RIGHTS` control message carrying one descriptor.
#[repr(C)]
union CmsgBuf {
    _align: libc::cmsghdr,
    buf: [u8; 64],
}

/// Most descriptors [`send_with_fds`] passes in one message (an exec's
/// four pipes; a sandbox's v1 cgroup `tasks` files, up to five).
pub const MAX_FDS: usize = 6;

/// Sends descriptor `fd` over the Unix socket `sock` (`SCM_RIGHTS`), with
/// one data byte. Does not allocate.
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    send_with_fds(sock, &[0u8], &[fd])
}

/// Receives one descriptor sent with [`send_fd`]; it is close-on-exec.
pub fn recv_fd(sock: RawFd) -> io::Result<RawFd> {
    let mut byte = [0u8; 1];
    let mut fds = [-1; MAX_FDS];
    match recv_with_fds(sock, &mut byte, &mut fds)? {
        (1, 1) => Ok(fds[0]),
        (_, n) => {
            for fd in &fds[..n] {
                close(*fd);
            }
            Err(io::Error::from_raw_os_error(libc::EPROTO))
        }
    }
}

/// Sends `data` (non-empty) over the Unix stream socket `sock` with up to
/// [`MAX_FDS`] descriptors attached (`SCM_RIGHTS`, none if `fds` is
/// empty), in one `sendmsg`. Does not allocate.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf { buf: [0u8; 64] };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: msghdr is plain data; we point it at `iov` (the kernel only
    // reads `data` through it) and `cbuf`, which outlive the call, and fill
    // the single control header through the CMSG_* accessors, which stay
    // within CMSG_SPACE(MAX_FDS * sizeof(int)) = 40 <= 64 bytes of the aligned buffer.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.buf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(fd_bytes) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
            let dst = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(dst.add(i), *fd);
            }
        }
        let n = check(libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) as libc::c_long)? as usize;
        // A stream socket may take less; the descriptors went with the first byte.
        if n < data.len() {
            write_all(sock, &data[n..])?;
        }
        Ok(())
    }
}

/// Receives `buf.len()` bytes sent with [`send_with_fds`] and the
/// descriptors that came with them (close-on-exec) into `fds`. Returns
/// (bytes read, descriptors received); fewer bytes means end of file.
/// Does not allocate.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut [RawFd; MAX_FDS],
) -> io::Result<(usize, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf { buf: [0u8; 64] };
    let mut got_fds = 0;
    // SAFETY: as in send_with_fds; the kernel writes at most msg_controllen
    // bytes into `cbuf` and at most `buf.len()` into `buf`, and we only read
    // headers it reported, each bounded by its cmsg_len.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of::<CmsgBuf>();
        let n = loop {
            let r = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if r >= 0 || errno() != libc::EINTR {
                break check(r as libc::c_long)? as usize;
            }
        };
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let src = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(src.add(i));
                    if got_fds < MAX_FDS {
                        fds[got_fds] = fd;
                        got_fds += 1;
                    } else {
                        close(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        n
    };
    if n == 0 || n == buf.len() {
        return Ok((n, got_fds));
    }
    let rest = read_full(sock, &mut buf[n..])?;
    Ok((n + rest, got_fds))
}

/// A TCP socket listening on 127.0.0.1:`port` in the caller's network
/// namespace. Does not allocate.
pub fn listen_loopback(port: u16) -> io::Result<RawFd> {
    // SAFETY: plain socket calls; `addr` is a valid, fully initialised
    // sockaddr_in of the size passed.
    unsafe {
        let fd =
            check(libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0).into())?
                as RawFd;
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let r = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if r != 0 || libc::listen(fd, 128) != 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

/// A socket bound to the loopback address (127.0.0.1, or ::1 with
/// `IPV6_V6ONLY`) port `port` in the caller's network namespace: a
/// listening TCP socket if `stream`, else a UDP socket. Does not allocate.
pub fn bind_loopback(v6: bool, stream: bool, port: u16) -> io::Result<RawFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let ty = if stream {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain socket calls; the sockaddr passed is a valid, fully
    // initialised sockaddr_in / sockaddr_in6 of the size given.
    unsafe {
        let fd = check(libc::socket(family, ty | libc::SOCK_CLOEXEC, 0).into())? as RawFd;
        let one: libc::c_int = 1;
        let r = if v6 {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            addr.sin6_port = port.to_be();
            addr.sin6_addr.s6_addr = std::net::Ipv6Addr::LOCALHOST.octets();
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        } else {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_port = port.to_be();
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r != 0 || (stream && libc::listen(fd, 1024) != 0) {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

/// `close_range(first, last, 0)`; falls back to closing one by one (up to
/// 4096) on kernels without it.
pub fn close_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: close_range only manipulates the fd table.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
    if ret == 0 {
        return;
    }
    for fd in first..=last.min(4096) {
        close(fd as RawFd);
    }
}

/// `openat2(AT_FDCWD, path, flags, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`:
/// opens `path` only if no component of it is a symlink. Used for mount
/// targets, which may lie inside a writable workspace whose contents the
/// sandboxed code controls.
pub fn open_no_symlinks(path: &CStr, flags: libc::c_int) -> io::Result<RawFd> {
    openat2_no_symlinks(path, flags, 0)
}

/// `openat2` with `RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` (and
/// `O_CLOEXEC`), creating with `mode` when `flags` has `O_CREAT`.
fn openat2_no_symlinks(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<RawFd> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve: RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `path` is NUL-terminated and `how` is a valid open_how of the
    // size passed; both outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    check(ret).map(|fd| fd as RawFd)
}

/// Writes `/proc/self/fd/<fd>` into `buf` and returns it as a C string.
pub fn proc_fd_path(fd: RawFd, buf: &mut [u8; 32]) -> &CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/proc/self/fd/")
}

/// Splits an absolute path into its parent (written NUL-terminated into
/// `buf`) and its last component.
pub fn split_parent<'a>(
    path: &'a CStr,
    buf: &'a mut [u8; 4096],
) -> io::Result<(&'a CStr, &'a CStr)> {
    let bytes = path.to_bytes_with_nul();
    let slash = bytes
        .iter()
        .rposition(|&b| b == b'/')
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    if slash + 1 > buf.len() - 1 {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let parent_len = slash.max(1);
    buf[..parent_len].copy_from_slice(&bytes[..parent_len]);
    buf[parent_len] = 0;
    let parent = CStr::from_bytes_until_nul(&buf[..])
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let name = CStr::from_bytes_with_nul(&bytes[slash + 1..])
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((parent, name))
}

/// Numeric field `n` (numbered from 1 as in proc(5); `n >= 3`) of a
/// `/proc/PID/stat` text. Fields are counted after the last `)`: the
/// command name (field 2) may contain spaces and parentheses.
pub fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}
