//! A small blocking HTTP/1.1 client for the daemon's unix socket or TCP
//! port: one connection per request (`Connection: close`), so a request
//! in flight can be cancelled by shutting its connection down.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket (callers are the `local` tenant unless they send a key).
    Unix(PathBuf),
    /// `http://HOST:PORT` and the MCP path (default `/mcp`).
    Tcp {
        /// host:port.
        addr: String,
        /// The path of the MCP endpoint.
        path: String,
    },
}

impl Endpoint {
    /// `unix:PATH`, a path to a socket, or `http://HOST:PORT[/PATH]`.
    pub fn parse(s: &str) -> Result<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        if s.starts_with("https://") {
            bail!("--url {s}: https is not supported here; use http:// to a loopback or trusted address, or unix:PATH");
        }
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            anyhow!("--url {s:?}: use unix:PATH or http://HOST:PORT (e.g. http://127.0.0.1:3000)")
        })?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/mcp"),
        };
        if addr.is_empty() {
            bail!("--url {s:?}: no host");
        }
        let addr = if addr.contains(':') && !addr.ends_with(']') {
            addr.to_owned()
        } else {
            format!("{addr}:80")
        };
        let path = if path == "/" { "/mcp" } else { path };
        Ok(Endpoint::Tcp {
            addr,
            path: path.to_owned(),
        })
    }

    /// The MCP path on this endpoint.
    pub fn mcp_path(&self) -> &str {
        match self {
            Endpoint::Unix(_) => "/mcp",
            Endpoint::Tcp { path, .. } => path,
        }
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Conn> {
        match self {
            Endpoint::Unix(p) => {
                Ok(Conn::Unix(UnixStream::connect(p).with_context(|| {
                    format!("connecting to {}", p.display())
                })?))
            }
            Endpoint::Tcp { addr, .. } => Ok(Conn::Tcp(
                TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?,
            )),
        }
    }
}

/// One connection.
pub enum Conn {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Conn {
    /// Another handle on the same connection (to shut it down from
    /// another thread).
    pub fn try_clone(&self) -> Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection both ways (a request in flight is abandoned).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(b),
            Conn::Tcp(s) => s.write_all(b),
        }
    }

    fn read_to_end(&mut self, b: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read_to_end(b),
            Conn::Tcp(s) => s.read_to_end(b),
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone).
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on `conn` and reads the whole answer.
pub fn send(
    conn: &mut Conn,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Answer> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        if k.contains(['\r', '\n']) || v.contains(['\r', '\n']) {
            bail!("header {k} has a line break");
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    conn.write_all(&bytes).context("sending to the daemon")?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .context("reading the daemon's answer")?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Answer> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("the daemon's answer was cut short"))?;
    let head = std::str::from_utf8(&raw[..end]).context("the daemon's answer headers")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer from the daemon"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = unchunk(&body)?;
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn unchunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let size_text = std::str::from_utf8(&b[..nl])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("the daemon's answer was cut short");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/run/x.sock").ok(),
            Some(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:3000").ok(),
            Some(Endpoint::Tcp {
                addr: "127.0.0.1:3000".into(),
                path: "/mcp".into()
            })
        );
        assert!(Endpoint::parse("https://x").is_err());
        assert!(Endpoint::parse("ftp://x").is_err());
    }

    #[test]
    fn answers_are_parsed() {
        let a = parse(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .ok()
            .map(|a| (a.status, a.header("content-type").map(str::to_owned), a.body));
        assert_eq!(a, Some((200, Some("x".into()), b"abcde".to_vec())));
    }
}
