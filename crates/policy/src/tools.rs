//! Tool policy: allow/deny lists with `group:*` shorthands, layered global →
//! agent → CLI. Rules: deny always wins; a layer with a non-empty allow list
//! blocks every tool not in it; every layer must let a tool through.

use std::fmt;

use serde::Serialize;

use crate::resolve::Source;

/// The tool groups, as OpenClaw defines them (`group:openclaw` includes
/// `group:fs` and `group:runtime`, as fixed upstream in openclaw#23582).
pub const GROUPS: &[(&str, &[&str])] = &[
    ("group:runtime", &["exec", "process"]),
    ("group:fs", &["read", "write", "edit", "apply_patch"]),
    (
        "group:sessions",
        &[
            "sessions_list",
            "sessions_history",
            "sessions_send",
            "sessions_spawn",
            "subagents",
            "session_status",
        ],
    ),
    ("group:memory", &["memory_search", "memory_get"]),
    ("group:web", &["web_search", "web_fetch"]),
    ("group:ui", &["browser", "canvas"]),
    ("group:automation", &["cron", "gateway"]),
    ("group:messaging", &["message"]),
    ("group:nodes", &["nodes"]),
];

/// Built-in tools outside the named groups that `group:openclaw` includes.
const OTHER_BUILTINS: &[&str] = &["agents_list", "image"];

/// Entries that match every tool (`*` and seed 003's `group:*`).
pub const WILDCARDS: &[&str] = &["*", "group:*"];

/// Every built-in tool name, sorted.
pub fn builtin_tools() -> Vec<&'static str> {
    let mut v: Vec<&str> = GROUPS
        .iter()
        .flat_map(|(_, t)| t.iter().copied())
        .chain(OTHER_BUILTINS.iter().copied())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Every group name (including `group:openclaw`).
pub fn group_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = GROUPS.iter().map(|(g, _)| *g).collect();
    v.push("group:openclaw");
    v
}

/// Normalises a tool name: trimmed, lower-case, `bash` → `exec`,
/// `apply-patch` → `apply_patch` (OpenClaw's aliases).
pub fn normalize(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "bash" => "exec".to_string(),
        "apply-patch" => "apply_patch".to_string(),
        _ => n,
    }
}

/// True if the group name is known.
pub fn is_known_group(entry: &str) -> bool {
    WILDCARDS.contains(&entry) || group_names().contains(&entry)
}

/// Does the (normalised) list entry match the (normalised) tool?
pub fn entry_matches(entry: &str, tool: &str) -> bool {
    if WILDCARDS.contains(&entry) || entry == tool {
        return true;
    }
    if entry == "group:openclaw" {
        return builtin_tools().contains(&tool);
    }
    GROUPS
        .iter()
        .any(|(g, tools)| *g == entry && tools.contains(&tool))
}

/// One layer of the policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolLayer {
    /// Where the layer comes from.
    pub source: Source,
    /// The config key (or CLI flag) of the layer, e.g. `agents.list[0].tools`.
    pub key: String,
    /// Allowed entries; empty = no restriction at this layer.
    pub allow: Vec<String>,
    /// Denied entries.
    pub deny: Vec<String>,
}

/// The decision for one tool.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ToolDecision {
    /// The tool may be used.
    Allowed,
    /// A deny entry matched (deny always wins).
    Denied {
        /// The layer's source.
        source: Source,
        /// The layer's key.
        key: String,
        /// The matching deny entry.
        entry: String,
    },
    /// A layer has an allow list that does not include the tool.
    NotInAllowList {
        /// The layer's source.
        source: Source,
        /// The layer's key.
        key: String,
    },
}

impl ToolDecision {
    /// True for [`ToolDecision::Allowed`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, ToolDecision::Allowed)
    }
}

impl fmt::Display for ToolDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolDecision::Allowed => f.write_str("allowed"),
            ToolDecision::Denied { source, key, entry } => {
                write!(
                    f,
                    "denied by {entry:?} in the deny list of {key} ({source})"
                )
            }
            ToolDecision::NotInAllowList { source, key } => {
                write!(f, "blocked, not in the allow list of {key} ({source})")
            }
        }
    }
}

/// The effective tool policy of one agent: all layers, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ToolPolicy {
    /// Layers, global first.
    pub layers: Vec<ToolLayer>,
}

impl ToolPolicy {
    /// Decides for one tool: a deny in any layer wins; otherwise every layer
    /// with a non-empty allow list must list the tool.
    pub fn decide(&self, tool: &str) -> ToolDecision {
        let tool = normalize(tool);
        for l in &self.layers {
            if let Some(e) = l.deny.iter().find(|e| entry_matches(e, &tool)) {
                return ToolDecision::Denied {
                    source: l.source.clone(),
                    key: l.key.clone(),
                    entry: e.clone(),
                };
            }
        }
        for l in &self.layers {
            if !l.allow.is_empty() && !l.allow.iter().any(|e| entry_matches(e, &tool)) {
                return ToolDecision::NotInAllowList {
                    source: l.source.clone(),
                    key: l.key.clone(),
                };
            }
        }
        ToolDecision::Allowed
    }

    /// True if the tool may be used.
    pub fn is_allowed(&self, tool: &str) -> bool {
        self.decide(tool).is_allowed()
    }

    /// Decisions for every built-in tool plus every tool named in a layer.
    pub fn table(&self) -> Vec<(String, ToolDecision)> {
        let mut names: Vec<String> = builtin_tools().iter().map(|s| s.to_string()).collect();
        for l in &self.layers {
            for e in l.allow.iter().chain(&l.deny) {
                if !e.starts_with("group:") && e != "*" && !names.contains(e) {
                    names.push(e.clone());
                }
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let d = self.decide(&n);
                (n, d)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(allow: &[&str], deny: &[&str]) -> ToolLayer {
        ToolLayer {
            source: Source::Global,
            key: "tools".into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn groups_expand() {
        assert!(entry_matches("group:fs", "write"));
        assert!(entry_matches("group:runtime", "exec"));
        assert!(entry_matches("group:openclaw", "exec"));
        assert!(entry_matches("group:openclaw", "read"));
        assert!(!entry_matches("group:openclaw", "http-request"));
        assert!(entry_matches("group:*", "http-request"));
        assert!(!entry_matches("group:fs", "exec"));
    }

    #[test]
    fn deny_wins_and_allow_blocks() {
        let p = ToolPolicy {
            layers: vec![layer(&["group:fs", "exec"], &["write"])],
        };
        assert!(p.is_allowed("read"));
        assert!(p.is_allowed("bash")); // alias of exec
        assert!(!p.is_allowed("write"));
        assert!(!p.is_allowed("browser"));
        let p = ToolPolicy {
            layers: vec![layer(&[], &[])],
        };
        assert!(p.is_allowed("anything"));
    }
}
