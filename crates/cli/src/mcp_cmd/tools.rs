//! The tools of `nanoclaw mcp`: the agent's own definitions (schemas and
//! strict parsing from `nanoclaw_agent::tools`, file operations from
//! `nanoclaw_agent::host::ExecHost`), run in the session's one sandbox.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use nanoclaw_agent::gate::{AgentPolicy, Verdict};
use nanoclaw_agent::host::{absolute, Command, ExecHost, Host};
use nanoclaw_agent::tools::{self as agent_tools, Action};
use nanoclaw_policy::Resolved;
use nanoclaw_sandbox::keeper::Remote;
use nanoclaw_sandbox::native::session::{EntryInfo, EntryKind};
use nanoclaw_sandbox::{Outcome, SandboxSpec};
use serde_json::{json, Value};

use super::{RpcError, INVALID_PARAMS};
use crate::config_cmd::PolicyArgs;

/// The tools offered, in order (when the policy allows them).
pub const OFFERED: &[&str] = &["run_code", "exec", "read_file", "write_file", "list_files"];

/// How long the server's own sandbox may live at most (a keeper removes
/// it then even if this process was SIGKILLed).
const OWN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Where the session's sandbox comes from.
enum Source {
    /// The agent's scoped sandbox (kept when the server ends).
    Scoped {
        spec: Box<SandboxSpec>,
        resolved: Box<Resolved>,
        config: PathBuf,
    },
    /// A sandbox of our own, as `sandbox create` makes it (removed at the
    /// end).
    Own,
}

/// The tools and the sandbox they run in.
pub(crate) struct Tools {
    names: Vec<&'static str>,
    policy: Option<AgentPolicy>,
    source: Source,
    workdir: &'static str,
    host: Option<ExecHost<Remote>>,
    /// The id of the sandbox this server made and must remove (shared
    /// with the signal thread).
    owned: Arc<Mutex<Option<String>>>,
}

impl Tools {
    /// The tools of `policy` (no sandbox yet: it is made at the first call).
    pub(crate) fn new(policy: &PolicyArgs) -> Result<Tools> {
        if !policy.is_requested() {
            return Ok(Tools {
                names: OFFERED.to_vec(),
                policy: None,
                source: Source::Own,
                workdir: "/tmp",
                host: None,
                owned: Arc::new(Mutex::new(None)),
            });
        }
        let (spec, resolved) = crate::scope_cmd::policy_only_spec(policy)?;
        let config = crate::scope_cmd::config_path(policy)?;
        let Some((_, _, loaded)) = crate::config_cmd::find_and_load(Some(&config))? else {
            bail!("cannot read the config file {}", config.display());
        };
        let p = AgentPolicy::from_config(&loaded.config, &resolved);
        let names: Vec<&'static str> = OFFERED
            .iter()
            .copied()
            .filter(|t| p.tool_allowed(t).is_ok())
            .collect();
        if names.is_empty() {
            eprintln!("nanoclaw: warning: the policy allows none of the MCP tools ({}): the server offers none", OFFERED.join(", "));
        }
        Ok(Tools {
            names,
            policy: Some(p),
            workdir: if resolved.workspace.is_some() {
                "/workspace"
            } else {
                "/tmp"
            },
            source: Source::Scoped {
                spec: Box::new(spec),
                resolved: Box::new(resolved),
                config,
            },
            host: None,
            owned: Arc::new(Mutex::new(None)),
        })
    }

