//! Long-lived sandboxes: create once, exec many.
//!
//! [`create`] starts a sandbox whose init runs nothing of its own: it stays
//! up, idle, inside every namespace, the cgroup and the root, and serves
//! exec requests on its sync socket ([`super::child`]'s `serve`). [`exec`]
//! asks it to fork a command, which hardens itself exactly like a `run`
//! payload (seccomp, Landlock, no capabilities, `no_new_privs`, new
//! session, closed fds, the sandbox user, a clean environment) and gets
//! its own pipes, timeout, output limit and [`Outcome`]. A timeout kills
//! that command's process group, not the sandbox; what a command leaves
//! running in the background stays (it is the sandbox's, and counts
//! against its limits). [`remove`] ends the sandbox and everything in it.
//! [`pause`] freezes it until [`resume`]; [`status`] reads its usage.
//!
//! ```no_run
//! use nanoclaw_sandbox::native::session::{create, exec, remove, ExecSpec};
//! use nanoclaw_sandbox::SandboxSpec;
//! let mut sb = create(&SandboxSpec::new(Vec::<String>::new())).unwrap();
//! exec(&mut sb, &ExecSpec::new(["sh", "-c", "echo 42 > /tmp/x"])).unwrap();
//! let o = exec(&mut sb, &ExecSpec::new(["cat", "/tmp/x"])).unwrap();
//! assert_eq!(o.stdout, b"42\n");
//! remove(sb);
//! ```

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::proto::{self, Header};
use super::supervise::{self, StdinFeed, Stream};
use super::{cstr, sys, Sandbox};
use crate::outcome::{KillReason, Outcome};
use crate::spec::{SandboxSpec, Stdin, User, DEFAULT_OUTPUT_LIMIT, DEFAULT_TIMEOUT};
use crate::Error;

pub use super::pause::{
    freezer_dir, is_paused, pause, resume, status, thaw_orphan, LiveStatus, RunState,
};

/// How long a killed command may take to be reported gone before the
/// sandbox is considered broken.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output is still drained after the command has exited.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// What every exec into a sandbox starts from (from its [`SandboxSpec`]).
#[derive(Debug, Clone)]
pub(crate) struct ExecBase {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) workdir: PathBuf,
    pub(crate) user: User,
    pub(crate) next_id: u32,
}

/// One command to run in a long-lived sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecSpec {
    /// argv; `argv[0]` is looked up in the command's `PATH`.
    pub command: Vec<String>,
    /// Added to (and overriding) the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Working directory (default: the sandbox's).
    pub workdir: Option<PathBuf>,
    /// The user (default: the sandbox's).
    pub user: Option<User>,
    /// stdin.
    pub stdin: Stdin,
    /// Wall-clock limit of this command.
    pub timeout: Duration,
    /// Per-stream output limit of this command, in bytes.
    pub output_limit: u64,
}

impl ExecSpec {
    /// A command with the default timeout and output limit.
    pub fn new<I, S>(command: I) -> ExecSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecSpec {
            command: command.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            workdir: None,
            user: None,
            stdin: Stdin::Null,
            timeout: DEFAULT_TIMEOUT,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }
}

