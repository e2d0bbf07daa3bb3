//! The per-sandbox nftables ruleset: a pure model ([`ruleset`], printable in
//! `nft` syntax for review) and its encoding as an nf_tables netlink batch.

use std::fmt;
use std::net::Ipv4Addr;

use super::netlink::{
    MsgBuf, NlError, NlSocket, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use super::Proto;

// <linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;

pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;

pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
pub(crate) const NFT_META_NFPROTO: u32 = 15;
pub(crate) const NFT_META_L4PROTO: u32 = 16;

const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
pub(crate) const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;

const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
pub(crate) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(crate) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;

const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_DIRECTION: u32 = 1;
const IP_CT_DIR_REPLY: u8 = 1;
/// `NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED)`.
const CT_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);

pub(crate) const NFTA_IMMEDIATE_DREG: u16 = 1;
pub(crate) const NFTA_IMMEDIATE_DATA: u16 = 2;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;
pub(crate) const NF_DROP: u32 = 0;
pub(crate) const NF_ACCEPT: u32 = 1;

const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_REJECT_ICMP_CODE: u16 = 2;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
/// ICMP "communication administratively prohibited" (IPv4 type 3 code 13;
/// the kernel picks the matching ICMPv6 code for IPv6).
const NFT_REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;

pub(crate) const NFT_REG_VERDICT: u32 = 0;
pub(crate) const NFT_REG_1: u32 = 1;

const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;

pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;

/// IPv4 special-purpose blocks dropped from the sandbox unless a rule lies
/// entirely inside one (the same blocks as [`crate::addr`]'s table, which a
/// unit test checks).
pub(crate) const SPECIAL_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 0, 2, 0), 24),
    (Ipv4Addr::new(192, 88, 99, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(198, 51, 100, 0), 24),
    (Ipv4Addr::new(203, 0, 113, 0), 24),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Whether `net/prefix` lies entirely inside `block/bprefix`.
pub(crate) fn inside(net: Ipv4Addr, prefix: u8, block: Ipv4Addr, bprefix: u8) -> bool {
    prefix >= bprefix && (u32::from(net) & mask(bprefix)) == u32::from(block)
}

/// An IPv4 allow rule after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AllowV4 {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub proto: Proto,
    pub port: Option<u16>,
}

impl AllowV4 {
    /// Inside a special-purpose block: an explicit allow of such addresses.
    fn is_explicit_special(&self) -> bool {
        SPECIAL_V4
            .iter()
            .any(|&(b, p)| inside(self.net, self.prefix, b, p))
    }
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Match {
    IifName(String),
    OifName(String),
    Ipv4,
    Daddr(Ipv4Addr, u8),
    SaddrNot(Ipv4Addr),
    L4(u8),
    Dport(u16),
    CtEstablishedRelated,
    /// The packet travels in the reply direction of its connection (the
    /// connection was opened by the other side).
    CtReply,
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    /// Silently: for packets whose sender must get no answer (from outside
    /// into the sandbox, forged sources, anything not IPv4).
    Drop,
    /// Drops and answers with a TCP reset (TCP packets only; the kernel
    /// sends nothing for others). Valid in input/forward/output hooks only.
    RejectTcpReset,
    /// Drops and answers with ICMP administratively prohibited. Same hooks.
    RejectAdminProhibited,
    Masquerade,
}

/// The base chains of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chain {
    Forward,
    Input,
    Postrouting,
}

impl Chain {
    const ALL: [Chain; 3] = [Chain::Forward, Chain::Input, Chain::Postrouting];

