//! `nanoclaw serve` with templates on other backends (`--template
//! NAME=docker:IMAGE`, `--template NAME=gvisor`): sandboxes of native,
//! Docker and gVisor side by side, driven by the unmodified `e2b` SDK
//! (tests/python/test_serve_backends.py: commands, files, processes,
//! isolation, the backend each reports, refusals); then the daemon's own
//! duties for them: audit records, quotas, the timeout that removes them,
//! and the sweep at the next start after a `kill -9`. Nothing is left
//! behind: no container, no runsc state, no bundle.
//!
//! The E2B network options for those sandboxes
//! (tests/python/test_serve_backends_egress.py) are tested by attack
//! against a test host in a network namespace made here (see
//! [`e2b_network_options_hold_in_docker_and_gvisor_sandboxes`]).
//!
//! A micro-VM template (`--template vm=microvm`) is driven by the same SDK
//! in [`the_e2b_sdk_drives_a_microvm_template`].
//!
//! Root only (Docker's socket, rootful runsc, the micro-VM's virtiofsd).
//! Docker is required under NANOCLAW_REQUIRE_DOCKER=1, runsc under
//! NANOCLAW_REQUIRE_GVISOR=1, the micro-VM backend under
//! NANOCLAW_REQUIRE_MICROVM=1; each is skipped with a message otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::testnet::TestNet;
use common::{e2b_pytest, free_port, is_root, repo, text, venv, wait_listening};

const BIN: &str = env!("CARGO_BIN_EXE_nanoclaw");
/// The Docker image the E2B sandboxes run (.ci/build-docker-e2b-image.sh).
const IMAGE: &str = "nanoclaw-e2b-docker:latest";
/// Where rootful gVisor sandboxes keep their state (`Gvisor::default_root`).
const GVISOR_ROOT: &str = "/run/nanoclaw/gvisor";

/// One test at a time: they count containers and runsc sandboxes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Docker answers and the image exists (built if missing); else a SKIPPED
/// line, a failure under NANOCLAW_REQUIRE_DOCKER=1.
fn docker_ready(test: &str) -> bool {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = READY.get_or_init(|| {
        let info = Command::new("docker").arg("info").output();
        if !info.as_ref().is_ok_and(|o| o.status.success()) {
            return Err("no Docker daemon answers (`docker info` fails)".into());
        }
        let script = repo().join(".ci/build-docker-e2b-image.sh");
        match Command::new(&script).arg(IMAGE).output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!("{} failed: {}", script.display(), text(&o.stderr))),
            Err(e) => Err(format!("{}: {e}", script.display())),
        }
    });
    match r {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "{test}: NANOCLAW_REQUIRE_DOCKER=1 but {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// runsc is installed; else a SKIPPED line, a failure under
/// NANOCLAW_REQUIRE_GVISOR=1.
fn gvisor_ready(test: &str) -> bool {
    let found = Command::new("runsc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_GVISOR").as_deref() != Ok("1"),
            "{test}: NANOCLAW_REQUIRE_GVISOR=1 but runsc is not installed (apt-get install -t bookworm-backports runsc)"
        );
        eprintln!("SKIPPED {test} (gVisor part): runsc is not installed");
    }
    found
}

/// The common preconditions: root, Docker. `None` after a SKIP line.
fn setup(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !is_root() {
        eprintln!("SKIP {test}: root only (Docker's socket and rootful runsc)");
        return None;
    }
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    docker_ready(test).then_some(g)
}

/// `nanoclaw serve` with two tenants and the given templates.
struct Daemon {
    data: PathBuf,
    port: u16,
    child: Option<Child>,
    keys: (String, String),
    templates: Vec<String>,
    /// More arguments of `nanoclaw serve` (e.g. `--pool dk=1`).
    extra: Vec<String>,
    /// An /etc/hosts of the daemon's own (a private mount namespace), so
    /// that its egress proxy finds the test host's names.
    hosts: Option<PathBuf>,
}

impl Daemon {
    fn new(name: &str, templates: &[String]) -> Daemon {
        Daemon::with_hosts(name, templates, None, &[])
    }

