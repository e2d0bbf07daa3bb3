//! Processes the tools run: to the end ([`run_to_end`], for
//! `sandbox_exec` and `run_code`), or in the background as exec sessions
//! ([`Execs`], for `exec_start`, `exec_poll`, `exec_write_stdin`,
//! `exec_signal`) whose output is kept (bounded) until it is polled.
//! Both start processes with [`Backend::start_process`], the E2B data
//! plane's own path (keeper, audit record of the exec).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::auth::TenantId;
use crate::backend::{
    Backend, BackendError, BackendResult, ProcessConfig, ProcessEnd, ProcessEvent, ProcessOutput,
    ProcessSelector, SandboxScope, Signal, StartProcess,
};

/// How long after its deadline a process gets to report its end once
/// killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Output an exec session keeps per stream until it is polled.
pub const EXEC_BUFFER: usize = 1 << 20;
/// Exec sessions open at once per tenant.
pub const EXECS_PER_TENANT: usize = 64;
/// An exec session not polled for this long is ended (its process killed).
pub const EXEC_IDLE: Duration = Duration::from_secs(30 * 60);

/// What to run.
#[derive(Debug, Clone)]
pub struct Command {
    /// argv (argv\[0\] looked up in the sandbox's `PATH`).
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (the user's home by default).
    pub cwd: Option<String>,
}

impl Command {
    fn start(&self, stdin: bool, timeout: Option<Duration>) -> BackendResult<StartProcess> {
        let (cmd, args) = self.argv.split_first().ok_or_else(|| {
            BackendError::InvalidArgument("the command is empty: give argv[0]".into())
        })?;
        Ok(StartProcess {
            config: ProcessConfig {
                cmd: cmd.clone(),
                args: args.to_vec(),
                envs: self.env.clone(),
                cwd: self.cwd.clone(),
            },
            tag: None,
            stdin,
            pty: None,
            timeout,
        })
    }
}

/// One stream's captured bytes: the first `cap`, and how many more came.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    /// The bytes kept.
    pub bytes: Vec<u8>,
    /// Bytes dropped past the cap.
    pub dropped: u64,
}

impl Capture {
    /// Appends `data`, keeping at most `cap` bytes in all.
    pub fn push(&mut self, data: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.bytes.len());
        let take = room.min(data.len());
        self.bytes.extend_from_slice(&data[..take]);
        self.dropped += (data.len() - take) as u64;
    }

    /// The bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// How a process run to the end ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its end (`None`: the sandbox went away before it reported one).
    pub end: Option<ProcessEnd>,
    /// Killed because it outlived its timeout.
    pub timed_out: bool,
    /// stdout.
    pub stdout: Capture,
    /// stderr.
    pub stderr: Capture,
    /// Wall time.
    pub duration: Duration,
}

/// Runs `cmd` in the scope's sandbox until it ends or `timeout` passes
/// (then it is killed), keeping `cap` bytes of each stream; `stdin` is
/// written to it and closed.
pub async fn run_to_end<B: Backend>(
    backend: &B,
    scope: &SandboxScope,
    cmd: &Command,
    stdin: Option<&str>,
    timeout: Duration,
    cap: usize,
) -> BackendResult<Finished> {
    let started = Instant::now();
    let req = cmd.start(stdin.is_some(), Some(timeout + KILL_GRACE))?;
    let mut handle = backend.start_process(scope, req).await?;
    let pid = ProcessSelector::Pid(handle.pid);
    if let Some(input) = stdin {
        backend
            .send_input(
                scope,
                &pid,
                crate::backend::ProcessInput::Stdin(bytes::Bytes::copy_from_slice(
                    input.as_bytes(),
                )),
            )
            .await?;
        backend.close_stdin(scope, &pid).await?;
    }
    let mut out = Finished {
        end: None,
        timed_out: false,
        stdout: Capture::default(),
        stderr: Capture::default(),
        duration: Duration::ZERO,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ev = if out.timed_out {
            tokio::time::timeout(KILL_GRACE, handle.events.recv())
                .await
                .unwrap_or(None)
        } else {
            match tokio::time::timeout_at(deadline, handle.events.recv()).await {
                Ok(ev) => ev,
                Err(_) => {
                    out.timed_out = true;
                    let _ = backend.send_signal(scope, &pid, Signal::Kill).await;
                    continue;
                }
            }
        };
        match ev {
            Some(ProcessEvent::Data(ProcessOutput::Stdout(b) | ProcessOutput::Pty(b))) => {
                out.stdout.push(&b, cap)
            }
            Some(ProcessEvent::Data(ProcessOutput::Stderr(b))) => out.stderr.push(&b, cap),
            Some(ProcessEvent::End(end)) => {
                out.end = Some(end);
                break;
            }
            None => break,
        }
    }
    out.duration = started.elapsed();
    Ok(out)
}

