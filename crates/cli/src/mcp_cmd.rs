//! `nanoclaw mcp`: a Model Context Protocol server over stdio, so that any
//! MCP host (Claude Code, Codex, Cursor, ...) can use a nanoclaw sandbox as
//! tools.
//!
//! Transport: newline-delimited JSON-RPC 2.0 on stdin/stdout (logs go to
//! stderr). Lifecycle of revision 2025-11-25: `initialize` negotiates the
//! protocol version (the client's when we speak it, else our latest),
//! `notifications/initialized`, `ping`; then `tools/list` and
//! `tools/call`. Malformed input gets JSON-RPC errors (-32700 parse error,
//! -32600 invalid request, -32601 unknown method, -32602 bad params or an
//! unknown tool); a tool that fails (bad arguments, a refused call, a
//! command that exits non-zero) answers a result with `isError: true`.
//!
//! Every tool runs in ONE long-lived sandbox for the life of the server,
//! created at the first call by a keeper (this process never clones): with
//! `--config/--agent` the agent's scoped sandbox under its policy (kept,
//! like `nanoclaw run --agent`'s), else a sandbox made as `nanoclaw sandbox
//! create` makes one, removed when the server ends (stdin closed, SIGTERM,
//! SIGINT or SIGHUP).

mod tools;

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;
use serde_json::{json, Map, Value};

use tools::Tools;

/// Protocol revisions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// JSON-RPC: the input is not JSON.
const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request object.
const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: no such method.
const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC: invalid method parameters (and an unknown tool).
pub(crate) const INVALID_PARAMS: i64 = -32602;

/// Options of `nanoclaw mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// With --config/--agent/--session: the tools run in that agent's
    /// scoped sandbox under its policy (only the tools it allows are
    /// offered). Without: in a sandbox made like `nanoclaw sandbox
    /// create`'s, removed when the server ends.
    #[command(flatten)]
    policy: crate::config_cmd::PolicyArgs,
}

/// A JSON-RPC error answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RpcError {
    code: i64,
    message: String,
}

impl RpcError {
    pub(crate) fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
}

/// `nanoclaw mcp`: serves stdin until it closes, then removes the sandbox
/// it made.
pub fn run(a: McpArgs) -> Result<u8> {
    let tools = Tools::new(&a.policy)?;
    tools.cleanup_on_signals()?;
    let mut server = Server {
        initialized: false,
        tools,
    };
    let result = serve(&mut server);
    server.tools.cleanup();
    result.map(|()| 0)
}

/// Reads messages from stdin and writes the answers to stdout, one line
/// each.
fn serve(server: &mut Server) -> Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut out = std::io::stdout();
    let mut line = Vec::new();
    loop {
        line.clear();
        if stdin.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(answer) = server.handle_line(&line) {
            let mut bytes = serde_json::to_vec(&answer)?;
            bytes.push(b'\n');
            out.write_all(&bytes)?;
            out.flush()?;
        }
    }
}

/// The protocol state of one stdio session.
struct Server {
    initialized: bool,
    tools: Tools,
}

