//! The HTTP both clients share: one JSON POST, retried with backoff on
//! retryable failures, each attempt bounded by `request_timeout` and all of
//! them by the caller's deadline. The key is a header here and nowhere
//! else: every error leaving this module has it redacted.

use std::io::{self, BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ProviderConfig, ProviderError};

/// Longest backoff between two attempts (before jitter), whatever the
/// number of retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How much of an error body is read (for its message).
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// How much of an unparseable error body ends up in the message.
const MAX_ERROR_SNIPPET: usize = 300;
/// Redaction marker.
const REDACTED: &str = "<redacted>";

/// A successful answer's body, as the parsers see it.
pub(crate) struct Body {
    /// Its `Content-Type` (lowercase; empty when absent).
    pub content_type: String,
    /// The bytes, as they arrive.
    pub reader: Box<dyn BufRead + Send>,
}

impl Body {
    /// True when the server sent one JSON document rather than a stream.
    pub fn is_json(&self) -> bool {
        self.content_type.contains("json")
    }
}

/// What a body parser can fail with: reading (mapped to a timeout or a
/// transport error by [`Endpoint`]) or the provider's own error.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// Reading the body failed.
    Io(io::Error),
    /// The body said something was wrong.
    Provider(ProviderError),
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        StreamError::Io(e)
    }
}

impl From<ProviderError> for StreamError {
    fn from(e: ProviderError) -> Self {
        StreamError::Provider(e)
    }
}

/// One failed attempt.
struct Failure {
    error: ProviderError,
    /// The server's `Retry-After` (or `retry-after-ms`), if any.
    retry_after: Option<Duration>,
    /// True when text already reached `on_text`: retrying would repeat it.
    emitted: bool,
}

