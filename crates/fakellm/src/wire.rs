//! The answers, in each provider's wire format as documented: Anthropic's
//! named SSE events (ping included) and error JSON; OpenAI's `data:` chunks
//! ending in `[DONE]`, its completion object and error JSON.

use serde_json::{json, Value};

use crate::{Kind, ToolCall, Usage};

/// One answer, ready to write.
pub(crate) enum Answer {
    /// A whole JSON body.
    Full {
        code: u16,
        headers: Vec<(String, String)>,
        body: Value,
    },
    /// A 200 event stream: each string is one complete event.
    Stream {
        headers: Vec<(String, String)>,
        events: Vec<String>,
    },
}

/// What a reply says (the fields of `Turn::Reply`).
pub(crate) struct Reply<'a> {
    pub text: Option<&'a str>,
    pub tool_calls: &'a [ToolCall],
    pub usage: Usage,
}

/// Makes the ids of one server (`toolu_…`, `call_…`, `msg_…`).
#[derive(Debug, Default)]
pub(crate) struct Ids(u64);

impl Ids {
    fn next(&mut self, prefix: &str) -> String {
        self.0 += 1;
        format!("{prefix}{:022}", self.0)
    }
}

fn request_id(kind: Kind, ids: &mut Ids) -> (String, String) {
    match kind {
        Kind::Anthropic => ("request-id".into(), ids.next("req_01FAKE")),
        Kind::OpenAi => ("x-request-id".into(), ids.next("req_fake")),
    }
}

fn sse_headers(kind: Kind, ids: &mut Ids) -> Vec<(String, String)> {
    vec![
        (
            "content-type".into(),
            "text/event-stream; charset=utf-8".into(),
        ),
        ("cache-control".into(), "no-cache".into()),
        request_id(kind, ids),
    ]
}

fn json_headers(kind: Kind, ids: &mut Ids) -> Vec<(String, String)> {
    vec![
        ("content-type".into(), "application/json".into()),
        request_id(kind, ids),
    ]
}

/// `s` cut into about `n` pieces on char boundaries (one piece when short).
pub(crate) fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let size = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn anthropic_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn openai_event(data: &Value) -> String {
    format!("data: {data}\n\n")
}

/// The error `type` Anthropic documents for a status.
pub(crate) fn anthropic_error_type(code: u16) -> &'static str {
    match code {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn openai_error_type(code: u16) -> &'static str {
    match code {
        400 | 404 | 413 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "requests",
        _ => "server_error",
    }
}

/// An error status in `kind`'s error JSON, with `retry-after` when given.
pub(crate) fn status(
    kind: Kind,
    code: u16,
    retry_after: Option<u64>,
    message: &str,
    ids: &mut Ids,
) -> Answer {
    let mut headers = json_headers(kind, ids);
    if let Some(s) = retry_after {
        headers.push(("retry-after".into(), s.to_string()));
    }
    let body = match kind {
        Kind::Anthropic => json!({
            "type": "error",
            "error": {"type": anthropic_error_type(code), "message": message},
        }),
        Kind::OpenAi => json!({
            "error": {
                "message": message,
                "type": openai_error_type(code),
                "param": null,
                "code": if code == 429 { json!("rate_limit_exceeded") } else { Value::Null },
            }
        }),
    };
    Answer::Full {
        code,
        headers,
        body,
    }
}

/// A streamed reply.
pub(crate) fn stream(
    kind: Kind,
    model: &str,
    r: &Reply<'_>,
    include_usage: bool,
    ids: &mut Ids,
) -> Answer {
    let events = match kind {
        Kind::Anthropic => anthropic_events(model, r, ids),
        Kind::OpenAi => openai_chunks(model, r, include_usage, ids),
    };
    Answer::Stream {
        headers: sse_headers(kind, ids),
        events,
    }
}

