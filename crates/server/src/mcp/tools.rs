//! The MCP tools: their definitions (input schemas that refuse unknown
//! fields, output schemas, honest annotations) and their calls, each one
//! made of the daemon's own operations on [`Backend`] for the caller's
//! tenant — the same calls the E2B routes make, so the same quotas,
//! tenant isolation and audit records apply.
//!
//! A failure (bad arguments, an unknown sandbox, a refused quota, a
//! command that exits non-zero or times out) is a result with `isError:
//! true` and a message the model can act on; only an unknown tool or
//! arguments that are not an object are JSON-RPC errors.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::exec::{self, Capture, Command, Finished};
use super::{Ctx, Era, RpcError, Trace, INVALID_PARAMS};
use crate::auth::Authenticator;
use crate::backend::{
    Backend, BackendError, CreateSandbox, EntryInfo, FileType, ProcessEnd, SandboxInfo,
    SandboxScope, SandboxState, Signal,
};
use crate::e2b::E2bState;

/// Default time limit of a command run to its end.
const DEFAULT_TIMEOUT_S: f64 = 60.0;
/// Longest time limit of a command run to its end.
const MAX_TIMEOUT_S: f64 = 3600.0;
/// Default bytes kept of each output stream.
const DEFAULT_OUTPUT_BYTES: u64 = 64 << 10;
/// Most bytes kept of each output stream.
const MAX_OUTPUT_BYTES: u64 = 4 << 20;
/// Default and largest bytes `read_file` returns.
const DEFAULT_READ_BYTES: u64 = 1 << 20;
const MAX_READ_BYTES: u64 = 8 << 20;
/// Default lifetime of a sandbox made by `sandbox_create` (E2B's).
const DEFAULT_SANDBOX_S: u64 = crate::e2b::models::DEFAULT_TIMEOUT_SECS;
/// Lifetime of a session's default sandbox (renewed at each use).
const SESSION_SANDBOX: Duration = Duration::from_secs(3600);
/// Longest `exec_poll` wait.
const MAX_POLL_WAIT_MS: u64 = 30_000;

/// The tool names, in the order they are listed.
pub const NAMES: &[&str] = &[
    "sandbox_create",
    "sandbox_list",
    "sandbox_kill",
    "sandbox_exec",
    "run_code",
    "read_file",
    "write_file",
    "list_files",
    "exec_start",
    "exec_poll",
    "exec_write_stdin",
    "exec_signal",
];

fn sandbox_id_schema() -> Value {
    json!({"type": "string", "minLength": 1, "description":
        "The sandbox (from sandbox_create or sandbox_list). Omitted: this MCP session's own \
         sandbox, made at first use and removed when the session ends (2025-11-25 sessions \
         only; the stateless 2026-07-28 protocol must name one)."})
}

fn env_schema() -> Value {
    json!({"type": "object", "additionalProperties": {"type": "string"},
           "description": "Extra environment variables."})
}

fn object(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required,
           "additionalProperties": false})
}

fn annotations(
    title: &str,
    read_only: bool,
    destructive: bool,
    idempotent: bool,
    open: bool,
) -> Value {
    json!({"title": title, "readOnlyHint": read_only, "destructiveHint": destructive,
           "idempotentHint": idempotent, "openWorldHint": open})
}

fn tool(name: &str, description: &str, input: Value, output: Value, ann: Value) -> Value {
    json!({"name": name, "title": ann["title"], "description": description,
           "inputSchema": input, "outputSchema": output, "annotations": ann})
}

/// The output schema of a process run to its end.
fn finished_schema() -> Value {
    object(
        json!({
            "sandbox_id": {"type": "string"},
            "exit_code": {"type": ["integer", "null"], "description": "null when killed by a signal"},
            "signal": {"type": ["string", "null"]},
            "timed_out": {"type": "boolean"},
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "stdout_dropped_bytes": {"type": "integer"},
            "stderr_dropped_bytes": {"type": "integer"},
            "duration_ms": {"type": "integer"},
        }),
        &[
            "sandbox_id",
            "exit_code",
            "signal",
            "timed_out",
            "stdout",
            "stderr",
            "stdout_dropped_bytes",
            "stderr_dropped_bytes",
            "duration_ms",
        ],
    )
}

/// [`finished_schema`] and what a run in a context adds.
fn run_code_schema() -> Value {
    let mut s = finished_schema();
    s["properties"]["context"] = json!({"type": "string", "description": "The context it ran in."});
    s["properties"]["execution_count"] = json!({"type": "integer"});
    s["properties"]["results"] = json!({"type": "array", "items": {"type": "object"},
        "description": "Rich results: text, html, png (base64), …; is_main_result for the last expression."});
    s["properties"]["error"] = json!({"type": ["object", "null"], "properties": {
        "name": {"type": "string"}, "value": {"type": "string"}, "traceback": {"type": "string"}}});
    s
}

