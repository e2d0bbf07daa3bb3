//! The network policy: a mode, host rules and CIDR rules, parsed from the CLI
//! strings `--network none|allowlist|open`, `--allow-host HOST[:PORT]` and
//! `--allow-cidr CIDR[:PORT]`, and the pure decision functions the proxy uses.
//!
//! # Semantics
//!
//! * **Modes.** `none` refuses every destination. `allowlist` allows only
//!   destinations matched by a rule. `open` allows any destination name and
//!   port — but special-purpose addresses (loopback, link-local/metadata,
//!   private, multicast, ...) stay refused in every mode unless a rule
//!   allowlists them explicitly: "open" means "the internet", not "the
//!   host's loopback services or the cloud metadata endpoint".
//! * **Host rules** (`--allow-host`): an exact name (`api.example.com`), a
//!   wildcard (`*.example.com`) or a literal IP (`10.1.2.3`, `[fd00::1]`),
//!   with an optional `:PORT`. Without a port, a host rule allows ports **80
//!   and 443** only. Names are compared case-insensitively, a trailing dot is
//!   ignored.
//! * **Wildcards.** `*.example.com` matches every name *below* `example.com`
//!   at any depth (`a.example.com`, `a.b.example.com`) but **not**
//!   `example.com` itself — list both if both are wanted. The `*` must be the
//!   whole leftmost label, and the rest must have at least two labels
//!   (`*.com` and a bare `*` are refused as too broad; use `--network open`).
//! * **CIDR rules** (`--allow-cidr`): `10.0.0.0/8`, `10.0.0.0/8:5432`,
//!   `fd00::/8:5432` (or `[fd00::/8]:5432`). Without a port a CIDR rule
//!   allows **every** port. Host bits must be zero (`10.0.0.1/8` is refused
//!   with a suggestion). IPv4-mapped IPv6 networks are stored as IPv4.
//! * **Direct-IP destinations** (a client asks for `1.2.3.4:443`): in
//!   `allowlist` mode only a CIDR rule or a literal-IP host rule allows them;
//!   a name rule never does.
//! * **Resolved addresses.** A name that a host rule allows is resolved by
//!   the proxy; each resolved address that is special-purpose must also be
//!   allowlisted *explicitly*: by a literal-IP host rule equal to it, or by a
//!   CIDR rule containing it that is at least as narrow as the special block
//!   the address falls in. So `127.0.0.0/8` unblocks loopback and
//!   `169.254.169.254/32` unblocks the metadata address, but a broad rule like
//!   `0.0.0.0/0` only ever matches public addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::addr::{canonical, prefix_eq, special_class};
use crate::record::DenyReason;

/// Ports a host rule without an explicit `:PORT` allows.
pub const DEFAULT_HOST_PORTS: [u16; 2] = [80, 443];

/// An error in a policy string (`--network`, `--allow-host`, `--allow-cidr`
/// or the matching config keys).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `--network` got something other than `none`, `allowlist`, `open`.
    #[error("unknown network mode `{input}`: use one of `none`, `allowlist`, `open`")]
    UnknownMode {
        /// What was given.
        input: String,
    },
    /// The host part of `--allow-host` is empty.
    #[error("empty host in `{input}`: write HOST or HOST:PORT, e.g. `api.example.com:443`")]
    EmptyHost {
        /// What was given.
        input: String,
    },
    /// A host name is not a valid DNS name.
    #[error("invalid host name in `{input}`: {reason}")]
    InvalidHostName {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `*` somewhere else than as the whole leftmost label.
    #[error(
        "misplaced wildcard in `{input}`: only a leading `*.` is supported, e.g. `*.example.com`"
    )]
    WildcardPlacement {
        /// What was given.
        input: String,
    },
    /// A wildcard over a single label (`*.com`) or a bare `*`.
    #[error("wildcard `{input}` is too broad: it must name at least two labels after `*.` (e.g. `*.example.com`); use `--network open` to allow every host")]
    WildcardTooBroad {
        /// What was given.
        input: String,
    },
    /// The port is not a number in 1..=65535.
    #[error("invalid port `{port}` in `{input}`: ports are numbers from 1 to 65535")]
    InvalidPort {
        /// What was given.
        input: String,
        /// The port part.
        port: String,
    },
    /// An IPv6 address without brackets and with a port, or similar.
    #[error("ambiguous IPv6 address in `{input}`: put it in brackets, e.g. `[2001:db8::1]:443`")]
    UnbracketedIpv6 {
        /// What was given.
        input: String,
    },
    /// A CIDR without `/LEN`.
    #[error("missing prefix length in `{input}`: write ADDRESS/LEN[:PORT], e.g. `{suggestion}`")]
    MissingPrefix {
        /// What was given.
        input: String,
        /// A corrected form.
        suggestion: String,
    },
    /// A CIDR's address part does not parse.
    #[error("invalid address `{addr}` in `{input}`: expected an IPv4 or IPv6 address")]
    InvalidAddress {
        /// What was given.
        input: String,
        /// The address part.
        addr: String,
    },
    /// A CIDR's prefix length is not a number or too long for the family.
    #[error("invalid prefix length `{prefix}` in `{input}`: at most 32 for IPv4 and 128 for IPv6")]
    InvalidPrefix {
        /// What was given.
        input: String,
        /// The prefix part.
        prefix: String,
    },
    /// A CIDR with host bits set (`10.0.0.1/8`).
    #[error("`{input}` has host bits set: did you mean `{suggestion}`?")]
    HostBitsSet {
        /// What was given.
        input: String,
        /// The network with host bits cleared.
        suggestion: String,
    },
}

