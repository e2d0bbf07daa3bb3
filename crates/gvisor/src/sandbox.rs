//! A live gVisor sandbox: the handle over one runsc container, its record
//! in the bundle (so any process of this user can open it again by id),
//! and the [`LiveSandbox`] calls, each one or two runsc invocations.

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nanoclaw_sandbox::backend::{Execution, LiveSandbox, SandboxInfo, SandboxStats};
use nanoclaw_sandbox::native::session::{ExecSpec, RunState};
use nanoclaw_sandbox::netns_egress::NetnsEgress;
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
    /// The host pid of its `runsc run`, which holds the sandbox and
    /// removes it (state, cgroups runsc made) when it ends.
    pub runner_pid: i32,
    /// The process that made it (pid and start time): a sandbox not
    /// [`Record::detached`] is removed once that process is gone.
    pub owner: (i32, u64),
    /// It outlives the process that made it (the `nanoclaw.detached=true`
    /// label, `nanoclaw sandbox create`).
    pub detached: bool,
    /// Its egress goes through nanoclaw's proxy: runsc runs it with
    /// `--network=host` in a network namespace nanoclaw wired (see
    /// `crate::egress`).
    #[serde(default)]
    pub host_network: bool,
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
    /// Its `runsc run`, when this process started it (reaped here).
    pub runner: Mutex<Option<Child>>,
    /// Its egress (network allowlist or open), when this process made it:
    /// the proxy serving the listeners in the sandbox's network namespace.
    /// Stopped when the sandbox is destroyed or the last handle goes.
    pub egress: Mutex<Option<NetnsEgress>>,
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

    /// The network part of an outcome: what the proxy recorded so far, or
    /// mode `none`.
    pub fn network_report(&self) -> nanoclaw_sandbox::outcome::NetworkReport {
        match self
            .egress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(e) => e.report(),
            None => nanoclaw_sandbox::outcome::NetworkReport {
                mode: if self.record.host_network {
                    "allowlist"
                } else {
                    "none"
                }
                .into(),
                ..Default::default()
            },
        }
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
        let runner = self
            .shared
            .runner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let stopped = stop(
            &self.shared.runsc,
            &self.shared.id,
            &self.shared.bundle,
            runner,
            &self.shared.host_pids,
        );
        // The sandbox is gone: its listeners and namespace can go too.
        drop(
            self.shared
                .egress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        stopped
    }

    fn network_report(&self) -> Option<nanoclaw_sandbox::outcome::NetworkReport> {
        self.shared
            .egress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(NetnsEgress::report)
    }

    fn set_network_policy(
        &self,
        policy: nanoclaw_sandbox::net::NetworkPolicy,
    ) -> Result<nanoclaw_sandbox::net::PolicyUpdate, Error> {
        self.shared.alive()?;
        match self
            .shared
            .egress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(e) => Ok(e.set_policy(policy)),
            None => Err(crate::egress::no_proxy_to_change()),
        }
    }
}

impl Drop for GvisorSandbox {
    fn drop(&mut self) {
        // The sandbox lives on without its handle; its `runsc run`, a child
        // of this process, is reaped by a thread when the sandbox ends.
        if let Some(mut c) = self
            .shared
            .runner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            std::thread::spawn(move || {
                let _ = c.wait();
            });
        }
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

/// Whether runsc keeps state for container `id`.
pub fn has_state(runsc: &Runsc, id: &str) -> bool {
    let prefix = format!("{id}_sandbox:");
    std::fs::read_dir(&runsc.state)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
}

/// Waits for `c` to exit until `deadline`, then kills it; either way it is
/// reaped when this returns.
pub(crate) fn reap_by(mut c: Child, deadline: Instant) {
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Ends sandbox `id` and removes everything of it: its init is killed
/// (gVisor then ends the sandbox and its `runsc run` removes runsc's
/// state and cgroups), the runner is waited for (`runner`, when this
/// process holds it, else its pid among `pids`); whatever is still there
/// then goes with `runsc delete --force`; then nanoclaw's own cgroup
/// directories and the bundle. Waits until the host processes `pids` are
/// gone.
pub fn stop(
    runsc: &Runsc,
    id: &str,
    bundle: &std::path::Path,
    runner: Option<Child>,
    pids: &[i32],
) -> Result<(), Error> {
    if let Err(e) = runsc.run(&["kill", id, "KILL"]) {
        if e.to_string().contains("paused") {
            let _ = runsc.run(&["resume", id]);
            let _ = runsc.run(&["kill", id, "KILL"]);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    if let Some(c) = runner {
        reap_by(c, deadline);
    }
    while pids.iter().any(|p| running(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let deleted = if has_state(runsc, id) {
        runsc.delete(id)
    } else {
        Ok(())
    };
    cgroup::remove(id);
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
            "sandbox {id}: host process {p} still runs after it was stopped"
        )));
    }
    Ok(())
}

/// Host pids whose parent is `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let want = pid.to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        if stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            == Some(want.as_str())
        {
            out.push(p);
        }
    }
    out
}

/// Whether host process `pid` runs (not a zombie).
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}