    fn with_hosts(
        name: &str,
        templates: &[String],
        hosts: Option<&Path>,
        extra: &[String],
    ) -> Daemon {
        let data = std::env::temp_dir().join(format!(
            "nanoclaw-serve-backends-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let key = |t: &str, extra: &[&str]| {
            let mut args = vec!["tenant", "add", t, "--data", data.to_str().expect("utf-8")];
            args.extend_from_slice(extra);
            let o = Command::new(BIN).args(&args).output().expect("tenant add");
            assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
            text(&o.stdout).trim().to_string()
        };
        let keys = (key("alice", &[]), key("bob", &["--max-sandboxes", "1"]));
        let mut d = Daemon {
            data,
            port: free_port(),
            child: None,
            keys,
            templates: templates.to_vec(),
            extra: extra.to_vec(),
            hosts: hosts.map(Path::to_path_buf),
        };
        d.start();
        d
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let listen = format!("tcp:127.0.0.1:{}", self.port);
        let mut c = match &self.hosts {
            // `unshare` execs the shell, which execs nanoclaw: the child's
            // pid is the daemon's.
            Some(hosts) => {
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "--", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                    .arg(hosts)
                    .arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        c.args(["serve", "--data"])
            .arg(&self.data)
            .args(["--listen", &listen]);
        for t in &self.templates {
            c.args(["--template", t]);
        }
        c.args(&self.extra);
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nanoclaw serve");
        let patience = Duration::from_secs(60);
        wait_listening(&mut child, self.port, patience, "nanoclaw serve");
        self.child = Some(child);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    }

    /// curl against the control plane as `key`: (status, body).
    fn curl(&self, key: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("X-API-Key: {key}"))
            .arg(format!("{}{path}", self.url()));
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data", b]);
        }
        let o = c.output().expect("curl");
        let out = text(&o.stdout);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Creates a sandbox of `template` as alice: its id.
    fn create(&self, template: &str, timeout: u32) -> String {
        let body = format!(r#"{{"templateID":"{template}","timeout":{timeout}}}"#);
        let (code, body) = self.curl(&self.keys.0, "POST", "/sandboxes", Some(&body));
        assert_eq!(code, 201, "create {template}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["sandboxID"].as_str().expect("sandboxID").to_string()
    }

    /// Runs the pytest `suite` (the e2b SDK) against this daemon with
    /// `env`; the test fails with its output if it does. Its output (`-s`:
    /// what the tests print too) and the ids of the sandboxes it made
    /// (NANOCLAW_BACKEND_IDS, one per line).
    fn pytest(&self, venv: &Path, suite: &str, env: &[(&str, &str)]) -> (String, String) {
        let ids_file = self.data.join("ids");
        let _ = std::fs::remove_file(&ids_file);
        let o = e2b_pytest(venv, suite, &self.url(), (&self.keys.0, &self.keys.1))
            .arg("-s")
            .envs(env.iter().copied())
            .env("NANOCLAW_BACKEND_IDS", &ids_file)
            .output()
            .expect("run pytest");
        let out = text(&o.stdout);
        assert!(
            o.status.success(),
            "{suite} failed:\n{out}\n{}",
            text(&o.stderr)
        );
        (out, std::fs::read_to_string(&ids_file).unwrap_or_default())
    }

    fn audit(&self, args: &[&str]) -> String {
        let o = Command::new(BIN)
            .arg("audit")
            .args(args)
            .arg("--data")
            .arg(&self.data)
            .output()
            .expect("nanoclaw audit");
        assert!(o.status.success(), "audit: {}", text(&o.stderr));
        text(&o.stdout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Whether anything of sandbox `id` is left on the host: its container,
/// its runsc state or its bundle.
fn leftover(id: &str) -> Option<String> {
    if id.starts_with("gv-") {
        let listed = Command::new("runsc")
            .args(["--root", &format!("{GVISOR_ROOT}/runsc"), "list", "-quiet"])
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        if listed.lines().any(|l| l.trim() == id) {
            return Some(format!("runsc still lists {id}"));
        }
        let bundle = Path::new(GVISOR_ROOT).join(id);
        return bundle
            .exists()
            .then(|| format!("{} is still there", bundle.display()));
    }
    let o = Command::new("docker")
        .args(["inspect", "--format", "{{.State.Status}}"])
        .arg(format!("nanoclaw-{id}"))
        .output()
        .expect("docker inspect");
    o.status.success().then(|| {
        format!(
            "container nanoclaw-{id} is still there ({})",
            text(&o.stdout).trim()
        )
    })
}

/// Waits (up to a minute: the machine is loaded) until nothing of `id` is
/// left; what is left otherwise.
fn gone_within(id: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match leftover(id) {
            None => return Ok(()),
            Some(what) if Instant::now() >= deadline => return Err(what),
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The templates of this run: docker, and gvisor where runsc is here.
fn templates(test: &str) -> (Vec<String>, String) {
    let mut flags = vec![format!("dk=docker:{IMAGE}")];
    let mut names = "native=base,docker=dk".to_string();
    if gvisor_ready(test) {
        flags.push("gv=gvisor".into());
        names.push_str(",gvisor=gv");
    }
    (flags, names)
}

#[test]
fn the_e2b_sdk_drives_native_docker_and_gvisor_sandboxes_side_by_side() {
    let test = "the_e2b_sdk_drives_native_docker_and_gvisor_sandboxes_side_by_side";
    let Some(_g) = setup(test) else { return };
    let Some(venv) = venv("the e2b SDK") else {
        return;
    };
    let (flags, names) = templates(test);
    let d = Daemon::new("sdk", &flags);
    let suite = "tests/python/test_serve_backends.py";
    let (out, ids) = d.pytest(&venv, suite, &[("NANOCLAW_BACKEND_TEMPLATES", &names)]);
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let foreign: Vec<&str> = ids
        .lines()
        .filter(|i| i.starts_with("gv-") || i.len() == 12)
        .collect();
    assert!(foreign.len() >= 2, "no docker/gvisor sandboxes made: {ids}");
    // Every command is audited with the backend it ran on.
    let execs = d.audit(&["ls", "--kind", "exec", "--limit", "1000", "--json"]);
    assert!(execs.contains("backend docker"), "{execs}");
    if names.contains("gvisor") {
        assert!(execs.contains("backend gvisor"), "{execs}");
    }
    let creates = d.audit(&["ls", "--kind", "create", "--limit", "100", "--json"]);
    assert!(creates.contains("backend docker"), "{creates}");
    assert!(d.audit(&["verify"]).starts_with("ok"));
    // Killed through the API: nothing left of them.
    for id in &foreign {
        assert_eq!(leftover(id), None, "after the SDK's kill");
    }
    drop(d);
}

#[test]
fn timeouts_quotas_and_a_killed_daemon_leave_nothing_behind() {
    let test = "timeouts_quotas_and_a_killed_daemon_leave_nothing_behind";
    let Some(_g) = setup(test) else { return };
    let (flags, _) = templates(test);
    let gvisor = flags.iter().any(|f| f.ends_with("=gvisor"));
    let mut d = Daemon::new("reap", &flags);
    // The timeout fires: the daemon removes the sandbox (the backend's own
    // lifetime would only end it a grace period later).
    let short = d.create("dk", 1);
    gone_within(&short).expect("a docker sandbox past its timeout");
    // Quotas count them: bob may have one sandbox at once.
    let body = r#"{"templateID":"dk","timeout":60}"#;
    let (code, first) = d.curl(&d.keys.1, "POST", "/sandboxes", Some(body));
    assert_eq!(code, 201, "{first}");
    let (code, second) = d.curl(&d.keys.1, "POST", "/sandboxes", Some(body));
    assert_eq!(code, 429, "bob's second sandbox: {second}");
    // Tenants: alice does not see bob's sandbox.
    let bobs: serde_json::Value = serde_json::from_str(&first).expect("json");
    let bobs = bobs["sandboxID"].as_str().expect("id").to_string();
    let (code, _) = d.curl(&d.keys.0, "GET", &format!("/sandboxes/{bobs}"), None);
    assert_eq!(code, 404, "another tenant's sandbox");
    // What it cannot do is a 4xx JSON naming the backend.
    let (code, body) = d.curl(&d.keys.1, "POST", &format!("/sandboxes/{bobs}/pause"), None);
    assert_eq!(code, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(v["code"], 400);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("the docker backend"),
        "{body}"
    );
    // Killed with sandboxes alive: the next start sweeps them.
    let mut alive = vec![bobs, d.create("dk", 120)];
    if gvisor {
        alive.push(d.create("gv", 120));
    }
    d.signal(libc::SIGKILL);
    for id in &alive {
        assert!(leftover(id).is_some(), "{id} should outlive a kill -9");
    }
    d.start();
    for id in &alive {
        gone_within(id).expect("swept at the next start");
    }
    // /metrics counts engine sandboxes too.
    let live = d.create("dk", 60);
    let (code, metrics) = d.curl(&d.keys.0, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nanoclaw_sandboxes{state=\"running\"} ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // A clean stop ends them (a new daemon could not adopt them).
    d.signal(libc::SIGTERM);
    assert_eq!(leftover(&live), None, "after SIGTERM");
}

/// The micro-VM backend can run here (root, QEMU, virtiofsd, the pinned
/// kernel); else a SKIPPED line, a failure under NANOCLAW_REQUIRE_MICROVM=1.
fn microvm_ready(test: &str) -> bool {
    let made = nanoclaw_microvm::MicroVmOptions::new(BIN).and_then(nanoclaw_microvm::MicroVm::new);
    match made {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_MICROVM").as_deref() != Ok("1"),
                "{test}: NANOCLAW_REQUIRE_MICROVM=1 but the micro-VM backend cannot run here: {e}"
            );
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

/// Where the micro-VM backend keeps each VM's state directory.
const MICROVM_ROOT: &str = "/run/nanoclaw/microvm";

/// The processes whose command line names the VM `id`'s state directory
/// (its QEMU and virtiofsd daemons).
fn vm_processes(id: &str) -> Vec<i32> {
    let needle = format!("{MICROVM_ROOT}/{id}/");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Waits (generously: a VM powers off in seconds under TCG, more under
/// load) until nothing of VM `id` is left: no state directory, no holder
/// `holder`, no QEMU or virtiofsd.
fn vm_gone_within(id: &str, holder: Option<i32>, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    loop {
        let dir = Path::new(MICROVM_ROOT).join(id);
        let procs = vm_processes(id);
        let holding = holder.filter(|p| Path::new(&format!("/proc/{p}")).exists());
        if !dir.exists() && procs.is_empty() && holding.is_none() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "VM {id}: directory there: {}, processes {procs:?}, holder {holding:?}",
                dir.exists()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A micro-VM template (`--template vm=microvm`) driven by the e2b SDK
/// (tests/python/test_serve_microvm.py: create, commands, files, stdin fed
/// to a running command, kill);
/// then a second VM whose daemon is SIGKILLed: its holder sees the daemon
/// end (a pidfd) and ends the VM, leaving nothing. Two boots in all.
#[test]
fn the_e2b_sdk_drives_a_microvm_template() {
    let test = "the_e2b_sdk_drives_a_microvm_template";
    if !is_root() {
        eprintln!("SKIP {test}: root only (the micro-VM backend needs root)");
        return;
    }
    if !microvm_ready(test) {
        return;
    }
    let Some(venv) = venv("the e2b SDK") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = Daemon::new("vm", &["vm=microvm".to_string()]);
    let env = [
        ("NANOCLAW_MICROVM_TEMPLATE", "vm"),
        ("NANOCLAW_MICROVM_KERNEL", nanoclaw_microvm::kernel::RELEASE),
    ];
    let (out, ids) = d.pytest(&venv, "tests/python/test_serve_microvm.py", &env);
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let vms: Vec<&str> = ids.lines().filter(|i| i.starts_with("vm-")).collect();
    assert_eq!(vms.len(), 1, "one VM made: {ids}");
    // Killed through the API: nothing of it is left.
    vm_gone_within(vms[0], None, Duration::from_secs(60)).expect("killed VM");
    let execs = d.audit(&["ls", "--kind", "exec", "--limit", "1000", "--json"]);
    assert!(
        execs.contains("backend microvm"),
        "the VM's commands are audited: {execs}"
    );

    // The daemon SIGKILLed: the holder ends the VM.
    let id = d.create("vm", 300);
    assert!(id.starts_with("vm-"), "{id}");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(MICROVM_ROOT).join(&id).join("holder.json"))
            .expect("the holder's record"),
    )
    .expect("json");
    let holder = record["holder"][0].as_i64().expect("holder pid") as i32;
    assert!(!vm_processes(&id).is_empty(), "QEMU runs");
    d.signal(libc::SIGKILL);
    vm_gone_within(&id, Some(holder), Duration::from_secs(120))
        .expect("a SIGKILLed daemon's VM ends with it");
    eprintln!("ok   a SIGKILLed daemon's micro-VM is ended by its holder");
}

/// The warm pools' sandboxes the other backends hold on this host now
/// (label `pool`): micro-VMs (their holder's record), gVisor sandboxes
/// (their record), Docker containers. Other tests' sandboxes do not count.
fn engine_state() -> std::collections::BTreeSet<String> {
    let pooled = |root: &str, record: &str, kind: &str| -> Vec<String> {
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join(record)).is_ok_and(|r| r.contains("\"pool\""))
            })
            .map(|e| format!("{kind} {}", e.file_name().to_string_lossy()))
            .collect()
    };
    let mut out: std::collections::BTreeSet<String> = pooled(MICROVM_ROOT, "holder.json", "vm")
        .into_iter()
        .collect();
    out.extend(pooled(GVISOR_ROOT, "nanoclaw.json", "gvisor"));
    let docker = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=pool"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    out.extend(docker.lines().map(|l| format!("container {}", l.trim())));
    out
}

/// The ready sandboxes of `template`'s warm pool, from `/metrics`.
fn pool_ready(d: &Daemon, template: &str) -> u64 {
    let (_, metrics) = d.curl(&d.keys.0, "GET", "/metrics", None);
    let series = format!("nanoclaw_pool_ready{{template=\"{template}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0)
}

/// Warm pools of docker, gvisor and micro-VM templates (`--pool dk=1
/// ...`): they fill, the SDK's creates take from them and get working,
/// fresh sandboxes (tests/python/test_serve_pools.py), they refill, and a
/// clean stop ends what they hold, leaving nothing (no container, runsc
/// sandbox or VM).
#[test]
fn warm_pools_of_docker_gvisor_and_microvm_templates() {
    let test = "warm_pools_of_docker_gvisor_and_microvm_templates";
    let Some(_g) = setup(test) else { return };
    let Some(venv) = venv("the e2b SDK") else {
        return;
    };
    let (mut flags, _) = templates(test);
    let mut pooled = vec![("docker", "dk")];
    if flags.iter().any(|f| f.ends_with("=gvisor")) {
        pooled.push(("gvisor", "gv"));
    }
    if microvm_ready(test) {
        flags.push("vm=microvm".into());
        pooled.push(("microvm", "vm"));
    }
    let extra: Vec<String> = pooled
        .iter()
        .flat_map(|(_, t)| ["--pool".to_string(), format!("{t}=1")])
        .collect();
    let before = engine_state();
    let d = Daemon::with_hosts("pool", &flags, None, &extra);
    // A VM boots in seconds under TCG, more on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(300);
    for (_, t) in &pooled {
        while pool_ready(&d, t) < 1 {
            assert!(Instant::now() < deadline, "the pool of {t} did not fill");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let held = engine_state();
    assert!(
        held.len() >= before.len() + pooled.len(),
        "one sandbox per pool: before {before:?}, now {held:?}"
    );
    let names: Vec<String> = pooled.iter().map(|(b, t)| format!("{b}={t}")).collect();
    let env = [("NANOCLAW_POOLED_TEMPLATES", &names.join(",") as &str)];
    let (out, ids) = d.pytest(&venv, "tests/python/test_serve_pools.py", &env);
    for line in out.lines().filter(|l| l.contains(" ms warm")) {
        eprintln!("{line}");
    }
    let (_, metrics) = d.curl(&d.keys.0, "GET", "/metrics", None);
    let hits = metrics.lines().find_map(|l| {
        l.strip_prefix("nanoclaw_pool_hits_total ")?
            .parse::<u64>()
            .ok()
    });
    assert!(
        hits >= Some(2 * pooled.len() as u64),
        "two warm creates per pool: {metrics}"
    );
    // Every sandbox the suite made is gone (killed through the SDK).
    for id in ids.lines() {
        if id.starts_with("vm-") {
            vm_gone_within(id, None, Duration::from_secs(120)).expect("a killed VM");
        } else {
            gone_within(id).expect("a killed sandbox");
        }
    }
    // The pools refill; a clean stop ends what they hold.
    for (_, t) in &pooled {
        while pool_ready(&d, t) < 1 {
            assert!(
                Instant::now() < deadline + Duration::from_secs(300),
                "the pool of {t} did not refill"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // A stop while the pools refill (each has just handed one out) ends
    // what the refills make too.
    for (_, t) in &pooled {
        let _ = d.create(t, 60);
    }
    drop(d);
    let wait = Instant::now() + Duration::from_secs(120);
    while engine_state() != before && Instant::now() < wait {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(engine_state(), before, "the pools' sandboxes after a stop");
    eprintln!("ok   warm pools of {names:?} fill, hand out, refill and end with the daemon");
}

#[test]
fn a_template_the_daemon_cannot_serve_is_a_config_error_at_start() {
    for (flag, wanted) in [
        ("x=nope", "no such backend"),
        ("x=microvm:img", "kubernetes backends only"),
        ("x=docker", "needs an image"),
        ("x=gvisor:img", "kubernetes backends only"),
        ("base=native", "daemon's own templates"),
        ("=docker:img", "must be letters"),
    ] {
        let o = Command::new(BIN)
            .args(["serve", "--listen", "tcp:127.0.0.1:1", "--template", flag])
            .arg("--data")
            .arg(std::env::temp_dir().join("nanoclaw-serve-backends-bad"))
            .output()
            .expect("nanoclaw serve");
        assert_eq!(o.status.code(), Some(125), "{flag}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.contains(wanted) && err.contains("--template"),
            "{flag}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

/// The network namespaces the daemon `pid` holds open (a gVisor
/// sandbox's, made by nanoclaw).
fn netns_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("net:["))
        .count()
}

/// The egress proxies running in the daemon `pid` (their threads, named
/// `nanoclaw-net-proxy`, cut to 15 bytes by the kernel).
fn proxy_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.trim() == "nanoclaw-net-pr")
        .count()
}

/// The host namespace's interfaces and named network namespaces.
fn host_net() -> (Vec<String>, Vec<String>) {
    let out = |args: &[&str]| {
        let o = Command::new("ip").args(args).output().expect("ip");
        text(&o.stdout)
    };
    let mut links: Vec<String> = out(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect();
    links.sort();
    let mut ns: Vec<String> = out(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    ns.sort();
    (links, ns)
}

/// E2B's network options for Docker and gVisor sandboxes of the daemon,
/// driven by the unmodified `e2b` SDK (tests/python/test_serve_backends_egress.py):
/// `allowOut` reaches the allowed test host by name from a program that
/// ignores proxy variables, an unlisted name gets NXDOMAIN, a direct IP
/// and an unlisted port are refused (the test host's log shows nothing
/// else reached it), the refusals are in the audit log and `/metrics`,
/// `update_network` changes the running sandbox's policy,
/// `allow_internet_access=false` is no network, and what the backends
/// cannot do is a 400 naming them. Afterwards nothing is left: no
/// container, no runsc state, no network namespace or proxy held by the
/// daemon, no new interface or named namespace on the host.
///
/// The test host is a network namespace made here with public-class
/// addresses (11.252.N.2 and .3, routed only to its veth for the test's
/// duration: nothing leaves the machine), because the daemon's API refuses
/// rules that would open private addresses to its callers; the daemon
/// finds web.test and denied.test through an /etc/hosts of its own (a
/// private mount namespace).
#[test]
fn e2b_network_options_hold_in_docker_and_gvisor_sandboxes() {
    let test = "e2b_network_options_hold_in_docker_and_gvisor_sandboxes";
    let Some(_g) = setup(test) else { return };
    let Some(venv) = venv("the e2b SDK") else {
        return;
    };
    let Some(mut net) = TestNet::new(test, "ncsb") else {
        return;
    };
    let n = net.n;
    let (web, other) = (format!("11.252.{n}.2"), format!("11.252.{n}.3"));
    net.host_addr(&format!("11.252.{n}.1/29"));
    net.ns_addr(&format!("{web}/29"));
    net.ns_addr(&format!("{other}/29"));
    net.serve(common::testnet::LINE_SERVER, &[]);
    let hosts = net.dir.join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n::1 localhost\n{web} web.test\n{other} denied.test\n"),
    )
    .expect("write hosts");
    let mut flags = vec![format!("dk=docker:{IMAGE}")];
    let mut names = "docker=dk".to_string();
    if gvisor_ready(test) {
        flags.push("gv=gvisor".into());
        names.push_str(",gvisor=gv");
    }
    let before = host_net();
    let d = Daemon::with_hosts("egress", &flags, Some(&hosts), &[]);
    let pid = d.child.as_ref().map(Child::id).expect("the daemon's pid");
    let hits = net.dir.join("hits.log");
    let env = [
        ("NANOCLAW_BACKEND_TEMPLATES", names.as_str()),
        ("NANOCLAW_EGRESS_HOST", web.as_str()),
        ("NANOCLAW_EGRESS_OTHER", other.as_str()),
        ("NANOCLAW_EGRESS_HITS", hits.to_str().expect("utf-8")),
    ];
    let suite = "tests/python/test_serve_backends_egress.py";
    let (out, ids) = d.pytest(&venv, suite, &env);
    let want = if names.contains("gvisor") { 6 } else { 3 };
    assert!(
        out.contains(&format!("{want} passed")),
        "the suite did not run all {want} tests: {out}"
    );
    eprintln!("{}", out.lines().last().unwrap_or(""));
    // Killed through the API: nothing of them is left, in the backends or
    // in the daemon (its proxies, the namespaces it held).
    // Two sandboxes made per backend (the refusals make none).
    assert!(ids.lines().count() >= want / 3 * 2, "{ids}");
    for id in ids.lines() {
        gone_within(id).expect("after the SDK's kill");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while netns_fds(pid) + proxy_threads(pid) > 0 {
        assert!(
            Instant::now() < deadline,
            "the daemon still holds {} network namespace(s) and {} egress prox(ies)",
            netns_fds(pid),
            proxy_threads(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Other tests on the machine make and remove interfaces and namespaces
    // meanwhile: what counts is a new one of nanoclaw's (its veths are
    // `ncl-<id>`) or one naming a sandbox of this run.
    let (links, ns) = host_net();
    let ours = |name: &&String| {
        name.starts_with("ncl-")
            || ids
                .lines()
                .any(|id| name.contains(id.trim_start_matches("gv-")))
    };
    let left: Vec<&String> = links
        .iter()
        .filter(|l| !before.0.contains(l))
        .chain(ns.iter().filter(|n| !before.1.contains(n)))
        .filter(ours)
        .collect();
    assert!(
        left.is_empty(),
        "interfaces or named namespaces left: {left:?}"
    );
    assert!(d.audit(&["verify"]).starts_with("ok"));
    drop(d);
}
