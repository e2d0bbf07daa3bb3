//! The one interface between the HTTP layer and the sandboxes.
//!
//! The E2B routes (`crate::e2b`) parse a request into a call on
//! [`Backend`] and turn its answer (or [`BackendError`]) into E2B's wire
//! format; they never touch a keeper or a sandbox themselves. The trait is
//! shaped by what E2B's API needs and stays implementable over keepers (one
//! single-threaded process per sandbox that starts processes, hands over
//! their pipes, reports started/exited, takes signals, and does file work
//! with commands run inside the sandbox):
//!
//! * every call carries the caller's [`TenantId`]; a sandbox of another
//!   tenant must be answered with [`BackendError::NotFound`], exactly as if
//!   it did not exist;
//! * a process is addressed by pid (or by E2B's `tag`), and its output is a
//!   [`ProcessHandle`]: the pid plus a channel of [`ProcessEvent`]s;
//! * file bodies are streams ([`ByteStream`]) both ways, so large files are
//!   never held in memory whole.
//!
//! Paths are passed through verbatim: relative paths, `..` and symlinks are
//! for the backend to resolve *inside* the sandbox (as envd does). The HTTP
//! layer only refuses empty paths and paths with NUL bytes.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;

pub use crate::auth::TenantId;

/// A stream of file bytes. An `Err` item aborts the transfer: a backend
/// writing a file must then not leave a truncated file behind as if the
/// upload had succeeded (write to a temporary name and rename, or remove).
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>;

/// Shorthand for a backend result.
pub type BackendResult<T> = Result<T, BackendError>;

/// What went wrong, in terms the HTTP layer can map to E2B's REST errors
/// (`{"code": <http status>, "message": …}`) and to Connect error codes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// No such sandbox, process, file or watcher — or one that belongs to
    /// another tenant. REST 404, Connect `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but its values are not acceptable
    /// (unknown template, bad cwd, path is a directory, …). REST 400,
    /// Connect `invalid_argument`.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing to create exists already (`MakeDir` on an existing
    /// directory). REST 409, Connect `already_exists`.
    #[error("{0}")]
    AlreadyExists(String),
    /// The sandbox is not in a state that allows this (pausing a paused
    /// sandbox, resuming a running one). REST 409, Connect
    /// `failed_precondition`.
    #[error("{0}")]
    Conflict(String),
    /// A quota or rate limit refused the call. REST 429 (with
    /// `Retry-After` when known), Connect `resource_exhausted`.
    #[error("quota exceeded: {which}")]
    QuotaExceeded {
        /// Which limit (e.g. `"concurrent sandboxes"`).
        which: String,
        /// When trying again may succeed.
        retry_after: Option<Duration>,
    },
    /// The sandbox's user may not do this (permission denied inside the
    /// sandbox). REST 403, Connect `permission_denied`.
    #[error("{0}")]
    PermissionDenied(String),
    /// The sandbox's disk is full. REST 507 (envd's answer), Connect
    /// `resource_exhausted`.
    #[error("{0}")]
    NoSpace(String),
    /// Not supported by this backend (PTY, …). REST 501, Connect
    /// `unimplemented`.
    #[error("{0}")]
    Unimplemented(String),
    /// The operation did not finish in time. REST 504, Connect
    /// `deadline_exceeded`.
    #[error("{0}")]
    Timeout(String),
    /// The sandbox cannot serve the call now (paused, its keeper gone).
    /// REST 502 on the data plane (E2B's proxy answer for a sandbox it
    /// cannot reach) and 503 on the control plane, Connect `unavailable`.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure. REST 500, Connect `internal`.
    #[error("{0}")]
    Internal(String),
}

/// Whether a sandbox is running or paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxState {
    /// Running: processes run, files can be read and written.
    Running,
    /// Paused: nothing runs; `connect`/`resume` brings it back.
    Paused,
}

