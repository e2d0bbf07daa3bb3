//! Turning a [`SandboxSpec`] into a flat list of filesystem operations.
//!
//! Planning is pure and happens in the runner before `clone`, so the child
//! only walks a prepared list of C strings and issues system calls: it never
//! allocates, parses or formats. Every operation can be named in an error.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::spec::{Access, Network, Root, SandboxSpec};
use crate::Error;

/// The host directory the new root is assembled on (inside the sandbox's
/// private mount namespace, so the host never sees it).
pub(crate) const BASE: &str = "/tmp";

/// Host top-level entries that make up the default root, bound read-only.
const HOST_ROOT_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host `/etc` entries the default root needs, bound read-only (never the
/// whole `/etc`, never shadow).
const HOST_ETC_ENTRIES: &[&str] = &[
    "ld.so.cache",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "protocols",
    "services",
    "mime.types",
];

/// `/proc` files hidden behind `/dev/null`.
pub(crate) const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "key-users",
    "timer_list",
    "sched_debug",
    "sysrq-trigger",
    "latency_stats",
    "kallsyms",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "config.gz",
];

/// `/proc` directories hidden behind an empty read-only tmpfs.
pub(crate) const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound", "driver"];

/// `/proc` directories made read-only.
pub(crate) const PROC_READONLY_DIRS: &[&str] = &["sys", "irq", "bus", "fs"];

/// Device nodes bound from the host's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Container paths a mount may not cover.
const PROTECTED_TARGETS: &[&str] = &["/", "/proc", "/dev", "/sys", "/etc"];

/// One step of building the sandbox's filesystem.
#[derive(Debug)]
pub(crate) enum Op {
    /// `mkdir -p`-like: one directory (parents come first in the list).
    Mkdir { path: CString, mode: libc::mode_t },
    /// A symlink.
    Symlink { target: CString, link: CString },
    /// A file with fixed content.
    File {
        path: CString,
        data: Vec<u8>,
        mode: libc::mode_t,
    },
    /// A new filesystem instance (tmpfs, proc, sysfs, devpts).
    Fs {
        fstype: &'static std::ffi::CStr,
        target: CString,
        flags: libc::c_ulong,
        data: CString,
        /// Failing is not fatal; the outcome reports it as degraded.
        optional: bool,
    },
    /// A bind mount, then attributes set recursively (read-only, nosuid,
    /// nodev, noexec as asked).
    Bind {
        source: CString,
        target: CString,
        attrs: u64,
        /// Skip silently when the source does not exist (masks).
        if_exists: bool,
    },
    /// A file with the content of descriptor `fd` (a memfd the runner fills
    /// after `clone`: the sandbox's CA certificate, made only then so that
    /// no sandbox process is a copy of memory holding its key).
    FileFromFd {
        path: CString,
        fd: i32,
        mode: libc::mode_t,
    },
    /// Attaches a detached mount prepared by the runner (an idmapped bind).
    Attach { fd: i32, target: CString },
    /// Sets attributes on an existing mount recursively.
    Attrs { target: CString, attrs: u64 },
    /// Detaches the mount at `path` (lazily, with its submounts).
    Detach { path: CString },
    /// Re-opens a host path (`O_PATH`) inside the sandbox's new mount
    /// namespace onto descriptor `fd`, checking it is still the same inode
    /// (device, inode) the runner validated. A bind mount's source must be
    /// in the caller's mount namespace, which the runner's descriptor is not.
    Reopen {
        path: CString,
        fd: i32,
        dev: u64,
        ino: u64,
    },
}

impl Op {
    /// Describes the operation for an error message.
    pub(crate) fn describe(&self, root: &str) -> String {
        // Paths as the sandbox sees them (the plan builds them under `root`).
        let s = |c: &CString| {
            let p = c.to_string_lossy();
            match p.strip_prefix(root) {
                Some(rest) if rest.starts_with('/') => format!("{rest} (in the sandbox)"),
                _ => p.into_owned(),
            }
        };
        match self {
            Op::Mkdir { path, .. } => format!("mkdir {}", s(path)),
            Op::Symlink { target, link } => format!("symlink {} -> {}", s(link), s(target)),
            Op::File { path, .. } | Op::FileFromFd { path, .. } => format!("write {}", s(path)),
            Op::Fs { fstype, target, .. } => {
                format!("mount {} on {}", fstype.to_string_lossy(), s(target))
            }
            Op::Bind { source, target, .. } => format!("bind {} on {}", s(source), s(target)),
            Op::Attach { target, .. } => format!("attach idmapped mount on {}", s(target)),
            Op::Attrs { target, .. } => format!("set mount attributes on {}", s(target)),
            Op::Detach { path } => format!("detach the mount at {}", s(path)),
            Op::Reopen { path, .. } => {
                format!(
                    "open mount source {} (it must not change while starting)",
                    s(path)
                )
            }
        }
    }
}

