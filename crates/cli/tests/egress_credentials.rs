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
use std::process::Command;

use common::testnet::{TestNet, CRED_SERVER};
use common::*;
use serde_json::Value;

/// The secret: two halves, so that a script can search for the whole
/// without ever holding it in its command line or environment.
const HALF1: &str = "nc-secret-7f3a9c";
const HALF2: &str = "e21b5d4f80aa";

fn secret() -> String {
    format!("{HALF1}{HALF2}")
}

/// A rotated secret (a live update's).
fn secret2() -> String {
    format!("{HALF1}-rotated-{HALF2}")
}

/// The test host ([`TestNet`] with the credential server: HTTPS for
/// api.test and web.test, HTTP).
struct TestHost {
    net: TestNet,
    v4: String,
}

impl TestHost {
    fn start(test: &str) -> Option<TestHost> {
        let mut net = TestNet::new(test, "nccr")?;
        let n = net.n;
        let v4 = format!("10.252.{n}.2");
        net.host_addr(&format!("10.252.{n}.1/30"));
        net.ns_addr(&format!("{v4}/30"));
        net.make_certs("nanoclaw-cred-test-ca", "DNS:api.test,DNS:web.test");
        net.serve(
            CRED_SERVER,
            &[("SECRET", &secret()), ("SECRET2", &secret2())],
        );
        Some(TestHost { net, v4 })
    }

