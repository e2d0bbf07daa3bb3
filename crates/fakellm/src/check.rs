//! What the fake checks in each request, as pure functions: each returns
//! the violations it found (human-readable sentences), never panics.

use serde_json::Value;

use crate::{Expect, Kind};

/// The request as the checks see it.
pub(crate) struct View<'a> {
    pub kind: Kind,
    pub method: &'a str,
    pub path: &'a str,
    /// Names lowercase.
    pub headers: &'a [(String, String)],
    pub raw_body: &'a [u8],
    /// `None` when the body is not JSON.
    pub body: Option<&'a Value>,
}

impl View<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The path each kind is served on.
pub(crate) fn expected_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Anthropic => "/v1/messages",
        Kind::OpenAi => "/v1/chat/completions",
    }
}

/// Every check on one request.
pub(crate) fn check(v: &View<'_>, expect: &Expect) -> Vec<String> {
    let mut out = Vec::new();
    if v.method != "POST" {
        out.push(format!("method is {}, not POST", v.method));
    }
    if v.path != expected_path(v.kind) {
        out.push(format!("path is {}, not {}", v.path, expected_path(v.kind)));
    }
    check_auth(v, expect, &mut out);
    check_secrets(v, expect, &mut out);
    let Some(body) = v.body else {
        out.push("the body is not JSON".into());
        return out;
    };
    match v.kind {
        Kind::Anthropic => {
            check_anthropic_headers(v, &mut out);
            check_anthropic(body, &mut out);
        }
        Kind::OpenAi => check_openai(body, &mut out),
    }
    check_system(v.kind, body, expect, &mut out);
    out
}

/// The header that carries the key for `kind`.
fn auth_header(kind: Kind) -> &'static str {
    match kind {
        Kind::Anthropic => "x-api-key",
        Kind::OpenAi => "authorization",
    }
}

fn check_auth(v: &View<'_>, expect: &Expect, out: &mut Vec<String>) {
    let name = auth_header(v.kind);
    let got = v.header(name);
    match expect.api_key.as_deref() {
        Some(key) => {
            let want = match v.kind {
                Kind::Anthropic => key.to_string(),
                Kind::OpenAi => format!("Bearer {key}"),
            };
            match got {
                None => out.push(format!("the {name} header is missing")),
                Some(g) if g != want => {
                    out.push(format!("the {name} header does not carry the expected key"))
                }
                Some(_) => {}
            }
        }
        None => {
            for h in ["x-api-key", "authorization"] {
                if v.header(h).is_some() {
                    out.push(format!("a {h} header was sent though no key is configured"));
                }
            }
        }
    }
}

/// A secret described without revealing it.
fn describe(i: usize, s: &str) -> String {
    let head: String = s.chars().take(3).collect();
    format!("secret #{i} ({head}…, {} chars)", s.chars().count())
}

fn check_secrets(v: &View<'_>, expect: &Expect, out: &mut Vec<String>) {
    let auth = auth_header(v.kind);
    let raw = String::from_utf8_lossy(v.raw_body);
    let mut secrets: Vec<&str> = expect.secrets.iter().map(String::as_str).collect();
    if let Some(k) = expect.api_key.as_deref() {
        if !secrets.contains(&k) {
            secrets.push(k);
        }
    }
    for (i, s) in secrets.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
        let d = describe(i, s);
        // As written, and as it would be escaped inside a JSON string.
        let escaped = Value::String((*s).to_string()).to_string();
        let escaped = &escaped[1..escaped.len() - 1];
        if raw.contains(s) || raw.contains(escaped) {
            out.push(format!("{d} appears in the body"));
        }
        if v.path.contains(s) {
            out.push(format!("{d} appears in the path"));
        }
        for (k, val) in v.headers {
            let is_key_in_auth = k == auth && Some(*s) == expect.api_key.as_deref();
            if !is_key_in_auth && (val.contains(s) || k.contains(s)) {
                out.push(format!("{d} appears in the {k} header"));
            }
        }
    }
}

