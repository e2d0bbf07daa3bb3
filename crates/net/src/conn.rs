//! One client connection: protocol detection (first byte), HTTP CONNECT,
//! plain HTTP forwarding, SOCKS5; the policy checks; the relay with byte
//! accounting and the SNI check.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;

use crate::addr::canonical;
use crate::http::{self, Target, MAX_HEAD, MAX_HEADERS};
use crate::live::{Live, Ticket};
use crate::policy::{Host, NetworkPolicy};
use crate::record::{DenyReason, Limits, Protocol, Recorder};
use crate::resolve::{Connect, Resolve};
use crate::sni::{parse_client_hello, Hello};

const RELAY_BUF: usize = 64 * 1024;

/// Everything the connection handlers share.
pub(crate) struct Shared {
    /// The current policy and the open connections (live updates).
    pub(crate) live: Live,
    pub(crate) limits: Limits,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) connector: Arc<dyn Connect>,
    pub(crate) rec: Recorder,
    /// Client connections (handshake included).
    pub(crate) clients: Arc<Semaphore>,
    /// Established upstream connections.
    pub(crate) tunnels: Arc<Semaphore>,
    /// Address → names the sandbox's DNS answered with it (the names it
    /// vouches for), for transparent connections.
    pub(crate) names: std::sync::Mutex<std::collections::HashMap<IpAddr, Vec<String>>>,
    /// Credential rules and the sandbox's CA, when the policy has rules.
    pub(crate) intercept: Option<crate::intercept::Intercept>,
}

/// Most addresses remembered from DNS answers (beyond it a transparent
/// connection without SNI/`Host` to a new address is matched by CIDR rules
/// only; with a name, the name is resolved again).
const MAX_REMEMBERED: usize = 65_536;

impl Shared {
    /// Records that the sandbox's DNS answered `name` with `addrs`.
    pub(crate) fn remember(&self, name: &str, addrs: &[IpAddr]) {
        let mut map = match self.names.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        for a in addrs {
            if map.len() >= MAX_REMEMBERED && !map.contains_key(a) {
                return;
            }
            let names = map.entry(*a).or_default();
            if !names.iter().any(|n| n == name) && names.len() < 64 {
                names.push(name.to_string());
            }
        }
    }

    /// The names the sandbox's DNS answered with `addr`.
    pub(crate) fn names_for(&self, addr: IpAddr) -> Vec<String> {
        let map = match self.names.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(&addr).cloned().unwrap_or_default()
    }
}

impl Shared {
    pub(crate) fn new(
        policy: NetworkPolicy,
        limits: Limits,
        resolver: Arc<dyn Resolve>,
        connector: Arc<dyn Connect>,
    ) -> Shared {
        Shared {
            clients: Arc::new(Semaphore::new(
                limits
                    .max_connections
                    .saturating_add(Limits::HANDSHAKE_SLACK),
            )),
            tunnels: Arc::new(Semaphore::new(limits.max_connections)),
            live: Live::new(policy),
            limits,
            resolver,
            connector,
            rec: Recorder::default(),
            names: std::sync::Mutex::new(std::collections::HashMap::new()),
            intercept: None,
        }
    }
}

pub(crate) struct ActiveGuard<'a>(&'a Recorder);

