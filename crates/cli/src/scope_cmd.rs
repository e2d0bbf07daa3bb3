//! Policy scopes (seed 003's `sandbox.scope`, OpenClaw's container reuse):
//! with `--config F --agent A [--session S]`, `nanoclaw run` and
//! `nanoclaw exec` run each command in one long-lived sandbox per scope
//! key — `session`: one per (agent, session); `agent`: one per agent;
//! `shared`: one for every agent — created on first use (a keeper, as
//! `sandbox create` makes) and found again by its labels.
//!
//! What belongs to the sandbox (root, mounts, network, memory/cpu/pids,
//! hardening) is hashed into the `nanoclaw.config-hash` label: a command
//! whose policy no longer matches the sandbox's removes it and gets a new
//! one, so a tightened policy applies at the next command. What belongs to
//! one command (argv, environment, working directory, user, stdin,
//! timeout, output limit) is the exec's. The sandbox ends after
//! `prune.idleHours` without use or `prune.maxAgeDays` after creation (its
//! keeper's idle timeout and lifetime); `sandbox recreate` removes scoped
//! sandboxes so the next command recreates them.
//!
//! `setupCommand`: with an image root it is already part of the root (run
//! once per image and command, cached as a layer: see config_cmd); with the
//! host root it runs once in each new scoped sandbox, before its first
//! command (its writes land where the sandbox may write: /tmp, its home).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser};
use nanoclaw_image::go::GoRun;
use nanoclaw_policy::model::Scope;
use nanoclaw_policy::Resolved;
use nanoclaw_sandbox::keeper::{
    self, all_sandboxes, find, state_root, KeeperConfig, Remote, State,
};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::SandboxSpec;
use sha2::{Digest, Sha256};

use crate::run_cmd::RunArgs;

/// Labels of a scoped sandbox.
pub const LABEL_SCOPE: &str = "nanoclaw.scope";
/// The scope key (`agent:A:session:S`, `agent:A`, `shared`).
pub const LABEL_KEY: &str = "nanoclaw.scope-key";
/// The agent that created it.
pub const LABEL_AGENT: &str = "nanoclaw.agent";
/// The session that created it.
pub const LABEL_SESSION: &str = "nanoclaw.session";
/// Its image (`host` for the host root).
pub const LABEL_IMAGE: &str = "nanoclaw.image";
/// The config file it was made from (absolute).
pub const LABEL_CONFIG: &str = "nanoclaw.config";
/// The hash of its sandbox-level configuration.
pub const LABEL_HASH: &str = "nanoclaw.config-hash";

/// How long a setupCommand may run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// A lifetime for "no maxAgeDays" (the keeper caps it at ten years).
const NO_MAX_AGE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What the scoped sandbox of one resolution is.
struct Scoped {
    scope: Scope,
    key: String,
    agent: String,
    session: String,
    image: String,
    config: PathBuf,
    setup: Option<String>,
    lifetime: Duration,
    idle: Option<Duration>,
}

impl Scoped {
    fn new(r: &Resolved, config: &Path) -> Scoped {
        let hours =
            |h: f64| Duration::from_secs_f64((h * 3600.0).clamp(1.0, NO_MAX_AGE.as_secs_f64()));
        Scoped {
            scope: r.scope,
            key: r.sandbox_key.clone(),
            agent: r.agent.clone().unwrap_or_else(|| "default".into()),
            session: r.session.clone(),
            image: r.image.clone().unwrap_or_else(|| "host".into()),
            config: config.to_path_buf(),
            // With an image root the setup is a layer of the root already.
            setup: r.setup_command.clone().filter(|_| r.image.is_none()),
            lifetime: r.prune.max_age_days.map_or(NO_MAX_AGE, |d| hours(d * 24.0)),
            idle: r.prune.idle_hours.map(hours),
        }
    }

