//! `nanoclaw run`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use nanoclaw_image::go::GoRun;
use nanoclaw_sandbox::spec::{Access, Mount, NetLimits, Network, Seccomp, Stdin, User};
use nanoclaw_sandbox::units::{format_duration, format_size, parse_duration, parse_size};
use nanoclaw_sandbox::{KillReason, RunOptions, SandboxSpec};

/// Options of `nanoclaw run`.
///
/// Limits, `--user` and `--workspace-access` are `Option`s with no clap
/// default: `Some` means the flag was given before COMMAND (clap puts
/// everything from COMMAND on into `command`, so a `--timeout` among the
/// sandboxed command's own arguments is never one of ours). With
/// `--config`, only given flags override the policy; the defaults are the
/// engine's (`nanoclaw_sandbox::spec::DEFAULT_*`).
#[derive(Debug, Args, Clone)]
#[command(trailing_var_arg = true, args_override_self = true)]
pub struct RunArgs {
    /// Memory limit, e.g. 256m or 1g (default: 512m).
    #[arg(long, allow_hyphen_values = true, value_name = "SIZE")]
    memory: Option<String>,
    /// Memory plus swap limit (default: equal to --memory, i.e. no swap).
    #[arg(long, allow_hyphen_values = true, value_name = "SIZE")]
    memory_swap: Option<String>,
    /// CPU quota in cpus, fractional (default: 1).
    #[arg(long, allow_hyphen_values = true, value_name = "N")]
    cpus: Option<String>,
    /// Maximum number of processes and threads (default: 256).
    #[arg(long, allow_hyphen_values = true, value_name = "N")]
    pids: Option<String>,
    /// Wall-clock timeout, e.g. 500ms, 30s, 2m (default: 30s).
    #[arg(long, allow_hyphen_values = true, value_name = "DURATION")]
    timeout: Option<String>,
    /// Size of the writable /tmp (default: 100m).
    #[arg(long, allow_hyphen_values = true, value_name = "SIZE")]
    tmpfs_size: Option<String>,
    /// Per-stream output limit (default: 10m); past it output is dropped and
    /// the sandbox killed.
    #[arg(long, allow_hyphen_values = true, value_name = "SIZE")]
    output_limit: Option<String>,
    /// Environment variable for the command (repeatable). The host
    /// environment is never inherited.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long, value_name = "PATH")]
    workdir: Option<PathBuf>,
    /// User to run as inside the sandbox (default: 1000:1000, or the image's user).
    #[arg(long, allow_hyphen_values = true, value_name = "UID[:GID]")]
    user: Option<String>,
    /// Host directory mounted at /workspace (see --workspace-access).
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Access to the workspace: none (not mounted; the default), ro or rw.
    #[arg(long, value_enum, value_name = "ACCESS")]
    workspace_access: Option<WorkspaceAccess>,
    /// Bind mount HOST:CONTAINER[:ro|rw] (repeatable; default ro).
    #[arg(long = "mount", short = 'v', value_name = "HOST:CONTAINER[:ro|rw]")]
    mounts: Vec<String>,
    /// Forward this process's stdin to the command (default: /dev/null).
    #[arg(long)]
    pub(crate) stdin: bool,
    /// Run a snippet with this interpreter instead of COMMAND.
    #[arg(long, value_enum, value_name = "LANG")]
    lang: Option<Lang>,
    /// The snippet's code (with --lang).
    #[arg(long, value_name = "CODE", conflicts_with = "file")]
    code: Option<String>,
    /// A host file whose contents are the snippet (with --lang).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Print one JSON object with the outcome instead of streaming output.
    #[arg(long)]
    pub(crate) json: bool,
    /// Grant a capability inside the sandbox's own user namespace (repeatable).
    #[arg(long = "cap-add", value_name = "NAME")]
    cap_add: Vec<String>,
    /// Seccomp: a Docker-format JSON profile, or `unconfined`.
    #[arg(long, value_name = "PATH|unconfined")]
    seccomp: Option<String>,
    /// Only files under these paths may be executed (repeatable; Landlock).
    #[arg(long = "exec-allow", value_name = "PATH")]
    exec_allow: Vec<PathBuf>,
    /// Mount /tmp noexec.
    #[arg(long)]
    tmp_noexec: bool,
    /// Run in this image's root (from the local store: `nanoclaw image pull`
    /// or `import` first) instead of the host root.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Network: none (loopback only), allowlist (only --allow-host/--allow-cidr
    /// destinations, through nanoclaw's proxy) or open (any public destination,
    /// through the proxy). Default: none, or allowlist when --allow-* is given.
    #[arg(long, value_enum, value_name = "MODE")]
    network: Option<NetworkMode>,
    /// Allow HOST[:PORT] (repeatable; `*.example.com` matches subdomains;
    /// default ports 80 and 443).
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    allow_host: Vec<String>,
    /// Allow CIDR[:PORT] (repeatable; needed for private or loopback addresses).
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORT]")]
    allow_cidr: Vec<String>,
    /// Resolve NAME to IP in nanoclaw's proxy and the sandbox's DNS
    /// (repeatable; like Docker's --add-host). It does not allow anything:
    /// NAME still needs --allow-host, a private IP also --allow-cidr.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    add_host: Vec<String>,
    /// Policy from a config file: --config FILE --agent ID [--session KEY].
    /// With --agent the command runs in the agent's long-lived sandbox for
    /// its scope (`sandbox.scope`: one per session, per agent, or shared),
    /// created on first use.
    #[command(flatten)]
    pub(crate) policy: crate::config_cmd::PolicyArgs,
    /// With --agent: a fresh sandbox for this command alone, removed at its
    /// end, instead of the agent's scoped sandbox.
    #[arg(long)]
    pub(crate) fresh: bool,
    /// What runs the sandbox: native (the default), docker, gvisor or
    /// microvm (`nanoclaw doctor` says which this host has). Default: the
    /// config's `sandbox.backend`, else native. With docker, --image names
    /// an image in Docker's store.
    #[arg(long, value_name = "NAME")]
    pub(crate) backend: Option<String>,
    /// The command and its arguments.
    #[arg(value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkspaceAccess {
    None,
    Ro,
    Rw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NetworkMode {
    None,
    Allowlist,
    Open,
    /// Rootful: veth + nftables allowing --allow-cidr destinations.
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Lang {
    Python,
    Node,
    Bash,
    Sh,
    /// Compiled with the root's `go` (a per-run build cache over a shared,
    /// read-only compiled standard library), then run.
    Go,
}

impl Lang {
    pub(crate) fn interpreter(self) -> (&'static str, &'static str) {
        match self {
            Lang::Python => ("python3", "-c"),
            Lang::Node => ("node", "-e"),
            Lang::Bash => ("bash", "-c"),
            Lang::Sh | Lang::Go => ("sh", "-c"),
        }
    }
}

/// A snippet's argv, and the environment it needs.
pub(crate) type Snippet = (Vec<String>, Vec<(String, String)>);

/// The argv that runs `code` in `lang` with arguments `args` (`interp`
/// replacing the default interpreter), and the environment it needs (a
/// Go build's: its cache in the sandbox's /tmp, so it lives as long as the
/// sandbox and is shared with no other).
pub(crate) fn snippet_argv(
    lang: Lang,
    interp: Option<&str>,
    code: String,
    args: &[String],
) -> Result<Snippet> {
    if lang == Lang::Go {
        let g = nanoclaw_image::go::go_command(&code, args)
            .map_err(|e| anyhow::anyhow!("--lang go: {e}"))?;
        return Ok((g.command, g.env));
    }
    let (default_interp, flag) = lang.interpreter();
    let interp = interp.unwrap_or(default_interp);
    let mut argv = vec![interp.to_string(), flag.to_string(), code];
    if lang != Lang::Python && lang != Lang::Node && !args.is_empty() {
        // sh -c CODE NAME ARGS...: $0 is the first word after the code.
        argv.push(interp.to_string());
    }
    argv.extend(args.iter().cloned());
    Ok((argv, Vec::new()))
}

/// Parses `HOST:CONTAINER[:ro|rw]`.
fn parse_mount(s: &str) -> Result<Mount> {
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, access) = match parts.as_slice() {
        [src, dst] => (*src, *dst, Access::Ro),
        [src, dst, "ro"] => (*src, *dst, Access::Ro),
        [src, dst, "rw"] => (*src, *dst, Access::Rw),
        [_, _, other] => bail!(
            "--mount {s:?}: unknown access {other:?}; use HOST:CONTAINER:ro or HOST:CONTAINER:rw"
        ),
        _ => bail!("--mount {s:?}: expected HOST:CONTAINER[:ro|rw], e.g. ./data:/data:ro"),
    };
    if src.is_empty() || dst.is_empty() {
        bail!("--mount {s:?}: expected HOST:CONTAINER[:ro|rw], e.g. ./data:/data:ro");
    }
    let source = std::fs::canonicalize(src)
        .with_context(|| format!("--mount {s:?}: host path {src:?} does not exist"))?;
    Ok(Mount {
        source,
        target: PathBuf::from(dst),
        access,
    })
}

