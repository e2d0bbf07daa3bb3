//! `nanoclaw sandbox explain`: the effective policy in words (or JSON),
//! with sources and a fix-it list. It never calls a session sandboxed when
//! its tools would run on the host.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use crate::model::{Access, NetworkMode, SandboxMode, Scope, WorkspaceAccess};
use crate::resolve::{ElevatedGate, FailingGate, Resolved, Source};
use crate::tools::ToolDecision;

/// One config change the operator may want to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FixIt {
    /// The key to change.
    pub key: String,
    /// The change, e.g. `set to all`.
    pub change: String,
    /// Why.
    pub why: String,
}

fn fix(key: impl Into<String>, change: impl Into<String>, why: impl Into<String>) -> FixIt {
    FixIt {
        key: key.into(),
        change: change.into(),
        why: why.into(),
    }
}

/// The key to write for a sandbox setting of this resolution's agent.
fn sandbox_key(r: &Resolved, name: &str) -> String {
    match r.sources.get("mode").map(|p| &p.source) {
        Some(Source::Agent(_)) => {
            let k = &r.sources["mode"].key;
            k.trim_end_matches(".mode").to_string() + "." + name
        }
        _ => format!("agents.defaults.sandbox.{name}"),
    }
}

/// The fix-it list: config keys to change to tighten the policy or make
/// the elevated gates pass.
pub fn fix_its(r: &Resolved) -> Vec<FixIt> {
    let mut out = Vec::new();
    let mode_key = r
        .sources
        .get("mode")
        .map(|p| p.key.clone())
        .unwrap_or_default();
    match (r.mode, r.sandboxed) {
        (SandboxMode::Off, _) => out.push(fix(
            if mode_key == "builtin" {
                sandbox_key(r, "mode")
            } else {
                mode_key.clone()
            },
            "set to all (or non-main)",
            "tools currently run on the host with no sandbox",
        )),
        (SandboxMode::NonMain, false) => out.push(fix(
            mode_key.clone(),
            "set to all",
            "the main session's tools run on the host",
        )),
        _ => {}
    }
    if r.sandboxed {
        if r.network.mode == NetworkMode::Open {
            out.push(fix(
                r.sources["network"].key.clone(),
                "set to allowlist and list hosts in allowedHosts (or none)",
                "open network lets sandboxed code reach any host",
            ));
        }
        if r.workspace_access == WorkspaceAccess::Rw {
            out.push(fix(
                r.sources["workspace_access"].key.clone(),
                "set to ro if the agent only reads",
                "the workspace is writable from the sandbox",
            ));
        }
        for m in &r.mounts {
            if m.mount.access == Access::Rw
                && m.from.key
                    != r.sources
                        .get("workspace")
                        .map(|p| p.key.clone())
                        .unwrap_or_default()
            {
                out.push(fix(
                    m.from.key.clone(),
                    "make it :ro if writes are not needed",
                    format!("{} is writable from the sandbox", m.mount.host.display()),
                ));
            }
        }
    }
    if r.scope == Scope::Shared && r.warnings.iter().any(|w| w.contains("bindMounts ignored")) {
        out.push(fix(
            r.sources["scope"].key.clone(),
            "set to agent, or move the agent's binds to agents.defaults.sandbox.bindMounts",
            "per-agent bind mounts are ignored in shared scope",
        ));
    }
    let moot = r.elevated.failing_gate == Some(ElevatedGate::NotSandboxed);
    for FailingGate { gate, key } in r.elevated.failing.iter().filter(|_| !moot) {
        let f = match gate {
            ElevatedGate::NotSandboxed => continue,
            ElevatedGate::GlobalDisabled => fix(
                key,
                "set to true",
                "elevated (exec on the host) is off globally",
            ),
            ElevatedGate::GlobalAllowFrom => fix(
                key,
                "add the sender (channel: [id])",
                "the sender may not use elevated",
            ),
            ElevatedGate::AgentDisabled => {
                fix(key, "set to true", "elevated is not enabled for this agent")
            }
            ElevatedGate::AgentAllowFrom => fix(
                key,
                "add the sender (channel: [id])",
                "the sender may not use elevated for this agent",
            ),
            ElevatedGate::ExecDenied => fix(
                key,
                "remove exec (elevated never overrides deny)",
                "exec is denied",
            ),
            ElevatedGate::ExecNotAllowed => fix(
                key,
                "add exec (elevated grants no tool)",
                "exec is not in the allow list",
            ),
        };
        out.push(f);
    }
    out
}

