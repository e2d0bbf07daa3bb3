//! Transparent egress: the rules that send every TCP connection and every
//! DNS query a sandbox makes to nanoclaw's listeners on the sandbox's own
//! loopback, installed in the sandbox's network namespace by a process that
//! holds `CAP_NET_ADMIN` there (the sandbox's user namespace owns the
//! network namespace, so this needs no privilege on the host: it works
//! rootless).
//!
//! # Why nftables `redirect` (and not a TUN device)
//!
//! Both run without host privileges. A TUN device needs a user-space TCP/IP
//! stack on the host side terminating every connection (a second TCP
//! implementation, per-packet copies through the TUN fd, MTU and
//! retransmission handled by us); `redirect` keeps the kernel's TCP on both
//! legs and costs one conntrack NAT lookup per packet, and
//! `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the accepted socket gives
//! the original destination. Measured (`bench/egress.py`, README): the
//! transparent path adds one accept + one `getsockopt` per connection and
//! no per-byte work beyond the proxy's relay.
//!
//! # The rules (table `inet nanoclaw`, see [`RedirectRules::ruleset_text`])
//!
//! * Routes: `default dev lo` for IPv4 (source 127.0.0.1) and IPv6 (source
//!   ::1), so that `connect()` to any address gets as far as the output
//!   hook instead of failing with `ENETUNREACH`. The namespace still has
//!   no interface but `lo`: a packet that escapes the rules is looped back
//!   and dropped (nothing forwards), so the wall fails closed.
//! * `nat output` (priority -100): loopback destinations untouched; UDP and
//!   TCP to port 53 (any address) redirected to the DNS port; every other
//!   TCP connection (v4 and v6) redirected to the transparent port.
//! * `filter output` (priority 0, after NAT): packets to loopback pass;
//!   everything else (other UDP, ICMP, SCTP, ...) is dropped (`sendmsg`
//!   fails with `EPERM`).
//!
//! The sandboxed code cannot change the rules: its processes have no
//! capabilities (and seccomp refuses new user namespaces). The listeners
//! are held by the runner on the host side, outside the sandbox's pid
//! namespace, so they cannot be killed from inside; should they go away,
//! a redirected connection is refused by the kernel (nothing listens).

use std::io;
use std::os::fd::RawFd;

use super::netlink::{MsgBuf, NETLINK_NETFILTER, NETLINK_ROUTE};
use super::nft::*;

const RTM_NEWROUTE: u16 = 24;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// `lo` is always interface 1 in a new network namespace.
const LO_IFINDEX: u32 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NFPROTO_IPV6: u8 = 10;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const TABLE: &str = "nanoclaw";
const NAT_CHAIN: &str = "redirect";
const FILTER_CHAIN: &str = "contain";

/// Prebuilt netlink messages (built by the runner, which may allocate;
/// installed by [`RedirectRules::install`], which does not, so that it can
/// run in a process forked from a multithreaded one).
#[derive(Debug, Clone)]
pub struct RedirectRules {
    routes: Vec<u8>,
    route_acks: usize,
    nft: Vec<u8>,
    nft_acks: usize,
    tcp_port: u16,
    dns_port: u16,
}

impl RedirectRules {
    /// The rules for TCP to `tcp_port` and DNS (UDP and TCP) to `dns_port`,
    /// both on the sandbox's loopback (127.0.0.1 and ::1).
    pub fn new(tcp_port: u16, dns_port: u16) -> RedirectRules {
        let mut r = MsgBuf::new();
        for (seq, v6) in (1..).zip([false, true]) {
            route(&mut r, v6, seq);
        }
        RedirectRules {
            routes: r.as_bytes().to_vec(),
            route_acks: 2,
            nft: nft_batch(tcp_port, dns_port).as_bytes().to_vec(),
            nft_acks: 3 + rules(tcp_port, dns_port).len(),
            tcp_port,
            dns_port,
        }
    }

    /// Sends the routes and the nftables batch in the caller's network
    /// namespace and waits for every ack. Does not allocate.
    pub fn install(&self) -> io::Result<()> {
        send_acked(NETLINK_ROUTE, &self.routes, self.route_acks)?;
        send_acked(NETLINK_NETFILTER, &self.nft, self.nft_acks)
    }