fn parse_user(s: &str) -> Result<User> {
    let bad =
        || anyhow::anyhow!("--user {s:?}: expected UID[:GID] with numeric ids, e.g. 1000:1000");
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok(User { uid, gid })
}

/// With `--config/--agent/--session`: the agent's resolved spec, with the
/// limits and mounts typed on the command line on top, and the run-only
/// flags (command, env, user, ...) from `flags`.
fn policy_spec(
    a: &RunArgs,
    flags: SandboxSpec,
) -> Result<(SandboxSpec, nanoclaw_policy::Resolved)> {
    use nanoclaw_policy::CliOverrides;
    let l = &flags.limits;
    let mut o = CliOverrides {
        memory: l.memory.filter(|_| a.memory.is_some()),
        memory_swap: l.memory_swap.filter(|_| a.memory_swap.is_some()),
        cpus: l.cpus.filter(|_| a.cpus.is_some()),
        pids: l.pids.filter(|_| a.pids.is_some()),
        timeout: a.timeout.is_some().then_some(l.timeout),
        tmpfs_size: a.tmpfs_size.is_some().then_some(l.tmpfs_size),
        output_limit: a.output_limit.is_some().then_some(l.output_limit),
        workspace: a.workspace.clone(),
        workspace_access: a.workspace_access.map(|w| match w {
            WorkspaceAccess::None => nanoclaw_policy::model::WorkspaceAccess::None,
            WorkspaceAccess::Ro => nanoclaw_policy::model::WorkspaceAccess::Ro,
            WorkspaceAccess::Rw => nanoclaw_policy::model::WorkspaceAccess::Rw,
        }),
        cap_add: a.cap_add.clone(),
        backend: a.backend.clone(),
        // The network flags replace the config's network (below); the
        // resolver sees them so its warnings describe the sandbox that runs.
        network: match flags.network {
            Network::None => Some(nanoclaw_policy::model::NetworkMode::None),
            Network::Allowlist { .. } => Some(nanoclaw_policy::model::NetworkMode::Allowlist),
            Network::Open { .. } => Some(nanoclaw_policy::model::NetworkMode::Open),
            Network::Kernel { .. } => None,
        }
        .filter(|_| network_flags_given(a)),
        // The config's allowed_hosts holds names and addresses alike.
        allow_hosts: a.allow_host.iter().chain(&a.allow_cidr).cloned().collect(),
        ..CliOverrides::default()
    };
    o.mounts = crate::config_cmd::parse_cli_mounts(&a.mounts)?;
    let plan = crate::config_cmd::plan_run(&a.policy, o, flags.command.clone())?;
    for w in &plan.warnings {
        eprintln!("nanoclaw: warning: {w}");
    }
    let mut spec = match plan.execution {
        crate::config_cmd::Execution::Sandboxed(s) => *s,
        crate::config_cmd::Execution::Host { reason } => bail!(
            "this agent's policy does not sandbox this session ({reason}); nanoclaw run never runs anything on the host"
        ),
    };
    spec.command = flags.command;
    spec.env.extend(flags.env);
    if flags.root != nanoclaw_sandbox::spec::Root::Host {
        // --image, or a language image from execution.languages.
        spec.root = flags.root;
    }
    if a.user.is_some() {
        spec.user = flags.user;
    }
    if flags.workdir.is_some() {
        spec.workdir = flags.workdir;
    }
    spec.stdin = flags.stdin;
    // Network flags typed with --config replace the config's destinations
    // (its credential rules stay: they only apply to allowed hosts).
    if network_flags_given(a) {
        spec.network = flags.network;
        spec.egress = match spec.network {
            Network::None | Network::Kernel { .. } => Default::default(),
            _ => plan.resolved.network.egress.clone(),
        };
    }
    let h = flags.hardening;
    spec.hardening.exec_allow.extend(h.exec_allow);
    spec.hardening.tmp_noexec |= h.tmp_noexec;
    if a.seccomp.is_some() {
        spec.hardening.seccomp = h.seccomp;
    }
    Ok((spec, plan.resolved))
}

