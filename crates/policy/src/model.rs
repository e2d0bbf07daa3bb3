//! The configuration model: what `nanoclaw.yaml` says, after parsing and
//! validation. Every field is optional where the file may leave it out;
//! defaults are applied by [`crate::resolve`], which also records where
//! each effective value came from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Where tools run (OpenClaw's `sandbox.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxMode {
    /// No sandbox: tools run on the host. Only when the operator says so.
    Off,
    /// Every session except the main one is sandboxed.
    NonMain,
    /// Every session is sandboxed (nanoclaw's built-in default).
    All,
}

impl SandboxMode {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Off => "off",
            SandboxMode::NonMain => "non-main",
            SandboxMode::All => "all",
        }
    }
}

/// How sandboxes are shared (OpenClaw's `sandbox.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One sandbox per session (default).
    Session,
    /// One sandbox per agent.
    Agent,
    /// One sandbox shared by every agent; per-agent bind mounts are ignored.
    Shared,
}

impl Scope {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Session => "session",
            Scope::Agent => "agent",
            Scope::Shared => "shared",
        }
    }
}

/// How the agent's workspace is visible inside the sandbox (at `/workspace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceAccess {
    /// Not mounted (default).
    None,
    /// Read-only; the write, edit and apply_patch tools are denied.
    Ro,
    /// Read-write.
    Rw,
}

impl WorkspaceAccess {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceAccess::None => "none",
            WorkspaceAccess::Ro => "ro",
            WorkspaceAccess::Rw => "rw",
        }
    }
}

/// Effective network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Loopback only (default).
    None,
    /// Egress only to the allowed hosts.
    Allowlist,
    /// Full egress (explicit opt-in).
    Open,
}

impl NetworkMode {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Allowlist => "allowlist",
            NetworkMode::Open => "open",
        }
    }
}

/// A network value as written: nanoclaw's modes, or Docker's `bridge`
/// (seeds 000 and 003), which means `allowlist` when allowed hosts are
/// listed and `open` otherwise (deprecated, with a warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkSetting {
    /// A nanoclaw mode.
    Mode(NetworkMode),
    /// Docker's `bridge`.
    Bridge,
}

/// Read-only or read-write.
pub use nanoclaw_sandbox::spec::Access;

/// One `HOST:CONTAINER[:ro|rw]` bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Host path, as written (after `~` expansion).
    pub host: PathBuf,
    /// Absolute path inside the sandbox (lexically normalised).
    pub container: PathBuf,
    /// Read-only (default) or read-write.
    pub access: Access,
}

impl BindMount {
    /// `host:container:ro|rw`.
    pub fn display(&self) -> String {
        format!(
            "{}:{}:{}",
            self.host.display(),
            self.container.display(),
            match self.access {
                Access::Ro => "ro",
                Access::Rw => "rw",
            }
        )
    }
}

/// Sandbox garbage collection (OpenClaw's `sandbox.prune`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Prune {
    /// Remove a sandbox idle for this many hours.
    pub idle_hours: Option<f64>,
    /// Remove a sandbox older than this many days.
    pub max_age_days: Option<f64>,
}

/// The backends `sandbox.backend` names (whether this build has each is
/// the CLI's business: `nanoclaw doctor`).
pub const BACKENDS: [&str; 5] = ["native", "docker", "gvisor", "microvm", "kubernetes"];

