//! The real [`Backend`]: every sandbox is held by a keeper (a small
//! single-threaded `nanoclaw __keeper` process, see
//! `nanoclaw_sandbox::keeper`); the daemon never clones one itself. What
//! blocks (starting a keeper, file operations, which run as commands
//! inside the sandbox) runs on tokio's blocking pool; requests to a keeper
//! and a running process's pipes are served on the event loop
//! ([`ipc`]).
//!
//! Each sandbox's E2B record (tenant, template, metadata, token, end) is
//! kept beside its keeper's state (`e2b.json`), so a restarted daemon
//! re-adopts the sandboxes that are still alive ([`KeeperBackend::adopt`]).
//! Processes started before a restart are not re-attached: their pipes
//! were the old daemon's, and their keeper killed them when it hung up.

mod egress;
mod engines;
mod files;
mod ipc;
mod leases;
mod pool;
mod process;
mod quota;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nanoclaw_sandbox::keeper::{self, KeeperConfig, KeeperError, Live, Remote, Reply, Request};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::{Network, User};
use nanoclaw_sandbox::SandboxSpec;
use serde::{Deserialize, Serialize};

use crate::backend::*;
use crate::metrics::Metrics;
use process::Proc;
use quota::{Quota, Share};

pub use engines::{check_template, Engines};
pub use pool::MAX_POOL;

/// How much longer than its E2B end a keeper lives on its own (should the
/// daemon be gone at the end, the sandbox still ends).
const KEEPER_GRACE: Duration = Duration::from_secs(60);
/// How long a paused sandbox is kept.
const PAUSED_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often the reaper looks at deadlines and dead keepers.
const REAP_EVERY: Duration = Duration::from_millis(500);
/// The E2B user's uid and gid inside a sandbox ("user").
const E2B_USER: User = User {
    uid: 1000,
    gid: 1000,
};
/// The template `e2b_code_interpreter.Sandbox.create()` asks for.
pub const CODE_INTERPRETER_TEMPLATE: &str = "code-interpreter-v1";
/// E2B's home directory and default working directory.
pub const E2B_HOME: &str = "/home/user";

/// A template: what a sandbox is built from.
#[derive(Clone, Debug)]
pub struct Template {
    /// The sandbox (its command is ignored).
    pub spec: SandboxSpec,
    /// The languages `run_once`'s `lang` may name (`None`: any; an
    /// image registered for some languages has only their interpreters).
    pub languages: Option<Vec<String>>,
    /// The engine backend its sandboxes run on (`docker`, `gvisor`);
    /// `None`: native, held by keepers. See [`engines`].
    pub backend: Option<String>,
}

impl Template {
    /// The default sandbox (host root, default limits) as E2B's `base`:
    /// user 1000 with a writable `/home/user`.
    pub fn base() -> Template {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.user = E2B_USER;
        spec.home = Some(E2B_HOME.into());
        spec.hostname = "e2b".into();
        Template {
            spec,
            languages: None,
            backend: None,
        }
    }

    /// `base` over an image's root: its layers (writes on a per-sandbox
    /// layer above them), its environment under the request's.
    pub fn of_image(image: &ImageTemplate) -> Template {
        let mut t = Template::base();
        t.spec.root = nanoclaw_sandbox::spec::Root::Layers(image.layers.clone());
        t.spec.env = image
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        t.languages = Some(image.languages.clone());
        t
    }
}

/// How the backend runs.
#[derive(Clone, Debug)]
pub struct KeeperBackendConfig {
    /// nanoclaw's own binary (keepers are `EXE __keeper`).
    pub exe: PathBuf,
    /// Where the keepers of this daemon keep their state.
    pub root: PathBuf,
    /// Templates by name (`base` is added when missing).
    pub templates: HashMap<String, Template>,
    /// Tenants and their quotas (`None`: no quotas).
    pub tenants: Option<Arc<crate::tenants::Tenants>>,
    /// Warm pool size per template.
    pub pools: HashMap<String, usize>,
    /// The audit log (create, exec, kill, pause, resume, files).
    pub audit: Option<crate::audit::Audit>,
    /// Extra CA certificates (PEM file) trusted when the egress proxy
    /// verifies a host that `network.rules` intercept, besides the host's
    /// trust store (`NANOCLAW_UPSTREAM_CA` for `nanoclaw serve`).
    pub upstream_ca: Option<PathBuf>,
    /// The other backends templates name (`docker`, `gvisor`), opened at
    /// start (which swept what a killed daemon left there).
    pub engines: Engines,
}

/// What the daemon records of a sandbox, beside its keeper's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    tenant: String,
    template: String,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    token: String,
    started_at_ms: u64,
    end_at_ms: u64,
    auto_pause: bool,
    allow_internet_access: Option<bool>,
    allow_out: Vec<String>,
    deny_out: Vec<String>,
    cpu_count: u32,
    memory_mb: u32,
}

impl Record {
    /// The record of a sandbox made for `req` with `spec`, starting now.
    fn for_request(req: &CreateSandbox, spec: &SandboxSpec) -> Record {
        let now = SystemTime::now();
        let share = share_of(spec);
        Record {
            tenant: req.tenant.0.clone(),
            template: req.template.clone(),
            metadata: req.metadata.clone(),
            env_vars: req.env_vars.clone(),
            token: req.envd_access_token.clone(),
            started_at_ms: ms(now),
            end_at_ms: ms(now + req.timeout),
            auto_pause: req.auto_pause,
            allow_internet_access: req.allow_internet_access,
            allow_out: req.allow_out.clone(),
            deny_out: req.deny_out.clone(),
            cpu_count: share.cpus as u32,
            memory_mb: share.memory_mb as u32,
        }
    }
}

/// One sandbox.
struct Entry {
    remote: Remote,
    record: Mutex<Record>,
    paused: Mutex<bool>,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    /// (when, cpu ms) of the last metrics sample.
    last_cpu: Mutex<Option<(SystemTime, f64)>>,
    /// Egress refusals of the keeper's list already audited.
    denials_seen: Arc<std::sync::atomic::AtomicUsize>,
}

