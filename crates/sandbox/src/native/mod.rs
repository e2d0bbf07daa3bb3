//! The native backend: Linux namespaces, a read-only root, cgroups, seccomp
//! and Landlock, with no daemon and no image.
//!
//! Process structure of one run:
//!
//! ```text
//! runner (this process) ── clone(NEWUSER|NEWNS|NEWPID|NEWIPC|NEWUTS|NEWNET) ──▶ init (pid 1)
//!   writes uid/gid maps, adds init to the cgroup, says "go"             builds the root, pivot_root,
//!   polls stdout/stderr, the status pipe, the deadline, cgroup events    forks the payload, reaps,
//!   kills init (and so the whole pid namespace) on any limit             exits with it
//! ```

pub mod caps;
pub mod cgroup;
pub(crate) mod child;
pub mod idslot;
pub mod landlock;
mod pause;
mod plan;
pub mod proto;
pub mod seccomp;
pub mod session;
mod stop;
mod supervise;
pub(crate) mod sys;

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::outcome::Layers;
use crate::spec::{Access, Network, SandboxSpec, Seccomp, Stdin};
use crate::Error;

pub(crate) use supervise::block_runner_signals;
pub(crate) use supervise::report_of;
pub use supervise::{kill, wait, KillHandle};

use child::{ChildPlan, StdinFd};
use plan::UserMount;

/// The first host uid (and gid) of the storage range: image layers, persistent
/// upper layers and nanoclaw's own workspaces on the host are owned by
/// `ROOTFUL_ID_BASE + n` for a sandbox's id `n`. No sandbox runs in it: each
/// rootful sandbox maps its ids to a slot of its own above it
/// ([`idslot::slot_base`]) and sees storage-range files shifted onto that
/// slot through idmapped mounts (see [`idslot`]).
pub const ROOTFUL_ID_BASE: u32 = 0x4000_0000;
/// How many ids a rootful sandbox maps (and the size of each id slot).
pub const ROOTFUL_ID_COUNT: u32 = 65536;

/// How long the sandbox's setup (namespaces, root, cgroup, network) may
/// take before the runner gives up on it, kills the child and fails the
/// start. Setup takes milliseconds; this bounds a child that never reports.
pub const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the runner treats the sandbox's output and its own signals.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Copy output to the runner's own stdout/stderr as it arrives (still
    /// counted against the output limit) instead of capturing it.
    pub stream: bool,
    /// Catch SIGINT, SIGTERM and SIGHUP sent to the runner: kill the sandbox,
    /// clean up, and report `killed_by: killed`. For command-line use.
    pub handle_signals: bool,
    /// The calling process exits right after [`wait`] returns (`nanoclaw
    /// run`). Then [`wait`] returns as soon as the command has ended and the
    /// sandbox's cgroup is gone, without waiting for init's exit, in which
    /// the kernel tears down the sandbox's namespaces (its mount tree,
    /// above all): init, idle by then and moved out of the sandbox's
    /// cgroup, exits when the caller closes its lifeline and is reaped by
    /// whoever adopts it when the caller exits — as bwrap leaves its init.
    /// A long-lived caller must not set it: every run would leave it an
    /// unreaped child (and a parent that never reaps collects one zombie per
    /// run). What init's exit costs (unmounting, freeing the sandbox's tmpfs
    /// contents) is then spent outside the sandbox's cgroup, and the
    /// sandbox's host ids are free again while it is still exiting. Only
    /// where the sandbox's cgroup is all v1 (a self-move out of it is cheap
    /// there) or absent, and without a persistent `root_upper`; elsewhere
    /// init is reaped as usual.
    pub exit_after_wait: bool,
}

/// A running sandbox. Wait for it with [`wait`].
#[derive(Debug)]
pub struct Sandbox {
    pub(crate) id: String,
    pub(crate) pid: libc::pid_t,
    pub(crate) started: Instant,
    pub(crate) spec_limits: crate::spec::Limits,
    pub(crate) cgroup: Option<cgroup::Cgroup>,
    pub(crate) stdout_r: RawFd,
    pub(crate) stderr_r: RawFd,
    pub(crate) status_r: RawFd,
    pub(crate) stdin_w: Option<supervise::StdinFeed>,
    pub(crate) opts: RunOptions,
    pub(crate) layers: Layers,
    pub(crate) exec_error: Option<(i32, String)>,
    pub(crate) kill_flag: std::sync::Arc<supervise::KillShared>,
    pub(crate) signal_fd: Option<RawFd>,
    /// A pidfd of init (None on kernels before 5.3): the runner waits on it
    /// rather than on the status pipe, so that init's write of the status
    /// does not wake the runner onto init's CPU and stall init's exit.
    pub(crate) init_pidfd: Option<RawFd>,
    /// The egress proxy serving this sandbox (allowlist and open modes).
    pub(crate) proxy: Option<nanoclaw_net::BlockingProxy>,
    /// `none`, `allowlist` or `open`.
    pub(crate) net_mode: &'static str,
    /// Kernel-level egress (veth + nftables), rootful `--network kernel`.
    pub(crate) kernel_egress: Option<nanoclaw_net::kernel::KernelEgress>,
    /// The runner's end of init's lifeline pipe.
    pub(crate) lifeline: Option<RawFd>,
    /// Reaped and cleaned up; nothing left to do on drop.
    pub(crate) released: bool,
    /// For a long-lived sandbox: what every exec starts from.
    pub(crate) exec_base: Option<session::ExecBase>,
    /// Frozen by [`session::pause`] (or being frozen): killing it must
    /// thaw it too.
    pub(crate) paused: bool,
    /// Rootful: the host id slot, held until the sandbox is reaped.
    pub(crate) id_slot: Option<idslot::IdSlot>,
}

impl Sandbox {
    /// The sandbox's unique id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the engine applied to this sandbox.
    pub fn layers(&self) -> &Layers {
        &self.layers
    }

    /// The host pid of the sandbox's init process.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// A pidfd of the sandbox's init (readable once it has exited), for a
    /// holder that polls; `None` on kernels before 5.3.
    pub fn init_pidfd(&self) -> Option<RawFd> {
        self.init_pidfd
    }
}

/// Runs `spec` to completion with captured output.
pub fn run(spec: &SandboxSpec) -> Result<crate::Outcome, Error> {
    wait(start(spec, RunOptions::default())?)
}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString, Error> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| Error::InvalidSpec(format!("{what} contains a NUL byte")))
}

/// Checks the parts of a spec that need no host access.
pub fn validate(spec: &SandboxSpec) -> Result<(), Error> {
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(Error::InvalidSpec(
            "no command given: pass the command to run after the options, e.g. `nanoclaw run -- python3 -c 'print(1)'`".into(),
        ));
    }
    let l = &spec.limits;
    if let Some(m) = l.memory {
        if m < crate::spec::MIN_MEMORY {
            return Err(Error::InvalidSpec(format!(
                "memory limit {m} bytes is below the minimum of 4m; use e.g. --memory 64m"
            )));
        }
    }
    if let (Some(m), Some(s)) = (l.memory, l.memory_swap) {
        if s < m {
            return Err(Error::InvalidSpec(format!(
                "--memory-swap ({s} bytes) must be at least --memory ({m} bytes): it is memory plus swap"
            )));
        }
    }
    if let Some(c) = l.cpus {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::InvalidSpec(format!(
                "--cpus must be a positive number such as 0.5 or 2, got {c}"
            )));
        }
        if c < 0.01 {
            return Err(Error::InvalidSpec(format!(
                "--cpus {c} is below 0.01, the smallest quota the kernel enforces (1 ms per 100 ms); use at least 0.01"
            )));
        }
    }
    if l.pids == Some(0) {
        return Err(Error::InvalidSpec(
            "--pids must be at least 1 (the command itself is a task)".into(),
        ));
    }
    if l.timeout.is_zero() {
        return Err(Error::InvalidSpec(
            "--timeout must be greater than zero, e.g. 30s".into(),
        ));
    }
    if l.output_limit == 0 {
        return Err(Error::InvalidSpec(
            "--output-limit must be greater than zero, e.g. 10m".into(),
        ));
    }
    if l.tmpfs_size < 4096 {
        return Err(Error::InvalidSpec(
            "--tmpfs-size must be at least 4k, e.g. 100m".into(),
        ));
    }
    for (k, _) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::InvalidSpec(format!(
                "invalid environment variable name {k:?}: use --env KEY=VALUE"
            )));
        }
    }
    if let Some(w) = &spec.workdir {
        if !w.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "--workdir {:?} must be an absolute path inside the sandbox",
                w.display()
            )));
        }
    }
    if let Some(h) = &spec.home {
        let n = plan::normalize_target(h)?;
        if n == Path::new("/") || n.starts_with("/proc") || n.starts_with("/dev") {
            return Err(Error::InvalidSpec(format!(
                "home {:?}: pick a directory such as /home/user",
                h.display()
            )));
        }
    }
    if spec.user.uid == u32::MAX || spec.user.gid == u32::MAX {
        return Err(Error::InvalidSpec(
            "--user: 4294967295 (-1) is not a user or group id".into(),
        ));
    }
    let rootful = geteuid() == 0;
    if rootful && (spec.user.uid >= ROOTFUL_ID_COUNT || spec.user.gid >= ROOTFUL_ID_COUNT) {
        return Err(Error::InvalidSpec(format!(
            "--user {}:{} is outside the sandbox's id range 0-{}",
            spec.user.uid,
            spec.user.gid,
            ROOTFUL_ID_COUNT - 1
        )));
    }
    Ok(())
}

fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn getegid() -> u32 {
    // SAFETY: getegid cannot fail.
    unsafe { libc::getegid() }
}

/// Opens and checks the workspace and user mounts.
fn resolve_mounts(
    spec: &SandboxSpec,
    ids: &idslot::HostIds,
    caps: &[caps::Cap],
) -> Result<Vec<UserMount>, Error> {
    let rootful = ids.rootful();
    let mut out: Vec<UserMount> = Vec::new();
    for m in &spec.mounts {
        let target = plan::normalize_target(&m.target)?;
        plan::check_target(&target)?;
        if out.iter().any(|o| o.target == target) {
            return Err(Error::InvalidSpec(format!(
                "two mounts target {}; each container path may be mounted once",
                target.display()
            )));
        }
        let src = cstr(m.source.as_os_str().as_bytes(), "mount source")?;
        let fd = sys::open(&src, libc::O_PATH).map_err(|e| {
            Error::InvalidSpec(format!(
                "mount source {} cannot be opened: {e}; check that it exists",
                m.source.display()
            ))
        })?;
        let md = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .map_err(|e| Error::InvalidSpec(format!("mount source {}: {e}", m.source.display())))?;
        let rw = if rootful && m.access == Access::Rw {
            match rw_ownership(spec, caps, &m.source, fd, &md) {
                Ok(o) => Some(o),
                Err(e) => {
                    sys::close(fd);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let idmapped_fd = match rw {
            None => {
                // Read-only mounts are plain binds: host files keep their
                // owners and permissions (they show as `nobody` inside).
                None
            }
            Some(RwOwnership::Storage) if !ids.shifts_storage() => None,
            Some(RwOwnership::Storage) => {
                match ids.shifted_tree(fd, 0, "a read-write mount in a rootful sandbox") {
                    Ok(t) => Some(t),
                    Err(e) => {
                        sys::close(fd);
                        return Err(e);
                    }
                }
            }
            Some(RwOwnership::Idmap | RwOwnership::IdmapRoot) => {
                match idmap::idmapped_clone(fd, &md, ids, spec.user.uid, spec.user.gid) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        sys::close(fd);
                        return Err(e);
                    }
                }
            }
        };
        out.push(UserMount {
            fd,
            source: m.source.clone(),
            dev_ino: (md.dev(), md.ino()),
            is_dir: md.is_dir(),
            target,
            access: m.access,
            idmapped_fd,
            no_setid_files: matches!(rw, Some(RwOwnership::Idmap | RwOwnership::IdmapRoot)),
        });
    }
    // Mount parents before children.
    out.sort_by_key(|m| m.target.components().count());
    Ok(out)
}

mod idmap;

/// How a rootful read-write mount is made writable for the sandbox user.
enum RwOwnership {
    /// The source belongs to the sandbox user's id in the storage range
    /// (nanoclaw's own workspaces are chowned there): attached with the
    /// whole storage range shifted onto the sandbox's slot, so what the
    /// sandbox writes lands in the storage range (a plain bind when the
    /// sandbox runs in that range itself).
    Storage,
    /// An idmapped mount maps the source's (unprivileged) owner to the
    /// sandbox user: the sandbox writes with exactly that owner's authority.
    Idmap,
    /// The source belongs to the host's root: an idmapped mount maps root
    /// to the sandbox user, so files the sandbox writes there belong to root
    /// on the host, as they would had root written them. Allowed only with
    /// the default seccomp profile, which then also refuses creating
    /// set-user-ID and set-group-ID files (else the sandbox could plant a
    /// setuid-root program on the host), without CAP_FSETID (which would
    /// keep an existing file's set-id bits across the sandbox's writes) or
    /// CAP_SETFCAP (file capabilities there would count as root's), and
    /// when the source holds no set-id or file-capability program yet.
    IdmapRoot,
}

/// Decides how a rootful rw mount of `source` (open as `fd`) may be
/// written, given the capabilities the sandbox keeps (see [`RwOwnership`]).
fn rw_ownership(
    spec: &SandboxSpec,
    caps: &[caps::Cap],
    source: &Path,
    fd: RawFd,
    md: &std::fs::Metadata,
) -> Result<RwOwnership, Error> {
    if md.uid() == ROOTFUL_ID_BASE + spec.user.uid {
        return Ok(RwOwnership::Storage);
    }
    if md.uid() != 0 {
        return Ok(RwOwnership::Idmap);
    }
    let refuse = |why: String, fix: &str| {
        Err(Error::InvalidSpec(format!(
            "{} is owned by root, so the sandbox writes there as the host's root; {why}; {fix}, \
             chown the directory to an unprivileged user, or mount it ro",
            source.display()
        )))
    };
    if !matches!(spec.hardening.seccomp, Seccomp::Default) {
        return refuse(
            "that needs the default seccomp profile, which refuses creating set-id files there"
                .into(),
            "drop --seccomp",
        );
    }
    if caps.contains(&caps::Cap::FSETID) {
        return refuse(
            "CAP_FSETID would keep set-id bits on files the sandbox rewrites there".into(),
            "drop --cap-add FSETID",
        );
    }
    if caps.contains(&caps::Cap::SETFCAP) {
        return refuse(
            "CAP_SETFCAP would let it attach file capabilities that count as root's on the host"
                .into(),
            "drop --cap-add SETFCAP",
        );
    }
    // The kernel clears set-id bits and file capabilities when the sandbox
    // write(2)s such a file, not when it writes through a shared mmap.
    match idmap::find_privileged_file(fd) {
        Ok(None) => Ok(RwOwnership::IdmapRoot),
        Ok(Some(f)) => refuse(
            format!(
                "it holds {}, a set-id or file-capability program the sandbox could rewrite \
                 (through mmap) keeping its privilege",
                f.display()
            ),
            "remove that file or its set-id bits",
        ),
        Err(e) => refuse(
            format!("it could not be checked for set-id programs ({e})"),
            "fix that",
        ),
    }
}

/// Starts a sandbox for `spec`. The returned [`Sandbox`] must be passed to
/// [`wait`], which reaps it and releases everything it holds.
pub fn start(spec: &SandboxSpec, opts: RunOptions) -> Result<Sandbox, Error> {
    start_with(spec, opts, false)
}

/// [`start`], or with `idle` a long-lived sandbox whose init runs nothing
/// and serves execs ([`session::create`]).
///
/// The steps: [`Prepared::new`] (everything fallible that needs no child),
/// [`Launch::new`] (the pipes and the child's plan), [`Launch::clone_init`],
/// [`runner_setup`] (id maps, cgroup, rlimits, network, the go-ahead) while
/// the child builds its root, then [`finish_setup`] (the child's report).
fn start_with(spec: &SandboxSpec, mut opts: RunOptions, idle: bool) -> Result<Sandbox, Error> {
    validate(spec)?;
    let started = Instant::now();
    let rootful = geteuid() == 0;
    let id = crate::procs::random_id()?;
    let mut layers = initial_layers(rootful);
    // Everything fallible that needs no child comes first, so a bad spec
    // leaves nothing behind.
    let mut prep = Prepared::new(spec, rootful, &mut layers)?;
    // A persistent upper layer (`root_upper`) is unmounted only at init's
    // exit: the next user of that directory must find it free.
    opts.exit_after_wait &= !idle && spec.root_upper.is_none();
    let launch = Launch::new(spec, &mut prep, rootful, idle, opts.exit_after_wait)?;
    let signal_fd = if opts.handle_signals {
        match supervise::block_runner_signals() {
            Ok(fd) => Some(fd),
            Err(e) => {
                launch.close_all();
                return Err(e);
            }
        }
    } else {
        None
    };
    let pid = launch.clone_init(&prep.ids)?;

    let mut sb = Sandbox {
        id,
        pid,
        started,
        spec_limits: spec.limits,
        cgroup: None,
        stdout_r: launch.pipes.stdout.0,
        stderr_r: launch.pipes.stderr.0,
        status_r: launch.pipes.status.0,
        stdin_w: match (&spec.stdin, launch.pipes.stdin) {
            (Stdin::Bytes(b), Some((_, w))) => Some(supervise::StdinFeed::bytes(w, b.clone())),
            (Stdin::Inherit, Some((_, w))) => Some(supervise::StdinFeed::forward(w, 0)),
            _ => None,
        },
        opts,
        layers,
        exec_error: None,
        kill_flag: std::sync::Arc::new(supervise::KillShared::new(pid)),
        signal_fd,
        init_pidfd: sys::pidfd_open(pid).ok(),
        proxy: None,
        kernel_egress: None,
        lifeline: None,
        net_mode: net_mode(&spec.network),
        released: false,
        exec_base: idle.then(|| session::ExecBase {
            env: base_env(spec, &prep.proxy_env),
            workdir: prep.workdir.clone(),
            user: spec.user,
            next_id: 1,
        }),
        paused: false,
        id_slot: prep.ids.take_slot(),
    };

    // Setup has a deadline of its own: a child that never reports (a bug,
    // or a kernel that stalls) is killed rather than waited for forever.
    let setup_deadline = Instant::now() + SETUP_TIMEOUT;
    let setup = runner_setup(&mut sb, spec, &launch, &mut prep, setup_deadline);
    finish_setup(sb, setup, spec, launch, prep, setup_deadline)
}

/// What the engine applies to every sandbox, before the spec adds to it.
fn initial_layers(rootful: bool) -> Layers {
    Layers {
        mode: if rootful { "rootful" } else { "rootless" }.into(),
        namespaces: ["user", "mnt", "pid", "ipc", "uts", "net", "cgroup"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        no_new_privs: true,
        ..Layers::default()
    }
}

/// `none`, `allowlist`, `open` or `kernel`.
pub(crate) fn net_mode(network: &Network) -> &'static str {
    match network {
        Network::None => "none",
        Network::Allowlist { .. } => "allowlist",
        Network::Open { .. } => "open",
        Network::Kernel { .. } => "kernel",
    }
}

/// What a start works out before it makes anything a child needs: every
/// step of it that can fail on a bad spec or host.
struct Prepared {
    /// What moves into the child's plan ([`Launch::new`] takes it).
    child: ChildParts,
    /// The mounts' and image layers' descriptors, which the child re-opens;
    /// closed once the child's setup is over.
    guard: FdGuard,
    /// The egress proxy's policy (allowlist and open modes).
    net_policy: Option<nanoclaw_net::NetworkPolicy>,
    /// Transparent egress rules for the child to install (allowlist and
    /// open modes).
    redirect: Option<nanoclaw_net::kernel::RedirectRules>,
    /// The kernel allowlist (`--network kernel`).
    kernel_rules: Option<Vec<nanoclaw_net::kernel::CidrPortRule>>,
    /// The command's working directory.
    workdir: PathBuf,
    /// The proxy's environment variables for the command.
    proxy_env: Vec<(String, String)>,
    /// Credential rules: what the runner needs to make the sandbox's CA
    /// after `clone` and hand the proxy its interception.
    egress: Option<EgressPrep>,
    /// Rootful: the sandbox's host id slot and namespace owner.
    ids: idslot::HostIds,
}

/// The parts of [`ChildPlan`] that need no pipe.
#[derive(Default)]
struct ChildParts {
    keep_caps: Vec<caps::Cap>,
    seccomp: Option<seccomp::Filter>,
    seccomp_no_cgroup_memory: Option<seccomp::Filter>,
    fs: plan::FsPlan,
    landlock: Option<landlock::Prepared>,
    argv: Vec<CString>,
    exec_candidates: Vec<CString>,
    envp: Vec<CString>,
    hostname: CString,
    workdir: CString,
}

impl Prepared {
    /// Capabilities, network policy, kernel rules, mounts, the seccomp
    /// filters, image layers, the filesystem plan, Landlock, the working
    /// directory, the command line, the hostname and workdir as C strings,
    /// in that order; `layers` records what they apply. On failure every
    /// descriptor opened is closed.
    fn new(spec: &SandboxSpec, rootful: bool, layers: &mut Layers) -> Result<Prepared, Error> {
        let keep_caps = spec
            .hardening
            .cap_add
            .iter()
            .map(|n| caps::parse_cap(n))
            .collect::<Result<Vec<_>, _>>()?;
        layers.capabilities = keep_caps.iter().map(|c| c.name().to_string()).collect();
        let net_policy = network_policy(&spec.network)?;
        let kernel_rules = kernel_rules(&spec.network, rootful)?;
        let ids = idslot::HostIds::acquire(spec, rootful, layers)?;
        let mounts = resolve_mounts(spec, &ids, &keep_caps)?;
        let mut guard = FdGuard(
            mounts
                .iter()
                .flat_map(|m| std::iter::once(m.fd).chain(m.idmapped_fd))
                .collect(),
        );
        let (seccomp, seccomp_no_cgroup_memory) = seccomp_filters(spec, rootful, &mounts, layers)?;
        let image_layers = open_layers(spec, &ids, &mut guard)?;
        let upper = open_upper(spec, &ids, &mut guard)?;
        let host = plan::HostLayout::probe();
        let fs = plan::build(spec, &host, &mounts, &image_layers, upper.as_ref())?;
        let landlock = landlock_policy(spec, &fs, &mounts, layers)?;
        let workdir = default_workdir(spec, &mounts);
        let mut proxy_env = if net_policy.is_some() {
            nanoclaw_net::proxy_env(child::PROXY_PORT)
        } else {
            Vec::new()
        };
        let mut fs = fs;
        let egress = EgressPrep::new(spec, net_policy.is_some(), &mut guard, &mut fs)?;
        if egress.is_some() {
            proxy_env.extend(egress_ca_env());
        }
        let redirect = net_policy.as_ref().map(|_| {
            nanoclaw_net::kernel::RedirectRules::new(child::TRANSPARENT_PORT, child::DNS_PORT)
        });
        let (argv, exec_candidates, envp) = command_line(spec, &proxy_env)?;
        let hostname = cstr(&spec.hostname, "hostname")?;
        let workdir_c = cstr(workdir.as_os_str().as_bytes(), "workdir")?;
        Ok(Prepared {
            child: ChildParts {
                keep_caps,
                seccomp,
                seccomp_no_cgroup_memory,
                fs,
                landlock,
                argv,
                exec_candidates,
                envp,
                hostname,
                workdir: workdir_c,
            },
            guard,
            net_policy,
            redirect,
            kernel_rules,
            workdir,
            proxy_env,
            egress,
            ids,
        })
    }
}

/// The variables that make common TLS clients trust the sandbox's egress
/// CA: OpenSSL (and Python's `ssl`, Go), requests, curl, git, Node.
fn egress_ca_env() -> Vec<(String, String)> {
    let bundle = plan::EGRESS_CA_BUNDLE.to_string();
    vec![
        ("SSL_CERT_FILE".into(), bundle.clone()),
        ("REQUESTS_CA_BUNDLE".into(), bundle.clone()),
        ("CURL_CA_BUNDLE".into(), bundle.clone()),
        ("GIT_SSL_CAINFO".into(), bundle),
        ("NODE_EXTRA_CA_CERTS".into(), plan::EGRESS_CA.to_string()),
    ]
}

/// The host's CA bundle (the first that exists): what the sandbox's
/// bundle starts from and what intercepted hosts are verified against.
const HOST_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Credential rules, prepared before `clone`: the rules, the trust
/// material (public), and two empty memfds the sandbox's CA files are
/// written to after `clone` ([`EgressPrep::make_ca`]).
struct EgressPrep {
    rules: nanoclaw_net::HeaderRules,
    host_bundle: Vec<u8>,
    extra_ca: Option<Vec<u8>>,
    ca_fd: RawFd,
    bundle_fd: RawFd,
    /// Made by [`EgressPrep::make_ca`].
    intercept: Option<nanoclaw_net::Intercept>,
}

impl EgressPrep {
    /// `None` without rules. The memfds are owned by `guard`.
    fn new(
        spec: &SandboxSpec,
        proxied: bool,
        guard: &mut FdGuard,
        fs: &mut plan::FsPlan,
    ) -> Result<Option<EgressPrep>, Error> {
        let e = &spec.egress;
        if e.rules.is_empty() {
            return Ok(None);
        }
        if !proxied {
            return Err(Error::InvalidSpec(
                "network rules (credentials added at the boundary) need egress through nanoclaw's proxy: use --network allowlist (with the ruled hosts allowed) or open".into(),
            ));
        }
        let host_bundle = HOST_BUNDLES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .unwrap_or_default();
        let extra_ca = match &e.upstream_ca {
            Some(p) => Some(std::fs::read(p).map_err(|err| {
                Error::InvalidSpec(format!(
                    "network upstream CA {}: {err}; give a readable PEM file",
                    p.display()
                ))
            })?),
            None => None,
        };
        if host_bundle.is_empty() && extra_ca.is_none() {
            return Err(Error::InvalidSpec(format!(
                "network rules: no CA bundle on this host ({}) to verify intercepted hosts with; install ca-certificates or name one with network.upstream_ca",
                HOST_BUNDLES.join(", ")
            )));
        }
        let mut memfd = |name: &CStr| -> Result<RawFd, Error> {
            // SAFETY: `name` is a valid C string; memfd_create returns a new
            // descriptor or -1.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(Error::Sys {
                    call: "memfd_create (the sandbox's CA files)".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            guard.0.push(fd);
            Ok(fd)
        };
        let ca_fd = memfd(c"nanoclaw-egress-ca")?;
        let bundle_fd = memfd(c"nanoclaw-egress-bundle")?;
        plan::add_egress_ca(fs, ca_fd, bundle_fd)?;
        Ok(Some(EgressPrep {
            rules: e.rules.clone(),
            host_bundle,
            extra_ca,
            ca_fd,
            bundle_fd,
            intercept: None,
        }))
    }

    /// Makes the sandbox's CA (after `clone`: its key never exists in a
    /// process the sandbox descends from), writes its certificate into the
    /// memfds the child copies into the sandbox's `/etc/nanoclaw`, and
    /// prepares the proxy's interception.
    fn make_ca(&mut self, id: &str) -> Result<(), Error> {
        let label: String = id.chars().take(12).collect();
        let ca = nanoclaw_net::SandboxCa::new(&label, &self.rules.domains()).map_err(|e| {
            Error::Unsupported {
                what: "network rules".into(),
                why: e.to_string(),
                fix: "report this as a nanoclaw bug".into(),
            }
        })?;
        let pem = ca.cert_pem().as_bytes();
        let mut bundle = self.host_bundle.clone();
        if !bundle.is_empty() && !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(pem);
        for (fd, data) in [(self.ca_fd, pem), (self.bundle_fd, &bundle[..])] {
            sys::write_all(fd, data).map_err(|e| Error::Sys {
                call: "writing the sandbox's CA certificate".into(),
                source: e,
            })?;
        }
        let mut roots: Vec<&[u8]> = vec![&self.host_bundle];
        if let Some(x) = &self.extra_ca {
            roots.push(x);
        }
        let ic = nanoclaw_net::Intercept::new(self.rules.clone(), std::sync::Arc::new(ca), &roots)
            .map_err(|e| Error::InvalidSpec(format!("network rules: {e}")))?;
        self.intercept = Some(ic);
        Ok(())
    }
}

/// The seccomp filter for `spec` (described in `layers.seccomp`), and the
/// stricter one to install should the memory cgroup turn out missing.
fn seccomp_filters(
    spec: &SandboxSpec,
    rootful: bool,
    mounts: &[UserMount],
    layers: &mut Layers,
) -> Result<(Option<seccomp::Filter>, Option<seccomp::Filter>), Error> {
    let extras = |no_unaccounted_memory| seccomp::DefaultExtras {
        no_memfd: !spec.hardening.exec_allow.is_empty(),
        no_setid_files: mounts.iter().any(|m| m.no_setid_files),
        no_unaccounted_memory,
    };
    let compile = |extras| {
        seccomp::default_filter_with(extras).map_err(|e| {
            Error::Seccomp(seccomp::SeccompError::Profile {
                path: "built-in".into(),
                error: e,
            })
        })
    };
    let filter = match &spec.hardening.seccomp {
        Seccomp::Default => {
            let extras = extras(false);
            layers.seccomp = extras.describe();
            Some(compile(extras)?)
        }
        Seccomp::Profile(p) => {
            layers.seccomp = format!("profile:{}", p.display());
            let names: Vec<String> = layers.capabilities.clone();
            Some(seccomp::load_docker_profile(p, &names)?)
        }
        Seccomp::Unconfined => {
            layers.seccomp = "unconfined".into();
            None
        }
    };
    // Rootless, the memory cgroup may be missing (it is known only after
    // the clone): a second filter that also refuses memfd_create (pages no
    // rlimit counts) is ready for that case.
    let no_cgroup_memory = match &spec.hardening.seccomp {
        Seccomp::Default if !rootful => Some(compile(extras(true))?),
        _ => None,
    };
    Ok((filter, no_cgroup_memory))
}

/// The Landlock rules (described in `layers.landlock`): writes only where
/// the sandbox may write, execs only from `--exec-allow` when given.
fn landlock_policy(
    spec: &SandboxSpec,
    fs: &plan::FsPlan,
    mounts: &[UserMount],
    layers: &mut Layers,
) -> Result<Option<landlock::Prepared>, Error> {
    let mut writable: Vec<PathBuf> = vec!["/tmp".into(), "/dev/shm".into()];
    writable.extend(spec.home.clone());
    if !fs.root_readonly {
        // An image root is writable (its per-sandbox upper layer on tmpfs).
        writable.push("/".into());
    }
    writable.extend(
        mounts
            .iter()
            .filter(|m| m.access == Access::Rw)
            .map(|m| m.target.clone()),
    );
    match landlock::abi_version() {
        Some(_) => {
            let prepared = landlock::prepare(&landlock::LandlockPolicy::standard(
                writable,
                spec.hardening.exec_allow.clone(),
            ))?;
            layers.landlock = prepared.description().to_string();
            Ok(Some(prepared))
        }
        None => {
            if !spec.hardening.exec_allow.is_empty() {
                return Err(Error::Unsupported {
                    what: "--exec-allow".into(),
                    why: "this kernel has no Landlock support".into(),
                    fix: "boot a kernel with CONFIG_SECURITY_LANDLOCK=y and lsm=landlock, or drop --exec-allow".into(),
                });
            }
            layers.landlock = "unavailable: the kernel does not support Landlock".into();
            Ok(None)
        }
    }
}

/// The command's working directory: `--workdir`, else the home directory,
/// else `/workspace` when mounted, else `/tmp`.
fn default_workdir(spec: &SandboxSpec, mounts: &[UserMount]) -> PathBuf {
    spec.workdir
        .clone()
        .or(spec.home.clone())
        .unwrap_or_else(|| {
            if mounts.iter().any(|m| m.target == Path::new("/workspace")) {
                "/workspace".into()
            } else {
                "/tmp".into()
            }
        })
}

/// The child's side of a start, made just before the clone: the pipes
/// between runner and child, the proxy's socketpair, and the plan the
/// child runs from. After the clone the child uses only what is in here,
/// allocated beforehand: it allocates nothing itself.
struct Launch {
    pipes: Pipes,
    /// (the runner's end, the child's end) of the proxy's socketpair.
    net_pair: Option<(RawFd, RawFd)>,
    plan: ChildPlan,
    /// `--network kernel`: the clone itself makes the network namespace.
    kernel_net: bool,
}

impl Launch {
    /// Makes the pipes and the child's plan, taking `prep`'s child parts.
    /// Fails only when the pipes cannot be made (nothing is left open).
    fn new(
        spec: &SandboxSpec,
        prep: &mut Prepared,
        rootful: bool,
        idle: bool,
        linger: bool,
    ) -> Result<Launch, Error> {
        let pipes = Pipes::new(&spec.stdin)?;
        let net_pair = match &prep.net_policy {
            Some(_) => match sys::socketpair() {
                Ok(p) => Some(p),
                Err(e) => {
                    pipes.close_all();
                    return Err(Error::Sys {
                        call: "socketpair for the network proxy".into(),
                        source: e,
                    });
                }
            },
            None => None,
        };
        let stdin = match pipes.stdin {
            Some((r, _)) => StdinFd::Pipe(r),
            None => StdinFd::Null,
        };
        let mut keep_fds = child_ends(&pipes, net_pair);
        keep_fds.extend(prep.guard.0.iter().copied());
        keep_fds.sort_unstable();
        // `--network kernel` wires a veth into the sandbox's network namespace
        // right after the clone, so that one is made by the clone itself.
        let kernel_net = prep.kernel_rules.is_some();
        let parts = std::mem::take(&mut prep.child);
        let (argv_ptrs, envp_ptrs) = (ptrs(&parts.argv), ptrs(&parts.envp));
        let plan = ChildPlan {
            rootful,
            unshare: libc::CLONE_NEWNS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | if kernel_net { 0 } else { libc::CLONE_NEWNET },
            hostname: parts.hostname,
            ops: parts.fs.ops,
            root_dir: parts.fs.root,
            check_symlinks: parts.fs.check_symlinks,
            root_readonly: parts.fs.root_readonly,
            sync_r: pipes.sync.0,
            idle,
            linger,
            err_w: pipes.err.1,
            status_w: pipes.status.1,
            stdout_w: pipes.stdout.1,
            stderr_w: pipes.stderr.1,
            stdin,
            keep_fds,
            uid: spec.user.uid,
            gid: spec.user.gid,
            keep_caps: parts.keep_caps,
            landlock: parts.landlock,
            seccomp: parts.seccomp,
            seccomp_no_cgroup_memory: parts.seccomp_no_cgroup_memory,
            shm_bytes: spec.limits.tmpfs_size.clamp(4096, 64 << 20),
            workdir: parts.workdir,
            exec_candidates: parts.exec_candidates,
            _argv: parts.argv,
            _envp: parts.envp,
            host_strings: child::host_string_ranges(),
            argv_ptrs,
            envp_ptrs,
            net_sock: net_pair.map(|(_, child_end)| child_end),
            redirect: prep.redirect.take(),
        };
        Ok(Launch {
            pipes,
            net_pair,
            plan,
            kernel_net,
        })
    }

    /// Clones the sandbox's init, which runs [`child::setup_and_init`] on
    /// the plan and never returns; then closes the child's ends here.
    fn clone_init(&self, ids: &idslot::HostIds) -> Result<libc::pid_t, Error> {
        // The user and pid namespaces must exist at clone (the runner writes
        // the child's id maps; init must be pid 1). The child makes the others
        // itself (ChildPlan::unshare) while the runner writes those maps.
        let mut flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWPID) as libc::c_ulong;
        if self.kernel_net {
            flags |= libc::CLONE_NEWNET as libc::c_ulong;
        }
        // Every signal blocked across the clone: the child must not run one of
        // the caller's handlers (on its copy of the caller's memory) before it
        // sets its own mask; the caller's mask comes back right after.
        let saved_mask = sys::block_all_signals();
        // Rootful, as the slot's first id: the namespace is the sandbox's own.
        let cloned = ids.clone_fork(flags);
        if let Ok(0) = cloned {
            child::setup_and_init(&self.plan);
        }
        sys::restore_signals(&saved_mask);
        let pid = match cloned {
            Ok(pid) => pid,
            Err(e) => {
                self.close_all();
                return Err(userns_error(e));
            }
        };
        // The runner keeps only its own ends.
        for fd in child_ends(&self.pipes, self.net_pair) {
            sys::close(fd);
        }
        Ok(pid)
    }

    /// Closes both ends of every pipe and of the socketpair (no child).
    fn close_all(&self) {
        self.pipes.close_all();
        if let Some((a, b)) = self.net_pair {
            sys::close(a);
            sys::close(b);
        }
    }
}