/// True when the command line names the network (it then replaces the
/// config's network, keeping only its credential rules).
fn network_flags_given(a: &RunArgs) -> bool {
    a.network.is_some()
        || !a.allow_host.is_empty()
        || !a.allow_cidr.is_empty()
        || !a.add_host.is_empty()
}

/// Builds the spec from the flags (and the config, with `--config`), and
/// the `--lang go` additions still to make to it ([`add_go`]). Every error
/// here is the user's input.
pub(crate) fn build_spec(a: &RunArgs) -> Result<Built> {
    let (spec, go) = flag_spec(a)?;
    if a.policy.is_requested() {
        let (spec, resolved) = policy_spec(a, spec)?;
        return Ok(Built {
            spec,
            go,
            resolved: Some(resolved),
        });
    }
    Ok(Built {
        spec,
        go,
        resolved: None,
    })
}

/// What `run`'s flags (and config) make.
pub(crate) struct Built {
    /// The sandbox and its command.
    pub spec: SandboxSpec,
    /// `--lang go`: what is still to add ([`add_go`]).
    pub go: Option<GoRun>,
    /// With `--config`/`--agent`: the agent's resolved policy.
    pub resolved: Option<nanoclaw_policy::Resolved>,
}

/// `--lang go` on the final spec: the Go environment, and the shared
/// read-only standard-library cache for this root (published by a warm-up
/// sandbox the first time; see `nanoclaw_image::go`). Without one the run
/// still works, compiling what it needs into its own cache. Returns false
/// when the warm-up was interrupted.
fn add_go(spec: &mut SandboxSpec, g: GoRun) -> Result<bool> {
    use nanoclaw_image::go::{std_cache, std_cache_base, GoError, GO_SHARED_CACHE_TARGET};
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    match std_cache(&std_cache_base(), &spec.root, path.as_deref(), spec.user) {
        Ok(dir) => spec.mounts.push(Mount {
            source: dir,
            target: GO_SHARED_CACHE_TARGET.into(),
            access: Access::Ro,
        }),
        Err(GoError::Interrupted) => return Ok(false),
        Err(e) => eprintln!(
            "nanoclaw: warning: --lang go: no shared standard-library cache ({e}); this run compiles what it needs itself"
        ),
    }
    spec.env.extend(g.env);
    Ok(true)
}

