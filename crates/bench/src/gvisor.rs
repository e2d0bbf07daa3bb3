//! The gvisor backend next to runsc itself, interleaved in one run:
//!
//! * cold `/bin/true` and `python3 -c pass`: `runsc do CMD` (the issue's
//!   reference) vs the backend's create + exec + destroy (the library, as
//!   `nanoclaw run --backend gvisor` drives it) and, with `--nanoclaw`,
//!   `nanoclaw run --backend gvisor -- CMD` itself;
//! * exec into a live sandbox: `runsc exec ID CMD` vs the backend's
//!   `LiveSandbox::exec` into the same sandbox (and, with `--nanoclaw`,
//!   `nanoclaw sandbox exec ID -- CMD` into one made by
//!   `nanoclaw sandbox create --backend gvisor`).
//!
//! Each iteration runs every runner once, in a rotating order, so a slow
//! moment of the (shared) machine hits all of them alike. Medians, p10/p90
//! and the ratio to runsc's median are printed as a Markdown table (and
//! written as JSON with `--json-out`).
//!
//! ```text
//! cargo run --release -p nanoclaw-bench --bin nanoclaw-bench-gvisor -- --iterations 30
//! ```

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nanoclaw_gvisor::Gvisor;
use nanoclaw_sandbox::backend::{Backend, LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::SandboxSpec;
use serde::Serialize;

mod stats;

#[derive(Parser, Debug)]
#[command(about = "gvisor backend vs runsc do / runsc exec, interleaved")]
struct Args {
    /// Measured iterations per runner and workload.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Unmeasured warm-up iterations.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also measure this nanoclaw binary's `run --backend gvisor` and
    /// `sandbox exec`.
    #[arg(long)]
    nanoclaw: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct Row {
    workload: String,
    runner: String,
    summary: stats::Summary,
    /// This runner's median over the reference's (runsc) median.
    ratio: f64,
}

type Sample = Box<dyn FnMut() -> Result<()>>;

fn quiet(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?}: {st}");
    }
    Ok(())
}

