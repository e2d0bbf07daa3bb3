//! Long-lived sandboxes without a daemon: `nanoclaw sandbox create` starts
//! one keeper per sandbox (nanoclaw's own binary re-executed, `__keeper`),
//! which holds the sandbox (cgroup, proxy, deadline) and serves exec
//! requests on a unix socket only its owner can open; `nanoclaw exec`,
//! `sandbox ls`, `inspect`, `pause`, `resume` and `rm` find it through its
//! state directory.
//!
//! State: `/run/nanoclaw/sandboxes/<id>/` as root, else
//! `$XDG_RUNTIME_DIR/nanoclaw/sandboxes/<id>/` (or `/tmp/nanoclaw-<uid>/…`),
//! each 0700 and owned by the caller: `state.json` and `sock`. The sandbox
//! dies with its keeper (init's lifeline), and a keeper removes its state
//! directory when it ends; `ls` sweeps those of keepers that were killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::Args;
use nanoclaw_sandbox::native::session::{self, ExecSpec};
use nanoclaw_sandbox::spec::{SandboxSpec, Stdin, User};
use nanoclaw_sandbox::units::{parse_duration, parse_size};
use nanoclaw_sandbox::{KillReason, Outcome};
use serde::{Deserialize, Serialize};

use crate::run_cmd::RunArgs;

mod live;
pub use live::{pause, resume, PauseArgs};

/// Default lifetime of a created sandbox.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// How long `sandbox create` waits for its keeper to report.
const KEEPER_START: Duration = Duration::from_secs(40);
/// How long a client may take to send its request, and to read the reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// The sandbox: its id (or a unique prefix) or name.
    #[arg(value_name = "ID|NAME")]
    target: String,
    /// Run a snippet with this interpreter instead of COMMAND (python, node,
    /// bash, sh).
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

/// The argv of `exec`: COMMAND, or the snippet run by its interpreter.
fn exec_argv(a: &ExecArgs) -> Result<Vec<String>> {
    let Some(lang) = a.lang else {
        return Ok(a.command.clone());
    };
    if lang == crate::run_cmd::Lang::Go {
        bail!("--lang go is not supported by `nanoclaw exec` yet; use `nanoclaw run --lang go`");
    }
    let code = match (&a.code, &a.file) {
        (Some(c), _) => c.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("--file {}: cannot read it", f.display()))?,
        (None, None) => bail!("--lang needs --code CODE or --file PATH"),
    };
    let (interp, flag) = lang.interpreter();
    let mut argv = vec![interp.to_string(), flag.to_string(), code];
    if !a.command.is_empty() {
        // sh -c CODE NAME ARGS...: $0 then the arguments, as with `run`.
        if matches!(lang, crate::run_cmd::Lang::Bash | crate::run_cmd::Lang::Sh) {
            argv.push(interp.to_string());
        }
        argv.extend(a.command.iter().cloned());
    }
    Ok(argv)
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

/// What a keeper records about its sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    id: String,
    name: Option<String>,
    labels: Vec<(String, String)>,
    /// Seconds since the epoch.
    created: u64,
    /// Seconds since the epoch.
    expires: u64,
    /// Seconds since the epoch: the last exec or copy (or the creation).
    #[serde(default)]
    last_used: u64,
    idle_timeout_s: Option<u64>,
    exec_timeout_ms: u64,
    keeper_pid: u32,
    /// The keeper's start time (clock ticks after boot, /proc/PID/stat
    /// field 22): a pid reused by another process is not the keeper.
    #[serde(default)]
    keeper_start: u64,
    init_pid: i32,
    owner_uid: u32,
    layers: nanoclaw_sandbox::Layers,
    /// The cgroup that freezes the sandbox (pause), to thaw it should the
    /// keeper be killed while it is paused.
    #[serde(default)]
    freezer_cgroup: Option<PathBuf>,
}

/// What `sandbox create` hands its keeper (on the keeper's stdin).
#[derive(Debug, Serialize, Deserialize)]
struct KeeperConfig {
    spec: SandboxSpec,
    name: Option<String>,
    labels: Vec<(String, String)>,
    lifetime_ms: u64,
    idle_timeout_ms: Option<u64>,
    exec_timeout_ms: u64,
    root: PathBuf,
}

