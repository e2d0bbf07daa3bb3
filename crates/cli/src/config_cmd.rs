//! `nanoclaw config validate`, `nanoclaw sandbox explain`, and the policy
//! half of `nanoclaw run --config FILE --agent ID [--session KEY]`.
//!
//! # Wiring (for main.rs)
//!
//! ```ignore
//! mod config_cmd;
//!
//! enum Command {
//!     // ... existing variants ...
//!     /// Check and inspect the configuration file (nanoclaw.yaml).
//!     #[command(subcommand)]
//!     Config(config_cmd::ConfigCommand),
//!     /// Inspect sandbox policy: `nanoclaw sandbox explain`.
//!     #[command(subcommand)]
//!     Sandbox(config_cmd::SandboxCommand),
//! }
//!
//! // in main():
//! Command::Config(c) => config_cmd::run_config(c),
//! Command::Sandbox(c) => config_cmd::run_sandbox(c),
//! ```
//!
//! Both return `anyhow::Result<u8>` like `run_cmd::run` (0 ok, 125 =
//! [`EXIT_ERRORS`] when the file has errors; an `Err` is printed by main as
//! one line and exits 125).
//!
//! For `nanoclaw run`: add `#[command(flatten)] policy: config_cmd::PolicyArgs`
//! to `RunArgs` (it brings `--config`, `--agent`, `--session`). When
//! `policy.is_requested()`, build a `nanoclaw_policy::CliOverrides` from the
//! flags the user actually gave (`RunArgs` keeps them as `Option`s with no
//! clap default; never a default, or it would silently beat the file, and
//! never a scan of argv, where the sandboxed command's own arguments look
//! like flags) and call [`plan_run`]. It returns the
//! `SandboxSpec` (limits.explicit set for file and CLI values), the tool
//! policy and the source of every value. Then apply the run-only flags
//! (`--env`, `--user`, `--workdir`, `--stdin`, `--exec-allow`, ...) to the
//! spec. If the plan is [`Execution::Host`] (the agent's sandbox mode is
//! off, or non-main in the main session), `nanoclaw run` should refuse with
//! exit 125 and print the reason: it never runs anything unsandboxed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use nanoclaw_policy::binds::{check_mount, parse_bind, RealFs};
use nanoclaw_policy::explain::{explain_json, explain_text};
use nanoclaw_policy::model::{NetworkMode, WorkspaceAccess};
use nanoclaw_policy::resolve::{Provenance, Sender};
use nanoclaw_policy::{
    discover, CliOverrides, Config, Discovered, Loaded, Request, Resolved, ToolPolicy,
};
use nanoclaw_sandbox::units::{parse_duration, parse_size};
use nanoclaw_sandbox::SandboxSpec;

/// Exit code when the configuration has errors.
pub const EXIT_ERRORS: u8 = 125;

/// `nanoclaw config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check the configuration file and report every problem at once
    /// (exit 125 when there is any error).
    Validate(ValidateArgs),
}

/// `nanoclaw sandbox ...`.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Show the effective sandbox and tool policy of an agent and session,
    /// where every value comes from, and what to change.
    Explain(ExplainArgs),
    /// Create a long-lived sandbox (every `run` option; no command) and
    /// print its id; run commands in it with `nanoclaw exec`.
    Create(crate::sandbox_cmd::CreateArgs),
    /// List your long-lived sandboxes.
    #[command(alias = "list")]
    Ls(crate::sandbox_cmd::LsArgs),
    /// Show one sandbox's state.
    Inspect(crate::sandbox_cmd::InspectArgs),
    /// Remove sandboxes (and everything running in them).
    Rm(crate::sandbox_cmd::RmArgs),
    /// Remove sandboxes idle or older than a duration.
    Prune(crate::sandbox_cmd::PruneArgs),
    /// Show or replace the egress policy of a running sandbox (new
    /// connections and DNS follow it at once; open connections it no
    /// longer allows are closed).
    Network(crate::sandbox_cmd::NetworkArgs),
    /// Freeze every process of sandboxes until `sandbox resume`.
    Pause(crate::sandbox_cmd::PauseArgs),
    /// Let paused sandboxes run again.
    Resume(crate::sandbox_cmd::PauseArgs),
    /// End every process running in sandboxes (SIGTERM, then SIGKILL);
    /// the sandboxes and their files stay for the next exec.
    Stop(crate::sandbox_cmd::StopArgs),
    /// Remove the scoped sandboxes `run`/`exec --agent` made, so the next
    /// command of their scope gets a new one (after a policy change).
    Recreate(crate::scope_cmd::RecreateArgs),
}

