//! The kubernetes backend against a real cluster (`../shared/k8s`:
//! Kubernetes 1.20.2 with a node): create, exec (output, exit codes,
//! stdin, environment, working directory), files, the timeout and the
//! output limit killing the command's whole tree, the Pod's hardening
//! read back from the API server and seen from inside, the sandbox's
//! NetworkPolicy (owned by its Pod), its RuntimeClass, refused fields,
//! the lifetime ending a Pod with nobody watching, and nothing left
//! behind after destroy.
//!
//! Needs `KUBECONFIG` and `NANOCLAW_K8S_RUN` from `up.sh --node`
//! (`eval "$(bash ../shared/k8s/up.sh --node)"`): skipped with a message
//! without them, required with `NANOCLAW_REQUIRE_K8S=1` (CI). Uses the
//! node's preloaded `localhost/busybox:1` (imagePullPolicy Never).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use nanoclaw_kubernetes::pod::object_name;
use nanoclaw_kubernetes::pool::{
    Pool, PoolMode, PoolOptions, LABEL_CLAIM, LABEL_POOL, LABEL_POOL_STATE,
};
use nanoclaw_kubernetes::{KubeOptions, Kubernetes};
use nanoclaw_sandbox::backend::{Backend, LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::{Network, Root, Stdin};
use nanoclaw_sandbox::{Error, KillReason, SandboxSpec};

const REQUIRE: &str = "NANOCLAW_REQUIRE_K8S";
const IMAGE: &str = "localhost/busybox:1";
const RUNTIME_CLASS: &str = "nanoclaw-test-runc";
/// The most one check may take (the slowest takes about 1 min on a busy
/// machine; the backend's own waits are bounded well below this).
const CHECK_LIMIT: Duration = Duration::from_secs(400);

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("kubernetes: test");
        return ExitCode::SUCCESS;
    }
    let have = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    if !have("KUBECONFIG") || !have("NANOCLAW_K8S_RUN") {
        let why = "KUBECONFIG / NANOCLAW_K8S_RUN are not set: start a cluster with \
                   `bash ../shared/k8s/build.sh && eval \"$(bash ../shared/k8s/up.sh --node)\"`";
        if std::env::var(REQUIRE).as_deref() == Ok("1") {
            eprintln!("kubernetes: {REQUIRE}=1 but {why}");
            return ExitCode::FAILURE;
        }
        println!("SKIPPED kubernetes: {why}; {REQUIRE}=1 makes this a failure");
        return ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opts = KubeOptions {
        runtime_class_name: Some(RUNTIME_CLASS.into()),
        image_pull_policy: Some("Never".into()),
        ..KubeOptions::from_env()
    };
    let k = match Kubernetes::connect(opts) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kubernetes: FAIL connecting: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("kubernetes: {}", k.describe());
    let t = T { k, rt };
    if let Err(e) = t.runtime_class() {
        eprintln!("kubernetes: FAIL making RuntimeClass {RUNTIME_CLASS}: {e}");
        return ExitCode::FAILURE;
    }
    type Check = fn(&T) -> Result<(), String>;
    let checks: [(&str, Check); 10] = [
        ("the client used from another runtime strands no connection", foreign_runtime),
        ("fields it cannot honour are refused by name", refused),
        ("exec: output, exit codes, stdin, env, workdir; files", exec_and_files),
        ("the timeout and the output limit kill the command's tree", limits),
        ("the Pod's hardening, read back from the API server and from inside", hardening),
        ("a NetworkPolicy per sandbox, owned by its Pod; open egress allows public addresses only", network_policy),
        ("the lifetime ends a Pod with nobody watching (activeDeadlineSeconds)", lifetime),
        ("a handle found again by id (list, attach); destroy leaves nothing", attach_and_destroy),
        ("a warm pool: warm claims, refill, the budget, cleanup", warm_pool),
        ("claimants at once never share a Pod (resourceVersion on the claim)", concurrent_claims),
    ];
    let t = std::sync::Arc::new(t);
    let mut failed = 0;
    for (what, f) in checks {
        let t0 = Instant::now();
        // Each check on a thread of its own, bounded: a check that hangs
        // fails the run with its name instead of holding it until CI's
        // limit (down.sh, run by the caller, removes what it left).
        let (tx, rx) = std::sync::mpsc::channel();
        let tt = t.clone();
        std::thread::spawn(move || {
            let _ = tx.send(f(&tt));
        });
        match rx.recv_timeout(CHECK_LIMIT) {
            Ok(Ok(())) => println!("kubernetes: ok   {what} ({:?})", t0.elapsed()),
            Ok(Err(e)) => {
                failed += 1;
                println!("kubernetes: FAIL {what}: {e}");
            }
            Err(_) => {
                println!(
                    "kubernetes: FAIL {what}: no result after {} s (hung); stopping",
                    CHECK_LIMIT.as_secs()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    let left = t.left_over();
    if !left.is_empty() {
        failed += 1;
        println!("kubernetes: FAIL objects left behind: {left:?}");
    }
    println!("kubernetes: {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct T {
    k: Kubernetes,
    rt: tokio::runtime::Runtime,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

fn config() -> SandboxConfig {
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.root = Root::Image(IMAGE.into());
    spec.limits.timeout = Duration::from_secs(300);
    spec.env.push(("FROM_CONFIG".into(), "yes".into()));
    let mut c = SandboxConfig::new(spec);
    c.labels.push(("nanoclaw.tenant".into(), "team-a".into()));
    c.labels.push(("nanoclaw.agent".into(), "coder".into()));
    c
}

impl T {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.k.client(), self.k.namespace())
    }

    fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.k.client(), self.k.namespace())
    }

    /// A RuntimeClass for the node's only handler, `runc`.
    fn runtime_class(&self) -> Result<(), String> {
        let api: Api<RuntimeClass> = Api::all(self.k.client());
        let rc: RuntimeClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": {"name": RUNTIME_CLASS}, "handler": "runc"
        }))
        .map_err(|e| e.to_string())?;
        self.rt
            .block_on(api.patch(
                RUNTIME_CLASS,
                &PatchParams::apply("nanoclaw-test").force(),
                &Patch::Apply(&rc),
            ))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Creates a sandbox, runs `f` on it, destroys it.
    fn with(
        &self,
        config: &SandboxConfig,
        f: impl FnOnce(&dyn LiveSandbox) -> Result<(), String>,
    ) -> Result<(), String> {
        let sb = self.k.create(config).map_err(|e| format!("create: {e}"))?;
        let r = f(&*sb);
        let d = sb.destroy().map_err(|e| format!("destroy: {e}"));
        r?;
        d
    }

    fn pod(&self, id: &str) -> Option<Pod> {
        self.rt
            .block_on(self.pods().get_opt(&object_name(id)))
            .ok()
            .flatten()
    }

    fn policy(&self, id: &str) -> Option<NetworkPolicy> {
        self.rt
            .block_on(self.policies().get_opt(&object_name(id)))
            .ok()
            .flatten()
    }

    /// [`T::left_over`] once it equals `before`, or after 15 s: a Pod the
    /// backend deleted may still be listed while the kubelet stops it (a
    /// Pod never deleted is still there after that).
    fn left_over_settled(&self, before: &[String]) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.left_over();
            if left == before || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// nanoclaw's Pods and NetworkPolicies still in the namespace.
    fn left_over(&self) -> Vec<String> {
        let lp = kube::api::ListParams::default().labels("nanoclaw.backend=kubernetes");
        let mut left: Vec<String> = self
            .rt
            .block_on(self.pods().list(&lp))
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.metadata.name.map(|n| format!("pod/{n}")))
            .collect();
        left.extend(
            self.rt
                .block_on(self.policies().list(&lp))
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| p.metadata.name.map(|n| format!("networkpolicy/{n}"))),
        );
        left
    }
}

