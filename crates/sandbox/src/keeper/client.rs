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

impl Remote {
    /// The sandbox in `dir` (with id `id`).
    pub fn new(id: &str, dir: &Path) -> Remote {
        Remote {
            id: id.to_string(),
            dir: dir.to_path_buf(),
        }
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
        let waiter = Waiter::new(rs.spawned, spec, started + spec.timeout, started, echo);
        let finished = waiter.wait(rs.conn.as_raw_fd(), &self.id)?;
        Ok(finished.into_outcome(&spec.command[0], &self.id))
    }

    /// Runs one command to completion.
    pub fn exec(&self, spec: &ExecSpec) -> Result<Outcome, KeeperError> {
        self.exec_echo(spec, None)
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
}
