//! Agent runs for the daemon (`POST /v1/execute`) and its approval queue
//! (`GET /v1/approvals`, `POST /v1/approvals/{id}`).
//!
//! The daemon never runs an agent, or the agent's sandbox, in its own
//! address space. Each run is a child process started from nanoclaw's own
//! binary:
//!
//! ```text
//! nanoclaw agent execute --json --approve queue --approval-timeout T
//!     --tenant TENANT --session serve-TENANT-HASH --data DATA --config FILE
//!     [--agent A] --language L --timeout Ns -- -   (the prompt on stdin)
//! ```
//!
//! in a process group of its own, with the daemon's environment (the
//! config's `${VAR}`s, e.g. the model's API key, are read from it) and
//! nothing from the request but the prompt, written to its stdin. Its stdout (the JSON
//! report) is captured up to [`MAX_REPORT`]; its process group is killed
//! when the run outlives its wall time ([`Agents::wall_time`]) or when the
//! client goes away (the request's future is dropped). The child writes
//! its model calls, tool calls and approvals to the same audit log.
//!
//! Runs are bounded per tenant and in total ([`RunLimits`]); over either
//! the run is refused with [`ExecuteError::Busy`] (HTTP 429).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanoclaw_agent::approval::Answer;
use nanoclaw_agent::store::{ApprovalRow, Store, StoreError};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::auth::TenantId;
pub use crate::slots::Slot;
use crate::slots::{Full, Slots};

/// Agent runs one tenant may have at once.
pub const RUNS_PER_TENANT: usize = 4;
/// Agent runs the daemon has at once, over all tenants.
pub const RUNS_TOTAL: usize = 8;
/// What a run may take beyond its own bounds before it is killed.
pub const WALL_MARGIN: Duration = Duration::from_secs(30);
/// The shortest wall time of a run: the agent loop's own default budget
/// (`budget.wallTime`), which normally ends it first.
pub const MIN_WALL: Duration = nanoclaw_agent::run::DEFAULT_WALL_TIME;
/// The `Retry-After` of a refused run.
pub const BUSY_RETRY: Duration = Duration::from_secs(2);
/// Largest report kept from a run's stdout.
pub const MAX_REPORT: usize = 8 << 20;
/// The end of a run's stderr kept (its last line is the error).
pub const MAX_STDERR: usize = 16 << 10;
/// Longest prompt (it travels on the child's stdin).
pub const MAX_PROMPT: usize = 100_000;
/// Default code timeout, seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 30.0;
/// Longest code timeout, seconds.
pub const MAX_TIMEOUT_S: f64 = 600.0;
/// How long the pipes may stay open after the run exited.
const DRAIN: Duration = Duration::from_secs(2);

/// How many runs at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Per tenant.
    pub per_tenant: usize,
    /// In total.
    pub total: usize,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            per_tenant: RUNS_PER_TENANT,
            total: RUNS_TOTAL,
        }
    }
}

/// What the daemon runs agents with.
#[derive(Clone, Debug)]
pub struct AgentsConfig {
    /// nanoclaw's own binary.
    pub exe: PathBuf,
    /// The data folder (its database holds agents, approvals, the audit
    /// log).
    pub data: PathBuf,
    /// The config file (`serve --config`); `None`: runs are refused.
    pub config: Option<PathBuf>,
    /// How long an approval request waits for an answer.
    pub approval_timeout: Duration,
    /// Runs at once.
    pub limits: RunLimits,
}

/// `POST /v1/execute`'s body.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// What to do.
    pub prompt: String,
    /// The language of the code (default `python`).
    #[serde(default)]
    pub language: Option<String>,
    /// Longest a piece of code may run, seconds (default 30, at most 600).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// The agent (default: the config's default agent).
    #[serde(default)]
    pub agent: Option<String>,
    /// A template the caller's tenant registered (`POST /v1/images`): the
    /// agent's sandbox runs in that image's root (seed 000's
    /// `execute(prompt, image="custom-python")`).
    #[serde(default)]
    pub image: Option<String>,
}

