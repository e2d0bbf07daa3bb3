//! `/mcp`: the Streamable HTTP transport of both protocol eras (see the
//! [module docs](super)).
//!
//! Every request is checked in this order: its `Origin` (a browser page
//! of any origin but the local machine's is refused with 403: the DNS
//! rebinding defence the specification requires), its API key (as every
//! control-plane route: `X-API-Key` or `Authorization: Bearer`, or a
//! keyless unix-socket caller as the `local` tenant; then the tenant's
//! rate limit), then the JSON-RPC message. `POST` answers
//! `application/json`, or an SSE stream of one event when the client
//! accepts only `text/event-stream`; `GET` is 405 (the server sends no
//! messages of its own); `DELETE` ends a 2025-11-25 session.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Extension;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::{
    dispatch, end_session, initialize_result, negotiate, Ctx, Era, RpcError, Trace,
    HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, LEGACY_VERSIONS, META_CAPABILITIES,
    META_VERSION, METHOD_NOT_FOUND, MODERN_VERSIONS, PARSE_ERROR, UNSUPPORTED_VERSION,
};
use crate::audit::Captured;
use crate::auth::{Authenticator, TenantId};
use crate::backend::Backend;
use crate::e2b::observe::{note_detail, note_input, note_sandbox};
use crate::e2b::routes::Route;
use crate::e2b::{authenticate, AppState, Peer};

/// The session header.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// The protocol version header.
pub const VERSION_HEADER: &str = "mcp-protocol-version";
/// Largest `/mcp` request body (a `write_file` carries the file).
pub const MAX_BODY: u64 = 16 << 20;

