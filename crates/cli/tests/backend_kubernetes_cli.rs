//! `--backend kubernetes` through the CLI, against a real cluster
//! (`../shared/k8s`, Kubernetes 1.20.2 with a node): `nanoclaw run` runs a
//! command in a Pod (its exit code and output), the config's `kubernetes:`
//! section is honoured, a sandbox made by `sandbox create` is found again
//! by `exec`, `ls` and `rm`, a field the backend cannot honour is refused
//! by name (exit 125), and `nanoclaw doctor` has its row. The backend
//! itself is tested in depth in crates/kubernetes.
//!
//! Needs `KUBECONFIG` and `NANOCLAW_K8S_RUN` from `up.sh --node`: skipped
//! with a message without them, required with `NANOCLAW_REQUIRE_K8S=1`.

mod common;

use std::process::Command;

use common::{nc, text, Mode};

const ME: Mode = Mode {
    name: "invoking-user",
    user: None,
};
const IMAGE: &str = "localhost/busybox:1";

fn cluster() -> Option<String> {
    let kc = std::env::var("KUBECONFIG").ok().filter(|v| !v.is_empty());
    let run = std::env::var("NANOCLAW_K8S_RUN")
        .ok()
        .filter(|v| !v.is_empty());
    if kc.is_none() || run.is_none() {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_K8S").map_or(true, |v| v != "1"),
            "NANOCLAW_REQUIRE_K8S=1 but KUBECONFIG / NANOCLAW_K8S_RUN are not set (eval \"$(bash ../shared/k8s/up.sh --node)\")"
        );
        eprintln!("SKIPPED backend_kubernetes_cli: KUBECONFIG / NANOCLAW_K8S_RUN are not set (start ../shared/k8s/up.sh --node)");
        return None;
    }
    kc
}

fn k(kc: &str, args: &[&str]) -> Command {
    let mut c = nc(ME, args);
    c.env("KUBECONFIG", kc)
        .env("NANOCLAW_K8S_PULL_POLICY", "Never");
    c
}

#[test]
fn run_and_sandbox_commands_reach_the_kubernetes_backend() {
    let Some(kc) = cluster() else { return };
    let o = k(
        &kc,
        &[
            "run",
            "--backend",
            "kubernetes",
            "--image",
            IMAGE,
            "--",
            "sh",
            "-c",
            "echo hello from $(hostname); id -u; exit 3",
        ],
    )
    .output()
    .expect("nanoclaw run");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("hello from "), "{out}");
    assert!(
        out.ends_with("\n1000\n"),
        "not the non-root default user: {out}"
    );

    // The config's `kubernetes:` section: a pull policy of Always cannot
    // pull a local-only image, so the run fails with the kubelet's reason.
    let dir = std::env::temp_dir().join(format!("nanoclaw-k8s-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("nanoclaw.yaml");
    std::fs::write(&cfg, "kubernetes:\n  imagePullPolicy: Always\n").expect("config");
    let o = k(
        &kc,
        &[
            "run",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--backend",
            "kubernetes",
            "--image",
            IMAGE,
            "--",
            "true",
        ],
    )
    .output()
    .expect("nanoclaw run --config");
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("ErrImagePull") || text(&o.stderr).contains("ImagePullBackOff"),
        "the config's imagePullPolicy was not used: {}",
        text(&o.stderr)
    );
    std::fs::write(&cfg, "kubernetes:\n  imagePullPolicy: Sometimes\n").expect("config");
    let o = k(
        &kc,
        &[
            "run",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--backend",
            "kubernetes",
            "--image",
            IMAGE,
            "--",
            "true",
        ],
    )
    .output()
    .expect("nanoclaw run --config");
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("imagePullPolicy"),
        "{}",
        text(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);

    let name = format!("k8scli-{}", std::process::id());
    let o = k(
        &kc,
        &[
            "sandbox",
            "create",
            "--backend",
            "kubernetes",
            "--image",
            IMAGE,
            "--name",
            &name,
        ],
    )
    .output()
    .expect("sandbox create");
    assert!(o.status.success(), "create: {}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    let o = k(&kc, &["exec", &name, "--", "sh", "-c", "echo $((6*7))"])
        .output()
        .expect("exec");
    assert_eq!(text(&o.stdout).trim(), "42", "{}", text(&o.stderr));
    let ls = text(&k(&kc, &["sandbox", "ls"]).output().expect("ls").stdout);
    assert!(ls.contains(&id), "sandbox ls does not list {id}: {ls}");
    let o = k(&kc, &["sandbox", "rm", &name]).output().expect("rm");
    assert!(o.status.success(), "rm: {}", text(&o.stderr));
    let ls = text(&k(&kc, &["sandbox", "ls"]).output().expect("ls").stdout);
    assert!(!ls.contains(&id), "{id} is still listed after rm: {ls}");

    for (flag, value) in [("--exec-allow", "/bin/true"), ("--pids", "50")] {
        let o = k(
            &kc,
            &[
                "run",
                "--backend",
                "kubernetes",
                "--image",
                IMAGE,
                flag,
                value,
                "--",
                "true",
            ],
        )
        .output()
        .expect("refused run");
        assert_eq!(o.status.code(), Some(125), "{flag}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(&format!("--backend kubernetes: {flag}")),
            "{}",
            text(&o.stderr)
        );
    }

    let o = k(&kc, &["doctor", "--json"]).output().expect("doctor");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json");
    let row = doc
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "backend:kubernetes"))
        .unwrap_or_else(|| panic!("doctor has no backend:kubernetes row: {doc}"));
    assert_eq!(row["ok"], true, "{row}");
    assert!(
        row["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Kubernetes v1.20")),
        "{row}"
    );
}
