//! HTTP/1.x proxy-request helpers (pure functions): request-target forms,
//! authority parsing, and the request/response head rewrites of the plain
//! HTTP forwarding path.
//!
//! Plain HTTP forwarding is one request per client connection: the upstream
//! request carries `Connection: close`, the response to the client carries
//! `Connection: close`, and the proxy closes the client connection when the
//! upstream closes. Hop-by-hop headers (`Connection` and the headers it
//! names, `Proxy-Connection`, `Keep-Alive`, `Proxy-Authorization`, `TE`,
//! `Trailer`, `Upgrade`) are not forwarded, so protocol upgrades (plain
//! `ws://`) are not carried on this path; they work through `CONNECT`.

use crate::policy::Host;

/// Largest request or response head accepted (bytes).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header lines accepted.
pub(crate) const MAX_HEADERS: usize = 128;

/// The request-target of a proxy request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    /// `CONNECT host:port`.
    Connect(&'a str),
    /// `GET http://authority/path`: the authority and the origin-form path.
    Absolute { authority: &'a str, path: String },
    /// `GET /path` (destination from the `Host` header).
    Origin(&'a str),
    /// Another scheme (`https://`, `ftp://`, ...) or an unusable target.
    Unsupported(String),
}

pub(crate) fn classify_target<'a>(method: &str, target: &'a str) -> Target<'a> {
    if method.eq_ignore_ascii_case("CONNECT") {
        return Target::Connect(target);
    }
    if target.starts_with('/') {
        return Target::Origin(target);
    }
    if let Some((scheme, rest)) = target.split_once("://") {
        if !scheme.eq_ignore_ascii_case("http") {
            return Target::Unsupported(format!(
                "`{scheme}://` URI in a plain proxy request (use CONNECT for TLS)"
            ));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let tail = tail.split('#').next().unwrap_or("");
        let path = if tail.starts_with('/') {
            tail.to_string()
        } else {
            format!("/{tail}")
        };
        return Target::Absolute { authority, path };
    }
    if target == "*" {
        return Target::Unsupported("`OPTIONS *` through a proxy".into());
    }
    Target::Unsupported(format!("request target `{}`", truncate(target)))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses `host[:port]` / `[v6][:port]`. `default_port` is used when the
/// port is absent; `None` makes the port mandatory (CONNECT).
pub(crate) fn parse_authority(
    authority: &str,
    default_port: Option<u16>,
) -> Result<(Host, u16), String> {
    if authority.contains('@') {
        return Err("user information in the authority is not accepted".into());
    }
    let (host, port) = if authority.starts_with('[') {
        match authority.split_once(']') {
            Some((h, rest)) => (&h[1..], rest.strip_prefix(':').map(Some).unwrap_or(None)),
            None => return Err(format!("unterminated `[` in `{}`", truncate(authority))),
        }
    } else if authority.matches(':').count() > 1 {
        return Err(format!(
            "IPv6 address without brackets in `{}`",
            truncate(authority)
        ));
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("invalid port `{}`", truncate(p))),
        },
        (None, Some(d)) => d,
        (None, None) => return Err("the port is missing (write HOST:PORT)".into()),
    };
    let host = Host::parse(host).map_err(|e| format!("`{}`: {e}", truncate(host)))?;
    Ok((host, port))
}

