//! nanoclaw's Kubernetes backend: the engine's [`Backend`] over the
//! Kubernetes API (the `kube` crate), so that sandboxes can run on a
//! cluster instead of one machine.
//!
//! A sandbox is one Pod, `nanoclaw-<id>`, with nanoclaw's hardening as its
//! security context ([`pod`]: non-root, no privilege escalation, every
//! capability dropped, a read-only root, seccomp `RuntimeDefault`, no
//! service-account token, no service links, no host namespaces), resources
//! from the limits, `activeDeadlineSeconds` from the lifetime, and a
//! NetworkPolicy of its own, owned by the Pod, that denies ingress and
//! denies egress unless the configuration allows some. Both are written
//! with server-side apply; the backend waits for the Pod with a watch
//! ([`wait_for`]).
//!
//! Every command is a `pods/exec` over WebSocket ([`exec`]); files go
//! through the same exec as byte and tar streams (the engine's default
//! file operations). Timeouts and output limits are nanoclaw's, as for the
//! other backends.
//!
//! Nothing outlives its sandbox for long when nanoclaw dies: the Pod ends
//! at its `activeDeadlineSeconds` (the kubelet enforces it), its
//! NetworkPolicy goes with it (owner reference, garbage collection), and
//! the next [`Kubernetes::connect`] sweeps Pods that ended or whose maker
//! on this host is gone ([`Kubernetes::sweep`]).
//!
//! The trait is blocking; the backend drives kube on a small tokio runtime
//! of its own (one worker thread).

#![warn(missing_docs)]

mod client;
mod exec;
pub mod pod;
pub mod pool;
pub mod tenancy;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use nanoclaw_sandbox::backend::{
    Backend, Capabilities, Execution, LiveSandbox, SandboxConfig, SandboxInfo, SandboxStats,
    LABEL_DETACHED,
};
use nanoclaw_sandbox::native::session::{ExecSpec, RunState};
use nanoclaw_sandbox::spec::Root;
use nanoclaw_sandbox::{procs, Error, Layers};

use crate::client::timed;
use crate::pod::{
    object_name, ANN_DEADLINE, ANN_LABELS, ANN_LAYERS, ANN_OWNER, CONTAINER, LABEL_BACKEND,
};

/// The backend's name (`--backend kubernetes`).
pub const NAME: &str = "kubernetes";

/// The field manager of nanoclaw's server-side applies.
const MANAGER: &str = "nanoclaw";

/// How long a Pod may take to run before its creation fails (an image
/// being pulled counts).
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a deleted Pod may take to be gone.
const DELETE_TIMEOUT: Duration = Duration::from_secs(60);

/// Container states that mean the Pod will not run without a change.
const HOPELESS: &[&str] = &[
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Where and how sandboxes are made: the `kubernetes:` section of the
/// configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeOptions {
    /// The kubeconfig file (default: `$KUBECONFIG`, `~/.kube/config`, or
    /// the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    pub context: Option<String>,
    /// The namespace of the sandboxes (default: the context's namespace,
    /// else `default`).
    pub namespace: Option<String>,
    /// `runtimeClassName` of every sandbox Pod (e.g. `gvisor`, `kata`).
    pub runtime_class_name: Option<String>,
    /// `imagePullPolicy` (`IfNotPresent` by default; `Never` for images
    /// loaded onto the nodes).
    pub image_pull_policy: Option<String>,
}

impl KubeOptions {
    /// Options from the environment: `KUBECONFIG` as usual, and
    /// `NANOCLAW_K8S_NAMESPACE`, `NANOCLAW_K8S_RUNTIME_CLASS`,
    /// `NANOCLAW_K8S_PULL_POLICY` (for tests and one-off runs).
    pub fn from_env() -> KubeOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        KubeOptions {
            kubeconfig: None,
            context: None,
            namespace: var("NANOCLAW_K8S_NAMESPACE"),
            runtime_class_name: var("NANOCLAW_K8S_RUNTIME_CLASS"),
            image_pull_policy: var("NANOCLAW_K8S_PULL_POLICY"),
        }
    }
}

