//! Every configuration example of seed 000 (NanoClaw config.yaml) and seed
//! 003 (OpenClaw sandbox) parses, and resolves as the seed describes.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{load, load_ok};
use nanoclaw_policy::explain::{explain_json, explain_text, fix_its};
use nanoclaw_policy::model::*;
use nanoclaw_policy::resolve::{ElevatedGate, SpecError};
use nanoclaw_policy::tools::ToolDecision;
use nanoclaw_policy::{resolve, Config, Request, Resolved, Source};

fn res(c: &Config, agent: Option<&str>, session: &str) -> Resolved {
    resolve(c, &Request::new(agent, session)).expect("resolves")
}

fn mounts(r: &Resolved) -> Vec<String> {
    r.mounts.iter().map(|m| m.mount.display()).collect()
}

// ---------------------------------------------------------------- seed 000

/// Seed 000's config.yaml, with the indentation the scraped page lost.
const SEED000_CONFIG: &str = r#"security:
  # 容器资源限制
  cpu_limit: 1.0
  memory_limit: 512m
  timeout: 30s
  # 网络隔离
  network_mode: none # 或 bridge
  # 文件系统
  read_only: true
  tmpfs_size: 100m
execution:
  # 支持的语言环境
  languages:
    - python:3.11-slim
    - node:18-alpine
    - golang:1.21-alpine
  # 容器预热
  preload_images: true
  pool_size: 3
llm:
  provider: anthropic
  api_key: ${ANTHROPIC_API_KEY}
  model: claude-3-5-sonnet-20241022
"#;

#[test]
fn seed000_config_parses() {
    let l = load_ok(SEED000_CONFIG);
    let c = &l.config;
    assert_eq!(c.security.cpu_limit, Some(1.0));
    assert_eq!(c.security.memory_limit, Some(512 << 20));
    assert_eq!(c.security.timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        c.security.network_mode,
        Some(NetworkSetting::Mode(NetworkMode::None))
    );
    assert_eq!(c.security.read_only, Some(true));
    assert_eq!(c.security.tmpfs_size, Some(100 << 20));
    assert_eq!(
        c.execution.languages.get("python").map(String::as_str),
        Some("python:3.11-slim")
    );
    assert_eq!(
        c.execution.languages.get("node").map(String::as_str),
        Some("node:18-alpine")
    );
    assert_eq!(
        c.execution.languages.get("go").map(String::as_str),
        Some("golang:1.21-alpine")
    );
    assert_eq!(c.execution.preload_images, Some(PreloadImages::All(true)));
    assert_eq!(c.execution.pool_size, Some(3));
    assert_eq!(c.llm.provider.as_deref(), Some("anthropic"));
    assert_eq!(c.llm.model.as_deref(), Some("claude-3-5-sonnet-20241022"));
    let key = c.llm.api_key.as_ref().expect("api key");
    assert_eq!(key.expose(), "sk-ant-secret-value");
    // The secret is never printed: not in Debug, not in JSON, not in explain.
    assert!(!format!("{c:?}").contains("sk-ant"));
    assert!(!serde_json::to_string(c).unwrap().contains("sk-ant"));
    let r = res(c, None, "main");
    assert!(!explain_text(&r, None).contains("sk-ant"));
    assert!(!explain_json(&r, None).to_string().contains("sk-ant"));
    // Resolution: the security section sets the global defaults.
    assert!(r.sandboxed);
    assert_eq!(r.limits.memory, 512 << 20);
    assert_eq!(r.sources["limits.memory"].source, Source::Global);
    assert_eq!(r.sources["limits.memory"].key, "security.memory_limit");
    assert_eq!(r.sources["limits.pids"].source, Source::BuiltinDefault);
    assert_eq!(r.network.mode, NetworkMode::None);
    let spec = r.to_spec(vec!["true".into()]).unwrap();
    assert!(spec.limits.explicit.memory && spec.limits.explicit.cpus && !spec.limits.explicit.pids);
}