impl<'a> ActiveGuard<'a> {
    pub(crate) fn new(rec: &'a Recorder) -> Self {
        let now = rec.active.fetch_add(1, Ordering::Relaxed) + 1;
        rec.peak_active.fetch_max(now, Ordering::Relaxed);
        ActiveGuard(rec)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a relay ended early.
pub(crate) enum End {
    Io,
    Deny(DenyReason),
}

impl From<io::Error> for End {
    fn from(_: io::Error) -> Self {
        End::Io
    }
}

/// Serves one accepted client connection to completion.
pub(crate) async fn serve<S>(sh: Arc<Shared>, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    sh.rec.accepted.fetch_add(1, Ordering::Relaxed);
    let Ok(_client_permit) = sh.clients.clone().try_acquire_owned() else {
        sh.rec.deny(
            String::new(),
            0,
            Protocol::Unknown,
            DenyReason::ConnectionLimit {
                max: sh.limits.max_connections,
            },
        );
        return;
    };
    let _active = ActiveGuard::new(&sh.rec);
    let mut first = [0u8; 1];
    match timeout(sh.limits.handshake_timeout, client.read_exact(&mut first)).await {
        Ok(Ok(_)) => {}
        _ => {
            sh.rec.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    match first[0] {
        0x05 => socks5(&sh, client).await,
        0x04 => {
            let _ = client.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await;
            sh.rec.deny(
                String::new(),
                0,
                Protocol::Unknown,
                DenyReason::Unsupported {
                    what: "SOCKS4 (use SOCKS5 or HTTP CONNECT)".into(),
                },
            );
        }
        b if b.is_ascii_alphabetic() => http_request(&sh, client, first[0]).await,
        _ => {
            sh.rec.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection slot, unless the sandbox's byte cap is spent or all its
/// connection slots are taken (the caps every upstream connection counts
/// against, proxied or transparent).
pub(crate) fn take_slot(sh: &Shared) -> Result<OwnedSemaphorePermit, DenyReason> {
    if sh.rec.bytes_exhausted(sh.limits.max_bytes) {
        return Err(DenyReason::ByteLimit {
            max: sh.limits.max_bytes,
        });
    }
    sh.tunnels
        .clone()
        .try_acquire_owned()
        .map_err(|_| DenyReason::ConnectionLimit {
            max: sh.limits.max_connections,
        })
}

/// An upstream connection: the stream, its connection slot, and its place
/// among the open connections (a policy update may cut it).
type Upstream<'a> = (TcpStream, OwnedSemaphorePermit, Ticket<'a>);

/// Checks, resolves (once) and connects to a checked address.
async fn open_upstream<'a>(
    sh: &'a Shared,
    host: &Host,
    port: u16,
) -> Result<Upstream<'a>, DenyReason> {
    let policy = sh.live.policy();
    policy.check_destination(host, port)?;
    let permit = take_slot(sh)?;
    let candidates: Vec<IpAddr> = match host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            match timeout(sh.limits.connect_timeout, sh.resolver.resolve(name)).await {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(e)) => {
                    return Err(DenyReason::ResolveFailed {
                        detail: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(DenyReason::ResolveFailed {
                        detail: "timed out".into(),
                    })
                }
            }
        }
    };
    let mut checked = Vec::with_capacity(candidates.len());
    let mut first_refusal = None;
    for addr in candidates {
        let addr = canonical(addr);
        match policy.check_address(addr, port) {
            Ok(()) => {
                if !checked.contains(&addr) {
                    checked.push(addr);
                }
            }
            Err(reason) => {
                first_refusal.get_or_insert(reason);
            }
        }
    }
    if checked.is_empty() {
        return Err(first_refusal.unwrap_or(DenyReason::ResolveFailed {
            detail: "the name has no addresses".into(),
        }));
    }
    let mut last = None;
    for addr in checked {
        let sa = SocketAddr::new(addr, port);
        match timeout(sh.limits.connect_timeout, sh.connector.connect(sa)).await {
            Ok(Ok(stream)) => {
                let name = match host {
                    Host::Name(n) => Some(n.as_str()),
                    Host::Ip(_) => None,
                };
                let ticket = sh.live.admit(name, addr, port)?;
                sh.rec.allowed.fetch_add(1, Ordering::Relaxed);
                return Ok((stream, permit, ticket));
            }
            Ok(Err(e)) => last = Some((addr, e.to_string())),
            Err(_) => last = Some((addr, "timed out".to_string())),
        }
    }
    let (address, detail) = last.unwrap_or((IpAddr::from([0, 0, 0, 0]), String::new()));
    Err(DenyReason::ConnectFailed { address, detail })
}

fn http_status(reason: &DenyReason) -> u16 {
    match reason {
        DenyReason::ResolveFailed { .. } | DenyReason::ConnectFailed { .. } => 502,
        DenyReason::ConnectionLimit { .. } | DenyReason::ByteLimit { .. } => 503,
        DenyReason::InvalidDestination { .. } => 400,
        DenyReason::Unsupported { .. } => 501,
        _ => 403,
    }
}

pub(crate) async fn read_http_head<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(_)) => return Ok(()),
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        buf.reserve(4096);
        if client.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn http_request<S>(sh: &Shared, mut client: S, first: u8)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = Vec::with_capacity(4096);
    buf.push(first);
    match timeout(
        sh.limits.handshake_timeout,
        read_http_head(&mut client, &mut buf),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            sh.rec.protocol_errors.fetch_add(1, Ordering::Relaxed);
            if e.kind() == io::ErrorKind::InvalidData {
                let status =
                    if e.to_string().contains("too large") || e.to_string().contains("headers") {
                        431
                    } else {
                        400
                    };
                let _ = client
                    .write_all(&http::error_response(
                        status,
                        &format!("bad request: {e}"),
                        None,
                    ))
                    .await;
            }
            return;
        }
        Err(_) => {
            sh.rec.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return,
    };
    let method = req.method.unwrap_or("GET").to_string();
    let target = req.path.unwrap_or("/");
    let hosts: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value)
        .collect();
    let proto = if method.eq_ignore_ascii_case("CONNECT") {
        Protocol::HttpConnect
    } else {
        Protocol::HttpForward
    };

