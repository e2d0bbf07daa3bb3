//! The control plane: sandbox lifecycle (`/sandboxes…`), authenticated by
//! API key, answering E2B's JSON schemas and `{"code", "message"}` errors.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::body::{parse_form, percent_decode};
use super::models::{
    self, NetworkUpdateBody, NewSandbox, PauseBody, RefreshBody, TimeoutBody, DEFAULT_TIMEOUT_SECS,
};
use super::time::parse_rfc3339;
use super::{authenticate, random_token, AppState, Peer};
use crate::auth::{Authenticator, TenantId};
use crate::backend::{Backend, CreateSandbox, SandboxInfo, SandboxState};
use crate::error::ApiError;

/// A handler's answer.
type ApiResult = Result<Response<Body>, ApiError>;

/// Largest page of `GET /v2/sandboxes`.
const MAX_PAGE: usize = 100;
/// Most ids in one `GET /sandboxes/metrics`.
const MAX_METRICS_IDS: usize = 100;
/// Longest `refreshes` duration (E2B's limit): one hour.
const MAX_REFRESH_SECS: i64 = 3600;

/// Reads a JSON body. An empty body is `T::default()` unless `required`.
/// Malformed JSON (or a wrongly typed field) is 400; over the limit, 413.
async fn read_json<T: DeserializeOwned + Default, B, A>(
    state: &super::E2bState<B, A>,
    headers: &HeaderMap,
    body: Body,
    required: bool,
) -> Result<T, ApiError> {
    let bytes = state.limits.read_control_body(headers, body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if required {
            return Err(ApiError::bad_request("request body is required (JSON)"));
        }
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn json_status(status: StatusCode, value: Value) -> Response<Body> {
    (status, Json(value)).into_response()
}

fn peer(ext: Option<Extension<Peer>>) -> Option<Peer> {
    ext.map(|Extension(p)| p)
}

/// `POST /sandboxes`.
pub async fn create<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let req: NewSandbox = read_json(&state, &headers, body, true).await?;
    req.check_supported()?;
    let template = match req.template_id.as_deref().map(str::trim) {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => return Err(ApiError::bad_request("templateID is required")),
    };
    let timeout = models::timeout_secs(req.timeout, DEFAULT_TIMEOUT_SECS)?;
    let token = random_token().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for the access token",
        )
    })?;
    let network = req.network.unwrap_or_default();
    let network_rules = models::network_rules(network.rules.as_ref())?;
    let info = state
        .backend
        .create(CreateSandbox {
            tenant,
            template,
            timeout,
            metadata: req.metadata.unwrap_or_default(),
            env_vars: req.env_vars.unwrap_or_default(),
            allow_internet_access: req.allow_internet_access,
            allow_out: network.allow_out.unwrap_or_default(),
            deny_out: network.deny_out.unwrap_or_default(),
            network_rules,
            auto_pause: req.auto_pause.unwrap_or(false),
            envd_access_token: token,
        })
        .await
        .map_err(ApiError::control)?;
    super::observe::note_sandbox(&info.sandbox_id);
    Ok(json_status(
        StatusCode::CREATED,
        models::sandbox(&info, &state.envd_version),
    ))
}

/// Parses E2B's metadata filter: a form-encoded string whose keys and
/// values are percent-encoded once more (`user%3Dabc%26app%3Dprod` on the
/// wire, as the SDK sends it).
fn metadata_filter(raw: Option<&String>) -> BTreeMap<String, String> {
    raw.map(|s| {
        parse_form(s)
            .into_iter()
            .map(|(k, v)| (percent_decode(&k, false), percent_decode(&v, false)))
            .collect()
    })
    .unwrap_or_default()
}

fn matches_metadata(info: &SandboxInfo, filter: &BTreeMap<String, String>) -> bool {
    filter
        .iter()
        .all(|(k, v)| info.metadata.get(k).is_some_and(|have| have == v))
}

