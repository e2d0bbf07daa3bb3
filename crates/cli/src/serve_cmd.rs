//! `nanoclaw serve`: the daemon (E2B's API over keepers).

use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use nanoclaw_server::daemon::{self, DaemonConfig};
use nanoclaw_server::keepers::{Engines, Template, CODE_INTERPRETER_TEMPLATE};
use nanoclaw_server::ListenAddr;

/// Options of `nanoclaw serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: `unix:PATH` or `tcp:ADDR:PORT` (repeatable; TCP only
    /// when tenants have API keys). Default: /run/nanoclaw/nanoclaw.sock as
    /// root, $XDG_RUNTIME_DIR/nanoclaw/nanoclaw.sock rootless.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// The data folder (tenants, audit log); default /var/lib/nanoclaw as
    /// root, $XDG_DATA_HOME/nanoclaw rootless.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A warm pool: TEMPLATE=N sandboxes created ahead and handed out on
    /// create (repeatable; e.g. --pool base=8).
    #[arg(long = "pool", value_name = "TEMPLATE=N")]
    pools: Vec<String>,
    /// A template whose sandboxes run on another backend:
    /// NAME=BACKEND[:IMAGE] (repeatable), e.g. `--template
    /// untrusted=gvisor`, `--template py=docker:python:3.12-slim` (an
    /// image in Docker's store) or `--template k=kubernetes:IMAGE` (a Pod,
    /// an image the cluster's nodes can get). E2B clients pick it with its
    /// templateID.
    #[arg(long = "template", value_name = "NAME=BACKEND[:IMAGE]")]
    templates: Vec<String>,
    /// Keep audit records this long (e.g. 90d): older ones are pruned at
    /// start and then regularly, the chain staying verifiable (`audit
    /// verify`). Default: keep everything (`nanoclaw audit prune` by hand).
    #[arg(long, value_name = "DURATION")]
    audit_retention: Option<String>,
    /// The config file agents run with (`POST /v1/execute`): its llm
    /// section, agents and policy. Without it agent runs are refused.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How long an agent's approval request waits for an answer through
    /// /v1/approvals (then: denied).
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    approval_timeout: String,
    /// The most one tenant's image build (POST /v1/images) may add to the
    /// image store (e.g. 4g): a RUN step writing past it is stopped and the
    /// build fails with nothing kept.
    #[arg(long, value_name = "SIZE", default_value = "4g")]
    max_build_bytes: String,
    /// The most all of one tenant's registered images may hold in the image
    /// store (e.g. 16g); then its builds are refused (409).
    #[arg(long, value_name = "SIZE", default_value = "16g")]
    max_tenant_image_bytes: String,
    /// The envdVersion to report to E2B clients.
    #[arg(long, value_name = "VERSION", hide = true)]
    envd_version: Option<String>,
}

/// The agents' config file, absolute, once it loads without errors (the
/// runs load it again: an edit takes effect at the next run).
fn check_config(path: &Path) -> Result<PathBuf> {
    let Some((path, _, loaded)) = crate::config_cmd::find_and_load(Some(path))? else {
        anyhow::bail!("--config {}: no such file", path.display());
    };
    if loaded.has_errors() {
        let list: Vec<String> = loaded.errors().map(|d| d.to_string()).collect();
        anyhow::bail!(
            "--config {}: {} error(s): {}",
            path.display(),
            list.len(),
            list.join(" | ")
        );
    }
    std::fs::canonicalize(&path).with_context(|| format!("--config {}", path.display()))
}

/// `--template NAME=BACKEND[:IMAGE]`: the template, E2B's `base` on that
/// backend (user 1000, home `/home/user`) over the image for Docker.
fn template_of(flag: &str) -> Result<(String, Template)> {
    let usage = "use NAME=BACKEND[:IMAGE], e.g. untrusted=gvisor or py=docker:python:3.12-slim";
    let Some((name, rest)) = flag.split_once('=') else {
        anyhow::bail!("--template {flag:?}: {usage}");
    };
    let (backend, image) = match rest.split_once(':') {
        Some((b, i)) => (b, Some(i)),
        None => (rest, None),
    };
    let ok_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok_name {
        anyhow::bail!(
            "--template {flag:?}: the name {name:?} must be letters, digits, '-', '_' or '.'; {usage}"
        );
    }
    if matches!(name, "base" | CODE_INTERPRETER_TEMPLATE) {
        anyhow::bail!("--template {flag:?}: {name} is one of the daemon's own templates; give it another name");
    }
    let backend = crate::backends::chosen(Some(backend), None)
        .map_err(|e| anyhow::anyhow!("--template {flag:?}: {e}"))?;
    let mut t = Template::base();
    match (backend.as_str(), image) {
        ("docker", Some(i)) if !i.is_empty() => {
            t.spec.root = nanoclaw_sandbox::spec::Root::Image(i.to_string());
        }
        ("docker", _) => anyhow::bail!(
            "--template {flag:?}: the docker backend needs an image from Docker's store: {name}=docker:IMAGE"
        ),
        ("kubernetes", Some(i)) if !i.is_empty() => {
            t.spec.root = nanoclaw_sandbox::spec::Root::Image(i.to_string());
        }
        ("kubernetes", _) => anyhow::bail!(
            "--template {flag:?}: the kubernetes backend needs an image the cluster's nodes can get: {name}=kubernetes:IMAGE"
        ),
        (b, Some(_)) => anyhow::bail!(
            "--template {flag:?}: an image is for the docker and kubernetes backends only; the {b} backend runs the host root here"
        ),
        _ => {}
    }
    t.backend = (backend != crate::backends::NATIVE).then_some(backend);
    Ok((name.to_string(), t))
}

