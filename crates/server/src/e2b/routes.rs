//! The one table of routes: [`super::router`] is built from it and
//! [`super::openapi`] documents it, so a route cannot be served without
//! being documented (or documented without being served). Each operation
//! is added with its method and its handler together ([`Route::op`]).
//!
//! A route answers `HEAD` wherever it answers `GET` (axum's rule); the
//! document lists `GET` only.

use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter};
use serde_json::{json, Value};

use super::{agents, control, envd, images, interpreter, nanoclaw, AppState};
use crate::auth::Authenticator;
use crate::backend::Backend;

/// A method a route answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// GET (and HEAD).
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl Verb {
    /// Every verb a route may answer.
    pub const ALL: [Verb; 5] = [Verb::Get, Verb::Post, Verb::Put, Verb::Patch, Verb::Delete];

    /// The method's name, e.g. `GET`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Patch => "PATCH",
            Verb::Delete => "DELETE",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Patch => MethodFilter::PATCH,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// Who may call an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// A tenant's API key (`X-API-Key` or `Authorization: Bearer`), or a
    /// keyless unix-socket request when the server has a unix tenant.
    ApiKey,
    /// As [`Access::ApiKey`], and any keyless unix-socket request.
    ApiKeyOrUnix,
    /// A sandbox's access token (`X-Access-Token`) with its id
    /// (`E2b-Sandbox-Id`), or a signed URL (`/files`).
    AccessToken,
    /// Anyone without a sandbox id; with one, its access token.
    PublicOrAccessToken,
}

/// How a Connect procedure streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcKind {
    /// One message each way (`application/json`).
    Unary,
    /// One request message, a stream of answers (`application/connect+json`).
    ServerStream,
    /// A stream of request messages, one answer (`application/connect+json`).
    ClientStream,
}

/// A Connect procedure served under a route's `{method}`.
#[derive(Clone, Debug)]
pub struct Rpc {
    /// Its name, e.g. `Start`.
    pub name: &'static str,
    /// How it streams.
    pub kind: RpcKind,
    /// What it does.
    pub summary: &'static str,
}

/// One documented response.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// What it means.
    pub description: &'static str,
    /// Its body: media type and JSON schema.
    pub body: Option<(&'static str, Value)>,
}

/// The documentation of one operation.
#[derive(Clone, Debug)]
pub struct Op {
    /// Its method.
    pub verb: Verb,
    /// Its group: `E2B control plane`, `E2B envd`, `nanoclaw`.
    pub tag: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Query parameters: name and description.
    pub query: Vec<(&'static str, &'static str)>,
    /// Its request body: media type and JSON schema.
    pub request: Option<(&'static str, Value)>,
    /// Its own answers (the common errors of its [`Access`] are added by
    /// the document).
    pub answers: Vec<Answer>,
}

impl Op {
    /// An operation answering `status` with no body.
    pub fn new(verb: Verb, tag: &'static str, access: Access, summary: &'static str) -> Op {
        Op {
            verb,
            tag,
            summary,
            access,
            query: Vec::new(),
            request: None,
            answers: Vec::new(),
        }
    }

    /// Adds a query parameter.
    pub fn query(mut self, name: &'static str, description: &'static str) -> Op {
        self.query.push((name, description));
        self
    }

    /// Sets the request body (JSON with `schema`).
    pub fn json_body(mut self, schema: Value) -> Op {
        self.request = Some(("application/json", schema));
        self
    }

    /// Sets the request body (any media type).
    pub fn body(mut self, media: &'static str, schema: Value) -> Op {
        self.request = Some((media, schema));
        self
    }

    /// Adds an answer with a JSON body.
    pub fn json(self, status: u16, description: &'static str, schema: Value) -> Op {
        self.answer(status, description, Some(("application/json", schema)))
    }

    /// Adds an answer without a body.
    pub fn empty(self, status: u16, description: &'static str) -> Op {
        self.answer(status, description, None)
    }

