//! A live gVisor sandbox: the handle over one runsc container, its record
//! in the bundle (so any process of this user can open it again by id),
//! and the [`LiveSandbox`] calls, each one or two runsc invocations.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nanoclaw_sandbox::backend::{Execution, LiveSandbox, SandboxInfo, SandboxStats};
use nanoclaw_sandbox::native::session::{ExecSpec, RunState};
use nanoclaw_sandbox::spec::SandboxSpec;
use nanoclaw_sandbox::{Error, KillReason, Layers};
use serde::{Deserialize, Serialize};

use crate::runsc::{backend_error, Runsc};
use crate::{cgroup, exec, NAME};

/// The file in a sandbox's bundle that records it for nanoclaw.
pub const RECORD: &str = "nanoclaw.json";

/// What nanoclaw keeps about a sandbox, next to its bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The configuration it was made from (its command and stdin unused).
    pub spec: SandboxSpec,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// What protects it.
    pub layers: Layers,
    /// When its lifetime ends (its init's `sleep` ends), in Unix
    /// milliseconds.
    pub deadline_ms: u64,
}

impl Record {
    /// Its deadline as a wall-clock time.
    pub fn deadline(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.deadline_ms)
    }
}

/// What a sandbox's handle and its executions share.
pub struct Shared {
    /// Its id (runsc's container id).
    pub id: String,
    /// Its bundle directory.
    pub bundle: PathBuf,
    /// How to run runsc.
    pub runsc: Runsc,
    /// Its record.
    pub record: Record,
    /// Host pids of its sandbox and gofer processes.
    pub host_pids: Vec<i32>,
    /// The next exec id.
    pub next_exec: AtomicU32,
    /// Commands running now through this handle.
    pub running: AtomicU64,
    /// [`LiveSandbox::destroy`] was called.
    pub destroyed: AtomicBool,
}

impl Shared {
    /// `Ok` unless the sandbox was destroyed.
    pub fn alive(&self) -> Result<(), Error> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::NotFound {
                id: self.id.clone(),
                what: "the sandbox was destroyed".into(),
            });
        }
        Ok(())
    }

    /// Time until the end of the sandbox's lifetime.
    pub fn time_left(&self) -> Duration {
        self.record
            .deadline()
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// Why the sandbox died under a command: its memory limit, its pids
    /// limit, or the end of its lifetime.
    pub fn death_reason(&self) -> KillReason {
        if cgroup::oom_kills(&self.id) > 0 {
            KillReason::Oom
        } else if cgroup::pids_refused(&self.id) > 0 {
            KillReason::Pids
        } else if self.time_left().is_zero() {
            KillReason::Timeout
        } else {
            KillReason::Killed
        }
    }

    /// [`Shared::death_reason`] in words.
    pub fn death_reason_text(&self) -> &'static str {
        match self.death_reason() {
            KillReason::Oom => "its memory limit fired: gVisor ends the whole sandbox when it is out of memory",
            KillReason::Pids => "its pids limit fired: gVisor ends the whole sandbox when its host threads hit the limit",
            KillReason::Timeout => "its lifetime ended",
            _ => "it was stopped",
        }
    }
}

/// The handle of one gVisor sandbox.
pub struct GvisorSandbox {
    /// What it and its executions share.
    pub shared: Arc<Shared>,
}

impl LiveSandbox for GvisorSandbox {
    fn id(&self) -> &str {
        &self.shared.id
    }

    fn info(&self) -> SandboxInfo {
        SandboxInfo {
            id: self.shared.id.clone(),
            backend: NAME.into(),
            layers: self.shared.record.layers.clone(),
            host_pids: self.shared.host_pids.clone(),
            labels: self.shared.record.labels.clone(),
        }
    }

    fn spawn(&self, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
        Ok(Box::new(exec::spawn(&self.shared, spec)?))
    }

    fn pause(&self) -> Result<(), Error> {
        self.shared.alive()?;
        match self.state()? {
            RunState::Paused => Ok(()),
            RunState::Running => self.shared.runsc.run(&["pause", &self.shared.id]).map(drop),
        }
    }

    fn resume(&self) -> Result<(), Error> {
        self.shared.alive()?;
        match self.state()? {
            RunState::Running => Ok(()),
            RunState::Paused => self
                .shared
                .runsc
                .run(&["resume", &self.shared.id])
                .map(drop),
        }
    }

    fn stats(&self) -> Result<SandboxStats, Error> {
        self.shared.alive()?;
        let state = self.state()?;
        // The sentry answers no questions while paused.
        let st = match state {
            RunState::Running => self.shared.runsc.stats(&self.shared.id)?,
            RunState::Paused => Default::default(),
        };
        Ok(SandboxStats {
            state,
            memory_bytes: st.memory,
            cpu: st.cpu_ns.map(Duration::from_nanos),
            tasks: st.pids,
            can_pause: true,
            execs: self.shared.running.load(Ordering::SeqCst),
            deadline: self.shared.record.deadline(),
        })
    }

    fn destroy(&self) -> Result<(), Error> {
        if self.shared.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        remove(
            &self.shared.runsc,
            &self.shared.id,
            &self.shared.bundle,
            &self.shared.host_pids,
        )
    }
}

impl GvisorSandbox {
    fn state(&self) -> Result<RunState, Error> {
        let id = &self.shared.id;
        match self.shared.runsc.state(id) {
            Some(s) if s.status == "paused" => Ok(RunState::Paused),
            Some(s) if s.status == "running" => Ok(RunState::Running),
            _ => Err(Error::NotFound {
                id: id.clone(),
                what: format!(
                    "the sandbox has ended ({})",
                    self.shared.death_reason_text()
                ),
            }),
        }
    }
}

/// Removes sandbox `id`: runsc's container (processes, cgroup, state),
/// then its bundle; waits until the host processes `pids` are gone.
pub fn remove(
    runsc: &Runsc,
    id: &str,
    bundle: &std::path::Path,
    pids: &[i32],
) -> Result<(), Error> {
    let deleted = runsc.delete(id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| running(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let removed = match std::fs::remove_dir_all(bundle) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Sys {
            call: format!("remove {}", bundle.display()),
            source: e,
        }),
        _ => Ok(()),
    };
    deleted?;
    removed?;
    if let Some(p) = pids.iter().find(|p| running(**p)) {
        return Err(backend_error(format!(
            "sandbox {id}: host process {p} still runs after runsc delete"
        )));
    }
    Ok(())
}

/// Whether host process `pid` runs (not a zombie).
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}
