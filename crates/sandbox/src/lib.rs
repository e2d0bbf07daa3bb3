//! nanoclaw's engine: run a command in a sandbox that assumes it is hostile.
//!
//! One input type ([`SandboxSpec`]) and one output type ([`Outcome`]) cross
//! every boundary. The native backend ([`native`]) realises a spec with
//! namespaces, a read-only root, cgroups, seccomp and Landlock, with no
//! daemon and no image. Long-lived sandboxes, whatever realises them, are
//! driven through the [`Backend`] and [`LiveSandbox`] traits ([`backend`]).
//!
//! ```no_run
//! use nanoclaw_sandbox::{run, SandboxSpec};
//! let outcome = run(&SandboxSpec::new(["python3", "-c", "print(6*7)"])).unwrap();
//! assert_eq!(outcome.stdout, b"42\n");
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod native;
pub mod netns_egress;
pub mod outcome;
pub mod procs;
pub mod spec;
pub mod units;
/// The egress crate (credential rules, policy types), for callers that
/// build specs.
pub use nanoclaw_net as net;

pub use backend::{
    Backend, Capabilities, Echo, Execution, LiveSandbox, NativeInProcess, NativeKeeper,
    SandboxConfig, SandboxInfo, SandboxStats,
};
pub use error::Error;
pub use native::{kill, run, start, wait, KillHandle, RunOptions, Sandbox};
pub use outcome::{KillReason, Layers, Outcome};
pub use spec::SandboxSpec;
pub mod keeper;
