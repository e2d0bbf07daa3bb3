//! IP address classification: which addresses are "special-purpose" (loopback,
//! link-local, private, multicast, ...) and therefore refused unless a rule
//! allowlists them explicitly.
//!
//! The classification is table-driven (see [`special_class`]); IPv4-mapped IPv6
//! addresses (`::ffff:a.b.c.d`) are canonicalised to IPv4 first, and the IPv4
//! address embedded in NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses
//! is classified as well, so `::ffff:127.0.0.1` or `64:ff9b::a9fe:a9fe` are no
//! way around the checks.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Why an address is special-purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddrClass {
    /// `0.0.0.0/8`, `::/128`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `169.254.0.0/16` (includes the cloud metadata address
    /// 169.254.169.254), `fe80::/10`.
    LinkLocal,
    /// `10/8`, `172.16/12`, `192.168/16`, `fc00::/7` (includes AWS's
    /// `fd00:ec2::254`), `fec0::/10`, `64:ff9b:1::/48`.
    Private,
    /// `100.64.0.0/10` (carrier-grade NAT shared space).
    SharedCgnat,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// Documentation ranges (`192.0.2/24`, `198.51.100/24`, `203.0.113/24`,
    /// `2001:db8::/32`).
    Documentation,
    /// Other reserved or special-purpose blocks (`192.0.0.0/24` — includes
    /// the 192.0.0.192 metadata address some clouds use —, `198.18/15`,
    /// `240/4`, `192.88.99/24`, `::/96`, `100::/64`, `2001::/32`, ...).
    Reserved,
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrClass::Unspecified => "unspecified",
            AddrClass::Loopback => "loopback",
            AddrClass::LinkLocal => "link-local (includes cloud metadata 169.254.169.254)",
            AddrClass::Private => "private",
            AddrClass::SharedCgnat => "carrier-grade NAT (100.64.0.0/10)",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Documentation => "documentation",
            AddrClass::Reserved => "reserved",
        })
    }
}

/// The result of classifying a special-purpose address: its class and the
/// prefix length of the special block it falls in. A CIDR rule allowlists
/// such an address explicitly only if it is at least that narrow (so
/// `127.0.0.0/8` unblocks loopback but `0.0.0.0/0` does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Special {
    /// The class.
    pub class: AddrClass,
    /// Prefix length of the special block, in the address family of the
    /// (canonical) address.
    pub block_prefix: u8,
}

const V4_TABLE: &[([u8; 4], u8, AddrClass)] = &[
    // Most specific first.
    ([255, 255, 255, 255], 32, AddrClass::Broadcast),
    ([0, 0, 0, 0], 8, AddrClass::Unspecified),
    ([10, 0, 0, 0], 8, AddrClass::Private),
    ([100, 64, 0, 0], 10, AddrClass::SharedCgnat),
    ([127, 0, 0, 0], 8, AddrClass::Loopback),
    ([169, 254, 0, 0], 16, AddrClass::LinkLocal),
    ([172, 16, 0, 0], 12, AddrClass::Private),
    ([192, 0, 0, 0], 24, AddrClass::Reserved),
    ([192, 0, 2, 0], 24, AddrClass::Documentation),
    ([192, 88, 99, 0], 24, AddrClass::Reserved),
    ([192, 168, 0, 0], 16, AddrClass::Private),
    ([198, 18, 0, 0], 15, AddrClass::Reserved),
    ([198, 51, 100, 0], 24, AddrClass::Documentation),
    ([203, 0, 113, 0], 24, AddrClass::Documentation),
    ([224, 0, 0, 0], 4, AddrClass::Multicast),
    ([240, 0, 0, 0], 4, AddrClass::Reserved),
];

const V6_TABLE: &[([u16; 8], u8, AddrClass)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 128, AddrClass::Unspecified),
    ([0, 0, 0, 0, 0, 0, 0, 1], 128, AddrClass::Loopback),
    // IPv4-compatible (deprecated) and the rest of ::/96.
    ([0, 0, 0, 0, 0, 0, 0, 0], 96, AddrClass::Reserved),
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, AddrClass::Private),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, AddrClass::Reserved),
    (
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        AddrClass::Documentation,
    ),
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, AddrClass::Reserved),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, AddrClass::Private),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::LinkLocal),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::Private),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, AddrClass::Multicast),
];

/// `addr` with IPv4-mapped IPv6 (`::ffff:a.b.c.d`) turned into IPv4. Every
/// check and every connect uses the canonical form.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn v4_in(addr: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    prefix_eq(
        u128::from(u32::from(addr)) << 96,
        u128::from(u32::from(Ipv4Addr::from(net))) << 96,
        prefix,
    )
}

fn v6_in(addr: Ipv6Addr, net: [u16; 8], prefix: u8) -> bool {
    prefix_eq(u128::from(addr), u128::from(Ipv6Addr::from(net)), prefix)
}

/// Whether the first `prefix` bits of `a` and `b` (left-aligned 128-bit
/// values) are equal.
pub(crate) fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = 128 - u32::from(prefix.min(128));
    (a >> shift) == (b >> shift)
}

