//! E2B's API over a [`Backend`]: the control plane (`spec/openapi.yml`:
//! `/sandboxes…`) and the envd data plane (`spec/envd/**`: Connect RPCs
//! `/process.Process/*` and `/filesystem.Filesystem/*`, `/files`,
//! `/health`), on one HTTP server.
//!
//! The SDK talks to both on the same base URL when `E2B_API_URL` and
//! `E2B_SANDBOX_URL` point at this server: control-plane requests carry
//! the API key (`X-API-Key`), data-plane requests carry the sandbox id
//! (`E2b-Sandbox-Id`) and the sandbox's access token (`X-Access-Token`)
//! that `POST /sandboxes` returned.

pub mod agents;
pub mod body;
pub mod control;
pub mod envd;
pub mod images;
pub mod interpreter;
pub mod models;
pub mod multipart;
pub mod nanoclaw;
pub mod observe;
pub mod openapi;
pub mod routes;
pub mod time;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Response};
use axum::response::IntoResponse;
use axum::Router;

use crate::audit::Audit;
use crate::auth::{Authenticator, TenantId};
use crate::backend::Backend;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;

/// The envd version reported to the SDK (`envdVersion`) by default. The
/// SDK gates features on it; every feature gated at or below 0.6.4 is
/// served by this layer: recursive watch (0.1.4), metrics (0.2.4),
/// `stdin: false` (0.3.0), the sandbox's default user when none is given
/// (0.4.0), `CloseStdin` (0.5.2), `application/octet-stream` uploads with
/// optional gzip (0.5.7), file metadata via `X-Metadata-*` (0.6.2, handed
/// to [`Backend::write_file`] and shown from [`crate::backend::EntryInfo`]),
/// entry info in watch events (0.6.3, [`crate::backend::WatchSpec`]'s
/// `include_entry`), watching network mounts (0.6.4, a flag passed on). A
/// backend that cannot keep file metadata or fill watch entries should be
/// served with `0.6.1` or `0.6.2` ([`E2bState::envd_version`]), so the SDK
/// refuses those features itself.
pub const ENVD_VERSION: &str = "0.6.4";

/// Sizes and times the server enforces on requests.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest control-plane JSON body.
    pub control_body: u64,
    /// Largest Connect message (unary body or one streamed envelope).
    pub rpc_message: usize,
    /// Largest file upload (after gzip decoding), per request.
    pub upload: u64,
    /// Longest wait for the next bytes of a request body.
    pub body_idle: Duration,
    /// How long a body may take before its average rate counts (see
    /// [`body::Pace`]).
    pub body_grace: Duration,
    /// The average rate (bytes/s) a body owes after `body_grace`.
    pub body_min_rate: u64,
    /// Non-streaming watchers (`CreateWatcher`) alive per sandbox.
    pub watchers_per_sandbox: usize,
    /// Events a non-streaming watcher keeps until they are fetched.
    pub watcher_events: usize,
}

impl Limits {
    /// Largest control-plane JSON body: 1 MiB.
    pub const CONTROL_BODY: u64 = 1 << 20;
    /// Largest Connect message: 4 MiB.
    pub const RPC_MESSAGE: usize = 4 << 20;
    /// Largest upload: 1 GiB (streamed to the backend, never buffered).
    pub const UPLOAD: u64 = 1 << 30;
    /// Body idle timeout: 30 s.
    pub const BODY_IDLE: Duration = Duration::from_secs(30);
    /// Watchers per sandbox: 64.
    pub const WATCHERS_PER_SANDBOX: usize = 64;
    /// Events kept per watcher: 4096.
    pub const WATCHER_EVENTS: usize = 4096;
}

impl Limits {
    /// The pace a request body starting now must keep.
    pub fn pace(&self) -> body::Pace {
        body::Pace::with(self.body_grace, self.body_min_rate)
    }

    /// A control-plane request body (small JSON), read under these limits.
    pub async fn read_control_body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<bytes::Bytes, body::BodyError> {
        body::read_limited(
            headers,
            body,
            self.control_body,
            self.body_idle,
            self.pace(),
        )
        .await
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            control_body: Self::CONTROL_BODY,
            rpc_message: Self::RPC_MESSAGE,
            upload: Self::UPLOAD,
            body_idle: Self::BODY_IDLE,
            body_grace: body::Pace::GRACE,
            body_min_rate: body::Pace::MIN_RATE,
            watchers_per_sandbox: Self::WATCHERS_PER_SANDBOX,
            watcher_events: Self::WATCHER_EVENTS,
        }
    }
}

/// How a request reached the server; set on each request by
/// [`crate::listen`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Over a unix socket (whose file mode already restricts who connects).
    pub unix: bool,
}

