//! OpenAI Chat Completions (and the servers that copy it: Ollama, vLLM,
//! llama.cpp, LiteLLM, …): `POST {base}/chat/completions` with
//! `stream: true`, read as `data:` chunks until `data: [DONE]`. A server
//! that ignores `stream` and answers with one JSON completion is understood
//! too.

use std::fmt;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::http::{snippet, Body, Endpoint, StreamError};
use super::sse::SseReader;
use super::{
    Block, Message, Provider, ProviderConfig, ProviderError, Request, Response, Role, StopReason,
    Usage,
};

/// Prefix of the content of a tool message whose call failed (the format
/// has no `is_error`).
pub const ERROR_PREFIX: &str = "ERROR: ";

/// The OpenAI Chat Completions client.
pub struct OpenAi {
    cfg: ProviderConfig,
    endpoint: Endpoint,
}

impl fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAi")
            .field("cfg", &self.cfg)
            .field("url", &self.endpoint.url())
            .finish()
    }
}

impl OpenAi {
    /// A client for `cfg` (`base_url` defaults to `https://api.openai.com/v1`;
    /// for Ollama it is e.g. `http://127.0.0.1:11434/v1`).
    pub fn new(cfg: ProviderConfig) -> Result<OpenAi, ProviderError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or(super::Kind::OpenAi.default_base_url());
        let url = format!("{}/chat/completions", base.trim_end_matches('/'));
        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("accept", "text/event-stream".to_string()),
        ];
        if let Some(key) = cfg.api_key.as_deref().filter(|k| !k.is_empty()) {
            headers.push(("authorization", format!("Bearer {key}")));
        }
        let endpoint = Endpoint::new(&cfg, url, headers)?;
        Ok(OpenAi { cfg, endpoint })
    }

    /// The JSON body of `req` (the model and `max_tokens` of the config
    /// when the request leaves them empty).
    pub fn request_body(&self, req: &Request<'_>) -> Value {
        let (model, max_tokens) = self.cfg.model_and_max_tokens(req);
        request_body(model, max_tokens, req)
    }
}

impl Provider for OpenAi {
    fn complete(
        &self,
        req: &Request<'_>,
        deadline: Instant,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Response, ProviderError> {
        self.endpoint
            .complete(&self.request_body(req), deadline, on_text, parse_body)
    }

    fn config(&self) -> &ProviderConfig {
        &self.cfg
    }
}

/// The Chat Completions body for `req`.
fn request_body(model: &str, max_tokens: u32, req: &Request<'_>) -> Value {
    let mut messages = Vec::new();
    if !req.system.is_empty() {
        messages.push(json!({"role": "system", "content": req.system}));
    }
    for m in req.messages {
        push_message(&mut messages, m);
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("max_tokens".into(), json!(max_tokens));
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    },
                })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    Value::Object(body)
}

/// `m` as Chat Completions messages: an assistant message carries its
/// tool calls; each tool result is a `tool` message of its own, sent
/// before the user's text (tool messages must follow the call).
fn push_message(out: &mut Vec<Value>, m: &Message) {
    let text = m.text();
    match m.role {
        Role::Assistant => {
            let calls: Vec<Value> = m
                .content
                .iter()
                .filter_map(|b| match b {
                    Block::ToolUse { id, name, input } => Some(json!({
                        "id": id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments(input)},
                    })),
                    _ => None,
                })
                .collect();
            let mut msg = Map::new();
            msg.insert("role".into(), json!("assistant"));
            let content = if text.is_empty() && !calls.is_empty() {
                Value::Null
            } else {
                json!(text)
            };
            msg.insert("content".into(), content);
            if !calls.is_empty() {
                msg.insert("tool_calls".into(), Value::Array(calls));
            }
            out.push(Value::Object(msg));
        }
        Role::User => {
            for b in &m.content {
                if let Block::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } = b
                {
                    let content = if *is_error {
                        format!("{ERROR_PREFIX}{content}")
                    } else {
                        content.clone()
                    };
                    out.push(
                        json!({"role": "tool", "tool_call_id": tool_use_id, "content": content}),
                    );
                }
            }
            let only_results = !m.content.is_empty()
                && m.content
                    .iter()
                    .all(|b| matches!(b, Block::ToolResult { .. }));
            if !only_results {
                out.push(json!({"role": "user", "content": text}));
            }
        }
    }
}

