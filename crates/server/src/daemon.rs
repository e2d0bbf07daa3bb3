//! The daemon as `nanoclaw serve` runs it: the data folder (tenants and
//! their keys, the audit log, agents and their approvals), the keeper
//! backend (re-adopting what a previous daemon left alive), agent runs
//! (child processes, [`crate::agents`]), and the listeners.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::agents::{Agents, AgentsConfig, RunLimits};
use crate::audit::Audit;
use crate::auth::{AuthError, Authenticator, TenantId, TenantLimits};
use crate::keepers::{self, KeeperBackend, KeeperBackendConfig};
use crate::listen::{serve, ListenAddr, ServeOptions};
use crate::metrics::Metrics;
use crate::tenants::{Quotas, TenantError, Tenants};
use crate::ServeError;

/// What `nanoclaw serve` was asked for.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where to listen (default: [`default_socket`]).
    pub listen: Vec<ListenAddr>,
    /// The data folder (default: `db::data_dir(None)`).
    pub data: Option<PathBuf>,
    /// nanoclaw's own binary (keepers are started from it).
    pub exe: PathBuf,
    /// The `envdVersion` to report, if not the default.
    pub envd_version: Option<String>,
    /// Warm pool size per template.
    pub pools: std::collections::HashMap<String, usize>,
    /// Audit records older than this are pruned (at start, then every
    /// [`retention_every`] of it); `None`: kept until `audit prune`.
    pub audit_retention: Option<Duration>,
    /// The config file agents run with (`POST /v1/execute`); `None`:
    /// agent runs are refused.
    pub config: Option<PathBuf>,
    /// How long an agent's approval request waits for an answer.
    pub approval_timeout: Duration,
    /// How much of the image store tenants' builds may take.
    pub image_disk: crate::images::DiskBounds,
    /// Templates besides `base` and `code-interpreter-v1` (`--template`),
    /// by name; one may name another backend.
    pub templates: HashMap<String, keepers::Template>,
    /// The other backends those templates name, opened (and swept) by the
    /// caller.
    pub engines: keepers::Engines,
}