/// Whether a cluster answers, for `nanoclaw doctor`.
#[derive(Debug, Clone)]
pub struct Probe {
    /// It answers.
    pub available: bool,
    /// What was found (server version, namespace) or what failed.
    pub detail: String,
    /// What to configure (empty when available).
    pub install: String,
}

/// Asks the cluster `opts` names for its version.
pub fn probe(opts: &KubeOptions) -> Probe {
    match Kubernetes::connect_with(opts.clone(), false) {
        Ok(k) => Probe {
            available: true,
            detail: k.describe(),
            install: String::new(),
        },
        Err(e) => Probe {
            available: false,
            detail: e.to_string(),
            install: "a reachable Kubernetes API server: KUBECONFIG (or kubernetes.kubeconfig in the config) naming a context allowed to manage pods, pods/exec and networkpolicies in the namespace".into(),
        },
    }
}

/// The backend's own runtime. The last handle to it may go inside another
/// runtime (the daemon drops its backends in its async `main`), where
/// dropping a runtime — which blocks until its tasks end — panics; so it
/// is shut down without waiting.
struct OwnRuntime {
    handle: tokio::runtime::Handle,
    rt: Option<tokio::runtime::Runtime>,
}

impl OwnRuntime {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The Kubernetes backend (see the crate's documentation).
#[derive(Clone)]
pub struct Kubernetes {
    client: kube::Client,
    rt: Arc<OwnRuntime>,
    namespace: String,
    opts: KubeOptions,
    server: String,
    version: String,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("server", &self.server)
            .field("namespace", &self.namespace)
            .field("opts", &self.opts)
            .finish()
    }
}

fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.into(),
        message: message.into(),
    }
}

