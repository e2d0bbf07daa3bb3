//! Resolution: a pure function from (configuration, agent, session, main
//! session, CLI overrides) to the effective sandbox and tool policy, with
//! the source of every value.
//!
//! Precedence, lowest first: built-in default → `security` (global) →
//! `agents.defaults` (global) → the agent's entry → CLI flags.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nanoclaw_sandbox::spec::{self, ExplicitLimits, Hardening, Limits, Mount, Root, Seccomp};
use nanoclaw_sandbox::SandboxSpec;
use serde::{Serialize, Serializer};

use crate::model::*;
use crate::tools::{ToolDecision, ToolLayer, ToolPolicy};

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// nanoclaw's built-in default.
    BuiltinDefault,
    /// The global part of the file (`security`, `tools`, `agents.defaults`).
    Global,
    /// The agent's own entry.
    Agent(String),
    /// A command-line flag.
    CliFlag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::BuiltinDefault => f.write_str("default"),
            Source::Global => f.write_str("global"),
            Source::Agent(id) => write!(f, "agent:{id}"),
            Source::CliFlag => f.write_str("cli"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A source and the config key (or CLI flag) that set the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provenance {
    /// Which layer.
    pub source: Source,
    /// `agents.list[0].sandbox.memory`, `--memory`, or `builtin`.
    pub key: String,
}

impl Provenance {
    fn builtin() -> Self {
        Provenance {
            source: Source::BuiltinDefault,
            key: "builtin".into(),
        }
    }
}

/// A message sender, for `tools.elevated.allowFrom` gating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sender {
    /// Channel (`telegram`, `discord`, `cli`, ...).
    pub channel: String,
    /// Sender id on that channel.
    pub id: String,
}

