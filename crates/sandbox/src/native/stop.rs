//! Stopping what runs in a long-lived sandbox without removing it (the
//! `docker stop` half that makes sense for a sandbox that cannot be
//! restarted): every process but init gets a signal — SIGTERM first, then
//! SIGKILL for whatever is still there after a grace period — and the
//! sandbox, its files and its limits stay, ready for the next exec.
//!
//! The signal is sent by init itself (`kill(-1, sig)` from the pid
//! namespace's pid 1 reaches every process of that namespace and nothing
//! outside it), so it works without a cgroup (rootless hosts with no
//! delegation). Whether anything is left is read from init's children on
//! the host (`/proc/PID/task/PID/children`): every process of the
//! sandbox descends from init (orphans are re-parented to it), so none
//! are left when init has no children.

use std::time::{Duration, Instant};

use super::{proto, sys, Sandbox};
use crate::Error;

/// How long processes get after SIGKILL to be reported gone.
const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// The frame that asks init to send `sig` to every other process.
pub(crate) fn signal_all_frame(sig: i32) -> [u8; proto::FRAME] {
    proto::frame(proto::KILL_ALL, 0, sig)
}

/// Sends `sig` (1–64) to every process of `sb` but its init.
pub fn signal_all(sb: &Sandbox, sig: i32) -> Result<(), Error> {
    if !(1..=64).contains(&sig) {
        return Err(Error::InvalidSpec(format!("signal {sig}: expected 1-64")));
    }
    if sb.paused {
        return Err(Error::Paused { id: sb.id.clone() });
    }
    let lifeline = live_lifeline(sb)?;
    sys::write_all(lifeline, &signal_all_frame(sig)).map_err(|e| Error::Sys {
        call: format!("signalling the processes of sandbox {}", sb.id),
        source: e,
    })
}

fn live_lifeline(sb: &Sandbox) -> Result<i32, Error> {
    match (sb.exec_base.is_some(), sb.lifeline) {
        (true, Some(l)) if !sb.released => Ok(l),
        (false, _) => Err(Error::InvalidSpec(
            "this sandbox was started for one command; stopping its processes needs one made with create".into(),
        )),
        _ => Err(Error::InvalidSpec(format!("sandbox {} has ended", sb.id))),
    }
}

/// How many processes of the sandbox whose init is `init_pid` (as the host
/// sees it) are direct children of init; 0 means none is left but init.
pub fn children_of_init(init_pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{init_pid}/task/{init_pid}/children"))
        .map_or(0, |s| s.split_whitespace().count() as u64)
}

/// Every process of `sb` but init: SIGTERM, up to `grace` to end, then
/// SIGKILL. Returns how many were still there for SIGKILL (0 when all
/// ended on SIGTERM). The sandbox stays, idle.
pub fn stop(sb: &mut Sandbox, grace: Duration) -> Result<u64, Error> {
    signal_all(sb, libc::SIGTERM)?;
    if wait_until_empty(sb.pid, Instant::now() + grace) {
        return Ok(0);
    }
    let left = children_of_init(sb.pid);
    signal_all(sb, libc::SIGKILL)?;
    if wait_until_empty(sb.pid, Instant::now() + KILL_PATIENCE) {
        Ok(left)
    } else {
        Err(Error::InvalidSpec(format!(
            "sandbox {}: processes still there {} s after SIGKILL; remove it",
            sb.id,
            KILL_PATIENCE.as_secs()
        )))
    }
}

/// Polls init's children until there are none (true) or `deadline`.
pub fn wait_until_empty(init_pid: i32, deadline: Instant) -> bool {
    loop {
        if children_of_init(init_pid) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
