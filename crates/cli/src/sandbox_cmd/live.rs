//! `sandbox pause`, `resume` and `inspect`: requests a keeper answers at
//! once (it never waits on a command), with the sandbox's state now.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use nanoclaw_sandbox::keeper::{Reply, Request};

use super::remote;

/// How long `pause`, `resume` and `inspect` wait for a keeper.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Options of `sandbox pause` and `sandbox resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Sandboxes: ids (or unique prefixes) or names.
    #[arg(value_name = "ID|NAME", required = true)]
    targets: Vec<String>,
}

/// `nanoclaw sandbox pause`.
pub fn pause(a: PauseArgs) -> Result<u8> {
    toggle(&a, &Request::Pause)
}

/// `nanoclaw sandbox resume`.
pub fn resume(a: PauseArgs) -> Result<u8> {
    toggle(&a, &Request::Resume)
}

fn toggle(a: &PauseArgs, req: &Request) -> Result<u8> {
    for t in &a.targets {
        let (r, st) = match remote(t) {
            Ok(x) => x,
            Err(e) => match crate::backend_cmd::find(t)? {
                Some((sb, info)) => {
                    if matches!(req, Request::Pause) {
                        sb.pause()?;
                    } else {
                        sb.resume()?;
                    }
                    println!("{}", info.id);
                    continue;
                }
                None => return Err(e),
            },
        };
        match r.ask_within(req, ANSWER_WAIT)? {
            Reply::Live(_) => println!("{}", st.id),
            Reply::Error(e) => bail!("{e}"),
            Reply::Stopping => bail!("sandbox {} is ending", st.id),
            Reply::Network(_) | Reply::Lifetime { .. } => {
                bail!("sandbox {}: its keeper answered another request", st.id)
            }
        }
    }
    Ok(0)
}

/// `nanoclaw sandbox inspect`: state.json, and what the keeper says now.
pub fn inspect(target: &str) -> Result<u8> {
    let (r, st) = match remote(target) {
        Ok(x) => x,
        Err(e) => match crate::backend_cmd::find(target)? {
            Some((sb, info)) => return crate::backend_cmd::inspect(sb.as_ref(), &info),
            None => return Err(e),
        },
    };
    let mut v = serde_json::to_value(&st)?;
    let live = match r.ask_within(&Request::Inspect, ANSWER_WAIT)? {
        Reply::Live(l) => l,
        Reply::Error(e) => bail!("{e}"),
        Reply::Stopping => bail!("sandbox {} is ending", st.id),
        Reply::Network(_) | Reply::Lifetime { .. } => {
            bail!("sandbox {}: its keeper answered another request", st.id)
        }
    };
    let map = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("state of {} is not an object", st.id))?;
    if let serde_json::Value::Object(m) = serde_json::to_value(*live)? {
        map.extend(m);
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// Options of `sandbox stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds each process gets after SIGTERM before SIGKILL (as `docker stop -t`).
    #[arg(
        long = "time",
        short = 't',
        value_name = "SECONDS",
        default_value_t = 10
    )]
    time: u64,
    /// Sandboxes: ids (or unique prefixes) or names.
    #[arg(value_name = "ID|NAME", required = true)]
    targets: Vec<String>,
}

/// `nanoclaw sandbox stop`: ends every process running in each sandbox
/// (SIGTERM, then SIGKILL after `--time`); the sandbox, its files and its
/// limits stay for the next `exec` (a sandbox cannot be restarted, so
/// docker's stop + start are one step here). `sandbox rm` removes it.
pub fn stop(a: StopArgs) -> Result<u8> {
    if a.time > 3600 {
        bail!("--time {}: at most 3600 seconds", a.time);
    }
    for t in &a.targets {
        let (r, st) = remote(t)?;
        let killed = r.stop_processes(Duration::from_secs(a.time))?;
        if killed > 0 {
            eprintln!(
                "nanoclaw: sandbox {}: {killed} process(es) did not end within {} s and were killed",
                st.id, a.time
            );
        }
        println!("{}", st.id);
    }
    Ok(0)
}