/// What an exec session has gathered since it was last polled.
#[derive(Debug, Default)]
struct Pending {
    stdout: Capture,
    stderr: Capture,
    end: Option<ProcessEnd>,
    /// The event channel closed without an end (the sandbox went away).
    lost: bool,
}

/// A process running in the background.
pub struct ExecSession {
    /// The id the tools name it by.
    pub id: String,
    /// Its owner.
    pub tenant: TenantId,
    /// Its sandbox.
    pub sandbox_id: String,
    /// Its pid in the sandbox.
    pub pid: u32,
    pending: Mutex<Pending>,
    changed: Notify,
    last_used: Mutex<Instant>,
}

/// One poll's answer.
#[derive(Debug)]
pub struct Polled {
    /// New stdout since the last poll.
    pub stdout: Capture,
    /// New stderr since the last poll.
    pub stderr: Capture,
    /// Its end, once it ended (the session is then closed).
    pub end: Option<ProcessEnd>,
    /// The sandbox went away before the process reported an end.
    pub lost: bool,
}

impl ExecSession {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn scope(&self) -> SandboxScope {
        SandboxScope {
            tenant: self.tenant.clone(),
            sandbox_id: self.sandbox_id.clone(),
            user: None,
        }
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn is_over(&self) -> bool {
        let p = self.pending();
        p.end.is_some() || p.lost
    }

    /// Takes what came since the last poll, waiting up to `wait` for
    /// something when nothing did.
    async fn poll(&self, wait: Duration) -> Polled {
        let changed = self.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let empty = {
            let p = self.pending();
            p.stdout.bytes.is_empty() && p.stderr.bytes.is_empty() && p.end.is_none() && !p.lost
        };
        if empty && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, changed).await;
        }
        let mut p = self.pending();
        Polled {
            stdout: std::mem::take(&mut p.stdout),
            stderr: std::mem::take(&mut p.stderr),
            end: p.end.clone(),
            lost: p.lost,
        }
    }
}

/// The exec sessions of every tenant.
#[derive(Default)]
pub struct Execs {
    all: Mutex<HashMap<String, Arc<ExecSession>>>,
}

impl Execs {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<ExecSession>>> {
        self.all.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `cmd` in the scope's sandbox in the background (stdin kept
    /// open when `stdin`), killed after `timeout` if given.
    pub async fn start<B: Backend>(
        &self,
        backend: &B,
        scope: &SandboxScope,
        cmd: &Command,
        stdin: bool,
        timeout: Option<Duration>,
    ) -> BackendResult<Arc<ExecSession>> {
        let open = self
            .map()
            .values()
            .filter(|e| e.tenant == scope.tenant)
            .count();
        if open >= EXECS_PER_TENANT {
            return Err(BackendError::QuotaExceeded {
                which: format!(
                    "{EXECS_PER_TENANT} exec sessions at once (poll the finished ones, or signal some)"
                ),
                retry_after: None,
            });
        }
        let id = crate::e2b::random_token()
            .map(|t| format!("exec_{}", &t[..24]))
            .ok_or_else(|| BackendError::Internal("no randomness for an exec id".into()))?;
        let mut handle = backend
            .start_process(scope, cmd.start(stdin, timeout)?)
            .await?;
        let session = Arc::new(ExecSession {
            id: id.clone(),
            tenant: scope.tenant.clone(),
            sandbox_id: scope.sandbox_id.clone(),
            pid: handle.pid,
            pending: Mutex::new(Pending::default()),
            changed: Notify::new(),
            last_used: Mutex::new(Instant::now()),
        });
        self.map().insert(id, session.clone());
        let weak = Arc::downgrade(&session);
        tokio::spawn(async move {
            loop {
                let ev = handle.events.recv().await;
                let Some(s) = weak.upgrade() else { return };
                {
                    let mut p = s.pending();
                    match &ev {
                        Some(ProcessEvent::Data(
                            ProcessOutput::Stdout(b) | ProcessOutput::Pty(b),
                        )) => p.stdout.push(b, EXEC_BUFFER),
                        Some(ProcessEvent::Data(ProcessOutput::Stderr(b))) => {
                            p.stderr.push(b, EXEC_BUFFER)
                        }
                        Some(ProcessEvent::End(end)) => p.end = Some(end.clone()),
                        None => p.lost = true,
                    }
                }
                s.changed.notify_waiters();
                if !matches!(ev, Some(ProcessEvent::Data(_))) {
                    return;
                }
            }
        });
        Ok(session)
    }

