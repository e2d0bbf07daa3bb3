//! `nanoclaw mcp`, the MCP server over stdio: its JSON-RPC framing and
//! errors (lines piped to the real binary), the cleanup of its sandbox on
//! SIGTERM, an agent's tool policy, and the official `mcp` Python SDK as
//! the client (tests/python/test_mcp.py, from the venv
//! `.ci/python-venv.sh` makes).

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::{bin_for, modes, nc, repo, text, venv, Mode};
use serde_json::{json, Value};

/// A running `nanoclaw mcp`, spoken to line by line.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Server {
    fn start(mode: Mode, extra: &[&str]) -> Server {
        let mut args = vec!["mcp"];
        args.extend_from_slice(extra);
        let mut child = nc(mode, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nanoclaw mcp");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Server {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(line.as_bytes()).expect("write");
        s.write_all(b"\n").expect("write");
        s.flush().expect("flush");
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        assert!(!line.is_empty(), "the server closed its stdout");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// Sends one line and reads one answer.
    fn ask(&mut self, line: &str) -> Value {
        self.send(line);
        self.recv()
    }

    fn request(&mut self, id: i64, method: &str, params: Value) -> Value {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let v = self.ask(&msg.to_string());
        assert_eq!(v["id"], id, "{v}");
        v
    }

    fn initialize(&mut self) {
        let v = self.request(
            1,
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "0"}}),
        );
        assert_eq!(v["result"]["protocolVersion"], "2025-11-25", "{v}");
        self.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    }

    fn call(&mut self, id: i64, name: &str, args: Value) -> Value {
        self.request(id, "tools/call", json!({"name": name, "arguments": args}))
    }

    /// Closes stdin and waits for the exit status.
    fn close(mut self) -> i32 {
        self.stdin = None;
        self.child.wait().expect("wait").code().unwrap_or(-1)
    }
}

