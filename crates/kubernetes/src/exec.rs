//! One command in a Kubernetes sandbox: a `pods/exec` over WebSocket, with
//! nanoclaw's timeout and output limit enforced here.
//!
//! Two things the exec API lacks are made up for by a small `sh` wrapper
//! the command runs under ([`WRAP`]):
//!
//! * Killing. Closing an exec's stream does not stop its process in
//!   the container, and the API has no kill. The wrapper prints its pid
//!   first (one line on stdout, stripped here) and then `exec`s the
//!   command, so a timeout or an output limit kills the command's whole
//!   process tree with a second exec ([`KILL`]).
//! * End of stdin. Kubernetes 1.20 speaks `v4.channel.k8s.io`, which cannot
//!   close stdin without closing the whole connection (only `v5`, 1.29+,
//!   can). The wrapper reads exactly the number of bytes sent
//!   (`head -c N | command`), so the command sees its end of input.
//!
//! * Stdin that stays open (E2B's `SendInput`/`CloseStdin`,
//!   [`Stdin::Open`]). The length is not known in advance, so the input is
//!   framed: each write is sent as `LEN\n` and LEN bytes, end of input as
//!   `0\n`. A forwarder in the wrapper (`read` a length line — the shell
//!   reads a pipe byte by byte, so it never takes more — then `dd
//!   bs=LEN count=1 iflag=fullblock`, which takes exactly LEN) writes the
//!   bytes into a FIFO the command reads, and stops at `0`, which closes the
//!   command's stdin in order with the data before it. (Killing the
//!   forwarder instead could lose bytes it had not forwarded yet.)
//!
//! The wrapper also applies the command's environment and working
//! directory, which the exec API does not carry. The image therefore
//! needs `sh`, `head` and `sleep` (busybox, Debian and Alpine images have
//! them), and `mkfifo` and `dd` for commands whose stdin stays open.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::AttachParams;
use nanoclaw_sandbox::backend::{Echo, ExecControl, Execution};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::outcome::NetworkReport;
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::{Error, KillReason, Outcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::timed;
use crate::{api_error, backend_error, is_status, KubeSandbox, CONTAINER, NAME};

/// The command's wrapper (see the module's documentation). Arguments:
/// the number of `KEY=VALUE` pairs, the pairs, the working directory (or
/// empty), the stdin length (`-` for none, `+` for framed open input),
/// then the command.
const WRAP: &str = r#"echo "$$"
n=$1; shift
while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n - 1)); done
if [ -n "$1" ]; then cd -- "$1" || exit 126; fi
shift
if [ "$1" = - ]; then shift; exec "$@" </dev/null; fi
if [ "$1" = + ]; then
shift; f=/tmp/.nanoclaw-in-$$
mkfifo -m 600 "$f" || exit 126
exec 3<&0
sh -c 'exec 4>"$1"; rm -f -- "$1"; while IFS= read -r n && [ "$n" -gt 0 ]; do dd bs="$n" count=1 iflag=fullblock 2>/dev/null >&4 || exit; done' nanoclaw-in "$f" <&3 >/dev/null 2>&1 &
w=$!
exec 3<&-
"$@" <"$f"; s=$?
kill "$w" 2>/dev/null
exit "$s"
fi
s=$1; shift
head -c "$s" | "$@""#;

/// Sends signal `$2` to process `$1` and its descendants (deepest first).
const SIGNAL: &str = r#"s() { for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do s "$c" "$2"; done; kill -"$2" "$1" 2>/dev/null; }; s "$1" "$2""#;

/// The most one stdin frame carries (`dd`'s buffer in the sandbox).
const FRAME: usize = 64 * 1024;

/// Kills process `$1` and its descendants, stopping each before reading
/// its children so none escapes by forking meanwhile.
const KILL: &str = r#"k() { kill -STOP "$1" 2>/dev/null; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do k "$c"; done; kill -KILL "$1" 2>/dev/null; }; k "$1""#;

/// Exec ids, per process.
static NEXT_EXEC: AtomicU32 = AtomicU32::new(1);

/// Commands started through this process and not yet waited for, per
/// sandbox.
static RUNNING: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// How long the output may still flow after a kill before the exec is
/// given up on.
const AFTER_KILL: Duration = Duration::from_secs(10);

/// The exec streams' buffer, per stream.
const BUF: usize = 64 * 1024;

/// Commands of sandbox `id` running now (started by this process).
pub(crate) fn running(id: &str) -> u64 {
    let g = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().and_then(|m| m.get(id)).copied().unwrap_or(0)
}

