//! A sandbox configuration as a Docker container: a pure function from
//! [`SandboxConfig`] to the Engine API's create body, and the [`Layers`]
//! that body applies (seed 002's recipe, by default).

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use nanoclaw_sandbox::backend::SandboxConfig;
use nanoclaw_sandbox::spec::{Access, Root, Seccomp};
use nanoclaw_sandbox::{Error, Layers};

use crate::NAME;

/// Where nanoclaw's own (static) binary is mounted read-only in every
/// container: it is the container's first process (`__docker-init`), which
/// reaps orphans and ends the container when its lifetime is over.
pub const INIT_PATH: &str = "/.nanoclaw/init";

/// Paths hidden inside the container: Docker's defaults plus what the
/// native engine hides too (`/proc/key-users`, `kallsyms`, `kpage*`, ...).
/// Setting them replaces Docker's list, so its entries are repeated here.
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/key-users",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/kallsyms",
    "/proc/kpagecount",
    "/proc/kpageflags",
    "/proc/kpagecgroup",
    "/proc/config.gz",
    "/proc/driver",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Label on every container nanoclaw makes (`nanoclaw.backend=docker`).
pub const LABEL_BACKEND: &str = "nanoclaw.backend";
/// Label: the sandbox id.
pub const LABEL_ID: &str = "nanoclaw.id";
/// Label: `PID:STARTTIME` of the process that made the container; a
/// container whose maker is gone (and that is not detached) is swept.
pub const LABEL_OWNER: &str = "nanoclaw.owner";

/// What the container is made from, besides the configuration.
pub struct Plan<'a> {
    /// The sandbox id (also the container's name, `nanoclaw-<id>`).
    pub id: &'a str,
    /// The image (a reference in Docker's store).
    pub image: &'a str,
    /// nanoclaw's binary on the host (mounted at [`INIT_PATH`]).
    pub init: &'a str,
    /// `runsc` when Docker has gVisor configured, else Docker's default.
    pub runtime: Option<&'a str>,
    /// This process, `PID:STARTTIME` ([`LABEL_OWNER`]).
    pub owner: &'a str,
    /// The image's own environment (`KEY=VALUE`), put before the spec's.
    pub image_env: &'a [String],
}

/// The image reference a configuration asks for (only
/// [`Root::Image`]; [`crate::Docker`]'s capabilities refuse the others).
pub fn image_of(config: &SandboxConfig) -> Result<&str, Error> {
    match &config.spec.root {
        Root::Image(r) => Ok(r),
        _ => Err(host_root_refused()),
    }
}

/// The error for a root Docker cannot use.
pub fn host_root_refused() -> Error {
    Error::NotSupported {
        backend: NAME.into(),
        field: "the host root".into(),
        why: "a container needs an image: pass --image REF (an image in Docker's store, e.g. `docker pull python:3.12-slim` first)".into(),
    }
}

