//! Anthropic's Messages API: `POST {base}/v1/messages` with `stream: true`,
//! read as the server-sent events Anthropic documents (`message_start`,
//! `content_block_start` / `_delta` / `_stop`, `message_delta`,
//! `message_stop`, `ping`, `error`). A server that answers with one JSON
//! message instead of a stream is understood too.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::http::{snippet, Body, Endpoint, StreamError};
use super::sse::SseReader;
use super::{
    Block, Message, Provider, ProviderConfig, ProviderError, Request, Response, Role, StopReason,
    Usage,
};

/// The API version this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The Anthropic Messages client.
pub struct Anthropic {
    cfg: ProviderConfig,
    endpoint: Endpoint,
}

impl fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anthropic")
            .field("cfg", &self.cfg)
            .field("url", &self.endpoint.url())
            .finish()
    }
}

impl Anthropic {
    /// A client for `cfg` (`base_url` defaults to `https://api.anthropic.com`).
    pub fn new(cfg: ProviderConfig) -> Result<Anthropic, ProviderError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or(super::Kind::Anthropic.default_base_url());
        let url = format!("{}/v1/messages", base.trim_end_matches('/'));
        let mut headers = vec![
            ("anthropic-version", ANTHROPIC_VERSION.to_string()),
            ("content-type", "application/json".to_string()),
            ("accept", "text/event-stream".to_string()),
        ];
        if let Some(key) = cfg.api_key.as_deref().filter(|k| !k.is_empty()) {
            headers.push(("x-api-key", key.to_string()));
        }
        let endpoint = Endpoint::new(&cfg, url, headers)?;
        Ok(Anthropic { cfg, endpoint })
    }

    /// The JSON body of `req` (the model and `max_tokens` of the config
    /// when the request leaves them empty).
    pub fn request_body(&self, req: &Request<'_>) -> Value {
        let (model, max_tokens) = self.cfg.model_and_max_tokens(req);
        request_body(model, max_tokens, req)
    }
}

impl Provider for Anthropic {
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

/// The Messages API body for `req`.
fn request_body(model: &str, max_tokens: u32, req: &Request<'_>) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("max_tokens".into(), json!(max_tokens));
    body.insert("stream".into(), json!(true));
    if !req.system.is_empty() {
        body.insert("system".into(), json!(req.system));
    }
    let messages: Vec<Value> = req.messages.iter().map(message_json).collect();
    body.insert("messages".into(), Value::Array(messages));
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema,
                })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    Value::Object(body)
}

