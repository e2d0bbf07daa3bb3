//! `--mode exec`: a command run in a sandbox that is already up.
//!
//! Runners, each on every selected workload, interleaved round-robin with
//! a rotating order (as in the start-up mode):
//! - `host`: the bare command, the reference;
//! - `nanoclaw exec`: `nanoclaw exec ID -- CMD` into one sandbox made once
//!   with `nanoclaw sandbox create`: a client process per command, which
//!   asks the sandbox's keeper over its socket;
//! - `session::exec`: the library call in this process, into a sandbox
//!   this process holds (no client process, no keeper): the engine's part;
//! - `docker exec`: `docker exec CID CMD` into a container started once
//!   with `docker run -d -i --network none IMAGE sh -c 'read _'` (the bench
//!   image has no `sleep`; `read` waits forever on the held-open stdin).
//!
//! Everything it starts is removed at the end, on an error too, and on
//! SIGINT, SIGTERM or SIGHUP (blocked while it runs, checked between runs).
//! Should it die anyway, the nanoclaw sandbox ends itself after 10 minutes
//! without use, and the next run removes containers whose benchmark is
//! gone (label `nanoclaw-bench-exec=<pid>`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nanoclaw_sandbox::native::session::{self, ExecSpec};
use serde::Serialize;

use crate::stats::{self, Summary};
use crate::{
    available, host_info, load1, ms, run, Args, HostInfo, RunnerKind, Runners, Skipped, Target,
    WorkloadKind,
};

/// Target: `nanoclaw exec`'s median at most this much above the bare command's.
const TARGET_EXEC_OVER_BARE_MS: f64 = 1.0;
/// The docker label that marks the benchmark's container (value: its pid).
const LABEL: &str = "nanoclaw-bench-exec";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum ExecRunner {
    Host,
    NanoclawExec,
    Library,
    DockerExec,
}

impl ExecRunner {
    fn label(self) -> &'static str {
        match self {
            ExecRunner::Host => "host (no sandbox)",
            ExecRunner::NanoclawExec => "nanoclaw exec",
            ExecRunner::Library => "session::exec (in-process)",
            ExecRunner::DockerExec => "docker exec",
        }
    }
}

/// What the benchmark started; dropping it removes everything.
struct Live {
    nanoclaw: PathBuf,
    docker: PathBuf,
    sandbox: Option<String>,
    container: Option<String>,
    library: Option<nanoclaw_sandbox::Sandbox>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(id) = self.sandbox.take() {
            let quiet = |args: &[&str]| {
                Command::new(&self.nanoclaw)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !quiet(&["sandbox", "rm", &id]) && !quiet(&["sandbox", "rm", "-f", &id]) {
                eprintln!(
                    "nanoclaw-bench: could not remove sandbox {id}: `nanoclaw sandbox rm -f {id}`"
                );
            }
        }
        if let Some(cid) = self.container.take() {
            remove_container(&self.docker, &cid);
        }
        if let Some(sb) = self.library.take() {
            session::remove(sb);
        }
    }
}

fn remove_container(docker: &Path, cid: &str) {
    let ok = Command::new(docker)
        .args(["rm", "-f", cid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("nanoclaw-bench: could not remove container {cid}: `docker rm -f {cid}`");
    }
}

/// Containers of earlier runs whose benchmark process is gone.
fn remove_stale_containers(docker: &Path) {
    let Ok(out) = Command::new(docker)
        .args(["ps", "-a", "--filter", &format!("label={LABEL}")])
        .args([
            "--format",
            &format!("{{{{.ID}}}} {{{{.Label \"{LABEL}\"}}}}"),
        ])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace();
        let (Some(cid), pid) = (it.next(), it.next()) else {
            continue;
        };
        if !pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
            remove_container(docker, cid);
        }
    }
}

