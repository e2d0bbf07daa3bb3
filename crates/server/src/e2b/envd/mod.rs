//! The envd data plane: what runs "inside" a sandbox in E2B (processes,
//! filesystem, file transfer, health), routed here by the
//! `E2b-Sandbox-Id` header the SDK sends with every data-plane request
//! (or, failing that, by a `49983-<id>.<domain>` Host as E2B's sandbox
//! URLs have), and authorized by the sandbox's `X-Access-Token`.
//!
//! A sandbox that is unknown, belongs to no one the token proves, or is
//! paused is answered like E2B's proxy answers a sandbox it cannot reach,
//! on every data-plane route (Connect ones included): HTTP 502 with
//! `{"code": 502, "message": "The sandbox <id> was not found"}` (the SDK
//! turns "was not found" into `SandboxNotRunningException`). A wrong token
//! gets the same answer as an unknown sandbox, so ids cannot be probed.

pub mod files;
pub mod filesystem;
pub mod process;
pub mod proto;

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::DeserializeOwned;

use super::body::read_limited;
use super::{observe, E2bState};
use crate::auth::{constant_time_eq, Authenticator};
use crate::backend::{Backend, BackendError, SandboxScope, SandboxState};
use crate::connect::{self, Code, ConnectError, EnvelopeDecoder};
use crate::error::ApiError;

/// envd's port, part of E2B's sandbox host names.
const ENVD_PORT: &str = "49983";

/// The sandbox a data-plane request is for: the `E2b-Sandbox-Id` header,
/// else a Host of the form `49983-<id>.<domain>`.
pub fn target_sandbox(headers: &HeaderMap) -> Option<String> {
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        let id = id.trim();
        return (!id.is_empty()).then(|| id.to_owned());
    }
    let host = headers.get("host")?.to_str().ok()?;
    let first = host.split('.').next()?;
    let (port, id) = first.split_once('-')?;
    (port == ENVD_PORT && !id.is_empty() && host.contains('.')).then(|| id.to_owned())
}

/// The user of an envd RPC: `Authorization: Basic base64("user:")`, as
/// the SDK sends it; `None` for the sandbox's default user.
pub fn user_from_headers(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get("authorization") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| "invalid Authorization header".to_string())?;
    let Some((scheme, rest)) = text.trim().split_once(' ') else {
        return Err("invalid Authorization header".into());
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(format!(
            "unsupported Authorization scheme {scheme:?}: expected Basic"
        ));
    }
    let decoded = STANDARD
        .decode(rest.trim())
        .map_err(|_| "invalid Basic credentials".to_string())?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| "invalid Basic credentials".to_string())?;
    let user = decoded.split(':').next().unwrap_or("");
    if user.contains('\0') {
        return Err("invalid user name".into());
    }
    Ok((!user.is_empty()).then(|| user.to_owned()))
}

/// The 502 answer for a sandbox that cannot be reached.
fn unreachable(id: &str, why: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, format!("The sandbox {id} {why}"))
}

/// How the caller proves access: the token header, or a signature over
/// the token (signed `/files` URLs).
pub enum Proof<'a> {
    /// `X-Access-Token` (may be absent).
    Token(Option<&'a str>),
    /// A check of the sandbox's token (signature verification).
    Check(&'a (dyn Fn(&str) -> bool + Sync)),
}

/// Resolves a data-plane request to the sandbox's scope: the owning
/// tenant (from the token) and `user`. Errors are REST errors (502 for an
/// unknown, paused or wrongly-tokened sandbox; 400 without a sandbox id).
pub async fn resolve<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
    proof: Proof<'_>,
    user: Option<String>,
) -> Result<SandboxScope, ApiError> {
    let Some(id) = target_sandbox(headers) else {
        return Err(ApiError::bad_request(
            "missing E2b-Sandbox-Id header: which sandbox is this request for?",
        ));
    };
    let access = match state.backend.envd_access(&id).await {
        Ok(a) => a,
        Err(BackendError::NotFound(_)) => return Err(unreachable(&id, "was not found")),
        Err(e) => return Err(ApiError::envd(e)),
    };
    let (proven, why) = match proof {
        Proof::Token(token) => (
            token.is_some_and(|t| constant_time_eq(t.as_bytes(), access.access_token.as_bytes())),
            if token.is_some() {
                "wrong access token"
            } else {
                "no access token"
            },
        ),
        Proof::Check(check) => (check(&access.access_token), "wrong URL signature"),
    };
    if !proven {
        // Recorded as concerning the owner: it is their sandbox someone
        // tried to reach.
        observe::note_auth_failure(why, Some(&access.tenant));
        return Err(unreachable(&id, "was not found"));
    }
    observe::charge(state, &access.tenant).await?;
    if access.state == SandboxState::Paused {
        return Err(unreachable(&id, "is paused"));
    }
    Ok(SandboxScope {
        tenant: access.tenant,
        sandbox_id: id,
        user,
    })
}

/// The access token header of a request.
pub fn token(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-access-token").and_then(|v| v.to_str().ok())
}

