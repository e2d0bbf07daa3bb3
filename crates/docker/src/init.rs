//! The first process of every Docker sandbox: nanoclaw's own static
//! binary, `nanoclaw __docker-init SECONDS`. It reaps the orphans of
//! commands (as an init must) and exits when the sandbox's lifetime is
//! over or Docker asks it to stop, which ends the container; Docker then
//! removes it (`AutoRemove`). So a sandbox never outlives its lifetime,
//! whether or not any nanoclaw process is still running.

use std::time::{Duration, Instant};

/// Runs the init for `args` (`[SECONDS]`); returns its exit code.
pub fn init_main(args: &[String]) -> i32 {
    let Some(secs) = args.first().and_then(|s| s.parse::<u64>().ok()) else {
        eprintln!("nanoclaw __docker-init: expected the lifetime in seconds");
        return 2;
    };
    let end = Instant::now() + Duration::from_secs(secs);
    // Not dumpable: commands run as the same user must not open this
    // process's memory or its executable (nanoclaw's binary, mounted
    // read-only) through /proc/1 (CVE-2019-5736's path).
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's flag.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which
    // initialises it; the calls only change this process's signal mask.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    loop {
        // Reap every child that has ended.
        // SAFETY: waitpid with WNOHANG and a null status pointer.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return 0;
        }
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
        };
        // SAFETY: `set` and `ts` are valid for the call; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            return 0;
        }
    }
}
