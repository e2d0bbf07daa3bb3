//! The host ↔ guest protocol on the virtio-serial port: binary-safe
//! frames, each a 9-byte header (payload length, u32 little-endian; kind,
//! u8; id, u32 little-endian — the host's exec id, 0 for the VM itself)
//! and the payload. Control payloads are JSON; output and stdin payloads
//! are raw bytes, at most [`MAX_PAYLOAD`] per frame.
//!
//! A session: the guest sends `HELLO` when its agent is up; the host sends
//! `CREATE` (the sandbox configuration), the guest answers `READY` (or
//! `ERROR`). Per command: `SPAWN` (JSON), `STDIN` chunks, `STDIN_END`; the
//! guest answers `SPAWNED` (or `ERROR`), streams `STDOUT`/`STDERR` as the
//! command writes, and ends with `DONE` (its `Outcome`, output taken out).
//! A `SPAWN` with `stream_stdin` starts the command at once, with its stdin
//! open: `STDIN` chunks are written to it as they come, `STDIN_END` closes
//! it (how a daemon feeds a running process, E2B's `SendInput`).
//! `KILL` ends a command early. `STATS`, `PAUSE` and `RESUME` get one
//! `REPLY` (or `ERROR`). `SHUTDOWN` — or the host closing the port —
//! powers the guest off.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Header bytes.
pub const HEADER: usize = 9;

// Host → guest.
/// The sandbox configuration ([`Create`]).
pub const CREATE: u8 = 1;
/// Start a command ([`Spawn`]); its stdin follows.
pub const SPAWN: u8 = 2;
/// A chunk of the command's stdin.
pub const STDIN: u8 = 3;
/// The command's stdin is complete: start it (with `stream_stdin`: close
/// the running command's stdin).
pub const STDIN_END: u8 = 4;
/// Signal the command: the payload is the signal number (u32
/// little-endian); empty means SIGKILL.
pub const KILL: u8 = 5;
/// The sandbox's usage ([`Stats`]).
pub const STATS: u8 = 6;
/// Freeze the sandbox.
pub const PAUSE: u8 = 7;
/// Thaw it.
pub const RESUME: u8 = 8;
/// Power the guest off.
pub const SHUTDOWN: u8 = 9;

// Guest → host.
/// The agent is up ([`Hello`]).
pub const HELLO: u8 = 64;
/// The sandbox is ready ([`Ready`]).
pub const READY: u8 = 65;
/// The command started.
pub const SPAWNED: u8 = 66;
/// Command output.
pub const STDOUT: u8 = 67;
/// Command error output.
pub const STDERR: u8 = 68;
/// The command ended (its `Outcome`, without output).
pub const DONE: u8 = 69;
/// The answer to `STATS`, `PAUSE`, `RESUME`.
pub const REPLY: u8 = 70;
/// A request failed ([`WireError`]).
pub const ERROR: u8 = 71;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its kind (the constants above).
    pub kind: u8,
    /// The exec it is about (0: the VM).
    pub id: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Writes one frame (`payload` at most [`MAX_PAYLOAD`] bytes) in one
/// `write_all`, so frames written under a lock never interleave.
pub fn write_frame(w: &mut impl Write, kind: u8, id: u32, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame payload over 1 MiB",
        ));
    }
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut h = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame payload of {len} bytes (at most 1 MiB)"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame {
        kind: h[4],
        id: u32::from_le_bytes([h[5], h[6], h[7], h[8]]),
        payload,
    }))
}

/// The signal a `KILL` payload asks for (SIGKILL when empty or invalid).
pub fn kill_signal(payload: &[u8]) -> i32 {
    match payload {
        [a, b, c, d] => match i32::try_from(u32::from_le_bytes([*a, *b, *c, *d])) {
            Ok(s) if (1..=64).contains(&s) => s,
            _ => libc::SIGKILL,
        },
        _ => libc::SIGKILL,
    }
}

/// `HELLO`: the guest agent is up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The guest kernel's release.
    pub kernel: String,
    /// Milliseconds from the kernel's start to the agent's `HELLO`.
    pub uptime_ms: u64,
}

/// A directory the host shares with virtiofs, mounted in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Share {
    /// The virtiofs tag.
    pub tag: String,
    /// Where the guest mounts it.
    pub path: PathBuf,
    /// Mounted read-only.
    pub readonly: bool,
}

