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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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

/// The ready sandboxes.
#[derive(Default)]
pub(super) struct Pool {
    /// Wanted size per template.
    pub target: HashMap<String, usize>,
    ready: Mutex<HashMap<String, Vec<Remote>>>,
    refill: Arc<Notify>,
}

impl Pool {
    pub(super) fn new(target: HashMap<String, usize>) -> Pool {
        Pool {
            target,
            ready: Mutex::new(HashMap::new()),
            refill: Arc::new(Notify::new()),
        }
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
            let have = ready
                .get(t)
                .map_or(0, |v| v.iter().filter(|r| r.is_up()).count());
            (have < *n).then(|| t.clone())
        })
    }

    fn put(&self, template: &str, r: Remote) {
        if let Ok(mut ready) = self.ready.lock() {
            let v = ready.entry(template.to_string()).or_default();
            v.retain(|r| r.is_up());
            v.push(r);
        }
    }

    /// How many are ready, per template.
    pub(super) fn sizes(&self) -> HashMap<String, usize> {
        self.ready
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.len())).collect())
            .unwrap_or_default()
    }

    /// Ends every pooled sandbox (daemon shutdown).
    pub(super) fn drain(&self) -> Vec<Remote> {
        self.ready
            .lock()
            .map(|mut m| m.drain().flat_map(|(_, v)| v).collect())
            .unwrap_or_default()
    }
}

/// Keeps the pools full while the backend lives.
pub(super) fn spawn_refiller(backend: Weak<KeeperBackend>) {
    tokio::spawn(async move {
        loop {
            let Some(b) = backend.upgrade() else { return };
            match b.pool.missing() {
                Some(t) => {
                    if let Err(e) = fill_one(&b, &t).await {
                        eprintln!("nanoclaw serve: warm pool {t}: {e}");
                        drop(b);
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
                None => {
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

async fn fill_one(b: &Arc<KeeperBackend>, template: &str) -> Result<(), String> {
    let tpl = b
        .cfg
        .templates
        .get(template)
        .ok_or_else(|| format!("no template {template:?}"))?;
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
    b.pool.put(template, Remote::new(&id, &dir));
    Ok(())
}
