//! The one input type: what to run and how to contain it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default memory limit: 512 MiB.
pub const DEFAULT_MEMORY: u64 = 512 * 1024 * 1024;
/// Default cpu quota, in cpus.
pub const DEFAULT_CPUS: f64 = 1.0;
/// Default maximum number of tasks (processes and threads).
pub const DEFAULT_PIDS: u64 = 256;
/// Default wall-clock timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default size of the writable `/tmp`.
pub const DEFAULT_TMPFS_SIZE: u64 = 100 * 1024 * 1024;
/// Default per-stream output limit.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 10 * 1024 * 1024;
/// Default sandbox user and group id.
pub const DEFAULT_UID: u32 = 1000;
/// Default sandbox group id.
pub const DEFAULT_GID: u32 = 1000;
/// Smallest memory limit the engine accepts (below it even `sh` cannot start).
pub const MIN_MEMORY: u64 = 4 * 1024 * 1024;

/// Everything the engine needs to run one command in one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// argv of the command; `argv[0]` is looked up in `PATH` inside the sandbox.
    pub command: Vec<String>,
    /// Environment of the command. The host environment is never inherited;
    /// `PATH`, `HOME`, `LANG` get defaults unless set here.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox (default: `/workspace` when a
    /// workspace is mounted, else `/tmp`).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// The uid and gid the command runs as, inside the sandbox.
    #[serde(default)]
    pub user: User,
    /// The root filesystem.
    #[serde(default)]
    pub root: Root,
    /// Extra bind mounts (the workspace is one of them).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Where the command's stdin comes from.
    #[serde(default)]
    pub stdin: Stdin,
    /// Network policy.
    #[serde(default)]
    pub network: Network,
    /// Kernel attack-surface reduction.
    #[serde(default)]
    pub hardening: Hardening,
    /// Hostname inside the sandbox.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// For an image root: keep the sandbox's writes in `DIR/upper` (with
    /// `DIR/work` as overlayfs' work dir) on the host instead of a
    /// per-sandbox tmpfs, so they can become a new layer (`image build`,
    /// setup commands). Created if missing.
    #[serde(default)]
    pub root_upper: Option<PathBuf>,
    /// A home directory for the sandbox user at this absolute path (E2B's
    /// `/home/user`): a tmpfs of `limits.tmpfs_size` owned by the user,
    /// writable, its `HOME` and the default working directory.
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// Credential rules for the egress proxy (allowlist and open modes):
    /// headers it sets on requests to the hosts they name, so secrets stay
    /// outside the sandbox.
    #[serde(default, skip_serializing_if = "Egress::is_empty")]
    pub egress: Egress,
}

/// Credential rules applied at the network boundary (see
/// [`nanoclaw_net::HeaderRules`]): connections to a host a rule names are
/// intercepted by the sandbox's proxy (TLS with a CA made for the sandbox
/// and trusted inside it only), and the rule's headers set on every
/// request. `Debug` never prints the values.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// The rules.
    #[serde(default)]
    pub rules: nanoclaw_net::HeaderRules,
    /// A PEM file of extra CA certificates trusted when the proxy verifies
    /// an intercepted host (besides the host's trust store): an internal
    /// CA, or a test host's.
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
}

impl Egress {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.upstream_ca.is_none()
    }
}

fn default_hostname() -> String {
    "nanoclaw".to_string()
}

impl SandboxSpec {
    /// A spec with every default for running `command`.
    pub fn new<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SandboxSpec {
            command: command.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            workdir: None,
            user: User::default(),
            root: Root::default(),
            mounts: Vec::new(),
            limits: Limits::default(),
            stdin: Stdin::default(),
            network: Network::default(),
            hardening: Hardening::default(),
            hostname: default_hostname(),
            root_upper: None,
            home: None,
            egress: Egress::default(),
        }
    }
}

/// The sandbox user.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// uid inside the sandbox.
    pub uid: u32,
    /// gid inside the sandbox.
    pub gid: u32,
}

impl Default for User {
    fn default() -> Self {
        User {
            uid: DEFAULT_UID,
            gid: DEFAULT_GID,
        }
    }
}

