//! The gvisor backend against real runsc: the scenario every backend goes
//! through (`crates/sandbox/tests/backend_scenario`), exit codes, the
//! timeout, the output limit, memory and pids limits firing and reported,
//! the host root read-only, mounts, refused fields, and nothing left behind
//! (also after the process holding a sandbox is killed with SIGKILL).
//! Rootful, then rootless as `nanotest` (custom harness, tests/common).
//!
//! Needs runsc (`apt-get install -t bookworm-backports runsc`): skipped with
//! a message without it, required with `NANOCLAW_REQUIRE_GVISOR=1` (CI).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nanoclaw_gvisor::{Gvisor, ID_PREFIX};
use nanoclaw_sandbox::backend::{Backend, LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::{Access, Mount, NetLimits, Network};
use nanoclaw_sandbox::{Error, KillReason, SandboxSpec};

#[path = "../../sandbox/tests/backend_scenario/mod.rs"]
mod backend_scenario;
#[path = "../../sandbox/tests/common/mod.rs"]
mod common;

const REQUIRE: &str = "NANOCLAW_REQUIRE_GVISOR";
/// Set in the re-executed child of the SIGKILL check: hold a sandbox there.
const HOLD: &str = "--hold-sandbox";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == HOLD) {
        return hold(Path::new(&args[i + 1]), args[i + 2] == "detached");
    }
    if Gvisor::find_runsc().is_none() {
        if std::env::var(REQUIRE).as_deref() == Ok("1") {
            eprintln!(
                "gvisor: {REQUIRE}=1 but runsc is not installed ({})",
                nanoclaw_gvisor::INSTALL_HINT
            );
            return ExitCode::FAILURE;
        }
        println!(
            "SKIPPED gvisor: runsc is not installed ({}); {REQUIRE}=1 makes this a failure",
            nanoclaw_gvisor::INSTALL_HINT
        );
        return ExitCode::SUCCESS;
    }
    common::main_with("gvisor", scenarios)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

type Check = fn(&Gvisor, &str) -> Result<(), String>;