/// `sandbox` of `agents.defaults` or of one agent. `None` = not set here.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SandboxSection {
    /// `mode`.
    pub mode: Option<SandboxMode>,
    /// `scope`.
    pub scope: Option<Scope>,
    /// `workspaceAccess`.
    pub workspace_access: Option<WorkspaceAccess>,
    /// `workspaceRoot`: host folder holding agents' workspaces.
    pub workspace_root: Option<PathBuf>,
    /// `bindMounts`.
    pub bind_mounts: Option<Vec<BindMount>>,
    /// `network`.
    pub network: Option<NetworkSetting>,
    /// `allowedHosts`.
    pub allowed_hosts: Option<Vec<String>>,
    /// `network.rules` (the map form of `network`): this sandbox's own
    /// credential rules, added to the top-level `network.rules` (a domain
    /// named in both takes this one's headers).
    pub network_rules: Option<Vec<NetworkRule>>,
    /// `setupCommand`.
    pub setup_command: Option<String>,
    /// `image`.
    pub image: Option<String>,
    /// `backend`: what runs the sandbox (`native`, `docker`, `gvisor`,
    /// `microvm`, `kubernetes`; [`BACKENDS`]).
    pub backend: Option<String>,
    /// `prune`.
    pub prune: Option<Prune>,
    /// `memory`.
    pub memory: Option<u64>,
    /// `memorySwap`.
    pub memory_swap: Option<u64>,
    /// `cpus`.
    pub cpus: Option<f64>,
    /// `pids`.
    pub pids: Option<u64>,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `tmpfsSize`.
    pub tmpfs_size: Option<u64>,
    /// `outputLimit`.
    pub output_limit: Option<u64>,
    /// `dangerouslyAllowUnsafeBinds`.
    pub dangerously_allow_unsafe_binds: Option<bool>,
}

/// Who may use elevated mode, per channel (`allowFrom`). The channel `*`
/// or the id `*` match anyone.
pub type AllowFrom = BTreeMap<String, Vec<String>>;

/// `tools.elevated`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ElevatedSection {
    /// `enabled`.
    pub enabled: Option<bool>,
    /// `allowFrom`.
    pub allow_from: Option<AllowFrom>,
}

/// When a tool call needs a person's approval (`tools.ask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AskMode {
    /// Never asked.
    Off,
    /// Asked unless the exact call was approved before ("allow always",
    /// or listed in `tools.approved`).
    OnMiss,
    /// Asked every time.
    Always,
}

impl AskMode {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            AskMode::Off => "off",
            AskMode::OnMiss => "on-miss",
            AskMode::Always => "always",
        }
    }
}

/// `tools.paths`: path prefixes (inside the sandbox) the file tools may
/// read and write. Absent: no restriction beyond the sandbox's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PathRules {
    /// `read` (also what `list_files` may list).
    pub read: Option<Vec<String>>,
    /// `write` (`write_file`, `edit_file`).
    pub write: Option<Vec<String>>,
}

/// `tools` (top level, `agents.defaults.tools` or one agent's).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ToolsSection {
    /// `allow`: tool names and `group:*` shorthands (normalised).
    pub allow: Option<Vec<String>>,
    /// `deny`.
    pub deny: Option<Vec<String>>,
    /// `elevated`.
    pub elevated: Option<ElevatedSection>,
    /// `ask`: tool name (or `*`) → when to ask a person.
    pub ask: Option<BTreeMap<String, AskMode>>,
    /// `approved`: exact `exec` command lines approved in advance.
    pub approved: Option<Vec<String>>,
    /// `http`: `http_request` rules, `METHOD host[/path]` (`*` and
    /// `*.domain` wildcards, a trailing `*` in the path); when set, a
    /// request must match one.
    pub http: Option<Vec<String>>,
    /// `paths`: prefixes the file tools may read and write.
    pub paths: Option<PathRules>,
}

/// What an agent's runs may spend (`budget`); absent fields: no limit
/// beyond the built-in ones of the agent runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Budget {
    /// `turns`: model calls per run.
    pub turns: Option<u32>,
    /// `tokens`: tokens (in + out) per run.
    pub tokens: Option<u64>,
    /// `wallTime`: wall-clock time per run.
    pub wall_time: Option<Duration>,
    /// `dailyTokens`: tokens per agent per UTC day.
    pub daily_tokens: Option<u64>,
    /// `dailySpend`: money per agent per UTC day (in the unit of
    /// `llm.prices`, e.g. USD).
    pub daily_spend: Option<f64>,
}

/// `llm.prices`: cost per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Prices {
    /// `input`: per million prompt tokens.
    pub input: f64,
    /// `output`: per million answer tokens.
    pub output: f64,
}