/// The network mode of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No egress at all (loopback inside the sandbox only). The default.
    #[default]
    None,
    /// Egress only to destinations matched by a host or CIDR rule.
    Allowlist,
    /// Egress to any public destination (explicit opt-in; callers should warn).
    Open,
}

impl FromStr for NetworkMode {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(NetworkMode::None),
            "allowlist" => Ok(NetworkMode::Allowlist),
            "open" => Ok(NetworkMode::Open),
            _ => Err(PolicyError::UnknownMode {
                input: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkMode::None => "none",
            NetworkMode::Allowlist => "allowlist",
            NetworkMode::Open => "open",
        })
    }
}

/// What a host rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Exactly this (normalised, lower-case) name.
    Exact(String),
    /// Any name strictly below this suffix (`*.example.com` is stored as
    /// `example.com`).
    Wildcard(String),
    /// This literal address (canonical form).
    Ip(IpAddr),
}

impl HostPattern {
    /// Whether this pattern matches the normalised name `name`.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(n) => n == name,
            HostPattern::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            HostPattern::Ip(_) => false,
        }
    }
}

/// One `--allow-host HOST[:PORT]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostRule {
    /// What it matches.
    pub pattern: HostPattern,
    /// The port; `None` means [`DEFAULT_HOST_PORTS`] (80 and 443).
    pub port: Option<u16>,
}

impl HostRule {
    /// Whether this rule allows `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        match self.port {
            Some(p) => p == port,
            None => DEFAULT_HOST_PORTS.contains(&port),
        }
    }
}

/// An IP network (address and prefix length, host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn left_aligned(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Cidr {
    /// A network; fails if `prefix` is too long for the family or host bits
    /// are set. IPv4-mapped IPv6 networks (`::ffff:0:0/96` and narrower) are
    /// stored as IPv4.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, (IpAddr, u8)> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => {
                (canonical(addr), prefix - 96)
            }
            other => (other, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err((addr, prefix));
        }
        let network = Self::mask(addr, prefix);
        if network != addr {
            return Err((network, prefix));
        }
        Ok(Cidr { addr, prefix })
    }

    fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
        match addr {
            IpAddr::V4(v4) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix))
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
            }
            IpAddr::V6(v6) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix))
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
            }
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `addr` (canonicalised) is inside this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        addr.is_ipv4() == self.addr.is_ipv4()
            && prefix_eq(left_aligned(addr), left_aligned(self.addr), self.prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One `--allow-cidr CIDR[:PORT]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CidrRule {
    /// The network.
    pub cidr: Cidr,
    /// The port; `None` means every port.
    pub port: Option<u16>,
}

impl CidrRule {
    /// Whether this rule allows `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// The network policy of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// The mode.
    #[serde(default)]
    pub mode: NetworkMode,
    /// `--allow-host` rules.
    #[serde(default)]
    pub hosts: Vec<HostRule>,
    /// `--allow-cidr` rules.
    #[serde(default)]
    pub cidrs: Vec<CidrRule>,
}

/// A destination as a client asked for it: a (normalised) name or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-case, without trailing dot.
    Name(String),
    /// A literal address (canonical form).
    Ip(IpAddr),
}

