//! Library-level lifecycle checks of the native engine.

use std::time::Duration;

use nanoclaw_sandbox::{start, wait, RunOptions, SandboxSpec};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// A `KillHandle` kept after `wait` must not kill whatever process reuses
/// the sandbox's pid. The reuse is forced with `ns_last_pid` (root only).
#[test]
fn kill_handle_after_wait_spares_a_process_reusing_the_pid() {
    if !is_root() {
        println!("SKIP kill_handle_after_wait_spares_a_process_reusing_the_pid: needs root (ns_last_pid)");
        return;
    }
    let mut spec = SandboxSpec::new(["true"]);
    spec.limits.timeout = Duration::from_secs(10);
    for attempt in 0..20 {
        let sb = start(&spec, RunOptions::default()).expect("start");
        let pid = sb.pid();
        let handle = sb.kill_handle();
        let o = wait(sb).expect("wait");
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        // The next fork gets `pid` (unless someone else takes it first).
        if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
            println!("SKIP kill_handle_after_wait…: ns_last_pid is not writable here");
            return;
        }
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        if victim.id() as i32 != pid {
            let _ = victim.kill();
            let _ = victim.wait();
            eprintln!("attempt {attempt}: pid {pid} was taken by another process; retrying");
            continue;
        }
        handle.kill();
        std::thread::sleep(Duration::from_millis(100));
        let survived = alive(pid);
        let _ = victim.kill();
        let _ = victim.wait();
        assert!(
            survived,
            "the stale KillHandle SIGKILLed pid {pid}, now another process"
        );
        return;
    }
    panic!("could not get the sandbox's pid reused in 20 attempts");
}

/// Killing through a handle while `wait` runs still works.
#[test]
fn kill_handle_kills_a_running_sandbox() {
    let mut spec = SandboxSpec::new(["sleep", "30"]);
    spec.limits.timeout = Duration::from_secs(20);
    let sb = start(&spec, RunOptions::default()).expect("start");
    let h = sb.kill_handle();
    let k = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        h.kill();
    });
    let o = wait(sb).expect("wait");
    k.join().expect("killer");
    assert_eq!(
        o.killed_by,
        Some(nanoclaw_sandbox::KillReason::Killed),
        "{o:?}"
    );
    assert!(o.duration < Duration::from_secs(10), "{o:?}");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A NUL byte in the hostname or the workdir is refused before anything is
/// made: no pipe is left open (a start that got as far as its pipes would
/// leave ten descriptors; the margin is for the other tests, running at
/// the same time).
#[test]
fn a_nul_byte_in_hostname_or_workdir_leaves_nothing_open() {
    let before = open_fds();
    for i in 0..40 {
        let mut spec = SandboxSpec::new(["true"]);
        if i % 2 == 0 {
            spec.hostname = "bad\0name".into();
        } else {
            spec.workdir = Some("/tmp/bad\0dir".into());
        }
        let e = start(&spec, RunOptions::default()).expect_err("a NUL byte must be refused");
        assert!(e.to_string().contains("NUL"), "{e}");
    }
    let after = open_fds();
    assert!(
        after < before + 40,
        "descriptors left open: {before} before, {after} after 40 refused starts"
    );
}

/// Processes whose command line is exactly `argv`.
fn processes_running(argv: &[&str]) -> Vec<String> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|p| alive(p.parse().unwrap_or(0)))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Directories named `name` under /sys/fs/cgroup (any hierarchy, any depth
/// up to 9).
fn cgroups_named(name: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, name: &str, depth: u32, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            }
            if depth < 9 {
                walk(&e.path(), name, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(std::path::Path::new("/sys/fs/cgroup"), name, 0, &mut out);
    out
}

/// `exit_after_wait` (what `nanoclaw run` sets) lets `wait` return before
/// init's exit, which tears down the namespaces. It must still return only
/// once nothing else of the sandbox runs and its cgroup is gone, and the
/// cpu time must still count every process init reaped: here a background
/// process that burned cpu and was still running when the command ended.
#[test]
fn exit_after_wait_returns_once_nothing_else_runs_and_counts_its_cpu() {
    let marker = format!("{}", 1000 + std::process::id() % 1000);
    let script = format!(
        "sleep {marker} & (i=0; while :; do i=$((i+1)); done) & \
         t=$(date +%s%N); while [ $(( $(date +%s%N) - t )) -lt 400000000 ]; do sleep 0.05; done; exit 7"
    );
    let mut spec = SandboxSpec::new(["sh", "-c", &script]);
    spec.limits.timeout = Duration::from_secs(30);
    let opts = RunOptions {
        exit_after_wait: true,
        ..RunOptions::default()
    };
    let sb = start(&spec, opts).expect("start");
    let init = sb.pid();
    let o = wait(sb).expect("wait");
    assert_eq!((o.exit_code, o.killed_by), (Some(7), None), "{o:?}");
    let left = processes_running(&["sleep", &marker]);
    assert!(
        left.is_empty(),
        "still running after wait returned: {left:?}"
    );
    let cgroups = cgroups_named(&o.sandbox_id);
    assert!(cgroups.is_empty(), "cgroup left: {cgroups:?}");
    // The busy loop ran ≈0.4 s of the run on one of two cores at least.
    assert!(
        o.cpu_time >= Duration::from_millis(150),
        "cpu time {:?} misses the background process's",
        o.cpu_time
    );
    // Init, left unreaped by `wait`, exits on its own once its lifeline is
    // closed; this test is the caller that reaps it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    // SAFETY: waitpid for our own child with a valid status pointer.
    while unsafe { libc::waitpid(init, &mut status, libc::WNOHANG) } == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "init {init} still running 5 s after wait returned"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
