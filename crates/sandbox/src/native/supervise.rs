//! The runner's side of a running sandbox: output, deadline, limits, reaping
//! and cleanup.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::child::{Report, STATUS_REPORT_LEN};
use super::{sys, Sandbox};
use crate::outcome::{KillReason, Outcome};
use crate::Error;

/// How often cgroup event counters are read while a sandbox runs.
const EVENT_POLL: Duration = Duration::from_millis(20);
/// How long output is still drained after init has exited.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

const KILL_NONE: u8 = 0;
const KILL_REQUESTED: u8 = 1;
/// Init has been (or is being) reaped: its pid may belong to someone else.
const KILL_REAPED: u8 = 2;

/// What a sandbox and its kill handles share.
#[derive(Debug)]
pub(crate) struct KillShared {
    state: AtomicU8,
    pid: libc::pid_t,
    /// A pidfd of init: signals sent through it reach init or nobody, never
    /// a process that later reuses the pid.
    pidfd: Option<OwnedFd>,
}

impl KillShared {
    pub(crate) fn new(pid: libc::pid_t) -> KillShared {
        KillShared {
            state: AtomicU8::new(KILL_NONE),
            pid,
            pidfd: sys::pidfd_open(pid).ok().map(|fd| {
                // SAFETY: pidfd_open returned a new descriptor nothing else owns.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }),
        }
    }

    /// Marks init as reaped: from now on no handle signals its pid.
    fn reaped(&self) {
        self.state.store(KILL_REAPED, Ordering::SeqCst);
    }

    fn requested(&self) -> bool {
        self.state.load(Ordering::SeqCst) == KILL_REQUESTED
    }
}

/// A cloneable handle that can kill a sandbox from another thread while
/// [`wait`] runs. Kept after `wait`, it does nothing: it signals through a
/// pidfd of the sandbox's init, never a bare pid that may have been reused.
#[derive(Debug, Clone)]
pub struct KillHandle {
    shared: Arc<KillShared>,
}

impl KillHandle {
    /// Kills every process of the sandbox; `wait` then reports
    /// `killed_by: killed`.
    pub fn kill(&self) {
        let sh = &self.shared;
        if sh
            .state
            .compare_exchange(
                KILL_NONE,
                KILL_REQUESTED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            return;
        }
        match &sh.pidfd {
            Some(fd) => {
                let _ = sys::pidfd_send_signal(fd.as_raw_fd(), libc::SIGKILL);
            }
            // Kernels before 5.3: the pid, which `wait` has not reaped yet
            // (it marks the state before reaping; a kill racing that very
            // moment is the one window left on such kernels).
            None => {
                let _ = sys::kill(sh.pid, libc::SIGKILL);
            }
        }
    }
}

impl Sandbox {
    /// A handle to kill this sandbox from elsewhere.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            shared: self.kill_flag.clone(),
        }
    }
}

/// Kills every process in the sandbox (its init, and with it the pid
/// namespace). [`wait`] still has to be called to reap and clean up.
pub fn kill(sandbox: &Sandbox) {
    sandbox.kill_handle().kill();
}

/// The child did not finish its setup before the deadline.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SetupTimedOut;

