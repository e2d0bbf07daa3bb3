//! The engine's backend interface: one sandbox configuration in, a live
//! sandbox out; one exec spec in, one [`Outcome`] out — whatever realises
//! the sandbox.
//!
//! A [`Backend`] creates sandboxes ([`Backend::create`]); each is a
//! [`LiveSandbox`] that runs commands ([`LiveSandbox::exec`], or
//! [`LiveSandbox::spawn`] and [`Execution::wait`]), copies files in and out,
//! pauses, resumes, reports its usage and is destroyed. Both traits are
//! object safe, `Send` and `Sync`: a daemon holds one `Box<dyn Backend>`
//! per backend name and one `Box<dyn LiveSandbox>` (or an `Arc`) per
//! sandbox, and calls them from any thread. Every call blocks (a daemon
//! calls them from its blocking pool) and fails with the engine's typed
//! [`Error`].
//!
//! Implemented here by the native engine, twice:
//!
//! * [`NativeKeeper`] (`native`): one keeper process per sandbox (nanoclaw's
//!   own binary re-executed, see [`crate::keeper`]), so the sandbox never
//!   starts as a copy of the caller's memory and outlives the handle: how
//!   `nanoclaw sandbox create` and the daemon hold their sandboxes.
//! * [`NativeInProcess`] (`native-in-process`): the sandbox is held by
//!   this process ([`session::create`]) and ends with its handle. For a
//!   small single-threaded caller (tests, one-off tools).
//!
//! Docker, gVisor and micro-VM backends are to implement the same traits.
//! A field a backend cannot honour is refused by name before anything is
//! made ([`Backend::check`], from [`Backend::capabilities`]):
//! `--backend docker: --exec-allow is not supported: …`. What the host
//! cannot give (Landlock, a freezer, root for `--network kernel`) is
//! refused by `create` (or the call) with [`Error::Unsupported`].
//!
//! ```no_run
//! use nanoclaw_sandbox::backend::{Backend, NativeInProcess, SandboxConfig};
//! use nanoclaw_sandbox::native::session::ExecSpec;
//! use nanoclaw_sandbox::SandboxSpec;
//! let backend: Box<dyn Backend> = Box::new(NativeInProcess);
//! let sb = backend.create(&SandboxConfig::new(SandboxSpec::new(Vec::<String>::new()))).unwrap();
//! sb.put_file("/tmp/x", b"42\n".to_vec(), None).unwrap();
//! let o = sb.exec(&ExecSpec::new(["cat", "/tmp/x"])).unwrap();
//! assert_eq!(o.stdout, b"42\n");
//! sb.destroy().unwrap();
//! ```

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::keeper::{self, KeeperConfig, KeeperError, Live, Remote, RemoteSpawn, Reply, Request};
use crate::native::cgroup::CgroupEvents;
use crate::native::session::{self, EntryInfo, ExecSpec, RunState, Spawned};
use crate::spec::{Network, Root, SandboxSpec, Seccomp, Stdin, User};
use crate::{Error, Layers, Outcome, Sandbox};

/// What a backend creates a sandbox from.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// The sandbox: its root or image, mounts, limits, network, hardening,
    /// user, environment, working directory, hostname and home. Its
    /// `command` and `stdin` are not used (each exec brings its own,
    /// [`ExecSpec`]); `limits.timeout` is the sandbox's lifetime.
    pub spec: SandboxSpec,
    /// End the sandbox after this long without a command (`None`: at the
    /// end of its lifetime only). Needs [`Capabilities::idle_timeout`].
    pub idle_timeout: Option<Duration>,
    /// Labels, kept with the sandbox where the backend keeps a record of it
    /// (a keeper's state, a container's labels). Not interpreted.
    pub labels: Vec<(String, String)>,
}

impl SandboxConfig {
    /// The configuration in `spec` (its command and stdin are cleared).
    pub fn new(mut spec: SandboxSpec) -> SandboxConfig {
        spec.command.clear();
        spec.stdin = Stdin::Null;
        SandboxConfig {
            spec,
            idle_timeout: None,
            labels: Vec::new(),
        }
    }
}