/// Stdout of a command that must succeed, trimmed.
fn output_of(argv: &[String]) -> Result<String> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", argv[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Live {
    /// Starts what `active` needs.
    fn start(r: &Runners, active: &[ExecRunner]) -> Result<Live> {
        let mut live = Live {
            nanoclaw: r.nanoclaw.clone(),
            docker: r.docker.clone(),
            sandbox: None,
            container: None,
            library: None,
        };
        let me = std::process::id().to_string();
        if active.contains(&ExecRunner::NanoclawExec) {
            let mut argv = vec![r.nanoclaw.display().to_string(), "sandbox".into()];
            argv.extend(["create", "--lifetime", "4h", "--idle-timeout", "10m"].map(String::from));
            argv.extend(["--label".into(), format!("nanoclaw-bench={me}")]);
            argv.extend(r.nanoclaw_args.iter().cloned());
            live.sandbox = Some(output_of(&argv)?);
        }
        if active.contains(&ExecRunner::DockerExec) {
            remove_stale_containers(&r.docker);
            let mut argv = vec![r.docker.display().to_string(), "run".into()];
            argv.extend(["-d", "-i", "--rm", "--network", "none", "--label"].map(String::from));
            argv.extend([format!("{LABEL}={me}"), r.image.clone()]);
            argv.extend(["sh", "-c", "read _"].map(String::from));
            live.container = Some(output_of(&argv)?);
        }
        if active.contains(&ExecRunner::Library) {
            let mut spec = nanoclaw_sandbox::SandboxSpec::new(Vec::<String>::new());
            spec.limits.timeout = Duration::from_secs(4 * 3600);
            live.library =
                Some(session::create(&spec).context("session::create (the in-process sandbox)")?);
        }
        Ok(live)
    }

    fn argv(&self, k: ExecRunner, payload: &[String]) -> Vec<String> {
        let mut v = match (k, &self.sandbox, &self.container) {
            (ExecRunner::NanoclawExec, Some(id), _) => {
                vec![
                    self.nanoclaw.display().to_string(),
                    "exec".into(),
                    id.clone(),
                    "--".into(),
                ]
            }
            (ExecRunner::DockerExec, _, Some(cid)) => {
                vec![
                    self.docker.display().to_string(),
                    "exec".into(),
                    cid.clone(),
                ]
            }
            _ => Vec::new(),
        };
        v.extend(payload.iter().cloned());
        v
    }

    /// One run, in milliseconds; an error if the command did not exit 0.
    fn run_once(&mut self, k: ExecRunner, payload: &[String]) -> Result<f64> {
        if k == ExecRunner::Library {
            let sb = self.library.as_mut().context("no in-process sandbox")?;
            let spec = ExecSpec::new(payload.iter().cloned());
            let t = Instant::now();
            let o = session::exec(sb, &spec)?;
            let wall = t.elapsed();
            if o.exit_code != Some(0) {
                bail!(
                    "session::exec {payload:?}: {:?} {}",
                    o.exit_code,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            return Ok(wall.as_secs_f64() * 1e3);
        }
        let argv = self.argv(k, payload);
        let r = run::run_once(&argv, false)?;
        if !r.status.success() {
            run::run_checked(&argv)?;
            bail!("`{}` failed: {}", argv.join(" "), run::describe(r.status));
        }
        Ok(r.wall.as_secs_f64() * 1e3)
    }
}

/// SIGINT, SIGTERM and SIGHUP, blocked so that they end the run through
/// the normal error path (which removes what was started). They stay
/// blocked to the end: unblocking one that is pending would kill the
/// process before the clean-up.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> Signals {
        // SAFETY: `set` is initialised by sigemptyset before any other use;
        // pthread_sigmask reads it only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    fn check(&self) -> Result<()> {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid signal set and timespec; a null siginfo is allowed.
        let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &zero) };
        if sig > 0 {
            bail!("interrupted by signal {sig}");
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct ExecCell {
    workload: WorkloadKind,
    runner: ExecRunner,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Debug, Serialize)]