/// A stream that starts, then fails with an in-stream error.
pub(crate) fn stream_error(
    kind: Kind,
    model: &str,
    code: u16,
    message: &str,
    ids: &mut Ids,
) -> Answer {
    let events = match kind {
        Kind::Anthropic => vec![
            anthropic_message_start(model, 0, ids),
            anthropic_event("ping", &json!({"type": "ping"})),
            anthropic_event(
                "error",
                &json!({"type": "error", "error": {"type": anthropic_error_type(code), "message": message}}),
            ),
        ],
        Kind::OpenAi => {
            let id = ids.next("chatcmpl-fake");
            vec![
                openai_chunk(
                    &id,
                    model,
                    json!({"role": "assistant", "content": ""}),
                    None,
                    false,
                ),
                openai_event(
                    &json!({"error": {"message": message, "type": openai_error_type(code), "param": null, "code": code}}),
                ),
                "data: [DONE]\n\n".to_string(),
            ]
        }
    };
    Answer::Stream {
        headers: sse_headers(kind, ids),
        events,
    }
}

fn anthropic_message_start(model: &str, input_tokens: u64, ids: &mut Ids) -> String {
    anthropic_event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": ids.next("msg_01FAKE"), "type": "message", "role": "assistant",
            "content": [], "model": model, "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }}),
    )
}

fn anthropic_events(model: &str, r: &Reply<'_>, ids: &mut Ids) -> Vec<String> {
    let mut ev = vec![
        anthropic_message_start(model, r.usage.input_tokens, ids),
        anthropic_event("ping", &json!({"type": "ping"})),
    ];
    let mut index = 0;
    if let Some(text) = r.text {
        ev.push(anthropic_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        for p in pieces(text, 3) {
            ev.push(anthropic_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": p}}),
            ));
        }
        ev.push(anthropic_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for call in r.tool_calls {
        let id = ids.next("toolu_01FAKE");
        ev.push(anthropic_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": id, "name": call.name, "input": {}}}),
        ));
        // Anthropic starts with an empty fragment; an empty input has only that.
        let mut fragments = vec![String::new()];
        if !is_empty_object(&call.input) {
            fragments.extend(pieces(&call.input.to_string(), 3));
        }
        for f in fragments {
            ev.push(anthropic_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": f}}),
            ));
        }
        ev.push(anthropic_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    let stop = if r.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    ev.push(anthropic_event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"output_tokens": r.usage.output_tokens}}),
    ));
    ev.push(anthropic_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    ev
}

fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.is_empty()) || v.is_null()
}

