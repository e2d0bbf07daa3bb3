//! nanoclaw configuration and policy.
//!
//! * [`load`] / [`parse`]: `nanoclaw.yaml` (YAML, or JSON with comments) to
//!   a validated [`Config`], with every problem reported at once with its
//!   key path, line and column ([`Diagnostic`]).
//! * [`discover`]: where the file is (`--config`, `NANOCLAW_CONFIG`,
//!   `./nanoclaw.yaml`, `$XDG_CONFIG_HOME/nanoclaw/config.yaml`).
//! * [`resolve::resolve`]: a pure function from (config, agent, session,
//!   main session, CLI overrides) to the effective sandbox and
//!   [`ToolPolicy`], with the [`Source`] of every value; then
//!   [`Resolved::to_spec`] builds the engine's `SandboxSpec`.
//! * [`explain`]: `nanoclaw sandbox explain`.
//!
//! ## Schema (both snake_case and camelCase spellings are accepted)
//!
//! ```yaml
//! security:            # NanoClaw (seed 000): defaults for every sandbox
//!   cpu_limit: 1.0     # cpus
//!   memory_limit: 512m # at least 4m
//!   memory_swap: 512m  # memory + swap; equal to memory = no swap
//!   pids_limit: 256
//!   timeout: 30s
//!   tmpfs_size: 100m
//!   output_limit: 10m
//!   network_mode: none # none | allowlist | open (bridge: deprecated)
//!   allowed_hosts: [api.anthropic.com]
//!   read_only: true    # always true in effect
//!   privileged: false  # true is an error
//!   cap_drop: [ALL]
//!   cap_add: [CHOWN]   # dangerous capabilities are refused
//!   seccomp_profile: default   # default | unconfined | /path/profile.json
//!   cpu_shares: 512    # parsed, not enforced by the native engine
//!   blkio_weight: 500  # parsed, not enforced by the native engine
//!   dangerouslyAllowUnsafeBinds: false
//! execution: { languages: [python:3.11-slim], preload_images: true, pool_size: 3 }
//! llm: { provider: anthropic, api_key: "${ANTHROPIC_API_KEY}", model: ..., base_url: ... }
//! session: { mainKey: main }
//! tools:               # global tool policy (OpenClaw, seed 003)
//!   allow: [exec, read, write]   # names and group:* shorthands
//!   deny: [shell]
//!   elevated: { enabled: true, allowFrom: { telegram: ["123"] } }
//! agents:
//!   defaults:
//!     sandbox:
//!       mode: all      # off | non-main | all (built-in default: all)
//!       scope: session # session | agent | shared
//!       workspaceAccess: none      # none | ro | rw (mounted at /workspace)
//!       workspaceRoot: /srv/nanoclaw/workspaces
//!       bindMounts: ["/home/user/data:/data:ro"]
//!       network: none
//!       allowedHosts: []
//!       setupCommand: "pip install requests"
//!       image: host
//!       prune: { idleHours: 24, maxAgeDays: 7 }
//!       memory: 512m   # also memorySwap, cpus, pids, timeout, tmpfsSize, outputLimit
//!       dangerouslyAllowUnsafeBinds: false
//!     tools: { allow: [], deny: [] }
//!   list:
//!     - id: scraper
//!       workspace: /srv/scraper
//!       sandbox: { ... }
//!       tools: { allow: [...], deny: [...], elevated: { enabled: true } }
//!   analyzer:          # seed 003's form: agents.<id> is an agent too
//!     sandbox: { ... }
//! ```
//!
//! `dangerouslyAllowUnsafeBinds: true` (in a `sandbox` section, or in
//! `security` for all of them) lets bind mounts of dangerous host paths
//! through, with a warning. Targets that shadow `/proc`, `/dev`, `/sys`,
//! `/etc` or `/` are always refused, as are host paths that do not exist.
#![warn(missing_docs)]

