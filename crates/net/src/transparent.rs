//! Transparent connections: TCP connections the sandbox opened to any
//! address, redirected by the sandbox's own nftables rules
//! ([`crate::kernel::RedirectRules`]) to a listener on its loopback that
//! the proxy serves.
//!
//! For each connection the proxy
//! 1. reads the original destination (`SO_ORIGINAL_DST`,
//!    `IP6T_SO_ORIGINAL_DST`); a connection made straight to the listener
//!    has none and is refused;
//! 2. reads the client's first bytes (waiting at most [`PEEK_WAIT`] — a
//!    protocol where the server speaks first gets no name) and takes the
//!    name from a TLS ClientHello's SNI or an HTTP request's `Host`;
//! 3. decides with the same policy as the proxy: with a name, the name and
//!    port must be allowed **and** the address must be one of the name's
//!    (as the sandbox's DNS answered it, or as the proxy resolves it now),
//!    so an allowed SNI on an unlisted address is refused
//!    ([`DenyReason::NameAddressMismatch`]); without a name, the address
//!    must have been answered by the sandbox's DNS for a name allowed on
//!    this port, or be covered by a CIDR / literal-IP rule; special-purpose
//!    addresses need an explicit rule in every case;
//! 4. connects to exactly that address and port and relays, counting bytes
//!    per connection and against the sandbox's cap.
//!
//! Only the first ClientHello / request head is inspected: later requests
//! on a kept-alive HTTP connection go to the same, already checked address
//! (as with a `CONNECT` tunnel).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::addr::canonical;
use crate::conn::{send, ActiveGuard, End, Shared};
use crate::http::{self, MAX_HEAD, MAX_HEADERS};
use crate::policy::Host;
use crate::record::{ConnRecord, DenyReason, Protocol};
use crate::sni::{parse_client_hello, Hello, MAX_HELLO};

/// How long the proxy waits for the client's first bytes before deciding
/// on the address alone (server-speaks-first protocols: SMTP, MySQL, ...).
pub(crate) const PEEK_WAIT: Duration = Duration::from_millis(250);

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the program connected to before the redirect.
fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let fd = s.as_raw_fd();
    let v6 = s.local_addr()?.is_ipv6();
    if v6 {
        // SAFETY: sockaddr_in6 is plain data; the kernel writes at most `len`
        // bytes into it.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: `sa` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
            u16::from_be(sa.sin6_port),
        ))
    } else {
        // SAFETY: as above, for sockaddr_in.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `sa` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
            u16::from_be(sa.sin_port),
        ))
    }
}

/// A name learnt from the first bytes, and where from.
type Sniffed = Option<(String, &'static str)>;

/// Reads the client's first bytes into `initial` and finds the name in
/// them (TLS SNI or HTTP `Host`).
async fn sniff(
    sh: &Shared,
    client: &mut TcpStream,
    initial: &mut Vec<u8>,
    port: u16,
) -> Result<Sniffed, DenyReason> {
    initial.reserve(4096);
    // `read_buf` returns what has arrived (one segment, usually the whole
    // ClientHello or request head).
    match timeout(PEEK_WAIT, client.read_buf(initial)).await {
        Ok(Ok(n)) if n > 0 => {}
        // Nothing yet (or closed): decide on the address.
        _ => return Ok(None),
    }
    if initial[0] == 0x16 {
        loop {
            match parse_client_hello(initial) {
                Hello::NotTls => return Ok(None),
                Hello::ClientHello(sni) => return Ok(sni.map(|s| (s, "sni"))),
                Hello::Malformed => return Err(DenyReason::MalformedTlsHello),
                Hello::NeedMore => {
                    if initial.len() >= MAX_HELLO {
                        return Err(DenyReason::MalformedTlsHello);
                    }
                    initial.reserve(4096);
                    match timeout(sh.limits.handshake_timeout, client.read_buf(initial)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return Err(DenyReason::MalformedTlsHello),
                    }
                }
            }
        }
    }
    if !initial[0].is_ascii_alphabetic() {
        return Ok(None);
    }
    // Perhaps an HTTP request: read its head (bounded), take the Host.
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(initial) {
            Ok(httparse::Status::Complete(_)) => {
                let hosts: Vec<&[u8]> = req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("host"))
                    .map(|h| h.value)
                    .collect();
                return match hosts.as_slice() {
                    [] => Ok(None),
                    [h] => {
                        let value = String::from_utf8_lossy(h).into_owned();
                        match http::parse_authority(&value, Some(port)) {
                            Ok((Host::Name(n), _)) => Ok(Some((n, "http_host"))),
                            Ok((Host::Ip(_), _)) => Ok(None),
                            Err(detail) => Err(DenyReason::InvalidDestination { detail }),
                        }
                    }
                    _ => Err(DenyReason::InvalidDestination {
                        detail: "more than one Host header".into(),
                    }),
                };
            }
            Ok(httparse::Status::Partial) if initial.len() < MAX_HEAD && http_prefix(initial) => {}
            // Not HTTP (or a huge head): decide on the address.
            _ => return Ok(None),
        }
        initial.reserve(4096);
        match timeout(PEEK_WAIT * 4, client.read_buf(initial)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(None),
        }
    }
}

