//! A sandbox configuration as Kubernetes objects: a pure function from
//! [`SandboxConfig`] to the sandbox's Pod (nanoclaw's hardening as its
//! security context), its NetworkPolicy, and the [`Layers`] they apply.
//! Nothing here talks to a cluster, so the translation is unit-tested.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nanoclaw_sandbox::backend::SandboxConfig;
use nanoclaw_sandbox::spec::{Network, Root, Seccomp};
use nanoclaw_sandbox::{Error, Layers};

use crate::NAME;

/// Label on every object nanoclaw makes (`nanoclaw.backend=kubernetes`).
pub const LABEL_BACKEND: &str = "nanoclaw.backend";
/// Label: the sandbox id (also in the objects' names, `nanoclaw-<id>`).
pub const LABEL_ID: &str = "nanoclaw.id";
/// Labels copied from the configuration's labels onto the Pod when their
/// value is a valid label value, so a cluster's own tools can select a
/// tenant's or an agent's sandboxes (`kubectl get pods -l nanoclaw.tenant=t`).
pub const SELECTABLE: &[&str] = &[
    "nanoclaw.serve",
    "nanoclaw.tenant",
    "nanoclaw.agent",
    "nanoclaw.session",
    "nanoclaw.name",
];
/// Annotation: the configuration's labels, exactly, as a JSON array of
/// pairs (label values cannot hold most strings).
pub const ANN_LABELS: &str = "nanoclaw.labels";
/// Annotation: the sandbox's layers, as JSON.
pub const ANN_LAYERS: &str = "nanoclaw.layers";
/// Annotation: when the sandbox's lifetime ends, in seconds since the epoch.
pub const ANN_DEADLINE: &str = "nanoclaw.deadline";
/// Annotation: `HOST PID:STARTTIME` of the process that made the sandbox;
/// a sandbox whose maker on this host is gone (and that is not detached)
/// is swept.
pub const ANN_OWNER: &str = "nanoclaw.owner";
/// The sandbox's container in its Pod.
pub const CONTAINER: &str = "sandbox";

/// Addresses that "open" egress never reaches (as the proxy refuses them
/// in the native engine's open mode): private, loopback, link-local (the
/// cloud metadata address), carrier-grade NAT.
const NOT_PUBLIC_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// What the objects are made from, besides the configuration.
pub struct Plan<'a> {
    /// The sandbox id.
    pub id: &'a str,
    /// The image reference, as the node's runtime resolves it.
    pub image: &'a str,
    /// `imagePullPolicy` (`IfNotPresent` unless configured).
    pub pull_policy: &'a str,
    /// `runtimeClassName`, when configured.
    pub runtime_class: Option<&'a str>,
    /// [`ANN_OWNER`]'s value.
    pub owner: &'a str,
    /// [`ANN_DEADLINE`]'s value.
    pub deadline: u64,
}

/// The name of sandbox `id`'s Pod and NetworkPolicy.
pub fn object_name(id: &str) -> String {
    format!("nanoclaw-{id}")
}

fn refused(field: &str, why: &str) -> Error {
    Error::NotSupported {
        backend: NAME.into(),
        field: field.into(),
        why: why.into(),
    }
}

/// What [`crate::Kubernetes`]' capabilities cannot see: a root user (a Pod
/// here always runs as non-root), an explicit pids limit (the Pod API has
/// none), seccomp other than the default, credential rules for egress, and
/// `--network allowlist` (a NetworkPolicy has no host names). Each is
/// refused by name.
pub fn refuse_unsupported(config: &SandboxConfig) -> Result<(), Error> {
    let s = &config.spec;
    if !matches!(s.root, Root::Image(_)) {
        return Err(refused(
            "the host root",
            "a Pod needs an image: pass --image REF (an image the cluster's nodes can pull or already have)",
        ));
    }
    if s.user.uid == 0 {
        return Err(refused(
            "--user 0 (root)",
            "sandbox Pods run as non-root (runAsNonRoot); pick a non-zero uid",
        ));
    }
    if s.limits.explicit.pids {
        return Err(refused(
            "--pids",
            "the Pod API has no per-Pod pids limit (the kubelet's podPidsLimit applies to every Pod); drop --pids",
        ));
    }
    if !s.egress.is_empty() {
        return Err(refused(
            "egress credential rules",
            "they need nanoclaw's egress proxy next to the sandbox, which a Pod does not have",
        ));
    }
    if let Network::Allowlist { .. } = s.network {
        return Err(refused(
            "--network allowlist",
            "a NetworkPolicy matches addresses and ports, not host names, and the egress proxy does not run next to a Pod; use --network kernel with --allow-cidr CIDR[:PORT] rules, or --network none",
        ));
    }
    if let Network::Kernel { cidrs } = &s.network {
        for c in cidrs {
            cidr_rule(c)?;
        }
    }
    Ok(())
}