    /// Adds an answer.
    pub fn answer(
        mut self,
        status: u16,
        description: &'static str,
        body: Option<(&'static str, Value)>,
    ) -> Op {
        self.answers.push(Answer {
            status,
            description,
            body,
        });
        self
    }
}

/// A route's documentation: its path (axum's syntax: `{id}`, `{*rest}`),
/// its operations, and the Connect procedures under its `{method}`.
#[derive(Clone, Debug)]
pub struct RouteDoc {
    /// The path.
    pub path: &'static str,
    /// Its operations, one per verb.
    pub ops: Vec<Op>,
    /// For a Connect service route: its procedures.
    pub rpcs: Vec<Rpc>,
}

/// A route: its documentation and what serves it.
pub struct Route<B, A> {
    /// The documentation.
    pub doc: RouteDoc,
    service: MethodRouter<AppState<B, A>>,
}

impl<B: Backend, A: Authenticator> Route<B, A> {
    pub(crate) fn new(path: &'static str) -> Self {
        Route {
            doc: RouteDoc {
                path,
                ops: Vec::new(),
                rpcs: Vec::new(),
            },
            service: MethodRouter::new(),
        }
    }

    /// Serves `doc.verb` with `handler`.
    pub(crate) fn op<H, T>(mut self, handler: H, doc: Op) -> Self
    where
        H: Handler<T, AppState<B, A>>,
        T: 'static,
    {
        self.service = self.service.on(doc.verb.filter(), handler);
        self.doc.ops.push(doc);
        self
    }

    /// The procedures `POST {method}` dispatches to.
    fn rpcs(mut self, rpcs: Vec<Rpc>) -> Self {
        self.doc.rpcs = rpcs;
        self
    }

    /// The path and its methods, for [`axum::Router::route`].
    pub fn into_parts(self) -> (&'static str, MethodRouter<AppState<B, A>>) {
        (self.doc.path, self.service)
    }
}

/// A `$ref` to a schema of the document's components.
pub fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

pub(crate) const NANOCLAW: &str = "nanoclaw";
const CONTROL: &str = "E2B control plane";
const ENVD: &str = "E2B envd";
const INTERPRETER: &str = "E2B code interpreter";

/// Every route, in the order they are documented.
pub fn table<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    let mut all = nanoclaw_routes();
    all.extend(control_routes());
    all.extend(unsupported_routes());
    all.extend(envd_routes());
    all.extend(interpreter_routes());
    all
}

/// Every route's documentation.
pub fn docs<B: Backend, A: Authenticator>() -> Vec<RouteDoc> {
    table::<B, A>().into_iter().map(|r| r.doc).collect()
}

fn nanoclaw_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    use Access::*;
    use Verb::*;
    let mut routes = vec![
        Route::new("/healthz").op(
            nanoclaw::healthz,
            Op::new(Get, NANOCLAW, Public, "The daemon is up.").json(200, "Up.", schema("Health")),
        ),
        Route::new("/openapi.json").op(
            nanoclaw::openapi::<B, A>,
            Op::new(Get, NANOCLAW, Public, "This document.").json(
                200,
                "OpenAPI 3.1.",
                json!({"type": "object"}),
            ),
        ),
        Route::new("/metrics").op(
            nanoclaw::metrics::<B, A>,
            Op::new(
                Get,
                NANOCLAW,
                ApiKeyOrUnix,
                "Counters in Prometheus' text format 0.0.4.",
            )
            .answer(
                200,
                "nanoclaw_sandboxes, nanoclaw_execs_total, nanoclaw_exec_duration_seconds, \
                     nanoclaw_pool_hits_total, nanoclaw_pool_misses_total, nanoclaw_pool_ready, \
                     nanoclaw_quota_refusals_total, nanoclaw_egress_denials_total, \
                     nanoclaw_audit_failures_total, nanoclaw_http_requests_total.",
                Some(("text/plain; version=0.0.4", json!({"type": "string"}))),
            ),
        ),
        Route::new("/v1/run").op(
            nanoclaw::run::<B, A>,
            Op::new(
                Post,
                NANOCLAW,
                ApiKey,
                "Runs one command in a fresh sandbox, removed afterwards.",
            )
            .json_body(schema("RunRequest"))
            .json(
                200,
                "How it ended, as `nanoclaw run --json` prints it.",
                json!({"type": "object"}),
            )
            .json(400, "Not a valid RunRequest.", schema("Error")),
        ),
        Route::new("/v1/audit").op(
            nanoclaw::audit_records::<B, A>,
            Op::new(
                Get,
                NANOCLAW,
                ApiKey,
                "The caller's tenant's audit records, oldest first.",
            )
            .query(
                "since",
                "At or after this time: RFC 3339, or an age such as `1h`.",
            )
            .query("sandbox", "Of this sandbox.")
            .query(
                "kind",
                "Of this kind (`request`, `auth_failure`, `quota_refusal`, …).",
            )
            .query("limit", "At most this many (1 to 1000; default 100).")
            .query(
                "after",
                "With a seq above this (the last seq of the previous page).",
            )
            .json(
                200,
                "A JSON array of records, in seq order.",
                json!({"type": "array", "items": schema("AuditEntry")}),
            )
            .json(400, "A bad parameter.", schema("Error"))
            .json(501, "The server keeps no audit log.", schema("Error")),
        ),
    ];
    routes.extend(agent_routes());
    routes.extend(image_routes());
    routes.push(crate::mcp::http::route());
    routes
}

