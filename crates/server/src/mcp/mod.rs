//! The Model Context Protocol server of the daemon: `/mcp` (Streamable
//! HTTP, [`http`]), and through it `nanoclaw mcp` (stdio, a relay of
//! JSON-RPC lines onto `/mcp`), so there is one implementation of the
//! tools ([`tools`]), each call going through the daemon's own
//! operations: the tenant's [`Backend`] (keepers, quotas, audit records of
//! every create, exec, file operation and kill), the per-tenant rate
//! limit, and one `request` audit record per POST naming the method and
//! the tool.
//!
//! Both eras of the protocol are spoken on the same endpoint:
//!
//! * **2025-11-25 and earlier** (legacy, handshake): `initialize`
//!   negotiates the version (the client's when we speak it, else our
//!   newest legacy one) and opens a session (`Mcp-Session-Id` on the
//!   answer, required on every later request; 404 once it is gone, 400
//!   when missing); `notifications/initialized`; `MCP-Protocol-Version`
//!   checked when sent; `DELETE` ends the session (and removes its default
//!   sandbox). A session idle for [`SESSION_IDLE`] ends too.
//! * **2026-07-28** (modern, stateless): every request carries
//!   `params._meta["io.modelcontextprotocol/protocolVersion"]` and
//!   `…/clientCapabilities`; on HTTP the `MCP-Protocol-Version`,
//!   `Mcp-Method` and (for `tools/call`) `Mcp-Name` headers must match the
//!   body (else 400 with `-32020` HeaderMismatch); an unknown version is
//!   400 with `-32022` and the versions we speak; an unknown method 404
//!   with `-32601`. `server/discover` answers the versions, capabilities
//!   and instructions; every result carries `resultType: "complete"`
//!   (lists and discover also `ttlMs` and `cacheScope`). Sessions do not
//!   exist: a tool's `sandbox_id` must be given.
//!
//! Methods: `initialize`, `ping`, `server/discover`, `tools/list`,
//! `tools/call`; notifications are accepted (202) and need nothing.
//! Tool failures are results with `isError: true`; malformed messages,
//! unknown methods and unknown tools are JSON-RPC errors.

pub mod exec;
pub mod http;
pub mod tools;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::auth::{Authenticator, TenantId};
use crate::backend::Backend;
use crate::e2b::E2bState;

/// Legacy (handshake) protocol revisions spoken, newest first.
pub const LEGACY_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// Modern (per-request metadata) protocol revisions spoken, newest first.
pub const MODERN_VERSIONS: &[&str] = &["2026-07-28"];

/// `_meta` key of a modern request's protocol version.
pub const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of a modern request's client capabilities.
pub const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key of the server's identity on a modern result.
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";

/// JSON-RPC: the input is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: no such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC: invalid method parameters (and an unknown tool).
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC: the server failed.
pub const INTERNAL_ERROR: i64 = -32603;
/// MCP 2026-07-28: HTTP headers do not match the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// MCP 2026-07-28: the requested protocol version is not spoken.
pub const UNSUPPORTED_VERSION: i64 = -32022;

/// A legacy session idle this long ends (its default sandbox removed).
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// Most legacy sessions open at once per tenant (each may hold a sandbox).
pub const SESSIONS_PER_TENANT: usize = 64;

/// A JSON-RPC error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The code.
    pub code: i64,
    /// What went wrong, for people.
    pub message: String,
    /// More (e.g. the supported versions).
    pub data: Option<Value>,
}

impl RpcError {
    /// An error without data.
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// The error as a JSON-RPC response to `id`.
    pub fn to_response(&self, id: &Value) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        json!({"jsonrpc": "2.0", "id": id, "error": e})
    }
}

/// Which era a request is served in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Era {
    /// A handshake revision, negotiated at `initialize`.
    Legacy(String),
    /// A per-request revision, from the request's `_meta`.
    Modern(String),
}

