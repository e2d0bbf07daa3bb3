//! Cgroup limits for one sandbox (v2, v1, and hybrids of the two).
//!
//! Each controller nanoclaw uses (memory, cpu, cpuacct, pids) is placed
//! independently: a controller that is enabled on the cgroup v2 (unified)
//! hierarchy is used there, otherwise its v1 hierarchy is used. Mounts are
//! found through `/proc/self/mountinfo`; nothing is hardcoded.
//!
//! Freezing (pause/resume of long-lived sandboxes, only when asked for with
//! [`CreateOptions::freezer`]) is built into every v2 cgroup
//! (`cgroup.freeze`): it is used there when the sandbox already has a v2
//! directory; otherwise the v1 freezer hierarchy; otherwise, on a hybrid
//! host whose v2 hierarchy has no controllers, a v2 directory of its own.
//! `NANOCLAW_CGROUP_FREEZER=v1|v2` forces one (tests).
//!
//! Where sandboxes go (the "parent"), per hierarchy:
//! - `NANOCLAW_CGROUP_PARENT` set: `<hierarchy root>/<that path>`;
//! - as root (euid 0): `<hierarchy root>/nanoclaw`;
//! - rootless, v2: `<D>/nanoclaw`, where `D` is the nearest writable
//!   (delegated) ancestor of the process's own cgroup, as systemd delegates
//!   `user@UID.service` (or a `systemd-run --user -p Delegate=yes` scope);
//! - rootless, v1: `<hierarchy root>/nanoclaw-<uid>`, if an administrator
//!   created it and gave it to the user.
//!
//! The sandbox's cgroup is `<parent>/<id>` in every hierarchy it uses.
//! Host discovery and parent preparation happen once per process; creating
//! a sandbox's cgroup afterwards is only `mkdir` + a few small writes.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::spec::Limits;

/// The cpu quota period written with every cpu limit, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts, in microseconds.
const CPU_MIN_QUOTA_US: u64 = 1_000;
/// Environment variable that overrides the parent cgroup (a path relative
/// to each hierarchy's root).
pub const PARENT_ENV: &str = "NANOCLAW_CGROUP_PARENT";
/// How long `destroy` keeps retrying a cgroup that is still busy.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);
/// How long `kill_all` keeps signalling processes that are still listed.
const KILL_PATIENCE: Duration = Duration::from_secs(2);
/// Environment variable that forces where the freezer goes (`v1`, `v2`).
pub const FREEZER_ENV: &str = "NANOCLAW_CGROUP_FREEZER";
/// How many controllers nanoclaw knows.
const N: usize = 5;

/// A cgroup hierarchy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// A legacy (v1) hierarchy, one per controller or co-mounted group.
    V1,
    /// The unified (v2) hierarchy.
    V2,
}

impl Version {
    fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A cgroup controller nanoclaw uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    /// Memory (and swap) limit, OOM events, peak usage.
    Memory,
    /// CPU quota (and, on v2, cpu usage).
    Cpu,
    /// CPU usage accounting (v1 only; v2 has it built in).
    Cpuacct,
    /// Task count limit.
    Pids,
    /// Freezing every process (pause and resume): v1's freezer hierarchy,
    /// or v2's built-in `cgroup.freeze`.
    Freezer,
}

const ALL: [Controller; N] = [
    Controller::Memory,
    Controller::Cpu,
    Controller::Cpuacct,
    Controller::Pids,
    Controller::Freezer,
];

impl Controller {
    /// The kernel's name for the controller.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }

    fn bit(self) -> u8 {
        1 << self.idx()
    }
}

/// Everything that can go wrong while managing a sandbox's cgroups.
///
/// One variant per failing operation; `Display` says what failed and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The sandbox id cannot be used as a cgroup directory name.
    #[error("invalid sandbox id {id:?} for a cgroup name: it must be non-empty, at most 200 bytes, without '/', newline or NUL, and not start with '.'")]
    InvalidId {
        /// The rejected id.
        id: String,
    },
    /// A limit has a value no kernel accepts.
    #[error("invalid {limit} limit: {why}")]
    InvalidLimit {
        /// The limit (memory, memory-swap, cpus, pids).
        limit: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Reading the host's cgroup layout failed.
    #[error(
        "cannot read {path}: {source}; nanoclaw needs /proc mounted to find the cgroup hierarchies"
    )]
    Discover {
        /// The file that could not be read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a cgroup directory failed.
    #[error("cannot create cgroup {path}: {source}; {}", create_hint(.source))]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a limit failed.
    #[error("cannot write {value:?} to {path}: {source}; the kernel refused this limit value (check that it is not below the current usage and not above the parent cgroup's limit)")]
    WriteLimit {
        /// The interface file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Moving a process into the sandbox's cgroup failed.
    #[error("cannot move process {pid} into {path}: {source}; {}", add_hint(.source))]
    AddProcess {
        /// The `cgroup.procs` file.
        path: PathBuf,
        /// The process.
        pid: libc::pid_t,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Freezing or thawing the sandbox's processes failed.
    #[error("cannot write {value:?} to {path}: {source}; {}", freeze_hint(.source))]
    Freeze {
        /// `freezer.state` (v1) or `cgroup.freeze` (v2).
        path: PathBuf,
        /// What was written.
        value: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Some process did not freeze in time; the cgroup was thawed again.
    #[error("the processes in {} did not all stop within {} ms (one may be stuck in the kernel, e.g. on a hung network filesystem); the sandbox was left running: retry later", .path.display(), .waited.as_millis())]
    FreezeTimeout {
        /// The cgroup directory.
        path: PathBuf,
        /// How long it was given.
        waited: Duration,
    },
    /// Removing a cgroup directory failed.
    #[error("cannot remove cgroup {path}: {source}; processes may still be inside: kill them (see its cgroup.procs) and rmdir it")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An explicitly requested limit cannot be enforced on this host.
    #[error("cannot enforce the {limit} limit: {why}. To fix: {fix}")]
    Unavailable {
        /// The limit, e.g. "memory (256 MiB)".
        limit: String,
        /// Why it cannot be enforced.
        why: String,
        /// What to do about it.
        fix: String,
    },
}

fn create_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: run as root, or from a delegated cgroup (systemd-run --user -p Delegate=yes --scope nanoclaw ...)"
        }
        Some(libc::EROFS) => {
            "the cgroup filesystem is read-only here (inside a container?): give the container a writable, delegated cgroup"
        }
        Some(libc::ENOSPC) | Some(libc::EAGAIN) => {
            "too many cgroups (cgroup.max.descendants or the kernel's limit): remove stale sandboxes' cgroups"
        }
        _ => "check that the cgroup filesystem is mounted and writable",
    }
}

fn freeze_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: the freezer cgroup must be writable by this user (delegated)"
        }
        Some(libc::ENOENT) => "the sandbox's cgroup is gone (has the sandbox ended?)",
        _ => "the kernel refused to freeze or thaw the cgroup",
    }
}

fn add_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ESRCH) => "the process is gone",
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: on cgroup v2 the caller needs write access to the common ancestor of both cgroups (run nanoclaw inside the delegated subtree)"
        }
        Some(libc::EBUSY) => {
            "cgroup v2 refuses processes in a cgroup whose children use controllers: the sandbox cgroup must be a leaf"
        }
        _ => "the kernel refused the move",
    }
}

/// Events counted by the kernel in the sandbox's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CgroupEvents {
    /// Processes killed by the OOM killer because of the memory limit.
    pub oom_kills: u64,
    /// Forks refused because of the pids limit.
    pub pids_max_hits: u64,
}

/// Resource usage of the sandbox's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    /// Highest memory usage seen, in bytes (None if the kernel cannot say).
    pub peak_memory: Option<u64>,
    /// CPU time used by every process of the sandbox.
    pub cpu: Option<Duration>,
}

/// What the sandbox's cgroup holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CgroupUsage {
    /// Memory charged to the sandbox now, in bytes (page cache included).
    pub memory_bytes: Option<u64>,
    /// CPU time used so far by every process of the sandbox.
    pub cpu: Option<Duration>,
    /// Tasks (threads) in the sandbox now.
    pub tasks: Option<u64>,
}

/// Tuning for [`Cgroup::create_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Make `stats().cpu` available even where it costs an extra cgroup:
    /// on v1 hosts whose `cpuacct` is a hierarchy of its own (not co-mounted
    /// with `cpu`), that is one more mkdir, move and rmdir per sandbox
    /// (≈ 60 µs). Without it, `stats().cpu` is None there (the caller can
    /// use the init process's rusage instead). Default: true.
    pub cpu_accounting: bool,
    /// Make [`Cgroup::freeze`] available: free where the sandbox has a v2
    /// directory anyway, else one more directory (a v1 freezer one), like
    /// `cpu_accounting`. Where the host offers no usable freezer the
    /// cgroup is made without one and a note says why. Default: false.
    pub freezer: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cpu_accounting: true,
            freezer: false,
        }
    }
}

/// One directory nanoclaw made for a sandbox.
#[derive(Debug)]
struct Dir {
    path: PathBuf,
    version: Version,
    /// Bit set of the controllers this directory serves (`Controller::bit`).
    controllers: u8,
}

/// A sandbox's cgroup(s): one directory per hierarchy used.
///
/// Dropping it removes the directories (best effort); call
/// [`Cgroup::destroy`] to see errors.
#[derive(Debug)]
pub struct Cgroup {
    id: String,
    dirs: Vec<Dir>,
    /// Index in `dirs` per controller (cpuacct: where cpu usage is read).
    by_controller: [Option<usize>; N],
    /// Where cpu usage is read from: a v2 dir's `cpu.stat` or v1 `cpuacct.usage`.
    cpu_usage: Option<usize>,
    v2_fd: OnceLock<Option<OwnedFd>>,
}

/// Where one controller lives on this host and whether we can use it.
#[derive(Debug, Clone)]
enum Slot {
    /// Not offered by the kernel on any mounted hierarchy.
    Absent,
    /// Offered, but we cannot create cgroups there.
    Unusable {
        version: Version,
        mount: PathBuf,
        why: String,
        fix: String,
    },
    /// Sandboxes go in `parent/<id>`.
    Usable {
        version: Version,
        mount: PathBuf,
        parent: PathBuf,
    },
}