/// Sandboxes held by keepers.
pub struct KeeperBackend {
    cfg: KeeperBackendConfig,
    sandboxes: Mutex<HashMap<String, Arc<Entry>>>,
    /// Sandboxes of the other backends ([`engines`]).
    engines: Mutex<HashMap<String, Arc<engines::EngineEntry>>>,
    /// Reaper rounds so far.
    rounds: std::sync::atomic::AtomicU32,
    quota: Quota,
    pool: pool::Pool,
    /// Images registered as templates, by (tenant, name): only their
    /// tenant sees them.
    images: Mutex<HashMap<(String, String), Template>>,
    /// Templates in use by creates and one-shot runs still going.
    leases: leases::Leases,
    /// The daemon's counters, once [`KeeperBackend::set_metrics`] gave
    /// them.
    metrics: OnceLock<Arc<Metrics>>,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn keeper_error(e: KeeperError) -> BackendError {
    match e {
        KeeperError::NotFound(id) => BackendError::NotFound(format!("sandbox {id} not found")),
        KeeperError::Busy(m) => BackendError::Timeout(m),
        KeeperError::Invalid(m) => BackendError::InvalidArgument(m),
        KeeperError::Engine(e) => engine_error(e),
        other => BackendError::Internal(other.to_string()),
    }
}

pub(crate) fn engine_error(e: nanoclaw_sandbox::Error) -> BackendError {
    use nanoclaw_sandbox::Error as E;
    match e {
        E::NotFound { what, .. } => BackendError::NotFound(what),
        E::Paused { id } => BackendError::Unavailable(format!("sandbox {id} is paused")),
        E::InvalidSpec(m) if m.contains("Permission denied") || m.contains("Read-only") => {
            BackendError::PermissionDenied(m)
        }
        E::InvalidSpec(m) if m.contains("No space left") => BackendError::NoSpace(m),
        E::InvalidSpec(m) => BackendError::InvalidArgument(m),
        other => BackendError::Internal(other.to_string()),
    }
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> BackendResult<T> + Send + 'static,
) -> BackendResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Internal(format!("worker: {e}")))?
}

/// The E2B network request as a sandbox network policy.
fn network_of(req: &CreateSandbox) -> BackendResult<Network> {
    network_from(&NetworkUpdate {
        allow_internet_access: req.allow_internet_access,
        allow_out: req.allow_out.clone(),
        deny_out: req.deny_out.clone(),
        rules: Default::default(),
    })
}

/// E2B's network fields (of a create or a `PUT .../network`) as a sandbox
/// network policy.
fn network_from(req: &NetworkUpdate) -> BackendResult<Network> {
    let denies_all = req.deny_out.iter().any(|d| d == "0.0.0.0/0" || d == "::/0");
    if req.allow_out.iter().any(|a| a == "0.0.0.0/0") {
        // "Everything": the internet, special addresses still refused.
        return Ok(default_network());
    }
    if !req.allow_out.is_empty() {
        // Everything not allowed is refused already; E2B's allowOut wins
        // over denyOut.
        let (mut hosts, mut cidrs) = (Vec::new(), Vec::new());
        for a in &req.allow_out {
            if a.parse::<std::net::IpAddr>().is_ok() || a.contains('/') {
                check_public(a)?;
                cidrs.push(a.clone());
            } else {
                // `1.2.3.4:80` and `[::1]:443` are host rules naming an
                // address literally: explicit rules too.
                public_host_rule(a).map_err(BackendError::InvalidArgument)?;
                hosts.push(a.clone());
            }
        }
        return Ok(Network::Allowlist {
            hosts,
            cidrs,
            limits: Default::default(),
            add_hosts: Vec::new(),
        });
    }
    if req.allow_internet_access == Some(false) || denies_all {
        return Ok(Network::None);
    }
    if !req.deny_out.is_empty() {
        return Err(BackendError::InvalidArgument(
            "network.denyOut with internet access on is not supported: nanoclaw cannot refuse single destinations while allowing the rest; list what to allow in network.allowOut instead (everything else is refused)".into(),
        ));
    }
    Ok(default_network())
}

/// The proxy policy a running sandbox is switched to for `network`.
fn live_policy(network: &Network) -> BackendResult<nanoclaw_net::NetworkPolicy> {
    use nanoclaw_net::{NetworkMode, NetworkPolicy};
    let bad = |e: nanoclaw_net::PolicyError| {
        BackendError::InvalidArgument(format!("network.allowOut: {e}"))
    };
    Ok(match network {
        Network::Allowlist { hosts, cidrs, .. } => {
            NetworkPolicy::allowlist(hosts, cidrs).map_err(bad)?
        }
        Network::Open { .. } => NetworkPolicy {
            mode: NetworkMode::Open,
            ..NetworkPolicy::default()
        },
        Network::None | Network::Kernel { .. } => NetworkPolicy::default(),
    })
}

/// The address a `HOST[:PORT]` rule names literally (`1.2.3.4`,
/// `1.2.3.4:80`, `[::1]`, `[::1]:443`, `::1`), if it does.
fn literal_ip(rule: &str) -> Option<std::net::IpAddr> {
    if let Ok(ip) = rule.parse() {
        return Some(ip);
    }
    if let Some(rest) = rule.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    rule.rsplit_once(':')?.0.parse().ok()
}

/// Refuses a `HOST[:PORT]` egress rule from an API caller (E2B's
/// `allowOut`, `POST /v1/images`' `allow_hosts`) that names a
/// non-public address literally: to the egress proxy a literal-IP host
/// rule is an explicit allowance, which would open the host's loopback
/// (the daemon itself), cloud metadata or private networks. Names are
/// fine: what they resolve to is checked by the proxy, special ranges
/// refused.
pub(crate) fn public_host_rule(rule: &str) -> Result<(), String> {
    match literal_ip(rule) {
        Some(ip) => check_public(&ip.to_string()).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Refuses an `allowOut` address or CIDR that reaches anything but the
/// public internet: an explicit rule would let the egress proxy connect to
/// the host's loopback (the daemon itself), link-local (cloud metadata
/// credentials) or private networks — an operator's choice, never an API
/// caller's.
fn check_public(rule: &str) -> BackendResult<()> {
    let bad = || {
        BackendError::InvalidArgument(format!(
            "network.allowOut {rule:?}: only public addresses may be allowed (not loopback, link-local, private, shared, multicast or reserved ranges)"
        ))
    };
    let (addr, len) = match rule.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| bad())?)),
        None => (rule, None),
    };
    match addr.parse::<std::net::IpAddr>().map_err(|_| bad())? {
        std::net::IpAddr::V4(v4) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return Err(bad());
            }
            let size = 1u64 << (32 - len);
            let start = u64::from(u32::from(v4)) & !(size - 1);
            let special: [(u32, u32); 11] = [
                (0x0000_0000, 8),
                (0x0a00_0000, 8),
                (0x6440_0000, 10),
                (0x7f00_0000, 8),
                (0xa9fe_0000, 16),
                (0xac10_0000, 12),
                (0xc000_0000, 24),
                (0xc0a8_0000, 16),
                (0xc612_0000, 15),
                (0xe000_0000, 4),
                (0xf000_0000, 4),
            ];
            for (net, l) in special {
                let (a, b) = (u64::from(net), u64::from(net) + (1u64 << (32 - l)));
                if start < b && a < start + size {
                    return Err(bad());
                }
            }
            Ok(())
        }
        std::net::IpAddr::V6(v6) => {
            // Global unicast (2000::/3) only, and not an IPv4-in-IPv6 form.
            let len = len.unwrap_or(128);
            if !(3..=128).contains(&len) || v6.segments()[0] & 0xe000 != 0x2000 {
                return Err(bad());
            }
            Ok(())
        }
    }
}

/// E2B's default network: the internet, through the proxy.
pub(crate) fn default_network() -> Network {
    Network::Open {
        limits: Default::default(),
    }
}