fn code_of(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

/// The ids of the sandboxes alive now.
fn sandboxes(m: Mode) -> Vec<String> {
    let o = nc(m, &["sandbox", "ls", "--json"])
        .output()
        .expect("sandbox ls");
    let v: Value = serde_json::from_slice(&o.stdout).expect("ls json");
    v.as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn bad_input_gets_json_rpc_errors() {
    let m = modes("bad_input_gets_json_rpc_errors")[0];
    let mut s = Server::start(m, &[]);
    // Before initialize: ping works, tools do not.
    assert_eq!(s.request(7, "ping", json!({}))["result"], json!({}));
    let v = s.request(8, "tools/call", json!({"name": "exec", "arguments": {}}));
    assert_eq!(code_of(&v), -32600, "{v}");
    let v = s.request(9, "tools/list", json!({}));
    assert_eq!(code_of(&v), -32600, "{v}");
    // Malformed JSON: a parse error with a null id.
    let v = s.ask(r#"{"jsonrpc":"2.0","id":1,"method":"#);
    assert_eq!(code_of(&v), -32700, "{v}");
    assert_eq!(v["id"], Value::Null);
    // Not a request.
    assert_eq!(code_of(&s.ask("[]")), -32600);
    assert_eq!(code_of(&s.ask("42")), -32600);
    assert_eq!(code_of(&s.ask(r#"{"id":3,"method":"ping"}"#)), -32600);
    assert_eq!(
        code_of(&s.ask(r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#)),
        -32600
    );
    assert_eq!(
        code_of(&s.ask(r#"{"jsonrpc":"2.0","id":4,"method":7}"#)),
        -32600
    );
    // initialize needs a protocol version.
    let v = s.request(10, "initialize", json!({}));
    assert_eq!(code_of(&v), -32602, "{v}");
    // An old version the server speaks is answered as is.
    let v = s.request(11, "initialize", json!({"protocolVersion": "2025-03-26"}));
    assert_eq!(v["result"]["protocolVersion"], "2025-03-26", "{v}");
    // One it does not: its latest.
    s.initialize();
    let v = s.request(12, "initialize", json!({"protocolVersion": "2099-01-01"}));
    assert_eq!(v["result"]["protocolVersion"], "2025-11-25", "{v}");
    // Notifications get no answer: the next line answered is the ping.
    s.send(r#"{"jsonrpc":"2.0","method":"notifications/whatever"}"#);
    assert_eq!(s.request(13, "ping", json!(null))["result"], json!({}));
    // Unknown method, bad params, unknown tool.
    assert_eq!(code_of(&s.request(14, "resources/list", json!({}))), -32601);
    assert_eq!(code_of(&s.request(15, "tools/call", json!([1]))), -32602);
    assert_eq!(code_of(&s.request(16, "tools/call", json!({}))), -32602);
    let v = s.call(17, "no_such_tool", json!({}));
    assert_eq!(code_of(&v), -32602, "{v}");
    // Bad arguments: a tool error (isError), no sandbox needed for it.
    let v = s.call(18, "run_code", json!({"language": "python"}));
    assert_eq!(v["result"]["isError"], true, "{v}");
    let v = s.call(19, "exec", json!({"command": "id", "elevated": true}));
    assert_eq!(v["result"]["isError"], true, "{v}");
    let tools = s.request(20, "tools/list", json!({}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["run_code", "exec", "read_file", "write_file", "list_files"]
    );
    assert_eq!(s.close(), 0);
}

#[test]
fn sigterm_removes_the_sessions_sandbox() {
    for m in modes("sigterm_removes_the_sessions_sandbox") {
        let mut s = Server::start(m, &[]);
        s.initialize();
        let v = s.call(2, "exec", json!({"command": "echo hi > f; cat f"}));
        assert_eq!(v["result"]["isError"], false, "[{}] {v}", m.name);
        assert_eq!(v["result"]["structuredContent"]["stdout"], "hi\n");
        let id = v["result"]["structuredContent"]["sandbox_id"]
            .as_str()
            .expect("sandbox id")
            .to_string();
        assert!(sandboxes(m).contains(&id), "[{}] {id} not listed", m.name);
        // SAFETY: kill with a pid and a signal.
        unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
        let status = s.child.wait().expect("wait");
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "[{}]", m.name);
        assert!(
            !sandboxes(m).contains(&id),
            "[{}] {id} left after SIGTERM",
            m.name
        );
    }
}

#[test]
fn an_agents_policy_decides_which_tools_are_offered() {
    let m = modes("an_agents_policy_decides_which_tools_are_offered")[0];
    let dir = std::env::temp_dir().join(format!("nanoclaw-mcp-policy-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = dir.join("nanoclaw.yaml");
    fs::write(
        &config,
        "agents:\n  list:\n    - id: reader\n      sandbox:\n        scope: session\n      tools:\n        allow: [read_file, list_files, run_code]\n        deny: [exec]\n",
    )
    .expect("config");
    let c = config.display().to_string();
    let session = format!("mcp-{}", std::process::id());
    let mut s = Server::start(
        m,
        &["--config", &c, "--agent", "reader", "--session", &session],
    );
    s.initialize();
    let tools = s.request(2, "tools/list", json!({}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["run_code", "read_file", "list_files"], "{tools}");
    let v = s.call(3, "exec", json!({"command": "id"}));
    assert_eq!(code_of(&v), -32602, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("exec"));
    let v = s.call(4, "write_file", json!({"path": "x", "content": "y"}));
    assert_eq!(code_of(&v), -32602, "{v}");
    let v = s.call(5, "run_code", json!({"language": "sh", "code": "echo ok"}));
    assert_eq!(v["result"]["isError"], false, "{v}");
    let id = v["result"]["structuredContent"]["sandbox_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(s.close(), 0);
    // The agent's scoped sandbox is kept (like `run --agent`'s): remove it.
    assert!(sandboxes(m).contains(&id), "the scoped sandbox is gone");
    let o = nc(m, &["sandbox", "rm", &id]).output().expect("rm");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn the_official_mcp_sdk_uses_nanoclaw_mcp() {
    let Some(venv) = venv("the mcp SDK") else {
        return;
    };
    for m in modes("the_official_mcp_sdk_uses_nanoclaw_mcp") {
        let mut cmd: Vec<String> = Vec::new();
        if let Some((uid, gid)) = m.user {
            cmd.extend(
                [
                    "setpriv",
                    "--reuid",
                    &uid.to_string(),
                    "--regid",
                    &gid.to_string(),
                    "--clear-groups",
                    "--",
                ]
                .map(String::from),
            );
        }
        cmd.push(bin_for(m).display().to_string());
        let o = Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/python/test_mcp.py",
            ])
            .current_dir(repo())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/tmp")
            .env("NANOCLAW_MCP_COMMAND", json!(cmd).to_string())
            .env("NANOCLAW_REQUIRE_E2B", "1")
            .output()
            .expect("run pytest");
        let out = text(&o.stdout);
        assert!(
            o.status.success(),
            "[{}] the mcp SDK suite failed:\n{out}\n{}",
            m.name,
            text(&o.stderr)
        );
        eprintln!("[{}] {}", m.name, out.lines().last().unwrap_or(""));
    }
}