/// Resolves `--image` from the local store: the root's layers and the
/// image's defaults (env, workdir, user, entrypoint, cmd).
fn image_root(reference: &str) -> Result<nanoclaw_image::ImageRoot> {
    let store = nanoclaw_image::Store::open_default()
        .map_err(|e| anyhow::anyhow!("--image {reference}: {e}"))?;
    store
        .resolve(reference)
        .map_err(|e| anyhow::anyhow!("--image {reference}: {e}"))
}

/// `execution.languages[lang]` from the config: (image, interpreter path).
fn language_setting(cfg: &Path, lang: Lang) -> Result<(Option<String>, Option<String>)> {
    let Some((path, _, loaded)) = crate::config_cmd::find_and_load(Some(cfg))? else {
        return Ok((None, None));
    };
    if loaded.has_errors() {
        bail!(
            "{} has errors; run `nanoclaw config validate --config {}`",
            path.display(),
            path.display()
        );
    }
    let key = match lang {
        Lang::Python => "python",
        Lang::Node => "node",
        Lang::Go => "go",
        Lang::Bash => "bash",
        Lang::Sh => "sh",
    };
    Ok(match loaded.config.execution.languages.get(key) {
        Some(v) if v.starts_with('/') => (None, Some(v.clone())),
        Some(v) if v != "host" => (Some(v.clone()), None),
        _ => (None, None),
    })
}

