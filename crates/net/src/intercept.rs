//! Credentials at the boundary: the proxy side of [`HeaderRules`].
//!
//! A connection to a host that a rule names is intercepted; every other
//! connection is relayed untouched (its TLS is never terminated).
//!
//! * **HTTPS**: the proxy finishes the sandbox's TLS handshake itself with a
//!   leaf certificate for the SNI, minted by the sandbox's own CA
//!   ([`SandboxCa`]; trusted inside that sandbox only), and opens its own
//!   TLS connection to the real host, verified against the host's trust
//!   store (plus an operator's extra CA, if configured) for the same name.
//!   Only HTTP/1.1 is offered by ALPN, so the proxy reads every request.
//! * **Plain HTTP** to a ruled host is read the same way, without TLS.
//!
//! Then, for every request on the connection (keep-alive and pipelining
//! included, not only the first): the `Host` header (and an absolute-form
//! target) must name the connection's host — the SNI for HTTPS — or the
//! request is refused with `421` ([`DenyReason::DomainFronting`]); `CONNECT` and protocol upgrades (WebSocket, h2c) are refused,
//! since the proxy could no longer see the requests after them; the rule's
//! headers replace any header of the same name; the body is forwarded by
//! its framing (`Content-Length` or chunked; both, or another transfer
//! coding, is refused as a smuggling attempt). Responses are relayed as
//! they come.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::ca::{provider, SandboxCa};
use crate::conn::{send, End, Shared};
use crate::http::{self, MAX_HEAD, MAX_HEADERS};
use crate::policy::Host;
use crate::record::{DenyReason, Protocol};
use crate::rules::HeaderRules;

/// Setting up interception failed.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// No usable CA certificate for verifying upstream hosts.
    #[error("no CA certificate to verify upstream hosts with: {0}")]
    NoRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A live update's rules name a domain the sandbox's CA cannot vouch
    /// for (its name constraints were fixed when the sandbox was made).
    #[error("network.rules for {domains}: the sandbox's interception CA (trusted inside it, name-constrained when the sandbox was created) covers only {covered}; a live update can change or remove the rules of those domains, not add others; create a new sandbox with a rule for {domains}")]
    NotCovered {
        /// The domains outside the CA's constraints, comma-separated.
        domains: String,
        /// The domains the CA covers, comma-separated.
        covered: String,
    },
    /// A live update brings rules to a sandbox created without any.
    #[error("network.rules: this sandbox was created without credential rules, so it has no interception CA (its trust store was fixed at creation); create the sandbox with network.rules for {domains} (its rules can then be changed live)")]
    NoCa {
        /// The domains the update names, comma-separated.
        domains: String,
    },
}

/// What the proxy needs to apply credential rules: the rules, the
/// sandbox's CA, and the trust store upstream hosts are verified against.
pub struct Intercept {
    /// Replaced whole by a live update ([`Intercept::replace_rules`]);
    /// every request reads the rules current when its head arrives.
    rules: RwLock<Arc<HeaderRules>>,
    /// The domains the CA's name constraints permit (with subdomains).
    covered: Vec<String>,
    ca: Arc<SandboxCa>,
    upstream: Arc<ClientConfig>,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("rules", &self.rules())
            .finish_non_exhaustive()
    }
}

impl Intercept {
    /// Interception with `rules`, leaves signed by `ca`, and upstream
    /// certificates verified against the PEM certificates in `roots` (the
    /// host's bundle, and any extra CA the operator trusts).
    pub fn new(
        rules: HeaderRules,
        ca: Arc<SandboxCa>,
        roots: &[&[u8]],
    ) -> Result<Intercept, InterceptError> {
        let mut store = RootCertStore::empty();
        for pem in roots {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .filter_map(Result::ok)
                .collect();
            store.add_parsable_certificates(certs);
        }
        if store.is_empty() {
            return Err(InterceptError::NoRoots(
                "the host's CA bundle has no certificate rustls can use".into(),
            ));
        }
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Intercept {
            covered: rules.domains(),
            rules: RwLock::new(Arc::new(rules)),
            ca,
            upstream: Arc::new(cfg),
        })
    }

    /// The rules now.
    pub fn rules(&self) -> Arc<HeaderRules> {
        match self.rules.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Checks that the CA can vouch for every domain of `rules`: each must
    /// be one the CA was made for, or below one.
    pub fn check_covered(&self, rules: &HeaderRules) -> Result<(), InterceptError> {
        let outside: Vec<String> = rules
            .domains()
            .into_iter()
            .filter(|d| !covers(&self.covered, d))
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        Err(InterceptError::NotCovered {
            domains: outside.join(", "),
            covered: self.covered.join(", "),
        })
    }

    /// Replaces the rules (a live update): connections opened from now on
    /// are intercepted by the new rules, and every request on an
    /// intercepted connection, open or new, gets the new rules' headers
    /// (none, once its host's rule is removed). Refused, changing nothing,
    /// when a domain is outside the CA's name constraints.
    pub fn replace_rules(&self, rules: HeaderRules) -> Result<(), InterceptError> {
        self.check_covered(&rules)?;
        let mut w = match self.rules.write() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        *w = Arc::new(rules);
        Ok(())
    }

    /// Whether connections to `name` are intercepted.
    pub(crate) fn wants(&self, name: &str) -> bool {
        self.rules().matches(name)
    }
}

