//! Long-lived sandboxes without a daemon: `nanoclaw sandbox create` starts
//! one keeper per sandbox (nanoclaw's own binary re-executed, `__keeper`;
//! see `nanoclaw_sandbox::keeper`), which holds the sandbox and serves it
//! on a unix socket only its owner can open; `nanoclaw exec`, `cp`,
//! `sandbox ls`, `inspect`, `network`, `pause`, `resume`, `rm` and `prune` find it
//! through its state directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use nanoclaw_sandbox::keeper::{
    self, all_sandboxes, find, keeper_alive, kill_keeper, now_s, state_root, KeeperConfig, Remote,
    Reply, Request, State,
};
use nanoclaw_sandbox::native::session::{self, ExecSpec};
use nanoclaw_sandbox::outcome::NetworkReport;
use nanoclaw_sandbox::spec::{Stdin, User};
use nanoclaw_sandbox::units::{parse_duration, parse_size};
use nanoclaw_sandbox::KillReason;

use crate::run_cmd::RunArgs;

mod live;
mod network;
pub use live::{pause, resume, stop, PauseArgs, StopArgs};
pub use network::{network, NetworkArgs};

/// Default lifetime of a created sandbox.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// How long `rm` waits for a keeper to answer before killing it.
const STOP_PATIENCE: Duration = Duration::from_secs(2);

/// Options of `nanoclaw sandbox create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name to use instead of the id (unique among your sandboxes).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A label K=V (repeatable; `sandbox ls --label` filters on them).
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// How long the sandbox lives at most (default 1h).
    #[arg(long, value_name = "DURATION")]
    lifetime: Option<String>,
    /// Removed after this long without an exec (default: never).
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// Every `run` option (limits, mounts, network, image, ...); `--timeout`
    /// is each exec's default timeout.
    #[command(flatten)]
    run: Box<RunArgs>,
}

/// Options of `nanoclaw exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Print one JSON object with the outcome instead of the output.
    #[arg(long)]
    json: bool,
    /// Send this process's stdin to the command (read to its end first).
    #[arg(long)]
    stdin: bool,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long, value_name = "PATH")]
    workdir: Option<PathBuf>,
    /// User inside the sandbox.
    #[arg(long, value_name = "UID[:GID]")]
    user: Option<String>,
    /// This command's timeout (default: the sandbox's --timeout).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Per-stream output limit (default 10m).
    #[arg(long, value_name = "SIZE")]
    output_limit: Option<String>,
    /// The sandbox: its id (or a unique prefix) or name. Or none, with
    /// --config/--agent: the agent's sandbox for its scope.
    #[arg(value_name = "ID|NAME")]
    target: Option<String>,
    /// The agent's scoped sandbox instead of ID|NAME (created on first use).
    #[command(flatten)]
    policy: crate::config_cmd::PolicyArgs,
    /// Run a snippet with this interpreter instead of COMMAND (python, node,
    /// bash, sh, go: compiled in the sandbox, its build cache kept in its /tmp).
    #[arg(long, value_enum, value_name = "LANG")]
    lang: Option<crate::run_cmd::Lang>,
    /// The snippet's code (with --lang).
    #[arg(long, value_name = "CODE", conflicts_with = "file", requires = "lang")]
    code: Option<String>,
    /// A host file whose contents are the snippet (with --lang).
    #[arg(long, value_name = "PATH", requires = "lang")]
    file: Option<PathBuf>,
    /// The command and its arguments (with --lang: the snippet's arguments).
    #[arg(value_name = "COMMAND", last = true, required_unless_present = "lang")]
    command: Vec<String>,
}

/// The argv of `exec` (COMMAND, or the snippet run by its interpreter)
/// and the environment the snippet needs (`--lang go`: the Go build's).
fn exec_argv(a: &ExecArgs) -> Result<crate::run_cmd::Snippet> {
    let Some(lang) = a.lang else {
        return Ok((a.command.clone(), Vec::new()));
    };
    let code = match (&a.code, &a.file) {
        (Some(c), _) => c.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("--file {}: cannot read it", f.display()))?,
        (None, None) => bail!("--lang needs --code CODE or --file PATH"),
    };
    crate::run_cmd::snippet_argv(lang, None, code, &a.command)
}

