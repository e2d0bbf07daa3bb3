//! An attack on the window that `clone(CLONE_VM | CLONE_VFORK)` opens in a
//! long-lived sandbox (native/sys.rs `clone_vfork`, native/child/serve.rs):
//! until a command's process calls `execve`, its address space is init's.
//! A hostile process left running by one exec (tests/vfork_window/attack.py)
//! tries, in a loop, every way to reach into another process — through
//! /proc/PID/mem, /proc/PID/environ, process_vm_readv/writev, ptrace SEIZE
//! and ATTACH, pidfd_getfd, /proc/PID/fd — against init and against each new
//! command's process as soon as its pid exists, while the host starts
//! commands into the same sandbox as fast as it can. Every attempt must be
//! refused, and the attacker must have seen most new processes and caught
//! some before their `execve` (still bearing init's name), or the run
//! proves nothing. A control against the attacker's own child shows what
//! an allowed attempt looks like.
//!
//! Rootful: the attacker and the commands as uid 1000, as uid 0 (the
//! sandbox's root), and as uid 0 without a seccomp filter (what stands then
//! is the kernel's ptrace rules: non-dumpability, capabilities and each
//! exec's Landlock sub-domain). Rootless maps one uid: 1000, with and
//! without the filter (custom harness, see tests/common).
//!
//! Which defences hold what (shown by removing them, see the commit that
//! added this test and `clone_vfork`'s doc): without each exec's Landlock
//! sub-domain the attacker reads commands after their `execve`; it reaches
//! init's memory before one only if, in addition, the child's memory is
//! dumpable after its privilege drop.
//!
//! That happens on a host with `fs.suid_dumpable = 1`: every id change
//! resets the (shared) address space's dumpable flag to that setting. So
//! a last rootful case runs on such a host (set for its duration, restored
//! after) and on a kernel without Landlock (simulated: a child process of
//! this test makes the landlock_* calls fail with ENOSYS under a seccomp
//! filter of its own, which the sandbox inherits, so nanoclaw finds no
//! Landlock): there the attacker may read commands after their execve (a
//! process of the same uid, as anywhere without Landlock), never init or a
//! process before its execve. Without the `PR_SET_DUMPABLE 0` that
//! `caps::drop_privileges` makes before the capabilities go, it does.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nanoclaw_sandbox::native::session::{self, create, exec, remove, ExecSpec};
use nanoclaw_sandbox::spec::{Seccomp, User};
use nanoclaw_sandbox::{Sandbox, SandboxSpec};

mod common;

/// The attacker, copied into each sandbox.
const ATTACKER: &str = include_str!("vfork_window/attack.py");

/// How long the host starts commands while the attacker runs, per sandbox,
/// at least; then on until the attacker has caught [`WANT_WINDOW`]
/// processes before their execve, or [`MAX_RACE`].
const RACE: Duration = Duration::from_millis(1500);
const WANT_WINDOW: u64 = 20;
const MAX_RACE: Duration = Duration::from_secs(6);
/// Fewer processes caught before their execve than this, and the run
/// proves too little about the window: the test fails.
const MIN_WINDOW: u64 = 3;

/// The attempt kinds the attacker reports (all must stay at zero successes).
const KINDS: [&str; 10] = [
    "mem_rw",
    "mem_ro",
    "environ",
    "vm_readv",
    "vm_writev",
    "ptrace_seize",
    "ptrace_attach",
    "pidfd_getfd",
    "fd_open",
    "fd_readlink",
];

/// The ones the default seccomp filter denies outright (the control shows
/// them allowed against the attacker's own child when it is off).
const SECCOMP_KINDS: [&str; 5] = [
    "vm_readv",
    "vm_writev",
    "ptrace_seize",
    "ptrace_attach",
    "pidfd_getfd",
];

/// The argument that makes this binary run the case without Landlock.
const NO_LANDLOCK_ARG: &str = "--no-landlock-case";

fn main() -> ExitCode {
    if std::env::args().any(|a| a == NO_LANDLOCK_ARG) {
        return no_landlock_case();
    }
    common::main_with("vfork_window", scenarios)
}