/// `CREATE`: the sandbox to create in the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Create {
    /// The sandbox (mount sources already rewritten to guest paths).
    pub spec: nanoclaw_sandbox::SandboxSpec,
    /// The shares to mount first.
    pub shares: Vec<Share>,
}

/// `READY`: the sandbox the guest created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// Its id in the guest.
    pub guest_id: String,
    /// What protects it inside the guest.
    pub layers: nanoclaw_sandbox::Layers,
}

/// `SPAWN`: one command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spawn {
    /// argv.
    pub command: Vec<String>,
    /// Added to the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<PathBuf>,
    /// (uid, gid).
    pub user: Option<(u32, u32)>,
    /// Whether stdin frames follow (else /dev/null).
    pub stdin: bool,
    /// Start at once and write each later `STDIN` frame to the running
    /// command (with `stdin`), until `STDIN_END` closes it.
    #[serde(default)]
    pub stream_stdin: bool,
    /// Wall-clock limit, in milliseconds.
    pub timeout_ms: u64,
    /// Per-stream output limit, in bytes.
    pub output_limit: u64,
}

/// `REPLY` to `STATS`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// `running` or `paused`.
    pub state: String,
    /// Memory charged to the sandbox, in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time used, in milliseconds.
    pub cpu_ms: Option<u64>,
    /// Tasks in it.
    pub tasks: Option<u64>,
    /// Whether pause works.
    pub can_pause: bool,
    /// Commands running now.
    pub execs: u64,
}

/// `ERROR`: what failed, typed as the engine's error again on the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    /// The sandbox is paused.
    Paused,
    /// Something was not found.
    NotFound {
        /// What.
        what: String,
    },
    /// The request was invalid.
    Invalid {
        /// Why.
        message: String,
    },
    /// The guest cannot provide a feature.
    Unsupported {
        /// The feature.
        what: String,
        /// Why.
        why: String,
        /// How to get it.
        fix: String,
    },
    /// Anything else.
    Other {
        /// The message.
        message: String,
    },
}

impl WireError {
    /// The engine's error `e` (about the guest's sandbox) on the wire.
    pub fn from_engine(e: &nanoclaw_sandbox::Error) -> WireError {
        use nanoclaw_sandbox::Error as E;
        match e {
            E::Paused { .. } => WireError::Paused,
            E::NotFound { what, .. } => WireError::NotFound { what: what.clone() },
            E::InvalidSpec(m) => WireError::Invalid { message: m.clone() },
            E::Unsupported { what, why, fix } => WireError::Unsupported {
                what: what.clone(),
                why: why.clone(),
                fix: fix.clone(),
            },
            other => WireError::Other {
                message: other.to_string(),
            },
        }
    }

    /// As the engine's error about sandbox `id` of backend `backend`.
    pub fn into_engine(self, backend: &str, id: &str) -> nanoclaw_sandbox::Error {
        use nanoclaw_sandbox::Error as E;
        match self {
            WireError::Paused => E::Paused { id: id.to_string() },
            WireError::NotFound { what } => E::NotFound {
                id: id.to_string(),
                what,
            },
            WireError::Invalid { message } => E::InvalidSpec(message),
            WireError::Unsupported { what, why, fix } => E::Unsupported { what, why, fix },
            WireError::Other { message } => E::Backend {
                backend: backend.to_string(),
                message: format!("sandbox {id} (in the guest): {message}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_any_bytes() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, 7, &all).expect("write");
        write_frame(&mut buf, DONE, 7, b"").expect("write");
        let mut r = &buf[..];
        let f = read_frame(&mut r).expect("read").expect("a frame");
        assert_eq!((f.kind, f.id, f.payload), (STDOUT, 7, all));
        let f = read_frame(&mut r).expect("read").expect("a frame");
        assert_eq!((f.kind, f.id, f.payload.len()), (DONE, 7, 0));
        assert!(read_frame(&mut r).expect("clean end").is_none());
        assert!(write_frame(&mut buf, STDOUT, 1, &vec![0; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn a_truncated_or_oversized_frame_is_an_error() {
        let mut r = &[1u8, 0, 0][..];
        assert!(read_frame(&mut r).is_err());
        let mut big = ((MAX_PAYLOAD + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(&[STDOUT, 0, 0, 0, 0]);
        assert!(read_frame(&mut &big[..]).is_err());
    }
}
