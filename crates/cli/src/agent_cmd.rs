//! `nanoclaw agent`: persistent agents (create, ls, show, rm), runs (`run`,
//! and seed 000's `execute`), and approvals (`approvals`, `approve`).
//!
//! A run: the config is loaded; the agent is found in the store (made on
//! first use for an agent the config names); an agent the config does not
//! name (one made by `agent create` or by another agent) is added to the
//! loaded config as a copy of its base with its own workspace and at most
//! the hosts it was given; its policy is resolved like any other; its
//! scoped sandbox is found or made by a keeper; the loop runs every tool
//! call through the gate, the approver and the sandbox, and writes the
//! audit log in the data folder.

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use nanoclaw_agent::approval::{Answer, ApprovalRequest, Approver, Nobody};
use nanoclaw_agent::audit::{AuditEvent, AuditSink};
use nanoclaw_agent::gate::{AgentPolicy, Layered};
use nanoclaw_agent::host::ExecHost;
use nanoclaw_agent::provider::{self, Kind, Message, ProviderConfig, Role};
use nanoclaw_agent::run::{self as agent_run, Agent, Limits, Progress, Report, Stop};
use nanoclaw_agent::store::{self, AgentRecord, QueueApprover, Store};
use nanoclaw_policy::model::{AgentEntry, Config, NetworkMode, NetworkSetting};
use nanoclaw_server::audit::{Audit, Captured, Record};
use nanoclaw_server::db;
use serde_json::json;

/// `nanoclaw agent ...`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Make a persistent agent (its own workspace, memory and history).
    Create(CreateArgs),
    /// List persistent agents.
    Ls(ListArgs),
    /// One agent: definition, memory, recent runs, usage today.
    Show(ShowArgs),
    /// Remove an agent's record, memory and history (audit records stay).
    Rm(ShowArgs),
    /// Run a prompt with an agent: the model's tool calls run in its sandbox.
    Run(RunArgs),
    /// Seed 000's execute(prompt, language, timeout): write code, run it, report.
    Execute(ExecuteArgs),
    /// Approval requests waiting for a person.
    Approvals(ApprovalsArgs),
    /// Answer an approval request: allow-once, allow-always or deny.
    Approve(ApproveArgs),
}

/// Where the data lives.
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// Data folder (default: $NANOCLAW_DATA, /var/lib/nanoclaw as root, ~/.local/share/nanoclaw).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

/// `agent create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new agent's id.
    pub name: String,
    /// Start from this configured agent's policy (default: agents.defaults).
    #[arg(long, value_name = "AGENT")]
    pub from: Option<String>,
    /// Config file (default: discovered).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// At most these tools (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub tools: Option<Vec<String>>,
    /// At most these hosts (comma-separated; empty: no network).
    #[arg(long, value_delimiter = ',')]
    pub hosts: Option<Vec<String>>,
    /// Tokens per day.
    #[arg(long)]
    pub daily_tokens: Option<u64>,
    /// Team.
    #[arg(long)]
    pub team: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
}

/// `agent ls`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataArgs,
}

/// `agent show` / `agent rm`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The agent's id.
    pub name: String,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataArgs,
}

/// How approvals reach a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApproveVia {
    /// The terminal if there is one, else the queue.
    Auto,
    /// A prompt on the terminal.
    Tty,
    /// The data folder's queue (`nanoclaw agent approve`, the daemon's /v1/approvals).
    Queue,
    /// Nobody: every request is refused.
    Deny,
}

/// What every run takes.
#[derive(Debug, Args, Clone)]
pub struct RunCommon {
    /// Config file (default: the agent's, else discovered).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Session key (the agent's sandbox scope).
    #[arg(long, value_name = "KEY")]
    pub session: Option<String>,
    /// Print the report as JSON (nothing else on stdout).
    #[arg(long)]
    pub json: bool,
    /// How approvals reach a person.
    #[arg(long, value_enum, default_value = "auto")]
    pub approve: ApproveVia,
    /// How long an approval may wait (then: denied).
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub approval_timeout: Duration,
    /// Do not show earlier runs to the model.
    #[arg(long)]
    pub new: bool,
    /// (daemon) The tenant the run is for.
    #[arg(long, hide = true)]
    pub tenant: Option<String>,
    /// Run the agent's sandbox in this image's root (a reference in the
    /// image store, e.g. one built with `nanoclaw image build`).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
}