/// The child's ends of the pipes and of the proxy's socketpair.
fn child_ends(pipes: &Pipes, net_pair: Option<(RawFd, RawFd)>) -> Vec<RawFd> {
    let mut fds = vec![
        pipes.sync.0,
        pipes.err.1,
        pipes.status.1,
        pipes.stdout.1,
        pipes.stderr.1,
    ];
    if let Some((r, _)) = pipes.stdin {
        fds.push(r);
    }
    if let Some((_, child_end)) = net_pair {
        fds.push(child_end);
    }
    fds
}

/// A NULL-terminated array of pointers into `v`'s strings.
fn ptrs(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The runner's part of the setup, while the child builds its root: the
/// id maps, the cgroup, the egress proxy or kernel egress, and the
/// go-ahead, which carries the rlimits standing in for missing cgroup
/// controllers and the handles the child joins its cgroup with.
fn runner_setup(
    sb: &mut Sandbox,
    spec: &SandboxSpec,
    launch: &Launch,
    prep: &mut Prepared,
    deadline: Instant,
) -> Result<(), Error> {
    let (rootful, sync_w) = (launch.plan.rootful, launch.pipes.sync.1);
    let (map_uid, map_gid) = id_maps(&prep.ids, spec.user.uid, spec.user.gid);
    sb.layers.uid_map = map_uid.trim().to_string();
    write_id_maps(sb.pid, rootful, &map_uid, &map_gid)?;
    // Before the go-ahead: the child copies the CA's certificate into its
    // root while it builds it.
    if let Some(e) = prep.egress.as_mut() {
        e.make_ca(&sb.id)?;
    }
    // The child makes its namespaces and builds its root while we make
    // and fill its cgroup; it waits for the second message (which
    // carries the rlimits standing in for missing cgroup controllers)
    // before it runs anything of the sandbox's.
    sys::write_all(sync_w, b"1").map_err(|e| Error::Sys {
        call: "signalling the sandbox (id maps written)".into(),
        source: e,
    })?;
    let memfd_refused = launch.plan.seccomp_no_cgroup_memory.is_some();
    let (rlimits, join_fds) = cgroup_setup(sb, &spec.limits, launch.plan.idle, memfd_refused)?;
    if let (Some(policy), Some((runner_end, _))) = (prep.net_policy.take(), launch.net_pair) {
        let intercept = prep.egress.as_mut().and_then(|e| e.intercept.take());
        sb.proxy = Some(serve_proxy(
            policy,
            &spec.network,
            intercept,
            runner_end,
            deadline,
        )?);
    }
    if let Some(allow) = prep.kernel_rules.take() {
        sb.kernel_egress = Some(kernel_egress(sb.pid, &sb.id, allow)?);
    }
    // The go-ahead carries the v1 `tasks` files for the child to move
    // itself into (see Cgroup::join_handles).
    let raw: Vec<RawFd> = join_fds.iter().map(|f| f.as_raw_fd()).collect();
    sys::send_with_fds(sync_w, &rlimits.encode(), &raw).map_err(|e| Error::Sys {
        call: "signalling the sandbox (cgroup ready)".into(),
        source: e,
    })
}

/// Plans and creates the sandbox's cgroup (owned by `sb` from then on);
/// returns the rlimits standing in for the controllers it lacks and the
/// handles the child joins it with.
fn cgroup_setup(
    sb: &mut Sandbox,
    limits: &crate::spec::Limits,
    idle: bool,
    memfd_refused: bool,
) -> Result<(child::Rlimits, Vec<std::os::fd::OwnedFd>), Error> {
    // Which cgroup controllers this host offers (an explicit limit it
    // cannot enforce is an error; `abort` then removes the child).
    // A run's cpu time comes from init's rusage (init reaps every
    // process of the sandbox), so a separate v1 cpuacct cgroup is not
    // worth its cost; a long-lived sandbox reports its usage while it
    // lives (inspect) and can be paused, so it gets both.
    let (cg_plan, degraded) = cgroup::Cgroup::plan_with(
        &sb.id,
        limits,
        cgroup::CreateOptions {
            cpu_accounting: idle,
            freezer: idle,
        },
    )?;
    sb.layers.cgroup = cg_plan.as_ref().map(|c| c.describe()).unwrap_or_default();
    sb.layers.degraded = degraded;
    let no_cgroup_for = |c| !cg_plan.as_ref().is_some_and(|p| p.uses(c));
    let rlimits = child::Rlimits {
        data: (limits.memory).filter(|_| no_cgroup_for(cgroup::Controller::Memory)),
        nproc: (limits.pids).filter(|_| no_cgroup_for(cgroup::Controller::Pids)),
    };
    if rlimits.data.is_some() {
        sb.layers.degraded.push(format!(
            "memory: per process only, with RLIMIT_DATA instead of a cgroup (the sandbox \
                 as a whole has no memory limit: shared memory and several processes add up{})",
            if memfd_refused {
                "; memfd_create and SysV shmget are refused"
            } else {
                ""
            }
        ));
    }
    if rlimits.nproc.is_some() {
        sb.layers
            .degraded
            .push("pids: enforced with RLIMIT_NPROC instead of a cgroup".into());
    }
    let mut join_fds = Vec::new();
    if let Some(plan) = cg_plan {
        let (cg, notes) = plan.create()?;
        sb.layers.degraded.extend(notes);
        // Owned by the sandbox before the child joins: a failure from
        // here on is cleaned up by `abort`.
        let cg = sb.cgroup.insert(cg);
        join_fds = cg.join_handles(sb.pid)?;
    }
    Ok((rlimits, join_fds))
}

/// Receives the proxy's listener, made by the child on the sandbox's own
/// 127.0.0.1, on the runner's end of the socketpair (closed here), and
/// serves it.
fn serve_proxy(
    policy: nanoclaw_net::NetworkPolicy,
    network: &Network,
    intercept: Option<nanoclaw_net::Intercept>,
    runner_end: RawFd,
    deadline: Instant,
) -> Result<nanoclaw_net::BlockingProxy, Error> {
    let listener = match sys::wait_readable(runner_end, deadline) {
        Ok(true) => sys::recv_fd(runner_end),
        Ok(false) => Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        Err(e) => Err(e),
    };
    let listener = listener.map_err(|e| {
        sys::close(runner_end);
        Error::Sys {
            call: "receiving the sandbox's proxy socket".into(),
            source: e,
        }
    })?;
    let transparent = recv_transparent(runner_end, deadline);
    sys::close(runner_end);
    let transparent = match transparent {
        Ok(fds) => fds,
        Err(e) => {
            sys::close(listener);
            return Err(Error::Sys {
                call: "receiving the sandbox's transparent-egress sockets".into(),
                source: e,
            });
        }
    };
    start_proxy(policy, network, intercept, listener, &transparent)
}

/// Receives the transparent listener and DNS sockets the child made in the
/// sandbox's network namespace (see `child::TRANSPARENT_SOCKETS`).
fn recv_transparent(
    runner_end: RawFd,
    deadline: Instant,
) -> std::io::Result<[RawFd; child::TRANSPARENT_SOCKETS.len()]> {
    if !sys::wait_readable(runner_end, deadline)? {
        return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
    }
    let mut byte = [0u8; 1];
    let mut fds = [-1; sys::MAX_FDS];
    let (n, got) = sys::recv_with_fds(runner_end, &mut byte, &mut fds)?;
    let want = child::TRANSPARENT_SOCKETS.len();
    if n != 1 || got != want {
        for fd in &fds[..got] {
            sys::close(*fd);
        }
        return Err(std::io::Error::from_raw_os_error(libc::EPROTO));
    }
    let mut out = [-1; child::TRANSPARENT_SOCKETS.len()];
    out.copy_from_slice(&fds[..want]);
    Ok(out)
}

/// Wires a veth with nftables rules `allow` into sandbox `id`'s network
/// namespace (rootful `--network kernel`).
fn kernel_egress(
    pid: libc::pid_t,
    id: &str,
    allow: Vec<nanoclaw_net::kernel::CidrPortRule>,
) -> Result<nanoclaw_net::kernel::KernelEgress, Error> {
    let cfg = nanoclaw_net::kernel::KernelEgressConfig {
        sandbox_pid: pid,
        id: id.chars().take(11).collect(),
        allow,
        allow_dns_to: None,
    };
    nanoclaw_net::kernel::KernelEgress::setup(&cfg).map_err(|e| Error::Unsupported {
        what: "--network kernel".into(),
        why: e.to_string(),
        fix: "use --network allowlist (the proxy), which works everywhere".into(),
    })
}

/// Waits for the child's setup report and turns a failure on either side
/// into the start's error (the sandbox is then removed).
fn finish_setup(
    mut sb: Sandbox,
    setup: Result<(), Error>,
    spec: &SandboxSpec,
    launch: Launch,
    prep: Prepared,
    deadline: Instant,
) -> Result<Sandbox, Error> {
    if setup.is_err() {
        // The child waits for a go-ahead that will not come: end it, so
        // that reading its report below sees the error pipe close.
        let _ = sys::kill(sb.pid, libc::SIGKILL);
    }
    // The write end of the sync pipe stays open for the sandbox's life: it
    // is init's lifeline (init exits when it closes, e.g. the runner dies).
    sb.lifeline = Some(launch.pipes.sync.1);
    drop(prep.guard);
    let report = supervise::read_setup_report(launch.pipes.err.0, deadline);
    sys::close(launch.pipes.err.0);
    let report = match report {
        Ok(r) => r,
        Err(supervise::SetupTimedOut) => {
            supervise::abort(sb);
            return Err(Error::SetupTimeout(SETUP_TIMEOUT));
        }
    };
    let failure = match (setup, report) {
        (Ok(()), Some(r)) if child::Step::from_u32(r.step) == Some(child::Step::Exec) => {
            sb.exec_error = Some(exec_failure(&r, &spec.command[0]));
            None
        }
        (setup, report) => report_failure(setup, report, &launch.plan, &prep.workdir),
    };
    if let Some(e) = failure {
        supervise::abort(sb);
        return Err(e);
    }
    Ok(sb)
}

/// The start's error, if any, from the runner's side of the setup and the
/// child's report (`None`: the payload was exec'd). A failed exec is not
/// an error here (the caller records it as the command's exit).
fn report_failure(
    setup: Result<(), Error>,
    report: Option<child::Report>,
    plan: &ChildPlan,
    workdir: &Path,
) -> Option<Error> {
    let errno = |r: &child::Report| std::io::Error::from_raw_os_error(r.errno);
    match (setup, report) {
        (Err(e), None) => Some(e),
        (Err(_), Some(r)) if child::Step::from_u32(r.step) != Some(child::Step::Exec) => {
            Some(Error::Setup {
                step: child::Step::from_u32(r.step)
                    .map_or("unknown", child::Step::name)
                    .into(),
                source: errno(&r),
            })
        }
        (Err(e), Some(_)) => Some(e),
        (Ok(()), Some(r)) => match child::Step::from_u32(r.step) {
            Some(child::Step::Exec) => None,
            Some(child::Step::Landlock) => Some(landlock_failure(&r, plan)),
            Some(child::Step::FsOp) => Some(fs_op_failure(&r, plan)),
            Some(child::Step::Workdir) => Some(Error::InvalidSpec(format!(
                "--workdir {}: {} inside the sandbox; pick a directory that exists there \
                 (for example /tmp, or /workspace with --workspace)",
                workdir.display(),
                errno(&r)
            ))),
            Some(child::Step::ForkPayload) if r.errno == libc::EAGAIN => {
                Some(Error::InvalidSpec(format!(
                    "the command could not be started: {}; the task limit is reached \
                     (--pids{}): raise it",
                    errno(&r),
                    if plan.rootful {
                        ""
                    } else {
                        ", or this user's RLIMIT_NPROC"
                    }
                )))
            }
            Some(step) => Some(Error::Setup {
                step: step.name().into(),
                source: errno(&r),
            }),
            None => Some(Error::Setup {
                step: "unknown".into(),
                source: errno(&r),
            }),
        },
        (Ok(()), None) => None,
    }
}

/// The child could not install a Landlock rule: which one, and why.
fn landlock_failure(r: &child::Report, plan: &ChildPlan) -> Error {
    let f = landlock::ApplyFailure::from_bytes({
        let mut b = [0u8; 9];
        b[0] = (r.index >> 24) as u8;
        let rule = r.index & 0x00ff_ffff;
        let rule = if rule == 0x00ff_ffff { u32::MAX } else { rule };
        b[1..5].copy_from_slice(&rule.to_le_bytes());
        b[5..9].copy_from_slice(&r.errno.to_le_bytes());
        b
    });
    match (f, &plan.landlock) {
        (Some(f), Some(p)) => Error::Landlock(p.explain(f)),
        _ => Error::Setup {
            step: "installing Landlock rules".into(),
            source: std::io::Error::from_raw_os_error(r.errno),
        },
    }
}

/// A filesystem step of the child failed: which one, and why.
fn fs_op_failure(r: &child::Report, plan: &ChildPlan) -> Error {
    Error::Setup {
        step: plan
            .ops
            .get(r.index as usize)
            .map(|op| {
                let d = op.describe(&plan.root_dir.to_string_lossy());
                if r.errno == libc::ELOOP || r.errno == libc::ENOTDIR {
                    format!("{d} (a component of that path is a symlink or not a directory; mount points are never reached through symlinks)")
                } else {
                    d
                }
            })
            .unwrap_or_else(|| "building the filesystem".into()),
        source: std::io::Error::from_raw_os_error(r.errno),
    }
}

/// The exit code and message for a command that failed before running:
/// 127 not found, 126 not executable (execve's errno), 125 when a
/// hardening step failed.
pub(crate) fn exec_failure(r: &child::Report, name: &str) -> (i32, String) {
    let why = std::io::Error::from_raw_os_error(r.errno);
    match child::Step::from_u32(r.step) {
        Some(child::Step::Exec) if r.errno == libc::ENOENT || r.errno == libc::ENOTDIR => (
            127,
            format!("nanoclaw: {name}: command not found in the sandbox\n"),
        ),
        Some(child::Step::Exec) => (126, format!("nanoclaw: {name}: cannot execute: {why}\n")),
        step => (
            125,
            format!(
                "nanoclaw: {name}: could not be started ({}: {why})\n",
                step.map_or("unknown step", child::Step::name)
            ),
        ),
    }
}

/// Opens the image layer directories of `spec.root` (if it is an image).
fn open_layers(
    spec: &SandboxSpec,
    ids: &idslot::HostIds,
    guard: &mut FdGuard,
) -> Result<Vec<plan::LayerFd>, Error> {
    let crate::spec::Root::Layers(paths) = &spec.root else {
        return Ok(Vec::new());
    };
    if paths.is_empty() {
        return Err(Error::InvalidSpec(
            "an image root needs at least one layer".into(),
        ));
    }
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let c = cstr(p.as_os_str().as_bytes(), "a layer path")?;
        let fd = sys::open(&c, libc::O_PATH | libc::O_DIRECTORY).map_err(|e| {
            Error::InvalidSpec(format!(
                "image layer {} cannot be opened: {e}; the image store may be damaged: `nanoclaw image rm` and pull it again",
                p.display()
            ))
        })?;
        guard.0.push(fd);
        let md = std::fs::metadata(format!("/proc/self/fd/{fd}")).map_err(|e| Error::Sys {
            call: format!("stat of image layer {}", p.display()),
            source: e,
        })?;
        let ro = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
        let (fd, attached) = shift_storage(ids, guard, fd, ro, "an image layer")?;
        out.push(plan::LayerFd {
            fd,
            path: p.clone(),
            dev_ino: (md.dev(), md.ino()),
            attached,
        });
    }
    Ok(out)
}

