//! The [`Backend`] trait, driven through trait objects only, with the
//! in-process native backend: root and rootless (custom harness, see
//! tests/common). The keeper backend (`native`) needs the nanoclaw binary
//! and is driven through the same scenario by
//! `crates/cli/tests/backend_keeper.rs`.

use std::process::ExitCode;

use nanoclaw_sandbox::backend::{Backend, NativeInProcess};

mod backend_scenario;
mod common;

fn main() -> ExitCode {
    common::main_with("backend", scenarios)
}

fn scenarios(mode: &str) -> ExitCode {
    let backend: Box<dyn Backend> = Box::new(NativeInProcess);
    match backend_scenario::run(&*backend, mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backend {} ({mode}): FAIL {e}", backend.name());
            ExitCode::FAILURE
        }
    }
}
