//! The one place a backend is chosen by name (`--backend`, the config's
//! `sandbox.backend`) and probed (`nanoclaw doctor`).
//!
//! Adding a backend is three arms, all in this file: one in
//! [`backend_by_name`] (build it), one in [`probe`] (is it usable here, and
//! what to install), and, if its images come from its own store rather
//! than nanoclaw's, one in [`store_images`]. Everything else — `nanoclaw
//! run --backend X` (create, exec, destroy), `sandbox create/exec/ls/rm/
//! prune` and the config — goes through the engine's `Backend` trait and
//! needs no change.
//!
//! How a sandbox that outlives the CLI is found again: `native` ones by
//! their keeper's state directory (as before); every other backend keeps
//! its own record with the sandbox ([`nanoclaw_sandbox::backend::Backend::
//! list`]: Docker uses the container's labels, a micro-VM its holder's
//! record) and is asked, in [`NAMES`] order, by `sandbox exec/ls/rm/prune`
//! ([`findable`]).

use anyhow::{anyhow, bail, Context, Result};
use nanoclaw_sandbox::backend::Backend;
use serde::Serialize;

/// Every backend name `--backend` and `sandbox.backend` accept, the
/// default first.
pub const NAMES: [&str; 5] = nanoclaw_policy::model::BACKENDS;

/// The default backend.
pub const NATIVE: &str = "native";

/// The backend `name`, ready to create sandboxes (for `native`: keepers,
/// as `nanoclaw sandbox create` makes them). An unknown name, a backend
/// this build lacks or one whose service does not answer is one clear
/// error (exit 125).
pub fn backend_by_name(name: &str) -> Result<Box<dyn Backend>> {
    match name {
        NATIVE => {
            let exe = std::env::current_exe().context("finding nanoclaw's own binary")?;
            let root = nanoclaw_sandbox::keeper::state_root()?;
            Ok(Box::new(nanoclaw_sandbox::NativeKeeper::new(exe, root)?))
        }
        "docker" => Ok(Box::new(nanoclaw_docker::Docker::connect()?)),
        "gvisor" => Ok(Box::new(nanoclaw_gvisor::Gvisor::new()?)),
        "microvm" => microvm(false),
        "kubernetes" => Ok(Box::new(nanoclaw_kubernetes::Kubernetes::connect(
            kube_options(),
        )?)),
        other => bail!(
            "--backend {other}: no such backend; use one of {}",
            NAMES.join(", ")
        ),
    }
}

/// The micro-VM backend; `holder`: every VM in a holder process of its
/// own (the daemon: QEMU is never started from its address space).
pub fn microvm(holder: bool) -> Result<Box<dyn Backend>> {
    let exe = std::env::current_exe().context("finding nanoclaw's own binary")?;
    let mut opts = nanoclaw_microvm::MicroVmOptions::new(exe)?;
    opts.holder = holder;
    Ok(Box::new(nanoclaw_microvm::MicroVm::new(opts)?))
}

/// Whether `--image REF` on backend `name` names an image in the
/// backend's own store (passed on as `Root::Image`) rather than in
/// nanoclaw's (resolved to layers here).
pub fn store_images(name: &str) -> bool {
    matches!(name, "docker" | "kubernetes")
}

/// Where `--backend kubernetes` makes its sandboxes: the config's
/// `kubernetes:` section when a command loaded one ([`set_kube_options`]),
/// else `KUBECONFIG` and the `NANOCLAW_K8S_*` variables
/// ([`nanoclaw_kubernetes::KubeOptions::from_env`]).
pub fn kube_options() -> nanoclaw_kubernetes::KubeOptions {
    KUBE_OPTIONS
        .get()
        .cloned()
        .unwrap_or_else(nanoclaw_kubernetes::KubeOptions::from_env)
}

static KUBE_OPTIONS: std::sync::OnceLock<nanoclaw_kubernetes::KubeOptions> =
    std::sync::OnceLock::new();

/// Sets [`kube_options`] for this process (the first call wins).
pub fn set_kube_options(opts: nanoclaw_kubernetes::KubeOptions) {
    let _ = KUBE_OPTIONS.set(opts);
}

/// The backend `--backend` (or, failing it, the config) chose: `flag`
/// when given, else `configured`, else native. Checked against [`NAMES`].
pub fn chosen(flag: Option<&str>, configured: Option<&str>) -> Result<String> {
    let name = flag.or(configured).unwrap_or(NATIVE);
    if !NAMES.contains(&name) {
        return Err(anyhow!(
            "--backend {name}: no such backend; use one of {}",
            NAMES.join(", ")
        ));
    }
    Ok(name.to_string())
}

/// One row of `nanoclaw doctor`'s backend table.
#[derive(Debug, Serialize)]
pub struct Availability {
    /// The backend's name.
    pub name: &'static str,
    /// Built into this nanoclaw.
    pub built: bool,
    /// Usable on this host now.
    pub available: bool,
    /// What was found.
    pub detail: String,
    /// What to install or start to use it (empty when available).
    pub install: String,
}

/// Every backend's availability here, in [`NAMES`] order.
pub fn availability() -> Vec<Availability> {
    NAMES.iter().map(|n| probe(n)).collect()
}

fn probe(name: &'static str) -> Availability {
    match name {
        NATIVE => Availability {
            name,
            built: true,
            available: true,
            detail: "namespaces, cgroups, seccomp, Landlock (see the checks above)".into(),
            install: String::new(),
        },
        "docker" => {
            let p = nanoclaw_docker::probe();
            Availability {
                name,
                built: true,
                available: p.available,
                detail: p.detail,
                install: p.install,
            }
        }
        "gvisor" => {
            let (available, detail, install) = match nanoclaw_gvisor::Gvisor::availability() {
                Ok(d) => (true, d, String::new()),
                Err(e) => (false, "runsc not usable".to_string(), e),
            };
            Availability {
                name,
                built: true,
                available,
                detail,
                install,
            }
        }
        "microvm" => {
            let made = std::env::current_exe()
                .map_err(|e| nanoclaw_sandbox::Error::Unsupported {
                    what: "--backend microvm".into(),
                    why: format!("nanoclaw's own binary: {e}"),
                    fix: String::new(),
                })
                .and_then(nanoclaw_microvm::MicroVmOptions::new)
                .and_then(nanoclaw_microvm::MicroVm::new);
            let (available, detail, install) = match made {
                Ok(vm) => (true, vm.describe(), String::new()),
                Err(nanoclaw_sandbox::Error::Unsupported { why, fix, .. }) => (false, why, fix),
                Err(e) => (false, e.to_string(), String::new()),
            };
            Availability {
                name,
                built: true,
                available,
                detail,
                install,
            }
        }
        "kubernetes" => {
            let p = nanoclaw_kubernetes::probe(&kube_options());
            Availability {
                name,
                built: true,
                available: p.available,
                detail: p.detail,
                install: p.install,
            }
        }
        _ => Availability {
            name,
            built: false,
            available: false,
            detail: "not built into this nanoclaw".into(),
            install: "a nanoclaw built with it".into(),
        },
    }
}

/// The non-native backends to ask for a sandbox by id or name: those
/// built here whose service answers (others cannot hold one now). Opening
/// the micro-VM backend sweeps what killed holders left.
pub fn findable() -> Vec<Box<dyn Backend>> {
    NAMES
        .iter()
        .filter(|n| **n != NATIVE && probe(n).available)
        .filter_map(|n| backend_by_name(n).ok())
        .collect()
}