    let deny_with = |dest: String, port: u16, reason: DenyReason| {
        let text = if dest.is_empty() {
            format!("request refused: {reason}")
        } else {
            format!("{dest}:{port} refused: {reason}")
        };
        let resp = http::error_response(http_status(&reason), &text, Some(reason.kind()));
        sh.rec.deny(dest, port, proto, reason);
        resp
    };

    // Work out the destination.
    let (authority, path, default_port) = match http::classify_target(&method, target) {
        Target::Connect(a) => (a.to_string(), None, None),
        Target::Absolute { authority, path } => (authority.to_string(), Some(path), Some(80)),
        Target::Origin(p) => match hosts.as_slice() {
            [h] => (
                String::from_utf8_lossy(h).into_owned(),
                Some(p.to_string()),
                Some(80),
            ),
            _ => {
                let resp = deny_with(
                    String::new(),
                    0,
                    DenyReason::InvalidDestination {
                        detail: "origin-form request without exactly one Host header".into(),
                    },
                );
                let _ = client.write_all(&resp).await;
                return;
            }
        },
        Target::Unsupported(what) => {
            let resp = deny_with(String::new(), 0, DenyReason::Unsupported { what });
            let _ = client.write_all(&resp).await;
            return;
        }
    };
    let (host, port) = match http::parse_authority(&authority, default_port) {
        Ok(hp) => hp,
        Err(detail) => {
            let resp = deny_with(authority, 0, DenyReason::InvalidDestination { detail });
            let _ = client.write_all(&resp).await;
            return;
        }
    };
    let dest = host.to_string();
    if path.is_some() {
        // Plain HTTP: the Host header must name the same host as the URI.
        if hosts.len() > 1 {
            let resp = deny_with(
                dest,
                port,
                DenyReason::InvalidDestination {
                    detail: "more than one Host header".into(),
                },
            );
            let _ = client.write_all(&resp).await;
            return;
        }
        if let Some(h) = hosts.first() {
            let value = String::from_utf8_lossy(h).into_owned();
            let same =
                matches!(http::parse_authority(&value, Some(port)), Ok((hh, _)) if hh == host);
            if !same {
                let resp = deny_with(dest, port, DenyReason::HostHeaderMismatch { host: value });
                let _ = client.write_all(&resp).await;
                return;
            }
        }
    }