    fn name(self) -> &'static str {
        match self {
            Chain::Forward => "forward",
            Chain::Input => "input",
            Chain::Postrouting => "postrouting",
        }
    }

    /// (type, hook, priority)
    fn hook(self) -> (&'static str, u32, i32) {
        match self {
            Chain::Forward => ("filter", NF_INET_FORWARD, 0),
            Chain::Input => ("filter", NF_INET_LOCAL_IN, 0),
            Chain::Postrouting => ("nat", NF_INET_POST_ROUTING, 100),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub chain: Chain,
    pub matches: Vec<Match>,
    pub verdict: Verdict,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.chain.name())?;
        for m in &self.matches {
            match m {
                Match::IifName(n) => write!(f, " iifname \"{n}\"")?,
                Match::OifName(n) => write!(f, " oifname \"{n}\"")?,
                Match::Ipv4 => write!(f, " meta nfproto ipv4")?,
                Match::Daddr(a, p) => write!(f, " ip daddr {a}/{p}")?,
                Match::SaddrNot(a) => write!(f, " ip saddr != {a}")?,
                Match::L4(p) => write!(
                    f,
                    " meta l4proto {}",
                    match *p {
                        IPPROTO_TCP => "tcp",
                        IPPROTO_UDP => "udp",
                        _ => "?",
                    }
                )?,
                Match::Dport(p) => write!(f, " th dport {p}")?,
                Match::CtEstablishedRelated => write!(f, " ct state established,related")?,
                Match::CtReply => write!(f, " ct direction reply")?,
            }
        }
        let v = match self.verdict {
            Verdict::Accept => "accept",
            Verdict::Drop => "drop",
            Verdict::RejectTcpReset => "reject with tcp reset",
            Verdict::RejectAdminProhibited => "reject with icmpx admin-prohibited",
            Verdict::Masquerade => "masquerade",
        };
        write!(f, " {v}")
    }
}

fn allow_rules(chain: Chain, ifname: &str, a: &AllowV4, out: &mut Vec<Rule>) {
    let protos: &[Option<u8>] = match (a.proto, a.port) {
        (Proto::Tcp, _) => &[Some(IPPROTO_TCP)],
        (Proto::Udp, _) => &[Some(IPPROTO_UDP)],
        (Proto::Any, Some(_)) => &[Some(IPPROTO_TCP), Some(IPPROTO_UDP)],
        (Proto::Any, None) => &[None],
    };
    for proto in protos {
        let mut m = vec![Match::IifName(ifname.to_string()), Match::Ipv4];
        if a.prefix > 0 {
            m.push(Match::Daddr(a.net, a.prefix));
        }
        if let Some(p) = proto {
            m.push(Match::L4(*p));
        }
        if let Some(port) = a.port {
            m.push(Match::Dport(port));
        }
        out.push(Rule {
            chain,
            matches: m,
            verdict: Verdict::Accept,
        });
    }
}

/// Refuses what `matches` selects (packets from the sandbox whose source
/// was checked: the answer goes back to the sandbox only): TCP with a
/// reset, anything else with ICMP admin-prohibited, so that the program
/// fails at once instead of waiting for its timeout. Two rules, the TCP
/// one first.
fn refuse(chain: Chain, matches: Vec<Match>, out: &mut Vec<Rule>) {
    let mut tcp = matches.clone();
    tcp.push(Match::L4(IPPROTO_TCP));
    out.push(Rule {
        chain,
        matches: tcp,
        verdict: Verdict::RejectTcpReset,
    });
    out.push(Rule {
        chain,
        matches,
        verdict: Verdict::RejectAdminProhibited,
    });
}