/// Reads the child's setup report: `None` when the payload exec'd (the
/// pipe closed without a word), else what failed; [`SetupTimedOut`] when
/// the pipe neither closed nor delivered a report by `deadline`.
pub(crate) fn read_setup_report(
    fd: RawFd,
    deadline: Instant,
) -> Result<Option<Report>, SetupTimedOut> {
    let mut buf = [0u8; Report::SIZE];
    let mut got = 0;
    while got < buf.len() {
        match sys::wait_readable(fd, deadline) {
            Ok(true) => {}
            Ok(false) => return Err(SetupTimedOut),
            Err(_) => break,
        }
        match sys::read(fd, &mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    Ok(Report::decode(&buf[..got]))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the runner and returns a signalfd
/// that reports them.
pub(crate) fn block_runner_signals() -> Result<RawFd, Error> {
    // SAFETY: `set` is initialised by sigemptyset before use; signalfd gets a
    // valid set and returns a new fd or -1.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(Error::sys("sigprocmask"));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(Error::sys("signalfd"));
        }
        Ok(fd)
    }
}

/// Kills, reaps and cleans up a sandbox whose setup failed.
pub(crate) fn abort(mut sb: Sandbox) {
    kill_init(&mut sb);
    let _ = reap(sb.pid, &sb.kill_flag);
    release(&mut sb);
}

/// SIGKILL to init. A paused sandbox is thawed too, after every process
/// got the signal (so none runs again): frozen (v1) processes do not die,
/// and reaping init would wait forever.
fn kill_init(sb: &mut Sandbox) {
    let _ = sys::kill(sb.pid, libc::SIGKILL);
    if sb.paused {
        if let Some(cg) = &sb.cgroup {
            cg.kill_frozen();
        }
        sb.paused = false;
    }
}

impl Drop for Sandbox {
    /// A sandbox dropped without [`wait`] is killed, reaped and cleaned up.
    fn drop(&mut self) {
        if !self.released {
            kill_init(self);
            let _ = reap(self.pid, &self.kill_flag);
            release(self);
        }
    }
}

fn reap(pid: libc::pid_t, shared: &KillShared) -> (i32, libc::rusage) {
    shared.reaped();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child with valid out pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r >= 0 || sys::errno() != libc::EINTR {
            return (status, ru);
        }
    }
}

fn release(sb: &mut Sandbox) {
    if sb.released {
        return;
    }
    sb.released = true;
    for fd in [sb.stdout_r, sb.stderr_r, sb.status_r] {
        sys::close(fd);
    }
    if let Some(fd) = sb.init_pidfd.take() {
        sys::close(fd);
    }
    if let Some(fd) = sb.lifeline.take() {
        sys::close(fd);
    }
    if let Some(feed) = sb.stdin_w.take() {
        sys::close(feed.pipe);
    }
    if let Some(fd) = sb.signal_fd.take() {
        sys::close(fd);
        unblock_runner_signals();
    }
    if let Some(cg) = sb.cgroup.take() {
        cg.kill_all();
        let _ = cg.destroy();
    }
    if let Some(p) = sb.proxy.take() {
        p.shutdown();
    }
    // After the reap: the sandbox's netns is gone, and its veth with it.
    if let Some(k) = sb.kernel_egress.take() {
        let _ = k.teardown();
    }
    // Last, once nothing of the sandbox runs: its host ids are free again.
    drop(sb.id_slot.take());
}

/// How many connections the sandbox's egress proxy refused so far (0
/// without a proxy).
pub(crate) fn denied_count(sb: &Sandbox) -> u64 {
    sb.proxy.as_ref().map_or(0, |p| p.stats().denied)
}

/// What the proxy saw, for the outcome.
pub(crate) fn network_report(sb: &Sandbox) -> crate::outcome::NetworkReport {
    report_of(sb.net_mode, sb.proxy.as_ref())
}

