//! Attacks the red team ran against `nanoclaw run`, kept as regression
//! tests: each one fails when its defence is removed. Root and rootless.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Opens inotify instances until refused, then watches on one instance
/// until refused, prints both counts and `READY`, and holds everything.
const INOTIFY_BOMB: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 100000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print("instances", len(fds), os.strerror(ctypes.get_errno()), flush=True)
watches = 0
if fds:
    os.close(fds.pop())
    ino = libc.inotify_init1(0)
    d = "/tmp/w"
    os.mkdir(d)
    for i in range(40000):
        p = f"{d}/{i}".encode()
        open(p, "w").close()
        if libc.inotify_add_watch(ino, p, 0x2) < 0:
            break
        watches += 1
print("watches", watches, os.strerror(ctypes.get_errno()), flush=True)
print("READY", flush=True)
time.sleep(20)
"#;

fn inotify_instance_ok() -> bool {
    // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: closing the fd just made.
        unsafe { libc::close(fd) };
        return true;
    }
    false
}

/// A sandbox that takes every inotify instance and watch it can must leave
/// the host (rootful: host root) and a second sandbox able to use inotify.
#[test]
fn inotify_exhaustion_is_contained() {
    for m in modes("inotify_exhaustion_is_contained") {
        let mut ch = nc(
            m,
            &[
                "run",
                "--timeout",
                "60s",
                "--tmpfs-size",
                "200m",
                "--",
                "python3",
                "-c",
                INOTIFY_BOMB,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nanoclaw");
        let mut lines = BufReader::new(ch.stdout.take().expect("stdout")).lines();
        let mut report = Vec::new();
        let t0 = Instant::now();
        for l in lines.by_ref() {
            let l = l.expect("read");
            if l == "READY" {
                break;
            }
            report.push(l);
            assert!(
                t0.elapsed() < Duration::from_secs(50),
                "no READY: {report:?}"
            );
        }
        eprintln!("[{}] attacker got: {report:?}", m.name);
        let count = |what: &str| -> u64 {
            report
                .iter()
                .find_map(|l| {
                    l.strip_prefix(what)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("[{}] no {what} line in {report:?}", m.name))
        };
        let (instances, watches) = (count("instances "), count("watches "));
        // While the attacker holds all it could get:
        let host_ok = m.user.is_some() || inotify_instance_ok();
        let second = run(
            m,
            &[
                "run",
                "--",
                "python3",
                "-c",
                "import ctypes; l=ctypes.CDLL(None); print(l.inotify_init1(0) >= 0)",
            ],
        );
        let _ = ch.kill();
        let _ = ch.wait();
        assert!(
            instances <= 32,
            "[{}] one sandbox opened {instances} inotify instances",
            m.name
        );
        assert!(
            watches <= 16384,
            "[{}] one sandbox added {watches} inotify watches",
            m.name
        );
        assert!(
            host_ok,
            "[{}] host root cannot create an inotify instance while a sandbox holds its quota",
            m.name
        );
        assert_eq!(
            text(&second.stdout).trim(),
            "True",
            "[{}] a second sandbox cannot use inotify: {}",
            m.name,
            text(&second.stderr)
        );
    }
}

/// Opens inotify instances until refused, prints how many and `READY`,
/// and holds them.
const INOTIFY_HOLDER: &str = r#"
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 100000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print("instances", len(fds), os.strerror(ctypes.get_errno()), flush=True)
print("READY", flush=True)
time.sleep(60)
"#;

/// Issue 10: every rootful sandbox's user namespace was owned by root, so
/// above its own level each was charged to host root's per-user pool
/// (`fs.inotify.max_user_instances`, 128): four sandboxes at their
/// 32-instance cap left no instance for a fifth sandbox, nor for the host's
/// root. With a host id slot (and namespace owner) per sandbox, enough
/// attackers to fill root's pool several times over starve nobody.
#[test]
fn inotify_exhaustion_by_many_sandboxes_starves_no_other() {
    if !is_root() {
        eprintln!("SKIPPED inotify_exhaustion_by_many_sandboxes_starves_no_other: rootful only (rootless sandboxes share their user's pool by design)");
        return;
    }
    let pool: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("max_user_instances")
        .trim()
        .parse()
        .expect("a number");
    // Enough sandboxes at their 32-instance cap to take all of a shared
    // pool, and one more.
    let attackers = pool.div_ceil(32) + 1;
    assert!(
        attackers <= 17,
        "fs.inotify.max_user_instances={pool} is raised on this host: the attack needs {attackers} sandboxes; run this test where it is 128"
    );
    let m = modes("inotify_exhaustion_by_many_sandboxes_starves_no_other")[0];
    let mut held = Vec::new();
    for _ in 0..attackers {
        let mut ch = nc(
            m,
            &[
                "run",
                "--timeout",
                "90s",
                "--",
                "python3",
                "-c",
                INOTIFY_HOLDER,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nanoclaw");
        let mut lines = BufReader::new(ch.stdout.take().expect("stdout")).lines();
        let mut report = Vec::new();
        for l in lines.by_ref() {
            let l = l.expect("read");
            if l == "READY" {
                break;
            }
            report.push(l);
        }
        held.push((ch, report, lines));
    }
    let got: Vec<String> = held.iter().map(|(_, r, _)| r.join(" ")).collect();
    eprintln!("attackers got: {got:?}");
    // While every attacker holds all it could get:
    let host_ok = inotify_instance_ok();
    let victim = run(
        m,
        &[
            "run",
            "--",
            "python3",
            "-c",
            "import ctypes, os; l = ctypes.CDLL(None, use_errno=True); fd = l.inotify_init1(0); \
             print(fd >= 0, os.strerror(ctypes.get_errno()))",
        ],
    );
    for (ch, _, _) in &mut held {
        let _ = ch.kill();
        let _ = ch.wait();
    }
    assert!(
        text(&victim.stdout).starts_with("True"),
        "another sandbox cannot use inotify while {attackers} sandboxes hold theirs: {} / {}",
        text(&victim.stdout),
        text(&victim.stderr)
    );
    assert!(
        host_ok,
        "host root cannot create an inotify instance while {attackers} sandboxes hold theirs"
    );
    for r in &got {
        assert!(
            r.starts_with("instances 32 "),
            "each attacker reaches its own namespace's cap of 32, no fewer: {got:?}"
        );
    }
}

/// Writes 1 GiB into a memfd (pages no rlimit counts), then reports.
const MEMFD_BOMB: &str = r#"
import os, ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("shmget 1 GiB", libc.shmget(0, 1 << 30, 0o1600) >= 0, flush=True)
try:
    fd = os.memfd_create("bomb")
except OSError as e:
    print("memfd refused", e.errno, flush=True)
else:
    chunk = b"x" * (1 << 20)
    for _ in range(1024):
        os.write(fd, chunk)
    print("memfd held 1 GiB", flush=True)
"#;

/// The red team's memfd bomb held 5 GiB under a 512m limit rootless
/// without a delegated cgroup, reported as a 9 MB peak. With a memory
/// cgroup the bomb is OOM-killed; without one memfd_create is refused, the
/// outcome says the sandbox as a whole has no memory limit, and no peak is
/// made up. SysV shared memory is bounded in every mode.
#[test]
fn memfd_bomb_never_exceeds_a_claimed_limit() {
    for m in modes("memfd_bomb_never_exceeds_a_claimed_limit") {
        for delegated in [true, false] {
            if m.user.is_none() && !delegated {
                continue; // root always has its cgroups
            }
            let mut c = nc(
                m,
                &[
                    "run",
                    "--json",
                    "--timeout",
                    "60s",
                    "--",
                    "python3",
                    "-c",
                    MEMFD_BOMB,
                ],
            );
            if !delegated {
                c.env("NANOCLAW_CGROUP_PARENT", "nanoclaw-not-delegated-here");
            }
            let o = c.output().expect("run nanoclaw");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
                panic!(
                    "[{}] --json: {e}: {} / {}",
                    m.name,
                    text(&o.stdout),
                    text(&o.stderr)
                )
            });
            let out = v["stdout"].as_str().unwrap_or_default().to_string();
            let tag = format!("[{} delegated={delegated}]", m.name);
            eprintln!(
                "{tag} killed_by={} peak={} stdout={out:?}",
                v["killed_by"], v["peak_memory_bytes"]
            );
            assert!(
                !out.contains("memfd held 1 GiB"),
                "{tag} the memfd bomb held 1 GiB under a 512m limit: {v}"
            );
            // Rootless with a memory cgroup, shm pages are charged to it.
            if m.user.is_none() || !delegated {
                assert!(
                    !out.contains("shmget 1 GiB True"),
                    "{tag} SysV shm of 1 GiB allowed: {v}"
                );
            }
            if delegated {
                assert_eq!(v["killed_by"], "oom", "{tag} {v}");
            } else {
                assert!(out.contains("memfd refused"), "{tag} {v}");
                assert!(
                    v["peak_memory_bytes"].is_null(),
                    "{tag} a peak without a memory cgroup: {v}"
                );
                let degraded = v["layers"]["degraded"].to_string();
                assert!(
                    degraded.contains("no memory limit"),
                    "{tag} the outcome must say there is no sandbox-wide memory limit: {degraded}"
                );
            }
        }
    }
}

/// Even with CAP_SYS_RESOURCE in its namespace, a sandbox cannot lift the
/// per-namespace limits init wrote (`/proc/sys` is read-only inside).
#[test]
fn namespace_limits_cannot_be_raised_from_inside() {
    for m in modes("namespace_limits_cannot_be_raised_from_inside") {
        let o = run(
            m,
            &[
                "run",
                "--cap-add",
                "SYS_RESOURCE",
                "--",
                "sh",
                "-c",
                "echo 100000 > /proc/sys/user/max_inotify_instances 2>/dev/null; \
                 cat /proc/sys/user/max_inotify_instances /proc/sys/user/max_user_namespaces",
            ],
        );
        assert_eq!(
            text(&o.stdout),
            "32\n0\n",
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
    }
}

/// A bind of the host's /tmp (where nanoclaw assembles the sandbox's root in
/// the sandbox's own mount namespace) shows the host's /tmp, read-only, and
/// not a copy of the sandbox's root stacked over a hidden read-write mount.
#[test]
fn binding_the_hosts_tmp_shows_the_hosts_tmp() {
    let marker = format!("nct-tmp-marker-{}", std::process::id());
    let path = std::path::Path::new("/tmp").join(&marker);
    std::fs::write(&path, "x").expect("marker");
    let _ = std::process::Command::new("chmod")
        .arg("644")
        .arg(&path)
        .status();
    for m in modes("binding_the_hosts_tmp_shows_the_hosts_tmp") {
        let script = format!(
            "test -e /h/{marker} && echo seen; grep -c ' /h ' /proc/self/mountinfo; touch /h/w 2>/dev/null || echo ro"
        );
        // HOME=/tmp (the tests' default) would make /tmp a home directory,
        // which nanoclaw refuses to mount.
        let o = nc(m, &["run", "-v", "/tmp:/h", "--", "sh", "-c", &script])
            .env("HOME", "/nonexistent")
            .output()
            .expect("run nanoclaw");
        assert_eq!(
            text(&o.stdout),
            "seen\n1\nro\n",
            "[{}] {}",
            m.name,
            text(&o.stderr)
        );
    }
    let _ = std::fs::remove_file(&path);
}
