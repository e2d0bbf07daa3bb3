//! Property tests for the host/wildcard matcher and the rule parsers.
#![allow(clippy::unwrap_used)]

use nanoclaw_net::{CidrRule, DenyReason, Host, HostRule, NetworkPolicy};
use proptest::prelude::*;

fn label() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,8}[a-z0-9]"
}

fn labels(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(label(), min..=max).prop_map(|v| v.join("."))
}

fn name(s: &str) -> Host {
    Host::parse(s).unwrap()
}

proptest! {
    #[test]
    fn wildcard_matches_every_subdomain_but_not_the_apex(
        suffix in labels(2, 4),
        prefix in labels(1, 3),
        port in 1u16..,
    ) {
        let p = NetworkPolicy::allowlist([format!("*.{suffix}:{port}")], [""; 0]).unwrap();
        let sub = format!("{prefix}.{suffix}");
        prop_assert_eq!(p.check_destination(&name(&sub), port), Ok(()));
        prop_assert_eq!(p.check_destination(&name(&sub.to_uppercase()), port), Ok(()));
        prop_assert_eq!(p.check_destination(&name(&format!("{sub}.")), port), Ok(()));
        // Not the apex, not a name that merely ends with the same characters,
        // not the suffix followed by more labels.
        prop_assert_eq!(p.check_destination(&name(&suffix), port), Err(DenyReason::HostNotAllowed));
        let glued = format!("{prefix}{suffix}");
        prop_assert_eq!(p.check_destination(&name(&glued), port), Err(DenyReason::HostNotAllowed));
        let longer = format!("{sub}.{prefix}");
        prop_assert_eq!(p.check_destination(&name(&longer), port), Err(DenyReason::HostNotAllowed));
        // The right host on another port is refused with the port reason.
        let other = if port == 1 { 2 } else { port - 1 };
        prop_assert_eq!(p.check_destination(&name(&sub), other), Err(DenyReason::PortNotAllowed));
    }

    #[test]
    fn exact_rule_matches_only_that_name_and_default_ports(
        host in labels(2, 4),
        other in labels(2, 4),
        port in 1u16..,
    ) {
        let p = NetworkPolicy::allowlist([host.clone()], [""; 0]).unwrap();
        let expect = if port == 80 || port == 443 { Ok(()) } else { Err(DenyReason::PortNotAllowed) };
        prop_assert_eq!(p.check_destination(&name(&host), port), expect);
        if other != host {
            prop_assert_eq!(p.check_destination(&name(&other), 443), Err(DenyReason::HostNotAllowed));
        }
        prop_assert_eq!(
            p.check_destination(&name(&format!("x.{host}")), 443),
            Err(DenyReason::HostNotAllowed)
        );
    }

    #[test]
    fn host_rules_roundtrip_through_display(
        host in labels(2, 4),
        wild in any::<bool>(),
        port in prop::option::of(1u16..),
    ) {
        let mut s = if wild { format!("*.{host}") } else { host };
        if let Some(p) = port {
            s.push_str(&format!(":{p}"));
        }
        let rule: HostRule = s.parse().unwrap();
        prop_assert_eq!(rule.to_string(), s.clone());
        prop_assert_eq!(rule.to_string().parse::<HostRule>().unwrap(), rule);
    }

    #[test]
    fn cidr_rules_roundtrip_and_contain_their_network(
        a in any::<[u8; 4]>(),
        len in 0u8..=32,
        port in prop::option::of(1u16..),
    ) {
        let raw = u32::from_be_bytes(a);
        let masked = if len == 0 { 0 } else { raw & (u32::MAX << (32 - u32::from(len))) };
        let net = std::net::Ipv4Addr::from(masked);
        let mut s = format!("{net}/{len}");
        if let Some(p) = port {
            s.push_str(&format!(":{p}"));
        }
        let rule: CidrRule = s.parse().unwrap();
        prop_assert_eq!(rule.to_string(), s);
        prop_assert!(rule.cidr.contains(std::net::IpAddr::V4(net)));
        prop_assert!(rule.cidr.contains(std::net::IpAddr::V4(std::net::Ipv4Addr::from(raw))));
    }

    #[test]
    fn parsers_never_panic(s in "\\PC{0,40}") {
        let _ = s.parse::<HostRule>();
        let _ = s.parse::<CidrRule>();
        let _ = Host::parse(&s);
    }
}
