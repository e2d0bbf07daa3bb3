//! Allowlisted egress for the gVisor and Docker backends (issue 16, items 2
//! and 3), tested by attack: a program that ignores proxy variables (Python
//! sockets, with every proxy variable unset) reaches an allowed test host
//! by name; a name no rule allows gets no DNS answer; a direct connection
//! to the address of a host no rule allows, and to an unlisted port of the
//! allowed one, fails — and the test host's own log shows that nothing
//! reached it. Afterwards nothing of the sandbox is left (runsc state and
//! processes, the container, a host nftables table).
//!
//! The test host is a network namespace this test makes (a veth from the
//! host's namespace, where nanoclaw's proxy runs; 10.253.N.0/29), serving
//! a line service on ports 7000 and 8080 on two addresses; no traffic
//! leaves the machine. Root only (making the test host needs it); the
//! backends are required in CI (`NANOCLAW_REQUIRE_GVISOR=1`,
//! `NANOCLAW_REQUIRE_DOCKER=1`) and skipped with a message elsewhere.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{is_root, nc, text, Mode};
use serde_json::Value;

const ROOT: Mode = Mode {
    name: "root",
    user: None,
};

/// The Docker image the Docker backend's tests use (python3, busybox).
const IMAGE: &str = "nanoclaw-docker-test:latest";

/// One scenario at a time (each makes a test host and counts what is
/// left).
static SERIAL: Mutex<()> = Mutex::new(());

/// The test host's server: a line service on 7000 ("raw-hello <line>") and
/// 8080 ("unlisted <line>") on every address; every connection logged as
/// `local_ip local_port` to hits.log.
const SERVER: &str = common::testnet::LINE_SERVER;