struct Case {
    name: &'static str,
    uid: u32,
    seccomp: Seccomp,
    /// No Landlock: a command may be read after its execve (never init,
    /// never a process before its execve).
    no_landlock: bool,
}

fn scenarios(mode: &str) -> ExitCode {
    // A rootless sandbox maps one uid (1000): no sandbox root to test.
    let root_cases = [
        ("uid 1000, default seccomp", 1000, Seccomp::Default),
        ("uid 0, default seccomp", 0, Seccomp::Default),
        ("uid 0, no seccomp filter", 0, Seccomp::Unconfined),
    ];
    let rootless_cases = [
        ("uid 1000, default seccomp", 1000, Seccomp::Default),
        ("uid 1000, no seccomp filter", 1000, Seccomp::Unconfined),
    ];
    let cases: Vec<Case> = if common::is_root() {
        root_cases.to_vec()
    } else {
        rootless_cases.to_vec()
    }
    .into_iter()
    .map(|(name, uid, seccomp)| Case {
        name,
        uid,
        seccomp,
        no_landlock: false,
    })
    .collect();
    // Every case runs even after one failed: which defences hold where is
    // the point of the report.
    let (t0, mut failed) = (Instant::now(), false);
    for case in &cases {
        failed |= !reported(mode, case.name, || race(case, mode));
    }
    if mode == "root" {
        failed |= !reported(mode, NO_LANDLOCK_NAME, run_no_landlock_case);
    }
    println!("vfork_window ({mode}): all in {:?}", t0.elapsed());
    let left = common::children_left();
    if !left.is_empty() {
        eprintln!("vfork_window ({mode}): processes left behind: {left:?}");
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

const NO_LANDLOCK_NAME: &str = "uid 1000, no Landlock, fs.suid_dumpable=1";

/// Runs [`no_landlock_case`] in a child process (its seccomp filter cannot
/// be removed, and the rootless run this process starts next must have
/// Landlock), with `fs.suid_dumpable` at 1 for its duration.
fn run_no_landlock_case() -> Result<(), String> {
    const KNOB: &str = "/proc/sys/fs/suid_dumpable";
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(KNOB, &self.0);
        }
    }
    let before = std::fs::read_to_string(KNOB).map_err(|e| format!("{KNOB}: {e}"))?;
    let _restore = Restore(before);
    std::fs::write(KNOB, "1").map_err(|e| format!("setting {KNOB} to 1: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = std::process::Command::new(exe)
        .arg(NO_LANDLOCK_ARG)
        .status()
        .map_err(|e| format!("starting the case's process: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "its process ended with {status} (its output is above)"
        ))
    }
}

/// The case's own process: Landlock made unavailable, one race.
fn no_landlock_case() -> ExitCode {
    if let Err(e) = deny_landlock() {
        eprintln!("vfork_window: {e}");
        return ExitCode::FAILURE;
    }
    let case = Case {
        name: NO_LANDLOCK_NAME,
        uid: 1000,
        seccomp: Seccomp::Default,
        no_landlock: true,
    };
    match race(&case, "root") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfork_window (root, {}): {e}", case.name);
            ExitCode::FAILURE
        }
    }
}

/// A seccomp filter on every thread of this process (and so on every
/// sandbox it makes) under which landlock_create_ruleset, landlock_add_rule
/// and landlock_restrict_self (444-446 on every architecture) fail with
/// ENOSYS, as on a kernel built without Landlock.
fn deny_landlock() -> Result<(), String> {
    const LD_NR: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JGT: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        op(LD_NR, 0, 0, 0), // seccomp_data.nr
        op(JGE, 0, 2, 444),
        op(JGT, 1, 0, 446),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to `filter`, both alive across the call; root
    // holds CAP_SYS_ADMIN, so no PR_SET_NO_NEW_PRIVS is needed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(format!(
            "installing the filter that hides Landlock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn as_user(mut e: ExecSpec, uid: u32) -> ExecSpec {
    e.user = Some(User { uid, gid: uid });
    e
}