/// Everything the routes share.
pub struct E2bState<B, A> {
    /// The sandboxes.
    pub backend: Arc<B>,
    /// The API keys.
    pub auth: Arc<A>,
    /// Request limits.
    pub limits: Limits,
    /// The tenant of unix-socket requests that carry no API key (`None`:
    /// those are refused like any other request without a key).
    pub unix_tenant: Option<TenantId>,
    /// Non-streaming filesystem watchers.
    pub watchers: envd::filesystem::Watchers,
    /// The `envdVersion` reported ([`ENVD_VERSION`] by default).
    pub envd_version: String,
    /// Where every request is recorded before it is answered (see
    /// [`observe`]); `None`: nothing is recorded.
    pub audit: Option<Audit>,
    /// The counters of `GET /metrics` (shared with the backend).
    pub metrics: Arc<Metrics>,
    /// Per-tenant request rate limits (the rates come from
    /// [`Authenticator::limits`]).
    pub rate: RateLimiter,
    /// `GET /openapi.json`, made at its first request.
    pub openapi: OnceLock<String>,
    /// Agent runs and approvals (`/v1/execute`, `/v1/approvals`); `None`:
    /// those routes answer 501.
    pub agents: Option<Arc<crate::agents::Agents>>,
    /// Image builds and registered images (`/v1/images`); `None`: those
    /// routes answer 501.
    pub images: Option<Arc<crate::images::Images>>,
    /// Stateful code contexts (the code interpreter's `/execute` and
    /// `/contexts`, and the MCP `run_code` tool).
    pub contexts: crate::contexts::Contexts,
    /// The MCP server's sessions and exec sessions (`/mcp`).
    pub mcp: crate::mcp::McpState,
}

impl<B, A> E2bState<B, A> {
    /// State with default limits and no anonymous unix tenant.
    pub fn new(backend: Arc<B>, auth: Arc<A>) -> Self {
        E2bState {
            backend,
            auth,
            limits: Limits::default(),
            unix_tenant: None,
            watchers: envd::filesystem::Watchers::default(),
            envd_version: ENVD_VERSION.to_owned(),
            audit: None,
            metrics: Arc::default(),
            rate: RateLimiter::new(),
            openapi: OnceLock::new(),
            agents: None,
            images: None,
            contexts: crate::contexts::Contexts::new(),
            mcp: crate::mcp::McpState::default(),
        }
    }
}

/// Shared state as the handlers see it.
pub type AppState<B, A> = Arc<E2bState<B, A>>;

/// The API key of a control-plane request: `X-API-Key`, or
/// `Authorization: Bearer <key>`.
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, rest) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Authenticates a control-plane request: its tenant, or 401. The
/// request is then charged to the tenant's rate limit (429 when over it;
/// see [`observe::charge`]).
pub async fn authenticate<B, A: Authenticator>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
    peer: Option<Peer>,
) -> Result<TenantId, ApiError> {
    let tenant = match presented_key(headers) {
        Some(key) if !key.is_empty() => match state.auth.authenticate(key).await {
            Ok(Some(tenant)) => tenant,
            Ok(None) => {
                observe::note_auth_failure("unknown API key", None);
                return Err(ApiError::unauthorized("Invalid API key"));
            }
            Err(e) => {
                return Err(ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    e.to_string(),
                ))
            }
        },
        _ => match (&state.unix_tenant, peer) {
            (Some(tenant), Some(Peer { unix: true })) => tenant.clone(),
            _ => {
                observe::note_auth_failure("no API key", None);
                return Err(ApiError::unauthorized(
                    "Missing API key: send it in the X-API-Key header",
                ));
            }
        },
    };
    observe::charge(state, &tenant).await?;
    Ok(tenant)
}

/// The router serving E2B's API and nanoclaw's own routes over `state`:
/// every route of [`routes::table`], each request observed by
/// [`observe::observe`] (counted, rate-limited, audited).
pub fn router<B: Backend, A: Authenticator>(state: AppState<B, A>) -> Router {
    let mut router = Router::new();
    for route in routes::table::<B, A>() {
        let (path, service) = route.into_parts();
        router = router.route(path, service);
    }
    router
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(only_envd_port))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            observe::observe::<B, A>,
        ))
        .with_state(state)
}

/// The data-plane port nanoclaw serves (envd's).
const ENVD_PORT: &str = "49983";

/// Data-plane requests for another port of the sandbox (the SDK sends
/// `E2b-Sandbox-Port`) are answered as E2B's proxy answers a port nothing
/// listens on: 502 "port is not open". The code interpreter's port
/// (49999) reaches its own routes ([`interpreter`]) and no others.
async fn only_envd_port(request: Request, next: axum::middleware::Next) -> Response<Body> {
    let port = request
        .headers()
        .get("e2b-sandbox-port")
        .map(|v| v.to_str().unwrap_or("").trim().to_owned());
    let path = request.uri().path();
    let interpreter_path =
        path == "/execute" || path == "/contexts" || path.starts_with("/contexts/");
    match port {
        Some(port) if port == interpreter::PORT && interpreter_path => next.run(request).await,
        Some(port) if port != ENVD_PORT || interpreter_path => ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            format!("The sandbox is running but port {port} is not open"),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

/// `GET /health`: envd's (a sandbox's) when the request names a sandbox,
/// else the API's own (204).
pub(crate) async fn health<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    request: Request,
) -> Response<Body> {
    if envd::target_sandbox(request.headers()).is_some() {
        return envd::health(&state, request.headers()).await;
    }
    axum::http::StatusCode::NO_CONTENT.into_response()
}

async fn fallback(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("{method} {}: no such route", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Mints a secret: 32 random bytes, hex. `None` if the OS has no
/// randomness to give (the caller answers 500).
pub fn random_token() -> Option<String> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).ok()?;
    Some(hex::encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn keys_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer e2b_1"));
        assert_eq!(presented_key(&h), Some("e2b_1"));
        h.insert("x-api-key", HeaderValue::from_static("e2b_2"));
        assert_eq!(presented_key(&h), Some("e2b_2"));
        let mut basic = HeaderMap::new();
        basic.insert("authorization", HeaderValue::from_static("Basic dXNlcjo="));
        assert_eq!(presented_key(&basic), None);
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