/// The spec from the command-line flags alone, and the `--lang go` run.
fn flag_spec(a: &RunArgs) -> Result<(SandboxSpec, Option<GoRun>)> {
    // `--lang` resolves through the config's `execution.languages` (when a
    // config is given): an image reference runs the snippet in that image,
    // an absolute path is the interpreter to use.
    let (lang_image, lang_interp) = match (a.lang, a.policy.config.as_deref()) {
        (Some(l), Some(cfg)) if a.image.is_none() => language_setting(cfg, l)?,
        _ => (None, None),
    };
    let store_image = a
        .backend
        .as_deref()
        .is_some_and(crate::backends::store_images);
    let image = a
        .image
        .as_deref()
        .or(lang_image.as_deref())
        .filter(|_| !store_image)
        .map(image_root)
        .transpose()?;
    let mut command = a.command.clone();
    let mut go: Option<GoRun> = None;
    if let Some(img) = &image {
        if a.lang.is_none() {
            // Docker semantics: arguments replace CMD; ENTRYPOINT stays.
            let tail = if command.is_empty() {
                img.config.cmd.clone()
            } else {
                command
            };
            command = img.config.entrypoint.iter().cloned().chain(tail).collect();
        }
    }
    if let Some(lang) = a.lang {
        let code = match (&a.code, &a.file) {
            (Some(c), None) => c.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("--file {}: cannot read it", f.display()))?,
            _ => bail!("--lang needs the snippet: pass --code CODE or --file PATH"),
        };
        if lang == Lang::Go {
            let g = nanoclaw_image::go::go_command(&code, &command)
                .map_err(|e| anyhow::anyhow!("--lang go: {e}"))?;
            command = g.command.clone();
            go = Some(g);
        } else {
            command = snippet_argv(lang, lang_interp.as_deref(), code, &command)?.0;
        }
    } else if a.code.is_some() || a.file.is_some() {
        bail!("--code and --file need --lang python|node|go|bash|sh");
    }
    if command.is_empty() {
        bail!("no command given: e.g. `nanoclaw run -- python3 -c 'print(1)'` or `nanoclaw run --lang python --code 'print(1)'`");
    }

    let size = |flag: &str, v: &str| -> Result<u64> {
        parse_size(v).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    // Flags not given keep the engine's defaults (SandboxSpec::new).
    let mut spec = SandboxSpec::new(command);
    let l = &mut spec.limits;
    if let Some(v) = &a.memory {
        l.memory = Some(size("memory", v)?);
    }
    l.memory_swap = a
        .memory_swap
        .as_deref()
        .map(|v| size("memory-swap", v))
        .transpose()?;
    if let Some(v) = &a.cpus {
        let cpus: f64 = v
            .parse()
            .map_err(|_| anyhow::anyhow!("--cpus {v:?}: expected a number such as 0.5 or 2"))?;
        l.cpus = Some(cpus);
    }
    if let Some(v) = &a.pids {
        let pids: u64 = v
            .parse()
            .map_err(|_| anyhow::anyhow!("--pids {v:?}: expected a whole number such as 256"))?;
        l.pids = Some(pids);
    }
    if let Some(v) = &a.timeout {
        l.timeout = parse_duration(v).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
    }
    if let Some(v) = &a.tmpfs_size {
        l.tmpfs_size = size("tmpfs-size", v)?;
    }
    if let Some(v) = &a.output_limit {
        l.output_limit = size("output-limit", v)?;
    }
    l.explicit.memory = a.memory.is_some() || a.memory_swap.is_some();
    l.explicit.cpus = a.cpus.is_some();
    l.explicit.pids = a.pids.is_some();

    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env {e:?}: expected KEY=VALUE"))?;
        spec.env.push((k.to_string(), v.to_string()));
    }
    spec.workdir = a.workdir.clone();
    if let Some(u) = &a.user {
        spec.user = parse_user(u)?;
    }
    if store_image {
        // The backend takes it from its own store (Docker's), with the
        // image's environment and working directory.
        if let Some(r) = a.image.as_deref().or(lang_image.as_deref()) {
            spec.root = nanoclaw_sandbox::spec::Root::Image(r.to_string());
        }
    }
    if let Some(img) = &image {
        spec.root = nanoclaw_sandbox::spec::Root::Layers(img.layers.clone());
        let mut env: Vec<(String, String)> = img
            .config
            .env
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        env.append(&mut spec.env);
        spec.env = env;
        if spec.workdir.is_none() {
            spec.workdir = img
                .config
                .working_dir
                .as_deref()
                .filter(|w| !w.is_empty())
                .map(PathBuf::from);
        }
        if a.user.is_none() {
            if let Some(u) = img.config.user.as_deref().filter(|u| !u.is_empty()) {
                spec.user = nanoclaw_image::build::image_user(img, u).map_err(|e| {
                    anyhow::anyhow!("--image {}: {e}; pass --user UID[:GID]", img.reference)
                })?;
            }
        }
    }
    let mut workspace_source = None;
    match (
        &a.workspace,
        a.workspace_access.unwrap_or(WorkspaceAccess::None),
    ) {
        (Some(dir), WorkspaceAccess::Ro | WorkspaceAccess::Rw) => {
            let source = std::fs::canonicalize(dir).with_context(|| {
                format!("--workspace {}: directory does not exist", dir.display())
            })?;
            if !source.is_dir() {
                bail!("--workspace {}: not a directory", dir.display());
            }
            workspace_source = Some(source.clone());
            spec.mounts.push(Mount {
                source,
                target: "/workspace".into(),
                access: if a.workspace_access == Some(WorkspaceAccess::Rw) {
                    Access::Rw
                } else {
                    Access::Ro
                },
            });
        }
        (None, WorkspaceAccess::Ro | WorkspaceAccess::Rw) => {
            bail!("--workspace-access needs --workspace DIR")
        }
        (_, WorkspaceAccess::None) => {}
    }
    if go.is_some() {
        // A compile needs room: unless given, 1g of memory and 120 s (a
        // config's limits replace these, see policy_spec).
        if a.memory.is_none() {
            spec.limits.memory = Some(1 << 30);
        }
        if a.timeout.is_none() {
            spec.limits.timeout = std::time::Duration::from_secs(120);
        }
    }
    // The same dangerous-source checks as the config file (/, /etc, the
    // Docker socket, ~/.ssh, .env files, ...), for the flags too.
    // Relative host paths are relative to the current directory.
    let mounts: Vec<String> = a.mounts.iter().map(|m| absolute_host_path(m)).collect();
    let mut binds = mounts.clone();
    if let Some(ws) = &workspace_source {
        binds.push(format!("{}:/workspace:ro", ws.display()));
    }
    crate::config_cmd::parse_cli_mounts(&binds)?;
    for m in &mounts {
        spec.mounts.push(parse_mount(m)?);
    }
    spec.stdin = if a.stdin { Stdin::Inherit } else { Stdin::Null };
    spec.hardening.cap_add = a.cap_add.clone();
    spec.hardening.exec_allow = a.exec_allow.clone();
    spec.hardening.tmp_noexec = a.tmp_noexec;
    let allows = !a.allow_host.is_empty() || !a.allow_cidr.is_empty();
    if !a.add_host.is_empty() && !matches!(a.network, None | Some(NetworkMode::Allowlist)) {
        bail!("--add-host only works with --network allowlist (the proxy and the sandbox's DNS resolve it)")
    }
    spec.network = match (a.network, allows) {
        (None, false) | (Some(NetworkMode::None), false) => Network::None,
        (Some(NetworkMode::None), true) => {
            bail!("--allow-host/--allow-cidr need --network allowlist (or leave --network out)")
        }
        (None, true) | (Some(NetworkMode::Allowlist), _) => Network::Allowlist {
            hosts: a.allow_host.clone(),
            cidrs: a.allow_cidr.clone(),
            limits: NetLimits::default(),
            add_hosts: a.add_host.clone(),
        },
        (Some(NetworkMode::Open), true) => {
            bail!("--network open allows every public destination; --allow-host/--allow-cidr only make sense with --network allowlist")
        }
        (Some(NetworkMode::Open), false) => Network::Open {
            limits: NetLimits::default(),
        },
        (Some(NetworkMode::Kernel), _) => {
            if !a.allow_host.is_empty() {
                bail!("--network kernel enforces addresses in the kernel and cannot check names: use --allow-cidr, or --network allowlist for --allow-host")
            }
            Network::Kernel {
                cidrs: a.allow_cidr.clone(),
            }
        }
    };
    spec.hardening.seccomp = match a.seccomp.as_deref() {
        None => Seccomp::Default,
        Some("unconfined") => Seccomp::Unconfined,
        Some(p) => {
            let path = Path::new(p);
            if !path.is_file() {
                bail!("--seccomp {p:?}: no such profile file; pass a Docker-format JSON profile or `unconfined`");
            }
            Seccomp::Profile(path.to_path_buf())
        }
    };
    Ok((spec, go))
}