struct ExecRatio {
    workload: WorkloadKind,
    /// Medians, ms.
    nanoclaw_exec_minus_host_ms: Option<f64>,
    library_minus_host_ms: Option<f64>,
    docker_exec_minus_host_ms: Option<f64>,
    /// Of the medians.
    docker_exec_over_nanoclaw_exec: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ExecReport {
    mode: &'static str,
    host: HostInfo,
    iterations: usize,
    warmup: usize,
    settle_ms: u64,
    commands: BTreeMap<String, Vec<String>>,
    skipped: Vec<Skipped>,
    results: Vec<ExecCell>,
    ratios: Vec<ExecRatio>,
    targets: Vec<Target>,
}

/// The runners `--runners` selects, and those it had to skip.
fn select(args: &Args, r: &Runners) -> Result<(Vec<ExecRunner>, Vec<Skipped>)> {
    let require_docker = std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() == Ok("1");
    let (mut active, mut skipped) = (Vec::new(), Vec::new());
    for &k in &args.runners {
        let runners: &[ExecRunner] = match k {
            RunnerKind::Host => &[ExecRunner::Host],
            RunnerKind::Nanoclaw => &[ExecRunner::NanoclawExec, ExecRunner::Library],
            RunnerKind::Docker => &[ExecRunner::DockerExec],
            RunnerKind::NanoclawNet | RunnerKind::Bwrap => continue,
        };
        match available(k, r) {
            Ok(()) => active.extend_from_slice(runners),
            Err(reason) => {
                let required = args.require
                    || k == RunnerKind::Nanoclaw
                    || (k == RunnerKind::Docker && require_docker);
                if required {
                    bail!("{} is not available: {reason}", k.label());
                }
                eprintln!("nanoclaw-bench: skipping {}: {reason}", k.label());
                skipped.push(Skipped { runner: k, reason });
            }
        }
    }
    active.sort();
    active.dedup();
    Ok((active, skipped))
}

/// `--mode exec`.
pub fn main(args: &Args, r: &Runners) -> Result<i32> {
    let (active, skipped) = select(args, r)?;
    let mut workloads = args.workloads.clone();
    workloads.sort();
    workloads.dedup();
    let mut live = Live::start(r, &active)?;
    let signals = Signals::block();
    let walls = measure(args, &mut live, &active, &workloads, &signals)?;
    let mut commands = BTreeMap::new();
    for &k in &active {
        let argv = match k {
            ExecRunner::Library => {
                vec!["session::exec(&mut sb, ExecSpec::new([\"/bin/true\"]))".into()]
            }
            _ => live.argv(k, &WorkloadKind::True.argv()),
        };
        commands.insert(k.label().to_string(), argv);
    }
    drop(live);
    report(args, r, walls.0, walls.1, skipped, commands)
}

type Walls = BTreeMap<(WorkloadKind, ExecRunner), Vec<f64>>;

/// One checked run and the warm-ups per cell, then the measured runs,
/// interleaved. Returns the samples and the load average at the start.
fn measure(
    args: &Args,
    live: &mut Live,
    active: &[ExecRunner],
    workloads: &[WorkloadKind],
    signals: &Signals,
) -> Result<(Walls, f64)> {
    eprintln!(
        "nanoclaw-bench (exec): {} runner(s) x {} workload(s): 1 checked + {} warm-up + {} measured runs each",
        active.len(),
        workloads.len(),
        args.warmup,
        args.iterations
    );
    for &w in workloads {
        for &k in active {
            for _ in 0..=args.warmup {
                live.run_once(k, &w.argv())?;
            }
        }
    }
    let mut walls: Walls = BTreeMap::new();
    let load_start = load1();
    let started = Instant::now();
    for i in 0..args.iterations {
        for &w in workloads {
            for j in 0..active.len() {
                signals.check()?;
                let k = active[(i + j) % active.len()];
                let ms = live.run_once(k, &w.argv())?;
                walls.entry((w, k)).or_default().push(ms);
                std::thread::sleep(Duration::from_millis(args.settle_ms));
            }
        }
        if (i + 1) % 50 == 0 {
            eprintln!(
                "nanoclaw-bench (exec): {}/{} iterations ({:.1}s)",
                i + 1,
                args.iterations,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok((walls, load_start))
}

fn report(
    args: &Args,
    r: &Runners,
    walls: Walls,
    load_start: f64,
    skipped: Vec<Skipped>,
    commands: BTreeMap<String, Vec<String>>,
) -> Result<i32> {
    let results: Vec<ExecCell> = walls
        .iter()
        .filter_map(|(&(workload, runner), s)| {
            Some(ExecCell {
                workload,
                runner,
                summary: stats::summarize(s)?,
            })
        })
        .collect();
    let med = |w, k| {
        results
            .iter()
            .find(|c| c.workload == w && c.runner == k)
            .map(|c| c.summary.median_ms)
    };
    let mut workloads: Vec<WorkloadKind> = results.iter().map(|c| c.workload).collect();
    workloads.dedup();
    let ratios: Vec<ExecRatio> = workloads
        .iter()
        .map(|&w| {
            let host = med(w, ExecRunner::Host);
            let minus = |k| med(w, k).zip(host).map(|(a, b)| a - b);
            ExecRatio {
                workload: w,
                nanoclaw_exec_minus_host_ms: minus(ExecRunner::NanoclawExec),
                library_minus_host_ms: minus(ExecRunner::Library),
                docker_exec_minus_host_ms: minus(ExecRunner::DockerExec),
                docker_exec_over_nanoclaw_exec: med(w, ExecRunner::DockerExec)
                    .zip(med(w, ExecRunner::NanoclawExec))
                    .map(|(d, n)| d / n),
            }
        })
        .collect();
    let targets: Vec<Target> = ratios
        .iter()
        .filter(|q| q.workload == WorkloadKind::True)
        .map(|q| Target {
            name: "nanoclaw exec median − bare command median, /bin/true".into(),
            value: q.nanoclaw_exec_minus_host_ms,
            limit: TARGET_EXEC_OVER_BARE_MS,
            unit: "ms (at most)",
            met: q
                .nanoclaw_exec_minus_host_ms
                .map(|v| v <= TARGET_EXEC_OVER_BARE_MS),
        })
        .collect();
    let kinds = [RunnerKind::Host, RunnerKind::Nanoclaw, RunnerKind::Docker];
    let mut host = host_info(r, &kinds);
    host.load_start = load_start;
    host.load_end = load1();
    let rep = ExecReport {
        mode: "exec",
        host,
        iterations: args.iterations,
        warmup: args.warmup,
        settle_ms: args.settle_ms,
        commands,
        skipped,
        results,
        ratios,
        targets,
    };
    let missed = rep.targets.iter().any(|t| t.met == Some(false));
    crate::emit(args, &rep, &markdown(&rep), missed)
}

fn markdown(r: &ExecReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let h = &r.host;
    let _ = writeln!(
        s,
        "### Exec benchmark (a command in a sandbox that is up)\n"
    );
    let _ = writeln!(
        s,
        "{} · Linux {} · {} × {} · {} measured runs per cell, interleaved round-robin with a {} ms pause after each, after 1 checked + {} warm-up runs. Load average (1 min) {:.2} at the start, {:.2} at the end.\n",
        h.date_utc, h.kernel, h.cpus, h.cpu, r.iterations, r.settle_ms, r.warmup, h.load_start, h.load_end
    );
    let _ = writeln!(
        s,
        "| workload | runner | median | p10–p90 | min–max | median − bare |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    for c in &r.results {
        let bare = r
            .results
            .iter()
            .find(|b| b.workload == c.workload && b.runner == ExecRunner::Host);
        let over = match bare {
            Some(b) if c.runner != ExecRunner::Host => {
                ms(c.summary.median_ms - b.summary.median_ms)
            }
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {}–{} | {}–{} | {over} |",
            c.workload.label(),
            c.runner.label(),
            ms(c.summary.median_ms),
            ms(c.summary.p10_ms),
            ms(c.summary.p90_ms),
            ms(c.summary.min_ms),
            ms(c.summary.max_ms),
        );
    }
    let _ = writeln!(s);
    for q in &r.ratios {
        if let Some(x) = q.docker_exec_over_nanoclaw_exec {
            let _ = writeln!(
                s,
                "`{}`: docker exec / nanoclaw exec = {x:.1}× (medians).",
                q.workload.label()
            );
        }
    }
    for t in &r.targets {
        let mark = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let v = t.value.map_or("n/a".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "- {}: {v} (limit {} {}) — {mark}",
            t.name, t.limit, t.unit
        );
    }
    for k in &r.skipped {
        let _ = writeln!(s, "Skipped {}: {}.", k.runner.label(), k.reason);
    }
    let _ = writeln!(s, "\nCommands (for `/bin/true`):\n");
    for (k, argv) in &r.commands {
        let _ = writeln!(s, "- {k}: `{}`", argv.join(" "));
    }
    s
}