#[test]
fn seed000_missing_api_key_variable_is_named() {
    let l = load(&SEED000_CONFIG.replace("ANTHROPIC_API_KEY", "NANOCLAW_TEST_UNSET_KEY"));
    let e: Vec<String> = l.errors().map(|d| d.to_string()).collect();
    assert_eq!(
        e,
        ["22:12: error: llm.api_key: environment variable NANOCLAW_TEST_UNSET_KEY is not set (referenced as ${NANOCLAW_TEST_UNSET_KEY}); export it, or use ${NANOCLAW_TEST_UNSET_KEY:-default}"]
    );
}

#[test]
fn seed000_best_practices_parse() {
    // 1. least privilege
    let l = load_ok("security:\n  read_only: true\n  privileged: false\n  cap_drop:\n    - ALL\n");
    assert_eq!(l.config.security.cap_drop, ["ALL"]);
    assert_eq!(l.config.security.privileged, Some(false));
    // 2. network isolation, both variants
    let l = load_ok("security:\n  network_mode: none\n");
    assert_eq!(res(&l.config, None, "s").network.mode, NetworkMode::None);
    let l =
        load_ok("security:\n  network_mode: bridge\n  allowed_hosts:\n    - api.anthropic.com\n");
    assert_eq!(l.warnings().count(), 1, "bridge is deprecated");
    let r = res(&l.config, None, "s");
    // "受限网络" (restricted network): bridge with allowed hosts is an allowlist.
    assert_eq!(r.network.mode, NetworkMode::Allowlist);
    assert_eq!(r.network.allowed_hosts, ["api.anthropic.com"]);
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("\"bridge\" is deprecated; read as allowlist")));
    // 3. resource limits
    let l = load_ok("security:\n  cpu_limit: 0.5\n  cpu_shares: 512\n  memory_limit: 256m\n  memory_swap: 256m\n  blkio_weight: 500\n");
    let r = res(&l.config, None, "s");
    assert_eq!(r.limits.cpus, 0.5);
    assert_eq!(r.limits.memory, 256 << 20);
    assert_eq!(r.limits.memory_swap, Some(256 << 20));
    // cpu_shares and blkio_weight are accepted but not enforced: said so.
    assert_eq!(l.warnings().count(), 2);
}

// ---------------------------------------------------------------- seed 003

#[test]
fn seed003_basic_config_non_main() {
    let l = load_ok(
        r#"{
  "agents": {
    "defaults": {
      "sandbox": {
        "mode": "non-main",     // 沙箱模式
        "scope": "session",     // 隔离范围
        "workspaceAccess": "none"  // 工作空间访问
      }
    }
  }
}"#,
    );
    let main = res(&l.config, None, "main");
    assert!(
        !main.sandboxed,
        "non-main: the main session runs on the host"
    );
    assert!(main.warnings[0].starts_with("NOT SANDBOXED"));
    let other = res(&l.config, None, "telegram:42");
    assert!(other.sandboxed);
    assert_eq!(other.scope, Scope::Session);
    assert_eq!(other.sandbox_key, "agent:default:session:telegram:42");
    assert_eq!(other.workspace_access, WorkspaceAccess::None);
    assert!(other.mounts.is_empty());
}

#[test]
fn seed003_modes() {
    for (mode, main_sandboxed, other_sandboxed) in [
        ("non-main", false, true),
        ("off", false, false),
        ("all", true, true),
    ] {
        let text = format!("{{\n  \"agents\": {{\n    \"defaults\": {{\n      \"sandbox\": {{\n        \"mode\": \"{mode}\"\n      }}\n    }}\n  }}\n}}");
        let c = load_ok(&text).config;
        assert_eq!(
            res(&c, None, "main").sandboxed,
            main_sandboxed,
            "{mode} main"
        );
        assert_eq!(
            res(&c, None, "other").sandboxed,
            other_sandboxed,
            "{mode} other"
        );
    }
    // No file at all: sandboxed everywhere (off only when the operator says so).
    let c = Config::default();
    assert!(res(&c, None, "main").sandboxed);
    assert_eq!(res(&c, None, "main").mode, SandboxMode::All);
}

