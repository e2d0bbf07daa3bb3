//! Rootful kernel-enforced egress: a veth link and an nftables table per
//! sandbox, configured through netlink (no `ip`/`nft` processes).
//!
//! For programs that ignore `HTTP_PROXY`/`ALL_PROXY`, the engine (running as
//! root) calls [`KernelEgress::setup`] once the sandbox's network namespace
//! exists, and [`KernelEgress::teardown`] (or drops the value) when it ends.
//!
//! # What setup does
//!
//! 1. Allocates a /30 from [`POOL`] (`100.96.0.0/12`, inside the CGNAT
//!    range 100.64.0.0/10; 262 144 links). Slot `n` is the network
//!    `100.96.0.0 + 4n`; the host side gets `.1`, the sandbox `.2`. A slot
//!    is owned through an `flock` on `/run/nanoclaw/net/slots/<n>` held for
//!    the life of the [`KernelEgress`], so concurrent runners never collide
//!    and a crashed runner's slot becomes free. A slot whose network
//!    overlaps any IPv4 address or route already on the host (any routing
//!    table) is skipped; if a route covers the whole pool, setup fails and
//!    names it.
//! 2. Creates table `inet nanoclaw_<id>` in one nf_tables transaction,
//!    **before** the link exists (so the link is never unfiltered), with
//!    base chains `forward` (filter, priority 0), `input` (filter, 0) and
//!    `postrouting` (nat, 100), all policy accept but matching only traffic
//!    of the sandbox's link `ncl-<id>`. [`KernelEgress::ruleset_text`]
//!    prints the rules in `nft` syntax:
//!    * forward: packets *to* the sandbox only if `ct state
//!      established,related` (nothing outside can open a connection in;
//!      the rest is dropped silently); packets *from* the sandbox dropped
//!      silently unless their source is the sandbox's address (no
//!      spoofing, and no answer to a forged address), then accepted if they
//!      match an allow rule that lies inside a special-purpose block
//!      (explicit) or the DNS rule, then refused if their destination is
//!      special-purpose (loopback, 169.254.0.0/16 link-local and cloud
//!      metadata, RFC 1918, CGNAT — which includes every other sandbox —,
//!      multicast, reserved, documentation; the same blocks as
//!      [`crate::addr`]), then accepted if they match any other allow rule,
//!      else refused. Anything not IPv4 (IPv6, ...) from the sandbox is
//!      dropped silently.
//!    * input (the host itself, any of its addresses): from the sandbox only
//!      replies to connections the host opened (`ct direction reply`), the
//!      DNS rule, and allow
//!      rules that are explicit (inside a special-purpose block) or name a
//!      single address (`/32`); everything else refused (forged sources
//!      and non-IPv4 dropped, as in forward). So `0.0.0.0/0:443` opens the
//!      public internet on 443 but not the host's own port 443.
//!    * "Refused" is nftables `reject`, so that the program fails at once
//!      instead of waiting for its timeout: TCP gets a reset (`connect`
//!      fails with `ECONNREFUSED`), anything else ICMP administratively
//!      prohibited (`EHOSTUNREACH` on a connected socket). The answer is
//!      made on the host and sent to the sandbox only: the refused packet
//!      is never forwarded.
//!    * postrouting: the sandbox's IPv4 traffic is masqueraded behind the
//!      host's outgoing address.
//! 3. Creates the veth pair: `ncl-<id>` on the host, its peer created
//!    directly inside the sandbox's network namespace (by namespace fd) as
//!    `eth0`. IPv6 is disabled on the host side
//!    (`net.ipv6.conf.ncl-<id>.disable_ipv6=1`) and address generation is
//!    off on `eth0` (no link-local address); the host side gets
//!    `net.ipv4.conf.ncl-<id>.forwarding=1`. Both sides are addressed and
//!    brought up, and the sandbox gets a default route via the host side.
//! 4. Forwarding on the way back: Linux forwards an IPv4 packet only if the
//!    interface it *arrived on* has `forwarding=1`, so replies need it on
//!    the uplink(s) too. For every allow rule, setup asks the kernel which
//!    interface would carry the sandbox's packet (a route lookup as if
//!    forwarded from `ncl-<id>`, policy routing included; for a `/0` rule,
//!    the default routes' interfaces) and, where
//!    `net.ipv4.conf.<uplink>.forwarding` is 0, sets it to 1. The original
//!    value is kept in `/run/nanoclaw/net/fwd/<uplink>/orig` with one
//!    `flock`ed holder file per sandbox; the last sandbox to let go (or the
//!    next setup, for holders whose runner died) writes the original value
//!    back. Global `net.ipv4.ip_forward` is never written. If routes change
//!    after setup, the new uplink is not enabled.
//!
//! Teardown deletes the link (both ends go), deletes the table, releases
//! the uplink holders (restoring their sysctls when last) and the slot. A
//! setup that fails at any step undoes what it did, in reverse order.
//!
//! If the runner dies without teardown, the table stays (fail-closed: the
//! link stays filtered); the link goes when the sandbox's namespace goes.
//! The next setup that reuses that slot, or [`KernelEgress::cleanup_stale`],
//! removes the leftovers.
//!
//! # What this mode guarantees
//!
//! * Every IPv4 packet the sandbox sends through its link is checked by the
//!   kernel against address, protocol and port, whatever the program does —
//!   the rules sit on the host side, so they hold even if the sandbox has
//!   `CAP_NET_ADMIN`/`CAP_NET_RAW` in its own namespaces (changes its
//!   address, sends raw packets): it reaches only
//!   the allowed `CIDR[:port]`s. Nothing else leaves: no other address,
//!   port or protocol (UDP only to rules marked UDP or the DNS address),
//!   no IPv6, no forged source address.
//! * The host is unreachable (all its addresses, on every interface) except
//!   through rules that name it explicitly; 169.254.0.0/16 (cloud metadata)
//!   and the other special-purpose ranges, other sandboxes included, are
//!   unreachable unless a rule lies inside them.
//! * Nothing from outside can open a connection into the sandbox (the host
//!   itself can, e.g. for the engine to reach a service in it).
//! * Changing the policy (teardown, setup with new rules) applies to
//!   connections already open: forwarded packets are checked one by one,
//!   not waved through as "established".
//! * Setup is atomic with respect to filtering: the table exists before the
//!   link does, and is removed only after it.
//!
//! # What it does not do
//!
//! * **No names.** The kernel sees addresses, not domain names. The caller
//!   resolves names to CIDRs (and the answer may change; the rules do not
//!   follow). An address shared by many sites — a CDN, a cloud load
//!   balancer — allows all of them: allowing `api.example.com`'s address
//!   may allow every site on that CDN edge. **Domain fronting** (SNI or
//!   `Host` naming another site on the same front) is invisible here; the
//!   proxy mode checks SNI, this mode cannot.
//! * **DNS**: the sandbox resolves names only through `allow_dns_to` (UDP
//!   and TCP port 53 to that address) — the engine must point the
//!   sandbox's `/etc/resolv.conf` at it. A resolver there answers for any
//!   name, so DNS can carry data out (tunnelling) to whoever runs that
//!   resolver's upstream; leave it `None` and give the sandbox an
//!   `/etc/hosts` if that matters.
//! * An allowed destination can relay anywhere (an open proxy at an allowed
//!   address defeats the allowlist).
//! * IPv4 only: IPv6 rules are refused (use the proxy mode for IPv6).
//! * Other firewalls on the host still apply: a `drop` elsewhere (e.g.
//!   Docker's `FORWARD` policy) can block allowed traffic (and, if its
//!   chain runs before this table's, turn a refusal back into a silent
//!   drop); it cannot open what this table drops or rejects (a drop or
//!   reject in any base chain is final).
//! * Byte and connection caps are not enforced here (the proxy mode has
//!   them).
//! * Conntrack entries are not flushed: a connection the *host* opened into
//!   the sandbox keeps working across a policy change.
//! * Setup takes a few ms; teardown 15–30 ms, nearly all of it the kernel
//!   unregistering the veth (see [`KernelEgress::teardown_in_background`]).
//! * Needs root: `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` in the host's
//!   namespaces, nf_tables with `ct`, `masq` and `reject` support.