fn size(b: u64) -> String {
    const U: [(&str, u64); 4] = [
        ("t", 1 << 40),
        ("g", 1 << 30),
        ("m", 1 << 20),
        ("k", 1 << 10),
    ];
    for (u, m) in U {
        if b >= m && (b / m) * m == b {
            return format!("{}{u}", b / m);
        }
    }
    format!("{b}b")
}

fn gate_text(g: &ElevatedGate) -> &'static str {
    match g {
        ElevatedGate::NotSandboxed => {
            "not sandboxed: exec already runs on the host, elevated changes nothing"
        }
        ElevatedGate::GlobalDisabled => "global gate: tools.elevated.enabled is not true",
        ElevatedGate::GlobalAllowFrom => "global allowFrom: the sender is not listed",
        ElevatedGate::AgentDisabled => "agent gate: elevated is not enabled for this agent",
        ElevatedGate::AgentAllowFrom => "agent allowFrom: the sender is not listed",
        ElevatedGate::ExecDenied => "exec is denied (elevated never overrides deny)",
        ElevatedGate::ExecNotAllowed => "exec is not in an allow list (elevated grants no tool)",
    }
}

/// The explanation as text.
pub fn explain_text(r: &Resolved, config: Option<&Path>) -> String {
    let mut o = String::new();
    let src = |name: &str| -> String {
        r.sources
            .get(name)
            .map(|p| format!("[{} {}]", p.source, p.key))
            .unwrap_or_default()
    };
    let _ = writeln!(
        o,
        "agent: {}   session: {}   main session: {}",
        r.agent.as_deref().unwrap_or("(defaults)"),
        r.session,
        r.main_session
    );
    let _ = writeln!(
        o,
        "config: {}",
        config
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none found (built-in defaults)".into())
    );
    let _ = writeln!(o);
    if r.sandboxed {
        let _ = writeln!(
            o,
            "SANDBOXED: yes: this session's tools run in a nanoclaw sandbox"
        );
    } else {
        let _ = writeln!(o, "SANDBOXED: NO: this session's tools run ON THE HOST, with no sandbox, no limits and the host's network");
    }
    let _ = writeln!(
        o,
        "mode:             {:<14} {}",
        r.mode.as_str(),
        src("mode")
    );
    if r.mode == SandboxMode::NonMain {
        let _ = writeln!(o, "                  (non-main: session {:?} runs on the host; every other session is sandboxed)", r.main_session);
    }
    if r.sandboxed {
        let _ = writeln!(
            o,
            "scope:            {:<14} {}   sandbox key: {}",
            r.scope.as_str(),
            src("scope"),
            r.sandbox_key
        );
        let _ = writeln!(
            o,
            "workspace access: {:<14} {}",
            r.workspace_access.as_str(),
            src("workspace_access")
        );
        if let Some(t) = &r.team {
            let _ = writeln!(
                o,
                "team:             {t:<14} (its space at /team; other teams' only where granted, at /teams/<name>)"
            );
        }
        let _ = writeln!(o, "mounts:");
        if r.mounts.is_empty() {
            let _ = writeln!(o, "  (none)");
        }
        for m in &r.mounts {
            let _ = writeln!(
                o,
                "  {:<40} [{} {}]",
                m.mount.display(),
                m.from.source,
                m.from.key
            );
        }
        let l = &r.limits;
        let _ = writeln!(o, "limits:");
        let _ = writeln!(
            o,
            "  memory        {:<10} {}",
            size(l.memory),
            src("limits.memory")
        );
        let _ = writeln!(
            o,
            "  memory+swap   {:<10} {}",
            l.memory_swap.map(size).unwrap_or_else(|| "= memory".into()),
            src("limits.memory_swap")
        );
        let _ = writeln!(o, "  cpus          {:<10} {}", l.cpus, src("limits.cpus"));
        let _ = writeln!(o, "  pids          {:<10} {}", l.pids, src("limits.pids"));
        let _ = writeln!(
            o,
            "  timeout       {:<10} {}",
            format!("{:?}", l.timeout),
            src("limits.timeout")
        );
        let _ = writeln!(
            o,
            "  tmpfs /tmp    {:<10} {}",
            size(l.tmpfs_size),
            src("limits.tmpfs_size")
        );
        let _ = writeln!(
            o,
            "  output limit  {:<10} {}",
            size(l.output_limit),
            src("limits.output_limit")
        );
        let net = match r.network.mode {
            NetworkMode::None => "none (loopback only)".to_string(),
            NetworkMode::Allowlist => format!("allowlist: {}", r.network.allowed_hosts.join(", ")),
            NetworkMode::Open => "open (any host)".to_string(),
        };
        let _ = writeln!(o, "network:          {net} {}", src("network"));
        let _ = writeln!(
            o,
            "image:            {} {}",
            r.image.as_deref().unwrap_or("host root"),
            src("image")
        );
        let _ = writeln!(o, "backend:          {} {}", r.backend, src("backend"));
        if let Some(s) = &r.setup_command {
            let _ = writeln!(o, "setup command:    {s} {}", src("setup_command"));
        }
    } else {
        let _ = writeln!(
            o,
            "(no sandbox: scope, mounts, limits, network and image do not apply to this session)"
        );
    }
    let _ = writeln!(o, "tools:");
    if r.tools.layers.is_empty() {
        let _ = writeln!(o, "  no allow/deny lists: every tool is allowed");
    }
    for l in &r.tools.layers {
        let _ = writeln!(
            o,
            "  [{} {}] allow: [{}] deny: [{}]",
            l.source,
            l.key,
            l.allow.join(", "),
            l.deny.join(", ")
        );
    }
    let table = r.tools.table();
    let allowed: Vec<&str> = table
        .iter()
        .filter(|(_, d)| d.is_allowed())
        .map(|(n, _)| n.as_str())
        .collect();
    let _ = writeln!(
        o,
        "  allowed: {}",
        if allowed.is_empty() {
            "(none)".to_string()
        } else {
            allowed.join(", ")
        }
    );
    let mut blocked: Vec<(String, Vec<&str>)> = Vec::new();
    for (n, d) in table.iter().filter(|(_, d)| !d.is_allowed()) {
        match d {
            ToolDecision::Denied { .. } => {
                let _ = writeln!(o, "  {n}: {d}");
            }
            _ => {
                let why = d.to_string();
                match blocked.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, v)) => v.push(n),
                    None => blocked.push((why, vec![n.as_str()])),
                }
            }
        }
    }
    for (why, names) in blocked {
        let _ = writeln!(o, "  {why}: {}", names.join(", "));
    }
    let where_ = if r.sandboxed {
        "in the sandbox"
    } else {
        "ON THE HOST"
    };
    let _ = writeln!(o, "  allowed tools run {where_}");
    for t in &r.tool_rules {
        let _ = writeln!(o, "  {} ({})", t.rule, t.key);
    }
    if r.elevated.allowed {
        let _ = writeln!(
            o,
            "elevated: ALLOWED: exec may run on the host when asked with elevated"
        );
    } else {
        let _ = writeln!(o, "elevated: not available");
        for FailingGate { gate, key } in &r.elevated.failing {
            let _ = writeln!(o, "  failing gate: {} ({key})", gate_text(gate));
        }
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(o, "warnings:");
        for w in &r.warnings {
            let _ = writeln!(o, "  - {w}");
        }
    }
    let fixes = fix_its(r);
    if !fixes.is_empty() {
        let _ = writeln!(o, "fix-it:");
        for f in fixes {
            let _ = writeln!(o, "  - {}: {} ({})", f.key, f.change, f.why);
        }
    }
    o
}

