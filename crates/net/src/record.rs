//! What the proxy records: every refusal ([`Denial`]) and running counters
//! ([`Stats`]); and the per-sandbox caps ([`Limits`]).

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use crate::addr::AddrClass;

/// At most this many denials are kept (the rest are counted in
/// [`Stats::denials_dropped`]), so a sandbox cannot grow the host's memory by
/// knocking on closed doors.
pub const MAX_RECORDED_DENIALS: usize = 10_000;

/// Why a connection was refused or cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DenyReason {
    /// The policy's mode is `none`.
    NetworkDisabled,
    /// No host rule matches the name.
    HostNotAllowed,
    /// A rule matches the host or address, but not this port.
    PortNotAllowed,
    /// A literal address that no CIDR / literal-IP rule covers.
    AddressNotAllowed,
    /// The destination is, or resolved only to, a special-purpose address
    /// (loopback, link-local/metadata, private, ...) not allowlisted
    /// explicitly.
    SpecialAddress {
        /// The (first) offending address.
        address: IpAddr,
        /// Its class.
        class: AddrClass,
    },
    /// The destination is not a valid host name or address.
    InvalidDestination {
        /// What is wrong.
        detail: String,
    },
    /// DNS resolution failed.
    ResolveFailed {
        /// The resolver's error.
        detail: String,
    },
    /// Connecting to the checked address failed (not a policy refusal).
    ConnectFailed {
        /// The address tried last.
        address: IpAddr,
        /// The error.
        detail: String,
    },
    /// The TLS ClientHello's SNI names another host than the tunnel's
    /// target (domain fronting).
    SniMismatch {
        /// The server name in the ClientHello.
        sni: String,
    },
    /// The tunnel started with a TLS handshake record that is not a
    /// parseable ClientHello (refused: the SNI check cannot be done).
    MalformedTlsHello,
    /// A transparent connection whose TLS SNI or HTTP `Host` names a host
    /// that the connection's address is not an address of (as the
    /// sandbox's DNS answered it, or as the proxy resolves it now).
    NameAddressMismatch {
        /// The name the connection presented.
        name: String,
        /// The address it was made to.
        address: IpAddr,
    },
    /// A plain-HTTP request whose `Host` header names another host than its
    /// absolute URI.
    HostHeaderMismatch {
        /// The `Host` header.
        host: String,
    },
    /// A request the proxy does not carry: SOCKS5 `BIND` or `UDP ASSOCIATE`,
    /// an `https://` or `ftp://` absolute URI, a SOCKS4 request, ...
    Unsupported {
        /// What was asked for.
        what: String,
    },
    /// The cap on concurrent connections was reached.
    ConnectionLimit {
        /// The cap.
        max: usize,
    },
    /// The cap on total bytes (both directions, all connections) was
    /// reached; the connection was cut or refused.
    ByteLimit {
        /// The cap.
        max: u64,
    },
    /// An open connection closed by a policy update: no rule of the new
    /// policy admits it any more.
    RuleRemoved {
        /// The rule that had admitted it.
        rule: String,
        /// Why the new policy refuses it.
        detail: String,
    },
    /// A request on an intercepted connection (a host with credential
    /// rules) names another host than the connection's (TLS SNI, or the
    /// first request's `Host`): domain fronting.
    DomainFronting {
        /// The `Host` header or absolute URI the request named.
        host: String,
        /// The host the connection is for.
        name: String,
    },
    /// Intercepting a connection to a host with credential rules failed
    /// (a handshake, or the upstream's certificate).
    Interception {
        /// What failed.
        detail: String,
    },
}