fn sandbox_schema() -> Value {
    object(
        json!({
            "sandbox_id": {"type": "string"},
            "template": {"type": "string"},
            "state": {"type": "string", "enum": ["running", "paused"]},
            "started_at": {"type": "integer", "description": "Unix seconds"},
            "end_at": {"type": "integer", "description": "Unix seconds"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        }),
        &[
            "sandbox_id",
            "template",
            "state",
            "started_at",
            "end_at",
            "metadata",
        ],
    )
}

fn exec_props() -> Value {
    json!({
        "sandbox_id": sandbox_id_schema(),
        "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                 "description": "The program and its arguments, run as they are (no shell). Give argv or command."},
        "command": {"type": "string", "minLength": 1,
                    "description": "A shell command line, run by bash -c (sh -c when bash is missing). Give argv or command."},
        "env": env_schema(),
        "cwd": {"type": "string", "description": "Working directory (default: the home directory, /home/user)."},
    })
}

fn timeout_schema(what: &str) -> Value {
    json!({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S,
           "description": format!("Seconds before {what} is killed (default {DEFAULT_TIMEOUT_S}).")})
}

fn output_cap_schema() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": MAX_OUTPUT_BYTES,
           "description": format!("Bytes kept of stdout and of stderr each (default {DEFAULT_OUTPUT_BYTES}); the rest is counted, not returned.")})
}