/// Stop 24's CI hang: the test read objects back through the backend's
/// client on a runtime of its own. A connection the client opened there
/// belonged to that runtime (its reactor and its connection task), which
/// runs only while the test blocks on it; the backend's next request
/// picked that idle connection from the pool and waited forever. The
/// client now does all its I/O on the backend's runtime, and every call
/// has a deadline. Here several requests at once from a foreign runtime
/// (so the pool must open new connections there), then the backend's own
/// calls, which must answer.
fn foreign_runtime(t: &T) -> Result<(), String> {
    let lp = kube::api::ListParams::default().labels("nanoclaw.backend=kubernetes");
    let pods = t.pods();
    let r = t
        .rt
        .block_on(async { futures_util::future::join_all((0..4).map(|_| pods.list(&lp))).await });
    if let Some(Err(e)) = r.into_iter().find(Result::is_err) {
        return Err(format!("listing from the test's runtime: {e}"));
    }
    for _ in 0..4 {
        // A thread with a bound, in case the backend's deadline is gone.
        let k = t.k.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(k.list().map(|l| l.len()));
        });
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("the backend's list: {e}")),
            Err(_) => return Err("the backend's list hung (90 s)".into()),
        }
    }
    Ok(())
}

/// A change that makes a configuration ask for something refused.
type Change = Box<dyn Fn(&mut SandboxConfig)>;