/// An HTTP answer carrying a JSON-RPC message (or nothing).
fn answer(status: StatusCode, body: Option<Value>, sse: bool) -> Response<Body> {
    let Some(body) = body else {
        return status.into_response();
    };
    let text = body.to_string();
    let mut r = if sse {
        let mut r = Response::new(Body::from(format!("event: message\ndata: {text}\n\n")));
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
        r.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut r = Response::new(Body::from(text));
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    *r.status_mut() = status;
    r
}

fn rpc_error(status: StatusCode, id: &Value, e: RpcError) -> Response<Body> {
    answer(status, Some(e.to_response(id)), false)
}

/// Whether a browser `Origin` may reach the server: only pages of the
/// local machine (`localhost`, `127.0.0.0/8`, `[::1]`, any scheme and
/// port). A page of any other origin — including one whose name was
/// rebound to 127.0.0.1, which is exactly how DNS rebinding reaches a
/// local server — is refused. Requests without `Origin` (not from a
/// browser) pass.
pub fn origin_allowed(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get("origin") else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    if !matches!(scheme, "http" | "https") || rest.contains(['/', '@', '?', '#']) {
        return false;
    }
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        }
    } else {
        rest.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") || host == "::1" {
        return true;
    }
    host.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn forbidden_origin() -> Response<Body> {
    let e = RpcError::new(
        INVALID_REQUEST,
        "Forbidden: this Origin may not use the MCP endpoint (only pages of localhost may)",
    );
    answer(
        StatusCode::FORBIDDEN,
        Some(json!({"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}})),
        false,
    )
}

/// Origin, then API key (see the module docs).
async fn admit<B: Backend, A: Authenticator>(
    state: &AppState<B, A>,
    headers: &HeaderMap,
    peer: Option<Extension<Peer>>,
) -> Result<TenantId, Response<Body>> {
    if !origin_allowed(headers) {
        note_detail("mcp: refused Origin");
        return Err(forbidden_origin());
    }
    super::spawn_reaper(state);
    authenticate(state, headers, peer.map(|Extension(p)| p))
        .await
        .map_err(IntoResponse::into_response)
}

/// Whether the client takes JSON answers, SSE answers, or neither.
fn accepts(headers: &HeaderMap) -> (bool, bool) {
    let accept = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*/*")
        .to_ascii_lowercase();
    let any = accept.contains("*/*");
    (
        any || accept.contains("application/json") || accept.contains("application/*"),
        accept.contains("text/event-stream"),
    )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header value in the specification's `=?base64?…?=` form decoded.
fn decode_header(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(v.to_owned()),
    }
}

/// The checks of a 2026-07-28 request: its `_meta` envelope, then its
/// headers against its body, then its version.
fn check_modern(
    headers: &HeaderMap,
    method: &str,
    params: &Map<String, Value>,
) -> Result<String, (StatusCode, RpcError)> {
    let meta = params.get("_meta").and_then(Value::as_object);
    let Some(meta) = meta.filter(|m| m.contains_key(META_CAPABILITIES)) else {
        return Err((
            StatusCode::BAD_REQUEST,
            RpcError::new(
                INVALID_PARAMS,
                format!("params._meta must carry {META_VERSION:?} and {META_CAPABILITIES:?}"),
            ),
        ));
    };
    let version = match meta.get(META_VERSION) {
        Some(Value::String(v)) => v.clone(),
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                RpcError::new(
                    INVALID_PARAMS,
                    format!("params._meta[{META_VERSION:?}] must be a string"),
                ),
            ))
        }
    };
    let mismatch = |what: String| {
        Err((
            StatusCode::BAD_REQUEST,
            RpcError::new(HEADER_MISMATCH, format!("Header mismatch: {what}")),
        ))
    };
    match header(headers, VERSION_HEADER) {
        Some(h) if h == version => {}
        Some(h) => {
            return mismatch(format!(
                "MCP-Protocol-Version header {h:?} does not match the body's {version:?}"
            ))
        }
        None => return mismatch("the MCP-Protocol-Version header is missing".into()),
    }
    match header(headers, "mcp-method") {
        Some(h) if h == method => {}
        Some(h) => {
            return mismatch(format!(
                "Mcp-Method header {h:?} does not match the body's method {method:?}"
            ))
        }
        None => return mismatch("the Mcp-Method header is missing".into()),
    }
    if method == "tools/call" {
        let name = params.get("name").and_then(Value::as_str);
        let sent = header(headers, "mcp-name").and_then(decode_header);
        if name.is_some() && sent.as_deref() != name {
            return mismatch(format!(
                "Mcp-Name header {:?} does not match the body's name {:?}",
                sent.unwrap_or_default(),
                name.unwrap_or_default()
            ));
        }
    }
    if !MODERN_VERSIONS.contains(&version.as_str()) {
        let mut e = RpcError::new(UNSUPPORTED_VERSION, "Unsupported protocol version");
        e.data = Some(json!({"supported": MODERN_VERSIONS, "requested": version}));
        return Err((StatusCode::BAD_REQUEST, e));
    }
    Ok(version)
}

/// A parsed JSON-RPC message.
struct Message {
    id: Option<Value>,
    method: Option<String>,
    params: Map<String, Value>,
}

fn parse_message(bytes: &[u8]) -> Result<Message, RpcError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| RpcError::new(PARSE_ERROR, format!("Parse error: {e}")))?;
    let Value::Object(m) = v else {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "Invalid Request: one JSON-RPC message (an object) per POST; batches are not supported",
        ));
    };
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "Invalid Request: jsonrpc must be \"2.0\"",
        ));
    }
    let id = match m.get("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v.clone()),
        Some(_) => {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "Invalid Request: id must be a string or an integer",
            ))
        }
    };
    let method = match m.get("method") {
        Some(Value::String(s)) => Some(s.clone()),
        None if id.is_some() && (m.contains_key("result") || m.contains_key("error")) => None,
        _ => {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "Invalid Request: method must be a string",
            ))
        }
    };
    let params = match m.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => {
            return Err(RpcError::new(
                INVALID_PARAMS,
                "Invalid params: params must be an object",
            ))
        }
    };
    Ok(Message { id, method, params })
}