fn openai_chunk(
    id: &str,
    model: &str,
    delta: Value,
    finish: Option<&str>,
    with_usage_field: bool,
) -> String {
    let mut chunk = json!({
        "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    if with_usage_field {
        chunk["usage"] = Value::Null;
    }
    openai_event(&chunk)
}

fn openai_chunks(model: &str, r: &Reply<'_>, include_usage: bool, ids: &mut Ids) -> Vec<String> {
    let id = ids.next("chatcmpl-fake");
    let u = include_usage;
    let mut ev = vec![openai_chunk(
        &id,
        model,
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
        u,
    )];
    for p in pieces(r.text.unwrap_or_default(), 3) {
        ev.push(openai_chunk(&id, model, json!({"content": p}), None, u));
    }
    for (i, call) in r.tool_calls.iter().enumerate() {
        let call_id = ids.next("call_FAKE");
        ev.push(openai_chunk(
            &id,
            model,
            json!({"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                   "function": {"name": call.name, "arguments": ""}}]}),
            None,
            u,
        ));
        let args = if call.input.is_null() {
            "{}".to_string()
        } else {
            call.input.to_string()
        };
        for p in pieces(&args, 3) {
            ev.push(openai_chunk(
                &id,
                model,
                json!({"tool_calls": [{"index": i, "function": {"arguments": p}}]}),
                None,
                u,
            ));
        }
    }
    let finish = if r.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    ev.push(openai_chunk(&id, model, json!({}), Some(finish), u));
    if include_usage {
        let usage = openai_usage(r.usage);
        ev.push(openai_event(&json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "system_fingerprint": "fp_fake", "choices": [], "usage": usage,
        })));
    }
    ev.push("data: [DONE]\n\n".to_string());
    ev
}

fn openai_usage(u: Usage) -> Value {
    json!({"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
           "total_tokens": u.input_tokens + u.output_tokens})
}

/// A reply as one JSON body (a server that ignores `stream`).
pub(crate) fn unstreamed(kind: Kind, model: &str, r: &Reply<'_>, ids: &mut Ids) -> Answer {
    let body = match kind {
        Kind::Anthropic => {
            let mut content = Vec::new();
            if let Some(t) = r.text {
                content.push(json!({"type": "text", "text": t}));
            }
            for c in r.tool_calls {
                content.push(json!({"type": "tool_use", "id": ids.next("toolu_01FAKE"), "name": c.name, "input": c.input}));
            }
            json!({
                "id": ids.next("msg_01FAKE"), "type": "message", "role": "assistant", "model": model,
                "content": content,
                "stop_reason": if r.tool_calls.is_empty() { "end_turn" } else { "tool_use" },
                "stop_sequence": null,
                "usage": {"input_tokens": r.usage.input_tokens, "output_tokens": r.usage.output_tokens},
            })
        }
        Kind::OpenAi => {
            let calls: Vec<Value> = r
                .tool_calls
                .iter()
                .map(|c| {
                    json!({"id": ids.next("call_FAKE"), "type": "function",
                                "function": {"name": c.name, "arguments": c.input.to_string()}})
                })
                .collect();
            let mut message = json!({"role": "assistant", "content": r.text, "refusal": null});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            json!({
                "id": ids.next("chatcmpl-fake"), "object": "chat.completion", "created": 1_700_000_000,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": null,
                             "finish_reason": if r.tool_calls.is_empty() { "stop" } else { "tool_calls" }}],
                "usage": openai_usage(r.usage),
            })
        }
    };
    Answer::Full {
        code: 200,
        headers: json_headers(kind, ids),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_on_chars() {
        assert_eq!(pieces("héllo wörld", 3), vec!["héll", "o wö", "rld"]);
        assert_eq!(pieces("ab", 3), vec!["a", "b"]);
        assert!(pieces("", 3).is_empty());
    }

    #[test]
    fn anthropic_stream_has_the_documented_events() {
        let calls = vec![ToolCall {
            name: "sh".into(),
            input: json!({"cmd": "ls -la /tmp"}),
        }];
        let r = Reply {
            text: Some("Let me look."),
            tool_calls: &calls,
            usage: Usage {
                input_tokens: 5,
                output_tokens: 7,
            },
        };
        let ev = anthropic_events("claude-x", &r, &mut Ids::default());
        let names: Vec<&str> = ev.iter().map(|e| e.lines().next().unwrap_or("")).collect();
        assert_eq!(names[0], "event: message_start");
        assert_eq!(names[1], "event: ping");
        assert_eq!(names.last(), Some(&"event: message_stop"));
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "event: content_block_delta")
                .count(),
            3 + 4
        );
        // The fragments concatenate to the input.
        let json: String = ev
            .iter()
            .filter_map(|e| e.split_once("data: ").map(|(_, d)| d.trim().to_string()))
            .filter_map(|d| serde_json::from_str::<Value>(&d).ok())
            .filter_map(|v| {
                v.pointer("/delta/partial_json")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            json!({"cmd": "ls -la /tmp"})
        );
    }

    #[test]
    fn openai_stream_ends_with_usage_and_done() {
        let r = Reply {
            text: Some("hi there"),
            tool_calls: &[],
            usage: Usage {
                input_tokens: 1,
                output_tokens: 2,
            },
        };
        let ev = openai_chunks("gpt-x", &r, true, &mut Ids::default());
        assert_eq!(ev.last().map(String::as_str), Some("data: [DONE]\n\n"));
        assert!(ev[ev.len() - 2].contains("\"prompt_tokens\":1"));
        let without = openai_chunks("gpt-x", &r, false, &mut Ids::default());
        assert!(!without.iter().any(|e| e.contains("prompt_tokens")));
    }
}