fn check_anthropic_headers(v: &View<'_>, out: &mut Vec<String>) {
    if v.header("anthropic-version").is_none() {
        out.push("the anthropic-version header is missing".into());
    }
    if !v
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json"))
    {
        out.push("content-type is not application/json".into());
    }
}

fn nonempty_str(v: &Value) -> bool {
    v.as_str().is_some_and(|s| !s.is_empty())
}

/// `model`, `max_tokens`, `stream: true` and a non-empty `messages`.
fn check_common(body: &Value, max_tokens_keys: &[&str], out: &mut Vec<String>) {
    if !body.is_object() {
        out.push("the body is not a JSON object".into());
        return;
    }
    if !nonempty_str(&body["model"]) {
        out.push("model is missing or not a non-empty string".into());
    }
    let max = max_tokens_keys.iter().find_map(|k| body[*k].as_u64());
    if max.unwrap_or(0) < 1 {
        out.push(format!(
            "{} is missing or not a positive integer",
            max_tokens_keys.join(" / ")
        ));
    }
    if body["stream"] != Value::Bool(true) {
        out.push("stream is not true".into());
    }
    if body["messages"].as_array().map_or(0, Vec::len) == 0 {
        out.push("messages is missing or empty".into());
    }
}

fn check_anthropic(body: &Value, out: &mut Vec<String>) {
    check_common(body, &["max_tokens"], out);
    let Some(messages) = body["messages"].as_array() else {
        return;
    };
    if let Some(sys) = body.get("system") {
        if !(sys.is_string() || sys.is_array()) {
            out.push("system is neither a string nor an array of blocks".into());
        }
    }
    if let Some(tools) = body.get("tools") {
        for (i, t) in tools.as_array().into_iter().flatten().enumerate() {
            if !t["name"].is_string() || !t["input_schema"].is_object() {
                out.push(format!("tool {i} lacks a name or an input_schema object"));
            }
        }
        if !tools.is_array() {
            out.push("tools is not an array".into());
        }
    }
    if messages.first().is_some_and(|m| m["role"] != "user") {
        out.push("the first message is not from the user".into());
    }
    let mut turns = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if role != "user" && role != "assistant" {
            out.push(format!("message {i} has role {:?}", m["role"]));
        }
        let blocks: Vec<&Value> = match &m["content"] {
            Value::String(_) => Vec::new(),
            Value::Array(b) => b.iter().collect(),
            _ => {
                out.push(format!("message {i} has no content string or array"));
                Vec::new()
            }
        };
        let mut calls = Vec::new();
        let mut results = Vec::new();
        let mut seen_other = false;
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("message {i} block {j}");
            match b["type"].as_str() {
                Some("text") => {
                    seen_other = true;
                    if !nonempty_str(&b["text"]) {
                        out.push(format!("{at}: a text block without non-empty text"));
                    }
                }
                Some("tool_use") => {
                    seen_other = true;
                    if role != "assistant" {
                        out.push(format!("{at}: tool_use outside an assistant message"));
                    }
                    if !b["id"].is_string() || !b["name"].is_string() || !b["input"].is_object() {
                        out.push(format!(
                            "{at}: tool_use lacks an id, a name or an input object"
                        ));
                    }
                    calls.push(b["id"].as_str().unwrap_or("").to_string());
                }
                Some("tool_result") => {
                    if role != "user" {
                        out.push(format!("{at}: tool_result outside a user message"));
                    }
                    if seen_other {
                        out.push(format!(
                            "{at}: tool_result after other content (results come first)"
                        ));
                    }
                    if !(b["content"].is_string()
                        || b["content"].is_array()
                        || b.get("content").is_none())
                    {
                        out.push(format!(
                            "{at}: tool_result content is neither a string nor blocks"
                        ));
                    }
                    if b.get("is_error").is_some_and(|e| !e.is_boolean()) {
                        out.push(format!("{at}: is_error is not a boolean"));
                    }
                    results.push(b["tool_use_id"].as_str().unwrap_or("").to_string());
                }
                Some("image" | "document" | "thinking" | "redacted_thinking") => seen_other = true,
                other => out.push(format!("{at}: unknown block type {other:?}")),
            }
        }
        turns.push(Turn {
            assistant: role == "assistant",
            calls,
            results,
        });
    }
    check_pairing(&turns, out);
}