fn count(id: &str, up: bool) {
    let mut g = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let m = g.get_or_insert_with(HashMap::new);
    let n = m.entry(id.to_string()).or_insert(0);
    *n = if up { *n + 1 } else { n.saturating_sub(1) };
    if *n == 0 {
        m.remove(id);
    }
}

/// A started command.
pub(crate) struct KubeExecution {
    id: u32,
    sandbox: KubeSandbox,
    spec: ExecSpec,
    proc: Option<kube::api::AttachedProcess>,
    /// Dropped when the command has ended: the stdin writer is held until
    /// then, since dropping it closes the whole connection (v4).
    stdin_hold: Option<tokio::sync::oneshot::Sender<()>>,
    started: Instant,
    /// The wrapper's pid, once read, for [`KubeControl::signal`].
    pid: Arc<PidCell>,
    /// Frames to the open stdin's writer task ([`Stdin::Open`] only).
    input: Option<tokio::sync::mpsc::UnboundedSender<Input>>,
}

/// What the open stdin's writer task is told.
enum Input {
    Data(Vec<u8>),
    Close,
}

/// The wrapper's pid as the output loop reads it, waited for by a signal
/// sent before the command printed it.
#[derive(Default)]
struct PidCell {
    pid: Mutex<Option<u32>>,
    set: Condvar,
}

impl PidCell {
    fn publish(&self, pid: u32) {
        let mut g = self.pid.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(pid);
            self.set.notify_all();
        }
    }

    /// The pid, waiting up to `wait` for it.
    fn get(&self, wait: Duration) -> Option<u32> {
        let g = self.pid.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .set
            .wait_timeout_while(g, wait, |p| p.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// [`Execution::control`] of a Kubernetes command: framed stdin (see the
/// module's documentation) and signals through a second exec.
struct KubeControl {
    sandbox: KubeSandbox,
    pid: Arc<PidCell>,
    input: Option<tokio::sync::mpsc::UnboundedSender<Input>>,
}

impl ExecControl for KubeControl {
    fn write_stdin(&self, data: &[u8]) -> Result<(), Error> {
        let Some(tx) = &self.input else {
            return Err(Error::InvalidSpec(
                "this command was started without stdin".into(),
            ));
        };
        for chunk in data.chunks(FRAME) {
            tx.send(Input::Data(chunk.to_vec()))
                .map_err(|_| Error::InvalidSpec("the command has ended".into()))?;
        }
        Ok(())
    }

    fn close_stdin(&self) {
        if let Some(tx) = &self.input {
            let _ = tx.send(Input::Close);
        }
    }

    fn signal(&self, signal: i32) -> Result<(), Error> {
        // A command that never printed its pid has not started (or ended).
        let Some(pid) = self.pid.get(AFTER_KILL).filter(|p| *p > 1) else {
            return Ok(());
        };
        let sb = self.sandbox.clone();
        let done = self.sandbox.kube.block(async move {
            if signal == libc::SIGKILL {
                kill_tree(&sb, pid).await
            } else {
                run_quietly(&sb, SIGNAL, &[pid.to_string(), signal.to_string()]).await
            }
        });
        if done {
            Ok(())
        } else {
            Err(backend_error(format!(
                "signal {signal} to a command in pod {}: the exec that sends it failed",
                self.sandbox.name()
            )))
        }
    }
}

fn params(stdin: bool) -> AttachParams {
    AttachParams {
        container: Some(CONTAINER.into()),
        stdin,
        stdout: true,
        stderr: true,
        tty: false,
        max_stdin_buf_size: Some(BUF),
        max_stdout_buf_size: Some(BUF),
        max_stderr_buf_size: Some(BUF),
    }
}

/// The wrapped argv of `spec`, given its stdin: `-` none, `+` framed
/// open input, else that many bytes.
fn argv(spec: &ExecSpec, stdin_len: &str) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        WRAP.into(),
        "nanoclaw-exec".into(),
    ];
    a.push(spec.env.len().to_string());
    a.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    a.push(
        spec.workdir
            .as_ref()
            .map(|w| w.display().to_string())
            .unwrap_or_default(),
    );
    a.push(stdin_len.to_string());
    a.extend(spec.command.iter().cloned());
    a
}

