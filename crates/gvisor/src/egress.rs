//! Egress for gVisor sandboxes (`--network allowlist` and `open`): the
//! native engine's transparent egress, in a network namespace nanoclaw
//! makes and wires before `runsc run` ([`NetnsEgress`]), which the
//! bundle names as the sandbox's network namespace.
//!
//! # Why `runsc --network=host` in nanoclaw's namespace (not netstack)
//!
//! gVisor has two network stacks. Netstack (`--network=sandbox`) is its
//! own TCP/IP stack in the sentry; it copies the interfaces of the
//! namespace it starts in and sends raw frames through them, so it needs
//! a veth (and nanoclaw's redirect on the other side of it). The runsc in
//! Debian (bookworm-backports, 2024-07-29) refuses every namespace as the
//! "root network namespace" on Linux 6.11 and later: it tells them apart
//! by whether `/proc/sys/net/core/rmem_default` exists, and newer kernels
//! show it in every namespace (gVisor issue #10704, fixed after that
//! release; measured here on 6.18). Hostinet (`--network=host`) serves the
//! sandbox's sockets with host sockets of the namespace the sandbox runs in
//! — here nanoclaw's: `lo` only, every TCP connection and DNS query
//! redirected to nanoclaw's proxy, everything else dropped, exactly as for
//! the native engine. The egress guarantee is the same; the cost is that
//! the sentry's socket calls reach the host kernel's TCP/IP code (in that
//! empty namespace) instead of staying in gVisor's. `--network none` keeps
//! runsc's `--network=none` (no host sockets at all).
//!
//! The proxy lives in the process that made the sandbox (the CLI's `run`,
//! the daemon): a sandbox that outlives its maker would lose its egress,
//! so egress for a detached sandbox is refused by name. Rootless runsc
//! cannot be pointed at a namespace nanoclaw made (it makes its own user
//! namespace, which does not own ours), so rootless egress is refused by
//! name too.

use nanoclaw_sandbox::backend::{SandboxConfig, LABEL_DETACHED};
use nanoclaw_sandbox::netns_egress::{self, proxied, NetnsEgress};
use nanoclaw_sandbox::spec::Network;
use nanoclaw_sandbox::Error;
use serde_json::Value;

use crate::{refuse, Runsc, NAME};

/// The flag a refusal names for `network`.
fn field(network: &Network) -> &'static str {
    match network {
        Network::Open { .. } => "--network open",
        Network::Kernel { .. } => "--network kernel",
        _ => "--network allowlist",
    }
}

/// What gVisor's egress cannot honour, refused by name.
pub fn check(config: &SandboxConfig, rootless: bool) -> Result<(), Error> {
    let s = &config.spec;
    match s.network {
        Network::None => return Ok(()),
        Network::Kernel { .. } => {
            return Err(refuse(
                "--network kernel",
                "its veth and host nftables rules are wired into a native sandbox's namespace; \
                 use --network allowlist (nanoclaw's proxy, with transparent redirection) instead",
            ))
        }
        Network::Allowlist { .. } | Network::Open { .. } => {}
    }
    if rootless {
        return Err(refuse(
            field(&s.network),
            "rootless runsc makes its own user namespace, which cannot join the network namespace \
             nanoclaw wires to its proxy; run nanoclaw as root for gVisor with egress, or use \
             --backend native (its egress works rootless)",
        ));
    }
    let detached = config
        .labels
        .iter()
        .any(|(k, v)| k == LABEL_DETACHED && v == "true");
    if detached {
        return Err(refuse(
            &format!("{} for a detached sandbox", field(&s.network)),
            "the egress proxy lives in the process that makes the sandbox, and a detached \
             sandbox outlives it; use `nanoclaw run --backend gvisor`, the daemon, or --backend native",
        ));
    }
    netns_egress::check(s, NAME)
}

/// Changing the policy of a sandbox without egress here: it has no proxy
/// (made with `--network none`, or by another process), and runsc cannot
/// be moved into a wired namespace once it runs.
pub fn no_proxy_to_change() -> Error {
    refuse(
        "changing the network policy of a running sandbox",
        "it was made without egress through nanoclaw's proxy (network none), or by another \
         process; make it with --network allowlist or open to change its policy later",
    )
}

/// The `layers` line for the sandbox's network namespace.
pub fn namespace_layer(network: &Network) -> &'static str {
    if proxied(network) {
        "net (nanoclaw's namespace: loopback only, every TCP connection and DNS query \
         redirected to nanoclaw's proxy; runsc --network=host in it)"
    } else {
        "net (loopback only)"
    }
}

/// How to run runsc for a sandbox with `egress`: `--network=host`, with the
/// bundle `oci` naming egress's namespace; unchanged without egress.
pub fn runsc_for(runsc: &Runsc, egress: Option<&NetnsEgress>, oci: &mut Value) -> Runsc {
    match egress.and_then(NetnsEgress::netns_path) {
        Some(path) => {
            crate::bundle::join_network(oci, &path);
            Runsc {
                host_network: true,
                ..runsc.clone()
            }
        }
        None => runsc.clone(),
    }
}