fn refused(t: &T) -> Result<(), String> {
    let cases: Vec<(&str, Change)> = vec![
        ("the host root", Box::new(|c| c.spec.root = Root::Host)),
        (
            "--network allowlist",
            Box::new(|c| {
                c.spec.network = Network::Allowlist {
                    hosts: vec!["example.com".into()],
                    cidrs: Vec::new(),
                    limits: Default::default(),
                    add_hosts: Vec::new(),
                }
            }),
        ),
        ("--pids", Box::new(|c| c.spec.limits.explicit.pids = true)),
        ("--user 0 (root)", Box::new(|c| c.spec.user.uid = 0)),
        (
            "--mount",
            Box::new(|c| {
                c.spec.mounts.push(nanoclaw_sandbox::spec::Mount {
                    source: "/etc".into(),
                    target: "/x".into(),
                    access: nanoclaw_sandbox::spec::Access::Ro,
                })
            }),
        ),
        (
            "--idle-timeout",
            Box::new(|c| c.idle_timeout = Some(Duration::from_secs(5))),
        ),
    ];
    let before = t.left_over();
    for (field, change) in cases {
        let mut c = config();
        change(&mut c);
        let want = format!("--backend kubernetes: {field} is not supported: ");
        match t.k.create(&c) {
            Err(e @ Error::NotSupported { .. }) if e.to_string().starts_with(&want) => {}
            Err(e) => return Err(format!("{field}: want {want:?}…, got {e}")),
            Ok(sb) => {
                let _ = sb.destroy();
                return Err(format!("{field}: a sandbox was made"));
            }
        }
    }
    if t.left_over() != before {
        return Err(format!(
            "a refused config left objects: {:?}",
            t.left_over()
        ));
    }
    // An image the node does not have (and may not pull): one clear error,
    // and nothing left behind.
    let mut c = config();
    c.spec.root = Root::Image("localhost/nanoclaw-no-such-image:1".into());
    match t.k.create(&c) {
        Err(e) if e.to_string().contains("ErrImageNeverPull") => {}
        Err(e) => return Err(format!("a missing image: {e}")),
        Ok(sb) => {
            let _ = sb.destroy();
            return Err("a missing image made a sandbox".into());
        }
    }
    let left = t.left_over_settled(&before);
    if left != before {
        return Err(format!("a failed create left objects: {left:?}"));
    }
    Ok(())
}