/// Runs `nanoclaw run`; returns the process exit code.
/// The sandbox configuration of `nanoclaw sandbox create`: every `run`
/// option except the command, snippets and stdin (those belong to `exec`).
/// Its `--timeout` becomes each exec's default timeout (returned).
pub fn create_spec(a: &RunArgs) -> Result<(SandboxSpec, std::time::Duration, String)> {
    if !a.command.is_empty() {
        bail!(
            "`sandbox create` takes no command ({:?}); run it afterwards with `nanoclaw exec ID -- COMMAND`",
            a.command.join(" ")
        );
    }
    if a.lang.is_some() || a.code.is_some() || a.file.is_some() || a.stdin {
        bail!("--lang, --code, --file and --stdin belong to `nanoclaw exec`, not `sandbox create`");
    }
    if a.fresh {
        bail!("--fresh belongs to `nanoclaw run --agent`; `sandbox create` always makes a new sandbox");
    }
    let mut b = a.clone();
    b.command = vec!["true".into()];
    let built = build_spec(&b)?;
    let backend = crate::backends::chosen(
        a.backend.as_deref(),
        built.resolved.as_ref().map(|r| r.backend.as_str()),
    )?;
    let mut spec = built.spec;
    spec.command.clear();
    let exec_timeout = spec.limits.timeout;
    Ok((spec, exec_timeout, backend))
}

