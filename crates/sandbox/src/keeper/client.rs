//! Talking to keepers: starting one, asking it, running commands through it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{frames, KeeperConfig, KeeperError, Reply, Request};
use crate::native::proto::{self, FRAME};
use crate::native::session::{self, ExecSpec, Spawned, Waiter};
use crate::native::sys;
use crate::spec::Stdin;
use crate::Outcome;

/// How long a new keeper may take to report its sandbox ready.
const KEEPER_START: Duration = Duration::from_secs(40);
/// How long a keeper may take to answer a request (it answers at once:
/// it never waits on a command).
const ANSWER: Duration = Duration::from_secs(10);

/// Starts a keeper (`exe __keeper`) for `cfg` and returns its sandbox's
/// id once the sandbox is ready. The keeper detaches itself (no child is
/// left for the caller to reap).
pub fn start_keeper(exe: &Path, cfg: &KeeperConfig) -> Result<String, KeeperError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| KeeperError::Io { what, source }
    };
    let mut child = Command::new(exe)
        .arg("__keeper")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io("starting the sandbox's keeper"))?;
    let input = serde_json::to_vec(cfg)
        .map_err(|e| KeeperError::Invalid(format!("keeper configuration: {e}")))?;
    let written = child
        .stdin
        .take()
        .map(|mut s| s.write_all(&input))
        .unwrap_or(Ok(()));
    // The first process exits at once, leaving the keeper (its child).
    let _ = child.wait();
    written.map_err(io("configuring the sandbox's keeper"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| KeeperError::Protocol("no stdout".into()))?;
    let line = read_line_with_deadline(out, Instant::now() + KEEPER_START);
    match line.as_deref().and_then(|l| l.strip_prefix("ok ")) {
        Some(id) => Ok(id.trim().to_string()),
        None => Err(KeeperError::Invalid(format!(
            "the sandbox could not be created{}",
            line.map(|l| format!(": {}", l.trim().trim_start_matches("error ")))
                .unwrap_or_default()
        ))),
    }
}

/// The first line the keeper prints (its readiness), or `None` at EOF or
/// the deadline.
fn read_line_with_deadline(out: std::process::ChildStdout, deadline: Instant) -> Option<String> {
    let fd = out.as_raw_fd();
    let mut buf = Vec::new();
    let mut r = out;
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        match r.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

/// A sandbox held by a keeper, addressed by its state directory.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The sandbox's id.
    pub id: String,
    /// Its state directory (holding `sock`).
    pub dir: PathBuf,
}

/// A command started through a keeper: its pipes, and the connection on
/// which the keeper reports it (`STARTED`, `KILLED_BY`, `EXITED` frames)
/// and takes `KILL` frames ([`session::kill_frame`]). Closing the
/// connection before `EXITED` kills the command.
#[derive(Debug)]
pub struct RemoteSpawn {
    /// The keeper connection.
    pub conn: UnixStream,
    /// The command's pipes.
    pub spawned: Spawned,
}

impl RemoteSpawn {
    /// Waits for the command (started at `started` from `spec`, in sandbox
    /// `sandbox_id`) to end, enforcing its timeout and output limit, with
    /// `echo` as in [`Remote::exec_echo`].
    pub fn wait(
        self,
        sandbox_id: &str,
        spec: &ExecSpec,
        started: Instant,
        echo: Option<(i32, i32)>,
    ) -> Result<Outcome, KeeperError> {
        let waiter = Waiter::new(self.spawned, spec, started + spec.timeout, started, echo);
        let finished = waiter.wait(self.conn.as_raw_fd(), sandbox_id)?;
        Ok(finished.into_outcome(&spec.command[0], sandbox_id))
    }
}

impl Remote {
    /// The sandbox in `dir` (with id `id`).
    pub fn new(id: &str, dir: &Path) -> Remote {
        Remote {
            id: id.to_string(),
            dir: dir.to_path_buf(),
        }
    }

    /// Whether the keeper's socket is there (a keeper removes it, with its
    /// state directory, when it ends).
    pub fn is_up(&self) -> bool {
        self.dir.join("sock").exists()
    }