/// Prepares `spec.root_upper` (an image root's persistent upper layer):
/// `DIR/upper` and `DIR/work`, owned by the sandbox's root.
fn open_upper(
    spec: &SandboxSpec,
    ids: &idslot::HostIds,
    guard: &mut FdGuard,
) -> Result<Option<plan::LayerFd>, Error> {
    let Some(dir) = &spec.root_upper else {
        return Ok(None);
    };
    if !matches!(spec.root, crate::spec::Root::Layers(_)) {
        return Err(Error::InvalidSpec(
            "a persistent upper layer needs an image root".into(),
        ));
    }
    for d in [dir.clone(), dir.join("upper"), dir.join("work")] {
        std::fs::create_dir_all(&d).map_err(|e| Error::Sys {
            call: format!("creating {}", d.display()),
            source: e,
        })?;
        if ids.rootful() {
            // Root of the storage range: the sandbox's root, once shifted.
            std::os::unix::fs::chown(&d, Some(ROOTFUL_ID_BASE), Some(ROOTFUL_ID_BASE)).map_err(
                |e| Error::Sys {
                    call: format!("chown of {}", d.display()),
                    source: e,
                },
            )?;
        }
    }
    let c = cstr(dir.as_os_str().as_bytes(), "the upper layer path")?;
    let fd = sys::open(&c, libc::O_PATH | libc::O_DIRECTORY).map_err(|e| Error::Sys {
        call: format!("opening {}", dir.display()),
        source: e,
    })?;
    guard.0.push(fd);
    let md = std::fs::metadata(dir).map_err(|e| Error::Sys {
        call: format!("stat of {}", dir.display()),
        source: e,
    })?;
    let attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    let (fd, attached) = shift_storage(ids, guard, fd, attrs, "an image's persistent upper layer")?;
    Ok(Some(plan::LayerFd {
        fd,
        path: dir.clone(),
        dev_ino: (md.dev(), md.ino()),
        attached,
    }))
}

