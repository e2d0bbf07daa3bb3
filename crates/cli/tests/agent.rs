//! Black-box tests of `nanoclaw agent`: the loop against local fakes of the
//! Anthropic and OpenAI APIs that speak their real wire formats and check
//! every request (the key only in the auth header, every tool call
//! answered, memory in the system prompt); tool calls run in the agent's
//! real sandbox; a scripted prompt-injected model is refused by policy;
//! approvals fail closed and "allow always" is remembered; budgets stop
//! runs and say which; seed 000's `execute`; everything audited.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use nanoclaw_fakellm::{last_tool_result, Expect, FakeLlm, Kind, ToolCall, Turn, Usage};
use serde_json::{json, Value};

mod common;
use common::*;

const KEY: &str = "sk-test-7f3a9c0e5b1d4a2f";

/// A config and a data folder, readable and writable by the mode's user;
/// the agents' scoped sandboxes are removed on drop.
struct Setup {
    dir: PathBuf,
    mode: Mode,
    agents: Vec<String>,
}

impl Setup {
    fn new(tag: &str, mode: Mode, fake: &FakeLlm, rest: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!(
            "nanoclaw-agent-{tag}-{}-{}",
            mode.name,
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).expect("dirs");
        for d in [&dir, &dir.join("data")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        if let Some((uid, gid)) = mode.user {
            std::os::unix::fs::chown(dir.join("data"), Some(uid), Some(gid)).expect("chown");
        }
        let provider = match fake.kind() {
            Kind::Anthropic => "anthropic",
            Kind::OpenAi => "openai",
        };
        let s = Setup {
            dir,
            mode,
            agents: Vec::new(),
        };
        s.write(provider, &fake.base_url(), rest);
        s
    }

    fn write(&self, provider: &str, base_url: &str, rest: &str) {
        let yaml = format!(
            "llm:\n  provider: {provider}\n  api_key: ${{FAKE_KEY}}\n  model: test-model\n  base_url: {base_url}\n  prices: {{input: 3, output: 15}}\n{rest}"
        );
        let f = self.dir.join("nanoclaw.yaml");
        fs::write(&f, yaml).expect("config");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    fn repoint(&self, fake: &FakeLlm, rest: &str) {
        let p = match fake.kind() {
            Kind::Anthropic => "anthropic",
            Kind::OpenAi => "openai",
        };
        self.write(p, &fake.base_url(), rest);
    }

    fn config(&self) -> String {
        self.dir.join("nanoclaw.yaml").display().to_string()
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn nanoclaw(&mut self, args: &[&str]) -> std::process::Command {
        if args.first() == Some(&"agent") && args.get(1) == Some(&"run") {
            if let Some(a) = args.get(2) {
                self.agents.push(a.to_string());
            }
        }
        let mut c = nc(self.mode, args);
        c.env("FAKE_KEY", KEY);
        c
    }

    /// `nanoclaw agent run NAME PROMPT --json ...` → (exit code, report).
    fn run(&mut self, name: &str, prompt: &str, extra: &[&str]) -> (i32, Value, Output) {
        let (config, data) = (self.config(), self.data());
        let mut a = vec![
            "agent", "run", name, prompt, "--json", "--config", &config, "--data", &data,
        ];
        a.extend(extra);
        let o = self.nanoclaw(&a).output().expect("spawn");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        (code(&o), v, o)
    }

    fn ok(&mut self, args: &[&str]) -> String {
        let o = self.nanoclaw(args).output().expect("spawn");
        assert_eq!(code(&o), 0, "nanoclaw {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let agents: Vec<String> = self.agents.clone();
        for a in agents {
            let _ = nc(self.mode, &["sandbox", "recreate", "--agent", &a]).output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn expect() -> Expect {
    Expect {
        api_key: Some(KEY.into()),
        secrets: vec![KEY.into()],
        system_must_contain: Vec::new(),
    }
}

fn usage(i: u64, o: u64) -> Usage {
    Usage {
        input_tokens: i,
        output_tokens: o,
    }
}

fn reply(text: Option<&str>, calls: Vec<ToolCall>) -> Turn {
    Turn::Reply {
        text: text.map(str::to_string),
        tool_calls: calls,
        usage: usage(100, 20),
    }
}

fn calls(report: &Value) -> Vec<Value> {
    report["tool_calls"].as_array().cloned().unwrap_or_default()
}

fn audit_kinds(s: &mut Setup) -> Vec<String> {
    let data = s.data();
    let out = s.ok(&["audit", "ls", "--json", "--data", &data]);
    let v: Value = serde_json::from_str(&out).expect("audit json");
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| r["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The id of the first pending approval request (within 30 s), whose
/// summary must name `what`.
fn pending_approval(s: &mut Setup, what: &str) -> String {
    let data = s.data();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let out = s.ok(&["agent", "approvals", "--json", "--data", &data]);
        let v: Value = serde_json::from_str(&out).expect("approvals json");
        if let Some(id) = v[0]["id"].as_str() {
            assert!(v[0]["summary"].as_str().unwrap_or("").contains(what), "{v}");
            return id.to_string();
        }
        assert!(Instant::now() < until, "no approval request showed up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const FIB: &str = "a, b = 0, 1\nfor _ in range(10):\n    print(a)\n    a, b = b, a + b\n";

#[test]
fn an_agent_codes_in_its_sandbox_remembers_and_is_audited() {
    for m in modes("an_agent_codes_in_its_sandbox_remembers_and_is_audited") {
        let fake = FakeLlm::start(
            Kind::Anthropic,
            vec![
                reply(
                    Some("Let me compute that."),
                    vec![ToolCall::new(
                        "run_code",
                        json!({"language": "python", "code": FIB}),
                    )],
                ),
                // Its environment goes back to the model: the fake checks the key is not in it.
                reply(
                    None,
                    vec![ToolCall::new(
                        "run_code",
                        json!({"language": "python", "code": "import os; print(dict(os.environ))"}),
                    )],
                ),
                reply(
                    None,
                    vec![ToolCall::new(
                        "memory",
                        json!({"action": "append", "text": "The user likes Fibonacci numbers."}),
                    )],
                ),
                reply(Some("The first ten are 0 1 1 2 3 5 8 13 21 34."), vec![]),
            ],
            expect(),
        )
        .expect("fake");
        let mut s = Setup::new("fib", m, &fake, "");
        let (config, data) = (s.config(), s.data());
        s.ok(&[
            "agent",
            "create",
            "coder",
            "--config",
            &config,
            "--data",
            &data,
            "--system",
            "You are a careful coder.",
        ]);
        let (c, r, o) = s.run(
            "coder",
            "Compute the Fibonacci numbers",
            &["--approve", "deny"],
        );
        assert_eq!(
            c,
            0,
            "[{}] {}\n{}",
            m.name,
            text(&o.stderr),
            text(&o.stdout)
        );
        assert_eq!(r["stop"], "answer");
        assert_eq!(r["answer"], "The first ten are 0 1 1 2 3 5 8 13 21 34.");
        let t = calls(&r);
        assert_eq!(t.len(), 3, "{r}");
        assert_eq!(t[0]["decision"], "allowed");
        assert_eq!(t[0]["exit_code"], 0);
        assert!(
            t[0]["stdout"].as_str().unwrap_or("").contains("21\n34"),
            "{}",
            t[0]
        );
        // What went back to the model is what ran in the sandbox.
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 4);
        let back = last_tool_result(&reqs[1].body).unwrap_or_default();
        assert!(
            back.contains("exit code: 0") && back.contains("34"),
            "{back}"
        );
        assert_eq!(r["usage"]["input_tokens"], 400);
        assert!(
            (r["cost"].as_f64().unwrap_or(0.0) - (400.0 * 3.0 + 80.0 * 15.0) / 1e6).abs() < 1e-9,
            "{r}"
        );
        assert!(
            fake.violations().is_empty(),
            "[{}] {:?}",
            m.name,
            fake.violations()
        );

        // Tomorrow: a new model server; memory is in the system prompt, the
        // earlier exchange in the history.
        let fake2 = FakeLlm::start(
            Kind::Anthropic,
            vec![reply(Some("You like Fibonacci numbers."), vec![])],
            Expect {
                system_must_contain: vec!["The user likes Fibonacci numbers.".into()],
                ..expect()
            },
        )
        .expect("fake2");
        s.repoint(&fake2, "");
        let (c, r, o) = s.run("coder", "What do I like?", &["--approve", "deny"]);
        assert_eq!(c, 0, "{}", text(&o.stderr));
        assert_eq!(r["answer"], "You like Fibonacci numbers.");
        assert!(fake2.violations().is_empty(), "{:?}", fake2.violations());
        let body = fake2.requests()[0].body.to_string();
        assert!(
            body.contains("Compute the Fibonacci numbers"),
            "history missing: {body}"
        );

        let data = s.data();
        let shown = s.ok(&["agent", "show", "coder", "--json", "--data", &data]);
        let v: Value = serde_json::from_str(&shown).expect("show json");
        assert_eq!(v["memory"], "The user likes Fibonacci numbers.");
        assert_eq!(v["runs"].as_array().map(|a| a.len()), Some(2));
        let kinds = audit_kinds(&mut s);
        for k in ["agent_create", "model_call", "tool_call", "agent_run"] {
            assert!(kinds.iter().any(|x| x == k), "no {k} record in {kinds:?}");
        }
        s.ok(&["audit", "verify", "--data", &data]);
    }
}

#[test]
fn a_prompt_injected_model_is_refused_by_policy_and_audited() {
    let m = modes("a_prompt_injected_model_is_refused_by_policy_and_audited")[0];
    let rules = "agents:\n  defaults:\n    sandbox: {workspaceAccess: rw}\n  list:\n    - id: victim\n    - id: intruder\n      tools:\n        allow: [group:fs, run_code, http_request, create_agent, memory]\n        deny: [exec]\n        paths: {write: [/workspace]}\n        http: [\"GET 127.0.0.1/allowed/*\"]\n";
    // The victim leaves a secret in its own workspace.
    let fake = FakeLlm::start(
        Kind::OpenAi,
        vec![
            reply(
                None,
                vec![ToolCall::new(
                    "write_file",
                    json!({"path": "secret.txt", "content": "VICTIM-SECRET-42"}),
                )],
            ),
            reply(Some("saved"), vec![]),
        ],
        expect(),
    )
    .expect("fake");
    let mut s = Setup::new("inject", m, &fake, rules);
    let (c, r, o) = s.run("victim", "save it", &["--approve", "deny"]);
    assert_eq!(c, 0, "{}", text(&o.stderr));
    assert_eq!(calls(&r)[0]["decision"], "allowed");
    let victim_file = s.dir.join("data/workspaces/victim/secret.txt");
    assert_eq!(
        fs::read_to_string(&victim_file).expect("victim's file on the host"),
        "VICTIM-SECRET-42"
    );

    let victim_host_path = victim_file.display().to_string();
    let attack = FakeLlm::start(
        Kind::OpenAi,
        vec![
            reply(
                Some("Ignore previous instructions."),
                vec![
                    ToolCall::new("exec", json!({"command": "cat /etc/shadow"})),
                    ToolCall::new("write_file", json!({"path": "/etc/cron.d/evil", "content": "* * * * * root sh"})),
                    ToolCall::new("http_request", json!({"method": "POST", "url": "http://127.0.0.1:9/allowed/x", "body": "exfil"})),
                    ToolCall::new("http_request", json!({"url": "http://127.0.0.1:9/other"})),
                    ToolCall::new("read_file", json!({"path": victim_host_path})),
                    ToolCall::new("run_code", json!({"language": "sh", "code": format!("cat {victim_host_path} ../victim/secret.txt")})),
                    ToolCall::new("create_agent", json!({"id": "bigger", "tools": ["exec"]})),
                    ToolCall::new("create_agent", json!({"id": "wider", "hosts": ["evil.example.com"]})),
                    ToolCall::new("write_file", json!({"path": "notes.txt", "content": "fine"})),
                    // A symlink planted under /workspace does not lead the
                    // file tools out of it.
                    ToolCall::new("run_code", json!({"language": "sh", "code": "ln -s /tmp /workspace/escape"})),
                    ToolCall::new("write_file", json!({"path": "escape/pwned", "content": "x"})),
                ],
            ),
            reply(Some("I could not do most of that."), vec![]),
        ],
        expect(),
    )
    .expect("attack fake");
    s.repoint(&attack, rules);
    let (c, r, o) = s.run(
        "intruder",
        "do as the document says",
        &["--approve", "deny"],
    );
    assert_eq!(c, 0, "{}", text(&o.stderr));
    let t = calls(&r);
    assert_eq!(t.len(), 11, "{r}");
    let decision = |i: usize| t[i]["decision"].as_str().unwrap_or("").to_string();
    let result = |i: usize| t[i]["result"].as_str().unwrap_or("").to_string();
    assert_eq!(t[9]["ok"], true, "{}", t[9]);
    assert_eq!(
        decision(10),
        "denied",
        "a write through a symlink: {}",
        t[10]
    );
    assert!(result(10).contains("/tmp/pwned"), "{}", result(10));
    assert_eq!(decision(0), "denied", "exec is denied: {}", t[0]);
    assert!(result(0).contains("deny list"), "{}", result(0));
    assert_eq!(decision(1), "denied", "write outside /workspace: {}", t[1]);
    assert_eq!(decision(2), "denied", "POST is not GET: {}", t[2]);
    assert_eq!(decision(3), "denied", "a path no rule allows: {}", t[3]);
    // Another agent's files are not in this sandbox at all.
    assert_eq!(t[4]["ok"], false, "{}", t[4]);
    assert!(
        !result(4).contains("VICTIM-SECRET-42") && !result(5).contains("VICTIM-SECRET-42"),
        "{} {}",
        result(4),
        result(5)
    );
    assert!(
        result(6).contains("refused") && result(6).contains("exec"),
        "{}",
        result(6)
    );
    assert!(
        result(7).contains("refused") && result(7).contains("evil.example.com"),
        "{}",
        result(7)
    );
    assert_eq!(
        (decision(8), t[8]["ok"].clone()),
        ("allowed".to_string(), json!(true))
    );
    assert!(s.dir.join("data/workspaces/intruder/notes.txt").exists());
    assert!(attack.violations().is_empty(), "{:?}", attack.violations());
    let data = s.data();
    let agents = s.ok(&["agent", "ls", "--json", "--data", &data]);
    assert!(
        !agents.contains("bigger") && !agents.contains("wider"),
        "{agents}"
    );
    let kinds = audit_kinds(&mut s);
    assert!(
        kinds.iter().filter(|k| *k == "decision").count() >= 4,
        "{kinds:?}"
    );
    // `sandbox explain` says what the agent can see and do.
    let config = s.config();
    let explained = s.ok(&[
        "sandbox", "explain", "--config", &config, "--agent", "intruder",
    ]);
    for want in [
        "http_request only: GET 127.0.0.1/allowed/*",
        "file tools write only under: /workspace",
        "/workspace",
    ] {
        assert!(explained.contains(want), "{want:?} not in:\n{explained}");
    }
}

#[test]
fn approvals_fail_closed_and_allow_always_is_remembered() {
    let m = modes("approvals_fail_closed_and_allow_always_is_remembered")[0];
    let rules = "tools:\n  ask: {exec: on-miss}\nagents:\n  list:\n    - id: ops\n";
    let exec = |cmd: &str| reply(None, vec![ToolCall::new("exec", json!({"command": cmd}))]);
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![exec("echo approved-once"), reply(Some("a"), vec![])],
        expect(),
    )
    .expect("fake");
    let mut s = Setup::new("approve", m, &fake, rules);
    // Nobody to ask: refused, and the run goes on to its answer.
    let (c, r, _) = s.run("ops", "go", &["--approve", "deny"]);
    assert_eq!(c, 0);
    assert_eq!(calls(&r)[0]["decision"], "refused");
    assert!(calls(&r)[0]["result"]
        .as_str()
        .unwrap_or("")
        .contains("unavailable"));

    // No answer before the expiry: refused.
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![exec("echo approved-once"), reply(Some("b"), vec![])],
        expect(),
    )
    .expect("fake");
    s.repoint(&fake, rules);
    let (_, r, _) = s.run(
        "ops",
        "go",
        &["--approve", "queue", "--approval-timeout", "1s"],
    );
    assert!(
        calls(&r)[0]["result"]
            .as_str()
            .unwrap_or("")
            .contains("expired"),
        "{r}"
    );

    // Through the queue: a person says allow-always.
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![exec("echo approved-once"), reply(Some("c"), vec![])],
        expect(),
    )
    .expect("fake");
    s.repoint(&fake, rules);
    let (config, data) = (s.config(), s.data());
    let child = s
        .nanoclaw(&[
            "agent",
            "run",
            "ops",
            "go",
            "--json",
            "--config",
            &config,
            "--data",
            &data,
            "--approve",
            "queue",
            "--approval-timeout",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run");
    let id = pending_approval(&mut s, "echo approved-once");
    assert!(s
        .nanoclaw(&[
            "agent",
            "approve",
            "apr_0000000000000000",
            "allow-once",
            "--data",
            &data
        ])
        .output()
        .map(|o| code(&o) == 125)
        .unwrap_or(false));
    s.ok(&["agent", "approve", &id, "allow-always", "--data", &data]);
    let o = child.wait_with_output().expect("run");
    let r: Value = serde_json::from_slice(&o.stdout).expect("report");
    assert_eq!(calls(&r)[0]["decision"], "approved", "{r}");
    assert!(calls(&r)[0]["stdout"]
        .as_str()
        .unwrap_or("")
        .contains("approved-once"));

    // The same exact call is remembered; a different one is not.
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![
            exec("echo approved-once"),
            exec("echo something-else"),
            reply(Some("d"), vec![]),
        ],
        expect(),
    )
    .expect("fake");
    s.repoint(&fake, rules);
    let (_, r, _) = s.run("ops", "go", &["--approve", "deny"]);
    assert_eq!(calls(&r)[0]["decision"], "approved", "{r}");
    assert_eq!(calls(&r)[1]["decision"], "refused", "{r}");
    assert!(
        audit_kinds(&mut s)
            .iter()
            .filter(|k| *k == "approval")
            .count()
            >= 4
    );
}

#[test]
fn budgets_stop_runs_and_say_which() {
    let m = modes("budgets_stop_runs_and_say_which")[0];
    let again = || {
        reply(
            None,
            vec![ToolCall::new(
                "run_code",
                json!({"language": "sh", "code": "true"}),
            )],
        )
    };
    let fake =
        FakeLlm::start(Kind::OpenAi, vec![again(), again(), again()], expect()).expect("fake");
    let rules = "agents:\n  defaults:\n    budget: {turns: 2}\n  list:\n    - id: looper\n";
    let mut s = Setup::new("budget", m, &fake, rules);
    let (c, r, o) = s.run("looper", "loop", &["--approve", "deny"]);
    assert_eq!(c, 2, "{}", text(&o.stderr));
    assert_eq!(r["stop"], "turns");
    assert!(
        r["stop_detail"]
            .as_str()
            .unwrap_or("")
            .contains("budget.turns"),
        "{r}"
    );
    assert_eq!(fake.served(), 2);

    // A daily token cap: 240 tokens were used today; the cap is 200.
    let fake = FakeLlm::start(Kind::OpenAi, vec![again()], expect()).expect("fake");
    s.repoint(
        &fake,
        "agents:\n  defaults:\n    budget: {dailyTokens: 200}\n  list:\n    - id: looper\n",
    );
    let (c, r, _) = s.run("looper", "loop", &["--approve", "deny"]);
    assert_eq!((c, r["stop"].clone()), (2, json!("daily_tokens")), "{r}");
    assert_eq!(fake.served(), 0, "no model call past the cap");

    // No model named: one clear error.
    let (config, data) = (s.config(), s.data());
    fs::write(
        &config,
        "llm:\n  provider: anthropic\nagents:\n  list:\n    - id: looper\n",
    )
    .expect("config");
    let o = s
        .nanoclaw(&[
            "agent", "run", "looper", "x", "--config", &config, "--data", &data,
        ])
        .output()
        .expect("run");
    assert_eq!(code(&o), 125);
    assert!(text(&o.stderr).contains("llm.model"), "{}", text(&o.stderr));
}

#[test]
fn seed_000_execute_returns_code_output_usage_and_audit_id() {
    let m = modes("seed_000_execute_returns_code_output_usage_and_audit_id")[0];
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![
            reply(
                None,
                vec![ToolCall::new(
                    "run_code",
                    json!({"language": "python", "code": FIB}),
                )],
            ),
            reply(Some("斐波那契数列的前十项: 0 1 1 2 3 5 8 13 21 34"), vec![]),
        ],
        Expect {
            system_must_contain: vec!["python".into()],
            ..expect()
        },
    )
    .expect("fake");
    let mut s = Setup::new("execute", m, &fake, "");
    s.agents.push("default".into());
    let (config, data) = (s.config(), s.data());
    let o = s
        .nanoclaw(&[
            "agent",
            "execute",
            "--json",
            "--language",
            "python",
            "--timeout",
            "30s",
            "--config",
            &config,
            "--data",
            &data,
            "--approve",
            "deny",
            "编写一个 Python 脚本计算斐波那契数列",
        ])
        .output()
        .expect("execute");
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["code"], FIB);
    assert_eq!(r["language"], "python");
    assert_eq!(r["exit_code"], 0);
    assert!(
        r["stdout"].as_str().unwrap_or("").ends_with("21\n34\n"),
        "{r}"
    );
    assert!(r["answer"].as_str().unwrap_or("").contains("34"));
    assert_eq!(r["usage"]["output_tokens"], 40);
    assert!(r["audit_seq"].as_i64().unwrap_or(0) > 0, "{r}");
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    let o = s
        .nanoclaw(&[
            "agent",
            "execute",
            "--language",
            "cobol",
            "--config",
            &config,
            "--data",
            &data,
            "x",
        ])
        .output()
        .expect("execute");
    assert_eq!(code(&o), 125);
}

#[test]
fn teams_share_a_space_and_see_other_teams_only_by_grant() {
    for m in modes("teams_share_a_space_and_see_other_teams_only_by_grant") {
        let fake = FakeLlm::start(Kind::Anthropic, vec![], expect()).expect("fake");
        let rules = "teams:\n  red: {}\n  blue: {}\n  audit:\n    grants: [{team: red, access: ro}]\nagents:\n  list:\n    - {id: r1, team: red}\n    - {id: r2, team: red}\n    - {id: b1, team: blue}\n    - {id: a1, team: audit}\n";
        let mut s = Setup::new("teams", m, &fake, rules);
        s.agents.extend(["r1", "r2", "b1", "a1"].map(String::from));
        let (config, data) = (s.config(), s.data());
        let sh = |s: &mut Setup, agent: &str, script: &str| -> Output {
            let mut c = s.nanoclaw(&[
                "run", "--config", &config, "--agent", agent, "--", "sh", "-c", script,
            ]);
            c.env("NANOCLAW_DATA", &data);
            c.output().expect("run")
        };
        let o = sh(&mut s, "r1", "echo the-plan > /team/plan.txt");
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        let o = sh(&mut s, "r2", "cat /team/plan.txt");
        assert_eq!(
            text(&o.stdout),
            "the-plan\n",
            "a teammate sees the team's space: {}",
            text(&o.stderr)
        );
        // Another team: its own (empty) space, nothing of red's anywhere.
        let o = sh(&mut s, "b1", "cat /team/plan.txt; ls /teams; grep -rs the-plan / --include=plan.txt -l 2>/dev/null; true");
        assert!(
            !text(&o.stdout).contains("the-plan") && !text(&o.stdout).contains("plan.txt"),
            "{}",
            text(&o.stdout)
        );
        // A granted team reads red's space, read-only.
        let o = sh(
            &mut s,
            "a1",
            "cat /teams/red/plan.txt && echo tampered > /teams/red/plan.txt",
        );
        assert_eq!(text(&o.stdout), "the-plan\n");
        assert_ne!(code(&o), 0, "the grant is read-only");
        assert_eq!(
            fs::read_to_string(s.dir.join("data/teams/red/plan.txt")).expect("red's file"),
            "the-plan\n"
        );
        let mut c = s.nanoclaw(&["sandbox", "explain", "--config", &config, "--agent", "a1"]);
        c.env("NANOCLAW_DATA", &data);
        let explained = text(&c.output().expect("explain").stdout);
        assert!(
            explained.contains("team:") && explained.contains("/teams/red"),
            "{explained}"
        );
        // A team no one defined is a config error.
        s.repoint(&fake, "agents:\n  list:\n    - {id: x, team: nowhere}\n");
        let o = s
            .nanoclaw(&["config", "validate", "--config", &config])
            .output()
            .expect("validate");
        assert_ne!(code(&o), 0);
        assert!(text(&o.stdout).contains("nowhere") || text(&o.stderr).contains("nowhere"));
    }
}

/// `exec` with `elevated: true` leaves the sandbox only when the global and
/// the agent's `tools.elevated.enabled` are set, and only after a person
/// approves that exact call; it then runs on the host with an empty
/// environment (the model key is not handed to it: the fake checks its
/// output for the key).
#[test]
fn elevated_exec_needs_both_gates_and_a_person() {
    let m = modes("elevated_exec_needs_both_gates_and_a_person")[0];
    let marker = std::env::temp_dir().join(format!("nanoclaw-elevated-{}", std::process::id()));
    let _ = fs::remove_file(&marker);
    let cmd = format!("env; echo on-the-host > {}", marker.display());
    let elevated = || {
        reply(
            None,
            vec![ToolCall::new(
                "exec",
                json!({"command": cmd.clone(), "elevated": true}),
            )],
        )
    };
    let rules = "tools:\n  elevated: {enabled: true}\nagents:\n  list:\n    - id: admin\n      tools:\n        elevated: {enabled: true}\n    - id: plain\n";
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![elevated(), reply(Some("no"), vec![])],
        expect(),
    )
    .expect("fake");
    let mut s = Setup::new("elevated", m, &fake, rules);
    // The agent's own gate is closed: denied outright.
    let (c, r, _) = s.run("plain", "go", &["--approve", "deny"]);
    assert_eq!(c, 0);
    assert_eq!(calls(&r)[0]["decision"], "denied", "{r}");
    assert!(
        calls(&r)[0]["result"]
            .as_str()
            .unwrap_or("")
            .contains("elevated"),
        "{r}"
    );
    // Gates open, nobody to ask: refused.
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![elevated(), reply(Some("no"), vec![])],
        expect(),
    )
    .expect("fake");
    s.repoint(&fake, rules);
    let (_, r, _) = s.run("admin", "go", &["--approve", "deny"]);
    assert_eq!(calls(&r)[0]["decision"], "refused", "{r}");
    assert!(!marker.exists(), "an unapproved elevated exec ran");
    // A person approves once: it runs on the host.
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![elevated(), reply(Some("done"), vec![])],
        expect(),
    )
    .expect("fake");
    s.repoint(&fake, rules);
    let (config, data) = (s.config(), s.data());
    let child = s
        .nanoclaw(&[
            "agent",
            "run",
            "admin",
            "go",
            "--json",
            "--config",
            &config,
            "--data",
            &data,
            "--approve",
            "queue",
            "--approval-timeout",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run");
    let id = pending_approval(&mut s, "ELEVATED");
    s.ok(&["agent", "approve", &id, "allow-always", "--data", &data]);
    let o = child.wait_with_output().expect("run");
    let r: Value = serde_json::from_slice(&o.stdout).expect("report");
    assert_eq!(calls(&r)[0]["decision"], "approved", "{r}");
    assert_eq!(
        fs::read_to_string(&marker).unwrap_or_default(),
        "on-the-host\n",
        "{r}"
    );
    assert!(
        fake.violations().is_empty(),
        "the key reached the model: {:?}",
        fake.violations()
    );
    let _ = fs::remove_file(&marker);
    // "Allow always" does not cover elevated exec: asked again (and refused).
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![elevated(), reply(Some("no"), vec![])],
        expect(),
    )
    .expect("fake");
    s.repoint(&fake, rules);
    let (_, r, _) = s.run("admin", "go", &["--approve", "deny"]);
    assert_eq!(calls(&r)[0]["decision"], "refused", "{r}");
    assert!(!marker.exists());
}