fn api_error(what: &str, e: kube::Error) -> Error {
    backend_error(format!("{what}: {e}"))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn unavailable(why: String) -> Error {
    Error::Unsupported {
        what: "--backend kubernetes".into(),
        why,
        fix: "point KUBECONFIG (or kubernetes.kubeconfig in the config) at a cluster that answers"
            .into(),
    }
}

impl Kubernetes {
    /// Connects to the cluster `opts` names and removes what earlier
    /// nanoclaw processes left behind ([`Kubernetes::sweep`]).
    pub fn connect(opts: KubeOptions) -> Result<Kubernetes, Error> {
        Kubernetes::connect_with(opts, true)
    }

    fn connect_with(opts: KubeOptions, sweep: bool) -> Result<Kubernetes, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nanoclaw-kubernetes")
            .enable_all()
            .build()
            .map_err(|e| Error::Sys {
                call: "starting the Kubernetes client's runtime".into(),
                source: e,
            })?;
        let (client, namespace, server, version) = rt.block_on(async {
            let kc_opts = kube::config::KubeConfigOptions {
                context: opts.context.clone(),
                ..Default::default()
            };
            let config = match &opts.kubeconfig {
                Some(path) => {
                    let kc = kube::config::Kubeconfig::read_from(path)
                        .map_err(|e| unavailable(format!("kubeconfig {}: {e}", path.display())))?;
                    kube::Config::from_custom_kubeconfig(kc, &kc_opts).await
                }
                None if opts.context.is_some() => kube::Config::from_kubeconfig(&kc_opts).await,
                None => kube::Config::infer().await.map_err(|e| {
                    kube::config::KubeconfigError::ReadConfig(
                        std::io::Error::other(e.to_string()),
                        PathBuf::from("$KUBECONFIG"),
                    )
                }),
            }
            .map_err(|e| unavailable(format!("no usable kubeconfig: {e}")))?;
            let server = config.cluster_url.to_string();
            let namespace = opts
                .namespace
                .clone()
                .unwrap_or_else(|| config.default_namespace.clone());
            // Its requests run on this runtime, whoever drives them
            // (see the client module).
            let client = client::build(config, tokio::runtime::Handle::current())
                .map_err(|e| unavailable(format!("{server}: {e}")))?;
            let v = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
                .await
                .map_err(|_| unavailable(format!("{server} did not answer within 10 s")))?
                .map_err(|e| unavailable(format!("{server}: {e}")))?;
            Ok::<_, Error>((client, namespace, server, v.git_version))
        })?;
        let k = Kubernetes {
            client,
            rt: Arc::new(OwnRuntime {
                handle: rt.handle().clone(),
                rt: Some(rt),
            }),
            namespace,
            opts,
            server,
            version,
        };
        if sweep {
            k.sweep();
        }
        Ok(k)
    }

    /// One line for `nanoclaw doctor`: server, version, namespace.
    pub fn describe(&self) -> String {
        format!(
            "Kubernetes {} at {}; namespace {}; runtimeClass {}",
            self.version,
            self.server,
            self.namespace,
            self.opts
                .runtime_class_name
                .as_deref()
                .unwrap_or("(the node's default)")
        )
    }

    /// The namespace sandboxes are made in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The client, for callers that read objects back (tests, doctor).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// nanoclaw's Pods in the namespace.
    fn ours(&self) -> Result<Vec<Pod>, Error> {
        let lp = ListParams::default().labels(&format!("{LABEL_BACKEND}={NAME}"));
        self.block(timed(self.pods().list(&lp)))
            .map(|l| l.items)
            .map_err(|e| api_error("listing pods", e))
    }

    /// Removes what earlier nanoclaw processes left: Pods that ended (their
    /// lifetime is over), Pods whose maker on this host is gone (unless
    /// detached), and NetworkPolicies without a Pod. Returns the sandbox
    /// ids of the Pods removed.
    pub fn sweep(&self) -> Vec<String> {
        let Ok(all) = self.ours() else {
            return Vec::new();
        };
        let host = hostname();
        let mut gone = Vec::new();
        let mut live = std::collections::HashSet::new();
        for p in all {
            let Some(id) = sandbox_id(&p) else { continue };
            let ann = p.metadata.annotations.clone().unwrap_or_default();
            let detached = labels_of(&p)
                .iter()
                .any(|(k, v)| k == LABEL_DETACHED && v == "true");
            let orphan = !detached && ann.get(ANN_OWNER).is_some_and(|o| orphaned(o, &host));
            // A Pod still starting is not swept: another live process
            // (a replica, a pool's refill) may be waiting for it.
            if (orphan || ended(&p)) && self.remove(&id).is_ok() {
                gone.push(id);
            } else {
                live.insert(object_name(&id));
            }
        }
        let lp = ListParams::default().labels(&format!("{LABEL_BACKEND}={NAME}"));
        if let Ok(nps) = self.block(timed(self.policies().list(&lp))) {
            let old = SystemTime::now() - Duration::from_secs(120);
            for np in nps.items {
                let name = np.metadata.name.clone().unwrap_or_default();
                let made = np
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64));
                if !live.contains(&name) && made.is_some_and(|m| m < old) {
                    let _ = self.block(timed(
                        self.policies().delete(&name, &DeleteParams::default()),
                    ));
                }
            }
        }
        gone
    }

    /// Deletes sandbox `id`'s Pod and NetworkPolicy and waits (a watch)
    /// until the Pod is gone, i.e. the kubelet has stopped its containers.
    fn remove(&self, id: &str) -> Result<(), Error> {
        self.block(self.remove_async(id))
    }

    /// [`Kubernetes::remove`], for callers already on the runtime.
    async fn remove_async(&self, id: &str) -> Result<(), Error> {
        let name = object_name(id);
        let pods = self.pods();
        let dp = DeleteParams {
            grace_period_seconds: Some(1),
            ..DeleteParams::background()
        };
        if let Err(e) = timed(self.policies().delete(&name, &DeleteParams::background())).await {
            if !is_status(&e, 404) {
                return Err(api_error(&format!("deleting networkpolicy {name}"), e));
            }
        }
        let uid = match timed(pods.delete(&name, &dp)).await {
            Ok(either) => either.left().and_then(|p| p.metadata.uid),
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(api_error(&format!("deleting pod {name}"), e)),
        };
        let Some(uid) = uid else { return Ok(()) };
        let gone = |p: Option<&Pod>| p.is_none_or(|p| p.metadata.uid.as_deref() != Some(&uid));
        let waited = tokio::time::timeout(DELETE_TIMEOUT, wait_for(&pods, &name, gone)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(backend_error(format!("reading pod {name}: {e}"))),
            Err(_) => Err(backend_error(format!(
                "pod {name} was still there {} s after its deletion",
                DELETE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Creates the NetworkPolicy, then the Pod, then makes the Pod own the
    /// policy; waits until the Pod runs when `wait`. Returns the Pod as the
    /// server has it.
    fn apply(&self, pod: &Pod, np: &NetworkPolicy, wait: bool) -> Result<Pod, Error> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pp = PatchParams::apply(MANAGER).force();
        // The policy first, so the Pod never runs without it.
        self.block(timed(self.policies().patch(&name, &pp, &Patch::Apply(np))))
            .map_err(|e| api_error(&format!("applying networkpolicy {name}"), e))?;
        let made = self
            .block(timed(self.pods().patch(&name, &pp, &Patch::Apply(pod))))
            .map_err(|e| match &e {
                kube::Error::Api(s) if s.code == 403 && s.message.contains("exceeded quota") => {
                    tenancy::quota_refusal(&self.namespace, &s.message)
                }
                _ => api_error(&format!("applying pod {name}"), e),
            })?;
        let mut owned = np.clone();
        owned.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: name.clone(),
            uid: made.metadata.uid.clone().unwrap_or_default(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        }]);
        self.block(timed(self.policies().patch(
            &name,
            &pp,
            &Patch::Apply(&owned),
        )))
        .map_err(|e| api_error(&format!("owning networkpolicy {name}"), e))?;
        if !wait {
            return Ok(made);
        }
        self.wait_running(&name)
    }

    /// Waits (a watch) until Pod `name` runs, or fails with why it will not.
    fn wait_running(&self, name: &str) -> Result<Pod, Error> {
        let settled = |p: Option<&Pod>| p.is_none_or(|p| running(p) || hopeless(p).is_some());
        let got = self.block(async {
            tokio::time::timeout(START_TIMEOUT, wait_for(&self.pods(), name, settled)).await
        });
        let pod = match got {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => {
                return Err(backend_error(format!(
                    "pod {name} was deleted while starting"
                )))
            }
            Ok(Err(e)) => return Err(backend_error(format!("watching pod {name}: {e}"))),
            Err(_) => {
                return Err(backend_error(format!(
                "pod {name} did not run within {} s (is a node Ready, and can it get the image?)",
                START_TIMEOUT.as_secs()
            )))
            }
        };
        if running(&pod) {
            return Ok(pod);
        }
        let why = hopeless(&pod).unwrap_or_else(|| "it ended".into());
        Err(Error::InvalidSpec(format!("pod {name} cannot run: {why}")))
    }

    /// Makes sandbox `config`'s objects, its Pod carrying the `extra`
    /// labels too (a pool's); waits until the Pod runs when `wait`.
    pub(crate) fn make(
        &self,
        config: &SandboxConfig,
        extra: &[(&str, &str)],
        wait: bool,
    ) -> Result<KubeSandbox, Error> {
        self.check(config)?;
        let Root::Image(image) = &config.spec.root else {
            return pod::refuse_unsupported(config).and(Err(backend_error("no image")));
        };
        let id = new_id()?;
        let owner = owner_now();
        let deadline = now_s() + config.spec.limits.timeout.as_secs().max(1);
        let plan = pod::Plan {
            id: &id,
            image,
            pull_policy: self
                .opts
                .image_pull_policy
                .as_deref()
                .unwrap_or("IfNotPresent"),
            runtime_class: self.opts.runtime_class_name.as_deref(),
            owner: &owner,
            deadline,
        };
        let (mut p, _) = pod::pod(config, &plan)?;
        let labels = p.metadata.labels.get_or_insert_with(Default::default);
        for (k, v) in extra {
            labels.insert((*k).to_string(), (*v).to_string());
        }
        let np = pod::network_policy(config, &id)?;
        match self.apply(&p, &np, wait) {
            Ok(made) => match self.handle(&made) {
                Some(h) => Ok(h),
                None => {
                    let _ = self.remove(&id);
                    Err(backend_error("the pod lost its labels"))
                }
            },
            Err(e) => {
                // Once more if the first removal failed (an API call that
                // timed out on a busy server): a failed create leaves
                // nothing.
                if self.remove(&id).is_err() {
                    let _ = self.remove(&id);
                }
                Err(e)
            }
        }
    }

    /// This backend, making and finding its sandboxes in namespace `ns`
    /// (a tenant's, [`tenancy`]).
    pub fn in_namespace(&self, ns: &str) -> Kubernetes {
        let mut k = self.clone();
        k.namespace = ns.to_string();
        k
    }

    /// The nanoclaw sandboxes of every namespace whose Pods carry the
    /// labels `selector` selects (`key=value,...`), with their namespace,
    /// running or ended (not those being deleted): what every replica of a
    /// daemon sees alike.
    pub fn list_everywhere(&self, selector: &str) -> Result<Vec<(String, SandboxInfo)>, Error> {
        let lp = ListParams::default().labels(&format!("{LABEL_BACKEND}={NAME},{selector}"));
        let all: Api<Pod> = Api::all(self.client.clone());
        let pods = self
            .block(timed(all.list(&lp)))
            .map_err(|e| api_error("listing pods in every namespace", e))?;
        Ok(pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let ns = p.metadata.namespace.clone()?;
                Some((ns.clone(), self.in_namespace(&ns).handle(p)?.info))
            })
            .collect())
    }

    /// The Pod of sandbox `id`, read now; `NotFound` when it has none.
    fn pod_of(&self, id: &str) -> Result<Pod, Error> {
        let name = object_name(id);
        match self.block(timed(self.pods().get(&name))) {
            Ok(p) => Ok(p),
            Err(e) if is_status(&e, 404) => Err(Error::NotFound {
                id: id.into(),
                what: "no such Kubernetes sandbox (it ended, or was removed)".into(),
            }),
            Err(e) => Err(api_error(&format!("reading pod {name}"), e)),
        }
    }

    /// Sets the configuration labels `updates` of sandbox `id` (kept in
    /// its Pod's annotation), so that every process that finds the sandbox
    /// reads the new values. The write carries the `resourceVersion` it
    /// read: a concurrent writer's change is never overwritten (a 409 is
    /// read again and retried).
    pub fn set_labels(&self, id: &str, updates: &[(String, String)]) -> Result<(), Error> {
        let name = object_name(id);
        for _ in 0..8 {
            let p = self.pod_of(id)?;
            let mut labels = labels_of(&p);
            for (k, v) in updates {
                match labels.iter_mut().find(|(lk, _)| lk == k) {
                    Some(l) => l.1 = v.clone(),
                    None => labels.push((k.clone(), v.clone())),
                }
            }
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": p.metadata.resource_version,
                    "annotations": {
                        ANN_LABELS: serde_json::to_string(&labels).unwrap_or_default(),
                    },
                }
            });
            let pp = PatchParams::default();
            match self.block(timed(self.pods().patch(&name, &pp, &Patch::Merge(&patch)))) {
                Ok(_) => return Ok(()),
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(api_error(&format!("updating pod {name}"), e)),
            }
        }
        Err(backend_error(format!(
            "updating pod {name}: it kept changing under the update (8 conflicts)"
        )))
    }

    /// Deletes sandbox `id` (its Pod and NetworkPolicy) and waits until
    /// the Pod is gone; one already gone is not an error (another process
    /// may have removed it first).
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        self.remove(id)
    }

    /// Whether the API server serves API group `group` (discovery).
    pub fn has_api_group(&self, group: &str) -> bool {
        self.block(timed(self.client.list_api_groups()))
            .is_ok_and(|g| g.groups.iter().any(|g| g.name == group))
    }

    fn handle(&self, pod: &Pod) -> Option<KubeSandbox> {
        let id = sandbox_id(pod)?;
        let ann = pod.metadata.annotations.clone().unwrap_or_default();
        let layers: Layers = ann
            .get(ANN_LAYERS)
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let deadline = ann
            .get(ANN_DEADLINE)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let user = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|c| Some((c.run_as_user?, c.run_as_group?)))
            .and_then(|(u, g)| Some((u32::try_from(u).ok()?, u32::try_from(g).ok()?)));
        Some(KubeSandbox {
            kube: self.clone(),
            user,
            info: SandboxInfo {
                id,
                backend: NAME.into(),
                layers,
                // The Pod's processes run on a node, not on this host.
                host_pids: Vec::new(),
                labels: labels_of(pod),
            },
            deadline,
        })
    }
}

