//! Warm pools and claims, in agent-sandbox's shape (`SandboxWarmPool`,
//! `SandboxClaim`): a pool keeps a number of ready Pods made from one
//! template; a claim takes one of them (warm) or, when none is ready,
//! makes one (cold); the pool refills itself in the background and never
//! has more Pods than its budget.
//!
//! Where the agent-sandbox CRDs are installed (group
//! `extensions.agents.x-k8s.io`), [`Pool::mode`] says so; nanoclaw still
//! manages plain Pods there, since their controller was not available to
//! test against (Kubernetes 1.20 here has no such CRDs).
//!
//! A claim is safe against other claimants, in this process or in another
//! (several `serve` replicas): it changes the Pod's labels from
//! `nanoclaw.pool-state=warm` to `claimed` with a patch that carries the
//! `resourceVersion` it read, so the API server applies it only if nobody
//! changed the Pod meanwhile (optimistic concurrency, HTTP 409 otherwise),
//! and the loser tries the next Pod. The same patch lowers the Pod's
//! `activeDeadlineSeconds` to the claimant's lifetime and makes the
//! claiming process its owner (for the sweep).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use nanoclaw_sandbox::backend::{LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::Error;

use crate::client::timed;
use crate::pod::{ANN_DEADLINE, ANN_OWNER};
use crate::{api_error, is_status, now_s, running, Kubernetes};

/// Label: the pool a Pod was made for.
pub const LABEL_POOL: &str = "nanoclaw.pool";
/// Label: `warm` (ready, nobody's) or `claimed`.
pub const LABEL_POOL_STATE: &str = "nanoclaw.pool-state";
/// Label: the claim that took the Pod.
pub const LABEL_CLAIM: &str = "nanoclaw.claim";
/// The agent-sandbox CRDs' API group.
pub const AGENT_SANDBOX_GROUP: &str = "extensions.agents.x-k8s.io";

/// How warm Pods are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolMode {
    /// Plain Pods, made, labelled and refilled by nanoclaw (always here).
    PlainPods,
    /// The agent-sandbox CRDs are installed; nanoclaw still manages plain
    /// Pods (see the module's documentation).
    PlainPodsCrdsPresent,
}

/// A pool's size and budget.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The pool's name (a label value: letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// How many warm Pods to keep ready.
    pub size: usize,
    /// The most Pods of this pool (warm, starting and claimed) at once;
    /// neither a refill nor a cold claim goes past it.
    pub budget: usize,
    /// The lifetime of a warm Pod nobody claims (its
    /// `activeDeadlineSeconds`); a claim lowers it to the claimant's.
    pub warm_lifetime: Duration,
}

/// What a claim got.
pub struct Claim {
    /// The sandbox.
    pub sandbox: Box<dyn LiveSandbox>,
    /// It came from the pool ready (false: made for this claim).
    pub warm: bool,
}

/// A warm pool (see the module's documentation). Dropping it stops the
/// refill and deletes its warm Pods; claimed Pods are their claimants'.
pub struct Pool {
    inner: Arc<Inner>,
    refill: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    kube: Kubernetes,
    template: SandboxConfig,
    opts: PoolOptions,
    mode: PoolMode,
    stop: AtomicBool,
    /// Woken by claims (and by drop), so the refill starts at once.
    wake: (Mutex<u64>, Condvar),
}

/// The pool's Pods: (warm and not being deleted, all not being deleted).
fn census(pods: &[Pod]) -> (Vec<&Pod>, usize) {
    let alive: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed") | Some("Succeeded")
            )
        })
        .collect();
    let warm = alive
        .iter()
        .copied()
        .filter(|p| label(p, LABEL_POOL_STATE) == Some("warm"))
        .collect();
    (warm, alive.len())
}

fn label<'a>(p: &'a Pod, k: &str) -> Option<&'a str> {
    p.metadata.labels.as_ref()?.get(k).map(String::as_str)
}

impl Pool {
    /// Starts a pool of `opts.size` warm Pods made from `template` (an
    /// image root, as for [`Kubernetes::create`]).
    pub fn start(
        kube: &Kubernetes,
        template: SandboxConfig,
        opts: PoolOptions,
    ) -> Result<Pool, Error> {
        use nanoclaw_sandbox::backend::Backend;
        kube.check(&template)?;
        if !crate::pod::valid_label_value(&opts.name) || opts.name.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "pool name {:?}: use letters, digits, '-', '_' and '.' (63 at most)",
                opts.name
            )));
        }
        if opts.budget < opts.size {
            return Err(Error::InvalidSpec(format!(
                "pool {}: its budget ({}) is below its size ({})",
                opts.name, opts.budget, opts.size
            )));
        }
        let mode = if kube.has_api_group(AGENT_SANDBOX_GROUP) {
            PoolMode::PlainPodsCrdsPresent
        } else {
            PoolMode::PlainPods
        };
        let inner = Arc::new(Inner {
            kube: kube.clone(),
            template,
            opts,
            mode,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(0), Condvar::new()),
        });
        let bg = inner.clone();
        let refill = std::thread::Builder::new()
            .name("nanoclaw-k8s-pool".into())
            .spawn(move || bg.refill_loop())
            .map_err(|e| Error::Sys {
                call: "starting the pool's refill thread".into(),
                source: e,
            })?;
        Ok(Pool {
            inner,
            refill: Some(refill),
        })
    }

    /// How the pool keeps its Pods.
    pub fn mode(&self) -> PoolMode {
        self.inner.mode.clone()
    }

    /// The pool's Pods now: (warm and running, all of them alive).
    pub fn counts(&self) -> Result<(usize, usize), Error> {
        let pods = self.inner.pods()?;
        let (warm, all) = census(&pods);
        Ok((warm.iter().filter(|p| running(p)).count(), all))
    }

    /// Takes a warm Pod, or makes one when none is ready (within the
    /// budget). `labels` are the claimant's (tenant, agent, ...), kept in
    /// the Pod's annotation as for any sandbox; `lifetime` bounds it from
    /// now on.
    pub fn claim(&self, lifetime: Duration) -> Result<Claim, Error> {
        let r = self.inner.claim(lifetime);
        self.inner.poke();
        r
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.poke();
        if let Some(h) = self.refill.take() {
            let _ = h.join();
        }
        if let Ok(pods) = self.inner.pods() {
            for p in census(&pods).0 {
                if let Some(id) = crate::sandbox_id(p) {
                    let _ = self.inner.kube.remove(&id);
                }
            }
        }
    }
}