/// Rootful, swaps the `O_PATH` descriptor `fd` (held by `guard`) of an
/// image layer or upper layer for a detached copy of its mount on which
/// storage-range owners are the sandbox's own ids (with mount attributes
/// `attrs`), for the child to attach. Returns the descriptor to use and
/// whether it is such a copy.
fn shift_storage(
    ids: &idslot::HostIds,
    guard: &mut FdGuard,
    fd: RawFd,
    attrs: u64,
    what: &str,
) -> Result<(RawFd, bool), Error> {
    if !ids.shifts_storage() {
        return Ok((fd, false));
    }
    let t = ids.shifted_tree(fd, attrs, &format!("{what} in a rootful sandbox"))?;
    guard.0.retain(|&x| x != fd);
    sys::close(fd);
    guard.0.push(t);
    Ok((t, true))
}

/// Closes descriptors when dropped.
struct FdGuard(Vec<RawFd>);

impl Drop for FdGuard {
    fn drop(&mut self) {
        for fd in &self.0 {
            sys::close(*fd);
        }
    }
}

struct Pipes {
    sync: (RawFd, RawFd),
    err: (RawFd, RawFd),
    status: (RawFd, RawFd),
    stdout: (RawFd, RawFd),
    stderr: (RawFd, RawFd),
    stdin: Option<(RawFd, RawFd)>,
}

