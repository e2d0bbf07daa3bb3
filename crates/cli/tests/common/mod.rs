//! Helpers shared by the black-box tests: who runs nanoclaw (the invoking
//! user, and rootless as `nanotest`), and how.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

pub const ROOTLESS_USER: &str = "nanotest";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn rootless_user() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == ROOTLESS_USER {
            return Some((f[2].parse().ok()?, f[3].parse().ok()?));
        }
    }
    None
}

/// Who runs nanoclaw in a scenario.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub name: &'static str,
    pub user: Option<(u32, u32)>,
}

/// The invoking user, plus the rootless user when we are root and it exists.
pub fn modes(test: &str) -> Vec<Mode> {
    let mut v = vec![Mode {
        name: if is_root() { "root" } else { "invoking-user" },
        user: None,
    }];
    let required = std::env::var("NANOCLAW_REQUIRE_ROOTLESS").is_ok_and(|x| x == "1");
    match (is_root(), rootless_user()) {
        (true, Some(u)) => v.push(Mode {
            name: "rootless",
            user: Some(u),
        }),
        (true, None) => {
            assert!(
                !required,
                "{test}: NANOCLAW_REQUIRE_ROOTLESS=1 but user `nanotest` does not exist"
            );
            eprintln!("SKIPPED {test} (rootless): user `nanotest` does not exist (CI: useradd -u 1500 -m nanotest)");
        }
        (false, _) => {
            eprintln!("NOTE {test}: not root, so the invoking-user run is the rootless run");
        }
    }
    v
}

/// Removes `$TMPDIR/<prefix><pid>` folders of test processes that are gone
/// (a per-process folder cannot be removed by the process at exit).
pub fn remove_stale(prefix: &str) {
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(prefix) {
            if pid.bytes().all(|b| b.is_ascii_digit())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A world-readable copy of the binary for the rootless user.
pub fn staged_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Earlier runs' copies (their test process is gone) are removed here.
        remove_stale("nanoclaw-cli-test-");
        let dir = std::env::temp_dir().join(format!("nanoclaw-cli-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("stage dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod stage dir");
        let bin = dir.join("nanoclaw");
        fs::copy(env!("CARGO_BIN_EXE_nanoclaw"), &bin).expect("copy binary");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        bin
    })
}

pub fn bin_for(mode: Mode) -> PathBuf {
    match mode.user {
        Some(_) => staged_bin().to_path_buf(),
        None => PathBuf::from(env!("CARGO_BIN_EXE_nanoclaw")),
    }
}

/// `nanoclaw ARGS` for this mode; setpriv execs, so the child's pid is nanoclaw's.
pub fn nc(mode: Mode, args: &[&str]) -> Command {
    let mut c = match mode.user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
                "--",
            ]);
            c.arg(bin_for(mode));
            c
        }
        None => Command::new(bin_for(mode)),
    };
    c.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .current_dir("/")
        .stdin(Stdio::null());
    c
}

pub fn run(mode: Mode, args: &[&str]) -> Output {
    nc(mode, args).output().expect("spawn nanoclaw")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("nanoclaw itself died of a signal: {:?}", o.status))
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `python -m pytest -q -p no:cacheprovider SUITE` with the venv's Python,
/// from the repository's root, pointed at an E2B-compatible daemon: its
/// URL and the API keys of tenants A and B (the suites' conftest.py reads
/// them), the SDK required. Callers add their suite's own settings.
pub fn e2b_pytest(venv: &Path, suite: &str, url: &str, keys: (&str, &str)) -> Command {
    let mut c = Command::new(venv.join("bin/python"));
    c.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", suite])
        .current_dir(repo())
        .env("NANOCLAW_E2B_API_URL", url)
        .env("NANOCLAW_E2B_API_KEY", keys.0)
        .env("NANOCLAW_E2B_API_KEY_B", keys.1)
        .env("NANOCLAW_REQUIRE_E2B", "1");
    c
}

/// The venv with the pinned Python packages (tests/python/requirements.txt,
/// made by .ci/python-venv.sh): `$NANOCLAW_VENV`, else `venv` in the target
/// dir. `None` after a SKIP line naming `what` the suite needs from it; a
/// failure instead when `NANOCLAW_REQUIRE_E2B=1` (CI).
pub fn venv(what: &str) -> Option<PathBuf> {
    let v = std::env::var_os("NANOCLAW_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo().join("target"))
                .join("venv")
        });
    if v.join("bin/python").exists() {
        return Some(v);
    }
    let required = std::env::var("NANOCLAW_REQUIRE_E2B").is_ok_and(|x| x == "1");
    assert!(
        !required,
        "NANOCLAW_REQUIRE_E2B=1 but there is no venv at {} (run .ci/python-venv.sh)",
        v.display()
    );
    eprintln!(
        "SKIPPED: no Python venv with {what} at {} (run .ci/python-venv.sh, or set NANOCLAW_VENV)",
        v.display()
    );
    None
}
pub mod testnet;

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `what` (a server the test started as `child`) accepts
/// connections on 127.0.0.1:`port`. The test fails — and the server is
/// killed, not left behind — if it exits first or `patience` passes.
pub fn wait_listening(child: &mut Child, port: u16, patience: std::time::Duration, what: &str) {
    let deadline = std::time::Instant::now() + patience;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = child.try_wait().ok().flatten();
        let late = std::time::Instant::now() >= deadline;
        if exited.is_some() || late {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(exited.is_none(), "{what} exited at start: {exited:?}");
        assert!(
            !late,
            "{what} did not listen on port {port} within {patience:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
