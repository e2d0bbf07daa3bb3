//! The `gvisor` backend: each sandbox is a gVisor container, run by
//! `runsc` (Debian's `runsc` package) from an OCI bundle nanoclaw writes —
//! no Docker. gVisor's sentry, a kernel in user space, serves the sandbox's
//! system calls, so a kernel bug reachable from the sandbox is gVisor's, not
//! the host's: seed 002's stronger wall for untrusted code.
//!
//! * **create**: a bundle in `<root>/<id>` (the host's `/usr`, `/bin`,
//!   `/lib*` read-only, a synthetic `/etc`, a size-limited `/tmp`, the
//!   configuration's mounts), its cgroups made by the engine's cgroup code
//!   (`<hierarchy>/nanoclaw/<id>`, limits written), then `runsc run` in
//!   its own process group: it holds the sandbox and, when the sandbox
//!   ends, removes runsc's state. The container's init (`sh` waiting for
//!   `sleep <lifetime>`, as `nobody`) reaps orphans and exits when the
//!   lifetime ends, and gVisor then ends the sandbox itself, so a sandbox
//!   outlives its handle but never its lifetime; one not labelled
//!   [`LABEL_DETACHED`] is swept once the process that made it is gone.
//! * **exec**: `runsc exec --process` per command, stdio on pipes;
//!   nanoclaw enforces the timeout and output limit and kills the
//!   command's whole process group when one fires.
//! * **pause/resume**: `runsc pause`/`resume`; **files**: through exec
//!   (the trait's default implementations).
//! * **destroy**: its init killed (gVisor ends the sandbox, `runsc run`
//!   removes runsc's state), then the cgroups and the bundle removed. A sandbox
//!   whose lifetime ended while nobody held it (nanoclaw killed) is swept
//!   by the next [`Gvisor::new`] (and [`Gvisor::sweep`], `nanoclaw sandbox
//!   prune`): no runsc state, process, cgroup or bundle stays.
//!
//! Rootless (`runsc --rootless --ignore-cgroups`) works without cgroups:
//! explicit limits are refused there, defaulted ones reported as degraded.
//! What gVisor cannot honour is refused by name ([`Gvisor::check`]).
#![warn(missing_docs)]

pub mod bundle;
pub mod cgroup;
pub mod egress;
pub mod exec;
pub mod runsc;
pub mod sandbox;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanoclaw_sandbox::backend::{
    Backend, Capabilities, Echo, Execution, LiveSandbox, SandboxConfig, SandboxInfo,
};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::netns_egress::NetnsEgress;
use nanoclaw_sandbox::spec::{SandboxSpec, Stdin};
use nanoclaw_sandbox::Outcome;

/// The label that makes a sandbox outlive the process that made it
/// (`nanoclaw sandbox create`); without it a sandbox whose maker is gone is
/// swept.
pub const LABEL_DETACHED: &str = "nanoclaw.detached";
use nanoclaw_sandbox::spec::{Root, Seccomp};
use nanoclaw_sandbox::{procs, Error, Layers};

use runsc::backend_error;
pub use runsc::Runsc;
pub use sandbox::{GvisorSandbox, Record};
use sandbox::{Shared, RECORD};

/// The backend's name (`--backend gvisor`).
pub const NAME: &str = "gvisor";

/// Sandbox ids start with this (and name their bundle directory).
pub const ID_PREFIX: &str = "gv-";

/// How to install runsc (for errors and `nanoclaw doctor`).
pub const INSTALL_HINT: &str =
    "install gVisor's runsc: on Debian 12, add the bookworm-backports suite \
     and run `apt-get install -t bookworm-backports runsc`";

/// A bundle directory without a runsc container that is older than this
/// was left by a process that died while creating it.
const ORPHAN_AGE: Duration = Duration::from_secs(60);

/// What the gvisor backend can honour.
pub const CAPABILITIES: Capabilities = Capabilities {
    host_root: true,
    image_root: false,
    dir_root: false,
    store_image: false,
    persistent_upper: false,
    mounts: true,
    memory_swap: false,
    network_allowlist: true,
    network_open: true,
    network_kernel: false,
    seccomp_profile: false,
    seccomp_unconfined: false,
    cap_add: true,
    exec_allow: false,
    tmp_noexec: true,
    home: true,
    idle_timeout: false,
    pause: true,
    concurrent_execs: true,
    detached: true,
};

