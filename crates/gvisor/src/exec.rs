//! One command in a live gVisor sandbox: `runsc exec --process FILE`, its
//! stdio on pipes nanoclaw reads, its timeout and output limit enforced
//! here (runsc has neither), the whole process group it started killed
//! when one fires, and runsc's own failures (command not found, a paused
//! or dead sandbox) turned into the engine's outcome or error.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanoclaw_sandbox::backend::{Echo, ExecControl, Execution};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::{Error, KillReason, Outcome};

use crate::bundle;
use crate::cgroup;
use crate::runsc::backend_error;
use crate::sandbox::Shared;

/// How long a killed command's runsc may take to report before it is
/// killed itself.
const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// What runsc prints when it could not start the command (before the
/// command ran, so nothing else is on stderr).
const START_FAILED: [&str; 3] = [
    "executing processes for container: ",
    "running container: ",
    "loading sandbox: ",
];

/// A started command.
pub struct RunscExecution {
    id: u32,
    child: Option<Child>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdin: Option<std::thread::JoinHandle<()>>,
    /// The command's stdin pipe when started with [`Stdin::Open`], for its
    /// control handle.
    open_stdin: Arc<Mutex<Option<ChildStdin>>>,
    /// Set once the command was waited for (signals then do nothing).
    ended: Arc<AtomicBool>,
    spec: ExecSpec,
    uid: u32,
    gid: u32,
    started: Instant,
    /// Where runsc writes the command's pid inside the sandbox.
    pid_file: PathBuf,
    /// The process description runsc reads.
    process_file: PathBuf,
    cpu_before: Option<u64>,
    shared: Arc<Shared>,
    /// The command is the sandbox's init (`runsc run`, a one-shot run):
    /// killing it ends the sandbox.
    one_shot: bool,
}

/// Starts `spec` in the sandbox `shared` describes.
pub fn spawn(shared: &Arc<Shared>, spec: &ExecSpec) -> Result<RunscExecution, Error> {
    shared.alive()?;
    if spec.command.is_empty() {
        return Err(Error::InvalidSpec("the command is empty".into()));
    }
    let sb = &shared.record.spec;
    let user = spec.user.unwrap_or(sb.user);
    let cwd = spec
        .workdir
        .clone()
        .unwrap_or_else(|| bundle::default_workdir(sb));
    let env = bundle::environment(sb, user.uid, &spec.env);
    let caps = bundle::oci_caps(&sb.hardening.cap_add)?;
    let process = bundle::process(&spec.command, env, &cwd, user.uid, user.gid, &caps);
    let id = shared.next_exec.fetch_add(1, Ordering::SeqCst);
    let stem = format!("exec-{}-{id}", std::process::id());
    let process_file = shared.bundle.join(format!("{stem}.json"));
    let pid_file = shared.bundle.join(format!("{stem}.pid"));
    let text = serde_json::to_vec(&process).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    std::fs::write(&process_file, text).map_err(|source| Error::Sys {
        call: format!("write {}", process_file.display()),
        source,
    })?;
    let mut cmd = shared.runsc.command();
    cmd.arg("exec")
        .arg(format!("--process={}", process_file.display()))
        .arg(format!("--internal-pid-file={}", pid_file.display()))
        .arg(&shared.id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.stdin(match spec.stdin {
        Stdin::Null => Stdio::null(),
        Stdin::Inherit => Stdio::inherit(),
        Stdin::Bytes(_) | Stdin::Open => Stdio::piped(),
    });
    let cpu_before = cgroup::cpu_ns(&shared.id, shared.runsc.rootless);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| {
        let _ = std::fs::remove_file(&process_file);
        Error::Sys {
            call: format!("running {} exec", shared.runsc.exe.display()),
            source,
        }
    })?;
    let mut open_stdin = None;
    let stdin = match (&spec.stdin, child.stdin.take()) {
        (Stdin::Bytes(b), Some(mut w)) => {
            let b = b.clone();
            Some(std::thread::spawn(move || {
                let _ = w.write_all(&b);
            }))
        }
        (Stdin::Open, w) => {
            open_stdin = w;
            None
        }
        _ => None,
    };
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    shared.running.fetch_add(1, Ordering::SeqCst);
    Ok(RunscExecution {
        id,
        child: Some(child),
        stdout,
        stderr,
        stdin,
        open_stdin: Arc::new(Mutex::new(open_stdin)),
        ended: Arc::new(AtomicBool::new(false)),
        spec: spec.clone(),
        uid: user.uid,
        gid: user.gid,
        started,
        pid_file,
        process_file,
        cpu_before,
        shared: shared.clone(),
        one_shot: false,
    })
}

