//! rtnetlink operations: veth pairs, addresses, links up/down, routes,
//! route lookups and address/route dumps (IPv4 only).

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use super::netlink::{
    attrs, MsgBuf, NlError, NlSocket, NETLINK_ROUTE, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REQUEST,
};

// <linux/rtnetlink.h>, <linux/if_link.h>, <linux/veth.h>
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFLA_INET6_ADDR_GEN_MODE: u16 = 8;
const IN6_ADDR_GEN_MODE_NONE: u8 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_IIF: u16 = 3;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u16 = libc::AF_INET6 as u16;
const IFF_UP: u32 = libc::IFF_UP as u32;

/// `struct ifinfomsg` (16 bytes).
fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    // family AF_UNSPEC (0), pad, type 0
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// `struct rtmsg` (12 bytes).
fn rtmsg(dst_len: u8, src_len: u8, table: u8, protocol: u8, scope: u8, ty: u8) -> [u8; 12] {
    [
        AF_INET, dst_len, src_len, 0, table, protocol, scope, ty, 0, 0, 0, 0,
    ]
}

/// An IPv4 address on the host with its prefix length and link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddrEntry {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub index: u32,
}

/// An IPv4 route (any table) with its prefix and output link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteEntry {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub oif: Option<u32>,
}

/// An rtnetlink socket with the operations [`super`] needs.
pub(crate) struct Rtnl {
    sock: NlSocket,
}

impl Rtnl {
    /// Opens an rtnetlink socket in the calling thread's network namespace.
    pub fn open() -> std::io::Result<Rtnl> {
        Ok(Rtnl {
            sock: NlSocket::open(NETLINK_ROUTE)?,
        })
    }

    fn acked(
        &mut self,
        ty: u16,
        flags: u16,
        build: impl FnOnce(&mut MsgBuf),
    ) -> Result<(), NlError> {
        let seq = self.sock.seq();
        let mut m = MsgBuf::new();
        m.begin(ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq);
        build(&mut m);
        m.end();
        self.sock.send_acked(&m, seq, seq)
    }

    /// Creates a veth pair: `host` here, `peer` directly in the network
    /// namespace `netns_fd` (both down).
    pub fn create_veth(&mut self, host: &str, peer: &str, netns_fd: RawFd) -> Result<(), NlError> {
        self.acked(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, |m| {
            m.raw(&ifinfomsg(0, 0, 0));
            m.attr_str(IFLA_IFNAME, host);
            m.nest(IFLA_LINKINFO);
            m.attr(IFLA_INFO_KIND, b"veth");
            m.nest(IFLA_INFO_DATA);
            m.nest(VETH_INFO_PEER);
            m.raw(&ifinfomsg(0, 0, 0));
            m.attr_str(IFLA_IFNAME, peer);
            m.attr_u32(IFLA_NET_NS_FD, netns_fd as u32);
            m.nest_end();
            m.nest_end();
            m.nest_end();
        })
    }

    /// The index of link `name`.
    pub fn link_index(&mut self, name: &str) -> Result<u32, NlError> {
        let seq = self.sock.seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_GETLINK, NLM_F_REQUEST, seq);
        m.raw(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        m.end();
        let reply = self.sock.request(&m, seq)?;
        if reply.len() < 16 {
            return Err(NlError {
                errno: libc::EPROTO,
                msg: Some("short RTM_NEWLINK reply".into()),
            });
        }
        Ok(i32::from_ne_bytes([reply[4], reply[5], reply[6], reply[7]]) as u32)
    }

    /// Deletes link `name` (a veth's peer goes with it).
    pub fn delete_link(&mut self, name: &str) -> Result<(), NlError> {
        self.acked(RTM_DELLINK, 0, |m| {
            m.raw(&ifinfomsg(0, 0, 0));
            m.attr_str(IFLA_IFNAME, name);
        })
    }

    /// Deletes link `index`.
    pub fn delete_link_index(&mut self, index: u32) -> Result<(), NlError> {
        self.acked(RTM_DELLINK, 0, |m| {
            m.raw(&ifinfomsg(index as i32, 0, 0));
        })
    }

    /// Brings link `index` up.
    pub fn set_up(&mut self, index: u32) -> Result<(), NlError> {
        self.acked(RTM_NEWLINK, 0, |m| {
            m.raw(&ifinfomsg(index as i32, IFF_UP, IFF_UP));
        })
    }

