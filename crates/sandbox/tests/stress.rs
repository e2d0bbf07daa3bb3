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

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoclaw_sandbox::spec::Network;
use nanoclaw_sandbox::{start, wait, RunOptions, SandboxSpec};

const STARTERS: usize = 8;
const PER_STARTER: usize = 12;
const CHURNERS: usize = 3;
const WATCHDOG: Duration = Duration::from_secs(180);

mod common;
use common::children_left;

fn main() -> ExitCode {
    println!("stress: {STARTERS} threads x {PER_STARTER} sandboxes, {CHURNERS} threads churning");
    common::main_with("stress", workload)
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
            add_hosts: Vec::new(),
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
