//! Black-box tests of long-lived sandboxes without a daemon: `nanoclaw
//! sandbox create`, `exec`, `sandbox ls`, `inspect`, `rm`, and what a killed
//! keeper leaves (nothing). Root and rootless.

use std::time::{Duration, Instant};

mod common;
use common::*;

/// The leak check takes this for writing, every other test for reading,
/// so its before/after snapshots see no other test's sandboxes.
static SERIAL: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    SERIAL.read().unwrap_or_else(|e| e.into_inner())
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
    let _g = shared();
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
    let _g = shared();
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

/// Whether `nanoclaw doctor` says this mode's user has a freezer.
fn freezer_usable(m: Mode) -> bool {
    let v: serde_json::Value =
        serde_json::from_str(&ok(m, &["doctor", "--json"])).expect("doctor json");
    let checks = v.as_array().cloned().unwrap_or_default();
    let cg = checks.iter().find(|c| c["name"] == "cgroups");
    cg.and_then(|c| c["data"]["controllers"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|c| c["name"] == "freezer" && c["usable"] == true)
}

/// cpu time used by the sandbox so far, per `inspect` (ms).
fn cpu_ms(m: Mode, id: &str) -> f64 {
    state(m, id)["cpu_used_ms"].as_f64().unwrap_or(-1.0)
}

#[test]
fn pause_and_resume() {
    let _g = shared();
    for m in modes("pause_and_resume") {
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        ok(
            m,
            &[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "while :; do :; done >/dev/null 2>&1 </dev/null &",
            ],
        );
        let st = state(m, &id);
        assert_eq!(st["state"], "running", "[{}] {st}", m.name);
        assert!(
            st["tasks"].as_u64().unwrap_or(0) >= 2 || st["tasks"].is_null(),
            "[{}] {st}",
            m.name
        );
        if !freezer_usable(m) {
            // No freezer for this user: one clear error, nothing pretended.
            let o = run(m, &["sandbox", "pause", &id]);
            let err = text(&o.stderr);
            assert_eq!(code(&o), 125, "[{}] {err}", m.name);
            assert!(
                err.lines().count() == 1 && err.contains("freezer") && err.contains("delegate"),
                "[{}] {err}",
                m.name
            );
            assert_eq!(state(m, &id)["state"], "running", "[{}]", m.name);
            ok(m, &["sandbox", "rm", &id]);
            continue;
        }
        assert_eq!(ok(m, &["sandbox", "pause", &id]).trim(), id);
        let st = state(m, &id);
        assert_eq!(st["state"], "paused", "[{}] {st}", m.name);
        assert!(
            ok(m, &["sandbox", "ls"])
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("paused")),
            "[{}] ls does not say paused",
            m.name
        );
        let o = run(m, &["exec", &id, "--", "true"]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 125, "[{}] exec while paused: {err}", m.name);
        assert!(err.contains("paused"), "[{}] {err}", m.name);
        // The busy loop gets no cpu while paused (where cpu is accounted).
        let a = cpu_ms(m, &id);
        std::thread::sleep(Duration::from_millis(300));
        let b = cpu_ms(m, &id);
        assert!(
            b - a < 10.0,
            "[{}] cpu ran while paused: {a} -> {b}",
            m.name
        );
        assert_eq!(ok(m, &["sandbox", "resume", &id]).trim(), id);
        std::thread::sleep(Duration::from_millis(300));
        let c = cpu_ms(m, &id);
        assert!(
            c < 0.0 || c - b > 50.0,
            "[{}] not running after resume: {b} -> {c}",
            m.name
        );
        let st = state(m, &id);
        assert_eq!(st["state"], "running", "[{}] {st}", m.name);
        for k in ["last_used", "deadline"] {
            assert!(st[k].as_u64().unwrap_or(0) > 0, "[{}] {k}: {st}", m.name);
        }
        assert!(st["memory_bytes"].is_u64(), "[{}] {st}", m.name);
        assert_eq!(ok(m, &["exec", &id, "--", "echo", "on"]), "on\n");
        // Removed while paused: everything ends (a frozen process acts on
        // SIGKILL only once thawed).
        let init = st["init_pid"].as_i64().unwrap_or(0) as i32;
        ok(m, &["sandbox", "pause", &id]);
        ok(m, &["sandbox", "rm", &id]);
        assert!(gone(init), "[{}] a paused sandbox outlived rm", m.name);
    }
}