impl Host {
    /// Parses a destination host as received from a client (a name, an IPv4
    /// address, or an IPv6 address with or without brackets). Names that are
    /// not valid DNS names — including numeric forms such as `127.1` or
    /// `0x7f.1` that some resolvers would turn into addresses — are refused.
    pub fn parse(s: &str) -> Result<Host, &'static str> {
        let inner = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Ok(Host::Ip(canonical(ip)));
        }
        if inner.len() != s.len() {
            return Err("bracketed host is not an IPv6 address");
        }
        normalize_name(s).map(Host::Name)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Lower-cases and validates a DNS name (strips one trailing dot).
pub fn normalize_name(s: &str) -> Result<String, &'static str> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err("the name is empty");
    }
    if s.len() > 253 {
        return Err("the name is longer than 253 characters");
    }
    if !s.is_ascii() {
        return Err("the name is not ASCII (write internationalised names in punycode, xn--...)");
    }
    let name = s.to_ascii_lowercase();
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err("the name has an empty label (`..`)");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, `-` and `_` are allowed in a label");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with `-`");
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the last label is numeric (not a name; write IP addresses in dotted or bracketed form)");
    }
    Ok(name)
}

fn parse_port(input: &str, port: &str) -> Result<u16, PolicyError> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('+') => Ok(p),
        _ => Err(PolicyError::InvalidPort {
            input: input.to_string(),
            port: port.to_string(),
        }),
    }
}

impl FromStr for HostRule {
    type Err = PolicyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').ok_or(PolicyError::UnbracketedIpv6 {
                input: input.to_string(),
            })?;
            let ip = addr
                .parse::<Ipv6Addr>()
                .map_err(|_| PolicyError::InvalidAddress {
                    input: input.to_string(),
                    addr: addr.to_string(),
                })?;
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(parse_port(input, p)?),
                    None => {
                        return Err(PolicyError::InvalidPort {
                            input: input.to_string(),
                            port: p.to_string(),
                        })
                    }
                },
            };
            return Ok(HostRule {
                pattern: HostPattern::Ip(canonical(IpAddr::V6(ip))),
                port,
            });
        } else if s.matches(':').count() > 1 {
            return match s.parse::<Ipv6Addr>() {
                Ok(ip) => Ok(HostRule {
                    pattern: HostPattern::Ip(canonical(IpAddr::V6(ip))),
                    port: None,
                }),
                Err(_) => Err(PolicyError::UnbracketedIpv6 {
                    input: input.to_string(),
                }),
            };
        } else if let Some((h, p)) = s.rsplit_once(':') {
            (h, Some(parse_port(input, p)?))
        } else {
            (s, None)
        };
        if host.is_empty() {
            return Err(PolicyError::EmptyHost {
                input: input.to_string(),
            });
        }
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Ok(HostRule {
                pattern: HostPattern::Ip(IpAddr::V4(ip)),
                port,
            });
        }
        let pattern = if host == "*" {
            return Err(PolicyError::WildcardTooBroad {
                input: input.to_string(),
            });
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(PolicyError::WildcardPlacement {
                    input: input.to_string(),
                });
            }
            let suffix = normalize_name(suffix).map_err(|reason| PolicyError::InvalidHostName {
                input: input.to_string(),
                reason,
            })?;
            if !suffix.contains('.') {
                return Err(PolicyError::WildcardTooBroad {
                    input: input.to_string(),
                });
            }
            HostPattern::Wildcard(suffix)
        } else if host.contains('*') {
            return Err(PolicyError::WildcardPlacement {
                input: input.to_string(),
            });
        } else {
            HostPattern::Exact(normalize_name(host).map_err(|reason| {
                PolicyError::InvalidHostName {
                    input: input.to_string(),
                    reason,
                }
            })?)
        };
        Ok(HostRule { pattern, port })
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pattern {
            HostPattern::Exact(n) => f.write_str(n)?,
            HostPattern::Wildcard(s) => write!(f, "*.{s}")?,
            HostPattern::Ip(IpAddr::V4(ip)) => write!(f, "{ip}")?,
            HostPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for CidrRule {
    type Err = PolicyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or(PolicyError::UnbracketedIpv6 {
                input: input.to_string(),
            })?;
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(parse_port(input, p)?),
                    None => {
                        return Err(PolicyError::InvalidPort {
                            input: input.to_string(),
                            port: p.to_string(),
                        })
                    }
                },
            };
            (net, port)
        } else if let Some((addr, rest)) = s.split_once('/') {
            match rest.split_once(':') {
                Some((prefix, p)) => {
                    // `net` must still contain the prefix; rebuild it.
                    let port = parse_port(input, p)?;
                    let len = addr.len() + 1 + prefix.len();
                    (&s[..len], Some(port))
                }
                None => (s, None),
            }
        } else {
            let suggestion = match s.rsplit_once(':') {
                Some((a, p)) if a.parse::<Ipv4Addr>().is_ok() => format!("{a}/32:{p}"),
                _ if s.parse::<Ipv4Addr>().is_ok() => format!("{s}/32"),
                _ if s.parse::<Ipv6Addr>().is_ok() => format!("{s}/128"),
                _ => "10.0.0.0/8:5432".to_string(),
            };
            return Err(PolicyError::MissingPrefix {
                input: input.to_string(),
                suggestion,
            });
        };
        let (addr, prefix) = net
            .split_once('/')
            .ok_or_else(|| PolicyError::MissingPrefix {
                input: input.to_string(),
                suggestion: format!("[{net}/128]"),
            })?;
        let ip = addr
            .parse::<IpAddr>()
            .map_err(|_| PolicyError::InvalidAddress {
                input: input.to_string(),
                addr: addr.to_string(),
            })?;
        let len = prefix
            .parse::<u8>()
            .ok()
            .filter(|_| !prefix.starts_with('+'))
            .ok_or_else(|| PolicyError::InvalidPrefix {
                input: input.to_string(),
                prefix: prefix.to_string(),
            })?;
        let cidr = Cidr::new(ip, len).map_err(|(network, len)| {
            let max = if network.is_ipv4() { 32 } else { 128 };
            if len > max {
                PolicyError::InvalidPrefix {
                    input: input.to_string(),
                    prefix: prefix.to_string(),
                }
            } else {
                PolicyError::HostBitsSet {
                    input: input.to_string(),
                    suggestion: match port {
                        Some(p) => format!("{network}/{len}:{p}"),
                        None => format!("{network}/{len}"),
                    },
                }
            }
        })?;
        Ok(CidrRule { cidr, port })
    }
}

