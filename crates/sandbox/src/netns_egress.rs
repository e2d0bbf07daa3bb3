//! Transparent egress for sandboxes that another runtime runs (gVisor's
//! `runsc`, a Docker container): the native engine's wall, built from
//! outside, in a network namespace nanoclaw controls.
//!
//! The native engine's child installs its redirect and binds its listeners
//! from inside the sandbox's namespaces. Here nanoclaw, as root, does the
//! same work on a short-lived thread of its own that joins the namespace
//! (`setns`, or `unshare` for a fresh one: network namespaces are per
//! thread), so the result is identical:
//!
//! * the namespace has `lo` only (no interface to the outside);
//! * the rules of [`nanoclaw_net::kernel::RedirectRules`] (table `inet
//!   nanoclaw`): every TCP connection to any address redirected to the
//!   transparent listener, every DNS query (UDP or TCP port 53, any
//!   address) to nanoclaw's DNS, everything else that is not loopback
//!   dropped;
//! * the listeners — the explicit proxy on 127.0.0.1:3128 (for
//!   `HTTP_PROXY`), the transparent listener on 3129, DNS on 53, IPv4 and
//!   IPv6 — are sockets of that namespace held by this process and served
//!   by the same [`nanoclaw_net::BlockingProxy`], with the same policy,
//!   DNS answers, name/address checks and records as the native engine.
//!
//! The listeners live as long as the [`NetnsEgress`]: when it is dropped
//! they close, and a redirected connection is then refused by the kernel
//! (nothing listens): the wall fails closed. The namespace itself goes
//! when its last user (the sandbox, this value's descriptor) does; nothing
//! is left on the host (no veth, no host nftables table, no named
//! namespace).
//!
//! Two preconditions, checked by the backends that use this: the process
//! must be root (joining another runtime's namespace and installing
//! nftables rules there need `CAP_SYS_ADMIN`/`CAP_NET_ADMIN` over it), and
//! nothing in the sandbox may hold `CAP_NET_ADMIN` in that namespace (it
//! could delete the rules): `--cap-add NET_ADMIN` is refused with egress.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::native::child;
use crate::native::sys;
use crate::outcome::NetworkReport;
use crate::spec::{Network, SandboxSpec};
use crate::Error;

/// A sandbox's egress: the proxy serving the listeners nanoclaw made in
/// the sandbox's network namespace, and that namespace when nanoclaw made
/// it.
pub struct NetnsEgress {
    proxy: nanoclaw_net::BlockingProxy,
    netns: Option<OwnedFd>,
    /// `allowlist` or `open` at creation; what the last
    /// [`NetnsEgress::set_policy`] made it since.
    mode: std::sync::Mutex<&'static str>,
}

impl std::fmt::Debug for NetnsEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsEgress")
            .field("mode", &self.mode.lock().map(|m| *m).unwrap_or("?"))
            .field("netns", &self.netns)
            .finish()
    }
}

/// The explicit proxy's port on the sandbox's loopback (as for the native
/// engine).
pub const PROXY_PORT: u16 = child::PROXY_PORT;

/// Whether `network` goes through nanoclaw's proxy (`allowlist`, `open`).
pub fn proxied(network: &Network) -> bool {
    matches!(network, Network::Allowlist { .. } | Network::Open { .. })
}

/// The variables that point programs in the sandbox at the explicit proxy
/// (programs that ignore them are redirected anyway).
pub fn proxy_env() -> Vec<(String, String)> {
    nanoclaw_net::proxy_env(PROXY_PORT)
}

/// What a backend that uses this must refuse for `spec`, by field: the
/// credential rules (their per-sandbox CA is installed only by the native
/// engine so far), and `CAP_NET_ADMIN` (it would let the sandbox remove its
/// own redirect). `Ok` when the network is not proxied.
pub fn check(spec: &SandboxSpec, backend: &str) -> Result<(), Error> {
    if !proxied(&spec.network) {
        return Ok(());
    }
    if !spec.egress.rules.is_empty() {
        return Err(Error::NotSupported {
            backend: backend.into(),
            field: "network.rules (credentials added at the boundary)".into(),
            why: "the per-sandbox CA they need is made and installed only by the native engine \
                  so far; use --backend native for credential rules"
                .into(),
        });
    }
    if spec.hardening.cap_add.iter().any(|c| {
        c.trim_start_matches("CAP_")
            .eq_ignore_ascii_case("NET_ADMIN")
    }) {
        return Err(Error::NotSupported {
            backend: backend.into(),
            field: "--cap-add NET_ADMIN with --network allowlist/open".into(),
            why: "it would let the sandbox delete the redirect that sends its connections to \
                  nanoclaw's proxy"
                .into(),
        });
    }
    // The policy itself (hosts, CIDRs, --add-host) is checked here too, so
    // a bad rule is refused before anything is made.
    crate::native::network_policy(&spec.network)?;
    Ok(())
}

/// The descriptors made in the namespace: the explicit proxy's listener,
/// then the transparent sockets in `child::TRANSPARENT_SOCKETS` order.
type Listeners = (RawFd, [RawFd; child::TRANSPARENT_SOCKETS.len()]);

impl NetnsEgress {
    /// A fresh network namespace, wired (see the module's documentation),
    /// for a runtime that is told to use it by path
    /// ([`NetnsEgress::netns_path`]). `None` when `spec`'s network is not
    /// proxied.
    pub fn in_new_netns(spec: &SandboxSpec) -> Result<Option<NetnsEgress>, Error> {
        NetnsEgress::make(spec, None)
    }