/// The uid:gid of an E2B user name.
fn user_of(scope: &SandboxScope) -> BackendResult<Option<User>> {
    match scope.user.as_deref() {
        None | Some("") | Some("user") => Ok(Some(E2B_USER)),
        // SAFETY: geteuid cannot fail.
        Some("root") if unsafe { libc::geteuid() } != 0 => Err(BackendError::InvalidArgument(
            "user \"root\" needs a rootful nanoclaw serve: the sandboxes of a rootless daemon have a single user (\"user\")".into(),
        )),
        Some("root") => Ok(Some(User { uid: 0, gid: 0 })),
        Some(other) => Err(BackendError::InvalidArgument(format!(
            "user {other:?} does not exist in the sandbox (use \"user\" or \"root\")"
        ))),
    }
}

impl KeeperBackend {
    /// A backend with no sandboxes yet (see [`KeeperBackend::adopt`]).
    pub fn new(mut cfg: KeeperBackendConfig) -> Arc<KeeperBackend> {
        cfg.templates
            .entry("base".into())
            .or_insert_with(Template::base);
        // e2b-code-interpreter's default template: the same host root,
        // whose python3, node and bash serve its code contexts.
        cfg.templates
            .entry(CODE_INTERPRETER_TEMPLATE.into())
            .or_insert_with(Template::base);
        let quota = Quota::new(cfg.tenants.clone());
        let pool = pool::Pool::new(cfg.pools.clone());
        Arc::new(KeeperBackend {
            cfg,
            sandboxes: Mutex::new(HashMap::new()),
            engines: Mutex::new(HashMap::new()),
            rounds: std::sync::atomic::AtomicU32::new(0),
            quota,
            pool,
            images: Mutex::new(HashMap::new()),
            leases: leases::Leases::default(),
            metrics: OnceLock::new(),
        })
    }

