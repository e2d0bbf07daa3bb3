//! Warm pools (seed 000's 容器预热, `pool_size`): per template, that many
//! sandboxes created ahead, idle, owned by no tenant, handed out on
//! create and refilled in the background, one at a time (so a refill
//! never takes both cores from the requests being served).
//!
//! A pooled sandbox is built with the template's spec and E2B's default
//! network (internet through the proxy). A request that changes what it
//! was built with (another network policy) gets a cold one; environment
//! variables do not matter (every command gets them at its start).
//! Pooled sandboxes have no record on disk: a restarted daemon ends them.
//!
//! A template of another backend (`docker`, `gvisor`, `microvm`) is
//! pooled the same way, with that backend's sandboxes ([`PooledEngine`]):
//! what a cold create of it costs (a container, a `runsc` sandbox, a VM's
//! boot: seconds under software emulation) is paid ahead. Such a sandbox's
//! lifetime in its backend is fixed when it is made, so it is made long
//! enough to be kept [`POOLED_LIFETIME`] and then given the longest a
//! tenant may keep a sandbox without quotas; one whose remaining lifetime
//! no longer covers a request is ended, not handed out. Whether one is
//! still alive is asked every [`ENGINE_CHECK_EVERY`] (an API call or a
//! `runsc` run each), not at hand-out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nanoclaw_sandbox::backend::LiveSandbox;
use nanoclaw_sandbox::keeper::{self, KeeperConfig, Remote};
use tokio::sync::Notify;

use super::{blocking, keeper_error, KeeperBackend};

/// How long a pooled sandbox waits to be used.
pub(super) const POOLED_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Most pooled sandboxes per template.
pub const MAX_POOL: usize = 256;
/// How long the refiller waits after a hand-out before starting a new
/// keeper: starting one (a process, namespaces, a cgroup) takes the cores
/// for milliseconds, which would land on the create's answer and its first
/// commands on a small machine. A burst of creates still drains the pool;
/// it refills once they pause.
const REFILL_AFTER_TAKE: Duration = Duration::from_millis(100);
/// How often the refiller asks the backend whether each pooled sandbox of
/// another backend is still there.
const ENGINE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// A pooled sandbox of another backend.
pub(super) struct PooledEngine {
    pub sandbox: Arc<dyn LiveSandbox>,
    /// The backend's name (its network is that backend's default for an
    /// E2B create: `engines::pooled_network`).
    pub backend: String,
    /// When its backend ends it, ms since the epoch.
    pub lifetime_end_ms: u64,
}

/// The ready sandboxes.
#[derive(Default)]
pub(super) struct Pool {
    /// Wanted size per template.
    pub target: HashMap<String, usize>,
    ready: Mutex<HashMap<String, Vec<Remote>>>,
    engines: Mutex<HashMap<String, Vec<PooledEngine>>>,
    refill: Arc<Notify>,
    /// Set by [`Pool::drain`]: the daemon is stopping; nothing more is
    /// made or kept (a sandbox a refill finishes after that is ended, not
    /// left behind).
    closed: AtomicBool,
    /// Refiller rounds under way (0 or 1: one at a time).
    filling: AtomicUsize,
}

