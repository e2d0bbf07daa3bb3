//! nanoclaw egress control, host side.
//!
//! A sandbox's network namespace has no route out. When its policy is
//! `allowlist` (or `open`), the engine starts a [`Proxy`] on the host,
//! listening on a Unix socket that is bind-mounted into the sandbox and
//! bridged to the sandbox's loopback; [`proxy_env`] gives the variables that
//! point programs at it. The proxy speaks HTTP `CONNECT`, plain HTTP
//! (absolute-form) and SOCKS5 on the same socket (told apart by the first
//! byte), and for every request:
//!
//! 1. checks the destination name (or address) and port against the
//!    [`NetworkPolicy`] ([`NetworkPolicy::check_destination`]);
//! 2. resolves the name itself, once ([`Resolve`]);
//! 3. drops resolved addresses that are special-purpose — loopback,
//!    link-local (169.254.169.254 metadata), private, CGNAT, multicast,
//!    unspecified, broadcast, reserved, and their IPv4-mapped / NAT64 / 6to4
//!    forms — unless a rule allowlists them explicitly
//!    ([`NetworkPolicy::check_address`], [`addr`]);
//! 4. connects to an address it checked (never resolving again: no
//!    DNS-rebinding window);
//! 5. relays bytes, counting them against the sandbox's byte cap, and for
//!    tunnels that start with a TLS ClientHello refuses an SNI naming
//!    another host than the tunnel's target.
//!
//! Every refusal is recorded as a [`Denial`] (destination, port, reason,
//! time), retrievable with [`ProxyHandle::denials`] for the engine's `--json`
//! output, next to counters ([`Stats`]).
//!
//! # What the proxy guarantees, and what it does not
//!
//! * Guaranteed: a connection only ever reaches an `address:port` that the
//!   policy allows *at the moment of the check*; names are matched on what
//!   the client asked for; special-purpose addresses need explicit rules; a
//!   plain-HTTP request's `Host` header must name the URI's host; a TLS
//!   ClientHello's SNI must name the `CONNECT`/SOCKS target (for a target
//!   given as an IP address, any SNI is refused); the caps hold across all
//!   connections of one proxy.
//! * Not seen: what travels *inside* TLS. A client can send an allowed SNI
//!   and then an HTTP `Host` header for another site served by the same
//!   front (Host-header domain fronting inside TLS) — the proxy cannot see
//!   it. With Encrypted Client Hello only the outer (public) name is visible;
//!   it must match the target, so ECH to a different public name is refused.
//!   A ClientHello without SNI is let through, and only a ClientHello at the
//!   very start of a tunnel is inspected (TLS started later, STARTTLS-style,
//!   is not). Plain-text protocols inside a `CONNECT` tunnel are not
//!   inspected (only the destination is checked).
//! * Plain HTTP is one request per client connection: the upstream is sent
//!   `Connection: close`, the client gets `Connection: close`, and the
//!   proxy closes after the response (after `Content-Length` bytes, or when
//!   the upstream closes). Bytes a client pipelines after its first request
//!   can only reach that same, already-checked upstream.
//! * Idle tunnels are not timed out (a tunnel holds its connection slot
//!   until either side closes); the caps bound the total.
//! * Only TCP is carried: SOCKS5 `UDP ASSOCIATE` and `BIND` are refused.

#![warn(missing_docs)]

pub mod addr;
pub mod ca;
mod conn;
mod dns;
mod http;
mod intercept;
pub mod kernel;
mod live;
pub mod policy;
mod proxy;
mod record;
mod resolve;
pub mod rules;
mod sni;
mod splice;
mod transparent;

pub use addr::{AddrClass, Special};
pub use ca::{CaError, SandboxCa};
pub use intercept::{Intercept, InterceptError};
pub use live::PolicyUpdate;
pub use policy::{
    Cidr, CidrRule, Host, HostPattern, HostRule, NetworkMode, NetworkPolicy, PolicyError,
    DEFAULT_HOST_PORTS,
};
pub use proxy::{BlockingProxy, Listen, ListenAddr, Proxy, ProxyBuilder, ProxyError, ProxyHandle};
pub use record::{
    ConnRecord, Denial, DenyReason, DnsRecord, Limits, Protocol, Stats, MAX_RECORDED_DENIALS,
};
pub use resolve::{
    BoxFuture, Connect, HostsResolver, Resolve, StaticResolver, SystemResolver, TcpConnector,
};
pub use rules::{HeaderRule, HeaderRules, RuleError};

/// The environment variables that point programs inside the sandbox at the
/// proxy bridged to `127.0.0.1:port`: `HTTP_PROXY`, `HTTPS_PROXY` (HTTP
/// proxy URL), `ALL_PROXY` (`socks5h://`, so names are resolved by the
/// proxy), `NO_PROXY` (loopback), each also in lower case.
pub fn proxy_env(port: u16) -> Vec<(String, String)> {
    let http = format!("http://127.0.0.1:{port}");
    let socks = format!("socks5h://127.0.0.1:{port}");
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    let mut out = Vec::with_capacity(8);
    for (k, v) in [
        ("HTTP_PROXY", &http),
        ("HTTPS_PROXY", &http),
        ("ALL_PROXY", &socks),
        ("NO_PROXY", &no_proxy),
    ] {
        out.push((k.to_string(), v.clone()));
        out.push((k.to_ascii_lowercase(), v.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn proxy_env_sets_upper_and_lower_case() {
        let env = super::proxy_env(3128);
        assert!(env.contains(&("HTTPS_PROXY".into(), "http://127.0.0.1:3128".into())));
        assert!(env.contains(&("all_proxy".into(), "socks5h://127.0.0.1:3128".into())));
        assert_eq!(env.len(), 8);
    }
}