/// The host's cgroup layout as seen by this process.
#[derive(Debug, Clone)]
struct Host {
    slots: [Slot; N],
    v2_mount: Option<PathBuf>,
    rootful: bool,
    uid: u32,
}

static HOST: Mutex<Option<Arc<Host>>> = Mutex::new(None);

/// The prepared host layout, discovered once per process.
fn host(refresh: bool) -> Result<Arc<Host>, CgroupError> {
    let mut guard = HOST.lock().unwrap_or_else(|p| p.into_inner());
    if !refresh {
        if let Some(h) = guard.as_ref() {
            return Ok(h.clone());
        }
    }
    let h = Arc::new(discover(true)?);
    *guard = Some(h.clone());
    Ok(h)
}

impl Cgroup {
    /// Creates the sandbox's cgroup(s) named `id` under nanoclaw's parent
    /// and writes the limits.
    ///
    /// Returns the cgroup (None when no controller could be used at all)
    /// and human-readable notes about limits that were only defaulted
    /// (`limits.explicit.*` false) and cannot be enforced here. An explicit
    /// limit that cannot be enforced is [`CgroupError::Unavailable`].
    pub fn create(id: &str, limits: &Limits) -> Result<(Option<Cgroup>, Vec<String>), CgroupError> {
        Self::create_with(id, limits, CreateOptions::default())
    }

    /// [`Cgroup::create`] with tuning options.
    pub fn create_with(
        id: &str,
        limits: &Limits,
        opts: CreateOptions,
    ) -> Result<(Option<Cgroup>, Vec<String>), CgroupError> {
        let (plan, mut degraded) = Self::plan_with(id, limits, opts)?;
        let Some(plan) = plan else {
            return Ok((None, degraded));
        };
        let (cg, more) = plan.create()?;
        degraded.extend(more);
        Ok((Some(cg), degraded))
    }

    /// The first half of [`Cgroup::create_with`]: decides which controllers
    /// the sandbox gets and where, from the host's layout alone (no
    /// directory is made). An explicit limit this host cannot enforce is an
    /// error here already. [`PlannedCgroup::create`] does the rest, so the
    /// caller can overlap the kernel's work for it (≈0.15 ms on v1) with
    /// the sandbox's own set-up.
    pub fn plan_with(
        id: &str,
        limits: &Limits,
        opts: CreateOptions,
    ) -> Result<(Option<PlannedCgroup>, Vec<String>), CgroupError> {
        validate_id(id)?;
        validate_limits(limits)?;
        let h = host(false)?;
        plan_in(&h, id, limits, opts)
    }

    /// Moves process `pid` into every cgroup of the sandbox. Call it before
    /// the process runs anything of the sandbox's.
    pub fn add_process(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        let value = pid.to_string();
        for d in &self.dirs {
            let path = d.path.join("cgroup.procs");
            write_file(&path, value.as_bytes()).map_err(|source| CgroupError::AddProcess {
                path,
                pid,
                source,
            })?;
        }
        Ok(())
    }

    /// Prepares moving the single-threaded process `pid` in: v2
    /// directories get it at once (`cgroup.procs`); for each v1 directory
    /// its `tasks` file is opened here, by the caller (whose credentials
    /// the kernel checks), and returned for `pid` to write `0` into
    /// itself.
    ///
    /// Why: moving another process (or a whole thread group) takes the
    /// kernel's global `cgroup_threadgroup_rwsem` for writing, which waits
    /// for an RCU grace period whenever no other move happened just
    /// before: 5 ms median, up to 13 ms on a 2-vCPU VM, longer than the
    /// rest of a sandbox's start. A thread moving only itself through
    /// `tasks` skips that lock (0.03 ms).
    pub fn join_handles(&self, pid: libc::pid_t) -> Result<Vec<OwnedFd>, CgroupError> {
        let mut out = Vec::new();
        for d in &self.dirs {
            match d.version {
                Version::V2 => {
                    let path = d.path.join("cgroup.procs");
                    write_file(&path, pid.to_string().as_bytes())
                        .map_err(|source| CgroupError::AddProcess { path, pid, source })?;
                }
                Version::V1 => {
                    let path = d.path.join("tasks");
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|source| CgroupError::AddProcess { path, pid, source })?;
                    out.push(OwnedFd::from(f));
                }
            }
        }
        Ok(out)
    }

    /// The events the kernel counted: OOM kills and refused forks.
    pub fn events(&self) -> CgroupEvents {
        let mut ev = CgroupEvents::default();
        if let Some(d) = self.dir(Controller::Memory) {
            ev.oom_kills = match d.version {
                Version::V2 => read_key(&d.path.join("memory.events"), "oom_kill"),
                Version::V1 => read_key(&d.path.join("memory.oom_control"), "oom_kill"),
            }
            .unwrap_or(0);
        }
        if let Some(d) = self.dir(Controller::Pids) {
            ev.pids_max_hits = read_key(&d.path.join("pids.events"), "max").unwrap_or(0);
        }
        ev
    }

    /// Peak memory and cpu time, as the kernel accounted them.
    pub fn stats(&self) -> CgroupStats {
        let peak_memory = self.dir(Controller::Memory).and_then(|d| match d.version {
            Version::V2 => read_u64(&d.path.join("memory.peak")),
            Version::V1 => read_u64(&d.path.join("memory.max_usage_in_bytes")),
        });
        CgroupStats {
            peak_memory,
            cpu: self.cpu_used(),
        }
    }

    fn cpu_used(&self) -> Option<Duration> {
        let d = &self.dirs[self.cpu_usage?];
        match d.version {
            Version::V2 => {
                read_key(&d.path.join("cpu.stat"), "usage_usec").map(Duration::from_micros)
            }
            Version::V1 => read_u64(&d.path.join("cpuacct.usage")).map(Duration::from_nanos),
        }
    }

    /// Memory, cpu time and tasks now, as the kernel accounts them (None
    /// where no controller of this cgroup counts it).
    pub fn usage(&self) -> CgroupUsage {
        let memory_bytes = self.dir(Controller::Memory).and_then(|d| match d.version {
            Version::V2 => read_u64(&d.path.join("memory.current")),
            Version::V1 => read_u64(&d.path.join("memory.usage_in_bytes")),
        });
        let tasks = match self.dir(Controller::Pids) {
            Some(d) => read_u64(&d.path.join("pids.current")),
            // Every directory lists every task: count the lines.
            None => self.dirs.first().and_then(|d| {
                let file = match d.version {
                    Version::V2 => "cgroup.threads",
                    Version::V1 => "tasks",
                };
                let s = fs::read_to_string(d.path.join(file)).ok()?;
                Some(s.lines().count() as u64)
            }),
        };
        CgroupUsage {
            memory_bytes,
            cpu: self.cpu_used(),
            tasks,
        }
    }

    /// Whether this cgroup was made with a freezer ([`CreateOptions::freezer`]).
    pub fn can_freeze(&self) -> bool {
        self.dir(Controller::Freezer).is_some()
    }

    /// The directory whose freezer file [`thaw_dir`] writes, if any.
    pub fn freezer_path(&self) -> Option<&Path> {
        self.dir(Controller::Freezer).map(|d| d.path.as_path())
    }

    /// Stops every process of the sandbox and returns once the kernel
    /// reports them all stopped (v2 `cgroup.events` `frozen 1`, v1
    /// `freezer.state` `FROZEN`). A process that does not stop within
    /// `patience` (one stuck in the kernel) makes it thaw everything again
    /// and fail: the sandbox is then never left half frozen.
    pub fn freeze(&self, patience: Duration) -> Result<(), CgroupError> {
        let Some(d) = self.dir(Controller::Freezer) else {
            return Err(no_freezer(&self.id));
        };
        let (file, on) = freezer_file(d.version, true);
        write_freeze(&d.path.join(file), on)?;
        let deadline = Instant::now() + patience;
        let mut pause = Duration::from_micros(20);
        loop {
            if frozen(d) == Some(true) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.thaw();
                return Err(CgroupError::FreezeTimeout {
                    path: d.path.clone(),
                    waited: patience,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Lets the processes of the sandbox run again.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        let Some(d) = self.dir(Controller::Freezer) else {
            return Err(no_freezer(&self.id));
        };
        let (file, off) = freezer_file(d.version, false);
        write_freeze(&d.path.join(file), off)
    }

    /// Whether the kernel reports the cgroup frozen (None: no freezer).
    pub fn is_frozen(&self) -> Option<bool> {
        frozen(self.dir(Controller::Freezer)?)
    }

    /// SIGKILL to every process of a frozen sandbox, then thaw: the
    /// processes die without running again (a frozen v1 process does not
    /// act on SIGKILL until it is thawed). Best effort, does not wait.
    pub fn kill_frozen(&self) {
        if let Some(first) = self.dirs.first() {
            let v2_killed = self
                .dirs
                .iter()
                .find(|d| d.version == Version::V2)
                .is_some_and(|d| write_file(&d.path.join("cgroup.kill"), b"1").is_ok());
            if !v2_killed {
                let procs = first.path.join("cgroup.procs");
                signal_members(&procs, &read_pids(&procs));
            }
        }
        let _ = self.thaw();
    }

    /// The processes currently in the sandbox's cgroup.
    pub fn procs(&self) -> Vec<libc::pid_t> {
        self.dirs
            .first()
            .map(|d| read_pids(&d.path.join("cgroup.procs")))
            .unwrap_or_default()
    }

    /// Kills every process in the sandbox: v2 `cgroup.kill` when the kernel
    /// has it, otherwise SIGKILL to each listed process until the list is
    /// empty (bounded in time). Never signals a process outside the cgroup.
    pub fn kill_all(&self) {
        let Some(first) = self.dirs.first() else {
            return;
        };
        if let Some(d) = self.dirs.iter().find(|d| d.version == Version::V2) {
            if write_file(&d.path.join("cgroup.kill"), b"1").is_ok() {
                return;
            }
        }
        let procs = first.path.join("cgroup.procs");
        let deadline = Instant::now() + KILL_PATIENCE;
        let mut pause = Duration::from_micros(100);
        loop {
            let pids = read_pids(&procs);
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            signal_members(&procs, &pids);
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// For a process of the sandbox to move itself out (its init, once
    /// nothing else of the sandbox runs, so that the cgroup can be removed
    /// while init still lives): the `tasks` file of the parent of each v1
    /// directory, opened here by the caller (whose credentials the kernel
    /// checks), for that process to write `0` into — cheap, as in
    /// [`Cgroup::join_handles`]. None when a directory is on v2, where a
    /// process can only move itself through `cgroup.procs`, which takes the
    /// kernel's global lock and an RCU grace period (≈7 ms here), and whose
    /// parent may hold no process when it enables controllers.
    pub fn leave_handles(&self) -> Option<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| match d.version {
                Version::V1 => {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(d.path.parent()?.join("tasks"))
                        .ok()?;
                    Some(OwnedFd::from(f))
                }
                Version::V2 => None,
            })
            .collect()
    }

    /// Removes every directory this cgroup made, retrying briefly while the
    /// kernel still counts exiting processes in it.
    pub fn destroy(mut self) -> Result<(), CgroupError> {
        self.remove_dirs()
    }

    /// Which version each used controller is on, e.g. `["memory: v1",
    /// "pids: v2", "cpu: v2"]`.
    pub fn describe(&self) -> Vec<String> {
        ALL.iter()
            .filter_map(|&c| {
                let d = self.dir(c)?;
                Some(format!("{}: {}", c.name(), d.version.as_str()))
            })
            .collect()
    }

    /// The version a controller is used on by this sandbox, if it is used.
    pub fn version_of(&self, c: Controller) -> Option<Version> {
        self.dir(c).map(|d| d.version)
    }

    /// The directories this sandbox's cgroup consists of.
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.path.as_path()).collect()
    }

    /// The sandbox id (the leaf directory name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// An fd of the v2 cgroup directory, usable with `clone3`'s
    /// `CLONE_INTO_CGROUP`, when every controller is on v2 (so that a
    /// single directory is the whole cgroup). Owned by `self`.
    pub fn v2_dir_fd(&self) -> Option<RawFd> {
        if self.dirs.len() != 1 || self.dirs[0].version != Version::V2 {
            return None;
        }
        self.v2_fd
            .get_or_init(|| open_dir(&self.dirs[0].path).ok())
            .as_ref()
            .map(|fd| fd.as_raw_fd())
    }

    fn dir(&self, c: Controller) -> Option<&Dir> {
        self.by_controller[c.idx()].map(|i| &self.dirs[i])
    }

    fn remove_dirs(&mut self) -> Result<(), CgroupError> {
        // The fd keeps nothing alive, but close it before removing anyway.
        drop(self.v2_fd.take());
        let mut first_err = None;
        for d in self.dirs.drain(..) {
            if let Err(e) = remove_dir(&d.path) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = self.remove_dirs();
    }
}

/// (file, value) that freezes (`on`) or thaws a cgroup of version `v`.
fn freezer_file(v: Version, on: bool) -> (&'static str, &'static str) {
    match (v, on) {
        (Version::V2, true) => ("cgroup.freeze", "1"),
        (Version::V2, false) => ("cgroup.freeze", "0"),
        (Version::V1, true) => ("freezer.state", "FROZEN"),
        (Version::V1, false) => ("freezer.state", "THAWED"),
    }
}

fn write_freeze(path: &Path, value: &'static str) -> Result<(), CgroupError> {
    write_file(path, value.as_bytes()).map_err(|source| CgroupError::Freeze {
        path: path.to_path_buf(),
        value,
        source,
    })
}

fn no_freezer(id: &str) -> CgroupError {
    CgroupError::Unavailable {
        limit: format!("freezer of sandbox {id}"),
        why: "its cgroup was made without a freezer".into(),
        fix: "create the sandbox as a long-lived one (session::create)".into(),
    }
}

/// Whether the kernel reports the freezer directory `d` frozen.
fn frozen(d: &Dir) -> Option<bool> {
    match d.version {
        Version::V2 => read_key(&d.path.join("cgroup.events"), "frozen").map(|v| v == 1),
        // FREEZING while some task has not stopped yet.
        Version::V1 => fs::read_to_string(d.path.join("freezer.state"))
            .ok()
            .map(|s| s.trim() == "FROZEN"),
    }
}

/// Thaws the cgroup directory `path` (v1 `freezer.state` or v2
/// `cgroup.freeze`), for a holder that died while its sandbox was frozen:
/// its frozen processes would otherwise never notice that it is gone.
/// Refuses anything that is not a directory of a cgroup filesystem.
pub fn thaw_dir(path: &Path) -> Result<(), CgroupError> {
    let not_cgroup = || CgroupError::Freeze {
        path: path.to_path_buf(),
        value: "THAWED",
        source: io::Error::from_raw_os_error(libc::ENOTDIR),
    };
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| not_cgroup())?;
    // SAFETY: an all-zero statfs is a valid value for statfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::NotFound => Ok(()),
            source => Err(CgroupError::Freeze {
                path: path.to_path_buf(),
                value: "THAWED",
                source,
            }),
        };
    }
    // The field's and the constants' types differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    let version = match st.f_type as i64 {
        t if t == libc::CGROUP2_SUPER_MAGIC as i64 => Version::V2,
        t if t == libc::CGROUP_SUPER_MAGIC as i64 => Version::V1,
        _ => return Err(not_cgroup()),
    };
    let (file, off) = freezer_file(version, false);
    match write_freeze(&path.join(file), off) {
        Err(CgroupError::Freeze { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(())
        }
        r => r,
    }
}