    /// The tenant's exec session `id` (another tenant's is not found).
    pub fn get(&self, tenant: &TenantId, id: &str) -> BackendResult<Arc<ExecSession>> {
        let s = self
            .map()
            .get(id)
            .filter(|s| &s.tenant == tenant)
            .cloned()
            .ok_or_else(|| {
                BackendError::NotFound(format!(
                    "no exec session {id:?} (unknown, or ended and polled already)"
                ))
            })?;
        s.touch();
        Ok(s)
    }

    /// New output and the state of `id`; a session whose end is returned
    /// is closed.
    pub async fn poll(&self, tenant: &TenantId, id: &str, wait: Duration) -> BackendResult<Polled> {
        let s = self.get(tenant, id)?;
        let polled = s.poll(wait).await;
        if polled.end.is_some() || polled.lost {
            self.map().remove(id);
        }
        Ok(polled)
    }

    /// Writes `data` to the process's stdin, then closes it if `close`.
    pub async fn write_stdin<B: Backend>(
        &self,
        backend: &B,
        tenant: &TenantId,
        id: &str,
        data: &str,
        close: bool,
    ) -> BackendResult<()> {
        let s = self.get(tenant, id)?;
        let pid = ProcessSelector::Pid(s.pid);
        if !data.is_empty() {
            backend
                .send_input(
                    &s.scope(),
                    &pid,
                    crate::backend::ProcessInput::Stdin(bytes::Bytes::copy_from_slice(
                        data.as_bytes(),
                    )),
                )
                .await?;
        }
        if close {
            backend.close_stdin(&s.scope(), &pid).await?;
        }
        Ok(())
    }

    /// Sends SIGTERM or SIGKILL to the process.
    pub async fn signal<B: Backend>(
        &self,
        backend: &B,
        tenant: &TenantId,
        id: &str,
        signal: Signal,
    ) -> BackendResult<()> {
        let s = self.get(tenant, id)?;
        if s.is_over() {
            return Ok(());
        }
        backend
            .send_signal(&s.scope(), &ProcessSelector::Pid(s.pid), signal)
            .await
    }

    /// Ends sessions idle past [`EXEC_IDLE`] (killing what still runs).
    pub async fn reap<B: Backend>(&self, backend: &B) {
        let old: Vec<Arc<ExecSession>> = {
            let mut all = self.map();
            let ids: Vec<String> = all
                .iter()
                .filter(|(_, s)| s.last_used.lock().is_ok_and(|t| t.elapsed() >= EXEC_IDLE))
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| all.remove(k)).collect()
        };
        for s in old {
            if !s.is_over() {
                let _ = backend
                    .send_signal(&s.scope(), &ProcessSelector::Pid(s.pid), Signal::Kill)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_keep_the_head_and_count_the_rest() {
        let mut c = Capture::default();
        c.push(b"hello ", 8);
        c.push(b"world", 8);
        assert_eq!(c.bytes, b"hello wo");
        assert_eq!(c.dropped, 3);
        assert_eq!(c.text(), "hello wo");
    }
}
