//! nanoclaw's MCP server: `/mcp` on `nanoclaw serve` and `nanoclaw mcp`
//! (stdio, relaying to a daemon): JSON-RPC framing and errors through the
//! relay, nothing left behind at the end of stdin or at SIGTERM, relaying
//! to a running daemon (`--url`, `--data`), and the official `mcp` Python
//! SDK as the client, v1 and v2, over both transports and in both protocol
//! eras (tests/python/test_mcp.py and test_mcp_v2.py, from the venv
//! `.ci/python-venv.sh` makes), with the audit log checked after.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{bin_for, free_port, modes, nc, repo, text, venv, wait_listening, Mode};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time: they count the keepers of a user.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeper processes of the mode's user.
fn keepers(mode: Mode) -> usize {
    let uid = mode.user.map_or(0, |u| u.0);
    let o = Command::new("pgrep")
        .args(["-c", "-u", &uid.to_string(), "-f", "nanoclaw __keeper"])
        .output()
        .expect("pgrep");
    text(&o.stdout).trim().parse().unwrap_or(0)
}

/// Waits (up to 10 s) for the keepers to be back to `want`.
fn wait_keepers(mode: Mode, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = keepers(mode);
        if n <= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The embedded daemons' private directories in the temp dir.
fn private_dirs() -> BTreeSet<String> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nanoclaw-mcp-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A daemon on TCP with two tenants, in a fresh data folder owned by the
/// mode's user.
struct Daemon {
    mode: Mode,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
    keys: (String, String),
}

impl Daemon {
    fn new(mode: Mode, name: &str) -> Daemon {
        let data =
            std::env::temp_dir().join(format!("nanoclaw-mcpd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if let Some((uid, gid)) = mode.user {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown data dir");
        }
        let d = data.to_string_lossy().into_owned();
        let key = |t: &str| {
            let o = nc(mode, &["tenant", "add", t, "--data", &d, "--rate", "1000"])
                .output()
                .expect("tenant add");
            assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
            text(&o.stdout).trim().to_string()
        };
        let keys = (key("alice"), key("bob"));
        let port = free_port();
        let listen = format!("tcp:127.0.0.1:{port}");
        let mut child = nc(mode, &["serve", "--data", &d, "--listen", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nanoclaw serve");
        let patience = Duration::from_secs(20);
        wait_listening(&mut child, port, patience, "nanoclaw serve");
        Daemon {
            mode,
            data,
            port,
            child: Some(child),
            keys,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `nanoclaw audit ARGS --data D`: its stdout (must succeed).
    fn audit(&self, args: &[&str]) -> String {
        let d = self.data.to_string_lossy().into_owned();
        let mut a = vec!["audit"];
        a.extend_from_slice(args);
        a.extend(["--data", &d]);
        let o = nc(self.mode, &a).output().expect("nanoclaw audit");
        assert!(o.status.success(), "audit {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    }

    /// The sandbox ids tenant `key` has (E2B's list, with curl).
    fn sandboxes(&self, key: &str) -> Vec<String> {
        let o = Command::new("curl")
            .args(["-s", "-H", &format!("X-API-Key: {key}")])
            .arg(format!("{}/v2/sandboxes", self.url()))
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&o.stdout).expect("sandbox list");
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|s| s["sandboxID"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid and a signal.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A running `nanoclaw mcp`, spoken to line by line.
struct Relay {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Relay {
    fn start(mode: Mode, extra: &[&str]) -> Relay {
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
        Relay {
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
        assert!(!line.is_empty(), "the relay closed its stdout");
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

fn sandbox_of(v: &Value) -> String {
    v["result"]["structuredContent"]["sandbox_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no sandbox id: {v}"))
        .to_string()
}

#[test]
fn bad_input_gets_json_rpc_errors_through_the_relay() {
    let _g = serial();
    let m = modes("bad_input_gets_json_rpc_errors_through_the_relay")[0];
    let mut s = Relay::start(m, &[]);
    // Before initialize there is no session (HTTP's rule): a request
    // other than initialize is refused, and answered with its own id.
    let v = s.request(7, "ping", json!({}));
    assert_eq!(code_of(&v), -32600, "{v}");
    let v = s.request(8, "tools/list", json!({}));
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
    let v = s.call(
        19,
        "sandbox_exec",
        json!({"command": "id", "elevated": true}),
    );
    assert_eq!(v["result"]["isError"], true, "{v}");
    // The 2026-07-28 era through stdio: the relay adds the headers.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}});
    let v = s.request(20, "server/discover", json!({"_meta": meta}));
    assert_eq!(v["result"]["resultType"], "complete", "{v}");
    let v = s.request(
        21,
        "tools/call",
        json!({"name": "sandbox_list", "arguments": {}, "_meta": meta}),
    );
    assert_eq!(v["result"]["isError"], false, "{v}");
    assert_eq!(s.close(), 0);
}

/// One stdio session: a tool call in the session's sandbox, then `end`.
fn session_then(m: Mode, end: impl FnOnce(Relay) -> Option<i32>, want: i32) {
    let before = keepers(m);
    let dirs = private_dirs();
    let mut s = Relay::start(m, &[]);
    s.initialize();
    let v = s.call(2, "sandbox_exec", json!({"command": "echo hi > f; cat f"}));
    assert_eq!(v["result"]["isError"], false, "[{}] {v}", m.name);
    assert_eq!(v["result"]["structuredContent"]["stdout"], "hi\n");
    let v = s.call(3, "sandbox_create", json!({"timeout": 600}));
    assert_eq!(v["result"]["isError"], false, "[{}] {v}", m.name);
    let v = s.call(4, "exec_start", json!({"argv": ["sleep", "600"]}));
    assert_eq!(v["result"]["isError"], false, "[{}] {v}", m.name);
    assert_eq!(keepers(m), before + 2, "[{}] two sandboxes", m.name);
    assert_eq!(end(s), Some(want), "[{}]", m.name);
    assert_eq!(
        wait_keepers(m, before),
        before,
        "[{}] sandboxes left behind",
        m.name
    );
    assert_eq!(private_dirs(), dirs, "[{}] files left behind", m.name);
}

#[test]
fn the_end_of_stdin_or_sigterm_leaves_nothing_behind() {
    let _g = serial();
    for m in modes("the_end_of_stdin_or_sigterm_leaves_nothing_behind") {
        session_then(m, |s| Some(s.close()), 0);
        session_then(
            m,
            |mut s| {
                // SAFETY: kill with a pid and a signal.
                unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
                s.child.wait().ok().and_then(|st| st.code())
            },
            128 + libc::SIGTERM,
        );
    }
}

#[test]
fn the_relay_uses_a_running_daemon_by_url_or_data_folder() {
    let _g = serial();
    for m in modes("the_relay_uses_a_running_daemon_by_url_or_data_folder") {
        let d = Daemon::new(m, "relay");
        let url = d.url();
        let data = d.data.to_string_lossy().into_owned();
        for how in [["--url", url.as_str()], ["--data", data.as_str()]] {
            let mut s = Relay::start(m, &[how[0], how[1], "--api-key", &d.keys.0]);
            s.initialize();
            let v = s.call(2, "sandbox_exec", json!({"argv": ["true"]}));
            let own = sandbox_of(&v);
            assert!(
                d.sandboxes(&d.keys.0).contains(&own),
                "[{}] {how:?}",
                m.name
            );
            assert!(
                !d.sandboxes(&d.keys.1).contains(&own),
                "[{}] {how:?}",
                m.name
            );
            assert_eq!(s.close(), 0);
            // The session ended with stdin: its sandbox too; the daemon
            // goes on.
            assert!(
                !d.sandboxes(&d.keys.0).contains(&own),
                "[{}] {how:?}",
                m.name
            );
        }
        // A wrong key: the daemon's 401, as a JSON-RPC error.
        let mut s = Relay::start(m, &["--url", &url, "--api-key", "e2b_wrong"]);
        let v = s.request(
            1,
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {}}),
        );
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains("401"),
            "{v}"
        );
        assert_eq!(s.close(), 0);
    }
}

#[test]
fn the_official_mcp_sdk_drives_both_transports() {
    let _g = serial();
    let Some(venv) = venv("the mcp SDK") else {
        return;
    };
    for m in modes("the_official_mcp_sdk_drives_both_transports") {
        let before = keepers(m);
        let d = Daemon::new(m, "sdk");
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
        // The v1 SDK is the venv's own `mcp`; the v2 SDK is installed
        // beside it in VENV/mcp-v2 (.ci/python-venv.sh) and put first on
        // PYTHONPATH for its suite only.
        let v2 = venv.join("mcp-v2");
        assert!(
            v2.join("mcp").is_dir(),
            "{} is missing: run .ci/python-venv.sh",
            v2.display()
        );
        for (suite, pythonpath) in [
            ("tests/python/test_mcp.py", None),
            ("tests/python/test_mcp_v2.py", Some(&v2)),
        ] {
            let mut c = Command::new(venv.join("bin/python"));
            c.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", suite])
                .current_dir(repo())
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", "/tmp")
                .env("NANOCLAW_MCP_COMMAND", json!(cmd).to_string())
                .env("NANOCLAW_MCP_URL", d.url())
                .env("NANOCLAW_MCP_KEY", &d.keys.0)
                .env("NANOCLAW_MCP_KEY_B", &d.keys.1)
                .env("NANOCLAW_REQUIRE_E2B", "1");
            if let Some(p) = pythonpath {
                c.env("PYTHONPATH", p);
            }
            let o = c.output().expect("run pytest");
            let out = text(&o.stdout);
            assert!(
                o.status.success(),
                "[{}] {suite} failed:\n{out}\n{}",
                m.name,
                text(&o.stderr)
            );
            eprintln!("[{}] {suite}: {}", m.name, out.lines().last().unwrap_or(""));
        }
        // Every tool call is in the audit log, with the processes and file
        // operations it made, and the chain holds.
        let requests = d.audit(&["ls", "--kind", "request", "--limit", "1000", "--json"]);
        for tool in ["sandbox_exec", "run_code", "write_file", "exec_start"] {
            assert!(
                requests.contains(&format!("mcp tools/call {tool}")),
                "[{}] no record of {tool}",
                m.name
            );
        }
        let execs = d.audit(&["ls", "--kind", "exec", "--limit", "1000", "--json"]);
        assert!(execs.contains("python3"), "[{}] {execs}", m.name);
        let files = d.audit(&["ls", "--kind", "file", "--limit", "1000", "--json"]);
        assert!(files.contains("/home/user/notes/hello.txt"), "[{}]", m.name);
        let verify = d.audit(&["verify"]);
        assert!(verify.starts_with("ok"), "[{}] {verify}", m.name);
        // Tenant A's sandboxes left by the suite: none but what it killed.
        drop(d);
        assert_eq!(
            wait_keepers(m, before),
            before,
            "[{}] keepers left behind",
            m.name
        );
    }
}
