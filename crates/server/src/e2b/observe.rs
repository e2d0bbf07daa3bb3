//! What happens around every request: its rate-limit charge, its count in
//! [`crate::metrics`], and its audit record.
//!
//! # The audit record of a request
//!
//! The [`observe`] middleware wraps every route (and the fallback). It
//! runs the request, then — before handing the response (for a stream:
//! its head) back to hyper — appends one record to the audit log and
//! waits until it is on disk ([`crate::audit::Audit::append_all`]: the
//! log's writer thread, group commit). A client therefore never sees an
//! answer whose record is not written. Records the backend wrote for the
//! same request with [`crate::audit::Audit::append_with_answer`] (a
//! create, a kill, a file operation) go in the same commit, before the
//! request's own record: one fsync per request. If the append fails, the
//! answer is replaced by a 503 (`nanoclaw_audit_failures_total` counts
//! these); whatever the request did has happened, but nothing goes out
//! unrecorded.
//!
//! The record is `request` (tenant, sandbox, method, path, status,
//! duration), `auth_failure` when the caller could not be authenticated
//! (a missing or unknown API key, a missing or wrong access token; the
//! key or token itself is never recorded) or `quota_refusal` when the
//! tenant's rate limit (or its agent runs at once) refused it. Liveness probes (`GET /healthz`, and
//! `GET /health` without a sandbox) are counted but not recorded.
//!
//! Handlers tell the middleware who the caller turned out to be through a
//! task-local note ([`note_tenant`], …): authentication happens inside
//! the handlers ([`super::authenticate`], [`super::envd::resolve`]),
//! which run in the middleware's task.

use std::cell::RefCell;
use std::ops::Not;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Response, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::IntoResponse;

use super::{envd, AppState, E2bState};
use crate::audit::{kind, Captured, Record};
use crate::auth::{Authenticator, TenantId};
use crate::error::ApiError;
use crate::metrics::Quota;

/// Longest path (with its query) kept in a record.
const MAX_AUDIT_PATH: usize = 2048;

/// How a request ended, as far as the audit log is concerned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Outcome {
    /// Routed (and authenticated where needed).
    #[default]
    Request,
    /// Refused before authentication succeeded.
    AuthFailure,
    /// Refused by the tenant's rate limit.
    QuotaRefusal,
}

/// What a handler learned about its request.
#[derive(Debug, Default)]
struct Note {
    tenant: Option<TenantId>,
    sandbox: Option<String>,
    outcome: Outcome,
    detail: Option<String>,
    input: Option<Captured>,
}

tokio::task_local! {
    static NOTE: RefCell<Note>;
}

fn with_note(f: impl FnOnce(&mut Note)) {
    // Outside a request (a unit test calling a handler directly) there is
    // no note to write to.
    let _ = NOTE.try_with(|n| f(&mut n.borrow_mut()));
}

/// The request is on behalf of `tenant`.
pub fn note_tenant(tenant: &TenantId) {
    with_note(|n| n.tenant = Some(tenant.clone()));
}

/// Authentication failed (`why`, without any key material). `tenant` is
/// whom the attempt concerns, when known (a sandbox's owner).
pub fn note_auth_failure(why: &str, tenant: Option<&TenantId>) {
    with_note(|n| {
        n.outcome = Outcome::AuthFailure;
        n.detail = Some(why.to_owned());
        if let Some(t) = tenant {
            n.tenant = Some(t.clone());
        }
    });
}

/// The request concerns `sandbox` (one it just created: its id is not in
/// the request).
pub fn note_sandbox(sandbox: &str) {
    with_note(|n| n.sandbox = Some(sandbox.to_owned()));
}

/// What the request did, in the words of its handler (e.g. `mcp
/// tools/call sandbox_exec`), kept in its record.
pub fn note_detail(detail: &str) {
    with_note(|n| n.detail = Some(detail.to_owned()));
}

/// The request's input, kept (bounded) in its record.
pub fn note_input(input: Captured) {
    with_note(|n| n.input = Some(input));
}

/// A quota refused the request (`detail` names it): it is recorded as a
/// `quota_refusal`.
pub fn note_quota_refusal(detail: &str) {
    with_note(|n| {
        n.outcome = Outcome::QuotaRefusal;
        n.detail = Some(detail.to_owned());
    });
}

/// Charges one request to `tenant`'s rate limit (its limits come from
/// the [`Authenticator`]). Over the limit: 429 with `Retry-After`, and
/// the request is recorded as a `quota_refusal`.
pub async fn charge<B, A: Authenticator>(
    state: &E2bState<B, A>,
    tenant: &TenantId,
) -> Result<(), ApiError> {
    note_tenant(tenant);
    let limits = state
        .auth
        .limits(tenant)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match state.rate.check(tenant, limits.rate_per_s, Instant::now()) {
        Ok(()) => Ok(()),
        Err(limited) => {
            state.metrics.quota_refused(Quota::Rate);
            let message = format!(
                "rate limit: {} requests per second for tenant {tenant}",
                limited.rate
            );
            with_note(|n| {
                n.outcome = Outcome::QuotaRefusal;
                n.detail = Some(message.clone());
            });
            Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message,
                retry_after: Some(limited.retry_after),
            })
        }
    }
}

