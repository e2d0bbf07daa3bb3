//! Benchmark: claim from a warm pool → first command output, against cold
//! create → first output, on the cluster `KUBECONFIG` names, side by side
//! with the native backend (in this process, the host root) on this
//! machine. Prints p50/p99 per mode as a Markdown table (and JSON with
//! `--json`). The anchor: agent-sandbox's claim latency, 200 ms now, 50 ms
//! its target.
//!
//! ```bash
//! eval "$(bash ../shared/k8s/up.sh --node)"
//! NANOCLAW_K8S_PULL_POLICY=Never cargo run --release -p nanoclaw-kubernetes \
//!     --example claim_bench -- --iterations 50
//! bash ../shared/k8s/down.sh
//! ```
//!
//! "First output" is the first command's whole outcome (`echo ready`), so
//! it includes one `pods/exec` round trip. Sandbox removal is not timed;
//! the pool is refilled between warm claims (not timed either).

use std::time::{Duration, Instant};

use nanoclaw_kubernetes::pool::{Pool, PoolOptions};
use nanoclaw_kubernetes::{KubeOptions, Kubernetes};
use nanoclaw_sandbox::backend::{Backend, LiveSandbox, NativeInProcess, SandboxConfig};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::Root;
use nanoclaw_sandbox::SandboxSpec;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[i.min(v.len() - 1)]
}

fn first_output(sb: &dyn LiveSandbox) -> Result<(), String> {
    let o = sb
        .exec(&ExecSpec::new(["echo", "ready"]))
        .map_err(|e| e.to_string())?;
    if o.stdout != b"ready\n" {
        return Err(format!("unexpected output: {o:?}"));
    }
    Ok(())
}

fn config(image: &str) -> SandboxConfig {
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.root = Root::Image(image.into());
    spec.limits.timeout = Duration::from_secs(300);
    SandboxConfig::new(spec)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let image = std::env::var("NANOCLAW_BENCH_K8S_IMAGE").unwrap_or("localhost/busybox:1".into());
    let k = Kubernetes::connect(KubeOptions::from_env()).map_err(|e| e.to_string())?;
    eprintln!("claim_bench: {} ({n} iterations)", k.describe());
    let mut rows: Vec<(&str, Vec<f64>)> = Vec::new();

    // Native, for scale: a sandbox on the host root, then its first output.
    let mut native = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let sb = NativeInProcess
            .create(&SandboxConfig::new(SandboxSpec::new(Vec::<String>::new())))
            .map_err(|e| format!("native create: {e}"))?;
        first_output(&*sb)?;
        native.push(t0.elapsed().as_secs_f64() * 1000.0);
        let _ = sb.destroy();
    }
    rows.push(("native (this machine): create → first output", native));

    let mut cold = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let sb = k
            .create(&config(&image))
            .map_err(|e| format!("create: {e}"))?;
        first_output(&*sb)?;
        cold.push(t0.elapsed().as_secs_f64() * 1000.0);
        let _ = sb.destroy();
    }
    rows.push(("kubernetes: cold create → first output", cold));

    let pool = Pool::start(
        &k,
        config(&image),
        PoolOptions {
            name: "bench".into(),
            size: 2,
            budget: 4,
            warm_lifetime: Duration::from_secs(900),
        },
    )
    .map_err(|e| e.to_string())?;
    let mut warm = Vec::new();
    let mut cold_claims = 0;
    for _ in 0..n {
        // Not timed: wait until the refill has a warm Pod ready.
        let t_wait = Instant::now();
        while pool.counts().map_err(|e| e.to_string())?.0 == 0 {
            if t_wait.elapsed() > Duration::from_secs(120) {
                return Err("the pool did not refill within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let t0 = Instant::now();
        let c = pool
            .claim(Duration::from_secs(120))
            .map_err(|e| format!("claim: {e}"))?;
        first_output(&*c.sandbox)?;
        let dt = t0.elapsed().as_secs_f64() * 1000.0;
        if c.warm {
            warm.push(dt);
        } else {
            cold_claims += 1;
        }
        let _ = c.sandbox.destroy();
    }
    drop(pool);
    rows.push(("kubernetes: warm claim → first output", warm));

    println!("| mode | n | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|");
    let mut json = Vec::new();
    for (name, mut v) in rows {
        let (p50, p99) = (pct(&mut v, 50.0), pct(&mut v, 99.0));
        println!("| {name} | {} | {p50:.1} | {p99:.1} |", v.len());
        json.push(serde_json::json!({"mode": name, "n": v.len(), "p50_ms": p50, "p99_ms": p99}));
    }
    println!("\n(claims that found no warm Pod and went cold: {cold_claims})");
    if args.iter().any(|a| a == "--json") {
        println!("{}", serde_json::Value::Array(json));
    }
    Ok(())
}