/// Values given on the command line; they override the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CliOverrides {
    /// `--memory`.
    pub memory: Option<u64>,
    /// `--memory-swap`.
    pub memory_swap: Option<u64>,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `--pids`.
    pub pids: Option<u64>,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--tmpfs-size`.
    pub tmpfs_size: Option<u64>,
    /// `--output-limit`.
    pub output_limit: Option<u64>,
    /// `--network`.
    pub network: Option<NetworkMode>,
    /// `--allow-host` (replaces the file's list when non-empty).
    pub allow_hosts: Vec<String>,
    /// `--workspace`.
    pub workspace: Option<PathBuf>,
    /// `--workspace-access`.
    pub workspace_access: Option<WorkspaceAccess>,
    /// `--mount` (added after the file's bind mounts).
    pub mounts: Vec<BindMount>,
    /// `--image`.
    pub image: Option<String>,
    /// `--backend`.
    pub backend: Option<String>,
    /// `--cap-add`.
    pub cap_add: Vec<String>,
    /// `--deny-tool`: extra tools to deny (the CLI can only restrict).
    pub deny_tools: Vec<String>,
}

/// What to resolve for.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The agent id; `None` = the agent marked `default: true`, or only
    /// the defaults when there is none.
    pub agent: Option<String>,
    /// The session key.
    pub session: String,
    /// The main session key (`None` = `session.mainKey` or `main`).
    pub main_session: Option<String>,
    /// Who asks (for `allowFrom`); `None` = unknown (fails a sender gate).
    pub sender: Option<Sender>,
    /// CLI overrides, applied last.
    pub cli: CliOverrides,
    /// Where default workspaces live (`<data dir>/workspaces/<agent>`).
    pub data_dir: PathBuf,
}

impl Request {
    /// A request for `agent` in `session`, no overrides.
    pub fn new(agent: Option<&str>, session: &str) -> Self {
        Request {
            agent: agent.map(str::to_string),
            session: session.to_string(),
            main_session: None,
            sender: None,
            cli: CliOverrides::default(),
            data_dir: PathBuf::from("/var/lib/nanoclaw"),
        }
    }
}

/// A bind mount with its origin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolvedMount {
    /// The mount.
    #[serde(flatten)]
    pub mount: BindMount,
    /// Where it came from.
    pub from: Provenance,
}

/// Effective limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ResolvedLimits {
    /// Memory, bytes.
    pub memory: u64,
    /// Memory + swap, bytes (`None`: equal to memory, no swap).
    pub memory_swap: Option<u64>,
    /// CPUs.
    pub cpus: f64,
    /// Max tasks.
    pub pids: u64,
    /// Wall-clock timeout.
    #[serde(serialize_with = "ser_ms")]
    pub timeout: Duration,
    /// `/tmp` size, bytes.
    pub tmpfs_size: u64,
    /// Output limit per stream, bytes.
    pub output_limit: u64,
}

fn ser_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Effective network policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolvedNetwork {
    /// Mode.
    pub mode: NetworkMode,
    /// Allowed destinations (allowlist mode).
    pub allowed_hosts: Vec<String>,
    /// Credential rules, shown as `domain: header names` (never values).
    pub credential_rules: Vec<String>,
    /// Credential rules for the spec (`network.rules`; not serialised: the
    /// values are secrets).
    #[serde(skip)]
    pub egress: nanoclaw_sandbox::spec::Egress,
}

/// One gate of elevated mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ElevatedGate {
    /// The session is not sandboxed: exec already runs on the host.
    NotSandboxed,
    /// `tools.elevated.enabled` is not `true`.
    GlobalDisabled,
    /// The sender is not in `tools.elevated.allowFrom`.
    GlobalAllowFrom,
    /// The agent's `tools.elevated.enabled` is not `true`.
    AgentDisabled,
    /// The sender is not in the agent's `tools.elevated.allowFrom`.
    AgentAllowFrom,
    /// The exec tool is denied (elevated never overrides deny).
    ExecDenied,
    /// The exec tool is not in an allow list (elevated grants no tool).
    ExecNotAllowed,
}

/// Whether `exec` may leave the sandbox (elevated mode), and if not, why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ElevatedStatus {
    /// True only when every gate passes.
    pub allowed: bool,
    /// The first gate that fails.
    pub failing_gate: Option<ElevatedGate>,
    /// Every failing gate, in order, with the key to change.
    pub failing: Vec<FailingGate>,
}

/// A failing elevated gate and the config key that controls it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailingGate {
    /// The gate.
    pub gate: ElevatedGate,
    /// The key to change.
    pub key: String,
}

/// The effective policy for one agent and session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolved {
    /// The agent resolved (None: only the defaults).
    pub agent: Option<String>,
    /// The session.
    pub session: String,
    /// The main session key.
    pub main_session: String,
    /// Whether tools of this session run in a sandbox. When false they run
    /// on the host, and everything below about the sandbox does not apply.
    pub sandboxed: bool,
    /// `sandbox.mode`.
    pub mode: SandboxMode,
    /// `sandbox.scope`.
    pub scope: Scope,
    /// Identity of the sandbox under this scope.
    pub sandbox_key: String,
    /// The agent's team (its space at `/team`, granted teams' at `/teams/<name>`).
    pub team: Option<String>,
    /// `workspaceAccess`.
    pub workspace_access: WorkspaceAccess,
    /// The host workspace folder mounted at `/workspace` (if access is not none).
    pub workspace: Option<PathBuf>,
    /// Mounts (workspace first), in order.
    pub mounts: Vec<ResolvedMount>,
    /// Limits.
    pub limits: ResolvedLimits,
    /// Network.
    pub network: ResolvedNetwork,
    /// Image (`None`: the host root).
    pub image: Option<String>,
    /// What runs the sandbox: `native` (the default), `docker`, `gvisor`,
    /// `microvm`.
    pub backend: String,
    /// One-time setup command.
    pub setup_command: Option<String>,
    /// Pruning.
    pub prune: Prune,
    /// Capabilities granted inside the sandbox's user namespace.
    pub cap_add: Vec<String>,
    /// Seccomp.
    pub seccomp: SeccompSetting,
    /// Tool policy.
    pub tools: ToolPolicy,
    /// Argument rules and approval settings of the tools, per layer.
    pub tool_rules: Vec<ToolRule>,
    /// Elevated mode.
    pub elevated: ElevatedStatus,
    /// Source of every value, by name (`mode`, `limits.memory`, ...).
    pub sources: BTreeMap<String, Provenance>,
    /// Things the operator should know.
    pub warnings: Vec<String>,
}

/// Resolution failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The agent is not in the file.
    #[error("agent {agent:?} is not configured; known agents: {known}")]
    UnknownAgent {
        /// The id asked for.
        agent: String,
        /// The ids in the file.
        known: String,
    },
    /// Values that contradict each other once layered.
    #[error("{0}")]
    Conflict(String),
}

/// A spec cannot be built from this resolution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Tools of this session run on the host: there is no sandbox spec.
    #[error("this session is not sandboxed ({0}): its tools run on the host, so there is no sandbox spec to build")]
    NotSandboxed(String),
    /// The image cannot be used.
    #[error("image {image:?}: {reason}")]
    Image {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
}

struct Pick<'a> {
    sources: &'a mut BTreeMap<String, Provenance>,
    agent: Option<&'a AgentEntry>,
}

impl Pick<'_> {
    /// The last set value among (security, defaults, agent, cli), else the
    /// builtin; records the provenance under `name`.
    #[allow(clippy::too_many_arguments)]
    fn pick<T: Clone>(
        &mut self,
        name: &str,
        sec: Option<(T, &str)>,
        def: Option<(T, &str)>,
        agent: Option<(T, &str)>,
        cli: Option<(T, &str)>,
        builtin: T,
    ) -> T {
        let mut out = (builtin, Provenance::builtin());
        if let Some((v, k)) = sec {
            out = (
                v,
                Provenance {
                    source: Source::Global,
                    key: format!("security.{k}"),
                },
            );
        }
        if let Some((v, k)) = def {
            out = (
                v,
                Provenance {
                    source: Source::Global,
                    key: format!("agents.defaults.sandbox.{k}"),
                },
            );
        }
        if let (Some((v, k)), Some(a)) = (agent, self.agent) {
            out = (
                v,
                Provenance {
                    source: Source::Agent(a.id.clone()),
                    key: format!("{}.sandbox.{k}", a.key),
                },
            );
        }
        if let Some((v, k)) = cli {
            out = (
                v,
                Provenance {
                    source: Source::CliFlag,
                    key: k.to_string(),
                },
            );
        }
        self.sources.insert(name.to_string(), out.1);
        out.0
    }
}

fn with<T>(v: Option<T>, k: &str) -> Option<(T, &str)> {
    v.map(|v| (v, k))
}

fn sender_ok(allow: &Option<AllowFrom>, sender: &Option<Sender>) -> bool {
    let Some(map) = allow else { return true };
    if map.is_empty() {
        return true;
    }
    let Some(s) = sender else { return false };
    let hit = |ids: &Vec<String>| ids.iter().any(|i| i == "*" || *i == s.id);
    map.get(&s.channel).is_some_and(hit) || map.get("*").is_some_and(hit)
}

/// Resolves the effective policy. Pure: reads nothing but its arguments.
pub fn resolve(config: &Config, req: &Request) -> Result<Resolved, ResolveError> {
    let agent: Option<&AgentEntry> = match &req.agent {
        Some(id) => Some(
            config
                .agents
                .get(id)
                .ok_or_else(|| ResolveError::UnknownAgent {
                    agent: id.clone(),
                    known: if config.agents.list.is_empty() {
                        "(none: add agents.list)".to_string()
                    } else {
                        config
                            .agents
                            .list
                            .iter()
                            .map(|a| a.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                })?,
        ),
        None => config.agents.list.iter().find(|a| a.default),
    };
    let sec = &config.security;
    let def = &config.agents.defaults.sandbox;
    let ag = agent.map(|a| &a.sandbox);
    let cli = &req.cli;
    let mut sources = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut p = Pick {
        sources: &mut sources,
        agent,
    };
    let main_session = req
        .main_session
        .clone()
        .or_else(|| config.session.main_key.clone())
        .unwrap_or_else(|| "main".to_string());
    let who = match agent {
        Some(a) => format!("agent {}", a.id),
        None => "the default agent".to_string(),
    };

    // Mode and whether this session is sandboxed.
    let mode = p.pick(
        "mode",
        None,
        with(def.mode, "mode"),
        with(ag.and_then(|s| s.mode), "mode"),
        None,
        SandboxMode::All,
    );
    let mode_key = p
        .sources
        .get("mode")
        .map(|x| x.key.clone())
        .unwrap_or_default();
    let sandboxed = match mode {
        SandboxMode::Off => false,
        SandboxMode::NonMain => req.session != main_session,
        SandboxMode::All => true,
    };
    match (mode, sandboxed) {
        (SandboxMode::Off, _) => warnings.push(format!(
            "NOT SANDBOXED: {who} has sandbox mode off ({mode_key}): its tools run ON THE HOST with nanoclaw's own privileges"
        )),
        (SandboxMode::NonMain, false) => warnings.push(format!(
            "NOT SANDBOXED: session {:?} is the main session and {who} has sandbox mode non-main ({mode_key}): its tools run ON THE HOST; every other session is sandboxed",
            req.session
        )),
        _ => {}
    }

    let scope = p.pick(
        "scope",
        None,
        with(def.scope, "scope"),
        with(ag.and_then(|s| s.scope), "scope"),
        None,
        Scope::Session,
    );
    let agent_id = agent
        .map(|a| a.id.clone())
        .unwrap_or_else(|| "default".to_string());
    let sandbox_key = match scope {
        Scope::Session => format!("agent:{agent_id}:session:{}", req.session),
        Scope::Agent => format!("agent:{agent_id}"),
        Scope::Shared => "shared".to_string(),
    };

    // Workspace.
    let workspace_access = p.pick(
        "workspace_access",
        None,
        with(def.workspace_access, "workspaceAccess"),
        with(ag.and_then(|s| s.workspace_access), "workspaceAccess"),
        with(cli.workspace_access, "--workspace-access"),
        WorkspaceAccess::None,
    );
    let mut mounts: Vec<ResolvedMount> = Vec::new();
    let workspace = if workspace_access == WorkspaceAccess::None {
        if cli.workspace.is_some() {
            warnings.push("--workspace is ignored because workspace access is none; add --workspace-access ro or rw".to_string());
        }
        None
    } else {
        let root = def
            .workspace_root
            .clone()
            .map(|r| (r, "agents.defaults.sandbox.workspaceRoot".to_string()));
        let root = ag
            .and_then(|s| s.workspace_root.clone())
            .map(|r| {
                (
                    r,
                    agent
                        .map(|a| format!("{}.sandbox.workspaceRoot", a.key))
                        .unwrap_or_default(),
                )
            })
            .or(root);
        let (dir, prov) = if let Some(w) = &cli.workspace {
            (
                w.clone(),
                Provenance {
                    source: Source::CliFlag,
                    key: "--workspace".into(),
                },
            )
        } else if let Some(w) = agent.and_then(|a| a.workspace.clone()) {
            let a = agent
                .map(|a| (a.id.clone(), a.key.clone()))
                .unwrap_or_default();
            (
                w,
                Provenance {
                    source: Source::Agent(a.0),
                    key: format!("{}.workspace", a.1),
                },
            )
        } else if let Some((r, key)) = root {
            let src = if key.starts_with("agents.defaults") {
                Source::Global
            } else {
                Source::Agent(agent_id.clone())
            };
            (r.join(&agent_id), Provenance { source: src, key })
        } else {
            (
                req.data_dir.join("workspaces").join(&agent_id),
                Provenance::builtin(),
            )
        };
        p.sources.insert("workspace".into(), prov.clone());
        mounts.push(ResolvedMount {
            mount: BindMount {
                host: dir.clone(),
                container: PathBuf::from("/workspace"),
                access: if workspace_access == WorkspaceAccess::Rw {
                    Access::Rw
                } else {
                    Access::Ro
                },
            },
            from: prov,
        });
        Some(dir)
    };

    // Bind mounts: global, then the agent's (not in shared scope), then CLI.
    let add = |mounts: &mut Vec<ResolvedMount>, warnings: &mut Vec<String>, m: ResolvedMount| {
        if let Some(i) = mounts
            .iter()
            .position(|x| x.mount.container == m.mount.container)
        {
            warnings.push(format!(
                "{} replaces the mount at {} from {}",
                m.from.key,
                m.mount.container.display(),
                mounts[i].from.key
            ));
            mounts.remove(i);
        }
        mounts.push(m);
    };
    for (i, b) in def.bind_mounts.iter().flatten().enumerate() {
        let from = Provenance {
            source: Source::Global,
            key: format!("agents.defaults.sandbox.bindMounts[{i}]"),
        };
        add(
            &mut mounts,
            &mut warnings,
            ResolvedMount {
                mount: b.clone(),
                from,
            },
        );
    }
    if let Some(a) = agent {
        if let Some(binds) = &a.sandbox.bind_mounts {
            if scope == Scope::Shared {
                if !binds.is_empty() {
                    warnings.push(format!(
                        "{}.sandbox.bindMounts ignored: scope is shared, and per-agent bind mounts would leak into every agent's sandbox; move them to agents.defaults.sandbox.bindMounts or use scope agent",
                        a.key
                    ));
                }
            } else {
                for (i, b) in binds.iter().enumerate() {
                    let from = Provenance {
                        source: Source::Agent(a.id.clone()),
                        key: format!("{}.sandbox.bindMounts[{i}]", a.key),
                    };
                    add(
                        &mut mounts,
                        &mut warnings,
                        ResolvedMount {
                            mount: b.clone(),
                            from,
                        },
                    );
                }
            }
        }
    }
    for b in &cli.mounts {
        let from = Provenance {
            source: Source::CliFlag,
            key: "--mount".into(),
        };
        add(
            &mut mounts,
            &mut warnings,
            ResolvedMount {
                mount: b.clone(),
                from,
            },
        );
    }
    let team = team_mounts(
        config,
        agent,
        scope,
        &req.data_dir,
        &mut mounts,
        &mut warnings,
    );

    // Limits.
    let memory = p.pick(
        "limits.memory",
        with(sec.memory_limit, "memory_limit"),
        with(def.memory, "memory"),
        with(ag.and_then(|s| s.memory), "memory"),
        with(cli.memory, "--memory"),
        spec::DEFAULT_MEMORY,
    );
    let memory_swap = p.pick(
        "limits.memory_swap",
        with(sec.memory_swap.map(Some), "memory_swap"),
        with(def.memory_swap.map(Some), "memorySwap"),
        with(ag.and_then(|s| s.memory_swap).map(Some), "memorySwap"),
        with(cli.memory_swap.map(Some), "--memory-swap"),
        None,
    );
    if let Some(sw) = memory_swap {
        if sw < memory {
            let mk = &p.sources["limits.memory"].key;
            let sk = &p.sources["limits.memory_swap"].key;
            return Err(ResolveError::Conflict(format!(
                "memory swap ({sk}) is smaller than the memory limit ({mk}); memory swap is memory plus swap, so raise it or set it equal to the memory limit"
            )));
        }
    }
    let cpus = p.pick(
        "limits.cpus",
        with(sec.cpu_limit, "cpu_limit"),
        with(def.cpus, "cpus"),
        with(ag.and_then(|s| s.cpus), "cpus"),
        with(cli.cpus, "--cpus"),
        spec::DEFAULT_CPUS,
    );
    let pids = p.pick(
        "limits.pids",
        with(sec.pids_limit, "pids_limit"),
        with(def.pids, "pids"),
        with(ag.and_then(|s| s.pids), "pids"),
        with(cli.pids, "--pids"),
        spec::DEFAULT_PIDS,
    );
    let timeout = p.pick(
        "limits.timeout",
        with(sec.timeout, "timeout"),
        with(def.timeout, "timeout"),
        with(ag.and_then(|s| s.timeout), "timeout"),
        with(cli.timeout, "--timeout"),
        spec::DEFAULT_TIMEOUT,
    );
    let tmpfs_size = p.pick(
        "limits.tmpfs_size",
        with(sec.tmpfs_size, "tmpfs_size"),
        with(def.tmpfs_size, "tmpfsSize"),
        with(ag.and_then(|s| s.tmpfs_size), "tmpfsSize"),
        with(cli.tmpfs_size, "--tmpfs-size"),
        spec::DEFAULT_TMPFS_SIZE,
    );
    let output_limit = p.pick(
        "limits.output_limit",
        with(sec.output_limit, "output_limit"),
        with(def.output_limit, "outputLimit"),
        with(ag.and_then(|s| s.output_limit), "outputLimit"),
        with(cli.output_limit, "--output-limit"),
        spec::DEFAULT_OUTPUT_LIMIT,
    );
    let limits = ResolvedLimits {
        memory,
        memory_swap,
        cpus,
        pids,
        timeout,
        tmpfs_size,
        output_limit,
    };

    // Network.
    let setting = p.pick(
        "network",
        with(sec.network_mode, "network_mode"),
        with(def.network, "network"),
        with(ag.and_then(|s| s.network), "network"),
        with(cli.network.map(NetworkSetting::Mode), "--network"),
        NetworkSetting::Mode(NetworkMode::None),
    );
    let cli_hosts = (!cli.allow_hosts.is_empty()).then(|| cli.allow_hosts.clone());
    let allowed_hosts = p.pick(
        "network.allowed_hosts",
        with(sec.allowed_hosts.clone(), "allowed_hosts"),
        with(def.allowed_hosts.clone(), "allowedHosts"),
        with(ag.and_then(|s| s.allowed_hosts.clone()), "allowedHosts"),
        with(cli_hosts, "--allow-host"),
        Vec::new(),
    );
    let net_key = p.sources["network"].key.clone();
    let net_mode = match setting {
        NetworkSetting::Mode(m) => m,
        NetworkSetting::Bridge => {
            let m = if allowed_hosts.is_empty() {
                NetworkMode::Open
            } else {
                NetworkMode::Allowlist
            };
            warnings.push(format!(
                "{net_key}: \"bridge\" is deprecated; read as {} because {}; write {} instead",
                m.as_str(),
                if allowed_hosts.is_empty() {
                    "no allowed hosts are listed"
                } else {
                    "allowed hosts are listed"
                },
                m.as_str()
            ));
            m
        }
    };
    match net_mode {
        NetworkMode::None if !allowed_hosts.is_empty() => warnings.push(format!(
            "allowed hosts are ignored because the network is none ({net_key}); set network: allowlist to use them"
        )),
        NetworkMode::Allowlist if allowed_hosts.is_empty() => warnings.push(format!(
            "network is allowlist ({net_key}) but no hosts are allowed: nothing outside is reachable"
        )),
        NetworkMode::Open => warnings.push(format!("network is open ({net_key}): sandboxed code can reach any host")),
        _ => {}
    }
    let rules = merged_rules(
        &config.network.rules,
        [
            def.network_rules.as_deref(),
            ag.and_then(|s| s.network_rules.as_deref()),
        ],
    );
    let (egress, credential_rules) = egress_rules(
        &rules,
        config.network.upstream_ca.as_ref(),
        net_mode,
        &mut warnings,
    );
    let network = ResolvedNetwork {
        mode: net_mode,
        allowed_hosts: if net_mode == NetworkMode::Allowlist {
            allowed_hosts
        } else {
            Vec::new()
        },
        credential_rules,
        egress,
    };

    let image = p.pick(
        "image",
        None,
        with(def.image.clone().map(Some), "image"),
        with(ag.and_then(|s| s.image.clone()).map(Some), "image"),
        with(cli.image.clone().map(Some), "--image"),
        None,
    );
    let image = image.filter(|i| i != "host");
    let backend = p.pick(
        "backend",
        None,
        with(def.backend.clone(), "backend"),
        with(ag.and_then(|s| s.backend.clone()), "backend"),
        with(cli.backend.clone(), "--backend"),
        "native".to_string(),
    );
    let setup_command = p.pick(
        "setup_command",
        None,
        with(def.setup_command.clone().map(Some), "setupCommand"),
        with(
            ag.and_then(|s| s.setup_command.clone()).map(Some),
            "setupCommand",
        ),
        None,
        None,
    );
    // With an image, setupCommand is applied once and cached as an image
    // layer; with the host root it runs once in each new scoped sandbox
    // (`nanoclaw run/exec --agent`), before its first command.
    let prune = p.pick(
        "prune",
        None,
        with(def.prune, "prune"),
        with(ag.and_then(|s| s.prune), "prune"),
        None,
        Prune {
            idle_hours: Some(24.0),
            max_age_days: Some(7.0),
        },
    );

    // Hardening (global only, plus CLI).
    let mut cap_add = sec.cap_add.clone();
    for c in &cli.cap_add {
        if !cap_add.contains(c) {
            cap_add.push(c.clone());
        }
    }
    let seccomp = sec
        .seccomp_profile
        .clone()
        .unwrap_or(SeccompSetting::Default);
    if seccomp == SeccompSetting::Unconfined {
        warnings.push("seccomp is unconfined (security.seccomp_profile): the whole kernel is exposed to sandboxed code".to_string());
    }

    // Tools.
    let mut layers = Vec::new();
    let mut push = |source: Source, key: String, t: &ToolsSection| {
        let allow = t.allow.clone().unwrap_or_default();
        let deny = t.deny.clone().unwrap_or_default();
        if !allow.is_empty() || !deny.is_empty() {
            layers.push(ToolLayer {
                source,
                key,
                allow,
                deny,
            });
        }
    };
    push(Source::Global, "tools".into(), &config.tools);
    push(
        Source::Global,
        "agents.defaults.tools".into(),
        &config.agents.defaults.tools,
    );
    if let Some(a) = agent {
        push(
            Source::Agent(a.id.clone()),
            format!("{}.tools", a.key),
            &a.tools,
        );
    }
    if workspace_access == WorkspaceAccess::Ro {
        let prov = p.sources["workspace_access"].clone();
        layers.push(ToolLayer {
            source: prov.source,
            key: format!("{}=ro", prov.key),
            allow: Vec::new(),
            deny: ["write", "edit", "apply_patch", "write_file", "edit_file"]
                .map(String::from)
                .to_vec(),
        });
    }
    if !cli.deny_tools.is_empty() {
        layers.push(ToolLayer {
            source: Source::CliFlag,
            key: "--deny-tool".into(),
            allow: Vec::new(),
            deny: cli
                .deny_tools
                .iter()
                .map(|t| crate::tools::normalize(t))
                .collect(),
        });
    }
    let tools = ToolPolicy { layers };
    let tool_rules = tool_rules(config, agent);

    // Elevated: only exec; global and agent gates; never overrides deny.
    let g = config.tools.elevated.clone().unwrap_or_default();
    let (a_el, a_key) =
        match agent.and_then(|a| a.tools.elevated.clone().map(|e| (e, a.key.clone()))) {
            Some((e, k)) => (e, format!("{k}.tools.elevated")),
            None => (
                config
                    .agents
                    .defaults
                    .tools
                    .elevated
                    .clone()
                    .unwrap_or_default(),
                match agent {
                    Some(a) => format!("{}.tools.elevated", a.key),
                    None => "agents.defaults.tools.elevated".to_string(),
                },
            ),
        };
    let mut failing = Vec::new();
    if !sandboxed {
        failing.push(FailingGate {
            gate: ElevatedGate::NotSandboxed,
            key: mode_key.clone(),
        });
    }
    if g.enabled != Some(true) {
        failing.push(FailingGate {
            gate: ElevatedGate::GlobalDisabled,
            key: "tools.elevated.enabled".to_string(),
        });
    }
    if !sender_ok(&g.allow_from, &req.sender) {
        failing.push(FailingGate {
            gate: ElevatedGate::GlobalAllowFrom,
            key: "tools.elevated.allowFrom".to_string(),
        });
    }
    if a_el.enabled != Some(true) {
        failing.push(FailingGate {
            gate: ElevatedGate::AgentDisabled,
            key: format!("{a_key}.enabled"),
        });
    }
    if !sender_ok(&a_el.allow_from, &req.sender) {
        failing.push(FailingGate {
            gate: ElevatedGate::AgentAllowFrom,
            key: format!("{a_key}.allowFrom"),
        });
    }
    match tools.decide("exec") {
        ToolDecision::Allowed => {}
        ToolDecision::Denied { key, .. } => failing.push(FailingGate {
            gate: ElevatedGate::ExecDenied,
            key: format!("{key}.deny"),
        }),
        ToolDecision::NotInAllowList { key, .. } => failing.push(FailingGate {
            gate: ElevatedGate::ExecNotAllowed,
            key: format!("{key}.allow"),
        }),
    }
    let elevated = ElevatedStatus {
        allowed: failing.is_empty(),
        failing_gate: failing.first().map(|f| f.gate.clone()),
        failing,
    };

    Ok(Resolved {
        agent: agent.map(|a| a.id.clone()),
        team,
        session: req.session.clone(),
        main_session,
        sandboxed,
        mode,
        scope,
        sandbox_key,
        workspace_access,
        workspace,
        mounts,
        limits,
        network,
        image,
        backend,
        setup_command,
        prune,
        cap_add,
        seccomp,
        tools,
        tool_rules,
        elevated,
        sources,
        warnings,
    })
}

/// One argument rule or approval setting of a tool-policy layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolRule {
    /// The config key (`agents.list[0].tools.http`).
    pub key: String,
    /// What it says, in words.
    pub rule: String,
}

/// The argument rules and approval settings of every layer, in order.
fn tool_rules(config: &Config, agent: Option<&AgentEntry>) -> Vec<ToolRule> {
    let mut layers = vec![
        ("tools".to_string(), &config.tools),
        (
            "agents.defaults.tools".to_string(),
            &config.agents.defaults.tools,
        ),
    ];
    if let Some(a) = agent {
        layers.push((format!("{}.tools", a.key), &a.tools));
    }
    let mut out = Vec::new();
    let mut push = |key: String, rule: String| out.push(ToolRule { key, rule });
    for (key, t) in layers {
        if let Some(ask) = &t.ask {
            let list: Vec<String> = ask
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str()))
                .collect();
            push(
                format!("{key}.ask"),
                format!("ask a person: {}", list.join(", ")),
            );
        }
        if let Some(a) = &t.approved {
            push(
                format!("{key}.approved"),
                format!("exec lines approved in advance: {}", a.join(" | ")),
            );
        }
        if let Some(h) = &t.http {
            push(
                format!("{key}.http"),
                format!("http_request only: {}", h.join(", ")),
            );
        }
        if let Some(p) = &t.paths {
            if let Some(r) = &p.read {
                push(
                    format!("{key}.paths.read"),
                    format!("file tools read only under: {}", r.join(", ")),
                );
            }
            if let Some(w) = &p.write {
                push(
                    format!("{key}.paths.write"),
                    format!("file tools write only under: {}", w.join(", ")),
                );
            }
        }
    }
    out
}

/// Where teams' shared spaces live on the host.
pub fn teams_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("teams")
}

/// The team's space at `/team` and each granted team's at `/teams/<name>`
/// (not in shared scope: one sandbox for every agent would carry them to
/// agents of other teams). Returns the team.
fn team_mounts(
    config: &Config,
    agent: Option<&AgentEntry>,
    scope: Scope,
    data_dir: &std::path::Path,
    mounts: &mut Vec<ResolvedMount>,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let a = agent?;
    let team = a.team.clone()?;
    if scope == Scope::Shared {
        warnings.push(format!(
            "{}.team: the team's space is not mounted, because scope is shared (one sandbox for every agent); use scope agent or session",
            a.key
        ));
        return Some(team);
    }
    let root = teams_dir(data_dir);
    mounts.push(ResolvedMount {
        mount: BindMount {
            host: root.join(&team),
            container: PathBuf::from("/team"),
            access: Access::Rw,
        },
        from: Provenance {
            source: Source::Agent(a.id.clone()),
            key: format!("{}.team", a.key),
        },
    });
    let grants = config
        .teams
        .get(&team)
        .map(|t| t.grants.as_slice())
        .unwrap_or_default();
    for (i, g) in grants.iter().enumerate() {
        mounts.push(ResolvedMount {
            mount: BindMount {
                host: root.join(&g.team),
                container: PathBuf::from("/teams").join(&g.team),
                access: g.access,
            },
            from: Provenance {
                source: Source::Global,
                key: format!("teams.{team}.grants[{i}]"),
            },
        });
    }
    Some(team)
}

impl Resolved {
    /// The source of a value (`mode`, `limits.memory`, ...).
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.get(name).map(|p| &p.source)
    }

    fn explicit(&self, name: &str) -> bool {
        self.source(name)
            .is_some_and(|s| *s != Source::BuiltinDefault)
    }

    /// The engine spec for `command` with the host root. Errors when the
    /// session is not sandboxed, or asks for what the engine cannot do yet.
    pub fn to_spec(&self, command: Vec<String>) -> Result<SandboxSpec, SpecError> {
        self.to_spec_with(command, &|image| {
            Err(format!(
                "no image store was given to resolve {image} (use to_spec_with, as `nanoclaw run --config` does), or set image: host for the host root"
            ))
        })
    }

    /// Like [`Resolved::to_spec`], with `image_root` turning an image
    /// reference into a root.
    pub fn to_spec_with(
        &self,
        command: Vec<String>,
        image_root: &dyn Fn(&str) -> Result<Root, String>,
    ) -> Result<SandboxSpec, SpecError> {
        if !self.sandboxed {
            let key = self
                .sources
                .get("mode")
                .map(|p| p.key.clone())
                .unwrap_or_default();
            return Err(SpecError::NotSandboxed(format!(
                "sandbox mode {} set by {key}",
                self.mode.as_str()
            )));
        }
        let network = match self.network.mode {
            NetworkMode::None => spec::Network::None,
            NetworkMode::Allowlist => {
                let (cidrs, hosts) = split_allowed(&self.network.allowed_hosts);
                spec::Network::Allowlist {
                    hosts,
                    cidrs,
                    limits: spec::NetLimits::default(),
                    add_hosts: Vec::new(),
                }
            }
            NetworkMode::Open => spec::Network::Open {
                limits: spec::NetLimits::default(),
            },
        };
        let root = match &self.image {
            None => Root::Host,
            Some(i) => image_root(i).map_err(|reason| SpecError::Image {
                image: i.clone(),
                reason,
            })?,
        };
        let mut s = SandboxSpec::new(command);
        s.root = root;
        s.network = network;
        if !matches!(s.network, spec::Network::None) {
            s.egress = self.network.egress.clone();
        }
        s.mounts = self
            .mounts
            .iter()
            .map(|m| Mount {
                source: m.mount.host.clone(),
                target: m.mount.container.clone(),
                access: m.mount.access,
            })
            .collect();
        s.limits = Limits {
            memory: Some(self.limits.memory),
            memory_swap: self.limits.memory_swap,
            cpus: Some(self.limits.cpus),
            pids: Some(self.limits.pids),
            timeout: self.limits.timeout,
            tmpfs_size: self.limits.tmpfs_size,
            output_limit: self.limits.output_limit,
            explicit: ExplicitLimits {
                memory: self.explicit("limits.memory") || self.explicit("limits.memory_swap"),
                cpus: self.explicit("limits.cpus"),
                pids: self.explicit("limits.pids"),
            },
        };
        s.hardening = Hardening {
            seccomp: match &self.seccomp {
                SeccompSetting::Default => Seccomp::Default,
                SeccompSetting::Unconfined => Seccomp::Unconfined,
                SeccompSetting::Profile(p) => Seccomp::Profile(p.clone()),
            },
            cap_add: self.cap_add.clone(),
            ..Hardening::default()
        };
        Ok(s)
    }

    /// True when the workspace folder is derived by nanoclaw (under the data
    /// dir or a `workspaceRoot`) and so may be created on first use; an
    /// agent's `workspace` or `--workspace` must already exist.
    pub fn workspace_is_default(&self) -> bool {
        self.workspace.is_some()
            && self.sources.get("workspace").is_some_and(|p| {
                p.source == Source::BuiltinDefault || p.key.ends_with("workspaceRoot")
            })
    }
}

/// The top-level `network.rules`, then `agents.defaults`' and the agent's
/// own (`sandbox.network.rules`): a later rule for a domain replaces an
/// earlier one for the same domain whole, so an agent can use a credential
/// of its own instead of the one every agent gets.
fn merged_rules(
    top: &[crate::model::NetworkRule],
    layers: [Option<&[crate::model::NetworkRule]>; 2],
) -> Vec<crate::model::NetworkRule> {
    let mut out: Vec<crate::model::NetworkRule> = top.to_vec();
    for r in layers.into_iter().flatten().flatten() {
        match out
            .iter_mut()
            .find(|o| o.domain.eq_ignore_ascii_case(&r.domain))
        {
            Some(o) => *o = r.clone(),
            None => out.push(r.clone()),
        }
    }
    out
}

/// `rules` (merged by [`merged_rules`]) as the engine's [`Egress`]
/// (checked when the config was decoded), and their description (domains
/// and header names only). With network `none` they are dropped, with a
/// warning.
fn egress_rules(
    rules: &[crate::model::NetworkRule],
    upstream_ca: Option<&PathBuf>,
    mode: NetworkMode,
    warnings: &mut Vec<String>,
) -> (nanoclaw_sandbox::spec::Egress, Vec<String>) {
    use nanoclaw_sandbox::net::{HeaderRule, HeaderRules};
    if rules.is_empty() {
        return Default::default();
    }
    if mode == NetworkMode::None {
        warnings.push(
            "network.rules do nothing here: this sandbox has no network (mode none)".to_string(),
        );
    }
    let describe = rules
        .iter()
        .map(|r| {
            let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
            format!("{}: {}", r.domain, names.join(", "))
        })
        .collect();
    let header_rules = rules
        .iter()
        .map(|r| HeaderRule {
            domain: r.domain.clone(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
        })
        .collect();
    match HeaderRules::new(header_rules) {
        Ok(rules) => (
            nanoclaw_sandbox::spec::Egress {
                rules,
                upstream_ca: upstream_ca.cloned(),
            },
            describe,
        ),
        Err(e) => {
            warnings.push(format!("network.rules ignored: {e}"));
            Default::default()
        }
    }
}

/// Splits `allowed_hosts` entries into CIDR rules (addresses, with `/32` or
/// `/128` added to a bare address) and host-name rules.
fn split_allowed(entries: &[String]) -> (Vec<String>, Vec<String>) {
    let mut cidrs = Vec::new();
    let mut hosts = Vec::new();
    for e in entries {
        // `[v6]:port`, `v4:port`, `v4`, `v6`, `cidr[:port]`.
        let (addr, port) = if let Some(rest) = e.strip_prefix('[') {
            match rest.split_once(']') {
                Some((a, p)) => (a.to_string(), p.strip_prefix(':').map(str::to_string)),
                None => (e.clone(), None),
            }
        } else if e.matches(':').count() == 1 {
            let (a, p) = e.split_once(':').unwrap_or((e, ""));
            (a.to_string(), Some(p.to_string()))
        } else {
            (e.clone(), None)
        };
        let bare = addr.split('/').next().unwrap_or("");
        match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let with_prefix = if addr.contains('/') {
                    addr.clone()
                } else if ip.is_ipv4() {
                    format!("{addr}/32")
                } else {
                    format!("{addr}/128")
                };
                let with_prefix = if ip.is_ipv6() && port.is_some() {
                    format!("[{with_prefix}]")
                } else {
                    with_prefix
                };
                cidrs.push(match port {
                    Some(p) => format!("{with_prefix}:{p}"),
                    None => with_prefix,
                });
            }
            Err(_) => hosts.push(e.clone()),
        }
    }
    (cidrs, hosts)
}

#[cfg(test)]
mod split_tests {
    use super::split_allowed;

    #[test]
    fn addresses_become_cidrs_and_names_stay_hosts() {
        let v: Vec<String> = [
            "api.anthropic.com",
            "10.0.0.5:5432",
            "10.1.0.0/16",
            "*.pypi.org:443",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (c, h) = split_allowed(&v);
        assert_eq!(c, vec!["10.0.0.5/32:5432", "10.1.0.0/16"]);
        assert_eq!(h, vec!["api.anthropic.com", "*.pypi.org:443"]);
    }
}
