//! Black-box tests of `nanoclaw run --config FILE --agent ID`: which flags
//! override the agent's policy (only nanoclaw's own, given before COMMAND),
//! what the kill message reports, and that a capability gets the same
//! answer from `--cap-add` and from the config's `cap_add`. As the invoking
//! user (root in CI) and rootless as `nanotest` (see `common`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::*;

/// A config file readable by the rootless user; removed on drop.
struct Config {
    dir: PathBuf,
}

impl Config {
    fn new(tag: &str, yaml: &str) -> Config {
        let dir =
            std::env::temp_dir().join(format!("nanoclaw-policy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("config dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let file = dir.join("nanoclaw.yaml");
        fs::write(&file, yaml).expect("write config");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod config");
        Config { dir }
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

const LIMITS: &str = "agents:
  list:
    - id: slow
      sandbox:
        timeout: 1s
    - id: quiet
      sandbox:
        outputLimit: 1k
    - id: few
      sandbox:
        pids: 16
        timeout: 10s
";

/// `nanoclaw run --fresh --config F --agent A ARGS...` (a one-shot sandbox;
/// tests/scopes.rs covers the agent's scoped sandbox).
fn run_agent(m: Mode, cfg: &Config, agent: &str, args: &[&str]) -> std::process::Output {
    let path = cfg.path();
    let mut a = vec![
        "run",
        "--fresh",
        "--config",
        path.as_str(),
        "--agent",
        agent,
    ];
    a.extend_from_slice(args);
    run(m, &a)
}

/// A `--timeout` that is an argument of the sandboxed command (no `--`
/// before COMMAND) is the command's, not nanoclaw's: the agent's 1 s
/// timeout holds, and the kill message names the limit that fired.
#[test]
fn flags_after_the_command_do_not_replace_the_policy_timeout() {
    let cfg = Config::new("timeout", LIMITS);
    for m in modes("policy timeout") {
        for args in [
            &["sh", "-c", "sleep 5", "x", "--timeout", "30s"][..],
            &["sh", "-c", "sleep 5", "x", "--timeout=30s"][..],
            &["--", "sh", "-c", "sleep 5", "x", "--timeout", "30s"][..],
        ] {
            let started = Instant::now();
            let o = run_agent(m, &cfg, "slow", args);
            let took = started.elapsed();
            let err = text(&o.stderr);
            assert_eq!(code(&o), 124, "[{}] {args:?}: {err}", m.name);
            assert!(
                took < Duration::from_secs(4),
                "[{}] {args:?}: killed after {took:?}, not at the policy's 1s",
                m.name
            );
            assert!(
                err.contains("killed: timeout after 1s"),
                "[{}] {args:?}: the message must name the 1s that fired: {err}",
                m.name
            );
        }
        // Given before COMMAND, the flag is nanoclaw's and overrides the file.
        let o = run_agent(
            m,
            &cfg,
            "slow",
            &["--timeout", "5s", "sh", "-c", "sleep 1.5; echo ok"],
        );
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        assert_eq!(text(&o.stdout), "ok\n", "[{}]", m.name);
        // Without a config the message names the flag's effective value too.
        let o = run(m, &["run", "--timeout", "500ms", "--", "sleep", "5"]);
        assert_eq!(code(&o), 124, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            text(&o.stderr).contains("killed: timeout after 500ms"),
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
    }
}

/// The same for `--output-limit` and `--pids` among the command's arguments.
#[test]
fn flags_after_the_command_do_not_replace_other_policy_limits() {
    let cfg = Config::new("limits", LIMITS);
    for m in modes("policy limits") {
        // outputLimit: 1k; the command's own `--output-limit 10m` is ignored.
        let o = run_agent(
            m,
            &cfg,
            "quiet",
            &[
                "sh",
                "-c",
                "head -c 100000 /dev/zero | tr '\\0' a",
                "x",
                "--output-limit",
                "10m",
            ],
        );
        let err = text(&o.stderr);
        assert!(
            o.stdout.len() <= 1024,
            "[{}] {} bytes passed a 1k output limit; stderr: {err}",
            m.name,
            o.stdout.len()
        );
        assert!(
            err.contains("killed: output over the limit (1 KiB per stream)"),
            "[{}] {err}",
            m.name
        );
        let path = cfg.path();
        let o = run(
            m,
            &[
                "run",
                "--json",
                "--fresh",
                "--config",
                &path,
                "--agent",
                "quiet",
                "sh",
                "-c",
                "head -c 100000 /dev/zero | tr '\\0' a",
                "x",
                "--output-limit=10m",
            ],
        );
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("[{}] not JSON ({e}): {}", m.name, text(&o.stderr)));
        assert_eq!(v["killed_by"], "output_limit", "[{}] {v}", m.name);

        // pids: 16; the command's own `--pids 1000` is ignored. Needs a
        // cgroup: rootless only where one is delegated.
        let o = run_agent(
            m,
            &cfg,
            "few",
            &[
                "sh",
                "-c",
                "for i in $(seq 40); do sleep 3 & done; wait; echo all forked",
                "x",
                "--pids",
                "1000",
            ],
        );
        let err = text(&o.stderr);
        if m.user.is_some() && code(&o) == 125 && err.contains("cannot enforce the pids") {
            eprintln!(
                "SKIPPED policy pids ({}): no delegated pids cgroup on this host: {err}",
                m.name
            );
            continue;
        }
        assert!(
            !text(&o.stdout).contains("all forked"),
            "[{}] 40 processes ran under the policy's pids 16: {err}",
            m.name
        );
        assert!(
            err.contains("killed: too many processes (limit 16)"),
            "[{}] {err}",
            m.name
        );
    }
}

/// One capability table: a capability the engine grants through
/// `--cap-add` is granted through the config's `security.cap_add`, and one
/// it refuses is refused there with the same message.
#[test]
fn cap_add_gets_the_same_answer_on_the_cli_and_in_the_config() {
    let allowed = Config::new(
        "cap-ok",
        "security:\n  cap_add: [SYS_NICE]\nagents:\n  list:\n    - id: a\n",
    );
    let refused = Config::new(
        "cap-no",
        "security:\n  cap_add: [SYS_ADMIN]\nagents:\n  list:\n    - id: a\n",
    );
    let caps = ["grep", "-E", "^Cap(Eff|Prm|Bnd)", "/proc/self/status"];
    for m in modes("cap_add paths") {
        // Allowed: the same capability sets either way (CAP_SYS_NICE = bit 23).
        let mut cli = vec!["run", "--cap-add", "SYS_NICE", "--"];
        cli.extend_from_slice(&caps);
        let o = run(m, &cli);
        assert_eq!(
            code(&o),
            0,
            "[{}] --cap-add SYS_NICE: {}",
            m.name,
            text(&o.stderr)
        );
        let from_flag = text(&o.stdout);
        assert!(
            from_flag.contains("CapEff:\t0000000000800000"),
            "[{}] {from_flag}",
            m.name
        );
        let mut with_cfg = vec!["--"];
        with_cfg.extend_from_slice(&caps);
        let o = run_agent(m, &allowed, "a", &with_cfg);
        assert_eq!(
            code(&o),
            0,
            "[{}] cap_add: [SYS_NICE] in the config: {}",
            m.name,
            text(&o.stderr)
        );
        assert_eq!(text(&o.stdout), from_flag, "[{}]", m.name);

        // Refused: exit 125 both ways, with the same reason.
        let o = run(m, &["run", "--cap-add", "SYS_ADMIN", "--", "true"]);
        assert_eq!(code(&o), 125, "[{}] {}", m.name, text(&o.stderr));
        let err = text(&o.stderr);
        let msg = err
            .trim()
            .strip_prefix("nanoclaw: ")
            .unwrap_or_else(|| panic!("[{}] one nanoclaw line: {err}", m.name))
            .to_string();
        assert!(
            msg.contains("SYS_ADMIN is refused") && msg.contains("catch-all"),
            "[{}] {msg}",
            m.name
        );
        let o = run_agent(m, &refused, "a", &["--", "true"]);
        assert_eq!(code(&o), 125, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            text(&o.stderr).contains(&msg),
            "[{}] the config path gave another answer: {}\nthe flag's: {msg}",
            m.name,
            text(&o.stderr)
        );
        let path = refused.path();
        let o = run(m, &["config", "validate", "--config", &path]);
        assert_eq!(code(&o), 125, "[{}]", m.name);
        assert!(
            text(&o.stdout).contains(&msg),
            "[{}] validate: {}",
            m.name,
            text(&o.stdout)
        );
    }
}

/// Network flags typed with `--config --agent` replace the agent's network,
/// and the warnings describe the sandbox that runs: rules given for a
/// `none` agent run with `--network allowlist` are no longer "doing
/// nothing", while a run that stays `none` still says so. As the invoking
/// user only: the warnings do not depend on who runs.
#[test]
fn network_warnings_describe_the_network_that_runs() {
    let cfg = Config::new(
        "net-warn",
        "network:\n  rules:\n    example.test:\n      headers:\n        X-Token: t\n\
         agents:\n  list:\n    - id: a\n      sandbox:\n        network: none\n",
    );
    let nothing = "network.rules do nothing here";
    let Some(m) = modes("network warnings").into_iter().next() else {
        return;
    };
    let o = run_agent(m, &cfg, "a", &["--", "true"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains(nothing), "{}", text(&o.stderr));
    for flags in [
        &["--network", "allowlist", "--allow-host", "example.test"][..],
        &["--allow-host", "example.test"][..],
    ] {
        let mut a = flags.to_vec();
        a.extend_from_slice(&["--", "true"]);
        let o = run_agent(m, &cfg, "a", &a);
        assert_eq!(code(&o), 0, "{flags:?}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(!err.contains(nothing), "{flags:?}: {err}");
        assert!(!err.contains("no hosts are allowed"), "{flags:?}: {err}");
    }
    // Only CIDRs: an allowlist with no host, which is not "nothing reachable".
    let o = run_agent(
        m,
        &cfg,
        "a",
        &["--allow-cidr", "127.0.0.1/32:9", "--", "true"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        !err.contains(nothing) && !err.contains("no hosts are allowed"),
        "{err}"
    );
}