    fn connect(&self, wait: Duration) -> Result<UnixStream, KeeperError> {
        let s = UnixStream::connect(self.dir.join("sock")).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) {
                KeeperError::NotFound(self.id.clone())
            } else {
                KeeperError::Io {
                    what: format!("connecting to the keeper of {}", self.id),
                    source: e,
                }
            }
        })?;
        let _ = s.set_read_timeout(Some(wait));
        let _ = s.set_write_timeout(Some(wait));
        Ok(s)
    }

    fn send(&self, s: &mut UnixStream, req: &Request) -> Result<(), KeeperError> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| KeeperError::Invalid(format!("request: {e}")))?;
        line.push(b'\n');
        s.write_all(&line).map_err(|e| self.io_error(e))
    }

    fn io_error(&self, e: std::io::Error) -> KeeperError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                KeeperError::Busy(self.id.clone())
            }
            _ => KeeperError::Io {
                what: format!("talking to the keeper of {}", self.id),
                source: e,
            },
        }
    }

    /// Sends a (non-`Spawn`) request and reads the reply.
    pub fn ask(&self, req: &Request) -> Result<Reply, KeeperError> {
        self.ask_within(req, ANSWER)
    }

    /// [`Remote::ask`], waiting at most `wait`.
    pub fn ask_within(&self, req: &Request, wait: Duration) -> Result<Reply, KeeperError> {
        let mut s = self.connect(wait)?;
        self.send(&mut s, req)?;
        let mut reply = String::new();
        BufReader::new(s)
            .read_line(&mut reply)
            .map_err(|e| self.io_error(e))?;
        if reply.is_empty() {
            return Err(KeeperError::Protocol(
                "it closed the connection without an answer (the sandbox was removed meanwhile)"
                    .into(),
            ));
        }
        serde_json::from_str(&reply).map_err(|e| KeeperError::Protocol(format!("its reply: {e}")))
    }

    /// Starts `spec`'s command (its `stdin` and limits are the caller's to
    /// apply: see [`Remote::exec`]); `with_stdin` asks for a stdin pipe.
    pub fn spawn(&self, spec: &ExecSpec, with_stdin: bool) -> Result<RemoteSpawn, KeeperError> {
        let mut conn = self.connect(ANSWER)?;
        let req = Request::Spawn {
            command: spec.command.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            user: spec.user.map(|u| (u.uid, u.gid)),
            stdin: with_stdin,
        };
        self.send(&mut conn, &req)?;
        let spawned = self
            .read_spawned(conn.as_raw_fd())?
            .ok_or_else(|| KeeperError::Busy(self.id.clone()))?;
        let _ = conn.set_read_timeout(None);
        Ok(RemoteSpawn { conn, spawned })
    }

    /// The keeper's answer to a `Spawn` request sent on `conn`: the second
    /// half of [`Remote::spawn`], for clients that do their own I/O (the
    /// daemon, on its event loop). `Ok(None)`: it has not arrived yet (a
    /// non-blocking socket, or the socket's read timeout passed).
    pub fn read_spawned(&self, conn: RawFd) -> Result<Option<Spawned>, KeeperError> {
        let mut frame = [0u8; FRAME];
        let mut fds = [-1; sys::MAX_FDS];
        let (n, nfds) = match sys::recv_with_fds(conn, &mut frame, &mut fds) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(self.io_error(e)),
        };
        // SAFETY: each received descriptor is new and ours alone.
        let mut owned: Vec<OwnedFd> = fds[..nfds]
            .iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        if n < FRAME {
            return Err(KeeperError::Protocol(
                "it hung up (the sandbox was removed meanwhile)".into(),
            ));
        }
        let (h, value) = proto::decode_frame(&frame);
        match h.kind {
            frames::SPAWNED if value as usize == nfds && (nfds == 3 || nfds == 4) => {
                let stdin = (nfds == 4).then(|| owned.remove(3));
                let report = owned.remove(2);
                let stderr = owned.remove(1);
                let stdout = owned.remove(0);
                Ok(Some(Spawned {
                    id: h.id,
                    stdout,
                    stderr,
                    report,
                    stdin,
                }))
            }
            frames::SPAWN_FAILED if h.len as usize <= 64 * 1024 => {
                // The message follows the frame in the keeper's one write.
                let mut msg = vec![0u8; h.len as usize];
                let got = sys::read_full(conn, &mut msg).unwrap_or(0);
                msg.truncate(got);
                Err(KeeperError::Invalid(
                    String::from_utf8_lossy(&msg).into_owned(),
                ))
            }
            _ => Err(KeeperError::Protocol(format!(
                "unexpected frame {} to a spawn",
                h.kind
            ))),
        }
    }

    /// Runs one command to completion (its timeout, output limit and stdin
    /// as in `spec`); `echo` = (stdout, stderr) descriptors to copy its
    /// output to as it comes, instead of keeping it in the outcome.
    pub fn exec_echo(
        &self,
        spec: &ExecSpec,
        echo: Option<(i32, i32)>,
    ) -> Result<Outcome, KeeperError> {
        let started = Instant::now();
        let rs = self.spawn(spec, !matches!(spec.stdin, Stdin::Null))?;
        rs.wait(&self.id, spec, started, echo)
    }

    /// Runs one command to completion.
    pub fn exec(&self, spec: &ExecSpec) -> Result<Outcome, KeeperError> {
        self.exec_echo(spec, None)
    }

    /// The sandbox's egress policy, after replacing it with `policy` (and
    /// its credential rules with `rules`) if given (see
    /// [`crate::native::session::set_network`]).
    pub fn network(
        &self,
        policy: Option<nanoclaw_net::NetworkPolicy>,
        rules: Option<nanoclaw_net::HeaderRules>,
    ) -> Result<super::NetworkState, KeeperError> {
        match self.ask(&Request::Network { policy, rules })? {
            Reply::Network(n) => Ok(*n),
            Reply::Error(e) => Err(KeeperError::Invalid(e)),
            other => Err(KeeperError::Protocol(format!(
                "unexpected answer to a network request: {other:?}"
            ))),
        }
    }

    /// Sends `signal` to every process of the sandbox but init; returns
    /// how many children init still has.
    pub fn signal_all(&self, signal: i32) -> Result<u64, KeeperError> {
        match self.ask(&Request::Signal { signal })? {
            Reply::Live(l) => Ok(l.processes),
            Reply::Error(e) => Err(KeeperError::Invalid(e)),
            other => Err(KeeperError::Protocol(format!(
                "unexpected answer to a signal: {other:?}"
            ))),
        }
    }

    /// `sandbox stop`: SIGTERM to every process of the sandbox but init,
    /// up to `grace` for them to end, then SIGKILL. The sandbox stays,
    /// idle. Returns how many were still there for SIGKILL.
    pub fn stop_processes(&self, grace: Duration) -> Result<u64, KeeperError> {
        if self.signal_all(libc::SIGTERM)? == 0 {
            return Ok(0);
        }
        let left_after = |deadline: Instant| -> Result<u64, KeeperError> {
            loop {
                let left = match self.ask(&Request::Inspect)? {
                    Reply::Live(l) => l.processes,
                    other => {
                        return Err(KeeperError::Protocol(format!(
                            "unexpected answer to inspect: {other:?}"
                        )))
                    }
                };
                if left == 0 || Instant::now() >= deadline {
                    return Ok(left);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let left = left_after(Instant::now() + grace)?;
        if left == 0 {
            return Ok(0);
        }
        self.signal_all(libc::SIGKILL)?;
        if left_after(Instant::now() + Duration::from_secs(5))? > 0 {
            return Err(KeeperError::Invalid(format!(
                "sandbox {}: processes still there 5 s after SIGKILL; remove it",
                self.id
            )));
        }
        Ok(left)
    }
}

impl session::Execute for Remote {
    fn execute(&mut self, spec: &ExecSpec) -> Result<Outcome, crate::Error> {
        Remote::exec(self, spec).map_err(|e| match e {
            KeeperError::Engine(e) => e,
            other => crate::Error::InvalidSpec(other.to_string()),
        })
    }

    fn sandbox_id(&self) -> &str {
        &self.id
    }

    /// The keeper's report (an `Inspect`); `None` when it does not answer.
    fn network_report(&mut self) -> Option<crate::outcome::NetworkReport> {
        match self.ask(&Request::Inspect) {
            Ok(Reply::Live(l)) => l.network,
            _ => None,
        }
    }
}

/// Ends the sandbox `st` held by `remote`'s keeper and waits until the
/// keeper is gone (at most `patience` for it to answer, then 10 s for it to
/// exit). Unless `force`, the keeper is asked to stop, and cleans up
/// itself; when forced, or when it does not answer, it is killed (which
/// ends its sandbox all the same: init's lifeline) and its state and
/// cgroups are removed here. Stopping a sandbox that has ended already is
/// not an error.
pub fn stop_sandbox(
    remote: &Remote,
    st: &super::State,
    force: bool,
    patience: Duration,
) -> Result<(), KeeperError> {
    let asked = !force && remote.ask_within(&Request::Stop, patience).is_ok();
    if !asked {
        super::kill_keeper(st);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while super::keeper_alive(st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if super::keeper_alive(st) {
        return Err(KeeperError::Invalid(format!(
            "sandbox {} did not end within 10 s; kill its keeper (pid {})",
            st.id, st.keeper_pid
        )));
    }
    if asked {
        let _ = std::fs::remove_dir_all(&remote.dir);
    } else {
        // The keeper had no chance to clean up.
        super::forget(&remote.dir, st);
    }
    Ok(())
}