/// A checked [`ExecuteRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct Execute {
    /// What to do.
    pub prompt: String,
    /// The language.
    pub language: String,
    /// The code timeout.
    pub timeout: Duration,
    /// The agent.
    pub agent: Option<String>,
    /// The registered image's name, as asked.
    pub image: Option<String>,
    /// Its store reference (set by the caller once it found the tenant's
    /// image of that name): `--image` of the child.
    pub image_ref: Option<String>,
}

impl ExecuteRequest {
    /// Checks what serde cannot; the message names the field and its bound.
    pub fn check(self) -> Result<Execute, String> {
        if self.prompt.trim().is_empty() {
            return Err("prompt must not be empty".into());
        }
        if self.prompt.len() > MAX_PROMPT {
            return Err(format!(
                "prompt is {} bytes: at most {MAX_PROMPT}",
                self.prompt.len()
            ));
        }
        if self.prompt.contains('\0') {
            return Err("prompt contains a NUL byte".into());
        }
        let language = self.language.unwrap_or_else(|| "python".into());
        let langs = nanoclaw_agent::tools::LANGUAGES;
        if !langs.contains(&language.as_str()) {
            return Err(format!(
                "unknown language {language:?}: expected one of {}",
                langs.join(", ")
            ));
        }
        let secs = self.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
        if !(secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_S) {
            return Err(format!(
                "timeout {secs} s: give seconds, more than 0 and at most {MAX_TIMEOUT_S}"
            ));
        }
        if let Some(a) = &self.agent {
            nanoclaw_agent::store::check_id(a).map_err(|e| e.to_string())?;
        }
        if let Some(i) = &self.image {
            if !crate::images::valid_name(i) {
                return Err(format!(
                    "invalid image {i:?}: give the name of an image registered with POST /v1/images"
                ));
            }
        }
        Ok(Execute {
            prompt: self.prompt,
            language,
            timeout: Duration::from_secs_f64(secs),
            agent: self.agent,
            image: self.image,
            image_ref: None,
        })
    }
}

/// Which limit refused a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// [`RunLimits::per_tenant`].
    Tenant(usize),
    /// [`RunLimits::total`].
    Total(usize),
}

/// Why a run gave no report.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The daemon has no config file to run agents with.
    #[error(
        "this daemon was started without --config: agents need a config file with an llm \
         section (restart it as `nanoclaw serve --config FILE`)"
    )]
    NoConfig,
    /// Too many runs at once.
    #[error("{}", busy_message(*.0, .1))]
    Busy(Limit, TenantId),
    /// The agent does not exist.
    #[error("{0}")]
    NoAgent(String),
    /// The model API failed (after the run's retries).
    #[error("the model API failed: {0}")]
    Model(String),
    /// The run outlived its wall time and was killed.
    #[error("the agent run did not end within {} s and was killed", .0.as_secs())]
    Timeout(Duration),
    /// The child could not be started.
    #[error("cannot start an agent run: {0}")]
    Spawn(std::io::Error),
    /// The run failed (nanoclaw's error line).
    #[error("the agent run failed: {0}")]
    Failed(String),
}

fn busy_message(limit: Limit, tenant: &TenantId) -> String {
    match limit {
        Limit::Tenant(n) => {
            format!("agent runs: at most {n} at once for tenant {tenant}; try again later")
        }
        Limit::Total(n) => {
            format!("agent runs: at most {n} at once on this daemon; try again later")
        }
    }
}

/// The daemon's agent runs and approval queue.
pub struct Agents {
    cfg: AgentsConfig,
    store: Store,
    slots: Slots,
}

impl Agents {
    /// Runs agents as `cfg` says; approvals through `store` (the data
    /// folder's database).
    pub fn new(cfg: AgentsConfig, store: Store) -> Agents {
        Agents {
            cfg,
            store,
            slots: Slots::default(),
        }
    }