fn image_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    use Access::*;
    use Verb::*;
    vec![
        Route::new("/v1/images")
        .op(
            images::register::<B, A>,
            Op::new(
                Post,
                NANOCLAW,
                ApiKey,
                "Seed 000's register_image(name, dockerfile, languages): builds the Dockerfile \
                 in a child `nanoclaw image build` (RUN steps in sandboxes, no network) and \
                 makes the image a template of the caller's tenant.",
            )
            .json_body(schema("RegisterImage"))
            .json(201, "Built and registered.", schema("Image"))
            .json(400, "Not a valid RegisterImage.", schema("Error"))
            .json(409, "The tenant has too many images.", schema("Error"))
            .json(
                422,
                "The Dockerfile did not build (the build's error line).",
                schema("Error"),
            )
            .json(
                429,
                "Over the tenant's rate limit, or too many builds at once (Retry-After).",
                schema("Error"),
            )
            .json(
                504,
                "The build outlived its wall time and was killed.",
                schema("Error"),
            ),
        )
        .op(
            images::list::<B, A>,
            Op::new(
                Get,
                NANOCLAW,
                ApiKey,
                "The templates the caller's tenant can use: base and its registered images.",
            )
            .json(
                200,
                "A JSON array.",
                json!({"type": "array", "items": schema("Image")}),
            ),
        ),
        Route::new("/v1/images/{name}").op(
            images::remove::<B, A>,
            Op::new(
                Delete,
                NANOCLAW,
                ApiKey,
                "Unregisters one of the caller's tenant's images and removes it and the layers \
                 only it used from the image store (docker rmi).",
            )
            .json(200, "Removed.", json!({"type": "object"}))
            .json(400, "Not a registered image's name (base, a configured template).", schema("Error"))
            .json(404, "The tenant has no image of that name.", schema("Error"))
            .json(409, "A sandbox or run of the tenant uses it: kill those first.", schema("Error")),
        ),
    ]
}