impl DenyReason {
    /// A stable machine-readable name (the `kind` field of the JSON form;
    /// also sent in the proxy's `X-Nanoclaw-Deny-Reason` response header).
    pub fn kind(&self) -> &'static str {
        match self {
            DenyReason::NetworkDisabled => "network_disabled",
            DenyReason::HostNotAllowed => "host_not_allowed",
            DenyReason::PortNotAllowed => "port_not_allowed",
            DenyReason::AddressNotAllowed => "address_not_allowed",
            DenyReason::SpecialAddress { .. } => "special_address",
            DenyReason::InvalidDestination { .. } => "invalid_destination",
            DenyReason::ResolveFailed { .. } => "resolve_failed",
            DenyReason::ConnectFailed { .. } => "connect_failed",
            DenyReason::SniMismatch { .. } => "sni_mismatch",
            DenyReason::MalformedTlsHello => "malformed_tls_hello",
            DenyReason::HostHeaderMismatch { .. } => "host_header_mismatch",
            DenyReason::NameAddressMismatch { .. } => "name_address_mismatch",
            DenyReason::Unsupported { .. } => "unsupported",
            DenyReason::ConnectionLimit { .. } => "connection_limit",
            DenyReason::ByteLimit { .. } => "byte_limit",
            DenyReason::RuleRemoved { .. } => "rule_removed",
            DenyReason::DomainFronting { .. } => "domain_fronting",
            DenyReason::Interception { .. } => "interception",
        }
    }

    /// Whether this is a refusal by policy or cap (as opposed to a failure
    /// to resolve or connect to an allowed destination).
    pub fn is_policy(&self) -> bool {
        !matches!(
            self,
            DenyReason::ResolveFailed { .. } | DenyReason::ConnectFailed { .. }
        )
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::NetworkDisabled => f.write_str("network is disabled (mode none)"),
            DenyReason::HostNotAllowed => f.write_str("host not in the allowlist"),
            DenyReason::PortNotAllowed => f.write_str("port not allowed for this host"),
            DenyReason::AddressNotAllowed => {
                f.write_str("address not covered by an --allow-cidr rule")
            }
            DenyReason::SpecialAddress { address, class } => write!(
                f,
                "resolves to {class} address {address}, which needs an explicit --allow-cidr rule"
            ),
            DenyReason::InvalidDestination { detail } => write!(f, "invalid destination: {detail}"),
            DenyReason::ResolveFailed { detail } => write!(f, "DNS resolution failed: {detail}"),
            DenyReason::ConnectFailed { address, detail } => {
                write!(f, "connecting to {address} failed: {detail}")
            }
            DenyReason::SniMismatch { sni } => {
                write!(f, "TLS SNI `{sni}` does not match the tunnel's target")
            }
            DenyReason::MalformedTlsHello => f.write_str("malformed TLS ClientHello"),
            DenyReason::HostHeaderMismatch { host } => {
                write!(f, "Host header `{host}` does not match the request URI")
            }
            DenyReason::NameAddressMismatch { name, address } => write!(
                f,
                "`{name}` (the TLS SNI or HTTP Host) does not resolve to {address}, the address connected to"
            ),
            DenyReason::Unsupported { what } => write!(f, "unsupported: {what}"),
            DenyReason::ConnectionLimit { max } => {
                write!(f, "too many concurrent connections (cap {max})")
            }
            DenyReason::ByteLimit { max } => write!(f, "byte cap of {max} bytes reached"),
            DenyReason::RuleRemoved { rule, detail } => write!(
                f,
                "closed by a policy update: its rule `{rule}` was removed ({detail})"
            ),
            DenyReason::DomainFronting { host, name } => write!(
                f,
                "a request for `{host}` on a connection to {name} (domain fronting): each request must name the connection's host"
            ),
            DenyReason::Interception { detail } => {
                write!(f, "credential-rule interception failed: {detail}")
            }
        }
    }
}

/// How the client spoke to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP `CONNECT` tunnel.
    HttpConnect,
    /// Plain HTTP request forwarded by the proxy.
    HttpForward,
    /// SOCKS5.
    Socks5,
    /// A connection redirected transparently inside the sandbox (no proxy
    /// variables): the destination is the address the program connected
    /// to, the name is the TLS SNI, the HTTP `Host` or the name the
    /// sandbox's DNS answered with that address.
    Transparent,
    /// Not known yet (e.g. refused before the request was read).
    Unknown,
}

/// One connection the proxy decided on (allowed or refused), for the
/// outcome: kept for transparent connections, whose bytes are counted per
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnRecord {
    /// The address the program connected to.
    pub address: IpAddr,
    /// The port.
    pub port: u16,
    /// The name the decision used (SNI, `Host`, or the DNS answer's name),
    /// if any.
    pub name: Option<String>,
    /// Where the name came from: `sni`, `http_host`, `dns` or `none`.
    pub name_source: &'static str,
    /// Whether the connection was let through.
    pub allowed: bool,
    /// Why it was refused (or cut), if it was.
    pub reason: Option<DenyReason>,
    /// Bytes from the sandbox to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the sandbox.
    pub bytes_down: u64,
    /// When the decision was made (milliseconds since the Unix epoch).
    #[serde(serialize_with = "ser_millis")]
    pub at: SystemTime,
}

/// Live byte counters of one recorded connection.
#[derive(Debug, Default)]
pub(crate) struct ConnBytes {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
}

