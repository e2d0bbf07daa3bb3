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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
pub use super::stop::{children_of_init, signal_all, stop, wait_until_empty};

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

/// A command started in a sandbox by [`spawn`], not yet waited for: its
/// exec id and the caller's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    /// The exec id (init's replies and [`kill_frame`]s name it).
    pub id: u32,
    /// The command's stdout.
    pub stdout: OwnedFd,
    /// The command's stderr.
    pub stderr: OwnedFd,
    /// Where the command reports a failure to start (a [`child`] report),
    /// read after it exited.
    pub report: OwnedFd,
    /// The command's stdin, when asked for.
    pub stdin: Option<OwnedFd>,
}

/// Runs one command in `sb` to completion.
pub fn exec(sb: &mut Sandbox, spec: &ExecSpec) -> Result<Outcome, Error> {
    exec_echo(sb, spec, None)
}

/// [`exec`]; `echo` = (stdout, stderr) descriptors to copy the command's
/// output to as it comes, instead of keeping it in the outcome.
pub fn exec_echo(
    sb: &mut Sandbox,
    spec: &ExecSpec,
    echo: Option<(i32, i32)>,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let spawned = spawn(sb, spec, !matches!(spec.stdin, Stdin::Null))?;
    let ev = cgroup_events(sb);
    wait_spawned(sb, spawned, spec, started, ev, echo)
}

/// The sandbox's cgroup event counters now (zero without a cgroup): read
/// when a command starts, to tell what its own run caused.
pub(crate) fn cgroup_events(sb: &Sandbox) -> super::cgroup::CgroupEvents {
    sb.cgroup.as_ref().map(|c| c.events()).unwrap_or_default()
}

/// Waits for a command [`spawn`]ed at `started` (when the cgroup's counters
/// were `ev`) and returns its outcome, as [`exec_echo`] does.
pub(crate) fn wait_spawned(
    sb: &Sandbox,
    spawned: Spawned,
    spec: &ExecSpec,
    started: Instant,
    ev: super::cgroup::CgroupEvents,
    echo: Option<(i32, i32)>,
) -> Result<Outcome, Error> {
    let lifeline = sb
        .lifeline
        .ok_or_else(|| Error::InvalidSpec(format!("sandbox {} has ended", sb.id)))?;
    let deadline = (started + spec.timeout).min(sb.started + sb.spec_limits.timeout);
    let waiter = Waiter::new(spawned, spec, deadline, started, echo);
    let finished = waiter.wait(lifeline, &sb.id)?;
    let mut outcome = finished.into_outcome(&spec.command[0], &sb.id);
    if let (Some(cg), None) = (&sb.cgroup, outcome.killed_by) {
        let after = cg.events();
        if after.oom_kills > ev.oom_kills {
            outcome.killed_by = Some(KillReason::Oom);
        } else if after.pids_max_hits > ev.pids_max_hits {
            outcome.killed_by = Some(KillReason::Pids);
        }
    }
    outcome.layers = sb.layers.clone();
    outcome.network = supervise::network_report(sb);
    Ok(outcome)
}

/// How many connections `sb`'s egress policy refused so far.
pub(crate) fn denied_count(sb: &Sandbox) -> u64 {
    supervise::denied_count(sb)
}

/// What `sb`'s egress proxy did so far; `None` without a proxy (network
/// `none`).
pub(crate) fn network_report(sb: &Sandbox) -> Option<crate::outcome::NetworkReport> {
    sb.proxy.as_ref().map(|_| supervise::network_report(sb))
}

/// `none`, `allowlist`, `open` or `kernel`: the network mode of `sb` now.
pub fn network_mode(sb: &Sandbox) -> &'static str {
    sb.net_mode
}

/// The egress policy `sb`'s proxy applies now; `None` without a proxy
/// (network `none` or `kernel`: nothing to update).
pub fn network_policy(sb: &Sandbox) -> Option<nanoclaw_net::NetworkPolicy> {
    sb.proxy.as_ref().map(|p| p.policy())
}

/// The credential rules `sb`'s proxy applies now, as `domain: Header,
/// ...` (names only: the values are secrets).
pub fn network_rules(sb: &Sandbox) -> Vec<String> {
    let Some(rules) = sb.proxy.as_ref().and_then(|p| p.rules()) else {
        return Vec::new();
    };
    rules
        .rules()
        .map(|r| {
            let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
            format!("{}: {}", r.domain, names.join(", "))
        })
        .collect()
}