impl Pipes {
    fn new(stdin: &Stdin) -> Result<Pipes, Error> {
        // The sync channel is a socket: the cgroup go-ahead passes
        // descriptors. It is also init's lifeline (end of file when the
        // runner is gone), as a pipe was.
        let sync = sys::socketpair().map_err(|e| Error::Sys {
            call: "socketpair".into(),
            source: e,
        })?;
        let mut made: Vec<RawFd> = vec![sync.0, sync.1];
        let mut mk = || -> Result<(RawFd, RawFd), Error> {
            match sys::pipe() {
                Ok((r, w)) => {
                    made.extend([r, w]);
                    Ok((r, w))
                }
                Err(e) => {
                    for fd in &made {
                        sys::close(*fd);
                    }
                    Err(Error::Sys {
                        call: "pipe2".into(),
                        source: e,
                    })
                }
            }
        };
        Ok(Pipes {
            sync,
            err: mk()?,
            status: mk()?,
            stdout: mk()?,
            stderr: mk()?,
            stdin: match stdin {
                // The caller's stdin is forwarded through a pipe too (as
                // `docker run -i` without `-t`): a terminal fd handed to
                // the sandbox would let it write to (and reconfigure) the
                // user's terminal past the capture and the output limit.
                Stdin::Bytes(_) | Stdin::Inherit => Some(mk()?),
                _ => None,
            },
        })
    }