    /// Removes the server's own sandbox when a signal ends the process.
    pub(crate) fn cleanup_on_signals(&self) -> Result<()> {
        let owned = Arc::clone(&self.owned);
        // SAFETY: sigset_t is plain data, initialised by sigemptyset
        // before use; blocking the signals in this thread (before any
        // other exists) makes every later thread inherit the mask, so only
        // sigwait below receives them. Children get an empty mask (std
        // resets it when it spawns).
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                bail!("cannot block signals for the MCP server");
            }
            set
        };
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait on a valid set and a valid out pointer.
                while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
                remove_owned(&owned);
                std::process::exit(128 + sig);
            })
            .context("starting the signal thread")?;
        Ok(())
    }

    /// Removes the server's own sandbox, if it made one.
    pub(crate) fn cleanup(&mut self) {
        self.host = None;
        remove_owned(&self.owned);
    }

    /// `tools/list`'s tools.
    pub(crate) fn list(&self) -> Vec<Value> {
        self.names.iter().filter_map(|n| definition(n)).collect()
    }

    /// `tools/call`: a result (`isError` for a failed call), or a protocol
    /// error for a tool that is not offered.
    pub(crate) fn call(&mut self, name: &str, args: &Value) -> Result<Value, RpcError> {
        if !self.names.contains(&name) {
            let why = self
                .policy
                .as_ref()
                .and_then(|p| p.tool_allowed(name).err())
                .filter(|_| OFFERED.contains(&name))
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            return Err(RpcError::new(
                INVALID_PARAMS,
                format!("Unknown tool: {name}{why}"),
            ));
        }
        let action = match agent_tools::parse(name, args) {
            Ok(a) => a,
            Err(e) => return Ok(failed(format!("invalid arguments for {name}: {e}"))),
        };
        if let Err(e) = self.allowed(&action) {
            return Ok(failed(e));
        }
        let workdir = self.workdir;
        let host = match self.host() {
            Ok(h) => h,
            Err(e) => return Ok(failed(format!("the sandbox could not be made: {e:#}"))),
        };
        Ok(match run(host, workdir, action) {
            Ok(v) => v,
            Err(e) => failed(e),
        })
    }

    /// The policy's verdict on one call.
    fn allowed(&self, action: &Action) -> Result<(), String> {
        if let Action::Exec { elevated: true, .. } = action {
            return Err("elevated exec (on the host) is not available over MCP".into());
        }
        let Some(p) = &self.policy else {
            return Ok(());
        };
        match p.decide(action, self.workdir) {
            Verdict::Allow => Ok(()),
            Verdict::Deny { reason } => Err(format!("refused by policy: {reason}")),
            Verdict::Ask { reason } => Err(format!(
                "this call needs a person's approval ({reason}), which `nanoclaw mcp` cannot ask for; allow it in the config"
            )),
        }
    }

    /// The session's sandbox, made at the first call.
    fn host(&mut self) -> Result<&mut ExecHost<Remote>> {
        if self.host.is_none() {
            let (remote, base) = match &self.source {
                Source::Scoped {
                    spec,
                    resolved,
                    config,
                } => {
                    let (remote, _, base) =
                        crate::scope_cmd::scoped_for_spec(spec, resolved, config)?;
                    (remote, base)
                }
                Source::Own => {
                    // Held while the sandbox is made: a signal now removes
                    // it once it exists.
                    let mut owned = lock(&self.owned);
                    let labels = vec![("nanoclaw.mcp".to_string(), std::process::id().to_string())];
                    let (remote, st, base) =
                        crate::sandbox_cmd::create_default(labels, OWN_LIFETIME)?;
                    *owned = Some(st.id.clone());
                    (remote, base)
                }
            };
            self.host = Some(ExecHost::new(remote, base, self.workdir));
        }
        self.host
            .as_mut()
            .ok_or_else(|| anyhow!("the sandbox is gone"))
    }
}

fn lock(m: &Mutex<Option<String>>) -> MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_owned(owned: &Mutex<Option<String>>) {
    if let Some(id) = lock(owned).take() {
        if let Err(e) = crate::sandbox_cmd::remove(&id) {
            eprintln!("nanoclaw: removing the MCP session's sandbox {id}: {e:#}");
        }
    }
}

/// One tool's definition for `tools/list`.
fn definition(name: &str) -> Option<Value> {
    let spec = agent_tools::spec(name)?;
    let mut schema = spec.input_schema;
    if name == "exec" {
        // Host execution is never offered over MCP.
        if let Some(p) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            p.remove("elevated");
        }
    }
    let (title, read_only) = match name {
        "run_code" => ("Run code in the sandbox", false),
        "exec" => ("Run a shell command in the sandbox", false),
        "read_file" => ("Read a file in the sandbox", true),
        "write_file" => ("Write a file in the sandbox", false),
        _ => ("List a directory in the sandbox", true),
    };
    Some(json!({
        "name": name,
        "title": title,
        "description": spec.description,
        "inputSchema": schema,
        "annotations": {
            "title": title,
            "readOnlyHint": read_only,
            // Commands and writes can change or delete files, but only
            // the sandbox's.
            "destructiveHint": !read_only,
            "idempotentHint": read_only || name == "write_file",
            // Whatever the sandbox's network policy lets through.
            "openWorldHint": matches!(name, "run_code" | "exec"),
        },
    }))
}

/// A failed call: `isError` with the reason.
fn failed(msg: impl Into<String>) -> Value {
    json!({"content": [{"type": "text", "text": msg.into()}], "isError": true})
}

