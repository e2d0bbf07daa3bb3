//! The sandbox's DNS resolver: UDP and TCP on the sandbox's loopback port
//! 53 (its `/etc/resolv.conf` names 127.0.0.1, and every query to port 53
//! anywhere is redirected there), served from the host side.
//!
//! A name the policy allows (any host rule matches it) is resolved by the
//! proxy's own resolver; the answer carries only the addresses the proxy
//! would connect to for that name ([`NetworkPolicy::check_address_any`]:
//! special-purpose addresses only with an explicit rule), and each address
//! is remembered as vouched for that name, so that a later transparent
//! connection to it is matched to the name. Any other name gets `NXDOMAIN`
//! without any lookup leaving the host: a query to an unlisted name
//! carries nothing out (no DNS tunnelling through an upstream resolver).
//! Queries other than `A`/`AAAA` for allowed names get an empty answer
//! (`NOERROR`, no records); anything that is not one standard query is
//! `FORMERR`/`REFUSED`. Every query is recorded ([`DnsRecord`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::timeout;

use crate::conn::Shared;
use crate::policy::{normalize_name, NetworkPolicy};
use crate::record::{DenyReason, DnsRecord};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NOERROR: u8 = 0;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;
/// TTL of answers: short, so that programs ask again (and the proxy's
/// view of a name's addresses stays current).
const TTL: u32 = 30;
/// Largest message read (UDP and TCP).
const MAX_MSG: usize = 4096;

/// A parsed question.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Query {
    pub id: u16,
    pub rd: bool,
    /// Raw question section (echoed in the answer).
    pub question: Vec<u8>,
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// Why a message is not one standard query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Bad {
    /// Too short to carry an id: no answer possible.
    Drop,
    /// Answer with this rcode (the id is known).
    Rcode(u16, u8),
}

/// Parses a DNS query: one question, opcode QUERY, no compression in the
/// question.
pub(crate) fn parse_query(msg: &[u8]) -> Result<Query, Bad> {
    if msg.len() < 12 {
        return Err(Bad::Drop);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    if qr {
        return Err(Bad::Drop);
    }
    if opcode != 0 {
        return Err(Bad::Rcode(id, 4)); // NOTIMP
    }
    if qd != 1 {
        return Err(Bad::Rcode(id, RCODE_FORMERR));
    }
    let mut i = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let Some(&len) = msg.get(i) else {
            return Err(Bad::Rcode(id, RCODE_FORMERR));
        };
        let len = usize::from(len);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err(Bad::Rcode(id, RCODE_FORMERR));
        }
        let Some(label) = msg.get(i..i + len) else {
            return Err(Bad::Rcode(id, RCODE_FORMERR));
        };
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let Some(tail) = msg.get(i..i + 4) else {
        return Err(Bad::Rcode(id, RCODE_FORMERR));
    };
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    Ok(Query {
        id,
        rd: flags & 0x0100 != 0,
        question: msg[12..i + 4].to_vec(),
        name: labels.join("."),
        qtype,
        qclass,
    })
}