/// What a backend can honour, field by field. [`Capabilities::check`]
/// refuses a configuration that asks for anything else, naming it.
///
/// These say what the backend can ever do, not what this host offers: a
/// kernel without Landlock, a user without a cgroup freezer or a rootless
/// `--network kernel` are refused by [`Backend::create`] (or by the call)
/// with [`Error::Unsupported`], which says how to get them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// The host's `/usr`, `/bin`, `/lib*` read-only, a synthetic `/etc`
    /// ([`Root::Host`]).
    pub host_root: bool,
    /// An image's layers as the root ([`Root::Layers`], `--image`).
    pub image_root: bool,
    /// A host directory as the root ([`Root::Dir`]).
    pub dir_root: bool,
    /// An image by reference from the backend's own store
    /// ([`Root::Image`], e.g. Docker's).
    pub store_image: bool,
    /// An image root's writes kept on the host (`root_upper`).
    pub persistent_upper: bool,
    /// Host paths bound into the sandbox (`--mount`, `--workspace`).
    pub mounts: bool,
    /// A swap limit of its own (`--memory-swap`).
    pub memory_swap: bool,
    /// Egress to listed hosts and CIDRs only (`--network allowlist`).
    pub network_allowlist: bool,
    /// Egress to any public destination through the proxy
    /// (`--network open`).
    pub network_open: bool,
    /// Egress filtered by the host kernel (`--network kernel`).
    pub network_kernel: bool,
    /// A Docker-format seccomp profile (`--seccomp PATH`).
    pub seccomp_profile: bool,
    /// No seccomp filter (`--seccomp unconfined`).
    pub seccomp_unconfined: bool,
    /// Capabilities kept inside the sandbox (`--cap-add`).
    pub cap_add: bool,
    /// Execution only from listed paths (`--exec-allow`).
    pub exec_allow: bool,
    /// A noexec `/tmp` (`--tmp-noexec`).
    pub tmp_noexec: bool,
    /// A home directory of the sandbox user (`home`).
    pub home: bool,
    /// Ending the sandbox when it has been idle ([`SandboxConfig::idle_timeout`]).
    pub idle_timeout: bool,
    /// [`LiveSandbox::pause`] and [`LiveSandbox::resume`].
    pub pause: bool,
    /// Several commands running at once in one sandbox.
    pub concurrent_execs: bool,
    /// The sandbox outlives its handle (and the process holding it); it
    /// ends at [`LiveSandbox::destroy`], its lifetime or its idle timeout.
    /// Without it, dropping the last handle ends the sandbox.
    pub detached: bool,
}

impl Capabilities {
    /// Everything the native engine can do (before what a backend adds or
    /// takes away).
    pub const NATIVE: Capabilities = Capabilities {
        host_root: true,
        image_root: true,
        dir_root: false,
        store_image: false,
        persistent_upper: true,
        mounts: true,
        memory_swap: true,
        network_allowlist: true,
        network_open: true,
        network_kernel: true,
        seccomp_profile: true,
        seccomp_unconfined: true,
        cap_add: true,
        exec_allow: true,
        tmp_noexec: true,
        home: true,
        idle_timeout: true,
        pause: true,
        concurrent_execs: true,
        detached: true,
    };

    /// The first field of `config` these capabilities cannot honour, as
    /// [`Error::NotSupported`] for backend `backend`.
    pub fn check(&self, backend: &str, config: &SandboxConfig) -> Result<(), Error> {
        let s = &config.spec;
        let asked: [(bool, bool, &str); 17] = [
            (
                matches!(s.root, Root::Host),
                self.host_root,
                "the host root",
            ),
            (
                matches!(s.root, Root::Layers(_)),
                self.image_root,
                "--image",
            ),
            (
                matches!(s.root, Root::Dir(_)),
                self.dir_root,
                "a directory root",
            ),
            (
                matches!(s.root, Root::Image(_)),
                self.store_image,
                "an image from the backend's own store",
            ),
            (
                s.root_upper.is_some(),
                self.persistent_upper,
                "a persistent upper layer",
            ),
            (!s.mounts.is_empty(), self.mounts, "--mount"),
            (
                s.limits.memory_swap.is_some(),
                self.memory_swap,
                "--memory-swap",
            ),
            (
                matches!(s.network, Network::Allowlist { .. }),
                self.network_allowlist,
                "--network allowlist",
            ),
            (
                matches!(s.network, Network::Open { .. }),
                self.network_open,
                "--network open",
            ),
            (
                matches!(s.network, Network::Kernel { .. }),
                self.network_kernel,
                "--network kernel",
            ),
            (
                matches!(s.hardening.seccomp, Seccomp::Profile(_)),
                self.seccomp_profile,
                "--seccomp PROFILE",
            ),
            (
                matches!(s.hardening.seccomp, Seccomp::Unconfined),
                self.seccomp_unconfined,
                "--seccomp unconfined",
            ),
            (!s.hardening.cap_add.is_empty(), self.cap_add, "--cap-add"),
            (
                !s.hardening.exec_allow.is_empty(),
                self.exec_allow,
                "--exec-allow",
            ),
            (s.hardening.tmp_noexec, self.tmp_noexec, "--tmp-noexec"),
            (s.home.is_some(), self.home, "a home directory"),
            (
                config.idle_timeout.is_some(),
                self.idle_timeout,
                "--idle-timeout",
            ),
        ];
        match asked.iter().find(|(wanted, can, _)| *wanted && !*can) {
            Some((_, _, field)) => Err(Error::NotSupported {
                backend: backend.to_string(),
                field: (*field).to_string(),
                why: "this backend cannot provide it; drop it, or use another --backend".into(),
            }),
            None => Ok(()),
        }
    }
}

