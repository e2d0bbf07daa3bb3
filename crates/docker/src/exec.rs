//! One command in a Docker sandbox: a Docker exec, with nanoclaw's
//! timeout and output limit enforced here and the kill reasons read from
//! the container's cgroup.

use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures_util::StreamExt;
use nanoclaw_sandbox::backend::{Echo, ExecControl, Execution};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::outcome::NetworkReport;
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::{Error, KillReason, Outcome};
use tokio::io::AsyncWriteExt;

use crate::cgroup::Counters;
use crate::{api_error, container_name, is_status, DockerSandbox};

/// Exec ids, per process (Docker's own ids are strings).
static NEXT_EXEC: AtomicU32 = AtomicU32::new(1);

/// How long the output may still flow after a kill before the exec is
/// given up on.
const AFTER_KILL: Duration = Duration::from_secs(5);

type Output = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;
type Input = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// A started command.
pub(crate) struct DockerExecution {
    id: u32,
    docker_id: String,
    sandbox: DockerSandbox,
    spec: ExecSpec,
    output: Option<Output>,
    input: Option<Input>,
    /// The command's stdin when started with [`Stdin::Open`], for its
    /// control handle (`None` once closed).
    open_input: Arc<tokio::sync::Mutex<Option<Input>>>,
    started: Instant,
    before: Counters,
}

pub(crate) fn spawn(sb: &DockerSandbox, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
    if spec.command.is_empty() {
        return Err(Error::InvalidSpec("no command given".into()));
    }
    let d = &sb.docker;
    let name = container_name(&sb.info.id);
    let cfg = ExecConfig {
        attach_stdin: Some(!matches!(spec.stdin, Stdin::Null)),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        cmd: Some(spec.command.clone()),
        user: spec.user.map(|u| format!("{}:{}", u.uid, u.gid)),
        working_dir: spec.workdir.as_ref().map(|w| w.display().to_string()),
        ..ExecConfig::default()
    };
    let before = sb.cgroup.read();
    let started = Instant::now();
    let made = d.block(d.api.create_exec(&name, cfg)).map_err(|e| {
        if is_status(&e, 409) && e.to_string().contains("paused") {
            Error::Paused {
                id: sb.info.id.clone(),
            }
        } else if is_status(&e, 404) || is_status(&e, 409) {
            Error::NotFound {
                id: sb.info.id.clone(),
                what: "the sandbox has ended".into(),
            }
        } else {
            api_error(&format!("exec in {name}"), e)
        }
    })?;
    let opts = StartExecOptions {
        detach: false,
        tty: false,
        output_capacity: Some(64 * 1024),
    };
    let (output, input) = match d
        .block(d.api.start_exec(&made.id, Some(opts)))
        .map_err(|e| api_error(&format!("starting exec in {name}"), e))?
    {
        StartExecResults::Attached { output, input } => (output, input),
        StartExecResults::Detached => {
            return Err(api_error(
                "starting exec",
                bollard::errors::Error::DockerStreamError {
                    error: "detached".into(),
                },
            ))
        }
    };
    // An open stdin is fed through the control handle from the start.
    let (input, open_input) = if matches!(spec.stdin, Stdin::Open) {
        (None, Some(input))
    } else {
        (Some(input), None)
    };
    Ok(Box::new(DockerExecution {
        id: NEXT_EXEC.fetch_add(1, Ordering::Relaxed),
        docker_id: made.id,
        sandbox: DockerSandbox {
            docker: sb.docker.clone(),
            info: sb.info.clone(),
            cgroup: sb.cgroup.clone(),
            deadline: sb.deadline,
            egress: sb.egress.clone(),
        },
        spec: spec.clone(),
        output: Some(output),
        open_input: Arc::new(tokio::sync::Mutex::new(open_input)),
        input,
        started,
        before,
    }))
}

/// What the output loop saw.
#[derive(Default)]
struct Streams {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    counted: [u64; 2],
    truncated: [bool; 2],
    killed_by: Option<KillReason>,
    /// Docker's message when the command could not start.
    start_error: Vec<u8>,
}

impl Streams {
    /// Takes one chunk of stream `i` (0 stdout, 1 stderr); false once it
    /// went past the limit.
    fn take(&mut self, i: usize, bytes: &[u8], limit: u64, echo: Option<(i32, i32)>) -> bool {
        let room = limit.saturating_sub(self.counted[i]);
        let keep = &bytes[..bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
        self.counted[i] += bytes.len() as u64;
        match echo {
            Some((out, err)) => write_all(if i == 0 { out } else { err }, keep),
            None if i == 0 => self.stdout.extend_from_slice(keep),
            None => self.stderr.extend_from_slice(keep),
        }
        if keep.len() < bytes.len() {
            self.truncated[i] = true;
            return false;
        }
        true
    }
}

fn write_all(fd: i32, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: `b` is a live slice; `fd` is the caller's open descriptor
        // (Echo borrows it for the call).
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        b = &b[usize::try_from(n).unwrap_or(b.len())..];
    }
}

