//! Credentials at the boundary (issue 15 item 3, issue 13 item 5): a
//! `network.rules` entry in the config makes nanoclaw's proxy set a header
//! (`Authorization: Bearer ${SECRET}`, the value taken from nanoclaw's own
//! environment) on every request to the ruled host, intercepting its TLS
//! with a CA made for the sandbox; the secret never enters the sandbox.
//!
//! The destination is a test host in a network namespace this test makes
//! (a veth pair from the host's namespace): HTTPS on 443 (a certificate
//! from a test CA, for api.test and web.test) and HTTP on 80, HTTP/1.1 with
//! keep-alive. It logs every request (peer port, path, Host, and whether
//! the Authorization header was the secret) and answers `auth-ok`,
//! `auth-missing` or `auth-wrong` — never the header itself, so that
//! nothing it sends back could carry the secret into the sandbox.
//!
//! Root only (making the test host needs it); each scenario runs as root
//! and rootless (`nanotest`).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The test host's server: `SECRET` in its environment (the host side,
/// never the sandbox's).
const SERVER: &str = r#"
import http.server, socket, socketserver, ssl, sys, threading, os
d = sys.argv[1]
secret = os.environ["SECRET"]
lock = threading.Lock()
class V4(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def answer(self):
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
        auth = self.headers.get_all("Authorization") or []
        if auth == ["Bearer " + secret]:
            verdict = "auth-ok"
        elif not auth:
            verdict = "auth-missing"
        else:
            verdict = "auth-wrong"
        with lock, open(os.path.join(d, "seen.log"), "a") as f:
            f.write("%s %s %s %s %d\n" % (self.client_address[1], self.path,
                    self.headers.get("Host"), verdict, len(body)))
        out = (verdict + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = answer
    do_POST = answer
http_srv = V4(("0.0.0.0", 80), H)
https_srv = V4(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(d, "srv.pem"), os.path.join(d, "srv.key"))
https_srv.socket = ctx.wrap_socket(https_srv.socket, server_side=True)
for s in (http_srv, https_srv):
    threading.Thread(target=s.serve_forever, daemon=True).start()
open(os.path.join(d, "ready"), "w").close()
threading.Event().wait()
"#;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The secret: two halves, so that a script can search for the whole
/// without ever holding it in its command line or environment.
const HALF1: &str = "nc-secret-7f3a9c";
const HALF2: &str = "e21b5d4f80aa";

fn secret() -> String {
    format!("{HALF1}{HALF2}")
}

/// The test host (namespace, veth, server, files; removed on drop).
struct TestHost {
    ns: String,
    dir: PathBuf,
    server: Child,
    v4: String,
}

fn sh(cmd: &str) {
    let o = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("spawn sh");
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

impl TestHost {
    fn start(test: &str) -> Option<TestHost> {
        if !is_root() {
            eprintln!(
                "SKIP {test}: needs root (to make the test host's network namespace and veth)"
            );
            return None;
        }
        let n = (std::process::id() * 11 + NEXT.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
        let ns = format!("nccr{n}");
        let (hv, tv) = (format!("nccrh{n}"), format!("nccrt{n}"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &hv]).output();
        let dir = std::env::temp_dir().join(format!("nanoclaw-cred-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let (v4, host_v4) = (format!("10.252.{n}.2"), format!("10.252.{n}.1"));
        sh(&format!(
            "set -e
ip netns add {ns}
ip link add {hv} type veth peer name {tv}
ip link set {tv} netns {ns}
ip addr add {host_v4}/30 dev {hv}
ip link set {hv} up
ip netns exec {ns} ip link set lo up
ip netns exec {ns} ip addr add {v4}/30 dev {tv}
ip netns exec {ns} ip link set {tv} up"
        ));
        sh(&format!(
            "set -e; cd {}
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=nanoclaw-cred-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=api.test 2>/dev/null
printf 'subjectAltName=DNS:api.test,DNS:web.test\\n' > ext
openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null
chmod 644 ca.pem",
            dir.display()
        ));
        fs::write(dir.join("server.py"), SERVER).expect("write server");
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(dir.join("server.py"))
            .arg(&dir)
            .env("SECRET", secret())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the test host's server");
        let t0 = Instant::now();
        while !dir.join("ready").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{test}: the test host's server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(TestHost {
            ns,
            dir,
            server,
            v4,
        })
    }

    /// A config with a credential rule for api.test (from `$NC_TEST_SECRET`)
    /// and, with `trust_test_ca`, the test CA as the upstream CA.
    fn config(&self, tag: &str, trust_test_ca: bool) -> PathBuf {
        let upstream = if trust_test_ca {
            format!("  upstream_ca: {}\n", self.dir.join("ca.pem").display())
        } else {
            String::new()
        };
        let yaml = format!(
            "agents:
  list:
    - id: cred
      sandbox:
        mode: all
        workspaceAccess: none
network:
{upstream}  rules:
    api.test:
      - transform:
          headers:
            Authorization: \"Bearer ${{NC_TEST_SECRET}}\"
"
        );
        let path = self.dir.join(format!("{tag}.yaml"));
        fs::write(&path, yaml).expect("write config");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    }

    /// The network flags: api.test and web.test, both on the test host.
    fn flags(&self) -> Vec<String> {
        let v4 = &self.v4;
        let mut f: Vec<String> = vec!["--network".into(), "allowlist".into()];
        for name in ["api.test", "web.test"] {
            f.extend([
                "--allow-host".into(),
                name.into(),
                "--add-host".into(),
                format!("{name}:{v4}"),
            ]);
        }
        f.extend(["--allow-cidr".into(), format!("{v4}/32")]);
        f
    }

    /// `peer_port path host verdict body_len` per request the host got.
    fn seen(&self) -> Vec<Vec<String>> {
        fs::read_to_string(self.dir.join("seen.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect()
    }

    fn clear_seen(&self) {
        let _ = fs::remove_file(self.dir.join("seen.log"));
    }

    fn test_ca(&self) -> String {
        fs::read_to_string(self.dir.join("ca.pem")).expect("ca")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `nanoclaw run --json --fresh --config CFG --agent cred FLAGS -- sh -c
/// SCRIPT` with the secret in nanoclaw's environment; the outcome, and
/// nanoclaw's whole stdout + stderr.
fn run_cred(mode: Mode, cfg: &std::path::Path, flags: &[String], script: &str) -> (Value, String) {
    let cfg = cfg.display().to_string();
    let mut a: Vec<&str> = vec![
        "run",
        "--json",
        "--fresh",
        "--timeout",
        "120s",
        "--config",
        &cfg,
        "--agent",
        "cred",
    ];
    a.extend(flags.iter().map(String::as_str));
    a.extend(["--", "sh", "-c", script]);
    let o = nc(mode, &a)
        .env("NC_TEST_SECRET", secret())
        .output()
        .expect("spawn nanoclaw");
    let all = format!("{}{}", text(&o.stdout), text(&o.stderr));
    let v = serde_json::from_str(text(&o.stdout).trim()).unwrap_or_else(|e| {
        panic!(
            "[{}] no JSON ({e}); exit {:?}; stdout {}; stderr {}",
            mode.name,
            o.status,
            text(&o.stdout),
            text(&o.stderr)
        )
    });
    (v, all)
}

/// The value after `label:` on its own line of the output.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label).and_then(|r| r.strip_prefix(':')))
        .unwrap_or("<missing>")
}

fn node_available() -> bool {
    let ok = Command::new("node")
        .args(["-e", "process.exit(typeof fetch === 'function' ? 0 : 1)"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: node with a global fetch (18+) is required (.ci/run installs nodejs)"
        );
        eprintln!("SKIP (node part): no node with fetch on this machine");
    }
    ok
}

fn denial_kinds(v: &Value) -> Vec<String> {
    v["network"]["denials"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d["reason"].as_str().map(str::to_string))
        .collect()
}

/// The search every scenario ends with: the secret (assembled only in a
/// pipe) in no file readable inside the sandbox, no environment and no
/// command line; no private key next to the sandbox's CA; init's memory
/// not readable.
const SEARCH: &str = r#"
pat() { printf '%s%s\n' "$H1" "$H2"; }
pat | grep -r -s -l -F -f /dev/stdin ${SEARCH_ROOTS:-/} --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev | sed 's/^/leak-file:/'
pat | grep -s -l -F -f /dev/stdin /proc/[0-9]*/environ /proc/[0-9]*/cmdline | sed 's/^/leak-proc:/'
env > /tmp/env.txt; pat | grep -c -F -f /dev/stdin /tmp/env.txt | sed 's/^/env-hits:/'
echo "key-in-ca-files:$(cat /etc/nanoclaw/* | grep -c 'PRIVATE KEY')"
echo "init-mem:$(head -c 16 /proc/1/mem >/dev/null 2>&1 && echo readable || echo refused)"
echo "searched:done"
"#;

fn assert_no_leak(m: &str, v: &Value, all: &str) {
    let out = v["stdout"].as_str().unwrap_or("");
    assert_eq!(field(out, "searched"), "done", "[{m}] {v}");
    let leaks: Vec<&str> = out.lines().filter(|l| l.starts_with("leak-")).collect();
    assert!(
        leaks.is_empty(),
        "[{m}] the secret is readable inside the sandbox: {leaks:?}"
    );
    assert_eq!(field(out, "env-hits"), "0", "[{m}] {v}");
    assert_eq!(field(out, "key-in-ca-files"), "0", "[{m}] {v}");
    assert_eq!(field(out, "init-mem"), "refused", "[{m}] {v}");
    // Nor in anything nanoclaw printed (outcome, records, warnings).
    assert!(
        !all.contains(&secret()),
        "[{m}] nanoclaw printed the secret"
    );
}

/// The header reaches the test host on every request (keep-alive
/// included) from curl (through the proxy variables and without them),
/// Python's urllib and Node's fetch, over HTTPS and plain HTTP; the
/// sandbox's placeholder is replaced; the secret is nowhere inside.
#[test]
fn the_host_gets_the_secret_header_and_the_sandbox_never_sees_it() {
    let t = "the_host_gets_the_secret_header_and_the_sandbox_never_sees_it";
    let Some(host) = TestHost::start(t) else {
        return;
    };
    let node = node_available();
    let cfg = host.config("rules", true);
    for mode in modes(t) {
        host.clear_seen();
        let node_part = if node {
            r#"node -e 'fetch("https://api.test/f").then(r => r.text()).then(t => console.log("node:" + t.trim()), e => console.log("node:ERR " + e.cause))'"#
        } else {
            ""
        };
        let script = format!(
            r#"H1={HALF1}; H2={HALF2}
export HOME=/tmp
NOPROXY="env -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u http_proxy -u https_proxy -u all_proxy"
echo "ca:$(openssl x509 -in /etc/nanoclaw/ca.crt -noout -subject)"
echo "curl-proxy:$(curl -s --max-time 10 -H 'Authorization: Bearer placeholder' https://api.test/a https://api.test/b | tr '\n' ' ')"
echo "curl-transparent:$($NOPROXY curl -s --max-time 10 https://api.test/c https://api.test/d | tr '\n' ' ')"
echo "curl-post:$($NOPROXY curl -s --max-time 10 -H 'Transfer-Encoding: chunked' --data-binary hello-chunked-body https://api.test/p)"
python3 -c 'import urllib.request; print("python:" + urllib.request.urlopen("https://api.test/e", timeout=10).read().decode().strip())'
{node_part}
echo "http-proxy:$(curl -s --max-time 10 http://api.test/g)"
echo "http-transparent:$($NOPROXY curl -s --max-time 10 http://api.test/h)"
{SEARCH}"#
        );
        let (v, all) = run_cred(mode, &cfg, &host.flags(), &script);
        let m = mode.name;
        let out = v["stdout"].as_str().unwrap_or("");
        assert!(field(out, "ca").contains("nanoclaw sandbox"), "[{m}] {v}");
        assert_eq!(field(out, "curl-proxy"), "auth-ok auth-ok ", "[{m}] {v}");
        assert_eq!(
            field(out, "curl-transparent"),
            "auth-ok auth-ok ",
            "[{m}] {v}"
        );
        assert_eq!(field(out, "curl-post"), "auth-ok", "[{m}] {v}");
        assert_eq!(field(out, "python"), "auth-ok", "[{m}] {v}");
        if node {
            assert_eq!(field(out, "node"), "auth-ok", "[{m}] {v}");
        }
        assert_eq!(field(out, "http-proxy"), "auth-ok", "[{m}] {v}");
        assert_eq!(field(out, "http-transparent"), "auth-ok", "[{m}] {v}");
        // Keep-alive: both requests of one curl came on one connection, and
        // both carried the secret.
        let seen = host.seen();
        for (a, b) in [("/a", "/b"), ("/c", "/d")] {
            let port = |p: &str| {
                seen.iter()
                    .find(|l| l[1] == p)
                    .map(|l| (l[0].clone(), l[3].clone()))
                    .unwrap_or_else(|| panic!("[{m}] the host never got {p}: {seen:?}"))
            };
            let (pa, va) = port(a);
            let (pb, vb) = port(b);
            assert_eq!(
                pa, pb,
                "[{m}] {a} and {b} on different connections: {seen:?}"
            );
            assert_eq!((va.as_str(), vb.as_str()), ("auth-ok", "auth-ok"), "[{m}]");
        }
        let post = seen.iter().find(|l| l[1] == "/p").expect("post seen");
        assert_eq!(
            post[4], "18",
            "[{m}] the chunked body forwarded whole: {seen:?}"
        );
        assert!(
            v["network"]["intercepted"].as_u64().unwrap_or(0) >= 8,
            "[{m}] {v}"
        );
        assert_no_leak(m, &v, &all);
    }
}

/// A host without rules is not intercepted (the client sees the test
/// host's own certificate, and no header is added); a request whose `Host`
/// names another host than the intercepted connection's SNI is refused
/// (domain fronting), on the first request of a connection and on a later
/// one.
#[test]
fn hosts_without_rules_pass_untouched_and_fronting_is_refused() {
    let t = "hosts_without_rules_pass_untouched_and_fronting_is_refused";
    let Some(host) = TestHost::start(t) else {
        return;
    };
    let cfg = host.config("fronting", true);
    let front = r#"
import http.client, ssl
c = http.client.HTTPSConnection("api.test", 443, context=ssl.create_default_context(), timeout=10)
c.request("GET", "/front1"); r = c.getresponse(); print("front1:%d %s" % (r.status, r.read().decode().strip()))
try:
    c.request("GET", "/front2", headers={"Host": "web.test"}); r = c.getresponse(); print("front2:%d" % r.status)
except Exception as e:
    print("front2:ERR %s" % e)
"#;
    for mode in modes(t) {
        host.clear_seen();
        let script = format!(
            r#"H1={HALF1}; H2={HALF2}
export HOME=/tmp
cat > /tmp/testca.pem <<'EOF'
{ca}EOF
issuer() {{ echo | openssl s_client -connect "$1:443" -servername "$1" 2>/dev/null | openssl x509 -noout -issuer; }}
echo "web-issuer:$(issuer web.test)"
echo "api-issuer:$(issuer api.test)"
echo "web:$(curl -s --max-time 10 --cacert /tmp/testca.pem https://web.test/w)"
echo "front-curl:$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 -H 'Host: web.test' https://api.test/front3)"
python3 -c '{front}'
SEARCH_ROOTS="/etc /tmp /home /root /run /var"
{SEARCH}"#,
            ca = host.test_ca()
        );
        let (v, all) = run_cred(mode, &cfg, &host.flags(), &script);
        let m = mode.name;
        let out = v["stdout"].as_str().unwrap_or("");
        assert!(
            field(out, "web-issuer").contains("nanoclaw-cred-test-ca"),
            "[{m}] web.test has no rule: its own certificate must reach the client: {v}"
        );
        assert!(
            field(out, "api-issuer").contains("nanoclaw sandbox"),
            "[{m}] {v}"
        );
        assert_eq!(field(out, "web"), "auth-missing", "[{m}] {v}");
        assert_eq!(field(out, "front-curl"), "421", "[{m}] {v}");
        assert_eq!(field(out, "front1"), "200 auth-ok", "[{m}] {v}");
        assert_eq!(field(out, "front2"), "421", "[{m}] {v}");
        let seen = host.seen();
        assert!(
            !seen
                .iter()
                .any(|l| l[1].starts_with("/front2") || l[1].starts_with("/front3")),
            "[{m}] a fronted request reached the host: {seen:?}"
        );
        assert!(
            !seen.iter().any(|l| l[2] == "web.test" && l[3] == "auth-ok"),
            "[{m}] web.test got the secret: {seen:?}"
        );
        let kinds = denial_kinds(&v);
        assert!(
            kinds.iter().filter(|k| *k == "domain_fronting").count() >= 2,
            "[{m}] {kinds:?}"
        );
        assert_no_leak(m, &v, &all);
    }
}

/// The intercepted host's certificate is verified against the host's real
/// trust store: without the operator's extra CA the test host is not
/// trusted, the request fails with 502, the host gets nothing and the
/// refusal is recorded.
#[test]
fn an_untrusted_upstream_gets_no_request() {
    let t = "an_untrusted_upstream_gets_no_request";
    let Some(host) = TestHost::start(t) else {
        return;
    };
    let cfg = host.config("untrusted", false);
    for mode in modes(t) {
        host.clear_seen();
        let script = "echo \"code:$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 https://api.test/u)\"";
        let (v, all) = run_cred(mode, &cfg, &host.flags(), script);
        let m = mode.name;
        let out = v["stdout"].as_str().unwrap_or("");
        assert_eq!(field(out, "code"), "502", "[{m}] {v}");
        assert!(host.seen().is_empty(), "[{m}] {:?}", host.seen());
        assert!(
            denial_kinds(&v).iter().any(|k| k == "interception"),
            "[{m}] {v}"
        );
        assert!(!all.contains(&secret()), "[{m}]");
    }
}