mod netlink;
mod nft;
mod redirect;
mod rtnl;
pub use redirect::RedirectRules;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::policy::{Cidr, CidrRule};
use netlink::NlError;
use nft::{AllowV4, Nft};
use rtnl::Rtnl;

/// The pool link addresses come from: `100.96.0.0/12`.
pub const POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 96, 0, 0), 12);
const SLOT_PREFIX: u8 = 30;
const SLOTS: u32 = 1 << (SLOT_PREFIX - POOL.1);

/// Where slot and forwarding state lives (tmpfs; gone at reboot, as are the
/// links and tables it describes).
pub const STATE_DIR: &str = "/run/nanoclaw/net";

/// Which transport a [`CidrPortRule`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    /// TCP only (what `--allow-cidr` means).
    #[default]
    Tcp,
    /// UDP only.
    Udp,
    /// With a port: TCP and UDP to that port. Without: every IP protocol
    /// (ICMP included).
    Any,
}

/// One allow rule: a destination network, optionally one port, a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CidrPortRule {
    /// The destination network (IPv4; IPv6 is refused by setup).
    pub cidr: Cidr,
    /// The destination port; `None` means every port.
    pub port: Option<u16>,
    /// The transport.
    pub proto: Proto,
}

impl CidrPortRule {
    /// TCP to `cidr` (and `port`, if given).
    pub fn tcp(cidr: Cidr, port: Option<u16>) -> CidrPortRule {
        CidrPortRule {
            cidr,
            port,
            proto: Proto::Tcp,
        }
    }