/// Docker's `--security-opt seccomp=` value for the configuration's
/// filter: nanoclaw's default profile (the native engine's, in Docker's
/// JSON), the user's profile, or none.
fn seccomp_opt(s: &Seccomp) -> Result<(String, String, Vec<String>), Error> {
    match s {
        Seccomp::Default => {
            let (v, lost) =
                crate::seccomp::for_docker(nanoclaw_sandbox::native::seccomp::DEFAULT_PROFILE_JSON)
                    .map_err(|e| Error::InvalidSpec(format!("nanoclaw's seccomp profile: {e}")))?;
            Ok((
                format!("seccomp={v}"),
                "nanoclaw-default (as Docker JSON)".into(),
                lost,
            ))
        }
        Seccomp::Profile(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::Sys {
                call: format!("reading seccomp profile {}", p.display()),
                source: e,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::InvalidSpec(format!(
                    "--seccomp {}: not a JSON seccomp profile: {e}",
                    p.display()
                ))
            })?;
            Ok((
                format!("seccomp={v}"),
                format!("profile:{}", p.display()),
                Vec::new(),
            ))
        }
        Seccomp::Unconfined => Ok(("seccomp=unconfined".into(), "unconfined".into(), Vec::new())),
    }
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The container for `config` and what protects it.
pub fn create_body(
    config: &SandboxConfig,
    plan: &Plan<'_>,
) -> Result<(ContainerCreateBody, Layers), Error> {
    let s = &config.spec;
    let l = &s.limits;
    let mut layers = Layers {
        mode: "docker".into(),
        namespaces: ["mount", "pid", "ipc", "uts", "net", "cgroup"]
            .map(String::from)
            .to_vec(),
        uid_map: "none (Docker without userns-remap: ids inside are host ids)".into(),
        landlock: "none (not available through Docker)".into(),
        no_new_privs: true,
        capabilities: s.hardening.cap_add.clone(),
        ..Layers::default()
    };
    let (seccomp, seccomp_name, lost) = seccomp_opt(&s.hardening.seccomp)?;
    layers.seccomp = seccomp_name;
    layers.degraded.extend(lost);
    let mut host = HostConfig {
        readonly_rootfs: Some(true),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(s.hardening.cap_add.clone()),
        security_opt: Some(vec!["no-new-privileges:true".into(), seccomp]),
        network_mode: Some("none".into()),
        pids_limit: l.pids.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
        nano_cpus: l.cpus.map(|c| (c * 1e9) as i64),
        blkio_weight: Some(500),
        init: Some(false),
        auto_remove: Some(true),
        runtime: plan.runtime.map(String::from),
        masked_paths: Some(MASKED_PATHS.iter().map(|p| p.to_string()).collect()),
        ..HostConfig::default()
    };
    if let Some(m) = l.memory {
        host.memory = Some(i64::try_from(m).unwrap_or(i64::MAX));
        // No swap unless asked (Docker's default would double it).
        host.memory_swap = Some(i64::try_from(l.memory_swap.unwrap_or(m)).unwrap_or(i64::MAX));
    }
    let mut tmpfs = HashMap::new();
    tmpfs.insert(
        "/tmp".to_string(),
        format!(
            "rw,noexec,nosuid,nodev,mode=1777,size={}",
            l.tmpfs_size.max(1 << 20)
        ),
    );
    // POSIX message queues are not writable (as in the native engine).
    tmpfs.insert(
        "/dev/mqueue".to_string(),
        "ro,noexec,nosuid,nodev,size=4k".to_string(),
    );
    if let Some(home) = &s.home {
        tmpfs.insert(
            home.display().to_string(),
            format!(
                "rw,nosuid,nodev,mode=0700,uid={},gid={},size={}",
                s.user.uid,
                s.user.gid,
                l.tmpfs_size.max(1 << 20)
            ),
        );
    }
    host.tmpfs = Some(tmpfs);
    let mut binds = vec![format!("{}:{INIT_PATH}:ro", plan.init)];
    for m in &s.mounts {
        let mode = match m.access {
            Access::Ro => "ro",
            Access::Rw => "rw",
        };
        binds.push(format!(
            "{}:{}:{mode}",
            m.source.display(),
            m.target.display()
        ));
    }
    host.binds = Some(binds);
    layers.cgroup = vec![
        format!(
            "memory: {}",
            l.memory.map_or("none".into(), |m| m.to_string())
        ),
        format!("cpus: {}", l.cpus.map_or("none".into(), |c| c.to_string())),
        format!("pids: {}", l.pids.map_or("none".into(), |p| p.to_string())),
        "blkio weight: 500".into(),
    ];
    if let Some(r) = plan.runtime {
        layers.namespaces.push(format!("runtime: {r}"));
    }
    let mut labels: HashMap<String, String> = config.labels.iter().cloned().collect();
    labels.insert(LABEL_BACKEND.into(), NAME.into());
    labels.insert(LABEL_ID.into(), plan.id.into());
    labels.insert(LABEL_OWNER.into(), plan.owner.into());
    let mut env: Vec<String> = plan.image_env.to_vec();
    if crate::egress::proxied(&s.network) {
        env.extend(
            nanoclaw_sandbox::netns_egress::proxy_env()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        layers.namespaces.retain(|n| n != "net");
        layers
            .namespaces
            .push(crate::egress::NAMESPACE_LAYER.into());
    }
    env.extend(s.env.iter().map(|(k, v)| format!("{k}={v}")));
    let lifetime = secs_ceil(l.timeout).max(1);
    let body = ContainerCreateBody {
        image: Some(plan.image.into()),
        entrypoint: Some(vec![INIT_PATH.into()]),
        cmd: Some(vec!["__docker-init".into(), lifetime.to_string()]),
        user: Some(format!("{}:{}", s.user.uid, s.user.gid)),
        env: Some(env),
        working_dir: s.workdir.as_ref().map(|w| w.display().to_string()),
        hostname: Some(s.hostname.clone()),
        network_disabled: Some(true),
        labels: Some(labels),
        host_config: Some(host),
        ..ContainerCreateBody::default()
    };
    Ok((body, layers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoclaw_sandbox::SandboxSpec;

    fn plan() -> Plan<'static> {
        Plan {
            id: "abc",
            image: "img:1",
            init: "/usr/bin/nanoclaw",
            runtime: None,
            owner: "1:2",
            image_env: &[],
        }
    }

    #[test]
    fn seed_002s_recipe_is_the_default() {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.root = Root::Image("img:1".into());
        let (b, layers) = create_body(&SandboxConfig::new(spec), &plan()).unwrap();
        let h = b.host_config.unwrap();
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.memory, Some(512 << 20));
        assert_eq!(h.memory_swap, h.memory, "no swap unless asked");
        assert_eq!(h.pids_limit, Some(256));
        assert_eq!(h.nano_cpus, Some(1_000_000_000));
        let sec = h.security_opt.unwrap();
        assert!(sec.contains(&"no-new-privileges:true".to_string()));
        assert!(sec[1].starts_with("seccomp={") && sec[1].contains("\"mount\""));
        assert!(!sec[1].contains("syscallsBeyondTable"));
        assert!(layers.degraded.iter().any(|d| d.contains("personality")));
        let tmp = &h.tmpfs.unwrap()["/tmp"];
        assert!(tmp.contains("noexec") && tmp.contains("nosuid") && tmp.contains("size="));
        assert_eq!(b.user.as_deref(), Some("1000:1000"));
        assert_eq!(b.labels.unwrap()[LABEL_BACKEND], "docker");
        assert_eq!(layers.seccomp, "nanoclaw-default (as Docker JSON)");
        assert!(layers.no_new_privs);
    }

    #[test]
    fn the_host_root_is_refused_with_what_to_pass_instead() {
        let c = SandboxConfig::new(SandboxSpec::new(Vec::<String>::new()));
        let e = image_of(&c).unwrap_err().to_string();
        assert!(e.starts_with("--backend docker: the host root is not supported: a container needs an image: pass --image"), "{e}");
    }
}