/// `POST /sandboxes`: a new sandbox for `tenant`.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateSandbox {
    /// The owner.
    pub tenant: TenantId,
    /// E2B's `templateID` (template name or id; `base` by default in the
    /// SDK). The backend decides which templates exist.
    pub template: String,
    /// Time to live from now; the sandbox is killed (or paused, with
    /// `auto_pause`) when it runs out.
    pub timeout: Duration,
    /// User metadata, returned by `get`/`list` and usable as a list filter.
    pub metadata: BTreeMap<String, String>,
    /// Environment variables for every process of the sandbox.
    pub env_vars: BTreeMap<String, String>,
    /// E2B's `allow_internet_access`: `None` when the request did not say.
    /// `Some(false)` means the same as denying `0.0.0.0/0`.
    pub allow_internet_access: Option<bool>,
    /// E2B's `network.allowOut`: CIDRs, IPs or domain names (`*.x.com`).
    pub allow_out: Vec<String>,
    /// E2B's `network.denyOut`: CIDRs or IPs.
    pub deny_out: Vec<String>,
    /// E2B's `network.rules`: headers the sandbox's egress proxy sets on
    /// requests to the hosts they name (credentials kept out of the
    /// sandbox). They allow nothing: `allowOut` (or the internet) must.
    pub network_rules: nanoclaw_sandbox::net::HeaderRules,
    /// Pause instead of kill when the timeout runs out.
    pub auto_pause: bool,
    /// The secret every envd (data plane) request for this sandbox must
    /// carry as `X-Access-Token`. Minted by the HTTP layer; the backend
    /// stores it and returns it from [`Backend::envd_access`].
    pub envd_access_token: String,
}

/// E2B's `PUT /sandboxes/{id}/network`: the egress rules that replace a
/// running sandbox's (a field left out is cleared, as in E2B).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkUpdate {
    /// `allow_internet_access`: `Some(false)` denies everything.
    pub allow_internet_access: Option<bool>,
    /// `allowOut`: CIDRs, IPs or domain names (`*.x.com`).
    pub allow_out: Vec<String>,
    /// `denyOut`: CIDRs or IPs.
    pub deny_out: Vec<String>,
    /// `rules`: the credential rules that replace the sandbox's (empty:
    /// none any more). Only domains the sandbox was created with rules
    /// for can have rules (its interception CA is fixed at creation).
    pub rules: nanoclaw_sandbox::net::HeaderRules,
}

/// What E2B's API says about a sandbox.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxInfo {
    /// The sandbox's id (unguessable: it is also the data-plane address).
    pub sandbox_id: String,
    /// The template it was created from.
    pub template_id: String,
    /// The template's alias, when it has one.
    pub alias: Option<String>,
    /// When it was started.
    pub started_at: SystemTime,
    /// When its timeout runs out.
    pub end_at: SystemTime,
    /// Running or paused.
    pub state: SandboxState,
    /// User metadata given at creation.
    pub metadata: BTreeMap<String, String>,
    /// CPUs available to it.
    pub cpu_count: u32,
    /// Memory limit in MiB.
    pub memory_mb: u32,
    /// Disk size in MiB (0 when not limited).
    pub disk_size_mb: u32,
    /// As given at creation.
    pub allow_internet_access: Option<bool>,
    /// As given at creation.
    pub allow_out: Vec<String>,
    /// As given at creation.
    pub deny_out: Vec<String>,
    /// As given at creation.
    pub auto_pause: bool,
    /// The data-plane secret (see [`CreateSandbox::envd_access_token`]).
    pub envd_access_token: String,
}

/// One resource-usage sample of a sandbox.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxMetric {
    /// When it was taken.
    pub timestamp: SystemTime,
    /// CPUs available.
    pub cpu_count: u32,
    /// CPU use in percent of `cpu_count` CPUs.
    pub cpu_used_pct: f32,
    /// Memory used, bytes.
    pub mem_used: u64,
    /// Memory limit, bytes.
    pub mem_total: u64,
    /// Page cache, bytes.
    pub mem_cache: u64,
    /// Disk used, bytes.
    pub disk_used: u64,
    /// Disk size, bytes.
    pub disk_total: u64,
}

/// Who may use a sandbox's data plane: its owner and its access token.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvdAccess {
    /// The owner; data-plane calls are made on its behalf.
    pub tenant: TenantId,
    /// The token given at creation.
    pub access_token: String,
    /// Running or paused (a paused sandbox's data plane answers 502).
    pub state: SandboxState,
}

/// Which sandbox a data-plane call is for, on whose behalf, and as which
/// user inside the sandbox.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxScope {
    /// The sandbox's owner (from its access token).
    pub tenant: TenantId,
    /// The sandbox.
    pub sandbox_id: String,
    /// The user inside the sandbox (envd's `Authorization: Basic user:`
    /// header, or the `username` query parameter of `/files`); `None`
    /// means the sandbox's default user.
    pub user: Option<String>,
}

