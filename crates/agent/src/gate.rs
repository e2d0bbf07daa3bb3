//! Every tool call is decided here, outside the model and outside the
//! sandbox: the tool policy (allow/deny, groups), the elevated gates,
//! argument rules (http method/host/path, file path prefixes), then
//! whether a person must approve. Nothing the model says changes any of it.

use std::collections::BTreeMap;

use nanoclaw_policy::model::{AskMode, Config, ToolsSection};
use nanoclaw_policy::resolve::{ElevatedStatus, Resolved};
use nanoclaw_policy::tools::{HttpRule, ToolPolicy};
use serde::Serialize;

use crate::host::absolute;
use crate::tools::Action;

/// Rules of one config layer, with the key that set them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layered<T> {
    /// The config key (`tools`, `agents.defaults.tools`, `agents.list[0].tools`, or
    /// `agent <id> (created by <creator>)`).
    pub key: String,
    /// The rules.
    pub rules: T,
}

/// The effective policy of one agent's tool calls.
#[derive(Debug, Clone, Serialize)]
pub struct AgentPolicy {
    /// allow/deny.
    pub tools: ToolPolicy,
    /// Narrowing of a persistent agent: tools outside this list are
    /// refused (a created agent never gets more than its creator).
    pub narrowed_tools: Option<Layered<Vec<String>>>,
    /// Elevated exec.
    pub elevated: ElevatedStatus,
    /// `http` rules; every layer listed must let a request through.
    #[serde(skip)]
    pub http: Vec<Layered<Vec<HttpRule>>>,
    /// `paths.read` prefixes, per layer.
    pub read_paths: Vec<Layered<Vec<String>>>,
    /// `paths.write` prefixes, per layer.
    pub write_paths: Vec<Layered<Vec<String>>>,
    /// When to ask, per tool (`*`: the rest; `elevated`: elevated exec).
    pub ask: BTreeMap<String, AskMode>,
    /// Exact command lines approved in advance.
    pub approved: Vec<String>,
    /// Hosts the agent's sandbox may reach (allowlist mode), or `None`
    /// for "no network" (`Some(["*"])`-like open modes are listed as is).
    pub hosts: Vec<String>,
}

/// What the gate says about one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Run it.
    Allow,
    /// Refused, with the reason (returned to the model and audited).
    Deny {
        /// Why.
        reason: String,
    },
    /// A person must approve it first.
    Ask {
        /// Why.
        reason: String,
    },
}

impl AgentPolicy {
    /// The policy of a resolved agent under `config` (rules of the global,
    /// defaults and agent layers).
    pub fn from_config(config: &Config, resolved: &Resolved) -> AgentPolicy {
        let mut layers: Vec<(String, &ToolsSection)> = vec![("tools".into(), &config.tools)];
        layers.push((
            "agents.defaults.tools".into(),
            &config.agents.defaults.tools,
        ));
        let agent = resolved.agent.as_deref().and_then(|a| config.agents.get(a));
        if let Some(a) = agent {
            layers.push((format!("{}.tools", a.key), &a.tools));
        }
        let mut p = AgentPolicy {
            tools: resolved.tools.clone(),
            narrowed_tools: None,
            elevated: resolved.elevated.clone(),
            http: Vec::new(),
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            ask: BTreeMap::new(),
            approved: Vec::new(),
            hosts: resolved.network.allowed_hosts.clone(),
        };
        for (key, t) in layers {
            if let Some(rules) = &t.http {
                let parsed = rules
                    .iter()
                    .filter_map(|r| HttpRule::parse(r).ok())
                    .collect();
                p.http.push(Layered {
                    key: format!("{key}.http"),
                    rules: parsed,
                });
            }
            if let Some(paths) = &t.paths {
                if let Some(r) = &paths.read {
                    p.read_paths.push(Layered {
                        key: format!("{key}.paths.read"),
                        rules: r.clone(),
                    });
                }
                if let Some(w) = &paths.write {
                    p.write_paths.push(Layered {
                        key: format!("{key}.paths.write"),
                        rules: w.clone(),
                    });
                }
            }
            if let Some(ask) = &t.ask {
                // Later (more specific) layers override earlier ones.
                p.ask.extend(ask.iter().map(|(k, v)| (k.clone(), *v)));
            }
            if let Some(a) = &t.approved {
                p.approved.extend(a.iter().cloned());
            }
        }
        p
    }

    /// The ask mode of a tool.
    pub fn ask_mode(&self, tool: &str) -> AskMode {
        self.ask
            .get(tool)
            .or_else(|| self.ask.get("*"))
            .copied()
            .unwrap_or(AskMode::Off)
    }

    /// Is the tool usable at all (offered to the model)?
    pub fn tool_allowed(&self, tool: &str) -> Result<(), String> {
        let d = self.tools.decide(tool);
        if !d.is_allowed() {
            return Err(format!("the tool {tool} is {d}"));
        }
        if let Some(n) = &self.narrowed_tools {
            if !n.rules.iter().any(|t| t == tool) {
                return Err(format!(
                    "the tool {tool} is not among this agent's tools ({})",
                    n.key
                ));
            }
        }
        Ok(())
    }