/// Replaces the egress policy of a running sandbox: new connections and
/// its DNS answers follow `policy` at once, and open connections that no
/// rule of `policy` admits are closed. Only a sandbox created with a proxy
/// (network `allowlist` or `open`) has one to update; to `none` it goes by
/// `policy.mode` (everything refused, the proxy kept for a later update).
///
/// `rules`, when given, replace the credential rules too (`None` keeps
/// them). Rules can be changed or removed only for domains the sandbox's
/// interception CA was made for (its trust store was fixed at creation);
/// a refused update changes nothing.
pub fn set_network(
    sb: &mut Sandbox,
    policy: nanoclaw_net::NetworkPolicy,
    rules: Option<nanoclaw_net::HeaderRules>,
) -> Result<nanoclaw_net::PolicyUpdate, Error> {
    let Some(proxy) = sb.proxy.as_ref() else {
        let why = match sb.net_mode {
            "kernel" => "it was created with --network kernel, whose veth and host nftables rules are fixed at creation",
            _ => "it was created with no network (--network none, or E2B's allow_internet_access false): its network namespace has only loopback, with no redirect to nanoclaw's proxy and no DNS, and those are set up only when a sandbox is created (its keeper cannot enter the namespace to add them later)",
        };
        return Err(Error::Unsupported {
            what: format!("changing the network policy of sandbox {}", sb.id),
            why: why.into(),
            fix: "create the sandbox with --network allowlist (or open): its policy can then be replaced live, including with --network none".into(),
        });
    };
    let update = proxy
        .set_egress(policy.clone(), rules)
        .map_err(|e| Error::Unsupported {
            what: format!("changing the network rules of sandbox {}", sb.id),
            why: e.to_string(),
            fix: "leave the rules out to keep them, or give rules only for the domains the sandbox was created with".into(),
        })?;
    sb.net_mode = match policy.mode {
        nanoclaw_net::NetworkMode::None => "none",
        nanoclaw_net::NetworkMode::Allowlist => "allowlist",
        nanoclaw_net::NetworkMode::Open => "open",
    };
    Ok(update)
}

/// Starts one command in `sb` and returns at once with its pipes (with a
/// stdin pipe when `with_stdin`). Init's replies about it (`STARTED`,
/// `EXITED`, `REFUSED`) arrive on the sandbox's lifeline.
pub fn spawn(sb: &mut Sandbox, spec: &ExecSpec, with_stdin: bool) -> Result<Spawned, Error> {
    if sb.exec_base.is_none() {
        return Err(Error::InvalidSpec(
            "this sandbox was started for one command; exec needs one made with create".into(),
        ));
    }
    if sb.paused {
        return Err(Error::Paused { id: sb.id.clone() });
    }
    if Instant::now() >= sb.started + sb.spec_limits.timeout {
        return Err(Error::InvalidSpec(format!(
            "sandbox {} is past its lifetime ({}s); create a new one",
            sb.id,
            sb.spec_limits.timeout.as_secs()
        )));
    }
    validate(spec)?;
    let (id, body) = request(sb, spec)?;
    let Some(lifeline) = sb.lifeline else {
        return Err(Error::InvalidSpec(format!("sandbox {} has ended", sb.id)));
    };
    let pipes = ExecPipes::new(with_stdin)?;
    let mut fds = vec![pipes.err.1, pipes.out.1, pipes.err_out.1];
    fds.extend(pipes.stdin.map(|(r, _)| r));
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
    // SAFETY: each parent end is a pipe fd we created and own alone.
    let own = |fd: i32| unsafe { OwnedFd::from_raw_fd(fd) };
    let spawned = Spawned {
        id,
        stdout: own(pipes.out.0),
        stderr: own(pipes.err_out.0),
        report: own(pipes.err.0),
        stdin: pipes.stdin.map(|(_, w)| own(w)),
    };
    match sent {
        Ok(()) => Ok(spawned),
        Err(e) => Err(Error::Sys {
            call: format!("sending the command to sandbox {}", sb.id),
            source: e,
        }),
    }
}

