//! `nanoclaw serve` with a template on the Kubernetes backend (`--template
//! k8s=kubernetes:localhost/busybox:1`), against a real cluster
//! (`../shared/k8s`, Kubernetes 1.20.2 with a node): the unmodified `e2b`
//! SDK creates Pod sandboxes and runs commands (foreground, background,
//! open stdin, kill), moves files, sets timeouts and kills them
//! (tests/python/test_serve_kubernetes.py); the cluster is checked
//! afterwards (no Pod left).
//!
//! Needs `KUBECONFIG` and `NANOCLAW_K8S_RUN` from `up.sh --node`: skipped
//! with a message without them, required with `NANOCLAW_REQUIRE_K8S=1`;
//! the SDK's venv is required with `NANOCLAW_REQUIRE_E2B=1`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{e2b_pytest, free_port, text, venv, wait_listening};

const BIN: &str = env!("CARGO_BIN_EXE_nanoclaw");
/// The image of the sandboxes: the kit's busybox with a `/bin/bash` (the
/// SDK runs every command as `/bin/bash -l -c CMD`), made and loaded into
/// the node by [`e2b_image`] (`imagePullPolicy: Never`).
const IMAGE: &str = "localhost/nanoclaw-e2b-busybox:1";
/// The template's name in these tests.
const TEMPLATE: &str = "k8s";

/// One test at a time: they count the cluster's Pods.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The kubeconfig of the cluster up.sh started; `None` after a SKIPPED
/// line (a failure under NANOCLAW_REQUIRE_K8S=1).
fn cluster(test: &str) -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (kc, run) = (var("KUBECONFIG"), var("NANOCLAW_K8S_RUN"));
    if kc.is_none() || run.is_none() {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_K8S").map_or(true, |v| v != "1"),
            "{test}: NANOCLAW_REQUIRE_K8S=1 but KUBECONFIG / NANOCLAW_K8S_RUN are not set (eval \"$(bash ../shared/k8s/up.sh --node)\")"
        );
        eprintln!("SKIPPED {test}: KUBECONFIG / NANOCLAW_K8S_RUN are not set (start ../shared/k8s/up.sh --node)");
        return None;
    }
    kc
}

/// The Kubernetes kit (../shared/k8s): `$K8S_KIT` (.ci/run), else next to
/// the repository, else /work/shared/k8s.
fn kit() -> PathBuf {
    let candidates = [
        std::env::var_os("K8S_KIT").map(PathBuf::from),
        Some(common::repo().join("../shared/k8s")),
        Some(PathBuf::from("/work/shared/k8s")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("load-image.sh").exists())
        .expect("the Kubernetes kit (../shared/k8s) next to the repository")
}

/// Makes [`IMAGE`] (the kit's busybox, every applet linked, plus a
/// `/bin/bash` that is busybox's `sh`) with the kit's `mkimage.py` and
/// loads it into the node (once per test binary).
fn e2b_image() {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = DONE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nanoclaw-k8s-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("root/bin");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .map_err(|e| format!("/bin/busybox (apt-get install busybox-static): {e}"))?;
        let list = Command::new(bin.join("busybox"))
            .arg("--list")
            .output()
            .map_err(|e| e.to_string())?;
        for applet in text(&list.stdout).lines().filter(|a| *a != "busybox") {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(|e| e.to_string())?;
        }
        std::fs::write(bin.join("bash"), "#!/bin/sh\nexec /bin/sh \"$@\"\n")
            .map_err(|e| e.to_string())?;
        std::fs::set_permissions(bin.join("bash"), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let tar = dir.join("image.tar");
        let o = Command::new("python3")
            .arg(kit().join("images/mkimage.py"))
            .arg(dir.join("root"))
            .arg(IMAGE)
            .arg(&tar)
            .arg("sh")
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!("mkimage.py: {}", text(&o.stderr)));
        }
        let o = Command::new("bash")
            .arg(kit().join("load-image.sh"))
            .arg(&tar)
            .output()
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&dir);
        if !o.status.success() {
            return Err(format!("load-image.sh: {}", text(&o.stderr)));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("making the sandboxes' image {IMAGE}: {e}");
    }
}

