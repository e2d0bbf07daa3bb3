//! The red team's findings against `POST /v1/images` (tenants' image
//! builds on `nanoclaw serve`), by attack, with curl against a real daemon
//! and two mutually hostile tenants sharing one image store.
//!
//! Root only (the daemon's builds run rootful here; SKIP otherwise). Needs
//! docker's `nanoclaw-bench:latest` (imported as the store's
//! `python:3.11-slim`): skipped with a message when absent, required when
//! `NANOCLAW_REQUIRE_DOCKER=1`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, is_root, nc, text, wait_listening, Mode};

const ROOT: Mode = Mode {
    name: "root",
    user: None,
};

/// A daemon with tenants alice and bob, its image store in its data folder
/// holding the bench image as `python:3.11-slim`.
struct Daemon {
    data: PathBuf,
    port: u16,
    child: Child,
    alice: String,
    bob: String,
    /// Options `serve` is started with (kept for restarts).
    extra: Vec<String>,
}

impl Daemon {
    fn start(test: &str) -> Option<Daemon> {
        Self::start_with(test, &[])
    }

    /// [`Daemon::start`], `serve` given `extra` options.
    fn start_with(test: &str, extra: &[&str]) -> Option<Daemon> {
        if !is_root() {
            eprintln!(
                "SKIPPED serve_images: the daemon's builds run as root here (CI runs as root)"
            );
            return None;
        }
        let data = std::env::temp_dir().join(format!(
            "nanoclaw-serve-images-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let tar = data.join("bench.tar");
        let saved = Command::new("docker")
            .args(["save", "-o"])
            .arg(&tar)
            .arg("nanoclaw-bench:latest")
            .status()
            .is_ok_and(|s| s.success());
        if !saved {
            let _ = std::fs::remove_dir_all(&data);
            assert!(
                std::env::var("NANOCLAW_REQUIRE_DOCKER").map_or(true, |v| v != "1"),
                "NANOCLAW_REQUIRE_DOCKER=1 but `docker save nanoclaw-bench:latest` failed (.ci/build-bench-image.sh)"
            );
            eprintln!("SKIPPED serve_images: no docker image nanoclaw-bench:latest");
            return None;
        }
        let d = data.to_string_lossy().into_owned();
        let t = tar.to_string_lossy().into_owned();
        let o = Self::nc(&data, &["image", "import", &t, "--tag", "python:3.11-slim"])
            .output()
            .expect("image import");
        assert!(o.status.success(), "image import: {}", text(&o.stderr));
        std::fs::remove_file(&tar).expect("rm tar");
        let key = |t: &str| {
            let o = Self::nc(&data, &["tenant", "add", t, "--data", &d])
                .output()
                .expect("tenant add");
            assert!(o.status.success(), "tenant add: {}", text(&o.stderr));
            text(&o.stdout).trim().to_string()
        };
        let (alice, bob) = (key("alice"), key("bob"));
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::serve(&data, port, &extra);
        Some(Daemon {
            data,
            port,
            child,
            alice,
            bob,
            extra,
        })
    }

    /// `nanoclaw serve` on `data`, listening on `port`.
    fn serve(data: &std::path::Path, port: u16, extra: &[String]) -> Child {
        let d = data.to_string_lossy().into_owned();
        let listen = format!("tcp:127.0.0.1:{port}");
        let mut args = vec!["serve", "--data", &d, "--listen", &listen];
        args.extend(extra.iter().map(String::as_str));
        let mut child = Self::nc(data, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nanoclaw serve");
        let patience = Duration::from_secs(20);
        wait_listening(&mut child, port, patience, "nanoclaw serve");
        child
    }

    /// `nanoclaw ARGS` with this daemon's image store.
    fn nc(data: &std::path::Path, args: &[&str]) -> Command {
        let mut c = nc(ROOT, args);
        c.env("NANOCLAW_DATA_DIR", data);
        c
    }

    /// curl as `key`: (status, body).
    fn curl(&self, key: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("X-API-Key: {key}"))
            .arg(format!("http://127.0.0.1:{}{path}", self.port));
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        let out = text(&c.output().expect("curl").stdout);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `POST /v1/images` as `key`.
    fn register(&self, key: &str, name: &str, dockerfile: &str) -> (u16, serde_json::Value) {
        let body = serde_json::json!({"name": name, "dockerfile": dockerfile, "languages": ["sh"]});
        let (code, body) = self.curl(key, "POST", "/v1/images", Some(&body.to_string()));
        let v = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        (code, v)
    }

    /// `/v1/run` of `python3 -c code` in `template` as `key` (the bench
    /// image has python3 and sh, no coreutils): (status, body).
    fn run(&self, key: &str, template: &str, code: &str) -> (u16, String) {
        let body = serde_json::json!({"template": template, "command": ["python3", "-c", code]});
        self.curl(key, "POST", "/v1/run", Some(&body.to_string()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill with a pid and a signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Prints /secret.txt.
const CAT: &str = "print(open('/secret.txt').read())";

/// Finding 1: the image store is shared by all tenants, and a tenant's
/// `FROM` read any image of it — another tenant's by reference
/// (`localhost/alice/NAME`), through an `ARG`, or by image id (or a
/// 4-digit id prefix, an oracle to enumerate the store). Bob then ran
/// alice's files as his own template. Refused now: a tenant's FROM names
/// an image by reference, and under `localhost/` only its own.
#[test]
fn a_tenant_cannot_build_from_another_tenants_image() {
    let Some(d) = Daemon::start("from") else {
        return;
    };
    let secret = "FROM python:3.11-slim\nRUN echo alice-secret-7d1f > /secret.txt\n";
    let (code, img) = d.register(&d.alice, "secret", secret);
    assert_eq!(code, 201, "{img}");
    assert_eq!(img["reference"], "localhost/alice/secret:latest");
    let id = img["id"].as_str().expect("id").to_string();
    let hex = id.trim_start_matches("sha256:").to_string();

    let attacks = [
        "FROM localhost/alice/secret:latest\n".to_string(),
        "FROM localhost/alice/secret\n".to_string(),
        "ARG B=localhost/alice/secret\nFROM ${B}\n".to_string(),
        format!("FROM localhost/alice/secret@{id}\n"),
        format!("FROM {id}\n"),
        format!("FROM {}\n", &hex[..12]),
        format!("FROM {}\n", &hex[..4]),
    ];
    for (n, df) in attacks.iter().enumerate() {
        let df = format!("{df}RUN python3 -c \"print(open('/secret.txt').read())\"\n");
        let (code, v) = d.register(&d.bob, &format!("steal{n}"), &df);
        assert_eq!(code, 422, "bob built FROM alice's image with {df:?}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("not one of your images") || msg.contains("not by id"),
            "{df:?}: {msg}"
        );
        let (code, out) = d.run(&d.bob, &format!("steal{n}"), CAT);
        assert!(
            !out.contains("alice-secret"),
            "bob read alice's file: {code} {out}"
        );
    }
    // Nor is alice's template bob's, nor listed to him.
    let (code, out) = d.run(&d.bob, "secret", CAT);
    assert!(code == 404 && !out.contains("alice-secret"), "{code} {out}");
    let (_, list) = d.curl(&d.bob, "GET", "/v1/images", None);
    assert!(!list.contains("alice"), "{list}");

    // Bob's own image of the same name is his, and alice's stays hers.
    let (code, v) = d.register(
        &d.bob,
        "secret",
        "FROM python:3.11-slim\nRUN echo bob > /secret.txt\n",
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["reference"], "localhost/bob/secret:latest");
    let (code, out) = d.run(&d.alice, "secret", CAT);
    assert!(
        code == 200 && out.contains("alice-secret-7d1f"),
        "{code} {out}"
    );
    // A tenant may build on its own images (and public ones).
    let (code, v) = d.register(&d.bob, "layered", "FROM localhost/bob/secret\nENV X=1\n");
    assert_eq!(code, 201, "{v}");

    // Nor does bob reuse alice's build cache (a step's layer that her
    // build made: an oracle of what she built, and layers made with her
    // network): the same Dockerfile gives him his own step's output.
    let stamp = "FROM python:3.11-slim\nRUN python3 -c \"import time; open('/t', 'w').write(str(time.time_ns()))\"\n";
    let (code, v) = d.register(&d.alice, "stamp", stamp);
    assert_eq!(code, 201, "{v}");
    let (code, v) = d.register(&d.bob, "stamp", stamp);
    assert_eq!(code, 201, "{v}");
    let read = "print(open('/t').read())";
    let (code_a, a) = d.run(&d.alice, "stamp", read);
    let (code_b, b) = d.run(&d.bob, "stamp", read);
    let stdout = |s: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(s).unwrap_or_else(|_| panic!("{s}"));
        v["stdout"].as_str().unwrap_or_default().to_string()
    };
    assert!(code_a == 200 && code_b == 200, "{a} {b}");
    assert!(!stdout(&a).trim().is_empty(), "{a}");
    assert_ne!(
        stdout(&a),
        stdout(&b),
        "bob's build reused alice's cached step"
    );

    // Every refused build is in the audit log, as bob's.
    let (_, audit) = d.curl(&d.bob, "GET", "/v1/audit?kind=image_build&limit=100", None);
    let recs: serde_json::Value = serde_json::from_str(&audit).expect("audit JSON");
    let failed = recs
        .as_array()
        .expect("array")
        .iter()
        .filter(|r| {
            r["detail"]
                .as_str()
                .is_some_and(|s| s.starts_with("failed:"))
        })
        .count();
    assert_eq!(failed, attacks.len(), "{audit}");
}

/// The sleeping RUN step's process (not the curl whose body names it).
const SLEEPER: &str = "^python3 -c import time";

/// Processes whose command line names `pattern`.
fn processes(pattern: &str) -> String {
    let o = Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .expect("pgrep");
    text(&o.stdout)
}

/// Finding 2: a daemon killed mid-build (SIGKILL, a crash) left its
/// `nanoclaw image build` child running, unowned: past the daemon's
/// 15-minute wall time (each RUN step has its own 30 minutes, and a
/// Dockerfile may have many), counted by no slot once the daemon was back,
/// its build context left in `DATA/builds` for good. Now the child dies
/// with the daemon (its sandbox with it) and a restarted daemon clears
/// the leftover contexts.
#[test]
fn a_build_dies_with_its_daemon_and_leaves_nothing() {
    let Some(mut d) = Daemon::start("kill") else {
        return;
    };
    let builds = d.data.join("builds");
    let pattern = format!("image build .*{}", builds.display());
    let body = serde_json::json!({
        "name": "sleeper",
        "dockerfile": "FROM python:3.11-slim\nRUN python3 -c \"import time; time.sleep(600)\"\n",
        "languages": ["python"],
    })
    .to_string();
    let mut curl = Command::new("curl")
        .args([
            "-s",
            "-m",
            "60",
            "-H",
            "content-type: application/json",
            "-H",
        ])
        .arg(format!("X-API-Key: {}", d.bob))
        .args(["--data-binary", &body])
        .arg(format!("http://127.0.0.1:{}/v1/images", d.port))
        .stdout(Stdio::null())
        .spawn()
        .expect("curl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes(SLEEPER).contains("python3") {
        assert!(
            Instant::now() < deadline,
            "the build's RUN step did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!processes(&pattern).is_empty(), "no build child");
    // SAFETY: kill with a pid and a signal.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
    let _ = d.child.wait();
    let _ = curl.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes(&pattern) + &processes(SLEEPER);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the build outlived its daemon by 10 s: {left}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.child = Daemon::serve(&d.data, d.port, &d.extra);
    let left: Vec<_> = std::fs::read_dir(&builds)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "build contexts left behind: {left:?}");
    let (code, list) = d.curl(&d.bob, "GET", "/v1/images", None);
    assert!(code == 200 && !list.contains("sleeper"), "{code} {list}");
}

/// Bytes under `p` (apparent sizes), as `du -sb`.
fn du(p: &std::path::Path) -> u64 {
    let o = Command::new("du").arg("-sb").arg(p).output().expect("du");
    text(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A Dockerfile whose RUN writes `mib` MiB into the image (a step of its
/// own: `tag` keeps it out of the build cache), then runs `then`.
fn writer(mib: u64, tag: &str, then: &str) -> String {
    format!(
        "FROM python:3.11-slim\nRUN python3 -c \"f=open('/big','wb'); f.write(b'{tag}'); [f.write(bytes(1<<20)) for i in range({mib})]\"\n{then}"
    )
}

/// Finding 4: nothing bounded the disk a build writes. One RUN wrote 2 GiB
/// into the store (4 GiB on disk with the unpacked copy), a sparse file
/// would have become a terabyte tar, and a failed build kept the layers of
/// the steps that had succeeded. Now: a step writing past the build's
/// bound is stopped while it runs (422 naming the bound), a layer past it
/// is never written, a failed build of a tenant leaves none of its layers,
/// and a tenant's images together stay under the tenant's bound.
#[test]
fn a_build_cannot_fill_the_disk() {
    let Some(d) = Daemon::start_with(
        "disk",
        &[
            "--max-build-bytes",
            "64m",
            "--max-tenant-image-bytes",
            "100m",
        ],
    ) else {
        return;
    };
    // Small findings (6): a body that is not an object says what it must
    // be; a name of the daemon's own templates is refused before a build.
    let (code, body) = d.curl(&d.bob, "POST", "/v1/images", Some("[]"));
    assert!(code == 400 && body.contains("JSON object"), "{code} {body}");
    let t0 = Instant::now();
    let (code, v) = d.register(&d.bob, "code-interpreter-v1", &writer(1, "x", ""));
    assert_eq!(code, 409, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refused only after a build"
    );
    let before = du(&d.data);
    let t0 = Instant::now();
    let (code, v) = d.register(&d.bob, "filler", &writer(2048, "filler", ""));
    assert_eq!(code, 422, "a 2 GiB RUN step was not stopped: {v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("disk bound"),
        "the error names the bound: {msg}"
    );
    eprintln!("2 GiB writer stopped after {:?}: {msg}", t0.elapsed());
    let grown = du(&d.data).saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "the stopped build left {grown} bytes behind"
    );

    // A sparse terabyte: free to write, a terabyte to tar.
    let sparse = "FROM python:3.11-slim\nRUN python3 -c \"open('/sparse','wb').truncate(1<<40)\"\n";
    let (code, v) = d.register(&d.bob, "sparse", sparse);
    assert_eq!(code, 422, "a sparse 1 TiB file was taken into a layer: {v}");
    assert!(du(&d.data).saturating_sub(before) < 8 << 20);

    // A failed build keeps none of the layers its good steps made.
    let (code, v) = d.register(&d.bob, "half", &writer(30, "half", "RUN exit 1\n"));
    assert_eq!(code, 422, "{v}");
    let grown = du(&d.data).saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "a failed build left {grown} bytes of layers"
    );

    // The tenant's bound: 40 + 40 MiB fit in 100, a third 40 does not
    // (only 20 are left), and alice is not affected.
    for name in ["one", "two"] {
        let (code, v) = d.register(&d.bob, name, &writer(40, name, ""));
        assert_eq!(code, 201, "{name}: {v}");
    }
    let (code, v) = d.register(&d.bob, "three", &writer(40, "three", ""));
    assert_eq!(code, 422, "over the tenant's bound: {v}");
    let (code, v) = d.register(&d.alice, "mine", &writer(40, "one", ""));
    assert_eq!(code, 201, "another tenant builds: {v}");
    let (_, list) = d.curl(&d.bob, "GET", "/v1/images", None);
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let held: u64 = list
        .as_array()
        .or_else(|| list["images"].as_array())
        .map(|a| a.iter().filter_map(|i| i["bytes"].as_u64()).sum())
        .unwrap_or(0);
    assert!(
        (80 << 20..100 << 20).contains(&held),
        "bob's images hold {held} bytes: {list}"
    );
}

/// `DELETE /v1/images/{name}` (docker rmi for a tenant's templates):
/// refused while a sandbox uses the image (its layers are that sandbox's
/// root), another tenant's image is a 404, and once removed the layers
/// only it used are gone from the store, its bytes no longer count against
/// the tenant's bound, and the image it was built from stays.
#[test]
fn removing_an_image_frees_its_layers_but_never_a_live_sandboxs_root() {
    let Some(d) = Daemon::start_with("rm", &["--max-tenant-image-bytes", "60m"]) else {
        return;
    };
    let (code, v) = d.register(&d.alice, "big", &writer(40, "big", ""));
    assert_eq!(code, 201, "{v}");
    let (code, v) = d.register(&d.alice, "small", &writer(1, "small", ""));
    assert_eq!(code, 201, "{v}");
    // The tenant's bound (60 MiB) is held: another 40 does not fit.
    let (code, v) = d.register(&d.alice, "next", &writer(40, "next", ""));
    assert_eq!(code, 422, "{v}");
    let layers = d.data.join("images").join("layers");
    let before = du(&layers);

    let (code, body) = d.curl(
        &d.alice,
        "POST",
        "/sandboxes",
        Some(r#"{"templateID":"big","timeout":120}"#),
    );
    assert_eq!(code, 201, "{body}");
    let sb: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let id = sb["sandboxID"].as_str().expect("sandboxID").to_string();

    // Bad names, the daemon's own templates, another tenant's image.
    let (code, body) = d.curl(&d.alice, "DELETE", "/v1/images/base", None);
    assert!(
        code == 400 && body.contains("daemon's own"),
        "{code} {body}"
    );
    let (code, body) = d.curl(&d.alice, "DELETE", "/v1/images/Big..x", None);
    assert!(
        code == 400 && body.contains("invalid image name"),
        "{code} {body}"
    );
    let (code, body) = d.curl(&d.bob, "DELETE", "/v1/images/big", None);
    assert!(
        code == 404 && !body.contains("localhost/alice"),
        "{code} {body}"
    );
    // In use: refused, naming the sandbox; the sandbox still runs from it.
    let (code, body) = d.curl(&d.alice, "DELETE", "/v1/images/big", None);
    assert!(code == 409 && body.contains(&id), "{code} {body}");
    assert_eq!(du(&layers), before, "a refused removal removed layers");

    let (code, body) = d.curl(&d.alice, "DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 204, "{body}");
    let (code, body) = d.curl(&d.alice, "DELETE", "/v1/images/big", None);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["reference"], "localhost/alice/big:latest", "{v}");
    assert!(v["layers_removed"].as_u64() >= Some(1), "{v}");
    let freed = before.saturating_sub(du(&layers));
    assert!(freed >= 40 << 20, "only {freed} bytes of layers freed");

    // Gone for the tenant: not listed, not runnable, not removable twice.
    let (_, list) = d.curl(&d.alice, "GET", "/v1/images", None);
    assert!(
        !list.contains("\"big\"") && list.contains("\"small\""),
        "{list}"
    );
    let (code, out) = d.run(&d.alice, "big", "print(1)");
    assert_eq!(code, 404, "{out}");
    let (code, body) = d.curl(&d.alice, "DELETE", "/v1/images/big", None);
    assert_eq!(code, 404, "{body}");
    // What it was built from stays: another image of it runs.
    let (code, out) = d.run(&d.alice, "small", "print(open('/big','rb').read(5))");
    assert!(code == 200 && out.contains("small"), "{code} {out}");
    // Its bytes no longer count: the build that did not fit now does.
    let (code, v) = d.register(&d.alice, "next", &writer(40, "next", ""));
    assert_eq!(code, 201, "{v}");
    // Audited, as alice's.
    let (_, audit) = d.curl(&d.alice, "GET", "/v1/audit?kind=image_remove", None);
    assert!(
        audit.contains("localhost/alice/big:latest") && audit.contains("layer(s) removed"),
        "{audit}"
    );
    // And it stays removed when the daemon starts again.
    let mut d = d;
    // SAFETY: kill with a pid and a signal.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let _ = d.child.wait();
    d.child = Daemon::serve(&d.data, d.port, &d.extra);
    let (_, list) = d.curl(&d.alice, "GET", "/v1/images", None);
    assert!(
        !list.contains("\"big\"") && list.contains("\"next\""),
        "{list}"
    );
}