/// What runs in the sandbox: every proxy variable unset, then Python's
/// own sockets and resolver. One line per probe: `D name address|refused`,
/// `R host port reply` or `E host port error`.
fn probe_script(other: &str) -> String {
    format!(
        "unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY http_proxy https_proxy all_proxy no_proxy
exec python3 - <<'EOF'
import os, socket
assert not any(k.lower().endswith('_proxy') for k in os.environ), os.environ
def dns(n):
    try:
        print('D', n, socket.getaddrinfo(n, 7000, socket.AF_INET)[0][4][0])
    except OSError as e:
        print('D', n, 'refused', type(e).__name__)
def conn(h, p):
    try:
        s = socket.create_connection((h, p), timeout=10)
        s.sendall(b'probe\\n')
        print('R', h, p, s.recv(100).decode().strip())
    except OSError as e:
        print('E', h, p, type(e).__name__)
dns('web.test')
dns('denied.test')
conn('web.test', 7000)
conn('{other}', 7000)
conn('web.test', 8080)
EOF"
    )
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A test host in its own network namespace, reachable from the host's
/// namespace over a veth pair; removed (namespace, veth, files, server)
/// on drop.
struct TestHost {
    ns: String,
    dir: PathBuf,
    server: Child,
    /// The allowed address, and a second one no rule allows.
    v4: String,
    other: String,
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
    fn start() -> TestHost {
        let n = (std::process::id() * 7 + NEXT.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
        let ns = format!("ncebk{n}");
        let (hv, tv) = (format!("ncebh{n}"), format!("ncebt{n}"));
        // Leftovers of an earlier, killed run with the same number.
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &hv]).output();
        let dir = std::env::temp_dir().join(format!("nanoclaw-egbk-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let (v4, other, host) = (
            format!("10.253.{n}.2"),
            format!("10.253.{n}.3"),
            format!("10.253.{n}.1"),
        );
        sh(&format!(
            "set -e
ip netns add {ns}
ip link add {hv} type veth peer name {tv}
ip link set {tv} netns {ns}
ip addr add {host}/29 dev {hv}
ip link set {hv} up
ip netns exec {ns} ip link set lo up
ip netns exec {ns} ip addr add {v4}/29 dev {tv}
ip netns exec {ns} ip addr add {other}/29 dev {tv}
ip netns exec {ns} ip link set {tv} up"
        ));
        fs::write(dir.join("server.py"), SERVER).expect("write server");
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(dir.join("server.py"))
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the test host's server");
        let t0 = Instant::now();
        while !dir.join("ready").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the test host's server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TestHost {
            ns,
            dir,
            server,
            v4,
            other,
        }
    }

    /// web.test allowed on 7000 (by name, plus the explicit rule its
    /// private address needs); denied.test has an address but no rule.
    fn flags(&self) -> Vec<String> {
        [
            "--network",
            "allowlist",
            "--allow-host",
            "web.test:7000",
            "--add-host",
            &format!("web.test:{}", self.v4),
            "--allow-cidr",
            &format!("{}/32:7000", self.v4),
            "--add-host",
            &format!("denied.test:{}", self.other),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `local_ip local_port` of every connection the test host got.
    fn hits(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("hits.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
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

/// Runs the probes in a sandbox of `backend_flags` and checks every attack
/// failed and the allowed host answered. Returns the outcome.
fn scenario(test: &str, backend_flags: &[&str]) -> Value {
    let host = TestHost::start();
    let mut args: Vec<String> = ["run", "--json", "--timeout", "60s"]
        .iter()
        .chain(backend_flags)
        .map(|s| s.to_string())
        .collect();
    args.extend(host.flags());
    args.extend([
        "--".into(),
        "sh".into(),
        "-c".into(),
        probe_script(&host.other),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = nc(ROOT, &argv).output().expect("nanoclaw run");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{test}: no JSON outcome ({e}); exit {:?}; stdout {}; stderr {}",
            o.status,
            text(&o.stdout),
            text(&o.stderr)
        )
    });
    let out = v["stdout"].as_str().unwrap_or_default().to_string();
    let diag = format!(
        "{test}: stdout:\n{out}\nstderr: {}\nnetwork: {}",
        v["stderr"].as_str().unwrap_or_default(),
        v["network"]
    );
    assert_eq!(v["exit_code"], 0, "{diag}");
    // The attacks first (so that, with a defence removed, the failure
    // names the attack that got through), then the allowed host.
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or("<missing>")
            .to_string()
    };
    // A name no rule allows: no answer.
    assert!(
        line("D denied.test ").starts_with("D denied.test refused"),
        "denied.test resolved: {diag}"
    );
    // The denied host's address, directly: refused.
    assert!(
        line(&format!("E {} 7000", host.other)).starts_with('E'),
        "direct IP to a denied host connected: {diag}"
    );
    // The allowed host on an unlisted port: refused.
    assert!(
        line("E web.test 8080").starts_with('E'),
        "an unlisted port connected: {diag}"
    );
    // The allowed host, by name, without proxy variables.
    assert_eq!(
        line("D web.test "),
        format!("D web.test {}", host.v4),
        "{diag}"
    );
    assert_eq!(
        line("R web.test 7000") + &line("E web.test 7000"),
        "R web.test 7000 raw-hello probe<missing>",
        "{diag}"
    );
    // The test host itself saw only the allowed connection.
    let hits = host.hits();
    assert_eq!(
        hits,
        vec![format!("{} 7000", host.v4)],
        "the test host was reached by more than the allowed connection: {diag}"
    );
    // The refusals are recorded, with their reasons.
    let refused: Vec<&Value> = v["network"]["connections"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["allowed"] == false).collect())
        .unwrap_or_default();
    assert!(
        refused.iter().any(|c| c["address"] == host.other.as_str()),
        "no refusal recorded for {}: {diag}",
        host.other
    );
    assert!(
        refused.iter().any(|c| c["port"] == 8080),
        "no refusal recorded for port 8080: {diag}"
    );
    v
}

/// No host nftables table of nanoclaw's, and no process naming `id`.
fn nothing_left(id: &str) {
    let t = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    assert!(
        !t.lines().any(|l| l.contains(id)),
        "a host nftables table of {id} is left: {t}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| text(&c).replace('\0', " "))
            .filter(|c| c.contains(id))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of sandbox {id} are left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runsc_here(test: &str) -> bool {
    let found = Command::new("runsc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_GVISOR").as_deref() != Ok("1"),
            "{test}: NANOCLAW_REQUIRE_GVISOR=1 but runsc is not installed"
        );
        eprintln!("SKIPPED {test}: runsc is not installed");
    }
    found
}

fn docker_here(test: &str) -> bool {
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = if !ok {
        Some("no Docker daemon answers (`docker info` fails)".to_string())
    } else {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/build-docker-test-image.sh");
        match Command::new(&script).arg(IMAGE).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("{} failed: {}", script.display(), text(&o.stderr))),
            Err(e) => Some(format!("{}: {e}", script.display())),
        }
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "{test}: NANOCLAW_REQUIRE_DOCKER=1 but {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

fn root_or_skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIP {test}: needs root (to make the test host's network namespace and veth)");
    }
    is_root()
}

#[test]
fn gvisor_allowlist_holds_for_programs_that_ignore_proxy_variables() {
    let test = "gvisor_allowlist_holds_for_programs_that_ignore_proxy_variables";
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip(test) || !runsc_here(test) {
        return;
    }
    let v = scenario(test, &["--backend", "gvisor"]);
    assert_eq!(v["network"]["mode"], "allowlist");
    let id = v["sandbox_id"].as_str().expect("sandbox id").to_string();
    assert!(id.starts_with("gv-"), "{id}");
    nothing_left(&id);
    let bundle = Path::new("/run/nanoclaw/gvisor").join(&id);
    assert!(!bundle.exists(), "{} is left", bundle.display());
    let listed = Command::new("runsc")
        .args(["--root=/run/nanoclaw/gvisor/runsc", "list"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    assert!(!listed.contains(&id), "runsc still knows {id}: {listed}");
}

#[test]
fn docker_allowlist_holds_for_programs_that_ignore_proxy_variables() {
    let test = "docker_allowlist_holds_for_programs_that_ignore_proxy_variables";
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip(test) || !docker_here(test) {
        return;
    }
    let v = scenario(test, &["--backend", "docker", "--image", IMAGE]);
    assert_eq!(v["network"]["mode"], "allowlist");
    let id = v["sandbox_id"].as_str().expect("sandbox id").to_string();
    nothing_left(&id);
    let o = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=nanoclaw.id={id}")])
        .output()
        .expect("docker ps");
    assert!(o.stdout.is_empty(), "the container of {id} is left");
}

/// What the backends cannot do with egress is refused by name, with exit
/// 125: a detached sandbox (its proxy would die with its maker), rootless
/// gVisor, credential rules, NET_ADMIN.
#[test]
fn egress_the_backends_cannot_honour_is_refused_by_name() {
    let test = "egress_the_backends_cannot_honour_is_refused_by_name";
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !is_root() {
        eprintln!("SKIP {test}: root only");
        return;
    }
    let allow = ["--network", "allowlist", "--allow-host", "example.com"];
    let mut cases: Vec<(Vec<&str>, &str, Option<Mode>)> = Vec::new();
    let gv = runsc_here(test);
    let dk = docker_here(test);
    if gv {
        cases.push((
            [&["sandbox", "create", "--backend", "gvisor"][..], &allow].concat(),
            "--backend gvisor: --network allowlist for a detached sandbox is not supported",
            None,
        ));
        cases.push((
            [
                &["run", "--backend", "gvisor", "--cap-add", "NET_ADMIN"][..],
                &allow,
                &["--", "true"],
            ]
            .concat(),
            "--backend gvisor: --cap-add NET_ADMIN with --network allowlist/open is not supported",
            None,
        ));
        if let Some(u) = common::rootless_user() {
            cases.push((
                [&["run", "--backend", "gvisor"][..], &allow, &["--", "true"]].concat(),
                "--backend gvisor: --network allowlist is not supported: rootless runsc",
                Some(Mode {
                    name: "rootless",
                    user: Some(u),
                }),
            ));
        }
    }
    if dk {
        cases.push((
            [
                &["sandbox", "create", "--backend", "docker", "--image", IMAGE][..],
                &allow,
            ]
            .concat(),
            "--backend docker: --network allowlist for a detached sandbox is not supported",
            None,
        ));
    }
    for (args, want, mode) in cases {
        let o = nc(mode.unwrap_or(ROOT), &args).output().expect("nanoclaw");
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
}
