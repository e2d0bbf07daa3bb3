//! What a long-lived sandbox is doing now: `sandbox pause` and `resume`,
//! and the live half of `sandbox inspect` and `ls` (state.json is the
//! static half). The keeper answers from the sandbox's cgroup.
//!
//! A paused sandbox's keeper also leaves a `paused` file in its state
//! directory, so that `ls` can show the state without asking every
//! keeper (one that is running a command answers only afterwards).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use nanoclaw_sandbox::native::session::{self, RunState};
use serde::{Deserialize, Serialize};

use super::{find, now_s, state_root, Keeper, Reply, Request, State};

/// How long `inspect` waits for a keeper that is running a command.
const INSPECT_WAIT: Duration = Duration::from_secs(2);
/// How long `pause` and `resume` wait for one (a keeper serves one request
/// at a time: a sandbox is paused between commands, not during one).
const PAUSE_WAIT: Duration = Duration::from_secs(10);
/// The marker a keeper keeps in its state directory while paused.
const PAUSED_MARK: &str = "paused";

/// Options of `sandbox pause` and `sandbox resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Sandboxes: ids (or unique prefixes) or names.
    #[arg(value_name = "ID|NAME", required = true)]
    targets: Vec<String>,
}

/// What a keeper reports about its sandbox now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Live {
    /// `running` or `paused`.
    state: String,
    /// Seconds since the epoch: the last exec, pause or resume (or creation).
    last_used: u64,
    /// Seconds since the epoch: when the keeper removes the sandbox (its
    /// lifetime's end, or earlier after `--idle-timeout` without use).
    deadline: u64,
    /// Memory charged to the sandbox's cgroup now, in bytes.
    memory_bytes: Option<u64>,
    /// CPU time used by all its processes so far, in milliseconds.
    cpu_used_ms: Option<f64>,
    /// Tasks (threads) in it now, its init included.
    tasks: Option<u64>,
    /// Whether `sandbox pause` can work here.
    can_pause: bool,
}

fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Running => "running",
        RunState::Paused => "paused",
    }
}

impl Keeper {
    /// The sandbox now.
    pub(super) fn live(&self) -> Live {
        let st = session::status(&self.sandbox);
        let now = now_s();
        let last_used = now.saturating_sub(self.last_used.elapsed().as_secs());
        let idle_end = self
            .idle
            .map(|i| (self.last_used + i).saturating_duration_since(Instant::now()))
            .map(|left| now + left.as_secs());
        Live {
            state: state_name(st.state).to_string(),
            last_used,
            deadline: idle_end.map_or(self.state.expires, |e| e.min(self.state.expires)),
            memory_bytes: st.memory_bytes,
            cpu_used_ms: st.cpu.map(|d| (d.as_micros() as f64) / 1000.0),
            tasks: st.tasks,
            can_pause: st.can_pause,
        }
    }

    /// Serves `Pause` (`pause` true) or `Resume`: counts as use. A client
    /// that gave up waiting (the keeper was running a command) is not
    /// obeyed later: it was told that nothing happened.
    pub(super) fn pause_or_resume(&mut self, pause: bool, conn: &UnixStream) -> Reply {
        if peer_gone(conn) {
            return Reply::Error("the client is gone".into());
        }
        self.last_used = Instant::now();
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

/// Whether the peer of `conn` has closed its end.
fn peer_gone(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// `running` or `paused`, from the keeper's marker (no request).
pub(super) fn state_of(dir: &Path) -> &'static str {
    if dir.join(PAUSED_MARK).exists() {
        "paused"
    } else {
        "running"
    }
}

/// A keeper that died (SIGKILL) while its sandbox was paused leaves it
/// frozen, unable to notice; thawed, the sandbox ends itself.
pub(super) fn thaw_orphan(st: &State) {
    if let Some(dir) = &st.freezer_cgroup {
        let _ = session::thaw_orphan(dir);
    }
}

/// `nanoclaw sandbox pause`.
pub fn pause(a: PauseArgs) -> Result<u8> {
    toggle(&a, &Request::Pause)
}

/// `nanoclaw sandbox resume`.
pub fn resume(a: PauseArgs) -> Result<u8> {
    toggle(&a, &Request::Resume)
}

fn toggle(a: &PauseArgs, req: &Request) -> Result<u8> {
    let root = state_root()?;
    for t in &a.targets {
        let (dir, st) = find(&root, t)?;
        let reply = ask_within(&dir, req, Some(PAUSE_WAIT)).map_err(|e| {
            let busy = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            });
            if !busy {
                return e;
            }
            anyhow!(
                "sandbox {} is busy running a command (its keeper did not answer within {} s); pause or resume it when the command is done",
                st.id,
                PAUSE_WAIT.as_secs()
            )
        })?;
        match reply {
            Reply::Live(_) => println!("{}", st.id),
            Reply::Error(e) => bail!("{e}"),
            _ => bail!("unexpected reply from the keeper"),
        }
    }
    Ok(0)
}

/// `nanoclaw sandbox inspect`: state.json, and what the keeper says now.
/// A keeper busy running a command for longer than [`INSPECT_WAIT`] is
/// not waited for: the live fields are then null and `busy` is true.
pub fn inspect(target: &str) -> Result<u8> {
    let (dir, st) = find(&state_root()?, target)?;
    let mut v = serde_json::to_value(&st)?;
    let live = match ask_within(&dir, &Request::Inspect, Some(INSPECT_WAIT)) {
        Ok(Reply::Live(l)) => Some(l),
        _ => None,
    };
    let map = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("state of {} is not an object", st.id))?;
    match live {
        Some(l) => {
            if let serde_json::Value::Object(m) = serde_json::to_value(*l)? {
                map.extend(m);
            }
        }
        None => {
            map.insert("state".into(), state_of(&dir).into());
            map.insert("busy".into(), true.into());
        }
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// Sends one request to a keeper and reads its reply, waiting at most
/// `wait` for it; a timeout is an `io::Error` (WouldBlock or TimedOut).
fn ask_within(dir: &Path, req: &Request, wait: Option<Duration>) -> Result<Reply> {
    let mut s = UnixStream::connect(dir.join("sock"))
        .with_context(|| format!("connecting to the keeper in {}", dir.display()))?;
    s.set_read_timeout(wait)?;
    s.set_write_timeout(wait)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| anyhow!("the keeper's reply: {e}"))
}
