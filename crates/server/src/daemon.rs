//! The daemon as `nanoclaw serve` runs it: the data folder (tenants and
//! their keys, the audit log), the keeper backend (re-adopting what a
//! previous daemon left alive), and the listeners.

use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::{AuthError, Authenticator, TenantId};
use crate::keepers::{self, KeeperBackend, KeeperBackendConfig};
use crate::listen::{serve, ListenAddr, ServeOptions};
use crate::tenants::Tenants;
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
    /// The keepers' state directory.
    #[error(transparent)]
    Keeper(#[from] nanoclaw_sandbox::keeper::KeeperError),
    /// Serving.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// A bad option.
    #[error("{0}")]
    Config(String),
}

/// API keys checked against the tenants table.
pub struct TenantKeys {
    tenants: Arc<Tenants>,
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

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    let data = crate::db::data_dir(cfg.data.as_deref())?;
    let tenants = Arc::new(Tenants::open(&crate::db::db_path(&data))?);
    let _lock = lock_data(&data)?;
    let root = keepers::default_root(&data)?;
    let backend = KeeperBackend::new(KeeperBackendConfig {
        exe: cfg.exe.clone(),
        root,
        templates: Default::default(),
        tenants: Some(tenants.clone()),
        pools: cfg.pools.clone(),
        audit: Some(crate::audit::Audit::open(&crate::db::db_path(&data))?),
    });
    if let Some(t) = backend.unknown_pools().first() {
        return Err(DaemonError::Config(format!(
            "--pool {t}=N: there is no template {t:?} (known: base)"
        )));
    }
    let (adopted, removed) = backend.adopt();
    if adopted + removed > 0 {
        eprintln!(
            "nanoclaw serve: re-adopted {adopted} sandboxes, removed {removed} without a record"
        );
    }
    backend.spawn_reaper();
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
    if let Some(v) = cfg.envd_version {
        opts.envd_version = v;
    }
    let auth = Arc::new(TenantKeys { tenants });
    let r = serve(listen, backend.clone(), auth, opts).await;
    let b = backend.clone();
    let _ = tokio::task::spawn_blocking(move || b.drain_pools()).await;
    r?;
    Ok(())
}