fn agent_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    use Access::*;
    use Verb::*;
    vec![
        Route::new("/v1/execute").op(
            agents::execute::<B, A>,
            Op::new(
                Post,
                NANOCLAW,
                ApiKey,
                "Seed 000's execute(prompt, language, timeout): the agent writes code, runs it \
                 in its sandbox and answers. Runs in a child process; approvals wait in \
                 /v1/approvals.",
            )
            .json_body(schema("ExecuteRequest"))
            .json(
                200,
                "The run ended with an answer, or a limit stopped it (see stop).",
                schema("ExecuteReport"),
            )
            .json(400, "Not a valid ExecuteRequest.", schema("Error"))
            .json(404, "No such agent.", schema("Error"))
            .json(
                409,
                "The daemon was started without --config.",
                schema("Error"),
            )
            .json(
                429,
                "Over the tenant's rate limit, or too many agent runs at once \
                 (per tenant or in total; Retry-After: seconds).",
                schema("Error"),
            )
            .json(
                500,
                "The run failed (nanoclaw's error line).",
                schema("Error"),
            )
            .json(501, "The server runs no agents.", schema("Error"))
            .json(502, "The model API failed.", schema("Error"))
            .json(
                504,
                "The run outlived its wall time and was killed.",
                schema("Error"),
            ),
        ),
        Route::new("/v1/approvals").op(
            agents::approvals::<B, A>,
            Op::new(
                Get,
                NANOCLAW,
                ApiKey,
                "The caller's tenant's approval requests waiting for a person, newest first.",
            )
            .query("all", "`true`: answered and expired ones too.")
            .json(
                200,
                "A JSON array of requests.",
                json!({"type": "array", "items": schema("Approval")}),
            )
            .json(400, "A bad parameter.", schema("Error"))
            .json(501, "The server runs no agents.", schema("Error")),
        ),
        Route::new("/v1/approvals/{approval_id}").op(
            agents::answer::<B, A>,
            Op::new(
                Post,
                NANOCLAW,
                ApiKey,
                "Answers one of the caller's tenant's pending approval requests.",
            )
            .json_body(schema("ApprovalDecision"))
            .json(
                200,
                "Answered.",
                json!({"type": "object", "required": ["id", "decision"], "properties": {
                    "id": {"type": "string"}, "decision": {"type": "string"}}}),
            )
            .json(400, "Not a valid decision.", schema("Error"))
            .json(
                404,
                "No such pending request of this tenant (unknown, another tenant's, \
                 answered or expired).",
                schema("Error"),
            )
            .json(501, "The server runs no agents.", schema("Error")),
        ),
    ]
}

fn sandbox_json() -> Value {
    schema("Sandbox")
}