/// Every tool's definition, as `tools/list` answers it.
pub fn definitions() -> Vec<Value> {
    let mut exec = exec_props();
    exec["timeout"] = timeout_schema("the command");
    exec["max_output_bytes"] = output_cap_schema();
    exec["stdin"] = json!({"type": "string", "description": "Text written to the command's standard input (then closed)."});
    let mut start = exec_props();
    start["timeout"] = json!({"type": "number", "exclusiveMinimum": 0, "maximum": 86400,
        "description": "Seconds before the process is killed (default: none; it ends with its sandbox)."});
    let sandbox_id = sandbox_id_schema();
    let exec_id = json!({"type": "string", "minLength": 1, "description": "From exec_start."});
    let poll_out = object(
        json!({
            "exec_id": {"type": "string"},
            "running": {"type": "boolean"},
            "exit_code": {"type": ["integer", "null"]},
            "signal": {"type": ["string", "null"]},
            "lost": {"type": "boolean", "description": "The sandbox went away before the process reported its end."},
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "stdout_dropped_bytes": {"type": "integer"},
            "stderr_dropped_bytes": {"type": "integer"},
        }),
        &[
            "exec_id",
            "running",
            "exit_code",
            "signal",
            "lost",
            "stdout",
            "stderr",
            "stdout_dropped_bytes",
            "stderr_dropped_bytes",
        ],
    );
    let entry = object(
        json!({"name": {"type": "string"}, "path": {"type": "string"},
               "type": {"type": "string", "enum": ["file", "directory", "symlink"]},
               "size": {"type": "integer"}}),
        &["name", "path", "type", "size"],
    );
    vec![
        tool(
            "sandbox_create",
            "Creates a sandbox: an isolated machine with its own files, processes and (by policy) network. Returns its sandbox_id for the other tools. It is removed after `timeout` seconds, or by sandbox_kill.",
            object(json!({
                "template": {"type": "string", "minLength": 1, "description": "The template (default: base, the host's programs on a fresh filesystem)."},
                "timeout": {"type": "integer", "minimum": 1, "maximum": crate::e2b::models::MAX_TIMEOUT_SECS,
                            "description": format!("Seconds it lives (default {DEFAULT_SANDBOX_S}).")},
                "env": env_schema(),
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Labels shown by sandbox_list."},
            }), &[]),
            sandbox_schema(),
            annotations("Create a sandbox", false, false, false, false),
        ),
        tool(
            "sandbox_list",
            "Lists the caller's sandboxes.",
            object(json!({}), &[]),
            object(json!({"sandboxes": {"type": "array", "items": sandbox_schema()}}), &["sandboxes"]),
            annotations("List sandboxes", true, false, true, false),
        ),
        tool(
            "sandbox_kill",
            "Removes a sandbox and everything in it.",
            object(json!({"sandbox_id": {"type": "string", "minLength": 1}}), &["sandbox_id"]),
            object(json!({"sandbox_id": {"type": "string"}, "killed": {"type": "boolean"}}), &["sandbox_id", "killed"]),
            annotations("Kill a sandbox", false, true, true, false),
        ),
        tool(
            "sandbox_exec",
            "Runs a command in a sandbox to its end and returns its exit code and output. A non-zero exit or a timeout is an error result. Use exec_start for programs that run long or read input.",
            object(exec, &[]),
            finished_schema(),
            annotations("Run a command", false, true, false, true),
        ),
        tool(
            "run_code",
            "Runs a snippet of code in a sandbox (python, node, bash or sh) and returns its output. With context, it runs in a long-lived interpreter whose variables, imports and working directory persist between calls, and returns the value of the last expression (and matplotlib figures as PNG images) too.",
            object(json!({
                "sandbox_id": sandbox_id,
                "language": {"type": "string", "enum": ["python", "node", "bash", "sh"]},
                "code": {"type": "string"},
                "context": {"type": "string", "minLength": 1, "description":
                    "Run in a stateful code context: \"default\" (the language's default context of the sandbox, made at first use) or a context id (as the code interpreter's /contexts lists them). Omitted: a fresh process."},
                "env": env_schema(),
                "timeout": timeout_schema("the code"),
                "max_output_bytes": output_cap_schema(),
            }), &["language", "code"]),
            run_code_schema(),
            annotations("Run code", false, true, false, true),
        ),
        tool(
            "read_file",
            "Reads a text file of a sandbox (relative paths are under /home/user).",
            object(json!({
                "sandbox_id": sandbox_id_schema(),
                "path": {"type": "string", "minLength": 1},
                "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_READ_BYTES,
                              "description": format!("Bytes returned at most (default {DEFAULT_READ_BYTES}).")},
            }), &["path"]),
            object(json!({"sandbox_id": {"type": "string"}, "path": {"type": "string"}, "content": {"type": "string"},
                          "size": {"type": "integer"}, "truncated": {"type": "boolean"}}),
                   &["sandbox_id", "path", "content", "size", "truncated"]),
            annotations("Read a file", true, false, true, false),
        ),
        tool(
            "write_file",
            "Writes (creates or replaces) a text file in a sandbox, with its parent directories.",
            object(json!({
                "sandbox_id": sandbox_id_schema(),
                "path": {"type": "string", "minLength": 1},
                "content": {"type": "string"},
            }), &["path", "content"]),
            object(json!({"sandbox_id": {"type": "string"}, "path": {"type": "string"}, "size": {"type": "integer"}}),
                   &["sandbox_id", "path", "size"]),
            annotations("Write a file", false, true, true, false),
        ),
        tool(
            "list_files",
            "Lists a directory of a sandbox (default: /home/user).",
            object(json!({
                "sandbox_id": sandbox_id_schema(),
                "path": {"type": "string", "minLength": 1},
                "depth": {"type": "integer", "minimum": 1, "maximum": 8, "description": "Levels listed (default 1)."},
            }), &[]),
            object(json!({"sandbox_id": {"type": "string"}, "path": {"type": "string"},
                          "entries": {"type": "array", "items": entry}}),
                   &["sandbox_id", "path", "entries"]),
            annotations("List files", true, false, true, false),
        ),
        tool(
            "exec_start",
            "Starts a long-running process in a sandbox and returns an exec_id at once; read its output with exec_poll, feed it with exec_write_stdin, stop it with exec_signal.",
            object(start, &[]),
            object(json!({"exec_id": {"type": "string"}, "sandbox_id": {"type": "string"}, "pid": {"type": "integer"}}),
                   &["exec_id", "sandbox_id", "pid"]),
            annotations("Start a process", false, true, false, true),
        ),
        tool(
            "exec_poll",
            "Returns the output an exec session produced since the last poll, and whether it still runs (with its exit code once it ended; the session is then closed).",
            object(json!({
                "exec_id": exec_id.clone(),
                "wait_ms": {"type": "integer", "minimum": 0, "maximum": MAX_POLL_WAIT_MS,
                            "description": "Wait up to this long for new output or the end (default 0)."},
            }), &["exec_id"]),
            poll_out,
            annotations("Poll a process", true, false, false, false),
        ),
        tool(
            "exec_write_stdin",
            "Writes text to an exec session's standard input; close: true closes it (end of input).",
            object(json!({
                "exec_id": exec_id.clone(),
                "data": {"type": "string"},
                "close": {"type": "boolean", "description": "Close stdin after writing (default false)."},
            }), &["exec_id", "data"]),
            object(json!({"exec_id": {"type": "string"}, "written": {"type": "integer"}, "closed": {"type": "boolean"}}),
                   &["exec_id", "written", "closed"]),
            annotations("Write to a process", false, true, false, false),
        ),
        tool(
            "exec_signal",
            "Sends SIGTERM or SIGKILL to an exec session's process.",
            object(json!({
                "exec_id": exec_id,
                "signal": {"type": "string", "enum": ["SIGTERM", "SIGKILL"]},
            }), &["exec_id", "signal"]),
            object(json!({"exec_id": {"type": "string"}, "signal": {"type": "string"}}), &["exec_id", "signal"]),
            annotations("Signal a process", false, true, true, false),
        ),
    ]
}

/// A tool failure: a result with `isError: true`.
struct ToolError {
    message: String,
    structured: Option<Value>,
}

impl From<BackendError> for ToolError {
    fn from(e: BackendError) -> Self {
        ToolError {
            message: e.to_string(),
            structured: None,
        }
    }
}

impl From<String> for ToolError {
    fn from(message: String) -> Self {
        ToolError {
            message,
            structured: None,
        }
    }
}

type ToolResult = Result<(String, Value), ToolError>;

