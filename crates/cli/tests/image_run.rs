//! Black-box tests of `nanoclaw run --image` (issue 6): an image imported
//! from a `docker save` tarball runs with every engine layer applied, its
//! writable layer is per sandbox, and a missing image is one clear error.
//! Needs a Docker engine to produce the tarball (`nanoclaw-bench:latest`,
//! built by .ci/build-bench-image.sh): skipped with a message when absent,
//! required when NANOCLAW_REQUIRE_DOCKER=1.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

const IMAGE: &str = "nanoclaw-bench:latest";

/// `docker save` of the bench image, once per test process; None (with a
/// printed reason) when docker or the image is missing and not required.
fn saved_image() -> Option<&'static Path> {
    static TAR: OnceLock<Option<PathBuf>> = OnceLock::new();
    TAR.get_or_init(|| {
        let required = std::env::var("NANOCLAW_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
        remove_stale("nanoclaw-image-test-");
        let dir = std::env::temp_dir().join(format!("nanoclaw-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let tar = dir.join("image.tar");
        let ok = Command::new("docker")
            .args(["save", IMAGE, "-o"])
            .arg(&tar)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !required,
                "NANOCLAW_REQUIRE_DOCKER=1 but `docker save {IMAGE}` failed (run .ci/build-bench-image.sh)"
            );
            eprintln!("SKIPPED image tests: `docker save {IMAGE}` failed (no Docker engine or no image)");
            return None;
        }
        fs::set_permissions(&tar, fs::Permissions::from_mode(0o644)).expect("chmod");
        Some(tar)
    })
    .as_deref()
}

/// A fresh data dir owned by the mode's user, with the image imported.
fn store_with_image(m: Mode, tar: &Path, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nanoclaw-image-store-{}-{}-{tag}",
        std::process::id(),
        m.name
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("mkdir");
    if let Some((uid, gid)) = m.user {
        std::os::unix::fs::chown(&d, Some(uid), Some(gid)).expect("chown");
    }
    let o = nc(m, &["image", "import", tar.to_str().expect("utf-8")])
        .env("NANOCLAW_DATA_DIR", &d)
        .output()
        .expect("spawn");
    assert!(
        o.status.success(),
        "[{}] import failed: {}",
        m.name,
        text(&o.stderr)
    );
    d
}

fn run_in(m: Mode, store: &Path, args: &[&str]) -> std::process::Output {
    nc(m, args)
        .env("NANOCLAW_DATA_DIR", store)
        .output()
        .expect("spawn")
}

#[test]
fn image_runs_with_every_layer_and_a_per_sandbox_writable_layer() {
    let Some(tar) = saved_image() else { return };
    for m in modes("image_runs_with_every_layer") {
        let store = store_with_image(m, tar, "layers");
        let o = run_in(
            m,
            &store,
            &[
                "run",
                "--image",
                IMAGE,
                "--",
                "python3",
                "-c",
                "import os; s=open('/proc/self/status').read(); \
                 print([l for l in s.splitlines() if l.split(':')[0] in ('CapEff','CapBnd','NoNewPrivs','Seccomp')]); \
                 print(os.path.exists('/root/.bashrc'), open('/etc/hostname').read().strip())",
            ],
        );
        let out = text(&o.stdout);
        assert_eq!(code(&o), 0, "[{}] {out} {}", m.name, text(&o.stderr));
        for want in [
            "CapEff:\\t0000000000000000",
            "CapBnd:\\t0000000000000000",
            "NoNewPrivs:\\t1",
            "Seccomp:\\t2",
        ] {
            assert!(out.contains(want), "[{}] missing {want}: {out}", m.name);
        }
        assert!(out.contains("False nanoclaw"), "[{}] {out}", m.name);

        // Root inside the image may write its root filesystem; the write is
        // gone in the next sandbox and never reaches the store.
        let o = run_in(
            m,
            &store,
            &[
                "run",
                "--image",
                IMAGE,
                "--user",
                "0:0",
                "--",
                "sh",
                "-c",
                "echo x > /usr/bin/planted && read v < /usr/bin/planted && echo $v",
            ],
        );
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        let o = run_in(
            m,
            &store,
            &[
                "run",
                "--image",
                IMAGE,
                "--",
                "sh",
                "-c",
                "test -e /usr/bin/planted && echo LEAKED || echo clean",
            ],
        );
        assert_eq!(text(&o.stdout).trim(), "clean", "[{}]", m.name);
        let leaked = Command::new("sh")
            .arg("-c")
            .arg(format!("find {} -name planted | head -1", store.display()))
            .output()
            .expect("find");
        assert!(
            text(&leaked.stdout).trim().is_empty(),
            "[{}] a sandbox write reached the image store",
            m.name
        );
        let _ = fs::remove_dir_all(&store);
    }
}

