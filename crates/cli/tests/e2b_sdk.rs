//! `nanoclaw serve` driven by real clients written by others: the pinned,
//! unmodified `e2b` Python SDK (tests/python, run by pytest from the venv
//! `.ci/python-venv.sh` makes) and curl; root and rootless. Also the fault
//! test: the daemon SIGKILLed with sandboxes alive, restarted, re-adopts
//! them; nothing is left behind.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::testnet::{TestNet, CRED_SERVER};
use common::{e2b_pytest, free_port, modes, nc, text, venv, wait_listening, Mode};

/// The tests count keeper processes: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A daemon with two tenants, in a fresh data folder owned by the mode's user.
struct Daemon {
    mode: Mode,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
    keys: (String, String),
    extra: Vec<String>,
    /// Started in a private mount namespace with this file over /etc/hosts
    /// (the names of a test host), and these variables.
    hosts: Option<(PathBuf, Vec<(String, String)>)>,
}

impl Daemon {
    fn new(mode: Mode, name: &str) -> Daemon {
        Daemon::with(mode, name, &[])
    }

    /// A daemon started with extra `serve` options.
    fn with(mode: Mode, name: &str, extra: &[&str]) -> Daemon {
        let mut dm = Daemon::prepared(mode, name, extra);
        dm.start();
        dm
    }

    /// A data folder with two tenants; not started.
    fn prepared(mode: Mode, name: &str, extra: &[&str]) -> Daemon {
        let data =
            std::env::temp_dir().join(format!("nanoclaw-serve-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if let Some((uid, gid)) = mode.user {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown data dir");
        }
        let d = data.to_string_lossy().into_owned();
        let key = |t: &str| {
            let o = nc(mode, &["tenant", "add", t, "--data", &d])
                .output()
                .expect("tenant add");
            assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
            text(&o.stdout).trim().to_string()
        };
        let keys = (key("alice"), key("bob"));
        Daemon {
            mode,
            data,
            port: free_port(),
            child: None,
            keys,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            hosts: None,
        }
    }

