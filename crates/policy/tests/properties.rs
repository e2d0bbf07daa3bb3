//! Property tests: deny always wins; shared scope never gets per-agent
//! binds; CLI beats file beats default.

use std::path::PathBuf;

use nanoclaw_policy::model::*;
use nanoclaw_policy::resolve::ElevatedGate;
use nanoclaw_policy::tools::{self, ToolLayer, ToolPolicy};
use nanoclaw_policy::{resolve, CliOverrides, Config, Request, Source};
use proptest::prelude::*;

const TOOL_POOL: &[&str] = &[
    "exec",
    "bash",
    "process",
    "read",
    "write",
    "edit",
    "apply_patch",
    "browser",
    "message",
    "nodes",
    "cron",
    "http-request",
    "shell",
    "web_fetch",
    "image",
    "group:fs",
    "group:runtime",
    "group:ui",
    "group:openclaw",
    "group:*",
    "*",
    "group:sessions",
    "group:memory",
    "group:messaging",
];

fn entries() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(TOOL_POOL).prop_map(str::to_string),
        0..5,
    )
}

fn tools_section() -> impl Strategy<Value = ToolsSection> {
    (
        prop::option::of(entries()),
        prop::option::of(entries()),
        any::<Option<bool>>(),
    )
        .prop_map(|(allow, deny, el)| ToolsSection {
            allow: allow.map(|v| v.iter().map(|t| tools::normalize(t)).collect()),
            deny: deny.map(|v| v.iter().map(|t| tools::normalize(t)).collect()),
            elevated: el.map(|e| ElevatedSection {
                enabled: Some(e),
                allow_from: None,
            }),
            ..ToolsSection::default()
        })
}

