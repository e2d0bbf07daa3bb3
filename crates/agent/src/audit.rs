//! What the agent reports to the audit log: every model call (model,
//! tokens, cost), tool call (arguments, decision, outcome), approval and
//! denial. The log itself (hash-chained SQLite) belongs to the caller; the
//! agent only hands events to an [`AuditSink`].

use serde::Serialize;

/// Kinds of agent records.
pub mod kind {
    /// A call to the model.
    pub const MODEL_CALL: &str = "model_call";
    /// A tool call that ran (or failed while running).
    pub const TOOL_CALL: &str = "tool_call";
    /// A tool call refused by policy.
    pub const DECISION: &str = "decision";
    /// An approval asked and its answer.
    pub const APPROVAL: &str = "approval";
    /// A run's end (its answer, why it stopped, its usage).
    pub const AGENT_RUN: &str = "agent_run";
    /// A persistent agent created (by a person or by another agent).
    pub const AGENT_CREATE: &str = "agent_create";
}

/// One event.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuditEvent {
    /// One of [`kind`].
    pub kind: &'static str,
    /// The agent.
    pub agent: String,
    /// Its sandbox.
    pub sandbox: Option<String>,
    /// Tool or model name.
    pub method: Option<String>,
    /// A path (file tools) or URL (http).
    pub path: Option<String>,
    /// The command of an exec.
    pub argv: Option<Vec<String>>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// How long it took.
    pub duration_ms: Option<u64>,
    /// For people: the decision and why, tokens and cost, …
    pub detail: String,
    /// The input (arguments, prompt).
    pub input: Option<Vec<u8>>,
    /// The output.
    pub output: Option<Vec<u8>>,
}

/// Where events go. An error means the record could not be written: the
/// loop stops rather than run unaudited.
pub trait AuditSink: Send + Sync {
    /// Records one event; returns its sequence number in the log.
    fn record(&self, e: AuditEvent) -> Result<i64, String>;
}

/// Drops everything (tests, and callers that audit elsewhere).
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _e: AuditEvent) -> Result<i64, String> {
        Ok(0)
    }
}