    /// Counts execs (and their durations) in `metrics` from now on; the
    /// sandbox gauges are read from this backend at each scrape. Only the
    /// first call has an effect.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The template `name` as `tenant` sees it: one of its registered
    /// images, else a configured template.
    fn template(&self, tenant: &TenantId, name: &str) -> BackendResult<Template> {
        let key = (tenant.0.clone(), name.to_string());
        if let Some(t) = self.images.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(t);
        }
        self.cfg
            .templates
            .get(name)
            .cloned()
            .ok_or_else(|| BackendError::NotFound(format!("template '{name}' not found")))
    }

    /// Takes over the sandboxes a previous daemon left alive (their
    /// keepers run and their records are there); the keepers of this root
    /// without a record are ended. Returns (adopted, removed).
    pub fn adopt(&self) -> (usize, usize) {
        let (mut adopted, mut removed) = (0, 0);
        for (dir, st) in keeper::all_sandboxes(&self.cfg.root) {
            let rec = std::fs::read(dir.join("e2b.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            let remote = Remote::new(&st.id, &dir);
            match rec {
                Some(record) => {
                    let paused = keeper::state_of(&dir) == "paused";
                    self.insert(remote, record, paused);
                    adopted += 1;
                }
                None => {
                    let _ = remote.ask_within(&Request::Stop, Duration::from_secs(2));
                    removed += 1;
                }
            }
        }
        (adopted, removed)
    }

    fn insert(&self, remote: Remote, record: Record, paused: bool) -> Arc<Entry> {
        let e = Arc::new(Entry {
            remote,
            record: Mutex::new(record),
            paused: Mutex::new(paused),
            procs: Mutex::new(HashMap::new()),
            last_cpu: Mutex::new(None),
            denials_seen: Arc::default(),
        });
        if let Ok(mut m) = self.sandboxes.lock() {
            m.insert(e.remote.id.clone(), e.clone());
        }
        e
    }

    /// The tenant's sandbox `id` (another tenant's is not found).
    fn entry(&self, tenant: &TenantId, id: &str) -> BackendResult<Arc<Entry>> {
        let m = self
            .sandboxes
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?;
        m.get(id)
            .filter(|e| e.record.lock().is_ok_and(|r| r.tenant == tenant.0))
            .cloned()
            .ok_or_else(|| BackendError::NotFound(format!("sandbox \"{id}\" not found")))
    }

    /// What runs the file commands of the scope's running sandbox.
    async fn runner(&self, scope: &SandboxScope) -> BackendResult<files::Runner> {
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            return Ok(files::Runner::Engine(engines::EngineExec(
                e.sandbox.clone(),
            )));
        }
        Ok(files::Runner::Keeper(self.running(scope)?.remote.clone()))
    }

    /// A running sandbox of the scope's tenant.
    fn running(&self, scope: &SandboxScope) -> BackendResult<Arc<Entry>> {
        let e = self.entry(&scope.tenant, &scope.sandbox_id)?;
        if e.paused.lock().is_ok_and(|p| *p) {
            return Err(BackendError::Unavailable(format!(
                "sandbox {} is paused",
                scope.sandbox_id
            )));
        }
        Ok(e)
    }

    /// Forgets a sandbox and ends its keeper.
    async fn end(&self, id: &str) {
        let e = self.sandboxes.lock().ok().and_then(|mut m| m.remove(id));
        if let Some(e) = e {
            let _ = ipc::ask(&e.remote, &Request::Stop, Duration::from_secs(2)).await;
        }
    }

    /// The reaper: ends (or, with auto-pause, pauses) sandboxes past their
    /// end, and forgets those whose keeper is gone. Runs until the backend
    /// is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                let Some(b) = weak.upgrade() else { return };
                b.reap().await;
            }
        });
    }

    async fn reap(&self) {
        let now = ms(SystemTime::now());
        let all: Vec<Arc<Entry>> = match self.sandboxes.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return,
        };
        let mut orphaned = self.removed_tenants(&all).await;
        let engines = self.all_engines();
        if !engines.is_empty() {
            let tenants: Vec<String> = engines
                .iter()
                .filter_map(|e| e.record.lock().ok().map(|r| r.tenant.clone()))
                .collect();
            orphaned.extend(self.removed_tenant_names(tenants).await);
        }
        let round = self
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reap_engines(&orphaned, round).await;
        self.reap_shared(round).await;
        for e in all {
            let tenant = e.record.lock().map(|r| r.tenant.clone()).ok();
            if tenant.is_some_and(|t| orphaned.contains(&t)) {
                // Its tenant was removed (`nanoclaw tenant rm`): nobody may
                // reach it any more, so it does not outlive its owner.
                self.end(&e.remote.id).await;
                continue;
            }
            let (end, auto_pause) = match e.record.lock() {
                Ok(r) => (r.end_at_ms, r.auto_pause),
                Err(_) => continue,
            };
            let paused = e.paused.lock().is_ok_and(|p| *p);
            let gone = !e.remote.is_up();
            if gone {
                if let Ok(mut m) = self.sandboxes.lock() {
                    m.remove(&e.remote.id);
                }
            } else if now >= end && !paused {
                if auto_pause {
                    let _ = self.set_paused(&e, true).await;
                } else {
                    self.end(&e.remote.id).await;
                }
            }
        }
    }

    /// The tenants of `all` that are no longer in the tenants table.
    async fn removed_tenants(&self, all: &[Arc<Entry>]) -> Vec<String> {
        let names: Vec<String> = all
            .iter()
            .filter_map(|e| e.record.lock().ok().map(|r| r.tenant.clone()))
            .collect();
        self.removed_tenant_names(names).await
    }

    /// The tenants of `names` that are no longer in the tenants table.
    async fn removed_tenant_names(&self, mut names: Vec<String>) -> Vec<String> {
        let Some(t) = self.cfg.tenants.clone() else {
            return Vec::new();
        };
        names.sort();
        names.dedup();
        tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .filter(|n| matches!(t.get(n), Err(crate::tenants::TenantError::NotFound(_))))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn ask(&self, e: &Arc<Entry>, req: Request) -> BackendResult<Live> {
        match ipc::ask(&e.remote, &req, ipc::ANSWER)
            .await
            .map_err(keeper_error)?
        {
            Reply::Live(l) => Ok(*l),
            Reply::Error(m) => Err(BackendError::Conflict(m)),
            Reply::Stopping => Err(BackendError::NotFound("the sandbox is ending".into())),
            Reply::Network(_) | Reply::Lifetime { .. } => Err(BackendError::Internal(
                "the keeper answered another request".into(),
            )),
        }
    }

    /// Moves the end of `e`'s keeper's lifetime to `seconds` from now.
    async fn set_lifetime(&self, e: &Arc<Entry>, seconds: u64) -> BackendResult<()> {
        lifetime_set(&e.remote, seconds).await
    }

    async fn set_paused(&self, e: &Arc<Entry>, pause: bool) -> BackendResult<()> {
        let req = if pause {
            Request::Pause
        } else {
            Request::Resume
        };
        self.ask(e, req).await?;
        if let Ok(mut p) = e.paused.lock() {
            *p = pause;
        }
        if pause {
            self.set_lifetime(e, PAUSED_RETENTION.as_secs()).await?;
        }
        Ok(())
    }

    /// Moves a sandbox's end to `timeout` from now (its keeper's lifetime
    /// too, with a grace period).
    async fn extend(&self, e: &Arc<Entry>, timeout: Duration) -> BackendResult<()> {
        let who = e
            .record
            .lock()
            .ok()
            .map(|r| (TenantId(r.tenant.clone()), r.started_at_ms));
        if let Some((t, started)) = who {
            // The longest lifetime counts from the creation, not from now.
            let age = Duration::from_millis(ms(SystemTime::now()).saturating_sub(started));
            self.quota
                .check_lifetime(&t, age + timeout)
                .await
                .inspect_err(|e| self.count_refusal(e))?;
        }
        let end = SystemTime::now() + timeout;
        self.set_lifetime(e, (timeout + KEEPER_GRACE).as_secs())
            .await?;
        let rec = match e.record.lock() {
            Ok(mut r) => {
                r.end_at_ms = ms(end);
                r.clone()
            }
            Err(_) => return Err(BackendError::Internal("lock".into())),
        };
        save_record(&e.remote.dir, &rec);
        Ok(())
    }

    /// Counts a quota refusal in `/metrics`.
    fn count_refusal(&self, e: &BackendError) {
        if let (Some(m), Some(q)) = (self.metrics.get(), quota::refusal_kind(e)) {
            m.quota_refused(q);
        }
    }

    /// Starts a keeper for `req` with `spec` and records the sandbox.
    async fn start_sandbox(
        &self,
        req: &CreateSandbox,
        spec: SandboxSpec,
    ) -> BackendResult<SandboxInfo> {
        if spec.network == default_network() && spec.egress.is_empty() {
            let metrics = self.metrics.get();
            match self.pool.take(&req.template) {
                Some(r) => {
                    if let Ok(info) = self.adopt_warm(req, &spec, r.clone()).await {
                        if let Some(m) = metrics {
                            m.pool_hit();
                        }
                        return Ok(info);
                    }
                    let _ = ipc::ask(&r, &Request::Stop, Duration::from_secs(2)).await;
                }
                None if self.pool.target.get(&req.template).is_some_and(|n| *n > 0) => {
                    if let Some(m) = metrics {
                        m.pool_miss();
                    }
                }
                None => {}
            }
        }
        let cfg = KeeperConfig {
            spec: spec.clone(),
            name: None,
            labels: vec![("tenant".into(), req.tenant.0.clone())],
            lifetime_ms: (req.timeout + KEEPER_GRACE).as_millis() as u64,
            idle_timeout_ms: None,
            exec_timeout_ms: 3_600_000,
            root: self.cfg.root.clone(),
        };
        let exe = self.cfg.exe.clone();
        let id = blocking(move || keeper::start_keeper(&exe, &cfg).map_err(keeper_error)).await?;
        let mut record = Record::for_request(req, &spec);
        record
            .metadata
            .entry("launch".into())
            .or_insert_with(|| "cold".into());
        let dir = self.cfg.root.join(&id);
        self.record_sandbox(Remote::new(&id, &dir), record)
    }

    /// Hands a pooled sandbox to `req`'s tenant.
    async fn adopt_warm(
        &self,
        req: &CreateSandbox,
        spec: &SandboxSpec,
        r: Remote,
    ) -> BackendResult<SandboxInfo> {
        lifetime_set(&r, (req.timeout + KEEPER_GRACE).as_secs()).await?;
        let mut record = Record::for_request(req, spec);
        record.metadata.insert("launch".into(), "warm".into());
        self.record_sandbox(r, record)
    }

    /// Records a sandbox beside its keeper's state and takes it in.
    fn record_sandbox(&self, r: Remote, record: Record) -> BackendResult<SandboxInfo> {
        save_record(&r.dir, &record);
        let e = self.insert(r, record, false);
        Self::info(&e)
    }

    /// Starts filling the warm pools (call once, from the runtime).
    pub fn spawn_pools(self: &Arc<Self>) {
        if self.pool.target.values().any(|n| *n > 0) {
            pool::spawn_refiller(Arc::downgrade(self));
        }
    }

    /// Pools configured for templates that do not exist.
    pub fn unknown_pools(&self) -> Vec<String> {
        self.pool
            .target
            .keys()
            .filter(|t| !self.cfg.templates.contains_key(*t))
            .cloned()
            .collect()
    }

    /// Ready pooled sandboxes per template.
    pub fn pool_sizes(&self) -> HashMap<String, usize> {
        self.pool.sizes()
    }

    /// The ready pooled sandboxes per template, into `/metrics`.
    fn report_pool_sizes(&self) {
        if let Some(m) = self.metrics.get() {
            m.set_pool_ready(self.pool.sizes());
        }
    }

    /// Ends the pooled sandboxes (at shutdown: they have no record and
    /// would be ended by the next daemon anyway), the other backends'
    /// waiting until nothing of them is left.
    pub fn drain_pools(&self) {
        let (keepers, engines) = self.pool.drain();
        // A refill under way ends what it makes once it sees the pool
        // closed (a VM's boot under TCG: seconds).
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.pool.filling() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in keepers {
            let _ = r.ask_within(&Request::Stop, Duration::from_secs(2));
        }
        for p in engines {
            if let Err(e) = p.sandbox.destroy() {
                let id = p.sandbox.id().to_string();
                eprintln!(
                    "nanoclaw serve: removing pooled {} sandbox {id}: {e}",
                    p.backend
                );
            }
        }
    }

    /// At shutdown, after [`KeeperBackend::drain_pools`]: removes the
    /// keepers' state folder once the pooled keepers have left it (up to
    /// `wait`), unless sandboxes still live there — those stay for the
    /// next daemon of this data folder to re-adopt.
    pub fn remove_root_if_empty(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let empty = std::fs::read_dir(&self.cfg.root).map_or(true, |mut d| d.next().is_none());
            if empty || Instant::now() >= deadline {
                // Fails (and keeps it) when not empty.
                let _ = std::fs::remove_dir(&self.cfg.root);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A one-shot run in a fresh `nanoclaw __run` process.
    async fn run_reserved(
        &self,
        mut spec: SandboxSpec,
        stdin: Option<String>,
    ) -> BackendResult<serde_json::Value> {
        if let Some(s) = &stdin {
            spec.stdin = nanoclaw_sandbox::spec::Stdin::Bytes(s.clone().into_bytes());
        }
        let input = serde_json::to_vec(&spec).map_err(|e| BackendError::Internal(e.to_string()))?;
        let mut child = tokio::process::Command::new(&self.cfg.exe)
            .arg("__run")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackendError::Internal(format!("starting a run: {e}")))?;
        if let Some(mut w) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            w.write_all(&input)
                .await
                .map_err(|e| BackendError::Internal(format!("starting a run: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| BackendError::Internal(format!("a run: {e}")))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            return Err(BackendError::InvalidArgument(
                msg.trim().trim_start_matches("nanoclaw: ").to_string(),
            ));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| BackendError::Internal(format!("a run's outcome: {e}")))
    }

    /// Appends a `file` record (operation and paths) for a filesystem call,
    /// whatever its result (on disk before the request's answer: see
    /// [`crate::audit::Audit::append_with_answer`]).
    async fn audit_file<T>(
        &self,
        scope: &SandboxScope,
        op: &str,
        paths: &[&str],
        r: BackendResult<T>,
    ) -> BackendResult<T> {
        if let Some(a) = self.cfg.audit.clone() {
            let mut rec = crate::audit::Record::new(crate::audit::kind::FILE);
            rec.tenant = Some(scope.tenant.0.clone());
            rec.sandbox = Some(scope.sandbox_id.clone());
            rec.method = Some(op.to_string());
            rec.path = Some(paths.join(" -> "));
            rec.detail = match &r {
                Ok(_) => scope.user.as_ref().map(|u| format!("user {u}")),
                Err(e) => Some(format!("failed: {e}")),
            };
            if a.append_with_answer(rec).await.is_err() {
                eprintln!("nanoclaw serve: could not write a file operation's audit record");
            }
        }
        r
    }

    /// Appends an audit record about a sandbox (on disk before the
    /// request's answer, in the same commit as the request's own record:
    /// see [`crate::audit::Audit::append_with_answer`]).
    async fn audit(&self, kind: &str, tenant: &TenantId, sandbox: &str, detail: Option<String>) {
        let Some(a) = self.cfg.audit.clone() else {
            return;
        };
        let mut rec = crate::audit::Record::new(kind);
        rec.tenant = Some(tenant.0.clone());
        rec.sandbox = Some(sandbox.to_string());
        rec.detail = detail;
        if a.append_with_answer(rec).await.is_err() {
            eprintln!("nanoclaw serve: could not write an audit record ({kind} {sandbox})");
        }
    }

    /// What the tenant's sandboxes hold now.
    fn live_share(&self, tenant: &TenantId) -> Share {
        let Ok(m) = self.sandboxes.lock() else {
            return Share::default();
        };
        let mut total = Share::default();
        let mut count = |r: &Record| {
            if r.tenant == tenant.0 {
                total.sandboxes += 1;
                total.memory_mb += u64::from(r.memory_mb);
                total.cpus += f64::from(r.cpu_count);
            }
        };
        for e in m.values() {
            if let Ok(r) = e.record.lock() {
                count(&r);
            }
        }
        drop(m);
        for e in self.all_engines() {
            if let Ok(r) = e.record.lock() {
                count(&r);
            }
        }
        total
    }

    fn info(e: &Entry) -> BackendResult<SandboxInfo> {
        let r = e
            .record
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?;
        Ok(SandboxInfo {
            sandbox_id: e.remote.id.clone(),
            template_id: r.template.clone(),
            alias: Some(r.template.clone()),
            started_at: at(r.started_at_ms),
            end_at: at(r.end_at_ms),
            state: if e.paused.lock().is_ok_and(|p| *p) {
                SandboxState::Paused
            } else {
                SandboxState::Running
            },
            metadata: r.metadata.clone(),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: 0,
            allow_internet_access: r.allow_internet_access,
            allow_out: r.allow_out.clone(),
            deny_out: r.deny_out.clone(),
            auto_pause: r.auto_pause,
            envd_access_token: r.token.clone(),
        })
    }

    fn proc_of(e: &Entry, sel: &ProcessSelector) -> BackendResult<Arc<Proc>> {
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
}

/// Moves the end of `r`'s lifetime to `seconds` from now. A keeper
/// answers `Lifetime` (one started by an earlier nanoclaw, `Live`).
async fn lifetime_set(r: &Remote, seconds: u64) -> BackendResult<()> {
    match ipc::ask(r, &Request::SetLifetime { seconds }, ipc::ANSWER)
        .await
        .map_err(keeper_error)?
    {
        Reply::Lifetime { .. } | Reply::Live(_) => Ok(()),
        Reply::Error(m) => Err(BackendError::Conflict(m)),
        Reply::Stopping => Err(BackendError::NotFound("the sandbox is ending".into())),
        Reply::Network(_) => Err(BackendError::Internal(
            "the keeper answered a network state to a lifetime change".into(),
        )),
    }
}

fn save_record(dir: &Path, rec: &Record) {
    if let Ok(b) = serde_json::to_vec(rec) {
        let tmp = dir.join("e2b.json.tmp");
        if std::fs::write(&tmp, b).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("e2b.json"));
        }
    }
}