/// What to run: E2B's `ProcessConfig`. The SDK's `commands.run(cmd)`
/// sends `cmd: "/bin/bash", args: ["-l", "-c", cmd]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessConfig {
    /// The program (looked up in `PATH` inside the sandbox when bare).
    pub cmd: String,
    /// Its arguments (without argv\[0\]).
    pub args: Vec<String>,
    /// Extra environment, over the sandbox's.
    pub envs: BTreeMap<String, String>,
    /// Working directory; the user's home when `None`.
    pub cwd: Option<String>,
}

/// A terminal size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtySize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// `Process.Start`.
#[derive(Clone, Debug, PartialEq)]
pub struct StartProcess {
    /// What to run.
    pub config: ProcessConfig,
    /// E2B's optional tag, usable instead of the pid to address it.
    pub tag: Option<String>,
    /// Keep a stdin pipe open for `send_input`/`close_stdin`. When false
    /// stdin is `/dev/null`.
    pub stdin: bool,
    /// Run on a terminal of this size (output then comes as
    /// [`ProcessOutput::Pty`]). A backend without PTYs answers
    /// [`BackendError::Unimplemented`].
    pub pty: Option<PtySize>,
    /// Kill the process after this long (E2B's command `timeout`, sent as
    /// `Connect-Timeout-Ms`); `None` means no limit. Closing the stream
    /// does *not* kill the process.
    pub timeout: Option<Duration>,
}

/// How a process is addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessSelector {
    /// By pid (as reported in the start event).
    Pid(u32),
    /// By the tag given at start.
    Tag(String),
}

/// A chunk of output.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessOutput {
    /// From stdout.
    Stdout(Bytes),
    /// From stderr.
    Stderr(Bytes),
    /// From the terminal (PTY processes).
    Pty(Bytes),
}

/// How a process ended, as envd reports it (Go's `ProcessState`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessEnd {
    /// Exit code, or -1 when killed by a signal.
    pub exit_code: i32,
    /// True when it exited (rather than being killed by a signal).
    pub exited: bool,
    /// `"exit status N"` or `"signal: killed"` style text.
    pub status: String,
    /// Set when the process failed (non-zero exit or signal), with the
    /// same text as `status`, as envd does.
    pub error: Option<String>,
}

impl ProcessEnd {
    /// A process that exited with `code`.
    pub fn exited(code: i32) -> Self {
        let status = format!("exit status {code}");
        ProcessEnd {
            exit_code: code,
            exited: true,
            error: (code != 0).then(|| status.clone()),
            status,
        }
    }

    /// A process killed by signal `signal` (Go's wording: `signal: killed`).
    pub fn signaled(signal: i32) -> Self {
        let status = format!("signal: {}", signal_name(signal));
        ProcessEnd {
            exit_code: -1,
            exited: false,
            error: Some(status.clone()),
            status,
        }
    }
}

/// Go's (`syscall.Signal.String`) names of the common signals.
fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGHUP => "hangup".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGQUIT => "quit".into(),
        libc::SIGILL => "illegal instruction".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGBUS => "bus error".into(),
        libc::SIGFPE => "floating point exception".into(),
        libc::SIGKILL => "killed".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGALRM => "alarm clock".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGXCPU => "CPU time limit exceeded".into(),
        libc::SIGXFSZ => "file size limit exceeded".into(),
        other => format!("signal {other}"),
    }
}

/// What a running process reports after its start.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessEvent {
    /// Output, in the order it was read.
    Data(ProcessOutput),
    /// The end; nothing follows it.
    End(ProcessEnd),
}

/// A started (or connected-to) process: its pid and its events from now
/// on. Dropping the receiver only stops this listener; the process keeps
/// running. A sender dropped without an [`ProcessEvent::End`] means the
/// sandbox went away (the stream ends with `unavailable`).
#[derive(Debug)]
pub struct ProcessHandle {
    /// The pid, as the sandbox sees it.
    pub pid: u32,
    /// Output and end events. The HTTP layer reads it at the client's
    /// pace, so a backend should bound what it buffers per listener.
    pub events: mpsc::Receiver<ProcessEvent>,
}

/// One entry of `Process.List`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessInfo {
    /// Its pid.
    pub pid: u32,
    /// Its tag, if it was started with one.
    pub tag: Option<String>,
    /// How it was started.
    pub config: ProcessConfig,
}

