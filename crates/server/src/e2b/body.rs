//! Reading request bodies with a size limit and an idle timeout (a slow
//! client cannot hold a request open forever, nor make the server buffer
//! more than the limit), and decoding query strings.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::CONTENT_LENGTH;
use axum::http::{HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// More than `limit` bytes.
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// No bytes arrived for the idle timeout.
    #[error("request body not received in time (no data for {0:?})")]
    Timeout(Duration),
    /// The connection failed mid-body.
    #[error("reading the request body failed: {0}")]
    Read(String),
    /// The body came slower than its [`Pace`] on average.
    #[error("request body too slow: {bytes} bytes in {secs} s (send faster, or split the upload)")]
    TooSlow {
        /// Bytes received.
        bytes: u64,
        /// Seconds since the body was first awaited.
        secs: u64,
    },
}

/// A body's minimum average rate: a client that trickles (a byte now and
/// then, each within the idle timeout) would otherwise hold a request, and
/// what it holds, for as long as it likes. After [`Pace::GRACE`], the body
/// must have come at [`Pace::MIN_RATE`] on average since then.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    start: Instant,
    bytes: u64,
    grace: Duration,
    min_rate: u64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace::new()
    }
}

impl Pace {
    /// How long any body may take before the rate counts: 30 s.
    pub const GRACE: Duration = Duration::from_secs(30);
    /// The average rate owed after the grace period: 16 KiB/s.
    pub const MIN_RATE: u64 = 16 * 1024;

    /// A body starting now, with the default grace and rate.
    pub fn new() -> Pace {
        Pace::with(Self::GRACE, Self::MIN_RATE)
    }

    /// A body starting now that owes `min_rate` bytes/s after `grace`.
    pub fn with(grace: Duration, min_rate: u64) -> Pace {
        Pace {
            start: Instant::now(),
            bytes: 0,
            grace,
            min_rate,
        }
    }

    /// Counts `n` more bytes; an error when the body is behind its pace.
    pub fn add(&mut self, n: usize) -> Result<(), BodyError> {
        self.bytes += n as u64;
        let elapsed = self.start.elapsed();
        let owed = elapsed.saturating_sub(self.grace).as_secs_f64() * self.min_rate as f64;
        if (self.bytes as f64) < owed {
            return Err(BodyError::TooSlow {
                bytes: self.bytes,
                secs: elapsed.as_secs(),
            });
        }
        Ok(())
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        let status = match e {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout(_) | BodyError::TooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Refuses early a request whose declared `Content-Length` is over
/// `limit`.
pub fn check_content_length(headers: &HeaderMap, limit: u64) -> Result<(), BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(BodyError::TooLarge { limit }),
        _ => Ok(()),
    }
}

/// The next chunk of data, `None` at the end. Trailers are skipped.
pub async fn next_chunk(body: &mut Body, idle: Duration) -> Result<Option<Bytes>, BodyError> {
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout(idle)),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited(
    headers: &HeaderMap,
    mut body: Body,
    limit: u64,
    idle: Duration,
    mut pace: Pace,
) -> Result<Bytes, BodyError> {
    check_content_length(headers, limit)?;
    let mut buf = BytesMut::new();
    while let Some(chunk) = next_chunk(&mut body, idle).await? {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        pace.add(chunk.len())?;
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`; with `plus_is_space`, `+` means a space (form
/// encoding). Malformed escapes are kept as they are; invalid UTF-8 is
/// replaced.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a form-encoded string (`a=1&b=2`) into decoded pairs, in order.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// The first value of query parameter `name` in a raw query string.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    parse_form(query?)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c", true), "a b c");
        assert_eq!(percent_decode("a%20b+c", false), "a b+c");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(percent_decode("%zz%4", false), "%zz%4");
        assert_eq!(percent_decode("%C3%A9", false), "é");
    }

    #[test]
    fn form_and_query() {
        assert_eq!(
            parse_form("user=abc&app=prod&flag"),
            vec![
                ("user".into(), "abc".into()),
                ("app".into(), "prod".into()),
                ("flag".into(), String::new())
            ]
        );
        assert_eq!(
            query_param(Some("path=%2Ftmp%2Fa+b&username=root"), "path").as_deref(),
            Some("/tmp/a b")
        );
        assert_eq!(query_param(None, "path"), None);
    }

    #[tokio::test]
    async fn limited_read() {
        let headers = HeaderMap::new();
        let ok = read_limited(
            &headers,
            Body::from("hello"),
            5,
            Duration::from_secs(1),
            Pace::new(),
        )
        .await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"hello"));
        let big = read_limited(
            &headers,
            Body::from("hello!"),
            5,
            Duration::from_secs(1),
            Pace::new(),
        )
        .await;
        assert_eq!(big.unwrap_err(), BodyError::TooLarge { limit: 5 });
    }

    #[test]
    fn pace_allows_the_grace_period_then_wants_the_rate() {
        let mut p = Pace::new();
        assert!(p.add(1).is_ok(), "within the grace period any rate is fine");
        // 40 s in: 10 s past the grace period owes 160 KiB.
        p.start -= Duration::from_secs(40);
        assert!(matches!(p.add(1), Err(BodyError::TooSlow { bytes: 2, .. })));
        let mut fast = Pace::new();
        fast.start -= Duration::from_secs(40);
        assert!(fast.add(200 * 1024).is_ok());
    }
}