/// Where BASE lies inside `source` (`""` for BASE itself), when it does.
fn base_within(source: &Path) -> Option<String> {
    let real = std::fs::canonicalize(source).ok()?;
    let rel = Path::new(BASE).strip_prefix(&real).ok()?;
    let rel = rel.to_string_lossy();
    Some(if rel.is_empty() {
        String::new()
    } else {
        format!("/{rel}")
    })
}

/// A user mount resolved and checked by the runner.
#[derive(Debug, Clone)]
pub(crate) struct UserMount {
    /// An `O_PATH` descriptor of the host source, opened before `clone`.
    pub fd: i32,
    /// The canonical host path of the source.
    pub source: PathBuf,
    /// Device and inode of the source, to detect a swap before the child
    /// re-opens it.
    pub dev_ino: (u64, u64),
    /// Whether the source is a directory (else a file).
    pub is_dir: bool,
    /// Absolute, normalised path inside the sandbox.
    pub target: PathBuf,
    /// Read-only or read-write.
    pub access: Access,
    /// A detached idmapped copy of the source (rootful rw mounts).
    pub idmapped_fd: Option<i32>,
    /// A rootful rw idmapped mount: the sandbox's writes there land as a
    /// real host user (root, for a root-owned source), so with the default
    /// seccomp profile the sandbox may not create set-id files at all.
    pub no_setid_files: bool,
}

/// The whole filesystem plan.
#[derive(Debug, Default)]
pub(crate) struct FsPlan {
    /// Operations before `pivot_root`, with paths under [`BASE`].
    pub ops: Vec<Op>,
    /// The directory that becomes `/`.
    pub root: CString,
    /// Whether `/` is remounted read-only (the host root; an image root
    /// keeps its per-sandbox writable upper layer).
    pub root_readonly: bool,
    /// Whether some target path passes through content nanoclaw does not
    /// control (an image's layers, or a mount nested inside another mount),
    /// so every target must be reached without following symlinks.
    pub check_symlinks: bool,
}

fn cpath(p: impl AsRef<Path>) -> Result<CString, Error> {
    CString::new(p.as_ref().as_os_str().as_bytes()).map_err(|_| {
        Error::InvalidSpec(format!(
            "path {:?} contains a NUL byte",
            p.as_ref().display()
        ))
    })
}