/// Where [`LiveSandbox::exec_streaming`] and [`Execution::wait`] copy a
/// command's output as it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Echo<'a> {
    /// Receives the command's stdout.
    pub stdout: BorrowedFd<'a>,
    /// Receives the command's stderr.
    pub stderr: BorrowedFd<'a>,
}

impl Echo<'_> {
    fn raw(self) -> (i32, i32) {
        (self.stdout.as_raw_fd(), self.stderr.as_raw_fd())
    }
}

/// What a sandbox is, as its backend made it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxInfo {
    /// Its id (unique on this host).
    pub id: String,
    /// The backend's name.
    pub backend: String,
    /// What protects it.
    pub layers: Layers,
    /// The host processes it consists of: its init, and its keeper (or
    /// container shim, VM monitor) where it has one. When [`LiveSandbox::
    /// destroy`] returns, none of them runs any more.
    pub host_pids: Vec<i32>,
    /// Its labels.
    pub labels: Vec<(String, String)>,
}

/// A sandbox's state and usage now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxStats {
    /// Running or paused.
    pub state: RunState,
    /// Memory charged to the sandbox now, in bytes (`None`: not measured
    /// here).
    pub memory_bytes: Option<u64>,
    /// CPU time its processes used so far (`None`: not measured here).
    pub cpu: Option<Duration>,
    /// Tasks (threads) in it now, its init included (`None`: not measured
    /// here).
    pub tasks: Option<u64>,
    /// Whether [`LiveSandbox::pause`] can work on it.
    pub can_pause: bool,
    /// Commands running now that were started through the backend.
    pub execs: u64,
    /// When the backend ends it: the end of its lifetime, or earlier after
    /// its idle timeout.
    pub deadline: SystemTime,
}

/// A way of running sandboxes (see the module's documentation).
pub trait Backend: Send + Sync {
    /// The name `--backend` takes, e.g. `native`, `docker`.
    fn name(&self) -> &str;

    /// What it can honour.
    fn capabilities(&self) -> Capabilities;

    /// Refuses a configuration that asks for what this backend cannot
    /// honour, naming the field ([`Error::NotSupported`]). `create` does
    /// this first; a caller may ask before it decides where to create.
    fn check(&self, config: &SandboxConfig) -> Result<(), Error> {
        self.capabilities().check(self.name(), config)
    }

    /// Creates a sandbox for `config`; it is ready for commands when this
    /// returns. A configuration that is refused leaves nothing behind.
    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error>;

    /// The sandboxes of this backend on this host that can be found again
    /// ([`Backend::attach`]): how `nanoclaw sandbox ls` sees sandboxes that
    /// outlived the process that made them. A backend keeps what it needs
    /// with the sandbox itself (a container's labels, a state record); the
    /// CLI's name, times and exec timeout travel as the `nanoclaw.*` labels
    /// ([`LABEL_NAME`] and friends). The default: none (a backend whose
    /// sandboxes end with their handle).
    fn list(&self) -> Result<Vec<SandboxInfo>, Error> {
        Ok(Vec::new())
    }

    /// A handle on the sandbox `id` (its full id, from [`Backend::list`]),
    /// made earlier by this or another process.
    fn attach(&self, id: &str) -> Result<Box<dyn LiveSandbox>, Error> {
        Err(Error::NotFound {
            id: id.to_string(),
            what: format!(
                "--backend {}: its sandboxes cannot be found again",
                self.name()
            ),
        })
    }
}