/// Sets each `(key, value)` in `env`, replacing an existing key.
pub(crate) fn merge_env<'a>(
    env: &mut Vec<(String, String)>,
    add: impl Iterator<Item = &'a (String, String)>,
) {
    for (k, v) in add {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
}

/// Starts a long-lived sandbox for `spec` (its `command` is ignored): it
/// stays up until [`remove`], its deadline (`spec.limits.timeout`, checked
/// at each [`exec`]), or the end of the process holding it.
pub fn create(spec: &SandboxSpec) -> Result<Sandbox, Error> {
    let mut spec = spec.clone();
    // Only for validation and the (unused) first command line.
    spec.command = vec!["/nonexistent/nanoclaw-idle".into()];
    super::start_with(&spec, super::RunOptions::default(), true)
}

/// Ends a sandbox and everything in it, and releases what it holds.
pub fn remove(sandbox: Sandbox) {
    supervise::abort(sandbox);
}

/// Runs one command in `sb` to completion.
pub fn exec(sb: &mut Sandbox, spec: &ExecSpec) -> Result<Outcome, Error> {
    let started = Instant::now();
    if sb.exec_base.is_none() {
        return Err(Error::InvalidSpec(
            "this sandbox was started for one command; exec needs one made with create".into(),
        ));
    }
    if sb.paused {
        return Err(Error::Paused { id: sb.id.clone() });
    }
    if started >= sb.started + sb.spec_limits.timeout {
        return Err(Error::InvalidSpec(format!(
            "sandbox {} is past its lifetime ({}s); create a new one",
            sb.id,
            sb.spec_limits.timeout.as_secs()
        )));
    }
    validate(spec)?;
    let (id, body) = request(sb, spec)?;
    let pipes = ExecPipes::new(&spec.stdin)?;
    let mut fds = vec![pipes.err.1, pipes.out.1, pipes.err_out.1];
    fds.extend(pipes.stdin.map(|(r, _)| r));
    let Some(lifeline) = sb.lifeline else {
        pipes.close_all();
        return Err(Error::InvalidSpec(format!("sandbox {} has ended", sb.id)));
    };
    let mut msg = Header {
        kind: proto::EXEC,
        id,
        len: body.len() as u32,
    }
    .encode()
    .to_vec();
    msg.extend_from_slice(&body);
    let sent = sys::send_with_fds(lifeline, &msg, &fds);
    pipes.close_child_ends();
    if let Err(e) = sent {
        pipes.close_parent_ends();
        return Err(Error::Sys {
            call: format!("sending the command to sandbox {}", sb.id),
            source: e,
        });
    }
    let run = Running::new(sb, id, spec, &pipes, started);
    let result = run.wait(sb, lifeline);
    pipes.close_parent_ends();
    result
}

fn validate(spec: &ExecSpec) -> Result<(), Error> {
    if spec
        .user
        .is_some_and(|u| u.uid == u32::MAX || u.gid == u32::MAX)
    {
        return Err(Error::InvalidSpec(
            "--user: 4294967295 (-1) is not a user or group id".into(),
        ));
    }
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(Error::InvalidSpec(
            "no command given: pass the command to run after the options".into(),
        ));
    }
    if spec.timeout.is_zero() || spec.output_limit == 0 {
        return Err(Error::InvalidSpec(
            "an exec's timeout and output limit must be greater than zero".into(),
        ));
    }
    if let Some(w) = &spec.workdir {
        if !w.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "--workdir {:?} must be an absolute path inside the sandbox",
                w.display()
            )));
        }
    }
    Ok(())
}

/// The exec id and the encoded request.
fn request(sb: &mut Sandbox, spec: &ExecSpec) -> Result<(u32, Vec<u8>), Error> {
    let base = sb
        .exec_base
        .as_mut()
        .ok_or_else(|| Error::InvalidSpec("exec needs a sandbox made with create".into()))?;
    let id = base.next_id;
    base.next_id = base.next_id.wrapping_add(1).max(1);
    let user = spec.user.unwrap_or(base.user);
    let mut env = base.env.clone();
    if spec.user.is_some() {
        merge_env(
            &mut env,
            [(
                "USER".to_string(),
                super::plan::user_name(user.uid).to_string(),
            )]
            .iter(),
        );
    }
    merge_env(&mut env, spec.env.iter());
    let argv = spec
        .command
        .iter()
        .map(|a| cstr(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') {
                return Err(Error::InvalidSpec(format!(
                    "invalid environment variable name {k:?}: use KEY=VALUE"
                )));
            }
            cstr(format!("{k}={v}"), "an environment variable")
        })
        .collect::<Result<Vec<CString>, _>>()?;
    let workdir = spec.workdir.as_ref().unwrap_or(&base.workdir);
    let workdir = cstr(workdir.as_os_str().as_bytes(), "workdir")?;
    let body = proto::exec_body(user.uid, user.gid, &argv, &envp, &workdir).ok_or_else(|| {
        Error::InvalidSpec(format!(
            "the command line and environment are too large (at most {} entries each and {} KiB in all)",
            proto::MAX_ARGS,
            proto::MAX_REQUEST / 1024
        ))
    })?;
    Ok((id, body))
}

/// The pipes of one exec: (read end, write end) each.
struct ExecPipes {
    err: (i32, i32),
    out: (i32, i32),
    err_out: (i32, i32),
    stdin: Option<(i32, i32)>,
}

impl ExecPipes {
    fn new(stdin: &Stdin) -> Result<ExecPipes, Error> {
        let mut made = Vec::new();
        let mut mk = || match sys::pipe() {
            Ok(p) => {
                made.push(p);
                Ok(p)
            }
            Err(e) => Err(e),
        };
        let r = (|| -> std::io::Result<ExecPipes> {
            Ok(ExecPipes {
                err: mk()?,
                out: mk()?,
                err_out: mk()?,
                stdin: match stdin {
                    Stdin::Null => None,
                    Stdin::Bytes(_) | Stdin::Inherit => Some(mk()?),
                },
            })
        })();
        r.map_err(|e| {
            for (a, b) in &made {
                sys::close(*a);
                sys::close(*b);
            }
            Error::Sys {
                call: "pipe2".into(),
                source: e,
            }
        })
    }