/// `GET /health` of a sandbox: 204 when it runs, 502 when it does not.
pub async fn health<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
) -> Response<Body> {
    match resolve(state, headers, Proof::Token(token(headers)), None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Resolves the scope of a Connect call (user from `Authorization:
/// Basic`). A bad user header is a Connect `invalid_argument`; an
/// unreachable sandbox is the proxy-style 502 (see the module docs).
pub async fn rpc_scope<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
) -> Result<SandboxScope, Response<Body>> {
    let user =
        user_from_headers(headers).map_err(|e| ConnectError::invalid(e).into_unary_response())?;
    resolve(state, headers, Proof::Token(token(headers)), user)
        .await
        .map_err(|e| {
            if e.status == StatusCode::TOO_MANY_REQUESTS {
                // A rate limit: Connect's shape (resource_exhausted, 429).
                ConnectError {
                    code: Code::ResourceExhausted,
                    message: e.message,
                    retry_after: e.retry_after,
                }
                .into_unary_response()
            } else {
                e.into_response()
            }
        })
}

/// A parsed unary call: its scope, message and deadline.
pub struct Unary<T> {
    /// Which sandbox, whose, as whom.
    pub scope: SandboxScope,
    /// The request message.
    pub message: T,
    /// `Connect-Timeout-Ms`.
    pub timeout: Option<Duration>,
}

/// Checks, authorizes and decodes a unary Connect request.
pub async fn read_unary<T: DeserializeOwned, B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Result<Unary<T>, Response<Body>> {
    connect::check_request_headers(&parts.headers, false)?;
    let timeout =
        connect::timeout_from_headers(&parts.headers).map_err(ConnectError::into_unary_response)?;
    let scope = rpc_scope(state, &parts.headers).await?;
    let limit = state.limits.rpc_message as u64;
    let bytes = read_limited(
        &parts.headers,
        body,
        limit,
        state.limits.body_idle,
        state.limits.pace(),
    )
    .await
    .map_err(|e| body_error_to_connect(&e).into_unary_response())?;
    let message = connect::decode_json(&bytes).map_err(ConnectError::into_unary_response)?;
    Ok(Unary {
        scope,
        message,
        timeout,
    })
}

/// A body error as a Connect error.
pub fn body_error_to_connect(e: &super::body::BodyError) -> ConnectError {
    use super::body::BodyError;
    let code = match e {
        BodyError::TooLarge { .. } => Code::ResourceExhausted,
        BodyError::Timeout(_) | BodyError::TooSlow { .. } => Code::DeadlineExceeded,
        BodyError::Read(_) => Code::InvalidArgument,
    };
    ConnectError::new(code, e.to_string())
}

/// Runs a unary call's backend work within its deadline.
pub async fn within<T>(
    timeout: Option<Duration>,
    work: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, ConnectError> {
    match timeout {
        None => work.await.map_err(ConnectError::from),
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(result) => result.map_err(ConnectError::from),
            Err(_) => Err(ConnectError::new(
                Code::DeadlineExceeded,
                format!(
                    "the call did not finish within its {} ms deadline",
                    limit.as_millis()
                ),
            )),
        },
    }
}

/// A parsed server-streaming call.
pub struct StreamCall<T> {
    /// Which sandbox, whose, as whom.
    pub scope: SandboxScope,
    /// The request message.
    pub message: T,
    /// `Connect-Timeout-Ms` (0 means none, as envd reads it).
    pub timeout: Option<Duration>,
    /// `Keepalive-Ping-Interval`.
    pub keepalive: Option<Duration>,
}

/// Checks, authorizes and decodes a server-streaming request (one
/// enveloped message). Wrong content type: 415; anything else fails as a
/// stream (HTTP 200, error in the end-of-stream message).
pub async fn read_stream_call<T: DeserializeOwned, B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Result<StreamCall<T>, Response<Body>> {
    connect::check_request_headers(&parts.headers, true)?;
    let fail = connect::stream_error;
    let timeout = connect::timeout_from_headers(&parts.headers)
        .map_err(fail)?
        .filter(|t| !t.is_zero());
    let keepalive = connect::keepalive_from_headers(&parts.headers);
    let scope = rpc_scope(state, &parts.headers).await?;
    let limit = state.limits.rpc_message;
    let bytes = read_limited(
        &parts.headers,
        body,
        limit as u64 + 5,
        state.limits.body_idle,
        state.limits.pace(),
    )
    .await
    .map_err(|e| fail(body_error_to_connect(&e)))?;
    let mut decoder = EnvelopeDecoder::new(limit);
    decoder.push(&bytes);
    let envelope = match decoder.next_envelope().map_err(fail)? {
        Some(env) if decoder.is_empty() => env,
        _ => {
            return Err(fail(ConnectError::invalid(
                "a server-streaming request must be exactly one enveloped message",
            )))
        }
    };
    let message = connect::decode_json(&envelope.payload).map_err(fail)?;
    Ok(StreamCall {
        scope,
        message,
        timeout,
        keepalive,
    })
}

/// Refuses empty paths and paths with NUL bytes; everything else is the
/// backend's to resolve inside the sandbox.
pub fn check_path(what: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("{what} is required"));
    }
    if path.contains('\0') {
        return Err(format!("{what} contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn sandbox_from_header_or_host() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("49983-abc123.e2b.local"));
        assert_eq!(target_sandbox(&h).as_deref(), Some("abc123"));
        h.insert("e2b-sandbox-id", HeaderValue::from_static("xyz"));
        assert_eq!(target_sandbox(&h).as_deref(), Some("xyz"));
        let mut other = HeaderMap::new();
        other.insert("host", HeaderValue::from_static("127.0.0.1:3000"));
        assert_eq!(target_sandbox(&other), None);
    }

    #[test]
    fn user_from_basic() {
        let mut h = HeaderMap::new();
        assert_eq!(user_from_headers(&h).unwrap(), None);
        h.insert("authorization", HeaderValue::from_static("Basic cm9vdDo=")); // "root:"
        assert_eq!(user_from_headers(&h).unwrap().as_deref(), Some("root"));
        h.insert("authorization", HeaderValue::from_static("Bearer x"));
        assert!(user_from_headers(&h).is_err());
    }

    #[test]
    fn paths() {
        assert!(check_path("path", "").is_err());
        assert!(check_path("path", "a\0b").is_err());
        assert!(check_path("path", "../../etc/passwd").is_ok());
    }
}