/// One agent (`agents.list[]` entry, or `agents.<id>` as in seed 003).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentEntry {
    /// `id`.
    pub id: String,
    /// `name` (display only).
    pub name: Option<String>,
    /// `default: true` marks the agent used when none is named.
    pub default: bool,
    /// `workspace`: this agent's host workspace folder.
    pub workspace: Option<PathBuf>,
    /// `sandbox`.
    pub sandbox: SandboxSection,
    /// `tools`.
    pub tools: ToolsSection,
    /// `llm`: overrides of the top-level `llm` for this agent.
    pub llm: Option<Llm>,
    /// `system`: the agent's system prompt.
    pub system: Option<String>,
    /// `budget`.
    pub budget: Budget,
    /// `team`.
    pub team: Option<String>,
    /// Key path of the entry in the file (`agents.list[0]` or `agents.scraper`).
    pub key: String,
}

/// `agents.defaults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentDefaults {
    /// `sandbox`.
    pub sandbox: SandboxSection,
    /// `tools`.
    pub tools: ToolsSection,
    /// `budget`.
    pub budget: Budget,
}

/// `agents`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Agents {
    /// `defaults`.
    pub defaults: AgentDefaults,
    /// The agents, in file order.
    pub list: Vec<AgentEntry>,
}

impl Agents {
    /// The agent with this id.
    pub fn get(&self, id: &str) -> Option<&AgentEntry> {
        self.list.iter().find(|a| a.id == id)
    }
}

/// Seccomp as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompSetting {
    /// nanoclaw's built-in profile.
    Default,
    /// No filter (loudly warned about).
    Unconfined,
    /// A Docker-format JSON profile.
    Profile(PathBuf),
}

/// `security` (NanoClaw vocabulary, seed 000): defaults for every sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Security {
    /// `cpu_limit`, in cpus.
    pub cpu_limit: Option<f64>,
    /// `cpu_shares` (relative weight, 2..=262144; parsed, not enforced by
    /// the native engine).
    pub cpu_shares: Option<u64>,
    /// `memory_limit`, bytes.
    pub memory_limit: Option<u64>,
    /// `memory_swap`, bytes (memory + swap, Docker semantics).
    pub memory_swap: Option<u64>,
    /// `pids_limit`.
    pub pids_limit: Option<u64>,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `network_mode`.
    pub network_mode: Option<NetworkSetting>,
    /// `allowed_hosts`.
    pub allowed_hosts: Option<Vec<String>>,
    /// `read_only` (the root is always read-only; `false` is a warning).
    pub read_only: Option<bool>,
    /// `tmpfs_size`, bytes.
    pub tmpfs_size: Option<u64>,
    /// `output_limit`, bytes per stream.
    pub output_limit: Option<u64>,
    /// `privileged` (only `false` is accepted).
    pub privileged: Option<bool>,
    /// `cap_drop` (everything is dropped anyway).
    pub cap_drop: Vec<String>,
    /// `cap_add`: capabilities inside the sandbox's user namespace.
    pub cap_add: Vec<String>,
    /// `seccomp_profile`.
    pub seccomp_profile: Option<SeccompSetting>,
    /// `blkio_weight` (10..=1000; parsed, not enforced by the native engine).
    pub blkio_weight: Option<u64>,
    /// `dangerouslyAllowUnsafeBinds` at the global level.
    pub dangerously_allow_unsafe_binds: Option<bool>,
}

/// `execution.preload_images`: `true`/`false` (all configured language
/// images) or a list of image references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PreloadImages {
    /// All or none of the language images.
    All(bool),
    /// These images.
    List(Vec<String>),
}

/// `execution` (used by later issues; parsed and validated now).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Execution {
    /// Language name to image reference or host interpreter path. A list
    /// of images (seed 000) is keyed by the image name (`golang` → `go`).
    pub languages: BTreeMap<String, String>,
    /// `preload_images`.
    pub preload_images: Option<PreloadImages>,
    /// `pool_size` (warm sandboxes), 0..=1024.
    pub pool_size: Option<u32>,
}