fn remove_dir(path: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    let mut pause = Duration::from_micros(50);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Sends SIGKILL to those of `pids` that are still members of the cgroup
/// whose `cgroup.procs` is `procs`, without racing with pid reuse: each
/// process is pinned with a pidfd first, then membership is re-read, then
/// only pinned processes still listed are signalled.
fn signal_members(procs: &Path, pids: &[libc::pid_t]) {
    let mut pinned: Vec<(libc::pid_t, Option<OwnedFd>)> = Vec::with_capacity(pids.len());
    for &pid in pids {
        match super::sys::pidfd_open(pid) {
            // SAFETY: `raw` is a fresh fd returned by pidfd_open that nothing
            // else owns.
            Ok(raw) => pinned.push((pid, Some(unsafe { OwnedFd::from_raw_fd(raw) }))),
            // Kernel < 5.3: no pidfds; fall back to kill(2) below.
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => pinned.push((pid, None)),
            Err(_) => {}
        }
    }
    let still = read_pids(procs);
    for (pid, fd) in pinned {
        if !still.contains(&pid) {
            continue;
        }
        match fd {
            Some(fd) => {
                // SAFETY: `fd` is a valid pidfd we own; a null siginfo is allowed.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
            None => {
                // SAFETY: kill has no memory arguments.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn validate_id(id: &str) -> Result<(), CgroupError> {
    let bad = id.is_empty()
        || id.len() > 200
        || id.starts_with('.')
        || id.bytes().any(|b| b == b'/' || b == b'\n' || b == 0);
    if bad {
        return Err(CgroupError::InvalidId { id: id.to_string() });
    }
    Ok(())
}

fn validate_limits(l: &Limits) -> Result<(), CgroupError> {
    if let Some(c) = l.cpus {
        if !c.is_finite() || c <= 0.0 {
            return Err(CgroupError::InvalidLimit {
                limit: "cpus",
                why: format!("{c} is not a positive number of cpus"),
            });
        }
    }
    if let (Some(m), Some(s)) = (l.memory, l.memory_swap) {
        if s < m {
            return Err(CgroupError::InvalidLimit {
                limit: "memory-swap",
                why: format!(
                    "memory+swap ({}) is smaller than memory ({}); it counts memory plus swap, so it must be at least the memory limit",
                    human(s),
                    human(m)
                ),
            });
        }
    }
    if l.pids == Some(0) {
        return Err(CgroupError::InvalidLimit {
            limit: "pids",
            why: "0 would not even allow the first process".to_string(),
        });
    }
    Ok(())
}

/// Bytes as a short human string ("512 MiB").
fn human(b: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if b >= size && b.checked_rem(size) == Some(0) {
            return format!("{} {unit}", b / size);
        }
    }
    if b >= 1 << 20 {
        return format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    }
    format!("{b} bytes")
}

/// What a controller is needed for in this sandbox.
struct Need {
    controller: Controller,
    /// Human description of the limit, e.g. "memory (256 MiB)"; None when
    /// the controller is only wanted for accounting.
    limit: Option<String>,
    explicit: bool,
}

/// How old an empty sandbox cgroup must be before it counts as left
/// behind (a runner that was SIGKILLed could not remove it; its processes
/// are gone — init dies with the runner — so the directory is empty).
const STALE_AGE: std::time::Duration = std::time::Duration::from_secs(60);

static SWEEP_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This process will not sweep stale cgroups: a keeper, one of possibly
/// thousands alive, each a new process, would otherwise list every
/// sibling's cgroup in every hierarchy at its start (O(sandboxes) per
/// create); a killed keeper's cgroups are removed by whoever notices it
/// gone (`keeper::forget`), and one-shot runs still sweep.
pub fn skip_stale_sweep() {
    SWEEP_DONE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Removes empty sandbox cgroups (12 hex digit names) older than
/// [`STALE_AGE`] under our parents, once per process. `rmdir` of a cgroup
/// that still has processes fails, so a live sandbox is never touched; the
/// age keeps a concurrent runner's brand-new cgroup out of reach.
fn sweep_stale(h: &Host) {
    if SWEEP_DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let now = std::time::SystemTime::now();
    // NANOCLAW_CGROUP_STALE_SECS overrides the age (tests).
    let min_age = std::env::var("NANOCLAW_CGROUP_STALE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(STALE_AGE, std::time::Duration::from_secs);
    let mut seen: Vec<&Path> = Vec::with_capacity(4);
    for slot in &h.slots {
        let Slot::Usable { parent, .. } = slot else {
            continue;
        };
        if seen.contains(&parent.as_path()) {
            continue;
        }
        seen.push(parent);
        // A directory's link count is 2 + its subdirectories: with none,
        // there is nothing to sweep (the common case, one stat).
        use std::os::unix::fs::MetadataExt;
        if fs::metadata(parent).is_ok_and(|m| m.nlink() <= 2) {
            continue;
        }
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.len() != 12 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= min_age);
            if old {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
}

/// Removes the cgroup directories of sandbox `id` (12 hex digits) under
/// our parents, as soon as they are empty, waiting up to `patience` for
/// its last processes to leave: for a sandbox whose holder was killed
/// before it could clean up (its init dies with the holder; one that was
/// paused is thawed first, or it could not). A cgroup that still has
/// processes is never removed (`rmdir` refuses). Returns whether nothing
/// of it is left.
pub fn remove_sandbox_cgroups(id: &str, patience: Duration) -> bool {
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let Ok(h) = host(false) else {
        return true;
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for slot in &h.slots {
        if let Slot::Usable { parent, .. } = slot {
            let d = parent.join(id);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    // A sandbox paused when its holder died is still frozen: it could
    // never end (nor its cgroups empty) until thawed.
    if let Slot::Usable { parent, .. } = &h.slots[Controller::Freezer.idx()] {
        let _ = thaw_dir(&parent.join(id));
    }
    let deadline = Instant::now() + patience;
    loop {
        dirs.retain(|d| match fs::remove_dir(d) {
            Ok(()) => false,
            Err(e) => e.raw_os_error() != Some(libc::ENOENT),
        });
        if dirs.is_empty() || Instant::now() >= deadline {
            return dirs.is_empty();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn plan_in(
    h: &Host,
    id: &str,
    limits: &Limits,
    opts: CreateOptions,
) -> Result<(Option<PlannedCgroup>, Vec<String>), CgroupError> {
    let mut degraded = Vec::new();
    let mut needs = Vec::with_capacity(4);
    needs.push(Need {
        controller: Controller::Memory,
        limit: limits.memory.map(|m| format!("memory ({})", human(m))),
        explicit: limits.explicit.memory,
    });
    if let Some(c) = limits.cpus {
        needs.push(Need {
            controller: Controller::Cpu,
            limit: Some(format!("cpus ({c})")),
            explicit: limits.explicit.cpus,
        });
    }
    if let Some(p) = limits.pids {
        needs.push(Need {
            controller: Controller::Pids,
            limit: Some(format!("pids ({p})")),
            explicit: limits.explicit.pids,
        });
    }

    // Decide which controllers to use.
    let mut chosen: Vec<(Controller, Version, PathBuf)> = Vec::with_capacity(4);
    for n in &needs {
        match &h.slots[n.controller.idx()] {
            Slot::Usable {
                version, parent, ..
            } => chosen.push((n.controller, *version, parent.clone())),
            slot => {
                let Some(limit) = &n.limit else {
                    continue; // accounting only: nothing to complain about
                };
                let (why, fix) = slot_problem(n.controller, slot, h);
                if n.explicit {
                    return Err(CgroupError::Unavailable {
                        limit: limit.clone(),
                        why,
                        fix,
                    });
                }
                degraded.push(format!(
                    "{limit} limit not enforced: {why}; to enforce it: {fix}"
                ));
            }
        }
    }
    // CPU usage: free on v2 (cpu.stat is a core file of every v2 cgroup);
    // on v1 it needs cpuacct (often co-mounted with cpu).
    let has_v2 = chosen.iter().any(|c| c.1 == Version::V2);
    let cpu_parent = chosen
        .iter()
        .find(|c| c.0 == Controller::Cpu)
        .map(|c| c.2.clone());
    if !has_v2 {
        if let Slot::Usable {
            version, parent, ..
        } = &h.slots[Controller::Cpuacct.idx()]
        {
            // Free when co-mounted with cpu (same directory); otherwise one
            // more directory, which the caller may decline.
            if opts.cpu_accounting || cpu_parent.as_deref() == Some(parent.as_path()) {
                chosen.push((Controller::Cpuacct, *version, parent.clone()));
            }
        }
    }
    if opts.freezer {
        match &h.slots[Controller::Freezer.idx()] {
            Slot::Usable {
                version, parent, ..
            } => chosen.push((Controller::Freezer, *version, parent.clone())),
            slot => {
                let (why, fix) = slot_problem(Controller::Freezer, slot, h);
                degraded.push(format!(
                    "pause is not available: {why}; to make it available: {fix}"
                ));
            }
        }
    }
    if chosen.is_empty() {
        return Ok((None, degraded));
    }
    Ok((
        Some(PlannedCgroup {
            id: id.to_string(),
            chosen,
            limits: *limits,
            opts,
        }),
        degraded,
    ))
}

/// A sandbox cgroup decided on but not made yet: see [`Cgroup::plan_with`].
#[derive(Debug)]
pub struct PlannedCgroup {
    id: String,
    chosen: Vec<(Controller, Version, PathBuf)>,
    limits: Limits,
    opts: CreateOptions,
}

impl PlannedCgroup {
    /// Whether the cgroup will have controller `c`.
    pub fn uses(&self, c: Controller) -> bool {
        self.chosen.iter().any(|x| x.0 == c)
    }

    /// What [`Cgroup::describe`] will say once it is made.
    pub fn describe(&self) -> Vec<String> {
        ALL.iter()
            .filter_map(|&c| {
                let (_, v, _) = self.chosen.iter().find(|x| x.0 == c)?;
                Some(format!("{}: {}", c.name(), v.as_str()))
            })
            .collect()
    }

    /// Makes the directories and writes the limits. Returns the cgroup and
    /// notes about limits only partly enforced (e.g. no swap accounting).
    pub fn create(self) -> Result<(Cgroup, Vec<String>), CgroupError> {
        sweep_stale(&*host(false)?);
        match make(&self.id, &self.chosen, &self.limits) {
            // The parent vanished (someone removed it): prepare it again once.
            Err(e)
                if matches!(&e, CgroupError::Create { source, .. }
                    if source.raw_os_error() == Some(libc::ENOENT)) =>
            {
                let h = host(true)?;
                match plan_in(&h, &self.id, &self.limits, self.opts)? {
                    (Some(p), _) => make(&p.id, &p.chosen, &p.limits),
                    (None, _) => Err(e),
                }
            }
            r => r,
        }
    }
}

/// The second half of creating a cgroup: directories and limits.
fn make(
    id: &str,
    chosen: &[(Controller, Version, PathBuf)],
    limits: &Limits,
) -> Result<(Cgroup, Vec<String>), CgroupError> {
    let mut degraded = Vec::new();

    // One directory per hierarchy (co-mounted v1 controllers share one).
    let mut cg = Cgroup {
        id: id.to_string(),
        dirs: Vec::with_capacity(chosen.len()),
        by_controller: [None; N],
        cpu_usage: None,
        v2_fd: OnceLock::new(),
    };
    for (c, version, parent) in chosen {
        let (c, version, parent) = (*c, *version, parent.as_path());
        let i = match cg
            .dirs
            .iter()
            .position(|d| d.version == version && d.path.parent() == Some(parent))
        {
            Some(i) => i,
            None => {
                let path = parent.join(id);
                make_dir(&path)?;
                cg.dirs.push(Dir {
                    path,
                    version,
                    controllers: 0,
                });
                cg.dirs.len() - 1
            }
        };
        cg.dirs[i].controllers |= c.bit();
        cg.by_controller[c.idx()] = Some(i);
    }
    cg.cpu_usage = cg
        .dirs
        .iter()
        .position(|d| d.version == Version::V2)
        .or(cg.by_controller[Controller::Cpuacct.idx()]);

    // Write the limits. Any error drops `cg`, which removes what was made.
    if let (Some(d), Some(mem)) = (cg.dir(Controller::Memory), limits.memory) {
        let swap = limits.effective_memory_swap().unwrap_or(mem);
        write_memory(d, mem, swap, limits.explicit.memory, &mut degraded)?;
    }
    if let (Some(d), Some(cpus)) = (cg.dir(Controller::Cpu), limits.cpus) {
        let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(CPU_MIN_QUOTA_US);
        match d.version {
            Version::V2 => write_limit(&d.path, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?,
            // A new v1 cgroup's period is already 100000 µs (the kernel default).
            Version::V1 => write_limit(&d.path, "cpu.cfs_quota_us", &quota.to_string())?,
        }
    }
    if let (Some(d), Some(pids)) = (cg.dir(Controller::Pids), limits.pids) {
        // `--pids N` is N tasks for the command; the sandbox's own init is
        // one more task in the same cgroup.
        write_limit(&d.path, "pids.max", &(pids + 1).to_string())?;
    }
    Ok((cg, degraded))
}

fn write_memory(
    d: &Dir,
    mem: u64,
    swap: u64,
    explicit: bool,
    degraded: &mut Vec<String>,
) -> Result<(), CgroupError> {
    let (swap_file, swap_value) = match d.version {
        Version::V2 => {
            write_limit(&d.path, "memory.max", &mem.to_string())?;
            // The whole sandbox dies on OOM, not one arbitrary process.
            // (Absent before Linux 4.19: then only the biggest process dies.)
            match write_file(&d.path.join("memory.oom.group"), b"1") {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r.map_err(|source| CgroupError::WriteLimit {
                    path: d.path.join("memory.oom.group"),
                    value: "1".to_string(),
                    source,
                })?,
            }
            ("memory.swap.max", swap.saturating_sub(mem))
        }
        // Order matters on v1: memsw must stay >= limit at every step; a new
        // cgroup starts with both unlimited, so the limit goes first.
        Version::V1 => {
            write_limit(&d.path, "memory.limit_in_bytes", &mem.to_string())?;
            ("memory.memsw.limit_in_bytes", swap)
        }
    };
    let path = d.path.join(swap_file);
    match write_file(&path, swap_value.to_string().as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // No swap accounting in this kernel (or swapaccount=0).
            let why = format!(
                "the kernel has no cgroup swap accounting ({} is missing)",
                path.display()
            );
            if swap > mem {
                let limit = format!("memory-swap ({})", human(swap));
                let fix = "boot with swap accounting (swapaccount=1, CONFIG_MEMCG_SWAP), or do not ask for --memory-swap larger than --memory".to_string();
                if explicit {
                    return Err(CgroupError::Unavailable { limit, why, fix });
                }
                degraded.push(format!(
                    "{limit} limit not enforced: {why}; to enforce it: {fix}"
                ));
            } else if host_has_swap() {
                degraded.push(format!(
                    "swap is not limited: {why} and this host has swap enabled, so the sandbox may swap beyond its {} memory limit; boot with swapaccount=1 or disable swap to prevent it",
                    human(mem)
                ));
            }
            Ok(())
        }
        Err(source) => Err(CgroupError::WriteLimit {
            path,
            value: swap_value.to_string(),
            source,
        }),
    }
}

fn host_has_swap() -> bool {
    fs::read_to_string("/proc/swaps")
        .map(|s| s.lines().skip(1).any(|l| !l.trim().is_empty()))
        .unwrap_or(false)
}

fn write_limit(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    write_file(&path, value.as_bytes()).map_err(|source| CgroupError::WriteLimit {
        path,
        value: value.to_string(),
        source,
    })
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // A stale cgroup of a crashed run with the same id: reuse the
            // name only if it is empty (rmdir fails otherwise).
            fs::remove_dir(path)
                .and_then(|()| fs::create_dir(path))
                .map_err(|source| CgroupError::Create {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `value` with a single write(2), as cgroup files require.
fn write_file(path: &Path, value: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads `key N` from a flat-keyed cgroup file (memory.events, cpu.stat...).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

fn read_pids(path: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(path)
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Is `path` writable by this process's effective ids?
fn writable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; faccessat reads it only.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
}

/// Why a controller cannot be used, and what to do.
fn slot_problem(c: Controller, slot: &Slot, h: &Host) -> (String, String) {
    match slot {
        Slot::Unusable { why, fix, .. } => (why.clone(), fix.clone()),
        Slot::Absent if c == Controller::Freezer => (
            "the kernel offers no cgroup freezer (no v1 freezer hierarchy is mounted and there is no cgroup v2 hierarchy)".into(),
            "mount the v1 freezer hierarchy (mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer) or use cgroup v2 (Linux 5.2 or later)".into(),
        ),
        Slot::Absent => (
            format!(
                "the kernel offers no {} cgroup controller (neither the cgroup v2 hierarchy{} nor a mounted v1 hierarchy has it)",
                c.name(),
                h.v2_mount
                    .as_ref()
                    .map(|m| format!(" at {}", m.display()))
                    .unwrap_or_default()
            ),
            format!(
                "enable the controller (kernel config CONFIG_MEMCG/CONFIG_CGROUP_SCHED/CONFIG_CGROUP_PIDS, boot parameter cgroup_enable={}), or mount its hierarchy",
                c.name()
            ),
        ),
        Slot::Usable { .. } => (String::new(), String::new()),
    }
}

// ---------------------------------------------------------------------------
// Host discovery

/// One cgroup mount found in mountinfo.
#[derive(Debug, Clone)]
struct CgMount {
    /// The mount point.
    point: PathBuf,
    /// The cgroup path the mount's root is (mountinfo field 4).
    root: String,
    version: Version,
    /// v1: controllers bound to the hierarchy.
    controllers: Vec<String>,
}

/// Decodes mountinfo's octal escapes (`\040` for a space...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<CgMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 4 {
            continue;
        }
        let fstype = fields[sep + 1];
        let version = match fstype {
            "cgroup2" => Version::V2,
            "cgroup" => Version::V1,
            _ => continue,
        };
        let controllers = if version == Version::V1 {
            fields[sep + 3]
                .split(',')
                .filter(|o| ALL.iter().any(|c| c.name() == *o))
                .map(str::to_string)
                .collect()
        } else {
            Vec::new()
        };
        out.push(CgMount {
            point: PathBuf::from(unescape(fields[4])),
            root: unescape(fields[3]),
            version,
            controllers,
        });
    }
    out
}

fn read_proc(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Discover {
        path: PathBuf::from(path),
        source,
    })
}

/// The parent-path override, relative to a hierarchy root.
fn parent_override() -> Option<Result<PathBuf, String>> {
    let v = std::env::var_os(PARENT_ENV)?;
    let p = PathBuf::from(v);
    let rel: PathBuf = p
        .components()
        .filter(|c| !matches!(c, std::path::Component::RootDir))
        .collect();
    if rel.as_os_str().is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Some(Err(format!(
            "{PARENT_ENV}={} is not a plain path below the hierarchy root (no '..', not empty)",
            p.display()
        )));
    }
    Some(Ok(rel))
}

/// Reads the host's cgroup layout. With `prepare`, also creates the
/// parents and enables v2 controllers along the way (side effects); without
/// it, only reads (for `probe`).
fn discover(prepare: bool) -> Result<Host, CgroupError> {
    let mounts = parse_mountinfo(&read_proc("/proc/self/mountinfo")?);
    // SAFETY: geteuid/getuid cannot fail and touch no memory.
    let (euid, uid) = unsafe { (libc::geteuid(), libc::getuid()) };
    let rootful = euid == 0;
    let v2 = mounts.iter().find(|m| m.version == Version::V2);
    let v2_controllers: Vec<String> = v2
        .and_then(|m| fs::read_to_string(m.point.join("cgroup.controllers")).ok())
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let over = parent_override();

    let mut slots: [Slot; N] = std::array::from_fn(|_| Slot::Absent);
    // cgroup v2 controllers.
    let v2_wanted: Vec<Controller> = [Controller::Memory, Controller::Cpu, Controller::Pids]
        .into_iter()
        .filter(|c| v2_controllers.iter().any(|n| n == c.name()))
        .collect();
    if let (Some(m), false) = (v2, v2_wanted.is_empty()) {
        let placed = v2_parent(m, rootful, euid, over.as_ref());
        match placed {
            Err((why, fix)) => {
                for c in &v2_wanted {
                    slots[c.idx()] = Slot::Unusable {
                        version: Version::V2,
                        mount: m.point.clone(),
                        why: format!("cgroup v2 {} controller: {why}", c.name()),
                        fix: fix.clone(),
                    };
                }
            }
            Ok((base, parent)) => {
                let problems = if prepare {
                    prepare_v2(&base, &parent, &v2_wanted)?
                } else {
                    check_v2(&base, &parent, &v2_wanted, rootful)
                };
                for c in &v2_wanted {
                    slots[c.idx()] = match problems.iter().find(|p| p.0 == *c) {
                        Some((_, why)) => Slot::Unusable {
                            version: Version::V2,
                            mount: m.point.clone(),
                            why: why.clone(),
                            fix: delegate_fix(uid, rootful),
                        },
                        None => Slot::Usable {
                            version: Version::V2,
                            mount: m.point.clone(),
                            parent: parent.clone(),
                        },
                    };
                }
            }
        }
    }
    // On v2, cpu usage accounting is part of every cgroup (cpu.stat): the
    // v1 cpuacct role is played by the v2 hierarchy wherever cpu is there.
    if v2_controllers.iter().any(|n| n == "cpu") {
        slots[Controller::Cpuacct.idx()] = slots[Controller::Cpu.idx()].clone();
    }
    let freezer_on = std::env::var(FREEZER_ENV).ok();
    let freezer_on = freezer_on.as_deref();
    // v2 freezing is built into every cgroup: free where a sandbox's
    // controllers are on v2 already.
    if freezer_on != Some("v1") {
        let shared = [Controller::Memory, Controller::Pids, Controller::Cpu]
            .iter()
            .find(|c| {
                matches!(
                    slots[c.idx()],
                    Slot::Usable {
                        version: Version::V2,
                        ..
                    }
                )
            });
        if let Some(c) = shared {
            slots[Controller::Freezer.idx()] = v2_freezer_slot(slots[c.idx()].clone());
        }
    }
    // cgroup v1 for whatever v2 does not have.
    for c in ALL {
        if !matches!(slots[c.idx()], Slot::Absent)
            || (c == Controller::Freezer && freezer_on == Some("v2"))
        {
            continue;
        }
        let Some(m) = mounts
            .iter()
            .find(|m| m.version == Version::V1 && m.controllers.iter().any(|n| n == c.name()))
        else {
            continue;
        };
        slots[c.idx()] = match v1_slot(c, m, rootful, uid, over.as_ref(), prepare) {
            // Pausing is optional: a freezer we cannot prepare must not
            // stop sandboxes from starting.
            Err(e) if c == Controller::Freezer => Slot::Unusable {
                version: Version::V1,
                mount: m.point.clone(),
                why: e.to_string(),
                fix: "make the freezer hierarchy writable for nanoclaw".into(),
            },
            r => r?,
        };
    }
    // A hybrid host whose v2 hierarchy has no controllers (or none usable
    // here): a v2 directory of the sandbox's own, just for freezing.
    let fz = Controller::Freezer.idx();
    if let (Some(m), false, true) = (
        v2,
        freezer_on == Some("v1"),
        !matches!(slots[fz], Slot::Usable { .. }),
    ) {
        let standalone = standalone_v2_freezer(m, rootful, euid, over.as_ref(), prepare);
        // Keep the v1 hierarchy's explanation when neither can be used.
        if matches!(slots[fz], Slot::Absent) || matches!(standalone, Slot::Usable { .. }) {
            slots[fz] = standalone;
        }
    }
    Ok(Host {
        slots,
        v2_mount: v2.map(|m| m.point.clone()),
        rootful,
        uid,
    })
}

/// A v2 directory of the sandbox's own, only for freezing (a hybrid host
/// whose v2 hierarchy has no controllers usable here).
fn standalone_v2_freezer(
    m: &CgMount,
    rootful: bool,
    uid: u32,
    over: Option<&Result<PathBuf, String>>,
    prepare: bool,
) -> Slot {
    match v2_parent(m, rootful, uid, over) {
        Err((why, fix)) => Slot::Unusable {
            version: Version::V2,
            mount: m.point.clone(),
            why: format!("cgroup v2 freezer: {why}"),
            fix,
        },
        Ok((base, parent)) => {
            let made = if prepare {
                prepare_v2(&base, &parent, &[]).is_ok()
            } else {
                rootful || writable(&parent) || writable(&base)
            };
            v2_freezer_slot(if made {
                Slot::Usable {
                    version: Version::V2,
                    mount: m.point.clone(),
                    parent,
                }
            } else {
                Slot::Unusable {
                    version: Version::V2,
                    mount: m.point.clone(),
                    why: format!("cannot create {}", parent.display()),
                    fix: delegate_fix(uid, rootful),
                }
            })
        }
    }
}

/// The freezer on v2 where `slot` (a v2 placement) is: usable if the
/// kernel has `cgroup.freeze` (Linux 5.2).
fn v2_freezer_slot(slot: Slot) -> Slot {
    match slot {
        Slot::Usable { mount, parent, .. }
            if parent.exists() && !parent.join("cgroup.freeze").exists() =>
        {
            Slot::Unusable {
                version: Version::V2,
                why: format!(
                    "this kernel's cgroup v2 has no freezer ({} is missing; it came with Linux 5.2)",
                    parent.join("cgroup.freeze").display()
                ),
                fix: "upgrade the kernel to 5.2 or later, or mount the v1 freezer hierarchy"
                    .into(),
                mount,
            }
        }
        other => other,
    }
}

fn delegate_fix(uid: u32, rootful: bool) -> String {
    if rootful {
        format!("check that no process sits in the parent cgroup, or set {PARENT_ENV} to an empty cgroup")
    } else {
        format!(
            "run nanoclaw as root, or inside a delegated cgroup: systemd-run --user -p Delegate=yes --scope nanoclaw ... (uid {uid}'s systemd user manager must delegate the controller: set Delegate=memory pids cpu for user@.service)"
        )
    }
}

/// Why this host offers no usable freezer, and what to do about it (None
/// when it does).
pub fn freezer_problem() -> Option<(String, String)> {
    let h = host(false).ok()?;
    let slot = &h.slots[Controller::Freezer.idx()];
    match slot {
        Slot::Usable { .. } => None,
        _ => Some(slot_problem(Controller::Freezer, slot, &h)),
    }
}

/// This process's own cgroup v2 directory under the mount `m`.
fn own_v2_dir(m: &CgMount) -> Result<PathBuf, String> {
    let own = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .ok_or("this process has no cgroup v2 membership in /proc/self/cgroup")?;
    let rel = own
        .strip_prefix(m.root.trim_end_matches('/'))
        .ok_or_else(|| {
            format!(
                "own cgroup {own} is outside the v2 mount at {}",
                m.point.display()
            )
        })?;
    Ok(m.point.join(rel.trim_start_matches('/')))
}

/// Where v2 sandboxes go: (base, parent). `base` is the topmost directory
/// whose `cgroup.subtree_control` nanoclaw may need to change; `parent`
/// is where `<id>` directories are made.
fn v2_parent(
    m: &CgMount,
    rootful: bool,
    uid: u32,
    over: Option<&Result<PathBuf, String>>,
) -> Result<(PathBuf, PathBuf), (String, String)> {
    match over {
        Some(Err(why)) => return Err((why.clone(), format!("fix {PARENT_ENV}"))),
        Some(Ok(rel)) => return Ok((m.point.clone(), m.point.join(rel))),
        None => {}
    }
    if rootful {
        return Ok((m.point.clone(), m.point.join("nanoclaw")));
    }
    let fix = delegate_fix(uid, false);
    // Rootless: the nearest writable ancestor of our own cgroup.
    let own_dir = own_v2_dir(m).map_err(|why| (why, fix.clone()))?;
    let mut cand = own_dir.parent();
    while let Some(d) = cand {
        if !d.starts_with(&m.point) {
            break;
        }
        if writable(d)
            && writable(&d.join("cgroup.procs"))
            && writable(&d.join("cgroup.subtree_control"))
        {
            return Ok((d.to_path_buf(), d.join("nanoclaw")));
        }
        cand = d.parent();
    }
    Err((
        format!("not delegated to uid {uid}: no cgroup above this process's cgroup ({}) is writable by it", own_dir.display()),
        fix,
    ))
}

/// Makes `parent` (and directories between `base` and it) and enables
/// `wanted` in every `cgroup.subtree_control` from `base` down to `parent`.
/// Returns the controllers that could not be enabled, with why.
fn prepare_v2(
    base: &Path,
    parent: &Path,
    wanted: &[Controller],
) -> Result<Vec<(Controller, String)>, CgroupError> {
    let mut chain = vec![base.to_path_buf()];
    if let Ok(rest) = parent.strip_prefix(base) {
        let mut p = base.to_path_buf();
        for comp in rest.components() {
            p.push(comp);
            chain.push(p.clone());
        }
    }
    let mut ok: Vec<Controller> = wanted.to_vec();
    let mut problems = Vec::new();
    for dir in &chain {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create {
                    path: dir.clone(),
                    source,
                })
            }
        }
        let ctl = dir.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&ctl).unwrap_or_default();
        let missing: Vec<Controller> = ok
            .iter()
            .copied()
            .filter(|c| !enabled.split_whitespace().any(|n| n == c.name()))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let all: String = missing.iter().map(|c| format!("+{} ", c.name())).collect();
        if write_file(&ctl, all.trim_end().as_bytes()).is_ok() {
            continue;
        }
        // Find out which one(s) fail.
        for c in missing {
            if let Err(e) = write_file(&ctl, format!("+{}", c.name()).as_bytes()) {
                let avail = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                let why = if !avail.split_whitespace().any(|n| n == c.name()) {
                    format!(
                        "cgroup v2 {} controller is not delegated to {} (missing from its cgroup.controllers)",
                        c.name(),
                        dir.display()
                    )
                } else if e.raw_os_error() == Some(libc::EBUSY) {
                    format!(
                        "cannot enable the cgroup v2 {} controller in {}: processes sit directly in that cgroup (cgroup v2 forbids controllers below a cgroup with processes)",
                        c.name(),
                        ctl.display()
                    )
                } else {
                    format!(
                        "cannot enable the cgroup v2 {} controller in {}: {e}",
                        c.name(),
                        ctl.display()
                    )
                };
                problems.push((c, why));
                ok.retain(|x| *x != c);
            }
        }
    }
    Ok(problems)
}

/// `prepare_v2` without side effects, for `probe`.
fn check_v2(
    base: &Path,
    parent: &Path,
    wanted: &[Controller],
    rootful: bool,
) -> Vec<(Controller, String)> {
    if rootful {
        return Vec::new();
    }
    let dir = if parent.exists() { parent } else { base };
    let avail = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    wanted
        .iter()
        .filter(|c| !avail.split_whitespace().any(|n| n == c.name()))
        .map(|c| {
            (
                *c,
                format!(
                    "cgroup v2 {} controller is not delegated to {} (missing from its cgroup.controllers)",
                    c.name(),
                    dir.display()
                ),
            )
        })
        .collect()
}

fn v1_slot(
    c: Controller,
    m: &CgMount,
    rootful: bool,
    uid: u32,
    over: Option<&Result<PathBuf, String>>,
    prepare: bool,
) -> Result<Slot, CgroupError> {
    let unusable = |why: String, fix: String| Slot::Unusable {
        version: Version::V1,
        mount: m.point.clone(),
        why,
        fix,
    };
    let parent = match over {
        Some(Err(why)) => return Ok(unusable(why.clone(), format!("fix {PARENT_ENV}"))),
        Some(Ok(rel)) => m.point.join(rel),
        None if rootful => m.point.join("nanoclaw"),
        None => m.point.join(format!("nanoclaw-{uid}")),
    };
    if rootful {
        if prepare {
            match fs::create_dir_all(&parent) {
                Ok(()) => {}
                Err(source) => {
                    return Err(CgroupError::Create {
                        path: parent,
                        source,
                    })
                }
            }
        }
    } else if !(writable(&parent) && writable(&parent.join("cgroup.procs"))) {
        let dir = parent.display();
        return Ok(unusable(
            format!("cgroup v1 {} controller is not delegated to uid {uid} ({dir} does not exist or is not writable by it)", c.name()),
            format!(
                "run nanoclaw as root, or have an administrator delegate a cgroup: sudo mkdir -p {dir} && sudo chown -R {uid}:{uid} {dir}"
            ),
        ));
    }
    Ok(Slot::Usable {
        version: Version::V1,
        mount: m.point.clone(),
        parent,
    })
}

// ---------------------------------------------------------------------------
// Probe (for `nanoclaw doctor`)

/// What the host offers for one controller.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerProbe {
    /// The controller's kernel name.
    pub name: &'static str,
    /// v1, v2, or None when the kernel does not offer it.
    pub version: Option<Version>,
    /// The hierarchy's mount point.
    pub mount: Option<PathBuf>,
    /// Where sandboxes' cgroups would be made.
    pub parent: Option<PathBuf>,
    /// Whether nanoclaw can create cgroups with this controller.
    pub usable: bool,
    /// Why not, when not usable.
    pub why: Option<String>,
    /// What to do about it.
    pub fix: Option<String>,
}

/// What the host offers for cgroup limits.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupProbe {
    /// Where the v2 hierarchy is mounted, if it is.
    pub v2_mount: Option<PathBuf>,
    /// "v2" (every controller on v2), "v1", "hybrid" or "none".
    pub mode: &'static str,
    /// Whether nanoclaw runs as root (euid 0).
    pub rootful: bool,
    /// The real uid.
    pub uid: u32,
    /// Whether the memory, cpu and pids limits can all be enforced.
    pub can_limit_all: bool,
    /// Per controller.
    pub controllers: Vec<ControllerProbe>,
    /// A discovery error, if discovery failed.
    pub error: Option<String>,
}

/// What the host offers: per controller v1/v2/absent, whether nanoclaw can
/// create cgroups there (as root or delegated), and where. Reads only; it
/// creates nothing.
pub fn probe() -> CgroupProbe {
    // SAFETY: getuid/geteuid cannot fail and touch no memory.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    let h = match discover(false) {
        Ok(h) => h,
        Err(e) => {
            return CgroupProbe {
                v2_mount: None,
                mode: "none",
                rootful: euid == 0,
                uid,
                can_limit_all: false,
                controllers: Vec::new(),
                error: Some(e.to_string()),
            }
        }
    };
    let controllers: Vec<ControllerProbe> = ALL
        .iter()
        .map(|&c| match &h.slots[c.idx()] {
            Slot::Absent => ControllerProbe {
                name: c.name(),
                version: None,
                mount: None,
                parent: None,
                usable: false,
                why: Some(slot_problem(c, &Slot::Absent, &h).0),
                fix: None,
            },
            Slot::Unusable {
                version,
                mount,
                why,
                fix,
            } => ControllerProbe {
                name: c.name(),
                version: Some(*version),
                mount: Some(mount.clone()),
                parent: None,
                usable: false,
                why: Some(why.clone()),
                fix: Some(fix.clone()),
            },
            Slot::Usable {
                version,
                mount,
                parent,
            } => ControllerProbe {
                name: c.name(),
                version: Some(*version),
                mount: Some(mount.clone()),
                parent: Some(parent.clone()),
                usable: true,
                why: None,
                fix: None,
            },
        })
        .collect();
    let limiting = [Controller::Memory, Controller::Cpu, Controller::Pids];
    let versions: HashMap<Version, usize> = limiting
        .iter()
        .filter_map(|c| controllers[c.idx()].version)
        .fold(HashMap::new(), |mut m, v| {
            *m.entry(v).or_default() += 1;
            m
        });
    let mode = match (versions.get(&Version::V1), versions.get(&Version::V2)) {
        (None, None) => "none",
        (None, Some(_)) => "v2",
        (Some(_), None) => "v1",
        (Some(_), Some(_)) => "hybrid",
    };
    CgroupProbe {
        v2_mount: h.v2_mount.clone(),
        mode,
        rootful: h.rootful,
        uid: h.uid,
        can_limit_all: limiting.iter().all(|c| controllers[c.idx()].usable),
        controllers,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    //! Real-kernel tests: they create cgroups, run real processes in them
    //! and check what the kernel enforced and counted. They need root and
    //! skip (saying so) otherwise.
    //!
    //! With `NANOCLAW_EXPECT_CGROUP_V2="pids,cpu"` (a comma list) every test
    //! also asserts that exactly the listed controllers ran on v2 and the
    //! others on v1, so CI can prove which path it exercised.

    use super::*;
    use crate::spec::ExplicitLimits;
    use std::io::Read;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MIB: u64 = 1 << 20;

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED: cgroup kernel tests need root (euid 0); run them as root");
        }
        root
    }

    fn uniq(name: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn limits(
        memory: Option<u64>,
        swap: Option<u64>,
        cpus: Option<f64>,
        pids: Option<u64>,
    ) -> Limits {
        Limits {
            memory,
            memory_swap: swap,
            cpus,
            pids,
            explicit: ExplicitLimits {
                memory: memory.is_some(),
                cpus: cpus.is_some(),
                pids: pids.is_some(),
            },
            ..Limits::default()
        }
    }

    /// Asserts the versions against NANOCLAW_EXPECT_CGROUP_V2, if set.
    fn check_versions(cg: &Cgroup) {
        let desc = cg.describe();
        eprintln!("cgroup {} uses: {}", cg.id(), desc.join(", "));
        let Ok(expect) = std::env::var("NANOCLAW_EXPECT_CGROUP_V2") else {
            return;
        };
        let v2: Vec<&str> = expect
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for c in [Controller::Memory, Controller::Cpu, Controller::Pids] {
            if let Some(v) = cg.version_of(c) {
                let want = if v2.contains(&c.name()) {
                    Version::V2
                } else {
                    Version::V1
                };
                assert_eq!(
                    v,
                    want,
                    "{} ran on {v:?} but NANOCLAW_EXPECT_CGROUP_V2={expect}",
                    c.name()
                );
            }
        }
    }

    /// Starts `/bin/sh -c script` held on a pipe until it is in `cg`.
    fn spawn_in(cg: &Cgroup, script: &str) -> Child {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read _ || exit 99; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn /bin/sh");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        cg.add_process(pid).expect("add_process");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("release the child");
        child
    }

    fn output(child: &mut Child) -> (std::process::ExitStatus, String) {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = child.wait().expect("wait");
        (status, err)
    }

    fn destroy_and_check(cg: Cgroup) {
        let paths: Vec<PathBuf> = cg.paths().iter().map(|p| p.to_path_buf()).collect();
        assert!(!paths.is_empty());
        for p in &paths {
            assert!(p.is_dir(), "{} should exist before destroy", p.display());
        }
        cg.destroy().expect("destroy");
        for p in &paths {
            assert!(!p.exists(), "{} left behind by destroy", p.display());
        }
    }

    #[test]
    fn memory_limit_oom_kills_and_is_counted() {
        if !is_root() {
            return;
        }
        let l = limits(Some(32 * MIB), Some(48 * MIB), None, None);
        let (cg, degraded) = Cgroup::create(&uniq("oom"), &l).expect("create");
        let cg = cg.expect("a memory cgroup on a root host");
        assert!(degraded.is_empty(), "{degraded:?}");
        check_versions(&cg);
        // The limits were written as asked.
        let d = cg.dir(Controller::Memory).expect("memory dir");
        match d.version {
            Version::V1 => {
                assert_eq!(
                    read_u64(&d.path.join("memory.limit_in_bytes")),
                    Some(32 * MIB)
                );
                assert_eq!(
                    read_u64(&d.path.join("memory.memsw.limit_in_bytes")),
                    Some(48 * MIB)
                );
            }
            Version::V2 => {
                assert_eq!(read_u64(&d.path.join("memory.max")), Some(32 * MIB));
                assert_eq!(read_u64(&d.path.join("memory.swap.max")), Some(16 * MIB));
                assert_eq!(read_u64(&d.path.join("memory.oom.group")), Some(1));
            }
        }
        assert_eq!(cg.events().oom_kills, 0);
        // dd touches its whole 128 MiB buffer: far above the limit.
        let mut child = spawn_in(&cg, "exec dd if=/dev/zero of=/dev/null bs=128M count=1");
        let (status, err) = output(&mut child);
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "dd should be OOM-killed: {status:?} {err}"
        );
        let ev = cg.events();
        assert!(ev.oom_kills >= 1, "kernel counted no OOM kill: {ev:?}");
        assert_eq!(ev.pids_max_hits, 0);
        destroy_and_check(cg);
    }

    #[test]
    fn stats_report_peak_memory_and_cpu() {
        if !is_root() {
            return;
        }
        let l = limits(Some(256 * MIB), None, Some(1.0), Some(64));
        let (cg, _) = Cgroup::create(&uniq("stats"), &l).expect("create");
        let cg = cg.expect("cgroup");
        check_versions(&cg);
        let mut child = spawn_in(
            &cg,
            "dd if=/dev/zero of=/dev/null bs=48M count=4 2>/dev/null; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        );
        let (status, err) = output(&mut child);
        assert!(status.success(), "{status:?} {err}");
        let st = cg.stats();
        let peak = st.peak_memory.expect("peak memory");
        assert!((48 * MIB..=256 * MIB).contains(&peak), "peak {peak}");
        let cpu = st.cpu.expect("cpu usage");
        assert!(
            cpu > Duration::from_millis(5) && cpu < Duration::from_secs(30),
            "cpu {cpu:?}"
        );
        assert_eq!(cg.events(), CgroupEvents::default());
        destroy_and_check(cg);
    }

    #[test]
    fn pids_limit_refuses_forks_and_is_counted_then_kill_all_empties() {
        if !is_root() {
            return;
        }
        let l = limits(None, None, None, Some(8));
        let (cg, _) = Cgroup::create(&uniq("pids"), &l).expect("create");
        let cg = cg.expect("cgroup");
        check_versions(&cg);
        let mut child = spawn_in(
            &cg,
            "i=0; while [ $i -lt 30 ]; do sleep 30 & i=$((i+1)); done; sleep 30",
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while cg.events().pids_max_hits == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let ev = cg.events();
        assert!(ev.pids_max_hits > 0, "no refused fork counted: {ev:?}");
        let n = cg.procs().len();
        assert!(
            (1..=9).contains(&n),
            "{n} processes in a pids=8 (+1 for init) cgroup"
        );
        cg.kill_all();
        // The shell itself either died of its failed fork or is killed.
        let _ = child.wait().expect("wait");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cg.procs().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(cg.procs().is_empty(), "left: {:?}", cg.procs());
        destroy_and_check(cg);
    }

    #[test]
    fn cpu_quota_throttles_a_busy_loop() {
        if !is_root() {
            return;
        }
        let l = limits(None, None, Some(0.2), None);
        let (cg, _) = Cgroup::create(&uniq("cpu"), &l).expect("create");
        let cg = cg.expect("cgroup");
        check_versions(&cg);
        let d = cg.dir(Controller::Cpu).expect("cpu dir");
        match d.version {
            Version::V2 => assert_eq!(
                fs::read_to_string(d.path.join("cpu.max"))
                    .expect("cpu.max")
                    .trim(),
                "20000 100000"
            ),
            Version::V1 => assert_eq!(read_u64(&d.path.join("cpu.cfs_quota_us")), Some(20000)),
        }
        let start = Instant::now();
        let mut child = spawn_in(&cg, "exec timeout 1 sh -c 'while :; do :; done'");
        let (status, err) = output(&mut child);
        let wall = start.elapsed();
        // coreutils' timeout exits 124; busybox's execs the command, which
        // then dies of SIGTERM.
        assert!(
            status.code() == Some(124) || status.signal() == Some(libc::SIGTERM),
            "timeout should end the loop: {status:?} {err}"
        );
        let cpu = cg.stats().cpu.expect("cpu usage");
        eprintln!("busy loop: wall {wall:?}, cpu {cpu:?} under a 0.2 cpu quota");
        assert!(wall >= Duration::from_millis(950), "wall {wall:?}");
        assert!(
            cpu >= Duration::from_millis(20) && cpu <= Duration::from_millis(450),
            "cpu {cpu:?} is not ~0.2 s"
        );
        destroy_and_check(cg);
    }

    /// Times `rounds` create + add_process + destroy cycles; returns the
    /// mean total per sandbox in µs and a printable line.
    fn time_cycles(
        pid: libc::pid_t,
        l: &Limits,
        opts: CreateOptions,
        rounds: u32,
    ) -> (f64, String) {
        let (mut t_create, mut t_add, mut t_destroy) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut desc = Vec::new();
        let mut totals = Vec::with_capacity(rounds as usize);
        for _ in 0..rounds {
            let t0 = Instant::now();
            let (cg, _) = Cgroup::create_with(&uniq("speed"), l, opts).expect("create");
            let cg = cg.expect("cgroup");
            let t1 = Instant::now();
            cg.add_process(pid).expect("add");
            let t2 = Instant::now();
            // Move it back out (untimed) so the cgroup can be removed.
            for p in cg.paths() {
                let root = p.parent().and_then(Path::parent).expect("hierarchy root");
                write_file(&root.join("cgroup.procs"), pid.to_string().as_bytes())
                    .expect("move back");
            }
            desc = cg.describe();
            let t3 = Instant::now();
            cg.destroy().expect("destroy");
            let t4 = Instant::now();
            t_create += t1 - t0;
            t_add += t2 - t1;
            t_destroy += t4 - t3;
            totals.push((t2 - t0) + (t4 - t3));
        }
        totals.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(rounds);
        let mean = us(t_create + t_add + t_destroy);
        let line = format!(
            "cgroup timing ({}; {opts:?}), mean of {rounds}: create {:.0} µs, add_process {:.0} µs, destroy {:.0} µs, total {mean:.0} µs; total min {:?}, median {:?}",
            desc.join(", "),
            us(t_create),
            us(t_add),
            us(t_destroy),
            totals[0],
            totals[totals.len() / 2],
        );
        (mean, line)
    }

    #[test]
    fn create_add_destroy_is_fast() {
        if !is_root() || std::env::var_os(PARENT_ENV).is_some() {
            return;
        }
        let mut sleeper = Command::new("/bin/sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = libc::pid_t::try_from(sleeper.id()).expect("pid");
        let l = limits(Some(64 * MIB), None, Some(0.5), Some(32));
        // Warm up the per-process discovery.
        drop(Cgroup::create(&uniq("warm"), &l).expect("create"));
        let mut worst = 0.0f64;
        for opts in [
            CreateOptions::default(),
            CreateOptions {
                cpu_accounting: false,
                freezer: false,
            },
            CreateOptions {
                cpu_accounting: true,
                freezer: true,
            },
        ] {
            let (mean, line) = time_cycles(pid, &l, opts, 100);
            eprintln!("{line}");
            worst = worst.max(mean);
        }
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(worst < 20_000.0, "cgroup setup is far too slow: {worst} µs");
    }

    #[test]
    fn drop_removes_the_directories() {
        if !is_root() {
            return;
        }
        let (cg, _) = Cgroup::create(&uniq("drop"), &Limits::default()).expect("create");
        let cg = cg.expect("cgroup");
        let paths: Vec<PathBuf> = cg.paths().iter().map(|p| p.to_path_buf()).collect();
        drop(cg);
        for p in paths {
            assert!(!p.exists(), "{} left behind by drop", p.display());
        }
    }

    /// Ticks of user+system cpu time of `pid` (/proc/PID/stat).
    fn cpu_ticks(pid: u32) -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
    }

    #[test]
    fn freeze_stops_a_busy_loop_and_thaw_resumes_it() {
        if !is_root() {
            return;
        }
        let opts = CreateOptions {
            cpu_accounting: true,
            freezer: true,
        };
        let (cg, notes) =
            Cgroup::create_with(&uniq("freeze"), &Limits::default(), opts).expect("create");
        let cg = cg.expect("cgroup");
        assert!(cg.can_freeze(), "no freezer: {notes:?}");
        assert_eq!(cg.is_frozen(), Some(false));
        let mut child = spawn_in(&cg, "while :; do :; done");
        let checks = (|| -> Result<(), String> {
            std::thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            cg.freeze(Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            eprintln!("freeze took {:?} ({:?})", t.elapsed(), cg.describe());
            if cg.is_frozen() != Some(true) {
                return Err("not reported frozen".into());
            }
            let (a, cpu_a) = (cpu_ticks(child.id()), cg.usage().cpu);
            std::thread::sleep(Duration::from_millis(300));
            let (b, cpu_b) = (cpu_ticks(child.id()), cg.usage().cpu);
            if b > a + 1 || cpu_a != cpu_b {
                return Err(format!(
                    "ran while frozen: {a} -> {b} ticks, {cpu_a:?} -> {cpu_b:?}"
                ));
            }
            // (v1 does not move a process's earlier charges with it: 0 is fine.)
            let u = cg.usage();
            if u.tasks != Some(1) || u.memory_bytes.is_none() {
                return Err(format!("usage: {u:?}"));
            }
            let t = Instant::now();
            cg.thaw().map_err(|e| e.to_string())?;
            eprintln!("thaw took {:?}", t.elapsed());
            std::thread::sleep(Duration::from_millis(300));
            let c = cpu_ticks(child.id());
            if c < b + 5 {
                return Err(format!("did not run after thaw: {b} -> {c} ticks"));
            }
            cg.freeze(Duration::from_secs(5)).map_err(|e| e.to_string())
        })();
        // Killing a frozen cgroup: the process dies without running again.
        cg.kill_frozen();
        let (status, _) = output(&mut child);
        checks.expect("freeze and thaw");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        destroy_and_check(cg);
    }

    #[test]
    fn thaw_dir_refuses_what_is_not_a_cgroup() {
        let e = thaw_dir(Path::new("/tmp")).expect_err("/tmp is no cgroup");
        assert!(matches!(e, CgroupError::Freeze { .. }), "{e}");
        thaw_dir(Path::new("/sys/fs/cgroup/no-such-nanoclaw-dir")).expect("missing is fine");
    }

    #[test]
    fn v2_dir_fd_only_when_everything_is_on_v2() {
        if !is_root() {
            return;
        }
        let (cg, _) = Cgroup::create(&uniq("fd"), &Limits::default()).expect("create");
        let cg = cg.expect("cgroup");
        let all_v2 = cg.paths().len() == 1 && cg.describe().iter().all(|d| d.ends_with("v2"));
        assert_eq!(cg.v2_dir_fd().is_some(), all_v2, "{:?}", cg.describe());
        destroy_and_check(cg);
    }

    /// Runs as an unprivileged uid in a child process (see
    /// `rootless_without_delegation_*`); does nothing otherwise.
    ///
    /// With `NANOCLAW_CGROUP_ROOTLESS_HELPER=delegated` it expects to run in
    /// a delegated v2 subtree instead (set up by a test VM's init: a
    /// cgroup chowned to this uid, this process in a child of it) and checks
    /// that explicit limits are enforced there, by a real OOM kill.
    #[test]
    #[ignore = "helper: run by rootless_without_delegation_is_explained"]
    fn rootless_helper() {
        let Some(mode) = std::env::var_os("NANOCLAW_CGROUP_ROOTLESS_HELPER") else {
            return;
        };
        let explicit = limits(Some(32 * MIB), None, Some(0.5), Some(32));
        if mode == "delegated" {
            let (cg, degraded) = Cgroup::create("rootless", &explicit).expect("create delegated");
            let cg = cg.expect("cgroup");
            assert!(degraded.is_empty(), "{degraded:?}");
            assert_eq!(cg.describe(), ["memory: v2", "cpu: v2", "pids: v2"]);
            let mut child = spawn_in(&cg, "exec dd if=/dev/zero of=/dev/null bs=128M count=1");
            let (status, err) = output(&mut child);
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?} {err}");
            assert!(cg.events().oom_kills >= 1);
            println!("DELEGATED-OK {}", cg.paths()[0].display());
            destroy_and_check(cg);
            return;
        }
        match Cgroup::create("rootless", &explicit) {
            Err(e @ CgroupError::Unavailable { .. }) => println!("EXPLICIT-ERR {e}"),
            other => panic!("explicit limits without delegation should be Unavailable: {other:?}"),
        }
        let defaulted = Limits::default();
        let (cg, degraded) =
            Cgroup::create("rootless", &defaulted).expect("defaulted limits degrade");
        assert!(cg.is_none());
        for d in &degraded {
            println!("DEGRADED {d}");
        }
        println!("PROBE {}", serde_json::to_string(&probe()).expect("json"));
    }

    /// Rootless: without delegation an explicit limit is an error that says
    /// why and what to do, a defaulted one degrades with a note. With
    /// `NANOCLAW_TEST_CGROUP_DELEGATED` set (the test runs inside a v2
    /// subtree delegated to uid 65534, as a test VM sets up), the same uid
    /// must get working limits instead.
    #[test]
    fn rootless_without_delegation_is_explained() {
        if !is_root() {
            return;
        }
        let delegated = std::env::var_os("NANOCLAW_TEST_CGROUP_DELEGATED").is_some();
        let exe = std::env::current_exe().expect("test binary");
        let out = Command::new(exe)
            .args([
                "--exact",
                "native::cgroup::tests::rootless_helper",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "NANOCLAW_CGROUP_ROOTLESS_HELPER",
                if delegated { "delegated" } else { "plain" },
            )
            .env_remove(PARENT_ENV)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run helper");
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "helper failed");
        assert!(stdout.contains("1 passed"), "helper did not run");
        if delegated {
            assert!(
                stdout.contains("DELEGATED-OK"),
                "delegated run did not finish"
            );
            return;
        }
        let err = stdout
            .lines()
            .find_map(|l| l.split_once("EXPLICIT-ERR").map(|x| x.1))
            .expect("error line");
        assert!(err.contains("not delegated to uid 65534"), "{err}");
        assert!(err.contains("To fix:"), "{err}");
        let degraded: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("DEGRADED"))
            .collect();
        assert_eq!(
            degraded.len(),
            3,
            "memory, cpus and pids should each be reported: {degraded:?}"
        );
        for (d, what) in degraded.iter().zip(["memory", "cpus", "pids"]) {
            assert!(d.contains(what) && d.contains("not enforced"), "{d}");
        }
    }

    #[test]
    fn probe_describes_the_host() {
        let p = probe();
        eprintln!("{}", serde_json::to_string_pretty(&p).expect("json"));
        assert!(p.error.is_none(), "{:?}", p.error);
        assert_eq!(p.controllers.len(), ALL.len());
        // On a root host where every controller exists, all are usable.
        if p.rootful {
            for c in &p.controllers {
                assert!(
                    c.version.is_none() || c.usable || c.name == "cpuacct",
                    "{c:?}"
                );
            }
        }
    }

    #[test]
    fn mountinfo_is_parsed() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /sub /sys/fs/cgroup/mem\\040ory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(m[1].point, Path::new("/sys/fs/cgroup/mem ory"));
        assert_eq!(m[1].root, "/sub");
        assert!(m[2].controllers.is_empty());
        assert_eq!(m[3].version, Version::V2);
    }

    #[test]
    fn bad_input_is_refused() {
        for id in ["", ".", "..", "a/b", ".hidden", "x\ny"] {
            assert!(
                matches!(validate_id(id), Err(CgroupError::InvalidId { .. })),
                "{id:?}"
            );
        }
        assert!(validate_id("sb-01HZX").is_ok());
        let bad = [
            limits(None, None, Some(0.0), None),
            limits(None, None, Some(f64::NAN), None),
            limits(Some(64 * MIB), Some(32 * MIB), None, None),
            limits(None, None, None, Some(0)),
        ];
        for l in bad {
            assert!(
                matches!(validate_limits(&l), Err(CgroupError::InvalidLimit { .. })),
                "{l:?}"
            );
        }
        assert_eq!(human(512 * MIB), "512 MiB");
        assert_eq!(human(1 << 30), "1 GiB");
    }
}