fn exec_and_files(t: &T) -> Result<(), String> {
    t.with(&config(), |sb| {
        let o = sb
            .exec(&sh("echo out; echo err >&2; exit 3"))
            .map_err(|e| e.to_string())?;
        if o.exit_code != Some(3) || text(&o.stdout) != "out\n" || text(&o.stderr) != "err\n" {
            return Err(format!("exit 3: {o:?}"));
        }
        let o = sb
            .exec(&ExecSpec::new(["true"]))
            .map_err(|e| e.to_string())?;
        if o.exit_code != Some(0) || !o.stdout.is_empty() {
            return Err(format!("true: {o:?}"));
        }
        let o = sb
            .exec(&ExecSpec::new(["nanoclaw-no-such-command"]))
            .map_err(|e| e.to_string())?;
        if o.exit_code != Some(127) {
            return Err(format!("a missing command: want 127, got {o:?}"));
        }
        let o = sb.exec(&sh("kill -TERM $$")).map_err(|e| e.to_string())?;
        if o.exit_code != Some(128 + 15) {
            return Err(format!("killed by SIGTERM: want 143, got {o:?}"));
        }
        let mut spec = sh("echo \"$FROM_CONFIG $FROM_EXEC $(pwd)\"; wc -c");
        spec.env.push(("FROM_EXEC".into(), "a b".into()));
        spec.workdir = Some("/proc".into());
        spec.stdin = Stdin::Bytes(vec![b'x'; 100_000]);
        let o = sb.exec(&spec).map_err(|e| e.to_string())?;
        if o.exit_code != Some(0) || text(&o.stdout) != "yes a b /proc\n100000\n" {
            return Err(format!("env, workdir, stdin: {o:?} {}", text(&o.stdout)));
        }
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        sb.put_file("/tmp/d/f.bin", data.clone(), None)
            .map_err(|e| format!("put_file: {e}"))?;
        let back = sb
            .get_file("/tmp/d/f.bin")
            .map_err(|e| format!("get_file: {e}"))?;
        if back != data {
            return Err(format!("get_file: {} bytes back, differ", back.len()));
        }
        let tar = sb.get_tar("/tmp/d").map_err(|e| format!("get_tar: {e}"))?;
        sb.put_tar("/tmp/e", tar, None)
            .map_err(|e| format!("put_tar: {e}"))?;
        let o = sb
            .exec(&sh("cmp /tmp/d/f.bin /tmp/e/f.bin && echo same"))
            .map_err(|e| e.to_string())?;
        if text(&o.stdout) != "same\n" {
            return Err(format!("tar round trip: {o:?}"));
        }
        let st = sb.stat("/tmp/d/f.bin").map_err(|e| format!("stat: {e}"))?;
        if st.size != 200_000 {
            return Err(format!("stat: {st:?}"));
        }
        // Commands run side by side.
        let a = sb
            .spawn(&sh("sleep 1; echo a"))
            .map_err(|e| e.to_string())?;
        let b = sb.exec(&sh("echo b")).map_err(|e| e.to_string())?;
        let a = a.wait(None).map_err(|e| e.to_string())?;
        if text(&a.stdout) != "a\n" || text(&b.stdout) != "b\n" {
            return Err(format!("concurrent execs: {a:?} {b:?}"));
        }
        Ok(())
    })
}

/// The command lines of the processes in the sandbox (busybox `ps`).
fn processes(sb: &dyn LiveSandbox) -> Result<String, String> {
    let o = sb
        .exec(&ExecSpec::new(["ps", "-o", "args"]))
        .map_err(|e| e.to_string())?;
    if o.exit_code != Some(0) {
        return Err(format!("ps: {o:?}"));
    }
    Ok(text(&o.stdout))
}