/// `GET /sandboxes` (deprecated): the running sandboxes.
pub async fn list_legacy<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let filter = metadata_filter(query.get("metadata"));
    let mut all = state
        .backend
        .list(&tenant)
        .await
        .map_err(ApiError::control)?;
    all.retain(|s| s.state == SandboxState::Running && matches_metadata(s, &filter));
    all.sort_by_key(|s| std::cmp::Reverse(s.started_at));
    let items: Vec<Value> = all
        .iter()
        .map(|s| models::listed_sandbox(s, &state.envd_version))
        .collect();
    Ok(json_status(StatusCode::OK, Value::Array(items)))
}

/// The filters of `GET /v2/sandboxes`.
struct ListQuery {
    metadata: BTreeMap<String, String>,
    states: Vec<SandboxState>,
    ascending: bool,
    started_after: Option<SystemTime>,
    template: Option<String>,
    offset: usize,
    limit: usize,
}

fn parse_list_query(query: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    let mut states = Vec::new();
    if let Some(raw) = query.get("state") {
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            states.push(match part {
                "running" => SandboxState::Running,
                "paused" => SandboxState::Paused,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "invalid state {other:?}: expected running or paused"
                    )))
                }
            });
        }
    }
    let ascending = match query.get("order").map(String::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid order {other:?}: expected asc or desc"
            )))
        }
    };
    let started_after = match query.get("startedAfter") {
        None => None,
        Some(s) => Some(parse_rfc3339(s).ok_or_else(|| {
            ApiError::bad_request(format!("invalid startedAfter {s:?}: expected RFC 3339"))
        })?),
    };
    let limit = match query.get("limit") {
        None => MAX_PAGE,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid limit {s:?}: expected 1 to {MAX_PAGE}"
                )))
            }
        },
    };
    let offset = match query.get("nextToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("invalid nextToken"))?,
    };
    Ok(ListQuery {
        metadata: metadata_filter(query.get("metadata")),
        states,
        ascending,
        started_after,
        template: query.get("template").filter(|t| !t.is_empty()).cloned(),
        offset,
        limit,
    })
}

/// `GET /v2/sandboxes`: running and paused sandboxes, filtered, sorted by
/// start time, paginated (`X-Next-Token`).
pub async fn list_v2<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let q = parse_list_query(&query)?;
    let mut all = state
        .backend
        .list(&tenant)
        .await
        .map_err(ApiError::control)?;
    all.retain(|s| {
        (q.states.is_empty() || q.states.contains(&s.state))
            && matches_metadata(s, &q.metadata)
            && q.started_after.is_none_or(|t| s.started_at >= t)
            && q.template
                .as_ref()
                .is_none_or(|t| &s.template_id == t || s.alias.as_ref() == Some(t))
    });
    all.sort_by(|a, b| {
        let by_time = a
            .started_at
            .cmp(&b.started_at)
            .then(a.sandbox_id.cmp(&b.sandbox_id));
        if q.ascending {
            by_time
        } else {
            by_time.reverse()
        }
    });
    let running = all
        .iter()
        .filter(|s| s.state == SandboxState::Running)
        .count();
    let page: Vec<Value> = all
        .iter()
        .skip(q.offset)
        .take(q.limit)
        .map(|s| models::listed_sandbox(s, &state.envd_version))
        .collect();
    let mut response = json_status(StatusCode::OK, Value::Array(page));
    let next = q.offset.saturating_add(q.limit);
    if next < all.len() {
        if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
            response.headers_mut().insert("x-next-token", v);
        }
    }
    if q.states.is_empty() || q.states.contains(&SandboxState::Running) {
        if let Ok(v) = HeaderValue::from_str(&running.to_string()) {
            response.headers_mut().insert("x-total-running", v);
        }
    }
    Ok(response)
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each
/// (ids that are unknown, or another tenant's, are left out).
pub async fn metrics_many<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let ids: Vec<&str> = query
        .get("sandbox_ids")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() || ids.len() > MAX_METRICS_IDS {
        return Err(ApiError::bad_request(format!(
            "sandbox_ids must list 1 to {MAX_METRICS_IDS} sandbox ids"
        )));
    }
    let mut out = serde_json::Map::new();
    for id in ids {
        match state.backend.metrics(&tenant, id).await {
            Ok(samples) => {
                if let Some(last) = samples.last() {
                    out.insert(id.to_owned(), models::metric(last));
                }
            }
            Err(crate::backend::BackendError::NotFound(_)) => {}
            Err(e) => return Err(ApiError::control(e)),
        }
    }
    Ok(json_status(StatusCode::OK, json!({ "sandboxes": out })))
}