/// Options of `sandbox ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Only sandboxes with this label K=V (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
}

/// Options of `sandbox rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Kill the keeper at once instead of asking it to end.
    #[arg(long, short = 'f')]
    force: bool,
    /// Sandboxes: ids (or unique prefixes) or names.
    #[arg(value_name = "ID|NAME", required = true)]
    targets: Vec<String>,
}

/// Options of `sandbox inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The sandbox: its id (or a unique prefix) or name.
    #[arg(value_name = "ID|NAME")]
    target: String,
}

fn parse_labels(v: &[String]) -> Result<Vec<(String, String)>> {
    v.iter()
        .map(|l| {
            l.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// The sandbox `target` (id, unique id prefix, or name).
fn remote(target: &str) -> Result<(Remote, State)> {
    let (dir, st) = find(&state_root()?, target)?;
    Ok((Remote::new(&st.id, &dir), st))
}

/// `nanoclaw sandbox create`: starts a keeper and prints the sandbox's id.
pub fn create(a: CreateArgs) -> Result<u8> {
    let (mut spec, exec_timeout, backend) = crate::run_cmd::create_spec(&a.run)?;
    let lifetime = match &a.lifetime {
        Some(d) => parse_duration(d).map_err(|e| anyhow!("--lifetime: {e}"))?,
        None => DEFAULT_LIFETIME,
    };
    let idle = a
        .idle_timeout
        .as_deref()
        .map(|d| parse_duration(d).map_err(|e| anyhow!("--idle-timeout: {e}")))
        .transpose()?;
    spec.limits.timeout = lifetime;
    if let Some(n) = &a.name {
        if n.is_empty() || n.contains('/') || n.len() > 64 {
            bail!("--name {n:?}: use 1-64 characters, no '/'");
        }
    }
    if backend != crate::backends::NATIVE {
        return crate::backend_cmd::create(
            &backend,
            spec,
            a.name.as_deref(),
            parse_labels(&a.labels)?,
            lifetime,
            idle,
            exec_timeout,
        );
    }
    let root = state_root()?;
    if let Some(n) = &a.name {
        if all_sandboxes(&root)
            .iter()
            .any(|(_, s)| s.name.as_deref() == Some(n))
        {
            bail!("a sandbox named {n:?} exists already: remove it (`nanoclaw sandbox rm {n}`) or pick another name");
        }
    }
    let cfg = KeeperConfig {
        spec,
        name: a.name.clone(),
        labels: parse_labels(&a.labels)?,
        lifetime_ms: lifetime.as_millis() as u64,
        idle_timeout_ms: idle.map(|d| d.as_millis() as u64),
        exec_timeout_ms: exec_timeout.as_millis() as u64,
        root,
    };
    let exe = std::env::current_exe().context("finding nanoclaw's own binary")?;
    println!("{}", keeper::start_keeper(&exe, &cfg)?);
    Ok(0)
}

/// `nanoclaw sandbox ls`.
pub fn ls(a: LsArgs) -> Result<u8> {
    let root = state_root()?;
    let want = parse_labels(&a.labels)?;
    let all: Vec<(PathBuf, State)> = all_sandboxes(&root)
        .into_iter()
        .filter(|(_, s)| want.iter().all(|w| s.labels.contains(w)))
        .collect();
    let others: Vec<_> = crate::backend_cmd::all()
        .into_iter()
        .filter(|s| want.iter().all(|w| s.labels.contains(w)))
        .collect();
    if a.json {
        let mut out = Vec::with_capacity(all.len());
        for (dir, s) in &all {
            let mut v = serde_json::to_value(s)?;
            if let Some(m) = v.as_object_mut() {
                m.insert("state".into(), keeper::state_of(dir).into());
                if let Some(scope) = crate::scope_cmd::describe(s) {
                    m.insert("scope".into(), scope);
                }
            }
            out.push(v);
        }
        out.extend(others.iter().map(crate::backend_cmd::ls_json));
        println!("{}", serde_json::to_string(&out)?);
        return Ok(0);
    }
    println!(
        "{:<14} {:<16} {:<8} {:>8} {:>8} {:>10}  {:<8} {:<12} {:<12} {:<14} {:<6} LABELS",
        "ID",
        "NAME",
        "STATE",
        "AGE",
        "IDLE",
        "EXPIRES IN",
        "SCOPE",
        "AGENT",
        "SESSION",
        "IMAGE",
        "CONFIG"
    );
    let now = now_s();
    for (dir, s) in all {
        let labels: Vec<String> = s
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("nanoclaw."))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let l = |k: &str| crate::scope_cmd::label(&s, k).unwrap_or("-").to_string();
        // Who and which session a scoped sandbox serves: a shared one
        // serves every agent, an agent-scoped one every session.
        let scope = l(crate::scope_cmd::LABEL_SCOPE);
        let agent = if scope == "shared" {
            "*".into()
        } else {
            l(crate::scope_cmd::LABEL_AGENT)
        };
        let session = if scope == "session" {
            l(crate::scope_cmd::LABEL_SESSION)
        } else if scope == "-" {
            "-".into()
        } else {
            "*".into()
        };
        let matches = match crate::scope_cmd::label(&s, crate::scope_cmd::LABEL_KEY) {
            None => "-",
            Some(_) => match crate::scope_cmd::config_matches(&s) {
                Some(true) => "match",
                Some(false) => "OLD",
                None => "?",
            },
        };
        println!(
            "{:<14} {:<16} {:<8} {:>7}s {:>7}s {:>9}s  {:<8} {:<12} {:<12} {:<14} {:<6} {}",
            s.id,
            s.name.as_deref().unwrap_or("-"),
            keeper::state_of(&dir),
            now.saturating_sub(s.created),
            now.saturating_sub(s.last_used.max(s.created)),
            s.expires.saturating_sub(now),
            scope,
            agent,
            session,
            l(crate::scope_cmd::LABEL_IMAGE),
            matches,
            labels.join(",")
        );
    }
    for s in &others {
        let (id, name, created, expires, labels) = crate::backend_cmd::ls_row(s);
        println!(
            "{:<14} {:<16} {:<8} {:>7}s {:>7}s {:>9}s  {:<8} {:<12} {:<12} {:<14} {:<6} {}",
            id,
            name,
            s.backend,
            now.saturating_sub(created),
            "-",
            expires.saturating_sub(now),
            "-",
            "-",
            "-",
            "-",
            "-",
            labels
        );
    }
    Ok(0)
}

/// `nanoclaw sandbox inspect`.
pub fn inspect(a: InspectArgs) -> Result<u8> {
    live::inspect(&a.target)
}

/// `nanoclaw sandbox rm`.
pub fn rm(a: RmArgs) -> Result<u8> {
    for t in &a.targets {
        println!("{}", remove_with(t, a.force)?);
    }
    Ok(0)
}

/// Removes the sandbox `target` (asking its keeper to end it).
pub(crate) fn remove(target: &str) -> Result<()> {
    remove_with(target, false).map(|_| ())
}

/// Removes the sandbox `target`; `force` kills its keeper at once.
/// Returns its id.
fn remove_with(target: &str, force: bool) -> Result<String> {
    let (r, st) = match remote(target) {
        Ok(x) => x,
        Err(e) => match crate::backend_cmd::find(target)? {
            Some((sb, info)) => {
                sb.destroy()?;
                return Ok(info.id);
            }
            None => return Err(e),
        },
    };
    // A keeper that does not answer is killed, which ends its sandbox
    // all the same (init's lifeline).
    let asked = !force && r.ask_within(&Request::Stop, STOP_PATIENCE).is_ok();
    if !asked {
        kill_keeper(&st);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while keeper_alive(&st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if keeper_alive(&st) {
        bail!(
            "sandbox {} did not end within 10 s; retry with `sandbox rm -f`",
            st.id
        );
    }
    if asked {
        let _ = std::fs::remove_dir_all(&r.dir);
    } else {
        // The keeper had no chance to clean up.
        keeper::forget(&r.dir, &st);
    }
    Ok(st.id)
}

/// `nanoclaw exec`: the command's output streams to ours as it comes
/// (with `--json`, it is collected into the outcome).
pub fn exec(a: ExecArgs) -> Result<u8> {
    let (r, st, mut spec) = match (&a.target, a.policy.is_requested()) {
        (Some(_), true) => bail!(
            "give either a sandbox (ID|NAME) or --config/--agent/--session (the agent's scoped sandbox), not both"
        ),
        (None, false) => bail!(
            "which sandbox? give its ID or NAME, or --config FILE --agent ID for the agent's scoped sandbox"
        ),
        (Some(t), false) => {
            let (r, st) = match remote(t) {
                Ok(x) => x,
                Err(e) => match crate::backend_cmd::find(t)? {
                    Some((sb, info)) => return exec_other(&a, sb.as_ref(), &info),
                    None => return Err(e),
                },
            };
            let mut base = ExecSpec::new(Vec::<String>::new());
            base.timeout = Duration::from_millis(st.exec_timeout_ms);
            (r, st, base)
        }
        (None, true) => crate::scope_cmd::scoped_for_exec(&a.policy)?,
    };
    let (argv, mut env) = exec_argv(&a)?;
    spec.command = argv;
    env.extend(
        a.env
            .iter()
            .map(|e| {
                e.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| anyhow!("--env {e:?}: expected KEY=VALUE"))
            })
            .collect::<Result<Vec<_>>>()?,
    );
    spec.env.extend(env);
    if let Some(u) = a.user.as_deref() {
        let (uid, gid) = u.split_once(':').unwrap_or((u, u));
        spec.user = Some(User {
            uid: uid
                .parse()
                .map_err(|_| anyhow!("--user: expected UID[:GID] with numeric ids"))?,
            gid: gid
                .parse()
                .map_err(|_| anyhow!("--user: expected UID[:GID] with numeric ids"))?,
        });
    }
    if a.workdir.is_some() {
        spec.workdir = a.workdir.clone();
    }
    if a.stdin {
        let mut b = Vec::new();
        std::io::stdin().read_to_end(&mut b)?;
        spec.stdin = Stdin::Bytes(b);
    }
    if let Some(t) = a.timeout.as_deref() {
        spec.timeout = parse_duration(t).map_err(|e| anyhow!("--timeout: {e}"))?;
    }
    if let Some(l) = a.output_limit.as_deref() {
        spec.output_limit = parse_size(l).map_err(|e| anyhow!("--output-limit: {e}"))?;
    }
    report_exec(&r, &st, &spec, a.json, &|k| {
        match k {
            KillReason::Timeout => "timeout",
            KillReason::OutputLimit => "output over the limit",
            KillReason::Oom => "out of memory",
            KillReason::Pids => "too many processes",
            KillReason::Killed => "killed",
        }
        .to_string()
    })
}

/// `nanoclaw exec` in a sandbox of another backend than native.
fn exec_other(
    a: &ExecArgs,
    sb: &dyn nanoclaw_sandbox::backend::LiveSandbox,
    info: &nanoclaw_sandbox::backend::SandboxInfo,
) -> Result<u8> {
    let (argv, mut env) = exec_argv(a)?;
    let mut spec = ExecSpec::new(argv);
    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| anyhow!("--env {e:?}: expected KEY=VALUE"))?;
        env.push((k.to_string(), v.to_string()));
    }
    spec.env = env;
    if let Some(u) = a.user.as_deref() {
        let (uid, gid) = u.split_once(':').unwrap_or((u, u));
        let bad = || anyhow!("--user: expected UID[:GID] with numeric ids");
        spec.user = Some(User {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        });
    }
    spec.workdir = a.workdir.clone();
    if a.stdin {
        spec.stdin = Stdin::Inherit;
    }
    if let Some(t) = a.timeout.as_deref() {
        spec.timeout = parse_duration(t).map_err(|e| anyhow!("--timeout: {e}"))?;
    }
    if let Some(l) = a.output_limit.as_deref() {
        spec.output_limit = parse_size(l).map_err(|e| anyhow!("--output-limit: {e}"))?;
    }
    crate::backend_cmd::exec(sb, info, spec, a.timeout.is_some(), a.json)
}

/// Runs `spec` in the keeper's sandbox: output streams to ours as it comes
/// (with `json`, it is collected into the outcome printed at the end); a
/// kill is one line on stderr, `why` saying what fired. Returns the exit
/// code (`run`'s conventions).
pub(crate) fn report_exec(
    r: &Remote,
    st: &State,
    spec: &ExecSpec,
    json: bool,
    why: &dyn Fn(KillReason) -> String,
) -> Result<u8> {
    let echo = (!json).then_some((1, 2));
    // The proxy lives in the keeper: what it did during this command is
    // the difference of its reports before and after.
    let before = json.then(|| network_now(r)).flatten();
    let mut outcome = r.exec_echo(spec, echo)?;
    outcome.layers = st.layers.clone();
    if let Some(after) = json.then(|| network_now(r)).flatten() {
        outcome.network = match (after, before.flatten()) {
            (Some(after), Some(before)) => after.since(&before),
            (Some(after), None) => after,
            (None, _) => NetworkReport {
                mode: "none".into(),
                ..NetworkReport::default()
            },
        };
    }
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if let Some(k) = outcome.killed_by {
        eprintln!(
            "nanoclaw: command in sandbox {} killed: {}",
            outcome.sandbox_id,
            why(k)
        );
    } else {
        // A start failure's message (exit 126/127) was added to stderr.
        std::io::stderr().write_all(&outcome.stderr)?;
    }
    Ok(u8::try_from(outcome.cli_exit_code().clamp(0, 255)).unwrap_or(125))
}

/// The keeper's report of its sandbox's egress proxy: `Some(None)`
/// without a proxy (network `none`), `None` when the keeper cannot say.
fn network_now(r: &Remote) -> Option<Option<NetworkReport>> {
    match r.ask(&Request::Inspect) {
        Ok(Reply::Live(l)) => Some(l.network),
        _ => None,
    }
}

/// Options of `nanoclaw cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// HOSTPATH or ID:PATH (a host directory is copied in as a tree).
    #[arg(value_name = "SRC")]
    src: String,
    /// ID:PATH or HOSTPATH; `-` writes the sandbox's PATH to stdout as a
    /// tar stream (the way to copy a directory out).
    #[arg(value_name = "DST")]
    dst: String,
}