pub mod binds;
pub mod decode;
pub mod diag;
pub mod explain;
pub mod model;
pub mod resolve;
pub mod secret;
pub mod tools;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Severity};
pub use model::Config;
pub use resolve::{resolve, CliOverrides, Request, Resolved, Source};
pub use secret::Secret;
pub use tools::ToolPolicy;

use binds::{HostFs, RealFs};
use decode::{DecodeEnv, Decoder};

/// A parsed configuration and everything found wrong with it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The model. Values with errors are left out (unset).
    pub config: Config,
    /// Errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }

    /// True if any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }
}

/// Parses and validates configuration text. Never panics; syntax errors
/// come back as a single error diagnostic.
pub fn parse(text: &str, env: DecodeEnv<'_>) -> Loaded {
    let root = match yaml::parse(text) {
        Ok(r) => r,
        Err(e) => {
            return Loaded {
                config: Config::default(),
                diagnostics: vec![Diagnostic::error("", e.pos, e.message)],
            }
        }
    };
    let mut d = Decoder::new(env);
    let config = d.config(&root);
    let mut diagnostics = d.diags;
    diagnostics.sort_by_key(|d| (d.line, d.col));
    Loaded {
        config,
        diagnostics,
    }
}

/// Parses text with the process environment and the real filesystem.
pub fn parse_with_process_env(text: &str) -> Loaded {
    let env = |k: &str| std::env::var(k).ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let fs = RealFs { home: home.clone() };
    parse(
        text,
        DecodeEnv {
            env: &env,
            fs: &fs,
            home,
        },
    )
}

/// Reading the file failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}; check the path given by {via}")]
    Read {
        /// The file.
        path: PathBuf,
        /// How it was found.
        via: Discovered,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Loads a file with the process environment and the real filesystem.
pub fn load(path: &Path, via: Discovered) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        via,
        source,
    })?;
    Ok(parse_with_process_env(&text))
}

/// How the config file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovered {
    /// `--config FILE`.
    Flag,
    /// `$NANOCLAW_CONFIG`.
    EnvVar,
    /// `./nanoclaw.yaml`.
    CurrentDir,
    /// `$XDG_CONFIG_HOME/nanoclaw/config.yaml` (or `~/.config/...`).
    UserConfig,
}

impl std::fmt::Display for Discovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Discovered::Flag => "--config",
            Discovered::EnvVar => "NANOCLAW_CONFIG",
            Discovered::CurrentDir => "./nanoclaw.yaml",
            Discovered::UserConfig => "$XDG_CONFIG_HOME/nanoclaw/config.yaml",
        })
    }
}

/// Finds the config file: `--config`, then `NANOCLAW_CONFIG`, then
/// `./nanoclaw.yaml` (in `cwd`), then `$XDG_CONFIG_HOME/nanoclaw/config.yaml`
/// (`~/.config` when unset). A file named by `--config` or
/// `NANOCLAW_CONFIG` is returned even if missing (loading it then fails
/// with a clear error); the other two only if they exist. `None`: no file,
/// built-in defaults apply.
pub fn discover(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
    exists: &dyn Fn(&Path) -> bool,
) -> Option<(PathBuf, Discovered)> {
    if let Some(f) = flag {
        return Some((f.to_path_buf(), Discovered::Flag));
    }
    if let Some(f) = env("NANOCLAW_CONFIG").filter(|s| !s.is_empty()) {
        return Some((PathBuf::from(f), Discovered::EnvVar));
    }
    let local = cwd.join("nanoclaw.yaml");
    if exists(&local) {
        return Some((local, Discovered::CurrentDir));
    }
    let base = env("XDG_CONFIG_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")))?;
    let user = base.join("nanoclaw").join("config.yaml");
    exists(&user).then_some((user, Discovered::UserConfig))
}

/// A [`HostFs`] for callers that only need the real one.
pub fn real_fs() -> impl HostFs {
    RealFs {
        home: std::env::var_os("HOME").map(PathBuf::from),
    }
}