fn scenarios(mode: &str) -> ExitCode {
    let base = std::env::temp_dir().join(format!("nanoclaw-gvisor-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&base);
    let _ = std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let root = base.join("gvisor");
    let exe = Gvisor::find_runsc().expect("runsc");
    let g = match Gvisor::with(&exe, &root) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gvisor ({mode}): FAIL the backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rootful = mode == "root";
    let mut checks: Vec<(&str, Check)> = vec![
        ("the backend scenario", |g, mode| {
            backend_scenario::run(g, mode)
        }),
        ("exit codes", exit_codes),
        ("the output limit", output_limit),
        (
            "the host root is read-only; mounts as asked",
            root_and_mounts,
        ),
        ("fields gVisor cannot honour are refused by name", refusals),
        (
            "one-shot runs (run_once): exit codes, timeout, output limit",
            one_shot,
        ),
    ];
    if rootful {
        checks.push(("the memory limit fires and is reported", memory_limit));
        checks.push(("the pids limit fires and is reported", pids_limit));
        checks.push((
            "a sandbox held by a process killed with SIGKILL is swept",
            killed_holder,
        ));
        checks.push(("the containment suite (tests/containment)", containment));
    } else {
        checks.push(("rootless: an explicit limit is refused", rootless_limits));
    }
    let mut failed = false;
    for (what, f) in checks {
        let t0 = Instant::now();
        match f(&g, mode) {
            Ok(()) => println!("gvisor ({mode}): ok   {what} ({:?})", t0.elapsed()),
            Err(e) => {
                eprintln!("gvisor ({mode}): FAIL {what}: {e}");
                failed = true;
            }
        }
    }
    if let Err(e) = nothing_left(&g) {
        eprintln!("gvisor ({mode}): FAIL nothing left behind: {e}");
        failed = true;
    } else {
        println!(
            "gvisor ({mode}): ok   nothing left behind (runsc state, bundles, processes, cgroups)"
        );
    }
    let _ = std::fs::remove_dir_all(&base);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs `f` in a fresh sandbox of `spec`, destroying it afterwards.
fn with_sandbox(
    g: &Gvisor,
    spec: SandboxSpec,
    f: impl FnOnce(&dyn LiveSandbox) -> Result<(), String>,
) -> Result<(), String> {
    let sb = g
        .create(&SandboxConfig::new(spec))
        .map_err(|e| format!("create: {e}"))?;
    let r = f(&*sb);
    let d = sb.destroy().map_err(|e| format!("destroy: {e}"));
    r?;
    d
}

fn run(sb: &dyn LiveSandbox, e: &ExecSpec) -> Result<nanoclaw_sandbox::Outcome, String> {
    sb.exec(e).map_err(|e| e.to_string())
}

fn exit_codes(g: &Gvisor, _: &str) -> Result<(), String> {
    with_sandbox(g, SandboxSpec::new(Vec::<String>::new()), |sb| {
        for (cmd, code) in [("true", 0), ("exit 7", 7), ("exit 255", 255)] {
            let o = run(sb, &sh(cmd))?;
            if o.exit_code != Some(code) || o.cli_exit_code() != code {
                return Err(format!("{cmd}: {o:?}"));
            }
        }
        let o = run(sb, &ExecSpec::new(["/etc/passwd"]))?;
        if o.exit_code != Some(126) {
            return Err(format!("not executable: {o:?}"));
        }
        let o = run(sb, &ExecSpec::new(["no-such-command"]))?;
        if o.exit_code != Some(127) || !text(&o.stderr).contains("not found") {
            return Err(format!("not found: {o:?}"));
        }
        // runsc reports a signal death as 128+N, as `docker exec` does.
        let o = run(sb, &sh("kill -TERM $$"))?;
        if o.cli_exit_code() != 143 {
            return Err(format!("SIGTERM: {o:?}"));
        }
        let mut e = sh("sleep 29; echo never");
        e.timeout = Duration::from_millis(500);
        let t0 = Instant::now();
        let o = run(sb, &e)?;
        if o.killed_by != Some(KillReason::Timeout)
            || o.cli_exit_code() != 124
            || t0.elapsed() > Duration::from_secs(5)
        {
            return Err(format!("timeout after {:?}: {o:?}", t0.elapsed()));
        }
        // The timeout killed the whole group, not only `sh`.
        let o = run(
            sb,
            &sh("ps -e -o pid=,stat=,args= | grep 'sleep 29' | grep -v grep || true"),
        )?;
        if !o.stdout.is_empty() {
            return Err(format!(
                "the timed-out command's sleep still runs: {}",
                text(&o.stdout)
            ));
        }
        let mut e = ExecSpec::new(["cat"]);
        e.stdin = nanoclaw_sandbox::spec::Stdin::Bytes(b"from stdin".to_vec());
        let o = run(sb, &e)?;
        if o.stdout != b"from stdin" {
            return Err(format!("stdin: {o:?}"));
        }
        let mut e = sh("echo $A $HOME; pwd; id -u");
        e.env.push(("A".into(), "set".into()));
        e.workdir = Some("/usr".into());
        let o = run(sb, &e)?;
        if text(&o.stdout) != "set /tmp\n/usr\n1000\n" {
            return Err(format!("env, workdir, user: {:?}", text(&o.stdout)));
        }
        Ok(())
    })
}

fn one_shot(g: &Gvisor, mode: &str) -> Result<(), String> {
    let run = |argv: &[&str], f: &dyn Fn(&mut SandboxSpec)| {
        let mut s = SandboxSpec::new(argv.iter().copied());
        f(&mut s);
        g.run_once(&s, None).map_err(|e| format!("{argv:?}: {e}"))
    };
    let o = run(
        &["sh", "-c", "echo out; echo err >&2; id -u; exit 3"],
        &|_| {},
    )?;
    if o.exit_code != Some(3) || text(&o.stdout) != "out\n1000\n" || text(&o.stderr) != "err\n" {
        return Err(format!("exit 3: {o:?}"));
    }
    let o = run(&["no-such-command"], &|_| {})?;
    if o.exit_code != Some(127) || !text(&o.stderr).contains("not found") {
        return Err(format!("not found: {o:?}"));
    }
    let t0 = Instant::now();
    let o = run(&["sh", "-c", "echo started; sleep 29"], &|s| {
        s.limits.timeout = Duration::from_millis(2500)
    })?;
    if o.killed_by != Some(KillReason::Timeout)
        || o.cli_exit_code() != 124
        || text(&o.stdout) != "started\n"
        || t0.elapsed() > Duration::from_secs(8)
    {
        return Err(format!("timeout after {:?}: {o:?}", t0.elapsed()));
    }
    let o = run(&["yes"], &|s| s.limits.output_limit = 100)?;
    if o.killed_by != Some(KillReason::OutputLimit) || o.stdout.len() != 100 || !o.stdout_truncated
    {
        return Err(format!(
            "output limit: {:?} {}",
            o.killed_by,
            o.stdout.len()
        ));
    }
    let o = run(&["cat"], &|s| {
        s.stdin = nanoclaw_sandbox::spec::Stdin::Bytes(b"in".to_vec())
    })?;
    if o.stdout != b"in" {
        return Err(format!("stdin: {o:?}"));
    }
    if mode == "root" {
        let o = run(&["python3", "-c", "b = bytearray(400 << 20)"], &|s| {
            s.limits.memory = Some(128 << 20)
        })?;
        if o.killed_by != Some(KillReason::Oom) {
            return Err(format!("400 MiB under --memory 128m: {o:?}"));
        }
    }
    Ok(())
}

fn output_limit(g: &Gvisor, _: &str) -> Result<(), String> {
    with_sandbox(g, SandboxSpec::new(Vec::<String>::new()), |sb| {
        let mut e = ExecSpec::new(["yes"]);
        e.output_limit = 1000;
        let t0 = Instant::now();
        let o = run(sb, &e)?;
        if o.killed_by != Some(KillReason::OutputLimit)
            || !o.stdout_truncated
            || o.stdout.len() != 1000
            || t0.elapsed() > Duration::from_secs(10)
        {
            return Err(format!(
                "yes: killed_by {:?} truncated {} {} bytes after {:?}",
                o.killed_by,
                o.stdout_truncated,
                o.stdout.len(),
                t0.elapsed()
            ));
        }
        let o = run(sb, &sh("echo after"))?;
        if o.stdout != b"after\n" {
            return Err(format!("after the limit: {o:?}"));
        }
        Ok(())
    })
}

fn root_and_mounts(g: &Gvisor, mode: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("nanoclaw-gvisor-mount-{}", std::process::id()));
    let ro = dir.join("ro");
    let rw = dir.join("rw");
    for d in [&ro, &rw] {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    std::fs::write(ro.join("in.txt"), "host file\n").map_err(|e| e.to_string())?;
    // The sandbox user (1000 inside) must be able to write the rw mount.
    let _ = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(&dir)
        .status();
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.mounts.push(Mount {
        source: ro.clone(),
        target: "/ro".into(),
        access: Access::Ro,
    });
    spec.mounts.push(Mount {
        source: rw.clone(),
        target: "/rw".into(),
        access: Access::Rw,
    });
    if mode == "rootless" {
        // Only the caller's uid is mapped: the sandbox user cannot own files
        // on the host, so a writable mount is refused unless it runs as 0.
        match g.create(&SandboxConfig::new(spec.clone())) {
            Err(Error::Unsupported { what, .. }) if what.contains("writable --mount") => {}
            Err(e) => return Err(format!("a rootless rw mount: {e}")),
            Ok(sb) => {
                let _ = sb.destroy();
                return Err("a rootless rw mount for uid 1000 was accepted".into());
            }
        }
        spec.user = nanoclaw_sandbox::spec::User { uid: 0, gid: 0 };
    }
    let r = with_sandbox(g, spec, |sb| {
        // As root inside, so only read-only mounts stop the writes (rootless,
        // the host's /usr belongs to an unmapped uid: permission denied).
        let mut e = sh(
            "touch /usr/x 2>&1; touch /x 2>&1; touch /ro/x 2>&1; cat /ro/in.txt; \
                        grep -c '^root:x:0:0:' /etc/passwd",
        );
        e.user = Some(nanoclaw_sandbox::spec::User { uid: 0, gid: 0 });
        let o = run(sb, &e)?;
        let out = text(&o.stdout);
        if out.matches("cannot touch").count() != 3
            || out.matches("Read-only file system").count() < 2
            || !out.contains("host file\n1\n")
        {
            return Err(format!("root and mounts: {out:?}"));
        }
        let o = run(sb, &sh("echo out > /rw/out.txt"))?;
        if o.exit_code != Some(0) {
            return Err(format!("writing the rw mount: {o:?}"));
        }
        let o = run(sb, &sh("ls /etc/shadow /root /home 2>/dev/null; echo $?"))?;
        if text(&o.stdout).trim() != "2" {
            return Err(format!(
                "the host's /etc/shadow, /root or /home is visible: {:?}",
                text(&o.stdout)
            ));
        }
        Ok(())
    });
    let written = std::fs::read_to_string(rw.join("out.txt")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    if written != "out\n" {
        return Err(format!("the rw mount's file on the host: {written:?}"));
    }
    Ok(())
}

fn expect_refused(g: &Gvisor, spec: SandboxSpec, field: &str) -> Result<(), String> {
    let want = format!("--backend gvisor: {field} is not supported: ");
    match g.create(&SandboxConfig::new(spec)) {
        Err(e @ Error::NotSupported { .. }) if e.to_string().starts_with(&want) => Ok(()),
        Err(e) => Err(format!("{field}: want {want:?}…, got {e}")),
        Ok(sb) => {
            let _ = sb.destroy();
            Err(format!("{field} was accepted"))
        }
    }
}

fn refusals(g: &Gvisor, mode: &str) -> Result<(), String> {
    let allow = Network::Allowlist {
        hosts: vec!["example.com".into()],
        cidrs: vec![],
        limits: NetLimits::default(),
        add_hosts: vec![],
    };
    if mode == "rootless" {
        // Rootless runsc cannot join the namespace nanoclaw wires.
        let mut s = SandboxSpec::new(Vec::<String>::new());
        s.network = allow.clone();
        expect_refused(g, s, "--network allowlist")?;
    } else {
        // Egress works rootful (crates/cli/tests/egress_backends.rs), but
        // not for a sandbox that outlives the process holding its proxy.
        let mut s = SandboxSpec::new(Vec::<String>::new());
        s.network = allow.clone();
        let mut c = SandboxConfig::new(s);
        c.labels
            .push((nanoclaw_gvisor::LABEL_DETACHED.into(), "true".into()));
        let want =
            "--backend gvisor: --network allowlist for a detached sandbox is not supported: ";
        match g.create(&c) {
            Err(e @ Error::NotSupported { .. }) if e.to_string().starts_with(want) => {}
            Err(e) => return Err(format!("detached allowlist: want {want:?}…, got {e}")),
            Ok(sb) => {
                let _ = sb.destroy();
                return Err("a detached allowlist sandbox was accepted".into());
            }
        }
    }
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.network = Network::Kernel {
        cidrs: vec!["192.0.2.0/24".into()],
    };
    expect_refused(g, s, "--network kernel")?;
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.hardening.exec_allow.push("/usr".into());
    expect_refused(g, s, "--exec-allow")?;
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.limits.memory_swap = Some(1 << 30);
    expect_refused(g, s, "--memory-swap")?;
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.root = nanoclaw_sandbox::spec::Root::Layers(vec!["/nonexistent".into()]);
    expect_refused(g, s, "--image")
}

fn rootless_limits(g: &Gvisor, _: &str) -> Result<(), String> {
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.limits.memory = Some(64 << 20);
    s.limits.explicit.memory = true;
    match g.create(&SandboxConfig::new(s)) {
        Err(e @ Error::Unsupported { .. }) if e.to_string().contains("--ignore-cgroups") => Ok(()),
        Err(e) => Err(format!("want the rootless refusal, got {e}")),
        Ok(sb) => {
            let _ = sb.destroy();
            Err("an explicit memory limit was accepted rootless".into())
        }
    }
}

fn memory_limit(g: &Gvisor, _: &str) -> Result<(), String> {
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.limits.memory = Some(128 << 20);
    let sb = g
        .create(&SandboxConfig::new(s))
        .map_err(|e| format!("create: {e}"))?;
    let r = (|| {
        let o = run(
            &*sb,
            &ExecSpec::new([
                "python3",
                "-c",
                "b = bytearray(400 << 20); print('allocated')",
            ]),
        )?;
        if o.killed_by != Some(KillReason::Oom)
            || o.stdout == b"allocated\n"
            || o.cli_exit_code() != 137
        {
            return Err(format!("400 MiB in a 128 MiB sandbox: {o:?}"));
        }
        match sb.exec(&ExecSpec::new(["true"])) {
            Err(e) if e.to_string().contains("memory limit") => Ok(()),
            other => Err(format!("after the OOM: {other:?}")),
        }
    })();
    let d = sb.destroy().map_err(|e| format!("destroy: {e}"));
    r?;
    d
}

fn pids_limit(g: &Gvisor, _: &str) -> Result<(), String> {
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.limits.pids = Some(16);
    let sb = g
        .create(&SandboxConfig::new(s))
        .map_err(|e| format!("create: {e}"))?;
    let r = (|| {
        let o = run(
            &*sb,
            &sh("i=0; while [ $i -lt 200 ]; do sleep 20 & i=$((i+1)); done; wait"),
        )?;
        if o.killed_by != Some(KillReason::Pids) {
            return Err(format!("200 processes with --pids 16: {o:?}"));
        }
        Ok(())
    })();
    let d = sb.destroy().map_err(|e| format!("destroy: {e}"));
    r?;
    d
}

/// The child of [`killed_holder`]: makes a sandbox with a 2 s lifetime in
/// the backend at `root` (`detached`: labelled to outlive its maker),
/// prints its id, and waits to be killed.
fn hold(root: &Path, detached: bool) -> ExitCode {
    let exe = Gvisor::find_runsc().expect("runsc");
    let g = Gvisor::with(exe, root).expect("backend");
    let mut s = SandboxSpec::new(Vec::<String>::new());
    s.limits.timeout = Duration::from_secs(2);
    let mut c = SandboxConfig::new(s);
    if detached {
        c.labels
            .push((nanoclaw_gvisor::LABEL_DETACHED.into(), "true".into()));
    }
    let sb = g.create(&c).expect("create");
    let x = sb.spawn(&ExecSpec::new(["sleep", "60"])).expect("spawn");
    println!("{}", sb.id());
    std::thread::sleep(Duration::from_secs(60));
    drop(x);
    ExitCode::SUCCESS
}

/// Starts a holder, returns the id it printed after killing it (SIGKILL).
fn kill_holder(g: &Gvisor, detached: bool) -> Result<String, String> {
    let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args([
            HOLD,
            &g.root().to_string_lossy(),
            if detached { "detached" } else { "attached" },
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .map_err(|e| e.to_string())?;
    let _ = child.kill();
    let _ = child.wait();
    let id = line.trim().to_string();
    if !id.starts_with(ID_PREFIX) {
        return Err(format!("the holder printed {line:?}"));
    }
    Ok(id)
}

fn swept(g: &Gvisor, id: &str) -> Result<(), String> {
    let again = Gvisor::with(&g.runsc().exe, g.root()).map_err(|e| e.to_string())?;
    if again.runsc().state(id).is_some() || g.root().join(id).exists() {
        return Err(format!("{id} was not swept"));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while !backend_scenario::cgroup_dirs(id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !backend_scenario::cgroup_dirs(id).is_empty() {
        return Err(format!(
            "{id}'s cgroup is left: {:?}",
            backend_scenario::cgroup_dirs(id)
        ));
    }
    Ok(())
}

fn killed_holder(g: &Gvisor, _: &str) -> Result<(), String> {
    // Not detached: the next use of the backend removes it at once.
    let id = kill_holder(g, false)?;
    swept(g, &id)?;
    // Detached: it outlives its maker until its lifetime ends; then the
    // next use of the backend removes what is left.
    let id = kill_holder(g, true)?;
    let again = Gvisor::with(&g.runsc().exe, g.root()).map_err(|e| e.to_string())?;
    let st = again.runsc().state(&id).map(|s| s.status);
    if st.as_deref() != Some("running") {
        return Err(format!(
            "a detached sandbox right after its maker died: {st:?}"
        ));
    }
    std::thread::sleep(Duration::from_secs(3));
    swept(g, &id)
}

/// The containment suite with `examples/gvisor-run` (the library's
/// one-shot run) as the command prefix. Two checks judge gVisor's own
/// kernel by the host's rules and are left out (the README's table says
/// why): `dev_access` (gVisor's /dev has fuse and net/tun, nodes of its
/// own kernel) and `inotify_exhaustion` (gVisor's inotify instances are
/// objects of its kernel, not of the host's pool); EXPOSED (a call answered
/// by gVisor's kernel rather than refused) is allowed.
fn containment(_: &Gvisor, _: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let ex = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples/gvisor-run"))
        .ok_or("no target dir")?;
    if !ex.exists() {
        return Err(format!(
            "{} is not built (cargo test builds the examples)",
            ex.display()
        ));
    }
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/containment/run.py");
    let b = ex.display().to_string();
    let out = Command::new("python3")
        .arg(&suite)
        .args(["--prefix", &format!("{b} --")])
        .args(["--pids-prefix", &format!("{b} --pids 64 --")])
        .args(["--memory-prefix", &format!("{b} --memory 64 --")])
        .args([
            "--pids-limit",
            "64",
            "--memory-limit",
            "64",
            "--protect",
            &b,
        ])
        .args(["--skip", "dev_access,inotify_exhaustion", "--allow-exposed"])
        .current_dir(std::env::temp_dir())
        .output()
        .map_err(|e| format!("python3 {}: {e}", suite.display()))?;
    let text = format!("{}{}", text(&out.stdout), text(&out.stderr));
    print!(
        "{}",
        text.lines()
            .filter(|l| !l.starts_with("CONTAINED"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    if !out.status.success() {
        return Err(format!("the suite failed:\n{text}"));
    }
    Ok(())
}

/// No runsc container, bundle, runsc process or cgroup of this backend.
fn nothing_left(g: &Gvisor) -> Result<(), String> {
    let listed = g.runsc().list().map_err(|e| e.to_string())?;
    if !listed.is_empty() {
        return Err(format!(
            "runsc still lists {:?}",
            listed.iter().map(|c| &c.id).collect::<Vec<_>>()
        ));
    }
    let left: Vec<PathBuf> = std::fs::read_dir(g.root())
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "runsc"))
        .collect();
    if !left.is_empty() {
        return Err(format!("bundles left: {left:?}"));
    }
    let state: Vec<PathBuf> = std::fs::read_dir(&g.runsc().state)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .collect();
    if !state.is_empty() {
        return Err(format!("runsc state left: {state:?}"));
    }
    let needle = format!("--root={}", g.runsc().state.display());
    for e in std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .flatten()
    {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if text(&cmd).contains(&needle) {
                return Err(format!(
                    "a runsc process still runs: pid {:?}",
                    e.file_name()
                ));
            }
        }
    }
    let mut cg = Vec::new();
    for c in ["memory", "pids", "cpu", "cpuacct", ""] {
        let p = Path::new("/sys/fs/cgroup").join(c).join("nanoclaw");
        cg.extend(
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(ID_PREFIX))
                }),
        );
    }
    if !cg.is_empty() {
        return Err(format!("cgroups left: {cg:?}"));
    }
    Ok(())
}
