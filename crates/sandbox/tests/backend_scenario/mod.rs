//! What every backend must do, checked through the trait objects only
//! (`&dyn Backend`, `Box<dyn LiveSandbox>`, `Box<dyn Execution>`): create,
//! exec (output, exit codes, streaming, spawn and wait), files in and out,
//! stat, stats, pause and resume, destroy — and that nothing of the
//! sandbox is left on the host afterwards (its processes, its cgroup
//! directories). Shared by `crates/sandbox/tests/backend.rs` (in-process)
//! and `crates/cli/tests/backend_keeper.rs` (keepers, which need the
//! nanoclaw binary).
#![allow(dead_code)]

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanoclaw_sandbox::backend::{Backend, Echo, LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::native::session::{EntryKind, ExecSpec, RunState};
use nanoclaw_sandbox::spec::Root;
use nanoclaw_sandbox::{Error, SandboxSpec};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

/// One check of a live sandbox: `Err` says what went wrong.
type Check = fn(&dyn LiveSandbox) -> Result<(), String>;

/// Runs every check against `backend`; `Err` says what went wrong.
pub fn run(backend: &dyn Backend, mode: &str) -> Result<(), String> {
    run_with(backend, mode, Root::Host)
}

/// [`run`] with sandboxes of root `root` (an image, for a backend that
/// needs one: Docker). The image must have `sh`, `sleep`, `stat`, `tar`.
pub fn run_with(backend: &dyn Backend, mode: &str, root: Root) -> Result<(), String> {
    let name = backend.name().to_string();
    let step = |what: &str, t0: Instant| {
        println!("backend {name} ({mode}): ok   {what} ({:?})", t0.elapsed())
    };
    let t0 = Instant::now();
    refuses_by_name(backend, &root)?;
    step("a field it cannot honour is refused by name", t0);

    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.root = root;
    spec.limits.timeout = Duration::from_secs(120);
    spec.env.push(("FROM_CONFIG".into(), "yes".into()));
    let mut config = SandboxConfig::new(spec);
    config.labels.push(("test".into(), "backend".into()));
    let t0 = Instant::now();
    let sb = backend
        .create(&config)
        .map_err(|e| format!("create: {e}"))?;
    step("create", t0);
    let info = sb.info();
    let cgroups = cgroup_dirs(&info.id);
    if cgroups.is_empty() {
        println!(
            "NOTE backend {name} ({mode}): no cgroup directory found for {}",
            info.id
        );
    }
    let checked = (|| -> Result<(), String> {
        if info.backend != name || info.host_pids.is_empty() || info.labels != config.labels {
            return Err(format!("info: {info:?}"));
        }
        if let Some(p) = info.host_pids.iter().find(|p| !alive(**p)) {
            return Err(format!(
                "host pid {p} of the sandbox does not run: {info:?}"
            ));
        }
        let checks: [(&str, Check); 6] = [
            (
                "exec: output, exit codes, the configuration's environment",
                exec_outcomes,
            ),
            ("exec_streaming: output copied as it comes", streaming),
            (
                "spawn and wait; an execution dropped unwaited is killed",
                spawn_and_wait,
            ),
            ("files: put/get file and tar, stat", files),
            ("stats", stats),
            ("pause and resume", pause_and_resume),
        ];
        for (what, f) in checks {
            let t0 = Instant::now();
            f(&*sb).map_err(|e| format!("{what}: {e}"))?;
            step(what, t0);
        }
        Ok(())
    })();
    let t0 = Instant::now();
    let destroyed = sb.destroy().map_err(|e| format!("destroy: {e}"));
    checked?;
    destroyed?;
    left_nothing(&info.id, &info.host_pids, &cgroups)?;
    match sb.exec(&ExecSpec::new(["true"])) {
        Err(_) => {}
        Ok(o) => return Err(format!("exec after destroy ran: {o:?}")),
    }
    sb.destroy().map_err(|e| format!("a second destroy: {e}"))?;
    step("destroy leaves nothing; later calls fail", t0);

    if !backend.capabilities().detached {
        let t0 = Instant::now();
        let sb = backend
            .create(&config)
            .map_err(|e| format!("create: {e}"))?;
        let (id, pids) = (sb.id().to_string(), sb.info().host_pids);
        let cgroups = cgroup_dirs(&id);
        drop(sb);
        left_nothing(&id, &pids, &cgroups)?;
        step("not detached: dropping the handle ends the sandbox", t0);
    }
    let left = children_left();
    if !left.is_empty() {
        return Err(format!("processes left behind: {left:?}"));
    }
    Ok(())
}

fn refuses_by_name(backend: &dyn Backend, root: &Root) -> Result<(), String> {
    let name = backend.name();
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.root = Root::Dir("/nonexistent".into());
    let config = SandboxConfig::new(spec);
    let want = format!("--backend {name}: a directory root is not supported: ");
    for r in [
        backend.check(&config).map(drop),
        backend.create(&config).map(drop),
    ] {
        match r {
            Err(e @ Error::NotSupported { .. }) if e.to_string().starts_with(&want) => {}
            other => return Err(format!("a directory root: want {want:?}…, got {other:?}")),
        }
    }
    if !backend.capabilities().idle_timeout {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.root = root.clone();
        let mut config = SandboxConfig::new(spec);
        config.idle_timeout = Some(Duration::from_secs(1));
        let want = format!("--backend {name}: --idle-timeout is not supported: ");
        match backend.create(&config) {
            Err(e @ Error::NotSupported { .. }) if e.to_string().starts_with(&want) => {}
            Err(e) => return Err(format!("--idle-timeout: want {want:?}…, got {e}")),
            Ok(sb) => {
                let _ = sb.destroy();
                return Err("--idle-timeout was accepted".into());
            }
        }
    }
    Ok(())
}

fn expect(
    o: &nanoclaw_sandbox::Outcome,
    code: i32,
    stdout: &str,
    stderr: &str,
) -> Result<(), String> {
    if o.exit_code != Some(code) || text(&o.stdout) != stdout || text(&o.stderr) != stderr {
        return Err(format!(
            "want exit {code} stdout {stdout:?} stderr {stderr:?}, got exit {:?} signal {:?} \
             killed_by {:?} stdout {:?} stderr {:?}",
            o.exit_code,
            o.signal,
            o.killed_by,
            text(&o.stdout),
            text(&o.stderr)
        ));
    }
    Ok(())
}

fn exec_outcomes(sb: &dyn LiveSandbox) -> Result<(), String> {
    let o = sb
        .exec(&sh("echo out; echo err >&2; echo $FROM_CONFIG; exit 3"))
        .map_err(|e| e.to_string())?;
    expect(&o, 3, "out\nyes\n", "err\n")?;
    if o.sandbox_id != sb.id() || o.layers.seccomp.is_empty() {
        return Err(format!("the outcome's sandbox and layers: {o:?}"));
    }
    let o = sb
        .exec(&ExecSpec::new(["no-such-command-here"]))
        .map_err(|e| e.to_string())?;
    if o.exit_code != Some(127) || !text(&o.stderr).contains("not found") {
        return Err(format!("not found: {o:?}"));
    }
    // A timeout well past what starting a command takes here (a VM under
    // software emulation takes far longer than a native sandbox).
    let t0 = Instant::now();
    sb.exec(&sh("true")).map_err(|e| e.to_string())?;
    let mut e = sh("echo started; sleep 30");
    e.timeout = Duration::from_millis(300).max(t0.elapsed() * 4);
    let o = sb.exec(&e).map_err(|e| e.to_string())?;
    if o.killed_by != Some(nanoclaw_sandbox::KillReason::Timeout) || text(&o.stdout) != "started\n"
    {
        return Err(format!("timeout: {o:?}"));
    }
    expect(
        &sb.exec(&sh("echo alive")).map_err(|e| e.to_string())?,
        0,
        "alive\n",
        "",
    )
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn streaming(sb: &dyn LiveSandbox) -> Result<(), String> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let echo = Echo {
        stdout: out_w.as_fd(),
        stderr: err_w.as_fd(),
    };
    let o = sb
        .exec_streaming(&sh("echo streamed; echo to-stderr >&2; exit 4"), echo)
        .map_err(|e| e.to_string())?;
    drop((out_w, err_w));
    let read = |fd: OwnedFd| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).map(|_| s)
    };
    let (out, err) = (
        read(out_r).map_err(|e| e.to_string())?,
        read(err_r).map_err(|e| e.to_string())?,
    );
    if o.exit_code != Some(4) || !o.stdout.is_empty() || out != "streamed\n" || err != "to-stderr\n"
    {
        return Err(format!("streamed {out:?} / {err:?}, outcome {o:?}"));
    }
    Ok(())
}