/// A URL to POST JSON to, with its headers and retry policy.
pub(crate) struct Endpoint {
    agent: ureq::Agent,
    url: String,
    headers: Vec<(&'static str, String)>,
    secret: Option<String>,
    request_timeout: Duration,
    max_retries: u32,
    backoff: Duration,
}

impl Endpoint {
    /// An endpoint at `url` sending `headers` (the auth header included;
    /// `cfg.api_key` is redacted from every error).
    pub fn new(
        cfg: &ProviderConfig,
        url: String,
        headers: Vec<(&'static str, String)>,
    ) -> Result<Endpoint, ProviderError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ProviderError::Config(format!(
                "the model API's base_url must start with http:// or https:// (got {url:?})"
            )));
        }
        if cfg.request_timeout.is_zero() {
            return Err(ProviderError::Config(
                "the model API's request_timeout must be more than zero".into(),
            ));
        }
        let agent = ureq::AgentBuilder::new()
            .user_agent(concat!("nanoclaw/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Endpoint {
            agent,
            url,
            headers,
            secret: cfg.api_key.clone().filter(|k| !k.is_empty()),
            request_timeout: cfg.request_timeout,
            max_retries: cfg.max_retries,
            backoff: cfg.backoff,
        })
    }

    /// Where it posts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends a request body (JSON) and parses the answer into a
    /// [`Response`](super::Response), with the attempts it took.
    pub fn complete(
        &self,
        body: &Value,
        deadline: Instant,
        on_text: &mut dyn FnMut(&str),
        parse: impl Fn(Body, &mut dyn FnMut(&str)) -> Result<super::Response, StreamError>,
    ) -> Result<super::Response, ProviderError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| ProviderError::Protocol(format!("cannot encode the request: {e}")))?;
        let (mut resp, attempts) = self.post(&body, deadline, on_text, parse)?;
        resp.attempts = attempts;
        Ok(resp)
    }

    /// POSTs `body` and hands the answer to `parse`, retrying retryable
    /// failures (unless text of the failed attempt already reached
    /// `on_text`) with exponential backoff and jitter, or after the server's
    /// `Retry-After`; never sleeps past `deadline`. Returns the parsed value
    /// and the number of attempts.
    pub fn post<T>(
        &self,
        body: &[u8],
        deadline: Instant,
        on_text: &mut dyn FnMut(&str),
        parse: impl Fn(Body, &mut dyn FnMut(&str)) -> Result<T, StreamError>,
    ) -> Result<(T, u32), ProviderError> {
        let start = Instant::now();
        let mut last: Option<ProviderError> = None;
        let mut attempt: u32 = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let budget = deadline.saturating_duration_since(start);
                return Err(self.redact(last.unwrap_or(ProviderError::Timeout(budget))));
            }
            attempt += 1;
            let timeout = self.request_timeout.min(left);
            let failure = match self.attempt(body, timeout, on_text, &parse) {
                Ok(v) => return Ok((v, attempt)),
                Err(f) => f,
            };
            if !failure.error.retryable() || failure.emitted || attempt > self.max_retries {
                return Err(self.redact(failure.error));
            }
            let delay = failure
                .retry_after
                .unwrap_or_else(|| jittered(backoff_for(self.backoff, attempt)));
            if Instant::now() + delay >= deadline {
                return Err(self.redact(failure.error));
            }
            std::thread::sleep(delay);
            last = Some(failure.error);
        }
    }

    /// One attempt, bounded by `timeout`.
    fn attempt<T>(
        &self,
        body: &[u8],
        timeout: Duration,
        on_text: &mut dyn FnMut(&str),
        parse: &impl Fn(Body, &mut dyn FnMut(&str)) -> Result<T, StreamError>,
    ) -> Result<T, Failure> {
        let mut req = self.agent.post(&self.url).timeout(timeout);
        for (name, value) in &self.headers {
            req = req.set(name, value);
        }
        let fail = |error, retry_after| Failure {
            error,
            retry_after,
            emitted: false,
        };
        let resp = match req.send_bytes(body) {
            Ok(resp) => resp,
            Err(ureq::Error::Status(status, resp)) => {
                let retry_after = retry_after(&resp);
                let message = error_message(resp, status);
                return Err(fail(ProviderError::Status { status, message }, retry_after));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(fail(self.transport_error(&t, timeout), None));
            }
        };
        let body = Body {
            content_type: resp.content_type().to_ascii_lowercase(),
            reader: Box::new(BufReader::new(resp.into_reader())),
        };
        let mut emitted = false;
        let mut tracked = |s: &str| {
            emitted = true;
            on_text(s);
        };
        let result = parse(body, &mut tracked);
        result.map_err(|e| {
            let error = match e {
                StreamError::Provider(ProviderError::Transport { url, message })
                    if url.is_empty() =>
                {
                    ProviderError::Transport {
                        url: self.url.clone(),
                        message,
                    }
                }
                StreamError::Provider(p) => p,
                StreamError::Io(io) => self.io_error(&io, timeout),
            };
            Failure {
                error,
                retry_after: None,
                emitted,
            }
        })
    }

    fn transport_error(&self, t: &ureq::Transport, timeout: Duration) -> ProviderError {
        let mut source = std::error::Error::source(t);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                if is_timeout(io) {
                    return ProviderError::Timeout(timeout);
                }
            }
            source = s.source();
        }
        let message = match (t.message(), std::error::Error::source(t)) {
            (Some(m), Some(s)) => format!("{}: {m}: {s}", t.kind()),
            (Some(m), None) => format!("{}: {m}", t.kind()),
            (None, Some(s)) => format!("{}: {s}", t.kind()),
            (None, None) => t.kind().to_string(),
        };
        ProviderError::Transport {
            url: self.url.clone(),
            message,
        }
    }

    fn io_error(&self, e: &io::Error, timeout: Duration) -> ProviderError {
        if is_timeout(e) {
            return ProviderError::Timeout(timeout);
        }
        ProviderError::Transport {
            url: self.url.clone(),
            message: format!("reading the answer: {e}"),
        }
    }

    /// `e` with the key replaced by a marker wherever a message could hold it.
    fn redact(&self, e: ProviderError) -> ProviderError {
        let Some(key) = self.secret.as_deref() else {
            return e;
        };
        let clean = |s: String| s.replace(key, REDACTED);
        match e {
            ProviderError::Status { status, message } => ProviderError::Status {
                status,
                message: clean(message),
            },
            ProviderError::Transport { url, message } => ProviderError::Transport {
                url: clean(url),
                message: clean(message),
            },
            ProviderError::Protocol(m) => ProviderError::Protocol(clean(m)),
            ProviderError::Config(m) => ProviderError::Config(clean(m)),
            t @ ProviderError::Timeout(_) => t,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// The server's wish: `retry-after-ms` (OpenAI) or `retry-after` in seconds
/// (an HTTP date is ignored).
fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    if let Some(ms) = resp
        .header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return secs_to_duration(ms / 1000.0);
    }
    let secs = resp.header("retry-after")?.trim().parse::<f64>().ok()?;
    secs_to_duration(secs)
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    if secs.is_finite() && secs >= 0.0 {
        Duration::try_from_secs_f64(secs.min(86_400.0)).ok()
    } else {
        None
    }
}

