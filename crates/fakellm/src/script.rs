//! The JSON script the binary reads: an array of turns, each one of
//!
//! ```json
//! {"reply": {"text": "hi", "tool_calls": [{"name": "sh", "input": {"cmd": "ls"}}],
//!            "usage": {"input_tokens": 10, "output_tokens": 5}}}
//! {"unstreamed": {"text": "hi"}}
//! {"status": {"code": 429, "retry_after": 1, "message": "slow down"}}
//! {"stream_error": {"code": 529, "message": "Overloaded"}}
//! {"stall_ms": 5000}
//! "echo_tool_result"
//! ```
//!
//! (`text`, `tool_calls`, `usage`, `retry_after` and `message` may be left out.)

use serde::Deserialize;

use crate::{ToolCall, Turn, Usage};

/// One turn as written in a script file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TurnSpec {
    /// [`Turn::Reply`].
    Reply(ReplySpec),
    /// [`Turn::Unstreamed`].
    Unstreamed(ReplySpec),
    /// [`Turn::Status`].
    Status(StatusSpec),
    /// [`Turn::StreamError`].
    StreamError(StreamErrorSpec),
    /// [`Turn::Stall`], in milliseconds.
    StallMs(u64),
    /// [`Turn::echo_tool_result`].
    EchoToolResult,
}

/// The fields of a reply.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplySpec {
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
    /// The tool calls.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// The usage reported.
    #[serde(default)]
    pub usage: Usage,
}

/// The fields of an error status.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusSpec {
    /// HTTP status.
    pub code: u16,
    /// `Retry-After` in seconds.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// `error.message`.
    #[serde(default)]
    pub message: String,
}

/// The fields of an in-stream error.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamErrorSpec {
    /// The status it stands for.
    pub code: u16,
    /// `error.message`.
    #[serde(default)]
    pub message: String,
}

impl From<TurnSpec> for Turn {
    fn from(spec: TurnSpec) -> Turn {
        match spec {
            TurnSpec::Reply(r) => Turn::Reply {
                text: r.text,
                tool_calls: r.tool_calls,
                usage: r.usage,
            },
            TurnSpec::Unstreamed(r) => Turn::Unstreamed {
                text: r.text,
                tool_calls: r.tool_calls,
                usage: r.usage,
            },
            TurnSpec::Status(s) => Turn::Status {
                code: s.code,
                retry_after: s.retry_after,
                message: s.message,
            },
            TurnSpec::StreamError(s) => Turn::StreamError {
                code: s.code,
                message: s.message,
            },
            TurnSpec::StallMs(ms) => Turn::Stall(std::time::Duration::from_millis(ms)),
            TurnSpec::EchoToolResult => Turn::echo_tool_result(),
        }
    }
}

/// The turns of a script file's text.
pub fn parse(text: &str) -> Result<Vec<Turn>, serde_json::Error> {
    let specs: Vec<TurnSpec> = serde_json::from_str(text)?;
    Ok(specs.into_iter().map(Turn::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_turn_kind() {
        let text = r#"[
            {"reply": {"text": "hi", "tool_calls": [{"name": "sh", "input": {"cmd": "ls"}}],
                       "usage": {"input_tokens": 10, "output_tokens": 5}}},
            {"unstreamed": {"text": "hi"}},
            {"status": {"code": 429, "retry_after": 1, "message": "slow down"}},
            {"stream_error": {"code": 529, "message": "Overloaded"}},
            {"stall_ms": 5000},
            "echo_tool_result"
        ]"#;
        let turns = parse(text).unwrap();
        assert_eq!(turns.len(), 6);
        assert!(
            matches!(&turns[0], Turn::Reply { tool_calls, usage, .. } if tool_calls.len() == 1 && usage.output_tokens == 5)
        );
        assert!(matches!(
            turns[2],
            Turn::Status {
                code: 429,
                retry_after: Some(1),
                ..
            }
        ));
        assert!(matches!(turns[4], Turn::Stall(d) if d.as_millis() == 5000));
        assert!(matches!(turns[5], Turn::Respond(_)));
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(parse(r#"[{"reply": {"txt": "typo"}}]"#).is_err());
        assert!(parse(r#"[{"nope": {}}]"#).is_err());
    }
}