    /// The network namespace of host process `pid` (a container's first
    /// process), wired. `None` when `spec`'s network is not proxied.
    pub fn in_netns_of(pid: i32, spec: &SandboxSpec) -> Result<Option<NetnsEgress>, Error> {
        let path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&path).map_err(|e| Error::Sys {
            call: format!("opening {path}"),
            source: e,
        })?;
        NetnsEgress::make(spec, Some(OwnedFd::from(ns)))
    }

    fn make(spec: &SandboxSpec, join: Option<OwnedFd>) -> Result<Option<NetnsEgress>, Error> {
        let Some(policy) = crate::native::network_policy(&spec.network)? else {
            return Ok(None);
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::Unsupported {
                what: "egress through nanoclaw's proxy for this backend".into(),
                why:
                    "nanoclaw wires the sandbox's network namespace from outside, which needs root"
                        .into(),
                fix: "run nanoclaw as root, or use --backend native (its egress works rootless)"
                    .into(),
            });
        }
        let rules =
            nanoclaw_net::kernel::RedirectRules::new(child::TRANSPARENT_PORT, child::DNS_PORT);
        let fresh = join.is_none();
        let wired = std::thread::spawn(move || wire(join.as_ref().map(AsRawFd::as_raw_fd), &rules))
            .join()
            .map_err(|_| Error::Sys {
                call: "wiring the sandbox's network namespace".into(),
                source: std::io::Error::other("the thread panicked"),
            })?;
        let (netns, (listener, transparent)) = wired.map_err(|(step, e)| Error::Sys {
            call: format!("{step} in the sandbox's network namespace"),
            source: e,
        })?;
        let mode = crate::native::net_mode(&spec.network);
        let proxy =
            crate::native::start_proxy(policy, &spec.network, None, listener, &transparent)?;
        Ok(Some(NetnsEgress {
            proxy,
            netns: if fresh { netns } else { None },
            mode: std::sync::Mutex::new(mode),
        }))
    }

    /// A path to the namespace nanoclaw made, valid while this value lives
    /// (`/proc/<this pid>/fd/<fd>`), for a runtime's configuration. `None`
    /// for a namespace joined with [`NetnsEgress::in_netns_of`].
    pub fn netns_path(&self) -> Option<String> {
        self.netns
            .as_ref()
            .map(|fd| format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()))
    }

    /// Replaces the proxy's policy (see [`nanoclaw_net::BlockingProxy::set_policy`]):
    /// the redirect and listeners stay, what they let through changes at
    /// once, and open connections the new policy does not admit close.
    pub fn set_policy(&self, policy: nanoclaw_net::NetworkPolicy) -> nanoclaw_net::PolicyUpdate {
        let mode = match policy.mode {
            nanoclaw_net::NetworkMode::None => "none",
            nanoclaw_net::NetworkMode::Allowlist => "allowlist",
            nanoclaw_net::NetworkMode::Open => "open",
        };
        let update = self.proxy.set_policy(policy);
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        update
    }

    /// The proxy's record so far (counters, refusals, transparent
    /// connections, DNS queries), as the native engine reports it.
    pub fn report(&self) -> NetworkReport {
        let mode = *self.mode.lock().unwrap_or_else(|e| e.into_inner());
        crate::native::report_of(mode, Some(&self.proxy))
    }
}

/// On the calling (dedicated) thread: joins namespace `join`, or makes a
/// new one; brings `lo` up, installs `rules`, binds the listeners. Returns
/// the new namespace's descriptor (when made) and the listeners, or the
/// step that failed. Every descriptor made is closed on failure.
fn wire(
    join: Option<RawFd>,
    rules: &nanoclaw_net::kernel::RedirectRules,
) -> Result<(Option<OwnedFd>, Listeners), (&'static str, std::io::Error)> {
    let netns = match join {
        Some(fd) => {
            // SAFETY: setns on a namespace descriptor we hold; it changes
            // only this thread's network namespace.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(("joining", std::io::Error::last_os_error()));
            }
            None
        }
        None => {
            // SAFETY: unshare of the network namespace affects only this
            // thread, which ends after this function.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(("making", std::io::Error::last_os_error()));
            }
            let ns = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| ("opening /proc/thread-self/ns/net", e))?;
            Some(OwnedFd::from(ns))
        }
    };
    child::loopback_up().map_err(|e| ("bringing lo up", e))?;
    rules.install().map_err(|e| {
        (
            "installing the redirect (routes and nftables table inet nanoclaw)",
            e,
        )
    })?;
    let listener =
        sys::listen_loopback(PROXY_PORT).map_err(|e| ("listening on 127.0.0.1:3128", e))?;
    // SAFETY: `listener` was just made and is owned here until handed out.
    let listener = unsafe { OwnedFd::from_raw_fd(listener) };
    let mut owned = Vec::with_capacity(child::TRANSPARENT_SOCKETS.len());
    for &(v6, stream, port) in child::TRANSPARENT_SOCKETS.iter() {
        let fd = sys::bind_loopback(v6, stream, port)
            .map_err(|e| ("binding the transparent listener and DNS sockets", e))?;
        // SAFETY: as above.
        owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let mut fds = [-1; child::TRANSPARENT_SOCKETS.len()];
    for (slot, fd) in fds.iter_mut().zip(owned) {
        *slot = std::os::fd::IntoRawFd::into_raw_fd(fd);
    }
    Ok((netns, (std::os::fd::IntoRawFd::into_raw_fd(listener), fds)))
}