/// `agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The agent's id.
    pub name: String,
    /// The prompt (`-`: read it from stdin).
    pub prompt: String,
    #[command(flatten)]
    pub common: RunCommon,
}

/// `agent execute`.
#[derive(Debug, Args)]
pub struct ExecuteArgs {
    /// The prompt (`-`: read it from stdin).
    pub prompt: String,
    /// The agent (default: the config's default agent, else `default`).
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// The language the code is written in.
    #[arg(long, default_value = "python")]
    pub language: String,
    /// Longest a piece of code may run.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,
    #[command(flatten)]
    pub common: RunCommon,
}

/// `agent approvals`.
#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    /// Also answered and expired ones.
    #[arg(long)]
    pub all: bool,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataArgs,
}

/// `agent approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The request's id (`apr_…`).
    pub id: String,
    /// allow-once, allow-always or deny.
    pub answer: String,
    #[command(flatten)]
    pub data: DataArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    nanoclaw_sandbox::units::parse_duration(s).map_err(|e| e.to_string())
}

/// Runs `nanoclaw agent ...`.
pub fn run_agent(cmd: AgentCommand) -> Result<u8> {
    match cmd {
        AgentCommand::Create(a) => create(a),
        AgentCommand::Ls(a) => list(a),
        AgentCommand::Show(a) => show(a),
        AgentCommand::Rm(a) => {
            let (store, _) = open(&a.data)?;
            store.remove(&a.name)?;
            println!("removed agent {}", a.name);
            Ok(0)
        }
        AgentCommand::Run(a) => run(&a.name, &a.prompt, &a.common, None),
        AgentCommand::Execute(a) => execute(a),
        AgentCommand::Approvals(a) => approvals(a),
        AgentCommand::Approve(a) => {
            let answer = Answer::parse(&a.answer).ok_or_else(|| {
                anyhow!(
                    "answer {:?}: use allow-once, allow-always or deny",
                    a.answer
                )
            })?;
            let (store, _) = open(&a.data)?;
            if !store.answer_approval(None, &a.id, answer)? {
                bail!("no pending approval request {} (answered, expired, or not yours); `nanoclaw agent approvals` lists them", a.id);
            }
            println!("{} {}", a.id, answer.as_str());
            Ok(0)
        }
    }
}

/// The agent store and the audit log of the data folder.
fn open(data: &DataArgs) -> Result<(Store, Audit)> {
    let dir = db::data_dir(data.data.as_deref())?;
    let path = db::db_path(&dir);
    let audit = Audit::open(&path)?;
    let conn = db::open_again(&path)?;
    Ok((Store::new(conn), audit))
}

/// Loads the config (errors listed, exit 125).
fn load_config(flag: Option<&Path>) -> Result<(PathBuf, Config)> {
    let Some((path, _, loaded)) = crate::config_cmd::find_and_load(flag)? else {
        bail!("an agent needs a config file with an llm section: give --config FILE, set NANOCLAW_CONFIG, or create ./nanoclaw.yaml");
    };
    crate::config_cmd::require_no_errors(&path, &loaded)?;
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    Ok((path, loaded.config))
}