/// A keeper killed while its sandbox is paused cannot end it (the frozen
/// init never notices): `rm -f` and the sweep of `ls` thaw it.
#[test]
fn a_paused_sandbox_of_a_killed_keeper_ends() {
    let _g = shared();
    for m in modes("a_paused_sandbox_of_a_killed_keeper_ends") {
        if !freezer_usable(m) {
            eprintln!("SKIPPED [{}]: no freezer for this user", m.name);
            continue;
        }
        for how in ["rm -f", "ls"] {
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
            ok(m, &["sandbox", "pause", &id]);
            let st = state(m, &id);
            let (keeper, init) = (
                st["keeper_pid"].as_i64().unwrap_or(0) as i32,
                st["init_pid"].as_i64().unwrap_or(0) as i32,
            );
            if how == "rm -f" {
                ok(m, &["sandbox", "rm", "-f", &id]);
            } else {
                // SAFETY: kill with a pid and a signal.
                unsafe { libc::kill(keeper, libc::SIGKILL) };
                assert!(gone(keeper), "[{}] keeper", m.name);
                assert!(!ok(m, &["sandbox", "ls"]).contains(&id), "[{}]", m.name);
            }
            assert!(gone(init), "[{}] {how}: the paused sandbox stayed", m.name);
        }
    }
}

/// A keeper never waits on a command: `pause` while one runs answers at
/// once and freezes the command too (it cannot end while paused); after
/// `resume` it finishes normally.
#[test]
fn pausing_a_busy_sandbox_freezes_its_command() {
    let _g = shared();
    for m in modes("pausing_a_busy_sandbox_freezes_its_command") {
        if !freezer_usable(m) {
            eprintln!("SKIPPED [{}]: no freezer for this user", m.name);
            continue;
        }
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        let mut busy = nc(m, &["exec", &id, "--", "sleep", "1"])
            .spawn()
            .expect("spawn exec");
        std::thread::sleep(Duration::from_millis(300));
        let t = std::time::Instant::now();
        ok(m, &["sandbox", "pause", &id]);
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "[{}] pause waited for the command",
            m.name
        );
        assert_eq!(state(m, &id)["state"], "paused", "[{}]", m.name);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            busy.try_wait().expect("try_wait").is_none(),
            "[{}] the command ended while its sandbox was paused",
            m.name
        );
        ok(m, &["sandbox", "resume", &id]);
        assert!(busy.wait().expect("wait exec").success(), "[{}]", m.name);
        assert_eq!(state(m, &id)["state"], "running", "[{}]", m.name);
        assert_eq!(ok(m, &["exec", &id, "--", "echo", "on"]), "on\n");
        ok(m, &["sandbox", "rm", &id]);
    }
}

