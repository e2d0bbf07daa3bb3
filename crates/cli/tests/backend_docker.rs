//! The Docker backend (`--backend docker`), against the real Docker daemon:
//! the engine's backend scenario through the trait, then the CLI — exit
//! codes, limits firing and reported (memory, pids, timeout, output), a
//! field it cannot honour refused by name, sandboxes made with `sandbox
//! create` found again, and nothing left behind (no container after a run,
//! nor after a `kill -9` of nanoclaw once the next nanoclaw has started).
//!
//! Needs dockerd and the local images `nanoclaw-bench:latest` and
//! `nanoclaw-docker-test:latest` (built here by `.ci/build-docker-test-
//! image.sh` when missing). Without Docker every test says SKIPPED, and
//! fails under NANOCLAW_REQUIRE_DOCKER=1.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nanoclaw_sandbox::backend::Backend;
use nanoclaw_sandbox::spec::Root;
use serde_json::Value;

#[path = "../../sandbox/tests/backend_scenario/mod.rs"]
mod backend_scenario;

const IMAGE: &str = "nanoclaw-docker-test:latest";
const BIN: &str = env!("CARGO_BIN_EXE_nanoclaw");

/// One test at a time: the scenario counts this process's children, which
/// another test's `nanoclaw` would be.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Docker answers and the test image exists (built if missing); else a
/// SKIPPED line (a failure under NANOCLAW_REQUIRE_DOCKER=1). Holds
/// [`SERIAL`] for the test.
fn docker_or_skip(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = READY.get_or_init(|| {
        let info = Command::new("docker").arg("info").output();
        if !info.as_ref().is_ok_and(|o| o.status.success()) {
            return Err("no Docker daemon answers (`docker info` fails)".into());
        }
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/build-docker-test-image.sh");
        let built = Command::new(&script).arg(IMAGE).output();
        match built {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("{}: {e}", script.display())),
        }
    });
    match r {
        Ok(()) => Some(guard),
        Err(why) => {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "{test}: NANOCLAW_REQUIRE_DOCKER=1 but {why}"
            );
            println!("SKIPPED {test}: {why}");
            None
        }
    }
}

fn nc(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running nanoclaw")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `nanoclaw run --backend docker --image IMAGE --json FLAGS -- CMD`: its
/// exit code and outcome.
fn run_json(flags: &[&str], cmd: &[&str]) -> (i32, Value) {
    let mut args = vec!["run", "--backend", "docker", "--image", IMAGE, "--json"];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(cmd);
    let o = nc(&args);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: no JSON outcome ({e}): {} / {}",
            text(&o.stdout),
            text(&o.stderr)
        )
    });
    (o.status.code().unwrap_or(-1), v)
}

/// The container of sandbox `id` exists (running or not).
fn container_exists(id: &str) -> bool {
    let o = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=nanoclaw.id={id}")])
        .output()
        .expect("docker ps");
    !o.stdout.is_empty()
}

#[test]
fn docker_backend_through_the_trait() {
    let Some(_serial) = docker_or_skip("docker_backend_through_the_trait") else {
        return;
    };
    let backend = nanoclaw_docker::Docker::connect_with(Some(BIN.into())).expect("connect");
    let r = backend_scenario::run_with(&backend, "docker", Root::Image(IMAGE.into()));
    if let Err(e) = r {
        panic!("backend {}: FAIL {e}", backend.name());
    }
}