/// One legacy session: its tenant, its version, and the default sandbox
/// made at its first tool call without a `sandbox_id`.
pub struct Session {
    /// The id sent as `Mcp-Session-Id`.
    pub id: String,
    /// The tenant that opened it (nobody else may use it).
    pub tenant: TenantId,
    /// The negotiated protocol version.
    pub version: String,
    /// The template of its default sandbox (`/mcp?template=NAME`; `base`).
    pub template: String,
    initialized: AtomicBool,
    default_sandbox: tokio::sync::Mutex<Option<String>>,
    last_used: Mutex<Instant>,
}

impl Session {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn idle(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

/// What the MCP server keeps between requests: legacy sessions and exec
/// sessions.
pub struct McpState {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Long-running processes started with `exec_start`.
    pub execs: exec::Execs,
    reaper: AtomicBool,
}

impl Default for McpState {
    fn default() -> Self {
        McpState {
            sessions: Mutex::new(HashMap::new()),
            execs: exec::Execs::default(),
            reaper: AtomicBool::new(false),
        }
    }
}

impl McpState {
    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // Plain map: a panic elsewhere cannot leave it inconsistent.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session for `tenant` (`None` when the tenant has
    /// [`SESSIONS_PER_TENANT`] open already or no randomness is left).
    fn open(&self, tenant: &TenantId, version: &str, template: &str) -> Option<Arc<Session>> {
        let id = crate::e2b::random_token()?;
        let mut all = self.sessions();
        if all.values().filter(|s| &s.tenant == tenant).count() >= SESSIONS_PER_TENANT {
            return None;
        }
        let s = Arc::new(Session {
            id: id.clone(),
            tenant: tenant.clone(),
            version: version.to_owned(),
            template: template.to_owned(),
            initialized: AtomicBool::new(false),
            default_sandbox: tokio::sync::Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
        });
        all.insert(id, s.clone());
        Some(s)
    }

    /// The tenant's session `id` (another tenant's is not found).
    fn find(&self, tenant: &TenantId, id: &str) -> Option<Arc<Session>> {
        let s = self
            .sessions()
            .get(id)
            .filter(|s| &s.tenant == tenant)
            .cloned()?;
        s.touch();
        Some(s)
    }

    /// Removes the tenant's session `id`; `None` when there is none.
    fn close(&self, tenant: &TenantId, id: &str) -> Option<Arc<Session>> {
        let mut all = self.sessions();
        if all.get(id).is_some_and(|s| &s.tenant == tenant) {
            return all.remove(id);
        }
        None
    }

    /// Sessions idle past [`SESSION_IDLE`], taken out of the map.
    fn expired(&self) -> Vec<Arc<Session>> {
        let mut all = self.sessions();
        let old: Vec<String> = all
            .iter()
            .filter(|(_, s)| s.idle() >= SESSION_IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        old.iter().filter_map(|k| all.remove(k)).collect()
    }
}

/// Ends a session: removes its default sandbox.
async fn end_session<B: Backend>(backend: &B, s: &Session) {
    let sandbox = s.default_sandbox.lock().await.take();
    if let Some(id) = sandbox {
        let _ = backend.kill(&s.tenant, &id).await;
    }
}

/// Starts (once) the task that ends idle sessions and exec sessions. It
/// holds the state weakly: it stops with the server.
pub(crate) fn spawn_reaper<B: Backend, A: Authenticator>(state: &Arc<E2bState<B, A>>) {
    if state.mcp.reaper.swap(true, Ordering::SeqCst) {
        return;
    }
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let Some(state) = weak.upgrade() else { return };
            for s in state.mcp.expired() {
                end_session(&*state.backend, &s).await;
            }
            state.mcp.execs.reap(&*state.backend).await;
        }
    });
}

/// Who is calling, in which era, in which session.
pub struct Ctx {
    /// The caller's tenant.
    pub tenant: TenantId,
    /// The era and version of this request.
    pub era: Era,
    /// The legacy session (none in the modern era).
    pub session: Option<Arc<Session>>,
}

