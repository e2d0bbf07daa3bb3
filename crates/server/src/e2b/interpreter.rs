//! E2B's code-interpreter API (the Jupyter server behind port 49999 that
//! the `e2b-code-interpreter` SDK talks to), served by [`crate::contexts`]:
//! `POST /execute` (NDJSON stream), `POST /contexts`, `GET /contexts`,
//! `DELETE /contexts/{id}`, `POST /contexts/{id}/restart`.
//!
//! Requests name their sandbox with `E2b-Sandbox-Id` (and
//! `E2b-Sandbox-Port: 49999`) and prove access with the sandbox's token:
//! `X-Access-Token` (sent on `/execute`) or `E2B-Traffic-Access-Token`
//! (sent on every call, because the create answer's `trafficAccessToken`
//! is that same token). A sandbox that is unknown, another tenant's, or
//! reached with a wrong token is answered 404 "was not found", the same
//! for all three, so ids cannot be probed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::body::read_limited;
use super::envd::{self, Proof};
use super::{AppState, E2bState};
use crate::auth::Authenticator;
use crate::backend::{Backend, SandboxScope};
use crate::contexts::{ContextError, Execution, Language, RunCode, Target, MAX_CODE};
use crate::error::ApiError;

/// The code interpreter's port, as the SDK sends it in `E2b-Sandbox-Port`.
pub const PORT: &str = "49999";

/// The largest `/execute` body: room for [`MAX_CODE`] bytes of code even
/// when JSON escapes every byte of it (`\u00XX`), and env vars.
const MAX_EXECUTE_BODY: u64 = 6 * MAX_CODE as u64 + (256 << 10);

/// How often an idle `/execute` stream sends `{"type":"keepalive"}` (the
/// SDK ignores it): writing is how a client that went away is noticed, so
/// its cell can be interrupted.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Resolves the sandbox of a code-interpreter request; 404 when it cannot
/// be reached (unknown, another tenant's, wrong token, paused).
async fn scope<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
) -> Result<SandboxScope, ApiError> {
    let token = envd::token(headers).or_else(|| {
        headers
            .get("e2b-traffic-access-token")
            .and_then(|v| v.to_str().ok())
    });
    envd::resolve(state, headers, Proof::Token(token), None)
        .await
        .map_err(|e| {
            if e.status == StatusCode::BAD_GATEWAY {
                ApiError::not_found(e.message)
            } else {
                e
            }
        })
}

fn context_error(e: ContextError) -> ApiError {
    let status = match &e {
        ContextError::NotFound(_) => StatusCode::NOT_FOUND,
        ContextError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        ContextError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ContextError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        ContextError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ContextError::Backend(_) => {
            let ContextError::Backend(b) = e else {
                unreachable!()
            };
            return ApiError::envd(b);
        }
    };
    ApiError::new(status, e.to_string())
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid {what} body: {e}")))
}

#[derive(Deserialize)]
struct ExecuteBody {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

/// `POST /execute`: runs a cell; answers a stream of NDJSON events ending
/// with `{"type":"end_of_execution"}`.
pub async fn execute<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    request: Request,
) -> Response<Body> {
    match execute_inner(&state, request).await {
        Ok(exec) => stream(exec),
        Err(e) => e.into_response(),
    }
}

async fn execute_inner<B: Backend, A: Authenticator>(
    state: &AppState<B, A>,
    request: Request,
) -> Result<Execution, ApiError> {
    let (parts, body) = request.into_parts();
    let scope = scope(state, &parts.headers).await?;
    let bytes = read_limited(
        &parts.headers,
        body,
        MAX_EXECUTE_BODY,
        state.limits.body_idle,
        state.limits.pace(),
    )
    .await?;
    let req: ExecuteBody = parse(&bytes, "execute")?;
    let target = match (req.context_id, req.language) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "Only one of context_id or language can be provided",
            ))
        }
        (Some(id), None) => Target::Context(id),
        (None, lang) => Target::Default(Language::parse(lang.as_deref()).map_err(context_error)?),
    };
    state
        .contexts
        .execute(
            &state.backend,
            &scope,
            RunCode {
                code: req.code,
                target,
                env_vars: req.env_vars.unwrap_or_default(),
                timeout: None,
            },
        )
        .await
        .map_err(context_error)
}

/// The NDJSON response of an execution. When the client goes away the
/// execution is dropped, which interrupts its cell.
fn stream(mut exec: Execution) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let line = |v: Value| {
            let mut b = serde_json::to_vec(&v).unwrap_or_default();
            b.push(b'\n');
            Bytes::from(b)
        };
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = exec.events.recv() => match ev {
                    Some(ev) => {
                        if tx.send(line(ev.to_json())).await.is_err() {
                            return;
                        }
                        tick.reset();
                    }
                    None => {
                        let _ = tx.send(line(json!({"type": "end_of_execution"}))).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    if tx.send(line(json!({"type": "keepalive"}))).await.is_err() {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// `POST /contexts`: creates a context (`{"language","cwd"}`, both optional).
pub async fn create<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    request: Request,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    let scope = scope(&state, &parts.headers).await?;
    let bytes = state.limits.read_control_body(&parts.headers, body).await?;
    let req: CreateBody = parse(&bytes, "create context")?;
    let language = Language::parse(req.language.as_deref()).map_err(context_error)?;
    let info = state
        .contexts
        .create(&state.backend, &scope, language, req.cwd)
        .await
        .map_err(context_error)?;
    Ok(axum::Json(info.to_json()).into_response())
}

/// `GET /contexts`: the sandbox's contexts.
pub async fn list<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    headers: HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let scope = scope(&state, &headers).await?;
    let all: Vec<Value> = state
        .contexts
        .list(&scope)
        .iter()
        .map(|c| c.to_json())
        .collect();
    Ok(axum::Json(all).into_response())
}

/// `DELETE /contexts/{id}`.
pub async fn remove<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let scope = scope(&state, &headers).await?;
    state
        .contexts
        .remove(&state.backend, &scope, &id)
        .await
        .map_err(context_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /contexts/{id}/restart`.
pub async fn restart<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let scope = scope(&state, &headers).await?;
    state
        .contexts
        .restart(&state.backend, &scope, &id)
        .await
        .map_err(context_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