pub fn run(a: RunArgs) -> Result<u8> {
    let Built {
        mut spec,
        go,
        resolved,
    } = build_spec(&a)?;
    let backend = crate::backends::chosen(
        a.backend.as_deref(),
        resolved.as_ref().map(|r| r.backend.as_str()),
    )?;
    if let Some(scope) = resolved.filter(|_| a.policy.agent.is_some() && !a.fresh) {
        if backend != crate::backends::NATIVE {
            bail!("--backend {backend}: an agent's scoped sandbox is native only so far; add --fresh for a sandbox of this command alone");
        }
        return crate::scope_cmd::run_scoped(&a, spec, go, &scope);
    }
    if let Some(g) = go {
        if !add_go(&mut spec, g)? {
            eprintln!("nanoclaw: interrupted while preparing the Go standard library");
            return Ok(130);
        }
    }
    if matches!(spec.network, Network::Open { .. }) {
        eprintln!("nanoclaw: warning: --network open: the sandbox may reach any public address through nanoclaw's proxy (loopback, private and metadata addresses stay blocked)");
    }
    if spec.hardening.seccomp == Seccomp::Unconfined {
        eprintln!("nanoclaw: WARNING: --seccomp unconfined: the sandboxed code can call every system call the kernel offers, including ones with a history of privilege-escalation bugs. Use it only to debug a profile.");
    }
    if backend != crate::backends::NATIVE {
        return crate::backend_cmd::run(&backend, spec, a.json);
    }
    // `run` exits right after the sandbox ends: it need not wait for the
    // kernel's tear-down of the sandbox's namespaces (init's exit).
    let opts = RunOptions {
        stream: !a.json,
        handle_signals: true,
        exit_after_wait: true,
    };
    let sandbox = nanoclaw_sandbox::start(&spec, opts)?;
    let limits = spec.limits;
    let degraded = &sandbox.layers().degraded;
    if !degraded.is_empty() {
        // One line; `--json` carries the full explanations.
        let (fallback, missing): (Vec<&String>, Vec<&String>) = degraded
            .iter()
            .partition(|d| d.contains("instead of a cgroup"));
        let missing: Vec<&str> = missing
            .iter()
            .map(|d| d.split(" (").next().unwrap_or(d))
            .collect();
        let fallback: Vec<&str> = fallback
            .iter()
            .map(|d| d.split(" instead").next().unwrap_or(d))
            .collect();
        eprintln!(
            "nanoclaw: warning: no cgroup for the default {} limit(s) on this host ({}); run `nanoclaw doctor` to see how to delegate cgroups",
            missing.join(", "),
            if fallback.is_empty() { "not enforced".to_string() } else { fallback.join(", ") }
        );
    }
    let outcome = nanoclaw_sandbox::wait(sandbox)?;
    if a.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &outcome)?;
        writeln!(out)?;
    } else if let Some(k) = outcome.killed_by {
        eprintln!(
            "nanoclaw: sandbox {} killed: {}",
            outcome.sandbox_id,
            kill_message(k, &limits)
        );
    }
    let code = outcome.cli_exit_code();
    Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(125))
}

