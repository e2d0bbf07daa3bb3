//! Just enough HTTP/1.1 for the fake: read one request (Content-Length or
//! chunked body), write a JSON answer or a chunked event stream, keep the
//! connection alive between requests.

use std::io::{self, BufRead, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bound on a request's head (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Bound on a request's body.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One request as it came.
#[derive(Debug)]
pub(crate) struct RawRequest {
    pub method: String,
    pub path: String,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client asked to close after this one.
    pub close: bool,
}

impl RawRequest {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the fake is stopping")
}

/// `read_until` that waits through read timeouts (the socket has a short
/// one so that `stop` is noticed) instead of failing.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, stop: &AtomicBool) -> io::Result<usize> {
    let start = buf.len();
    loop {
        match r.read_until(b'\n', buf) {
            Ok(_) => return Ok(buf.len() - start),
            Err(e) if is_timeout(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(stopped());
                }
                if buf.len() - start > MAX_HEAD {
                    return Err(bad("a header line is too long"));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn read_exact(r: &mut impl Read, out: &mut [u8], stop: &AtomicBool) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match r.read(&mut out[done..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if is_timeout(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(stopped());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn trim_line(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.trim_end_matches(['\r', '\n']).to_string()
}

/// Reads the next request; `Ok(None)` when the client closed the connection
/// between requests.
pub(crate) fn read_request(
    r: &mut impl BufRead,
    stop: &AtomicBool,
) -> io::Result<Option<RawRequest>> {
    let mut line = Vec::new();
    // Blank lines before a request are allowed (RFC 9112 §2.2).
    loop {
        line.clear();
        if read_line(r, &mut line, stop)? == 0 {
            return Ok(None);
        }
        if !trim_line(&line).is_empty() {
            break;
        }
    }
    let request_line = trim_line(&line);
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let (method, path, version) = (method.to_string(), path.to_string(), version.to_string());
    let mut headers = Vec::new();
    let mut head_size = line.len();
    loop {
        line.clear();
        if read_line(r, &mut line, stop)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head_size += line.len();
        if head_size > MAX_HEAD {
            return Err(bad("the request head is too large"));
        }
        let l = trim_line(&line);
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("malformed header"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut req = RawRequest {
        method,
        path,
        headers,
        body: Vec::new(),
        close: false,
    };
    let connection = req.header("connection").unwrap_or("").to_ascii_lowercase();
    req.close = connection.contains("close")
        || (version == "HTTP/1.0" && !connection.contains("keep-alive"));
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        req.body = read_chunked(r, stop)?;
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if len > MAX_BODY {
            return Err(bad("the request body is too large"));
        }
        let mut body = vec![0u8; len];
        read_exact(r, &mut body, stop)?;
        req.body = body;
    }
    Ok(Some(req))
}

fn read_chunked(r: &mut impl BufRead, stop: &AtomicBool) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        read_line(r, &mut line, stop)?;
        let l = trim_line(&line);
        let size_text = l.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        if body.len() + size > MAX_BODY {
            return Err(bad("the request body is too large"));
        }
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                line.clear();
                if read_line(r, &mut line, stop)? == 0 || trim_line(&line).is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        read_exact(r, &mut body[start..], stop)?;
        line.clear();
        read_line(r, &mut line, stop)?;
    }
}

/// The reason phrase of `code`.
pub(crate) fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Unknown",
    }
}

/// Writes a whole answer with a `Content-Length`.
pub(crate) fn write_full(
    w: &mut impl Write,
    code: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {code} {}\r\n", reason(code));
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n", body.len()));
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Writes a 200 event stream, one chunk (and one flush) per event.
pub(crate) fn write_stream(
    w: &mut impl Write,
    headers: &[(String, String)],
    events: &[String],
) -> io::Result<()> {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("transfer-encoding: chunked\r\n\r\n");
    w.write_all(head.as_bytes())?;
    w.flush()?;
    for e in events {
        if e.is_empty() {
            continue;
        }
        write!(w, "{:x}\r\n{e}\r\n", e.len())?;
        w.flush()?;
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_content_length_and_chunked_bodies() {
        let stop = AtomicBool::new(false);
        let raw = "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Api-Key: k\r\n\r\n{}\
                   POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let mut r = io::BufReader::new(raw.as_bytes());
        let a = read_request(&mut r, &stop).unwrap().unwrap();
        assert_eq!(
            (a.method.as_str(), a.path.as_str()),
            ("POST", "/v1/messages")
        );
        assert_eq!(a.header("x-api-key"), Some("k"));
        assert_eq!(a.body, b"{}");
        assert!(!a.close);
        let b = read_request(&mut r, &stop).unwrap().unwrap();
        assert_eq!(b.body, b"abcde");
        assert!(b.close);
        assert!(read_request(&mut r, &stop).unwrap().is_none());
    }

    #[test]
    fn malformed_requests_are_errors() {
        let stop = AtomicBool::new(false);
        let mut r = io::BufReader::new("GARBAGE\r\n\r\n".as_bytes());
        assert!(read_request(&mut r, &stop).is_err());
        let mut r = io::BufReader::new("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n".as_bytes());
        assert!(read_request(&mut r, &stop).is_err());
    }

    #[test]
    fn stream_is_chunked_per_event() {
        let mut out = Vec::new();
        write_stream(
            &mut out,
            &[],
            &["data: 1\n\n".into(), "data: [DONE]\n\n".into()],
        )
        .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.ends_with("9\r\ndata: 1\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"),
            "{s:?}"
        );
    }
}