/// Input for a process.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessInput {
    /// Bytes for its stdin pipe.
    Stdin(Bytes),
    /// Bytes for its terminal.
    Pty(Bytes),
}

/// The signals E2B can send, and SIGINT (code contexts interrupt a cell
/// with it, as Jupyter does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
    /// SIGINT.
    Interrupt,
}

/// The kind of a filesystem entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    /// A regular file (or anything that is not a directory or symlink).
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
}

/// envd's `EntryInfo`.
#[derive(Clone, Debug, PartialEq)]
pub struct EntryInfo {
    /// Base name.
    pub name: String,
    /// Kind.
    pub file_type: FileType,
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Size in bytes.
    pub size: i64,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
    /// `ls -l` style permissions, e.g. `-rw-r--r--`.
    pub permissions: String,
    /// Owner's user name.
    pub owner: String,
    /// Owner's group name.
    pub group: String,
    /// Last modification.
    pub modified_time: Option<SystemTime>,
    /// A symlink's target.
    pub symlink_target: Option<String>,
    /// User metadata of the file (envd keeps it as `user.e2b.<key>`
    /// extended attributes); empty when none.
    pub metadata: BTreeMap<String, String>,
}

/// `Filesystem.WatchDir` / `CreateWatcher`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    /// The directory.
    pub path: String,
    /// Watch subdirectories too.
    pub recursive: bool,
    /// Fill [`FsEvent::entry`] when the entry can be stat-ed.
    pub include_entry: bool,
    /// E2B's `allow_network_mounts`: watching a network filesystem was
    /// asked for explicitly (a sandbox without network mounts can ignore
    /// it).
    pub allow_network_mounts: bool,
}

/// The kind of a filesystem event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsEventType {
    /// Created.
    Create,
    /// Written.
    Write,
    /// Removed.
    Remove,
    /// Renamed (away).
    Rename,
    /// Permissions changed.
    Chmod,
}

/// One change under a watched directory.
#[derive(Clone, Debug, PartialEq)]
pub struct FsEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    pub event_type: FsEventType,
    /// The entry, when asked for and available.
    pub entry: Option<EntryInfo>,
}

/// A file being downloaded.
pub struct FileDownload {
    /// Its size, when known up front (sent as `Content-Length`).
    pub size: Option<u64>,
    /// Its bytes.
    pub body: ByteStream,
}

impl std::fmt::Debug for FileDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDownload")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The result of `POST /sandboxes/{id}/connect`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectOutcome {
    /// The sandbox after the call.
    pub info: SandboxInfo,
    /// True when it was paused and has been resumed (HTTP 201), false when
    /// it was running already (HTTP 200).
    pub resumed: bool,
}

/// `POST /v1/run` (nanoclaw's own): one command in a fresh sandbox that
/// is removed afterwards. Either `command`, or `lang` + `code`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The template (default `base`).
    #[serde(default)]
    pub template: Option<String>,
    /// argv.
    #[serde(default)]
    pub command: Vec<String>,
    /// `python`, `node`, `bash` or `sh`, with `code`.
    #[serde(default)]
    pub lang: Option<String>,
    /// The snippet for `lang`.
    #[serde(default)]
    pub code: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit in milliseconds (default 30 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Bytes for stdin (UTF-8).
    #[serde(default)]
    pub stdin: Option<String>,
}

/// An image registered as a template for one tenant (`POST /v1/images`):
/// sandboxes made from it have the image's layers as their root (the
/// sandbox's writes on a per-sandbox layer above them) and its
/// environment, with everything else of `base` (user 1000, `/home/user`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTemplate {
    /// The image's reference in the store.
    pub reference: String,
    /// Its layer directories, lowest first.
    pub layers: Vec<std::path::PathBuf>,
    /// Its `ENV`, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// The languages it was registered for: `lang` runs in another are
    /// refused.
    pub languages: Vec<String>,
}

