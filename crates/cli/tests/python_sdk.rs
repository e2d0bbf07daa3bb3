//! The Python SDK (`sdk/python`, seed 000's `NanoClaw`) against the real
//! binary: its pytest suite (`sdk/python/tests`), run from the venv
//! `.ci/python-venv.sh` makes (`NANOCLAW_VENV`), with the package taken
//! from the source tree (`PYTHONPATH=sdk/python/src`: nothing is
//! installed). The suite starts embedded daemons itself (`NANOCLAW_BIN`)
//! and the fake model server binary (`NANOCLAW_FAKELLM`: `nanoclaw-fakellm`
//! beside `nanoclaw` in the target folder, built by `cargo test
//! --workspace` for the fakellm crate's own tests).
//!
//! Skipped (passing) without the venv or the fake's binary, unless
//! `NANOCLAW_REQUIRE_E2B=1`; skipped when not root (the agents' sandboxes
//! need root; CI runs these as root). The register_image tests need
//! docker's `nanoclaw-bench:latest` (imported into a private image store
//! as the Dockerfiles' FROM image): they alone may skip, and only when
//! `NANOCLAW_REQUIRE_DOCKER` is not 1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{is_root, repo, venv};

fn required() -> bool {
    std::env::var("NANOCLAW_REQUIRE_E2B").is_ok_and(|x| x == "1")
}

/// Says why the test cannot run: a failure when required, else SKIP.
fn missing(what: String) -> Option<PathBuf> {
    assert!(!required(), "NANOCLAW_REQUIRE_E2B=1 but {what}");
    eprintln!("SKIPPED python_sdk: {what}");
    None
}

/// `nanoclaw-fakellm`: `$NANOCLAW_FAKELLM`, else beside `nanoclaw`.
fn fakellm() -> Option<PathBuf> {
    let p = std::env::var_os("NANOCLAW_FAKELLM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_nanoclaw")).with_file_name("nanoclaw-fakellm")
        });
    if p.is_file() {
        return Some(p);
    }
    missing(format!(
        "the fake model server {} is not built (cargo build --release -p nanoclaw-fakellm, \
         or cargo test --workspace; or set NANOCLAW_FAKELLM)",
        p.display()
    ))
}

#[test]
fn python_sdk_pytest_suite() {
    if !is_root() {
        eprintln!("SKIPPED python_sdk: the agents' sandboxes need root (CI runs these as root)");
        return;
    }
    let (Some(venv), Some(fake)) = (venv("pytest and httpx"), fakellm()) else {
        return;
    };
    let sdk = repo().join("sdk/python");
    let o = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests",
        ])
        .current_dir(&sdk)
        .env("PYTHONPATH", sdk.join("src"))
        .env("NANOCLAW_BIN", env!("CARGO_BIN_EXE_nanoclaw"))
        .env("NANOCLAW_FAKELLM", &fake)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{out}\n{err}");
    assert!(o.status.success(), "pytest sdk/python/tests failed");
    // Every test ran (NANOCLAW_BIN and the fake were given), but those
    // needing the bench image when docker lacks it and is not required.
    let docker_required = std::env::var("NANOCLAW_REQUIRE_DOCKER").is_ok_and(|x| x == "1");
    for line in out.lines().filter(|l| l.starts_with("SKIPPED")) {
        assert!(
            !docker_required && line.contains("nanoclaw-bench"),
            "pytest skipped a test it should have run: {line}"
        );
    }
}