    fn close_all(&self) {
        for (r, w) in [self.sync, self.err, self.status, self.stdout, self.stderr]
            .into_iter()
            .chain(self.stdin)
        {
            sys::close(r);
            sys::close(w);
        }
    }
}

/// argv, the exec candidates for argv[0] and the environment, as C strings.
type CommandLine = (Vec<CString>, Vec<CString>, Vec<CString>);

/// argv, the exec candidates for argv[0] (PATH search done by the payload,
/// execvp style) and the environment.
fn command_line(spec: &SandboxSpec, extra_env: &[(String, String)]) -> Result<CommandLine, Error> {
    let argv = spec
        .command
        .iter()
        .map(|a| cstr(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let env = base_env(spec, extra_env);
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let cmd = &spec.command[0];
    let candidates = if cmd.contains('/') {
        vec![cstr(cmd, "the command")?]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstr(format!("{}/{cmd}", d.trim_end_matches('/')), "the command"))
            .collect::<Result<Vec<_>, _>>()?
    };
    let envp = env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}"), "an environment variable"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((argv, candidates, envp))
}

/// The command's environment: nanoclaw's defaults, then `extra_env` (the
/// proxy's), then the spec's own; a later key replaces an earlier one.
fn base_env(spec: &SandboxSpec, extra_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        (
            "HOME".into(),
            spec.home
                .as_ref()
                .map_or_else(|| "/tmp".into(), |h| h.to_string_lossy().into_owned()),
        ),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOSTNAME".into(), spec.hostname.clone()),
    ];
    env.push(("USER".into(), plan::user_name(spec.user.uid).into()));
    session::merge_env(&mut env, extra_env.iter().chain(&spec.env));
    env
}