/// The rules for one sandbox whose host-side link is `ifname` and whose
/// address is `sandbox_ip`. `allow` holds the caller's rules followed by the
/// DNS rules (which count as explicit).
pub(crate) fn ruleset(
    ifname: &str,
    sandbox_ip: Ipv4Addr,
    allow: &[AllowV4],
    dns: &[AllowV4],
) -> Vec<Rule> {
    let iif = || Match::IifName(ifname.to_string());
    let mut out = Vec::new();
    let rule = |chain, matches, verdict| Rule {
        chain,
        matches,
        verdict,
    };

    // Refusals of packets from the sandbox are rejects (an immediate error
    // for the program, see `refuse`), except where an answer would go to
    // someone else: forged sources, and anything not IPv4 (the sandbox has
    // no IPv6 address, so its source cannot have been checked). What comes
    // from outside into the sandbox is dropped silently.

    // forward: nothing new may enter the sandbox from outside.
    out.push(rule(
        Chain::Forward,
        vec![Match::OifName(ifname.into()), Match::CtEstablishedRelated],
        Verdict::Accept,
    ));
    out.push(rule(
        Chain::Forward,
        vec![Match::OifName(ifname.into())],
        Verdict::Drop,
    ));
    // forward: the sandbox may only use its own address (no answer to a
    // forged source).
    out.push(rule(
        Chain::Forward,
        vec![iif(), Match::Ipv4, Match::SaddrNot(sandbox_ip)],
        Verdict::Drop,
    ));
    // forward: explicit allows of special-purpose ranges, then the special
    // ranges refused, then the general allows, then everything else refused
    // (IPv4) or dropped (the rest).
    let (explicit, general): (Vec<&AllowV4>, Vec<&AllowV4>) =
        allow.iter().partition(|a| a.is_explicit_special());
    for a in dns.iter().chain(explicit.iter().copied()) {
        allow_rules(Chain::Forward, ifname, a, &mut out);
    }
    for &(b, p) in SPECIAL_V4 {
        refuse(
            Chain::Forward,
            vec![iif(), Match::Ipv4, Match::Daddr(b, p)],
            &mut out,
        );
    }
    for a in general {
        allow_rules(Chain::Forward, ifname, a, &mut out);
    }
    refuse(Chain::Forward, vec![iif(), Match::Ipv4], &mut out);
    out.push(rule(Chain::Forward, vec![iif()], Verdict::Drop));

    // input (the host itself): replies to connections the host opened (the
    // reply direction only: a sandbox-opened connection, even one left in
    // conntrack from an earlier policy, is checked against the rules on
    // every packet), and only explicit allows (inside a special range, or a
    // single address); everything else refused (IPv4) or dropped.
    out.push(rule(
        Chain::Input,
        vec![iif(), Match::CtReply, Match::CtEstablishedRelated],
        Verdict::Accept,
    ));
    out.push(rule(
        Chain::Input,
        vec![iif(), Match::Ipv4, Match::SaddrNot(sandbox_ip)],
        Verdict::Drop,
    ));
    for a in dns.iter().chain(
        allow
            .iter()
            .filter(|a| a.is_explicit_special() || a.prefix == 32),
    ) {
        allow_rules(Chain::Input, ifname, a, &mut out);
    }
    refuse(Chain::Input, vec![iif(), Match::Ipv4], &mut out);
    out.push(rule(Chain::Input, vec![iif()], Verdict::Drop));

    // postrouting: what leaves is masqueraded behind the host's address.
    out.push(rule(
        Chain::Postrouting,
        vec![iif(), Match::Ipv4],
        Verdict::Masquerade,
    ));
    out
}

pub(crate) fn nfgen(m: &mut MsgBuf, family: u8, res_id: u16) {
    let mut h = [0u8; 4];
    h[0] = family;
    h[2..4].copy_from_slice(&res_id.to_be_bytes());
    m.raw(&h);
}