pub(crate) fn spawn(sb: &KubeSandbox, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
    if spec.command.is_empty() {
        return Err(Error::InvalidSpec("no command given".into()));
    }
    // The Pod's own user is no other user: asking for it is fine.
    if spec.user.is_some_and(|u| Some((u.uid, u.gid)) != sb.user) {
        return Err(Error::NotSupported {
            backend: NAME.into(),
            field: "a per-command user".into(),
            why: "pods/exec runs as the Pod's user; set the sandbox's user instead".into(),
        });
    }
    if matches!(spec.stdin, Stdin::Open) {
        return spawn_open(sb, spec);
    }
    let stdin = match &spec.stdin {
        Stdin::Null | Stdin::Open => None,
        Stdin::Bytes(b) => Some(b.clone()),
        Stdin::Inherit => {
            let mut b = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut b);
            Some(b)
        }
    }
    .filter(|b| !b.is_empty());
    let k = &sb.kube;
    let name = sb.name();
    let started = Instant::now();
    let mut proc = k
        .block(timed(k.pods().exec(
            &name,
            argv(
                spec,
                &stdin.as_ref().map_or("-".into(), |b| b.len().to_string()),
            ),
            &params(stdin.is_some()),
        )))
        .map_err(|e| {
            if is_status(&e, 404) || is_status(&e, 400) {
                sb.ended()
            } else {
                api_error(&format!("exec in pod {name}"), e)
            }
        })?;
    let mut stdin_hold = None;
    if let (Some(data), Some(mut w)) = (stdin, proc.stdin()) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stdin_hold = Some(tx);
        k.rt.spawn(async move {
            let _ = w.write_all(&data).await;
            let _ = w.flush().await;
            // Held until the command ends (see the field's comment).
            let _ = rx.await;
            drop(w);
        });
    }
    count(&sb.info.id, true);
    Ok(Box::new(KubeExecution {
        id: NEXT_EXEC.fetch_add(1, Ordering::Relaxed),
        sandbox: sb.clone(),
        spec: spec.clone(),
        proc: Some(proc),
        stdin_hold,
        started,
        pid: Arc::default(),
        input: None,
    }))
}