/// Normalises an absolute container path: no `..`, no `.`, no trailing slash.
pub(crate) fn normalize_target(p: &Path) -> Result<PathBuf, Error> {
    if !p.is_absolute() {
        return Err(Error::InvalidSpec(format!(
            "mount target {:?} must be an absolute path inside the sandbox, e.g. /data",
            p.display()
        )));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidSpec(format!(
                    "mount target {:?} may not contain '..'",
                    p.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Refuses targets that would cover a protected path of the sandbox.
pub(crate) fn check_target(t: &Path) -> Result<(), Error> {
    for p in PROTECTED_TARGETS {
        let prot = Path::new(p);
        if t == prot || (*p != "/" && t.starts_with(prot)) {
            return Err(Error::InvalidSpec(format!(
                "mount target {} would shadow the sandbox's {p}; choose another path such as /data",
                t.display()
            )));
        }
    }
    Ok(())
}

/// Everything about the host the plan depends on, read once by the runner.
#[derive(Debug, Clone)]
pub(crate) struct HostLayout {
    /// For each of [`HOST_ROOT_DIRS`] present on the host: its name and, when
    /// it is a symlink (usrmerge), the link target.
    pub root_entries: Vec<(String, Option<PathBuf>)>,
    /// For each of [`HOST_ETC_ENTRIES`] present: name, symlink target, is_dir.
    pub etc_entries: Vec<(String, Option<PathBuf>, bool)>,
}

impl HostLayout {
    /// Reads the host layout from the real filesystem.
    pub(crate) fn probe() -> HostLayout {
        let entry = |p: &Path| -> Option<(Option<PathBuf>, bool)> {
            let md = std::fs::symlink_metadata(p).ok()?;
            if md.file_type().is_symlink() {
                Some((std::fs::read_link(p).ok(), false))
            } else {
                Some((None, md.is_dir()))
            }
        };
        let root_entries = HOST_ROOT_DIRS
            .iter()
            .filter_map(|d| {
                let (link, is_dir) = entry(&Path::new("/").join(d))?;
                (link.is_some() || is_dir).then(|| (d.to_string(), link))
            })
            .collect();
        let etc_entries = HOST_ETC_ENTRIES
            .iter()
            .filter_map(|e| {
                let (link, is_dir) = entry(&Path::new("/etc").join(e))?;
                Some((e.to_string(), link, is_dir))
            })
            .collect();
        HostLayout {
            root_entries,
            etc_entries,
        }
    }
}

/// The sandbox's `/etc/resolv.conf`: with egress (allowlist, open), the
/// sandbox's own resolver on its loopback, served by nanoclaw (allowed
/// names only); without, no resolver at all.
fn resolv_conf(spec: &SandboxSpec) -> String {
    match spec.network {
        Network::Allowlist { .. } | Network::Open { .. } => {
            "# nanoclaw: the sandbox's resolver answers only names the network policy allows\nnameserver 127.0.0.1\n".to_string()
        }
        Network::None | Network::Kernel { .. } => {
            "# nanoclaw: no DNS inside the sandbox (network none)\n".to_string()
        }
    }
}

/// The sandbox's `/etc/hosts`.
fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    )
}

/// An image layer directory, opened by the runner before `clone`.
#[derive(Debug, Clone)]
pub(crate) struct LayerFd {
    /// `O_PATH` descriptor of the layer directory.
    pub fd: i32,
    /// Its host path (re-opened and checked by the child).
    pub path: PathBuf,
    /// Device and inode, to detect a swap.
    pub dev_ino: (u64, u64),
    /// `fd` is a detached (idmapped) copy of the layer's mount, made by the
    /// runner, that the child attaches under [`BASE`] instead of re-opening
    /// `path`.
    pub attached: bool,
}

/// The uid and gid of `nobody` / `nogroup`, which keep their own names.
pub(crate) const NOBODY: u32 = 65534;

/// The user name the synthetic `/etc/passwd` gives `uid`.
pub(crate) fn user_name(uid: u32) -> &'static str {
    match uid {
        0 => "root",
        NOBODY => "nobody",
        _ => "sandbox",
    }
}

/// Contents of the synthetic `/etc/passwd`.
pub(crate) fn passwd(uid: u32, gid: u32) -> String {
    let mut s = String::from("root:x:0:0:root:/root:/bin/sh\n");
    if uid != 0 && uid != NOBODY {
        s.push_str(&format!("sandbox:x:{uid}:{gid}:sandbox:/tmp:/bin/sh\n"));
    }
    s.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
    s
}

/// Contents of the synthetic `/etc/group`.
pub(crate) fn group(gid: u32) -> String {
    let mut s = String::from("root:x:0:\n");
    if gid != 0 && gid != NOBODY {
        s.push_str(&format!("sandbox:x:{gid}:\n"));
    }
    s.push_str("nogroup:x:65534:\n");
    s
}

/// Mount attributes of a read-only bind of host content.
const RO_ATTRS: u64 = crate::native::sys::MOUNT_ATTR_RDONLY
    | crate::native::sys::MOUNT_ATTR_NOSUID
    | crate::native::sys::MOUNT_ATTR_NODEV;
/// Mount flags of the sandbox's own filesystems.
const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// A plan's operations while it is being built.
struct Ops {
    ops: Vec<Op>,
    /// Where the sandbox's root is assembled: the tmpfs itself for the
    /// host root; an overlay mounted inside it for an image.
    root: String,
}

impl Ops {
    /// `inside` (an absolute path in the sandbox) under the root being
    /// assembled.
    fn under(&self, inside: &str) -> Result<CString, Error> {
        cpath(format!("{}{inside}", self.root))
    }

    fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Every directory from the top down to `inside` (not `/` itself).
    fn mkdirs(&mut self, inside: &Path) -> Result<(), Error> {
        let mut cur = PathBuf::from("/");
        for c in inside.components().skip(1) {
            cur.push(c);
            let path = self.under(&cur.to_string_lossy())?;
            self.push(Op::Mkdir { path, mode: 0o755 });
        }
        Ok(())
    }
}

/// Builds the filesystem plan for `spec`: the sources re-opened, the new
/// root, `/etc`, `/tmp` and the home directory, `/dev`, `/proc` and
/// `/sys`, then the workspace and user mounts.
pub(crate) fn build(
    spec: &SandboxSpec,
    host: &HostLayout,
    mounts: &[UserMount],
    layers: &[LayerFd],
    upper: Option<&LayerFd>,
) -> Result<FsPlan, Error> {
    let image = matches!(spec.root, Root::Layers(_));
    let mut ops = Ops {
        ops: Vec::with_capacity(96),
        root: if image {
            format!("{BASE}/root")
        } else {
            BASE.to_string()
        },
    };
    reopen_sources(&mut ops, mounts, layers, upper)?;
    new_root(&mut ops, spec, host, layers, upper)?;
    if image {
        image_etc(&mut ops, spec)?;
    } else {
        synthetic_etc(&mut ops, spec, host)?;
    }
    tmp_and_home(&mut ops, spec)?;
    dev(&mut ops, spec)?;
    proc_and_sys(&mut ops)?;
    // The workspace and user mounts.
    for m in mounts {
        user_mount(&mut ops, m)?;
    }
    let nested = mounts.iter().any(|a| {
        mounts
            .iter()
            .any(|b| a.target != b.target && a.target.starts_with(&b.target))
    });
    Ok(FsPlan {
        root: cpath(&ops.root)?,
        ops: ops.ops,
        root_readonly: !image,
        check_symlinks: image || nested,
    })
}

/// Image layers and mount sources, re-opened in the new mount namespace
/// before anything covers their paths.
fn reopen_sources(
    ops: &mut Ops,
    mounts: &[UserMount],
    layers: &[LayerFd],
    upper: Option<&LayerFd>,
) -> Result<(), Error> {
    for l in layers.iter().chain(upper).filter(|l| !l.attached) {
        ops.push(Op::Reopen {
            path: cpath(&l.path)?,
            fd: l.fd,
            dev: l.dev_ino.0,
            ino: l.dev_ino.1,
        });
    }
    // Mount sources are re-opened in the new mount namespace before anything
    // covers their paths (the new root is assembled on /tmp).
    for m in mounts.iter().filter(|m| m.idmapped_fd.is_none()) {
        ops.push(Op::Reopen {
            path: cpath(&m.source)?,
            fd: m.fd,
            dev: m.dev_ino.0,
            ino: m.dev_ino.1,
        });
    }
    Ok(())
}

/// The new root: a small tmpfs that only holds mount points and /etc with
/// the host's directories bound read-only (host root), or an overlay of
/// the image's layers (image root).
fn new_root(
    ops: &mut Ops,
    spec: &SandboxSpec,
    host: &HostLayout,
    layers: &[LayerFd],
    upper: Option<&LayerFd>,
) -> Result<(), Error> {
    let image = matches!(spec.root, Root::Layers(_));
    // The new root: a small tmpfs that only holds mount points and /etc
    // (host root), or the image's writable upper layer (image root).
    ops.push(Op::Fs {
        fstype: c"tmpfs",
        target: cpath(BASE)?,
        flags: NOSUID_NODEV,
        data: if image {
            cpath(format!(
                "mode=0755,size={}",
                spec.limits.tmpfs_size.max(1 << 20)
            ))?
        } else {
            CString::from(c"mode=0755,size=1m,nr_inodes=4096")
        },
        optional: false,
    });
    match &spec.root {
        Root::Host => host_root_entries(ops, host),
        Root::Layers(_) => image_overlay(ops, layers, upper),
        Root::Dir(_) => Err(Error::Unsupported {
            what: "a directory root".into(),
            why: "not implemented; use the host root or an image".into(),
            fix: "run without it, or import the directory as an image".into(),
        }),
        Root::Image(r) => Err(Error::Unsupported {
            what: format!("image {r} by reference"),
            why: "the native engine takes images from nanoclaw's store, as layers".into(),
            fix: "resolve it with `nanoclaw image pull` (the CLI does), or use --backend docker"
                .into(),
        }),
    }
}

/// The host's `/usr`, `/bin`, `/lib*`…: bound read-only, symlinks kept.
fn host_root_entries(ops: &mut Ops, host: &HostLayout) -> Result<(), Error> {
    for (name, link) in &host.root_entries {
        let inside = format!("/{name}");
        match link {
            Some(t) => ops.push(Op::Symlink {
                target: cpath(t)?,
                link: ops.under(&inside)?,
            }),
            None => {
                ops.push(Op::Mkdir {
                    path: ops.under(&inside)?,
                    mode: 0o755,
                });
                ops.push(Op::Bind {
                    source: cpath(&inside)?,
                    target: ops.under(&inside)?,
                    attrs: RO_ATTRS,
                    if_exists: false,
                });
            }
        }
    }
    Ok(())
}

/// The image's layers as an overlay, with a writable upper layer (the
/// persistent `upper`, or one on the root's tmpfs).
fn image_overlay(ops: &mut Ops, layers: &[LayerFd], upper: Option<&LayerFd>) -> Result<(), Error> {
    let dirs: &[&str] = if upper.is_some() {
        &["root"]
    } else {
        &["upper", "work", "root"]
    };
    for d in dirs {
        ops.push(Op::Mkdir {
            path: cpath(format!("{BASE}/{d}"))?,
            mode: 0o755,
        });
    }
    // Layers by descriptor (re-opened above, before /tmp was covered), or
    // attached here (the runner's idmapped copies, which overlayfs takes
    // only from the mount namespace it is mounted in); gone with the old
    // root at pivot_root.
    let mut place = |l: &LayerFd, name: String| -> Result<String, Error> {
        if !l.attached {
            return Ok(format!("/proc/self/fd/{}", l.fd));
        }
        let at = format!("{BASE}/{name}");
        ops.push(Op::Mkdir {
            path: cpath(&at)?,
            mode: 0o700,
        });
        ops.push(Op::Attach {
            fd: l.fd,
            target: cpath(&at)?,
        });
        Ok(at)
    };
    let (upperdir, workdir) = match upper {
        Some(u) => {
            let at = place(u, "persistent".into())?;
            (format!("{at}/upper"), format!("{at}/work"))
        }
        None => (format!("{BASE}/upper"), format!("{BASE}/work")),
    };
    // Topmost first; `userxattr` because the overlay is mounted inside the
    // sandbox's user namespace.
    let lower: Vec<String> = layers
        .iter()
        .enumerate()
        .rev()
        .map(|(i, l)| place(l, format!("layer{i}")))
        .collect::<Result<_, _>>()?;
    ops.push(Op::Fs {
        fstype: c"overlay",
        target: cpath(&ops.root)?,
        flags: NOSUID_NODEV,
        data: cpath(format!(
            "lowerdir={},upperdir={upperdir},workdir={workdir},userxattr",
            lower.join(":")
        ))?,
        optional: false,
    });
    Ok(())
}

/// The image's own /etc, with the sandbox's name and (lack of) network
/// written over it in the per-sandbox upper layer.
fn image_etc(ops: &mut Ops, spec: &SandboxSpec) -> Result<(), Error> {
    ops.push(Op::Mkdir {
        path: ops.under("/etc")?,
        mode: 0o755,
    });
    for (name, data) in [
        ("hosts", hosts_file(&spec.hostname)),
        ("hostname", format!("{}\n", spec.hostname)),
        ("resolv.conf", resolv_conf(spec)),
    ] {
        ops.push(Op::File {
            path: ops.under(&format!("/etc/{name}"))?,
            data: data.into_bytes(),
            mode: 0o644,
        });
    }
    Ok(())
}

/// A synthetic /etc: nanoclaw's own users, names and resolver, and the
/// few host entries programs need, bound read-only.
fn synthetic_etc(ops: &mut Ops, spec: &SandboxSpec, host: &HostLayout) -> Result<(), Error> {
    ops.push(Op::Mkdir {
        path: ops.under("/etc")?,
        mode: 0o755,
    });
    let files: [(&str, String); 6] = [
        ("passwd", passwd(spec.user.uid, spec.user.gid)),
        ("group", group(spec.user.gid)),
        ("hosts", hosts_file(&spec.hostname)),
        ("hostname", format!("{}\n", spec.hostname)),
        ("resolv.conf", resolv_conf(spec)),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"
                .to_string(),
        ),
    ];
    for (name, data) in files {
        ops.push(Op::File {
            path: ops.under(&format!("/etc/{name}"))?,
            data: data.into_bytes(),
            mode: 0o644,
        });
    }
    for (name, link, is_dir) in &host.etc_entries {
        let inside = format!("/etc/{name}");
        match link {
            Some(t) => ops.push(Op::Symlink {
                target: cpath(t)?,
                link: ops.under(&inside)?,
            }),
            None => {
                if *is_dir {
                    ops.push(Op::Mkdir {
                        path: ops.under(&inside)?,
                        mode: 0o755,
                    });
                } else {
                    ops.push(Op::File {
                        path: ops.under(&inside)?,
                        data: Vec::new(),
                        mode: 0o644,
                    });
                }
                ops.push(Op::Bind {
                    source: cpath(&inside)?,
                    target: ops.under(&inside)?,
                    attrs: RO_ATTRS,
                    if_exists: true,
                });
            }
        }
    }
    Ok(())
}