/// Whether a CA name-constrained to `covered` (each a DNS subtree) can
/// vouch for `domain` (a rule's domain, without its `*.`).
fn covers(covered: &[String], domain: &str) -> bool {
    covered.iter().any(|c| {
        domain == c
            || domain
                .strip_suffix(c.as_str())
                .is_some_and(|head| head.ends_with('.'))
    })
}

/// Byte counters of one recorded connection (transparent connections).
pub(crate) type Counters<'a> = Option<(&'a AtomicU64, &'a AtomicU64)>;

/// A stream whose first bytes were already read (the ClientHello).
struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn fail(detail: impl Into<String>) -> End {
    End::Deny(DenyReason::Interception {
        detail: detail.into(),
    })
}

/// Intercepts a TLS connection to `name` whose ClientHello (and whatever
/// followed) is in `initial`: terminates the sandbox's TLS with a leaf for
/// `name`, opens verified TLS to `upstream`, and serves requests.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_tls<S>(
    sh: &Shared,
    ic: &Intercept,
    client: S,
    upstream: TcpStream,
    name: &str,
    port: u16,
    initial: Vec<u8>,
    counters: Counters<'_>,
) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let server_cfg = ic.ca.server_config(name).map_err(|e| fail(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let connector = tokio_rustls::TlsConnector::from(ic.upstream.clone());
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| fail(format!("{name:?} is not a TLS server name: {e}")))?;
    let wait = sh.limits.handshake_timeout;
    let prefixed = Prefixed {
        head: initial,
        at: 0,
        inner: client,
    };
    // Both handshakes at once: the added latency is the slower of the two.
    let (down, up) = tokio::join!(
        timeout(wait, acceptor.accept(prefixed)),
        timeout(wait, connector.connect(server_name, upstream)),
    );
    let mut down = match down {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(fail(format!("the sandbox's TLS handshake failed: {e}"))),
        Err(_) => return Err(fail("the sandbox's TLS handshake timed out")),
    };
    let up = match up {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = DenyReason::Interception {
                detail: format!("{name}'s certificate could not be verified: {e}"),
            };
            let _ = down
                .write_all(&http::error_response(
                    502,
                    &format!("{name}:{port}: {reason}"),
                    Some(reason.kind()),
                ))
                .await;
            let _ = down.shutdown().await;
            return Err(End::Deny(reason));
        }
        Err(_) => return Err(fail(format!("the TLS handshake with {name} timed out"))),
    };
    serve_http(sh, ic, down, up, name, port, Vec::new(), counters).await
}

/// Serves the HTTP/1.1 requests of an intercepted connection (TLS already
/// terminated on both sides, or plain HTTP); `initial` holds bytes of the
/// first request already read.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_http<C, U>(
    sh: &Shared,
    ic: &Intercept,
    client: C,
    upstream: U,
    name: &str,
    port: u16,
    initial: Vec<u8>,
    counters: Counters<'_>,
) -> Result<(), End>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut reader = HeadReader {
        r: cr,
        buf: initial,
    };
    let result = {
        let up = requests(sh, ic, &mut reader, &mut uw, name, port, counters);
        let down = relay(sh, &mut ur, &mut cw, counters.map(|c| c.1));
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut down => r,
            r = &mut up => match r {
                Ok(()) => down.await,
                Err(e) => Err(e),
            },
        }
    };
    if let Err(End::Deny(reason)) = &result {
        let status = match reason {
            DenyReason::DomainFronting { .. } => 421,
            DenyReason::Unsupported { .. } => 501,
            DenyReason::InvalidDestination { .. } => 400,
            _ => 502,
        };
        let _ = cw
            .write_all(&http::error_response(
                status,
                &format!("{name}:{port}: {reason}"),
                Some(reason.kind()),
            ))
            .await;
    }
    let _ = cw.shutdown().await;
    result
}