/// Several commands run in one sandbox at once (a keeper serves them all
/// from one thread), each with its own output and exit code, and the
/// output of `exec` streams as it comes.
#[test]
fn concurrent_execs_and_streaming_output() {
    let _g = shared();
    for m in modes("concurrent_execs_and_streaming_output") {
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        let t = std::time::Instant::now();
        let kids: Vec<_> = (0..8)
            .map(|i| {
                nc(
                    m,
                    &[
                        "exec",
                        &id,
                        "--",
                        "sh",
                        "-c",
                        &format!("sleep 1; echo {i}; exit {i}"),
                    ],
                )
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn exec")
            })
            .collect();
        for (i, k) in kids.into_iter().enumerate() {
            let o = k.wait_with_output().expect("wait");
            assert_eq!(o.status.code(), Some(i as i32), "[{}]", m.name);
            assert_eq!(text(&o.stdout), format!("{i}\n"), "[{}]", m.name);
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "[{}] 8 one-second commands took {:?}: they did not run at once",
            m.name,
            t.elapsed()
        );
        // Streaming: the first line arrives long before the command ends.
        let mut c = nc(
            m,
            &[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "echo first; sleep 3; echo second",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn exec");
        let t = std::time::Instant::now();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read");
        assert_eq!(line, "first\n", "[{}]", m.name);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "[{}] output was not streamed",
            m.name
        );
        assert!(c.wait().expect("wait").success());
        ok(m, &["sandbox", "rm", &id]);
    }
}

#[test]
fn bad_input_is_one_line_and_125() {
    let _g = shared();
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

#[test]
fn cp_in_and_out() {
    let _g = shared();
    for m in modes("cp_in_and_out") {
        let host = std::env::temp_dir().join(format!("nct-cp-{}-{}", m.name, std::process::id()));
        let tree = host.join("tree");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        std::fs::write(tree.join("sub/a.txt"), "A\n").expect("write");
        std::os::unix::fs::symlink("/etc/shadow", tree.join("link")).expect("symlink");
        std::fs::write(host.join("one.txt"), "one\n").expect("write");
        chmod_r(&host);
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        let p = |x: &str| host.join(x).to_string_lossy().into_owned();
        ok(m, &["cp", &p("one.txt"), &format!("{id}:/tmp/in/one.txt")]);
        ok(m, &["cp", &p("tree"), &format!("{id}:/tmp/tree")]);
        let seen = ok(
            m,
            &[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "cat /tmp/in/one.txt /tmp/tree/sub/a.txt; readlink /tmp/tree/link",
            ],
        );
        assert_eq!(seen, "one\nA\n/etc/shadow\n", "[{}]", m.name);
        let out = host.join(format!("out-{}", m.name));
        ok(
            m,
            &[
                "cp",
                &format!("{id}:/tmp/tree/sub/a.txt"),
                &out.to_string_lossy(),
            ],
        );
        assert_eq!(
            std::fs::read_to_string(&out).unwrap_or_default(),
            "A\n",
            "[{}]",
            m.name
        );
        let o = run(m, &["cp", &format!("{id}:/tmp/tree"), "-"]);
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        let mut names: Vec<String> = tar::Archive::new(&o.stdout[..])
            .entries()
            .expect("tar")
            .filter_map(|e| {
                e.ok()
                    .and_then(|e| e.path().ok().map(|p| p.to_string_lossy().into_owned()))
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["./", "./link", "./sub/", "./sub/a.txt"],
            "[{}]",
            m.name
        );
        for bad in [
            vec![
                "cp".to_string(),
                format!("{id}:/no/such/file"),
                out.to_string_lossy().into_owned(),
            ],
            vec![
                "cp".to_string(),
                p("one.txt"),
                format!("{id}:/usr/not-writable"),
            ],
            vec!["cp".to_string(), p("one.txt"), format!("{id}:relative")],
        ] {
            let args: Vec<&str> = bad.iter().map(String::as_str).collect();
            let o = run(m, &args);
            assert_eq!(code(&o), 125, "[{}] {args:?}", m.name);
            assert_eq!(
                text(&o.stderr).lines().count(),
                1,
                "[{}] {}",
                m.name,
                text(&o.stderr)
            );
        }
        ok(m, &["sandbox", "rm", &id]);
        let _ = std::fs::remove_dir_all(&host);
    }
}

/// A symlink swapped in a tight loop inside the sandbox, between a file of
/// its own and the path of a host file, while files are copied in and out:
/// nanoclaw never reads or writes the host file (the copy runs inside).
#[test]
fn cp_never_follows_a_swapped_symlink_out() {
    let _g = shared();
    for m in modes("cp_never_follows_a_swapped_symlink_out") {
        let host = std::env::temp_dir().join(format!("nct-race-{}-{}", m.name, std::process::id()));
        std::fs::create_dir_all(&host).expect("mkdir");
        let secret = host.join("secret");
        std::fs::write(&secret, "HOSTSECRET\n").expect("write");
        std::fs::write(host.join("payload"), "NEW\n").expect("write");
        chmod_r(&host);
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        let s = secret.to_string_lossy();
        let swapper = format!(
            "mkdir -p $(dirname {s}); echo inside > /tmp/f; \
             (while :; do ln -sfn {s} /tmp/race; ln -sfn /tmp/f /tmp/race; ln -sfn /proc/1/root{s} /tmp/race; \
              rm -f /tmp/race; echo inside > /tmp/race; done) >/dev/null 2>&1 </dev/null &"
        );
        ok(m, &["exec", &id, "--", "sh", "-c", &swapper]);
        let out = host.join("out");
        for _ in 0..30 {
            let _ = run(
                m,
                &["cp", &format!("{id}:/tmp/race"), &out.to_string_lossy()],
            );
            let got = std::fs::read_to_string(&out).unwrap_or_default();
            assert!(
                !got.contains("HOSTSECRET"),
                "[{}] cp read the host file through a symlink",
                m.name
            );
            let _ = run(
                m,
                &[
                    "cp",
                    &host.join("payload").to_string_lossy(),
                    &format!("{id}:/tmp/race"),
                ],
            );
        }
        assert_eq!(
            std::fs::read_to_string(&secret).unwrap_or_default(),
            "HOSTSECRET\n",
            "[{}] the host file was written",
            m.name
        );
        ok(m, &["sandbox", "rm", &id]);
        let _ = std::fs::remove_dir_all(&host);
    }
}

/// World-readable, so the rootless user can read what the test prepared.
fn chmod_r(dir: &std::path::Path) {
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir)
        .status();
    // The rootless user writes the copies it takes out here.
    let _ = std::process::Command::new("chmod")
        .arg("1777")
        .arg(dir)
        .status();
    let mut p = dir.parent();
    while let Some(d) = p {
        let _ = std::process::Command::new("chmod")
            .arg("a+x")
            .arg(d)
            .status();
        p = d.parent();
        if d == std::path::Path::new("/tmp") {
            break;
        }
    }
}

/// What sandboxes leave on the host: keepers, cgroup directories, state.
fn traces(m: Mode) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        // Keepers of this test's binary (not of another build's tests).
        let ours = std::fs::read_link(e.path().join("exe")).is_ok_and(|x| x == bin_for(m));
        if let (true, Ok(cmd)) = (ours, std::fs::read(e.path().join("cmdline"))) {
            if String::from_utf8_lossy(&cmd).contains("__keeper") {
                out.push(format!("keeper {}", e.file_name().to_string_lossy()));
            }
        }
    }
    let parent = match m.user {
        Some((uid, _)) => format!("nanoclaw-{uid}"),
        None => "nanoclaw".to_string(),
    };
    for c in ["memory", "cpu", "pids"] {
        let d = std::path::Path::new("/sys/fs/cgroup").join(c).join(&parent);
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let sandbox_id = name.len() == 12 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if sandbox_id && e.path().is_dir() {
                out.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    let state = match m.user {
        Some((uid, _)) => format!("/tmp/nanoclaw-{uid}/sandboxes"),
        None => "/run/nanoclaw/sandboxes".to_string(),
    };
    for e in std::fs::read_dir(state).into_iter().flatten().flatten() {
        out.push(e.path().to_string_lossy().into_owned());
    }
    out
}

#[test]
fn create_exec_rm_cycles_leave_nothing() {
    let _g = SERIAL.write().unwrap_or_else(|e| e.into_inner());
    let cycles: usize = std::env::var("NANOCLAW_SANDBOX_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for m in modes("create_exec_rm_cycles_leave_nothing") {
        let before = traces(m);
        let t0 = Instant::now();
        for i in 0..cycles {
            let id = ok(m, &["sandbox", "create"]).trim().to_string();
            assert_eq!(
                ok(
                    m,
                    &[
                        "exec",
                        &id,
                        "--",
                        "sh",
                        "-c",
                        "echo $((1+1)); sleep 60 >/dev/null 2>&1 &"
                    ]
                ),
                "2\n"
            );
            if i % 2 == 0 {
                ok(m, &["sandbox", "rm", &id]);
            } else {
                ok(m, &["sandbox", "rm", "-f", &id]);
            }
        }
        eprintln!(
            "[{}] {cycles} create/exec/rm cycles in {:?}",
            m.name,
            t0.elapsed()
        );
        // A forced rm leaves the kernel a moment to finish the teardown.
        let deadline = Instant::now() + Duration::from_secs(5);
        let new = || -> Vec<String> {
            traces(m)
                .into_iter()
                .filter(|t| !before.contains(t))
                .collect()
        };
        let mut left = new();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let _ = run(m, &["sandbox", "ls"]);
            left = new();
        }
        assert!(left.is_empty(), "[{}] left behind: {left:?}", m.name);
    }
}

#[test]
fn prune_removes_what_it_is_told_to() {
    // Pruning acts on every sandbox of the user: no other test may have one.
    let _g = SERIAL.write().unwrap_or_else(|e| e.into_inner());
    for m in modes("prune_removes_what_it_is_told_to") {
        let keep = ok(m, &["sandbox", "create", "--label", "prune=test"])
            .trim()
            .to_string();
        let o = run(m, &["sandbox", "prune"]);
        assert_eq!(code(&o), 125, "[{}] prune needs a criterion", m.name);
        ok(m, &["sandbox", "prune", "--idle", "1h"]);
        assert!(
            ok(m, &["sandbox", "ls"]).contains(&keep),
            "[{}] pruned a fresh sandbox",
            m.name
        );
        std::thread::sleep(Duration::from_millis(1100));
        ok(m, &["sandbox", "prune", "--idle", "1s"]);
        assert!(
            !ok(m, &["sandbox", "ls"]).contains(&keep),
            "[{}] not pruned",
            m.name
        );
    }
}

/// Sends a stop request to a keeper socket from inside another sandbox that
/// has the state directory mounted; prints what came back.
const FOREIGN_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    s.sendall(b'{"op":"stop"}\n')
    print("reply:" + s.recv(4096).decode(errors="replace").strip())
except OSError as e:
    print("refused:", e)
"#;

/// Red team F1: rootless, sandboxed code runs as the owner's host uid; a
/// sandbox with the state directory mounted must still not be able to drive
/// another sandbox's keeper.
#[test]
fn a_sandbox_cannot_drive_another_sandboxs_keeper() {
    let _g = shared();
    for m in modes("a_sandbox_cannot_drive_another_sandboxs_keeper") {
        let root = match m.user {
            Some((uid, _)) => format!("/tmp/nanoclaw-{uid}"),
            None => "/run/nanoclaw".to_string(),
        };
        let victim = ok(m, &["sandbox", "create"]).trim().to_string();
        let attacker = ok(
            m,
            &["sandbox", "create", "--mount", &format!("{root}:/h:ro")],
        )
        .trim()
        .to_string();
        let sock = format!("/h/sandboxes/{victim}/sock");
        let out = ok(
            m,
            &[
                "exec",
                &attacker,
                "--",
                "python3",
                "-c",
                FOREIGN_CLIENT,
                &sock,
            ],
        );
        assert!(
            !out.contains("stopping"),
            "[{}] the attacker stopped the victim: {out}",
            m.name
        );
        assert_eq!(
            ok(m, &["exec", &victim, "--", "echo", "alive"]),
            "alive\n",
            "[{}] {out}",
            m.name
        );
        ok(m, &["sandbox", "rm", &victim, &attacker]);
    }
}

/// Red team F2 and F4: a keeper busy with a long exec does not make `rm`
/// wait; a FIFO at a copy's destination is refused; one process cannot set
/// another's resource limits (nor init's).
#[test]
fn busy_keepers_fifos_and_foreign_rlimits() {
    let _g = shared();
    for m in modes("busy_keepers_fifos_and_foreign_rlimits") {
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        ok(m, &["exec", &id, "--", "mkfifo", "/tmp/ff"]);
        let src = std::env::temp_dir().join(format!("nct-fifo-src-{}", std::process::id()));
        std::fs::write(&src, "x").expect("write");
        let _ = std::process::Command::new("chmod")
            .arg("a+r")
            .arg(&src)
            .status();
        let t0 = Instant::now();
        let o = run(m, &["cp", &src.to_string_lossy(), &format!("{id}:/tmp/ff")]);
        assert_eq!(
            code(&o),
            125,
            "[{}] copy onto a FIFO: {}",
            m.name,
            text(&o.stderr)
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "[{}] the copy hung on the FIFO",
            m.name
        );
        let o = run(m, &["exec", &id, "--", "sh", "-c", "sleep 30 & prlimit --pid $! --nofile=4:4 || echo refused; prlimit --pid 1 --nofile=4:4 || echo refused"]);
        assert_eq!(
            text(&o.stdout),
            "refused\nrefused\n",
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
        let busy = nc(m, &["exec", &id, "--", "sleep", "60"])
            .spawn()
            .expect("spawn exec");
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        ok(m, &["sandbox", "rm", &id]);
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "[{}] rm waited {:?} for a busy keeper",
            m.name,
            t0.elapsed()
        );
        let o = busy.wait_with_output().expect("exec");
        assert_ne!(
            code(&o),
            0,
            "[{}] the interrupted exec reported success",
            m.name
        );
        let _ = std::fs::remove_file(&src);
    }
}

/// A state file whose keeper pid now belongs to another process (the keeper
/// died and the pid was reused) must not make `rm` signal that process.
#[test]
fn rm_never_signals_a_process_that_reused_a_keepers_pid() {
    let _g = shared();
    if !is_root() {
        println!("SKIP rm_never_signals_a_process_that_reused_a_keepers_pid: writes /run/nanoclaw as root");
        return;
    }
    let m = modes("rm_never_signals_a_process_that_reused_a_keepers_pid")[0];
    let id = ok(m, &["sandbox", "create"]).trim().to_string();
    let dir = std::path::Path::new("/run/nanoclaw/sandboxes").join(&id);
    let mut st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state"))
            .expect("json");
    let keeper = st["keeper_pid"].as_i64().unwrap_or(0) as i32;
    // Start times have clock-tick (10 ms) resolution.
    std::thread::sleep(Duration::from_millis(50));
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    // The state now names the bystander, with the keeper's start time.
    st["keeper_pid"] = serde_json::json!(bystander.id());
    std::fs::write(dir.join("state.json"), st.to_string()).expect("rewrite state");
    let o = run(m, &["sandbox", "rm", "-f", &id]);
    let survived = bystander.try_wait().ok().flatten().is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    // SAFETY: kill with a pid and a signal (the real keeper, ours).
    unsafe { libc::kill(keeper, libc::SIGKILL) };
    let _ = run(m, &["sandbox", "ls"]);
    assert!(
        survived,
        "rm -f killed a process that had the keeper's pid: {}",
        text(&o.stderr)
    );
}

#[test]
fn exec_runs_snippets_with_lang() {
    let _g = shared();
    for m in modes("exec_runs_snippets_with_lang") {
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        assert_eq!(
            ok(
                m,
                &[
                    "exec",
                    "--lang",
                    "python",
                    "--code",
                    "import sys; print(6*7, sys.argv[1:])",
                    &id,
                    "--",
                    "a"
                ]
            ),
            "42 ['a']\n",
            "[{}]",
            m.name
        );
        assert_eq!(
            ok(
                m,
                &[
                    "exec",
                    "--lang",
                    "sh",
                    "--code",
                    "echo \"$0:$1\"",
                    &id,
                    "--",
                    "x"
                ]
            ),
            "sh:x\n",
            "[{}]",
            m.name
        );
        if std::path::Path::new("/usr/bin/go").exists() {
            // Compiled in the sandbox; its build cache stays in its /tmp.
            let go = "package main\nimport (\"fmt\"; \"os\")\nfunc main() { fmt.Println(\"go\", os.Args[1]) }\n";
            for _ in 0..2 {
                let o = run(
                    m,
                    &[
                        "exec",
                        "--timeout",
                        "120s",
                        "--lang",
                        "go",
                        "--code",
                        go,
                        &id,
                        "--",
                        "arg",
                    ],
                );
                assert_eq!(
                    text(&o.stdout),
                    "go arg\n",
                    "[{}] {}",
                    m.name,
                    text(&o.stderr)
                );
            }
            assert_eq!(
                ok(
                    m,
                    &[
                        "exec",
                        &id,
                        "--",
                        "sh",
                        "-c",
                        "test -d /tmp/nanoclaw-go && echo cache"
                    ]
                ),
                "cache\n",
                "[{}]",
                m.name
            );
        } else {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_GO").map_or(true, |v| v != "1"),
                "NANOCLAW_REQUIRE_GO=1 but /usr/bin/go is missing (apt-get install golang-go)"
            );
            eprintln!("SKIPPED exec --lang go: /usr/bin/go is missing (apt-get install golang-go)");
        }
        let o = run(m, &["exec", &id]);
        assert_eq!(code(&o), 125, "[{}] exec without a command", m.name);
        assert_eq!(
            text(&o.stderr).lines().count(),
            1,
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
        ok(m, &["sandbox", "rm", &id]);
    }
}

/// `exec --json` reports what the sandbox's egress proxy (in its keeper)
/// did during that command: its refusals, not the earlier commands'.
#[test]
fn exec_json_reports_the_commands_egress_refusals() {
    let _g = shared();
    for m in modes("exec_json_reports_the_commands_egress_refusals") {
        let id = ok(
            m,
            &[
                "sandbox",
                "create",
                "--network",
                "allowlist",
                "--allow-host",
                "example.com",
            ],
        )
        .trim()
        .to_string();
        let exec_json = |args: &[&str]| -> serde_json::Value {
            let mut all = vec!["exec", "--json", id.as_str(), "--"];
            all.extend_from_slice(args);
            let o = run(m, &all);
            serde_json::from_slice(&o.stdout).expect("exec --json")
        };
        // Private addresses are refused by the proxy before it connects:
        // nothing leaves the machine.
        for last in ["1", "2"] {
            let url = format!("http://10.255.255.{last}:81/");
            let v = exec_json(&["curl", "-fsS", "-m", "5", &url]);
            let net = &v["network"];
            assert_eq!(net["mode"], "allowlist", "[{}] {v}", m.name);
            assert_eq!(net["denied"], 1, "[{}] {v}", m.name);
            let d = net["denials"].as_array().expect("denials");
            assert_eq!(d.len(), 1, "[{}] {v}", m.name);
            assert_eq!(d[0]["destination"], format!("10.255.255.{last}"));
            assert_eq!(d[0]["port"], 81);
        }
        let v = exec_json(&["true"]);
        assert_eq!(v["network"]["denied"], 0, "[{}] {v}", m.name);
        assert_eq!(v["network"]["denials"], serde_json::json!([]));
        ok(m, &["sandbox", "rm", &id]);
        // Without a network, the report says so.
        let id = ok(m, &["sandbox", "create"]).trim().to_string();
        let o = run(m, &["exec", "--json", &id, "--", "true"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("exec --json");
        assert_eq!(v["network"]["mode"], "none", "[{}] {v}", m.name);
        ok(m, &["sandbox", "rm", &id]);
    }
}