fn limits(t: &T) -> Result<(), String> {
    t.with(&config(), |sb| {
        let mut spec = sh("sleep 1000 & sleep 1001 & echo started; wait");
        spec.timeout = Duration::from_secs(3);
        let t0 = Instant::now();
        let o = sb.exec(&spec).map_err(|e| e.to_string())?;
        if o.killed_by != Some(KillReason::Timeout)
            || o.exit_code.is_some()
            || text(&o.stdout) != "started\n"
        {
            return Err(format!("timeout: {o:?}"));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("the timeout took {:?}", t0.elapsed()));
        }
        let left = processes(sb)?;
        if left.contains("sleep 100") {
            return Err(format!(
                "the timed-out command's children still run: {left}"
            ));
        }
        let mut spec = sh("yes nanoclaw");
        spec.output_limit = 1000;
        let o = sb.exec(&spec).map_err(|e| e.to_string())?;
        if o.killed_by != Some(KillReason::OutputLimit)
            || o.stdout.len() != 1000
            || !o.stdout_truncated
        {
            return Err(format!(
                "output limit: killed_by {:?}, {} bytes, truncated {}",
                o.killed_by,
                o.stdout.len(),
                o.stdout_truncated
            ));
        }
        let left = processes(sb)?;
        if left.contains("yes nanoclaw") {
            return Err(format!(
                "the command past its output limit still runs: {left}"
            ));
        }
        // An execution dropped without being waited for is killed.
        let x = sb
            .spawn(&sh("exec sleep 1002"))
            .map_err(|e| e.to_string())?;
        drop(x);
        let left = processes(sb)?;
        if left.contains("sleep 1002") {
            return Err(format!("a dropped execution still runs: {left}"));
        }
        Ok(())
    })
}

fn hardening(t: &T) -> Result<(), String> {
    t.with(&config(), |sb| {
        let id = sb.id();
        let p = t.pod(id).ok_or("the pod is not there")?;
        let spec = p.spec.ok_or("no spec")?;
        let c = &spec.containers[0];
        let sc = c.security_context.clone().unwrap_or_default();
        let psc = spec.security_context.clone().unwrap_or_default();
        let checks: Vec<(&str, bool)> = vec![
            ("automountServiceAccountToken: false", spec.automount_service_account_token == Some(false)),
            ("enableServiceLinks: false", spec.enable_service_links == Some(false)),
            ("no hostNetwork", spec.host_network != Some(true)),
            ("no hostPID", spec.host_pid != Some(true)),
            ("no hostIPC", spec.host_ipc != Some(true)),
            ("activeDeadlineSeconds: 300", spec.active_deadline_seconds == Some(300)),
            ("runtimeClassName", spec.runtime_class_name.as_deref() == Some(RUNTIME_CLASS)),
            ("allowPrivilegeEscalation: false", sc.allow_privilege_escalation == Some(false)),
            ("readOnlyRootFilesystem", sc.read_only_root_filesystem == Some(true)),
            ("runAsNonRoot", sc.run_as_non_root == Some(true) && psc.run_as_non_root == Some(true)),
            ("runAsUser 1000", sc.run_as_user == Some(1000)),
            ("drop ALL", sc.capabilities.as_ref().and_then(|c| c.drop.clone()) == Some(vec!["ALL".to_string()])),
            ("seccomp RuntimeDefault", sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()) == Some("RuntimeDefault")),
            (
                "memory limit",
                c.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("memory")).map(|q| q.0.as_str())
                    == Some("536870912"),
            ),
        ];
        let bad: Vec<&str> = checks.iter().filter(|(_, ok)| !ok).map(|(w, _)| *w).collect();
        if !bad.is_empty() {
            return Err(format!("read back from the API server, not as asked: {bad:?}"));
        }
        let labels = p.metadata.labels.unwrap_or_default();
        if labels.get("nanoclaw.tenant").map(String::as_str) != Some("team-a")
            || labels.get("nanoclaw.agent").map(String::as_str) != Some("coder")
            || labels.get("nanoclaw.id").map(String::as_str) != Some(id)
        {
            return Err(format!("labels: {labels:?}"));
        }
        // From inside: the attacker's view.
        let o = sb
            .exec(&sh("id -u; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
                       echo \"root $(awk '$2 == \"/\" {split($4, o, \",\"); print o[1]}' /proc/mounts)\"; \
                       ls /var/run/secrets/kubernetes.io/serviceaccount 2>&1 && echo TOKEN-MOUNTED; \
                       touch /tmp/ok && echo tmp-writable"))
            .map_err(|e| e.to_string())?;
        let out = text(&o.stdout);
        let want = [
            "1000\n",
            "CapEff:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            "tmp-writable",
            "root ro\n",
        ];
        if let Some(w) = want.iter().find(|w| !out.contains(*w)) {
            return Err(format!("inside: want {w:?} in {out:?}"));
        }
        if out.contains("TOKEN-MOUNTED") {
            return Err(format!("inside: {out}"));
        }
        Ok(())
    })
}

