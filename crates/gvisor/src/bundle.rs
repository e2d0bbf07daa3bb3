//! The OCI bundle nanoclaw writes for runsc: `config.json` (the sandbox's
//! root, mounts, limits, user and init) and `rootfs` (an empty, read-only
//! directory holding only mount points), plus the synthetic `/etc` files
//! bound into it.
//!
//! Building the configuration is a pure function of the sandbox
//! configuration and the host's layout, unit-tested below; writing it is a
//! separate step ([`write`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nanoclaw_sandbox::backend::SandboxConfig;
use nanoclaw_sandbox::netns_egress::proxied;
use nanoclaw_sandbox::spec::{Access, SandboxSpec};
use nanoclaw_sandbox::Error;
use serde_json::{json, Value};

/// Host top-level entries that make up the host root, bound read-only
/// (the native engine's list: never `/etc`, `/home`, `/root`, `/tmp`,
/// `/var`, `/run`).
pub const HOST_ROOT_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host `/etc` entries programs need, bound read-only (never the whole
/// `/etc`, never shadow).
pub const HOST_ETC_ENTRIES: &[&str] = &[
    "ld.so.cache",
    "ssl",
    "ca-certificates",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "protocols",
    "services",
    "mime.types",
];

/// The uid and gid the sandbox's init ([`init_args`]) runs as: `nobody`, so the
/// sandbox's commands (uid 1000 by default) cannot signal it, and an init
/// with no capabilities.
pub const INIT_UID: u32 = 65534;

/// The default `PATH` inside the sandbox.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What of the host the bundle refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayout {
    /// Each of [`HOST_ROOT_DIRS`] present: name and symlink target (a
    /// symlink, e.g. merged-usr `/bin -> usr/bin`, is recreated in the
    /// rootfs rather than bound).
    pub root_entries: Vec<(String, Option<PathBuf>)>,
    /// Each of [`HOST_ETC_ENTRIES`] present: name, symlink target, and
    /// whether it is a directory (bound) rather than a file (copied).
    pub etc_entries: Vec<(String, Option<PathBuf>, bool)>,
}

impl HostLayout {
    /// The host's layout, read from the real filesystem.
    pub fn probe() -> HostLayout {
        let entry = |p: &Path| -> Option<Option<PathBuf>> {
            let md = std::fs::symlink_metadata(p).ok()?;
            if md.file_type().is_symlink() {
                Some(std::fs::read_link(p).ok())
            } else {
                Some(None)
            }
        };
        HostLayout {
            root_entries: HOST_ROOT_DIRS
                .iter()
                .filter_map(|d| Some((d.to_string(), entry(&Path::new("/").join(d))?)))
                .collect(),
            etc_entries: HOST_ETC_ENTRIES
                .iter()
                .filter_map(|e| {
                    let p = Path::new("/etc").join(e);
                    let link = entry(&p)?;
                    let dir = link.is_none() && p.is_dir();
                    Some((e.to_string(), link, dir))
                })
                .collect(),
        }
    }
}

/// The files of the synthetic `/etc` (name, contents).
pub fn etc_files(spec: &SandboxSpec) -> Vec<(&'static str, String)> {
    let (uid, gid) = (spec.user.uid, spec.user.gid);
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    let mut group = String::from("root:x:0:\n");
    let home = spec
        .home
        .as_ref()
        .map_or_else(|| "/tmp".to_string(), |h| h.to_string_lossy().into_owned());
    if uid != 0 && uid != INIT_UID {
        passwd.push_str(&format!("sandbox:x:{uid}:{gid}:sandbox:{home}:/bin/sh\n"));
    }
    if gid != 0 && gid != INIT_UID {
        group.push_str(&format!("sandbox:x:{gid}:\n"));
    }
    passwd.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
    group.push_str("nogroup:x:65534:\n");
    let hostname = &spec.hostname;
    vec![
        ("passwd", passwd),
        ("group", group),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
            ),
        ),
        ("hostname", format!("{hostname}\n")),
        (
            "resolv.conf",
            if proxied(&spec.network) {
                // nanoclaw's DNS on the sandbox's loopback (any other
                // nameserver is redirected to it too).
                "nameserver 127.0.0.1\noptions ndots:0\n".to_string()
            } else {
                "# nanoclaw: no DNS inside the sandbox (network none)\n".to_string()
            },
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"
                .to_string(),
        ),
    ]
}