/// `llm` (used by the agent later; validated now). The API key is a
/// [`Secret`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Llm {
    /// `provider`.
    pub provider: Option<String>,
    /// `api_key` (never printed).
    pub api_key: Option<Secret>,
    /// `model`.
    pub model: Option<String>,
    /// `base_url`.
    pub base_url: Option<String>,
    /// `max_tokens`: bound on each answer.
    pub max_tokens: Option<u32>,
    /// `prices`: for spend accounting and `budget.dailySpend`.
    pub prices: Option<Prices>,
}

impl Llm {
    /// `self` with every field `over` sets replaced by it.
    pub fn overridden_by(&self, over: &Llm) -> Llm {
        Llm {
            provider: over.provider.clone().or_else(|| self.provider.clone()),
            api_key: over.api_key.clone().or_else(|| self.api_key.clone()),
            model: over.model.clone().or_else(|| self.model.clone()),
            base_url: over.base_url.clone().or_else(|| self.base_url.clone()),
            max_tokens: over.max_tokens.or(self.max_tokens),
            prices: over.prices.or(self.prices),
        }
    }
}

/// `session`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SessionSection {
    /// `mainKey`: the key of the main session (default `main`).
    pub main_key: Option<String>,
}

/// What one team grants another: the other's shared space, mounted at
/// `/teams/<team>` in this team's members' sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeamGrant {
    /// The team whose space is shared.
    pub team: String,
    /// `ro` or `rw`.
    pub access: Access,
}

/// `teams.<name>`: a team's shared space (`<data>/teams/<name>`, mounted
/// read-write at `/team` for its members) and the spaces of other teams it
/// may see (explicit grants only).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Team {
    /// `grants`: other teams' spaces this team's members see.
    pub grants: Vec<TeamGrant>,
}

/// A whole `nanoclaw.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Config {
    /// `security`.
    pub security: Security,
    /// `execution`.
    pub execution: Execution,
    /// `llm`.
    pub llm: Llm,
    /// `agents`.
    pub agents: Agents,
    /// Top-level `tools`: the global tool policy and the global elevated gate.
    pub tools: ToolsSection,
    /// `session`.
    pub session: SessionSection,
    /// `teams`.
    pub teams: BTreeMap<String, Team>,
    /// Top-level `network`: credential rules applied at the egress proxy.
    pub network: NetworkSection,
    /// Top-level `kubernetes`: where `sandbox.backend: kubernetes` makes
    /// its Pods.
    pub kubernetes: KubernetesSection,
}

/// Top-level `kubernetes`: the cluster, namespace and RuntimeClass of the
/// kubernetes backend's sandbox Pods. Unset fields fall back to
/// `KUBECONFIG` and the kubeconfig's own context and namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KubernetesSection {
    /// `kubeconfig`: an absolute path.
    pub kubeconfig: Option<PathBuf>,
    /// `context`: the kubeconfig context.
    pub context: Option<String>,
    /// `namespace`.
    pub namespace: Option<String>,
    /// `runtimeClassName` of every sandbox Pod (e.g. `gvisor`, `kata`).
    pub runtime_class_name: Option<String>,
    /// `imagePullPolicy`: `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: Option<String>,
}

/// Top-level `network`: credentials added at the network boundary, so
/// that secrets never enter a sandbox (E2B's `network.rules`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetworkSection {
    /// `rules`: per domain, the headers set on every request to it.
    pub rules: Vec<NetworkRule>,
    /// `upstream_ca`: a PEM file of extra CAs trusted when verifying an
    /// intercepted host (besides the host's trust store).
    pub upstream_ca: Option<PathBuf>,
}

/// One `network.rules` entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkRule {
    /// The domain (`api.github.com`, `*.example.com`).
    pub domain: String,
    /// Header name → value (`${VAR}` expanded at load; never printed).
    pub headers: Vec<(String, Secret)>,
}
