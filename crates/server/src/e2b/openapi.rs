//! `GET /openapi.json`: an OpenAPI 3.1 document generated from the route
//! table ([`super::routes`]), so it lists exactly what the router serves.
//!
//! Connect services (`/process.Process/{method}`, …) are listed one path
//! per procedure. Wildcard segments (`{*rest}`) are shown as a path
//! parameter `rest` that may contain `/` (`x-nanoclaw-wildcard: true`).

use serde_json::{json, Map, Value};

use super::routes::{self, Access, Op, RouteDoc, RpcKind};
use crate::auth::Authenticator;
use crate::backend::Backend;

/// The document for a server reporting `envd_version`.
pub fn document<B: Backend, A: Authenticator>(envd_version: &str) -> Value {
    document_of(&routes::docs::<B, A>(), envd_version)
}

/// The document of `docs`.
pub fn document_of(docs: &[RouteDoc], envd_version: &str) -> Value {
    let mut paths = Map::new();
    for doc in docs {
        if doc.rpcs.is_empty() {
            let mut item = Map::new();
            for op in &doc.ops {
                item.insert(
                    op.verb.as_str().to_ascii_lowercase(),
                    operation(doc.path, op),
                );
            }
            paths.insert(openapi_path(doc.path), Value::Object(item));
        } else {
            for rpc in &doc.rpcs {
                let path = doc.path.replace("{method}", rpc.name);
                let item = json!({ "post": rpc_operation(&path, rpc.kind, rpc.summary) });
                paths.insert(path, item);
            }
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "nanoclaw serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "E2B's API (control plane and envd {envd_version}, Connect protocol with the JSON \
                 codec) over nanoclaw sandboxes, and nanoclaw's own routes. Every route that \
                 answers GET also answers HEAD. Authenticated requests are rate-limited per \
                 tenant (429 with Retry-After) and every request but liveness probes leaves an \
                 audit record before it is answered."
            ),
        },
        "externalDocs": {
            "description": "E2B's API reference",
            "url": "https://e2b.dev/docs/api-reference",
        },
        "tags": [
            {"name": "nanoclaw", "description": "nanoclaw's own routes."},
            {"name": "E2B control plane", "description": "Sandbox lifecycle, as E2B's API."},
            {"name": "E2B envd", "description": "A sandbox's data plane, as E2B's envd (by E2b-Sandbox-Id)."},
        ],
        "paths": paths,
        "components": with_image_schemas(components()),
    })
}

/// `/templates/{*rest}` → `/templates/{rest}`.
fn openapi_path(path: &str) -> String {
    path.replace("{*", "{")
}

/// The path parameters of an axum path.
fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| match name.strip_prefix('*') {
            Some(rest) => json!({
                "name": rest, "in": "path", "required": true,
                "schema": {"type": "string"},
                "description": "The rest of the path (may contain /).",
                "x-nanoclaw-wildcard": true,
            }),
            None => json!({
                "name": name, "in": "path", "required": true, "schema": {"type": "string"},
            }),
        })
        .collect()
}

fn security(access: Access) -> Value {
    let key = json!([{"ApiKeyAuth": []}, {"BearerAuth": []}]);
    match access {
        Access::Public => json!([]),
        Access::ApiKey => key,
        Access::ApiKeyOrUnix => json!([{"ApiKeyAuth": []}, {"BearerAuth": []}, {}]),
        Access::AccessToken => json!([{"AccessToken": []}]),
        Access::PublicOrAccessToken => json!([{}, {"AccessToken": []}]),
    }
}

fn error_body(schema: &str) -> Value {
    json!({"content": {"application/json": {"schema": routes::schema(schema)}}})
}