/// A tool input as the `arguments` string.
fn arguments(input: &Value) -> String {
    match input {
        Value::Null => "{}".to_string(),
        v => v.to_string(),
    }
}

fn parse_body(body: Body, on_text: &mut dyn FnMut(&str)) -> Result<Response, StreamError> {
    if body.is_json() {
        let v: Value = serde_json::from_reader(body.reader).map_err(|e| {
            if e.is_io() {
                StreamError::Io(e.into())
            } else {
                ProviderError::Protocol(format!("the answer is not JSON: {e}")).into()
            }
        })?;
        return Ok(parse_completion(&v, on_text)?);
    }
    parse_stream(body.reader, on_text)
}

/// A tool call being streamed.
#[derive(Default)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

/// The stream's state.
#[derive(Default)]
struct Acc {
    text: String,
    calls: Vec<Call>,
    finish: Option<String>,
    usage: Usage,
    model: String,
}

fn parse_stream(
    reader: impl std::io::BufRead,
    on_text: &mut dyn FnMut(&str),
) -> Result<Response, StreamError> {
    let mut acc = Acc::default();
    for event in SseReader::new(reader) {
        let event = event?;
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(acc.finish());
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| {
            ProviderError::Protocol(format!("a chunk is not JSON ({e}): {}", snippet(data)))
        })?;
        acc.on_chunk(&chunk, on_text)?;
    }
    // Some servers end without `[DONE]`: a finished answer is still whole.
    if acc.finish.is_some() {
        return Ok(acc.finish());
    }
    Err(ProviderError::Transport {
        url: String::new(),
        message: "the stream ended before [DONE]".into(),
    }
    .into())
}

impl Acc {
    fn on_chunk(
        &mut self,
        chunk: &Value,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(), ProviderError> {
        if let Some(err) = chunk.get("error") {
            return Err(stream_error(err));
        }
        if let Some(m) = chunk["model"].as_str() {
            self.model = m.to_string();
        }
        if chunk["usage"].is_object() {
            self.usage = usage_of(&chunk["usage"]);
        }
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            return Ok(());
        };
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            on_text(t);
            self.text.push_str(t);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for c in calls {
                self.on_call_fragment(c);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        Ok(())
    }

    /// One `tool_calls` fragment: the first of a call has its id and name,
    /// the rest only pieces of `arguments`. Servers that leave out `index`
    /// start a new call with each new id.
    fn on_call_fragment(&mut self, c: &Value) {
        let id = c["id"].as_str().filter(|s| !s.is_empty());
        let index = match c["index"].as_u64().and_then(|i| usize::try_from(i).ok()) {
            Some(i) => i,
            None => match id {
                Some(id) => self
                    .calls
                    .iter()
                    .position(|k| k.id == id)
                    .unwrap_or(self.calls.len()),
                None => self.calls.len().saturating_sub(1),
            },
        };
        if index >= self.calls.len() {
            self.calls.resize_with(index + 1, Call::default);
        }
        let call = &mut self.calls[index];
        if let Some(id) = id {
            call.id = id.to_string();
        }
        let f = &c["function"];
        if let Some(name) = f["name"].as_str().filter(|s| !s.is_empty()) {
            call.name = name.to_string();
        }
        match &f["arguments"] {
            Value::String(s) => call.arguments.push_str(s),
            // Some servers send the arguments as an object.
            Value::Object(_) => call.arguments = f["arguments"].to_string(),
            _ => {}
        }
    }

    fn finish(self) -> Response {
        let mut content = Vec::new();
        if !self.text.is_empty() {
            content.push(Block::Text { text: self.text });
        }
        let has_calls = !self.calls.is_empty();
        for (i, call) in self.calls.into_iter().enumerate() {
            content.push(tool_use(call, i));
        }
        Response {
            content,
            stop_reason: finish_reason(self.finish.as_deref(), has_calls),
            usage: self.usage,
            model: self.model,
            attempts: 1,
        }
    }
}

/// A finished call as a block: arguments that are not a JSON object are
/// kept as `{"_raw": "..."}` for the tool to refuse; a missing id is made up
/// so the result can still be matched.
fn tool_use(call: Call, i: usize) -> Block {
    let input = if call.arguments.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str::<Value>(&call.arguments) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({ "_raw": call.arguments }),
        }
    };
    let id = if call.id.is_empty() {
        format!("call_{i}")
    } else {
        call.id
    };
    Block::ToolUse {
        id,
        name: call.name,
        input,
    }
}