/// The uid_map and gid_map contents for the sandbox.
fn id_maps(ids: &idslot::HostIds, uid: u32, gid: u32) -> (String, String) {
    if ids.rootful() {
        let line = ids.map_line();
        (line.clone(), line)
    } else {
        (
            format!("{uid} {} 1\n", geteuid()),
            format!("{gid} {} 1\n", getegid()),
        )
    }
}

fn write_id_maps(
    pid: libc::pid_t,
    rootful: bool,
    uid_map: &str,
    gid_map: &str,
) -> Result<(), Error> {
    let w = |file: &str, data: &str| -> Result<(), Error> {
        std::fs::write(format!("/proc/{pid}/{file}"), data).map_err(|e| Error::Sys {
            call: format!("writing /proc/{pid}/{file} ({})", data.trim()),
            source: e,
        })
    };
    if !rootful {
        w("setgroups", "deny")?;
    }
    w("uid_map", uid_map)?;
    w("gid_map", gid_map)
}

/// Explains a failed clone(CLONE_NEWUSER|...), naming the knob to change.
fn userns_error(e: std::io::Error) -> Error {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) {
        if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
            return Error::Unsupported {
                what: "unprivileged user namespaces".into(),
                why: "AppArmor restricts them on this host (kernel.apparmor_restrict_unprivileged_userns=1)".into(),
                fix: "run `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or install an AppArmor profile for nanoclaw with `userns,` (see /etc/apparmor.d/bwrap-userns-restrict), or run as root".into(),
            };
        }
        if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
            return Error::Unsupported {
                what: "unprivileged user namespaces".into(),
                why: "they are disabled (kernel.unprivileged_userns_clone=0)".into(),
                fix: "run `sudo sysctl kernel.unprivileged_userns_clone=1`, or run as root".into(),
            };
        }
    }
    if e.raw_os_error() == Some(libc::ENOSPC)
        || read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0")
    {
        return Error::Unsupported {
            what: "user namespaces".into(),
            why: "the per-user limit is reached or zero (user.max_user_namespaces)".into(),
            fix: "run `sudo sysctl user.max_user_namespaces=15000`".into(),
        };
    }
    Error::Sys {
        call:
            "clone(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS|CLONE_NEWNET)"
                .into(),
        source: e,
    }
}

/// The proxy policy for `network`, or `None` for a loopback-only sandbox.
pub(crate) fn network_policy(
    network: &Network,
) -> Result<Option<nanoclaw_net::NetworkPolicy>, Error> {
    match network {
        Network::None => Ok(None),
        Network::Allowlist {
            hosts,
            cidrs,
            add_hosts,
            ..
        } => {
            crate::spec::parse_add_hosts(add_hosts).map_err(Error::InvalidSpec)?;
            if hosts.is_empty() && cidrs.is_empty() {
                return Err(Error::InvalidSpec(
                    "--network allowlist needs at least one --allow-host HOST[:PORT] or --allow-cidr CIDR[:PORT]".into(),
                ));
            }
            nanoclaw_net::NetworkPolicy::allowlist(hosts, cidrs)
                .map(Some)
                .map_err(|e| Error::InvalidSpec(e.to_string()))
        }
        Network::Kernel { .. } => Ok(None),
        Network::Open { .. } => Ok(Some(nanoclaw_net::NetworkPolicy {
            mode: nanoclaw_net::NetworkMode::Open,
            ..nanoclaw_net::NetworkPolicy::default()
        })),
    }
}

/// Serves the sandbox's proxy socket, and the transparent listener and DNS
/// sockets, on a runner thread (it owns the descriptors from here on).
pub(crate) fn start_proxy(
    policy: nanoclaw_net::NetworkPolicy,
    network: &Network,
    intercept: Option<nanoclaw_net::Intercept>,
    listener: RawFd,
    transparent: &[RawFd],
) -> Result<nanoclaw_net::BlockingProxy, Error> {
    let l = match network {
        Network::Allowlist { limits, .. } | Network::Open { limits } => *limits,
        Network::None | Network::Kernel { .. } => crate::spec::NetLimits::default(),
    };
    let limits = nanoclaw_net::Limits {
        max_connections: l.max_connections as usize,
        max_bytes: l.max_bytes,
        ..nanoclaw_net::Limits::default()
    };
    let add_hosts = match network {
        Network::Allowlist { add_hosts, .. } => add_hosts.as_slice(),
        _ => &[],
    };
    let entries = crate::spec::parse_add_hosts(add_hosts).map_err(Error::InvalidSpec)?;
    let mut b = nanoclaw_net::Proxy::builder(policy)
        .limits(limits)
        .resolver(std::sync::Arc::new(nanoclaw_net::HostsResolver::new(
            &entries,
        )))
        .listen(nanoclaw_net::Listen::Fd(listener));
    if let Some(ic) = intercept {
        b = b.intercept(ic);
    }
    for (fd, &(_, stream, port)) in transparent.iter().zip(child::TRANSPARENT_SOCKETS.iter()) {
        b = b.listen(match (stream, port) {
            (true, child::TRANSPARENT_PORT) => nanoclaw_net::Listen::Transparent(*fd),
            (true, _) => nanoclaw_net::Listen::DnsTcp(*fd),
            (false, _) => nanoclaw_net::Listen::DnsUdp(*fd),
        });
    }
    b.start_blocking().map_err(|e| Error::Unsupported {
        what: "the network proxy".into(),
        why: e.to_string(),
        fix: "use --network none, or report this as a nanoclaw bug".into(),
    })
}

/// The kernel allowlist for `--network kernel`, which needs root.
fn kernel_rules(
    network: &Network,
    rootful: bool,
) -> Result<Option<Vec<nanoclaw_net::kernel::CidrPortRule>>, Error> {
    let Network::Kernel { cidrs } = network else {
        return Ok(None);
    };
    if !rootful {
        return Err(Error::Unsupported {
            what: "--network kernel".into(),
            why: "it creates a veth and nftables rules on the host, which needs root".into(),
            fix:
                "run nanoclaw as root, or use --network allowlist (the proxy), which works rootless"
                    .into(),
        });
    }
    cidrs
        .iter()
        .map(|c| {
            c.parse::<nanoclaw_net::CidrRule>()
                .map(nanoclaw_net::kernel::CidrPortRule::from)
                .map_err(|e| Error::InvalidSpec(format!("--allow-cidr {c}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