/// Builds the response to `q` with `rcode` and `answers` (A or AAAA
/// records, matching the query type).
pub(crate) fn response(q: &Query, rcode: u8, answers: &[IpAddr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + q.question.len() + answers.len() * 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, RD copied, RA set.
    let flags: u16 = 0x8000 | if q.rd { 0x0100 } else { 0 } | 0x0080 | u16::from(rcode);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for a in answers {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        let (ty, data): (u16, Vec<u8>) = match a {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// Error-only response for a message whose question could not be parsed.
fn bare_response(id: u16, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(0x8080u16 | u16::from(rcode)).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

fn qtype_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        n => n.to_string(),
    }
}

fn rcode_name(r: u8) -> &'static str {
    match r {
        RCODE_NOERROR => "NOERROR",
        RCODE_FORMERR => "FORMERR",
        RCODE_SERVFAIL => "SERVFAIL",
        RCODE_NXDOMAIN => "NXDOMAIN",
        RCODE_REFUSED => "REFUSED",
        _ => "NOTIMP",
    }
}

/// The decision for one name: the rcode, the addresses, and the refusal.
async fn decide(sh: &Shared, q: &Query) -> (u8, Vec<IpAddr>, Option<DenyReason>) {
    if q.qclass != CLASS_IN {
        return (RCODE_REFUSED, Vec::new(), None);
    }
    let name = match normalize_name(&q.name) {
        Ok(n) => n,
        Err(e) => {
            return (
                RCODE_NXDOMAIN,
                Vec::new(),
                Some(DenyReason::InvalidDestination {
                    detail: e.to_string(),
                }),
            )
        }
    };
    let policy = sh.live.policy();
    let ports = match policy.name_ports(&name) {
        Ok(p) => p,
        Err(e) => return (RCODE_NXDOMAIN, Vec::new(), Some(e)),
    };
    let want_v4 = q.qtype == TYPE_A;
    let want_v6 = q.qtype == TYPE_AAAA;
    let resolved = match timeout(sh.limits.connect_timeout, sh.resolver.resolve(&name)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return (
                RCODE_NXDOMAIN,
                Vec::new(),
                Some(DenyReason::ResolveFailed {
                    detail: e.to_string(),
                }),
            )
        }
        Err(_) => {
            return (
                RCODE_SERVFAIL,
                Vec::new(),
                Some(DenyReason::ResolveFailed {
                    detail: "timed out".into(),
                }),
            )
        }
    };
    let (accepted, refusal) = vouch(&policy, &resolved, &ports);
    sh.remember(&name, &accepted);
    let answers: Vec<IpAddr> = accepted
        .into_iter()
        .filter(|a| (want_v4 && a.is_ipv4()) || (want_v6 && a.is_ipv6()))
        .collect();
    let reason = if answers.is_empty() && (want_v4 || want_v6) {
        refusal
    } else {
        None
    };
    (RCODE_NOERROR, answers, reason)
}

/// The addresses among `resolved` the proxy would connect to for a name
/// allowed on `ports`, and the first refusal among the others.
pub(crate) fn vouch(
    policy: &NetworkPolicy,
    resolved: &[IpAddr],
    ports: &[u16],
) -> (Vec<IpAddr>, Option<DenyReason>) {
    let mut ok = Vec::new();
    let mut first = None;
    for &a in resolved {
        let a = crate::addr::canonical(a);
        match policy.check_address_any(a, ports) {
            Ok(()) => {
                if !ok.contains(&a) {
                    ok.push(a);
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    (ok, first)
}

/// Answers one message; records the query.
async fn answer(sh: &Shared, msg: &[u8], transport: &'static str) -> Option<Vec<u8>> {
    let q = match parse_query(msg) {
        Ok(q) => q,
        Err(Bad::Drop) => return None,
        Err(Bad::Rcode(id, rcode)) => {
            sh.rec.dns_query(DnsRecord {
                name: String::new(),
                qtype: String::new(),
                transport,
                allowed: false,
                answers: Vec::new(),
                rcode: rcode_name(rcode),
                reason: Some(DenyReason::InvalidDestination {
                    detail: "not one standard DNS query".into(),
                }),
                at: SystemTime::now(),
            });
            return Some(bare_response(id, rcode));
        }
    };
    let (rcode, answers, reason) = decide(sh, &q).await;
    let allowed = rcode == RCODE_NOERROR;
    sh.rec.dns_query(DnsRecord {
        name: q.name.chars().take(255).collect(),
        qtype: qtype_name(q.qtype),
        transport,
        allowed,
        answers: answers.clone(),
        rcode: rcode_name(rcode),
        reason,
        at: SystemTime::now(),
    });
    Some(response(&q, rcode, &answers))
}

/// Serves DNS over UDP until the task is dropped.
pub(crate) async fn serve_udp(sh: Arc<Shared>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let msg = buf[..n].to_vec();
        let (sh, sock) = (sh.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(resp) = answer(&sh, &msg, "udp").await {
                // Classic DNS over UDP: at most 512 bytes, else truncated
                // (TC) so that the client retries over TCP.
                let resp = if resp.len() > 512 {
                    let mut t = resp[..12].to_vec();
                    t[2] |= 0x02;
                    t[6..8].copy_from_slice(&[0, 0]);
                    t
                } else {
                    resp
                };
                let _ = sock.send_to(&resp, peer).await;
            }
        });
    }
}

/// Serves DNS over TCP (length-prefixed messages) until the task is
/// dropped.
pub(crate) async fn serve_tcp(sh: Arc<Shared>, l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 2];
                if timeout(sh.limits.handshake_timeout, s.read_exact(&mut len))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return;
                }
                let n = usize::from(u16::from_be_bytes(len));
                if n > MAX_MSG {
                    return;
                }
                let mut msg = vec![0u8; n];
                if s.read_exact(&mut msg).await.is_err() {
                    return;
                }
                let Some(resp) = answer(&sh, &msg, "tcp").await else {
                    return;
                };
                let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&resp);
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn parses_and_answers_a_query() {
        let q = parse_query(&query("Api.Example.com", TYPE_A)).unwrap();
        assert_eq!(q.name, "api.example.com");
        assert_eq!(q.qtype, TYPE_A);
        let r = response(&q, RCODE_NOERROR, &["93.184.216.34".parse().unwrap()]);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
        assert_eq!(&r[r.len() - 4..], &[93, 184, 216, 34]);
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(parse_query(&[1, 2, 3]), Err(Bad::Drop));
        let mut m = query("a.b", TYPE_A);
        m[5] = 2;
        assert_eq!(parse_query(&m), Err(Bad::Rcode(0x1234, RCODE_FORMERR)));
        let mut m = query("a.b", TYPE_A);
        m.truncate(m.len() - 2);
        assert_eq!(parse_query(&m), Err(Bad::Rcode(0x1234, RCODE_FORMERR)));
    }

    #[test]
    fn vouches_only_for_addresses_the_proxy_accepts() {
        let p = NetworkPolicy::allowlist(["a.test"], ["10.9.0.2/32:80"]).unwrap();
        let (ok, refusal) = vouch(
            &p,
            &[
                "10.9.0.2".parse().unwrap(),
                "10.9.0.3".parse().unwrap(),
                "93.184.216.34".parse().unwrap(),
            ],
            &[80, 443],
        );
        assert_eq!(
            ok,
            vec![
                "10.9.0.2".parse::<IpAddr>().unwrap(),
                "93.184.216.34".parse().unwrap()
            ]
        );
        assert!(matches!(refusal, Some(DenyReason::SpecialAddress { .. })));
    }
}