/// Runs one parsed call in the sandbox.
fn run(host: &mut ExecHost<Remote>, workdir: &str, action: Action) -> Result<Value, String> {
    match action {
        Action::Exec {
            command,
            cwd,
            timeout,
            ..
        } => {
            let cmd = Command {
                argv: vec!["/bin/sh".into(), "-c".into(), command],
                cwd: cwd.map(|c| absolute(workdir, &c)),
                timeout,
                ..Command::default()
            };
            host.exec(cmd).map(|o| outcome(&o, host.max_timeout()))
        }
        Action::RunCode {
            language,
            code,
            timeout,
        } => {
            let lang = crate::run_cmd::Lang::from_str(&language, true)?;
            let (argv, env) = crate::run_cmd::snippet_argv(lang, None, code, &[])
                .map_err(|e| format!("{e:#}"))?;
            let cmd = Command {
                argv,
                env,
                timeout,
                ..Command::default()
            };
            host.exec(cmd).map(|o| outcome(&o, host.max_timeout()))
        }
        Action::ReadFile { path } => {
            let p = absolute(workdir, &path);
            let bytes = host.read(&p)?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            Ok(json!({
                "content": [{"type": "text", "text": text}],
                "structuredContent": {"path": p, "size": bytes.len()},
                "isError": false,
            }))
        }
        Action::WriteFile { path, content } => {
            let p = absolute(workdir, &path);
            let n = content.len();
            host.write(&p, content.into_bytes())?;
            Ok(json!({
                "content": [{"type": "text", "text": format!("wrote {n} bytes to {p}")}],
                "structuredContent": {"path": p, "size": n},
                "isError": false,
            }))
        }
        Action::ListFiles { path } => {
            let p = absolute(workdir, &path);
            let entries = host.list(&p)?;
            Ok(listing(&p, &entries))
        }
        other => Err(format!("the tool {} is not offered over MCP", other.tool())),
    }
}

/// The result of a command: its output as text, and as structured content.
fn outcome(o: &Outcome, max: Duration) -> Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let mut text = stdout.to_string();
    if !stderr.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&stderr);
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let killed = o.killed_by.map(|k| {
        serde_json::to_value(k)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{k:?}"))
    });
    match (&killed, o.exit_code) {
        (Some(k), _) if k == "timeout" => text.push_str(&format!(
            "[killed: timeout (at most {}s)]",
            max.as_secs_f64()
        )),
        (Some(k), _) => text.push_str(&format!("[killed: {k}]")),
        (None, Some(c)) => text.push_str(&format!("[exit code {c}]")),
        (None, None) => text.push_str(&format!("[signal {}]", o.signal.unwrap_or(0))),
    }
    let ok = killed.is_none() && o.exit_code == Some(0);
    json!({
        "content": [{"type": "text", "text": text}],
        "structuredContent": {
            "exit_code": o.exit_code,
            "signal": o.signal,
            "killed_by": killed,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": o.stdout_truncated,
            "stderr_truncated": o.stderr_truncated,
            "duration_ms": o.duration.as_millis() as u64,
            "sandbox_id": o.sandbox_id,
        },
        "isError": !ok,
    })
}

/// The result of `list_files`.
fn listing(path: &str, entries: &[EntryInfo]) -> Value {
    let text: Vec<String> = entries
        .iter()
        .map(|e| {
            let kind = match e.kind {
                EntryKind::Dir => "dir",
                EntryKind::File => "file",
                EntryKind::Symlink => "link",
                EntryKind::Other => "other",
            };
            format!(
                "{kind:<5} {:>10} {:04o} {}",
                e.size,
                e.mode & 0o7777,
                e.name
            )
        })
        .collect();
    json!({
        "content": [{"type": "text", "text": if text.is_empty() { "(empty)".to_string() } else { text.join("\n") }}],
        "structuredContent": {"path": path, "entries": entries},
        "isError": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offered_tool_has_a_definition_without_host_execution() {
        for t in OFFERED {
            let d = definition(t).expect("definition");
            assert_eq!(d["name"], *t);
            assert_eq!(d["inputSchema"]["type"], "object");
        }
        let exec = definition("exec").expect("exec");
        assert!(exec["inputSchema"]["properties"].get("elevated").is_none());
        assert_eq!(
            definition("read_file").expect("d")["annotations"]["readOnlyHint"],
            true
        );
    }
}
