//! From the positioned tree to the [`Config`] model, validating as it goes
//! and collecting every problem (never stopping at the first).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nanoclaw_sandbox::native::caps;
use nanoclaw_sandbox::spec::MIN_MEMORY;
use nanoclaw_sandbox::units::{parse_duration, parse_size};

use crate::binds::{self, HostFs};
use crate::diag::{suggest, Diagnostic};
use crate::model::*;
use crate::secret::{interpolate, Secret};
use crate::tools;
use crate::yaml::{Node, Pos, Value};

/// What decoding needs from the outside world.
pub struct DecodeEnv<'a> {
    /// Environment lookup for `${VAR}`.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The host filesystem, for bind mount and path checks.
    pub fs: &'a dyn HostFs,
    /// `$HOME`, for `~/` in paths.
    pub home: Option<PathBuf>,
}

/// A team name: like an agent id.
fn team_name_ok(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// LLM providers nanoclaw knows.
pub const KNOWN_PROVIDERS: &[&str] = &[
    "anthropic",
    "openai",
    "azure",
    "openrouter",
    "ollama",
    "google",
    "gemini",
    "mistral",
    "groq",
    "deepseek",
    "bedrock",
    "vertex",
];

fn snake(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn camel(s: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.push(c.to_ascii_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A map's known entries: canonical name → (key as written, key node, value).
struct Fields<'n> {
    path: String,
    found: Vec<(&'static str, String, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<(&'n Node, String)> {
        self.found
            .iter()
            .find(|(c, ..)| *c == name)
            .map(|(_, k, _, v)| (*v, join(&self.path, k)))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct Scalar {
    text: String,
    /// As written in the file (shown in messages: never an expanded secret).
    raw: String,
    interpolated: bool,
}

/// The decoder: walks the tree, fills the model, collects diagnostics.
pub struct Decoder<'a> {
    env: DecodeEnv<'a>,
    /// Every problem found.
    pub diags: Vec<Diagnostic>,
    global_unsafe_binds: bool,
}

impl<'a> Decoder<'a> {
    /// A decoder with this environment.
    pub fn new(env: DecodeEnv<'a>) -> Self {
        Decoder {
            env,
            diags: Vec::new(),
            global_unsafe_binds: false,
        }
    }

    fn err(&mut self, path: &str, pos: Pos, msg: impl Into<String>) {
        self.diags.push(Diagnostic::error(path, pos, msg));
    }

    fn warn(&mut self, path: &str, pos: Pos, msg: impl Into<String>) {
        self.diags.push(Diagnostic::warning(path, pos, msg));
    }

    /// Reads a map whose keys must be among `names` (canonical spellings;
    /// the snake_case and camelCase forms of each are accepted too) or
    /// `aliases` (alias → canonical).
    fn fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        names: &[&'static str],
        aliases: &[(&'static str, &'static str)],
    ) -> Option<Fields<'n>> {
        let entries = match &node.value {
            Value::Map(m) => m.as_slice(),
            _ if node.is_null() => &[],
            _ => {
                self.err(
                    path,
                    node.pos,
                    format!("expected a map of settings, found {}", node.kind()),
                );
                return None;
            }
        };
        let mut f = Fields {
            path: path.to_string(),
            found: Vec::new(),
        };
        for (k, v) in entries {
            let Some(key) = k.as_scalar() else {
                self.err(path, k.pos, "keys must be plain names, not maps or lists");
                continue;
            };
            let canonical = names
                .iter()
                .copied()
                .find(|n| *n == key || snake(n) == key || camel(n) == key)
                .or_else(|| aliases.iter().find(|(a, _)| *a == key).map(|(_, c)| *c));
            match canonical {
                Some(c) => {
                    if let Some((_, prev, pk, _)) = f.found.iter().find(|(pc, ..)| *pc == c) {
                        let msg = format!(
                            "`{key}` is set twice (also as `{prev}` at line {}); keep one",
                            pk.pos.line
                        );
                        self.err(&join(path, key), k.pos, msg);
                        continue;
                    }
                    f.found.push((c, key.to_string(), k, v));
                }
                None => {
                    let spellings = names.iter().copied().chain(aliases.iter().map(|(a, _)| *a));
                    let hint = suggest(key, spellings).map(|s| {
                        // Suggest in the spelling style the user writes.
                        if key.contains('_') {
                            snake(s)
                        } else {
                            s.to_string()
                        }
                    });
                    let mut d = Diagnostic::error(
                        &join(path, key),
                        k.pos,
                        match &hint {
                            Some(h) => format!("unknown key `{key}`; did you mean `{h}`?"),
                            None => format!(
                                "unknown key `{key}`; known keys here: {}",
                                names.join(", ")
                            ),
                        },
                    );
                    d.did_you_mean = hint;
                    self.diags.push(d);
                }
            }
        }
        Some(f)
    }

    fn scalar(&mut self, v: &Node, path: &str, what: &str) -> Option<Scalar> {
        let raw = match &v.value {
            Value::Scalar(s, _) => s.clone(),
            _ => {
                self.err(path, v.pos, format!("expected {what}, found {}", v.kind()));
                return None;
            }
        };
        let interpolated = raw.contains('$');
        let text = if interpolated {
            match interpolate(&raw, self.env.env) {
                Ok(t) => t,
                Err(e) => {
                    self.err(path, v.pos, e.to_string());
                    return None;
                }
            }
        } else {
            raw.clone()
        };
        Some(Scalar {
            text,
            raw,
            interpolated,
        })
    }

    fn string(&mut self, v: &Node, path: &str, what: &str) -> Option<String> {
        if v.is_null() {
            self.err(
                path,
                v.pos,
                format!("expected {what}, found nothing (null)"),
            );
            return None;
        }
        self.scalar(v, path, what).map(|s| s.text)
    }

    fn nonempty(&mut self, v: &Node, path: &str, what: &str) -> Option<String> {
        let s = self.string(v, path, what)?;
        if s.trim().is_empty() {
            self.err(
                path,
                v.pos,
                format!("expected {what}, found an empty string"),
            );
            return None;
        }
        Some(s)
    }

    fn boolean(&mut self, v: &Node, path: &str) -> Option<bool> {
        let s = self.scalar(v, path, "true or false")?;
        match s.text.as_str() {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => {
                self.err(
                    path,
                    v.pos,
                    format!("expected true or false, found {:?}", s.raw),
                );
                None
            }
        }
    }

    fn size(&mut self, v: &Node, path: &str) -> Option<u64> {
        let s = self.scalar(v, path, "a size like 256m or 1g")?;
        match parse_size(&s.text) {
            Ok(b) => Some(b),
            Err(_) => {
                self.err(
                    path,
                    v.pos,
                    format!(
                        "invalid size {:?}: expected a number with an optional unit b, k, m, g or t (e.g. 256m, 1g)",
                        s.raw
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, v: &Node, path: &str) -> Option<Duration> {
        let s = self.scalar(v, path, "a duration like 30s or 2m")?;
        match parse_duration(&s.text) {
            Ok(d) => Some(d),
            Err(_) => {
                self.err(
                    path,
                    v.pos,
                    format!(
                        "invalid duration {:?}: expected a number with a unit ms, s, m or h (e.g. 500ms, 30s, 2m)",
                        s.raw
                    ),
                );
                None
            }
        }
    }

    fn number(&mut self, v: &Node, path: &str, what: &str) -> Option<f64> {
        let s = self.scalar(v, path, what)?;
        let t = s.text.trim();
        let parsed = match t {
            ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
            ".inf" | ".Inf" | ".INF" | "+.inf" => Some(f64::INFINITY),
            "-.inf" | "-.Inf" | "-.INF" => Some(f64::NEG_INFINITY),
            _ => t.parse::<f64>().ok(),
        };
        if parsed.is_none() {
            self.err(path, v.pos, format!("expected {what}, found {:?}", s.raw));
        }
        parsed
    }

    fn integer(&mut self, v: &Node, path: &str, what: &str) -> Option<u64> {
        let s = self.scalar(v, path, what)?;
        match s.text.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.err(path, v.pos, format!("expected {what}, found {:?}", s.raw));
                None
            }
        }
    }

    fn list<'n>(&mut self, v: &'n Node, path: &str, what: &str) -> Option<Vec<(&'n Node, String)>> {
        match &v.value {
            Value::List(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n, format!("{path}[{i}]")))
                    .collect(),
            ),
            _ if v.is_null() => Some(Vec::new()),
            _ => {
                self.err(
                    path,
                    v.pos,
                    format!("expected a list of {what}, found {}", v.kind()),
                );
                None
            }
        }
    }

    fn string_list(
        &mut self,
        v: &Node,
        path: &str,
        what: &str,
    ) -> Option<Vec<(String, Pos, String)>> {
        let items = self.list(v, path, what)?;
        let mut out = Vec::new();
        for (n, p) in items {
            if let Some(s) = self.nonempty(n, &p, what) {
                out.push((s, n.pos, p));
            }
        }
        Some(out)
    }

    fn path_value(&mut self, v: &Node, path: &str) -> Option<PathBuf> {
        let s = self.nonempty(v, path, "an absolute path")?;
        let p = if let Some(rest) = s.strip_prefix("~/") {
            match &self.env.home {
                Some(h) => h.join(rest),
                None => {
                    self.err(
                        path,
                        v.pos,
                        "the path starts with ~ but HOME is not set; write the full path",
                    );
                    return None;
                }
            }
        } else {
            PathBuf::from(&s)
        };
        if !p.is_absolute() {
            self.err(
                path,
                v.pos,
                format!("path {s:?} must be absolute (or start with ~/)"),
            );
            return None;
        }
        Some(p)
    }

    fn enum_value<T: Copy>(
        &mut self,
        v: &Node,
        path: &str,
        choices: &[(&'static str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let s = self.scalar(v, path, &format!("one of {}", names.join(", ")))?;
        if let Some((_, t)) = choices.iter().find(|(n, _)| *n == s.text) {
            return Some(*t);
        }
        let hint = suggest(&s.text, names.iter().copied());
        let mut d = Diagnostic::error(
            path,
            v.pos,
            format!(
                "invalid value {:?}: expected one of {}{}",
                s.raw,
                names.join(", "),
                hint.map(|h| format!("; did you mean `{h}`?"))
                    .unwrap_or_default()
            ),
        );
        d.did_you_mean = hint.map(str::to_string);
        self.diags.push(d);
        None
    }

    // ---- resource values shared by `security` and `sandbox` ----

    fn memory(&mut self, v: &Node, path: &str) -> Option<u64> {
        let b = self.size(v, path)?;
        if b < MIN_MEMORY {
            let raw = v.as_scalar().unwrap_or_default().to_string();
            self.err(
                path,
                v.pos,
                format!("memory limit {raw:?} is below the minimum of 4m: not even a shell starts in less; use at least 4m (the default is 512m)"),
            );
            return None;
        }
        Some(b)
    }

    fn cpus(&mut self, v: &Node, path: &str) -> Option<f64> {
        let c = self.number(v, path, "a number of cpus such as 0.5, 1 or 2")?;
        if !c.is_finite() || c <= 0.0 || c > 1024.0 {
            let raw = v.as_scalar().unwrap_or_default().to_string();
            self.err(
                path,
                v.pos,
                format!("cpus must be a positive number such as 0.5, 1 or 2 (at most 1024); found {raw:?}"),
            );
            return None;
        }
        Some(c)
    }

    fn pids(&mut self, v: &Node, path: &str) -> Option<u64> {
        let n = self.integer(v, path, "a whole number of processes, e.g. 256")?;
        if n == 0 {
            self.err(path, v.pos, "a pids limit of 0 would forbid even the first process; use at least 1 (the default is 256)");
            return None;
        }
        if n > 4_194_304 {
            self.err(path, v.pos, "a pids limit above 4194304 (the kernel's maximum) means nothing; use a real limit such as 256");
            return None;
        }
        Some(n)
    }

    fn timeout(&mut self, v: &Node, path: &str) -> Option<Duration> {
        let d = self.duration(v, path)?;
        if d.is_zero() {
            self.err(path, v.pos, "a timeout of 0 would kill every command at once; use a positive duration such as 30s");
            return None;
        }
        Some(d)
    }

    fn positive_size(&mut self, v: &Node, path: &str, what: &str) -> Option<u64> {
        let b = self.size(v, path)?;
        if b == 0 {
            self.err(
                path,
                v.pos,
                format!("{what} of 0 leaves no room at all; use a positive size such as 100m"),
            );
            return None;
        }
        Some(b)
    }

    fn swap_check(&mut self, memory: Option<u64>, swap: Option<(u64, &Node, String)>) {
        if let (Some(m), Some((s, node, path))) = (memory, swap) {
            if s < m {
                self.err(
                    &path,
                    node.pos,
                    "memory swap is memory plus swap (Docker semantics) and must be at least the memory limit; set it equal to the memory limit for no swap",
                );
            }
        }
    }

    fn network(&mut self, v: &Node, path: &str) -> Option<NetworkSetting> {
        if v.as_scalar() == Some("host") {
            self.err(path, v.pos, "network \"host\" would share the host's network stack with sandboxed code and is refused; use open for full egress or allowlist with allowedHosts");
            return None;
        }
        let n = self.enum_value(
            v,
            path,
            &[
                ("none", NetworkSetting::Mode(NetworkMode::None)),
                ("allowlist", NetworkSetting::Mode(NetworkMode::Allowlist)),
                ("open", NetworkSetting::Mode(NetworkMode::Open)),
                ("bridge", NetworkSetting::Bridge),
            ],
        )?;
        if n == NetworkSetting::Bridge {
            self.warn(path, v.pos, "\"bridge\" is Docker's word and is deprecated here: it means \"allowlist\" when allowed hosts are listed and \"open\" (full egress) otherwise; write allowlist or open");
        }
        Some(n)
    }

    fn hosts(&mut self, v: &Node, path: &str) -> Option<Vec<String>> {
        let items = self.string_list(v, path, "host names")?;
        let mut out = Vec::new();
        for (h, pos, p) in items {
            let h = h.trim().to_ascii_lowercase();
            if h.contains("://") || h.contains('/') {
                self.err(&p, pos, format!("allowed host {h:?} must be a host name (optionally *.domain and :port), without scheme or path, e.g. api.anthropic.com"));
                continue;
            }
            let (name, port) = match h.rsplit_once(':') {
                Some((n, port)) if !n.contains(':') => (n.to_string(), Some(port.to_string())),
                _ => (h.clone(), None),
            };
            let name_ok = !name.is_empty()
                && name.trim_start_matches("*.").split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            let port_ok = port.as_ref().is_none_or_ok();
            if !name_ok || !port_ok {
                self.err(&p, pos, format!("allowed host {h:?} is not a valid host name (letters, digits, -, dots; *.domain for subdomains; optional :port 1-65535)"));
                continue;
            }
            out.push(h);
        }
        Some(out)
    }

    fn binds(&mut self, v: &Node, path: &str, allow_unsafe: bool) -> Option<Vec<BindMount>> {
        let items = self.list(v, path, "HOST:CONTAINER[:ro|rw] strings")?;
        let mut out = Vec::new();
        let home = self.env.home.clone();
        for (n, p) in items {
            let Some(s) = self.nonempty(n, &p, "a HOST:CONTAINER[:ro|rw] string") else {
                continue;
            };
            let b = match binds::parse_bind(&s, home.as_deref()) {
                Ok(b) => b,
                Err(e) => {
                    self.err(&p, n.pos, e);
                    continue;
                }
            };
            let mut ok = true;
            if let Some(problem) = binds::target_problem(&b.container) {
                self.err(&p, n.pos, problem);
                ok = false;
            }
            match self.env.fs.canonicalize(&b.host) {
                Err(_) => {
                    self.err(
                        &p,
                        n.pos,
                        format!("bind mount source {} does not exist on this host; create it or fix the path", b.host.display()),
                    );
                    ok = false;
                }
                Ok(canon) => {
                    if let Some(danger) = binds::source_danger(&canon, self.env.fs) {
                        let resolved = if canon != b.host {
                            format!(" (it resolves to {})", canon.display())
                        } else {
                            String::new()
                        };
                        if allow_unsafe || self.global_unsafe_binds {
                            self.warn(&p, n.pos, format!("dangerous bind mount source {}{resolved} allowed by dangerouslyAllowUnsafeBinds: {}", b.host.display(), danger.explain()));
                        } else {
                            self.err(
                                &p,
                                n.pos,
                                format!(
                                    "bind mount source {}{resolved} is a dangerous host path: {}; sandboxed code could read or change it. Mount a narrower folder, or set dangerouslyAllowUnsafeBinds: true in this sandbox section if you really mean it",
                                    b.host.display(),
                                    danger.explain()
                                ),
                            );
                            ok = false;
                        }
                    }
                }
            }
            if ok {
                out.push(b);
            }
        }
        Some(out)
    }

    // ---- sections ----

    /// Top-level `network`: `rules` (E2B's shape: a domain maps to a list
    /// of `{transform: {headers}}`, or for short to `{headers}`) and
    /// `upstream_ca`.
    fn network_section(&mut self, node: &Node, path: &str) -> NetworkSection {
        let mut n = NetworkSection::default();
        let Some(f) = self.fields(node, path, &["rules", "upstream_ca"], &[]) else {
            return n;
        };
        if let Some((v, p)) = f.get("upstream_ca") {
            if let Some(t) = self.nonempty(v, &p, "a PEM file path") {
                let path = PathBuf::from(&t);
                if !path.is_absolute() {
                    self.err(&p, v.pos, "upstream_ca must be an absolute path");
                } else {
                    n.upstream_ca = Some(path);
                }
            }
        }
        if let Some((v, p)) = f.get("rules") {
            n.rules = self.rules(v, &p);
        }
        n
    }

    /// `rules`: E2B's shape (a domain maps to a list of `{transform:
    /// {headers}}`, or for short to `{headers}`); values `${VAR}` from
    /// nanoclaw's environment, checked as the proxy checks them.
    fn rules(&mut self, v: &Node, p: &str) -> Vec<NetworkRule> {
        let mut out = Vec::new();
        let Value::Map(entries) = &v.value else {
            if !v.is_null() {
                self.err(p, v.pos, "expected a map of domain to header rules, e.g. api.github.com: {headers: {Authorization: \"Bearer ${GITHUB_TOKEN}\"}}");
            }
            return out;
        };
        for (k, val) in entries {
            let Some(domain) = k.as_scalar() else {
                self.err(p, k.pos, "domains must be plain names");
                continue;
            };
            let dp = join(p, domain);
            if let Err(e) = nanoclaw_sandbox::net::rules::parse_domain(domain) {
                self.err(&dp, k.pos, e.to_string());
                continue;
            }
            // E2B's list of rules, or one rule.
            let items: Vec<(&Node, String)> = match &val.value {
                Value::List(list) => list
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n, format!("{dp}[{i}]")))
                    .collect(),
                _ => vec![(val, dp.clone())],
            };
            let mut headers: Vec<(String, Secret)> = Vec::new();
            for (item, ip) in items {
                let Some(rf) = self.fields(item, &ip, &["transform", "headers"], &[]) else {
                    continue;
                };
                let node = match (rf.get("transform"), rf.get("headers")) {
                    (Some((t, tp)), None) => self
                        .fields(t, &tp, &["headers"], &[])
                        .and_then(|tf| tf.get("headers")),
                    (None, Some(h)) => Some(h),
                    (Some(_), Some(_)) => {
                        self.err(
                            &ip,
                            item.pos,
                            "give either transform.headers (E2B's form) or headers, not both",
                        );
                        None
                    }
                    (None, None) => None,
                };
                let Some((h, hp)) = node else { continue };
                let Value::Map(hs) = &h.value else {
                    self.err(&hp, h.pos, "expected a map of header name to value");
                    continue;
                };
                for (hk, hv) in hs {
                    let Some(name) = hk.as_scalar() else {
                        self.err(&hp, hk.pos, "header names must be plain names");
                        continue;
                    };
                    let vp = join(&hp, name);
                    if let Some(sv) =
                        self.scalar(hv, &vp, "a header value (use ${ENV_VAR} for a secret)")
                    {
                        if !sv.interpolated && !sv.text.is_empty() {
                            self.warn(&vp, hv.pos, "a credential written in the file: use ${VAR} (nanoclaw's environment) so the secret stays out of it");
                        }
                        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                        headers.push((name.to_string(), Secret::new(sv.text)));
                    }
                }
            }
            // The same checks the proxy makes (names, values, limits).
            let check =
                nanoclaw_sandbox::net::HeaderRules::new(vec![nanoclaw_sandbox::net::HeaderRule {
                    domain: domain.to_string(),
                    headers: headers
                        .iter()
                        .map(|(n, v)| (n.clone(), v.expose().to_string()))
                        .collect(),
                }]);
            if let Err(e) = check {
                self.err(&dp, k.pos, e.to_string());
                continue;
            }
            out.push(NetworkRule {
                domain: domain.to_string(),
                headers,
            });
        }
        out
    }

    /// A sandbox's (or an agent's) `network`: a mode, or E2B's object
    /// `{mode, allowed_hosts, rules}` — the rules being this sandbox's own
    /// credentials, added at its egress proxy.
    fn sandbox_network(&mut self, v: &Node, path: &str, s: &mut SandboxSection) {
        if !matches!(v.value, Value::Map(_)) {
            s.network = self.network(v, path);
            return;
        }
        let names = ["mode", "allowedHosts", "rules"];
        let Some(f) = self.fields(v, path, &names, &[]) else {
            return;
        };
        if let Some((m, p)) = f.get("mode") {
            s.network = self.network(m, &p);
        }
        if let Some((h, p)) = f.get("allowedHosts") {
            s.allowed_hosts = self.hosts(h, &p);
        }
        if let Some((r, p)) = f.get("rules") {
            s.network_rules = Some(self.rules(r, &p));
        }
    }

    /// Top-level `kubernetes`: `kubeconfig` (an absolute path),
    /// `context`, `namespace`, `runtimeClassName`, `imagePullPolicy`.
    fn kubernetes_section(&mut self, node: &Node, path: &str) -> KubernetesSection {
        let mut k = KubernetesSection::default();
        let names = [
            "kubeconfig",
            "context",
            "namespace",
            "runtimeClassName",
            "imagePullPolicy",
        ];
        let Some(f) = self.fields(node, path, &names, &[]) else {
            return k;
        };
        if let Some((v, p)) = f.get("kubeconfig") {
            if let Some(t) = self.nonempty(v, &p, "a kubeconfig file path") {
                let path = PathBuf::from(&t);
                if path.is_absolute() {
                    k.kubeconfig = Some(path);
                } else {
                    self.err(&p, v.pos, "kubeconfig must be an absolute path");
                }
            }
        }
        if let Some((v, p)) = f.get("context") {
            k.context = self.nonempty(v, &p, "a kubeconfig context name");
        }
        if let Some((v, p)) = f.get("namespace") {
            k.namespace = self.nonempty(v, &p, "a namespace name");
        }
        if let Some((v, p)) = f.get("runtimeClassName") {
            k.runtime_class_name = self.nonempty(v, &p, "a RuntimeClass name");
        }
        if let Some((v, p)) = f.get("imagePullPolicy") {
            if let Some(t) = self.nonempty(v, &p, "Always, IfNotPresent or Never") {
                if ["Always", "IfNotPresent", "Never"].contains(&t.as_str()) {
                    k.image_pull_policy = Some(t);
                } else {
                    self.err(
                        &p,
                        v.pos,
                        "imagePullPolicy must be Always, IfNotPresent or Never",
                    );
                }
            }
        }
        k
    }

    /// Decodes a whole document.
    pub fn config(&mut self, root: &Node) -> Config {
        let mut c = Config::default();
        let Some(f) = self.fields(
            root,
            "",
            &[
                "security",
                "execution",
                "llm",
                "agents",
                "tools",
                "session",
                "teams",
                "network",
                "kubernetes",
            ],
            &[],
        ) else {
            return c;
        };
        if let Some((v, p)) = f.get("kubernetes") {
            c.kubernetes = self.kubernetes_section(v, &p);
        }
        if let Some((v, p)) = f.get("network") {
            c.network = self.network_section(v, &p);
        }
        if let Some((v, p)) = f.get("teams") {
            c.teams = self.teams(v, &p);
        }
        if let Some((v, p)) = f.get("security") {
            c.security = self.security(v, &p);
        }
        if let Some((v, p)) = f.get("execution") {
            c.execution = self.execution(v, &p);
        }
        if let Some((v, p)) = f.get("llm") {
            c.llm = self.llm(v, &p);
        }
        if let Some((v, p)) = f.get("tools") {
            c.tools = self.tools(v, &p, true);
        }
        if let Some((v, p)) = f.get("agents") {
            c.agents = self.agents(v, &p);
            self.check_teams(&c, v, &p);
        }
        if let Some((v, p)) = f.get("session") {
            if let Some(sf) = self.fields(v, &p, &["mainKey"], &[]) {
                if let Some((v, p)) = sf.get("mainKey") {
                    c.session.main_key = self.nonempty(v, &p, "a session key");
                }
            }
        }
        c
    }

    fn security(&mut self, node: &Node, path: &str) -> Security {
        let mut s = Security::default();
        let names = [
            "cpu_limit",
            "cpu_shares",
            "memory_limit",
            "memory_swap",
            "pids_limit",
            "timeout",
            "network_mode",
            "allowed_hosts",
            "read_only",
            "tmpfs_size",
            "output_limit",
            "privileged",
            "cap_drop",
            "cap_add",
            "seccomp_profile",
            "blkio_weight",
            "dangerously_allow_unsafe_binds",
        ];
        let Some(f) = self.fields(node, path, &names, &[]) else {
            return s;
        };
        if let Some((v, p)) = f.get("dangerously_allow_unsafe_binds") {
            s.dangerously_allow_unsafe_binds = self.boolean(v, &p);
            if s.dangerously_allow_unsafe_binds == Some(true) {
                self.global_unsafe_binds = true;
                self.warn(&p, v.pos, "dangerous bind mounts are allowed for every sandbox: remove this key unless you really mean it");
            }
        }
        if let Some((v, p)) = f.get("cpu_limit") {
            s.cpu_limit = self.cpus(v, &p);
        }
        if let Some((v, p)) = f.get("cpu_shares") {
            if let Some(n) = self.integer(v, &p, "a cpu weight between 2 and 262144") {
                if !(2..=262_144).contains(&n) {
                    self.err(&p, v.pos, "cpu_shares must be between 2 and 262144 (Docker's range; 1024 is the normal weight)");
                } else {
                    self.warn(&p, v.pos, "cpu_shares is accepted but not enforced by the native engine; use cpu_limit for a hard cap");
                    s.cpu_shares = Some(n);
                }
            }
        }
        if let Some((v, p)) = f.get("memory_limit") {
            s.memory_limit = self.memory(v, &p);
        }
        if let Some((v, p)) = f.get("memory_swap") {
            s.memory_swap = self.memory(v, &p);
            let sw = s.memory_swap.map(|x| (x, v, p.clone()));
            self.swap_check(s.memory_limit, sw);
        }
        if let Some((v, p)) = f.get("pids_limit") {
            s.pids_limit = self.pids(v, &p);
        }
        if let Some((v, p)) = f.get("timeout") {
            s.timeout = self.timeout(v, &p);
        }
        if let Some((v, p)) = f.get("network_mode") {
            s.network_mode = self.network(v, &p);
        }
        if let Some((v, p)) = f.get("allowed_hosts") {
            s.allowed_hosts = self.hosts(v, &p);
        }
        if let Some((v, p)) = f.get("read_only") {
            s.read_only = self.boolean(v, &p);
            if s.read_only == Some(false) {
                self.warn(&p, v.pos, "read_only: false is ignored: the sandbox root is always read-only; /tmp, a rw workspace and rw bind mounts are the writable places");
            }
        }
        if let Some((v, p)) = f.get("tmpfs_size") {
            s.tmpfs_size = self.positive_size(v, &p, "a tmpfs size");
        }
        if let Some((v, p)) = f.get("output_limit") {
            s.output_limit = self.positive_size(v, &p, "an output limit");
        }
        if let Some((v, p)) = f.get("privileged") {
            s.privileged = self.boolean(v, &p);
            if s.privileged == Some(true) {
                self.err(&p, v.pos, "privileged: true is not allowed: a privileged sandbox gets every capability, the host's devices and no seccomp filter, so hostile code could take over the host; remove the key (or set it to false) and grant single capabilities with cap_add if a step really needs one");
            }
        }
        // Capability names are decided by the engine's one table
        // (nanoclaw_sandbox::native::caps), so `cap_add` here and
        // `--cap-add` get the same answer with the same reason.
        if let Some((v, p)) = f.get("cap_drop") {
            if let Some(items) = self.string_list(v, &p, "capability names") {
                for (c, pos, ip) in items {
                    match caps::canonical_name(&c) {
                        Some(n) => s.cap_drop.push(n.to_string()),
                        None if c.trim().eq_ignore_ascii_case("ALL") => {
                            s.cap_drop.push("ALL".to_string())
                        }
                        None => self.cap_error(&ip, pos, &c),
                    }
                }
            }
        }
        if let Some((v, p)) = f.get("cap_add") {
            if let Some(items) = self.string_list(v, &p, "capability names") {
                for (c, pos, ip) in items {
                    match caps::parse_cap(&c) {
                        Ok(cap) => s.cap_add.push(cap.name().to_string()),
                        Err(_) => self.cap_error(&ip, pos, &c),
                    }
                }
            }
        }
        if let Some((v, p)) = f.get("seccomp_profile") {
            if let Some(t) = self.nonempty(v, &p, "default, unconfined or a profile path") {
                s.seccomp_profile = match t.as_str() {
                    "default" => Some(SeccompSetting::Default),
                    "unconfined" => {
                        self.warn(&p, v.pos, "seccomp_profile: unconfined removes the syscall filter: the whole kernel is exposed to sandboxed code");
                        Some(SeccompSetting::Unconfined)
                    }
                    _ => {
                        let path = PathBuf::from(&t);
                        if !path.is_absolute() {
                            self.err(
                                &p,
                                v.pos,
                                format!("seccomp profile path {t:?} must be absolute"),
                            );
                            None
                        } else if !self.env.fs.exists(&path) {
                            self.err(&p, v.pos, format!("seccomp profile {t} does not exist on this host; fix the path, or use default"));
                            None
                        } else {
                            Some(SeccompSetting::Profile(path))
                        }
                    }
                };
            }
        }
        if let Some((v, p)) = f.get("blkio_weight") {
            if let Some(n) = self.integer(v, &p, "a block I/O weight between 10 and 1000") {
                if !(10..=1000).contains(&n) {
                    self.err(
                        &p,
                        v.pos,
                        "blkio_weight must be between 10 and 1000 (Docker's range)",
                    );
                } else {
                    self.warn(
                        &p,
                        v.pos,
                        "blkio_weight is accepted but not enforced by the native engine",
                    );
                    s.blkio_weight = Some(n);
                }
            }
        }
        s
    }

    /// The engine's answer for a refused or unknown capability name, as a
    /// diagnostic (with the closest known name as `did_you_mean`).
    fn cap_error(&mut self, path: &str, pos: Pos, c: &str) {
        let Err(e) = caps::parse_cap(c) else {
            return;
        };
        let mut d = Diagnostic::error(path, pos, e.to_string());
        if let caps::CapError::Unknown { near, .. } = &e {
            d.did_you_mean = near.first().map(|n| n.to_string());
        }
        self.diags.push(d);
    }

    fn execution(&mut self, node: &Node, path: &str) -> Execution {
        let mut e = Execution::default();
        let Some(f) = self.fields(
            node,
            path,
            &["languages", "preload_images", "pool_size"],
            &[],
        ) else {
            return e;
        };
        if let Some((v, p)) = f.get("languages") {
            match &v.value {
                Value::List(_) => {
                    if let Some(items) = self.string_list(v, &p, "image references") {
                        for (img, _, _) in items {
                            let base = img.rsplit('/').next().unwrap_or(&img);
                            let name = base.split([':', '@']).next().unwrap_or(base);
                            let name = if name == "golang" { "go" } else { name };
                            e.languages.insert(name.to_string(), img.clone());
                        }
                    }
                }
                _ => {
                    if let Value::Map(entries) = &v.value {
                        for (k, val) in entries {
                            let Some(name) = k.as_scalar() else {
                                self.err(&p, k.pos, "language names must be plain names");
                                continue;
                            };
                            let ip = join(&p, name);
                            if let Some(t) =
                                self.nonempty(val, &ip, "an image reference or an interpreter path")
                            {
                                e.languages.insert(name.to_string(), t);
                            }
                        }
                    } else {
                        self.err(&p, v.pos, format!("expected a list of images or a map of language to image/interpreter, found {}", v.kind()));
                    }
                }
            }
        }
        if let Some((v, p)) = f.get("preload_images") {
            if matches!(v.value, Value::List(_)) {
                e.preload_images = self
                    .string_list(v, &p, "image references")
                    .map(|l| PreloadImages::List(l.into_iter().map(|(s, ..)| s).collect()));
            } else {
                e.preload_images = self.boolean(v, &p).map(PreloadImages::All);
            }
        }
        if let Some((v, p)) = f.get("pool_size") {
            if let Some(n) = self.integer(v, &p, "a whole number of warm sandboxes") {
                if n > 1024 {
                    self.err(
                        &p,
                        v.pos,
                        "pool_size above 1024 would exhaust the host; use a small number such as 3",
                    );
                } else {
                    e.pool_size = u32::try_from(n).ok();
                }
            }
        }
        e
    }

    fn llm(&mut self, node: &Node, path: &str) -> Llm {
        let mut l = Llm::default();
        let Some(f) = self.fields(
            node,
            path,
            &[
                "provider",
                "api_key",
                "model",
                "base_url",
                "max_tokens",
                "prices",
            ],
            &[],
        ) else {
            return l;
        };
        if let Some((v, p)) = f.get("max_tokens") {
            match self.integer(v, &p, "a number of tokens") {
                Some(n) if (1..=1_000_000).contains(&n) => l.max_tokens = u32::try_from(n).ok(),
                Some(n) => self.err(
                    &p,
                    v.pos,
                    format!("max_tokens {n} is out of range; use 1 to 1000000"),
                ),
                None => {}
            }
        }
        if let Some((v, p)) = f.get("prices") {
            l.prices = self.prices(v, &p);
        }
        if let Some((v, p)) = f.get("provider") {
            if let Some(t) = self.nonempty(v, &p, "a provider name") {
                if !KNOWN_PROVIDERS.contains(&t.as_str()) {
                    match suggest(&t, KNOWN_PROVIDERS.iter().copied()) {
                        Some(h) => {
                            let mut d = Diagnostic::error(&p, v.pos, format!("unknown provider {t:?}; did you mean `{h}`?"));
                            d.did_you_mean = Some(h.to_string());
                            self.diags.push(d);
                        }
                        None => self.warn(&p, v.pos, format!("provider {t:?} is not one nanoclaw knows ({}); set base_url to its OpenAI-compatible endpoint", KNOWN_PROVIDERS.join(", "))),
                    }
                }
                l.provider = Some(t);
            }
        }
        if let Some((v, p)) = f.get("api_key") {
            if let Some(s) = self.scalar(v, &p, "an API key (use ${ENV_VAR})") {
                if !s.interpolated && !s.text.is_empty() {
                    self.warn(&p, v.pos, "the API key is written in the file: use ${ANTHROPIC_API_KEY} (or another variable) so the secret stays out of it");
                }
                l.api_key = Some(Secret::new(s.text));
            }
        }
        if let Some((v, p)) = f.get("model") {
            l.model = self.nonempty(v, &p, "a model name");
        }
        if let Some((v, p)) = f.get("base_url") {
            if let Some(u) = self.nonempty(v, &p, "a URL") {
                let rest = u
                    .strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"));
                match rest {
                    Some(r) if !r.is_empty() && !r.starts_with('/') => l.base_url = Some(u),
                    _ => self.err(&p, v.pos, "base_url must be an http:// or https:// URL with a host, e.g. https://api.anthropic.com"),
                }
            }
        }
        l
    }

    fn tools(&mut self, node: &Node, path: &str, global: bool) -> ToolsSection {
        let mut t = ToolsSection::default();
        let Some(f) = self.fields(
            node,
            path,
            &[
                "allow", "deny", "elevated", "ask", "approved", "http", "paths",
            ],
            &[],
        ) else {
            return t;
        };
        self.tool_rules(&f, &mut t);
        for name in ["allow", "deny"] {
            let Some((v, p)) = f.get(name) else { continue };
            let Some(items) = self.string_list(v, &p, "tool names or group:* shorthands") else {
                continue;
            };
            let mut out = Vec::new();
            for (s, pos, ip) in items {
                let n = tools::normalize(&s);
                if n.starts_with("group:") && !tools::is_known_group(&n) {
                    let groups = tools::group_names();
                    let hint = suggest(&n, groups.iter().copied());
                    let mut d = Diagnostic::error(
                        &ip,
                        pos,
                        format!(
                            "unknown tool group {s:?}{}; known groups: {}, group:*",
                            hint.map(|h| format!(" (did you mean `{h}`?)"))
                                .unwrap_or_default(),
                            groups.join(", ")
                        ),
                    );
                    d.did_you_mean = hint.map(str::to_string);
                    self.diags.push(d);
                    continue;
                }
                out.push(n);
            }
            if name == "allow" {
                t.allow = Some(out);
            } else {
                t.deny = Some(out);
            }
        }
        if let Some((v, p)) = f.get("elevated") {
            let mut e = ElevatedSection::default();
            if let Some(ef) = self.fields(v, &p, &["enabled", "allowFrom"], &[]) {
                if let Some((v, p)) = ef.get("enabled") {
                    e.enabled = self.boolean(v, &p);
                }
                if let Some((v, p)) = ef.get("allowFrom") {
                    e.allow_from = self.allow_from(v, &p);
                }
            }
            let _ = global;
            t.elevated = Some(e);
        }
        t
    }

    fn prices(&mut self, v: &Node, path: &str) -> Option<Prices> {
        let f = self.fields(v, path, &["input", "output"], &[])?;
        let mut pr = Prices::default();
        for (name, slot) in [("input", &mut pr.input), ("output", &mut pr.output)] {
            match f.get(name) {
                Some((v, p)) => match self.number(v, &p, "a price per million tokens") {
                    Some(x) if x.is_finite() && x >= 0.0 => *slot = x,
                    Some(_) => self.err(&p, v.pos, "a price must be a number 0 or more"),
                    None => {}
                },
                None => self.err(
                    path,
                    v.pos,
                    format!("prices needs `{name}` (per million tokens)"),
                ),
            }
        }
        Some(pr)
    }

    fn budget(&mut self, node: &Node, path: &str) -> Budget {
        let mut b = Budget::default();
        let Some(f) = self.fields(
            node,
            path,
            &["turns", "tokens", "wallTime", "dailyTokens", "dailySpend"],
            &[],
        ) else {
            return b;
        };
        if let Some((v, p)) = f.get("turns") {
            match self.integer(v, &p, "a number of model calls") {
                Some(n) if (1..=10_000).contains(&n) => b.turns = u32::try_from(n).ok(),
                Some(n) => self.err(
                    &p,
                    v.pos,
                    format!("turns {n} is out of range; use 1 to 10000"),
                ),
                None => {}
            }
        }
        for (name, slot) in [
            ("tokens", &mut b.tokens),
            ("dailyTokens", &mut b.daily_tokens),
        ] {
            if let Some((v, p)) = f.get(name) {
                match self.integer(v, &p, "a number of tokens") {
                    Some(0) => self.err(&p, v.pos, format!("{name} must be at least 1")),
                    Some(n) => *slot = Some(n),
                    None => {}
                }
            }
        }
        if let Some((v, p)) = f.get("wallTime") {
            b.wall_time = self.duration(v, &p);
        }
        if let Some((v, p)) = f.get("dailySpend") {
            match self.number(v, &p, "an amount of money") {
                Some(x) if x.is_finite() && x >= 0.0 => b.daily_spend = Some(x),
                Some(_) => self.err(&p, v.pos, "dailySpend must be a number 0 or more"),
                None => {}
            }
        }
        b
    }

    fn tool_rules(&mut self, f: &Fields<'_>, t: &mut ToolsSection) {
        if let Some((v, p)) = f.get("ask") {
            t.ask = self.ask(v, &p);
        }
        if let Some((v, p)) = f.get("approved") {
            if let Some(items) = self.string_list(v, &p, "exact command lines") {
                t.approved = Some(items.into_iter().map(|(s, _, _)| s).collect());
            }
        }
        if let Some((v, p)) = f.get("http") {
            if let Some(items) =
                self.string_list(v, &p, "rules like `GET api.github.com/repos/acme/*`")
            {
                let mut out = Vec::new();
                for (s, pos, ip) in items {
                    match tools::HttpRule::parse(&s) {
                        Ok(_) => out.push(s),
                        Err(e) => self.err(&ip, pos, e),
                    }
                }
                t.http = Some(out);
            }
        }
        if let Some((v, p)) = f.get("paths") {
            if let Some(pf) = self.fields(v, &p, &["read", "write"], &[]) {
                let mut rules = PathRules::default();
                for name in ["read", "write"] {
                    let Some((v, p)) = pf.get(name) else { continue };
                    let Some(items) = self.string_list(v, &p, "absolute paths inside the sandbox")
                    else {
                        continue;
                    };
                    let mut out = Vec::new();
                    for (s, pos, ip) in items {
                        if !s.starts_with('/') || s.split('/').any(|c| c == "..") {
                            self.err(&ip, pos, format!("{s:?} must be an absolute path inside the sandbox, without `..`"));
                        } else {
                            out.push(s);
                        }
                    }
                    if name == "read" {
                        rules.read = Some(out);
                    } else {
                        rules.write = Some(out);
                    }
                }
                t.paths = Some(rules);
            }
        }
    }

    fn ask(&mut self, v: &Node, path: &str) -> Option<BTreeMap<String, AskMode>> {
        let Value::Map(entries) = &v.value else {
            self.err(
                path,
                v.pos,
                "expected a map of tool name (or *) to off, on-miss or always",
            );
            return None;
        };
        let mut out = BTreeMap::new();
        for (k, val) in entries {
            let Some(tool) = k.as_scalar() else {
                self.err(path, k.pos, "tool names must be plain names");
                continue;
            };
            let p = join(path, tool);
            let Some(s) = self.nonempty(val, &p, "off, on-miss or always") else {
                continue;
            };
            let mode = match s.as_str() {
                "off" | "false" => AskMode::Off,
                "on-miss" | "on_miss" | "onMiss" => AskMode::OnMiss,
                "always" | "true" => AskMode::Always,
                other => {
                    self.err(
                        &p,
                        val.pos,
                        format!("ask mode {other:?} is not off, on-miss or always"),
                    );
                    continue;
                }
            };
            let name = if tool == "*" || tool == "elevated" {
                tool.to_string()
            } else {
                tools::normalize(tool)
            };
            out.insert(name, mode);
        }
        Some(out)
    }

    fn teams(&mut self, node: &Node, path: &str) -> BTreeMap<String, Team> {
        let mut out = BTreeMap::new();
        let Value::Map(entries) = &node.value else {
            if !node.is_null() {
                self.err(
                    path,
                    node.pos,
                    "expected a map of team name to its settings",
                );
            }
            return out;
        };
        for (k, v) in entries {
            let Some(name) = k.as_scalar() else {
                self.err(path, k.pos, "team names must be plain names");
                continue;
            };
            let p = join(path, name);
            if !team_name_ok(name) {
                self.err(&p, k.pos, format!("team name {name:?} must be 1-64 letters, digits, _, . or - and start with a letter or digit"));
                continue;
            }
            let mut t = Team::default();
            if let Some(f) = self.fields(v, &p, &["grants"], &[]) {
                if let Some((gv, gp)) = f.get("grants") {
                    for (g, ip) in self.list(gv, &gp, "grants").unwrap_or_default() {
                        let Some(gf) = self.fields(g, &ip, &["team", "access"], &[]) else {
                            continue;
                        };
                        let Some((tv, tp)) = gf.get("team") else {
                            self.err(
                                &ip,
                                g.pos,
                                "a grant needs `team`: the team whose space is shared",
                            );
                            continue;
                        };
                        let Some(team) = self.nonempty(tv, &tp, "a team name") else {
                            continue;
                        };
                        let access = match gf.get("access") {
                            None => Access::Ro,
                            Some((av, ap)) => match self.nonempty(av, &ap, "ro or rw").as_deref() {
                                Some("ro") => Access::Ro,
                                Some("rw") => Access::Rw,
                                Some(other) => {
                                    self.err(
                                        &ap,
                                        av.pos,
                                        format!("access {other:?} is not ro or rw"),
                                    );
                                    continue;
                                }
                                None => continue,
                            },
                        };
                        t.grants.push(TeamGrant { team, access });
                    }
                }
            }
            out.insert(name.to_string(), t);
        }
        let known: Vec<String> = out.keys().cloned().collect();
        for (name, t) in &out {
            for g in &t.grants {
                if !known.contains(&g.team) {
                    self.err(
                        &join(path, name),
                        node.pos,
                        format!(
                            "team {name} is granted team {:?}, which is not defined under teams",
                            g.team
                        ),
                    );
                } else if &g.team == name {
                    self.err(
                        &join(path, name),
                        node.pos,
                        format!("team {name} grants itself; its members see /team already"),
                    );
                }
            }
        }
        out
    }

    fn check_teams(&mut self, c: &Config, node: &Node, path: &str) {
        for a in &c.agents.list {
            if let Some(t) = &a.team {
                if !c.teams.contains_key(t) {
                    self.err(&format!("{}.team", a.key), node.pos, format!("agent {} is in team {t:?}, which is not defined under teams (path {path})", a.id));
                }
            }
        }
    }

    fn allow_from(&mut self, v: &Node, path: &str) -> Option<AllowFrom> {
        let mut out: AllowFrom = BTreeMap::new();
        match &v.value {
            Value::Map(entries) => {
                for (k, val) in entries {
                    let Some(ch) = k.as_scalar() else {
                        self.err(path, k.pos, "channel names must be plain names");
                        continue;
                    };
                    let ip = join(path, ch);
                    if let Some(ids) = self.string_list(val, &ip, "sender ids") {
                        out.entry(ch.to_string())
                            .or_default()
                            .extend(ids.into_iter().map(|(s, ..)| s));
                    }
                }
            }
            Value::List(_) => {
                for (s, _, _) in self.string_list(v, path, "CHANNEL:SENDER entries")? {
                    match s.split_once(':') {
                        Some((ch, id)) => {
                            out.entry(ch.to_string()).or_default().push(id.to_string())
                        }
                        None => out.entry("*".to_string()).or_default().push(s),
                    }
                }
            }
            _ => {
                self.err(path, v.pos, format!("expected a map of channel to sender ids (e.g. telegram: [\"123\"]), found {}", v.kind()));
                return None;
            }
        }
        Some(out)
    }

    fn agents(&mut self, node: &Node, path: &str) -> Agents {
        let mut a = Agents::default();
        let Value::Map(entries) = &node.value else {
            if !node.is_null() {
                self.err(
                    path,
                    node.pos,
                    format!(
                        "expected a map with defaults and list, found {}",
                        node.kind()
                    ),
                );
            }
            return a;
        };
        let mut ids: HashSet<String> = HashSet::new();
        for (k, v) in entries {
            let Some(key) = k.as_scalar() else {
                self.err(path, k.pos, "keys must be plain names, not maps or lists");
                continue;
            };
            let p = join(path, key);
            match key {
                "defaults" => {
                    if let Some(f) = self.fields(v, &p, &["sandbox", "tools", "budget"], &[]) {
                        if let Some((v, sp)) = f.get("sandbox") {
                            a.defaults.sandbox = self.sandbox(v, &sp);
                        }
                        if let Some((v, bp)) = f.get("budget") {
                            a.defaults.budget = self.budget(v, &bp);
                        }
                        if let Some((v, tp)) = f.get("tools") {
                            a.defaults.tools = self.tools(v, &tp, false);
                        }
                    }
                }
                "list" => {
                    let Some(items) = self.list(v, &p, "agents") else {
                        continue;
                    };
                    for (n, ip) in items {
                        if let Some(e) = self.agent(n, &ip, None) {
                            self.add_agent(&mut a, &mut ids, e, n.pos, &ip);
                        }
                    }
                }
                other => {
                    // Seed 003 writes agents as `agents.<id>: {...}`.
                    if let Some(h) = suggest(other, ["defaults", "list"]) {
                        let mut d = Diagnostic::error(&p, k.pos, format!("unknown key `{other}`; did you mean `{h}`? (an agent with this id would have to go in agents.list)"));
                        d.did_you_mean = Some(h.to_string());
                        self.diags.push(d);
                        continue;
                    }
                    if let Some(e) = self.agent(v, &p, Some((other, k.pos))) {
                        self.add_agent(&mut a, &mut ids, e, k.pos, &p);
                    }
                }
            }
        }
        a
    }

    fn add_agent(
        &mut self,
        a: &mut Agents,
        ids: &mut HashSet<String>,
        e: AgentEntry,
        pos: Pos,
        path: &str,
    ) {
        if !ids.insert(e.id.clone()) {
            self.err(
                path,
                pos,
                format!("agent id {:?} is defined twice; ids must be unique", e.id),
            );
            return;
        }
        a.list.push(e);
    }

    fn agent(&mut self, node: &Node, path: &str, keyed: Option<(&str, Pos)>) -> Option<AgentEntry> {
        let names: &[&'static str] = &[
            "id",
            "name",
            "default",
            "workspace",
            "sandbox",
            "network",
            "tools",
            "llm",
            "system",
            "budget",
            "team",
        ];
        let f = self.fields(node, path, names, &[])?;
        let mut e = AgentEntry {
            key: path.to_string(),
            ..AgentEntry::default()
        };
        let id = match (keyed, f.get("id")) {
            (Some((k, _)), Some((v, p))) => {
                let id = self.nonempty(v, &p, "an agent id")?;
                if id != k {
                    self.err(&p, v.pos, format!("id {id:?} differs from the key {k:?} it is under; drop the id or make them equal"));
                }
                k.to_string()
            }
            (Some((k, _)), None) => k.to_string(),
            (None, Some((v, p))) => self.nonempty(v, &p, "an agent id")?,
            (None, None) => {
                self.err(path, node.pos, "agent entry has no id; add id: NAME");
                return None;
            }
        };
        let id_ok = id.len() <= 64
            && id.starts_with(|c: char| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            let pos = keyed
                .map(|(_, p)| p)
                .or_else(|| f.get("id").map(|(v, _)| v.pos))
                .unwrap_or(node.pos);
            self.err(path, pos, format!("agent id {id:?} must be 1-64 letters, digits, _, . or - and start with a letter or digit"));
            return None;
        }
        e.id = id;
        if let Some((v, p)) = f.get("name") {
            e.name = self.nonempty(v, &p, "a display name");
        }
        if let Some((v, p)) = f.get("default") {
            e.default = self.boolean(v, &p).unwrap_or(false);
        }
        if let Some((v, p)) = f.get("workspace") {
            if let Some(w) = self.path_value(v, &p) {
                if !self.env.fs.exists(&w) {
                    self.err(
                        &p,
                        v.pos,
                        format!(
                            "workspace {} does not exist on this host; create it or fix the path",
                            w.display()
                        ),
                    );
                } else {
                    e.workspace = Some(w);
                }
            }
        }
        if let Some((v, p)) = f.get("sandbox") {
            e.sandbox = self.sandbox(v, &p);
        }
        if let Some((v, p)) = f.get("network") {
            let sb = &e.sandbox;
            if sb.network.is_some() || sb.allowed_hosts.is_some() || sb.network_rules.is_some() {
                self.err(&p, v.pos, "the agent's network is also set under sandbox; set it in one place (sandbox.network)");
            } else {
                self.sandbox_network(v, &p, &mut e.sandbox);
            }
        }
        if let Some((v, p)) = f.get("tools") {
            e.tools = self.tools(v, &p, false);
        }
        if let Some((v, p)) = f.get("llm") {
            e.llm = Some(self.llm(v, &p));
        }
        if let Some((v, p)) = f.get("system") {
            e.system = self.nonempty(v, &p, "a system prompt");
        }
        if let Some((v, p)) = f.get("budget") {
            e.budget = self.budget(v, &p);
        }
        if let Some((v, p)) = f.get("team") {
            e.team = self.nonempty(v, &p, "a team name");
        }
        Some(e)
    }

    fn sandbox(&mut self, node: &Node, path: &str) -> SandboxSection {
        let mut s = SandboxSection::default();
        let names = [
            "mode",
            "scope",
            "workspaceAccess",
            "workspaceRoot",
            "bindMounts",
            "network",
            "allowedHosts",
            "setupCommand",
            "image",
            "backend",
            "prune",
            "memory",
            "memorySwap",
            "cpus",
            "pids",
            "timeout",
            "tmpfsSize",
            "outputLimit",
            "dangerouslyAllowUnsafeBinds",
        ];
        let aliases = [
            ("memory_limit", "memory"),
            ("memoryLimit", "memory"),
            ("cpu_limit", "cpus"),
            ("cpuLimit", "cpus"),
            ("pids_limit", "pids"),
            ("pidsLimit", "pids"),
            ("binds", "bindMounts"),
            ("network_mode", "network"),
            ("networkMode", "network"),
        ];
        let Some(f) = self.fields(node, path, &names, &aliases) else {
            return s;
        };
        if let Some((v, p)) = f.get("dangerouslyAllowUnsafeBinds") {
            s.dangerously_allow_unsafe_binds = self.boolean(v, &p);
            if s.dangerously_allow_unsafe_binds == Some(true) {
                self.warn(&p, v.pos, "dangerous bind mounts are allowed in this sandbox section: remove this key unless you really mean it");
            }
        }
        if let Some((v, p)) = f.get("mode") {
            s.mode = self.enum_value(
                v,
                &p,
                &[
                    ("off", SandboxMode::Off),
                    ("non-main", SandboxMode::NonMain),
                    ("all", SandboxMode::All),
                ],
            );
            if s.mode == Some(SandboxMode::Off) {
                self.warn(
                    &p,
                    v.pos,
                    "mode: off runs this agent's tools on the host, without any sandbox",
                );
            }
        }
        if let Some((v, p)) = f.get("scope") {
            s.scope = self.enum_value(
                v,
                &p,
                &[
                    ("session", Scope::Session),
                    ("agent", Scope::Agent),
                    ("shared", Scope::Shared),
                ],
            );
        }
        if let Some((v, p)) = f.get("workspaceAccess") {
            s.workspace_access = self.enum_value(
                v,
                &p,
                &[
                    ("none", WorkspaceAccess::None),
                    ("ro", WorkspaceAccess::Ro),
                    ("rw", WorkspaceAccess::Rw),
                ],
            );
        }
        if let Some((v, p)) = f.get("workspaceRoot") {
            if let Some(w) = self.path_value(v, &p) {
                if !self.env.fs.exists(&w) {
                    self.warn(
                        &p,
                        v.pos,
                        format!(
                            "workspace root {} does not exist yet; it will be created on first use",
                            w.display()
                        ),
                    );
                }
                s.workspace_root = Some(w);
            }
        }
        if let Some((v, p)) = f.get("bindMounts") {
            let allow = s.dangerously_allow_unsafe_binds == Some(true);
            s.bind_mounts = self.binds(v, &p, allow);
        }
        if let Some((v, p)) = f.get("network") {
            self.sandbox_network(v, &p, &mut s);
        }
        if let Some((v, p)) = f.get("allowedHosts") {
            if s.allowed_hosts.is_some() {
                self.err(
                    &p,
                    v.pos,
                    "allowed hosts are given twice, here and in network.allowed_hosts; keep one",
                );
            } else {
                s.allowed_hosts = self.hosts(v, &p);
            }
        }
        if let Some((v, p)) = f.get("setupCommand") {
            s.setup_command = self.nonempty(v, &p, "a shell command");
        }
        if let Some((v, p)) = f.get("image") {
            s.image = self.nonempty(v, &p, "an image reference (or host)");
        }
        if let Some((v, p)) = f.get("backend") {
            let what = "a backend: native, docker, gvisor or microvm";
            s.backend = self.nonempty(v, &p, what).and_then(|b| {
                if crate::model::BACKENDS.contains(&b.as_str()) {
                    Some(b)
                } else {
                    self.err(&p, v.pos, format!("unknown backend `{b}`; expected {what}"));
                    None
                }
            });
        }
        if let Some((v, p)) = f.get("prune") {
            if let Some(pf) = self.fields(v, &p, &["idleHours", "maxAgeDays"], &[]) {
                let mut pr = Prune::default();
                for (k, slot) in [
                    ("idleHours", &mut pr.idle_hours),
                    ("maxAgeDays", &mut pr.max_age_days),
                ] {
                    if let Some((v, kp)) = pf.get(k) {
                        if let Some(n) = self.number(v, &kp, "a positive number") {
                            if n.is_finite() && n > 0.0 {
                                *slot = Some(n);
                            } else {
                                self.diags.push(Diagnostic::error(
                                    &kp,
                                    v.pos,
                                    format!("{k} must be a positive number"),
                                ));
                            }
                        }
                    }
                }
                s.prune = Some(pr);
            }
        }
        if let Some((v, p)) = f.get("memory") {
            s.memory = self.memory(v, &p);
        }
        if let Some((v, p)) = f.get("memorySwap") {
            s.memory_swap = self.memory(v, &p);
            let sw = s.memory_swap.map(|x| (x, v, p.clone()));
            self.swap_check(s.memory, sw);
        }
        if let Some((v, p)) = f.get("cpus") {
            s.cpus = self.cpus(v, &p);
        }
        if let Some((v, p)) = f.get("pids") {
            s.pids = self.pids(v, &p);
        }
        if let Some((v, p)) = f.get("timeout") {
            s.timeout = self.timeout(v, &p);
        }
        if let Some((v, p)) = f.get("tmpfsSize") {
            s.tmpfs_size = self.positive_size(v, &p, "a tmpfs size");
        }
        if let Some((v, p)) = f.get("outputLimit") {
            s.output_limit = self.positive_size(v, &p, "an output limit");
        }
        s
    }
}

trait PortOk {
    fn is_none_or_ok(&self) -> bool;
}

impl PortOk for Option<&String> {
    fn is_none_or_ok(&self) -> bool {
        match self {
            None => true,
            Some(p) => p.parse::<u16>().is_ok_and(|n| n > 0),
        }
    }
}

/// Convenience: a path as shown in messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}