fn hop_by_hop(name: &str, listed: &[String]) -> bool {
    const FIXED: [&str; 8] = [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ];
    FIXED.iter().any(|h| name.eq_ignore_ascii_case(h))
        || listed.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn connection_tokens(headers: &[httparse::Header<'_>]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| {
            h.name.eq_ignore_ascii_case("connection")
                || h.name.eq_ignore_ascii_case("proxy-connection")
        })
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The upstream request head: origin-form `path`, hop-by-hop headers
/// removed, `Host` set to `host_header` when the client sent none, and
/// `Connection: close`.
pub(crate) fn rewrite_request(
    req: &httparse::Request<'_, '_>,
    method: &str,
    path: &str,
    host_header: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let minor = req.version.unwrap_or(1);
    out.extend_from_slice(format!("{method} {path} HTTP/1.{minor}\r\n").as_bytes());
    let listed = connection_tokens(req.headers);
    let mut has_host = false;
    for h in req.headers.iter() {
        if hop_by_hop(h.name, &listed) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            has_host = true;
        }
        push_header(&mut out, h.name, h.value);
    }
    if !has_host {
        push_header(&mut out, "Host", host_header.as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// The response head sent to the client: hop-by-hop headers removed and
/// `Connection: close` added (the proxy closes after the response).
pub(crate) fn rewrite_response(resp: &httparse::Response<'_, '_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let minor = resp.version.unwrap_or(1);
    let code = resp.code.unwrap_or(502);
    let reason = resp.reason.unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.{minor} {code} {reason}\r\n").as_bytes());
    let listed = connection_tokens(resp.headers);
    for h in resp.headers.iter() {
        if hop_by_hop(h.name, &listed) {
            continue;
        }
        push_header(&mut out, h.name, h.value);
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// The length of the response body when it is known from the head:
/// `Some(0)` for `HEAD` responses, 1xx, 204 and 304; the `Content-Length`
/// when there is exactly one and no `Transfer-Encoding`; `None` (read until
/// the upstream closes) otherwise.
pub(crate) fn response_body_len(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
) -> Option<u64> {
    let code = resp.code.unwrap_or(0);
    if head_request || (100..200).contains(&code) || code == 204 || code == 304 {
        return Some(0);
    }
    if resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return None;
    }
    let mut lengths = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let first = lengths.next()?;
    if lengths.next().is_some() {
        return None;
    }
    let v = std::str::from_utf8(first.value).ok()?.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// A short error response from the proxy itself.
pub(crate) fn error_response(status: u16, text: &str, reason_kind: Option<&str>) -> Vec<u8> {
    let phrase = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("nanoclaw: {text}\n");
    let mut out = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(kind) = reason_kind {
        out.push_str(&format!("X-Nanoclaw-Deny-Reason: {kind}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            classify_target("CONNECT", "a.test:443"),
            Target::Connect("a.test:443")
        );
        assert_eq!(
            classify_target("GET", "http://a.test:8080/x?y=1#frag"),
            Target::Absolute {
                authority: "a.test:8080",
                path: "/x?y=1".into()
            }
        );
        assert_eq!(
            classify_target("GET", "HTTP://a.test"),
            Target::Absolute {
                authority: "a.test",
                path: "/".into()
            }
        );
        assert_eq!(
            classify_target("GET", "http://a.test?q"),
            Target::Absolute {
                authority: "a.test",
                path: "/?q".into()
            }
        );
        assert_eq!(classify_target("GET", "/x"), Target::Origin("/x"));
        assert!(matches!(
            classify_target("GET", "https://a.test/"),
            Target::Unsupported(_)
        ));
        assert!(matches!(
            classify_target("GET", "ftp://a.test/"),
            Target::Unsupported(_)
        ));
        assert!(matches!(
            classify_target("OPTIONS", "*"),
            Target::Unsupported(_)
        ));
    }

    #[test]
    fn authorities() {
        let ok = |s, d| parse_authority(s, d).unwrap();
        assert_eq!(ok("A.test:443", None), (Host::Name("a.test".into()), 443));
        assert_eq!(ok("a.test", Some(80)), (Host::Name("a.test".into()), 80));
        assert_eq!(
            ok("[::1]:8080", None),
            (Host::Ip("::1".parse().unwrap()), 8080)
        );
        assert_eq!(
            ok("[::1]", Some(80)),
            (Host::Ip("::1".parse().unwrap()), 80)
        );
        assert_eq!(
            ok("127.0.0.2:1", None),
            (Host::Ip("127.0.0.2".parse().unwrap()), 1)
        );
        for bad in [
            "a.test",
            "a.test:0",
            "a.test:99999",
            "a.test:+80",
            "::1:80",
            "[::1:80",
            "user@a.test:80",
            "127.1:80",
            "a..test:80",
            ":80",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_rewrite_strips_hop_by_hop_and_forces_close() {
        let raw = b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: Basic Zm9v\r\nAccept: */*\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(raw).unwrap().is_complete());
        let out = String::from_utf8(rewrite_request(&req, "GET", "/x", "a.test")).unwrap();
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn request_rewrite_adds_missing_host() {
        let raw = b"GET http://a.test:81/ HTTP/1.0\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(raw).unwrap().is_complete());
        let out = String::from_utf8(rewrite_request(&req, "GET", "/", "a.test:81")).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.0\r\nHost: a.test:81\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn response_rewrite() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhi";
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(resp.parse(raw).unwrap().is_complete());
        let out = String::from_utf8(rewrite_response(&resp)).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        );
    }
}