impl Backend for KeeperBackend {
    async fn create(&self, req: CreateSandbox) -> BackendResult<SandboxInfo> {
        // Held until the sandbox is recorded (then its record counts).
        let _lease = self.leases.take(&req.tenant.0, &req.template);
        let tpl = self.template(&req.tenant, &req.template)?;
        let engine = tpl.backend.clone().filter(|b| b != "native");
        let mut spec = tpl.spec;
        // Native sandboxes and those of the backends nanoclaw wires its
        // egress into get the same network for the same request.
        let egress_here = engine.as_deref().is_none_or(engines::has_egress);
        if egress_here {
            spec.network = network_of(&req)?;
        }
        if egress_here && !req.network_rules.is_empty() {
            if matches!(spec.network, Network::None) {
                return Err(BackendError::InvalidArgument(
                    "network.rules only change requests the sandbox may make: this sandbox has no internet access; allow the ruled hosts in network.allowOut".into(),
                ));
            }
            spec.egress = nanoclaw_sandbox::spec::Egress {
                rules: req.network_rules.clone(),
                upstream_ca: self.cfg.upstream_ca.clone(),
            };
        }
        for (k, v) in &req.env_vars {
            spec.env.push((k.clone(), v.clone()));
        }
        spec.limits.timeout = req.timeout + KEEPER_GRACE;
        let want = share_of(&spec);
        let held = self
            .quota
            .reserve(
                &req.tenant,
                || self.live_share(&req.tenant),
                want,
                req.timeout,
            )
            .await
            .inspect_err(|e| self.count_refusal(e))?;
        let r = match &engine {
            Some(b) => self.start_engine(&req, spec, b).await,
            None => self.start_sandbox(&req, spec).await,
        };
        drop(held);
        if let Ok(info) = &r {
            let launch = info.metadata.get("launch").cloned().unwrap_or_default();
            let detail = format!(
                "template {}, backend {}, launch {launch}, timeout {} s",
                req.template,
                engine.as_deref().unwrap_or("native"),
                req.timeout.as_secs()
            );
            self.audit(
                crate::audit::kind::CREATE,
                &req.tenant,
                &info.sandbox_id,
                Some(detail),
            )
            .await;
        }
        r
    }

