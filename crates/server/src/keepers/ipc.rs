//! Talking to a keeper from the event loop: the requests of
//! [`Remote::ask`] and [`Remote::spawn`] (same wire protocol: one JSON
//! line, then a JSON line back or, for `Spawn`, a frame with the
//! command's pipes) over tokio's unix sockets. A request takes no thread
//! of the blocking pool, and so no hand-off to one and back: on a busy
//! 2-core machine that hand-off alone cost tens to hundreds of µs per
//! command.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nanoclaw_sandbox::keeper::{KeeperError, Remote, Reply, Request};
use nanoclaw_sandbox::native::session::{ExecSpec, Spawned};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;

/// How long a keeper may take to answer (it answers at once: it never
/// waits on a command).
pub(super) const ANSWER: Duration = Duration::from_secs(10);

fn io_error(r: &Remote, e: std::io::Error) -> KeeperError {
    KeeperError::Io {
        what: format!("talking to the keeper of {}", r.id),
        source: e,
    }
}

async fn connect(r: &Remote) -> Result<UnixStream, KeeperError> {
    UnixStream::connect(r.dir.join("sock"))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                KeeperError::NotFound(r.id.clone())
            }
            _ => KeeperError::Io {
                what: format!("connecting to the keeper of {}", r.id),
                source: e,
            },
        })
}

async fn send(r: &Remote, s: &mut UnixStream, req: &Request) -> Result<(), KeeperError> {
    let mut line =
        serde_json::to_vec(req).map_err(|e| KeeperError::Invalid(format!("request: {e}")))?;
    line.push(b'\n');
    s.write_all(&line).await.map_err(|e| io_error(r, e))
}

/// [`Remote::ask_within`]: a (non-`Spawn`) request and its reply, within
/// `wait` (else [`KeeperError::Busy`]).
pub(super) async fn ask(r: &Remote, req: &Request, wait: Duration) -> Result<Reply, KeeperError> {
    let work = async {
        let mut s = connect(r).await?;
        send(r, &mut s, req).await?;
        let mut reply = String::new();
        BufReader::new(s)
            .read_line(&mut reply)
            .await
            .map_err(|e| io_error(r, e))?;
        if reply.is_empty() {
            return Err(KeeperError::Protocol(
                "it closed the connection without an answer (the sandbox was removed meanwhile)"
                    .into(),
            ));
        }
        serde_json::from_str(&reply).map_err(|e| KeeperError::Protocol(format!("its reply: {e}")))
    };
    tokio::time::timeout(wait, work)
        .await
        .map_err(|_| KeeperError::Busy(r.id.clone()))?
}

/// [`Remote::spawn`]: starts `spec`'s command and returns the keeper
/// connection (on which `STARTED`/`EXITED` follow and `KILL` frames go;
/// closing it kills the command) and the command's pipes.
pub(super) async fn spawn(
    r: &Remote,
    spec: &ExecSpec,
    with_stdin: bool,
) -> Result<(UnixStream, Spawned), KeeperError> {
    let work = async {
        let mut s = connect(r).await?;
        let req = Request::Spawn {
            command: spec.command.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            user: spec.user.map(|u| (u.uid, u.gid)),
            stdin: with_stdin,
        };
        send(r, &mut s, &req).await?;
        loop {
            s.readable().await.map_err(|e| io_error(r, e))?;
            let got = s.try_io(Interest::READABLE, || match r.read_spawned(s.as_raw_fd()) {
                Ok(Some(sp)) => Ok(Ok(sp)),
                Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
                Err(e) => Ok(Err(e)),
            });
            match got {
                Ok(done) => return done.map(|sp| (s, sp)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(io_error(r, e)),
            }
        }
    };
    tokio::time::timeout(ANSWER, work)
        .await
        .map_err(|_| KeeperError::Busy(r.id.clone()))?
}