/// The root filesystem of a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Root {
    /// Read-only binds of the host's `/usr`, `/bin`, `/sbin`, `/lib*` and a
    /// synthetic `/etc`: no image needed.
    #[default]
    Host,
    /// An existing directory used (read-only) as the root.
    Dir(PathBuf),
    /// Image layers stacked with overlayfs, lowest first; writes go to a
    /// per-sandbox upper directory on tmpfs.
    Layers(Vec<PathBuf>),
    /// An image by reference, taken from the backend's own image store
    /// (Docker's, for `--backend docker`). The native engine takes images
    /// from nanoclaw's store as [`Root::Layers`] and refuses this one.
    Image(String),
}

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Read-only (the default for every mount).
    #[default]
    Ro,
    /// Read-write.
    Rw,
}

/// A bind mount from the host into the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Host path (must exist).
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    /// Read-only or read-write.
    #[serde(default)]
    pub access: Access,
}

/// Resource limits.
///
/// In JSON every field is optional: a missing field takes its default
/// ([`DEFAULT_MEMORY`], [`DEFAULT_CPUS`], [`DEFAULT_PIDS`],
/// [`DEFAULT_TIMEOUT`], [`DEFAULT_TMPFS_SIZE`], [`DEFAULT_OUTPUT_LIMIT`];
/// `memory_swap` defaults to "equal to memory", i.e. no swap), so a partial
/// object such as `{"timeout": 1000}` keeps every other limit. Only an
/// explicit `null` for `memory`, `memory_swap`, `cpus` or `pids` means "no
/// limit of this kind" (`None`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// Memory + swap limit in bytes (docker semantics: equal to `memory`
    /// means no swap).
    pub memory_swap: Option<u64>,
    /// CPU quota in cpus (fractional).
    pub cpus: Option<f64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
    /// Wall-clock timeout.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Size of the writable `/tmp` tmpfs, in bytes.
    pub tmpfs_size: u64,
    /// Per-stream output limit, in bytes.
    pub output_limit: u64,
    /// Which limits were asked for explicitly (rather than defaulted); an
    /// explicit limit that cannot be enforced is an error, a defaulted one
    /// degrades with a warning.
    pub explicit: ExplicitLimits,
}

/// Which limits the caller set explicitly (a missing field is `false`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExplicitLimits {
    /// `memory` or `memory_swap` was set explicitly.
    pub memory: bool,
    /// `cpus` was set explicitly.
    pub cpus: bool,
    /// `pids` was set explicitly.
    pub pids: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: Some(DEFAULT_MEMORY),
            memory_swap: None,
            cpus: Some(DEFAULT_CPUS),
            pids: Some(DEFAULT_PIDS),
            timeout: DEFAULT_TIMEOUT,
            tmpfs_size: DEFAULT_TMPFS_SIZE,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            explicit: ExplicitLimits::default(),
        }
    }
}

impl Limits {
    /// The effective memory+swap limit: `memory_swap`, or `memory` (no swap).
    pub fn effective_memory_swap(&self) -> Option<u64> {
        match (self.memory, self.memory_swap) {
            (_, Some(s)) => Some(s),
            (Some(m), None) => Some(m),
            (None, None) => None,
        }
    }
}

/// Where stdin comes from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stdin {
    /// `/dev/null`.
    #[default]
    Null,
    /// The caller's own stdin (fd 0) is passed through.
    Inherit,
    /// These bytes are written to the command's stdin, then it is closed.
    Bytes(Vec<u8>),
    /// A pipe kept open for whoever holds the command's control handle
    /// ([`crate::backend::Execution::control`]): a daemon feeding a
    /// process's stdin as its client sends it. A backend without control
    /// handles gives the command an empty stdin.
    Open,
}

/// Default cap on concurrent proxied connections per sandbox.
pub const DEFAULT_NET_MAX_CONNECTIONS: u32 = 64;
/// Default cap on bytes through the proxy per sandbox (both directions).
pub const DEFAULT_NET_MAX_BYTES: u64 = 1 << 30;