/// Calls tool `name` with `args` for the caller.
pub async fn call<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    name: &str,
    args: Map<String, Value>,
    trace: &mut Trace,
) -> Result<Value, RpcError> {
    let args = Value::Object(args);
    let r = match name {
        "sandbox_create" => sandbox_create(state, ctx, parse(name, args)?, trace).await,
        "sandbox_list" => sandbox_list(state, ctx, parse(name, args)?).await,
        "sandbox_kill" => sandbox_kill(state, ctx, parse(name, args)?, trace).await,
        "sandbox_exec" => sandbox_exec(state, ctx, parse(name, args)?, trace).await,
        "run_code" => run_code(state, ctx, parse(name, args)?, trace).await,
        "read_file" => read_file(state, ctx, parse(name, args)?, trace).await,
        "write_file" => write_file(state, ctx, parse(name, args)?, trace).await,
        "list_files" => list_files(state, ctx, parse(name, args)?, trace).await,
        "exec_start" => exec_start(state, ctx, parse(name, args)?, trace).await,
        "exec_poll" => exec_poll(state, ctx, parse(name, args)?, trace).await,
        "exec_write_stdin" => exec_write_stdin(state, ctx, parse(name, args)?, trace).await,
        "exec_signal" => exec_signal(state, ctx, parse(name, args)?, trace).await,
        other => {
            return Err(RpcError::new(
                INVALID_PARAMS,
                format!("Unknown tool: {other} (tools/list names the tools)"),
            ))
        }
    };
    Ok(match r {
        Ok((text, structured)) => json!({
            "content": [{"type": "text", "text": text}],
            "structuredContent": structured,
            "isError": false,
        }),
        Err(e) => {
            let mut v = json!({
                "content": [{"type": "text", "text": e.message}],
                "isError": true,
            });
            if let Some(s) = e.structured {
                v["structuredContent"] = s;
            }
            v
        }
    })
}

/// Bad arguments: a parse failure here is a tool error (the model can fix
/// its call), so it is carried inside `Ok(Err(..))`.
fn parse<T: DeserializeOwned>(tool: &str, args: Value) -> Result<Result<T, ToolError>, RpcError> {
    Ok(serde_json::from_value(args).map_err(|e| {
        ToolError::from(format!(
            "invalid arguments for {tool}: {e} (see its inputSchema in tools/list)"
        ))
    }))
}

/// Unwraps parsed arguments or returns the tool error.
macro_rules! args {
    ($a:expr) => {
        match $a {
            Ok(a) => a,
            Err(e) => return Err(e),
        }
    };
}

fn scope(ctx: &Ctx, sandbox_id: String) -> SandboxScope {
    SandboxScope {
        tenant: ctx.tenant.clone(),
        sandbox_id,
        user: None,
    }
}

/// The sandbox a call names, or the session's default one (made now if
/// it has none, or if its own ended).
async fn target<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    given: Option<String>,
    trace: &mut Trace,
) -> Result<SandboxScope, ToolError> {
    if let Some(id) = given {
        trace.sandbox = Some(id.clone());
        return Ok(scope(ctx, id));
    }
    let Some(session) = &ctx.session else {
        let why = match &ctx.era {
            Era::Modern(v) => format!("protocol {v} is stateless"),
            Era::Legacy(_) => "this request has no session".into(),
        };
        return Err(format!(
            "sandbox_id is required: {why}, so there is no session sandbox; create one with sandbox_create and pass its sandbox_id"
        )
        .into());
    };
    let mut own = session.default_sandbox.lock().await;
    if let Some(id) = own.clone() {
        match state.backend.get(&ctx.tenant, &id).await {
            Ok(_) => {
                // In use: it lives on while the session does.
                let _ = state
                    .backend
                    .set_timeout(&ctx.tenant, &id, SESSION_SANDBOX)
                    .await;
                trace.sandbox = Some(id.clone());
                return Ok(scope(ctx, id));
            }
            Err(BackendError::NotFound(_)) => *own = None,
            Err(e) => return Err(e.into()),
        }
    }
    let info = create(
        state,
        ctx,
        session.template.clone(),
        SESSION_SANDBOX,
        BTreeMap::new(),
        BTreeMap::from([("mcp_session".to_owned(), "default".to_owned())]),
    )
    .await?;
    *own = Some(info.sandbox_id.clone());
    trace.sandbox = Some(info.sandbox_id.clone());
    Ok(scope(ctx, info.sandbox_id))
}