/// The message of an error answer: its JSON `error.message` (or `error`
/// when that is a string, or `message`), else the body's start.
fn error_message(resp: ureq::Response, status: u16) -> String {
    let status_text = resp.status_text().to_string();
    let mut raw = Vec::new();
    // A body that cannot be read still leaves the status to report.
    let _ = resp
        .into_reader()
        .take(MAX_ERROR_BODY)
        .read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    if let Some(m) = message_from_json(&text) {
        return m;
    }
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return if status_text.is_empty() {
            format!("HTTP {status}")
        } else {
            status_text
        };
    }
    snippet(trimmed)
}

/// `error.message`, `error` (a string) or `message` of a JSON error body.
pub(crate) fn message_from_json(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    let m = v
        .pointer("/error/message")
        .or_else(|| v.get("error").filter(|e| e.is_string()))
        .or_else(|| v.get("message"))?;
    m.as_str().map(str::to_string)
}

/// The start of `s`, at most [`MAX_ERROR_SNIPPET`] bytes, on a char boundary.
pub(crate) fn snippet(s: &str) -> String {
    if s.len() <= MAX_ERROR_SNIPPET {
        return s.to_string();
    }
    let mut end = MAX_ERROR_SNIPPET;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `first` doubled for each retry after the first, capped at [`MAX_BACKOFF`].
fn backoff_for(first: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

/// `d` scaled by a random factor in [0.8, 1.2).
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = match getrandom::getrandom(&mut b) {
        Ok(()) => f64::from(u16::from_le_bytes(b)) / 65536.0,
        Err(_) => 0.5,
    };
    d.mul_f64(0.8 + 0.4 * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_millis(500);
        assert_eq!(backoff_for(b, 1), Duration::from_millis(500));
        assert_eq!(backoff_for(b, 2), Duration::from_secs(1));
        assert_eq!(backoff_for(b, 3), Duration::from_secs(2));
        assert_eq!(backoff_for(b, 40), MAX_BACKOFF);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d < Duration::from_secs(12),
                "{d:?}"
            );
        }
    }

    #[test]
    fn error_messages_from_both_shapes() {
        let anthropic =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(message_from_json(anthropic).as_deref(), Some("Overloaded"));
        let openai = r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            message_from_json(openai).as_deref(),
            Some("Rate limit reached")
        );
        let ollama = r#"{"error":"model \"x\" not found"}"#;
        assert_eq!(
            message_from_json(ollama).as_deref(),
            Some("model \"x\" not found")
        );
        assert_eq!(message_from_json("<html>bad gateway</html>"), None);
    }

    #[test]
    fn snippet_cuts_on_a_char_boundary() {
        let s = "é".repeat(400);
        let cut = snippet(&s);
        assert!(cut.len() <= MAX_ERROR_SNIPPET + "…".len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_key_is_redacted_from_every_message() {
        let cfg = ProviderConfig {
            kind: super::super::Kind::OpenAi,
            api_key: Some("sk-secret-123".into()),
            model: "m".into(),
            base_url: None,
            max_tokens: 10,
            request_timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff: Duration::from_millis(1),
        };
        let ep = Endpoint::new(&cfg, "http://127.0.0.1:1/x".into(), vec![]).unwrap();
        let e = ep.redact(ProviderError::Status {
            status: 401,
            message: "Incorrect API key provided: sk-secret-123".into(),
        });
        assert!(!e.to_string().contains("sk-secret-123"), "{e}");
        assert!(e.to_string().contains(REDACTED));
    }

    #[test]
    fn bad_urls_and_timeouts_are_config_errors() {
        let mut cfg = ProviderConfig {
            kind: super::super::Kind::OpenAi,
            api_key: None,
            model: "m".into(),
            base_url: None,
            max_tokens: 10,
            request_timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff: Duration::from_millis(1),
        };
        assert!(matches!(
            Endpoint::new(&cfg, "ftp://x".into(), vec![]),
            Err(ProviderError::Config(_))
        ));
        cfg.request_timeout = Duration::ZERO;
        assert!(matches!(
            Endpoint::new(&cfg, "http://x".into(), vec![]),
            Err(ProviderError::Config(_))
        ));
    }
}