/// Upstream → sandbox, as it comes.
async fn relay<R, W>(sh: &Shared, r: &mut R, w: &mut W, n: Option<&AtomicU64>) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let got = r.read(&mut buf).await?;
        if got == 0 {
            return Ok(());
        }
        send(sh, w, &buf[..got], false).await?;
        w.flush().await?;
        if let Some(n) = n {
            n.fetch_add(got as u64, Ordering::Relaxed);
        }
    }
}

/// A reader with a buffer of bytes read but not yet used.
struct HeadReader<R> {
    r: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> HeadReader<R> {
    /// Reads more; false at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buf.reserve(8192);
        Ok(self.r.read_buf(&mut self.buf).await? > 0)
    }

    /// One CRLF-terminated line (with its CRLF), at most `max` bytes.
    async fn line(&mut self, max: usize) -> Result<Vec<u8>, End> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.drain(..i + 2).collect());
            }
            if self.buf.len() > max {
                return Err(End::Deny(DenyReason::InvalidDestination {
                    detail: "a chunk line is too long".into(),
                }));
            }
            if !self.fill().await? {
                return Err(End::Io);
            }
        }
    }
}

/// How a request's body is framed.
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed, checked and rewritten request head.
struct Checked {
    head: Vec<u8>,
    framing: Framing,
}

fn bad(detail: &str) -> DenyReason {
    DenyReason::InvalidDestination {
        detail: detail.into(),
    }
}

/// Checks one request head against the connection's host and rewrites it
/// with the rule's headers.
fn check_request(
    req: &httparse::Request<'_, '_>,
    name: &str,
    port: u16,
    rule_headers: &[(&str, &str)],
) -> Result<Checked, DenyReason> {
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(DenyReason::Unsupported {
            what: "CONNECT inside an intercepted connection".into(),
        });
    }
    let same_host = |authority: &str| {
        matches!(http::parse_authority(authority, Some(port)),
            Ok((Host::Name(n), _)) if n == name)
    };
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => String::from_utf8_lossy(h.value).into_owned(),
        (None, _) => return Err(bad("a request without a Host header")),
        (Some(_), Some(_)) => return Err(bad("more than one Host header")),
    };
    if !same_host(&host) {
        return Err(DenyReason::DomainFronting {
            host,
            name: name.to_string(),
        });
    }
    if !target.starts_with('/') && target != "*" {
        // Absolute form: its authority must name the host too.
        let authority = target
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
            .unwrap_or("");
        if !same_host(authority) {
            return Err(DenyReason::DomainFronting {
                host: target.to_string(),
                name: name.to_string(),
            });
        }
    }
    let mut framing = Framing::None;
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("upgrade") {
            return Err(DenyReason::Unsupported {
                what: "a protocol upgrade (WebSocket, h2c) on an intercepted connection".into(),
            });
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value);
            if !v.trim().eq_ignore_ascii_case("chunked") || matches!(framing, Framing::Chunked) {
                return Err(DenyReason::Unsupported {
                    what: format!("Transfer-Encoding {v:?} (only a single `chunked`)"),
                });
            }
            framing = Framing::Chunked;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad("a Content-Length that is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("Content-Length headers that disagree"));
            }
            length = Some(n);
        }
    }
    match (&framing, length) {
        (Framing::Chunked, Some(_)) => {
            return Err(bad("both Content-Length and Transfer-Encoding"))
        }
        (Framing::None, Some(n)) => framing = Framing::Length(n),
        _ => {}
    }
    let minor = req.version.unwrap_or(1);
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(format!("{method} {target} HTTP/1.{minor}\r\n").as_bytes());
    for h in req.headers.iter() {
        if rule_headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(h.name))
        {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    for (n, v) in rule_headers {
        head.extend_from_slice(n.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Checked { head, framing })
}

/// Sends `data` upstream, counting it.
async fn up<W: AsyncWrite + Unpin>(
    sh: &Shared,
    w: &mut W,
    data: &[u8],
    n: Option<&AtomicU64>,
) -> Result<(), End> {
    send(sh, w, data, true).await?;
    if let Some(n) = n {
        n.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Sandbox → upstream: request after request, each checked and rewritten.
async fn requests<R, W>(
    sh: &Shared,
    ic: &Intercept,
    rd: &mut HeadReader<R>,
    w: &mut W,
    name: &str,
    port: u16,
    counters: Counters<'_>,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let n_up = counters.map(|c| c.0);
    loop {
        // One request head.
        let checked = loop {
            if !rd.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&rd.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        // The rules now: a live update applies from the
                        // next request on, on open connections too.
                        let rules = ic.rules();
                        let rule_headers = rules.headers_for(name);
                        let c =
                            check_request(&req, name, port, &rule_headers).map_err(End::Deny)?;
                        rd.buf.drain(..len);
                        break c;
                    }
                    Ok(httparse::Status::Partial) if rd.buf.len() < MAX_HEAD => {}
                    Ok(httparse::Status::Partial) => {
                        return Err(End::Deny(bad("the request head is too large")))
                    }
                    Err(e) => return Err(End::Deny(bad(&format!("not an HTTP request: {e}")))),
                }
            }
            if !rd.fill().await? {
                if rd.buf.is_empty() {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                return Err(End::Io);
            }
        };
        sh.rec.intercepted.fetch_add(1, Ordering::Relaxed);
        up(sh, w, &checked.head, n_up).await?;
        match checked.framing {
            Framing::None => {}
            Framing::Length(n) => body(sh, rd, w, n, n_up).await?,
            Framing::Chunked => chunked(sh, rd, w, n_up).await?,
        }
        w.flush().await?;
    }
}

/// Forwards exactly `n` body bytes.
async fn body<R, W>(
    sh: &Shared,
    rd: &mut HeadReader<R>,
    w: &mut W,
    mut n: u64,
    n_up: Option<&AtomicU64>,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while n > 0 {
        if rd.buf.is_empty() && !rd.fill().await? {
            return Err(End::Io);
        }
        let take = usize::try_from(n).unwrap_or(usize::MAX).min(rd.buf.len());
        up(sh, w, &rd.buf[..take], n_up).await?;
        rd.buf.drain(..take);
        n -= take as u64;
    }
    Ok(())
}

/// Forwards a chunked body, chunk by chunk, up to the end of its trailers.
async fn chunked<R, W>(
    sh: &Shared,
    rd: &mut HeadReader<R>,
    w: &mut W,
    n_up: Option<&AtomicU64>,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let line = rd.line(4096).await?;
        let text = std::str::from_utf8(&line[..line.len() - 2]).unwrap_or("");
        let size_part = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_part, 16)
            .map_err(|_| End::Deny(bad("a malformed chunk size")))?;
        up(sh, w, &line, n_up).await?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let t = rd.line(MAX_HEAD).await?;
                if t.starts_with(b":") || t.to_ascii_lowercase().starts_with(b"host:") {
                    return Err(End::Deny(bad("a Host trailer")));
                }
                up(sh, w, &t, n_up).await?;
                if t == b"\r\n" {
                    return Ok(());
                }
            }
        }
        body(sh, rd, w, size, n_up).await?;
        let end = rd.line(2).await?;
        if end != b"\r\n" {
            return Err(End::Deny(bad("a chunk not followed by CRLF")));
        }
        up(sh, w, &end, n_up).await?;
    }
}