/// The execution of a one-shot run: `runner` (`runsc run`) runs `spec` as
/// the init of the sandbox `shared` describes.
pub fn one_shot(
    shared: &Arc<Shared>,
    mut runner: Child,
    spec: &ExecSpec,
    started: Instant,
) -> RunscExecution {
    let stdin = match (&spec.stdin, runner.stdin.take()) {
        (Stdin::Bytes(b), Some(mut w)) => {
            let b = b.clone();
            Some(std::thread::spawn(move || {
                let _ = w.write_all(&b);
            }))
        }
        _ => None,
    };
    let stdout = runner.stdout.take().map(OwnedFd::from);
    let stderr = runner.stderr.take().map(OwnedFd::from);
    shared.running.fetch_add(1, Ordering::SeqCst);
    RunscExecution {
        id: 1,
        child: Some(runner),
        stdout,
        stderr,
        stdin,
        open_stdin: Arc::new(Mutex::new(None)),
        ended: Arc::new(AtomicBool::new(false)),
        spec: spec.clone(),
        uid: 0,
        gid: 0,
        started,
        pid_file: shared.bundle.join("none.pid"),
        process_file: shared.bundle.join("none.json"),
        cpu_before: None,
        shared: shared.clone(),
        one_shot: true,
    }
}

/// One output stream being read.
struct Stream {
    fd: Option<OwnedFd>,
    kept: Vec<u8>,
    seen: u64,
    truncated: bool,
    echo: Option<i32>,
}

impl Stream {
    fn new(fd: Option<OwnedFd>, echo: Option<i32>) -> Stream {
        Stream {
            fd,
            kept: Vec::new(),
            seen: 0,
            truncated: false,
            echo,
        }
    }

    /// Reads what is there; `true` when over `limit` (the rest dropped).
    fn read(&mut self, limit: u64) -> bool {
        let Some(fd) = &self.fd else { return false };
        let mut buf = [0u8; 65536];
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes and
        // `fd` is an open pipe this struct owns.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            self.fd = None;
            return false;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                self.fd = None;
            }
            return false;
        }
        let n = n as usize;
        let room = limit.saturating_sub(self.seen) as usize;
        let take = n.min(room);
        self.seen += n as u64;
        match self.echo {
            Some(e) => {
                let mut off = 0;
                while off < take {
                    // SAFETY: `buf[off..take]` is initialised; `e` is the
                    // caller's open descriptor, borrowed for this call.
                    let w = unsafe { libc::write(e, buf[off..].as_ptr().cast(), take - off) };
                    if w <= 0 {
                        break;
                    }
                    off += w as usize;
                }
            }
            None => self.kept.extend_from_slice(&buf[..take]),
        }
        if take < n {
            self.truncated = true;
        }
        self.truncated
    }
}

