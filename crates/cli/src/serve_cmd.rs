//! `nanoclaw serve`: the daemon (E2B's API over keepers).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nanoclaw_server::daemon::{self, DaemonConfig};
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
    /// Keep audit records this long (e.g. 90d): older ones are pruned at
    /// start and then regularly, the chain staying verifiable (`audit
    /// verify`). Default: keep everything (`nanoclaw audit prune` by hand).
    #[arg(long, value_name = "DURATION")]
    audit_retention: Option<String>,
    /// The envdVersion to report to E2B clients.
    #[arg(long, value_name = "VERSION", hide = true)]
    envd_version: Option<String>,
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
    let cfg = DaemonConfig {
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