    /// Takes a slot for one of `tenant`'s runs, or says which limit is
    /// reached ([`ExecuteError::NoConfig`] first: no run is possible).
    pub fn admit(&self, tenant: &TenantId) -> Result<Slot, ExecuteError> {
        if self.cfg.config.is_none() {
            return Err(ExecuteError::NoConfig);
        }
        let l = self.cfg.limits;
        self.slots
            .take(tenant.as_str(), l.per_tenant, l.total)
            .map_err(|full| {
                let limit = match full {
                    Full::Tenant(n) => Limit::Tenant(n),
                    Full::Total(n) => Limit::Total(n),
                };
                ExecuteError::Busy(limit, tenant.clone())
            })
    }

    /// The longest a run of code timeout `timeout` may take: the larger
    /// of [`MIN_WALL`] and the timeout plus one approval wait, plus
    /// [`WALL_MARGIN`].
    pub fn wall_time(&self, timeout: Duration) -> Duration {
        (timeout + self.cfg.approval_timeout).max(MIN_WALL) + WALL_MARGIN
    }

    /// The session (the agent's sandbox scope) of `tenant`'s runs:
    /// `serve-TENANT-HASH`, HASH naming this daemon's data folder, so that
    /// two tenants (or the same name in two daemons) never share a
    /// sandbox.
    pub fn session(&self, tenant: &TenantId) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.cfg.data.as_os_str().as_encoded_bytes());
        format!("serve-{tenant}-{}", &hex::encode(h)[..8])
    }

    /// The child's arguments (after the binary).
    pub fn argv(&self, tenant: &TenantId, req: &Execute) -> Result<Vec<OsString>, ExecuteError> {
        let config = self.cfg.config.as_ref().ok_or(ExecuteError::NoConfig)?;
        let mut a: Vec<OsString> = ["agent", "execute", "--json", "--approve", "queue"]
            .iter()
            .map(OsString::from)
            .collect();
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        a.push("--approval-timeout".into());
        a.push(ms(self.cfg.approval_timeout).into());
        a.push("--tenant".into());
        a.push(tenant.0.clone().into());
        a.push("--session".into());
        a.push(self.session(tenant).into());
        a.push("--data".into());
        a.push(self.cfg.data.clone().into());
        a.push("--config".into());
        a.push(config.clone().into());
        if let Some(agent) = &req.agent {
            a.push("--agent".into());
            a.push(agent.into());
        }
        if let Some(image) = &req.image_ref {
            a.push("--image".into());
            a.push(image.into());
        }
        a.push("--language".into());
        a.push(req.language.clone().into());
        a.push("--timeout".into());
        a.push(ms(req.timeout).into());
        // The prompt goes on stdin ("-"): argv is readable by every local
        // user in /proc/PID/cmdline.
        a.push("--".into());
        a.push("-".into());
        Ok(a)
    }

    /// Runs `req` for `tenant` in a child process: its JSON report (the
    /// run ended with an answer, or a limit stopped it), or why there is
    /// none. The caller holds a [`Slot`] from [`Agents::admit`].
    pub async fn execute(&self, tenant: &TenantId, req: &Execute) -> Result<Value, ExecuteError> {
        let argv = self.argv(tenant, req)?;
        let wall = self.wall_time(req.timeout);
        let done = run_child(&self.cfg.exe, &argv, Some(req.prompt.as_bytes()), wall)
            .await
            .map_err(ExecuteError::Spawn)?;
        interpret(done, wall)
    }

    /// `tenant`'s approval requests: pending ones, or (`all`) every one.
    pub async fn approvals(
        &self,
        tenant: &TenantId,
        all: bool,
    ) -> Result<Vec<ApprovalRow>, StoreError> {
        let (store, t) = (self.store.clone(), tenant.0.clone());
        tokio::task::spawn_blocking(move || store.approvals(Some(&t), !all))
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
    }

    /// Answers one of `tenant`'s pending requests; `Ok(false)`: there is
    /// no such pending, unexpired request of that tenant.
    pub async fn answer(
        &self,
        tenant: &TenantId,
        id: &str,
        answer: Answer,
    ) -> Result<bool, StoreError> {
        let (store, t, id) = (self.store.clone(), tenant.0.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || store.answer_approval(Some(&t), &id, answer))
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
    }
}