impl RunscExecution {
    /// Kills the command and every process of its group inside the
    /// sandbox: the group with the sandbox's own `kill` (run as the
    /// command's user), then its leader through runsc.
    fn kill_tree(&mut self) {
        if self.one_shot {
            // The command is the init: gVisor ends the sandbox with it.
            let _ = self.shared.runsc.run(&["kill", &self.shared.id, "KILL"]);
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                break Some(p);
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(pid) = pid {
            signal_group(&self.shared, pid, (self.uid, self.gid), libc::SIGKILL);
        }
    }

    fn finish_files(&self) {
        let _ = std::fs::remove_file(&self.process_file);
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// Reads until the command's end, enforcing its timeout and output
    /// limit; the streams and why it was killed, if it was.
    fn pump(&mut self, echo: Option<Echo<'_>>) -> (Stream, Stream, Option<KillReason>) {
        let (eo, ee) = match echo {
            Some(e) => (Some(e.stdout.as_raw_fd()), Some(e.stderr.as_raw_fd())),
            None => (None, None),
        };
        let mut out = Stream::new(self.stdout.take(), eo);
        let mut err = Stream::new(self.stderr.take(), ee);
        let left = self.shared.time_left();
        let timeout = self.spec.timeout.min(left);
        let lifetime_ends_first = left < self.spec.timeout;
        let deadline = self.started + timeout;
        let mut killed: Option<KillReason> = None;
        let mut kill_deadline: Option<Instant> = None;
        let mut exited_at: Option<Instant> = None;
        loop {
            if out.fd.is_none() && err.fd.is_none() {
                break;
            }
            let now = Instant::now();
            if killed.is_none() && now >= deadline {
                killed = Some(if lifetime_ends_first {
                    KillReason::Killed
                } else {
                    KillReason::Timeout
                });
                self.kill_tree();
                kill_deadline = Some(Instant::now() + KILL_PATIENCE);
            }
            if let Some(k) = kill_deadline {
                if Instant::now() >= k {
                    if let Some(c) = self.child.as_mut() {
                        let _ = c.kill();
                    }
                    break;
                }
            }
            // The command is gone but something it started still holds
            // its output open: take what is there and stop.
            if exited_at.is_none() {
                if let Some(c) = self.child.as_mut() {
                    if c.try_wait().ok().flatten().is_some() {
                        exited_at = Some(Instant::now());
                    }
                }
            }
            if exited_at.is_some_and(|t| t.elapsed() > Duration::from_millis(100)) {
                break;
            }
            let mut fds: Vec<libc::pollfd> = [&out, &err]
                .iter()
                .filter_map(|s| s.fd.as_ref())
                .map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let wait = if killed.is_some() {
                Duration::from_millis(50)
            } else {
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait.as_millis() as i32,
                )
            };
            if n <= 0 {
                continue;
            }
            for p in fds {
                if p.revents == 0 {
                    continue;
                }
                let s = if out.fd.as_ref().is_some_and(|f| f.as_raw_fd() == p.fd) {
                    &mut out
                } else {
                    &mut err
                };
                if s.read(self.spec.output_limit) && killed.is_none() {
                    killed = Some(KillReason::OutputLimit);
                    self.kill_tree();
                    kill_deadline = Some(Instant::now() + KILL_PATIENCE);
                }
            }
        }
        (out, err, killed)
    }
}

/// The command's exit code and signal from runsc's exit status (runsc
/// exits 128+N when the command died of signal N, as `docker exec` does;
/// a command that exits 128+N itself looks the same).
fn status_parts(code: Option<i32>, killed: Option<KillReason>) -> (Option<i32>, Option<i32>) {
    match (code, killed) {
        (_, Some(_)) => (None, Some(libc::SIGKILL)),
        (Some(c), None) => (Some(c), None),
        (None, None) => (None, Some(libc::SIGKILL)),
    }
}

impl Execution for RunscExecution {
    fn id(&self) -> u32 {
        self.id
    }

    fn control(&self) -> Option<Box<dyn ExecControl>> {
        Some(Box::new(RunscControl {
            shared: self.shared.clone(),
            pid_file: self.pid_file.clone(),
            owner: (self.uid, self.gid),
            stdin: self.open_stdin.clone(),
            ended: self.ended.clone(),
            one_shot: self.one_shot,
        }))
    }

