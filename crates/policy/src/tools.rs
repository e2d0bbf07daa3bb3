//! Tool policy: allow/deny lists with `group:*` shorthands, layered global →
//! agent → CLI. Rules: deny always wins; a layer with a non-empty allow list
//! blocks every tool not in it; every layer must let a tool through.

use std::fmt;

use serde::Serialize;

use crate::resolve::Source;

/// The tool groups, as OpenClaw defines them (`group:openclaw` includes
/// `group:fs` and `group:runtime`, as fixed upstream in openclaw#23582).
pub const GROUPS: &[(&str, &[&str])] = &[
    ("group:runtime", &["exec", "process", "run_code"]),
    (
        "group:fs",
        &[
            "read",
            "write",
            "edit",
            "apply_patch",
            "read_file",
            "write_file",
            "edit_file",
            "list_files",
        ],
    ),
    (
        "group:sessions",
        &[
            "sessions_list",
            "sessions_history",
            "sessions_send",
            "sessions_spawn",
            "subagents",
            "session_status",
            "create_agent",
        ],
    ),
    ("group:memory", &["memory_search", "memory_get", "memory"]),
    ("group:web", &["web_search", "web_fetch", "http_request"]),
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

/// One `tools.http` rule: `METHOD host[/path]`. `METHOD` is a method or
/// `*`; `host` is a name, `*.domain` (any subdomain) or `*`, with an
/// optional `:port`; `path` is a prefix ending in `*`, or exact (no path:
/// any path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    method: String,
    host: String,
    port: Option<u16>,
    path: Option<String>,
}

impl HttpRule {
    /// Parses a rule.
    pub fn parse(s: &str) -> Result<HttpRule, String> {
        let usage = "write http rules as `METHOD host[/path]`, e.g. `GET api.github.com/repos/acme/*` or `* *.example.com`";
        let mut words = s.split_whitespace();
        let (Some(method), Some(target), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("http rule {s:?}: {usage}"));
        };
        let method = method.to_ascii_uppercase();
        if method != "*" && !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "http rule {s:?}: {method:?} is not an HTTP method or *"
            ));
        }
        if target.contains("://") {
            return Err(format!("http rule {s:?}: leave the scheme out; {usage}"));
        }
        let (hostport, path) = match target.find('/') {
            Some(i) => (&target[..i], Some(target[i..].to_string())),
            None => (target, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("http rule {s:?}: bad port {p:?}"))?,
                ),
            ),
            None => (hostport, None),
        };
        let host = host.to_ascii_lowercase();
        let host_ok = host == "*"
            || (!host.is_empty()
                && host
                    .trim_start_matches("*.")
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
        if !host_ok {
            return Err(format!(
                "http rule {s:?}: {host:?} is not a host name, *.domain or *"
            ));
        }
        if path
            .as_deref()
            .is_some_and(|p| p.contains("..") || p[..p.len().saturating_sub(1)].contains('*'))
        {
            return Err(format!(
                "http rule {s:?}: a path may only end in * and may not contain .."
            ));
        }
        Ok(HttpRule {
            method,
            host,
            port,
            path,
        })
    }

    /// Does a request match?
    pub fn matches(&self, method: &str, host: &str, port: u16, path: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let method_ok = self.method == "*" || self.method.eq_ignore_ascii_case(method);
        let host_ok = match self.host.strip_prefix("*.") {
            _ if self.host == "*" => true,
            Some(domain) => {
                host.len() > domain.len() + 1
                    && host.ends_with(domain)
                    && host[..host.len() - domain.len()].ends_with('.')
            }
            None => host == self.host,
        };
        let port_ok = match self.port {
            Some(p) => p == port,
            None => true,
        };
        let path_ok = match &self.path {
            None => true,
            Some(p) => match p.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == p,
            },
        };
        method_ok && host_ok && port_ok && path_ok
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
    fn http_rules_match_method_host_and_path() {
        let r = HttpRule::parse("GET api.github.com/repos/acme/*").expect("rule");
        assert!(r.matches("GET", "api.github.com", 443, "/repos/acme/x"));
        assert!(!r.matches("POST", "api.github.com", 443, "/repos/acme/x"));
        assert!(!r.matches("GET", "api.github.com", 443, "/repos/other/x"));
        assert!(!r.matches("GET", "evil.api.github.com", 443, "/repos/acme/x"));
        let w = HttpRule::parse("* *.example.com:8080").expect("rule");
        assert!(w.matches("DELETE", "a.example.com", 8080, "/"));
        assert!(!w.matches("DELETE", "example.com", 8080, "/"));
        assert!(!w.matches("DELETE", "a.example.com", 80, "/"));
        assert!(!w.matches("GET", "xexample.com", 8080, "/"));
        for bad in [
            "GET",
            "GET https://x/",
            "G3T x",
            "GET x/a*b",
            "GET x/../y",
            "GET ho$t",
        ] {
            assert!(HttpRule::parse(bad).is_err(), "{bad}");
        }
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