/// Waits (a watch: list, then watch from its resourceVersion) until Pod
/// `name` satisfies `cond` (`None`: it does not exist). Callers bound it
/// with their own deadline. (Stop 24 polled here because the watch "got no
/// events"; that was the client's connections being stranded on another
/// runtime, see the client module, not the watch.)
async fn wait_for(
    pods: &Api<Pod>,
    name: &str,
    cond: impl Fn(Option<&Pod>) -> bool,
) -> Result<Option<Pod>, kube::runtime::wait::Error> {
    kube::runtime::wait::await_condition(pods.clone(), name, cond).await
}

/// The configuration's labels, as kept in the Pod's annotation.
fn labels_of(pod: &Pod) -> Vec<(String, String)> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_LABELS))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default()
}

fn sandbox_id(pod: &Pod) -> Option<String> {
    pod.metadata.labels.as_ref()?.get(pod::LABEL_ID).cloned()
}

/// The Pod runs (its phase), and has not been deleted.
fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The Pod's containers ended (its lifetime, or its command).
fn ended(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed") | Some("Succeeded")
    )
}

/// Why the Pod will not run, when it is clear that it will not.
fn hopeless(p: &Pod) -> Option<String> {
    let status = p.status.as_ref()?;
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            return Some(format!(
                "phase {}: {}",
                status.phase.as_deref().unwrap_or_default(),
                status.message.as_deref().unwrap_or("")
            ))
        }
        _ => {}
    }
    for c in status.container_statuses.iter().flatten() {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.as_deref().unwrap_or_default();
            if HOPELESS.contains(&reason) {
                return Some(format!(
                    "{reason}: {}",
                    w.message.as_deref().unwrap_or("(no message)")
                ));
            }
        }
    }
    None
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// This process as a sandbox's maker ([`ANN_OWNER`]'s value): `HOST
/// PID:STARTTIME PIDNS`, where PIDNS is the boot id and the pid
/// namespace's inode: two processes with the same host name (two
/// containers, two machines cloned alike) are told apart, so neither takes
/// the other's pid for its own.
fn owner_now() -> String {
    format!(
        "{} {} {}",
        hostname(),
        procs::owner_tag(std::process::id()),
        pid_space()
    )
}