/// A refill under way, until dropped.
struct Filling<'a>(&'a AtomicUsize);

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    pub(super) fn new(target: HashMap<String, usize>) -> Pool {
        Pool {
            target,
            ready: Mutex::new(HashMap::new()),
            engines: Mutex::new(HashMap::new()),
            refill: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            filling: AtomicUsize::new(0),
        }
    }

    /// A pooled sandbox of another backend whose lifetime lasts until
    /// `needed_ms` at least, and those found that no longer last that long
    /// (the caller ends them).
    pub(super) fn take_engine(
        &self,
        template: &str,
        needed_ms: u64,
    ) -> (Option<PooledEngine>, Vec<PooledEngine>) {
        let (mut got, mut stale) = (None, Vec::new());
        if let Ok(mut all) = self.engines.lock() {
            if let Some(v) = all.get_mut(template) {
                while let Some(p) = v.pop() {
                    if p.lifetime_end_ms < needed_ms {
                        stale.push(p);
                    } else {
                        got = Some(p);
                        break;
                    }
                }
            }
        }
        self.refill.notify_one();
        (got, stale)
    }

    /// Keeps `p` ready; gives it back once the pool is closed (the caller
    /// ends it).
    fn put_engine(&self, template: &str, p: PooledEngine) -> Option<PooledEngine> {
        match self.engines.lock() {
            // Checked under the lock `drain` takes after closing.
            Ok(mut all) if !self.closed.load(Ordering::SeqCst) => {
                all.entry(template.to_string()).or_default().push(p);
                None
            }
            _ => Some(p),
        }
    }

    /// Takes out the pooled sandboxes of other backends for which `gone`
    /// says so.
    fn take_engines(&self, gone: &dyn Fn(&PooledEngine) -> bool) -> Vec<PooledEngine> {
        let mut out = Vec::new();
        if let Ok(mut all) = self.engines.lock() {
            for v in all.values_mut() {
                let (dead, live): (Vec<_>, Vec<_>) = v.drain(..).partition(|p| gone(p));
                *v = live;
                out.extend(dead);
            }
        }
        out
    }

    /// The pooled sandboxes of other backends now.
    fn engine_handles(&self) -> Vec<Arc<dyn LiveSandbox>> {
        self.engines
            .lock()
            .map(|m| m.values().flatten().map(|p| p.sandbox.clone()).collect())
            .unwrap_or_default()
    }

    /// A ready sandbox of `template`, if there is one alive.
    pub(super) fn take(&self, template: &str) -> Option<Remote> {
        let got = {
            let mut ready = self.ready.lock().ok()?;
            let v = ready.get_mut(template)?;
            let mut got = None;
            while let Some(r) = v.pop() {
                if r.is_up() {
                    got = Some(r);
                    break;
                }
            }
            got
        };
        self.refill.notify_one();
        got
    }

    fn missing(&self) -> Option<String> {
        let ready = self.ready.lock().ok()?;
        self.target.iter().find_map(|(t, n)| {
            let native = ready
                .get(t)
                .map_or(0, |v| v.iter().filter(|r| r.is_up()).count());
            let engines = self
                .engines
                .lock()
                .map_or(0, |m| m.get(t).map_or(0, Vec::len));
            (native + engines < *n).then(|| t.clone())
        })
    }

    /// Keeps `r` ready; gives it back once the pool is closed (the caller
    /// stops it).
    fn put(&self, template: &str, r: Remote) -> Result<(), Remote> {
        match self.ready.lock() {
            // Checked under the lock `drain` takes after closing.
            Ok(mut ready) if !self.closed.load(Ordering::SeqCst) => {
                let v = ready.entry(template.to_string()).or_default();
                v.retain(|r| r.is_up());
                v.push(r);
                Ok(())
            }
            _ => Err(r),
        }
    }

    /// How many are ready, per template (every pooled template named,
    /// empty ones with 0).
    pub(super) fn sizes(&self) -> HashMap<String, usize> {
        let mut out: HashMap<String, usize> = self.target.keys().map(|t| (t.clone(), 0)).collect();
        if let Ok(m) = self.ready.lock() {
            for (k, v) in m.iter() {
                *out.entry(k.clone()).or_default() += v.len();
            }
        }
        if let Ok(m) = self.engines.lock() {
            for (k, v) in m.iter() {
                *out.entry(k.clone()).or_default() += v.len();
            }
        }
        out
    }

    /// Whether a refill is under way (after [`Pool::drain`], the daemon
    /// waits for it: what it makes is then ended by the refill itself).
    pub(super) fn filling(&self) -> bool {
        self.filling.load(Ordering::SeqCst) > 0
    }

    /// Closes the pool (daemon shutdown: no more refills) and takes every
    /// pooled sandbox out: the keepers and the other backends' sandboxes,
    /// for the caller to end.
    pub(super) fn drain(&self) -> (Vec<Remote>, Vec<PooledEngine>) {
        self.closed.store(true, Ordering::SeqCst);
        self.refill.notify_one();
        let keepers = self
            .ready
            .lock()
            .map(|mut m| m.drain().flat_map(|(_, v)| v).collect())
            .unwrap_or_default();
        let engines = self
            .engines
            .lock()
            .map(|mut m| m.drain().flat_map(|(_, v)| v).collect())
            .unwrap_or_default();
        (keepers, engines)
    }
}

