//! Egress for Docker sandboxes (`--network allowlist` and `open`): the
//! native engine's transparent egress, installed from the host into the
//! container's own network namespace ([`NetnsEgress::in_netns_of`]).
//!
//! The container is made exactly as for `--network none` (Docker's `none`
//! network: a namespace with `lo` only, no interface to the outside). Once
//! Docker has started it — when only nanoclaw's own init runs in it, before
//! any command of the sandbox's — nanoclaw joins that namespace from a
//! thread of its own and installs what the native engine's child installs:
//! the `inet nanoclaw` redirect (every TCP connection to any address to the
//! transparent listener; UDP and TCP port 53 to nanoclaw's DNS; everything
//! else that is not loopback dropped) and the listeners on the container's
//! 127.0.0.1/::1, served by the same proxy with the same policy, DNS
//! answers and records. The container's `/etc/resolv.conf` is Docker's
//! (never a loopback nameserver for a non-host network), and any
//! nameserver there is redirected to nanoclaw's DNS.
//!
//! # Why this design (and not a Docker network)
//!
//! * An `--internal` Docker network whose only reachable address is a
//!   proxy container would need that proxy inside Docker, reachable from
//!   every sandbox on the network (so sandboxes could reach each other
//!   unless each gets its own network), and it only serves programs that
//!   honour proxy variables: anything else (raw sockets, Node's `fetch`,
//!   git over ssh) fails instead of being checked, and names resolve
//!   through Docker's embedded DNS, not nanoclaw's.
//! * Joining a namespace nanoclaw made is not something Docker's API offers
//!   (`container:<id>` shares another container's only).
//! * The container's own namespace, wired by nanoclaw, has no route out at
//!   all: a packet that escapes the rules is looped back, never forwarded.
//!   The rules live inside the namespace, so the container must not hold
//!   `CAP_NET_ADMIN` there (`--cap-add NET_ADMIN` is refused with egress;
//!   every other capability is dropped by default).
//!
//! The cost: nanoclaw must be root (to enter a namespace Docker made), and
//! the proxy lives in the process that made the sandbox (the CLI's `run`,
//! the daemon), so egress for a detached sandbox (`sandbox create`) is
//! refused by name — the proxy would end with its maker.

use nanoclaw_sandbox::backend::{SandboxConfig, LABEL_DETACHED};
use nanoclaw_sandbox::netns_egress::{self, NetnsEgress};
use nanoclaw_sandbox::spec::{Network, SandboxSpec};
use nanoclaw_sandbox::Error;

use crate::NAME;

/// The `layers` line for the container's network namespace with egress.
pub const NAMESPACE_LAYER: &str =
    "net (Docker's none network, wired by nanoclaw: loopback only, every TCP \
     connection and DNS query redirected to nanoclaw's proxy)";

/// Whether `network` goes through nanoclaw's proxy.
pub fn proxied(network: &Network) -> bool {
    netns_egress::proxied(network)
}

fn refuse(field: &str, why: &str) -> Error {
    Error::NotSupported {
        backend: NAME.into(),
        field: field.into(),
        why: why.into(),
    }
}

/// What Docker's egress cannot honour, refused by name; `runtime` is
/// Docker's OCI runtime for the sandbox (`None`: Docker's default).
pub fn check(config: &SandboxConfig, runtime: Option<&str>) -> Result<(), Error> {
    let s = &config.spec;
    let field = match s.network {
        Network::Allowlist { .. } => "--network allowlist",
        Network::Open { .. } => "--network open",
        _ => return Ok(()),
    };
    if runtime == Some("runsc") {
        return Err(refuse(
            &format!("{field} with Docker's runsc runtime"),
            "gVisor's own network stack serves the container's sockets, so the rules nanoclaw              installs in the container's namespace never see them; use --backend gvisor (egress              through nanoclaw's proxy) or NANOCLAW_DOCKER_RUNTIME=runc",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(refuse(
            field,
            "nanoclaw wires the container's network namespace from the host, which needs root \
             (Docker's socket alone does not give that); run nanoclaw as root, or use \
             --backend native (its egress works rootless)",
        ));
    }
    if config
        .labels
        .iter()
        .any(|(k, v)| k == LABEL_DETACHED && v == "true")
    {
        return Err(refuse(
            &format!("{field} for a detached sandbox"),
            "the egress proxy lives in the process that makes the sandbox, and a detached \
             sandbox outlives it; use `nanoclaw run --backend docker`, the daemon, or --backend native",
        ));
    }
    netns_egress::check(s, NAME)
}

/// Changing the policy of a sandbox without egress here: it has no proxy
/// (made with `--network none`, or by another process), and a redirect
/// cannot be added to a namespace whose programs may already run.
pub fn no_proxy_to_change() -> Error {
    refuse(
        "changing the network policy of a running sandbox",
        "it was made without egress through nanoclaw's proxy (network none), or by another \
         process; make it with --network allowlist or open to change its policy later",
    )
}

/// Wires the namespace of the container whose first process is host pid
/// `pid`; `None` without egress.
pub fn wire(pid: i64, spec: &SandboxSpec) -> Result<Option<NetnsEgress>, Error> {
    if !proxied(&spec.network) {
        return Ok(None);
    }
    let pid = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::Backend {
            backend: NAME.into(),
            message: format!("Docker reported no process for the container (pid {pid})"),
        })?;
    NetnsEgress::in_netns_of(pid, spec)
}
