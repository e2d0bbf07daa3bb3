//! A rootless `nanoclaw serve` with a gVisor template: rootless runsc
//! makes its own user namespace, which cannot join the network namespace
//! nanoclaw wires to its egress proxy, so such a daemon must refuse E2B's
//! default (internet access) and `network.allowOut` with one clear 400 —
//! never hand out a sandbox whose egress policy silently does not hold —
//! and still serve sandboxes created without network, leaving nothing
//! behind when they are killed and when the daemon stops.
//!
//! Needs root (to run the daemon as the test user), the user `nanotest`
//! and `runsc`; required with `NANOCLAW_REQUIRE_GVISOR=1` and
//! `NANOCLAW_REQUIRE_ROOTLESS=1` (CI), else skipped with a message. The
//! HTTP client is `curl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_root, nc, rootless_user, Mode};
use serde_json::Value;

/// Whether this test can run here; panics when it is required and cannot.
fn ready(test: &str) -> Option<(u32, u32)> {
    let required = |v: &str| std::env::var(v).is_ok_and(|x| x == "1");
    let must = required("NANOCLAW_REQUIRE_GVISOR") && required("NANOCLAW_REQUIRE_ROOTLESS");
    let why = if !is_root() {
        Some("needs root, to start the daemon as the test user".to_string())
    } else if rootless_user().is_none() {
        Some("user `nanotest` does not exist (CI: useradd -u 1500 -m nanotest)".into())
    } else if Command::new("runsc")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        Some("runsc is not installed (apt-get install -t bookworm-backports runsc)".into())
    } else {
        None
    };
    match why {
        Some(why) => {
            assert!(!must, "{test}: required (NANOCLAW_REQUIRE_GVISOR=1, NANOCLAW_REQUIRE_ROOTLESS=1) but {why}");
            eprintln!("SKIPPED {test}: {why}");
            None
        }
        None => rootless_user(),
    }
}

/// The daemon, stopped (and its folder removed) when dropped.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.dir.join("s.sock")
    }

    /// `curl` METHOD PATH [JSON] over the daemon's socket: (status, body).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "120",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--unix-socket")
        .arg(self.socket())
        .args(["-X", method, &format!("http://nanoclaw{path}")]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data", b]);
        }
        let out = c.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        let status = status.trim().parse().unwrap_or(0);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// Stops the daemon as an operator does (SIGTERM) and waits for it.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with our own child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait daemon") {
                return s;
            }
            assert!(
                Instant::now() < end,
                "the daemon did not stop within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    /// A failed assertion still ends the daemon cleanly (SIGTERM: it ends
    /// its sandboxes), so nothing of the test outlives it.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill with our own child's pid and a valid signal.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(30);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `nanoclaw serve --template g=gvisor` as `user`, once its socket answers.
fn start(user: (u32, u32)) -> Daemon {
    let dir = std::env::temp_dir().join(format!("nanoclaw-rootless-gvisor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("daemon dir");
    std::os::unix::fs::chown(&dir, Some(user.0), Some(user.1)).expect("chown daemon dir");
    let mode = Mode {
        name: "rootless",
        user: Some(user),
    };
    let sock = dir.join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let data = dir.join("data");
    let child = nc(
        mode,
        &[
            "serve",
            "--listen",
            &listen,
            "--data",
            &data.to_string_lossy(),
            "--template",
            "g=gvisor",
        ],
    )
    .env("XDG_RUNTIME_DIR", dir.join("run"))
    .env("XDG_DATA_HOME", dir.join("xdg"))
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .spawn()
    .expect("start nanoclaw serve");
    let mut d = Daemon { child, dir };
    let end = Instant::now() + Duration::from_secs(60);
    while d.call("GET", "/healthz", None).0 != 200 {
        if let Some(s) = d.child.try_wait().expect("wait daemon") {
            panic!("nanoclaw serve (rootless, --template g=gvisor) exited at start: {s}");
        }
        assert!(
            Instant::now() < end,
            "the daemon's socket did not answer within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// Processes whose command line names `needle` (runsc's for a sandbox
/// carry its id).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", p.display()));
        }
    }
    found
}

/// Waits (bounded) until no process names `id`.
fn gone(id: &str, what: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let left = processes_naming(id);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: processes of {id} left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_refused(d: &Daemon, body: &str, words: &[&str]) {
    let (status, v) = d.call("POST", "/sandboxes", Some(body));
    assert_eq!(
        status, 400,
        "{body}: a rootless gVisor daemon must refuse it: {v}"
    );
    assert_eq!(v["code"], 400, "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    for w in words {
        assert!(msg.contains(w), "{body}: the error should say {w:?}: {msg}");
    }
}

#[test]
fn a_rootless_daemon_refuses_gvisor_egress_it_cannot_enforce_and_serves_the_rest() {
    let test = "a_rootless_daemon_refuses_gvisor_egress_it_cannot_enforce_and_serves_the_rest";
    let Some(user) = ready(test) else {
        return;
    };
    let mut d = start(user);
    // E2B's default asks for internet access; the SDK sends no network
    // options at all.
    assert_refused(
        &d,
        r#"{"templateID":"g"}"#,
        &[
            "gvisor",
            "rootless runsc",
            "allow_internet_access=false",
            "native",
        ],
    );
    assert_refused(
        &d,
        r#"{"templateID":"g","allow_internet_access":true}"#,
        &["gvisor", "allow_internet_access=false"],
    );
    assert_refused(
        &d,
        r#"{"templateID":"g","network":{"allowOut":["example.com"]}}"#,
        &["gvisor", "network.allowOut"],
    );
    // Without network the daemon serves it.
    let (status, v) = d.call(
        "POST",
        "/sandboxes",
        Some(r#"{"templateID":"g","allow_internet_access":false}"#),
    );
    assert_eq!(status, 201, "{v}");
    let id = v["sandboxID"].as_str().expect("sandboxID").to_string();
    let (status, info) = d.call("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(
        (status, info["state"].as_str()),
        (200, Some("running")),
        "{info}"
    );
    assert!(!processes_naming(&id).is_empty(), "runsc runs sandbox {id}");
    let (status, v) = d.call("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(status, 204, "{v}");
    gone(&id, "after DELETE");
    // A second one is ended by the daemon's clean stop.
    let (status, v) = d.call(
        "POST",
        "/sandboxes",
        Some(r#"{"templateID":"g","allow_internet_access":false}"#),
    );
    assert_eq!(status, 201, "{v}");
    let id2 = v["sandboxID"].as_str().expect("sandboxID").to_string();
    let status = d.stop();
    assert!(status.success(), "the daemon's stop: {status}");
    gone(&id2, "after the daemon stopped");
    assert!(
        !Path::new(&d.socket()).exists(),
        "the daemon left its socket behind"
    );
}
