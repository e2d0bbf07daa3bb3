//! The engine's [`Backend`] trait with the keeper backend (`native`: one
//! `nanoclaw __keeper` per sandbox), driven through trait objects only by
//! the scenario every backend goes through (`crates/sandbox/tests/
//! backend_scenario`). It needs this crate's binary, so it lives here. Run
//! as the invoking user and, when root, again as the rootless user
//! `nanotest` (this test re-executed as that user from a staged copy).
//!
//! Each run keeps its keepers' state in a directory of its own (not the
//! user's `sandbox ls` one), and checks it is empty afterwards.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nanoclaw_sandbox::backend::{Backend, NativeKeeper};

#[path = "../../sandbox/tests/backend_scenario/mod.rs"]
mod backend_scenario;
mod common;

/// Set (to the staged nanoclaw binary) in the rootless re-run.
const WORKER: &str = "NANOCLAW_BACKEND_KEEPER_EXE";
const TEST: &str = "native_keeper_backend_through_the_trait";

#[test]
fn native_keeper_backend_through_the_trait() {
    if let Some(exe) = std::env::var_os(WORKER) {
        return run_as("rootless", Path::new(&exe));
    }
    let mode = if common::is_root() {
        "root"
    } else {
        "invoking-user"
    };
    run_as(mode, Path::new(env!("CARGO_BIN_EXE_nanoclaw")));
    if !common::is_root() {
        println!("NOTE {TEST}: not root, so the run above was the rootless run");
        return;
    }
    match common::rootless_user() {
        Some(ids) => rerun_rootless(ids),
        None => {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_ROOTLESS").as_deref() != Ok("1"),
                "NANOCLAW_REQUIRE_ROOTLESS=1 but user `nanotest` does not exist"
            );
            println!("SKIPPED {TEST} (rootless): user `nanotest` does not exist");
        }
    }
}

/// The scenario with keepers run from `exe`, their state in a fresh
/// directory.
fn run_as(mode: &str, exe: &Path) {
    let dir = std::env::temp_dir().join(format!("nanoclaw-backend-keeper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("state parent");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let root = dir.join("sandboxes");
    let backend: Box<dyn Backend> = Box::new(NativeKeeper::new(exe, &root).expect("state root"));
    let r = backend_scenario::run(&*backend, mode);
    let left: Vec<PathBuf> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        panic!("backend {} ({mode}): FAIL {e}", backend.name());
    }
    assert!(
        left.is_empty(),
        "({mode}) keeper state left behind: {left:?}"
    );
}

/// This test again, as `nanotest`, from world-readable copies of the test
/// binary and of nanoclaw.
fn rerun_rootless((uid, gid): (u32, u32)) {
    let stage = std::env::temp_dir().join(format!("nanoclaw-backend-stage-{}", std::process::id()));
    std::fs::create_dir_all(&stage).expect("stage dir");
    let copy = |from: &Path, name: &str| {
        let to = stage.join(name);
        std::fs::copy(from, &to).expect("stage a copy");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        to
    };
    std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let test = copy(&std::env::current_exe().expect("test binary"), "test");
    let exe = copy(Path::new(env!("CARGO_BIN_EXE_nanoclaw")), "nanoclaw");
    let status = Command::new("setpriv")
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
        .args(["--clear-groups", "--"])
        .arg(&test)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env(WORKER, &exe)
        .current_dir("/")
        .status();
    let _ = std::fs::remove_dir_all(&stage);
    let status = status.expect("running setpriv");
    assert!(status.success(), "{TEST} (rootless) failed: {status}");
}