    /// Turns off IPv6 address generation on link `index` (no link-local
    /// address appears when it comes up).
    pub fn no_ipv6_addr_gen(&mut self, index: u32) -> Result<(), NlError> {
        self.acked(RTM_NEWLINK, 0, |m| {
            m.raw(&ifinfomsg(index as i32, 0, 0));
            m.nest(IFLA_AF_SPEC);
            m.nest(AF_INET6);
            m.attr(IFLA_INET6_ADDR_GEN_MODE, &[IN6_ADDR_GEN_MODE_NONE]);
            m.nest_end();
            m.nest_end();
        })
    }

    /// Adds `addr/prefix` to link `index`.
    pub fn add_addr(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), NlError> {
        self.acked(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, |m| {
            let mut ifa = [0u8; 8];
            ifa[0] = AF_INET;
            ifa[1] = prefix;
            ifa[3] = RT_SCOPE_UNIVERSE;
            ifa[4..8].copy_from_slice(&index.to_ne_bytes());
            m.raw(&ifa);
            m.attr(IFA_LOCAL, &addr.octets());
            m.attr(IFA_ADDRESS, &addr.octets());
        })
    }

    /// Adds a default route via `gateway` on link `index` (main table).
    pub fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), NlError> {
        self.acked(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, |m| {
            m.raw(&rtmsg(
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_STATIC,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST,
            ));
            m.attr(RTA_GATEWAY, &gateway.octets());
            m.attr_u32(RTA_OIF, index);
        })
    }

    /// The output link of a packet `src -> dst` arriving on link `iif`, as
    /// the kernel would forward it (policy routing included). `None` when
    /// the destination is local, unreachable or not unicast.
    pub fn route_get_forward(
        &mut self,
        dst: Ipv4Addr,
        src: Ipv4Addr,
        iif: u32,
    ) -> Result<Option<u32>, NlError> {
        let seq = self.sock.seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_GETROUTE, NLM_F_REQUEST, seq);
        m.raw(&rtmsg(32, 32, 0, 0, 0, 0));
        m.attr(RTA_DST, &dst.octets());
        m.attr(RTA_SRC, &src.octets());
        m.attr_u32(RTA_IIF, iif);
        m.end();
        let reply = self.sock.request(&m, seq)?;
        if reply.len() < 12 || reply[7] != RTN_UNICAST {
            return Ok(None);
        }
        let oif = attrs(&reply[12..])
            .find(|(ty, v)| *ty == RTA_OIF && v.len() == 4)
            .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
        Ok(oif)
    }

    /// Every IPv4 address in this namespace.
    pub fn dump_addrs(&mut self) -> Result<Vec<AddrEntry>, NlError> {
        let seq = self.sock.seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq);
        m.raw(&[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
        m.end();
        let mut out = Vec::new();
        self.sock.dump(&m, seq, |ty, p| {
            if ty != RTM_NEWADDR || p.len() < 8 || p[0] != AF_INET {
                return;
            }
            let prefix = p[1];
            let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
            for (aty, v) in attrs(&p[8..]) {
                if (aty == IFA_LOCAL || aty == IFA_ADDRESS) && v.len() == 4 {
                    out.push(AddrEntry {
                        addr: Ipv4Addr::new(v[0], v[1], v[2], v[3]),
                        prefix,
                        index,
                    });
                }
            }
        })?;
        Ok(out)
    }

    /// Every IPv4 route in this namespace, all tables.
    pub fn dump_routes(&mut self) -> Result<Vec<RouteEntry>, NlError> {
        let seq = self.sock.seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq);
        m.raw(&rtmsg(0, 0, 0, 0, 0, 0));
        m.end();
        let mut out = Vec::new();
        self.sock.dump(&m, seq, |ty, p| {
            if ty != RTM_NEWROUTE || p.len() < 12 || p[0] != AF_INET {
                return;
            }
            let mut r = RouteEntry {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: p[1],
                oif: None,
            };
            for (aty, v) in attrs(&p[12..]) {
                match aty {
                    RTA_DST if v.len() == 4 => r.dst = Ipv4Addr::new(v[0], v[1], v[2], v[3]),
                    RTA_OIF if v.len() == 4 => {
                        r.oif = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
                    }
                    _ => {}
                }
            }
            out.push(r);
        })?;
        Ok(out)
    }
}