/// Options of `nanoclaw config validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The config file (default: $NANOCLAW_CONFIG, ./nanoclaw.yaml,
    /// $XDG_CONFIG_HOME/nanoclaw/config.yaml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `nanoclaw sandbox explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The config file (default: discovered as for `config validate`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The agent (default: the one marked `default: true`, else the defaults).
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// The session key (default: the main session, the worst case for
    /// non-main).
    #[arg(long, value_name = "KEY")]
    pub session: Option<String>,
    /// The sender, CHANNEL:ID, for tools.elevated.allowFrom.
    #[arg(long, value_name = "CHANNEL:ID")]
    pub sender: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// CLI overrides to show on top of the file.
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

/// The policy selection of `nanoclaw run`.
#[derive(Debug, Args, Default, Clone)]
pub struct PolicyArgs {
    /// Config file with agents and their sandbox policy.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run with this agent's resolved policy.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Session key (default: the main session).
    #[arg(long, value_name = "KEY")]
    pub session: Option<String>,
}

impl PolicyArgs {
    /// True when the user asked for config-driven policy.
    pub fn is_requested(&self) -> bool {
        self.config.is_some() || self.agent.is_some() || self.session.is_some()
    }
}

/// Network mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    /// Loopback only.
    None,
    /// Only allowed hosts.
    Allowlist,
    /// Any host.
    Open,
}

/// Workspace access on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessArg {
    /// Not mounted.
    None,
    /// Read-only.
    Ro,
    /// Read-write.
    Rw,
}

/// Overrides for `sandbox explain` (the same names as `nanoclaw run`; no
/// defaults, so only what is typed overrides the file).
#[derive(Debug, Args, Default, Clone)]
pub struct OverrideArgs {
    /// Memory limit, e.g. 256m.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Memory plus swap.
    #[arg(long, value_name = "SIZE")]
    pub memory_swap: Option<String>,
    /// CPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Max processes.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Timeout, e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Network mode.
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<NetworkArg>,
    /// Allowed host (repeatable).
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    pub allow_host: Vec<String>,
    /// Workspace folder.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Workspace access.
    #[arg(long, value_enum, value_name = "ACCESS")]
    pub workspace_access: Option<AccessArg>,
    /// Bind mount HOST:CONTAINER[:ro|rw] (repeatable).
    #[arg(long = "mount", value_name = "HOST:CONTAINER[:ro|rw]")]
    pub mounts: Vec<String>,
}

impl OverrideArgs {
    /// The overrides, validated (sizes, durations, mounts).
    pub fn to_overrides(&self) -> Result<CliOverrides> {
        let size = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
            v.as_deref()
                .map(|s| parse_size(s).map_err(|e| anyhow!("--{flag}: {e}")))
                .transpose()
        };
        let mut o = CliOverrides {
            memory: size("memory", &self.memory)?,
            memory_swap: size("memory-swap", &self.memory_swap)?,
            cpus: self.cpus,
            pids: self.pids,
            timeout: self
                .timeout
                .as_deref()
                .map(|s| parse_duration(s).map_err(|e| anyhow!("--timeout: {e}")))
                .transpose()?,
            network: self.network.map(|n| match n {
                NetworkArg::None => NetworkMode::None,
                NetworkArg::Allowlist => NetworkMode::Allowlist,
                NetworkArg::Open => NetworkMode::Open,
            }),
            allow_hosts: self.allow_host.clone(),
            workspace: self.workspace.clone(),
            workspace_access: self.workspace_access.map(|a| match a {
                AccessArg::None => WorkspaceAccess::None,
                AccessArg::Ro => WorkspaceAccess::Ro,
                AccessArg::Rw => WorkspaceAccess::Rw,
            }),
            ..CliOverrides::default()
        };
        check_limits(&o)?;
        o.mounts = parse_cli_mounts(&self.mounts)?;
        Ok(o)
    }
}