/// The templates of `--template`, and the backends they name opened (which
/// sweeps what a killed daemon left there).
fn templates_of(flags: &[String]) -> Result<(HashMap<String, Template>, Engines)> {
    let mut templates = HashMap::new();
    let mut engines = Engines::default();
    for f in flags {
        let (name, t) = template_of(f)?;
        if let Some(b) = &t.backend {
            if b == nanoclaw_kubernetes::NAME && engines.1.is_none() {
                // The backend itself too: its sandboxes live in per-tenant
                // namespaces, shared by every replica of the daemon.
                let k = nanoclaw_kubernetes::Kubernetes::connect(crate::backends::kube_options())
                    .map_err(|e| anyhow::anyhow!("--template {f:?}: {e:#}"))?;
                engines.0.insert(b.clone(), Arc::new(k.clone()));
                engines.1 = Some(k);
            } else if !engines.0.contains_key(b) {
                // A micro-VM of the daemon's is held by a holder process
                // (QEMU is never started from the daemon's address space).
                let opened = if b == "microvm" {
                    crate::backends::microvm(true)
                } else {
                    crate::backends::backend_by_name(b)
                }
                .map_err(|e| anyhow::anyhow!("--template {f:?}: {e:#}"))?;
                engines.0.insert(b.clone(), Arc::from(opened));
            }
        }
        if templates.insert(name.clone(), t).is_some() {
            anyhow::bail!("--template {name}=...: given twice");
        }
    }
    Ok((templates, engines))
}

/// `nanoclaw serve`.
pub fn run(a: ServeArgs) -> Result<u8> {
    let listen = a
        .listen
        .iter()
        .map(|l| {
            l.parse::<ListenAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "--listen {l:?}: use unix:PATH or tcp:ADDR:PORT (e.g. tcp:127.0.0.1:3000)"
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut pools = std::collections::HashMap::new();
    for p in &a.pools {
        let n = p
            .split_once('=')
            .and_then(|(t, n)| Some((t, n.parse::<usize>().ok()?)))
            .filter(|(t, n)| !t.is_empty() && *n <= nanoclaw_server::keepers::MAX_POOL);
        let Some((t, n)) = n else {
            anyhow::bail!(
                "--pool {p:?}: use TEMPLATE=N with N at most {} (e.g. --pool base=8)",
                nanoclaw_server::keepers::MAX_POOL
            );
        };
        pools.insert(t.to_string(), n);
    }
    let audit_retention = a
        .audit_retention
        .as_deref()
        .map(|d| {
            nanoclaw_server::db::parse_duration(d)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--audit-retention {d:?}: give a duration such as 90d, 12h or 30m"
                    )
                })
        })
        .transpose()?;
    let approval_timeout = nanoclaw_server::db::parse_duration(&a.approval_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--approval-timeout {:?}: give a duration such as 5m, 30s or 1h",
                a.approval_timeout
            )
        })?;
    let config = a.config.as_deref().map(check_config).transpose()?;
    let size = |flag: &str, v: &str| {
        nanoclaw_sandbox::units::parse_size(v)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow::anyhow!("{flag} {v:?}: give a size such as 4g or 500m"))
    };
    let image_disk = nanoclaw_server::images::DiskBounds {
        per_build: size("--max-build-bytes", &a.max_build_bytes)?,
        per_tenant: size("--max-tenant-image-bytes", &a.max_tenant_image_bytes)?,
    };
    let (templates, engines) = templates_of(&a.templates)?;
    let cfg = DaemonConfig {
        templates,
        engines,
        image_disk,
        config,
        approval_timeout,
        audit_retention,
        pools,
        listen,
        data: a.data,
        exe: std::env::current_exe().context("finding nanoclaw's own binary")?,
        envd_version: a.envd_version,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(daemon::run(cfg))?;
    Ok(0)
}
