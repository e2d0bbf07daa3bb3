//! Black-box tests of policy scopes (seed 003): `nanoclaw run` and `exec`
//! with `--config F --agent A [--session S]` reuse one long-lived sandbox
//! per scope key (session, agent, shared), made on first use; its
//! setupCommand runs once; a policy change replaces it; `sandbox ls` shows
//! the scope and whether the config still matches; `sandbox recreate`
//! removes them; `prune.idleHours` ends them. Also `sandbox stop`. Root and
//! rootless.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// `recreate --all` acts on every scoped sandbox of the user: the tests of
/// this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config file readable by the rootless user; removed on drop.
struct Config {
    dir: PathBuf,
}

impl Config {
    fn new(tag: &str, yaml: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("nanoclaw-scope-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("config dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let c = Config { dir };
        c.write(yaml);
        c
    }

    fn write(&self, yaml: &str) {
        let file = self.dir.join("nanoclaw.yaml");
        fs::write(&file, yaml).expect("write config");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod config");
    }

    fn path(&self) -> String {
        self.dir.join("nanoclaw.yaml").display().to_string()
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn ok(m: Mode, args: &[&str]) -> String {
    let o = run(m, args);
    assert_eq!(
        code(&o),
        0,
        "[{}] nanoclaw {args:?}: {}",
        m.name,
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// `nanoclaw run --config C --agent A [--session S] -- sh -c SCRIPT`.
fn agent_sh(m: Mode, c: &Config, agent: &str, session: Option<&str>, script: &str) -> String {
    let path = c.path();
    let mut a = vec!["run", "--config", &path, "--agent", agent];
    if let Some(s) = session {
        a.extend(["--session", s]);
    }
    a.extend(["--", "sh", "-c", script]);
    ok(m, &a)
}

/// The scoped sandboxes alive now (`sandbox ls --json`, those with a scope).
fn scoped(m: Mode) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(m, &["sandbox", "ls", "--json"])).expect("ls json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|s| s.get("scope").is_some())
        .cloned()
        .collect()
}

/// No scoped sandbox is left, and no keeper of one.
fn assert_none_left(m: Mode) {
    ok(m, &["sandbox", "recreate", "--all"]);
    let left = scoped(m);
    assert!(left.is_empty(), "[{}] left: {left:?}", m.name);
}

const SCOPES: &str = "agents:
  list:
    - id: alice
      sandbox:
        scope: session
    - id: bob
      sandbox:
        scope: agent
    - id: carol
      sandbox:
        scope: shared
    - id: dave
      sandbox:
        scope: shared
";

#[test]
fn each_scope_reuses_its_own_sandbox() {
    let _g = serial();
    let c = Config::new("reuse", SCOPES);
    let path = c.path();
    for m in modes("each_scope_reuses_its_own_sandbox") {
        let read = "cat /tmp/mark 2>/dev/null || echo none";
        // session: one per (agent, session).
        agent_sh(m, &c, "alice", Some("s1"), "echo alice-s1 > /tmp/mark");
        assert_eq!(
            agent_sh(m, &c, "alice", Some("s1"), read),
            "alice-s1\n",
            "[{}]",
            m.name
        );
        assert_eq!(
            agent_sh(m, &c, "alice", Some("s2"), read),
            "none\n",
            "[{}]",
            m.name
        );
        // `exec --agent` reaches the same sandbox as `run --agent`.
        assert_eq!(
            ok(
                m,
                &[
                    "exec",
                    "--config",
                    &path,
                    "--agent",
                    "alice",
                    "--session",
                    "s1",
                    "--",
                    "cat",
                    "/tmp/mark"
                ]
            ),
            "alice-s1\n",
            "[{}]",
            m.name
        );
        // agent: one per agent, whatever the session.
        agent_sh(m, &c, "bob", Some("s1"), "echo bob > /tmp/mark");
        assert_eq!(
            agent_sh(m, &c, "bob", Some("s9"), read),
            "bob\n",
            "[{}]",
            m.name
        );
        // shared: one for every shared agent, and no other's.
        agent_sh(m, &c, "carol", None, "echo shared > /tmp/mark");
        assert_eq!(
            agent_sh(m, &c, "dave", Some("x"), read),
            "shared\n",
            "[{}]",
            m.name
        );
        assert_eq!(
            agent_sh(m, &c, "alice", Some("s3"), read),
            "none\n",
            "[{}]",
            m.name
        );
        // --fresh: a one-shot sandbox.
        let o = ok(
            m,
            &[
                "run", "--fresh", "--config", &path, "--agent", "bob", "--", "sh", "-c", read,
            ],
        );
        assert_eq!(o, "none\n", "[{}]", m.name);

        // Four sandboxes: alice s1, s2, s3; bob; the shared one.
        let all = scoped(m);
        assert_eq!(all.len(), 5, "[{}] {all:?}", m.name);
        for s in &all {
            assert_eq!(s["scope"]["config_matches"], true, "[{}] {s}", m.name);
        }
        let table = ok(m, &["sandbox", "ls"]);
        let bob = table
            .lines()
            .find(|l| l.contains(" bob "))
            .expect("bob's row");
        assert!(
            bob.contains("agent") && bob.contains("match"),
            "[{}] {table}",
            m.name
        );
        // recreate --agent: that agent's only.
        let gone = ok(m, &["sandbox", "recreate", "--agent", "alice"]);
        assert_eq!(gone.lines().count(), 3, "[{}] {gone}", m.name);
        assert_eq!(scoped(m).len(), 2, "[{}]", m.name);
        assert_eq!(
            agent_sh(m, &c, "alice", Some("s1"), read),
            "none\n",
            "[{}]",
            m.name
        );
        assert_none_left(m);
    }
}

#[test]
fn setup_runs_once_and_a_failing_setup_leaves_nothing() {
    let _g = serial();
    let c = Config::new(
        "setup",
        "agents:
  defaults:
    sandbox:
      setupCommand: \"echo ran >> /tmp/setup.log\"
  list:
    - id: a
    - id: broken
      sandbox:
        setupCommand: \"echo no-such-tool >&2; exit 3\"
",
    );
    let path = c.path();
    for m in modes("setup_runs_once_and_a_failing_setup_leaves_nothing") {
        for _ in 0..3 {
            agent_sh(m, &c, "a", None, "true");
        }
        assert_eq!(
            agent_sh(m, &c, "a", None, "cat /tmp/setup.log"),
            "ran\n",
            "[{}]",
            m.name
        );
        let o = run(
            m,
            &["run", "--config", &path, "--agent", "broken", "--", "true"],
        );
        assert_eq!(code(&o), 125, "[{}] {}", m.name, text(&o.stderr));
        let err = text(&o.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains("setupCommand")
                && last.contains("exit 3")
                && last.contains("no-such-tool"),
            "[{}] {err}",
            m.name
        );
        assert_eq!(
            scoped(m).len(),
            1,
            "[{}] the broken sandbox was kept",
            m.name
        );
        assert_none_left(m);
    }
}

#[test]
fn a_policy_change_replaces_the_sandbox() {
    let _g = serial();
    let yaml = |mem: &str| {
        format!(
            "agents:
  list:
    - id: p
      sandbox:
        scope: agent
        memory: {mem}
"
        )
    };
    let c = Config::new("change", &yaml("256m"));
    for m in modes("a_policy_change_replaces_the_sandbox") {
        c.write(&yaml("256m"));
        agent_sh(m, &c, "p", None, "echo old > /tmp/mark");
        // A per-command setting (timeout) is not a policy change of the sandbox.
        let path = c.path();
        ok(
            m,
            &[
                "run",
                "--config",
                &path,
                "--agent",
                "p",
                "--timeout",
                "5s",
                "--",
                "cat",
                "/tmp/mark",
            ],
        );
        c.write(&yaml("300m"));
        assert_eq!(
            scoped(m)[0]["scope"]["config_matches"],
            false,
            "[{}]",
            m.name
        );
        assert!(ok(m, &["sandbox", "ls"]).contains("OLD"), "[{}]", m.name);
        let o = run(
            m,
            &[
                "run",
                "--config",
                &path,
                "--agent",
                "p",
                "--",
                "sh",
                "-c",
                "cat /tmp/mark 2>/dev/null || echo none",
            ],
        );
        assert_eq!(
            text(&o.stdout),
            "none\n",
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
        assert!(
            text(&o.stderr).contains("replacing"),
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
        assert_eq!(scoped(m).len(), 1, "[{}]", m.name);
        assert_none_left(m);
    }
}

/// Each command in a scoped sandbox gets the policy's timeout and output
/// limit, and the kill message names the limit that fired; the sandbox
/// lives on.
#[test]
fn scoped_commands_get_the_policys_limits() {
    let _g = serial();
    let c = Config::new(
        "limits",
        "agents:
  list:
    - id: slow
      sandbox:
        scope: agent
        timeout: 1s
        outputLimit: 1k
",
    );
    let path = c.path();
    for m in modes("scoped_commands_get_the_policys_limits") {
        let t = Instant::now();
        let o = run(
            m,
            &[
                "run", "--config", &path, "--agent", "slow", "--", "sleep", "10",
            ],
        );
        assert_eq!(code(&o), 124, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "[{}] {:?}",
            m.name,
            t.elapsed()
        );
        assert!(
            text(&o.stderr).contains("timeout after 1s"),
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
        let o = run(
            m,
            &[
                "run",
                "--json",
                "--config",
                &path,
                "--agent",
                "slow",
                "--",
                "sh",
                "-c",
                "head -c 100000 /dev/zero",
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("[{}] not JSON ({e}): {}", m.name, text(&o.stderr)));
        assert_eq!(v["killed_by"], "output_limit", "[{}] {v}", m.name);
        // Same sandbox throughout.
        assert_eq!(scoped(m).len(), 1, "[{}]", m.name);
        assert_none_left(m);
    }
}

#[test]
fn idle_scoped_sandboxes_are_pruned() {
    let _g = serial();
    // idleHours 0.0003 = 1.08 s.
    let c = Config::new(
        "prune",
        "agents:
  list:
    - id: idle
      sandbox:
        prune: { idleHours: 0.0003, maxAgeDays: 1 }
",
    );
    for m in modes("idle_scoped_sandboxes_are_pruned") {
        agent_sh(m, &c, "idle", None, "true");
        assert_eq!(scoped(m).len(), 1, "[{}]", m.name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !scoped(m).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            scoped(m).is_empty(),
            "[{}] an idle sandbox outlived idleHours",
            m.name
        );
    }
}

#[test]
fn bad_scope_requests_are_one_line_and_125() {
    let _g = serial();
    let c = Config::new("bad", SCOPES);
    let path = c.path();
    for m in modes("bad_scope_requests_are_one_line_and_125") {
        for args in [
            vec![
                "exec", "--config", &path, "--agent", "alice", "someid", "--", "true",
            ],
            vec!["exec", "--", "true"],
            vec!["exec", "--config", &path, "--agent", "nobody", "--", "true"],
            vec!["sandbox", "recreate"],
            vec!["sandbox", "create", "--fresh"],
        ] {
            let o = run(m, &args);
            assert_eq!(code(&o), 125, "[{}] {args:?}: {}", m.name, text(&o.stderr));
            assert_eq!(
                text(&o.stderr).lines().count(),
                1,
                "[{}] {args:?}: {}",
                m.name,
                text(&o.stderr)
            );
        }
        assert!(scoped(m).is_empty(), "[{}]", m.name);
    }
}

#[test]
fn stop_ends_every_process_and_keeps_the_sandbox() {
    let _g = serial();
    for m in modes("stop_ends_every_process_and_keeps_the_sandbox") {
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        // One process that ends on SIGTERM, one that ignores it.
        ok(
            m,
            &[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "echo kept > /tmp/file; sleep 1000 & (trap '' TERM; exec sleep 1001) & echo",
            ],
        );
        let processes = |m: Mode| -> u64 {
            let v: serde_json::Value =
                serde_json::from_str(&ok(m, &["sandbox", "inspect", &id])).expect("inspect");
            v["processes"].as_u64().expect("processes")
        };
        assert_eq!(processes(m), 2, "[{}]", m.name);
        let t = Instant::now();
        let o = run(m, &["sandbox", "stop", "-t", "1", &id]);
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            text(&o.stderr).contains("1 process"),
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "[{}] {:?}",
            m.name,
            t.elapsed()
        );
        assert_eq!(processes(m), 0, "[{}]", m.name);
        // The sandbox and its files stay.
        assert_eq!(
            ok(m, &["exec", &id, "--", "cat", "/tmp/file"]),
            "kept\n",
            "[{}]",
            m.name
        );
        // Nothing running: stop returns at once.
        let t = Instant::now();
        ok(m, &["sandbox", "stop", &id]);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "[{}] {:?}",
            m.name,
            t.elapsed()
        );
        ok(m, &["sandbox", "rm", &id]);
        let o = run(m, &["sandbox", "stop", &id]);
        assert_eq!(code(&o), 125, "[{}] stop of a removed sandbox", m.name);
    }
}