    fn close_child_ends(&self) {
        for fd in [self.err.1, self.out.1, self.err_out.1] {
            sys::close(fd);
        }
        if let Some((r, _)) = self.stdin {
            sys::close(r);
        }
    }

    fn close_parent_ends(&self) {
        for fd in [self.err.0, self.out.0, self.err_out.0] {
            sys::close(fd);
        }
    }

    fn close_all(&self) {
        self.close_child_ends();
        self.close_parent_ends();
        if let Some((_, w)) = self.stdin {
            sys::close(w);
        }
    }
}

/// One command being waited for.
struct Running {
    id: u32,
    /// argv[0], for messages.
    name: String,
    started: Instant,
    deadline: Instant,
    limit: u64,
    out: Stream,
    err: Stream,
    report_fd: i32,
    stdin: Option<StdinFeed>,
    killed_by: Option<KillReason>,
    kill_sent: Option<Instant>,
    status: Option<i32>,
    oom_before: u64,
    pids_before: u64,
}

impl Running {
    fn new(sb: &Sandbox, id: u32, spec: &ExecSpec, pipes: &ExecPipes, started: Instant) -> Running {
        let stdin = match (&spec.stdin, pipes.stdin) {
            (Stdin::Bytes(b), Some((_, w))) => Some(StdinFeed::bytes(w, b.clone())),
            (Stdin::Inherit, Some((_, w))) => Some(StdinFeed::forward(w, 0)),
            _ => None,
        };
        if let Some(f) = &stdin {
            let _ = sys::set_nonblocking(f.pipe);
        }
        for fd in [pipes.out.0, pipes.err_out.0, pipes.err.0] {
            let _ = sys::set_nonblocking(fd);
        }
        let ev = sb.cgroup.as_ref().map(|c| c.events()).unwrap_or_default();
        let sandbox_end = sb.started + sb.spec_limits.timeout;
        Running {
            id,
            name: spec.command[0].clone(),
            started,
            deadline: (started + spec.timeout).min(sandbox_end),
            limit: spec.output_limit,
            out: Stream::new(pipes.out.0, None),
            err: Stream::new(pipes.err_out.0, None),
            report_fd: pipes.err.0,
            stdin,
            killed_by: None,
            kill_sent: None,
            status: None,
            oom_before: ev.oom_kills,
            pids_before: ev.pids_max_hits,
        }
    }

    /// Asks init to kill this command's process group (once).
    fn kill(&mut self, lifeline: i32, why: KillReason) {
        self.killed_by.get_or_insert(why);
        if self.kill_sent.is_none() {
            self.kill_sent = Some(Instant::now());
            let mut msg = Header {
                kind: proto::KILL,
                id: self.id,
                len: 4,
            }
            .encode()
            .to_vec();
            msg.extend_from_slice(&libc::SIGKILL.to_le_bytes());
            let _ = sys::write_all(lifeline, &msg);
        }
    }