/// One `CIDR[:PORT]` rule (IPv4) as an ipBlock and an optional TCP port.
fn cidr_rule(rule: &str) -> Result<(String, Option<u16>), Error> {
    let bad = |why: &str| {
        Error::InvalidSpec(format!(
            "--allow-cidr {rule}: {why} (the kubernetes backend takes IPv4 CIDR[:PORT], e.g. 10.0.0.0/8:443)"
        ))
    };
    let (cidr, port) = match rule.split_once(':') {
        Some((c, p)) => (
            c,
            Some(p.parse::<u16>().map_err(|_| bad("not a port after ':'"))?),
        ),
        None => (rule, None),
    };
    let (addr, prefix) = cidr.split_once('/').unwrap_or((cidr, "32"));
    addr.parse::<std::net::Ipv4Addr>()
        .map_err(|_| bad("not an IPv4 address"))?;
    match prefix.parse::<u8>() {
        Ok(p) if p <= 32 => Ok((format!("{addr}/{p}"), port)),
        _ => Err(bad("not a prefix length 0-32")),
    }
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Whether `v` is a valid label value (at most 63 characters of
/// `[A-Za-z0-9._-]`, alphanumeric at both ends).
pub fn valid_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    v.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

fn empty_dir(name: &str, size: u64) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(size.to_string())),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    }
}