/// Everything the E2B layer asks of sandboxes. See the module docs.
///
/// Methods return `Send` futures (write them as `async fn` in the impl;
/// the compiler checks the futures are `Send`).
pub trait Backend: Send + Sync + 'static {
    /// Creates (or takes from a warm pool) a sandbox for `req.tenant`.
    fn create(&self, req: CreateSandbox)
        -> impl Future<Output = BackendResult<SandboxInfo>> + Send;

    /// One of the tenant's sandboxes.
    fn get(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
    ) -> impl Future<Output = BackendResult<SandboxInfo>> + Send;

    /// All of the tenant's sandboxes, running and paused.
    fn list(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = BackendResult<Vec<SandboxInfo>>> + Send;

    /// Kills a sandbox (running or paused) and forgets it.
    fn kill(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Pauses a running sandbox; [`BackendError::Conflict`] when it is
    /// paused already.
    fn pause(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Resumes a paused sandbox with a new time to live;
    /// [`BackendError::Conflict`] when it is running.
    fn resume(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        timeout: Duration,
    ) -> impl Future<Output = BackendResult<SandboxInfo>> + Send;

    /// Sets the time to live to `timeout` from now (shorter or longer).
    fn set_timeout(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        timeout: Duration,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Replaces a running (or paused) sandbox's egress rules: new
    /// connections and its DNS answers follow them at once, and open
    /// connections they no longer allow are closed.
    /// [`BackendError::Conflict`] when the sandbox has no egress proxy to
    /// update (it was created without internet access).
    fn update_network(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        update: NetworkUpdate,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Resource-usage samples, oldest first (at least the current one for a
    /// running sandbox).
    fn metrics(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
    ) -> impl Future<Output = BackendResult<Vec<SandboxMetric>>> + Send;

    /// Owner and access token of a sandbox, for the data plane (whose
    /// requests carry the sandbox id and its token, not an API key).
    fn envd_access(
        &self,
        sandbox_id: &str,
    ) -> impl Future<Output = BackendResult<EnvdAccess>> + Send;

    /// E2B's connect: resumes a paused sandbox, or extends a running
    /// one's time to live to `timeout` from now if that is later than its
    /// current end (never shortens it).
    fn connect(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        timeout: Duration,
    ) -> impl Future<Output = BackendResult<ConnectOutcome>> + Send {
        async move {
            let info = self.get(tenant, sandbox_id).await?;
            match info.state {
                SandboxState::Paused => {
                    let info = self.resume(tenant, sandbox_id, timeout).await?;
                    Ok(ConnectOutcome {
                        info,
                        resumed: true,
                    })
                }
                SandboxState::Running => {
                    let wanted = SystemTime::now().checked_add(timeout);
                    if wanted.is_none_or(|w| w <= info.end_at) {
                        return Ok(ConnectOutcome {
                            info,
                            resumed: false,
                        });
                    }
                    self.set_timeout(tenant, sandbox_id, timeout).await?;
                    let info = self.get(tenant, sandbox_id).await?;
                    Ok(ConnectOutcome {
                        info,
                        resumed: false,
                    })
                }
            }
        }
    }

    /// `POST /v1/run`: runs one command in a fresh sandbox (removed
    /// afterwards) and returns its outcome as `nanoclaw run --json` prints
    /// it.
    fn run_once(
        &self,
        tenant: &TenantId,
        req: RunRequest,
    ) -> impl Future<Output = BackendResult<serde_json::Value>> + Send {
        let _ = (tenant, req);
        async {
            Err(BackendError::Unimplemented(
                "one-shot runs are not supported here".into(),
            ))
        }
    }

    /// Makes `image` a template named `name` for `tenant` (replacing the
    /// tenant's template of that name). By default: not supported.
    fn register_image(
        &self,
        tenant: &TenantId,
        name: &str,
        image: ImageTemplate,
    ) -> BackendResult<()> {
        let _ = (tenant, name, image);
        Err(BackendError::Unimplemented(
            "this backend cannot use images as templates".into(),
        ))
    }

    /// Stops `tenant`'s image template `name` from being used: refused
    /// (`Conflict`) while a sandbox or one-shot run of the tenant uses it,
    /// `NotFound` when the tenant has no such template. The image's layers
    /// may be removed from the store once this returns `Ok`. By default:
    /// not supported.
    fn unregister_image(&self, tenant: &TenantId, name: &str) -> BackendResult<()> {
        let _ = (tenant, name);
        Err(BackendError::Unimplemented(
            "this backend cannot use images as templates".into(),
        ))
    }

    /// Why `name` cannot be a tenant's image template (one of the
    /// backend's own templates), checked before a build starts; `None`: it
    /// can.
    fn reserved_template(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }

    /// Brings what the backend reports in `GET /metrics` up to date just
    /// before it is rendered (e.g. [`crate::metrics::Metrics::set_sandboxes`]).
    /// Counters are bumped as things happen instead. By default nothing.
    fn refresh_metrics(
        &self,
        metrics: &crate::metrics::Metrics,
    ) -> impl Future<Output = ()> + Send {
        let _ = metrics;
        async {}
    }

    /// Starts a process. Its pid is known when this returns; its events
    /// follow on the handle.
    fn start_process(
        &self,
        scope: &SandboxScope,
        req: StartProcess,
    ) -> impl Future<Output = BackendResult<ProcessHandle>> + Send;

    /// Attaches to a running process: its events from now on.
    fn connect_process(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
    ) -> impl Future<Output = BackendResult<ProcessHandle>> + Send;

    /// The running processes.
    fn list_processes(
        &self,
        scope: &SandboxScope,
    ) -> impl Future<Output = BackendResult<Vec<ProcessInfo>>> + Send;

    /// Writes to a process's stdin (or terminal).
    fn send_input(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
        input: ProcessInput,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Closes a process's stdin (EOF).
    fn close_stdin(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Sends SIGTERM or SIGKILL.
    fn send_signal(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
        signal: Signal,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Resizes a process's terminal. Without PTY support: unimplemented.
    fn update_pty(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
        size: Option<PtySize>,
    ) -> impl Future<Output = BackendResult<()>> + Send {
        let _ = (scope, selector, size);
        async { Err(BackendError::Unimplemented("PTY is not supported".into())) }
    }

    /// Describes one entry (symlinks not followed).
    fn stat(
        &self,
        scope: &SandboxScope,
        path: &str,
    ) -> impl Future<Output = BackendResult<EntryInfo>> + Send;

    /// Lists a directory down to `depth` levels (1: its children only).
    fn list_dir(
        &self,
        scope: &SandboxScope,
        path: &str,
        depth: u32,
    ) -> impl Future<Output = BackendResult<Vec<EntryInfo>>> + Send;

    /// Creates a directory and its parents; [`BackendError::AlreadyExists`]
    /// when it exists.
    fn make_dir(
        &self,
        scope: &SandboxScope,
        path: &str,
    ) -> impl Future<Output = BackendResult<EntryInfo>> + Send;

    /// Renames `source` to `destination`; returns the moved entry.
    fn rename(
        &self,
        scope: &SandboxScope,
        source: &str,
        destination: &str,
    ) -> impl Future<Output = BackendResult<EntryInfo>> + Send;

    /// Removes a file or a directory tree.
    fn remove(
        &self,
        scope: &SandboxScope,
        path: &str,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Opens a file for download ([`BackendError::InvalidArgument`] for a
    /// directory).
    fn read_file(
        &self,
        scope: &SandboxScope,
        path: &str,
    ) -> impl Future<Output = BackendResult<FileDownload>> + Send;

    /// Writes (creates or replaces) a file from `body`, creating parent
    /// directories, owned by the scope's user. `metadata` replaces the
    /// file's user metadata (an empty map clears it), as envd's `/files`
    /// does with `X-Metadata-*` headers; keys are lowercase printable
    /// ASCII, already validated against envd's limits.
    fn write_file(
        &self,
        scope: &SandboxScope,
        path: &str,
        metadata: &BTreeMap<String, String>,
        body: ByteStream,
    ) -> impl Future<Output = BackendResult<EntryInfo>> + Send;

    /// Watches a directory. The receiver yields events until the sandbox
    /// goes away (sender dropped) or the receiver is dropped (which must
    /// stop the watch).
    fn watch_dir(
        &self,
        scope: &SandboxScope,
        spec: WatchSpec,
    ) -> impl Future<Output = BackendResult<mpsc::Receiver<FsEvent>>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_end_matches_go_wording() {
        let ok = ProcessEnd::exited(0);
        assert_eq!(ok.status, "exit status 0");
        assert!(ok.exited && ok.error.is_none());
        let bad = ProcessEnd::exited(3);
        assert_eq!(bad.error.as_deref(), Some("exit status 3"));
        let killed = ProcessEnd::signaled(libc::SIGKILL);
        assert_eq!(killed.status, "signal: killed");
        assert_eq!(killed.exit_code, -1);
        assert!(!killed.exited);
    }
}