/// One DNS query the sandbox's resolver answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsRecord {
    /// The name asked for (lower-case, as received, possibly invalid).
    pub name: String,
    /// The query type (`A`, `AAAA`, `TXT`, ... or the number).
    pub qtype: String,
    /// `udp` or `tcp`.
    pub transport: &'static str,
    /// Whether the name is allowed (answered with its addresses).
    pub allowed: bool,
    /// The addresses returned.
    pub answers: Vec<IpAddr>,
    /// The response code sent: `NOERROR`, `NXDOMAIN`, `REFUSED`, `SERVFAIL`,
    /// `FORMERR`.
    pub rcode: &'static str,
    /// Why the name was refused or has no answer, if so.
    pub reason: Option<DenyReason>,
    /// When (milliseconds since the Unix epoch).
    #[serde(serialize_with = "ser_millis")]
    pub at: SystemTime,
}

/// One refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denial {
    /// The destination as the client named it (a host name or an address);
    /// empty if the connection was refused before the request was read.
    pub destination: String,
    /// The destination port (0 if unknown).
    pub port: u16,
    /// Why.
    pub reason: DenyReason,
    /// How the client asked.
    pub protocol: Protocol,
    /// When (serialised as milliseconds since the Unix epoch).
    #[serde(serialize_with = "ser_millis")]
    pub at: SystemTime,
}

fn ser_millis<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    s.serialize_u64(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Counters, as of the moment they were read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Upstream connections established (allowed requests).
    pub allowed: u64,
    /// Refusals (including those not kept in the list).
    pub denied: u64,
    /// Client connections open right now.
    pub active: u64,
    /// Most client connections open at the same time.
    pub peak_active: u64,
    /// Bytes from clients to upstreams (request heads rewritten by the proxy
    /// count as sent).
    pub bytes_up: u64,
    /// Bytes from upstreams to clients.
    pub bytes_down: u64,
    /// Connections closed for a protocol error (garbage, timeout in the
    /// handshake, oversize headers).
    pub protocol_errors: u64,
    /// Denials counted but not kept because [`MAX_RECORDED_DENIALS`] was
    /// reached.
    pub denials_dropped: u64,
    /// Requests that passed through credential-rule interception (their
    /// headers set by a rule).
    pub intercepted: u64,
}

/// Per-sandbox caps and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most concurrent tunnels / forwarded requests. Beyond it a request is
    /// refused with [`DenyReason::ConnectionLimit`]. (A few more client
    /// connections — [`Limits::HANDSHAKE_SLACK`] — may be in the handshake
    /// phase at once; beyond that new clients are closed at once.)
    pub max_connections: usize,
    /// Most bytes, both directions, all connections, over the proxy's
    /// lifetime. Reaching it cuts the connection that crossed it and
    /// refuses new ones ([`DenyReason::ByteLimit`]).
    pub max_bytes: u64,
    /// Time allowed for a client to send its request.
    pub handshake_timeout: Duration,
    /// Time allowed to connect to one upstream address.
    pub connect_timeout: Duration,
}

impl Limits {
    /// Client connections allowed in the handshake phase beyond
    /// `max_connections`.
    pub const HANDSHAKE_SLACK: usize = 16;
}

impl Default for Limits {
    /// 256 connections, 10 GiB, 10 s handshake, 10 s connect.
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_bytes: 10 << 30,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Shared recording state.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    denials: Mutex<Vec<Denial>>,
    pub(crate) accepted: AtomicU64,
    pub(crate) allowed: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) peak_active: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    /// Bytes reserved against the cap (up + down).
    pub(crate) bytes_total: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    /// Requests rewritten by credential rules.
    pub(crate) intercepted: AtomicU64,
    denials_dropped: AtomicU64,
    conns: Mutex<Vec<(ConnRecord, Arc<ConnBytes>)>>,
    dns: Mutex<Vec<DnsRecord>>,
    /// Connection and DNS records not kept (over [`MAX_RECORDED_DENIALS`]).
    pub(crate) records_dropped: AtomicU64,
}