/// The gvisor backend (see the crate's documentation).
#[derive(Debug, Clone)]
pub struct Gvisor {
    runsc: Runsc,
    root: PathBuf,
    host: bundle::HostLayout,
}

/// The refusal of `field` with its reason.
fn refuse(field: &str, why: &str) -> Error {
    Error::NotSupported {
        backend: NAME.into(),
        field: field.into(),
        why: why.into(),
    }
}

fn io(call: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Sys { call, source }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl Gvisor {
    /// Its name.
    pub const NAME: &'static str = NAME;

    /// The backend with runsc found on `PATH` (or `$NANOCLAW_RUNSC`), its
    /// state under [`Gvisor::default_root`]; sweeps what ended sandboxes
    /// left.
    pub fn new() -> Result<Gvisor, Error> {
        let exe = Gvisor::find_runsc().ok_or_else(|| Error::Unsupported {
            what: "--backend gvisor".into(),
            why: "runsc was not found on PATH".into(),
            fix: INSTALL_HINT.into(),
        })?;
        Gvisor::with(exe, Gvisor::default_root())
    }

    /// The backend with runsc `exe` and its state under `root` (created
    /// 0700, owned by this user); sweeps what ended sandboxes left there.
    pub fn with(exe: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Result<Gvisor, Error> {
        let root = root.into();
        nanoclaw_sandbox::keeper::own_dir(&root, euid()).map_err(|e| Error::Unsupported {
            what: format!("the gvisor backend's state directory {}", root.display()),
            why: e.to_string(),
            fix: "use a directory of your own (0700)".into(),
        })?;
        let state = root.join("runsc");
        std::fs::create_dir_all(&state).map_err(io(format!("mkdir {}", state.display())))?;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", state.display())))?;
        let g = Gvisor {
            runsc: Runsc {
                exe: exe.into(),
                state,
                rootless: euid() != 0,
                host_network: false,
            },
            root,
            host: bundle::HostLayout::probe(),
        };
        g.sweep()?;
        Ok(g)
    }

    /// Where this user's gVisor sandboxes are kept: `/run/nanoclaw/gvisor`
    /// for root, else `$XDG_RUNTIME_DIR/nanoclaw/gvisor` or
    /// `/tmp/nanoclaw-<uid>/gvisor`.
    pub fn default_root() -> PathBuf {
        let uid = euid();
        if uid == 0 {
            return PathBuf::from("/run/nanoclaw/gvisor");
        }
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
            Some(x) => PathBuf::from(x).join("nanoclaw/gvisor"),
            None => PathBuf::from(format!("/tmp/nanoclaw-{uid}/gvisor")),
        }
    }

    /// runsc: `$NANOCLAW_RUNSC`, else the first `runsc` on `PATH`.
    pub fn find_runsc() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("NANOCLAW_RUNSC").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| d.join("runsc"))
            .find(|p| p.is_file())
    }

    /// For `nanoclaw doctor`: runsc's path and version, or what to install.
    pub fn availability() -> Result<String, String> {
        let exe = Gvisor::find_runsc().ok_or_else(|| format!("runsc not found; {INSTALL_HINT}"))?;
        let v = Runsc::version(&exe).map_err(|e| format!("{e}; {INSTALL_HINT}"))?;
        let mode = if euid() == 0 {
            "rootful"
        } else {
            "rootless (runsc --rootless --ignore-cgroups: no cgroup limits)"
        };
        Ok(format!("{} ({v}), {mode}", exe.display()))
    }

    /// How runsc is run.
    pub fn runsc(&self) -> &Runsc {
        &self.runsc
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What each live sandbox kept here is (id, layers, host pids,
    /// labels), for `nanoclaw sandbox ls`.
    pub fn infos(&self) -> Result<Vec<SandboxInfo>, Error> {
        let mut out = Vec::new();
        for id in self.list()? {
            let Some(r) = read_record(&self.root.join(&id)) else {
                continue;
            };
            let mut host_pids = vec![r.runner_pid];
            host_pids.extend(sandbox::children(r.runner_pid));
            out.push(SandboxInfo {
                id,
                backend: NAME.into(),
                layers: r.layers,
                host_pids,
                labels: r.labels,
            });
        }
        Ok(out)
    }

    /// Ids of the live sandboxes kept here.
    pub fn list(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .runsc
            .list()?
            .into_iter()
            .filter(|c| c.id.starts_with(ID_PREFIX) && c.status != "stopped")
            .map(|c| c.id)
            .collect())
    }

    /// Removes what ended sandboxes left: sandboxes past their lifetime,
    /// sandboxes whose maker is gone (unless made detached), stopped
    /// containers, containers without a record, and bundles whose sandbox
    /// ended (its `runsc run` removed runsc's part) or whose creation never
    /// finished. Returns the ids removed.
    pub fn sweep(&self) -> Result<Vec<String>, Error> {
        let mut removed = Vec::new();
        let listed = self.runsc.list()?;
        let now = SystemTime::now();
        for c in listed.iter().filter(|c| c.id.starts_with(ID_PREFIX)) {
            let record = read_record(&self.root.join(&c.id));
            let gone = match &record {
                None => true,
                Some(r) => {
                    c.status == "stopped"
                        || r.deadline() + Duration::from_secs(2) < now
                        || (!r.detached && !owner_alive(r.owner))
                }
            };
            if gone {
                let pids = record.map(|r| vec![r.runner_pid]).unwrap_or_default();
                sandbox::stop(&self.runsc, &c.id, &self.root.join(&c.id), None, &pids)?;
                removed.push(c.id.clone());
            }
        }
        let entries =
            std::fs::read_dir(&self.root).map_err(io(format!("read {}", self.root.display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(ID_PREFIX) || listed.iter().any(|c| c.id == name) {
                continue;
            }
            let ended = match read_record(&e.path()) {
                // Its runner removed runsc's part when the sandbox ended.
                Some(r) => !sandbox::running(r.runner_pid),
                // A creation in progress writes its record within
                // moments; one that died before leaves none.
                None => e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > ORPHAN_AGE),
            };
            if ended {
                cgroup::remove(&name);
                let _ = std::fs::remove_dir_all(e.path());
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// The live sandbox `id`, made by this backend (in this or another
    /// process).
    pub fn open(&self, id: &str) -> Result<Box<dyn LiveSandbox>, Error> {
        let not_found = |what: &str| Error::NotFound {
            id: id.to_string(),
            what: what.to_string(),
        };
        if !id.starts_with(ID_PREFIX) || id.contains('/') {
            return Err(not_found("not a gvisor sandbox id"));
        }
        let bundle = self.root.join(id);
        let record = read_record(&bundle).ok_or_else(|| not_found("no such gvisor sandbox"))?;
        if !sandbox::running(record.runner_pid) || !sandbox::has_state(&self.runsc, id) {
            return Err(not_found("the sandbox has ended"));
        }
        Ok(self.handle(id, bundle, record, None, None))
    }

    fn handle(
        &self,
        id: &str,
        bundle: PathBuf,
        record: Record,
        runner: Option<std::process::Child>,
        egress: Option<NetnsEgress>,
    ) -> Box<dyn LiveSandbox> {
        let mut host_pids = vec![record.runner_pid];
        host_pids.extend(sandbox::children(record.runner_pid));
        let runsc = Runsc {
            host_network: record.host_network,
            ..self.runsc.clone()
        };
        Box::new(GvisorSandbox {
            shared: Arc::new(Shared {
                id: id.to_string(),
                bundle,
                runsc,
                record,
                host_pids,
                next_exec: AtomicU32::new(1),
                running: AtomicU64::new(0),
                destroyed: AtomicBool::new(false),
                runner: std::sync::Mutex::new(runner),
                egress: std::sync::Mutex::new(egress),
            }),
        })
    }

    /// What protects a sandbox of `config`, as the outcome's `layers`.
    fn layers(&self, config: &SandboxConfig) -> Layers {
        let s = &config.spec;
        let rootless = self.runsc.rootless;
        let mut cgroup = Vec::new();
        let mut degraded = Vec::new();
        let v = if Path::new("/sys/fs/cgroup/memory").is_dir() {
            "v1"
        } else {
            "v2"
        };
        if rootless {
            for (asked, what) in [
                (s.limits.memory.is_some(), "memory"),
                (s.limits.cpus.is_some(), "cpu"),
                (s.limits.pids.is_some(), "pids"),
            ] {
                if asked {
                    degraded.push(format!(
                        "{what}: not enforced (rootless runsc runs with --ignore-cgroups)"
                    ));
                }
            }
        } else {
            if s.limits.memory.is_some() {
                cgroup.push(format!(
                    "memory: {v} (the whole gVisor sandbox; ends it when exceeded)"
                ));
            }
            if s.limits.cpus.is_some() {
                cgroup.push(format!("cpu: {v}"));
            }
            if let Some(p) = s.limits.pids {
                cgroup.push(format!("pids: {v}"));
                degraded.push(format!(
                    "pids: gVisor's tasks are threads of its sentry on the host, so the host limit is {} \
                     threads (2 per task + {}) and ends the sandbox when hit, instead of fork failing",
                    bundle::host_pids_limit(p),
                    bundle::PIDS_OVERHEAD
                ));
            }
        }
        Layers {
            mode: if rootless { "rootless" } else { "rootful" }.into(),
            namespaces: vec![
                "gvisor (the sandbox's system calls are served by gVisor's user-space kernel)"
                    .into(),
                "pid".into(),
                egress::namespace_layer(&s.network).into(),
                "ipc".into(),
                "uts".into(),
                "mount".into(),
            ],
            uid_map: String::new(),
            host_ids: String::new(),
            cgroup,
            degraded,
            seccomp: "default (nanoclaw's profile, applied by gVisor's kernel inside the sandbox: \
                      runsc --oci-seccomp; gVisor's own filters confine the sentry on the host)"
                .into(),
            landlock: "not used (gVisor's gofer mediates every file access)".into(),
            capabilities: s.hardening.cap_add.clone(),
            no_new_privs: true,
        }
    }

    /// A fresh sandbox id.
    fn new_id() -> Result<String, Error> {
        Ok(format!("{ID_PREFIX}{}", procs::random_id()?))
    }
}

impl Backend for Gvisor {
    fn name(&self) -> &str {
        NAME
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, Error> {
        self.infos()
    }

    fn attach(&self, id: &str) -> Result<Box<dyn LiveSandbox>, Error> {
        self.open(id)
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn check(&self, config: &SandboxConfig) -> Result<(), Error> {
        let s = &config.spec;
        egress::check(config, self.runsc.rootless)?;
        let seccomp =
            "the gvisor backend applies nanoclaw's default profile inside gVisor's kernel; \
             other profiles are not supported yet (drop --seccomp)";
        match s.hardening.seccomp {
            Seccomp::Default => {}
            Seccomp::Profile(_) => return Err(refuse("--seccomp PROFILE", seccomp)),
            Seccomp::Unconfined => return Err(refuse("--seccomp unconfined", seccomp)),
        }
        if !s.hardening.exec_allow.is_empty() {
            return Err(refuse(
                "--exec-allow",
                "it needs Landlock, which gVisor's kernel does not have; use --backend native",
            ));
        }
        if s.limits.memory_swap.is_some() {
            return Err(refuse(
                "--memory-swap",
                "gVisor has no swap of its own; use --memory",
            ));
        }
        if config.idle_timeout.is_some() {
            return Err(refuse(
                "--idle-timeout",
                "nothing watches a gVisor sandbox between calls; its lifetime (--timeout) still ends it",
            ));
        }
        if matches!(s.root, Root::Layers(_)) || s.root_upper.is_some() {
            return Err(refuse(
                "--image",
                "the gvisor backend runs the host root only so far; use --backend native or docker for images",
            ));
        }
        CAPABILITIES.check(NAME, config)?;
        if self.runsc.rootless {
            if s.user.uid != 0
                && s.mounts
                    .iter()
                    .any(|m| m.access == nanoclaw_sandbox::spec::Access::Rw)
            {
                return Err(Error::Unsupported {
                    what: "--backend gvisor: a writable --mount for a non-root sandbox user".into(),
                    why: "rootless runsc maps only your own uid (to root inside), so files the sandbox \
                          user creates there cannot be owned by anyone (EINVAL)"
                        .into(),
                    fix: "run the sandbox as --user 0 (your own uid on the host), or run nanoclaw as root"
                        .into(),
                });
            }
            let l = &s.limits.explicit;
            if l.memory || l.cpus || l.pids {
                return Err(Error::Unsupported {
                    what: "--backend gvisor: an explicit --memory, --cpus or --pids limit".into(),
                    why: "rootless runsc runs without cgroups (--ignore-cgroups), so nothing would enforce it"
                        .into(),
                    fix: "run nanoclaw as root for gVisor with limits, or use --backend native (rootless cgroups)"
                        .into(),
                });
            }
        }
        bundle::oci_caps(&s.hardening.cap_add)?;
        Ok(())
    }

    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error> {
        self.check(config)?;
        let id = Gvisor::new_id()?;
        let bundle = self.root.join(&id);
        std::fs::create_dir(&bundle).map_err(io(format!("mkdir {}", bundle.display())))?;
        let made = self.start(&id, &bundle, config);
        match made {
            Ok(sb) => Ok(sb),
            Err(e) => {
                let _ = sandbox::stop(&self.runsc, &id, &bundle, None, &[]);
                Err(e)
            }
        }
    }
}

impl Gvisor {
    /// Writes the bundle and record of sandbox `id` and starts it: `runsc
    /// run` in its own process group (so a terminal's signals do not reach
    /// it), which holds the sandbox until it ends and then removes runsc's
    /// state and cgroups; ready when the init says so on its stdout.
    fn start(
        &self,
        id: &str,
        bundle: &Path,
        config: &SandboxConfig,
    ) -> Result<Box<dyn LiveSandbox>, Error> {
        let mut oci = bundle::config(id, bundle, config, &self.host, !self.runsc.rootless)?;
        let egress = NetnsEgress::in_new_netns(&config.spec)?;
        let runsc = egress::runsc_for(&self.runsc, egress.as_ref(), &mut oci);
        bundle::write(bundle, &oci, &config.spec, &self.host)?;
        let mut record_layers = self.layers(config);
        if !self.runsc.rootless {
            // gVisor's tasks are threads of its sentry on the host: the host
            // pids limit leaves room for them (see bundle::host_pids_limit).
            let mut limits = config.spec.limits;
            limits.pids = limits.pids.map(bundle::host_pids_limit);
            record_layers
                .degraded
                .extend(cgroup::precreate(id, &limits)?);
        }
        let lifetime = bundle::lifetime_secs(config.spec.limits.timeout);
        let deadline = SystemTime::now() + Duration::from_secs(lifetime);
        // The runner's stderr (runsc's messages) goes to a file in the
        // bundle: the sandbox keeps it open for its whole life.
        let log_path = bundle.join("runsc.log");
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("create {}", log_path.display())))?;
        let mut runner = runsc
            .command()
            .arg("run")
            .arg(format!("--bundle={}", bundle.display()))
            .arg(id)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(io(format!("running {} run", self.runsc.exe.display())))?;
        let me = std::process::id() as i32;
        let record = Record {
            spec: config.spec.clone(),
            labels: config.labels.clone(),
            layers: record_layers,
            deadline_ms: deadline
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            runner_pid: runner.id() as i32,
            owner: (me, procs::start_time(me as u32).unwrap_or_default()),
            detached: config
                .labels
                .iter()
                .any(|(k, v)| k == LABEL_DETACHED && v == "true"),
            host_network: runsc.host_network,
        };
        let written = serde_json::to_vec(&record)
            .map_err(|e| Error::InvalidSpec(e.to_string()))
            .and_then(|t| {
                std::fs::write(bundle.join(RECORD), t).map_err(io(format!("write {RECORD}")))
            });
        let ready = written.and_then(|()| wait_ready(&mut runner, &log_path, id));
        if let Err(e) = ready {
            let _ = runner.kill();
            let _ = runner.wait();
            return Err(e);
        }
        Ok(self.handle(id, bundle.to_path_buf(), record, Some(runner), egress))
    }
}

impl Gvisor {
    /// Runs `spec.command` once in a new sandbox of `spec`, its output
    /// copied to `echo` as it comes (or kept in the outcome), and removes
    /// the sandbox: the command is the sandbox's init, under one `runsc
    /// run` — as `runsc do` works, one runsc invocation instead of the
    /// three of create, exec and destroy. How `nanoclaw run --backend
    /// gvisor` runs.
    pub fn run_once(&self, spec: &SandboxSpec, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        if spec.command.is_empty() {
            return Err(Error::InvalidSpec("the command is empty".into()));
        }
        let mut config = SandboxConfig::new(spec.clone());
        // Past this a sweep may remove it (its own timeout fires first).
        config.spec.limits.timeout = spec.limits.timeout + Duration::from_secs(10);
        self.check(&config)?;
        let id = Gvisor::new_id()?;
        let bundle = self.root.join(&id);
        std::fs::create_dir(&bundle).map_err(io(format!("mkdir {}", bundle.display())))?;
        let r = self.run_in(&id, &bundle, &config, spec, echo);
        let deleted = if sandbox::has_state(&self.runsc, &id) {
            self.runsc.delete(&id)
        } else {
            Ok(())
        };
        cgroup::remove(&id);
        let _ = std::fs::remove_dir_all(&bundle);
        let o = r?;
        deleted?;
        Ok(o)
    }

    fn run_in(
        &self,
        id: &str,
        bundle: &Path,
        config: &SandboxConfig,
        spec: &SandboxSpec,
        echo: Option<Echo<'_>>,
    ) -> Result<Outcome, Error> {
        let s = &config.spec;
        let mut oci = bundle::config(id, bundle, config, &self.host, !self.runsc.rootless)?;
        oci["process"] = bundle::process(
            &spec.command,
            bundle::environment(s, s.user.uid, &[]),
            &bundle::default_workdir(s),
            s.user.uid,
            s.user.gid,
            &bundle::oci_caps(&s.hardening.cap_add)?,
        );
        let egress = NetnsEgress::in_new_netns(s)?;
        let runsc = egress::runsc_for(&self.runsc, egress.as_ref(), &mut oci);
        bundle::write(bundle, &oci, s, &self.host)?;
        let mut layers = self.layers(config);
        if !self.runsc.rootless {
            let mut limits = s.limits;
            limits.pids = limits.pids.map(bundle::host_pids_limit);
            layers.degraded.extend(cgroup::precreate(id, &limits)?);
        }
        let started = std::time::Instant::now();
        let runner = runsc
            .command()
            .arg("run")
            .arg(format!("--bundle={}", bundle.display()))
            .arg(id)
            .stdin(match spec.stdin {
                // A one-shot run has no control handle: no open stdin.
                Stdin::Null | Stdin::Open => std::process::Stdio::null(),
                Stdin::Inherit => std::process::Stdio::inherit(),
                Stdin::Bytes(_) => std::process::Stdio::piped(),
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(io(format!("running {} run", self.runsc.exe.display())))?;
        let me = std::process::id() as i32;
        let deadline = SystemTime::now() + config.spec.limits.timeout;
        let record = Record {
            spec: s.clone(),
            labels: Vec::new(),
            layers,
            deadline_ms: deadline
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            runner_pid: runner.id() as i32,
            owner: (me, procs::start_time(me as u32).unwrap_or_default()),
            detached: false,
            host_network: runsc.host_network,
        };
        if let Ok(t) = serde_json::to_vec(&record) {
            let _ = std::fs::write(bundle.join(RECORD), t);
        }
        let shared = Arc::new(Shared {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            runsc,
            record,
            host_pids: Vec::new(),
            next_exec: AtomicU32::new(2),
            running: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
            runner: std::sync::Mutex::new(None),
            egress: std::sync::Mutex::new(egress),
        });
        let mut x = ExecSpec::new(spec.command.iter().cloned());
        x.stdin = spec.stdin.clone();
        x.timeout = spec.limits.timeout;
        x.output_limit = spec.limits.output_limit;
        Box::new(exec::one_shot(&shared, runner, &x, started)).wait(echo)
    }
}

/// How long a sandbox may take to start.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// Waits for the init of the sandbox `runner` runs to say `ready`; an
/// error with runsc's log if the runner ends first.
fn wait_ready(runner: &mut std::process::Child, log: &Path, id: &str) -> Result<(), Error> {
    let failed = |why: &str| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        backend_error(format!(
            "runsc could not start sandbox {id} ({why}): {}",
            text.trim()
        ))
    };
    let out = runner.stdout.take().ok_or_else(|| failed("no stdout"))?;
    let fd = std::os::fd::OwnedFd::from(out);
    let deadline = std::time::Instant::now() + START_PATIENCE;
    let mut got = Vec::new();
    while !got.ends_with(b"ready\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(failed("it did not start in time"));
        }
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable for its length; `fd` is open.
        let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            return Err(failed("its runsc run ended"));
        }
        got.extend_from_slice(&buf[..r as usize]);
    }
    Ok(())
}

/// The record in bundle directory `dir`.
fn read_record(dir: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
}

/// Whether the process `(pid, start time)` still runs.
fn owner_alive((pid, start): (i32, u64)) -> bool {
    u32::try_from(pid).is_ok_and(|pid| procs::start_time(pid) == Some(start))
}