/// This process's pid space: `BOOT_ID/PIDNS_INODE`.
fn pid_space() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|l| l.display().to_string())
        .unwrap_or_default();
    let inode: String = ns.chars().filter(char::is_ascii_digit).collect();
    format!("{boot}/{inode}")
}

/// Whether the maker `owner` names ([`owner_now`]'s format) is a process
/// of this pid space (`host` names this machine) that is gone. A maker on
/// another host or in another pid space is never judged from here; an
/// annotation without the pid space (older nanoclaw) is judged by host
/// name alone, as before.
fn orphaned(owner: &str, host: &str) -> bool {
    let mut parts = owner.split(' ');
    let (Some(h), Some(proc_)) = (parts.next(), parts.next()) else {
        return false;
    };
    if h != host {
        return false;
    }
    if let Some(space) = parts.next() {
        if space != pid_space() {
            return false;
        }
    }
    !procs::owner_alive(proc_)
}

/// A fresh sandbox id: 12 hex digits.
fn new_id() -> Result<String, Error> {
    procs::random_id()
}

impl Backend for Kubernetes {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            host_root: false,
            image_root: false,
            dir_root: false,
            // An image reference the cluster's nodes resolve.
            store_image: true,
            persistent_upper: false,
            // Host paths are the node's, not this machine's.
            mounts: false,
            memory_swap: false,
            // Host names cannot be expressed in a NetworkPolicy.
            network_allowlist: false,
            network_open: true,
            network_kernel: true,
            seccomp_profile: false,
            seccomp_unconfined: false,
            cap_add: false,
            exec_allow: false,
            // An emptyDir cannot be mounted noexec.
            tmp_noexec: false,
            home: true,
            idle_timeout: false,
            pause: false,
            concurrent_execs: true,
            detached: true,
        }
    }

    fn check(&self, config: &SandboxConfig) -> Result<(), Error> {
        if matches!(config.spec.root, Root::Host) {
            return pod::refuse_unsupported(config);
        }
        self.capabilities().check(NAME, config)?;
        pod::refuse_unsupported(config)
    }

    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error> {
        Ok(Box::new(self.make(config, &[], true)?))
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, Error> {
        Ok(self
            .ours()?
            .iter()
            .filter(|p| running(p))
            .filter_map(|p| self.handle(p).map(|h| h.info))
            .collect())
    }

    fn attach(&self, id: &str) -> Result<Box<dyn LiveSandbox>, Error> {
        let name = object_name(id);
        let p = self.pod_of(id)?;
        let ours = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_BACKEND))
            .map(String::as_str)
            == Some(NAME);
        match self.handle(&p) {
            Some(h) if ours && running(&p) => Ok(Box::new(h)),
            _ => Err(Error::NotFound {
                id: id.into(),
                what: format!("pod {name} is not a running nanoclaw sandbox"),
            }),
        }
    }
}