/// The same impossible-value checks as the config file, for CLI values.
pub fn check_limits(o: &CliOverrides) -> Result<()> {
    if o.memory
        .is_some_and(|m| m < nanoclaw_sandbox::spec::MIN_MEMORY)
    {
        bail!("--memory is below the minimum of 4m: not even a shell starts in less");
    }
    if o.cpus.is_some_and(|c| !c.is_finite() || c <= 0.0) {
        bail!("--cpus must be a positive number such as 0.5, 1 or 2");
    }
    if o.pids == Some(0) {
        bail!("--pids 0 would forbid even the first process; use at least 1");
    }
    if o.timeout == Some(Duration::ZERO) {
        bail!("--timeout 0 would kill every command at once; use a positive duration such as 30s");
    }
    Ok(())
}

/// Parses and checks `--mount` values like the file's bind mounts.
pub fn parse_cli_mounts(mounts: &[String]) -> Result<Vec<nanoclaw_policy::model::BindMount>> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let fs = RealFs { home: home.clone() };
    let mut out = Vec::new();
    for m in mounts {
        let b = parse_bind(m, home.as_deref()).map_err(|e| anyhow!("--mount: {e}"))?;
        check_mount(&b, &fs, false).map_err(|e| anyhow!("--mount {m}: {e}"))?;
        out.push(b);
    }
    Ok(out)
}

