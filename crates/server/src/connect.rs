//! The Connect protocol (<https://connectrpc.com/docs/protocol>) with the
//! JSON codec, as envd speaks it and E2B's SDKs use it:
//!
//! * unary: `POST` with `Content-Type: application/json`, the message as
//!   the body; the answer is the message (200) or a JSON error
//!   `{"code": "not_found", "message": …}` with the code's HTTP status;
//! * streams: `Content-Type: application/connect+json`; each message is an
//!   envelope (1 flag byte, a big-endian `u32` length, the JSON); the
//!   server's last envelope has flag `0x02` and holds `{}` or
//!   `{"error": {…}}`, and the HTTP status is 200 even for errors;
//! * `Connect-Timeout-Ms` bounds a call; envd's own
//!   `Keepalive-Ping-Interval` (seconds) asks a server stream to send a
//!   keepalive message when it has been idle that long.
//!
//! Compression is not supported (the SDKs disable it): a compressed
//! envelope or a `Connect-Content-Encoding` other than `identity` is
//! refused with `unimplemented`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::backend::BackendError;

/// Content type of unary JSON requests and responses.
pub const UNARY_CONTENT_TYPE: &str = "application/json";
/// Content type of streaming JSON requests and responses.
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
/// Envelope flag: the payload is compressed.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: end of stream (the server's last message).
pub const FLAG_END_STREAM: u8 = 0x02;
/// The Connect deadline header.
pub const TIMEOUT_HEADER: &str = "connect-timeout-ms";
/// envd's keepalive header: seconds between keepalive messages.
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";
/// The shortest keepalive interval honoured (a client asking for less gets
/// this much).
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(1);

/// A Connect error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The call was cancelled.
    Canceled,
    /// Unknown error.
    Unknown,
    /// Bad request.
    InvalidArgument,
    /// The deadline passed.
    DeadlineExceeded,
    /// No such thing.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// Not allowed.
    PermissionDenied,
    /// Out of a quota, or a message too large.
    ResourceExhausted,
    /// Not in a state that allows this.
    FailedPrecondition,
    /// Aborted.
    Aborted,
    /// Out of range.
    OutOfRange,
    /// Not implemented.
    Unimplemented,
    /// A bug.
    Internal,
    /// Try again later.
    Unavailable,
    /// Data lost.
    DataLoss,
    /// Missing or wrong credentials.
    Unauthenticated,
}

impl Code {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status a unary error with this code is sent with.
    pub fn http_status(self) -> StatusCode {
        match self {
            // 499 is nginx's "client closed request", as Connect uses it.
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: a code and a message for people.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ConnectError {
    /// The code.
    pub code: Code,
    /// The message.
    pub message: String,
    /// For `resource_exhausted` from a quota: when to try again (sent as
    /// `Retry-After` on unary errors).
    pub retry_after: Option<Duration>,
}

impl ConnectError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// The error's JSON form (`{"code": …, "message": …}`).
    pub fn to_json(&self) -> serde_json::Value {
        if self.message.is_empty() {
            json!({ "code": self.code.as_str() })
        } else {
            json!({ "code": self.code.as_str(), "message": self.message })
        }
    }

    /// The error as a unary response (its code's status, a JSON body).
    pub fn into_unary_response(self) -> Response<Body> {
        let mut response =
            json_response(self.code.http_status(), UNARY_CONTENT_TYPE, &self.to_json());
        if let Some(after) = self.retry_after {
            if let Ok(value) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
        }
        response
    }
}

impl From<BackendError> for ConnectError {
    fn from(err: BackendError) -> Self {
        let code = match &err {
            BackendError::NotFound(_) => Code::NotFound,
            BackendError::InvalidArgument(_) => Code::InvalidArgument,
            BackendError::AlreadyExists(_) => Code::AlreadyExists,
            BackendError::Conflict(_) => Code::FailedPrecondition,
            BackendError::QuotaExceeded { .. } | BackendError::NoSpace(_) => {
                Code::ResourceExhausted
            }
            BackendError::PermissionDenied(_) => Code::PermissionDenied,
            BackendError::Unimplemented(_) => Code::Unimplemented,
            BackendError::Timeout(_) => Code::DeadlineExceeded,
            BackendError::Unavailable(_) => Code::Unavailable,
            BackendError::Internal(_) => Code::Internal,
        };
        let retry_after = match &err {
            BackendError::QuotaExceeded { retry_after, .. } => *retry_after,
            _ => None,
        };
        ConnectError {
            code,
            message: err.to_string(),
            retry_after,
        }
    }
}

fn json_response(
    status: StatusCode,
    content_type: &'static str,
    value: &serde_json::Value,
) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A successful unary response carrying `message`.
pub fn unary_ok<T: Serialize>(message: &T) -> Response<Body> {
    match serde_json::to_value(message) {
        Ok(value) => json_response(StatusCode::OK, UNARY_CONTENT_TYPE, &value),
        Err(e) => ConnectError::new(Code::Internal, format!("encoding the response: {e}"))
            .into_unary_response(),
    }
}

/// A unary response: the message or the error.
pub fn unary_response<T: Serialize>(result: Result<T, ConnectError>) -> Response<Body> {
    match result {
        Ok(message) => unary_ok(&message),
        Err(e) => e.into_unary_response(),
    }
}

/// The media type of a `Content-Type` value, lowercased, without
/// parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(
        value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// Checks a request's headers for the given codec: content type, no
/// compression. A wrong content type is HTTP 415 (as the protocol says),
/// compression is `unimplemented`.
pub fn check_request_headers(headers: &HeaderMap, streaming: bool) -> Result<(), Response<Body>> {
    let wanted = if streaming {
        STREAM_CONTENT_TYPE
    } else {
        UNARY_CONTENT_TYPE
    };
    let media = media_type(headers);
    if media.as_deref() != Some(wanted) {
        let err = ConnectError::invalid(format!(
            "unsupported content type {:?}: this server speaks Connect with the JSON codec ({wanted})",
            media.unwrap_or_default()
        ));
        let mut response = err.into_unary_response();
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Err(response);
    }
    let encoding_header = if streaming {
        "connect-content-encoding"
    } else {
        "content-encoding"
    };
    if let Some(encoding) = headers.get(encoding_header) {
        if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "compressed requests are not supported (send identity)",
            )
            .into_unary_response());
        }
    }
    Ok(())
}

