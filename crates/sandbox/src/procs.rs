//! Processes named by pid *and* start time, and fresh sandbox ids: what
//! every backend needs to tell a live maker of a sandbox from one that
//! died (or from a later process that reused its pid), and to name a new
//! sandbox. One copy here instead of one per backend.

use crate::Error;

/// The start time of process `pid` (clock ticks after boot, field 22 of
/// `/proc/PID/stat`), which a later process reusing the pid does not
/// share. `None` when no process `pid` runs: gone, or ended and waiting
/// to be reaped (a zombie, `Z`, or dead, `X`) — a `kill -9`ed maker whose
/// parent has not reaped it yet is gone all the same.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis (the name may hold
    // spaces and parentheses): field 3, the state, then 22 is 19 later.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X") | None) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Process `pid` as `PID:START`, the maker tag backends put on what they
/// create; `START` is 0 when `pid` does not run.
pub fn owner_tag(pid: u32) -> String {
    format!("{pid}:{}", start_time(pid).unwrap_or(0))
}

/// Whether the maker tag `PID:START` still names a running process. A tag
/// that does not parse is taken as alive: it is not ours to judge, and
/// the caller must not remove what it cannot tell is abandoned.
pub fn owner_alive(tag: &str) -> bool {
    let Some((pid, start)) = tag.split_once(':') else {
        return true;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => start_time(pid) == Some(start),
        _ => true,
    }
}

/// A fresh id: 12 lowercase hex digits (48 bits) from the kernel's random
/// source. Fails rather than falling back to something guessable: ids name
/// containers, pods and state directories other sandboxes must not hit.
pub fn random_id() -> Result<String, Error> {
    let mut b = [0u8; 6];
    // SAFETY: `b` is a valid, writable buffer of `b.len()` bytes, and
    // getrandom writes at most that many.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(Error::Sys {
            call: "getrandom (a sandbox id)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let tag = owner_tag(me);
        assert!(start_time(me).is_some());
        assert!(owner_alive(&tag), "{tag}");
        let start = start_time(me).unwrap();
        assert!(!owner_alive(&format!("{me}:{}", start + 1)));
        assert!(owner_alive("not-a-tag"), "an unknown format is left alone");
    }

    #[test]
    fn a_zombie_does_not_run() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait for it to exit without reaping it (WNOWAIT).
        // SAFETY: waitid with a zeroed siginfo we own; WNOWAIT leaves the
        // child to be reaped by `child.wait()` below.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        assert_eq!(rc, 0);
        assert_eq!(start_time(pid), None, "a zombie is not a running maker");
        child.wait().unwrap();
    }

    #[test]
    fn ids_are_twelve_hex_digits_and_differ() {
        let (a, b) = (random_id().unwrap(), random_id().unwrap());
        assert_eq!(a.len(), 12);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