/// Rewrites a plain-HTTP request head (the proxy's `http://` forward) with
/// the rule's headers for `name`; `Err` when the head cannot be parsed.
pub(crate) fn rewrite_forward_head(ic: &Intercept, name: &str, head: &[u8]) -> Option<Vec<u8>> {
    let rules = ic.rules();
    let headers = rules.headers_for(name);
    if headers.is_empty() {
        return None;
    }
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return None;
    };
    let minor = req.version.unwrap_or(1);
    let mut out = Vec::with_capacity(head.len() + 256);
    out.extend_from_slice(
        format!(
            "{} {} HTTP/1.{minor}\r\n",
            req.method.unwrap_or("GET"),
            req.path.unwrap_or("/")
        )
        .as_bytes(),
    );
    for h in req.headers.iter() {
        if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(h.name)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    for (n, v) in &headers {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// A `CONNECT` or SOCKS5 tunnel to `name`, which has rules: a TLS
/// ClientHello is intercepted (its SNI, if any, must be `name`), an HTTP
/// request is served as plain HTTP, anything else is relayed as it is.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn tunnel<S>(
    sh: &Shared,
    ic: &Intercept,
    mut client: S,
    upstream: TcpStream,
    name: &str,
    port: u16,
    proto: Protocol,
    mut initial: Vec<u8>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    use crate::sni::{parse_client_hello, Hello};
    let result = async {
        if initial.is_empty() {
            initial.reserve(4096);
            if client.read_buf(&mut initial).await? == 0 {
                return Ok(());
            }
        }
        if initial[0] == 0x16 {
            loop {
                match parse_client_hello(&initial) {
                    Hello::ClientHello(Some(sni)) if sni != name => {
                        return Err(End::Deny(DenyReason::SniMismatch { sni }))
                    }
                    Hello::ClientHello(_) => {
                        return serve_tls(sh, ic, client, upstream, name, port, initial, None).await
                    }
                    Hello::NeedMore if initial.len() < crate::sni::MAX_HELLO => {
                        initial.reserve(4096);
                        match timeout(sh.limits.handshake_timeout, client.read_buf(&mut initial))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => return Err(End::Deny(DenyReason::MalformedTlsHello)),
                        }
                    }
                    Hello::NotTls => break,
                    _ => return Err(End::Deny(DenyReason::MalformedTlsHello)),
                }
            }
        }
        if initial[0].is_ascii_alphabetic() {
            return serve_http(sh, ic, client, upstream, name, port, initial, None).await;
        }
        // Another protocol: relayed untouched (no rule can apply to it).
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut ur, mut uw) = upstream.into_split();
        let upward = async {
            up(sh, &mut uw, &initial, None).await?;
            relay_up(sh, &mut cr, &mut uw).await
        };
        tokio::try_join!(upward, relay(sh, &mut ur, &mut cw, None)).map(|_| ())
    }
    .await;
    if let Err(e) = result {
        record(sh, name, port, proto, e);
    }
}