fn network_policy(t: &T) -> Result<(), String> {
    t.with(&config(), |sb| {
        let p = t.pod(sb.id()).ok_or("no pod")?;
        let np = t
            .policy(sb.id())
            .ok_or("no NetworkPolicy for the sandbox")?;
        let spec = np.spec.clone().ok_or("no spec")?;
        let selects = spec
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|m| m.get("nanoclaw.id"))
            .map(String::as_str)
            == Some(sb.id());
        if !selects
            || spec.policy_types != Some(vec!["Ingress".into(), "Egress".into()])
            || !spec.egress.clone().unwrap_or_default().is_empty()
            || !spec.ingress.clone().unwrap_or_default().is_empty()
        {
            return Err(format!("not deny-all for this sandbox: {spec:?}"));
        }
        let owners = np.metadata.owner_references.unwrap_or_default();
        if owners.len() != 1
            || owners[0].kind != "Pod"
            || Some(&owners[0].uid) != p.metadata.uid.as_ref()
        {
            return Err(format!("not owned by its pod: {owners:?}"));
        }
        Ok(())
    })?;
    let mut c = config();
    c.spec.network = Network::Open {
        limits: Default::default(),
    };
    t.with(&c, |sb| {
        let np = t.policy(sb.id()).ok_or("no NetworkPolicy")?;
        let egress = np.spec.and_then(|s| s.egress).unwrap_or_default();
        let block = egress
            .first()
            .and_then(|r| r.to.as_ref())
            .and_then(|to| to.first())
            .and_then(|p| p.ip_block.clone())
            .ok_or(format!("open: {egress:?}"))?;
        let except = block.except.unwrap_or_default();
        if block.cidr != "0.0.0.0/0"
            || !except.contains(&"10.0.0.0/8".to_string())
            || !except.contains(&"169.254.0.0/16".to_string())
        {
            return Err(format!("open egress: {egress:?}"));
        }
        Ok(())
    })
}

fn lifetime(t: &T) -> Result<(), String> {
    let mut c = config();
    c.spec.limits.timeout = Duration::from_secs(15);
    let sb = t.k.create(&c).map_err(|e| format!("create: {e}"))?;
    let id = sb.id().to_string();
    // Nobody calls destroy: the kubelet ends the Pod by itself.
    let name = object_name(&id);
    let ended = |p: Option<&Pod>| {
        p.is_none_or(|p| {
            matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed") | Some("Succeeded")
            )
        })
    };
    let r = t.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(120),
            await_condition(t.pods(), &name, ended),
        )
        .await
    });
    drop(sb);
    match r {
        Ok(Ok(_)) => {}
        other => return Err(format!("the pod did not end by itself: {other:?}")),
    }
    if t.k
        .list()
        .map_err(|e| e.to_string())?
        .iter()
        .any(|s| s.id == id)
    {
        return Err("an ended sandbox is still listed".into());
    }
    // The next connect sweeps it (and its NetworkPolicy).
    let again = Kubernetes::connect(KubeOptions::from_env()).map_err(|e| e.to_string())?;
    drop(again);
    if t.pod(&id).is_some() || t.policy(&id).is_some() {
        return Err("the ended sandbox's objects were not swept".into());
    }
    Ok(())
}

