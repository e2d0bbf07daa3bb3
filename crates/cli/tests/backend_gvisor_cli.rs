//! `--backend gvisor` through the CLI: the selection point builds the gVisor
//! backend (crates/gvisor, tested there in depth), `nanoclaw run` runs in
//! gVisor's kernel, and a sandbox made by `sandbox create` is found again by
//! `exec`, `ls` and `rm`. Root only here (the rootless paths are tested in
//! crates/gvisor); needs runsc: skipped with a message when absent,
//! required with `NANOCLAW_REQUIRE_GVISOR=1` (CI).

mod common;

use common::{is_root, nc, text, Mode};

const ROOT: Mode = Mode {
    name: "root",
    user: None,
};

fn runsc_here() -> bool {
    let found = std::process::Command::new("runsc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_GVISOR").map_or(true, |v| v != "1"),
            "NANOCLAW_REQUIRE_GVISOR=1 but runsc is not installed (apt-get install -t bookworm-backports runsc)"
        );
        eprintln!("SKIPPED backend_gvisor_cli: runsc is not installed");
    }
    found
}

#[test]
fn run_and_sandbox_commands_reach_the_gvisor_backend() {
    if !is_root() {
        eprintln!(
            "SKIP backend_gvisor_cli: root only (rootless gVisor is tested in crates/gvisor)"
        );
        return;
    }
    if !runsc_here() {
        return;
    }
    let o = nc(
        ROOT,
        &[
            "run",
            "--backend",
            "gvisor",
            "--",
            "/bin/sh",
            "-c",
            "dmesg | head -n 1; exit 3",
        ],
    )
    .output()
    .expect("nanoclaw run");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("Starting gVisor"),
        "not gVisor's kernel: {}",
        text(&o.stdout)
    );

    let name = format!("gvcli-{}", std::process::id());
    let o = nc(
        ROOT,
        &["sandbox", "create", "--backend", "gvisor", "--name", &name],
    )
    .output()
    .expect("sandbox create");
    assert!(o.status.success(), "create: {}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    assert!(id.starts_with("gv-"), "{id}");
    let o = nc(
        ROOT,
        &["exec", &name, "--", "/bin/sh", "-c", "echo $((6*7))"],
    )
    .output()
    .expect("exec");
    assert_eq!(text(&o.stdout).trim(), "42", "{}", text(&o.stderr));
    let ls = text(&nc(ROOT, &["sandbox", "ls"]).output().expect("ls").stdout);
    assert!(ls.contains(&id), "sandbox ls does not list {id}: {ls}");
    let o = nc(ROOT, &["sandbox", "rm", &name]).output().expect("rm");
    assert!(o.status.success(), "rm: {}", text(&o.stderr));
    let ls = text(&nc(ROOT, &["sandbox", "ls"]).output().expect("ls").stdout);
    assert!(!ls.contains(&id), "{id} is still listed after rm: {ls}");

    let o = nc(
        ROOT,
        &[
            "run",
            "--backend",
            "gvisor",
            "--exec-allow",
            "/bin/true",
            "--",
            "true",
        ],
    )
    .output()
    .expect("refused run");
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("--exec-allow"),
        "{}",
        text(&o.stderr)
    );
}
