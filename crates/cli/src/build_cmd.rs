//! `nanoclaw image build`: build a Dockerfile with nanoclaw sandboxes
//! (library: `nanoclaw_image::build`).
//!
//! # Wiring (for the lead)
//!
//! main.rs: `mod build_cmd;` next to `mod image_cmd;`.
//!
//! image_cmd.rs, in `enum ImageCommand`:
//!
//! ```ignore
//! /// Build an image from a Dockerfile; every RUN runs in a nanoclaw sandbox.
//! Build(crate::build_cmd::BuildArgs),
//! ```
//!
//! and in `run_image`'s match: `ImageCommand::Build(a) => return crate::build_cmd::run_build(a),`
//! (the other arms evaluate to `()`).
//!
//! `run_build` returns `anyhow::Result<u8>` like the other commands: `Ok(0)`
//! after `Successfully tagged …`; an `Err` is one line (main prints it as
//! `nanoclaw: …` and exits 125). Step lines go to stdout, RUN output
//! streams through as it comes.
//!
//! # `--lang go` (run_cmd.rs)
//!
//! `nanoclaw_image::go::go_command(code, args)` returns the argv and env to
//! use instead of `[interp, flag, code]`; `run_cmd::add_go` adds them to the
//! final spec with the shared, read-only standard-library cache from
//! `nanoclaw_image::go::std_cache` mounted at `GO_SHARED_CACHE_TARGET`.
//! Each run's own build cache lives on its `/tmp`; nothing writable is
//! shared (see the `nanoclaw_image::go` module docs).
//!
//! The `go` binary comes from the root: the host's (`apt-get install
//! golang-go` puts it in /usr/bin, visible through the host root's /usr
//! bind) or the image's (`--image golang:1.21-alpine`).
//!
//! # CI
//!
//! Tests need docker with `nanoclaw-bench:latest` (or they skip, unless
//! `NANOCLAW_REQUIRE_DOCKER=1`), the user `nanotest` (uid 1500) for the
//! rootless runs, and `golang-go` for the Go test.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use nanoclaw_image::build::{build, build_limits, BuildOptions};
use nanoclaw_image::Store;
use nanoclaw_sandbox::spec::{NetLimits, Network};

/// Network of the RUN steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BuildNetwork {
    /// Loopback only (the default).
    None,
    /// Egress only to --allow-host / --allow-cidr, through nanoclaw's proxy.
    Allowlist,
    /// Any public destination through the proxy (warned about).
    Open,
}

/// `nanoclaw image build` arguments.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Name of the image to produce, e.g. myimage or myimage:1.
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tag: String,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// A build argument, KEY=VALUE (or KEY to take it from the environment); repeatable.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_arg: Vec<String>,
    /// Network of every RUN step: none (default), allowlist, open.
    #[arg(long, value_enum)]
    pub network: Option<BuildNetwork>,
    /// With --network allowlist: HOST[:PORT] the RUN steps may reach (repeatable; wildcards like *.example.com).
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    pub allow_host: Vec<String>,
    /// With --network allowlist: CIDR[:PORT] the RUN steps may reach (repeatable).
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORT]")]
    pub allow_cidr: Vec<String>,
    /// Grant a capability to RUN steps inside their own user namespace (e.g. CHOWN, SETUID, SETGID, DAC_OVERRIDE, FOWNER for package managers); repeatable.
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Memory limit of each RUN step (default 2g).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Timeout of each RUN step (default 30m).
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Fail the build when its new layers would hold more than SIZE (e.g.
    /// 4g); a RUN step writing past it is stopped while it runs. Default:
    /// no bound.
    #[arg(long = "max-bytes", value_name = "SIZE")]
    pub max_bytes: Option<String>,
    /// Do not use the build cache (new layers are still recorded in it).
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// Print only the image id.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print a JSON report (steps, cached or built, layers, timings) at the end.
    #[arg(long)]
    pub json: bool,
    /// FROM may name images under localhost/ only below this prefix, and
    /// no image by id (the daemon's builds of a tenant's Dockerfile:
    /// `localhost/TENANT/`).
    #[arg(long = "from-scope", value_name = "PREFIX", hide = true)]
    pub from_scope: Option<String>,
    /// The build context folder (COPY and ADD read from it).
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,
}