/// What a request did, for its audit record.
#[derive(Debug, Default)]
pub struct Trace {
    /// The tool called.
    pub tool: Option<String>,
    /// The sandbox it used.
    pub sandbox: Option<String>,
}

/// The server's name and version.
fn server_info() -> Value {
    json!({"name": "nanoclaw", "title": "nanoclaw sandboxes", "version": env!("CARGO_PKG_VERSION")})
}

const INSTRUCTIONS: &str = "nanoclaw runs code in isolated sandboxes: no access to the host's \
files, limited resources, every call audited. sandbox_create makes a sandbox (or, in a \
2025-11-25 session, omit sandbox_id to use the session's own sandbox, made at first use and \
removed when the session ends); files and installed programs stay in a sandbox between calls. \
Use exec_start/exec_poll for programs that run long or need input.";

fn capabilities() -> Value {
    json!({"tools": {"listChanged": false}})
}

/// The client's legacy version when we speak it, else our newest.
pub fn negotiate(asked: &str) -> &'static str {
    LEGACY_VERSIONS
        .iter()
        .find(|v| **v == asked)
        .copied()
        .unwrap_or(LEGACY_VERSIONS[0])
}

/// The answer to `initialize` (legacy): the version negotiated and ours.
pub fn initialize_result(version: &str) -> Value {
    json!({
        "protocolVersion": version,
        "capabilities": capabilities(),
        "serverInfo": server_info(),
        "instructions": INSTRUCTIONS,
    })
}

/// Serves one request (not `initialize`, which opens a session: see
/// [`http`]) and returns its result.
pub async fn dispatch<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    ctx: &Ctx,
    method: &str,
    params: &Map<String, Value>,
    trace: &mut Trace,
) -> Result<Value, RpcError> {
    let modern = matches!(ctx.era, Era::Modern(_));
    let mut result = match method {
        "ping" => json!({}),
        "server/discover" => {
            json!({
                "supportedVersions": MODERN_VERSIONS,
                "capabilities": capabilities(),
                "serverInfo": server_info(),
                "instructions": INSTRUCTIONS,
                "ttlMs": 0,
                "cacheScope": "private",
            })
        }
        "tools/list" => {
            let mut r = json!({"tools": tools::definitions()});
            if modern {
                r["ttlMs"] = json!(0);
                r["cacheScope"] = json!("private");
            }
            r
        }
        "tools/call" => {
            let name = match params.get("name") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(RpcError::new(
                        INVALID_PARAMS,
                        "Invalid params: tools/call needs name (a string)",
                    ))
                }
            };
            let args = match params.get("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => {
                    return Err(RpcError::new(
                        INVALID_PARAMS,
                        "Invalid params: arguments must be an object",
                    ))
                }
            };
            trace.tool = Some(name.clone());
            tools::call(state, ctx, &name, args, trace).await?
        }
        other => {
            return Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("Method not found: {other}"),
            ))
        }
    };
    if modern {
        if let Value::Object(m) = &mut result {
            m.insert("resultType".into(), json!("complete"));
            m.insert("_meta".into(), json!({ META_SERVER_INFO: server_info() }));
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_negotiated() {
        assert_eq!(negotiate("2025-06-18"), "2025-06-18");
        assert_eq!(negotiate("2025-11-25"), "2025-11-25");
        assert_eq!(negotiate("1999-01-01"), "2025-11-25");
        assert_eq!(negotiate("2026-07-28"), "2025-11-25");
    }

    #[test]
    fn errors_carry_data() {
        let mut e = RpcError::new(UNSUPPORTED_VERSION, "Unsupported protocol version");
        e.data = Some(json!({"supported": MODERN_VERSIONS, "requested": "x"}));
        let v = e.to_response(&json!(7));
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], -32022);
        assert_eq!(v["error"]["data"]["requested"], "x");
    }
}