    /// A daemon whose host resolver (and so its sandboxes' proxies) reads
    /// `hosts` as /etc/hosts — bind-mounted in a mount namespace of its own,
    /// the host's file untouched — with `env` added to its environment.
    fn with_hosts(mode: Mode, name: &str, hosts: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut dm = Daemon::prepared(mode, name, &[]);
        dm.hosts = Some((
            hosts.to_path_buf(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        dm.start();
        dm
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let d = self.data.to_string_lossy().into_owned();
        let listen = format!("tcp:127.0.0.1:{}", self.port);
        let mut args = vec!["serve", "--data", &d, "--listen", &listen];
        args.extend(self.extra.iter().map(String::as_str));
        let mut cmd = nc(self.mode, &args);
        if let Some((hosts, env)) = &self.hosts {
            let mut wrapped = Command::new("unshare");
            wrapped
                .args(["-m", "--propagation", "private", "--", "sh", "-c"])
                .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                .arg(hosts)
                .arg(cmd.get_program())
                .args(cmd.get_args())
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", "/tmp")
                .current_dir("/")
                .stdin(Stdio::null());
            for (k, v) in env {
                wrapped.env(k, v);
            }
            cmd = wrapped;
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nanoclaw serve");
        let patience = Duration::from_secs(20);
        wait_listening(&mut child, self.port, patience, "nanoclaw serve");
        self.child = Some(child);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid and a signal.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
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

    /// Adds a tenant (with `tenant add` options); its key.
    fn tenant(&self, name: &str, opts: &[&str]) -> String {
        let d = self.data.to_string_lossy().into_owned();
        let mut args = vec!["tenant", "add", name, "--data", &d];
        args.extend_from_slice(opts);
        let o = nc(self.mode, &args).output().expect("tenant add");
        assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
        text(&o.stdout).trim().to_string()
    }

    /// curl (a real HTTP client) against the control plane: (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.curl_as(&self.keys.0, method, path, body)
    }

    /// [`Daemon::curl`] with another tenant's key; headers in the body too.
    fn curl_as(&self, key: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-s", "-i", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("X-API-Key: {key}"))
            .arg(format!("{}{path}", self.url()));
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data", b]);
        }
        let o = c.output().expect("curl");
        let out = text(&o.stdout);
        let (all, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        // Headers, then the body: keep the headers (for Retry-After) on
        // their own lines before the body's.
        let body = match all.split_once("\r\n\r\n") {
            Some((head, body)) => format!("{head}\n\n{body}"),
            None => all.to_string(),
        };
        (code.trim().parse().unwrap_or(0), body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.data);
    }
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

#[test]
fn the_e2b_sdk_runs_against_nanoclaw_serve() {
    let _g = serial();
    let Some(venv) = venv("the e2b SDK") else {
        return;
    };
    for m in modes("the_e2b_sdk_runs_against_nanoclaw_serve") {
        let before = keepers(m);
        let d = Daemon::new(m, "sdk");
        let o = e2b_pytest(
            &venv,
            "tests/python/test_e2b_sdk.py",
            &d.url(),
            (&d.keys.0, &d.keys.1),
        )
        .env(
            "NANOCLAW_E2B_ROOTLESS",
            if m.user.is_some() { "1" } else { "0" },
        )
        .output()
        .expect("run pytest");
        let out = text(&o.stdout);
        assert!(
            o.status.success(),
            "[{}] the e2b SDK suite failed:\n{out}\n{}",
            m.name,
            text(&o.stderr)
        );
        eprintln!("[{}] {}", m.name, out.lines().last().unwrap_or(""));
        // Every command the suite ran is in the audit log, whose chain holds.
        let execs = d.audit(&["ls", "--kind", "exec", "--limit", "1000", "--json"]);
        assert!(
            execs.contains("/bin/bash"),
            "[{}] no exec records: {execs}",
            m.name
        );
        // And every file operation, with its path.
        let files = d.audit(&["ls", "--kind", "file", "--limit", "1000", "--json"]);
        assert!(
            files.contains("\"write\"") && files.contains("\"remove\""),
            "[{}] no file records: {files}",
            m.name
        );
        let verify = d.audit(&["verify"]);
        assert!(
            verify.starts_with("ok"),
            "[{}] audit verify: {verify}",
            m.name
        );
        drop(d);
        assert_eq!(
            wait_keepers(m, before),
            before,
            "[{}] keepers left behind",
            m.name
        );
    }
}

/// The unmodified `e2b-code-interpreter` SDK: stateful python, javascript
/// and bash contexts, rich results, timeouts, crashes, restarts and hostile
/// input (tests/python/test_code_interpreter.py); no keeper (and so no
/// interpreter) outlives the daemon.
#[test]
fn the_code_interpreter_sdk_runs_against_nanoclaw_serve() {
    let _g = serial();
    let Some(venv) = venv("the e2b-code-interpreter SDK") else {
        return;
    };
    for m in modes("the_code_interpreter_sdk_runs_against_nanoclaw_serve") {
        let before = keepers(m);
        let d = Daemon::new(m, "ci");
        let o = e2b_pytest(
            &venv,
            "tests/python/test_code_interpreter.py",
            &d.url(),
            (&d.keys.0, &d.keys.1),
        )
        .output()
        .expect("run pytest");
        let out = text(&o.stdout);
        assert!(
            o.status.success(),
            "[{}] the code-interpreter suite failed:\n{out}\n{}",
            m.name,
            text(&o.stderr)
        );
        eprintln!("[{}] {}", m.name, out.lines().last().unwrap_or(""));
        // The interpreters ran as audited processes of their sandboxes.
        let execs = d.audit(&["ls", "--kind", "exec", "--limit", "1000", "--json"]);
        assert!(
            execs.contains("python3") && execs.contains("node"),
            "[{}] no interpreter exec records: {execs}",
            m.name
        );
        drop(d);
        assert_eq!(
            wait_keepers(m, before),
            before,
            "[{}] keepers left behind",
            m.name
        );
    }
}

#[test]
fn a_killed_daemon_readopts_its_sandboxes() {
    let _g = serial();
    for m in modes("a_killed_daemon_readopts_its_sandboxes") {
        if std::process::Command::new("curl")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("curl is needed (apt-get install curl)");
        }
        let before = keepers(m);
        let mut d = Daemon::new(m, "fault");
        let (code, body) = d.curl(
            "POST",
            "/v2/sandboxes",
            Some(r#"{"templateID":"base","timeout":120}"#),
        );
        assert_eq!(code, 201, "[{}] create: {body}", m.name);
        let v = json_body(&body);
        let id = v["sandboxID"].as_str().expect("sandboxID").to_string();
        d.signal(libc::SIGKILL);
        assert_eq!(
            keepers(m),
            before + 1,
            "[{}] the sandbox died with the daemon",
            m.name
        );
        d.start();
        let (code, body) = d.curl("GET", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 200, "[{}] not re-adopted: {body}", m.name);
        let (code, _) = d.curl("DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 204, "[{}] delete", m.name);
        assert_eq!(
            wait_keepers(m, before),
            before,
            "[{}] keeper left behind",
            m.name
        );
        let (code, body) = d.curl("GET", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 404, "[{}] {body}", m.name);
        assert!(body.contains("\"code\""), "[{}] error body: {body}", m.name);
    }
}

/// The JSON body of a `curl -i` answer.
fn json_body(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\n\n").map_or(answer, |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
}

/// Quotas by attack: a tenant allowed 2 sandboxes and 60 s lifetimes
/// cannot get a third or a longer one (429, Retry-After, a JSON body
/// naming the quota), while another tenant is unaffected; nothing is
/// left behind.
#[test]
fn quotas_refuse_with_429_and_say_which() {
    let _g = serial();
    let m = modes("quotas_refuse_with_429_and_say_which")[0];
    let before = keepers(m);
    let d = Daemon::new(m, "quota");
    let carol = d.tenant("carol", &["--max-sandboxes", "2", "--max-lifetime", "60s"]);
    let make = |key: &str, timeout: u32| {
        d.curl_as(
            key,
            "POST",
            "/v2/sandboxes",
            Some(&format!(r#"{{"templateID":"base","timeout":{timeout}}}"#)),
        )
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (code, body) = make(&carol, 30);
        assert_eq!(code, 201, "{body}");
        ids.push(
            json_body(&body)["sandboxID"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    let (code, body) = make(&carol, 30);
    assert_eq!(code, 429, "a third sandbox: {body}");
    assert!(body.to_ascii_lowercase().contains("retry-after:"), "{body}");
    let v = json_body(&body);
    assert_eq!(v["code"], 429, "{body}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("concurrent sandboxes"),
        "{body}"
    );
    // Another tenant is not affected by carol's quota.
    let (code, body) = make(&d.keys.1, 30);
    assert_eq!(code, 201, "{body}");
    let bob_id = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    // A longer lifetime than allowed, once there is room again.
    let (code, _) = d.curl_as(&carol, "DELETE", &format!("/sandboxes/{}", ids[0]), None);
    assert_eq!(code, 204);
    let (code, body) = make(&carol, 3600);
    assert_eq!(code, 429, "a 1 h sandbox: {body}");
    assert!(
        json_body(&body)["message"]
            .as_str()
            .unwrap_or("")
            .contains("lifetime"),
        "{body}"
    );
    let (code, body) = d.curl_as(
        &carol,
        "POST",
        &format!("/sandboxes/{}/timeout", ids[1]),
        Some(r#"{"timeout":3600}"#),
    );
    assert_eq!(code, 429, "extending past the lifetime: {body}");
    // Each refusal is counted in /metrics by its quota.
    let (code, metrics) = d.curl("GET", "/metrics", None);
    assert_eq!(code, 200);
    for q in ["sandboxes", "lifetime"] {
        let line = format!("nanoclaw_quota_refusals_total{{quota=\"{q}\"}} ");
        let n: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(n >= 1.0, "{q} refusals not counted: {metrics}");
    }
    for (key, id) in [(&carol, &ids[1]), (&d.keys.1, &bob_id)] {
        let (code, _) = d.curl_as(key, "DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 204);
    }
    drop(d);
    assert_eq!(wait_keepers(m, before), before, "keepers left behind");
}

/// Warm pools: sandboxes made ahead are handed out (`launch: warm`), a
/// request with another network policy gets a cold one, the pool refills,
/// and the daemon's stop ends the pooled sandboxes.
#[test]
fn a_warm_pool_hands_out_and_refills() {
    let _g = serial();
    let m = modes("a_warm_pool_hands_out_and_refills")[0];
    let before = keepers(m);
    let roots_before = serve_roots();
    let d = Daemon::with(m, "pool", &["--pool", "base=2"]);
    assert_eq!(
        wait_keepers_up(m, before + 2),
        before + 2,
        "the pool did not fill"
    );
    let (code, body) = d.curl(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":60}"#),
    );
    assert_eq!(code, 201, "{body}");
    let id = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    let (_, info) = d.curl("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(json_body(&info)["metadata"]["launch"], "warm", "{info}");
    let (code, body) = d.curl(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":60,"allow_internet_access":false}"#),
    );
    assert_eq!(code, 201, "{body}");
    let cold = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    let (_, info) = d.curl("GET", &format!("/sandboxes/{cold}"), None);
    assert_eq!(json_body(&info)["metadata"]["launch"], "cold", "{info}");
    // 2 handed-out (one warm, one cold) + the refilled pool of 2.
    assert_eq!(
        wait_keepers_up(m, before + 4),
        before + 4,
        "the pool did not refill"
    );
    for id in [&id, &cold] {
        let (code, _) = d.curl("DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 204);
    }
    // The pooled sandboxes end with the daemon, and its keepers' state
    // folder with them.
    drop(d);
    assert_eq!(wait_keepers(m, before), before, "keepers left behind");
    let left: Vec<_> = serve_roots().difference(&roots_before).cloned().collect();
    assert!(
        left.is_empty(),
        "the daemon left its state folder: {left:?}"
    );
}

/// The daemons' keeper state folders (root's: one per data folder).
fn serve_roots() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/run/nanoclaw/serve")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_keepers_up(mode: Mode, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = keepers(mode);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two daemons (two data folders) never see each other's sandboxes, even
/// for same-named tenants; a second daemon on the same data folder is
/// refused.
#[test]
fn two_daemons_do_not_share_sandboxes() {
    let _g = serial();
    let m = modes("two_daemons_do_not_share_sandboxes")[0];
    let before = keepers(m);
    let d1 = Daemon::new(m, "two-a");
    let (code, body) = d1.curl(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":60}"#),
    );
    assert_eq!(code, 201, "{body}");
    let id = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    let d2 = Daemon::new(m, "two-b");
    let (code, body) = d2.curl("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 404, "the other daemon's sandbox is visible: {body}");
    let (_, list) = d2.curl("GET", "/v2/sandboxes", None);
    assert!(!list.contains(&id), "{list}");
    let (code, body) = d1.curl("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 200, "the second daemon took the sandbox: {body}");
    // The same data folder twice: refused, one line.
    let dd = d1.data.to_string_lossy().into_owned();
    let port = format!("tcp:127.0.0.1:{}", free_port());
    let o = nc(m, &["serve", "--data", &dd, "--listen", &port])
        .output()
        .expect("serve");
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("another nanoclaw serve"),
        "{}",
        text(&o.stderr)
    );
    let (code, _) = d1.curl("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 204);
    drop(d2);
    drop(d1);
    assert_eq!(wait_keepers(m, before), before, "keepers left behind");
}

/// nanoclaw's own routes on the real daemon, by curl: one-shot runs
/// (exit code and output as `run --json`), bad input as 400 JSON, health,
/// Prometheus metrics, the OpenAPI document, the tenant's audit records.
#[test]
fn nanoclaw_routes_on_the_real_daemon() {
    let _g = serial();
    let m = modes("nanoclaw_routes_on_the_real_daemon")[0];
    let before = keepers(m);
    let d = Daemon::new(m, "routes");
    let (code, body) = d.curl(
        "POST",
        "/v1/run",
        Some(r#"{"command":["sh","-c","echo hi; echo err >&2; exit 3"]}"#),
    );
    assert_eq!(code, 200, "{body}");
    let v = json_body(&body);
    assert_eq!(v["exit_code"], 3, "{body}");
    assert_eq!(v["stdout"], "hi\n", "{body}");
    assert_eq!(v["stderr"], "err\n", "{body}");
    let (code, body) = d.curl(
        "POST",
        "/v1/run",
        Some(r#"{"lang":"python","code":"import os; print(os.getuid())","timeout_ms":10000}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_body(&body)["stdout"], "1000\n", "{body}");
    let (code, body) = d.curl("POST", "/v1/run", Some(r#"{"command":["true"],"bogus":1}"#));
    assert_eq!(code, 400, "{body}");
    assert!(json_body(&body)["message"].is_string(), "{body}");
    let (code, body) = d.curl(
        "POST",
        "/v1/run",
        Some(r#"{"command":["true"],"timeout_ms":99999999}"#),
    );
    assert_eq!(
        code, 429,
        "a run past the tenant's longest lifetime: {body}"
    );
    let (code, body) = d.curl("GET", "/healthz", None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = d.curl("GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("nanoclaw_http_requests_total"), "{body}");
    let (code, body) = d.curl("GET", "/openapi.json", None);
    assert_eq!(code, 200);
    assert_eq!(
        json_body(&body)["openapi"].as_str().map(|s| &s[..3]),
        Some("3.1")
    );
    let (code, body) = d.curl("GET", "/v1/audit?kind=request&limit=1000", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("/v1/run"), "{body}");
    drop(d);
    assert_eq!(wait_keepers(m, before), before, "keepers left behind");
}

/// The red team's findings against `nanoclaw serve`, by attack; each
/// assertion fails on the code before its fix.
#[test]
fn red_team_findings_stay_fixed() {
    let _g = serial();
    let m = modes("red_team_findings_stay_fixed")[0];
    let before = keepers(m);
    let d = Daemon::new(m, "redteam");
    let alive = |what: &str| {
        let (code, _) = d.curl("GET", "/healthz", None);
        assert_eq!(code, 200, "the daemon died after {what}");
    };
    // 1. Client-chosen durations added to clocks must not panic (abort).
    let (code, body) = d.curl(
        "GET",
        "/sandboxes/x/metrics?start=18446744073709551615",
        None,
    );
    assert!((400..500).contains(&code), "{body}");
    alive("a huge metrics start");
    let (code, body) = d.curl(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":30}"#),
    );
    assert_eq!(code, 201, "{body}");
    let id = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, body) = d.curl(
        "POST",
        &format!("/sandboxes/{id}/connect"),
        Some(r#"{"timeout":9223372036854775807}"#),
    );
    assert_eq!(code, 400, "{body}");
    alive("a huge connect timeout");
    // 2. An admin command on the live data folder must not unlink the
    //    daemon's WAL: records stay visible to the CLI.
    let dd = d.data.to_string_lossy().into_owned();
    let o = nc(m, &["tenant", "ls", "--data", &dd])
        .output()
        .expect("tenant ls");
    assert!(o.status.success());
    let (code, _) = d.curl("GET", "/v2/sandboxes?probe=after-tenant-ls", None);
    assert_eq!(code, 200);
    assert!(
        d.data.join("nanoclaw.db-wal").exists(),
        "the WAL was unlinked"
    );
    let recs = d.audit(&["ls", "--kind", "request", "--limit", "1000", "--json"]);
    assert!(
        recs.contains("after-tenant-ls") || recs.contains("/v2/sandboxes"),
        "{recs}"
    );
    let last = d.audit(&["ls", "--kind", "request", "--limit", "1", "--json"]);
    assert!(
        last.contains("/v2/sandboxes"),
        "the CLI does not see the daemon's newest record: {last}"
    );
    // 3. allowOut may not open loopback, metadata or private networks.
    for rule in [
        "127.0.0.1/32",
        "169.254.169.254",
        "10.0.0.0/8",
        "::1",
        "0.0.0.0/1",
        // Host rules naming an address literally are explicit rules too.
        "127.0.0.1:8080",
        "169.254.169.254:80",
        "[::1]",
        "[::1]:443",
    ] {
        let body =
            format!(r#"{{"templateID":"base","timeout":30,"network":{{"allowOut":["{rule}"]}}}}"#);
        let (code, answer) = d.curl("POST", "/v2/sandboxes", Some(&body));
        assert_eq!(code, 400, "allowOut {rule}: {answer}");
    }
    // 4. One-shot runs count against the tenant's sandbox quota.
    let carol = d.tenant("carol", &["--max-sandboxes", "1"]);
    let (code, body) = d.curl_as(
        &carol,
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":30}"#),
    );
    assert_eq!(code, 201, "{body}");
    let carol_id = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, body) = d.curl_as(&carol, "POST", "/v1/run", Some(r#"{"command":["true"]}"#));
    assert_eq!(code, 429, "a run past max-sandboxes: {body}");
    // 5. Concurrent creates do not overrun max-sandboxes.
    let dave = d.tenant("dave", &["--max-sandboxes", "3", "--rate", "1000"]);
    std::thread::scope(|s| {
        for _ in 0..12 {
            s.spawn(|| {
                for _ in 0..3 {
                    d.curl_as(
                        &dave,
                        "POST",
                        "/v2/sandboxes",
                        Some(r#"{"templateID":"base","timeout":30}"#),
                    );
                }
            });
        }
    });
    let (_, list) = d.curl_as(&dave, "GET", "/v2/sandboxes", None);
    let v = json_body(&list);
    let ids: Vec<String> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x["sandboxID"].as_str().map(String::from))
        .collect();
    assert!(
        ids.len() <= 3,
        "{} sandboxes for a tenant allowed 3",
        ids.len()
    );
    // 6. The longest lifetime counts from the creation.
    let erin = d.tenant("erin", &["--max-lifetime", "60s"]);
    let (code, body) = d.curl_as(
        &erin,
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":40}"#),
    );
    assert_eq!(code, 201, "{body}");
    let erin_id = json_body(&body)["sandboxID"]
        .as_str()
        .expect("id")
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let (code, body) = d.curl_as(
        &erin,
        "POST",
        &format!("/sandboxes/{erin_id}/timeout"),
        Some(r#"{"timeout":59}"#),
    );
    assert_eq!(code, 429, "extended past creation + max lifetime: {body}");
    for (key, sid) in [(&d.keys.0, &id), (&carol, &carol_id), (&erin, &erin_id)] {
        d.curl_as(key, "DELETE", &format!("/sandboxes/{sid}"), None);
    }
    for sid in &ids {
        d.curl_as(&dave, "DELETE", &format!("/sandboxes/{sid}"), None);
    }
    drop(d);
    assert_eq!(wait_keepers(m, before), before, "keepers left behind");
}

/// Red team: a tenant removed while its sandboxes live. They end (nobody
/// can reach them any more), and its name is not given to a new tenant,
/// which would otherwise inherit them and their audit history.
#[test]
fn a_removed_tenants_sandboxes_end_and_its_name_is_retired() {
    let _g = serial();
    let m = modes("a_removed_tenants_sandboxes_end_and_its_name_is_retired")[0];
    let before = keepers(m);
    let d = Daemon::new(m, "tenantrm");
    let key = d.tenant("carol", &[]);
    let (code, body) = d.curl_as(
        &key,
        "POST",
        "/sandboxes",
        Some(r#"{"templateID":"base","timeout":300}"#),
    );
    assert_eq!(code, 201, "{body}");
    assert_eq!(wait_keepers(m, before + 1), before + 1);
    let dd = d.data.to_string_lossy().into_owned();
    let o = nc(m, &["tenant", "rm", "carol", "--data", &dd])
        .output()
        .expect("tenant rm");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        wait_keepers(m, before),
        before,
        "a removed tenant's sandbox lives on"
    );
    let o = nc(m, &["tenant", "add", "carol", "--data", &dd])
        .output()
        .expect("tenant add");
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("not reused"),
        "{}",
        text(&o.stderr)
    );
    let (code, _) = d.curl_as(&key, "GET", "/v2/sandboxes", None);
    assert_eq!(code, 401, "the removed tenant's key still works");
}

/// `serve --audit-retention`: records older than the retention are pruned
/// while the daemon runs, newer ones kept, and the chain still verifies.
#[test]
fn audit_retention_prunes_old_records_and_the_chain_verifies() {
    let _g = serial();
    let m = modes("audit_retention_prunes_old_records_and_the_chain_verifies")[0];
    let d = Daemon::with(m, "retention", &["--audit-retention", "3s"]);
    let (code, _) = d.curl("GET", "/v2/sandboxes?probe=old-record", None);
    assert_eq!(code, 200);
    assert!(d
        .audit(&["ls", "--limit", "1000", "--json"])
        .contains("old-record"));
    // Retention runs every 1.5 s: the old record is gone within ~5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut recs = String::new();
    while Instant::now() < deadline {
        let (code, _) = d.curl("GET", "/v2/sandboxes?probe=new-record", None);
        assert_eq!(code, 200);
        recs = d.audit(&["ls", "--limit", "1000", "--json"]);
        if !recs.contains("old-record") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!recs.contains("old-record"), "not pruned: {recs}");
    assert!(
        recs.contains("new-record"),
        "a new record was pruned: {recs}"
    );
    let verify = d.audit(&["verify"]);
    assert!(verify.starts_with("ok"), "{verify}");
    let o = nc(m, &["serve", "--audit-retention", "soon"])
        .output()
        .expect("serve");
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
}

/// Credentials at the boundary through the daemon, driven by the
/// unmodified `e2b` SDK (tests/python/test_e2b_network_rules.py): a sandbox
/// created with `network.rules` (and `allowOut`) as the SDK sends them gets
/// the header added on its requests to a test host, the rules replaced by
/// `update_network`, and never sees a secret; root and rootless.
///
/// The test host is in a network namespace this test makes. Its address
/// is public-class (11.251.N.2, routed to the test's veth only, for the
/// test's duration: nothing leaves the machine), because the daemon's API
/// refuses rules that would open private addresses to its callers; the
/// daemon finds api.test through an /etc/hosts of its own (a private mount
/// namespace) and trusts the test CA through NANOCLAW_UPSTREAM_CA.
#[test]
fn network_rules_from_the_e2b_sdk_reach_the_host_and_never_the_sandbox() {
    let t = "network_rules_from_the_e2b_sdk_reach_the_host_and_never_the_sandbox";
    let _g = serial();
    let Some(venv) = venv("the e2b SDK") else {
        return;
    };
    let Some(mut net) = TestNet::new(t, "ncsd") else {
        return;
    };
    let (h1, h2, h1b, h2b) = (
        "nc-sdk-3c9e1a",
        "77d0b5f2e4",
        "nc-sdk-rot-8a21",
        "c5e9f03b1d",
    );
    let (s1, s2) = (format!("{h1}{h2}"), format!("{h1b}{h2b}"));
    let n = net.n;
    let ip = format!("11.251.{n}.2");
    net.host_addr(&format!("11.251.{n}.1/30"));
    net.ns_addr(&format!("{ip}/30"));
    net.make_certs("nanoclaw-sdk-test-ca", "DNS:api.test,DNS:web.test");
    net.serve(CRED_SERVER, &[("SECRET", &s1), ("SECRET2", &s2)]);
    let hosts = net.dir.join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n::1 localhost\n{ip} api.test web.test\n"),
    )
    .expect("write hosts");
    std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let ca = net.dir.join("ca.pem").display().to_string();
    for m in modes(t) {
        let before = keepers(m);
        let d = Daemon::with_hosts(m, "rules", &hosts, &[("NANOCLAW_UPSTREAM_CA", &ca)]);
        let o = e2b_pytest(
            &venv,
            "tests/python/test_e2b_network_rules.py",
            &d.url(),
            (&d.keys.0, &d.keys.1),
        )
        .env("NANOCLAW_RULES_SECRET", &s1)
        .env("NANOCLAW_RULES_SECRET2", &s2)
        .env("NANOCLAW_RULES_HALVES", format!("{h1}:{h2}:{h1b}:{h2b}"))
        .output()
        .expect("run pytest");
        let out = text(&o.stdout);
        assert!(
            o.status.success(),
            "[{}] the network rules suite failed:\n{out}\n{}",
            m.name,
            text(&o.stderr)
        );
        assert!(
            out.contains("2 passed"),
            "[{}] the suite did not run both tests: {out}",
            m.name
        );
        eprintln!("[{}] {}", m.name, out.lines().last().unwrap_or(""));
        // The test host got the secret (rotated too); the daemon's audit log
        // never holds it.
        let seen = std::fs::read_to_string(net.dir.join("seen.log")).unwrap_or_default();
        assert!(
            seen.contains(" auth-ok ") && seen.contains(" auth-ok2 "),
            "[{}] {seen}",
            m.name
        );
        let all = d.audit(&["ls", "--limit", "1000", "--json"]);
        assert!(
            !all.contains(&s1) && !all.contains(&s2),
            "[{}] the audit log holds a secret",
            m.name
        );
        let _ = std::fs::remove_file(net.dir.join("seen.log"));
        drop(d);
        // At most as many as before (other runs' keepers may end meanwhile).
        let after = wait_keepers(m, before);
        assert!(
            after <= before,
            "[{}] keepers left behind: {after} > {before}",
            m.name
        );
    }
}