/// `ID:PATH` → (ID, PATH); a host path has no colon before its first '/'.
fn sandbox_side(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/')).then_some((id, path))
}

/// `nanoclaw cp`: a file or a directory tree into a sandbox, a file (or a
/// tar stream of a directory, to stdout) out of one. The copy runs inside
/// the sandbox as its user: paths resolve in the sandbox's own root, so no
/// symlink there can lead outside it.
pub fn cp(a: CpArgs) -> Result<u8> {
    let root = state_root()?;
    match (sandbox_side(&a.src), sandbox_side(&a.dst)) {
        (None, Some((target, path))) => {
            let (dir, st) = find(&root, target)?;
            let host = Path::new(&a.src);
            let md = std::fs::metadata(host)
                .with_context(|| format!("{}: cannot read it", host.display()))?;
            if !md.is_dir() && !md.is_file() {
                bail!(
                    "{}: only regular files and directories can be copied",
                    host.display()
                );
            }
            let (data, tar) = if md.is_dir() {
                (host_tree_as_tar(host)?, true)
            } else {
                (
                    std::fs::read(host).with_context(|| format!("reading {}", host.display()))?,
                    false,
                )
            };
            if data.len() as u64 > session::MAX_COPY {
                bail!(
                    "{} is {} bytes; one copy moves at most {} MiB",
                    host.display(),
                    data.len(),
                    session::MAX_COPY >> 20
                );
            }
            let mut r = Remote::new(&st.id, &dir);
            if tar {
                session::put_tar(&mut r, path, data, None)?;
            } else {
                session::put_file(&mut r, path, data, None)?;
            }
            Ok(0)
        }
        (Some((target, path)), None) => {
            let (dir, st) = find(&root, target)?;
            let to_stdout = a.dst == "-";
            let mut r = Remote::new(&st.id, &dir);
            let data = if to_stdout {
                session::get_tar(&mut r, path)?
            } else {
                session::get_file(&mut r, path)?
            };
            if to_stdout {
                std::io::stdout().write_all(&data)?;
                return Ok(0);
            }
            let mut out = PathBuf::from(&a.dst);
            if out.is_dir() {
                let name = Path::new(path)
                    .file_name()
                    .ok_or_else(|| anyhow!("{path:?} names no file"))?;
                out.push(name);
            }
            std::fs::write(&out, data).with_context(|| format!("writing {}", out.display()))?;
            Ok(0)
        }
        (Some(_), Some(_)) => bail!(
            "copy between two sandboxes through the host: cp ID:PATH FILE, then cp FILE ID2:PATH"
        ),
        (None, None) => bail!("one side of `nanoclaw cp` must be ID:PATH (a sandbox path)"),
    }
}