/// `GET /sandboxes/{id}`.
pub async fn get_one<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let info = state
        .backend
        .get(&tenant, &id)
        .await
        .map_err(ApiError::control)?;
    Ok(json_status(
        StatusCode::OK,
        models::sandbox_detail(&info, &state.envd_version),
    ))
}

/// `DELETE /sandboxes/{id}`.
pub async fn kill<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    state
        .backend
        .kill(&tenant, &id)
        .await
        .map_err(ApiError::control)?;
    state.watchers.forget_sandbox(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn query_secs(query: &HashMap<String, String>, name: &str) -> Result<Option<SystemTime>, ApiError> {
    match query.get(name) {
        None => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .ok()
            .and_then(|n| UNIX_EPOCH.checked_add(Duration::from_secs(n)))
            .filter(|t| *t < UNIX_EPOCH + Duration::from_secs(1 << 40))
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request(format!("invalid {name} {s:?}: expected Unix seconds"))
            }),
    }
}

/// `GET /sandboxes/{id}/metrics?start=&end=`.
pub async fn metrics<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let start = query_secs(&query, "start")?;
    let end = query_secs(&query, "end")?;
    let samples = state
        .backend
        .metrics(&tenant, &id)
        .await
        .map_err(ApiError::control)?;
    let items: Vec<Value> = samples
        .iter()
        .filter(|m| start.is_none_or(|t| m.timestamp >= t) && end.is_none_or(|t| m.timestamp <= t))
        .map(models::metric)
        .collect();
    Ok(json_status(StatusCode::OK, Value::Array(items)))
}

/// `POST /sandboxes/{id}/pause`: 204, or 409 when paused already.
pub async fn pause<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    // `memory: false` (drop memory, keep files) is served as a full pause:
    // keeping the memory too loses nothing the caller asked to keep.
    let _: PauseBody = read_json(&state, &headers, body, false).await?;
    state
        .backend
        .pause(&tenant, &id)
        .await
        .map_err(ApiError::control)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/resume` (deprecated): 201 with the sandbox, or
/// 409 when it is running.
pub async fn resume<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let req: TimeoutBody = read_json(&state, &headers, body, false).await?;
    let timeout = models::timeout_secs(req.timeout, DEFAULT_TIMEOUT_SECS)?;
    let info = state
        .backend
        .resume(&tenant, &id, timeout)
        .await
        .map_err(ApiError::control)?;
    super::observe::note_sandbox(&info.sandbox_id);
    Ok(json_status(
        StatusCode::CREATED,
        models::sandbox(&info, &state.envd_version),
    ))
}

/// `POST /v2/sandboxes/{id}/connect` (and the older path without `/v2`):
/// 201 when it was resumed, 200 when it was running (its time to live
/// only ever extended). The body may be `{}`: the timeout is then the
/// default.
pub async fn connect<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let req: TimeoutBody = read_json(&state, &headers, body, false).await?;
    let timeout = models::timeout_secs(req.timeout, DEFAULT_TIMEOUT_SECS)?;
    let outcome = state
        .backend
        .connect(&tenant, &id, timeout)
        .await
        .map_err(ApiError::control)?;
    let status = if outcome.resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_status(
        status,
        models::sandbox(&outcome.info, &state.envd_version),
    ))
}

/// `POST /sandboxes/{id}/timeout`: 204.
pub async fn set_timeout<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let req: TimeoutBody = read_json(&state, &headers, body, true).await?;
    let Some(secs) = req.timeout else {
        return Err(ApiError::bad_request("timeout is required"));
    };
    let timeout = models::timeout_secs(Some(secs), DEFAULT_TIMEOUT_SECS)?;
    state
        .backend
        .set_timeout(&tenant, &id, timeout)
        .await
        .map_err(ApiError::control)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /sandboxes/{id}/network`: replaces the sandbox's egress rules