/// The environment of a command: nanoclaw's defaults (`PATH`, `HOME`,
/// `LANG`, `HOSTNAME`, `USER`), then the sandbox's, then the command's; a
/// later key replaces an earlier one.
pub fn environment(spec: &SandboxSpec, uid: u32, extra: &[(String, String)]) -> Vec<String> {
    let home = spec
        .home
        .as_ref()
        .map_or_else(|| "/tmp".to_string(), |h| h.to_string_lossy().into_owned());
    let user = match uid {
        0 => "root",
        INIT_UID => "nobody",
        _ => "sandbox",
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), home),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOSTNAME".into(), spec.hostname.clone()),
        ("USER".into(), user.into()),
    ];
    if proxied(&spec.network) {
        env.extend(nanoclaw_sandbox::netns_egress::proxy_env());
    }
    for (k, v) in spec.env.iter().chain(extra) {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Makes the sandbox use the network namespace at `path` (one nanoclaw
/// made and wired to its proxy) instead of a new, empty one.
pub fn join_network(oci: &mut Value, path: &str) {
    if let Some(nss) = oci["linux"]["namespaces"].as_array_mut() {
        for ns in nss.iter_mut().filter(|n| n["type"] == "network") {
            ns["path"] = json!(path);
        }
    }
}

/// The working directory of a command when none is given: the home
/// directory, else `/tmp`.
pub fn default_workdir(spec: &SandboxSpec) -> PathBuf {
    spec.workdir
        .clone()
        .or_else(|| spec.home.clone())
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// The OCI capability names for `--cap-add` names (already validated by
/// the engine's capability table).
pub fn oci_caps(names: &[String]) -> Result<Vec<String>, Error> {
    names
        .iter()
        .map(|n| match nanoclaw_sandbox::native::caps::parse_cap(n) {
            Ok(c) => Ok(format!("CAP_{}", c.name())),
            Err(e) => Err(Error::InvalidSpec(e.to_string())),
        })
        .collect()
}

/// The OCI `process` of a command: argv, environment, working directory,
/// user, capabilities (none unless `cap_add`), `noNewPrivileges`.
pub fn process(
    args: &[String],
    env: Vec<String>,
    cwd: &Path,
    uid: u32,
    gid: u32,
    caps: &[String],
) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": [], "ambient": []
        },
        "noNewPrivileges": true,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    })
}

/// Host threads gVisor's sentry and gofer need besides the sandbox's own
/// tasks (measured: about 30 idle, about two per sandboxed process).
pub const PIDS_OVERHEAD: u64 = 64;

/// The host pids limit for a sandbox asked to run at most `pids` tasks:
/// gVisor's processes are host threads of its sentry, roughly two per
/// sandboxed task, plus the sentry's and gofer's own.
pub fn host_pids_limit(pids: u64) -> u64 {
    pids.saturating_mul(2).saturating_add(PIDS_OVERHEAD)
}

/// nanoclaw's default seccomp profile (Docker's JSON format, the engine's
/// `seccomp/default.json`).
const DEFAULT_PROFILE: &str = include_str!("../../sandbox/seccomp/default.json");

