//! The agent's tools: what the model is offered (name, description, JSON
//! schema) and the typed action each call parses into. Parsing is strict:
//! a missing or mistyped argument is an error returned to the model, never
//! a guess.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::provider::ToolSpec;

/// Longest timeout a tool call may ask for.
pub const MAX_TOOL_TIMEOUT: Duration = Duration::from_secs(600);

/// Languages `run_code` runs.
pub const LANGUAGES: &[&str] = &["python", "node", "bash", "sh", "go"];

/// Every tool nanoclaw's agent knows, in the order offered.
pub const ALL: &[&str] = &[
    "exec",
    "run_code",
    "read_file",
    "write_file",
    "edit_file",
    "list_files",
    "http_request",
    "memory",
    "create_agent",
];

/// What a tool call asks for, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A shell command in the sandbox (`elevated`: on the host).
    Exec {
        /// The command line, run by `/bin/sh -c`.
        command: String,
        /// Working directory (default: the agent's workspace).
        cwd: Option<String>,
        /// Its own timeout (bounded by the policy's).
        timeout: Option<Duration>,
        /// Run on the host instead of the sandbox.
        elevated: bool,
    },
    /// A snippet of code in a language.
    RunCode {
        /// `python`, `node`, `bash`, `sh` or `go`.
        language: String,
        /// The code.
        code: String,
        /// Its own timeout.
        timeout: Option<Duration>,
    },
    /// Read a text file.
    ReadFile {
        /// Path in the sandbox.
        path: String,
    },
    /// Write (create or replace) a file.
    WriteFile {
        /// Path in the sandbox.
        path: String,
        /// New content.
        content: String,
    },
    /// Replace one exact string in a file.
    EditFile {
        /// Path in the sandbox.
        path: String,
        /// The text to find (must occur exactly once unless `replace_all`).
        old: String,
        /// Its replacement.
        new: String,
        /// Replace every occurrence.
        replace_all: bool,
    },
    /// List a directory.
    ListFiles {
        /// Path in the sandbox.
        path: String,
    },
    /// An HTTP request from inside the sandbox (its egress policy applies).
    HttpRequest {
        /// `GET`, `POST`, …
        method: String,
        /// `http://` or `https://` URL.
        url: String,
        /// Request headers.
        headers: Vec<(String, String)>,
        /// Request body.
        body: Option<String>,
    },
    /// Read or change the agent's memory.
    Memory {
        /// `read`, `append` or `replace`.
        op: MemoryOp,
        /// The text (for append and replace).
        text: String,
    },
    /// Make a new persistent agent with at most the creator's rights.
    CreateAgent {
        /// The new agent's id.
        id: String,
        /// Its system prompt.
        system: Option<String>,
        /// Tools it may use (a subset of the creator's).
        tools: Option<Vec<String>>,
        /// Hosts it may reach (a subset of the creator's).
        hosts: Option<Vec<String>>,
        /// Its daily token budget (at most the creator's).
        daily_tokens: Option<u64>,
    },
}

/// What the `memory` tool does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryOp {
    /// Return the memory.
    Read,
    /// Add a line.
    Append,
    /// Replace it all.
    Replace,
}

impl Action {
    /// The tool name this action belongs to (policy's name: an elevated
    /// exec is still `exec`, gated further by the elevated rules).
    pub fn tool(&self) -> &'static str {
        match self {
            Action::Exec { .. } => "exec",
            Action::RunCode { .. } => "run_code",
            Action::ReadFile { .. } => "read_file",
            Action::WriteFile { .. } => "write_file",
            Action::EditFile { .. } => "edit_file",
            Action::ListFiles { .. } => "list_files",
            Action::HttpRequest { .. } => "http_request",
            Action::Memory { .. } => "memory",
            Action::CreateAgent { .. } => "create_agent",
        }
    }

    /// The file path it touches, if it is a file tool.
    pub fn path(&self) -> Option<&str> {
        match self {
            Action::ReadFile { path }
            | Action::WriteFile { path, .. }
            | Action::EditFile { path, .. }
            | Action::ListFiles { path } => Some(path),
            _ => None,
        }
    }

    /// True for tools that change something (files, agents, the host).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Action::WriteFile { .. } | Action::EditFile { .. } | Action::CreateAgent { .. }
        )
    }
}