#[test]
fn seed003_scopes_and_workspace_access() {
    for (scope, key) in [
        ("session", "agent:default:session:s1"),
        ("agent", "agent:default"),
        ("shared", "shared"),
    ] {
        let c = load_ok(&format!(
            "{{\"agents\": {{\"defaults\": {{\"sandbox\": {{\"scope\": \"{scope}\"}}}}}}}}"
        ))
        .config;
        assert_eq!(res(&c, None, "s1").sandbox_key, key);
    }
    for (access, mount) in [
        ("none", None),
        (
            "ro",
            Some("/var/lib/nanoclaw/workspaces/default:/workspace:ro"),
        ),
        (
            "rw",
            Some("/var/lib/nanoclaw/workspaces/default:/workspace:rw"),
        ),
    ] {
        let c = load_ok(&format!("{{\"agents\": {{\"defaults\": {{\"sandbox\": {{\"workspaceAccess\": \"{access}\"}}}}}}}}")).config;
        let r = res(&c, None, "s");
        assert_eq!(mounts(&r).first().map(String::as_str), mount);
        // ro: the write tool is disabled (seed 003: 禁用 write 工具).
        assert_eq!(r.tools.is_allowed("write"), access != "ro", "{access}");
        assert!(r.tools.is_allowed("read"));
    }
}

#[test]
fn seed003_custom_bind_mounts() {
    let c = load_ok(
        r#"{
  "agents": {
    "defaults": {
      "sandbox": {
        "bindMounts": [
          "/home/user/data:/data:ro",
          "/tmp/cache:/cache:rw"
        ]
      }
    }
  }
}"#,
    )
    .config;
    assert_eq!(
        mounts(&res(&c, None, "s")),
        ["/home/user/data:/data:ro", "/tmp/cache:/cache:rw"]
    );
}

const MERGE: &str = r#"{
  "agents": {
    "defaults": {
      "sandbox": {
        "bindMounts": [
          "/shared/lib:/lib:ro"  // 全局挂载
        ]
      }
    },
    "data-processor": {
      "sandbox": {
        "bindMounts": [
          "/data:/data:rw"  // Agent 特定挂载
        ]
      }
    }
  }
}"#;

#[test]
fn seed003_bind_mount_merging() {
    let c = load_ok(MERGE).config;
    let r = res(&c, Some("data-processor"), "s");
    // 结果: data-processor 同时拥有两个挂载
    assert_eq!(mounts(&r), ["/shared/lib:/lib:ro", "/data:/data:rw"]);
    assert_eq!(r.mounts[0].from.source, Source::Global);
    assert_eq!(
        r.mounts[1].from.source,
        Source::Agent("data-processor".into())
    );
    assert_eq!(
        r.mounts[1].from.key,
        "agents.data-processor.sandbox.bindMounts[0]"
    );
    // Another agent (or none) gets only the global one.
    assert_eq!(mounts(&res(&c, None, "s")), ["/shared/lib:/lib:ro"]);
}

#[test]
fn seed003_shared_scope_ignores_agent_binds() {
    let c = load_ok(&MERGE.replace(
        "\"bindMounts\": [\n          \"/shared",
        "\"scope\": \"shared\",\n        \"bindMounts\": [\n          \"/shared",
    ))
    .config;
    let r = res(&c, Some("data-processor"), "s");
    assert_eq!(r.scope, Scope::Shared);
    assert_eq!(mounts(&r), ["/shared/lib:/lib:ro"]);
    assert!(
        r.warnings
            .iter()
            .any(|w| w
                .starts_with("agents.data-processor.sandbox.bindMounts ignored: scope is shared")),
        "{:?}",
        r.warnings
    );
    assert!(fix_its(&r)
        .iter()
        .any(|f| f.key == "agents.defaults.sandbox.scope"));
}