impl Inner {
    fn selector(&self) -> String {
        format!("{LABEL_POOL}={}", self.opts.name)
    }

    fn pods(&self) -> Result<Vec<Pod>, Error> {
        let lp = ListParams::default().labels(&self.selector());
        self.kube
            .block(timed(self.kube.pods().list(&lp)))
            .map(|l| l.items)
            .map_err(|e| api_error(&format!("listing pool {}", self.opts.name), e))
    }

    fn poke(&self) {
        let (m, cv) = &self.wake;
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// Keeps `size` warm Pods, within the budget, until stopped. Woken by
    /// claims; it also looks every 2 s (a warm Pod may end by itself).
    fn refill_loop(&self) {
        let (m, cv) = &self.wake;
        let mut seen = 0;
        while !self.stop.load(Ordering::SeqCst) {
            if let Ok(pods) = self.pods() {
                let (warm, all) = census(&pods);
                let want = self
                    .opts
                    .size
                    .saturating_sub(warm.len())
                    .min(self.opts.budget.saturating_sub(all));
                for _ in 0..want {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    // A failure is retried at the next look.
                    if self.make(true).is_err() {
                        break;
                    }
                }
            }
            let g = m.lock().unwrap_or_else(|e| e.into_inner());
            if *g == seen {
                let (g, _) = cv
                    .wait_timeout(g, Duration::from_secs(2))
                    .unwrap_or_else(|e| e.into_inner());
                seen = *g;
            } else {
                seen = *g;
            }
        }
    }

    /// Makes one Pod of the pool: warm (not waited for) or claimed at
    /// once (a cold claim, waited for until it runs).
    fn make(&self, warm: bool) -> Result<crate::KubeSandbox, Error> {
        let state = if warm { "warm" } else { "claimed" };
        let extra = [
            (LABEL_POOL, self.opts.name.as_str()),
            (LABEL_POOL_STATE, state),
        ];
        let mut config = self.template.clone();
        if warm {
            config.spec.limits.timeout = self.opts.warm_lifetime;
        }
        self.kube.make(&config, &extra, !warm)
    }

    fn claim(&self, lifetime: Duration) -> Result<Claim, Error> {
        let pods = self.pods()?;
        let (warm, all) = census(&pods);
        let mut ready: Vec<&Pod> = warm.into_iter().filter(|p| running(p)).collect();
        // Claimants start at different Pods, so they seldom collide.
        let n = ready.len().max(1);
        ready.rotate_left(crate::new_id()?.bytes().map(usize::from).sum::<usize>() % n);
        let owner = crate::owner_now();
        for p in ready {
            match self.take(p, &owner, lifetime) {
                Ok(Some(sb)) => {
                    return Ok(Claim {
                        sandbox: Box::new(sb),
                        warm: true,
                    })
                }
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        if all >= self.opts.budget {
            return Err(Error::InvalidSpec(format!(
                "pool {}: no warm Pod is ready and the pool has its budget of {} Pods; release a claim or raise the budget",
                self.opts.name, self.opts.budget
            )));
        }
        let mut config = self.template.clone();
        config.spec.limits.timeout = lifetime;
        let sb = self.kube.make(
            &config,
            &[
                (LABEL_POOL, self.opts.name.as_str()),
                (LABEL_POOL_STATE, "claimed"),
            ],
            true,
        )?;
        Ok(Claim {
            sandbox: Box::new(sb),
            warm: false,
        })
    }

    /// Claims `p` if nobody changed it since it was read; `None` if
    /// someone did (or it is gone).
    fn take(
        &self,
        p: &Pod,
        owner: &str,
        lifetime: Duration,
    ) -> Result<Option<crate::KubeSandbox>, Error> {
        let name = p.metadata.name.clone().unwrap_or_default();
        let Some(rv) = p.metadata.resource_version.clone() else {
            return Ok(None);
        };
        let claim = crate::new_id()?;
        let now = now_s();
        let started = p
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.as_second().max(0) as u64)
            .unwrap_or(now);
        let mut patch = serde_json::json!({
            "metadata": {
                "resourceVersion": rv,
                "labels": {LABEL_POOL_STATE: "claimed", LABEL_CLAIM: claim},
                "annotations": {
                    ANN_OWNER: owner,
                    ANN_DEADLINE: (now + lifetime.as_secs().max(1)).to_string(),
                },
            },
        });
        // activeDeadlineSeconds counts from the Pod's start and may only
        // go down.
        let want = now.saturating_sub(started) + lifetime.as_secs().max(1);
        let current = p
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .unwrap_or(i64::MAX);
        if i64::try_from(want).is_ok_and(|w| w < current) {
            patch["spec"] = serde_json::json!({"activeDeadlineSeconds": want});
        }
        let r = self.kube.block(timed(self.kube.pods().patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )));
        match r {
            Ok(got) if running(&got) => Ok(self.kube.handle(&got)),
            Ok(_) => Ok(None),
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(None),
            Err(e) => Err(api_error(&format!("claiming pod {name}"), e)),
        }
    }
}