fn create(a: CreateArgs) -> Result<u8> {
    let (path, config) = load_config(a.config.as_deref())?;
    if let Some(b) = &a.from {
        if config.agents.get(b).is_none() {
            bail!("--from {b}: no such agent in {}", path.display());
        }
    }
    if config.agents.get(&a.name).is_some() {
        bail!(
            "{} is an agent of {} already; it is created on its first run",
            a.name,
            path.display()
        );
    }
    let (store, audit) = open(&a.data)?;
    let rec = AgentRecord {
        id: a.name.clone(),
        created_ms: store::now_ms(),
        base: a.from,
        config: Some(path.to_string_lossy().into_owned()),
        system: a.system,
        tools: a.tools.map(|t| {
            t.iter()
                .map(|s| nanoclaw_policy::tools::normalize(s))
                .collect()
        }),
        hosts: a
            .hosts
            .map(|h| h.into_iter().filter(|s| !s.is_empty()).collect()),
        daily_tokens: a.daily_tokens,
        creator: None,
        team: a.team,
    };
    store.create(&rec)?;
    let mut r = Record::new(nanoclaw_agent::audit::kind::AGENT_CREATE);
    r.agent = Some(rec.id.clone());
    r.detail = Some(format!(
        "created by a person: base {:?}, tools {:?}, hosts {:?}",
        rec.base, rec.tools, rec.hosts
    ));
    audit.append(r)?;
    println!("created agent {}", rec.id);
    Ok(0)
}

fn list(a: ListArgs) -> Result<u8> {
    let (store, _) = open(&a.data)?;
    let agents = store.list()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
        return Ok(0);
    }
    println!(
        "{:<24} {:<16} {:<16} {:<12} TOOLS",
        "AGENT", "BASE", "CREATOR", "TEAM"
    );
    for r in agents {
        println!(
            "{:<24} {:<16} {:<16} {:<12} {}",
            r.id,
            r.base.as_deref().unwrap_or("-"),
            r.creator.as_deref().unwrap_or("-"),
            r.team.as_deref().unwrap_or("-"),
            r.tools
                .map(|t| t.join(","))
                .unwrap_or_else(|| "(policy)".into())
        );
    }
    Ok(0)
}

fn show(a: ShowArgs) -> Result<u8> {
    let (store, _) = open(&a.data)?;
    let rec = store
        .get(&a.name)?
        .ok_or_else(|| anyhow!(store::StoreError::NoAgent(a.name.clone())))?;
    let memory = store.memory(&a.name)?;
    let runs = store.runs(&a.name, 10)?;
    let today = store.usage_today(&a.name)?;
    if a.json {
        let v = json!({"agent": rec, "memory": memory, "runs": runs, "usage_today": today});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("agent:   {}", rec.id);
    println!(
        "base:    {}",
        rec.base.as_deref().unwrap_or("(agents.defaults)")
    );
    println!(
        "creator: {}",
        rec.creator.as_deref().unwrap_or("(a person)")
    );
    println!(
        "tools:   {}",
        rec.tools
            .map(|t| t.join(", "))
            .unwrap_or_else(|| "(policy)".into())
    );
    println!(
        "hosts:   {}",
        rec.hosts
            .map(|t| t.join(", "))
            .unwrap_or_else(|| "(policy)".into())
    );
    println!(
        "today:   {} tokens in, {} out, cost {:.4}",
        today.input_tokens, today.output_tokens, today.cost
    );
    println!(
        "memory:\n{}",
        if memory.is_empty() {
            "  (empty)".to_string()
        } else {
            memory
        }
    );
    for r in runs {
        println!(
            "run {} [{}] {:?} -> {:?}",
            r.id,
            r.stop.as_deref().unwrap_or("running"),
            r.prompt,
            r.answer.unwrap_or_default()
        );
    }
    Ok(0)
}

fn approvals(a: ApprovalsArgs) -> Result<u8> {
    let (store, _) = open(&a.data)?;
    let rows = store.approvals(None, !a.all)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    for r in rows {
        println!(
            "{} {:<12} {:<14} {} ({})",
            r.request.id, r.state, r.request.agent, r.request.summary, r.request.reason
        );
    }
    Ok(0)
}

/// Audit events into the data folder's hash-chained log.
struct LogSink {
    audit: Audit,
    tenant: Option<String>,
}

impl AuditSink for LogSink {
    fn record(&self, e: AuditEvent) -> Result<i64, String> {
        let mut r = Record::new(e.kind);
        r.tenant = self.tenant.clone();
        r.agent = Some(e.agent);
        r.sandbox = e.sandbox;
        r.method = e.method;
        r.path = e.path;
        r.argv = e.argv;
        r.exit_code = e.exit_code;
        r.duration_ms = e.duration_ms;
        r.detail = Some(e.detail);
        r.input = e.input.as_deref().map(Captured::of);
        r.output = e.output.as_deref().map(Captured::of);
        self.audit
            .append(r)
            .map(|a| a.seq)
            .map_err(|e| e.to_string())
    }
}

/// Asks on the controlling terminal: y = once, a = always, anything else
/// (or nothing before the expiry) = deny.
struct TtyApprover;

impl Approver for TtyApprover {
    fn ask(&self, req: &ApprovalRequest, wait: Duration) -> Answer {
        let Ok(mut tty) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
        else {
            return Answer::Unavailable;
        };
        let _ = write!(
            tty,
            "\nnanoclaw: agent {} wants to run {}:\n  {}\n  ({})\nallow? [y]es once / [a]lways / [N]o (denied in {}s): ",
            req.agent,
            req.tool,
            req.summary,
            req.reason,
            wait.as_secs()
        );
        let _ = tty.flush();
        let mut pfd = libc::pollfd {
            fd: tty.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd we own, for at most `ms`.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            let _ = writeln!(tty, "\nnanoclaw: no answer: denied");
            return Answer::Expired;
        }
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut tty), &mut line);
        match line.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => Answer::AllowOnce,
            "a" | "always" => Answer::AllowAlways,
            _ => Answer::Deny,
        }
    }
}

