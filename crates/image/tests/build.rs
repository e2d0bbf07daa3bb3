//! `image build` through the library with the real engine (as root; the
//! rootless runs are in crates/cli/tests/image_build.rs): layers from RUN
//! and COPY, whiteouts, the cache, failures that leave nothing behind,
//! unsupported instructions, context escapes, setup layers.
//!
//! The base image is `nanoclaw-bench:latest` from the local docker (it has
//! /bin/sh (dash), python3 and /bin/true). Without docker the tests skip
//! with a message, unless NANOCLAW_REQUIRE_DOCKER=1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use nanoclaw_image::build::{
    build, setup_layer, BuildError, BuildOptions, SetupOptions, StepStatus,
};
use nanoclaw_image::Store;
use nanoclaw_sandbox::spec::Root;
use nanoclaw_sandbox::SandboxSpec;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `docker save nanoclaw-bench:latest`, once per test process.
fn bench_tar() -> Option<&'static Path> {
    static TAR: OnceLock<Option<PathBuf>> = OnceLock::new();
    TAR.get_or_init(|| {
        // Earlier test processes' folders (they cannot remove their own).
        for e in fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("nanoclaw-build-test-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("nanoclaw-build-test-{}", std::process::id()));
        fs::create_dir_all(&dir).ok()?;
        let tar = dir.join("bench.tar");
        let ok = std::process::Command::new("docker")
            .args(["save", "-o", tar.to_str()?, "nanoclaw-bench:latest"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "docker with image nanoclaw-bench:latest is required (NANOCLAW_REQUIRE_DOCKER=1)"
            );
            return None;
        }
        Some(tar)
    })
    .as_deref()
}

/// A fresh store with the bench image, or None (skip).
fn setup(test: &str) -> Option<(tempfile::TempDir, Store)> {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root (the rootless builds run in crates/cli/tests/image_build.rs)");
        return None;
    }
    let Some(tar) = bench_tar() else {
        eprintln!("SKIPPED {test}: no docker or no nanoclaw-bench:latest image to import");
        return None;
    };
    let t = tempfile::Builder::new()
        .prefix("nc-build")
        .tempdir_in("/var/tmp")
        .unwrap();
    let store = Store::open(t.path().join("images")).unwrap();
    store.import(tar, None).unwrap();
    Some((t, store))
}

fn ctx(t: &Path, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let c = t.join(format!("ctx{}", fastrand()));
    fs::create_dir_all(&c).unwrap();
    fs::write(c.join("Dockerfile"), dockerfile).unwrap();
    for (p, content) in files {
        let f = c.join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(f, content).unwrap();
    }
    c
}