/// A client's request to a keeper: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    /// Freeze the sandbox (`sandbox pause`); the reply is `Live`.
    Pause,
    /// Thaw it (`sandbox resume`); the reply is `Live`.
    Resume,
    /// The sandbox's state and usage now; the reply is `Live`.
    Inspect,
    Exec {
        command: Vec<String>,
        env: Vec<(String, String)>,
        workdir: Option<PathBuf>,
        user: Option<(u32, u32)>,
        stdin: Option<Vec<u8>>,
        timeout_ms: Option<u64>,
        output_limit: Option<u64>,
    },
    Stop,
    /// Write a file (or, with `tar`, unpack a tar stream into a directory).
    Put {
        path: String,
        /// The bytes, base64.
        data: String,
        tar: bool,
    },
    /// Read a file (or, with `tar`, a directory as a tar stream).
    Get {
        path: String,
        tar: bool,
    },
}

/// A keeper's answer: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    /// The sandbox now (after a pause or resume).
    Live(Box<live::Live>),
    Outcome(Box<Outcome>),
    Stopping,
    Error(String),
    /// Bytes read, base64.
    Data(String),
    Done,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The directory holding every sandbox's state, created 0700 if missing;
/// refused if someone else owns it.
fn state_root() -> Result<PathBuf> {
    let uid = euid();
    let candidates: Vec<PathBuf> = if uid == 0 {
        vec![PathBuf::from("/run/nanoclaw/sandboxes")]
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        vec![PathBuf::from(x).join("nanoclaw/sandboxes")]
    } else {
        // /tmp is shared: another user may have taken our name there first
        // (a denial of service, never used); then the home directory.
        let mut v = vec![PathBuf::from(format!("/tmp/nanoclaw-{uid}/sandboxes"))];
        if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            v.push(PathBuf::from(h).join(".local/state/nanoclaw/sandboxes"));
        }
        v
    };
    let mut last = None;
    for root in candidates {
        match own_dir(&root, uid) {
            Ok(()) => return Ok(root),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no place for the sandboxes' state")))
}

/// Creates `root` (0700) if missing and checks it and its parent belong to
/// `uid` and are writable by it alone.
fn own_dir(root: &Path, uid: u32) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(root)
        .with_context(|| format!("creating the state directory {}", root.display()))?;
    for dir in [root, root.parent().unwrap_or(root)] {
        let md = std::fs::symlink_metadata(dir)?;
        if md.uid() != uid || !md.is_dir() || md.mode() & 0o022 != 0 {
            bail!(
                "{} is not a directory owned by uid {uid} and writable only by it; remove it and retry",
                dir.display()
            );
        }
    }
    Ok(())
}

fn read_state(dir: &Path) -> Option<State> {
    let b = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Whether `pid` runs (an exited keeper stays a zombie until whoever
/// adopted it reaps it, which counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// A process's start time (/proc/PID/stat field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Field 3 (state) is the first after the command name; 22 is 20 later.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the sandbox's keeper still runs: its pid lives and is the same
/// process (same start time), not one that reused the pid.
fn keeper_alive(st: &State) -> bool {
    alive(st.keeper_pid)
        && (st.keeper_start == 0 || start_time(st.keeper_pid) == Some(st.keeper_start))
}

/// SIGKILLs the keeper through a pidfd, after checking the pidfd names the
/// keeper (not a process that reused its pid).
fn kill_keeper(st: &State) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, st.keeper_pid as libc::pid_t, 0) };
    if fd < 0 {
        return;
    }
    if keeper_alive(st) {
        // SAFETY: signalling through the pidfd we hold; no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd as libc::c_int,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd as libc::c_int) };
}

/// Every sandbox whose keeper lives; the state of dead keepers is removed.
fn all_sandboxes(root: &Path) -> Vec<(PathBuf, State)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let dir = e.path();
        match read_state(&dir) {
            Some(st) if keeper_alive(&st) => out.push((dir, st)),
            // A keeper that was killed leaves its directory; one still
            // starting has no state yet (leave it a minute).
            Some(st) => {
                live::thaw_orphan(&st);
                let _ = std::fs::remove_dir_all(&dir);
                forget_cgroups(&st.id);
            }
            None => {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| d > Duration::from_secs(60));
                if old {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }
    out.sort_by_key(|(_, s)| s.created);
    out
}

/// Removes the cgroups a killed keeper left (its sandbox is gone or going:
/// init dies with its keeper).
fn forget_cgroups(id: &str) {
    nanoclaw_sandbox::native::cgroup::remove_sandbox_cgroups(id, Duration::from_secs(2));
}