    /// UDP to `cidr` (and `port`, if given).
    pub fn udp(cidr: Cidr, port: Option<u16>) -> CidrPortRule {
        CidrPortRule {
            cidr,
            port,
            proto: Proto::Udp,
        }
    }
}

impl From<CidrRule> for CidrPortRule {
    /// An `--allow-cidr` rule: TCP, as through the proxy.
    fn from(r: CidrRule) -> CidrPortRule {
        CidrPortRule::tcp(r.cidr, r.port)
    }
}

/// What [`KernelEgress::setup`] needs.
#[derive(Debug, Clone)]
pub struct KernelEgressConfig {
    /// A process inside the sandbox's network namespace.
    pub sandbox_pid: i32,
    /// Short sandbox id, `[A-Za-z0-9_-]`, at most 11 characters: the link
    /// is `ncl-<id>`, the table `inet nanoclaw_<id>`.
    pub id: String,
    /// The allowlist. Empty means no egress at all.
    pub allow: Vec<CidrPortRule>,
    /// A DNS resolver the sandbox may use (UDP and TCP port 53).
    pub allow_dns_to: Option<IpAddr>,
}

/// Why kernel egress could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// Not running as root.
    #[error(
        "kernel-enforced egress needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN in the host \
         namespaces): run nanoclaw as root, or use the proxy allowlist, which works rootless"
    )]
    NotRoot,
    /// The sandbox id cannot name a link and a table.
    #[error("invalid sandbox id `{id}` for kernel egress: {reason}")]
    InvalidId {
        /// The id given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An IPv6 rule or DNS address.
    #[error(
        "`{what}` is IPv6, but kernel egress is IPv4-only (the sandbox gets no IPv6 address \
         or route): drop the rule or use the proxy allowlist for IPv6 destinations"
    )]
    Ipv6 {
        /// The rule or address.
        what: String,
    },
    /// The sandbox's namespace could not be opened.
    #[error(
        "cannot open the network namespace of pid {pid} (/proc/{pid}/ns/net): {source}; \
         is the sandbox still running?"
    )]
    Netns {
        /// The pid given.
        pid: i32,
        /// The error.
        source: io::Error,
    },
    /// The pid is in the host's own network namespace.
    #[error(
        "pid {pid} is in the host's own network namespace: kernel egress must target a \
         sandbox created with its own network namespace"
    )]
    HostNetns {
        /// The pid given.
        pid: i32,
    },
    /// No link network could be allocated.
    #[error("no free /30 in the link pool 100.96.0.0/12: {reason}")]
    Pool {
        /// Why.
        reason: String,
    },
    /// A netlink request failed.
    #[error("{op}: {message}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The errno.
        errno: i32,
        /// The kernel's message and what to do.
        message: String,
    },
    /// A state file or sysctl could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// Teardown failed partly; what is listed was left behind.
    #[error("kernel egress teardown was incomplete: {}", .0.join("; "))]
    Teardown(Vec<String>),
}

fn nl_err(op: impl Into<String>, e: NlError) -> KernelError {
    let op = op.into();
    let mut message = io::Error::from_raw_os_error(e.errno).to_string();
    if let Some(m) = &e.msg {
        message.push_str(&format!(" ({m})"));
    }
    let hint = match e.errno {
        libc::EPERM | libc::EACCES => {
            "; this needs CAP_NET_ADMIN in the host's network namespace: run as root"
        }
        libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT
            if op.contains("nftables") =>
        {
            "; the kernel lacks nf_tables support (modules nf_tables, nft_ct, nft_masq, nft_nat, nft_reject_inet)"
        }
        _ => "",
    };
    message.push_str(hint);
    KernelError::Netlink {
        op,
        errno: e.errno,
        message,
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Io { what, source }
}

fn validate_id(id: &str) -> Result<(), KernelError> {
    let bad = |reason| {
        Err(KernelError::InvalidId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > 11 {
        return bad("it is longer than 11 characters (the link name `ncl-<id>` must fit in 15)");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("only letters, digits, `-` and `_` are allowed");
    }
    Ok(())
}

fn to_v4(r: &CidrPortRule) -> Result<AllowV4, KernelError> {
    match r.cidr.addr() {
        IpAddr::V4(net) => Ok(AllowV4 {
            net,
            prefix: r.cidr.prefix(),
            proto: r.proto,
            port: r.port,
        }),
        IpAddr::V6(_) => Err(KernelError::Ipv6 {
            what: r.cidr.to_string(),
        }),
    }
}

fn dns_rules(dns: Option<IpAddr>) -> Result<Vec<AllowV4>, KernelError> {
    let Some(ip) = dns else {
        return Ok(Vec::new());
    };
    let IpAddr::V4(net) = crate::addr::canonical(ip) else {
        return Err(KernelError::Ipv6 {
            what: ip.to_string(),
        });
    };
    Ok([Proto::Udp, Proto::Tcp]
        .into_iter()
        .map(|proto| AllowV4 {
            net,
            prefix: 32,
            proto,
            port: Some(53),
        })
        .collect())
}

fn slot_net(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POOL.0) + (n << (32 - SLOT_PREFIX)))
}

fn offset(a: Ipv4Addr, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(a) + k)
}

