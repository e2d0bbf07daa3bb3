//! Many threads start, wait for and kill sandboxes at once while other
//! threads are created and destroyed and allocate: the way the daemon and
//! the agent drive the engine. A `clone` from a multithreaded process must
//! never hang the new sandbox (glibc's set*id wrappers wait for threads
//! that exist only in the parent; an allocator lock held by another thread
//! at the clone stays held in the child) nor the caller.
//!
//! A custom harness (`harness = false`): the test runs the workload as the
//! invoking user and, when root and the rootless user `nanotest` exists,
//! again as that user (a copy of this binary re-executed with `--worker`).
//! A watchdog fails the run if the workload has not finished in time.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoclaw_sandbox::spec::Network;
use nanoclaw_sandbox::{start, wait, RunOptions, SandboxSpec};

const STARTERS: usize = 8;
const PER_STARTER: usize = 12;
const CHURNERS: usize = 3;
const WATCHDOG: Duration = Duration::from_secs(180);
const ROOTLESS_USER: &str = "nanotest";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--worker") {
        return workload("rootless");
    }
    // `cargo test -- --list` and filters: this binary has one test.
    if args.iter().any(|a| a == "--list") {
        println!("stress: test");
        return ExitCode::SUCCESS;
    }
    let mode = if is_root() { "root" } else { "invoking-user" };
    println!("stress ({mode}): {STARTERS} threads x {PER_STARTER} sandboxes, {CHURNERS} threads churning");
    let rc = workload(mode);
    if rc != ExitCode::SUCCESS {
        return rc;
    }
    rootless()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn rootless_uid() -> Option<(String, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == ROOTLESS_USER).then(|| (f[2].to_string(), f[3].to_string()))
    })
}

/// Re-runs this binary as the rootless user, from a world-readable copy.
fn rootless() -> ExitCode {
    let required = std::env::var("NANOCLAW_REQUIRE_ROOTLESS").is_ok_and(|x| x == "1");
    if !is_root() {
        println!("NOTE stress: not root, so the run above was the rootless run");
        return ExitCode::SUCCESS;
    }
    let Some((uid, gid)) = rootless_uid() else {
        if required {
            eprintln!(
                "stress: NANOCLAW_REQUIRE_ROOTLESS=1 but user `{ROOTLESS_USER}` does not exist"
            );
            return ExitCode::FAILURE;
        }
        println!("SKIPPED stress (rootless): user `{ROOTLESS_USER}` does not exist (CI: .ci/setup-test-user.sh)");
        return ExitCode::SUCCESS;
    };
    let dir = std::env::temp_dir().join(format!("nanoclaw-stress-{}", std::process::id()));
    let bin: PathBuf = dir.join("stress");
    let staged = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::env::current_exe())
        .and_then(|exe| std::fs::copy(exe, &bin))
        .and_then(|_| std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)));
    if let Err(e) = staged {
        eprintln!(
            "stress: staging a copy for {ROOTLESS_USER} in {}: {e}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    let status = Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "--"])
        .arg(&bin)
        .arg("--worker")
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .current_dir("/")
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("stress (rootless) failed: {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("stress: running setpriv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What one started sandbox is made to do.
fn spec_for(n: usize) -> (SandboxSpec, bool) {
    let kill = n % 4 == 1;
    let mut spec = if kill {
        SandboxSpec::new(["sleep", "30"])
    } else {
        SandboxSpec::new(["sh", "-c", "echo ok"])
    };
    spec.limits.timeout = Duration::from_secs(60);
    if n.is_multiple_of(3) {
        spec.network = Network::Allowlist {
            hosts: vec!["example.invalid".into()],
            cidrs: Vec::new(),
            limits: Default::default(),
        };
    }
    (spec, kill)
}

fn workload(mode: &str) -> ExitCode {
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));

    // Threads that are created and destroyed all the time, and allocate:
    // one of them is being born (or holds the allocator) at most clones.
    let churners: Vec<_> = (0..CHURNERS)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    let h = std::thread::spawn(move || vec![k as u8; 1 + (k * 7919) % 65536].len());
                    k = k.wrapping_add(h.join().unwrap_or(0));
                    keep.push(vec![0u8; 1 + k % 200_000]);
                    if keep.len() > 64 {
                        keep.clear();
                    }
                }
            })
        })
        .collect();

    let starters: Vec<_> = (0..STARTERS)
        .map(|t| {
            let (done, failures) = (done.clone(), failures.clone());
            std::thread::spawn(move || {
                for i in 0..PER_STARTER {
                    let n = t * PER_STARTER + i;
                    let (spec, kill) = spec_for(n);
                    let r = start(&spec, RunOptions::default()).and_then(|sb| {
                        if kill {
                            let h = sb.kill_handle();
                            let killer = std::thread::spawn(move || {
                                std::thread::sleep(Duration::from_millis(20));
                                h.kill();
                            });
                            let o = wait(sb);
                            let _ = killer.join();
                            o
                        } else {
                            wait(sb)
                        }
                    });
                    let problem = match r {
                        Err(e) => Some(format!("sandbox {n}: {e}")),
                        Ok(o) if kill && o.killed_by.is_none() => {
                            Some(format!("sandbox {n}: not killed: {o:?}"))
                        }
                        Ok(o) if !kill && (o.exit_code != Some(0) || o.stdout != b"ok\n") => {
                            Some(format!(
                                "sandbox {n}: exit {:?} signal {:?} stdout {:?} stderr {:?}",
                                o.exit_code,
                                o.signal,
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            ))
                        }
                        Ok(_) => None,
                    };
                    if let Some(p) = problem {
                        if let Ok(mut f) = failures.lock() {
                            f.push(p);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let total = STARTERS * PER_STARTER;
    while done.load(Ordering::SeqCst) < total {
        if t0.elapsed() > WATCHDOG {
            eprintln!(
                "stress ({mode}): HANG: {} of {total} sandboxes finished after {:?}; \
                 a start or wait never returned",
                done.load(Ordering::SeqCst),
                t0.elapsed()
            );
            // Exit without joining the stuck threads; their sandboxes die
            // with this process (init's lifeline closes).
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for h in starters.into_iter().chain(churners) {
        let _ = h.join();
    }
    let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
    let left = children_left();
    println!(
        "stress ({mode}): {total} sandboxes in {:?}; {} failures; {} processes left",
        t0.elapsed(),
        failures.len(),
        left.len()
    );
    for f in failures.iter().take(10) {
        eprintln!("  {f}");
    }
    if !left.is_empty() {
        eprintln!("  processes left behind: {left:?}");
    }
    if failures.is_empty() && left.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Pids whose parent is this process (every sandbox must have been reaped).
fn children_left() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) after the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            out.push(pid);
        }
    }
    out
}