fn approver(via: ApproveVia, store: &Store, tenant: Option<String>) -> Box<dyn Approver> {
    let tty = std::io::stdin().is_terminal() && std::fs::File::open("/dev/tty").is_ok();
    let queue = || {
        let mut q = QueueApprover::new(store.clone());
        q.tenant = tenant.clone();
        Box::new(q) as Box<dyn Approver>
    };
    match via {
        ApproveVia::Tty => Box::new(TtyApprover),
        ApproveVia::Queue => queue(),
        ApproveVia::Deny => Box::new(Nobody),
        ApproveVia::Auto if tty => Box::new(TtyApprover),
        ApproveVia::Auto => queue(),
    }
}

/// The config entry the run resolves: the config's own, or one made for a
/// stored agent from its base (own workspace, at most its hosts).
fn agent_entry(config: &Config, rec: &AgentRecord) -> Result<Option<AgentEntry>> {
    if config.agents.get(&rec.id).is_some() {
        return Ok(None);
    }
    let mut e = match &rec.base {
        Some(b) => config
            .agents
            .get(b)
            .cloned()
            .ok_or_else(|| anyhow!("agent {}'s base {b} is no longer in the config", rec.id))?,
        None => AgentEntry::default(),
    };
    e.id = rec.id.clone();
    e.key = format!("agent {} (stored)", rec.id);
    e.default = false;
    e.workspace = None;
    if let Some(s) = &rec.system {
        e.system = Some(s.clone());
    }
    if let Some(h) = &rec.hosts {
        if h.is_empty() {
            e.sandbox.network = Some(NetworkSetting::Mode(NetworkMode::None));
            e.sandbox.allowed_hosts = None;
        } else {
            e.sandbox.network = Some(NetworkSetting::Mode(NetworkMode::Allowlist));
            e.sandbox.allowed_hosts = Some(h.clone());
        }
    }
    Ok(Some(e))
}