/// `stop`→EndTurn, `tool_calls`→ToolUse, `length`→MaxTokens. Servers that
/// say `stop` after tool calls (some Ollama versions) get ToolUse.
fn finish_reason(f: Option<&str>, has_calls: bool) -> StopReason {
    match f {
        Some("tool_calls" | "function_call") => StopReason::ToolUse,
        _ if has_calls => StopReason::ToolUse,
        Some("stop") | None => StopReason::EndTurn,
        Some("length") => StopReason::MaxTokens,
        Some(other) => StopReason::Other(other.to_string()),
    }
}

fn usage_of(u: &Value) -> Usage {
    Usage {
        input_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
        output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
    }
}

/// An error sent inside a 200 answer: its numeric `code` when it has one,
/// else 500.
fn stream_error(err: &Value) -> ProviderError {
    let message = err["message"]
        .as_str()
        .or_else(|| err.as_str())
        .unwrap_or("unknown error")
        .to_string();
    let status = err["code"]
        .as_u64()
        .or_else(|| err["code"].as_str().and_then(|c| c.parse().ok()))
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(500);
    ProviderError::Status { status, message }
}

/// A whole (unstreamed) completion.
fn parse_completion(v: &Value, on_text: &mut dyn FnMut(&str)) -> Result<Response, ProviderError> {
    if let Some(err) = v.get("error") {
        return Err(stream_error(err));
    }
    let choice = v["choices"]
        .as_array()
        .and_then(|c| c.first())
        .ok_or_else(|| ProviderError::Protocol("the completion has no choices".into()))?;
    let msg = &choice["message"];
    let mut acc = Acc {
        model: v["model"].as_str().unwrap_or_default().to_string(),
        usage: usage_of(&v["usage"]),
        finish: choice["finish_reason"].as_str().map(str::to_string),
        ..Acc::default()
    };
    if let Some(t) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        on_text(t);
        acc.text = t.to_string();
    }
    for c in msg["tool_calls"].as_array().into_iter().flatten() {
        acc.calls.push(Call {
            id: c["id"].as_str().unwrap_or_default().to_string(),
            name: c["function"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            arguments: match &c["function"]["arguments"] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            },
        });
    }
    Ok(acc.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ToolSpec;

    /// A tool-call stream as OpenAI sends it (with `include_usage`).
    const TOOL_STREAM: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"loc"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ation\": \"Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_def","type":"function","function":{"name":"now","arguments":"not json"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":82,"completion_tokens":18,"total_tokens":100}}

data: [DONE]

"#;

    fn parse(s: &str) -> (Result<Response, StreamError>, String) {
        let mut text = String::new();
        let r = parse_stream(s.as_bytes(), &mut |t| text.push_str(t));
        (r, text)
    }

    #[test]
    fn tool_calls_accumulate_by_index() {
        let r = parse(TOOL_STREAM).0.unwrap();
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 82,
                output_tokens: 18
            }
        );
        assert_eq!(r.model, "gpt-4o-2024-08-06");
        assert_eq!(
            r.content,
            vec![
                Block::ToolUse {
                    id: "call_abc".into(),
                    name: "get_weather".into(),
                    input: json!({"location": "Paris"})
                },
                Block::ToolUse {
                    id: "call_def".into(),
                    name: "now".into(),
                    input: json!({"_raw": "not json"})
                },
            ]
        );
    }

    #[test]
    fn text_stream_and_finish_reasons() {
        let s = "data: {\"model\":\"llama3\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n\
                 data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n\
                 data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n\
                 data: [DONE]\n\n";
        let (r, text) = parse(s);
        let r = r.unwrap();
        assert_eq!(text, "Hello");
        assert_eq!(
            r.content,
            vec![Block::Text {
                text: "Hello".into()
            }]
        );
        assert_eq!(r.stop_reason, StopReason::MaxTokens);
        assert_eq!(r.model, "llama3");
        let stop = s.replace("length", "stop");
        assert_eq!(parse(&stop).0.unwrap().stop_reason, StopReason::EndTurn);
        let filtered = s.replace("length", "content_filter");
        assert_eq!(
            parse(&filtered).0.unwrap().stop_reason,
            StopReason::Other("content_filter".into())
        );
        // No [DONE] but finished: accepted; not finished: a transport error (retried).
        assert!(parse(&s.replace("data: [DONE]\n\n", "")).0.is_ok());
        let cut = &s[..s
            .find("data: {\"choices\":[{\"index\":0,\"delta\":{},")
            .unwrap()];
        assert!(matches!(
            parse(cut).0,
            Err(StreamError::Provider(ProviderError::Transport { .. }))
        ));
    }

    #[test]
    fn calls_without_index_are_told_apart_by_id() {
        let s = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":\"a\",\"function\":{\"name\":\"x\",\"arguments\":{\"n\":1}}},{\"id\":\"b\",\"function\":{\"name\":\"y\",\"arguments\":\"\"}}]},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let r = parse(s).0.unwrap();
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.content,
            vec![
                Block::ToolUse {
                    id: "a".into(),
                    name: "x".into(),
                    input: json!({"n": 1})
                },
                Block::ToolUse {
                    id: "b".into(),
                    name: "y".into(),
                    input: json!({})
                },
            ]
        );
    }

    #[test]
    fn error_chunks_become_status_errors() {
        let s =
            "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"code\":null}}\n\n";
        match parse(s).0 {
            Err(StreamError::Provider(ProviderError::Status {
                status: 500,
                message,
            })) => assert_eq!(message, "boom"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unstreamed_completion_is_understood() {
        let v = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "let me see",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "sh", "arguments": "{\"cmd\":\"ls\"}"}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
        });
        let mut text = String::new();
        let r = parse_completion(&v, &mut |t| text.push_str(t)).unwrap();
        assert_eq!(text, "let me see");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 5,
                output_tokens: 6
            }
        );
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.content[1],
            Block::ToolUse {
                id: "call_1".into(),
                name: "sh".into(),
                input: json!({"cmd": "ls"})
            }
        );
    }

    #[test]
    fn request_body_maps_system_calls_and_results() {
        let messages = vec![
            Message::user_text("list files"),
            Message {
                role: Role::Assistant,
                content: vec![
                    Block::Text {
                        text: "sure".into(),
                    },
                    Block::ToolUse {
                        id: "call_1".into(),
                        name: "sh".into(),
                        input: json!({"cmd": "ls"}),
                    },
                    Block::ToolUse {
                        id: "call_2".into(),
                        name: "sh".into(),
                        input: json!({"cmd": "rm"}),
                    },
                ],
            },
            Message {
                role: Role::User,
                content: vec![
                    Block::ToolResult {
                        tool_use_id: "call_1".into(),
                        content: "a b".into(),
                        is_error: false,
                    },
                    Block::ToolResult {
                        tool_use_id: "call_2".into(),
                        content: "denied".into(),
                        is_error: true,
                    },
                ],
            },
        ];
        let tools = vec![ToolSpec {
            name: "sh".into(),
            description: "run".into(),
            input_schema: json!({"type": "object"}),
        }];
        let req = Request {
            model: "gpt-x",
            system: "be brief",
            messages: &messages,
            tools: &tools,
            max_tokens: 7,
        };
        let b = request_body("gpt-x", 7, &req);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"], json!({"include_usage": true}));
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(
            b["tools"][0],
            json!({"type": "function", "function": {"name": "sh", "description": "run", "parameters": {"type": "object"}}})
        );
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(m[1], json!({"role": "user", "content": "list files"}));
        assert_eq!(m[2]["content"], "sure");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"cmd\":\"ls\"}"
        );
        assert_eq!(m[2]["tool_calls"][1]["id"], "call_2");
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "a b"})
        );
        assert_eq!(
            m[4],
            json!({"role": "tool", "tool_call_id": "call_2", "content": "ERROR: denied"})
        );
    }
}