fn fastrand() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Run `argv` in a sandbox over the image's layers; (exit code, stdout, stderr).
fn run_in(store: &Store, image: &str, argv: &[&str]) -> (i32, String, String) {
    let root = store.resolve(image).unwrap();
    let mut spec = SandboxSpec::new(argv.iter().copied());
    spec.root = Root::Layers(root.layers);
    spec.user = nanoclaw_sandbox::spec::User { uid: 0, gid: 0 };
    let o = nanoclaw_sandbox::run(&spec).unwrap();
    (
        o.exit_code.unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn staging_empty(store: &Store) -> bool {
    fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

const DOCKERFILE: &str = r#"# a test image
ARG BASE=nanoclaw-bench
FROM ${BASE}
ARG GREETING=hello
ENV APP_HOME=/opt/app \
    MODE="two words"
RUN echo "$GREETING from run" > /built.txt && \
    python3 -c "import os, time; os.remove('/bin/true'); open('/stamp','w').write(str(time.time_ns()))"
COPY hello.txt sub/ ${APP_HOME}/
COPY ["hello.txt", "/single"]
WORKDIR ${APP_HOME}/work
LABEL org.example.k="v 1"
USER 1000:1000
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo default cmd"]
"#;

#[test]
fn build_run_cache_and_whiteouts() {
    let Some((t, store)) = setup("build_run_cache_and_whiteouts") else {
        return;
    };
    let c = ctx(
        t.path(),
        DOCKERFILE,
        &[
            ("hello.txt", "hi from context\n"),
            ("sub/deep/x.txt", "deep\n"),
            ("sub/skip.log", "no\n"),
            (".dockerignore", "**/*.log\n"),
        ],
    );
    let mut out = Vec::new();
    let t0 = Instant::now();
    let rep = build(&store, &BuildOptions::new("built:1", &c), &mut out).unwrap();
    let first = t0.elapsed();
    let text = String::from_utf8_lossy(&out).into_owned();
    eprintln!("{text}");
    assert!(
        text.contains("Step 1/12 : ARG BASE=nanoclaw-bench"),
        "{text}"
    );
    assert!(
        text.contains("Successfully tagged docker.io/library/built:1"),
        "{text}"
    );
    let base_layers = store.record("nanoclaw-bench").unwrap().layers.len();
    // RUN, COPY, COPY, WORKDIR (missing dir) made layers.
    assert_eq!(rep.layers.len(), base_layers + 4, "{:?}", rep.steps);

    // RUN's file is there; the lower /bin/true is hidden by a whiteout; COPY landed.
    let (code, out1, err) = run_in(
        &store,
        "built:1",
        &["/bin/sh", "-c", "cat /built.txt 2>/dev/null || python3 -c \"print(open('/built.txt').read(), end='')\"; test -e /bin/true && echo TRUE-PRESENT; python3 -c \"print(open('/opt/app/hello.txt').read(), end=''); print(open('/opt/app/deep/x.txt').read(), end=''); import os; print(os.path.exists('/opt/app/skip.log'), os.path.isdir('/opt/app/work'), open('/single').read(), end='')\""],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out1, "hello from run\nhi from context\ndeep\nFalse True hi from context\n",
        "{err}"
    );
    // The layer really holds a whiteout for bin/true.
    let run_layer = store.layer_dir(&rep.layers[base_layers]);
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = ["bin/true", "usr/bin/true"].iter().any(|p| {
        fs::symlink_metadata(run_layer.join(p))
            .is_ok_and(|md| md.file_type().is_char_device() && md.rdev() == 0)
    });
    assert!(wh, "no whiteout for /bin/true in the RUN layer");

    let rec = store.record("built:1").unwrap();
    assert!(
        rec.config.env.contains(&"APP_HOME=/opt/app".to_string()),
        "{:?}",
        rec.config.env
    );
    assert!(
        rec.config.env.contains(&"MODE=two words".to_string()),
        "{:?}",
        rec.config.env
    );
    assert_eq!(rec.config.working_dir.as_deref(), Some("/opt/app/work"));
    assert_eq!(rec.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(rec.config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(rec.config.cmd, vec!["echo default cmd"]);
    assert_eq!(
        rec.config.labels.get("org.example.k").map(String::as_str),
        Some("v 1")
    );
    assert!(
        !rec.config.env.iter().any(|e| e.starts_with("GREETING")),
        "ARG leaked into the image"
    );

    // Second identical build: every layer step cached, the same layers
    // (the RUN wrote a nanosecond timestamp: re-running it would change
    // its layer), and nothing ran.
    let mut out2 = Vec::new();
    let t1 = Instant::now();
    let rep2 = build(&store, &BuildOptions::new("built:1", &c), &mut out2).unwrap();
    let second = t1.elapsed();
    let text2 = String::from_utf8_lossy(&out2).into_owned();
    assert_eq!(rep2.built_steps(), 0, "{text2}");
    assert_eq!(rep2.layers, rep.layers);
    assert_eq!(rep2.id, rep.id);
    assert_eq!(text2.matches("CACHED").count(), 4, "{text2}");
    assert!(!text2.contains("Running in"), "{text2}");
    eprintln!("MEASURE build: first {first:?}, fully cached rebuild {second:?}");

    // A changed context file re-runs only from that COPY on.
    fs::write(c.join("hello.txt"), "changed\n").unwrap();
    let rep3 = build(&store, &BuildOptions::new("built:2", &c), &mut Vec::new()).unwrap();
    let st: Vec<StepStatus> = rep3.steps.iter().map(|s| s.status).collect();
    assert_eq!(rep3.steps[4].status, StepStatus::Cached, "{st:?}"); // RUN
    assert_eq!(rep3.steps[5].status, StepStatus::Built, "{st:?}"); // COPY
    assert_eq!(rep3.layers[base_layers], rep.layers[base_layers]);
    // A changed build arg re-runs the RUN.
    let mut o = BuildOptions::new("built:3", &c);
    o.build_args.push(("GREETING".into(), "bonjour".into()));
    let rep4 = build(&store, &o, &mut Vec::new()).unwrap();
    assert_eq!(rep4.steps[4].status, StepStatus::Built);
    let (_, out4, _) = run_in(
        &store,
        "built:3",
        &["python3", "-c", "print(open('/built.txt').read(), end='')"],
    );
    assert_eq!(out4, "bonjour from run\n");
    assert!(staging_empty(&store));
}

#[test]
fn failing_run_leaves_no_image() {
    let Some((t, store)) = setup("failing_run_leaves_no_image") else {
        return;
    };
    let layers_before = fs::read_dir(store.root().join("layers")).unwrap().count();
    let c = ctx(
        t.path(),
        "FROM nanoclaw-bench\nRUN echo partial > /partial; echo oops >&2; exit 3\n",
        &[],
    );
    let e = build(&store, &BuildOptions::new("broken", &c), &mut Vec::new()).unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(
            e,
            BuildError::StepFailed {
                step: 2,
                line: 2,
                ..
            }
        ),
        "{m}"
    );
    assert!(m.contains("exit code 3") && m.contains("oops"), "{m}");
    assert!(store.record("broken").is_err(), "an image was tagged");
    assert_eq!(
        fs::read_dir(store.root().join("layers")).unwrap().count(),
        layers_before
    );
    assert!(staging_empty(&store), "staging left behind");
    // A missing command: 127 explained.
    let c = ctx(t.path(), "FROM nanoclaw-bench\nRUN no-such-command\n", &[]);
    let m = build(&store, &BuildOptions::new("broken", &c), &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(m.contains("127"), "{m}");
}

#[test]
fn unsupported_and_escapes() {
    let Some((t, store)) = setup("unsupported_and_escapes") else {
        return;
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "FROM nanoclaw-bench\n\nHEALTHCHECK CMD true\n",
            "line 3",
            "HEALTHCHECK",
        ),
        ("FROM nanoclaw-bench\nVOLUME /data\n", "line 2", "VOLUME"),
        (
            "FROM nanoclaw-bench\nSHELL [\"/bin/bash\"]\n",
            "line 2",
            "SHELL",
        ),
        (
            "FROM nanoclaw-bench AS a\nFROM nanoclaw-bench\n",
            "line 2",
            "multi-stage",
        ),
        (
            "FROM nanoclaw-bench\nCOPY --from=a /x /y\n",
            "line 2",
            "--from",
        ),
        (
            "FROM nanoclaw-bench\nFOO bar\n",
            "line 2",
            "unknown instruction FOO",
        ),
        ("RUN true\n", "line 1", "before FROM"),
        (
            "FROM nanoclaw-bench\nADD https://example.com/x /x\n",
            "line 2",
            "URL",
        ),
        (
            "FROM nanoclaw-bench\nCOPY ../outside /x\n",
            "line 2",
            "outside the build context",
        ),
        (
            "FROM nanoclaw-bench\nCOPY esc/passwd /x\n",
            "line 2",
            "not found in the build context",
        ),
        (
            "FROM nanoclaw-bench\nCOPY secret.txt /x\n",
            "line 2",
            "excluded by .dockerignore",
        ),
        ("FROM not-there\n", "line 1", "nanoclaw image pull"),
    ];
    for (df, line, what) in cases {
        let c = ctx(
            t.path(),
            df,
            &[("secret.txt", "s"), (".dockerignore", "secret.txt\n")],
        );
        fs::write(t.path().join("outside"), "host file").unwrap();
        std::os::unix::fs::symlink("/etc", c.join("esc")).unwrap();
        let e = build(&store, &BuildOptions::new("nope", &c), &mut Vec::new()).unwrap_err();
        let m = e.to_string();
        assert!(m.contains(line) && m.contains(what), "{df:?}: {m}");
        assert!(store.record("nope").is_err());
    }
    assert!(staging_empty(&store));
}

#[test]
fn copy_follows_image_symlinks_inside_the_image() {
    let Some((t, store)) = setup("copy_follows_image_symlinks_inside_the_image") else {
        return;
    };
    // An image whose /evil is a symlink to the host-looking /etc path, and
    // /abs to "/../../.." : COPY through them must stay in the image.
    let c = ctx(
        t.path(),
        "FROM nanoclaw-bench\nRUN python3 -c \"import os; os.symlink('/../../../../../var/tmp/nc-host-target', '/evil')\"\nCOPY f /evil/\n",
        &[("f", "payload")],
    );
    let _ = fs::remove_dir_all("/var/tmp/nc-host-target");
    build(&store, &BuildOptions::new("sym", &c), &mut Vec::new()).unwrap();
    assert!(
        !Path::new("/var/tmp/nc-host-target/f").exists(),
        "COPY wrote through an image symlink onto the host"
    );
    let (code, out, err) = run_in(
        &store,
        "sym",
        &["python3", "-c", "print(open('/evil/f').read())"],
    );
    assert_eq!((code, out.as_str()), (0, "payload\n"), "{err}");
}

#[test]
fn add_extracts_local_tar_and_scratch() {
    let Some((t, store)) = setup("add_extracts_local_tar_and_scratch") else {
        return;
    };
    let c = ctx(
        t.path(),
        "FROM nanoclaw-bench\nADD a.tar.gz /ex/\nADD plain.txt /ex/\n",
        &[("plain.txt", "p")],
    );
    let src = t.path().join("tarsrc");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/in.txt"), "inside tar").unwrap();
    let st = std::process::Command::new("tar")
        .args([
            "-czf",
            c.join("a.tar.gz").to_str().unwrap(),
            "-C",
            src.to_str().unwrap(),
            "d",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    build(&store, &BuildOptions::new("added", &c), &mut Vec::new()).unwrap();
    let (code, out, err) = run_in(
        &store,
        "added",
        &[
            "python3",
            "-c",
            "print(open('/ex/d/in.txt').read(), open('/ex/plain.txt').read())",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "inside tar p\n"), "{err}");
    // FROM scratch + COPY works; RUN there explains why it cannot run.
    let c = ctx(t.path(), "FROM scratch\nCOPY f /f\n", &[("f", "x")]);
    let rep = build(&store, &BuildOptions::new("scr", &c), &mut Vec::new()).unwrap();
    assert_eq!(rep.layers.len(), 1);
    let c = ctx(t.path(), "FROM scratch\nRUN true\n", &[]);
    let m = build(&store, &BuildOptions::new("scr2", &c), &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(m.contains("empty"), "{m}");
}

#[test]
fn setup_layer_runs_once() {
    let Some((_t, store)) = setup("setup_layer_runs_once") else {
        return;
    };
    let cmd = "python3 -c \"import time; open('/setup-done','w').write(str(time.time_ns()))\"";
    let t0 = Instant::now();
    let r1 = setup_layer(&store, "nanoclaw-bench", cmd, &SetupOptions::default()).unwrap();
    let first = t0.elapsed();
    let (_, a, _) = run_in(
        &store,
        &r1,
        &["python3", "-c", "print(open('/setup-done').read())"],
    );
    let t1 = Instant::now();
    let r2 = setup_layer(&store, "nanoclaw-bench", cmd, &SetupOptions::default()).unwrap();
    let second = t1.elapsed();
    assert_eq!(r1, r2);
    let (_, b, _) = run_in(
        &store,
        &r2,
        &["python3", "-c", "print(open('/setup-done').read())"],
    );
    assert_eq!(a, b, "the setup command ran again");
    assert!(!a.trim().is_empty());
    eprintln!("MEASURE setup_layer: first {first:?}, cached {second:?}");
    let e = setup_layer(&store, "nanoclaw-bench", "exit 5", &SetupOptions::default()).unwrap_err();
    assert!(e.to_string().contains("exit code 5"), "{e}");
}

#[test]
fn go_compile_then_run_over_the_shared_std_cache() {
    use nanoclaw_image::go::{go_command, std_cache, GO_SHARED_CACHE_TARGET};
    use nanoclaw_sandbox::spec::{Access, Mount};
    use std::os::unix::fs::MetadataExt;
    if !Path::new("/usr/bin/go").exists() {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_GO").as_deref() != Ok("1"),
            "go is required (NANOCLAW_REQUIRE_GO=1): apt-get install golang-go"
        );
        eprintln!("SKIPPED go_compile_then_run_over_the_shared_std_cache: no /usr/bin/go (apt-get install golang-go)");
        return;
    }
    let t = tempfile::Builder::new()
        .prefix("nc-go")
        .tempdir_in("/var/tmp")
        .unwrap();
    let base = t.path().join("go-std");
    let code = "package main\nimport (\"fmt\"; \"os\")\nfunc main() { fmt.Println(\"go says\", len(os.Args[1:]), os.Args[1]) }\n";
    let spec_for = |code: &str, shared: Option<&Path>| {
        let g = go_command(code, &["arg1".into()]).unwrap();
        let mut spec = SandboxSpec::new(g.command.clone());
        spec.env.extend(g.env.clone());
        if let Some(dir) = shared {
            spec.mounts.push(Mount {
                source: dir.to_path_buf(),
                target: GO_SHARED_CACHE_TARGET.into(),
                access: Access::Ro,
            });
        }
        spec.limits.memory = Some(1 << 30);
        spec.limits.timeout = std::time::Duration::from_secs(180);
        spec
    };
    let run = |spec: &SandboxSpec| {
        let t0 = Instant::now();
        let o = nanoclaw_sandbox::run(spec).unwrap();
        (
            o.exit_code,
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            t0.elapsed(),
        )
    };
    let t0 = Instant::now();
    let user = SandboxSpec::new(["true"]).user;
    let shared = std_cache(&base, &Root::Host, None, user).unwrap();
    let warm_up = t0.elapsed();
    // Published by nanoclaw: its own files, read-only for everyone else.
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut entries = 0;
    for sub in std::fs::read_dir(&shared).unwrap().flatten() {
        for e in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            assert!(
                md.is_file() && md.uid() == me && md.mode() & 0o7777 == 0o644,
                "{e:?}"
            );
            entries += 1;
        }
    }
    assert!(entries > 10, "only {entries} cache entries");
    // The second call finds it.
    let t1 = Instant::now();
    assert_eq!(std_cache(&base, &Root::Host, None, user).unwrap(), shared);
    assert!(t1.elapsed() < std::time::Duration::from_secs(1));

    let (c1, out1, err1, d1) = run(&spec_for(code, Some(&shared)));
    assert_eq!((c1, out1.as_str()), (Some(0), "go says 1 arg1\n"), "{err1}");
    let (c2, out2, err2, d2) = run(&spec_for(code, Some(&shared)));
    assert_eq!((c2, out2.as_str()), (Some(0), "go says 1 arg1\n"), "{err2}");
    // Without the shared cache it still works (compiling what it needs).
    let (c3, out3, err3, d3) = run(&spec_for(code, None));
    assert_eq!((c3, out3.as_str()), (Some(0), "go says 1 arg1\n"), "{err3}");
    eprintln!("MEASURE go: warm-up {warm_up:?}; compile+run over the shared cache {d1:?}, again {d2:?}; without it {d3:?}");
    // A compile error is the program's failure, with go's message.
    let o = nanoclaw_sandbox::run(&spec_for(
        "package main\nfunc main() { undefined() }\n",
        Some(&shared),
    ))
    .unwrap();
    assert_ne!(o.exit_code, Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("undefined"));
}