/// The network part of an outcome: mode `mode`, and what `proxy` recorded.
pub(crate) fn report_of(
    mode: &str,
    proxy: Option<&nanoclaw_net::BlockingProxy>,
) -> crate::outcome::NetworkReport {
    let mut r = crate::outcome::NetworkReport {
        mode: mode.to_string(),
        ..Default::default()
    };
    if let Some(p) = proxy {
        let st = p.stats();
        r.proxy = Some(format!("127.0.0.1:{}", super::child::PROXY_PORT));
        r.allowed = st.allowed;
        r.denied = st.denied;
        r.bytes_up = st.bytes_up;
        r.bytes_down = st.bytes_down;
        r.intercepted = st.intercepted;
        r.denials = p
            .denials()
            .into_iter()
            .map(|d| crate::outcome::NetDenial {
                destination: d.destination,
                port: d.port,
                reason: d.reason.kind().to_string(),
                detail: d.reason.to_string(),
                protocol: format!("{:?}", d.protocol).to_ascii_lowercase(),
            })
            .collect();
        r.connections = p
            .connections()
            .into_iter()
            .map(|c| crate::outcome::NetConnection {
                address: c.address.to_string(),
                port: c.port,
                name: c.name,
                name_source: c.name_source.to_string(),
                allowed: c.allowed,
                reason: c.reason.as_ref().map(|r| r.kind().to_string()),
                detail: c.reason.as_ref().map(|r| r.to_string()),
                bytes_up: c.bytes_up,
                bytes_down: c.bytes_down,
            })
            .collect();
        r.dns = p
            .dns_queries()
            .into_iter()
            .map(|d| crate::outcome::NetDnsQuery {
                name: d.name,
                qtype: d.qtype,
                transport: d.transport.to_string(),
                allowed: d.allowed,
                answers: d.answers.iter().map(|a| a.to_string()).collect(),
                rcode: d.rcode.to_string(),
                reason: d.reason.as_ref().map(|r| r.kind().to_string()),
                detail: d.reason.as_ref().map(|r| r.to_string()),
            })
            .collect();
    }
    r
}