/// nanoclaw's default seccomp profile as an OCI `linux.seccomp`: the same
/// rules, applied inside the sandbox by gVisor's kernel (runsc
/// `--oci-seccomp`), so a call the native engine refuses is refused here
/// too before gVisor's kernel implements it. Docker's format is the OCI
/// one plus comments (dropped) and nanoclaw's extension (dropped: gVisor
/// answers a system call it does not know with ENOSYS itself).
pub fn seccomp() -> Result<Value, Error> {
    let mut v: Value = serde_json::from_str(DEFAULT_PROFILE)
        .map_err(|e| Error::InvalidSpec(format!("the built-in seccomp profile: {e}")))?;
    let Some(o) = v.as_object_mut() else {
        return Err(Error::InvalidSpec(
            "the built-in seccomp profile is not an object".into(),
        ));
    };
    o.remove("comment");
    o.remove("nanoclaw");
    if let Some(rules) = o.get_mut("syscalls").and_then(Value::as_array_mut) {
        for r in rules.iter_mut().filter_map(Value::as_object_mut) {
            r.remove("comment");
        }
        // gVisor lets an unprivileged process make device nodes (the native
        // engine's nodev mounts make them useless there): refuse character
        // and block devices; FIFOs and sockets stay allowed.
        for (name, mode_arg) in [("mknod", 1), ("mknodat", 2)] {
            for kind in [0o020000u64, 0o060000] {
                rules.push(json!({
                    "names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                    "args": [{"index": mode_arg, "value": 0o170000, "valueTwo": kind,
                              "op": "SCMP_CMP_MASKED_EQ"}]
                }));
            }
        }
    }
    Ok(v)
}

/// A bind mount in OCI form.
fn bind(source: &Path, target: &str, writable: bool) -> Value {
    let mode = if writable { "rw" } else { "ro" };
    json!({
        "destination": target, "type": "bind", "source": source,
        "options": ["rbind", mode, "nosuid", "nodev"]
    })
}

/// `config.json` for sandbox `id`: its root is `bundle/rootfs` (read-only,
/// only mount points), the host root and the synthetic `/etc` (files in
/// `bundle/etc`) bound read-only, a size-limited `/tmp` (and home), the
/// configuration's mounts, and its limits in the cgroup `/nanoclaw/<id>`
/// (`cgroups`: false when runsc runs with `--ignore-cgroups`). Its init
/// ([`init_args`]) lasts the sandbox's lifetime, as `nobody`: when it
/// ends, gVisor ends the sandbox.
pub fn config(
    id: &str,
    bundle: &Path,
    cfg: &SandboxConfig,
    host: &HostLayout,
    cgroups: bool,
) -> Result<Value, Error> {
    let spec = &cfg.spec;
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "noexec", "mode=755", "size=65536"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["ro", "nosuid", "nodev", "noexec"]}),
    ];
    for (name, link) in &host.root_entries {
        if link.is_none() {
            mounts.push(bind(&Path::new("/").join(name), &format!("/{name}"), false));
        }
    }
    // One read-only /etc from the bundle (the synthetic files, copies of
    // the host's small files, its symlinks), the host's directories bound
    // over it: few mounts, as each costs gVisor's gofer a connection.
    mounts.push(bind(&bundle.join("etc"), "/etc", false));
    for (name, _, dir) in &host.etc_entries {
        if *dir {
            mounts.push(bind(
                &Path::new("/etc").join(name),
                &format!("/etc/{name}"),
                false,
            ));
        }
    }
    let size = spec.limits.tmpfs_size.max(4096);
    let mut tmp_opts = vec!["nosuid".to_string(), "nodev".to_string()];
    if spec.hardening.tmp_noexec {
        tmp_opts.push("noexec".into());
    }
    let mut tmp = tmp_opts.clone();
    tmp.extend(["mode=1777".to_string(), format!("size={size}")]);
    mounts.push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": tmp}));
    if let Some(home) = &spec.home {
        let mut opts = tmp_opts;
        opts.extend([
            "mode=0755".to_string(),
            format!("uid={}", spec.user.uid),
            format!("gid={}", spec.user.gid),
            format!("size={size}"),
        ]);
        mounts.push(
            json!({"destination": home, "type": "tmpfs", "source": "tmpfs", "options": opts}),
        );
    }
    for m in &spec.mounts {
        if !m.target.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "mount target {} must be an absolute path inside the sandbox",
                m.target.display()
            )));
        }
        mounts.push(bind(
            &m.source,
            &m.target.to_string_lossy(),
            m.access == Access::Rw,
        ));
    }

    let mut resources = serde_json::Map::new();
    if let Some(m) = spec.limits.memory {
        resources.insert("memory".into(), json!({"limit": m}));
    }
    if let Some(c) = spec.limits.cpus {
        let period: u64 = 100_000;
        let quota = ((c * period as f64).round() as u64).max(1000);
        resources.insert("cpu".into(), json!({"quota": quota, "period": period}));
    }
    if let Some(p) = spec.limits.pids {
        resources.insert("pids".into(), json!({"limit": host_pids_limit(p)}));
    }
    let lifetime = lifetime_secs(spec.limits.timeout);
    let mut linux = json!({
        "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                       {"type": "uts"}, {"type": "mount"}],
        "resources": resources,
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
        "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"]
    });
    if cgroups {
        linux["cgroupsPath"] = json!(format!("/nanoclaw/{id}"));
    }
    linux["seccomp"] = seccomp()?;
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": process(
            &init_args(lifetime),
            vec![format!("PATH={DEFAULT_PATH}")],
            Path::new("/"),
            INIT_UID,
            INIT_UID,
            &[],
        ),
        "root": {"path": "rootfs", "readonly": true},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": linux,
        "annotations": {"dev.nanoclaw.sandbox": id}
    }))
}