/// One message; tool results first (the API wants them before any text
/// of the same user message), empty text blocks left out (it rejects them).
fn message_json(m: &Message) -> Value {
    let role = match m.role {
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let (results, others): (Vec<&Block>, Vec<&Block>) = m
        .content
        .iter()
        .partition(|b| matches!(b, Block::ToolResult { .. }));
    let content: Vec<Value> = results
        .into_iter()
        .chain(others)
        .filter_map(|b| match b {
            Block::Text { text } if text.is_empty() => None,
            Block::Text { text } => Some(json!({"type": "text", "text": text})),
            Block::ToolUse { id, name, input } => Some(json!({
                "type": "tool_use", "id": id, "name": name, "input": tool_input(input),
            })),
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => Some(json!({
                "type": "tool_result",
                "tool_use_id": tool_use_id,
                "content": content,
                "is_error": is_error,
            })),
        })
        .collect();
    json!({"role": role, "content": content})
}

/// A tool input as the API wants it: an object.
fn tool_input(input: &Value) -> Value {
    match input {
        Value::Object(_) => input.clone(),
        Value::Null => json!({}),
        other => json!({ "_raw": other }),
    }
}

/// The HTTP status Anthropic documents for an error `type` (for errors
/// that arrive inside a stream, which has already answered 200).
pub fn status_for_error_type(t: &str) -> u16 {
    match t {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
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
        return Ok(parse_message(&v, on_text)?);
    }
    parse_stream(body.reader, on_text)
}

/// A whole (unstreamed) Messages API answer.
fn parse_message(v: &Value, on_text: &mut dyn FnMut(&str)) -> Result<Response, ProviderError> {
    if let Some(err) = v.get("error").filter(|_| v["type"] == "error") {
        return Err(error_event(err));
    }
    let blocks = v["content"]
        .as_array()
        .ok_or_else(|| ProviderError::Protocol("the answer has no content array".into()))?;
    let mut content = Vec::new();
    for b in blocks {
        match b["type"].as_str() {
            Some("text") => {
                let text = b["text"].as_str().unwrap_or_default();
                if !text.is_empty() {
                    on_text(text);
                    content.push(Block::Text { text: text.into() });
                }
            }
            Some("tool_use") => content.push(Block::ToolUse {
                id: str_field(b, "id")?,
                name: str_field(b, "name")?,
                input: tool_input(&b["input"]),
            }),
            _ => {}
        }
    }
    let usage = usage_of(&v["usage"], Usage::default());
    let stop = stop_reason(v["stop_reason"].as_str(), &content);
    Ok(Response {
        content,
        stop_reason: stop,
        usage,
        model: v["model"].as_str().unwrap_or_default().to_string(),
        attempts: 1,
    })
}

/// A content block being streamed.
enum Partial {
    Text(String),
    Tool {
        id: String,
        name: String,
        json: String,
    },
    /// A kind this client does not use (thinking, …): skipped.
    Other,
}

/// The stream's state.
#[derive(Default)]
struct Acc {
    open: BTreeMap<u64, Partial>,
    done: BTreeMap<u64, Block>,
    model: String,
    usage: Usage,
    stop: Option<String>,
    started: bool,
}

fn parse_stream(
    reader: impl std::io::BufRead,
    on_text: &mut dyn FnMut(&str),
) -> Result<Response, StreamError> {
    let mut acc = Acc::default();
    for event in SseReader::new(reader) {
        let event = event?;
        let data: Value = serde_json::from_str(&event.data).map_err(|e| {
            ProviderError::Protocol(format!(
                "event {:?} is not JSON ({e}): {}",
                event.event,
                snippet(&event.data)
            ))
        })?;
        // The `type` in the data is authoritative; `event:` names the same.
        let kind = data["type"].as_str().unwrap_or(event.event.as_str());
        if acc.on_event(kind, &data, on_text)? {
            return Ok(acc.finish()?);
        }
    }
    Err(ProviderError::Transport {
        url: String::new(),
        message: "the stream ended before message_stop".into(),
    }
    .into())
}

impl Acc {
    /// Applies one event; true at `message_stop`.
    fn on_event(
        &mut self,
        kind: &str,
        data: &Value,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<bool, ProviderError> {
        match kind {
            "message_start" => {
                self.started = true;
                let m = &data["message"];
                self.model = m["model"].as_str().unwrap_or_default().to_string();
                self.usage = usage_of(&m["usage"], self.usage);
            }
            "content_block_start" => {
                let index = index_of(data)?;
                let b = &data["content_block"];
                let partial = match b["type"].as_str() {
                    Some("text") => Partial::Text(b["text"].as_str().unwrap_or_default().into()),
                    Some("tool_use") => Partial::Tool {
                        id: str_field(b, "id")?,
                        name: str_field(b, "name")?,
                        json: String::new(),
                    },
                    _ => Partial::Other,
                };
                self.open.insert(index, partial);
            }
            "content_block_delta" => self.on_delta(data, on_text)?,
            "content_block_stop" => {
                let index = index_of(data)?;
                let partial = self.open.remove(&index).ok_or_else(|| {
                    ProviderError::Protocol(format!("content_block_stop for unknown block {index}"))
                })?;
                if let Some(block) = finish_block(partial)? {
                    self.done.insert(index, block);
                }
            }
            "message_delta" => {
                if let Some(s) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop = Some(s.to_string());
                }
                self.usage = usage_of(&data["usage"], self.usage);
            }
            "message_stop" => return Ok(true),
            "error" => return Err(error_event(&data["error"])),
            // `ping` and event types added later are ignored, as Anthropic asks.
            _ => {}
        }
        Ok(false)
    }

    fn on_delta(
        &mut self,
        data: &Value,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(), ProviderError> {
        let index = index_of(data)?;
        let delta = &data["delta"];
        let Some(partial) = self.open.get_mut(&index) else {
            return Err(ProviderError::Protocol(format!(
                "content_block_delta for unknown block {index}"
            )));
        };
        match (delta["type"].as_str(), partial) {
            (Some("text_delta"), Partial::Text(text)) => {
                let t = delta["text"].as_str().unwrap_or_default();
                if !t.is_empty() {
                    on_text(t);
                    text.push_str(t);
                }
            }
            (Some("input_json_delta"), Partial::Tool { json, .. }) => {
                json.push_str(delta["partial_json"].as_str().unwrap_or_default());
            }
            (Some("text_delta" | "input_json_delta"), _) => {
                return Err(ProviderError::Protocol(format!(
                    "a {} for block {index} of another type",
                    delta["type"]
                )));
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Response, ProviderError> {
        if !self.started {
            return Err(ProviderError::Protocol(
                "message_stop before message_start".into(),
            ));
        }
        // Blocks never closed are taken as they are.
        for (index, partial) in std::mem::take(&mut self.open) {
            if let Some(block) = finish_block(partial)? {
                self.done.insert(index, block);
            }
        }
        let content: Vec<Block> = self.done.into_values().collect();
        let stop_reason = stop_reason(self.stop.as_deref(), &content);
        Ok(Response {
            content,
            stop_reason,
            usage: self.usage,
            model: self.model,
            attempts: 1,
        })
    }
}

fn finish_block(partial: Partial) -> Result<Option<Block>, ProviderError> {
    Ok(match partial {
        Partial::Text(text) if text.is_empty() => None,
        Partial::Text(text) => Some(Block::Text { text }),
        Partial::Tool { id, name, json } => {
            let input = if json.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&json).map_err(|e| {
                    ProviderError::Protocol(format!(
                        "the input of tool call {id} ({name}) is not JSON ({e}): {}",
                        snippet(&json)
                    ))
                })?
            };
            Some(Block::ToolUse { id, name, input })
        }
        Partial::Other => None,
    })
}

fn stop_reason(s: Option<&str>, content: &[Block]) -> StopReason {
    match s {
        Some("end_turn" | "stop_sequence") => StopReason::EndTurn,
        Some("tool_use") => StopReason::ToolUse,
        Some("max_tokens") => StopReason::MaxTokens,
        Some(other) => StopReason::Other(other.to_string()),
        None if content.iter().any(|b| matches!(b, Block::ToolUse { .. })) => StopReason::ToolUse,
        None => StopReason::EndTurn,
    }
}

/// `usage` merged into `prev`: the input counts cache reads and writes too;
/// fields absent keep their previous value.
fn usage_of(u: &Value, prev: Usage) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let input = n("input_tokens").map(|i| {
        i + n("cache_creation_input_tokens").unwrap_or(0)
            + n("cache_read_input_tokens").unwrap_or(0)
    });
    Usage {
        input_tokens: input.unwrap_or(prev.input_tokens),
        output_tokens: n("output_tokens").unwrap_or(prev.output_tokens),
    }
}

fn error_event(err: &Value) -> ProviderError {
    let t = err["type"].as_str().unwrap_or("api_error");
    let message = err["message"].as_str().unwrap_or(t).to_string();
    ProviderError::Status {
        status: status_for_error_type(t),
        message,
    }
}

fn index_of(data: &Value) -> Result<u64, ProviderError> {
    data["index"]
        .as_u64()
        .ok_or_else(|| ProviderError::Protocol(format!("event {} has no index", data["type"])))
}

fn str_field(v: &Value, k: &str) -> Result<String, ProviderError> {
    v[k].as_str()
        .map(str::to_string)
        .ok_or_else(|| ProviderError::Protocol(format!("a {} block without {k}", v["type"])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ToolSpec;

    /// The tool-use stream of Anthropic's streaming documentation.
    const DOC_STREAM: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-opus-4-6","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", let's check the weather."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

    fn parse(s: &str) -> (Result<Response, StreamError>, String) {
        let mut text = String::new();
        let r = parse_stream(s.as_bytes(), &mut |t| text.push_str(t));
        (r, text)
    }

    #[test]
    fn parses_the_documented_tool_use_stream() {
        let (r, text) = parse(DOC_STREAM);
        let r = r.unwrap();
        assert_eq!(text, "Okay, let's check the weather.");
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 472,
                output_tokens: 89
            }
        );
        assert_eq!(r.model, "claude-opus-4-6");
        assert_eq!(
            r.content,
            vec![
                Block::Text {
                    text: "Okay, let's check the weather.".into()
                },
                Block::ToolUse {
                    id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
                    name: "get_weather".into(),
                    input: json!({"location": "San Francisco, CA"}),
                },
            ]
        );
    }

    #[test]
    fn empty_tool_input_is_an_empty_object() {
        let s = DOC_STREAM
            .replace(r#""partial_json":"{\"location\":""#, r#""partial_json":"""#)
            .replace(
                r#""partial_json":" \"San Francisco, CA\"}""#,
                r#""partial_json":"""#,
            );
        let r = parse(&s).0.unwrap();
        assert!(matches!(&r.content[1], Block::ToolUse { input, .. } if *input == json!({})));
    }

    #[test]
    fn error_event_maps_to_its_status() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":1}}}\n\n\
                 event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
        match parse(s).0 {
            Err(StreamError::Provider(ProviderError::Status { status, message })) => {
                assert_eq!(status, 529);
                assert_eq!(message, "Overloaded");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn max_tokens_stop_and_truncated_streams() {
        let s = DOC_STREAM.replace(
            r#""stop_reason":"tool_use""#,
            r#""stop_reason":"max_tokens""#,
        );
        assert_eq!(parse(&s).0.unwrap().stop_reason, StopReason::MaxTokens);
        let cut = &DOC_STREAM[..DOC_STREAM.find("event: message_delta").unwrap()];
        assert!(matches!(
            parse(cut).0,
            Err(StreamError::Provider(ProviderError::Transport { .. }))
        ));
        let bad = DOC_STREAM.replace(r#" \"San Francisco, CA\"}"#, r#" \"San Fr"#);
        assert!(matches!(
            parse(&bad).0,
            Err(StreamError::Provider(ProviderError::Protocol(_)))
        ));
    }

    #[test]
    fn unstreamed_message_is_understood() {
        let v = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "hi"},
                        {"type": "tool_use", "id": "toolu_1", "name": "sh", "input": {"cmd": "ls"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 10}
        });
        let mut text = String::new();
        let r = parse_message(&v, &mut |t| text.push_str(t)).unwrap();
        assert_eq!(text, "hi");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 13,
                output_tokens: 4
            }
        );
        assert_eq!(r.content.len(), 2);
        assert_eq!(r.stop_reason, StopReason::ToolUse);
    }

    #[test]
    fn request_body_maps_blocks_tools_and_system() {
        let messages = vec![
            Message::user_text("list files"),
            Message {
                role: Role::Assistant,
                content: vec![
                    Block::Text {
                        text: String::new(),
                    },
                    Block::ToolUse {
                        id: "toolu_1".into(),
                        name: "sh".into(),
                        input: json!({"cmd": "ls"}),
                    },
                ],
            },
            Message {
                role: Role::User,
                content: vec![
                    Block::Text {
                        text: "and then?".into(),
                    },
                    Block::ToolResult {
                        tool_use_id: "toolu_1".into(),
                        content: "a\nb".into(),
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
            model: "claude-x",
            system: "be brief",
            messages: &messages,
            tools: &tools,
            max_tokens: 99,
        };
        let b = request_body("claude-x", 99, &req);
        assert_eq!(b["model"], "claude-x");
        assert_eq!(b["max_tokens"], 99);
        assert_eq!(b["stream"], true);
        assert_eq!(b["system"], "be brief");
        assert_eq!(
            b["tools"][0],
            json!({"name": "sh", "description": "run", "input_schema": {"type": "object"}})
        );
        assert_eq!(
            b["messages"][0],
            json!({"role": "user", "content": [{"type": "text", "text": "list files"}]})
        );
        assert_eq!(
            b["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "toolu_1", "name": "sh", "input": {"cmd": "ls"}}])
        );
        assert_eq!(
            b["messages"][2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a\nb", "is_error": true},
                {"type": "text", "text": "and then?"}
            ])
        );
        let no_sys = Request {
            system: "",
            tools: &[],
            ..req
        };
        let b = request_body("m", 1, &no_sys);
        assert!(b.get("system").is_none() && b.get("tools").is_none());
    }
}