/// The answers every operation with `access` may give.
fn common_answers(access: Access, responses: &mut Map<String, Value>) {
    let mut add = |status: &str, description: &str| {
        if !responses.contains_key(status) {
            let mut r = error_body("Error");
            r["description"] = json!(description);
            responses.insert(status.to_owned(), r);
        }
    };
    match access {
        Access::Public => {}
        Access::ApiKey | Access::ApiKeyOrUnix => {
            add("401", "Missing or unknown API key.");
            add(
                "429",
                "Over the tenant's rate limit (Retry-After: seconds).",
            );
            add("503", "The key store or the audit log is unavailable.");
        }
        Access::AccessToken | Access::PublicOrAccessToken => {
            add("400", "No E2b-Sandbox-Id.");
            add(
                "429",
                "Over the sandbox owner's rate limit (Retry-After: seconds).",
            );
            add(
                "502",
                "The sandbox was not found (or the token is wrong), or is paused.",
            );
        }
    }
}

fn operation(path: &str, op: &Op) -> Value {
    let mut params = path_params(path);
    params.extend(op.query.iter().map(|(name, description)| {
        json!({"name": name, "in": "query", "required": false,
               "schema": {"type": "string"}, "description": description})
    }));
    if matches!(op.access, Access::AccessToken | Access::PublicOrAccessToken) {
        params.push(json!({
            "name": "E2b-Sandbox-Id", "in": "header",
            "required": op.access == Access::AccessToken,
            "schema": {"type": "string"}, "description": "The sandbox.",
        }));
    }
    let mut responses = Map::new();
    for a in &op.answers {
        let mut r = json!({ "description": a.description });
        if let Some((media, schema)) = &a.body {
            r["content"] = json!({ *media: { "schema": schema } });
        }
        responses.insert(a.status.to_string(), r);
    }
    common_answers(op.access, &mut responses);
    let mut out = json!({
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": operation_id(op.verb.as_str(), path),
        "security": security(op.access),
        "parameters": params,
        "responses": responses,
    });
    if op.access == Access::ApiKeyOrUnix {
        out["description"] = json!("Over the unix socket no API key is needed; over TCP one is.");
    }
    if let Some((media, schema)) = &op.request {
        out["requestBody"] = json!({"required": true, "content": { *media: { "schema": schema } }});
    }
    out
}

fn operation_id(verb: &str, path: &str) -> String {
    let mut id = verb.to_ascii_lowercase();
    for c in path.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => id.push(c),
            '/' | '.' | '-' | '_' => id.push('_'),
            _ => {}
        }
    }
    id
}

fn rpc_operation(path: &str, kind: RpcKind, summary: &str) -> Value {
    let media = match kind {
        RpcKind::Unary => "application/json",
        RpcKind::ServerStream | RpcKind::ClientStream => "application/connect+json",
    };
    let what = match kind {
        RpcKind::Unary => "One JSON message.",
        RpcKind::ServerStream => "One enveloped JSON message; the answer is a stream of them.",
        RpcKind::ClientStream => "A stream of enveloped JSON messages.",
    };
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({"description": "The answer (a stream ends with an end-of-stream message that may carry an error).",
               "content": { media: { "schema": {"type": "object"} } }}),
    );
    let connect_error = json!({"description": "A Connect error (unary, or refused before a stream starts).",
        "content": {"application/json": {"schema": routes::schema("ConnectError")}}});
    for status in ["400", "404", "429"] {
        responses.insert(status.into(), connect_error.clone());
    }
    let mut r = error_body("Error");
    r["description"] = json!("The sandbox was not found (or the token is wrong), or is paused.");
    responses.insert("502".into(), r);
    json!({
        "tags": ["E2B envd"],
        "summary": summary,
        "operationId": operation_id("post", path),
        "security": security(Access::AccessToken),
        "parameters": [
            {"name": "E2b-Sandbox-Id", "in": "header", "required": true, "schema": {"type": "string"}},
            {"name": "Connect-Timeout-Ms", "in": "header", "required": false, "schema": {"type": "integer"}},
        ],
        "requestBody": {"required": true, "description": what,
                        "content": { media: { "schema": {"type": "object"} } }},
        "responses": responses,
    })
}

fn nullable(t: &str) -> Value {
    json!({"type": [t, "null"]})
}