/// The call's deadline from `Connect-Timeout-Ms` (at most 10 digits, as
/// the protocol allows). `None` when absent.
pub fn timeout_from_headers(headers: &HeaderMap) -> Result<Option<Duration>, ConnectError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConnectError::invalid(format!(
            "invalid Connect-Timeout-Ms {text:?}: expected 1 to 10 digits"
        )));
    }
    let ms: u64 = text
        .parse()
        .map_err(|_| ConnectError::invalid("invalid Connect-Timeout-Ms"))?;
    Ok(Some(Duration::from_millis(ms)))
}

/// The keepalive interval a streaming client asked for with
/// `Keepalive-Ping-Interval` (seconds), at least [`MIN_KEEPALIVE`].
/// Absent or unparsable: no keepalives.
pub fn keepalive_from_headers(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(KEEPALIVE_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if secs == 0 {
        return None;
    }
    // Clamped: the interval is added to the current time, and a client's
    // u64::MAX would overflow it.
    Some(Duration::from_secs(secs.min(3600)).max(MIN_KEEPALIVE))
}

/// Decodes a JSON message. An empty payload is the empty message `{}`.
/// Unknown fields are ignored (as envd's protojson does); malformed JSON
/// or wrongly typed fields are `invalid_argument`.
pub fn decode_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ConnectError> {
    let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        payload
    };
    serde_json::from_slice(payload)
        .map_err(|e| ConnectError::invalid(format!("cannot decode the request message: {e}")))
}

/// One envelope of a streaming body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Flags ([`FLAG_COMPRESSED`], [`FLAG_END_STREAM`]).
    pub flags: u8,
    /// The message.
    pub payload: Bytes,
}

/// Encodes one envelope.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flags);
    // Messages are bounded far below 4 GiB by the callers; saturate anyway.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// The end-of-stream envelope: `{}` or `{"error": {…}}`.
pub fn encode_end_stream(error: Option<&ConnectError>) -> Bytes {
    let body = match error {
        None => json!({}),
        Some(e) => json!({ "error": e.to_json() }),
    };
    encode_envelope(FLAG_END_STREAM, body.to_string().as_bytes())
}

/// Splits a streaming body, fed in arbitrary chunks, into envelopes.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max_message: usize,
}

impl EnvelopeDecoder {
    /// A decoder refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        EnvelopeDecoder {
            buf: BytesMut::new(),
            max_message,
        }
    }

    /// Adds bytes read from the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// True when no partial envelope is pending (a body may end here).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next complete envelope, `None` when more bytes are needed.
    /// A message over the limit is `resource_exhausted` (before its bytes
    /// are buffered); a compressed one is `unimplemented`.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, ConnectError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!(
                    "message of {len} bytes is over the limit of {} bytes",
                    self.max_message
                ),
            ));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }
}

/// The sending side of a server stream: messages, then one end.
#[derive(Debug)]
pub struct StreamSender {
    tx: mpsc::Sender<Bytes>,
}

/// The client went away (the response body was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client closed the stream")]
pub struct StreamClosed;

impl StreamSender {
    /// Sends one message (waits while the client is slow to read).
    pub async fn send<T: Serialize>(&self, message: &T) -> Result<(), StreamClosed> {
        let payload = serde_json::to_vec(message).map_err(|_| StreamClosed)?;
        self.tx
            .send(encode_envelope(0, &payload))
            .await
            .map_err(|_| StreamClosed)
    }