impl Server {
    /// The answer to one line of input (none for a notification or a
    /// client's response).
    fn handle_line(&mut self, line: &[u8]) -> Option<Value> {
        let msg: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Some(error(
                    Value::Null,
                    RpcError::new(PARSE_ERROR, format!("Parse error: {e}")),
                ))
            }
        };
        self.handle(msg)
    }

    /// The answer to one message.
    fn handle(&mut self, msg: Value) -> Option<Value> {
        let m = match msg {
            Value::Object(m) => m,
            Value::Array(_) => {
                return Some(error(
                    Value::Null,
                    RpcError::new(
                        INVALID_REQUEST,
                        "Invalid Request: batches are not supported",
                    ),
                ))
            }
            _ => {
                return Some(error(
                    Value::Null,
                    RpcError::new(INVALID_REQUEST, "Invalid Request: not a JSON object"),
                ))
            }
        };
        let id = match m.get("id") {
            None => None,
            Some(v @ (Value::String(_) | Value::Number(_))) => Some(v.clone()),
            Some(_) => {
                return Some(error(
                    Value::Null,
                    RpcError::new(
                        INVALID_REQUEST,
                        "Invalid Request: id must be a string or a number",
                    ),
                ))
            }
        };
        if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Some(error(
                id.unwrap_or(Value::Null),
                RpcError::new(INVALID_REQUEST, "Invalid Request: jsonrpc must be \"2.0\""),
            ));
        }
        let method = match m.get("method") {
            Some(Value::String(s)) => s.clone(),
            // A client's answer to a request of ours (we send none).
            None if id.is_some() && (m.contains_key("result") || m.contains_key("error")) => {
                return None
            }
            _ => {
                return Some(error(
                    id.unwrap_or(Value::Null),
                    RpcError::new(INVALID_REQUEST, "Invalid Request: method must be a string"),
                ))
            }
        };
        let Some(id) = id else {
            self.notification(&method);
            return None;
        };
        Some(match self.request(&method, m.get("params")) {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(e) => error(id, e),
        })
    }

    fn notification(&mut self, method: &str) {
        // Others (cancelled, progress, roots/list_changed) need nothing:
        // calls run one at a time, to completion.
        if method == "notifications/initialized" {
            self.initialized = true;
        }
    }

    fn request(&mut self, method: &str, params: Option<&Value>) -> Result<Value, RpcError> {
        let params = match params {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => {
                return Err(RpcError::new(
                    INVALID_PARAMS,
                    "Invalid params: params must be an object",
                ))
            }
        };
        match method {
            "initialize" => {
                let result = initialize(&params)?;
                self.initialized = true;
                Ok(result)
            }
            "ping" => Ok(json!({})),
            "tools/list" | "tools/call" if !self.initialized => Err(RpcError::new(
                INVALID_REQUEST,
                format!("Invalid Request: {method} before initialize; send initialize first"),
            )),
            "tools/list" => Ok(json!({"tools": self.tools.list()})),
            "tools/call" => {
                let name = params.get("name").and_then(Value::as_str).ok_or_else(|| {
                    RpcError::new(INVALID_PARAMS, "Invalid params: name must be a string")
                })?;
                let args = params.get("arguments").cloned().unwrap_or(json!({}));
                self.tools.call(name, &args)
            }
            other => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("Method not found: {other}"),
            )),
        }
    }
}

/// The answer to `initialize`: the version negotiated, our capabilities.
fn initialize(params: &Map<String, Value>) -> Result<Value, RpcError> {
    let asked = params
        .get("protocolVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            RpcError::new(
                INVALID_PARAMS,
                "Invalid params: protocolVersion must be a string",
            )
        })?;
    Ok(json!({
        "protocolVersion": negotiate(asked),
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {
            "name": "nanoclaw",
            "title": "nanoclaw sandbox",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "instructions": "Tools run in one nanoclaw sandbox kept for this session: files written and programs installed stay between calls. The sandbox has no access to the host's files and, unless its policy allows it, no network.",
    }))
}

/// The client's protocol version when we speak it, else our latest.
fn negotiate(asked: &str) -> &'static str {
    PROTOCOL_VERSIONS
        .iter()
        .find(|v| **v == asked)
        .copied()
        .unwrap_or(PROTOCOL_VERSIONS[0])
}

fn error(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_negotiated() {
        assert_eq!(negotiate("2025-06-18"), "2025-06-18");
        assert_eq!(negotiate("2025-11-25"), "2025-11-25");
        assert_eq!(negotiate("1999-01-01"), "2025-11-25");
        let r = initialize(&Map::new());
        assert_eq!(r.map_err(|e| e.code), Err(INVALID_PARAMS));
    }
}
