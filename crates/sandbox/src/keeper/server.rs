//! The keeper itself: creates one sandbox and serves its clients from one
//! thread, with one `poll` over the listener, its end signals, init's
//! pidfd and lifeline, and every client connection.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::state::{self, euid, now_s, start_time, write_state, State, PAUSED_MARK};
use super::{frames, KeeperConfig, KeeperError, Live, Reply, Request};
use crate::native::proto::{self, Header, FRAME};
use crate::native::session::{self, ExecSpec, RunState};
use crate::native::sys;
use crate::spec::User;
use crate::Sandbox;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request line.
const MAX_REQUEST_LINE: usize = 256 * 1024;
/// Most client connections at once (each running command holds one).
const MAX_CONNS: usize = 512;

/// The hidden `__keeper` command: reads a [`KeeperConfig`] (JSON) on
/// stdin, creates the sandbox, prints `ok ID` (or `error MESSAGE`) on
/// stdout, and holds the sandbox until it is removed, expires, idles out,
/// or the keeper is signalled. Returns the process's exit code.
///
/// The keeper leaves its parent at once (it forks, the parent exits), so
/// that it is nobody's child to reap — a daemon that started it need not
/// wait for it — and it is in a session of its own: a terminal's hangup or
/// ^C does not reach it (as with `docker run -d`).
pub fn keeper_main() -> u8 {
    // SAFETY: fork in a single-threaded process (this runs first thing in
    // `__keeper`, before any thread exists); the parent exits at once.
    match unsafe { libc::fork() } {
        -1 => return 125,
        0 => {}
        _ => sys::exit_now(0),
    }
    // SAFETY: setsid has no arguments.
    unsafe { libc::setsid() };
    crate::native::cgroup::skip_stale_sweep();
    // Before any thread exists (the egress proxy runs on threads), so that
    // every thread has these blocked and only the signalfd sees them.
    let signals = crate::native::block_runner_signals().unwrap_or(-1);
    let mut input = Vec::new();
    let cfg = std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            serde_json::from_slice::<KeeperConfig>(&input)
                .map_err(|e| format!("keeper configuration: {e}"))
        });
    let mut out = std::io::stdout();
    match cfg.and_then(|c| Keeper::start(c).map_err(|e| e.to_string())) {
        Ok(k) => {
            let _ = writeln!(out, "ok {}", k.state.id);
            let _ = out.flush();
            detach_stdio();
            k.serve(signals);
            0
        }
        Err(e) => {
            let _ = writeln!(out, "error {}", e.replace('\n', " "));
            125
        }
    }
}

/// The keeper's stdio becomes /dev/null: nothing ties it to the terminal
/// or the pipeline of the client that started it.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 of a descriptor we hold onto a standard descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// A client connection.
struct Conn {
    stream: UnixStream,
    /// The request line so far (before a request), or partial frames
    /// (attached).
    buf: Vec<u8>,
    opened: Instant,
    /// The exec this connection started and follows.
    attached: Option<u32>,
}

/// A command started through the keeper and not yet reported ended.
struct Exec {
    /// Its client's connection (None once the client hung up).
    conn: Option<u64>,
    oom_before: u64,
    pids_before: u64,
}

struct Keeper {
    sandbox: Sandbox,
    state: State,
    dir: PathBuf,
    listener: UnixListener,
    deadline: Instant,
    idle: Option<Duration>,
    last_used: Instant,
    conns: HashMap<u64, Conn>,
    execs: HashMap<u32, Exec>,
    next_token: u64,
    stopping: bool,
    /// Egress refusals already reported in an `EGRESS_DENIED` frame.
    denied_reported: u64,
}