fn sh(script: &str, uid: u32) -> ExecSpec {
    as_user(ExecSpec::new(["sh", "-c", script]), uid)
}

/// Runs one case and prints `ok` with its time or `FAIL` with why; true
/// when it passed.
fn reported(mode: &str, name: &str, case: impl FnOnce() -> Result<(), String>) -> bool {
    let t = Instant::now();
    match case() {
        Ok(()) => {
            println!("vfork_window ({mode}): ok   {name} ({:?})", t.elapsed());
            true
        }
        Err(e) => {
            eprintln!("vfork_window ({mode}): FAIL {name}: {e}");
            false
        }
    }
}

/// One sandbox: start the attacker, race it, read its report, judge.
fn race(case: &Case, mode: &str) -> Result<(), String> {
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.limits.timeout = Duration::from_secs(60);
    spec.hardening.seccomp = case.seccomp.clone();
    let mut sb = create(&spec).map_err(|e| format!("create: {e}"))?;
    let landlock = sb.layers().landlock.clone();
    if case.no_landlock != landlock.starts_with("unavailable") {
        remove(sb);
        return Err(format!("the sandbox's Landlock layer is {landlock:?}"));
    }
    let r = race_in(&mut sb, case, mode);
    remove(sb);
    r
}

fn race_in(sb: &mut Sandbox, case: &Case, mode: &str) -> Result<(), String> {
    let uid = case.uid;
    let user = Some(User { uid, gid: uid });
    let o = exec(sb, &sh("command -v python3", uid)).map_err(|e| e.to_string())?;
    if o.exit_code != Some(0) {
        return Err(format!(
            "no python3 in the sandbox (the host's /usr has none? .ci/run installs it): \
             the attacker cannot run: exit {:?}, {}",
            o.exit_code,
            text(&o.stderr)
        ));
    }
    session::put_file(sb, "/tmp/attack.py", ATTACKER.as_bytes().to_vec(), user)
        .map_err(|e| format!("copying the attacker: {e}"))?;
    let o = exec(
        sb,
        &sh(
            "setsid python3 /tmp/attack.py /tmp/stop /tmp/report /tmp/ready /tmp/progress \
             </dev/null >/tmp/attack.log 2>&1 &",
            uid,
        ),
    )
    .map_err(|e| e.to_string())?;
    if o.exit_code != Some(0) {
        return Err(format!("starting the attacker: {o:?}"));
    }
    let control = wait_ready(sb, uid)?;
    println!("vfork_window ({mode}, {}): {}", case.name, control.trim());
    check_control(&control, &case.seccomp)?;

    // The race: one short command after another, as the attacker's uid.
    let mut victim = as_user(ExecSpec::new(["true"]), uid);
    // `true` takes a millisecond: one stopped or held by the attacker
    // fails the race at once instead of after the default 30 s.
    victim.timeout = Duration::from_secs(3);
    let (t, mut execs) = (Instant::now(), 0u32);
    while t.elapsed() < MAX_RACE {
        if t.elapsed() >= RACE && execs % 50 == 0 && caught(sb, uid)? >= WANT_WINDOW {
            break;
        }
        let o = exec(sb, &victim).map_err(|e| format!("exec {execs} during the race: {e}"))?;
        if o.exit_code != Some(0) {
            return Err(format!(
                "exec {execs} during the race: exit {:?} signal {:?} killed_by {:?} after {:?} \
                 (held by the attacker?)",
                o.exit_code, o.signal, o.killed_by, o.duration
            ));
        }
        execs += 1;
    }
    let raced = t.elapsed();

    let o = exec(
        sb,
        &sh(
            "touch /tmp/stop; i=0; while [ ! -e /tmp/report ] && [ $i -lt 200 ]; do \
             sleep 0.05; i=$((i+1)); done; cat /tmp/report; cat /tmp/attack.log >&2",
            uid,
        ),
    )
    .map_err(|e| e.to_string())?;
    let report = text(&o.stdout);
    if report.is_empty() {
        return Err(format!(
            "no report from the attacker; its log: {}",
            text(&o.stderr)
        ));
    }
    for line in report.lines() {
        println!("vfork_window ({mode}, {}): {line}", case.name);
    }
    println!(
        "vfork_window ({mode}, {}): host started {execs} commands in {raced:?}",
        case.name
    );
    judge(&report, execs, case.no_landlock)
}