/// Network policy.
///
/// Every mode runs the sandbox in its own network namespace with no route
/// out; `allowlist` and `open` add nanoclaw's egress proxy, listening on the
/// sandbox's `127.0.0.1:3128` (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` are
/// set), which checks every destination on the host side.
///
/// In JSON the variants are `"none"`, `{"allowlist": {"hosts": [...],
/// "cidrs": [...], "limits": {...}}}`, `{"kernel": {"cidrs": [...]}}` and
/// `{"open": {"limits": {...}}}`; an unknown field inside a variant is an
/// error (a misspelt rule must not silently vanish).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Network {
    /// An empty network namespace: loopback only.
    #[default]
    None,
    /// Egress only to the listed destinations, through the proxy.
    Allowlist {
        /// `HOST[:PORT]` rules (`*.example.com` wildcards; default ports 80, 443).
        hosts: Vec<String>,
        /// `CIDR[:PORT]` rules.
        cidrs: Vec<String>,
        /// Caps on connections and bytes.
        #[serde(default)]
        limits: NetLimits,
        /// `NAME:IP` entries the proxy (and the sandbox's DNS) resolve
        /// `NAME` to, before the system resolver (Docker's `--add-host`).
        /// They say where a name points, not whether it may be reached:
        /// the rules still decide, and a private `IP` still needs an
        /// `--allow-cidr` rule.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        add_hosts: Vec<String>,
    },
    /// Rootful only: a veth into the sandbox and nftables rules in the
    /// kernel allowing exactly these `CIDR[:PORT]` destinations (TCP), for
    /// programs that ignore proxy variables. Addresses only: no names.
    Kernel {
        /// `CIDR[:PORT]` rules.
        cidrs: Vec<String>,
    },
    /// Egress to any public destination, through the proxy (loopback,
    /// private, link-local and metadata addresses stay refused).
    Open {
        /// Caps on connections and bytes.
        #[serde(default)]
        limits: NetLimits,
    },
}

/// Parses `--add-host NAME:IP` entries (IPv6 addresses may be bracketed:
/// `NAME:[::1]`) into name → addresses, names normalised; one clear message
/// for the first bad entry.
pub fn parse_add_hosts(entries: &[String]) -> Result<Vec<(String, Vec<std::net::IpAddr>)>, String> {
    let mut out: Vec<(String, Vec<std::net::IpAddr>)> = Vec::new();
    for e in entries {
        let bad = |why: &str| {
            format!("--add-host {e:?}: {why}; expected NAME:IP, e.g. db.internal:10.0.0.7 or db.internal:[fd00::7]")
        };
        let (name, ip) = e.split_once(':').ok_or_else(|| bad("no `:`"))?;
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| bad("not an IP address after the `:`"))?;
        let name = nanoclaw_net::policy::normalize_name(name).map_err(bad)?;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, addrs)) => addrs.push(ip),
            None => out.push((name, vec![ip])),
        }
    }
    Ok(out)
}

/// Per-sandbox caps on proxied traffic (in JSON a missing field takes its
/// default, [`DEFAULT_NET_MAX_CONNECTIONS`] or [`DEFAULT_NET_MAX_BYTES`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NetLimits {
    /// Most concurrent connections.
    pub max_connections: u32,
    /// Most bytes, both directions.
    pub max_bytes: u64,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            max_connections: DEFAULT_NET_MAX_CONNECTIONS,
            max_bytes: DEFAULT_NET_MAX_BYTES,
        }
    }
}

/// Seccomp mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Seccomp {
    /// nanoclaw's built-in profile.
    #[default]
    Default,
    /// A Docker-format JSON profile at this path.
    Profile(PathBuf),
    /// No seccomp filter at all (loudly warned about).
    Unconfined,
}