/// [`spawn`] of a command whose stdin stays open: its input goes through
/// a writer task as frames (see the module's documentation) until
/// [`ExecControl::close_stdin`]; the writer is held until the command ends.
fn spawn_open(sb: &KubeSandbox, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
    let k = &sb.kube;
    let name = sb.name();
    let started = Instant::now();
    let mut proc = k
        .block(timed(k.pods().exec(&name, argv(spec, "+"), &params(true))))
        .map_err(|e| {
            if is_status(&e, 404) || is_status(&e, 400) {
                sb.ended()
            } else {
                api_error(&format!("exec in pod {name}"), e)
            }
        })?;
    let mut w = proc
        .stdin()
        .ok_or_else(|| backend_error(format!("exec in pod {name}: no stdin stream")))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Input>();
    let (hold_tx, mut hold_rx) = tokio::sync::oneshot::channel::<()>();
    k.rt.spawn(async move {
        let mut open = true;
        let mut ended = false;
        loop {
            tokio::select! {
                m = rx.recv(), if open => match m {
                    Some(Input::Data(d)) => {
                        let mut frame = format!("{}\n", d.len()).into_bytes();
                        frame.extend_from_slice(&d);
                        if w.write_all(&frame).await.is_err() || w.flush().await.is_err() {
                            break;
                        }
                    }
                    Some(Input::Close) => {
                        let _ = w.write_all(b"0\n").await;
                        let _ = w.flush().await;
                        open = false;
                    }
                    None => open = false,
                },
                _ = &mut hold_rx => {
                    ended = true;
                    break;
                }
            }
        }
        // Held until the command ends (dropping it closes the connection).
        if !ended {
            let _ = hold_rx.await;
        }
        drop(w);
    });
    count(&sb.info.id, true);
    Ok(Box::new(KubeExecution {
        id: NEXT_EXEC.fetch_add(1, Ordering::Relaxed),
        sandbox: sb.clone(),
        spec: spec.clone(),
        proc: Some(proc),
        stdin_hold: Some(hold_tx),
        started,
        pid: Arc::default(),
        input: Some(tx),
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
    /// The wrapper's pid line, until it is complete.
    header: Vec<u8>,
    pid: Option<u32>,
}

impl Streams {
    /// Takes one chunk of stream `i` (0 stdout, 1 stderr); false once it
    /// went past the limit.
    fn take(&mut self, i: usize, bytes: &[u8], limit: u64, echo: Option<(i32, i32)>) -> bool {
        if i == 0 && self.pid.is_none() {
            self.header.extend_from_slice(bytes);
            let Some(nl) = self.header.iter().position(|b| *b == b'\n') else {
                return true;
            };
            let rest = self.header.split_off(nl + 1);
            self.pid = std::str::from_utf8(&self.header)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .or(Some(0));
            return self.take(0, &rest, limit, echo);
        }
        if bytes.is_empty() {
            return true;
        }
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

/// Kills process `pid`'s tree in the sandbox with a second exec; false
/// when that failed.
async fn kill_tree(sb: &KubeSandbox, pid: u32) -> bool {
    run_quietly(sb, KILL, &[pid.to_string()]).await
}

/// Runs shell `script` with `args` in the sandbox (a second exec); false
/// when that failed.
async fn run_quietly(sb: &KubeSandbox, script: &str, args: &[String]) -> bool {
    let mut argv = vec![
        "sh".to_string(),
        "-c".into(),
        script.into(),
        "nanoclaw-kill".into(),
    ];
    argv.extend(args.iter().cloned());
    let Ok(mut p) = timed(sb.kube.pods().exec(&sb.name(), argv, &params(false))).await else {
        return false;
    };
    let Some(status) = p.take_status() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(30), status).await,
        Ok(Some(_))
    )
}

/// The exit code an exec's status reports, or its message when the
/// command did not run.
fn exit_code(st: &Status) -> Result<i32, String> {
    if st.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    if st.reason.as_deref() == Some("NonZeroExitCode") {
        if let Some(c) = st
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
            .and_then(|c| c.message.as_deref())
            .and_then(|m| m.parse().ok())
        {
            return Ok(c);
        }
    }
    Err(st.message.clone().unwrap_or_else(|| format!("{st:?}")))
}

impl KubeExecution {
    /// Reads the output until the command ends, killing it on its timeout
    /// or output limit.
    async fn pump(
        &self,
        proc: &mut kube::api::AttachedProcess,
        echo: Option<(i32, i32)>,
    ) -> Streams {
        let mut s = Streams::default();
        let (Some(mut out), Some(mut err)) = (proc.stdout(), proc.stderr()) else {
            return s;
        };
        let limit = self.spec.output_limit;
        let deadline = tokio::time::Instant::from_std(self.started + self.spec.timeout);
        let (mut b1, mut b2) = (vec![0u8; BUF], vec![0u8; BUF]);
        let (mut out_open, mut err_open) = (true, true);
        let mut grace: Option<tokio::time::Instant> = None;
        let mut killed = false;
        while out_open || err_open {
            let until = grace.unwrap_or(deadline);
            tokio::select! {
                r = out.read(&mut b1), if out_open => match r {
                    Ok(n) if n > 0 => {
                        if !s.take(0, &b1[..n], limit, echo) && s.killed_by.is_none() {
                            s.killed_by = Some(KillReason::OutputLimit);
                        }
                        if let Some(p) = s.pid {
                            self.pid.publish(p);
                        }
                    }
                    _ => out_open = false,
                },
                r = err.read(&mut b2), if err_open => match r {
                    Ok(n) if n > 0 => {
                        if !s.take(1, &b2[..n], limit, echo) && s.killed_by.is_none() {
                            s.killed_by = Some(KillReason::OutputLimit);
                        }
                    }
                    _ => err_open = false,
                },
                _ = tokio::time::sleep_until(until) => {
                    if grace.is_some() {
                        // The command could not be killed through an exec:
                        // the sandbox goes, so that nothing runs on.
                        let _ = self.sandbox.kube.remove_async(&self.sandbox.info.id).await;
                        break;
                    }
                    s.killed_by = Some(KillReason::Timeout);
                }
            }
            if s.killed_by.is_some() && grace.is_none() {
                grace = Some(tokio::time::Instant::now() + AFTER_KILL);
            }
            if s.killed_by.is_some() && !killed {
                if let Some(pid) = s.pid.filter(|p| *p > 1) {
                    killed = true;
                    if !kill_tree(&self.sandbox, pid).await {
                        let _ = self.sandbox.kube.remove_async(&self.sandbox.info.id).await;
                    }
                }
            }
        }
        s
    }
}

impl Drop for KubeExecution {
    /// Never waited for: the command is killed (as a keeper does when its
    /// client hangs up).
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let k = self.sandbox.kube.clone();
            let sb = self.sandbox.clone();
            k.block(async move {
                let mut s = Streams::default();
                if let Some(mut out) = proc.stdout() {
                    let mut b = vec![0u8; 4096];
                    let until = tokio::time::Instant::now() + AFTER_KILL;
                    while s.pid.is_none() {
                        match tokio::time::timeout_at(until, out.read(&mut b)).await {
                            Ok(Ok(n)) if n > 0 => {
                                s.take(0, &b[..n], 0, None);
                            }
                            _ => break,
                        }
                    }
                }
                match s.pid.filter(|p| *p > 1) {
                    Some(pid) if kill_tree(&sb, pid).await => {}
                    _ => {
                        let _ = sb.kube.remove_async(&sb.info.id).await;
                    }
                }
            });
            self.stdin_hold.take();
            count(&self.sandbox.info.id, false);
        }
    }
}

impl Execution for KubeExecution {
    fn id(&self) -> u32 {
        self.id
    }

    fn control(&self) -> Option<Box<dyn ExecControl>> {
        Some(Box::new(KubeControl {
            sandbox: self.sandbox.clone(),
            pid: self.pid.clone(),
            input: self.input.clone(),
        }))
    }

    fn wait(mut self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        use std::os::fd::AsRawFd;
        let echo = echo.map(|e| (e.stdout.as_raw_fd(), e.stderr.as_raw_fd()));
        let mut proc = self
            .proc
            .take()
            .ok_or_else(|| Error::InvalidSpec("this command was waited for already".into()))?;
        count(&self.sandbox.info.id, false);
        let k = self.sandbox.kube.clone();
        let me = &*self;
        let (streams, status) = k.block(async {
            let status = proc.take_status();
            let streams = me.pump(&mut proc, echo).await;
            let status = match status {
                Some(st) => tokio::time::timeout(AFTER_KILL, st).await.ok().flatten(),
                None => None,
            };
            (streams, status)
        });
        self.stdin_hold.take();
        let duration = self.started.elapsed();
        let code = match (&streams.killed_by, status) {
            (Some(_), _) => None,
            (None, Some(st)) => match exit_code(&st) {
                Ok(c) => Some(c),
                Err(msg) if msg.contains("executable file not found") || msg.contains("no such file") => {
                    return Err(Error::InvalidSpec(format!(
                        "--backend {NAME}: the image has no `sh`, which runs every command in a Kubernetes sandbox ({msg})"
                    )))
                }
                Err(msg) => return Err(backend_error(format!("exec in pod {}: {msg}", self.sandbox.name()))),
            },
            (None, None) => {
                return Err(backend_error(format!(
                    "exec in pod {}: the connection ended without the command's exit status (did the sandbox end?)",
                    self.sandbox.name()
                )))
            }
        };
        Ok(outcome(&self, streams, code, duration))
    }
}

/// The outcome of a command whose output loop ended with `s` and whose
/// exit code is `code` (`None`: killed by nanoclaw).
fn outcome(x: &KubeExecution, s: Streams, code: Option<i32>, duration: Duration) -> Outcome {
    let (exit_code, signal) = match code {
        None => (None, Some(libc::SIGKILL)),
        // The runtime reports a signal as 128+N; SIGKILL is the one that
        // cannot be a plain exit in practice (the OOM killer's too).
        Some(c) if c == 128 + libc::SIGKILL => (None, Some(libc::SIGKILL)),
        Some(c) => (Some(c), None),
    };
    Outcome {
        exit_code,
        signal,
        killed_by: s.killed_by,
        stdout: s.stdout,
        stderr: s.stderr,
        stdout_truncated: s.truncated[0],
        stderr_truncated: s.truncated[1],
        duration,
        cpu_time: Duration::ZERO,
        peak_memory_bytes: None,
        sandbox_id: x.sandbox.info.id.clone(),
        layers: x.sandbox.info.layers.clone(),
        network: NetworkReport {
            mode: "networkpolicy".into(),
            ..NetworkReport::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_line_is_stripped_and_output_counted_after_it() {
        let mut s = Streams::default();
        assert!(s.take(0, b"12", 4, None));
        assert!(s.take(0, b"3\nab", 4, None));
        assert_eq!(s.pid, Some(123));
        assert!(!s.take(0, b"cde", 4, None));
        assert_eq!(s.stdout, b"abcd");
        assert!(s.truncated[0]);
    }

    #[test]
    fn the_wrapper_carries_env_workdir_and_stdin_length() {
        let mut spec = ExecSpec::new(["cat"]);
        spec.env.push(("A".into(), "b c".into()));
        spec.workdir = Some("/tmp".into());
        let a = argv(&spec, "5");
        assert_eq!(&a[3..], ["nanoclaw-exec", "1", "A=b c", "/tmp", "5", "cat"]);
        let a = argv(&ExecSpec::new(["true"]), "-");
        assert_eq!(&a[3..], ["nanoclaw-exec", "0", "", "-", "true"]);
    }
}