/// The middleware: runs the request, counts it and appends its audit
/// record before the response leaves (see the [module docs](self)).
pub async fn observe<B: Send + Sync + 'static, A: Send + Sync + 'static>(
    State(state): State<AppState<B, A>>,
    request: Request,
    next: Next,
) -> Response<Body> {
    let started = Instant::now();
    let matched = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let probe = is_probe(matched.as_deref(), request.headers());
    let method = request.method().as_str().to_owned();
    let path = audit_path(request.uri());
    let sandbox = sandbox_of(matched.as_deref(), request.uri(), request.headers());
    let ((response, note), mut deferred) =
        crate::audit::collect(NOTE.scope(RefCell::new(Note::default()), async move {
            let response = next.run(request).await;
            let note = NOTE.with(RefCell::take);
            (response, note)
        }))
        .await;
    // The backend's records about this request: in the request's own
    // commit when they go to the same log, else appended first.
    let mut batch = Vec::new();
    for (log, record) in deferred.take() {
        match &state.audit {
            Some(audit) if probe.not() && audit.same_log(&log) => batch.push(record),
            _ => {
                if let Err(e) = log.append_async(record).await {
                    state.metrics.audit_failed();
                    eprintln!("nanoclaw serve: the audit log could not be written: {e}");
                }
            }
        }
    }
    let response = match (&state.audit, probe) {
        (Some(audit), false) => {
            let record = Record {
                kind: match note.outcome {
                    Outcome::Request => kind::REQUEST,
                    Outcome::AuthFailure => kind::AUTH_FAILURE,
                    Outcome::QuotaRefusal => kind::QUOTA_REFUSAL,
                }
                .to_owned(),
                tenant: note.tenant.map(|t| t.0),
                sandbox: sandbox.or(note.sandbox),
                method: Some(method),
                path: Some(path),
                status: Some(response.status().as_u16()),
                duration_ms: Some(millis(started.elapsed())),
                detail: note.detail,
                input: note.input,
                ..Record::default()
            };
            batch.push(record);
            match audit.append_all(batch).await {
                Ok(_) => response,
                Err(e) => audit_failed(&state, &e.to_string()),
            }
        }
        _ => response,
    };
    state.metrics.http_request(response.status().as_u16());
    response
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The answer when a request's audit record could not be written.
fn audit_failed<B, A>(state: &E2bState<B, A>, why: &str) -> Response<Body> {
    state.metrics.audit_failed();
    eprintln!("nanoclaw serve: the audit log could not be written: {why}");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the audit log could not be written ({why}); the request may have taken effect, \
             but its answer is withheld"
        ),
    )
    .into_response()
}

/// Liveness probes: not recorded.
fn is_probe(matched: Option<&str>, headers: &HeaderMap) -> bool {
    match matched {
        Some("/healthz") => true,
        Some("/health") => envd::target_sandbox(headers).is_none(),
        _ => false,
    }
}

/// The sandbox a request concerns: the `{id}` of its route, else the
/// data plane's `E2b-Sandbox-Id` (or sandbox host name).
fn sandbox_of(matched: Option<&str>, uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if let Some(route) = matched {
        let from_path = route
            .split('/')
            .zip(uri.path().split('/'))
            .find(|(pattern, _)| *pattern == "{id}")
            .map(|(_, value)| value.to_owned());
        if from_path.is_some() {
            return from_path;
        }
    }
    envd::target_sandbox(headers)
}

/// Whether a query parameter may carry a secret (its value is not
/// recorded).
fn secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["signature", "token", "key", "secret", "password", "auth"]
        .iter()
        .any(|s| name.contains(s))
}

/// The path and query of a request as recorded: values of parameters
/// that may be secrets are replaced by `redacted`, and the whole is cut
/// at [`MAX_AUDIT_PATH`] bytes.
pub fn audit_path(uri: &Uri) -> String {
    let mut out = uri.path().to_owned();
    if let Some(query) = uri.query().filter(|q| !q.is_empty()) {
        let parts: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_param(k) => format!("{k}=redacted"),
                _ if secret_param(pair) => "redacted".to_owned(),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&parts.join("&"));
    }
    if out.len() > MAX_AUDIT_PATH {
        let mut cut = MAX_AUDIT_PATH;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_recorded() {
        let uri: Uri = "/files?path=%2Fa&username=user&signature=v1_abc&signature_expiration=9&X-Api-Key=e2b_1&token"
            .parse()
            .unwrap();
        let p = audit_path(&uri);
        assert_eq!(
            p,
            "/files?path=%2Fa&username=user&signature=redacted&signature_expiration=redacted&X-Api-Key=redacted&redacted"
        );
        let long: Uri = format!("/x?{}", "a".repeat(5000)).parse().unwrap();
        assert_eq!(audit_path(&long).len(), MAX_AUDIT_PATH);
    }

    #[test]
    fn sandbox_from_route_or_header() {
        let uri: Uri = "/sandboxes/sbx1/pause".parse().unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            sandbox_of(Some("/sandboxes/{id}/pause"), &uri, &h).as_deref(),
            Some("sbx1")
        );
        let mut h = HeaderMap::new();
        h.insert("e2b-sandbox-id", "sbx2".parse().unwrap());
        let uri: Uri = "/files".parse().unwrap();
        assert_eq!(
            sandbox_of(Some("/files"), &uri, &h).as_deref(),
            Some("sbx2")
        );
        assert_eq!(sandbox_of(None, &uri, &HeaderMap::new()), None);
    }

    #[test]
    fn probes() {
        let mut h = HeaderMap::new();
        assert!(is_probe(Some("/healthz"), &h));
        assert!(is_probe(Some("/health"), &h));
        h.insert("e2b-sandbox-id", "sbx2".parse().unwrap());
        assert!(!is_probe(Some("/health"), &h));
        assert!(!is_probe(Some("/metrics"), &h));
        assert!(!is_probe(None, &h));
    }
}