impl fmt::Display for CidrRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(HostRule);
serde_via_str!(CidrRule);

impl NetworkPolicy {
    /// A policy in `allowlist` mode built from CLI strings.
    pub fn allowlist<H, C>(hosts: H, cidrs: C) -> Result<NetworkPolicy, PolicyError>
    where
        H: IntoIterator,
        H::Item: AsRef<str>,
        C: IntoIterator,
        C::Item: AsRef<str>,
    {
        Ok(NetworkPolicy {
            mode: NetworkMode::Allowlist,
            hosts: hosts
                .into_iter()
                .map(|h| h.as_ref().parse())
                .collect::<Result<_, _>>()?,
            cidrs: cidrs
                .into_iter()
                .map(|c| c.as_ref().parse())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether an explicit rule (literal-IP host rule, or a CIDR rule at
    /// least `min_prefix` long) allows `addr:port`. Returns `Err(true)` if a
    /// rule covers the address but not the port.
    fn ip_rule(&self, addr: IpAddr, port: u16, min_prefix: u8) -> Result<(), bool> {
        let mut other_port = false;
        for rule in &self.hosts {
            if rule.pattern == HostPattern::Ip(addr) {
                if rule.allows_port(port) {
                    return Ok(());
                }
                other_port = true;
            }
        }
        for rule in &self.cidrs {
            if rule.cidr.prefix() >= min_prefix && rule.cidr.contains(addr) {
                if rule.allows_port(port) {
                    return Ok(());
                }
                other_port = true;
            }
        }
        Err(other_port)
    }

    /// The rule that admits a connection to `addr:port` made for `name`
    /// (the name the client asked for, or the one the sandbox's DNS vouched
    /// for the address), as its text (`api.example.com:443`,
    /// `10.0.0.0/8`, `open`), or why none does. The proxy keeps it with
    /// every open connection: a policy update closes the connections whose
    /// admission no rule of the new policy grants any more.
    pub fn admitting_rule(
        &self,
        name: Option<&str>,
        addr: IpAddr,
        port: u16,
    ) -> Result<String, DenyReason> {
        let addr = canonical(addr);
        let rule = match (self.mode, name) {
            (NetworkMode::None, _) => return Err(DenyReason::NetworkDisabled),
            (NetworkMode::Open, _) => "open".to_string(),
            (NetworkMode::Allowlist, Some(n)) => {
                self.check_destination(&Host::Name(n.to_string()), port)?;
                self.hosts
                    .iter()
                    .find(|r| r.pattern.matches_name(n) && r.allows_port(port))
                    .map(ToString::to_string)
                    .ok_or(DenyReason::HostNotAllowed)?
            }
            (NetworkMode::Allowlist, None) => {
                self.check_destination(&Host::Ip(addr), port)?;
                self.ip_rule_text(addr, port)
                    .ok_or(DenyReason::AddressNotAllowed)?
            }
        };
        self.check_address(addr, port)?;
        Ok(rule)
    }

    /// The text of the first literal-IP or CIDR rule allowing `addr:port`.
    fn ip_rule_text(&self, addr: IpAddr, port: u16) -> Option<String> {
        let host = self
            .hosts
            .iter()
            .find(|r| r.pattern == HostPattern::Ip(addr) && r.allows_port(port))
            .map(ToString::to_string);
        host.or_else(|| {
            self.cidrs
                .iter()
                .find(|r| r.cidr.contains(addr) && r.allows_port(port))
                .map(ToString::to_string)
        })
    }

    /// Stage one: may the client ask for `host:port` at all? (Mode, host
    /// rules with their ports; for a literal address, the CIDR and literal-IP
    /// rules.) Resolution and [`check_address`](Self::check_address) follow.
    pub fn check_destination(&self, host: &Host, port: u16) -> Result<(), DenyReason> {
        match self.mode {
            NetworkMode::None => Err(DenyReason::NetworkDisabled),
            NetworkMode::Open => Ok(()),
            NetworkMode::Allowlist => match host {
                Host::Name(name) => {
                    let mut matched = false;
                    for rule in &self.hosts {
                        if rule.pattern.matches_name(name) {
                            if rule.allows_port(port) {
                                return Ok(());
                            }
                            matched = true;
                        }
                    }
                    Err(if matched {
                        DenyReason::PortNotAllowed
                    } else {
                        DenyReason::HostNotAllowed
                    })
                }
                Host::Ip(ip) => self.ip_rule(canonical(*ip), port, 0).map_err(|other_port| {
                    if other_port {
                        DenyReason::PortNotAllowed
                    } else {
                        DenyReason::AddressNotAllowed
                    }
                }),
            },
        }
    }

    /// The ports the policy allows for `name` (through any host rule that
    /// matches it), or `Err(HostNotAllowed)`. In `open` mode every port.
    /// The sandbox's DNS answers only names for which this is `Ok`.
    pub fn name_ports(&self, name: &str) -> Result<Vec<u16>, DenyReason> {
        match self.mode {
            NetworkMode::None => Err(DenyReason::NetworkDisabled),
            NetworkMode::Open => Ok(Vec::new()),
            NetworkMode::Allowlist => {
                let mut ports = Vec::new();
                for rule in self.hosts.iter().filter(|r| r.pattern.matches_name(name)) {
                    match rule.port {
                        Some(p) => ports.push(p),
                        None => ports.extend_from_slice(&DEFAULT_HOST_PORTS),
                    }
                }
                if ports.is_empty() {
                    return Err(DenyReason::HostNotAllowed);
                }
                ports.sort_unstable();
                ports.dedup();
                Ok(ports)
            }
        }
    }

    /// Whether `addr` may be reached on at least one of `ports` (any port
    /// when `ports` is empty: checked as a public address would be), i.e.
    /// whether the sandbox's DNS may hand it out for a name with those
    /// ports.
    pub fn check_address_any(&self, addr: IpAddr, ports: &[u16]) -> Result<(), DenyReason> {
        if ports.is_empty() {
            return self.check_address(addr, 0);
        }
        let mut first = None;
        for &p in ports {
            match self.check_address(addr, p) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or(DenyReason::AddressNotAllowed))
    }

    /// Stage two: may the proxy connect to `addr:port` (an address `host`
    /// resolved to, or `host` itself)? Special-purpose addresses need an
    /// explicit rule (see the module documentation).
    pub fn check_address(&self, addr: IpAddr, port: u16) -> Result<(), DenyReason> {
        if self.mode == NetworkMode::None {
            return Err(DenyReason::NetworkDisabled);
        }
        let addr = canonical(addr);
        match special_class(addr) {
            None => Ok(()),
            Some(special) => self.ip_rule(addr, port, special.block_prefix).map_err(|_| {
                DenyReason::SpecialAddress {
                    address: addr,
                    class: special.class,
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::AddrClass;

    fn host(s: &str) -> HostRule {
        s.parse().unwrap()
    }
    fn cidr(s: &str) -> CidrRule {
        s.parse().unwrap()
    }
    fn name(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    #[test]
    fn names_the_rule_that_admits_a_connection() {
        let p = NetworkPolicy::allowlist(["*.example.com", "db.test:5432"], ["10.9.0.0/16:80"])
            .unwrap();
        let pub_ip: IpAddr = "93.184.216.34".parse().unwrap();
        assert_eq!(
            p.admitting_rule(Some("api.example.com"), pub_ip, 443),
            Ok("*.example.com".into())
        );
        assert_eq!(
            p.admitting_rule(Some("api.example.com"), pub_ip, 22),
            Err(DenyReason::PortNotAllowed)
        );
        let private: IpAddr = "10.9.1.2".parse().unwrap();
        assert_eq!(
            p.admitting_rule(None, private, 80),
            Ok("10.9.0.0/16:80".into())
        );
        // A name allowed, its address special and not covered: refused.
        assert!(matches!(
            p.admitting_rule(Some("db.test"), "127.0.0.1".parse().unwrap(), 5432),
            Err(DenyReason::SpecialAddress { .. })
        ));
        let none = NetworkPolicy::default();
        assert_eq!(
            none.admitting_rule(None, pub_ip, 80),
            Err(DenyReason::NetworkDisabled)
        );
    }

    #[test]
    fn parses_host_rules() {
        assert_eq!(
            host("API.Example.com."),
            HostRule {
                pattern: HostPattern::Exact("api.example.com".into()),
                port: None
            }
        );
        assert_eq!(host("api.example.com:8443").port, Some(8443));
        assert_eq!(
            host("*.example.com").pattern,
            HostPattern::Wildcard("example.com".into())
        );
        assert_eq!(
            host("10.1.2.3:5432"),
            HostRule {
                pattern: HostPattern::Ip("10.1.2.3".parse().unwrap()),
                port: Some(5432)
            }
        );
        assert_eq!(
            host("[::1]:443").pattern,
            HostPattern::Ip("::1".parse().unwrap())
        );
        assert_eq!(host("[::1]:443").port, Some(443));
        assert_eq!(
            host("fd00::1").pattern,
            HostPattern::Ip("fd00::1".parse().unwrap())
        );
        assert_eq!(
            host("[::ffff:10.0.0.1]").pattern,
            HostPattern::Ip("10.0.0.1".parse().unwrap())
        );
        for s in [
            "api.example.com",
            "*.example.com:8443",
            "[::1]:443",
            "10.1.2.3",
        ] {
            assert_eq!(host(s).to_string(), s);
        }
    }

    #[test]
    fn host_rule_errors() {
        let err = |s: &str| s.parse::<HostRule>().unwrap_err();
        assert!(matches!(err(""), PolicyError::EmptyHost { .. }));
        assert!(matches!(err(":443"), PolicyError::EmptyHost { .. }));
        assert!(matches!(err("a.com:0"), PolicyError::InvalidPort { .. }));
        assert!(matches!(
            err("a.com:65536"),
            PolicyError::InvalidPort { .. }
        ));
        assert!(matches!(err("a.com:http"), PolicyError::InvalidPort { .. }));
        assert!(matches!(err("a.com:+1"), PolicyError::InvalidPort { .. }));
        assert!(matches!(err("*"), PolicyError::WildcardTooBroad { .. }));
        assert!(matches!(err("*.com"), PolicyError::WildcardTooBroad { .. }));
        assert!(matches!(
            err("api.*.com"),
            PolicyError::WildcardPlacement { .. }
        ));
        assert!(matches!(
            err("*api.com"),
            PolicyError::WildcardPlacement { .. }
        ));
        assert!(matches!(
            err("*.*.api.com"),
            PolicyError::WildcardPlacement { .. }
        ));
        assert!(matches!(err("a..com"), PolicyError::InvalidHostName { .. }));
        assert!(matches!(
            err("a b.com"),
            PolicyError::InvalidHostName { .. }
        ));
        assert!(matches!(err("-a.com"), PolicyError::InvalidHostName { .. }));
        assert!(matches!(err("127.1"), PolicyError::InvalidHostName { .. }));
        assert!(matches!(
            err("bücher.de"),
            PolicyError::InvalidHostName { .. }
        ));
        assert!(matches!(
            err("fd00::1:443x"),
            PolicyError::UnbracketedIpv6 { .. }
        ));
        assert!(matches!(
            err("[fd00::1"),
            PolicyError::UnbracketedIpv6 { .. }
        ));
        assert!(matches!(
            err("[fd00::1]443"),
            PolicyError::InvalidPort { .. }
        ));
        // Messages say how to fix it.
        assert!(err("*.com").to_string().contains("--network open"));
        assert!(err("fd00::1:443x")
            .to_string()
            .contains("[2001:db8::1]:443"));
    }

    #[test]
    fn parses_cidr_rules() {
        let r = cidr("10.0.0.0/8:5432");
        assert_eq!(r.cidr.to_string(), "10.0.0.0/8");
        assert_eq!(r.port, Some(5432));
        assert_eq!(cidr("10.0.0.0/8").port, None);
        assert_eq!(cidr("fd00::/8:5432").port, Some(5432));
        assert_eq!(cidr("fd00::/8:5432").cidr.prefix(), 8);
        assert_eq!(cidr("[fd00::/8]:5432"), cidr("fd00::/8:5432"));
        assert_eq!(cidr("[::1/128]"), cidr("::1/128"));
        assert_eq!(cidr("::ffff:127.0.0.0/104"), cidr("127.0.0.0/8"));
        assert_eq!(cidr("0.0.0.0/0").cidr.prefix(), 0);
        for s in ["10.0.0.0/8:5432", "fd00::/8:5432", "127.0.0.1/32", "::/0"] {
            assert_eq!(cidr(s).to_string(), s);
        }
    }

    #[test]
    fn cidr_rule_errors() {
        let err = |s: &str| s.parse::<CidrRule>().unwrap_err();
        match err("10.0.0.1/8") {
            PolicyError::HostBitsSet { suggestion, .. } => assert_eq!(suggestion, "10.0.0.0/8"),
            e => panic!("{e:?}"),
        }
        match err("10.0.0.1/8:5432") {
            PolicyError::HostBitsSet { suggestion, .. } => {
                assert_eq!(suggestion, "10.0.0.0/8:5432")
            }
            e => panic!("{e:?}"),
        }
        match err("10.1.2.3:5432") {
            PolicyError::MissingPrefix { suggestion, .. } => {
                assert_eq!(suggestion, "10.1.2.3/32:5432")
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            err("10.0.0.0/33"),
            PolicyError::InvalidPrefix { .. }
        ));
        assert!(matches!(err("::/129"), PolicyError::InvalidPrefix { .. }));
        assert!(matches!(
            err("10.0.0.0/x"),
            PolicyError::InvalidPrefix { .. }
        ));
        assert!(matches!(
            err("10.0.0.0/8:0"),
            PolicyError::InvalidPort { .. }
        ));
        assert!(matches!(
            err("example.com/8"),
            PolicyError::InvalidAddress { .. }
        ));
        assert!(matches!(
            err("[fd00::/8"),
            PolicyError::UnbracketedIpv6 { .. }
        ));
        assert!(err("10.0.0.1/8").to_string().contains("did you mean"));
    }

    #[test]
    fn modes() {
        assert_eq!("none".parse::<NetworkMode>().unwrap(), NetworkMode::None);
        assert_eq!(
            "Allowlist".parse::<NetworkMode>().unwrap(),
            NetworkMode::Allowlist
        );
        assert_eq!("open".parse::<NetworkMode>().unwrap(), NetworkMode::Open);
        assert!(matches!(
            "bridge".parse::<NetworkMode>(),
            Err(PolicyError::UnknownMode { .. })
        ));
        assert_eq!(NetworkMode::default(), NetworkMode::None);
    }

    #[test]
    fn wildcard_does_not_match_apex() {
        let p = host("*.example.com").pattern;
        assert!(p.matches_name("a.example.com"));
        assert!(p.matches_name("a.b.example.com"));
        assert!(!p.matches_name("example.com"));
        assert!(!p.matches_name("badexample.com"));
        assert!(!p.matches_name("example.com.evil"));
        assert!(!p.matches_name(".example.com"));
    }

    #[test]
    fn destination_checks() {
        let p = NetworkPolicy::allowlist(
            ["api.test", "*.pkg.test", "db.test:5432", "10.9.9.9:8080"],
            ["10.0.0.0/8:5432", "192.0.2.0/24"],
        )
        .unwrap();
        assert_eq!(p.check_destination(&name("api.test"), 443), Ok(()));
        assert_eq!(p.check_destination(&name("API.test."), 80), Ok(()));
        assert_eq!(
            p.check_destination(&name("api.test"), 8080),
            Err(DenyReason::PortNotAllowed)
        );
        assert_eq!(
            p.check_destination(&name("other.test"), 443),
            Err(DenyReason::HostNotAllowed)
        );
        assert_eq!(p.check_destination(&name("x.pkg.test"), 443), Ok(()));
        assert_eq!(
            p.check_destination(&name("pkg.test"), 443),
            Err(DenyReason::HostNotAllowed)
        );
        assert_eq!(p.check_destination(&name("db.test"), 5432), Ok(()));
        assert_eq!(
            p.check_destination(&name("db.test"), 443),
            Err(DenyReason::PortNotAllowed)
        );
        // Direct IPs: only CIDR / literal-IP rules.
        assert_eq!(p.check_destination(&name("10.1.1.1"), 5432), Ok(()));
        assert_eq!(
            p.check_destination(&name("10.1.1.1"), 22),
            Err(DenyReason::PortNotAllowed)
        );
        assert_eq!(p.check_destination(&name("10.9.9.9"), 8080), Ok(()));
        assert_eq!(
            p.check_destination(&name("8.8.8.8"), 443),
            Err(DenyReason::AddressNotAllowed)
        );
        assert_eq!(p.check_destination(&name("192.0.2.7"), 1), Ok(()));
        // Mode none refuses everything; open allows every name.
        let none = NetworkPolicy::default();
        assert_eq!(
            none.check_destination(&name("api.test"), 443),
            Err(DenyReason::NetworkDisabled)
        );
        assert_eq!(
            none.check_address("8.8.8.8".parse().unwrap(), 443),
            Err(DenyReason::NetworkDisabled)
        );
        let open = NetworkPolicy {
            mode: NetworkMode::Open,
            ..Default::default()
        };
        assert_eq!(open.check_destination(&name("anything.test"), 1234), Ok(()));
    }

    #[test]
    fn special_addresses_need_explicit_narrow_rules() {
        let loopback = |p: &NetworkPolicy, a: &str, port| p.check_address(a.parse().unwrap(), port);
        let p = NetworkPolicy::allowlist(["api.test"], ["0.0.0.0/0", "::/0"]).unwrap();
        for a in [
            "127.0.0.1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "10.0.0.1",
            "::1",
            "fe80::1",
        ] {
            assert!(
                matches!(loopback(&p, a, 443), Err(DenyReason::SpecialAddress { .. })),
                "{a} must need an explicit rule"
            );
        }
        assert_eq!(loopback(&p, "93.184.216.34", 443), Ok(()));
        let p = NetworkPolicy::allowlist(
            ["api.test", "169.254.169.254:80"],
            ["127.0.0.0/8", "10.0.0.0/8:5432", "::1/128"],
        )
        .unwrap();
        assert_eq!(loopback(&p, "127.0.0.2", 443), Ok(()));
        assert_eq!(loopback(&p, "::ffff:127.0.0.2", 1), Ok(()));
        assert_eq!(loopback(&p, "::1", 443), Ok(()));
        assert_eq!(loopback(&p, "169.254.169.254", 80), Ok(()));
        assert_eq!(
            loopback(&p, "169.254.169.254", 443),
            Err(DenyReason::SpecialAddress {
                address: "169.254.169.254".parse().unwrap(),
                class: AddrClass::LinkLocal
            })
        );
        assert_eq!(loopback(&p, "10.2.3.4", 5432), Ok(()));
        assert!(loopback(&p, "10.2.3.4", 443).is_err());
        assert!(loopback(&p, "192.168.0.1", 443).is_err());
    }

    #[test]
    fn serde_roundtrip() {
        let p =
            NetworkPolicy::allowlist(["*.example.com", "[::1]:8080"], ["10.0.0.0/8:5432"]).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"mode":"allowlist","hosts":["*.example.com","[::1]:8080"],"cidrs":["10.0.0.0/8:5432"]}"#
        );
        let back: NetworkPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        let bad = serde_json::from_str::<NetworkPolicy>(r#"{"hosts":["*.com"]}"#).unwrap_err();
        assert!(bad.to_string().contains("too broad"));
    }
}