/// The explanation as JSON. When the session is not sandboxed, `sandbox`
/// is null and `runs_on` is `host`.
pub fn explain_json(r: &Resolved, config: Option<&Path>) -> serde_json::Value {
    let tools: Vec<serde_json::Value> = r
        .tools
        .table()
        .into_iter()
        .map(|(n, d)| {
            let mut v = serde_json::to_value(&d).unwrap_or(serde_json::Value::Null);
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("tool".into(), json!(n));
            }
            v
        })
        .collect();
    let sandbox = if r.sandboxed {
        json!({
            "scope": r.scope,
            "sandbox_key": r.sandbox_key,
            "workspace_access": r.workspace_access,
            "workspace": r.workspace,
            "team": r.team,
            "mounts": r.mounts,
            "limits": r.limits,
            "network": r.network,
            "image": r.image,
            "backend": r.backend,
            "setup_command": r.setup_command,
            "prune": r.prune,
            "cap_add": r.cap_add,
            "seccomp": r.seccomp,
        })
    } else {
        serde_json::Value::Null
    };
    json!({
        "config": config,
        "agent": r.agent,
        "session": r.session,
        "main_session": r.main_session,
        "sandboxed": r.sandboxed,
        "runs_on": if r.sandboxed { "sandbox" } else { "host" },
        "mode": r.mode,
        "sandbox": sandbox,
        "tools": { "layers": r.tools.layers, "decisions": tools, "rules": r.tool_rules },
        "elevated": r.elevated,
        "sources": r.sources,
        "warnings": r.warnings,
        "fix_it": fix_its(r),
    })
}