    let (upstream, _permit, ticket) = match open_upstream(sh, &host, port).await {
        Ok(u) => u,
        Err(reason) => {
            let resp = deny_with(dest, port, reason);
            let _ = client.write_all(&resp).await;
            return;
        }
    };
    let leftover = buf[head_len..].to_vec();
    match path {
        None => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let to = To {
                host: &host,
                port,
                proto,
            };
            tunnel(sh, client, upstream, to, ticket, leftover).await;
        }
        Some(path) => {
            let host_header = if authority.is_empty() {
                dest.clone()
            } else {
                authority
            };
            let mut head = http::rewrite_request(&req, &method, &path, &host_header);
            if let (Some(ic), Host::Name(n)) = (&sh.intercept, &host) {
                if let Some(h) = crate::intercept::rewrite_forward_head(ic, n, &head) {
                    sh.rec.intercepted.fetch_add(1, Ordering::Relaxed);
                    head = h;
                }
            }
            let head_request = method.eq_ignore_ascii_case("HEAD");
            let req = ForwardRequest {
                head,
                leftover,
                head_request,
            };
            forward(sh, client, upstream, (&host, port), ticket, req).await;
        }
    }
}

/// Counts `n` bytes against the cap; returns how many may pass.
pub(crate) fn grant(sh: &Shared, n: usize, up: bool) -> usize {
    let g = sh.rec.reserve_bytes(n as u64, sh.limits.max_bytes);
    let counter = if up {
        &sh.rec.bytes_up
    } else {
        &sh.rec.bytes_down
    };
    counter.fetch_add(g, Ordering::Relaxed);
    usize::try_from(g).unwrap_or(n)
}

/// Writes `data` within the byte cap.
pub(crate) async fn send<W: AsyncWrite + Unpin>(
    sh: &Shared,
    w: &mut W,
    data: &[u8],
    up: bool,
) -> Result<(), End> {
    if data.is_empty() {
        return Ok(());
    }
    let g = grant(sh, data.len(), up);
    w.write_all(&data[..g]).await?;
    if g < data.len() {
        return Err(End::Deny(DenyReason::ByteLimit {
            max: sh.limits.max_bytes,
        }));
    }
    Ok(())
}

/// Copies `r` to `w` until EOF (then shuts `w` down), within the byte cap.
async fn pump<R, W>(sh: &Shared, r: &mut R, w: &mut W, up: bool) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        send(sh, w, &buf[..n], up).await?;
    }
}

/// Client → upstream for a tunnel: inspects a leading TLS ClientHello and
/// refuses an SNI that names another host than the target, then copies.
async fn pump_up_checked<S>(
    sh: &Shared,
    r: &mut ReadHalf<S>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    target: &Host,
    mut initial: Vec<u8>,
) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if initial.is_empty() {
        initial.reserve(4096);
        // No timeout here: server-speaks-first protocols are legitimate.
        if r.read_buf(&mut initial).await? == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
    }
    loop {
        match parse_client_hello(&initial) {
            Hello::NotTls => break,
            Hello::ClientHello(sni) => {
                if let Some(sni) = sni {
                    let ok = matches!(target, Host::Name(n) if *n == sni);
                    if !ok {
                        return Err(End::Deny(DenyReason::SniMismatch { sni }));
                    }
                }
                break;
            }
            Hello::Malformed => return Err(End::Deny(DenyReason::MalformedTlsHello)),
            Hello::NeedMore => {
                initial.reserve(4096);
                match timeout(sh.limits.handshake_timeout, r.read_buf(&mut initial)).await {
                    Ok(Ok(0)) => return Err(End::Deny(DenyReason::MalformedTlsHello)),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(End::Deny(DenyReason::MalformedTlsHello)),
                }
            }
        }
    }
    send(sh, w, &initial, true).await?;
    pump(sh, r, w, true).await
}

fn split<S: AsyncRead + AsyncWrite>(s: S) -> (ReadHalf<S>, WriteHalf<S>) {
    tokio::io::split(s)
}

/// Where a tunnel goes.
struct To<'a> {
    host: &'a Host,
    port: u16,
    proto: Protocol,
}