/// Where the sandbox finds its egress CA (credential rules): the CA alone,
/// and the host's bundle with it.
pub(crate) const EGRESS_CA: &str = "/etc/nanoclaw/ca.crt";
/// See [`EGRESS_CA`].
pub(crate) const EGRESS_CA_BUNDLE: &str = "/etc/nanoclaw/ca-bundle.crt";
/// The host bundle's path that programs use by default (Debian's; also
/// the target of /etc/ssl/cert.pem elsewhere), covered with
/// [`EGRESS_CA_BUNDLE`] in a host root.
const DEFAULT_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Adds the sandbox's egress CA files to `plan` ([`EGRESS_CA`],
/// [`EGRESS_CA_BUNDLE`], filled from the memfds `ca_fd` and `bundle_fd`);
/// in a host root the bundle also covers the default bundle path, so
/// programs that read no variable trust the CA too.
pub(crate) fn add_egress_ca(plan: &mut FsPlan, ca_fd: i32, bundle_fd: i32) -> Result<(), Error> {
    let root = plan.root.to_string_lossy().into_owned();
    let under = |p: &str| cpath(format!("{root}{p}"));
    plan.ops.push(Op::Mkdir {
        path: under("/etc/nanoclaw")?,
        mode: 0o755,
    });
    for (path, fd) in [(EGRESS_CA, ca_fd), (EGRESS_CA_BUNDLE, bundle_fd)] {
        plan.ops.push(Op::FileFromFd {
            path: under(path)?,
            fd,
            mode: 0o644,
        });
    }
    if plan.root_readonly && Path::new(DEFAULT_BUNDLE).is_file() {
        plan.ops.push(Op::Bind {
            source: under(EGRESS_CA_BUNDLE)?,
            target: under(DEFAULT_BUNDLE)?,
            attrs: RO_ATTRS,
            if_exists: true,
        });
    }
    Ok(())
}

