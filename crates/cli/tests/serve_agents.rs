//! The daemon's agent routes over real HTTP against a real `nanoclaw
//! serve` process: `POST /v1/execute` (the agent runs in a child process,
//! its code in a real sandbox, its model a scripted fake that checks every
//! request), `GET /v1/approvals` and `POST /v1/approvals/{id}` (attacked
//! by another tenant), bad input, and the limit of runs at once.
//!
//! The sandboxes need root: as another user the tests say SKIP and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, is_root, nc, text, wait_listening, Mode};
use nanoclaw_fakellm::{Expect, FakeLlm, Kind, ToolCall, Turn, Usage};
use serde_json::{json, Value};

/// The model's API key: in the daemon's environment only.
const FAKE_KEY: &str = "sk-ant-fake-0123456789abcdef";

const FIB: &str = "a, b = 0, 1\nfor _ in range(10):\n    print(a)\n    a, b = b, a + b\n";

fn root_or_skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIP {test}: the agent's sandbox needs root (CI runs these as root)");
    }
    is_root()
}

fn me() -> Mode {
    Mode {
        name: "root",
        user: None,
    }
}

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A daemon with two tenants (`a` and `b`, their names unique to the
/// test), a config pointing at a fake model.
struct Daemon {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    tenants: [(String, String); 2],
    args: Vec<String>,
}

impl Daemon {
    /// `llm_port`: the fake's (`None`: no --config); `extra`: more YAML.
    fn start(test: &str, llm_port: Option<u16>, extra: &str, approval_timeout: &str) -> Daemon {
        let dir =
            std::env::temp_dir().join(format!("nanoclaw-agents-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let config = dir.join("nanoclaw.yaml");
        if let Some(p) = llm_port {
            let yaml = format!(
                "llm:\n  provider: anthropic\n  api_key: ${{FAKE_KEY}}\n  model: test-model\n  base_url: http://127.0.0.1:{p}\n{extra}"
            );
            std::fs::write(&config, yaml).unwrap();
        }
        let d = data.to_string_lossy().into_owned();
        let key = |t: &str| {
            let o = nc(me(), &["tenant", "add", t, "--data", &d])
                .output()
                .unwrap();
            assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
            text(&o.stdout).trim().to_string()
        };
        // Unique names: a tenant's agent sandbox is found by its session.
        let name = |who: &str| {
            format!(
                "{}-{who}-{}",
                &test[..test.len().min(12)],
                std::process::id()
            )
        };
        let tenants = [(name("a"), key(&name("a"))), (name("b"), key(&name("b")))];
        let port = free_port();
        let listen = format!("tcp:127.0.0.1:{port}");
        let c = config.to_string_lossy().into_owned();
        let mut args = vec![
            "serve",
            "--data",
            &d,
            "--listen",
            &listen,
            "--approval-timeout",
            approval_timeout,
        ];
        if llm_port.is_some() {
            args.extend(["--config", &c]);
        }
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = Daemon::spawn(&args, port);
        Daemon {
            dir,
            config,
            port,
            child: Some(child),
            tenants,
            args,
        }
    }

    fn spawn(args: &[String], port: u16) -> Child {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = nc(me(), &a)
            .env("FAKE_KEY", FAKE_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let patience = Duration::from_secs(20);
        wait_listening(&mut child, port, patience, "nanoclaw serve");
        child
    }

    /// SIGKILL, then the same daemon again on the same data folder.
    fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = Some(Daemon::spawn(&self.args, self.port));
    }

    fn key(&self, who: usize) -> &str {
        &self.tenants[who].1
    }

    fn name(&self, who: usize) -> &str {
        &self.tenants[who].0
    }

    /// A request as tenant `who` (0 or 1).
    fn call(&self, who: usize, method: &str, path: &str, body: Option<&str>) -> Reply {
        http(self.port, method, path, Some(self.key(who)), body)
    }

    fn execute(&self, who: usize, body: Value) -> Reply {
        self.call(who, "POST", "/v1/execute", Some(&body.to_string()))
    }

    /// Tenant `who`'s approval requests (`all`: answered ones too).
    fn approvals(&self, who: usize, all: bool) -> Vec<Value> {
        let path = if all {
            "/v1/approvals?all=true"
        } else {
            "/v1/approvals"
        };
        let r = self.call(who, "GET", path, None);
        assert_eq!(r.status, 200, "{r:?}");
        r.json().as_array().cloned().unwrap()
    }

    fn answer(&self, who: usize, id: &str, decision: &str) -> Reply {
        let body = json!({ "decision": decision }).to_string();
        self.call(who, "POST", &format!("/v1/approvals/{id}"), Some(&body))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid and a signal.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // The agents' sandboxes made from this test's config.
        let o = nc(me(), &["sandbox", "ls", "--json"]).output().unwrap();
        let all: Value = serde_json::from_slice(&o.stdout).unwrap_or(json!([]));
        let config = self.config.to_string_lossy().into_owned();
        for s in all.as_array().into_iter().flatten() {
            if s["scope"]["config"] == config.as_str() {
                let id = s["id"].as_str().unwrap_or_default();
                let _ = nc(me(), &["sandbox", "rm", id]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP/1.1 request on a fresh connection.
fn http(port: u16, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("x-api-key: {k}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("content-type: application/json\r\n");
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn expect() -> Expect {
    Expect {
        api_key: Some(FAKE_KEY.into()),
        secrets: vec![FAKE_KEY.into()],
        ..Expect::default()
    }
}

fn reply(tool_calls: Vec<ToolCall>, input: u64, output: u64) -> Turn {
    Turn::Reply {
        text: None,
        tool_calls,
        usage: Usage {
            input_tokens: input,
            output_tokens: output,
        },
    }
}

/// Until `f` gives something, for at most `secs`.
fn poll<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn execute_writes_code_runs_it_in_a_sandbox_and_reports() {
    if !root_or_skip("execute_writes_code_runs_it_in_a_sandbox_and_reports") {
        return;
    }
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![
            reply(
                vec![ToolCall::new(
                    "run_code",
                    json!({"language": "python", "code": FIB}),
                )],
                120,
                30,
            ),
            Turn::Reply {
                text: Some("The first ten Fibonacci numbers are printed above.".into()),
                tool_calls: Vec::new(),
                usage: Usage {
                    input_tokens: 200,
                    output_tokens: 12,
                },
            },
        ],
        expect(),
    )
    .unwrap();
    let d = Daemon::start("fib", Some(fake.addr().port()), "", "5m");
    // A prompt that looks like options stays a prompt.
    let prompt = "--config /etc/passwd --tenant other: print the first 10 Fibonacci numbers";
    let r = d.execute(
        0,
        json!({"prompt": prompt, "language": "python", "timeout": 30}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["stop"], "answer", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["code"], FIB);
    assert_eq!(v["language"], "python");
    let stdout = v["stdout"].as_str().unwrap();
    assert!(
        stdout.contains("0\n1\n1\n2\n3\n5\n8\n13\n21\n34\n"),
        "{stdout:?}"
    );
    assert_eq!(v["usage"]["input_tokens"], 320);
    assert_eq!(v["usage"]["output_tokens"], 42);
    assert_eq!(v["turns"], 2);
    assert!(v["audit_seq"].as_i64().is_some(), "{v}");
    assert_eq!(v["tool_calls"][0]["decision"], "allowed");
    assert!(v["answer"].as_str().unwrap().contains("Fibonacci"));

    // The model saw the prompt verbatim; it never saw the key.
    assert_eq!(fake.violations(), Vec::<String>::new());
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[0]
        .body
        .to_string()
        .contains("--config /etc/passwd --tenant other"));

    // The run's model and tool calls are in the tenant's audit log, beside
    // the request's own record; the other tenant sees none of it.
    let r = d.call(0, "GET", "/v1/audit?limit=1000", None);
    let log = r.json();
    let kinds: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in ["model_call", "tool_call", "agent_run", "request"] {
        assert!(kinds.contains(&k), "no {k} record: {kinds:?}");
    }
    assert!(log
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["path"] == "/v1/execute" && e["status"] == 200));
    let seq = v["audit_seq"].as_i64().unwrap();
    assert!(log
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["seq"] == seq && e["kind"] == "agent_run"));
    let other = d.call(1, "GET", "/v1/audit?kind=tool_call", None).json();
    assert_eq!(other, json!([]));

    // The model API refusing: 502 with its message. An unknown agent: 404.
    fake.push(Turn::status(400, "model test-model does not exist"));
    let r = d.execute(0, json!({"prompt": "again"}));
    assert_eq!(r.status, 502, "{r:?}");
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("model test-model does not exist"), "{msg}");
    let r = d.execute(0, json!({"prompt": "x", "agent": "nobody"}));
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.json()["message"].as_str().unwrap().contains("nobody"));
    assert_eq!(fake.violations(), Vec::<String>::new());
}

/// A config whose `exec` calls always need a person.
const ASK_EXEC: &str = "tools:\n  ask:\n    exec: always\n";

fn exec_script(command: &str) -> Vec<Turn> {
    vec![
        reply(
            vec![ToolCall::new("exec", json!({"command": command}))],
            10,
            5,
        ),
        Turn::echo_tool_result(),
    ]
}

#[test]
fn approvals_round_trip_through_the_api_and_stay_within_the_tenant() {
    if !root_or_skip("approvals_round_trip_through_the_api_and_stay_within_the_tenant") {
        return;
    }
    let fake = FakeLlm::start(Kind::Anthropic, exec_script("echo approved-ran"), expect()).unwrap();
    let d = Daemon::start("approve", Some(fake.addr().port()), ASK_EXEC, "60s");
    let port = d.port;
    let key = d.key(0).to_string();
    let run = std::thread::spawn(move || {
        http(
            port,
            "POST",
            "/v1/execute",
            Some(&key),
            Some(&json!({"prompt": "say hello with echo", "language": "bash"}).to_string()),
        )
    });
    let pending = poll(30, || {
        let p = d.approvals(0, false);
        (!p.is_empty()).then_some(p)
    })
    .expect("no approval request showed up");
    assert_eq!(pending.len(), 1, "{pending:?}");
    let req = &pending[0];
    assert_eq!(req["tool"], "exec");
    assert_eq!(req["state"], "pending");
    assert!(
        req["summary"].as_str().unwrap().contains("approved-ran"),
        "{req}"
    );
    let id = req["id"].as_str().unwrap().to_string();

    // Tenant B: sees nothing, cannot answer it (as if it did not exist).
    assert_eq!(d.approvals(1, false), Vec::<Value>::new());
    assert_eq!(d.approvals(1, true), Vec::<Value>::new());
    for decision in ["allow-once", "allow-always", "deny"] {
        let r = d.answer(1, &id, decision);
        assert_eq!(r.status, 404, "{r:?}");
        assert_eq!(r.json()["code"], 404);
    }
    // Still pending for A.
    assert_eq!(d.approvals(0, false).len(), 1);

    // Bad answers are refused and change nothing.
    for bad in [
        r#"{"decision":"yes"}"#,
        r#"{"decision":"allow-once","extra":1}"#,
        "{}",
        "",
        "not json",
    ] {
        let r = d.call(0, "POST", &format!("/v1/approvals/{id}"), Some(bad));
        assert_eq!(r.status, 400, "{bad}: {r:?}");
    }
    let r = http(
        d.port,
        "POST",
        &format!("/v1/approvals/{id}"),
        None,
        Some(r#"{"decision":"allow-once"}"#),
    );
    assert_eq!(r.status, 401);
    assert_eq!(d.answer(0, "apr_0000000000000000", "deny").status, 404);

    // The person answers with curl (a client nanoclaw did not write).
    let o = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-X", "POST", "-H"])
        .arg(format!("X-API-Key: {}", d.key(0)))
        .args([
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"decision":"allow-once"}"#,
        ])
        .arg(format!("http://127.0.0.1:{}/v1/approvals/{id}", d.port))
        .output()
        .expect("curl (apt-get install curl)");
    let out = text(&o.stdout);
    let (body, status) = out.rsplit_once('\n').unwrap_or((&out, ""));
    assert_eq!(status, "200", "curl: {out} {}", text(&o.stderr));
    let answered: Value = serde_json::from_str(body).expect("json");
    assert_eq!(answered, json!({"id": id, "decision": "allow-once"}));
    // Answered: not again.
    assert_eq!(d.answer(0, &id, "deny").status, 404);

    let r = run.join().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let call = &v["tool_calls"][0];
    assert_eq!(call["name"], "exec");
    assert_eq!(call["decision"], "approved", "{v}");
    assert_eq!(call["exit_code"], 0, "{v}");
    assert!(
        call["stdout"].as_str().unwrap().contains("approved-ran"),
        "{v}"
    );
    assert_eq!(v["stop"], "answer");
    assert!(d.approvals(0, false).is_empty());
    let all = d.approvals(0, true);
    assert_eq!(all[0]["id"], id.as_str());
    assert_eq!(all[0]["state"], "allow-once");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn an_unanswered_approval_expires_and_the_call_is_refused() {
    if !root_or_skip("an_unanswered_approval_expires_and_the_call_is_refused") {
        return;
    }
    let fake = FakeLlm::start(Kind::Anthropic, exec_script("echo must-not-run"), expect()).unwrap();
    let d = Daemon::start("expire", Some(fake.addr().port()), ASK_EXEC, "1s");
    let t = Instant::now();
    let r = d.execute(0, json!({"prompt": "say hello", "language": "bash"}));
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let call = &v["tool_calls"][0];
    assert_eq!(call["decision"], "refused", "{v}");
    assert_eq!(call["ok"], false);
    assert!(call["stdout"].is_null(), "{v}");
    // The run went on to its answer (the model saw the refusal).
    assert_eq!(v["stop"], "answer");
    assert!(
        v["answer"].as_str().unwrap().starts_with("tool result:"),
        "{v}"
    );
    assert!(!v.to_string().contains("must-not-run\\n"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(30));
    let all = d.approvals(0, true);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["state"], "expired");
    let id = all[0]["id"].as_str().unwrap();
    assert_eq!(d.answer(0, id, "allow-once").status, 404);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn bad_requests_are_refused_with_json() {
    if !root_or_skip("bad_requests_are_refused_with_json") {
        return;
    }
    // Without --config: every request is checked first, then refused.
    let d = Daemon::start("badinput", None, "", "5m");
    for (body, says) in [
        (r#"{"prompt":"x","bogus":1}"#, "unknown field"),
        (r#"{"prompt":""}"#, "prompt must not be empty"),
        (r#"{"prompt":"   "}"#, "prompt must not be empty"),
        (r#"{"prompt":"x","language":"cobol"}"#, "cobol"),
        (r#"{"prompt":"x","timeout":0}"#, "timeout"),
        (r#"{"prompt":"x","timeout":10000}"#, "at most 600"),
        (r#"{"prompt":"x","timeout":"30"}"#, "invalid"),
        (r#"{"prompt":"x","agent":"../../etc"}"#, "agent"),
        (r#"{"language":"python"}"#, "prompt"),
        ("[1,2]", "invalid"),
        ("not json", "invalid"),
        ("", "body is required"),
    ] {
        let r = d.call(0, "POST", "/v1/execute", Some(body));
        assert_eq!(r.status, 400, "{body}: {r:?}");
        let v = r.json();
        assert_eq!(v["code"], 400);
        assert!(v["message"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    let r = d.call(0, "POST", "/v1/execute", Some(r#"{"prompt":"fib"}"#));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.json()["message"].as_str().unwrap().contains("--config"));
    let r = http(
        d.port,
        "POST",
        "/v1/execute",
        None,
        Some(r#"{"prompt":"fib"}"#),
    );
    assert_eq!(r.status, 401);
    let r = http(d.port, "GET", "/v1/approvals", Some("e2b_wrong"), None);
    assert_eq!(r.status, 401);
    for q in ["?all=maybe", "?tenant=x", "?all=true&limit=3"] {
        let r = d.call(0, "GET", &format!("/v1/approvals{q}"), None);
        assert_eq!(r.status, 400, "{q}: {r:?}");
        assert_eq!(r.json()["code"], 400);
    }
}

/// A model that writes code sleeping `secs` and printing when it started
/// and ended (then answers), whatever the order its requests come in.
fn sleepy(fake: &FakeLlm, runs: usize, secs: f64) {
    for _ in 0..runs * 2 {
        fake.push(Turn::respond(move |body| {
            if nanoclaw_fakellm::last_tool_result(body).is_some() {
                Turn::text("slept")
            } else {
                let code = format!(
                    "import time\nt0 = time.time()\ntime.sleep({secs})\nprint(t0, time.time())\n"
                );
                Turn::tools(vec![ToolCall::new(
                    "run_code",
                    json!({"language": "python", "code": code}),
                )])
            }
        }));
    }
}

/// `n` requests of tenant `who` at once.
fn at_once(d: &Daemon, who: usize, n: usize) -> Vec<Reply> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (port, key) = (d.port, d.key(who).to_string());
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("sleep {i}"), "timeout": 60}).to_string();
                http(port, "POST", "/v1/execute", Some(&key), Some(&body))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The pids of this daemon's runs (its `agent execute` children).
fn runs_of(d: &Daemon) -> String {
    let pattern = format!("agent execute .*--data {}", d.dir.join("data").display());
    let o = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    text(&o.stdout).trim().to_string()
}

#[test]
fn runs_go_in_parallel_up_to_the_limit_then_429() {
    if !root_or_skip("runs_go_in_parallel_up_to_the_limit_then_429") {
        return;
    }
    let fake = FakeLlm::start(Kind::Anthropic, Vec::new(), expect()).unwrap();
    let d = Daemon::start("limits", Some(fake.addr().port()), "", "5m");

    // asyncio.gather of three: all succeed, and their code ran at the same
    // time (each printed, in its sandbox, when it started and ended).
    sleepy(&fake, 3, 2.0);
    let three = at_once(&d, 0, 3);
    let mut spans = Vec::new();
    for r in &three {
        assert_eq!(r.status, 200, "{r:?}");
        let out = r.json()["stdout"].as_str().unwrap().to_string();
        let t: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        spans.push((t[0], t[1]));
    }
    let last_start = spans.iter().map(|s| s.0).fold(f64::MIN, f64::max);
    let first_end = spans.iter().map(|s| s.1).fold(f64::MAX, f64::min);
    assert!(
        last_start < first_end,
        "the three runs did not overlap: {spans:?}"
    );

    // Six at once for one tenant: four run, two are refused at once; the
    // other tenant is not held up by the first one's limit.
    sleepy(&fake, 5, 3.0);
    let port = d.port;
    let key_b = d.key(1).to_string();
    let b = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        let body = json!({"prompt": "sleep b"}).to_string();
        http(port, "POST", "/v1/execute", Some(&key_b), Some(&body))
    });
    let six = at_once(&d, 0, 6);
    let ok = six.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = six.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, busy.len()), (4, 2), "{six:?}");
    for r in busy {
        assert!(r
            .header("retry-after")
            .is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
        let v = r.json();
        assert_eq!(v["code"], 429);
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains("at most 4 at once") && msg.contains(d.name(0)),
            "{msg}"
        );
    }
    let rb = b.join().unwrap();
    assert_eq!(rb.status, 200, "{rb:?}");

    // Counted and audited as quota refusals.
    let m = d.call(0, "GET", "/metrics", None);
    assert!(
        m.body
            .contains("nanoclaw_quota_refusals_total{quota=\"agent_runs\"} 2"),
        "{}",
        m.body
    );
    let refusals = d
        .call(0, "GET", "/v1/audit?kind=quota_refusal", None)
        .json();
    assert_eq!(refusals.as_array().unwrap().len(), 2, "{refusals}");
    assert!(refusals[0]["detail"]
        .as_str()
        .unwrap()
        .contains("agent runs"));
    assert_eq!(fake.violations(), Vec::<String>::new());
    // No run of this daemon is left behind.
    assert_eq!(runs_of(&d), "", "runs left behind");
}

#[test]
fn a_client_that_goes_away_ends_its_run() {
    if !root_or_skip("a_client_that_goes_away_ends_its_run") {
        return;
    }
    let fake = FakeLlm::start(Kind::Anthropic, Vec::new(), expect()).unwrap();
    sleepy(&fake, 1, 60.0);
    let d = Daemon::start("gone", Some(fake.addr().port()), "", "5m");
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    let body = json!({"prompt": "sleep a minute", "timeout": 120}).to_string();
    let req = format!(
        "POST /v1/execute HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        d.key(0),
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // The run is going, its code sleeping in the sandbox.
    poll(20, || {
        (fake.served() >= 1 && !runs_of(&d).is_empty()).then_some(())
    })
    .expect("the run did not start");
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    let gone = poll(15, || runs_of(&d).is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "the run outlived its client: {}",
        runs_of(&d)
    );
    // It was ended, not left to finish: no second model call.
    assert_eq!(fake.served(), 1);
}

/// Two tenants run the same configured agent: each has its own memory,
/// workspace and "allow always" answers. Tenant A's agent remembers a
/// secret and leaves a file; tenant B's run of the same agent sees
/// neither. Before agents were per tenant, B's system prompt carried A's
/// memory and B read A's file.
#[test]
fn tenants_running_the_same_agent_share_nothing() {
    if !root_or_skip("tenants_running_the_same_agent_share_nothing") {
        return;
    }
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![
            reply(
                vec![
                    ToolCall::new(
                        "memory",
                        json!({"action": "append", "text": "TENANT-A-MEMORY"}),
                    ),
                    ToolCall::new(
                        "write_file",
                        json!({"path": "/tmp/../workspace/a.txt", "content": "TENANT-A-FILE"}),
                    ),
                ],
                10,
                10,
            ),
            Turn::text("A done"),
            reply(
                vec![ToolCall::new(
                    "run_code",
                    json!({"language": "sh", "code": "cat /workspace/a.txt; ls -la /workspace"}),
                )],
                10,
                10,
            ),
            Turn::text("B done"),
        ],
        expect(),
    )
    .unwrap();
    let cfg = "agents:\n  defaults:\n    sandbox: {workspaceAccess: rw}\n  list:\n    - id: shared\n      tools: {allow: [group:fs, run_code, memory]}\n";
    let d = Daemon::start("tenants", Some(fake.addr().port()), cfg, "5m");
    let a = d.execute(0, json!({"prompt": "remember", "agent": "shared"}));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["tool_calls"][1]["ok"], true, "{}", a.json());
    let b = d.execute(1, json!({"prompt": "look", "agent": "shared"}));
    assert_eq!(b.status, 200, "{b:?}");
    let v = b.json();
    let seen = v["tool_calls"][0]["stdout"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!seen.contains("TENANT-A-FILE"), "B read A's file: {seen}");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 4);
    for r in &reqs[2..] {
        let body = r.body.to_string();
        assert!(
            !body.contains("TENANT-A-MEMORY"),
            "A's memory reached B's model: {body}"
        );
        assert!(
            !body.contains("TENANT-A-FILE"),
            "A's file reached B's model"
        );
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

/// Persistent agents outlive the daemon: run, SIGKILL the daemon, start it
/// again on the same data folder, run again — the agent's memory is in the
/// system prompt and its earlier exchange in the history.
#[test]
fn an_agent_remembers_across_a_daemon_restart() {
    if !root_or_skip("an_agent_remembers_across_a_daemon_restart") {
        return;
    }
    let fake = FakeLlm::start(
        Kind::Anthropic,
        vec![
            reply(
                vec![ToolCall::new(
                    "memory",
                    json!({"action": "append", "text": "Project codename: BLUEBIRD."}),
                )],
                10,
                10,
            ),
            Turn::text("Noted the codename."),
        ],
        expect(),
    )
    .unwrap();
    let cfg = "agents:\n  list:\n    - id: keeper\n      tools: {allow: [memory, run_code]}\n";
    let mut d = Daemon::start("restart", Some(fake.addr().port()), cfg, "5m");
    let r = d.execute(
        0,
        json!({"prompt": "The codename is BLUEBIRD; remember it.", "agent": "keeper"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    d.restart();
    let fake2 = FakeLlm::start(
        Kind::Anthropic,
        vec![Turn::text("BLUEBIRD")],
        Expect {
            system_must_contain: vec!["Project codename: BLUEBIRD.".into()],
            ..expect()
        },
    )
    .unwrap();
    // The config points at the first fake's port: reuse it for the second.
    let yaml = std::fs::read_to_string(&d.config).unwrap().replace(
        &fake.addr().port().to_string(),
        &fake2.addr().port().to_string(),
    );
    std::fs::write(&d.config, yaml).unwrap();
    let r = d.execute(
        0,
        json!({"prompt": "What is the codename?", "agent": "keeper"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["answer"], "BLUEBIRD");
    assert!(fake2.violations().is_empty(), "{:?}", fake2.violations());
    let body = fake2.requests()[0].body.to_string();
    assert!(
        body.contains("The codename is BLUEBIRD; remember it."),
        "no history: {body}"
    );
}