/// `components` with the image routes' schemas (a separate `json!`: one
/// literal that large exceeds the macro's recursion limit).
fn with_image_schemas(mut c: Value) -> Value {
    let extra = json!({
            "RegisterImage": {"type": "object", "additionalProperties": false,
                "required": ["name", "dockerfile", "languages"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9]+([._-][a-z0-9]+)*$",
                        "maxLength": 64, "description": "The template's name (not base)."},
                    "dockerfile": {"type": "string", "minLength": 1,
                        "maxLength": crate::images::MAX_DOCKERFILE,
                        "description": "The Dockerfile's text; its context is empty (no COPY \
                            or ADD of local files); RUN steps have no network."},
                    "languages": {"type": "array", "minItems": 1,
                        "items": {"enum": crate::images::LANGUAGES},
                        "description": "The interpreters the image is for: /v1/run snippets \
                            in other languages are refused in it."},
                    "allow_hosts": {"type": "array", "maxItems": crate::images::MAX_ALLOW_HOSTS,
                        "items": {"type": "string"},
                        "description": "HOST[:PORT]s the RUN steps may reach through the egress \
                            proxy (e.g. pypi.org, files.pythonhosted.org). Default: no network."}}},
            "Image": {"type": "object",
                "description": "A template the tenant can use.",
                "properties": {
                    "name": {"type": "string"}, "reference": nullable("string"),
                    "id": {"type": "string"},
                    "languages": {"type": "array", "items": {"type": "string"}},
                    "created_ms": {"type": "integer"}, "build_ms": {"type": "integer"},
                    "builtin": {"type": "boolean"}}}
    });
    if let (Some(schemas), Some(extra)) = (c["schemas"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            schemas.insert(k.clone(), v.clone());
        }
    }
    c
}

