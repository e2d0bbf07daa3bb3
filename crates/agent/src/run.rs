//! The loop: the system prompt (with the agent's memory) and the user's
//! prompt go to the model; every tool call it asks for is parsed, decided
//! by the [`AgentPolicy`], approved by a person when policy says so, run in
//! the agent's sandbox, audited, and its result returned; the run ends at
//! the model's final answer or at a limit, which it names.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nanoclaw_policy::model::{AskMode, Prices};
use nanoclaw_sandbox::outcome::{NetDenial, NetworkReport};
use serde::Serialize;
use serde_json::Value;

use crate::approval::{self, Answer, ApprovalRequest, Approver};
use crate::audit::{kind, AuditEvent, AuditSink};
use crate::gate::{AgentPolicy, Verdict};
use crate::host::{absolute, Command, Host};
use crate::provider::{Block, Message, Provider, Request, Response, Role, StopReason, Usage};
use crate::store::{AgentRecord, Store};
use crate::tools::{self, Action, MemoryOp};

/// Most of a tool's output returned to the model, per stream.
pub const MODEL_OUTPUT_LIMIT: usize = 16 * 1024;
/// Default model calls per run.
pub const DEFAULT_TURNS: u32 = 25;
/// Default wall-clock bound of a run.
pub const DEFAULT_WALL_TIME: Duration = Duration::from_secs(600);
/// Longest memory kept (bytes).
pub const MAX_MEMORY: usize = 64 * 1024;

/// The bounds of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Model calls.
    pub turns: u32,
    /// Tokens in + out for this run.
    pub tokens: Option<u64>,
    /// Wall-clock time.
    pub wall_time: Duration,
    /// Tokens per day for the agent.
    pub daily_tokens: Option<u64>,
    /// Money per day for the agent.
    pub daily_spend: Option<f64>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            turns: DEFAULT_TURNS,
            tokens: None,
            wall_time: DEFAULT_WALL_TIME,
            daily_tokens: None,
            daily_spend: None,
        }
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The model gave its final answer.
    Answer,
    /// The model's answer hit `max_tokens`.
    MaxTokens,
    /// `budget.turns`.
    Turns,
    /// `budget.tokens`.
    Tokens,
    /// `budget.wallTime`.
    WallTime,
    /// `budget.dailyTokens`.
    DailyTokens,
    /// `budget.dailySpend`.
    DailySpend,
    /// The model API failed (after retries).
    ModelError,
    /// An audit record could not be written (nothing runs unaudited).
    AuditFailed,
}

impl Stop {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Answer => "answer",
            Stop::MaxTokens => "max_tokens",
            Stop::Turns => "turns",
            Stop::Tokens => "tokens",
            Stop::WallTime => "wall_time",
            Stop::DailyTokens => "daily_tokens",
            Stop::DailySpend => "daily_spend",
            Stop::ModelError => "model_error",
            Stop::AuditFailed => "audit_failed",
        }
    }
}

/// One tool call of a run, as reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ToolRecord {
    /// The model's call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Its arguments.
    pub input: Value,
    /// `allowed`, `denied`, `approved` or `refused` (by a person or expiry).
    pub decision: String,
    /// Why, when not plainly allowed.
    pub reason: Option<String>,
    /// Did it run and succeed?
    pub ok: bool,
    /// Exit code (commands).
    pub exit_code: Option<i32>,
    /// Code that ran (`run_code`) or the command line (`exec`).
    pub code: Option<String>,
    /// Language of `code`.
    pub language: Option<String>,
    /// stdout (commands), bounded.
    pub stdout: Option<String>,
    /// stderr (commands), bounded.
    pub stderr: Option<String>,
    /// What went back to the model.
    pub result: String,
    /// Its audit record.
    pub audit_seq: Option<i64>,
    /// What its commands did at the sandbox's network boundary (sandboxes
    /// with an egress proxy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<ToolNetwork>,
}

/// What one tool call's commands did at the egress proxy: the difference
/// of its reports before and after them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ToolNetwork {
    /// Connections allowed.
    pub allowed: u64,
    /// Requests that got a credential rule's headers from the proxy — a
    /// secret the sandbox never held.
    pub credentials_added: u64,
    /// Connections refused (destination, port, reason).
    pub denials: Vec<NetDenial>,
}

impl ToolNetwork {
    /// `after` minus `before` (cumulative reports of one proxy).
    fn between(before: &NetworkReport, after: &NetworkReport) -> ToolNetwork {
        ToolNetwork {
            allowed: after.allowed.saturating_sub(before.allowed),
            credentials_added: after.intercepted.saturating_sub(before.intercepted),
            denials: after
                .denials
                .get(before.denials.len()..)
                .unwrap_or_default()
                .to_vec(),
        }
    }