/// Runs the runners of one workload interleaved; their samples in ms.
fn interleave(
    runners: &mut [(String, Sample)],
    iterations: usize,
    warmup: usize,
) -> Result<Vec<Vec<f64>>> {
    let n = runners.len();
    let mut samples = vec![Vec::with_capacity(iterations); n];
    for i in 0..warmup + iterations {
        for k in 0..n {
            let j = (i + k) % n;
            let t0 = Instant::now();
            (runners[j].1)().with_context(|| runners[j].0.clone())?;
            if i >= warmup {
                samples[j].push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    Ok(samples)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runsc = Gvisor::find_runsc()
        .context("runsc not found (apt-get install -t bookworm-backports runsc)")?;
    let base = std::env::temp_dir().join(format!("nanoclaw-bench-gvisor-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let g = Gvisor::with(&runsc, base.join("gvisor"))?;
    let do_root = base.join("runsc-do");
    std::fs::create_dir_all(&do_root)?;
    let r = bench(&args, &g, &runsc, &do_root);
    let _ = std::fs::remove_dir_all(&base);
    let rows = r?;
    println!("| workload | runner | median ms | p10 | p90 | ratio to runsc |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
            r.workload, r.runner, r.summary.median_ms, r.summary.p10_ms, r.summary.p90_ms, r.ratio
        );
    }
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

fn bench(
    args: &Args,
    g: &Gvisor,
    runsc: &std::path::Path,
    do_root: &std::path::Path,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let cwd = std::env::temp_dir();
    for (name, argv) in [
        ("cold /bin/true", vec!["/bin/true"]),
        ("cold python3 -c pass", vec!["python3", "-c", "pass"]),
    ] {
        let mut runners: Vec<(String, Sample)> = Vec::new();
        let (rs, dr, a, c) = (
            runsc.to_path_buf(),
            do_root.to_path_buf(),
            argv.clone(),
            cwd.clone(),
        );
        runners.push((
            "runsc do".into(),
            Box::new(move || {
                quiet(
                    Command::new(&rs)
                        .arg(format!("--root={}", dr.display()))
                        .arg("--network=none")
                        .arg("do")
                        .args(&a)
                        .current_dir(&c),
                )
            }),
        ));
        let (g2, a) = (g.clone(), argv.clone());
        runners.push((
            "gvisor backend: create, exec, destroy".into(),
            Box::new(move || {
                let sb = g2.create(&SandboxConfig::new(SandboxSpec::new(Vec::<String>::new())))?;
                let o = sb.exec(&ExecSpec::new(a.iter().copied()));
                sb.destroy()?;
                if o?.exit_code != Some(0) {
                    bail!("non-zero exit");
                }
                Ok(())
            }),
        ));
        let (g2, a) = (g.clone(), argv.clone());
        runners.push((
            "gvisor backend: run_once".into(),
            Box::new(move || {
                if g2
                    .run_once(&SandboxSpec::new(a.iter().copied()), None)?
                    .exit_code
                    != Some(0)
                {
                    bail!("non-zero exit");
                }
                Ok(())
            }),
        ));
        if let Some(nc) = &args.nanoclaw {
            let (nc, a) = (nc.clone(), argv.clone());
            runners.push((
                "nanoclaw run --backend gvisor".into(),
                Box::new(move || {
                    quiet(
                        Command::new(&nc)
                            .args(["run", "--backend", "gvisor", "--"])
                            .args(&a),
                    )
                }),
            ));
        }
        push_rows(&mut rows, name, runners, args)?;
    }

    // Exec into one live sandbox: runsc exec and the backend, same sandbox.
    let sb = g.create(&SandboxConfig::new(SandboxSpec::new(Vec::<String>::new())))?;
    let id = sb.id().to_string();
    let shared: std::sync::Arc<dyn LiveSandbox> = std::sync::Arc::from(sb);
    let mut cli_id = None;
    let r = (|| -> Result<()> {
        let mut runners: Vec<(String, Sample)> = Vec::new();
        let (rs, state, id2) = (runsc.to_path_buf(), g.runsc().state.clone(), id.clone());
        runners.push((
            "runsc exec".into(),
            Box::new(move || {
                quiet(
                    Command::new(&rs)
                        .arg(format!("--root={}", state.display()))
                        .args(["exec", "--user=1000:1000", &id2, "/bin/true"]),
                )
            }),
        ));
        let s2 = shared.clone();
        runners.push((
            "gvisor backend: LiveSandbox::exec".into(),
            Box::new(move || {
                if s2.exec(&ExecSpec::new(["/bin/true"]))?.exit_code != Some(0) {
                    bail!("non-zero exit");
                }
                Ok(())
            }),
        ));
        if let Some(nc) = &args.nanoclaw {
            let out = Command::new(nc)
                .args([
                    "sandbox",
                    "create",
                    "--backend",
                    "gvisor",
                    "--timeout",
                    "600",
                ])
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("nanoclaw sandbox create --backend gvisor failed");
            }
            let cid = String::from_utf8_lossy(&out.stdout).trim().to_string();
            cli_id = Some(cid.clone());
            let nc = nc.clone();
            runners.push((
                "nanoclaw sandbox exec".into(),
                Box::new(move || {
                    quiet(Command::new(&nc).args(["sandbox", "exec", &cid, "--", "/bin/true"]))
                }),
            ));
        }
        push_rows(
            &mut rows,
            "exec /bin/true into a live sandbox",
            runners,
            args,
        )
    })();
    if let (Some(nc), Some(cid)) = (&args.nanoclaw, &cli_id) {
        let _ = quiet(Command::new(nc).args(["sandbox", "rm", cid]));
    }
    shared.destroy()?;
    r?;
    // Let the measurements settle before the next caller.
    std::thread::sleep(Duration::from_millis(10));
    Ok(rows)
}

fn push_rows(
    rows: &mut Vec<Row>,
    workload: &str,
    mut runners: Vec<(String, Sample)>,
    args: &Args,
) -> Result<()> {
    let samples = interleave(&mut runners, args.iterations, args.warmup)?;
    let reference = stats::summarize(&samples[0])
        .context("no samples")?
        .median_ms;
    for ((name, _), s) in runners.iter().zip(samples) {
        let summary = stats::summarize(&s).context("no samples")?;
        rows.push(Row {
            workload: workload.into(),
            runner: name.clone(),
            ratio: summary.median_ms / reference,
            summary,
        });
    }
    Ok(())
}
