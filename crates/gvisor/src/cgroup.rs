//! Reading the host cgroup runsc made for a sandbox (`/nanoclaw/<id>`,
//! rootful only): its CPU time and peak memory for each outcome, and which
//! limit fired when the sandbox died. gVisor's sentry is one host process
//! group, so a memory or pids limit that fires ends the whole sandbox; the
//! kernel's counters say which one it was.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanoclaw_sandbox::native::cgroup::{Cgroup, CreateOptions};
use nanoclaw_sandbox::spec::Limits;
use nanoclaw_sandbox::Error;

const ROOT: &str = "/sys/fs/cgroup";

/// Makes sandbox `id`'s cgroups with the engine's own cgroup code (the
/// same places, `<hierarchy>/nanoclaw/<id>`, v1 or v2, and the same limit
/// files as a native sandbox), before runsc starts the sandbox in them:
/// runsc joins directories that exist and removes only those it made, the
/// moment the sandbox ends; these stay until [`remove`], so the kernel's
/// OOM and pids counters can still be read after a limit ended the
/// sandbox. Returns the notes about defaulted limits this host cannot
/// enforce.
pub fn precreate(id: &str, limits: &Limits) -> Result<Vec<String>, Error> {
    let opts = CreateOptions {
        cpu_accounting: true,
        freezer: false,
    };
    let (cg, notes) = Cgroup::create_with(id, limits, opts)?;
    // The directories outlive this handle (and this process): `remove`
    // takes them away when the sandbox is stopped or swept.
    std::mem::forget(cg);
    Ok(notes)
}

/// Removes sandbox `id`'s cgroup directories in every hierarchy, once its
/// tasks are gone (waiting up to two seconds for the kernel).
pub fn remove(id: &str) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("nanoclaw").join(id))
        .collect();
    dirs.push(Path::new(ROOT).join("nanoclaw").join(id));
    let deadline = Instant::now() + Duration::from_secs(2);
    for d in dirs {
        while d.is_dir() && std::fs::remove_dir(&d).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The first of `candidates` (controller directories, relative to the
/// cgroup root) that holds `/nanoclaw/<id>/<file>`.
fn find(id: &str, candidates: &[&str], file: &str) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|c| Path::new(ROOT).join(c).join("nanoclaw").join(id).join(file))
        .find(|p| p.exists())
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// `KEY VALUE` lines' value for `key`.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// CPU time the sandbox has used, in nanoseconds.
pub fn cpu_ns(id: &str, rootless: bool) -> Option<u64> {
    if rootless {
        return None;
    }
    if let Some(p) = find(
        id,
        &["cpuacct", "cpu,cpuacct", "cpuacct,cpu"],
        "cpuacct.usage",
    ) {
        return read(&p)?.trim().parse().ok();
    }
    let p = find(id, &[""], "cpu.stat")?;
    field(&read(&p)?, "usage_usec").map(|u| u * 1000)
}

/// The sandbox's peak memory (gVisor's sentry and everything in it), in
/// bytes.
pub fn peak_memory(id: &str, rootless: bool) -> Option<u64> {
    if rootless {
        return None;
    }
    let p = find(id, &["memory"], "memory.max_usage_in_bytes")
        .or_else(|| find(id, &[""], "memory.peak"))?;
    read(&p)?.trim().parse().ok()
}

/// Times the memory limit's OOM killer fired.
pub fn oom_kills(id: &str) -> u64 {
    let v1 = find(id, &["memory"], "memory.oom_control");
    let v2 = find(id, &[""], "memory.events");
    v1.or(v2)
        .and_then(|p| read(&p))
        .and_then(|t| field(&t, "oom_kill"))
        .unwrap_or(0)
}

/// Times a fork was refused by the pids limit.
pub fn pids_refused(id: &str) -> u64 {
    find(id, &["pids", ""], "pids.events")
        .and_then(|p| read(&p))
        .and_then(|t| field(&t, "max"))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_by_key() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(field(t, "oom_kill"), Some(2));
        assert_eq!(field(t, "oom"), None);
        assert_eq!(field("max 7\n", "max"), Some(7));
    }
}