/// Where default workspaces live: `/var/lib/nanoclaw` as root,
/// `$XDG_DATA_HOME/nanoclaw` (or `~/.local/share/nanoclaw`) otherwise.
pub fn data_dir() -> PathBuf {
    // The variables the daemon's data folder follows (one moves everything).
    for var in ["NANOCLAW_DATA", "NANOCLAW_DATA_DIR"] {
        if let Some(x) = std::env::var_os(var).filter(|x| !x.is_empty()) {
            return PathBuf::from(x);
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return PathBuf::from("/var/lib/nanoclaw");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("nanoclaw");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/nanoclaw"),
        None => PathBuf::from("/var/lib/nanoclaw"),
    }
}

/// Finds and loads the config. `Ok(None)`: no file anywhere (built-in
/// defaults).
pub fn find_and_load(flag: Option<&Path>) -> Result<Option<(PathBuf, Discovered, Loaded)>> {
    let env = |k: &str| std::env::var(k).ok();
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let Some((path, via)) = discover(flag, &env, &cwd, &|p: &Path| p.is_file()) else {
        return Ok(None);
    };
    let loaded = nanoclaw_policy::load(&path, via)?;
    let k = &loaded.config.kubernetes;
    if *k != nanoclaw_policy::model::KubernetesSection::default() {
        let env = nanoclaw_kubernetes::KubeOptions::from_env();
        crate::backends::set_kube_options(nanoclaw_kubernetes::KubeOptions {
            kubeconfig: k.kubeconfig.clone(),
            context: k.context.clone(),
            namespace: k.namespace.clone().or(env.namespace),
            runtime_class_name: k.runtime_class_name.clone().or(env.runtime_class_name),
            image_pull_policy: k.image_pull_policy.clone().or(env.image_pull_policy),
        });
    }
    Ok(Some((path, via, loaded)))
}

fn print_diagnostics(path: &Path, loaded: &Loaded) {
    for d in &loaded.diagnostics {
        eprintln!("{}:{d}", path.display());
    }
}

/// Creates the team spaces the resolution mounts (under the data folder),
/// handed to the sandbox user as default workspaces are.
fn make_team_spaces(r: &Resolved, user: nanoclaw_sandbox::spec::User) -> Result<()> {
    for m in &r.mounts {
        if !m.from.key.ends_with(".team") && !m.from.key.starts_with("teams.") {
            continue;
        }
        let dir = &m.mount.host;
        if dir.is_dir() {
            continue;
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the team space {}", dir.display()))?;
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let base = nanoclaw_sandbox::native::ROOTFUL_ID_BASE;
            std::os::unix::fs::chown(dir, Some(base + user.uid), Some(base + user.gid))
                .with_context(|| {
                    format!(
                        "cannot hand the team space {} to the sandbox user",
                        dir.display()
                    )
                })?;
        }
    }
    Ok(())
}

/// An error listing every error of the config, if it has any.
pub fn require_no_errors(path: &Path, loaded: &Loaded) -> Result<()> {
    if loaded.has_errors() {
        let list: Vec<String> = loaded.errors().map(|d| d.to_string()).collect();
        bail!(
            "{} has {} error(s): {}",
            path.display(),
            list.len(),
            list.join(" | ")
        );
    }
    Ok(())
}

/// Runs `nanoclaw config ...`.
pub fn run_config(cmd: ConfigCommand) -> Result<u8> {
    match cmd {
        ConfigCommand::Validate(a) => validate(&a),
    }
}

fn validate(a: &ValidateArgs) -> Result<u8> {
    let Some((path, via, loaded)) = find_and_load(a.config.as_deref())? else {
        bail!("no config file found: give --config FILE, set NANOCLAW_CONFIG, or create ./nanoclaw.yaml or $XDG_CONFIG_HOME/nanoclaw/config.yaml");
    };
    let errors = loaded.errors().count();
    let warnings = loaded.warnings().count();
    if a.json {
        let v = serde_json::json!({
            "file": path,
            "found_via": via,
            "ok": errors == 0,
            "errors": errors,
            "warnings": warnings,
            "diagnostics": loaded.diagnostics,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for d in &loaded.diagnostics {
            println!("{}:{d}", path.display());
        }
        if errors == 0 {
            println!(
                "{}: ok ({warnings} warning{})",
                path.display(),
                if warnings == 1 { "" } else { "s" }
            );
        } else {
            println!(
                "{}: {errors} error{}, {warnings} warning{}",
                path.display(),
                if errors == 1 { "" } else { "s" },
                if warnings == 1 { "" } else { "s" }
            );
        }
    }
    Ok(if errors > 0 { EXIT_ERRORS } else { 0 })
}

/// Runs `nanoclaw sandbox ...`.
pub fn run_sandbox(cmd: SandboxCommand) -> Result<u8> {
    match cmd {
        SandboxCommand::Explain(a) => explain(&a),
        SandboxCommand::Create(a) => crate::sandbox_cmd::create(a),
        SandboxCommand::Ls(a) => crate::sandbox_cmd::ls(a),
        SandboxCommand::Inspect(a) => crate::sandbox_cmd::inspect(a),
        SandboxCommand::Rm(a) => crate::sandbox_cmd::rm(a),
        SandboxCommand::Prune(a) => crate::sandbox_cmd::prune(a),
        SandboxCommand::Network(a) => crate::sandbox_cmd::network(a),
        SandboxCommand::Pause(a) => crate::sandbox_cmd::pause(a),
        SandboxCommand::Resume(a) => crate::sandbox_cmd::resume(a),
        SandboxCommand::Stop(a) => crate::sandbox_cmd::stop(a),
        SandboxCommand::Recreate(a) => crate::scope_cmd::recreate(a),
    }
}

fn explain(a: &ExplainArgs) -> Result<u8> {
    let found = find_and_load(a.config.as_deref())?;
    let (config, path) = match &found {
        Some((path, _, loaded)) => {
            if loaded.has_errors() {
                print_diagnostics(path, loaded);
                eprintln!("nanoclaw: {} has errors; fix them (nanoclaw config validate) before explaining", path.display());
                return Ok(EXIT_ERRORS);
            }
            if !a.json {
                print_diagnostics(path, loaded);
            }
            (loaded.config.clone(), Some(path.as_path()))
        }
        None => (Config::default(), None),
    };
    let sender = match &a.sender {
        Some(s) => {
            let (channel, id) = s
                .split_once(':')
                .ok_or_else(|| anyhow!("--sender must be CHANNEL:ID, e.g. telegram:12345"))?;
            Some(Sender {
                channel: channel.into(),
                id: id.into(),
            })
        }
        None => None,
    };
    let r = resolve_for(
        &config,
        a.agent.as_deref(),
        a.session.as_deref(),
        sender,
        a.overrides.to_overrides()?,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&explain_json(&r, path))?);
    } else {
        print!("{}", explain_text(&r, path));
    }
    Ok(0)
}

fn resolve_for(
    config: &Config,
    agent: Option<&str>,
    session: Option<&str>,
    sender: Option<Sender>,
    cli: CliOverrides,
) -> Result<Resolved> {
    let main = config
        .session
        .main_key
        .clone()
        .unwrap_or_else(|| "main".to_string());
    let req = Request {
        agent: agent.map(str::to_string),
        session: session.map(str::to_string).unwrap_or_else(|| main.clone()),
        main_session: Some(main),
        sender,
        cli,
        data_dir: data_dir(),
    };
    Ok(nanoclaw_policy::resolve(config, &req)?)
}

/// Where `nanoclaw run` will run the command.
#[derive(Debug, Clone)]
pub enum Execution {
    /// In a sandbox with this spec.
    Sandboxed(Box<SandboxSpec>),
    /// On the host (sandbox mode off, or non-main in the main session).
    /// `nanoclaw run` should refuse and print `reason`.
    Host {
        /// Why, with the config key that decides it.
        reason: String,
    },
}

/// The policy half of `nanoclaw run --config FILE --agent ID [--session KEY]`.
#[derive(Debug, Clone)]
// tools, sources and resolved are for the agent runtime and --json reports.
#[allow(dead_code)]
pub struct RunPlan {
    /// Sandbox spec, or why there is none.
    pub execution: Execution,
    /// The agent's tool policy.
    pub tools: ToolPolicy,
    /// Source of every value (`limits.memory` → `agents.list[0].sandbox.memory`, ...).
    pub sources: BTreeMap<String, Provenance>,
    /// Warnings for stderr (config warnings and resolution warnings).
    pub warnings: Vec<String>,
    /// The whole resolution (for `--json` reports).
    pub resolved: Resolved,
}

/// Loads the config (discovered if `policy.config` is None), resolves the
/// agent's policy with `cli` on top, and builds the spec for `command`.
/// Errors (exit 125): no config found, config errors (all listed),
/// unknown agent, or a policy the engine cannot realise yet.
pub fn plan_run(policy: &PolicyArgs, cli: CliOverrides, command: Vec<String>) -> Result<RunPlan> {
    check_limits(&cli)?;
    let Some((path, _, loaded)) = find_and_load(policy.config.as_deref())? else {
        bail!("--agent/--session need a config file: give --config FILE or set NANOCLAW_CONFIG");
    };
    require_no_errors(&path, &loaded)?;
    let warnings: Vec<String> = loaded
        .warnings()
        .map(|d| format!("{}:{d}", path.display()))
        .collect();
    plan_config(
        &loaded.config,
        policy.agent.as_deref(),
        policy.session.as_deref(),
        cli,
        command,
        warnings,
    )
}

/// [`plan_run`] for a config already loaded (and perhaps extended: the
/// agent runtime adds persistent agents to it).
pub fn plan_config(
    config: &Config,
    agent: Option<&str>,
    session: Option<&str>,
    cli: CliOverrides,
    command: Vec<String>,
    mut warnings: Vec<String>,
) -> Result<RunPlan> {
    let r = resolve_for(config, agent, session, None, cli)?;
    warnings.extend(r.warnings.iter().cloned());
    let execution = if r.sandboxed {
        if let Some(ws) = &r.workspace {
            if r.workspace_is_default() {
                std::fs::create_dir_all(ws)
                    .with_context(|| format!("cannot create the workspace {}", ws.display()))?;
            } else if !ws.is_dir() {
                bail!(
                    "workspace {} ({}) does not exist; create it or fix the config",
                    ws.display(),
                    r.sources["workspace"].key
                );
            }
        }
        // An agent's `image` comes from the local image store; its
        // `setupCommand` runs once on top of it (with the agent's network
        // policy) and is cached as an image, so later sandboxes start with
        // it applied.
        let setup = r.setup_command.clone();
        let network = r
            .to_spec_with(vec!["true".into()], &|_| {
                Ok(nanoclaw_sandbox::spec::Root::Host)
            })?
            .network;
        let spec = r.to_spec_with(command, &|reference| {
            if crate::backends::store_images(&r.backend) {
                // From the backend's own store (Docker's).
                if let Some(cmd) = &setup {
                    return Err(format!("setupCommand {cmd:?} with an image is not supported on backend {} yet; bake it into the image", r.backend));
                }
                return Ok(nanoclaw_sandbox::spec::Root::Image(reference.to_string()));
            }
            let store = nanoclaw_image::Store::open_default().map_err(|e| e.to_string())?;
            let reference = match &setup {
                Some(cmd) => nanoclaw_image::build::setup_layer(
                    &store,
                    reference,
                    cmd,
                    &nanoclaw_image::build::SetupOptions {
                        network: network.clone(),
                        ..Default::default()
                    },
                )
                .map_err(|e| format!("setupCommand {cmd:?}: {e}"))?,
                None => reference.to_string(),
            };
            let img = store.resolve(&reference).map_err(|e| e.to_string())?;
            Ok(nanoclaw_sandbox::spec::Root::Layers(img.layers))
        })?;
        make_team_spaces(&r, spec.user)?;
        if let Some(ws) = &r.workspace {
            // SAFETY: geteuid cannot fail.
            if r.workspace_is_default() && unsafe { libc::geteuid() } == 0 {
                // nanoclaw's own default workspaces belong to the sandbox
                // user's id in the storage range, which every rootful
                // sandbox sees as its own (shifted onto its id slot), so
                // the sandbox never writes there as the host's root.
                let base = nanoclaw_sandbox::native::ROOTFUL_ID_BASE;
                std::os::unix::fs::chown(
                    ws,
                    Some(base + spec.user.uid),
                    Some(base + spec.user.gid),
                )
                .with_context(|| {
                    format!(
                        "cannot hand the workspace {} to the sandbox user",
                        ws.display()
                    )
                })?;
            }
        }
        Execution::Sandboxed(Box::new(spec))
    } else {
        let key = r
            .sources
            .get("mode")
            .map(|p| p.key.clone())
            .unwrap_or_default();
        Execution::Host {
            reason: format!(
                "agent {} in session {:?} is not sandboxed (sandbox mode {} set by {key}); nanoclaw run only runs sandboxed: set the mode to all, or pick another session",
                r.agent.as_deref().unwrap_or("(default)"),
                r.session,
                r.mode.as_str()
            ),
        }
    };
    Ok(RunPlan {
        execution,
        tools: r.tools.clone(),
        sources: r.sources.clone(),
        warnings,
        resolved: r,
    })
}