fn obj(input: &Value) -> Result<&Map<String, Value>, String> {
    input
        .as_object()
        .ok_or_else(|| "the arguments must be a JSON object".to_string())
}

fn req_str(m: &Map<String, Value>, key: &str) -> Result<String, String> {
    match m.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("argument {key:?} must be a string")),
        None => Err(format!("argument {key:?} is required")),
    }
}

fn opt_str(m: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("argument {key:?} must be a string")),
    }
}

fn opt_bool(m: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("argument {key:?} must be true or false")),
    }
}

fn opt_list(m: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("argument {key:?} must be a list of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!("argument {key:?} must be a list of strings")),
    }
}

fn timeout(m: &Map<String, Value>) -> Result<Option<Duration>, String> {
    match m.get("timeout_s") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let s = v
                .as_f64()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or("argument \"timeout_s\" must be a positive number of seconds")?;
            Ok(Some(Duration::from_secs_f64(s).min(MAX_TOOL_TIMEOUT)))
        }
    }
}

fn unknown(m: &Map<String, Value>, known: &[&str]) -> Result<(), String> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown argument {k:?}; this tool takes {}",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

fn headers(m: &Map<String, Value>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    match m.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("header {k:?} must be a string"))?;
                let bad = |s: &str| s.contains(['\r', '\n', '\0']);
                if k.is_empty() || bad(k) || k.contains(':') || bad(v) {
                    return Err(format!("header {k:?} is not a valid header"));
                }
                out.push((k.clone(), v.to_string()));
            }
        }
        Some(_) => return Err("argument \"headers\" must be an object".into()),
    }
    Ok(out)
}

/// Parses one tool call.
pub fn parse(name: &str, input: &Value) -> Result<Action, String> {
    let m = obj(input)?;
    let a = match name {
        "exec" => {
            unknown(m, &["command", "cwd", "timeout_s", "elevated"])?;
            Action::Exec {
                command: req_str(m, "command")?,
                cwd: opt_str(m, "cwd")?,
                timeout: timeout(m)?,
                elevated: opt_bool(m, "elevated")?,
            }
        }
        "run_code" => {
            unknown(m, &["language", "code", "timeout_s"])?;
            let language = req_str(m, "language")?.to_ascii_lowercase();
            if !LANGUAGES.contains(&language.as_str()) {
                return Err(format!(
                    "language {language:?} is not one of {}",
                    LANGUAGES.join(", ")
                ));
            }
            Action::RunCode {
                language,
                code: req_str(m, "code")?,
                timeout: timeout(m)?,
            }
        }
        "read_file" | "list_files" => {
            unknown(m, &["path"])?;
            let path = req_str(m, "path")?;
            if name == "read_file" {
                Action::ReadFile { path }
            } else {
                Action::ListFiles { path }
            }
        }
        "write_file" => {
            unknown(m, &["path", "content"])?;
            Action::WriteFile {
                path: req_str(m, "path")?,
                content: req_str(m, "content")?,
            }
        }
        "edit_file" => {
            unknown(m, &["path", "old", "new", "replace_all"])?;
            let old = req_str(m, "old")?;
            if old.is_empty() {
                return Err("argument \"old\" must not be empty".into());
            }
            Action::EditFile {
                path: req_str(m, "path")?,
                old,
                new: req_str(m, "new")?,
                replace_all: opt_bool(m, "replace_all")?,
            }
        }
        "http_request" => {
            unknown(m, &["method", "url", "headers", "body"])?;
            let method = opt_str(m, "method")?
                .unwrap_or_else(|| "GET".into())
                .to_ascii_uppercase();
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("method {method:?} is not an HTTP method"));
            }
            let url = req_str(m, "url")?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("url {url:?} must start with http:// or https://"));
            }
            Action::HttpRequest {
                method,
                url,
                headers: headers(m)?,
                body: opt_str(m, "body")?,
            }
        }
        "memory" => {
            unknown(m, &["action", "text"])?;
            let op = match req_str(m, "action")?.as_str() {
                "read" => MemoryOp::Read,
                "append" => MemoryOp::Append,
                "replace" => MemoryOp::Replace,
                other => {
                    return Err(format!(
                        "memory action {other:?} is not read, append or replace"
                    ))
                }
            };
            let text = opt_str(m, "text")?.unwrap_or_default();
            if op != MemoryOp::Read && text.is_empty() {
                return Err("memory append and replace need \"text\"".into());
            }
            Action::Memory { op, text }
        }
        "create_agent" => {
            unknown(m, &["id", "system", "tools", "hosts", "daily_tokens"])?;
            Action::CreateAgent {
                id: req_str(m, "id")?,
                system: opt_str(m, "system")?,
                tools: opt_list(m, "tools")?,
                hosts: opt_list(m, "hosts")?,
                daily_tokens: match m.get("daily_tokens") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .ok_or("argument \"daily_tokens\" must be a whole number")?,
                    ),
                },
            }
        }
        other => return Err(format!("there is no tool named {other:?}")),
    };
    Ok(a)
}