fn overlaps(a: Ipv4Addr, ap: u8, b: Ipv4Addr, bp: u8) -> bool {
    let p = ap.min(bp);
    nft::inside(a, p, Ipv4Addr::from(u32::from(b) & mask(p)), p)
}

fn mask(p: u8) -> u32 {
    if p == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(p))
    }
}

fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

fn read_sysctl(path: &str) -> io::Result<String> {
    Ok(fs::read_to_string(path)?.trim().to_string())
}

fn fwd_sysctl(ifname: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding")
}

/// `flock(fd, op)`; `Ok(false)` when non-blocking and held elsewhere.
fn flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: `f` is an open file; flock has no memory effects.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn open_state(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn state_dir(sub: &str) -> Result<PathBuf, KernelError> {
    let p = Path::new(STATE_DIR).join(sub);
    fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
    Ok(p)
}

/// A slot of the pool, owned through the lock on its file.
struct Slot {
    n: u32,
    file: File,
}

/// An uplink whose forwarding sysctl this sandbox holds on.
struct FwdHold {
    ifname: String,
    path: PathBuf,
    _file: File,
}

/// Takes the global forwarding lock (blocking).
fn fwd_lock() -> Result<File, KernelError> {
    let dir = state_dir("")?;
    let f = open_state(&dir.join("fwd.lock")).map_err(io_err("opening fwd.lock"))?;
    flock(&f, libc::LOCK_EX).map_err(io_err("locking fwd.lock"))?;
    Ok(f)
}

/// Removes dead holders of `dir`; with none left, restores the sysctl and
/// removes `dir`. Call with the forwarding lock held.
fn fwd_gc(dir: &Path, ifname: &str) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut live = 0;
    for e in entries {
        let e = e?;
        if e.file_name() == "orig" {
            continue;
        }
        let f = File::open(e.path())?;
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB)? {
            fs::remove_file(e.path())?;
        } else {
            live += 1;
        }
    }
    if live == 0 {
        if let Ok(orig) = fs::read_to_string(dir.join("orig")) {
            match write_sysctl(&fwd_sysctl(ifname), orig.trim()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::remove_dir_all(dir)?;
    }
    Ok(())
}

fn fwd_acquire(ifname: &str, id: &str) -> Result<Option<FwdHold>, KernelError> {
    let _lock = fwd_lock()?;
    let dir = state_dir("fwd")?.join(ifname);
    fwd_gc(&dir, ifname).map_err(io_err(format!("cleaning {}", dir.display())))?;
    let sysctl = fwd_sysctl(ifname);
    if !dir.exists() {
        let cur = read_sysctl(&sysctl).map_err(io_err(format!("reading {sysctl}")))?;
        if cur == "1" {
            return Ok(None);
        }
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        fs::write(dir.join("orig"), &cur).map_err(io_err("recording the original forwarding"))?;
        if let Err(e) = write_sysctl(&sysctl, "1") {
            let _ = fs::remove_dir_all(&dir);
            return Err(io_err(format!("writing 1 to {sysctl}"))(e));
        }
    }
    let path = dir.join(id);
    let file = open_state(&path).map_err(io_err(format!("creating {}", path.display())))?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err("locking the holder file"))?;
    Ok(Some(FwdHold {
        ifname: ifname.to_string(),
        path,
        _file: file,
    }))
}

fn fwd_release(h: FwdHold) -> io::Result<()> {
    let _lock = fwd_lock().map_err(|e| io::Error::other(e.to_string()))?;
    let dir = h.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let _ = fs::remove_file(&h.path);
    drop(h._file);
    fwd_gc(&dir, &h.ifname)
}

fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// Opens an rtnetlink socket inside the namespace `ns` (from a short-lived
/// thread that joins it; the socket stays bound to that namespace).
fn rtnl_in(ns: &File) -> Result<Rtnl, KernelError> {
    let fd = ns.as_raw_fd();
    let r = std::thread::scope(|s| {
        s.spawn(move || -> io::Result<Rtnl> {
            // SAFETY: setns only changes this thread's network namespace;
            // the thread ends right after opening the socket.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Rtnl::open()
        })
        .join()
    });
    match r {
        Ok(r) => r.map_err(io_err(
            "opening rtnetlink in the sandbox's network namespace",
        )),
        Err(_) => Err(KernelError::Io {
            what: "joining the sandbox's network namespace".into(),
            source: io::Error::other("thread panicked"),
        }),
    }
}

/// Kernel-enforced egress for one sandbox: owns its host-side veth, its
/// nftables table, its link slot and any uplink forwarding it turned on.
/// [`KernelEgress::teardown`] (or drop) removes all of it.
pub struct KernelEgress {
    id: String,
    ifname: String,
    table: String,
    slot: Option<Slot>,
    rt: Rtnl,
    nft: Nft,
    table_created: bool,
    link_created: bool,
    uplinks: Vec<FwdHold>,
    rules: Vec<nft::Rule>,
}

impl std::fmt::Debug for KernelEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelEgress")
            .field("ifname", &self.ifname)
            .field("table", &self.table)
            .field("slot", &self.slot.as_ref().map(|s| s.n))
            .finish()
    }
}

