//! `nanoclaw run` and `nanoclaw sandbox ...` on a backend other than
//! `native`, through the engine's `Backend` trait only (see
//! [`crate::backends`]).
//!
//! `run --backend X`: create, one exec, destroy — the same outcome, exit
//! code and `--json` shape as native. SIGINT, SIGTERM and SIGHUP destroy
//! the sandbox before nanoclaw exits (exit 130/143/129); a `kill -9` is
//! what the backend's sweep is for (Docker: on its next use).
//!
//! `sandbox create --backend X`: the sandbox is labelled detached and
//! outlives the CLI; `exec`, `ls`, `inspect`, `pause`, `resume`, `rm` and
//! `prune` find it again through [`Backend::list`] (the CLI's name, times
//! and exec timeout travel as `nanoclaw.*` labels).

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use nanoclaw_sandbox::backend::{
    label, Backend, Echo, LiveSandbox, SandboxConfig, SandboxInfo, LABEL_CREATED, LABEL_DETACHED,
    LABEL_EXEC_TIMEOUT_MS, LABEL_EXPIRES, LABEL_NAME,
};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::SandboxSpec;

use crate::backends;

/// How much longer than its command a `run`'s sandbox lives, so that the
/// command's own timeout fires (and is reported) first.
const RUN_MARGIN: Duration = Duration::from_secs(10);

/// The exec spec of a one-shot run of `spec`.
fn exec_of(spec: &SandboxSpec) -> ExecSpec {
    ExecSpec {
        command: spec.command.clone(),
        env: Vec::new(),
        workdir: None,
        user: None,
        stdin: spec.stdin.clone(),
        timeout: spec.limits.timeout,
        output_limit: spec.limits.output_limit,
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts after), and starts a thread that, on one of them, destroys the
/// sandbox in `slot` and exits 128+N.
fn guard_signals(slot: Arc<std::sync::Mutex<Option<Arc<dyn LiveSandbox>>>>) {
    // SAFETY: zeroed sigset_t initialised by sigemptyset; the calls only
    // change this thread's signal mask.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is valid; sigwait writes the signal into `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            if let Some(sb) = slot.lock().ok().and_then(|mut s| s.take()) {
                let _ = sb.destroy();
            }
            eprintln!("nanoclaw: interrupted; the sandbox was removed");
            std::process::exit(128 + sig);
        }
    });
}

/// `nanoclaw run` on backend `name`: create, exec, destroy.
pub fn run(name: &str, spec: SandboxSpec, json: bool) -> Result<u8> {
    let backend = backends::backend_by_name(name)?;
    let mut sandbox = SandboxConfig::new(spec.clone());
    sandbox.spec.limits.timeout = spec.limits.timeout + RUN_MARGIN;
    backend.check(&sandbox)?;
    let slot: Arc<std::sync::Mutex<Option<Arc<dyn LiveSandbox>>>> = Arc::default();
    guard_signals(slot.clone());
    let sb: Arc<dyn LiveSandbox> = Arc::from(backend.create(&sandbox)?);
    if let Ok(mut s) = slot.lock() {
        *s = Some(sb.clone());
    }
    let result = exec_and_report(sb.as_ref(), &exec_of(&spec), json, &spec.limits);
    if let Some(sb) = slot.lock().ok().and_then(|mut s| s.take()) {
        sb.destroy()?;
    }
    result
}

/// Runs `spec` in `sb`, printing like `run` (output streamed, or the
/// outcome as JSON); the exit code.
fn exec_and_report(
    sb: &dyn LiveSandbox,
    spec: &ExecSpec,
    json: bool,
    limits: &nanoclaw_sandbox::spec::Limits,
) -> Result<u8> {
    let outcome = if json {
        sb.exec(spec)?
    } else {
        // SAFETY: fds 1 and 2 stay open for this process's life.
        let echo = unsafe {
            Echo {
                stdout: BorrowedFd::borrow_raw(1),
                stderr: BorrowedFd::borrow_raw(2),
            }
        };
        sb.exec_streaming(spec, echo)?
    };
    if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &outcome)?;
        writeln!(out)?;
    } else {
        std::io::stderr().write_all(&outcome.stderr)?;
        if let Some(k) = outcome.killed_by {
            eprintln!(
                "nanoclaw: sandbox {} killed: {}",
                outcome.sandbox_id,
                crate::run_cmd::kill_message(k, limits)
            );
        }
    }
    Ok(u8::try_from(outcome.cli_exit_code().clamp(0, 255)).unwrap_or(125))
}

fn now_s() -> u64 {
    nanoclaw_sandbox::keeper::now_s()
}