/// HTTP request methods: only bytes that can begin one of these are waited
/// on for a full request head (anything else is decided at once).
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"PRI",
];

/// Whether `buf` can be the start of an HTTP request (a method, then a
/// space).
fn http_prefix(buf: &[u8]) -> bool {
    let token = buf.split(|&b| b == b' ').next().unwrap_or(buf);
    let complete = token.len() < buf.len();
    METHODS.iter().any(|m| {
        if complete {
            *m == token
        } else {
            m.starts_with(token)
        }
    })
}

/// The policy decision for a connection to `ip:port` presenting `name`.
async fn decide(
    sh: &Shared,
    ip: IpAddr,
    port: u16,
    name: &Sniffed,
) -> Result<Option<String>, DenyReason> {
    let policy = sh.live.policy();
    if let Some((n, _)) = name {
        policy.check_destination(&Host::Name(n.clone()), port)?;
        let mut vouched = sh.names_for(ip).iter().any(|x| x == n);
        if !vouched {
            // Not (or no longer) in the DNS answers: resolve it now.
            if let Ok(Ok(addrs)) = timeout(sh.limits.connect_timeout, sh.resolver.resolve(n)).await
            {
                let (ok, _) = crate::dns::vouch(&policy, &addrs, &[port]);
                sh.remember(n, &ok);
                vouched = ok.contains(&ip);
            }
        }
        if !vouched {
            return Err(DenyReason::NameAddressMismatch {
                name: n.clone(),
                address: ip,
            });
        }
        policy.check_address(ip, port)?;
        return Ok(Some(n.clone()));
    }
    let mut refusal = None;
    for n in sh.names_for(ip) {
        match policy.check_destination(&Host::Name(n.clone()), port) {
            Ok(()) => {
                policy.check_address(ip, port)?;
                return Ok(Some(n));
            }
            Err(e) => {
                refusal.get_or_insert(e);
            }
        }
    }
    match policy.check_destination(&Host::Ip(ip), port) {
        Ok(()) => {
            policy.check_address(ip, port)?;
            Ok(None)
        }
        Err(e) => Err(match (refusal, e) {
            // A name vouched for the address but not on this port.
            (Some(r), _) => r,
            // No name, and no rule for the bare address: is it special?
            (None, DenyReason::AddressNotAllowed) => match policy.check_address(ip, port) {
                Err(special) => special,
                Ok(()) => DenyReason::AddressNotAllowed,
            },
            (None, e) => e,
        }),
    }
}