fn components() -> Value {
    let captured = json!({"type": ["object", "null"], "properties": {
        "len": {"type": "integer"}, "sha256": {"type": "string"}, "truncated": {"type": "boolean"},
        "head": {"type": "string"}, "head_base64": {"type": "string"}}});
    json!({
        "securitySchemes": {
            "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "BearerAuth": {"type": "http", "scheme": "bearer"},
            "AccessToken": {"type": "apiKey", "in": "header", "name": "X-Access-Token"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "integer"}, "message": {"type": "string"}}},
            "ConnectError": {"type": "object", "required": ["code"], "properties": {
                "code": {"type": "string", "examples": ["resource_exhausted"]},
                "message": {"type": "string"}}},
            "SandboxNetworkUpdateConfig": {"type": "object",
                "description": "Replaces the egress rules whole: a field left out is cleared.",
                "properties": {
                    "allowOut": {"type": "array", "items": {"type": "string"},
                        "description": "CIDRs, IPs or domain names (*.x.com); public addresses only."},
                    "denyOut": {"type": "array", "items": {"type": "string"},
                        "description": "0.0.0.0/0 (with no allowOut: deny everything)."},
                    "allow_internet_access": {"type": "boolean"},
                    "egressProxy": {"type": "null", "description": "Not supported."},
                    "rules": {"type": "object", "description": "Credential rules ({domain: [{transform: {headers}}]}) replacing the sandbox's; only for domains it was created with rules for (its interception CA is fixed at creation), else 409. Left out: cleared."}}},
            "Health": {"type": "object", "required": ["status"], "properties": {
                "status": {"const": "ok"}}},
            "Sandbox": {"type": "object", "description": "E2B's Sandbox / ListedSandbox.",
                "properties": {"sandboxID": {"type": "string"}, "templateID": {"type": "string"},
                    "envdAccessToken": {"type": "string"}, "envdVersion": {"type": "string"},
                    "state": {"enum": ["running", "paused"]}}},
            "RunRequest": {"type": "object", "additionalProperties": false,
                "description": "Either command, or lang and code.",
                "properties": {
                    "template": {"type": "string", "description": "Default: base."},
                    "command": {"type": "array", "items": {"type": "string"}},
                    "lang": {"enum": nanoclaw_langs()},
                    "code": {"type": "string"},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "timeout_ms": {"type": "integer", "minimum": 1, "description": "Default: 30000."},
                    "stdin": {"type": "string"}}},
            "ExecuteRequest": {"type": "object", "additionalProperties": false,
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "minLength": 1,
                        "maxLength": crate::agents::MAX_PROMPT},
                    "language": {"enum": nanoclaw_agent::tools::LANGUAGES,
                        "description": "Default: python."},
                    "timeout": {"type": "number", "exclusiveMinimum": 0,
                        "maximum": crate::agents::MAX_TIMEOUT_S,
                        "description": "Longest a piece of code may run, seconds. Default: 30."},
                    "agent": {"type": "string",
                        "description": "Default: the config's default agent."},
                    "image": {"type": "string",
                        "description": "A template the tenant registered (POST /v1/images): \
                            the agent's sandbox runs in its root."}}},
            "ExecuteReport": {"type": "object",
                "description": "`nanoclaw agent execute --json`'s report.",
                "properties": {
                    "run_id": {"type": "string"}, "agent": {"type": "string"},
                    "answer": {"type": "string"},
                    "stop": {"enum": ["answer", "max_tokens", "turns", "tokens", "wall_time",
                        "daily_tokens", "daily_spend"]},
                    "stop_detail": nullable("string"), "turns": {"type": "integer"},
                    "usage": {"type": "object", "properties": {
                        "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"}}},
                    "cost": {"type": "number"},
                    "tool_calls": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string"}, "name": {"type": "string"},
                        "input": {"type": "object"},
                        "decision": {"enum": ["allowed", "denied", "approved", "refused"]},
                        "reason": nullable("string"), "ok": {"type": "boolean"},
                        "exit_code": nullable("integer"), "code": nullable("string"),
                        "language": nullable("string"), "stdout": nullable("string"),
                        "stderr": nullable("string"), "result": {"type": "string"},
                        "audit_seq": nullable("integer")}}},
                    "files": {"type": "array", "items": {"type": "string"}},
                    "sandbox": {"type": "string"}, "audit_seq": nullable("integer"),
                    "code": nullable("string"), "language": nullable("string"),
                    "stdout": nullable("string"), "stderr": nullable("string"),
                    "exit_code": nullable("integer")}},
            "Approval": {"type": "object", "properties": {
                "id": {"type": "string"}, "agent": {"type": "string"}, "tool": {"type": "string"},
                "summary": {"type": "string"}, "reason": {"type": "string"},
                "binding": {"type": "string"}, "created_ms": {"type": "integer"},
                "expires_ms": {"type": "integer"},
                "state": {"type": "string", "description":
                    "pending, or the answer: allow-once, allow-always, deny, expired."}}},
            "ApprovalDecision": {"type": "object", "additionalProperties": false,
                "required": ["decision"], "properties": {
                    "decision": {"enum": ["allow-once", "allow-always", "deny"]}}},
            "AuditEntry": {"type": "object", "properties": {
                "seq": {"type": "integer"}, "time_ms": {"type": "integer"}, "time": {"type": "string"},
                "kind": {"type": "string"}, "tenant": nullable("string"), "agent": nullable("string"),
                "sandbox": nullable("string"), "method": nullable("string"), "path": nullable("string"),
                "status": nullable("integer"),
                "argv": {"type": ["array", "null"], "items": {"type": "string"}},
                "exit_code": nullable("integer"), "signal": nullable("integer"),
                "killed_by": nullable("string"), "duration_ms": nullable("integer"),
                "cpu_ms": nullable("integer"), "peak_memory_bytes": nullable("integer"),
                "detail": nullable("string"), "input": captured, "output": captured,
                "prev_hash": {"type": "string"}, "hash": {"type": "string"}}},
        },
    })
}