    async fn run_once(
        &self,
        tenant: &TenantId,
        req: RunRequest,
    ) -> BackendResult<serde_json::Value> {
        let name = req.template.clone().unwrap_or_else(|| "base".into());
        let _lease = self.leases.take(&tenant.0, &name);
        let tpl = self.template(tenant, &name)?;
        if let (Some(lang), Some(langs)) = (&req.lang, &tpl.languages) {
            if !langs.contains(lang) {
                return Err(BackendError::InvalidArgument(format!(
                    "template '{name}' was registered for {}, not {lang}",
                    langs.join(", ")
                )));
            }
        }
        let mut spec = tpl.spec;
        spec.command = run_argv(&req)?;
        spec.env
            .extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(30_000).max(1));
        spec.limits.timeout = timeout;
        // A one-shot run is a sandbox while it runs: it counts against the
        // tenant's quotas like any other.
        let want = share_of(&spec);
        let _held = self
            .quota
            .reserve(tenant, || self.live_share(tenant), want, timeout)
            .await
            .inspect_err(|e| self.count_refusal(e))?;
        self.run_reserved(spec, req.stdin).await
    }

    fn reserved_template(&self, name: &str) -> Option<String> {
        self.cfg.templates.contains_key(name).then(|| {
            format!("template '{name}' is one of the daemon's own: give the image another name")
        })
    }

    fn register_image(
        &self,
        tenant: &TenantId,
        name: &str,
        image: ImageTemplate,
    ) -> BackendResult<()> {
        if let Some(why) = self.reserved_template(name) {
            return Err(BackendError::AlreadyExists(why));
        }
        self.images
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?
            .insert(
                (tenant.0.clone(), name.to_string()),
                Template::of_image(&image),
            );
        Ok(())
    }

    fn unregister_image(&self, tenant: &TenantId, name: &str) -> BackendResult<()> {
        let mut images = self
            .images
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?;
        let key = (tenant.0.clone(), name.to_string());
        if !images.contains_key(&key) {
            return Err(BackendError::NotFound(format!(
                "no image '{name}' is registered for tenant {tenant}"
            )));
        }
        let mut live: Vec<String> = self
            .sandboxes
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?
            .iter()
            .filter(|(_, e)| {
                e.record
                    .lock()
                    .is_ok_and(|r| r.tenant == tenant.0 && r.template == name)
            })
            .map(|(id, _)| id.clone())
            .collect();
        live.sort();
        let starting = self.leases.held(&tenant.0, name);
        if !live.is_empty() || starting > 0 {
            return Err(BackendError::Conflict(format!(
                "image '{name}' is the root of {} live sandbox(es){}{}: kill them (DELETE /sandboxes/ID) and remove the image again",
                live.len(),
                if live.is_empty() { String::new() } else { format!(" ({})", live.join(", ")) },
                if starting > 0 { format!(" and {starting} starting") } else { String::new() },
            )));
        }
        images.remove(&key);
        Ok(())
    }

    async fn get(&self, tenant: &TenantId, sandbox_id: &str) -> BackendResult<SandboxInfo> {
        if let Some(e) = self.engine_found(tenant, sandbox_id).await {
            // A cluster's sandbox as the cluster has it now (another
            // replica may have moved its end, or removed it).
            self.refresh_shared(&e).await?;
            return engines::engine_info(&e);
        }
        Self::info(&*self.entry(tenant, sandbox_id)?)
    }

    async fn list(&self, tenant: &TenantId) -> BackendResult<Vec<SandboxInfo>> {
        let all: Vec<Arc<Entry>> = self
            .sandboxes
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?
            .values()
            .cloned()
            .collect();
        let mut out = Vec::new();
        for e in all {
            if e.record.lock().is_ok_and(|r| r.tenant == tenant.0) {
                out.push(Self::info(&e)?);
            }
        }
        for e in self.all_engines() {
            // A cluster's sandboxes are listed from the cluster (below).
            if e.shared.is_none() && e.record.lock().is_ok_and(|r| r.tenant == tenant.0) {
                out.push(engines::engine_info(&e)?);
            }
        }
        out.extend(self.list_shared(tenant).await?);
        out.sort_by_key(|i| i.started_at);
        Ok(out)
    }

    async fn kill(&self, tenant: &TenantId, sandbox_id: &str) -> BackendResult<()> {
        if self.engine_found(tenant, sandbox_id).await.is_some() {
            self.end_engine(sandbox_id).await;
        } else {
            self.entry(tenant, sandbox_id)?;
            self.end(sandbox_id).await;
        }
        self.audit(crate::audit::kind::KILL, tenant, sandbox_id, None)
            .await;
        Ok(())
    }

    async fn pause(&self, tenant: &TenantId, sandbox_id: &str) -> BackendResult<()> {
        if let Some(e) = self.engine_found(tenant, sandbox_id).await {
            return Err(Self::engine_cannot(&e, "pausing a sandbox"));
        }
        let e = self.entry(tenant, sandbox_id)?;
        if e.paused.lock().is_ok_and(|p| *p) {
            return Err(BackendError::Conflict(format!(
                "sandbox {sandbox_id} is already paused"
            )));
        }
        self.set_paused(&e, true).await?;
        self.audit(crate::audit::kind::PAUSE, tenant, sandbox_id, None)
            .await;
        Ok(())
    }

    async fn resume(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        timeout: Duration,
    ) -> BackendResult<SandboxInfo> {
        if let Some(e) = self.engine_found(tenant, sandbox_id).await {
            return Err(Self::engine_cannot(&e, "resuming a sandbox"));
        }
        let e = self.entry(tenant, sandbox_id)?;
        if !e.paused.lock().is_ok_and(|p| *p) {
            return Err(BackendError::Conflict(format!(
                "sandbox {sandbox_id} is already running"
            )));
        }
        self.set_paused(&e, false).await?;
        self.extend(&e, timeout).await?;
        self.audit(crate::audit::kind::RESUME, tenant, sandbox_id, None)
            .await;
        Self::info(&e)
    }

    async fn set_timeout(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        timeout: Duration,
    ) -> BackendResult<()> {
        if let Some(e) = self.engine_found(tenant, sandbox_id).await {
            return self.extend_engine(&e, timeout).await;
        }
        let e = self.entry(tenant, sandbox_id)?;
        self.extend(&e, timeout).await
    }

    async fn update_network(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
        update: NetworkUpdate,
    ) -> BackendResult<()> {
        if let Some(e) = self.engine_found(tenant, sandbox_id).await {
            return self.engine_update_network(&e, tenant, update).await;
        }
        let e = self.entry(tenant, sandbox_id)?;
        let policy = live_policy(&network_from(&update)?)?;
        let req = Request::Network {
            policy: Some(policy),
            rules: Some(update.rules.clone()),
        };
        let state = match ipc::ask(&e.remote, &req, ipc::ANSWER)
            .await
            .map_err(keeper_error)?
        {
            Reply::Network(st) => *st,
            Reply::Error(m) => return Err(BackendError::Conflict(m)),
            Reply::Stopping => return Err(BackendError::NotFound("the sandbox is ending".into())),
            Reply::Live(_) | Reply::Lifetime { .. } => {
                return Err(BackendError::Internal(
                    "the keeper answered a network update with its state".into(),
                ))
            }
        };
        if let Ok(mut r) = e.record.lock() {
            r.allow_internet_access = update.allow_internet_access;
            r.allow_out = update.allow_out.clone();
            r.deny_out = update.deny_out.clone();
        }
        let closed = state.update.map(|u| u.closed).unwrap_or_default();
        let detail = serde_json::json!({
            "mode": state.mode,
            "allowOut": update.allow_out,
            "denyOut": update.deny_out,
            "allow_internet_access": update.allow_internet_access,
            "rules": state.rules,
            "closed": closed,
        });
        self.audit(
            crate::audit::kind::NETWORK_UPDATE,
            tenant,
            sandbox_id,
            Some(detail.to_string()),
        )
        .await;
        Ok(())
    }

    async fn metrics(
        &self,
        tenant: &TenantId,
        sandbox_id: &str,
    ) -> BackendResult<Vec<SandboxMetric>> {
        if let Some(e) = self.engine_found(tenant, sandbox_id).await {
            return self.engine_metrics(&e).await;
        }
        let e = self.entry(tenant, sandbox_id)?;
        let live = self.ask(&e, Request::Inspect).await?;
        let now = SystemTime::now();
        let (cpu_count, mem_total) = match e.record.lock() {
            Ok(r) => (r.cpu_count, u64::from(r.memory_mb) << 20),
            Err(_) => (1, 0),
        };
        let cpu_ms = live.cpu_used_ms.unwrap_or(0.0);
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
            mem_used: live.memory_bytes.unwrap_or(0),
            mem_total,
            mem_cache: 0,
            disk_used: 0,
            disk_total: 0,
        }])
    }

    async fn envd_access(&self, sandbox_id: &str) -> BackendResult<EnvdAccess> {
        if let Some(e) = self.engine_any_found(sandbox_id).await {
            let r = e
                .record
                .lock()
                .map_err(|_| BackendError::Internal("lock".into()))?;
            return Ok(EnvdAccess {
                tenant: TenantId(r.tenant.clone()),
                access_token: r.token.clone(),
                state: SandboxState::Running,
            });
        }
        let e = self
            .sandboxes
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| BackendError::NotFound(format!("sandbox \"{sandbox_id}\" not found")))?;
        let r = e
            .record
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?;
        Ok(EnvdAccess {
            tenant: TenantId(r.tenant.clone()),
            access_token: r.token.clone(),
            state: if e.paused.lock().is_ok_and(|p| *p) {
                SandboxState::Paused
            } else {
                SandboxState::Running
            },
        })
    }

    async fn refresh_metrics(&self, metrics: &Metrics) {
        let all: Vec<Arc<Entry>> = match self.sandboxes.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return,
        };
        let paused = all
            .iter()
            .filter(|e| e.paused.lock().is_ok_and(|p| *p))
            .count() as u64;
        let engines = self.all_engines().len() as u64;
        metrics.set_sandboxes(all.len() as u64 - paused + engines, paused);
    }

    async fn start_process(
        &self,
        scope: &SandboxScope,
        req: StartProcess,
    ) -> BackendResult<ProcessHandle> {
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            return self.engine_start_process(&e, scope, req).await;
        }
        if req.pty.is_some() {
            return Err(BackendError::Unimplemented(
                "PTY sessions are not supported by nanoclaw yet".into(),
            ));
        }
        let e = self.running(scope)?;
        let mut spec = ExecSpec::new(
            std::iter::once(req.config.cmd.clone()).chain(req.config.args.iter().cloned()),
        );
        spec.env = e
            .record
            .lock()
            .map(|r| r.env_vars.clone().into_iter().collect())
            .unwrap_or_default();
        spec.env
            .extend(req.config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
        spec.user = user_of(scope)?;
        if let Some(u) = spec.user.filter(|u| u.uid == 0) {
            spec.user = Some(u);
            spec.env.push(("HOME".into(), "/root".into()));
        }
        spec.workdir = req.config.cwd.as_ref().map(PathBuf::from);
        let (conn, spawned) = ipc::spawn(&e.remote, &spec, req.stdin)
            .await
            .map_err(keeper_error)?;
        let weak = Arc::downgrade(&e);
        let hook = self.cfg.audit.clone().map(|a| {
            let mut rec = crate::audit::Record::new(crate::audit::kind::EXEC);
            rec.tenant = Some(scope.tenant.0.clone());
            rec.sandbox = Some(scope.sandbox_id.clone());
            rec.argv = Some(
                std::iter::once(req.config.cmd.clone())
                    .chain(req.config.args.iter().cloned())
                    .collect(),
            );
            rec.detail = scope.user.as_ref().map(|u| format!("user {u}"));
            (a, rec)
        });
        let metrics = self.metrics.get().cloned();
        let egress = egress::EgressHook {
            source: egress::Source::Keeper(e.remote.clone()),
            tenant: scope.tenant.0.clone(),
            sandbox: scope.sandbox_id.clone(),
            audit: self.cfg.audit.clone(),
            metrics: metrics.clone(),
            seen: e.denials_seen.clone(),
        };
        let started = Instant::now();
        let (proc, handle) = Proc::start(
            conn,
            spawned,
            req.config,
            req.tag,
            req.timeout,
            process::EndHooks {
                audit: hook,
                egress: Some(egress),
            },
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

    async fn connect_process(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
    ) -> BackendResult<ProcessHandle> {
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            let p = engines::engine_proc(&e, selector)?;
            return Ok(ProcessHandle {
                pid: p.pid,
                events: p.listen(),
            });
        }
        let e = self.running(scope)?;
        let p = Self::proc_of(&e, selector)?;
        Ok(ProcessHandle {
            pid: p.pid,
            events: p.listen(),
        })
    }

    async fn list_processes(&self, scope: &SandboxScope) -> BackendResult<Vec<ProcessInfo>> {
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            return Ok(engines::engine_procs(&e));
        }
        let e = self.running(scope)?;
        let procs = e
            .procs
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?;
        let mut out: Vec<ProcessInfo> = procs
            .values()
            .map(|p| ProcessInfo {
                pid: p.pid,
                tag: p.tag.clone(),
                config: p.config.clone(),
            })
            .collect();
        out.sort_by_key(|p| p.pid);
        Ok(out)
    }

    async fn send_input(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
        input: ProcessInput,
    ) -> BackendResult<()> {
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            let p = engines::engine_proc(&e, selector)?;
            return match input {
                ProcessInput::Stdin(b) => p.write_stdin(b).await,
                ProcessInput::Pty(_) => Err(BackendError::InvalidArgument(format!(
                    "the {} backend: PTY input is not supported: nanoclaw has no PTYs yet",
                    e.backend
                ))),
            };
        }
        let e = self.running(scope)?;
        let p = Self::proc_of(&e, selector)?;
        match input {
            ProcessInput::Stdin(b) => p.write_stdin(&b).await,
            ProcessInput::Pty(_) => Err(BackendError::Unimplemented(
                "PTY sessions are not supported by nanoclaw yet".into(),
            )),
        }
    }

    async fn close_stdin(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
    ) -> BackendResult<()> {
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            return engines::engine_proc(&e, selector)?.close_stdin().await;
        }
        let e = self.running(scope)?;
        Self::proc_of(&e, selector)?.close_stdin().await;
        Ok(())
    }

    async fn send_signal(
        &self,
        scope: &SandboxScope,
        selector: &ProcessSelector,
        signal: Signal,
    ) -> BackendResult<()> {
        let sig = match signal {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Interrupt => libc::SIGINT,
        };
        if let Some(e) = self.engine_found(&scope.tenant, &scope.sandbox_id).await {
            return engines::engine_proc(&e, selector)?.signal(sig).await;
        }
        let e = self.running(scope)?;
        Self::proc_of(&e, selector)?.signal(sig).await
    }

    async fn stat(&self, scope: &SandboxScope, path: &str) -> BackendResult<EntryInfo> {
        let r = self.runner(scope).await?;
        {
            let res = files::stat(&r, scope, path).await;
            self.audit_file(scope, "stat", &[path], res).await
        }
    }

    async fn list_dir(
        &self,
        scope: &SandboxScope,
        path: &str,
        depth: u32,
    ) -> BackendResult<Vec<EntryInfo>> {
        let r = self.runner(scope).await?;
        {
            let res = files::list_dir(&r, scope, path, depth).await;
            self.audit_file(scope, "list", &[path], res).await
        }
    }

    async fn make_dir(&self, scope: &SandboxScope, path: &str) -> BackendResult<EntryInfo> {
        let r = self.runner(scope).await?;
        {
            let res = files::make_dir(&r, scope, path).await;
            self.audit_file(scope, "mkdir", &[path], res).await
        }
    }

    async fn rename(
        &self,
        scope: &SandboxScope,
        source: &str,
        destination: &str,
    ) -> BackendResult<EntryInfo> {
        let r = self.runner(scope).await?;
        {
            let res = files::rename(&r, scope, source, destination).await;
            self.audit_file(scope, "move", &[source, destination], res)
                .await
        }
    }

    async fn remove(&self, scope: &SandboxScope, path: &str) -> BackendResult<()> {
        let r = self.runner(scope).await?;
        {
            let res = files::remove(&r, scope, path).await;
            self.audit_file(scope, "remove", &[path], res).await
        }
    }

    async fn read_file(&self, scope: &SandboxScope, path: &str) -> BackendResult<FileDownload> {
        let r = self.runner(scope).await?;
        {
            let res = files::read_file(&r, scope, path).await;
            self.audit_file(scope, "read", &[path], res).await
        }
    }

    async fn write_file(
        &self,
        scope: &SandboxScope,
        path: &str,
        metadata: &BTreeMap<String, String>,
        body: ByteStream,
    ) -> BackendResult<EntryInfo> {
        let r = self.runner(scope).await?;
        if !metadata.is_empty() {
            return Err(BackendError::Unimplemented(
                "file metadata (X-Metadata-*) is not supported by nanoclaw yet".into(),
            ));
        }
        {
            let res = files::write_file(&r, scope, path, body).await;
            self.audit_file(scope, "write", &[path], res).await
        }
    }

    async fn watch_dir(
        &self,
        scope: &SandboxScope,
        spec: WatchSpec,
    ) -> BackendResult<tokio::sync::mpsc::Receiver<FsEvent>> {
        let r = self.runner(scope).await?;
        files::watch_dir(&r, scope, spec).await
    }
}