/// Serves one redirected connection to completion.
pub(crate) async fn serve(sh: Arc<Shared>, mut client: TcpStream) {
    sh.rec.accepted.fetch_add(1, Ordering::Relaxed);
    let Ok(_client_permit) = sh.clients.clone().try_acquire_owned() else {
        let reason = DenyReason::ConnectionLimit {
            max: sh.limits.max_connections,
        };
        sh.rec.deny(String::new(), 0, Protocol::Transparent, reason);
        return;
    };
    let _active = ActiveGuard::new(&sh.rec);
    let dst = match original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            sh.rec.deny(
                String::new(),
                0,
                Protocol::Transparent,
                DenyReason::InvalidDestination {
                    detail: format!(
                        "no original destination ({e}): connected to the redirect port itself"
                    ),
                },
            );
            return;
        }
    };
    let (ip, port) = (canonical(dst.ip()), dst.port());
    if ip.is_loopback() {
        // Not redirected (loopback is left alone): a program connected to
        // the listener itself.
        reset_on_close(&client);
        sh.rec.deny(
            ip.to_string(),
            port,
            Protocol::Transparent,
            DenyReason::InvalidDestination {
                detail: "connected to nanoclaw's redirect listener itself".into(),
            },
        );
        return;
    }
    let mut initial = Vec::new();
    let sniffed = sniff(&sh, &mut client, &mut initial, port).await;
    let decision = match &sniffed {
        Ok(name) => decide(&sh, ip, port, name).await,
        Err(e) => Err(e.clone()),
    };
    let (name, source) = match &sniffed {
        Ok(Some((n, s))) => (Some(n.clone()), *s),
        _ => (None, "none"),
    };
    let mut record = ConnRecord {
        address: ip,
        port,
        name: name.clone(),
        name_source: source,
        allowed: false,
        reason: None,
        bytes_up: 0,
        bytes_down: 0,
        at: SystemTime::now(),
    };
    let upstream = match decision {
        Ok(vouched) => {
            if record.name.is_none() {
                record.name = vouched;
                if record.name.is_some() {
                    record.name_source = "dns";
                }
            }
            open(&sh, SocketAddr::new(ip, port)).await
        }
        Err(e) => Err(e),
    };
    let (upstream, _permit) = match upstream {
        Ok(u) => u,
        Err(reason) => {
            let dest = record.name.clone().unwrap_or_else(|| ip.to_string());
            record.reason = Some(reason.clone());
            // A reset, so that the program fails at once (ECONNRESET)
            // rather than reading an empty answer.
            reset_on_close(&client);
            sh.rec.connection(record);
            sh.rec.deny(dest, port, Protocol::Transparent, reason);
            return;
        }
    };
    // Registered before any byte passes: a policy update from here on
    // closes it if no rule of the new policy admits it.
    let mut ticket = match sh.live.admit(record.name.as_deref(), ip, port) {
        Ok(t) => t,
        Err(reason) => {
            let dest = record.name.clone().unwrap_or_else(|| ip.to_string());
            record.reason = Some(reason.clone());
            reset_on_close(&client);
            sh.rec.connection(record);
            sh.rec.deny(dest, port, Protocol::Transparent, reason);
            return;
        }
    };
    record.allowed = true;
    let (bytes, idx) = sh.rec.connection(record);
    let _ = upstream.set_nodelay(true);
    let fd = client.as_raw_fd();
    let ic = sh.intercept.as_ref();
    let work = async {
        match (&name, source, ic) {
            // A host with credential rules, named by the SNI or the Host.
            (Some(n), "sni", Some(ic)) if ic.wants(n) => {
                let counters = Some((&bytes.up, &bytes.down));
                crate::intercept::serve_tls(&sh, ic, client, upstream, n, port, initial, counters)
                    .await
            }
            (Some(n), "http_host", Some(ic)) if ic.wants(n) => {
                let counters = Some((&bytes.up, &bytes.down));
                crate::intercept::serve_http(&sh, ic, client, upstream, n, port, initial, counters)
                    .await
            }
            _ => relay(&sh, client, upstream, &initial, &bytes).await,
        }
    };
    let relayed = ticket.guard(work, Some(fd)).await;
    if let Err(End::Deny(reason)) = relayed {
        let dest = name.unwrap_or_else(|| ip.to_string());
        sh.rec.cut(idx, reason.clone());
        sh.rec.deny(dest, port, Protocol::Transparent, reason);
    }
}

/// Makes closing `s` send a reset (`SO_LINGER` with a zero timeout, which
/// never blocks).
fn reset_on_close(s: &TcpStream) {
    reset_fd_on_close(s.as_raw_fd());
}

/// [`reset_on_close`] for a descriptor still open (owned elsewhere).
pub(crate) fn reset_fd_on_close(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` outlives the call and its size is passed; the caller
    // passes a descriptor that is open for the duration of the call (a
    // wrong one gets at most an error back).
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Takes a connection slot and connects to the checked address.
async fn open(
    sh: &Shared,
    sa: SocketAddr,
) -> Result<(TcpStream, tokio::sync::OwnedSemaphorePermit), DenyReason> {
    let permit = crate::conn::take_slot(sh)?;
    match timeout(sh.limits.connect_timeout, sh.connector.connect(sa)).await {
        Ok(Ok(s)) => {
            sh.rec.allowed.fetch_add(1, Ordering::Relaxed);
            Ok((s, permit))
        }
        Ok(Err(e)) => Err(DenyReason::ConnectFailed {
            address: sa.ip(),
            detail: e.to_string(),
        }),
        Err(_) => Err(DenyReason::ConnectFailed {
            address: sa.ip(),
            detail: "timed out".into(),
        }),
    }
}

/// Passes the connection through: the bytes already read from the client
/// first, then both directions spliced (crate::splice) until both ends.
async fn relay(
    sh: &Shared,
    client: TcpStream,
    mut upstream: TcpStream,
    initial: &[u8],
    bytes: &crate::record::ConnBytes,
) -> Result<(), End> {
    // Small (a request head or a ClientHello, or nothing for protocols
    // where the server speaks first): it fits the socket's buffer, so
    // sending it before reading the other direction cannot stall.
    send(sh, &mut upstream, initial, true).await?;
    bytes.up.fetch_add(initial.len() as u64, Ordering::Relaxed);
    let up = crate::splice::pump(sh, &client, &upstream, true, &bytes.up);
    let down = crate::splice::pump(sh, &upstream, &client, false, &bytes.down);
    tokio::try_join!(up, down).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::http_prefix;

    #[test]
    fn waits_only_for_what_can_be_an_http_request() {
        assert!(http_prefix(b"GE"));
        assert!(http_prefix(b"GET /x HTTP/1.1\r\nHo"));
        assert!(http_prefix(b"PRI * HTTP/2.0"));
        assert!(!http_prefix(b"x"));
        assert!(!http_prefix(b"EHLO mail.example\r\n"));
        assert!(!http_prefix(b"GETX / HTTP/1.1"));
    }
}
