//! Processes started through a keeper, driven from the daemon's event
//! loop: the keeper hands over the command's pipes and reports it on its
//! connection; a pump task per process reads both and fans the events out
//! to every listener (the `Start` stream, later `Connect` streams).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nanoclaw_sandbox::native::proto::{
    self, EGRESS_DENIED, EXITED, FRAME, KILLED_BY, REFUSED, STARTED,
};
use nanoclaw_sandbox::native::session::{self, Spawned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{pipe, OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::egress::EgressHook;
use crate::audit::{Audit, Capture, Record};
use crate::backend::{
    BackendError, BackendResult, ProcessConfig, ProcessEnd, ProcessEvent, ProcessHandle,
    ProcessOutput,
};

/// Events buffered per listener before the pump waits for it.
const LISTENER_QUEUE: usize = 256;
/// How long the pump waits for a slow listener before dropping it.
const SLOW_LISTENER: Duration = Duration::from_secs(30);
/// How long output is still read after the command ended.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long the keeper may take to report the command started.
const START_WAIT: Duration = Duration::from_secs(10);

/// One process of a sandbox.
pub(crate) struct Proc {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    exec_id: u32,
    listeners: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    control: tokio::sync::Mutex<OwnedWriteHalf>,
    /// What stdin received (for the audit record).
    input: Mutex<Capture>,
}

/// Where a process's end is recorded: the log and the record so far
/// (kind, tenant, sandbox, argv).
pub(crate) type AuditHook = Option<(Audit, Record)>;

/// What happens when a process ends besides telling its listeners.
pub(crate) struct EndHooks {
    /// Its exec record.
    pub audit: AuditHook,
    /// Where the egress refusals reported with its end go.
    pub egress: Option<EgressHook>,
}

/// (kind, exec id, value) of a frame.
fn decode(frame: &[u8; FRAME]) -> (u32, u32, i32) {
    let (h, value) = proto::decode_frame(frame);
    (h.kind, h.id, value)
}

fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(e.to_string())
}

impl Proc {
    /// Takes over a spawned command (its keeper connection and pipes, see
    /// `ipc::spawn`): waits for its start, then pumps it
    /// until it ends (`timeout`: kill it after that long). `on_end` runs
    /// once it has ended and every listener was told.
    pub(crate) async fn start(
        conn: tokio::net::UnixStream,
        sp: Spawned,
        config: ProcessConfig,
        tag: Option<String>,
        timeout: Option<Duration>,
        hooks: EndHooks,
        on_end: impl FnOnce(u32) + Send + 'static,
    ) -> BackendResult<(Arc<Proc>, ProcessHandle)> {
        let (mut rd, wr) = conn.into_split();
        let mut frame = [0u8; FRAME];
        tokio::time::timeout(START_WAIT, rd.read_exact(&mut frame))
            .await
            .map_err(|_| BackendError::Timeout("the sandbox did not start the command".into()))?
            .map_err(|_| BackendError::Unavailable("the sandbox ended".into()))?;
        let (kind, _, value) = decode(&frame);
        match kind {
            STARTED => {}
            REFUSED => {
                return Err(BackendError::Internal(format!(
                    "the sandbox refused to start the command: {}",
                    std::io::Error::from_raw_os_error(value)
                )))
            }
            _ => return Err(BackendError::Internal(format!("unexpected frame {kind}"))),
        }
        let stdin = match sp.stdin {
            Some(fd) => Some(pipe::Sender::from_owned_fd(fd).map_err(internal)?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        let proc = Arc::new(Proc {
            pid: value as u32,
            tag,
            config,
            exec_id: sp.id,
            listeners: Mutex::new(vec![tx]),
            stdin: tokio::sync::Mutex::new(stdin),
            control: tokio::sync::Mutex::new(wr),
            input: Mutex::new(Capture::new(crate::audit::DEFAULT_CAPTURE_BYTES)),
        });
        let out = pipe::Receiver::from_owned_fd(sp.stdout).map_err(internal)?;
        let err = pipe::Receiver::from_owned_fd(sp.stderr).map_err(internal)?;
        let pump = Pump {
            proc: proc.clone(),
            conn: rd,
            out: Some(out),
            err: Some(err),
            report: sp.report,
            killed_by_timeout: false,
            output: Capture::new(crate::audit::DEFAULT_CAPTURE_BYTES),
            audit: hooks.audit,
            egress: hooks.egress,
            egress_denied: 0,
            killed_by: None,
            started: std::time::Instant::now(),
        };
        tokio::spawn(async move {
            let end = pump.run(timeout).await;
            let pid = end.0;
            on_end(pid);
        });
        let handle = ProcessHandle {
            pid: proc.pid,
            events: rx,
        };
        Ok((proc, handle))
    }

    /// A new listener: the events from now on.
    pub(crate) fn listen(&self) -> mpsc::Receiver<ProcessEvent> {
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        if let Ok(mut l) = self.listeners.lock() {
            l.push(tx);
        }
        rx
    }

    /// Writes to stdin.
    pub(crate) async fn write_stdin(&self, data: &[u8]) -> BackendResult<()> {
        let mut g = self.stdin.lock().await;
        let Some(w) = g.as_mut() else {
            return Err(BackendError::InvalidArgument(
                "the process has no open stdin (start it with stdin enabled)".into(),
            ));
        };
        if let Ok(mut c) = self.input.lock() {
            c.update(data);
        }
        w.write_all(data)
            .await
            .map_err(|e| BackendError::InvalidArgument(format!("stdin: {e}")))
    }

    /// Closes stdin.
    pub(crate) async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }

    /// Sends a signal to the process's group.
    pub(crate) async fn signal(&self, sig: i32) -> BackendResult<()> {
        let f = session::kill_frame(self.exec_id, sig);
        self.control
            .lock()
            .await
            .write_all(&f)
            .await
            .map_err(|_| BackendError::NotFound(format!("process {} has ended", self.pid)))
    }

    async fn broadcast(&self, ev: ProcessEvent) {
        let listeners: Vec<_> = match self.listeners.lock() {
            Ok(l) => l.clone(),
            Err(_) => return,
        };
        let mut dead = Vec::new();
        for (i, tx) in listeners.iter().enumerate() {
            let sent = match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    tokio::time::timeout(SLOW_LISTENER, tx.send(ev))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
            };
            if !sent {
                dead.push(i);
            }
        }
        if !dead.is_empty() {
            if let Ok(mut l) = self.listeners.lock() {
                l.retain(|tx| !tx.is_closed() && !listeners_dead(&listeners, &dead, tx));
            }
        }
    }
}

/// Whether `tx` is one of the listeners found dead.
fn listeners_dead(
    all: &[mpsc::Sender<ProcessEvent>],
    dead: &[usize],
    tx: &mpsc::Sender<ProcessEvent>,
) -> bool {
    dead.iter().any(|i| all[*i].same_channel(tx))
}

/// Reads one process's output and frames until it ends.
struct Pump {
    proc: Arc<Proc>,
    conn: OwnedReadHalf,
    out: Option<pipe::Receiver>,
    err: Option<pipe::Receiver>,
    report: OwnedFd,
    killed_by_timeout: bool,
    /// Both output streams as they came (for the audit record).
    output: Capture,
    audit: AuditHook,
    /// Where egress refusals reported with the end go.
    egress: Option<EgressHook>,
    /// Refusals the keeper reported (`EGRESS_DENIED`).
    egress_denied: u64,
    /// Why the keeper says the command died (`KILLED_BY`: the sandbox's
    /// memory or pids limit), for the audit record.
    killed_by: Option<nanoclaw_sandbox::KillReason>,
    started: std::time::Instant,
}

impl Pump {
    /// Returns (pid, wait status).
    async fn run(mut self, timeout: Option<Duration>) -> (u32, i32) {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut frame = [0u8; FRAME];
        let mut got = 0usize;
        let mut buf_out = vec![0u8; 32 * 1024];
        let mut buf_err = vec![0u8; 32 * 1024];
        let status = loop {
            let sleep = async {
                match deadline {
                    Some(d) if !self.killed_by_timeout => tokio::time::sleep_until(d).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = read_some(&mut self.out, &mut buf_out) => {
                    if let Some(n) = r {
                        self.output.update(&buf_out[..n]);
                        let b = Bytes::copy_from_slice(&buf_out[..n]);
                        self.proc.broadcast(ProcessEvent::Data(ProcessOutput::Stdout(b))).await;
                    }
                }
                r = read_some(&mut self.err, &mut buf_err) => {
                    if let Some(n) = r {
                        self.output.update(&buf_err[..n]);
                        let b = Bytes::copy_from_slice(&buf_err[..n]);
                        self.proc.broadcast(ProcessEvent::Data(ProcessOutput::Stderr(b))).await;
                    }
                }
                r = self.conn.read(&mut frame[got..]) => {
                    match r {
                        Ok(0) | Err(_) => break libc::SIGKILL,
                        Ok(n) => got += n,
                    }
                    if got == FRAME {
                        got = 0;
                        let (kind, _, value) = decode(&frame);
                        match kind {
                            EXITED => break value,
                            EGRESS_DENIED => self.egress_denied += u64::try_from(value).unwrap_or(0),
                            KILLED_BY => self.killed_by = proto::kill_reason(value),
                            _ => {}
                        }
                    }
                }
                _ = sleep => {
                    self.killed_by_timeout = true;
                    let _ = self.proc.signal(libc::SIGKILL).await;
                }
            }
        };
        self.drain(&mut buf_out).await;
        let mut end = end_of(status);
        if let Some(msg) = self.start_failure() {
            self.proc
                .broadcast(ProcessEvent::Data(ProcessOutput::Stderr(Bytes::from(
                    msg.1,
                ))))
                .await;
            end = ProcessEnd::exited(msg.0);
        }
        self.proc.close_stdin().await;
        if let (Some(hook), n @ 1..) = (&self.egress, self.egress_denied) {
            hook.refused(n).await;
        }
        // The record is on disk before anyone hears of the end.
        self.record(status, &end).await;
        self.proc.broadcast(ProcessEvent::End(end)).await;
        if let Ok(mut l) = self.proc.listeners.lock() {
            l.clear();
        }
        (self.proc.pid, status)
    }

    /// Appends the exec's audit record (and waits for it to be durable).
    async fn record(&mut self, status: i32, end: &ProcessEnd) {
        let Some((audit, mut rec)) = self.audit.take() else {
            return;
        };
        rec.exit_code = end.exited.then_some(end.exit_code);
        rec.signal = (!libc::WIFEXITED(status)).then(|| libc::WTERMSIG(status));
        rec.killed_by = if self.killed_by_timeout {
            Some("timeout".to_string())
        } else {
            self.killed_by
                .and_then(|r| serde_json::to_value(r).ok())
                .and_then(|v| v.as_str().map(str::to_owned))
        };
        rec.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        let output = std::mem::replace(&mut self.output, Capture::new(0));
        rec.output = Some(output.finish());
        let input = self
            .proc
            .input
            .lock()
            .map(|mut c| std::mem::replace(&mut *c, Capture::new(0)).finish())
            .ok();
        rec.input = input;
        if audit.append_async(rec).await.is_err() {
            eprintln!("nanoclaw serve: could not write an exec's audit record");
        }
    }

    /// Output still in the pipes after the end (until EOF, or a grace
    /// period: a background child may hold them open).
    async fn drain(&mut self, buf: &mut [u8]) {
        let until = tokio::time::Instant::now() + DRAIN_GRACE;
        for stdout in [true, false] {
            loop {
                let src = if stdout { &mut self.out } else { &mut self.err };
                if src.is_none() {
                    break;
                }
                let r = tokio::time::timeout_at(until, read_some(src, buf)).await;
                match r {
                    Ok(Some(n)) => {
                        self.output.update(&buf[..n]);
                        let b = Bytes::copy_from_slice(&buf[..n]);
                        let ev = if stdout {
                            ProcessOutput::Stdout(b)
                        } else {
                            ProcessOutput::Stderr(b)
                        };
                        self.proc.broadcast(ProcessEvent::Data(ev)).await;
                    }
                    _ => break,
                }
            }
        }
    }

    /// (exit code, message) when the command could not be started.
    fn start_failure(&self) -> Option<(i32, String)> {
        let mut b = [0u8; 12];
        // SAFETY: reading into a buffer we own from a descriptor we own.
        let n = unsafe { libc::read(self.report.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if n != 12 {
            return None;
        }
        let errno = i32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        let name = self.proc.config.cmd.clone();
        Some(if errno == libc::ENOENT {
            (127, format!("{name}: command not found\n"))
        } else {
            (
                126,
                format!("{name}: {}\n", std::io::Error::from_raw_os_error(errno)),
            )
        })
    }
}

/// Reads what is available from `src`; `None` at its end (it is then
/// dropped, and later calls wait forever: the other branches go on).
async fn read_some(src: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    let Some(r) = src.as_mut() else {
        return std::future::pending().await;
    };
    match r.read(buf).await {
        Ok(n) if n > 0 => Some(n),
        _ => {
            *src = None;
            None
        }
    }
}

/// envd's end of a process from a wait status.
fn end_of(status: i32) -> ProcessEnd {
    if libc::WIFEXITED(status) {
        ProcessEnd::exited(libc::WEXITSTATUS(status))
    } else {
        ProcessEnd::signaled(libc::WTERMSIG(status))
    }
}