    /// The rules in `nft` syntax, for people (and the docs' tests).
    pub fn ruleset_text(&self) -> String {
        let (t, d) = (self.tcp_port, self.dns_port);
        format!(
            "table inet {TABLE} {{\n  chain {NAT_CHAIN} {{ type nat hook output priority -100; policy accept;\n    ip daddr 127.0.0.0/8 accept\n    ip6 daddr ::1 accept\n    meta l4proto udp th dport 53 redirect to :{d}\n    meta l4proto tcp th dport 53 redirect to :{d}\n    meta l4proto tcp redirect to :{t}\n  }}\n  chain {FILTER_CHAIN} {{ type filter hook output priority 0; policy accept;\n    ip daddr 127.0.0.0/8 accept\n    ip6 daddr ::1 accept\n    drop\n  }}\n}}\n"
        )
    }
}

fn route(m: &mut MsgBuf, v6: bool, seq: u32) {
    m.begin(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
    );
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    let scope = if v6 { RT_SCOPE_UNIVERSE } else { RT_SCOPE_LINK };
    m.raw(&[
        family,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        scope,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ]);
    m.attr(RTA_OIF, &LO_IFINDEX.to_ne_bytes());
    if v6 {
        m.attr(RTA_PREFSRC, &std::net::Ipv6Addr::LOCALHOST.octets());
    } else {
        m.attr(RTA_PREFSRC, &std::net::Ipv4Addr::LOCALHOST.octets());
    }
    m.end();
}

/// One rule: the chain and its expressions.
enum Step {
    LoopbackV4,
    LoopbackV6,
    L4(u8),
    Dport(u16),
    Accept,
    Drop,
    Redirect(u16),
}

fn rules(tcp_port: u16, dns_port: u16) -> Vec<(&'static str, Vec<Step>)> {
    use Step::*;
    vec![
        (NAT_CHAIN, vec![LoopbackV4, Accept]),
        (NAT_CHAIN, vec![LoopbackV6, Accept]),
        (
            NAT_CHAIN,
            vec![L4(IPPROTO_UDP), Dport(53), Redirect(dns_port)],
        ),
        (
            NAT_CHAIN,
            vec![L4(IPPROTO_TCP), Dport(53), Redirect(dns_port)],
        ),
        (NAT_CHAIN, vec![L4(IPPROTO_TCP), Redirect(tcp_port)]),
        (FILTER_CHAIN, vec![LoopbackV4, Accept]),
        (FILTER_CHAIN, vec![LoopbackV6, Accept]),
        (FILTER_CHAIN, vec![Drop]),
    ]
}

fn verdict(m: &mut MsgBuf, code: u32) {
    expr(m, "immediate", |m| {
        m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        m.nest(NFTA_IMMEDIATE_DATA);
        m.nest(NFTA_DATA_VERDICT);
        m.attr_be32(NFTA_VERDICT_CODE, code);
        m.nest_end();
        m.nest_end();
    });
}

fn encode(m: &mut MsgBuf, s: &Step) {
    match s {
        Step::LoopbackV4 => {
            meta(m, NFT_META_NFPROTO);
            cmp(m, NFT_CMP_EQ, &[NFPROTO_IPV4]);
            payload(m, NFT_PAYLOAD_NETWORK_HEADER, 16, 4);
            bitwise(m, &[0xff, 0, 0, 0]);
            cmp(m, NFT_CMP_EQ, &[127, 0, 0, 0]);
        }
        Step::LoopbackV6 => {
            meta(m, NFT_META_NFPROTO);
            cmp(m, NFT_CMP_EQ, &[NFPROTO_IPV6]);
            payload(m, NFT_PAYLOAD_NETWORK_HEADER, 24, 16);
            cmp(m, NFT_CMP_EQ, &std::net::Ipv6Addr::LOCALHOST.octets());
        }
        Step::L4(p) => {
            meta(m, NFT_META_L4PROTO);
            cmp(m, NFT_CMP_EQ, &[*p]);
        }
        Step::Dport(p) => {
            payload(m, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
            cmp(m, NFT_CMP_EQ, &p.to_be_bytes());
        }
        Step::Accept => verdict(m, NF_ACCEPT),
        Step::Drop => verdict(m, NF_DROP),
        Step::Redirect(port) => {
            expr(m, "immediate", |m| {
                m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
                data_value(m, NFTA_IMMEDIATE_DATA, &port.to_be_bytes());
            });
            expr(m, "redir", |m| {
                m.attr_be32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1);
            });
        }
    }
}