/// `POST /mcp`: one JSON-RPC message.
pub async fn post<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    peer: Option<Extension<Peer>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response<Body> {
    let tenant = match admit(&state, &headers, peer).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (json_ok, sse_ok) = accepts(&headers);
    if !json_ok && !sse_ok {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            &Value::Null,
            RpcError::new(
                INVALID_REQUEST,
                "Not Acceptable: Accept must list application/json and text/event-stream",
            ),
        );
    }
    let sse = !json_ok;
    let bytes = match crate::e2b::body::read_limited(
        &headers,
        body,
        MAX_BODY,
        state.limits.body_idle,
        state.limits.pace(),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return crate::error::ApiError::from(e).into_response(),
    };
    note_input(Captured::of(&bytes));
    let msg = match parse_message(&bytes) {
        Ok(m) => m,
        Err(e) => return rpc_error(StatusCode::BAD_REQUEST, &Value::Null, e),
    };
    let Some(method) = msg.method.clone() else {
        // A client's answer to a request of ours (we send none).
        return StatusCode::ACCEPTED.into_response();
    };
    let session_id = header(&headers, SESSION_HEADER).map(str::to_owned);
    let modern = msg
        .params
        .get("_meta")
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key(META_VERSION));
    let Some(id) = msg.id.clone() else {
        return notification(&state, &tenant, &method, session_id.as_deref(), modern);
    };
    note_detail(&format!("mcp {method}"));
    if method == "initialize" && !modern {
        return initialize(&state, &tenant, &id, &msg.params, &template_of(&uri), sse);
    }
    let ctx = if modern {
        match check_modern(&headers, &method, &msg.params) {
            Ok(v) => Ctx {
                tenant,
                era: Era::Modern(v),
                session: None,
            },
            Err((status, e)) => return rpc_error(status, &id, e),
        }
    } else {
        match legacy_session(&state, &tenant, &headers, session_id.as_deref()) {
            Ok(ctx) => ctx,
            Err(r) => return r,
        }
    };
    let mut trace = Trace::default();
    let r = dispatch(&state, &ctx, &method, &msg.params, &mut trace).await;
    let detail = match &trace.tool {
        Some(t) => format!("mcp {method} {t}"),
        None => format!("mcp {method}"),
    };
    note_detail(&detail);
    if let Some(s) = &trace.sandbox {
        note_sandbox(s);
    }
    match r {
        Ok(result) => answer(
            StatusCode::OK,
            Some(json!({"jsonrpc": "2.0", "id": id, "result": result})),
            sse,
        ),
        Err(e) if modern && e.code == METHOD_NOT_FOUND => rpc_error(StatusCode::NOT_FOUND, &id, e),
        Err(e) => answer(StatusCode::OK, Some(e.to_response(&id)), sse),
    }
}

/// The template of a session's default sandbox: `/mcp?template=NAME`, else
/// `base`.
fn template_of(uri: &axum::http::Uri) -> String {
    uri.query()
        .map(crate::e2b::body::parse_form)
        .and_then(|q| q.into_iter().find(|(k, _)| k == "template"))
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "base".into())
}

/// The context of a legacy request: its session, which must exist and be
/// the caller's.
fn legacy_session<B: Backend, A: Authenticator>(
    state: &AppState<B, A>,
    tenant: &TenantId,
    headers: &HeaderMap,
    session_id: Option<&str>,
) -> Result<Ctx, Response<Body>> {
    let Some(sid) = session_id else {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            RpcError::new(
                INVALID_REQUEST,
                "Bad Request: no Mcp-Session-Id: send initialize first (2025-11-25), or give \
                 params._meta with the protocol version (2026-07-28)",
            ),
        ));
    };
    let Some(session) = state.mcp.find(tenant, sid) else {
        return Err(rpc_error(
            StatusCode::NOT_FOUND,
            &Value::Null,
            RpcError::new(
                INVALID_REQUEST,
                "Session not found: it ended or expired; send initialize for a new one",
            ),
        ));
    };
    if let Some(v) = header(headers, VERSION_HEADER) {
        if !LEGACY_VERSIONS.contains(&v) {
            return Err(rpc_error(
                StatusCode::BAD_REQUEST,
                &Value::Null,
                RpcError::new(
                    INVALID_REQUEST,
                    format!(
                        "Bad Request: unsupported MCP-Protocol-Version {v:?} for a session (this one negotiated {})",
                        session.version
                    ),
                ),
            ));
        }
    }
    Ok(Ctx {
        tenant: tenant.clone(),
        era: Era::Legacy(session.version.clone()),
        session: Some(session),
    })
}

