//! nanoclaw's Docker backend: the engine's [`Backend`] over the Docker
//! Engine API on its unix socket (the `bollard` crate, not the `docker`
//! CLI), with seed 002's hardening applied by default and reported in the
//! outcome's `layers` ([`container`]).
//!
//! A sandbox is one container, `nanoclaw-<id>`, made from an image in
//! Docker's store ([`Root::Image`]); every command is a Docker exec in it.
//! Its first process is nanoclaw's own static binary, mounted read-only
//! ([`container::INIT_PATH`], `nanoclaw __docker-init SECONDS`): it reaps
//! orphans and exits when the sandbox's lifetime is over, and Docker then
//! removes the container (`AutoRemove`) — so a sandbox ends on time even
//! when no nanoclaw is running. Timeouts, output limits and the kill
//! reasons (OOM and pids from the container's cgroup counters) are
//! nanoclaw's, as for the native engine.
//!
//! Every container is labelled (`nanoclaw.backend=docker`, its id, the
//! `PID:STARTTIME` of the process that made it). One whose maker is gone
//! and that was not made to outlive it ([`LABEL_DETACHED`]) is removed the
//! next time a [`Docker`] connects ([`Docker::sweep`]): a `kill -9`ed
//! `nanoclaw run` leaves its container until then at most (and never past
//! its lifetime).
//!
//! The trait is blocking; the backend drives bollard on a small tokio
//! runtime of its own (one worker thread).

#![warn(missing_docs)]

pub mod cgroup;
pub mod container;
pub mod egress;
mod exec;
pub mod init;
pub mod seccomp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use nanoclaw_sandbox::backend::{
    Backend, Capabilities, Execution, LiveSandbox, SandboxConfig, SandboxInfo, SandboxStats,
    LABEL_DETACHED,
};
use nanoclaw_sandbox::native::session::{ExecSpec, RunState};
use nanoclaw_sandbox::netns_egress::NetnsEgress;
use nanoclaw_sandbox::spec::Root;
use nanoclaw_sandbox::{procs, Error, Layers};

use crate::cgroup::Cgroup;
use crate::container::{LABEL_BACKEND, LABEL_ID, LABEL_OWNER};

/// The backend's name (`--backend docker`).
pub const NAME: &str = "docker";

/// Label: the sandbox's layers, as JSON (for a handle found again).
const LABEL_LAYERS: &str = "nanoclaw.layers";
/// Label: when the container's init ends it, in seconds since the epoch.
const LABEL_DEADLINE: &str = "nanoclaw.deadline";

/// The Docker socket: `$DOCKER_HOST` when it is `unix://PATH`, else
/// `/var/run/docker.sock`.
pub fn socket_path() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => h.trim_start_matches("unix://").to_string(),
        _ => "/var/run/docker.sock".to_string(),
    }
}

/// Whether Docker answers here, for `nanoclaw doctor`.
#[derive(Debug, Clone)]
pub struct Probe {
    /// It answers.
    pub available: bool,
    /// What was found (version, runtimes) or what failed.
    pub detail: String,
    /// What to install or start (empty when available).
    pub install: String,
}

/// Asks the Docker daemon for its version and runtimes.
pub fn probe() -> Probe {
    match Docker::connect_with(None) {
        Ok(d) => {
            let v = d.block(d.api.version()).ok();
            Probe {
                available: true,
                detail: format!(
                    "Docker Engine {} (API {}) on {}; runtime: {}",
                    v.as_ref().and_then(|v| v.version.clone()).unwrap_or_default(),
                    v.as_ref().and_then(|v| v.api_version.clone()).unwrap_or_default(),
                    socket_path(),
                    d.runtime.as_deref().unwrap_or("runc (Docker's default)")
                ),
                install: String::new(),
            }
        }
        Err(e) => Probe {
            available: false,
            detail: e.to_string(),
            install: "Docker Engine (Debian: `apt-get install docker.io`), dockerd running, and access to its socket (root or the `docker` group)".into(),
        },
    }
}

/// The client's runtime. Dropped without waiting for its threads: the last
/// handle on a backend may go in an async context (a daemon's task), where
/// a blocking shutdown panics.
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The Docker backend (see the crate's documentation).
#[derive(Clone)]
pub struct Docker {
    api: bollard::Docker,
    rt: Arc<Rt>,
    /// `runsc` when Docker has gVisor configured.
    runtime: Option<String>,
    /// nanoclaw's binary, the containers' first process.
    init: PathBuf,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker")
            .field("runtime", &self.runtime)
            .field("init", &self.init)
            .finish()
    }
}

fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.into(),
        message: message.into(),
    }
}

fn api_error(what: &str, e: bollard::errors::Error) -> Error {
    backend_error(format!("{what}: {e}"))
}

fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code)
}

impl Docker {
    /// Connects to Docker (see [`socket_path`]), with this process's own
    /// binary as the containers' first process (it must be nanoclaw's:
    /// the CLI and the daemon), and removes what earlier nanoclaw
    /// processes left behind ([`Docker::sweep`]).
    pub fn connect() -> Result<Docker, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::Sys {
            call: "finding nanoclaw's own binary".into(),
            source: e,
        })?;
        Docker::connect_with(Some(exe))
    }

    /// Connects with `init` (nanoclaw's binary) as the containers' first
    /// process; `None`: probing only (creating then fails).
    pub fn connect_with(init: Option<PathBuf>) -> Result<Docker, Error> {
        let path = socket_path();
        let unavailable = |why: String| {
            Error::Unsupported {
            what: "--backend docker".into(),
            why,
            fix: "install Docker Engine (Debian: docker.io), start dockerd, and run as root or a member of the `docker` group".into(),
        }
        };
        if !std::path::Path::new(&path).exists() {
            return Err(unavailable(format!("no Docker socket at {path}")));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nanoclaw-docker")
            .enable_all()
            .build()
            .map_err(|e| Error::Sys {
                call: "starting the Docker client's runtime".into(),
                source: e,
            })?;
        let api = bollard::Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| unavailable(format!("{path}: {e}")))?;
        let api = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), api.negotiate_version()).await
            })
            .map_err(|_| unavailable(format!("{path}: Docker did not answer within 10 s")))?
            .map_err(|e| unavailable(format!("{path}: {e}")))?;
        let runtime = match std::env::var("NANOCLAW_DOCKER_RUNTIME") {
            Ok(r) if !r.is_empty() && r != "default" => Some(r),
            Ok(_) => None,
            Err(_) => {
                let info = rt.block_on(api.info()).ok();
                info.and_then(|i| i.runtimes)
                    .filter(|r| r.contains_key("runsc"))
                    .map(|_| "runsc".to_string())
            }
        };
        let d = Docker {
            api,
            rt: Arc::new(Rt(Some(rt))),
            runtime,
            init: init.unwrap_or_default(),
        };
        if !d.init.as_os_str().is_empty() {
            d.sweep();
        }
        Ok(d)
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        match &self.rt.0 {
            Some(rt) => rt.block_on(f),
            None => unreachable!("the runtime is only taken when dropped"),
        }
    }

    /// The containers nanoclaw made (running or not), with their labels.
    fn ours(&self) -> Result<Vec<Ours>, Error> {
        let mut filters = HashMap::new();
        filters.insert("label", vec![format!("{LABEL_BACKEND}={NAME}")]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .block(self.api.list_containers(Some(opts)))
            .map_err(|e| api_error("listing containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let id = labels.get(LABEL_ID)?.clone();
                let running = matches!(
                    c.state,
                    Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                        | Some(bollard::models::ContainerSummaryStateEnum::PAUSED)
                );
                Some((id, labels, running))
            })
            .collect())
    }

    /// Removes the containers earlier nanoclaw processes left: ones whose
    /// maker is gone (unless detached), ones past their deadline, and ones
    /// no longer running. Returns their ids.
    pub fn sweep(&self) -> Vec<String> {
        let now = now_s();
        let Ok(all) = self.ours() else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for (id, labels, running) in all {
            let detached = labels.get(LABEL_DETACHED).map(String::as_str) == Some("true");
            let orphan = !detached
                && labels
                    .get(LABEL_OWNER)
                    .is_some_and(|o| !procs::owner_alive(o));
            let expired = labels
                .get(LABEL_DEADLINE)
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|d| d + 5 < now);
            if (orphan || expired || !running) && self.remove(&id).is_ok() {
                gone.push(id);
            }
        }
        gone
    }

    /// Removes container `nanoclaw-<id>` (killing what runs in it) and
    /// waits until Docker has forgotten it.
    fn remove(&self, id: &str) -> Result<(), Error> {
        let name = container_name(id);
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.block(self.api.remove_container(&name, Some(opts))) {
            Ok(()) => {}
            // Gone already, or Docker is removing it (AutoRemove).
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
            Err(e) => return Err(api_error(&format!("removing {name}"), e)),
        }
        for _ in 0..1000 {
            match self.block(self.api.inspect_container(&name, None)) {
                Err(e) if is_status(&e, 404) => return Ok(()),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        Err(backend_error(format!(
            "{name} was still there 10 s after its removal"
        )))
    }

    fn handle(
        &self,
        id: &str,
        layers: Layers,
        labels: Vec<(String, String)>,
        pid: i64,
        deadline: u64,
    ) -> DockerSandbox {
        DockerSandbox {
            docker: self.clone(),
            info: SandboxInfo {
                id: id.to_string(),
                backend: NAME.into(),
                layers,
                host_pids: i32::try_from(pid)
                    .ok()
                    .filter(|p| *p > 0)
                    .into_iter()
                    .collect(),
                labels,
            },
            cgroup: Cgroup::of_pid(pid),
            deadline,
            egress: None,
        }
    }
}

/// A container nanoclaw made: its sandbox id, its labels, and whether it
/// runs (or is paused).
type Ours = (String, HashMap<String, String>, bool);

/// The container of sandbox `id`.
pub fn container_name(id: &str) -> String {
    format!("nanoclaw-{id}")
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Backend for Docker {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            host_root: false,
            image_root: false,
            dir_root: false,
            store_image: true,
            persistent_upper: false,
            mounts: true,
            memory_swap: true,
            // Through nanoclaw's proxy, wired into the container's own
            // network namespace (see `egress`).
            network_allowlist: true,
            network_open: true,
            network_kernel: false,
            seccomp_profile: true,
            seccomp_unconfined: true,
            cap_add: true,
            // Landlock is not reachable through Docker.
            exec_allow: false,
            // /tmp is always noexec here (seed 002).
            tmp_noexec: true,
            home: true,
            // Nothing watches a container between commands.
            idle_timeout: false,
            pause: true,
            concurrent_execs: true,
            detached: true,
        }
    }

    fn check(&self, config: &SandboxConfig) -> Result<(), Error> {
        if matches!(config.spec.root, Root::Host) {
            return Err(container::host_root_refused());
        }
        self.capabilities().check(NAME, config)?;
        egress::check(config, self.runtime.as_deref())
    }

    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error> {
        self.check(config)?;
        if self.init.as_os_str().is_empty() {
            return Err(backend_error("this handle was made for probing only"));
        }
        let image = container::image_of(config)?;
        match self.block(self.api.inspect_image(image)) {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {
                return Err(Error::InvalidSpec(format!(
                    "--image {image}: not in Docker's image store; `docker pull {image}` (or `docker load`) first"
                )))
            }
            Err(e) => return Err(api_error(&format!("inspecting image {image}"), e)),
        }
        let id = procs::random_id()?;
        let owner = procs::owner_tag(std::process::id());
        let init = self.init.display().to_string();
        let plan = container::Plan {
            id: &id,
            image,
            init: &init,
            runtime: self.runtime.as_deref(),
            owner: &owner,
            image_env: &[],
        };
        let (mut body, mut layers) = container::create_body(config, &plan)?;
        let deadline = now_s() + config.spec.limits.timeout.as_secs().max(1);
        if let Some(l) = body.labels.as_mut() {
            l.insert(LABEL_DEADLINE.into(), deadline.to_string());
            l.insert(
                LABEL_LAYERS.into(),
                serde_json::to_string(&layers).unwrap_or_default(),
            );
        }
        let name = container_name(&id);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let made = self
            .block(self.api.create_container(Some(opts), body))
            .map_err(|e| api_error(&format!("creating {name} from {image}"), e))?;
        // Docker's warnings (a limit this kernel cannot enforce) are the
        // layers' degradations, as the native engine reports its own.
        layers.degraded.extend(made.warnings);
        let started = self
            .block(self.api.start_container(&name, None))
            .map_err(|e| api_error(&format!("starting {name}"), e));
        let pid = started.and_then(|()| {
            self.block(self.api.inspect_container(&name, None))
                .map_err(|e| api_error(&format!("inspecting {name}"), e))
                .map(|c| c.state.and_then(|s| s.pid).unwrap_or(0))
        });
        // Before any command of the sandbox's runs (only nanoclaw's init
        // does yet): the redirect and listeners in its namespace.
        let wired = pid.and_then(|pid| Ok((pid, egress::wire(pid, &config.spec)?)));
        match wired {
            Ok((pid, egress)) => {
                let mut sb = self.handle(&id, layers, config.labels.clone(), pid, deadline);
                sb.egress = egress.map(Arc::new);
                Ok(Box::new(sb))
            }
            Err(e) => {
                let _ = self.remove(&id);
                Err(e)
            }
        }
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, Error> {
        Ok(self
            .ours()?
            .into_iter()
            .filter(|(_, _, running)| *running)
            .map(|(id, labels, _)| {
                let layers = labels
                    .get(LABEL_LAYERS)
                    .and_then(|l| serde_json::from_str(l).ok())
                    .unwrap_or_default();
                let mut labels: Vec<(String, String)> = labels.into_iter().collect();
                labels.sort();
                SandboxInfo {
                    id,
                    backend: NAME.into(),
                    layers,
                    host_pids: Vec::new(),
                    labels,
                }
            })
            .collect())
    }

    fn attach(&self, id: &str) -> Result<Box<dyn LiveSandbox>, Error> {
        let name = container_name(id);
        let c = match self.block(self.api.inspect_container(&name, None)) {
            Ok(c) => c,
            Err(e) if is_status(&e, 404) => {
                return Err(Error::NotFound {
                    id: id.into(),
                    what: "no such Docker sandbox (it ended, or was removed)".into(),
                })
            }
            Err(e) => return Err(api_error(&format!("inspecting {name}"), e)),
        };
        let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
        if labels.get(LABEL_BACKEND).map(String::as_str) != Some(NAME) {
            return Err(Error::NotFound {
                id: id.into(),
                what: format!("{name} is not a nanoclaw sandbox"),
            });
        }
        let layers = labels
            .get(LABEL_LAYERS)
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let deadline = labels
            .get(LABEL_DEADLINE)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let pid = c.state.and_then(|s| s.pid).unwrap_or(0);
        let mut labels: Vec<(String, String)> = labels.into_iter().collect();
        labels.sort();
        Ok(Box::new(self.handle(id, layers, labels, pid, deadline)))
    }
}

/// One Docker sandbox (a container).
pub struct DockerSandbox {
    docker: Docker,
    info: SandboxInfo,
    cgroup: Cgroup,
    deadline: u64,
    /// Its egress (network allowlist or open), when this process made it:
    /// the proxy serving the listeners in the container's namespace.
    egress: Option<Arc<NetnsEgress>>,
}

impl LiveSandbox for DockerSandbox {
    fn id(&self) -> &str {
        &self.info.id
    }

    fn info(&self) -> SandboxInfo {
        self.info.clone()
    }

    fn spawn(&self, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
        exec::spawn(self, spec)
    }

    fn pause(&self) -> Result<(), Error> {
        let name = container_name(&self.info.id);
        match self.docker.block(self.docker.api.pause_container(&name)) {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("already paused") => Ok(()),
            Err(e) => Err(api_error(&format!("pausing {name}"), e)),
        }
    }

    fn resume(&self) -> Result<(), Error> {
        let name = container_name(&self.info.id);
        match self.docker.block(self.docker.api.unpause_container(&name)) {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("not paused") => Ok(()),
            Err(e) => Err(api_error(&format!("resuming {name}"), e)),
        }
    }

    fn stats(&self) -> Result<SandboxStats, Error> {
        let name = container_name(&self.info.id);
        let c = self
            .docker
            .block(self.docker.api.inspect_container(&name, None))
            .map_err(|e| {
                if is_status(&e, 404) {
                    Error::NotFound {
                        id: self.info.id.clone(),
                        what: "the sandbox has ended".into(),
                    }
                } else {
                    api_error(&format!("inspecting {name}"), e)
                }
            })?;
        let paused = c.state.and_then(|s| s.paused).unwrap_or(false);
        let n = self.cgroup.read();
        Ok(SandboxStats {
            state: if paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            memory_bytes: n.memory,
            cpu: Some(Duration::from_nanos(n.cpu_ns)),
            tasks: n.tasks,
            can_pause: true,
            execs: n.tasks.map_or(0, |t| t.saturating_sub(1)),
            deadline: UNIX_EPOCH + Duration::from_secs(self.deadline),
        })
    }

    fn destroy(&self) -> Result<(), Error> {
        self.docker.remove(&self.info.id)
    }

    fn network_report(&self) -> Option<nanoclaw_sandbox::outcome::NetworkReport> {
        self.egress.as_ref().map(|e| e.report())
    }

    fn set_network_policy(
        &self,
        policy: nanoclaw_sandbox::net::NetworkPolicy,
    ) -> Result<nanoclaw_sandbox::net::PolicyUpdate, Error> {
        match &self.egress {
            Some(e) => Ok(e.set_policy(policy)),
            None => Err(egress::no_proxy_to_change()),
        }
    }
}