    /// Ends the stream, successfully or with `error`.
    pub async fn finish(self, error: Option<ConnectError>) {
        // If the client is gone there is no one to tell.
        let _ = self.tx.send(encode_end_stream(error.as_ref())).await;
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// How many envelopes may wait for a slow client before senders wait.
const STREAM_BUFFER: usize = 16;

/// Opens a server stream: a 200 `application/connect+json` response whose
/// body is fed by the returned sender.
pub fn stream_response() -> (StreamSender, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(STREAM_CONTENT_TYPE));
    (StreamSender { tx }, response)
}

/// A whole stream that is only an error (a streaming call that failed
/// before its first message): HTTP 200 and the end-of-stream envelope.
pub fn stream_error(error: ConnectError) -> Response<Body> {
    let mut response = Response::new(Body::from(encode_end_stream(Some(&error))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(STREAM_CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_across_split_reads() {
        let a = encode_envelope(0, br#"{"a":1}"#);
        let b = encode_envelope(0, br#"{"b":2}"#);
        let mut wire = a.to_vec();
        wire.extend_from_slice(&b);
        let mut dec = EnvelopeDecoder::new(1024);
        let mut got = Vec::new();
        // Feed one byte at a time: every split point is exercised.
        for byte in &wire {
            dec.push(std::slice::from_ref(byte));
            while let Some(env) = dec.next_envelope().unwrap() {
                got.push(env.payload);
            }
        }
        assert_eq!(
            got,
            vec![
                Bytes::from_static(br#"{"a":1}"#),
                Bytes::from_static(br#"{"b":2}"#)
            ]
        );
        assert!(dec.is_empty());
    }

    #[test]
    fn partial_header_waits() {
        let mut dec = EnvelopeDecoder::new(1024);
        dec.push(&[0, 0, 0]);
        assert_eq!(dec.next_envelope().unwrap(), None);
        assert!(!dec.is_empty());
    }

    #[test]
    fn oversized_message_refused_before_buffering() {
        let mut dec = EnvelopeDecoder::new(10);
        dec.push(&[0, 0, 0, 0, 11]);
        let err = dec.next_envelope().unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
    }

    #[test]
    fn compressed_message_refused() {
        let mut dec = EnvelopeDecoder::new(10);
        dec.push(&encode_envelope(FLAG_COMPRESSED, b"x"));
        assert_eq!(dec.next_envelope().unwrap_err().code, Code::Unimplemented);
    }

    #[test]
    fn end_stream_envelopes() {
        let ok = encode_end_stream(None);
        assert_eq!(ok[0], FLAG_END_STREAM);
        assert_eq!(&ok[5..], b"{}");
        let err = encode_end_stream(Some(&ConnectError::new(Code::NotFound, "gone")));
        let body: serde_json::Value = serde_json::from_slice(&err[5..]).unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": "not_found", "message": "gone"}})
        );
        assert_eq!(
            u32::from_be_bytes([err[1], err[2], err[3], err[4]]) as usize,
            err.len() - 5
        );
    }

    #[test]
    fn bad_json_is_invalid_argument() {
        #[derive(serde::Deserialize, Debug)]
        struct M {
            #[allow(dead_code)]
            path: String,
        }
        assert_eq!(
            decode_json::<M>(b"{not json").unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            decode_json::<M>(br#"{"path": 3}"#).unwrap_err().code,
            Code::InvalidArgument
        );
        #[derive(serde::Deserialize, Debug, Default)]
        #[serde(default)]
        struct E {
            #[allow(dead_code)]
            x: u32,
        }
        // Empty body is the empty message; unknown fields are ignored.
        assert!(decode_json::<E>(b"").is_ok());
        assert!(decode_json::<E>(br#"{"other": 1}"#).is_ok());
    }

    #[test]
    fn timeout_header() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout_from_headers(&h).unwrap(), None);
        h.insert(TIMEOUT_HEADER, HeaderValue::from_static("1500"));
        assert_eq!(
            timeout_from_headers(&h).unwrap(),
            Some(Duration::from_millis(1500))
        );
        h.insert(TIMEOUT_HEADER, HeaderValue::from_static("12345678901"));
        assert!(timeout_from_headers(&h).is_err());
        h.insert(TIMEOUT_HEADER, HeaderValue::from_static("-1"));
        assert!(timeout_from_headers(&h).is_err());
    }

    #[test]
    fn keepalive_header() {
        let mut h = HeaderMap::new();
        assert_eq!(keepalive_from_headers(&h), None);
        h.insert(KEEPALIVE_HEADER, HeaderValue::from_static("50"));
        assert_eq!(keepalive_from_headers(&h), Some(Duration::from_secs(50)));
        h.insert(KEEPALIVE_HEADER, HeaderValue::from_static("0"));
        assert_eq!(keepalive_from_headers(&h), None);
    }

    #[test]
    fn backend_errors_map_to_codes() {
        let e: ConnectError = BackendError::NotFound("x".into()).into();
        assert_eq!(e.code, Code::NotFound);
        assert_eq!(e.code.http_status(), StatusCode::NOT_FOUND);
        let e: ConnectError = BackendError::QuotaExceeded {
            which: "sandboxes".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
        .into();
        assert_eq!(e.code, Code::ResourceExhausted);
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        let e: ConnectError = BackendError::Timeout("slow".into()).into();
        assert_eq!(e.code.as_str(), "deadline_exceeded");
    }
}