/// `nanoclaw sandbox create --backend NAME`: prints the new sandbox's id.
pub fn create(
    name: &str,
    spec: SandboxSpec,
    sandbox_name: Option<&str>,
    mut labels: Vec<(String, String)>,
    lifetime: Duration,
    idle: Option<Duration>,
    exec_timeout: Duration,
) -> Result<u8> {
    let backend = backends::backend_by_name(name)?;
    if let Some(n) = sandbox_name {
        if find_in(backend.as_ref(), n)?.is_some() {
            bail!("a sandbox named {n:?} exists already: remove it (`nanoclaw sandbox rm {n}`) or pick another name");
        }
        labels.push((LABEL_NAME.into(), n.into()));
    }
    let now = now_s();
    labels.push((LABEL_CREATED.into(), now.to_string()));
    labels.push((LABEL_EXPIRES.into(), (now + lifetime.as_secs()).to_string()));
    labels.push((
        LABEL_EXEC_TIMEOUT_MS.into(),
        exec_timeout.as_millis().to_string(),
    ));
    labels.push((LABEL_DETACHED.into(), "true".into()));
    let mut config = SandboxConfig::new(spec);
    config.spec.limits.timeout = lifetime;
    config.idle_timeout = idle;
    config.labels = labels;
    let sb = backend.create(&config)?;
    println!("{}", sb.id());
    Ok(0)
}

/// The sandbox `target` (id, unique id prefix or name) on `backend`.
fn find_in(backend: &dyn Backend, target: &str) -> Result<Option<SandboxInfo>> {
    let all = backend.list()?;
    if let Some(hit) = all
        .iter()
        .find(|s| s.id == target || label(&s.labels, LABEL_NAME) == Some(target))
    {
        return Ok(Some(hit.clone()));
    }
    let prefixed: Vec<&SandboxInfo> = all
        .iter()
        .filter(|s| !target.is_empty() && s.id.starts_with(target))
        .collect();
    match prefixed.as_slice() {
        [one] => Ok(Some((*one).clone())),
        [] => Ok(None),
        _ => bail!("{target:?} matches several sandboxes; give more of the id"),
    }
}

/// The non-native sandbox `target`, attached: `None` when no backend here
/// has it.
pub fn find(target: &str) -> Result<Option<(Box<dyn LiveSandbox>, SandboxInfo)>> {
    for b in backends::findable() {
        if let Some(info) = find_in(b.as_ref(), target)? {
            return Ok(Some((b.attach(&info.id)?, info)));
        }
    }
    Ok(None)
}

/// `nanoclaw exec` in a non-native sandbox: `base` has the command and
/// the flags applied; its timeout is the sandbox's default unless set.
pub fn exec(
    sb: &dyn LiveSandbox,
    info: &SandboxInfo,
    mut spec: ExecSpec,
    timeout_given: bool,
    json: bool,
) -> Result<u8> {
    if !timeout_given {
        if let Some(ms) = label(&info.labels, LABEL_EXEC_TIMEOUT_MS).and_then(|v| v.parse().ok()) {
            spec.timeout = Duration::from_millis(ms);
        }
    }
    if let Stdin::Inherit = spec.stdin {
        let mut b = Vec::new();
        std::io::stdin().read_to_end(&mut b)?;
        spec.stdin = Stdin::Bytes(b);
    }
    let limits = nanoclaw_sandbox::spec::Limits {
        timeout: spec.timeout,
        output_limit: spec.output_limit,
        ..nanoclaw_sandbox::spec::Limits::default()
    };
    exec_and_report(sb, &spec, json, &limits)
}

/// Every non-native sandbox here, with its backend's name.
pub fn all() -> Vec<SandboxInfo> {
    backends::findable()
        .iter()
        .filter_map(|b| b.list().ok())
        .flatten()
        .collect()
}

/// `ls`'s JSON object for a non-native sandbox.
pub fn ls_json(s: &SandboxInfo) -> serde_json::Value {
    let l = |k: &str| label(&s.labels, k).map(String::from);
    let n = |k: &str| label(&s.labels, k).and_then(|v| v.parse::<u64>().ok());
    serde_json::json!({
        "id": s.id,
        "backend": s.backend,
        "name": l(LABEL_NAME),
        "created": n(LABEL_CREATED),
        "expires": n(LABEL_EXPIRES),
        "exec_timeout_ms": n(LABEL_EXEC_TIMEOUT_MS),
        "labels": s.labels.iter().filter(|(k, _)| !k.starts_with("nanoclaw.")).collect::<Vec<_>>(),
        "layers": s.layers,
        "state": "running",
    })
}

/// `ls`'s table row fields for a non-native sandbox: (id, name, created,
/// expires, labels).
pub fn ls_row(s: &SandboxInfo) -> (String, String, u64, u64, String) {
    let n = |k: &str| {
        label(&s.labels, k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let labels: Vec<String> = s
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("nanoclaw."))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    (
        s.id.clone(),
        label(&s.labels, LABEL_NAME).unwrap_or("-").to_string(),
        n(LABEL_CREATED),
        n(LABEL_EXPIRES),
        labels.join(","),
    )
}

/// `sandbox inspect` of a non-native sandbox.
pub fn inspect(sb: &dyn LiveSandbox, info: &SandboxInfo) -> Result<u8> {
    let mut v = ls_json(info);
    let st = sb.stats()?;
    if let Some(m) = v.as_object_mut() {
        m.insert("stats".into(), serde_json::to_value(&st)?);
        m.insert("state".into(), serde_json::to_value(st.state)?);
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}