fn classify_v4(addr: Ipv4Addr) -> Option<Special> {
    V4_TABLE
        .iter()
        .find(|(net, prefix, _)| v4_in(addr, *net, *prefix))
        .map(|&(_, block_prefix, class)| Special {
            class,
            block_prefix,
        })
}

/// Classifies `addr` (after [`canonical`]): `None` for an ordinary public
/// unicast address, `Some` for a special-purpose one.
pub fn special_class(addr: IpAddr) -> Option<Special> {
    match canonical(addr) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(&(_, block_prefix, class)) = V6_TABLE
                .iter()
                .find(|(net, prefix, _)| v6_in(v6, *net, *prefix))
            {
                return Some(Special {
                    class,
                    block_prefix,
                });
            }
            let seg = v6.segments();
            // NAT64 well-known prefix: the last 32 bits are an IPv4 address.
            if v6_in(v6, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
                let embedded = Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7]));
                return classify_v4(embedded).map(|s| Special {
                    class: s.class,
                    block_prefix: 96 + s.block_prefix,
                });
            }
            // 6to4: bits 16..48 are an IPv4 address.
            if v6_in(v6, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
                let embedded = Ipv4Addr::from((u32::from(seg[1]) << 16) | u32::from(seg[2]));
                return classify_v4(embedded).map(|s| Special {
                    class: s.class,
                    block_prefix: 16 + s.block_prefix,
                });
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<AddrClass> {
        special_class(s.parse().unwrap()).map(|s| s.class)
    }

    #[test]
    fn v4_classes() {
        assert_eq!(class("127.0.0.1"), Some(AddrClass::Loopback));
        assert_eq!(class("127.255.1.2"), Some(AddrClass::Loopback));
        assert_eq!(class("169.254.169.254"), Some(AddrClass::LinkLocal));
        assert_eq!(class("10.1.2.3"), Some(AddrClass::Private));
        assert_eq!(class("172.16.0.1"), Some(AddrClass::Private));
        assert_eq!(class("172.31.255.255"), Some(AddrClass::Private));
        assert_eq!(class("172.32.0.1"), None);
        assert_eq!(class("192.168.1.1"), Some(AddrClass::Private));
        assert_eq!(class("100.64.0.1"), Some(AddrClass::SharedCgnat));
        assert_eq!(class("100.127.255.255"), Some(AddrClass::SharedCgnat));
        assert_eq!(class("100.128.0.0"), None);
        assert_eq!(class("224.0.0.1"), Some(AddrClass::Multicast));
        assert_eq!(class("0.0.0.0"), Some(AddrClass::Unspecified));
        assert_eq!(class("0.1.2.3"), Some(AddrClass::Unspecified));
        assert_eq!(class("255.255.255.255"), Some(AddrClass::Broadcast));
        assert_eq!(class("240.0.0.1"), Some(AddrClass::Reserved));
        assert_eq!(class("192.0.0.192"), Some(AddrClass::Reserved));
        assert_eq!(class("8.8.8.8"), None);
        assert_eq!(class("1.1.1.1"), None);
    }

    #[test]
    fn v6_classes() {
        assert_eq!(class("::1"), Some(AddrClass::Loopback));
        assert_eq!(class("::"), Some(AddrClass::Unspecified));
        assert_eq!(class("fe80::1"), Some(AddrClass::LinkLocal));
        assert_eq!(class("febf::1"), Some(AddrClass::LinkLocal));
        assert_eq!(class("fc00::1"), Some(AddrClass::Private));
        assert_eq!(class("fd00:ec2::254"), Some(AddrClass::Private));
        assert_eq!(class("ff02::1"), Some(AddrClass::Multicast));
        assert_eq!(class("2001:db8::1"), Some(AddrClass::Documentation));
        assert_eq!(class("2606:4700::1111"), None);
        assert_eq!(class("::7f00:1"), Some(AddrClass::Reserved));
    }

    #[test]
    fn embedded_v4_forms_are_classified() {
        assert_eq!(class("::ffff:127.0.0.1"), Some(AddrClass::Loopback));
        assert_eq!(class("::ffff:169.254.169.254"), Some(AddrClass::LinkLocal));
        assert_eq!(class("::ffff:10.0.0.1"), Some(AddrClass::Private));
        assert_eq!(class("::ffff:8.8.8.8"), None);
        assert_eq!(class("64:ff9b::a9fe:a9fe"), Some(AddrClass::LinkLocal));
        assert_eq!(class("64:ff9b::7f00:1"), Some(AddrClass::Loopback));
        assert_eq!(class("64:ff9b::808:808"), None);
        assert_eq!(class("2002:7f00:1::1"), Some(AddrClass::Loopback));
        assert_eq!(class("2002:a9fe:a9fe::"), Some(AddrClass::LinkLocal));
        assert_eq!(
            canonical("::ffff:1.2.3.4".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let s = special_class("64:ff9b::7f00:1".parse().unwrap()).unwrap();
        assert_eq!(s.block_prefix, 104);
    }
}
