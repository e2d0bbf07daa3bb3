//! What the sandbox gets of the runner's stdin, stdout and stderr: its own
//! pipes only. Init never holds the runner's descriptors (a pipeline
//! reading nanoclaw's output sees the end when nanoclaw ends), and a
//! terminal on the runner's stdin is never handed in (`--stdin` forwards
//! through a pipe, as `docker run -i` without `-t`). Root and rootless.

use std::fs;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// The children of `pid` (from /proc/*/stat).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn fd_target(pid: u32, fd: u32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<{e}>"))
}

#[test]
fn init_does_not_hold_the_runners_stdio() {
    if !is_root() {
        println!(
            "SKIP init_does_not_hold_the_runners_stdio: reading another process's fds needs root"
        );
        return;
    }
    for m in modes("init_does_not_hold_the_runners_stdio") {
        let mut ch = nc(m, &["run", "--", "sleep", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nanoclaw");
        let runner = ch.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        // Init is the runner's child; the payload (sleep) is init's.
        let init = loop {
            let found = children(runner)
                .into_iter()
                .find(|&p| !children(p).is_empty());
            if let Some(p) = found {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] no sandbox init appeared",
                m.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for fd in 0..3 {
            let (r, i) = (fd_target(runner, fd), fd_target(init, fd));
            assert_ne!(
                r, i,
                "[{}] init (pid {init}) holds the runner's fd {fd} ({r})",
                m.name
            );
            assert_eq!(i, "/dev/null", "[{}] init's fd {fd}", m.name);
        }
        let _ = ch.kill();
        let _ = ch.wait();
    }
}

/// A pseudo-terminal pair: (master, slave).
fn openpty() -> (OwnedFd, OwnedFd) {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we own;
    // `name` is a valid buffer of its length.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let s = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(s >= 0, "open pts");
        (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s))
    }
}

fn termios_lflag(fd: &OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero termios is valid for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid terminal fd and out pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn stdin_terminal_is_not_handed_to_the_sandbox() {
    for m in modes("stdin_terminal_is_not_handed_to_the_sandbox") {
        let (master, slave) = openpty();
        if let Some((uid, gid)) = m.user {
            // The rootless runner must be able to open its stdin: it is
            // passed open, but keep the pts owned by it like a login would.
            let _ = std::os::unix::fs::chown(
                format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&slave)),
                Some(uid),
                Some(gid),
            );
        }
        let before = termios_lflag(&slave);
        assert_ne!(before & libc::ECHO, 0, "a fresh pty echoes");
        let script = "stty -echo -isig 2>/dev/null; printf INJECTED >&0 2>/dev/null; \
                      if test -t 0; then echo TTY; else echo NOTTY; fi";
        let slave_file = fs::File::from(slave.try_clone().expect("dup slave"));
        let o = nc(m, &["run", "--json", "--stdin", "--", "sh", "-c", script])
            .stdin(Stdio::from(slave_file))
            .output()
            .expect("run nanoclaw");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("[{}] --json output: {e}: {}", m.name, text(&o.stdout)));
        assert_eq!(v["stdout"], "NOTTY\n", "[{}] {v}", m.name);
        // Nothing reached the terminal, and its settings are unchanged.
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut buf = [0u8; 4096];
        let mut mf = fs::File::from(master);
        let n = mf.read(&mut buf).unwrap_or(0);
        let seen = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            !seen.contains("INJECTED"),
            "[{}] the sandbox wrote to the user's terminal: {seen:?}",
            m.name
        );
        assert_eq!(
            termios_lflag(&slave),
            before,
            "[{}] the sandbox changed the user's terminal settings",
            m.name
        );
    }
}