fn initialize<B: Backend, A: Authenticator>(
    state: &AppState<B, A>,
    tenant: &TenantId,
    id: &Value,
    params: &Map<String, Value>,
    template: &str,
    sse: bool,
) -> Response<Body> {
    let Some(asked) = params.get("protocolVersion").and_then(Value::as_str) else {
        return answer(
            StatusCode::OK,
            Some(
                RpcError::new(
                    INVALID_PARAMS,
                    "Invalid params: protocolVersion must be a string",
                )
                .to_response(id),
            ),
            sse,
        );
    };
    let version = negotiate(asked);
    let Some(session) = state.mcp.open(tenant, version, template) else {
        return crate::error::ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "tenant {tenant} has {} MCP sessions open: end some (DELETE /mcp) first",
                super::SESSIONS_PER_TENANT
            ),
        )
        .into_response();
    };
    let mut r = answer(
        StatusCode::OK,
        Some(json!({"jsonrpc": "2.0", "id": id, "result": initialize_result(version)})),
        sse,
    );
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
    r
}

fn notification<B: Backend, A: Authenticator>(
    state: &AppState<B, A>,
    tenant: &TenantId,
    method: &str,
    session_id: Option<&str>,
    modern: bool,
) -> Response<Body> {
    if !modern {
        if let Some(sid) = session_id {
            let Some(s) = state.mcp.find(tenant, sid) else {
                return rpc_error(
                    StatusCode::NOT_FOUND,
                    &Value::Null,
                    RpcError::new(INVALID_REQUEST, "Session not found"),
                );
            };
            if method == "notifications/initialized" {
                s.initialized.store(true, Ordering::SeqCst);
            }
        }
    }
    // Others (cancelled, progress, roots/list_changed) need nothing: a
    // call runs to its end or until its HTTP request is dropped.
    StatusCode::ACCEPTED.into_response()
}

/// `GET /mcp`: 405 — the server sends no messages of its own (both eras
/// allow this answer).
pub async fn get<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response<Body> {
    if let Err(r) = admit(&state, &headers, peer).await {
        return r;
    }
    let mut r = rpc_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &Value::Null,
        RpcError::new(
            INVALID_REQUEST,
            "Method Not Allowed: this server opens no SSE stream of its own; POST requests",
        ),
    );
    r.headers_mut()
        .insert("allow", HeaderValue::from_static("POST, DELETE"));
    r
}

/// `DELETE /mcp`: ends the caller's session (and removes its default
/// sandbox).
pub async fn delete<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response<Body> {
    let tenant = match admit(&state, &headers, peer).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(sid) = header(&headers, SESSION_HEADER) else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            RpcError::new(
                INVALID_REQUEST,
                "Bad Request: DELETE needs the Mcp-Session-Id header",
            ),
        );
    };
    let Some(session) = state.mcp.close(&tenant, sid) else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            &Value::Null,
            RpcError::new(INVALID_REQUEST, "Session not found"),
        );
    };
    note_detail("mcp session ended");
    end_session(&*state.backend, &session).await;
    StatusCode::NO_CONTENT.into_response()
}