/// Tasks in the sandbox now (None where the backend does not count them).
fn tasks(sb: &dyn LiveSandbox) -> Result<Option<u64>, String> {
    Ok(sb.stats().map_err(|e| format!("stats: {e}"))?.tasks)
}

fn spawn_and_wait(sb: &dyn LiveSandbox) -> Result<(), String> {
    let x = sb
        .spawn(&sh("sleep 0.2; echo later; exit 5"))
        .map_err(|e| format!("spawn: {e}"))?;
    if x.id() == 0 {
        return Err("exec id 0".into());
    }
    expect(&x.wait(None).map_err(|e| e.to_string())?, 5, "later\n", "")?;

    // A command whose execution is dropped unwaited is killed.
    let idle = tasks(sb)?;
    let x = sb
        .spawn(&ExecSpec::new(["sleep", "60"]))
        .map_err(|e| format!("spawn: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    if let Some(n) = idle {
        while tasks(sb)? == Some(n) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if tasks(sb)? == Some(n) {
            return Err(format!("the spawned sleep never showed up ({n} tasks)"));
        }
    }
    drop(x);
    if let Some(n) = idle {
        while tasks(sb)? != Some(n) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let now = tasks(sb)?;
        if now != Some(n) {
            return Err(format!(
                "the dropped execution's sleep still runs: {now:?} tasks, {n} before"
            ));
        }
    }
    expect(
        &sb.exec(&sh("echo next")).map_err(|e| e.to_string())?,
        0,
        "next\n",
        "",
    )
}

fn files(sb: &dyn LiveSandbox) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |e: Error| format!("{what}: {e}")
    };
    sb.put_file("/tmp/dir/f.txt", b"hello\n".to_vec(), None)
        .map_err(e("put_file"))?;
    let got = sb.get_file("/tmp/dir/f.txt").map_err(e("get_file"))?;
    if got != b"hello\n" {
        return Err(format!("get_file: {:?}", text(&got)));
    }
    let st = sb.stat("/tmp/dir/f.txt").map_err(e("stat"))?;
    if st.kind != EntryKind::File
        || st.size != 6
        || st.path != "/tmp/dir/f.txt"
        || st.name != "f.txt"
    {
        return Err(format!("stat: {st:?}"));
    }
    let tar = sb.get_tar("/tmp/dir").map_err(e("get_tar"))?;
    sb.put_tar("/tmp/copy", tar, None).map_err(e("put_tar"))?;
    let got = sb
        .get_file("/tmp/copy/f.txt")
        .map_err(e("get_file of the copy"))?;
    if got != b"hello\n" {
        return Err(format!("the tar's copy: {:?}", text(&got)));
    }
    match sb.stat("/tmp/missing") {
        Err(Error::NotFound { .. }) => {}
        other => return Err(format!("a missing file: {other:?}")),
    }
    // The file is the sandbox user's, as a command sees it.
    let o = sb
        .exec(&sh("stat -c '%u %s' /tmp/dir/f.txt"))
        .map_err(|e| e.to_string())?;
    expect(&o, 0, "1000 6\n", "")
}