fn nanoclaw_langs() -> Value {
    json!(super::nanoclaw::RUN_LANGS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Entry, Record};
    use crate::backend::RunRequest;

    fn props(doc: &Value, schema: &str) -> Vec<String> {
        let mut keys: Vec<String> = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    fn doc() -> Value {
        document_of(&[], "0.6.4")
    }

    #[test]
    fn audit_entry_schema_matches_the_serialized_entry() {
        let entry = Entry {
            seq: 1,
            time_ms: 0,
            time: String::new(),
            record: Record::new("request"),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let v = serde_json::to_value(&entry).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(props(&doc(), "AuditEntry"), keys);
    }

    #[test]
    fn run_request_schema_matches_the_struct() {
        // Every documented property is accepted; anything else is refused.
        let names = props(&doc(), "RunRequest");
        let sample = |name: &str| match name {
            "command" => json!(["a"]),
            "env" => json!({"A": "b"}),
            "timeout_ms" => json!(5),
            _ => json!("x"),
        };
        let all: Map<String, Value> = names.iter().map(|n| (n.clone(), sample(n))).collect();
        let parsed: Result<RunRequest, _> = serde_json::from_value(Value::Object(all.clone()));
        assert!(parsed.is_ok(), "{parsed:?}");
        // serde names every field it knows when it refuses an unknown one.
        let mut extra = all;
        extra.insert("extra".into(), json!(1));
        let err = serde_json::from_value::<RunRequest>(Value::Object(extra))
            .unwrap_err()
            .to_string();
        let known = err.split("expected one of").nth(1).unwrap_or("");
        let mut fields: Vec<String> = known
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        fields.sort();
        assert_eq!(fields, names, "{err}");
    }

    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn agent_schemas_match_what_is_served() {
        use nanoclaw_agent::approval::ApprovalRequest;
        use nanoclaw_agent::run::{Report, Stop, ToolRecord};
        use nanoclaw_agent::store::ApprovalRow;
        let d = doc();
        let report = Report {
            run_id: String::new(),
            agent: String::new(),
            answer: String::new(),
            stop: Stop::Answer,
            stop_detail: None,
            turns: 0,
            usage: Default::default(),
            cost: 0.0,
            tool_calls: vec![ToolRecord::default()],
            files: Vec::new(),
            sandbox: String::new(),
            audit_seq: None,
            messages: Vec::new(),
        };
        let mut v = serde_json::to_value(&report).unwrap();
        // `agent execute` adds the last code's.
        for k in ["code", "language", "stdout", "stderr", "exit_code"] {
            v[k] = Value::Null;
        }
        assert_eq!(props(&d, "ExecuteReport"), keys(&v));
        let tool = &d["components"]["schemas"]["ExecuteReport"]["properties"]["tool_calls"];
        assert_eq!(
            keys(&tool["items"]["properties"]),
            keys(&serde_json::to_value(ToolRecord::default()).unwrap())
        );
        let row = ApprovalRow {
            request: ApprovalRequest {
                id: String::new(),
                agent: String::new(),
                tool: String::new(),
                summary: String::new(),
                reason: String::new(),
                binding: String::new(),
            },
            created_ms: 0,
            expires_ms: 0,
            state: String::new(),
        };
        assert_eq!(
            props(&d, "Approval"),
            keys(&serde_json::to_value(row).unwrap())
        );
        // Every documented field of the request is accepted.
        let all = json!({"prompt": "p", "language": "python", "timeout": 1, "agent": "a",
            "image": "custom-python"});
        assert_eq!(props(&d, "ExecuteRequest"), keys(&all));
        assert!(serde_json::from_value::<crate::agents::ExecuteRequest>(all).is_ok());
    }

    #[test]
    fn paths_and_ids() {
        assert_eq!(openapi_path("/templates/{*rest}"), "/templates/{rest}");
        let p = path_params("/sandboxes/{id}/{*rest}");
        assert_eq!(p[0]["name"], "id");
        assert_eq!(p[1]["name"], "rest");
        assert_eq!(p[1]["x-nanoclaw-wildcard"], true);
        assert_eq!(
            operation_id("GET", "/v2/sandboxes/{id}"),
            "get_v2_sandboxes_id"
        );
    }
}