fn push_bounded<T>(list: &Mutex<Vec<T>>, item: T, dropped: &AtomicU64) {
    let mut list = match list.lock() {
        Ok(l) => l,
        Err(poisoned) => poisoned.into_inner(),
    };
    if list.len() >= MAX_RECORDED_DENIALS {
        dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    list.push(item);
}

fn snapshot<T: Clone>(list: &Mutex<Vec<T>>) -> Vec<T> {
    match list.lock() {
        Ok(l) => l.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl Recorder {
    pub(crate) fn deny(
        &self,
        destination: String,
        port: u16,
        protocol: Protocol,
        reason: DenyReason,
    ) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        let mut list = match self.denials.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if list.len() >= MAX_RECORDED_DENIALS {
            self.denials_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        list.push(Denial {
            destination,
            port,
            reason,
            protocol,
            at: SystemTime::now(),
        });
    }

    /// Records a decision; returns the live byte counters of the
    /// connection (read whenever the records are) and its index for
    /// [`Recorder::cut`].
    pub(crate) fn connection(&self, c: ConnRecord) -> (Arc<ConnBytes>, Option<usize>) {
        let bytes = Arc::new(ConnBytes::default());
        let mut list = match self.conns.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if list.len() >= MAX_RECORDED_DENIALS {
            self.records_dropped.fetch_add(1, Ordering::Relaxed);
            return (bytes, None);
        }
        list.push((c, bytes.clone()));
        (bytes, Some(list.len() - 1))
    }

    /// Marks connection `i` as cut for `reason` (the byte cap, an SNI
    /// refused after the connection was let through).
    pub(crate) fn cut(&self, i: Option<usize>, reason: DenyReason) {
        let Some(i) = i else { return };
        let mut list = match self.conns.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((c, _)) = list.get_mut(i) {
            c.reason = Some(reason);
        }
    }

    pub(crate) fn dns_query(&self, d: DnsRecord) {
        push_bounded(&self.dns, d, &self.records_dropped);
    }

    pub(crate) fn connections(&self) -> Vec<ConnRecord> {
        let list = match self.conns.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        list.iter()
            .map(|(c, b)| ConnRecord {
                bytes_up: b.up.load(Ordering::Relaxed),
                bytes_down: b.down.load(Ordering::Relaxed),
                ..c.clone()
            })
            .collect()
    }

    pub(crate) fn dns_queries(&self) -> Vec<DnsRecord> {
        snapshot(&self.dns)
    }

    pub(crate) fn denials(&self) -> Vec<Denial> {
        match self.denials.lock() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepted: g(&self.accepted),
            allowed: g(&self.allowed),
            denied: g(&self.denied),
            active: g(&self.active),
            peak_active: g(&self.peak_active),
            bytes_up: g(&self.bytes_up),
            bytes_down: g(&self.bytes_down),
            protocol_errors: g(&self.protocol_errors),
            denials_dropped: g(&self.denials_dropped),
            intercepted: g(&self.intercepted),
        }
    }

    /// Reserves up to `n` bytes against `max`; returns how many may pass
    /// (less than `n` when the cap is reached).
    pub(crate) fn reserve_bytes(&self, n: u64, max: u64) -> u64 {
        let mut granted = 0;
        let _ = self
            .bytes_total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                granted = n.min(max.saturating_sub(used));
                Some(used + granted)
            });
        granted
    }

    pub(crate) fn bytes_exhausted(&self, max: u64) -> bool {
        self.bytes_total.load(Ordering::Relaxed) >= max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_list_is_bounded() {
        let r = Recorder::default();
        for _ in 0..MAX_RECORDED_DENIALS + 5 {
            r.deny("x".into(), 1, Protocol::Socks5, DenyReason::HostNotAllowed);
        }
        assert_eq!(r.denials().len(), MAX_RECORDED_DENIALS);
        let s = r.stats();
        assert_eq!(s.denied, (MAX_RECORDED_DENIALS + 5) as u64);
        assert_eq!(s.denials_dropped, 5);
    }

    #[test]
    fn byte_reservation_stops_at_cap() {
        let r = Recorder::default();
        assert_eq!(r.reserve_bytes(60, 100), 60);
        assert_eq!(r.reserve_bytes(60, 100), 40);
        assert!(r.bytes_exhausted(100));
        assert_eq!(r.reserve_bytes(1, 100), 0);
    }

    #[test]
    fn denial_serialises_for_json_output() {
        let d = Denial {
            destination: "evil.test".into(),
            port: 443,
            reason: DenyReason::SpecialAddress {
                address: "169.254.169.254".parse().unwrap(),
                class: AddrClass::LinkLocal,
            },
            protocol: Protocol::HttpConnect,
            at: UNIX_EPOCH + Duration::from_millis(1234),
        };
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"destination":"evil.test","port":443,"reason":{"kind":"special_address","address":"169.254.169.254","class":"link_local"},"protocol":"http_connect","at":1234}"#
        );
    }
}