#[test]
fn run_reports_exit_codes_and_limits_and_leaves_no_container() {
    let Some(_serial) = docker_or_skip("run_reports_exit_codes_and_limits_and_leaves_no_container")
    else {
        return;
    };
    let mut ids = Vec::new();
    let mut check = |what: &str, flags: &[&str], cmd: &[&str], code: i32, killed: Value| {
        let (c, v) = run_json(flags, cmd);
        if code < 0 {
            assert_ne!(c, 0, "{what}: exit code; outcome {v}");
        } else {
            assert_eq!(c, code, "{what}: exit code; outcome {v}");
        }
        assert_eq!(v["killed_by"], killed, "{what}: killed_by; outcome {v}");
        assert_eq!(v["layers"]["mode"], "docker", "{what}: {v}");
        ids.push(v["sandbox_id"].as_str().unwrap_or_default().to_string());
        v
    };
    let v = check(
        "exit 3",
        &[],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        3,
        Value::Null,
    );
    assert_eq!(
        (v["stdout"].as_str(), v["stderr"].as_str()),
        (Some("out\n"), Some("err\n"))
    );
    // seed 002's hardening, reported.
    let l = &v["layers"];
    assert_eq!(l["no_new_privs"], true);
    assert_eq!(l["seccomp"], "nanoclaw-default (as Docker JSON)");
    assert_eq!(l["capabilities"], serde_json::json!([]));
    let v = check("not found", &[], &["no-such-command"], 127, Value::Null);
    assert!(
        v["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("command not found"),
        "{v}"
    );
    check(
        "a signal",
        &[],
        &["sh", "-c", "kill -9 $$"],
        137,
        Value::Null,
    );
    let t0 = Instant::now();
    check(
        "timeout",
        &["--timeout", "1s"],
        &["sleep", "30"],
        124,
        "timeout".into(),
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the timeout took {:?}",
        t0.elapsed()
    );
    let v = check(
        "memory",
        &["--memory", "32m"],
        &["python3", "-c", "b = bytearray(256 << 20)"],
        137,
        "oom".into(),
    );
    assert_eq!(v["signal"], 9, "{v}");
    check(
        "pids",
        &["--pids", "16"],
        &["sh", "-c", "for i in $(seq 40); do sleep 5 & done; wait"],
        -1,
        "pids".into(),
    );
    let v = check(
        "output limit",
        &["--output-limit", "1k"],
        &["python3", "-c", "print('x' * 100000)"],
        137,
        "output_limit".into(),
    );
    assert_eq!(v["stdout"].as_str().map(str::len), Some(1024), "{v}");
    assert_eq!(v["stdout_truncated"], true);
    for id in &ids {
        assert!(
            !id.is_empty() && !container_exists(id),
            "container of {id} left behind"
        );
    }
}

#[test]
fn fields_docker_cannot_honour_are_refused_by_name() {
    let Some(_serial) = docker_or_skip("fields_docker_cannot_honour_are_refused_by_name") else {
        return;
    };
    let cases: [(&[&str], &str); 3] = [
        (
            &["run", "--backend", "docker", "--image", IMAGE, "--exec-allow", "/usr", "--", "true"],
            "nanoclaw: --backend docker: --exec-allow is not supported:",
        ),
        (
            // Allowlist egress works (egress_backends.rs); the kernel mode does not.
            &["run", "--backend", "docker", "--image", IMAGE, "--network", "kernel", "--allow-cidr", "192.0.2.0/24", "--", "true"],
            "nanoclaw: --backend docker: --network kernel is not supported:",
        ),
        (
            &["run", "--backend", "docker", "--", "true"],
            "nanoclaw: --backend docker: the host root is not supported: a container needs an image: pass --image",
        ),
    ];
    for (args, want) in cases {
        let o = nc(args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).starts_with(want),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    let o = nc(&["run", "--backend", "qemu", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains(
            "--backend qemu: no such backend; use one of native, docker, gvisor, microvm, kubernetes"
        ),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_killed_nanoclaw_leaves_no_container_once_the_next_one_starts() {
    let Some(_serial) =
        docker_or_skip("a_killed_nanoclaw_leaves_no_container_once_the_next_one_starts")
    else {
        return;
    };
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--backend",
            "docker",
            "--image",
            IMAGE,
            "--timeout",
            "60s",
            "--",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nanoclaw run");
    let pid = child.id().to_string();
    let owner_filter = "label=nanoclaw.owner";
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let o = Command::new("docker")
            .args([
                "ps",
                "--filter",
                owner_filter,
                "--format",
                "{{.Label \"nanoclaw.owner\"}} {{.Label \"nanoclaw.id\"}}",
            ])
            .output()
            .expect("docker ps");
        let found = text(&o.stdout)
            .lines()
            .find(|l| l.starts_with(&format!("{pid}:")))
            .and_then(|l| l.split_whitespace().nth(1).map(String::from));
        if let Some(id) = found {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the run's container never showed up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().expect("kill -9 nanoclaw");
    let _ = child.wait();
    assert!(
        container_exists(&id),
        "the container went with nanoclaw: nothing to sweep"
    );
    // The next nanoclaw that uses Docker sweeps it.
    let o = nc(&["sandbox", "ls"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !container_exists(&id),
        "container of the killed run {id} is still there"
    );
}

#[test]
fn created_sandboxes_outlive_the_cli_and_are_found_again() {
    let Some(_serial) = docker_or_skip("created_sandboxes_outlive_the_cli_and_are_found_again")
    else {
        return;
    };
    let name = format!("dockertest-{}", std::process::id());
    let o = nc(&[
        "sandbox",
        "create",
        "--backend",
        "docker",
        "--image",
        IMAGE,
        "--name",
        &name,
        "--label",
        "suite=docker",
        "--timeout",
        "5s",
    ]);
    assert!(o.status.success(), "create: {}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    assert_eq!(id.len(), 12, "{id}");
    let o = nc(&["exec", &name, "--", "sh", "-c", "echo state > /tmp/f"]);
    assert!(o.status.success(), "exec: {}", text(&o.stderr));
    let o = nc(&["exec", "--json", &id[..6], "--", "cat", "/tmp/f"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("exec --json");
    assert_eq!(v["stdout"], "state\n", "files persist between execs: {v}");
    // The sandbox's --timeout is each exec's default.
    let o = nc(&["exec", &name, "--", "sleep", "30"]);
    assert_eq!(o.status.code(), Some(124), "{}", text(&o.stderr));
    let o = nc(&["sandbox", "ls", "--json", "--label", "suite=docker"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("ls --json");
    let row = v
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not in ls: {v}"));
    assert_eq!(row["backend"], "docker");
    assert_eq!(row["name"], name.as_str());
    let o = nc(&["sandbox", "pause", &name]);
    assert!(o.status.success(), "pause: {}", text(&o.stderr));
    let o = nc(&["exec", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o.stderr).contains("paused"), "{}", text(&o.stderr));
    let o = nc(&["sandbox", "resume", &name]);
    assert!(o.status.success(), "resume: {}", text(&o.stderr));
    let o = nc(&["sandbox", "rm", &name]);
    assert!(o.status.success(), "rm: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), id);
    assert!(!container_exists(&id), "rm left the container");
    let o = nc(&["exec", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "exec after rm");
}