/// Label: the sandbox's name (`sandbox create --name`).
pub const LABEL_NAME: &str = "nanoclaw.name";
/// Label: when the sandbox was made, in seconds since the epoch.
pub const LABEL_CREATED: &str = "nanoclaw.created";
/// Label: when the sandbox's lifetime ends, in seconds since the epoch.
pub const LABEL_EXPIRES: &str = "nanoclaw.expires";
/// Label: the default timeout of each exec, in milliseconds.
pub const LABEL_EXEC_TIMEOUT_MS: &str = "nanoclaw.exec-timeout-ms";
/// Label `nanoclaw.detached=true`: the sandbox must outlive the process
/// that made it (`nanoclaw sandbox create`). Without it, a backend whose
/// sandboxes live outside its caller (a container) removes the sandbox
/// once that process is gone — at the latest when the backend is next
/// used (a `kill -9`ed `nanoclaw run` leaves nothing for long).
pub const LABEL_DETACHED: &str = "nanoclaw.detached";

/// The value of label `key` in `labels`.
pub fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// One sandbox a [`Backend`] created.
///
/// Paths are absolute paths inside the sandbox. File operations run as the
/// sandbox's user (or `user`) with every restriction of a command; the
/// default implementations run small commands through
/// [`LiveSandbox::exec`] ([`session::put_file`] and friends), a backend may
/// do them its own way. After [`LiveSandbox::destroy`] every call fails.
pub trait LiveSandbox: Send + Sync {
    /// The sandbox's id.
    fn id(&self) -> &str;

    /// What it is and where it runs.
    fn info(&self) -> SandboxInfo;

    /// Starts one command; its outcome comes from [`Execution::wait`].
    /// Dropping the execution before that kills the command.
    fn spawn(&self, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error>;

    /// Runs one command to completion, its output kept in the outcome (up
    /// to its output limit).
    fn exec(&self, spec: &ExecSpec) -> Result<Outcome, Error> {
        self.spawn(spec)?.wait(None)
    }

    /// Runs one command to completion, copying its output to `echo` as it
    /// arrives (counted against the output limit, not kept in the outcome).
    fn exec_streaming(&self, spec: &ExecSpec, echo: Echo<'_>) -> Result<Outcome, Error> {
        self.spawn(spec)?.wait(Some(echo))
    }

    /// Writes `data` to the file `path` (parents created).
    fn put_file(&self, path: &str, data: Vec<u8>, user: Option<User>) -> Result<(), Error> {
        session::put_file(&mut ViaExec(self), path, data, user)
    }

    /// Reads the file `path`.
    fn get_file(&self, path: &str) -> Result<Vec<u8>, Error> {
        session::get_file(&mut ViaExec(self), path)
    }

    /// Unpacks the tar stream `tar` into the directory `dir` (created if
    /// missing).
    fn put_tar(&self, dir: &str, tar: Vec<u8>, user: Option<User>) -> Result<(), Error> {
        session::put_tar(&mut ViaExec(self), dir, tar, user)
    }

    /// The directory `dir` as a tar stream.
    fn get_tar(&self, dir: &str) -> Result<Vec<u8>, Error> {
        session::get_tar(&mut ViaExec(self), dir)
    }

    /// What is at `path` (a symlink itself, not its target).
    fn stat(&self, path: &str) -> Result<EntryInfo, Error> {
        session::stat(&mut ViaExec(self), path)
    }

    /// Stops every process in the sandbox until [`LiveSandbox::resume`];
    /// commands are refused meanwhile ([`Error::Paused`]). Pausing a paused
    /// sandbox does nothing.
    fn pause(&self) -> Result<(), Error>;

    /// Lets every process run again. Resuming a running sandbox does
    /// nothing.
    fn resume(&self) -> Result<(), Error>;

    /// Its state and usage now.
    fn stats(&self) -> Result<SandboxStats, Error>;

    /// Ends the sandbox and everything in it, and waits until nothing of
    /// it is left on the host (processes, cgroups, state). Destroying a
    /// destroyed sandbox is not an error.
    fn destroy(&self) -> Result<(), Error>;

    /// What its egress proxy recorded so far (counters, refusals,
    /// connections, DNS queries), when this process serves its egress;
    /// `None` when it has none here (no network, or another process's).
    fn network_report(&self) -> Option<crate::outcome::NetworkReport> {
        None
    }

    /// Replaces its egress policy while it runs: new connections and DNS
    /// answers follow `policy` at once, open connections it does not admit
    /// are closed. Only a sandbox whose egress proxy this process serves
    /// can be changed; the default refuses by name.
    fn set_network_policy(
        &self,
        policy: nanoclaw_net::NetworkPolicy,
    ) -> Result<nanoclaw_net::PolicyUpdate, Error> {
        let _ = policy;
        Err(Error::NotSupported {
            backend: self.info().backend,
            field: "changing the network policy of a running sandbox".into(),
            why: "this backend has no egress proxy in this process to change".into(),
        })
    }
}

/// A command started by [`LiveSandbox::spawn`].
pub trait Execution: Send {
    /// Its exec id in the sandbox.
    fn id(&self) -> u32;