#[test]
fn seed003_network_setup_image() {
    let c = load_ok(
        r#"{"agents": {"defaults": {"sandbox": {"network": "bridge"  // 启用网络
    }}}}"#,
    )
    .config;
    let r = res(&c, None, "s");
    assert_eq!(r.network.mode, NetworkMode::Open);
    assert!(matches!(
        r.to_spec(vec!["true".into()]).map(|s| s.network),
        Ok(nanoclaw_sandbox::spec::Network::Open { .. })
    ));
    for setup in [
        "apt-get update && apt-get install -y git python3",
        "pip install pandas numpy scikit-learn",
        "apt-get update && apt-get install -y nodejs npm",
        "apt-get update && apt-get install -y git curl wget vim",
    ] {
        let c = load_ok(&(format!("{{\"agents\": {{\"defaults\": {{\"sandbox\": {{\"network\": \"bridge\", \"setupCommand\": \"{setup}\"}}}}}}}}"))).config;
        assert_eq!(res(&c, None, "s").setup_command.as_deref(), Some(setup));
    }
    let c = load_ok(r#"{"agents": {"defaults": {"sandbox": {"scope": "agent", "image": "mycustom/openclaw-sandbox:v1"}}}}"#).config;
    let r = res(&c, None, "s");
    assert_eq!(r.image.as_deref(), Some("mycustom/openclaw-sandbox:v1"));
    assert!(matches!(
        r.to_spec(vec!["true".into()]),
        Err(SpecError::Image { .. })
    ));
}

#[test]
fn seed003_tool_policy_before_sandbox() {
    let c = load_ok(
        r#"{
  "tools": {
    "allow": ["exec", "read", "write"],
    "deny": ["shell"]
  },
  "agents": {
    "defaults": {
      "sandbox": {
        "mode": "non-main"
      }
    }
  }
}"#,
    )
    .config;
    let r = res(&c, None, "worker");
    assert!(r.sandboxed);
    for t in ["exec", "read", "write"] {
        assert!(r.tools.is_allowed(t), "{t}");
    }
    assert!(
        matches!(r.tools.decide("shell"), ToolDecision::Denied { ref entry, .. } if entry == "shell")
    );
    assert!(matches!(
        r.tools.decide("browser"),
        ToolDecision::NotInAllowList { .. }
    ));
}

#[test]
fn seed003_elevated() {
    let base = r#"{"tools": {"elevated": {"enabled": true}}, "agents": {"list": [
        {"id": "ops", "tools": {"elevated": {"enabled": true}}},
        {"id": "plain"},
        {"id": "nodeny", "tools": {"deny": ["exec"], "elevated": {"enabled": true}}},
        {"id": "noallow", "tools": {"allow": ["read"], "elevated": {"enabled": true}}}
    ]}}"#;
    let c = load_ok(base).config;
    let r = res(&c, Some("ops"), "s");
    assert!(r.elevated.allowed, "{:?}", r.elevated);
    let r = res(&c, Some("plain"), "s");
    assert_eq!(r.elevated.failing_gate, Some(ElevatedGate::AgentDisabled));
    assert_eq!(
        r.elevated.failing[0].key,
        "agents.list[1].tools.elevated.enabled"
    );
    // Elevated never overrides deny, and grants no tool (needs allow).
    let r = res(&c, Some("nodeny"), "s");
    assert_eq!(r.elevated.failing_gate, Some(ElevatedGate::ExecDenied));
    assert!(!r.tools.is_allowed("exec"));
    let r = res(&c, Some("noallow"), "s");
    assert_eq!(r.elevated.failing_gate, Some(ElevatedGate::ExecNotAllowed));
    // Without the global gate, nobody.
    let c = load_ok(&base.replacen("\"enabled\": true", "\"enabled\": false", 1)).config;
    assert_eq!(
        res(&c, Some("ops"), "s").elevated.failing_gate,
        Some(ElevatedGate::GlobalDisabled)
    );
}

#[test]
fn seed003_elevated_allow_from() {
    let c = load_ok(
        r#"{"tools": {"elevated": {"enabled": true, "allowFrom": {"telegram": ["123"]}}},
        "agents": {"list": [{"id": "ops", "tools": {"elevated": {"enabled": true}}}]}}"#,
    )
    .config;
    let mut req = Request::new(Some("ops"), "s");
    let r = resolve(&c, &req).unwrap();
    assert_eq!(r.elevated.failing_gate, Some(ElevatedGate::GlobalAllowFrom));
    req.sender = Some(nanoclaw_policy::resolve::Sender {
        channel: "telegram".into(),
        id: "123".into(),
    });
    assert!(resolve(&c, &req).unwrap().elevated.allowed);
    req.sender = Some(nanoclaw_policy::resolve::Sender {
        channel: "discord".into(),
        id: "123".into(),
    });
    assert!(!resolve(&c, &req).unwrap().elevated.allowed);
}

