//! The defence that keeps a killed holder (or `nanoclaw run`) from
//! leaving QEMU and virtiofsd running: every VM process is started by
//! `procs::spawn_tied`, with `PR_SET_PDEATHSIG=SIGKILL` from a launcher
//! thread that lives as long as the process. Tested by attack: a child
//! process of this test starts a long `sleep` with `spawn_tied` (from a
//! short-lived thread, as a daemon's pool thread would), says its pid and
//! is SIGKILLed; the `sleep` must die with it. Without the death signal
//! the `sleep` is adopted by init and keeps running (shown once: the test
//! failed with the `prctl` removed).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nanoclaw_microvm::procs;

/// Set in the child that starts the tied process and waits to be killed.
const OWNER: &str = "NANOCLAW_TEST_TIED_OWNER";

fn own() -> ! {
    let child = std::thread::spawn(|| {
        let mut c = Command::new("sleep");
        c.arg("600").stdout(Stdio::null());
        procs::spawn_tied(c).expect("spawn_tied")
    })
    .join()
    .expect("the starting thread");
    println!("\nTIED {}", child.id());
    std::thread::sleep(Duration::from_secs(600));
    std::process::exit(0)
}

#[test]
fn a_tied_child_dies_with_its_sigkilled_owner() {
    if std::env::var_os(OWNER).is_some() {
        own();
    }
    let mut owner = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_tied_child_dies_with_its_sigkilled_owner",
            "--nocapture",
        ])
        .env(OWNER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("owner");
    let mut out = BufReader::new(owner.stdout.take().expect("stdout"));
    let mut line = String::new();
    let pid: i32 = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("owner output") > 0,
            "the owner ended without starting its child"
        );
        if let Some(p) = line.trim().strip_prefix("TIED ") {
            break p.parse().expect("pid");
        }
    };
    let start = procs::start_time(pid).expect("the tied child runs");
    owner.kill().expect("SIGKILL the owner");
    let _ = owner.wait();
    // Generous: the machine may be loaded; the kernel delivers the signal
    // as the owner exits.
    let gone = procs::wait_gone(&[(pid, start)], Duration::from_secs(30));
    if !gone {
        // SAFETY: kill of the orphaned sleep this test started (pid and
        // start time checked just above).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        gone,
        "the tied child {pid} outlived its SIGKILLed owner (no death signal?)"
    );
}