    /// Pumps output and stdin until the command is reported gone.
    fn wait(mut self, sb: &Sandbox, lifeline: i32) -> Result<Outcome, Error> {
        let mut scratch = vec![0u8; 64 * 1024];
        while self.status.is_none() {
            let now = Instant::now();
            if now >= self.deadline {
                self.kill(lifeline, KillReason::Timeout);
            }
            if self.kill_sent.is_some_and(|t| now >= t + KILL_GRACE) {
                return Err(Error::InvalidSpec(format!(
                    "sandbox {}: a killed command was not reported gone; remove the sandbox",
                    sb.id
                )));
            }
            let mut fds = vec![pollfd(lifeline, libc::POLLIN)];
            for s in [&self.out, &self.err] {
                if s.open {
                    fds.push(pollfd(s.fd, libc::POLLIN));
                }
            }
            if let Some(f) = &self.stdin {
                let (fd, ev) = f.poll_for();
                fds.push(pollfd(fd, ev));
            }
            let wake = if self.kill_sent.is_some() {
                now + Duration::from_millis(100)
            } else {
                self.deadline
            };
            let ms = wake
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 1000) as i32;
            // SAFETY: `fds` is a valid array of pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 && sys::errno() != libc::EINTR {
                return Err(Error::sys("poll"));
            }
            for p in fds.iter().filter(|p| p.revents != 0) {
                self.on_ready(p.fd, sb, lifeline, &mut scratch)?;
            }
        }
        self.drain(&mut scratch);
        Ok(self.outcome(sb))
    }

    fn on_ready(
        &mut self,
        fd: i32,
        sb: &Sandbox,
        lifeline: i32,
        scratch: &mut [u8],
    ) -> Result<(), Error> {
        if fd == lifeline {
            return self.on_message(sb, lifeline);
        }
        if fd == self.out.fd || fd == self.err.fd {
            let s = if fd == self.out.fd {
                &mut self.out
            } else {
                &mut self.err
            };
            if s.pump(self.limit, scratch) {
                self.kill(lifeline, KillReason::OutputLimit);
            }
            return Ok(());
        }
        if let Some(f) = &mut self.stdin {
            if fd == f.poll_for().0 && !f.pump(scratch) {
                sys::close(f.pipe);
                self.stdin = None;
            }
        }
        Ok(())
    }

    /// One reply from init.
    fn on_message(&mut self, sb: &Sandbox, lifeline: i32) -> Result<(), Error> {
        let mut hdr = [0u8; proto::HEADER + 4];
        let gone = || Error::InvalidSpec(format!("sandbox {} has ended", sb.id));
        match sys::read_full(lifeline, &mut hdr) {
            Ok(n) if n == hdr.len() => {}
            _ => return Err(gone()),
        }
        let mut h = [0u8; proto::HEADER];
        h.copy_from_slice(&hdr[..proto::HEADER]);
        let h = Header::decode(&h);
        let value = i32::from_le_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        if h.id != self.id {
            // A reply about an earlier exec (say, one whose wait failed).
            return Ok(());
        }
        match h.kind {
            proto::STARTED => Ok(()),
            proto::EXITED => {
                self.status = Some(value);
                Ok(())
            }
            proto::REFUSED => Err(Error::Sys {
                call: format!("starting the command in sandbox {}", sb.id),
                source: std::io::Error::from_raw_os_error(value),
            }),
            _ => Err(gone()),
        }
    }

    fn drain(&mut self, scratch: &mut [u8]) {
        if let Some(f) = self.stdin.take() {
            sys::close(f.pipe);
        }
        let until = Instant::now() + DRAIN_GRACE;
        while (self.out.open || self.err.open) && Instant::now() < until {
            let mut fds: Vec<libc::pollfd> = [&self.out, &self.err]
                .iter()
                .filter(|s| s.open)
                .map(|s| pollfd(s.fd, libc::POLLIN))
                .collect();
            // SAFETY: `fds` is a valid array of pollfd structs.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
            for s in [&mut self.out, &mut self.err] {
                if s.open && s.pump(self.limit, scratch) {
                    self.killed_by.get_or_insert(KillReason::OutputLimit);
                }
            }
        }
    }

    fn outcome(mut self, sb: &Sandbox) -> Outcome {
        let status = self.status.unwrap_or(libc::SIGKILL);
        let mut report = [0u8; super::child::Report::SIZE];
        let got = sys::read_full(self.report_fd, &mut report).unwrap_or(0);
        let failed = super::child::Report::decode(&report[..got]);
        let (mut exit_code, mut signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else {
            (None, Some(libc::WTERMSIG(status)))
        };
        if let Some(r) = failed {
            let (code, msg) = super::exec_failure(&r, &self.name);
            exit_code = Some(code);
            signal = None;
            self.err.buf.extend_from_slice(msg.as_bytes());
        }
        if let Some(cg) = &sb.cgroup {
            let ev = cg.events();
            if self.killed_by.is_none() && ev.oom_kills > self.oom_before {
                self.killed_by = Some(KillReason::Oom);
            } else if self.killed_by.is_none() && ev.pids_max_hits > self.pids_before {
                self.killed_by = Some(KillReason::Pids);
            }
        }
        Outcome {
            exit_code,
            signal,
            killed_by: self.killed_by,
            stdout: std::mem::take(&mut self.out.buf),
            stderr: std::mem::take(&mut self.err.buf),
            stdout_truncated: self.out.truncated,
            stderr_truncated: self.err.truncated,
            duration: self.started.elapsed(),
            cpu_time: Duration::ZERO,
            peak_memory_bytes: None,
            sandbox_id: sb.id.clone(),
            layers: sb.layers.clone(),
            network: supervise::network_report(sb),
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Most bytes one file copy moves (either way). Copies are held in memory
/// whole for now (streaming is to come), so this stays small.
pub const MAX_COPY: u64 = 64 << 20;
/// How long a copy may take: a planted FIFO (or a device) at the path must
/// not hold the sandbox's holder for long.
const COPY_TIMEOUT: Duration = Duration::from_secs(20);

/// A file operation failed inside the sandbox (the message is the
/// sandboxed tool's own, e.g. "No such file or directory").
fn copy_error(sb: &Sandbox, what: &str, o: &Outcome) -> Error {
    let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
    let why = if why.is_empty() {
        format!("exit {:?}", o.exit_code)
    } else {
        why
    };
    Error::InvalidSpec(format!("sandbox {}: {what}: {why}", sb.id))
}

/// A copy runs as an exec: inside the sandbox, as its user (or `user`),
/// with every restriction of a command. Paths therefore resolve in the
/// sandbox's own mount namespace and root — a symlink, swapped in at any
/// moment, can only ever lead to another place inside the sandbox — and
/// writes land only where the sandbox may write, within its size limits.
fn copy_exec(
    sb: &mut Sandbox,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    user: Option<User>,
) -> Result<Outcome, Error> {
    let mut spec = ExecSpec::new(argv);
    spec.stdin = stdin.map_or(Stdin::Null, Stdin::Bytes);
    spec.user = user;
    spec.output_limit = MAX_COPY;
    spec.timeout = COPY_TIMEOUT;
    exec(sb, &spec)
}

fn check_path(p: &str) -> Result<(), Error> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(Error::InvalidSpec(format!(
            "{p:?}: a path inside the sandbox must be absolute"
        )));
    }
    Ok(())
}

/// Writes `data` to the file `path` in the sandbox (parents created).
pub fn put_file(
    sb: &mut Sandbox,
    path: &str,
    data: Vec<u8>,
    user: Option<User>,
) -> Result<(), Error> {
    check_path(path)?;
    if data.len() as u64 > MAX_COPY {
        return Err(Error::InvalidSpec(format!(
            "{} bytes for {path}: one copy moves at most {} MiB",
            data.len(),
            MAX_COPY >> 20
        )));
    }
    // Never over anything but a regular file (a FIFO would block the copy;
    // one swapped in after the check is ended by COPY_TIMEOUT).
    let script = r#"mkdir -p -- "$(dirname -- "$1")" && { test ! -e "$1" || test -f "$1" || { echo "$1: not a regular file" >&2; exit 1; }; } && cat > "$1""#;
    let argv = ["sh", "-c", script, "nanoclaw-cp", path].map(String::from);
    let o = copy_exec(sb, argv.to_vec(), Some(data), user)?;
    if o.exit_code != Some(0) {
        return Err(copy_error(sb, &format!("writing {path}"), &o));
    }
    Ok(())
}

/// Reads the file `path` in the sandbox.
pub fn get_file(sb: &mut Sandbox, path: &str) -> Result<Vec<u8>, Error> {
    check_path(path)?;
    let argv = [
        "sh",
        "-c",
        r#"test -f "$1" && exec cat -- "$1"; echo "$1: not a regular file" >&2; exit 1"#,
        "nanoclaw-cp",
        path,
    ];
    let o = copy_exec(sb, argv.map(String::from).to_vec(), None, None)?;
    if o.exit_code != Some(0) || o.stdout_truncated {
        return Err(copy_error(sb, &format!("reading {path}"), &o));
    }
    Ok(o.stdout)
}

/// Unpacks the tar stream `tar` into the directory `dir` in the sandbox
/// (created if missing), with the sandbox's `tar`.
pub fn put_tar(sb: &mut Sandbox, dir: &str, tar: Vec<u8>, user: Option<User>) -> Result<(), Error> {
    check_path(dir)?;
    let script = r#"mkdir -p -- "$1" && exec tar -x -f - -C "$1" --no-same-owner"#;
    let argv = ["sh", "-c", script, "nanoclaw-cp", dir].map(String::from);
    let o = copy_exec(sb, argv.to_vec(), Some(tar), user)?;
    if o.exit_code != Some(0) {
        return Err(copy_error(sb, &format!("unpacking into {dir}"), &o));
    }
    Ok(())
}

/// The directory `dir` in the sandbox as a tar stream.
pub fn get_tar(sb: &mut Sandbox, dir: &str) -> Result<Vec<u8>, Error> {
    check_path(dir)?;
    let argv = ["tar", "-c", "-f", "-", "-C", dir, "."].map(String::from);
    let o = copy_exec(sb, argv.to_vec(), None, None)?;
    if o.exit_code != Some(0) || o.stdout_truncated {
        return Err(copy_error(sb, &format!("packing {dir}"), &o));
    }
    Ok(o.stdout)
}