/// Kernel attack-surface reduction settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hardening {
    /// Seccomp filter.
    #[serde(default)]
    pub seccomp: Seccomp,
    /// Capabilities granted inside the sandbox's own user namespace
    /// (upper-case names without the `CAP_` prefix, e.g. `CHOWN`).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// If non-empty, only files under these paths may be executed
    /// (enforced with Landlock).
    #[serde(default)]
    pub exec_allow: Vec<PathBuf>,
    /// Mount `/tmp` with `noexec`.
    #[serde(default)]
    pub tmp_noexec: bool,
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<SandboxSpec, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// A partial `limits` object keeps every limit it does not name at its
    /// default: a missing field never means "no limit".
    #[test]
    fn partial_limits_keep_the_defaults() {
        // The old fail-open shape: the non-optional fields given, the
        // optional ones left out.
        let s = spec(
            r#"{"command": ["true"], "limits": {"timeout": 1000, "tmpfs_size": 1048576, "output_limit": 1024}}"#,
        )
        .expect("parses");
        assert_eq!(
            s.limits.memory,
            Some(DEFAULT_MEMORY),
            "memory limit dropped"
        );
        assert_eq!(s.limits.cpus, Some(DEFAULT_CPUS), "cpu limit dropped");
        assert_eq!(s.limits.pids, Some(DEFAULT_PIDS), "pids limit dropped");
        assert_eq!(s.limits.tmpfs_size, 1 << 20);

        let s = spec(r#"{"command": ["true"], "limits": {"timeout": 1000}}"#).expect("parses");
        let l = s.limits;
        assert_eq!(l.timeout, Duration::from_secs(1));
        assert_eq!(l.memory, Some(DEFAULT_MEMORY));
        assert_eq!(l.cpus, Some(DEFAULT_CPUS));
        assert_eq!(l.pids, Some(DEFAULT_PIDS));
        assert_eq!(l.memory_swap, None);
        assert_eq!(l.effective_memory_swap(), Some(DEFAULT_MEMORY));
        assert_eq!(l.tmpfs_size, DEFAULT_TMPFS_SIZE);
        assert_eq!(l.output_limit, DEFAULT_OUTPUT_LIMIT);
        assert_eq!(l.explicit, ExplicitLimits::default());

        let s = spec(r#"{"command": ["true"], "limits": {}}"#).expect("parses");
        assert_eq!(s.limits, Limits::default());
        let s = spec(r#"{"command": ["true"], "limits": {"explicit": {"pids": true}}}"#)
            .expect("parses");
        assert!(s.limits.explicit.pids && !s.limits.explicit.memory);
        assert_eq!(s.limits.pids, Some(DEFAULT_PIDS));
    }

    /// Only an explicit `null` lifts a limit.
    #[test]
    fn explicit_null_means_no_limit() {
        let s = spec(
            r#"{"command": ["true"], "limits": {"memory": null, "cpus": null, "pids": null}}"#,
        )
        .expect("parses");
        assert_eq!(s.limits.memory, None);
        assert_eq!(s.limits.cpus, None);
        assert_eq!(s.limits.pids, None);
        assert_eq!(s.limits.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn unknown_limit_fields_are_refused() {
        let e = spec(r#"{"command": ["true"], "limits": {"memroy": 1}}"#).expect_err("refused");
        assert!(e.to_string().contains("memroy"), "{e}");
    }

    /// Unknown fields inside a network variant are an error, not ignored.
    #[test]
    fn unknown_fields_in_network_variants_are_refused() {
        for bad in [
            r#"{"allowlist": {"hosts": ["a.example"], "cidrs": [], "hostz": ["b.example"]}}"#,
            r#"{"allowlist": {"hosts": [], "cidrs": [], "limits": {"max_conections": 1}}}"#,
            r#"{"kernel": {"cidrs": ["10.0.0.0/8"], "ports": [22]}}"#,
            r#"{"open": {"limits": {}, "allow_private": true}}"#,
        ] {
            let json = format!(r#"{{"command": ["true"], "network": {bad}}}"#);
            assert!(spec(&json).is_err(), "accepted: {bad}");
        }
        // The documented shapes still parse.
        let s = spec(
            r#"{"command": ["true"], "network": {"allowlist": {"hosts": ["a.example"], "cidrs": [], "limits": {"max_bytes": 5}}}}"#,
        )
        .expect("parses");
        assert_eq!(
            s.network,
            Network::Allowlist {
                hosts: vec!["a.example".into()],
                cidrs: vec![],
                limits: NetLimits {
                    max_connections: DEFAULT_NET_MAX_CONNECTIONS,
                    max_bytes: 5
                },
                add_hosts: vec![],
            }
        );
        let s = spec(r#"{"command": ["true"], "network": {"open": {}}}"#).expect("parses");
        assert_eq!(
            s.network,
            Network::Open {
                limits: NetLimits::default()
            }
        );
        let s = spec(r#"{"command": ["true"], "network": "none"}"#).expect("parses");
        assert_eq!(s.network, Network::None);
    }

    #[test]
    fn a_full_spec_round_trips() {
        let mut s = SandboxSpec::new(["sh", "-c", "true"]);
        s.limits.memory = None;
        s.limits.memory_swap = Some(1 << 30);
        s.limits.explicit.cpus = true;
        s.network = Network::Allowlist {
            hosts: vec!["*.example.com:8443".into()],
            cidrs: vec!["10.0.0.0/8".into()],
            limits: NetLimits::default(),
            add_hosts: vec!["db.internal:10.0.0.7".into()],
        };
        s.stdin = Stdin::Bytes(vec![0, 255, 10]);
        let json = serde_json::to_string(&s).expect("serializes");
        assert_eq!(spec(&json).expect("parses"), s);
    }
}