    /// Waits for its end, enforcing its timeout and output limit; with
    /// `echo`, its output is copied there as it arrives instead of being
    /// kept in the outcome.
    fn wait(self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error>;

    /// A handle on the running command that other threads may use while
    /// one waits for it: its stdin (when started with [`Stdin::Open`]) and
    /// signals. `None` when the backend has none (the keepers' protocol
    /// serves these itself).
    fn control(&self) -> Option<Box<dyn ExecControl>> {
        None
    }
}

/// Controls a running command from outside its waiter ([`Execution::control`]):
/// how a daemon serves E2B's `SendInput`, `CloseStdin` and `SendSignal`
/// for sandboxes of backends other than native.
pub trait ExecControl: Send + Sync {
    /// Writes `data` to the command's stdin (started with [`Stdin::Open`]).
    fn write_stdin(&self, data: &[u8]) -> Result<(), Error>;

    /// Closes the command's stdin (EOF). Closing twice does nothing.
    fn close_stdin(&self);

    /// Sends `signal` to the command; `SIGKILL` ends it and everything it
    /// started. An ended command is not an error.
    fn signal(&self, signal: i32) -> Result<(), Error>;
}

/// A live sandbox as [`session::Execute`], for the file operations.
struct ViaExec<'a, S: ?Sized>(&'a S);

impl<S: LiveSandbox + ?Sized> session::Execute for ViaExec<'_, S> {
    fn execute(&mut self, spec: &ExecSpec) -> Result<Outcome, Error> {
        self.0.exec(spec)
    }

    fn sandbox_id(&self) -> &str {
        self.0.id()
    }
}

fn destroyed(id: &str) -> Error {
    Error::NotFound {
        id: id.to_string(),
        what: "the sandbox was destroyed".into(),
    }
}

/// `now + (at - Instant::now())` as a wall-clock time.
fn wall_clock(at: Instant) -> SystemTime {
    SystemTime::now() + at.saturating_duration_since(Instant::now())
}

// ---------------------------------------------------------------------------
// native-in-process

/// The native engine, the sandbox held by this process: [`session::create`]
/// in the caller, the sandbox's init its child. It ends when its last
/// handle is dropped (or this process ends). It serves one call at a time
/// (a second waits), and a command [`LiveSandbox::spawn`]ed must be waited
/// for before the next one starts: init reports every command on one
/// channel, read by whoever waits.
///
/// Cloning from a multithreaded process is what [`NativeKeeper`] avoids
/// (see the design notes): use this one in small single-threaded callers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeInProcess;

impl NativeInProcess {
    /// Its name.
    pub const NAME: &'static str = "native-in-process";
}

impl Backend for NativeInProcess {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Nothing in this process watches an idle sandbox, and init's
            // one report channel is read by one waiter at a time.
            idle_timeout: false,
            concurrent_execs: false,
            detached: false,
            ..Capabilities::NATIVE
        }
    }

    fn check(&self, config: &SandboxConfig) -> Result<(), Error> {
        if config.idle_timeout.is_some() {
            return Err(Error::NotSupported {
                backend: Self::NAME.into(),
                field: "--idle-timeout".into(),
                why: "nothing watches a sandbox held in this process while no call is made; \
                      use the native backend (a keeper per sandbox)"
                    .into(),
            });
        }
        self.capabilities().check(self.name(), config)
    }

    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error> {
        self.check(config)?;
        let sandbox = session::create(&config.spec)?;
        let info = SandboxInfo {
            id: sandbox.id().to_string(),
            backend: Self::NAME.into(),
            layers: sandbox.layers().clone(),
            host_pids: vec![sandbox.pid()],
            labels: config.labels.clone(),
        };
        Ok(Box::new(InProcessSandbox {
            info,
            shared: Arc::new(Held {
                sandbox: Mutex::new(Some(sandbox)),
                spawned: AtomicBool::new(false),
            }),
        }))
    }
}

