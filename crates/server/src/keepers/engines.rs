//! Sandboxes of the engine's other backends (`docker`, `gvisor`,
//! `microvm`, `kubernetes`) in the daemon: a template that names one
//! ([`Template::backend`]) creates its sandboxes there, through the
//! engine's `Backend` contract (`nanoclaw_sandbox::backend`), beside the
//! keepers' native ones.
//!
//! Kubernetes sandboxes are different in one way ([`is_shared`]): several
//! daemon replicas serve them, so what the daemon knows of one (its E2B
//! record, its end) lives with its Pod in the cluster (labels and an
//! annotation), in its tenant's namespace (with a ResourceQuota from the
//! tenant's quota). Any replica finds one it does not know
//! ([`KeeperBackend::engine_found`]), lists them from the cluster, writes
//! `set_timeout` there and reaps those past their end
//! ([`KeeperBackend::reap_shared`]); none removes them when it stops. What
//! follows about memory-only state is about the other backends.
//!
//! How they are run, and why that keeps the process model: the daemon
//! never clones a sandbox. Docker's are made by dockerd (bollard over its
//! socket, in-process); gVisor's by `runsc`, exec'd as a program of its
//! own exactly as keepers are started (`Command::spawn`: nothing of the
//! daemon runs in the child after `exec`), and held by `runsc run`; a
//! micro-VM's by a holder (`nanoclaw __microvm-holder`, exec'd the same
//! way), which starts QEMU and virtiofsd, relays the daemon's commands
//! over a Unix socket, and ends the VM when the daemon ends (a pidfd on
//! it), `kill -9` included.
//!
//! What the daemon keeps of them is in memory only: they are not
//! re-adopted by a restarted daemon. Each is labelled with its maker (the
//! daemon's pid and start time), so the next daemon's start — or any
//! nanoclaw that opens that backend — removes what a killed daemon left
//! (`Docker::sweep`, `Gvisor::sweep`); a clean stop ends them
//! ([`KeeperBackend::end_engines`]). Their lifetime in the backend is fixed
//! at creation, as the longest the tenant may keep a sandbox (plus a
//! grace): the daemon's reaper ends them at their E2B end, which
//! `set_timeout` moves within the tenant's quota as for native ones.
//!
//! Network: a `docker` or `gvisor` sandbox gets the E2B network options
//! exactly as a native one (the same mapping, `network_of`): its egress
//! is nanoclaw's transparent proxy, wired by the engine into a network
//! namespace nanoclaw controls (`nanoclaw_sandbox::netns_egress`), served
//! by a proxy thread of this process. So its refusals are read here when a
//! command ends (audit, `/metrics`), and `PUT /sandboxes/{id}/network`
//! replaces that proxy's policy live, as a keeper does for native ones.
//! What the engine refuses (a non-root daemon, Docker's runsc runtime,
//! credential rules) is a 400 naming the backend.
//!
//! Processes run as engine executions ([`LiveSandbox::spawn`]): their
//! output is echoed into pipes this module reads, stdin and signals go
//! through the execution's control handle ([`ExecControl`]). Files are
//! the same commands run inside the sandbox as for native sandboxes
//! (`files`, over [`EngineExec`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use nanoclaw_sandbox::backend::{Echo, ExecControl, LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::native::session::{self, ExecSpec};
use nanoclaw_sandbox::spec::{Network, Stdin};
use nanoclaw_sandbox::{Outcome, SandboxSpec};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

use nanoclaw_kubernetes::Kubernetes;

use super::egress::{EgressHook, Source};
use super::{at, blocking, ms, user_of, KeeperBackend, Record, Template, E2B_HOME, KEEPER_GRACE};
use crate::audit::Capture;
use crate::backend::*;

/// Events buffered per listener before the pump waits for it.
const LISTENER_QUEUE: usize = 256;
/// How long the pump waits for a slow listener before dropping it.
const SLOW_LISTENER: Duration = Duration::from_secs(30);
/// How often (in reaper rounds) the reaper asks a backend whether a
/// sandbox still exists (an API call or a `runsc` run each).
const ALIVE_EVERY: u32 = 10;

/// An engine sandbox's lifetime in its backend when there are no tenant
/// quotas (the daemon's reaper ends it at its E2B end long before).
const NO_QUOTA_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Labels every engine sandbox of the daemon carries.
const LABEL_SERVE: &str = "nanoclaw.serve";
/// [`LABEL_SERVE`]'s value on a cluster's sandboxes: the same for every
/// replica (they serve the same sandboxes).
const SERVE_SHARED: &str = "e2b";
/// Label of a cluster's sandbox: its E2B record as JSON (tenant,
/// template, metadata, envs, token, sizes), fixed at creation.
const LABEL_RECORD: &str = "nanoclaw.e2b";
/// Label of a cluster's sandbox: its E2B end, ms since the epoch (moved by
/// `set_timeout`, read by every replica's reaper).
const LABEL_END: &str = "nanoclaw.e2b-end-ms";
/// Label of a cluster's sandbox: the end of its lifetime in the backend
/// (`activeDeadlineSeconds`), ms since the epoch.
const LABEL_LIFETIME_END: &str = "nanoclaw.lifetime-end-ms";
/// The tenant label a cluster's tools select by (`kubectl -l`).
const LABEL_TENANT: &str = "nanoclaw.tenant";

/// One sandbox of another backend.
pub(super) struct EngineEntry {
    pub id: String,
    /// The backend's name (`docker`, `gvisor`).
    pub backend: String,
    pub sandbox: Arc<dyn LiveSandbox>,
    pub record: Mutex<Record>,
    /// When the backend itself ends the sandbox (its lifetime), ms.
    pub lifetime_end_ms: u64,
    pub procs: Mutex<HashMap<u32, Arc<EngineProc>>>,
    /// For a cluster's sandbox ([`is_shared`]): the backend of its
    /// tenant's namespace. Its record here is a cache of the cluster's.
    pub shared: Option<Kubernetes>,
    /// (when, cpu ms) of the last metrics sample.
    last_cpu: Mutex<Option<(SystemTime, f64)>>,
    /// Egress refusals of its proxy already counted, and already audited.
    denials_counted: Arc<AtomicU64>,
    denials_seen: Arc<AtomicUsize>,
}