    fn labels(&self, hash: &str) -> Vec<(String, String)> {
        [
            (LABEL_SCOPE, self.scope.as_str()),
            (LABEL_KEY, &self.key),
            (LABEL_AGENT, &self.agent),
            (LABEL_SESSION, &self.session),
            (LABEL_IMAGE, &self.image),
            (LABEL_CONFIG, &self.config.to_string_lossy()),
            (LABEL_HASH, hash),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// A label's value.
pub fn label<'a>(st: &'a State, key: &str) -> Option<&'a str> {
    st.labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The hash of what belongs to the sandbox in `spec` (not to one command).
pub fn config_hash(spec: &SandboxSpec) -> Result<String> {
    let mut v = serde_json::to_value(spec)?;
    if let Some(m) = v.as_object_mut() {
        for per_command in ["command", "env", "workdir", "user", "stdin"] {
            m.remove(per_command);
        }
        if let Some(l) = m.get_mut("limits").and_then(|l| l.as_object_mut()) {
            for per_command in ["timeout", "timeout_ms", "output_limit"] {
                l.remove(per_command);
            }
        }
    }
    let digest = Sha256::digest(serde_json::to_vec(&v)?);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The config file named by `--config` (or discovered), absolute.
pub(crate) fn config_path(policy: &crate::config_cmd::PolicyArgs) -> Result<PathBuf> {
    let Some((path, _, _)) = crate::config_cmd::find_and_load(policy.config.as_deref())? else {
        bail!("--agent/--session need a config file: give --config FILE or set NANOCLAW_CONFIG");
    };
    Ok(std::fs::canonicalize(&path).unwrap_or(path))
}

/// `nanoclaw run --config F --agent A [--session S]`: the command in the
/// scope's sandbox.
pub fn run_scoped(a: &RunArgs, spec: SandboxSpec, go: Option<GoRun>, r: &Resolved) -> Result<u8> {
    let scoped = Scoped::new(r, &config_path(&a.policy)?);
    let mut exec = ExecSpec::new(spec.command.clone());
    exec.env = spec.env.clone();
    if let Some(g) = go {
        // Its build cache lives in the sandbox's /tmp: kept between this
        // scope's commands, shared with no other sandbox.
        exec.env.extend(g.env);
    }
    exec.workdir = spec.workdir.clone();
    exec.user = Some(spec.user);
    exec.timeout = spec.limits.timeout;
    exec.output_limit = spec.limits.output_limit;
    if a.stdin {
        let mut b = Vec::new();
        std::io::stdin().read_to_end(&mut b)?;
        exec.stdin = Stdin::Bytes(b);
    }
    let (remote, st) = acquire(&spec, &scoped)?;
    let limits = spec.limits;
    crate::sandbox_cmd::report_exec(&remote, &st, &exec, a.json, &|k| {
        crate::run_cmd::kill_message(k, &limits)
    })
}

/// Wraps `RunArgs` to build one from words (exec and ls resolve a policy
/// with no other `run` flag).
#[derive(Debug, Parser)]
struct Words {
    #[command(flatten)]
    run: RunArgs,
}

/// The scope's sandbox for `policy` with every other `run` option left
/// out, and what its commands get by default (env, workdir, user,
/// timeout, output limit) as an exec spec with no command.
pub fn scoped_for_exec(
    policy: &crate::config_cmd::PolicyArgs,
) -> Result<(Remote, State, ExecSpec)> {
    let (spec, r) = policy_only_spec(policy)?;
    scoped_for_spec(&spec, &r, &config_path(policy)?)
}

/// The scope's sandbox for a spec already built from `r` (the agent
/// runtime's), and what its commands get by default.
pub fn scoped_for_spec(
    spec: &SandboxSpec,
    r: &Resolved,
    config: &Path,
) -> Result<(Remote, State, ExecSpec)> {
    let scoped = Scoped::new(r, config);
    let (remote, st) = acquire(spec, &scoped)?;
    let mut base = ExecSpec::new(Vec::<String>::new());
    base.env = spec.env.clone();
    base.workdir = spec.workdir.clone();
    base.user = Some(spec.user);
    base.timeout = spec.limits.timeout;
    base.output_limit = spec.limits.output_limit;
    Ok((remote, st, base))
}

/// The spec and resolution of `policy` alone.
pub(crate) fn policy_only_spec(
    policy: &crate::config_cmd::PolicyArgs,
) -> Result<(SandboxSpec, Resolved)> {
    let mut words: Vec<String> = vec!["nanoclaw".into()];
    for (flag, v) in [
        (
            "--config",
            policy
                .config
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
        ),
        ("--agent", policy.agent.clone()),
        ("--session", policy.session.clone()),
    ] {
        if let Some(v) = v {
            words.push(flag.into());
            words.push(v);
        }
    }
    words.push("true".into());
    let w = Words::try_parse_from(&words).map_err(|e| anyhow!("{e}"))?;
    let built = crate::run_cmd::build_spec(&w.run)?;
    let r = built
        .resolved
        .ok_or_else(|| anyhow!("--agent needs a config file (--config FILE)"))?;
    Ok((built.spec, r))
}

/// Holds the scopes lock: finding and creating scoped sandboxes is one
/// step for all of this user's nanoclaw processes (two first commands of a
/// session at once make one sandbox, and the second waits for its setup).
struct ScopesLock {
    _file: std::fs::File,
}

impl ScopesLock {
    fn take(root: &Path) -> Result<ScopesLock> {
        let path = root.with_file_name("scopes.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when it closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(ScopesLock { _file: f })
    }
}

/// The live sandbox of `scoped`'s key whose configuration is `spec`'s: the
/// one there is, or a new one (an outdated one is removed first).
fn acquire(spec: &SandboxSpec, scoped: &Scoped) -> Result<(Remote, State)> {
    let root = state_root()?;
    let hash = config_hash(spec)?;
    let _lock = ScopesLock::take(&root)?;
    for (dir, st) in all_sandboxes(&root) {
        if label(&st, LABEL_KEY) != Some(scoped.key.as_str()) {
            continue;
        }
        if label(&st, LABEL_HASH) == Some(hash.as_str()) {
            return Ok((Remote::new(&st.id, &dir), st));
        }
        eprintln!(
            "nanoclaw: the policy of {} changed since its sandbox {} was made: replacing it",
            scoped.key, st.id
        );
        crate::sandbox_cmd::remove(&st.id)?;
    }
    let mut sandbox = spec.clone();
    sandbox.command.clear();
    sandbox.stdin = Stdin::Null;
    let exec_timeout = sandbox.limits.timeout;
    sandbox.limits.timeout = scoped.lifetime;
    let cfg = KeeperConfig {
        spec: sandbox,
        name: None,
        labels: scoped.labels(&hash),
        lifetime_ms: scoped.lifetime.as_millis() as u64,
        idle_timeout_ms: scoped.idle.map(|d| d.as_millis() as u64),
        exec_timeout_ms: exec_timeout.as_millis() as u64,
        root: root.clone(),
    };
    let exe = std::env::current_exe().context("finding nanoclaw's own binary")?;
    let id = keeper::start_keeper(&exe, &cfg)?;
    let (dir, st) = find(&root, &id)?;
    let remote = Remote::new(&st.id, &dir);
    if let Some(cmd) = &scoped.setup {
        if let Err(e) = run_setup(&remote, spec, cmd) {
            let _ = crate::sandbox_cmd::remove(&st.id);
            return Err(e);
        }
    }
    Ok((remote, st))
}

/// Runs the setupCommand once in a new scoped sandbox; an error (with the
/// end of its output) when it fails.
fn run_setup(remote: &Remote, spec: &SandboxSpec, cmd: &str) -> Result<()> {
    let mut exec = ExecSpec::new(["/bin/sh", "-c", cmd]);
    exec.env = spec.env.clone();
    exec.user = Some(spec.user);
    exec.timeout = SETUP_TIMEOUT;
    let o = remote.exec(&exec)?;
    if o.exit_code == Some(0) && o.killed_by.is_none() {
        return Ok(());
    }
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let s = s.trim();
        s[s.len().saturating_sub(400)..].to_string()
    };
    bail!(
        "setupCommand {cmd:?} failed ({}): {} — fix it in the config; the sandbox was removed",
        o.killed_by
            .map(|k| format!("killed: {k:?}"))
            .unwrap_or_else(|| format!("exit {}", o.cli_exit_code())),
        tail(if o.stderr.is_empty() {
            &o.stdout
        } else {
            &o.stderr
        })
    )
}

/// Options of `sandbox recreate`.
#[derive(Debug, Args)]
pub struct RecreateArgs {
    /// Every scoped sandbox.
    #[arg(long, conflicts_with_all = ["agent", "session"])]
    all: bool,
    /// The scoped sandboxes of this agent.
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    /// The scoped sandbox of this session.
    #[arg(long, value_name = "KEY")]
    session: Option<String>,
}

/// `nanoclaw sandbox recreate`: removes scoped sandboxes (those `run` and
/// `exec` made for `--agent`), so that the next command of their scope
/// gets a new one with the policy as it is now.
pub fn recreate(a: RecreateArgs) -> Result<u8> {
    if !a.all && a.agent.is_none() && a.session.is_none() {
        bail!("say which scoped sandboxes to recreate: --all, --agent ID or --session KEY");
    }
    let root = state_root()?;
    let _lock = ScopesLock::take(&root)?;
    for (_, st) in all_sandboxes(&root) {
        if label(&st, LABEL_KEY).is_none() {
            continue;
        }
        // A shared sandbox is no one agent's (its labels name the agent
        // that made it): only --all recreates it; --session names a
        // session-scoped one.
        let scope = label(&st, LABEL_SCOPE);
        let agent_ok = a
            .agent
            .as_deref()
            .is_none_or(|x| scope != Some("shared") && label(&st, LABEL_AGENT) == Some(x));
        let session_ok = a
            .session
            .as_deref()
            .is_none_or(|x| scope == Some("session") && label(&st, LABEL_SESSION) == Some(x));
        if a.all || (agent_ok && session_ok) {
            crate::sandbox_cmd::remove(&st.id)?;
            println!("{}", st.id);
        }
    }
    Ok(0)
}

/// For `sandbox ls --json`: a scoped sandbox's scope, agent, session,
/// image, config file and whether its configuration still matches.
pub fn describe(st: &State) -> Option<serde_json::Value> {
    label(st, LABEL_KEY)?;
    Some(serde_json::json!({
        "scope": label(st, LABEL_SCOPE),
        "key": label(st, LABEL_KEY),
        "agent": label(st, LABEL_AGENT),
        "session": label(st, LABEL_SESSION),
        "image": label(st, LABEL_IMAGE),
        "config": label(st, LABEL_CONFIG),
        "config_matches": config_matches(st),
    }))
}

/// For `sandbox ls`: whether a scoped sandbox's configuration still matches
/// its config file's policy now (None: not scoped, or the file cannot be
/// resolved any more).
pub fn config_matches(st: &State) -> Option<bool> {
    let want = label(st, LABEL_HASH)?;
    let policy = crate::config_cmd::PolicyArgs {
        config: Some(PathBuf::from(label(st, LABEL_CONFIG)?)),
        agent: label(st, LABEL_AGENT).map(str::to_string),
        session: label(st, LABEL_SESSION).map(str::to_string),
    };
    let (spec, _) = policy_only_spec(&policy).ok()?;
    Some(config_hash(&spec).ok()? == want)
}