fn provider_config(config: &Config, entry: Option<&AgentEntry>) -> Result<ProviderConfig> {
    let llm = match entry.and_then(|e| e.llm.as_ref()) {
        Some(over) => config.llm.overridden_by(over),
        None => config.llm.clone(),
    };
    let provider = llm.provider.clone().unwrap_or_else(|| "anthropic".into());
    let model = llm.model.clone().ok_or_else(|| {
        anyhow!("llm.model is not set in the config: name the model the agent uses")
    })?;
    Ok(ProviderConfig {
        kind: Kind::from_name(&provider),
        api_key: llm
            .api_key
            .as_ref()
            .map(|k| k.expose().to_string())
            .filter(|k| !k.is_empty()),
        model,
        base_url: llm.base_url.clone(),
        max_tokens: llm.max_tokens.unwrap_or(provider::DEFAULT_MAX_TOKENS),
        request_timeout: provider::DEFAULT_REQUEST_TIMEOUT,
        max_retries: provider::DEFAULT_MAX_RETRIES,
        backoff: provider::DEFAULT_BACKOFF,
    })
}

fn limits(config: &Config, entry: Option<&AgentEntry>, rec: &AgentRecord) -> Limits {
    let d = &config.agents.defaults.budget;
    let b = entry.map(|e| e.budget.clone()).unwrap_or_default();
    let mut l = Limits::default();
    if let Some(t) = b.turns.or(d.turns) {
        l.turns = t;
    }
    l.tokens = b.tokens.or(d.tokens);
    if let Some(w) = b.wall_time.or(d.wall_time) {
        l.wall_time = w;
    }
    l.daily_tokens = match (b.daily_tokens.or(d.daily_tokens), rec.daily_tokens) {
        (Some(a), Some(r)) => Some(a.min(r)),
        (a, r) => a.or(r),
    };
    l.daily_spend = b.daily_spend.or(d.daily_spend);
    l
}

/// Earlier runs as complete prompt/answer pairs (tool calls left out, so
/// every tool_use in the history is answered).
fn history(store: &Store, agent: &str) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut runs = store.runs(agent, 10)?;
    runs.reverse();
    for r in runs {
        let Some(answer) = r.answer.filter(|a| !a.is_empty()) else {
            continue;
        };
        out.push(Message::user_text(r.prompt));
        out.push(Message {
            role: Role::Assistant,
            content: vec![provider::Block::Text { text: answer }],
        });
    }
    Ok(out)
}

const DEFAULT_SYSTEM: &str =
    "You are an agent of nanoclaw. Your tools run in a sandbox that is your own computer: \
use them to do the task, then give a short final answer. Paths are relative to your workspace.";

/// Everything a run needs, made from the config and the store.
struct Prepared {
    config: Config,
    config_path: PathBuf,
    entry: Option<AgentEntry>,
    record: AgentRecord,
    plan: crate::config_cmd::RunPlan,
}

fn prepare(name: &str, c: &RunCommon, store: &Store, audit: &Audit) -> Result<Prepared> {
    // A tenant's agents are its own (`coder@acme`); a local user's are plain.
    let bare = name;
    let name = &store::tenant_id(bare, c.tenant.as_deref())?;
    let stored = store.get(name)?;
    let flag = c.config.clone().or_else(|| {
        stored
            .as_ref()
            .and_then(|r| r.config.clone())
            .map(PathBuf::from)
    });
    let (config_path, mut config) = load_config(flag.as_deref())?;
    let record = match stored {
        Some(r) => r,
        None if config.agents.get(bare).is_some() || bare == "default" => {
            let r = AgentRecord {
                id: name.to_string(),
                created_ms: store::now_ms(),
                base: config.agents.get(bare).map(|_| bare.to_string()),
                config: Some(config_path.to_string_lossy().into_owned()),
                ..AgentRecord::default()
            };
            match store.create(&r) {
                Ok(()) => {
                    let mut rec = Record::new(nanoclaw_agent::audit::kind::AGENT_CREATE);
                    rec.agent = Some(name.to_string());
                    rec.tenant = c.tenant.clone();
                    rec.detail = Some("created at its first run from the config".into());
                    audit.append(rec)?;
                    r
                }
                // A run started at the same moment made it first.
                Err(store::StoreError::Exists(_)) => store
                    .get(name)?
                    .ok_or_else(|| anyhow!("agent {name} vanished while it was made"))?,
                Err(e) => return Err(e.into()),
            }
        }
        None => bail!("no agent {bare:?}: name one of the config's agents or make it with `nanoclaw agent create {bare}`"),
    };
    if let Some(e) = agent_entry(&config, &record)? {
        config.agents.list.push(e);
    }

    let plan = crate::config_cmd::plan_config(
        &config,
        Some(name),
        c.session.as_deref(),
        nanoclaw_policy::CliOverrides {
            image: c.image.clone(),
            ..nanoclaw_policy::CliOverrides::default()
        },
        vec!["true".into()],
        Vec::new(),
    )?;
    let entry = config.agents.get(name).cloned();
    Ok(Prepared {
        config,
        config_path,
        entry,
        record,
        plan,
    })
}

