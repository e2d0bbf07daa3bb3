//! The host processes of a VM (its VMM and its virtiofsd daemons): started
//! so that they die with this process, recorded so that a later nanoclaw
//! sweeps whatever a killed one left behind.
//!
//! Each is started with `PR_SET_PDEATHSIG` = `SIGKILL`. That signal follows
//! the *thread* that forked, not the process, so every child is forked by
//! one launcher thread that lives as long as the process (a daemon calls
//! `create` from short-lived pool threads). The guest agent also powers the
//! VM off when the control channel closes, and each VM's state directory
//! records its owner and its processes (pid and start time, so a reused pid
//! is never killed) for [`sweep`].

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

type Job = (Command, Sender<io::Result<Child>>);

/// Starts `cmd` from the launcher thread, tied to this process's life.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static LAUNCHER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl.
            if libc::getppid() != parent {
                return Err(io::Error::other("nanoclaw ended while starting the VM"));
            }
            Ok(())
        });
    }
    let tx = LAUNCHER
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("microvm-launcher".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                });
            if let Err(e) = spawned {
                eprintln!("nanoclaw: microvm: cannot start the launcher thread: {e}");
            }
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (reply_tx, reply_rx) = channel();
    tx.send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the microvm launcher thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the microvm launcher thread is gone"))?
}

/// Open files a virtiofsd may hold: it keeps a descriptor for every inode
/// the guest has looked up, and a guest walking the host's `/usr` (180,000
/// entries here) exhausts a smaller limit and breaks the share for every
/// later command of that VM (found by the containment suite; where this
/// process may not raise its hard limit, the walk still does).
pub const VIRTIOFSD_NOFILE: u64 = 1 << 20;

/// Raises the child's open-file limit to `n` (soft and hard), before exec,
/// where this process may (CAP_SYS_RESOURCE; the host's `nr_open` caps
/// it); else its soft limit to its hard one. Best effort: never fails.
pub fn raise_nofile(cmd: &mut Command, n: u64) {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(n);
    let want = libc::rlimit {
        rlim_cur: n.min(nr_open),
        rlim_max: n.min(nr_open),
    };
    // SAFETY: the closure runs in the forked child before exec and calls
    // only getrlimit and setrlimit (async-signal-safe) on values on its
    // own stack or made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                let mut now = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) == 0 {
                    now.rlim_cur = now.rlim_max;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &now);
                }
            }
            Ok(())
        });
    }
}

/// Makes `listener` the child's fd 3 (for `--fd=3`), before exec.
///
/// # Safety
/// Called from `pre_exec`: `listener` must be open in the parent.
pub unsafe fn pass_as_fd3(cmd: &mut Command, listener: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if listener == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(listener, 3) != 3 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Gives the child a private mount namespace in which `dir` is a
/// read-only bind mount of itself, before exec: a virtiofsd sharing it can
/// then not write to it whatever the guest asks.
pub fn readonly_view(cmd: &mut Command, dir: &Path) -> io::Result<()> {
    let c = |s: &[u8]| {
        std::ffi::CString::new(s).map_err(|_| io::Error::other("a path with a NUL byte"))
    };
    let target = c(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))?;
    let root = c(b"/")?;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (unshare, mount) on C strings made
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let null = std::ptr::null();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    null,
                    root.as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    null.cast(),
                ) != 0
                || libc::mount(
                    target.as_ptr(),
                    target.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    null.cast(),
                ) != 0
                || libc::mount(
                    null,
                    target.as_ptr(),
                    null,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    null.cast(),
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A process's start time (field 22 of `/proc/PID/stat`), or `None` when
/// it does not run (a zombie does not): the engine's
/// [`nanoclaw_sandbox::procs::start_time`] for this crate's `i32` pids.
pub fn start_time(pid: i32) -> Option<u64> {
    u32::try_from(pid)
        .ok()
        .and_then(nanoclaw_sandbox::procs::start_time)
}

/// `pid start_time` of `pid`, as recorded.
pub fn record(pid: i32) -> String {
    format!("{pid} {}\n", start_time(pid).unwrap_or(0))
}

/// Whether the recorded `pid start_time` still names a running process.
fn still_runs(line: &str) -> Option<i32> {
    let (pid, start) = line.trim().split_once(' ')?;
    let pid: i32 = pid.parse().ok()?;
    let start: u64 = start.parse().ok()?;
    (pid > 1 && start_time(pid) == Some(start)).then_some(pid)
}

/// Appends `pid` to the VM directory's process list.
pub fn remember(dir: &Path, pid: i32) -> io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("procs"))?
        .write_all(record(pid).as_bytes())
}

/// Removes what VMs of dead owners left under `root`: kills their recorded
/// processes and removes their directories. Returns the directories swept.
pub fn sweep(root: &Path) -> Vec<PathBuf> {
    let mut swept = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let dir = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
        // A directory without an owner record yet may be one being made
        // right now: left alone for a minute.
        if owner.is_empty()
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60))
        {
            continue;
        }
        if sweep_one(&dir) {
            swept.push(dir);
        }
    }
    swept
}

/// Removes the VM directory `dir` if its owner (the process that started
/// its VMM: a holder, or a `nanoclaw run`) is gone: kills the processes it
/// recorded that still run, removes the directory. Whether it removed it.
pub fn sweep_one(dir: &Path) -> bool {
    let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
    if still_runs(&owner).is_some() {
        return false;
    }
    let procs = std::fs::read_to_string(dir.join("procs")).unwrap_or_default();
    let pids: Vec<i32> = procs.lines().filter_map(still_runs).collect();
    kill_and_wait(&pids, Duration::from_secs(2));
    std::fs::remove_dir_all(dir).is_ok()
}

/// Waits (at most `patience`) until none of `procs` (pid, start time)
/// runs; whether none does.
pub fn wait_gone(procs: &[(i32, u64)], patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        let left = procs
            .iter()
            .any(|(pid, start)| start_time(*pid) == Some(*start));
        if !left {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs `pids` and waits (at most `patience`) until none runs.
pub fn kill_and_wait(pids: &[i32], patience: Duration) {
    for &p in pids {
        // SAFETY: kill has no memory effects; p > 1 was checked by the caller.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let deadline = Instant::now() + patience;
    while pids.iter().any(|p| start_time(*p).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to exit within `patience`; kills it otherwise.
pub fn reap(child: &mut Child, patience: Duration) {
    let deadline = Instant::now() + patience;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