impl DockerExecution {
    /// Kills the command and every process it started. Without the right
    /// to (a daemon whose containers run as another user than nanoclaw),
    /// the whole sandbox is removed instead.
    async fn kill(&self) {
        let api = &self.sandbox.docker.api;
        let pid = api
            .inspect_exec(&self.docker_id)
            .await
            .ok()
            .and_then(|i| i.pid)
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or(0);
        if pid > 0 && kill_tree(pid) {
            return;
        }
        let opts = bollard::query_parameters::RemoveContainerOptionsBuilder::new()
            .force(true)
            .build();
        let _ = api
            .remove_container(&container_name(&self.sandbox.info.id), Some(opts))
            .await;
    }
}

impl Drop for DockerExecution {
    /// Never waited for: the command is killed (as a keeper does when its
    /// client hangs up).
    fn drop(&mut self) {
        if self.output.take().is_some() {
            self.input.take();
            let d = self.sandbox.docker.clone();
            d.block(self.kill());
        }
    }
}

impl Execution for DockerExecution {
    fn id(&self) -> u32 {
        self.id
    }

    fn control(&self) -> Option<Box<dyn ExecControl>> {
        Some(Box::new(DockerControl {
            docker: self.sandbox.docker.clone(),
            docker_id: self.docker_id.clone(),
            input: self.open_input.clone(),
        }))
    }

    fn wait(mut self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        use std::os::fd::AsRawFd;
        let echo = echo.map(|e| (e.stdout.as_raw_fd(), e.stderr.as_raw_fd()));
        let stdin = match &self.spec.stdin {
            Stdin::Null | Stdin::Open => None,
            Stdin::Bytes(b) => Some(b.clone()),
            Stdin::Inherit => {
                let mut b = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut b);
                Some(b)
            }
        };
        let mut output = self
            .output
            .take()
            .ok_or_else(|| Error::InvalidSpec("this command was waited for already".into()))?;
        let input = self.input.take();
        let open_input = self.open_input.clone();
        let limit = self.spec.output_limit;
        let deadline = tokio::time::Instant::from_std(self.started + self.spec.timeout);
        let me = &*self;
        let d = me.sandbox.docker.clone();
        let streams = d.block(async move {
            if let (Some(mut input), Some(data)) = (input, stdin) {
                tokio::spawn(async move {
                    let _ = input.write_all(&data).await;
                    let _ = input.shutdown().await;
                });
            }
            let mut s = Streams::default();
            let mut grace: Option<tokio::time::Instant> = None;
            // With an open stdin Docker keeps the attached stream open after
            // the command exits (until stdin closes): its end is watched
            // for instead, and what is still in flight read for a moment.
            let watch_end = matches!(me.spec.stdin, Stdin::Open);
            let mut ended_at: Option<tokio::time::Instant> = None;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                let until = match (grace, ended_at) {
                    (Some(g), _) => g,
                    (None, Some(e)) => e + Duration::from_millis(200),
                    (None, None) => deadline,
                };
                tokio::select! {
                    _ = tick.tick(), if watch_end && ended_at.is_none() => {
                        let running = me.sandbox.docker.api.inspect_exec(&me.docker_id).await
                            .ok()
                            .and_then(|i| i.running);
                        if running == Some(false) {
                            ended_at = Some(tokio::time::Instant::now());
                        }
                    }
                    item = output.next() => match item {
                        Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                            // Docker reports a command that could not start
                            // on its stdout, before any output of its own:
                            // an error, kept for stderr.
                            if s.counted == [0, 0] && message.starts_with(b"OCI runtime exec failed") {
                                s.start_error.extend_from_slice(&message);
                                continue;
                            }
                            if !s.take(0, &message, limit, echo) && s.killed_by.is_none() {
                                s.killed_by = Some(KillReason::OutputLimit);
                            }
                        }
                        Some(Ok(LogOutput::StdErr { message })) => {
                            if !s.take(1, &message, limit, echo) && s.killed_by.is_none() {
                                s.killed_by = Some(KillReason::OutputLimit);
                            }
                        }
                        Some(Ok(LogOutput::StdIn { .. })) => {}
                        Some(Err(_)) | None => break,
                    },
                    _ = tokio::time::sleep_until(until) => {
                        if grace.is_some() || ended_at.is_some() {
                            break;
                        }
                        s.killed_by = Some(KillReason::Timeout);
                    }
                }
                if s.killed_by.is_some() && grace.is_none() {
                    grace = Some(tokio::time::Instant::now() + AFTER_KILL);
                    me.kill().await;
                }
            }
            // The command ended: nothing more to feed it.
            open_input.lock().await.take();
            s
        });
        let duration = self.started.elapsed();
        let after = self.sandbox.cgroup.read();
        let code = if streams.killed_by.is_some() {
            None
        } else {
            d.block(d.api.inspect_exec(&self.docker_id))
                .ok()
                .and_then(|i| i.exit_code)
        };
        Ok(outcome(&self, streams, code, &after, duration))
    }
}

/// A running Docker exec's stdin and signals ([`Execution::control`]).
struct DockerControl {
    docker: crate::Docker,
    docker_id: String,
    input: Arc<tokio::sync::Mutex<Option<Input>>>,
}