/// A host directory as a tar stream: symlinks are stored as symlinks
/// (never followed), so nothing outside the tree is read.
fn host_tree_as_tar(dir: &Path) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .with_context(|| format!("packing {}", dir.display()))?;
    Ok(b.into_inner()?)
}

/// Options of `sandbox prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove sandboxes unused (no exec or copy) for this long.
    #[arg(long, value_name = "DURATION")]
    idle: Option<String>,
    /// Remove sandboxes created this long ago or more.
    #[arg(long, value_name = "DURATION")]
    older_than: Option<String>,
    /// Remove every sandbox.
    #[arg(long)]
    all: bool,
}

/// `nanoclaw sandbox prune`.
pub fn prune(a: PruneArgs) -> Result<u8> {
    let secs = |o: &Option<String>, flag: &str| {
        o.as_deref()
            .map(|d| {
                parse_duration(d)
                    .map(|d| d.as_secs())
                    .map_err(|e| anyhow!("{flag}: {e}"))
            })
            .transpose()
    };
    let (idle, older) = (
        secs(&a.idle, "--idle")?,
        secs(&a.older_than, "--older-than")?,
    );
    if idle.is_none() && older.is_none() && !a.all {
        bail!("say what to prune: --idle DURATION, --older-than DURATION or --all");
    }
    let root = state_root()?;
    let now = now_s();
    let doomed: Vec<String> = all_sandboxes(&root)
        .into_iter()
        .filter(|(_, s)| {
            a.all
                || idle.is_some_and(|i| now.saturating_sub(s.last_used.max(s.created)) >= i)
                || older.is_some_and(|o| now.saturating_sub(s.created) >= o)
        })
        .map(|(_, s)| s.id)
        .chain(crate::backend_cmd::all().into_iter().filter_map(|s| {
            let created = nanoclaw_sandbox::backend::label(
                &s.labels,
                nanoclaw_sandbox::backend::LABEL_CREATED,
            )
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
            let age = now.saturating_sub(created);
            (a.all || idle.is_some_and(|i| age >= i) || older.is_some_and(|o| age >= o))
                .then_some(s.id)
        }))
        .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    rm(RmArgs {
        force: false,
        targets: doomed,
    })
}

/// The hidden `__keeper` command.
pub fn keeper() -> Result<u8> {
    Ok(keeper::keeper_main())
}

/// The hidden `__run` command (the daemon's one-shot runs): a
/// `SandboxSpec` as JSON on stdin, the outcome as JSON on stdout — a fresh
/// single-threaded process of nanoclaw's own binary creates the sandbox.
pub fn run_spec() -> Result<u8> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let spec: nanoclaw_sandbox::SandboxSpec =
        serde_json::from_slice(&input).context("the run's spec")?;
    let outcome = nanoclaw_sandbox::run(&spec)?;
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(0)
}