/// One Kubernetes sandbox (a Pod).
#[derive(Clone)]
pub struct KubeSandbox {
    kube: Kubernetes,
    /// The Pod's user and group (`runAsUser`, `runAsGroup`): the one user
    /// a command may ask for.
    user: Option<(u32, u32)>,
    info: SandboxInfo,
    deadline: u64,
}

impl KubeSandbox {
    fn name(&self) -> String {
        object_name(&self.info.id)
    }

    fn ended(&self) -> Error {
        Error::NotFound {
            id: self.info.id.clone(),
            what: "the sandbox has ended".into(),
        }
    }
}

impl LiveSandbox for KubeSandbox {
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
        Err(Error::NotSupported {
            backend: NAME.into(),
            field: "pause".into(),
            why: "Kubernetes cannot freeze a Pod's processes".into(),
        })
    }

    fn resume(&self) -> Result<(), Error> {
        self.pause()
    }

    fn stats(&self) -> Result<SandboxStats, Error> {
        let p = match self.kube.block(timed(self.kube.pods().get(&self.name()))) {
            Ok(p) => p,
            Err(e) if is_status(&e, 404) => return Err(self.ended()),
            Err(e) => return Err(api_error(&format!("reading pod {}", self.name()), e)),
        };
        if !running(&p) {
            return Err(self.ended());
        }
        Ok(SandboxStats {
            state: RunState::Running,
            // Usage lives in the metrics API, which a cluster may lack.
            memory_bytes: None,
            cpu: None,
            tasks: None,
            can_pause: false,
            execs: exec::running(&self.info.id),
            deadline: UNIX_EPOCH + Duration::from_secs(self.deadline),
        })
    }

    fn destroy(&self) -> Result<(), Error> {
        self.kube.remove(&self.info.id)
    }
}

/// The container commands run in (for callers that exec by hand).
pub const SANDBOX_CONTAINER: &str = CONTAINER;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_maker_of_this_pid_space_is_an_orphan() {
        let host = hostname();
        let me = owner_now();
        assert!(!orphaned(&me, &host), "this process is alive");
        let mine = me.split(' ').nth(2).unwrap_or_default();
        // pid 0 with a start time never matches a live process.
        assert!(orphaned(&format!("{host} 0:1 {mine}"), &host));
        // Another pid space (a container with the same host name) or
        // another host: never judged from here.
        assert!(!orphaned(&format!("{host} 0:1 other-boot/1"), &host));
        assert!(!orphaned("elsewhere 0:1", &host));
        // The older format: by host name.
        assert!(orphaned(&format!("{host} 0:1"), &host));
    }
}
