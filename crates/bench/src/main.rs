//! `nanoclaw-bench`: sandbox start-up time, side by side in one run.
//!
//! Runs `nanoclaw run -- CMD`, bubblewrap with a root that mirrors nanoclaw's
//! default host root, `docker run --rm --network none` on a tiny local image, and
//! the bare command without any sandbox as a reference, on `/bin/true` and on
//! `python3 -c pass`. Iterations are interleaved round-robin (with a rotating
//! order) so that machine drift affects every runner alike. Prints a markdown
//! table (or `--json`) with median, p90 and min per runner, the ratios
//! nanoclaw/bwrap and docker/nanoclaw, the runner's peak RSS and a check that
//! nanoclaw executes nothing but the payload.
//!
//! ```text
//! cargo run --release -p nanoclaw-bench -- [--iterations N] [--json] [--nanoclaw PATH]
//! ```
//!
//! `--mode exec` measures commands run in a live sandbox instead (see
//! [`execbench`]): `nanoclaw exec ID -- CMD` into one made once with
//! `nanoclaw sandbox create`, `session::exec` in-process, `docker exec`
//! into a running container, and the bare command.

#![warn(missing_docs)]

mod execbench;
mod execcheck;
mod run;
mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use crate::stats::Summary;

/// Default image for the docker runner; built by `.ci/build-bench-image.sh`.
const DEFAULT_IMAGE: &str = "nanoclaw-bench:latest";
/// Target: nanoclaw's median at most this multiple of bwrap's.
const TARGET_NANOCLAW_OVER_BWRAP: f64 = 1.0;
/// Issue 5: sandbox start with the egress proxy within 1.5x of none.
const TARGET_ALLOWLIST_OVER_NONE: f64 = 1.5;
/// Target: docker's median at least this multiple of nanoclaw's.
const TARGET_DOCKER_OVER_NANOCLAW: f64 = 40.0;
/// Target: the runner's own peak RSS, KiB.
const TARGET_RUNNER_RSS_KIB: i64 = 10 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "nanoclaw-bench",
    about = "Sandbox start-up benchmark: nanoclaw vs bwrap vs docker run, side by side"
)]
struct Args {
    /// Measured iterations per runner and workload.
    #[arg(long, default_value_t = 30)]
    iterations: usize,
    /// Unmeasured warm-up runs per runner and workload (after one checked run).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Pause after every measured run, in milliseconds, so that work a run
    /// leaves to the system after it returns (docker's shim and container
    /// clean-up; the kernel's network-namespace clean-up worker, which
    /// nanoclaw's and bwrap's runs both leave) is not billed to the run
    /// that follows it.
    #[arg(long, default_value_t = 30)]
    settle_ms: u64,
    /// Print one JSON object instead of markdown.
    #[arg(long)]
    json: bool,
    /// The nanoclaw binary (default: $NANOCLAW_BIN, else `nanoclaw` next to this
    /// binary, else on PATH).
    #[arg(long)]
    nanoclaw: Option<PathBuf>,
    /// Extra argument for `nanoclaw run` (repeatable), placed before `--`.
    #[arg(long = "nanoclaw-arg", allow_hyphen_values = true)]
    nanoclaw_args: Vec<String>,
    /// The bwrap binary.
    #[arg(long, default_value = "bwrap")]
    bwrap: PathBuf,
    /// The docker client binary.
    #[arg(long, default_value = "docker")]
    docker: PathBuf,
    /// The image for `docker run` (must contain /bin/true, /bin/sh and
    /// /usr/bin/python3). Default: $NANOCLAW_BENCH_IMAGE, else
    /// nanoclaw-bench:latest.
    #[arg(long)]
    image: Option<String>,
    /// What to measure: sandbox start-up (`start`), or commands run in a
    /// sandbox that is already up (`exec`).
    #[arg(long, value_enum, default_value = "start")]
    mode: BenchMode,
    /// Runners, comma-separated: host, nanoclaw, bwrap, docker.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "host,nanoclaw,nanoclaw-net,bwrap,docker"
    )]
    runners: Vec<RunnerKind>,
    /// Workloads, comma-separated: true, python.
    #[arg(long, value_delimiter = ',', default_value = "true,python")]
    workloads: Vec<WorkloadKind>,
    /// Fail (instead of skipping) when a selected runner is unavailable.
    /// NANOCLAW_REQUIRE_DOCKER=1 does this for docker alone.
    #[arg(long)]
    require: bool,
    /// Skip the strace check that nanoclaw executes nothing but the payload.
    #[arg(long)]
    no_exec_check: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Exit with status 3 when a target is missed.
    #[arg(long)]
    check_targets: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchMode {
    /// A fresh sandbox per command: run vs bwrap vs docker run.
    Start,
    /// Commands in a live sandbox: nanoclaw exec vs docker exec.
    Exec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum RunnerKind {
    Host,
    Nanoclaw,
    /// nanoclaw with `--network allowlist` (the egress proxy set up).
    #[value(name = "nanoclaw-net")]
    #[serde(rename = "nanoclaw-net")]
    NanoclawNet,
    Bwrap,
    Docker,
}

impl RunnerKind {
    fn label(self) -> &'static str {
        match self {
            RunnerKind::Host => "host (no sandbox)",
            RunnerKind::Nanoclaw => "nanoclaw",
            RunnerKind::NanoclawNet => "nanoclaw --network allowlist",
            RunnerKind::Bwrap => "bwrap",
            RunnerKind::Docker => "docker",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum WorkloadKind {
    True,
    Python,
}

impl WorkloadKind {
    fn argv(self) -> Vec<String> {
        let a: &[&str] = match self {
            WorkloadKind::True => &["/bin/true"],
            WorkloadKind::Python => &["/usr/bin/python3", "-c", "pass"],
        };
        a.iter().map(|s| s.to_string()).collect()
    }
    fn label(self) -> &'static str {
        match self {
            WorkloadKind::True => "/bin/true",
            WorkloadKind::Python => "python3 -c pass",
        }
    }
}

/// How each runner is invoked.
struct Runners {
    nanoclaw: PathBuf,
    nanoclaw_args: Vec<String>,
    bwrap: PathBuf,
    docker: PathBuf,
    image: String,
}

impl Runners {
    fn argv(&self, r: RunnerKind, payload: &[String]) -> Vec<String> {
        let mut v: Vec<String> = match r {
            RunnerKind::Host => Vec::new(),
            RunnerKind::Nanoclaw | RunnerKind::NanoclawNet => {
                let mut v = vec![self.nanoclaw.display().to_string(), "run".into()];
                if r == RunnerKind::NanoclawNet {
                    // Any allowlist starts the proxy; the port is never used.
                    v.extend(["--allow-cidr".into(), "127.0.0.1/32:9".into()]);
                }
                v.extend(self.nanoclaw_args.iter().cloned());
                v.push("--".into());
                v
            }
            RunnerKind::Bwrap => {
                let mut v = vec![self.bwrap.display().to_string()];
                v.extend(bwrap_args());
                v
            }
            RunnerKind::Docker => vec![
                self.docker.display().to_string(),
                "run".into(),
                "--rm".into(),
                "--network".into(),
                "none".into(),
                self.image.clone(),
            ],
        };
        v.extend(payload.iter().cloned());
        v
    }
}

/// bwrap with the isolation the issue names (`--unshare-all --new-session
/// --cap-drop ALL`) and a root that mirrors nanoclaw's default host root, so the
/// two do comparable work: read-only /usr (usrmerge symlinks kept), the same
/// handful of /etc files, a fresh /proc, a minimal /dev, a 100 MiB tmpfs /tmp,
/// a read-only root, uid/gid 1000, a clean environment. bwrap does no cgroups,
/// seccomp or Landlock here; nanoclaw does all of them.
fn bwrap_args() -> Vec<String> {
    let mut v: Vec<String> = [
        "--unshare-all",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for top in ["/bin", "/sbin", "/lib", "/lib64"] {
        let p = Path::new(top);
        if let Ok(target) = std::fs::read_link(p) {
            v.extend(["--symlink".into(), target.display().to_string(), top.into()]);
        } else if p.is_dir() {
            v.extend(["--ro-bind".into(), top.into(), top.into()]);
        }
    }
    for etc in [
        "passwd",
        "group",
        "hosts",
        "resolv.conf",
        "nsswitch.conf",
        "ld.so.cache",
        "localtime",
        "ssl",
        "alternatives",
    ] {
        let p = format!("/etc/{etc}");
        if Path::new(&p).exists() {
            v.extend(["--ro-bind".into(), p.clone(), p]);
        }
    }
    v.extend(
        [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            "104857600",
            "--tmpfs",
            "/tmp",
            "--remount-ro",
            "/",
            "--chdir",
            "/",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    v
}

#[derive(Debug, Serialize)]
struct Cell {
    workload: WorkloadKind,
    runner: RunnerKind,
    #[serde(flatten)]
    summary: Summary,
    /// Largest wait4 ru_maxrss over the samples, KiB.
    maxrss_kib_max: i64,
    /// Median wait4 ru_maxrss, KiB.
    maxrss_kib_median: i64,
    /// Runs slower than [`SLOW_FACTOR`] × this cell's median, counted by
    /// the runner that ran just before them (`first` for none): a start
    /// that waits on what the previous sandbox left behind shows up here.
    slow_after: BTreeMap<String, usize>,
}

/// A run slower than this multiple of its cell's median is flagged.
const SLOW_FACTOR: f64 = 1.5;

/// Counts the samples above `SLOW_FACTOR` × `median`, by previous runner.
fn slow_after(samples: &[(f64, Option<RunnerKind>)], median: f64) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (ms, prev) in samples {
        if *ms > median * SLOW_FACTOR {
            let key = prev.map_or("first", RunnerKind::label).to_string();
            *out.entry(key).or_insert(0) += 1;
        }
    }
    out
}

#[derive(Debug, Serialize)]
struct Ratio {
    workload: WorkloadKind,
    /// Of the medians.
    nanoclaw_over_bwrap: Option<f64>,
    /// Of the medians.
    docker_over_nanoclaw: Option<f64>,
    /// Of the fastest runs (less sensitive to a busy machine).
    nanoclaw_over_bwrap_min: Option<f64>,
    /// Of the fastest runs.
    docker_over_nanoclaw_min: Option<f64>,
    /// Start-up with the egress proxy over without (medians).
    allowlist_over_none: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Target {
    name: String,
    value: Option<f64>,
    limit: f64,
    unit: &'static str,
    met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Skipped {
    runner: RunnerKind,
    reason: String,
}

#[derive(Debug, Serialize)]
struct HostInfo {
    date_utc: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    bwrap_version: Option<String>,
    docker_server_version: Option<String>,
    nanoclaw_version: Option<String>,
    /// /proc/loadavg's 1-minute load when the measured runs started and ended.
    load_start: f64,
    load_end: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    host: HostInfo,
    iterations: usize,
    warmup: usize,
    /// Pause after every measured run (ms).
    settle_ms: u64,
    commands: BTreeMap<String, Vec<String>>,
    skipped: Vec<Skipped>,
    results: Vec<Cell>,
    ratios: Vec<Ratio>,
    exec_check: Option<execcheck::ExecCheck>,
    exec_check_note: Option<String>,
    /// The `layers` object of `nanoclaw run --json -- /bin/true`.
    nanoclaw_layers: Option<serde_json::Value>,
    targets: Vec<Target>,
}

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("nanoclaw-bench: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> Result<i32> {
    let args = Args::parse();
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let runners = Runners {
        nanoclaw: resolve_nanoclaw(args.nanoclaw.as_deref()),
        nanoclaw_args: args.nanoclaw_args.clone(),
        bwrap: which(&args.bwrap).unwrap_or_else(|| args.bwrap.clone()),
        docker: which(&args.docker).unwrap_or_else(|| args.docker.clone()),
        image: args
            .image
            .clone()
            .or_else(|| std::env::var("NANOCLAW_BENCH_IMAGE").ok())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
    };
    if args.mode == BenchMode::Exec {
        return execbench::main(&args, &runners);
    }
    let mut kinds: Vec<RunnerKind> = args.runners.clone();
    kinds.sort();
    kinds.dedup();
    let mut workloads = args.workloads.clone();
    workloads.sort();
    workloads.dedup();

    // Availability.
    let require_docker = std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() == Ok("1");
    let mut skipped = Vec::new();
    let mut active = Vec::new();
    for &k in &kinds {
        match available(k, &runners) {
            Ok(()) => active.push(k),
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

    // Every combination once, checked (its stderr shown if it fails), then warm-ups.
    eprintln!(
        "nanoclaw-bench: {} runner(s) x {} workload(s): 1 checked + {} warm-up + {} measured runs each",
        active.len(),
        workloads.len(),
        args.warmup,
        args.iterations
    );
    for &w in &workloads {
        for &k in &active {
            run::run_checked(&runners.argv(k, &w.argv()))?;
            for _ in 0..args.warmup {
                run::run_once(&runners.argv(k, &w.argv()), false)?;
            }
        }
    }

    // Measured, interleaved: iteration i runs every workload on every runner,
    // the runner order rotated by i.
    let mut walls: BTreeMap<(WorkloadKind, RunnerKind), Vec<f64>> = BTreeMap::new();
    let mut prevs: BTreeMap<(WorkloadKind, RunnerKind), Vec<Option<RunnerKind>>> = BTreeMap::new();
    let mut prev: Option<RunnerKind> = None;
    let mut rss: BTreeMap<(WorkloadKind, RunnerKind), Vec<i64>> = BTreeMap::new();
    let load_start = load1();
    let started = Instant::now();
    for i in 0..args.iterations {
        for &w in &workloads {
            for j in 0..active.len() {
                let k = active[(i + j) % active.len()];
                let argv = runners.argv(k, &w.argv());
                let r = run::run_once(&argv, false)?;
                if !r.status.success() {
                    // Show why: run it again with stderr captured.
                    run::run_checked(&argv)?;
                    bail!("`{}` failed: {}", argv.join(" "), run::describe(r.status));
                }
                walls
                    .entry((w, k))
                    .or_default()
                    .push(r.wall.as_secs_f64() * 1e3);
                rss.entry((w, k)).or_default().push(r.maxrss_kib);
                prevs.entry((w, k)).or_default().push(prev);
                prev = Some(k);
                std::thread::sleep(Duration::from_millis(args.settle_ms));
            }
        }
        if (i + 1) % 10 == 0 {
            eprintln!(
                "nanoclaw-bench: {}/{} iterations ({:.1}s)",
                i + 1,
                args.iterations,
                started.elapsed().as_secs_f64()
            );
        }
    }

    let mut results = Vec::new();
    for (&(w, k), samples) in &walls {
        let Some(summary) = stats::summarize(samples) else {
            continue;
        };
        let mut r = rss.get(&(w, k)).cloned().unwrap_or_default();
        r.sort_unstable();
        let tagged: Vec<(f64, Option<RunnerKind>)> = samples
            .iter()
            .copied()
            .zip(prevs.get(&(w, k)).cloned().unwrap_or_default())
            .collect();
        let slow = slow_after(&tagged, summary.median_ms);
        results.push(Cell {
            workload: w,
            runner: k,
            slow_after: slow,
            summary,
            maxrss_kib_max: r.last().copied().unwrap_or(0),
            maxrss_kib_median: r.get(r.len() / 2).copied().unwrap_or(0),
        });
    }
    let stat = |w: WorkloadKind, k: RunnerKind, f: fn(&Summary) -> f64| {
        results
            .iter()
            .find(|c| c.workload == w && c.runner == k)
            .map(|c| f(&c.summary))
    };
    let ratios: Vec<Ratio> = workloads
        .iter()
        .map(|&w| {
            let med = |k| stat(w, k, |s| s.median_ms);
            let min = |k| stat(w, k, |s| s.min_ms);
            let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
            Ratio {
                workload: w,
                nanoclaw_over_bwrap: over(med(RunnerKind::Nanoclaw), med(RunnerKind::Bwrap)),
                docker_over_nanoclaw: over(med(RunnerKind::Docker), med(RunnerKind::Nanoclaw)),
                nanoclaw_over_bwrap_min: over(min(RunnerKind::Nanoclaw), min(RunnerKind::Bwrap)),
                docker_over_nanoclaw_min: over(min(RunnerKind::Docker), min(RunnerKind::Nanoclaw)),
                allowlist_over_none: over(med(RunnerKind::NanoclawNet), med(RunnerKind::Nanoclaw)),
            }
        })
        .collect();

    // Which isolation layers nanoclaw applied (its --json outcome reports them).
    let nanoclaw_layers = if active.contains(&RunnerKind::Nanoclaw) {
        nanoclaw_layers(&runners)
    } else {
        None
    };

    // No shelling out.
    let (exec_check, exec_check_note) = if !active.contains(&RunnerKind::Nanoclaw) {
        (None, Some("nanoclaw runner not selected".to_string()))
    } else if args.no_exec_check {
        (None, Some("skipped (--no-exec-check)".to_string()))
    } else if let Some(strace) = which(Path::new("strace")) {
        let payload = WorkloadKind::True.argv();
        match execcheck::check(
            &strace,
            &runners.argv(RunnerKind::Nanoclaw, &payload),
            &payload[0],
        ) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(format!("could not trace nanoclaw: {e:#}"))),
        }
    } else {
        (
            None,
            Some("strace not installed (apt-get install strace)".to_string()),
        )
    };

    let mut targets = Vec::new();
    for r in &ratios {
        if active.contains(&RunnerKind::Nanoclaw) && active.contains(&RunnerKind::Bwrap) {
            targets.push(Target {
                name: format!("nanoclaw / bwrap, {}", r.workload.label()),
                value: r.nanoclaw_over_bwrap,
                limit: TARGET_NANOCLAW_OVER_BWRAP,
                unit: "x (at most)",
                met: r
                    .nanoclaw_over_bwrap
                    .map(|v| v <= TARGET_NANOCLAW_OVER_BWRAP),
            });
        }
        if active.contains(&RunnerKind::NanoclawNet) && active.contains(&RunnerKind::Nanoclaw) {
            targets.push(Target {
                name: format!("nanoclaw allowlist / none, {}", r.workload.label()),
                value: r.allowlist_over_none,
                limit: TARGET_ALLOWLIST_OVER_NONE,
                unit: "x (at most)",
                met: r
                    .allowlist_over_none
                    .map(|v| v <= TARGET_ALLOWLIST_OVER_NONE),
            });
        }
        // docker / nanoclaw is a target on /bin/true only: on `python3 -c pass`
        // the interpreter's own start-up (~10 ms here, the `host` row) is already
        // more than docker's time / 40, so no runner could reach 40x there.
        if r.workload == WorkloadKind::True
            && active.contains(&RunnerKind::Nanoclaw)
            && active.contains(&RunnerKind::Docker)
        {
            targets.push(Target {
                name: format!("docker / nanoclaw, {}", r.workload.label()),
                value: r.docker_over_nanoclaw,
                limit: TARGET_DOCKER_OVER_NANOCLAW,
                unit: "x (at least)",
                met: r
                    .docker_over_nanoclaw
                    .map(|v| v >= TARGET_DOCKER_OVER_NANOCLAW),
            });
        }
    }
    if let Some(c) = results
        .iter()
        .find(|c| c.runner == RunnerKind::Nanoclaw && c.workload == WorkloadKind::True)
    {
        targets.push(Target {
            name: "nanoclaw runner peak RSS (wait4 ru_maxrss, `run -- /bin/true`)".into(),
            value: Some(c.maxrss_kib_max as f64 / 1024.0),
            limit: TARGET_RUNNER_RSS_KIB as f64 / 1024.0,
            unit: "MiB (at most)",
            met: Some(c.maxrss_kib_max <= TARGET_RUNNER_RSS_KIB),
        });
    }
    if let Some(c) = &exec_check {
        targets.push(Target {
            name: "processes executed besides nanoclaw and the payload".into(),
            value: Some(c.unexpected.len() as f64),
            limit: 0.0,
            unit: "(at most)",
            met: Some(c.ok),
        });
    }

    let mut commands = BTreeMap::new();
    for &k in &active {
        commands.insert(
            k.label().to_string(),
            runners.argv(k, &WorkloadKind::True.argv()),
        );
    }
    let mut host = host_info(&runners, &active);
    host.load_start = load_start;
    host.load_end = load1();
    let report = Report {
        host,
        iterations: args.iterations,
        warmup: args.warmup,
        settle_ms: args.settle_ms,
        commands,
        skipped,
        results,
        ratios,
        exec_check,
        exec_check_note,
        nanoclaw_layers,
        targets,
    };
    let missed = report.targets.iter().any(|t| t.met == Some(false));
    emit(&args, &report, &markdown(&report), missed)
}

/// Writes a report: JSON to `--json-out` (if given), and JSON or markdown
/// to stdout; the exit code says whether a target was missed (with
/// `--check-targets`).
fn emit<R: Serialize>(args: &Args, report: &R, markdown: &str, missed: bool) -> Result<i32> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(p) = &args.json_out {
        std::fs::write(p, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{markdown}");
    }
    Ok(if args.check_targets && missed { 3 } else { 0 })
}

/// The `layers` field of `nanoclaw run --json -- /bin/true`, if it reports one.
fn nanoclaw_layers(r: &Runners) -> Option<serde_json::Value> {
    let mut argv = vec!["run".to_string(), "--json".to_string()];
    argv.extend(r.nanoclaw_args.iter().cloned());
    argv.extend(["--".to_string(), "/bin/true".to_string()]);
    let out = Command::new(&r.nanoclaw)
        .args(&argv)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("layers").cloned()
}

/// Whether a runner can run here; the reason and the fix if not.
fn available(k: RunnerKind, r: &Runners) -> std::result::Result<(), String> {
    match k {
        RunnerKind::Host => Ok(()),
        RunnerKind::Nanoclaw | RunnerKind::NanoclawNet => {
            if is_executable(&r.nanoclaw) {
                Ok(())
            } else {
                Err(format!(
                    "no nanoclaw binary at {}: build it with `cargo build --release -p nanoclaw`, \
                     pass --nanoclaw PATH, or leave it out with --runners host,bwrap,docker",
                    r.nanoclaw.display()
                ))
            }
        }
        RunnerKind::Bwrap => {
            if is_executable(&r.bwrap) {
                Ok(())
            } else {
                Err("bwrap not found: apt-get install bubblewrap".into())
            }
        }
        RunnerKind::Docker => {
            if !is_executable(&r.docker) {
                return Err("docker not found: apt-get install docker.io".into());
            }
            let info = Command::new(&r.docker)
                .args(["info", "--format", "{{.ServerVersion}}"])
                .output()
                .map_err(|e| format!("cannot run docker: {e}"))?;
            if !info.status.success() {
                return Err(
                    "the docker daemon does not answer: start it (.ci/start-dockerd.sh)".into(),
                );
            }
            let img = Command::new(&r.docker)
                .args(["image", "inspect", "--format", "{{.Id}}", &r.image])
                .output()
                .map_err(|e| format!("cannot run docker: {e}"))?;
            if !img.status.success() {
                return Err(format!(
                    "image {} missing: build it with .ci/build-bench-image.sh",
                    r.image
                ));
            }
            Ok(())
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A program name looked up on PATH (a path with a slash is returned as is).
fn which(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return Some(name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn resolve_nanoclaw(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return which(p).unwrap_or_else(|| p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NANOCLAW_BIN") {
        return PathBuf::from(p);
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("nanoclaw")))
        .filter(|p| is_executable(p))
    {
        return sibling;
    }
    which(Path::new("nanoclaw")).unwrap_or_else(|| PathBuf::from("nanoclaw"))
}

fn first_line_of(cmd: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let s = if s.trim().is_empty() {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        s.into_owned()
    };
    s.lines().next().map(|l| l.trim().to_string())
}

fn host_info(r: &Runners, active: &[RunnerKind]) -> HostInfo {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let has = |k| active.contains(&k);
    HostInfo {
        date_utc: today_utc(),
        kernel,
        cpu,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        bwrap_version: has(RunnerKind::Bwrap)
            .then(|| first_line_of(&r.bwrap, &["--version"]))
            .flatten(),
        docker_server_version: has(RunnerKind::Docker)
            .then(|| first_line_of(&r.docker, &["version", "--format", "{{.Server.Version}}"]))
            .flatten(),
        nanoclaw_version: has(RunnerKind::Nanoclaw)
            .then(|| first_line_of(&r.nanoclaw, &["--version"]))
            .flatten(),
        load_start: 0.0,
        load_end: 0.0,
    }
}

/// The 1-minute load average.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// YYYY-MM-DD (UTC) from the system clock, without a date crate.
fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}×"))
        .unwrap_or_else(|| "n/a".into())
}

fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let h = &r.host;
    let _ = writeln!(s, "### Start-up benchmark\n");
    let _ = writeln!(
        s,
        "{} · Linux {} · {} × {} · {} measured runs per cell, interleaved round-robin with a {} ms pause after each, after 1 checked + {} warm-up runs.",
        h.date_utc, h.kernel, h.cpus, h.cpu, r.iterations, r.settle_ms, r.warmup
    );
    let mut versions = Vec::new();
    if let Some(v) = &h.nanoclaw_version {
        versions.push(v.clone());
    }
    if let Some(v) = &h.bwrap_version {
        versions.push(v.clone());
    }
    if let Some(v) = &h.docker_server_version {
        versions.push(format!("docker {v}"));
    }
    if !versions.is_empty() {
        let _ = writeln!(s, "Versions: {}.", versions.join(", "));
    }
    let _ = writeln!(
        s,
        "Load average (1 min) {:.2} at the start, {:.2} at the end.",
        h.load_start, h.load_end
    );
    if h.load_start.max(h.load_end) > h.cpus as f64 / 2.0 {
        let _ = writeln!(
            s,
            "**The machine was busy: medians and p90 are inflated and noisy; `min` is the best \
             estimate of the uncontended cost. Re-run on an idle machine for the README.**"
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| workload | runner | median | p10–p90 | min–max | slow³ | median − host² | peak RSS¹ |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---|---:|---:|");
    let mut last = None;
    for c in &r.results {
        let w = if last == Some(c.workload) {
            String::new()
        } else {
            format!("`{}`", c.workload.label())
        };
        last = Some(c.workload);
        let host = r
            .results
            .iter()
            .find(|h| h.workload == c.workload && h.runner == RunnerKind::Host);
        let overhead = match host {
            Some(h) if c.runner != RunnerKind::Host => {
                ms(c.summary.median_ms - h.summary.median_ms)
            }
            _ => "—".to_string(),
        };
        let slow = if c.slow_after.is_empty() {
            "0".to_string()
        } else {
            c.slow_after
                .iter()
                .map(|(after, n)| format!("{n} after {after}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "| {w} | {} | {} | {}–{} | {}–{} | {slow} | {overhead} | {:.1} MiB |",
            c.runner.label(),
            ms(c.summary.median_ms),
            ms(c.summary.p10_ms),
            ms(c.summary.p90_ms),
            ms(c.summary.min_ms),
            ms(c.summary.max_ms),
            c.maxrss_kib_max as f64 / 1024.0
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| workload | nanoclaw / bwrap (target ≤ {TARGET_NANOCLAW_OVER_BWRAP:.1}×) | docker / nanoclaw (target ≥ {TARGET_DOCKER_OVER_NANOCLAW:.0}×) | same, of the fastest runs |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for q in &r.ratios {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} / {} |",
            q.workload.label(),
            ratio(q.nanoclaw_over_bwrap),
            ratio(q.docker_over_nanoclaw),
            ratio(q.nanoclaw_over_bwrap_min),
            ratio(q.docker_over_nanoclaw_min)
        );
    }
    let _ = writeln!(s);
    if !r.targets.is_empty() {
        let _ = writeln!(s, "Targets:");
        for t in &r.targets {
            let mark = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let v = t
                .value
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                s,
                "- {}: {v} (limit {} {}) — {mark}",
                t.name, t.limit, t.unit
            );
        }
        let _ = writeln!(s);
    }
    if let Some(c) = &r.exec_check {
        let list: Vec<String> = c.execs.iter().map(|(p, n)| format!("`{p}` ×{n}")).collect();
        let _ = writeln!(
            s,
            "Programs executed by `nanoclaw run -- /bin/true` (strace -f, {} tasks): {}{}.",
            c.tasks,
            list.join(", "),
            if c.ok {
                " — no shelling out".to_string()
            } else if c.unreadable > 0 {
                format!(
                    " — INCONCLUSIVE: strace could not read {} exec path(s); run the benchmark as root",
                    c.unreadable
                )
            } else if !c.unexpected.is_empty() {
                format!(" — UNEXPECTED: {}", c.unexpected.join(", "))
            } else {
                format!(
                    " — the payload ran {} times, expected once",
                    c.payload_execs
                )
            }
        );
    } else if let Some(n) = &r.exec_check_note {
        let _ = writeln!(s, "Exec check: {n}.");
    }
    if let Some(l) = &r.nanoclaw_layers {
        let _ = writeln!(s, "Layers nanoclaw applied (`run --json`): `{l}`.");
    }
    for k in &r.skipped {
        let _ = writeln!(s, "Skipped {}: {}.", k.runner.label(), k.reason);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "¹ `wait4` `ru_maxrss`: the largest peak RSS of any single process in the runner's \
         process tree that was reaped inside that tree (not a sum). For nanoclaw that is \
         max(nanoclaw, its sandbox init, the payload); the `host` rows show the payload alone. \
         For bwrap it is bwrap alone: bwrap exits on its init's exit status without reaping \
         it, so the payload is not counted. For docker it is the client only: dockerd, \
         containerd, the shim and runc are not counted."
    );
    let _ = writeln!(
        s,
        "\n³ runs slower than {SLOW_FACTOR}× the cell's median, by the runner that ran just before them.\n"
    );
    let _ = write!(
        s,
        "\n² the sandbox's start-up and tear-down cost: its median minus the bare command's. \
         docker / nanoclaw is a target on `/bin/true` only: python's own start-up is longer \
         than docker's time / 40, so no runner can be 40× faster than docker on it."
    );
    let _ = writeln!(s, "\nCommands (for `/bin/true`):\n");
    for (k, argv) in &r.commands {
        let _ = writeln!(s, "- {k}: `{}`", argv.join(" "));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn bwrap_args_mirror_the_host_root() {
        let a = bwrap_args();
        for want in [
            "--unshare-all",
            "--new-session",
            "--cap-drop",
            "--remount-ro",
            "--tmpfs",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x == "/etc/shadow"));
    }
}