fn control_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    use Access::*;
    use Verb::*;
    let create = |summary| {
        Op::new(Post, CONTROL, ApiKey, summary)
            .json_body(json!({"type": "object", "description": "E2B's NewSandbox."}))
            .json(
                201,
                "The sandbox, with its envdAccessToken.",
                sandbox_json(),
            )
            .json(
                400,
                "A bad body or an unsupported feature.",
                schema("Error"),
            )
    };
    let connect = || {
        Op::new(
            Post,
            CONTROL,
            ApiKey,
            "Resumes a paused sandbox or extends a running one's time to live.",
        )
        .json_body(json!({"type": "object", "properties": {"timeout": {"type": "integer"}}}))
        .json(200, "It was running.", sandbox_json())
        .json(201, "It was resumed.", sandbox_json())
        .json(404, "No such sandbox.", schema("Error"))
    };
    let list = |summary| {
        Op::new(Get, CONTROL, ApiKey, summary)
            .query(
                "metadata",
                "Metadata filter, form-encoded (k%3Dv%26k2%3Dv2).",
            )
            .json(
                200,
                "The sandboxes.",
                json!({"type": "array", "items": sandbox_json()}),
            )
    };
    let one = |verb, summary, status, what| {
        Op::new(verb, CONTROL, ApiKey, summary)
            .empty(status, what)
            .json(404, "No such sandbox.", schema("Error"))
    };
    vec![
        Route::new("/health").op(
            super::health::<B, A>,
            Op::new(
                Get,
                CONTROL,
                PublicOrAccessToken,
                "The API's health; with E2b-Sandbox-Id, the sandbox's (envd).",
            )
            .empty(204, "Healthy.")
            .json(502, "The sandbox is not running.", schema("Error")),
        ),
        Route::new("/sandboxes")
            .op(control::create::<B, A>, create("Creates a sandbox."))
            .op(
                control::list_legacy::<B, A>,
                list("The running sandboxes (deprecated)."),
            ),
        Route::new("/v2/sandboxes")
            .op(control::create::<B, A>, create("Creates a sandbox."))
            .op(
                control::list_v2::<B, A>,
                list("Running and paused sandboxes, paginated (X-Next-Token).")
                    .query("state", "running, paused or both (comma-separated).")
                    .query("order", "asc or desc (by start time).")
                    .query("startedAfter", "RFC 3339.")
                    .query("template", "Template id or alias.")
                    .query("limit", "1 to 100.")
                    .query("nextToken", "From X-Next-Token."),
            ),
        Route::new("/sandboxes/metrics").op(
            control::metrics_many::<B, A>,
            Op::new(
                Get,
                CONTROL,
                ApiKey,
                "The latest metrics of several sandboxes.",
            )
            .query("sandbox_ids", "Comma-separated ids (1 to 100).")
            .json(200, "By sandbox id.", json!({"type": "object"})),
        ),
        Route::new("/sandboxes/{id}")
            .op(
                control::get_one::<B, A>,
                Op::new(Get, CONTROL, ApiKey, "One sandbox.")
                    .json(200, "The sandbox.", sandbox_json())
                    .json(404, "No such sandbox.", schema("Error")),
            )
            .op(
                control::kill::<B, A>,
                one(Delete, "Kills a sandbox.", 204, "Killed."),
            ),
        Route::new("/sandboxes/{id}/metrics").op(
            control::metrics::<B, A>,
            Op::new(Get, CONTROL, ApiKey, "A sandbox's resource-usage samples.")
                .query("start", "Unix seconds.")
                .query("end", "Unix seconds.")
                .json(
                    200,
                    "Samples, oldest first.",
                    json!({"type": "array", "items": {"type": "object"}}),
                ),
        ),
        Route::new("/sandboxes/{id}/pause").op(
            control::pause::<B, A>,
            one(Post, "Pauses a sandbox.", 204, "Paused.").json(
                409,
                "Paused already.",
                schema("Error"),
            ),
        ),
        Route::new("/sandboxes/{id}/resume").op(
            control::resume::<B, A>,
            Op::new(
                Post,
                CONTROL,
                ApiKey,
                "Resumes a paused sandbox (deprecated: use connect).",
            )
            .json(201, "Resumed.", sandbox_json())
            .json(409, "Running already.", schema("Error")),
        ),
        Route::new("/sandboxes/{id}/connect").op(control::connect::<B, A>, connect()),
        Route::new("/v2/sandboxes/{id}/connect").op(control::connect::<B, A>, connect()),
        Route::new("/sandboxes/{id}/timeout").op(
            control::set_timeout::<B, A>,
            one(Post, "Sets the time to live from now.", 204, "Set.").json_body(
                json!({"type": "object", "properties": {"timeout": {"type": "integer"}}}),
            ),
        ),
        Route::new("/sandboxes/{id}/network").op(
            control::update_network::<B, A>,
            one(
                Put,
                "Replaces a running sandbox's egress rules (new connections and DNS answers follow at once; open connections no longer allowed are closed).",
                204,
                "Updated.",
            )
            .json_body(schema("SandboxNetworkUpdateConfig"))
            .json(400, "Bad or unsupported rules.", schema("Error"))
            .json(409, "The sandbox has no egress proxy to update (created without internet access).", schema("Error")),
        ),
        Route::new("/sandboxes/{id}/refreshes").op(
            control::refresh::<B, A>,
            one(
                Post,
                "Keeps a sandbox alive at least this much longer.",
                204,
                "Refreshed.",
            )
            .json_body(json!({"type": "object", "properties": {"duration": {"type": "integer"}}})),
        ),
    ]
}