const WEB_SCRAPER: &str = r#"{
  "agents": {
    "scraper": {
      "sandbox": {
        "mode": "all",
        "scope": "session",
        "workspaceAccess": "rw",
        "network": "bridge",
        "setupCommand": "pip install requests beautifulsoup4"
      },
      "tools": {
        "allow": ["http-request", "read", "write"]
      }
    }
  }
}"#;

#[test]
fn seed003_web_scraper() {
    let c = load_ok(WEB_SCRAPER).config;
    for session in ["main", "job-1"] {
        let r = res(&c, Some("scraper"), session);
        assert!(r.sandboxed, "mode all: every session, the main one too");
        assert_eq!(r.mode, SandboxMode::All);
        assert_eq!(r.scope, Scope::Session);
        assert_eq!(r.sandbox_key, format!("agent:scraper:session:{session}"));
        assert_eq!(r.workspace_access, WorkspaceAccess::Rw);
        assert_eq!(
            mounts(&r),
            ["/var/lib/nanoclaw/workspaces/scraper:/workspace:rw"]
        );
        assert_eq!(
            r.network.mode,
            NetworkMode::Open,
            "bridge with no allowed hosts = open"
        );
        assert_eq!(
            r.setup_command.as_deref(),
            Some("pip install requests beautifulsoup4")
        );
        for t in ["http-request", "read", "write"] {
            assert!(r.tools.is_allowed(t), "{t}");
        }
        for t in ["exec", "edit", "browser", "message"] {
            assert!(!r.tools.is_allowed(t), "{t}");
        }
        assert_eq!(r.sources["mode"].source, Source::Agent("scraper".into()));
        assert_eq!(r.sources["mode"].key, "agents.scraper.sandbox.mode");
        assert!(!r.elevated.allowed);
    }
}

const CODE_ANALYZER: &str = r#"{
  "agents": {
    "analyzer": {
      "sandbox": {
        "mode": "all",
        "scope": "agent",
        "workspaceAccess": "ro",  // 只读，安全分析
        "bindMounts": [
          "/projects:/projects:ro"
        ]
      },
      "tools": {
        "allow": ["read", "exec"],
        "deny": ["write", "http-request"]
      }
    }
  }
}"#;

#[test]
fn seed003_code_analyzer() {
    let c = load_ok(CODE_ANALYZER).config;
    let r = res(&c, Some("analyzer"), "main");
    assert!(r.sandboxed);
    assert_eq!(r.scope, Scope::Agent);
    assert_eq!(r.sandbox_key, "agent:analyzer");
    assert_eq!(
        res(&c, Some("analyzer"), "other").sandbox_key,
        "agent:analyzer",
        "one sandbox per agent"
    );
    assert_eq!(
        mounts(&r),
        [
            "/var/lib/nanoclaw/workspaces/analyzer:/workspace:ro",
            "/projects:/projects:ro"
        ]
    );
    assert!(r.tools.is_allowed("read"));
    assert!(r.tools.is_allowed("exec"));
    assert!(matches!(
        r.tools.decide("write"),
        ToolDecision::Denied { .. }
    ));
    assert!(matches!(
        r.tools.decide("http-request"),
        ToolDecision::Denied { .. }
    ));
    assert!(!r.tools.is_allowed("edit"), "ro workspace disables editing");
    assert!(!r.tools.is_allowed("browser"), "not in the allow list");
    assert_eq!(r.network.mode, NetworkMode::None);
    let spec = r.to_spec(vec!["cat".into(), "/projects/x".into()]).unwrap();
    assert_eq!(spec.mounts.len(), 2);
    assert_eq!(spec.mounts[1].target, PathBuf::from("/projects"));
    assert_eq!(spec.mounts[1].access, Access::Ro);
}