/// `/tmp`, the writable scratch space, and the home directory: size-limited
/// tmpfs instances.
fn tmp_and_home(ops: &mut Ops, spec: &SandboxSpec) -> Result<(), Error> {
    // /tmp: the writable scratch space.
    ops.push(Op::Mkdir {
        path: ops.under("/tmp")?,
        mode: 0o1777,
    });
    let mut tmp_flags = NOSUID_NODEV;
    if spec.hardening.tmp_noexec {
        tmp_flags |= libc::MS_NOEXEC;
    }
    ops.push(Op::Fs {
        fstype: c"tmpfs",
        target: ops.under("/tmp")?,
        flags: tmp_flags,
        data: cpath(format!(
            "mode=1777,size={}",
            spec.limits.tmpfs_size.max(4096)
        ))?,
        optional: false,
    });
    if let Some(home) = &spec.home {
        let home = normalize_target(home)?;
        ops.mkdirs(&home)?;
        ops.push(Op::Fs {
            fstype: c"tmpfs",
            target: ops.under(&home.to_string_lossy())?,
            flags: tmp_flags,
            data: cpath(format!(
                "mode=0755,uid={},gid={},size={}",
                spec.user.uid,
                spec.user.gid,
                spec.limits.tmpfs_size.max(4096)
            ))?,
            optional: false,
        });
    }
    Ok(())
}