/// What a sandbox of `spec` counts against its tenant's quotas.
fn share_of(spec: &SandboxSpec) -> Share {
    Share {
        sandboxes: 1,
        memory_mb: spec
            .limits
            .memory
            .unwrap_or(nanoclaw_sandbox::spec::DEFAULT_MEMORY)
            >> 20,
        cpus: spec
            .limits
            .cpus
            .unwrap_or(nanoclaw_sandbox::spec::DEFAULT_CPUS)
            .ceil()
            .max(1.0),
    }
}

/// The argv of a one-shot run: `command`, or `code` run by `lang`.
fn run_argv(req: &RunRequest) -> BackendResult<Vec<String>> {
    match (&req.lang, &req.code, req.command.is_empty()) {
        (None, None, false) => Ok(req.command.clone()),
        (Some(lang), Some(code), true) => {
            let (interp, flag) = match lang.as_str() {
                "python" => ("python3", "-c"),
                "node" => ("node", "-e"),
                "bash" => ("bash", "-c"),
                "sh" => ("sh", "-c"),
                other => {
                    return Err(BackendError::InvalidArgument(format!(
                        "lang {other:?}: use python, node, bash or sh"
                    )))
                }
            };
            Ok(vec![interp.into(), flag.into(), code.clone()])
        }
        _ => Err(BackendError::InvalidArgument(
            "give either \"command\" (argv) or \"lang\" and \"code\"".into(),
        )),
    }
}

/// Where the keepers of the daemon whose data folder is `data` keep their
/// state: beside the CLI's, one folder per data folder
/// (`…/nanoclaw/serve/<hash of the data folder>`, 0700), so two daemons
/// never see (or re-adopt) each other's sandboxes.
pub fn default_root(data: &Path) -> Result<PathBuf, KeeperError> {
    use sha2::Digest;
    let cli = keeper::state_root()?;
    let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    let digest = sha2::Sha256::digest(data.as_os_str().as_encoded_bytes());
    let base = cli
        .parent()
        .unwrap_or(&cli)
        .join("serve")
        .join(&hex::encode(digest)[..16]);
    // SAFETY: geteuid cannot fail.
    keeper::own_dir(&base, unsafe { libc::geteuid() })?;
    Ok(base)
}