const TRUSTED_ADMIN: &str = r#"{
  "agents": {
    "admin": {
      "sandbox": {
        "mode": "off"  // 无沙箱，完全信任
      },
      "tools": {
        "allow": ["group:*"]
      }
    }
  },
  "tools": {
    "elevated": {
      "enabled": true
    }
  }
}"#;

#[test]
fn seed003_trusted_admin() {
    let l = load_ok(TRUSTED_ADMIN);
    assert!(l
        .warnings()
        .any(|w| w.message.contains("runs this agent's tools on the host")));
    let c = l.config;
    for session in ["main", "other"] {
        let r = res(&c, Some("admin"), session);
        assert!(!r.sandboxed, "mode off: never sandboxed");
        assert_eq!(r.mode, SandboxMode::Off);
        for t in ["exec", "write", "browser", "http-request", "nodes"] {
            assert!(r.tools.is_allowed(t), "group:* allows {t}");
        }
        assert!(!r.elevated.allowed);
        assert_eq!(r.elevated.failing_gate, Some(ElevatedGate::NotSandboxed));
        assert!(matches!(
            r.to_spec(vec!["true".into()]),
            Err(SpecError::NotSandboxed(_))
        ));
        assert!(r.warnings[0].contains("ON THE HOST"));
    }
}

// ------------------------------------------------ explain never lies

#[test]
fn explain_never_reports_sandboxed_when_not() {
    let cases = [
        (TRUSTED_ADMIN, Some("admin"), "main"),
        (TRUSTED_ADMIN, Some("admin"), "other"),
        (
            r#"{"agents": {"defaults": {"sandbox": {"mode": "non-main"}}}}"#,
            None,
            "main",
        ),
        (
            r#"{"agents": {"defaults": {"sandbox": {"mode": "off"}}}}"#,
            None,
            "x",
        ),
    ];
    for (text, agent, session) in cases {
        let c = load_ok(text).config;
        let r = res(&c, agent, session);
        assert!(!r.sandboxed);
        let t = explain_text(&r, None);
        assert!(t.contains("SANDBOXED: NO"), "{t}");
        assert!(!t.contains("SANDBOXED: yes"), "{t}");
        assert!(t.contains("ON THE HOST"), "{t}");
        assert!(!t.contains("limits:"), "limits must not look applied: {t}");
        let j = explain_json(&r, None);
        assert_eq!(j["sandboxed"], false);
        assert_eq!(j["runs_on"], "host");
        assert!(j["sandbox"].is_null());
        assert!(!fix_its(&r).is_empty(), "a fix-it says how to sandbox it");
    }
    // And the sandboxed ones say so.
    let c = load_ok(r#"{"agents": {"defaults": {"sandbox": {"mode": "non-main"}}}}"#).config;
    let r = res(&c, None, "worker");
    let t = explain_text(&r, None);
    assert!(t.contains("SANDBOXED: yes"), "{t}");
    assert_eq!(explain_json(&r, None)["runs_on"], "sandbox");
}

#[test]
fn explain_shows_sources_and_fix_its() {
    let c = load_ok(CODE_ANALYZER).config;
    let r = res(&c, Some("analyzer"), "s");
    let t = explain_text(&r, Some(std::path::Path::new("/etc/nanoclaw.yaml")));
    assert!(
        t.contains(
            "mode:             all            [agent:analyzer agents.analyzer.sandbox.mode]"
        ),
        "{t}"
    );
    assert!(
        t.contains("memory        512m       [default builtin]"),
        "{t}"
    );
    assert!(
        t.contains(
            "write: denied by \"write\" in the deny list of agents.analyzer.tools (agent:analyzer)"
        ),
        "{t}"
    );
    assert!(
        t.contains("failing gate: global gate: tools.elevated.enabled is not true"),
        "{t}"
    );
    let fixes = fix_its(&r);
    assert!(
        fixes.iter().any(|f| f.key == "tools.elevated.enabled"),
        "{fixes:?}"
    );
    assert!(
        fixes
            .iter()
            .any(|f| f.key == "agents.analyzer.tools.elevated.enabled"),
        "{fixes:?}"
    );
}