/// How many processes the attacker caught before their execve so far.
fn caught(sb: &mut Sandbox, uid: u32) -> Result<u64, String> {
    let o = exec(sb, &sh("cat /tmp/progress 2>/dev/null", uid)).map_err(|e| e.to_string())?;
    Ok(text(&o.stdout).trim().parse().unwrap_or(0))
}

/// Polls until the attacker has done its control run; returns that line.
fn wait_ready(sb: &mut Sandbox, uid: u32) -> Result<String, String> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let o = exec(sb, &sh("cat /tmp/ready 2>/dev/null", uid)).map_err(|e| e.to_string())?;
        if o.exit_code == Some(0) {
            return Ok(text(&o.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = exec(sb, &sh("cat /tmp/attack.log", uid)).map_err(|e| e.to_string())?;
    Err(format!(
        "the attacker did not start within 10 s; its log: {}",
        text(&o.stdout)
    ))
}

/// `key=value` pairs of a report line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// Against its own child (same uid, same Landlock domain, dumpable) the
/// attacker's /proc/PID/mem attempts must work — else a zero below could
/// mean a broken attacker — and the seccomp-guarded calls must be refused
/// exactly when the filter is on.
fn check_control(control: &str, seccomp: &Seccomp) -> Result<(), String> {
    let f = fields(control);
    for k in ["mem_ro", "environ", "fd_open", "fd_readlink"] {
        if f.get(k) != Some(&"ok") {
            return Err(format!(
                "control: {k} against the attacker's own child was not allowed: {control}"
            ));
        }
    }
    let off = *seccomp == Seccomp::Unconfined;
    for k in SECCOMP_KINDS {
        let v = f.get(k).copied().unwrap_or("missing");
        if (v == "ok") != off || v == "gone" || v == "missing" {
            let want = if off { "allowed" } else { "refused" };
            return Err(format!(
                "control: {k} against the attacker's own child should be {want}: {control}"
            ));
        }
    }
    Ok(())
}

/// Zero successes of every kind, attempts against init and new processes
/// seen (most commands' pids, some before their execve). Without Landlock,
/// successes against commands after their execve are allowed.
fn judge(report: &str, execs: u32, no_landlock: bool) -> Result<(), String> {
    let mut problems = Vec::new();
    for k in KINDS {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("attempt {k} ")))
            .ok_or_else(|| format!("no line for {k} in the report"))?;
        let f = fields(line);
        let num = |x: &str| f.get(x).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if num("ok") > 0 && !no_landlock {
            problems.push(format!(
                "{k}: {} of {} attempts succeeded",
                num("ok"),
                num("tries")
            ));
        }
        if num("tries") == 0 {
            problems.push(format!("{k}: never attempted"));
        }
    }
    let pids = report
        .lines()
        .find(|l| l.starts_with("pids "))
        .map(fields)
        .ok_or("no pids line in the report")?;
    let num = |x: &str| pids.get(x).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // A command lives for a few hundred microseconds; the attacker, one
    // process, must still have caught a good share of them.
    let want = u64::from(execs / 10).max(50);
    if num("observed") < want {
        problems.push(format!(
            "the attacker saw {} of {execs} commands' processes (want at least {want}): the race proves nothing",
            num("observed")
        ));
    }
    if num("in_window") < MIN_WINDOW {
        problems.push(format!(
            "the attacker caught {} processes before their execve (want at least {MIN_WINDOW}): \
             the race proves too little",
            num("in_window")
        ));
    }
    let successes: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("success "))
        .filter(|l| !(no_landlock && l.contains(" target=exec ")))
        .collect();
    if !successes.is_empty() {
        problems.push(format!("first successes: {successes:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