/// `/mcp` in the route table (served and documented in /openapi.json).
pub(crate) fn route<B: Backend, A: Authenticator>() -> Route<B, A> {
    use crate::e2b::routes::{schema, Access::ApiKey, Op, Verb, NANOCLAW};
    let rpc = json!({"type": "object", "required": ["jsonrpc"], "description": "One JSON-RPC 2.0 message."});
    Route::new("/mcp")
        .op(
            post::<B, A>,
            Op::new(
                Verb::Post,
                NANOCLAW,
                ApiKey,
                "Model Context Protocol, Streamable HTTP: one JSON-RPC message (2025-11-25 \
                 sessions via initialize and Mcp-Session-Id; 2026-07-28 per-request _meta with \
                 MCP-Protocol-Version, Mcp-Method and Mcp-Name). A browser Origin other than \
                 localhost is refused (403).",
            )
            .json_body(rpc.clone())
            .json(200, "The JSON-RPC response (text/event-stream when only that is accepted).", rpc.clone())
            .empty(202, "A notification or response was accepted.")
            .json(400, "Not one valid JSON-RPC message, no session, a header mismatch (-32020) or an unsupported version (-32022).", rpc.clone())
            .json(403, "The Origin is not local.", rpc.clone())
            .json(404, "Unknown session, or (2026-07-28) unknown method (-32601).", rpc.clone())
            .json(406, "Accept lists neither application/json nor text/event-stream.", rpc.clone()),
        )
        .op(
            get::<B, A>,
            Op::new(Verb::Get, NANOCLAW, ApiKey, "No server-initiated stream: 405.")
                .json(405, "Method not allowed.", rpc.clone())
                .json(403, "The Origin is not local.", rpc.clone()),
        )
        .op(
            delete::<B, A>,
            Op::new(Verb::Delete, NANOCLAW, ApiKey, "Ends a 2025-11-25 session (Mcp-Session-Id) and removes its default sandbox.")
                .empty(204, "Ended.")
                .json(400, "No Mcp-Session-Id.", rpc.clone())
                .json(404, "No such session of this tenant.", rpc)
                .json(403, "The Origin is not local.", schema("Error")),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(o: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("origin", HeaderValue::from_str(o).unwrap());
        h
    }

    #[test]
    fn only_local_origins_pass() {
        assert!(origin_allowed(&HeaderMap::new()));
        for ok in [
            "http://localhost:3000",
            "https://127.0.0.1",
            "http://[::1]:8080",
            "http://LOCALHOST",
            "http://127.9.9.9:1",
        ] {
            assert!(origin_allowed(&with_origin(ok)), "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example:80",
            "null",
            "file://",
            "http://user@localhost",
            "http://[::2]",
            "http://10.0.0.1",
        ] {
            assert!(!origin_allowed(&with_origin(bad)), "{bad}");
        }
    }

    #[test]
    fn base64_header_values() {
        assert_eq!(decode_header("plain").as_deref(), Some("plain"));
        assert_eq!(
            decode_header("=?base64?SGVsbG8sIOS4lueVjA==?=").as_deref(),
            Some("Hello, 世界")
        );
    }

    #[test]
    fn modern_requests_must_agree_with_their_headers() {
        let params: Map<String, Value> = serde_json::from_value(json!({
            "name": "sandbox_list",
            "_meta": {META_VERSION: "2026-07-28", META_CAPABILITIES: {}}
        }))
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert(VERSION_HEADER, HeaderValue::from_static("2026-07-28"));
        h.insert("mcp-method", HeaderValue::from_static("tools/call"));
        h.insert("mcp-name", HeaderValue::from_static("sandbox_list"));
        assert_eq!(
            check_modern(&h, "tools/call", &params).ok().as_deref(),
            Some("2026-07-28")
        );
        h.insert("mcp-name", HeaderValue::from_static("sandbox_kill"));
        let e = check_modern(&h, "tools/call", &params).err().unwrap();
        assert_eq!((e.0, e.1.code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
        h.remove("mcp-name");
        assert_eq!(
            check_modern(&h, "tools/call", &params)
                .err()
                .unwrap()
                .1
                .code,
            HEADER_MISMATCH
        );
        h.insert(VERSION_HEADER, HeaderValue::from_static("2030-01-01"));
        let mut p2 = params.clone();
        p2["_meta"][META_VERSION] = json!("2030-01-01");
        h.insert("mcp-name", HeaderValue::from_static("sandbox_list"));
        let e = check_modern(&h, "tools/call", &p2).err().unwrap();
        assert_eq!(e.1.code, UNSUPPORTED_VERSION);
    }
}