/// The Pod for `config` and what protects it.
pub fn pod(config: &SandboxConfig, plan: &Plan<'_>) -> Result<(Pod, Layers), Error> {
    refuse_unsupported(config)?;
    let s = &config.spec;
    let l = &s.limits;
    let lifetime = secs_ceil(l.timeout).max(1);
    let mut layers = Layers {
        mode: "kubernetes".into(),
        namespaces: vec![
            "pod: mount, pid, ipc, uts, net (no host namespaces)".into(),
            format!(
                "runtimeClass: {}",
                plan.runtime_class.unwrap_or("the node's default")
            ),
        ],
        uid_map: "none (Kubernetes 1.20 has no user namespaces: ids inside are the node's ids)"
            .into(),
        landlock: "none (not available through Kubernetes)".into(),
        seccomp: "RuntimeDefault (the node's container runtime profile)".into(),
        no_new_privs: true,
        capabilities: Vec::new(),
        ..Layers::default()
    };
    if matches!(s.hardening.seccomp, Seccomp::Default) {
        layers
            .degraded
            .push("seccomp: the node's RuntimeDefault profile instead of nanoclaw's own".into());
    }
    if l.pids.is_some() {
        layers.degraded.push(
            "pids: no per-Pod limit in the Pod API; the kubelet's podPidsLimit applies".into(),
        );
    }
    layers.degraded.push(
        "network: a NetworkPolicy; it takes effect only where the cluster's network plugin enforces NetworkPolicy".into(),
    );
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if let Some(m) = l.memory {
        limits.insert("memory".to_string(), Quantity(m.to_string()));
        requests.insert("memory".to_string(), Quantity(m.to_string()));
    }
    if let Some(c) = l.cpus {
        let milli = ((c * 1000.0).ceil() as u64).max(1);
        limits.insert("cpu".to_string(), Quantity(format!("{milli}m")));
        // A tenth of the limit is reserved: sandboxes are mostly idle, and
        // a request of the whole limit would fit few on a node.
        requests.insert(
            "cpu".to_string(),
            Quantity(format!("{}m", (milli / 10).max(1))),
        );
    }
    layers.cgroup = vec![
        format!(
            "memory: {}",
            l.memory.map_or("none".into(), |m| m.to_string())
        ),
        format!("cpus: {}", l.cpus.map_or("none".into(), |c| c.to_string())),
        "pids: the kubelet's podPidsLimit".into(),
    ];
    let tmp_size = l.tmpfs_size.max(1 << 20);
    let mut volumes = vec![empty_dir("tmp", tmp_size)];
    let mut mounts = vec![mount("tmp", "/tmp")];
    let mut env: Vec<EnvVar> = Vec::new();
    if let Some(home) = &s.home {
        volumes.push(empty_dir("home", tmp_size));
        mounts.push(mount("home", &home.display().to_string()));
        env.push(EnvVar {
            name: "HOME".into(),
            value: Some(home.display().to_string()),
            ..EnvVar::default()
        });
    }
    env.extend(s.env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        ..EnvVar::default()
    }));
    let workdir = s
        .workdir
        .clone()
        .or_else(|| s.home.clone())
        .map_or("/tmp".to_string(), |w| w.display().to_string());

    let mut labels = BTreeMap::new();
    labels.insert(LABEL_BACKEND.to_string(), NAME.to_string());
    labels.insert(LABEL_ID.to_string(), plan.id.to_string());
    for key in SELECTABLE {
        if let Some(v) = nanoclaw_sandbox::backend::label(&config.labels, key) {
            if valid_label_value(v) {
                labels.insert((*key).to_string(), v.to_string());
            }
        }
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(
        ANN_LABELS.to_string(),
        serde_json::to_string(&config.labels).unwrap_or_default(),
    );
    annotations.insert(
        ANN_LAYERS.to_string(),
        serde_json::to_string(&layers).unwrap_or_default(),
    );
    annotations.insert(ANN_DEADLINE.to_string(), plan.deadline.to_string());
    annotations.insert(ANN_OWNER.to_string(), plan.owner.to_string());

    let uid = i64::from(s.user.uid);
    let gid = i64::from(s.user.gid);
    let container = Container {
        name: CONTAINER.into(),
        image: Some(plan.image.into()),
        image_pull_policy: Some(plan.pull_policy.into()),
        // The container's first process only holds the sandbox open until
        // its lifetime is over (the Pod's activeDeadlineSeconds ends it
        // too); every command is an exec.
        command: Some(vec!["sleep".into(), lifetime.to_string()]),
        env: Some(env),
        working_dir: Some(workdir),
        resources: Some(ResourceRequirements {
            limits: Some(limits),
            requests: Some(requests),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(uid),
            run_as_group: Some(gid),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let hostname = Some(s.hostname.clone()).filter(|h| {
        !h.is_empty() && valid_label_value(h) && !h.contains(['.', '_']) && h.to_lowercase() == *h
    });
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(object_name(plan.id)),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(i64::try_from(lifetime).unwrap_or(i64::MAX)),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: Some(false),
            host_pid: Some(false),
            host_ipc: Some(false),
            share_process_namespace: Some(false),
            hostname,
            runtime_class_name: plan.runtime_class.map(String::from),
            // The first process ignores SIGTERM (pid 1 without a handler):
            // a short grace, then SIGKILL.
            termination_grace_period_seconds: Some(1),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(uid),
                run_as_group: Some(gid),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    };
    Ok((pod, layers))
}

/// The sandbox's NetworkPolicy: no ingress; egress none (`--network
/// none`), to public addresses only (`--network open`), or to exactly the
/// `--allow-cidr` rules (`--network kernel`).
pub fn network_policy(config: &SandboxConfig, id: &str) -> Result<NetworkPolicy, Error> {
    let egress = match &config.spec.network {
        Network::None => Vec::new(),
        Network::Open { .. } => vec![NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: "0.0.0.0/0".into(),
                    except: Some(NOT_PUBLIC_V4.iter().map(|c| c.to_string()).collect()),
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: None,
        }],
        Network::Kernel { cidrs } => cidrs
            .iter()
            .map(|c| {
                let (cidr, port) = cidr_rule(c)?;
                Ok(NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        ip_block: Some(IPBlock { cidr, except: None }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: port.map(|p| {
                        vec![NetworkPolicyPort {
                            port: Some(IntOrString::Int(i32::from(p))),
                            protocol: Some("TCP".into()),
                            ..NetworkPolicyPort::default()
                        }]
                    }),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?,
        Network::Allowlist { .. } => {
            refuse_unsupported(config)?;
            Vec::new()
        }
    };
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_BACKEND.to_string(), NAME.to_string());
    labels.insert(LABEL_ID.to_string(), id.to_string());
    let mut selector = BTreeMap::new();
    selector.insert(LABEL_ID.to_string(), id.to_string());
    Ok(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(object_name(id)),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(Vec::new()),
            egress: Some(egress),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoclaw_sandbox::SandboxSpec;

    fn plan() -> Plan<'static> {
        Plan {
            id: "abc",
            image: "localhost/busybox:1",
            pull_policy: "Never",
            runtime_class: Some("runc"),
            owner: "host 1:2",
            deadline: 5,
        }
    }

    fn config() -> SandboxConfig {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.root = Root::Image("localhost/busybox:1".into());
        let mut c = SandboxConfig::new(spec);
        c.labels.push(("nanoclaw.tenant".into(), "team-a".into()));
        c.labels
            .push(("nanoclaw.agent".into(), "not a valid value!".into()));
        c
    }

    #[test]
    fn the_pod_carries_nanoclaws_hardening() {
        let (p, layers) = pod(&config(), &plan()).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.host_network, Some(false));
        assert_eq!(spec.host_pid, Some(false));
        assert_eq!(spec.host_ipc, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(30));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("runc"));
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(1000));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let r = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(r["memory"].0, (512u64 << 20).to_string());
        assert_eq!(r["cpu"].0, "1000m");
        let labels = p.metadata.labels.unwrap();
        assert_eq!(labels[LABEL_BACKEND], "kubernetes");
        assert_eq!(labels[LABEL_ID], "abc");
        assert_eq!(labels["nanoclaw.tenant"], "team-a");
        assert!(
            !labels.contains_key("nanoclaw.agent"),
            "an invalid value stays an annotation only"
        );
        assert!(p.metadata.annotations.unwrap()[ANN_LABELS].contains("not a valid value!"));
        assert_eq!(layers.mode, "kubernetes");
        assert!(layers.no_new_privs);
    }

    #[test]
    fn fields_it_cannot_honour_are_refused_by_name() {
        let mut c = config();
        c.spec.user.uid = 0;
        let e = pod(&c, &plan()).unwrap_err().to_string();
        assert!(
            e.starts_with("--backend kubernetes: --user 0 (root) is not supported"),
            "{e}"
        );
        let mut c = config();
        c.spec.limits.explicit.pids = true;
        let e = pod(&c, &plan()).unwrap_err().to_string();
        assert!(
            e.starts_with("--backend kubernetes: --pids is not supported"),
            "{e}"
        );
        let mut c = config();
        c.spec.network = Network::Allowlist {
            hosts: vec!["example.com".into()],
            cidrs: Vec::new(),
            limits: Default::default(),
            add_hosts: Vec::new(),
        };
        let e = pod(&c, &plan()).unwrap_err().to_string();
        assert!(
            e.starts_with("--backend kubernetes: --network allowlist is not supported"),
            "{e}"
        );
        let mut c = config();
        c.spec.root = Root::Host;
        let e = pod(&c, &plan()).unwrap_err().to_string();
        assert!(e.contains("pass --image"), "{e}");
    }

    #[test]
    fn the_network_policy_denies_egress_unless_allowed() {
        let np = network_policy(&config(), "abc").unwrap();
        let spec = np.spec.unwrap();
        assert_eq!(spec.egress, Some(Vec::new()));
        assert_eq!(spec.ingress, Some(Vec::new()));
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_string(), "Egress".to_string()])
        );
        let mut c = config();
        c.spec.network = Network::Kernel {
            cidrs: vec!["10.1.0.0/16:443".into(), "192.0.2.7".into()],
        };
        let e = network_policy(&c, "abc")
            .unwrap()
            .spec
            .unwrap()
            .egress
            .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr,
            "10.1.0.0/16"
        );
        assert_eq!(
            e[0].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(443))
        );
        assert_eq!(
            e[1].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr,
            "192.0.2.7/32"
        );
        c.spec.network = Network::Kernel {
            cidrs: vec!["::1/128".into()],
        };
        assert!(network_policy(&c, "abc").is_err());
    }
}