pub(crate) fn ty(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

pub(crate) fn expr(m: &mut MsgBuf, name: &str, data: impl FnOnce(&mut MsgBuf)) {
    m.nest(NFTA_LIST_ELEM);
    m.attr_str(NFTA_EXPR_NAME, name);
    m.nest(NFTA_EXPR_DATA);
    data(m);
    m.nest_end();
    m.nest_end();
}

pub(crate) fn data_value(m: &mut MsgBuf, attr: u16, v: &[u8]) {
    m.nest(attr);
    m.attr(NFTA_DATA_VALUE, v);
    m.nest_end();
}

pub(crate) fn meta(m: &mut MsgBuf, key: u32) {
    expr(m, "meta", |m| {
        m.attr_be32(NFTA_META_KEY, key);
        m.attr_be32(NFTA_META_DREG, NFT_REG_1);
    });
}

pub(crate) fn cmp(m: &mut MsgBuf, op: u32, v: &[u8]) {
    expr(m, "cmp", |m| {
        m.attr_be32(NFTA_CMP_SREG, NFT_REG_1);
        m.attr_be32(NFTA_CMP_OP, op);
        data_value(m, NFTA_CMP_DATA, v);
    });
}

pub(crate) fn payload(m: &mut MsgBuf, base: u32, offset: u32, len: u32) {
    expr(m, "payload", |m| {
        m.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        m.attr_be32(NFTA_PAYLOAD_BASE, base);
        m.attr_be32(NFTA_PAYLOAD_OFFSET, offset);
        m.attr_be32(NFTA_PAYLOAD_LEN, len);
    });
}

pub(crate) fn bitwise(m: &mut MsgBuf, mask: &[u8]) {
    expr(m, "bitwise", |m| {
        m.attr_be32(NFTA_BITWISE_SREG, NFT_REG_1);
        m.attr_be32(NFTA_BITWISE_DREG, NFT_REG_1);
        m.attr_be32(NFTA_BITWISE_LEN, mask.len() as u32);
        data_value(m, NFTA_BITWISE_MASK, mask);
        data_value(m, NFTA_BITWISE_XOR, &vec![0u8; mask.len()]);
    });
}

fn ifname_bytes(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = name.len().min(15);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

fn encode_match(m: &mut MsgBuf, x: &Match) {
    match x {
        Match::IifName(n) => {
            meta(m, NFT_META_IIFNAME);
            cmp(m, NFT_CMP_EQ, &ifname_bytes(n));
        }
        Match::OifName(n) => {
            meta(m, NFT_META_OIFNAME);
            cmp(m, NFT_CMP_EQ, &ifname_bytes(n));
        }
        Match::Ipv4 => {
            meta(m, NFT_META_NFPROTO);
            cmp(m, NFT_CMP_EQ, &[NFPROTO_IPV4]);
        }
        Match::Daddr(a, p) => {
            payload(m, NFT_PAYLOAD_NETWORK_HEADER, 16, 4);
            if *p < 32 {
                bitwise(m, &mask(*p).to_be_bytes());
            }
            let net = u32::from(*a) & mask(*p);
            cmp(m, NFT_CMP_EQ, &net.to_be_bytes());
        }
        Match::SaddrNot(a) => {
            payload(m, NFT_PAYLOAD_NETWORK_HEADER, 12, 4);
            cmp(m, NFT_CMP_NEQ, &a.octets());
        }
        Match::L4(p) => {
            meta(m, NFT_META_L4PROTO);
            cmp(m, NFT_CMP_EQ, &[*p]);
        }
        Match::Dport(p) => {
            payload(m, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
            cmp(m, NFT_CMP_EQ, &p.to_be_bytes());
        }
        Match::CtEstablishedRelated => {
            expr(m, "ct", |m| {
                m.attr_be32(NFTA_CT_KEY, NFT_CT_STATE);
                m.attr_be32(NFTA_CT_DREG, NFT_REG_1);
            });
            bitwise(m, &CT_ESTABLISHED_RELATED.to_ne_bytes());
            cmp(m, NFT_CMP_NEQ, &0u32.to_ne_bytes());
        }
        Match::CtReply => {
            expr(m, "ct", |m| {
                m.attr_be32(NFTA_CT_KEY, NFT_CT_DIRECTION);
                m.attr_be32(NFTA_CT_DREG, NFT_REG_1);
            });
            cmp(m, NFT_CMP_EQ, &[IP_CT_DIR_REPLY]);
        }
    }
}

fn encode_verdict(m: &mut MsgBuf, v: Verdict) {
    let code = match v {
        Verdict::Masquerade => {
            m.nest(NFTA_LIST_ELEM);
            m.attr_str(NFTA_EXPR_NAME, "masq");
            m.nest_end();
            return;
        }
        // `reject` sends its answer and sets the verdict to drop itself.
        Verdict::RejectTcpReset => {
            expr(m, "reject", |m| {
                m.attr_be32(NFTA_REJECT_TYPE, NFT_REJECT_TCP_RST);
            });
            return;
        }
        Verdict::RejectAdminProhibited => {
            expr(m, "reject", |m| {
                m.attr_be32(NFTA_REJECT_TYPE, NFT_REJECT_ICMPX_UNREACH);
                m.attr_u8(NFTA_REJECT_ICMP_CODE, NFT_REJECT_ICMPX_ADMIN_PROHIBITED);
            });
            return;
        }
        Verdict::Accept => NF_ACCEPT,
        Verdict::Drop => NF_DROP,
    };
    expr(m, "immediate", |m| {
        m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        m.nest(NFTA_IMMEDIATE_DATA);
        m.nest(NFTA_DATA_VERDICT);
        m.attr_be32(NFTA_VERDICT_CODE, code);
        m.nest_end();
        m.nest_end();
    });
}

/// An nfnetlink socket for nf_tables batches.
pub(crate) struct Nft {
    sock: NlSocket,
}

impl Nft {
    pub fn open() -> std::io::Result<Nft> {
        Ok(Nft {
            sock: NlSocket::open(NETLINK_NETFILTER)?,
        })
    }

    fn batch(&mut self, body: impl FnOnce(&mut MsgBuf, &mut NlSocket)) -> Result<(), NlError> {
        let mut m = MsgBuf::new();
        let begin = self.sock.seq();
        m.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin);
        nfgen(&mut m, 0, NFNL_SUBSYS_NFTABLES);
        m.end();
        body(&mut m, &mut self.sock);
        let last = self.sock.seq().wrapping_sub(1);
        let end = self.sock.seq();
        m.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end);
        nfgen(&mut m, 0, NFNL_SUBSYS_NFTABLES);
        m.end();
        self.sock.send_acked(&m, begin, last)
    }

    /// Creates table `inet <table>` with its three base chains and `rules`,
    /// atomically (one transaction: all or nothing).
    pub fn create(&mut self, table: &str, rules: &[Rule]) -> Result<(), NlError> {
        const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
        self.batch(|m, sock| {
            m.begin(
                ty(NFT_MSG_NEWTABLE),
                ACK | NLM_F_CREATE | NLM_F_EXCL,
                sock.seq(),
            );
            nfgen(m, NFPROTO_INET, 0);
            m.attr_str(NFTA_TABLE_NAME, table);
            m.end();
            for chain in Chain::ALL {
                let (kind, hook, prio) = chain.hook();
                m.begin(
                    ty(NFT_MSG_NEWCHAIN),
                    ACK | NLM_F_CREATE | NLM_F_EXCL,
                    sock.seq(),
                );
                nfgen(m, NFPROTO_INET, 0);
                m.attr_str(NFTA_CHAIN_TABLE, table);
                m.attr_str(NFTA_CHAIN_NAME, chain.name());
                m.nest(NFTA_CHAIN_HOOK);
                m.attr_be32(NFTA_HOOK_HOOKNUM, hook);
                m.attr_be32(NFTA_HOOK_PRIORITY, prio as u32);
                m.nest_end();
                m.attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                m.attr_str(NFTA_CHAIN_TYPE, kind);
                m.end();
            }
            for r in rules {
                m.begin(
                    ty(NFT_MSG_NEWRULE),
                    ACK | NLM_F_CREATE | NLM_F_APPEND,
                    sock.seq(),
                );
                nfgen(m, NFPROTO_INET, 0);
                m.attr_str(NFTA_RULE_TABLE, table);
                m.attr_str(NFTA_RULE_CHAIN, r.chain.name());
                m.nest(NFTA_RULE_EXPRESSIONS);
                for x in &r.matches {
                    encode_match(m, x);
                }
                encode_verdict(m, r.verdict);
                m.nest_end();
                m.end();
            }
        })
    }

    /// Deletes table `inet <table>` (its chains and rules go with it).
    pub fn delete(&mut self, table: &str) -> Result<(), NlError> {
        self.batch(|m, sock| {
            m.begin(ty(NFT_MSG_DELTABLE), NLM_F_REQUEST | NLM_F_ACK, sock.seq());
            nfgen(m, NFPROTO_INET, 0);
            m.attr_str(NFTA_TABLE_NAME, table);
            m.end();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::special_class;
    use std::net::IpAddr;

    #[test]
    fn special_blocks_match_the_address_classifier() {
        for &(b, p) in SPECIAL_V4 {
            let s = special_class(IpAddr::V4(b)).expect("classified");
            assert_eq!(s.block_prefix, p, "{b}/{p}");
        }
    }

    fn allow(s: &str, prefix: u8, proto: Proto, port: Option<u16>) -> AllowV4 {
        AllowV4 {
            net: s.parse().unwrap(),
            prefix,
            proto,
            port,
        }
    }

    #[test]
    fn ruleset_orders_explicit_specials_before_special_refusals() {
        let rules = ruleset(
            "ncl-t",
            Ipv4Addr::new(100, 96, 0, 2),
            &[
                allow("0.0.0.0", 0, Proto::Tcp, Some(443)),
                allow("169.254.169.254", 32, Proto::Tcp, Some(80)),
                allow("93.184.216.34", 32, Proto::Udp, Some(53)),
            ],
            &[],
        );
        let text: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        let pos = |needle: &str| {
            text.iter()
                .position(|t| t.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in {text:#?}"))
        };
        let meta = pos("forward: iifname \"ncl-t\" meta nfproto ipv4 ip daddr 169.254.169.254/32");
        let reset_ll = pos("ip daddr 169.254.0.0/16 meta l4proto tcp reject with tcp reset");
        let icmp_ll = pos("ip daddr 169.254.0.0/16 reject with icmpx admin-prohibited");
        let open = pos(
            "forward: iifname \"ncl-t\" meta nfproto ipv4 meta l4proto tcp th dport 443 accept",
        );
        assert!(
            meta < reset_ll && reset_ll + 1 == icmp_ll && icmp_ll < open,
            "{text:#?}"
        );
        // After the general allows: IPv4 refused, anything else dropped.
        let tail = [
            "forward: iifname \"ncl-t\" meta nfproto ipv4 meta l4proto tcp reject with tcp reset",
            "forward: iifname \"ncl-t\" meta nfproto ipv4 reject with icmpx admin-prohibited",
            "forward: iifname \"ncl-t\" drop",
        ];
        let at = pos(tail[0]);
        assert!(open < at, "{text:#?}");
        assert_eq!(text[at..at + 3], tail, "{text:#?}");
        // Inbound and forged packets stay silent drops.
        assert!(text.iter().any(|t| t == "forward: oifname \"ncl-t\" drop"));
        assert!(text.iter().any(
            |t| t == "forward: iifname \"ncl-t\" meta nfproto ipv4 ip saddr != 100.96.0.2 drop"
        ));
        // The host (input) honours the explicit and /32 rules, not 0.0.0.0/0.
        assert!(text
            .iter()
            .any(|t| t.starts_with("input:") && t.contains("169.254.169.254/32")));
        assert!(text
            .iter()
            .any(|t| t.starts_with("input:") && t.contains("93.184.216.34/32")));
        assert!(!text
            .iter()
            .any(|t| t.starts_with("input:") && t.contains("dport 443")));
        let tail = [
            "input: iifname \"ncl-t\" meta nfproto ipv4 meta l4proto tcp reject with tcp reset",
            "input: iifname \"ncl-t\" meta nfproto ipv4 reject with icmpx admin-prohibited",
            "input: iifname \"ncl-t\" drop",
            "postrouting: iifname \"ncl-t\" meta nfproto ipv4 masquerade",
        ];
        assert_eq!(text[text.len() - 4..], tail, "{text:#?}");
    }

    /// Every refusal of a packet from the sandbox whose source was checked
    /// is a reject (a TCP reset, then ICMP for the rest), in a chain where
    /// the kernel allows `reject`; drops are kept only where no answer may
    /// be sent.
    #[test]
    fn sandbox_packets_are_rejected_not_dropped() {
        let rules = ruleset(
            "ncl-t",
            Ipv4Addr::new(100, 96, 0, 2),
            &[
                allow("0.0.0.0", 0, Proto::Any, None),
                allow("10.1.0.0", 16, Proto::Udp, Some(53)),
                allow("192.0.2.7", 32, Proto::Tcp, None),
            ],
            &[allow("100.96.0.1", 32, Proto::Udp, Some(53))],
        );
        let mut rejects = 0;
        for (i, r) in rules.iter().enumerate() {
            let from_sandbox = r.matches.contains(&Match::IifName("ncl-t".into()));
            let ipv4 = r.matches.contains(&Match::Ipv4);
            let forged = r
                .matches
                .contains(&Match::SaddrNot(Ipv4Addr::new(100, 96, 0, 2)));
            match r.verdict {
                Verdict::RejectTcpReset => {
                    rejects += 1;
                    assert!(matches!(r.chain, Chain::Forward | Chain::Input), "{r}");
                    assert!(from_sandbox && ipv4 && !forged, "{r}");
                    assert_eq!(r.matches.last(), Some(&Match::L4(IPPROTO_TCP)), "{r}");
                    // Its ICMP twin follows, for the same packets but TCP.
                    let twin = &rules[i + 1];
                    assert_eq!(twin.verdict, Verdict::RejectAdminProhibited, "{twin}");
                    assert_eq!(twin.chain, r.chain);
                    assert_eq!(twin.matches[..], r.matches[..r.matches.len() - 1]);
                }
                Verdict::RejectAdminProhibited => {
                    assert!(matches!(r.chain, Chain::Forward | Chain::Input), "{r}");
                    assert!(from_sandbox && ipv4 && !forged, "{r}");
                    assert_eq!(rules[i - 1].verdict, Verdict::RejectTcpReset, "{r}");
                }
                Verdict::Drop => assert!(
                    !from_sandbox || forged || !ipv4,
                    "a drop of checked IPv4 from the sandbox: {r}"
                ),
                Verdict::Accept | Verdict::Masquerade => {}
            }
        }
        // 15 special blocks in forward, the catch-alls of forward and input.
        assert_eq!(rejects, SPECIAL_V4.len() + 2);
    }

    /// An expression's name and its data attributes.
    type Expr = (String, Vec<(u16, Vec<u8>)>);

    /// Walks `buf` as a list of expressions.
    fn exprs(buf: &[u8]) -> Vec<Expr> {
        use super::super::netlink::attrs;
        attrs(buf)
            .map(|(ty, elem)| {
                assert_eq!(ty, NFTA_LIST_ELEM);
                let mut name = String::new();
                let mut data = Vec::new();
                for (ty, v) in attrs(elem) {
                    match ty {
                        NFTA_EXPR_NAME => {
                            name = String::from_utf8(v.split(|&b| b == 0).next().unwrap().to_vec())
                                .unwrap()
                        }
                        NFTA_EXPR_DATA => data = attrs(v).map(|(t, v)| (t, v.to_vec())).collect(),
                        _ => panic!("unexpected attribute {ty}"),
                    }
                }
                (name, data)
            })
            .collect()
    }

    #[test]
    fn reject_verdicts_encode_as_reject_expressions() {
        let mut m = MsgBuf::new();
        encode_verdict(&mut m, Verdict::RejectTcpReset);
        assert_eq!(
            exprs(m.as_bytes()),
            vec![(
                "reject".to_string(),
                vec![(NFTA_REJECT_TYPE, 1u32.to_be_bytes().to_vec())]
            )]
        );
        let mut m = MsgBuf::new();
        encode_verdict(&mut m, Verdict::RejectAdminProhibited);
        assert_eq!(
            exprs(m.as_bytes()),
            vec![(
                "reject".to_string(),
                vec![
                    (NFTA_REJECT_TYPE, 2u32.to_be_bytes().to_vec()),
                    (NFTA_REJECT_ICMP_CODE, vec![3]),
                ]
            )]
        );
        let mut m = MsgBuf::new();
        encode_verdict(&mut m, Verdict::Drop);
        let e = exprs(m.as_bytes());
        assert_eq!(e[0].0, "immediate");
    }

    #[test]
    fn inside_is_containment() {
        let ll = Ipv4Addr::new(169, 254, 0, 0);
        assert!(inside(Ipv4Addr::new(169, 254, 169, 254), 32, ll, 16));
        assert!(!inside(Ipv4Addr::new(169, 0, 0, 0), 8, ll, 16));
        assert!(!inside(Ipv4Addr::new(0, 0, 0, 0), 0, ll, 16));
    }
}