/// Longest prompt read from stdin.
const MAX_STDIN_PROMPT: u64 = 1 << 20;

/// The prompt, or stdin's when it is `-` (how the daemon passes it: argv
/// is readable by every local user in /proc/PID/cmdline).
fn prompt_text(p: &str) -> Result<String> {
    if p != "-" {
        return Ok(p.to_string());
    }
    let mut s = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::io::stdin(), MAX_STDIN_PROMPT + 1),
        &mut s,
    )
    .map_err(|e| anyhow!("reading the prompt from stdin: {e}"))?;
    if s.len() as u64 > MAX_STDIN_PROMPT || s.trim().is_empty() {
        bail!("the prompt on stdin must be 1 byte to 1 MiB of text");
    }
    Ok(s)
}

fn run(name: &str, prompt: &str, c: &RunCommon, execute: Option<(&str, Duration)>) -> Result<u8> {
    let prompt = &prompt_text(prompt)?;
    if let Some(d) = &c.data.data {
        // Agents' workspaces and team spaces live in the data folder they
        // use. Set before any thread exists (the loop's come later).
        // A tenant's are in its own part of it: no team space is shared
        // across tenants.
        let mut d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        if let Some(t) = &c.tenant {
            store::tenant_id("x", Some(t))?;
            d = d.join("tenants").join(t);
        }
        std::env::set_var("NANOCLAW_DATA", d);
    }
    let (store, audit) = open(&c.data)?;
    let p = prepare(name, c, &store, &audit)?;
    for w in &p.plan.warnings {
        eprintln!("nanoclaw: warning: {w}");
    }
    let spec = match &p.plan.execution {
        crate::config_cmd::Execution::Sandboxed(s) => (**s).clone(),
        crate::config_cmd::Execution::Host { reason } => bail!("{reason}"),
    };
    let r = &p.plan.resolved;
    let provider = provider::connect(provider_config(&p.config, p.entry.as_ref())?)?;
    let mut policy = AgentPolicy::from_config(&p.config, r);
    if let Some(t) = &p.record.tools {
        policy.narrowed_tools = Some(Layered {
            key: format!("agent {}'s own tools", p.record.id),
            rules: t.clone(),
        });
    }
    let (remote, _st, mut base) = crate::scope_cmd::scoped_for_spec(&spec, r, &p.config_path)?;
    let mut system = p
        .record
        .system
        .clone()
        .or_else(|| p.entry.as_ref().and_then(|e| e.system.clone()))
        .unwrap_or_else(|| DEFAULT_SYSTEM.into());
    let mut prompt = prompt.to_string();
    if let Some((lang, timeout)) = execute {
        base.timeout = base.timeout.min(timeout);
        system.push_str(&format!(
            "\n\nWrite {lang} code that does what the user asks and run it with the run_code tool (language {lang}); fix it until it works, then answer with what it printed."
        ));
        prompt = format!("{prompt}\n\n(Use {lang}.)");
    }
    let workdir = if r.workspace.is_some() {
        "/workspace"
    } else {
        "/tmp"
    };
    let mut host = ExecHost::new(remote, base, workdir);
    let sink = LogSink {
        audit: audit.clone(),
        tenant: c.tenant.clone(),
    };
    let approver = approver(c.approve, &store, c.tenant.clone());
    let agent = Agent {
        id: p.record.id.clone(),
        system,
        provider: provider.as_ref(),
        prices: p
            .entry
            .as_ref()
            .and_then(|e| e.llm.as_ref())
            .and_then(|l| l.prices)
            .or(p.config.llm.prices),
        policy: &policy,
        limits: limits(&p.config, p.entry.as_ref(), &p.record),
        approver: approver.as_ref(),
        approval_wait: c.approval_timeout,
        audit: &sink,
        store: Some(&store),
        record: Some(p.record.clone()),
        host_cwd: r.workspace.clone().unwrap_or_else(|| PathBuf::from("/")),
        tenant: c.tenant.clone(),
    };
    let earlier = if c.new {
        Vec::new()
    } else {
        history(&store, &p.record.id)?
    };
    let json = c.json;
    let mut progress = |ev: Progress<'_>| show_progress(ev, json);
    let report = agent_run::run(&agent, &mut host, earlier, &prompt, &mut progress);
    finish(&report, c.json, execute.is_some())
}

