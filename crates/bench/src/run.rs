//! Running one command and measuring it: wall time from spawn to reap, exit
//! status, and the `ru_maxrss` that `wait4(2)` reports for it.
//!
//! What `ru_maxrss` means here (Linux, see `getrusage(2)` and
//! `kernel/exit.c:wait_task_zombie`): the rusage `wait4` returns for a pid is
//! that process's own usage *plus* that of every descendant it (or its
//! descendants, recursively) waited for. `ru_maxrss` is therefore the largest
//! peak resident set of any single process in the tree that was reaped inside
//! the tree, in KiB. It is not a sum. For `nanoclaw run -- /bin/true` that is
//! max(nanoclaw, the sandbox's init, /bin/true); /bin/true is measured on its
//! own (the `host` runner) to show that it cannot be the maximum.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One finished run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Wall time from just before `spawn` to `wait4` returning.
    pub wall: Duration,
    /// Exit status.
    pub status: ExitStatus,
    /// `ru_maxrss` (KiB) of the process tree, see the module docs.
    pub maxrss_kib: i64,
    /// stderr (first 4 KiB), when captured.
    pub stderr: Option<String>,
}

/// Run `argv` once with stdin and stdout on /dev/null. stderr is captured into a
/// temporary file when `capture_stderr`, else discarded.
pub fn run_once(argv: &[String], capture_stderr: bool) -> Result<RunResult> {
    let (program, args) = argv.split_first().context("empty command line")?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    let mut err_file = None;
    if capture_stderr {
        let f = tempfile_in_tmp()?;
        cmd.stderr(Stdio::from(f.try_clone()?));
        err_file = Some(f);
    } else {
        cmd.stderr(Stdio::null());
    }
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let (status, rusage) = wait4(pid)?;
    let wall = start.elapsed();
    // `child` is dropped without `wait()`: we reaped it ourselves with wait4.
    drop(child);
    let stderr = match err_file {
        Some(mut f) => {
            use std::io::Seek;
            f.rewind()?;
            let mut buf = Vec::new();
            f.take(4096).read_to_end(&mut buf)?;
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        None => None,
    };
    Ok(RunResult {
        wall,
        status,
        maxrss_kib: rusage.ru_maxrss,
        stderr,
    })
}

/// Run once, capturing stderr, and fail with a readable message unless it exits 0.
pub fn run_checked(argv: &[String]) -> Result<RunResult> {
    let r = run_once(argv, true)?;
    if !r.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            describe(r.status),
            r.stderr.as_deref().unwrap_or("").trim()
        );
    }
    Ok(r)
}

/// "exit code N" or "signal N".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".to_string(),
    }
}

/// An anonymous (already unlinked) file in /tmp.
fn tempfile_in_tmp() -> Result<File> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "nanoclaw-bench-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

/// `wait4(pid, &status, 0, &rusage)`, retried on EINTR.
fn wait4(pid: i32) -> Result<(ExitStatus, libc::rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers; all-zero is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `rusage` are valid, writable, properly aligned
        // locals that outlive the call; `pid` is our own unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((ExitStatus::from_raw(status), rusage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4 failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn true_succeeds_and_has_small_rss() {
        let r = run_checked(&argv(&["/bin/true"])).unwrap();
        assert!(r.status.success());
        assert!(
            r.maxrss_kib > 0 && r.maxrss_kib < 64 * 1024,
            "{}",
            r.maxrss_kib
        );
    }

    #[test]
    fn failure_is_reported_with_stderr() {
        let err = run_checked(&argv(&["/bin/sh", "-c", "echo boom >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit code 3") && err.contains("boom"), "{err}");
    }

    #[test]
    fn maxrss_includes_reaped_grandchildren() {
        // The shell's own RSS is small; python allocating 64 MiB in a child the
        // shell waits for must show up in the shell's wait4 rusage.
        let Ok(py) = which("python3") else { return };
        let r = run_checked(&argv(&[
            "/bin/sh",
            "-c",
            &format!("{py} -c 'b = bytearray(64 << 20)'; true"),
        ]))
        .unwrap();
        assert!(r.maxrss_kib > 60 * 1024, "{}", r.maxrss_kib);
    }

    fn which(name: &str) -> Result<String> {
        for p in ["/usr/bin", "/bin"] {
            let c = format!("{p}/{name}");
            if std::path::Path::new(&c).exists() {
                return Ok(c);
            }
        }
        bail!("no {name}")
    }
}