/// `kubectl ARGS` against the test cluster: (success, stdout, stderr).
fn kubectl(args: &[&str]) -> (bool, String, String) {
    let bin = std::env::var("NANOCLAW_K8S_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let o = Command::new(bin).args(args).output().expect("run kubectl");
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}

/// The nanoclaw Pods of the cluster, as `namespace/name`.
fn pods() -> Vec<String> {
    let (ok, out, err) = kubectl(&[
        "get",
        "pods",
        "--all-namespaces",
        "-l",
        "nanoclaw.backend=kubernetes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
    ]);
    assert!(ok, "kubectl get pods: {err}");
    out.lines().map(str::to_string).collect()
}

/// Whether sandbox `id`'s Pod exists (in any namespace).
fn has_pod(id: &str) -> bool {
    let name = format!("/nanoclaw-{id}");
    pods().iter().any(|p| p.ends_with(&name))
}

/// Waits until `cond` holds, up to `limit`; false when it never did.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `nanoclaw serve` with tenants alice and bob and the Kubernetes template.
struct Daemon {
    data: PathBuf,
    port: u16,
    child: Option<Child>,
    keys: (String, String),
    kubeconfig: String,
}

impl Daemon {
    /// A daemon with a data dir of its own; tenants made there, or copied
    /// from `like` (a replica serves the same tenants with the same keys).
    fn new(name: &str, kubeconfig: &str, like: Option<&Daemon>) -> Daemon {
        let data =
            std::env::temp_dir().join(format!("nanoclaw-serve-k8s-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let keys = match like {
            Some(other) => {
                std::fs::copy(other.data.join("nanoclaw.db"), data.join("nanoclaw.db"))
                    .expect("copy the tenants");
                other.keys.clone()
            }
            None => {
                let key = |t: &str, extra: &[&str]| {
                    let mut args =
                        vec!["tenant", "add", t, "--data", data.to_str().expect("utf-8")];
                    args.extend_from_slice(extra);
                    let o = Command::new(BIN).args(&args).output().expect("tenant add");
                    assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
                    text(&o.stdout).trim().to_string()
                };
                (
                    key("alice", &[]),
                    key("bob", &["--max-sandboxes", "1", "--max-memory", "1g"]),
                )
            }
        };
        let mut d = Daemon {
            data,
            port: free_port(),
            child: None,
            keys,
            kubeconfig: kubeconfig.to_string(),
        };
        d.start();
        d
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let listen = format!("tcp:127.0.0.1:{}", self.port);
        let mut child = Command::new(BIN)
            .args(["serve", "--data"])
            .arg(&self.data)
            .args(["--listen", &listen])
            .args(["--template", &format!("{TEMPLATE}=kubernetes:{IMAGE}")])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NANOCLAW_K8S_PULL_POLICY", "Never")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nanoclaw serve");
        let patience = Duration::from_secs(90);
        wait_listening(&mut child, self.port, patience, "nanoclaw serve");
        self.child = Some(child);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    }

    /// curl against the control plane as `key`: (status, body).
    fn curl(&self, key: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "-m",
            "120",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("-H")
        .arg(format!("X-API-Key: {key}"))
        .arg(format!("{}{path}", self.url()));
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data", b]);
        }
        let o = c.output().expect("curl");
        let out = text(&o.stdout);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Creates a sandbox of the template as `key`'s tenant: its id.
    fn create(&self, key: &str, timeout: u32) -> String {
        let body = format!(r#"{{"templateID":"{TEMPLATE}","timeout":{timeout}}}"#);
        let (code, body) = self.curl(key, "POST", "/sandboxes", Some(&body));
        assert_eq!(code, 201, "create: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["sandboxID"].as_str().expect("sandboxID").to_string()
    }

    /// The sandbox ids `key`'s tenant lists (GET /v2/sandboxes).
    fn listed(&self, key: &str) -> Vec<String> {
        let (code, body) = self.curl(key, "GET", "/v2/sandboxes", None);
        assert_eq!(code, 200, "list: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v.as_array()
            .expect("a list")
            .iter()
            .filter_map(|s| s["sandboxID"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The SDK suite against `d` (and `replica`, for the replicas test),
/// tests selected by `-k`: its output, after asserting `passed` passed.
fn sdk_suite(d: &Daemon, replica: Option<&Daemon>, select: &str, passed: usize) -> Vec<String> {
    let venv = venv("the e2b SDK").expect("checked by the caller");
    let ids_file = d.data.join(format!("ids-{}", std::process::id()));
    let _ = std::fs::remove_file(&ids_file);
    let mut c = e2b_pytest(
        &venv,
        "tests/python/test_serve_kubernetes.py",
        &d.url(),
        (&d.keys.0, &d.keys.1),
    );
    c.args(["-k", select])
        .env("NANOCLAW_K8S_TEMPLATE", TEMPLATE)
        .env("NANOCLAW_BACKEND_IDS", &ids_file);
    if let Some(r) = replica {
        c.env("NANOCLAW_E2B_API_URL_2", r.url());
    }
    let o = c.output().expect("run pytest");
    let out = text(&o.stdout);
    assert!(
        o.status.success(),
        "the kubernetes suite failed:\n{out}\n{}",
        text(&o.stderr)
    );
    assert!(
        out.contains(&format!("{passed} passed")),
        "the suite did not run all {passed} tests: {out}"
    );
    eprintln!("{}", out.lines().last().unwrap_or(""));
    std::fs::read_to_string(&ids_file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_e2b_sdk_drives_pod_sandboxes() {
    let test = "the_e2b_sdk_drives_pod_sandboxes";
    let Some(kc) = cluster(test) else { return };
    if venv("the e2b SDK").is_none() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    e2b_image();
    let d = Daemon::new("sdk", &kc, None);
    let ids = sdk_suite(&d, None, "not replicas", 2);
    assert!(ids.len() >= 2, "no sandboxes made: {ids:?}");
    // Killed through the API: their Pods are gone (deleted and waited for).
    for id in &ids {
        assert!(
            within(Duration::from_secs(120), || !has_pod(id)),
            "the Pod of {id} is still there: {:?}",
            pods()
        );
    }
    drop(d);
}

/// Two replicas (two processes, their own data dirs and ports, the same
/// tenants) against the one cluster: a sandbox made through A is found,
/// used, listed (once), extended and killed through B (the SDK suite's
/// replicas test); a `kill -9` and a restart of A remove neither B's
/// sandboxes nor its own; a clean stop of B neither; and a sandbox whose
/// maker died is removed at its end by the other replica's reaper.
#[test]
fn two_replicas_serve_one_clusters_sandboxes() {
    let test = "two_replicas_serve_one_clusters_sandboxes";
    let Some(kc) = cluster(test) else { return };
    if venv("the e2b SDK").is_none() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    e2b_image();
    let mut a = Daemon::new("replica-a", &kc, None);
    let mut b = Daemon::new("replica-b", &kc, Some(&a));
    sdk_suite(&a, Some(&b), "two_replicas", 1);
    let alice = a.keys.0.clone();
    let x = a.create(&alice, 600);
    let y = b.create(&alice, 600);
    for d in [&a, &b] {
        let listed = d.listed(&alice);
        for id in [&x, &y] {
            assert_eq!(
                listed.iter().filter(|l| *l == id).count(),
                1,
                "{id} listed once by each replica: {listed:?}"
            );
        }
    }
    // A dies without a word, and starts again (its start sweeps): both
    // sandboxes are still there and served by either replica.
    a.signal(libc::SIGKILL);
    a.start();
    for id in [&x, &y] {
        assert!(has_pod(id), "{id} was removed by A's kill -9 or restart");
        for d in [&a, &b] {
            let (code, body) = d.curl(&alice, "GET", &format!("/sandboxes/{id}"), None);
            assert_eq!(code, 200, "{id} through {}: {body}", d.url());
        }
    }
    // A sandbox whose maker died is removed at its end by the other
    // replica's reaper (A stays dead meanwhile).
    let z = a.create(&alice, 10);
    a.signal(libc::SIGKILL);
    assert!(has_pod(&z), "{z} should outlive its maker until its end");
    assert!(
        within(Duration::from_secs(120), || !has_pod(&z)),
        "B's reaper did not remove {z} after its end"
    );
    assert!(
        has_pod(&x) && has_pod(&y),
        "the reaper removed a live sandbox"
    );
    // A clean stop of B ends none of the cluster's sandboxes either.
    b.signal(libc::SIGTERM);
    assert!(has_pod(&x) && has_pod(&y), "B's clean stop removed them");
    b.start();
    a.start();
    for id in [&x, &y] {
        let (code, body) = a.curl(&alice, "DELETE", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 204, "kill {id}: {body}");
        // Deleted and waited for by the daemon (60 s); a loaded kubelet
        // may take longer to stop it.
        assert!(
            within(Duration::from_secs(120), || !has_pod(id)),
            "{id} after its kill"
        );
        let (code, _) = b.curl(&alice, "GET", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 404, "{id} killed through A is gone for B");
    }
}

/// A tenant is a namespace with a ResourceQuota derived from its quota:
/// the object read back from the API server; a create the quota refuses
/// (one replica cannot count another's sandboxes) is the native quota's
/// 429 (the SDK sees it too: the suite's quota test); another tenant's
/// sandbox id is 404 through either replica.
#[test]
fn a_tenant_is_a_namespace_with_a_resource_quota() {
    let test = "a_tenant_is_a_namespace_with_a_resource_quota";
    let Some(kc) = cluster(test) else { return };
    if venv("the e2b SDK").is_none() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    e2b_image();
    let a = Daemon::new("quota-a", &kc, None);
    let b = Daemon::new("quota-b", &kc, Some(&a));
    sdk_suite(&a, Some(&b), "namespace_quota", 1);
    // bob: --max-sandboxes 1 --max-memory 1g; the daemon's default CPUs.
    let (ok, hard, err) = kubectl(&[
        "get",
        "resourcequota",
        "nanoclaw",
        "-n",
        "nanoclaw-bob",
        "-o",
        "jsonpath={.spec.hard.pods} {.spec.hard.limits\\.memory} {.spec.hard.limits\\.cpu}",
    ]);
    assert!(ok, "the ResourceQuota of bob's namespace: {err}");
    let hard: Vec<&str> = hard.split_whitespace().collect();
    assert_eq!(hard.first(), Some(&"1"), "pods: {hard:?}");
    // The API server writes quantities in their canonical form.
    assert!(
        matches!(hard.get(1), Some(&"1Gi") | Some(&"1073741824")),
        "limits.memory: {hard:?}"
    );
    assert!(
        matches!(hard.get(2), Some(&"40") | Some(&"40000m")),
        "limits.cpu (the default 40 CPUs): {hard:?}"
    );
    let (ok, labels, _) = kubectl(&[
        "get",
        "namespace",
        "nanoclaw-bob",
        "-o",
        "jsonpath={.metadata.labels.nanoclaw\\.tenant}",
    ]);
    assert!(
        ok && labels == "bob",
        "bob's namespace is labelled: {labels}"
    );
    // The same refusal through curl: status and JSON body.
    let bob = a.keys.1.clone();
    let first = a.create(&bob, 300);
    let body = format!(r#"{{"templateID":"{TEMPLATE}","timeout":300}}"#);
    let (native_code, native) = a.curl(&bob, "POST", "/sandboxes", Some(&body));
    let (k8s_code, k8s) = b.curl(&bob, "POST", "/sandboxes", Some(&body));
    assert_eq!((native_code, k8s_code), (429, 429), "{native} / {k8s}");
    for body in [&native, &k8s] {
        let v: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
        assert_eq!(v["code"], 429, "{body}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("quota exceeded: concurrent sandboxes"),
            "{body}"
        );
    }
    assert!(k8s.contains("exceeded quota"), "{k8s}");
    // Nothing was left of the refused one.
    let bobs: Vec<String> = pods()
        .into_iter()
        .filter(|p| p.starts_with("nanoclaw-bob/"))
        .collect();
    let want = vec![format!("nanoclaw-bob/nanoclaw-{first}")];
    assert!(
        within(Duration::from_secs(120), || pods()
            .into_iter()
            .filter(|p| p.starts_with("nanoclaw-bob/"))
            .collect::<Vec<_>>()
            == want),
        "bob's Pods: {bobs:?}"
    );
    // Another tenant's id is not found, through either replica.
    for d in [&a, &b] {
        let (code, body) = d.curl(&a.keys.0, "GET", &format!("/sandboxes/{first}"), None);
        assert_eq!(code, 404, "alice reading bob's sandbox: {body}");
        let (code, _) = d.curl(&a.keys.0, "DELETE", &format!("/sandboxes/{first}"), None);
        assert_eq!(code, 404, "alice killing bob's sandbox");
        assert!(!d.listed(&a.keys.0).contains(&first));
    }
    assert!(has_pod(&first), "alice's kill removed bob's sandbox");
    let (code, body) = b.curl(&bob, "DELETE", &format!("/sandboxes/{first}"), None);
    assert_eq!(code, 204, "{body}");
    assert!(within(Duration::from_secs(120), || !has_pod(&first)));
}