async fn tunnel<S>(
    sh: &Shared,
    client: S,
    upstream: TcpStream,
    to: To<'_>,
    mut ticket: Ticket<'_>,
    leftover: Vec<u8>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let (Some(ic), Host::Name(n)) = (&sh.intercept, to.host) {
        if ic.wants(n) {
            let work = async {
                crate::intercept::tunnel(sh, ic, client, upstream, n, to.port, to.proto, leftover)
                    .await;
                Ok(())
            };
            if let Err(End::Deny(reason)) = ticket.guard(work, None).await {
                sh.rec.deny(to.host.to_string(), to.port, to.proto, reason);
            }
            return;
        }
    }
    let (mut cr, mut cw) = split(client);
    let (mut ur, mut uw) = upstream.into_split();
    let up = pump_up_checked(sh, &mut cr, &mut uw, to.host, leftover);
    let down = pump(sh, &mut ur, &mut cw, false);
    let relay = async { tokio::try_join!(up, down).map(|_| ()) };
    if let Err(End::Deny(reason)) = ticket.guard(relay, None).await {
        sh.rec.deny(to.host.to_string(), to.port, to.proto, reason);
    }
}

/// Upstream → client for plain HTTP: rewrites the response head(s) to carry
/// `Connection: close`, then copies the body. With a `Content-Length` (or a
/// body-less response) it stops after the body even if the upstream ignores
/// `Connection: close`; otherwise it copies until the upstream closes.
async fn pump_response<W: AsyncWrite + Unpin>(
    sh: &Shared,
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut W,
    head_request: bool,
) -> Result<(), End> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut body_len: Option<u64> = None;
    loop {
        // Read one response head.
        let (head, len, code) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let code = resp.code.unwrap_or(0);
                    let head = if (100..200).contains(&code) {
                        buf[..n].to_vec()
                    } else {
                        body_len = http::response_body_len(&resp, head_request);
                        http::rewrite_response(&resp)
                    };
                    break (Some(head), n, code);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                // Unparseable or huge: pass through unchanged.
                _ => break (None, 0, 0),
            }
            buf.reserve(8192);
            if r.read_buf(&mut buf).await? == 0 {
                break (None, 0, 0);
            }
        };
        if let Some(head) = head {
            send(sh, w, &head, false).await?;
            buf.drain(..len);
            if (100..200).contains(&code) && code != 101 {
                continue;
            }
        }
        break;
    }
    let Some(mut remaining) = body_len else {
        send(sh, w, &buf, false).await?;
        return pump(sh, r, w, false).await;
    };
    let first = usize::try_from(remaining)
        .unwrap_or(usize::MAX)
        .min(buf.len());
    send(sh, w, &buf[..first], false).await?;
    remaining -= first as u64;
    let mut chunk = vec![0u8; RELAY_BUF];
    while remaining > 0 {
        let want = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(RELAY_BUF);
        let n = r.read(&mut chunk[..want]).await?;
        if n == 0 {
            break;
        }
        send(sh, w, &chunk[..n], false).await?;
        remaining -= n as u64;
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// The rewritten request of a plain-HTTP forward.
struct ForwardRequest {
    /// The upstream request head.
    head: Vec<u8>,
    /// Bytes the client sent after the head (start of the body).
    leftover: Vec<u8>,
    /// Whether the method was HEAD (the response has no body).
    head_request: bool,
}

async fn forward<S>(
    sh: &Shared,
    client: S,
    upstream: TcpStream,
    (target, port): (&Host, u16),
    mut ticket: Ticket<'_>,
    req: ForwardRequest,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = split(client);
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        send(sh, &mut uw, &req.head, true).await?;
        send(sh, &mut uw, &req.leftover, true).await?;
        pump(sh, &mut cr, &mut uw, true).await
    };
    let relay = async {
        let down = pump_response(sh, &mut ur, &mut cw, req.head_request);
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut down => r,
            r = &mut up => match r {
                Ok(()) => down.await,
                Err(e) => Err(e),
            },
        }
    };
    let result = ticket.guard(relay, None).await;
    if let Err(End::Deny(reason)) = result {
        sh.rec
            .deny(target.to_string(), port, Protocol::HttpForward, reason);
    }
    let _ = cw.shutdown().await;
}

/// SOCKS5 reply codes.
mod rep {
    pub const OK: u8 = 0x00;
    pub const RULESET: u8 = 0x02;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const REFUSED: u8 = 0x05;
    pub const COMMAND: u8 = 0x07;
    pub const ATYP: u8 = 0x08;
}

