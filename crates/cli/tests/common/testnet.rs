//! A test host in a network namespace the test makes: a veth pair from the
//! host's namespace (where nanoclaw's proxy runs) into it, the addresses a
//! test gives each end, a test CA with a server certificate, and a server
//! started inside it. Everything (server, namespace, veth, files) is
//! removed on drop. No traffic leaves this machine: the addresses are
//! routed only to the veth.
//!
//! Root only (making a namespace and a veth needs it).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{is_root, text};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A credential test host's server (Python): HTTPS on 443 with `srv.pem`
/// (HTTP/1.1, keep-alive) and HTTP on 80. `SECRET` (and optionally
/// `SECRET2`) in its environment — the host side, never the sandbox's. It
/// logs every request as `peer_port path host verdict body_len` to
/// `seen.log` and answers `auth-ok` (`Authorization: Bearer $SECRET`),
/// `auth-ok2` (`$SECRET2`), `auth-missing` or `auth-wrong` — never the
/// header itself, so that nothing it sends back could carry the secret
/// into the sandbox.
pub const CRED_SERVER: &str = r#"
import http.server, socket, socketserver, ssl, sys, threading, os
d = sys.argv[1]
secret = os.environ["SECRET"]
secret2 = os.environ.get("SECRET2")
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
        elif secret2 and auth == ["Bearer " + secret2]:
            verdict = "auth-ok2"
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

/// A plain test host's server (Python): a line service on every address,
/// port 7000 (answers "raw-hello <line>") and 8080 ("unlisted <line>");
/// every connection logged as `local_ip local_port` to `hits.log`.
pub const LINE_SERVER: &str = r#"
import socket, sys, threading, os
d = sys.argv[1]
lock = threading.Lock()
def serve(port, greet):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port)); l.listen(64)
    while True:
        c, _ = l.accept()
        with lock, open(os.path.join(d, "hits.log"), "a") as f:
            a = c.getsockname()
            f.write("%s %s\n" % (a[0], a[1]))
        def one(c=c):
            try:
                c.settimeout(5)
                c.sendall(greet + c.recv(100))
            except OSError:
                pass
            c.close()
        threading.Thread(target=one, daemon=True).start()
for p, g in [(7000, b"raw-hello "), (8080, b"unlisted ")]:
    threading.Thread(target=serve, args=(p, g), daemon=True).start()
open(os.path.join(d, "ready"), "w").close()
threading.Event().wait()
"#;

/// Runs `cmd` with `sh -c`; panics with its output when it fails.
pub fn sh(cmd: &str) {
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

/// A network namespace with a veth pair from the host's namespace, a
/// folder for its files, and (once started) a server in it.
pub struct TestNet {
    /// The namespace's name.
    pub ns: String,
    /// The host's end of the veth.
    pub host_if: String,
    /// The namespace's end.
    pub ns_if: String,
    /// A number in 1..=250 for this test host (for its addresses).
    pub n: u32,
    /// Its files (world-readable: rootless runs read the CA).
    pub dir: PathBuf,
    server: Option<Child>,
}

impl TestNet {
    /// A namespace `<tag><n>` with the veth up (no addresses yet); `None`
    /// after a SKIP line naming `test` when not root. `tag` is at most 5
    /// characters (interface names are at most 15).
    pub fn new(test: &str, tag: &str) -> Option<TestNet> {
        if !is_root() {
            eprintln!(
                "SKIP {test}: needs root (to make the test host's network namespace and veth)"
            );
            return None;
        }
        let salt = tag.bytes().map(u32::from).sum::<u32>();
        let n = (std::process::id() * 7 + salt + NEXT.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
        let ns = format!("{tag}{n}");
        let (host_if, ns_if) = (format!("{tag}h{n}"), format!("{tag}t{n}"));
        // Leftovers of an earlier, killed run with the same number.
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let dir = std::env::temp_dir().join(format!("nanoclaw-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        sh(&format!(
            "set -e
ip netns add {ns}
ip link add {host_if} type veth peer name {ns_if}
ip link set {ns_if} netns {ns}
ip link set {host_if} up
ip netns exec {ns} ip link set lo up
ip netns exec {ns} ip link set {ns_if} up"
        ));
        Some(TestNet {
            ns,
            host_if,
            ns_if,
            n,
            dir,
            server: None,
        })
    }

    /// Adds `addr` (`10.0.0.1/30`, `fd00::1/64`) to the host's end.
    pub fn host_addr(&self, addr: &str) {
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        sh(&format!("ip addr add {addr} dev {}{nodad}", self.host_if));
    }

    /// Adds `addr` to the namespace's end.
    pub fn ns_addr(&self, addr: &str) {
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        sh(&format!(
            "ip netns exec {} ip addr add {addr} dev {}{nodad}",
            self.ns, self.ns_if
        ));
    }

    /// Makes a test CA (`ca.pem`, common name `ca_cn`) and a server
    /// certificate signed by it (`srv.pem`, `srv.key`) for `san`
    /// (`DNS:web.test,IP:10.0.0.2`).
    pub fn make_certs(&self, ca_cn: &str, san: &str) {
        sh(&format!(
            "set -e; cd {}
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN={ca_cn} 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=test-host 2>/dev/null
printf 'subjectAltName={san}\\n' > ext
openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null
chmod 644 ca.pem",
            self.dir.display()
        ));
    }

    /// The test CA (PEM).
    pub fn ca_pem(&self) -> String {
        fs::read_to_string(self.dir.join("ca.pem")).expect("the test CA")
    }

    /// Starts `script` (Python, given the folder as its argument, with
    /// `env`) inside the namespace and waits until it has written `ready`
    /// into the folder.
    pub fn serve(&mut self, script: &str, env: &[(&str, &str)]) {
        fs::write(self.dir.join("server.py"), script).expect("write server");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "python3"])
            .arg(self.dir.join("server.py"))
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            c.env(k, v);
        }
        self.server = Some(c.spawn().expect("start the test host's server"));
        let t0 = Instant::now();
        while !self.dir.join("ready").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the test host's server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
