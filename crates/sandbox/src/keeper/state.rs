//! Where keepers keep their sandboxes' state, and how clients find them.
//!
//! `/run/nanoclaw/sandboxes/<id>/` as root, else
//! `$XDG_RUNTIME_DIR/nanoclaw/sandboxes/<id>/` (or `/tmp/nanoclaw-<uid>/…`,
//! then `~/.local/state/nanoclaw/…`), each 0700 and owned by the caller:
//! `state.json`, `sock`, and `paused` while paused. A keeper removes its
//! directory when it ends; [`all_sandboxes`] sweeps those of keepers that
//! were killed.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::KeeperError;
use crate::native::session;

/// The marker a keeper keeps in its state directory while paused.
pub(super) const PAUSED_MARK: &str = "paused";

/// What a keeper records about its sandbox (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The sandbox's id.
    pub id: String,
    /// Its name, if given.
    pub name: Option<String>,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Seconds since the epoch.
    pub created: u64,
    /// Seconds since the epoch: the end of its lifetime.
    pub expires: u64,
    /// Seconds since the epoch: the last exec or copy (or the creation).
    #[serde(default)]
    pub last_used: u64,
    /// Removed after this long unused.
    pub idle_timeout_s: Option<u64>,
    /// Each exec's default timeout.
    pub exec_timeout_ms: u64,
    /// The keeper's pid.
    pub keeper_pid: u32,
    /// The keeper's start time (clock ticks after boot, /proc/PID/stat
    /// field 22): a pid reused by another process is not the keeper.
    #[serde(default)]
    pub keeper_start: u64,
    /// The sandbox's init, as the host sees it.
    pub init_pid: i32,
    /// The uid that created it.
    pub owner_uid: u32,
    /// What protects it.
    pub layers: crate::Layers,
    /// The cgroup that freezes the sandbox (pause), to thaw it should the
    /// keeper be killed while it is paused.
    #[serde(default)]
    pub freezer_cgroup: Option<PathBuf>,
}

/// Seconds since the epoch.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> KeeperError {
    move |source| KeeperError::Io { what, source }
}

/// The directory holding every sandbox's state, created 0700 if missing;
/// refused if someone else owns it.
pub fn state_root() -> Result<PathBuf, KeeperError> {
    let uid = euid();
    let candidates: Vec<PathBuf> = if uid == 0 {
        vec![PathBuf::from("/run/nanoclaw/sandboxes")]
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        vec![PathBuf::from(x).join("nanoclaw/sandboxes")]
    } else {
        // /tmp is shared: another user may have taken our name there first
        // (a denial of service, never used); then the home directory.
        let mut v = vec![PathBuf::from(format!("/tmp/nanoclaw-{uid}/sandboxes"))];
        if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            v.push(PathBuf::from(h).join(".local/state/nanoclaw/sandboxes"));
        }
        v
    };
    let mut last = None;
    for root in candidates {
        match own_dir(&root, uid) {
            Ok(()) => return Ok(root),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| KeeperError::Invalid("no place for the sandboxes' state".into())))
}

/// Creates `root` (0700) if missing and checks it and its parent belong to
/// `uid` and are writable by it alone.
pub fn own_dir(root: &Path, uid: u32) -> Result<(), KeeperError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(root).map_err(io_err(format!(
        "creating the state directory {}",
        root.display()
    )))?;
    for dir in [root, root.parent().unwrap_or(root)] {
        let md = std::fs::symlink_metadata(dir).map_err(io_err(dir.display().to_string()))?;
        if md.uid() != uid || !md.is_dir() || md.mode() & 0o022 != 0 {
            return Err(KeeperError::Invalid(format!(
                "{} is not a directory owned by uid {uid} and writable only by it; remove it and retry",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// A sandbox's recorded state.
pub fn read_state(dir: &Path) -> Option<State> {
    let b = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Replaces `dir/state.json` atomically.
pub(super) fn write_state(dir: &Path, state: &State) -> std::io::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join("state.json"))
}

/// Whether `pid` runs (an exited keeper stays a zombie until whoever
/// adopted it reaps it, which counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

pub(super) use crate::procs::start_time;

/// Whether the sandbox's keeper still runs: its pid lives and is the same
/// process (same start time), not one that reused the pid.
pub fn keeper_alive(st: &State) -> bool {
    alive(st.keeper_pid)
        && (st.keeper_start == 0 || start_time(st.keeper_pid) == Some(st.keeper_start))
}

/// SIGKILLs the keeper through a pidfd, after checking the pidfd names the
/// keeper (not a process that reused its pid).
pub fn kill_keeper(st: &State) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, st.keeper_pid as libc::pid_t, 0) };
    if fd < 0 {
        return;
    }
    if keeper_alive(st) {
        // SAFETY: signalling through the pidfd we hold; no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd as libc::c_int,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd as libc::c_int) };
}

/// Every sandbox whose keeper lives, oldest first; the state of dead
/// keepers is removed (and what they left: a frozen cgroup, cgroups).
pub fn all_sandboxes(root: &Path) -> Vec<(PathBuf, State)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let dir = e.path();
        match read_state(&dir) {
            Some(st) if keeper_alive(&st) => out.push((dir, st)),
            Some(st) => forget(&dir, &st),
            // One still starting has no state yet (leave it a minute).
            None => {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| d > Duration::from_secs(60));
                if old {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }
    out.sort_by_key(|(_, s)| s.created);
    out
}

/// Cleans up after a keeper that was killed: thaws its sandbox (a frozen
/// init cannot notice its lifeline is gone), removes its state directory
/// and the cgroups it had no chance to remove.
pub fn forget(dir: &Path, st: &State) {
    if let Some(f) = &st.freezer_cgroup {
        let _ = session::thaw_orphan(f);
    }
    let _ = std::fs::remove_dir_all(dir);
    crate::native::cgroup::remove_sandbox_cgroups(&st.id, Duration::from_secs(2));
}

/// The sandbox named `target`: a name, an id, or a unique id prefix.
pub fn find(root: &Path, target: &str) -> Result<(PathBuf, State), KeeperError> {
    // A whole id names its directory: no need to read every sandbox's state.
    let valid_id = target.len() == 12 && target.bytes().all(|b| b.is_ascii_hexdigit());
    if valid_id {
        let dir = root.join(target);
        if let Some(st) = read_state(&dir).filter(|s| s.id == target && keeper_alive(s)) {
            return Ok((dir, st));
        }
    }
    let all = all_sandboxes(root);
    if let Some(hit) = all
        .iter()
        .find(|(_, s)| s.id == target || s.name.as_deref() == Some(target))
    {
        return Ok(hit.clone());
    }
    let prefixed: Vec<_> = all
        .iter()
        .filter(|(_, s)| !target.is_empty() && s.id.starts_with(target))
        .collect();
    match prefixed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(KeeperError::NotFound(target.to_string())),
        _ => Err(KeeperError::Ambiguous(target.to_string())),
    }
}

/// `running` or `paused`, from the keeper's marker (no request).
pub fn state_of(dir: &Path) -> &'static str {
    if dir.join(PAUSED_MARK).exists() {
        "paused"
    } else {
        "running"
    }
}
