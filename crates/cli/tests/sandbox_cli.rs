//! Black-box tests of long-lived sandboxes without a daemon: `nanoclaw
//! sandbox create`, `exec`, `sandbox ls`, `inspect`, `rm`, and what a killed
//! keeper leaves (nothing). Root and rootless.

use std::time::{Duration, Instant};

mod common;
use common::*;

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

fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn state(m: Mode, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(m, &["sandbox", "inspect", id])).expect("inspect json")
}

#[test]
fn create_exec_ls_rm() {
    for m in modes("create_exec_ls_rm") {
        let name = format!("t-{}-{}", m.name, std::process::id());
        let id = ok(
            m,
            &[
                "sandbox",
                "create",
                "--name",
                &name,
                "--label",
                "suite=cli",
                "--memory",
                "256m",
            ],
        );
        let id = id.trim().to_string();
        assert_eq!(id.len(), 12, "[{}] id {id:?}", m.name);
        assert_eq!(
            ok(
                m,
                &["exec", &name, "--", "sh", "-c", "echo kept > /tmp/f; id -u"]
            ),
            "1000\n"
        );
        assert_eq!(ok(m, &["exec", &id[..6], "--", "cat", "/tmp/f"]), "kept\n");
        let o = run(m, &["exec", &name, "--", "sh", "-c", "exit 5"]);
        assert_eq!(code(&o), 5, "[{}]", m.name);
        let o = run(
            m,
            &["exec", "--timeout", "200ms", &name, "--", "sleep", "10"],
        );
        assert_eq!(code(&o), 124, "[{}] {}", m.name, text(&o.stderr));
        let ls = ok(m, &["sandbox", "ls", "--label", "suite=cli"]);
        assert!(
            ls.contains(&id) && ls.contains(&name),
            "[{}] ls: {ls}",
            m.name
        );
        let st = state(m, &id);
        let (keeper, init) = (
            st["keeper_pid"].as_i64().unwrap_or(0) as i32,
            st["init_pid"].as_i64().unwrap_or(0) as i32,
        );
        assert!(keeper > 0 && init > 0, "[{}] {st}", m.name);
        // A process left running by an exec goes with the sandbox.
        ok(
            m,
            &[
                "exec",
                &name,
                "--",
                "sh",
                "-c",
                "setsid sleep 300 >/dev/null 2>&1 </dev/null &",
            ],
        );
        assert_eq!(ok(m, &["sandbox", "rm", &name]).trim(), id);
        assert!(
            gone(keeper) && gone(init),
            "[{}] keeper or init left after rm",
            m.name
        );
        assert!(
            !ok(m, &["sandbox", "ls"]).contains(&id),
            "[{}] still listed",
            m.name
        );
        let o = run(m, &["exec", &name, "--", "true"]);
        assert_eq!(code(&o), 125, "[{}] exec into a removed sandbox", m.name);
        assert_eq!(
            text(&o.stderr).lines().count(),
            1,
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
    }
}

#[test]
fn a_killed_keeper_takes_its_sandbox_along() {
    for m in modes("a_killed_keeper_takes_its_sandbox_along") {
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        ok(
            m,
            &[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "sleep 300 >/dev/null 2>&1 </dev/null &",
            ],
        );
        let st = state(m, &id);
        let (keeper, init) = (
            st["keeper_pid"].as_i64().unwrap_or(0) as i32,
            st["init_pid"].as_i64().unwrap_or(0) as i32,
        );
        // SAFETY: kill with a pid and a signal.
        unsafe { libc::kill(keeper, libc::SIGKILL) };
        assert!(gone(init), "[{}] the sandbox outlived its keeper", m.name);
        assert!(
            !ok(m, &["sandbox", "ls"]).contains(&id),
            "[{}] a dead keeper's sandbox is listed",
            m.name
        );
    }
}

#[test]
fn bad_input_is_one_line_and_125() {
    for m in modes("bad_input_is_one_line_and_125") {
        for args in [
            &["exec", "no-such-sandbox", "--", "true"][..],
            &["sandbox", "create", "--", "echo", "hi"][..],
            &["sandbox", "create", "--lifetime", "soon"][..],
            &["sandbox", "rm", "no-such-sandbox"][..],
        ] {
            let o = run(m, args);
            assert_eq!(code(&o), 125, "[{}] {args:?}: {}", m.name, text(&o.stderr));
            assert_eq!(
                text(&o.stderr).lines().count(),
                1,
                "[{}] {args:?}: {}",
                m.name,
                text(&o.stderr)
            );
        }
        let name = format!("dup-{}-{}", m.name, std::process::id());
        let id = ok(m, &["sandbox", "create", "--name", &name])
            .trim()
            .to_string();
        let o = run(m, &["sandbox", "create", "--name", &name]);
        assert_eq!(
            code(&o),
            125,
            "[{}] a second sandbox with the same name",
            m.name
        );
        ok(m, &["sandbox", "rm", &id]);
    }
}