fn attach_and_destroy(t: &T) -> Result<(), String> {
    let sb = t.k.create(&config()).map_err(|e| format!("create: {e}"))?;
    let id = sb.id().to_string();
    let listed = t.k.list().map_err(|e| e.to_string())?;
    let Some(info) = listed.iter().find(|s| s.id == id) else {
        let _ = sb.destroy();
        return Err(format!("{id} not listed: {listed:?}"));
    };
    if info.labels != config().labels || info.layers.mode != "kubernetes" {
        let _ = sb.destroy();
        return Err(format!("listed as {info:?}"));
    }
    let again = t.k.attach(&id).map_err(|e| format!("attach: {e}"))?;
    let o = again
        .exec(&sh("echo $FROM_CONFIG"))
        .map_err(|e| e.to_string())?;
    if text(&o.stdout) != "yes\n" {
        return Err(format!("exec through an attached handle: {o:?}"));
    }
    if again.pause().is_ok() {
        return Err("pause claimed to work".into());
    }
    again.destroy().map_err(|e| format!("destroy: {e}"))?;
    if t.pod(&id).is_some() {
        return Err("the pod is still there after destroy returned".into());
    }
    if t.policy(&id).is_some() {
        return Err("the NetworkPolicy is still there after destroy returned".into());
    }
    match sb.exec(&ExecSpec::new(["true"])) {
        Err(_) => {}
        Ok(o) => return Err(format!("exec after destroy ran: {o:?}")),
    }
    sb.destroy().map_err(|e| format!("a second destroy: {e}"))?;
    match t.k.attach(&id) {
        Err(Error::NotFound { .. }) => Ok(()),
        other => Err(format!(
            "attach after destroy: {:?}",
            other.map(|s| s.id().to_string())
        )),
    }
}

fn pool_options(name: &str, size: usize, budget: usize) -> PoolOptions {
    PoolOptions {
        name: name.into(),
        size,
        budget,
        warm_lifetime: Duration::from_secs(600),
    }
}