/// E2B routes nanoclaw answers 501 (after authentication).
const UNSUPPORTED: [&str; 22] = [
    "/sandboxes/{id}/{feature}",
    "/v2/sandboxes/{id}/{feature}",
    "/snapshots",
    "/templates",
    "/templates/{*rest}",
    "/v2/templates",
    "/v2/templates/{*rest}",
    "/v3/templates",
    "/volumes",
    "/volumes/{*rest}",
    "/volumecontent/{*rest}",
    "/secrets",
    "/secrets/{*rest}",
    "/teams",
    "/teams/{*rest}",
    "/api-keys",
    "/api-keys/{*rest}",
    "/access-tokens",
    "/access-tokens/{*rest}",
    "/nodes",
    "/nodes/{*rest}",
    "/admin/{*rest}",
];

fn unsupported_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    UNSUPPORTED
        .iter()
        .map(|&path| {
            Verb::ALL.iter().fold(Route::new(path), |route, verb| {
                route.op(
                    control::not_supported::<B, A>,
                    Op::new(
                        *verb,
                        CONTROL,
                        Access::ApiKey,
                        "An E2B feature nanoclaw does not have.",
                    )
                    .json(501, "Not supported by nanoclaw.", schema("Error")),
                )
            })
        })
        .collect()
}

/// `process.Process`'s procedures.
pub fn process_rpcs() -> Vec<Rpc> {
    use RpcKind::*;
    let rpc = |name, kind, summary| Rpc {
        name,
        kind,
        summary,
    };
    vec![
        rpc(
            "Start",
            ServerStream,
            "Starts a process; streams its start, output and end.",
        ),
        rpc(
            "Connect",
            ServerStream,
            "Attaches to a running process's output.",
        ),
        rpc(
            "StreamInput",
            ClientStream,
            "Streams input to a process's stdin.",
        ),
        rpc("List", Unary, "The running processes."),
        rpc("SendInput", Unary, "Writes to a process's stdin."),
        rpc("CloseStdin", Unary, "Closes a process's stdin."),
        rpc("SendSignal", Unary, "Sends SIGTERM or SIGKILL."),
        rpc("Update", Unary, "Resizes a process's terminal."),
    ]
}

/// `filesystem.Filesystem`'s procedures.
pub fn filesystem_rpcs() -> Vec<Rpc> {
    use RpcKind::*;
    let rpc = |name, kind, summary| Rpc {
        name,
        kind,
        summary,
    };
    vec![
        rpc("Stat", Unary, "Describes an entry."),
        rpc("MakeDir", Unary, "Creates a directory and its parents."),
        rpc("Move", Unary, "Renames an entry."),
        rpc("ListDir", Unary, "Lists a directory."),
        rpc("Remove", Unary, "Removes a file or a directory tree."),
        rpc(
            "WatchDir",
            ServerStream,
            "Streams changes under a directory.",
        ),
        rpc("CreateWatcher", Unary, "Starts a polled watcher."),
        rpc(
            "GetWatcherEvents",
            Unary,
            "Takes a polled watcher's events.",
        ),
        rpc("RemoveWatcher", Unary, "Stops a polled watcher."),
    ]
}