/// What an in-process sandbox's handle and its executions share.
struct Held {
    /// `None` once destroyed.
    sandbox: Mutex<Option<Sandbox>>,
    /// A spawned command is not yet waited for.
    spawned: AtomicBool,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, Option<Sandbox>> {
        self.sandbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct InProcessSandbox {
    info: SandboxInfo,
    shared: Arc<Held>,
}

impl InProcessSandbox {
    /// Runs `f` on the sandbox (which must not have a spawned command
    /// outstanding when `exclusive`).
    fn with<T>(
        &self,
        exclusive: bool,
        f: impl FnOnce(&mut Sandbox) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut guard = self.shared.lock();
        let sb = guard.as_mut().ok_or_else(|| destroyed(&self.info.id))?;
        if exclusive && self.shared.spawned.load(Ordering::SeqCst) {
            return Err(one_at_a_time(&self.info.id));
        }
        f(sb)
    }
}

fn one_at_a_time(id: &str) -> Error {
    Error::InvalidSpec(format!(
        "sandbox {id}: a spawned command is not yet waited for; the {} backend runs one \
         command at a time (wait for it, or use the native backend)",
        NativeInProcess::NAME
    ))
}

impl LiveSandbox for InProcessSandbox {
    fn id(&self) -> &str {
        &self.info.id
    }

    fn info(&self) -> SandboxInfo {
        self.info.clone()
    }

    fn spawn(&self, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
        let mut guard = self.shared.lock();
        let sb = guard.as_mut().ok_or_else(|| destroyed(&self.info.id))?;
        if self.shared.spawned.swap(true, Ordering::SeqCst) {
            return Err(one_at_a_time(&self.info.id));
        }
        let started = Instant::now();
        match session::spawn(sb, spec, !matches!(spec.stdin, Stdin::Null)) {
            Ok(spawned) => Ok(Box::new(InProcessExecution {
                exec_id: spawned.id,
                before: session::cgroup_events(sb),
                spawned: Some(spawned),
                spec: spec.clone(),
                started,
                sandbox_id: self.info.id.clone(),
                shared: self.shared.clone(),
            })),
            Err(e) => {
                self.shared.spawned.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn exec(&self, spec: &ExecSpec) -> Result<Outcome, Error> {
        self.with(true, |sb| session::exec(sb, spec))
    }

    fn exec_streaming(&self, spec: &ExecSpec, echo: Echo<'_>) -> Result<Outcome, Error> {
        self.with(true, |sb| session::exec_echo(sb, spec, Some(echo.raw())))
    }

    fn pause(&self) -> Result<(), Error> {
        self.with(false, session::pause)
    }

    fn resume(&self) -> Result<(), Error> {
        self.with(false, session::resume)
    }

    fn stats(&self) -> Result<SandboxStats, Error> {
        let spawned = self.shared.spawned.load(Ordering::SeqCst);
        self.with(false, |sb| {
            let st = session::status(sb);
            Ok(SandboxStats {
                state: st.state,
                memory_bytes: st.memory_bytes,
                cpu: st.cpu,
                tasks: st.tasks,
                can_pause: st.can_pause,
                execs: u64::from(spawned),
                deadline: wall_clock(sb.started + sb.spec_limits.timeout),
            })
        })
    }

    fn destroy(&self) -> Result<(), Error> {
        let taken = self.shared.lock().take();
        if let Some(sb) = taken {
            session::remove(sb);
        }
        Ok(())
    }
}

struct InProcessExecution {
    exec_id: u32,
    /// `None` once waited for.
    spawned: Option<Spawned>,
    spec: ExecSpec,
    started: Instant,
    before: CgroupEvents,
    sandbox_id: String,
    shared: Arc<Held>,
}

impl Execution for InProcessExecution {
    fn id(&self) -> u32 {
        self.exec_id
    }

    fn wait(mut self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        let spawned = self
            .spawned
            .take()
            .ok_or_else(|| Error::InvalidSpec("this command was waited for already".into()))?;
        let guard = self.shared.lock();
        let sb = guard.as_ref().ok_or_else(|| destroyed(&self.sandbox_id))?;
        session::wait_spawned(
            sb,
            spawned,
            &self.spec,
            self.started,
            self.before,
            echo.map(Echo::raw),
        )
    }
}

impl Drop for InProcessExecution {
    fn drop(&mut self) {
        if self.spawned.take().is_some() {
            // Never waited for: the command is killed (as a keeper does
            // when its client hangs up).
            if let Some(sb) = self.shared.lock().as_ref() {
                if let Some(l) = sb.lifeline {
                    let _ = crate::native::sys::write_all(
                        l,
                        &session::kill_frame(self.exec_id, libc::SIGKILL),
                    );
                }
            }
        }
        self.shared.spawned.store(false, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// native (keepers)

/// How long a keeper may take to acknowledge a stop before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(5);

/// The native engine, one keeper process per sandbox ([`crate::keeper`]):
/// the sandbox is created and held by `nanoclaw __keeper` (nanoclaw's own
/// binary, re-executed single-threaded), lives on when its handle is
/// dropped, and serves any number of commands at once.
#[derive(Debug, Clone)]
pub struct NativeKeeper {
    exe: PathBuf,
    root: PathBuf,
}

impl NativeKeeper {
    /// Its name.
    pub const NAME: &'static str = "native";

    /// Keepers run from `exe` (nanoclaw's binary: it must run the hidden
    /// `__keeper` command), with their state under `root` (created 0700 if
    /// missing; it and its parent must belong to this user and be writable
    /// by it alone). [`keeper::state_root`] is the one the CLI uses.
    pub fn new(exe: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Result<NativeKeeper, Error> {
        let root = root.into();
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        keeper::own_dir(&root, uid).map_err(|e| keeper_error(e, None))?;
        Ok(NativeKeeper {
            exe: exe.into(),
            root,
        })
    }
}

impl Backend for NativeKeeper {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NATIVE
    }

    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error> {
        self.check(config)?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let cfg = KeeperConfig {
            spec: config.spec.clone(),
            name: None,
            labels: config.labels.clone(),
            lifetime_ms: ms(config.spec.limits.timeout),
            idle_timeout_ms: config.idle_timeout.map(ms),
            exec_timeout_ms: ms(crate::spec::DEFAULT_TIMEOUT),
            root: self.root.clone(),
        };
        let id = keeper::start_keeper(&self.exe, &cfg).map_err(|e| keeper_error(e, None))?;
        let dir = self.root.join(&id);
        let remote = Remote::new(&id, &dir);
        let Some(state) = keeper::read_state(&dir) else {
            let _ = remote.ask_within(&Request::Stop, STOP_PATIENCE);
            return Err(Error::Backend {
                backend: Self::NAME.into(),
                message: format!(
                    "sandbox {id}: its keeper recorded no state in {}",
                    dir.display()
                ),
            });
        };
        Ok(Box::new(KeeperSandbox {
            info: SandboxInfo {
                id,
                backend: Self::NAME.into(),
                layers: state.layers.clone(),
                host_pids: vec![state.keeper_pid as i32, state.init_pid],
                labels: state.labels.clone(),
            },
            remote,
            state,
        }))
    }
}

/// A keeper's error (about sandbox `id`, if known) as the engine's.
fn keeper_error(e: KeeperError, id: Option<&str>) -> Error {
    match e {
        KeeperError::Engine(e) => e,
        KeeperError::NotFound(id) => Error::NotFound {
            id,
            what: "its keeper is gone (the sandbox has ended)".into(),
        },
        KeeperError::Invalid(m) => Error::InvalidSpec(m),
        KeeperError::Io { what, source } => Error::Sys { call: what, source },
        other @ (KeeperError::Ambiguous(_) | KeeperError::Busy(_) | KeeperError::Protocol(_)) => {
            Error::Backend {
                backend: NativeKeeper::NAME.into(),
                message: match id {
                    Some(id) => format!("sandbox {id}: {other}"),
                    None => other.to_string(),
                },
            }
        }
    }
}

struct KeeperSandbox {
    info: SandboxInfo,
    remote: Remote,
    state: keeper::State,
}

impl KeeperSandbox {
    /// Asks the keeper; its `Live` answer.
    fn ask(&self, req: &Request) -> Result<Live, Error> {
        match self.remote.ask(req) {
            Ok(Reply::Live(live)) => Ok(*live),
            Ok(Reply::Error(m)) => Err(Error::Backend {
                backend: NativeKeeper::NAME.into(),
                message: m,
            }),
            Ok(Reply::Stopping) => Err(destroyed(&self.info.id)),
            Ok(Reply::Network(_) | Reply::Lifetime { .. }) => Err(Error::Backend {
                backend: NativeKeeper::NAME.into(),
                message: "the keeper answered another request".into(),
            }),
            Err(e) => Err(keeper_error(e, Some(&self.info.id))),
        }
    }
}

impl LiveSandbox for KeeperSandbox {
    fn id(&self) -> &str {
        &self.info.id
    }

    fn info(&self) -> SandboxInfo {
        self.info.clone()
    }

    fn spawn(&self, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
        let started = Instant::now();
        let id = &self.info.id;
        let paused = Error::Paused { id: id.clone() };
        let rs = self
            .remote
            .spawn(spec, !matches!(spec.stdin, Stdin::Null))
            .map_err(|e| match e {
                // The keeper sends the engine's message; the error is typed
                // again here, as the in-process backend returns it.
                KeeperError::Invalid(m) if m == paused.to_string() => paused,
                e => keeper_error(e, Some(id)),
            })?;
        Ok(Box::new(KeeperExecution {
            exec_id: rs.spawned.id,
            rs,
            spec: spec.clone(),
            started,
            sandbox_id: self.info.id.clone(),
            layers: self.info.layers.clone(),
        }))
    }

    fn pause(&self) -> Result<(), Error> {
        self.ask(&Request::Pause).map(drop)
    }

    fn resume(&self) -> Result<(), Error> {
        self.ask(&Request::Resume).map(drop)
    }

    fn stats(&self) -> Result<SandboxStats, Error> {
        let live = self.ask(&Request::Inspect)?;
        Ok(SandboxStats {
            state: if live.state == "paused" {
                RunState::Paused
            } else {
                RunState::Running
            },
            memory_bytes: live.memory_bytes,
            cpu: live
                .cpu_used_ms
                .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
            tasks: live.tasks,
            can_pause: live.can_pause,
            execs: live.execs,
            deadline: UNIX_EPOCH + Duration::from_secs(live.deadline),
        })
    }

    fn destroy(&self) -> Result<(), Error> {
        keeper::stop_sandbox(&self.remote, &self.state, false, STOP_PATIENCE)
            .map_err(|e| keeper_error(e, Some(&self.info.id)))
    }
}

struct KeeperExecution {
    exec_id: u32,
    rs: RemoteSpawn,
    spec: ExecSpec,
    started: Instant,
    sandbox_id: String,
    layers: Layers,
}

impl Execution for KeeperExecution {
    fn id(&self) -> u32 {
        self.exec_id
    }

    fn wait(self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        let me = *self;
        let mut outcome = me
            .rs
            .wait(&me.sandbox_id, &me.spec, me.started, echo.map(Echo::raw))
            .map_err(|e| keeper_error(e, Some(&me.sandbox_id)))?;
        outcome.layers = me.layers;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Access, Mount};

    /// A configuration that asks for every optional feature.
    fn everything() -> SandboxConfig {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.root = Root::Layers(vec!["/l".into()]);
        spec.root_upper = Some("/u".into());
        spec.mounts.push(Mount {
            source: "/srv".into(),
            target: "/srv".into(),
            access: Access::Rw,
        });
        spec.limits.memory_swap = Some(1 << 30);
        spec.network = Network::Kernel { cidrs: Vec::new() };
        spec.hardening.seccomp = Seccomp::Unconfined;
        spec.hardening.cap_add.push("CHOWN".into());
        spec.hardening.exec_allow.push("/usr".into());
        spec.hardening.tmp_noexec = true;
        spec.home = Some("/home/user".into());
        let mut c = SandboxConfig::new(spec);
        c.idle_timeout = Some(Duration::from_secs(60));
        c
    }

    #[test]
    fn a_field_a_backend_cannot_honour_is_refused_by_name() {
        assert!(Capabilities::NATIVE.check("native", &everything()).is_ok());
        let docker = Capabilities {
            exec_allow: false,
            ..Capabilities::NATIVE
        };
        let e = docker.check("docker", &everything()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--backend docker: --exec-allow is not supported: this backend cannot provide it; \
             drop it, or use another --backend"
        );
        let mut plain = SandboxConfig::new(SandboxSpec::new(["ignored"]));
        assert!(plain.spec.command.is_empty(), "the command is cleared");
        assert!(docker.check("docker", &plain).is_ok());
        plain.spec.root = Root::Dir("/d".into());
        let e = Capabilities::NATIVE.check("native", &plain).unwrap_err();
        assert!(matches!(&e, Error::NotSupported { field, .. } if field == "a directory root"));
    }

    #[test]
    fn the_in_process_backend_refuses_an_idle_timeout_with_its_reason() {
        let mut c = SandboxConfig::new(SandboxSpec::new(Vec::<String>::new()));
        assert!(NativeInProcess.check(&c).is_ok());
        c.idle_timeout = Some(Duration::from_secs(1));
        let e = NativeInProcess.check(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("--backend native-in-process: --idle-timeout is not supported: nothing"),
            "{e}"
        );
    }
}