    fn wait(mut self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        let (out, mut err, mut killed) = self.pump(echo);
        let status = self.child.take().map(|mut c| c.wait());
        self.ended.store(true, Ordering::SeqCst);
        self.open_stdin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = self.stdin.take() {
            let _ = t.join();
        }
        self.finish_files();
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        let duration = self.started.elapsed();
        let code = match status {
            Some(Ok(s)) => s.code(),
            Some(Err(e)) => {
                return Err(Error::Sys {
                    call: "waiting for runsc exec".into(),
                    source: e,
                })
            }
            None => None,
        };
        let shared = self.shared.clone();
        if code == Some(128) && killed.is_none() && out.kept.is_empty() {
            let text = String::from_utf8_lossy(&err.kept).into_owned();
            if let Some(why) = START_FAILED.iter().find_map(|p| text.strip_prefix(p)) {
                return start_failure(&shared, &self.spec, why.trim(), duration);
            }
        }
        // The sandbox itself ended under the command: a limit of the
        // whole sandbox fired (gVisor's sentry is what the host's OOM
        // killer or pids limit stops), or its lifetime ended.
        if killed.is_none() && code == Some(128) {
            let text = String::from_utf8_lossy(&err.kept).into_owned();
            if let Some(at) = text.find("waiting on pid ") {
                err.kept.truncate(at);
                killed = Some(shared.death_reason());
            }
        }
        // A one-shot run's sandbox ends with its command, whatever ended it.
        if killed.is_none() && self.one_shot && code != Some(0) {
            if cgroup::oom_kills(&shared.id) > 0 {
                killed = Some(KillReason::Oom);
            } else if cgroup::pids_refused(&shared.id) > 0 {
                killed = Some(KillReason::Pids);
            }
        }
        let (exit_code, signal) = status_parts(code, killed);
        let cpu_after = cgroup::cpu_ns(&shared.id, shared.runsc.rootless);
        let cpu = match (self.cpu_before, cpu_after) {
            (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
            _ => Duration::ZERO,
        };
        let o = Outcome {
            exit_code,
            signal,
            killed_by: killed,
            stdout: out.kept,
            stderr: err.kept,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            duration,
            cpu_time: cpu,
            peak_memory_bytes: cgroup::peak_memory(&shared.id, shared.runsc.rootless),
            sandbox_id: shared.id.clone(),
            layers: shared.record.layers.clone(),
            network: shared.network_report(),
        };
        Ok(o)
    }
}

/// Sends `signal` to the process group of `pid` (a pid inside the
/// sandbox) with the sandbox's own `kill`, run as `owner` (the command's
/// uid and gid), then to `pid` itself through runsc (which reaches it
/// even when it left its group).
fn signal_group(shared: &Shared, pid: i32, owner: (u32, u32), signal: i32) {
    let sig = signal_name(signal);
    let _ = shared
        .runsc
        .command()
        .args([
            "exec",
            &format!("--user={}:{}", owner.0, owner.1),
            &shared.id,
        ])
        .args([
            "sh",
            "-c",
            "kill -s \"$1\" -- -\"$0\" 2>/dev/null",
            &pid.to_string(),
            &sig,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = shared
        .runsc
        .run(&["kill", &format!("--pid={pid}"), &shared.id, &sig]);
}

/// The name `kill -s` and `runsc kill` take for `signal`.
fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "KILL".into(),
        libc::SIGTERM => "TERM".into(),
        libc::SIGINT => "INT".into(),
        libc::SIGHUP => "HUP".into(),
        libc::SIGQUIT => "QUIT".into(),
        other => other.to_string(),
    }
}

/// The pid runsc wrote to `pid_file` for a command, waiting up to 2 s
/// for it (runsc writes it once the command started).
fn command_pid(pid_file: &Path, ended: &AtomicBool) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(p) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            return Some(p);
        }
        if ended.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running command's stdin and signals ([`Execution::control`]).
struct RunscControl {
    shared: Arc<Shared>,
    pid_file: PathBuf,
    owner: (u32, u32),
    stdin: Arc<Mutex<Option<ChildStdin>>>,
    ended: Arc<AtomicBool>,
    one_shot: bool,
}

impl ExecControl for RunscControl {
    fn write_stdin(&self, data: &[u8]) -> Result<(), Error> {
        let mut g = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let w = g.as_mut().ok_or_else(|| {
            Error::InvalidSpec(
                "the command has no open stdin (it was closed, or never open)".into(),
            )
        })?;
        w.write_all(data).map_err(|source| Error::Sys {
            call: "writing to the command's stdin".into(),
            source,
        })
    }

    fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn signal(&self, signal: i32) -> Result<(), Error> {
        if self.ended.load(Ordering::SeqCst) {
            return Ok(());
        }
        if self.one_shot {
            let _ = self
                .shared
                .runsc
                .run(&["kill", &self.shared.id, &signal_name(signal)]);
            return Ok(());
        }
        if let Some(pid) = command_pid(&self.pid_file, &self.ended) {
            signal_group(&self.shared, pid, self.owner, signal);
        }
        Ok(())
    }
}

/// runsc could not start the command: `why` is its message.
fn start_failure(
    shared: &Shared,
    spec: &ExecSpec,
    why: &str,
    duration: Duration,
) -> Result<Outcome, Error> {
    let cmd = &spec.command[0];
    let (code, msg) = if why.contains("error finding executable")
        || why.contains("no such file or directory") && why.contains("failed to load")
    {
        (127, format!("nanoclaw: {cmd}: command not found\n"))
    } else if why.contains("failed to load") && why.contains("permission denied") {
        (
            126,
            format!("nanoclaw: {cmd}: permission denied (not executable)\n"),
        )
    } else if why.contains("in state paused") {
        return Err(Error::Paused {
            id: shared.id.clone(),
        });
    } else if why.contains("in state stopped")
        || why.contains("connection refused")
        || why.contains(".state: no such file")
    {
        return Err(Error::NotFound {
            id: shared.id.clone(),
            what: format!("the sandbox has ended ({})", shared.death_reason_text()),
        });
    } else if sandbox_ended(shared) {
        // The sandbox died just before (a limit of the whole sandbox fired
        // under an earlier command): runsc, tearing its state down, says
        // whatever it hit first ("file does not exist", …).
        return Err(Error::NotFound {
            id: shared.id.clone(),
            what: format!("the sandbox has ended ({})", shared.death_reason_text()),
        });
    } else if why.contains("initial working directory") {
        return Err(Error::InvalidSpec(format!(
            "sandbox {}: the working directory does not exist in the sandbox: {why}",
            shared.id
        )));
    } else {
        return Err(backend_error(format!(
            "sandbox {}: runsc exec: {why}",
            shared.id
        )));
    };
    let o = Outcome {
        exit_code: Some(code),
        signal: None,
        killed_by: None,
        stdout: Vec::new(),
        stderr: msg.into_bytes(),
        stdout_truncated: false,
        stderr_truncated: false,
        duration,
        cpu_time: Duration::ZERO,
        peak_memory_bytes: None,
        sandbox_id: shared.id.clone(),
        layers: shared.record.layers.clone(),
        network: shared.network_report(),
    };
    Ok(o)
}

impl Drop for RunscExecution {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Never waited for: the command is killed, runsc reaped.
            self.kill_tree();
            if let Some(c) = self.child.take() {
                crate::sandbox::reap_by(c, Instant::now() + KILL_PATIENCE);
            }
            if let Some(t) = self.stdin.take() {
                let _ = t.join();
            }
            self.finish_files();
            self.shared.running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Whether runsc no longer runs the sandbox (no state, or stopped), or
/// its memory limit fired (gVisor then ends the whole sandbox; runsc may
/// still be tearing it down).
fn sandbox_ended(shared: &Shared) -> bool {
    cgroup::oom_kills(&shared.id) > 0
        || !matches!(
            shared.runsc.state(&shared.id),
            Some(s) if matches!(s.status.as_str(), "running" | "paused" | "created")
        )
}
