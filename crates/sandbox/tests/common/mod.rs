//! Shared by the custom-harness tests of the engine: run the scenarios as
//! the invoking user, then again as the rootless user `nanotest` (a copy of
//! the test binary re-executed with `--worker`).
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, ExitCode};

pub const ROOTLESS_USER: &str = "nanotest";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn rootless_ids() -> Option<(String, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == ROOTLESS_USER).then(|| (f[2].to_string(), f[3].to_string()))
    })
}

/// The harness: `--worker` runs `scenarios("rootless")`; otherwise they run
/// as the invoking user, then (when root) again rootless.
pub fn main_with(name: &str, scenarios: fn(&str) -> ExitCode) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--worker") {
        return scenarios("rootless");
    }
    if args.iter().any(|a| a == "--list") {
        println!("{name}: test");
        return ExitCode::SUCCESS;
    }
    let rc = scenarios(if is_root() { "root" } else { "invoking-user" });
    if rc != ExitCode::SUCCESS {
        return rc;
    }
    rerun_rootless(name)
}

/// Re-runs this binary as the rootless user, from a world-readable copy.
fn rerun_rootless(name: &str) -> ExitCode {
    let required = std::env::var("NANOCLAW_REQUIRE_ROOTLESS").is_ok_and(|x| x == "1");
    if !is_root() {
        println!("NOTE {name}: not root, so the run above was the rootless run");
        return ExitCode::SUCCESS;
    }
    let Some((uid, gid)) = rootless_ids() else {
        if required {
            eprintln!(
                "{name}: NANOCLAW_REQUIRE_ROOTLESS=1 but user `{ROOTLESS_USER}` does not exist"
            );
            return ExitCode::FAILURE;
        }
        println!("SKIPPED {name} (rootless): user `{ROOTLESS_USER}` does not exist (CI: .ci/setup-test-user.sh)");
        return ExitCode::SUCCESS;
    };
    let dir = std::env::temp_dir().join(format!("nanoclaw-{name}-{}", std::process::id()));
    let bin = dir.join(name);
    let staged = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::env::current_exe())
        .and_then(|exe| std::fs::copy(exe, &bin))
        .and_then(|_| std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)));
    if let Err(e) = staged {
        eprintln!(
            "{name}: staging a copy for {ROOTLESS_USER} in {}: {e}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    let status = Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "--"])
        .arg(&bin)
        .arg("--worker")
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .current_dir("/")
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("{name} (rootless) failed: {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{name}: running setpriv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Pids whose parent is this process.
pub fn children_left() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            out.push(pid);
        }
    }
    out
}