/// Keeps the pools full while the backend lives.
pub(super) fn spawn_refiller(backend: Weak<KeeperBackend>) {
    tokio::spawn(async move {
        let mut checked = tokio::time::Instant::now();
        loop {
            let Some(b) = backend.upgrade() else { return };
            // Counted before `closed` is read, as `drain` closes before it
            // reads the count: either this round sees the pool closed, or
            // the daemon's stop waits for it.
            b.pool.filling.fetch_add(1, Ordering::SeqCst);
            let busy = Filling(&b.pool.filling);
            if b.pool.closed.load(Ordering::SeqCst) {
                return;
            }
            if checked.elapsed() >= ENGINE_CHECK_EVERY {
                check_engines(&b).await;
                checked = tokio::time::Instant::now();
            }
            b.report_pool_sizes();
            match b.pool.missing() {
                Some(t) => {
                    let r = fill_one(&b, &t).await;
                    drop(busy);
                    if let Err(e) = r {
                        eprintln!("nanoclaw serve: warm pool {t}: {e}");
                        drop(b);
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
                None => {
                    drop(busy);
                    let refill = b.pool.refill.clone();
                    drop(b);
                    tokio::select! {
                        _ = refill.notified() => {
                            // Let the hand-out and its first commands run.
                            tokio::time::sleep(REFILL_AFTER_TAKE).await;
                        }
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        }
    });
}

/// Takes the pooled sandboxes of other backends that are gone (a VM that
/// crashed, a container removed by hand) out of the pool, and destroys
/// what is left of them (idempotent: a backend that answered "not found"
/// by mistake, under load, must not leak a live one).
async fn check_engines(b: &Arc<KeeperBackend>) {
    let handles = b.pool.engine_handles();
    if handles.is_empty() {
        return;
    }
    let gone: Vec<String> = tokio::task::spawn_blocking(move || {
        handles
            .iter()
            .filter(|s| matches!(s.stats(), Err(nanoclaw_sandbox::Error::NotFound { .. })))
            .map(|s| s.id().to_string())
            .collect()
    })
    .await
    .unwrap_or_default();
    if gone.is_empty() {
        return;
    }
    let out = b
        .pool
        .take_engines(&|p| gone.iter().any(|g| g == p.sandbox.id()));
    eprintln!(
        "nanoclaw serve: {} pooled sandbox(es) ended on their own: {gone:?}",
        out.len()
    );
    let _ = tokio::task::spawn_blocking(move || {
        for p in out {
            let _ = p.sandbox.destroy();
        }
    })
    .await;
}

async fn fill_one(b: &Arc<KeeperBackend>, template: &str) -> Result<(), String> {
    let tpl = b
        .cfg
        .templates
        .get(template)
        .ok_or_else(|| format!("no template {template:?}"))?;
    if let Some(name) = tpl.backend.as_deref().filter(|n| *n != "native") {
        let p = b
            .make_pooled_engine(template, &tpl.spec, name)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(p) = b.pool.put_engine(template, p) {
            // The daemon stopped while it was made.
            let _ = tokio::task::spawn_blocking(move || p.sandbox.destroy()).await;
        }
        return Ok(());
    }
    let mut spec = tpl.spec.clone();
    spec.network = super::default_network();
    spec.limits.timeout = POOLED_LIFETIME;
    let cfg = KeeperConfig {
        spec,
        name: None,
        labels: vec![("pool".into(), template.to_string())],
        lifetime_ms: POOLED_LIFETIME.as_millis() as u64,
        idle_timeout_ms: None,
        exec_timeout_ms: 3_600_000,
        root: b.cfg.root.clone(),
    };
    let exe = b.cfg.exe.clone();
    let id = blocking(move || keeper::start_keeper(&exe, &cfg).map_err(keeper_error))
        .await
        .map_err(|e| e.to_string())?;
    let dir = b.cfg.root.join(&id);
    if let Err(r) = b.pool.put(template, Remote::new(&id, &dir)) {
        // The daemon stopped while it was made.
        let _ = super::ipc::ask(&r, &super::Request::Stop, Duration::from_secs(2)).await;
    }
    Ok(())
}