/// The spec offered to the model for `name`.
pub fn spec(name: &str) -> Option<ToolSpec> {
    let (description, schema) = match name {
        "exec" => (
            "Run a shell command (/bin/sh -c) in your sandbox. Returns exit code, stdout and stderr.",
            json!({"type": "object", "properties": {
                "command": {"type": "string", "description": "the command line"},
                "cwd": {"type": "string", "description": "working directory (default: your workspace)"},
                "timeout_s": {"type": "number", "description": "seconds before it is killed"},
                "elevated": {"type": "boolean", "description": "run on the host, outside the sandbox (needs policy and approval)"}
            }, "required": ["command"]}),
        ),
        "run_code" => (
            "Run a snippet of code in your sandbox: python, node, bash, sh or go. Returns exit code, stdout and stderr.",
            json!({"type": "object", "properties": {
                "language": {"type": "string", "enum": LANGUAGES},
                "code": {"type": "string"},
                "timeout_s": {"type": "number"}
            }, "required": ["language", "code"]}),
        ),
        "read_file" => (
            "Read a text file in your sandbox.",
            json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        ),
        "write_file" => (
            "Create or replace a file in your sandbox.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"}, "content": {"type": "string"}
            }, "required": ["path", "content"]}),
        ),
        "edit_file" => (
            "Replace an exact string in a file (it must occur once unless replace_all).",
            json!({"type": "object", "properties": {
                "path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"},
                "replace_all": {"type": "boolean"}
            }, "required": ["path", "old", "new"]}),
        ),
        "list_files" => (
            "List a directory in your sandbox.",
            json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        ),
        "http_request" => (
            "Make an HTTP request from your sandbox (its network policy applies). Returns status and body.",
            json!({"type": "object", "properties": {
                "method": {"type": "string", "default": "GET"},
                "url": {"type": "string"},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "body": {"type": "string"}
            }, "required": ["url"]}),
        ),
        "memory" => (
            "Your persistent memory (loaded into your instructions at every run): read it, append a line, or replace it.",
            json!({"type": "object", "properties": {
                "action": {"type": "string", "enum": ["read", "append", "replace"]},
                "text": {"type": "string"}
            }, "required": ["action"]}),
        ),
        "create_agent" => (
            "Create a new persistent agent with at most your own tools, hosts and budget.",
            json!({"type": "object", "properties": {
                "id": {"type": "string"},
                "system": {"type": "string"},
                "tools": {"type": "array", "items": {"type": "string"}},
                "hosts": {"type": "array", "items": {"type": "string"}},
                "daily_tokens": {"type": "integer"}
            }, "required": ["id"]}),
        ),
        _ => return None,
    };
    Some(ToolSpec {
        name: name.to_string(),
        description: description.to_string(),
        input_schema: schema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_a_spec_and_parses_its_required_arguments() {
        for t in ALL {
            let s = spec(t).expect("spec");
            assert_eq!(s.name, *t);
        }
        let a = parse("exec", &json!({"command": "ls", "timeout_s": 5})).expect("exec");
        assert_eq!(a.tool(), "exec");
        assert!(parse("exec", &json!({})).is_err());
        assert!(parse("exec", &json!({"command": "ls", "sudo": true})).is_err());
        assert!(parse("run_code", &json!({"language": "cobol", "code": "x"})).is_err());
        assert!(parse("http_request", &json!({"url": "file:///etc/passwd"})).is_err());
        assert!(parse(
            "http_request",
            &json!({"url": "http://x/", "headers": {"a\r\nb": "c"}})
        )
        .is_err());
        assert!(parse("edit_file", &json!({"path": "a", "old": "", "new": "b"})).is_err());
        assert!(parse("nope", &json!({})).is_err());
        assert!(parse("exec", &json!("ls")).is_err());
    }
}