impl Keeper {
    fn start(cfg: KeeperConfig) -> Result<Keeper, KeeperError> {
        let sandbox = session::create(&cfg.spec)?;
        let id = sandbox.id().to_string();
        let dir = cfg.root.join(&id);
        let io = |what: String| move |source| KeeperError::Io { what, source };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        let sock = dir.join("sock");
        let listener =
            UnixListener::bind(&sock).map_err(io(format!("listening on {}", sock.display())))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(io(sock.display().to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(io("listener".into()))?;
        let created = now_s();
        let state = State {
            id,
            name: cfg.name,
            labels: cfg.labels,
            created,
            expires: created + cfg.lifetime_ms / 1000,
            last_used: created,
            idle_timeout_s: cfg.idle_timeout_ms.map(|m| m / 1000),
            exec_timeout_ms: cfg.exec_timeout_ms,
            keeper_pid: std::process::id(),
            keeper_start: start_time(std::process::id()).unwrap_or(0),
            init_pid: sandbox.pid(),
            owner_uid: euid(),
            layers: sandbox.layers().clone(),
            freezer_cgroup: session::freezer_dir(&sandbox),
        };
        write_state(&dir, &state).map_err(io(format!("writing {}", dir.display())))?;
        Ok(Keeper {
            sandbox,
            state,
            dir,
            listener,
            deadline: Instant::now() + Duration::from_millis(cfg.lifetime_ms),
            idle: cfg.idle_timeout_ms.map(Duration::from_millis),
            last_used: Instant::now(),
            conns: HashMap::new(),
            execs: HashMap::new(),
            next_token: 1,
            stopping: false,
            denied_reported: 0,
        })
    }

    /// When the keeper ends the sandbox: its lifetime, or its idle timeout
    /// while no command runs.
    fn end(&self) -> Instant {
        match self.idle {
            Some(i) if self.execs.is_empty() => self.deadline.min(self.last_used + i),
            _ => self.deadline,
        }
    }

    /// Serves until the end; then removes the sandbox and its state.
    fn serve(mut self, signals: i32) {
        let lifeline = self.sandbox.lifeline.unwrap_or(-1);
        while !self.stopping {
            let now = Instant::now();
            let end = self.end();
            if now >= end {
                break;
            }
            let mut fds = vec![
                pollfd(self.listener.as_raw_fd()),
                pollfd(signals),
                pollfd(self.sandbox.init_pidfd().unwrap_or(-1)),
                pollfd(lifeline),
            ];
            let tokens: Vec<u64> = self.conns.keys().copied().collect();
            fds.extend(
                tokens
                    .iter()
                    .map(|t| pollfd(self.conns[t].stream.as_raw_fd())),
            );
            let mut wake = end;
            for c in self.conns.values().filter(|c| c.attached.is_none()) {
                wake = wake.min(c.opened + REQUEST_TIMEOUT);
            }
            let ms = wake.saturating_duration_since(now).as_millis().min(60_000) as i32;
            // SAFETY: `fds` is a valid array of pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms.max(1)) };
            if n < 0 && sys::errno() != libc::EINTR {
                break;
            }
            // A signal to end, or the sandbox's init is gone.
            if fds[1].revents != 0 || fds[2].revents != 0 {
                break;
            }
            if fds[3].revents != 0 && !self.on_init_frame(lifeline) {
                break;
            }
            for (i, t) in tokens.iter().enumerate() {
                if fds[4 + i].revents != 0 {
                    self.on_conn(*t);
                }
            }
            if fds[0].revents != 0 {
                self.accept();
            }
            self.expire_slow_clients();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        session::remove(self.sandbox);
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNS || !peer_is_owner(&stream) {
                continue;
            }
            let _ = stream.set_nonblocking(true);
            let t = self.next_token;
            self.next_token += 1;
            self.conns.insert(
                t,
                Conn {
                    stream,
                    buf: Vec::new(),
                    opened: Instant::now(),
                    attached: None,
                },
            );
        }
    }

    /// Drops connections that did not send their request in time.
    fn expire_slow_clients(&mut self) {
        let now = Instant::now();
        self.conns
            .retain(|_, c| c.attached.is_some() || now < c.opened + REQUEST_TIMEOUT);
    }

    /// One frame from init about a command; false when init is gone.
    fn on_init_frame(&mut self, lifeline: i32) -> bool {
        let mut buf = [0u8; FRAME];
        match sys::read_full(lifeline, &mut buf) {
            Ok(n) if n == FRAME => {}
            _ => return false,
        }
        let (h, _) = proto::decode_frame(&buf);
        let Some(exec) = self.execs.get(&h.id) else {
            return true;
        };
        let conn = exec.conn;
        let ended = matches!(h.kind, proto::EXITED | proto::REFUSED);
        if h.kind == proto::EXITED {
            if let Some(reason) = self.cgroup_kill_reason(h.id) {
                self.send_frame(conn, &proto::frame(proto::KILLED_BY, h.id, reason));
            }
            self.report_denials(conn, h.id);
        }
        self.send_frame(conn, &buf);
        if ended {
            self.execs.remove(&h.id);
            if let Some(t) = conn {
                self.conns.remove(&t);
            }
            self.touch();
        }
        true
    }

    /// Tells the client of exec `id` how many connections the egress
    /// policy refused since the last report (nothing when none were, or
    /// when nobody listens: the next exec's client hears of them).
    fn report_denials(&mut self, conn: Option<u64>, id: u32) {
        let total = session::denied_count(&self.sandbox);
        let new = total.saturating_sub(self.denied_reported);
        if new == 0 || conn.is_none() {
            return;
        }
        self.denied_reported = total;
        let n = i32::try_from(new).unwrap_or(i32::MAX);
        self.send_frame(conn, &proto::frame(proto::EGRESS_DENIED, id, n));
    }

    /// Whether the sandbox's cgroup saw an OOM kill or a pids-limit hit
    /// while exec `id` ran (a `KILLED_BY` code).
    fn cgroup_kill_reason(&self, id: u32) -> Option<i32> {
        let exec = self.execs.get(&id)?;
        let ev = self.sandbox.cgroup.as_ref()?.events();
        if ev.oom_kills > exec.oom_before {
            Some(proto::reason_code(crate::KillReason::Oom))
        } else if ev.pids_max_hits > exec.pids_before {
            Some(proto::reason_code(crate::KillReason::Pids))
        } else {
            None
        }
    }

    /// Sends a frame to a connection; one that cannot take it is dropped
    /// (and its command killed).
    fn send_frame(&mut self, conn: Option<u64>, frame: &[u8]) {
        let Some(t) = conn else { return };
        let ok = self
            .conns
            .get(&t)
            .is_some_and(|c| (&c.stream).write_all(frame).is_ok());
        if !ok {
            self.hang_up(t);
        }
    }

    /// A connection is gone: the command it follows is killed.
    fn hang_up(&mut self, t: u64) {
        if let Some(c) = self.conns.remove(&t) {
            if let Some(id) = c.attached {
                self.signal_exec(id, libc::SIGKILL);
                if let Some(e) = self.execs.get_mut(&id) {
                    e.conn = None;
                }
            }
        }
    }

    fn signal_exec(&self, id: u32, sig: i32) {
        if let Some(l) = self.sandbox.lifeline {
            let _ = sys::write_all(l, &session::kill_frame(id, sig));
        }
    }

    fn touch(&mut self) {
        self.last_used = Instant::now();
    }

    /// Input on a connection.
    fn on_conn(&mut self, t: u64) {
        let mut chunk = [0u8; 16 * 1024];
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        let n = match (&c.stream).read(&mut chunk) {
            Ok(0) => return self.hang_up(t),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => return self.hang_up(t),
        };
        c.buf.extend_from_slice(&chunk[..n]);
        if let Some(id) = c.attached {
            return self.on_client_frames(t, id);
        }
        if c.buf.len() > MAX_REQUEST_LINE {
            self.conns.remove(&t);
            return;
        }
        let Some(end) = c.buf.iter().position(|b| *b == b'\n') else {
            return;
        };
        let line = c.buf[..end].to_vec();
        c.buf.drain(..=end);
        match serde_json::from_slice::<Request>(&line) {
            Ok(req) => self.on_request(t, req),
            Err(e) => self.reply(t, &Reply::Error(format!("bad request: {e}"))),
        }
    }

    /// `KILL` frames from the client of exec `id`.
    fn on_client_frames(&mut self, t: u64, id: u32) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        let mut kills = Vec::new();
        while c.buf.len() >= FRAME {
            let mut f = [0u8; FRAME];
            f.copy_from_slice(&c.buf[..FRAME]);
            c.buf.drain(..FRAME);
            let (h, sig) = proto::decode_frame(&f);
            if h.kind == proto::KILL && h.id == id && ALLOWED_SIGNALS.contains(&sig) {
                kills.push(sig);
            }
        }
        for sig in kills {
            self.signal_exec(id, sig);
        }
    }

    /// Shows or replaces the sandbox's egress policy.
    fn network(
        &mut self,
        policy: Option<nanoclaw_net::NetworkPolicy>,
        rules: Option<nanoclaw_net::HeaderRules>,
    ) -> Reply {
        // Rules alone: the policy stays as it is.
        let policy = match (policy, &rules) {
            (None, Some(_)) => session::network_policy(&self.sandbox)
                .or_else(|| Some(nanoclaw_net::NetworkPolicy::default())),
            (p, _) => p,
        };
        let update = match policy {
            None => None,
            Some(p) => match session::set_network(&mut self.sandbox, p, rules) {
                Ok(u) => Some(u),
                Err(e) => return Reply::Error(e.to_string()),
            },
        };
        Reply::Network(Box::new(super::NetworkState {
            mode: session::network_mode(&self.sandbox).to_string(),
            policy: session::network_policy(&self.sandbox),
            rules: session::network_rules(&self.sandbox),
            update,
        }))
    }

    /// Sends a JSON reply and closes the connection.
    fn reply(&mut self, t: u64, reply: &Reply) {
        if let Some(c) = self.conns.remove(&t) {
            let mut out = serde_json::to_vec(reply).unwrap_or_default();
            out.push(b'\n');
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = (&c.stream).write_all(&out);
        }
    }

    fn on_request(&mut self, t: u64, req: Request) {
        match req {
            Request::Stop => {
                self.reply(t, &Reply::Stopping);
                self.stopping = true;
            }
            Request::Signal { signal } => {
                let r = match session::signal_all(&self.sandbox, signal) {
                    Ok(()) => Reply::Live(Box::new(self.live())),
                    Err(e) => Reply::Error(e.to_string()),
                };
                self.reply(t, &r);
            }
            Request::Inspect => {
                let live = self.live();
                self.reply(t, &Reply::Live(Box::new(live)));
            }
            Request::Network { policy, rules } => {
                let r = self.network(policy, rules);
                self.reply(t, &r);
            }
            Request::Pause | Request::Resume => {
                let r = self.pause_or_resume(matches!(req, Request::Pause));
                self.reply(t, &r);
            }
            Request::SetLifetime { seconds } => {
                // At most ten years: the sum must not overflow.
                let seconds = seconds.min(10 * 365 * 24 * 3600);
                let now = Instant::now();
                self.deadline = now + Duration::from_secs(seconds);
                self.state.expires = now_s() + seconds;
                // Execs check the sandbox's own lifetime too: move it along.
                self.sandbox.spec_limits.timeout = self
                    .deadline
                    .saturating_duration_since(self.sandbox.started);
                let _ = write_state(&self.dir, &self.state);
                let expires = self.state.expires;
                self.reply(t, &Reply::Lifetime { expires });
            }
            Request::Spawn {
                command,
                env,
                workdir,
                user,
                stdin,
            } => {
                let mut spec = ExecSpec::new(command);
                spec.env = env;
                spec.workdir = workdir;
                spec.user = user.map(|(uid, gid)| User { uid, gid });
                self.spawn(t, &spec, stdin);
            }
        }
    }

    /// Starts a command and hands its pipes to the client.
    fn spawn(&mut self, t: u64, spec: &ExecSpec, with_stdin: bool) {
        self.touch();
        let ev = self
            .sandbox
            .cgroup
            .as_ref()
            .map(|c| c.events())
            .unwrap_or_default();
        let sp = match session::spawn(&mut self.sandbox, spec, with_stdin) {
            Ok(sp) => sp,
            Err(e) => return self.spawn_failed(t, &e.to_string()),
        };
        let mut fds = vec![
            sp.stdout.as_raw_fd(),
            sp.stderr.as_raw_fd(),
            sp.report.as_raw_fd(),
        ];
        fds.extend(sp.stdin.as_ref().map(|f| f.as_raw_fd()));
        let frame = proto::frame(frames::SPAWNED, sp.id, fds.len() as i32);
        let Some(c) = self.conns.get_mut(&t) else {
            return self.signal_exec(sp.id, libc::SIGKILL);
        };
        c.attached = Some(sp.id);
        self.execs.insert(
            sp.id,
            Exec {
                conn: Some(t),
                oom_before: ev.oom_kills,
                pids_before: ev.pids_max_hits,
            },
        );
        if sys::send_with_fds(c.stream.as_raw_fd(), &frame, &fds).is_err() {
            self.hang_up(t);
        }
        // Our copies of the pipes close here (`sp` drops). `last_used`
        // on disk (for `sandbox ls` and `prune`) has a resolution of
        // seconds: rewriting state.json on every exec would put a write
        // and a rename on every command's path for nothing.
        let now = now_s();
        if now != self.state.last_used {
            self.state.last_used = now;
            let _ = write_state(&self.dir, &self.state);
        }
    }

    fn spawn_failed(&mut self, t: u64, msg: &str) {
        let Some(c) = self.conns.remove(&t) else {
            return;
        };
        let mut out = Header {
            kind: frames::SPAWN_FAILED,
            id: 0,
            len: msg.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&0i32.to_le_bytes());
        out.extend_from_slice(msg.as_bytes());
        let _ = c.stream.set_nonblocking(false);
        let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = (&c.stream).write_all(&out);
    }

    /// The sandbox now.
    fn live(&self) -> Live {
        let st = session::status(&self.sandbox);
        let now = now_s();
        let left = self.end().saturating_duration_since(Instant::now());
        Live {
            state: match st.state {
                RunState::Running => "running",
                RunState::Paused => "paused",
            }
            .to_string(),
            last_used: now.saturating_sub(self.last_used.elapsed().as_secs()),
            deadline: now + left.as_secs(),
            expires: self.state.expires,
            memory_bytes: st.memory_bytes,
            cpu_used_ms: st.cpu.map(|d| (d.as_micros() as f64) / 1000.0),
            tasks: st.tasks,
            can_pause: st.can_pause,
            execs: self.execs.len() as u64,
            processes: session::children_of_init(self.sandbox.pid()),
            network: session::network_report(&self.sandbox),
        }
    }

    /// Pause (`pause` true) or resume; counts as use.
    fn pause_or_resume(&mut self, pause: bool) -> Reply {
        self.touch();
        let r = if pause {
            session::pause(&mut self.sandbox)
        } else {
            session::resume(&mut self.sandbox)
        };
        let mark = self.dir.join(PAUSED_MARK);
        if session::is_paused(&self.sandbox) {
            let _ = std::fs::write(&mark, b"");
        } else {
            let _ = std::fs::remove_file(&mark);
        }
        match r {
            Ok(()) => Reply::Live(Box::new(self.live())),
            Err(e) => Reply::Error(e.to_string()),
        }
    }
}

/// Signals a client may send to its command.
const ALLOWED_SIGNALS: [i32; 9] = [
    libc::SIGKILL,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGSTOP,
    libc::SIGCONT,
];

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Only the sandbox's owner (or root) may talk to its keeper, and only from
/// the keeper's own user namespace: rootless, sandboxed code runs as the
/// owner's host uid, and a sandbox that has the state directory mounted
/// could otherwise reach the sockets of its owner's other sandboxes.
fn peer_is_owner(conn: &UnixStream) -> bool {
    // SAFETY: getsockopt(SO_PEERCRED) fills a ucred of the given size.
    let cred = unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let r = libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        );
        if r != 0 {
            return false;
        }
        cred
    };
    if cred.uid != state::euid() && cred.uid != 0 {
        return false;
    }
    // A peer in a sandbox's user namespace has another ns/user link (and
    // one in a pid namespace we cannot see shows pid 0).
    if cred.pid <= 0 {
        return false;
    }
    let ns = |p: &str| std::fs::read_link(p).ok();
    let mine = ns("/proc/self/ns/user");
    mine.is_some() && ns(&format!("/proc/{}/ns/user", cred.pid)) == mine
}