    /// Decides one call. `workdir` resolves relative paths.
    pub fn decide(&self, action: &Action, workdir: &str) -> Verdict {
        let tool = action.tool();
        if let Err(reason) = self.tool_allowed(tool) {
            return Verdict::Deny { reason };
        }
        if let Err(reason) = self.arguments_allowed(action, workdir) {
            return Verdict::Deny { reason };
        }
        if let Action::Exec { elevated: true, .. } = action {
            if !self.elevated.allowed {
                let why = self
                    .elevated
                    .failing
                    .first()
                    .map(|g| format!("{:?} (set {})", g.gate, g.key))
                    .unwrap_or_else(|| "not enabled".into());
                return Verdict::Deny {
                    reason: format!("elevated exec (on the host) is not allowed: {why}"),
                };
            }
            // Leaving the sandbox is always a person's decision.
            return Verdict::Ask {
                reason: "elevated exec runs on the host, outside the sandbox".into(),
            };
        }
        match self.ask_mode(tool) {
            AskMode::Off => Verdict::Allow,
            AskMode::Always => Verdict::Ask {
                reason: format!("tools.ask.{tool} is always"),
            },
            AskMode::OnMiss => {
                if let Action::Exec { command, .. } = action {
                    if self.approved.iter().any(|a| a == command) {
                        return Verdict::Allow;
                    }
                }
                Verdict::Ask {
                    reason: format!(
                        "tools.ask.{tool} is on-miss and this call was not approved before"
                    ),
                }
            }
        }
    }

    /// Do path rules govern this call (a file tool with rules for its
    /// direction)? Then the path is resolved in the sandbox (symlinks
    /// followed) and checked again with [`AgentPolicy::resolved_path_allowed`].
    pub fn path_rules_apply(&self, action: &Action) -> bool {
        action.path().is_some()
            && !(if action.writes() {
                &self.write_paths
            } else {
                &self.read_paths
            })
            .is_empty()
    }

    /// Checks the path a file tool's path resolves to in the sandbox: a
    /// symlink under an allowed prefix must not lead outside it.
    pub fn resolved_path_allowed(&self, action: &Action, resolved: &str) -> Result<(), String> {
        let layers = if action.writes() {
            &self.write_paths
        } else {
            &self.read_paths
        };
        for l in layers {
            if !l.rules.iter().any(|prefix| under(resolved, prefix)) {
                return Err(format!(
                    "the path resolves (through a symlink) to {resolved}, outside the paths {} allows ({})",
                    l.key,
                    l.rules.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn arguments_allowed(&self, action: &Action, workdir: &str) -> Result<(), String> {
        match action {
            Action::HttpRequest { method, url, .. } => self.http_allowed(method, url),
            a => {
                let Some(p) = a.path() else { return Ok(()) };
                let abs = absolute(workdir, p);
                let layers = if a.writes() {
                    &self.write_paths
                } else {
                    &self.read_paths
                };
                for l in layers {
                    if !l.rules.iter().any(|prefix| under(&abs, prefix)) {
                        return Err(format!(
                            "{abs} is outside the paths {} allows ({})",
                            l.key,
                            l.rules.join(", ")
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    fn http_allowed(&self, method: &str, url: &str) -> Result<(), String> {
        if self.http.is_empty() {
            return Ok(());
        }
        let u = Url::parse(url)?;
        for l in &self.http {
            if !l
                .rules
                .iter()
                .any(|r| r.matches(method, &u.host, u.port, &u.path))
            {
                return Err(format!(
                    "{method} {}:{}{} matches no rule of {}",
                    u.host, u.port, u.path, l.key
                ));
            }
        }
        Ok(())
    }
}

/// Is `path` `prefix` or inside it?
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// The parts of an http(s) URL the rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Lower-case host (brackets kept off IPv6).
    pub host: String,
    /// Port (default of the scheme).
    pub port: u16,
    /// Path, `/` at least, without the query.
    pub path: String,
}

impl Url {
    /// Parses strictly: no user info (`user@host` tricks), a host, a port
    /// that is a number; `%`-escapes in the path decoded before matching
    /// only for `/` and `.` (so `%2e%2e` cannot climb out of a prefix).
    pub fn parse(url: &str) -> Result<Url, String> {
        let (rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
            (r, 443)
        } else if let Some(r) = url.strip_prefix("http://") {
            (r, 80)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') || authority.contains('\\') {
            return Err(format!("{url:?}: user info in URLs is refused"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            _ => (authority, default_port),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let path = tail.split(['?', '#']).next().unwrap_or("");
        let path = path
            .replace("%2f", "/")
            .replace("%2F", "/")
            .replace("%2e", ".")
            .replace("%2E", ".");
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            absolute("/", &path)
        };
        Ok(Url { host, port, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_strictly() {
        let u = Url::parse("https://API.github.com/repos/acme/x?q=1").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("api.github.com", 443, "/repos/acme/x")
        );
        let u = Url::parse("http://h:8080").expect("url");
        assert_eq!((u.port, u.path.as_str()), (8080, "/"));
        assert!(Url::parse("https://api.github.com@evil.com/").is_err());
        let u = Url::parse("https://h/repos/acme/%2e%2e/other").expect("url");
        assert_eq!(u.path, "/repos/other");
        assert!(Url::parse("ftp://h/").is_err());
    }

    #[test]
    fn prefixes_are_whole_components() {
        assert!(under("/workspace/a", "/workspace"));
        assert!(under("/workspace", "/workspace/"));
        assert!(!under("/workspace2/a", "/workspace"));
        assert!(under("/x", "/"));
    }
}