impl ExecControl for DockerControl {
    fn write_stdin(&self, data: &[u8]) -> Result<(), Error> {
        let input = self.input.clone();
        self.docker.block(async move {
            let mut g = input.lock().await;
            let w = g.as_mut().ok_or_else(|| {
                Error::InvalidSpec(
                    "the command has no open stdin (it was closed, or never open)".into(),
                )
            })?;
            w.write_all(data).await.map_err(|source| Error::Sys {
                call: "writing to the command's stdin".into(),
                source,
            })?;
            w.flush().await.map_err(|source| Error::Sys {
                call: "writing to the command's stdin".into(),
                source,
            })
        })
    }

    fn close_stdin(&self) {
        let input = self.input.clone();
        self.docker.block(async move {
            if let Some(mut w) = input.lock().await.take() {
                let _ = w.shutdown().await;
            }
        });
    }

    /// The exec's process is a host process (Docker without user
    /// namespaces): signalled directly, its whole tree for `SIGKILL`.
    fn signal(&self, signal: i32) -> Result<(), Error> {
        // Just after its start Docker may not report the process yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let pid = loop {
            let info = self
                .docker
                .block(self.docker.api.inspect_exec(&self.docker_id))
                .map_err(|e| api_error("inspecting an exec", e))?;
            let pid = info
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 0);
            match (info.running, pid) {
                (Some(true), Some(pid)) => break pid,
                // It ended already.
                (Some(false), _) if info.exit_code.is_some() => return Ok(()),
                _ if std::time::Instant::now() >= deadline => return Ok(()),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if signal == libc::SIGKILL {
            if kill_tree(pid) {
                return Ok(());
            }
        } else {
            // SAFETY: kill(2) of the exec's own host process.
            if unsafe { libc::kill(pid, signal) } == 0 {
                return Ok(());
            }
        }
        Err(Error::Backend {
            backend: crate::NAME.into(),
            message: format!(
                "cannot signal the command (host pid {pid}): Docker runs it as another user than nanoclaw"
            ),
        })
    }
}

/// The outcome of a command whose output loop ended with `s`, Docker's
/// exit code `code` (`None`: killed by nanoclaw) and the cgroup counters
/// `after`.
fn outcome(
    x: &DockerExecution,
    mut s: Streams,
    code: Option<i64>,
    after: &Counters,
    duration: Duration,
) -> Outcome {
    let oom = after.oom_kills > x.before.oom_kills;
    let pids = after.pids_max > x.before.pids_max;
    let code = code.map(|c| i32::try_from(c).unwrap_or(125));
    let mut killed_by = s.killed_by;
    let (mut exit_code, mut signal) = (code, None);
    match code {
        None => signal = Some(libc::SIGKILL),
        Some(c) if c > 128 && c <= 128 + 64 && (oom || c == 128 + libc::SIGKILL) => {
            // Docker reports a signal as 128+N; the kernel's OOM killer
            // sends SIGKILL.
            exit_code = None;
            signal = Some(c - 128);
        }
        Some(126 | 127) if !s.start_error.is_empty() => {
            let msg = String::from_utf8_lossy(&s.start_error).trim().to_string();
            let argv0 = x.spec.command.first().map_or("", String::as_str);
            let (code, what) = if msg.contains("executable file not found")
                || msg.contains("no such file or directory")
            {
                (127, "command not found")
            } else {
                (126, "cannot execute")
            };
            exit_code = Some(code);
            s.stderr
                .extend_from_slice(format!("nanoclaw: {argv0}: {what} ({msg})\n").as_bytes());
        }
        _ => {}
    }
    if killed_by.is_none() && oom {
        killed_by = Some(KillReason::Oom);
    } else if killed_by.is_none() && pids && exit_code != Some(0) {
        killed_by = Some(KillReason::Pids);
    }
    Outcome {
        exit_code,
        signal,
        killed_by,
        stdout: s.stdout,
        stderr: s.stderr,
        stdout_truncated: s.truncated[0],
        stderr_truncated: s.truncated[1],
        duration,
        cpu_time: Duration::from_nanos(after.cpu_ns.saturating_sub(x.before.cpu_ns)),
        peak_memory_bytes: after.peak,
        sandbox_id: x.sandbox.info.id.clone(),
        layers: x.sandbox.info.layers.clone(),
        network: match &x.sandbox.egress {
            Some(e) => e.report(),
            None => NetworkReport {
                mode: "none".into(),
                ..NetworkReport::default()
            },
        },
    }
}

/// SIGKILLs host process `pid` and all its descendants (found through
/// `/proc`, a few passes so that a fork in flight is caught). False when
/// `pid` could not be signalled (not ours to kill).
fn kill_tree(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks permission and existence.
    if unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    {
        return false;
    }
    for _ in 0..3 {
        let mut doomed = vec![pid];
        let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let ppid = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some((p, ppid))
            })
            .collect();
        let mut i = 0;
        while i < doomed.len() {
            let p = doomed[i];
            doomed.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
            i += 1;
        }
        for p in doomed {
            // SAFETY: plain kill(2) of a process of this command's tree.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    true
}
