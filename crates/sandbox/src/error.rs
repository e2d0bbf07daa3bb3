//! The engine's typed errors.

use std::io;

/// Everything that can go wrong while setting up or running a sandbox.
///
/// Each variant names what failed; `Display` says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec asks for something impossible or unsafe.
    #[error("{0}")]
    InvalidSpec(String),
    /// The host cannot provide a feature the spec needs.
    #[error("{what}: {why}; {fix}")]
    Unsupported {
        /// The feature.
        what: String,
        /// Why it is unavailable.
        why: String,
        /// How to make it available.
        fix: String,
    },
    /// A system call failed in the runner (outside the sandbox).
    #[error("{call} failed: {source}")]
    Sys {
        /// The call and its subject, e.g. "clone(CLONE_NEWUSER)".
        call: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up the sandbox failed inside the child, before the command ran.
    #[error("sandbox setup failed at {step}: {source}")]
    Setup {
        /// The step, e.g. "pivot_root".
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The sandbox's setup did not finish in time; it was killed.
    #[error(
        "sandbox setup did not finish within {}s and was stopped; the host may be \
         overloaded or stalled (check `dmesg` and the load), then retry",
        .0.as_secs()
    )]
    SetupTimeout(std::time::Duration),
    /// A command was sent to a paused sandbox.
    #[error("sandbox {id} is paused: resume it before running anything in it")]
    Paused {
        /// The sandbox.
        id: String,
    },
    /// A path (or other object) inside a sandbox does not exist.
    #[error("sandbox {id}: {what}")]
    NotFound {
        /// The sandbox.
        id: String,
        /// What was looked for, and the sandboxed tool's message.
        what: String,
    },
    /// A backend cannot honour a field of a sandbox configuration (see
    /// [`crate::backend::Capabilities`]).
    #[error("--backend {backend}: {field} is not supported: {why}")]
    NotSupported {
        /// The backend's name, e.g. `docker`.
        backend: String,
        /// The field, as the command line names it, e.g. `--exec-allow`.
        field: String,
        /// Why, and what to use instead.
        why: String,
    },
    /// The process that holds a sandbox for a backend (a keeper; a
    /// container runtime or a VM monitor later) failed, hung up or did not
    /// answer in time.
    #[error("{backend}: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What went wrong.
        message: String,
    },
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] crate::native::cgroup::CgroupError),
    /// Building or installing the seccomp filter failed.
    #[error(transparent)]
    Seccomp(#[from] crate::native::seccomp::SeccompError),
    /// A capability name was refused.
    #[error(transparent)]
    Cap(#[from] crate::native::caps::CapError),
    /// Landlock failed.
    #[error(transparent)]
    Landlock(#[from] crate::native::landlock::LandlockError),
    /// A rootful sandbox could not get host ids of its own.
    #[error(transparent)]
    IdSlot(#[from] crate::native::idslot::IdSlotError),
}

impl Error {
    pub(crate) fn sys(call: impl Into<String>) -> Self {
        Error::Sys {
            call: call.into(),
            source: io::Error::last_os_error(),
        }
    }
}