/// Waits (reading the pool's Pods, bounded) until `want` holds for
/// (warm and running, all); checks the budget at every look.
fn until_counts(
    pool: &Pool,
    budget: usize,
    want: impl Fn(usize, usize) -> bool,
) -> Result<(usize, usize), String> {
    let t0 = Instant::now();
    loop {
        let (warm, all) = pool.counts().map_err(|e| e.to_string())?;
        if all > budget {
            return Err(format!(
                "{all} Pods in the pool, over its budget of {budget}"
            ));
        }
        if want(warm, all) {
            return Ok((warm, all));
        }
        if t0.elapsed() > Duration::from_secs(150) {
            return Err(format!("the pool stayed at {warm} warm / {all} Pods"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pool's Pods left in the namespace.
fn pool_pods(t: &T, name: &str) -> Vec<Pod> {
    let lp = kube::api::ListParams::default().labels(&format!("{LABEL_POOL}={name}"));
    t.rt.block_on(t.pods().list(&lp))
        .map(|l| l.items)
        .unwrap_or_default()
}

fn warm_pool(t: &T) -> Result<(), String> {
    let name = "test-warm";
    let pool = Pool::start(&t.k, config(), pool_options(name, 2, 3)).map_err(|e| e.to_string())?;
    // Kubernetes 1.20 here has no agent-sandbox CRDs: plain Pods.
    if pool.mode() != PoolMode::PlainPods {
        return Err(format!(
            "mode {:?} on a cluster without the CRDs",
            pool.mode()
        ));
    }
    until_counts(&pool, 3, |w, _| w == 2)?;
    let a = pool
        .claim(Duration::from_secs(120))
        .map_err(|e| format!("claim: {e}"))?;
    if !a.warm {
        return Err("a claim from a full pool was cold".into());
    }
    let o = a
        .sandbox
        .exec(&sh("echo $FROM_CONFIG"))
        .map_err(|e| e.to_string())?;
    if text(&o.stdout) != "yes\n" {
        return Err(format!("exec in a claimed Pod: {o:?}"));
    }
    let p = t.pod(a.sandbox.id()).ok_or("the claimed Pod is gone")?;
    let labels = p.metadata.labels.clone().unwrap_or_default();
    if labels.get(LABEL_POOL_STATE).map(String::as_str) != Some("claimed")
        || !labels.contains_key(LABEL_CLAIM)
    {
        return Err(format!("the claimed Pod's labels: {labels:?}"));
    }
    let deadline = p.spec.and_then(|s| s.active_deadline_seconds).unwrap_or(0);
    if !(120..600).contains(&deadline) {
        return Err(format!(
            "the claim did not lower activeDeadlineSeconds: {deadline}"
        ));
    }
    // Refilled to 2 warm, within the budget of 3 (1 claimed + 2 warm).
    until_counts(&pool, 3, |w, all| w == 2 && all == 3)?;
    let b = pool
        .claim(Duration::from_secs(120))
        .map_err(|e| format!("claim 2: {e}"))?;
    let c = pool
        .claim(Duration::from_secs(120))
        .map_err(|e| format!("claim 3: {e}"))?;
    if !b.warm || !c.warm {
        return Err(format!("claims 2, 3: warm {} {}", b.warm, c.warm));
    }
    // 3 claimed: the budget is used up; no refill, and a claim is refused.
    let (w, all) = pool.counts().map_err(|e| e.to_string())?;
    if w != 0 || all != 3 {
        return Err(format!("after 3 claims: {w} warm / {all}"));
    }
    match pool.claim(Duration::from_secs(60)) {
        Err(e) if e.to_string().contains("budget") => {}
        Err(e) => return Err(format!("a claim past the budget: {e}")),
        Ok(_) => return Err("a claim past the budget got a Pod".into()),
    }
    // Releasing a claim lets the pool refill (one warm again).
    b.sandbox.destroy().map_err(|e| e.to_string())?;
    until_counts(&pool, 3, |w, _| w == 1)?;
    for s in [a, c] {
        s.sandbox.destroy().map_err(|e| e.to_string())?;
    }
    drop(pool);
    let left = pool_pods(t, name);
    if !left.is_empty() {
        return Err(format!(
            "{} pool Pods left after the pool was dropped",
            left.len()
        ));
    }
    Ok(())
}

fn concurrent_claims(t: &T) -> Result<(), String> {
    let name = "test-race";
    let pool = Pool::start(&t.k, config(), pool_options(name, 4, 4)).map_err(|e| e.to_string())?;
    until_counts(&pool, 4, |w, _| w == 4)?;
    let pool = std::sync::Arc::new(pool);
    let gate = std::sync::Arc::new(std::sync::Barrier::new(6));
    let claimants: Vec<_> = (0..6)
        .map(|_| {
            let (pool, gate) = (pool.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                pool.claim(Duration::from_secs(120))
            })
        })
        .collect();
    let mut got = Vec::new();
    let mut refused = Vec::new();
    for c in claimants {
        match c.join() {
            Ok(Ok(claim)) => got.push(claim),
            Ok(Err(e)) => refused.push(e.to_string()),
            Err(_) => return Err("a claimant panicked".into()),
        }
    }
    let mut ids: Vec<String> = got.iter().map(|c| c.sandbox.id().to_string()).collect();
    let cold = got.iter().filter(|c| !c.warm).count();
    ids.sort();
    ids.dedup();
    let r = if ids.len() != got.len() {
        Err(format!(
            "two claimants got the same Pod: {} claims, {} Pods",
            got.len(),
            ids.len()
        ))
    } else if got.len() != 4 || cold != 0 || refused.iter().any(|e| !e.contains("budget")) {
        Err(format!(
            "{} claims ({cold} cold), refused: {refused:?}",
            got.len()
        ))
    } else {
        Ok(())
    };
    for c in got {
        let _ = c.sandbox.destroy();
    }
    drop(pool);
    r?;
    let left = pool_pods(t, name);
    if !left.is_empty() {
        return Err(format!("{} pool Pods left", left.len()));
    }
    Ok(())
}