/// How a child ended.
#[derive(Debug)]
pub struct Finished {
    /// Its status; `None`: it outlived its wall time and was killed.
    pub status: Option<ExitStatus>,
    /// Its stdout, up to [`MAX_REPORT`].
    pub stdout: Vec<u8>,
    /// Whether stdout went beyond [`MAX_REPORT`].
    pub stdout_cut: bool,
    /// The end of its stderr ([`MAX_STDERR`]).
    pub stderr: Vec<u8>,
}

/// The child's process group, killed unless the child was reaped.
struct Group {
    child: tokio::process::Child,
    pgid: i32,
    reaped: bool,
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped && self.pgid > 0 {
            // SAFETY: kill(2) of the process group the child leads; the
            // child is not reaped yet, so the id cannot have been reused.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
    }
}

/// Output captured as it comes: the head (up to `limit`) or the tail.
#[derive(Default)]
struct Capture {
    buf: Vec<u8>,
    cut: bool,
}

async fn capture<R: AsyncRead + Unpin>(
    mut r: R,
    into: Arc<Mutex<Capture>>,
    limit: usize,
    keep_tail: bool,
) {
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut c = into.lock().unwrap_or_else(|e| e.into_inner());
        c.buf.extend_from_slice(&chunk[..n]);
        if c.buf.len() > limit {
            c.cut = true;
            if keep_tail {
                let cut = c.buf.len() - limit;
                c.buf.drain(..cut);
            } else {
                c.buf.truncate(limit);
            }
        }
    }
}

fn take(c: &Arc<Mutex<Capture>>) -> Capture {
    std::mem::take(&mut *c.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `exe argv` in its own process group for at most `wall`.
pub async fn run_child(
    exe: &std::path::Path,
    argv: &[OsString],
    stdin: Option<&[u8]>,
    wall: Duration,
) -> std::io::Result<Finished> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(argv)
        .current_dir("/")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let daemon = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec and calls only
    // async-signal-safe syscalls (prctl, getppid). The child dies with the
    // daemon, however the daemon ends (SIGKILL, a crash): else a build or
    // an agent would run on unowned, past its wall time, with no slot
    // counting it. PR_SET_PDEATHSIG fires when the forking thread exits: a
    // runtime worker, which lives as long as the daemon (nothing here uses
    // block_in_place); getppid catches a daemon that died before prctl.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != daemon {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), stdin) {
        use tokio::io::AsyncWriteExt;
        let data = data.to_vec();
        // Written beside the wait: a child that does not read cannot stall
        // the daemon (the pipe closes when the write ends or fails).
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
        });
    }
    let (out, err) = (Arc::default(), Arc::default());
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(capture(s, Arc::clone(&out), MAX_REPORT, false))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(capture(s, Arc::clone(&err), MAX_STDERR, true))),
    ];
    let mut group = Group {
        child,
        pgid,
        reaped: false,
    };
    let status = match tokio::time::timeout(wall, group.child.wait()).await {
        Ok(status) => {
            let status = status?;
            group.reaped = true;
            Some(status)
        }
        Err(_) => None,
    };
    // Killed now when it outlived its time (the group's leftovers too).
    drop(group);
    for r in readers.into_iter().flatten() {
        // A leftover that holds a pipe open does not hold the answer.
        if tokio::time::timeout(DRAIN, r).await.is_err() {
            break;
        }
    }
    let (o, e) = (take(&out), take(&err));
    Ok(Finished {
        status,
        stdout: o.buf,
        stdout_cut: o.cut,
        stderr: e.buf,
    })
}

/// nanoclaw's error line in a child's stderr: the last line starting
/// `nanoclaw: ` (progress lines aside), else the last line.
pub fn error_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("nanoclaw: ") && !l.starts_with("nanoclaw: warning: "))
        .or(lines.last())
        .copied()
        .unwrap_or("no error message");
    line.trim_start_matches("nanoclaw: ").to_owned()
}