/// The message asking for signal `sig` to exec `id`'s process group (to
/// init on the lifeline, or to a keeper on an attached connection).
pub fn kill_frame(id: u32, sig: i32) -> [u8; proto::FRAME] {
    proto::frame(proto::KILL, id, sig)
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
    fn new(with_stdin: bool) -> Result<ExecPipes, Error> {
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
                stdin: if with_stdin { Some(mk()?) } else { None },
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
}

/// What a waited-for command did (before it becomes an [`Outcome`]).
#[derive(Debug)]
pub struct Finished {
    /// Its wait status.
    pub status: i32,
    /// Why nanoclaw killed it, if it did.
    pub killed_by: Option<KillReason>,
    /// Its output (up to the limit).
    pub stdout: Vec<u8>,
    /// Its error output (up to the limit).
    pub stderr: Vec<u8>,
    /// Whether stdout went past the limit.
    pub stdout_truncated: bool,
    /// Whether stderr went past the limit.
    pub stderr_truncated: bool,
    /// From the request to the end.
    pub duration: Duration,
    /// Why it could not be started, if it could not.
    failed: Option<super::child::Report>,
}

impl Finished {
    /// The outcome (exit code and signal as `run` reports them; a start
    /// failure is exit 126/127 with a message on stderr).
    pub fn into_outcome(mut self, name: &str, sandbox_id: &str) -> Outcome {
        let status = self.status;
        let (mut exit_code, mut signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else {
            (None, Some(libc::WTERMSIG(status)))
        };
        if let Some(r) = &self.failed {
            let (code, msg) = super::exec_failure(r, name);
            exit_code = Some(code);
            signal = None;
            self.stderr.extend_from_slice(msg.as_bytes());
        }
        Outcome {
            exit_code,
            signal,
            killed_by: self.killed_by,
            stdout: self.stdout,
            stderr: self.stderr,
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            duration: self.duration,
            cpu_time: Duration::ZERO,
            peak_memory_bytes: None,
            sandbox_id: sandbox_id.to_string(),
            layers: crate::outcome::Layers::default(),
            network: Default::default(),
        }
    }
}

/// Waits for one [`Spawned`] command: pumps its output (kept up to the
/// output limit, or copied live to `echo`), feeds its stdin, enforces its
/// deadline and output limit by asking for a kill, and reads its end from
/// `events` — init's lifeline in-process, or a keeper connection, which
/// carry the same frames ([`proto::FRAME`]).
pub struct Waiter {
    id: u32,
    started: Instant,
    deadline: Instant,
    limit: u64,
    out: Stream,
    err: Stream,
    report: OwnedFd,
    _fds: [OwnedFd; 2],
    stdin: Option<(StdinFeed, OwnedFd)>,
    killed_by: Option<KillReason>,
    kill_sent: Option<Instant>,
    status: Option<i32>,
}

impl Waiter {
    /// A waiter for `sp` (run by `spec`, whose stdin it feeds), killed at
    /// `deadline`; `echo` = (stdout, stderr) descriptors to copy output to
    /// as it comes instead of keeping it.
    pub fn new(
        sp: Spawned,
        spec: &ExecSpec,
        deadline: Instant,
        started: Instant,
        echo: Option<(i32, i32)>,
    ) -> Waiter {
        let stdin = match (&spec.stdin, sp.stdin) {
            (Stdin::Bytes(b), Some(w)) => Some((StdinFeed::bytes(w.as_raw_fd(), b.clone()), w)),
            (Stdin::Inherit, Some(w)) => Some((StdinFeed::forward(w.as_raw_fd(), 0), w)),
            _ => None,
        };
        if let Some((f, _)) = &stdin {
            let _ = sys::set_nonblocking(f.pipe);
        }
        for fd in [&sp.stdout, &sp.stderr, &sp.report] {
            let _ = sys::set_nonblocking(fd.as_raw_fd());
        }
        Waiter {
            id: sp.id,
            started,
            deadline,
            limit: spec.output_limit,
            out: Stream::new(sp.stdout.as_raw_fd(), echo.map(|e| e.0)),
            err: Stream::new(sp.stderr.as_raw_fd(), echo.map(|e| e.1)),
            report: sp.report,
            _fds: [sp.stdout, sp.stderr],
            stdin,
            killed_by: None,
            kill_sent: None,
            status: None,
        }
    }

    /// Asks for this command's process group to be killed (once).
    fn kill(&mut self, events: i32, why: KillReason) {
        self.killed_by.get_or_insert(why);
        if self.kill_sent.is_none() {
            self.kill_sent = Some(Instant::now());
            let _ = sys::write_all(events, &kill_frame(self.id, libc::SIGKILL));
        }
    }

    /// Pumps output and stdin until the command is reported gone.
    pub fn wait(mut self, events: i32, sandbox_id: &str) -> Result<Finished, Error> {
        let mut scratch = vec![0u8; 64 * 1024];
        while self.status.is_none() {
            let now = Instant::now();
            if now >= self.deadline {
                self.kill(events, KillReason::Timeout);
            }
            if self.kill_sent.is_some_and(|t| now >= t + KILL_GRACE) {
                return Err(Error::InvalidSpec(format!(
                    "sandbox {sandbox_id}: a killed command was not reported gone; remove the sandbox"
                )));
            }
            let mut fds = vec![pollfd(events, libc::POLLIN)];
            for s in [&self.out, &self.err] {
                if s.open {
                    fds.push(pollfd(s.fd, libc::POLLIN));
                }
            }
            if let Some((f, _)) = &self.stdin {
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
                self.on_ready(p.fd, events, sandbox_id, &mut scratch)?;
            }
        }
        self.drain(&mut scratch);
        Ok(self.finish())
    }

    fn on_ready(
        &mut self,
        fd: i32,
        events: i32,
        sandbox_id: &str,
        scratch: &mut [u8],
    ) -> Result<(), Error> {
        if fd == events {
            return self.on_message(events, sandbox_id);
        }
        if fd == self.out.fd || fd == self.err.fd {
            let s = if fd == self.out.fd {
                &mut self.out
            } else {
                &mut self.err
            };
            if s.pump(self.limit, scratch) {
                self.kill(events, KillReason::OutputLimit);
            }
            return Ok(());
        }
        if let Some((f, _)) = &mut self.stdin {
            if fd == f.poll_for().0 && !f.pump(scratch) {
                self.stdin = None;
            }
        }
        Ok(())
    }

    /// One frame from init (or the keeper).
    fn on_message(&mut self, events: i32, sandbox_id: &str) -> Result<(), Error> {
        let mut buf = [0u8; proto::FRAME];
        let gone = || Error::InvalidSpec(format!("sandbox {sandbox_id} has ended"));
        match sys::read_full(events, &mut buf) {
            Ok(n) if n == buf.len() => {}
            _ => return Err(gone()),
        }
        let (h, value) = proto::decode_frame(&buf);
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
            proto::KILLED_BY => {
                if let Some(r) = proto::kill_reason(value) {
                    self.killed_by.get_or_insert(r);
                }
                Ok(())
            }
            // A keeper's note for the daemon's audit; the CLI reads the
            // network report itself.
            proto::EGRESS_DENIED => Ok(()),
            proto::REFUSED => Err(Error::Sys {
                call: format!("starting the command in sandbox {sandbox_id}"),
                source: std::io::Error::from_raw_os_error(value),
            }),
            _ => Err(gone()),
        }
    }

    fn drain(&mut self, scratch: &mut [u8]) {
        self.stdin = None;
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

    fn finish(mut self) -> Finished {
        let mut report = [0u8; super::child::Report::SIZE];
        let got = sys::read_full(self.report.as_raw_fd(), &mut report).unwrap_or(0);
        Finished {
            status: self.status.unwrap_or(libc::SIGKILL),
            killed_by: self.killed_by,
            stdout: std::mem::take(&mut self.out.buf),
            stderr: std::mem::take(&mut self.err.buf),
            stdout_truncated: self.out.truncated,
            stderr_truncated: self.err.truncated,
            duration: self.started.elapsed(),
            failed: super::child::Report::decode(&report[..got]),
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

/// Something that runs commands in one sandbox: the sandbox itself
/// (in-process, [`exec`]) or its keeper (`keeper::Remote`). The file
/// operations below work through either.
pub trait Execute {
    /// Runs one command to completion.
    fn execute(&mut self, spec: &ExecSpec) -> Result<Outcome, Error>;
    /// The sandbox's id, for messages.
    fn sandbox_id(&self) -> &str;
    /// What the sandbox's egress proxy did so far (counters and every
    /// refusal, cumulative), so that a caller can tell what one command
    /// did at the boundary; `None` when there is no proxy, or no way to
    /// ask.
    fn network_report(&mut self) -> Option<crate::outcome::NetworkReport> {
        None
    }
}

impl Execute for Sandbox {
    fn execute(&mut self, spec: &ExecSpec) -> Result<Outcome, Error> {
        exec(self, spec)
    }

    fn sandbox_id(&self) -> &str {
        &self.id
    }

    fn network_report(&mut self) -> Option<crate::outcome::NetworkReport> {
        network_report(self)
    }
}

/// A copy runs as an exec: inside the sandbox, as its user (or `user`),
/// with every restriction of a command. Paths therefore resolve in the
/// sandbox's own mount namespace and root — a symlink, swapped in at any
/// moment, can only ever lead to another place inside the sandbox — and
/// writes land only where the sandbox may write, within its size limits.
fn copy_exec<E: Execute + ?Sized>(
    sb: &mut E,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    user: Option<User>,
) -> Result<Outcome, Error> {
    let mut spec = ExecSpec::new(argv);
    spec.stdin = stdin.map_or(Stdin::Null, Stdin::Bytes);
    spec.user = user;
    spec.output_limit = MAX_COPY;
    spec.timeout = COPY_TIMEOUT;
    sb.execute(&spec)
}

/// A file operation failed inside the sandbox (the message is the
/// sandboxed tool's own, e.g. "No such file or directory").
fn copy_error<E: Execute + ?Sized>(sb: &E, what: &str, o: &Outcome) -> Error {
    let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
    let why = if why.is_empty() {
        format!("exit {:?}", o.exit_code)
    } else {
        why
    };
    if why.contains("No such file or directory") || why.contains("can't stat") {
        return Error::NotFound {
            id: sb.sandbox_id().to_string(),
            what: format!("{what}: {why}"),
        };
    }
    Error::InvalidSpec(format!("sandbox {}: {what}: {why}", sb.sandbox_id()))
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
pub fn put_file<E: Execute + ?Sized>(
    sb: &mut E,
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
pub fn get_file<E: Execute + ?Sized>(sb: &mut E, path: &str) -> Result<Vec<u8>, Error> {
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
pub fn put_tar<E: Execute + ?Sized>(
    sb: &mut E,
    dir: &str,
    tar: Vec<u8>,
    user: Option<User>,
) -> Result<(), Error> {
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
pub fn get_tar<E: Execute + ?Sized>(sb: &mut E, dir: &str) -> Result<Vec<u8>, Error> {
    check_path(dir)?;
    let argv = ["tar", "-c", "-f", "-", "-C", dir, "."].map(String::from);
    let o = copy_exec(sb, argv.to_vec(), None, None)?;
    if o.exit_code != Some(0) || o.stdout_truncated {
        return Err(copy_error(sb, &format!("packing {dir}"), &o));
    }
    Ok(o.stdout)
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else (FIFO, socket, device).
    Other,
}

/// What [`stat`] and [`list_dir`] report of one path in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryInfo {
    /// The last component of `path`.
    pub name: String,
    /// The absolute path in the sandbox.
    pub path: String,
    /// Its kind (of the entry itself: a symlink is not followed).
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Owner's name (or uid) in the sandbox.
    pub owner: String,
    /// Group's name (or gid) in the sandbox.
    pub group: String,
    /// Last modification, seconds since the epoch.
    pub modified: i64,
    /// Where a symlink points.
    pub symlink_target: Option<String>,
}

/// `stat -c` format of one entry: `%F|%s|%a|%U|%G|%Y|%n`.
const STAT_FORMAT: &str = "%F|%s|%a|%U|%G|%Y|%n";

fn parse_entry(line: &str) -> Option<EntryInfo> {
    let mut f = line.splitn(7, '|');
    let kind = match f.next()? {
        "regular file" | "regular empty file" => EntryKind::File,
        "directory" => EntryKind::Dir,
        "symbolic link" => EntryKind::Symlink,
        _ => EntryKind::Other,
    };
    let size = f.next()?.parse().ok()?;
    let mode = u32::from_str_radix(f.next()?, 8).ok()?;
    let owner = f.next()?.to_string();
    let group = f.next()?.to_string();
    let modified = f.next()?.parse().ok()?;
    let path = f.next()?.to_string();
    let name = path.rsplit('/').next().unwrap_or(&path).to_string();
    Some(EntryInfo {
        name,
        path,
        kind,
        size,
        mode,
        owner,
        group,
        modified,
        symlink_target: None,
    })
}

/// Runs a small shell script for a file operation; its stdout on success.
fn file_op<E: Execute + ?Sized>(
    sb: &mut E,
    what: &str,
    script: &str,
    args: &[&str],
    user: Option<User>,
) -> Result<Vec<u8>, Error> {
    for a in args {
        check_path(a)?;
    }
    let mut argv: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        script.into(),
        "nanoclaw-fs".into(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let o = copy_exec(sb, argv, None, user)?;
    if o.exit_code != Some(0) || o.stdout_truncated {
        return Err(copy_error(sb, what, &o));
    }
    Ok(o.stdout)
}

/// What is at `path` (a symlink itself, not its target).
pub fn stat<E: Execute + ?Sized>(sb: &mut E, path: &str) -> Result<EntryInfo, Error> {
    let script = format!(
        r#"stat -c '{STAT_FORMAT}' -- "$1" || exit 1; if [ -L "$1" ]; then readlink -- "$1"; fi"#
    );
    let out = file_op(sb, &format!("stat {path}"), &script, &[path], None)?;
    let text = String::from_utf8_lossy(&out);
    let mut lines = text.lines();
    let mut e = lines
        .next()
        .and_then(parse_entry)
        .ok_or_else(|| Error::InvalidSpec(format!("stat {path}: unreadable answer")))?;
    if e.kind == EntryKind::Symlink {
        e.symlink_target = lines.next().map(str::to_string);
    }
    Ok(e)
}

/// The entries under the directory `path`, `depth` levels deep (1: its
/// own entries). Names holding a newline are left out.
pub fn list_dir<E: Execute + ?Sized>(
    sb: &mut E,
    path: &str,
    depth: u32,
) -> Result<Vec<EntryInfo>, Error> {
    let depth = depth.clamp(1, 64).to_string();
    let script = format!(
        r#"test -d "$1" || {{ test -e "$1" && echo "$1: Not a directory" >&2 || echo "$1: No such file or directory" >&2; exit 1; }}; find "$1" -mindepth 1 -maxdepth "$2" -exec stat -c '{STAT_FORMAT}' -- {{}} +"#
    );
    let mut argv = vec![path];
    argv.push(&depth);
    // `depth` is not a path: check `path` only.
    check_path(path)?;
    let mut full: Vec<String> = vec!["sh".into(), "-c".into(), script, "nanoclaw-fs".into()];
    full.extend(argv.iter().map(|a| a.to_string()));
    let o = copy_exec(sb, full, None, None)?;
    if o.exit_code != Some(0) || o.stdout_truncated {
        return Err(copy_error(sb, &format!("listing {path}"), &o));
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(parse_entry)
        .collect())
}

/// Creates the directory `path` and its parents; false if it existed.
pub fn make_dir<E: Execute + ?Sized>(
    sb: &mut E,
    path: &str,
    user: Option<User>,
) -> Result<bool, Error> {
    let script = r#"if test -d "$1"; then echo exists; else mkdir -p -- "$1"; fi"#;
    let out = file_op(sb, &format!("creating {path}"), script, &[path], user)?;
    Ok(!out.starts_with(b"exists"))
}

/// Removes `path` (a directory with everything in it).
pub fn remove_path<E: Execute + ?Sized>(
    sb: &mut E,
    path: &str,
    user: Option<User>,
) -> Result<(), Error> {
    let script = r#"test -e "$1" || test -L "$1" || { echo "$1: No such file or directory" >&2; exit 1; }; rm -rf -- "$1""#;
    file_op(sb, &format!("removing {path}"), script, &[path], user).map(|_| ())
}

/// Moves `from` to `to` (parents of `to` created).
pub fn rename<E: Execute + ?Sized>(
    sb: &mut E,
    from: &str,
    to: &str,
    user: Option<User>,
) -> Result<EntryInfo, Error> {
    let script = format!(
        r#"test -e "$1" || test -L "$1" || {{ echo "$1: No such file or directory" >&2; exit 1; }}; mkdir -p -- "$(dirname -- "$2")" && mv -T -- "$1" "$2" && stat -c '{STAT_FORMAT}' -- "$2""#
    );
    let out = file_op(sb, &format!("moving {from}"), &script, &[from, to], user)?;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .and_then(parse_entry)
        .ok_or_else(|| Error::InvalidSpec(format!("moving {from}: unreadable answer")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_lines_parse() {
        let e = parse_entry("regular file|12|644|user|user|1700000000|/tmp/a|b").unwrap();
        assert_eq!(e.kind, EntryKind::File);
        assert_eq!(e.size, 12);
        assert_eq!(e.mode, 0o644);
        assert_eq!(e.path, "/tmp/a|b");
        assert_eq!(e.name, "a|b");
        assert_eq!(
            parse_entry("directory|0|755|root|root|1|/").unwrap().kind,
            EntryKind::Dir
        );
        assert!(parse_entry("garbage").is_none());
    }
}