    /// A config with a credential rule for api.test (from `$NC_TEST_SECRET`)
    /// and, with `trust_test_ca`, the test CA as the upstream CA.
    fn config(&self, tag: &str, trust_test_ca: bool) -> PathBuf {
        let upstream = if trust_test_ca {
            format!("  upstream_ca: {}\n", self.net.dir.join("ca.pem").display())
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
        let path = self.net.dir.join(format!("{tag}.yaml"));
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
        fs::read_to_string(self.net.dir.join("seen.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect()
    }

    fn clear_seen(&self) {
        let _ = fs::remove_file(self.net.dir.join("seen.log"));
    }

    fn test_ca(&self) -> String {
        self.net.ca_pem()
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

/// A sandbox created for a test, removed on drop.
struct LiveSandbox {
    mode: Mode,
    id: String,
}

impl Drop for LiveSandbox {
    fn drop(&mut self) {
        let _ = run(self.mode, &["sandbox", "rm", "--force", &self.id]);
    }
}

/// `nanoclaw ARGS` as `mode` with both secrets in nanoclaw's environment:
/// (exit code, stdout, stderr).
fn nc_secret(mode: Mode, args: &[String]) -> (i32, String, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = nc(mode, &a)
        .env("NC_TEST_SECRET", secret())
        .env("NC_TEST_SECRET2", secret2())
        .output()
        .expect("spawn nanoclaw");
    (code(&o), text(&o.stdout), text(&o.stderr))
}

/// The keep-alive client: one HTTPS connection to api.test (trusting the
/// sandbox's CA through the default bundle), a first request, then — once
/// /tmp/go exists — a second one on the same connection.
const KEEPALIVE: &str = r#"cat > /tmp/ka.py <<'PY'
import http.client, os, ssl, time
log = open("/tmp/ka.log", "a", buffering=1)
c = http.client.HTTPSConnection("api.test", 443, context=ssl.create_default_context(), timeout=30)
c.request("GET", "/ka1"); log.write("r1:" + c.getresponse().read().decode().strip() + "\n")
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
try:
    c.request("GET", "/ka2"); log.write("r2:" + c.getresponse().read().decode().strip() + "\n")
except Exception as e:
    log.write("r2:ERR %s\n" % e)
PY
env -u HTTPS_PROXY -u https_proxy python3 /tmp/ka.py </dev/null >/dev/null 2>&1 &
echo started"#;

/// A live update (`nanoclaw sandbox network ID --rule/--no-rules`)
/// replaces the credential rules of a running sandbox: a rotated token
/// reaches the host, a removed rule stops being applied — on a connection
/// opened before the update too — and the host is then no longer
/// intercepted; a rule for a domain the sandbox's CA was not made for, or
/// rules for a sandbox created without any, are one clear error that
/// changes nothing; no secret is ever visible inside or printed.
#[test]
fn live_updates_rotate_and_remove_credentials() {
    let t = "live_updates_rotate_and_remove_credentials";
    let Some(host) = TestHost::start(t) else {
        return;
    };
    let cfg = host.config("live", true);
    // The policy part of every update: the same hosts as at creation.
    let v4 = &host.v4;
    let policy: Vec<String> = [
        "--allow-host",
        "api.test",
        "--allow-host",
        "web.test",
        "--allow-cidr",
        &format!("{v4}/32"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for mode in modes(t) {
        let m = mode.name;
        host.clear_seen();
        let mut a: Vec<String> = ["sandbox", "create", "--config"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(cfg.display().to_string());
        a.extend(["--agent".into(), "cred".into()]);
        a.extend(host.flags());
        let (c, out, err) = nc_secret(mode, &a);
        assert_eq!(c, 0, "[{m}] create: {err}");
        let sb = LiveSandbox {
            mode,
            id: out.trim().to_string(),
        };
        let exec = |script: &str| -> String {
            let s = format!(
                "export HOME=/tmp; NOPROXY=\"env -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u http_proxy -u https_proxy -u all_proxy\"\n{script}"
            );
            let (_, out, _) = nc_secret(
                mode,
                &[
                    "exec".into(),
                    sb.id.clone(),
                    "--".into(),
                    "sh".into(),
                    "-c".into(),
                    s,
                ],
            );
            out
        };
        let verdict = || exec("echo \"v:$($NOPROXY curl -s -k --max-time 10 https://api.test/v)\"");
        let update = |extra: &[&str]| -> (i32, String, String) {
            let mut a = vec!["sandbox".to_string(), "network".into(), sb.id.clone()];
            a.extend(policy.iter().cloned());
            a.extend(extra.iter().map(|s| s.to_string()));
            nc_secret(mode, &a)
        };
        let wait_log = |needle: &str| -> String {
            let t0 = std::time::Instant::now();
            loop {
                let log = exec("cat /tmp/ka.log 2>/dev/null");
                if log.contains(needle) || t0.elapsed() > std::time::Duration::from_secs(20) {
                    return log;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        };
        assert_eq!(field(&verdict(), "v"), "auth-ok", "[{m}]");

        // Rotation: the new token from nanoclaw's environment.
        let (c, out, err) = update(&["--rule", "api.test:Authorization=Bearer ${NC_TEST_SECRET2}"]);
        assert_eq!(c, 0, "[{m}] {err}");
        assert!(out.contains("rule: api.test: Authorization"), "[{m}] {out}");
        assert!(
            !out.contains(HALF1) && !err.contains(HALF1),
            "[{m}] the update printed the secret"
        );
        assert_eq!(field(&verdict(), "v"), "auth-ok2", "[{m}]");

        // Refused, changing nothing: a domain outside the CA's constraints.
        let (c, _, err) = update(&["--rule", "web.test:Authorization=Bearer x"]);
        assert_eq!(c, 125, "[{m}] {err}");
        assert!(
            err.contains("covers only api.test") && err.trim().lines().count() == 1,
            "[{m}] {err}"
        );
        assert_eq!(field(&verdict(), "v"), "auth-ok2", "[{m}]");

        // Removal, with a connection open from before it.
        assert!(exec(KEEPALIVE).contains("started"), "[{m}]");
        let log = wait_log("r1:");
        assert_eq!(field(&log, "r1"), "auth-ok2", "[{m}] {log}");
        let (c, out, err) = update(&["--no-rules"]);
        assert_eq!(c, 0, "[{m}] {err}");
        assert!(!out.contains("rule:"), "[{m}] {out}");
        exec("touch /tmp/go");
        let log = wait_log("r2:");
        assert_eq!(
            field(&log, "r2"),
            "auth-missing",
            "[{m}] a removed rule still applied on an open connection: {log}"
        );
        let seen = host.seen();
        let port = |p: &str| seen.iter().find(|l| l[1] == p).map(|l| l[0].clone());
        assert!(
            port("/ka1").is_some() && port("/ka1") == port("/ka2"),
            "[{m}] the two requests were not on one connection: {seen:?}"
        );
        // New connections are not intercepted any more: the test host's own
        // certificate reaches the client.
        let out = exec(
            "echo \"issuer:$(echo | $NOPROXY openssl s_client -connect api.test:443 -servername api.test 2>/dev/null | openssl x509 -noout -issuer)\"",
        );
        assert!(
            field(&out, "issuer").contains("nanoclaw-cred-test-ca"),
            "[{m}] {out}"
        );
        assert_eq!(field(&verdict(), "v"), "auth-missing", "[{m}]");

        // And back: the CA still covers api.test.
        let (c, _, err) = update(&["--rule", "api.test:Authorization=Bearer ${NC_TEST_SECRET}"]);
        assert_eq!(c, 0, "[{m}] {err}");
        assert_eq!(field(&verdict(), "v"), "auth-ok", "[{m}]");

        // Neither secret anywhere inside.
        for (h1, h2) in [
            (HALF1.to_string(), HALF2.to_string()),
            (format!("{HALF1}-rotated-"), HALF2.to_string()),
        ] {
            let out = exec(&format!(
                "H1={h1}; H2={h2}\nSEARCH_ROOTS=\"/etc /tmp /home /root /run /var\"\n{SEARCH}"
            ));
            let v = serde_json::json!({ "stdout": out });
            assert_no_leak(m, &v, "");
        }

        // A sandbox made without rules has no CA to intercept with.
        let mut a: Vec<String> = vec!["sandbox".into(), "create".into()];
        a.extend(host.flags());
        let (c, out, err) = nc_secret(mode, &a);
        assert_eq!(c, 0, "[{m}] {err}");
        let plain = LiveSandbox {
            mode,
            id: out.trim().to_string(),
        };
        let (c, _, err) = nc_secret(
            mode,
            &[
                "sandbox".into(),
                "network".into(),
                plain.id.clone(),
                "--rule".into(),
                "api.test:X-Key=v".into(),
            ],
        );
        assert_eq!(c, 125, "[{m}] {err}");
        assert!(
            err.contains("created without credential rules") && err.trim().lines().count() == 1,
            "[{m}] {err}"
        );
        // The policy is unchanged.
        let (_, shown, _) = nc_secret(
            mode,
            &["sandbox".into(), "network".into(), plain.id.clone()],
        );
        assert!(shown.contains("allow-host: web.test"), "[{m}] {shown}");
    }
}