#[test]
fn a_missing_image_is_one_clear_error() {
    let dir = std::env::temp_dir().join(format!("nanoclaw-image-empty-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("mkdir");
    let m = Mode {
        name: "invoking",
        user: None,
    };
    let o = run_in(m, &dir, &["run", "--image", "nope/missing:1", "--", "true"]);
    let err = text(&o.stderr);
    assert_eq!(code(&o), 125, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("image pull"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn setup_command_runs_once_and_is_cached_as_a_layer() {
    let Some(tar) = saved_image() else { return };
    for m in modes("setup_command_runs_once") {
        let store = store_with_image(m, tar, "setup");
        let cfg = store.join("nanoclaw.yaml");
        fs::write(
            &cfg,
            format!(
                "agents:\n  list:\n    - id: py\n      sandbox:\n        mode: all\n        image: {IMAGE}\n        setupCommand: \"python3 -c 'import time; print(time.time_ns())' > /etc/prepared\"\n"
            ),
        )
        .expect("write config");
        fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let o = run_in(
                m,
                &store,
                &[
                    "run",
                    // A fresh sandbox each time: the setup's result must
                    // come from the cached layer, not a reused sandbox.
                    "--fresh",
                    "--config",
                    cfg.to_str().expect("utf-8"),
                    "--agent",
                    "py",
                    "--",
                    "sh",
                    "-c",
                    "read v < /etc/prepared; echo $v",
                ],
            );
            assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
            seen.push(text(&o.stdout));
        }
        assert!(
            !seen[0].trim().is_empty(),
            "[{}] setup output missing",
            m.name
        );
        // The same timestamp twice: the setup command ran once, its result
        // was reused as a cached layer.
        assert_eq!(seen[0], seen[1], "[{}] the setup command ran again", m.name);
        let _ = fs::remove_dir_all(&store);
    }
}

/// A real local registry (Debian's docker-registry) on 127.0.0.1, with the
/// bench image pushed by docker; None (with a message) when unavailable and
/// not required (NANOCLAW_REQUIRE_REGISTRY=1).
struct Registry {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
    /// The tag pushed to this registry: removed from Docker with it, so
    /// runs do not pile up `127.0.0.1:PORT/...` tags in `docker images`.
    tag: Option<String>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(tag) = &self.tag {
            let _ = Command::new("docker")
                .args(["rmi", tag])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn registry_with_image() -> Option<(Registry, String)> {
    let required = std::env::var("NANOCLAW_REQUIRE_REGISTRY").is_ok_and(|v| v == "1");
    if !Path::new("/usr/bin/docker-registry").exists() || saved_image().is_none() {
        assert!(
            !required,
            "NANOCLAW_REQUIRE_REGISTRY=1 but docker-registry or docker is missing"
        );
        eprintln!("SKIPPED preload test: needs /usr/bin/docker-registry and docker");
        return None;
    }
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("nanoclaw-registry-{}", std::process::id()));
    fs::create_dir_all(dir.join("data")).expect("mkdir");
    let cfg = dir.join("config.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .expect("config");
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start registry");
    let mut reg = Registry {
        child,
        port,
        dir,
        tag: None,
    };
    let patience = std::time::Duration::from_secs(10);
    wait_listening(&mut reg.child, port, patience, "the registry");
    let target = format!("127.0.0.1:{port}/bench/nb:1");
    reg.tag = Some(target.clone());
    for args in [vec!["tag", IMAGE, &target], vec!["push", &target]] {
        let ok = Command::new("docker")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "docker {args:?} failed");
    }
    Some((reg, target))
}

#[test]
fn preload_pulls_configured_images_from_a_real_registry_once() {
    let Some((reg, reference)) = registry_with_image() else {
        return;
    };
    let _ = reg.port;
    let m = Mode {
        name: "invoking",
        user: None,
    };
    let store = std::env::temp_dir().join(format!("nanoclaw-preload-{}", std::process::id()));
    let _ = fs::remove_dir_all(&store);
    fs::create_dir_all(&store).expect("mkdir");
    let cfg = store.join("nanoclaw.yaml");
    fs::write(
        &cfg,
        format!("execution:\n  preload_images:\n    - {reference}\n"),
    )
    .expect("config");
    let c = cfg.to_str().expect("utf-8");
    let o = run_in(
        m,
        &store,
        &["image", "preload", "--config", c, "--insecure"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("pulled"), "{}", text(&o.stdout));
    // Second time: nothing to download.
    let o = run_in(
        m,
        &store,
        &["image", "preload", "--config", c, "--insecure"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("present"), "{}", text(&o.stdout));
    // And the pulled image runs.
    let o = run_in(
        m,
        &store,
        &[
            "run",
            "--image",
            &reference,
            "--",
            "python3",
            "-c",
            "print(6*7)",
        ],
    );
    assert_eq!(text(&o.stdout), "42\n", "{}", text(&o.stderr));
    let _ = fs::remove_dir_all(&store);
}

#[test]
fn image_subcommands_through_the_binary() {
    let Some(tar) = saved_image() else { return };
    let m = Mode {
        name: "invoking",
        user: None,
    };
    let store = store_with_image(m, tar, "subcommands");
    for args in [
        vec!["image", "ls"],
        vec!["image", "ls", "--json"],
        vec!["image", "inspect", IMAGE],
        vec!["image", "stats", "--json"],
    ] {
        let o = run_in(m, &store, &args);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
    }
    for (args, want) in [
        (vec!["image", "inspect", "nope"], "nanoclaw image pull"),
        (vec!["image", "pull", "--platform", "bogus", "x"], "OS/ARCH"),
    ] {
        let o = run_in(m, &store, &args);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 125, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    for args in [vec!["image", "rm", IMAGE], vec!["image", "prune"]] {
        let o = run_in(m, &store, &args);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
    }
    let left = fs::read_dir(store.join("images/layers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "prune left layers behind");
    let _ = fs::remove_dir_all(&store);
}

#[test]
fn lang_resolves_through_execution_languages() {
    let Some(tar) = saved_image() else { return };
    let m = Mode {
        name: "invoking",
        user: None,
    };
    let store = store_with_image(m, tar, "languages");
    let cfg = store.join("nanoclaw.yaml");
    fs::write(
        &cfg,
        format!("execution:\n  languages:\n    python: {IMAGE}\n    sh: /bin/bash\n"),
    )
    .expect("config");
    let c = cfg.to_str().expect("utf-8");
    // The bench image has no node; the host root does (CI installs it).
    let probe = "import shutil; print(shutil.which('node'))";
    let o = run_in(
        m,
        &store,
        &["run", "--config", c, "--lang", "python", "--code", probe],
    );
    assert_eq!(
        text(&o.stdout),
        "None\n",
        "python did not run in the image: {}",
        text(&o.stderr)
    );
    let o = run_in(
        m,
        &store,
        &[
            "run",
            "--config",
            c,
            "--lang",
            "sh",
            "--code",
            "echo ${BASH_VERSION:+bash}",
        ],
    );
    assert_eq!(
        text(&o.stdout),
        "bash\n",
        "sh did not map to /bin/bash: {}",
        text(&o.stderr)
    );
    let _ = fs::remove_dir_all(&store);
}
