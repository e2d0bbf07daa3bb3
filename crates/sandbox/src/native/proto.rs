//! The messages between the runner (or keeper) and the init of a
//! long-lived sandbox, on their sync socket. Fixed-size headers and
//! little-endian integers, so init can read them without allocating.
//!
//! Runner → init:
//! - `EXEC` (id = the runner's exec id): `uid gid argc envc` (u32 each),
//!   then argc + envc + 1 NUL-terminated strings (argv, environment,
//!   working directory); with descriptors: the setup-report pipe, stdout,
//!   stderr and optionally stdin.
//! - `KILL` (id = an exec id): the signal (u32) for that command's process
//!   group.
//! - `KILL_ALL` (id 0): the signal (u32) for every process of the sandbox
//!   but init (`kill(-1)` from the sandbox's pid 1).
//!
//! Init → runner: `STARTED` (the command's pid in the sandbox), `EXITED`
//! (its wait status), `REFUSED` (an errno: too many commands, a bad
//! request, fork failed).

/// Header size: kind, id, body length, reserved (u32 each).
pub const HEADER: usize = 16;
/// Start a command.
pub(crate) const EXEC: u32 = 1;
/// Signal a command's process group.
pub const KILL: u32 = 2;
/// Signal every process of the sandbox but init.
pub(crate) const KILL_ALL: u32 = 3;
/// A command was started.
pub const STARTED: u32 = 101;
/// A command ended.
pub const EXITED: u32 = 102;
/// A command could not be started.
pub const REFUSED: u32 = 103;
/// Why a command was killed (a keeper's frame, before `EXITED`): the
/// value is a [`reason_code`].
pub const KILLED_BY: u32 = 104;
/// Egress refusals (a keeper's frame, before `EXITED`): the value is how
/// many connections the sandbox's egress policy refused since the keeper's
/// previous such frame — sandbox-wide, not only this command's. Sent only
/// when there were some; the details are in `Inspect`'s `network`.
pub const EGRESS_DENIED: u32 = 105;
/// Size of a reply frame: a header and one i32 value.
pub const FRAME: usize = HEADER + 4;
/// Largest request body.
pub(crate) const MAX_REQUEST: usize = 64 * 1024;
/// Most argv entries, and most environment entries, of one command.
pub(crate) const MAX_ARGS: usize = 1024;
/// Most commands init tracks at once.
pub(crate) const MAX_EXECS: usize = 64;

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message kind.
    pub kind: u32,
    /// The exec it is about.
    pub id: u32,
    /// Body length.
    pub len: u32,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; HEADER]) -> Header {
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            kind: u(0),
            id: u(4),
            len: u(8),
        }
    }
}

/// A header with no body but one i32 `value` (a reply, or a `KILL`).
pub(crate) fn frame(kind: u32, id: u32, value: i32) -> [u8; FRAME] {
    let mut b = [0u8; FRAME];
    b[..HEADER].copy_from_slice(&Header { kind, id, len: 4 }.encode());
    b[HEADER..].copy_from_slice(&value.to_le_bytes());
    b
}

/// The header and value of a frame.
pub fn decode_frame(b: &[u8; FRAME]) -> (Header, i32) {
    let mut h = [0u8; HEADER];
    h.copy_from_slice(&b[..HEADER]);
    let v = i32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    (Header::decode(&h), v)
}

/// The code of a kill reason in a `KILLED_BY` frame.
pub(crate) fn reason_code(r: crate::KillReason) -> i32 {
    use crate::KillReason as K;
    match r {
        K::Timeout => 1,
        K::OutputLimit => 2,
        K::Oom => 3,
        K::Pids => 4,
        K::Killed => 5,
    }
}

/// The kill reason of a `KILLED_BY` code.
pub fn kill_reason(code: i32) -> Option<crate::KillReason> {
    use crate::KillReason as K;
    [K::Timeout, K::OutputLimit, K::Oom, K::Pids, K::Killed]
        .into_iter()
        .find(|r| reason_code(*r) == code)
}

/// Encodes an `EXEC` body; `None` when it would not fit the limits.
pub(crate) fn exec_body(
    uid: u32,
    gid: u32,
    argv: &[std::ffi::CString],
    env: &[std::ffi::CString],
    workdir: &std::ffi::CStr,
) -> Option<Vec<u8>> {
    if argv.is_empty() || argv.len() > MAX_ARGS || env.len() > MAX_ARGS {
        return None;
    }
    let mut b = Vec::new();
    for w in [uid, gid, argv.len() as u32, env.len() as u32] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    for s in argv.iter().chain(env) {
        b.extend_from_slice(s.as_bytes_with_nul());
    }
    b.extend_from_slice(workdir.to_bytes_with_nul());
    (b.len() <= MAX_REQUEST).then_some(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: EXEC,
            id: 7,
            len: 1234,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn exec_body_respects_the_limits() {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let b = exec_body(1000, 1000, &[c("true")], &[c("PATH=/bin")], c"/tmp").unwrap();
        assert_eq!(&b[8..12], &1u32.to_le_bytes());
        assert!(b.ends_with(b"true\0PATH=/bin\0/tmp\0"));
        assert!(exec_body(0, 0, &[], &[], c"/").is_none());
        let big = vec![c(&"x".repeat(70_000))];
        assert!(exec_body(0, 0, &big, &[], c"/").is_none());
    }
}
