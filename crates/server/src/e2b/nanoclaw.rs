//! nanoclaw's own routes beside E2B's: `GET /healthz`, `GET
//! /openapi.json`, `GET /metrics`, `POST /v1/run` and `GET /v1/audit`.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::json;

use super::body::read_limited;
use super::observe::note_input;
use super::{authenticate, presented_key, AppState, Peer};
use crate::audit::{self, Captured, Filter};
use crate::auth::Authenticator;
use crate::backend::{Backend, RunRequest};
use crate::error::ApiError;

type ApiResult = Result<Response<Body>, ApiError>;

/// Most records one `GET /v1/audit` returns.
pub const MAX_AUDIT_PAGE: usize = 1000;
/// Records `GET /v1/audit` returns without `limit`.
pub const DEFAULT_AUDIT_PAGE: usize = 100;
/// The languages `POST /v1/run` takes with `code`.
pub const RUN_LANGS: [&str; 4] = ["python", "node", "bash", "sh"];

/// `GET /healthz`: the daemon is up (no authentication).
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /openapi.json`: the document of every route served (no
/// authentication).
pub async fn openapi<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
) -> Response<Body> {
    let text = state
        .openapi
        .get_or_init(|| super::openapi::document::<B, A>(&state.envd_version).to_string());
    let mut response = Response::new(Body::from(text.clone()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `GET /metrics`: Prometheus' text format. Over a unix socket it needs
/// no API key (the socket's mode decides who connects); otherwise it
/// needs one, like every other route.
pub async fn metrics<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> ApiResult {
    let peer = conn.map(|Extension(p)| p);
    let keyless_unix = peer == Some(Peer { unix: true }) && presented_key(&headers).is_none();
    if !keyless_unix {
        authenticate(&state, &headers, peer).await?;
    }
    state.backend.refresh_metrics(&state.metrics).await;
    let mut response = Response::new(Body::from(state.metrics.render()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(response)
}

/// Checks what serde cannot: either `command`, or `lang` and `code`.
pub fn check_run_request(req: &RunRequest) -> Result<(), String> {
    match (&req.lang, &req.code) {
        (None, None) if req.command.is_empty() => {
            Err("give either command (an argv) or lang and code".into())
        }
        (None, None) => {
            if req.command.iter().any(|a| a.contains('\0')) {
                return Err("command contains a NUL byte".into());
            }
            Ok(())
        }
        (Some(_), Some(_)) if !req.command.is_empty() => {
            Err("give either command or lang and code, not both".into())
        }
        (Some(lang), Some(_)) if !RUN_LANGS.contains(&lang.as_str()) => Err(format!(
            "unknown lang {lang:?}: expected one of {}",
            RUN_LANGS.join(", ")
        )),
        (Some(_), Some(_)) => Ok(()),
        (Some(_), None) => Err("lang needs code".into()),
        (None, Some(_)) => Err("code needs lang".into()),
    }?;
    if req.timeout_ms == Some(0) {
        return Err("timeout_ms must be at least 1".into());
    }
    if req.template.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err("template must not be empty".into());
    }
    Ok(())
}

/// `POST /v1/run`: one command in a fresh sandbox, removed afterwards
/// ([`Backend::run_once`]); answers the backend's JSON.
pub async fn run<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let limits = &state.limits;
    let bytes = read_limited(
        &headers,
        body,
        limits.control_body,
        limits.body_idle,
        limits.pace(),
    )
    .await?;
    note_input(Captured::of(&bytes));
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is required: a JSON RunRequest (see /openapi.json)",
        ));
    }
    let req: RunRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid RunRequest: {e}")))?;
    check_run_request(&req).map_err(ApiError::bad_request)?;
    let outcome = state
        .backend
        .run_once(&tenant, req)
        .await
        .map_err(ApiError::control)?;
    Ok((StatusCode::OK, Json(outcome)).into_response())
}

/// The query of `GET /v1/audit` as a filter over `tenant`'s records.
fn audit_filter(
    tenant: &str,
    query: &HashMap<String, String>,
    now_ms: i64,
) -> Result<Filter, ApiError> {
    let mut f = Filter {
        tenant: Some(tenant.to_owned()),
        limit: Some(DEFAULT_AUDIT_PAGE),
        ..Filter::default()
    };
    for (key, value) in query {
        match key.as_str() {
            "since" => {
                let ms = crate::db::parse_time_or_age(value, now_ms).map_err(|e| {
                    ApiError::bad_request(format!(
                        "invalid since {value:?}: {e} (RFC 3339, or an age such as 1h)"
                    ))
                })?;
                f.since_ms = Some(ms);
            }
            "sandbox" => f.sandbox = Some(value.clone()),
            "kind" => {
                audit::validate_kind(value).map_err(|e| ApiError::bad_request(e.to_string()))?;
                f.kind = Some(value.clone());
            }
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_AUDIT_PAGE).contains(&n) => f.limit = Some(n),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid limit {value:?}: expected 1 to {MAX_AUDIT_PAGE}"
                    )))
                }
            },
            "after" => match value.parse::<i64>() {
                Ok(n) if n >= 0 => f.after_seq = Some(n),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid after {value:?}: expected a record's seq"
                    )))
                }
            },
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}: expected since, sandbox, kind, limit or after"
                )))
            }
        }
    }
    Ok(f)
}

/// `GET /v1/audit`: the caller's tenant's audit records, oldest first,
/// as a JSON array; page with `after=<seq of the last record>`.
pub async fn audit_records<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let Some(log) = state.audit.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server keeps no audit log",
        ));
    };
    let filter = audit_filter(tenant.as_str(), &query, crate::db::now_ms())?;
    let entries = tokio::task::spawn_blocking(move || log.query(&filter))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok((StatusCode::OK, Json(entries)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_req(json: &str) -> Result<(), String> {
        let req: RunRequest = serde_json::from_str(json).map_err(|e| e.to_string())?;
        check_run_request(&req)
    }

    #[test]
    fn run_requests() {
        assert!(run_req(r#"{"command":["echo","hi"]}"#).is_ok());
        assert!(run_req(r#"{"lang":"python","code":"print(1)","timeout_ms":5}"#).is_ok());
        for bad in [
            r#"{}"#,
            r#"{"command":[]}"#,
            r#"{"lang":"python"}"#,
            r#"{"code":"x"}"#,
            r#"{"lang":"cobol","code":"x"}"#,
            r#"{"command":["a"],"lang":"sh","code":"x"}"#,
            r#"{"command":["a"],"timeout_ms":0}"#,
            r#"{"command":["a"],"template":" "}"#,
            r#"{"command":["a"],"bogus":1}"#,
            r#"{"command":"echo"}"#,
        ] {
            assert!(run_req(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn audit_queries() {
        let mut q = HashMap::new();
        let f = audit_filter("alice", &q, 10_000_000).unwrap();
        assert_eq!(f.tenant.as_deref(), Some("alice"));
        assert_eq!(f.limit, Some(DEFAULT_AUDIT_PAGE));
        q.insert("since".to_string(), "1h".to_string());
        q.insert("limit".to_string(), "1000".to_string());
        q.insert("after".to_string(), "7".to_string());
        q.insert("kind".to_string(), "request".to_string());
        q.insert("sandbox".to_string(), "sbx".to_string());
        let f = audit_filter("alice", &q, 10_000_000).unwrap();
        assert_eq!(f.since_ms, Some(10_000_000 - 3_600_000));
        assert_eq!(
            (
                f.limit,
                f.after_seq,
                f.kind.as_deref(),
                f.sandbox.as_deref()
            ),
            (Some(1000), Some(7), Some("request"), Some("sbx"))
        );
        for (k, v) in [
            ("limit", "1001"),
            ("limit", "0"),
            ("after", "-1"),
            ("kind", "Bad Kind"),
            ("since", "yesterday"),
            ("tenant", "bob"),
        ] {
            let mut q = HashMap::new();
            q.insert(k.to_string(), v.to_string());
            assert!(audit_filter("alice", &q, 0).is_err(), "{k}={v}");
        }
    }
}