/// Creates a sandbox as `POST /sandboxes` does.
async fn create<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    template: String,
    timeout: Duration,
    env: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
) -> Result<SandboxInfo, ToolError> {
    let token = crate::e2b::random_token().ok_or_else(|| {
        ToolError::from("no randomness for the sandbox's access token".to_owned())
    })?;
    Ok(state
        .backend
        .create(CreateSandbox {
            tenant: ctx.tenant.clone(),
            template,
            timeout,
            metadata,
            env_vars: env,
            allow_internet_access: None,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            network_rules: Default::default(),
            auto_pause: false,
            envd_access_token: token,
        })
        .await?)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn sandbox_json(s: &SandboxInfo) -> Value {
    json!({
        "sandbox_id": s.sandbox_id,
        "template": s.template_id,
        "state": if s.state == SandboxState::Paused { "paused" } else { "running" },
        "started_at": unix(s.started_at),
        "end_at": unix(s.end_at),
        "metadata": s.metadata,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    template: Option<String>,
    timeout: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

async fn sandbox_create<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<CreateArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let secs = a.timeout.unwrap_or(DEFAULT_SANDBOX_S);
    let timeout = crate::e2b::models::timeout_secs(Some(secs as i64), DEFAULT_SANDBOX_S)
        .map_err(|e| ToolError::from(e.message))?;
    let template = a.template.unwrap_or_else(|| "base".into());
    let info = create(state, ctx, template, timeout, a.env, a.metadata).await?;
    trace.sandbox = Some(info.sandbox_id.clone());
    crate::e2b::observe::note_sandbox(&info.sandbox_id);
    Ok((
        format!(
            "created sandbox {} (template {}, lives {secs} s)",
            info.sandbox_id, info.template_id
        ),
        sandbox_json(&info),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

async fn sandbox_list<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<NoArgs, ToolError>,
) -> ToolResult {
    let _ = args!(a);
    let all = state.backend.list(&ctx.tenant).await?;
    let text = if all.is_empty() {
        "no sandboxes".to_owned()
    } else {
        all.iter()
            .map(|s| format!("{} ({})", s.sandbox_id, s.template_id))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let items: Vec<Value> = all.iter().map(sandbox_json).collect();
    Ok((text, json!({ "sandboxes": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillArgs {
    sandbox_id: String,
}

async fn sandbox_kill<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<KillArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    trace.sandbox = Some(a.sandbox_id.clone());
    state.backend.kill(&ctx.tenant, &a.sandbox_id).await?;
    state.contexts.forget_sandbox(&ctx.tenant, &a.sandbox_id);
    if let Some(s) = &ctx.session {
        let mut own = s.default_sandbox.lock().await;
        if own.as_deref() == Some(a.sandbox_id.as_str()) {
            *own = None;
        }
    }
    Ok((
        format!("killed sandbox {}", a.sandbox_id),
        json!({"sandbox_id": a.sandbox_id, "killed": true}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    sandbox_id: Option<String>,
    argv: Option<Vec<String>>,
    command: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    timeout: Option<f64>,
    max_output_bytes: Option<u64>,
    stdin: Option<String>,
}

/// argv from `argv` or a shell `command` (exactly one).
fn argv_of(
    tool: &str,
    argv: Option<Vec<String>>,
    command: Option<String>,
) -> Result<Vec<String>, ToolError> {
    match (argv, command) {
        (Some(argv), None) if !argv.is_empty() => Ok(argv),
        (None, Some(c)) if !c.trim().is_empty() => Ok(vec![
            "/bin/sh".into(),
            "-c".into(),
            "if command -v bash >/dev/null 2>&1; then exec bash -c \"$0\"; else exec sh -c \"$0\"; fi"
                .into(),
            c,
        ]),
        (Some(_), Some(_)) => Err(format!("{tool}: give argv or command, not both").into()),
        _ => Err(format!(
            "{tool}: give argv (a non-empty array of strings) or command (a shell command line)"
        )
        .into()),
    }
}

fn timeout_of(secs: Option<f64>) -> Result<Duration, ToolError> {
    let s = secs.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(s > 0.0 && s <= MAX_TIMEOUT_S) {
        return Err(format!(
            "timeout must be more than 0 and at most {MAX_TIMEOUT_S} seconds, got {s}"
        )
        .into());
    }
    Ok(Duration::from_secs_f64(s))
}

fn cap_of(bytes: Option<u64>) -> Result<usize, ToolError> {
    let b = bytes.unwrap_or(DEFAULT_OUTPUT_BYTES);
    if b > MAX_OUTPUT_BYTES {
        return Err(format!("max_output_bytes must be at most {MAX_OUTPUT_BYTES}, got {b}").into());
    }
    Ok(b as usize)
}

fn signal_of(end: &ProcessEnd) -> Option<String> {
    (!end.exited).then(|| end.status.trim_start_matches("signal: ").to_owned())
}

/// The answer of a process run to its end: an error result unless it
/// exited 0.
fn finished(sandbox_id: &str, f: &Finished, timeout: Duration) -> ToolResult {
    let exit_code = f.end.as_ref().filter(|e| e.exited).map(|e| e.exit_code);
    let signal = f.end.as_ref().and_then(signal_of);
    let structured = json!({
        "sandbox_id": sandbox_id,
        "exit_code": exit_code,
        "signal": signal,
        "timed_out": f.timed_out,
        "stdout": f.stdout.text(),
        "stderr": f.stderr.text(),
        "stdout_dropped_bytes": f.stdout.dropped,
        "stderr_dropped_bytes": f.stderr.dropped,
        "duration_ms": f.duration.as_millis() as u64,
    });
    let mut text = f.stdout.text();
    push_dropped(&mut text, "stdout", &f.stdout);
    if !f.stderr.bytes.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&f.stderr.text());
    }
    push_dropped(&mut text, "stderr", &f.stderr);
    let verdict = if f.timed_out {
        Some(format!(
            "timed out after {} s and was killed",
            timeout.as_secs_f64()
        ))
    } else {
        match (&f.end, exit_code) {
            (_, Some(0)) => None,
            (_, Some(n)) => Some(format!("exit code {n}")),
            (Some(e), None) => Some(format!("killed ({})", e.status)),
            (None, None) => Some("the sandbox went away before the command ended".into()),
        }
    };
    match verdict {
        None => Ok((text, structured)),
        Some(v) => {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[{v}]"));
            Err(ToolError {
                message: text,
                structured: Some(structured),
            })
        }
    }
}

fn push_dropped(text: &mut String, what: &str, c: &Capture) {
    if c.dropped > 0 {
        text.push_str(&format!(
            "\n[{} more bytes of {what} not shown]\n",
            c.dropped
        ));
    }
}

async fn sandbox_exec<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<ExecArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let argv = argv_of("sandbox_exec", a.argv, a.command)?;
    let timeout = timeout_of(a.timeout)?;
    let cap = cap_of(a.max_output_bytes)?;
    let sc = target(state, ctx, a.sandbox_id, trace).await?;
    let cmd = Command {
        argv,
        env: a.env,
        cwd: a.cwd,
    };
    let f = exec::run_to_end(&*state.backend, &sc, &cmd, a.stdin.as_deref(), timeout, cap).await?;
    finished(&sc.sandbox_id, &f, timeout)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunCodeArgs {
    sandbox_id: Option<String>,
    language: String,
    code: String,
    context: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<f64>,
    max_output_bytes: Option<u64>,
}

async fn run_code<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<RunCodeArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let (interp, flag) = match a.language.as_str() {
        "python" => ("python3", "-c"),
        "node" => ("node", "-e"),
        "bash" => ("bash", "-c"),
        "sh" => ("sh", "-c"),
        other => {
            return Err(format!(
                "run_code: language {other:?} is not supported: use python, node, bash or sh"
            )
            .into())
        }
    };
    let timeout = timeout_of(a.timeout)?;
    let cap = cap_of(a.max_output_bytes)?;
    let sc = target(state, ctx, a.sandbox_id, trace).await?;
    if let Some(context) = a.context {
        let run = ContextRun {
            language: &a.language,
            context,
            code: a.code,
            env: a.env,
            timeout,
            cap,
        };
        return in_context(state, &sc, run).await;
    }
    let cmd = Command {
        argv: vec![interp.into(), flag.into(), a.code],
        env: a.env,
        cwd: None,
    };
    let f = exec::run_to_end(&*state.backend, &sc, &cmd, None, timeout, cap).await?;
    finished(&sc.sandbox_id, &f, timeout)
}

/// A `run_code` call with a context.
struct ContextRun<'a> {
    language: &'a str,
    context: String,
    code: String,
    env: BTreeMap<String, String>,
    timeout: Duration,
    cap: usize,
}

/// Largest total size of the rich results one call returns.
const MAX_RESULTS_BYTES: usize = 8 << 20;

/// Runs a cell in a stateful context ([`crate::contexts`], the code
/// interpreter's own path) and gathers its events.
async fn in_context<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    sc: &SandboxScope,
    run: ContextRun<'_>,
) -> ToolResult {
    use crate::contexts::{Event, Language, RunCode, Target};
    let language = Language::parse(Some(run.language)).map_err(|e| e.to_string())?;
    let target = if run.context == "default" {
        Target::Default(language)
    } else {
        let known = state.contexts.list(sc);
        let Some(c) = known.iter().find(|c| c.id == run.context) else {
            return Err(format!(
                "no code context {:?} in sandbox {} (use \"default\", or an id from its /contexts)",
                run.context, sc.sandbox_id
            )
            .into());
        };
        if c.language != language {
            return Err(format!(
                "context {} runs {}, not {}",
                c.id,
                c.language.name(),
                run.language
            )
            .into());
        }
        Target::Context(run.context.clone())
    };
    let started = std::time::Instant::now();
    let req = RunCode {
        code: run.code,
        target,
        env_vars: run.env,
        timeout: Some(run.timeout),
    };
    let mut exe = state
        .contexts
        .execute(&state.backend, sc, req)
        .await
        .map_err(|e| e.to_string())?;
    let (mut out, mut err) = (Capture::default(), Capture::default());
    let (mut results, mut results_bytes, mut count) = (Vec::new(), 0usize, None);
    let mut error: Option<(String, String, String)> = None;
    while let Some(ev) = exe.events.recv().await {
        match ev {
            Event::ExecutionCount(n) => count = Some(n),
            Event::Stdout(t) => out.push(t.as_bytes(), run.cap),
            Event::Stderr(t) => err.push(t.as_bytes(), run.cap),
            Event::Result(m) => {
                let size = Value::Object(m.clone()).to_string().len();
                if results_bytes + size <= MAX_RESULTS_BYTES {
                    results_bytes += size;
                    results.push(Value::Object(m));
                } else {
                    err.push(b"[a result was dropped: too large]\n", run.cap);
                }
            }
            Event::Error {
                name,
                value,
                traceback,
            } => error = Some((name, value, traceback)),
        }
    }
    let timed_out = error.as_ref().is_some_and(|e| e.0 == "TimeoutError");
    let structured = json!({
        "sandbox_id": sc.sandbox_id,
        "context": exe.context.id,
        "execution_count": count,
        "exit_code": null,
        "signal": null,
        "timed_out": timed_out,
        "stdout": out.text(),
        "stderr": err.text(),
        "stdout_dropped_bytes": out.dropped,
        "stderr_dropped_bytes": err.dropped,
        "duration_ms": started.elapsed().as_millis() as u64,
        "results": results,
        "error": error.as_ref().map(|(n, v, t)| json!({"name": n, "value": v, "traceback": t})),
    });
    let mut text = out.text();
    push_dropped(&mut text, "stdout", &out);
    for r in &results {
        if let Some(t) = r.get("text").and_then(Value::as_str) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(t);
        }
    }
    if !err.bytes.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&err.text());
    }
    match error {
        None => Ok((text, structured)),
        Some((name, value, traceback)) => {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[{name}: {value}]"));
            if !traceback.is_empty() {
                text.push('\n');
                text.push_str(&traceback);
            }
            Err(ToolError {
                message: text,
                structured: Some(structured),
            })
        }
    }
}

/// A path as the sandbox resolves it: absolute, `.` and `..` resolved
/// against the home directory (never above `/`: a path cannot leave the
/// sandbox's own filesystem).
fn sandbox_path(path: &str) -> Result<String, ToolError> {
    if path.is_empty() || path.contains('\0') {
        return Err("path must be a non-empty string without NUL bytes"
            .to_owned()
            .into());
    }
    Ok(nanoclaw_agent::host::absolute(
        crate::keepers::E2B_HOME,
        path,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    sandbox_id: Option<String>,
    path: String,
    max_bytes: Option<u64>,
}

async fn read_file<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<ReadArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let path = sandbox_path(&a.path)?;
    let max = a
        .max_bytes
        .unwrap_or(DEFAULT_READ_BYTES)
        .clamp(1, MAX_READ_BYTES) as usize;
    let sc = target(state, ctx, a.sandbox_id, trace).await?;
    let mut dl = state.backend.read_file(&sc, &path).await?;
    let (mut buf, mut size) = (Vec::new(), 0u64);
    while let Some(chunk) = dl.body.next().await {
        let chunk = chunk.map_err(|e| format!("reading {path}: {e}"))?;
        size += chunk.len() as u64;
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..room.min(chunk.len())]);
    }
    let truncated = size > buf.len() as u64;
    let content = String::from_utf8(buf).map_err(|_| {
        format!("{path} is not UTF-8 text: read it with sandbox_exec (e.g. base64 {path})")
    })?;
    Ok((
        content.clone(),
        json!({"sandbox_id": sc.sandbox_id, "path": path, "content": content, "size": size, "truncated": truncated}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    sandbox_id: Option<String>,
    path: String,
    content: String,
}

async fn write_file<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<WriteArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let path = sandbox_path(&a.path)?;
    let sc = target(state, ctx, a.sandbox_id, trace).await?;
    let size = a.content.len();
    let body = futures_util::stream::once(async move {
        Ok::<_, std::io::Error>(bytes::Bytes::from(a.content.into_bytes()))
    });
    state
        .backend
        .write_file(&sc, &path, &BTreeMap::new(), Box::pin(body))
        .await?;
    Ok((
        format!("wrote {size} bytes to {path}"),
        json!({"sandbox_id": sc.sandbox_id, "path": path, "size": size}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    sandbox_id: Option<String>,
    path: Option<String>,
    depth: Option<u32>,
}

fn entry_json(e: &EntryInfo) -> Value {
    let kind = match e.file_type {
        FileType::File => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
    };
    json!({"name": e.name, "path": e.path, "type": kind, "size": e.size})
}

async fn list_files<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<ListArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let path = sandbox_path(a.path.as_deref().unwrap_or(crate::keepers::E2B_HOME))?;
    let depth = a.depth.unwrap_or(1).clamp(1, 8);
    let sc = target(state, ctx, a.sandbox_id, trace).await?;
    let mut entries = state.backend.list_dir(&sc, &path, depth).await?;
    entries.sort_by(|x, y| x.path.cmp(&y.path));
    let text = entries
        .iter()
        .map(|e| {
            let slash = if e.file_type == FileType::Directory {
                "/"
            } else {
                ""
            };
            format!("{}{slash}", e.path)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let items: Vec<Value> = entries.iter().map(entry_json).collect();
    Ok((
        if text.is_empty() {
            format!("{path} is empty")
        } else {
            text
        },
        json!({"sandbox_id": sc.sandbox_id, "path": path, "entries": items}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartArgs {
    sandbox_id: Option<String>,
    argv: Option<Vec<String>>,
    command: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    timeout: Option<f64>,
}

async fn exec_start<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<StartArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let argv = argv_of("exec_start", a.argv, a.command)?;
    let timeout = match a.timeout {
        None => None,
        Some(s) if s > 0.0 && s <= 86400.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(
                format!("timeout must be more than 0 and at most 86400 seconds, got {s}").into(),
            )
        }
    };
    let sc = target(state, ctx, a.sandbox_id, trace).await?;
    let cmd = Command {
        argv,
        env: a.env,
        cwd: a.cwd,
    };
    let s = state
        .mcp
        .execs
        .start(&*state.backend, &sc, &cmd, true, timeout)
        .await?;
    Ok((
        format!(
            "started pid {} in sandbox {} as {}",
            s.pid, s.sandbox_id, s.id
        ),
        json!({"exec_id": s.id, "sandbox_id": s.sandbox_id, "pid": s.pid}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollArgs {
    exec_id: String,
    wait_ms: Option<u64>,
}

async fn exec_poll<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<PollArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let wait = Duration::from_millis(a.wait_ms.unwrap_or(0).min(MAX_POLL_WAIT_MS));
    if let Ok(s) = state.mcp.execs.get(&ctx.tenant, &a.exec_id) {
        trace.sandbox = Some(s.sandbox_id.clone());
    }
    let p = state.mcp.execs.poll(&ctx.tenant, &a.exec_id, wait).await?;
    let running = p.end.is_none() && !p.lost;
    let exit_code = p.end.as_ref().filter(|e| e.exited).map(|e| e.exit_code);
    let signal = p.end.as_ref().and_then(signal_of);
    let mut text = p.stdout.text();
    push_dropped(&mut text, "stdout", &p.stdout);
    if !p.stderr.bytes.is_empty() {
        text.push_str("[stderr]\n");
        text.push_str(&p.stderr.text());
    }
    push_dropped(&mut text, "stderr", &p.stderr);
    let state_line = match (&p.end, p.lost) {
        (Some(e), _) => format!("[ended: {}]", e.status),
        (None, true) => "[lost: the sandbox went away]".to_owned(),
        (None, false) => "[running]".to_owned(),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&state_line);
    Ok((
        text,
        json!({
            "exec_id": a.exec_id, "running": running, "exit_code": exit_code, "signal": signal,
            "lost": p.lost, "stdout": p.stdout.text(), "stderr": p.stderr.text(),
            "stdout_dropped_bytes": p.stdout.dropped, "stderr_dropped_bytes": p.stderr.dropped,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinArgs {
    exec_id: String,
    data: String,
    #[serde(default)]
    close: bool,
}

async fn exec_write_stdin<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<StdinArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    if let Ok(s) = state.mcp.execs.get(&ctx.tenant, &a.exec_id) {
        trace.sandbox = Some(s.sandbox_id.clone());
    }
    state
        .mcp
        .execs
        .write_stdin(&*state.backend, &ctx.tenant, &a.exec_id, &a.data, a.close)
        .await?;
    Ok((
        format!(
            "wrote {} bytes{}",
            a.data.len(),
            if a.close { " and closed stdin" } else { "" }
        ),
        json!({"exec_id": a.exec_id, "written": a.data.len(), "closed": a.close}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalArgs {
    exec_id: String,
    signal: String,
}

async fn exec_signal<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    a: Result<SignalArgs, ToolError>,
    trace: &mut Trace,
) -> ToolResult {
    let a = args!(a);
    let sig = match a.signal.as_str() {
        "SIGTERM" => Signal::Term,
        "SIGKILL" => Signal::Kill,
        other => return Err(format!("signal {other:?}: use SIGTERM or SIGKILL").into()),
    };
    if let Ok(s) = state.mcp.execs.get(&ctx.tenant, &a.exec_id) {
        trace.sandbox = Some(s.sandbox_id.clone());
    }
    state
        .mcp
        .execs
        .signal(&*state.backend, &ctx.tenant, &a.exec_id, sig)
        .await?;
    Ok((
        format!("sent {} to {}", a.signal, a.exec_id),
        json!({"exec_id": a.exec_id, "signal": a.signal}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_is_defined_once_with_a_closed_schema() {
        let defs = definitions();
        let names: Vec<&str> = defs.iter().filter_map(|d| d["name"].as_str()).collect();
        assert_eq!(names, NAMES);
        for d in &defs {
            assert_eq!(
                d["inputSchema"]["additionalProperties"], false,
                "{}",
                d["name"]
            );
            assert_eq!(d["outputSchema"]["type"], "object");
            for hint in [
                "readOnlyHint",
                "destructiveHint",
                "idempotentHint",
                "openWorldHint",
            ] {
                assert!(d["annotations"][hint].is_boolean(), "{} {hint}", d["name"]);
            }
        }
    }

    #[test]
    fn commands_need_exactly_one_form() {
        assert!(argv_of("t", None, None).is_err());
        assert!(argv_of("t", Some(vec![]), None).is_err());
        assert!(argv_of("t", Some(vec!["a".into()]), Some("b".into())).is_err());
        assert_eq!(
            argv_of("t", Some(vec!["ls".into()]), None).ok(),
            Some(vec!["ls".to_string()])
        );
        let sh = argv_of("t", None, Some("echo hi".into()))
            .ok()
            .unwrap_or_default();
        assert_eq!(sh.last().map(String::as_str), Some("echo hi"));
    }

    #[test]
    fn paths_stay_inside_the_sandbox_root() {
        assert_eq!(
            sandbox_path("../../etc/shadow").ok().as_deref(),
            Some("/etc/shadow")
        );
        assert_eq!(sandbox_path("a/b").ok().as_deref(), Some("/home/user/a/b"));
        assert!(sandbox_path("").is_err());
        assert!(sandbox_path("a\0b").is_err());
    }
}
