//! Long-lived sandboxes through the library: create once, exec many.
//! Every exec is contained like a `run` payload, has its own outcome,
//! timeout and output limit; state and background processes persist
//! between execs; remove leaves nothing; pause freezes everything until
//! resume. Root and rootless (custom harness, see tests/common).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use nanoclaw_sandbox::native::cgroup;
use nanoclaw_sandbox::native::session::{self, create, exec, remove, ExecSpec, RunState};
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::{KillReason, Outcome, SandboxSpec};

mod common;

fn main() -> ExitCode {
    common::main_with("sessions", scenarios)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

/// One scenario: `Err` says what went wrong.
type Check = fn() -> Result<(), String>;

/// Runs each check; returns failure on the first that fails.
fn scenarios(mode: &str) -> ExitCode {
    let checks: [(&str, Check); 11] = [
        (
            "a home directory is the user's, writable, HOME and cwd",
            home_dir,
        ),
        (
            "file operations: stat, list, mkdir, rename, remove",
            file_ops,
        ),
        ("state persists between execs", state_persists),
        ("each exec is contained like a run", contained),
        ("exit codes and not found", exit_codes),
        (
            "a timeout kills the exec, not the sandbox",
            timeout_kills_the_exec,
        ),
        ("background processes stay; remove ends them", background),
        ("stdin and the output limit", stdin_and_output_limit),
        (
            "one exec cannot reach into another's processes",
            execs_are_isolated,
        ),
        (
            "pause freezes everything, refuses exec; resume continues",
            pause_and_resume,
        ),
        ("a paused sandbox is removed like any other", remove_paused),
    ];
    for (name, f) in checks {
        let t0 = Instant::now();
        match f() {
            Ok(()) => println!("sessions ({mode}): ok   {name} ({:?})", t0.elapsed()),
            Err(e) => {
                eprintln!("sessions ({mode}): FAIL {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let left = common::children_left();
    if !left.is_empty() {
        eprintln!("sessions ({mode}): processes left behind: {left:?}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run(sb: &mut nanoclaw_sandbox::Sandbox, spec: &ExecSpec) -> Result<Outcome, String> {
    exec(sb, spec).map_err(|e| format!("exec {:?}: {e}", spec.command))
}

fn expect(o: &Outcome, code: i32, stdout: &str) -> Result<(), String> {
    if o.exit_code != Some(code) || text(&o.stdout) != stdout {
        return Err(format!(
            "want exit {code} stdout {stdout:?}, got exit {:?} signal {:?} killed_by {:?} stdout {:?} stderr {:?}",
            o.exit_code,
            o.signal,
            o.killed_by,
            text(&o.stdout),
            text(&o.stderr)
        ));
    }
    Ok(())
}

fn new_sandbox() -> Result<nanoclaw_sandbox::Sandbox, String> {
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.limits.timeout = Duration::from_secs(120);
    spec.env.push(("FROM_SPEC".into(), "yes".into()));
    create(&spec).map_err(|e| format!("create: {e}"))
}

fn state_persists() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    let o = run(&mut sb, &sh("echo hello > /tmp/f; echo written"))?;
    expect(&o, 0, "written\n")?;
    let o = run(&mut sb, &ExecSpec::new(["cat", "/tmp/f"]))?;
    expect(&o, 0, "hello\n")?;
    let mut e = sh("echo $FROM_SPEC $ONLY_HERE $PWD");
    e.env.push(("ONLY_HERE".into(), "too".into()));
    e.workdir = Some("/tmp".into());
    expect(&run(&mut sb, &e)?, 0, "yes too /tmp\n")?;
    remove(sb);
    Ok(())
}

fn contained() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    let o = run(
        &mut sb,
        &sh("id -u; grep -E '^(CapEff|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' ' '; \
             ls /proc | grep -c '^[0-9]'; ls -l /proc/1/exe 2>&1 | grep -c denied"),
    )?;
    expect(
        &o,
        0,
        "1000\nCapPrm: 0000000000000000\nCapEff: 0000000000000000\nNoNewPrivs: 1\nSeccomp: 2\n4\n1\n",
    )?;
    // Another user, as asked.
    let mut e = ExecSpec::new(["id", "-u"]);
    e.user = Some(nanoclaw_sandbox::spec::User {
        uid: 1000,
        gid: 1000,
    });
    expect(&run(&mut sb, &e)?, 0, "1000\n")?;
    remove(sb);
    Ok(())
}

fn exit_codes() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    expect(&run(&mut sb, &sh("exit 3"))?, 3, "")?;
    let o = run(&mut sb, &ExecSpec::new(["no-such-command-here"]))?;
    if o.exit_code != Some(127) || !text(&o.stderr).contains("not found") {
        return Err(format!("not found: {o:?}"));
    }
    let o = run(&mut sb, &sh("kill -9 $$"))?;
    if o.signal != Some(9) {
        return Err(format!("signal: {o:?}"));
    }
    expect(&run(&mut sb, &ExecSpec::new(["true"]))?, 0, "")?;
    remove(sb);
    Ok(())
}

fn timeout_kills_the_exec() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    let mut e = sh("echo started; sleep 30");
    e.timeout = Duration::from_millis(300);
    let o = run(&mut sb, &e)?;
    if o.killed_by != Some(KillReason::Timeout) || o.duration > Duration::from_secs(5) {
        return Err(format!("timeout: {o:?}"));
    }
    if text(&o.stdout) != "started\n" {
        return Err(format!("output before the kill: {o:?}"));
    }
    expect(&run(&mut sb, &sh("echo alive"))?, 0, "alive\n")?;
    remove(sb);
    Ok(())
}

fn background() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    // A daemon in its own session survives its exec.
    let o = run(
        &mut sb,
        &sh("setsid sleep 60 >/dev/null 2>&1 < /dev/null & echo $!"),
    )?;
    let pid = text(&o.stdout).trim().to_string();
    if o.exit_code != Some(0) || pid.is_empty() {
        return Err(format!("background: {o:?}"));
    }
    let o = run(&mut sb, &sh(&format!("kill -0 {pid} && echo running")))?;
    expect(&o, 0, "running\n")?;
    let host_pid = sb.pid();
    remove(sb);
    std::thread::sleep(Duration::from_millis(100));
    if std::path::Path::new(&format!("/proc/{host_pid}")).exists() {
        return Err(format!("init {host_pid} still exists after remove"));
    }
    Ok(())
}

fn stdin_and_output_limit() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    let mut e = ExecSpec::new(["tr", "a-z", "A-Z"]);
    e.stdin = Stdin::Bytes(b"shout\n".to_vec());
    expect(&run(&mut sb, &e)?, 0, "SHOUT\n")?;
    let mut e = sh("yes | head -c 100000");
    e.output_limit = 1000;
    let o = run(&mut sb, &e)?;
    if !o.stdout_truncated || o.stdout.len() != 1000 {
        return Err(format!(
            "output limit: truncated {} len {}",
            o.stdout_truncated,
            o.stdout.len()
        ));
    }
    expect(&run(&mut sb, &sh("echo after"))?, 0, "after\n")?;
    remove(sb);
    Ok(())
}

/// A process one exec leaves behind tries, in a loop, to read every
/// process's environment and to write into every process's stdout through
/// /proc; a later exec with a secret in its environment runs meanwhile.
/// Each exec's nested Landlock domain refuses both, while a plain signal
/// from one exec to another's process still works.
fn execs_are_isolated() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    let attacker = "(while :; do for p in /proc/[0-9]*; do \
                      cat $p/environ 2>/dev/null; echo INJECTED 2>/dev/null > $p/fd/1; \
                    done; done) > /tmp/loot 2>/dev/null < /dev/null & echo $!";
    let o = run(&mut sb, &sh(attacker))?;
    let looter = text(&o.stdout).trim().to_string();
    let mut victim = sh("sleep 1; echo done");
    victim.env.push(("SECRET".into(), "topsecret-42".into()));
    let v = run(&mut sb, &victim)?;
    let o = run(
        &mut sb,
        &sh(&format!(
            "grep -c topsecret-42 /tmp/loot; kill {looter} && echo killed"
        )),
    )?;
    remove(sb);
    if text(&v.stdout) != "done\n" {
        return Err(format!(
            "the victim's stdout was written to: {:?}",
            text(&v.stdout)
        ));
    }
    if text(&o.stdout) != "0\nkilled\n" {
        return Err(format!(
            "the looter read the victim's environment, or could not be signalled: {:?}",
            text(&o.stdout)
        ));
    }
    Ok(())
}