fn stats(sb: &dyn LiveSandbox) -> Result<(), String> {
    let st = sb.stats().map_err(|e| e.to_string())?;
    let left = st
        .deadline
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    if st.state != RunState::Running || st.execs != 0 || left < Duration::from_secs(60) {
        return Err(format!("stats: {st:?}"));
    }
    if st.tasks == Some(0) || st.memory_bytes == Some(0) {
        return Err(format!("usage: {st:?}"));
    }
    Ok(())
}

fn pause_and_resume(sb: &dyn LiveSandbox) -> Result<(), String> {
    if !sb.stats().map_err(|e| e.to_string())?.can_pause {
        let e = sb.pause().expect_err("pause without a freezer must fail");
        if !e.to_string().contains("freezer") {
            return Err(format!("unclear error without a freezer: {e}"));
        }
        println!("NOTE backend: no freezer here; pause says: {e}");
        return expect(
            &sb.exec(&sh("echo still")).map_err(|e| e.to_string())?,
            0,
            "still\n",
            "",
        );
    }
    sb.pause().map_err(|e| format!("pause: {e}"))?;
    sb.pause().map_err(|e| format!("a second pause: {e}"))?;
    let st = sb.stats().map_err(|e| e.to_string())?;
    if st.state != RunState::Paused {
        return Err(format!("stats after pause: {st:?}"));
    }
    match sb.exec(&ExecSpec::new(["true"])) {
        Err(Error::Paused { id }) if id == sb.id() => {}
        other => return Err(format!("exec into a paused sandbox: {other:?}")),
    }
    sb.resume().map_err(|e| format!("resume: {e}"))?;
    let st = sb.stats().map_err(|e| e.to_string())?;
    if st.state != RunState::Running {
        return Err(format!("stats after resume: {st:?}"));
    }
    expect(
        &sb.exec(&sh("echo resumed")).map_err(|e| e.to_string())?,
        0,
        "resumed\n",
        "",
    )
}

/// Whether host pid `pid` runs (a zombie, waiting for whoever adopted it to
/// reap it, does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// The cgroup directories named `id`, v1 and v2 (at most four levels down).
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, depth: u32, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == id {
                out.push(p);
            } else if depth > 0 {
                walk(&p, id, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), id, 3, &mut out);
    out
}

/// Nothing of sandbox `id` runs or stays: its host processes and cgroup
/// directories are gone (waiting a little for the kernel).
fn left_nothing(id: &str, pids: &[i32], cgroups: &[PathBuf]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        let dirs: Vec<&PathBuf> = cgroups.iter().filter(|d| d.exists()).collect();
        let found = cgroup_dirs(id);
        if running.is_empty() && dirs.is_empty() && found.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "sandbox {id} left processes {running:?} and cgroup directories {dirs:?} {found:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids whose parent is this process.
fn children_left() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            out.push(pid);
        }
    }
    out
}