/// How often retention runs: half the retention, between 1 s and 1 h.
pub fn retention_every(keep: Duration) -> Duration {
    (keep / 2).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Prunes `audit` of records older than `keep` now and then every
/// [`retention_every`], until the runtime ends. A failure is reported and
/// retried at the next round (pruning never loses a record it should keep).
fn spawn_retention(audit: Audit, keep: Duration) {
    tokio::spawn(async move {
        loop {
            let a = audit.clone();
            match tokio::task::spawn_blocking(move || a.prune(keep)).await {
                Ok(Err(e)) => eprintln!("nanoclaw serve: audit retention: {e}"),
                Err(e) => eprintln!("nanoclaw serve: audit retention: {e}"),
                Ok(Ok(_)) => {}
            }
            tokio::time::sleep(retention_every(keep)).await;
        }
    });
}

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The data folder or database.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// The tenants table.
    #[error(transparent)]
    Tenants(#[from] crate::tenants::TenantError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The keepers' state directory.
    #[error(transparent)]
    Keeper(#[from] nanoclaw_sandbox::keeper::KeeperError),
    /// Serving.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A bad option.
    #[error("{0}")]
    Config(String),
}

/// How long [`TenantKeys`] keeps a tenant's limits before reading them
/// again (a `nanoclaw tenant set` takes effect within this time).
pub const LIMITS_TTL: Duration = Duration::from_secs(5);

/// API keys checked against the tenants table; tenants' limits read from
/// it and kept for [`LIMITS_TTL`].
pub struct TenantKeys {
    tenants: Arc<Tenants>,
    limits: Mutex<HashMap<TenantId, (Instant, TenantLimits)>>,
    ttl: Duration,
}

impl TenantKeys {
    /// Keys and limits from `tenants` (limits kept for [`LIMITS_TTL`]).
    pub fn new(tenants: Arc<Tenants>) -> Self {
        Self::with_ttl(tenants, LIMITS_TTL)
    }

    /// Keys and limits from `tenants`, limits kept for `ttl`.
    pub fn with_ttl(tenants: Arc<Tenants>, ttl: Duration) -> Self {
        TenantKeys {
            tenants,
            limits: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn cached(&self) -> MutexGuard<'_, HashMap<TenantId, (Instant, TenantLimits)>> {
        // Plain values: a panic elsewhere cannot leave them inconsistent.
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Authenticator for TenantKeys {
    async fn authenticate(&self, api_key: &str) -> Result<Option<TenantId>, AuthError> {
        let (t, key) = (self.tenants.clone(), api_key.to_string());
        tokio::task::spawn_blocking(move || t.authenticate(&key))
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .map(|o| o.map(|t| TenantId(t.name)))
            .map_err(|e| AuthError::Unavailable(e.to_string()))
    }

    async fn has_keys(&self) -> Result<bool, AuthError> {
        let t = self.tenants.clone();
        tokio::task::spawn_blocking(move || t.list())
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .map(|all| all.iter().any(|t| !t.keys.is_empty()))
            .map_err(|e| AuthError::Unavailable(e.to_string()))
    }

    /// The tenant's rate from the tenants table (a tenant removed since
    /// — the owner of a sandbox that outlived it — gets the defaults).
    async fn limits(&self, tenant: &TenantId) -> Result<TenantLimits, AuthError> {
        let now = Instant::now();
        if let Some((at, limits)) = self.cached().get(tenant) {
            if now.saturating_duration_since(*at) < self.ttl {
                return Ok(*limits);
            }
        }
        let (t, name) = (self.tenants.clone(), tenant.0.clone());
        let found = tokio::task::spawn_blocking(move || t.get(&name))
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let limits = match found {
            Ok(t) => t.limits,
            Err(TenantError::NotFound(_)) => Quotas::default().limits(),
            Err(e) => return Err(AuthError::Unavailable(e.to_string())),
        };
        let limits = TenantLimits {
            rate_per_s: Some(limits.rate_per_s),
        };
        self.cached().insert(tenant.clone(), (now, limits));
        Ok(limits)
    }
}

/// The default socket: `/run/nanoclaw/nanoclaw.sock` as root, else
/// `$XDG_RUNTIME_DIR/nanoclaw/nanoclaw.sock` (or `/tmp/nanoclaw-UID/…`).
pub fn default_socket() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/nanoclaw/nanoclaw.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        Some(x) => PathBuf::from(x).join("nanoclaw/nanoclaw.sock"),
        None => PathBuf::from(format!("/tmp/nanoclaw-{uid}/nanoclaw.sock")),
    }
}

/// The tenant of unix-socket callers that send no API key: [`LOCAL_TENANT`],
/// made (with default quotas and a key nobody is shown) when missing. The
/// socket's mode (0660, group `nanoclaw`, or a private directory) is what
/// admits them, as with Docker's socket. `None` (keyless callers refused)
/// when the name was retired by `tenant rm local` or the table fails.
fn local_tenant(tenants: &Tenants) -> Option<TenantId> {
    let ok = match tenants.get(LOCAL_TENANT) {
        Ok(_) => true,
        Err(TenantError::NotFound(_)) => match tenants.add(LOCAL_TENANT, Quotas::default()) {
            Ok(_) => true,
            Err(TenantError::Duplicate(_)) => true,
            Err(e) => {
                eprintln!("nanoclaw serve: unix-socket callers need an API key: {e}");
                false
            }
        },
        Err(e) => {
            eprintln!("nanoclaw serve: unix-socket callers need an API key: {e}");
            false
        }
    };
    ok.then(|| TenantId::from(LOCAL_TENANT))
}

/// The tenant unix-socket callers without an API key act as.
pub const LOCAL_TENANT: &str = "local";

/// One daemon per data folder: an exclusive lock on `DATA/serve.lock`,
/// held while the returned file is open.
fn lock_data(data: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let path = data.join("serve.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DaemonError::Config(format!("{}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DaemonError::Config(format!(
            "another nanoclaw serve uses the data folder {} (stop it, or give this one another --data)",
            data.display()
        )));
    }
    Ok(f)
}

/// The registered images, each made a template of its tenant again (one
/// whose image left the store is reported and skipped).
fn restore_images(
    exe: &std::path::Path,
    data: &std::path::Path,
    backend: &KeeperBackend,
    bounds: crate::images::DiskBounds,
) -> Arc<crate::images::Images> {
    use crate::backend::Backend;
    let images = crate::images::Images::open(exe.to_path_buf(), data.to_path_buf(), bounds);
    for (tenant, entry) in images.all() {
        let r = crate::images::Images::template_of(&entry).and_then(|t| {
            backend
                .register_image(&tenant, &entry.name, t)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = r {
            eprintln!(
                "nanoclaw serve: image {} of tenant {tenant} is not usable: {e}",
                entry.name
            );
        }
    }
    Arc::new(images)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    let data = crate::db::data_dir(cfg.data.as_deref())?;
    let db = crate::db::db_path(&data);
    let tenants = Arc::new(Tenants::open(&db)?);
    let _lock = lock_data(&data)?;
    // Its own connection: appends wait on their fsync without holding the
    // tenants' connection.
    let audit = Audit::from_connection(crate::db::open_again(&db)?);
    let metrics = Arc::new(Metrics::new());
    let root = keepers::default_root(&data)?;
    for (name, t) in &cfg.templates {
        keepers::check_template(name, t, &cfg.engines).map_err(DaemonError::Config)?;
        if t.backend.as_deref() == Some(nanoclaw_kubernetes::NAME) && cfg.pools.contains_key(name) {
            return Err(DaemonError::Config(format!(
                "--pool {name}=N: template {name} runs on the kubernetes backend, whose sandboxes \
                 every replica shares; the daemon keeps warm pools of native, docker, gvisor and \
                 microvm templates only (drop --pool {name}=N)"
            )));
        }
    }
    let backend = KeeperBackend::new(KeeperBackendConfig {
        exe: cfg.exe.clone(),
        root,
        templates: cfg.templates.clone(),
        engines: cfg.engines.clone(),
        tenants: Some(tenants.clone()),
        pools: cfg.pools.clone(),
        audit: Some(audit.clone()),
        upstream_ca: std::env::var_os("NANOCLAW_UPSTREAM_CA").map(PathBuf::from),
    });
    if let Some(t) = backend.unknown_pools().first() {
        return Err(DaemonError::Config(format!(
            "--pool {t}=N: there is no template {t:?} (known: base)"
        )));
    }
    backend.set_metrics(Arc::clone(&metrics));
    let (adopted, removed) = backend.adopt();
    if adopted + removed > 0 {
        eprintln!(
            "nanoclaw serve: re-adopted {adopted} sandboxes, removed {removed} without a record"
        );
    }
    backend.spawn_reaper();
    if let Some(keep) = cfg.audit_retention {
        spawn_retention(audit.clone(), keep);
    }
    backend.spawn_pools();
    let mut listen = cfg.listen.clone();
    if listen.is_empty() {
        let sock = default_socket();
        if let Some(dir) = sock.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        listen.push(ListenAddr::Unix(sock));
    }
    let mut opts = ServeOptions::default();
    if listen.iter().any(|l| matches!(l, ListenAddr::Unix(_))) {
        opts.unix_tenant = local_tenant(&tenants);
    }
    if let Some(v) = cfg.envd_version {
        opts.envd_version = v;
    }
    opts.audit = Some(audit);
    opts.metrics = metrics;
    let store = nanoclaw_agent::store::Store::new(crate::db::open_again(&db)?);
    opts.agents = Some(Arc::new(Agents::new(
        AgentsConfig {
            exe: cfg.exe.clone(),
            data: data.clone(),
            config: cfg.config.clone(),
            approval_timeout: cfg.approval_timeout,
            limits: RunLimits::default(),
        },
        store,
    )));
    opts.images = Some(restore_images(&cfg.exe, &data, &backend, cfg.image_disk));
    let auth = Arc::new(TenantKeys::new(tenants));
    // Where this daemon listens, for clients given only the data folder
    // (`nanoclaw mcp --data DIR`); removed when it stops.
    let listed = data.join("serve.listen");
    let lines: Vec<String> = listen
        .iter()
        .map(|l| match l {
            ListenAddr::Unix(p) => {
                let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
                format!("unix:{}", p.display())
            }
            ListenAddr::Tcp(a) => format!("tcp:{a}"),
        })
        .collect();
    let _ = std::fs::write(&listed, lines.join("\n") + "\n");
    let r = serve(listen, backend.clone(), auth, opts).await;
    let _ = std::fs::remove_file(&listed);
    let b = backend.clone();
    let _ = tokio::task::spawn_blocking(move || {
        b.end_engines();
        b.drain_pools();
        b.remove_root_if_empty(std::time::Duration::from_secs(2));
    })
    .await;
    r?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::{Change, QuotaChanges};

    #[test]
    fn unix_socket_callers_are_the_local_tenant_unless_its_name_was_retired() {
        let dir =
            std::env::temp_dir().join(format!("nanoclaw-daemon-local-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tenants = Tenants::open(&dir.join("nanoclaw.db")).unwrap();
        let local = Some(TenantId::from(LOCAL_TENANT));
        assert_eq!(local_tenant(&tenants), local);
        // Made once, then found.
        assert_eq!(local_tenant(&tenants), local);
        assert_eq!(tenants.list().unwrap().len(), 1);
        // `tenant rm local`: keyless callers are refused again.
        tenants.remove(LOCAL_TENANT).unwrap();
        assert_eq!(local_tenant(&tenants), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn tenant_limits_come_from_the_table_and_are_kept_for_a_while() {
        let dir = std::env::temp_dir().join(format!("nanoclaw-daemon-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tenants = Arc::new(Tenants::open(&dir.join("nanoclaw.db")).unwrap());
        let quotas = Quotas {
            rate_per_s: Some(3.0),
            ..Quotas::default()
        };
        let (_, key) = tenants.add("acme", quotas).unwrap();
        let keys = TenantKeys::with_ttl(tenants.clone(), Duration::from_millis(300));
        let acme = keys.authenticate(key.as_str()).await.unwrap().unwrap();
        assert_eq!(keys.limits(&acme).await.unwrap().rate_per_s, Some(3.0));
        let set = QuotaChanges {
            rate_per_s: Change::Set(7.0),
            ..QuotaChanges::default()
        };
        tenants.set("acme", &set).unwrap();
        // Kept: the table is not read on every request.
        assert_eq!(keys.limits(&acme).await.unwrap().rate_per_s, Some(3.0));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(keys.limits(&acme).await.unwrap().rate_per_s, Some(7.0));
        // A tenant that is gone (a sandbox's owner) gets the defaults.
        let gone = keys.limits(&TenantId::from("gone")).await.unwrap();
        assert_eq!(gone.rate_per_s, Some(crate::tenants::DEFAULT_RATE_PER_S));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