fn envd_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    use Access::*;
    use Verb::*;
    let rpc = |summary| Op::new(Post, ENVD, AccessToken, summary);
    let file_query = |op: Op| {
        op.query(
            "path",
            "The file (relative paths are under the user's home).",
        )
        .query("username", "The user inside the sandbox.")
        .query(
            "signature",
            "A signed URL's signature (instead of X-Access-Token).",
        )
        .query(
            "signature_expiration",
            "A signed URL's expiry, Unix seconds.",
        )
    };
    vec![
        Route::new("/process.Process/{method}")
            .op(envd::process::rpc::<B, A>, rpc("process.Process (Connect, JSON codec)."))
            .rpcs(process_rpcs()),
        Route::new("/filesystem.Filesystem/{method}")
            .op(envd::filesystem::rpc::<B, A>, rpc("filesystem.Filesystem (Connect, JSON codec)."))
            .rpcs(filesystem_rpcs()),
        Route::new("/files")
            .op(
                envd::files::download::<B, A>,
                file_query(Op::new(Get, ENVD, AccessToken, "Downloads a file."))
                    .answer(200, "The file's bytes.", Some(("application/octet-stream", json!({"type": "string", "format": "binary"}))))
                    .json(404, "No such file.", schema("Error")),
            )
            .op(
                envd::files::upload::<B, A>,
                file_query(Op::new(Post, ENVD, AccessToken, "Uploads files (multipart/form-data, or application/octet-stream with optional gzip)."))
                    .body("multipart/form-data", json!({"type": "object"}))
                    .json(200, "The entries written.", json!({"type": "array", "items": {"type": "object"}})),
            ),
    ]
}

fn interpreter_routes<B: Backend, A: Authenticator>() -> Vec<Route<B, A>> {
    use Access::*;
    use Verb::*;
    let op = |verb, summary| {
        Op::new(verb, INTERPRETER, AccessToken, summary).json(
            404,
            "No such context, or no such sandbox (unknown, another tenant's, wrong token).",
            schema("Error"),
        )
    };
    let context = json!({"type": "object", "required": ["id", "language", "cwd"], "properties": {
        "id": {"type": "string"}, "language": {"type": "string"}, "cwd": {"type": "string"}}});
    vec![
        Route::new("/execute").op(
            interpreter::execute::<B, A>,
            op(
                Post,
                "Runs code in a stateful context (E2b-Sandbox-Port: 49999): the language's \
                 default context, or context_id's.",
            )
            .json_body(json!({"type": "object", "required": ["code"], "properties": {
                "code": {"type": "string"}, "context_id": {"type": ["string", "null"]},
                "language": {"type": ["string", "null"], "description": "python, javascript (js) or bash."},
                "env_vars": {"type": ["object", "null"], "additionalProperties": {"type": "string"}}}}))
            .answer(
                200,
                "One JSON object per line, as they happen: number_of_executions, stdout, \
                 stderr, result, error, keepalive; then end_of_execution.",
                Some(("application/x-ndjson", json!({"type": "string"}))),
            )
            .json(400, "A bad body, language, or both context_id and language.", schema("Error"))
            .json(413, "The code is over 1 MiB.", schema("Error"))
            .json(429, "The sandbox has 16 contexts already.", schema("Error")),
        ),
        Route::new("/contexts")
            .op(
                interpreter::create::<B, A>,
                op(Post, "Creates a context.")
                    .json_body(json!({"type": "object", "properties": {
                        "language": {"type": "string"}, "cwd": {"type": "string"}}}))
                    .json(200, "The context.", context.clone())
                    .json(400, "A bad language or cwd.", schema("Error"))
                    .json(429, "The sandbox has 16 contexts already.", schema("Error")),
            )
            .op(
                interpreter::list::<B, A>,
                op(Get, "The sandbox's contexts.").json(
                    200,
                    "The contexts.",
                    json!({"type": "array", "items": context}),
                ),
            ),
        Route::new("/contexts/{context_id}").op(
            interpreter::remove::<B, A>,
            op(Delete, "Removes a context (its interpreter is killed).").empty(204, "Removed."),
        ),
        Route::new("/contexts/{context_id}/restart").op(
            interpreter::restart::<B, A>,
            op(Post, "Replaces a context's interpreter with a fresh one.").empty(204, "Restarted."),
        ),
    ]
}