fn agent(id: &str, sandbox: SandboxSection, tools: ToolsSection) -> AgentEntry {
    AgentEntry {
        id: id.into(),
        key: "agents.list[0]".to_string(),
        sandbox,
        tools,
        ..AgentEntry::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For any layers, a tool matched by any deny entry is never allowed.
    #[test]
    fn deny_always_wins_in_policy(layers in prop::collection::vec((entries(), entries()), 0..4), tool in prop::sample::select(TOOL_POOL)) {
        let policy = ToolPolicy { layers: layers.iter().map(|(a, d)| ToolLayer {
            source: Source::Global, key: "tools".into(),
            allow: a.iter().map(|t| tools::normalize(t)).collect(),
            deny: d.iter().map(|t| tools::normalize(t)).collect(),
        }).collect() };
        let t = tools::normalize(tool);
        let denied = policy.layers.iter().any(|l| l.deny.iter().any(|e| tools::entry_matches(e, &t)));
        if denied {
            prop_assert!(!policy.is_allowed(&t));
        }
        // a non-empty allow list blocks what it does not list
        let unlisted = policy.layers.iter().any(|l| !l.allow.is_empty() && !l.allow.iter().any(|e| tools::entry_matches(e, &t)));
        if unlisted {
            prop_assert!(!policy.is_allowed(&t));
        }
        prop_assert_eq!(policy.is_allowed(&t), !denied && !unlisted);
    }

    /// Through the whole resolution: denies from the global tools, the
    /// defaults or the agent are never overridden (not by another layer's
    /// allow, not by elevated).
    #[test]
    fn deny_always_wins_resolved(g in tools_section(), d in tools_section(), a in tools_section(), tool in prop::sample::select(TOOL_POOL), ro in any::<bool>()) {
        let mut c = Config { tools: g.clone(), ..Config::default() };
        c.agents.defaults.tools = d.clone();
        let sb = SandboxSection { workspace_access: Some(if ro { WorkspaceAccess::Ro } else { WorkspaceAccess::None }), ..Default::default() };
        c.agents.list.push(agent("x", sb, a.clone()));
        let r = resolve(&c, &Request::new(Some("x"), "s")).unwrap();
        let t = tools::normalize(tool);
        let denied = [&g, &d, &a].iter().any(|s| s.deny.iter().flatten().any(|e| tools::entry_matches(e, &t)));
        if denied {
            prop_assert!(!r.tools.is_allowed(&t));
        }
        if ro && ["write", "edit", "apply_patch"].contains(&t.as_str()) {
            prop_assert!(!r.tools.is_allowed(&t));
        }
        let exec_denied = [&g, &d, &a].iter().any(|s| s.deny.iter().flatten().any(|e| tools::entry_matches(e, "exec")));
        if exec_denied {
            prop_assert!(!r.elevated.allowed);
            prop_assert!(r.elevated.failing.iter().any(|f| f.gate == ElevatedGate::ExecDenied));
        }
        if r.elevated.allowed {
            prop_assert!(r.tools.is_allowed("exec"));
            prop_assert_eq!(g.elevated.as_ref().and_then(|e| e.enabled), Some(true));
        }
    }

    /// In shared scope no mount ever comes from an agent's own bindMounts.
    #[test]
    fn shared_scope_never_gets_agent_binds(
        n_global in 0usize..3, n_agent in 0usize..4, scope_at_agent in any::<bool>(), cli_mount in any::<bool>(),
    ) {
        let mk = |p: &str, i: usize| BindMount { host: PathBuf::from(format!("/{p}{i}")), container: PathBuf::from(format!("/mnt/{p}{i}")), access: Access::Ro };
        let mut c = Config::default();
        c.agents.defaults.sandbox.bind_mounts = Some((0..n_global).map(|i| mk("g", i)).collect());
        let mut sb = SandboxSection { bind_mounts: Some((0..n_agent).map(|i| mk("a", i)).collect()), ..Default::default() };
        if scope_at_agent { sb.scope = Some(Scope::Shared) } else { c.agents.defaults.sandbox.scope = Some(Scope::Shared) }
        c.agents.list.push(agent("x", sb, ToolsSection::default()));
        let mut req = Request::new(Some("x"), "s");
        if cli_mount { req.cli.mounts.push(mk("c", 0)); }
        let r = resolve(&c, &req).unwrap();
        prop_assert_eq!(r.scope, Scope::Shared);
        prop_assert!(r.mounts.iter().all(|m| !matches!(m.from.source, Source::Agent(_))));
        prop_assert!(r.mounts.iter().all(|m| !m.mount.host.starts_with("/a")));
        prop_assert_eq!(r.mounts.len(), n_global + usize::from(cli_mount));
        prop_assert_eq!(n_agent > 0, r.warnings.iter().any(|w| w.contains("bindMounts ignored")));
    }

    /// Precedence: CLI > agent > agents.defaults > security > built-in, for
    /// every limit, and the recorded source says which.
    #[test]
    fn cli_beats_file_beats_default(
        sec in prop::option::of(4u64..64), def in prop::option::of(4u64..64), ag in prop::option::of(4u64..64), cli in prop::option::of(4u64..64),
        psec in prop::option::of(1u64..999), pcli in prop::option::of(1u64..999),
        tdef in prop::option::of(1u64..99), tcli in prop::option::of(1u64..99),
    ) {
        let mb = |x: u64| x << 20;
        let mut c = Config::default();
        c.security.memory_limit = sec.map(mb);
        c.security.pids_limit = psec;
        c.agents.defaults.sandbox.memory = def.map(mb);
        c.agents.defaults.sandbox.timeout = tdef.map(std::time::Duration::from_secs);
        c.agents.list.push(agent("x", SandboxSection { memory: ag.map(mb), ..Default::default() }, ToolsSection::default()));
        let req = Request { cli: CliOverrides { memory: cli.map(mb), pids: pcli, timeout: tcli.map(std::time::Duration::from_secs), ..Default::default() }, ..Request::new(Some("x"), "s") };
        let r = resolve(&c, &req).unwrap();
        let (want, src) = match (cli, ag, def, sec) {
            (Some(v), ..) => (mb(v), Source::CliFlag),
            (None, Some(v), ..) => (mb(v), Source::Agent("x".into())),
            (None, None, Some(v), _) => (mb(v), Source::Global),
            (None, None, None, Some(v)) => (mb(v), Source::Global),
            (None, None, None, None) => (nanoclaw_sandbox::spec::DEFAULT_MEMORY, Source::BuiltinDefault),
        };
        prop_assert_eq!(r.limits.memory, want);
        prop_assert_eq!(r.source("limits.memory"), Some(&src));
        let (wp, sp) = match (pcli, psec) {
            (Some(v), _) => (v, Source::CliFlag),
            (None, Some(v)) => (v, Source::Global),
            (None, None) => (nanoclaw_sandbox::spec::DEFAULT_PIDS, Source::BuiltinDefault),
        };
        prop_assert_eq!(r.limits.pids, wp);
        prop_assert_eq!(r.source("limits.pids"), Some(&sp));
        let wt = tcli.or(tdef).map(std::time::Duration::from_secs).unwrap_or(nanoclaw_sandbox::spec::DEFAULT_TIMEOUT);
        prop_assert_eq!(r.limits.timeout, wt);
        // The spec marks exactly the non-default limits explicit.
        let spec = r.to_spec(vec!["true".into()]).unwrap();
        prop_assert_eq!(spec.limits.memory, Some(want));
        prop_assert_eq!(spec.limits.explicit.memory, src != Source::BuiltinDefault);
        prop_assert_eq!(spec.limits.explicit.pids, sp != Source::BuiltinDefault);
        prop_assert!(!spec.limits.explicit.cpus);
    }

    /// Sandboxed is exactly: mode all, or non-main outside the main session.
    #[test]
    fn sandboxed_iff_mode_says_so(mode in prop::sample::select(vec![None, Some(SandboxMode::Off), Some(SandboxMode::NonMain), Some(SandboxMode::All)]), main in any::<bool>()) {
        let mut c = Config::default();
        c.agents.defaults.sandbox.mode = mode;
        let r = resolve(&c, &Request::new(None, if main { "main" } else { "other" })).unwrap();
        let want = match mode { Some(SandboxMode::Off) => false, Some(SandboxMode::NonMain) => !main, _ => true };
        prop_assert_eq!(r.sandboxed, want);
        prop_assert_eq!(r.to_spec(vec!["x".into()]).is_ok(), want);
        let j = nanoclaw_policy::explain::explain_json(&r, None);
        prop_assert_eq!(j["sandboxed"].as_bool(), Some(want));
    }
}