fn unblock_runner_signals() {
    // SAFETY: as in block_runner_signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// What the runner writes to the command's stdin pipe: fixed bytes from
/// the spec, or the caller's own stdin forwarded as it arrives.
#[derive(Debug)]
pub(crate) struct StdinFeed {
    /// The runner's (write) end of the command's stdin pipe.
    pub(crate) pipe: RawFd,
    buf: Vec<u8>,
    off: usize,
    /// Where more bytes come from once `buf` is written (the caller's fd 0);
    /// `None` after its end of file.
    source: Option<RawFd>,
}

impl StdinFeed {
    /// Writes `data`, then closes the pipe.
    pub(crate) fn bytes(pipe: RawFd, data: Vec<u8>) -> StdinFeed {
        StdinFeed {
            pipe,
            buf: data,
            off: 0,
            source: None,
        }
    }

    /// Copies `source` into the pipe until its end of file. `source` is
    /// polled before each read and never set non-blocking (it is the
    /// caller's, maybe shared with a shell).
    pub(crate) fn forward(pipe: RawFd, source: RawFd) -> StdinFeed {
        StdinFeed {
            pipe,
            buf: Vec::new(),
            off: 0,
            source: Some(source),
        }
    }

    /// The descriptor to poll next and for what: the pipe while bytes are
    /// pending, else the source.
    pub(crate) fn poll_for(&self) -> (RawFd, libc::c_short) {
        match self.source {
            Some(src) if self.off >= self.buf.len() => (src, libc::POLLIN),
            _ => (self.pipe, libc::POLLOUT),
        }
    }

    /// Moves bytes along after a poll said the descriptor is ready. Returns
    /// false when the feed is finished (all written and the source ended,
    /// or the command closed its stdin) and the pipe should be closed.
    pub(crate) fn pump(&mut self, scratch: &mut [u8]) -> bool {
        if self.off >= self.buf.len() {
            let Some(src) = self.source else {
                return false;
            };
            match sys::read(src, scratch) {
                Ok(n) if n > 0 => {
                    self.buf.clear();
                    self.buf.extend_from_slice(&scratch[..n]);
                    self.off = 0;
                }
                _ => {
                    self.source = None;
                    return false;
                }
            }
            return true;
        }
        let rest = &self.buf[self.off..];
        // SAFETY: `rest` is a valid slice of `rest.len()` bytes.
        let k = unsafe { libc::write(self.pipe, rest.as_ptr().cast(), rest.len()) };
        if k > 0 {
            self.off += k as usize;
        } else if k < 0 && sys::errno() != libc::EAGAIN {
            return false;
        }
        self.off < self.buf.len() || self.source.is_some()
    }
}

/// One output stream being collected.
pub(crate) struct Stream {
    pub(crate) fd: RawFd,
    pub(crate) open: bool,
    pub(crate) buf: Vec<u8>,
    total: u64,
    pub(crate) truncated: bool,
    /// Where to copy it live (1 or 2), when streaming.
    echo: Option<RawFd>,
}

impl Stream {
    pub(crate) fn new(fd: RawFd, echo: Option<RawFd>) -> Stream {
        Stream {
            fd,
            open: true,
            buf: Vec::new(),
            total: 0,
            truncated: false,
            echo,
        }
    }

    /// Reads what is available. Returns true when the limit was crossed.
    pub(crate) fn pump(&mut self, limit: u64, scratch: &mut [u8]) -> bool {
        loop {
            match sys::read(self.fd, scratch) {
                Ok(0) => {
                    self.open = false;
                    return false;
                }
                Ok(n) => {
                    let room = limit.saturating_sub(self.total) as usize;
                    let keep = n.min(room);
                    if keep > 0 {
                        match self.echo {
                            Some(out) => {
                                let _ = sys::write_all(out, &scratch[..keep]);
                            }
                            None => self.buf.extend_from_slice(&scratch[..keep]),
                        }
                    }
                    self.total += n as u64;
                    if n > keep {
                        self.truncated = true;
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.open = false;
                    return false;
                }
            }
        }
    }
}

/// Waits for the sandbox to finish, enforcing its timeout, output limit and
/// cgroup limits, then reaps it, removes its cgroup and returns the outcome.
pub fn wait(mut sb: Sandbox) -> Result<Outcome, Error> {
    let limits = sb.spec_limits;
    let deadline = sb.started + limits.timeout;
    let echo = |n| if sb.opts.stream { Some(n) } else { None };
    let mut out = Stream::new(sb.stdout_r, echo(1));
    let mut err = Stream::new(sb.stderr_r, echo(2));
    for fd in [out.fd, err.fd, sb.status_r] {
        let _ = sys::set_nonblocking(fd);
    }
    if let Some(feed) = &sb.stdin_w {
        let _ = sys::set_nonblocking(feed.pipe);
    }
    if let Some((_, msg)) = &sb.exec_error {
        err.buf.extend_from_slice(msg.as_bytes());
        if sb.opts.stream {
            let _ = sys::write_all(2, msg.as_bytes());
        }
    }
    let mut scratch = vec![0u8; 64 * 1024];
    let mut w = Watch::default();
    let mut next_events = Instant::now() + EVENT_POLL;

    while !w.init_done {
        let now = Instant::now();
        if now >= deadline {
            w.kill(&sb, KillReason::Timeout);
        }
        let wake = deadline.min(next_events);
        let timeout_ms = wake
            .saturating_duration_since(now)
            .as_millis()
            .clamp(0, 1000) as i32;
        let mut fds = poll_set(&sb, &out, &err);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 && sys::errno() != libc::EINTR {
            w.kill(&sb, KillReason::Killed);
            return Err(Error::sys("poll"));
        }
        for p in &fds {
            if p.revents == 0 {
                continue;
            }
            if p.fd == out.fd || p.fd == err.fd {
                let s = if p.fd == out.fd { &mut out } else { &mut err };
                if s.pump(limits.output_limit, &mut scratch) {
                    w.kill(&sb, KillReason::OutputLimit);
                }
            } else if Some(p.fd) == sb.init_pidfd {
                w.on_init_exit(sb.status_r);
            } else if p.fd == sb.status_r {
                w.on_status_pipe(sb.status_r);
            } else if Some(p.fd) == sb.signal_fd {
                if let Some(sig) = read_signal(p.fd) {
                    w.runner_signal = Some(sig);
                    w.kill(&sb, KillReason::Killed);
                }
            } else if let Some(feed) = &mut sb.stdin_w {
                if p.fd == feed.poll_for().0 && !feed.pump(&mut scratch) {
                    sys::close(feed.pipe);
                    sb.stdin_w = None;
                }
            }
        }
        if sb.kill_flag.requested() && w.killed_by.is_none() {
            w.killed_by = Some(KillReason::Killed);
        }
        if Instant::now() >= next_events {
            next_events = Instant::now() + EVENT_POLL;
            if let Some(cg) = &sb.cgroup {
                let ev = cg.events();
                if ev.oom_kills > 0 {
                    w.kill(&sb, KillReason::Oom);
                } else if ev.pids_max_hits > 0 {
                    w.kill(&sb, KillReason::Pids);
                }
            }
        }
    }

    let (init_status, reaped_cpu) = end_init(&mut sb, &w);
    if drain(&mut out, &mut err, limits.output_limit, &mut scratch) && w.killed_by.is_none() {
        w.killed_by = Some(KillReason::OutputLimit);
    }
    let duration = sb.started.elapsed();
    let (cpu_time, peak_memory_bytes) = usage(&sb, reaped_cpu, w.cpu_at_kill, &mut w.killed_by);

    // What happened to the payload: its own status when init reported it,
    // else how init died (killed by us).
    let status = w.payload_status.unwrap_or(init_status);
    let (exit_code, signal) = exit_of(status, &w, sb.exec_error.as_ref().map(|e| e.0));

    let outcome = Outcome {
        exit_code,
        signal,
        killed_by: w.killed_by,
        stdout: std::mem::take(&mut out.buf),
        stderr: std::mem::take(&mut err.buf),
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        duration,
        cpu_time,
        peak_memory_bytes,
        sandbox_id: sb.id.clone(),
        layers: std::mem::take(&mut sb.layers),
        network: network_report(&sb),
    };
    release(&mut sb);
    Ok(outcome)
}

/// Ends init once the payload has ended (or init died): returns init's
/// wait status and the cpu time of everything init reaped.
///
/// Usually init is exiting already; the kernel kills everything left in
/// the pid namespace before init can be reaped. With
/// [`super::RunOptions::exit_after_wait`], init has killed and reaped the
/// rest itself before its report and stays: it moves itself out of the
/// sandbox's cgroup ([`init_leaves_cgroup`]) and exits — tearing down the
/// namespaces — only when [`release`] closes its lifeline; the cpu time is
/// the one it reported. Where it cannot move, its lifeline is closed now
/// and it is reaped as usual.
fn end_init(sb: &mut Sandbox, w: &Watch) -> (i32, Duration) {
    let lingering = sb.opts.exit_after_wait && w.payload_status.is_some();
    if lingering && w.killed_by.is_none() && init_leaves_cgroup(sb) {
        sb.kill_flag.reaped();
        return (0, w.reported_cpu);
    }
    if lingering {
        if let Some(fd) = sb.lifeline.take() {
            sys::close(fd);
        }
    }
    let (status, ru) = reap(sb.pid, &sb.kill_flag);
    (status, Duration::from_micros(sys::cpu_micros(&ru)))
}

/// How long a lingering init may take to move itself out of the cgroup.
const LEAVE_PATIENCE: Duration = Duration::from_secs(1);

/// Asks the lingering init to move itself out of the sandbox's cgroup
/// (true at once when there is none): sends it the parents' `tasks` files
/// over its lifeline and waits for its answer.
fn init_leaves_cgroup(sb: &Sandbox) -> bool {
    let (Some(cg), Some(lifeline)) = (&sb.cgroup, sb.lifeline) else {
        return sb.cgroup.is_none() && sb.lifeline.is_some();
    };
    let Some(files) = cg.leave_handles() else {
        return false;
    };
    let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let Ok(count) = u8::try_from(raw.len()) else {
        return false;
    };
    if sys::send_with_fds(lifeline, &[count], &raw).is_err() {
        return false;
    }
    drop(files);
    let mut answer = [0u8; 1];
    sys::wait_readable(lifeline, Instant::now() + LEAVE_PATIENCE).unwrap_or(false)
        && sys::read(lifeline, &mut answer).ok() == Some(1)
        && answer == *b"1"
}

/// What [`wait`] learns while the sandbox runs.
#[derive(Default)]
struct Watch {
    /// Why the runner killed the sandbox (the first reason).
    killed_by: Option<KillReason>,
    /// The payload's wait status, as init reported it.
    payload_status: Option<i32>,
    /// The cpu time of the processes init had reaped, as it reported it.
    reported_cpu: Duration,
    /// The status report so far, when read from the pipe.
    status_buf: Vec<u8>,
    /// Init has exited (or its status pipe closed).
    init_done: bool,
    /// A signal the runner received and turned into a kill (SIGINT, ...).
    runner_signal: Option<i32>,
    /// The cpu time of every process in the sandbox, read just before the
    /// first kill: killed processes are never reaped by init, so their time
    /// would be missing from init's rusage.
    cpu_at_kill: Option<Duration>,
}

impl Watch {
    /// SIGKILL to init, recording `why` if it is the first reason.
    fn kill(&mut self, sb: &Sandbox, why: KillReason) {
        if self.killed_by.is_none() {
            self.killed_by = Some(why);
            if let Some(cg) = &sb.cgroup {
                self.cpu_at_kill = Some(cpu_of(&cg.procs()));
            }
        }
        let _ = sys::kill(sb.pid, libc::SIGKILL);
    }

    /// Init has exited (its pidfd said so); its status report (if any) is
    /// buffered in the status pipe.
    fn on_init_exit(&mut self, status_r: RawFd) {
        let mut b = [0u8; STATUS_REPORT_LEN];
        if sys::read_full(status_r, &mut b).ok() == Some(b.len()) {
            self.take_report(&b);
        }
        self.init_done = true;
    }

    /// Init's whole status report (see `child::status_report`).
    fn take_report(&mut self, b: &[u8]) {
        let mut status = [0u8; 4];
        let mut cpu = [0u8; 8];
        status.copy_from_slice(&b[..4]);
        cpu.copy_from_slice(&b[4..STATUS_REPORT_LEN]);
        self.payload_status = Some(i32::from_ne_bytes(status));
        self.reported_cpu = Duration::from_micros(u64::from_ne_bytes(cpu));
    }

    /// Input on the status pipe (where there is no pidfd): the payload's
    /// status, or its end of file when init is gone.
    fn on_status_pipe(&mut self, status_r: RawFd) {
        let mut b = [0u8; STATUS_REPORT_LEN];
        let want = STATUS_REPORT_LEN - self.status_buf.len();
        match sys::read(status_r, &mut b[..want]) {
            Ok(0) => self.init_done = true,
            Ok(k) => {
                self.status_buf.extend_from_slice(&b[..k]);
                if self.status_buf.len() == STATUS_REPORT_LEN {
                    let report = std::mem::take(&mut self.status_buf);
                    self.take_report(&report);
                    self.init_done = true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.init_done = true,
        }
    }
}

/// What [`wait`] polls: init's death, output, the runner's signals, stdin.
fn poll_set(sb: &Sandbox, out: &Stream, err: &Stream) -> Vec<libc::pollfd> {
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
    let mut push = |fd: RawFd, events: libc::c_short| {
        fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
    };
    // Init's death, where a pidfd says it; else (or when init stays after
    // its report) the status pipe.
    let init_fd = match sb.init_pidfd {
        Some(fd) if !sb.opts.exit_after_wait => fd,
        _ => sb.status_r,
    };
    push(init_fd, libc::POLLIN);
    if out.open {
        push(out.fd, libc::POLLIN);
    }
    if err.open {
        push(err.fd, libc::POLLIN);
    }
    if let Some(sfd) = sb.signal_fd {
        push(sfd, libc::POLLIN);
    }
    if let Some(feed) = &sb.stdin_w {
        let (fd, events) = feed.poll_for();
        push(fd, events);
    }
    fds
}

/// The signal a signalfd reports, if it has one.
fn read_signal(fd: RawFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; reading into it is
    // what signalfd is for.
    let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid buffer of the right size.
    let r = unsafe {
        libc::read(
            fd,
            (&mut si as *mut libc::signalfd_siginfo).cast(),
            std::mem::size_of::<libc::signalfd_siginfo>(),
        )
    };
    (r > 0).then_some(si.ssi_signo as i32)
}

/// Reads what is left of the output after init has exited, for at most
/// [`DRAIN_GRACE`]; true when a stream went past `limit`.
fn drain(out: &mut Stream, err: &mut Stream, limit: u64, scratch: &mut [u8]) -> bool {
    let mut over = false;
    let drain_until = Instant::now() + DRAIN_GRACE;
    while (out.open || err.open) && Instant::now() < drain_until {
        let mut fds: Vec<libc::pollfd> = [&*out, &*err]
            .iter()
            .filter(|s| s.open)
            .map(|s| libc::pollfd {
                fd: s.fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        for s in [&mut *out, &mut *err] {
            if s.open && s.pump(limit, scratch) {
                over = true;
            }
        }
    }
    over
}

/// The sandbox's cpu time and peak memory; an OOM kill or a hit of the
/// pids limit its cgroup saw goes into `killed_by` when nothing else did.
fn usage(
    sb: &Sandbox,
    reaped_cpu: Duration,
    cpu_at_kill: Option<Duration>,
    killed_by: &mut Option<KillReason>,
) -> (Duration, Option<u64>) {
    let (mut cpu, mut peak) = (None, None);
    if let Some(cg) = &sb.cgroup {
        let ev = cg.events();
        if killed_by.is_none() {
            if ev.oom_kills > 0 {
                *killed_by = Some(KillReason::Oom);
            } else if ev.pids_max_hits > 0 {
                *killed_by = Some(KillReason::Pids);
            }
        }
        let st = cg.stats();
        cpu = st.cpu;
        peak = st.peak_memory;
    }
    let cpu_time = cpu
        .unwrap_or(reaped_cpu)
        .max(cpu_at_kill.unwrap_or_default());
    // Only a memory cgroup knows the sandbox's peak; init's rusage would
    // give the largest single process, which is not the sandbox's use.
    (cpu_time, peak)
}

/// The exit code and signal the outcome reports for wait status `status`
/// (`exec_error`: the code of a command that could not be started).
fn exit_of(status: i32, w: &Watch, exec_error: Option<i32>) -> (Option<i32>, Option<i32>) {
    let (mut exit_code, mut signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, Some(libc::SIGKILL))
    };
    if let Some(code) = exec_error {
        if w.killed_by.is_none() {
            exit_code = Some(code);
            signal = None;
        }
    }
    if w.killed_by.is_some() && exit_code.is_some() && w.payload_status.is_none() {
        exit_code = None;
        signal = Some(libc::SIGKILL);
    }
    // Interrupted like `docker run` with its signal proxy: the command is
    // reported as ended by the signal the runner got (exit 130 for ^C).
    if let (Some(KillReason::Killed), Some(sig)) = (w.killed_by, w.runner_signal) {
        exit_code = None;
        signal = Some(sig);
    }
    (exit_code, signal)
}

/// The cpu time (user + system) of `pids` and of the children each has
/// reaped, from `/proc/PID/stat` (fields 14-17, in clock ticks). Every
/// process that ever ran in a sandbox is counted once: alive, or in the
/// `cutime`/`cstime` of whoever reaped it.
fn cpu_of(pids: &[libc::pid_t]) -> Duration {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    };
    let mut ticks = 0u64;
    for pid in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // utime, stime, cutime, cstime.
        ticks += (14..=17)
            .filter_map(|n| sys::stat_field(&stat, n))
            .sum::<u64>();
    }
    Duration::from_millis(ticks * 1000 / hz)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn setup_report_has_a_deadline() {
        // A child that never writes its report nor closes the pipe.
        let (r, w) = sys::pipe().unwrap();
        let t0 = Instant::now();
        let got = read_setup_report(r, t0 + Duration::from_millis(200));
        assert_eq!(got.unwrap_err(), SetupTimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(t0.elapsed() < Duration::from_secs(5));
        sys::close(w);
        // A closed pipe with no report: the payload exec'd.
        assert!(
            read_setup_report(r, Instant::now() + Duration::from_secs(5))
                .unwrap()
                .is_none()
        );
        sys::close(r);
    }
}
