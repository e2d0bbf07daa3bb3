//! `nanoclaw doctor`: what this host supports and what a run gets.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

/// Options of `nanoclaw doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    /// What a run gets (or loses) because of it.
    effect: String,
    /// Machine-readable details (`--json` only), e.g. the cgroup probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

fn read(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn checks() -> Vec<Check> {
    let mut v = Vec::new();
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let rootful = euid == 0;
    v.push(Check {
        name: "mode",
        ok: true,
        detail: if rootful {
            "rootful (running as root)".into()
        } else {
            format!("rootless (uid {euid})")
        },
        effect: if rootful {
            "sandbox ids map to an unprivileged host range of their own; cgroups available".into()
        } else {
            "the sandbox user maps to your own uid; cgroup limits need delegation".into()
        },
        data: None,
    });

    let max_userns = read("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    let unpriv = read("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let userns_ok = max_userns != "0"
        && (rootful || (unpriv.as_deref() != Some("0") && apparmor.as_deref() != Some("1")));
    v.push(Check {
        name: "user namespaces",
        ok: userns_ok,
        detail: format!(
            "user.max_user_namespaces={max_userns}, kernel.unprivileged_userns_clone={}, kernel.apparmor_restrict_unprivileged_userns={}",
            unpriv.as_deref().unwrap_or("n/a"),
            apparmor.as_deref().unwrap_or("n/a")
        ),
        effect: if userns_ok {
            "sandboxes can start".into()
        } else {
            "sandboxes cannot start: enable the sysctl named above, or run as root".into()
        },
        data: None,
    });

    if rootful {
        use nanoclaw_sandbox::native::{idslot, ROOTFUL_ID_COUNT};
        let r = idslot::report();
        let (first, last) = (
            idslot::slot_base(idslot::SLOTS.start),
            idslot::slot_base(idslot::SLOTS.end - 1) + (ROOTFUL_ID_COUNT - 1),
        );
        v.push(Check {
            name: "host ids",
            ok: r.in_use < r.usable,
            detail: format!(
                "{} id slots of {ROOTFUL_ID_COUNT} in host ids {first}-{last} (clear of /etc/subuid and /etc/subgid), {} in use (locks under {})",
                r.usable, r.in_use, r.dir
            ),
            effect: format!(
                "each rootful sandbox runs as host ids of its own, in a user namespace owned by them, so per-user kernel limits (inotify, pipes, epoll, namespaces) are per sandbox{}",
                if r.image_layers_shifted {
                    ""
                } else {
                    "; image sandboxes keep the shared storage range as ids (overlayfs on idmapped layers needs Linux 5.19), with a namespace owner of their own"
                }
            ),
            data: serde_json::to_value(&r).ok(),
        });
    }

    let cg = nanoclaw_sandbox::native::cgroup::probe();
    let per_controller: Vec<String> = cg
        .controllers
        .iter()
        .map(|c| match (&c.version, c.usable, &c.why) {
            (Some(v), true, _) => format!(
                "{} {} ({})",
                c.name,
                format!("{v:?}").to_lowercase(),
                c.parent.as_deref().unwrap_or(Path::new("?")).display()
            ),
            (_, false, why) => format!(
                "{} unusable: {}{}",
                c.name,
                why.as_deref().unwrap_or("not offered by the kernel"),
                c.fix
                    .as_deref()
                    .map(|f| format!(" (fix: {f})"))
                    .unwrap_or_default()
            ),
            (None, true, _) => format!("{} ?", c.name),
        })
        .collect();
    v.push(Check {
        name: "cgroups",
        ok: cg.can_limit_all,
        detail: format!(
            "{}{}",
            cg.mode,
            cg.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_else(|| format!(": {}", per_controller.join("; ")))
        ),
        effect: if cg.can_limit_all {
            "memory, cpu and pids limits are enforced by these controllers".into()
        } else {
            "not every limit can be enforced: without a memory cgroup a sandbox has no memory limit as a whole (each process is held by RLIMIT_DATA, which shared memory and several processes get around; memfd_create and shmget are refused), pids fall back to RLIMIT_NPROC and cpus are dropped, with a warning on every run; an explicit --memory, --cpus or --pids is refused (125)".into()
        },
        data: serde_json::to_value(&cg).ok(),
    });

    let seccomp = read("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Seccomp:"));
    v.push(Check {
        name: "seccomp",
        ok: seccomp,
        detail: format!(
            "seccomp-bpf {}; default filter: {} instructions",
            if seccomp { "available" } else { "missing" },
            nanoclaw_sandbox::native::seccomp::default_filter().len()
        ),
        effect: if seccomp {
            "the default syscall filter is installed in every sandbox".into()
        } else {
            "sandboxes cannot be started safely: the kernel lacks CONFIG_SECCOMP_FILTER".into()
        },
        data: None,
    });

    let ll = nanoclaw_sandbox::native::landlock::abi_version();
    v.push(Check {
        name: "landlock",
        ok: ll.is_some(),
        detail: match ll {
            Some(a) => format!("ABI {a}"),
            None => "unavailable".into(),
        },
        effect: match ll {
            Some(a) if a >= 6 => {
                "write/exec rules plus scoped signals and abstract unix sockets".into()
            }
            Some(_) => "write/exec rules (no IPC scoping on this ABI)".into(),
            None => "no Landlock defence in depth; --exec-allow is refused".into(),
        },
        data: None,
    });

    let fs = read("/proc/filesystems").unwrap_or_default();
    let overlay = fs.contains("overlay");
    v.push(Check {
        name: "overlayfs",
        ok: overlay,
        detail: if overlay {
            "available".into()
        } else {
            "missing (module not loaded?)".into()
        },
        effect: "image roots are stacked with overlayfs".into(),
        data: None,
    });
    let kvm = Path::new("/dev/kvm").exists();
    v.push(Check {
        name: "kvm",
        ok: kvm,
        detail: if kvm {
            "/dev/kvm present".into()
        } else {
            "/dev/kvm absent".into()
        },
        effect: "a micro-VM backend would need it".into(),
        data: None,
    });
    let nft = nanoclaw_net::kernel::nftables_available();
    v.push(Check {
        name: "nftables",
        ok: matches!(nft, Ok(true)),
        detail: match &nft {
            Ok(true) => "nf_tables answers (netlink)".into(),
            Ok(false) => "the kernel has no nf_tables (CONFIG_NF_TABLES)".into(),
            Err(e) => format!("not checked: {e}"),
        },
        effect: "kernel-level egress rules (--network kernel, rootful); the proxy allowlist works without it".into(),
        data: None,
    });
    v
}

/// Runs `nanoclaw doctor`: the host's checks, then one row per backend
/// (`crate::backends`), whose absence does not fail the doctor.
pub fn run(a: DoctorArgs) -> Result<u8> {
    let checks = checks();
    let backends = crate::backends::availability();
    if a.json {
        // One array: the host's checks, then a `backend:NAME` entry per
        // backend (`data` says whether it is built and usable).
        let mut v = serde_json::to_value(&checks)?;
        if let Some(a) = v.as_array_mut() {
            for b in &backends {
                a.push(serde_json::json!({
                    "name": format!("backend:{}", b.name),
                    "ok": b.available,
                    "detail": b.detail,
                    "effect": if b.available { format!("--backend {} works here", b.name) } else { format!("to use it: {}", b.install) },
                    "data": b,
                }));
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for c in &checks {
            println!(
                "{} {:<16} {}\n    → {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail,
                c.effect
            );
        }
        println!("\nbackends (--backend NAME, sandbox.backend):");
        for b in &backends {
            let state = match (b.built, b.available) {
                (true, true) => "ok  ",
                (true, false) => "n/a ",
                (false, _) => "--  ",
            };
            println!("{state} {:<16} {}", b.name, b.detail);
            if !b.install.is_empty() {
                println!("    → to use it: {}", b.install);
            }
        }
    }
    Ok(
        if checks
            .iter()
            .all(|c| c.ok || c.name == "kvm" || c.name == "nftables" || c.name == "overlayfs")
        {
            0
        } else {
            1
        },
    )
}
