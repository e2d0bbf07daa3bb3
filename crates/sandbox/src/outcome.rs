//! The one output type: what happened to a sandboxed command.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the engine killed a sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KillReason {
    /// The wall-clock timeout expired.
    Timeout,
    /// The memory cgroup's OOM killer fired (read from the kernel's oom_kill counter).
    Oom,
    /// The pids limit was hit (read from the kernel's pids.events).
    Pids,
    /// A stream exceeded the output limit.
    OutputLimit,
    /// The caller asked for the sandbox to be killed.
    Killed,
}

/// What the engine applied to a run, layer by layer (reported by `--json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layers {
    /// "rootful" or "rootless".
    pub mode: String,
    /// Namespaces unshared.
    pub namespaces: Vec<String>,
    /// The uid map written for the sandbox ("inside host count" lines).
    pub uid_map: String,
    /// Cgroup version per controller, e.g. `memory: v1`; empty when none.
    pub cgroup: Vec<String>,
    /// Limits that could not be enforced by a cgroup (and what replaced them).
    pub degraded: Vec<String>,
    /// Seccomp: "default", "profile:PATH", or "unconfined".
    pub seccomp: String,
    /// Landlock ABI in use, or why none.
    pub landlock: String,
    /// Capabilities left to the command (empty: none).
    pub capabilities: Vec<String>,
    /// `no_new_privs` set.
    pub no_new_privs: bool,
}

/// A destination the egress proxy refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetDenial {
    /// Host name or address asked for.
    pub destination: String,
    /// Port asked for.
    pub port: u16,
    /// Why it was refused (a stable kind, e.g. `not_allowed`, `special_address`).
    pub reason: String,
    /// The human explanation.
    pub detail: String,
    /// `http`, `connect` or `socks5`.
    pub protocol: String,
}

/// What the network layer did during a run (allowlist and open modes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkReport {
    /// `none`, `allowlist` or `open`.
    pub mode: String,
    /// Where the proxy listened inside the sandbox.
    pub proxy: Option<String>,
    /// Connections allowed.
    pub allowed: u64,
    /// Connections refused.
    pub denied: u64,
    /// Bytes from the sandbox to the outside.
    pub bytes_up: u64,
    /// Bytes from the outside to the sandbox.
    pub bytes_down: u64,
    /// Every refusal (destination, port, reason), oldest first.
    pub denials: Vec<NetDenial>,
}

/// The result of one sandboxed run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    /// Exit code, when the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when the command was killed by a signal.
    pub signal: Option<i32>,
    /// Why the engine killed the sandbox, if it did.
    pub killed_by: Option<KillReason>,
    /// Captured stdout (empty when streamed).
    #[serde(with = "lossy_bytes")]
    pub stdout: Vec<u8>,
    /// Captured stderr (empty when streamed).
    #[serde(with = "lossy_bytes")]
    pub stderr: Vec<u8>,
    /// stdout went past the output limit and the rest was dropped.
    pub stdout_truncated: bool,
    /// stderr went past the output limit and the rest was dropped.
    pub stderr_truncated: bool,
    /// Wall-clock time from spawn to exit.
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: Duration,
    /// CPU time used by everything in the sandbox (from the cgroup, else rusage).
    #[serde(rename = "cpu_ms", with = "millis")]
    pub cpu_time: Duration,
    /// Peak memory of the sandbox in bytes (from the cgroup), if known.
    pub peak_memory_bytes: Option<u64>,
    /// Unique id of this sandbox.
    pub sandbox_id: String,
    /// What the engine applied.
    pub layers: Layers,
    /// Network activity and refusals.
    pub network: NetworkReport,
}

impl Outcome {
    /// The exit code a CLI should return, `docker run` style: the command's
    /// own code, 128+N for signal N, 124 on timeout.
    pub fn cli_exit_code(&self) -> i32 {
        if self.killed_by == Some(KillReason::Timeout) {
            return 124;
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 125,
        }
    }
}

mod lossy_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(d)?.into_bytes())
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