/// The sandbox named `target`: a name, an id, or a unique id prefix.
fn find(root: &Path, target: &str) -> Result<(PathBuf, State)> {
    let all = all_sandboxes(root);
    if let Some(hit) = all
        .iter()
        .find(|(_, s)| s.id == target || s.name.as_deref() == Some(target))
    {
        return Ok(hit.clone());
    }
    let prefixed: Vec<_> = all
        .iter()
        .filter(|(_, s)| s.id.starts_with(target))
        .collect();
    match prefixed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("no sandbox {target:?}: see `nanoclaw sandbox ls`"),
        _ => bail!("{target:?} matches several sandboxes; give more of the id"),
    }
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

/// `nanoclaw sandbox create`: starts a keeper and prints the sandbox's id.
pub fn create(a: CreateArgs) -> Result<u8> {
    let (mut spec, exec_timeout) = crate::run_cmd::create_spec(&a.run)?;
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
    let root = state_root()?;
    if let Some(n) = &a.name {
        if n.is_empty() || n.contains('/') || n.len() > 64 {
            bail!("--name {n:?}: use 1-64 characters, no '/'");
        }
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
    let mut child = Command::new(exe)
        .arg("__keeper")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the sandbox's keeper")?;
    let mut input = child.stdin.take().context("keeper stdin")?;
    input.write_all(&serde_json::to_vec(&cfg)?)?;
    drop(input);
    let out = child.stdout.take().context("keeper stdout")?;
    let line = read_line_with_deadline(out, Instant::now() + KEEPER_START);
    match line.as_deref().and_then(|l| l.strip_prefix("ok ")) {
        Some(id) => {
            println!("{}", id.trim());
            Ok(0)
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the sandbox could not be created{}",
                line.map(|l| format!(": {}", l.trim())).unwrap_or_default()
            )
        }
    }
}