/// The sandbox's init: `sh`, saying `ready` on its stdout (the sandbox
/// takes commands now), then waiting for a `sleep` of the sandbox's
/// lifetime. While it waits it reaps every orphan the sandbox's commands
/// leave (a killed command's children are re-parented to it), and when the
/// sleep ends it exits, and gVisor ends the sandbox.
pub fn init_args(lifetime_secs: u64) -> Vec<String> {
    [
        "sh",
        "-c",
        "echo ready; sleep \"$0\" & wait",
        &lifetime_secs.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// The sandbox's lifetime in whole seconds for its init's `sleep` (at
/// least one).
pub fn lifetime_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn io(call: &str, p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let call = format!("{call} {}", p.display());
    move |source| Error::Sys { call, source }
}

/// Writes the bundle into the new directory `bundle`: `config.json`, the
/// mount points in `rootfs` (symlinks where the host has them), the
/// synthetic `/etc` files.
pub fn write(
    bundle: &Path,
    config: &Value,
    spec: &SandboxSpec,
    host: &HostLayout,
) -> Result<(), Error> {
    let rootfs = bundle.join("rootfs");
    let etc = bundle.join("etc");
    for d in [&rootfs, &etc] {
        std::fs::create_dir_all(d).map_err(io("mkdir", d))?;
    }
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        let p = rootfs.join(d);
        std::fs::create_dir_all(&p).map_err(io("mkdir", &p))?;
    }
    for (name, link) in &host.root_entries {
        let p = rootfs.join(name);
        match link {
            Some(t) => std::os::unix::fs::symlink(t, &p).map_err(io("symlink", &p))?,
            None => std::fs::create_dir_all(&p).map_err(io("mkdir", &p))?,
        }
    }
    for (name, link, dir) in &host.etc_entries {
        let p = etc.join(name);
        let src = Path::new("/etc").join(name);
        match link {
            Some(t) => std::os::unix::fs::symlink(t, &p).map_err(io("symlink", &p))?,
            None if *dir => std::fs::create_dir_all(&p).map_err(io("mkdir", &p))?,
            None => {
                // A file the host cannot read is left out (never shadow:
                // it is not on the list).
                let _ = std::fs::copy(&src, &p);
            }
        }
    }
    for (name, data) in etc_files(spec) {
        let p = etc.join(name);
        std::fs::write(&p, data).map_err(io("write", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod", &p))?;
    }
    let p = bundle.join("config.json");
    let text = serde_json::to_vec_pretty(config).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    std::fs::write(&p, text).map_err(io("write", &p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoclaw_sandbox::spec::Mount;

    fn host() -> HostLayout {
        HostLayout {
            root_entries: vec![("usr".into(), None), ("bin".into(), Some("usr/bin".into()))],
            etc_entries: vec![
                ("ssl".into(), None, true),
                ("services".into(), None, false),
                (
                    "localtime".into(),
                    Some("/usr/share/zoneinfo/UTC".into()),
                    false,
                ),
            ],
        }
    }

    fn destinations(c: &Value) -> Vec<String> {
        c["mounts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["destination"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_host_root_is_bound_read_only_and_etc_is_synthetic() {
        let cfg = SandboxConfig::new(SandboxSpec::new(Vec::<String>::new()));
        let c = config("gv-1", Path::new("/b"), &cfg, &host(), true).expect("config");
        let d = destinations(&c);
        assert!(d.contains(&"/usr".to_string()));
        assert!(
            !d.contains(&"/bin".to_string()),
            "a symlink is recreated, not bound"
        );
        assert!(d.contains(&"/etc/ssl".to_string()), "a directory is bound");
        assert!(
            !d.contains(&"/etc/services".to_string()),
            "a file is copied"
        );
        let etc = c["mounts"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["destination"] == "/etc"))
            .expect("/etc");
        assert_eq!(etc["source"], json!("/b/etc"), "the bundle's own /etc");
        assert!(!d
            .iter()
            .any(|x| x == "/etc/shadow" || x == "/home" || x == "/root" || x == "/var"));
        for m in c["mounts"].as_array().expect("mounts") {
            if m["type"] == "bind" {
                assert!(
                    m["options"]
                        .as_array()
                        .expect("options")
                        .contains(&json!("ro")),
                    "{m}"
                );
            }
        }
        assert_eq!(c["root"]["readonly"], json!(true));
        assert_eq!(c["linux"]["cgroupsPath"], json!("/nanoclaw/gv-1"));
        assert_eq!(c["process"]["user"]["uid"], json!(INIT_UID));
        assert_eq!(c["process"]["args"], json!(init_args(30)));
        assert_eq!(c["process"]["capabilities"]["bounding"], json!([]));
    }

    #[test]
    fn limits_and_mounts_are_carried() {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.limits.memory = Some(64 << 20);
        spec.limits.cpus = Some(0.5);
        spec.limits.pids = Some(10);
        spec.limits.timeout = Duration::from_millis(1500);
        spec.hardening.tmp_noexec = true;
        spec.mounts.push(Mount {
            source: "/srv/data".into(),
            target: "/data".into(),
            access: Access::Rw,
        });
        let cfg = SandboxConfig::new(spec);
        let c = config("gv-2", Path::new("/b"), &cfg, &host(), false).expect("config");
        let r = &c["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], json!(64u64 << 20));
        assert_eq!(r["cpu"]["quota"], json!(50_000));
        assert_eq!(r["pids"]["limit"], json!(10 * 2 + PIDS_OVERHEAD));
        assert!(c["linux"].get("cgroupsPath").is_none());
        assert_eq!(c["process"]["args"], json!(init_args(2)));
        let data = c["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == "/data")
            .expect("the mount")
            .clone();
        assert!(data["options"]
            .as_array()
            .expect("options")
            .contains(&json!("rw")));
        let tmp = c["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == "/tmp")
            .expect("/tmp")
            .clone();
        assert!(tmp["options"]
            .as_array()
            .expect("options")
            .contains(&json!("noexec")));
    }

    #[test]
    fn the_environment_has_defaults_the_sandbox_and_the_command_override() {
        let mut spec = SandboxSpec::new(Vec::<String>::new());
        spec.env.push(("A".into(), "sandbox".into()));
        spec.env.push(("LANG".into(), "de_DE.UTF-8".into()));
        let env = environment(&spec, 1000, &[("A".into(), "command".into())]);
        assert!(env.contains(&"A=command".to_string()));
        assert!(env.contains(&"LANG=de_DE.UTF-8".to_string()));
        assert!(env.contains(&"USER=sandbox".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(env.iter().filter(|e| e.starts_with("A=")).count(), 1);
    }

    #[test]
    fn capability_names_are_checked_by_the_engines_table() {
        assert_eq!(
            oci_caps(&["chown".into()]).expect("chown"),
            vec!["CAP_CHOWN"]
        );
        assert!(oci_caps(&["SYS_ADMIN".into()]).is_err());
        assert!(oci_caps(&["NOPE".into()]).is_err());
    }
}