    /// One line for the audit record and the model: what was refused and
    /// how many requests got credentials (never their values).
    fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.credentials_added > 0 {
            parts.push(format!(
                "credentials added at the boundary to {} request(s)",
                self.credentials_added
            ));
        }
        if !self.denials.is_empty() {
            let d: Vec<String> = self
                .denials
                .iter()
                .map(|d| format!("{}:{} ({})", d.destination, d.port, d.detail))
                .collect();
            parts.push(format!("refused by the network policy: {}", d.join("; ")));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Run id.
    pub run_id: String,
    /// The agent.
    pub agent: String,
    /// The final answer (the last text the model gave).
    pub answer: String,
    /// Why it ended.
    pub stop: Stop,
    /// Details of the stop (the limit, the error).
    pub stop_detail: Option<String>,
    /// Model calls made.
    pub turns: u32,
    /// Tokens used.
    pub usage: Usage,
    /// Money spent (by `llm.prices`).
    pub cost: f64,
    /// Tool calls, in order.
    pub tool_calls: Vec<ToolRecord>,
    /// Files written by the tools (sandbox paths).
    pub files: Vec<String>,
    /// The sandbox.
    pub sandbox: String,
    /// The run's audit record.
    pub audit_seq: Option<i64>,
    /// The messages of this run (prompt first).
    #[serde(skip)]
    pub messages: Vec<Message>,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress<'b> {
    /// Text from the model.
    Text(&'b str),
    /// A tool call is about to be decided.
    ToolCall(&'b str, &'b Value),
    /// A tool call's result.
    ToolResult(&'b ToolRecord),
}

/// An agent ready to run.
pub struct Agent<'a> {
    /// Its id.
    pub id: String,
    /// Its system prompt (without memory; [`run`] adds it).
    pub system: String,
    /// The model.
    pub provider: &'a dyn Provider,
    /// Prices, for spend.
    pub prices: Option<Prices>,
    /// Its tool policy.
    pub policy: &'a AgentPolicy,
    /// Its limits.
    pub limits: Limits,
    /// Who approves.
    pub approver: &'a dyn Approver,
    /// How long an approval may take.
    pub approval_wait: Duration,
    /// The audit log.
    pub audit: &'a dyn AuditSink,
    /// Persistence (memory, usage, created agents, "allow always").
    pub store: Option<&'a Store>,
    /// Its own record (the limits `create_agent` may not exceed).
    pub record: Option<AgentRecord>,
    /// Where elevated commands start on the host.
    pub host_cwd: PathBuf,
    /// The daemon's tenant the run is for (agents it creates are that
    /// tenant's).
    pub tenant: Option<String>,
}

/// State of one run.
struct Run<'r, 'a> {
    agent: &'r Agent<'a>,
    host: &'r mut dyn Host,
    report: Report,
    deadline: Instant,
}

/// Runs `prompt` after `history` (earlier messages, complete pairs).
pub fn run(
    agent: &Agent<'_>,
    host: &mut dyn Host,
    history: Vec<Message>,
    prompt: &str,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Report {
    let sandbox = host.id().to_string();
    let mut r = Run {
        agent,
        deadline: Instant::now() + agent.limits.wall_time,
        host,
        report: Report {
            run_id: new_run_id(),
            agent: agent.id.clone(),
            answer: String::new(),
            stop: Stop::Answer,
            stop_detail: None,
            turns: 0,
            usage: Usage::default(),
            cost: 0.0,
            tool_calls: Vec::new(),
            files: Vec::new(),
            sandbox,
            audit_seq: None,
            messages: Vec::new(),
        },
    };
    if let Some(s) = agent.store {
        let _ = s.start_run(&r.report.run_id, &agent.id, prompt);
    }
    let mut messages = history;
    let first_new = messages.len();
    messages.push(Message::user_text(prompt));
    let specs: Vec<_> = offered_tools(agent)
        .iter()
        .filter_map(|t| tools::spec(t))
        .collect();
    let (stop, detail) = r.converse(&mut messages, &specs, progress);
    r.report.stop = stop;
    r.report.stop_detail = detail;
    r.report.messages = messages.split_off(first_new);
    r.finish(prompt);
    r.report
}

/// The tools offered to the model: known, allowed by policy, usable here.
pub fn offered_tools(agent: &Agent<'_>) -> Vec<&'static str> {
    tools::ALL
        .iter()
        .copied()
        .filter(|t| agent.policy.tool_allowed(t).is_ok())
        .filter(|t| agent.store.is_some() || !matches!(*t, "memory" | "create_agent"))
        .collect()
}

fn new_run_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    format!("run_{}", hex::encode(b))
}

fn cut(s: &str, limit: usize) -> String {
    if s.len() <= limit {
        return s.to_string();
    }
    let mut end = limit;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[... {} more bytes cut]", &s[..end], s.len() - end)
}

impl Run<'_, '_> {
    fn audit(&mut self, e: AuditEvent) -> Result<i64, String> {
        self.agent.audit.record(AuditEvent {
            agent: self.agent.id.clone(),
            sandbox: Some(self.report.sandbox.clone()),
            ..e
        })
    }

    /// The system prompt with the agent's memory.
    fn system(&self) -> String {
        let mut s = self.agent.system.clone();
        if let Some(store) = self.agent.store {
            if let Ok(m) = store.memory(&self.agent.id) {
                if !m.trim().is_empty() {
                    s.push_str("\n\n# Your memory (from earlier runs)\n");
                    s.push_str(&m);
                }
            }
        }
        s
    }

    /// A limit that stops the run before the next model call.
    fn limit_reached(&self) -> Option<(Stop, String)> {
        let l = &self.agent.limits;
        let used = self.report.usage.input_tokens + self.report.usage.output_tokens;
        if self.report.turns >= l.turns {
            return Some((
                Stop::Turns,
                format!("{} model calls (budget.turns)", l.turns),
            ));
        }
        if Instant::now() >= self.deadline {
            return Some((
                Stop::WallTime,
                format!("{:?} (budget.wallTime)", l.wall_time),
            ));
        }
        if let Some(t) = l.tokens.filter(|t| used >= *t) {
            return Some((
                Stop::Tokens,
                format!("{used} tokens used of {t} (budget.tokens)"),
            ));
        }
        let store = self.agent.store?;
        let today = store.usage_today(&self.agent.id).ok()?;
        let day_tokens = today.input_tokens + today.output_tokens;
        if let Some(t) = l.daily_tokens.filter(|t| day_tokens >= *t) {
            return Some((
                Stop::DailyTokens,
                format!("{day_tokens} tokens today of {t} (budget.dailyTokens)"),
            ));
        }
        if let Some(c) = l.daily_spend.filter(|c| today.cost >= *c) {
            return Some((
                Stop::DailySpend,
                format!("{:.4} spent today of {c} (budget.dailySpend)", today.cost),
            ));
        }
        None
    }

    fn converse(
        &mut self,
        messages: &mut Vec<Message>,
        specs: &[crate::provider::ToolSpec],
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> (Stop, Option<String>) {
        loop {
            if let Some((stop, why)) = self.limit_reached() {
                return (stop, Some(why));
            }
            let resp = match self.call_model(messages, specs, progress) {
                Ok(r) => r,
                Err(stop) => return stop,
            };
            let uses: Vec<(String, String, Value)> = resp
                .content
                .iter()
                .filter_map(|b| match b {
                    Block::ToolUse { id, name, input } => {
                        Some((id.clone(), name.clone(), input.clone()))
                    }
                    _ => None,
                })
                .collect();
            let text: String = resp
                .content
                .iter()
                .filter_map(|b| match b {
                    Block::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            if !text.is_empty() {
                self.report.answer = text;
            }
            messages.push(Message {
                role: Role::Assistant,
                content: resp.content.clone(),
            });
            if uses.is_empty() {
                return match resp.stop_reason {
                    StopReason::MaxTokens => {
                        (Stop::MaxTokens, Some("the answer hit max_tokens".into()))
                    }
                    _ => (Stop::Answer, None),
                };
            }
            let mut results = Vec::new();
            for (id, name, input) in uses {
                progress(Progress::ToolCall(&name, &input));
                let rec = self.tool_call(&id, &name, &input);
                progress(Progress::ToolResult(&rec));
                results.push(Block::ToolResult {
                    tool_use_id: id,
                    content: rec.result.clone(),
                    is_error: !rec.ok,
                });
                let failed_audit = rec.audit_seq.is_none();
                self.report.tool_calls.push(rec);
                if failed_audit {
                    messages.push(Message {
                        role: Role::User,
                        content: results,
                    });
                    return (
                        Stop::AuditFailed,
                        Some("a tool call could not be audited".into()),
                    );
                }
            }
            messages.push(Message {
                role: Role::User,
                content: results,
            });
        }
    }

    fn call_model(
        &mut self,
        messages: &[Message],
        specs: &[crate::provider::ToolSpec],
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Response, (Stop, Option<String>)> {
        let system = self.system();
        let cfg = self.agent.provider.config();
        let req = Request {
            model: &cfg.model,
            system: &system,
            messages,
            tools: specs,
            max_tokens: cfg.max_tokens,
        };
        let started = Instant::now();
        let mut on_text = |t: &str| progress(Progress::Text(t));
        let res = self
            .agent
            .provider
            .complete(&req, self.deadline, &mut on_text);
        self.report.turns += 1;
        let elapsed = started.elapsed().as_millis() as u64;
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                let _ = self.audit(AuditEvent {
                    kind: kind::MODEL_CALL,
                    method: Some(cfg.model.clone()),
                    duration_ms: Some(elapsed),
                    detail: format!("failed: {e}"),
                    ..AuditEvent::default()
                });
                let stop = if Instant::now() >= self.deadline {
                    Stop::WallTime
                } else {
                    Stop::ModelError
                };
                return Err((stop, Some(e.to_string())));
            }
        };
        let cost = self.agent.prices.map_or(0.0, |p| {
            (resp.usage.input_tokens as f64 * p.input + resp.usage.output_tokens as f64 * p.output)
                / 1e6
        });
        self.report.usage.input_tokens += resp.usage.input_tokens;
        self.report.usage.output_tokens += resp.usage.output_tokens;
        self.report.cost += cost;
        if let Some(s) = self.agent.store {
            let _ = s.add_usage(
                &self.agent.id,
                resp.usage.input_tokens,
                resp.usage.output_tokens,
                cost,
            );
        }
        let audited = self.audit(AuditEvent {
            kind: kind::MODEL_CALL,
            method: Some(resp.model.clone()),
            duration_ms: Some(elapsed),
            detail: format!(
                "tokens in {} out {}, cost {cost:.6}, stop {:?}, attempts {}",
                resp.usage.input_tokens, resp.usage.output_tokens, resp.stop_reason, resp.attempts
            ),
            output: serde_json::to_vec(&resp.content).ok(),
            ..AuditEvent::default()
        });
        if let Err(e) = audited {
            return Err((Stop::AuditFailed, Some(e)));
        }
        Ok(resp)
    }

    fn tool_call(&mut self, id: &str, name: &str, input: &Value) -> ToolRecord {
        let mut rec = ToolRecord {
            id: id.to_string(),
            name: name.to_string(),
            input: input.clone(),
            ..ToolRecord::default()
        };
        let action = match tools::parse(name, input) {
            Ok(a) => a,
            Err(e) => {
                rec.decision = "invalid".into();
                rec.reason = Some(e.clone());
                rec.result = format!("invalid call: {e}");
                rec.audit_seq = self.audit_decision(&rec);
                return rec;
            }
        };
        let workdir = self.host.workdir().to_string();
        match self.agent.policy.decide(&action, &workdir) {
            Verdict::Allow => rec.decision = "allowed".into(),
            Verdict::Deny { reason } => {
                rec.decision = "denied".into();
                rec.result = format!("refused by policy: {reason}");
                rec.reason = Some(reason);
                rec.audit_seq = self.audit_decision(&rec);
                return rec;
            }
            Verdict::Ask { reason } => {
                let answer = self.approve(&action, name, input, &reason);
                rec.reason = Some(reason);
                if !answer.allows() {
                    rec.decision = "refused".into();
                    rec.result =
                        format!("not approved ({}): the call did not run", answer.as_str());
                    rec.audit_seq = self.audit_decision(&rec);
                    return rec;
                }
                rec.decision = "approved".into();
            }
        }
        let action = match self.resolve_path(action) {
            Ok(a) => a,
            Err(reason) => {
                rec.decision = "denied".into();
                rec.result = format!("refused by policy: {reason}");
                rec.reason = Some(reason);
                rec.audit_seq = self.audit_decision(&rec);
                return rec;
            }
        };
        let started = Instant::now();
        self.execute(&action, &mut rec);
        let argv = match &action {
            Action::Exec { command, .. } => {
                Some(vec!["/bin/sh".into(), "-c".into(), command.clone()])
            }
            _ => None,
        };
        rec.audit_seq = self
            .audit(AuditEvent {
                kind: kind::TOOL_CALL,
                method: Some(name.to_string()),
                path: action
                    .path()
                    .map(|p| absolute(&workdir, p))
                    .or_else(|| match &action {
                        Action::HttpRequest { method, url, .. } => Some(format!("{method} {url}")),
                        _ => None,
                    }),
                argv,
                exit_code: rec.exit_code,
                duration_ms: Some(started.elapsed().as_millis() as u64),
                detail: format!(
                    "{}{}{}",
                    rec.decision,
                    if rec.ok { "" } else { ", failed" },
                    rec.network
                        .as_ref()
                        .and_then(ToolNetwork::summary)
                        .map(|n| format!("; {n}"))
                        .unwrap_or_default()
                ),
                input: Some(input.to_string().into_bytes()),
                output: Some(rec.result.clone().into_bytes()),
                ..AuditEvent::default()
            })
            .ok();
        rec
    }

    /// Under path rules, a file tool works on the path as the sandbox
    /// resolves it (symlinks followed), checked again: a link planted under
    /// an allowed prefix cannot lead the tool outside it. (A link swapped in
    /// between this check and the operation can; the mounts are the wall.)
    fn resolve_path(&mut self, action: Action) -> Result<Action, String> {
        if !self.agent.policy.path_rules_apply(&action) {
            return Ok(action);
        }
        let Some(p) = action.path() else {
            return Ok(action);
        };
        let abs = absolute(self.host.workdir(), p);
        let o = self.host.exec(Command {
            argv: ["realpath", "-m", "--", &abs].map(String::from).to_vec(),
            ..Command::default()
        })?;
        let resolved = String::from_utf8_lossy(&o.stdout)
            .trim_end_matches('\n')
            .to_string();
        if o.exit_code != Some(0) || !resolved.starts_with('/') {
            return Err(format!("cannot resolve {abs} in the sandbox"));
        }
        self.agent
            .policy
            .resolved_path_allowed(&action, &resolved)?;
        Ok(match action {
            Action::ReadFile { .. } => Action::ReadFile { path: resolved },
            Action::ListFiles { .. } => Action::ListFiles { path: resolved },
            Action::WriteFile { content, .. } => Action::WriteFile {
                path: resolved,
                content,
            },
            Action::EditFile {
                old,
                new,
                replace_all,
                ..
            } => Action::EditFile {
                path: resolved,
                old,
                new,
                replace_all,
            },
            other => other,
        })
    }

    fn audit_decision(&mut self, rec: &ToolRecord) -> Option<i64> {
        self.audit(AuditEvent {
            kind: kind::DECISION,
            method: Some(rec.name.clone()),
            detail: format!(
                "{}: {}",
                rec.decision,
                rec.reason.clone().unwrap_or_default()
            ),
            input: Some(rec.input.to_string().into_bytes()),
            ..AuditEvent::default()
        })
        .ok()
    }

    /// Asks a person, unless "allow always" already covers this exact call
    /// (for `on-miss`; `always` asks every time, and so does elevated).
    fn approve(&mut self, action: &Action, name: &str, input: &Value, reason: &str) -> Answer {
        let (argv, cwd) = match action {
            Action::Exec {
                command,
                cwd,
                elevated,
                ..
            } => (
                Some(vec![
                    if *elevated { "host:/bin/sh" } else { "/bin/sh" }.to_string(),
                    "-c".into(),
                    command.clone(),
                ]),
                cwd.clone()
                    .unwrap_or_else(|| self.host.workdir().to_string()),
            ),
            _ => (None, self.host.workdir().to_string()),
        };
        let binding = approval::binding(name, input, argv.as_deref(), &cwd, &[]);
        let reusable = self.agent.policy.ask_mode(name) == AskMode::OnMiss
            && !matches!(action, Action::Exec { elevated: true, .. });
        if reusable {
            if let Some(s) = self.agent.store {
                if s.is_approved(&self.agent.id, &binding).unwrap_or(false) {
                    return Answer::AllowOnce;
                }
            }
        }
        let summary = match action {
            Action::Exec {
                command, elevated, ..
            } => {
                format!(
                    "{}exec in {cwd}: {command}",
                    if *elevated { "ELEVATED (host) " } else { "" }
                )
            }
            _ => format!("{name} {}", cut(&input.to_string(), 400)),
        };
        let req = ApprovalRequest {
            id: approval::new_id(),
            agent: self.agent.id.clone(),
            tool: name.to_string(),
            summary: summary.clone(),
            reason: reason.to_string(),
            binding: binding.clone(),
        };
        let wait = self
            .agent
            .approval_wait
            .min(self.deadline.saturating_duration_since(Instant::now()));
        let answer = self.agent.approver.ask(&req, wait);
        if answer == Answer::AllowAlways && reusable {
            if let Some(s) = self.agent.store {
                let _ = s.approve_always(&self.agent.id, &binding, &summary);
            }
        }
        let _ = self.audit(AuditEvent {
            kind: kind::APPROVAL,
            method: Some(name.to_string()),
            detail: format!("{} {}: {summary} ({reason})", req.id, answer.as_str()),
            input: Some(input.to_string().into_bytes()),
            ..AuditEvent::default()
        });
        answer
    }

    fn finish(&mut self, prompt: &str) {
        let detail = format!(
            "stop {}{}; turns {}; tokens in {} out {}; cost {:.6}; tool calls {}",
            self.report.stop.as_str(),
            self.report
                .stop_detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            self.report.turns,
            self.report.usage.input_tokens,
            self.report.usage.output_tokens,
            self.report.cost,
            self.report.tool_calls.len()
        );
        self.report.audit_seq = self
            .audit(AuditEvent {
                kind: kind::AGENT_RUN,
                method: Some(self.report.run_id.clone()),
                detail,
                input: Some(prompt.as_bytes().to_vec()),
                output: Some(self.report.answer.clone().into_bytes()),
                ..AuditEvent::default()
            })
            .ok();
        if let Some(s) = self.agent.store {
            let _ = s.append_messages(
                &self.agent.id,
                &self.report.run_id,
                0,
                &self.report.messages,
            );
            let _ = s.end_run(&crate::store::RunRow {
                id: self.report.run_id.clone(),
                agent: self.agent.id.clone(),
                prompt: prompt.to_string(),
                answer: Some(self.report.answer.clone()),
                stop: Some(self.report.stop.as_str().to_string()),
                input_tokens: self.report.usage.input_tokens,
                output_tokens: self.report.usage.output_tokens,
                cost: self.report.cost,
                ..Default::default()
            });
        }
    }
}

/// Formats a command's outcome for the model.
fn command_result(exit: Option<i32>, killed: Option<String>, stdout: &str, stderr: &str) -> String {
    let mut s = match (exit, killed) {
        (_, Some(k)) => format!("killed: {k}\n"),
        (Some(c), None) => format!("exit code: {c}\n"),
        (None, None) => "exit code: none\n".to_string(),
    };
    s.push_str("--- stdout ---\n");
    s.push_str(&cut(stdout, MODEL_OUTPUT_LIMIT));
    if !stdout.ends_with('\n') && !stdout.is_empty() {
        s.push('\n');
    }
    s.push_str("--- stderr ---\n");
    s.push_str(&cut(stderr, MODEL_OUTPUT_LIMIT));
    s
}

/// The argv that runs a snippet (code as an argument, no temp file).
/// An argv and the environment it needs.
type Argv = (Vec<String>, Vec<(String, String)>);

fn snippet(language: &str, code: &str) -> Result<Argv, String> {
    let argv = |v: &[&str]| {
        v.iter()
            .map(|s| s.to_string())
            .chain([code.to_string()])
            .collect()
    };
    Ok(match language {
        "python" => (argv(&["python3", "-c"]), Vec::new()),
        "node" => (argv(&["node", "-e"]), Vec::new()),
        "bash" => (argv(&["bash", "-c"]), Vec::new()),
        "sh" => (argv(&["sh", "-c"]), Vec::new()),
        "go" => {
            let g = nanoclaw_image::go::go_command(code, &[]).map_err(|e| e.to_string())?;
            (g.command, g.env)
        }
        other => return Err(format!("language {other:?} is not supported")),
    })
}

impl Run<'_, '_> {
    fn execute(&mut self, action: &Action, rec: &mut ToolRecord) {
        let result = match action {
            Action::Exec {
                command,
                cwd,
                timeout,
                elevated: false,
            } => {
                rec.code = Some(command.clone());
                rec.language = Some("sh".into());
                let cmd = Command {
                    argv: vec!["/bin/sh".into(), "-c".into(), command.clone()],
                    cwd: cwd.as_ref().map(|c| absolute(self.host.workdir(), c)),
                    timeout: *timeout,
                    ..Command::default()
                };
                self.command(cmd, rec)
            }
            Action::Exec {
                command,
                timeout,
                elevated: true,
                ..
            } => {
                rec.code = Some(command.clone());
                rec.language = Some("sh".into());
                self.elevated(command, *timeout, rec)
            }
            Action::RunCode {
                language,
                code,
                timeout,
            } => {
                rec.code = Some(code.clone());
                rec.language = Some(language.clone());
                match snippet(language, code) {
                    Ok((argv, env)) => self.command(
                        Command {
                            argv,
                            env,
                            timeout: *timeout,
                            ..Command::default()
                        },
                        rec,
                    ),
                    Err(e) => Err(e),
                }
            }
            Action::ReadFile { path } => {
                let p = absolute(self.host.workdir(), path);
                self.host
                    .read(&p)
                    .map(|b| cut(&String::from_utf8_lossy(&b), 4 * MODEL_OUTPUT_LIMIT))
            }
            Action::WriteFile { path, content } => {
                let p = absolute(self.host.workdir(), path);
                let r = self.host.write(&p, content.clone().into_bytes());
                r.map(|()| {
                    self.note_file(&p);
                    format!("wrote {} bytes to {p}", content.len())
                })
            }
            Action::EditFile {
                path,
                old,
                new,
                replace_all,
            } => self.edit(path, old, new, *replace_all),
            Action::ListFiles { path } => {
                let p = absolute(self.host.workdir(), path);
                self.host.list(&p).map(|entries| {
                    let mut s = String::new();
                    for e in entries {
                        s.push_str(&format!("{}\t{:?}\t{}\n", e.path, e.kind, e.size));
                    }
                    cut(&s, MODEL_OUTPUT_LIMIT)
                })
            }
            Action::HttpRequest {
                method,
                url,
                headers,
                body,
            } => self.http(method, url, headers, body.as_deref(), rec),
            Action::Memory { op, text } => self.memory(*op, text),
            Action::CreateAgent { .. } => self.create_agent(action),
        };
        match result {
            Ok(text) => {
                rec.ok = rec.exit_code.is_none_or_zero();
                rec.result = text;
            }
            Err(e) => {
                rec.ok = false;
                rec.result = format!("error: {e}");
            }
        }
    }

    fn note_file(&mut self, path: &str) {
        if !self.report.files.iter().any(|f| f == path) {
            self.report.files.push(path.to_string());
        }
    }

    fn command(&mut self, cmd: Command, rec: &mut ToolRecord) -> Result<String, String> {
        let before = self.host.network();
        let o = self.host.exec(cmd)?;
        let after = self.host.network();
        rec.network = before.zip(after).map(|(b, a)| ToolNetwork::between(&b, &a));
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        rec.exit_code = Some(o.cli_exit_code());
        let killed = o.killed_by.map(|k| format!("{k:?}"));
        let mut text = command_result(o.exit_code, killed, &stdout, &stderr);
        if let Some(n) = rec.network.as_ref().and_then(ToolNetwork::summary) {
            text.push_str(&format!("\n--- network ---\n{n}\n"));
        }
        rec.stdout = Some(cut(&stdout, MODEL_OUTPUT_LIMIT));
        rec.stderr = Some(cut(&stderr, MODEL_OUTPUT_LIMIT));
        Ok(text)
    }

    fn edit(&mut self, path: &str, old: &str, new: &str, all: bool) -> Result<String, String> {
        let p = absolute(self.host.workdir(), path);
        let bytes = self.host.read(&p)?;
        let text = String::from_utf8(bytes).map_err(|_| format!("{p} is not UTF-8 text"))?;
        let n = text.matches(old).count();
        if n == 0 {
            return Err(format!("the text to replace does not occur in {p}"));
        }
        if n > 1 && !all {
            return Err(format!(
                "the text to replace occurs {n} times in {p}; give more context or replace_all"
            ));
        }
        let out = if all {
            text.replace(old, new)
        } else {
            text.replacen(old, new, 1)
        };
        self.host.write(&p, out.into_bytes())?;
        self.note_file(&p);
        Ok(format!(
            "replaced {} occurrence(s) in {p}",
            if all { n } else { 1 }
        ))
    }

    fn http(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Option<&str>,
        rec: &mut ToolRecord,
    ) -> Result<String, String> {
        // `--globoff`: the URL is a URL, not one of curl's `{a,b}` / `[1-9]`
        // patterns.
        let mut argv: Vec<String> = [
            "curl",
            "-sS",
            "--globoff",
            "--max-time",
            "60",
            "--max-filesize",
            "10485760",
            "-X",
            method,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(["-w".into(), "\n[HTTP status %{http_code}]".into()]);
        for (k, v) in headers {
            argv.extend(["-H".into(), format!("{k}: {v}")]);
        }
        if body.is_some() {
            argv.extend(["--data-binary".into(), "@-".into()]);
        }
        argv.extend(["--".into(), url.to_string()]);
        let cmd = Command {
            argv,
            stdin: body.map(|b| b.as_bytes().to_vec()),
            timeout: Some(Duration::from_secs(70)),
            ..Command::default()
        };
        let text = self.command(cmd, rec)?;
        if rec.exit_code == Some(127) {
            return Err(
                "http_request needs curl in the sandbox's root, and it is not there".into(),
            );
        }
        Ok(text)
    }

    fn memory(&mut self, op: MemoryOp, text: &str) -> Result<String, String> {
        let store = self
            .agent
            .store
            .ok_or("this agent has no persistent memory")?;
        let id = &self.agent.id;
        let current = store.memory(id).map_err(|e| e.to_string())?;
        let next = match op {
            MemoryOp::Read => {
                return Ok(if current.is_empty() {
                    "(memory is empty)".into()
                } else {
                    current
                });
            }
            MemoryOp::Append => {
                let mut m = current;
                if !m.is_empty() && !m.ends_with('\n') {
                    m.push('\n');
                }
                m.push_str(text);
                m
            }
            MemoryOp::Replace => text.to_string(),
        };
        if next.len() > MAX_MEMORY {
            return Err(format!(
                "memory would be {} bytes; it holds at most {MAX_MEMORY}",
                next.len()
            ));
        }
        store.set_memory(id, &next).map_err(|e| e.to_string())?;
        Ok(format!("memory saved ({} bytes)", next.len()))
    }

    fn create_agent(&mut self, action: &Action) -> Result<String, String> {
        let Action::CreateAgent {
            id,
            system,
            tools: t,
            hosts,
            daily_tokens,
        } = action
        else {
            return Err("not a create_agent call".into());
        };
        let store = self
            .agent
            .store
            .ok_or("agents cannot be created here (no agent store)")?;
        let child = crate::subset::child_record(
            self.agent,
            id,
            system.clone(),
            t.clone(),
            hosts.clone(),
            *daily_tokens,
        )?;
        store.create(&child).map_err(|e| e.to_string())?;
        let _ = self.audit(AuditEvent {
            kind: kind::AGENT_CREATE,
            method: Some(child.id.clone()),
            detail: format!(
                "created by {}: tools {:?}, hosts {:?}, daily tokens {:?}",
                self.agent.id, child.tools, child.hosts, child.daily_tokens
            ),
            ..AuditEvent::default()
        });
        Ok(format!(
            "created agent {} with tools {:?}, hosts {:?}, daily tokens {:?}",
            child.id,
            child.tools.unwrap_or_default(),
            child.hosts.unwrap_or_default(),
            child.daily_tokens
        ))
    }

    /// Elevated exec: on the host, with an empty environment (the
    /// runtime's keys are not handed to it), bounded in time and output.
    fn elevated(
        &mut self,
        command: &str,
        timeout: Option<Duration>,
        rec: &mut ToolRecord,
    ) -> Result<String, String> {
        let limit = timeout
            .unwrap_or(Duration::from_secs(30))
            .min(tools::MAX_TOOL_TIMEOUT);
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(&self.agent.host_cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting /bin/sh on the host: {e}"))?;
        let out = child.stdout.take();
        let err = child.stderr.take();
        let read = |p: Option<std::process::ChildStdout>| {
            std::thread::spawn(move || {
                let mut b = Vec::new();
                if let Some(p) = p {
                    let _ = p.take(1 << 20).read_to_end(&mut b);
                }
                b
            })
        };
        let t_out = read(out);
        let t_err = std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(p) = err {
                let _ = p.take(1 << 20).read_to_end(&mut b);
            }
            b
        });
        let until = Instant::now() + limit;
        let mut killed = None;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= until => {
                    let _ = child.kill();
                    killed = Some(format!("timeout after {limit:?}"));
                    break child.wait().ok();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for the host command: {e}")),
            }
        };
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        let code = status.and_then(|s| s.code());
        rec.exit_code = code.or(Some(124));
        rec.stdout = Some(cut(&stdout, MODEL_OUTPUT_LIMIT));
        rec.stderr = Some(cut(&stderr, MODEL_OUTPUT_LIMIT));
        Ok(command_result(code, killed, &stdout, &stderr))
    }
}

trait ZeroOrNone {
    fn is_none_or_zero(&self) -> bool;
}

impl ZeroOrNone for Option<i32> {
    fn is_none_or_zero(&self) -> bool {
        matches!(self, None | Some(0))
    }
}