/// The first line the keeper prints (its readiness), or `None` at EOF or
/// the deadline.
fn read_line_with_deadline(out: std::process::ChildStdout, deadline: Instant) -> Option<String> {
    use std::os::fd::AsRawFd;
    let fd = out.as_raw_fd();
    let mut buf = Vec::new();
    let mut r = out;
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        match r.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

/// `nanoclaw sandbox ls`.
pub fn ls(a: LsArgs) -> Result<u8> {
    let root = state_root()?;
    let want = parse_labels(&a.labels)?;
    let all: Vec<(PathBuf, State)> = all_sandboxes(&root)
        .into_iter()
        .filter(|(_, s)| want.iter().all(|w| s.labels.contains(w)))
        .collect();
    if a.json {
        let mut out = Vec::with_capacity(all.len());
        for (dir, s) in &all {
            let mut v = serde_json::to_value(s)?;
            if let Some(m) = v.as_object_mut() {
                m.insert("state".into(), live::state_of(dir).into());
            }
            out.push(v);
        }
        println!("{}", serde_json::to_string(&out)?);
        return Ok(0);
    }
    println!(
        "{:<14} {:<20} {:<8} {:>8} {:>8} {:>10}  LABELS",
        "ID", "NAME", "STATE", "AGE", "IDLE", "EXPIRES IN"
    );
    let now = now_s();
    for (dir, s) in all {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<14} {:<20} {:<8} {:>7}s {:>7}s {:>9}s  {}",
            s.id,
            s.name.as_deref().unwrap_or("-"),
            live::state_of(&dir),
            now.saturating_sub(s.created),
            now.saturating_sub(s.last_used.max(s.created)),
            s.expires.saturating_sub(now),
            labels.join(",")
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
    let root = state_root()?;
    for t in &a.targets {
        let (dir, st) = find(&root, t)?;
        // A keeper busy with an exec or a copy does not answer: it is then
        // killed, which ends its sandbox all the same (init's lifeline).
        let asked = !a.force && ask_within(&dir, &Request::Stop, Some(STOP_PATIENCE)).is_ok();
        let killed = !asked;
        if killed {
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
        live::thaw_orphan(&st);
        let _ = std::fs::remove_dir_all(&dir);
        if killed {
            // The keeper had no chance to remove the sandbox's cgroups.
            forget_cgroups(&st.id);
        }
        println!("{}", st.id);
    }
    Ok(0)
}

/// Sends one request to a keeper and reads its reply.
fn ask(dir: &Path, req: &Request) -> Result<Reply> {
    ask_within(dir, req, None)
}

/// [`ask`], giving up after `limit` (for requests that must not wait on a
/// keeper busy with a long exec).
fn ask_within(dir: &Path, req: &Request, limit: Option<Duration>) -> Result<Reply> {
    let mut s = UnixStream::connect(dir.join("sock"))
        .with_context(|| format!("connecting to the keeper in {}", dir.display()))?;
    s.set_read_timeout(limit)?;
    s.set_write_timeout(limit)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    if reply.is_empty() {
        bail!("the sandbox's keeper closed the connection without an answer (the sandbox was removed meanwhile, or the request was refused)");
    }
    serde_json::from_str(&reply).map_err(|e| anyhow!("the keeper's reply: {e}"))
}

/// `nanoclaw exec`.
pub fn exec(a: ExecArgs) -> Result<u8> {
    let (dir, _) = find(&state_root()?, &a.target)?;
    let env = a
        .env
        .iter()
        .map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| anyhow!("--env {e:?}: expected KEY=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    let user = a
        .user
        .as_deref()
        .map(|u| {
            let (uid, gid) = u.split_once(':').unwrap_or((u, u));
            Ok::<_, anyhow::Error>((uid.parse()?, gid.parse()?))
        })
        .transpose()
        .map_err(|_| anyhow!("--user: expected UID[:GID] with numeric ids"))?;
    let stdin = if a.stdin {
        let mut b = Vec::new();
        std::io::stdin().read_to_end(&mut b)?;
        Some(b)
    } else {
        None
    };
    let req = Request::Exec {
        command: exec_argv(&a)?,
        env,
        workdir: a.workdir,
        user,
        stdin,
        timeout_ms: a
            .timeout
            .as_deref()
            .map(|t| parse_duration(t).map(|d| d.as_millis() as u64))
            .transpose()
            .map_err(|e| anyhow!("--timeout: {e}"))?,
        output_limit: a
            .output_limit
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(|e| anyhow!("--output-limit: {e}"))?,
    };
    let outcome = match ask(&dir, &req)? {
        Reply::Outcome(o) => o,
        Reply::Error(e) => bail!("{e}"),
        Reply::Stopping => bail!("the sandbox is ending"),
        _ => bail!("unexpected reply from the keeper"),
    };
    if a.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        std::io::stdout().write_all(&outcome.stdout)?;
        std::io::stderr().write_all(&outcome.stderr)?;
        if let Some(k) = outcome.killed_by {
            let why = match k {
                KillReason::Timeout => "timeout",
                KillReason::OutputLimit => "output over the limit",
                KillReason::Oom => "out of memory",
                KillReason::Pids => "too many processes",
                KillReason::Killed => "killed",
            };
            eprintln!(
                "nanoclaw: command in sandbox {} killed: {why}",
                outcome.sandbox_id
            );
        }
    }
    Ok(u8::try_from(outcome.cli_exit_code().clamp(0, 255)).unwrap_or(125))
}

/// The hidden `__keeper` command: holds one sandbox until it is removed,
/// expires, idles out, or its keeper is signalled.
pub fn keeper() -> Result<u8> {
    // A session of its own: the terminal's hangup or ^C in the shell that
    // ran `create` does not reach it (as with `docker run -d`).
    // SAFETY: setsid has no arguments.
    unsafe { libc::setsid() };
    // Before any thread exists (the egress proxy runs on threads), so that
    // every thread has these blocked and only the signalfd sees them.
    let signals = block_end_signals();
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let cfg: KeeperConfig = serde_json::from_slice(&input).context("keeper configuration")?;
    let mut out = std::io::stdout();
    match Keeper::start(cfg) {
        Ok(k) => {
            writeln!(out, "ok {}", k.state.id)?;
            out.flush()?;
            detach_stdio();
            k.serve(signals);
            Ok(0)
        }
        Err(e) => {
            let mut line = e.to_string();
            for c in e.chain().skip(1) {
                line.push_str(&format!(": {c}"));
            }
            writeln!(out, "error {line}")?;
            Ok(125)
        }
    }
}

/// The keeper's stdio becomes /dev/null: nothing ties it to the terminal
/// or the pipeline of the `create` that started it.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 of a descriptor we hold onto a standard descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

struct Keeper {
    sandbox: nanoclaw_sandbox::Sandbox,
    state: State,
    dir: PathBuf,
    listener: UnixListener,
    deadline: Instant,
    idle: Option<Duration>,
    last_used: Instant,
    exec_timeout: Duration,
}

impl Keeper {
    fn start(cfg: KeeperConfig) -> Result<Keeper> {
        let sandbox = session::create(&cfg.spec)?;
        let id = sandbox.id().to_string();
        let dir = cfg.root.join(&id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let listener = UnixListener::bind(dir.join("sock"))
            .with_context(|| format!("listening on {}", dir.join("sock").display()))?;
        std::fs::set_permissions(dir.join("sock"), std::fs::Permissions::from_mode(0o600))?;
        let created = now_s();
        let state = State {
            id,
            name: cfg.name,
            labels: cfg.labels,
            created,
            expires: created + cfg.lifetime_ms / 1000,
            last_used: created,
            idle_timeout_s: cfg.idle_timeout_ms.map(|m| m / 1000),
            exec_timeout_ms: cfg.exec_timeout_ms,
            keeper_pid: std::process::id(),
            keeper_start: start_time(std::process::id()).unwrap_or(0),
            init_pid: sandbox.pid(),
            owner_uid: euid(),
            layers: sandbox.layers().clone(),
            freezer_cgroup: session::freezer_dir(&sandbox),
        };
        write_state(&dir, &state)?;
        Ok(Keeper {
            sandbox,
            state,
            dir,
            listener,
            deadline: Instant::now() + Duration::from_millis(cfg.lifetime_ms),
            idle: cfg.idle_timeout_ms.map(Duration::from_millis),
            last_used: Instant::now(),
            exec_timeout: Duration::from_millis(cfg.exec_timeout_ms),
        })
    }

    /// Serves clients one at a time until the end; then removes the sandbox
    /// and the state directory.
    fn serve(mut self, signals: i32) {
        use std::os::fd::AsRawFd;
        loop {
            let now = Instant::now();
            let end = self
                .idle
                .map_or(self.deadline, |i| self.deadline.min(self.last_used + i));
            if now >= end {
                break;
            }
            let mut fds = vec![
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if let Some(p) = self.sandbox.init_pidfd() {
                fds.push(libc::pollfd {
                    fd: p,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let ms = end.saturating_duration_since(now).as_millis().min(60_000) as i32;
            // SAFETY: `fds` is a valid array of pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms.max(1)) };
            if n <= 0 {
                continue;
            }
            // A signal to end, or the sandbox's init is gone.
            if fds[1].revents != 0 || fds.get(2).is_some_and(|p| p.revents != 0) {
                break;
            }
            if fds[0].revents != 0 {
                if let Ok((conn, _)) = self.listener.accept() {
                    if self.handle(conn) {
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        session::remove(self.sandbox);
    }

    /// Serves one connection; returns true when the keeper should end.
    fn handle(&mut self, conn: UnixStream) -> bool {
        if !peer_is_owner(&conn) {
            return false;
        }
        let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
        let Some(line) = read_request(&conn) else {
            return false;
        };
        let req = serde_json::from_str::<Request>(&line);
        // Looking at a sandbox is not using it.
        let used = !matches!(req, Ok(Request::Inspect) | Err(_));
        let (reply, end) = match req {
            Err(e) => (Reply::Error(format!("bad request: {e}")), false),
            Ok(Request::Stop) => (Reply::Stopping, true),
            Ok(Request::Put { path, data, tar }) => {
                self.last_used = Instant::now();
                (self.put(&path, &data, tar), false)
            }
            Ok(Request::Get { path, tar }) => {
                self.last_used = Instant::now();
                let r = if tar {
                    session::get_tar(&mut self.sandbox, &path)
                } else {
                    session::get_file(&mut self.sandbox, &path)
                };
                match r {
                    Ok(b) => (Reply::Data(B64.encode(b)), false),
                    Err(e) => (Reply::Error(e.to_string()), false),
                }
            }
            Ok(Request::Exec {
                command,
                env,
                workdir,
                user,
                stdin,
                timeout_ms,
                output_limit,
            }) => {
                self.last_used = Instant::now();
                let mut spec = ExecSpec::new(command);
                spec.env = env;
                spec.workdir = workdir;
                spec.user = user.map(|(uid, gid)| User { uid, gid });
                spec.stdin = stdin.map_or(Stdin::Null, Stdin::Bytes);
                spec.timeout = timeout_ms.map_or(self.exec_timeout, Duration::from_millis);
                if let Some(l) = output_limit {
                    spec.output_limit = l;
                }
                let r = session::exec(&mut self.sandbox, &spec);
                self.last_used = Instant::now();
                match r {
                    Ok(o) => (Reply::Outcome(Box::new(o)), false),
                    Err(e) => (Reply::Error(e.to_string()), false),
                }
            }
            Ok(Request::Pause) => (self.pause_or_resume(true, &conn), false),
            Ok(Request::Resume) => (self.pause_or_resume(false, &conn), false),
            Ok(Request::Inspect) => (Reply::Live(Box::new(self.live())), false),
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        let _ = (&conn).write_all(&out);
        // After the reply: the client does not wait for the disk (a
        // write and rename in /run cost 0.1-0.7 ms on every exec here).
        if !end && used {
            self.state.last_used = now_s();
            let _ = write_state(&self.dir, &self.state);
        }
        end
    }
}

impl Keeper {
    fn put(&mut self, path: &str, data: &str, tar: bool) -> Reply {
        let Ok(bytes) = B64.decode(data) else {
            return Reply::Error("bad request: data is not base64".into());
        };
        let r = if tar {
            session::put_tar(&mut self.sandbox, path, bytes, None)
        } else {
            session::put_file(&mut self.sandbox, path, bytes, None)
        };
        match r {
            Ok(()) => Reply::Done,
            Err(e) => Reply::Error(e.to_string()),
        }
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
            let (dir, _) = find(&root, target)?;
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
            let req = Request::Put {
                path: path.to_string(),
                data: B64.encode(data),
                tar,
            };
            match ask(&dir, &req)? {
                Reply::Done => Ok(0),
                Reply::Error(e) => bail!("{e}"),
                _ => bail!("unexpected reply from the keeper"),
            }
        }
        (Some((target, path)), None) => {
            let (dir, _) = find(&root, target)?;
            let to_stdout = a.dst == "-";
            let req = Request::Get {
                path: path.to_string(),
                tar: to_stdout,
            };
            let data = match ask(&dir, &req)? {
                Reply::Data(d) => B64
                    .decode(d)
                    .map_err(|_| anyhow!("the keeper sent bad data"))?,
                Reply::Error(e) => bail!("{e}"),
                _ => bail!("unexpected reply from the keeper"),
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

/// Largest request line a keeper reads (a file copied in, base64, plus
/// framing).
const MAX_REQUEST_LINE: usize = (session::MAX_COPY as usize) * 4 / 3 + 64 * 1024;

/// One request line, read within [`REQUEST_TIMEOUT`] in all and at most
/// [`MAX_REQUEST_LINE`] bytes; `None` for a slow, endless or broken one.
fn read_request(conn: &UnixStream) -> Option<String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let mut r = conn;
    while !buf.ends_with(b"\n") {
        if Instant::now() >= deadline || buf.len() > MAX_REQUEST_LINE {
            return None;
        }
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8(buf).ok()
}

/// Replaces `dir/state.json` atomically.
fn write_state(dir: &Path, state: &State) -> Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    Ok(())
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
        .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    rm(RmArgs {
        force: false,
        targets: doomed,
    })
}

/// Only the sandbox's owner (or root) may talk to its keeper, and only from
/// the keeper's own user namespace: rootless, sandboxed code runs as the
/// owner's host uid, and a sandbox that has the state directory mounted
/// could otherwise reach the sockets of its owner's other sandboxes.
fn peer_is_owner(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: getsockopt(SO_PEERCRED) fills a ucred of the given size.
    let cred = unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let r = libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        );
        if r != 0 {
            return false;
        }
        cred
    };
    if cred.uid != euid() && cred.uid != 0 {
        return false;
    }
    // A peer in a sandbox's user namespace has another ns/user link (and
    // one in a pid namespace we cannot see shows pid 0).
    if cred.pid <= 0 {
        return false;
    }
    let ns = |p: &str| std::fs::read_link(p).ok();
    let mine = ns("/proc/self/ns/user");
    mine.is_some() && ns(&format!("/proc/{}/ns/user", cred.pid)) == mine
}

/// SIGTERM, SIGINT and SIGHUP blocked and reported through a signalfd.
fn block_end_signals() -> i32 {
    // SAFETY: `set` is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    }
}