fn nft_batch(tcp_port: u16, dns_port: u16) -> MsgBuf {
    const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
    let mut m = MsgBuf::new();
    let mut seq = 1u32;
    let mut next = || {
        seq += 1;
        seq
    };
    m.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next());
    nfgen(&mut m, 0, NFNL_SUBSYS_NFTABLES);
    m.end();
    m.begin(
        ty(NFT_MSG_NEWTABLE),
        ACK | NLM_F_CREATE | NLM_F_EXCL,
        next(),
    );
    nfgen(&mut m, NFPROTO_INET, 0);
    m.attr_str(NFTA_TABLE_NAME, TABLE);
    m.end();
    for (name, kind, prio) in [(NAT_CHAIN, "nat", -100i32), (FILTER_CHAIN, "filter", 0)] {
        m.begin(
            ty(NFT_MSG_NEWCHAIN),
            ACK | NLM_F_CREATE | NLM_F_EXCL,
            next(),
        );
        nfgen(&mut m, NFPROTO_INET, 0);
        m.attr_str(NFTA_CHAIN_TABLE, TABLE);
        m.attr_str(NFTA_CHAIN_NAME, name);
        m.nest(NFTA_CHAIN_HOOK);
        m.attr_be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT);
        m.attr_be32(NFTA_HOOK_PRIORITY, prio as u32);
        m.nest_end();
        m.attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        m.attr_str(NFTA_CHAIN_TYPE, kind);
        m.end();
    }
    for (chain, steps) in rules(tcp_port, dns_port) {
        m.begin(
            ty(NFT_MSG_NEWRULE),
            ACK | NLM_F_CREATE | NLM_F_APPEND,
            next(),
        );
        nfgen(&mut m, NFPROTO_INET, 0);
        m.attr_str(NFTA_RULE_TABLE, TABLE);
        m.attr_str(NFTA_RULE_CHAIN, chain);
        m.nest(NFTA_RULE_EXPRESSIONS);
        for s in &steps {
            encode(&mut m, s);
        }
        m.nest_end();
        m.end();
    }
    m.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next());
    nfgen(&mut m, 0, NFNL_SUBSYS_NFTABLES);
    m.end();
    m
}

/// Sends `msgs` on a fresh netlink socket of `proto` and reads until
/// `acks` acknowledgements arrived; the first error is returned. Uses only
/// the stack (no allocation) and gives up after 2 s of silence.
fn send_acked(proto: libc::c_int, msgs: &[u8], acks: usize) -> io::Result<()> {
    // SAFETY: plain socket call; the result is checked.
    let fd: RawFd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = exchange(fd, msgs, acks);
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    r
}

fn exchange(fd: RawFd, msgs: &[u8], acks: usize) -> io::Result<()> {
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: `one` and `tv` outlive the calls and their sizes are passed.
    unsafe {
        // NETLINK_CAP_ACK (10): acks without the request echoed back.
        libc::setsockopt(
            fd,
            270,
            10,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // SAFETY: sockaddr_nl is plain data; all-zero addresses the kernel.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msgs` and `sa` are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd,
            msgs.as_ptr().cast(),
            msgs.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while got < acks {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut data = &buf[..n as usize];
        while data.len() >= 16 {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let ty = u16::from_ne_bytes([data[4], data[5]]);
            if len < 16 || len > data.len() {
                break;
            }
            if ty == NLMSG_ERROR && len >= 20 {
                let err = i32::from_ne_bytes([data[16], data[17], data[18], data[19]]);
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
                got += 1;
            }
            data = &data[((len + 3) & !3).min(data.len())..];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_counts_one_ack_per_acked_message() {
        let r = RedirectRules::new(15001, 53);
        // Table, two chains, eight rules.
        assert_eq!(r.nft_acks, 11);
        let text = r.ruleset_text();
        assert!(
            text.contains("meta l4proto tcp redirect to :15001"),
            "{text}"
        );
        assert!(text.contains("th dport 53 redirect to :53"), "{text}");
    }
}