impl EngineEntry {
    /// A new entry for `sandbox` of `backend`, with nothing running yet.
    fn new(
        backend: &str,
        sandbox: Arc<dyn LiveSandbox>,
        record: Record,
        lifetime_end_ms: u64,
        shared: Option<Kubernetes>,
    ) -> Arc<EngineEntry> {
        Arc::new(EngineEntry {
            id: sandbox.id().to_string(),
            backend: backend.to_string(),
            lifetime_end_ms,
            sandbox,
            record: Mutex::new(record),
            procs: Mutex::new(HashMap::new()),
            shared,
            last_cpu: Mutex::new(None),
            denials_counted: Arc::default(),
            denials_seen: Arc::default(),
        })
    }

    fn tenant(&self) -> Option<String> {
        self.record.lock().ok().map(|r| r.tenant.clone())
    }
}

/// A live engine sandbox as the file operations' command runner.
#[derive(Clone)]
pub(super) struct EngineExec(pub Arc<dyn LiveSandbox>);

impl session::Execute for EngineExec {
    fn execute(&mut self, spec: &ExecSpec) -> Result<Outcome, nanoclaw_sandbox::Error> {
        self.0.exec(spec)
    }

    fn sandbox_id(&self) -> &str {
        self.0.id()
    }
}

/// The engine's error as the API's: refusals name the backend and are
/// the caller's to fix (400), a sandbox that ended is gone (404).
pub(super) fn engine_refusal(e: nanoclaw_sandbox::Error) -> BackendError {
    use nanoclaw_sandbox::Error as E;
    match e {
        e @ (E::NotSupported { .. } | E::Unsupported { .. }) => {
            BackendError::InvalidArgument(e.to_string())
        }
        other => super::engine_error(other),
    }
}

/// What a backend cannot do for the daemon, as one clear 400.
fn refused(backend: &str, what: &str, why: &str) -> BackendError {
    BackendError::InvalidArgument(format!(
        "the {backend} backend: {what} is not supported: {why}"
    ))
}

/// Whether sandboxes of `backend` are shared by every replica of the
/// daemon: their state lives with them in the cluster (the Pod's labels
/// and annotations), so any replica finds, lists, extends and reaps them.
pub(super) fn is_shared(backend: &str) -> bool {
    backend == nanoclaw_kubernetes::NAME
}

/// A cluster sandbox's record, from the labels it carries (`None`: not one
/// the daemon made).
fn record_of(labels: &[(String, String)]) -> Option<(Record, u64)> {
    let label = |k| nanoclaw_sandbox::backend::label(labels, k);
    let mut record: Record = serde_json::from_str(label(LABEL_RECORD)?).ok()?;
    if let Some(end) = label(LABEL_END).and_then(|v| v.parse().ok()) {
        record.end_at_ms = end;
    }
    let lifetime_end = label(LABEL_LIFETIME_END)
        .and_then(|v| v.parse().ok())
        .unwrap_or(record.end_at_ms);
    Some((record, lifetime_end))
}

/// Whether `id` can be a cluster sandbox's id (12 hex digits): other ids
/// are not looked up in the cluster.
fn cluster_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A refusal by the tenant namespace's ResourceQuota as the native quota's
/// refusal of the same limit (429, `quota exceeded: ...`).
fn quota_refusal(message: &str) -> BackendError {
    let which = if message.contains("limits.memory") || message.contains("requests.memory") {
        "total memory"
    } else if message.contains("limits.cpu") || message.contains("requests.cpu") {
        "total cpus"
    } else {
        "concurrent sandboxes"
    };
    BackendError::QuotaExceeded {
        which: format!("{which} ({message})"),
        retry_after: Some(Duration::from_secs(5)),
    }
}

/// Whether the daemon gives sandboxes of `backend` nanoclaw's egress (the
/// E2B network options as for native ones): the backends whose engine
/// wires its transparent proxy into the sandbox's network namespace.
pub(super) fn has_egress(backend: &str) -> bool {
    matches!(backend, "docker" | "gvisor")
}

/// The network a pooled sandbox of `backend` is made with: what an E2B
/// create gets by default there.
fn pooled_network(backend: &str) -> Network {
    if has_egress(backend) {
        super::default_network()
    } else {
        Network::None
    }
}

/// What an E2B create asks that a template on `backend` cannot give,
/// refused rather than silently dropped; the network of a backend without
/// egress here (loopback only). The network of the others is set by
/// `create` from the request, as for native sandboxes.
fn engine_network(req: &CreateSandbox, backend: &str, spec: &mut SandboxSpec) -> BackendResult<()> {
    if req.auto_pause {
        return Err(refused(
            backend,
            "auto-pause",
            "the daemon does not pause sandboxes of this backend; let the timeout kill it, or use a native template",
        ));
    }
    if has_egress(backend) {
        return Ok(());
    }
    let why = "the daemon wires nanoclaw's egress proxy into docker and gvisor sandboxes only, \
               so these have loopback only; leave allow_internet_access unset or false, or use a \
               native, docker or gvisor template";
    if req.allow_internet_access == Some(true) {
        return Err(refused(backend, "allow_internet_access=true", why));
    }
    if !req.allow_out.is_empty() {
        return Err(refused(backend, "network.allowOut", why));
    }
    if !req.network_rules.is_empty() {
        return Err(refused(backend, "network.rules", why));
    }
    spec.network = Network::None;
    Ok(())
}

/// An engine's refusal of a create, in the E2B request's words: which of
/// its network options the backend cannot give here, why, and what to do
/// instead. Other refusals as [`engine_refusal`].
fn create_refusal(e: nanoclaw_sandbox::Error, req: &CreateSandbox, backend: &str) -> BackendError {
    use nanoclaw_sandbox::Error as E;
    let asked = if !req.allow_out.is_empty() {
        "network.allowOut"
    } else {
        "internet access (allow_internet_access unset or true: E2B's default)"
    };
    let instead = "create it with allow_internet_access=false (no network), or use a native \
                   template (its egress works rootless)";
    match e {
        E::NotSupported { field, why, .. } if field.starts_with("network.rules") => refused(
            backend,
            "network.rules (credentials added at the boundary)",
            &format!("{why}; use a native template for credential rules"),
        ),
        E::NotSupported { field, why, .. } if field.starts_with("--network") => refused(
            backend,
            &format!("{asked} ({field})"),
            &format!("{why}; or {instead}"),
        ),
        E::Unsupported { what, why, .. } if what.starts_with("egress") => refused(
            backend,
            asked,
            &format!("{why} (the daemon is not root); run nanoclaw serve as root, or {instead}"),
        ),
        other => match nanoclaw_kubernetes::tenancy::is_quota_refusal(&other) {
            Some(m) => quota_refusal(m),
            None => engine_refusal(other),
        },
    }
}