/// A minimal /dev: the harmless devices bound from the host, a private
/// devpts, a size-limited /dev/shm and the usual symlinks.
fn dev(ops: &mut Ops, spec: &SandboxSpec) -> Result<(), Error> {
    ops.push(Op::Mkdir {
        path: ops.under("/dev")?,
        mode: 0o755,
    });
    ops.push(Op::Fs {
        fstype: c"tmpfs",
        target: ops.under("/dev")?,
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: CString::from(c"mode=0755,size=64k,nr_inodes=64"),
        optional: false,
    });
    for d in DEVICES {
        let inside = format!("/dev/{d}");
        ops.push(Op::File {
            path: ops.under(&inside)?,
            data: Vec::new(),
            mode: 0o666,
        });
        ops.push(Op::Bind {
            source: cpath(&inside)?,
            target: ops.under(&inside)?,
            attrs: crate::native::sys::MOUNT_ATTR_NOSUID | crate::native::sys::MOUNT_ATTR_NOEXEC,
            if_exists: false,
        });
    }
    for d in ["/dev/pts", "/dev/shm"] {
        ops.push(Op::Mkdir {
            path: ops.under(d)?,
            mode: 0o755,
        });
    }
    ops.push(Op::Fs {
        fstype: c"devpts",
        target: ops.under("/dev/pts")?,
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: CString::from(c"newinstance,ptmxmode=0666,mode=0620"),
        optional: true,
    });
    ops.push(Op::Fs {
        fstype: c"tmpfs",
        target: ops.under("/dev/shm")?,
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: cpath(format!(
            "mode=1777,size={}",
            spec.limits.tmpfs_size.clamp(4096, 64 << 20)
        ))?,
        optional: false,
    });
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(Op::Symlink {
            target: cpath(target)?,
            link: ops.under(&format!("/dev/{link}"))?,
        });
    }
    Ok(())
}

/// A fresh /proc with the dangerous parts masked, and a read-only /sys.
fn proc_and_sys(ops: &mut Ops) -> Result<(), Error> {
    // A fresh /proc for the new pid namespace, with the dangerous parts masked.
    ops.push(Op::Mkdir {
        path: ops.under("/proc")?,
        mode: 0o555,
    });
    ops.push(Op::Fs {
        fstype: c"proc",
        target: ops.under("/proc")?,
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: CString::default(),
        optional: false,
    });
    for f in PROC_MASKED_FILES {
        ops.push(Op::Bind {
            source: ops.under("/dev/null")?,
            target: ops.under(&format!("/proc/{f}"))?,
            attrs: RO_ATTRS,
            if_exists: true,
        });
    }
    for d in PROC_READONLY_DIRS {
        ops.push(Op::Bind {
            source: ops.under(&format!("/proc/{d}"))?,
            target: ops.under(&format!("/proc/{d}"))?,
            attrs: RO_ATTRS,
            if_exists: true,
        });
    }
    for d in PROC_MASKED_DIRS {
        ops.push(Op::Fs {
            fstype: c"tmpfs",
            target: ops.under(&format!("/proc/{d}"))?,
            flags: libc::MS_RDONLY | NOSUID_NODEV | libc::MS_NOEXEC,
            data: CString::from(c"size=0,nr_inodes=1"),
            optional: true,
        });
    }

    // A read-only /sys with the firmware tables hidden.
    ops.push(Op::Mkdir {
        path: ops.under("/sys")?,
        mode: 0o555,
    });
    ops.push(Op::Fs {
        fstype: c"sysfs",
        target: ops.under("/sys")?,
        flags: libc::MS_RDONLY | NOSUID_NODEV | libc::MS_NOEXEC,
        data: CString::default(),
        optional: true,
    });
    ops.push(Op::Fs {
        fstype: c"tmpfs",
        target: ops.under("/sys/firmware")?,
        flags: libc::MS_RDONLY | NOSUID_NODEV | libc::MS_NOEXEC,
        data: CString::from(c"size=0,nr_inodes=1"),
        optional: true,
    });
    Ok(())
}