impl KernelEgress {
    /// Sets up kernel-enforced egress for the sandbox whose network
    /// namespace holds `cfg.sandbox_pid`: see the module documentation.
    /// Root only. On error nothing is left behind.
    pub fn setup(cfg: &KernelEgressConfig) -> Result<KernelEgress, KernelError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(KernelError::NotRoot);
        }
        validate_id(&cfg.id)?;
        let allow = cfg.allow.iter().map(to_v4).collect::<Result<Vec<_>, _>>()?;
        let dns = dns_rules(cfg.allow_dns_to)?;
        let pid = cfg.sandbox_pid;
        let ns_path = format!("/proc/{pid}/ns/net");
        let ns = File::open(&ns_path).map_err(|source| KernelError::Netns { pid, source })?;
        let own = fs::metadata("/proc/self/ns/net").map_err(io_err("stat /proc/self/ns/net"))?;
        let theirs = ns
            .metadata()
            .map_err(|source| KernelError::Netns { pid, source })?;
        if (own.dev(), own.ino()) == (theirs.dev(), theirs.ino()) {
            return Err(KernelError::HostNetns { pid });
        }

        let mut eg = KernelEgress {
            id: cfg.id.clone(),
            ifname: format!("ncl-{}", cfg.id),
            table: format!("nanoclaw_{}", cfg.id),
            slot: None,
            rt: Rtnl::open().map_err(io_err("opening rtnetlink"))?,
            nft: Nft::open().map_err(io_err("opening nfnetlink"))?,
            table_created: false,
            link_created: false,
            uplinks: Vec::new(),
            rules: Vec::new(),
        };
        // From here on, an early return drops `eg`, which undoes what was
        // done so far.
        let slot = eg.alloc_slot()?;
        let net = slot_net(slot.n);
        let (host_ip, sandbox_ip) = (offset(net, 1), offset(net, 2));
        eg.slot = Some(slot);

        eg.rules = nft::ruleset(&eg.ifname, sandbox_ip, &allow, &dns);
        match eg.nft.create(&eg.table, &eg.rules) {
            Ok(()) => eg.table_created = true,
            Err(e) if e.errno == libc::EEXIST => {
                return Err(KernelError::Netlink {
                    op: format!("creating nftables table inet {}", eg.table),
                    errno: e.errno,
                    message: format!(
                        "it already exists: another sandbox uses id `{}`, or a crashed run left \
                         it; call KernelEgress::cleanup_stale() or `nft delete table inet {}`",
                        eg.id, eg.table
                    ),
                })
            }
            Err(e) => {
                return Err(nl_err(
                    format!("creating nftables table inet {}", eg.table),
                    e,
                ))
            }
        }

        match eg.rt.create_veth(&eg.ifname, "eth0", ns.as_raw_fd()) {
            Ok(()) => eg.link_created = true,
            Err(e) => {
                return Err(nl_err(
                    format!(
                        "creating veth {} with peer eth0 in the sandbox's namespace{}",
                        eg.ifname,
                        if e.errno == libc::EEXIST {
                            " (a link of that name exists here, or the sandbox already has eth0)"
                        } else {
                            ""
                        }
                    ),
                    e,
                ))
            }
        }
        let hidx = eg
            .rt
            .link_index(&eg.ifname)
            .map_err(|e| nl_err(format!("looking up {}", eg.ifname), e))?;
        let v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", eg.ifname);
        match write_sysctl(&v6, "1") {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(format!("writing 1 to {v6}"))(e))
            }
            _ => {}
        }
        let fwd = fwd_sysctl(&eg.ifname);
        write_sysctl(&fwd, "1").map_err(io_err(format!("writing 1 to {fwd}")))?;
        eg.rt
            .add_addr(hidx, host_ip, SLOT_PREFIX)
            .map_err(|e| nl_err(format!("adding {host_ip}/30 to {}", eg.ifname), e))?;
        eg.rt
            .set_up(hidx)
            .map_err(|e| nl_err(format!("bringing {} up", eg.ifname), e))?;

        let mut srt = rtnl_in(&ns)?;
        let sidx = srt
            .link_index("eth0")
            .map_err(|e| nl_err("looking up eth0 in the sandbox", e))?;
        // Hygiene only (IPv6 from the sandbox is dropped anyway); kernels
        // without IPv6 refuse it.
        let _ = srt.no_ipv6_addr_gen(sidx);
        srt.add_addr(sidx, sandbox_ip, SLOT_PREFIX)
            .map_err(|e| nl_err(format!("adding {sandbox_ip}/30 to the sandbox's eth0"), e))?;
        srt.set_up(sidx)
            .map_err(|e| nl_err("bringing the sandbox's eth0 up", e))?;
        srt.add_default_route(sidx, host_ip).map_err(|e| {
            nl_err(
                format!("adding the sandbox's default route via {host_ip}"),
                e,
            )
        })?;

        for oif in eg.uplink_indexes(&allow, &dns, hidx, sandbox_ip)? {
            let Some(name) = if_name(oif) else { continue };
            if let Some(h) = fwd_acquire(&name, &eg.id)? {
                eg.uplinks.push(h);
            }
        }
        Ok(eg)
    }

    /// The interfaces the allowed destinations are reached through.
    fn uplink_indexes(
        &mut self,
        allow: &[AllowV4],
        dns: &[AllowV4],
        hidx: u32,
        sandbox_ip: Ipv4Addr,
    ) -> Result<BTreeSet<u32>, KernelError> {
        let mut out = BTreeSet::new();
        let mut defaults: Option<Vec<u32>> = None;
        for a in allow.iter().chain(dns) {
            if a.prefix == 0 {
                if defaults.is_none() {
                    let routes = self
                        .rt
                        .dump_routes()
                        .map_err(|e| nl_err("listing routes", e))?;
                    defaults = Some(
                        routes
                            .iter()
                            .filter(|r| r.prefix == 0)
                            .filter_map(|r| r.oif)
                            .collect(),
                    );
                }
                out.extend(defaults.iter().flatten().copied());
                continue;
            }
            let probe = if a.prefix <= 30 {
                offset(a.net, 1)
            } else {
                a.net
            };
            if let Ok(Some(oif)) = self.rt.route_get_forward(probe, sandbox_ip, hidx) {
                out.insert(oif);
            }
        }
        out.remove(&hidx);
        Ok(out)
    }

    /// Picks the first free slot of the pool (cleaning up a dead runner's
    /// leftovers on the way).
    fn alloc_slot(&mut self) -> Result<Slot, KernelError> {
        let dir = state_dir("slots")?;
        let mut taken = self.taken()?;
        if let Some(&(a, p)) = taken
            .iter()
            .find(|&&(a, p)| p <= POOL.1 && overlaps(a, p, POOL.0, POOL.1))
        {
            return Err(KernelError::Pool {
                reason: format!(
                    "the host routes {a}/{p}, which covers the whole pool; remove that route \
                     or do not use kernel egress on this host"
                ),
            });
        }
        for n in 0..SLOTS {
            let net = slot_net(n);
            let path = dir.join(n.to_string());
            let exists = path.exists();
            if !exists && taken.iter().any(|&(a, p)| overlaps(a, p, net, SLOT_PREFIX)) {
                continue;
            }
            let mut file =
                open_state(&path).map_err(io_err(format!("opening {}", path.display())))?;
            if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)
                .map_err(io_err(format!("locking {}", path.display())))?
            {
                continue;
            }
            let mut prev = String::new();
            let _ = file.read_to_string(&mut prev);
            let prev = prev.trim().to_string();
            if !prev.is_empty() {
                self.gc_slot(n, &prev);
                taken = self.taken()?;
            }
            if taken.iter().any(|&(a, p)| overlaps(a, p, net, SLOT_PREFIX)) {
                continue;
            }
            let w = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(self.id.as_bytes()));
            w.map_err(io_err(format!("writing {}", path.display())))?;
            return Ok(Slot { n, file });
        }
        Err(KernelError::Pool {
            reason: "every slot is in use or overlaps a host route".into(),
        })
    }

    /// Networks already used on the host: addresses and routes.
    fn taken(&mut self) -> Result<Vec<(Ipv4Addr, u8)>, KernelError> {
        let addrs = self
            .rt
            .dump_addrs()
            .map_err(|e| nl_err("listing host addresses", e))?;
        let routes = self
            .rt
            .dump_routes()
            .map_err(|e| nl_err("listing host routes", e))?;
        let mut t: Vec<(Ipv4Addr, u8)> = addrs
            .iter()
            .flat_map(|a| [(a.addr, 32), (a.addr, a.prefix)])
            .collect();
        t.extend(
            routes
                .iter()
                .filter(|r| r.prefix > 0)
                .map(|r| (r.dst, r.prefix)),
        );
        Ok(t)
    }

    /// Removes what a dead runner left in slot `n` for sandbox `prev`: its
    /// link (only if it still carries this slot's host address) and its
    /// table (only if no link `ncl-<prev>` exists any more).
    fn gc_slot(&mut self, n: u32, prev: &str) {
        gc_slot_with(&mut self.rt, &mut self.nft, n, prev);
    }

    /// The host-side link name, `ncl-<id>`.
    pub fn host_ifname(&self) -> &str {
        &self.ifname
    }

    /// The nftables table name (family `inet`), `nanoclaw_<id>`.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The host side's address on the link (the sandbox's gateway).
    pub fn host_ip(&self) -> Ipv4Addr {
        offset(slot_net(self.slot.as_ref().map_or(0, |s| s.n)), 1)
    }

    /// The sandbox's address on the link.
    pub fn sandbox_ip(&self) -> Ipv4Addr {
        offset(slot_net(self.slot.as_ref().map_or(0, |s| s.n)), 2)
    }

    /// The uplink interfaces whose `forwarding` sysctl this sandbox turned
    /// on (or holds on for another sandbox that did).
    pub fn uplinks(&self) -> Vec<String> {
        self.uplinks.iter().map(|h| h.ifname.clone()).collect()
    }

    /// The rules, one per line, in `nft` syntax (for logs and review).
    pub fn ruleset_text(&self) -> String {
        let mut s = String::new();
        for r in &self.rules {
            s.push_str(&r.to_string());
            s.push('\n');
        }
        s
    }

    fn cleanup(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if self.link_created {
            match self.rt.delete_link(&self.ifname) {
                Ok(()) => self.link_created = false,
                Err(e) if e.errno == libc::ENODEV => self.link_created = false,
                Err(e) => {
                    left.push(nl_err(format!("deleting link {}", self.ifname), e).to_string())
                }
            }
        }
        if self.table_created {
            match self.nft.delete(&self.table) {
                Ok(()) => self.table_created = false,
                Err(e) if e.errno == libc::ENOENT => self.table_created = false,
                Err(e) => left.push(
                    nl_err(format!("deleting nftables table inet {}", self.table), e).to_string(),
                ),
            }
        }
        for h in self.uplinks.drain(..) {
            let name = h.ifname.clone();
            if let Err(e) = fwd_release(h) {
                left.push(format!("restoring net.ipv4.conf.{name}.forwarding: {e}"));
            }
        }
        if let Some(slot) = self.slot.take() {
            if left.is_empty() {
                let _ = slot.file.set_len(0);
            }
            // Keeping the id in the file (when something was left) lets the
            // next user of the slot clean up after us.
        }
        left
    }

    /// Removes the link, the table, the uplink forwarding this sandbox
    /// holds and its slot.
    pub fn teardown(mut self) -> Result<(), KernelError> {
        let left = self.cleanup();
        if left.is_empty() {
            Ok(())
        } else {
            Err(KernelError::Teardown(left))
        }
    }

    /// [`KernelEgress::teardown`] on a background thread. Deleting the veth
    /// is the slow part of teardown (the kernel waits for RCU grace periods
    /// while unregistering a network device: 15–30 ms here, against a few
    /// ms for setup); a caller that need not wait, e.g. to report a run's
    /// outcome first, can join the handle later. The order (link, then
    /// table) is the same, so the link is never unfiltered.
    pub fn teardown_in_background(self) -> std::thread::JoinHandle<Result<(), KernelError>> {
        std::thread::spawn(move || self.teardown())
    }

    /// Cleans up after runners that died without teardown: every slot no
    /// live runner holds loses its link and table, and uplink sysctls
    /// nobody holds any more are restored. Safe to call at any time (root
    /// only).
    pub fn cleanup_stale() -> Result<(), KernelError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(KernelError::NotRoot);
        }
        let mut rt = Rtnl::open().map_err(io_err("opening rtnetlink"))?;
        let mut nft = Nft::open().map_err(io_err("opening nfnetlink"))?;
        let dir = state_dir("slots")?;
        let entries = fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))?;
        for e in entries.flatten() {
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(mut f) = open_state(&e.path()) else {
                continue;
            };
            if !flock(&f, libc::LOCK_EX | libc::LOCK_NB).unwrap_or(false) {
                continue;
            }
            let mut prev = String::new();
            let _ = f.read_to_string(&mut prev);
            let prev = prev.trim().to_string();
            if !prev.is_empty() {
                gc_slot_with(&mut rt, &mut nft, n, &prev);
                let _ = f.set_len(0);
            }
        }
        let _lock = fwd_lock()?;
        let fdir = state_dir("fwd")?;
        for e in fs::read_dir(&fdir)
            .map_err(io_err("listing fwd"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            fwd_gc(&e.path(), &name).map_err(io_err(format!("cleaning fwd/{name}")))?;
        }
        Ok(())
    }
}