/// The answer from how the child ended: exit 0 (an answer) or 2 (a limit
/// stopped it) gives its report; anything else an error.
pub fn interpret(done: Finished, wall: Duration) -> Result<Value, ExecuteError> {
    let Some(status) = done.status else {
        return Err(ExecuteError::Timeout(wall));
    };
    if done.stdout_cut {
        return Err(ExecuteError::Failed(format!(
            "its report is larger than {MAX_REPORT} bytes"
        )));
    }
    let report = serde_json::from_slice::<Value>(&done.stdout).ok();
    match (status.code(), report) {
        (Some(0 | 2), Some(r)) if r.is_object() => Ok(r),
        (Some(0 | 2), _) => Err(ExecuteError::Failed("its report is not JSON".to_owned())),
        (_, Some(r)) if r["stop"] == "model_error" => Err(ExecuteError::Model(
            r["stop_detail"].as_str().unwrap_or("no detail").to_owned(),
        )),
        (_, Some(r)) if r["stop"].is_string() => Err(ExecuteError::Failed(format!(
            "the run stopped: {} ({})",
            r["stop"].as_str().unwrap_or_default(),
            r["stop_detail"].as_str().unwrap_or("no detail")
        ))),
        (Some(_), _) => {
            let line = error_line(&done.stderr);
            if line.starts_with("no agent ") {
                Err(ExecuteError::NoAgent(line))
            } else {
                Err(ExecuteError::Failed(line))
            }
        }
        (None, _) => Err(ExecuteError::Failed(format!(
            "it was killed ({status}): {}",
            error_line(&done.stderr)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn req(json: &str) -> Result<Execute, String> {
        serde_json::from_str::<ExecuteRequest>(json)
            .map_err(|e| e.to_string())?
            .check()
    }

    fn agents(limits: RunLimits) -> Agents {
        Agents::new(
            AgentsConfig {
                exe: "/bin/false".into(),
                data: "/d".into(),
                config: Some("/c.yaml".into()),
                approval_timeout: Duration::from_secs(1),
                limits,
            },
            Store::in_memory().unwrap(),
        )
    }

    #[test]
    fn execute_requests_are_checked() {
        let ok = req(r#"{"prompt":"fib"}"#).unwrap();
        assert_eq!(ok.language, "python");
        assert_eq!(ok.timeout, Duration::from_secs(30));
        let ok = req(r#"{"prompt":"x","language":"node","timeout":600,"agent":"a-1"}"#).unwrap();
        assert_eq!(
            (ok.timeout.as_secs(), ok.agent.as_deref()),
            (600, Some("a-1"))
        );
        for bad in [
            r#"{}"#,
            r#"{"prompt":""}"#,
            r#"{"prompt":"  "}"#,
            r#"{"prompt":"x","language":"cobol"}"#,
            r#"{"prompt":"x","timeout":0}"#,
            r#"{"prompt":"x","timeout":10000}"#,
            r#"{"prompt":"x","timeout":-1}"#,
            r#"{"prompt":"x","timeout":"30"}"#,
            r#"{"prompt":"x","agent":"../etc"}"#,
            r#"{"prompt":"x","bogus":1}"#,
            r#"{"prompt":"a\u0000b"}"#,
            r#"{"prompt":"x","image":"../etc"}"#,
        ] {
            assert!(req(bad).is_err(), "{bad}");
        }
        let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(MAX_PROMPT + 1));
        assert!(req(&long).is_err());
    }

    #[test]
    fn the_child_gets_the_daemons_settings_and_the_prompt_after_dashes() {
        let a = agents(RunLimits::default());
        let e = req(r#"{"prompt":"--config /etc/x","timeout":1.5,"agent":"bot"}"#).unwrap();
        let argv: Vec<String> = a
            .argv(&TenantId::from("acme"), &e)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let s = argv.join(" ");
        let session = a.session(&TenantId::from("acme"));
        assert!(session.starts_with("serve-acme-") && session.len() == "serve-acme-".len() + 8);
        assert!(s.starts_with(&format!("agent execute --json --approve queue --approval-timeout 1000ms --tenant acme --session {session} --data /d --config /c.yaml --agent bot --language python --timeout 1500ms -- ")), "{s}");
        assert_eq!(
            argv.last().unwrap(),
            "-",
            "the prompt goes on stdin, not in argv"
        );
        let mut none = agents(RunLimits::default());
        none.cfg.config = None;
        assert!(matches!(
            none.argv(&TenantId::from("acme"), &e),
            Err(ExecuteError::NoConfig)
        ));
        assert_eq!(a.wall_time(Duration::from_secs(1)), MIN_WALL + WALL_MARGIN);
    }

    #[test]
    fn runs_are_bounded_per_tenant_and_in_total() {
        let a = agents(RunLimits {
            per_tenant: 2,
            total: 3,
        });
        let (t1, t2) = (TenantId::from("a"), TenantId::from("b"));
        let s1 = a.admit(&t1).unwrap();
        let _s2 = a.admit(&t1).unwrap();
        let e = a.admit(&t1).err().unwrap();
        assert!(matches!(e, ExecuteError::Busy(Limit::Tenant(2), _)));
        assert!(e.to_string().contains("at most 2 at once for tenant a"));
        let _s3 = a.admit(&t2).unwrap();
        assert!(matches!(
            a.admit(&t2),
            Err(ExecuteError::Busy(Limit::Total(3), _))
        ));
        drop(s1);
        let _s4 = a.admit(&t2).unwrap();
    }

    fn finished(code: i32, stdout: &str, stderr: &str) -> Finished {
        Finished {
            status: Some(ExitStatus::from_raw(code << 8)),
            stdout: stdout.as_bytes().to_vec(),
            stdout_cut: false,
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn exit_codes_and_reports_are_interpreted() {
        let w = Duration::from_secs(1);
        let r = interpret(finished(0, r#"{"stop":"answer"}"#, "[tool] x"), w).unwrap();
        assert_eq!(r["stop"], "answer");
        assert!(interpret(finished(2, r#"{"stop":"turns"}"#, ""), w).is_ok());
        let e = interpret(
            finished(
                125,
                r#"{"stop":"model_error","stop_detail":"HTTP 500"}"#,
                "",
            ),
            w,
        );
        assert!(matches!(e, Err(ExecuteError::Model(d)) if d == "HTTP 500"));
        let e = interpret(
            finished(
                125,
                r#"{"stop":"audit_failed","stop_detail":"disk full"}"#,
                "",
            ),
            w,
        );
        assert!(
            matches!(e, Err(ExecuteError::Failed(m)) if m.contains("audit_failed (disk full)"))
        );
        let e = interpret(
            finished(125, "", "[tool] a\nnanoclaw: no agent \"zz\": name one\n"),
            w,
        );
        assert!(matches!(e, Err(ExecuteError::NoAgent(m)) if m.starts_with("no agent \"zz\"")));
        let e = interpret(
            finished(125, "", "nanoclaw: warning: w\nnanoclaw: config broken\n"),
            w,
        );
        assert!(matches!(e, Err(ExecuteError::Failed(m)) if m == "config broken"));
        assert!(matches!(
            interpret(finished(0, "not json", ""), w),
            Err(ExecuteError::Failed(_))
        ));
        let mut killed = finished(0, "", "");
        killed.status = None;
        assert!(matches!(
            interpret(killed, w),
            Err(ExecuteError::Timeout(_))
        ));
    }

    #[tokio::test]
    async fn a_child_outliving_its_time_is_killed_with_its_group() {
        let argv: Vec<OsString> = ["-c", "sleep 30 & echo $!; wait"]
            .iter()
            .map(OsString::from)
            .collect();
        let t = std::time::Instant::now();
        let f = run_child("/bin/sh".as_ref(), &argv, None, Duration::from_millis(500))
            .await
            .unwrap();
        assert!(f.status.is_none());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid = String::from_utf8_lossy(&f.stdout).trim().to_string();
        assert!(!pid.is_empty());
        // The grandchild (the same process group) is gone too.
        let stat = format!("/proc/{pid}/stat");
        let gone = || std::fs::read_to_string(&stat).map_or(true, |s| s.contains(") Z "));
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !gone() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone(), "the sleep {pid} outlived its run");
    }
}