/// One workspace or user mount: its mount point (made with its parents),
/// then the idmapped mount attached, or the source bound.
fn user_mount(ops: &mut Ops, m: &UserMount) -> Result<(), Error> {
    ops.mkdirs(m.target.parent().unwrap_or(Path::new("/")))?;
    let inside = m.target.to_string_lossy().into_owned();
    if m.is_dir {
        ops.push(Op::Mkdir {
            path: ops.under(&inside)?,
            mode: 0o755,
        });
    } else {
        ops.push(Op::File {
            path: ops.under(&inside)?,
            data: Vec::new(),
            mode: 0o644,
        });
    }
    let target = ops.under(&inside)?;
    let mut attrs = crate::native::sys::MOUNT_ATTR_NOSUID | crate::native::sys::MOUNT_ATTR_NODEV;
    if m.access == Access::Ro {
        attrs |= crate::native::sys::MOUNT_ATTR_RDONLY;
    }
    match m.idmapped_fd {
        Some(fd) => {
            ops.push(Op::Attach {
                fd,
                target: target.clone(),
            });
            ops.push(Op::Attrs { target, attrs });
        }
        None => {
            ops.push(Op::Bind {
                source: cpath(format!("/proc/self/fd/{}", m.fd))?,
                target: target.clone(),
                attrs,
                if_exists: false,
            });
            // A source that contains BASE (`/`, `/tmp`) brings, through
            // the recursive bind, a copy of the sandbox's own root
            // (mounted on BASE) along: take it off again, so the host's
            // directory shows, with the attributes asked for.
            if let Some(rel) = base_within(&m.source) {
                let path = format!("{}{rel}", target.to_string_lossy());
                ops.push(Op::Detach { path: cpath(path)? });
                ops.push(Op::Attrs { target, attrs });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostLayout {
        HostLayout {
            root_entries: vec![("usr".into(), None), ("bin".into(), Some("usr/bin".into()))],
            etc_entries: vec![
                ("ld.so.cache".into(), None, false),
                (
                    "localtime".into(),
                    Some("/usr/share/zoneinfo/UTC".into()),
                    false,
                ),
            ],
        }
    }

    fn descs(plan: &FsPlan) -> Vec<String> {
        let root = plan.root.to_string_lossy().into_owned();
        plan.ops.iter().map(|o| o.describe(&root)).collect()
    }

    #[test]
    fn host_root_is_bound_read_only_and_symlinks_kept() {
        let spec = SandboxSpec::new(["true"]);
        let plan = build(&spec, &host(), &[], &[], None).unwrap();
        let d = descs(&plan);
        assert!(d.contains(&"bind /usr on /usr (in the sandbox)".to_string()));
        assert!(d.contains(&"symlink /bin (in the sandbox) -> usr/bin".to_string()));
        let usr = plan
            .ops
            .iter()
            .find(|o| matches!(o, Op::Bind { target, .. } if target.as_bytes() == b"/tmp/usr"))
            .unwrap();
        match usr {
            Op::Bind { attrs, .. } => assert_ne!(attrs & crate::native::sys::MOUNT_ATTR_RDONLY, 0),
            _ => unreachable!(),
        }
    }

    #[test]
    fn etc_is_synthetic_and_never_has_shadow() {
        let spec = SandboxSpec::new(["true"]);
        let plan = build(&spec, &host(), &[], &[], None).unwrap();
        let d = descs(&plan).join("\n");
        assert!(d.contains("write /etc/passwd (in the sandbox)"));
        assert!(!d.contains("shadow"));
        assert!(!d.contains("bind /etc on"));
    }

    #[test]
    fn passwd_has_the_sandbox_user() {
        assert!(passwd(1000, 1000).contains("sandbox:x:1000:1000:"));
        assert!(!passwd(0, 0).contains("sandbox"));
        assert!(group(1234).contains("sandbox:x:1234:"));
    }

    #[test]
    fn targets_are_normalised_and_protected() {
        assert_eq!(
            normalize_target(Path::new("/a/./b/")).unwrap(),
            PathBuf::from("/a/b")
        );
        assert!(normalize_target(Path::new("/a/../etc")).is_err());
        assert!(normalize_target(Path::new("rel")).is_err());
        for bad in [
            "/",
            "/proc",
            "/proc/x",
            "/dev",
            "/sys/fs",
            "/etc",
            "/etc/passwd",
        ] {
            assert!(check_target(Path::new(bad)).is_err(), "{bad}");
        }
        for good in ["/data", "/workspace", "/tmp/x", "/opt/etc"] {
            assert!(check_target(Path::new(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn image_root_is_an_overlay_of_layer_fds_and_keeps_the_images_etc() {
        let mut spec = SandboxSpec::new(["true"]);
        spec.root = Root::Layers(vec!["/l1".into(), "/l2".into()]);
        let layers = vec![
            LayerFd {
                fd: 7,
                path: "/l1".into(),
                dev_ino: (1, 2),
                attached: false,
            },
            LayerFd {
                fd: 8,
                path: "/l2".into(),
                dev_ino: (1, 3),
                attached: false,
            },
        ];
        let plan = build(&spec, &host(), &[], &layers, None).unwrap();
        assert!(!plan.root_readonly);
        assert_eq!(plan.root.to_bytes(), b"/tmp/root");
        let overlay = plan
            .ops
            .iter()
            .find_map(|o| match o {
                Op::Fs { fstype, data, .. } if fstype.to_bytes() == b"overlay" => {
                    Some(data.to_string_lossy().into_owned())
                }
                _ => None,
            })
            .unwrap();
        // Topmost layer first, by descriptor, userxattr.
        assert!(
            overlay.starts_with("lowerdir=/proc/self/fd/8:/proc/self/fd/7,"),
            "{overlay}"
        );
        assert!(overlay.ends_with(",userxattr"), "{overlay}");
        let d = descs(&plan).join("\n");
        assert!(!d.contains("/etc/passwd"), "the image keeps its own users");
        assert!(d.contains("write /etc/hosts (in the sandbox)"));
        assert!(
            !d.contains("bind /usr"),
            "no host directories in an image root"
        );
        // The layers are re-opened before /tmp is covered.
        assert!(matches!(plan.ops[0], Op::Reopen { fd: 7, .. }));
    }

    #[test]
    fn idmapped_layers_are_attached_under_the_base_before_the_overlay() {
        let mut spec = SandboxSpec::new(["true"]);
        spec.root = Root::Layers(vec!["/l1".into(), "/l2".into()]);
        spec.root_upper = Some("/up".into());
        let l = |fd, path: &str| LayerFd {
            fd,
            path: path.into(),
            dev_ino: (1, fd as u64),
            attached: true,
        };
        let (layers, upper) = (vec![l(7, "/l1"), l(8, "/l2")], l(9, "/up"));
        let plan = build(&spec, &host(), &[], &layers, Some(&upper)).unwrap();
        assert!(
            !plan.ops.iter().any(|o| matches!(o, Op::Reopen { .. })),
            "attached layers are not re-opened by path"
        );
        let pos = |want: &dyn Fn(&Op) -> bool| plan.ops.iter().position(want).unwrap();
        let overlay =
            pos(&|o| matches!(o, Op::Fs { fstype, .. } if fstype.to_bytes() == b"overlay"));
        let tmpfs = pos(&|o| matches!(o, Op::Fs { fstype, .. } if fstype.to_bytes() == b"tmpfs"));
        for (fd, at) in [
            (7, "/tmp/layer0"),
            (8, "/tmp/layer1"),
            (9, "/tmp/persistent"),
        ] {
            let a = pos(
                &|o| matches!(o, Op::Attach { fd: f, target } if *f == fd && target.to_bytes() == at.as_bytes()),
            );
            assert!(
                tmpfs < a && a < overlay,
                "{at} attached between the tmpfs and the overlay"
            );
        }
        let Op::Fs { data, .. } = &plan.ops[overlay] else {
            unreachable!()
        };
        assert_eq!(
            data.to_str().unwrap(),
            "lowerdir=/tmp/layer1:/tmp/layer0,upperdir=/tmp/persistent/upper,\
             workdir=/tmp/persistent/work,userxattr"
        );
    }

    #[test]
    fn proc_is_masked() {
        let plan = build(&SandboxSpec::new(["true"]), &host(), &[], &[], None).unwrap();
        let d = descs(&plan).join("\n");
        for f in [
            "kcore",
            "keys",
            "sysrq-trigger",
            "timer_list",
            "sched_debug",
        ] {
            assert!(
                d.contains(&format!(
                    "bind /dev/null (in the sandbox) on /proc/{f} (in the sandbox)"
                )),
                "{f}"
            );
        }
        assert!(d.contains("bind /proc/sys (in the sandbox) on /proc/sys (in the sandbox)"));
    }
}