fn show_progress(ev: Progress<'_>, json: bool) {
    match ev {
        Progress::Text(t) if !json => {
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
        Progress::ToolCall(name, input) => {
            let s = input.to_string();
            let short: String = s.chars().take(160).collect();
            eprintln!("\n[tool] {name} {short}");
        }
        Progress::ToolResult(rec) => {
            eprintln!(
                "[tool] {} {}{}",
                rec.name,
                rec.decision,
                if rec.ok { "" } else { " (failed)" }
            );
        }
        _ => {}
    }
}

fn finish(report: &Report, json: bool, execute: bool) -> Result<u8> {
    if json {
        let mut v = serde_json::to_value(report)?;
        if execute {
            // Seed 000's result: the code that ran and what it printed.
            let last = report
                .tool_calls
                .iter()
                .rev()
                .find(|t| t.code.is_some() && t.decision != "denied");
            if let Some(o) = v.as_object_mut() {
                o.insert("code".into(), json!(last.and_then(|t| t.code.clone())));
                o.insert(
                    "language".into(),
                    json!(last.and_then(|t| t.language.clone())),
                );
                o.insert("stdout".into(), json!(last.and_then(|t| t.stdout.clone())));
                o.insert("stderr".into(), json!(last.and_then(|t| t.stderr.clone())));
                o.insert("exit_code".into(), json!(last.and_then(|t| t.exit_code)));
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        if report.stop != Stop::Answer {
            eprintln!(
                "nanoclaw: the run stopped: {}{}",
                report.stop.as_str(),
                report
                    .stop_detail
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
        }
        eprintln!(
            "nanoclaw: {} model calls, {} tokens in, {} out, cost {:.4}; audit record {}",
            report.turns,
            report.usage.input_tokens,
            report.usage.output_tokens,
            report.cost,
            report
                .audit_seq
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(match report.stop {
        Stop::Answer => 0,
        Stop::ModelError | Stop::AuditFailed => crate::EXIT_NANOCLAW,
        _ => 2,
    })
}

fn execute(a: ExecuteArgs) -> Result<u8> {
    if !nanoclaw_agent::tools::LANGUAGES.contains(&a.language.as_str()) {
        bail!(
            "--language {}: use one of {}",
            a.language,
            nanoclaw_agent::tools::LANGUAGES.join(", ")
        );
    }
    let name = match a.agent.clone() {
        Some(n) => n,
        None => {
            let flag = a.common.config.clone();
            let (_, config) = load_config(flag.as_deref())?;
            config
                .agents
                .list
                .iter()
                .find(|e| e.default)
                .map(|e| e.id.clone())
                .unwrap_or_else(|| "default".into())
        }
    };
    run(&name, &a.prompt, &a.common, Some((&a.language, a.timeout)))
}