fn check_openai(body: &Value, out: &mut Vec<String>) {
    check_common(body, &["max_tokens", "max_completion_tokens"], out);
    let Some(messages) = body["messages"].as_array() else {
        return;
    };
    if let Some(tools) = body.get("tools") {
        for (i, t) in tools.as_array().into_iter().flatten().enumerate() {
            if t["type"] != "function" || !t["function"]["name"].is_string() {
                out.push(format!(
                    "tool {i} is not {{type: function, function: {{name, …}}}}"
                ));
            }
            if t["function"]
                .get("parameters")
                .is_some_and(|p| !p.is_object())
            {
                out.push(format!("tool {i}'s parameters is not an object"));
            }
        }
    }
    let mut turns = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        let mut t = Turn {
            assistant: role == "assistant",
            calls: Vec::new(),
            results: Vec::new(),
        };
        match role {
            "system" | "developer" | "user" => {
                if !(m["content"].is_string() || m["content"].is_array()) {
                    out.push(format!("message {i} ({role}) has no content"));
                }
            }
            "assistant" => {
                let calls = m["tool_calls"].as_array();
                if !(m["content"].is_string() || (m["content"].is_null() && calls.is_some())) {
                    out.push(format!(
                        "message {i} (assistant) has neither content nor tool_calls"
                    ));
                }
                for (j, c) in calls.into_iter().flatten().enumerate() {
                    let f = &c["function"];
                    if !c["id"].is_string()
                        || c["type"] != "function"
                        || !f["name"].is_string()
                        || !f["arguments"].is_string()
                    {
                        out.push(format!(
                            "message {i} tool call {j} lacks id / type function / function.name / function.arguments (a string)"
                        ));
                    }
                    t.calls.push(c["id"].as_str().unwrap_or("").to_string());
                }
            }
            "tool" => {
                if !m["tool_call_id"].is_string()
                    || !(m["content"].is_string() || m["content"].is_array())
                {
                    out.push(format!("message {i} (tool) lacks tool_call_id or content"));
                }
                t.results
                    .push(m["tool_call_id"].as_str().unwrap_or("").to_string());
            }
            other => out.push(format!("message {i} has role {other:?}")),
        }
        turns.push(t);
    }
    check_pairing(&turns, out);
}

/// One message, for the pairing check.
struct Turn {
    assistant: bool,
    calls: Vec<String>,
    results: Vec<String>,
}

/// Every call of an assistant message is answered before the next
/// assistant message, and every result answers an open call.
fn check_pairing(turns: &[Turn], out: &mut Vec<String>) {
    let mut open: Vec<String> = Vec::new();
    let mut opened_at = 0;
    for (i, t) in turns.iter().enumerate() {
        for r in &t.results {
            match open.iter().position(|o| o == r) {
                Some(p) => {
                    open.remove(p);
                }
                None => out.push(format!(
                    "message {i}: a tool result for {r:?}, which no open tool call has"
                )),
            }
        }
        if t.assistant {
            if !open.is_empty() {
                out.push(format!(
                    "message {opened_at}: tool call(s) {open:?} not answered before the next assistant message"
                ));
            }
            open = t.calls.clone();
            opened_at = i;
        }
    }
    if !open.is_empty() {
        out.push(format!(
            "message {opened_at}: tool call(s) {open:?} never answered"
        ));
    }
}