fn options(a: &BuildArgs) -> Result<BuildOptions> {
    let mut o = BuildOptions::new(a.tag.clone(), a.context.clone());
    o.dockerfile = a.file.clone();
    for kv in &a.build_arg {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => o.build_args.push((k.to_string(), v.to_string())),
            Some(_) => bail!("--build-arg {kv:?}: expected KEY=VALUE"),
            None => {
                // Docker: `--build-arg KEY` takes KEY from the environment; unset is ignored.
                if let Ok(v) = std::env::var(kv) {
                    o.build_args.push((kv.clone(), v));
                }
            }
        }
    }
    let allows = !a.allow_host.is_empty() || !a.allow_cidr.is_empty();
    o.network = match (a.network, allows) {
        (None | Some(BuildNetwork::None), false) => Network::None,
        (Some(BuildNetwork::None), true) => {
            bail!("--allow-host/--allow-cidr need --network allowlist (or leave --network out)")
        }
        (None | Some(BuildNetwork::Allowlist), _) => Network::Allowlist {
            hosts: a.allow_host.clone(),
            cidrs: a.allow_cidr.clone(),
            limits: NetLimits::default(),
            add_hosts: Vec::new(),
        },
        (Some(BuildNetwork::Open), true) => {
            bail!("--network open allows every public destination; --allow-host/--allow-cidr only make sense with --network allowlist")
        }
        (Some(BuildNetwork::Open), false) => {
            eprintln!("nanoclaw: warning: --network open: RUN steps may reach any public address through nanoclaw's proxy");
            Network::Open {
                limits: NetLimits::default(),
            }
        }
    };
    o.cap_add = a.cap_add.iter().map(|c| c.to_ascii_uppercase()).collect();
    let mut l = build_limits();
    if let Some(m) = &a.memory {
        l.memory = Some(
            nanoclaw_sandbox::units::parse_size(m).map_err(|e| anyhow::anyhow!("--memory: {e}"))?,
        );
        l.explicit.memory = true;
    }
    if let Some(t) = &a.timeout {
        l.timeout = nanoclaw_sandbox::units::parse_duration(t)
            .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
    }
    o.limits = l;
    o.no_cache = a.no_cache;
    o.stream_output = !a.quiet && !a.json;
    o.handle_signals = true;
    o.from_scope = a.from_scope.clone();
    o.max_bytes = a
        .max_bytes
        .as_deref()
        .map(|m| {
            nanoclaw_sandbox::units::parse_size(m)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow::anyhow!("--max-bytes {m:?}: give a size such as 4g or 500m"))
        })
        .transpose()?;
    Ok(o)
}

/// Runs `nanoclaw image build`; returns the exit code.
pub fn run_build(a: BuildArgs) -> Result<u8> {
    let o = options(&a)?;
    let store = Store::open_default()?;
    let rep = if a.quiet || a.json {
        build(&store, &o, &mut std::io::sink())?
    } else {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        build(&store, &o, &mut out)?
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer(&mut out, &rep)?;
        writeln!(out)?;
    } else if a.quiet {
        writeln!(out, "{}", rep.id)?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: BuildArgs,
    }

    fn parse(args: &[&str]) -> BuildArgs {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn flags_to_options() {
        let a = parse(&[
            "-t",
            "x:1",
            "-f",
            "D",
            "--build-arg",
            "A=1",
            "--allow-host",
            "pypi.org",
            "--memory",
            "1g",
            ".",
        ]);
        let o = options(&a).unwrap();
        assert_eq!(o.tag, "x:1");
        assert_eq!(o.build_args, vec![("A".to_string(), "1".to_string())]);
        assert!(
            matches!(o.network, Network::Allowlist { ref hosts, .. } if hosts == &["pypi.org"])
        );
        assert_eq!(o.limits.memory, Some(1 << 30));
        let a = parse(&["-t", "x", "--network", "none", "--allow-host", "a", "."]);
        assert!(options(&a).is_err());
        let a = parse(&["-t", "x", "."]);
        assert_eq!(options(&a).unwrap().network, Network::None);
    }
}