/// Why the engine killed the sandbox, with the effective limit that fired
/// (the spec's, whether it came from a flag, the config or a default).
pub(crate) fn kill_message(k: KillReason, l: &nanoclaw_sandbox::spec::Limits) -> String {
    let size = |v: Option<u64>| v.map_or_else(|| "none".to_string(), format_size);
    match k {
        KillReason::Timeout => format!("timeout after {}", format_duration(l.timeout)),
        KillReason::Oom => format!("out of memory (limit {})", size(l.memory)),
        KillReason::Pids => format!(
            "too many processes (limit {})",
            l.pids.map_or_else(|| "none".to_string(), |p| p.to_string())
        ),
        KillReason::OutputLimit => format!(
            "output over the limit ({} per stream)",
            format_size(l.output_limit)
        ),
        KillReason::Killed => "interrupted".to_string(),
    }
}

/// `HOST:CONTAINER[:MODE]` with a relative HOST made absolute against the
/// current directory (`data:/data` means `$PWD/data:/data`).
fn absolute_host_path(bind: &str) -> String {
    match bind.split_once(':') {
        Some((host, rest)) if !host.is_empty() && !host.starts_with('/') => {
            match std::env::current_dir() {
                Ok(cwd) => format!("{}:{rest}", cwd.join(host).display()),
                Err(_) => bind.to_string(),
            }
        }
        _ => bind.to_string(),
    }
}
