//! Keepers: one small single-threaded process per long-lived sandbox.
//!
//! A keeper (`nanoclaw __keeper`, nanoclaw's own binary re-executed, see
//! [`keeper_main`]) creates the sandbox — so no sandbox ever begins life
//! as a copy of a big multithreaded process (a daemon, with every
//! tenant's data) — and holds it: its cgroup, network helper, egress proxy,
//! lifetime and idle deadline. It serves clients on a unix socket only
//! the sandbox's owner can open, from its own user namespace. The sandbox
//! dies with its keeper (init's lifeline).
//!
//! The socket speaks one JSON line per request ([`Request`]); the answer
//! is one JSON line ([`Reply`]), except for [`Request::Spawn`]: the keeper
//! starts the command and hands the client its pipes (stdout, stderr,
//! start-failure report, stdin) with one binary frame, then forwards
//! init's `STARTED` / `KILLED_BY` / `EXITED` frames about it on the same
//! connection and takes `KILL` frames from the client. The client does
//! its own I/O, so a keeper runs any number of commands at once (up to
//! init's limit) without ever blocking on one. A client that hangs up
//! before its command ended has the command's process group killed.
//!
//! Clients: [`Remote`] (blocking; the CLI, and the daemon from its
//! blocking pool or with the descriptors on its own event loop).

mod client;
mod server;
mod state;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use client::{start_keeper, stop_sandbox, Remote, RemoteSpawn};
pub use server::keeper_main;
pub use state::{
    all_sandboxes, find, forget, keeper_alive, kill_keeper, now_s, own_dir, read_state, state_of,
    state_root, State,
};

use crate::spec::SandboxSpec;

/// A keeper failed, or a request to one did.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// From the engine.
    #[error(transparent)]
    Engine(#[from] crate::Error),
    /// No sandbox has this id, id prefix or name.
    #[error("no sandbox {0:?}: see `nanoclaw sandbox ls`")]
    NotFound(String),
    /// An id prefix that names several.
    #[error("{0:?} matches several sandboxes; give more of the id")]
    Ambiguous(String),
    /// Bad input, or a state the request cannot be served in.
    #[error("{0}")]
    Invalid(String),
    /// The keeper did not answer in time.
    #[error("sandbox {0}: its keeper did not answer in time (it is busy or stuck)")]
    Busy(String),
    /// A system call or I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The keeper answered something unexpected, or hung up.
    #[error("the sandbox's keeper: {0}")]
    Protocol(String),
}

/// What a client hands a new keeper (on the keeper's stdin, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeeperConfig {
    /// The sandbox (its `command` is ignored; `limits.timeout` is its
    /// lifetime).
    pub spec: SandboxSpec,
    /// A name, unique among the owner's sandboxes.
    pub name: Option<String>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Lifetime.
    pub lifetime_ms: u64,
    /// Removed after this long without an exec.
    pub idle_timeout_ms: Option<u64>,
    /// Each exec's default timeout.
    pub exec_timeout_ms: u64,
    /// The state root ([`state_root`]).
    pub root: PathBuf,
}

/// A client's request to a keeper: one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Freeze the sandbox; the reply is `Live`.
    Pause,
    /// Thaw it; the reply is `Live`.
    Resume,
    /// The sandbox's state and usage now; the reply is `Live`.
    Inspect,
    /// Start a command (see the module's documentation).
    Spawn {
        /// argv.
        command: Vec<String>,
        /// Added to the sandbox's environment.
        env: Vec<(String, String)>,
        /// Working directory.
        workdir: Option<PathBuf>,
        /// (uid, gid).
        user: Option<(u32, u32)>,
        /// Whether the command gets a stdin pipe (else /dev/null).
        stdin: bool,
    },
    /// Move the end of the sandbox's lifetime to this many seconds from
    /// now; the reply is `Lifetime` (keepers before it answered `Live`).
    SetLifetime {
        /// Seconds from now.
        seconds: u64,
    },
    /// End the sandbox; the reply is `Stopping`.
    Stop,
    /// Show (`policy: None`) or replace the sandbox's egress policy; the
    /// reply is `Network`.
    Network {
        /// The new policy, or `None` to only read the current one.
        #[serde(default)]
        policy: Option<nanoclaw_net::NetworkPolicy>,
        /// New credential rules (with a policy), or `None` to keep them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rules: Option<nanoclaw_net::HeaderRules>,
    },
    /// Send `signal` to every process of the sandbox but its init (the
    /// first step of `sandbox stop`); the reply is `Live`, whose
    /// `processes` says how many are left.
    Signal {
        /// 1–64.
        signal: i32,
    },
}

/// A keeper's answer: one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The sandbox now.
    Live(Box<Live>),
    /// The lifetime was moved (`SetLifetime`): its new end, seconds since
    /// the epoch. Not a `Live`: that reads the cgroup, /proc and the
    /// proxy's counters, which a warm hand-out (the one caller on a hot
    /// path) has no use for.
    Lifetime {
        /// The end of the lifetime.
        expires: u64,
    },
    /// Its egress policy (after the update, if one was asked for).
    Network(Box<NetworkState>),
    /// It is ending.
    Stopping,
    /// The request failed.
    Error(String),
}

/// What a keeper reports about its sandbox now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Live {
    /// `running` or `paused`.
    pub state: String,
    /// Seconds since the epoch: the last exec, pause or resume (or creation).
    pub last_used: u64,
    /// Seconds since the epoch: when the keeper removes the sandbox (its
    /// lifetime's end, or earlier after the idle timeout).
    pub deadline: u64,
    /// Seconds since the epoch: the end of its lifetime.
    #[serde(default)]
    pub expires: u64,
    /// Memory charged to the sandbox's cgroup now, in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time used by all its processes so far, in milliseconds.
    pub cpu_used_ms: Option<f64>,
    /// Tasks (threads) in it now, its init included.
    pub tasks: Option<u64>,
    /// Whether pause can work here.
    pub can_pause: bool,
    /// Commands running now (started through the keeper).
    #[serde(default)]
    pub execs: u64,
    /// Processes of the sandbox that are children of its init (0: nothing
    /// runs in it but init; every process descends from init).
    #[serde(default)]
    pub processes: u64,
    /// What its egress proxy did so far (allowlist and open modes): counts
    /// and the refusals (the first ones kept, see the proxy's cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::outcome::NetworkReport>,
}

/// A sandbox's egress policy, as a keeper reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkState {
    /// `none`, `allowlist`, `open` or `kernel`.
    pub mode: String,
    /// The policy its proxy applies (`None`: no proxy, nothing to update).
    pub policy: Option<nanoclaw_net::NetworkPolicy>,
    /// Its credential rules, as `domain: Header, ...` (never the values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// The update just made, if any: the open connections it closed and
    /// how many it kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<nanoclaw_net::PolicyUpdate>,
}

/// Frame kinds a keeper adds to init's (see [`crate::native::proto`]).
pub(crate) mod frames {
    /// The reply to `Spawn`: the value is the number of descriptors sent
    /// with it (stdout, stderr, report, and stdin if asked for); the id is
    /// the exec id.
    pub const SPAWNED: u32 = 110;
    /// `Spawn` failed: the header's `len` bytes of UTF-8 follow.
    pub const SPAWN_FAILED: u32 = 111;
}