impl KeeperBackend {
    /// The tenant's engine sandbox `id` (`None`: no such engine sandbox
    /// of this tenant — it may be a native one).
    pub(super) fn engine(&self, tenant: &TenantId, id: &str) -> Option<Arc<EngineEntry>> {
        self.engines
            .lock()
            .ok()?
            .get(id)
            .filter(|e| e.tenant().as_deref() == Some(tenant.0.as_str()))
            .cloned()
    }

    /// The engine sandbox `id`, whoever owns it.
    pub(super) fn engine_any(&self, id: &str) -> Option<Arc<EngineEntry>> {
        self.engines.lock().ok()?.get(id).cloned()
    }

    /// The engine sandboxes now.
    pub(super) fn all_engines(&self) -> Vec<Arc<EngineEntry>> {
        self.engines
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates `req`'s sandbox from `tpl` on its backend `name`.
    pub(super) async fn start_engine(
        &self,
        req: &CreateSandbox,
        mut spec: SandboxSpec,
        name: &str,
    ) -> BackendResult<SandboxInfo> {
        let mut backend = self.cfg.engines.get(name).cloned().ok_or_else(|| {
            BackendError::Internal(format!("the {name} backend was not opened at start"))
        })?;
        engine_network(req, name, &mut spec)?;
        let shared = if is_shared(name) {
            let k = self.tenant_cluster(&req.tenant, true).await?;
            backend = Arc::new(k.clone());
            Some(k)
        } else {
            None
        };
        // The backend's own lifetime cannot be moved later: it is the
        // longest the tenant may keep a sandbox, so that `set_timeout` and
        // `connect` can extend it as for native ones (the reaper ends it at
        // its E2B end; a sweep, after a killed daemon).
        let longest = self
            .quota
            .max_lifetime(&req.tenant)
            .await?
            .unwrap_or(NO_QUOTA_LIFETIME);
        let lifetime = req.timeout.max(longest) + KEEPER_GRACE;
        spec.limits.timeout = lifetime;
        if shared.is_none() {
            if let Some(info) = self.adopt_pooled_engine(req, &spec, name, lifetime) {
                return info;
            }
        }
        let mut config = SandboxConfig::new(spec.clone());
        let mut record = Record::for_request(req, &spec);
        record
            .metadata
            .entry("launch".into())
            .or_insert_with(|| "cold".into());
        let lifetime_end_ms = record.started_at_ms + lifetime.as_millis() as u64;
        config.labels = if shared.is_some() {
            // Everything a replica needs to serve it, with it in the
            // cluster; detached: no replica's sweep removes it because its
            // maker is gone (it ends at its end, by any replica's reaper,
            // or at its activeDeadlineSeconds).
            vec![
                (LABEL_SERVE.into(), SERVE_SHARED.into()),
                (LABEL_TENANT.into(), req.tenant.0.clone()),
                (
                    nanoclaw_sandbox::backend::LABEL_DETACHED.into(),
                    "true".into(),
                ),
                (
                    LABEL_RECORD.into(),
                    serde_json::to_string(&record)
                        .map_err(|e| BackendError::Internal(e.to_string()))?,
                ),
                (LABEL_END.into(), record.end_at_ms.to_string()),
                (LABEL_LIFETIME_END.into(), lifetime_end_ms.to_string()),
            ]
        } else {
            vec![
                (LABEL_SERVE.into(), self.cfg.root.display().to_string()),
                ("tenant".into(), req.tenant.0.clone()),
            ]
        };
        backend
            .check(&config)
            .map_err(|e| create_refusal(e, req, name))?;
        let refusal = {
            let req = req.clone();
            let name = name.to_string();
            move |e| create_refusal(e, &req, &name)
        };
        let made = blocking(move || backend.create(&config).map_err(refusal)).await?;
        let sandbox: Arc<dyn LiveSandbox> = Arc::from(made);
        let id = sandbox.id().to_string();
        let e = EngineEntry::new(name, sandbox, record, lifetime_end_ms, shared);
        if let Ok(mut m) = self.engines.lock() {
            m.insert(id, e.clone());
        }
        engine_info(&e)
    }

    /// Hands a pooled sandbox of `req`'s template to its tenant, when the
    /// template is pooled, the request asks the network it was made with
    /// and it lasts `lifetime` more (`None`: make a cold one). Pooled
    /// sandboxes that no longer last long enough are ended on the way.
    fn adopt_pooled_engine(
        &self,
        req: &CreateSandbox,
        spec: &SandboxSpec,
        name: &str,
        lifetime: Duration,
    ) -> Option<BackendResult<SandboxInfo>> {
        let pooled = self.pool.target.get(&req.template).is_some_and(|n| *n > 0);
        if !pooled || spec.network != pooled_network(name) || !spec.egress.is_empty() {
            return None;
        }
        let needed = ms(SystemTime::now() + lifetime);
        let (got, stale) = self.pool.take_engine(&req.template, needed);
        for p in stale {
            tokio::task::spawn_blocking(move || p.sandbox.destroy());
        }
        let metrics = self.metrics.get();
        let Some(p) = got else {
            if let Some(m) = metrics {
                m.pool_miss();
            }
            return None;
        };
        if let Some(m) = metrics {
            m.pool_hit();
        }
        let mut record = Record::for_request(req, spec);
        record.metadata.insert("launch".into(), "warm".into());
        let e = EngineEntry::new(&p.backend, p.sandbox, record, p.lifetime_end_ms, None);
        if let Ok(mut m) = self.engines.lock() {
            m.insert(e.id.clone(), e.clone());
        }
        Some(engine_info(&e))
    }

    /// A sandbox of template `template` (`spec`, on the backend `name`)
    /// for its warm pool: the network an E2B create gets by default (the
    /// egress proxy where the daemon wires it, else none), a lifetime to
    /// be kept [`pool::POOLED_LIFETIME`] and then handed out for the
    /// longest a tenant without quotas may keep it; labelled as the
    /// daemon's (a killed daemon's are swept) and the pool's.
    pub(super) async fn make_pooled_engine(
        &self,
        template: &str,
        spec: &SandboxSpec,
        name: &str,
    ) -> BackendResult<super::pool::PooledEngine> {
        let backend = self.cfg.engines.get(name).cloned().ok_or_else(|| {
            BackendError::Internal(format!("the {name} backend was not opened at start"))
        })?;
        let mut spec = spec.clone();
        spec.network = pooled_network(name);
        let lifetime = super::pool::POOLED_LIFETIME + NO_QUOTA_LIFETIME + KEEPER_GRACE;
        spec.limits.timeout = lifetime;
        let mut config = SandboxConfig::new(spec);
        config.labels = vec![
            (LABEL_SERVE.into(), self.cfg.root.display().to_string()),
            ("pool".into(), template.to_string()),
        ];
        backend.check(&config).map_err(engine_refusal)?;
        let started = ms(SystemTime::now());
        let made = blocking(move || backend.create(&config).map_err(engine_refusal)).await?;
        Ok(super::pool::PooledEngine {
            sandbox: Arc::from(made),
            backend: name.to_string(),
            lifetime_end_ms: started + lifetime.as_millis() as u64,
        })
    }

    /// Forgets an engine sandbox and destroys it (waiting until nothing of
    /// it is left: container, runsc state, cgroups, bundle).
    pub(super) async fn end_engine(&self, id: &str) {
        let e = self.engines.lock().ok().and_then(|mut m| m.remove(id));
        if let Some(e) = e {
            let sb = e.sandbox.clone();
            let r = blocking(move || sb.destroy().map_err(super::engine_error)).await;
            if let Err(err) = r {
                eprintln!("nanoclaw serve: removing {} sandbox {id}: {err}", e.backend);
            }
        }
    }

    /// At a clean stop: the engine sandboxes end with the daemon (a new
    /// daemon could not adopt them) — except a cluster's, which other
    /// replicas (or this one, restarted) go on serving until their end.
    pub fn end_engines(&self) {
        let all: Vec<Arc<EngineEntry>> = self
            .engines
            .lock()
            .map(|mut m| m.drain().map(|(_, e)| e).collect())
            .unwrap_or_default();
        for e in all.iter().filter(|e| e.shared.is_none()) {
            let _ = e.sandbox.destroy();
        }
    }

    /// The cluster backend of `tenant`'s namespace; with `apply`, the
    /// namespace and its ResourceQuota (from the tenant's quota) are
    /// made or updated first (server-side apply, at every create, so a
    /// changed quota reaches the cluster).
    pub(super) async fn tenant_cluster(
        &self,
        tenant: &TenantId,
        apply: bool,
    ) -> BackendResult<Kubernetes> {
        let kube = self.cfg.engines.1.clone().ok_or_else(|| {
            BackendError::Internal("the kubernetes backend was not opened at start".into())
        })?;
        let ns = nanoclaw_kubernetes::tenancy::namespace_for(&kube.tenant_prefix(), &tenant.0);
        if !apply {
            return Ok(kube.in_namespace(&ns));
        }
        let quota =
            self.quota
                .limits(tenant)
                .await?
                .map(|l| nanoclaw_kubernetes::tenancy::TenantQuota {
                    sandboxes: l.max_sandboxes,
                    memory_bytes: l.max_memory_mb << 20,
                    cpus: l.max_cpus,
                });
        let name = tenant.0.clone();
        blocking(move || {
            kube.tenant_namespace(&ns, &name, quota.as_ref())
                .map_err(super::engine_error)
        })
        .await
    }

    /// The tenant's engine sandbox `id`: this process's, else — for a
    /// cluster's sandbox another replica made, or this one before a
    /// restart — found in the tenant's namespace and served from then on.
    pub(super) async fn engine_found(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Option<Arc<EngineEntry>> {
        if let Some(e) = self.engine(tenant, id) {
            return Some(e);
        }
        if self.cfg.engines.1.is_none() || !cluster_id(id) {
            return None;
        }
        if self.sandboxes.lock().ok()?.contains_key(id) {
            return None;
        }
        let k = self.tenant_cluster(tenant, false).await.ok()?;
        let (sid, kk) = (id.to_string(), k.clone());
        let sb = blocking(move || {
            use nanoclaw_sandbox::backend::Backend as _;
            kk.attach(&sid).map_err(super::engine_error)
        })
        .await
        .ok()?;
        let sandbox: Arc<dyn LiveSandbox> = Arc::from(sb);
        let (record, lifetime_end_ms) = record_of(&sandbox.info().labels)?;
        // Another tenant's id is not found (it is not in this tenant's
        // namespace either; this is belt and braces).
        if record.tenant != tenant.0 {
            return None;
        }
        let e = EngineEntry::new(
            nanoclaw_kubernetes::NAME,
            sandbox,
            record,
            lifetime_end_ms,
            Some(k),
        );
        let mut m = self.engines.lock().ok()?;
        Some(m.entry(id.to_string()).or_insert(e).clone())
    }

    /// The engine sandbox `id`, whoever owns it: this process's, else a
    /// cluster's found by its id label in any namespace (envd's requests
    /// name no tenant) — and then only in its tenant's own namespace.
    pub(super) async fn engine_any_found(&self, id: &str) -> Option<Arc<EngineEntry>> {
        if let Some(e) = self.engine_any(id) {
            return Some(e);
        }
        let kube = self.cfg.engines.1.clone()?;
        if !cluster_id(id) || self.sandboxes.lock().ok()?.contains_key(id) {
            return None;
        }
        let selector = format!(
            "{}={id},{LABEL_SERVE}={SERVE_SHARED}",
            nanoclaw_kubernetes::pod::LABEL_ID
        );
        let found = blocking(move || kube.list_everywhere(&selector).map_err(super::engine_error))
            .await
            .ok()?;
        let (_, info) = found.into_iter().next()?;
        let (record, _) = record_of(&info.labels)?;
        self.engine_found(&TenantId(record.tenant), id).await
    }

    /// A cluster's sandbox's record read again from the cluster; gone
    /// there, it is forgotten here (404).
    pub(super) async fn refresh_shared(&self, e: &Arc<EngineEntry>) -> BackendResult<()> {
        let Some(k) = e.shared.clone() else {
            return Ok(());
        };
        let id = e.id.clone();
        let got = blocking(move || {
            use nanoclaw_sandbox::backend::Backend as _;
            k.attach(&id).map_err(super::engine_error)
        })
        .await;
        match got {
            Ok(sb) => {
                if let (Some((fresh, _)), Ok(mut r)) =
                    (record_of(&sb.info().labels), e.record.lock())
                {
                    *r = fresh;
                }
                Ok(())
            }
            Err(err @ BackendError::NotFound(_)) => {
                if let Ok(mut m) = self.engines.lock() {
                    m.remove(&e.id);
                }
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    /// `GET /v2/sandboxes` of a cluster: the tenant's sandboxes in its
    /// namespace, whichever replica made them.
    pub(super) async fn list_shared(&self, tenant: &TenantId) -> BackendResult<Vec<SandboxInfo>> {
        if self.cfg.engines.1.is_none() {
            return Ok(Vec::new());
        }
        let k = self.tenant_cluster(tenant, false).await?;
        let all = blocking(move || {
            use nanoclaw_sandbox::backend::Backend as _;
            k.list().map_err(super::engine_error)
        })
        .await?;
        let mut out = Vec::new();
        for info in all {
            let Some((record, _)) = record_of(&info.labels) else {
                continue;
            };
            if record.tenant == tenant.0 {
                out.push(record_info(&info.id, nanoclaw_kubernetes::NAME, &record));
            }
        }
        Ok(out)
    }

    /// The reaper's round for a cluster's sandboxes (every
    /// [`ALIVE_EVERY`] rounds): each past its end is removed, by whichever
    /// replica sees it first (removing one already gone is no error). A
    /// sandbox is never removed before its end because its maker is gone.
    pub(super) async fn reap_shared(&self, round: u32) {
        let Some(kube) = self.cfg.engines.1.clone() else {
            return;
        };
        if !round.is_multiple_of(ALIVE_EVERY) {
            return;
        }
        let now = ms(SystemTime::now());
        let selector = format!("{LABEL_SERVE}={SERVE_SHARED}");
        let k = kube.clone();
        let Ok(all) =
            blocking(move || k.list_everywhere(&selector).map_err(super::engine_error)).await
        else {
            return;
        };
        let live: std::collections::HashSet<String> =
            all.iter().map(|(_, i)| i.id.clone()).collect();
        for (ns, info) in all {
            let Some((record, _)) = record_of(&info.labels) else {
                continue;
            };
            if now < record.end_at_ms {
                continue;
            }
            if let Ok(mut m) = self.engines.lock() {
                m.remove(&info.id);
            }
            let (k, id) = (kube.in_namespace(&ns), info.id.clone());
            let r = blocking(move || k.delete(&id).map_err(super::engine_error)).await;
            if let Err(err) = r {
                eprintln!(
                    "nanoclaw serve: removing kubernetes sandbox {}: {err}",
                    info.id
                );
            }
        }
        // Forgotten here once gone there (killed through another replica).
        let stale: Vec<String> = self
            .all_engines()
            .iter()
            .filter(|e| e.shared.is_some() && !live.contains(&e.id))
            .map(|e| e.id.clone())
            .collect();
        if let Ok(mut m) = self.engines.lock() {
            for id in stale {
                m.remove(&id);
            }
        }
    }

    /// The reaper's round for engine sandboxes: past their end, their
    /// tenant removed, or gone by themselves (checked every
    /// [`ALIVE_EVERY`] rounds).
    pub(super) async fn reap_engines(&self, orphaned: &[String], round: u32) {
        let now = ms(SystemTime::now());
        for e in self.all_engines() {
            if e.shared.is_some() {
                // Ended from the cluster's record ([`Self::reap_shared`]).
                continue;
            }
            let tenant = e.tenant();
            let end = e.record.lock().map(|r| r.end_at_ms).unwrap_or(0);
            if tenant.is_some_and(|t| orphaned.contains(&t)) || now >= end {
                self.end_engine(&e.id).await;
                continue;
            }
            if round.is_multiple_of(ALIVE_EVERY) {
                let sb = e.sandbox.clone();
                let gone = tokio::task::spawn_blocking(move || {
                    matches!(sb.stats(), Err(nanoclaw_sandbox::Error::NotFound { .. }))
                })
                .await
                .unwrap_or(false);
                if gone {
                    self.end_engine(&e.id).await;
                }
            }
        }
    }

    /// `set_timeout` for an engine sandbox: the end moves, within the
    /// lifetime the backend was given at creation.
    pub(super) async fn extend_engine(
        &self,
        e: &Arc<EngineEntry>,
        timeout: Duration,
    ) -> BackendResult<()> {
        self.refresh_shared(e).await?;
        let started = e.record.lock().map(|r| r.started_at_ms).unwrap_or(0);
        if let Some(t) = e.tenant() {
            // The longest lifetime counts from the creation, as for native.
            let age = Duration::from_millis(ms(SystemTime::now()).saturating_sub(started));
            self.quota
                .check_lifetime(&TenantId(t), age + timeout)
                .await
                .inspect_err(|err| self.count_refusal(err))?;
        }
        let end = ms(SystemTime::now() + timeout);
        if end > e.lifetime_end_ms {
            return Err(refused(
                &e.backend,
                "extending a sandbox's timeout past the lifetime it was created with",
                &format!(
                    "this one may live until {} s from now at most; create it with a longer timeout",
                    e.lifetime_end_ms.saturating_sub(ms(SystemTime::now())) / 1000
                ),
            ));
        }
        if let Some(k) = e.shared.clone() {
            // In the cluster, where every replica (and its reaper) reads it.
            let (id, v) = (e.id.clone(), end.to_string());
            blocking(move || {
                k.set_labels(&id, &[(LABEL_END.to_string(), v)])
                    .map_err(super::engine_error)
            })
            .await?;
        }
        if let Ok(mut r) = e.record.lock() {
            r.end_at_ms = end;
        }
        Ok(())
    }

    /// `PUT /sandboxes/{id}/network` of an engine sandbox: its proxy (in
    /// this process) gets the new policy, as a keeper's does.
    pub(super) async fn engine_update_network(
        &self,
        e: &Arc<EngineEntry>,
        tenant: &TenantId,
        update: NetworkUpdate,
    ) -> BackendResult<()> {
        if !has_egress(&e.backend) {
            return Err(Self::engine_cannot(e, "updating a sandbox's network"));
        }
        if !update.rules.is_empty() {
            return Err(refused(
                &e.backend,
                "network.rules (credentials added at the boundary)",
                "the per-sandbox CA they need is made only for native sandboxes; use a native template for credential rules",
            ));
        }
        let policy = super::live_policy(&super::network_from(&update)?)?;
        let sb = e.sandbox.clone();
        let changed = blocking(move || {
            sb.set_network_policy(policy).map_err(|err| match err {
                // Made without egress: nothing to change (as for a native
                // sandbox made without network, a conflict with its state).
                nanoclaw_sandbox::Error::NotSupported { why, .. } => BackendError::Conflict(
                    format!("this sandbox's network cannot be changed: {why}"),
                ),
                other => super::engine_error(other),
            })
        })
        .await?;
        if let Ok(mut r) = e.record.lock() {
            r.allow_internet_access = update.allow_internet_access;
            r.allow_out = update.allow_out.clone();
            r.deny_out = update.deny_out.clone();
        }
        let mode = e
            .sandbox
            .network_report()
            .map(|r| r.mode)
            .unwrap_or_default();
        let detail = serde_json::json!({
            "backend": e.backend,
            "mode": mode,
            "allowOut": update.allow_out,
            "denyOut": update.deny_out,
            "allow_internet_access": update.allow_internet_access,
            "closed": changed.closed,
        });
        self.audit(
            crate::audit::kind::NETWORK_UPDATE,
            tenant,
            &e.id,
            Some(detail.to_string()),
        )
        .await;
        Ok(())
    }

    /// Pause, resume, network updates: not done for engine sandboxes.
    pub(super) fn engine_cannot(e: &EngineEntry, what: &str) -> BackendError {
        refused(
            &e.backend,
            what,
            "the daemon does this for native sandboxes only; use a native template for it",
        )
    }

    /// `GET /sandboxes/{id}/metrics` of an engine sandbox.
    pub(super) async fn engine_metrics(
        &self,
        e: &Arc<EngineEntry>,
    ) -> BackendResult<Vec<SandboxMetric>> {
        let sb = e.sandbox.clone();
        let st = blocking(move || sb.stats().map_err(super::engine_error)).await?;
        let now = SystemTime::now();
        let (cpu_count, mem_total) = match e.record.lock() {
            Ok(r) => (r.cpu_count, u64::from(r.memory_mb) << 20),
            Err(_) => (1, 0),
        };
        let cpu_ms = st.cpu.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let pct = match e.last_cpu.lock() {
            Ok(mut last) => {
                let pct = last.and_then(|(t, c)| {
                    let dt = now.duration_since(t).ok()?.as_secs_f64() * 1000.0;
                    (dt > 0.0).then(|| ((cpu_ms - c) / dt * 100.0 / f64::from(cpu_count)) as f32)
                });
                *last = Some((now, cpu_ms));
                pct.unwrap_or(0.0).max(0.0)
            }
            Err(_) => 0.0,
        };
        Ok(vec![SandboxMetric {
            timestamp: now,
            cpu_count,
            cpu_used_pct: pct,
            mem_used: st.memory_bytes.unwrap_or(0),
            mem_total,
            mem_cache: 0,
            disk_used: 0,
            disk_total: 0,
        }])
    }

    /// `Process.Start` in an engine sandbox.
    pub(super) async fn engine_start_process(
        &self,
        e: &Arc<EngineEntry>,
        scope: &SandboxScope,
        req: StartProcess,
    ) -> BackendResult<ProcessHandle> {
        if req.pty.is_some() {
            return Err(refused(
                &e.backend,
                "PTY sessions",
                "nanoclaw has no PTYs yet",
            ));
        }
        let argv: Vec<String> = std::iter::once(req.config.cmd.clone())
            .chain(req.config.args.iter().cloned())
            .collect();
        let mut spec = ExecSpec::new(argv.iter().cloned());
        spec.env = e
            .record
            .lock()
            .map(|r| r.env_vars.clone().into_iter().collect())
            .unwrap_or_default();
        spec.env
            .extend(req.config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
        spec.user = user_of(scope)?;
        let root = spec.user.is_some_and(|u| u.uid == 0);
        spec.env
            .push(("HOME".into(), if root { "/root" } else { E2B_HOME }.into()));
        // envd starts a command in the user's home unless told otherwise
        // (root's home may not exist in an image: the backend's default).
        spec.workdir = req
            .config
            .cwd
            .as_ref()
            .map(PathBuf::from)
            .or_else(|| (!root).then(|| PathBuf::from(E2B_HOME)));
        spec.stdin = if req.stdin { Stdin::Open } else { Stdin::Null };
        spec.output_limit = u64::MAX;
        let left = Duration::from_millis(e.lifetime_end_ms.saturating_sub(ms(SystemTime::now())));
        spec.timeout = req.timeout.map_or(left, |t| t.min(left));
        let audit = self.cfg.audit.clone().map(|a| {
            let mut rec = crate::audit::Record::new(crate::audit::kind::EXEC);
            rec.tenant = Some(scope.tenant.0.clone());
            rec.sandbox = Some(scope.sandbox_id.clone());
            rec.argv = Some(argv.clone());
            rec.detail = Some(match &scope.user {
                Some(u) => format!("backend {}, user {u}", e.backend),
                None => format!("backend {}", e.backend),
            });
            (a, rec)
        });
        let metrics = self.metrics.get().cloned();
        let egress = has_egress(&e.backend).then(|| EgressHook {
            source: Source::Engine {
                sandbox: e.sandbox.clone(),
                counted: e.denials_counted.clone(),
            },
            tenant: scope.tenant.0.clone(),
            sandbox: scope.sandbox_id.clone(),
            audit: self.cfg.audit.clone(),
            metrics: metrics.clone(),
            seen: e.denials_seen.clone(),
        });
        let weak = Arc::downgrade(e);
        let started = Instant::now();
        let (proc, handle) = EngineProc::start(
            e.sandbox.clone(),
            spec,
            (req.config, req.tag),
            (audit, egress),
            move |pid| {
                if let Some(m) = &metrics {
                    m.exec_finished(started.elapsed());
                }
                if let Some(e) = weak.upgrade() {
                    if let Ok(mut p) = e.procs.lock() {
                        p.remove(&pid);
                    }
                }
            },
        )
        .await?;
        if let Some(m) = self.metrics.get() {
            m.exec_started();
        }
        if let Ok(mut p) = e.procs.lock() {
            p.insert(proc.pid, proc);
        }
        Ok(handle)
    }
}

/// What E2B's API says about an engine sandbox.
pub(super) fn engine_info(e: &EngineEntry) -> BackendResult<SandboxInfo> {
    let r = e
        .record
        .lock()
        .map_err(|_| BackendError::Internal("lock".into()))?;
    Ok(record_info(&e.id, &e.backend, &r))
}

/// What E2B's API says about engine sandbox `id` of `backend` recorded as `r`.
fn record_info(id: &str, backend: &str, r: &Record) -> SandboxInfo {
    let mut metadata = r.metadata.clone();
    // Which backend runs it, as a client can read it back.
    metadata.insert("backend".into(), backend.to_string());
    SandboxInfo {
        sandbox_id: id.to_string(),
        template_id: r.template.clone(),
        alias: Some(r.template.clone()),
        started_at: at(r.started_at_ms),
        end_at: at(r.end_at_ms),
        state: SandboxState::Running,
        metadata,
        cpu_count: r.cpu_count,
        memory_mb: r.memory_mb,
        disk_size_mb: 0,
        allow_internet_access: r.allow_internet_access,
        allow_out: r.allow_out.clone(),
        deny_out: r.deny_out.clone(),
        auto_pause: false,
        envd_access_token: r.token.clone(),
    }
}

/// The process of an engine sandbox `sel` names.
pub(super) fn engine_proc(
    e: &EngineEntry,
    sel: &ProcessSelector,
) -> BackendResult<Arc<EngineProc>> {
    let procs = e
        .procs
        .lock()
        .map_err(|_| BackendError::Internal("lock".into()))?;
    let found = match sel {
        ProcessSelector::Pid(pid) => procs.get(pid).cloned(),
        ProcessSelector::Tag(t) => procs
            .values()
            .find(|p| p.tag.as_deref() == Some(t.as_str()))
            .cloned(),
    };
    found.ok_or_else(|| BackendError::NotFound(format!("process {sel:?} not found")))
}

/// The running processes of an engine sandbox.
pub(super) fn engine_procs(e: &EngineEntry) -> Vec<ProcessInfo> {
    let mut out: Vec<ProcessInfo> = e
        .procs
        .lock()
        .map(|p| {
            p.values()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    tag: p.tag.clone(),
                    config: p.config.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|p| p.pid);
    out
}

/// A process of an engine sandbox: an engine execution waited for on a
/// thread of its own, its output echoed into two pipes a task reads and
/// fans out to every listener.
pub(super) struct EngineProc {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    listeners: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
    control: Option<Arc<dyn ExecControl>>,
    /// The last signal sent through [`EngineProc::signal`] (0: none): a
    /// backend that reports a signalled command as exit code 128+N (as
    /// `runsc exec` does) is then reported as killed by it, as envd does.
    signalled: std::sync::atomic::AtomicI32,
    /// What stdin received (for the audit record).
    input: Mutex<Capture>,
}

/// What the waiting thread reports once the execution started.
type Started = (u32, Option<Box<dyn ExecControl>>);

impl EngineProc {
    /// Starts `spec` in `sb`; `on_end(pid)` runs once it ended and every
    /// listener was told.
    async fn start(
        sb: Arc<dyn LiveSandbox>,
        spec: ExecSpec,
        (config, tag): (ProcessConfig, Option<String>),
        (audit, egress): (super::process::AuditHook, Option<EgressHook>),
        on_end: impl FnOnce(u32) + Send + 'static,
    ) -> BackendResult<(Arc<EngineProc>, ProcessHandle)> {
        let internal = |e: std::io::Error| BackendError::Internal(format!("a pipe: {e}"));
        let (out_r, out_w) = std::io::pipe().map_err(internal)?;
        let (err_r, err_w) = std::io::pipe().map_err(internal)?;
        let (started_tx, started_rx) = oneshot::channel::<BackendResult<Started>>();
        let (done_tx, done_rx) = oneshot::channel::<BackendResult<Outcome>>();
        // The execution is waited for on a thread of its own (it blocks for
        // the command's whole life, which may be hours: not a thread of
        // tokio's bounded blocking pool).
        std::thread::Builder::new()
            .name("nanoclaw-engine-exec".into())
            .spawn(move || {
                let exec = match sb.spawn(&spec) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = started_tx.send(Err(super::engine_error(e)));
                        return;
                    }
                };
                let _ = started_tx.send(Ok((exec.id(), exec.control())));
                let echo = Echo {
                    stdout: out_w.as_fd(),
                    stderr: err_w.as_fd(),
                };
                let r = exec.wait(Some(echo)).map_err(super::engine_error);
                drop((out_w, err_w));
                let _ = done_tx.send(r);
            })
            .map_err(internal)?;
        let (pid, control) = started_rx
            .await
            .map_err(|_| BackendError::Internal("the command's thread ended".into()))??;
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        let proc = Arc::new(EngineProc {
            pid,
            tag,
            config,
            listeners: Mutex::new(vec![tx]),
            control: control.map(Arc::from),
            signalled: std::sync::atomic::AtomicI32::new(0),
            input: Mutex::new(Capture::new(crate::audit::DEFAULT_CAPTURE_BYTES)),
        });
        let recv = |fd: std::io::PipeReader| {
            pipe::Receiver::from_owned_fd(OwnedFd::from(fd)).map_err(internal)
        };
        let (out, err) = (recv(out_r)?, recv(err_r)?);
        let p = proc.clone();
        tokio::spawn(async move {
            p.pump(out, err, done_rx, audit, egress).await;
            on_end(p.pid);
        });
        Ok((
            proc.clone(),
            ProcessHandle {
                pid: proc.pid,
                events: rx,
            },
        ))
    }

    /// A new listener: the events from now on.
    pub(super) fn listen(&self) -> mpsc::Receiver<ProcessEvent> {
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        if let Ok(mut l) = self.listeners.lock() {
            l.push(tx);
        }
        rx
    }

    fn control(&self) -> BackendResult<Arc<dyn ExecControl>> {
        self.control.clone().ok_or_else(|| {
            BackendError::Internal("this backend gives no control of a running command".into())
        })
    }

    /// Writes to stdin.
    pub(super) async fn write_stdin(&self, data: Bytes) -> BackendResult<()> {
        let c = self.control()?;
        if let Ok(mut cap) = self.input.lock() {
            cap.update(&data);
        }
        blocking(move || {
            c.write_stdin(&data)
                .map_err(|e| BackendError::InvalidArgument(format!("stdin: {e}")))
        })
        .await
    }

    /// Closes stdin.
    pub(super) async fn close_stdin(&self) -> BackendResult<()> {
        let c = self.control()?;
        blocking(move || {
            c.close_stdin();
            Ok(())
        })
        .await
    }

    /// Sends a signal (`SIGKILL`: to everything the command started).
    pub(super) async fn signal(&self, sig: i32) -> BackendResult<()> {
        let c = self.control()?;
        self.signalled
            .store(sig, std::sync::atomic::Ordering::SeqCst);
        blocking(move || c.signal(sig).map_err(super::engine_error)).await
    }

    async fn broadcast(&self, ev: ProcessEvent) {
        let listeners: Vec<_> = match self.listeners.lock() {
            Ok(l) => l.clone(),
            Err(_) => return,
        };
        for tx in &listeners {
            let sent = match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    tokio::time::timeout(SLOW_LISTENER, tx.send(ev))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
            };
            if !sent {
                if let Ok(mut l) = self.listeners.lock() {
                    l.retain(|t| !t.same_channel(tx));
                }
            }
        }
    }

    /// Reads the output until both pipes end (the execution was waited
    /// for), then reports the end.
    async fn pump(
        &self,
        mut out: pipe::Receiver,
        mut err: pipe::Receiver,
        done: oneshot::Receiver<BackendResult<Outcome>>,
        audit: super::process::AuditHook,
        egress: Option<EgressHook>,
    ) {
        let mut output = Capture::new(crate::audit::DEFAULT_CAPTURE_BYTES);
        let (mut out_open, mut err_open) = (true, true);
        let (mut bo, mut be) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
        while out_open || err_open {
            tokio::select! {
                r = out.read(&mut bo), if out_open => match r {
                    Ok(n) if n > 0 => {
                        output.update(&bo[..n]);
                        let b = Bytes::copy_from_slice(&bo[..n]);
                        self.broadcast(ProcessEvent::Data(ProcessOutput::Stdout(b))).await;
                    }
                    _ => out_open = false,
                },
                r = err.read(&mut be), if err_open => match r {
                    Ok(n) if n > 0 => {
                        output.update(&be[..n]);
                        let b = Bytes::copy_from_slice(&be[..n]);
                        self.broadcast(ProcessEvent::Data(ProcessOutput::Stderr(b))).await;
                    }
                    _ => err_open = false,
                },
            }
        }
        let outcome = done
            .await
            .unwrap_or_else(|_| Err(BackendError::Internal("the command's thread ended".into())));
        let sent = self.signalled.load(std::sync::atomic::Ordering::SeqCst);
        let end = match &outcome {
            Ok(o) => match (o.exit_code, o.signal) {
                (Some(c), _) if sent > 0 && c == 128 + sent => ProcessEnd::signaled(sent),
                (Some(c), _) => ProcessEnd::exited(c),
                (None, Some(s)) => ProcessEnd::signaled(s),
                (None, None) => ProcessEnd::signaled(libc::SIGKILL),
            },
            Err(e) => {
                let msg = format!("nanoclaw: {e}\n");
                self.broadcast(ProcessEvent::Data(ProcessOutput::Stderr(Bytes::from(msg))))
                    .await;
                ProcessEnd::signaled(libc::SIGKILL)
            }
        };
        // The refusals first, so that a client that reads the audit after
        // its command ended finds them (as for native sandboxes).
        if let Some(hook) = &egress {
            hook.command_ended().await;
        }
        if let Some((log, mut rec)) = audit {
            rec.exit_code = end.exited.then_some(end.exit_code);
            if let Ok(o) = &outcome {
                rec.signal = o.signal;
                rec.killed_by = o
                    .killed_by
                    .and_then(|r| serde_json::to_value(r).ok())
                    .and_then(|v| v.as_str().map(str::to_owned));
                rec.duration_ms = Some(o.duration.as_millis() as u64);
            }
            rec.output = Some(output.finish());
            rec.input = self
                .input
                .lock()
                .map(|mut c| std::mem::replace(&mut *c, Capture::new(0)).finish())
                .ok();
            if log.append_async(rec).await.is_err() {
                eprintln!("nanoclaw serve: could not write an exec's audit record");
            }
        }
        self.broadcast(ProcessEvent::End(end)).await;
        if let Ok(mut l) = self.listeners.lock() {
            l.clear();
        }
    }
}

/// The engine templates' backends a daemon opens at start, by name; and
/// the Kubernetes backend itself when a template names it (its sandboxes
/// are shared by replicas, [`is_shared`], in per-tenant namespaces).
#[derive(Clone, Default)]
pub struct Engines(
    pub HashMap<String, Arc<dyn nanoclaw_sandbox::backend::Backend>>,
    pub Option<Kubernetes>,
);

impl std::ops::Deref for Engines {
    type Target = HashMap<String, Arc<dyn nanoclaw_sandbox::backend::Backend>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// Checks a template's backend against the engines opened: what the
/// daemon says at start about a template it cannot serve.
pub fn check_template(name: &str, t: &Template, engines: &Engines) -> Result<(), String> {
    match t.backend.as_deref() {
        None | Some("native") => Ok(()),
        Some(b) if engines.contains_key(b) => Ok(()),
        Some(b) => Err(format!(
            "template {name}: backend {b} was not opened (use native, docker, gvisor, microvm or kubernetes)"
        )),
    }
}
