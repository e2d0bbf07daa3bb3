//! nanoclaw's agent routes: `POST /v1/execute` (seed 000's
//! `execute(prompt, language, timeout)`), `GET /v1/approvals` and `POST
//! /v1/approvals/{id}`. They parse and check the request and hand it to
//! [`crate::agents::Agents`], which runs the agent in a child process.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use nanoclaw_agent::approval::Answer;
use serde::Deserialize;
use serde_json::json;

use super::observe::{note_input, note_quota_refusal};
use super::{authenticate, AppState, E2bState, Peer};
use crate::agents::{Agents, ExecuteError, ExecuteRequest, BUSY_RETRY};
use crate::audit::Captured;
use crate::auth::Authenticator;
use crate::backend::Backend;
use crate::error::ApiError;
use crate::metrics::Quota;

type ApiResult = Result<Response<Body>, ApiError>;

/// `POST /v1/approvals/{id}`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    decision: String,
}

fn agents_of<B, A>(state: &E2bState<B, A>) -> Result<&Agents, ApiError> {
    state.agents.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server runs no agents (it has no agent store)",
        )
    })
}

/// The HTTP answer to a run without a report.
fn execute_error(e: ExecuteError) -> ApiError {
    let status = match &e {
        ExecuteError::NoConfig => StatusCode::CONFLICT,
        ExecuteError::Busy(..) => StatusCode::TOO_MANY_REQUESTS,
        ExecuteError::NoAgent(_) => StatusCode::NOT_FOUND,
        ExecuteError::Model(_) => StatusCode::BAD_GATEWAY,
        ExecuteError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ExecuteError::Spawn(_) | ExecuteError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let retry_after = matches!(e, ExecuteError::Busy(..)).then_some(BUSY_RETRY);
    ApiError {
        status,
        message: e.to_string(),
        retry_after,
    }
}

/// Reads a small JSON body (empty: 400 naming `what`).
async fn json_body<B, A>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<bytes::Bytes, ApiError> {
    let bytes = state.limits.read_control_body(headers, body).await?;
    note_input(Captured::of(&bytes));
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "request body is required: a JSON {what} (see /openapi.json)"
        )));
    }
    Ok(bytes)
}

/// `POST /v1/execute`: runs the agent on the prompt (it writes code, runs
/// it in its sandbox, answers) and answers its JSON report.
pub async fn execute<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let agents = agents_of(&state)?;
    let bytes = json_body(&state, &headers, body, "ExecuteRequest").await?;
    let req: ExecuteRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid ExecuteRequest: {e}")))?;
    let mut req = req.check().map_err(ApiError::bad_request)?;
    if let Some(name) = &req.image {
        req.image_ref = Some(registered_image(&state, &tenant, name, &req.language)?);
    }
    let _slot = agents.admit(&tenant).map_err(|e| {
        if matches!(e, ExecuteError::Busy(..)) {
            state.metrics.quota_refused(Quota::AgentRuns);
            note_quota_refusal(&e.to_string());
        }
        execute_error(e)
    })?;
    let report = agents.execute(&tenant, &req).await.map_err(execute_error)?;
    Ok((StatusCode::OK, Json(report)).into_response())
}

/// The store reference of `tenant`'s registered image `name`, which must
/// be registered for `language`.
fn registered_image<B, A>(
    state: &E2bState<B, A>,
    tenant: &crate::auth::TenantId,
    name: &str,
    language: &str,
) -> Result<String, ApiError> {
    let found = state
        .images
        .as_deref()
        .and_then(|i| i.list(tenant).into_iter().find(|r| r.name == name));
    let Some(image) = found else {
        return Err(ApiError::not_found(format!(
            "no image {name:?} registered for tenant {tenant} (register it with POST /v1/images)"
        )));
    };
    if !image.languages.iter().any(|l| l == language) {
        return Err(ApiError::bad_request(format!(
            "image {name:?} was registered for {}, not {language}",
            image.languages.join(", ")
        )));
    }
    Ok(image.reference)
}

/// `GET /v1/approvals`: the caller's tenant's pending approval requests
/// (`?all=true`: answered and expired ones too), newest first.
pub async fn approvals<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let agents = agents_of(&state)?;
    let mut all = false;
    for (key, value) in &query {
        match (key.as_str(), value.as_str()) {
            ("all", "true" | "1") => all = true,
            ("all", "false" | "0") => all = false,
            ("all", v) => {
                return Err(ApiError::bad_request(format!(
                    "invalid all {v:?}: expected true or false"
                )))
            }
            (other, _) => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}: expected all"
                )))
            }
        }
    }
    let rows = agents
        .approvals(&tenant, all)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok((StatusCode::OK, Json(rows)).into_response())
}

/// `POST /v1/approvals/{id}`: answers one of the caller's tenant's pending
/// requests. Another tenant's, an unknown, an expired or an answered one
/// is a 404, as if it did not exist.
pub async fn answer<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let agents = agents_of(&state)?;
    let bytes = json_body(&state, &headers, body, "decision").await?;
    let d: DecisionBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid decision: {e}")))?;
    let answer = match d.decision.as_str() {
        "allow-once" => Answer::AllowOnce,
        "allow-always" => Answer::AllowAlways,
        "deny" => Answer::Deny,
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown decision {other:?}: expected allow-once, allow-always or deny"
            )))
        }
    };
    let answered = agents
        .answer(&tenant, &id, answer)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if !answered {
        return Err(ApiError::not_found(format!(
            "no pending approval request {id:?} (unknown, answered or expired)"
        )));
    }
    Ok((
        StatusCode::OK,
        Json(json!({"id": id, "decision": answer.as_str()})),
    )
        .into_response())
}
