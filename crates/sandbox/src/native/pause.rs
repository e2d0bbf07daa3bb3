//! Pausing and resuming a long-lived sandbox, and what it uses right now.
//!
//! [`pause`] stops every process of the sandbox with the cgroup freezer
//! (v2 `cgroup.freeze`, v1 `freezer.state`; see [`super::cgroup`]): they
//! keep their memory and open files but get no CPU time, and cannot tell
//! (no signal is sent). Wall-clock time goes on: the sandbox's lifetime
//! and a background command's own timers count the paused time. While it
//! is paused, [`super::session::exec`] is refused ([`Error::Paused`]);
//! [`resume`] lets everything run on. Removing a paused sandbox works as
//! usual (it is killed first, then thawed, so nothing runs again).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::{cgroup, Sandbox};
use crate::Error;

/// How long every process gets to stop before `pause` gives up.
const FREEZE_PATIENCE: Duration = Duration::from_secs(5);

/// Whether a sandbox's processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Running (or idle, waiting for commands).
    Running,
    /// Frozen by [`pause`].
    Paused,
}

/// A long-lived sandbox's state and usage now, from its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LiveStatus {
    /// Running or paused.
    pub state: RunState,
    /// Memory charged to the sandbox now, in bytes (None: no memory cgroup).
    pub memory_bytes: Option<u64>,
    /// CPU time its processes used so far (None: no cpu accounting here).
    pub cpu: Option<Duration>,
    /// Tasks (threads) in it now, its init included (None: no cgroup).
    pub tasks: Option<u64>,
    /// Whether [`pause`] can work (the sandbox's cgroup has a freezer).
    pub can_pause: bool,
}

fn long_lived(sb: &Sandbox, what: &str) -> Result<(), Error> {
    if sb.exec_base.is_none() {
        return Err(Error::InvalidSpec(format!(
            "this sandbox was started for one command; {what} needs one made with create"
        )));
    }
    if sb.released || sb.lifeline.is_none() {
        return Err(Error::InvalidSpec(format!("sandbox {} has ended", sb.id)));
    }
    Ok(())
}

/// Stops every process in `sb` until [`resume`]; returns once the kernel
/// reports them all stopped. Pausing a paused sandbox does nothing.
///
/// Fails with [`Error::Unsupported`] (saying what to delegate) where the
/// host gives this user no freezer, and with a cgroup error when some
/// process does not stop within 5 s (the sandbox is then left running).
pub fn pause(sb: &mut Sandbox) -> Result<(), Error> {
    long_lived(sb, "pause")?;
    if sb.paused {
        return Ok(());
    }
    let Some(cg) = sb.cgroup.as_ref().filter(|c| c.can_freeze()) else {
        let (why, fix) = cgroup::freezer_problem().unwrap_or_else(|| {
            (
                "its cgroup has no freezer".into(),
                "create it again (the host's freezer was not usable when it was made)".into(),
            )
        });
        return Err(Error::Unsupported {
            what: format!("cannot pause sandbox {}", sb.id),
            why,
            fix: format!("to make pause available: {fix}"),
        });
    };
    // Set first: should anything below fail half-way, removing the
    // sandbox still thaws it.
    sb.paused = true;
    let r = cg.freeze(FREEZE_PATIENCE);
    if r.is_err() {
        // `freeze` thawed it again.
        sb.paused = cg.is_frozen() == Some(true);
    }
    Ok(r?)
}

/// Lets every process in `sb` run again. Resuming a running sandbox does
/// nothing.
pub fn resume(sb: &mut Sandbox) -> Result<(), Error> {
    long_lived(sb, "resume")?;
    if !sb.paused {
        return Ok(());
    }
    if let Some(cg) = &sb.cgroup {
        cg.thaw()?;
    }
    sb.paused = false;
    Ok(())
}

/// Whether `sb` is paused.
pub fn is_paused(sb: &Sandbox) -> bool {
    sb.paused
}

/// `sb`'s state and usage now (reads a few cgroup files).
pub fn status(sb: &Sandbox) -> LiveStatus {
    let usage = sb.cgroup.as_ref().map(|c| c.usage()).unwrap_or_default();
    LiveStatus {
        state: if sb.paused {
            RunState::Paused
        } else {
            RunState::Running
        },
        memory_bytes: usage.memory_bytes,
        cpu: usage.cpu,
        tasks: usage.tasks,
        can_pause: sb.cgroup.as_ref().is_some_and(|c| c.can_freeze()),
    }
}

/// The cgroup directory that freezes `sb`, for [`thaw_orphan`]: a holder
/// that records it lets a later process thaw the sandbox should the
/// holder be killed while it is paused.
pub fn freezer_dir(sb: &Sandbox) -> Option<PathBuf> {
    sb.cgroup
        .as_ref()
        .and_then(|c| c.freezer_path())
        .map(Path::to_path_buf)
}

/// Thaws the sandbox whose [`freezer_dir`] is `dir` after its holder died
/// (SIGKILL) while it was paused: frozen, its init would never notice that
/// its holder is gone, and the sandbox would stay forever. Thawed, it
/// ends itself. `dir` must be a cgroup directory; a missing one is fine.
pub fn thaw_orphan(dir: &Path) -> Result<(), Error> {
    Ok(cgroup::thaw_dir(dir)?)
}