fn gc_slot_with(rt: &mut Rtnl, nft: &mut Nft, n: u32, prev: &str) {
    if validate_id(prev).is_err() {
        return;
    }
    let host_ip = offset(slot_net(n), 1);
    let link = format!("ncl-{prev}");
    if let (Ok(idx), Ok(addrs)) = (rt.link_index(&link), rt.dump_addrs()) {
        if addrs.iter().any(|a| a.index == idx && a.addr == host_ip) {
            let _ = rt.delete_link_index(idx);
        }
    }
    if rt.link_index(&link).is_err() {
        let _ = nft.delete(&format!("nanoclaw_{prev}"));
    }
}

impl Drop for KernelEgress {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

/// Whether this kernel's nf_tables answers (what `--network kernel`
/// needs): asks it to delete a table that does not exist. "No such table"
/// means nf_tables is there (built in or loaded on demand); "protocol not
/// supported" means it is not. Needs root (nfnetlink wants CAP_NET_ADMIN).
pub fn nftables_available() -> Result<bool, KernelError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(KernelError::NotRoot);
    }
    let mut nft = Nft::open().map_err(io_err("opening nfnetlink"))?;
    match nft.delete("nanoclaw-probe-absent") {
        Ok(()) => Ok(true),
        Err(e) if e.errno == libc::ENOENT => Ok(true),
        Err(e) if e.errno == libc::EPROTONOSUPPORT || e.errno == libc::EOPNOTSUPP => Ok(false),
        Err(e) => Err(KernelError::Io {
            what: format!(
                "probing nf_tables{}",
                e.msg.map(|m| format!(" ({m})")).unwrap_or_default()
            ),
            source: io::Error::from_raw_os_error(e.errno),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("abc-123_x").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("abcdefghijkl").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("a b").is_err());
    }

    #[test]
    fn slots_tile_the_pool() {
        assert_eq!(SLOTS, 1 << 18);
        assert_eq!(slot_net(0), Ipv4Addr::new(100, 96, 0, 0));
        assert_eq!(slot_net(1), Ipv4Addr::new(100, 96, 0, 4));
        assert_eq!(slot_net(SLOTS - 1), Ipv4Addr::new(100, 111, 255, 252));
        assert!(overlaps(slot_net(5), 30, Ipv4Addr::new(100, 96, 0, 20), 32));
        assert!(!overlaps(
            slot_net(5),
            30,
            Ipv4Addr::new(100, 96, 0, 24),
            32
        ));
        assert!(overlaps(Ipv4Addr::new(100, 64, 0, 0), 10, slot_net(7), 30));
    }

    #[test]
    fn ipv6_rules_are_refused() {
        let c = Cidr::new("2001:db8::".parse().unwrap(), 32).unwrap();
        assert!(matches!(
            to_v4(&CidrPortRule::tcp(c, None)),
            Err(KernelError::Ipv6 { .. })
        ));
        assert!(dns_rules(Some("::1".parse().unwrap())).is_err());
        assert_eq!(
            dns_rules(Some("::ffff:10.0.0.1".parse().unwrap()))
                .unwrap()
                .len(),
            2
        );
    }
}