/// while it runs (E2B's `SandboxNetworkUpdateConfig`). 204.
pub async fn update_network<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let req: NetworkUpdateBody = read_json(&state, &headers, body, true).await?;
    let update = req.into_update()?;
    state
        .backend
        .update_network(&tenant, &id, update)
        .await
        .map_err(ApiError::control)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/refreshes`: keeps the sandbox alive at least
/// `duration` seconds more (never shortens its life). 204.
pub async fn refresh<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, peer(conn)).await?;
    let req: RefreshBody = read_json(&state, &headers, body, false).await?;
    if req.duration.is_some_and(|d| d > MAX_REFRESH_SECS) {
        return Err(ApiError::bad_request(format!(
            "duration must be at most {MAX_REFRESH_SECS} seconds"
        )));
    }
    let duration = models::timeout_secs(req.duration, DEFAULT_TIMEOUT_SECS)?;
    let info = state
        .backend
        .get(&tenant, &id)
        .await
        .map_err(ApiError::control)?;
    if SystemTime::now() + duration > info.end_at {
        state
            .backend
            .set_timeout(&tenant, &id, duration)
            .await
            .map_err(ApiError::control)?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// E2B features nanoclaw does not have (templates, snapshots, volumes,
/// secrets, teams, logs, fork, network updates, …): 501 after
/// authentication, with a message naming the route.
pub async fn not_supported<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let _tenant: TenantId = authenticate(&state, &headers, peer(conn)).await?;
    let feature = describe_unsupported(uri.path());
    Err(ApiError::not_supported(&feature))
}

/// A name for an unsupported route, e.g. `/sandboxes/x/snapshots` →
/// `sandbox snapshots`, `/v2/templates/…` → `templates`.
fn describe_unsupported(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && !matches!(*p, "v2" | "v3"))
        .collect();
    match parts.as_slice() {
        ["sandboxes", _, feature, ..] => format!("sandbox {feature}"),
        [first, ..] => (*first).to_owned(),
        [] => "this route".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_decodes_twice() {
        // What the SDK sends for {"user": "a b", "app": "x&y"} after the
        // query string itself was decoded once.
        let raw = "user=a%2520b&app=x%2526y".to_string();
        let f = metadata_filter(Some(&raw));
        assert_eq!(f.get("user").map(String::as_str), Some("a b"));
        assert_eq!(f.get("app").map(String::as_str), Some("x&y"));
    }

    #[test]
    fn list_query_validation() {
        let mut q = HashMap::new();
        q.insert("state".to_string(), "running,paused".to_string());
        q.insert("limit".to_string(), "5".to_string());
        let parsed = parse_list_query(&q).unwrap();
        assert_eq!(parsed.states.len(), 2);
        assert_eq!(parsed.limit, 5);
        q.insert("limit".to_string(), "0".to_string());
        assert!(parse_list_query(&q).is_err());
        q.remove("limit");
        q.insert("state".to_string(), "dead".to_string());
        assert!(parse_list_query(&q).is_err());
    }

    #[test]
    fn unsupported_names() {
        assert_eq!(
            describe_unsupported("/sandboxes/abc/snapshots"),
            "sandbox snapshots"
        );
        assert_eq!(describe_unsupported("/v2/templates/x/builds"), "templates");
        assert_eq!(describe_unsupported("/volumes"), "volumes");
    }
}