/// Whether this host gives this user a freezer (decides what pause must do).
fn freezer_usable() -> bool {
    cgroup::probe()
        .controllers
        .iter()
        .any(|c| c.name == "freezer" && c.usable)
}

/// Host pids of the processes whose parent is the sandbox's init.
fn children_of(init: i32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(init) {
            out.push(pid);
        }
    }
    out
}

/// Clock ticks of cpu time (user + system) of host pid `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A busy loop left running by an exec gets no cpu while the sandbox is
/// paused (its own counter and the cgroup's), an exec is refused with
/// `Error::Paused`, and after resume it runs on and execs work. Where the
/// host gives no freezer, pause fails with one error that says what to
/// delegate, and the sandbox keeps running.
fn pause_and_resume() -> Result<(), String> {
    let mut sb = new_sandbox()?;
    let o = run(
        &mut sb,
        &sh("while :; do :; done >/dev/null 2>&1 </dev/null & echo $!"),
    )?;
    expect(&o, 0, &text(&o.stdout))?;
    let r = check_pause(&mut sb);
    remove(sb);
    r
}

fn check_pause(sb: &mut nanoclaw_sandbox::Sandbox) -> Result<(), String> {
    let busy = match children_of(sb.pid()).as_slice() {
        [one] => *one,
        other => return Err(format!("expected one busy loop, found {other:?}")),
    };
    if !freezer_usable() {
        let e = session::pause(sb).expect_err("pause without a freezer must fail");
        let msg = e.to_string();
        if !matches!(e, nanoclaw_sandbox::Error::Unsupported { .. }) || !msg.contains("freezer") {
            return Err(format!("unclear error without a freezer: {msg}"));
        }
        println!("NOTE sessions: no freezer for this user, pause says: {msg}");
        return expect(&run(sb, &sh("echo still"))?, 0, "still\n");
    }
    std::thread::sleep(Duration::from_millis(100));
    session::pause(sb).map_err(|e| format!("pause: {e}"))?;
    let st = session::status(sb);
    if st.state != RunState::Paused || !st.can_pause {
        return Err(format!("status after pause: {st:?}"));
    }
    let (t0, c0) = (cpu_ticks(busy), st.cpu);
    std::thread::sleep(Duration::from_millis(300));
    let (t1, c1) = (cpu_ticks(busy), session::status(sb).cpu);
    if t1 > t0 + 1 || c1 != c0 {
        return Err(format!(
            "ran while paused: {t0} -> {t1} ticks, cgroup {c0:?} -> {c1:?}"
        ));
    }
    match exec(sb, &ExecSpec::new(["true"])) {
        Err(nanoclaw_sandbox::Error::Paused { .. }) => {}
        other => return Err(format!("exec into a paused sandbox: {other:?}")),
    }
    session::resume(sb).map_err(|e| format!("resume: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let t2 = cpu_ticks(busy);
    if t2 < t1 + 5 {
        return Err(format!("not running after resume: {t1} -> {t2} ticks"));
    }
    expect(&run(sb, &sh("echo resumed"))?, 0, "resumed\n")?;
    // Latency, with the busy loop running.
    let (mut p, mut r) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        session::pause(sb).map_err(|e| format!("pause: {e}"))?;
        p.push(t.elapsed());
        let t = Instant::now();
        session::resume(sb).map_err(|e| format!("resume: {e}"))?;
        r.push(t.elapsed());
    }
    let (mp, mr) = (median(&mut p), median(&mut r));
    println!(
        "sessions: pause median {mp:?} (max {:?}), resume median {mr:?} (max {:?})",
        p[19], r[19]
    );
    if mp > Duration::from_millis(10) || mr > Duration::from_millis(10) {
        return Err(format!("pause/resume too slow: {mp:?} / {mr:?}"));
    }
    Ok(())
}

/// Removing a paused sandbox ends it at once (frozen processes do not act
/// on SIGKILL until thawed: remove must thaw them).
fn remove_paused() -> Result<(), String> {
    if !freezer_usable() {
        return Ok(());
    }
    let mut sb = new_sandbox()?;
    run(
        &mut sb,
        &sh("setsid sleep 60 >/dev/null 2>&1 < /dev/null &"),
    )?;
    session::pause(&mut sb).map_err(|e| format!("pause: {e}"))?;
    let init = sb.pid();
    let t = Instant::now();
    remove(sb);
    if t.elapsed() > Duration::from_secs(2) {
        return Err(format!("remove of a paused sandbox took {:?}", t.elapsed()));
    }
    if std::path::Path::new(&format!("/proc/{init}")).exists() {
        return Err(format!("init {init} still exists after remove"));
    }
    Ok(())
}

fn home_dir() -> Result<(), String> {
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.home = Some("/home/user".into());
    let mut sb = create(&spec).map_err(|e| e.to_string())?;
    let o = exec(
        &mut sb,
        &sh("echo $HOME; pwd; echo x > ~/f && stat -c '%u %a' ~ && cat ~/f"),
    )
    .map_err(|e| e.to_string())?;
    remove(sb);
    let want = format!("/home/user\n/home/user\n{} 755\nx\n", 1000);
    if text(&o.stdout) != want {
        return Err(format!("got {:?} {:?}", text(&o.stdout), text(&o.stderr)));
    }
    Ok(())
}

fn file_ops() -> Result<(), String> {
    let e = |e: nanoclaw_sandbox::Error| e.to_string();
    let mut sb = create(&SandboxSpec::new(Vec::<String>::new())).map_err(e)?;
    let r = (|| -> Result<(), String> {
        session::put_file(&mut sb, "/tmp/d/a.txt", b"hello".to_vec(), None).map_err(e)?;
        let st = session::stat(&mut sb, "/tmp/d/a.txt").map_err(e)?;
        if st.kind != session::EntryKind::File || st.size != 5 || st.name != "a.txt" {
            return Err(format!("stat: {st:?}"));
        }
        if !session::make_dir(&mut sb, "/tmp/d/sub/deeper", None).map_err(e)? {
            return Err("make_dir said it existed".into());
        }
        if session::make_dir(&mut sb, "/tmp/d/sub", None).map_err(e)? {
            return Err("make_dir of an existing dir said it made it".into());
        }
        let all = session::list_dir(&mut sb, "/tmp/d", 1).map_err(e)?;
        let mut names: Vec<_> = all.iter().map(|x| x.name.clone()).collect();
        names.sort();
        if names != ["a.txt", "sub"] {
            return Err(format!("list depth 1: {names:?}"));
        }
        if session::list_dir(&mut sb, "/tmp/d", 2).map_err(e)?.len() != 3 {
            return Err("list depth 2".into());
        }
        let moved = session::rename(&mut sb, "/tmp/d/a.txt", "/tmp/e/b.txt", None).map_err(e)?;
        if moved.path != "/tmp/e/b.txt" {
            return Err(format!("rename: {moved:?}"));
        }
        session::remove_path(&mut sb, "/tmp/d", None).map_err(e)?;
        match session::stat(&mut sb, "/tmp/d") {
            Err(nanoclaw_sandbox::Error::NotFound { .. }) => {}
            other => return Err(format!("stat of a removed dir: {other:?}")),
        }
        // Outside what the sandbox may write: refused, host untouched.
        if session::make_dir(&mut sb, "/etc/nanoclaw-test", None).is_ok() {
            return Err("made a directory in the read-only /etc".into());
        }
        Ok(())
    })();
    remove(sb);
    r
}