fn socks_reply(code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![5, code, 0];
    match bound.map(|b| (canonical(b.ip()), b.port())) {
        Some((IpAddr::V6(ip), port)) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&port.to_be_bytes());
        }
        Some((IpAddr::V4(ip), port)) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&port.to_be_bytes());
        }
        None => out.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0]),
    }
    out
}

/// Reads the SOCKS5 greeting and request; `Err(reply)` for a protocol error
/// (reply code to send, if any).
async fn socks5_request<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
) -> Result<(u8, Result<Host, String>, u16), Option<u8>> {
    let nmethods = client.read_u8().await.map_err(|_| None)?;
    let mut methods = vec![0u8; usize::from(nmethods)];
    client.read_exact(&mut methods).await.map_err(|_| None)?;
    if !methods.contains(&0) {
        let _ = client.write_all(&[5, 0xff]).await;
        return Err(None);
    }
    client.write_all(&[5, 0]).await.map_err(|_| None)?;
    let mut hdr = [0u8; 4];
    client.read_exact(&mut hdr).await.map_err(|_| None)?;
    if hdr[0] != 5 {
        return Err(None);
    }
    let host = match hdr[3] {
        1 => {
            let mut a = [0u8; 4];
            client.read_exact(&mut a).await.map_err(|_| None)?;
            Ok(Host::Ip(IpAddr::from(a)))
        }
        4 => {
            let mut a = [0u8; 16];
            client.read_exact(&mut a).await.map_err(|_| None)?;
            Ok(Host::Ip(canonical(IpAddr::from(a))))
        }
        3 => {
            let len = client.read_u8().await.map_err(|_| None)?;
            let mut name = vec![0u8; usize::from(len)];
            client.read_exact(&mut name).await.map_err(|_| None)?;
            let name = String::from_utf8_lossy(&name).into_owned();
            Host::parse(&name).map_err(|e| format!("`{name}`: {e}"))
        }
        _ => return Err(Some(rep::ATYP)),
    };
    let port = client.read_u16().await.map_err(|_| None)?;
    Ok((hdr[1], host, port))
}

async fn socks5<S>(sh: &Shared, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request = timeout(sh.limits.handshake_timeout, socks5_request(&mut client)).await;
    let (cmd, host, port) = match request {
        Ok(Ok(r)) => r,
        Ok(Err(code)) => {
            sh.rec.protocol_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(code) = code {
                let _ = client.write_all(&socks_reply(code, None)).await;
            }
            return;
        }
        Err(_) => {
            sh.rec.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let host = match host {
        Ok(h) => h,
        Err(detail) => {
            sh.rec.deny(
                String::new(),
                port,
                Protocol::Socks5,
                DenyReason::InvalidDestination { detail },
            );
            let _ = client
                .write_all(&socks_reply(rep::HOST_UNREACHABLE, None))
                .await;
            return;
        }
    };
    if cmd != 1 {
        let what = match cmd {
            2 => "SOCKS5 BIND".to_string(),
            3 => "SOCKS5 UDP ASSOCIATE (UDP is not carried)".to_string(),
            c => format!("SOCKS5 command {c}"),
        };
        sh.rec.deny(
            host.to_string(),
            port,
            Protocol::Socks5,
            DenyReason::Unsupported { what },
        );
        let _ = client.write_all(&socks_reply(rep::COMMAND, None)).await;
        return;
    }
    match open_upstream(sh, &host, port).await {
        Ok((upstream, _permit, ticket)) => {
            let bound = upstream.local_addr().ok();
            if client
                .write_all(&socks_reply(rep::OK, bound))
                .await
                .is_err()
            {
                return;
            }
            let to = To {
                host: &host,
                port,
                proto: Protocol::Socks5,
            };
            tunnel(sh, client, upstream, to, ticket, Vec::new()).await;
        }
        Err(reason) => {
            let code = match &reason {
                DenyReason::ResolveFailed { .. } => rep::HOST_UNREACHABLE,
                DenyReason::ConnectFailed { .. } => rep::REFUSED,
                _ => rep::RULESET,
            };
            sh.rec
                .deny(host.to_string(), port, Protocol::Socks5, reason);
            let _ = client.write_all(&socks_reply(code, None)).await;
        }
    }
}