/// Sandbox → upstream, as it comes (a tunnel no rule applies to).
async fn relay_up<R, W>(sh: &Shared, r: &mut R, w: &mut W) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let got = r.read(&mut buf).await?;
        if got == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        up(sh, w, &buf[..got], None).await?;
    }
}

/// Records a refusal on an intercepted connection.
pub(crate) fn record(sh: &Shared, name: &str, port: u16, proto: Protocol, end: End) {
    if let End::Deny(reason) = end {
        sh.rec.deny(name.to_string(), port, proto, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(domains: &[&str]) -> HeaderRules {
        HeaderRules::new(
            domains
                .iter()
                .map(|d| crate::rules::HeaderRule {
                    domain: d.to_string(),
                    headers: vec![("Authorization".into(), format!("Bearer {d}"))],
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_live_update_stays_within_the_cas_constraints() {
        let made = rules(&["api.test", "*.example.com"]);
        let ca = Arc::new(SandboxCa::new("t", &made.domains()).unwrap());
        let pem = ca.cert_pem().as_bytes().to_vec();
        let ic = Intercept::new(made, ca, &[&pem]).unwrap();
        // Same domains, subdomains of them, fewer, none: accepted.
        for ok in [
            rules(&["api.test"]),
            rules(&["x.api.test", "a.example.com", "*.b.example.com"]),
            rules(&[]),
        ] {
            ic.replace_rules(ok.clone()).unwrap();
            assert_eq!(*ic.rules(), ok);
        }
        assert!(!ic.wants("api.test"));
        // Another domain (or a parent, or a look-alike): refused, unchanged.
        for bad in [
            &["web.test"][..],
            &["test"],
            &["xapi.test"],
            &["api.test", "evil.test"],
        ] {
            let e = ic.replace_rules(rules(bad)).unwrap_err();
            assert!(e.to_string().contains("covers only"), "{e}");
            assert!(ic.rules().is_empty(), "{bad:?}");
        }
        ic.replace_rules(rules(&["api.test"])).unwrap();
        assert!(ic.wants("api.test") && !ic.wants("web.test"));
    }

    fn check(raw: &[u8]) -> Result<Checked, DenyReason> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hs);
        req.parse(raw).unwrap();
        check_request(&req, "api.test", 443, &[("Authorization", "Bearer S")])
    }

    #[test]
    fn replaces_the_header_and_keeps_the_rest() {
        let c = check(
            b"GET /x HTTP/1.1\r\nHost: api.test\r\nauthorization: Bearer PLACEHOLDER\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        let head = String::from_utf8(c.head).unwrap();
        assert!(head.contains("Authorization: Bearer S\r\n"), "{head}");
        assert!(!head.contains("PLACEHOLDER"), "{head}");
        assert!(head.contains("Accept: */*\r\n"));
    }

    #[test]
    fn refuses_fronting_smuggling_and_upgrades() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"[..],
            b"GET https://other.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: api.test\r\nHost: api.test\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\n\r\n",
            b"CONNECT other.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n",
        ] {
            assert!(check(raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
        assert!(check(b"GET / HTTP/1.1\r\nHost: API.test:443\r\n\r\n").is_ok());
        assert!(check(b"GET https://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n").is_ok());
    }
}
