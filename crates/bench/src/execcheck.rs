//! "No shelling out": run the sandbox once under `strace -f` and list every
//! successful `execve`/`execveat`. The only programs allowed are the runner
//! itself (also re-executed through /proc/self/exe, if it does that) and the
//! payload, exactly once. A `mount`, `ip`, `iptables`, `nft`, `newuidmap`… in
//! the list is a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The result of the check.
#[derive(Debug, Clone, Serialize)]
pub struct ExecCheck {
    /// The traced command line.
    pub command: Vec<String>,
    /// Every program successfully executed, with how often.
    pub execs: BTreeMap<String, usize>,
    /// Programs other than the runner and the payload.
    pub unexpected: Vec<String>,
    /// How many times the payload was executed (must be 1).
    pub payload_execs: usize,
    /// Successful execs whose path strace could not read (it shows an address,
    /// e.g. when not root and the tracee is not dumpable): the check is then
    /// inconclusive, not passed.
    pub unreadable: usize,
    /// Number of processes (and threads) strace saw.
    pub tasks: usize,
    /// Whether the check passed.
    pub ok: bool,
}

/// Trace `argv` (whose first element is the runner binary and whose last
/// `payload_argc` elements are the payload, starting with its absolute path).
pub fn check(strace: &Path, argv: &[String], payload: &str) -> Result<ExecCheck> {
    let dir = std::env::temp_dir().join(format!("nanoclaw-bench-strace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let prefix = dir.join("trace");
    let out = Command::new(strace)
        .args([
            "-f",
            "-ff",
            "-qq",
            "-s",
            "256",
            "-e",
            "trace=execve,execveat",
            "-o",
        ])
        .arg(&prefix)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {}", strace.display()))?;
    let mut lines = Vec::new();
    let mut tasks = 0;
    for entry in std::fs::read_dir(&dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        tasks += 1;
        lines.extend(text.lines().map(str::to_owned));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "`strace … {}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let runner = canonical(&argv[0]);
    let mut execs: BTreeMap<String, usize> = BTreeMap::new();
    let mut unreadable = 0;
    for l in &lines {
        if let Some(p) = successful_exec_path(l) {
            *execs.entry(p).or_default() += 1;
        } else if l.starts_with("execve(0x") && l.trim_end().ends_with("= 0") {
            unreadable += 1;
        }
    }
    let payload_canon = canonical(payload);
    let mut unexpected = Vec::new();
    let mut payload_execs = 0;
    for (p, n) in &execs {
        let c = canonical(p);
        if c == payload_canon || p == payload {
            payload_execs += n;
        } else if c != runner && p != "/proc/self/exe" && p != FD_EXEC {
            unexpected.push(p.clone());
        }
    }
    let ok = unexpected.is_empty() && payload_execs == 1 && unreadable == 0;
    Ok(ExecCheck {
        command: argv.to_vec(),
        execs,
        unexpected,
        payload_execs,
        unreadable,
        tasks,
        ok,
    })
}

/// How an `execveat(fd, "", …, AT_EMPTY_PATH)` (an fexecve, e.g. of a sealed
/// memfd copy of the runner) is listed. Counted as the runner re-executing
/// itself; were it the payload, `payload_execs` would be 0 and the check fail.
const FD_EXEC: &str = "<execveat of an fd>";

fn canonical(p: &str) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p))
}

/// From a strace line like `execve("/bin/true", ["/bin/true"], 0x… /* 3 vars */) = 0`,
/// the path, if the call succeeded. With `-ff` every task has its own file,
/// so calls are not split into unfinished/resumed halves.
fn successful_exec_path(line: &str) -> Option<String> {
    let rest = line
        .strip_prefix("execve(\"")
        .or_else(|| line.strip_prefix("execveat("))?;
    if !line.trim_end().ends_with("= 0") {
        return None;
    }
    if line.starts_with("execveat(") {
        // execveat(fd, "path", …): take the first quoted string.
        let start = rest.find('"')? + 1;
        let end = start + rest[start..].find('"')?;
        let p = &rest[start..end];
        return Some(if p.is_empty() { FD_EXEC } else { p }.to_string());
    }
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn parses_strace_lines() {
        assert_eq!(
            successful_exec_path(r#"execve("/bin/true", ["/bin/true"], 0x7ffd /* 3 vars */) = 0"#),
            Some("/bin/true".into())
        );
        assert_eq!(
            successful_exec_path(
                r#"execve("/usr/local/bin/true", ["true"], 0x7ffd /* 3 vars */) = -1 ENOENT (No such file or directory)"#
            ),
            None
        );
        assert_eq!(
            successful_exec_path(r#"execveat(3, "", ["init"], 0x0, AT_EMPTY_PATH) = 0"#),
            Some(FD_EXEC.to_string())
        );
        assert_eq!(successful_exec_path("+++ exited with 0 +++"), None);
    }

    #[test]
    fn flags_a_shell_out() {
        let strace = Path::new("/usr/bin/strace");
        if !strace.exists() {
            return;
        }
        let argv: Vec<String> = ["/bin/sh", "-c", "/bin/true; /bin/echo >/dev/null"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = check(strace, &argv, "/bin/true").unwrap();
        assert_eq!(c.payload_execs, 1);
        assert_eq!(c.unexpected, vec!["/bin/echo".to_string()]);
        assert!(!c.ok);
        let argv: Vec<String> = ["/bin/sh", "-c", "/bin/true; exit 0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = check(strace, &argv, "/bin/true").unwrap();
        assert!(c.ok, "{c:?}");
    }
}