/// The system prompt as one string (Anthropic's `system`; OpenAI's system
/// and developer messages).
fn system_text(kind: Kind, body: &Value) -> String {
    let text_of = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    match kind {
        Kind::Anthropic => text_of(&body["system"]),
        Kind::OpenAi => body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["role"] == "system" || m["role"] == "developer")
            .map(|m| text_of(&m["content"]))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn check_system(kind: Kind, body: &Value, expect: &Expect, out: &mut Vec<String>) {
    if expect.system_must_contain.is_empty() {
        return;
    }
    let sys = system_text(kind, body);
    for s in &expect.system_must_contain {
        if !sys.contains(s.as_str()) {
            out.push(format!("the system prompt does not contain {s:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "sk-test-key-0123";

    fn expect() -> Expect {
        Expect {
            api_key: Some(KEY.into()),
            secrets: vec!["hunter2-db-password".into()],
            system_must_contain: vec!["You are careful".into()],
        }
    }

    fn headers(kind: Kind, key: &str) -> Vec<(String, String)> {
        let mut h = vec![("content-type".to_string(), "application/json".to_string())];
        match kind {
            Kind::Anthropic => {
                h.push(("x-api-key".into(), key.into()));
                h.push(("anthropic-version".into(), "2023-06-01".into()));
            }
            Kind::OpenAi => h.push(("authorization".into(), format!("Bearer {key}"))),
        }
        h
    }

    fn run(kind: Kind, headers: &[(String, String)], body: &Value, e: &Expect) -> Vec<String> {
        let raw = serde_json::to_vec(body).unwrap();
        let v = View {
            kind,
            method: "POST",
            path: expected_path(kind),
            headers,
            raw_body: &raw,
            body: Some(body),
        };
        check(&v, e)
    }

    fn anthropic_round_trip(answered: bool) -> Value {
        let mut messages = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "ls please"}]}),
            json!({"role": "assistant", "content": [
                {"type": "text", "text": "sure"},
                {"type": "tool_use", "id": "toolu_1", "name": "sh", "input": {"cmd": "ls"}}]}),
        ];
        if answered {
            messages.push(json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a b", "is_error": false}]}));
        } else {
            messages.push(json!({"role": "user", "content": [{"type": "text", "text": "well?"}]}));
        }
        json!({"model": "claude-x", "max_tokens": 100, "stream": true,
               "system": "You are careful.", "messages": messages,
               "tools": [{"name": "sh", "description": "d", "input_schema": {"type": "object"}}]})
    }

    fn openai_round_trip(answered: bool) -> Value {
        let mut messages = vec![
            json!({"role": "system", "content": "You are careful."}),
            json!({"role": "user", "content": "ls please"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "sh", "arguments": "{\"cmd\":\"ls\"}"}}]}),
        ];
        if answered {
            messages.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "a b"}));
        }
        messages.push(json!({"role": "assistant", "content": "done"}));
        messages.push(json!({"role": "user", "content": "thanks"}));
        json!({"model": "gpt-x", "max_tokens": 100, "stream": true,
               "stream_options": {"include_usage": true}, "messages": messages})
    }

    #[test]
    fn well_formed_requests_pass() {
        let a = run(
            Kind::Anthropic,
            &headers(Kind::Anthropic, KEY),
            &anthropic_round_trip(true),
            &expect(),
        );
        assert!(a.is_empty(), "{a:?}");
        let o = run(
            Kind::OpenAi,
            &headers(Kind::OpenAi, KEY),
            &openai_round_trip(true),
            &expect(),
        );
        assert!(o.is_empty(), "{o:?}");
    }

    #[test]
    fn unanswered_tool_use_is_reported() {
        let a = run(
            Kind::Anthropic,
            &headers(Kind::Anthropic, KEY),
            &anthropic_round_trip(false),
            &expect(),
        );
        assert!(
            a.iter()
                .any(|v| v.contains("toolu_1") && v.contains("never answered")),
            "{a:?}"
        );
        let o = run(
            Kind::OpenAi,
            &headers(Kind::OpenAi, KEY),
            &openai_round_trip(false),
            &expect(),
        );
        assert!(
            o.iter()
                .any(|v| v.contains("call_1") && v.contains("not answered")),
            "{o:?}"
        );
    }

    #[test]
    fn orphan_and_misplaced_results_are_reported() {
        let body = json!({"model": "m", "max_tokens": 1, "stream": true, "system": "You are careful",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"},
                {"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}]});
        let a = run(
            Kind::Anthropic,
            &headers(Kind::Anthropic, KEY),
            &body,
            &expect(),
        );
        assert!(a.iter().any(|v| v.contains("no open tool call")), "{a:?}");
        assert!(a.iter().any(|v| v.contains("results come first")), "{a:?}");
    }

    #[test]
    fn secrets_in_body_or_other_headers_are_reported() {
        let mut body = anthropic_round_trip(true);
        body["messages"][0]["content"][0]["text"] = json!("the password is hunter2-db-password");
        let a = run(
            Kind::Anthropic,
            &headers(Kind::Anthropic, KEY),
            &body,
            &expect(),
        );
        assert!(
            a.iter()
                .any(|v| v.contains("secret #0") && v.contains("body")),
            "{a:?}"
        );
        assert!(
            !a.iter().any(|v| v.contains("hunter2")),
            "violations must not print secrets: {a:?}"
        );

        let mut body = openai_round_trip(true);
        body["messages"][1]["content"] = json!(format!("my key is {KEY}"));
        let mut h = headers(Kind::OpenAi, KEY);
        h.push(("x-debug".into(), format!("key={KEY}")));
        let o = run(Kind::OpenAi, &h, &body, &expect());
        assert!(
            o.iter()
                .any(|v| v.contains("secret #1") && v.contains("body")),
            "{o:?}"
        );
        assert!(o.iter().any(|v| v.contains("x-debug header")), "{o:?}");
    }

    #[test]
    fn wrong_or_missing_keys_are_reported() {
        let a = run(
            Kind::Anthropic,
            &headers(Kind::Anthropic, "sk-other"),
            &anthropic_round_trip(true),
            &expect(),
        );
        assert!(
            a.iter()
                .any(|v| v.contains("x-api-key header does not carry")),
            "{a:?}"
        );
        let no_key = Expect {
            api_key: None,
            ..expect()
        };
        let o = run(
            Kind::OpenAi,
            &headers(Kind::OpenAi, KEY),
            &openai_round_trip(true),
            &no_key,
        );
        assert!(
            o.iter().any(|v| v.contains("no key is configured")),
            "{o:?}"
        );
        let o = run(
            Kind::OpenAi,
            &headers(Kind::Anthropic, KEY),
            &openai_round_trip(true),
            &expect(),
        );
        assert!(
            o.iter()
                .any(|v| v.contains("authorization header is missing")),
            "{o:?}"
        );
    }

    #[test]
    fn malformed_bodies_and_system_are_reported() {
        let mut body = openai_round_trip(true);
        body["stream"] = json!(false);
        body.as_object_mut().unwrap().remove("max_tokens");
        body["messages"][0]["content"] = json!("be quick");
        let o = run(Kind::OpenAi, &headers(Kind::OpenAi, KEY), &body, &expect());
        assert!(o.iter().any(|v| v.contains("stream is not true")), "{o:?}");
        assert!(o.iter().any(|v| v.contains("max_tokens")), "{o:?}");
        assert!(
            o.iter()
                .any(|v| v.contains("system prompt does not contain")),
            "{o:?}"
        );

        let raw = b"not json";
        let h = headers(Kind::Anthropic, KEY);
        let v = View {
            kind: Kind::Anthropic,
            method: "GET",
            path: "/v1/other",
            headers: &h,
            raw_body: raw,
            body: None,
        };
        let a = check(&v, &expect());
        assert!(a.iter().any(|v| v.contains("not POST")), "{a:?}");
        assert!(a.iter().any(|v| v.contains("path is /v1/other")), "{a:?}");
        assert!(a.iter().any(|v| v.contains("not JSON")), "{a:?}");
    }
}
